//! `gateway-agent run`: the one place where the agent is assembled, in order —
//! config → readiness and admin port → kernel data path → API client → policy →
//! discovery → identity → proxy listeners. Each component gets what it needs here and
//! owns its own state from then on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::admin::{self, Admin};
use crate::approvals::config as approvals_config;
use crate::config::{Config, Serving};
use crate::datapath::{Datapath, DatapathConfig};
use crate::discovery::{self, DiscoveryConfig, Enforcement, KernelMaps};
use crate::identity::{CacheConfig, Identity, KubeTokenReviewer};
use crate::metrics::Metrics;
use crate::policy::source::{self as policy_source, PolicySource};
use crate::proxy::accept::{Acceptor, Origin, OriginLookup};
use crate::proxy::approval::{ApprovalGate, OnCreated};
use crate::proxy::{self, Gateway, Limits, PolicyHandle};
use crate::readiness::Ready;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("admin port {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kernel data path: {0}")]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error("Kubernetes client: {0}")]
    Kube(String),
    #[error("policy: {0}")]
    Policy(#[from] policy_source::LoadError),
    #[error("TLS: {0}")]
    Tls(#[from] proxy::tls::TlsError),
    #[error("approvals: {0}")]
    Approvals(String),
    #[error("recording: {0}")]
    Recording(String),
    #[error("REST API: {0}")]
    Api(#[from] crate::api::ApiError),
    #[error("REST API listener {addr}: {source}")]
    ApiListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("trust ({0})")]
    Trust(String),
    #[error("admission webhook listener {addr}: {source}")]
    WebhookListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("proxy listener {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The kernel maps as discovery and the proxy see them: one owner (the Datapath)
/// behind a lock, since map updates need `&mut`.
#[derive(Clone)]
struct SharedDatapath(Arc<Mutex<Datapath>>);

impl SharedDatapath {
    fn lock(&self) -> std::sync::MutexGuard<'_, Datapath> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KernelMaps for SharedDatapath {
    fn set_pod(&mut self, cgroup_id: u64, enforcement: Enforcement) -> Result<(), String> {
        let class = match enforcement {
            Enforcement::Enforced => gateway_common::CgroupClass::Enforced,
            Enforcement::Exempt => gateway_common::CgroupClass::Exempt,
        };
        self.lock()
            .set_cgroup(cgroup_id, class)
            .map_err(|e| e.to_string())
    }

    fn remove_pod(&mut self, cgroup_id: u64) -> Result<(), String> {
        self.lock()
            .remove_cgroup(cgroup_id)
            .map_err(|e| e.to_string())
    }

    fn set_targets(&mut self, targets: &[SocketAddr]) -> Result<(), String> {
        self.lock().set_targets(targets).map_err(|e| e.to_string())
    }

    fn sync_pod_parents(&mut self) -> Result<usize, String> {
        self.lock().sync_pod_parents().map_err(|e| e.to_string())
    }
}

impl OriginLookup for SharedDatapath {
    fn origin(&self, local: SocketAddr, peer: SocketAddr) -> Result<Option<Origin>, String> {
        // Taken, not read: the record is not needed again and the map stays small.
        self.lock()
            .take_origin(local, peer)
            .map(|o| {
                o.map(|o| Origin {
                    dst: o.dst,
                    pod_cgroup_id: o.pod_cgroup_id,
                })
            })
            .map_err(|e| e.to_string())
    }
}

/// Runs the agent until SIGTERM/SIGINT. The kernel path stays pinned on exit, so
/// enforcement has no gap while the agent restarts.
pub async fn run(config: Config) -> Result<(), AppError> {
    let ready = Ready::new();
    let metrics = Metrics::new();
    // Every start-up task is registered before any is done, so /readyz never says ok
    // in the gap between one task finishing and the next registering.
    let maps_ready = ready.register("kernel maps");
    let policy_ready = ready.register("policy");
    let watches_ready = ready.register("watches");
    let listener_ready = ready.register("proxy listener");

    // Admin port first, so /healthz answers and /readyz says what is pending.
    let admin_listener = TcpListener::bind(config.admin_address)
        .await
        .map_err(|source| AppError::Admin {
            addr: config.admin_address,
            source,
        })?;
    let admin = Arc::new(Admin {
        ready: ready.clone(),
        metrics: metrics.clone(),
        recorder: std::sync::OnceLock::new(),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin.clone()));

    // Kernel data path: adopt pins or install; redirect starts at once.
    let mut datapath_config = DatapathConfig::new(&config.cgroup_root, &config.bpffs);
    datapath_config.proxy_port = config.proxy_port;
    datapath_config.agent_cgroup = config.agent_cgroup.clone();
    for addr in &config.proxy_addresses {
        match addr {
            IpAddr::V4(v4) => datapath_config.proxy_addr4 = Some(*v4),
            IpAddr::V6(v6) => datapath_config.proxy_addr6 = Some(*v6),
        }
    }
    let datapath = SharedDatapath(Arc::new(Mutex::new(Datapath::install(&datapath_config)?)));
    info!(cgroup_root = %config.cgroup_root.display(), bpffs = %config.bpffs.display(), "kernel data path attached");
    drop(maps_ready);

    // The agent's own API access.
    let client = kube_client(&config).await?;

    // Policy: must be valid before anything is forwarded.
    let policy = match &config.policy {
        PolicySource::File(path) => {
            let handle = PolicyHandle::new(policy_source::load_file(path)?);
            tokio::spawn(policy_source::follow_file(
                path.clone(),
                handle.clone(),
                Duration::from_secs(2),
            ));
            handle
        }
        PolicySource::ConfigMap { namespace, name } => {
            let handle = PolicyHandle::new(crate::policy::Policy::deny_all());
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(policy_source::follow_configmap(
                client.clone(),
                namespace.clone(),
                name.clone(),
                handle.clone(),
                first_tx,
            ));
            match first_rx.await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(AppError::Kube(
                        "the policy ConfigMap watch ended before the first policy".into(),
                    ))
                }
            }
            handle
        }
    };
    drop(policy_ready);

    // Discovery keeps the kernel maps right and answers "which pod is this cgroup?".
    let (directory, discovery_task) = discovery::start(
        client.clone(),
        DiscoveryConfig {
            node_name: config.node_name.clone(),
            cgroup_root: config.cgroup_root.clone(),
            api_service_namespace: "default".into(),
            api_service_name: "kubernetes".into(),
            cgroup_retry: Duration::from_millis(500),
        },
        datapath.clone(),
        metrics.clone(),
    );
    {
        let directory = directory.clone();
        tokio::spawn(async move {
            directory.wait_synced().await;
            drop(watches_ready);
        });
    }

    // The serving certificate, by trust mode (with injected-ca: Tollgate's CA, the
    // pods' trust bundles and the admission webhook).
    let serving = start_trust(&config, &client, &metrics).await?;

    // Approvals: the store, the expiry sweep, the webhook, and the reviewers' API.
    let approvals = start_approvals(&config, &client, &metrics, &serving).await?;

    // Session recording: one hash-chained file per enforced connection.
    let recorder = match config
        .recording
        .recording_config(&config.approvals.state_dir, &config.node_name)
    {
        Some(recording) => {
            let dir = recording.dir.clone();
            let recorder = crate::recording::Recorder::new(recording)
                .map_err(|e| AppError::Recording(e.to_string()))?;
            tokio::spawn(crate::recording::run_retention(
                recorder.clone(),
                Duration::from_secs(600),
            ));
            info!(dir = %dir.display(), "recording sessions");
            let _ = admin.recorder.set(recorder.clone());
            Some(recorder)
        }
        None => {
            warn!("session recording is off (--no-recording)");
            None
        }
    };

    // The proxy.
    let gateway = Arc::new(Gateway {
        upstream: proxy::upstream::Upstream::new(
            proxy::tls::upstream_config(&config.cluster_ca)?,
            proxy::upstream::RESPONSE_HEAD_TIMEOUT,
        ),
        identity: Identity::new(
            KubeTokenReviewer::new(client.clone()),
            CacheConfig::default(),
        ),
        policy,
        limits: Limits {
            max_body_bytes: config.max_body_bytes,
            ..Limits::default()
        },
        allow_unbound_tokens: config.allow_unbound_tokens,
        metrics: metrics.clone(),
        approvals: Some(approvals),
        recorder: recorder.clone(),
        record_body_limit: config.recording.record_max_body_bytes,
    });
    let (drain, draining) = proxy::Drain::new();
    let acceptor = Arc::new(Acceptor {
        gateway,
        tls: TlsAcceptor::from(serving.server_config()?),
        origins: Arc::new(datapath.clone()),
        directory,
        classify_timeout: config.classify_timeout,
        metrics,
        draining,
    });
    let mut listen_on: Vec<SocketAddr> = config
        .proxy_addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, config.proxy_port))
        .collect();
    // Host-network pods are steered to loopback.
    listen_on.push(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        config.proxy_port,
    ));
    let mut listeners = Vec::new();
    for addr in listen_on {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Listen { addr, source })?;
        listeners.push(tokio::spawn(acceptor.clone().run(listener)));
    }
    drop(listener_ready);
    info!(node = %config.node_name, "agent running");

    shutdown_signal().await;
    info!(drain_timeout = ?config.drain_timeout, "shutting down; the kernel data path stays pinned");
    // No new connections; the open ones finish what they are doing. Until the next
    // agent listens, enforced pods' new connections are refused (fail closed).
    for listener in listeners {
        listener.abort();
    }
    drop(acceptor);
    match drain.wait(config.drain_timeout).await {
        0 => info!("every proxied connection drained"),
        open => warn!(
            open,
            "connections still open after the drain timeout are cut (watches and streams: their clients reconnect)"
        ),
    }
    discovery_task.abort();
    admin_task.abort();
    if let Some(recorder) = recorder {
        // Open sessions get their `end` record, and queued records reach the file.
        recorder.shutdown().await;
    }
    Ok(())
}

