//! The trust bundles: one ConfigMap per namespace with enforced pods, key `ca.crt`,
//! holding the cluster CA and Tollgate's CAs ([`super::pod_bundle`]). The webhook
//! ([`super::webhook`]) points enforced pods' service-account volume at it, so kubelet
//! mounts it where the pod expects the cluster CA.
//!
//! [`TrustBundles::ensure`] writes one namespace's bundle on demand (the webhook calls
//! it before it admits a pod there); [`TrustBundles::run`] keeps every bundle current
//! from watches: enforced namespaces, the bundles themselves and the trust material.
//! [`keep_webhook_ca_bundle`] keeps the webhook configuration's `caBundle` equal to
//! Tollgate's CAs, which sign the webhook's serving certificate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{pod_bundle, TrustWatch, ENFORCE_LABEL};

/// The key of the bundle in the ConfigMap: the file name kubelet's projected volume
/// expects (`items: [{key: ca.crt, path: ca.crt}]`).
pub const BUNDLE_KEY: &str = "ca.crt";
/// Marks the ConfigMap as Tollgate's: it is never written over otherwise.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "tollgate";
/// Selects the bundles [`TrustBundles::run`] keeps current, in any namespace.
pub const BUNDLE_LABEL: &str = "tollgate.dev/trust-bundle";

/// Writes that lose a race with another writer are tried again this often.
const WRITE_ATTEMPTS: u32 = 5;
/// Retries of a failed namespace start here and double up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// Bundles written at once by [`TrustBundles::run`].
const PARALLEL_WRITES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The API server did not answer the read (network, RBAC, a terminating namespace).
    #[error("reading ConfigMap {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The API server refused or failed the write.
    #[error("writing ConfigMap {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// A ConfigMap of that name exists and is someone else's: Tollgate does not write
    /// over it. The operator renames it or picks another `--trust-bundle-configmap`.
    #[error(
        "ConfigMap {namespace}/{name} exists and is not Tollgate's (it has neither \
         {MANAGED_BY_LABEL}={MANAGED_BY} nor {BUNDLE_LABEL}=true); rename it or choose \
         another name with --trust-bundle-configmap"
    )]
    NotOurs { namespace: String, name: String },
    /// Every attempt lost a race with another writer.
    #[error(
        "ConfigMap {namespace}/{name} kept changing while it was written ({attempts} attempts)"
    )]
    Conflict {
        namespace: String,
        name: String,
        attempts: u32,
    },
    /// The webhook configuration's patch failed.
    #[error("patching the caBundle of MutatingWebhookConfiguration {name}: {source}")]
    WebhookPatch {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The per-namespace trust bundles: written on demand by the webhook, kept current by
/// [`TrustBundles::run`].
pub struct TrustBundles {
    client: Client,
    configmap_name: String,
    cluster_ca_pem: String,
    trust: TrustWatch,
}

/// What a namespace's bundle needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// It is missing and the namespace is enforced.
    Create,
    /// It exists and holds something else than the bundle of now.
    Update,
}

impl TrustBundles {
    pub fn new(
        client: Client,
        configmap_name: String,
        cluster_ca_pem: String,
        trust: TrustWatch,
    ) -> Arc<TrustBundles> {
        Arc::new(TrustBundles {
            client,
            configmap_name,
            cluster_ca_pem,
            trust,
        })
    }

    /// The ConfigMap's name (the same in every namespace).
    pub fn configmap_name(&self) -> &str {
        &self.configmap_name
    }

    /// The `ca.crt` a bundle holds now.
    pub fn current_bundle(&self) -> String {
        // Copied out at once: the watch's read guard must not be held across an await.
        let material = self.trust.borrow().clone();
        pod_bundle(&self.cluster_ca_pem, &material)
    }

    /// Makes the bundle exist in `namespace` with the current content. Reads first (in
    /// the steady state the bundle is there and current: one GET), creates it when it
    /// is missing, replaces it under its resourceVersion when it differs, and starts
    /// over when another writer got there first.
    pub async fn ensure(&self, namespace: &str) -> Result<(), BundleError> {
        self.sync(namespace, Need::Create).await
    }

