//! Masking on the proxy's allow path (DESIGN §6): what an enforced pod reads from the
//! API server goes through the policy's [`Masker`] before it leaves the proxy.
//!
//! What needs masking: every resource request (`/api/...`, `/apis/<group>/<version>/...`)
//! except the few whose answer is not a Kubernetes object — `pods/log` (text),
//! exec/attach/port-forward (upgrades, policed by the policy like any call) and `proxy`
//! (the proxied server's own bytes). Non-resource paths (`/version`, `/openapi/...`,
//! discovery) pass through untouched. Every other answer is masked, whatever the verb
//! and the kind: a create, an update or a delete answers with the object too, and the
//! masker is cheap on objects with nothing to mask (an object whose masking changed
//! nothing is forwarded byte for byte). The cost is measured by `cargo xtask bench`.
//! Consequences worth knowing: a token an enforced pod asks for (`serviceaccounts/token`,
//! `kubectl create token`) comes back masked by the token detector; `pods/log` and the
//! `proxy` subresources are not inspected, so a policy for agents should deny what they
//! must not read there.
//!
//! For such a request, [`prepare`] (before forwarding):
//! - refuses at once (403, naming the rule) when a masking rule refuses the kind
//!   outright (`secrets: refuse`, or a rule without a path): every verb, since writes
//!   and deletes answer with the object as well;
//! - refuses an upgrade (a watch over WebSocket): its frames could not be inspected;
//! - asks upstream for JSON only: `Accept` is rewritten to JSON media types, keeping
//!   parameters such as `;as=Table;v=v1;g=meta.k8s.io` and `;stream=watch`; protobuf and
//!   YAML entries become the JSON type with the same parameters (a YAML client can read
//!   JSON, which YAML contains; client-go decodes by the answer's Content-Type, so a
//!   typed client configured for protobuf gets JSON and works);
//! - drops `Accept-Encoding`, so the API server answers uncompressed.
//!
//! And [`respond`] (after): an answer whose Content-Type is not `application/json`, or
//! that is encoded (gzip) after all, is refused with a Status and never passed through
//! unread; a JSON answer is masked by a [`StreamMasker`] frame by frame as it arrives
//! (the watch format for a successful watch), `Content-Length` dropped. Memory is
//! bounded by the largest single object or event (see [`crate::masking::stream`]).
//!
//! A document is read until its first masked bytes exist before the response head is
//! sent, so a single object that cannot be masked becomes a clean Status; a list that
//! fails after its first items were sent, or a watch that fails after its first event,
//! is cut off (the client sees a broken stream, never an unmasked value).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use tracing::{debug, warn};

use super::classify::RequestInfo;
use super::upstream::{BoxError, ProxyBody};
use crate::masking::{BodyFormat, Context, MaskError, MaskStats, Masker, StreamMasker};
use crate::metrics::{MaskRefusalLabels, MaskedLabels, Metrics};
use crate::status::{Status, StatusDetails, Subject};

/// Subresources whose answer is not a Kubernetes object: passed through.
const UNMASKED_SUBRESOURCES: &[&str] = &["log", "exec", "attach", "portforward", "proxy"];

/// How one response will be masked, decided before the request is forwarded.
pub struct Plan {
    masker: Arc<Masker>,
    /// The kind the request is about (the masker's hint for objects that do not say).
    kind: String,
    watch: bool,
    /// A HEAD request: the answer has no body.
    head: bool,
    group: String,
    resource: String,
    name: String,
    metrics: Metrics,
    /// The request's span: the body is masked after the handler has returned.
    span: tracing::Span,
}

impl Plan {
    fn subject(&self) -> Subject<'_> {
        Subject {
            group: &self.group,
            resource: &self.resource,
            name: &self.name,
        }
    }

    fn refused(&self, reason: &'static str) {
        self.metrics
            .masking_refusals
            .get_or_create(&MaskRefusalLabels { reason })
            .inc();
    }

    /// The Status for a body that could not be masked before anything was sent.
    fn status_for(&self, err: &MaskError) -> Status {
        match err {
            MaskError::Refused { .. } => {
                self.refused("rule");
                Status::forbidden(&self.subject(), &format!("Tollgate masking: {err}"))
            }
            _ => {
                self.refused("uninspectable");
                Status::failure(
                    err.http_status(),
                    "InternalError",
                    format!(
                        "Tollgate could not inspect the API server's answer, so it is not passed on: {err}"
                    ),
                )
            }
        }
    }
}

/// Whether the answer to this request is masked (see the module documentation).
pub fn needs_masking(info: &RequestInfo) -> bool {
    info.is_resource_request
        && info.verb != "proxy"
        && !UNMASKED_SUBRESOURCES.contains(&info.subresource.as_str())
}

