//! `tollgate-demo`, run by `cargo xtask demo`: Tollgate's story told on a local topology.
//!
//! First chapter (issue 2): the kernel data path. A namespace topology like the kernel
//! tests' (a control plane holding the API server's address, one node, pods with
//! kubelet's cgroup layout), the agent's data path attached to the topology's cgroup
//! subtree, a stand-in proxy listening on the node, and three connections told in words.
//! Everything is removed at the end, also on failure.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use gateway_agent::datapath::{self, CgroupClass, Datapath, DatapathConfig};
use tollgate_harness::topology::{
    unique_id, CgroupDriver, Netns, PodSandbox, PodSpec, QosClass, Topology, API_SERVER_IP,
    API_SERVER_PORT, CLUSTER_IP, CLUSTER_PORT,
};

/// Where the (stand-in) proxy listens on the node.
const PROXY_PORT: u16 = 15443;

/// Removes the pins, then the topology, whatever happens.
struct Cleanup {
    bpffs: PathBuf,
    datapath: Option<Datapath>,
    topology: Option<Topology>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        drop(self.datapath.take());
        if let Err(e) = datapath::uninstall(&self.bpffs) {
            eprintln!("demo: removing pins under {}: {e}", self.bpffs.display());
        }
        drop(self.topology.take());
    }
}

fn main() -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let probe = probe_path()?;
    remove_stale_pins();
    let id = unique_id();
    let mut cleanup = Cleanup {
        bpffs: Path::new("/sys/fs/bpf").join(&id),
        datapath: None,
        topology: None,
    };
    let topo = cleanup
        .topology
        .insert(Topology::create(&id, 1).context("building the topology")?);
    let node = topo.node(1).clone();
    let cluster_ip = SocketAddr::from((CLUSTER_IP, CLUSTER_PORT));
    let endpoint = SocketAddr::from((API_SERVER_IP, API_SERVER_PORT));
    let agent_pod = node.add_pod(
        1,
        PodSpec::new("coding-agent", CgroupDriver::Systemd, QosClass::Burstable),
    )?;
    let trusted_pod = node.add_pod(
        2,
        PodSpec::new("ci-runner", CgroupDriver::Systemd, QosClass::Guaranteed),
    )?;
    let tollgate_pod = node.add_pod(
        3,
        PodSpec::new("tollgate", CgroupDriver::Systemd, QosClass::Burstable),
    )?;

    println!("Tollgate demo — the kernel data path");
    println!();
    println!("A small cluster made of network namespaces, all on this machine:");
    println!("  the API server at {endpoint}, behind the Service `kubernetes` at {cluster_ip};");
    println!(
        "  node {} ({}), reachable from its pods at {};",
        node.name, node.ip, node.pod_gateway
    );
    for pod in [&agent_pod, &trusted_pod, &tollgate_pod] {
        println!(
            "  pod {:<13} {} with its cgroup where kubelet puts it: {}",
            pod.spec.name,
            pod.ip,
            rel(&pod.pod_cgroup, &topo.cgroup_root)
        );
    }

    let mut config = DatapathConfig::new(&topo.cgroup_root, &cleanup.bpffs);
    config.proxy_port = PROXY_PORT;
    config.proxy_addr4 = Some(node.pod_gateway);
    config.proxy_addr6 = Some(node.pod_gateway6);
    config.host_netns_cookie = Some(
        node.netns
            .run_in(datapath::current_netns_cookie)?
            .context("reading the node's netns cookie")?,
    );
    config.agent_cgroup = Some(tollgate_pod.container_cgroup.clone());
    let dp = cleanup
        .datapath
        .insert(Datapath::install(&config).context("installing the data path")?);
    dp.set_targets(&[cluster_ip, endpoint])?;
    dp.set_cgroup(agent_pod.pod_cgroup_id()?, CgroupClass::Enforced)?;
    dp.set_cgroup(trusted_pod.pod_cgroup_id()?, CgroupClass::Exempt)?;
    println!();
    println!(
        "Tollgate's eBPF programs are attached to the cluster's cgroups and pinned under {}.",
        cleanup.bpffs.display()
    );
    println!(
        "It treats {cluster_ip} and {endpoint} as the API server; `coding-agent` is enforced, \
         `ci-runner` is exempt."
    );

    let proxy = listen(
        &node.netns,
        SocketAddr::from((node.pod_gateway, PROXY_PORT)),
    )?;
    let api = listen(&topo.control_plane, endpoint)?;
    let dp = cleanup.datapath.as_mut().expect("installed above");

    // 1. The enforced pod dials the Service address.
    println!();
    println!("1. Pod `coding-agent` dials the API server at {cluster_ip}.");
    let result = pod_connect(&probe, &agent_pod, cluster_ip)?;
    let peer_in_pod = result["peer"].as_str().unwrap_or("?").to_owned();
    let (mut stream, from) =
        accept_within(&proxy, Duration::from_secs(5)).context("the proxy saw nothing")?;
    let origin = dp
        .take_origin_of(&stream)?
        .context("the proxy could not learn the origin")?;
    println!(
        "   The kernel steered it to the Tollgate proxy at {}:{PROXY_PORT} on its node.",
        node.pod_gateway
    );
    println!(
        "   The proxy accepted it from {from} and learned it was headed for {}, \
         from pod cgroup {} ({}).",
        origin.dst,
        origin.pod_cgroup_id,
        if origin.pod_cgroup_id == agent_pod.pod_cgroup_id()? {
            "that is coding-agent"
        } else {
            "NOT coding-agent!"
        }
    );
    println!("   Inside the pod, getpeername still says {peer_in_pod}: no change to the pod.");
    let mut hello = String::new();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.read_to_string(&mut hello);
    println!("   The pod's first bytes reached the proxy: {hello:?}.");
    println!(
        "   Without Tollgate it would have gone to {cluster_ip}, i.e. to the API server \
         at {endpoint}."
    );
    report_nothing(&api, "   The API server never saw this connection.")?;

    // 2. The exempt pod goes straight through.
    println!();
    println!("2. Pod `ci-runner` (exempt) dials the API server at {endpoint}.");
    pod_connect(&probe, &trusted_pod, endpoint)?;
    let (_, from) = accept_within(&api, Duration::from_secs(5))
        .context("the API server never saw the exempt pod")?;
    println!("   It went straight to the API server, which accepted it from {from}.");
    report_nothing(&proxy, "   The proxy saw nothing of it.")?;

    // 3. Fail closed.
    drop(proxy);
    println!();
    println!("3. The proxy stops listening, and `coding-agent` dials {endpoint} again.");
    let result = pod_connect(&probe, &agent_pod, endpoint)?;
    println!(
        "   The pod gets: {} — it fails closed.",
        result["error"]
            .as_str()
            .unwrap_or("a connection (which it must not!)")
    );
    report_nothing(&api, "   The API server never saw it.")?;

    println!();
    println!("Cleaning up: unpinning the programs and removing the namespaces and cgroups.");
    drop(cleanup);
    println!("Done.");
    Ok(())
}

