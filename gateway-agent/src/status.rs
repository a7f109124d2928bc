//! Every error a client sees is a `metav1.Status`, built here and nowhere else.
//!
//! kubectl, client-go, kube-rs and the Python client all read `reason`, `code` and
//! `message` (kubectl prints `Error from server (<reason>): <message>`), and client-go
//! honours `details.retryAfterSeconds` on 429s; so these are the fields a person or an
//! AI agent acts on.

use serde::{Deserialize, Serialize};

/// `metav1.Status` (the failure form; Tollgate never sends a success Status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub kind: String,
    pub api_version: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: String,
    pub message: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    pub code: u16,
}

/// `metav1.StatusDetails`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

/// `metav1.StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusCause {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
}

/// What a Status is about: the object the request named, for `details` and for the
/// `<resource> "<name>" is forbidden` wording clients expect.
#[derive(Debug, Clone, Default)]
pub struct Subject<'a> {
    pub group: &'a str,
    pub resource: &'a str,
    pub name: &'a str,
}

impl Status {
    pub fn failure(code: u16, reason: &str, message: impl Into<String>) -> Status {
        Status {
            kind: "Status".to_owned(),
            api_version: "v1".to_owned(),
            metadata: serde_json::Map::new(),
            status: "Failure".to_owned(),
            message: message.into(),
            reason: reason.to_owned(),
            details: None,
            code,
        }
    }

    pub fn with_details(mut self, details: StatusDetails) -> Status {
        self.details = Some(details);
        self
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> Status {
        Status::failure(400, "BadRequest", message)
    }

    /// 401: no credential, or one the API server does not accept.
    pub fn unauthorized(message: impl Into<String>) -> Status {
        Status::failure(401, "Unauthorized", message)
    }

    /// 403, worded as the API server words RBAC refusals, so kubectl prints
    /// `Error from server (Forbidden): pods "x" is forbidden: <why>`.
    pub fn forbidden(subject: &Subject<'_>, why: &str) -> Status {
        let what = match (subject.resource, subject.name) {
            ("", _) => "request".to_owned(),
            (resource, "") => qualified(resource, subject.group),
            (resource, name) => format!("{} {name:?}", qualified(resource, subject.group)),
        };
        Status::failure(403, "Forbidden", format!("{what} is forbidden: {why}")).with_details(
            StatusDetails {
                name: subject.name.to_owned(),
                group: subject.group.to_owned(),
                kind: subject.resource.to_owned(),
                ..StatusDetails::default()
            },
        )
    }

    /// 413: a body larger than the configured bound.
    pub fn request_entity_too_large(limit: usize) -> Status {
        Status::failure(
            413,
            "RequestEntityTooLarge",
            format!("request body is larger than the {limit}-byte limit"),
        )
    }

    /// 431 is not a Kubernetes reason; oversized headers get a 400 BadRequest, as the
    /// API server's own HTTP server answers them.
    pub fn headers_too_large(limit: usize) -> Status {
        Status::bad_request(format!(
            "request headers are larger than the {limit}-byte limit"
        ))
    }

    /// 429 with Retry-After: the call waits for something (an approval) and the client
    /// should come back.
    pub fn too_many_requests(message: impl Into<String>, retry_after_seconds: u32) -> Status {
        Status::failure(429, "TooManyRequests", message).with_details(StatusDetails {
            retry_after_seconds: Some(retry_after_seconds),
            ..StatusDetails::default()
        })
    }

    /// 500: a fault of ours; the message must not leak internals beyond what helps.
    pub fn internal_error(message: impl Into<String>) -> Status {
        Status::failure(500, "InternalError", message)
    }

    /// 503: the API server (or a dependency such as TokenReview) cannot be reached.
    pub fn service_unavailable(message: impl Into<String>) -> Status {
        Status::failure(503, "ServiceUnavailable", message)
    }

    /// 504: the upstream did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Status {
        Status::failure(504, "Timeout", message)
    }

    /// The JSON body, ready to send with `Content-Type: application/json`.
    pub fn to_json(&self) -> Vec<u8> {
        // A Status has only strings, numbers and maps of them; serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":500}"#.to_vec()
        })
    }
}

/// `deployments.apps`, or `pods` for the core group: the form RBAC messages use.
fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_reads_like_the_api_server() {
        let status = Status::forbidden(
            &Subject {
                group: "apps",
                resource: "deployments",
                name: "api",
            },
            "tollgate policy rule \"no-deletes\": deleting workloads needs a human",
        );
        assert_eq!(status.code, 403);
        assert_eq!(status.reason, "Forbidden");
        assert_eq!(
            status.message,
            "deployments.apps \"api\" is forbidden: tollgate policy rule \"no-deletes\": deleting workloads needs a human"
        );
        let json: serde_json::Value = serde_json::from_slice(&status.to_json()).unwrap();
        assert_eq!(json["kind"], "Status");
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["status"], "Failure");
        assert_eq!(json["details"]["kind"], "deployments");
        assert_eq!(json["details"]["group"], "apps");
        assert!(json["metadata"].is_object());
    }

    #[test]
    fn too_many_requests_carries_retry_after() {
        let status = Status::too_many_requests("waiting for approval a-1", 5);
        let json: serde_json::Value = serde_json::from_slice(&status.to_json()).unwrap();
        assert_eq!(json["code"], 429);
        assert_eq!(json["reason"], "TooManyRequests");
        assert_eq!(json["details"]["retryAfterSeconds"], 5);
    }

    #[test]
    fn round_trips() {
        let status = Status::bad_request("invalid JSON at line 1 column 2");
        let back: Status = serde_json::from_slice(&status.to_json()).unwrap();
        assert_eq!(back, status);
        assert!(!String::from_utf8(status.to_json())
            .unwrap()
            .contains("details"));
    }
}