    /// [`Self::ensure`], or with [`Need::Update`] only an update of a bundle that
    /// exists (a namespace no longer enforced keeps what it has, but no new one).
    async fn sync(&self, namespace: &str, need: Need) -> Result<(), BundleError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let name = self.configmap_name.as_str();
        let read = |source| BundleError::Read {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        };
        let write = |source| BundleError::Write {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        };
        for _ in 0..WRITE_ATTEMPTS {
            let bundle = self.current_bundle();
            let written = match api.get_opt(name).await.map_err(read)? {
                None if need == Need::Update => return Ok(()),
                None => {
                    let configmap = new_bundle(namespace, name, &bundle);
                    api.create(&PostParams::default(), &configmap).await
                }
                Some(existing) => {
                    if !is_managed(&existing) {
                        return Err(BundleError::NotOurs {
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                        });
                    }
                    if is_current(&existing, &bundle) {
                        return Ok(());
                    }
                    // The object read carries its resourceVersion: the replace is
                    // refused (409) if anyone wrote in between.
                    let configmap = updated_bundle(existing, &bundle);
                    api.replace(name, &PostParams::default(), &configmap).await
                }
            };
            match written {
                Ok(configmap) => {
                    info!(
                        namespace,
                        name,
                        resource_version = configmap.resource_version().unwrap_or_default(),
                        "trust bundle written"
                    );
                    return Ok(());
                }
                // Created meanwhile (AlreadyExists) or changed meanwhile (Conflict).
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    debug!(namespace, name, reason = %status.reason, "trust bundle raced; reading again");
                    continue;
                }
                Err(err) => return Err(write(err)),
            }
        }
        Err(BundleError::Conflict {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Keeps every bundle current, forever (watches, no polling):
    /// - every namespace labelled `tollgate.dev/enforce=true` gets one;
    /// - every bundle (by [`BUNDLE_LABEL`], in any namespace) is rewritten when the
    ///   trust material changes, or when someone edits it;
    /// - a bundle deleted in an enforced namespace is recreated.
    ///
    /// A namespace that loses the label keeps its bundle, and the bundle is still kept
    /// current: pods created while the namespace was enforced still mount it (kubelet
    /// keeps refreshing the volume from it), and it holds public certificates only.
    /// Only a bundle deleted there is not recreated. Failures are logged and retried
    /// per namespace with a doubling delay.
    pub async fn run(self: Arc<Self>) {
        let mut trust = self.trust.clone();
        let namespaces = watcher(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default().labels(&format!("{ENFORCE_LABEL}=true")),
        )
        .default_backoff()
        .map(|event| event.map(|event| Update::Namespace(Box::new(event))));
        let bundles = watcher(
            Api::<ConfigMap>::all(self.client.clone()),
            watcher::Config::default()
                .labels(&format!("{BUNDLE_LABEL}=true"))
                .fields(&format!("metadata.name={}", self.configmap_name)),
        )
        .default_backoff()
        .map(|event| event.map(|event| Update::Bundle(Box::new(event))));
        let mut updates = futures_util::stream::select(namespaces.boxed(), bundles.boxed());
        let mut view = View::default();
        let mut retries = Retries::default();
        // Until both first lists are in, the view cannot tell a missing bundle from
        // one not listed yet: what they touch waits here.
        let mut waiting: HashSet<String> = HashSet::new();
        let mut trust_open = true;
        info!(configmap = %self.configmap_name, "keeping trust bundles");
        loop {
            let retry_at = retries.next_due();
            let touched: Vec<String> = tokio::select! {
                update = updates.next() => match update {
                    Some(Ok(update)) => view.apply(update),
                    Some(Err(err)) => {
                        // The watcher backs off and starts over by itself.
                        warn!(%err, "watching enforced namespaces or trust bundles failed; retrying");
                        continue;
                    }
                    None => {
                        // Watchers never end; if they did, nothing would be kept current.
                        warn!("the trust bundle watches ended; bundles are no longer kept current");
                        return;
                    }
                },
                changed = trust.changed(), if trust_open => match changed {
                    Ok(()) => {
                        info!("trust material changed; rewriting the trust bundles");
                        view.namespaces()
                    }
                    Err(_) => {
                        // The sender is gone: the material stays what it is.
                        trust_open = false;
                        continue;
                    }
                },
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(far_future)), if retry_at.is_some() => {
                    retries.take_due(Instant::now())
                }
            };
            if !view.listed() {
                waiting.extend(touched);
                continue;
            }
            let mut touched: HashSet<String> = touched.into_iter().collect();
            touched.extend(waiting.drain());
            let bundle = self.current_bundle();
            let mut work = Vec::new();
            for namespace in touched {
                match view.need(&namespace, &bundle) {
                    Some(need) => work.push((namespace, need)),
                    None => retries.clear(&namespace),
                }
            }
            // A new CA touches every bundle: a few writes at a time, not one by one.
            let this = &*self;
            let results: Vec<(String, Result<(), BundleError>)> = futures_util::stream::iter(work)
                .map(|(namespace, need)| async move {
                    let result = this.sync(&namespace, need).await;
                    (namespace, result)
                })
                .buffer_unordered(PARALLEL_WRITES)
                .collect()
                .await;
            for (namespace, result) in results {
                match result {
                    Ok(()) => retries.clear(&namespace),
                    Err(err) => {
                        let delay = retries.failed(&namespace, Instant::now());
                        warn!(%namespace, %err, retry_in = ?delay, "keeping the trust bundle failed");
                    }
                }
            }
        }
    }
}

