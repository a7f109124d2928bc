//! Suite `deploy`: the manifests of `deploy/` as the real API server sees them.
//!
//! - The kustomize base (`kubectl apply -k deploy/ --dry-run=server`) is accepted object
//!   by object and holds exactly the objects it should; the Pod its DaemonSet would make
//!   passes Pod admission in `tollgate-system` (Pod Security, priority class, service
//!   account) and is refused in a `baseline` namespace; the TLS Secret `certs issue`
//!   makes has the layout the DaemonSet mounts.
//! - The default policy passes `policy check` and decides as documented.
//! - The agent's RBAC, applied for real, allows what the agent does and nothing else
//!   (`kubectl auth can-i --as`, and real requests shaped like the agent's);
//!   impersonation comes only from `policy rbac`, for the accounts a policy names. The
//!   files are bound to an account of the test's own ([`RbacCopy`]), so what other
//!   suites leave bound to the agent's account does not count.
//! - The injected-ca component (`deploy/injected-ca`), enabled as docs/install.md says:
//!   accepted whole, its DaemonSet the base's but for the trust mode; its webhooks are
//!   sent exactly the pods discovery enforces, once, and never a pod of kube-system or
//!   tollgate-system; its RBAC and admission policy let the agent keep its CA, bundles
//!   and caBundle and do nothing more.
//! - The DaemonSet asks for the data path's capabilities and no more.
//! - The reviewer ClusterRole lets a reviewer decide and read sessions, nothing else.
//! - The Dockerfile uses the toolchain `cargo xtask setup` verified.
//!
//! Runs as root (the shared control plane: `cargo xtask cluster up`). Only RBAC, the
//! namespace and the CRD are applied for real (as the other suites do), and copies of
//! the RBAC and admission policy that name only the test's own accounts; every other
//! object is a server-side dry-run, so nothing here disturbs a suite running beside it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{bail, ensure, Context, Result};
use gateway_agent::policy::{Caller, Policy};
use gateway_agent::proxy::classify::classify;
use serde_json::{json, Value};
use tollgate_tests::cluster::Cluster;

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");
const NAMESPACE: &str = "tollgate-system";
const AGENT_USER: &str = "system:serviceaccount:tollgate-system:tollgate-agent";
/// The capabilities the data path needs (checked on the real kernel: see daemonset.yaml).
const DATA_PATH_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
const REVIEWER_GROUP: &str = "tollgate:reviewers";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn path_arg(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temporary directory, removed when dropped (also when a test fails: one holds a key
/// issued from the test cluster's CA).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir(what: &str) -> Result<ScratchDir> {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-deploy-{what}-{}-{}",
        std::process::id(),
        tollgate_tests::topology::random_hex(3)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(ScratchDir(dir))
}

/// What the suites apply by path anyway, applied for real: the namespace, the agent's
/// and the reviewers' RBAC, and the CRD (served before anything refers to it).
fn apply_cluster_prerequisites(cluster: &Cluster) -> Result<()> {
    for file in [
        "deploy/rbac.yaml",
        "deploy/reviewer-rbac.yaml",
        "deploy/crds",
    ] {
        cluster.kubectl_ok(&["apply", "-f", path_arg(&repo_path(file))?])?;
    }
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/approvalrequests.tollgate.dev",
    ])?;
    Ok(())
}

/// Every object of the kustomize base as the API server would store it
/// (`kubectl apply -k deploy/ --dry-run=server -o json`): defaulted and validated.
fn base_as_the_server_sees_it(cluster: &Cluster) -> Result<Vec<Value>> {
    apply_cluster_prerequisites(cluster)?;
    let out = cluster.kubectl_ok(&[
        "apply",
        "-k",
        path_arg(&repo_path("deploy"))?,
        "--dry-run=server",
        "-o",
        "json",
    ])?;
    let list: Value = serde_json::from_str(&out).context("kubectl's answer is not JSON")?;
    match list["items"].as_array() {
        Some(items) => Ok(items.clone()),
        None => Ok(vec![list]),
    }
}

fn object<'a>(items: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    items
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("the base has no {kind} {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn env_literal<'a>(container: &'a Value, name: &str) -> Result<&'a str> {
    env_value(container, name)
        .and_then(|e| e["value"].as_str())
        .with_context(|| format!("env {name} has no literal value"))
}

/// The objects of the kustomize base: (kind, namespace, name).
const BASE_OBJECTS: &[(&str, &str, &str)] = &[
    ("Namespace", "", NAMESPACE),
    ("ServiceAccount", NAMESPACE, "tollgate-agent"),
    ("ClusterRole", "", "tollgate-agent"),
    ("ClusterRoleBinding", "", "tollgate-agent"),
    ("Role", "default", "tollgate-agent-apiserver"),
    ("RoleBinding", "default", "tollgate-agent-apiserver"),
    ("Role", NAMESPACE, "tollgate-agent-policy"),
    ("RoleBinding", NAMESPACE, "tollgate-agent-policy"),
    ("ClusterRole", "", "tollgate-approval-reviewer"),
    (
        "CustomResourceDefinition",
        "",
        "approvalrequests.tollgate.dev",
    ),
    (
        "ValidatingAdmissionPolicy",
        "",
        "tollgate-approvalrequest-writers",
    ),
    (
        "ValidatingAdmissionPolicyBinding",
        "",
        "tollgate-approvalrequest-writers",
    ),
    ("ResourceQuota", NAMESPACE, "tollgate-critical-pods"),
    ("ConfigMap", NAMESPACE, "tollgate-policy"),
    ("Service", NAMESPACE, "tollgate-api"),
    ("DaemonSet", NAMESPACE, "tollgate-agent"),
];

/// What the injected-ca component adds to the base.
const INJECTED_CA_OBJECTS: &[(&str, &str, &str)] = &[
    ("ClusterRole", "", "tollgate-agent-trust"),
    ("ClusterRoleBinding", "", "tollgate-agent-trust"),
    ("Role", NAMESPACE, "tollgate-agent-ca"),
    ("RoleBinding", NAMESPACE, "tollgate-agent-ca"),
    ("Service", NAMESPACE, "tollgate-webhook"),
    ("MutatingWebhookConfiguration", "", "tollgate"),
    ("ValidatingAdmissionPolicy", "", "tollgate-agent-creates"),
    (
        "ValidatingAdmissionPolicyBinding",
        "",
        "tollgate-agent-creates",
    ),
    ("ValidatingAdmissionPolicy", "", "tollgate-agent-cabundle"),
    (
        "ValidatingAdmissionPolicyBinding",
        "",
        "tollgate-agent-cabundle",
    ),
];

fn expected_objects(lists: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    lists
        .iter()
        .map(|(k, ns, n)| ((*k).to_owned(), (*ns).to_owned(), (*n).to_owned()))
        .collect()
}

