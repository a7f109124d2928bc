//! The Tollgate agent on a simulated node, as the DaemonSet would run it: in the node's
//! network namespace, in a host cgroup of its own, with the serving certificate issued
//! from the cluster CA (`certs issue`), the RBAC of `deploy/rbac.yaml`, a policy file,
//! and its kernel programs attached to the node's cgroup root.
//!
//! The binary is the test package's `tg-agent` (the same CLI as `gateway-agent`, built
//! from this tree), passed in by the suites as `env!("CARGO_BIN_EXE_tg-agent")`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::controlplane::{self, NodeInfo};
use crate::cluster::Cluster;
use crate::topology::{self, Netns, API_SERVER_IP, API_SERVER_PORT};

/// The port the proxy listens on, on the node's pod-facing address and loopback.
pub const PROXY_PORT: u16 = 15443;
/// The agent's admin port (loopback inside the node namespace).
pub const ADMIN_PORT: u16 = 15090;
/// The reviewers' REST API (TLS, on the node's address).
pub const API_PORT: u16 = 15444;
/// The admission webhook (trust mode `injected-ca`; TLS, on the node's address).
pub const WEBHOOK_PORT: u16 = 15445;

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The `tg-agent` binary.
    pub bin: PathBuf,
    /// Node number (1-based).
    pub node: u8,
    /// The policy document (written to a file the agent follows), unless
    /// `policy_configmap` is set.
    pub policy: String,
    /// Read the policy from this ConfigMap (`namespace/name`, key `policy.yaml`)
    /// instead of a file.
    pub policy_configmap: Option<String>,
    /// `--classify-timeout`.
    pub classify_timeout: Duration,
    /// `--approval-store` (`embedded` or `kubernetes`); the agent's default when None.
    pub approval_store: Option<String>,
    /// `--state-dir`: give the same directory to a restarted agent to keep its
    /// embedded store; a fresh one under the agent's directory when None.
    pub state_dir: Option<PathBuf>,
    /// More arguments for `run`.
    pub extra_args: Vec<String>,
    /// Adopt the pins under this bpffs directory (a restart) instead of a new one.
    pub bpffs: Option<PathBuf>,
    /// Trust mode `injected-ca` (Tollgate's own CA, the admission webhook on
    /// `<node address>:WEBHOOK_PORT`) instead of a serving certificate issued from the
    /// cluster CA.
    pub injected_ca: bool,
}

impl AgentOptions {
    pub fn new(bin: &str, node: u8, policy: &str) -> AgentOptions {
        AgentOptions {
            bin: PathBuf::from(bin),
            node,
            policy: policy.to_owned(),
            policy_configmap: None,
            classify_timeout: Duration::from_secs(5),
            approval_store: None,
            state_dir: None,
            extra_args: Vec::new(),
            bpffs: None,
            injected_ca: false,
        }
    }
}

/// A policy that allows everything (what the agent does with no rule matching).
pub const ALLOW_ALL: &str = "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\ndefault: allow\n";

/// A running agent; stopped, and its kernel programs removed, when dropped.
pub struct RunningAgent {
    child: Option<Child>,
    /// One agent per node at a time, across test processes (suites, the benchmark):
    /// two would both attach to the node's cgroup root. An flock, released on drop.
    _agents_lock: fs::File,
    pub bin: PathBuf,
    pub node: NodeInfo,
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    pub log: PathBuf,
    pub policy_file: PathBuf,
    /// The REST API's CA (the cluster CA: the agent's certificate is issued from it).
    pub ca_file: PathBuf,
    /// `--state-dir`: the embedded approval store and `sessions/`.
    pub state_dir: PathBuf,
    /// The options it was started with (for [`RunningAgent::restart`]).
    pub options: AgentOptions,
    cgroup: PathBuf,
    /// Leave the kernel programs pinned on drop (a restart adopts them).
    keep_pins: bool,
}

