//! The policy: which API calls of which callers are allowed, denied, or held for
//! people to approve.
//!
//! One YAML document, read and validated once into a [`Policy`]; a broken document is
//! refused as a whole with the line and column of every problem, so the agent can keep
//! the version it has (hot reload) and `gateway-agent policy check FILE` can point at the
//! mistake. Unknown fields are errors: in a security policy a misspelt `verbs:` must not
//! silently turn a narrow rule into one that matches everything.
//!
//! ```yaml
//! apiVersion: tollgate.dev/v1alpha1
//! kind: Policy
//! default: allow            # what applies when no rule matches: allow | deny
//! rules:                    # first match wins
//!   - name: no-secret-writes
//!     action: deny
//!     reason: agents may not change Secrets
//!     caller:               # every condition given must hold; none given = anyone
//!       namespaces: [agents]
//!       serviceAccounts: [agents/coder]
//!       podLabels: {team: ai}
//!       users: [...]
//!       groups: [...]
//!     request:              # RBAC's vocabulary
//!       verbs: [create, update, patch, delete, deletecollection]
//!       apiGroups: [""]
//!       resources: [secrets]          # resource or resource/subresource, "*" for any
//!       namespaces: [prod, "team-*"]  # "*" matches any run of characters
//!       names: ["*"]
//!       nonResourceURLs: [/version]   # instead of resources, for non-resource paths
//!   - name: workloads-need-review
//!     action: approve
//!     approval:
//!       mode: hold            # hold (the call waits) | retry (429 + Retry-After at once)
//!       steps:                # in order; each needs its approvals from its groups
//!         - name: sre
//!           groups: [sre]
//!           approvals: 1
//!         - groups: [security, compliance]
//!           approvals: 2
//!       holdTimeout: 5m       # hold mode: the client gets a 429 after this
//!       expireAfter: 1h       # a pending approval expires then
//!       retryAfter: 5s        # retry mode: the Retry-After the client is given
//!       executeAs: agents/deployer   # run the approved call as this service account
//!     request:
//!       verbs: [create, update, patch, delete]
//!       resources: [deployments, statefulsets, daemonsets]
//! masking:                  # what enforced pods may read (DESIGN §6); see crate::masking
//!   secrets: mask           # mask (the default) | refuse (every call on Secrets: 403)
//!   maxObjectBytes: 16777216
//!   detectors: {privateKeys: true, tokens: true, cloudKeys: true, patterns: [], kinds: []}
//!   rules:                  # replaces the default rules (credential-named env values
//!     - name: env-credentials   # of pod templates, ConfigMap keys); omit to keep them
//!       kinds: [Pod, Deployment]
//!       path: "@podSpec.containers|initContainers[].env[].value"
//!       namePattern: "(?i)password|token|secret|key"
//!       action: mask        # mask | refuse (the read is answered 403)
//! ```
//!
//! Without a `masking` section the defaults apply: Secret values, last-applied
//! annotations and credential-named env values and ConfigMap keys are masked and the
//! value detectors run (secure by default). A broken masking section (an unknown key, a
//! bad path or pattern, a rule named twice) is refused with its location like any other
//! problem, so a typo can never switch masking off.

pub mod source;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::masking::{self, Masker, MaskingConfig};
use crate::proxy::classify::RequestInfo;

/// What a rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Hold the call until people approve it (the rule's [`ApprovalRule`] says how).
    Approve,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Approve => "approve",
        })
    }
}

/// A validated policy, ready to decide requests.
#[derive(Debug, Clone)]
pub struct Policy {
    pub default: Action,
    pub rules: Vec<Rule>,
    /// The compiled `masking` section (the defaults when absent), applied to what
    /// enforced pods read.
    pub masker: Arc<Masker>,
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub reason: String,
    pub caller: CallerMatch,
    pub request: RequestMatch,
    /// Set exactly when `action` is `Approve`.
    pub approval: Option<Arc<ApprovalRule>>,
}

/// How a rule with `action: approve` holds its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRule {
    pub mode: crate::approvals::Mode,
    pub steps: Vec<crate::approvals::model::StepSpec>,
    /// Hold mode: how long the client waits before it gets a 429.
    pub hold_timeout: Duration,
    /// A pending approval expires this long after it was made; an approved one in
    /// retry mode must be used within it.
    pub expire_after: Duration,
    /// Retry mode: the Retry-After given to the client.
    pub retry_after: Duration,
    /// `(namespace, name)` of the service account the gateway impersonates to run the
    /// approved call.
    pub execute_as: Option<(String, String)>,
}

impl ApprovalRule {
    pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(3600);
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
}

