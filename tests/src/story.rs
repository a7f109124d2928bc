//! Tollgate's story, told by `cargo xtask demo` (`tollgate-demo`) and checked by suite
//! `e2e`: both run these steps, one after the other, on the local control plane and
//! simulated node 1. Each step does what a person or a coding agent would do and
//! returns what it observed (the real command output and the state of the cluster
//! after it), so the demo prints exactly what the suite asserts.
//!
//! The scene: namespace `demo-…` holds Deployment `checkout` (2 replicas, image 1.4)
//! and Secret `checkout-db`, applied by the admin. Pod `coding-agent` (labelled
//! `tollgate.dev/enforce=true`) runs kubectl as service account `coding-agent`, which
//! RBAC lets change Deployments and ConfigMaps and read Secrets there. Reviewer `alice`
//! is a service account of namespace `demo-sre-…`, so she is in the group the policy's
//! one review step names, and RBAC (`deploy/reviewer-rbac.yaml`) lets her review the
//! demo namespace's calls. One Tollgate agent runs on node 1 with the Kubernetes
//! approval store, so `kubectl get approvalrequests` shows the queue, and this policy:
//! deletes of workloads are denied, creates/updates/patches of them wait for one
//! approval (hold mode), everything else is allowed; Secrets are masked by default.
//!
//! The steps:
//! a. [`Story::hold_an_apply`]: the pod's `kubectl apply` of a new checkout version is
//!    held;
//! b. [`Story::show_dry_run`]: `approvals show` prints the server-side dry-run diff;
//! c. [`Story::approve`] (or [`Story::review_by_hand`] and [`Story::wait_for_decision`]
//!    for a person): a reviewer approves with the CLI;
//! d. [`Story::finish_apply`]: kubectl prints its own line, the Deployment changed;
//! e. [`Story::read_secret`]: the pod reads the Secret and sees the mask, the admin the
//!    value;
//! f. [`Story::delete_workload`]: the pod's delete is refused with the rule's reason;
//! g. [`Story::replay_session`]: `sessions list`, `show` (the apply's session) and
//!    `verify`.
//!
//! Everything the story makes (namespaces, pod, agent, kernel pins, files) is removed
//! when the [`Story`] is dropped, also after a failed step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;

use crate::agent::{AgentOptions, RunningAgent};
use crate::cluster::controlplane::{self, Layout};
use crate::cluster::harness::StreamingExec;
use crate::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};

/// The enforced pod, and the service account it runs as.
pub const AGENT_POD: &str = "coding-agent";
/// The Deployment the coding agent changes and then tries to delete.
pub const DEPLOYMENT: &str = "checkout";
/// The Secret the coding agent reads.
pub const SECRET: &str = "checkout-db";
/// The Secret's real value (which the coding agent must never see).
pub const SECRET_VALUE: &str = "tg-demo-db-pass-5w8r2k";
/// What a masked value reads as.
pub const MASK_MARKER: &str = "*** masked by tollgate ***";
/// The reviewer (a service account of the reviewers' namespace).
pub const REVIEWER: &str = "alice";
/// The policy's rules, by name.
pub const DENY_RULE: &str = "no-workload-deletes";
pub const DENY_REASON: &str = "coding agents may not delete workloads; ask a person to do it";
pub const REVIEW_RULE: &str = "workload-changes-need-review";
/// The reason the demo's reviewer gives.
pub const APPROVAL_REASON: &str = "checkout 1.5 rollout, ticket OPS-1042";

/// The Deployment as the admin made it, and as the coding agent wants it.
pub const IMAGE_BEFORE: &str = "shop.invalid/checkout:1.4.2";
pub const IMAGE_AFTER: &str = "shop.invalid/checkout:1.5.0";
pub const REPLICAS_BEFORE: i64 = 2;
pub const REPLICAS_AFTER: i64 = 3;

/// How long to wait for things that happen by themselves (an approval to appear,
/// kubectl to finish, a session to close).
const SETTLE: Duration = Duration::from_secs(30);

