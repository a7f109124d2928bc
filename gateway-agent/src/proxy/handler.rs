//! One API call through the proxy, top to bottom:
//! classify → identify → decide → (hold for approval →) forward (→ upgrade | → mask:
//! `proxy::masking` prepares the upstream request and transforms the answer).
//!
//! Every refusal is a `metav1.Status` built in one place (`refuse`), logged with the
//! request id, and never a dropped connection.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use tracing::{info, warn, Instrument};

use super::approval::{ApprovalGate, Gated, HeldCall};
use super::classify::{classify, RequestInfo};
use super::masking;
use super::record::{self, Exchanged, RequestHead, RequestTap};
use super::upstream::{strip_hop_by_hop, BoxError, ProxyBody, Route, Upstream, UpstreamError};
use crate::identity::{check_pod, AttributedPod, Identity, Review, TokenReviewer};
use crate::metrics::RequestLabels;
use crate::policy::{Action, Caller, Decision, Policy};
use crate::recording::{
    splice_recorded, Action as RecordedAction, RemoteCommandTap, SessionHandle, StreamProtocol,
    Timestamp,
};
use crate::status::{Status, Subject};

/// The header the API server reads (and echoes) to tie its audit event to ours.
const AUDIT_ID: &str = "audit-id";

/// Bounds on what a client may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// All header names and values together.
    pub max_header_bytes: usize,
    /// A request body (the API server itself refuses more than 3 MiB).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 3 * 1024 * 1024,
        }
    }
}

/// The policy in force; replaced whole on reload, read per request.
#[derive(Clone)]
pub struct PolicyHandle(Arc<RwLock<Arc<Policy>>>);

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        PolicyHandle(Arc::new(RwLock::new(Arc::new(policy))))
    }
    pub fn current(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }
}

/// What every connection shares.
pub struct Gateway<R: TokenReviewer> {
    pub upstream: Upstream,
    pub identity: Identity<R>,
    pub policy: PolicyHandle,
    pub limits: Limits,
    /// Accept tokens not bound to any pod (e.g. legacy Secret-based ones). Off by
    /// default: such a token cannot be tied to the pod that uses it.
    pub allow_unbound_tokens: bool,
    pub metrics: crate::metrics::Metrics,
    /// Holds calls that the policy says need approval; `None` when the agent runs
    /// without an approval store (such calls are then refused).
    pub approvals: Option<Arc<ApprovalGate>>,
    /// Opens each enforced connection's session record; `None` when recording is off.
    pub recorder: Option<crate::recording::Recorder>,
    /// The largest body kept in a session record (the recorder's cap).
    pub record_body_limit: usize,
}

/// The pod on the other end of a connection, as the kernel and discovery know it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub ip: String,
}

/// One client connection (one session).
#[derive(Clone)]
pub struct ConnectionInfo {
    pub session: String,
    pub peer: SocketAddr,
    /// Where the pod was going: the API server address it dialled.
    pub original_dst: SocketAddr,
    pub pod: PodInfo,
    /// This session's recording (a no-op handle when recording is off).
    pub recording: SessionHandle,
}

