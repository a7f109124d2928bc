//! The reviewers' REST API under `/api/v1` (DESIGN §5), served over TLS because it
//! carries their bearer tokens.
//!
//! One request reads top to bottom in `dispatch`: route (a strict table, [`routes`]) →
//! authenticate (OIDC or TokenReview, [`auth`]) → the endpoint, which authorizes with
//! SubjectAccessReview ([`authz`]) once it knows the namespace of the approval's
//! requester or of the session's pod. Every error a client sees is a `metav1.Status`,
//! built from [`ApiError`] in one place.
//!
//! - `GET  /api/v1/approvals[?state=pending][&watch=true]`
//! - `GET  /api/v1/approvals/{id}`
//! - `POST /api/v1/approvals/{id}/approve`, `/deny` with `{"reason": "..."}`
//! - `GET  /api/v1/sessions[?namespace=][&pod=]` (recorded sessions, DESIGN §7)
//! - `GET  /api/v1/sessions/{id}` (header, summary, the hash chain's verdict)
//! - `GET  /api/v1/sessions/{id}/records` (a JSON array, or NDJSON; streamed)
//! - `GET  /api/v1/openapi.json` (no authentication; describes all of the above)
//!
//! [`client`] is the `gateway-agent approvals` CLI that talks to it.

mod approvals;
pub mod auth;
pub mod authz;
pub mod client;
pub mod oidc;
pub mod openapi;
pub mod routes;
mod sessions;
#[cfg(test)]
mod tests;
mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tracing::{debug, info, warn, Instrument};

use crate::approvals::model::DecisionError;
use crate::approvals::{Store, StoreError, Verdict};
use crate::identity::{CacheConfig, Identity, KubeTokenReviewer};
use crate::recording::{RecordingError, Sessions};
use crate::status::{Status, Subject};
use auth::{AuthError, Authenticator};
use authz::{Authorizer, AuthzError};
use oidc::{KeySource, OidcConfig, OidcVerifier};
use routes::{Endpoint, RouteError};

/// Where the API listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15444";

/// The REST API's flags (flattened into `gateway-agent run`). The OIDC ones mirror
/// kube-apiserver's `--oidc-*` flags.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ApiArgs {
    /// Address the REST API listens on (HTTPS).
    #[arg(long, env = "TOLLGATE_API_LISTEN", default_value = DEFAULT_LISTEN)]
    pub api_listen: SocketAddr,
    /// Serving certificate of the REST API (PEM); default: the proxy's.
    #[arg(long, env = "TOLLGATE_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
    /// Key of --api-tls-cert (PEM); default: the proxy's.
    #[arg(long, env = "TOLLGATE_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,
    /// Accept OIDC ID tokens from this issuer (an https URL, equal to the tokens'
    /// `iss`). Without it, every token goes to TokenReview.
    #[arg(long, env = "TOLLGATE_OIDC_ISSUER_URL")]
    pub oidc_issuer_url: Option<String>,
    /// The audience (client id) OIDC tokens must be issued for; required with
    /// --oidc-issuer-url.
    #[arg(long, env = "TOLLGATE_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// The issuer's keys as a JWKS file; without it they are fetched through the
    /// issuer's discovery document.
    #[arg(long, env = "TOLLGATE_OIDC_JWKS_FILE")]
    pub oidc_jwks_file: Option<PathBuf>,
    /// CA bundle (PEM) that signed the issuer's HTTPS certificate; default: the
    /// system's trust roots.
    #[arg(long, env = "TOLLGATE_OIDC_CA_FILE")]
    pub oidc_ca_file: Option<PathBuf>,
    /// The claim that names the user.
    #[arg(long, env = "TOLLGATE_OIDC_USERNAME_CLAIM", default_value = "sub")]
    pub oidc_username_claim: String,
    /// The claim that lists the user's groups.
    #[arg(long, env = "TOLLGATE_OIDC_GROUPS_CLAIM", default_value = "groups")]
    pub oidc_groups_claim: String,
    /// Prefix for OIDC user names; default `<issuer>#` unless the claim is `email`;
    /// `-` for none.
    #[arg(long, env = "TOLLGATE_OIDC_USERNAME_PREFIX")]
    pub oidc_username_prefix: Option<String>,
    /// Prefix for OIDC groups (e.g. `oidc:`).
    #[arg(long, env = "TOLLGATE_OIDC_GROUPS_PREFIX", default_value = "")]
    pub oidc_groups_prefix: String,
}

