//! What a caller may do: SubjectAccessReview on `approvalrequests.tollgate.dev` and
//! `sessions.tollgate.dev`, so the cluster's RBAC decides who may read and who may
//! decide on approvals, and who may read recorded sessions.
//!
//! Reads use `get`, `list` and `watch`; decisions use the custom verbs `approve` and
//! `deny` (RBAC rules may name any verb), so "may see the queue" and "may approve" are
//! separate grants. The namespace is the requesting pod's (for a session, the recorded
//! pod's), so a Role in a team's namespace makes its members reviewers of that team's
//! agents.
//!
//! [`scope`] answers "which namespaces may this caller see" for lists (cluster-wide, or
//! namespace by namespace), [`authorize`] one verb on one object.
//!
//! Answers are cached briefly and boundedly: a reviewer paging through the queue costs
//! one review per namespace every few seconds, and a revoked grant stops working within
//! that bound.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::{ApiError, ApiState, Refusal};

/// The API group every review is about.
pub const GROUP: &str = "tollgate.dev";
/// Approvals: the `ApprovalRequest` custom resource's plural.
pub const APPROVALS: &str = "approvalrequests";
/// Recorded sessions. No such object exists in the API server: the name is only there
/// for RBAC rules to grant (`deploy/reviewer-rbac.yaml`).
pub const SESSIONS: &str = "sessions";

/// SubjectAccessReviews sent at once when a list falls back to per-namespace checks.
const PARALLEL_REVIEWS: usize = 8;

/// What is asked: `verb` on the `resource` in `namespace` (empty: every namespace),
/// `name` (empty: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// [`APPROVALS`] or [`SESSIONS`].
    pub resource: &'static str,
    /// `get`, `list`, `watch`, `approve` or `deny`.
    pub verb: &'static str,
    /// The requesting (recorded) pod's namespace; empty for cluster scope.
    pub namespace: String,
    /// The approval or session id; empty for any.
    pub name: String,
}

/// The authorizer's answer; `reason` is RBAC's explanation when it gives one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// RBAC allows it (and no authorizer denied it).
    pub allowed: bool,
    /// The authorizer's explanation, possibly empty.
    pub reason: String,
}

/// Why no answer could be had.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// The API server could not be asked; the message says why.
    #[error("SubjectAccessReview could not be performed: {0}")]
    Unavailable(String),
}

/// The call to the API server (a trait so the cache and the handlers are testable
/// without one).
pub trait AccessReviewer: Send + Sync + 'static {
    /// Whether `caller` may do what `attributes` say.
    fn review<'a>(
        &'a self,
        caller: &'a Caller,
        attributes: &'a Attributes,
    ) -> Pin<Box<dyn Future<Output = Result<Access, AuthzError>> + Send + 'a>>;
}

/// Bounds of the answer cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long a yes is trusted.
    pub allowed_ttl: Duration,
    /// How long a no is trusted.
    pub denied_ttl: Duration,
    /// At most this many answers are kept.
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            allowed_ttl: Duration::from_secs(5),
            // Short, so a reviewer who was just granted the role can use it at once.
            denied_ttl: Duration::from_secs(2),
            max_entries: 10_000,
        }
    }
}

/// SubjectAccessReview with a bounded cache in front.
pub struct Authorizer {
    reviewer: Box<dyn AccessReviewer>,
    config: CacheConfig,
    cache: Mutex<HashMap<[u8; 32], (Access, Instant)>>,
}

