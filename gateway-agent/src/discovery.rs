//! What runs on this node, kept current by watching the API server.
//!
//! One task owns the view: the Pods bound to this node, the labels of their
//! namespaces, and the `kubernetes` Service with its EndpointSlices. From that view it
//! keeps the kernel maps right (each pod's cgroup enforced or exempt, the API-server
//! targets) and publishes a [`Directory`] the proxy asks "which pod is cgroup N?".
//!
//! A pod is enforced when it, or its namespace, carries `tollgate.dev/enforce=true`.
//! A pod cannot opt out of its namespace's enforcement with its own label.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// The label (on a pod or its namespace) that asks for enforcement.
pub const ENFORCE_LABEL: &str = "tollgate.dev/enforce";

/// How a pod's connections to the API server are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    Enforced,
    Exempt,
}

/// What the proxy needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ip: String,
    pub enforcement: Enforcement,
    pub cgroup_id: u64,
}

/// The kernel side that discovery keeps in step (the datapath's maps).
pub trait KernelMaps: Send + 'static {
    fn set_pod(&mut self, cgroup_id: u64, enforcement: Enforcement) -> Result<(), String>;
    fn remove_pod(&mut self, cgroup_id: u64) -> Result<(), String>;
    fn set_targets(&mut self, targets: &[SocketAddr]) -> Result<(), String>;
    /// Marks kubelet's `kubepods` parent cgroups, which appear lazily (with the first
    /// pod), so pods not yet classified are recognised as pods.
    fn sync_pod_parents(&mut self) -> Result<usize, String>;
}

/// The read side for the proxy: pods by cgroup id, and a way to wait for one.
#[derive(Clone)]
pub struct Directory {
    pods: Arc<RwLock<HashMap<u64, PodView>>>,
    changed: watch::Receiver<u64>,
    synced: watch::Receiver<bool>,
}

impl Directory {
    pub fn get(&self, cgroup_id: u64) -> Option<PodView> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cgroup_id)
            .cloned()
    }

    /// Waits up to `timeout` for discovery to learn about `cgroup_id` (a connection can
    /// arrive before the pod's watch event does).
    pub async fn wait_for(&self, cgroup_id: u64, timeout: Duration) -> Option<PodView> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pod) = self.get(cgroup_id) {
                return Some(pod);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.get(cgroup_id),
            }
        }
    }

    /// True once every watch has listed what exists.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Returns once every watch has listed what exists.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        // An error means discovery stopped; there is nothing left to wait for.
        let _ = synced.wait_for(|synced| *synced).await;
    }

    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub node_name: String,
    /// The cgroup-v2 directory kubelet's `kubepods` hierarchy lives in.
    pub cgroup_root: PathBuf,
    /// Where the `kubernetes` Service lives.
    pub api_service_namespace: String,
    pub api_service_name: String,
    /// How often pods whose cgroup does not exist yet are looked for again.
    pub cgroup_retry: Duration,
}

/// Starts discovery; returns the directory and the task that owns the view.
pub fn start<K: KernelMaps>(
    client: Client,
    config: DiscoveryConfig,
    kernel: K,
    metrics: Metrics,
) -> (Directory, tokio::task::JoinHandle<()>) {
    let pods = Arc::new(RwLock::new(HashMap::new()));
    let (changed_tx, changed) = watch::channel(0u64);
    let (synced_tx, synced) = watch::channel(false);
    let directory = Directory {
        pods: pods.clone(),
        changed,
        synced,
    };
    let owner = Owner {
        config,
        kernel,
        metrics,
        published: pods,
        changed: changed_tx,
        synced: synced_tx,
        pods: HashMap::new(),
        pods_listing: None,
        namespaces: HashMap::new(),
        namespaces_listing: None,
        service: None,
        slices: HashMap::new(),
        slices_listing: None,
        resolved: HashMap::new(),
        targets: Vec::new(),
        lists_done: HashSet::new(),
    };
    let task = tokio::spawn(owner.run(client));
    (directory, task)
}