impl Default for ApiArgs {
    /// The same values as the flags' defaults.
    fn default() -> Self {
        ApiArgs {
            api_listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([0; 4], 15444))),
            api_tls_cert: None,
            api_tls_key: None,
            oidc_issuer_url: None,
            oidc_audience: None,
            oidc_jwks_file: None,
            oidc_ca_file: None,
            oidc_username_claim: "sub".to_owned(),
            oidc_groups_claim: "groups".to_owned(),
            oidc_username_prefix: None,
            oidc_groups_prefix: String::new(),
        }
    }
}

impl ApiArgs {
    /// The OIDC settings, checked; `None` when no issuer is configured.
    pub fn oidc_config(&self) -> Result<Option<OidcConfig>, ApiError> {
        let Some(issuer) = self.oidc_issuer_url.clone() else {
            if self.oidc_audience.is_some() || self.oidc_jwks_file.is_some() {
                return Err(ApiError::Config(
                    "--oidc-audience and --oidc-jwks-file need --oidc-issuer-url".to_owned(),
                ));
            }
            return Ok(None);
        };
        // kube-apiserver insists on https too: the issuer URL is where keys come from.
        if !issuer.starts_with("https://") {
            return Err(ApiError::Config(format!(
                "--oidc-issuer-url {issuer:?} must be an https URL"
            )));
        }
        let audience = self
            .oidc_audience
            .clone()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                ApiError::Config("--oidc-issuer-url needs --oidc-audience".to_owned())
            })?;
        Ok(Some(OidcConfig {
            issuer,
            audience,
            keys: match &self.oidc_jwks_file {
                Some(path) => KeySource::File(path.clone()),
                None => KeySource::Discovery {
                    ca_file: self.oidc_ca_file.clone(),
                },
            },
            username_claim: self.oidc_username_claim.clone(),
            groups_claim: self.oidc_groups_claim.clone(),
            username_prefix: self.oidc_username_prefix.clone(),
            groups_prefix: self.oidc_groups_prefix.clone(),
        }))
    }

    /// The serving TLS config: --api-tls-cert/--api-tls-key, or the given defaults
    /// (the proxy's certificate) when neither is set.
    pub fn tls_config(
        &self,
        default_cert: &Path,
        default_key: &Path,
    ) -> Result<Arc<rustls::ServerConfig>, ApiError> {
        let (cert, key) = match (&self.api_tls_cert, &self.api_tls_key) {
            (Some(cert), Some(key)) => (cert.as_path(), key.as_path()),
            (None, None) => (default_cert, default_key),
            _ => {
                return Err(ApiError::Config(
                    "--api-tls-cert and --api-tls-key go together".to_owned(),
                ))
            }
        };
        crate::proxy::tls::server_config(cert, key).map_err(|err| ApiError::Config(err.to_string()))
    }
}

/// Bounds on what one client can make the server do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (a decision's reason).
    pub max_body_bytes: usize,
    /// How long a client may take to send the body.
    pub body_timeout: Duration,
    /// A watch ends after this long (clients reconnect); `?timeoutSeconds=` may ask
    /// for less.
    pub max_watch: Duration,
    /// Connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// Session record streams served at once (each holds a blocking reader thread);
    /// more get 429 with Retry-After.
    pub max_record_streams: usize,
    /// How long a streamed answer waits for a client that does not read before it
    /// gives up on it.
    pub stream_stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            body_timeout: Duration::from_secs(30),
            max_watch: Duration::from_secs(30 * 60),
            max_connections: 512,
            max_record_streams: 16,
            stream_stall_timeout: Duration::from_secs(60),
        }
    }
}

/// What the handlers share: the approval store, the recorded sessions, authentication,
/// authorization.
pub struct ApiState {
    /// Where approvals are read and decided.
    pub store: Store,
    /// Who the caller is (OIDC or TokenReview).
    pub authn: Authenticator,
    /// What the caller may do (SubjectAccessReview).
    pub authz: Authorizer,
    /// Per-request bounds.
    pub limits: Limits,
    /// The recorded sessions; `None` when this agent does not record.
    sessions: Option<Sessions>,
    /// Watches streaming now (for tests and metrics).
    watches: AtomicUsize,
    /// Session record streams being read now.
    record_streams: AtomicUsize,
}

impl ApiState {
    /// The state with [`Limits::default`] and no recorded sessions.
    pub fn new(store: Store, authn: Authenticator, authz: Authorizer) -> ApiState {
        ApiState {
            store,
            authn,
            authz,
            limits: Limits::default(),
            sessions: None,
            watches: AtomicUsize::new(0),
            record_streams: AtomicUsize::new(0),
        }
    }