/// An instant an hour away: a disabled timer's deadline.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn bundle_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (BUNDLE_LABEL.to_owned(), "true".to_owned()),
    ])
}

fn bundle_data(bundle: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(BUNDLE_KEY.to_owned(), bundle.to_owned())])
}

/// A new bundle ConfigMap.
fn new_bundle(namespace: &str, name: &str, bundle: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(bundle_labels()),
            ..ObjectMeta::default()
        },
        data: Some(bundle_data(bundle)),
        ..ConfigMap::default()
    }
}

/// Whether Tollgate wrote this ConfigMap (either of its labels says so).
fn is_managed(configmap: &ConfigMap) -> bool {
    let labels = configmap.labels();
    labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
        || labels.get(BUNDLE_LABEL).map(String::as_str) == Some("true")
}

/// What a bundle ConfigMap holds, if it is exactly what Tollgate writes (the one key,
/// nothing binary); `None` for anything else.
fn bundle_content(configmap: &ConfigMap) -> Option<&str> {
    if configmap
        .binary_data
        .as_ref()
        .is_some_and(|b| !b.is_empty())
    {
        return None;
    }
    let data = configmap.data.as_ref()?;
    if data.len() != 1 {
        return None;
    }
    data.get(BUNDLE_KEY).map(String::as_str)
}