/// Opens the approval store, cancels what this node held before it restarted, starts
/// the expiry sweep and the REST API (approvals and recorded sessions), and returns the
/// proxy's approval gate.
async fn start_approvals(
    config: &Config,
    client: &kube::Client,
    metrics: &Metrics,
    serving: &ServingTls,
) -> Result<Arc<ApprovalGate>, AppError> {
    let store = approvals_config::open_store(&config.approvals, client.clone())
        .await
        .map_err(|e| AppError::Approvals(e.to_string()))?;
    // A held call's client was connected to the process that held it: after a restart
    // nobody waits for those any more.
    match store.cancel_held_on_node(&config.node_name).await {
        Ok(0) => {}
        Ok(n) => info!(
            cancelled = n,
            "held approvals of the previous run cancelled"
        ),
        Err(err) => warn!(%err, "could not cancel the previous run's held approvals"),
    }
    tokio::spawn(crate::approvals::store::run_expiry(
        store.clone(),
        config.approval_expiry_interval,
        config.approval_retention,
    ));
    let notifier = approvals_config::notifier(&config.approvals)
        .map_err(|e| AppError::Approvals(e.to_string()))?;
    let on_created = notifier.map(|notifier| {
        Arc::new(move |approval: &crate::approvals::ApprovalRequest| {
            // Delivery runs (and retries) in the background; failures are logged there.
            drop(notifier.notify(approval));
        }) as OnCreated
    });

    let mut api_state =
        crate::api::ApiState::from_args(&config.api, store.clone(), client.clone()).await?;
    // The REST API also serves the recorded sessions, under the same authentication.
    if let Some(recording) = config
        .recording
        .recording_config(&config.approvals.state_dir, &config.node_name)
    {
        api_state = api_state.with_sessions(recording.dir);
    }
    let api_tls = match serving {
        // The REST API presents the proxy's certificate (reloaded with it) unless it
        // was given its own.
        ServingTls::Files { served, .. }
            if config.api.api_tls_cert.is_none() && config.api.api_tls_key.is_none() =>
        {
            proxy::tls::server_config_with_resolver(served.clone())?
        }
        ServingTls::Files { cert, key, .. } => config.api.tls_config(cert, key)?,
        // The REST API presents the agent's certificate unless it was given its own.
        ServingTls::Injected(resolver)
            if config.api.api_tls_cert.is_none() && config.api.api_tls_key.is_none() =>
        {
            proxy::tls::server_config_with_resolver(resolver.clone())?
        }
        ServingTls::Injected(_) => config
            .api
            .tls_config(std::path::Path::new(""), std::path::Path::new(""))?,
    };
    let api_listener = TcpListener::bind(config.api.api_listen)
        .await
        .map_err(|source| AppError::ApiListen {
            addr: config.api.api_listen,
            source,
        })?;
    tokio::spawn(crate::api::serve(
        api_listener,
        api_tls,
        Arc::new(api_state),
    ));
    info!(store = store.kind(), api = %config.api.api_listen, "approvals ready");
    Ok(Arc::new(ApprovalGate::new(
        store,
        config.node_name.clone(),
        Some(client.clone()),
        on_created,
        metrics.clone(),
    )))
}