#[derive(Debug, Clone, Default)]
pub struct CallerMatch {
    namespaces: Vec<Pattern>,
    service_accounts: Vec<(Pattern, Pattern)>,
    pod_labels: BTreeMap<String, String>,
    users: Vec<Pattern>,
    groups: Vec<Pattern>,
}

#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    verbs: Vec<String>,
    api_groups: Vec<Pattern>,
    resources: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    names: Vec<Pattern>,
    non_resource_urls: Vec<Pattern>,
}

/// Who is calling, as identity and discovery established it. Borrowed: it is built
/// for every request from what identity and discovery already hold.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub user: &'a str,
    pub groups: &'a [String],
    /// The pod's namespace and service account, when the caller is a pod.
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub pod_labels: &'a BTreeMap<String, String>,
}

/// The outcome for one request: the action and the rule that chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// `None` when the default applied.
    pub rule: Option<String>,
    pub reason: String,
    /// How to hold the call, when `action` is `Approve`.
    pub approval: Option<Arc<ApprovalRule>>,
}

impl Policy {
    /// Parses and validates a policy document. Every problem found is reported, each
    /// with its line and column.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = serde_saphyr::from_str(text).map_err(|err| {
            let location = err.location().map(|l| (l.line(), l.column()));
            PolicyError {
                problems: vec![Problem {
                    location,
                    message: parser_message(&err.to_string()),
                }],
            }
        })?;
        raw.validate()
    }

    /// Refuses everything: what is in force before a policy has been read.
    pub fn deny_all() -> Policy {
        Policy {
            default: Action::Deny,
            rules: Vec::new(),
            masker: masking::default_masker(),
        }
    }

    /// First matching rule wins; the default applies when none matches.
    pub fn decide(&self, caller: &Caller<'_>, request: &RequestInfo) -> Decision {
        for rule in &self.rules {
            if rule.caller.matches(caller) && rule.request.matches(request) {
                return Decision {
                    action: rule.action,
                    rule: Some(rule.name.clone()),
                    reason: rule.reason.clone(),
                    approval: rule.approval.clone(),
                };
            }
        }
        Decision {
            action: self.default,
            rule: None,
            reason: format!("no rule matched; the policy default is {}", self.default),
            approval: None,
        }
    }
}