/// (kind, namespace, name) of each object.
fn object_set(items: &[Value]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The base with the injected-ca component enabled as docs/install.md says (a copy of
/// deploy/ whose kustomization.yaml gains `components: [injected-ca]`), every object as
/// the API server would store it (`kubectl apply -k --dry-run=server`).
fn injected_ca_as_the_server_sees_it(cluster: &Cluster, dir: &ScratchDir) -> Result<Vec<Value>> {
    apply_cluster_prerequisites(cluster)?;
    let copy = dir.join("deploy");
    copy_dir(&repo_path("deploy"), &copy)?;
    let kustomization = copy.join("kustomization.yaml");
    let mut text = std::fs::read_to_string(&kustomization)?;
    ensure!(
        !text.lines().any(|l| l.starts_with("components:")),
        "deploy/kustomization.yaml has components already: the documented edit no longer fits"
    );
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("components:\n  - injected-ca\n");
    std::fs::write(&kustomization, text)?;
    let out = cluster.kubectl_ok(&[
        "apply",
        "-k",
        path_arg(&copy)?,
        "--dry-run=server",
        "-o",
        "json",
    ])?;
    let list: Value = serde_json::from_str(&out).context("kubectl's answer is not JSON")?;
    match list["items"].as_array() {
        Some(items) => Ok(items.clone()),
        None => Ok(vec![list]),
    }
}

/// `gateway-agent run --help`, where the agent's defaults are written.
fn run_help() -> Result<String> {
    let out = std::process::Command::new(AGENT)
        .args(["run", "--help"])
        .output()?;
    ensure!(out.status.success(), "run --help: {}", text(&out.stderr));
    Ok(text(&out.stdout))
}

/// The default `run --help` gives for `flag`.
fn run_default(help: &str, flag: &str) -> Result<String> {
    let start = help
        .find(&format!("{flag} <"))
        .with_context(|| format!("run --help has no {flag}"))?;
    let block = &help[start..];
    let block = match block[1..].find("\n      --") {
        Some(end) => &block[..end + 1],
        None => block,
    };
    let value = block
        .split("[default: ")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .with_context(|| format!("{flag} has no default"))?;
    Ok(value.to_owned())
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects `labels`, as
/// the API server decides; null or `{}` selects everything.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> Result<bool> {
    for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
        if labels.get(key).map(String::as_str) != value.as_str() {
            return Ok(false);
        }
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().context("a selector key")?;
        let values = strings(&expression["values"]);
        let have = labels.get(key).map(String::as_str);
        let selected = match expression["operator"].as_str() {
            Some("In") => have.is_some_and(|v| values.contains(&v)),
            Some("NotIn") => !have.is_some_and(|v| values.contains(&v)),
            Some("Exists") => have.is_some(),
            Some("DoesNotExist") => have.is_none(),
            other => bail!("selector operator {other:?}"),
        };
        if !selected {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `value` (a list of objects) sorted by `key`, for comparisons that ignore order.
fn sorted_by(value: &Value, key: &str) -> Value {
    let mut items = value.as_array().cloned().unwrap_or_default();
    items.sort_by_key(|item| item[key].to_string());
    Value::Array(items)
}

/// `kubectl create --dry-run=server -f FILE` of one object, as the admin.
fn dry_run_create(cluster: &Cluster, object: &Value, dir: &ScratchDir) -> Result<Output> {
    let file = dir.join(&format!(
        "{}.json",
        object["metadata"]["name"].as_str().unwrap_or("object")
    ));
    std::fs::write(&file, serde_json::to_vec(object)?)?;
    Ok(cluster
        .kubectl()
        .args(["create", "--dry-run=server", "-o", "json", "-f"])
        .arg(&file)
        .output()?)
}

/// The Pod the DaemonSet's controller would create on a node, in `namespace`.
fn pod_from_template(daemonset: &Value, namespace: &str) -> Value {
    let template = &daemonset["spec"]["template"];
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "tollgate-agent-dry-run",
            "namespace": namespace,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    })
}

/// The kustomize base is accepted by the API server object by object, and holds exactly
/// the objects an install needs. The Pod its DaemonSet would create passes Pod
/// admission in tollgate-system; the TLS Secret `certs issue` makes fits the mount.
#[test]
fn every_object_of_the_base_is_accepted_by_the_api_server() -> Result<()> {
    let cluster = Cluster::shared();
    let items = base_as_the_server_sees_it(cluster)?;

    let found = object_set(&items);
    let expected = expected_objects(BASE_OBJECTS);
    ensure!(
        found == expected,
        "the base's objects differ from an install's:\n missing: {:?}\n unexpected: {:?}",
        expected.difference(&found).collect::<Vec<_>>(),
        found.difference(&expected).collect::<Vec<_>>()
    );
    for o in &items {
        ensure!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tollgate",
            "{} {} lacks the part-of label",
            o["kind"],
            o["metadata"]["name"]
        );
    }

    // The Service reaches the agents' REST API port by its name.
    let daemonset = object(&items, "DaemonSet", "tollgate-agent")?;
    let service = object(&items, "Service", "tollgate-api")?;
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"]
        .as_object()
        .context("service selector")?
    {
        ensure!(
            &pod_labels[key] == value,
            "the Service selects {key}={value}, which the agent pods do not carry"
        );
    }
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let api_port = container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "api"))
        .context("no container port named api")?;
    ensure!(api_port["containerPort"] == 15444 && service["spec"]["ports"][0]["port"] == 15444);
    ensure!(service["spec"]["ports"][0]["targetPort"] == "api");
    ensure!(
        env_literal(container, "TOLLGATE_APPROVAL_STORE")? == "kubernetes",
        "one Service over every agent needs the shared (Kubernetes) approval store"
    );

    // The Pod the DaemonSet would create: Pod Security (the namespace's level), the
    // priority class and the service account all admit it...
    let dir = scratch_dir("pods")?;
    let out = dry_run_create(cluster, &pod_from_template(daemonset, NAMESPACE), &dir)?;
    ensure!(
        out.status.success(),
        "the agent's Pod is refused in {NAMESPACE}: {}",
        text(&out.stderr)
    );
    // ...which means something: the same Pod in a namespace at the baseline level is
    // refused by Pod Security admission.
    let rt = tokio::runtime::Runtime::new()?;
    let ns = rt.block_on(cluster.namespace("deploy-psa"))?;
    cluster.kubectl_ok(&[
        "label",
        "namespace",
        &ns.name,
        "pod-security.kubernetes.io/enforce=baseline",
    ])?;
    rt.block_on(ns.service_account("tollgate-agent"))?;
    let out = dry_run_create(cluster, &pod_from_template(daemonset, &ns.name), &dir)?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("violates PodSecurity"),
        "a baseline namespace should refuse the agent's Pod: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    drop(ns);

    // The TLS Secret: `certs issue` writes tls.crt and tls.key; stored as a
    // kubernetes.io/tls Secret they are what the DaemonSet mounts and points at.
    let pki = cluster.layout.pki();
    let tls = dir.join("tls");
    let out = std::process::Command::new(AGENT)
        .args(["certs", "issue", "--ca-cert"])
        .arg(pki.join("ca.crt"))
        .arg("--ca-key")
        .arg(pki.join("ca.key"))
        .arg("--out")
        .arg(&tls)
        .args(["--extra-san", "tollgate-api.tollgate-system.svc"])
        .output()?;
    ensure!(out.status.success(), "certs issue: {}", text(&out.stderr));
    let secret: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "create",
        "secret",
        "tls",
        "tollgate-tls",
        "-n",
        NAMESPACE,
        "--cert",
        path_arg(&tls.join("tls.crt"))?,
        "--key",
        path_arg(&tls.join("tls.key"))?,
        "--dry-run=server",
        "-o",
        "json",
    ])?)?;
    ensure!(secret["type"] == "kubernetes.io/tls");
    let volumes = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?;
    let tls_volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == "tollgate-tls")
        .context("no volume of Secret tollgate-tls")?;
    ensure!(
        tls_volume["secret"]["defaultMode"] == 0o400,
        "the key should be readable by its owner only: {tls_volume}"
    );
    let mount = container["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == tls_volume["name"]))
        .context("the TLS volume is not mounted")?;
    ensure!(mount["readOnly"] == true);
    let mount_path = mount["mountPath"].as_str().context("mountPath")?;
    for (env, key) in [
        ("TOLLGATE_TLS_CERT", "tls.crt"),
        ("TOLLGATE_TLS_KEY", "tls.key"),
    ] {
        ensure!(secret["data"][key].is_string(), "the Secret has no {key}");
        ensure!(
            env_literal(container, env)? == format!("{mount_path}/{key}"),
            "{env} does not point at {key} of the mounted Secret"
        );
    }
    Ok(())
}

/// How deploy/policy.yaml must decide: `METHOD PATH[?QUERY] ACTION [RULE]` (no rule:
/// the default), for a pod of namespace `agents`.
const DEFAULT_POLICY_CASES: &str = "
    GET     /api/v1/namespaces/agents/secrets/db                            allow
    GET     /api/v1/secrets                                                 allow
    GET     /apis/apps/v1/namespaces/agents/deployments?watch=true          allow
    GET     /api/v1/namespaces/agents/pods/web/log                          allow
    POST    /api/v1/namespaces/agents/secrets                               deny    no-secret-writes
    PATCH   /api/v1/namespaces/agents/secrets/db                            deny    no-secret-writes
    DELETE  /api/v1/namespaces/agents/secrets                               deny    no-secret-writes
    POST    /apis/apps/v1/namespaces/agents/deployments                     approve workloads-need-review
    PUT     /apis/apps/v1/namespaces/agents/deployments/web/scale           approve workloads-need-review
    PATCH   /apis/apps/v1/namespaces/agents/statefulsets/db                 approve workloads-need-review
    DELETE  /apis/apps/v1/namespaces/agents/daemonsets/logs                 approve workloads-need-review
    POST    /apis/apps/v1/namespaces/agents/replicasets                     approve workloads-need-review
    POST    /apis/batch/v1/namespaces/agents/jobs                           approve workloads-need-review
    DELETE  /apis/batch/v1/namespaces/agents/cronjobs/nightly               approve workloads-need-review
    DELETE  /api/v1/namespaces/agents/pods/web                              approve workloads-need-review
    DELETE  /api/v1/namespaces/agents/pods                                  approve workloads-need-review
    POST    /api/v1/namespaces/agents/pods/web/eviction                     approve workloads-need-review
    POST    /api/v1/namespaces/agents/pods/web/exec?command=sh              approve pod-access-needs-review
    POST    /apis/rbac.authorization.k8s.io/v1/clusterrolebindings          approve rbac-needs-review
    POST    /api/v1/namespaces/agents/configmaps                            allow
    PATCH   /apis/apps/v1/namespaces/agents/deployments/web/status          allow
";

/// The policy shipped in deploy/policy.yaml passes `policy check`, needs no
/// impersonation, and decides as its comments say.
#[test]
fn the_default_policy_is_valid_and_decides_as_documented() -> Result<()> {
    let cluster = Cluster::shared();
    let items = base_as_the_server_sees_it(cluster)?;
    let configmap = object(&items, "ConfigMap", "tollgate-policy")?;
    let document = configmap["data"]["policy.yaml"]
        .as_str()
        .context("the ConfigMap has no key policy.yaml (the agent reads that key)")?;
    let dir = scratch_dir("policy")?;
    let file = dir.join("policy.yaml");
    std::fs::write(&file, document)?;

    let out = std::process::Command::new(AGENT)
        .args(["policy", "check"])
        .arg(&file)
        .output()?;
    ensure!(
        out.status.success(),
        "policy check refused deploy/policy.yaml:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = std::process::Command::new(AGENT)
        .args(["policy", "rbac"])
        .arg(&file)
        .output()?;
    ensure!(out.status.success(), "policy rbac: {}", text(&out.stderr));
    ensure!(
        text(&out.stdout).contains("needs no impersonation"),
        "the default policy should need no impersonation:\n{}",
        text(&out.stdout)
    );

    let policy = Policy::parse(document).map_err(|e| anyhow::anyhow!("{e}"))?;
    let labels = Default::default();
    let groups = vec!["system:serviceaccounts".to_owned()];
    let caller = Caller {
        user: "system:serviceaccount:agents:coder",
        groups: &groups,
        namespace: "agents",
        service_account: "coder",
        pod_labels: &labels,
    };
    for case in DEFAULT_POLICY_CASES
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let mut words = case.split_whitespace();
        let (Some(method), Some(uri), Some(expected)) = (words.next(), words.next(), words.next())
        else {
            bail!("bad case {case:?}");
        };
        let expected_rule = words.next();
        let (path, query) = match uri.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (uri, None),
        };
        let method: http::Method = method.parse()?;
        let request = classify(&method, path, query).map_err(|e| anyhow::anyhow!("{e}"))?;
        let decision = policy.decide(&caller, &request);
        ensure!(
            decision.action.to_string() == expected && decision.rule.as_deref() == expected_rule,
            "{method} {uri}: {} by {:?}, expected {expected} by {expected_rule:?}",
            decision.action,
            decision.rule
        );
        if let Some(approval) = &decision.approval {
            let step_groups: Vec<&str> = approval
                .steps
                .iter()
                .flat_map(|s| s.groups.iter().map(String::as_str))
                .collect();
            ensure!(
                approval.steps.len() == 1 && step_groups == [REVIEWER_GROUP],
                "{method} {uri}: steps {:?}",
                approval.steps
            );
        }
    }

    // Masking: a Secret read by an enforced pod shows no value.
    let mut secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "db", "namespace": "agents"},
        "data": {"password": "aHVudGVyMg=="},
        "stringData": {"token": "hunter2"},
    });
    policy.masker.mask_value(
        &mut secret,
        &gateway_agent::masking::Context::for_kind("Secret"),
    )?;
    ensure!(
        secret["data"]["password"] == gateway_agent::masking::MASK_MARKER_BASE64
            && secret["stringData"]["token"] == gateway_agent::masking::MASK_MARKER,
        "a Secret's values are not masked: {secret}"
    );
    Ok(())
}

