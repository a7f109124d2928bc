//! The local control plane: etcd, kube-apiserver, kube-controller-manager (only its
//! root-ca-cert-publisher loop) and one simulated kubelet per node, built from their Go
//! modules (tests/go) and started inside a long-lived topology.
//!
//! `up` is the one code path for `cargo xtask cluster up` and for `Cluster::shared()` in
//! tests: build what the binary cache lacks, reuse a healthy cluster, otherwise start one
//! from scratch and wait for `/readyz`.
//!
//! Where things live:
//! - binaries: `${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/bin/<name>-<version>-<srchash>`
//! - state: `${TOLLGATE_STATE:-/run/tollgate/cluster}`: `pki/`, `etcd/`, `logs/`,
//!   `pids/`, `nodes/<node>/` (simkubelet: `pods/<uid>/` with the container log and
//!   `volumes/<plugin>/<volume>/`, laid out as kubelet's), `admin.kubeconfig`,
//!   `controller-manager.kubeconfig`.
//!
//! Network safety: etcd listens on 127.0.0.1 and the API server on 10.77.0.10 inside
//! the control-plane namespace; the machine reaches the API server only through
//! `nsforward`, which listens on 127.0.0.1 in the root namespace and dials from inside
//! the control-plane namespace. Nothing here sends a packet from the root namespace to a
//! topology address.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::topology::{
    self, CgroupDriver, Topology, API_SERVER_IP, API_SERVER_PORT, CLUSTER_IP, CLUSTER_PORT,
    SERVICE_CIDR,
};

/// The Kubernetes release the API server and simkubelet are built from.
pub const KUBERNETES_VERSION: &str = "v1.34.4";
/// The etcd release (the one Kubernetes 1.34 is tested with).
pub const ETCD_VERSION: &str = "v3.6.4";
/// The fixed topology id of the shared cluster.
pub const CLUSTER_ID: &str = "tgc";
/// How many simulated nodes `up` starts.
pub const NODES: u8 = 2;
/// The loopback port where the API server is reachable from the root namespace.
pub const DEFAULT_API_PORT: u16 = 16443;

/// Where the cluster's files are and how to reach it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub cache_bin: PathBuf,
    pub state: PathBuf,
    pub api_port: u16,
}

impl Layout {
    pub fn from_env() -> Layout {
        let cache = std::env::var_os("TOLLGATE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
                PathBuf::from(home).join(".cache/tollgate")
            });
        let state = std::env::var_os("TOLLGATE_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/tollgate/cluster"));
        let api_port = std::env::var("TOLLGATE_API_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_API_PORT);
        Layout {
            cache_bin: cache.join("bin"),
            state,
            api_port,
        }
    }

    pub fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }
    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }
    fn pids(&self) -> PathBuf {
        self.state.join("pids")
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state.join("admin.kubeconfig")
    }
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.state.join("nodes").join(node)
    }
}

/// One simulated node as the control plane starts it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub index: u8,
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    pub driver: CgroupDriver,
    pub netns: String,
}

impl NodeInfo {
    /// The node's network namespace (its host network), e.g. to run a node agent there.
    pub fn netns_handle(&self) -> topology::Netns {
        topology::Netns {
            name: self.netns.clone(),
        }
    }
}

/// The node layout `up` makes: node k is `tgc-node<k>` at 10.77.0.(20+k); odd nodes use
/// the systemd cgroup driver, even nodes cgroupfs, so both layouts are always exercised.
pub fn nodes() -> Vec<NodeInfo> {
    (1..=NODES)
        .map(|index| NodeInfo {
            index,
            name: format!("{CLUSTER_ID}-node{index}"),
            ip: std::net::Ipv4Addr::new(10, 77, 0, 20 + index),
            driver: if index % 2 == 1 {
                CgroupDriver::Systemd
            } else {
                CgroupDriver::Cgroupfs
            },
            netns: format!("{CLUSTER_ID}-n{index}"),
        })
        .collect()
}