/// Serves one request. Never fails: every error becomes a Status response.
pub async fn handle<R: TokenReviewer>(
    gateway: Arc<Gateway<R>>,
    connection: Arc<ConnectionInfo>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let request_id = audit_id(request.headers());
    let span = tracing::info_span!(
        "request",
        id = %request_id,
        session = %connection.session,
        pod = %format_args!("{}/{}", connection.pod.namespace, connection.pod.name),
        method = %request.method(),
        path = %request.uri().path(),
        user = tracing::field::Empty,
        verb = tracing::field::Empty,
        rule = tracing::field::Empty,
    );
    let started = Instant::now();
    let recording = !connection.recording.id().is_empty();
    let head = recording.then(|| RequestHead {
        audit_id: request_id.clone(),
        received: Timestamp::now(),
        uri: request.uri().path_and_query().map_or_else(
            || request.uri().path().to_owned(),
            |pq| pq.as_str().to_owned(),
        ),
        user_agent: request
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        source_ip: connection.pod.ip.clone(),
    });
    let mut exchanged = Exchanged::default();
    let response = serve(
        &gateway,
        &connection,
        request,
        &request_id,
        &mut exchanged,
        recording,
    )
    .instrument(span.clone())
    .await;
    let (response, decision) = match response {
        Ok(response) => (response, "allow"),
        Err(refusal) => (refusal.into_response(), "refused"),
    };
    gateway
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            verb: exchanged.verb().to_owned(),
            decision: decision.to_owned(),
            code: response.status().as_u16(),
        })
        .inc();
    gateway
        .metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    span.in_scope(|| {
        info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "done"
        )
    });
    let Some(head) = head else {
        return Ok(response);
    };
    // What the client receives (masked) is what is recorded, when it has received it.
    Ok(record::attach(
        &connection.recording,
        gateway.record_body_limit,
        gateway.policy.current().masker.clone(),
        head,
        exchanged,
        response,
    ))
}

/// A request answered by the proxy itself.
struct Refusal {
    status: Status,
    request_id: String,
    retry_after: Option<u32>,
}

impl Refusal {
    fn new(status: Status, request_id: &str) -> Self {
        let retry_after = status.details.as_ref().and_then(|d| d.retry_after_seconds);
        Refusal {
            status,
            request_id: request_id.to_owned(),
            retry_after,
        }
    }

