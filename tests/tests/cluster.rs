//! Suite `cluster`: the real control plane and the simulated nodes behave as a user of a
//! real cluster expects. Runs as root (fails otherwise); starts or reuses the shared
//! cluster (`cargo xtask cluster up`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, DownwardAPIProjection, DownwardAPIVolumeFile, Event, KeyToPath,
    ObjectFieldSelector, Pod, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::Api;
use tollgate_tests::cluster::harness::{wait_until, SERVICE_ACCOUNT_DIR};
use tollgate_tests::cluster::{Cluster, PodOptions, RunningPod};
use tollgate_tests::topology::{CgroupDriver, Netns, QosClass};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until the pod's log (admin `kubectl logs`) satisfies `done`, and returns it.
fn wait_for_log(
    cluster: &Cluster,
    pod: &RunningPod,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    let mut last = String::new();
    let ok = wait_until("the pod's log", Duration::from_secs(60), || {
        if let Ok(log) = cluster.kubectl_ok(&["logs", "-n", &pod.namespace, &pod.name]) {
            last = log;
        }
        done(&last)
    });
    ok.with_context(|| format!("log so far:\n{last}"))?;
    Ok(last)
}

fn read_rule(resource: &str, verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

/// kubectl inside a pod, with no flags (in-cluster config: the service-account files and
/// KUBERNETES_SERVICE_HOST/PORT), lists pods through the ClusterIP, and RBAC refuses what
/// its service account may not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_in_pod_uses_cluster_ip_and_rbac() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("incluster").await?;
    ns.service_account("lister").await?;
    ns.grant(
        "lister",
        "pod-reader",
        vec![read_rule("pods", &["get", "list"])],
    )
    .await?;
    let mut opts = PodOptions::new(
        "kubectl-in-pod",
        1,
        &[
            "sh",
            "-c",
            "kubectl get pods -o name -v=6 2>&1; echo \"pods-exit=$?\"; \
             kubectl get secrets 2>&1; echo \"secrets-exit=$?\"; exec sleep 3600",
        ],
    );
    opts.service_account = Some("lister".into());
    let pod = ns.run_pod(opts).await?;
    let log = wait_for_log(cluster, &pod, |l| l.contains("secrets-exit="))?;

    // Listing pods worked, through the Service ClusterIP, in the pod's own namespace.
    ensure!(
        log.contains("pods-exit=0"),
        "kubectl get pods failed:\n{log}"
    );
    ensure!(
        log.contains("pod/kubectl-in-pod"),
        "own pod not listed:\n{log}"
    );
    let url = format!("https://10.96.0.1:443/api/v1/namespaces/{}/pods", ns.name);
    ensure!(
        log.contains(&url) && log.contains("200 OK"),
        "kubectl did not use the ClusterIP ({url}):\n{log}"
    );
    // Secrets are not granted: the API server refuses, naming the service account.
    ensure!(
        log.contains("secrets-exit=1"),
        "secrets were not refused:\n{log}"
    );
    let refusal = format!(
        "User \"system:serviceaccount:{}:lister\" cannot list resource \"secrets\"",
        ns.name
    );
    ensure!(log.contains(&refusal), "no RBAC refusal in:\n{log}");

    // The same identity, asked through exec: allowed to get pods, not to delete them.
    let get = pod.in_pod_kubectl(cluster, &["auth", "can-i", "get", "pods"]);
    assert_eq!(text(&get.stdout).trim(), "yes", "{}", text(&get.stderr));
    let delete = pod.in_pod_kubectl(cluster, &["auth", "can-i", "delete", "pods"]);
    assert_eq!(text(&delete.stdout).trim(), "no");
    let whoami = pod.in_pod_kubectl(
        cluster,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert_eq!(
        text(&whoami.stdout),
        format!("system:serviceaccount:{}:lister", ns.name),
        "{}",
        text(&whoami.stderr)
    );
    Ok(())
}

/// The pod's projected token is bound to the pod: TokenReview names the pod and its UID,
/// and the in-pod files are what kubelet writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_of_pod_token_names_the_pod() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("tokenreview").await?;
    ns.service_account("app").await?;
    let mut opts = PodOptions::new("token-owner", 2, &["sleep", "3600"]);
    opts.service_account = Some("app".into());
    let pod = ns.run_pod(opts).await?;

    let sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let token = pod.kubectl_exec(cluster, &[], &["cat", &format!("{sa_dir}/token")]);
    ensure!(
        token.status.success(),
        "reading token: {}",
        text(&token.stderr)
    );
    let token = text(&token.stdout);
    let namespace = pod.kubectl_exec(cluster, &[], &["cat", &format!("{sa_dir}/namespace")]);
    assert_eq!(text(&namespace.stdout), ns.name);
    let ca = pod.kubectl_exec(cluster, &[], &["cat", &format!("{sa_dir}/ca.crt")]);
    let cluster_ca = std::fs::read_to_string(cluster.layout.pki().join("ca.crt"))?;
    assert_eq!(text(&ca.stdout), cluster_ca, "ca.crt is the cluster CA");

    let status = ns.token_review(&token).await?;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.context("no user")?;
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:app", ns.name).as_str())
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec![pod.name.clone()])
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-uid"),
        Some(&vec![pod.uid.clone()])
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec![pod.node.name.clone()])
    );

    // A TokenRequest from the harness, bound to the same pod, reviews the same way.
    let minted = ns.token("app", &[], Some(&pod)).await?;
    let status = ns.token_review(&minted).await?;
    let extra = status.user.and_then(|u| u.extra).unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-uid"),
        Some(&vec![pod.uid.clone()])
    );
    Ok(())
}

