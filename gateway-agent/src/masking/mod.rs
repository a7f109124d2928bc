//! Masking (DESIGN §6): what an enforced pod reads from the API server is rewritten so
//! that no secret value leaves the proxy, while the answer keeps its shape (keys stay,
//! a masked Secret `data` entry is still valid base64) so clients do not break.
//!
//! Pure logic on JSON: the proxy (`proxy::masking`) hands a response body to a
//! [`StreamMasker`] chunk by chunk and forwards what comes out, or calls
//! [`Masker::mask_body`] / [`Masker::mask_value`] for a body it holds whole.
//!
//! What is masked, in every object of a single answer, a list (`SecretList`, `kind:
//! List`), every watch event (bookmarks untouched) and a `meta.k8s.io/v1` `Table` (cells
//! of Secret rows and the embedded object of each row, whatever `includeObject` was):
//!
//! - [`secrets`]: a Secret's `data` (base64 marker) and `stringData` (plain marker), and
//!   the `kubectl.kubernetes.io/last-applied-configuration` annotation of any object
//!   (parsed, masked like an object, re-serialised; replaced whole when unparseable).
//! - [`rules`]: configured selectors such as
//!   `@podSpec.containers|initContainers|ephemeralContainers[].env[].value` whose `name`
//!   matches `(?i)password|token|secret|key`, or ConfigMap `data.*` by key; each rule
//!   masks or refuses the read outright.
//! - [`detectors`]: PEM private keys, JWT / bearer tokens and cloud access keys found in
//!   any string value.
//! - [`table`]: Table rows; [`stream`]: bodies that arrive in chunks, memory bounded by
//!   the largest single object or event.
//!
//! Anything that cannot be inspected (malformed JSON, duplicate keys, a truncated body,
//! an object over the size limit) is an error: the proxy refuses it, never passes it
//! through.
//!
//! How the proxy uses it (`proxy::masking`), for a response to an enforced pod:
//! 1. Before forwarding: if [`Masker::refusal_for_kind`] names a rule for the requested
//!    kind, answer 403 without asking upstream.
//! 2. Ask upstream for JSON (`Accept: application/json`, keeping `;as=Table;...`
//!    parameters; never protobuf or YAML) and either drop `Accept-Encoding` or gunzip
//!    the answer before masking; refuse any answer whose content type is not JSON.
//! 3. `StreamMasker::new(&masker, BodyFormat::WatchStream` (for `watch=true`) or
//!    `BodyFormat::Document, Context::for_kind(kind))`; `push` each body frame and send
//!    what it appends to `out`; `finish` at the end of the body. Drop `Content-Length`
//!    (the size changes).
//! 4. On an error before anything was sent: a `Status` with
//!    [`MaskError::http_status`]; after: abort the response (see [`stream`]).
//! 5. [`MaskStats`] from `finish` feeds the metrics and the session record.
//!
//! ```yaml
//! masking:
//!   secrets: mask                  # mask | refuse (refuse every read of a Secret)
//!   maxObjectBytes: 16777216       # the largest single object / event / list item
//!   detectors:
//!     privateKeys: true
//!     tokens: true
//!     cloudKeys: true
//!     patterns: ["mycorp_[0-9a-f]{32}"]   # extra value patterns
//!     kinds: []                    # kinds they apply to; empty = every object
//!   rules:
//!     - name: env-credentials
//!       kinds: [Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob, ReplicaSet]
//!       path: "@podSpec.containers|initContainers|ephemeralContainers[].env[].value"
//!       namePattern: "(?i)password|token|secret|key"
//!       action: mask               # mask | refuse
//!     - name: configmap-credentials
//!       kinds: [ConfigMap]
//!       path: "data.*"
//!       namePattern: "(?i)password|token|secret|key"
//!     - name: configmap-binary-credentials
//!       kinds: [ConfigMap]
//!       path: "binaryData.*"
//!       namePattern: "(?i)password|token|secret|key"
//!       base64: true               # the replacement is base64 of the marker
//! ```

pub mod detectors;
pub mod rules;
pub mod secrets;
pub mod stream;
pub mod strict;
pub mod table;

use serde::Deserialize;
use serde_json::Value;

pub use stream::{BodyFormat, StreamMasker};