/// Whether the ConfigMap holds `bundle`, with both of Tollgate's labels.
fn is_current(configmap: &ConfigMap, bundle: &str) -> bool {
    let labels = configmap.labels();
    bundle_content(configmap) == Some(bundle)
        && bundle_labels()
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

/// `existing` holding `bundle` with Tollgate's labels; other labels, annotations and
/// the resourceVersion stay.
fn updated_bundle(mut existing: ConfigMap, bundle: &str) -> ConfigMap {
    existing
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(bundle_labels());
    existing.data = Some(bundle_data(bundle));
    existing.binary_data = None;
    existing
}

/// A watch event for [`TrustBundles::run`].
enum Update {
    Namespace(Box<watcher::Event<Namespace>>),
    Bundle(Box<watcher::Event<ConfigMap>>),
}

/// What [`TrustBundles::run`] knows from its watches.
#[derive(Debug, Default)]
struct View {
    /// Namespaces labelled `tollgate.dev/enforce=true`.
    enforced: HashSet<String>,
    /// The same during a (re)list, until it is complete.
    enforced_listing: Option<HashSet<String>>,
    namespaces_listed: bool,
    /// Each bundle by namespace: its content if it has Tollgate's shape.
    bundles: HashMap<String, Option<String>>,
    bundles_listing: Option<HashMap<String, Option<String>>>,
    bundles_listed: bool,
}

impl View {
    /// Applies one event; returns the namespaces whose bundle may need work.
    fn apply(&mut self, update: Update) -> Vec<String> {
        match update {
            Update::Namespace(event) => match *event {
                watcher::Event::Apply(ns) => {
                    let name = ns.name_any();
                    self.enforced.insert(name.clone());
                    vec![name]
                }
                // Deleted, or no longer labelled (a selector watch reports both as a
                // deletion): its bundle stays (see `run`).
                watcher::Event::Delete(ns) => {
                    let name = ns.name_any();
                    self.enforced.remove(&name);
                    vec![name]
                }
                watcher::Event::Init => {
                    self.enforced_listing = Some(HashSet::new());
                    Vec::new()
                }
                watcher::Event::InitApply(ns) => {
                    self.enforced_listing
                        .get_or_insert_with(HashSet::new)
                        .insert(ns.name_any());
                    Vec::new()
                }
                watcher::Event::InitDone => {
                    let listed = self.enforced_listing.take().unwrap_or_default();
                    let old = std::mem::replace(&mut self.enforced, listed);
                    self.namespaces_listed = true;
                    old.union(&self.enforced).cloned().collect()
                }
            },
            Update::Bundle(event) => match *event {
                watcher::Event::Apply(cm) => {
                    let namespace = cm.namespace().unwrap_or_default();
                    let content = bundle_content(&cm).map(str::to_owned);
                    self.bundles.insert(namespace.clone(), content);
                    vec![namespace]
                }
                watcher::Event::Delete(cm) => {
                    let namespace = cm.namespace().unwrap_or_default();
                    self.bundles.remove(&namespace);
                    vec![namespace]
                }
                watcher::Event::Init => {
                    self.bundles_listing = Some(HashMap::new());
                    Vec::new()
                }
                watcher::Event::InitApply(cm) => {
                    let namespace = cm.namespace().unwrap_or_default();
                    let content = bundle_content(&cm).map(str::to_owned);
                    self.bundles_listing
                        .get_or_insert_with(HashMap::new)
                        .insert(namespace, content);
                    Vec::new()
                }
                watcher::Event::InitDone => {
                    let listed = self.bundles_listing.take().unwrap_or_default();
                    let old = std::mem::replace(&mut self.bundles, listed);
                    self.bundles_listed = true;
                    old.into_keys()
                        .chain(self.bundles.keys().cloned())
                        .collect::<HashSet<_>>()
                        .into_iter()
                        .collect()
                }
            },
        }
    }

    /// Whether both first lists are in.
    fn listed(&self) -> bool {
        self.namespaces_listed && self.bundles_listed
    }

    /// Every namespace that is enforced or holds a bundle.
    fn namespaces(&self) -> Vec<String> {
        self.enforced
            .iter()
            .chain(self.bundles.keys())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect()
    }

    /// What `namespace`'s bundle needs for it to hold `bundle`.
    fn need(&self, namespace: &str, bundle: &str) -> Option<Need> {
        match self.bundles.get(namespace) {
            Some(Some(content)) if content == bundle => None,
            Some(_) => Some(Need::Update),
            None if self.enforced.contains(namespace) => Some(Need::Create),
            None => None,
        }
    }
}

/// Namespaces whose bundle failed, with when to try again.
#[derive(Debug, Default)]
struct Retries {
    /// namespace → (next attempt, the delay that led to it).
    due: HashMap<String, (Instant, Duration)>,
}

impl Retries {
    fn next_due(&self) -> Option<Instant> {
        self.due.values().map(|(at, _)| *at).min()
    }

    /// Removes and returns the namespaces due at `now`; their delay is remembered by
    /// [`Self::failed`] only if they fail again.
    fn take_due(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .due
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(namespace, _)| namespace.clone())
            .collect();
        // Kept (with its delay) until it succeeds or is not needed: a failure doubles it.
        for namespace in &due {
            if let Some((at, _)) = self.due.get_mut(namespace) {
                *at = far_future();
            }
        }
        due
    }

    /// Records a failure; returns the delay before the next attempt.
    fn failed(&mut self, namespace: &str, now: Instant) -> Duration {
        let delay = match self.due.get(namespace) {
            Some((_, last)) => (*last * 2).min(MAX_RETRY),
            None => FIRST_RETRY,
        };
        self.due.insert(namespace.to_owned(), (now + delay, delay));
        delay
    }

    fn clear(&mut self, namespace: &str) {
        self.due.remove(namespace);
    }
}