/// Where the agent's TLS listeners get their certificate.
enum ServingTls {
    /// `cluster-ca`: the files the operator issued, read again when they change.
    Files {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        served: Arc<proxy::tls::FileCert>,
    },
    /// `injected-ca`: issued from Tollgate's CA and replaced as it rotates.
    Injected(Arc<crate::trust::serving::ServingCert>),
}

impl ServingTls {
    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, AppError> {
        Ok(match self {
            ServingTls::Files { served, .. } => {
                proxy::tls::server_config_with_resolver(served.clone())?
            }
            ServingTls::Injected(resolver) => {
                proxy::tls::server_config_with_resolver(resolver.clone())?
            }
        })
    }
}

/// In `injected-ca` mode: loads or creates Tollgate's CA, issues the serving
/// certificate and keeps it current, keeps the trust bundle in every enforced
/// namespace and the webhook's caBundle current, and serves the admission webhook.
async fn start_trust(
    config: &Config,
    client: &kube::Client,
    metrics: &Metrics,
) -> Result<ServingTls, AppError> {
    let injected = match &config.serving {
        Serving::Files { cert, key } => {
            let served = proxy::tls::FileCert::load(cert, key)?;
            tokio::spawn(served.clone().follow(Duration::from_secs(10)));
            return Ok(ServingTls::Files {
                cert: cert.clone(),
                key: key.clone(),
                served,
            });
        }
        Serving::InjectedCa(injected) => injected,
    };
    use crate::trust::{secret, serving};
    let (trust, _keeper) = secret::start(
        secret::CaSecret::new(
            client.clone(),
            &injected.ca_secret_namespace,
            &injected.ca_secret_name,
        ),
        injected.lifetimes,
    )
    .await
    .map_err(|e| AppError::Trust(e.to_string()))?;

    // The API server's addresses as pods dial them (ClusterIP, endpoints), and the
    // node's, where the REST API and the webhook are reached by address.
    let make_sans = {
        let node_addresses = config.proxy_addresses.clone();
        let injected = injected.clone();
        move |api_server: &[IpAddr]| {
            let mut addresses = api_server.to_vec();
            addresses.extend(node_addresses.iter().copied());
            serving::serving_sans(
                &injected.cluster_domain,
                &addresses,
                (
                    &injected.webhook_service_namespace,
                    &injected.webhook_service_name,
                ),
                &injected.serving_sans,
            )
        }
    };
    let sans = make_sans(&api_server_addresses(client).await);
    let material = trust.borrow().clone();
    let cert = serving::ServingCert::new(&material, sans, injected.lifetimes.serving_validity)
        .map_err(|e| AppError::Trust(e.to_string()))?;
    tokio::spawn(cert.clone().keep_current(trust.clone()));
    tokio::spawn(follow_api_server_addresses(
        client.clone(),
        cert.clone(),
        trust.clone(),
        make_sans,
    ));

    // The pods' side: a bundle (the cluster CA and Tollgate's) in every enforced
    // namespace, the webhook's caBundle, and the webhook that points pods at the bundle.
    use crate::trust::{bundle, webhook};
    let cluster_ca_pem = std::fs::read_to_string(&config.cluster_ca).map_err(|e| {
        AppError::Trust(format!(
            "reading the cluster CA {}: {e}",
            config.cluster_ca.display()
        ))
    })?;
    let bundles = bundle::TrustBundles::new(
        client.clone(),
        injected.trust_bundle_configmap.clone(),
        cluster_ca_pem,
        trust.clone(),
    );
    tokio::spawn(bundles.clone().run());
    tokio::spawn(bundle::keep_webhook_ca_bundle(
        client.clone(),
        injected.webhook_configuration.clone(),
        trust.clone(),
    ));
    let listener = TcpListener::bind(injected.webhook_listen)
        .await
        .map_err(|source| AppError::WebhookListen {
            addr: injected.webhook_listen,
            source,
        })?;
    tokio::spawn(webhook::serve(
        listener,
        proxy::tls::server_config_with_resolver(cert.clone())?,
        Arc::new(webhook::WebhookState::new(
            bundles,
            client.clone(),
            metrics.clone(),
        )),
    ));
    tokio::spawn(export_expiries(
        trust.clone(),
        cert.clone(),
        metrics.clone(),
    ));
    info!(
        secret = %format!("{}/{}", injected.ca_secret_namespace, injected.ca_secret_name),
        sans = ?cert.sans(),
        webhook = %injected.webhook_listen,
        "trust mode injected-ca: serving from Tollgate's CA"
    );
    Ok(ServingTls::Injected(cert))
}

