//! Holding one call for approval (DESIGN §5), between "the policy says approve" and
//! "send it to the API server".
//!
//! 1. The body is read whole (bounded) and fingerprinted with the user, method and
//!    URI: a client that sends the same call again (retry mode, or after a hold
//!    timed out) finds the approval it already has instead of making a new one.
//! 2. A server-side dry-run (`dryRun=All`) with the caller's own token: what the API
//!    server would refuse (schema, admission, RBAC, a typo) is answered at once with
//!    the API server's own response, and no reviewer sees it. Otherwise the object it
//!    would produce and a diff against the live object go into the approval.
//! 3. The approval is stored and announced; then the client either waits (hold) or is
//!    told to come back (retry: 429 + Retry-After).
//! 4. Once approved, the call is claimed in the store (so it runs exactly once, even
//!    with several agents sharing the Kubernetes store) and sent: with the caller's
//!    own credentials, or as the rule's `executeAs` service account with the agent's.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tracing::{info, warn};

use super::classify::RequestInfo;
use super::handler::ConnectionInfo;
use super::upstream::{BoxError, ProxyBody, Route, Upstream};
use crate::approvals::model::{
    format_rfc3339, now_rfc3339, parse_rfc3339, ApprovalSpec, ApprovalStatus, DecisionError,
    DryRun, Execution, HeldRequest, Requester,
};
use crate::approvals::{ApprovalRequest, Mode, State, Store};
use crate::identity::UserInfo;
use crate::masking::{Context as MaskContext, Masker, MaskingConfig};
use crate::metrics::{ApprovalLabels, Metrics};
use crate::policy::ApprovalRule;
use crate::status::{Status, StatusDetails, Subject};

/// The largest dry-run object kept in an approval (a Kubernetes store object must
/// stay well under etcd's 1.5 MiB limit).
const MAX_PREVIEW_OBJECT_BYTES: usize = 256 * 1024;
/// The largest diff kept.
const MAX_DIFF_BYTES: usize = 128 * 1024;
/// The most of a dry-run or live-object answer read.
const MAX_PREVIEW_READ_BYTES: usize = 8 * 1024 * 1024;

/// Called with each new approval (the webhook notifier).
pub type OnCreated = Arc<dyn Fn(&ApprovalRequest) + Send + Sync>;

/// What approvals need, shared by every connection.
pub struct ApprovalGate {
    pub store: Store,
    /// This agent's node (recorded on approvals and executions).
    pub node: String,
    /// The agent's own API client: runs approved calls of `executeAs` rules.
    pub executor: Option<kube::Client>,
    pub on_created: Option<OnCreated>,
    pub metrics: Metrics,
    masker: Masker,
}

impl ApprovalGate {
    pub fn new(
        store: Store,
        node: String,
        executor: Option<kube::Client>,
        on_created: Option<OnCreated>,
        metrics: Metrics,
    ) -> ApprovalGate {
        // The default masking (Secret values, last-applied annotations, detectors) is
        // always valid; a preview is masked so an approval never stores a secret.
        let masker = Masker::new(&MaskingConfig::default())
            .unwrap_or_else(|err| unreachable!("the default masking config is valid: {err}"));
        ApprovalGate {
            store,
            node,
            executor,
            on_created,
            metrics,
            masker,
        }
    }
}

/// One call the policy wants approved, as the handler hands it over.
pub struct HeldCall<'a> {
    /// Method, URI and the headers to send upstream (hop-by-hop removed, Audit-ID and
    /// X-Forwarded-For set, the caller's Authorization kept).
    pub parts: &'a http::request::Parts,
    pub body: Bytes,
    pub info: &'a RequestInfo,
    pub user: &'a UserInfo,
    pub connection: &'a ConnectionInfo,
    pub request_id: &'a str,
    pub rule_name: &'a str,
    pub rule: &'a ApprovalRule,
    /// An exec/attach/port-forward: no body, no dry-run, and only hold mode makes
    /// sense (clients do not retry upgrades).
    pub upgrade: bool,
}