/// Keeps `webhooks[*].clientConfig.caBundle` of the MutatingWebhookConfiguration
/// `configuration_name` equal to Tollgate's CAs (`tollgate_bundle_pem`: they sign the
/// webhook's serving certificate), forever. Watches the configuration by name (it may
/// not exist yet: then this waits for it) and the trust material; patches only the
/// webhooks whose `caBundle` differs, each guarded by a `test` of its name, and
/// touches no other field. Failures are retried with a doubling delay.
pub async fn keep_webhook_ca_bundle(client: Client, configuration_name: String, trust: TrustWatch) {
    let mut trust = trust;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut events = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={configuration_name}")),
    )
    .default_backoff()
    .boxed();
    let name = configuration_name.as_str();
    let mut current: Option<MutatingWebhookConfiguration> = None;
    let mut listed_it = false;
    let mut trust_open = true;
    let mut retry: Option<(Instant, Duration)> = None;
    info!(configuration = name, "keeping the webhook's caBundle");
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(config) | watcher::Event::InitApply(config))) => {
                    listed_it = true;
                    current = Some(config);
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    info!(configuration = name, "MutatingWebhookConfiguration deleted; waiting for it");
                    current = None;
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => {
                    listed_it = false;
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    if !listed_it {
                        info!(configuration = name, "MutatingWebhookConfiguration not found; waiting for it");
                        current = None;
                    }
                    continue;
                }
                Some(Err(err)) => {
                    warn!(configuration = name, %err, "watching the MutatingWebhookConfiguration failed; retrying");
                    continue;
                }
                None => {
                    warn!(configuration = name, "the MutatingWebhookConfiguration watch ended; its caBundle is no longer kept");
                    return;
                }
            },
            changed = trust.changed(), if trust_open => {
                if changed.is_err() {
                    trust_open = false;
                    continue;
                }
            }
            _ = tokio::time::sleep_until(retry.map(|(at, _)| at).unwrap_or_else(far_future)), if retry.is_some() => {
                // Disarmed until the attempt below fails again; the delay is kept so
                // that failure doubles it.
                retry = retry.map(|(_, delay)| (far_future(), delay));
            }
        }
        let Some(config) = &current else { continue };
        let bundle = trust.borrow().tollgate_bundle_pem.clone();
        if bundle.trim().is_empty() {
            // An empty caBundle would mean "the API server's own roots": never write it.
            warn!(
                configuration = name,
                "no Tollgate CA to write into the caBundle yet"
            );
            continue;
        }
        let Some(patch) = ca_bundle_patch(config, bundle.as_bytes()) else {
            retry = None;
            continue;
        };
        match api
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(patched) => {
                info!(
                    configuration = name,
                    webhooks = patched.webhooks.as_ref().map_or(0, Vec::len),
                    "webhook caBundle updated"
                );
                current = Some(patched);
                retry = None;
            }
            Err(source) => {
                let delay = match retry {
                    Some((_, last)) => (last * 2).min(MAX_RETRY),
                    None => FIRST_RETRY,
                };
                retry = Some((Instant::now() + delay, delay));
                let err = BundleError::WebhookPatch {
                    name: name.to_owned(),
                    source,
                };
                warn!(%err, retry_in = ?delay, "keeping the webhook's caBundle failed");
            }
        }
    }
}