/// Set by [`interrupt`] (the demo's signal handler); every wait of the story then
/// returns an error, so the caller unwinds and the [`Story`] cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a running story to stop at its next wait. Async-signal-safe (one atomic store).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `check` every 200 ms until it returns `Some`, `timeout` passes, or the story
/// is interrupted.
fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let started = Instant::now();
    loop {
        check_interrupted()?;
        if let Some(found) = check() {
            return Ok(found);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How to run the story.
#[derive(Debug, Clone)]
pub struct StoryOptions {
    /// The `tg-agent` binary (the agent and its CLI).
    pub agent_bin: PathBuf,
    /// How long a held call waits for its decision (the policy's `holdTimeout`): a
    /// person deciding by hand needs longer than the demo's reviewer.
    pub hold_timeout: Duration,
}

impl StoryOptions {
    pub fn new(agent_bin: impl Into<PathBuf>) -> StoryOptions {
        StoryOptions {
            agent_bin: agent_bin.into(),
            hold_timeout: Duration::from_secs(120),
        }
    }
}

/// The scene, set up and running. Dropping it removes everything it made.
pub struct Story {
    // Fields drop in this order, after the approvals are deleted (see Drop): kubectl,
    // the namespaces with their pods, the agent and its kernel programs, the files.
    held_apply: Option<StreamingExec>,
    pub ns: TestNamespace,
    pub reviewers: TestNamespace,
    pub pod: RunningPod,
    pub agent: RunningAgent,
    /// The agent's directory (certificates, log, sessions) and `work_dir`, removed
    /// once the agent has stopped.
    _files: RemoveOnDrop,
    pub cluster: &'static Cluster,
    reviewer_token: String,
    /// The manifest the pod applies and the hand-review script.
    pub work_dir: PathBuf,
}

/// Removes directories when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What setting up made.
#[derive(Debug, Clone)]
pub struct SetUp {
    /// "reused" or "started".
    pub control_plane: &'static str,
    pub namespace: String,
    pub reviewers_namespace: String,
    pub node: String,
    /// The agent's REST API.
    pub api_url: String,
    pub policy: String,
}

/// A Deployment's state as the admin reads it (not through Tollgate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentState {
    pub replicas: i64,
    pub image: String,
}

/// Step a: the apply, held.
#[derive(Debug, Clone)]
pub struct Held {
    /// The command the pod ran.
    pub command: String,
    /// The manifest it applied.
    pub manifest: String,
    pub approval_id: String,
    /// The approval as the reviewer's CLI shows it (`approvals show -o json`).
    pub approval: Value,
    /// The Deployment while the call is held.
    pub live_while_held: DeploymentState,
    /// `kubectl get approvalrequests -n <namespace>` (admin).
    pub approval_requests: String,
}

impl Held {
    /// The proxy session the held call came on.
    pub fn session(&self) -> &str {
        self.approval["spec"]["requester"]["session"]
            .as_str()
            .unwrap_or("")
    }
}

/// Step b: what the reviewer sees.
#[derive(Debug, Clone)]
pub struct DryRunShown {
    pub command: String,
    /// `approvals show ID` as printed.
    pub shown: String,
    /// The unified diff the dry-run produced.
    pub diff: String,
}

/// Step c: the decision.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The command that decided (the demo's, or the one the person was told to run).
    pub command: String,
    /// What that command printed (empty when a person ran it).
    pub output: String,
    /// The approval's state afterwards (`Approved`, `Denied`, ...).
    pub state: String,
    pub reviewer: String,
    pub reason: String,
}

/// What a person needs to review the held call by hand.
#[derive(Debug, Clone)]
pub struct HandReview {
    /// `review.sh show|approve|deny [REASON]`.
    pub script: PathBuf,
    /// The full approve command the script runs (with the token read from a file).
    pub approve_command: String,
}

