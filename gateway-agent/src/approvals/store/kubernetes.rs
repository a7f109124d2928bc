//! The Kubernetes store: `ApprovalRequest` custom resources (`tollgate.dev/v1alpha1`,
//! CRD in `deploy/crds/`), so every node's agent and every reviewer share one queue.
//!
//! An approval lives in its requester pod's namespace under its id as name; `spec` is
//! the model's `ApprovalSpec` and `status` its `ApprovalStatus`, written through the
//! `/status` subresource. Labels make `kubectl get -l` useful and are kept in step:
//! `tollgate.dev/state`, `tollgate.dev/node`, `tollgate.dev/fingerprint`.
//!
//! Reads come from a reflector over every namespace (one watch, no polling). The
//! store's own writes go into the same cache at once, so an agent reads its own writes
//! without waiting for the watch; an object the cache has not seen yet is looked up
//! once by name. `update` never trusts the cache: it reads the object from the API
//! server and writes status with that version's `resourceVersion`, so the API server
//! refuses a write based on anything stale (409), and the change is re-applied to the
//! newer version. That is what lets exactly one agent or reviewer move an approval out
//! of `Pending`, and exactly one agent claim an approved call.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::{newest_first, StoreError, CHANGES_CAPACITY};
use crate::approvals::model::{
    ApprovalRequest, ApprovalSpec, ApprovalStatus, DecisionError, State,
};

/// The custom resource's API group.
pub const GROUP: &str = "tollgate.dev";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// Its kind.
pub const KIND: &str = "ApprovalRequest";
/// Its plural (the resource name RBAC and URLs use).
pub const PLURAL: &str = "approvalrequests";
/// The approval's state, kept equal to `status.state`.
pub const STATE_LABEL: &str = "tollgate.dev/state";
/// The node whose agent holds the call.
pub const NODE_LABEL: &str = "tollgate.dev/node";
/// The first 63 hex digits of `spec.request.fingerprint` (a label value's limit).
pub const FINGERPRINT_LABEL: &str = "tollgate.dev/fingerprint";

/// How many times `update` re-reads after a 409 before giving up.
const MAX_ATTEMPTS: usize = 10;

/// How long `start` waits for the first full listing.
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// `tollgate.dev/v1alpha1` `ApprovalRequest`, for dynamic clients.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// The Kubernetes store; cheap to clone. The watch runs until the last clone is
/// dropped.
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    resource: ApiResource,
    cache: Arc<Cache>,
    /// Stops the watch when the last clone of the store goes.
    _watch: AbortOnDrop,
}