/// Before forwarding: decides whether the answer is masked, refuses what a masking rule
/// refuses, and rewrites `headers` so that the API server answers in uncompressed JSON.
/// `None`: the request passes through untouched. A refusal is boxed: a Status is large
/// and the common outcome is a plan.
pub fn prepare(
    masker: &Arc<Masker>,
    info: &RequestInfo,
    method: &Method,
    upgrade: bool,
    headers: &mut HeaderMap,
    metrics: &Metrics,
) -> Result<Option<Plan>, Box<Status>> {
    if !needs_masking(info) {
        return Ok(None);
    }
    let kind = kind_of(&info.api_group, &info.resource);
    let plan = Plan {
        masker: masker.clone(),
        kind,
        watch: info.verb == "watch",
        head: *method == Method::HEAD,
        group: info.api_group.clone(),
        resource: info.resource.clone(),
        name: info.name.clone(),
        metrics: metrics.clone(),
        span: tracing::Span::current(),
    };
    let refusal = masker
        .refusal_for_kind(&plan.kind)
        .or_else(|| masker.refusal_for_resource(&info.api_group, &info.resource));
    if let Some(rule) = refusal {
        warn!(kind = %plan.kind, rule, "refused by a masking rule");
        plan.refused("rule");
        return Err(Box::new(Status::forbidden(
            &plan.subject(),
            &format!(
                "reading {} is refused by Tollgate masking rule {rule:?}",
                plan.kind
            ),
        )));
    }
    if upgrade {
        warn!(kind = %plan.kind, "an upgrade on a masked resource");
        plan.refused("upgrade");
        return Err(Box::new(Status::forbidden(
            &plan.subject(),
            "Tollgate masks what enforced pods read and cannot inspect an upgraded stream (a watch over WebSocket): use a plain HTTP watch",
        )));
    }
    let accept = json_accept(
        headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    headers.remove(ACCEPT);
    headers.insert(ACCEPT, accept);
    headers.remove(ACCEPT_ENCODING);
    Ok(Some(plan))
}

/// After: the response to send to the client. Without a plan, the upstream answer as it
/// came; with one, the masked answer or a Status.
pub async fn respond<B>(
    plan: Option<Plan>,
    mut parts: http::response::Parts,
    body: B,
) -> Result<Response<ProxyBody>, Status>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Some(plan) = plan else {
        return Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ));
    };
    let status = parts.status;
    let bodiless = plan.head
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
        || parts
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    if bodiless {
        // Nothing to read, nothing to leak.
        return Ok(Response::from_parts(parts, empty()));
    }
    if let Some(encoding) = parts.headers.get(CONTENT_ENCODING) {
        if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") {
            // Accept-Encoding was dropped; an encoded answer anyway is not forwarded
            // unread.
            warn!(encoding = ?encoding, "an encoded answer for a masked resource");
            plan.refused("encoded");
            return Err(Status::failure(
                502,
                "InternalError",
                format!(
                    "the API server's answer is encoded ({}), which Tollgate does not pass on uninspected",
                    String::from_utf8_lossy(encoding.as_bytes())
                ),
            ));
        }
    }
    if !is_json(&parts.headers) {
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "untyped".to_owned());
        warn!(%content_type, code = status.as_u16(), "a non-JSON answer for a masked resource");
        plan.refused("not_json");
        // An upstream error keeps its code (a client retries a 429 or a 503 as it
        // would have); its unreadable body does not reach the client.
        let code = if status.is_client_error() || status.is_server_error() {
            status.as_u16()
        } else {
            502
        };
        let mut refusal = Status::failure(
            code,
            reason_for(code),
            format!(
                "the API server answered {} with a {content_type} body, which Tollgate cannot inspect and does not pass on",
                status.as_u16()
            ),
        );
        // The handler turns this back into a Retry-After header.
        let retry_after = parts
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        if let Some(seconds) = retry_after {
            refusal = refusal.with_details(StatusDetails {
                retry_after_seconds: Some(seconds),
                ..StatusDetails::default()
            });
        }
        return Err(refusal);
    }
    parts.headers.remove(CONTENT_LENGTH);
    // A failed watch answers with one Status document, not a stream of events.
    let format = if plan.watch && status.is_success() {
        BodyFormat::WatchStream
    } else {
        BodyFormat::Document
    };
    let masker = StreamMasker::shared(plan.masker.clone(), format, Context::for_kind(&plan.kind));
    let mut masked = MaskedBody {
        inner: body,
        masker: Some(masker),
        pending: None,
        received: false,
        reported: MaskStats::default(),
        plan,
    };
    if format == BodyFormat::Document {
        // Read until the first masked bytes exist (a whole single object, or a list's
        // head) so that a failure so far is still a clean Status.
        loop {
            let frame = masked.inner.frame().await;
            match masked.step(frame) {
                Step::Continue => continue,
                Step::Output(bytes) => {
                    masked.pending = Some(bytes);
                    break;
                }
                Step::End => break,
                Step::Failed(Failure::Mask(err)) => return Err(masked.plan.status_for(&err)),
                Step::Failed(Failure::Upstream(err)) => {
                    return Err(Status::service_unavailable(format!(
                        "reading the API server's answer: {err}"
                    )))
                }
            }
        }
    }
    Ok(Response::from_parts(parts, masked.boxed()))
}