/// Who `kubectl auth can-i` asks about, and where.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// Every namespace (`-A`), or a cluster-scoped resource.
    Cluster,
    Namespace(&'a str),
}

/// Resources the API server does not serve, which only authorizers ask about: Tollgate's
/// sessions (its REST API asks), and the impersonation of uids and user extras.
/// `kubectl auth can-i` does not split the group off a resource it cannot discover, so
/// these go to a SubjectAccessReview: (as written here, group, resource).
const UNSERVED_RESOURCES: [(&str, &str, &str); 3] = [
    ("sessions.tollgate.dev", "tollgate.dev", "sessions"),
    (
        "uids.authentication.k8s.io",
        "authentication.k8s.io",
        "uids",
    ),
    (
        "userextras.authentication.k8s.io",
        "authentication.k8s.io",
        "userextras",
    ),
];

/// `kubectl auth can-i VERB RESOURCE [--subresource SUB] --as USER`, as the API
/// server's SubjectAccessReview answers it.
fn can_i(cluster: &Cluster, user: &str, verb: &str, resource: &str, scope: Scope) -> Result<bool> {
    if let Some((_, group, plural)) = UNSERVED_RESOURCES.iter().find(|(r, ..)| *r == resource) {
        return subject_access_review(cluster, user, verb, group, plural, scope);
    }
    let mut cmd = cluster.kubectl();
    cmd.args(["auth", "can-i", verb]);
    match resource.split_once('#') {
        Some((resource, subresource)) => cmd.args([resource, "--subresource", subresource]),
        None => cmd.arg(resource),
    };
    cmd.args(["--as", user]);
    match scope {
        Scope::Cluster => cmd.arg("--all-namespaces"),
        Scope::Namespace(ns) => cmd.args(["--namespace", ns]),
    };
    let out = cmd.output()?;
    match text(&out.stdout).trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => bail!(
            "kubectl auth can-i {verb} {resource}: {other:?} {}",
            text(&out.stderr)
        ),
    }
}