    fn into_response(self) -> Response<ProxyBody> {
        let code =
            StatusCode::from_u16(self.status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(full(self.status.to_json()));
        *response.status_mut() = code;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(id) = HeaderValue::from_str(&self.request_id) {
            headers.insert(AUDIT_ID, id);
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

async fn serve<R: TokenReviewer>(
    gateway: &Gateway<R>,
    connection: &ConnectionInfo,
    request: Request<Incoming>,
    request_id: &str,
    exchanged: &mut Exchanged,
    recording: bool,
) -> Result<Response<ProxyBody>, Refusal> {
    let refuse = |status: Status| Refusal::new(status, request_id);

    // Classify: what is this call about?
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > gateway.limits.max_header_bytes {
        warn!(header_bytes, "headers too large");
        return Err(refuse(Status::headers_too_large(
            gateway.limits.max_header_bytes,
        )));
    }
    let mut info = classify(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    )
    .map_err(|err| {
        warn!(%err, "unroutable path");
        refuse(Status::bad_request(err.to_string()))
    })?;
    let upgrade = is_upgrade(request.headers());
    if upgrade {
        info.treat_streaming_upgrade_as_create();
    }
    exchanged.verb.clone_from(&info.verb);
    if recording {
        exchanged.info = Some(info.clone());
    }

    // Identify: whose token is it, and is it this pod's?
    let token = bearer_token(request.headers()).ok_or_else(|| {
        refuse(Status::unauthorized(
            "Tollgate needs the pod's service-account bearer token on every request",
        ))
    })?;
    let user = match gateway.identity.review(token).await {
        Ok(Review::Authenticated(user)) => user,
        Ok(Review::Rejected(reason)) => {
            warn!(%reason, "token rejected by TokenReview");
            return Err(refuse(Status::unauthorized(format!(
                "the API server does not accept this token: {reason}"
            ))));
        }
        Err(err) => {
            warn!(%err, "TokenReview unavailable");
            return Err(refuse(Status::service_unavailable(err.to_string())));
        }
    };
    let pod = AttributedPod {
        namespace: connection.pod.namespace.clone(),
        name: connection.pod.name.clone(),
        uid: connection.pod.uid.clone(),
    };
    if recording {
        exchanged.user = Some(user.clone());
    }
    if let Err(mismatch) = check_pod(&user, &pod, gateway.allow_unbound_tokens) {
        warn!(user = %user.username, %mismatch, "token used from the wrong pod");
        return Err(refuse(Status::forbidden(
            &subject(&info),
            &mismatch.to_string(),
        )));
    }

    // Tollgate's own objects (approvals) are never written by an enforced pod, whatever
    // the policy and the pod's RBAC say: an agent that could write an ApprovalRequest's
    // status could approve its own held calls.
    if info.api_group == crate::approvals::store::kubernetes::GROUP
        && !matches!(info.verb.as_str(), "get" | "list" | "watch")
    {
        warn!(verb = %info.verb, resource = %info.resource, "write to Tollgate's own objects refused");
        return Err(refuse(Status::forbidden(
            &subject(&info),
            "Tollgate's own objects (approvals) cannot be changed from an enforced pod; reviewers use the approvals API",
        )));
    }

    // Decide: what does the policy say?
    let caller = Caller {
        user: &user.username,
        groups: &user.groups,
        namespace: &connection.pod.namespace,
        service_account: &connection.pod.service_account,
        pod_labels: &connection.pod.labels,
    };
    let decision = gateway.policy.current().decide(&caller, &info);
    let span = tracing::Span::current();
    span.record("user", user.username.as_str());
    span.record("verb", info.verb.as_str());
    span.record("rule", decision.rule.as_deref().unwrap_or("<default>"));
    tracing::debug!(
        user = %user.username,
        verb = %info.verb,
        resource = %info.resource_with_subresource(),
        namespace = %info.namespace,
        name = %info.name,
        action = %decision.action,
        rule = decision.rule.as_deref().unwrap_or("<default>"),
        "decided"
    );
    if recording {
        let action = match decision.action {
            Action::Allow => RecordedAction::Allow,
            Action::Deny => RecordedAction::Deny,
            Action::Approve => RecordedAction::Approve,
        };
        exchanged.decision = Some((action, decision.rule.clone(), decision.reason.clone()));
        if !upgrade {
            let content_type = request
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            exchanged.request_body = Some(RequestTap::new(gateway.record_body_limit, content_type));
        }
    }
    let tap = exchanged.request_body.clone();
    match decision.action {
        Action::Deny => {
            let why = match &decision.rule {
                Some(rule) => format!("Tollgate policy rule {rule:?}: {}", decision.reason),
                None => format!("Tollgate policy: {}", decision.reason),
            };
            Err(refuse(Status::forbidden(&subject(&info), &why)))
        }
        Action::Approve => {
            let call = Approvable {
                info: &info,
                user: &user,
                decision: &decision,
                upgrade,
            };
            let held = hold_for_approval(gateway, connection, request, call, request_id, tap).await;
            exchanged.approval_id = held.approval_id;
            held.response.map_err(refuse)
        }
        Action::Allow => forward(
            gateway, connection, request, upgrade, request_id, &info, tap,
        )
        .await
        .map_err(refuse),
    }
}

/// What the handler knows about a call the policy wants approved.
struct Approvable<'a> {
    info: &'a RequestInfo,
    user: &'a crate::identity::UserInfo,
    decision: &'a Decision,
    upgrade: bool,
}

/// How a held call ended: the response (or refusal), and the approval it concerned.
struct HeldOutcome {
    response: Result<Response<ProxyBody>, Status>,
    approval_id: Option<String>,
}

/// Reads the call whole, hands it to the approval gate, and sends it once approved.
async fn hold_for_approval<R: TokenReviewer>(
    gateway: &Gateway<R>,
    connection: &ConnectionInfo,
    request: Request<Incoming>,
    call: Approvable<'_>,
    request_id: &str,
    tap: Option<RequestTap>,
) -> HeldOutcome {
    let mut approval_id = None;
    let response = held_call(
        gateway,
        connection,
        request,
        call,
        request_id,
        tap,
        &mut approval_id,
    )
    .await;
    HeldOutcome {
        response,
        approval_id,
    }
}

async fn held_call<R: TokenReviewer>(
    gateway: &Gateway<R>,
    connection: &ConnectionInfo,
    request: Request<Incoming>,
    call: Approvable<'_>,
    request_id: &str,
    tap: Option<RequestTap>,
    approval_id: &mut Option<String>,
) -> Result<Response<ProxyBody>, Status> {
    let rule_name = call.decision.rule.as_deref().unwrap_or("<default>");
    let (Some(gate), Some(rule)) = (
        gateway.approvals.as_deref(),
        call.decision.approval.as_deref(),
    ) else {
        warn!(
            rule = rule_name,
            "approval needed but no approval store is configured"
        );
        return Err(Status::service_unavailable(format!(
            "Tollgate policy rule {rule_name:?} needs approval, but this agent has no approval store"
        )));
    };
    if call.upgrade && rule.execute_as.is_some() {
        return Err(Status::forbidden(
            &subject(call.info),
            &format!(
                "Tollgate policy rule {rule_name:?} runs approved calls as another account, which an exec, attach or port-forward stream cannot do"
            ),
        ));
    }
    let limit = gateway.limits.max_body_bytes;
    let mut request = within_body_limit(request, limit).map_err(|status| *status)?;
    // The answer of an approved call is masked like any other (a created Secret comes
    // back with its data).
    let (method, headers) = (request.method().clone(), request.headers_mut());
    let masking = masking::prepare(
        &gateway.policy.current().masker,
        call.info,
        &method,
        call.upgrade,
        headers,
        &gateway.metrics,
    )
    .map_err(|status| *status)?;
    let client_upgrade = call.upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    prepare_upstream_headers(&mut parts.headers, connection, request_id, call.upgrade);
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(Status::request_entity_too_large(limit))
        }
        Err(err) => {
            return Err(Status::bad_request(format!(
                "reading the request body: {err}"
            )))
        }
    };
    if let Some(tap) = &tap {
        tap.push(&body);
    }
    if is_write(call.info) && masking::carries_marker(&body) {
        warn!("a write carrying a masked value was refused");
        return Err(masking::marker_refusal(call.info));
    }
    let held = HeldCall {
        parts: &parts,
        body,
        info: call.info,
        user: call.user,
        connection,
        request_id,
        rule_name,
        rule,
        upgrade: call.upgrade,
    };
    let approval = match gate.admit(&gateway.upstream, &held).await? {
        Gated::Proceed(approval) => approval,
        Gated::Answered(response) => return Ok(response),
        Gated::Refused(status, id) => {
            *approval_id = Some(id);
            return Err(status);
        }
    };
    *approval_id = Some(approval.id.clone());
    let Some(client_upgrade) = client_upgrade else {
        let response = gate
            .execute(&gateway.upstream, connection.original_dst, &held, &approval)
            .await?;
        let (parts, body) = response.into_parts();
        return masking::respond(masking, parts, body).await;
    };
    let upstream_request = Request::from_parts(parts, empty());
    let response = gateway
        .upstream
        .send(connection.original_dst, upstream_request, Route::Upgrade)
        .await
        .map_err(|err| Status::service_unavailable(err.to_string()))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(splice_upgrade(
            client_upgrade,
            response,
            connection,
            request_id,
            call.info,
            gateway.policy.current().masker.clone(),
        ));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

/// The headers a request carries upstream: no hop-by-hop ones (but the upgrade's), no
/// Host (the upstream URI has the authority), our Audit-ID, and the pod's address.
fn prepare_upstream_headers(
    headers: &mut HeaderMap,
    connection: &ConnectionInfo,
    request_id: &str,
    upgrade: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(http::header::HOST);
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(AUDIT_ID, id);
    }
    // The API server's audit log then shows the pod's address, not the node's.
    if let Ok(ip) = HeaderValue::from_str(&connection.pod.ip) {
        headers.append("x-forwarded-for", ip);
    }
}

async fn forward<R: TokenReviewer>(
    gateway: &Gateway<R>,
    connection: &ConnectionInfo,
    request: Request<Incoming>,
    upgrade: bool,
    request_id: &str,
    info: &RequestInfo,
    tap: Option<RequestTap>,
) -> Result<Response<ProxyBody>, Status> {
    let limit = gateway.limits.max_body_bytes;
    let mut request = within_body_limit(request, limit).map_err(|status| *status)?;
    // Masking: refuse what a rule refuses, and ask upstream for plain JSON.
    let (method, headers) = (request.method().clone(), request.headers_mut());
    let masking = match masking::prepare(
        &gateway.policy.current().masker,
        info,
        &method,
        upgrade,
        headers,
        &gateway.metrics,
    ) {
        Ok(plan) => plan,
        Err(status) => {
            tokio::spawn(discard(request.into_body(), DISCARD_LIMIT));
            return Err(*status);
        }
    };
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

    let (mut parts, body) = request.into_parts();
    prepare_upstream_headers(&mut parts.headers, connection, request_id, upgrade);
    // The body streams through; if it outgrows the limit mid-way the upload fails,
    // and this flag tells that failure apart from an unreachable API server.
    let too_large = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = too_large.clone();
    let body = Limited::new(body, limit).map_err(move |err| {
        if err.is::<http_body_util::LengthLimitError>() {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        err
    });
    // A write carrying a masked value is cut off before the API server has it whole.
    let carries_marker = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body: ProxyBody = if is_write(info) {
        MarkerGuard {
            inner: body.boxed(),
            scan: masking::MarkerScan::default(),
            found: carries_marker.clone(),
        }
        .boxed()
    } else {
        body.boxed()
    };
    // Recording keeps a copy of what went upstream (up to the record's body cap).
    let body: ProxyBody = match tap {
        Some(tap) => body
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    tap.push(data);
                }
                frame
            })
            .boxed(),
        None => body.boxed(),
    };
    let upstream_request = Request::from_parts(parts, body);

    let response = gateway
        .upstream
        .send(
            connection.original_dst,
            upstream_request,
            route(info, upgrade),
        )
        .await
        .map_err(|err| match err {
            _ if carries_marker.load(std::sync::atomic::Ordering::Relaxed) => {
                warn!("a write carrying a masked value was refused");
                masking::marker_refusal(info)
            }
            _ if too_large.load(std::sync::atomic::Ordering::Relaxed) => {
                Status::request_entity_too_large(limit)
            }
            UpstreamError::Timeout { .. } => Status::timeout(err.to_string()),
            other => Status::service_unavailable(other.to_string()),
        })?;

    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
        (client_upgrade, response.status())
    {
        return Ok(splice_upgrade(
            client_upgrade,
            response,
            connection,
            request_id,
            info,
            gateway.policy.current().masker.clone(),
        ));
    }

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    masking::respond(masking, parts, body).await
}