/// A response body masked as it streams.
struct MaskedBody<B> {
    inner: B,
    /// `None` once the body has ended (or failed).
    masker: Option<StreamMasker<'static>>,
    /// Masked bytes produced before the head was sent.
    pending: Option<Bytes>,
    /// Whether upstream sent any byte.
    received: bool,
    /// Counts already added to the metrics.
    reported: MaskStats,
    plan: Plan,
}

/// Why a body stopped.
enum Failure {
    Mask(MaskError),
    Upstream(BoxError),
}

/// What one upstream frame led to.
enum Step {
    /// Nothing to send yet.
    Continue,
    Output(Bytes),
    End,
    Failed(Failure),
}

impl<B> MaskedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Feeds one upstream frame (or the end of the body) to the masker.
    fn step(&mut self, frame: Option<Result<Frame<Bytes>, B::Error>>) -> Step {
        let Some(masker) = self.masker.as_mut() else {
            return Step::End;
        };
        let mut out = Vec::new();
        match frame {
            Some(Ok(frame)) => {
                // The API server sends no trailers; any would be dropped, not
                // forwarded uninspected.
                let Ok(data) = frame.into_data() else {
                    return Step::Continue;
                };
                self.received |= !data.is_empty();
                if let Err(err) = masker.push(&data, &mut out) {
                    self.masker = None;
                    return Step::Failed(Failure::Mask(err));
                }
                let stats = masker.stats();
                self.report(stats);
            }
            Some(Err(err)) => {
                self.masker = None;
                return Step::Failed(Failure::Upstream(err.into()));
            }
            None => {
                let Some(masker) = self.masker.take() else {
                    return Step::End;
                };
                let peak = masker.peak_buffered();
                if !self.received {
                    // An empty body: nothing to mask, nothing to send.
                    return Step::End;
                }
                match masker.finish(&mut out) {
                    Ok(stats) => {
                        self.report(stats);
                        let plan = &self.plan;
                        plan.span.in_scope(|| {
                            debug!(
                                kind = %plan.kind,
                                masked = stats.masked(),
                                secret_fields = stats.secret_fields,
                                annotations = stats.annotations,
                                rule_fields = stats.rule_fields,
                                detector_hits = stats.detector_hits,
                                objects = stats.objects,
                                peak_buffered = peak,
                                "answer masked"
                            )
                        });
                    }
                    Err(err) => return Step::Failed(Failure::Mask(err)),
                }
                if out.is_empty() {
                    return Step::End;
                }
                return Step::Output(Bytes::from(out));
            }
        }
        if out.is_empty() {
            Step::Continue
        } else {
            Step::Output(Bytes::from(out))
        }
    }

    /// Adds what was masked since the last report to the metrics (a watch reports as
    /// it goes, not only when it ends).
    fn report(&mut self, now: MaskStats) {
        let before = self.reported;
        if now.masked() == before.masked() {
            return;
        }
        for (cause, now, before) in [
            ("secret_data", now.secret_fields, before.secret_fields),
            ("last_applied", now.annotations, before.annotations),
            ("rule", now.rule_fields, before.rule_fields),
            ("detector", now.detector_hits, before.detector_hits),
        ] {
            if now > before {
                self.plan
                    .metrics
                    .masked_fields
                    .get_or_create(&MaskedLabels {
                        kind: self.plan.kind.clone(),
                        cause,
                    })
                    .inc_by(now - before);
            }
        }
        self.reported = now;
    }

    /// Logs why the stream was cut after part of it was sent.
    fn aborted(&self, failure: &Failure) {
        let plan = &self.plan;
        plan.span.in_scope(|| match failure {
            Failure::Mask(err) => {
                plan.refused("aborted");
                warn!(%err, kind = %plan.kind, "answer could not be masked mid-stream: cut off");
            }
            Failure::Upstream(err) => debug!(%err, "the API server's answer broke off"),
        });
    }
}