/// A SubjectAccessReview for a service account `user` (with the groups the API server
/// gives service accounts), as Tollgate's REST API asks it.
fn subject_access_review(
    cluster: &Cluster,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    scope: Scope,
) -> Result<bool> {
    let namespace = match scope {
        Scope::Cluster => "",
        Scope::Namespace(ns) => ns,
    };
    let sa_namespace = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split(':').next())
        .context("a service account user")?;
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": [
                "system:serviceaccounts",
                format!("system:serviceaccounts:{sa_namespace}"),
                "system:authenticated",
            ],
            "resourceAttributes": {
                "verb": verb,
                "group": group,
                "resource": resource,
                "namespace": namespace,
            },
        },
    });
    let mut child = cluster
        .kubectl()
        .args(["create", "-o", "json", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("stdin")?,
        review.to_string().as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "SubjectAccessReview: {}",
        text(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    Ok(answer["status"]["allowed"] == true)
}

/// Checks every `(verb, resource, scope)` for `user`; `resource` is `name.group`,
/// `resource/name` or `resource#subresource` as kubectl takes them. Collects every
/// mismatch before failing, so one run names them all.
fn expect_rights(
    cluster: &Cluster,
    user: &str,
    allowed: bool,
    checks: &[(&str, &str, Scope)],
) -> Result<Vec<String>> {
    let mut wrong = Vec::new();
    for (verb, resource, scope) in checks {
        if can_i(cluster, user, verb, resource, *scope)? != allowed {
            let scope = match scope {
                Scope::Cluster => "cluster-wide".to_owned(),
                Scope::Namespace(ns) => format!("in {ns}"),
            };
            wrong.push(format!(
                "{user} {} {verb} {resource} {scope}",
                if allowed { "cannot" } else { "can" }
            ));
        }
    }
    Ok(wrong)
}

/// The agent's service account, to which every binding of the manifests is made.
const AGENT_ACCOUNT: &str = "tollgate-agent";

/// The RBAC (and admission policies) of some manifests, applied for real but bound to
/// a service account of the test's own in tollgate-system instead of the agent's: every
/// Role, ClusterRole, binding and policy is applied under a new name, and every
/// binding's subject (which must be the agent's account) becomes the test's account.
/// `can-i` for that account then answers for exactly what these files grant, whatever
/// else is bound to the agent's account on the shared cluster (suite `trust` leaves the
/// injected-ca RBAC bound to it). Everything is deleted when dropped.
struct RbacCopy {
    account: String,
    /// `system:serviceaccount:tollgate-system:<account>`.
    user: String,
    /// The MutatingWebhookConfiguration the copied rules name instead of `tollgate`
    /// (which suite `trust` owns on the shared cluster).
    webhook_configuration: String,
    /// (resource, namespace, name) of what was made, for the clean-up.
    made: Vec<(String, Option<String>, String)>,
}

impl RbacCopy {
    fn apply(cluster: &Cluster, files: &[&str]) -> Result<RbacCopy> {
        let suffix = tollgate_tests::topology::random_hex(3);
        let account = format!("{AGENT_ACCOUNT}-{suffix}");
        let mut copy = RbacCopy {
            user: format!("system:serviceaccount:{NAMESPACE}:{account}"),
            account,
            webhook_configuration: format!("tollgate-{suffix}"),
            made: Vec::new(),
        };
        let renamed = |name: &str| format!("{name}-{suffix}");
        let mut objects = Vec::new();
        for file in files {
            let out = cluster.kubectl_ok(&[
                "create",
                "--dry-run=client",
                "-o",
                "json",
                "-f",
                path_arg(&repo_path(file))?,
            ])?;
            // One JSON document per object, or a List.
            for value in serde_json::Deserializer::from_str(&out).into_iter::<Value>() {
                let value = value.with_context(|| format!("kubectl's answer for {file}"))?;
                match value["items"].as_array() {
                    Some(items) => objects.extend(items.iter().cloned()),
                    None => objects.push(value),
                }
            }
        }
        let roles: BTreeSet<(String, String)> = objects
            .iter()
            .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or_default().to_owned(),
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect();
        cluster.kubectl_ok(&["create", "serviceaccount", &copy.account, "-n", NAMESPACE])?;
        copy.made.push((
            "serviceaccounts".into(),
            Some(NAMESPACE.into()),
            copy.account.clone(),
        ));
        let mut items = Vec::new();
        for mut object in objects {
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            let resource = match kind.as_str() {
                // The namespace and the account exist (apply_cluster_prerequisites).
                "Namespace" | "ServiceAccount" => continue,
                "ClusterRole" => "clusterroles.rbac.authorization.k8s.io",
                "ClusterRoleBinding" => "clusterrolebindings.rbac.authorization.k8s.io",
                "Role" => "roles.rbac.authorization.k8s.io",
                "RoleBinding" => "rolebindings.rbac.authorization.k8s.io",
                "ValidatingAdmissionPolicy" => {
                    "validatingadmissionpolicies.admissionregistration.k8s.io"
                }
                "ValidatingAdmissionPolicyBinding" => {
                    "validatingadmissionpolicybindings.admissionregistration.k8s.io"
                }
                other => bail!("{other} in {files:?}: not RBAC"),
            };
            let name = object["metadata"]["name"]
                .as_str()
                .context("metadata.name")?
                .to_owned();
            object["metadata"]["name"] = json!(renamed(&name));
            match kind.as_str() {
                "ClusterRole" | "Role" => {
                    for rule in object["rules"].as_array_mut().into_iter().flatten() {
                        if strings(&rule["resources"]).contains(&"mutatingwebhookconfigurations") {
                            for name in rule["resourceNames"].as_array_mut().into_iter().flatten() {
                                if name == "tollgate" {
                                    *name = json!(copy.webhook_configuration);
                                }
                            }
                        }
                    }
                }
                "ClusterRoleBinding" | "RoleBinding" => {
                    let role_kind = object["roleRef"]["kind"].as_str().unwrap_or_default();
                    let role = object["roleRef"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    if roles.contains(&(role_kind.to_owned(), role.clone())) {
                        object["roleRef"]["name"] = json!(renamed(&role));
                    }
                    for subject in object["subjects"]
                        .as_array_mut()
                        .context("subjects")?
                        .iter_mut()
                    {
                        ensure!(
                            subject["kind"] == "ServiceAccount"
                                && subject["name"] == AGENT_ACCOUNT
                                && subject["namespace"] == NAMESPACE,
                            "{kind} {name} is bound to someone else than the agent: {subject}"
                        );
                        subject["name"] = json!(copy.account);
                    }
                }
                "ValidatingAdmissionPolicy" => {
                    let text = object.to_string();
                    ensure!(
                        text.contains(AGENT_USER),
                        "{kind} {name} does not name the agent's account"
                    );
                    object = serde_json::from_str(&text.replace(AGENT_USER, &copy.user))?;
                }
                "ValidatingAdmissionPolicyBinding" => {
                    let policy = object["spec"]["policyName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    object["spec"]["policyName"] = json!(renamed(&policy));
                }
                _ => {}
            }
            copy.made.push((
                resource.to_owned(),
                object["metadata"]["namespace"].as_str().map(str::to_owned),
                renamed(&name),
            ));
            items.push(object);
        }
        cluster
            .apply_yaml(&json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string())?;
        Ok(copy)
    }

    /// A token of the account and a kubeconfig holding only that (the admin's holds a
    /// client certificate, which the API server would take over any token).
    fn kubeconfig(&self, cluster: &Cluster, dir: &ScratchDir) -> Result<PathBuf> {
        let token = cluster
            .kubectl_ok(&[
                "create",
                "token",
                &self.account,
                "-n",
                NAMESPACE,
                "--duration=10m",
            ])?
            .trim()
            .to_owned();
        let server = cluster.kubectl_ok(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ])?;
        let kubeconfig = dir.join("agent.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: agent\n  context: {{cluster: c, user: agent}}\ncurrent-context: agent\n",
                cluster.layout.pki().join("ca.crt").display()
            ),
        )?;
        let out = kubectl_as(
            &kubeconfig,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )?;
        ensure!(
            text(&out.stdout) == self.user,
            "the token is not {}'s: {}{}",
            self.user,
            text(&out.stdout),
            text(&out.stderr)
        );
        Ok(kubeconfig)
    }
}

impl Drop for RbacCopy {
    fn drop(&mut self) {
        let cluster = Cluster::shared();
        for (resource, namespace, name) in self.made.iter().rev() {
            let mut cmd = cluster.kubectl();
            cmd.args([
                "delete",
                resource,
                name,
                "--ignore-not-found",
                "--wait=false",
            ]);
            if let Some(namespace) = namespace {
                cmd.args(["-n", namespace]);
            }
            let _ = cmd
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// kubectl with `kubeconfig` (someone else than the admin).
fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()?)
}

/// The RBAC authorizer learns of new bindings from a watch: waits until `user` may do
/// what `probe` says.
fn wait_for_rights(cluster: &Cluster, user: &str, probe: (&str, &str, Scope)) -> Result<()> {
    let (verb, resource, scope) = probe;
    tollgate_tests::cluster::harness::wait_until(
        &format!("{user} to be allowed to {verb} {resource}"),
        std::time::Duration::from_secs(20),
        || can_i(cluster, user, verb, resource, scope).unwrap_or(false),
    )
}

/// The agent's RBAC (deploy/rbac.yaml, bound to an account of the test's own: see
/// [`RbacCopy`]) lets it do what discovery, identity, policy and approvals do, and
/// nothing else: no Secrets, no writes outside its approvals, no deletes, no
/// impersonation, no RBAC escalation.
#[test]
fn the_agent_may_do_what_it_needs_and_nothing_more() -> Result<()> {
    use Scope::{Cluster as All, Namespace as In};
    let cluster = Cluster::shared();
    apply_cluster_prerequisites(cluster)?;
    let rbac = RbacCopy::apply(cluster, &["deploy/rbac.yaml"])?;
    let user = rbac.user.as_str();
    wait_for_rights(
        cluster,
        user,
        ("create", "tokenreviews.authentication.k8s.io", All),
    )?;
    let ar = "approvalrequests.tollgate.dev";
    let must: &[(&str, &str, Scope)] = &[
        // discovery
        ("list", "pods", All),
        ("watch", "pods", All),
        ("get", "pods", In("agents")),
        ("list", "namespaces", All),
        ("watch", "namespaces", All),
        ("get", "services/kubernetes", In("default")),
        ("list", "services/kubernetes", In("default")),
        ("watch", "services/kubernetes", In("default")),
        ("list", "endpointslices.discovery.k8s.io", In("default")),
        ("watch", "endpointslices.discovery.k8s.io", In("default")),
        // identity, and the REST API's authorization
        ("create", "tokenreviews.authentication.k8s.io", All),
        ("create", "subjectaccessreviews.authorization.k8s.io", All),
        // the policy
        ("get", "configmaps/tollgate-policy", In(NAMESPACE)),
        ("list", "configmaps/tollgate-policy", In(NAMESPACE)),
        ("watch", "configmaps/tollgate-policy", In(NAMESPACE)),
        // the Kubernetes approval store, in every requester's namespace
        ("get", ar, All),
        ("list", ar, All),
        ("watch", ar, All),
        ("create", ar, In("agents")),
        ("update", ar, In("agents")),
        ("patch", ar, In("agents")),
        // retention removes decided approvals
        ("delete", ar, In("agents")),
        (
            "update",
            "approvalrequests.tollgate.dev#status",
            In("agents"),
        ),
    ];
    let must_not: &[(&str, &str, Scope)] = &[
        // Secrets, anywhere
        ("get", "secrets", All),
        ("list", "secrets", All),
        ("watch", "secrets", All),
        ("get", "secrets", In(NAMESPACE)),
        ("list", "secrets", In("default")),
        // writes to what it reads
        ("create", "pods", In("agents")),
        ("update", "pods", In("agents")),
        ("patch", "pods", All),
        ("create", "pods#exec", In("agents")),
        ("create", "pods#eviction", In("agents")),
        ("update", "namespaces", All),
        ("update", "configmaps", In(NAMESPACE)),
        ("update", "configmaps/tollgate-policy", In(NAMESPACE)),
        ("patch", "configmaps/tollgate-policy", In(NAMESPACE)),
        ("create", "configmaps", In(NAMESPACE)),
        ("update", "services/kubernetes", In("default")),
        ("update", "endpointslices.discovery.k8s.io", In("default")),
        // deletes of anything
        ("delete", "pods", All),
        ("deletecollection", "pods", All),
        ("delete", "namespaces", All),
        // (single deletes of approvals are allowed: retention)
        ("deletecollection", ar, All),
        ("delete", "configmaps/tollgate-policy", In(NAMESPACE)),
        ("delete", "services", In("default")),
        (
            "delete",
            "customresourcedefinitions.apiextensions.k8s.io",
            All,
        ),
        // other ConfigMaps, other Services, EndpointSlices elsewhere, nodes
        ("get", "configmaps", In(NAMESPACE)),
        ("list", "configmaps", In(NAMESPACE)),
        ("get", "configmaps/other", In(NAMESPACE)),
        ("get", "configmaps/kube-root-ca.crt", In("default")),
        ("list", "services", All),
        ("list", "services", In("default")),
        ("get", "services/other", In("default")),
        ("list", "endpointslices.discovery.k8s.io", All),
        ("get", "nodes", All),
        // impersonation (executeAs accounts come from `policy rbac`, per account)
        ("impersonate", "users", All),
        ("impersonate", "groups", All),
        ("impersonate", "serviceaccounts", All),
        ("impersonate", "serviceaccounts", In("agents")),
        ("impersonate", "uids.authentication.k8s.io", All),
        ("impersonate", "userextras.authentication.k8s.io", All),
        // minting tokens, certificates, RBAC escalation
        ("create", "serviceaccounts#token", In(NAMESPACE)),
        (
            "create",
            "certificatesigningrequests.certificates.k8s.io",
            All,
        ),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", All),
        ("bind", "clusterroles.rbac.authorization.k8s.io", All),
        ("escalate", "roles.rbac.authorization.k8s.io", In(NAMESPACE)),
        ("bind", "roles.rbac.authorization.k8s.io", In(NAMESPACE)),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            All,
        ),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            In(NAMESPACE),
        ),
        ("update", "clusterroles.rbac.authorization.k8s.io", All),
        // reviewers' verbs: the agent asks the API server, it does not decide
        ("approve", ar, All),
        ("deny", ar, All),
    ];
    let mut wrong = expect_rights(cluster, user, true, must)?;
    wrong.extend(expect_rights(cluster, user, false, must_not)?);
    ensure!(
        wrong.is_empty(),
        "the agent's RBAC is wrong:\n{}",
        wrong.join("\n")
    );

    // The requests the agent really makes, with a token of the account: the Service by
    // name and the EndpointSlices by label (as discovery watches them), its policy
    // ConfigMap by name; a list of Secrets is refused.
    let dir = scratch_dir("agent-token")?;
    let kubeconfig = rbac.kubeconfig(cluster, &dir)?;
    let as_agent = |args: &[&str]| kubectl_as(&kubeconfig, args);
    for args in [
        &["get", "--raw", "/api/v1/namespaces/default/services?fieldSelector=metadata.name%3Dkubernetes"][..],
        &["get", "--raw", "/api/v1/namespaces/default/services?fieldSelector=metadata.name%3Dkubernetes&watch=true&timeoutSeconds=1"],
        &["get", "--raw", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes"],
        &["get", "--raw", "/api/v1/namespaces/tollgate-system/configmaps?fieldSelector=metadata.name%3Dtollgate-policy"],
        &["get", "--raw", "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&limit=1"],
    ] {
        let out = as_agent(args)?;
        ensure!(
            out.status.success(),
            "the agent's request {} was refused: {}",
            args.join(" "),
            text(&out.stderr)
        );
    }
    let out = as_agent(&["get", "--raw", "/api/v1/secrets?limit=1"])?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("forbidden"),
        "the agent listed Secrets: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(())
}

/// The injected-ca component (deploy/injected-ca), enabled as docs/install.md says, is
/// accepted by the API server whole: the base's objects and the component's, every one
/// labelled. Its DaemonSet is the base's with the trust mode, the REST API's names and
/// the webhook's port added and the TLS Secret taken out, nothing else; its Pod is
/// admitted in tollgate-system. The webhook's Service reaches that port on the agents,
/// and the names the manifests share with the agent (Service, webhook configuration,
/// CA Secret, bundle ConfigMap) are the agent's defaults.
#[test]
fn the_injected_ca_component_is_accepted_by_the_api_server() -> Result<()> {
    let cluster = Cluster::shared();
    let dir = scratch_dir("injected-ca")?;
    let items = injected_ca_as_the_server_sees_it(cluster, &dir)?;
    let base = base_as_the_server_sees_it(cluster)?;

    let found = object_set(&items);
    let mut expected = expected_objects(BASE_OBJECTS);
    expected.extend(expected_objects(INJECTED_CA_OBJECTS));
    ensure!(
        found == expected,
        "base + injected-ca differ from an install's objects:\n missing: {:?}\n unexpected: {:?}",
        expected.difference(&found).collect::<Vec<_>>(),
        found.difference(&expected).collect::<Vec<_>>()
    );
    for o in &items {
        ensure!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tollgate",
            "{} {} lacks the part-of label",
            o["kind"],
            o["metadata"]["name"]
        );
    }

    // The DaemonSet: the trust mode, the names reviewers reach the REST API by, the
    // webhook's port; no serving certificate from the cluster CA.
    let help = run_help()?;
    let daemonset = object(&items, "DaemonSet", "tollgate-agent")?;
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    ensure!(env_literal(container, "TOLLGATE_TRUST_MODE")? == "injected-ca");
    let sans = env_literal(container, "TOLLGATE_SERVING_SANS")?;
    ensure!(
        sans.split(',')
            .any(|s| s == "tollgate-api.tollgate-system.svc"),
        "the REST API's Service name is not in the serving certificate: {sans}"
    );
    let pod_spec = daemonset["spec"]["template"]["spec"].to_string();
    for gone in [
        "TOLLGATE_TLS_CERT",
        "TOLLGATE_TLS_KEY",
        "tollgate-tls",
        "/etc/tollgate/tls",
    ] {
        ensure!(
            !pod_spec.contains(gone),
            "the injected-ca DaemonSet still has {gone}"
        );
    }
    let listen = run_default(&help, "--webhook-listen")?;
    let webhook_port: u64 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("--webhook-listen default {listen}"))?;
    let port = container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "webhook"))
        .context("no container port named webhook")?;
    ensure!(
        port["containerPort"] == webhook_port && port["protocol"] == "TCP",
        "the webhook port {port} is not the agent's {listen}"
    );
    // Nothing else differs from the base's DaemonSet.
    let base_daemonset = object(&base, "DaemonSet", "tollgate-agent")?;
    let without = |daemonset: &Value, env: &[&str], port: &str, volume: &str| -> Value {
        let mut daemonset = daemonset.clone();
        let spec = &mut daemonset["spec"]["template"]["spec"];
        if let Some(volumes) = spec["volumes"].as_array_mut() {
            volumes.retain(|v| v["name"] != volume);
        }
        spec["volumes"] = sorted_by(&spec["volumes"], "name");
        let container = &mut spec["containers"][0];
        if let Some(vars) = container["env"].as_array_mut() {
            vars.retain(|e| !env.iter().any(|name| e["name"] == *name));
        }
        if let Some(ports) = container["ports"].as_array_mut() {
            ports.retain(|p| p["name"] != port);
        }
        if let Some(mounts) = container["volumeMounts"].as_array_mut() {
            mounts.retain(|m| m["name"] != volume);
        }
        container["env"] = sorted_by(&container["env"], "name");
        container["ports"] = sorted_by(&container["ports"], "name");
        container["volumeMounts"] = sorted_by(&container["volumeMounts"], "mountPath");
        json!({"labels": daemonset["metadata"]["labels"], "spec": daemonset["spec"]})
    };
    ensure!(
        without(
            daemonset,
            &["TOLLGATE_TRUST_MODE", "TOLLGATE_SERVING_SANS"],
            "webhook",
            "tls"
        ) == without(
            base_daemonset,
            &["TOLLGATE_TLS_CERT", "TOLLGATE_TLS_KEY"],
            "webhook",
            "tls"
        ),
        "the injected-ca DaemonSet differs from the base's in more than the trust mode"
    );
    let out = dry_run_create(cluster, &pod_from_template(daemonset, NAMESPACE), &dir)?;
    ensure!(
        out.status.success(),
        "the injected-ca agent's Pod is refused in {NAMESPACE}: {}",
        text(&out.stderr)
    );

    // The Service the API server calls reaches that port on the agents, and the
    // webhooks call that Service at the agent's path.
    let webhook_service = run_default(&help, "--webhook-service")?;
    let (service_ns, service_name) = webhook_service
        .split_once('/')
        .context("--webhook-service")?;
    let service = object(&items, "Service", service_name)?;
    ensure!(service["metadata"]["namespace"] == service_ns);
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"]
        .as_object()
        .context("the webhook Service's selector")?
    {
        ensure!(
            &pod_labels[key] == value,
            "the webhook Service selects {key}={value}, which the agent pods do not carry"
        );
    }
    let service_port = service["spec"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["targetPort"] == "webhook"))
        .context("the webhook Service does not target the webhook port")?;
    let configuration_name = run_default(&help, "--webhook-configuration")?;
    let configuration = object(&items, "MutatingWebhookConfiguration", &configuration_name)?;
    for webhook in configuration["webhooks"].as_array().context("webhooks")? {
        ensure!(
            webhook["clientConfig"]["service"]
                == json!({
                    "namespace": service_ns,
                    "name": service_name,
                    "port": service_port["port"],
                    "path": gateway_agent::trust::webhook::MUTATE_PATH,
                }),
            "webhook {} does not call the agent's Service: {}",
            webhook["name"],
            webhook["clientConfig"]
        );
    }

    // RBAC and the admission policy name what the agent writes by its defaults.
    let bundle = run_default(&help, "--trust-bundle-configmap")?;
    let ca_secret = run_default(&help, "--ca-secret")?;
    let (ca_ns, ca_name) = ca_secret.split_once('/').context("--ca-secret")?;
    let grants = |role: &Value, resource: &str, name: &str, verb: &str| {
        role["rules"].as_array().into_iter().flatten().any(|rule| {
            strings(&rule["resources"]).contains(&resource)
                && strings(&rule["resourceNames"]).contains(&name)
                && strings(&rule["verbs"]).contains(&verb)
        })
    };
    let trust_role = object(&items, "ClusterRole", "tollgate-agent-trust")?;
    ensure!(grants(trust_role, "configmaps", &bundle, "update"));
    ensure!(grants(
        trust_role,
        "mutatingwebhookconfigurations",
        &configuration_name,
        "patch"
    ));
    let ca_role = object(&items, "Role", "tollgate-agent-ca")?;
    ensure!(ca_role["metadata"]["namespace"] == ca_ns);
    for verb in ["get", "watch", "update"] {
        ensure!(
            grants(ca_role, "secrets", ca_name, verb),
            "{verb} {ca_secret}"
        );
    }
    let creates = object(
        &items,
        "ValidatingAdmissionPolicy",
        "tollgate-agent-creates",
    )?;
    let creates_text = creates["spec"].to_string();
    for name in [bundle.as_str(), ca_ns, ca_name, AGENT_USER] {
        ensure!(
            creates_text.contains(&format!("'{name}'")),
            "the admission policy on creates does not name {name}"
        );
    }
    let ca_bundle = object(
        &items,
        "ValidatingAdmissionPolicy",
        "tollgate-agent-cabundle",
    )?;
    ensure!(
        ca_bundle["spec"]
            .to_string()
            .contains(&format!("'{AGENT_USER}'")),
        "the admission policy on the webhook configuration does not name the agent"
    );
    for policy in ["tollgate-agent-creates", "tollgate-agent-cabundle"] {
        ensure!(
            object(&items, "ValidatingAdmissionPolicy", policy)?["spec"]["failurePolicy"] == "Fail"
        );
        let binding = object(&items, "ValidatingAdmissionPolicyBinding", policy)?;
        ensure!(
            binding["spec"]["policyName"] == policy
                && strings(&binding["spec"]["validationActions"]) == ["Deny"],
            "binding {policy}: {}",
            binding["spec"]
        );
    }
    Ok(())
}