/// The single owner of discovery's state.
struct Owner<K> {
    config: DiscoveryConfig,
    kernel: K,
    /// `pods_known` and `api_targets` are kept here, where they change.
    metrics: Metrics,
    published: Arc<RwLock<HashMap<u64, PodView>>>,
    changed: watch::Sender<u64>,
    synced: watch::Sender<bool>,
    /// Pods on this node by UID.
    pods: HashMap<String, Pod>,
    pods_listing: Option<HashMap<String, Pod>>,
    /// Namespaces by name (for their labels).
    namespaces: HashMap<String, Namespace>,
    namespaces_listing: Option<HashMap<String, Namespace>>,
    service: Option<Service>,
    slices: HashMap<String, EndpointSlice>,
    slices_listing: Option<HashMap<String, EndpointSlice>>,
    /// Pod UID → (cgroup id, enforcement) as written to the kernel.
    resolved: HashMap<String, (u64, Enforcement)>,
    targets: Vec<SocketAddr>,
    lists_done: HashSet<&'static str>,
}

enum Update {
    // Boxed: the objects differ a lot in size, and events are moved around.
    Pod(Box<watcher::Event<Pod>>),
    Namespace(Box<watcher::Event<Namespace>>),
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Retry,
}

impl<K: KernelMaps> Owner<K> {
    async fn run(mut self, client: Client) {
        let node_field = format!("spec.nodeName={}", self.config.node_name);
        let ns = &self.config.api_service_namespace;
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&node_field),
        )
        .map(|e| e.map(|event| Update::Pod(Box::new(event))));
        let namespaces = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .map(|e| e.map(|event| Update::Namespace(Box::new(event))));
        let services = watcher(
            Api::<Service>::namespaced(client.clone(), ns),
            watcher::Config::default()
                .fields(&format!("metadata.name={}", self.config.api_service_name)),
        )
        .map(|e| e.map(|event| Update::Service(Box::new(event))));
        let slices = watcher(
            Api::<EndpointSlice>::namespaced(client.clone(), ns),
            watcher::Config::default().labels(&format!(
                "kubernetes.io/service-name={}",
                self.config.api_service_name
            )),
        )
        .map(|e| e.map(|event| Update::Slice(Box::new(event))));
        let retry = tokio_stream_interval(self.config.cgroup_retry).map(|_| Ok(Update::Retry));
        let mut updates = futures_util::stream::select_all(vec![
            pods.boxed(),
            namespaces.boxed(),
            services.boxed(),
            slices.boxed(),
            retry.boxed(),
        ]);
        let mut failures = 0u32;
        while let Some(update) = updates.next().await {
            match update {
                Ok(update) => {
                    failures = 0;
                    self.apply(update);
                }
                Err(err) => {
                    // The watcher retries by itself; back off so a broken API server
                    // is not hammered, and say what is wrong.
                    failures = failures.saturating_add(1);
                    warn!(%err, failures, "watch failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Pod(event) => {
                let list = apply_event(
                    *event,
                    &mut self.pods,
                    &mut self.pods_listing,
                    |pod: &Pod| pod.uid().unwrap_or_default(),
                );
                if list {
                    self.lists_done.insert("pods");
                }
            }
            Update::Namespace(event) => {
                if apply_event(
                    *event,
                    &mut self.namespaces,
                    &mut self.namespaces_listing,
                    |n| n.name_any(),
                ) {
                    self.lists_done.insert("namespaces");
                }
            }
            Update::Service(event) => match *event {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => self.service = Some(s),
                watcher::Event::Delete(_) => self.service = None,
                watcher::Event::Init => {}
                watcher::Event::InitDone => {
                    self.lists_done.insert("service");
                }
            },
            Update::Slice(event) => {
                if apply_event(*event, &mut self.slices, &mut self.slices_listing, |s| {
                    s.name_any()
                }) {
                    self.lists_done.insert("endpointslices");
                }
            }
            Update::Retry => {
                if let Err(err) = self.kernel.sync_pod_parents() {
                    warn!(%err, "marking the kubepods parent cgroups failed");
                }
                // A failed target write is retried; pods are looked at again only
                // while one still waits for its cgroup (or for a failed map write):
                // everything else changes through watch events.
                self.reconcile_targets();
                if self.pods.keys().all(|uid| self.resolved.contains_key(uid)) {
                    return;
                }
                self.reconcile_pods();
                return;
            }
        }
        self.reconcile_targets();
        self.reconcile_pods();
        let synced = ["pods", "namespaces", "service", "endpointslices"]
            .iter()
            .all(|k| self.lists_done.contains(k));
        if synced && !*self.synced.borrow() {
            info!(pods = self.pods.len(), "discovery synced");
            let _ = self.synced.send(true);
        }
    }

    /// The Service's ClusterIPs and every endpoint, on their ports, into the kernel.
    fn reconcile_targets(&mut self) {
        let targets = api_server_targets(self.service.as_ref(), self.slices.values());
        if targets != self.targets {
            match self.kernel.set_targets(&targets) {
                Ok(()) => {
                    info!(?targets, "API-server targets updated");
                    self.metrics.api_targets.set(targets.len() as i64);
                    self.targets = targets;
                }
                Err(err) => warn!(%err, "updating API-server targets failed"),
            }
        }
    }

    /// Pods into the kernel map and the directory: gone ones out, new and changed
    /// ones in.
    fn reconcile_pods(&mut self) {
        // Pods that are gone.
        let gone: Vec<String> = self
            .resolved
            .keys()
            .filter(|uid| !self.pods.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some((cgroup_id, _)) = self.resolved.remove(&uid) {
                if let Err(err) = self.kernel.remove_pod(cgroup_id) {
                    warn!(%err, uid, "removing pod cgroup from the kernel map failed");
                }
                debug!(uid, cgroup_id, "pod removed");
            }
        }

        // Pods that are new or changed.
        let mut views = HashMap::new();
        for (uid, pod) in &self.pods {
            let ns_labels = self
                .namespaces
                .get(&pod.namespace().unwrap_or_default())
                .map(|ns| ns.labels());
            let enforcement = enforcement_of(pod.labels(), ns_labels);
            let Some(cgroup_id) = self
                .resolved
                .get(uid)
                .map(|(id, _)| *id)
                .or_else(|| find_pod_cgroup(&self.config.cgroup_root, uid, qos_class(pod)))
            else {
                // Not created by kubelet yet; the retry tick looks again.
                continue;
            };
            if self.resolved.get(uid) != Some(&(cgroup_id, enforcement)) {
                match self.kernel.set_pod(cgroup_id, enforcement) {
                    Ok(()) => {
                        info!(
                            pod = %format_args!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                            cgroup_id,
                            ?enforcement,
                            "pod classified"
                        );
                        self.resolved.insert(uid.clone(), (cgroup_id, enforcement));
                    }
                    Err(err) => {
                        warn!(%err, uid, "writing pod to the kernel map failed");
                        continue;
                    }
                }
            }
            views.insert(cgroup_id, pod_view(pod, enforcement, cgroup_id));
        }
        self.metrics.pods_known.set(views.len() as i64);
        let changed = {
            let mut published = self.published.write().unwrap_or_else(|e| e.into_inner());
            let changed = *published != views;
            if changed {
                *published = views;
            }
            changed
        };
        if changed {
            self.changed.send_modify(|generation| *generation += 1);
        }
    }
}