/// What replaces a masked plain string (and spans found by the detectors).
pub const MASK_MARKER: &str = "*** masked by tollgate ***";
/// What replaces a masked base64 value: the base64 of [`MASK_MARKER`].
pub const MASK_MARKER_BASE64: &str = "KioqIG1hc2tlZCBieSB0b2xsZ2F0ZSAqKio=";
/// The annotation `kubectl apply` stores the applied manifest in.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Default for [`MaskingConfig::max_object_bytes`]: 16 MiB, far above what etcd stores
/// in one object (1.5 MiB by default) and what one watch event or Table row carries.
pub const DEFAULT_MAX_OBJECT_BYTES: usize = 16 * 1024 * 1024;

/// The default name pattern of credentials in env vars and ConfigMap keys.
pub const DEFAULT_NAME_PATTERN: &str = "(?i)password|passwd|token|secret|key|credential";

/// Mask the value or refuse the whole read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Mask,
    Refuse,
}

/// The masking section of the agent's configuration, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// What to do with a Secret's `data` / `stringData`.
    pub secrets: Action,
    pub max_object_bytes: usize,
    pub detectors: DetectorsConfig,
    pub rules: Vec<RuleConfig>,
}

/// Which value detectors run, and on which kinds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DetectorsConfig {
    pub private_keys: bool,
    pub tokens: bool,
    pub cloud_keys: bool,
    /// Extra regular expressions; every match is masked.
    pub patterns: Vec<String>,
    /// Kinds the detectors apply to; empty = every object.
    pub kinds: Vec<String>,
}

/// One configured rule, as written. See [`rules`] for the path syntax.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Kinds the rule applies to; empty = every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Where the values are; absent = the object itself (only with `action: refuse`).
    #[serde(default)]
    pub path: Option<String>,
    /// A regular expression the value's name must match (the key for `*`, the `name`
    /// field of the element for `[]`); absent = every value the path reaches.
    #[serde(default)]
    pub name_pattern: Option<String>,
    #[serde(default)]
    pub action: Action,
    /// The replacement is base64 of the marker (for base64 fields like `binaryData`).
    #[serde(default)]
    pub base64: bool,
}

impl MaskingConfig {
    /// Reads the masking section from YAML (the document above, without the `masking:`
    /// key). Unknown fields are errors, so a misspelt key cannot widen or drop a rule.
    pub fn from_yaml(text: &str) -> Result<MaskingConfig, ConfigError> {
        serde_saphyr::from_str(text).map_err(|err| ConfigError::Yaml(err.to_string()))
    }
}

impl Default for DetectorsConfig {
    fn default() -> Self {
        DetectorsConfig {
            private_keys: true,
            tokens: true,
            cloud_keys: true,
            patterns: Vec::new(),
            kinds: Vec::new(),
        }
    }
}

impl Default for MaskingConfig {
    /// Secrets masked, every detector on, credentials in pod-template env vars and
    /// ConfigMap keys masked.
    fn default() -> Self {
        MaskingConfig {
            secrets: Action::Mask,
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
            detectors: DetectorsConfig::default(),
            rules: vec![
                RuleConfig {
                    name: "env-credentials".into(),
                    kinds: rules::POD_SPEC_KINDS
                        .iter()
                        .map(|k| k.to_string())
                        .collect(),
                    path: Some(
                        "@podSpec.containers|initContainers|ephemeralContainers[].env[].value"
                            .into(),
                    ),
                    name_pattern: Some(DEFAULT_NAME_PATTERN.into()),
                    action: Action::Mask,
                    base64: false,
                },
                RuleConfig {
                    name: "configmap-credentials".into(),
                    kinds: vec!["ConfigMap".into()],
                    path: Some("data.*".into()),
                    name_pattern: Some(DEFAULT_NAME_PATTERN.into()),
                    action: Action::Mask,
                    base64: false,
                },
                RuleConfig {
                    name: "configmap-binary-credentials".into(),
                    kinds: vec!["ConfigMap".into()],
                    path: Some("binaryData.*".into()),
                    name_pattern: Some(DEFAULT_NAME_PATTERN.into()),
                    action: Action::Mask,
                    base64: true,
                },
            ],
        }
    }
}

/// A configuration that cannot be used; the agent refuses to start (or keeps the
/// previous one on reload).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("masking rule {rule:?}: invalid name pattern: {source}")]
    NamePattern {
        rule: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("masking rule {rule:?}: invalid path {path:?}: {reason}")]
    Path {
        rule: String,
        path: String,
        reason: String,
    },
    #[error("masking rule {rule:?}: a rule without a path can only refuse")]
    MaskWithoutPath { rule: String },
    #[error("masking rule {0:?} is defined twice")]
    DuplicateRule(String),
    #[error("masking detector pattern {pattern:?} is invalid: {source}")]
    DetectorPattern {
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("masking configuration: {0}")]
    Yaml(String),
    #[error("maxObjectBytes must be at least 1024")]
    MaxObjectBytes,
}

