//! Suite `trust`: trust mode `injected-ca` on the real control plane (issue 8).
//!
//! The agent on simulated node 1 keeps Tollgate's own CA in a Secret and serves the
//! admission webhook of `deploy/injected-ca/webhook.yaml`, which the real API server
//! calls over TLS. The simulated kubelet mounts the projected service-account volume as
//! kubelet does (the CA bundle from the ConfigMap the volume names), so what a test
//! reads in a pod is what a real pod would see.
//!
//! The webhook configuration differs from the shipped one in two ways only: the API
//! server reaches the agent by URL (the test cluster runs no kube-proxy, so a Service
//! is not routable from the API server), and it applies only to namespaces labelled
//! `tollgate.dev/trust-test`, so a configuration left by a crashed run cannot refuse
//! other suites' pods.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tollgate_harness::cluster::{Cluster, PodOptions, RunningPod, TestNamespace};
use tollgate_harness::topology;
use tollgate_tests::agent::{AgentOptions, RunningAgent, WEBHOOK_PORT};

const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");

/// The label that scopes the test's webhook configuration to the suite's namespaces.
const SCOPE_LABEL: &str = "tollgate.dev/trust-test";
/// What the agent writes in each enforced namespace, and the cluster's own.
const BUNDLE: &str = "tollgate-ca-bundle";
const ROOT_CA: &str = "kube-root-ca.crt";
const SA_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Allow all but ConfigMap deletes: a refusal with this reason proves a call went
/// through Tollgate.
const POLICY: &str = "apiVersion: tollgate.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: no-configmap-deletes
    action: deny
    reason: agents may not delete ConfigMaps in this suite
    request:
      verbs: [delete]
      resources: [configmaps]