/// The cluster's cgroup subtree. Host processes of the harness (e.g. a test's agent)
/// get cgroups here, outside every node's root.
pub fn cgroup_root() -> Result<PathBuf> {
    Ok(topology::cgroup2_mount()?.join(CLUSTER_ID))
}

/// A node's own cgroup root, where its simkubelet lays out `kubepods`: as on real
/// machines, each node's pods live under a root of their own, so an agent attached to
/// one node's root never touches another node's pods.
pub fn node_cgroup_root(node: &NodeInfo) -> Result<PathBuf> {
    Ok(cgroup_root()?.join(&node.name))
}

/// Bumped when the layout `start` makes changes, so `up` restarts a cluster made by an
/// older layout instead of reusing it. (2: per-node cgroup roots; 3: the controller
/// manager's root-ca-cert-publisher, projected volumes re-synced every 2 s.)
const LAYOUT_VERSION: u32 = 3;

/// How often simkubelet projects a running pod's volumes again (kubelet's
/// `--sync-frequency`, 1 min by default): short, so a test sees a changed ConfigMap in
/// the pod within seconds.
pub const SYNC_FREQUENCY: &str = "2s";

/// The built binaries `up` runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    /// kube-controller-manager, run with the root-ca-cert-publisher controller only.
    pub controller_manager: PathBuf,
    pub simkubelet: PathBuf,
    pub nsforward: PathBuf,
    /// A client-go program the suites run inside pods (what a Go controller sees).
    pub tgclient: PathBuf,
}

impl Binaries {
    /// What the running cluster is made of (the tools the suites run are not part of
    /// it: a new build of one must not restart the cluster).
    fn running(&self) -> String {
        format!(
            "Binaries {{ etcd: {:?}, apiserver: {:?}, controller_manager: {:?}, simkubelet: {:?}, nsforward: {:?} }}",
            self.etcd, self.apiserver, self.controller_manager, self.simkubelet, self.nsforward
        )
    }
}

fn go_dir() -> PathBuf {
    // The harness crate is tests/harness; the Go modules are tests/go.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../go")
}

/// A short hash of the files a binary is built from, so an edit rebuilds it.
fn source_hash(files: &[PathBuf]) -> Result<String> {
    // FNV-1a over names and contents: stable, dependency-free, enough for a cache key.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    let base = go_dir();
    for file in files {
        // Relative names: the same sources give the same key in any clone.
        eat(file
            .strip_prefix(&base)
            .unwrap_or(file)
            .to_string_lossy()
            .as_bytes());
        eat(&fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    }
    Ok(format!("{:08x}", hash as u32))
}

fn go_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "go"))
        .collect();
    files.sort();
    Ok(files)
}

