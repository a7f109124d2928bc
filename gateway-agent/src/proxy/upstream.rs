//! Connections to the real API server: pooled, HTTP/2 when the server offers it, and a
//! separate HTTP/1.1-only pool for upgrades (exec, attach, port-forward), which only
//! exist in HTTP/1.1.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The body type every part of the proxy speaks.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the API server at {addr} could not be reached: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
    #[error("the API server at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("bad upstream address: {0}")]
    BadUri(#[from] http::Error),
}

/// How long the API server may take to start answering (the head only: streams
/// such as watches then run as long as they like).
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Which connections a request goes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Short calls: multiplexed on the pooled connections (HTTP/2 when offered).
    Pooled,
    /// Calls that stay open (watches, logs, the `proxy` subresource): an HTTP/1.1
    /// connection each. On one HTTP/2 connection they would take the API server's
    /// concurrent streams (100 by default) and every later call of the node would
    /// wait behind them.
    LongRunning,
    /// exec, attach, port-forward: upgrades exist only in HTTP/1.1.
    Upgrade,
}

pub struct Upstream {
    pooled: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    /// One request per connection at a time: upgrades and long-running calls.
    dedicated: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    response_header_timeout: Duration,
}

impl Upstream {
    pub fn new(tls: rustls::ClientConfig, response_header_timeout: Duration) -> Upstream {
        let connector = || {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(10)));
            http
        };
        let pooled_tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only()
            .enable_all_versions()
            .wrap_connector(connector());
        let upgrade_tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(connector());
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64);
        Upstream {
            pooled: builder.build(pooled_tls),
            dedicated: Client::builder(TokioExecutor::new())
                .http1_preserve_header_case(true)
                .build(upgrade_tls),
            response_header_timeout,
        }
    }

    /// Sends `request` to the API server at `addr`. The caller has already removed
    /// hop-by-hop headers; for upgrades it keeps `Connection`/`Upgrade`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut request: Request<ProxyBody>,
        route: Route,
    ) -> Result<Response<Incoming>, UpstreamError> {
        *request.uri_mut() = upstream_uri(addr, request.uri())?;
        // A request that arrived over h2 must not force h2 upstream: the pool picks h2
        // or http/1.1 by ALPN, and upgrades exist only in HTTP/1.1.
        *request.version_mut() = http::Version::HTTP_11;
        let client = match route {
            Route::Pooled => &self.pooled,
            Route::LongRunning | Route::Upgrade => &self.dedicated,
        };
        // Only the response head is bounded: watches and `logs -f` stream for as long
        // as they like once the head has arrived.
        match tokio::time::timeout(self.response_header_timeout, client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(source)) => Err(UpstreamError::Unreachable { addr, source }),
            Err(_) => Err(UpstreamError::Timeout {
                addr,
                timeout: self.response_header_timeout,
            }),
        }
    }
}

fn upstream_uri(addr: SocketAddr, original: &Uri) -> Result<Uri, http::Error> {
    let path = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let authority: Authority = addr.to_string().parse().map_err(http::Error::from)?;
    Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(authority)
        .path_and_query(path)
        .build()
}

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1), plus those named
/// in `Connection`. HTTP/2 forbids them outright, so they never cross the proxy —
/// except `Connection`/`Upgrade` on an upgrade, which must reach the API server.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == http::header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(http::header::CONNECTION);
        headers.remove(http::header::UPGRADE);
    }
}
