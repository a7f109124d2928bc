//! Who is calling: the caller's bearer token, reviewed by the API server (TokenReview),
//! and tied to the pod the kernel says the connection came from.
//!
//! Results are cached by a hash of the token (never the token itself) for a bounded
//! time, so a busy agent does not send one TokenReview per request, and a revoked token
//! stops working within that bound.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The extra keys the API server puts on a bound service-account token's user info.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The authenticated caller, as TokenReview returned it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// For bound service-account tokens: the pod the token was issued to.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl UserInfo {
    /// `system:serviceaccount:<ns>:<name>` → (ns, name).
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }
}

/// What TokenReview said about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Review {
    Authenticated(UserInfo),
    /// The API server does not accept the token; the message is its reason.
    Rejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("TokenReview could not be performed: {0}")]
    Unavailable(String),
}

/// The call to the API server (a trait so the cache logic is testable without one).
pub trait TokenReviewer: Send + Sync + 'static {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Review, IdentityError>> + Send + 'a>>;
}

/// Bounds of the cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long an accepted token is trusted without asking again.
    pub authenticated_ttl: Duration,
    /// How long a rejected token is remembered (short: it may become valid).
    pub rejected_ttl: Duration,
    /// At most this many tokens are remembered.
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            authenticated_ttl: Duration::from_secs(10),
            rejected_ttl: Duration::from_secs(2),
            max_entries: 10_000,
        }
    }
}

/// TokenReview with a bounded cache in front.
pub struct Identity<R> {
    reviewer: R,
    config: CacheConfig,
    cache: Mutex<HashMap<[u8; 32], (Review, Instant)>>,
}

impl<R: TokenReviewer> Identity<R> {
    pub fn new(reviewer: R, config: CacheConfig) -> Self {
        Identity {
            reviewer,
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn review(&self, token: &str) -> Result<Review, IdentityError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(review) = self.cached(&key, now) {
            return Ok(review);
        }
        let review = self.reviewer.review(token).await?;
        let ttl = match review {
            Review::Authenticated(_) => self.config.authenticated_ttl,
            Review::Rejected(_) => self.config.rejected_ttl,
        };
        self.remember(key, review.clone(), now + ttl);
        Ok(review)
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> Option<Review> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(key) {
            Some((review, expires)) if *expires > now => Some(review.clone()),
            _ => None,
        }
    }

    fn remember(&self, key: [u8; 32], review: Review, expires: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.config.max_entries {
            let now = Instant::now();
            cache.retain(|_, (_, exp)| *exp > now);
            // Still full of live entries: drop the ones closest to expiry.
            while cache.len() >= self.config.max_entries {
                let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (_, exp))| *exp)
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (review, expires));
    }

    pub fn cached_entries(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The pod the kernel attributed the connection to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributedPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Why a token may not be used from this pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "the token was issued to pod {token_pod:?} (uid {token_uid}) but is used from pod \
         {namespace}/{name} (uid {uid}); a token used from another pod is refused"
    )]
    OtherPod {
        token_pod: String,
        token_uid: String,
        namespace: String,
        name: String,
        uid: String,
    },
    #[error(
        "the token of {user:?} is not bound to a pod, so it cannot be tied to pod \
         {namespace}/{name}; use the pod's own service-account token"
    )]
    Unbound {
        user: String,
        namespace: String,
        name: String,
    },
}

/// The pod a token is bound to must be the pod the connection came from.
pub fn check_pod(
    user: &UserInfo,
    pod: &AttributedPod,
    allow_unbound: bool,
) -> Result<(), Mismatch> {
    match (&user.pod_uid, &user.pod_name) {
        (Some(uid), _) if *uid == pod.uid => Ok(()),
        (Some(uid), name) => Err(Mismatch::OtherPod {
            token_pod: name.clone().unwrap_or_default(),
            token_uid: uid.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        }),
        (None, _) if allow_unbound => Ok(()),
        (None, _) => Err(Mismatch::Unbound {
            user: user.username.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        }),
    }
}

/// TokenReview through the API server, with the agent's own credentials.
pub struct KubeTokenReviewer {
    client: kube::Client,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        KubeTokenReviewer { client }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Review, IdentityError>> + Send + 'a>> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let request = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: None,
                },
                ..TokenReview::default()
            };
            let reviewed = api
                .create(&kube::api::PostParams::default(), &request)
                .await
                .map_err(|err| IdentityError::Unavailable(err.to_string()))?;
            let status = reviewed.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                let reason = status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "the token is not valid".to_owned());
                return Ok(Review::Rejected(reason));
            }
            let user = status.user.unwrap_or_default();
            let extra = user.extra.unwrap_or_default();
            let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
            Ok(Review::Authenticated(UserInfo {
                username: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                pod_name: first(EXTRA_POD_NAME),
                pod_uid: first(EXTRA_POD_UID),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    struct Counting(Arc<AtomicUsize>);

    impl TokenReviewer for Counting {
        fn review<'a>(
            &'a self,
            token: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<Review, IdentityError>> + Send + 'a>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(if token.starts_with("good") {
                    Review::Authenticated(UserInfo {
                        username: format!("user-{token}"),
                        ..UserInfo::default()
                    })
                } else {
                    Review::Rejected("token is invalid".into())
                })
            })
        }
    }

    #[tokio::test]
    async fn reviews_are_cached_per_token_and_expire() {
        let calls = Arc::new(AtomicUsize::new(0));
        let identity = Identity::new(
            Counting(calls.clone()),
            CacheConfig {
                authenticated_ttl: Duration::from_millis(50),
                rejected_ttl: Duration::from_millis(50),
                max_entries: 100,
            },
        );
        for _ in 0..3 {
            assert!(
                matches!(identity.review("good-1").await.unwrap(), Review::Authenticated(u) if u.username == "user-good-1")
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(
            identity.review("bad").await.unwrap(),
            Review::Rejected(_)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // After the TTL the API server is asked again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while calls.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "cache never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
            identity.review("good-1").await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let identity = Identity::new(
            Counting(calls),
            CacheConfig {
                max_entries: 10,
                ..CacheConfig::default()
            },
        );
        for i in 0..100 {
            identity.review(&format!("good-{i}")).await.unwrap();
        }
        assert!(identity.cached_entries() <= 10);
    }

    #[test]
    fn a_token_from_another_pod_is_refused() {
        let pod = AttributedPod {
            namespace: "agents".into(),
            name: "coder".into(),
            uid: "uid-1".into(),
        };
        let mut user = UserInfo {
            username: "system:serviceaccount:agents:coder".into(),
            pod_name: Some("coder".into()),
            pod_uid: Some("uid-1".into()),
            ..UserInfo::default()
        };
        assert_eq!(check_pod(&user, &pod, false), Ok(()));
        user.pod_uid = Some("uid-2".into());
        user.pod_name = Some("other".into());
        let err = check_pod(&user, &pod, false).unwrap_err();
        assert!(err.to_string().contains("issued to pod \"other\""), "{err}");
        user.pod_uid = None;
        assert!(matches!(
            check_pod(&user, &pod, false),
            Err(Mismatch::Unbound { .. })
        ));
        assert_eq!(check_pod(&user, &pod, true), Ok(()));
        assert_eq!(user.service_account(), Some(("agents", "coder")));
    }
}
