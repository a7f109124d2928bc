//! What cluster-backed tests use: the shared control plane, an admin client, namespaces
//! that clean up after themselves, service accounts, RBAC, bound tokens and pods on the
//! simulated nodes.
//!
//! Test code runs in the machine's root namespace, so every client here talks to the API
//! server through the loopback forwarder (the admin kubeconfig's `https://127.0.0.1:…`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, Namespace, Pod, PodSpec, ResourceRequirements, ServiceAccount, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

use super::controlplane::{self, Layout, NodeInfo};
use crate::topology::{pod_cgroup_relpath, Netns, QosClass};

/// The running control plane (started or reused once per test process).
#[derive(Debug)]
pub struct Cluster {
    pub layout: Layout,
    /// The built binaries, including the tools the suites run in pods (`tgclient`).
    pub binaries: controlplane::Binaries,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// Label on test namespaces: the pid of the test process that owns them.
const TEST_PID_LABEL: &str = "tollgate.dev/test-pid";

impl Cluster {
    /// Starts the control plane, or reuses the running one: the code path of
    /// `cargo xtask cluster up`. Panics (failing the test) when it cannot.
    pub fn shared() -> &'static Cluster {
        SHARED.get_or_init(|| {
            crate::require_root();
            let layout = Layout::from_env();
            match controlplane::up(&layout) {
                Ok(report) => {
                    eprintln!(
                        "cluster: {} in {:.1}s",
                        if report.reused { "reused" } else { "started" },
                        report.elapsed.as_secs_f64()
                    );
                    let cluster = Cluster {
                        layout,
                        binaries: report.binaries,
                    };
                    cluster.remove_stale_namespaces();
                    cluster
                }
                Err(err) => panic!("starting the test control plane: {err:#}"),
            }
        })
    }

    /// Deletes the pods and namespaces of test processes that died without cleaning up
    /// (killed, or aborted before their `TestNamespace` was dropped).
    fn remove_stale_namespaces(&self) {
        let Ok(listing) = self.kubectl_ok(&[
            "get",
            "namespaces",
            "-l",
            TEST_PID_LABEL,
            "-o",
            &format!(
                "jsonpath={{range .items[*]}}{{.metadata.name}} {{.metadata.labels.{}}}{{\"\\n\"}}{{end}}",
                TEST_PID_LABEL.replace('.', "\\.")
            ),
        ]) else {
            return;
        };
        for line in listing.lines() {
            let Some((name, pid)) = line.split_once(' ') else {
                continue;
            };
            let alive = pid
                .parse::<u32>()
                .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = self.kubectl_ok(&["delete", "pods", "--all", "-n", name, "--wait=false"]);
                self.remove_namespace(name);
            }
        }
    }

    /// Removes a test namespace for good. The controller manager runs without its
    /// namespace controller, so nobody empties a deleted namespace and lifts its
    /// `kubernetes` finalizer, and it would stay Terminating for ever (and every later
    /// test process would try again): the namespace is deleted (Terminating: the
    /// root-ca-cert-publisher can no longer recreate `kube-root-ca.crt` in it), its
    /// objects are deleted here, then the finalizer is lifted through `/finalize`.
    pub fn remove_namespace(&self, name: &str) {
        let _ = self
            .kubectl()
            .args(["delete", "namespace", name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let kinds = "configmaps,secrets,serviceaccounts,roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,deployments.apps";
        let _ = self
            .kubectl()
            .args(["delete", kinds, "--all", "-n", name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Tollgate's own CRs, when the CRD is installed.
        let _ = self
            .kubectl()
            .args([
                "delete",
                "approvalrequests.tollgate.dev",
                "--all",
                "-n",
                name,
                "--wait=false",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}},"spec":{{"finalizers":[]}}}}"#
        );
        if let Ok(mut child) = self
            .kubectl()
            .args([
                "replace",
                "--raw",
                &format!("/api/v1/namespaces/{name}/finalize"),
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(body.as_bytes());
            }
            let _ = child.wait();
        }
    }

    /// `kubectl apply -f -` (admin) of a YAML document; kubectl's output.
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args(["apply", "-f", "-"])
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
            .context("writing the manifest")?;
        let out = child.wait_with_output().context("kubectl apply")?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed: {}\n{yaml}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.layout.admin_kubeconfig()
    }

    /// An admin (system:masters) client. Make one per test: a client belongs to the
    /// tokio runtime it was made on.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// `kubectl --kubeconfig <admin>`, ready for arguments.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs admin kubectl and returns its output, failing on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        controlplane::nodes()
    }

    /// A fresh namespace `<prefix>-<random>` with its `default` ServiceAccount (made
    /// here: the controller manager runs no serviceaccount controller). Removed, with
    /// its pods, when dropped.
    pub async fn namespace(&'static self, prefix: &str) -> Result<TestNamespace> {
        let name = format!("{prefix}-{}", &crate::topology::random_hex(3));
        let client = self.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(BTreeMap::from([(
                            TEST_PID_LABEL.to_owned(),
                            std::process::id().to_string(),
                        )])),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let ns = TestNamespace {
            name,
            cluster: self,
            client,
        };
        ns.service_account("default").await?;
        Ok(ns)
    }
}