/// Refuses a request whose Content-Length is over `limit` at once, but keeps reading
/// (and dropping) what the client is still sending, bounded: over HTTP/2 an unread
/// request body resets the stream and the client would see a framing error instead of
/// the Status.
fn within_body_limit(
    request: Request<Incoming>,
    limit: usize,
) -> Result<Request<Incoming>, Box<Status>> {
    match content_length(request.headers()) {
        Some(length) if length > limit as u64 => {
            tokio::spawn(discard(request.into_body(), length.min(DISCARD_LIMIT)));
            Err(Box::new(Status::request_entity_too_large(limit)))
        }
        _ => Ok(request),
    }
}

/// At most this much of a refused body is read and dropped.
const DISCARD_LIMIT: u64 = 64 * 1024 * 1024;

async fn discard(mut body: Incoming, mut budget: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while budget > 0 {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                budget = budget.saturating_sub(n.max(1));
            }
            _ => return,
        }
    }
}

/// After `101 Switching Protocols` both sides speak the upgraded protocol (SPDY or
/// WebSocket): relay the bytes both ways until either side closes, recording the
/// terminal's frames (exec, attach) when the session is recorded.
fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    mut response: Response<Incoming>,
    connection: &ConnectionInfo,
    request_id: &str,
    info: &RequestInfo,
    masker: std::sync::Arc<crate::masking::Masker>,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut response);
    let header = |name: http::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let protocol = StreamProtocol::negotiated(
        header(http::header::UPGRADE).as_deref(),
        header(http::header::SEC_WEBSOCKET_PROTOCOL).as_deref(),
        Some(info.subresource.as_str()),
    );
    let stream = connection.recording.stream(request_id, &protocol);
    tokio::spawn(
        async move {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(%err, "upgrade failed");
                    return;
                }
            };
            let client = hyper_util::rt::TokioIo::new(client);
            let upstream = hyper_util::rt::TokioIo::new(upstream);
            let (to_server, to_client) = RemoteCommandTap::pair(stream);
            // Secrets a terminal shows (a key printed with cat, a token pasted) are
            // masked in the recording as the policy's detectors find them.
            let (to_server, to_client) =
                (to_server.masking(masker.clone()), to_client.masking(masker));
            match splice_recorded(client, upstream, to_server, to_client).await {
                Ok((to_server, to_client)) => info!(to_server, to_client, "upgraded stream closed"),
                Err(err) => info!(%err, "upgraded stream ended"),
            }
        }
        .in_current_span(),
    );
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, empty())
}