/// The reflector's store and what feeds it; shared by the watch task and the store's
/// own writes.
struct Cache {
    resource: ApiResource,
    reader: reflector::Store<DynamicObject>,
    /// kube-runtime's writer, behind a lock so the watch and the store's own writes can
    /// both feed it (each check-then-apply is atomic under the lock).
    writer: Mutex<reflector::store::Writer<DynamicObject>>,
    changes: broadcast::Sender<ApprovalRequest>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KubeStore {
    /// Checks that the CRD is installed, starts the watch over every namespace and
    /// returns once the first listing is in the cache.
    pub async fn start(client: Client) -> Result<KubeStore, StoreError> {
        let resource = api_resource();
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        // One plain list first: a missing CRD is then a clear start-up error instead
        // of a watch retrying forever.
        if let Err(err) = all.list(&ListParams::default().limit(1)).await {
            return Err(match err {
                kube::Error::Api(status) if status.is_not_found() => {
                    StoreError::Kubernetes(format!(
                        "the {PLURAL}.{GROUP} CRD is not installed \
                         (apply deploy/crds/{PLURAL}.{GROUP}.yaml)"
                    ))
                }
                other => StoreError::Kubernetes(format!("listing {PLURAL}: {other}")),
            });
        }
        let writer = reflector::store::Writer::new(resource.clone());
        let reader = writer.as_reader();
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let cache = Arc::new(Cache {
            resource: resource.clone(),
            reader: reader.clone(),
            writer: Mutex::new(writer),
            changes,
        });
        let watch = tokio::spawn(watch(all, cache.clone()));
        let store = KubeStore {
            inner: Arc::new(Inner {
                client,
                resource,
                cache,
                _watch: AbortOnDrop(watch),
            }),
        };
        match tokio::time::timeout(FIRST_LIST_TIMEOUT, reader.wait_until_ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(StoreError::Kubernetes(format!("watch stopped: {err}"))),
            Err(_) => {
                return Err(StoreError::Kubernetes(format!(
                    "the first listing of {PLURAL} did not finish within {FIRST_LIST_TIMEOUT:?}"
                )))
            }
        }
        info!(
            approvals = reader.len(),
            "Kubernetes approval store watching {PLURAL}.{GROUP}"
        );
        Ok(store)
    }

    /// Creates the custom resource in the requester pod's namespace, then sets its
    /// status. [`StoreError::Exists`] when the name is taken.
    pub async fn create(&self, approval: ApprovalRequest) -> Result<ApprovalRequest, StoreError> {
        let namespace = approval.spec.requester.pod_namespace.clone();
        if namespace.is_empty() {
            return Err(StoreError::Kubernetes(format!(
                "approval {} has no spec.requester.podNamespace to live in",
                approval.id
            )));
        }
        let api = self.namespaced(&namespace);
        let mut object = DynamicObject::new(&approval.id, &self.inner.resource)
            .within(&namespace)
            .data(json!({ "spec": encode(&approval.id, &approval.spec)? }));
        object.metadata.labels = Some(labels(&approval));
        let mut current = match api.create(&PostParams::default(), &object).await {
            Ok(created) => created,
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                return Err(StoreError::Exists(approval.id))
            }
            Err(err) => return Err(api_error(&approval.id, "creating", err)),
        };
        debug!(id = %approval.id, %namespace, "ApprovalRequest created");
        // The API server ignores status on create; it is written through /status.
        for _ in 0..MAX_ATTEMPTS {
            if current.data.get("status").is_some_and(|s| !s.is_null()) {
                // A reviewer was faster than our status write: theirs stands.
                return self.inner.cache.remember(current);
            }
            set_status(&mut current, &approval.id, &approval.status)?;
            match api
                .replace_status(&approval.id, &PostParams::default(), &current)
                .await
            {
                Ok(written) => return self.inner.cache.remember(written),
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    current = api
                        .get(&approval.id)
                        .await
                        .map_err(|e| api_error(&approval.id, "reading", e))?;
                }
                Err(err) => return Err(api_error(&approval.id, "writing the status of", err)),
            }
        }
        Err(StoreError::Conflict(approval.id))
    }

    /// From the cache; an id the watch has not delivered yet is looked up by name
    /// across namespaces, so a just-created approval is found at once.
    pub async fn get(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        match self.locate(id).await? {
            Some(object) => to_approval(&object)
                .map(Some)
                .map_err(|e| StoreError::Kubernetes(format!("{}: {e}", describe(&object)))),
            None => Ok(None),
        }
    }

    /// Every approval in the cache, or those in `state`; newest first.
    pub async fn list(&self, state: Option<State>) -> Result<Vec<ApprovalRequest>, StoreError> {
        Ok(self.cached(|a| state.is_none_or(|s| a.status.state == s)))
    }

    /// Approvals whose `spec.request.fingerprint` is `fingerprint`; newest first.
    pub async fn find_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Vec<ApprovalRequest>, StoreError> {
        Ok(self.cached(|a| a.spec.request.fingerprint == fingerprint))
    }

    /// See [`super::Store::update`]: read fresh, change, write status with the read
    /// version's `resourceVersion`; on 409, again (up to 10 times).
    pub async fn update<F>(&self, id: &str, mut change: F) -> Result<ApprovalRequest, StoreError>
    where
        F: FnMut(&mut ApprovalRequest) -> Result<(), DecisionError> + Send,
    {
        let namespace = self
            .locate(id)
            .await?
            .and_then(|o| o.metadata.namespace)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let api = self.namespaced(&namespace);
        for attempt in 1..=MAX_ATTEMPTS {
            let mut object = match api.get(id).await {
                Ok(object) => object,
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    return Err(StoreError::NotFound(id.to_owned()))
                }
                Err(err) => return Err(api_error(id, "reading", err)),
            };
            let current = to_approval(&object)
                .map_err(|e| StoreError::Kubernetes(format!("{}: {e}", describe(&object))))?;
            let mut next = current.clone();
            change(&mut next)?;
            if next.status == current.status {
                return Ok(current);
            }
            set_status(&mut object, id, &next.status)?;
            match api
                .replace_status(id, &PostParams::default(), &object)
                .await
            {
                Ok(written) => {
                    let stored = self.inner.cache.remember(written)?;
                    if stored.status.state != current.status.state {
                        self.label_state(&api, &stored).await;
                    }
                    return Ok(stored);
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    debug!(%id, attempt, "approval changed while deciding; re-reading");
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    return Err(StoreError::NotFound(id.to_owned()))
                }
                Err(err) => return Err(api_error(id, "writing the status of", err)),
            }
        }
        Err(StoreError::Conflict(id.to_owned()))
    }

    /// Every approval as it is created or changed from now on: the watch's events
    /// (other agents, reviewers anywhere) and this store's own writes at once. The same
    /// change may arrive twice; consumers re-check the state.
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalRequest> {
        self.inner.cache.changes.subscribe()
    }

    /// Deletes the custom resource (a decided approval past retention). Gone already
    /// is fine.
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let Some(object) = self.locate(id).await? else {
            return Ok(());
        };
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        match self
            .namespaced(&namespace)
            .delete(id, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(err) => Err(api_error(id, "deleting", err)),
        }
    }

    fn namespaced(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.inner.client.clone(), namespace, &self.inner.resource)
    }

    /// The object named `id` in any namespace: from the cache, else one list by name.
    async fn locate(&self, id: &str) -> Result<Option<DynamicObject>, StoreError> {
        let cached = self
            .inner
            .cache
            .reader
            .find(|o| o.metadata.name.as_deref() == Some(id));
        if let Some(object) = cached {
            return Ok(Some((*object).clone()));
        }
        let all: Api<DynamicObject> =
            Api::all_with(self.inner.client.clone(), &self.inner.resource);
        let listed = all
            .list(&ListParams::default().fields(&format!("metadata.name={id}")))
            .await
            .map_err(|e| api_error(id, "looking up", e))?;
        let Some(object) = listed.items.into_iter().next() else {
            return Ok(None);
        };
        self.inner
            .cache
            .apply(&watcher::Event::Apply(object.clone()));
        Ok(Some(object))
    }

    /// Approvals in the cache that `keep` accepts, newest first. An object that does
    /// not parse was logged when it arrived and is left out here.
    fn cached(&self, keep: impl Fn(&ApprovalRequest) -> bool) -> Vec<ApprovalRequest> {
        let mut found: Vec<ApprovalRequest> = self
            .inner
            .cache
            .reader
            .state()
            .iter()
            .filter_map(|o| to_approval(o).ok())
            .filter(|a| keep(a))
            .collect();
        newest_first(&mut found);
        found
    }

    /// Brings the state label in step after a state change. The status is the truth;
    /// a failed label write only makes `kubectl get -l` stale, so it is logged.
    async fn label_state(&self, api: &Api<DynamicObject>, approval: &ApprovalRequest) {
        let patch = json!({ "metadata": { "labels": {
            STATE_LABEL: approval.status.state.as_str(),
        }}});
        match api
            .patch(&approval.id, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(object) => {
                let _ = self.inner.cache.remember(object);
            }
            Err(err) => warn!(id = %approval.id, %err, "could not update the state label"),
        }
    }
}