/// Removes pins that an interrupted demo or test run left under /sys/fs/bpf (named like
/// their topology, `tgp<pid>x<n>`, whose process is gone). The topology's own leftovers
/// are removed by `Topology::create`.
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("tgp")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = datapath::uninstall(&entry.path());
            }
        }
    }
}

/// Runs tg-probe inside the pod: connect to `addr`, say hello, report getpeername.
fn pod_connect(probe: &Path, pod: &PodSandbox, addr: SocketAddr) -> Result<serde_json::Value> {
    let out = pod
        .command(probe)?
        .args(["connect", &addr.to_string(), "--send", "hello from the pod"])
        .stdin(Stdio::null())
        .output()
        .context("running tg-probe in the pod")?;
    if !out.status.success() {
        bail!("tg-probe: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("reading tg-probe's answer")
}

/// Builds the pod-side probe (a no-op when it is current) and returns its path.
/// The probe is built beside this binary (`cargo xtask demo` builds both).
fn probe_path() -> Result<PathBuf> {
    let probe = std::env::current_exe()
        .context("locating the demo binary")?
        .with_file_name("tg-probe");
    if !probe.exists() {
        bail!(
            "{} is missing; run the demo with `cargo xtask demo`, which builds it",
            probe.display()
        );
    }
    Ok(probe)
}

fn listen(netns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
    let listener = netns
        .run_in(|| TcpListener::bind(addr))?
        .with_context(|| format!("listening on {addr} in {}", netns.name))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n <= 0 {
        return None;
    }
    let (stream, peer) = listener.accept().ok()?;
    stream.set_nonblocking(false).ok()?;
    Some((stream, peer))
}

fn report_nothing(listener: &TcpListener, line: &str) -> Result<()> {
    match accept_within(listener, Duration::from_millis(200)) {
        None => {
            println!("{line}");
            Ok(())
        }
        Some((_, from)) => bail!("unexpected connection from {from}: the redirect failed"),
    }
}

fn rel(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
