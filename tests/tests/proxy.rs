//! Suite `proxy`: the agent on a simulated node, the real API server behind it, and
//! kubectl inside pods that know nothing of Tollgate.
//!
//! Every test starts its own agent on node 1 (kernel programs attached to the
//! cluster's cgroup root, pinned under a bpffs directory of its own) and stops it at
//! the end; pods run `sleep` and the test runs kubectl inside them with no flags but
//! the in-pod defaults (the service-account files and KUBERNETES_SERVICE_HOST/PORT).

use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use tollgate_tests::agent::{AgentOptions, RunningAgent, ALLOW_ALL};
use tollgate_tests::cluster::harness::wait_until;
use tollgate_tests::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_tests::output::{ok, stderr, stdout};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

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

/// Options for a pod of the `agent` service account, labelled for enforcement when
/// `enforced`.
fn pod_options(name: &str, node: u8, command: &[&str], enforced: bool) -> PodOptions {
    let mut opts = PodOptions::new(name, node, command);
    opts.service_account = Some("agent".into());
    if enforced {
        opts.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
    }
    opts
}

/// A pod on node 1 running `sleep`, labelled for enforcement when `enforced`.
async fn sleeper(ns: &TestNamespace, name: &str, enforced: bool) -> RunningPod {
    ns.run_pod(pod_options(name, 1, &["sleep", "3600"], enforced))
        .await
        .expect("pod runs")
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
    // The admin port: alive, ready, and counting.
    assert_eq!(agent.admin_get("/healthz").expect("healthz").0, 200);
    assert_eq!(
        agent.admin_get("/readyz").expect("readyz"),
        (200, "ok\n".to_owned())
    );
    let (code, metrics) = agent.admin_get("/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tollgate_connections_total{kind=\"enforced\"}")
            && metrics.contains("tollgate_request_duration_seconds_bucket"),
        "{metrics}"
    );
    if std::env::var_os("TOLLGATE_SHOW_AGENT_LOG").is_some() {
        eprintln!("{}", agent.log_text());
    }
    drop(ns);
}

fn policy_with(rules: &str) -> String {
    format!("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n{rules}")
}

const DENY_CONFIGMAP_DELETES: &str = "  - name: no-configmap-deletes
    action: deny
    reason: agents may not delete ConfigMaps; ask a person
    request:
      verbs: [delete, deletecollection]
      resources: [configmaps]
";

/// The reason DENY_CONFIGMAP_LISTS gives.
const LISTS_REFUSED: &str = "listing ConfigMaps is not for agents";

/// Whether `kubectl get configmaps` in the pod is refused by DENY_CONFIGMAP_LISTS.
fn list_refused(pod: &RunningPod) -> bool {
    let out = kubectl_in(pod, &["get", "configmaps"]);
    !out.status.success() && stderr(&out).contains(LISTS_REFUSED)
}

const DENY_CONFIGMAP_LISTS: &str = "  - name: no-configmap-lists
    action: deny
    reason: listing ConfigMaps is not for agents
    request:
      verbs: [list]
      resources: [configmaps]
";