/// Service-account issuer discovery answers as in a real cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_and_discovery_answer() -> Result<()> {
    let cluster = Cluster::shared();
    let discovery: serde_json::Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "get",
        "--raw",
        "/.well-known/openid-configuration",
    ])?)?;
    assert_eq!(
        discovery["issuer"],
        "https://kubernetes.default.svc.cluster.local"
    );
    assert!(discovery["jwks_uri"]
        .as_str()
        .is_some_and(|u| u.ends_with("/openid/v1/jwks")));
    let jwks: serde_json::Value =
        serde_json::from_str(&cluster.kubectl_ok(&["get", "--raw", "/openid/v1/jwks"])?)?;
    let keys = jwks["keys"].as_array().context("no keys")?;
    assert!(!keys.is_empty());
    assert_eq!(keys[0]["kty"], "RSA");
    assert_eq!(keys[0]["alg"], "RS256");
    // readyz and the `kubernetes` Service/EndpointSlice as a real cluster has them.
    assert_eq!(
        cluster.kubectl_ok(&["get", "--raw", "/readyz"])?.trim(),
        "ok"
    );
    let svc = cluster.kubectl_ok(&[
        "get",
        "service",
        "kubernetes",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    assert_eq!(svc, "10.96.0.1");
    let endpoints = cluster.kubectl_ok(&[
        "get",
        "endpointslice",
        "kubernetes",
        "-n",
        "default",
        "-o",
        "jsonpath={.endpoints[*].addresses[*]}:{.ports[0].port}",
    ])?;
    assert_eq!(endpoints, "10.77.0.10:6443");
    Ok(())
}

/// `kubectl exec` works over WebSocket (default) and SPDY, runs inside the pod's network
/// namespace and cgroup, passes stdin, and returns the command's exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_websocket_and_spdy() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("exec").await?;
    let pod = ns
        .run_pod(PodOptions::new("exec-target", 1, &["sleep", "3600"]))
        .await?;
    let cgroup = pod.pod_cgroup()?;
    let cgroup_rel = cgroup
        .strip_prefix(tollgate_tests::topology::cgroup2_mount()?)?
        .display()
        .to_string();
    for (transport, env) in [
        ("websocket", vec![]),
        ("spdy", vec![("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")]),
    ] {
        let out = pod.kubectl_exec(
            cluster,
            &env,
            &[
                "sh",
                "-c",
                "ip -4 -o addr show dev eth0; cat /proc/self/cgroup",
            ],
        );
        let stdout = text(&out.stdout);
        ensure!(
            out.status.success(),
            "{transport}: exec failed: {}",
            text(&out.stderr)
        );
        ensure!(
            stdout.contains(&format!("inet {}/32", pod.ip)),
            "{transport}: not in the pod's network namespace:\n{stdout}"
        );
        ensure!(
            stdout.contains(&format!("0::/{cgroup_rel}/")),
            "{transport}: not in the pod's cgroup {cgroup_rel}:\n{stdout}"
        );

        let failing = pod.kubectl_exec(cluster, &env, &["sh", "-c", "echo to-stderr >&2; exit 3"]);
        assert_eq!(failing.status.code(), Some(3), "{transport}: exit code");
        ensure!(text(&failing.stderr).contains("to-stderr"));

        let mut child = cluster
            .kubectl()
            .envs(env.iter().copied())
            .args(["exec", "-i", "-n", &ns.name, &pod.name, "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(format!("hello over {transport}\n").as_bytes())?;
        let out = child.wait_with_output()?;
        assert_eq!(text(&out.stdout), format!("hello over {transport}\n"));
    }
    Ok(())
}

/// `kubectl logs -f` streams lines as the container writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_new_lines() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("logs").await?;
    let pod = ns
        .run_pod(PodOptions::new(
            "ticker",
            2,
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 600 ]; do echo tick-$i; i=$((i+1)); sleep 0.1; done",
            ],
        ))
        .await?;
    let mut child = cluster
        .kubectl()
        .args(["logs", "-f", "-n", &ns.name, &pod.name])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The first line read fixes a starting point; following must deliver later lines
    // that did not exist when the request was made.
    let first = rx.recv_timeout(Duration::from_secs(30))?;
    let first_n: u32 = first.trim_start_matches("tick-").parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_n = first_n;
    while last_n < first_n + 20 {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))?;
        let n: u32 = line.trim_start_matches("tick-").parse()?;
        ensure!(n == last_n + 1, "lines out of order: {last_n} then {n}");
        last_n = n;
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