/// Step d: the apply after the decision.
#[derive(Debug, Clone)]
pub struct Applied {
    /// kubectl's lines (standard error prefixed `stderr: `).
    pub kubectl_lines: Vec<String>,
    /// Its result: `deployment.apps/checkout configured`, or the error's first line.
    pub result_line: String,
    pub live_after: DeploymentState,
    /// The API server's status code for the approved call (`status.execution.code`).
    pub execution_code: Option<u64>,
}

/// Step e: one Secret, read twice.
#[derive(Debug, Clone)]
pub struct SecretRead {
    pub command: String,
    /// What the coding agent's kubectl printed.
    pub in_pod: String,
    /// What the admin's kubectl printed for the same read.
    pub by_admin: String,
}

/// Step f: the delete.
#[derive(Debug, Clone)]
pub struct DeleteRefused {
    pub command: String,
    pub succeeded: bool,
    /// kubectl's standard error.
    pub stderr: String,
    /// The Deployment, read by the admin afterwards.
    pub still_there: Option<DeploymentState>,
}

/// Step g: the recording.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// `sessions list`.
    pub list: String,
    pub session: String,
    /// `sessions show ID`.
    pub shown: String,
    /// `sessions show ID -o json`.
    pub detail: Value,
    /// `sessions verify`.
    pub verify: String,
    pub verified: bool,
}

