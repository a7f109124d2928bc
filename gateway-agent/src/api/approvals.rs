//! The approval endpoints: list (or watch), show, approve, deny.
//!
//! Authorization happens here, not in the dispatcher, because the namespace a review
//! is about is the requesting pod's, which only the stored approval knows.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tracing::info;

use super::auth::Caller;
use super::authz::{self, APPROVALS};
use super::{json_response, ApiError, ApiState, Body};
use crate::approvals::model::{now_rfc3339, ApprovalRequest, Reviewer, State, Verdict};

/// The longest reason accepted: it is stored on the approval and shown to the client
/// whose request was denied.
const MAX_REASON_CHARS: usize = 2048;

/// `?state=`, `?watch=`, `?timeoutSeconds=` of `GET /approvals`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<State>,
    /// Only approvals of calls from this namespace; a reviewer whose rights are in
    /// that namespace only is answered even while it holds no approval.
    pub namespace: Option<String>,
    pub watch: bool,
    pub timeout: Option<Duration>,
}

impl ListQuery {
    /// Strict: an unknown parameter or value is a 400, so a typo (`?sate=pending`)
    /// does not silently list everything.
    pub fn parse(query: Option<&str>) -> Result<ListQuery, ApiError> {
        let mut parsed = ListQuery::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "state" => {
                    parsed.state = Some(State::parse(value).ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "unknown state {value:?}; one of Pending, Approved, Denied, \
                             Expired, Cancelled"
                        ))
                    })?)
                }
                "watch" => {
                    parsed.watch = match value {
                        "true" | "1" => true,
                        "false" | "0" | "" => false,
                        _ => {
                            return Err(ApiError::BadRequest(format!(
                                "watch={value:?}: expected true or false"
                            )))
                        }
                    }
                }
                "namespace" => {
                    // A DNS label, as namespace names are.
                    let valid = !value.is_empty()
                        && value.len() <= 63
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !value.starts_with('-')
                        && !value.ends_with('-');
                    if !valid {
                        return Err(ApiError::BadRequest(format!(
                            "namespace={value:?} is not a namespace name"
                        )));
                    }
                    parsed.namespace = Some(value.to_owned());
                }
                "timeoutSeconds" => {
                    let seconds: u64 = value.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "timeoutSeconds={value:?}: expected a positive number"
                        ))
                    })?;
                    parsed.timeout = Some(Duration::from_secs(seconds));
                }
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {key:?}; accepted: state, namespace, watch, timeoutSeconds"
                    )))
                }
            }
        }
        Ok(parsed)
    }
}

impl ListQuery {
    /// Whether `approval` is in the `?namespace=` asked for (all are without one).
    pub fn in_namespace(&self, approval: &ApprovalRequest) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| namespace_of(approval) == ns)
    }
}

/// Checks one verb on one approval.
async fn authorize(
    state: &ApiState,
    caller: &Caller,
    verb: &'static str,
    namespace: &str,
    name: &str,
) -> Result<(), ApiError> {
    authz::authorize(state, caller, APPROVALS, verb, namespace, name).await
}

/// The namespace RBAC is asked about for an approval: the requesting pod's.
pub fn namespace_of(approval: &ApprovalRequest) -> &str {
    &approval.spec.requester.pod_namespace
}

/// `GET /approvals`: the approvals the caller may list, newest first; or a watch.
pub async fn list(
    state: &std::sync::Arc<ApiState>,
    caller: &Caller,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let query = ListQuery::parse(query)?;
    if query.watch {
        return super::watch::start(state, caller, query).await;
    }
    let mut items = state.store.list(query.state).await?;
    items.retain(|a| query.in_namespace(a));
    let scope = authz::scope(
        state,
        caller,
        APPROVALS,
        "list",
        items
            .iter()
            .map(|a| namespace_of(a).to_owned())
            .chain(query.namespace.clone()),
    )
    .await?;
    items.retain(|a| scope.includes(namespace_of(a)));
    let body = serde_json::json!({ "kind": "ApprovalList", "items": items });
    Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
}

/// `GET /approvals/{id}`: the whole approval, dry-run diff included.
pub async fn get(state: &ApiState, caller: &Caller, id: &str) -> Result<Response<Body>, ApiError> {
    let approval = find(state, caller, "get", id).await?;
    Ok(object_response(&approval))
}

/// Loads an approval and checks `verb` on it. A missing one is a 404 only for a caller
/// who could have read it anywhere; others get the 403 they would get for an existing
/// one, so ids cannot be probed.
async fn find(
    state: &ApiState,
    caller: &Caller,
    verb: &'static str,
    id: &str,
) -> Result<ApprovalRequest, ApiError> {
    match state.store.get(id).await? {
        Some(approval) => {
            authorize(state, caller, verb, namespace_of(&approval), id).await?;
            Ok(approval)
        }
        None => {
            authorize(state, caller, verb, "", id).await?;
            Err(ApiError::NotFound(id.to_owned()))
        }
    }
}

