//! A cluster's network and cgroups, built from namespaces, veth links and a cgroup subtree.
//!
//! Layout (one `Topology`, names prefixed by its id so runs never collide):
//!
//! ```text
//!  netns <id>-cp   bridge tgbr0 10.77.0.10/24, fd77::10/64   the API server's endpoint
//!     │  (veth n<k>, in the bridge)
//!  netns <id>-n<k> eth0 10.77.0.(20+k)/24, fd77::(20+k)/64   node k (host network)
//!     │  (veth p<n>; node side 10.244.k.1/32, fd44:0:0:k::1/128)
//!  netns <id>-n<k>-<pod>  eth0 10.244.k.(10+n), fd44:0:0:k::(10+n)   a pod
//! ```
//!
//! No namespace has a default route that leaves it: the node forwards pod traffic only
//! to the cluster network (10.77.0.0/24) and the Service range (10.96.0.0/12, which only
//! a DNAT rule makes reachable); everything else is unreachable. The machine's own
//! namespace is never touched.
//!
//! Cgroups: `<cgroup-v2 mount>/<id>` is the subtree the agent attaches to (its
//! `--cgroup-root`); pods are laid out below it exactly as kubelet lays them out, for the
//! systemd and cgroupfs drivers and each QoS class.

use std::ffi::CString;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, ensure, Context, Result};

/// The API server's address in the cluster network (the `kubernetes` endpoint).
pub const API_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
pub const API_SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10);
/// The port the API server listens on.
pub const API_SERVER_PORT: u16 = 6443;
/// The `kubernetes` Service ClusterIP and port, as in a default cluster.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const CLUSTER_PORT: u16 = 443;
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Pod names longer than this are cut in namespace names (interface names are short).
const MAX_POD_NAME_IN_NETNS: usize = 40;

/// Where network namespaces made by `ip netns add` live.
const NETNS_RUN_DIR: &str = "/run/netns";

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A unique topology id for a test process: `tgp<pid>x<seq>`. The pid lets a later run
/// find and remove what a crashed run left behind ([`remove_stale`]).
pub fn unique_id() -> String {
    format!(
        "tgp{}x{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup-v2 mount, looked up in mountinfo (hybrid hosts put it under
/// `/sys/fs/cgroup/unified`, pure v2 hosts at `/sys/fs/cgroup`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in mountinfo.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> ..."
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mount_point) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mount_point));
            }
        }
    }
    bail!("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
}

/// A cgroup's id as the kernel reports it to eBPF (`bpf_get_current_cgroup_id`): the
/// inode number of its directory in cgroup2.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// A named network namespace (`/run/netns/<name>`).
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on links made from now on: while their
        // link-local addresses are tentative, the first IPv6 packets of a fresh
        // namespace are lost (seen: the first ping to fd77::10 failed).
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        Ok(netns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets a sysctl inside this namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let assignment = format!("{key}={value}");
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-q",
            "-w",
            &assignment,
        ]))
    }

    /// A command that runs inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A command that runs inside this namespace and inside `cgroup` (joined between fork
    /// and exec, like [`PodSandbox::command`]): a host process on a node (`cgroup` from
    /// [`Node::host_cgroup`]) or a hostNetwork pod (the node's namespace and a pod's
    /// container cgroup).
    pub fn command_in_cgroup(
        &self,
        cgroup: &Path,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        join_on_exec(Command::new(program), &self.path(), cgroup)
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result.
    /// Sockets made there stay in this namespace wherever they are used afterwards, so
    /// this is how a test opens a listener "on the node".
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file =
            File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<R> {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns into the network namespace")?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    fn delete(&self) -> Result<()> {
        if self.path().exists() {
            ip(&["netns", "del", &self.name])?;
        }
        Ok(())
    }
}

/// The kubelet cgroup driver whose layout a pod's cgroup follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// The pod QoS class, which decides the parent of the pod cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];
}