/// The Roles and RoleBindings (YAML) that let the agent's service account impersonate
/// exactly the accounts this policy's `executeAs` rules name: one Role per account, in
/// its namespace, limited to it by `resourceNames`.
pub fn impersonation_rbac(policy: &Policy, agent_namespace: &str, agent_account: &str) -> String {
    let accounts: std::collections::BTreeSet<&(String, String)> = policy
        .rules
        .iter()
        .filter_map(|rule| rule.approval.as_ref()?.execute_as.as_ref())
        .collect();
    let mut out = String::new();
    if accounts.is_empty() {
        out.push_str("# No rule of this policy has executeAs: the agent needs no impersonation.\n");
    }
    for (namespace, name) in accounts {
        let role = format!("tollgate-impersonate-{name}");
        // Written line by line: YAML indentation must survive (a `\` line continuation
        // in a Rust string would eat it).
        let lines = [
            "---".to_owned(),
            "apiVersion: rbac.authorization.k8s.io/v1".to_owned(),
            "kind: Role".to_owned(),
            "metadata:".to_owned(),
            format!("  name: {role}"),
            format!("  namespace: {namespace}"),
            "rules:".to_owned(),
            "  - apiGroups: [\"\"]".to_owned(),
            "    resources: [serviceaccounts]".to_owned(),
            format!("    resourceNames: [{name}]"),
            "    verbs: [impersonate]".to_owned(),
            "---".to_owned(),
            "apiVersion: rbac.authorization.k8s.io/v1".to_owned(),
            "kind: RoleBinding".to_owned(),
            "metadata:".to_owned(),
            format!("  name: {role}"),
            format!("  namespace: {namespace}"),
            "roleRef:".to_owned(),
            "  apiGroup: rbac.authorization.k8s.io".to_owned(),
            "  kind: Role".to_owned(),
            format!("  name: {role}"),
            "subjects:".to_owned(),
            "  - kind: ServiceAccount".to_owned(),
            format!("    name: {agent_account}"),
            format!("    namespace: {agent_namespace}"),
        ];
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

impl CallerMatch {
    fn matches(&self, caller: &Caller<'_>) -> bool {
        any_or_empty(&self.namespaces, |p| p.matches(caller.namespace))
            && (self.service_accounts.is_empty()
                || self.service_accounts.iter().any(|(ns, name)| {
                    ns.matches(caller.namespace) && name.matches(caller.service_account)
                }))
            && self
                .pod_labels
                .iter()
                .all(|(k, v)| caller.pod_labels.get(k) == Some(v))
            && any_or_empty(&self.users, |p| p.matches(caller.user))
            && (self.groups.is_empty()
                || self
                    .groups
                    .iter()
                    .any(|p| caller.groups.iter().any(|g| p.matches(g))))
    }
}

impl RequestMatch {
    fn matches(&self, request: &RequestInfo) -> bool {
        let verb_ok =
            self.verbs.is_empty() || self.verbs.iter().any(|v| v == "*" || *v == request.verb);
        if !verb_ok {
            return false;
        }
        if !request.is_resource_request {
            // A rule about resources never matches a non-resource path, and the other
            // way round (as in RBAC).
            return !self.non_resource_urls.is_empty()
                && self
                    .non_resource_urls
                    .iter()
                    .any(|p| p.matches(&request.path));
        }
        if !self.non_resource_urls.is_empty() {
            return false;
        }
        let resource = request.resource_with_subresource();
        any_or_empty(&self.api_groups, |p| p.matches(&request.api_group))
            && any_or_empty(&self.resources, |p| p.matches(&resource))
            && any_or_empty(&self.namespaces, |p| p.matches(&request.namespace))
            && any_or_empty(&self.names, |p| p.matches(&request.name))
    }
}

fn any_or_empty(patterns: &[Pattern], f: impl Fn(&Pattern) -> bool) -> bool {
    patterns.is_empty() || patterns.iter().any(f)
}

/// A name with `*` wildcards (any run of characters, also none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }
}

/// Iterative wildcard match with backtracking to the last `*` (linear in practice, no
/// recursion, so a hostile pattern cannot blow the stack).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A policy that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column, when known.
    pub location: Option<(u64, u64)>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "line {line} column {column}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "policy has {n} problem{}", if n == 1 { "" } else { "s" })?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// The YAML parser's message without its own "error: line N column M:" prefix (the
/// location is reported separately), in words a policy author knows.
fn parser_message(message: &str) -> String {
    let mut text = message.lines().next().unwrap_or(message).trim();
    text = text.strip_prefix("error: ").unwrap_or(text);
    if text.starts_with("line ") {
        if let Some((_, rest)) = text.split_once(": ") {
            text = rest;
        }
    }
    text.replace(
        "unexpected event: expected mapping start",
        "expected a mapping (key: value pairs)",
    )
    .replace(
        "unexpected event: expected sequence start",
        "expected a list",
    )
    .replace(
        "unexpected event: expected string scalar",
        "expected a string",
    )
}

// ---- the document as written, before validation ----

const API_VERSION: &str = "tollgate.dev/v1alpha1";
const KIND: &str = "Policy";
/// Verbs the API server's RequestInfo produces (plus `*`).
const KNOWN_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "*",
];

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    api_version: S<String>,
    kind: S<String>,
    #[serde(default)]
    default: Option<S<String>>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    masking: Option<S<RawMasking>>,
}

/// The `masking` section as written: [`MaskingConfig`]'s shape, with locations kept
/// for the parts that can be wrong beyond their syntax.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMasking {
    #[serde(default)]
    secrets: Option<masking::Action>,
    #[serde(default)]
    max_object_bytes: Option<S<usize>>,
    #[serde(default)]
    detectors: Option<S<masking::DetectorsConfig>>,
    /// Absent: the default rules; given (even empty): exactly these.
    #[serde(default)]
    rules: Option<Vec<S<masking::RuleConfig>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    name: S<String>,
    action: S<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    caller: Option<RawCaller>,
    #[serde(default)]
    request: Option<RawRequest>,
    #[serde(default)]
    approval: Option<S<RawApproval>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawApproval {
    #[serde(default)]
    mode: Option<S<String>>,
    #[serde(default)]
    steps: Vec<S<RawStep>>,
    #[serde(default)]
    hold_timeout: Option<S<String>>,
    #[serde(default)]
    expire_after: Option<S<String>>,
    #[serde(default)]
    retry_after: Option<S<String>>,
    #[serde(default)]
    execute_as: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStep {
    #[serde(default)]
    name: String,
    #[serde(default)]
    groups: Vec<S<String>>,
    #[serde(default)]
    approvals: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCaller {
    #[serde(default)]
    namespaces: Vec<S<String>>,
    #[serde(default)]
    service_accounts: Vec<S<String>>,
    #[serde(default)]
    pod_labels: BTreeMap<String, String>,
    #[serde(default)]
    users: Vec<S<String>>,
    #[serde(default)]
    groups: Vec<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequest {
    #[serde(default)]
    verbs: Vec<S<String>>,
    #[serde(default)]
    api_groups: Vec<S<String>>,
    #[serde(default)]
    resources: Vec<S<String>>,
    #[serde(default)]
    namespaces: Vec<S<String>>,
    #[serde(default)]
    names: Vec<S<String>>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<S<String>>,
}

struct Problems(Vec<Problem>);

impl Problems {
    fn at<T>(&mut self, spanned: &S<T>, message: impl Into<String>) {
        self.0.push(Problem {
            location: Some((spanned.referenced.line(), spanned.referenced.column())),
            message: message.into(),
        });
    }
}

fn parse_action(value: &S<String>, problems: &mut Problems) -> Option<Action> {
    match value.value.as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        "approve" => Some(Action::Approve),
        other => {
            problems.at(
                value,
                format!("unknown action {other:?}; expected allow, deny or approve"),
            );
            None
        }
    }
}

/// `30s`, `5m`, `1h`, `1h30m`: a positive duration.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        let n: u64 = number.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        number.clear();
        any = true;
    }
    (number.is_empty() && any && total > 0).then(|| Duration::from_secs(total))
}

