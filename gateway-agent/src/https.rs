//! The agent's own small HTTPS servers (the reviewers' REST API, the admission
//! webhook): one accept loop with a bound on open connections, a TLS handshake with a
//! deadline, then HTTP/1.1 or HTTP/2 with small header limits. The proxy has its own
//! (`proxy::serve_connection`): it serves upgrades, big headers and a drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `handler` on `listener` until the task is dropped. `name` says which server
/// in logs; at most `max_connections` are served at once, and excess clients wait in
/// the kernel's listen queue rather than holding a task each.
pub async fn serve<H, F, B>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    max_connections: usize,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "{name} listening");
    }
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%err, "{name}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        tokio::spawn(
            async move {
                serve_connection(name, stream, acceptor, handler).await;
                drop(permit);
            }
            .instrument(tracing::debug_span!("connection", server = name, %peer)),
        );
    }
}

async fn serve_connection<H, F, B>(
    name: &'static str,
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            debug!(%err, "{name}: TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!("{name}: TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |request| {
        let response = handler(request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(64);
    if let Err(err) = builder.serve_connection(TokioIo::new(tls), service).await {
        debug!(%err, "{name}: connection ended with an error");
    }
}
