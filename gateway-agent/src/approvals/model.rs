//! What an approval is (DESIGN §5): the held call, who made it, what it would do, the
//! steps reviewers must complete, and every decision. Pure data and the state machine
//! that applies one reviewer's decision; the stores persist it, the proxy creates it,
//! the REST API decides on it.
//!
//! The same JSON shape is the embedded store's record, the `spec`/`status` of the
//! `ApprovalRequest` custom resource (camelCase), and the REST API's answer.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where an approval is in its life. Every state but `Pending` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum State {
    #[default]
    Pending,
    Approved,
    Denied,
    Expired,
    /// The client went away while its request was held (hold mode), or the agent that
    /// held it restarted.
    Cancelled,
}

impl State {
    pub fn is_final(self) -> bool {
        self != State::Pending
    }
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "Pending",
            State::Approved => "Approved",
            State::Denied => "Denied",
            State::Expired => "Expired",
            State::Cancelled => "Cancelled",
        }
    }
    /// Case-insensitive, for `?state=pending` and the CLI.
    pub fn parse(text: &str) -> Option<State> {
        [
            State::Pending,
            State::Approved,
            State::Denied,
            State::Expired,
            State::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the client waits (per policy rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The request stays open until it is decided or the hold bound passes.
    #[default]
    Hold,
    /// The client gets 429 + Retry-After at once; the same request, sent again after
    /// approval, goes through exactly once.
    Retry,
}

/// One approval: spec (what was asked, fixed at creation) and status (what reviewers
/// did). `id` is a valid Kubernetes object name (`ar-` + 16 hex digits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequest {
    pub id: String,
    pub spec: ApprovalSpec,
    pub status: ApprovalStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSpec {
    pub requester: Requester,
    pub request: HeldRequest,
    /// The policy rule that asked for approval.
    pub rule: String,
    pub mode: Mode,
    /// `namespace/name` of the service account the gateway impersonates to run the
    /// approved call, when the rule says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute_as: Option<String>,
    /// The steps, in order; each must be complete before the next one counts.
    pub steps: Vec<StepSpec>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: a pending approval expires then; an approved one in retry mode must
    /// be used by then.
    pub expires_at: String,
    /// What the server-side dry-run said the call would do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Requester {
    pub user: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub pod_namespace: String,
    pub pod_name: String,
    pub node: String,
    /// The proxy session (client connection) the call came on.
    #[serde(default)]
    pub session: String,
}

/// The call being held. The body itself is not stored: in hold mode the proxy keeps
/// it in memory; in retry mode the client sends it again and `fingerprint` proves it
/// is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldRequest {
    /// The Audit-ID of the first attempt.
    pub audit_id: String,
    pub verb: String,
    pub method: String,
    /// Path and query as the client sent them.
    pub uri: String,
    #[serde(default)]
    pub api_group: String,
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub content_type: String,
    /// Hex SHA-256 of the request body as sent.
    pub body_sha256: String,
    /// Hex SHA-256 over user, verb, method, uri and body: what makes a retried request
    /// "the same request".
    pub fingerprint: String,
}

/// The server-side dry-run of the call (`dryRun=All`, with the caller's token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    /// The object the API server said would result (masked, managedFields dropped);
    /// `None` when the call does not return one or it was too large to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<Value>,
    /// Unified diff (YAML lines) from the live object to `object`; for a create, every
    /// line is added; for a delete, every line removed.
    #[serde(default)]
    pub diff: String,
    /// Set when something about the preview is incomplete (e.g. truncated).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepSpec {
    #[serde(default)]
    pub name: String,
    /// A reviewer must be in one of these groups.
    pub groups: Vec<String>,
    /// Distinct reviewers who must approve.
    pub approvals: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    pub state: State,
    /// Every decision, in order.
    #[serde(default)]
    pub decisions: Vec<Decision>,
    /// RFC 3339, when the state became final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// Why the state is what it is (the denial's reason, "expired", ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Set once, when the approved call was sent to the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<Execution>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approve,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub reviewer: String,
    #[serde(default)]
    pub reviewer_groups: Vec<String>,
    pub verdict: Verdict,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
    /// Index into `spec.steps` this decision counted for.
    pub step: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    /// RFC 3339.
    pub at: String,
    /// The node whose agent sent it.
    pub node: String,
    /// The API server's HTTP status code, once known (0 while in flight).
    #[serde(default)]
    pub code: u16,
}