    /// The state as `gateway-agent run` builds it: TokenReview and SubjectAccessReview
    /// through `client` (the agent's credentials), OIDC when configured.
    pub async fn from_args(
        args: &ApiArgs,
        store: Store,
        client: kube::Client,
    ) -> Result<ApiState, ApiError> {
        let oidc = match args.oidc_config()? {
            Some(config) => Some(OidcVerifier::new(config).await),
            None => None,
        };
        let tokens = Arc::new(Identity::new(
            KubeTokenReviewer::new(client.clone()),
            CacheConfig::default(),
        ));
        Ok(ApiState::new(
            store,
            Authenticator::new(tokens, oidc),
            Authorizer::kube(client),
        ))
    }

    /// The same state with other bounds.
    pub fn with_limits(mut self, limits: Limits) -> ApiState {
        self.limits = limits;
        self
    }

    /// The same state serving the sessions recorded under `dir` (the recorder's
    /// directory) at `/api/v1/sessions`. Without it those routes answer 404 "session
    /// recording is not enabled on this agent".
    pub fn with_sessions(mut self, dir: PathBuf) -> ApiState {
        self.sessions = Some(Sessions::open(dir));
        self
    }

    /// How many watch streams are open.
    pub fn active_watches(&self) -> usize {
        self.watches.load(Ordering::SeqCst)
    }

    /// How many session record streams are being read.
    pub fn active_record_streams(&self) -> usize {
        self.record_streams.load(Ordering::SeqCst)
    }
}