impl RunningAgent {
    /// Starts the agent on `options.node` and waits until `/readyz` says ready.
    pub fn start(cluster: &Cluster, options: AgentOptions) -> Result<RunningAgent> {
        let node = controlplane::nodes()
            .into_iter()
            .find(|n| n.index == options.node)
            .with_context(|| format!("no node {}", options.node))?;
        let agents_lock = lock_node(&cluster.layout.state, &node.name)?;
        let id = topology::unique_id();
        let dir = std::env::temp_dir().join(format!("tollgate-agent-{id}"));
        fs::create_dir_all(&dir)?;
        let pki = cluster.layout.pki();

        // The agent's credentials: deploy/rbac.yaml, and a token for its account.
        let rbac = workspace_root().join("deploy/rbac.yaml");
        // Agents of two nodes may apply it at once: a create that loses the race
        // answers AlreadyExists, and the next apply finds the object.
        let rbac = rbac.to_str().context("path")?;
        let mut applied = cluster.kubectl_ok(&["apply", "-f", rbac]);
        for _ in 0..2 {
            if applied.is_ok() {
                break;
            }
            applied = cluster.kubectl_ok(&["apply", "-f", rbac]);
        }
        applied?;
        let token = cluster
            .kubectl_ok(&[
                "create",
                "token",
                "tollgate-agent",
                "-n",
                "tollgate-system",
                "--duration=2h",
            ])?
            .trim()
            .to_owned();
        let kubeconfig = dir.join("agent.kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: tgc\n  cluster:\n    server: https://{API_SERVER_IP}:{API_SERVER_PORT}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: agent\n  context: {{cluster: tgc, user: agent}}\ncurrent-context: agent\n",
                pki.join("ca.crt").display()
            ),
        )?;

        // The serving certificate, from the cluster CA, as an operator would issue it
        // (trust mode cluster-ca); in injected-ca mode the agent issues its own.
        let tls = dir.join("tls");
        let serving_args: Vec<std::ffi::OsString> = if options.injected_ca {
            vec![
                "--trust-mode".into(),
                "injected-ca".into(),
                "--webhook-listen".into(),
                format!("{}:{WEBHOOK_PORT}", node.ip).into(),
            ]
        } else {
            run(Command::new(&options.bin).args([
                "certs",
                "issue",
                "--ca-cert",
                pki.join("ca.crt").to_str().context("path")?,
                "--ca-key",
                pki.join("ca.key").to_str().context("path")?,
                "--out",
                tls.to_str().context("path")?,
                "--extra-san",
                &API_SERVER_IP.to_string(),
                // The REST API is reached on the node's address.
                "--extra-san",
                &node.ip.to_string(),
            ]))?;
            vec![
                "--tls-cert".into(),
                tls.join("tls.crt").into(),
                "--tls-key".into(),
                tls.join("tls.key").into(),
            ]
        };

        let policy_file = dir.join("policy.yaml");
        fs::write(&policy_file, &options.policy)?;