/// The pod cgroup's path relative to the cgroup root, as kubelet names it.
///
/// systemd: `kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid_>.slice`
/// (dashes in the UID become underscores, since systemd reads `-` as nesting);
/// cgroupfs: `kubepods/[<qos>/]pod<uid>`. Guaranteed pods sit directly under kubepods.
pub fn pod_cgroup_relpath(driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match driver {
        CgroupDriver::Systemd => {
            let uid = uid.replace('-', "_");
            match qos {
                QosClass::Guaranteed => {
                    PathBuf::from(format!("kubepods.slice/kubepods-pod{uid}.slice"))
                }
                QosClass::Burstable => PathBuf::from(format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
                )),
                QosClass::BestEffort => PathBuf::from(format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
                )),
            }
        }
        CgroupDriver::Cgroupfs => match qos {
            QosClass::Guaranteed => PathBuf::from(format!("kubepods/pod{uid}")),
            QosClass::Burstable => PathBuf::from(format!("kubepods/burstable/pod{uid}")),
            QosClass::BestEffort => PathBuf::from(format!("kubepods/besteffort/pod{uid}")),
        },
    }
}

/// A container's cgroup name inside its pod cgroup (containerd's naming).
pub fn container_cgroup_name(driver: CgroupDriver, container_id: &str) -> String {
    match driver {
        CgroupDriver::Systemd => format!("cri-containerd-{container_id}.scope"),
        CgroupDriver::Cgroupfs => container_id.to_owned(),
    }
}

/// A whole topology: control-plane namespace, nodes, and the cgroup subtree.
#[derive(Debug)]
pub struct Topology {
    pub id: String,
    pub control_plane: Netns,
    pub nodes: Vec<Node>,
    /// `<cgroup2>/<id>`: the cgroup root for the agent; pods live below it.
    pub cgroup_root: PathBuf,
    /// Tear down on drop (false for a long-lived cluster that `cluster down` removes).
    pub teardown_on_drop: bool,
}

/// One simulated node: its host network namespace and its pod address range.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based node number.
    pub index: u8,
    pub name: String,
    pub netns: Netns,
    /// The node's address in the cluster network (where the API server sees it).
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node's address as pods see it (their default gateway): where a node-local
    /// proxy listens to be reachable from pod namespaces.
    pub pod_gateway: Ipv4Addr,
    pub pod_gateway6: Ipv6Addr,
    cgroup_root: PathBuf,
    topology_id: String,
}

impl Topology {
    /// Builds a topology with `nodes` nodes. Removes leftovers of crashed test runs first.
    pub fn create(id: &str, nodes: u8) -> Result<Topology> {
        crate::require_root();
        ensure!(
            (1..=20).contains(&nodes),
            "a topology has between 1 and 20 nodes"
        );
        remove_stale();
        // If a previous topology with this id survived (e.g. a killed `cluster up`),
        // rebuild from scratch rather than half-reuse it.
        remove_by_id(id);

        let cgroup_root = cgroup2_mount()?.join(id);
        fs::create_dir_all(&cgroup_root)
            .with_context(|| format!("creating cgroup {}", cgroup_root.display()))?;
        let mut topology = Topology {
            id: id.to_owned(),
            control_plane: Netns {
                name: format!("{id}-cp"),
            },
            nodes: Vec::new(),
            cgroup_root,
            teardown_on_drop: true,
        };
        // From here on, Drop cleans up whatever was made if a step fails.
        topology.control_plane = Netns::create(&format!("{id}-cp"))?;
        let cp = &topology.control_plane;
        cp.ip(&["link", "add", "tgbr0", "type", "bridge"])?;
        cp.ip(&[
            "addr",
            "add",
            &format!("{API_SERVER_IP}/24"),
            "dev",
            "tgbr0",
        ])?;
        cp.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{API_SERVER_IP6}/64"),
            "dev",
            "tgbr0",
            "nodad",
        ])?;
        cp.ip(&["link", "set", "tgbr0", "up"])?;
        for index in 1..=nodes {
            let node = topology.add_node(index)?;
            topology.nodes.push(node);
        }
        Ok(topology)
    }

    fn add_node(&self, index: u8) -> Result<Node> {
        let cp = &self.control_plane;
        let netns = Netns::create(&format!("{}-n{index}", self.id))?;
        let ip = Ipv4Addr::new(10, 77, 0, 20 + index);
        let ip6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x20 + u16::from(index));
        let bridge_port = format!("n{index}");
        cp.ip(&[
            "link",
            "add",
            &bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        cp.ip(&["link", "set", &bridge_port, "master", "tgbr0"])?;
        cp.ip(&["link", "set", &bridge_port, "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        // The Service range goes to the cluster network so that locally generated
        // packets reach the nat OUTPUT chain (kube-proxy's DNAT); without a DNAT rule
        // they die at the bridge, inside the topology.
        netns.ip(&["route", "add", SERVICE_CIDR, "dev", "eth0"])?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // The control plane answers pods through their node.
        cp.ip(&[
            "route",
            "add",
            &format!("10.244.{index}.0/24"),
            "via",
            &ip.to_string(),
        ])?;
        cp.ip(&[
            "-6",
            "route",
            "add",
            &format!("fd44:0:0:{index:x}::/64"),
            "via",
            &ip6.to_string(),
        ])?;
        Ok(Node {
            index,
            name: format!("{}-node{index}", self.id),
            netns,
            ip,
            ip6,
            pod_gateway: Ipv4Addr::new(10, 244, index, 1),
            pod_gateway6: Ipv6Addr::new(0xfd44, 0, 0, u16::from(index), 0, 0, 0, 1),
            cgroup_root: self.cgroup_root.clone(),
            topology_id: self.id.clone(),
        })
    }

    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[usize::from(index) - 1]
    }

    /// Removes every namespace, link and cgroup of this topology, killing what runs
    /// inside. Safe to call twice.
    pub fn teardown(&self) {
        remove_by_id(&self.id);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.teardown_on_drop {
            self.teardown();
        }
    }
}

/// What a pod needs from its node: where it lives and how it is classified.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub driver: CgroupDriver,
    pub qos: QosClass,
}