/// Applies one watch event to `map` (keyed by `key`), handling re-lists: between Init
/// and InitDone objects collect in `listing`, which then replaces the map, so objects
/// deleted while the watch was down disappear. Returns true at InitDone.
fn apply_event<T>(
    event: watcher::Event<T>,
    map: &mut HashMap<String, T>,
    listing: &mut Option<HashMap<String, T>>,
    key: impl Fn(&T) -> String,
) -> bool {
    match event {
        watcher::Event::Apply(obj) => {
            map.insert(key(&obj), obj);
            false
        }
        watcher::Event::Delete(obj) => {
            map.remove(&key(&obj));
            false
        }
        watcher::Event::Init => {
            *listing = Some(HashMap::new());
            false
        }
        watcher::Event::InitApply(obj) => {
            match listing.as_mut() {
                Some(listing) => listing.insert(key(&obj), obj),
                None => map.insert(key(&obj), obj),
            };
            false
        }
        watcher::Event::InitDone => {
            if let Some(listing) = listing.take() {
                *map = listing;
            }
            true
        }
    }
}

pub fn enforcement_of(
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Enforcement {
    let on = |labels: &BTreeMap<String, String>| {
        labels.get(ENFORCE_LABEL).map(String::as_str) == Some("true")
    };
    if on(pod_labels) || namespace_labels.is_some_and(on) {
        Enforcement::Enforced
    } else {
        Enforcement::Exempt
    }
}

fn qos_class(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.qos_class.as_deref()
}

fn pod_view(pod: &Pod, enforcement: Enforcement, cgroup_id: u64) -> PodView {
    PodView {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        labels: pod.labels().clone(),
        ip: pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default(),
        enforcement,
        cgroup_id,
    }
}

/// The pod cgroup's candidate paths, as kubelet lays them out: systemd driver
/// (`kubepods.slice/.../kubepods-<qos>-pod<uid_>.slice`, dashes in the UID become
/// underscores) and cgroupfs driver (`kubepods/<qos>/pod<uid>`); Guaranteed pods sit
/// directly under kubepods.
pub fn pod_cgroup_candidates(root: &Path, uid: &str, qos: Option<&str>) -> Vec<PathBuf> {
    let underscored = uid.replace('-', "_");
    let classes: &[&str] = match qos {
        Some("Guaranteed") => &["guaranteed"],
        Some("Burstable") => &["burstable"],
        Some("BestEffort") => &["besteffort"],
        _ => &["guaranteed", "burstable", "besteffort"],
    };
    let mut paths = Vec::new();
    for class in classes {
        match *class {
            "guaranteed" => {
                paths.push(root.join(format!("kubepods.slice/kubepods-pod{underscored}.slice")));
                paths.push(root.join(format!("kubepods/pod{uid}")));
            }
            class => {
                paths.push(root.join(format!(
                    "kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{underscored}.slice"
                )));
                paths.push(root.join(format!("kubepods/{class}/pod{uid}")));
            }
        }
    }
    paths
}

/// The pod's cgroup id (the inode of its cgroup-v2 directory), if kubelet made it.
pub fn find_pod_cgroup(root: &Path, uid: &str, qos: Option<&str>) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    pod_cgroup_candidates(root, uid, qos)
        .into_iter()
        .find_map(|path| std::fs::metadata(path).ok().map(|m| m.ino()))
}