/// Everything that can go wrong with a request, each becoming one Status in
/// [`ApiError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such path (404), or not with this method (405).
    #[error("{0}")]
    Route(#[from] RouteError),
    /// No valid bearer token (401), or it could not be checked (503).
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// SubjectAccessReview could not be asked (503).
    #[error("{0}")]
    Authz(#[from] AuthzError),
    /// SubjectAccessReview said no (403).
    #[error("{} may not {} {}", .0.user, .0.verb, .0.resource)]
    Forbidden(Box<Refusal>),
    /// No approval with this id (404).
    #[error("approval {0} not found")]
    NotFound(String),
    /// No session with this id (404).
    #[error("session {0} not found")]
    SessionNotFound(String),
    /// The agent was started without a sessions directory (404).
    #[error("session recording is not enabled on this agent")]
    RecordingDisabled,
    /// Reading recorded sessions failed (500); the cause names files, so it stays in
    /// the log.
    #[error("{0}")]
    Recording(RecordingError),
    /// Too many session record streams at once (429); the limit.
    #[error("more than {0} session record streams at once")]
    TooManyStreams(usize),
    /// No representation the client accepts (406); its `Accept`.
    #[error("cannot answer in any of {0:?}")]
    NotAcceptable(String),
    /// A fault of ours not covered above, such as a reader task that died (500).
    #[error("{0}")]
    Internal(String),
    /// A malformed query or body (400).
    #[error("{0}")]
    BadRequest(String),
    /// A body over the limit, in bytes (413).
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// A body that is not JSON (415).
    #[error("unsupported content type {0:?}")]
    UnsupportedMediaType(String),
    /// The approval's rules refused the decision (403, 409 or 400).
    #[error("{0}")]
    Decision(#[from] DecisionError),
    /// The store failed (500) or kept conflicting (409).
    #[error("{0}")]
    Store(StoreError),
    /// Bad flags, found at start.
    #[error("{0}")]
    Config(String),
}

/// What RBAC refused, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The caller.
    pub user: String,
    /// The resource asked about ([`authz::APPROVALS`] or [`authz::SESSIONS`]).
    pub resource: &'static str,
    /// The RBAC verb asked about.
    pub verb: &'static str,
    /// The namespace asked about; empty for cluster scope.
    pub namespace: String,
    /// The approval or session id asked about; empty for any.
    pub name: String,
    /// RBAC's explanation, when it gave one.
    pub reason: String,
}

impl From<RecordingError> for ApiError {
    fn from(err: RecordingError) -> Self {
        match err {
            // The router only lets valid ids through; an invalid one is simply absent.
            RecordingError::NotFound(id) | RecordingError::InvalidId(id) => {
                ApiError::SessionNotFound(id)
            }
            other => ApiError::Recording(other),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            // The closure's own refusal is a decision error, whatever store ran it.
            StoreError::Rejected(decision) => ApiError::Decision(decision),
            StoreError::NotFound(id) => ApiError::NotFound(id),
            other => ApiError::Store(other),
        }
    }
}

impl ApiError {
    /// The Status the client gets. `request_id` goes into messages about our own
    /// faults, so an operator can find the log line.
    pub fn status(&self, request_id: &str) -> Status {
        fn approval(name: &str) -> Subject<'_> {
            Subject {
                group: authz::GROUP,
                resource: authz::APPROVALS,
                name,
            }
        }
        match self {
            ApiError::Route(RouteError::NotFound) => {
                Status::failure(404, "NotFound", self.to_string())
            }
            ApiError::Route(RouteError::MethodNotAllowed { .. }) => {
                Status::failure(405, "MethodNotAllowed", self.to_string())
            }
            ApiError::Auth(AuthError::Unavailable(_)) | ApiError::Authz(_) => {
                Status::service_unavailable(self.to_string())
            }
            ApiError::Auth(_) => Status::unauthorized(format!("Unauthorized: {self}")),
            ApiError::Forbidden(refusal) => {
                let Refusal {
                    user,
                    resource,
                    verb,
                    namespace,
                    name,
                    reason,
                } = refusal.as_ref();
                // Worded as the API server words RBAC refusals.
                let mut why = format!(
                    "User {user:?} cannot {verb} resource {resource:?} in API group {:?}",
                    authz::GROUP
                );
                if namespace.is_empty() {
                    why.push_str(" at the cluster scope");
                } else {
                    why.push_str(&format!(" in the namespace {namespace:?}"));
                }
                if !reason.is_empty() {
                    why.push_str(&format!(": {reason}"));
                }
                let subject = Subject {
                    group: authz::GROUP,
                    resource,
                    name,
                };
                Status::forbidden(&subject, &why)
            }
            ApiError::NotFound(id) => Status::failure(
                404,
                "NotFound",
                format!("{}.{} {id:?} not found", authz::APPROVALS, authz::GROUP),
            )
            .with_details(crate::status::StatusDetails {
                name: id.clone(),
                group: authz::GROUP.to_owned(),
                kind: authz::APPROVALS.to_owned(),
                ..Default::default()
            }),
            ApiError::SessionNotFound(id) => Status::failure(
                404,
                "NotFound",
                format!("{}.{} {id:?} not found", authz::SESSIONS, authz::GROUP),
            )
            .with_details(crate::status::StatusDetails {
                name: id.clone(),
                group: authz::GROUP.to_owned(),
                kind: authz::SESSIONS.to_owned(),
                ..Default::default()
            }),
            ApiError::RecordingDisabled => Status::failure(404, "NotFound", self.to_string()),
            // Paths on the node stay in the log.
            ApiError::Recording(_) | ApiError::Internal(_) => Status::internal_error(format!(
                "reading recorded sessions failed; see the agent's log for request {request_id}"
            )),
            ApiError::TooManyStreams(_) => {
                Status::too_many_requests(format!("{self}; retry shortly"), RETRY_STREAM_SECONDS)
            }
            ApiError::NotAcceptable(_) => Status::failure(
                406,
                "NotAcceptable",
                format!("{self}; available: application/json, application/x-ndjson"),
            ),
            ApiError::BadRequest(_) => Status::bad_request(self.to_string()),
            ApiError::TooLarge(limit) => Status::request_entity_too_large(*limit),
            ApiError::UnsupportedMediaType(_) => {
                Status::failure(415, "UnsupportedMediaType", self.to_string())
            }
            ApiError::Decision(err) => match err {
                DecisionError::SelfReview { .. } | DecisionError::NotInStepGroups { .. } => {
                    Status::forbidden(&approval(""), &err.to_string())
                }
                DecisionError::MissingReason => Status::bad_request(err.to_string()),
                DecisionError::AlreadyFinal { .. }
                | DecisionError::AlreadyApproved { .. }
                | DecisionError::NotApproved { .. }
                | DecisionError::AlreadyExecuted { .. } => {
                    Status::failure(409, "Conflict", err.to_string())
                }
            },
            ApiError::Store(StoreError::Conflict(_) | StoreError::Exists(_)) => {
                Status::failure(409, "Conflict", self.to_string())
            }
            // The store's own words stay in the log: they name files and servers.
            ApiError::Store(_) => Status::internal_error(format!(
                "the approval store failed; see the agent's log for request {request_id}"
            )),
            ApiError::Config(_) => Status::internal_error(self.to_string()),
        }
    }

    fn into_response(self, request_id: &str) -> Response<Body> {
        let status = self.status(request_id);
        let mut response = json_response(
            StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            status.to_json(),
        );
        match &self {
            ApiError::Route(RouteError::MethodNotAllowed { allow, .. }) => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    response.headers_mut().insert(ALLOW, v);
                }
            }
            ApiError::Auth(AuthError::NoCredential(_) | AuthError::Rejected(_)) => {
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tollgate\""),
                );
            }
            ApiError::TooManyStreams(_) => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(RETRY_STREAM_SECONDS));
            }
            _ => {}
        }
        response
    }
}