#[tokio::test(flavor = "multi_thread")]
async fn a_deny_rule_reads_as_forbidden_with_its_reason() {
    let agent = agent(&policy_with(DENY_CONFIGMAP_DELETES));
    let ns = namespace("proxy-deny").await;
    let pod = sleeper(&ns, "enforced", true).await;
    ok(
        kubectl_in(
            &pod,
            &["create", "configmap", "keep-me", "--from-literal=a=b"],
        ),
        "create",
    );
    let out = kubectl_in(&pod, &["delete", "configmap", "keep-me"]);
    assert!(!out.status.success(), "the delete was not refused");
    let err = stderr(&out);
    assert!(
        err.contains("Error from server (Forbidden)")
            && err.contains("agents may not delete ConfigMaps; ask a person")
            && err.contains("no-configmap-deletes"),
        "kubectl said: {err}"
    );
    // The object is still there (checked with the admin's credentials, not through
    // Tollgate).
    Cluster::shared()
        .kubectl_ok(&["get", "configmap", "keep-me", "-n", &ns.name])
        .expect("the ConfigMap survived");
    assert_eq!(proxied(&agent, "delete", "refused", 403), 1.0);

    // An exempt pod is not subject to the gateway's policy (RBAC still applies).
    let exempt = sleeper(&ns, "exempt", false).await;
    ok(
        kubectl_in(&exempt, &["delete", "configmap", "keep-me"]),
        "delete from the exempt pod",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_from_another_pod_is_refused() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-stolen").await;
    let thief = sleeper(&ns, "thief", true).await;
    let victim = sleeper(&ns, "victim", false).await;
    // A token the API server accepts (same service account, even), but bound to the
    // victim pod.
    let stolen = ns.token("agent", &[], Some(&victim)).await.expect("token");
    let token_arg = format!("--token={stolen}");
    let out = kubectl_in(&thief, &[&token_arg, "get", "configmaps"]);
    assert!(!out.status.success(), "the stolen token was accepted");
    assert!(
        stderr(&out).contains("Error from server (Forbidden)"),
        "kubectl said: {}",
        stderr(&out)
    );
    // kubectl's discovery calls drop the Status message (client-go reads discovery
    // errors as raw bytes); a plain request shows what Tollgate said.
    let path = format!("/api/v1/namespaces/{}/configmaps", ns.name);
    let out = kubectl_in(&thief, &[&token_arg, "get", "--raw", &path]);
    assert!(!out.status.success(), "the stolen token was accepted");
    let err = stderr(&out);
    assert!(
        err.contains("Error from server (Forbidden)")
            && err.contains("issued to pod \"victim\"")
            && err.contains(&format!("{}/thief", ns.name)),
        "kubectl said: {err}"
    );
    // The refusal is in the agent's log, with the pod it came from.
    let log = agent.log_text();
    assert!(
        log.contains("token used from the wrong pod"),
        "not recorded in the log:\n{log}"
    );
    // The thief's own token still works.
    ok(kubectl_in(&thief, &["get", "configmaps"]), "own token");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_label_added_or_removed_on_a_running_pod_applies_to_its_next_connection() {
    let _agent = agent(&policy_with(DENY_CONFIGMAP_LISTS));
    let ns = namespace("proxy-label").await;
    let pod = sleeper(&ns, "relabelled", false).await;
    ok(
        kubectl_in(&pod, &["get", "configmaps"]),
        "list while exempt",
    );

    let cluster = Cluster::shared();
    cluster
        .kubectl_ok(&[
            "label",
            "pod",
            "relabelled",
            "-n",
            &ns.name,
            "tollgate.dev/enforce=true",
        ])
        .expect("label");
    wait_until("the label to be enforced", Duration::from_secs(20), || {
        list_refused(&pod)
    })
    .expect("enforced after labelling");

    cluster
        .kubectl_ok(&[
            "label",
            "pod",
            "relabelled",
            "-n",
            &ns.name,
            "tollgate.dev/enforce-",
        ])
        .expect("unlabel");
    wait_until(
        "the pod to be exempt again",
        Duration::from_secs(20),
        || kubectl_in(&pod, &["get", "configmaps"]).status.success(),
    )
    .expect("exempt after the label is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_label_enforces_every_pod_in_it() {
    let _agent = agent(&policy_with(DENY_CONFIGMAP_LISTS));
    let ns = namespace("proxy-nslabel").await;
    let cluster = Cluster::shared();
    cluster
        .kubectl_ok(&["label", "namespace", &ns.name, "tollgate.dev/enforce=true"])
        .expect("label namespace");
    // The pod even asks to be left alone; the namespace wins.
    let mut opts = pod_options("optout", 1, &["sleep", "3600"], false);
    opts.labels
        .insert("tollgate.dev/enforce".into(), "false".into());
    let pod = ns.run_pod(opts).await.expect("pod");
    wait_until(
        "the namespace label to be enforced",
        Duration::from_secs(20),
        || list_refused(&pod),
    )
    .expect("enforced by the namespace label");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_connecting_before_discovery_knows_it_is_still_enforced() {
    let agent = agent(&policy_with(DENY_CONFIGMAP_LISTS));
    let ns = namespace("proxy-early").await;
    // The pod's very first act is a list; it races the agent's discovery of the pod.
    let opts = pod_options(
        "early",
        1,
        &[
            "sh",
            "-c",
            "kubectl get configmaps; echo exit=$?; sleep 3600",
        ],
        true,
    );
    let pod = ns.run_pod(opts).await.expect("pod");
    let cluster = Cluster::shared();
    wait_until(
        "the pod's first command to finish",
        Duration::from_secs(30),
        || {
            cluster
                .kubectl_ok(&["logs", "-n", &ns.name, &pod.name])
                .map(|log| log.contains("exit="))
                .unwrap_or(false)
        },
    )
    .expect("first command done");
    let log = cluster
        .kubectl_ok(&["logs", "-n", &ns.name, &pod.name])
        .expect("logs");
    assert!(
        log.contains("listing ConfigMaps is not for agents") && log.contains("exit=1"),
        "the pod's first request was not enforced:\n{log}"
    );
    eprintln!(
        "connections that waited for discovery: {}",
        agent
            .metric("tollgate_connections_total{kind=\"awaited_discovery\"}")
            .unwrap_or(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_apply_delete_logs_and_exec_work_through_the_proxy() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-verbs").await;
    let pod = sleeper(&ns, "enforced", true).await;
    let cluster = Cluster::shared();

    // Watch: once the watch is open (the proxy has answered it), a change made
    // elsewhere arrives on it.
    let mut watch = pod
        .kubectl_exec_child(
            cluster,
            &["kubectl", "get", "configmaps", "-w", "-o", "name"],
        )
        .expect("watch starts");
    wait_until("the watch to be open", Duration::from_secs(20), || {
        proxied(&agent, "watch", "allow", 200) >= 1.0
    })
    .expect("watch request proxied");
    let seen = watch.wait_for_line(
        || {
            cluster
                .kubectl_ok(&[
                    "create",
                    "configmap",
                    "watched",
                    "-n",
                    &ns.name,
                    "--from-literal=a=b",
                ])
                .expect("create");
        },
        "configmap/watched",
        Duration::from_secs(20),
    );
    assert!(
        seen,
        "the watch did not deliver the new ConfigMap: {:?}",
        watch.seen
    );
    drop(watch);

    // Apply, client-side and server-side, from a manifest file.
    let manifest = std::env::temp_dir().join(format!("tollgate-apply-{}.yaml", ns.name));
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: {}\ndata:\n  k: one\n",
            ns.name
        ),
    )
    .unwrap();
    let path = manifest.to_str().unwrap();
    ok(
        kubectl_in(&pod, &["apply", "-f", path]),
        "client-side apply",
    );
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: {}\ndata:\n  k: two\n",
            ns.name
        ),
    )
    .unwrap();
    ok(
        kubectl_in(
            &pod,
            &["apply", "--server-side", "--force-conflicts", "-f", path],
        ),
        "server-side apply",
    );
    let value = cluster
        .kubectl_ok(&[
            "get",
            "configmap",
            "applied",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.data.k}",
        ])
        .unwrap();
    assert_eq!(value, "two");
    let _ = std::fs::remove_file(&manifest);

    // Delete.
    ok(
        kubectl_in(&pod, &["delete", "configmap", "applied"]),
        "delete",
    );
    assert!(cluster
        .kubectl_ok(&["get", "configmap", "applied", "-n", &ns.name])
        .is_err());

    // Logs (streamed) and exec into another pod, from the enforced pod.
    let target = pod_options(
        "target",
        1,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 600 ]; do echo line-$i; i=$((i+1)); sleep 0.1; done",
        ],
        false,
    );
    ns.run_pod(target).await.expect("target pod");
    let mut follow = pod
        .kubectl_exec_child(cluster, &["kubectl", "logs", "-f", "target"])
        .expect("logs -f starts");
    assert!(
        follow.wait_for_line(|| {}, "line-20", Duration::from_secs(30)),
        "logs -f did not stream"
    );
    let out = ok(
        kubectl_in(&pod, &["exec", "target", "--", "echo", "hello from exec"]),
        "exec through the proxy",
    );
    assert_eq!(out.trim(), "hello from exec");
    let out = pod.kubectl_exec(
        cluster,
        &[],
        &[
            "env",
            "KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false",
            "kubectl",
            "exec",
            "target",
            "--",
            "echo",
            "over spdy",
        ],
    );
    assert_eq!(ok(out, "exec over SPDY").trim(), "over spdy");

    // Port-forward from the enforced pod to a server in another pod.
    let server = pod_options(
        "server",
        1,
        &[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "0.0.0.0",
            "--directory",
            "/etc",
        ],
        false,
    );

    ns.run_pod(server).await.expect("server pod");
    // (Killing the local `kubectl exec` leaves the in-pod port-forward running, so each
    // transport gets a port of its own.)
    for (transport, port) in [("true", 18080), ("false", 18081)] {
        let mut forward = pod
            .kubectl_exec_child(
                cluster,
                &[
                    "env",
                    &format!("KUBECTL_PORT_FORWARD_WEBSOCKETS={transport}"),
                    "kubectl",
                    "port-forward",
                    "server",
                    &format!("{port}:8080"),
                ],
            )
            .expect("port-forward starts");
        assert!(
            forward.wait_for_line(
                || {},
                &format!("Forwarding from 127.0.0.1:{port}"),
                Duration::from_secs(20)
            ),
            "port-forward did not start: {:?}",
            forward.seen
        );
        let mut fetched = String::new();
        wait_until(
            "the forwarded port to answer",
            Duration::from_secs(20),
            || {
                let out = pod.kubectl_exec(
                    cluster,
                    &[],
                    &[
                        "curl",
                        "-s",
                        "--max-time",
                        "5",
                        &format!("http://127.0.0.1:{port}/hostname"),
                    ],
                );
                fetched = stdout(&out);
                out.status.success() && !fetched.is_empty()
            },
        )
        .unwrap_or_else(|e| panic!("port-forward (websockets={transport}): {e}"));
        let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        assert_eq!(fetched.trim(), hostname.trim());
    }
}