/// ClusterIP(s):port of the Service and every ready endpoint address:port.
pub fn api_server_targets<'a>(
    service: Option<&Service>,
    slices: impl Iterator<Item = &'a EndpointSlice>,
) -> Vec<SocketAddr> {
    let mut targets = Vec::new();
    if let Some(spec) = service.and_then(|s| s.spec.as_ref()) {
        let ips = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        for ip in ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            for port in spec.ports.iter().flatten() {
                if port.protocol.as_deref().unwrap_or("TCP") == "TCP" {
                    if let Ok(port) = u16::try_from(port.port) {
                        targets.push(SocketAddr::new(ip, port));
                    }
                }
            }
        }
    }
    for slice in slices {
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
            .collect();
        for endpoint in &slice.endpoints {
            // An endpoint not (yet) ready still is the API server: steer it too.
            for ip in endpoint
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
            {
                for port in &ports {
                    targets.push(SocketAddr::new(ip, *port));
                }
            }
        }
    }
    targets.sort();
    targets.dedup();
    targets
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((250u64 << failures.min(6)).min(15_000))
}

fn tokio_stream_interval(period: Duration) -> impl futures_util::Stream<Item = ()> {
    futures_util::stream::unfold(tokio::time::interval(period), |mut interval| async move {
        interval.tick().await;
        Some(((), interval))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};

    #[test]
    fn enforcement_by_pod_or_namespace_label() {
        let on: BTreeMap<String, String> = [(ENFORCE_LABEL.to_owned(), "true".to_owned())].into();
        let off: BTreeMap<String, String> = [(ENFORCE_LABEL.to_owned(), "false".to_owned())].into();
        let none = BTreeMap::new();
        assert_eq!(enforcement_of(&on, None), Enforcement::Enforced);
        assert_eq!(enforcement_of(&none, Some(&on)), Enforcement::Enforced);
        // A pod cannot opt out of its namespace's enforcement.
        assert_eq!(enforcement_of(&off, Some(&on)), Enforcement::Enforced);
        assert_eq!(enforcement_of(&off, Some(&none)), Enforcement::Exempt);
        assert_eq!(enforcement_of(&none, None), Enforcement::Exempt);
    }

    #[test]
    fn cgroup_candidates_follow_kubelet() {
        let root = Path::new("/cg");
        let uid = "1a2b-3c";
        assert_eq!(
            pod_cgroup_candidates(root, uid, Some("Burstable")),
            vec![
                PathBuf::from("/cg/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c.slice"),
                PathBuf::from("/cg/kubepods/burstable/pod1a2b-3c"),
            ]
        );
        assert_eq!(
            pod_cgroup_candidates(root, uid, Some("Guaranteed")),
            vec![
                PathBuf::from("/cg/kubepods.slice/kubepods-pod1a2b_3c.slice"),
                PathBuf::from("/cg/kubepods/pod1a2b-3c"),
            ]
        );
        assert_eq!(pod_cgroup_candidates(root, uid, None).len(), 6);
    }

    #[test]
    fn targets_are_cluster_ips_and_endpoints() {
        let service = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.1".into()),
                cluster_ips: Some(vec!["10.96.0.1".into(), "fd00::1".into()]),
                ports: Some(vec![ServicePort {
                    port: 443,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.77.0.10".into()],
                ..Endpoint::default()
            }],
            ports: Some(vec![EndpointPort {
                port: Some(6443),
                ..EndpointPort::default()
            }]),
            ..EndpointSlice::default()
        };
        let targets = api_server_targets(Some(&service), [slice].iter());
        let expected: Vec<SocketAddr> = vec![
            "10.77.0.10:6443".parse().unwrap(),
            "10.96.0.1:443".parse().unwrap(),
            "[fd00::1]:443".parse().unwrap(),
        ];
        assert_eq!(targets, expected);
    }

    #[test]
    fn relists_drop_what_disappeared() {
        let mut map: HashMap<String, String> = HashMap::new();
        let mut listing = None;
        let key = |s: &String| s.clone();
        apply_event(
            watcher::Event::Apply("a".to_owned()),
            &mut map,
            &mut listing,
            key,
        );
        apply_event(
            watcher::Event::Apply("b".to_owned()),
            &mut map,
            &mut listing,
            key,
        );
        apply_event(watcher::Event::Init, &mut map, &mut listing, key);
        apply_event(
            watcher::Event::InitApply("b".to_owned()),
            &mut map,
            &mut listing,
            key,
        );
        // During the re-list the old view still answers.
        assert!(map.contains_key("a"));
        assert!(apply_event(
            watcher::Event::InitDone,
            &mut map,
            &mut listing,
            key
        ));
        assert_eq!(map.keys().collect::<Vec<_>>(), vec!["b"]);
    }
}