";
const REFUSAL: &str = "agents may not delete ConfigMaps in this suite";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `check` every 200 ms until it gives a value or `timeout` passes.
fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not so after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kubectl_json(cluster: &Cluster, args: &[&str]) -> Option<Value> {
    let out = cluster
        .kubectl()
        .args(args)
        .args(["-o", "json"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The shipped webhook configuration, reached by URL and scoped to this suite; deleted
/// when dropped (even when the test fails), so no pod elsewhere meets a webhook without
/// an agent behind it.
struct WebhookConfiguration {
    name: String,
}

impl WebhookConfiguration {
    fn install(cluster: &Cluster, node_ip: &str) -> WebhookConfiguration {
        // The shipped name: the agent's RBAC lets it patch that one object only.
        let name = "tollgate".to_owned();
        // kubectl turns the shipped YAML into JSON (a List), with no YAML parser here.
        let shipped = workspace_root().join("deploy/injected-ca/webhook.yaml");
        let out = cluster
            .kubectl()
            .args(["create", "--dry-run=client", "-o", "json", "-f"])
            .arg(&shipped)
            .output()
            .expect("kubectl");
        assert!(out.status.success(), "{}", text(&out));
        // One JSON document per object.
        let mut configuration = serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .flat_map(|doc| match doc["items"].as_array() {
                Some(items) => items.clone(),
                None => vec![doc],
            })
            .find(|doc| doc["kind"] == "MutatingWebhookConfiguration")
            .expect("the shipped file has a MutatingWebhookConfiguration");
        configuration["metadata"]["name"] = json!(name);
        for webhook in configuration["webhooks"].as_array_mut().expect("webhooks") {
            let path = webhook["clientConfig"]["service"]["path"].clone();
            assert_eq!(path, "/mutate-pods");
            webhook["clientConfig"] = json!({
                "url": format!("https://{node_ip}:{WEBHOOK_PORT}/mutate-pods"),
            });
            webhook["namespaceSelector"]["matchExpressions"]
                .as_array_mut()
                .expect("matchExpressions")
                .push(json!({ "key": SCOPE_LABEL, "operator": "Exists" }));
        }
        cluster
            .apply_yaml(&configuration.to_string())
            .expect("applying the webhook configuration");
        WebhookConfiguration { name }
    }

    /// `caBundle` of each webhook, decoded (empty until an agent sets it).
    fn ca_bundles(&self, cluster: &Cluster) -> Vec<String> {
        let Some(object) = kubectl_json(
            cluster,
            &["get", "mutatingwebhookconfiguration", &self.name],
        ) else {
            return Vec::new();
        };
        object["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                let encoded = w["clientConfig"]["caBundle"].as_str().unwrap_or_default();
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .unwrap_or_default(),
                )
                .unwrap_or_default()
            })
            .collect()
    }
}

impl Drop for WebhookConfiguration {
    fn drop(&mut self) {
        let _ = Cluster::shared()
            .kubectl()
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &self.name,
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .status();
    }
}

/// Everything an injected-ca agent needs on the cluster: the component's RBAC and admission policies, a
/// fresh CA (a Secret left by an earlier run would be adopted, as in production; the
/// suite wants to see one created), the webhook configuration, and the agent.
fn start(cluster: &Cluster) -> (WebhookConfiguration, RunningAgent) {
    start_with(cluster, &[])
}

/// [`start`] with more `run` flags.
fn start_with(cluster: &Cluster, flags: &[&str]) -> (WebhookConfiguration, RunningAgent) {
    let node = cluster
        .nodes()
        .into_iter()
        .find(|n| n.index == 1)
        .expect("node 1");
    // deploy/rbac.yaml first (the overlay's RBAC binds to its service account).
    let base = workspace_root().join("deploy/rbac.yaml");
    cluster
        .kubectl_ok(&["apply", "-f", base.to_str().expect("path")])
        .expect("base RBAC");
    // The component's RBAC and the admission policies that bound the agent's writes:
    // the agent runs with exactly what deploy/injected-ca gives it.
    for file in ["rbac.yaml", "agent-writes.yaml"] {
        let path = workspace_root().join("deploy/injected-ca").join(file);
        cluster
            .kubectl_ok(&["apply", "-f", path.to_str().expect("path")])
            .unwrap_or_else(|e| panic!("applying deploy/injected-ca/{file}: {e:#}"));
    }
    let webhook = WebhookConfiguration::install(cluster, &node.ip.to_string());
    let mut options = AgentOptions::new(AGENT, 1, POLICY);
    options.injected_ca = true;
    options.extra_args = flags.iter().map(|f| f.to_string()).collect();
    cluster
        .kubectl_ok(&[
            "delete",
            "secret",
            "tollgate-ca",
            "-n",
            "tollgate-system",
            "--ignore-not-found",
        ])
        .expect("removing an old CA");
    let agent = RunningAgent::start(cluster, options).expect("agent starts");
    (webhook, agent)
}

fn secret_field(cluster: &Cluster, key: &str) -> Option<String> {
    let secret = kubectl_json(
        cluster,
        &["get", "secret", "tollgate-ca", "-n", "tollgate-system"],
    )?;
    let encoded = secret["data"][key].as_str()?;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?,
    )
    .ok()
}

/// A namespace of this suite; `enforced` labels it `tollgate.dev/enforce=true`.
async fn namespace(prefix: &str, enforced: bool) -> TestNamespace {
    let cluster = Cluster::shared();
    let ns = cluster.namespace(prefix).await.expect("namespace");
    let mut labels = vec![format!("{SCOPE_LABEL}=yes")];
    if enforced {
        labels.push("tollgate.dev/enforce=true".into());
    }
    let mut args = vec!["label", "namespace", ns.name.as_str()];
    args.extend(labels.iter().map(String::as_str));
    cluster.kubectl_ok(&args).expect("labelling the namespace");
    ns.service_account("agent").await.expect("service account");
    ns.grant(
        "agent",
        "configmaps",
        vec![k8s_openapi::api::rbac::v1::PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into(), "pods".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into(), "delete".into()],
            ..Default::default()
        }],
    )
    .await
    .expect("role");
    ns
}