/// The MutatingWebhookConfiguration: both webhooks take Pod CREATEs only, fail closed,
/// have no side effects on dry-run and never see kube-system or tollgate-system. Between
/// them they are sent exactly the pods discovery enforces (`enforcement_of`), each such
/// pod once, and no other pod, so an outage of the agents refuses only those.
#[test]
fn the_webhook_is_sent_exactly_the_enforced_pods_and_never_the_system_namespaces() -> Result<()> {
    use gateway_agent::discovery::{enforcement_of, Enforcement, ENFORCE_LABEL};
    let cluster = Cluster::shared();
    let dir = scratch_dir("webhook")?;
    let items = injected_ca_as_the_server_sees_it(cluster, &dir)?;
    let configuration = object(&items, "MutatingWebhookConfiguration", "tollgate")?;
    let webhooks = configuration["webhooks"].as_array().context("webhooks")?;
    ensure!(webhooks.len() == 2, "two webhooks: {}", webhooks.len());
    const SYSTEM: [&str; 2] = ["kube-system", "tollgate-system"];
    for webhook in webhooks {
        let name = webhook["name"].as_str().unwrap_or_default();
        ensure!(
            name.ends_with(".trust.tollgate.dev"),
            "{name}: a refused pod's error names the webhook"
        );
        ensure!(webhook["failurePolicy"] == "Fail", "{name}: failurePolicy");
        ensure!(
            webhook["sideEffects"] == "NoneOnDryRun",
            "{name}: sideEffects"
        );
        ensure!(
            strings(&webhook["admissionReviewVersions"]).contains(&"v1"),
            "{name}: admissionReviewVersions"
        );
        ensure!(
            webhook["rules"]
                == json!([{
                    "operations": ["CREATE"],
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "resources": ["pods"],
                    "scope": "Namespaced",
                }]),
            "{name}: Pod CREATEs only, not {}",
            webhook["rules"]
        );
        ensure!(
            webhook["clientConfig"]["caBundle"].is_null()
                && webhook["clientConfig"]["url"].is_null(),
            "{name}: the agents set the caBundle; the API server calls the Service"
        );
        ensure!(
            webhook["timeoutSeconds"]
                .as_i64()
                .is_some_and(|t| (1..=10).contains(&t)),
            "{name}: a pod's creation waits up to timeoutSeconds ({})",
            webhook["timeoutSeconds"]
        );
        let excluded = webhook["namespaceSelector"]["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| {
                e["key"] == "kubernetes.io/metadata.name"
                    && e["operator"] == "NotIn"
                    && SYSTEM.iter().all(|ns| strings(&e["values"]).contains(ns))
            });
        ensure!(
            excluded,
            "{name}: kube-system and tollgate-system must be excluded by name"
        );
    }
    let by_pod_label = webhooks
        .iter()
        .find(|w| {
            w["objectSelector"]
                .as_object()
                .is_some_and(|o| !o.is_empty())
        })
        .context("no webhook selects pods by their label")?;
    ensure!(
        by_pod_label["objectSelector"] == json!({"matchLabels": {ENFORCE_LABEL: "true"}}),
        "the pod-label webhook's objectSelector: {}",
        by_pod_label["objectSelector"]
    );

    // Which webhooks a pod is sent to, against what discovery enforces. The API server
    // sets kubernetes.io/metadata.name on every namespace.
    let label = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    for namespace in ["agents", "kube-system", "tollgate-system"] {
        for namespace_label in [None, Some("true"), Some("false")] {
            for pod_label in [None, Some("true"), Some("false")] {
                let mut ns_labels = label(&[("kubernetes.io/metadata.name", namespace)]);
                if let Some(value) = namespace_label {
                    ns_labels.insert(ENFORCE_LABEL.to_owned(), value.to_owned());
                }
                let mut pod_labels = label(&[("app", "coder")]);
                if let Some(value) = pod_label {
                    pod_labels.insert(ENFORCE_LABEL.to_owned(), value.to_owned());
                }
                let mut sent = Vec::new();
                for webhook in webhooks {
                    if selects(&webhook["namespaceSelector"], &ns_labels)?
                        && selects(&webhook["objectSelector"], &pod_labels)?
                    {
                        sent.push(webhook["name"].as_str().unwrap_or_default());
                    }
                }
                let enforced =
                    enforcement_of(&pod_labels, Some(&ns_labels)) == Enforcement::Enforced;
                let expected = usize::from(enforced && !SYSTEM.contains(&namespace));
                ensure!(
                    sent.len() == expected,
                    "a pod labelled {pod_label:?} in {namespace} labelled {namespace_label:?} \
                     is sent to {sent:?}; expected {expected} webhook(s)"
                );
            }
        }
    }
    Ok(())
}

