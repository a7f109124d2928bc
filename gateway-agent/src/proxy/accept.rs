//! What happens to a connection the kernel steered to us, before any HTTP:
//! who sent it (origin lookup), is that pod enforced (directory, with a bounded wait
//! for pods discovery has not seen yet), and then TLS + policy or a plain L4 splice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use super::handler::{ConnectionInfo, Gateway, PodInfo};
use crate::discovery::{Directory, Enforcement, PodView};
use crate::identity::TokenReviewer;
use crate::metrics::{ConnectionLabels, Metrics};

/// Where a steered connection was going and which pod cgroup it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub dst: SocketAddr,
    pub pod_cgroup_id: u64,
}

/// The kernel's record of steered connections (the datapath's flow map).
pub trait OriginLookup: Send + Sync + 'static {
    fn origin(&self, local: SocketAddr, peer: SocketAddr) -> Result<Option<Origin>, String>;
}

pub struct Acceptor<R: TokenReviewer, O: OriginLookup> {
    pub gateway: Arc<Gateway<R>>,
    pub tls: TlsAcceptor,
    pub origins: Arc<O>,
    pub directory: Directory,
    /// How long a connection from a pod discovery does not know yet may wait.
    pub classify_timeout: Duration,
    pub metrics: Metrics,
    /// Each enforced connection holds a copy while open, so the agent can drain them.
    pub draining: super::Draining,
}

impl<R: TokenReviewer, O: OriginLookup> Acceptor<R, O> {
    /// Accepts connections on `listener` until the task is dropped.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let local = listener.local_addr().ok();
        info!(?local, "proxy listening");
        let mut sequence = 0u64;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            sequence += 1;
            let session = format!("{}-{sequence}", session_prefix());
            let this = self.clone();
            let span = tracing::info_span!("connection", session = %session, %peer);
            tokio::spawn(async move { this.handle(stream, peer, session).await }.instrument(span));
        }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr, session: String) {
        let _ = stream.set_nodelay(true);
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(err) => {
                debug!(%err, "connection gone before it was looked at");
                return;
            }
        };
        let origin = match self.origins.origin(local, peer) {
            Ok(Some(origin)) => origin,
            Ok(None) => {
                // Not steered by the kernel: someone dialled the proxy port directly.
                // Without an origin there is no pod to hold to account; refuse.
                self.count("unattributed");
                warn!(%local, "connection without a kernel origin record refused");
                return;
            }
            Err(err) => {
                self.count("unattributed");
                warn!(%err, "origin lookup failed; connection refused");
                return;
            }
        };
        let pod = match self.directory.get(origin.pod_cgroup_id) {
            Some(pod) => Some(pod),
            None => {
                // The pod connected before discovery classified it (a pod's first
                // connection can beat its watch event): wait, bounded.
                self.count("awaited_discovery");
                info!(
                    cgroup = origin.pod_cgroup_id,
                    "pod not classified yet; waiting for discovery"
                );
                self.directory
                    .wait_for(origin.pod_cgroup_id, self.classify_timeout)
                    .await
            }
        };
        let Some(pod) = pod else {
            // Fail closed: a pod we cannot identify does not reach the API server.
            self.count("unattributed");
            warn!(
                cgroup = origin.pod_cgroup_id,
                timeout = ?self.classify_timeout,
                "no pod known for this cgroup in time; connection refused"
            );
            return;
        };
        match pod.enforcement {
            Enforcement::Exempt => {
                self.count("exempt");
                splice(stream, origin.dst, &pod).await;
            }
            Enforcement::Enforced => {
                self.count("enforced");
                let connection = ConnectionInfo {
                    session,
                    peer,
                    original_dst: normalise(origin.dst),
                    pod: pod_info(&pod),
                    // Opened once the TLS handshake succeeds (see serve_connection).
                    recording: crate::recording::SessionHandle::disabled(),
                };
                super::serve_connection(
                    stream,
                    self.tls.clone(),
                    self.gateway.clone(),
                    connection,
                    self.draining.clone(),
                )
                .await;
            }
        }
    }

    fn count(&self, kind: &'static str) {
        self.metrics
            .connections
            .get_or_create(&ConnectionLabels { kind })
            .inc();
    }
}

/// A pod that is not enforced gets its bytes through untouched, to where it dialled.
async fn splice(mut client: TcpStream, dst: SocketAddr, pod: &PodView) {
    let dst = normalise(dst);
    let mut upstream = match TcpStream::connect(dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            info!(%err, %dst, "splice: API server unreachable");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    debug!(pod = %format_args!("{}/{}", pod.namespace, pod.name), %dst, "exempt pod spliced");
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// `::ffff:a.b.c.d` is the IPv4 address the pod meant.
fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn pod_info(pod: &PodView) -> PodInfo {
    PodInfo {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.clone(),
        ip: pod.ip.clone(),
    }
}

/// Sessions are named `<agent start time in hex>-<n>` so ids stay unique across
/// agent restarts on a node.
fn session_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        format!("{now:x}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.96.0.1]:443".parse().unwrap();
        assert_eq!(
            normalise(mapped),
            "10.96.0.1:443".parse::<SocketAddr>().unwrap()
        );
        let native: SocketAddr = "[fd77::10]:6443".parse().unwrap();
        assert_eq!(normalise(native), native);
    }
}