/// Options for a pod on a simulated node.
#[derive(Debug, Clone)]
pub struct PodOptions {
    pub name: String,
    /// Node number (1-based): node 1 uses the systemd cgroup driver, node 2 cgroupfs.
    pub node: u8,
    /// The host command the container runs (spec.containers[0].command).
    pub command: Vec<String>,
    pub service_account: Option<String>,
    pub qos: QosClass,
    pub env: Vec<(String, String)>,
    /// Keep the container's stdin open (spec.containers[0].stdin), for `kubectl attach -i`.
    pub stdin: bool,
    /// Pod labels (e.g. `tollgate.dev/enforce: "true"`).
    pub labels: BTreeMap<String, String>,
    /// spec.volumes, when set (by default the ServiceAccount admission plugin adds the
    /// projected `kube-api-access-…` volume and its mount).
    pub volumes: Option<Vec<Volume>>,
    /// spec.containers[0].volumeMounts, when set.
    pub volume_mounts: Option<Vec<VolumeMount>>,
    /// spec.automountServiceAccountToken, when set (`false`: no `kube-api-access-…`
    /// volume is added; a pod that wants the files then brings its own volume).
    pub automount_service_account_token: Option<bool>,
}

impl PodOptions {
    pub fn new(name: &str, node: u8, command: &[&str]) -> PodOptions {
        PodOptions {
            name: name.to_owned(),
            node,
            command: command.iter().map(|s| s.to_string()).collect(),
            service_account: None,
            qos: QosClass::BestEffort,
            env: Vec::new(),
            stdin: false,
            labels: BTreeMap::new(),
            volumes: None,
            volume_mounts: None,
            automount_service_account_token: None,
        }
    }
}

/// A namespace a test owns.
pub struct TestNamespace {
    pub name: String,
    pub cluster: &'static Cluster,
    pub client: Client,
}

