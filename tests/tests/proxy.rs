//! Suite `proxy`: the agent on a simulated node, the real API server behind it, and
//! kubectl inside pods that know nothing of Tollgate.
//!
//! Every test starts its own agent on node 1 (kernel programs attached to the
//! cluster's cgroup root, pinned under a bpffs directory of its own) and stops it at
//! the end; pods run `sleep` and the test runs kubectl inside them with no flags but
//! the in-pod defaults (the service-account files and KUBERNETES_SERVICE_HOST/PORT).

use std::process::Output;

use k8s_openapi::api::rbac::v1::PolicyRule;
use tollgate_tests::agent::{AgentOptions, RunningAgent, ALLOW_ALL};
use tollgate_tests::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// The rights the test pods' service account has in its namespace.
fn workload_rules() -> Vec<PolicyRule> {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..PolicyRule::default()
    };
    vec![
        rule(&[""], &["configmaps"], &["*"]),
        rule(&[""], &["pods", "pods/log"], &["get", "list", "watch"]),
        rule(
            &[""],
            &["pods/exec", "pods/portforward"],
            &["create", "get"],
        ),
    ]
}

/// A namespace with an `agent` service account allowed to work with ConfigMaps.
async fn namespace(prefix: &str) -> TestNamespace {
    let cluster = Cluster::shared();
    let ns = cluster.namespace(prefix).await.expect("namespace");
    ns.service_account("agent").await.expect("service account");
    ns.grant("agent", "workloads", workload_rules())
        .await
        .expect("role");
    ns
}

/// A pod on node 1 running `sleep`, labelled for enforcement when `enforced`.
async fn sleeper(ns: &TestNamespace, name: &str, enforced: bool) -> RunningPod {
    let mut opts = PodOptions::new(name, 1, &["sleep", "3600"]);
    opts.service_account = Some("agent".into());
    if enforced {
        opts.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
    }
    ns.run_pod(opts).await.expect("pod runs")
}

fn kubectl_in(pod: &RunningPod, args: &[&str]) -> Output {
    pod.in_pod_kubectl(Cluster::shared(), args)
}

fn agent(policy: &str) -> RunningAgent {
    RunningAgent::start(Cluster::shared(), AgentOptions::new(AGENT, 1, policy))
        .expect("agent starts")
}

/// Requests the agent's proxy has answered for `verb` with `code`.
fn proxied(agent: &RunningAgent, verb: &str, decision: &str, code: u16) -> f64 {
    agent
        .metric(&format!(
            "tollgate_requests_total{{verb=\"{verb}\",decision=\"{decision}\",code=\"{code}\"}}"
        ))
        .expect("metrics")
}

#[tokio::test(flavor = "multi_thread")]
async fn enforced_pods_work_like_exempt_pods() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-same").await;
    let enforced = sleeper(&ns, "enforced", true).await;
    let exempt = sleeper(&ns, "exempt", false).await;

    for (pod, name) in [(&enforced, "via-proxy"), (&exempt, "direct")] {
        ok(
            kubectl_in(pod, &["create", "configmap", name, "--from-literal=k=v1"]),
            "create",
        );
        let got = ok(
            kubectl_in(pod, &["get", "configmap", name, "-o", "jsonpath={.data.k}"]),
            "get",
        );
        assert_eq!(got, "v1");
        ok(
            kubectl_in(
                pod,
                &["patch", "configmap", name, "-p", r#"{"data":{"k":"v2"}}"#],
            ),
            "patch",
        );
        let got = ok(
            kubectl_in(pod, &["get", "configmap", name, "-o", "jsonpath={.data.k}"]),
            "get after patch",
        );
        assert_eq!(got, "v2");
    }
    // Lists from both pods see the same objects.
    let list = |pod: &RunningPod| {
        ok(
            kubectl_in(pod, &["get", "configmaps", "-o", "name"]),
            "list",
        )
    };
    assert_eq!(list(&enforced), list(&exempt));
    assert!(list(&enforced).contains("configmap/via-proxy"));

    // The enforced pod's calls went through the proxy; the exempt pod's did not.
    assert!(proxied(&agent, "create", "allow", 201) >= 1.0);
    assert!(proxied(&agent, "patch", "allow", 200) >= 1.0);
    assert_eq!(
        proxied(&agent, "create", "allow", 201),
        1.0,
        "only the enforced pod's create is proxied"
    );
    if std::env::var_os("TOLLGATE_SHOW_AGENT_LOG").is_some() {
        eprintln!("{}", agent.log_text());
    }
    drop(ns);
}
