//! The mutating admission webhook of `injected-ca`: served by the agent over TLS,
//! called by the API server for every Pod CREATE the webhook configuration selects.
//!
//! For a pod that will be enforced (its own label or its namespace's, as
//! [`crate::discovery::enforcement_of`] decides), it points the projected
//! service-account volume's CA source, ConfigMap `kube-root-ca.crt`, at Tollgate's
//! trust bundle ([`super::bundle`]): the cluster CA and Tollgate's CAs. That one name
//! is all that changes; every other pod is let through untouched.
//!
//! One request reads top to bottom: route ([`handle`]) → bounded body → AdmissionReview
//! ([`review`]) → is it a Pod CREATE → the namespace's labels → [`mutation`] (pure) →
//! the bundle written ([`super::bundle::TrustBundles::ensure`]) → the answer.
//!
//! - `POST /mutate-pods`: an `admission.k8s.io/v1` AdmissionReview in, one out.
//! - `GET /healthz`: `ok`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use json_patch::jsonptr::PointerBuf;
use json_patch::{PatchOperation, ReplaceOperation, TestOperation};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::response::StatusSummary;
use kube::core::DynamicObject;
use kube::{Api, Client, ResourceExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn, Instrument};

use super::bundle::TrustBundles;
use crate::discovery::{enforcement_of, Enforcement};
use crate::status::Status;

/// Where the API server sends Pod CREATEs (the webhook configuration's `path`).
pub const MUTATE_PATH: &str = "/mutate-pods";
pub const HEALTHZ_PATH: &str = "/healthz";
/// The largest AdmissionReview accepted: the API server's own limit on a request body
/// (3 MiB), so no pod it accepts is refused here for its size.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// The ConfigMap the ServiceAccount admission plugin projects the cluster CA from.
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

/// How long a client may take to send the body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once (the API servers' pooled connections, and probes).
const MAX_CONNECTIONS: usize = 256;

/// What can go wrong with a request before there is an AdmissionReview to answer;
/// each becomes one HTTP status with a `metav1.Status` body in [`WebhookError::status`].
/// (Once the review is read, every outcome is an AdmissionResponse instead.)
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// No such path, or not with this method (404).
    #[error("no such endpoint: {method} {path} (the webhook serves POST {MUTATE_PATH} and GET {HEALTHZ_PATH})")]
    NotFound { method: String, path: String },
    /// The body exceeds [`MAX_BODY_BYTES`] (413).
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The body could not be read (400), or not in time (408).
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// The body is not an AdmissionReview (400).
    #[error("the request body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    Malformed(String),
    /// An AdmissionReview without a request (400).
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// Our answer could not be serialised (500; never expected).
    #[error("serialising the AdmissionReview answer: {0}")]
    Answer(String),
}

impl WebhookError {
    pub fn status(&self) -> Status {
        match self {
            WebhookError::NotFound { .. } => Status::failure(404, "NotFound", self.to_string()),
            WebhookError::TooLarge(limit) => Status::request_entity_too_large(*limit),
            WebhookError::BodyTimeout(_) => Status::failure(408, "Timeout", self.to_string()),
            WebhookError::Body(_) | WebhookError::Malformed(_) | WebhookError::NoRequest => {
                Status::bad_request(self.to_string())
            }
            WebhookError::Answer(_) => Status::internal_error(self.to_string()),
        }
    }
}

/// Why the namespace's labels could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading namespace {namespace}: {source}")]
pub struct LookupError {
    namespace: String,
    #[source]
    source: kube::Error,
}

/// Where a namespace's labels come from.
enum NamespaceLabels {
    /// A GET at each admission of a pod that is not labelled itself: a namespace
    /// labelled a moment before its first pod is created counts (a watch cache might
    /// not have seen the label yet), and the webhook is called for Pod CREATEs only.
    Api(Client),
    /// Fixed labels, for tests.
    #[cfg(test)]
    Fixed(std::collections::HashMap<String, BTreeMap<String, String>>),
}

