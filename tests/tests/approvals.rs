//! Suite `approvals`: one mutating call from an enforced pod waits for named people,
//! on the real control plane, with kubectl, kube-rs and client-go inside simulated pods
//! that know nothing of Tollgate, and reviewers using the agent's REST API through its
//! CLI (`tg-agent approvals ...`) with their own service-account tokens.
//!
//! Reviewers are service accounts in namespaces of their own, so each reviewer
//! namespace is a group (`system:serviceaccounts:<ns>`) a policy step can name; RBAC
//! (`deploy/reviewer-rbac.yaml`, bound in the requester's namespace) decides who may
//! review at all.

use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;
use tollgate_tests::agent::{AgentOptions, RunningAgent};
use tollgate_tests::cluster::harness::wait_until;
use tollgate_tests::cluster::harness::StreamingExec;
use tollgate_tests::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_tests::output::{stderr, stdout};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");
const KUBE_CLIENT: &str = env!("CARGO_BIN_EXE_tg-kube-client");

fn workspace_file(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl apply -f -` (admin) of a YAML document.
fn apply(yaml: &str) {
    Cluster::shared()
        .apply_yaml(yaml)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// The CRD (for the Kubernetes store) and the reviewer ClusterRole, once established.
fn install_approval_manifests() {
    let cluster = Cluster::shared();
    cluster
        .kubectl_ok(&["apply", "-f", &workspace_file("deploy/crds")])
        .expect("CRD applies");
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/approvalrequests.tollgate.dev",
            "--timeout=60s",
        ])
        .expect("CRD established");
    cluster
        .kubectl_ok(&["apply", "-f", &workspace_file("deploy/reviewer-rbac.yaml")])
        .expect("reviewer role applies");
}

/// The rights the requesting pod's account (`agent`) has in its namespace.
fn workload_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec!["".into()]),
        resources: Some(vec!["configmaps".into()]),
        verbs: vec!["*".into()],
        ..PolicyRule::default()
    }]
}

/// A namespace with a pod whose account may write ConfigMaps, and a reviewers'
/// namespace whose accounts form the group a policy step names.
struct Scene {
    ns: TestNamespace,
    reviewers: TestNamespace,
    pod: RunningPod,
}

impl Scene {
    async fn new(prefix: &str, node: u8) -> Scene {
        install_approval_manifests();
        let cluster = Cluster::shared();
        let ns = cluster.namespace(prefix).await.expect("namespace");
        ns.service_account("agent").await.expect("account");
        ns.grant("agent", "workloads", workload_rules())
            .await
            .expect("role");
        let reviewers = cluster
            .namespace(&format!("{prefix}-rev"))
            .await
            .expect("reviewers' namespace");
        let mut opts = PodOptions::new("coder", node, &["sleep", "3600"]);
        opts.service_account = Some("agent".into());
        opts.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
        let pod = ns.run_pod(opts).await.expect("pod runs");
        Scene { ns, reviewers, pod }
    }

    /// The group every reviewer of `reviewers` is in.
    fn group(&self) -> String {
        format!("system:serviceaccounts:{}", self.reviewers.name)
    }

    /// A reviewer account in `from` with the reviewer role in the scene's namespace;
    /// its token.
    async fn reviewer_in(&self, from: &TestNamespace, name: &str) -> String {
        from.service_account(name).await.expect("reviewer account");
        apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: review-{from_ns}-{name}\n  namespace: {ns}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: tollgate-approval-reviewer\nsubjects:\n  - kind: ServiceAccount\n    name: {name}\n    namespace: {from_ns}\n",
            from_ns = from.name,
            ns = self.ns.name,
        ));
        from.token(name, &[], None).await.expect("reviewer token")
    }

    async fn reviewer(&self, name: &str) -> String {
        self.reviewer_in(&self.reviewers, name).await
    }

    /// A policy whose one rule holds ConfigMap (and Deployment) writes of this
    /// namespace with `approval` (YAML lines, indented for the `approval:` key).
    fn policy(&self, approval: &str) -> String {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: writes-need-review\n    action: approve\n    caller:\n      namespaces: [{ns}]\n    request:\n      verbs: [create, update, patch, delete]\n      resources: [configmaps, deployments]\n    approval:\n{approval}",
            ns = self.ns.name
        )
    }

    /// A hold-mode approval section with one step for the reviewers' group.
    fn one_step(&self, extra: &str) -> String {
        format!(
            "      mode: hold\n      steps:\n        - groups: [\"{}\"]\n{extra}",
            self.group()
        )
    }

    /// Starts `sh -c SCRIPT` in the pod (through kubectl exec) and streams its output.
    fn start_in_pod(&self, script: &str) -> StreamingExec {
        self.pod
            .kubectl_exec_child(Cluster::shared(), &["sh", "-c", script])
            .expect("exec starts")
    }
}

fn start_agent(node: u8, policy: &str, store: Option<&str>) -> RunningAgent {
    let mut options = AgentOptions::new(AGENT, node, policy);
    options.approval_store = store.map(str::to_owned);
    options.extra_args = vec!["--approval-expiry-interval".into(), "500ms".into()];
    RunningAgent::start(Cluster::shared(), options).expect("agent starts")
}

/// `tg-agent approvals ARGS` as the reviewer holding `token`.
fn cli(agent: &RunningAgent, token: &str, args: &[&str]) -> Output {
    agent
        .approvals_cli(token, args)
        .expect("approvals CLI runs")
}

fn cli_ok(agent: &RunningAgent, token: &str, args: &[&str]) -> String {
    let out = cli(agent, token, args);
    assert!(
        out.status.success(),
        "approvals {args:?} failed ({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Every approval the reviewer can see, as JSON.
fn list(agent: &RunningAgent, token: &str, state: Option<&str>) -> Vec<Value> {
    try_list(agent, token, state).unwrap_or_else(|e| panic!("{e}"))
}

/// The same, or the CLI's error. A reviewer whose rights are per namespace is refused
/// a list while no approval exists in a namespace they may review.
fn try_list(agent: &RunningAgent, token: &str, state: Option<&str>) -> Result<Vec<Value>, String> {
    let mut args = vec!["list", "-o", "json"];
    if let Some(state) = state {
        args.extend(["--state", state]);
    }
    let out = cli(agent, token, &args);
    if !out.status.success() {
        return Err(format!("approvals {args:?}: {}", stderr(&out)));
    }
    let text = stdout(&out);
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    Ok(match value {
        Value::Array(items) => items,
        other => other["items"].as_array().cloned().unwrap_or_default(),
    })
}

fn show(agent: &RunningAgent, token: &str, id: &str) -> Value {
    let text = cli_ok(agent, token, &["show", id, "-o", "json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The name the held call's object has (the request's, or the dry-run object's for a
/// create, which has none in its path).
fn object_name(approval: &Value) -> String {
    let name = approval["spec"]["request"]["name"].as_str().unwrap_or("");
    if !name.is_empty() {
        return name.to_owned();
    }
    approval["spec"]["dryRun"]["object"]["metadata"]["name"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Polls until a pending approval for `name` in the scene's namespace appears.
fn wait_pending(agent: &RunningAgent, token: &str, scene: &Scene, name: &str) -> Value {
    let mut found = None;
    wait_until(
        &format!("a pending approval for {name}"),
        Duration::from_secs(30),
        || {
            found = try_list(agent, token, Some("pending"))
                .unwrap_or_default()
                .into_iter()
                .find(|a| {
                    a["spec"]["requester"]["podNamespace"] == scene.ns.name.as_str()
                        && object_name(a) == name
                });
            found.is_some()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()));
    found.expect("found")
}

fn id_of(approval: &Value) -> String {
    approval["id"].as_str().expect("an id").to_owned()
}

fn configmap_data(ns: &str, name: &str) -> Option<String> {
    Cluster::shared()
        .kubectl_ok(&["get", "configmap", name, "-n", ns, "-o", "jsonpath={.data}"])
        .ok()
}

fn held_events(agent: &RunningAgent, event: &str) -> f64 {
    agent
        .metric(&format!(
            "tollgate_approval_events_total{{event=\"{event}\"}}"
        ))
        .expect("metrics")
}

const SETTINGS: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: fast\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_held_kubectl_apply_finishes_once_a_reviewer_approves() {
    let scene = Scene::new("appr-hold", 1).await;
    let agent = start_agent(1, &scene.policy(&scene.one_step("")), None);
    let alice = scene.reviewer("alice").await;

    let mut apply_run =
        scene.start_in_pod(&format!("printf '%s' '{SETTINGS}' | kubectl apply -f -"));
    let approval = wait_pending(&agent, &alice, &scene, "settings");
    let id = id_of(&approval);
    assert_eq!(approval["spec"]["request"]["verb"], "create", "{approval}");
    assert_eq!(
        approval["spec"]["requester"]["user"],
        format!("system:serviceaccount:{}:agent", scene.ns.name),
        "{approval}"
    );
    assert_eq!(approval["spec"]["requester"]["podName"], "coder");
    let diff = approval["spec"]["dryRun"]["diff"].as_str().unwrap_or("");
    assert!(diff.contains("+  mode: fast"), "the dry-run diff: {diff}");
    assert!(
        configmap_data(&scene.ns.name, "settings").is_none(),
        "nothing is created before approval"
    );
    // The human view shows the diff too.
    let shown = cli_ok(&agent, &alice, &["show", &id]);
    assert!(shown.contains("mode: fast"), "{shown}");

    // The requester cannot approve its own call, even with the reviewer role.
    let own = scene.reviewer_in(&scene.ns, "agent").await;
    let refused = cli(
        &agent,
        &own,
        &["approve", &id, "--reason", "looks fine to me"],
    );
    assert!(!refused.status.success(), "self-approval must fail");
    assert!(
        stderr(&refused).contains("cannot review it"),
        "{}",
        stderr(&refused)
    );
    // A reviewer RBAC allows, but outside the step's groups, is refused too.
    let cluster = Cluster::shared();
    let outsiders = cluster.namespace("appr-hold-out").await.expect("outsiders");
    let mallory = scene.reviewer_in(&outsiders, "mallory").await;
    let refused = cli(&agent, &mallory, &["approve", &id, "--reason", "sure"]);
    assert!(
        !refused.status.success(),
        "an outsider's approval must fail"
    );
    assert!(
        stderr(&refused).contains("none of the groups"),
        "{}",
        stderr(&refused)
    );
    // So is someone RBAC does not allow.
    outsiders
        .service_account("eve")
        .await
        .expect("account without rights");
    let eve = outsiders.token("eve", &[], None).await.expect("token");
    let refused = cli(&agent, &eve, &["approve", &id, "--reason", "sure"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).to_lowercase().contains("forbidden"),
        "{}",
        stderr(&refused)
    );

    cli_ok(
        &agent,
        &alice,
        &["approve", &id, "--reason", "matches the change ticket"],
    );
    assert!(
        apply_run.wait_for_line(|| {}, "configmap/settings created", Duration::from_secs(30)),
        "kubectl finishes after approval: {:?}\nagent log:\n{}",
        apply_run.seen,
        agent.log_text()
    );
    assert_eq!(
        configmap_data(&scene.ns.name, "settings").as_deref(),
        Some(r#"{"mode":"fast"}"#)
    );

    // The decision is on the approval and in the agent's log: who, when, why.
    let done = show(&agent, &alice, &id);
    assert_eq!(done["status"]["state"], "Approved", "{done}");
    let decision = &done["status"]["decisions"][0];
    assert_eq!(
        decision["reviewer"],
        format!("system:serviceaccount:{}:alice", scene.reviewers.name)
    );
    assert_eq!(decision["reason"], "matches the change ticket");
    assert!(decision["at"].as_str().is_some_and(|t| t.contains('T')));
    assert_eq!(done["status"]["execution"]["code"], 201, "{done}");
    assert_eq!(
        done["status"]["decisions"].as_array().map(Vec::len),
        Some(1),
        "refused attempts are not decisions: {done}"
    );
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains(&id)
            && l.contains("alice")
            && l.contains("matches the change ticket")),
        "the decision is logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denial_reaches_kubectl_with_the_reviewers_reason() {
    let scene = Scene::new("appr-deny", 1).await;
    let agent = start_agent(1, &scene.policy(&scene.one_step("")), None);
    let bob = scene.reviewer("bob").await;

    let mut run = scene.start_in_pod("kubectl create configmap doomed --from-literal=a=b");
    let id = id_of(&wait_pending(&agent, &bob, &scene, "doomed"));
    // The same CLI as a kubectl plugin: `kubectl tollgate approvals ...`.
    let plugin_dir = agent.dir.join("plugins");
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    let _ = std::fs::remove_file(plugin_dir.join("kubectl-tollgate"));
    std::os::unix::fs::symlink(AGENT, plugin_dir.join("kubectl-tollgate")).expect("symlink");
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shown = agent
        .node
        .netns_handle()
        .command("kubectl")
        .args([
            "tollgate",
            "approvals",
            "show",
            &id,
            "--server",
            &agent.api_url(),
        ])
        .arg("--certificate-authority")
        .arg(&agent.ca_file)
        .env("PATH", path)
        .env("TOLLGATE_TOKEN", &bob)
        .output()
        .expect("kubectl tollgate");
    assert!(
        shown.status.success() && stdout(&shown).contains(&id),
        "kubectl tollgate approvals show: {}{}",
        stdout(&shown),
        stderr(&shown)
    );
    let no_reason = cli(&agent, &bob, &["deny", &id, "--reason", ""]);
    assert!(!no_reason.status.success(), "a denial needs a reason");
    cli_ok(
        &agent,
        &bob,
        &["deny", &id, "--reason", "not during the change freeze"],
    );
    assert!(
        run.wait_for_line(
            || {},
            "not during the change freeze",
            Duration::from_secs(30)
        ),
        "kubectl prints the reviewer's reason: {:?}",
        run.seen
    );
    let line = run
        .seen
        .iter()
        .find(|l| l.contains("not during the change freeze"))
        .expect("line");
    assert!(line.contains("is forbidden"), "{line}");
    assert!(configmap_data(&scene.ns.name, "doomed").is_none());
    assert_eq!(show(&agent, &bob, &id)["status"]["state"], "Denied");
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_mode_lets_kube_rs_and_client_go_through_once_approved() {
    let scene = Scene::new("appr-retry", 1).await;
    let approval = format!(
        "      mode: retry\n      retryAfter: 1s\n      steps:\n        - groups: [\"{}\"]\n",
        scene.group()
    );
    let agent = start_agent(1, &scene.policy(&approval), None);
    let carol = scene.reviewer("carol").await;
    let tgclient = Cluster::shared().binaries.tgclient.display().to_string();
    let ns = scene.ns.name.clone();

    for (client, name, command) in [
        (
            "kube-rs",
            "from-kube-rs",
            format!("{KUBE_CLIENT} create-configmap {ns} from-kube-rs a=1"),
        ),
        (
            "client-go",
            "from-client-go",
            format!("{tgclient} create-configmap {ns} from-client-go a=1"),
        ),
    ] {
        let mut run = scene.start_in_pod(&command);
        let approval = wait_pending(&agent, &carol, &scene, name);
        assert_eq!(approval["spec"]["mode"], "retry", "{approval}");
        let id = id_of(&approval);
        cli_ok(&agent, &carol, &["approve", &id, "--reason", "ok"]);
        assert!(
            run.wait_for_line(
                || {},
                &format!("created configmap {ns}/{name}"),
                Duration::from_secs(60)
            ),
            "{client} succeeds after approval without any change to it: {:?}\nagent log:\n{}",
            run.seen,
            agent.log_text()
        );
        assert_eq!(
            configmap_data(&ns, name).as_deref(),
            Some(r#"{"a":"1"}"#),
            "{client}"
        );
        let done = show(&agent, &carol, &id);
        assert_eq!(done["status"]["execution"]["code"], 201, "{client}: {done}");
    }
    // Each client was told to come back at least once, and each call ran once.
    let told_to_retry = agent
        .metric("tollgate_requests_total{verb=\"create\",decision=\"refused\",code=\"429\"}")
        .expect("metrics");
    assert!(told_to_retry >= 2.0, "429s: {told_to_retry}");
    assert_eq!(held_events(&agent, "executed"), 2.0);
    assert_eq!(held_events(&agent, "created"), 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_steps_need_both_groups_and_each_its_count() {
    let scene = Scene::new("appr-steps", 1).await;
    let cluster = Cluster::shared();
    let security = cluster
        .namespace("appr-steps-sec")
        .await
        .expect("second group");
    let approval = format!(
        "      mode: hold\n      steps:\n        - name: sre\n          groups: [\"{}\"]\n        - name: security\n          groups: [\"system:serviceaccounts:{}\"]\n          approvals: 2\n",
        scene.group(),
        security.name
    );
    let agent = start_agent(1, &scene.policy(&approval), None);
    let sre = scene.reviewer("sre1").await;
    let sec1 = scene.reviewer_in(&security, "sec1").await;
    let sec2 = scene.reviewer_in(&security, "sec2").await;

    let mut run = scene.start_in_pod("kubectl create configmap guarded --from-literal=a=b");
    let id = id_of(&wait_pending(&agent, &sre, &scene, "guarded"));
    // Step 2's reviewers cannot act before step 1 is done.
    let early = cli(&agent, &sec1, &["approve", &id, "--reason", "early"]);
    assert!(!early.status.success(), "step 2 before step 1");
    cli_ok(&agent, &sre, &["approve", &id, "--reason", "sre ok"]);
    assert_eq!(show(&agent, &sre, &id)["status"]["state"], "Pending");
    cli_ok(&agent, &sec1, &["approve", &id, "--reason", "security ok"]);
    assert_eq!(
        show(&agent, &sre, &id)["status"]["state"],
        "Pending",
        "step 2 needs two approvals"
    );
    let twice = cli(&agent, &sec1, &["approve", &id, "--reason", "again"]);
    assert!(!twice.status.success(), "one reviewer counts once");
    assert!(configmap_data(&scene.ns.name, "guarded").is_none());
    cli_ok(
        &agent,
        &sec2,
        &["approve", &id, "--reason", "security ok too"],
    );
    assert!(
        run.wait_for_line(|| {}, "configmap/guarded created", Duration::from_secs(30)),
        "{:?}",
        run.seen
    );
    let done = show(&agent, &sre, &id);
    let steps: Vec<u64> = done["status"]["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .map(|d| d["step"].as_u64().unwrap_or(99))
        .collect();
    assert_eq!(steps, [0, 1, 1], "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_the_api_server_would_refuse_never_reaches_a_reviewer() {
    let scene = Scene::new("appr-typo", 1).await;
    let agent = start_agent(1, &scene.policy(&scene.one_step("")), None);
    let dave = scene.reviewer("dave").await;

    // A typo in the manifest: the API server's own validation answers, at once.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\ndata:\n  a: b\n";
    let out = scene.pod.kubectl_exec(
        Cluster::shared(),
        &[],
        &[
            "sh",
            "-c",
            &format!("printf '%s' '{typo}' | kubectl apply -f -"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is invalid") && stderr(&out).contains("metadata.name"),
        "kubectl prints the API server's validation error: {}",
        stderr(&out)
    );
    // RBAC: the pod's account may not create Deployments; the API server says so.
    let out = scene.pod.in_pod_kubectl(
        Cluster::shared(),
        &[
            "create",
            "deployment",
            "web",
            "--image=registry.invalid/web",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is forbidden") && stderr(&out).contains("cannot create resource"),
        "kubectl prints the API server's RBAC refusal: {}",
        stderr(&out)
    );
    // Nothing was queued: dave sees no approval of this namespace (with rights only
    // here, and nothing here, his list is refused outright).
    match try_list(&agent, &dave, None) {
        Ok(items) => assert!(
            items
                .iter()
                .all(|a| a["spec"]["requester"]["podNamespace"] != scene.ns.name.as_str()),
            "no approval was queued: {items:?}"
        ),
        Err(refused) => assert!(refused.contains("forbidden"), "{refused}"),
    }
    assert_eq!(held_events(&agent, "refused_by_dry_run"), 2.0);
    assert_eq!(held_events(&agent, "created"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approval_nobody_decides_expires_and_the_client_is_told() {
    let scene = Scene::new("appr-expire", 1).await;
    let agent = start_agent(
        1,
        &scene.policy(&scene.one_step("      expireAfter: 2s\n")),
        None,
    );
    let erin = scene.reviewer("erin").await;
    let mut run = scene.start_in_pod("kubectl create configmap late --from-literal=a=b");
    let id = id_of(&wait_pending(&agent, &erin, &scene, "late"));
    assert!(
        run.wait_for_line(|| {}, "expired", Duration::from_secs(30)),
        "kubectl hears that the approval expired: {:?}",
        run.seen
    );
    assert_eq!(show(&agent, &erin, &id)["status"]["state"], "Expired");
    let late = cli(&agent, &erin, &["approve", &id, "--reason", "too late"]);
    assert!(
        !late.status.success(),
        "an expired approval cannot be approved"
    );
    assert!(configmap_data(&scene.ns.name, "late").is_none());
}

/// One raw attempt (no client retry) of creating ConfigMap `name`: status and body.
fn create_once(pod: &RunningPod, ns: &str, name: &str) -> (u16, Value) {
    let body = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"data":{{"a":"b"}}}}"#
    );
    let script = format!(
        "T=/var/run/secrets/kubernetes.io/serviceaccount; curl --cacert $T/ca.crt -sS -w '\\n%{{http_code}}' \
         -H \"Authorization: Bearer $(cat $T/token)\" -H 'Content-Type: application/json' \
         -X POST --data '{body}' https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/{ns}/configmaps"
    );
    let out = pod.kubectl_exec(Cluster::shared(), &[], &["sh", "-c", &script]);
    let text = stdout(&out);
    let (json, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no status in {text:?}: {}", stderr(&out)));
    (code, serde_json::from_str(json).unwrap_or(Value::Null))
}

async fn a_pending_approval_survives_an_agent_restart(store: &str) {
    let scene = Scene::new(&format!("appr-restart-{}", &store[..4]), 1).await;
    let approval = format!(
        "      mode: retry\n      steps:\n        - groups: [\"{}\"]\n",
        scene.group()
    );
    let agent = start_agent(1, &scene.policy(&approval), Some(store));
    let frank = scene.reviewer("frank").await;
    let ns = scene.ns.name.clone();

    let (code, status) = create_once(&scene.pod, &ns, "kept");
    assert_eq!(code, 429, "{status}");
    assert_eq!(status["reason"], "TooManyRequests");
    assert!(
        status["details"]["retryAfterSeconds"].as_u64().is_some(),
        "{status}"
    );
    let id = status["details"]["name"]
        .as_str()
        .expect("approval id")
        .to_owned();
    assert!(
        status["message"].as_str().unwrap_or("").contains(&id),
        "the message names the approval: {status}"
    );

    let agent = agent.restart(Cluster::shared()).expect("agent restarts");
    let after = show(&agent, &frank, &id);
    assert_eq!(after["status"]["state"], "Pending", "{after}");
    cli_ok(&agent, &frank, &["approve", &id, "--reason", "fine"]);

    let (code, created) = create_once(&scene.pod, &ns, "kept");
    assert_eq!(
        code, 201,
        "the same call goes through once approved: {created}"
    );
    // Exactly once: the approval is used up. The same call again is judged afresh:
    // its dry-run now fails (the object exists) and no reviewer is asked.
    let (code, again) = create_once(&scene.pod, &ns, "kept");
    assert_eq!(code, 409, "{again}");
    assert_eq!(again["reason"], "AlreadyExists", "{again}");
    let used = show(&agent, &frank, &id);
    assert_eq!(used["status"]["execution"]["code"], 201, "{used}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_approval_survives_an_agent_restart_with_the_embedded_store() {
    a_pending_approval_survives_an_agent_restart("embedded").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_approval_survives_an_agent_restart_with_the_kubernetes_store() {
    a_pending_approval_survives_an_agent_restart("kubernetes").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_call_whose_client_gives_up_is_cancelled() {
    let scene = Scene::new("appr-cancel", 1).await;
    let agent = start_agent(1, &scene.policy(&scene.one_step("")), None);
    let gina = scene.reviewer("gina").await;
    // A client that gives up while the call is held: its connection closes.
    let out = scene.pod.kubectl_exec(
        Cluster::shared(),
        &[],
        &[
            "timeout",
            "3",
            "kubectl",
            "create",
            "configmap",
            "impatient",
            "--from-literal=a=b",
        ],
    );
    assert!(
        !out.status.success(),
        "kubectl gave up: {}{}",
        stdout(&out),
        stderr(&out)
    );
    eprintln!("kubectl: {}", stderr(&out));
    let mut state = Value::Null;
    wait_until(
        "the approval to be cancelled",
        Duration::from_secs(20),
        || {
            state = list(&agent, &gina, None)
                .into_iter()
                .find(|a| object_name(a) == "impatient")
                .map(|a| a["status"]["state"].clone())
                .unwrap_or(Value::Null);
            state == "Cancelled"
        },
    )
    .unwrap_or_else(|e| panic!("{e}: state {state}\n{}", agent.log_text()));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_on_two_nodes_share_the_kubernetes_store() {
    let scene = Scene::new("appr-shared", 1).await;
    let policy = scene.policy(&scene.one_step(""));
    let node1 = start_agent(1, &policy, Some("kubernetes"));
    let node2 = start_agent(2, &policy, Some("kubernetes"));
    let hank = scene.reviewer("hank").await;

    let mut run = scene.start_in_pod("kubectl create configmap shared --from-literal=a=b");
    // The pod is on node 1; the reviewer uses node 2's API.
    let id = id_of(&wait_pending(&node2, &hank, &scene, "shared"));
    let listed = Cluster::shared()
        .kubectl_ok(&["get", "approvalrequests", "-A"])
        .expect("kubectl get approvalrequests");
    let row = listed
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("{id} in:\n{listed}"));
    assert!(
        row.contains("Pending") && row.contains("create"),
        "{listed}"
    );
    // The requesting pod cannot approve its own call by writing the shared store, even
    // when its RBAC would let it: enforced pods never write Tollgate's objects.
    scene
        .ns
        .grant(
            "agent",
            "forger",
            vec![PolicyRule {
                api_groups: Some(vec!["tollgate.dev".into()]),
                resources: Some(vec![
                    "approvalrequests".into(),
                    "approvalrequests/status".into(),
                ]),
                verbs: vec!["*".into()],
                ..PolicyRule::default()
            }],
        )
        .await
        .expect("forger role");
    let forged = scene.pod.in_pod_kubectl(
        Cluster::shared(),
        &[
            "patch",
            "approvalrequest",
            &id,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"state":"Approved"}}"#,
        ],
    );
    assert!(!forged.status.success(), "a forged approval must fail");
    assert!(
        stderr(&forged).contains("cannot be changed from an enforced pod"),
        "{}",
        stderr(&forged)
    );
    // Nor can anyone else, cluster administrators included: only the agent's account
    // writes ApprovalRequests (deploy/crds/...-writers.yaml).
    let forged = Cluster::shared()
        .kubectl()
        .args([
            "patch",
            "approvalrequest",
            &id,
            "-n",
            &scene.ns.name,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"state":"Approved"}}"#,
        ])
        .output()
        .expect("kubectl");
    assert!(
        !forged.status.success(),
        "an administrator's forged approval must fail"
    );
    assert!(
        stderr(&forged).contains("written by the Tollgate agent only"),
        "{}",
        stderr(&forged)
    );
    cli_ok(&node2, &hank, &["approve", &id, "--reason", "from node 2"]);
    assert!(
        run.wait_for_line(|| {}, "configmap/shared created", Duration::from_secs(30)),
        "the held call on node 1 runs: {:?}\nnode1 log:\n{}",
        run.seen,
        node1.log_text()
    );
    let done = show(&node1, &hank, &id);
    assert_eq!(
        done["status"]["execution"]["node"],
        node1.node.name.as_str()
    );
    let listed = Cluster::shared()
        .kubectl_ok(&["get", "approvalrequests", "-n", &scene.ns.name])
        .expect("kubectl get approvalrequests");
    assert!(listed.contains("Approved"), "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn execute_as_runs_the_approved_call_as_the_named_account() {
    let scene = Scene::new("appr-execas", 1).await;
    let ns = scene.ns.name.clone();
    // The pod's account only reads; `deployer` may create ConfigMaps.
    scene.ns.service_account("reader").await.expect("reader");
    scene
        .ns
        .grant(
            "reader",
            "reads",
            vec![PolicyRule {
                api_groups: Some(vec!["".into()]),
                resources: Some(vec!["configmaps".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..PolicyRule::default()
            }],
        )
        .await
        .expect("reader role");
    scene
        .ns
        .service_account("deployer")
        .await
        .expect("deployer");
    scene
        .ns
        .grant("deployer", "writes", workload_rules())
        .await
        .expect("deployer role");
    let mut opts = PodOptions::new("reader-pod", 1, &["sleep", "3600"]);
    opts.service_account = Some("reader".into());
    opts.labels
        .insert("tollgate.dev/enforce".into(), "true".into());
    let pod = scene.ns.run_pod(opts).await.expect("pod");

    let policy = scene.policy(&scene.one_step(&format!("      executeAs: {ns}/deployer\n")));
    let agent = start_agent(1, &policy, None);
    // The agent may impersonate exactly the accounts the policy names.
    let rbac = Command::new(AGENT)
        .args(["policy", "rbac"])
        .arg(&agent.policy_file)
        .output()
        .expect("policy rbac");
    assert!(rbac.status.success(), "{}", stderr(&rbac));
    let rbac = stdout(&rbac);
    assert!(rbac.contains("resourceNames: [deployer]"), "{rbac}");
    apply(&rbac);
    let can = |who: &str, what: &str| {
        Cluster::shared()
            .kubectl()
            .args(["auth", "can-i"])
            .args(what.split(' '))
            .args(["-n", &ns, "--as", who])
            .output()
            .map(|o| stdout(&o).trim().to_owned())
            .unwrap_or_default()
    };
    let agent_sa = "system:serviceaccount:tollgate-system:tollgate-agent";
    assert_eq!(can(agent_sa, "impersonate serviceaccounts/deployer"), "yes");
    assert_eq!(can(agent_sa, "impersonate serviceaccounts/reader"), "no");
    assert_eq!(
        can(
            &format!("system:serviceaccount:{ns}:reader"),
            "create configmaps"
        ),
        "no"
    );

    let ivy = scene.reviewer("ivy").await;
    let mut run = pod
        .kubectl_exec_child(
            Cluster::shared(),
            &[
                "kubectl",
                "create",
                "configmap",
                "by-deployer",
                "--from-literal=a=b",
            ],
        )
        .expect("exec");
    let approval = wait_pending(&agent, &ivy, &scene, "by-deployer");
    assert_eq!(approval["spec"]["executeAs"], format!("{ns}/deployer"));
    cli_ok(
        &agent,
        &ivy,
        &[
            "approve",
            approval["id"].as_str().unwrap_or(""),
            "--reason",
            "ok",
        ],
    );
    assert!(
        run.wait_for_line(
            || {},
            "configmap/by-deployer created",
            Duration::from_secs(30)
        ),
        "{:?}\n{}",
        run.seen,
        agent.log_text()
    );
    let manager = Cluster::shared()
        .kubectl_ok(&[
            "get",
            "configmap",
            "by-deployer",
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.managedFields[0].manager}",
        ])
        .expect("created");
    assert_eq!(manager, "kubectl-create");
}
