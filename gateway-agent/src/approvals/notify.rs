//! The webhook sent on each new approval: a POST of a JSON summary to a configured URL
//! (a chat bridge, an on-call tool), so reviewers learn that someone waits for them.
//!
//! The body is signed so the receiver can tell it came from Tollgate and was not
//! replayed from long ago: `X-Tollgate-Timestamp` carries Unix seconds and
//! `X-Tollgate-Signature` is `sha256=` and the hex HMAC-SHA256, keyed with the shared
//! secret, of `<timestamp>.<body>` (the timestamp is inside the MAC, so it cannot be
//! changed without breaking the signature). [`verify_signature`] is the receiver's
//! side of that.
//!
//! Delivery happens in the background and never delays the held request: connection
//! errors, timeouts, 5xx and 429 are retried with exponential backoff; any other answer
//! is final. A notification that cannot be delivered is logged, and the approval waits
//! for reviewers anyway (they can list pending approvals at any time).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::model::{ApprovalRequest, Mode, StepSpec};

/// Unix seconds at which the notification was signed.
pub const TIMESTAMP_HEADER: &str = "x-tollgate-timestamp";
/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";

/// Longest wait a receiver's `Retry-After` can impose between two attempts.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Where and how to send notifications.
#[derive(Clone)]
pub struct NotifyConfig {
    /// `http://` or `https://` URL the summary is POSTed to.
    pub url: String,
    /// The HMAC key shared with the receiver; must not be empty.
    pub secret: Vec<u8>,
    /// PEM CA certificates to trust for an `https` URL instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Attempts per notification, the first included.
    pub attempts: u32,
    /// Wait after the first failed attempt; doubles after each further one.
    pub first_backoff: Duration,
    /// Bound on one attempt (connect, send, answer).
    pub attempt_timeout: Duration,
}

impl NotifyConfig {
    /// Defaults: 6 attempts, 0.5 s first backoff (about 15 s of retrying in all), 10 s
    /// per attempt, system trust roots.
    pub fn new(url: impl Into<String>, secret: Vec<u8>) -> NotifyConfig {
        NotifyConfig {
            url: url.into(),
            secret,
            ca_file: None,
            attempts: 6,
            first_backoff: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

// By hand, so the secret never reaches a log.
impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("url", &self.url)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("ca_file", &self.ca_file)
            .field("attempts", &self.attempts)
            .field("first_backoff", &self.first_backoff)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish()
    }
}

/// Why a notifier could not be built, or a notification not delivered.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("webhook URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the webhook secret is empty; notifications must be signed")]
    EmptySecret,
    #[error("webhook CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("webhook TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("encoding the notification: {0}")]
    Encode(#[from] serde_json::Error),
    /// The receiver answered with a status that retrying will not change.
    #[error("the receiver refused the notification: HTTP {status}")]
    Refused { status: u16 },
    #[error("gave up after {attempts} attempts; last: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// What the receiver gets: enough to decide whether to look, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub id: String,
    pub requester: SummaryRequester,
    pub verb: String,
    #[serde(default)]
    pub api_group: String,
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub rule: String,
    pub mode: Mode,
    pub steps: Vec<StepSpec>,
    pub created_at: String,
    pub expires_at: String,
    /// The command that shows the approval with its dry-run diff.
    pub review: String,
}

/// Who asked, in a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryRequester {
    pub user: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub node: String,
}

impl Summary {
    /// The summary of `approval`.
    pub fn of(approval: &ApprovalRequest) -> Summary {
        let spec = &approval.spec;
        let request = &spec.request;
        Summary {
            id: approval.id.clone(),
            requester: SummaryRequester {
                user: spec.requester.user.clone(),
                pod_namespace: spec.requester.pod_namespace.clone(),
                pod_name: spec.requester.pod_name.clone(),
                node: spec.requester.node.clone(),
            },
            verb: request.verb.clone(),
            api_group: request.api_group.clone(),
            resource: request.resource.clone(),
            subresource: request.subresource.clone(),
            namespace: request.namespace.clone(),
            name: request.name.clone(),
            rule: spec.rule.clone(),
            mode: spec.mode,
            steps: spec.steps.clone(),
            created_at: spec.created_at.clone(),
            expires_at: spec.expires_at.clone(),
            review: format!("gateway-agent approvals show {}", approval.id),
        }
    }
}

/// Sends notifications; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    key: hmac::Key,
    attempts: u32,
    first_backoff: Duration,
    attempt_timeout: Duration,
}