impl TestNamespace {
    pub async fn service_account(&self, name: &str) -> Result<ServiceAccount> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.name);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(sa) => Ok(sa),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(name).await?),
            Err(e) => Err(e).with_context(|| format!("creating service account {name}")),
        }
    }

    /// A Role with `rules` bound to service account `sa` in this namespace.
    pub async fn grant(&self, sa: &str, role: &str, rules: Vec<PolicyRule>) -> Result<()> {
        let roles: Api<Role> = Api::namespaced(self.client.clone(), &self.name);
        roles
            .create(
                &PostParams::default(),
                &Role {
                    metadata: ObjectMeta {
                        name: Some(role.to_owned()),
                        ..Default::default()
                    },
                    rules: Some(rules),
                },
            )
            .await
            .with_context(|| format!("creating role {role}"))?;
        let bindings: Api<RoleBinding> = Api::namespaced(self.client.clone(), &self.name);
        bindings
            .create(
                &PostParams::default(),
                &RoleBinding {
                    metadata: ObjectMeta {
                        name: Some(format!("{role}-{sa}")),
                        ..Default::default()
                    },
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "Role".into(),
                        name: role.into(),
                    },
                    subjects: Some(vec![Subject {
                        kind: "ServiceAccount".into(),
                        name: sa.into(),
                        namespace: Some(self.name.clone()),
                        ..Default::default()
                    }]),
                },
            )
            .await
            .with_context(|| format!("binding role {role} to {sa}"))?;
        Ok(())
    }

    /// A token for service account `sa` (TokenRequest), optionally bound to a pod.
    pub async fn token(
        &self,
        sa: &str,
        audiences: &[&str],
        bound_pod: Option<&RunningPod>,
    ) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.name);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                expiration_seconds: Some(3600),
                bound_object_ref: bound_pod.map(|p| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(p.name.clone()),
                    uid: Some(p.uid.clone()),
                }),
            },
            ..Default::default()
        };
        let response: TokenRequest = api
            .create_subresource("token", sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {sa}"))?;
        Ok(response.status.map(|s| s.token).unwrap_or_default())
    }

    /// Creates a pod bound to a simulated node and waits until it runs.
    pub async fn run_pod(&self, opts: PodOptions) -> Result<RunningPod> {
        let created = self.create_pod(&opts).await?;
        self.wait_running(&opts, &created, Duration::from_secs(60))
            .await
    }

    /// Creates a pod bound to a simulated node without waiting for it; the Pod as the
    /// API server stored it (after admission: the service-account volume is there).
    pub async fn create_pod(&self, opts: &PodOptions) -> Result<Pod> {
        let node = node_of(opts)?;
        let resources = match opts.qos {
            QosClass::BestEffort => None,
            QosClass::Burstable => Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("cpu".to_owned(), Quantity("50m".into()))])),
                ..Default::default()
            }),
            QosClass::Guaranteed => {
                let amounts = BTreeMap::from([
                    ("cpu".to_owned(), Quantity("100m".into())),
                    ("memory".to_owned(), Quantity("64Mi".into())),
                ]);
                Some(ResourceRequirements {
                    requests: Some(amounts.clone()),
                    limits: Some(amounts),
                    ..Default::default()
                })
            }
        };
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(opts.name.clone()),
                labels: (!opts.labels.is_empty()).then(|| opts.labels.clone()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.name.clone()),
                service_account_name: opts.service_account.clone(),
                automount_service_account_token: opts.automount_service_account_token,
                volumes: opts.volumes.clone(),
                restart_policy: Some("Never".into()),
                termination_grace_period_seconds: Some(1),
                containers: vec![Container {
                    name: "main".into(),
                    image: Some("tollgate.invalid/simulated:host".into()),
                    command: Some(opts.command.clone()),
                    env: Some(
                        opts.env
                            .iter()
                            .map(|(k, v)| EnvVar {
                                name: k.clone(),
                                value: Some(v.clone()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    resources,
                    stdin: Some(opts.stdin),
                    volume_mounts: opts.volume_mounts.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {}", opts.name))
    }

    /// Waits until the pod `create_pod` made is Running (fails when it ends first or
    /// `timeout` passes).
    pub async fn wait_running(
        &self,
        opts: &PodOptions,
        created: &Pod,
        timeout: Duration,
    ) -> Result<RunningPod> {
        let node = node_of(opts)?;
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let spec = created.spec.clone().unwrap_or_default();
        // The volume mounted where in-cluster clients look for the service-account files.
        let service_account_volume = spec
            .containers
            .first()
            .and_then(|c| c.volume_mounts.as_ref())
            .and_then(|mounts| {
                mounts
                    .iter()
                    .find(|m| m.mount_path == SERVICE_ACCOUNT_DIR)
                    .map(|m| m.name.clone())
            });
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
        let started = Instant::now();
        loop {
            let pod = pods.get(&opts.name).await?;
            let status = pod.status.unwrap_or_default();
            match status.phase.as_deref() {
                Some("Running") => {
                    return Ok(RunningPod {
                        name: opts.name.clone(),
                        namespace: self.name.clone(),
                        uid,
                        ip: status.pod_ip.unwrap_or_default(),
                        node,
                        qos: opts.qos,
                        service_account_volume,
                    })
                }
                Some("Failed") | Some("Succeeded") => bail!(
                    "pod {} ended before it was seen running: {:?} {:?}",
                    opts.name,
                    status.message,
                    status.container_statuses
                ),
                _ => {}
            }
            if started.elapsed() > timeout {
                bail!(
                    "pod {} not running after {timeout:?}: {:?}",
                    opts.name,
                    status
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes a pod (as `kubectl delete` does) and waits until the object is gone.
    pub async fn delete_pod(&self, name: &str) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.name);
        pods.delete(name, &Default::default()).await?;
        let started = Instant::now();
        loop {
            match pods.get_opt(name).await? {
                None => return Ok(()),
                Some(_) if started.elapsed() > Duration::from_secs(60) => {
                    bail!("pod {name} still exists 60s after delete")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Reviews a token as the API server sees it (TokenReview).
    pub async fn token_review(&self, token: &str) -> Result<TokenReviewStatus> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = api
            .create(
                &PostParams::default(),
                &TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.to_owned()),
                        audiences: None,
                    },
                    ..Default::default()
                },
            )
            .await?;
        review.status.context("TokenReview without status")
    }
}

impl Drop for TestNamespace {
    /// Deletes the pods (waiting, so their sandboxes are gone), then the namespace with
    /// what is in it (see [`Cluster::remove_namespace`]).
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "pods", "--all", "-n", &self.name, "--timeout=60s"])
            .stdout(Stdio::null())
            .status();
        self.cluster.remove_namespace(&self.name);
    }
}

/// Where in-cluster clients find the service-account files (token, ca.crt, namespace).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn node_of(opts: &PodOptions) -> Result<NodeInfo> {
    controlplane::nodes()
        .into_iter()
        .find(|n| n.index == opts.node)
        .ok_or_else(|| anyhow!("no node {}", opts.node))
}

/// A pod running on a simulated node.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub ip: String,
    pub node: NodeInfo,
    pub qos: QosClass,
    /// The volume containers[0] mounts at [`SERVICE_ACCOUNT_DIR`], as admission left
    /// the pod (`kube-api-access-…`, or the pod's own), if any.
    pub service_account_volume: Option<String>,
}

impl RunningPod {
    /// The pod-level cgroup, as kubelet lays it out for the node's driver.
    pub fn pod_cgroup(&self) -> Result<PathBuf> {
        Ok(
            controlplane::node_cgroup_root(&self.node)?.join(pod_cgroup_relpath(
                self.node.driver,
                self.qos,
                &self.uid,
            )),
        )
    }

    /// The host path of file `name` (`token`, `ca.crt`, `namespace`) of the volume
    /// mounted at [`SERVICE_ACCOUNT_DIR`]: simkubelet's copy of kubelet's
    /// `pods/<uid>/volumes/<plugin>/<volume>/` in the node's state directory, the very
    /// directory bind-mounted into the pod. The path is the user-visible symlink into
    /// `..data`, so reading it gives what the pod reads now, also after an update.
    pub fn service_account_file(&self, name: &str) -> Result<PathBuf> {
        let volume = self.service_account_volume.as_deref().with_context(|| {
            format!(
                "pod {} mounts no volume at {SERVICE_ACCOUNT_DIR}",
                self.name
            )
        })?;
        let volumes = Layout::from_env()
            .node_dir(&self.node.name)
            .join("pods")
            .join(&self.uid)
            .join("volumes");
        // volumes/<plugin>/<volume>: the plugin directory depends on the volume's type
        // (kubernetes.io~projected for the service-account volume).
        let dir = std::fs::read_dir(&volumes)
            .with_context(|| format!("listing {}", volumes.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join(volume))
            .find(|p| p.is_dir())
            .with_context(|| format!("no volume {volume} in {}", volumes.display()))?;
        let file = dir.join(name);
        ensure!(
            file.exists(),
            "volume {volume} of pod {} has no file {name}",
            self.name
        );
        Ok(file)
    }

    /// The container cgroup (`<pod cgroup>/cri-containerd-<id>.scope` or `<pod
    /// cgroup>/<id>`), where the pod's processes run.
    pub fn container_cgroup(&self) -> Result<PathBuf> {
        let pod_cgroup = self.pod_cgroup()?;
        std::fs::read_dir(&pod_cgroup)
            .with_context(|| format!("listing {}", pod_cgroup.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.is_dir())
            .with_context(|| format!("no container cgroup in {}", pod_cgroup.display()))
    }

    /// A host command that runs inside the pod: its network namespace and container
    /// cgroup (not its mount namespace), without going through the API server.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let netns = Netns {
            name: self.netns().context("the pod has no network namespace")?,
        };
        netns.command_in_cgroup(&self.container_cgroup()?, program)
    }

    /// The pod's network namespace name (`tgc-n<k>-p<n>-<pod>`), when it exists.
    pub fn netns(&self) -> Option<String> {
        let short: String = self.name.chars().take(30).collect();
        let prefix = format!("{}-p", self.node.netns);
        std::fs::read_dir("/run/netns")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with(&prefix) && n.ends_with(&format!("-{short}")))
    }

    /// `kubectl exec` (admin kubeconfig) into the pod, with extra environment for
    /// kubectl (e.g. `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`).
    pub fn kubectl_exec(&self, cluster: &Cluster, env: &[(&str, &str)], cmd: &[&str]) -> Output {
        let mut c = cluster.kubectl();
        c.args(["exec", "-n", &self.namespace, &self.name, "--"])
            .args(cmd);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("running kubectl")
    }
}