impl NamespaceLabels {
    /// `None` when the namespace does not exist (the pod's creation fails anyway).
    async fn get(&self, namespace: &str) -> Result<Option<BTreeMap<String, String>>, LookupError> {
        match self {
            NamespaceLabels::Api(client) => Api::<Namespace>::all(client.clone())
                .get_opt(namespace)
                .await
                .map(|ns| ns.map(|ns| ns.labels().clone()))
                .map_err(|source| LookupError {
                    namespace: namespace.to_owned(),
                    source,
                }),
            #[cfg(test)]
            NamespaceLabels::Fixed(map) => Ok(map.get(namespace).cloned()),
        }
    }
}

/// What the handlers share.
pub struct WebhookState {
    bundles: Arc<TrustBundles>,
    configmap_name: String,
    namespaces: NamespaceLabels,
    metrics: crate::metrics::Metrics,
}

impl WebhookState {
    /// Pods are pointed at `bundles`' ConfigMap; namespace labels are read through
    /// `client` (the agent's credentials: `get` on namespaces).
    pub fn new(
        bundles: Arc<TrustBundles>,
        client: Client,
        metrics: crate::metrics::Metrics,
    ) -> WebhookState {
        WebhookState {
            configmap_name: bundles.configmap_name().to_owned(),
            bundles,
            namespaces: NamespaceLabels::Api(client),
            metrics,
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .trust_admissions
            .get_or_create(&crate::metrics::AdmissionLabels { outcome })
            .inc();
    }
}

/// What the webhook does to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Neither the pod nor its namespace is labelled `tollgate.dev/enforce=true`.
    NotEnforced,
    /// Every CA source already names the trust bundle (a second call: idempotent).
    AlreadyMutated,
    /// Enforced, but no projected volume takes `kube-root-ca.crt`
    /// (`automountServiceAccountToken: false`): nothing to trust, nothing to change.
    NoServiceAccountVolume,
    /// A `test` and a `replace` of each `configMap.name` that is `kube-root-ca.crt`.
    Patch(Vec<PatchOperation>),
}

/// The decision, from the pod as the API server's ServiceAccount admission shaped it.
/// Only `spec.volumes[i].projected.sources[j].configMap.name` changes, from
/// `kube-root-ca.crt` to `configmap_name`; nothing else in the pod.
pub fn mutation(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    configmap_name: &str,
) -> Mutation {
    if enforcement_of(pod.labels(), namespace_labels) != Enforcement::Enforced {
        return Mutation::NotEnforced;
    }
    let mut ops = Vec::new();
    let mut mutated = false;
    let volumes = pod
        .spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten());
    for (i, volume) in volumes.enumerate() {
        let sources = volume
            .projected
            .iter()
            .flat_map(|projected| projected.sources.iter().flatten());
        for (j, source) in sources.enumerate() {
            let Some(name) = source.config_map.as_ref().map(|cm| cm.name.as_str()) else {
                continue;
            };
            if name == configmap_name {
                mutated = true;
            } else if name == ROOT_CA_CONFIGMAP {
                let path = PointerBuf::from_tokens([
                    "spec".to_owned(),
                    "volumes".to_owned(),
                    i.to_string(),
                    "projected".to_owned(),
                    "sources".to_owned(),
                    j.to_string(),
                    "configMap".to_owned(),
                    "name".to_owned(),
                ]);
                // The test makes the API server refuse the patch rather than change
                // another entry, should the pod it applies to differ from this one.
                ops.push(PatchOperation::Test(TestOperation {
                    path: path.clone(),
                    value: serde_json::Value::String(ROOT_CA_CONFIGMAP.to_owned()),
                }));
                ops.push(PatchOperation::Replace(ReplaceOperation {
                    path,
                    value: serde_json::Value::String(configmap_name.to_owned()),
                }));
            }
        }
    }
    match (ops.is_empty(), mutated) {
        (false, _) => Mutation::Patch(ops),
        (true, true) => Mutation::AlreadyMutated,
        (true, false) => Mutation::NoServiceAccountVolume,
    }
}