/// How the gate ended for this call.
pub enum Gated {
    /// Approved and claimed: the caller sends the call now (see [`ApprovalGate::execute`]).
    Proceed(Box<ApprovalRequest>),
    /// Answered without running the call (a Status, or the API server's own refusal
    /// of the dry-run).
    Answered(Response<ProxyBody>),
    /// Refused by Tollgate; the approval it concerns.
    Refused(Status, String),
}

impl ApprovalGate {
    /// Finds or makes the approval for `call` and waits for it as the rule says.
    pub async fn admit(&self, upstream: &Upstream, call: &HeldCall<'_>) -> Result<Gated, Status> {
        let fingerprint = fingerprint(call);
        // Subscribe before looking, so a decision made in between is not missed.
        let changes = self.store.subscribe();
        let existing = self
            .store
            .find_by_fingerprint(&fingerprint)
            .await
            .map_err(store_unavailable)?;
        let now = time::OffsetDateTime::now_utc();
        for approval in existing {
            if approval.spec.requester.user != call.user.username {
                continue;
            }
            let expired = parse_rfc3339(&approval.spec.expires_at).is_some_and(|t| t <= now);
            match approval.status.state {
                State::Pending if !expired => {
                    info!(approval = %approval.id, "the same call again: still pending");
                    return Ok(self.wait(call, approval, changes).await);
                }
                State::Approved if approval.status.execution.is_none() && !expired => {
                    info!(approval = %approval.id, "the same call again: approved");
                    return Ok(self.claim(&approval.id).await);
                }
                State::Denied if !expired => {
                    self.count("denied");
                    return Ok(Gated::Refused(ended(call.info, &approval), approval.id));
                }
                _ => {}
            }
        }

        // A new approval: first ask the API server whether the call would work at all.
        let dry_run = if call.upgrade {
            None
        } else {
            match self.dry_run(upstream, call).await? {
                Preview::Refused(response) => {
                    self.count("refused_by_dry_run");
                    info!("the dry-run was refused; answered without an approval");
                    return Ok(Gated::Answered(response));
                }
                Preview::Accepted(dry_run) => Some(dry_run),
            }
        };
        let approval = self.new_approval(call, fingerprint, dry_run, now);
        let approval = self
            .store
            .create(approval)
            .await
            .map_err(store_unavailable)?;
        self.count("created");
        info!(
            approval = %approval.id,
            rule = call.rule_name,
            mode = ?call.rule.mode,
            "held for approval"
        );
        if let Some(on_created) = &self.on_created {
            on_created(&approval);
        }
        Ok(self.wait(call, approval, changes).await)
    }

    fn new_approval(
        &self,
        call: &HeldCall<'_>,
        fingerprint: String,
        dry_run: Option<DryRun>,
        now: time::OffsetDateTime,
    ) -> ApprovalRequest {
        let expires = now + call.rule.expire_after;
        let info = call.info;
        let content_type = call
            .parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        ApprovalRequest {
            id: crate::approvals::model::new_id(),
            spec: ApprovalSpec {
                requester: Requester {
                    user: call.user.username.clone(),
                    uid: call.user.uid.clone(),
                    groups: call.user.groups.clone(),
                    pod_namespace: call.connection.pod.namespace.clone(),
                    pod_name: call.connection.pod.name.clone(),
                    node: self.node.clone(),
                    session: call.connection.session.clone(),
                },
                request: HeldRequest {
                    audit_id: call.request_id.to_owned(),
                    verb: info.verb.clone(),
                    method: call.parts.method.to_string(),
                    uri: uri_text(&call.parts.uri),
                    api_group: info.api_group.clone(),
                    api_version: info.api_version.clone(),
                    resource: info.resource.clone(),
                    subresource: info.subresource.clone(),
                    namespace: info.namespace.clone(),
                    name: info.name.clone(),
                    content_type: content_type.to_owned(),
                    body_sha256: hex(&Sha256::digest(&call.body)),
                    fingerprint,
                },
                rule: call.rule_name.to_owned(),
                mode: if call.upgrade {
                    Mode::Hold
                } else {
                    call.rule.mode
                },
                execute_as: call
                    .rule
                    .execute_as
                    .as_ref()
                    .map(|(ns, name)| format!("{ns}/{name}")),
                steps: call.rule.steps.clone(),
                created_at: format_rfc3339(now),
                expires_at: format_rfc3339(expires),
                dry_run,
            },
            status: ApprovalStatus::default(),
        }
    }