/// The JSON patch that sets `caBundle` to `bundle_pem` in every webhook of `config`
/// where it differs; `None` when none does. Each change is guarded by a `test` of the
/// webhook's name at that index, so a concurrent reordering fails the patch instead of
/// writing into the wrong entry.
fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    bundle_pem: &[u8],
) -> Option<json_patch::Patch> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle_pem);
    let mut ops = Vec::new();
    for (index, webhook) in config.webhooks.iter().flatten().enumerate() {
        let current = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice());
        if current == Some(bundle_pem) {
            continue;
        }
        let at = |tail: &[&str]| {
            let mut tokens = vec!["webhooks".to_owned(), index.to_string()];
            tokens.extend(tail.iter().map(|t| (*t).to_owned()));
            PointerBuf::from_tokens(tokens)
        };
        ops.push(PatchOperation::Test(TestOperation {
            path: at(&["name"]),
            value: serde_json::Value::String(webhook.name.clone()),
        }));
        // `add` sets a member whether or not it is there.
        ops.push(PatchOperation::Add(AddOperation {
            path: at(&["clientConfig", "caBundle"]),
            value: serde_json::Value::String(encoded.clone()),
        }));
    }
    (!ops.is_empty()).then_some(json_patch::Patch(ops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
    use k8s_openapi::ByteString;

    fn configmap(namespace: &str, data: &[(&str, &str)], labels: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("tollgate-ca-bundle".into()),
                namespace: Some(namespace.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                resource_version: Some("42".into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ConfigMap::default()
        }
    }

    fn namespace(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    const OURS: [(&str, &str); 2] = [(MANAGED_BY_LABEL, MANAGED_BY), (BUNDLE_LABEL, "true")];

    #[test]
    fn a_new_bundle_is_labelled_and_current() {
        let cm = new_bundle("agents", "tollgate-ca-bundle", "PEM");
        assert!(is_managed(&cm));
        assert!(is_current(&cm, "PEM"));
        assert!(!is_current(&cm, "OTHER"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("agents"));
    }

    #[test]
    fn someone_elses_configmap_is_not_ours() {
        let theirs = configmap("agents", &[("ca.crt", "PEM")], &[("app", "x")]);
        assert!(!is_managed(&theirs));
        // Either label is enough: an edit that removed one is repaired.
        let half = configmap("agents", &[("ca.crt", "PEM")], &[(BUNDLE_LABEL, "true")]);
        assert!(is_managed(&half));
        assert!(!is_current(&half, "PEM"));
    }

    #[test]
    fn an_update_keeps_metadata_and_resets_data() {
        let existing = configmap(
            "agents",
            &[("ca.crt", "OLD"), ("extra", "x")],
            &[(BUNDLE_LABEL, "true"), ("team", "a")],
        );
        assert_eq!(bundle_content(&existing), None);
        let updated = updated_bundle(existing, "NEW");
        assert!(is_current(&updated, "NEW"));
        assert_eq!(updated.resource_version().as_deref(), Some("42"));
        assert_eq!(updated.labels().get("team").map(String::as_str), Some("a"));
        assert_eq!(updated.data.as_ref().map(BTreeMap::len), Some(1));
    }

    #[test]
    fn the_view_waits_for_both_lists_and_says_what_each_namespace_needs() {
        let mut view = View::default();
        view.apply(Update::Namespace(Box::new(watcher::Event::Init)));
        view.apply(Update::Namespace(Box::new(watcher::Event::InitApply(
            namespace("a"),
        ))));
        view.apply(Update::Namespace(Box::new(watcher::Event::InitApply(
            namespace("b"),
        ))));
        let touched = view.apply(Update::Namespace(Box::new(watcher::Event::InitDone)));
        assert_eq!(touched.len(), 2);
        assert!(!view.listed());
        view.apply(Update::Bundle(Box::new(watcher::Event::Init)));
        view.apply(Update::Bundle(Box::new(watcher::Event::InitApply(
            configmap("a", &[("ca.crt", "PEM")], &OURS),
        ))));
        // A namespace no longer enforced whose bundle is old.
        view.apply(Update::Bundle(Box::new(watcher::Event::InitApply(
            configmap("gone", &[("ca.crt", "OLD")], &OURS),
        ))));
        view.apply(Update::Bundle(Box::new(watcher::Event::InitDone)));
        assert!(view.listed());
        assert_eq!(view.need("a", "PEM"), None);
        assert_eq!(view.need("b", "PEM"), Some(Need::Create));
        assert_eq!(view.need("gone", "PEM"), Some(Need::Update));
        assert_eq!(view.need("elsewhere", "PEM"), None);
        // A new CA: every bundle is rewritten.
        assert_eq!(view.need("a", "PEM2"), Some(Need::Update));
        let mut all = view.namespaces();
        all.sort();
        assert_eq!(all, ["a", "b", "gone"]);

        // Deleted in an enforced namespace: recreated. The label removed: kept as is.
        let touched = view.apply(Update::Bundle(Box::new(watcher::Event::Delete(configmap(
            "a",
            &[("ca.crt", "PEM")],
            &OURS,
        )))));
        assert_eq!(touched, ["a"]);
        assert_eq!(view.need("a", "PEM"), Some(Need::Create));
        view.apply(Update::Namespace(Box::new(watcher::Event::Delete(
            namespace("a"),
        ))));
        assert_eq!(view.need("a", "PEM"), None);
        // An edit is seen and undone.
        view.apply(Update::Bundle(Box::new(watcher::Event::Apply(configmap(
            "b",
            &[("ca.crt", "EDITED")],
            &OURS,
        )))));
        assert_eq!(view.need("b", "PEM"), Some(Need::Update));
    }

    #[test]
    fn a_relist_reports_what_vanished_meanwhile() {
        let mut view = View::default();
        view.apply(Update::Bundle(Box::new(watcher::Event::Init)));
        view.apply(Update::Bundle(Box::new(watcher::Event::InitApply(
            configmap("a", &[("ca.crt", "PEM")], &OURS),
        ))));
        view.apply(Update::Bundle(Box::new(watcher::Event::InitDone)));
        view.apply(Update::Bundle(Box::new(watcher::Event::Init)));
        let touched = view.apply(Update::Bundle(Box::new(watcher::Event::InitDone)));
        assert_eq!(touched, ["a"]);
        assert!(!view.bundles.contains_key("a"));
    }

    #[test]
    fn retries_double_up_to_the_cap_and_clear() {
        let now = Instant::now();
        let mut retries = Retries::default();
        assert_eq!(retries.next_due(), None);
        assert_eq!(retries.failed("a", now), FIRST_RETRY);
        assert_eq!(retries.failed("a", now), FIRST_RETRY * 2);
        assert_eq!(retries.take_due(now), Vec::<String>::new());
        assert_eq!(retries.take_due(now + Duration::from_secs(2)), ["a"]);
        // Taken, but the delay is kept for the next failure.
        assert_eq!(retries.failed("a", now), FIRST_RETRY * 4);
        for _ in 0..20 {
            retries.failed("a", now);
        }
        assert_eq!(retries.failed("a", now), MAX_RETRY);
        retries.clear("a");
        assert_eq!(retries.next_due(), None);
    }

    fn webhook(name: &str, ca: Option<&[u8]>) -> MutatingWebhook {
        MutatingWebhook {
            name: name.into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "NoneOnDryRun".into(),
            failure_policy: Some("Fail".into()),
            client_config: WebhookClientConfig {
                ca_bundle: ca.map(|c| ByteString(c.to_vec())),
                ..WebhookClientConfig::default()
            },
            ..MutatingWebhook::default()
        }
    }

    #[test]
    fn the_ca_bundle_patch_sets_only_the_ca_bundles_that_differ() {
        let config = MutatingWebhookConfiguration {
            metadata: ObjectMeta {
                name: Some("tollgate".into()),
                ..ObjectMeta::default()
            },
            webhooks: Some(vec![
                webhook("pods.tollgate.dev", None),
                webhook("namespaces.tollgate.dev", Some(b"NEW")),
                webhook("other.tollgate.dev", Some(b"OLD")),
            ]),
        };
        let patch = ca_bundle_patch(&config, b"NEW").expect("two webhooks differ");
        assert_eq!(patch.0.len(), 4);
        let before = serde_json::to_value(&config).unwrap();
        let mut after = before.clone();
        json_patch::patch(&mut after, &patch).unwrap();
        let patched: MutatingWebhookConfiguration = serde_json::from_value(after).unwrap();
        let mut expected = config.clone();
        for webhook in expected.webhooks.iter_mut().flatten() {
            webhook.client_config.ca_bundle = Some(ByteString(b"NEW".to_vec()));
        }
        assert_eq!(patched, expected);
        // Applied, nothing is left to do.
        assert!(ca_bundle_patch(&patched, b"NEW").is_none());
        // A reordered list fails the patch's tests instead of writing the wrong entry.
        let mut reordered = before;
        if let Some(list) = reordered["webhooks"].as_array_mut() {
            list.reverse();
        }
        assert!(json_patch::patch(&mut reordered, &patch).is_err());
    }
}