/// Builds whatever the cache lacks and returns the binaries. Prints what it did.
pub fn ensure_binaries(layout: &Layout) -> Result<Binaries> {
    let go = go_dir();
    let kube = go.join("kube");
    let etcd = go.join("etcd");
    fs::create_dir_all(&layout.cache_bin)?;
    let kube_mod = vec![kube.join("go.mod"), kube.join("go.sum")];
    let with = |mut base: Vec<PathBuf>, dir: &Path| -> Result<Vec<PathBuf>> {
        base.extend(go_files(dir)?);
        Ok(base)
    };
    let version_ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={v} \
         -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor=34 \
         -X k8s.io/component-base/version.gitTreeState=clean \
         -X k8s.io/component-base/version.gitCommit=0000000000000000000000000000000000000000 \
         -X k8s.io/component-base/version.buildDate=2026-01-01T00:00:00Z",
        v = KUBERNETES_VERSION
    );
    // (name, version, package, source files, ldflags, module directory)
    type Target<'a> = (&'a str, &'a str, PathBuf, Vec<PathBuf>, String, &'a Path);
    let targets: [Target; 6] = [
        (
            "etcd",
            ETCD_VERSION,
            PathBuf::from("."),
            with(vec![etcd.join("go.mod"), etcd.join("go.sum")], &etcd)?,
            "-s -w".to_owned(),
            &etcd,
        ),
        (
            "kube-apiserver",
            KUBERNETES_VERSION,
            PathBuf::from("./cmd/kube-apiserver"),
            with(kube_mod.clone(), &kube.join("cmd/kube-apiserver"))?,
            version_ldflags.clone(),
            &kube,
        ),
        (
            "kube-controller-manager",
            KUBERNETES_VERSION,
            PathBuf::from("./cmd/kube-controller-manager"),
            with(kube_mod.clone(), &kube.join("cmd/kube-controller-manager"))?,
            version_ldflags.clone(),
            &kube,
        ),
        (
            "simkubelet",
            KUBERNETES_VERSION,
            PathBuf::from("./cmd/simkubelet"),
            with(kube_mod.clone(), &kube.join("cmd/simkubelet"))?,
            "-s -w".to_owned(),
            &kube,
        ),
        (
            "nsforward",
            KUBERNETES_VERSION,
            PathBuf::from("./cmd/nsforward"),
            with(kube_mod.clone(), &kube.join("cmd/nsforward"))?,
            "-s -w".to_owned(),
            &kube,
        ),
        (
            "tgclient",
            KUBERNETES_VERSION,
            PathBuf::from("./cmd/tgclient"),
            with(kube_mod, &kube.join("cmd/tgclient"))?,
            "-s -w".to_owned(),
            &kube,
        ),
    ];
    let mut paths = Vec::new();
    for (name, version, package, files, ldflags, module) in targets {
        let out = layout
            .cache_bin
            .join(format!("{name}-{version}-{}", source_hash(&files)?));
        if out.exists() {
            paths.push(out);
            continue;
        }
        println!(
            "cluster: building {name} {version} from its Go module (first build takes minutes)"
        );
        let started = Instant::now();
        let tmp = out.with_extension("partial");
        let status = Command::new("go")
            .current_dir(module)
            .env("GOFLAGS", "-buildvcs=false")
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(&tmp)
            .arg(&package)
            .status()
            .context("running go build (is Go installed?)")?;
        if !status.success() {
            bail!("go build of {name} failed ({status})");
        }
        fs::rename(&tmp, &out)?;
        // Older builds of the same binary are superseded.
        if let Ok(entries) = fs::read_dir(&layout.cache_bin) {
            for entry in entries.filter_map(|e| e.ok()) {
                let file = entry.file_name().to_string_lossy().into_owned();
                if file.starts_with(&format!("{name}-")) && entry.path() != out {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        println!(
            "cluster: built {name} in {:.1}s -> {}",
            started.elapsed().as_secs_f64(),
            out.display()
        );
        paths.push(out);
    }
    Ok(Binaries {
        etcd: paths[0].clone(),
        apiserver: paths[1].clone(),
        controller_manager: paths[2].clone(),
        simkubelet: paths[3].clone(),
        nsforward: paths[4].clone(),
        tgclient: paths[5].clone(),
    })
}

// ---------------------------------------------------------------------------------
// PKI (openssl CLI: ECDSA P-256 leaf and CA keys, RSA service-account keys)

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn issue_cert(pki: &Path, name: &str, subject: &str, sans: &[String], usage: &str) -> Result<()> {
    let key = pki.join(format!("{name}.key"));
    let crt = pki.join(format!("{name}.crt"));
    let ca_crt = pki.join("ca.crt");
    let ca_key = pki.join("ca.key");
    let mut args: Vec<String> = [
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        subject,
        "-keyout",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(key.display().to_string());
    args.push("-out".into());
    args.push(crt.display().to_string());
    args.extend(["-CA".into(), ca_crt.display().to_string()]);
    args.extend(["-CAkey".into(), ca_key.display().to_string()]);
    args.extend([
        "-addext".into(),
        "basicConstraints=critical,CA:FALSE".into(),
    ]);
    args.extend([
        "-addext".into(),
        "keyUsage=critical,digitalSignature,keyEncipherment".into(),
    ]);
    args.extend(["-addext".into(), format!("extendedKeyUsage={usage}")]);
    if !sans.is_empty() {
        args.extend([
            "-addext".into(),
            format!("subjectAltName={}", sans.join(",")),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    openssl(&refs)
}

/// Generates the cluster's PKI into `pki/` (fresh every start).
fn generate_pki(layout: &Layout) -> Result<()> {
    let pki = layout.pki();
    fs::create_dir_all(&pki)?;
    let p = |n: &str| pki.join(n).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=tollgate-test-cluster-ca",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    ])?;
    let apiserver_sans: Vec<String> = [
        "DNS:kubernetes".to_owned(),
        "DNS:kubernetes.default".to_owned(),
        "DNS:kubernetes.default.svc".to_owned(),
        "DNS:kubernetes.default.svc.cluster.local".to_owned(),
        "DNS:localhost".to_owned(),
        format!("IP:{CLUSTER_IP}"),
        format!("IP:{API_SERVER_IP}"),
        "IP:127.0.0.1".to_owned(),
    ]
    .to_vec();
    issue_cert(
        &pki,
        "apiserver",
        "/CN=kube-apiserver",
        &apiserver_sans,
        "serverAuth",
    )?;
    issue_cert(
        &pki,
        "apiserver-kubelet-client",
        "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client",
        &[],
        "clientAuth",
    )?;
    // As kubeadm's: the controller manager's own identity, which the bootstrap RBAC
    // binds to system:kube-controller-manager; with --use-service-account-credentials
    // each controller then acts as its own service account in kube-system.
    issue_cert(
        &pki,
        "controller-manager",
        "/CN=system:kube-controller-manager",
        &[],
        "clientAuth",
    )?;
    issue_cert(
        &pki,
        "admin",
        "/O=system:masters/CN=kubernetes-admin",
        &[],
        "clientAuth",
    )?;
    for node in nodes() {
        issue_cert(
            &pki,
            &format!("{}-kubelet", node.name),
            &format!("/CN={}", node.name),
            &[format!("IP:{}", node.ip), format!("DNS:{}", node.name)],
            "serverAuth",
        )?;
        issue_cert(
            &pki,
            &format!("{}-client", node.name),
            &format!("/O=system:nodes/CN=system:node:{}", node.name),
            &[],
            "clientAuth",
        )?;
    }
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &p("sa.key"),
    ])?;
    openssl(&["pkey", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
    Ok(())
}

fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tollgate
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: tollgate
  context:
    cluster: tollgate
    user: {user}
    namespace: default
current-context: tollgate
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

// ---------------------------------------------------------------------------------
// Processes

/// Starts `program args` detached (own process group), output to `logs/<name>.log`, inside
/// network namespace `netns` when given, and records its pid in `pids/<name>`.
fn spawn(
    layout: &Layout,
    name: &str,
    netns: Option<&str>,
    program: &Path,
    args: &[String],
) -> Result<u32> {
    let log_path = layout.logs().join(format!("{name}.log"));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut cmd = match netns {
        // nsenter, not `ip netns exec`: the latter also makes a private mount
        // namespace, and simkubelet's own `ip netns add` mounts must stay visible.
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    fs::write(layout.pids().join(name), pid.to_string())?;
    // Not waited for: the process outlives us; it is reaped by init when we exit.
    std::mem::forget(child);
    Ok(pid)
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; look at its state.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn read_pid(layout: &Layout, name: &str) -> Option<u32> {
    fs::read_to_string(layout.pids().join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The processes of the cluster, by name.
pub fn process_names() -> Vec<String> {
    let mut names = vec![
        "etcd".to_owned(),
        "kube-apiserver".to_owned(),
        "kube-controller-manager".to_owned(),
        "nsforward".to_owned(),
    ];
    names.extend(
        nodes()
            .into_iter()
            .map(|n| format!("simkubelet-{}", n.name)),
    );
    names
}

/// Which processes are alive: (name, pid, alive).
pub fn processes(layout: &Layout) -> Vec<(String, Option<u32>, bool)> {
    process_names()
        .into_iter()
        .map(|name| {
            let pid = read_pid(layout, &name);
            let alive = pid.is_some_and(pid_alive);
            (name, pid, alive)
        })
        .collect()
}

/// The ConfigMap the controller manager's root-ca-cert-publisher keeps in every
/// namespace, here the `default` one's.
const ROOT_CA_CONFIGMAP: &str = "/api/v1/namespaces/default/configmaps/kube-root-ca.crt";

/// GETs `path` from the API server through the loopback forwarder with the admin
/// certificate (curl). Returns the body on HTTP 200.
pub fn api_get(layout: &Layout, path: &str) -> Result<String> {
    let pki = layout.pki();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("admin.crt"))
        .arg("--key")
        .arg(pki.join("admin.key"))
        .arg(format!("{}{}", layout.api_url(), path))
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when every process runs, `/readyz` answers ok, the controller manager has
/// published the cluster CA (`kube-root-ca.crt` in `default`) and the nodes are Ready.
pub fn healthy(layout: &Layout) -> bool {
    processes(layout).iter().all(|(_, _, alive)| *alive)
        && api_get(layout, "/readyz").is_ok_and(|body| body.trim() == "ok")
        && api_get(layout, ROOT_CA_CONFIGMAP).is_ok()
        && nodes().iter().all(|n| {
            api_get(layout, &format!("/api/v1/nodes/{}", n.name))
                .is_ok_and(|body| body.contains("\"KubeletReady\""))
        })
}

/// [`healthy`], asked up to three times while every process is alive: a busy machine
/// can make one probe time out, and a false "unhealthy" would restart the cluster under
/// another test process's feet.
fn healthy_with_retries(layout: &Layout) -> bool {
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        if healthy(layout) {
            return true;
        }
        if !processes(layout).iter().all(|(_, _, alive)| *alive) {
            return false;
        }
    }
    false
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// What `up` did.
pub struct UpReport {
    pub reused: bool,
    /// Whole call, build included.
    pub elapsed: Duration,
    /// Time spent building missing binaries (zero when the cache had them).
    pub build: Duration,
    pub binaries: Binaries,
}

/// An exclusive lock on the cluster (`<state>.lock`), held while starting or stopping
/// it, so that `cluster up` and a test process never start two clusters at once. The
/// lock is held by keeping the file open.
struct StateLock(#[allow(dead_code)] fs::File);

impl StateLock {
    fn acquire(layout: &Layout) -> Result<StateLock> {
        let path = layout.state.with_extension("lock");
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a valid open descriptor; released when the file closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(StateLock(file))
    }
}

/// Starts the cluster, or reuses it when healthy and running the current binaries (a
/// changed Go source means a new binary, and a restart). Builds missing binaries first.
pub fn up(layout: &Layout) -> Result<UpReport> {
    crate::require_root();
    let _lock = StateLock::acquire(layout)?;
    let started = Instant::now();
    let bins = ensure_binaries(layout)?;
    let build = started.elapsed();
    let wanted = format!("{} layout={LAYOUT_VERSION}", bins.running());
    let running = fs::read_to_string(layout.state.join("binaries")).unwrap_or_default();
    if running == wanted && healthy_with_retries(layout) {
        return Ok(UpReport {
            reused: true,
            elapsed: started.elapsed(),
            build,
            binaries: bins,
        });
    }
    // Anything half-alive is stopped and started afresh: a restart is cheap (seconds)
    // and never leaves a mix of old and new PKI or state.
    stop(layout);
    let result = start(layout, &bins);
    if let Err(err) = &result {
        eprintln!(
            "cluster: start failed ({err:#}); logs in {}",
            layout.logs().display()
        );
        for (name, _, alive) in processes(layout) {
            if !alive {
                let log = layout.logs().join(format!("{name}.log"));
                if let Ok(text) = fs::read_to_string(&log) {
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    eprintln!("--- last lines of {}:", log.display());
                    for line in tail.into_iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
        stop(layout);
    }
    result?;
    Ok(UpReport {
        reused: false,
        elapsed: started.elapsed(),
        build,
        binaries: bins,
    })
}

fn start(layout: &Layout, bins: &Binaries) -> Result<()> {
    for dir in [layout.logs(), layout.pids(), layout.state.join("etcd")] {
        fs::create_dir_all(&dir)?;
    }
    // Exactly what `up` compares with, so a healthy cluster is reused.
    fs::write(
        layout.state.join("binaries"),
        format!("{} layout={LAYOUT_VERSION}", bins.running()),
    )?;
    generate_pki(layout)?;
    let pki = layout.pki();
    let pk = |n: &str| pki.join(n).display().to_string();

    let mut topology = Topology::create(CLUSTER_ID, NODES)?;
    topology.teardown_on_drop = false;
    let cp = topology.control_plane.name.clone();

    spawn(
        layout,
        "etcd",
        Some(&cp),
        &bins.etcd,
        &[
            "--name=tgc".into(),
            format!("--data-dir={}", layout.state.join("etcd").display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=tgc=http://127.0.0.1:2380".into(),
            "--listen-metrics-urls=http://127.0.0.1:2381".into(),
            "--quota-backend-bytes=2147483648".into(),
            "--snapshot-count=10000".into(),
            "--log-level=warn".into(),
        ],
    )?;

    spawn(
        layout,
        "kube-apiserver",
        Some(&cp),
        &bins.apiserver,
        &[
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--bind-address={API_SERVER_IP}"),
            format!("--advertise-address={API_SERVER_IP}"),
            format!("--secure-port={API_SERVER_PORT}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--tls-cert-file={}", pk("apiserver.crt")),
            format!("--tls-private-key-file={}", pk("apiserver.key")),
            format!("--client-ca-file={}", pk("ca.crt")),
            "--authorization-mode=Node,RBAC".into(),
            "--anonymous-auth=true".into(),
            "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,ResourceQuota,PodSecurity".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", pk("sa.pub")),
            format!("--service-account-signing-key-file={}", pk("sa.key")),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
            format!("--kubelet-client-certificate={}", pk("apiserver-kubelet-client.crt")),
            format!("--kubelet-client-key={}", pk("apiserver-kubelet-client.key")),
            format!("--kubelet-certificate-authority={}", pk("ca.crt")),
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--endpoint-reconciler-type=lease".into(),
            "--v=1".into(),
        ],
    )?;

    spawn(
        layout,
        "nsforward",
        None,
        &bins.nsforward,
        &[
            format!("--listen=127.0.0.1:{}", layout.api_port),
            format!("--netns=/run/netns/{cp}"),
            format!("--to={API_SERVER_IP}:{API_SERVER_PORT}"),
        ],
    )?;

    fs::write(
        layout.admin_kubeconfig(),
        kubeconfig(
            &layout.api_url(),
            &pki.join("ca.crt"),
            &pki.join("admin.crt"),
            &pki.join("admin.key"),
            "admin",
        ),
    )?;

    let mut last_error = String::new();
    wait_for("the API server's /readyz", Duration::from_secs(120), || {
        if !processes(layout)
            .iter()
            .filter(|(n, _, _)| n == "etcd" || n == "kube-apiserver")
            .all(|(_, _, alive)| *alive)
        {
            return true; // fall through to the liveness check below
        }
        match api_get(layout, "/readyz") {
            Ok(body) => body.trim() == "ok",
            Err(err) => {
                last_error = format!("{err:#}");
                false
            }
        }
    })
    .with_context(|| format!("last answer: {last_error}"))?;
    for name in ["etcd", "kube-apiserver"] {
        if !read_pid(layout, name).is_some_and(pid_alive) {
            bail!("{name} exited during start");
        }
    }

    // kube-controller-manager with one controller: root-ca-cert-publisher, which gives
    // every namespace the `kube-root-ca.crt` ConfigMap that a pod's projected
    // service-account volume takes its ca.crt from. No other loop runs (the harness
    // removes namespaces itself, see `Cluster::remove_namespace`).
    let cm_kubeconfig = layout.state.join("controller-manager.kubeconfig");
    fs::write(
        &cm_kubeconfig,
        kubeconfig(
            &format!("https://{API_SERVER_IP}:{API_SERVER_PORT}"),
            &pki.join("ca.crt"),
            &pki.join("controller-manager.crt"),
            &pki.join("controller-manager.key"),
            "system:kube-controller-manager",
        ),
    )?;
    spawn(
        layout,
        "kube-controller-manager",
        Some(&cp),
        &bins.controller_manager,
        &[
            // No --authentication/authorization-kubeconfig: nothing calls its port, and
            // delegated authentication would look for a front-proxy CA this API server
            // does not have (an error every 20 s in its log).
            format!("--kubeconfig={}", cm_kubeconfig.display()),
            "--controllers=root-ca-cert-publisher".into(),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!("--root-ca-file={}", pk("ca.crt")),
            "--bind-address=127.0.0.1".into(),
            "--profiling=false".into(),
        ],
    )?;
    wait_for(
        "the controller manager to publish kube-root-ca.crt",
        Duration::from_secs(60),
        || {
            api_get(layout, ROOT_CA_CONFIGMAP).is_ok()
                || !read_pid(layout, "kube-controller-manager").is_some_and(pid_alive)
        },
    )?;
    if !read_pid(layout, "kube-controller-manager").is_some_and(pid_alive) {
        bail!("kube-controller-manager exited during start");
    }

    for node in nodes() {
        let node_cgroup_root = node_cgroup_root(&node)?;
        fs::create_dir_all(&node_cgroup_root)
            .with_context(|| format!("creating {}", node_cgroup_root.display()))?;
        // kube-proxy's job for the `kubernetes` Service: DNAT the ClusterIP to the API
        // server, for pod traffic (PREROUTING) and host processes (OUTPUT).
        for chain in ["PREROUTING", "OUTPUT"] {
            crate::topology::Netns {
                name: node.netns.clone(),
            }
            .command("iptables")
            .args(["-w", "-t", "nat", "-A", chain, "-d"])
            .arg(format!("{CLUSTER_IP}/32"))
            .args(["-p", "tcp", "--dport"])
            .arg(CLUSTER_PORT.to_string())
            .args(["-j", "DNAT", "--to-destination"])
            .arg(format!("{API_SERVER_IP}:{API_SERVER_PORT}"))
            .status()
            .context("iptables")?
            .success()
            .then_some(())
            .context("adding the ClusterIP DNAT rule")?;
        }
        let dir = layout.node_dir(&node.name);
        fs::create_dir_all(&dir)?;
        let node_kubeconfig = dir.join("kubelet.kubeconfig");
        fs::write(
            &node_kubeconfig,
            kubeconfig(
                &format!("https://{API_SERVER_IP}:{API_SERVER_PORT}"),
                &pki.join("ca.crt"),
                &pki.join(format!("{}-client.crt", node.name)),
                &pki.join(format!("{}-client.key", node.name)),
                &format!("system:node:{}", node.name),
            ),
        )?;
        spawn(
            layout,
            &format!("simkubelet-{}", node.name),
            Some(&node.netns),
            &bins.simkubelet,
            &[
                format!("--node-name={}", node.name),
                format!("--node-index={}", node.index),
                format!("--node-ip={}", node.ip),
                format!("--topology-id={CLUSTER_ID}"),
                format!("--cgroup-root={}", node_cgroup_root.display()),
                format!(
                    "--cgroup-driver={}",
                    match node.driver {
                        CgroupDriver::Systemd => "systemd",
                        CgroupDriver::Cgroupfs => "cgroupfs",
                    }
                ),
                format!("--kubeconfig={}", node_kubeconfig.display()),
                format!("--state-dir={}", dir.display()),
                format!(
                    "--tls-cert-file={}",
                    pk(&format!("{}-kubelet.crt", node.name))
                ),
                format!(
                    "--tls-private-key-file={}",
                    pk(&format!("{}-kubelet.key", node.name))
                ),
                format!("--client-ca-file={}", pk("ca.crt")),
                format!("--kubelet-version={KUBERNETES_VERSION}"),
                format!("--sync-frequency={SYNC_FREQUENCY}"),
            ],
        )?;
    }
    wait_for("the nodes to be Ready", Duration::from_secs(60), || {
        nodes().iter().all(|n| {
            api_get(layout, &format!("/api/v1/nodes/{}", n.name))
                .is_ok_and(|body| body.contains("\"KubeletReady\""))
        })
    })?;
    if !healthy(layout) {
        bail!("the cluster started but is not healthy");
    }
    Ok(())
}

/// Stops every process and removes the topology (namespaces, links, iptables rules,
/// cgroups) and the state directory. Safe to call when nothing runs.
pub fn down(layout: &Layout) {
    let _lock = StateLock::acquire(layout);
    stop(layout);
    let lock = layout.state.with_extension("lock");
    let _ = fs::remove_file(&lock);
    if let Some(parent) = lock.parent() {
        let _ = fs::remove_dir(parent); // only when empty
    }
}

fn stop(layout: &Layout) {
    // Graceful first: simkubelets remove their pods, the API server and etcd flush.
    let mut pids = Vec::new();
    for name in process_names().into_iter().rev() {
        if let Some(pid) = read_pid(layout, &name) {
            if pid_alive(pid) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                pids.push(pid);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && pids.iter().any(|p| pid_alive(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids {
        if pid_alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    // Kills whatever still runs in the namespaces or the cgroup subtree, then removes
    // them (pod namespaces are named tgc-n<k>-p<n>-<pod>, so they go too).
    topology::remove_by_id(CLUSTER_ID);
    let _ = fs::remove_dir_all(&layout.state);
    // The empty mount point simkubelet made for the service-account volume (rmdir
    // only removes directories that are empty).
    for dir in [
        "/run/secrets/kubernetes.io/serviceaccount",
        "/run/secrets/kubernetes.io",
        "/run/secrets",
    ] {
        let _ = fs::remove_dir(dir);
    }
}

/// A line per process plus API health, for `cluster status`.
pub fn status(layout: &Layout) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, pid, alive) in processes(layout) {
        lines.push(format!(
            "{name:<28} {}",
            match (pid, alive) {
                (Some(pid), true) => format!("running (pid {pid})"),
                (Some(pid), false) => format!("dead (pid {pid})"),
                (None, _) => "not started".to_owned(),
            }
        ));
    }
    let ready = api_get(layout, "/readyz")
        .map(|b| b.trim().to_owned())
        .unwrap_or_else(|e| format!("unreachable ({e:#})"));
    lines.push(format!("{:<28} {ready}", "api /readyz"));
    let netns: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{CLUSTER_ID}-")))
                .collect()
        })
        .unwrap_or_default();
    lines.push(format!("{:<28} {}", "network namespaces", netns.len()));
    lines
}