    /// Retry mode: tell the client to come back. Hold mode: wait for the decision.
    async fn wait(
        &self,
        call: &HeldCall<'_>,
        approval: ApprovalRequest,
        mut changes: broadcast::Receiver<ApprovalRequest>,
    ) -> Gated {
        let mode = if call.upgrade {
            Mode::Hold
        } else {
            call.rule.mode
        };
        if mode == Mode::Retry {
            let status = come_back(call, &approval.id, "waits for approval");
            return Gated::Refused(status, approval.id);
        }
        let id = approval.id.clone();
        let mut cancel = CancelOnDrop {
            store: self.store.clone(),
            id: id.clone(),
            armed: true,
            metrics: self.metrics.clone(),
        };
        self.metrics.approvals_held.inc();
        let _held = DecOnDrop(self.metrics.approvals_held.clone());
        let deadline = tokio::time::Instant::now() + call.rule.hold_timeout;
        let mut current = approval;
        loop {
            if current.status.state.is_final() {
                cancel.armed = false;
                break;
            }
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(changed) if changed.id == id => current = changed,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed some changes: read this one afresh.
                        match self.store.get(&id).await {
                            Ok(Some(fresh)) => current = fresh,
                            Ok(None) => {
                                cancel.armed = false;
                                let status = Status::internal_error(format!(
                                    "approval {id} disappeared from the store"
                                ));
                                return Gated::Refused(status, id);
                            }
                            Err(err) => warn!(%err, "re-reading a held approval"),
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        cancel.armed = false;
                        let status = Status::service_unavailable(
                            "the approval store stopped; try again",
                        );
                        return Gated::Refused(status, id);
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // Still pending: the approval stays, and the same call sent again
                    // finds it (client-go and kube-rs retry a 429 by themselves).
                    cancel.armed = false;
                    self.count("hold_timeout");
                    let status = come_back(call, &id, "is still waiting for approval");
                    return Gated::Refused(status, id);
                }
            }
        }
        match current.status.state {
            State::Approved => self.claim(&id).await,
            state => {
                self.count(match state {
                    State::Denied => "denied",
                    State::Expired => "expired",
                    _ => "cancelled",
                });
                Gated::Refused(ended(call.info, &current), id)
            }
        }
    }

    /// Marks an approved call as being executed by this agent; only one claim wins.
    async fn claim(&self, id: &str) -> Gated {
        let node = self.node.clone();
        let at = now_rfc3339();
        let claimed = self
            .store
            .update(id, |approval| {
                if approval.status.state != State::Approved {
                    return Err(DecisionError::NotApproved {
                        id: approval.id.clone(),
                        state: approval.status.state,
                    });
                }
                if let Some(done) = &approval.status.execution {
                    return Err(DecisionError::AlreadyExecuted {
                        id: approval.id.clone(),
                        at: done.at.clone(),
                    });
                }
                approval.status.execution = Some(Execution {
                    at: at.clone(),
                    node: node.clone(),
                    code: 0,
                });
                Ok(())
            })
            .await;
        match claimed {
            Ok(approval) => {
                self.count("executed");
                info!(approval = %approval.id, "approved; sending the call");
                Gated::Proceed(Box::new(approval))
            }
            Err(crate::approvals::StoreError::Rejected(reason)) => Gated::Refused(
                Status::failure(409, "Conflict", format!("Tollgate: {reason}")),
                id.to_owned(),
            ),
            Err(err) => Gated::Refused(store_unavailable(err), id.to_owned()),
        }
    }

    /// Sends an approved, claimed call (not an upgrade) and notes the API server's
    /// answer code on the approval.
    pub async fn execute(
        &self,
        upstream: &Upstream,
        original_dst: SocketAddr,
        call: &HeldCall<'_>,
        approval: &ApprovalRequest,
    ) -> Result<Response<ProxyBody>, Status> {
        let response = match &call.rule.execute_as {
            None => {
                let request = rebuild(call.parts, call.body.clone());
                upstream
                    .send(original_dst, request, Route::Pooled)
                    .await
                    .map_err(|err| Status::service_unavailable(err.to_string()))?
                    .map(|body| body.map_err(BoxError::from).boxed())
            }
            Some(_) => {
                let (mut head, bytes) = self
                    .send_collected(upstream, call, call.parts.clone(), call.body.clone())
                    .await?;
                let bytes = bytes.ok_or_else(|| {
                    Status::internal_error("the API server's answer was too large to relay")
                })?;
                head.headers.remove(http::header::CONTENT_LENGTH);
                super::upstream::strip_hop_by_hop(&mut head.headers, false);
                Response::from_parts(head, full(bytes))
            }
        };
        let code = response.status().as_u16();
        let store = self.store.clone();
        let id = approval.id.clone();
        tokio::spawn(async move {
            let noted = store
                .update(&id, |a| {
                    if let Some(execution) = a.status.execution.as_mut() {
                        execution.code = code;
                    }
                    Ok(())
                })
                .await;
            if let Err(err) = noted {
                warn!(approval = %id, %err, "could not note the executed call's status code");
            }
        });
        info!(approval = %approval.id, code, "approved call sent");
        Ok(response)
    }

    /// Sends a request as the account that would run the approved call, and reads the
    /// answer whole (bounded; `None` when larger): the caller's own token, or, for an
    /// `executeAs` rule, the agent's credential impersonating the named service account
    /// (so the dry-run judges the call as it will really run).
    async fn send_collected(
        &self,
        upstream: &Upstream,
        call: &HeldCall<'_>,
        parts: http::request::Parts,
        body: Bytes,
    ) -> Result<(http::response::Parts, Option<Bytes>), Status> {
        let Some((namespace, name)) = &call.rule.execute_as else {
            let request = Request::from_parts(parts, full(body));
            let response = upstream
                .send(call.connection.original_dst, request, Route::Pooled)
                .await
                .map_err(|err| Status::service_unavailable(err.to_string()))?;
            let (head, body) = response.into_parts();
            return Ok((head, read_bounded(body).await));
        };
        let client = self.executor.as_ref().ok_or_else(|| {
            Status::service_unavailable(
                "executeAs needs the agent's API client, which is not configured",
            )
        })?;
        let mut builder = Request::builder()
            .method(parts.method.clone())
            .uri(uri_text(&parts.uri));
        for (header, value) in &parts.headers {
            // The caller's credential must not travel with the agent's.
            if header != AUTHORIZATION && !header.as_str().starts_with("impersonate-") {
                builder = builder.header(header, value);
            }
        }
        let request = builder
            .header(
                "Impersonate-User",
                format!("system:serviceaccount:{namespace}:{name}"),
            )
            .body(kube::client::Body::from(body.to_vec()))
            .map_err(|err| Status::internal_error(format!("building the call: {err}")))?;
        let response = client.send(request).await.map_err(|err| {
            Status::service_unavailable(format!("sending as {namespace}/{name}: {err}"))
        })?;
        // kube's body is not Sync, which the proxy's boxed body must be: read it here.
        let (head, body) = response.into_parts();
        let bytes = Limited::new(body, MAX_PREVIEW_READ_BYTES)
            .collect()
            .await
            .ok()
            .map(|collected| collected.to_bytes());
        Ok((head, bytes))
    }

    /// The server-side dry-run, and the live object to diff against.
    async fn dry_run(&self, upstream: &Upstream, call: &HeldCall<'_>) -> Result<Preview, Status> {
        let mut parts = call.parts.clone();
        parts.uri = with_dry_run(&parts.uri)
            .ok_or_else(|| Status::bad_request("the request URI cannot carry a dry-run"))?;
        ask_for_json(&mut parts.headers);
        let (head, bytes) = self
            .send_collected(upstream, call, parts, call.body.clone())
            .await?;
        if !head.status.is_success() {
            // The API server's own answer, as it gave it: kubectl prints exactly what
            // it would have printed without Tollgate.
            let bytes = bytes.unwrap_or_default();
            let mut response = Response::from_parts(head, full(bytes));
            super::upstream::strip_hop_by_hop(response.headers_mut(), false);
            response.headers_mut().remove(http::header::CONTENT_LENGTH);
            return Ok(Preview::Refused(response));
        }
        let mut note = String::new();
        let after = match bytes {
            Some(bytes) => serde_json::from_slice::<Value>(&bytes).ok(),
            None => {
                note.push_str("the dry-run result was too large to show; ");
                None
            }
        };
        let before = if call.info.verb == "create" {
            None
        } else {
            match self.live_object(upstream, call).await {
                Ok(live) => live,
                Err(why) => {
                    note.push_str(&why);
                    note.push_str("; ");
                    None
                }
            }
        };
        let kind = kind_hint(call.info);
        let after = after.map(|v| self.clean(v, kind));
        let before = before.map(|v| self.clean(v, kind));
        // A delete's dry-run answers with the object as it is (or a Status): the
        // change is that the live object goes away.
        let after_for_diff = if call.info.verb == "delete" || call.info.verb == "deletecollection" {
            None
        } else {
            after.clone()
        };
        let mut diff = unified_diff(before.as_ref(), after_for_diff.as_ref());
        if diff.len() > MAX_DIFF_BYTES {
            let mut cut = MAX_DIFF_BYTES;
            while !diff.is_char_boundary(cut) {
                cut -= 1;
            }
            diff.truncate(cut);
            note.push_str("the diff was cut short; ");
        }
        let object = after.filter(|v| {
            let small = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
                <= MAX_PREVIEW_OBJECT_BYTES;
            if !small {
                note.push_str("the resulting object is too large to keep; ");
            }
            small
        });
        Ok(Preview::Accepted(DryRun {
            object,
            diff,
            note: note.trim_end_matches("; ").to_owned(),
        }))
    }

    /// GET of the object the call changes, with the caller's token.
    async fn live_object(
        &self,
        upstream: &Upstream,
        call: &HeldCall<'_>,
    ) -> Result<Option<Value>, String> {
        let mut parts = call.parts.clone();
        parts.method = http::Method::GET;
        parts.uri = call
            .parts
            .uri
            .path()
            .parse()
            .map_err(|_| "the live object's path is not a URI".to_owned())?;
        parts.headers.remove(CONTENT_TYPE);
        parts.headers.remove(http::header::CONTENT_LENGTH);
        ask_for_json(&mut parts.headers);
        let (head, bytes) = self
            .send_collected(upstream, call, parts, Bytes::new())
            .await
            .map_err(|err| format!("the live object could not be read: {}", err.message))?;
        match head.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            code => {
                return Err(format!(
                "the live object could not be read by the account that would run the call ({code})"
            ))
            }
        }
        let bytes = bytes.ok_or_else(|| "the live object is too large to show".to_owned())?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| "the live object is not JSON".to_owned())
    }

    /// Masks secret values and drops what only adds noise to a review.
    fn clean(&self, mut value: Value, kind: Option<&str>) -> Value {
        let ctx = MaskContext {
            kind: kind.map(str::to_owned),
        };
        if let Err(err) = self.masker.mask_value(&mut value, &ctx) {
            // Never keep what could not be masked.
            return Value::String(format!("(not shown: {err})"));
        }
        strip_noise(&mut value);
        value
    }

    fn count(&self, event: &'static str) {
        self.metrics
            .approvals
            .get_or_create(&ApprovalLabels { event })
            .inc();
    }
}