/// `kubectl port-forward` reaches a server listening on the pod's loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_reaches_pod_loopback() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("portfwd").await?;
    let dir = std::env::temp_dir().join(format!(
        "tg-portfwd-{}",
        tollgate_tests::topology::random_hex(4)
    ));
    std::fs::create_dir_all(&dir)?;
    let marker = format!(
        "served-from-pod-{}",
        tollgate_tests::topology::random_hex(4)
    );
    std::fs::write(dir.join("hello.txt"), &marker)?;
    let dir_str = dir.display().to_string();
    let pod = ns
        .run_pod(PodOptions::new(
            "web",
            1,
            &[
                "/usr/bin/python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "127.0.0.1",
                "--directory",
                &dir_str,
            ],
        ))
        .await?;
    // The server listens a moment after the pod runs (longer on a busy machine), and a
    // forwarded connection to a port nobody listens on yet ends kubectl's tunnel: wait
    // for the listener first (a connect on the pod's own loopback).
    let netns = Netns {
        name: pod.netns().context("the pod's network namespace")?,
    };
    wait_until(
        "the pod's server to listen",
        Duration::from_secs(30),
        || {
            netns
                .run_in(|| TcpStream::connect(("127.0.0.1", 8080)).is_ok())
                .unwrap_or(false)
        },
    )?;
    let result = (|| -> Result<()> {
        for (transport, websockets) in [("websocket", "true"), ("spdy", "false")] {
            forward_and_fetch(cluster, &ns.name, &pod.name, &marker, websockets)
                .with_context(|| format!("port-forward over {transport}"))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    drop(pod);
    result
}

/// Runs `kubectl port-forward` to the pod's port 8080 and fetches /hello.txt through it.
fn forward_and_fetch(
    cluster: &Cluster,
    namespace: &str,
    pod: &str,
    marker: &str,
    websockets: &str,
) -> Result<()> {
    {
        let mut child = cluster
            .kubectl()
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
            .args(["port-forward", "-n", namespace, &format!("pod/{pod}")])
            .args(["--address", "127.0.0.1", ":8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Keep draining: kubectl prints a line per connection and dies on a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        // "Forwarding from 127.0.0.1:PORT -> 8080"
        let port: u16 = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no local port in {line:?}"))?;
        let mut body = String::new();
        let fetched = wait_until(
            "an answer through port-forward",
            Duration::from_secs(30),
            || {
                let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
                    return false;
                };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                if conn
                    .write_all(b"GET /hello.txt HTTP/1.0\r\nHost: pod\r\n\r\n")
                    .is_err()
                {
                    return false;
                }
                body.clear();
                let _ = conn.read_to_string(&mut body);
                body.contains(marker)
            },
        );
        let _ = child.kill();
        let _ = child.wait();
        fetched.with_context(|| format!("last answer: {body:?}"))
    }
}

/// `kubectl attach -i` feeds the container's stdin and streams its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_feeds_stdin_and_streams_output() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("attach").await?;
    let mut opts = PodOptions::new(
        "echoer",
        2,
        &["sh", "-c", "while read line; do echo \"got-$line\"; done"],
    );
    opts.stdin = true;
    let pod = ns.run_pod(opts).await?;
    let mut child = cluster
        .kubectl()
        .args(["attach", "-i", "-n", &ns.name, &pod.name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Attach only shows output from the moment it attaches: write until an answer comes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered = false;
    while !answered && Instant::now() < deadline {
        stdin.write_all(b"ping\n")?;
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            if line == "got-ping" {
                answered = true;
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    ensure!(answered, "no answer through kubectl attach");
    let log = cluster.kubectl_ok(&["logs", "-n", &ns.name, &pod.name])?;
    ensure!(log.contains("got-ping"), "container log: {log}");
    drop(pod);
    Ok(())
}

/// Each QoS class on each cgroup driver: the pod's process runs in kubelet's cgroup for
/// it, its status is what kubelet reports, and deleting the pod removes the process, the
/// network namespace and the cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_sandbox_for_each_driver_and_qos() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("sandbox").await?;
    let pods_api: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let mut seen_drivers = Vec::new();
    for node in [1u8, 2] {
        for qos in QosClass::ALL {
            let name = format!("sb-n{node}-{}", format!("{qos:?}").to_lowercase());
            let mut opts = PodOptions::new(&name, node, &["sleep", "3600"]);
            opts.qos = qos;
            let pod = ns.run_pod(opts).await?;
            seen_drivers.push(pod.node.driver);

            // Status as kubelet reports it.
            let status = pods_api.get(&name).await?.status.unwrap_or_default();
            assert_eq!(
                status.qos_class.as_deref(),
                Some(format!("{qos:?}").as_str())
            );
            assert_eq!(
                status.host_ip.as_deref(),
                Some(pod.node.ip.to_string().as_str())
            );
            assert!(pod.ip.starts_with(&format!("10.244.{node}.")), "{}", pod.ip);
            let ready = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            assert!(ready, "pod {name} not Ready");

            // The process lives in the container cgroup below the pod cgroup.
            let pod_cgroup = pod.pod_cgroup()?;
            ensure!(
                pod_cgroup.is_dir(),
                "no pod cgroup {}",
                pod_cgroup.display()
            );
            let container = std::fs::read_dir(&pod_cgroup)?
                .filter_map(|e| e.ok())
                .find(|e| e.path().is_dir())
                .context("no container cgroup")?
                .path();
            let expected_prefix = match pod.node.driver {
                CgroupDriver::Systemd => "cri-containerd-",
                CgroupDriver::Cgroupfs => "",
            };
            ensure!(container
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(expected_prefix)));
            let pids = std::fs::read_to_string(container.join("cgroup.procs"))?;
            let pid: i32 = pids
                .lines()
                .next()
                .context("no process in the container cgroup")?
                .parse()?;
            let netns = pod.netns().context("no pod network namespace")?;
            // A host command placed in the pod (harness helper) sees the pod's address.
            let out = pod.command("ip")?.args(["-4", "-o", "addr"]).output()?;
            ensure!(text(&out.stdout).contains(&format!("inet {}/32", pod.ip)));

            ns.delete_pod(&name).await?;
            wait_until("the pod's sandbox to go", Duration::from_secs(30), || {
                !pod_cgroup.exists()
                    && !std::path::Path::new("/run/netns").join(&netns).exists()
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
            .with_context(|| format!("pod {name}: cgroup, netns {netns} or pid {pid} left"))?;
        }
    }
    ensure!(seen_drivers.contains(&CgroupDriver::Systemd));
    ensure!(seen_drivers.contains(&CgroupDriver::Cgroupfs));
    Ok(())
}

/// A projected service-account volume reading its CA bundle from ConfigMap `configmap`,
/// mounted where in-cluster clients look (what a webhook that swaps the CA's source
/// leaves in a pod).
fn custom_service_account_volume(opts: &mut PodOptions, configmap: &str) {
    opts.automount_service_account_token = Some(false);
    opts.volumes = Some(vec![Volume {
        name: "sa-custom".into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o644),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3607),
                        audience: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: configmap.into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            mode: None,
                        }]),
                        optional: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".into()),
                                field_path: "metadata.namespace".into(),
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }]);
    opts.volume_mounts = Some(vec![VolumeMount {
        name: "sa-custom".into(),
        mount_path: SERVICE_ACCOUNT_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }]);
}

fn ca_configmap(name: &str, bundle: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("ca.crt".to_owned(), bundle.to_owned())])),
        ..Default::default()
    }
}