fn sleeper(name: &str, pod_label: bool) -> PodOptions {
    let mut opts = PodOptions::new(name, 1, &["sleep", "3600"]);
    opts.service_account = Some("agent".into());
    if pod_label {
        opts.labels
            .insert("tollgate.dev/enforce".into(), "true".into());
    }
    opts
}

fn pod_json(cluster: &Cluster, pod: &RunningPod) -> Value {
    kubectl_json(cluster, &["get", "pod", &pod.name, "-n", &pod.namespace]).expect("pod")
}

/// The ConfigMap names the pod's projected volumes take CA bundles from.
fn ca_sources(pod: &Value) -> Vec<String> {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten())
        .filter_map(|s| s["configMap"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// The pod as the two admission paths could make it differ: the generated name of the
/// service-account volume and its CA source are blanked, and what the API server fills
/// in per object (name, namespace, uid, times, status) is dropped.
fn comparable(pod: &Value) -> Value {
    let mut spec = pod["spec"].clone();
    let text = spec.to_string();
    let volume = spec["volumes"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let text = if volume.is_empty() {
        text
    } else {
        text.replace(&volume, "kube-api-access")
    };
    spec = serde_json::from_str(&text).expect("JSON");
    for v in spec["volumes"].as_array_mut().into_iter().flatten() {
        for s in v["projected"]["sources"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if s["configMap"].is_object() {
                s["configMap"]["name"] = json!("<ca source>");
            }
        }
    }
    json!({
        "spec": spec,
        "labels": pod["metadata"]["labels"],
        "annotations": pod["metadata"]["annotations"],
    })
}

fn in_pod(pod: &RunningPod, cmd: &[&str]) -> Output {
    pod.kubectl_exec(Cluster::shared(), &[], cmd)
}

/// What the pod reads at the service-account CA path.
fn mounted_ca(pod: &RunningPod) -> String {
    let out = in_pod(pod, &["cat", SA_CA_FILE]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn configmap_ca(cluster: &Cluster, namespace: &str, name: &str) -> Option<String> {
    kubectl_json(cluster, &["get", "configmap", name, "-n", namespace])?["data"]["ca.crt"]
        .as_str()
        .map(str::to_owned)
}

/// curl in the pod to the `kubernetes` ClusterIP, trusting only `ca_file`: its exit
/// code says whether the certificate served to the pod chains to that CA (60: it
/// does not).
fn tls_check(pod: &RunningPod, ca_file: &Path) -> i32 {
    let out = in_pod(
        pod,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "--cacert",
            ca_file.to_str().expect("path"),
            "https://10.96.0.1:443/version",
        ],
    );
    out.status.code().unwrap_or(-1)
}

fn pem_count(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn enforced_pods_trust_tollgate_through_the_injected_bundle_and_a_rotation_drops_no_watch() {
    let cluster = Cluster::shared();
    let cluster_ca = std::fs::read_to_string(cluster.layout.pki().join("ca.crt")).expect("CA");
    let scratch = std::env::temp_dir().join(format!("tollgate-trust-{}", topology::unique_id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let cluster_ca_file = scratch.join("cluster-ca.pem");
    std::fs::write(&cluster_ca_file, &cluster_ca).expect("write");

    let (webhook, agent) = start(cluster);
    let log = || agent.log_text();

    // The first agent made the CA, and every webhook's caBundle is Tollgate's CA.
    let tollgate_ca = poll("the CA Secret", Duration::from_secs(30), || {
        secret_field(cluster, "ca.crt")
    });
    poll("the webhook's caBundle", Duration::from_secs(30), || {
        let bundles = webhook.ca_bundles(cluster);
        (bundles.len() == 2 && bundles.iter().all(|b| b.contains(tollgate_ca.trim()))).then_some(())
    });

    // 1. A pod in an enforced namespace: admitted with its CA source changed, and
    //    nothing else, compared with the same pod in a namespace that is not enforced.
    let enforced = namespace("trust-enf", true).await;
    let plain = namespace("trust-plain", false).await;
    let pod = enforced
        .run_pod(sleeper("agent-pod", false))
        .await
        .unwrap_or_else(|e| panic!("enforced pod: {e:#}\n{}", log()));
    let twin = plain
        .run_pod(sleeper("agent-pod", false))
        .await
        .expect("twin");
    let (pod_object, twin_object) = (pod_json(cluster, &pod), pod_json(cluster, &twin));
    assert_eq!(
        ca_sources(&pod_object),
        vec![BUNDLE.to_owned()],
        "{pod_object}"
    );
    assert_eq!(
        ca_sources(&twin_object),
        vec![ROOT_CA.to_owned()],
        "{twin_object}"
    );
    assert_eq!(
        comparable(&pod_object),
        comparable(&twin_object),
        "the webhook changed more than the CA source"
    );

    // The bundle holds the cluster CA and Tollgate's, and is what the pod reads.
    let bundle = configmap_ca(cluster, &enforced.name, BUNDLE).expect("the bundle ConfigMap");
    assert!(bundle.contains(cluster_ca.trim()), "{bundle}");
    assert!(bundle.contains(tollgate_ca.trim()), "{bundle}");
    assert_eq!(mounted_ca(&pod), bundle);
    assert_eq!(mounted_ca(&twin).trim(), cluster_ca.trim());

    // Its unmodified kubectl works through Tollgate: reads pass, the policy's refusal
    // comes back.
    let out = pod.in_pod_kubectl(cluster, &["get", "configmaps"]);
    assert!(out.status.success(), "{}\n{}", text(&out), log());
    assert!(String::from_utf8_lossy(&out.stdout).contains(BUNDLE));
    let out = pod.in_pod_kubectl(cluster, &["delete", "configmap", BUNDLE]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(REFUSAL),
        "{}",
        text(&out)
    );
    // What it is served is not from the cluster CA: without the injected bundle the
    // pod could not talk to Tollgate at all.
    assert_eq!(tls_check(&pod, &cluster_ca_file), 60, "{}", log());
    // The twin is not enforced: its kubectl reaches the API server itself.
    let out = twin.in_pod_kubectl(
        cluster,
        &["delete", "configmap", ROOT_CA, "--dry-run=server"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // 2. A pod labelled for enforcement in a namespace that is not: mutated too, and
    //    the bundle is written in its namespace before it is admitted.
    let labelled = plain
        .run_pod(sleeper("labelled", true))
        .await
        .unwrap_or_else(|e| panic!("labelled pod: {e:#}\n{}", log()));
    assert_eq!(
        ca_sources(&pod_json(cluster, &labelled)),
        vec![BUNDLE.to_owned()]
    );
    let plain_bundle = configmap_ca(cluster, &plain.name, BUNDLE).expect("bundle in plain ns");
    assert_eq!(mounted_ca(&labelled), plain_bundle);
    let out = labelled.in_pod_kubectl(cluster, &["delete", "configmap", BUNDLE]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(REFUSAL),
        "{}",
        text(&out)
    );

    // 3. The label removed and the pod recreated: the plain cluster CA again.
    plain.delete_pod("labelled").await.expect("delete");
    let relaxed = plain
        .run_pod(sleeper("labelled", false))
        .await
        .expect("pod");
    assert_eq!(
        ca_sources(&pod_json(cluster, &relaxed)),
        vec![ROOT_CA.to_owned()]
    );
    assert_eq!(mounted_ca(&relaxed).trim(), cluster_ca.trim());

    // 4. Idempotent: a pod that already names the bundle is admitted as it is.
    let mut again = pod_object.clone();
    again["metadata"] = json!({ "name": "again", "namespace": enforced.name });
    again.as_object_mut().expect("object").remove("status");
    let out = cluster
        .kubectl()
        .args(["create", "--dry-run=server", "-o", "json", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(again.to_string().as_bytes())?;
            child.wait_with_output()
        })
        .expect("kubectl");
    assert!(out.status.success(), "{}", text(&out));
    let admitted: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(admitted["spec"]["volumes"], again["spec"]["volumes"]);

    // 5. Rotation: a watch opened before it keeps delivering after the new CA signs,
    //    and a new connection verifies with the bundle the pod has by then.
    let mut watch = pod
        .kubectl_exec_child(
            cluster,
            &["kubectl", "get", "configmaps", "--watch", "-o", "name"],
        )
        .expect("watch");
    assert!(
        watch.wait_for_line(|| {}, BUNDLE, Duration::from_secs(30)),
        "the watch's first list: {:?}",
        watch.seen
    );
    let out = Command::new(AGENT)
        .args(["trust", "rotate", "--activate-in", "15s", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .output()
        .expect("trust rotate");
    assert!(out.status.success(), "{}", text(&out));
    let successor = secret_field(cluster, "staged.crt").expect("a staged CA");
    let successor_file = scratch.join("successor.pem");
    std::fs::write(&successor_file, &successor).expect("write");
    // Published first: the pod's bundle gains the successor before it signs.
    poll(
        "the successor in the pod's bundle",
        Duration::from_secs(60),
        || {
            let mounted = mounted_ca(&pod);
            (mounted.contains(successor.trim()) && pem_count(&mounted) == 3).then_some(())
        },
    );
    // Then it signs.
    poll(
        "a certificate from the successor",
        Duration::from_secs(60),
        || (tls_check(&pod, &successor_file) == 0).then_some(()),
    );
    assert!(
        watch.wait_for_line(
            || {
                cluster
                    .kubectl_ok(&[
                        "create",
                        "configmap",
                        "after-rotation",
                        "-n",
                        &enforced.name,
                    ])
                    .expect("create");
            },
            "configmap/after-rotation",
            Duration::from_secs(30),
        ),
        "the watch opened before the rotation saw nothing after it: {:?}\n{}",
        watch.seen,
        log()
    );
    let out = pod.in_pod_kubectl(cluster, &["get", "configmap", "after-rotation"]);
    assert!(out.status.success(), "{}\n{}", text(&out), log());
    // The Secret moved on: the successor is the CA now, its predecessor retired.
    poll("the promotion", Duration::from_secs(30), || {
        (secret_field(cluster, "ca.crt")? == successor
            && secret_field(cluster, "retired.crt")?.contains(tollgate_ca.trim()))
        .then_some(())
    });
    let status = Command::new(AGENT)
        .args(["trust", "status", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .output()
        .expect("trust status");
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("signing:") && shown.contains("retired:"),
        "{shown}"
    );

    drop(watch);
    drop(agent);
    drop(webhook);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_of_the_webhook_refuses_enforced_pods_and_no_other() {
    let cluster = Cluster::shared();
    let (webhook, agent) = start(cluster);
    let enforced = namespace("trust-out-enf", true).await;
    let plain = namespace("trust-out-plain", false).await;
    poll("the webhook's caBundle", Duration::from_secs(30), || {
        webhook
            .ca_bundles(cluster)
            .iter()
            .all(|b| pem_count(b) >= 1)
            .then_some(())
    });
    // While the agent runs, an enforced pod is admitted (mutated).
    let before = enforced
        .run_pod(sleeper("before", false))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    assert_eq!(
        ca_sources(&pod_json(cluster, &before)),
        vec![BUNDLE.to_owned()]
    );

    // The agent goes away: nothing answers the webhook.
    drop(agent);
    for (ns, name, pod_label) in [
        (&enforced, "refused", false),
        (&plain, "refused-labelled", true),
    ] {
        let err = ns
            .run_pod(sleeper(name, pod_label))
            .await
            .expect_err("an enforced pod must not be created without the webhook");
        let message = format!("{err:#}");
        assert!(
            message.contains("trust.tollgate.dev"),
            "the refusal names the webhook: {message}"
        );
    }
    // Every other pod is created as if Tollgate were not there.
    let other = plain
        .run_pod(sleeper("unaffected", false))
        .await
        .expect("a pod that is not enforced starts during the outage");
    assert_eq!(
        ca_sources(&pod_json(cluster, &other)),
        vec![ROOT_CA.to_owned()]
    );
    drop(webhook);
}

/// The CA's own schedule, shortened: a 90 s CA gets a successor staged 60 s before its
/// end, which signs 15 s later. Pods and the API server (the webhook's caBundle) have
/// the successor by then, so an enforced pod's kubectl and a new pod's admission both
/// go on working across the switch, with no operator involved.
#[tokio::test(flavor = "multi_thread")]
async fn the_ca_rotates_itself_before_it_expires() {
    let cluster = Cluster::shared();
    let scratch = std::env::temp_dir().join(format!("tollgate-trust-{}", topology::unique_id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let (webhook, agent) = start_with(
        cluster,
        &[
            "--ca-validity",
            "90s",
            "--ca-rotate-before",
            "60s",
            "--ca-propagation",
            "15s",
            "--serving-cert-validity",
            "60s",
        ],
    );
    let first = poll("the CA Secret", Duration::from_secs(30), || {
        secret_field(cluster, "ca.crt")
    });
    let enforced = namespace("trust-auto", true).await;
    let pod = enforced
        .run_pod(sleeper("before", false))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    let expiry_before = metric(&agent, "tollgate_trust_signing_ca_expiry_timestamp_seconds");
    assert!(
        expiry_before > 0.0,
        "{}",
        agent.admin_get("/metrics").map(|m| m.1).unwrap_or_default()
    );

    // Staged by the agent itself, about 30 s after the CA was made.
    let successor = poll("a successor staged", Duration::from_secs(60), || {
        secret_field(cluster, "staged.crt")
    });
    assert_ne!(successor, first);
    let successor_file = scratch.join("successor.pem");
    std::fs::write(&successor_file, &successor).expect("write");
    // Then promoted: the successor signs, its predecessor is retired but trusted.
    poll("the promotion", Duration::from_secs(60), || {
        (secret_field(cluster, "ca.crt")? == successor
            && secret_field(cluster, "retired.crt")?.contains(first.trim()))
        .then_some(())
    });
    poll(
        "a certificate from the successor",
        Duration::from_secs(30),
        || (tls_check(&pod, &successor_file) == 0).then_some(()),
    );
    let out = pod.in_pod_kubectl(cluster, &["get", "configmaps"]);
    assert!(out.status.success(), "{}\n{}", text(&out), agent.log_text());
    // The API server verifies the webhook's new certificate: a pod is still admitted.
    let after = enforced
        .run_pod(sleeper("after", false))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    assert_eq!(
        ca_sources(&pod_json(cluster, &after)),
        vec![BUNDLE.to_owned()]
    );
    assert!(webhook
        .ca_bundles(cluster)
        .iter()
        .all(|b| b.contains(successor.trim())));
    // The metrics tell: the signing CA ends later, two pods were mutated.
    assert!(metric(&agent, "tollgate_trust_signing_ca_expiry_timestamp_seconds") > expiry_before);
    assert_eq!(
        metric(
            &agent,
            "tollgate_trust_admissions_total{outcome=\"mutated\"}"
        ),
        2.0
    );
    drop(agent);
    drop(webhook);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// One sample of the agent's `/metrics` (0 when absent).
fn metric(agent: &RunningAgent, name: &str) -> f64 {
    let (_, text) = agent.admin_get("/metrics").expect("metrics");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}