enum Preview {
    Accepted(DryRun),
    Refused(Response<ProxyBody>),
}

/// Marks a held approval Cancelled when the client goes away (hyper drops the
/// request's future), unless it ended otherwise first.
struct CancelOnDrop {
    store: Store,
    id: String,
    armed: bool,
    metrics: Metrics,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let store = self.store.clone();
        let id = std::mem::take(&mut self.id);
        let metrics = self.metrics.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let now = now_rfc3339();
            let result = store
                .update(&id, |a| {
                    a.finish(
                        State::Cancelled,
                        "the client went away while its call was held".to_owned(),
                        &now,
                    );
                    Ok(())
                })
                .await;
            match result {
                Ok(a) => {
                    if a.status.state == State::Cancelled {
                        metrics
                            .approvals
                            .get_or_create(&ApprovalLabels { event: "cancelled" })
                            .inc();
                    }
                    info!(approval = %id, state = %a.status.state, "held call's client went away")
                }
                Err(err) => warn!(approval = %id, %err, "could not cancel a held approval"),
            }
        });
    }
}

struct DecOnDrop(prometheus_client::metrics::gauge::Gauge);

impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The same call, as far as approvals are concerned: same user, method, URI, body.
fn fingerprint(call: &HeldCall<'_>) -> String {
    let mut hash = Sha256::new();
    for part in [
        call.user.username.as_bytes(),
        call.parts.method.as_str().as_bytes(),
        uri_text(&call.parts.uri).as_bytes(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(&call.body);
    hex(&hash.finalize())
}

/// 429 naming the approval: client-go and kube-rs wait Retry-After and send the call
/// again; a person sees how to review it.
fn come_back(call: &HeldCall<'_>, id: &str, what: &str) -> Status {
    let seconds = call.rule.retry_after.as_secs().clamp(1, u32::MAX as u64) as u32;
    let target = match (call.info.resource.as_str(), call.info.name.as_str()) {
        ("", _) => call.info.path.clone(),
        (resource, "") => resource.to_owned(),
        (resource, name) => format!("{resource} {name:?}"),
    };
    Status::failure(
        429,
        "TooManyRequests",
        format!(
            "Tollgate: this {} of {target} {what} {id} (policy rule {:?}); review it with `gateway-agent approvals show {id}`; the same call sent again after approval goes through once",
            call.info.verb, call.rule_name
        ),
    )
    .with_details(StatusDetails {
        name: id.to_owned(),
        group: "tollgate.dev".to_owned(),
        kind: "approvalrequests".to_owned(),
        retry_after_seconds: Some(seconds),
        ..StatusDetails::default()
    })
}

/// 403 for an approval that ended without approval.
fn ended(info: &RequestInfo, approval: &ApprovalRequest) -> Status {
    let subject = Subject {
        group: &info.api_group,
        resource: &info.resource,
        name: &info.name,
    };
    let why = match approval.status.state {
        State::Denied => format!(
            "Tollgate approval {} was {}",
            approval.id, approval.status.message
        ),
        state => format!(
            "Tollgate approval {} ended {}: {}",
            approval.id,
            state.as_str().to_lowercase(),
            approval.status.message
        ),
    };
    Status::forbidden(&subject, &why)
}

fn store_unavailable(err: crate::approvals::StoreError) -> Status {
    warn!(%err, "approval store");
    Status::service_unavailable(format!("Tollgate cannot reach its approval store: {err}"))
}

fn with_dry_run(uri: &http::Uri) -> Option<http::Uri> {
    let path = uri.path();
    let text = match uri.query() {
        Some(q) if !q.is_empty() => {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| !kv.starts_with("dryRun="))
                .collect();
            if kept.is_empty() {
                format!("{path}?dryRun=All")
            } else {
                format!("{path}?{}&dryRun=All", kept.join("&"))
            }
        }
        _ => format!("{path}?dryRun=All"),
    };
    text.parse().ok()
}

/// The preview and the diff need JSON, uncompressed, whatever the client asked for.
fn ask_for_json(headers: &mut http::HeaderMap) {
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.remove(ACCEPT_ENCODING);
}

fn rebuild(parts: &http::request::Parts, body: Bytes) -> Request<ProxyBody> {
    let mut request = Request::new(full(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.headers_mut() = parts.headers.clone();
    request
}

async fn read_bounded(body: hyper::body::Incoming) -> Option<Bytes> {
    Limited::new(body, MAX_PREVIEW_READ_BYTES)
        .collect()
        .await
        .ok()
        .map(|collected| collected.to_bytes())
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn uri_text(uri: &http::Uri) -> String {
    uri.path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| uri.path().to_owned())
}

fn kind_hint(info: &RequestInfo) -> Option<&'static str> {
    (info.api_group.is_empty() && info.resource == "secrets").then_some("Secret")
}

/// Fields every write changes or that only the server keeps: they would bury the
/// change a reviewer has to judge.
fn strip_noise(value: &mut Value) {
    if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
        items.iter_mut().for_each(strip_noise);
    }
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["managedFields", "resourceVersion", "generation"] {
            meta.remove(field);
        }
    }
}