impl Cache {
    /// Applies one event to the reflector's store and tells subscribers about a changed
    /// approval. An event for a version older than the cached one is dropped (the
    /// store's own write got there first); one for the same version or a change that
    /// leaves the approval as it was (a label write) is applied but not broadcast.
    fn apply(&self, event: &watcher::Event<DynamicObject>) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let object = match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => object,
            watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitDone => {
                writer.apply_watcher_event(event);
                return;
            }
        };
        let cached = self
            .reader
            .get(&ObjectRef::from_obj_with(object, self.resource.clone()));
        if let Some(cached) = &cached {
            if !newer(object, cached) {
                // A relisting still has to see the object, or the swap would lose it.
                if matches!(event, watcher::Event::InitApply(_)) {
                    writer.apply_watcher_event(&watcher::Event::InitApply((**cached).clone()));
                }
                return;
            }
        }
        writer.apply_watcher_event(event);
        drop(writer);
        let approval = match to_approval(object) {
            Ok(approval) => approval,
            Err(err) => {
                warn!(object = %describe(object), %err, "skipping an ApprovalRequest that does not parse");
                return;
            }
        };
        let before = cached.and_then(|c| to_approval(&c).ok());
        if before.as_ref() != Some(&approval) {
            // No receivers is not an error: nobody is waiting right now.
            let _ = self.changes.send(approval);
        }
    }

    /// Puts an object this store just wrote into the cache and returns it parsed.
    fn remember(&self, object: DynamicObject) -> Result<ApprovalRequest, StoreError> {
        let approval = to_approval(&object)
            .map_err(|e| StoreError::Kubernetes(format!("{}: {e}", describe(&object))))?;
        self.apply(&watcher::Event::Apply(object));
        Ok(approval)
    }
}

