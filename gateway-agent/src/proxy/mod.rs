//! The enforcing proxy: TLS in front, the API server behind, policy in between.
//!
//! `accept` takes a steered connection (origin, pod, enforce or splice), `tls` builds
//! both TLS sides, `classify` is the API server's RequestInfo, `handler` is the path of
//! one request (classify → identify → decide → forward), `approval` holds a call the
//! policy wants approved, `upstream` owns the connections to the API server. This file serves one accepted connection.

pub mod accept;
pub mod approval;
pub mod classify;
pub mod handler;
pub mod masking;
pub mod record;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, Instrument};

use crate::identity::TokenReviewer;
pub use handler::{ConnectionInfo, Gateway, Limits, PodInfo, PolicyHandle};

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Tells open connections that the agent is stopping (see [`serve_connection`]); the
/// agent waits for them with [`Drain::wait`].
pub struct Drain {
    signal: tokio::sync::watch::Sender<bool>,
}

/// What each connection holds while it is open: its end of the [`Drain`].
pub type Draining = tokio::sync::watch::Receiver<bool>;

impl Drain {
    pub fn new() -> (Drain, Draining) {
        let (signal, draining) = tokio::sync::watch::channel(false);
        (Drain { signal }, draining)
    }

    /// Starts the drain, then waits until every connection holding a [`Draining`] has
    /// ended or `timeout` passed; returns how many were still open then.
    pub async fn wait(self, timeout: std::time::Duration) -> usize {
        self.signal.send_replace(true);
        match tokio::time::timeout(timeout, self.signal.closed()).await {
            Ok(()) => 0,
            Err(_) => self.signal.receiver_count(),
        }
    }
}

/// Resolves once the agent is stopping (or its [`Drain`] is gone).
async fn stopping(draining: &mut Draining) {
    // The guard `wait_for` returns is dropped here, not held across the caller's awaits.
    if draining.wait_for(|stopping| *stopping).await.is_err() {
        // No Drain any more: nobody will ask this connection to stop.
        std::future::pending::<()>().await;
    }
}

/// Terminates TLS on `stream` and serves HTTP/1.1 or HTTP/2 (with upgrades) on it until
/// the client goes away. When `draining` says so, the connection shuts down gracefully:
/// requests in flight finish (a call being applied is not cut half-way), no new ones
/// are taken (HTTP/2 GOAWAY; HTTP/1.1 closes after the current response), and the
/// client opens its next connection to the agent that takes over.
pub async fn serve_connection<S, R>(
    stream: S,
    acceptor: TlsAcceptor,
    gateway: Arc<Gateway<R>>,
    connection: ConnectionInfo,
    mut draining: Draining,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: TokenReviewer,
{
    let span = tracing::info_span!(
        "session",
        id = %connection.session,
        peer = %connection.peer,
        dst = %connection.original_dst,
    );
    async move {
        // A client that connects and never finishes the handshake must not hold a
        // task and a socket for ever.
        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                // Most often a client that does not trust our certificate: say so.
                info!(%err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                info!(timeout = ?TLS_HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                return;
            }
        };
        // One recorded session per client connection that got past the handshake.
        let mut connection = connection;
        if let Some(recorder) = &gateway.recorder {
            connection.recording = recorder.open_session(crate::recording::SessionInfo {
                id: connection.session.clone(),
                pod_namespace: connection.pod.namespace.clone(),
                pod_name: connection.pod.name.clone(),
                pod_uid: connection.pod.uid.clone(),
                pod_service_account: connection.pod.service_account.clone(),
                peer: connection.peer.to_string(),
                api_server: connection.original_dst.to_string(),
                started_at: crate::recording::Timestamp::default(),
            });
        }
        let connection = Arc::new(connection);
        let service = service_fn(move |request| {
            handler::handle(gateway.clone(), connection.clone(), request)
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .max_buf_size(256 * 1024)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(30));
        builder.http2().max_header_list_size(256 * 1024);
        let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
        tokio::pin!(served);
        let result = tokio::select! {
            result = served.as_mut() => result,
            () = stopping(&mut draining) => {
                debug!("agent stopping: no new requests on this connection");
                served.as_mut().graceful_shutdown();
                served.await
            }
        };
        if let Err(err) = result {
            debug!(%err, "connection ended with an error");
        }
        info!("session closed");
    }
    .instrument(span)
    .await
}