impl Notifier {
    /// Checks the URL and secret and prepares the HTTP client (TLS roots from
    /// `ca_file`, else the system's).
    pub fn new(config: NotifyConfig) -> Result<Notifier, NotifyError> {
        let bad = |reason: &str| NotifyError::BadUrl {
            url: config.url.clone(),
            reason: reason.to_owned(),
        };
        let url: Uri =
            config
                .url
                .parse()
                .map_err(|e: http::uri::InvalidUri| NotifyError::BadUrl {
                    url: config.url.clone(),
                    reason: e.to_string(),
                })?;
        match url.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad("must start with http:// or https://")),
        }
        if url.host().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        if config.secret.is_empty() {
            return Err(NotifyError::EmptySecret);
        }
        let roots = match &config.ca_file {
            Some(path) => roots_from_file(path)?,
            None => system_roots(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        // The https connector wraps this one and needs it to accept https URLs too.
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.attempt_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Notifier {
            inner: Arc::new(Inner {
                client,
                url,
                key: hmac::Key::new(hmac::HMAC_SHA256, &config.secret),
                attempts: config.attempts.max(1),
                first_backoff: config.first_backoff,
                attempt_timeout: config.attempt_timeout,
            }),
        })
    }

    /// Sends the notification for a new approval in the background. The handle says how
    /// it ended (the HTTP status on success); dropping it is fine, failures are logged.
    pub fn notify(
        &self,
        approval: &ApprovalRequest,
    ) -> tokio::task::JoinHandle<Result<u16, NotifyError>> {
        let notifier = self.clone();
        let summary = Summary::of(approval);
        tokio::spawn(async move {
            let result = notifier.send(&summary).await;
            match &result {
                Ok(status) => info!(id = %summary.id, status, "approval notification delivered"),
                Err(err) => warn!(id = %summary.id, %err, "approval notification not delivered"),
            }
            result
        })
    }

    /// Delivers `summary` now, retrying as described in the module docs.
    pub async fn send(&self, summary: &Summary) -> Result<u16, NotifyError> {
        let inner = &self.inner;
        let body = Bytes::from(serde_json::to_vec(summary)?);
        let mut backoff = inner.first_backoff;
        let mut last = String::new();
        for attempt in 1..=inner.attempts {
            let mut wait = backoff;
            // Signed per attempt: a receiver checking freshness must not see the
            // first attempt's timestamp on the last one.
            let timestamp = unix_seconds().to_string();
            let signature = sign_with(&inner.key, &timestamp, &body);
            let request = Request::builder()
                .method(Method::POST)
                .uri(inner.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, &timestamp)
                .header(SIGNATURE_HEADER, signature)
                .body(Full::new(body.clone()))
                .map_err(|e| NotifyError::BadUrl {
                    url: inner.url.to_string(),
                    reason: e.to_string(),
                })?;
            match tokio::time::timeout(inner.attempt_timeout, inner.client.request(request)).await {
                Ok(Ok(response)) => {
                    let status = response.status();
                    if status.is_success() {
                        return Ok(status.as_u16());
                    }
                    if !retryable(status) {
                        return Err(NotifyError::Refused {
                            status: status.as_u16(),
                        });
                    }
                    if let Some(asked) = retry_after(response.headers().get(RETRY_AFTER)) {
                        wait = wait.max(asked.min(MAX_RETRY_AFTER));
                    }
                    last = format!("HTTP {}", status.as_u16());
                }
                Ok(Err(err)) => last = error_chain(&err),
                Err(_) => last = format!("no answer within {:?}", inner.attempt_timeout),
            }
            if attempt < inner.attempts {
                debug!(id = %summary.id, attempt, %last, ?wait, "notification failed; retrying");
                tokio::time::sleep(wait).await;
                backoff = backoff.saturating_mul(2);
            }
        }
        Err(NotifyError::GaveUp {
            attempts: inner.attempts,
            last,
        })
    }
}

/// The `X-Tollgate-Signature` value for `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    sign_with(&hmac::Key::new(hmac::HMAC_SHA256, secret), timestamp, body)
}

fn sign_with(key: &hmac::Key, timestamp: &str, body: &[u8]) -> String {
    let tag = hmac::sign(key, &signed_bytes(timestamp, body));
    let mut header = String::from("sha256=");
    for b in tag.as_ref() {
        header.push_str(&format!("{b:02x}"));
    }
    header
}