impl<B> Body for MaskedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(bytes) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        loop {
            if this.masker.is_none() {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => return Poll::Pending,
            };
            match this.step(frame) {
                Step::Continue => continue,
                Step::Output(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Step::End => return Poll::Ready(None),
                Step::Failed(failure) => {
                    // Part of the answer may be out: the only safe end is an error,
                    // which makes hyper reset the stream (or close the connection).
                    this.aborted(&failure);
                    let err: BoxError = match failure {
                        Failure::Mask(err) => Box::new(err),
                        Failure::Upstream(err) => err,
                    };
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.masker.is_none() && self.pending.is_none()
    }
}

/// `application/json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The `Accept` to send upstream for the client's: JSON media types only, in the
/// client's order, with their parameters (`as=Table;v=v1;g=meta.k8s.io`, `stream=watch`,
/// `q=`); protobuf and YAML entries become JSON with the same parameters; wildcards
/// become plain JSON; anything else is dropped. Never empty.
pub fn json_accept<'a>(values: impl Iterator<Item = &'a str>) -> HeaderValue {
    let mut kept: Vec<String> = Vec::new();
    for entry in values.flat_map(|v| v.split(',')) {
        let mut pieces = entry.split(';').map(str::trim);
        let media = pieces.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<&str> = pieces.filter(|p| !p.is_empty()).collect();
        let json = match media.as_str() {
            "application/json" | "application/vnd.kubernetes.protobuf" | "application/yaml" => true,
            "*/*" | "application/*" => {
                // A wildcard's only meaningful parameter is q.
                push_unique(&mut kept, "application/json".to_owned());
                continue;
            }
            _ => false,
        };
        if !json {
            continue;
        }
        let mut out = "application/json".to_owned();
        for p in params {
            out.push(';');
            out.push_str(p);
        }
        push_unique(&mut kept, out);
    }
    if kept.is_empty() {
        return HeaderValue::from_static("application/json");
    }
    HeaderValue::from_str(&kept.join(",")).unwrap_or(HeaderValue::from_static("application/json"))
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// The kind served at `group`/`resource`, for the masker's hint and for refusals by
/// kind. Built-in resources by name; any other resource gets `resource.group`, which
/// names it without ever being taken for a Secret (only the core `secrets` are).
pub fn kind_of(group: &str, resource: &str) -> String {
    let known = match (group, resource) {
        ("", "secrets") => "Secret",
        ("", "configmaps") => "ConfigMap",
        ("", "pods") => "Pod",
        ("", "podtemplates") => "PodTemplate",
        ("", "replicationcontrollers") => "ReplicationController",
        ("", "services") => "Service",
        ("", "endpoints") => "Endpoints",
        ("", "serviceaccounts") => "ServiceAccount",
        ("", "namespaces") => "Namespace",
        ("", "nodes") => "Node",
        ("", "events") => "Event",
        ("", "persistentvolumes") => "PersistentVolume",
        ("", "persistentvolumeclaims") => "PersistentVolumeClaim",
        ("", "limitranges") => "LimitRange",
        ("", "resourcequotas") => "ResourceQuota",
        ("apps", "deployments") => "Deployment",
        ("apps", "statefulsets") => "StatefulSet",
        ("apps", "daemonsets") => "DaemonSet",
        ("apps", "replicasets") => "ReplicaSet",
        ("apps", "controllerrevisions") => "ControllerRevision",
        ("batch", "jobs") => "Job",
        ("batch", "cronjobs") => "CronJob",
        ("events.k8s.io", "events") => "Event",
        ("rbac.authorization.k8s.io", "roles") => "Role",
        ("rbac.authorization.k8s.io", "rolebindings") => "RoleBinding",
        ("rbac.authorization.k8s.io", "clusterroles") => "ClusterRole",
        ("rbac.authorization.k8s.io", "clusterrolebindings") => "ClusterRoleBinding",
        ("networking.k8s.io", "ingresses") => "Ingress",
        ("networking.k8s.io", "networkpolicies") => "NetworkPolicy",
        ("policy", "poddisruptionbudgets") => "PodDisruptionBudget",
        ("autoscaling", "horizontalpodautoscalers") => "HorizontalPodAutoscaler",
        ("coordination.k8s.io", "leases") => "Lease",
        ("storage.k8s.io", "storageclasses") => "StorageClass",
        ("apiextensions.k8s.io", "customresourcedefinitions") => "CustomResourceDefinition",
        _ if group.is_empty() => return resource.to_owned(),
        _ => return format!("{resource}.{group}"),
    };
    known.to_owned()
}

/// The Kubernetes reason for an HTTP code, for Statuses that keep an upstream code.
fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

fn empty() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use http_body_util::StreamBody;
    use serde_json::{json, Value};

    use super::*;
    use crate::masking::{MaskingConfig, MASK_MARKER_BASE64};
    use crate::proxy::classify::classify;

    /// A value that must never come out.
    const REAL: &str = "aHVudGVyMi1yZWFsLXZhbHVl";

    type TestBody = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    fn body_of(chunks: Vec<Result<Bytes, &'static str>>) -> TestBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .into_iter()
            .map(|c| c.map(Frame::data).map_err(BoxError::from))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    fn chunked(text: &str, size: usize) -> TestBody {
        body_of(
            text.as_bytes()
                .chunks(size)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect(),
        )
    }

    fn info(method: &Method, path_and_query: &str) -> RequestInfo {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        classify(method, path, query).unwrap()
    }

    fn plan_for(masker: &Arc<Masker>, path: &str, metrics: &Metrics) -> Option<Plan> {
        let mut headers = HeaderMap::new();
        prepare(
            masker,
            &info(&Method::GET, path),
            &Method::GET,
            false,
            &mut headers,
            metrics,
        )
        .unwrap()
    }

    fn parts(code: u16, content_type: Option<&str>) -> http::response::Parts {
        let mut builder = Response::builder()
            .status(code)
            .header(CONTENT_LENGTH, "123");
        if let Some(t) = content_type {
            builder = builder.header(CONTENT_TYPE, t);
        }
        builder.body(()).unwrap().into_parts().0
    }

    async fn collect(response: Response<ProxyBody>) -> Result<(Vec<usize>, String), BoxError> {
        let mut body = response.into_body();
        let mut sizes = Vec::new();
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                sizes.push(data.len());
                text.extend_from_slice(&data);
            }
        }
        Ok((sizes, String::from_utf8(text).unwrap()))
    }