/// A unified diff of the two objects as YAML.
pub fn unified_diff(before: Option<&Value>, after: Option<&Value>) -> String {
    let yaml = |v: Option<&Value>| {
        v.map(|v| serde_saphyr::to_string(v).unwrap_or_else(|err| format!("# not shown: {err}\n")))
            .unwrap_or_default()
    };
    let (old, new) = (yaml(before), yaml(after));
    similar::TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(4)
        .header(
            if before.is_some() {
                "live"
            } else {
                "/dev/null"
            },
            if after.is_some() {
                "after"
            } else {
                "/dev/null"
            },
        )
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_is_added_once_to_the_query() {
        let uri: http::Uri = "/api/v1/namespaces/a/configmaps?fieldManager=kubectl&dryRun=Bad"
            .parse()
            .unwrap();
        assert_eq!(
            with_dry_run(&uri).unwrap().to_string(),
            "/api/v1/namespaces/a/configmaps?fieldManager=kubectl&dryRun=All"
        );
        let uri: http::Uri = "/api/v1/namespaces/a/configmaps".parse().unwrap();
        assert_eq!(
            with_dry_run(&uri).unwrap().to_string(),
            "/api/v1/namespaces/a/configmaps?dryRun=All"
        );
    }

    #[test]
    fn diffs_show_the_change_without_server_noise() {
        let mut before = serde_json::json!({
            "metadata": {"name": "web", "resourceVersion": "1", "managedFields": [{}]},
            "spec": {"replicas": 1}
        });
        let mut after = serde_json::json!({
            "metadata": {"name": "web", "resourceVersion": "2", "generation": 2},
            "spec": {"replicas": 3}
        });
        strip_noise(&mut before);
        strip_noise(&mut after);
        let diff = unified_diff(Some(&before), Some(&after));
        assert!(diff.contains("--- live"), "{diff}");
        assert!(diff.contains("-  replicas: 1"), "{diff}");
        assert!(diff.contains("+  replicas: 3"), "{diff}");
        assert!(!diff.contains("resourceVersion"), "{diff}");
        let created = unified_diff(None, Some(&after));
        assert!(created.contains("--- /dev/null"), "{created}");
        assert!(created.lines().filter(|l| l.starts_with('+')).count() > 3);
    }
}