/// The HTTP answer to a request; generic over the body so tests need no connection.
pub async fn handle<B>(state: &WebhookState, request: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let answer = match (&method, path.as_str()) {
        (&Method::GET, HEALTHZ_PATH) => return text_response(StatusCode::OK, "ok"),
        (&Method::POST, MUTATE_PATH) => match read_body(request).await {
            Ok(body) => review(state, &body).await,
            Err(err) => Err(err),
        },
        _ => Err(WebhookError::NotFound {
            method: method.to_string(),
            path,
        }),
    };
    match answer {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(err) => {
            let status = err.status();
            debug!(%err, code = status.code, "webhook request refused");
            json_response(
                StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                status.to_json(),
            )
        }
    }
}

/// The body, at most [`MAX_BODY_BYTES`], within [`BODY_TIMEOUT`].
async fn read_body<B>(request: Request<B>) -> Result<Bytes, WebhookError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A declared length over the limit is refused before anything is read.
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(WebhookError::TooLarge(MAX_BODY_BYTES));
    }
    let limited = Limited::new(request.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            Err(WebhookError::TooLarge(MAX_BODY_BYTES))
        }
        Ok(Err(err)) => Err(WebhookError::Body(err.to_string())),
        Err(_) => Err(WebhookError::BodyTimeout(BODY_TIMEOUT)),
    }
}

/// One AdmissionReview in, the answering one out (JSON). Anything that is not a Pod
/// CREATE is allowed unchanged.
pub async fn review(state: &WebhookState, body: &[u8]) -> Result<Vec<u8>, WebhookError> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|err| WebhookError::Malformed(err.to_string()))?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| WebhookError::NoRequest)?;
    let span = tracing::info_span!(
        "admission",
        uid = %request.uid,
        namespace = request.namespace.as_deref().unwrap_or_default(),
        operation = ?request.operation,
        kind = %request.kind.kind,
    );
    let response = admit(state, &request).instrument(span).await;
    answer_json(response)
}

/// The answering AdmissionReview as JSON, its `patch` base64 as the API documents it
/// (Go's encoding of `[]byte`): kube's type would write an array of numbers
/// (kube-rs issue 1781).
fn answer_json(mut response: AdmissionResponse) -> Result<Vec<u8>, WebhookError> {
    let patch = response.patch.take();
    let mut review = serde_json::to_value(response.into_review())
        .map_err(|err| WebhookError::Answer(err.to_string()))?;
    if let Some(patch) = patch {
        let encoded = base64::engine::general_purpose::STANDARD.encode(patch);
        match review
            .get_mut("response")
            .and_then(serde_json::Value::as_object_mut)
        {
            Some(fields) => {
                fields.insert("patch".to_owned(), serde_json::Value::String(encoded));
            }
            None => {
                return Err(WebhookError::Answer(
                    "no response to put the patch in".into(),
                ))
            }
        }
    }
    serde_json::to_vec(&review).map_err(|err| WebhookError::Answer(err.to_string()))
}

fn is_pod_create(request: &AdmissionRequest<DynamicObject>) -> bool {
    request.operation == Operation::Create
        && request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request
            .sub_resource
            .as_deref()
            .unwrap_or_default()
            .is_empty()
}

/// `allowed: false` with a Status the API server passes on to the client.
fn refuse(
    request: &AdmissionRequest<DynamicObject>,
    code: u16,
    reason: &str,
    message: String,
) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request).deny(message);
    response.result.status = Some(StatusSummary::Failure);
    response.result.code = code;
    response.result.reason = reason.to_owned();
    response
}