/// Upgrades and calls that stay open get connections of their own upstream.
fn route(info: &RequestInfo, upgrade: bool) -> Route {
    if upgrade {
        Route::Upgrade
    } else if info.verb == "watch" || matches!(info.subresource.as_str(), "log" | "proxy") {
        Route::LongRunning
    } else {
        Route::Pooled
    }
}

/// The verbs whose body becomes stored state.
fn is_write(info: &RequestInfo) -> bool {
    matches!(info.verb.as_str(), "create" | "update" | "patch")
}

/// A request body that fails (so the upstream request is abandoned, never completed)
/// as soon as it shows Tollgate's mask marker.
struct MarkerGuard {
    inner: ProxyBody,
    scan: masking::MarkerScan,
    found: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::body::Body for MarkerGuard {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let data = data.clone();
                if self.scan.push(&data) {
                    self.found.store(true, std::sync::atomic::Ordering::Relaxed);
                    return std::task::Poll::Ready(Some(Err(
                        "the request carries a masked value".into()
                    )));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The client's `Audit-ID` when it is a sane token, else a new one. (The API server
/// accepts a client's Audit-ID the same way.)
fn audit_id(headers: &HeaderMap) -> String {
    headers
        .get(AUDIT_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .map(str::to_owned)
        .unwrap_or_else(new_uuid)
}

/// A new request id in UUID form: 8 random bytes drawn once per process, then a
/// counter. Ids must be unique, not secret; reading the kernel's random source on every
/// request cost measurable time under load.
fn new_uuid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 8];
        random_fill(&mut bytes);
        u64::from_le_bytes(bytes)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&prefix.to_be_bytes());
    bytes[8..].copy_from_slice(&n.to_be_bytes());
    // Version 4 and the RFC 4122 variant, so tools that parse UUIDs accept it.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn random_fill(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}

fn subject(info: &RequestInfo) -> Subject<'_> {
    Subject {
        group: &info.api_group,
        resource: &info.resource,
        name: &info.name,
    }
}

fn full(bytes: Vec<u8>) -> ProxyBody {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc.def"));
        assert_eq!(bearer_token(&h), Some("abc.def"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz "));
        assert_eq!(bearer_token(&h), Some("xyz"));
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        assert_eq!(bearer_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn audit_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(AUDIT_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(audit_id(&h), "abc-123");
        h.insert(AUDIT_ID, HeaderValue::from_static("bad id\"with quotes"));
        let id = audit_id(&h);
        assert_eq!(id.len(), 36);
        assert_ne!(id, audit_id(&HeaderMap::new()));
    }

    #[test]
    fn upgrades_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(!is_upgrade(&h));
        h.insert(http::header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(is_upgrade(&h));
        let mut stripped = h.clone();
        strip_hop_by_hop(&mut stripped, true);
        assert!(stripped.contains_key(http::header::UPGRADE));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(http::header::UPGRADE));
        assert!(!h.contains_key(http::header::CONNECTION));
    }
}