/// What the pod itself reads at `path` (kubectl exec cat, through its mount namespace).
fn in_pod_cat(cluster: &Cluster, pod: &RunningPod, path: &str) -> Result<String> {
    let out = pod.kubectl_exec(cluster, &[], &["cat", path]);
    ensure!(
        out.status.success(),
        "cat {path} in {}: {}",
        pod.name,
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// The service-account files are what kubelet mounts from the pod's projected volume:
/// ca.crt from the ConfigMap the volume names (kube-root-ca.crt, published by the
/// controller manager, unless the pod says otherwise), the namespace from the downward
/// API; a ConfigMap update reaches the running pod; a pod whose ConfigMap is missing
/// waits (FailedMount) and runs once it exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projected_service_account_volume_as_kubelet_mounts_it() -> Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.namespace("projected").await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let cluster_ca = std::fs::read_to_string(cluster.layout.pki().join("ca.crt"))?;

    // (a) The ServiceAccount admission plugin's volume: kube-root-ca.crt's ca.crt (the
    // cluster CA) and the namespace, in the files the pod reads.
    let pod = ns
        .run_pod(PodOptions::new("default-sa", 1, &["sleep", "3600"]))
        .await?;
    let volume = pod.service_account_volume.clone().unwrap_or_default();
    ensure!(
        volume.starts_with("kube-api-access-"),
        "the admission plugin's volume is mounted, not {volume:?}"
    );
    let root = configmaps.get("kube-root-ca.crt").await?;
    let root_ca = root
        .data
        .unwrap_or_default()
        .remove("ca.crt")
        .context("kube-root-ca.crt without ca.crt")?;
    assert_eq!(
        root_ca, cluster_ca,
        "the publisher publishes the cluster CA"
    );
    let mounted = std::fs::read_to_string(pod.service_account_file("ca.crt")?)?;
    assert_eq!(mounted, root_ca, "ca.crt is kube-root-ca.crt's");
    assert_eq!(
        std::fs::read_to_string(pod.service_account_file("namespace")?)?,
        ns.name
    );
    assert_eq!(
        in_pod_cat(cluster, &pod, &format!("{SERVICE_ACCOUNT_DIR}/ca.crt"))?,
        root_ca,
        "the pod reads the same file"
    );
    // Laid out by the atomic writer: ca.crt -> ..data/ca.crt.
    let link = std::fs::read_link(pod.service_account_file("ca.crt")?)?;
    assert_eq!(link, std::path::Path::new("..data/ca.crt"));

    // (b) A pod whose projected volume takes the CA from ConfigMap custom-ca sees that
    // bundle, and its in-cluster kubectl works with it and the projected token.
    configmaps
        .create(
            &PostParams::default(),
            &ca_configmap("custom-ca", &cluster_ca),
        )
        .await?;
    let mut opts = PodOptions::new("custom-ca", 2, &["sleep", "3600"]);
    custom_service_account_volume(&mut opts, "custom-ca");
    let custom = ns.run_pod(opts).await?;
    assert_eq!(custom.service_account_volume.as_deref(), Some("sa-custom"));
    let ca_file = custom.service_account_file("ca.crt")?;
    assert_eq!(std::fs::read_to_string(&ca_file)?, cluster_ca);
    let whoami = custom.in_pod_kubectl(
        cluster,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert_eq!(
        text(&whoami.stdout),
        format!("system:serviceaccount:{}:default", ns.name),
        "{}",
        text(&whoami.stderr)
    );

    // (c) A CA rotation adds a second certificate to the bundle: the running pod's file
    // follows (simkubelet re-projects every 2 s).
    let second = std::fs::read_to_string(cluster.layout.pki().join("apiserver.crt"))?;
    let rotated = format!("{cluster_ca}{second}");
    configmaps
        .replace(
            "custom-ca",
            &PostParams::default(),
            &ca_configmap("custom-ca", &rotated),
        )
        .await?;
    wait_until(
        "the rotated bundle in the pod's volume",
        Duration::from_secs(30),
        || std::fs::read_to_string(&ca_file).is_ok_and(|now| now == rotated),
    )?;
    assert_eq!(
        in_pod_cat(cluster, &custom, &format!("{SERVICE_ACCOUNT_DIR}/ca.crt"))?,
        rotated,
        "the pod reads the rotated bundle"
    );

    // (d) A pod naming a ConfigMap that does not exist yet is not started: Pending,
    // ContainerCreating, a FailedMount event. Once the ConfigMap exists, it runs.
    let mut opts = PodOptions::new("late-ca", 1, &["sleep", "3600"]);
    custom_service_account_volume(&mut opts, "late-ca");
    let created = ns.create_pod(&opts).await?;
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed_mount = loop {
        let listed = events
            .list(&ListParams::default().fields("involvedObject.name=late-ca"))
            .await?;
        // The one about the ConfigMap: a FailedMount for the token may come first (the
        // Node authorizer refuses a TokenRequest for a pod it has not seen yet).
        if let Some(event) = listed.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("FailedMount")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("configmap"))
        }) {
            break event;
        }
        ensure!(
            Instant::now() < deadline,
            "no FailedMount event about the ConfigMap for pod late-ca after 30s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(failed_mount.type_.as_deref(), Some("Warning"));
    let message = failed_mount.message.unwrap_or_default();
    ensure!(
        message.contains("MountVolume.SetUp failed for volume \"sa-custom\"")
            && message.contains("configmap \"late-ca\" not found"),
        "FailedMount says why: {message}"
    );
    let status = pods.get("late-ca").await?.status.unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Pending"), "{status:?}");
    let waiting = status
        .container_statuses
        .unwrap_or_default()
        .first()
        .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
    assert_eq!(waiting.as_deref(), Some("ContainerCreating"));
    ensure!(pod_netns_count(cluster, "late-ca") == 0, "no sandbox yet");

    configmaps
        .create(
            &PostParams::default(),
            &ca_configmap("late-ca", &cluster_ca),
        )
        .await?;
    let late = ns
        .wait_running(&opts, &created, Duration::from_secs(60))
        .await?;
    assert_eq!(
        std::fs::read_to_string(late.service_account_file("ca.crt")?)?,
        cluster_ca
    );
    Ok(())
}

/// How many network namespaces of the cluster's nodes belong to pods named `pod`.
fn pod_netns_count(cluster: &Cluster, pod: &str) -> usize {
    cluster
        .nodes()
        .iter()
        .map(|node| {
            let prefix = format!("{}-p", node.netns);
            std::fs::read_dir("/run/netns")
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| n.starts_with(&prefix) && n.ends_with(&format!("-{pod}")))
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}
