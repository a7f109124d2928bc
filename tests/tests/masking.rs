//! Suite `masking`: what enforced pods read through Tollgate has no secret value in it,
//! on the real control plane, with kubectl, client-go (JSON and protobuf) and curl in
//! simulated pods that know nothing of Tollgate (DESIGN §6, issue 6 items 1–3 and 6).
//!
//! Every test starts its own agent on node 1 with the default masking (or the policy it
//! names), makes its objects with the admin's kubectl, and reads them from an enforced
//! pod of the `agent` service account, which RBAC lets read Secrets, ConfigMaps and
//! Deployments. Every check looks for the real values (distinctive strings, plain and
//! base64) in the whole output, and for the marker where the output shows values.

use std::process::Output;
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;
use tollgate_tests::agent::{AgentOptions, RunningAgent, ALLOW_ALL};
use tollgate_tests::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_tests::output::{ok, stderr, stdout};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

/// What a masked plain value reads as (and decoded `data`).
const MARKER: &str = "*** masked by tollgate ***";
/// What a masked `data` value reads as in JSON / YAML (base64 of the marker).
const MARKER_B64: &str = "KioqIG1hc2tlZCBieSB0b2xsZ2F0ZSAqKio=";

/// A Secret's value, plain and base64 (as `data` carries it).
const PASSWORD: (&str, &str) = ("tg-real-pw-7f3k9q", "dGctcmVhbC1wdy03ZjNrOXE=");
const API_TOKEN: &str = "tg-real-api-token-x41v";
const WATCHED: (&str, &str) = ("tg-watch-pw-c93m2", "dGctd2F0Y2gtcHctYzkzbTI=");
const APPLIED: (&str, &str) = ("tg-applied-pw-q8z4", "dGctYXBwbGllZC1wdy1xOHo0");
const GZIPPED: (&str, &str) = ("tg-gzip-pw-m2k7", "dGctZ3ppcC1wdy1tMms3");

/// No real value anywhere in `text`; the marker (plain or base64, given) somewhere.
fn assert_masked(text: &str, reals: &[&str], marker: Option<&str>, what: &str) {
    for real in reals {
        assert!(
            !text.contains(real),
            "{what}: the real value {real:?} leaked:\n{text}"
        );
    }
    if let Some(marker) = marker {
        assert!(
            text.contains(marker),
            "{what}: no marker {marker:?} in:\n{text}"
        );
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..PolicyRule::default()
    }
}

/// A namespace whose `agent` service account may read Secrets, ConfigMaps and
/// Deployments.
async fn namespace(prefix: &str) -> TestNamespace {
    let cluster = Cluster::shared();
    let ns = cluster.namespace(prefix).await.expect("namespace");
    ns.service_account("agent").await.expect("service account");
    let read = ["get", "list", "watch"];
    ns.grant(
        "agent",
        "reader",
        vec![
            rule(&[""], &["secrets", "configmaps"], &read),
            rule(&["apps"], &["deployments"], &read),
        ],
    )
    .await
    .expect("role");
    ns
}

/// A pod of the `agent` account on node 1 running `sleep`; labelled for enforcement
/// when `enforced`.
async fn sleeper(ns: &TestNamespace, name: &str, enforced: bool) -> RunningPod {
    let mut opts = PodOptions::new(name, 1, &["sleep", "3600"]);
    opts.service_account = Some("agent".into());
    if enforced {
        opts.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
    }
    ns.run_pod(opts).await.expect("pod runs")
}

fn agent(policy: &str) -> RunningAgent {
    RunningAgent::start(Cluster::shared(), AgentOptions::new(AGENT, 1, policy))
        .expect("agent starts")
}

fn kubectl_in(pod: &RunningPod, args: &[&str]) -> Output {
    pod.in_pod_kubectl(Cluster::shared(), args)
}

/// `sh -c SCRIPT` in the pod (its namespaces, cgroup and service-account files).
fn sh_in(pod: &RunningPod, script: &str) -> Output {
    pod.kubectl_exec(Cluster::shared(), &[], &["sh", "-c", script])
}