fn duration_field(
    value: &Option<S<String>>,
    field: &str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    match value {
        None => default,
        Some(v) => parse_duration(&v.value).unwrap_or_else(|| {
            problems.at(
                v,
                format!(
                    "{field} {:?} is not a duration such as 30s, 5m or 1h",
                    v.value
                ),
            );
            default
        }),
    }
}

fn approval_rule(
    rule: &S<String>,
    action: Option<Action>,
    raw: Option<S<RawApproval>>,
    problems: &mut Problems,
) -> Option<Arc<ApprovalRule>> {
    let raw = match (action, raw) {
        (Some(Action::Approve), Some(raw)) => raw,
        (Some(Action::Approve), None) => {
            problems.at(
                rule,
                "a rule with action approve needs an approval section with at least one step",
            );
            return None;
        }
        (_, Some(raw)) => {
            problems.at(
                &raw,
                "an approval section belongs only to a rule with action approve",
            );
            return None;
        }
        (_, None) => return None,
    };
    let approval = &raw.value;
    let mode = match approval.mode.as_ref().map(|m| (m, m.value.as_str())) {
        None | Some((_, "hold")) => crate::approvals::Mode::Hold,
        Some((_, "retry")) => crate::approvals::Mode::Retry,
        Some((m, other)) => {
            problems.at(m, format!("unknown mode {other:?}; expected hold or retry"));
            crate::approvals::Mode::Hold
        }
    };
    if approval.steps.is_empty() {
        problems.at(&raw, "an approval needs at least one step");
    }
    let mut steps = Vec::with_capacity(approval.steps.len());
    for step in &approval.steps {
        if step.value.groups.is_empty() {
            problems.at(step, "a step needs the reviewer groups that may approve it");
        }
        for g in &step.value.groups {
            if g.value.trim().is_empty() {
                problems.at(g, "empty group name");
            }
        }
        let approvals = step.value.approvals.unwrap_or(1);
        if approvals == 0 {
            problems.at(step, "a step needs at least 1 approval");
        }
        steps.push(crate::approvals::model::StepSpec {
            name: step.value.name.clone(),
            groups: step.value.groups.iter().map(|g| g.value.clone()).collect(),
            approvals,
        });
    }
    let execute_as = approval
        .execute_as
        .as_ref()
        .and_then(|v| match v.value.split_once('/') {
            Some((ns, name))
                if valid_dns_label(ns) && valid_dns_subdomain(name) && !name.contains('/') =>
            {
                Some((ns.to_owned(), name.to_owned()))
            }
            _ => {
                problems.at(
                    v,
                    format!(
                        "executeAs {:?} must name a service account as namespace/name",
                        v.value
                    ),
                );
                None
            }
        });
    Some(Arc::new(ApprovalRule {
        mode,
        steps,
        hold_timeout: duration_field(
            &approval.hold_timeout,
            "holdTimeout",
            ApprovalRule::DEFAULT_HOLD_TIMEOUT,
            problems,
        ),
        expire_after: duration_field(
            &approval.expire_after,
            "expireAfter",
            ApprovalRule::DEFAULT_EXPIRE_AFTER,
            problems,
        ),
        retry_after: duration_field(
            &approval.retry_after,
            "retryAfter",
            ApprovalRule::DEFAULT_RETRY_AFTER,
            problems,
        ),
        execute_as,
    }))
}