fn object_response(approval: &ApprovalRequest) -> Response<Body> {
    // An approval is strings, numbers and JSON values: serialising cannot fail.
    let json = serde_json::to_vec(approval).unwrap_or_default();
    json_response(StatusCode::OK, json)
}

/// The body of `approve` and `deny`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    reason: String,
}

/// `POST /approvals/{id}/approve|deny`: one reviewer's decision, applied with the
/// store's optimistic concurrency, logged, and the updated approval returned.
pub async fn decide<B>(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    verdict: Verdict,
    request: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = read_body(state, request).await?;
    let verb = match verdict {
        Verdict::Approve => "approve",
        Verdict::Deny => "deny",
    };
    find(state, caller, verb, id).await?;
    let reason = parse_reason(&body)?;
    let reviewer = Reviewer {
        user: caller.username.clone(),
        groups: caller.groups.clone(),
    };
    let now = now_rfc3339();
    let result = state
        .store
        .update(id, |approval| {
            approval
                .decide(&reviewer, verdict, &reason, &now)
                .map(|_| ())
        })
        .await;
    match result {
        Ok(updated) => {
            info!(
                approval = %id,
                reviewer = %caller.username,
                auth = caller.method.as_str(),
                verdict = verb,
                reason = ?reason,
                state = %updated.status.state,
                "decision recorded"
            );
            Ok(object_response(&updated))
        }
        Err(err) => {
            let err = ApiError::from(err);
            // Refused decisions are part of the record too: who tried what.
            info!(
                approval = %id,
                reviewer = %caller.username,
                verdict = verb,
                reason = ?reason,
                refused = %err,
                "decision refused"
            );
            Err(err)
        }
    }
}

/// Reads a small JSON body: 415 for another content type, 413 beyond the limit (from
/// Content-Length when given, else while reading), 400 when it does not arrive in
/// time.
async fn read_body<B>(state: &ApiState, request: Request<B>) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = state.limits.max_body_bytes;
    if let Some(kind) = request.headers().get(CONTENT_TYPE) {
        let kind = kind.to_str().unwrap_or("");
        let essence = kind.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType(kind.to_owned()));
        }
    }
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    let limited = Limited::new(request.into_body(), limit);
    match tokio::time::timeout(state.limits.body_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::BadRequest(
            "the request body did not arrive in time".to_owned(),
        )),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::TooLarge(limit))
        }
        Ok(Err(err)) => Err(ApiError::BadRequest(format!(
            "reading the request body: {err}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// `{"reason": "..."}` (an empty body means no reason), checked for length and
/// control characters (it ends up in logs and in a denied client's error message).
fn parse_reason(body: &[u8]) -> Result<String, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let bad = |err: &dyn std::fmt::Display| {
        ApiError::BadRequest(format!("the body must be {{\"reason\": \"...\"}}: {err}"))
    };
    // Through a Value first: serde would also read a struct from an array.
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(&e))?;
    if !value.is_object() {
        return Err(bad(&"not a JSON object"));
    }
    let parsed: DecisionBody = serde_json::from_value(value).map_err(|e| bad(&e))?;
    let reason = parsed.reason.trim().to_owned();
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::BadRequest(format!(
            "the reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "the reason must not contain control characters (newlines, tabs, escapes)".to_owned(),
        ));
    }
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries() {
        assert_eq!(ListQuery::parse(None).unwrap(), ListQuery::default());
        let q = ListQuery::parse(Some("state=pending&watch=true&timeoutSeconds=5")).unwrap();
        assert_eq!(q.state, Some(State::Pending));
        assert!(q.watch);
        assert_eq!(q.timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            ListQuery::parse(Some("state=APPROVED")).unwrap().state,
            Some(State::Approved)
        );
        for bad in [
            "state=maybe",
            "sate=pending",
            "watch=yes",
            "timeoutSeconds=0",
            "timeoutSeconds=-1",
            "state=pending%00",
        ] {
            assert!(
                matches!(ListQuery::parse(Some(bad)), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn reasons() {
        assert_eq!(parse_reason(b"").unwrap(), "");
        assert_eq!(parse_reason(b" \n").unwrap(), "");
        assert_eq!(parse_reason(br#"{"reason": " ok "}"#).unwrap(), "ok");
        assert_eq!(parse_reason(b"{}").unwrap(), "");
        for bad in [
            &b"{"[..],
            br#"{"reason": 5}"#,
            br#"{"reasons": "x"}"#,
            br#"["x"]"#,
            br#"{"reason": "a\nb"}"#,
            br#"{"reason": "\u001b[31mred"}"#,
        ] {
            assert!(
                matches!(parse_reason(bad), Err(ApiError::BadRequest(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(MAX_REASON_CHARS + 1));
        assert!(parse_reason(long.as_bytes()).is_err());
    }
}