/// The decision for one request.
async fn admit(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    if !is_pod_create(request) {
        debug!("not a Pod CREATE; allowed unchanged");
        return AdmissionResponse::from(request);
    }
    let Some(object) = request.object.clone() else {
        debug!("a Pod CREATE without an object; allowed unchanged");
        return AdmissionResponse::from(request);
    };
    let pod: Pod = match object.try_parse() {
        Ok(pod) => pod,
        Err(err) => {
            warn!(%err, "the object of a Pod CREATE is not a Pod; refused");
            state.count("refused");
            return refuse(
                request,
                400,
                "BadRequest",
                format!("the object is not a valid Pod: {err}"),
            );
        }
    };
    // The pod's own metadata.namespace may be empty on create.
    let namespace = request
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .or_else(|| pod.metadata.namespace.clone().filter(|ns| !ns.is_empty()))
        .unwrap_or_default();
    // On create the pod has no uid yet and maybe only a generateName.
    let pod_name = match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) => format!("{prefix}*"),
        _ => request.name.clone(),
    };
    let span = tracing::info_span!(
        "pod",
        namespace = %namespace,
        pod = %pod_name,
        pod_uid = pod.metadata.uid.as_deref().unwrap_or_default(),
    );
    let response = admit_pod(state, request, &pod, &namespace)
        .instrument(span)
        .await;
    if !response.allowed {
        state.count("refused");
    }
    response
}

/// The decision for a Pod CREATE in `namespace`, logged once.
async fn admit_pod(
    state: &WebhookState,
    request: &AdmissionRequest<DynamicObject>,
    pod: &Pod,
    namespace: &str,
) -> AdmissionResponse {
    if namespace.is_empty() {
        warn!("a Pod CREATE without a namespace; refused");
        return refuse(
            request,
            400,
            "BadRequest",
            "the pod has no namespace".to_owned(),
        );
    }
    // A labelled pod is enforced whatever its namespace says: no lookup needed.
    let namespace_labels = if enforcement_of(pod.labels(), None) == Enforcement::Enforced {
        None
    } else {
        match state.namespaces.get(namespace).await {
            Ok(labels) => labels,
            Err(err) => {
                warn!(%err, "namespace labels unreadable; refused");
                // Fail closed: the pod may be enforced, and unmutated it could not
                // verify the proxy.
                return refuse(
                    request,
                    500,
                    "InternalError",
                    format!("Tollgate could not tell whether the pod is enforced: {err}"),
                );
            }
        }
    };
    let configmap = state.configmap_name.as_str();
    let ops = match mutation(pod, namespace_labels.as_ref(), configmap) {
        Mutation::NotEnforced => {
            state.count("not_enforced");
            info!("not enforced; allowed unchanged");
            return AdmissionResponse::from(request);
        }
        Mutation::AlreadyMutated => {
            state.count("already_mutated");
            info!(configmap, "already trusts the bundle; allowed unchanged");
            return AdmissionResponse::from(request);
        }
        Mutation::NoServiceAccountVolume => {
            state.count("no_service_account_volume");
            info!("enforced, without a service-account CA volume; allowed unchanged");
            return AdmissionResponse::from(request);
        }
        Mutation::Patch(ops) => ops,
    };
    // With dryRun nothing is persisted, so nothing is written either
    // (`sideEffects: NoneOnDryRun`).
    if !request.dry_run {
        if let Err(err) = state.bundles.ensure(namespace).await {
            warn!(%err, "trust bundle not written; refused");
            // Fail closed: a pod mounting a ConfigMap that does not exist never starts.
            return refuse(
                request,
                500,
                "InternalError",
                format!(
                    "Tollgate could not write the trust bundle ConfigMap {namespace}/{configmap}: {err}"
                ),
            );
        }
    }
    let changes = ops.len() / 2;
    match AdmissionResponse::from(request).with_patch(json_patch::Patch(ops)) {
        Ok(response) => {
            state.count("mutated");
            info!(
                configmap,
                changes,
                dry_run = request.dry_run,
                "enforced; CA source pointed at the trust bundle"
            );
            response
        }
        Err(err) => {
            warn!(%err, "patch not serialisable; refused");
            refuse(request, 500, "InternalError", err.to_string())
        }
    }
}