/// The injected-ca RBAC and admission policy (with deploy/rbac.yaml, bound to an account
/// of the test's own: see [`RbacCopy`]) let the agent keep its CA Secret, write the
/// trust bundles, keep the webhook's caBundle and read namespaces, and nothing more: no
/// other Secret, no ConfigMap updates but the bundle's, no deletes, no other webhook
/// configuration, no admission policies; and it creates only the CA Secret and bundles
/// (real server-side dry-run requests with a token of the account).
#[test]
fn the_injected_ca_agent_may_do_what_it_needs_and_nothing_more() -> Result<()> {
    use Scope::{Cluster as All, Namespace as In};
    let cluster = Cluster::shared();
    apply_cluster_prerequisites(cluster)?;
    let rbac = RbacCopy::apply(
        cluster,
        &[
            "deploy/rbac.yaml",
            "deploy/injected-ca/rbac.yaml",
            "deploy/injected-ca/agent-writes.yaml",
        ],
    )?;
    let user = rbac.user.as_str();
    wait_for_rights(cluster, user, ("get", "secrets/tollgate-ca", In(NAMESPACE)))?;
    let mwc = "mutatingwebhookconfigurations.admissionregistration.k8s.io";
    // The copy's rules name a configuration of the test's own (see RbacCopy).
    let tollgate_mwc = format!("{mwc}/{}", rbac.webhook_configuration);
    let vwc = "validatingwebhookconfigurations.admissionregistration.k8s.io";
    let vap = "validatingadmissionpolicies.admissionregistration.k8s.io";
    let vapb = "validatingadmissionpolicybindings.admissionregistration.k8s.io";
    let must: &[(&str, &str, Scope)] = &[
        // Tollgate's CA: one Secret, by name; created by the first agent.
        ("get", "secrets/tollgate-ca", In(NAMESPACE)),
        ("list", "secrets/tollgate-ca", In(NAMESPACE)),
        ("watch", "secrets/tollgate-ca", In(NAMESPACE)),
        ("update", "secrets/tollgate-ca", In(NAMESPACE)),
        ("create", "secrets", In(NAMESPACE)),
        // the trust bundles: watched cluster-wide, written where pods are enforced
        ("get", "configmaps", All),
        ("list", "configmaps", All),
        ("watch", "configmaps", All),
        ("create", "configmaps", In("agents")),
        ("update", "configmaps/tollgate-ca-bundle", In("agents")),
        // the webhook's caBundle
        ("get", &tollgate_mwc, All),
        ("list", &tollgate_mwc, All),
        ("watch", &tollgate_mwc, All),
        ("patch", &tollgate_mwc, All),
        // the webhook reads a pod's namespace labels
        ("get", "namespaces", All),
    ];
    let must_not: &[(&str, &str, Scope)] = &[
        // no other Secret, no Secret elsewhere
        ("get", "secrets/other", In(NAMESPACE)),
        ("update", "secrets/other", In(NAMESPACE)),
        ("list", "secrets", In(NAMESPACE)),
        ("watch", "secrets", In(NAMESPACE)),
        ("get", "secrets", All),
        ("list", "secrets", All),
        ("get", "secrets/tollgate-ca", In("default")),
        ("create", "secrets", In("agents")),
        ("patch", "secrets/tollgate-ca", In(NAMESPACE)),
        ("delete", "secrets/tollgate-ca", In(NAMESPACE)),
        // ConfigMaps: the bundle's update only, no deletes
        ("update", "configmaps", In("agents")),
        ("update", "configmaps/kube-root-ca.crt", In("agents")),
        ("update", "configmaps/aws-auth", In("kube-system")),
        ("update", "configmaps/tollgate-policy", In(NAMESPACE)),
        ("patch", "configmaps/tollgate-ca-bundle", In("agents")),
        ("patch", "configmaps", All),
        ("delete", "configmaps", All),
        ("delete", "configmaps/tollgate-ca-bundle", In("agents")),
        ("deletecollection", "configmaps", All),
        // no other webhook configuration, no new one, no admission policies
        ("patch", &format!("{mwc}/other"), All),
        ("update", &tollgate_mwc, All),
        ("delete", &tollgate_mwc, All),
        ("list", mwc, All),
        ("create", mwc, All),
        ("delete", mwc, All),
        ("get", vwc, All),
        ("create", vwc, All),
        ("patch", &format!("{vwc}/tollgate"), All),
        ("create", vap, All),
        ("update", &format!("{vap}/tollgate-agent-creates"), All),
        ("delete", &format!("{vap}/tollgate-agent-creates"), All),
        ("update", &format!("{vapb}/tollgate-agent-creates"), All),
        ("delete", &format!("{vapb}/tollgate-agent-creates"), All),
        ("update", &format!("{vap}/tollgate-agent-cabundle"), All),
        ("delete", &format!("{vapb}/tollgate-agent-cabundle"), All),
        // the rest as in the base
        ("update", "namespaces", All),
        ("patch", "namespaces", All),
        ("create", "serviceaccounts#token", In(NAMESPACE)),
        (
            "create",
            "certificatesigningrequests.certificates.k8s.io",
            All,
        ),
        ("impersonate", "serviceaccounts", All),
    ];
    let mut wrong = expect_rights(cluster, user, true, must)?;
    wrong.extend(expect_rights(cluster, user, false, must_not)?);
    ensure!(
        wrong.is_empty(),
        "the injected-ca agent's RBAC is wrong:\n{}",
        wrong.join("\n")
    );

    // The reads the agent really makes, with a token of the account.
    let dir = scratch_dir("trust-token")?;
    let kubeconfig = rbac.kubeconfig(cluster, &dir)?;
    let as_agent = |args: &[&str]| kubectl_as(&kubeconfig, args);
    for path in [
        "/api/v1/configmaps?labelSelector=tollgate.dev%2Ftrust-bundle%3Dtrue&fieldSelector=metadata.name%3Dtollgate-ca-bundle&limit=1",
        "/api/v1/namespaces/tollgate-system/secrets?fieldSelector=metadata.name%3Dtollgate-ca",
        "/api/v1/namespaces/tollgate-system/secrets?fieldSelector=metadata.name%3Dtollgate-ca&watch=true&timeoutSeconds=1",
        &format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?fieldSelector=metadata.name%3D{}", rbac.webhook_configuration),
        "/api/v1/namespaces/default",
    ] {
        let out = as_agent(&["get", "--raw", path])?;
        ensure!(
            out.status.success(),
            "the agent's request {path} was refused: {}",
            text(&out.stderr)
        );
    }
    for path in [
        "/api/v1/namespaces/tollgate-system/secrets?limit=1",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?limit=1",
    ] {
        let out = as_agent(&["get", "--raw", path])?;
        ensure!(
            !out.status.success() && text(&out.stderr).contains("forbidden"),
            "the agent may read {path}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    // What RBAC cannot say, the admission policy does: the agent creates the CA Secret
    // and bundles, nothing else, though RBAC lets it create any ConfigMap anywhere and
    // any Secret in tollgate-system. (Server-side dry-runs: admission runs, nothing is
    // stored. A new policy takes a moment to be enforced.)
    let rt = tokio::runtime::Runtime::new()?;
    let ns = rt.block_on(cluster.namespace("deploy-trust"))?;
    let create = |args: &[&str]| -> Result<Output> {
        let mut all = vec!["create"];
        all.extend_from_slice(args);
        all.push("--dry-run=server");
        as_agent(&all)
    };
    const REFUSAL: &str = "the Tollgate agent creates only";
    tollgate_tests::cluster::harness::wait_until(
        "the admission policy to refuse the agent's ConfigMap",
        std::time::Duration::from_secs(30),
        || {
            create(&["configmap", "aws-auth", "-n", &ns.name])
                .is_ok_and(|out| !out.status.success() && text(&out.stderr).contains(REFUSAL))
        },
    )?;
    let out = create(&["configmap", "tollgate-ca-bundle", "-n", &ns.name])?;
    ensure!(
        out.status.success(),
        "the agent cannot create a bundle: {}",
        text(&out.stderr)
    );
    let out = create(&["secret", "generic", "other", "-n", NAMESPACE])?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains(REFUSAL),
        "the agent may create another Secret in {NAMESPACE}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The CA Secret passes admission (it may exist already: then the store says so).
    let out = create(&["secret", "generic", "tollgate-ca", "-n", NAMESPACE])?;
    ensure!(
        out.status.success() || text(&out.stderr).contains("already exists"),
        "the agent cannot create its CA Secret: {}",
        text(&out.stderr)
    );
    let out = create(&["secret", "generic", "tollgate-ca", "-n", &ns.name])?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("forbidden"),
        "the agent may create Secrets outside {NAMESPACE}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    drop(ns);

    // The webhook configuration: the agent may set caBundle and change nothing else,
    // though RBAC lets it patch any field. A configuration of the test's own, which no
    // namespace selects and which ignores failures, so it never sees a pod.
    let never = format!("tollgate.dev/deploy-test-{}", rbac.webhook_configuration);
    let webhook = |name: &str| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "clientConfig": {"service": {
                "namespace": NAMESPACE, "name": "tollgate-webhook",
                "path": "/mutate-pods", "port": 443,
            }},
            "rules": [{
                "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "Namespaced",
            }],
            "namespaceSelector": {"matchExpressions": [{"key": never, "operator": "Exists"}]},
            "objectSelector": {"matchExpressions": [{"key": never, "operator": "Exists"}]},
        })
    };
    cluster.apply_yaml(
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": rbac.webhook_configuration},
            "webhooks": [webhook("a.deploy-test.tollgate.dev"), webhook("b.deploy-test.tollgate.dev")],
        })
        .to_string(),
    )?;
    let _configuration = Deleted(
        "mutatingwebhookconfigurations.admissionregistration.k8s.io",
        rbac.webhook_configuration.clone(),
    );
    let patch = |ops: Value| {
        as_agent(&[
            "patch",
            "mutatingwebhookconfiguration",
            &rbac.webhook_configuration,
            "--type=json",
            "-p",
            &ops.to_string(),
            "--dry-run=server",
        ])
    };
    const ONLY_CA_BUNDLE: &str = "may change only the webhooks' clientConfig.caBundle";
    let ca_bundle = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(cluster.layout.pki().join("ca.crt"))?,
    );
    let changes = [
        (
            "another Service",
            json!([{"op": "replace", "path": "/webhooks/0/clientConfig/service/name", "value": "elsewhere"}]),
        ),
        (
            "a URL",
            json!([{"op": "remove", "path": "/webhooks/1/clientConfig/service"},
                   {"op": "add", "path": "/webhooks/1/clientConfig/url", "value": "https://example.com/mutate"}]),
        ),
        (
            "every namespace",
            json!([{"op": "replace", "path": "/webhooks/0/namespaceSelector", "value": {}}]),
        ),
        (
            "other resources",
            json!([{"op": "replace", "path": "/webhooks/1/rules/0/resources", "value": ["*"]}]),
        ),
        (
            "fail closed",
            json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]),
        ),
        (
            "one webhook fewer",
            json!([{"op": "remove", "path": "/webhooks/1"}]),
        ),
        (
            "one webhook more",
            json!([{"op": "add", "path": "/webhooks/-", "value": webhook("c.deploy-test.tollgate.dev")}]),
        ),
    ];
    // A new policy takes a moment to be enforced: wait for the first refusal.
    tollgate_tests::cluster::harness::wait_until(
        "the admission policy to refuse the agent's change of the webhook configuration",
        std::time::Duration::from_secs(30),
        || {
            patch(changes[0].1.clone()).is_ok_and(|out| {
                !out.status.success() && text(&out.stderr).contains(ONLY_CA_BUNDLE)
            })
        },
    )?;
    for (what, ops) in &changes {
        let out = patch(ops.clone())?;
        ensure!(
            !out.status.success() && text(&out.stderr).contains(ONLY_CA_BUNDLE),
            "the agent may change its webhook configuration to {what}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // What the agent does (`bundle::keep_webhook_ca_bundle`): a test of each webhook's
    // name and an add of its caBundle.
    let out = patch(json!([
        {"op": "test", "path": "/webhooks/0/name", "value": "a.deploy-test.tollgate.dev"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": ca_bundle},
        {"op": "test", "path": "/webhooks/1/name", "value": "b.deploy-test.tollgate.dev"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": ca_bundle},
    ]))?;
    ensure!(
        out.status.success(),
        "the agent cannot set its webhooks' caBundle: {}",
        text(&out.stderr)
    );
    Ok(())
}

/// Deletes a cluster-scoped object (resource, name) when dropped.
struct Deleted(&'static str, String);

impl Drop for Deleted {
    fn drop(&mut self) {
        let _ = Cluster::shared()
            .kubectl()
            .args([
                "delete",
                self.0,
                &self.1,
                "--ignore-not-found",
                "--wait=false",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `gateway-agent policy rbac` grants the agent impersonation of exactly the accounts a
/// policy's `executeAs` rules name: that account, in its namespace, nothing else.
#[test]
fn impersonation_is_granted_only_for_the_accounts_a_policy_names() -> Result<()> {
    use Scope::{Cluster as All, Namespace as In};
    let cluster = Cluster::shared();
    apply_cluster_prerequisites(cluster)?;
    let rt = tokio::runtime::Runtime::new()?;
    let ns = rt.block_on(cluster.namespace("deploy-execas"))?;
    // Authorization does not need the namespace to exist: no second one is made.
    let other = format!("{}-other", ns.name);
    let policy = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: deploys-run-as-deployer\n    action: approve\n    request:\n      verbs: [create, update, patch]\n      apiGroups: [apps]\n      resources: [deployments]\n    approval:\n      steps:\n        - groups: [\"{REVIEWER_GROUP}\"]\n      executeAs: {}/deployer\n",
        ns.name
    );
    let dir = scratch_dir("execas")?;
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy)?;
    let out = std::process::Command::new(AGENT)
        .args(["policy", "rbac"])
        .arg(&file)
        .args([
            "--agent-namespace",
            NAMESPACE,
            "--agent-service-account",
            "tollgate-agent",
        ])
        .output()?;
    ensure!(out.status.success(), "policy rbac: {}", text(&out.stderr));
    let rbac = dir.join("rbac.yaml");
    std::fs::write(&rbac, &out.stdout)?;
    cluster.kubectl_ok(&["apply", "-f", path_arg(&rbac)?])?;

    let allowed = [(
        "impersonate",
        "serviceaccounts/deployer",
        In(ns.name.as_str()),
    )];
    let refused = [
        ("impersonate", "serviceaccounts/other", In(ns.name.as_str())),
        ("impersonate", "serviceaccounts", In(ns.name.as_str())),
        (
            "impersonate",
            "serviceaccounts/deployer",
            In(other.as_str()),
        ),
        ("impersonate", "serviceaccounts/deployer", All),
        ("impersonate", "users", All),
        ("impersonate", "groups", All),
    ];
    let mut wrong = expect_rights(cluster, AGENT_USER, true, &allowed)?;
    wrong.extend(expect_rights(cluster, AGENT_USER, false, &refused)?);
    ensure!(
        wrong.is_empty(),
        "impersonation rights are wrong:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// The DaemonSet asks for what the data path needs and nothing more: no privileged
/// container, every capability dropped but CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, no
/// privilege escalation, a read-only root, the runtime's seccomp profile, only the host
/// paths it uses (the cgroup tree read-only), and the node's name and address from the
/// downward API.
#[test]
fn the_daemonset_asks_only_for_what_the_data_path_needs() -> Result<()> {
    let cluster = Cluster::shared();
    let items = base_as_the_server_sees_it(cluster)?;
    let daemonset = object(&items, "DaemonSet", "tollgate-agent")?;
    let spec = &daemonset["spec"]["template"]["spec"];

    // The pod: host network (the proxy listens on the node address), nothing else of
    // the host's namespaces; every node; the runtime's seccomp profile.
    ensure!(spec["hostNetwork"] == true, "hostNetwork");
    ensure!(spec["dnsPolicy"] == "ClusterFirstWithHostNet");
    for field in ["hostPID", "hostIPC", "shareProcessNamespace"] {
        ensure!(
            spec[field].is_null() || spec[field] == false,
            "{field} is {}",
            spec[field]
        );
    }
    // In a user namespace the capabilities would not count for bpf(2).
    ensure!(spec["hostUsers"].is_null() || spec["hostUsers"] == true);
    ensure!(spec["priorityClassName"] == "system-node-critical");
    ensure!(
        spec["tolerations"] == json!([{"operator": "Exists"}]),
        "the agent must tolerate every taint: {}",
        spec["tolerations"]
    );
    ensure!(spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault");
    ensure!(spec["serviceAccountName"] == "tollgate-agent");
    ensure!(spec["terminationGracePeriodSeconds"]
        .as_i64()
        .is_some_and(|s| s > 0));
    let strategy = &daemonset["spec"]["updateStrategy"];
    ensure!(strategy["type"] == "RollingUpdate");
    ensure!(strategy["rollingUpdate"]["maxUnavailable"] == 1);
    ensure!(strategy["rollingUpdate"]["maxSurge"] == 0);

    let containers = spec["containers"].as_array().context("containers")?;
    ensure!(
        containers.len() == 1
            && spec["initContainers"].is_null()
            && spec["ephemeralContainers"].is_null(),
        "one container, the agent"
    );
    let container = &containers[0];
    ensure!(container["args"] == json!(["run"]));

    // The container's privileges.
    let security = &container["securityContext"];
    ensure!(
        security["privileged"].is_null() || security["privileged"] == false,
        "privileged: {}",
        security["privileged"]
    );
    ensure!(security["allowPrivilegeEscalation"] == false);
    ensure!(security["readOnlyRootFilesystem"] == true);
    ensure!(
        security["runAsUser"] == 0,
        "the kubelet gives added capabilities to uid 0 only"
    );
    ensure!(security["procMount"].is_null() || security["procMount"] == "Default");
    ensure!(
        strings(&security["capabilities"]["drop"]) == ["ALL"],
        "every capability must be dropped: {}",
        security["capabilities"]
    );
    let mut added = strings(&security["capabilities"]["add"]);
    added.sort_unstable();
    ensure!(
        added == DATA_PATH_CAPABILITIES,
        "capabilities added: {added:?}, the data path needs {DATA_PATH_CAPABILITIES:?}"
    );
    ensure!(
        security["seccompProfile"].is_null()
            || security["seccompProfile"]["type"] == "RuntimeDefault"
    );

    // Host paths: the cgroup tree (read-only), bpffs (the host's, so pins outlive the
    // container), the state directory; nothing else of the host.
    let volumes = spec["volumes"].as_array().context("volumes")?;
    let mounts = container["volumeMounts"]
        .as_array()
        .context("volumeMounts")?;
    let mut host_paths = BTreeSet::new();
    for volume in volumes.iter().filter(|v| !v["hostPath"].is_null()) {
        let path = volume["hostPath"]["path"]
            .as_str()
            .context("hostPath.path")?;
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .with_context(|| format!("host path {path} is not mounted"))?;
        match path {
            "/sys/fs/cgroup" => ensure!(
                mount["readOnly"] == true,
                "the cgroup tree must be read-only"
            ),
            "/sys/fs/bpf" => {
                ensure!(
                    mount["mountPropagation"] == "HostToContainer",
                    "bpffs: {mount}"
                );
                let bpffs = env_literal(container, "TOLLGATE_BPFFS")?;
                let mount_path = mount["mountPath"].as_str().unwrap_or_default();
                ensure!(
                    bpffs.starts_with(&format!("{mount_path}/")),
                    "the pins ({bpffs}) are not in the host's bpffs ({mount_path})"
                );
            }
            "/var/lib/tollgate" => ensure!(
                env_literal(container, "TOLLGATE_STATE_DIR")? == mount["mountPath"],
                "the state directory is not the mounted one"
            ),
            other => bail!("unexpected host path {other}"),
        }
        host_paths.insert(path);
    }
    ensure!(host_paths.len() == 3, "host paths: {host_paths:?}");
    let cgroup_mount = mounts
        .iter()
        .find(|m| {
            volumes
                .iter()
                .any(|v| v["name"] == m["name"] && v["hostPath"]["path"] == "/sys/fs/cgroup")
        })
        .context("cgroup mount")?;
    ensure!(
        env_literal(container, "TOLLGATE_CGROUP_ROOT")? == cgroup_mount["mountPath"],
        "the programs must attach to the host's cgroup root"
    );

    // The node's name and address from the downward API.
    for (env, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("TOLLGATE_PROXY_ADDRESSES", "status.hostIP"),
    ] {
        let value = env_value(container, env).with_context(|| format!("no env {env}"))?;
        ensure!(
            value["valueFrom"]["fieldRef"]["fieldPath"] == field,
            "{env} should come from {field}: {value}"
        );
    }
    ensure!(
        env_literal(container, "TOLLGATE_POLICY_CONFIGMAP")? == "tollgate-system/tollgate-policy"
    );
    ensure!(
        env_literal(container, "TOLLGATE_CLUSTER_CA")?
            == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    );

    // Probes: the admin port on the node's loopback, where the agent is told to listen.
    let admin = env_literal(container, "TOLLGATE_ADMIN_ADDRESS")?;
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["path"] == path
                && format!(
                    "{}:{}",
                    get["host"].as_str().unwrap_or_default(),
                    get["port"]
                ) == admin,
            "{probe} does not reach {path} on {admin}: {get}"
        );
    }

    // Resources: requests for scheduling, a memory limit, no CPU limit.
    let resources = &container["resources"];
    ensure!(!resources["requests"]["cpu"].is_null() && !resources["requests"]["memory"].is_null());
    ensure!(!resources["limits"]["memory"].is_null());
    ensure!(
        resources["limits"]["cpu"].is_null(),
        "a CPU limit throttles every proxied call"
    );
    Ok(())
}

/// A reviewer bound to tollgate-approval-reviewer in a namespace may read and decide
/// that namespace's approvals and read its sessions, and nothing else.
#[test]
fn reviewers_may_decide_and_read_sessions_and_nothing_else() -> Result<()> {
    use Scope::{Cluster as All, Namespace as In};
    let cluster = Cluster::shared();
    apply_cluster_prerequisites(cluster)?;
    let rt = tokio::runtime::Runtime::new()?;
    let ns = rt.block_on(cluster.namespace("deploy-review"))?;
    let other = format!("{}-other", ns.name);
    rt.block_on(ns.service_account("reviewer"))?;
    cluster.kubectl_ok(&[
        "create",
        "rolebinding",
        "reviewers",
        "-n",
        &ns.name,
        "--clusterrole",
        "tollgate-approval-reviewer",
        "--serviceaccount",
        &format!("{}:reviewer", ns.name),
    ])?;
    let user = format!("system:serviceaccount:{}:reviewer", ns.name);
    let ar = "approvalrequests.tollgate.dev";
    let sessions = "sessions.tollgate.dev";
    let here = In(ns.name.as_str());
    let elsewhere = In(other.as_str());
    let allowed = [
        ("get", ar, here),
        ("list", ar, here),
        ("watch", ar, here),
        ("approve", ar, here),
        ("deny", ar, here),
        ("get", sessions, here),
        ("list", sessions, here),
    ];
    let refused = [
        ("get", "secrets", here),
        ("list", "secrets", here),
        ("get", "configmaps", here),
        ("create", ar, here),
        ("update", ar, here),
        ("patch", ar, here),
        ("delete", ar, here),
        ("update", "approvalrequests.tollgate.dev#status", here),
        ("approve", ar, elsewhere),
        ("list", ar, elsewhere),
        ("get", sessions, elsewhere),
        ("approve", ar, All),
        ("list", sessions, All),
        ("impersonate", "users", All),
    ];
    let mut wrong = expect_rights(cluster, &user, true, &allowed)?;
    wrong.extend(expect_rights(cluster, &user, false, &refused)?);
    ensure!(
        wrong.is_empty(),
        "the reviewer role is wrong:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// The value of `const NAME: &str = "...";` in a Rust source.
fn rust_const(source: &str, name: &str) -> Result<String> {
    let start = source
        .find(&format!("const {name}: &str = \""))
        .with_context(|| format!("no const {name}"))?;
    let rest = &source[start..];
    let value = rest.split('"').nth(1).context("const value")?;
    Ok(value.to_owned())
}

/// The Dockerfile builds with the toolchain `cargo xtask setup` installs (the versions
/// verified to build the eBPF programs), and its entry point is what the DaemonSet runs.
#[test]
fn the_dockerfile_uses_the_verified_toolchain() -> Result<()> {
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile"))?;
    let setup = std::fs::read_to_string(repo_path("xtask/src/setup.rs"))?;
    let toolchain = rust_const(&setup, "EBPF_TOOLCHAIN")?;
    let linker = rust_const(&setup, "BPF_LINKER_VERSION")?;
    let llvm_prefix = rust_const(&setup, "LLVM_PREFIX")?;
    let stage_images: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    ensure!(
        stage_images.first() == Some(&format!("rust:{toolchain}-bookworm").as_str()),
        "the build stage should start from rust:{toolchain}-bookworm: {stage_images:?}"
    );
    for needle in [
        format!("--toolchain {toolchain}"),
        format!("bpf-linker --version {linker}"),
        format!("LLVM_PREFIX={llvm_prefix}"),
        "--features llvm-22".to_owned(),
        "cargo build --release --locked --package gateway-agent".to_owned(),
        "ENTRYPOINT [\"/usr/local/bin/gateway-agent\"]".to_owned(),
        "CMD [\"run\"]".to_owned(),
    ] {
        ensure!(
            dockerfile.contains(&needle),
            "the Dockerfile lacks {needle:?}"
        );
    }
    // The LLVM packages bpf-linker builds against.
    for package in [
        "llvm-22-dev",
        "libpolly-22-dev",
        "libzstd-dev",
        "zlib1g-dev",
    ] {
        ensure!(
            setup.contains(&format!("\"{package}\"")) && dockerfile.contains(package),
            "{package}: in setup.rs and the Dockerfile alike"
        );
    }
    // The runtime image is Debian 12 like the build stage (the same glibc).
    ensure!(
        stage_images
            .last()
            .is_some_and(|i| i.ends_with("-debian12")),
        "runtime image: {stage_images:?}"
    );
    let ignore = std::fs::read_to_string(repo_path(".dockerignore"))?;
    ensure!(
        ignore.lines().any(|l| l.trim() == "target"),
        ".dockerignore keeps target/ out"
    );
    // The DaemonSet runs the image the kustomization names.
    let daemonset = std::fs::read_to_string(repo_path("deploy/daemonset.yaml"))?;
    let kustomization = std::fs::read_to_string(repo_path("deploy/kustomization.yaml"))?;
    ensure!(
        daemonset.contains("image: tollgate/gateway-agent:")
            && kustomization.contains("- name: tollgate/gateway-agent")
    );
    Ok(())
}
