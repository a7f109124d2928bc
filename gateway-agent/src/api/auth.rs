//! Who is calling the REST API: the reviewer's bearer token, either an OIDC ID token of
//! the configured issuer (verified here against its keys) or anything else the API
//! server can review (TokenReview: service-account tokens, tokens of the cluster's own
//! authenticators).
//!
//! Which path a token takes is decided by its unverified `iss` claim only. A token that
//! claims our OIDC issuer and fails verification is refused outright rather than tried
//! again with TokenReview, so an ID token is never sent to the API server by mistake.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use super::oidc::{OidcError, OidcVerifier};
use crate::identity::{
    Identity, IdentityError, Review, TokenReviewer, EXTRA_POD_NAME, EXTRA_POD_UID,
};

/// The longest bearer token accepted; real ones are a few KiB at most.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// An authenticated caller, as SubjectAccessReview needs them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    /// The user name (with the OIDC prefix, for ID tokens).
    pub username: String,
    /// TokenReview's uid; empty for ID tokens.
    pub uid: String,
    /// Groups (with the OIDC prefix, for ID tokens).
    pub groups: Vec<String>,
    /// TokenReview's extra (the pod binding of a bound service-account token).
    pub extra: BTreeMap<String, Vec<String>>,
    /// How the caller was authenticated, for logs.
    pub method: AuthMethod,
}

/// Which authenticator accepted the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMethod {
    /// The API server (TokenReview).
    #[default]
    TokenReview,
    /// An ID token of the configured OIDC issuer.
    Oidc,
}

impl AuthMethod {
    /// `tokenreview` or `oidc`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::TokenReview => "tokenreview",
            AuthMethod::Oidc => "oidc",
        }
    }
}

/// Why a request is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No usable `Authorization: Bearer` header; the message says what was wrong.
    #[error("{0}")]
    NoCredential(&'static str),
    /// The token was looked at and refused.
    #[error("{0}")]
    Rejected(String),
    /// The token could not be checked (TokenReview or the issuer's keys unavailable).
    #[error("{0}")]
    Unavailable(String),
}

/// TokenReview as the API needs it: an object-safe view of [`Identity`], so the state
/// does not carry the reviewer's type and tests can answer without an API server.
pub trait ReviewTokens: Send + Sync + 'static {
    /// What the API server says about `token`.
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Review, IdentityError>> + Send + 'a>>;
}

impl<R: TokenReviewer> ReviewTokens for Identity<R> {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Review, IdentityError>> + Send + 'a>> {
        Box::pin(Identity::review(self, token))
    }
}

/// Bearer-token authentication: OIDC for the configured issuer, TokenReview otherwise.
pub struct Authenticator {
    tokens: Arc<dyn ReviewTokens>,
    oidc: Option<OidcVerifier>,
}

impl Authenticator {
    /// TokenReview through `tokens`; ID tokens of `oidc`'s issuer verified by it.
    pub fn new(tokens: Arc<dyn ReviewTokens>, oidc: Option<OidcVerifier>) -> Authenticator {
        Authenticator { tokens, oidc }
    }

    /// Authenticates the request's bearer token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = bearer_token(headers)?;
        if let Some(oidc) = self.oidc.as_ref().filter(|o| o.claims_to_be_ours(token)) {
            return match oidc.verify(token).await {
                Ok(user) => Ok(Caller {
                    username: user.username,
                    uid: String::new(),
                    groups: user.groups,
                    extra: BTreeMap::new(),
                    method: AuthMethod::Oidc,
                }),
                Err(OidcError::Rejected(why)) => Err(AuthError::Rejected(why)),
                Err(err @ OidcError::Keys(_)) => Err(AuthError::Unavailable(err.to_string())),
            };
        }
        match self.tokens.review(token).await {
            Ok(Review::Authenticated(user)) => {
                // TokenReview's `extra` reaches us only as the pod binding; it goes back
                // into the SubjectAccessReview so rules that look at it still can.
                let mut extra = BTreeMap::new();
                if let Some(name) = user.pod_name {
                    extra.insert(EXTRA_POD_NAME.to_owned(), vec![name]);
                }
                if let Some(uid) = user.pod_uid {
                    extra.insert(EXTRA_POD_UID.to_owned(), vec![uid]);
                }
                Ok(Caller {
                    username: user.username,
                    uid: user.uid,
                    groups: user.groups,
                    extra,
                    method: AuthMethod::TokenReview,
                })
            }
            Ok(Review::Rejected(why)) => Err(AuthError::Rejected(why)),
            Err(err) => Err(AuthError::Unavailable(err.to_string())),
        }
    }
}

/// The token of the one `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::NoCredential(
        "no credential: send Authorization: Bearer <token>",
    ))?;
    // Two headers could be read differently by two parsers; refuse rather than pick.
    if values.next().is_some() {
        return Err(AuthError::NoCredential(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::NoCredential("the Authorization header is not printable ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::NoCredential(
        "the Authorization header is not Bearer <token>",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NoCredential("only Bearer tokens are accepted"));
    }
    let token = token.trim();
    if token.is_empty() || token.contains(' ') {
        return Err(AuthError::NoCredential(
            "the Authorization header is not Bearer <token>",
        ));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::NoCredential("the bearer token is too long"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token(&headers(&["Bearer abc"])).unwrap(), "abc");
        assert_eq!(bearer_token(&headers(&["bearer  abc "])).unwrap(), "abc");
        for bad in [
            &[][..],
            &["Basic dXNlcjpwYXNz"],
            &["Bearer"],
            &["Bearer "],
            &["Bearer a b"],
            &["Token abc"],
            &["Bearer a", "Bearer b"],
        ] {
            assert!(
                matches!(bearer_token(&headers(bad)), Err(AuthError::NoCredential(_))),
                "{bad:?}"
            );
        }
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert!(bearer_token(&headers(&[&long])).is_err());
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        );
        assert!(bearer_token(&h).is_err());
    }
}