fn json_response(code: StatusCode, json: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text_response(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves the webhook on `listener` until the task is dropped: TLS (`tls`, whose
/// certificate resolver [`super::serving`] keeps current; its ALPN list decides
/// whether HTTP/2 is offered), then HTTP/1.1 or HTTP/2.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<WebhookState>,
) {
    crate::https::serve(
        "admission webhook",
        listener,
        tls,
        MAX_CONNECTIONS,
        move |request| {
            let state = state.clone();
            async move { handle(&state, request).await }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{TrustMaterial, ENFORCE_LABEL};

    const BUNDLE: &str = "tollgate-ca-bundle";

    /// A pod as the API server hands it to the webhook: after the ServiceAccount
    /// admission plugin added `kube-api-access-*`, with a second, ordinary volume.
    fn pod_json(labels: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "agent-",
                "namespace": "agents",
                "labels": labels,
                "annotations": {"team": "ml"}
            },
            "spec": {
                "serviceAccountName": "agent",
                "containers": [{
                    "name": "agent",
                    "image": "agent:1",
                    "volumeMounts": [
                        {"name": "work", "mountPath": "/work"},
                        {"name": "kube-api-access-abcde", "readOnly": true,
                         "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
                    ]
                }],
                "volumes": [
                    {"name": "work", "emptyDir": {}},
                    {"name": "kube-api-access-abcde", "projected": {
                        "defaultMode": 420,
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt",
                                           "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1",
                                "fieldPath": "metadata.namespace"}, "path": "namespace"}]}}
                        ]
                    }}
                ]
            }
        })
    }

    fn pod(labels: serde_json::Value) -> Pod {
        serde_json::from_value(pod_json(labels)).expect("a valid pod")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const CA_NAME_PATH: &str = "/spec/volumes/1/projected/sources/1/configMap/name";

    fn apply(pod: &Pod, ops: &[PatchOperation]) -> serde_json::Value {
        let mut doc = serde_json::to_value(pod).expect("a pod serialises");
        json_patch::patch(&mut doc, ops).expect("the patch applies");
        doc
    }

    fn the_one_replace(mutation: Mutation) -> Vec<PatchOperation> {
        let Mutation::Patch(ops) = mutation else {
            panic!("expected a patch, got {mutation:?}");
        };
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(&ops[0], PatchOperation::Test(t)
            if t.path.as_str() == CA_NAME_PATH && t.value == ROOT_CA_CONFIGMAP));
        assert!(matches!(&ops[1], PatchOperation::Replace(r)
            if r.path.as_str() == CA_NAME_PATH && r.value == BUNDLE));
        ops
    }

    #[test]
    fn a_pod_labelled_enforced_gets_one_replace_and_nothing_else_changes() {
        let before = pod(serde_json::json!({ENFORCE_LABEL: "true", "app": "agent"}));
        let ops = the_one_replace(mutation(&before, None, BUNDLE));
        let after = apply(&before, &ops);
        // The whole pod is the same but for that one name.
        let mut expected = serde_json::to_value(&before).unwrap();
        expected["spec"]["volumes"][1]["projected"]["sources"][1]["configMap"]["name"] =
            serde_json::json!(BUNDLE);
        assert_eq!(after, expected);
        assert_eq!(
            after["metadata"],
            serde_json::to_value(&before).unwrap()["metadata"]
        );
        assert_eq!(
            after["spec"]["containers"],
            pod_json(serde_json::json!({}))["spec"]["containers"]
        );
        assert_eq!(
            after["spec"]["volumes"][0],
            serde_json::json!({"name": "work", "emptyDir": {}})
        );
        // Idempotent: the mutated pod gets no patch.
        let mutated: Pod = serde_json::from_value(after).unwrap();
        assert_eq!(mutation(&mutated, None, BUNDLE), Mutation::AlreadyMutated);
    }

    #[test]
    fn a_pod_in_an_enforced_namespace_gets_one_replace() {
        let before = pod(serde_json::json!({"app": "agent"}));
        let ns = labels(&[(ENFORCE_LABEL, "true")]);
        let ops = the_one_replace(mutation(&before, Some(&ns), BUNDLE));
        let mutated: Pod = serde_json::from_value(apply(&before, &ops)).unwrap();
        assert_eq!(
            mutation(&mutated, Some(&ns), BUNDLE),
            Mutation::AlreadyMutated
        );
    }

    #[test]
    fn pods_not_enforced_are_not_changed() {
        let unlabelled = pod(serde_json::json!({"app": "agent"}));
        assert_eq!(mutation(&unlabelled, None, BUNDLE), Mutation::NotEnforced);
        assert_eq!(
            mutation(&unlabelled, Some(&labels(&[("team", "ml")])), BUNDLE),
            Mutation::NotEnforced
        );
        let off = pod(serde_json::json!({ENFORCE_LABEL: "false"}));
        assert_eq!(mutation(&off, None, BUNDLE), Mutation::NotEnforced);
        assert_eq!(
            mutation(
                &unlabelled,
                Some(&labels(&[(ENFORCE_LABEL, "false")])),
                BUNDLE
            ),
            Mutation::NotEnforced
        );
    }

    #[test]
    fn an_enforced_pod_without_the_ca_volume_is_left_alone() {
        let mut json = pod_json(serde_json::json!({ENFORCE_LABEL: "true"}));
        json["spec"]["volumes"] = serde_json::json!([{"name": "work", "emptyDir": {}}]);
        json["spec"]["automountServiceAccountToken"] = serde_json::json!(false);
        let pod: Pod = serde_json::from_value(json).unwrap();
        assert_eq!(
            mutation(&pod, None, BUNDLE),
            Mutation::NoServiceAccountVolume
        );
        let mut json = pod_json(serde_json::json!({ENFORCE_LABEL: "true"}));
        json["spec"]
            .as_object_mut()
            .map(|spec| spec.remove("volumes"));
        let pod: Pod = serde_json::from_value(json).unwrap();
        assert_eq!(
            mutation(&pod, None, BUNDLE),
            Mutation::NoServiceAccountVolume
        );
    }

    // --- the HTTP handler, without a network ---

    fn material() -> TrustMaterial {
        let ca = crate::trust::ca::generate_ca(Duration::from_secs(3600)).unwrap();
        TrustMaterial {
            tollgate_bundle_pem: ca.cert_pem.clone(),
            signing: ca,
        }
    }

    /// A state whose API server does not answer (nothing listens on port 1) and
    /// whose namespace `agents` is enforced.
    fn state() -> WebhookState {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).expect("a client without connecting");
        let (_tx, trust) = tokio::sync::watch::channel(Arc::new(material()));
        let bundles = TrustBundles::new(
            client.clone(),
            BUNDLE.to_owned(),
            "CLUSTER CA\n".to_owned(),
            trust,
        );
        let mut state = WebhookState::new(bundles, client, crate::metrics::Metrics::new());
        state.namespaces = NamespaceLabels::Fixed(std::collections::HashMap::from([
            ("agents".to_owned(), labels(&[(ENFORCE_LABEL, "true")])),
            ("plain".to_owned(), labels(&[])),
        ]));
        state
    }

    fn review_json(object: serde_json::Value, namespace: &str, dry_run: bool) -> serde_json::Value {
        let kind = object["kind"].as_str().unwrap_or("Pod").to_owned();
        let resource = format!("{}s", kind.to_lowercase());
        let group = if kind == "Pod" { "" } else { "apps" };
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": group, "version": "v1", "kind": kind},
                "resource": {"group": group, "version": "v1", "resource": resource},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "admin", "groups": ["system:authenticated"]},
                "object": object,
                "oldObject": null,
                "dryRun": dry_run,
                "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
            }
        })
    }

    async fn post(state: &WebhookState, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let request = Request::post(MUTATE_PATH)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = handle(state, request).await;
        let code = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (code, serde_json::from_slice(&bytes).expect("a JSON answer"))
    }

    #[tokio::test]
    async fn malformed_json_is_a_400() {
        let (code, body) = post(&state(), b"{not json".to_vec()).await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert_eq!(body["kind"], "Status");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("not an admission.k8s.io/v1 AdmissionReview"));
        let (code, body) = post(
            &state(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        )
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(body["message"].as_str().unwrap().contains("no request"));
    }

    #[tokio::test]
    async fn an_oversized_body_is_a_413() {
        let state = state();
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let (code, body) = post(&state, big.clone()).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["reason"], "RequestEntityTooLarge");
        // Without a Content-Length (a chunked body), the limit holds as it is read.
        let stream = futures_util::stream::iter(
            big.chunks(64 * 1024)
                .map(|c| {
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                        Bytes::copy_from_slice(c),
                    ))
                })
                .collect::<Vec<_>>(),
        );
        let request = Request::post(MUTATE_PATH)
            .body(http_body_util::StreamBody::new(stream))
            .unwrap();
        assert_eq!(
            handle(&state, request).await.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[tokio::test]
    async fn other_paths_are_a_404_and_healthz_answers() {
        let state = state();
        let request = Request::get("/mutate-deployments")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = handle(&state, request).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["reason"], "NotFound");
        let request = Request::get(MUTATE_PATH)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(
            handle(&state, request).await.status(),
            StatusCode::NOT_FOUND
        );
        let request = Request::get(HEALTHZ_PATH)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(handle(&state, request).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_non_pod_is_allowed_without_a_patch() {
        let deployment = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "agents", "labels": {ENFORCE_LABEL: "true"}},
            "spec": {"selector": {}, "template": {}}
        });
        let body = serde_json::to_vec(&review_json(deployment, "agents", false)).unwrap();
        let (code, answer) = post(&state(), body).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(
            answer["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    fn decoded_patch(answer: &serde_json::Value) -> Vec<PatchOperation> {
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().unwrap())
            .unwrap();
        serde_json::from_slice(&patch).unwrap()
    }

    #[tokio::test]
    async fn a_dry_run_pod_create_in_an_enforced_namespace_gets_the_patch_without_a_write() {
        // The API server behind `state` does not answer: a write would fail.
        let body = review_json(pod_json(serde_json::json!({})), "agents", true);
        let (code, answer) = post(&state(), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        let ops = decoded_patch(&answer);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].path().as_str(), CA_NAME_PATH);
    }

    #[tokio::test]
    async fn unenforced_and_already_mutated_pods_are_allowed_without_a_patch() {
        let state = state();
        let body = review_json(pod_json(serde_json::json!({})), "plain", false);
        let (_, answer) = post(&state, serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        let mut mutated = pod_json(serde_json::json!({}));
        mutated["spec"]["volumes"][1]["projected"]["sources"][1]["configMap"]["name"] =
            serde_json::json!(BUNDLE);
        let body = review_json(mutated, "agents", false);
        let (_, answer) = post(&state, serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[tokio::test]
    async fn a_bundle_that_cannot_be_written_refuses_the_pod() {
        let body = review_json(pod_json(serde_json::json!({})), "agents", false);
        let (code, answer) = post(&state(), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
        assert_eq!(answer["response"]["status"]["code"], 500);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message
                .contains("could not write the trust bundle ConfigMap agents/tollgate-ca-bundle"),
            "{message}"
        );
        assert!(answer["response"].get("patch").is_none());
    }

    #[tokio::test]
    async fn a_pod_update_is_allowed_unchanged() {
        let mut body = review_json(
            pod_json(serde_json::json!({ENFORCE_LABEL: "true"})),
            "agents",
            true,
        );
        body["request"]["operation"] = serde_json::json!("UPDATE");
        let (_, answer) = post(&state(), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }
}
