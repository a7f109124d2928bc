//! The route table of the REST API: which method and path reach which endpoint.
//!
//! Matching is strict and literal on purpose: the path is split on `/` and each segment
//! must equal the pattern's segment, or fill a `{id}` slot with a well-formed approval id.
//! There is no percent-decoding, no `.`/`..` resolution and no trailing-slash leniency,
//! so an encoded or traversing path simply matches nothing and gets a 404 — there is no
//! second interpretation of a path for an attacker to aim at.
//!
//! Adding a route (the sessions API, later) is one row in [`ROUTES`] and one arm in the
//! dispatcher (`api::dispatch`).

use http::Method;

/// What a request asks for, once its path and method matched a row of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /api/v1/openapi.json` (no authentication).
    OpenApi,
    /// `GET /api/v1/approvals` (`?state=`, `?watch=true`).
    ListApprovals,
    /// `GET /api/v1/approvals/{id}`.
    GetApproval,
    /// `POST /api/v1/approvals/{id}/approve`.
    Approve,
    /// `POST /api/v1/approvals/{id}/deny`.
    Deny,
}

/// One row of the table: a path pattern, the method it answers, the endpoint.
pub struct Route {
    /// `/`-separated segments; `{id}` is an approval id.
    pub pattern: &'static str,
    /// The one method this row answers (a path may have several rows).
    pub method: Method,
    /// What answers.
    pub endpoint: Endpoint,
}

/// Every route the server answers. The OpenAPI document must describe each of them (a
/// unit test checks it).
pub const ROUTES: &[Route] = &[
    Route {
        pattern: "/api/v1/openapi.json",
        method: Method::GET,
        endpoint: Endpoint::OpenApi,
    },
    Route {
        pattern: "/api/v1/approvals",
        method: Method::GET,
        endpoint: Endpoint::ListApprovals,
    },
    Route {
        pattern: "/api/v1/approvals/{id}",
        method: Method::GET,
        endpoint: Endpoint::GetApproval,
    },
    Route {
        pattern: "/api/v1/approvals/{id}/approve",
        method: Method::POST,
        endpoint: Endpoint::Approve,
    },
    Route {
        pattern: "/api/v1/approvals/{id}/deny",
        method: Method::POST,
        endpoint: Endpoint::Deny,
    },
];

/// A matched request: the endpoint and the id from the path, if the pattern has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// What answers.
    pub endpoint: Endpoint,
    /// The well-formed approval id from the path.
    pub id: Option<String>,
}

/// Why no endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No route has this path (the API server's wording).
    #[error("the server could not find the requested resource")]
    NotFound,
    /// The path exists but not for this method.
    #[error("method {method} is not allowed here (allowed: {allow})")]
    MethodNotAllowed {
        /// The method asked for.
        method: Method,
        /// The methods that do answer, for the `Allow` header.
        allow: String,
    },
}

/// Finds the endpoint for `method` and `path` (the path only, no query).
pub fn route(method: &Method, path: &str) -> Result<Matched, RouteError> {
    let mut allowed: Vec<&Method> = Vec::new();
    for row in ROUTES {
        let Some(id) = match_pattern(row.pattern, path) else {
            continue;
        };
        // HEAD is not offered: nothing here is cacheable and a reviewer's client never
        // needs it.
        if row.method == *method {
            return Ok(Matched {
                endpoint: row.endpoint,
                id,
            });
        }
        allowed.push(&row.method);
    }
    if allowed.is_empty() {
        return Err(RouteError::NotFound);
    }
    Err(RouteError::MethodNotAllowed {
        method: method.clone(),
        allow: allowed
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `Some(None)` when `path` matches a pattern without a slot, `Some(Some(id))` when it
/// matches one with an `{id}` slot filled by a valid id, `None` otherwise.
fn match_pattern(pattern: &str, path: &str) -> Option<Option<String>> {
    let mut id = None;
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(segment)) if is_approval_id(segment) => {
                id = Some(segment.to_owned());
            }
            (Some(w), Some(h)) if w == h && w != "{id}" => {}
            _ => return None,
        }
    }
}

/// `ar-` and exactly 16 lowercase hex digits: what `model::new_id` makes. Anything else
/// (upper case, `..`, `%2e`, a longer string) is not an approval and never reaches the
/// store.
pub fn is_approval_id(text: &str) -> bool {
    text.strip_prefix("ar-").is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "ar-0123456789abcdef";

    #[test]
    fn every_route_matches_its_own_pattern() {
        for row in ROUTES {
            let path = row.pattern.replace("{id}", ID);
            let matched = route(&row.method, &path).unwrap();
            assert_eq!(matched.endpoint, row.endpoint, "{path}");
            assert_eq!(matched.id.is_some(), row.pattern.contains("{id}"));
        }
    }

    #[test]
    fn ids_are_taken_from_the_path() {
        let m = route(&Method::POST, &format!("/api/v1/approvals/{ID}/deny")).unwrap();
        assert_eq!(m.endpoint, Endpoint::Deny);
        assert_eq!(m.id.as_deref(), Some(ID));
    }

    #[test]
    fn a_wrong_method_is_405_with_the_allowed_ones() {
        let err = route(&Method::DELETE, &format!("/api/v1/approvals/{ID}")).unwrap_err();
        assert_eq!(
            err,
            RouteError::MethodNotAllowed {
                method: Method::DELETE,
                allow: "GET".into()
            }
        );
        let err = route(&Method::GET, &format!("/api/v1/approvals/{ID}/approve")).unwrap_err();
        assert!(matches!(err, RouteError::MethodNotAllowed { allow, .. } if allow == "POST"));
    }

    #[test]
    fn hostile_paths_match_nothing() {
        for path in [
            "/",
            "",
            "/api",
            "/api/v1",
            "/api/v1/",
            "/api/v1/approvals/",
            "/api/v1//approvals",
            "/api/v2/approvals",
            "/API/v1/approvals",
            "/api/v1/approvals/ar-0123456789ABCDEF",
            "/api/v1/approvals/ar-0123456789abcde",
            "/api/v1/approvals/ar-0123456789abcdef0",
            "/api/v1/approvals/../approvals",
            "/api/v1/approvals/..%2f..%2fetc%2fpasswd",
            "/api/v1/approvals/%2e%2e",
            "/api/v1/approvals/ar-0123456789abcdef/../../openapi.json",
            "/api/v1/approvals/ar-0123456789abcdef/approve/",
            "/api/v1/approvals/ar-0123456789abcdef/approve/x",
            "/api/v1/approvals/ar-0123456789abcdef/delete",
            "/api/v1/approvals/{id}",
            "/api/v1/./approvals",
            "/etc/passwd",
        ] {
            assert_eq!(
                route(&Method::GET, path),
                Err(RouteError::NotFound),
                "{path:?} must not match"
            );
        }
    }

    #[test]
    fn approval_ids() {
        assert!(is_approval_id(ID));
        assert!(is_approval_id(&crate::approvals::model::new_id()));
        for bad in [
            "",
            "ar-",
            "ar-xyz",
            "AR-0123456789abcdef",
            "ar-0123456789abcdeg",
        ] {
            assert!(!is_approval_id(bad), "{bad}");
        }
    }
}