/// Keeps the expiry gauges of the signing CA and the serving certificate current: at
/// each change of the trust material, and each minute (the certificate is renewed on
/// its own schedule).
async fn export_expiries(
    mut trust: crate::trust::TrustWatch,
    cert: Arc<crate::trust::serving::ServingCert>,
    metrics: Metrics,
) {
    loop {
        let signing = trust.borrow_and_update().signing.cert_pem.clone();
        if let Ok(end) = crate::trust::ca::not_after(&signing) {
            metrics.trust_signing_ca_expiry.set(end.unix_timestamp());
        }
        metrics
            .trust_serving_cert_expiry
            .set(cert.not_after().unix_timestamp());
        tokio::select! {
            changed = trust.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Re-issues the serving certificate when the `kubernetes` Service's addresses change
/// (a control-plane upgrade that moves the endpoints), from watches of the Service and
/// its EndpointSlices.
async fn follow_api_server_addresses(
    client: kube::Client,
    cert: Arc<crate::trust::serving::ServingCert>,
    trust: crate::trust::TrustWatch,
    make_sans: impl Fn(&[IpAddr]) -> Vec<String>,
) {
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let service_events = reflector(
        services_writer,
        watcher(
            kube::Api::<Service>::namespaced(client.clone(), "default"),
            watcher::Config::default().fields("metadata.name=kubernetes"),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let slice_events = reflector(
        slices_writer,
        watcher(
            kube::Api::<EndpointSlice>::namespaced(client, "default"),
            watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let mut events = std::pin::pin!(futures_util::stream::select(service_events, slice_events));
    while events.next().await.is_some() {
        let service = services.state().into_iter().next();
        let slices = slices.state();
        if service.is_none() || slices.is_empty() {
            // Still listing (or no such Service): keep what was read at start.
            continue;
        }
        let ips = api_server_ips(service.as_deref(), slices.iter().map(|s| s.as_ref()));
        let material = trust.borrow().clone();
        match cert.set_sans(&material, make_sans(&ips)) {
            Ok(true) => {
                info!(sans = ?cert.sans(), "the API server's addresses changed; serving certificate re-issued")
            }
            Ok(false) => {}
            Err(err) => {
                warn!(%err, "could not re-issue the serving certificate for the API server's new addresses")
            }
        }
    }
}

/// The `kubernetes` Service's ClusterIPs and endpoint addresses, for the serving
/// certificate; empty (logged) when they cannot be read.
async fn api_server_addresses(client: &kube::Client) -> Vec<IpAddr> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let service = kube::Api::<Service>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await;
    let slices = kube::Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await;
    let (service, slices) = match (service, slices) {
        (Ok(service), Ok(slices)) => (service, slices.items),
        (Err(err), _) | (_, Err(err)) => {
            warn!(%err, "could not read the kubernetes Service; the serving certificate has only the --serving-san addresses");
            return Vec::new();
        }
    };
    api_server_ips(service.as_ref(), slices.iter())
}

/// The addresses among the API server's targets (ClusterIPs, endpoints), once each.
fn api_server_ips<'a>(
    service: Option<&k8s_openapi::api::core::v1::Service>,
    slices: impl Iterator<Item = &'a k8s_openapi::api::discovery::v1::EndpointSlice>,
) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = discovery::api_server_targets(service, slices)
        .into_iter()
        .map(|target| target.ip())
        .collect();
    ips.dedup();
    ips
}

async fn kube_client(config: &Config) -> Result<kube::Client, AppError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AppError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| AppError::Kube(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| AppError::Kube(e.to_string()))?,
    };
    kube::Client::try_from(kube_config).map_err(|e| AppError::Kube(e.to_string()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            warn!("signal handlers unavailable; stopping on ctrl-c only");
            if let Err(err) = tokio::signal::ctrl_c().await {
                error!(%err, "waiting for ctrl-c failed");
                std::future::pending::<()>().await;
            }
        }
    }
}