/// The admin's kubectl (not through Tollgate).
fn admin(args: &[&str]) -> String {
    Cluster::shared()
        .kubectl_ok(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"))
}

/// `kubectl apply -f -` (admin) of a YAML document.
fn admin_apply(yaml: &str) {
    Cluster::shared()
        .apply_yaml(yaml)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Values masked by the agent, by kind and cause.
fn masked_count(agent: &RunningAgent, kind: &str, cause: &str) -> f64 {
    agent
        .metric(&format!(
            "tollgate_masked_fields_total{{kind=\"{kind}\",cause=\"{cause}\"}}"
        ))
        .expect("metrics")
}

/// Prints how long a step took (the suite's timings in the test output).
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    eprintln!("  {what}: {:.2}s", started.elapsed().as_secs_f64());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_reads_of_secrets_are_masked_and_an_exempt_pod_sees_the_values() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("mask-kubectl").await;
    let n = ns.name.as_str();
    admin(&[
        "create",
        "secret",
        "generic",
        "db",
        "-n",
        n,
        &format!("--from-literal=password={}", PASSWORD.0),
        "--from-literal=user=admin",
    ]);
    let pod = sleeper(&ns, "enforced", true).await;
    let reals = [PASSWORD.0, PASSWORD.1];

    let yaml = timed("get secret -o yaml", || {
        ok(
            kubectl_in(&pod, &["get", "secret", "db", "-o", "yaml"]),
            "get -o yaml",
        )
    });
    assert_masked(&yaml, &reals, Some(MARKER_B64), "get secret -o yaml");
    assert!(
        yaml.contains("password:") && yaml.contains("user:"),
        "{yaml}"
    );

    let json = timed("get secret -o json", || {
        ok(
            kubectl_in(&pod, &["get", "secret", "db", "-o", "json"]),
            "get -o json",
        )
    });
    assert_masked(&json, &reals, Some(MARKER_B64), "get secret -o json");
    let object: Value = serde_json::from_str(&json).expect("JSON");
    // The shape is kept: every key, each value valid base64 (of the marker).
    assert_eq!(object["data"]["password"], MARKER_B64);
    assert_eq!(object["data"]["user"], MARKER_B64);

    let list = timed("get secrets -o json", || {
        ok(
            kubectl_in(&pod, &["get", "secrets", "-o", "json"]),
            "list -o json",
        )
    });
    assert_masked(&list, &reals, Some(MARKER_B64), "get secrets -o json");
    let list: Value = serde_json::from_str(&list).expect("JSON");
    assert!(list["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|s| s["metadata"]["name"] == "db"));

    // The default table: names, type, a count of keys — and no value.
    let table = timed("get secrets (table)", || {
        ok(kubectl_in(&pod, &["get", "secrets"]), "get secrets")
    });
    assert_masked(&table, &reals, None, "get secrets (table)");
    let row = table
        .lines()
        .find(|l| l.starts_with("db "))
        .unwrap_or_else(|| panic!("no row for db in:\n{table}"));
    assert!(row.contains("Opaque") && row.contains(" 2 "), "{row}");

    // describe prints sizes only: the masked value's (the marker is 26 bytes), not
    // the real one's (17).
    let described = timed("describe secret", || {
        ok(kubectl_in(&pod, &["describe", "secret", "db"]), "describe")
    });
    assert_masked(&described, &reals, None, "describe secret");
    let size_of = |key: &str| {
        described
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in:\n{described}"))
            .to_owned()
    };
    assert!(size_of("password").contains(&format!("{} bytes", MARKER.len())));
    assert!(!size_of("password").contains(&format!("{} bytes", PASSWORD.0.len())));

    assert!(masked_count(&agent, "Secret", "secret_data") >= 6.0);

    // An exempt pod of the same account is not proxied: the real values.
    let exempt = sleeper(&ns, "exempt", false).await;
    let direct = ok(
        kubectl_in(&exempt, &["get", "secret", "db", "-o", "json"]),
        "exempt get",
    );
    assert!(direct.contains(PASSWORD.1), "{direct}");
    drop(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_masks_every_event() {
    let _agent = agent(ALLOW_ALL);
    let ns = namespace("mask-watch").await;
    let n = ns.name.clone();
    let pod = sleeper(&ns, "enforced", true).await;
    let cluster = Cluster::shared();
    let mut watch = pod
        .kubectl_exec_child(cluster, &["kubectl", "get", "secrets", "-w", "-o", "json"])
        .expect("watch starts");
    // The initial list is empty: wait until the watch runs (kubectl prints nothing
    // for an empty list), then create and update a Secret.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let created = watch.wait_for_line(
        || {
            admin(&[
                "create",
                "secret",
                "generic",
                "watched",
                "-n",
                &n,
                &format!("--from-literal=password={}", WATCHED.0),
            ]);
        },
        "\"watched\"",
        Duration::from_secs(30),
    );
    assert!(created, "no event for the new Secret: {:?}", watch.seen);
    let updated = watch.wait_for_line(
        || {
            admin(&[
                "patch",
                "secret",
                "watched",
                "-n",
                &n,
                "-p",
                &format!(
                    r#"{{"metadata":{{"labels":{{"round":"second"}}}},"stringData":{{"token":"{}"}}}}"#,
                    WATCHED.0
                ),
            ]);
        },
        "\"second\"",
        Duration::from_secs(30),
    );
    assert!(updated, "no event for the update: {:?}", watch.seen);
    // The rest of the updated object.
    watch.wait_for_line(|| {}, "never printed", Duration::from_secs(2));
    eprintln!(
        "  watch: two events in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let text = watch.seen.join("\n");
    assert_masked(
        &text,
        &[WATCHED.0, WATCHED.1],
        Some(MARKER_B64),
        "get secrets -w -o json",
    );
    assert!(
        !text.contains("stderr:"),
        "the watch reported an error:\n{text}"
    );
    assert!(
        text.matches(MARKER_B64).count() >= 3,
        "both events masked:\n{text}"
    );
    drop(watch);
    drop(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_in_a_deployment_env_and_an_applied_secret_are_masked() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("mask-workloads").await;
    let n = ns.name.as_str();
    // Both applied: each carries the last-applied annotation with the values in it.
    admin_apply(&format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: worker
  namespace: {n}
spec:
  replicas: 0
  selector:
    matchLabels: {{app: worker}}
  template:
    metadata:
      labels: {{app: worker}}
    spec:
      containers:
        - name: main
          image: busybox
          env:
            - name: API_TOKEN
              value: {API_TOKEN}
            - name: LOG_LEVEL
              value: debug
"
    ));
    admin_apply(&format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: applied
  namespace: {n}
stringData:
  password: {}
",
        APPLIED.0
    ));
    let pod = sleeper(&ns, "enforced", true).await;

    let deployment = timed("get deployment -o json", || {
        ok(
            kubectl_in(&pod, &["get", "deployment", "worker", "-o", "json"]),
            "get deployment",
        )
    });
    assert_masked(&deployment, &[API_TOKEN], Some(MARKER), "deployment");
    let object: Value = serde_json::from_str(&deployment).expect("JSON");
    let env = &object["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env[0]["name"], "API_TOKEN");
    assert_eq!(env[0]["value"], MARKER);
    assert_eq!(
        env[1],
        serde_json::json!({"name": "LOG_LEVEL", "value": "debug"})
    );
    // The annotation is masked the same way and stays a readable manifest.
    let annotation = object["metadata"]["annotations"]
        ["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .expect("last-applied annotation");
    let applied: Value = serde_json::from_str(annotation).expect("annotation is JSON");
    assert_eq!(
        applied["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"],
        "debug"
    );

    let secret = timed("get applied secret -o yaml", || {
        ok(
            kubectl_in(&pod, &["get", "secret", "applied", "-o", "yaml"]),
            "get applied secret",
        )
    });
    assert_masked(
        &secret,
        &[APPLIED.0, APPLIED.1],
        Some(MARKER_B64),
        "applied secret",
    );
    // YAML folds the marker (it has spaces) across lines: the annotation is checked
    // in JSON.
    let secret = ok(
        kubectl_in(&pod, &["get", "secret", "applied", "-o", "json"]),
        "get applied secret -o json",
    );
    assert_masked(
        &secret,
        &[APPLIED.0, APPLIED.1],
        Some(MARKER_B64),
        "applied secret",
    );
    let object: Value = serde_json::from_str(&secret).expect("JSON");
    let annotation = object["metadata"]["annotations"]
        ["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .expect("the annotation is kept");
    let applied: Value = serde_json::from_str(annotation).expect("annotation is JSON");
    assert_eq!(applied["stringData"]["password"], MARKER, "{annotation}");
    assert!(masked_count(&agent, "Deployment", "rule") >= 1.0);
    assert!(masked_count(&agent, "Secret", "last_applied") >= 1.0);

    // The test means something: the exempt pod sees the value in the annotation.
    let exempt = sleeper(&ns, "exempt", false).await;
    let direct = ok(
        kubectl_in(&exempt, &["get", "secret", "applied", "-o", "yaml"]),
        "exempt get",
    );
    assert!(direct.contains(APPLIED.0), "{direct}");
    drop(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_go_gets_masked_values_with_json_and_with_protobuf() {
    let _agent = agent(ALLOW_ALL);
    let ns = namespace("mask-client-go").await;
    let n = ns.name.clone();
    admin(&[
        "create",
        "secret",
        "generic",
        "db",
        "-n",
        &n,
        &format!("--from-literal=password={}", PASSWORD.0),
    ]);
    let pod = sleeper(&ns, "enforced", true).await;
    let tgclient = Cluster::shared().binaries.tgclient.display().to_string();
    for protobuf in ["0", "1"] {
        for call in [format!("get-secret {n} db"), format!("list-secrets {n}")] {
            let script = format!("TGCLIENT_PROTOBUF={protobuf} {tgclient} {call}");
            let out = timed(&format!("tgclient {call} (protobuf={protobuf})"), || {
                ok(sh_in(&pod, &script), &script)
            });
            // tgclient prints decoded data: the marker itself.
            assert_masked(
                &out,
                &[PASSWORD.0, PASSWORD.1],
                Some(&format!("password={MARKER}")),
                &script,
            );
        }
    }
    drop(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusing_policy_answers_forbidden_and_curl_gets_masked_json() {
    let policy = format!("{ALLOW_ALL}masking:\n  secrets: refuse\n");
    let agent = agent(&policy);
    let ns = namespace("mask-refuse").await;
    let n = ns.name.clone();
    admin(&[
        "create",
        "secret",
        "generic",
        "db",
        "-n",
        &n,
        &format!("--from-literal=password={}", GZIPPED.0),
    ]);
    admin(&[
        "create",
        "configmap",
        "settings",
        "-n",
        &n,
        "--from-literal=api_key=cm-key-value",
        "--from-literal=mode=fast",
    ]);
    let pod = sleeper(&ns, "enforced", true).await;

    // secrets: refuse — every read of a Secret is a 403 naming the rule.
    for args in [
        vec!["get", "secret", "db", "-o", "json"],
        vec!["get", "secrets"],
    ] {
        let out = kubectl_in(&pod, &args);
        assert!(!out.status.success(), "{args:?} was not refused");
        let err = stderr(&out);
        assert!(
            err.contains("Error from server (Forbidden)")
                && err.contains("masking rule \"secrets\""),
            "{args:?}: {err}"
        );
        assert_masked(
            &(stdout(&out) + &err),
            &[GZIPPED.0, GZIPPED.1],
            None,
            "refused",
        );
    }
    // ConfigMaps are still read, their credential-named keys masked.
    let cm = ok(
        kubectl_in(&pod, &["get", "configmap", "settings", "-o", "json"]),
        "get configmap",
    );
    assert_masked(&cm, &["cm-key-value"], Some(MARKER), "configmap");
    assert!(cm.contains("\"fast\""), "{cm}");
    assert!(
        agent
            .metric("tollgate_masking_refusals_total{reason=\"rule\"}")
            .expect("metrics")
            >= 2.0
    );

    // Under the default policy: curl asking for gzip (and for protobuf) gets masked,
    // uncompressed JSON; a watch over WebSocket is refused.
    agent.set_policy(ALLOW_ALL).expect("policy");
    let curl = |extra: &str, path: &str| {
        let script = format!(
            "T=/var/run/secrets/kubernetes.io/serviceaccount; curl -sS --cacert $T/ca.crt \
             -H \"Authorization: Bearer $(cat $T/token)\" {extra} \
             -w '\\n%{{http_code}} %{{content_type}}' https://10.96.0.1/api/v1/namespaces/{n}/{path}"
        );
        stdout(&sh_in(&pod, &script))
    };
    // The policy file is re-read within seconds.
    let started = Instant::now();
    let mut gz = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        gz = curl("--compressed", "secrets/db");
        if gz.contains("\n200 ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(gz.contains("\n200 application/json"), "{gz}");
    assert_masked(
        &gz,
        &[GZIPPED.0, GZIPPED.1],
        Some(MARKER_B64),
        "curl --compressed",
    );
    let pb = curl(
        "-H 'Accept: application/vnd.kubernetes.protobuf'",
        "secrets",
    );
    assert!(pb.contains("\n200 application/json"), "{pb}");
    assert_masked(
        &pb,
        &[GZIPPED.0, GZIPPED.1],
        Some(MARKER_B64),
        "curl protobuf",
    );
    let ws = curl(
        "--http1.1 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
         -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=='",
        "secrets?watch=true",
    );
    assert!(ws.contains("\n403 "), "{ws}");
    assert_masked(&ws, &[GZIPPED.0, GZIPPED.1], None, "websocket watch");
    drop(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_masked_value_written_back_is_refused_and_the_real_value_kept() {
    let _agent = agent(ALLOW_ALL);
    let ns = namespace("mask-writeback").await;
    let n = ns.name.as_str();
    ns.grant(
        "agent",
        "writer",
        vec![rule(&[""], &["secrets"], &["update", "patch", "create"])],
    )
    .await
    .expect("role");
    admin(&[
        "create",
        "secret",
        "generic",
        "db",
        "-n",
        n,
        &format!("--from-literal=password={}", PASSWORD.0),
    ]);
    let pod = sleeper(&ns, "enforced", true).await;

    // Read-modify-write of what the agent saw: replace (PUT) and apply (PATCH).
    for (how, script) in [
        ("replace", "kubectl get secret db -o json | kubectl replace -f -"),
        (
            "apply",
            "kubectl get secret db -o json | sed 's/\"type\"/\"immutable\":false,\"type\"/' | kubectl apply -f -",
        ),
        (
            "create",
            "kubectl get secret db -o json | sed 's/\"name\": \"db\"/\"name\": \"copy\"/' | kubectl create -f -",
        ),
    ] {
        let out = sh_in(&pod, script);
        assert!(!out.status.success(), "{how} must be refused: {}", stdout(&out));
        assert!(
            stderr(&out).contains("carries a value Tollgate masked"),
            "{how}: {}",
            stderr(&out)
        );
    }
    let real = admin(&[
        "get",
        "secret",
        "db",
        "-n",
        n,
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(real, PASSWORD.1, "the real value is untouched");
    let copies = Cluster::shared().kubectl_ok(&["get", "secret", "copy", "-n", n]);
    assert!(copies.is_err(), "no copy carrying the marker was created");
}