/// Why a body could not be masked. Every variant means: do not forward the body.
/// [`MaskError::Refused`] is a policy answer (a 403 `Status`); the others mean the
/// answer could not be inspected (a 502 / 503 `Status`, or an aborted stream when part
/// of the body was already sent).
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("the response is not valid JSON: {0}")]
    Malformed(String),
    #[error("the response ended in the middle of a JSON value")]
    Truncated,
    #[error("a single object or event in the response is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading this {kind} is refused by masking rule {rule:?}")]
    Refused { rule: String, kind: String },
}

impl MaskError {
    /// The HTTP status the proxy answers with (when nothing was sent yet): 403 for a
    /// refusal, 502 for an upstream answer that could not be inspected.
    pub fn http_status(&self) -> u16 {
        match self {
            MaskError::Refused { .. } => 403,
            MaskError::Malformed(_) | MaskError::Truncated | MaskError::TooLarge { .. } => 502,
        }
    }

    fn malformed(err: serde_json::Error) -> Self {
        MaskError::Malformed(err.to_string())
    }
}

/// How many values one call masked, by cause (for metrics and session records).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskStats {
    /// Secret `data` / `stringData` entries and Secret Table cells.
    pub secret_fields: u64,
    /// last-applied-configuration annotations rewritten or replaced.
    pub annotations: u64,
    /// Values masked by configured rules.
    pub rule_fields: u64,
    /// Spans masked by the value detectors.
    pub detector_hits: u64,
    /// Objects inspected (list items, events, rows, single objects).
    pub objects: u64,
}

impl MaskStats {
    /// Every masked field, whatever the cause.
    pub fn masked(&self) -> u64 {
        self.secret_fields + self.annotations + self.rule_fields + self.detector_hits
    }
}

/// What the proxy knows about the request the body answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The kind of the resource requested (`Secret` for `/api/v1/secrets`), used when
    /// the body does not name it: list items, `PartialObjectMetadata`, Table rows
    /// without an object. Without it such objects are treated as possibly Secrets.
    pub kind: Option<String>,
}

impl Context {
    pub fn for_kind(kind: &str) -> Self {
        Context {
            kind: Some(kind.to_string()),
        }
    }
}

/// The masker of the default configuration, compiled once and shared: what a policy
/// without a `masking` section uses.
pub fn default_masker() -> std::sync::Arc<Masker> {
    static DEFAULT: std::sync::OnceLock<std::sync::Arc<Masker>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            // A constant configuration, checked by the unit tests: it cannot fail.
            let masker = Masker::new(&MaskingConfig::default())
                .unwrap_or_else(|err| unreachable!("the default masking config is valid: {err}"));
            std::sync::Arc::new(masker)
        })
        .clone()
}

/// The compiled masking configuration; cheap to share (`Arc<Masker>`), immutable.
#[derive(Debug)]
pub struct Masker {
    secrets: Action,
    max_object_bytes: usize,
    rules: Vec<rules::Rule>,
    detectors: detectors::Detectors,
}

impl Masker {
    /// Validates and compiles a configuration.
    pub fn new(config: &MaskingConfig) -> Result<Masker, ConfigError> {
        if config.max_object_bytes < 1024 {
            return Err(ConfigError::MaxObjectBytes);
        }
        let mut compiled: Vec<rules::Rule> = Vec::with_capacity(config.rules.len());
        for rule in &config.rules {
            if compiled.iter().any(|r| r.name == rule.name) {
                return Err(ConfigError::DuplicateRule(rule.name.clone()));
            }
            compiled.push(rules::Rule::compile(rule)?);
        }
        Ok(Masker {
            secrets: config.secrets,
            max_object_bytes: config.max_object_bytes,
            rules: compiled,
            detectors: detectors::Detectors::new(&config.detectors)?,
        })
    }

    /// The largest single object, event or list item a body may hold.
    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    /// The rule that refuses every read of `kind` outright, if any: the proxy can refuse
    /// such a request before forwarding it (rather than mid-stream).
    pub fn refusal_for_kind(&self, kind: &str) -> Option<&str> {
        if kind == "Secret" && self.secrets == Action::Refuse {
            return Some(secrets::SECRETS_RULE);
        }
        self.rules
            .iter()
            .find(|r| r.action == Action::Refuse && r.path.is_none() && r.applies_to(Some(kind)))
            .map(|r| r.name.as_str())
    }