impl Authorizer {
    /// `reviewer` behind a cache bounded by `config`.
    pub fn new(reviewer: Box<dyn AccessReviewer>, config: CacheConfig) -> Authorizer {
        Authorizer {
            reviewer,
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Asks the API server with the agent's own credentials (which need `create` on
    /// `subjectaccessreviews.authorization.k8s.io`).
    pub fn kube(client: kube::Client) -> Authorizer {
        Authorizer::new(
            Box::new(KubeAccessReviewer { client }),
            CacheConfig::default(),
        )
    }

    /// The (possibly cached) answer for `caller` and `attributes`.
    pub async fn check(
        &self,
        caller: &Caller,
        attributes: &Attributes,
    ) -> Result<Access, AuthzError> {
        let key = cache_key(caller, attributes);
        let now = Instant::now();
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((access, expires)) = cache.get(&key) {
                if *expires > now {
                    return Ok(access.clone());
                }
            }
        }
        let access = self.reviewer.review(caller, attributes).await?;
        let ttl = if access.allowed {
            self.config.allowed_ttl
        } else {
            self.config.denied_ttl
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.config.max_entries {
            cache.retain(|_, (_, expires)| *expires > now);
            // Still full of live answers: start over rather than scan for the oldest;
            // at worst a few reviews are asked again.
            if cache.len() >= self.config.max_entries {
                cache.clear();
            }
        }
        cache.insert(key, (access.clone(), now + ttl));
        Ok(access)
    }

    /// How many answers are cached.
    pub fn cached_entries(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A digest of everything the answer depends on. Every field is length-prefixed, so
/// two different callers can never produce the same byte string.
fn cache_key(caller: &Caller, attributes: &Attributes) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut field = |s: &str| {
        hash.update((s.len() as u64).to_be_bytes());
        hash.update(s.as_bytes());
    };
    field(&caller.username);
    field(&caller.uid);
    field(&caller.groups.len().to_string());
    for g in &caller.groups {
        field(g);
    }
    field(&caller.extra.len().to_string());
    for (k, values) in &caller.extra {
        field(k);
        field(&values.len().to_string());
        for v in values {
            field(v);
        }
    }
    field(attributes.resource);
    field(attributes.verb);
    field(&attributes.namespace);
    field(&attributes.name);
    hash.finalize().into()
}

/// SubjectAccessReview (`authorization.k8s.io/v1`) through the API server.
pub struct KubeAccessReviewer {
    client: kube::Client,
}

impl AccessReviewer for KubeAccessReviewer {
    fn review<'a>(
        &'a self,
        caller: &'a Caller,
        attributes: &'a Attributes,
    ) -> Pin<Box<dyn Future<Output = Result<Access, AuthzError>> + Send + 'a>> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        Box::pin(async move {
            let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
            let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(caller.username.clone()),
                    uid: non_empty(&caller.uid),
                    groups: Some(caller.groups.clone()),
                    extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(GROUP.to_owned()),
                        resource: Some(attributes.resource.to_owned()),
                        verb: Some(attributes.verb.to_owned()),
                        namespace: non_empty(&attributes.namespace),
                        name: non_empty(&attributes.name),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            let answer = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|err| AuthzError::Unavailable(err.to_string()))?;
            let status = answer.status.unwrap_or_default();
            Ok(Access {
                // `denied` can only say no; `allowed` is what grants.
                allowed: status.allowed && status.denied != Some(true),
                reason: status
                    .reason
                    .or(status.evaluation_error)
                    .unwrap_or_default(),
            })
        })
    }
}

/// Which objects a caller may see with a verb: all, or those of some namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Allowed at cluster scope.
    AllNamespaces,
    /// Allowed in these namespaces only (never empty).
    Namespaces(BTreeSet<String>),
}

impl Scope {
    /// Whether an object of `namespace` is in scope. An object without a namespace is
    /// only in the cluster-wide scope.
    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            Scope::AllNamespaces => true,
            Scope::Namespaces(set) => set.contains(namespace),
        }
    }
}

/// The scope of `verb` on `resource` for `caller`: every namespace if RBAC allows it
/// cluster-wide, else the namespaces among `candidates` (plus a service account's own
/// namespace, where a namespace-scoped reviewer's Role usually is) where it is allowed.
/// None at all is a 403.
pub async fn scope(
    state: &ApiState,
    caller: &Caller,
    resource: &'static str,
    verb: &'static str,
    candidates: impl IntoIterator<Item = String>,
) -> Result<Scope, ApiError> {
    let cluster = Attributes {
        resource,
        verb,
        namespace: String::new(),
        name: String::new(),
    };
    let access = state.authz.check(caller, &cluster).await?;
    if access.allowed {
        return Ok(Scope::AllNamespaces);
    }
    let mut namespaces: BTreeSet<String> =
        candidates.into_iter().filter(|n| !n.is_empty()).collect();
    if let Some(ns) = service_account_namespace(&caller.username) {
        namespaces.insert(ns.to_owned());
    }
    let checks = futures_util::stream::iter(namespaces.into_iter().map(|namespace| async move {
        let attributes = Attributes {
            resource,
            verb,
            namespace,
            name: String::new(),
        };
        let allowed = state
            .authz
            .check(caller, &attributes)
            .await
            .map(|a| a.allowed);
        (attributes.namespace, allowed)
    }))
    .buffer_unordered(PARALLEL_REVIEWS)
    .collect::<Vec<_>>()
    .await;
    let mut allowed = BTreeSet::new();
    for (namespace, answer) in checks {
        if answer? {
            allowed.insert(namespace);
        }
    }
    if allowed.is_empty() {
        return Err(ApiError::Forbidden(Box::new(Refusal {
            user: caller.username.clone(),
            resource,
            verb,
            namespace: String::new(),
            name: String::new(),
            reason: access.reason,
        })));
    }
    Ok(Scope::Namespaces(allowed))
}