    fn secret(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}, "type": "Opaque",
               "data": {"password": REAL, "user": "YWRtaW4="}})
    }

    #[test]
    fn accept_becomes_json_with_its_parameters() {
        let cases = [
            (vec![], "application/json"),
            (vec!["application/json"], "application/json"),
            (
                // kubectl get's default table request
                vec!["application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"],
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
            ),
            // client-go configured for protobuf
            (
                vec!["application/vnd.kubernetes.protobuf,application/json"],
                "application/json",
            ),
            (
                vec!["application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io"],
                "application/json;as=Table;v=v1;g=meta.k8s.io",
            ),
            (vec!["application/json;stream=watch"], "application/json;stream=watch"),
            (vec!["application/yaml"], "application/json"),
            (vec!["*/*"], "application/json"),
            (vec!["text/html", "image/png"], "application/json"),
            (
                vec!["application/json; q=0.9", "application/yaml"],
                "application/json;q=0.9,application/json",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(json_accept(input.iter().copied()), expected, "{input:?}");
        }
    }

    #[test]
    fn kinds_of_resources() {
        assert_eq!(kind_of("", "secrets"), "Secret");
        assert_eq!(kind_of("apps", "deployments"), "Deployment");
        assert_eq!(kind_of("example.com", "secrets"), "secrets.example.com");
        assert_eq!(kind_of("", "bindings"), "bindings");
    }

    #[test]
    fn what_needs_masking() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        for path in [
            "/version",
            "/apis",
            "/api/v1",
            "/openapi/v2",
            "/apis/apps/v1",
            "/api/v1/namespaces/ns/pods/p/log",
            "/api/v1/namespaces/ns/pods/p/exec",
            "/api/v1/namespaces/ns/services/s/proxy/x",
            "/api/v1/proxy/namespaces/ns/pods/p",
        ] {
            assert!(plan_for(&masker, path, &metrics).is_none(), "{path}");
        }
        for path in [
            "/api/v1/namespaces/ns/secrets/s",
            "/api/v1/secrets",
            "/api/v1/namespaces/ns/configmaps?watch=true",
            "/apis/apps/v1/namespaces/ns/deployments/d/scale",
            "/apis/example.com/v1/namespaces/ns/widgets",
        ] {
            assert!(plan_for(&masker, path, &metrics).is_some(), "{path}");
        }
        let watch = plan_for(&masker, "/api/v1/secrets?watch=1", &metrics).unwrap();
        assert!(watch.watch);
        assert_eq!(watch.kind, "Secret");
    }

    #[test]
    fn prepare_rewrites_accept_and_drops_accept_encoding() {
        let masker = crate::masking::default_masker();
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.kubernetes.protobuf, application/json"),
        );
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let plan = prepare(
            &masker,
            &info(&Method::GET, "/api/v1/namespaces/ns/secrets/s"),
            &Method::GET,
            false,
            &mut headers,
            &Metrics::new(),
        )
        .unwrap();
        assert!(plan.is_some());
        assert_eq!(headers.get(ACCEPT).unwrap(), "application/json");
        assert!(!headers.contains_key(ACCEPT_ENCODING));

        // Pass-through requests keep their headers.
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/com.github.proto-openapi.spec.v2@v1.0+protobuf"),
        );
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let plan = prepare(
            &masker,
            &info(&Method::GET, "/openapi/v2"),
            &Method::GET,
            false,
            &mut headers,
            &Metrics::new(),
        )
        .unwrap();
        assert!(plan.is_none());
        assert!(headers.contains_key(ACCEPT_ENCODING));
    }

    #[test]
    fn refusals_before_forwarding() {
        let config = MaskingConfig {
            secrets: crate::masking::Action::Refuse,
            ..MaskingConfig::default()
        };
        let masker = Arc::new(Masker::new(&config).unwrap());
        let metrics = Metrics::new();
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let err = prepare(
                &masker,
                &info(&method, "/api/v1/namespaces/ns/secrets/s"),
                &method,
                false,
                &mut HeaderMap::new(),
                &metrics,
            )
            .err()
            .unwrap();
            assert_eq!(err.code, 403);
            assert!(err.message.contains("\"secrets\""), "{}", err.message);
        }
        // ConfigMaps are still read (and masked).
        assert!(plan_for(&masker, "/api/v1/namespaces/ns/configmaps", &metrics).is_some());

        // A custom kind the proxy knows only by its resource name.
        let config = MaskingConfig {
            rules: vec![crate::masking::RuleConfig {
                name: "no-widgets".into(),
                kinds: vec!["Widget".into()],
                path: None,
                name_pattern: None,
                action: crate::masking::Action::Refuse,
                base64: false,
            }],
            ..MaskingConfig::default()
        };
        let widgets = Arc::new(Masker::new(&config).unwrap());
        let mut headers = HeaderMap::new();
        let err = prepare(
            &widgets,
            &info(&Method::GET, "/apis/example.com/v1/namespaces/ns/widgets"),
            &Method::GET,
            false,
            &mut headers,
            &metrics,
        )
        .err()
        .unwrap();
        assert!(err.message.contains("no-widgets"), "{}", err.message);

        // A watch over WebSocket cannot be inspected: refused.
        let masker = crate::masking::default_masker();
        let err = prepare(
            &masker,
            &info(&Method::GET, "/api/v1/namespaces/ns/secrets?watch=true"),
            &Method::GET,
            true,
            &mut HeaderMap::new(),
            &metrics,
        )
        .err()
        .unwrap();
        assert_eq!(err.code, 403);
        // exec is an upgrade and passes.
        let exec = prepare(
            &masker,
            &info(&Method::GET, "/api/v1/namespaces/ns/pods/p/exec"),
            &Method::GET,
            true,
            &mut HeaderMap::new(),
            &metrics,
        );
        assert!(matches!(exec, Ok(None)));
        let text = metrics.encode();
        assert!(
            text.contains(r#"tollgate_masking_refusals_total{reason="rule"} 4"#)
                && text.contains(r#"tollgate_masking_refusals_total{reason="upgrade"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_single_secret_is_masked_and_counted() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        let plan = plan_for(&masker, "/api/v1/namespaces/ns/secrets/db", &metrics);
        let mut object = secret("db");
        object["kind"] = json!("Secret");
        object["apiVersion"] = json!("v1");
        let response = respond(
            plan,
            parts(200, Some("application/json")),
            chunked(&object.to_string(), 7),
        )
        .await
        .unwrap();
        assert!(!response.headers().contains_key(CONTENT_LENGTH));
        let (_, text) = collect(response).await.unwrap();
        assert!(!text.contains(REAL), "{text}");
        let out: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(out["data"]["password"], MASK_MARKER_BASE64);
        assert!(metrics
            .encode()
            .contains(r#"tollgate_masked_fields_total{kind="Secret",cause="secret_data"} 2"#));
    }

    #[tokio::test]
    async fn what_cannot_be_inspected_is_refused() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        let path = "/api/v1/namespaces/ns/secrets/db";
        let object = secret("db").to_string();

        // Protobuf (the API server ignored our Accept) and YAML: 502, never passed on.
        for content_type in [
            Some("application/vnd.kubernetes.protobuf"),
            Some("application/yaml"),
            None,
        ] {
            let err = respond(
                plan_for(&masker, path, &metrics),
                parts(200, content_type),
                chunked(&object, 100),
            )
            .await
            .err()
            .unwrap();
            assert_eq!(err.code, 502, "{content_type:?}");
        }
        // An upstream error with a body we cannot read keeps its code and Retry-After.
        let mut busy = parts(503, Some("text/plain"));
        busy.headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("3"));
        let err = respond(plan_for(&masker, path, &metrics), busy, chunked(REAL, 100))
            .await
            .err()
            .unwrap();
        assert_eq!((err.code, err.reason.as_str()), (503, "ServiceUnavailable"));
        assert_eq!(err.details.unwrap().retry_after_seconds, Some(3));
        assert!(!err.message.contains(REAL));

        // gzip after all: refused.
        let mut gz = parts(200, Some("application/json"));
        gz.headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let err = respond(plan_for(&masker, path, &metrics), gz, chunked(&object, 100))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code, 502);
        assert!(err.message.contains("gzip"));

        // Malformed JSON in a single object: a Status, nothing sent.
        let err = respond(
            plan_for(&masker, path, &metrics),
            parts(200, Some("application/json")),
            chunked(&object[..object.len() - 1], 100),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.code, 502);
        assert!(
            err.message.contains("ended in the middle"),
            "{}",
            err.message
        );

        // A upstream body that breaks: a Status too.
        let err = respond(
            plan_for(&masker, path, &metrics),
            parts(200, Some("application/json")),
            body_of(vec![Ok(Bytes::from_static(b"{\"kind\":")), Err("reset")]),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.code, 503);

        // Statuses from the API server are JSON and pass (masked, nothing to mask).
        let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
        let response = respond(
            plan_for(&masker, path, &metrics),
            parts(404, Some("application/json")),
            chunked(status, 10),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 404);
        let out: Value = serde_json::from_str(&collect(response).await.unwrap().1).unwrap();
        assert_eq!(out, serde_json::from_str::<Value>(status).unwrap());
    }

    #[tokio::test]
    async fn empty_and_head_answers_pass() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        let path = "/api/v1/namespaces/ns/secrets/db";
        let response = respond(
            plan_for(&masker, path, &metrics),
            parts(200, Some("application/json")),
            body_of(vec![]),
        )
        .await
        .unwrap();
        assert_eq!(collect(response).await.unwrap().1, "");
        let mut headers = HeaderMap::new();
        let head = prepare(
            &masker,
            &info(&Method::HEAD, path),
            &Method::HEAD,
            false,
            &mut headers,
            &metrics,
        )
        .unwrap();
        let response = respond(
            head,
            parts(200, Some("application/vnd.kubernetes.protobuf")),
            chunked(REAL, 4),
        )
        .await
        .unwrap();
        assert_eq!(collect(response).await.unwrap().1, "");
    }

    #[tokio::test]
    async fn a_watch_is_masked_event_by_event() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        let plan = plan_for(
            &masker,
            "/api/v1/namespaces/ns/secrets?watch=true",
            &metrics,
        );
        let mut events = String::new();
        for (i, kind) in ["ADDED", "MODIFIED", "DELETED"].iter().enumerate() {
            let mut object = secret(&format!("s{i}"));
            object["kind"] = json!("Secret");
            events.push_str(&json!({"type": kind, "object": object}).to_string());
            events.push('\n');
        }
        let bookmark =
            r#"{"type":"BOOKMARK","object":{"kind":"Secret","metadata":{"resourceVersion":"12"}}}"#;
        events.push_str(bookmark);
        events.push('\n');
        let response = respond(
            plan,
            parts(200, Some("application/json;stream=watch")),
            chunked(&events, 33),
        )
        .await
        .unwrap();
        let (sizes, text) = collect(response).await.unwrap();
        assert!(
            sizes.len() >= 4,
            "events go out as they are masked: {sizes:?}"
        );
        assert!(!text.contains(REAL));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        for event in &lines[..3] {
            assert_eq!(event["object"]["data"]["password"], MASK_MARKER_BASE64);
        }
        assert_eq!(text.lines().last().unwrap(), bookmark);

        // A failed watch answers with one Status document: passed as a document.
        let plan = plan_for(
            &masker,
            "/api/v1/namespaces/ns/secrets?watch=true",
            &metrics,
        );
        let gone = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","code":410}"#;
        let response = respond(plan, parts(410, Some("application/json")), chunked(gone, 8))
            .await
            .unwrap();
        let out: Value = serde_json::from_str(&collect(response).await.unwrap().1).unwrap();
        assert_eq!(out, serde_json::from_str::<Value>(gone).unwrap());
    }

    #[tokio::test]
    async fn a_list_breaking_mid_way_is_cut_off_not_leaked() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        let plan = plan_for(&masker, "/api/v1/namespaces/ns/secrets", &metrics);
        let body = format!(
            r#"{{"kind":"SecretList","apiVersion":"v1","metadata":{{}},"items":[{},{{"metadata":{{"name":"x"}},"data":{{"a":"{REAL}","a":"{REAL}"}}}}]}}"#,
            secret("first")
        );
        let response = respond(
            plan,
            parts(200, Some("application/json")),
            chunked(&body, 64),
        )
        .await
        .unwrap();
        let mut body = response.into_body();
        let mut seen = Vec::new();
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => seen.extend_from_slice(frame.data_ref().unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "the body must end in an error");
        let seen = String::from_utf8(seen).unwrap();
        assert!(seen.starts_with(r#"{"kind":"SecretList""#), "{seen}");
        assert!(!seen.contains(REAL), "{seen}");
        assert!(metrics
            .encode()
            .contains(r#"tollgate_masking_refusals_total{reason="aborted"} 1"#));
    }

    /// Issue 6 item 3 through the proxy's body: a 10,000-Secret list arriving in 16 KiB
    /// frames leaves as a stream of frames each about one upstream frame's size (the
    /// masker holds one item plus one frame, see masking::stream), masked throughout.
    #[tokio::test]
    async fn ten_thousand_secrets_stream_through_in_bounded_frames() {
        let masker = crate::masking::default_masker();
        let metrics = Metrics::new();
        let items: Vec<String> = (0..10_000)
            .map(|i| secret(&format!("secret-{i:05}")).to_string())
            .collect();
        let largest = items.iter().map(String::len).max().unwrap();
        let body = format!(
            r#"{{"kind":"SecretList","apiVersion":"v1","metadata":{{"resourceVersion":"9"}},"items":[{}]}}"#,
            items.join(",")
        );
        const FRAME: usize = 16 * 1024;
        let plan = plan_for(&masker, "/api/v1/secrets", &metrics);
        let response = respond(
            plan,
            parts(200, Some("application/json")),
            chunked(&body, FRAME),
        )
        .await
        .unwrap();
        let (sizes, text) = collect(response).await.unwrap();
        let biggest = sizes.iter().copied().max().unwrap();
        // Masked items are about as long as the originals (the marker is longer than
        // these values): one frame out per frame in, never the whole list.
        assert!(
            sizes.len() > body.len() / FRAME / 2,
            "{} frames",
            sizes.len()
        );
        assert!(
            biggest < 2 * (FRAME + largest),
            "a frame of {biggest} bytes"
        );
        assert!(!text.contains(REAL));
        let out: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(out["items"].as_array().unwrap().len(), 10_000);
        assert_eq!(out["items"][9_999]["data"]["password"], MASK_MARKER_BASE64);
        assert!(metrics
            .encode()
            .contains(r#"tollgate_masked_fields_total{kind="Secret",cause="secret_data"} 20000"#));
    }
}

/// Whether a write carries a value Tollgate masked: an agent that read a masked Secret
/// (or env value) and writes it back would replace the real value with the marker.
/// Such a write is refused, never forwarded. Bytes are searched as they are, so JSON
/// (`stringData`, the base64 of `data`) and protobuf (raw bytes) are both caught.
pub fn carries_marker(body: &[u8]) -> bool {
    [
        crate::masking::MASK_MARKER.as_bytes(),
        crate::masking::MASK_MARKER_BASE64.as_bytes(),
    ]
    .iter()
    .any(|marker| body.windows(marker.len()).any(|w| w == *marker))
}

/// The same search over a body that streams: each chunk is searched together with the
/// end of the one before, so a marker split between two frames is found too.
#[derive(Default)]
pub struct MarkerScan {
    tail: Vec<u8>,
    found: bool,
}

impl MarkerScan {
    /// Looks at the next chunk; true once a marker has been seen.
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        if self.found {
            return true;
        }
        let longest = crate::masking::MASK_MARKER
            .len()
            .max(crate::masking::MASK_MARKER_BASE64.len());
        // Only the seam needs a copy: the end of the last chunk and the start of this
        // one; the chunk itself is searched where it lies.
        let keep = longest - 1;
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(&chunk[..chunk.len().min(keep)]);
        self.found = carries_marker(&seam) || carries_marker(chunk);
        // What the next seam starts with: the last `keep` bytes seen.
        self.tail = if chunk.len() >= keep {
            chunk[chunk.len() - keep..].to_vec()
        } else {
            seam[seam.len().saturating_sub(keep)..].to_vec()
        };
        self.found
    }
}

/// The Status for such a write.
pub fn marker_refusal(info: &RequestInfo) -> Status {
    Status::failure(
        422,
        "Invalid",
        format!(
            "Tollgate: this {} carries a value Tollgate masked ({:?}); writing it would replace the real value. Write the real value, or leave the field out",
            info.verb,
            crate::masking::MASK_MARKER
        ),
    )
}

#[cfg(test)]
mod marker_tests {
    use super::*;

    #[test]
    fn a_marker_split_across_chunks_is_found() {
        let body = format!(
            r#"{{"stringData":{{"password":"{}"}}}}"#,
            crate::masking::MASK_MARKER
        );
        for cut in 1..body.len() {
            let mut scan = MarkerScan::default();
            let first = scan.push(&body.as_bytes()[..cut]);
            let second = scan.push(&body.as_bytes()[cut..]);
            assert!(first || second, "cut at {cut}");
        }
        let mut scan = MarkerScan::default();
        assert!(!scan.push(br#"{"data":{"password":"aHVudGVyMg=="}}"#));
        assert!(carries_marker(
            crate::masking::MASK_MARKER_BASE64.as_bytes()
        ));
        assert!(!carries_marker(b"*** masked by someone else ***"));
    }
}

#[cfg(test)]
mod marker_scan_tests {
    use super::MarkerScan;

    #[test]
    fn a_marker_split_over_many_small_chunks_is_found() {
        let body = format!(
            r#"{{"data":{{"k":"{}"}}}}"#,
            crate::masking::MASK_MARKER_BASE64
        );
        for size in 1..8 {
            let mut scan = MarkerScan::default();
            let found = body.as_bytes().chunks(size).any(|chunk| scan.push(chunk));
            assert!(found, "chunks of {size}");
        }
        let mut scan = MarkerScan::default();
        assert!(!br#"{"data":{"k":"c2VjcmV0"}}"#
            .chunks(3)
            .any(|chunk| scan.push(chunk)));
    }
}