    /// The rule that refuses every read of `resource` in API `group` outright, for a
    /// resource whose kind the proxy does not know by name (custom resources): a rule's
    /// kind matches when it is written `resource.group` (`resource` for the core group),
    /// or when its plural by the usual rules (`Widget` → `widgets`, `Policy` →
    /// `policies`, `Box` → `boxes`: what CRDs use unless told otherwise) is `resource`.
    /// Refusing before forwarding matters most for Tables, whose rows need not say their
    /// kind.
    pub fn refusal_for_resource(&self, group: &str, resource: &str) -> Option<&str> {
        if group.is_empty() && resource == "secrets" && self.secrets == Action::Refuse {
            return Some(secrets::SECRETS_RULE);
        }
        let qualified = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        self.rules
            .iter()
            .filter(|r| r.action == Action::Refuse && r.path.is_none())
            .find(|r| {
                r.kinds().is_empty()
                    || r.kinds()
                        .iter()
                        .any(|k| *k == qualified || conventional_plural(k) == resource)
            })
            .map(|r| r.name.as_str())
    }

    /// Masks a whole body held in memory: a JSON document (object, list, Table) or a
    /// watch stream (one event after another). Returns the masked body and the counts.
    pub fn mask_body(
        &self,
        body: &[u8],
        format: BodyFormat,
        ctx: &Context,
    ) -> Result<(Vec<u8>, MaskStats), MaskError> {
        let mut out = Vec::with_capacity(body.len());
        let mut masker = StreamMasker::new(self, format, ctx.clone());
        masker.push(body, &mut out)?;
        let stats = masker.finish(&mut out)?;
        Ok((out, stats))
    }

    /// Masks one parsed JSON document (object, list or Table) in place.
    pub fn mask_value(&self, doc: &mut Value, ctx: &Context) -> Result<MaskStats, MaskError> {
        let mut stats = MaskStats::default();
        let mut columns = None;
        self.mask_document(doc, ctx.kind.as_deref(), &mut columns, &mut stats)?;
        Ok(stats)
    }

    /// One watch event in place: `{"type": ..., "object": ...}`; bookmarks untouched.
    pub fn mask_event(&self, event: &mut Value, ctx: &Context) -> Result<MaskStats, MaskError> {
        let mut stats = MaskStats::default();
        let mut columns = None;
        self.mask_event_in(event, ctx.kind.as_deref(), &mut columns, &mut stats)?;
        Ok(stats)
    }

    pub(crate) fn mask_event_in(
        &self,
        event: &mut Value,
        hint: Option<&str>,
        columns: &mut Option<Vec<String>>,
        stats: &mut MaskStats,
    ) -> Result<(), MaskError> {
        let Some(fields) = event.as_object_mut() else {
            return Err(MaskError::Malformed(
                "a watch event is not an object".into(),
            ));
        };
        let kind = match fields.get("type") {
            Some(Value::String(t)) => t.clone(),
            _ => {
                return Err(MaskError::Malformed(
                    "a watch event has no string \"type\"".into(),
                ))
            }
        };
        if kind == "BOOKMARK" {
            return Ok(());
        }
        match fields.get_mut("object") {
            Some(object) => self.mask_document(object, hint, columns, stats),
            None => Err(MaskError::Malformed(
                "a watch event has no \"object\"".into(),
            )),
        }
    }

    /// A document: a list, a Table or a single object.
    pub(crate) fn mask_document(
        &self,
        doc: &mut Value,
        hint: Option<&str>,
        columns: &mut Option<Vec<String>>,
        stats: &mut MaskStats,
    ) -> Result<(), MaskError> {
        let kind = doc.get("kind").and_then(Value::as_str).map(str::to_string);
        match kind.as_deref() {
            Some("Table") => table::mask_table(self, doc, hint, columns, stats),
            Some(list) if list.ends_with("List") && doc.get("items").is_some() => {
                let item_kind = list_item_kind(list, hint).map(str::to_string);
                match doc.get_mut("items") {
                    Some(Value::Array(items)) => {
                        for item in items {
                            self.mask_object(item, item_kind.as_deref(), stats)?;
                        }
                        Ok(())
                    }
                    Some(Value::Null) => Ok(()),
                    Some(_) => Err(MaskError::Malformed(
                        "a list's \"items\" is not an array".into(),
                    )),
                    None => Ok(()),
                }
            }
            // A watch event where a document was expected: masked as an event (its
            // object is what matters), never as an object of the requested kind.
            None if is_watch_event(doc) => self.mask_event_in(doc, hint, columns, stats),
            _ => self.mask_object(doc, hint, stats),
        }
    }

