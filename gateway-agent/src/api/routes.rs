//! The route table of the REST API: which method and path reach which endpoint.
//!
//! Matching is strict and literal on purpose: the path is split on `/` and each segment
//! must equal the pattern's segment, or fill a `{id}` slot with a well-formed id of the
//! row's kind (an approval id, or a session id as the recorder makes them). There is no
//! percent-decoding, no `.`/`..` resolution and no trailing-slash leniency, so an
//! encoded or traversing path simply matches nothing and gets a 404 — there is no
//! second interpretation of a path for an attacker to aim at, and no id that could name
//! a file outside the sessions directory.
//!
//! Adding a route is one row in [`ROUTES`] and one arm in the dispatcher
//! (`api::dispatch`).

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
    /// `GET /api/v1/sessions` (`?namespace=`, `?pod=`).
    ListSessions,
    /// `GET /api/v1/sessions/{id}`.
    GetSession,
    /// `GET /api/v1/sessions/{id}/records`.
    SessionRecords,
}

/// What may fill a row's `{id}` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// The pattern has no slot.
    None,
    /// An approval id ([`is_approval_id`]).
    Approval,
    /// A session id ([`is_session_id`]).
    Session,
}

impl IdKind {
    /// Whether `segment` is an id of this kind.
    fn accepts(self, segment: &str) -> bool {
        match self {
            IdKind::None => false,
            IdKind::Approval => is_approval_id(segment),
            IdKind::Session => is_session_id(segment),
        }
    }
}

/// One row of the table: a path pattern, the method it answers, the endpoint.
pub struct Route {
    /// `/`-separated segments; `{id}` is an id of kind [`Route::id`].
    pub pattern: &'static str,
    /// The one method this row answers (a path may have several rows).
    pub method: Method,
    /// What answers.
    pub endpoint: Endpoint,
    /// What fills the `{id}` slot.
    pub id: IdKind,
}

/// Every route the server answers. The OpenAPI document must describe each of them (a
/// unit test checks it).
pub const ROUTES: &[Route] = &[
    Route {
        pattern: "/api/v1/openapi.json",
        method: Method::GET,
        endpoint: Endpoint::OpenApi,
        id: IdKind::None,
    },
    Route {
        pattern: "/api/v1/approvals",
        method: Method::GET,
        endpoint: Endpoint::ListApprovals,
        id: IdKind::None,
    },
    Route {
        pattern: "/api/v1/approvals/{id}",
        method: Method::GET,
        endpoint: Endpoint::GetApproval,
        id: IdKind::Approval,
    },
    Route {
        pattern: "/api/v1/approvals/{id}/approve",
        method: Method::POST,
        endpoint: Endpoint::Approve,
        id: IdKind::Approval,
    },
    Route {
        pattern: "/api/v1/approvals/{id}/deny",
        method: Method::POST,
        endpoint: Endpoint::Deny,
        id: IdKind::Approval,
    },
    Route {
        pattern: "/api/v1/sessions",
        method: Method::GET,
        endpoint: Endpoint::ListSessions,
        id: IdKind::None,
    },
    Route {
        pattern: "/api/v1/sessions/{id}",
        method: Method::GET,
        endpoint: Endpoint::GetSession,
        id: IdKind::Session,
    },
    Route {
        pattern: "/api/v1/sessions/{id}/records",
        method: Method::GET,
        endpoint: Endpoint::SessionRecords,
        id: IdKind::Session,
    },
];

/// A matched request: the endpoint and the id from the path, if the pattern has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// What answers.
    pub endpoint: Endpoint,
    /// The well-formed id from the path, of the row's [`IdKind`].
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
        let Some(id) = match_pattern(row.pattern, row.id, path) else {
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
/// matches one with an `{id}` slot filled by a valid id of `kind`, `None` otherwise.
fn match_pattern(pattern: &str, kind: IdKind, path: &str) -> Option<Option<String>> {
    let mut id = None;
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(segment)) if kind.accepts(segment) => {
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

/// A session id as the recorder makes them: 1 to 128 of `[A-Za-z0-9._-]`, not
/// starting with a dot. Without `/`, `%` or a leading dot, an id can only ever name a
/// file in the sessions directory (`..` and `.` start with a dot; `a..b` is a plain
/// name).
pub fn is_session_id(text: &str) -> bool {
    crate::recording::valid_id(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "ar-0123456789abcdef";
    const SESSION: &str = "18c0f09a2b3c4d5e-12";

    #[test]
    fn every_route_matches_its_own_pattern() {
        for row in ROUTES {
            let sample = match row.id {
                IdKind::Session => SESSION,
                _ => ID,
            };
            let path = row.pattern.replace("{id}", sample);
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
    fn session_routes_take_session_ids() {
        let m = route(&Method::GET, "/api/v1/sessions").unwrap();
        assert_eq!((m.endpoint, m.id), (Endpoint::ListSessions, None));
        let m = route(&Method::GET, &format!("/api/v1/sessions/{SESSION}")).unwrap();
        assert_eq!(m.endpoint, Endpoint::GetSession);
        assert_eq!(m.id.as_deref(), Some(SESSION));
        let m = route(&Method::GET, &format!("/api/v1/sessions/{SESSION}/records")).unwrap();
        assert_eq!(m.endpoint, Endpoint::SessionRecords);
        assert_eq!(m.id.as_deref(), Some(SESSION));
        // What the recorder makes of a hostile connection id is still a plain name.
        for id in [
            "s.._etc_passwd",
            "a.b",
            "A_Z-09",
            "records",
            &"x".repeat(128),
        ] {
            let m = route(&Method::GET, &format!("/api/v1/sessions/{id}/records")).unwrap();
            assert_eq!(m.id.as_deref(), Some(id));
        }
        let err = route(&Method::POST, &format!("/api/v1/sessions/{SESSION}")).unwrap_err();
        assert!(matches!(err, RouteError::MethodNotAllowed { allow, .. } if allow == "GET"));
    }

    #[test]
    fn hostile_session_paths_match_nothing() {
        let long = format!("/api/v1/sessions/{}", "x".repeat(129));
        for path in [
            "/api/v1/sessions/",
            "/api/v1/sessions//records",
            "/api/v1/sessions/..",
            "/api/v1/sessions/.",
            "/api/v1/sessions/../approvals",
            "/api/v1/sessions/..%2f..%2fetc%2fpasswd",
            "/api/v1/sessions/%2e%2e",
            "/api/v1/sessions/%2e%2e/records",
            "/api/v1/sessions/.hidden",
            "/api/v1/sessions/.jsonl",
            "/api/v1/sessions/a b",
            "/api/v1/sessions/a%20b",
            "/api/v1/sessions/a\\b",
            "/api/v1/sessions/a:b",
            "/api/v1/sessions/a\0b",
            "/api/v1/sessions/s1/records/",
            "/api/v1/sessions/s1/records/x",
            "/api/v1/sessions/s1/../../etc/passwd",
            "/api/v1/sessions/{id}",
            "/api/v1/sessions/é",
            &long,
        ] {
            assert_eq!(
                route(&Method::GET, path),
                Err(RouteError::NotFound),
                "{path:?} must not match"
            );
        }
    }

    #[test]
    fn session_ids() {
        assert!(is_session_id(SESSION));
        assert!(is_session_id("a..b"));
        for bad in [
            "",
            ".",
            "..",
            ".x",
            "a/b",
            "a%2fb",
            "a b",
            "ä",
            &"x".repeat(129),
        ] {
            assert!(!is_session_id(bad), "{bad:?}");
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