/// Runs a shell snippet inside the pod (its namespaces, cgroup and service-account
/// files) that ends in one curl call printing the body and then the status code.
fn curl_in(pod: &RunningPod, snippet: &str) -> (u16, serde_json::Value) {
    let script = format!(
        "T=/var/run/secrets/kubernetes.io/serviceaccount; \
         C=\"--cacert $T/ca.crt -sS -w \\n%{{http_code}}\"; {snippet}"
    );
    let out = pod.kubectl_exec(Cluster::shared(), &[], &["sh", "-c", &script]);
    let text = stdout(&out);
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    if std::env::var_os("TOLLGATE_DEBUG_CURL").is_some() {
        eprintln!("curl stderr: {}", stderr(&out));
    }
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no status code in {text:?} ({})", stderr(&out)));
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (code, json)
}

fn assert_status(got: (u16, serde_json::Value), code: u16, reason: &str, what: &str) {
    let (got_code, body) = got;
    assert_eq!(got_code, code, "{what}: {body}");
    assert_eq!(body["kind"], "Status", "{what}: not a Status: {body}");
    assert_eq!(body["code"], code, "{what}: {body}");
    assert_eq!(body["reason"], reason, "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_status_and_the_agent_keeps_serving() {
    let mut agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-bad").await;
    let pod = sleeper(&ns, "enforced", true).await;
    let url = format!("https://10.96.0.1/api/v1/namespaces/{}/configmaps", ns.name);
    let auth = "-H \"Authorization: Bearer $(cat $T/token)\"";

    assert_status(
        curl_in(
            &pod,
            &format!("curl $C -H 'Authorization: Bearer not-a-token' {url}"),
        ),
        401,
        "Unauthorized",
        "invalid token",
    );
    assert_status(
        curl_in(&pod, &format!("curl $C {url}")),
        401,
        "Unauthorized",
        "no token",
    );
    // Oversized headers: a Status over HTTP/1.1. (Over HTTP/2 the h2 layer resets the
    // stream before the request reaches Tollgate; the agent goes on serving.)
    let big_header = "H=$(head -c 70000 /dev/zero | tr '\\0' a)";
    assert_status(
        curl_in(
            &pod,
            &format!("{big_header}; curl $C --http1.1 {auth} -H \"X-Big: $H\" {url}"),
        ),
        400,
        "BadRequest",
        "oversized headers",
    );
    let _ = curl_in(
        &pod,
        &format!("{big_header}; curl $C {auth} -H \"X-Big: $H\" {url}"),
    );
    let big = std::env::temp_dir().join(format!("tollgate-big-{}", ns.name));
    std::fs::write(&big, vec![b'a'; 4 * 1024 * 1024]).unwrap();
    for protocol in ["--http1.1", "--http2"] {
        assert_status(
            curl_in(
                &pod,
                &format!(
                    "curl $C {protocol} {auth} -H 'Content-Type: application/json' --data-binary @{} {url}",
                    big.display()
                ),
            ),
            413,
            "RequestEntityTooLarge",
            &format!("oversized body (Content-Length, {protocol})"),
        );
    }
    assert_status(
        curl_in(
            &pod,
            &format!(
                "cat {} | curl $C --http1.1 {auth} -H 'Content-Type: application/json' -H 'Transfer-Encoding: chunked' --data-binary @- {url}",
                big.display()
            ),
        ),
        413,
        "RequestEntityTooLarge",
        "oversized body (chunked)",
    );
    let _ = std::fs::remove_file(&big);
    // Invalid JSON reaches the API server, whose own Status comes back.
    assert_status(
        curl_in(
            &pod,
            &format!("curl $C {auth} -H 'Content-Type: application/json' -d '{{\"kind\": ' {url}"),
        ),
        400,
        "BadRequest",
        "invalid JSON",
    );
    assert_status(
        curl_in(
            &pod,
            &format!("curl $C {auth} --path-as-is {url}/../../kube-system/secrets"),
        ),
        400,
        "BadRequest",
        "a path with ..",
    );
    assert_status(
        curl_in(&pod, &format!("curl $C {auth} {url}/a%2Fb")),
        400,
        "BadRequest",
        "an encoded slash",
    );
    // Not HTTP at all, over TLS and in the clear.
    let _ = pod.kubectl_exec(
        Cluster::shared(),
        &[],
        &[
            "sh",
            "-c",
            "printf 'GARBAGE \\000\\001\\r\\n\\r\\n' | timeout 5 openssl s_client -quiet -connect 10.96.0.1:443 >/dev/null 2>&1; \
             printf 'NOT TLS\\r\\n\\r\\n' | timeout 5 sh -c 'cat > /dev/tcp/10.96.0.1/443' 2>/dev/null; true",
        ],
    );

    assert!(agent.is_running(), "the agent died:\n{}", agent.log_text());
    ok(
        kubectl_in(&pod, &["get", "configmaps"]),
        "a normal request afterwards",
    );
    assert!(proxied(&agent, "list", "allow", 200) >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_reloads_and_a_broken_version_keeps_the_old_one() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-reload").await;
    let pod = sleeper(&ns, "enforced", true).await;
    ok(kubectl_in(&pod, &["get", "configmaps"]), "allowed at first");

    agent
        .set_policy(&policy_with(DENY_CONFIGMAP_LISTS))
        .expect("write policy");
    wait_until("the new policy to apply", Duration::from_secs(20), || {
        list_refused(&pod)
    })
    .expect("reloaded");

    // A broken version (a misspelt field) is refused, loudly, and the rule stays.
    agent
        .set_policy(&policy_with(
            "  - name: typo\n    action: allow\n    request:\n      verb: [list]\n",
        ))
        .expect("write policy");
    wait_until(
        "the broken policy to be refused",
        Duration::from_secs(20),
        || agent.log_text().contains("new policy refused"),
    )
    .expect("refusal logged");
    let log = agent.log_text();
    assert!(
        log.contains("line 8 column 7") && log.contains("unknown field `verb`"),
        "the log does not say where the problem is:\n{log}"
    );
    let out = kubectl_in(&pod, &["get", "configmaps"]);
    assert!(
        !out.status.success() && stderr(&out).contains("listing ConfigMaps is not for agents"),
        "the old policy is no longer in force: {}",
        stderr(&out)
    );
}

#[test]
fn policy_check_points_at_the_line() {
    let dir = std::env::temp_dir().join(format!("tollgate-policy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, policy_with(DENY_CONFIGMAP_DELETES)).unwrap();
    let out = std::process::Command::new(AGENT)
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("ok (1 rule, default allow)"),
        "{}",
        stdout(&out)
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        policy_with("  - name: a\n    action: approve\n    request:\n      verbs: [get, delet]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(AGENT)
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken policy passed the check");
    let err = stderr(&out);
    assert!(
        err.contains("policy has 2 problems")
            && err
                .contains("line 5 column 11: a rule with action approve needs an approval section")
            && err.contains("line 8 column 20: unknown verb \"delet\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cgroupfs_node_enforces_every_qos_class() {
    let agent = RunningAgent::start(
        Cluster::shared(),
        AgentOptions::new(AGENT, 2, &policy_with(DENY_CONFIGMAP_LISTS)),
    )
    .expect("agent on node 2");
    let ns = namespace("proxy-cgroupfs").await;
    for qos in tollgate_tests::topology::QosClass::ALL {
        let name = format!("{qos:?}").to_lowercase();
        let mut opts = pod_options(&name, 2, &["sleep", "3600"], true);
        opts.qos = qos;
        let pod = ns.run_pod(opts).await.expect("pod");
        let out = kubectl_in(&pod, &["get", "configmaps"]);
        assert!(
            !out.status.success() && stderr(&out).contains("listing ConfigMaps is not for agents"),
            "{qos:?} pod on the cgroupfs node was not enforced: {}",
            stderr(&out)
        );
    }
    assert!(proxied(&agent, "list", "refused", 403) >= 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_can_live_in_a_watched_configmap() {
    let cluster = Cluster::shared();
    let ns = namespace("proxy-cmpolicy").await;
    let set = |policy: &str| {
        let file = std::env::temp_dir().join(format!("tollgate-cm-{}.yaml", ns.name));
        std::fs::write(&file, policy).unwrap();
        let manifest = cluster
            .kubectl_ok(&[
                "create",
                "configmap",
                "tollgate-policy",
                "-n",
                "tollgate-system",
                &format!("--from-file=policy.yaml={}", file.display()),
                "--dry-run=client",
                "-o",
                "yaml",
            ])
            .expect("render configmap");
        std::fs::write(&file, manifest).unwrap();
        cluster
            .kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
            .expect("apply configmap");
        let _ = std::fs::remove_file(&file);
    };
    // The namespace exists once deploy/rbac.yaml is applied; the agent applies it too.
    cluster
        .kubectl_ok(&[
            "apply",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"),
        ])
        .expect("rbac");
    set(&policy_with(DENY_CONFIGMAP_LISTS));
    let mut options = AgentOptions::new(AGENT, 1, "");
    options.policy_configmap = Some("tollgate-system/tollgate-policy".into());
    let agent = RunningAgent::start(cluster, options).expect("agent with a ConfigMap policy");
    let pod = sleeper(&ns, "enforced", true).await;
    let out = kubectl_in(&pod, &["get", "configmaps"]);
    assert!(
        stderr(&out).contains("listing ConfigMaps is not for agents"),
        "the ConfigMap policy is not in force: {}",
        stderr(&out)
    );

    set("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\ndefault: maybe\n");
    wait_until(
        "the broken ConfigMap policy to be refused",
        Duration::from_secs(20),
        || agent.log_text().contains("new policy refused"),
    )
    .expect("refusal logged");
    assert!(stderr(&kubectl_in(&pod, &["get", "configmaps"])).contains("not for agents"));

    set(ALLOW_ALL);
    wait_until(
        "the new ConfigMap policy to apply",
        Duration::from_secs(20),
        || kubectl_in(&pod, &["get", "configmaps"]).status.success(),
    )
    .expect("reloaded from the ConfigMap");
    let _ = cluster.kubectl_ok(&[
        "delete",
        "configmap",
        "tollgate-policy",
        "-n",
        "tollgate-system",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deny_on_exec_holds_for_websocket_and_spdy_alike() {
    let _agent = agent(&policy_with(
        "  - name: no-exec
    action: deny
    reason: agents may not run commands in pods
    request:
      verbs: [create]
      resources: [pods/exec, pods/attach, pods/portforward]
",
    ));
    let ns = namespace("proxy-noexec").await;
    let pod = sleeper(&ns, "enforced", true).await;
    sleeper(&ns, "target", false).await;
    for websockets in ["true", "false"] {
        let out = pod.kubectl_exec(
            Cluster::shared(),
            &[],
            &[
                "env",
                &format!("KUBECTL_REMOTE_COMMAND_WEBSOCKETS={websockets}"),
                "kubectl",
                "exec",
                "target",
                "--",
                "echo",
                "should not run",
            ],
        );
        assert!(
            !out.status.success() && !stdout(&out).contains("should not run"),
            "exec (websockets={websockets}) was not refused: {}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains("agents may not run commands in pods"),
            "exec (websockets={websockets}): {}",
            stderr(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_pod_leaves_the_kernel_map() {
    let agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-gone").await;
    let pod = sleeper(&ns, "short-lived", true).await;
    let cgroup_id =
        tollgate_tests::topology::cgroup_id(&pod.pod_cgroup().expect("cgroup")).expect("cgroup id");
    let map_entry = format!("cgroup {cgroup_id} Enforced");
    let status = || {
        let out = std::process::Command::new(AGENT)
            .args(["datapath", "status", "--bpffs"])
            .arg(&agent.bpffs)
            .output()
            .expect("datapath status");
        stdout(&out)
    };
    wait_until("the pod in the kernel map", Duration::from_secs(20), || {
        status().contains(&map_entry)
    })
    .expect("pod classified");
    ns.delete_pod("short-lived").await.expect("delete");
    wait_until(
        "the pod to leave the kernel map",
        Duration::from_secs(20),
        || !status().contains(&format!("cgroup {cgroup_id} ")),
    )
    .expect("map entry removed");
}

/// Watches hold their stream for as long as they run. Over one HTTP/2 connection to
/// the API server (100 concurrent streams by default) 150 of them would leave every
/// later call of the node waiting; the proxy gives them connections of their own.
#[tokio::test(flavor = "multi_thread")]
async fn many_open_watches_do_not_starve_other_calls() {
    const LOAD: &str = env!("CARGO_BIN_EXE_tg-load");
    let _agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-watches").await;
    let pod = sleeper(&ns, "watcher", true).await;
    let cluster = Cluster::shared();
    let dir = std::env::temp_dir().join(format!("tollgate-watches-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token_file = dir.join("token");
    std::fs::write(
        &token_file,
        ns.token("agent", &[], Some(&pod)).await.expect("token"),
    )
    .expect("token file");
    let spec = dir.join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({
            "server": "https://10.96.0.1:443",
            "ca_file": cluster.layout.pki().join("ca.crt"),
            "token_file": token_file,
            "namespace": ns.name,
            "phase": "watch",
            "resource": "configmaps",
            "watches": 150,
            "concurrency": 1,
            "requests": 0,
            "warmup": 0,
            "time_limit_ms": 90_000,
            "establish_timeout_ms": 30_000,
            "print_events": false,
        })
        .to_string(),
    )
    .expect("spec");
    let mut watcher = tollgate_tests::watch_bench::Watcher::start(&pod, LOAD.as_ref(), &spec)
        .expect("tg-load watch starts");
    let streams = watcher
        .wait_established(Duration::from_secs(40))
        .expect("the watches report");
    assert_eq!(
        (streams.established, streams.pending, streams.failed),
        (150, 0, 0),
        "every watch is answered: {:?}",
        watcher.other
    );
    // With all of them open, an ordinary call of the same pod is answered at once.
    let out = pod.kubectl_exec(
        cluster,
        &[],
        &[
            "timeout",
            "15",
            "kubectl",
            "get",
            "configmaps",
            "-o",
            "name",
        ],
    );
    assert!(
        out.status.success(),
        "a get while 150 watches are open: {}",
        stderr(&out)
    );
    drop(watcher);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rollout sends the agent SIGTERM: a request in flight is not cut but finishes (here
/// a watch the API server ends after 3 s), the agent then exits by itself, and the
/// session is closed on disk.
#[tokio::test(flavor = "multi_thread")]
async fn on_sigterm_requests_in_flight_finish_before_the_agent_exits() {
    let mut agent = agent(ALLOW_ALL);
    let ns = namespace("proxy-drain").await;
    let pod = sleeper(&ns, "enforced", true).await;
    let cluster = Cluster::shared();
    let path = format!(
        "/api/v1/namespaces/{}/configmaps?watch=1&timeoutSeconds=3",
        ns.name
    );
    let mut watch = pod
        .kubectl_exec_child(cluster, &["kubectl", "get", "--raw", &path])
        .expect("watch starts");
    assert!(
        watch.wait_for_line(|| {}, "kube-root-ca.crt", Duration::from_secs(20)),
        "the watch's first event: {:?}",
        watch.seen
    );
    let (status, took) = agent
        .terminate(Duration::from_secs(15))
        .expect("the agent exits within its drain timeout");
    assert!(status.success(), "{status}\n{}", agent.log_text());
    let ended = watch.wait(Duration::from_secs(10)).expect("the watch ends");
    assert!(
        ended.success(),
        "the watch in flight was cut by the shutdown ({ended}): {:?}\n{}",
        watch.seen,
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("every proxied connection drained"),
        "{}",
        agent.log_text()
    );
    eprintln!("  drained in {:.1}s", took.as_secs_f64());
    let verified = agent
        .sessions_cli(&["verify", "--strict"])
        .expect("sessions verify");
    assert!(
        verified.status.success(),
        "sessions left open: {}{}",
        stdout(&verified),
        stderr(&verified)
    );
}