/// Feeds the cache from a watch over every namespace until aborted.
async fn watch(api: Api<DynamicObject>, cache: Arc<Cache>) {
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => cache.apply(&event),
            // The watcher re-lists and re-watches by itself, with backoff.
            Err(err) => warn!(%err, "watching {PLURAL} failed; retrying"),
        }
    }
}

/// True when `object` is a later version than `cached`. Resource versions are opaque
/// to clients in general, but every API server backed by etcd hands out increasing
/// integers; if they ever do not parse, any different version counts as newer.
fn newer(object: &DynamicObject, cached: &DynamicObject) -> bool {
    let version = |o: &DynamicObject| o.metadata.resource_version.clone();
    match (version(object), version(cached)) {
        (Some(new), Some(old)) => match (new.parse::<u64>(), old.parse::<u64>()) {
            (Ok(new), Ok(old)) => new > old,
            _ => new != old,
        },
        _ => true,
    }
}

/// The approval a custom resource holds. A missing status is a just-created object
/// whose status write has not landed yet: `Pending`.
fn to_approval(object: &DynamicObject) -> Result<ApprovalRequest, String> {
    let id = object
        .metadata
        .name
        .clone()
        .ok_or("the object has no name")?;
    let spec = object.data.get("spec").ok_or("the object has no spec")?;
    let spec = ApprovalSpec::deserialize(spec).map_err(|e| format!("spec: {e}"))?;
    let status = match object.data.get("status") {
        None | Some(Value::Null) => ApprovalStatus::default(),
        Some(status) => ApprovalStatus::deserialize(status).map_err(|e| format!("status: {e}"))?,
    };
    Ok(ApprovalRequest { id, spec, status })
}

fn set_status(
    object: &mut DynamicObject,
    id: &str,
    status: &ApprovalStatus,
) -> Result<(), StoreError> {
    let status = encode(id, status)?;
    match object.data.as_object_mut() {
        Some(fields) => {
            fields.insert("status".into(), status);
            Ok(())
        }
        None => Err(StoreError::Kubernetes(format!(
            "{}: the object's body is not a JSON object",
            describe(object)
        ))),
    }
}

fn encode(id: &str, value: &impl serde::Serialize) -> Result<Value, StoreError> {
    serde_json::to_value(value)
        .map_err(|e| StoreError::Kubernetes(format!("encoding approval {id}: {e}")))
}