    /// One Kubernetes object (any kind): refusals, Secret data, configured rules, the
    /// last-applied annotation, then the detectors. `fallback` is the kind to assume
    /// when the object does not say (list items) or is `PartialObjectMetadata`.
    pub(crate) fn mask_object(
        &self,
        obj: &mut Value,
        fallback: Option<&str>,
        stats: &mut MaskStats,
    ) -> Result<(), MaskError> {
        self.mask_object_at(obj, fallback, stats, 0)
    }

    fn mask_object_at(
        &self,
        obj: &mut Value,
        fallback: Option<&str>,
        stats: &mut MaskStats,
        depth: u32,
    ) -> Result<(), MaskError> {
        stats.objects += 1;
        if !obj.is_object() {
            // Not an object (a list item that is a string, say): only the detectors.
            stats.detector_hits += self.detectors.mask_strings(obj);
            return Ok(());
        }
        let own = obj.get("kind").and_then(Value::as_str);
        let kind: Option<String> = match own {
            Some("PartialObjectMetadata") | None => fallback.map(str::to_string),
            Some(k) => Some(k.to_string()),
        };
        let kind = kind.as_deref();

        // Unknown kind: treated as a possible Secret (fail closed).
        if kind.is_none() || kind == Some("Secret") {
            if self.secrets == Action::Refuse {
                return Err(MaskError::Refused {
                    rule: secrets::SECRETS_RULE.into(),
                    kind: kind.unwrap_or("object").into(),
                });
            }
            stats.secret_fields += secrets::mask_secret_data(obj);
        }
        for rule in &self.rules {
            if rule.applies_to(kind) {
                stats.rule_fields += rule.apply(obj, kind)?;
            }
        }
        if depth < 2 {
            if let Some(text) = secrets::last_applied_mut(obj) {
                let replaced = match strict::from_str(text) {
                    Ok(mut inner) if inner.is_object() => {
                        let mut inner_stats = MaskStats::default();
                        self.mask_object_at(&mut inner, kind, &mut inner_stats, depth + 1)?;
                        if inner_stats.masked() > 0 {
                            stats.secret_fields += inner_stats.secret_fields;
                            stats.rule_fields += inner_stats.rule_fields;
                            stats.detector_hits += inner_stats.detector_hits;
                            Some(serde_json::to_string(&inner).map_err(MaskError::malformed)?)
                        } else {
                            None
                        }
                    }
                    // Cannot be read: cannot be shown.
                    _ => Some(MASK_MARKER.to_string()),
                };
                if let Some(new) = replaced {
                    *text = new;
                    stats.annotations += 1;
                }
            }
        } else if let Some(text) = secrets::last_applied_mut(obj) {
            // An annotation inside an annotation: not parsed again, not shown either.
            *text = MASK_MARKER.to_string();
            stats.annotations += 1;
        }
        if self.detectors.applies_to(kind) {
            stats.detector_hits += self.detectors.mask_strings_except_last_applied(obj);
        }
        Ok(())
    }

    pub(crate) fn detectors(&self) -> &detectors::Detectors {
        &self.detectors
    }
}

/// The resource name a kind gets by default: lower case, plural by the usual English
/// rules (the API server's own default for CRDs and kubectl's guess).
pub fn conventional_plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    let consonant_y =
        lower.ends_with('y') && !lower[..lower.len() - 1].ends_with(['a', 'e', 'i', 'o', 'u']);
    if consonant_y {
        format!("{}ies", &lower[..lower.len() - 1])
    } else if lower.ends_with(['s', 'x', 'z']) || lower.ends_with("ch") || lower.ends_with("sh") {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

/// `{"type": "...", "object": {...}}` and no `kind`: the shape of a watch event.
fn is_watch_event(doc: &Value) -> bool {
    doc.get("type").is_some_and(Value::is_string) && doc.get("object").is_some_and(Value::is_object)
}

/// The kind of the items of a list of kind `list`: `SecretList` → `Secret`; for `List`
/// and `PartialObjectMetadataList`, the items say (or the request's kind does).
pub(crate) fn list_item_kind<'a>(list: &'a str, hint: Option<&'a str>) -> Option<&'a str> {
    match list.strip_suffix("List") {
        Some("") | Some("PartialObjectMetadata") | None => hint,
        Some(kind) => Some(kind),
    }
}

#[cfg(test)]
pub(crate) mod tests;