impl RunningPod {
    /// Runs `kubectl ARGS` inside the pod (through `kubectl exec`), with no flags but the
    /// in-pod defaults: the service-account files and KUBERNETES_SERVICE_HOST/PORT.
    pub fn in_pod_kubectl(&self, cluster: &Cluster, args: &[&str]) -> Output {
        let mut cmd = vec!["kubectl"];
        cmd.extend_from_slice(args);
        self.kubectl_exec(cluster, &[], &cmd)
    }
}

/// A long-running `kubectl exec` (a watch, `logs -f`) whose output a test reads line by
/// line (standard error lines start with `stderr: `); killed when dropped.
pub struct StreamingExec {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl StreamingExec {
    /// Runs `action` once, then reads lines until one contains `needle` (true) or
    /// `timeout` passes (false).
    pub fn wait_for_line(
        &mut self,
        action: impl FnOnce(),
        needle: &str,
        timeout: Duration,
    ) -> bool {
        action();
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }
}

impl StreamingExec {
    /// Waits up to `timeout` for the command to end; its exit status, or None while it
    /// still runs.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StreamingExec {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RunningPod {
    /// Starts `kubectl exec` (admin kubeconfig) of `cmd` in the pod and streams its
    /// standard output.
    pub fn kubectl_exec_child(&self, cluster: &Cluster, cmd: &[&str]) -> Result<StreamingExec> {
        let mut child = cluster
            .kubectl()
            .args(["exec", "-n", &self.namespace, &self.name, "--"])
            .args(cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl exec")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let lines = line_channel(stdout, stderr);
        Ok(StreamingExec {
            child,
            lines,
            seen: Vec::new(),
        })
    }
}

/// The lines a child process writes, as they come: standard output as is, standard
/// error prefixed `stderr: ` (so a failure shows why). The reader threads end with the
/// process (end of file on its pipes) or when the receiver is dropped.
pub fn line_channel(
    stdout: impl std::io::Read + Send + 'static,
    stderr: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, lines) = std::sync::mpsc::channel();
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx_err.send(format!("stderr: {line}")).is_err() {
                break;
            }
        }
    });
    lines
}

/// Polls `check` every 100ms until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}