/// True when `header` (an `X-Tollgate-Signature` value) is the signature of `body`
/// sent at `timestamp` (the `X-Tollgate-Timestamp` value) under `secret`. The
/// comparison takes constant time. Whether the timestamp is recent enough is the
/// receiver's call (a few minutes is usual).
pub fn verify_signature(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(tag) = header.trim().strip_prefix("sha256=").and_then(decode_hex) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &signed_bytes(timestamp, body), &tag).is_ok()
}

fn signed_bytes(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(timestamp.len() + 1 + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    signed
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Worth another try: the receiver is overloaded or broken for now.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After` in seconds (the HTTP-date form is rare for webhooks; it is ignored).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// The error and its causes on one line (hyper's own message is only "client error").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn roots_from_file(path: &std::path::Path) -> Result<rustls::RootCertStore, NotifyError> {
    let ca = |reason: String| NotifyError::Ca {
        path: path.to_owned(),
        reason,
    };
    let certs = crate::proxy::tls::load_certs(path).map_err(|e| ca(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| ca(e.to_string()))?;
    }
    Ok(roots)
}

/// The operating system's trust store. Missing or unreadable roots are not fatal here:
/// an `http` URL needs none, and an `https` one then fails per attempt with a clear
/// TLS error in the log.
fn system_roots() -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        warn!(%err, "reading the system's trust roots");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    debug!(
        added,
        ignored, "system trust roots for the approval webhook"
    );
    roots
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::approvals::store::testing::approval;

    const SECRET: &[u8] = b"s3cret";

    #[derive(Debug, Clone)]
    struct Received {
        timestamp: String,
        signature: String,
        content_type: String,
        body: Bytes,
    }

    /// A webhook receiver on loopback answering with `statuses` in turn (the last one
    /// from then on); returns its address and what it received.
    async fn receiver(statuses: Vec<u16>) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
        serve(statuses, None).await
    }

    /// [`receiver`], over TLS with `tls` when given.
    async fn serve(
        statuses: Vec<u16>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let statuses = statuses.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let log = log.clone();
                    let statuses = statuses.clone();
                    async move {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        let (timestamp, signature, content_type) = (
                            header(TIMESTAMP_HEADER),
                            header(SIGNATURE_HEADER),
                            header("content-type"),
                        );
                        let body = request.into_body().collect().await?.to_bytes();
                        let n = {
                            let mut log = log.lock().unwrap();
                            log.push(Received {
                                timestamp,
                                signature,
                                content_type,
                                body,
                            });
                            log.len()
                        };
                        let status = statuses[(n - 1).min(statuses.len() - 1)];
                        let response = hyper::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                            .expect("response");
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Err(_) => return,
                        },
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                    };
                });
            }
        });
        (addr, received)
    }

    fn notifier(addr: SocketAddr) -> Notifier {
        let mut config = NotifyConfig::new(format!("http://{addr}/hooks/tollgate"), SECRET.into());
        config.first_backoff = Duration::from_millis(10);
        config.attempts = 4;
        Notifier::new(config).expect("notifier")
    }

    #[tokio::test]
    async fn delivers_a_signed_summary() {
        let (addr, received) = receiver(vec![204]).await;
        let a = approval("ar-0000000000000001", "fp", "2026-01-01T10:00:00Z");
        let status = notifier(addr).notify(&a).await.unwrap().unwrap();
        assert_eq!(status, 204);
        let got = received.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        let got = &got[0];
        assert_eq!(got.content_type, "application/json");
        assert!(verify_signature(
            SECRET,
            &got.timestamp,
            &got.body,
            &got.signature
        ));
        let age = unix_seconds().abs_diff(got.timestamp.parse().unwrap());
        assert!(age < 60, "timestamp {}", got.timestamp);
        // Anything changed breaks it.
        assert!(!verify_signature(
            b"other",
            &got.timestamp,
            &got.body,
            &got.signature
        ));
        assert!(!verify_signature(SECRET, "1", &got.body, &got.signature));
        assert!(!verify_signature(
            SECRET,
            &got.timestamp,
            b"{}",
            &got.signature
        ));
        assert!(!verify_signature(
            SECRET,
            &got.timestamp,
            &got.body,
            "sha256=zz"
        ));

        let summary: Summary = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(summary, Summary::of(&a));
        assert_eq!(
            summary.review,
            "gateway-agent approvals show ar-0000000000000001"
        );
        let json: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        for field in [
            "createdAt",
            "expiresAt",
            "steps",
            "rule",
            "verb",
            "namespace",
        ] {
            assert!(json.get(field).is_some(), "{field} missing in {json}");
        }
    }

    #[tokio::test]
    async fn retries_server_errors_and_429() {
        let (addr, received) = receiver(vec![500, 429, 200]).await;
        let a = approval("ar-0000000000000002", "fp", "2026-01-01T10:00:00Z");
        assert_eq!(notifier(addr).notify(&a).await.unwrap().unwrap(), 200);
        let got = received.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        for r in &got {
            assert!(verify_signature(
                SECRET,
                &r.timestamp,
                &r.body,
                &r.signature
            ));
        }
    }

    #[tokio::test]
    async fn does_not_retry_client_errors() {
        let (addr, received) = receiver(vec![400, 200]).await;
        let a = approval("ar-0000000000000003", "fp", "2026-01-01T10:00:00Z");
        let err = notifier(addr).notify(&a).await.unwrap().unwrap_err();
        assert!(matches!(err, NotifyError::Refused { status: 400 }), "{err}");
        assert_eq!(received.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn gives_up_after_the_last_attempt() {
        let (addr, received) = receiver(vec![503]).await;
        let summary = Summary::of(&approval("ar-0000000000000004", "fp", "now"));
        let err = notifier(addr).send(&summary).await.unwrap_err();
        assert!(
            matches!(&err, NotifyError::GaveUp { attempts: 4, last } if last == "HTTP 503"),
            "{err}"
        );
        assert_eq!(received.lock().unwrap().len(), 4);

        // Nobody listening (a loopback port just freed): connection errors, retried.
        let free = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let err = notifier(addr).send(&summary).await.unwrap_err();
        assert!(
            matches!(err, NotifyError::GaveUp { attempts: 4, .. }),
            "{err}"
        );
    }

    /// An https receiver whose certificate is trusted through `ca_file` (no system
    /// roots needed); without that CA the handshake fails on every attempt.
    #[tokio::test]
    async fn https_with_a_ca_file() {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        let dir = crate::approvals::store::testing::temp_dir("webhook-tls");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let (addr, received) = serve(vec![200], Some(acceptor)).await;

        let summary = Summary::of(&approval("ar-0000000000000005", "fp", "now"));
        let mut config = NotifyConfig::new(format!("https://{addr}/hook"), SECRET.into());
        config.ca_file = Some(ca_file);
        let status = Notifier::new(config).unwrap().send(&summary).await;
        assert_eq!(status.unwrap(), 200);
        let got = received.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert!(verify_signature(
            SECRET,
            &got[0].timestamp,
            &got[0].body,
            &got[0].signature
        ));

        let mut untrusted = NotifyConfig::new(format!("https://{addr}/hook"), SECRET.into());
        untrusted.ca_file = Some(dir.path().join("other.pem"));
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.path().join("other.pem"), other.cert.pem()).unwrap();
        untrusted.attempts = 2;
        untrusted.first_backoff = Duration::from_millis(10);
        let err = Notifier::new(untrusted)
            .unwrap()
            .send(&summary)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, NotifyError::GaveUp { last, .. } if last.contains("certificate")),
            "{err}"
        );
        assert_eq!(received.lock().unwrap().len(), 1);
    }

    #[test]
    fn refuses_bad_settings() {
        let new = |url: &str, secret: &[u8]| Notifier::new(NotifyConfig::new(url, secret.into()));
        assert!(matches!(
            new("ftp://x/", SECRET),
            Err(NotifyError::BadUrl { .. })
        ));
        assert!(matches!(
            new("not a url", SECRET),
            Err(NotifyError::BadUrl { .. })
        ));
        assert!(matches!(
            new("http://127.0.0.1/", b""),
            Err(NotifyError::EmptySecret)
        ));
        let mut config = NotifyConfig::new("https://127.0.0.1/", SECRET.into());
        config.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(matches!(Notifier::new(config), Err(NotifyError::Ca { .. })));
        assert!(!format!("{:?}", NotifyConfig::new("http://h/", SECRET.into())).contains("s3cret"));
    }

    #[test]
    fn signature_format() {
        // HMAC-SHA256("Jefe", "1700000000.{\"a\":1}") as Python's hmac module computes it.
        let header = sign(b"Jefe", "1700000000", br#"{"a":1}"#);
        assert_eq!(
            header,
            "sha256=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
        assert!(verify_signature(
            b"Jefe",
            "1700000000",
            br#"{"a":1}"#,
            &header
        ));
    }
}