/// The labels of a new approval.
fn labels(approval: &ApprovalRequest) -> std::collections::BTreeMap<String, String> {
    [
        (STATE_LABEL, approval.status.state.as_str().to_owned()),
        (NODE_LABEL, label_value(&approval.spec.requester.node)),
        (
            FINGERPRINT_LABEL,
            label_value(&approval.spec.request.fingerprint),
        ),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `text` as a valid label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending
/// with a letter or digit. Node names (DNS names) and hex fingerprints pass unchanged
/// apart from the length.
fn label_value(text: &str) -> String {
    let kept: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(63)
        .collect();
    kept.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn describe(object: &DynamicObject) -> String {
    format!(
        "{PLURAL} {}/{}",
        object.metadata.namespace.as_deref().unwrap_or(""),
        object.metadata.name.as_deref().unwrap_or("")
    )
}

fn api_error(id: &str, doing: &str, err: kube::Error) -> StoreError {
    StoreError::Kubernetes(format!("{doing} ApprovalRequest {id}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::store::testing::approval;

    fn object(a: &ApprovalRequest, version: &str) -> DynamicObject {
        let mut o = DynamicObject::new(&a.id, &api_resource())
            .within(&a.spec.requester.pod_namespace)
            .data(json!({ "spec": a.spec, "status": a.status }));
        o.metadata.resource_version = Some(version.into());
        o
    }

    fn cache() -> Cache {
        let writer = reflector::store::Writer::new(api_resource());
        Cache {
            resource: api_resource(),
            reader: writer.as_reader(),
            writer: Mutex::new(writer),
            changes: broadcast::channel(16).0,
        }
    }

    #[test]
    fn round_trips_and_defaults_missing_status() {
        let a = approval(
            "ar-0000000000000001",
            "ab".repeat(32).as_str(),
            "2026-01-01T10:00:00Z",
        );
        assert_eq!(to_approval(&object(&a, "1")).unwrap(), a);
        let mut bare = object(&a, "1");
        bare.data.as_object_mut().unwrap().remove("status");
        assert_eq!(to_approval(&bare).unwrap().status.state, State::Pending);
        let broken = DynamicObject::new("x", &api_resource()).data(json!({"spec": {"rule": 1}}));
        assert!(to_approval(&broken).unwrap_err().starts_with("spec:"));
    }

    #[test]
    fn labels_fit_kubernetes_rules() {
        let a = approval(
            "ar-0000000000000001",
            &"ab".repeat(32),
            "2026-01-01T10:00:00Z",
        );
        let labels = labels(&a);
        assert_eq!(labels[STATE_LABEL], "Pending");
        assert_eq!(labels[NODE_LABEL], "node-1");
        assert_eq!(labels[FINGERPRINT_LABEL].len(), 63);
        assert_eq!(label_value("-a b/c."), "abc");
    }

    #[test]
    fn cache_drops_older_versions_and_broadcasts_only_changes() {
        let cache = cache();
        let mut changes = cache.changes.subscribe();
        let mut a = approval("ar-0000000000000001", "fp", "2026-01-01T10:00:00Z");
        cache.apply(&watcher::Event::Apply(object(&a, "10")));
        assert_eq!(changes.try_recv().unwrap(), a);

        // Our own write (version 12) lands before the watch delivers version 11.
        let pending = a.clone();
        a.finish(State::Denied, "no".into(), "now");
        cache.apply(&watcher::Event::Apply(object(&a, "12")));
        assert_eq!(changes.try_recv().unwrap().status.state, State::Denied);
        cache.apply(&watcher::Event::Apply(object(&pending, "11")));
        cache.apply(&watcher::Event::Apply(object(&a, "12")));
        assert!(
            changes.try_recv().is_err(),
            "stale or repeated versions are not news"
        );
        let cached = cache.reader.find(|_| true).unwrap();
        assert_eq!(to_approval(&cached).unwrap().status.state, State::Denied);

        // A label-only change is applied quietly.
        let mut relabelled = object(&a, "13");
        relabelled.metadata.labels = Some(labels(&a));
        cache.apply(&watcher::Event::Apply(relabelled));
        assert!(changes.try_recv().is_err());
        assert_eq!(
            cache
                .reader
                .find(|_| true)
                .unwrap()
                .metadata
                .resource_version
                .as_deref(),
            Some("13")
        );

        // A relisting keeps what it lists, also when the cached copy is newer.
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(object(&pending, "11")));
        cache.apply(&watcher::Event::InitDone);
        assert_eq!(cache.reader.len(), 1);
        let cached = cache.reader.find(|_| true).unwrap();
        assert_eq!(cached.metadata.resource_version.as_deref(), Some("13"));

        // Something that does not parse is skipped, not fatal.
        let broken = DynamicObject::new("ar-broken", &api_resource())
            .within("x")
            .data(json!({"spec": "nonsense"}));
        cache.apply(&watcher::Event::Apply(broken));
        assert!(changes.try_recv().is_err());
    }

    /// Without the CRD the API server answers 404 for the resource: `start` says what
    /// to install instead of watching forever. (A stand-in API server on loopback.)
    #[tokio::test]
    async fn start_without_the_crd_is_a_clear_error() {
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let paths = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let paths = paths.clone();
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    paths.lock().unwrap().push(request.uri().path().to_owned());
                    let body = json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404,
                        "message": "the server could not find the requested resource",
                    });
                    async move {
                        http::Response::builder()
                            .status(404)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(
                                body.to_string(),
                            )))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().expect("uri"));
        let client = Client::try_from(config).expect("client");
        let err = KubeStore::start(client).await.err().expect("refused");
        assert!(
            matches!(&err, StoreError::Kubernetes(m) if m.contains("CRD is not installed")),
            "{err}"
        );
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            ["/apis/tollgate.dev/v1alpha1/approvalrequests"]
        );
    }
}