        let cgroup = controlplane::cgroup_root()?
            .join("system.slice")
            .join(format!("tollgate-agent-{}.service", node.name));
        fs::create_dir_all(&cgroup)?;
        let bpffs = options
            .bpffs
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/tollgate-test-{id}")));
        let log = dir.join("agent.log");
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.join("state"));
        fs::create_dir_all(&state_dir)?;
        let mut cmd = node
            .netns_handle()
            .command_in_cgroup(&cgroup, &options.bin)?;
        cmd.args(["run", "--node-name", &node.name])
            // The node's address: pods reach it through their default route.
            .args(["--proxy-address", &node.ip.to_string()])
            .args(["--proxy-port", &PROXY_PORT.to_string()])
            .args(&serving_args)
            .arg("--cluster-ca")
            .arg(pki.join("ca.crt"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(match &options.policy_configmap {
                Some(reference) => vec!["--policy-configmap".into(), reference.into()],
                None => vec![
                    std::ffi::OsString::from("--policy-file"),
                    policy_file.clone().into(),
                ],
            })
            .arg("--cgroup-root")
            .arg(controlplane::node_cgroup_root(&node)?)
            .arg("--bpffs")
            .arg(&bpffs)
            .args(["--admin-address", &format!("127.0.0.1:{ADMIN_PORT}")])
            .args([
                "--classify-timeout",
                &format!("{}ms", options.classify_timeout.as_millis()),
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(
                options
                    .approval_store
                    .iter()
                    .flat_map(|s| ["--approval-store".to_owned(), s.clone()]),
            )
            .args(["--api-listen", &format!("{}:{API_PORT}", node.ip)])
            // Tests leave in-pod watches open when they end: bound each stop.
            .args(["--drain-timeout", "5s"])
            .args(&options.extra_args)
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        // Both streams into one log, through one open file (one offset).
        let log_file = fs::File::create(&log)?;
        cmd.stdout(log_file.try_clone()?).stderr(log_file);
        let child = cmd.spawn().context("starting the agent")?;
        let mut agent = RunningAgent {
            child: Some(child),
            _agents_lock: agents_lock,
            bin: options.bin.clone(),
            node,
            dir,
            bpffs,
            log,
            policy_file,
            ca_file: pki.join("ca.crt"),
            state_dir,
            options,
            cgroup,
            keep_pins: false,
        };
        agent.wait_ready(Duration::from_secs(60))?;
        Ok(agent)
    }

    /// Stops this agent and starts another with the same options, state directory and
    /// pinned programs, as a DaemonSet rollout does: enforcement never stops.
    pub fn restart(mut self, cluster: &Cluster) -> Result<RunningAgent> {
        let mut options = self.options.clone();
        options
            .state_dir
            .get_or_insert_with(|| self.dir.join("state"));
        options.bpffs = Some(self.bpffs.clone());
        self.keep_pins = true;
        if let Ok(policy) = fs::read_to_string(&self.policy_file) {
            options.policy = policy;
        }
        drop(self);
        RunningAgent::start(cluster, options)
    }

    /// Where this agent records sessions.
    pub fn sessions_dir(&self) -> PathBuf {
        self.state_dir.join("sessions")
    }

    /// `tg-agent sessions ARGS --dir <this agent's sessions>`.
    pub fn sessions_cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.bin)
            .arg("sessions")
            .args(args)
            .arg("--dir")
            .arg(self.sessions_dir())
            .stdin(Stdio::null())
            .output()
            .context("running the sessions CLI")
    }

    /// Kills the agent with SIGKILL: no shutdown, no flush (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The REST API's base URL.
    pub fn api_url(&self) -> String {
        format!("https://{}:{API_PORT}", self.node.ip)
    }

    /// Runs `tg-agent approvals ARGS` in the node's network namespace against this
    /// agent's REST API, as a reviewer holding `token`.
    pub fn approvals_cli(&self, token: &str, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = self.node.netns_handle().command(&self.bin);
        cmd.arg("approvals")
            .args(args)
            .args(["--server", &self.api_url()])
            .arg("--certificate-authority")
            .arg(&self.ca_file)
            .env("TOLLGATE_TOKEN", token)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd.output().context("running the approvals CLI")
    }

    /// Polls `/readyz` until it answers 200, failing early if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "the agent exited ({status}) before it was ready:\n{}",
                        self.log_text()
                    );
                }
            }
            if let Ok((200, _)) = self.admin_get("/readyz") {
                // Ready, and it is this agent that answered: it still runs.
                if self.is_running() {
                    return Ok(());
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "the agent was not ready after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET on the admin port (inside the node's namespace): status code and body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get_in(
            &self.node.netns_handle(),
            SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            path,
        )
    }

    /// The value of one Prometheus sample line (`name{labels}`), 0 when absent.
    pub fn metric(&self, sample: &str) -> Result<f64> {
        let (_, text) = self.admin_get("/metrics")?;
        Ok(text
            .lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0))
    }

    /// Replaces the policy file (the agent reloads it within seconds).
    pub fn set_policy(&self, policy: &str) -> Result<()> {
        let tmp = self.policy_file.with_extension("tmp");
        fs::write(&tmp, policy)?;
        fs::rename(&tmp, &self.policy_file)?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the agent process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 10s). The kernel programs stay
    /// pinned, as on a real restart.
    pub fn stop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Sends SIGTERM, as the kubelet does on a rollout, and waits up to `timeout` for
    /// the agent to exit: its exit status and how long it took to drain, or None (the
    /// agent still runs) when it did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let child = self.child.as_mut()?;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stop();
        if self.keep_pins {
            return;
        }
        let _ = Command::new(&self.bin)
            .args(["datapath", "uninstall", "--bpffs"])
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .status();
        let _ = fs::remove_dir(&self.bpffs);
        let _ = fs::remove_dir(&self.cgroup);
        if std::thread::panicking() {
            eprintln!("agent log ({}):\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Takes the node's agent lock, waiting (bounded) while another test process holds it.
fn lock_node(state: &Path, node: &str) -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    let dir = state.parent().unwrap_or(state);
    let path = dir.join(format!("agent-{node}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let started = Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("another agent has run for 10 minutes ({})", path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A minimal HTTP/1.1 GET from inside a network namespace.
pub fn http_get_in(netns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream =
        netns.run_in(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