/// Compiles the `masking` section; every problem is reported at the part it is about
/// (the section, its detectors, or the rule).
fn masking_section(raw: Option<S<RawMasking>>, problems: &mut Problems) -> Arc<Masker> {
    let Some(raw) = raw else {
        return masking::default_masker();
    };
    let reported = problems.0.len();
    let mut config = MaskingConfig::default();
    let section = &raw.value;
    if let Some(secrets) = section.secrets {
        config.secrets = secrets;
    }
    if let Some(max) = &section.max_object_bytes {
        if max.value < 1024 {
            problems.at(max, "maxObjectBytes must be at least 1024");
        }
        config.max_object_bytes = max.value.max(1024);
    }
    if let Some(detectors) = &section.detectors {
        if let Err(err) = masking::detectors::Detectors::new(&detectors.value) {
            problems.at(detectors, err.to_string());
        }
        config.detectors = detectors.value.clone();
    }
    if let Some(rules) = &section.rules {
        let mut names = HashSet::new();
        for rule in rules {
            if rule.value.name.trim().is_empty() {
                problems.at(rule, "a masking rule needs a name");
            } else if !names.insert(rule.value.name.as_str()) {
                problems.at(
                    rule,
                    format!("masking rule name {:?} is used twice", rule.value.name),
                );
            } else if let Err(err) = masking::rules::Rule::compile(&rule.value) {
                problems.at(rule, err.to_string());
            }
        }
        config.rules = rules.iter().map(|r| r.value.clone()).collect();
    }
    match Masker::new(&config) {
        Ok(masker) => Arc::new(masker),
        Err(err) => {
            // Only reached for a problem already reported above; never let a broken
            // section through, even so.
            if problems.0.len() == reported {
                problems.at(&raw, err.to_string());
            }
            masking::default_masker()
        }
    }
}

fn valid_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

fn valid_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(valid_dns_label)
}

fn patterns(values: &[S<String>], what: &str, problems: &mut Problems) -> Vec<Pattern> {
    values
        .iter()
        .filter_map(|v| {
            if v.value.is_empty() && what != "apiGroups" {
                problems.at(v, format!("empty string in {what}"));
                None
            } else {
                Some(Pattern(v.value.clone()))
            }
        })
        .collect()
}

impl RawPolicy {
    fn validate(self) -> Result<Policy, PolicyError> {
        let mut problems = Problems(Vec::new());
        if self.api_version.value != API_VERSION {
            problems.at(
                &self.api_version,
                format!(
                    "apiVersion {:?} is not supported; expected {API_VERSION}",
                    self.api_version.value
                ),
            );
        }
        if self.kind.value != KIND {
            problems.at(
                &self.kind,
                format!(
                    "kind {:?} is not a policy; expected {KIND}",
                    self.kind.value
                ),
            );
        }
        let default = match &self.default {
            None => Some(Action::Allow),
            Some(value) => match parse_action(value, &mut problems) {
                Some(Action::Approve) => {
                    problems.at(
                        value,
                        "the default must be allow or deny; hold calls with a rule that says approve",
                    );
                    None
                }
                other => other,
            },
        };
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(self.rules.len());
        for raw in self.rules {
            if raw.name.value.trim().is_empty() {
                problems.at(&raw.name, "a rule needs a name");
            } else if !names.insert(raw.name.value.clone()) {
                problems.at(
                    &raw.name,
                    format!("rule name {:?} is used twice", raw.name.value),
                );
            }
            let action = parse_action(&raw.action, &mut problems);
            let approval = approval_rule(&raw.name, action, raw.approval, &mut problems);
            let caller = raw.caller.unwrap_or_default();
            let request = raw.request.unwrap_or_default();

            let mut service_accounts = Vec::new();
            for sa in &caller.service_accounts {
                match sa.value.split_once('/') {
                    Some((ns, name))
                        if !ns.is_empty() && !name.is_empty() && !name.contains('/') =>
                    {
                        service_accounts.push((Pattern(ns.to_owned()), Pattern(name.to_owned())))
                    }
                    _ => problems.at(
                        sa,
                        format!(
                            "service account {:?} must be written namespace/name",
                            sa.value
                        ),
                    ),
                }
            }
            for verb in &request.verbs {
                if !KNOWN_VERBS.contains(&verb.value.as_str()) {
                    problems.at(
                        verb,
                        format!(
                            "unknown verb {:?}; known verbs: {}",
                            verb.value,
                            KNOWN_VERBS.join(", ")
                        ),
                    );
                }
            }
            let resource_fields = !request.resources.is_empty()
                || !request.api_groups.is_empty()
                || !request.names.is_empty()
                || !request.namespaces.is_empty();
            if let (true, Some(first)) = (resource_fields, request.non_resource_urls.first()) {
                problems.at(
                    first,
                    "nonResourceURLs cannot be combined with apiGroups, resources, namespaces or names",
                );
            }
            for url in &request.non_resource_urls {
                if !url.value.starts_with('/') {
                    problems.at(
                        url,
                        format!("non-resource URL {:?} must start with /", url.value),
                    );
                }
            }
            let rule = Rule {
                name: raw.name.value.clone(),
                action: action.unwrap_or(Action::Deny),
                reason: raw
                    .reason
                    .unwrap_or_else(|| format!("denied by policy rule {:?}", raw.name.value)),
                caller: CallerMatch {
                    namespaces: patterns(&caller.namespaces, "namespaces", &mut problems),
                    service_accounts,
                    pod_labels: caller.pod_labels,
                    users: patterns(&caller.users, "users", &mut problems),
                    groups: patterns(&caller.groups, "groups", &mut problems),
                },
                request: RequestMatch {
                    verbs: request.verbs.iter().map(|v| v.value.clone()).collect(),
                    api_groups: patterns(&request.api_groups, "apiGroups", &mut problems),
                    resources: patterns(&request.resources, "resources", &mut problems),
                    namespaces: patterns(&request.namespaces, "namespaces", &mut problems),
                    names: patterns(&request.names, "names", &mut problems),
                    non_resource_urls: patterns(
                        &request.non_resource_urls,
                        "nonResourceURLs",
                        &mut problems,
                    ),
                },
                approval,
            };
            rules.push(rule);
        }
        let masker = masking_section(self.masking, &mut problems);
        if !problems.0.is_empty() {
            return Err(PolicyError {
                problems: problems.0,
            });
        }
        Ok(Policy {
            default: default.unwrap_or(Action::Deny),
            rules,
            masker,
        })
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::proxy::classify::classify;

    const POLICY: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: no-secret-writes
    action: deny
    reason: agents may not change Secrets
    caller:
      namespaces: [agents]
    request:
      verbs: [create, update, patch, delete, deletecollection]
      apiGroups: [""]
      resources: [secrets]
  - name: no-exec-into-prod
    action: deny
    request:
      resources: [pods/exec, pods/attach]
      namespaces: ["prod-*"]
  - name: coder-reads
    action: allow
    caller:
      serviceAccounts: [agents/coder]
      podLabels: {team: ai}
    request:
      verbs: [get, list, watch]
  - name: nothing-else-for-coder
    action: deny
    reason: the coder agent only reads
    caller:
      serviceAccounts: ["agents/coder"]
  - name: no-version
    action: deny
    request:
      nonResourceURLs: [/version]
"#;

    fn request(method: Method, path: &str) -> RequestInfo {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        classify(&method, path, query).unwrap()
    }

    /// A caller's identity, owned, for tests to borrow a [`Caller`] from.
    #[derive(Default)]
    struct Who {
        user: String,
        groups: Vec<String>,
        namespace: String,
        service_account: String,
        pod_labels: BTreeMap<String, String>,
    }

    impl Who {
        fn caller(&self) -> Caller<'_> {
            Caller {
                user: &self.user,
                groups: &self.groups,
                namespace: &self.namespace,
                service_account: &self.service_account,
                pod_labels: &self.pod_labels,
            }
        }
    }