impl PodSpec {
    pub fn new(name: &str, driver: CgroupDriver, qos: QosClass) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            uid: random_uid(),
            driver,
            qos,
        }
    }
}

/// A pod's sandbox on a node: network namespace, veth, and kubelet-style cgroups.
#[derive(Debug, Clone)]
pub struct PodSandbox {
    pub spec: PodSpec,
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node-side veth name (inside the node namespace).
    pub host_veth: String,
    /// The pod-level cgroup (what the agent maps to the pod).
    pub pod_cgroup: PathBuf,
    /// The application container's cgroup, where the pod's processes run.
    pub container_cgroup: PathBuf,
    pub container_id: String,
}

impl PodSandbox {
    /// The pod-level cgroup id: what the kernel path reports as the connection's pod.
    pub fn pod_cgroup_id(&self) -> Result<u64> {
        cgroup_id(&self.pod_cgroup)
    }

    /// A command that runs inside the pod: its network namespace and container cgroup.
    /// (The process joins both between fork and exec, so nothing it does escapes them.)
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        join_on_exec(
            Command::new(program),
            &self.netns.path(),
            &self.container_cgroup,
        )
    }

    /// Kills every process in the pod and removes its namespace and cgroups.
    pub fn remove(&self) -> Result<()> {
        kill_cgroup(&self.pod_cgroup);
        // The veth pair, and the node's route over it, go with the pod namespace.
        self.netns.delete()?;
        remove_cgroup_tree(&self.pod_cgroup)?;
        Ok(())
    }
}

impl Node {
    /// Creates a pod's sandbox: `n` is the pod's number on this node (1..=200), which
    /// decides its address 10.244.<node>.(10+n).
    pub fn add_pod(&self, n: u8, spec: PodSpec) -> Result<PodSandbox> {
        ensure!((1..=200).contains(&n), "pod number must be in 1..=200");
        let short: String = spec.name.chars().take(MAX_POD_NAME_IN_NETNS).collect();
        let netns = Netns::create(&format!("{}-n{}-{short}", self.topology_id, self.index))?;
        let ip = Ipv4Addr::new(10, 244, self.index, 10 + n);
        let ip6 = Ipv6Addr::new(
            0xfd44,
            0,
            0,
            u16::from(self.index),
            0,
            0,
            0,
            0x10 + u16::from(n),
        );
        let host_veth = format!("p{n}");
        self.netns.ip(&[
            "link",
            "add",
            &host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        // Node side: the pod gateway address (shared by every pod veth, as CNIs do) and a
        // host route to the pod.
        self.netns.ip(&[
            "addr",
            "add",
            &format!("{}/32", self.pod_gateway),
            "dev",
            &host_veth,
        ])?;
        self.netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/128", self.pod_gateway6),
            "dev",
            &host_veth,
            "nodad",
        ])?;
        self.netns.ip(&["link", "set", &host_veth, "up"])?;
        self.netns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_veth])?;
        self.netns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &host_veth,
        ])?;
        // Pod side: its address, a route to the gateway, and the gateway as default.
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", &self.pod_gateway.to_string(), "dev", "eth0"])?;
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.pod_gateway.to_string(),
            "dev",
            "eth0",
        ])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            &self.pod_gateway6.to_string(),
            "dev",
            "eth0",
        ])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.pod_gateway6.to_string(),
            "dev",
            "eth0",
        ])?;

        let pod_cgroup =
            self.cgroup_root
                .join(pod_cgroup_relpath(spec.driver, spec.qos, &spec.uid));
        let container_id = random_hex(32);
        let container_cgroup = pod_cgroup.join(container_cgroup_name(spec.driver, &container_id));
        fs::create_dir_all(&container_cgroup)
            .with_context(|| format!("creating cgroup {}", container_cgroup.display()))?;
        Ok(PodSandbox {
            spec,
            netns,
            ip,
            ip6,
            host_veth,
            pod_cgroup,
            container_cgroup,
            container_id,
        })
    }

    /// A cgroup for a host process on this node (e.g. the agent itself), below the
    /// topology's cgroup root but outside `kubepods`.
    pub fn host_cgroup(&self, name: &str) -> Result<PathBuf> {
        let path = self
            .cgroup_root
            .join(format!("system.slice/{}-{name}.service", self.name));
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }

    /// The address where a node-local listener is reachable from this node's pods.
    pub fn pod_facing_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.pod_gateway6)
        } else {
            IpAddr::V4(self.pod_gateway)
        }
    }
}