/// The Retry-After of a 429 for too many record streams.
const RETRY_STREAM_SECONDS: u32 = 1;

/// The response body: whole JSON documents, or a stream (watch events, session
/// records).
pub type Body = BoxBody<Bytes, BodyError>;

/// Why a streamed answer was cut short after its status was sent. Hyper then ends the
/// response without its proper end (no last chunk on HTTP/1.1, a reset stream on
/// HTTP/2), so the client sees an error and never takes a partial answer for a whole
/// one.
#[derive(Debug, thiserror::Error)]
#[error("the answer was cut short: {0}")]
pub struct BodyError(pub String);

fn json_response(code: StatusCode, json: Vec<u8>) -> Response<Body> {
    let body = Full::new(Bytes::from(json)).map_err(|never: Infallible| match never {});
    let mut response = Response::new(body.boxed());
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Serves the API on `listener` until the task is dropped. Each connection is TLS
/// (`tls`, from [`ApiArgs::tls_config`]) with HTTP/1.1 or HTTP/2.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, state: Arc<ApiState>) {
    let max_connections = state.limits.max_connections;
    crate::https::serve("REST API", listener, tls, max_connections, move |request| {
        let state = state.clone();
        async move { handle(&state, request).await }
    })
    .await
}

/// One request: a span with its id, the dispatch, one log line with the outcome.
/// Generic over the body so tests can call it without a connection.
pub async fn handle<B>(state: &Arc<ApiState>, request: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let request_id = next_request_id();
    let span = tracing::info_span!(
        "api",
        id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
        user = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut response = match dispatch(state, request).instrument(span.clone()).await {
        Ok(response) => response,
        Err(err) => {
            let code = err.status(&request_id).code;
            // Our own faults are errors; a client's mistakes are routine.
            if code >= 500 {
                span.in_scope(|| warn!(%err, code, "request failed"));
            } else {
                span.in_scope(|| debug!(%err, code, "request refused"));
            }
            err.into_response(&request_id)
        }
    };
    span.in_scope(|| {
        info!(
            code = response.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "api request"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Route → authenticate → endpoint.
async fn dispatch<B>(state: &Arc<ApiState>, request: Request<B>) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let matched = routes::route(request.method(), request.uri().path())?;
    if matched.endpoint == Endpoint::OpenApi {
        // Public: it describes the API, and clients need it before they have a token.
        return Ok(openapi_response());
    }
    let caller = state.authn.authenticate(request.headers()).await?;
    tracing::Span::current().record("user", caller.username.as_str());
    let id = matched.id.unwrap_or_default();
    match matched.endpoint {
        Endpoint::OpenApi => Ok(openapi_response()),
        Endpoint::ListApprovals => approvals::list(state, &caller, request.uri().query()).await,
        Endpoint::GetApproval => approvals::get(state, &caller, &id).await,
        Endpoint::Approve => {
            approvals::decide(state, &caller, &id, Verdict::Approve, request).await
        }
        Endpoint::Deny => approvals::decide(state, &caller, &id, Verdict::Deny, request).await,
        Endpoint::ListSessions => sessions::list(state, &caller, request.uri().query()).await,
        Endpoint::GetSession => sessions::get(state, &caller, &id, request.uri().query()).await,
        Endpoint::SessionRecords => {
            sessions::records(
                state,
                &caller,
                &id,
                request.uri().query(),
                request.headers(),
            )
            .await
        }
    }
}

fn openapi_response() -> Response<Body> {
    json_response(StatusCode::OK, openapi::DOCUMENT.as_bytes().to_vec())
}

/// `api-<process prefix>-<counter>`: unique per process and across restarts without
/// reading randomness per request.
fn next_request_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(0);
        nanos ^ std::process::id().rotate_left(16)
    });
    format!(
        "api-{prefix:08x}-{}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