/// A reviewer, as the REST API authenticated them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewer {
    pub user: String,
    pub groups: Vec<String>,
}

/// Why a decision was not taken. Each maps to an HTTP status in the REST API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("approval {id} is already {state}")]
    AlreadyFinal { id: String, state: State },
    #[error("{reviewer} made this request and cannot review it")]
    SelfReview { reviewer: String },
    #[error("{reviewer} is in none of the groups of step {step} ({groups})")]
    NotInStepGroups {
        reviewer: String,
        step: usize,
        groups: String,
    },
    #[error("{reviewer} already approved step {step}")]
    AlreadyApproved { reviewer: String, step: usize },
    #[error("a reason is required")]
    MissingReason,
    #[error("approval {id} is {state}, not Approved")]
    NotApproved { id: String, state: State },
    #[error("approval {id} was already used at {at}")]
    AlreadyExecuted { id: String, at: String },
}

impl ApprovalRequest {
    /// The step reviewers act on now: the first not yet complete.
    pub fn current_step(&self) -> Option<usize> {
        (0..self.spec.steps.len())
            .find(|&i| self.approvals_in_step(i) < self.spec.steps[i].approvals)
    }

    fn approvals_in_step(&self, step: usize) -> u32 {
        self.status
            .decisions
            .iter()
            .filter(|d| d.step == step && d.verdict == Verdict::Approve)
            .count() as u32
    }

    /// Applies one reviewer's decision: the requester may never review their own
    /// request; the reviewer must be in the current step's groups; one denial ends it;
    /// the last approval of the last step approves it.
    pub fn decide(
        &mut self,
        reviewer: &Reviewer,
        verdict: Verdict,
        reason: &str,
        now: &str,
    ) -> Result<State, DecisionError> {
        if self.status.state.is_final() {
            return Err(DecisionError::AlreadyFinal {
                id: self.id.clone(),
                state: self.status.state,
            });
        }
        if reviewer.user == self.spec.requester.user {
            return Err(DecisionError::SelfReview {
                reviewer: reviewer.user.clone(),
            });
        }
        let reason = reason.trim();
        if verdict == Verdict::Deny && reason.is_empty() {
            return Err(DecisionError::MissingReason);
        }
        // With every step complete the state is already Approved, so there is one.
        let step = self.current_step().unwrap_or(0);
        let spec = &self.spec.steps[step];
        if !spec
            .groups
            .iter()
            .any(|g| reviewer.groups.iter().any(|rg| rg == g))
        {
            return Err(DecisionError::NotInStepGroups {
                reviewer: reviewer.user.clone(),
                step,
                groups: spec.groups.join(", "),
            });
        }
        if verdict == Verdict::Approve
            && self
                .status
                .decisions
                .iter()
                .any(|d| d.step == step && d.reviewer == reviewer.user)
        {
            return Err(DecisionError::AlreadyApproved {
                reviewer: reviewer.user.clone(),
                step,
            });
        }
        self.status.decisions.push(Decision {
            reviewer: reviewer.user.clone(),
            reviewer_groups: reviewer.groups.clone(),
            verdict,
            reason: reason.to_owned(),
            at: now.to_owned(),
            step,
        });
        match verdict {
            Verdict::Deny => {
                self.finish(
                    State::Denied,
                    format!("denied by {}: {reason}", reviewer.user),
                    now,
                );
            }
            Verdict::Approve if self.current_step().is_none() => {
                let by: Vec<&str> = self
                    .status
                    .decisions
                    .iter()
                    .map(|d| d.reviewer.as_str())
                    .collect();
                self.finish(
                    State::Approved,
                    format!("approved by {}", by.join(", ")),
                    now,
                );
            }
            Verdict::Approve => {}
        }
        Ok(self.status.state)
    }

    /// Moves to a final state (no-op when already final).
    pub fn finish(&mut self, state: State, message: String, now: &str) {
        if self.status.state.is_final() {
            return;
        }
        self.status.state = state;
        self.status.message = message;
        self.status.decided_at = Some(now.to_owned());
    }
}

/// Now, as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

pub fn format_rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn parse_rfc3339(text: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// A new approval id: `ar-` and 16 random hex digits (a valid object name).
pub fn new_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    let mut id = String::from("ar-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}