/// Removes everything of topology `id`: namespaces (after killing their processes) and
/// the cgroup subtree. Errors are reported on stderr, not returned: teardown must go on.
pub fn remove_by_id(id: &str) {
    let cgroup_root = cgroup2_mount().map(|m| m.join(id));
    if let Ok(root) = &cgroup_root {
        kill_cgroup(root);
    }
    let prefix = format!("{id}-");
    let mut names: Vec<String> = fs::read_dir(NETNS_RUN_DIR)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    // Pods first, then nodes, then the control plane: longest names are innermost.
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    for name in names {
        kill_netns_processes(&name);
        if let Err(err) = ip(&["netns", "del", &name]) {
            eprintln!("topology: removing netns {name}: {err:#}");
        }
    }
    if let Ok(root) = cgroup_root {
        if root.exists() {
            if let Err(err) = remove_cgroup_tree(&root) {
                eprintln!("topology: removing cgroup {}: {err:#}", root.display());
            }
        }
    }
}

/// Removes topologies left by test processes that no longer run (`tgp<pid>x<n>`).
pub fn remove_stale() {
    let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    let mut stale = std::collections::BTreeSet::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("tgp") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Some(id) = name.split('-').next() {
                stale.insert(id.to_owned());
            }
        }
    }
    for id in stale {
        remove_by_id(&id);
    }
}

/// Kills every process in a cgroup subtree (`cgroup.kill`, Linux 5.14+) and waits until
/// the subtree is empty, so that its directories can be removed.
pub fn kill_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..200 {
        if cgroup_is_empty(path) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!("topology: cgroup {} still has processes", path.display());
}

fn cgroup_is_empty(path: &Path) -> bool {
    // `cgroup.events` says "populated 0" once the whole subtree is empty.
    fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 0"))
        .unwrap_or(true)
}

/// Kills the processes whose network namespace is `name` (processes outside any of our
/// cgroups, e.g. started with `ip netns exec`).
fn kill_netns_processes(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Removes a cgroup directory and its children, deepest first (cgroups are removed with
/// rmdir, and only when empty).
fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path).with_context(|| format!("rmdir {}", path.display()))
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A random lowercase-hex string of `bytes` bytes, from the kernel's random source.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // getrandom(2) never fails for small requests once the pool is initialised.
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, buf.len(), "getrandom failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random UUID (version 4), as Kubernetes gives pods.
pub fn random_uid() -> String {
    let hex = random_hex(16);
    let mut bytes: Vec<char> = hex.chars().collect();
    bytes[12] = '4';
    bytes[16] = ['8', '9', 'a', 'b'][usize::from(bytes[16].to_digit(16).unwrap_or(0) as u8 % 4)];
    let s: String = bytes.into_iter().collect();
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

/// Makes `cmd` enter the network namespace at `netns` and the cgroup `cgroup` between
/// fork and exec, so nothing the program does escapes either.
fn join_on_exec(mut cmd: Command, netns: &Path, cgroup: &Path) -> Result<Command> {
    let netns: OwnedFd = File::open(netns)
        .with_context(|| format!("opening netns {}", netns.display()))?
        .into();
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    // SAFETY: the closure runs between fork and exec; it only calls async-signal-safe
    // functions (setns, open, write, close) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}