impl Replayed {
    /// The exchanges of the session (`sessions show -o json`).
    pub fn exchanges(&self) -> &[Value] {
        self.detail["exchanges"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

impl Story {
    /// Starts (or reuses) the control plane, makes the scene and starts the agent.
    pub async fn set_up(options: StoryOptions) -> Result<(Story, SetUp)> {
        check_interrupted()?;
        // Through `up` first: a control plane that cannot start is an error here,
        // where `Cluster::shared` would panic.
        let report = controlplane::up(&Layout::from_env()).context("starting the control plane")?;
        let cluster = Cluster::shared();
        install_approval_manifests(cluster)?;
        let work_dir =
            std::env::temp_dir().join(format!("tollgate-demo-{}", crate::topology::unique_id()));
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let mut files = RemoveOnDrop(vec![work_dir.clone()]);

        let ns = cluster.namespace("demo").await?;
        let reviewers = cluster.namespace("demo-sre").await?;
        ns.service_account(AGENT_POD).await?;
        ns.grant(AGENT_POD, "coding-agent", coding_agent_rights())
            .await?;
        admin_apply(
            cluster,
            &ns.name,
            &deployment(IMAGE_BEFORE, REPLICAS_BEFORE),
        )?;
        admin_apply(cluster, &ns.name, &secret())?;

        reviewers.service_account(REVIEWER).await?;
        admin_apply(
            cluster,
            &ns.name,
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: review-by-{REVIEWER}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: tollgate-approval-reviewer\nsubjects:\n  - kind: ServiceAccount\n    name: {REVIEWER}\n    namespace: {}\n",
                reviewers.name
            ),
        )?;
        let reviewer_token = reviewers.token(REVIEWER, &[], None).await?;

        let mut pod = PodOptions::new(AGENT_POD, 1, &["sleep", "3600"]);
        pod.service_account = Some(AGENT_POD.into());
        pod.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
        let pod = ns.run_pod(pod).await?;

        let policy = policy(&ns.name, &reviewers.name, options.hold_timeout);
        let agent_bin = options
            .agent_bin
            .to_str()
            .context("the agent's path is not UTF-8")?;
        let mut agent_options = AgentOptions::new(agent_bin, 1, &policy);
        agent_options.approval_store = Some("kubernetes".into());
        check_interrupted()?;
        let agent = RunningAgent::start(cluster, agent_options).context("starting the agent")?;
        files.0.push(agent.dir.clone());

        let set_up = SetUp {
            control_plane: if report.reused { "reused" } else { "started" },
            namespace: ns.name.clone(),
            reviewers_namespace: reviewers.name.clone(),
            node: agent.node.name.clone(),
            api_url: agent.api_url(),
            policy,
        };
        let story = Story {
            held_apply: None,
            ns,
            reviewers,
            pod,
            _files: files,
            agent,
            cluster,
            reviewer_token,
            work_dir,
        };
        Ok((story, set_up))
    }

    /// a. The coding agent applies checkout 1.5 from its pod; Tollgate holds the patch
    /// and files an approval. Returns once the approval is pending.
    pub fn hold_an_apply(&mut self) -> Result<Held> {
        let manifest = deployment(IMAGE_AFTER, REPLICAS_AFTER);
        let file = self.work_dir.join("checkout.yaml");
        std::fs::write(&file, &manifest).with_context(|| format!("writing {}", file.display()))?;
        let file = file.to_str().context("a UTF-8 temporary path")?;
        // Pods of the simulated node see the host's files, so kubectl reads it there.
        let exec = self
            .pod
            .kubectl_exec_child(self.cluster, &["kubectl", "apply", "-f", file])?;
        self.held_apply = Some(exec);

        let approval = poll("the apply's approval", SETTLE, || {
            self.pending_approval_for(DEPLOYMENT)
        })
        .with_context(|| format!("the apply was not held\n{}", self.agent_log_tail()))?;
        let approval_id = approval["id"]
            .as_str()
            .context("an approval without an id")?
            .to_owned();
        let approval = self.approval(&approval_id)?;
        let live_while_held = self.deployment_state()?.context("the Deployment is gone")?;
        let approval_requests =
            self.cluster
                .kubectl_ok(&["get", "approvalrequests", "-n", &self.ns.name])?;
        Ok(Held {
            command: "kubectl apply -f checkout.yaml".into(),
            manifest,
            approval_id,
            approval,
            live_while_held,
            approval_requests,
        })
    }

    /// b. The reviewer reads the approval: who asked, the rule, and the dry-run diff.
    pub fn show_dry_run(&self, held: &Held) -> Result<DryRunShown> {
        let shown = self.approvals_ok(&["show", &held.approval_id])?;
        let diff = held.approval["spec"]["dryRun"]["diff"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        Ok(DryRunShown {
            command: format!("tg-agent approvals show {}", held.approval_id),
            shown,
            diff,
        })
    }

    /// c. The reviewer approves with the CLI.
    pub fn approve(&self, held: &Held) -> Result<Decided> {
        let output =
            self.approvals_ok(&["approve", &held.approval_id, "--reason", APPROVAL_REASON])?;
        let mut decided = self.decision(held)?;
        decided.command = format!(
            "tg-agent approvals approve {} --reason {APPROVAL_REASON:?}",
            held.approval_id
        );
        decided.output = output;
        Ok(decided)
    }

    /// c, by hand: writes `review.sh` (show, approve or deny this approval as the
    /// reviewer) and says what it runs. Follow with [`Story::wait_for_decision`].
    pub fn review_by_hand(&self, held: &Held) -> Result<HandReview> {
        let token_file = self.work_dir.join("reviewer.token");
        write_private(&token_file, &self.reviewer_token)?;
        let connection = format!(
            "--server {} --certificate-authority {} --token \"$(cat {})\"",
            self.agent.api_url(),
            shell_quote(&self.agent.ca_file),
            shell_quote(&token_file),
        );
        let cli = format!(
            "ip netns exec {} {} approvals",
            self.agent.node.netns,
            shell_quote(&self.agent.bin)
        );
        let id = &held.approval_id;
        let script = self.work_dir.join("review.sh");
        let rev = &self.reviewers.name;
        let lines = [
            "#!/bin/sh".to_owned(),
            format!("# Review Tollgate approval {id} as {REVIEWER} (group system:serviceaccounts:{rev})."),
            "# The REST API listens on the node's address: the CLI runs in the node's network".to_owned(),
            "# namespace. Written by tollgate-demo; removed when it ends.".to_owned(),
            "case \"${1:-show}\" in".to_owned(),
            format!("  show) exec {cli} show {id} {connection} ;;"),
            format!("  approve) exec {cli} approve {id} --reason \"${{2:-approved by hand}}\" {connection} ;;"),
            format!("  deny) exec {cli} deny {id} --reason \"${{2:-denied by hand}}\" {connection} ;;"),
            "  *) echo \"usage: $0 show | approve [REASON] | deny [REASON]\" >&2; exit 2 ;;".to_owned(),
            "esac".to_owned(),
        ];
        write_private(&script, &(lines.join("\n") + "\n"))?;
        set_mode(&script, 0o700)?;
        Ok(HandReview {
            script,
            approve_command: format!("{cli} approve {id} --reason \"...\" {connection}"),
        })
    }

    /// c, by hand: waits (bounded by the hold timeout) until someone decides.
    pub fn wait_for_decision(&self, held: &Held, timeout: Duration) -> Result<Decided> {
        poll("a decision", timeout, || {
            let approval = self.approval(&held.approval_id).ok()?;
            (approval["status"]["state"] != "Pending").then_some(())
        })?;
        self.decision(held)
    }

    /// d. kubectl, still waiting since step a, finishes; the admin reads the result.
    pub fn finish_apply(&mut self, held: &Held) -> Result<Applied> {
        let exec = self
            .held_apply
            .as_mut()
            .context("no apply is held (run hold_an_apply first)")?;
        // Read until kubectl's output ends (it exits once it has its answer): a
        // refusal is several lines, the reviewer's reason in the last.
        let deadline = Instant::now() + SETTLE;
        loop {
            check_interrupted()?;
            let left = deadline
                .checked_duration_since(Instant::now())
                .with_context(|| format!("kubectl did not finish: {:?}", exec.seen))?;
            let wait = left.min(Duration::from_secs(1));
            let asked = Instant::now();
            // An empty needle: any line.
            if !exec.wait_for_line(|| {}, "", wait) && asked.elapsed() < wait {
                // No line, and no waiting either: the output has ended.
                break;
            }
        }
        let result_line = exec
            .seen
            .iter()
            .find(|l| l.starts_with("deployment.apps/") || l.contains("Error from server"))
            .cloned()
            .with_context(|| format!("kubectl printed no result: {:?}", exec.seen))?;
        let kubectl_lines = exec.seen.clone();
        let live_after = self.deployment_state()?.context("the Deployment is gone")?;
        let approval = self.approval(&held.approval_id)?;
        Ok(Applied {
            kubectl_lines,
            result_line,
            live_after,
            execution_code: approval["status"]["execution"]["code"].as_u64(),
        })
    }

    /// e. The coding agent reads the database password; so does the admin.
    pub fn read_secret(&self) -> Result<SecretRead> {
        let template = "go-template={{.data.password | base64decode}}";
        let in_pod = self.in_pod(&["kubectl", "get", "secret", SECRET, "-o", template])?;
        if !in_pod.status.success() {
            bail!("the pod's read of the Secret failed: {}", stderr(&in_pod));
        }
        let by_admin = self.cluster.kubectl_ok(&[
            "get",
            "secret",
            SECRET,
            "-n",
            &self.ns.name,
            "-o",
            template,
        ])?;
        Ok(SecretRead {
            command: format!("kubectl get secret {SECRET} -o '{template}'"),
            in_pod: stdout(&in_pod),
            by_admin,
        })
    }

    /// f. The coding agent tries to delete the Deployment.
    pub fn delete_workload(&self) -> Result<DeleteRefused> {
        let out = self.in_pod(&["kubectl", "delete", "deployment", DEPLOYMENT])?;
        Ok(DeleteRefused {
            command: format!("kubectl delete deployment {DEPLOYMENT}"),
            succeeded: out.status.success(),
            stderr: stderr(&out),
            still_there: self.deployment_state()?,
        })
    }

    /// g. The recording: every session of the pod, the apply's in detail, and the
    /// hash chains checked. Waits until the apply's session has closed.
    pub fn replay_session(&self, held: &Held) -> Result<Replayed> {
        let session = held.session().to_owned();
        if session.is_empty() {
            bail!("the approval names no session: {}", held.approval);
        }
        let detail = poll("the apply's session to close", SETTLE, || {
            let out = self
                .agent
                .sessions_cli(&["show", &session, "-o", "json"])
                .ok()?;
            let detail: Value = serde_json::from_slice(&out.stdout).ok()?;
            (!detail["end"].is_null()).then_some(detail)
        })?;
        let list = self.sessions_ok(&["list"])?;
        let shown = self.sessions_ok(&["show", &session])?;
        let verify = self
            .agent
            .sessions_cli(&["verify"])
            .context("running sessions verify")?;
        Ok(Replayed {
            list,
            session,
            shown,
            detail,
            verify: format!("{}{}", stdout(&verify), stderr(&verify)),
            verified: verify.status.success(),
        })
    }

    /// The last lines of the agent's log, for errors.
    pub fn agent_log_tail(&self) -> String {
        let log = self.agent.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("agent log (last lines):\n{}", lines[from..].join("\n"))
    }

    /// The pending approval whose object is `name` in the demo namespace, if any.
    fn pending_approval_for(&self, name: &str) -> Option<Value> {
        let out = self
            .agent
            .approvals_cli(
                &self.reviewer_token,
                &["list", "--state", "pending", "-o", "json"],
            )
            .ok()?;
        // Refused while no approval exists in a namespace the reviewer may review.
        if !out.status.success() {
            return None;
        }
        let list: Value = serde_json::from_slice(&out.stdout).ok()?;
        list["items"].as_array()?.iter().find_map(|approval| {
            let request = &approval["spec"]["request"];
            (request["namespace"] == self.ns.name.as_str() && request["name"] == name)
                .then(|| approval.clone())
        })
    }

    /// `approvals show ID -o json` as the reviewer.
    fn approval(&self, id: &str) -> Result<Value> {
        let text = self.approvals_ok(&["show", id, "-o", "json"])?;
        serde_json::from_str(&text).with_context(|| format!("reading approval {id}: {text}"))
    }

    fn decision(&self, held: &Held) -> Result<Decided> {
        let approval = self.approval(&held.approval_id)?;
        let status = &approval["status"];
        let last = status["decisions"]
            .as_array()
            .and_then(|d| d.last())
            .cloned()
            .unwrap_or(Value::Null);
        Ok(Decided {
            command: String::new(),
            output: String::new(),
            state: status["state"].as_str().unwrap_or("").to_owned(),
            reviewer: last["reviewer"].as_str().unwrap_or("").to_owned(),
            reason: last["reason"].as_str().unwrap_or("").to_owned(),
        })
    }

    /// `tg-agent approvals ARGS` as the reviewer; its output, or an error with it.
    fn approvals_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.agent.approvals_cli(&self.reviewer_token, args)?;
        if !out.status.success() {
            bail!(
                "tg-agent approvals {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                stdout(&out),
                stderr(&out)
            );
        }
        Ok(stdout(&out))
    }

    /// `tg-agent sessions ARGS` on the agent's sessions directory.
    fn sessions_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.agent.sessions_cli(args)?;
        if !out.status.success() {
            bail!(
                "tg-agent sessions {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                stdout(&out),
                stderr(&out)
            );
        }
        Ok(stdout(&out))
    }

    /// Runs `cmd` in the pod (through `kubectl exec`, as a person would).
    fn in_pod(&self, cmd: &[&str]) -> Result<Output> {
        self.cluster
            .kubectl()
            .args(["exec", "-n", &self.ns.name, &self.pod.name, "--"])
            .args(cmd)
            .output()
            .with_context(|| format!("running {cmd:?} in pod {}", self.pod.name))
    }

    /// The Deployment as the admin sees it; None when it does not exist.
    fn deployment_state(&self) -> Result<Option<DeploymentState>> {
        let out = self
            .cluster
            .kubectl()
            .args(["get", "deployment", DEPLOYMENT, "-n", &self.ns.name])
            .args(["-o", "json", "--ignore-not-found"])
            .output()
            .context("running kubectl get deployment")?;
        if !out.status.success() {
            bail!("kubectl get deployment: {}", stderr(&out));
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let object: Value =
            serde_json::from_slice(&out.stdout).context("reading the Deployment")?;
        let spec = &object["spec"];
        Ok(Some(DeploymentState {
            replicas: spec["replicas"].as_i64().unwrap_or(1),
            image: spec["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        }))
    }
}

impl Drop for Story {
    fn drop(&mut self) {
        // Approvals live in the demo namespace, which stays Terminating without a
        // controller-manager: delete them, or they would outlive the run in etcd.
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "approvalrequests", "--all", "-n", &self.ns.name])
            .args(["--ignore-not-found", "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The policy of the story: deletes of workloads in the demo namespace are denied,
/// changes to them wait for one reviewer of the reviewers' namespace; the rest is
/// allowed, and Secrets are masked (the default).
fn policy(namespace: &str, reviewers: &str, hold_timeout: Duration) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: {DENY_RULE}
    action: deny
    reason: {DENY_REASON}
    caller: {{namespaces: [{namespace}]}}
    request:
      verbs: [delete, deletecollection]
      apiGroups: [apps, \"\"]
      resources: [deployments, statefulsets, configmaps]
  - name: {REVIEW_RULE}
    action: approve
    caller: {{namespaces: [{namespace}]}}
    request:
      verbs: [create, update, patch]
      apiGroups: [apps, \"\"]
      resources: [deployments, statefulsets, configmaps]
    approval:
      mode: hold
      steps:
        - name: sre
          groups: [\"system:serviceaccounts:{reviewers}\"]
      holdTimeout: {}s
      expireAfter: 1h
",
        hold_timeout.as_secs().max(1)
    )
}

/// What RBAC lets the coding agent do in its namespace: change workloads and their
/// configuration, read Secrets. Tollgate's policy narrows it further.
fn coding_agent_rights() -> Vec<PolicyRule> {
    let rule = |group: &str, resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    vec![
        rule("apps", &["deployments"], &["*"]),
        rule("", &["configmaps"], &["*"]),
        rule("", &["secrets"], &["get", "list"]),
    ]
}

fn deployment(image: &str, replicas: i64) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {DEPLOYMENT}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {DEPLOYMENT}}}
  template:
    metadata:
      labels: {{app: {DEPLOYMENT}}}
    spec:
      containers:
        - name: {DEPLOYMENT}
          image: {image}
          env:
            - name: DB_PASSWORD
              valueFrom:
                secretKeyRef: {{name: {SECRET}, key: password}}
"
    )
}

fn secret() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {SECRET}\nstringData:\n  user: checkout\n  password: {SECRET_VALUE}\n"
    )
}

/// The CRD (the Kubernetes approval store) and the reviewer ClusterRole.
fn install_approval_manifests(cluster: &Cluster) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?;
    let path = |p: &str| root.join(p).to_string_lossy().into_owned();
    cluster.kubectl_ok(&["apply", "-f", &path("deploy/crds")])?;
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/approvalrequests.tollgate.dev",
        "--timeout=60s",
    ])?;
    cluster.kubectl_ok(&["apply", "-f", &path("deploy/reviewer-rbac.yaml")])?;
    Ok(())
}

/// `kubectl apply -n NAMESPACE -f -` (admin) of a YAML document.
fn admin_apply(cluster: &Cluster, namespace: &str, yaml: &str) -> Result<()> {
    let mut child = cluster
        .kubectl()
        .args(["apply", "-n", namespace, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl apply")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(yaml.as_bytes())
        .context("writing the manifest to kubectl")?;
    let out = child.wait_with_output().context("running kubectl apply")?;
    if !out.status.success() {
        bail!("kubectl apply failed: {}\n{yaml}", stderr(&out));
    }
    Ok(())
}

/// Writes a file only root can read (the token, the script that uses it).
fn write_private(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, 0o600)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// A path quoted for sh (single quotes; paths here never contain one).
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