/// The namespace of a service account user name (`system:serviceaccount:<ns>:<name>`).
pub fn service_account_namespace(user: &str) -> Option<&str> {
    user.strip_prefix("system:serviceaccount:")?
        .split_once(':')
        .map(|(ns, _)| ns)
}

/// Checks `verb` on one object of `resource`: 403 unless RBAC allows it.
pub async fn authorize(
    state: &ApiState,
    caller: &Caller,
    resource: &'static str,
    verb: &'static str,
    namespace: &str,
    name: &str,
) -> Result<(), ApiError> {
    let attributes = Attributes {
        resource,
        verb,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let access = state.authz.check(caller, &attributes).await?;
    if access.allowed {
        return Ok(());
    }
    Err(ApiError::Forbidden(Box::new(Refusal {
        user: caller.username.clone(),
        resource,
        verb,
        namespace: attributes.namespace,
        name: attributes.name,
        reason: access.reason,
    })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    struct Counting(Arc<AtomicUsize>);

    impl AccessReviewer for Counting {
        fn review<'a>(
            &'a self,
            caller: &'a Caller,
            attributes: &'a Attributes,
        ) -> Pin<Box<dyn Future<Output = Result<Access, AuthzError>> + Send + 'a>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(Access {
                    allowed: caller.username == "alice" && attributes.namespace == "team",
                    reason: String::new(),
                })
            })
        }
    }

    fn caller(name: &str, groups: &[&str]) -> Caller {
        Caller {
            username: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Caller::default()
        }
    }

    fn attrs(verb: &'static str, ns: &str) -> Attributes {
        Attributes {
            resource: APPROVALS,
            verb,
            namespace: ns.into(),
            name: String::new(),
        }
    }

    #[tokio::test]
    async fn answers_are_cached_per_caller_and_question() {
        let calls = Arc::new(AtomicUsize::new(0));
        let authz = Authorizer::new(Box::new(Counting(calls.clone())), CacheConfig::default());
        let alice = caller("alice", &["a"]);
        for _ in 0..3 {
            assert!(
                authz
                    .check(&alice, &attrs("list", "team"))
                    .await
                    .unwrap()
                    .allowed
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            !authz
                .check(&alice, &attrs("list", ""))
                .await
                .unwrap()
                .allowed
        );
        assert!(
            authz
                .check(&alice, &attrs("approve", "team"))
                .await
                .unwrap()
                .allowed
        );
        // Another group set is another caller.
        authz
            .check(&caller("alice", &["a", "b"]), &attrs("list", "team"))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn resources_are_separate_questions() {
        let calls = Arc::new(AtomicUsize::new(0));
        let authz = Authorizer::new(Box::new(Counting(calls.clone())), CacheConfig::default());
        let alice = caller("alice", &[]);
        let sessions = Attributes {
            resource: SESSIONS,
            ..attrs("get", "team")
        };
        authz.check(&alice, &attrs("get", "team")).await.unwrap();
        authz.check(&alice, &sessions).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one answer must not serve both"
        );
        assert_ne!(
            cache_key(&alice, &attrs("get", "team")),
            cache_key(&alice, &sessions)
        );
    }

    #[test]
    fn service_account_namespaces() {
        assert_eq!(
            service_account_namespace("system:serviceaccount:team:rev"),
            Some("team")
        );
        assert_eq!(service_account_namespace("alice"), None);
        assert_eq!(
            service_account_namespace("system:serviceaccount:team"),
            None
        );
    }

    #[test]
    fn cache_keys_cannot_be_forged_by_moving_separators() {
        let a = caller("ab", &["c"]);
        let b = caller("a", &["bc"]);
        assert_ne!(
            cache_key(&a, &attrs("get", "x")),
            cache_key(&b, &attrs("get", "x"))
        );
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let authz = Authorizer::new(
            Box::new(Counting(calls)),
            CacheConfig {
                max_entries: 10,
                ..CacheConfig::default()
            },
        );
        for i in 0..100 {
            authz
                .check(&caller(&format!("u{i}"), &[]), &attrs("get", "team"))
                .await
                .unwrap();
        }
        assert!(authz.cached_entries() <= 10);
    }
}