    fn coder() -> Who {
        Who {
            user: "system:serviceaccount:agents:coder".into(),
            groups: vec!["system:serviceaccounts".into()],
            namespace: "agents".into(),
            service_account: "coder".into(),
            pod_labels: [("team".to_owned(), "ai".to_owned())].into(),
        }
    }

    #[test]
    fn first_match_wins_and_default_applies() {
        let policy = Policy::parse(POLICY).unwrap();
        let d = policy.decide(
            &coder().caller(),
            &request(Method::POST, "/api/v1/namespaces/agents/secrets"),
        );
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.rule.as_deref(), Some("no-secret-writes"));
        assert_eq!(d.reason, "agents may not change Secrets");

        let d = policy.decide(
            &coder().caller(),
            &request(Method::GET, "/api/v1/namespaces/agents/secrets"),
        );
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Allow, Some("coder-reads"))
        );

        let d = policy.decide(
            &coder().caller(),
            &request(
                Method::PATCH,
                "/apis/apps/v1/namespaces/agents/deployments/x",
            ),
        );
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Deny, Some("nothing-else-for-coder"))
        );

        // Another caller falls through to the default.
        let other = Who {
            namespace: "team-a".into(),
            service_account: "builder".into(),
            ..Who::default()
        };
        let other = other.caller();
        let d = policy.decide(
            &other,
            &request(
                Method::PATCH,
                "/apis/apps/v1/namespaces/agents/deployments/x",
            ),
        );
        assert_eq!((d.action, d.rule), (Action::Allow, None));

        // Subresources and namespace globs.
        let d = policy.decide(
            &other,
            &request(Method::POST, "/api/v1/namespaces/prod-eu/pods/p/exec"),
        );
        assert_eq!(d.rule.as_deref(), Some("no-exec-into-prod"));
        let d = policy.decide(
            &other,
            &request(Method::POST, "/api/v1/namespaces/staging/pods/p/exec"),
        );
        assert_eq!(d.rule, None);

        // Non-resource URLs only match non-resource rules.
        let d = policy.decide(&other, &request(Method::GET, "/version"));
        assert_eq!(d.rule.as_deref(), Some("no-version"));
    }

    #[test]
    fn labels_must_all_match() {
        let policy = Policy::parse(POLICY).unwrap();
        let mut caller = coder();
        caller.pod_labels.insert("team".into(), "web".into());
        let d = policy.decide(
            &caller.caller(),
            &request(Method::GET, "/api/v1/namespaces/agents/pods"),
        );
        assert_eq!(d.rule.as_deref(), Some("nothing-else-for-coder"));
    }

    #[test]
    fn errors_name_line_and_column() {
        let text = "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nrules:\n  - name: a\n    action: deny\n    request:\n      verbs: [get, delet]\n";
        let err = Policy::parse(text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].location, Some((7, 20)), "{err}");
        assert!(
            err.problems[0].message.contains("unknown verb \"delet\""),
            "{err}"
        );
    }

    #[test]
    fn misspelt_fields_are_refused_not_ignored() {
        let text = "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nrules:\n  - name: a\n    action: deny\n    request:\n      verb: [delete]\n";
        let err = Policy::parse(text).unwrap_err();
        assert_eq!(err.problems[0].location.map(|l| l.0), Some(7), "{err}");
        assert!(err.to_string().contains("verb"), "{err}");
    }

    #[test]
    fn approve_rules_need_an_approval_section() {
        let text = "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nrules:\n  - name: a\n    action: approve\n";
        let err = Policy::parse(text).unwrap_err();
        assert_eq!(err.problems[0].location, Some((4, 11)));
        assert!(err.problems[0].message.contains("approval section"));
    }

    #[test]
    fn approve_rules_carry_steps_mode_and_bounds() {
        let text = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
rules:
  - name: review-deployments
    action: approve
    approval:
      mode: retry
      steps:
        - name: sre
          groups: [sre]
        - groups: [security, compliance]
          approvals: 2
      holdTimeout: 90s
      expireAfter: 1h30m
      executeAs: agents/deployer
    request:
      verbs: [create]
      resources: [deployments]
"#;
        let policy = Policy::parse(text).unwrap();
        let who = coder();
        let d = policy.decide(
            &who.caller(),
            &request(Method::POST, "/apis/apps/v1/namespaces/x/deployments"),
        );
        assert_eq!(d.action, Action::Approve);
        let a = d.approval.unwrap();
        assert_eq!(a.mode, crate::approvals::Mode::Retry);
        assert_eq!(a.steps.len(), 2);
        assert_eq!(a.steps[0].approvals, 1);
        assert_eq!(a.steps[1].groups, ["security", "compliance"]);
        assert_eq!(a.steps[1].approvals, 2);
        assert_eq!(a.hold_timeout, Duration::from_secs(90));
        assert_eq!(a.expire_after, Duration::from_secs(5400));
        assert_eq!(a.retry_after, ApprovalRule::DEFAULT_RETRY_AFTER);
        assert_eq!(
            a.execute_as,
            Some(("agents".to_owned(), "deployer".to_owned()))
        );
    }

    #[test]
    fn broken_approval_sections_are_refused_with_locations() {
        let text = r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
default: approve
rules:
  - name: a
    action: approve
    approval:
      mode: later
      steps:
        - groups: []
          approvals: 0
      holdTimeout: soon
      executeAs: not-a-service-account
  - name: b
    action: deny
    approval:
      steps: [{groups: [x]}]
"#;
        let err = Policy::parse(text).unwrap_err();
        let messages: Vec<String> = err
            .problems
            .iter()
            .map(|p| format!("{:?} {}", p.location, p.message))
            .collect();
        let all = messages.join("\n");
        for expected in [
            "Some((3, 10)) the default must be allow or deny",
            "Some((8, 13)) unknown mode \"later\"",
            "needs the reviewer groups",
            "at least 1 approval",
            "Some((12, 20)) holdTimeout \"soon\"",
            "Some((13, 18)) executeAs",
            "belongs only to a rule with action approve",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in\n{all}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        for bad in ["", "5", "0s", "5x", "m", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "apiVersion: v1\nkind: ConfigMap\ndefault: maybe\nrules:\n  - name: a\n    action: deny\n  - name: a\n    action: allow\n    caller:\n      serviceAccounts: [coder]\n";
        let err = Policy::parse(text).unwrap_err();
        let lines: Vec<u64> = err
            .problems
            .iter()
            .filter_map(|p| p.location.map(|l| l.0))
            .collect();
        assert_eq!(lines, vec![1, 2, 3, 7, 10], "{err}");
    }

    #[test]
    fn syntax_errors_have_locations() {
        for text in ["kind: [", "apiVersion: x\n  kind: y: z\n", "\t- a"] {
            let err = Policy::parse(text).unwrap_err();
            assert!(err.problems[0].location.is_some(), "{text:?}: {err}");
        }
    }

    #[test]
    fn masking_defaults_when_absent_and_configured_when_present() {
        let policy = Policy::parse(POLICY).unwrap();
        // Secure by default: Secrets are masked, not refused.
        assert_eq!(policy.masker.refusal_for_kind("Secret"), None);
        let mut secret = serde_json::json!({"kind": "Secret", "data": {"k": "c2VjcmV0"}});
        let stats = policy
            .masker
            .mask_value(&mut secret, &masking::Context::default())
            .unwrap();
        assert_eq!(stats.secret_fields, 1);

        let text = format!(
            "{POLICY}masking:\n  secrets: refuse\n  maxObjectBytes: 65536\n  detectors:\n    patterns: [\"corp_[0-9a-f]{{8}}\"]\n  rules:\n    - name: no-widgets\n      kinds: [Widget]\n      action: refuse\n"
        );
        let policy = Policy::parse(&text).unwrap();
        assert_eq!(policy.masker.refusal_for_kind("Secret"), Some("secrets"));
        assert_eq!(policy.masker.refusal_for_kind("Widget"), Some("no-widgets"));
        assert_eq!(policy.masker.max_object_bytes(), 65536);
        let mut cm = serde_json::json!({"kind": "ConfigMap", "data": {"a": "id corp_0123abcd"}});
        policy
            .masker
            .mask_value(&mut cm, &masking::Context::default())
            .unwrap();
        assert_eq!(cm["data"]["a"], format!("id {}", masking::MASK_MARKER));
        // Given rules replace the defaults: env values are no longer masked.
        let mut pod = serde_json::json!({"kind": "Pod", "spec": {"containers": [
            {"name": "c", "env": [{"name": "API_TOKEN", "value": "plain"}]}]}});
        policy
            .masker
            .mask_value(&mut pod, &masking::Context::default())
            .unwrap();
        assert_eq!(pod["spec"]["containers"][0]["env"][0]["value"], "plain");
    }

    #[test]
    fn broken_masking_sections_are_refused_with_locations() {
        let base = "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\n";
        // A misspelt key (line 4): refused, never ignored.
        let err = Policy::parse(&format!("{base}masking:\n  secret: refuse\n")).unwrap_err();
        assert_eq!(err.problems[0].location.map(|l| l.0), Some(4), "{err}");
        assert!(err.to_string().contains("secret"), "{err}");
        // An unknown action value.
        let err = Policy::parse(&format!("{base}masking:\n  secrets: hide\n")).unwrap_err();
        assert_eq!(err.problems[0].location.map(|l| l.0), Some(4), "{err}");
        // An unknown key inside a rule.
        let err = Policy::parse(&format!(
            "{base}masking:\n  rules:\n    - name: a\n      pth: data.*\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems[0].location.map(|l| l.0), Some(6), "{err}");

        // Problems found after reading: each at its rule or section.
        let text = format!(
            "{base}masking:\n  maxObjectBytes: 10\n  detectors:\n    patterns: [\"(unclosed\"]\n  rules:\n    - name: bad-pattern\n      path: data.*\n      namePattern: \"[\"\n    - name: bad-path\n      path: \"@podSpec.@podSpec\"\n    - name: mask-nothing\n    - name: bad-pattern\n      path: data.*\n"
        );
        let err = Policy::parse(&text).unwrap_err();
        let all: Vec<String> = err
            .problems
            .iter()
            .map(|p| format!("{:?} {}", p.location.map(|l| l.0), p.message))
            .collect();
        let all = all.join("\n");
        for expected in [
            "Some(4) maxObjectBytes must be at least 1024",
            "Some(6) masking detector pattern \"(unclosed\"",
            "Some(8) masking rule \"bad-pattern\": invalid name pattern",
            "Some(11) masking rule \"bad-path\": invalid path",
            "Some(13) masking rule \"mask-nothing\": a rule without a path can only refuse",
            "Some(14) masking rule name \"bad-pattern\" is used twice",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in\n{all}");
        }
    }

    #[test]
    fn glob() {
        let p = |s: &str| Pattern(s.to_owned());
        assert!(p("*").matches(""));
        assert!(p("team-*").matches("team-a"));
        assert!(!p("team-*").matches("teams"));
        assert!(p("*-prod").matches("eu-prod"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exactly"));
        // Pathological patterns stay fast.
        let long = "a".repeat(10_000);
        assert!(!p("*a*a*a*a*a*a*a*b").matches(&long));
    }
}
