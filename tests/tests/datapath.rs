//! The kernel data path on the real kernel (issue 2, item 6), as root.
//!
//! Each test builds its own topology (a control-plane namespace holding the API server's
//! address, one node namespace, pods on veth links with kubelet's cgroup layout), attaches
//! the agent's data path to the topology's cgroup subtree with a bpffs directory of its
//! own, and asserts on what the listeners actually accepted:
//!
//! - the "proxy" listens in the node namespace at the pod gateway address (where pods
//!   reach their node), port [`PROXY_PORT`];
//! - the "API server" listens in the control-plane namespace at 10.77.0.10:6443 (and
//!   [fd77::10]:6443).
//!
//! Pods connect through `tg-probe` (tests/src/bin/tg-probe.rs) started inside the pod's
//! network namespace and container cgroup. No traffic leaves the topology: every address
//! dialled lives in namespaces the test made (TOOLCHAIN.md, *Network safety*).

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway_agent::datapath::{
    self, current_netns_cookie, CgroupClass, ConnOrigin, Datapath, DatapathConfig,
};
use serde_json::Value;
use tollgate_tests::topology::{
    unique_id, CgroupDriver, Netns, Node, PodSandbox, PodSpec, QosClass, Topology, API_SERVER_IP,
    API_SERVER_IP6, API_SERVER_PORT, CLUSTER_IP, CLUSTER_PORT,
};

/// Where the node-local proxy listens.
const PROXY_PORT: u16 = 15443;
/// The agent's socket mark for its own upstream connections.
const AGENT_MARK: u32 = 0x7467;
/// How long a connection may take to show up at a listener before the test fails.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);

fn cluster_ip() -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, CLUSTER_PORT))
}
fn endpoint() -> SocketAddr {
    SocketAddr::from((API_SERVER_IP, API_SERVER_PORT))
}
fn endpoint6() -> SocketAddr {
    SocketAddr::from((API_SERVER_IP6, API_SERVER_PORT))
}
/// The ClusterIP dialled through an AF_INET6 socket.
fn mapped_cluster_ip() -> SocketAddr {
    SocketAddr::from((CLUSTER_IP.to_ipv6_mapped(), CLUSTER_PORT))
}

/// A topology with the agent's data path attached to its cgroup root. Dropping it removes
/// the pins and links first, then the topology, also when a test fails.
struct Fixture {
    dp: Option<Datapath>,
    config: DatapathConfig,
    /// The agent's own pod (a DaemonSet pod under kubepods, never classified by the
    /// agent): its container cgroup is the agent cgroup the data path exempts.
    agent_pod: PodSandbox,
    topo: Topology,
}

impl Fixture {
    fn new() -> Fixture {
        tollgate_tests::require_root();
        remove_stale_bpffs();
        let id = unique_id();
        let topo = Topology::create(&id, 1).expect("building the topology");
        let node = topo.node(1);
        let agent_pod = node
            .add_pod(
                200,
                PodSpec::new("tollgate-agent", CgroupDriver::Systemd, QosClass::Burstable),
            )
            .expect("adding the agent's pod");
        let host_netns_cookie = node
            .netns
            .run_in(current_netns_cookie)
            .expect("entering the node namespace")
            .expect("reading the node's netns cookie");
        let mut config = DatapathConfig::new(&topo.cgroup_root, Path::new("/sys/fs/bpf").join(&id));
        config.proxy_port = PROXY_PORT;
        config.proxy_addr4 = Some(node.pod_gateway);
        config.proxy_addr6 = Some(node.pod_gateway6);
        config.host_netns_cookie = Some(host_netns_cookie);
        config.agent_mark = AGENT_MARK;
        config.agent_cgroup = Some(agent_pod.container_cgroup.clone());
        let mut f = Fixture {
            dp: None,
            config,
            agent_pod,
            topo,
        };
        f.install();
        f.dp()
            .set_targets(&[cluster_ip(), endpoint(), endpoint6()])
            .expect("setting the API-server targets");
        f
    }

    /// Loads and attaches (adopting whatever is pinned), as an agent does at start.
    fn install(&mut self) {
        self.dp = Some(Datapath::install(&self.config).expect("installing the data path"));
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("data path installed")
    }

    fn node(&self) -> &Node {
        self.topo.node(1)
    }

    /// Adds a pod; `class` None leaves it unclassified (a pod the agent has not seen).
    fn pod(
        &mut self,
        n: u8,
        name: &str,
        driver: CgroupDriver,
        qos: QosClass,
        class: Option<CgroupClass>,
    ) -> PodSandbox {
        let pod = self
            .node()
            .add_pod(n, PodSpec::new(name, driver, qos))
            .expect("adding a pod");
        // kubelet makes the kubepods parents lazily; the agent marks them as they appear.
        self.dp()
            .sync_pod_parents()
            .expect("marking kubepods parents");
        if let Some(class) = class {
            let id = pod.pod_cgroup_id().expect("pod cgroup id");
            self.dp()
                .set_cgroup(id, class)
                .expect("classifying the pod");
        }
        pod
    }

    /// A listener where the proxy would be, reachable from pods (IPv4 or IPv6).
    fn proxy_listener(&self, v6: bool) -> TcpListener {
        let node = self.node();
        let ip: IpAddr = node.pod_facing_addr(v6);
        listen(&node.netns, SocketAddr::new(ip, PROXY_PORT))
    }

    /// A listener at the API server's address in the control-plane namespace.
    fn api_listener(&self, addr: SocketAddr) -> TcpListener {
        listen(&self.topo.control_plane, addr)
    }

    /// What the proxy does after accept(): take the connection's origin (the record is
    /// consumed, so a second lookup finds nothing).
    fn take_origin(&mut self, stream: &TcpStream) -> Option<ConnOrigin> {
        let dp = self.dp();
        let origin = dp.take_origin_of(stream).expect("looking up the origin");
        assert_eq!(
            dp.origin_of(stream).expect("looking up the origin again"),
            None,
            "the origin record outlived its lookup"
        );
        origin
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.dp.take());
        if let Err(e) = datapath::uninstall(&self.config.bpffs) {
            eprintln!(
                "datapath test: uninstall {}: {e}",
                self.config.bpffs.display()
            );
        }
        // `topo` tears the namespaces and cgroups down when it drops after this.
    }
}

/// Removes pins left under /sys/fs/bpf by test processes that no longer run.
fn remove_stale_bpffs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("tgp")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = datapath::uninstall(&entry.path());
        }
    }
}

/// Binds a listener inside `netns`; non-blocking, so accepts can be bounded in time.
fn listen(netns: &Netns, addr: SocketAddr) -> TcpListener {
    let listener = netns
        .run_in(|| TcpListener::bind(addr))
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", netns.name));
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Waits up to `timeout` for a connection on `listener`.
fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n <= 0 {
        return None;
    }
    let (stream, peer) = listener.accept().ok()?;
    stream.set_nonblocking(false).unwrap();
    Some((stream, peer))
}

/// Asserts that nothing is waiting on `listener`. Called after the client has reported
/// its outcome: a connection that reached the listener is in its accept queue by then.
fn assert_accepted_nothing(listener: &TcpListener, what: &str) {
    if let Some((_, peer)) = accept_within(listener, Duration::from_millis(100)) {
        panic!("{what} accepted a connection from {peer}, and must not have");
    }
}

/// Runs `tg-probe MODE ADDR ARGS` through `cmd` (a pod's or a host process's command
/// builder) and returns its JSON line.
fn probe(mut cmd: Command, mode: &str, addr: SocketAddr, args: &[&str]) -> Value {
    let out = cmd
        .arg(mode)
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running tg-probe");
    assert!(
        out.status.success(),
        "tg-probe failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tg-probe printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const PROBE: &str = env!("CARGO_BIN_EXE_tg-probe");

fn pod_probe(pod: &PodSandbox, addr: SocketAddr, args: &[&str]) -> Value {
    probe(
        pod.command(PROBE).expect("pod command"),
        "connect",
        addr,
        args,
    )
}

fn assert_connected(result: &Value, dialled: SocketAddr, who: &str) {
    assert_eq!(
        result["ok"], true,
        "{who}: connect to {dialled} failed: {result}"
    );
    // getpeername inside the pod reports what it dialled, not the proxy.
    assert_eq!(
        result["peer"].as_str(),
        Some(dialled.to_string().as_str()),
        "{who}: getpeername after dialling {dialled}: {result}"
    );
}

/// The pod dials `dialled`; the proxy listener must accept it and learn `dialled` and the
/// pod's cgroup id; the API-server listener must not see it.
fn assert_redirected(
    f: &mut Fixture,
    pod: &PodSandbox,
    dialled: SocketAddr,
    proxy: &TcpListener,
    api: &TcpListener,
    args: &[&str],
) -> TcpStream {
    let who = &pod.spec.name;
    let result = pod_probe(pod, dialled, args);
    assert_connected(&result, dialled, who);
    let (stream, peer) = accept_within(proxy, ACCEPT_TIMEOUT)
        .unwrap_or_else(|| panic!("{who}: the proxy never saw the connection to {dialled}"));
    // The pod's own address, as the proxy sees it (an AF_INET6 socket that dialled a
    // v4-mapped address reports `::ffff:a.b.c.d` locally).
    let local: SocketAddr = result["local"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        (local.ip().to_canonical(), local.port()),
        (peer.ip().to_canonical(), peer.port()),
        "{who}: the proxy accepted someone else"
    );
    let origin = f
        .take_origin(&stream)
        .unwrap_or_else(|| panic!("{who}: no origin recorded for {peer} → {dialled} ({args:?})"));
    assert_eq!(origin.dst, dialled, "{who}: original destination");
    assert_eq!(
        origin.pod_cgroup_id,
        pod.pod_cgroup_id().unwrap(),
        "{who}: pod cgroup id ({})",
        pod.pod_cgroup.display()
    );
    assert_accepted_nothing(api, "the API-server listener");
    stream
}

#[test]
fn enforced_pods_of_every_driver_and_qos_class_land_on_the_proxy() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());
    let mut n = 0;
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        for qos in QosClass::ALL {
            n += 1;
            let pod = f.pod(
                n,
                &format!("enforced{n}"),
                driver,
                qos,
                Some(CgroupClass::Enforced),
            );
            // ClusterIP, the endpoint directly, and the ClusterIP through AF_INET6.
            for dialled in [cluster_ip(), endpoint(), mapped_cluster_ip()] {
                assert_redirected(&mut f, &pod, dialled, &proxy, &api, &[]);
            }
        }
    }
}

#[test]
fn unclassified_pods_are_redirected_too() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());
    let mut n = 0;
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        for qos in QosClass::ALL {
            n += 1;
            let pod = f.pod(n, &format!("new{n}"), driver, qos, None);
            assert_redirected(&mut f, &pod, endpoint(), &proxy, &api, &[]);
        }
    }
}

#[test]
fn exempt_pods_reach_the_api_server_directly() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());
    let mut n = 0;
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        for qos in QosClass::ALL {
            n += 1;
            let pod = f.pod(
                n,
                &format!("exempt{n}"),
                driver,
                qos,
                Some(CgroupClass::Exempt),
            );
            let result = pod_probe(&pod, endpoint(), &[]);
            assert_connected(&result, endpoint(), &pod.spec.name);
            let (_, peer) = accept_within(&api, ACCEPT_TIMEOUT)
                .expect("the API server never saw the exempt pod");
            assert_eq!(peer.ip(), IpAddr::V4(pod.ip), "API server saw someone else");
            assert_accepted_nothing(&proxy, "the proxy");
        }
    }
}

#[test]
fn other_destinations_are_untouched() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let other_port = f.api_listener(SocketAddr::from((API_SERVER_IP, 8080)));
    let pod = f.pod(
        1,
        "enforced",
        CgroupDriver::Systemd,
        QosClass::BestEffort,
        Some(CgroupClass::Enforced),
    );
    // Same address, another port; and the node itself.
    let other = SocketAddr::from((API_SERVER_IP, 8080));
    let result = pod_probe(&pod, other, &[]);
    assert_connected(&result, other, "enforced pod → other port");
    accept_within(&other_port, ACCEPT_TIMEOUT).expect("the other service never saw the pod");
    let node_service = listen(
        &f.node().netns,
        SocketAddr::from((f.node().pod_gateway, 10250)),
    );
    let kubelet = SocketAddr::from((f.node().pod_gateway, 10250));
    let result = pod_probe(&pod, kubelet, &[]);
    assert_connected(&result, kubelet, "enforced pod → node port");
    accept_within(&node_service, ACCEPT_TIMEOUT).expect("the node service never saw the pod");
    assert_accepted_nothing(&proxy, "the proxy");
}

#[test]
fn the_agents_own_connections_and_host_processes_are_not_redirected() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());

    // The agent's own pod: under kubepods, never classified, but its cgroup is the
    // agent's, which the data path exempts.
    let result = pod_probe(&f.agent_pod, endpoint(), &[]);
    assert_connected(&result, endpoint(), "agent pod");
    let (_, peer) = accept_within(&api, ACCEPT_TIMEOUT).expect("agent pod was redirected");
    assert_eq!(peer.ip(), IpAddr::V4(f.agent_pod.ip));

    // A socket with the agent's mark, even from an enforced pod's cgroup.
    let pod = f.pod(
        1,
        "marked",
        CgroupDriver::Cgroupfs,
        QosClass::Guaranteed,
        Some(CgroupClass::Enforced),
    );
    let mark = AGENT_MARK.to_string();
    let result = pod_probe(&pod, endpoint(), &["--mark", &mark]);
    assert_connected(&result, endpoint(), "marked socket");
    accept_within(&api, ACCEPT_TIMEOUT).expect("the agent-marked socket was redirected");
    // ... and without the mark the same pod is redirected (the test can fail).
    assert_redirected(&mut f, &pod, endpoint(), &proxy, &api, &[]);

    // A host process on the node (kubelet, say): outside kubepods.
    let kubelet_cgroup = f.node().host_cgroup("kubelet").unwrap();
    let cmd = f
        .node()
        .netns
        .command_in_cgroup(&kubelet_cgroup, PROBE)
        .unwrap();
    let result = probe(cmd, "connect", endpoint(), &[]);
    assert_connected(&result, endpoint(), "kubelet");
    let (_, peer) = accept_within(&api, ACCEPT_TIMEOUT).expect("a host process was redirected");
    assert_eq!(peer.ip(), IpAddr::V4(f.node().ip));
    assert_accepted_nothing(&proxy, "the proxy");
}

#[test]
fn fail_closed_when_no_proxy_listens() {
    let mut f = Fixture::new();
    let api = f.api_listener(endpoint());
    let api6 = f.api_listener(endpoint6());
    let pod = f.pod(
        1,
        "enforced",
        CgroupDriver::Systemd,
        QosClass::Burstable,
        Some(CgroupClass::Enforced),
    );
    let unclassified = f.pod(2, "new", CgroupDriver::Cgroupfs, QosClass::BestEffort, None);
    for p in [&pod, &unclassified] {
        for dialled in [endpoint(), mapped_cluster_ip(), cluster_ip(), endpoint6()] {
            let result = pod_probe(p, dialled, &["--timeout-ms", "3000"]);
            assert_eq!(
                result["ok"], false,
                "{} reached {dialled}: {result}",
                p.spec.name
            );
            // Refused at the node, not timed out somewhere on the way.
            let error = result["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("refused"),
                "{} → {dialled}: expected a refusal, got {error}",
                p.spec.name
            );
        }
    }
    assert_accepted_nothing(&api, "the API-server listener");
    assert_accepted_nothing(&api6, "the API-server listener (IPv6)");
    // Sanity: the API server is reachable at all (an exempt pod gets through).
    let exempt = f.pod(
        3,
        "exempt",
        CgroupDriver::Systemd,
        QosClass::Guaranteed,
        Some(CgroupClass::Exempt),
    );
    assert_connected(&pod_probe(&exempt, endpoint(), &[]), endpoint(), "exempt");
    accept_within(&api, ACCEPT_TIMEOUT).expect("the API server is unreachable");
}

#[test]
fn non_blocking_connect_and_tcp_fast_open_are_redirected() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());
    let pod = f.pod(
        1,
        "enforced",
        CgroupDriver::Cgroupfs,
        QosClass::Burstable,
        Some(CgroupClass::Enforced),
    );
    for dialled in [endpoint(), cluster_ip(), mapped_cluster_ip()] {
        assert_redirected(&mut f, &pod, dialled, &proxy, &api, &["--nonblock"]);
        let mut stream =
            assert_redirected(&mut f, &pod, dialled, &proxy, &api, &["--tfo", "tollgate"]);
        // The data handed to sendto(MSG_FASTOPEN) arrives at the proxy.
        stream.set_read_timeout(Some(ACCEPT_TIMEOUT)).unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, b"tollgate", "TFO payload at the proxy");
    }
}

#[test]
fn native_ipv6_targets_are_redirected() {
    let mut f = Fixture::new();
    let proxy6 = f.proxy_listener(true);
    let api6 = f.api_listener(endpoint6());
    let pod = f.pod(
        1,
        "enforced",
        CgroupDriver::Systemd,
        QosClass::Guaranteed,
        Some(CgroupClass::Enforced),
    );
    let unclassified = f.pod(2, "new", CgroupDriver::Cgroupfs, QosClass::Burstable, None);
    for p in [&pod, &unclassified] {
        assert_redirected(&mut f, p, endpoint6(), &proxy6, &api6, &[]);
        assert_redirected(&mut f, p, endpoint6(), &proxy6, &api6, &["--nonblock"]);
    }
    let exempt = f.pod(
        3,
        "exempt",
        CgroupDriver::Systemd,
        QosClass::BestEffort,
        Some(CgroupClass::Exempt),
    );
    // A fresh namespace's first IPv6 packets can be lost while its link-local addresses
    // are still tentative (DAD); TCP retransmits the SYN after 1 s, so allow for that.
    let result = pod_probe(&exempt, endpoint6(), &["--timeout-ms", "8000"]);
    assert_connected(&result, endpoint6(), "exempt");
    accept_within(&api6, ACCEPT_TIMEOUT).expect("an exempt pod did not reach [fd77::10]");
    assert_accepted_nothing(&proxy6, "the IPv6 proxy");
}

#[test]
fn host_network_pods_are_sent_to_the_proxy_on_loopback() {
    let mut f = Fixture::new();
    let loopback_proxy = listen(
        &f.node().netns,
        SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)),
    );
    let api = f.api_listener(endpoint());
    let pod = f.pod(
        1,
        "hostnet",
        CgroupDriver::Systemd,
        QosClass::Burstable,
        Some(CgroupClass::Enforced),
    );
    // A hostNetwork pod: the node's network namespace, the pod's cgroup.
    let cmd = f
        .node()
        .netns
        .command_in_cgroup(&pod.container_cgroup, PROBE)
        .unwrap();
    let result = probe(cmd, "connect", endpoint(), &[]);
    assert_connected(&result, endpoint(), "hostNetwork pod");
    let (stream, _) =
        accept_within(&loopback_proxy, ACCEPT_TIMEOUT).expect("loopback proxy never saw it");
    let origin = f
        .take_origin(&stream)
        .expect("origin of the hostNetwork pod");
    assert_eq!(origin.dst, endpoint());
    assert_eq!(origin.pod_cgroup_id, pod.pod_cgroup_id().unwrap());
    assert_accepted_nothing(&api, "the API-server listener");
}

#[test]
fn no_connection_slips_through_across_agent_restarts() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());
    let pod = f.pod(
        1,
        "looper",
        CgroupDriver::Systemd,
        QosClass::BestEffort,
        Some(CgroupClass::Enforced),
    );
    let stop_file = PathBuf::from(format!("/tmp/{}-stop", f.topo.id));
    let _ = std::fs::remove_file(&stop_file);
    let stop = AtomicBool::new(false);
    let at_proxy = AtomicU64::new(0);
    let at_api = AtomicU64::new(0);

    let summary: Value = std::thread::scope(|s| {
        // Listener loops: accept, count, close (the probe waits for the close).
        for (listener, count) in [(&proxy, &at_proxy), (&api, &at_api)] {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if accept_within(listener, Duration::from_millis(50)).is_some() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let child = pod
            .command(PROBE)
            .unwrap()
            .args(["loop", &endpoint().to_string()])
            .args(["--until-file", stop_file.to_str().unwrap()])
            .args(["--max-secs", "60", "--timeout-ms", "2000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the probe loop");

        let wait_for = |n: u64, what: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while at_proxy.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "stuck waiting for {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for(20, "the first connections");
        for round in 1..=3 {
            // Every user-space handle goes; the pins keep the programs attached.
            drop(f.dp.take());
            f.install();
            // The maps were adopted, not recreated: the targets are still there.
            let targets = f.dp().targets().unwrap();
            assert!(
                targets.contains(&endpoint()),
                "round {round}: targets lost across the restart: {targets:?}"
            );
            let seen = at_proxy.load(Ordering::Relaxed);
            wait_for(seen + 20, "connections after a restart");
        }
        std::fs::write(&stop_file, b"stop").unwrap();
        let out = child.wait_with_output().unwrap();
        let _ = std::fs::remove_file(&stop_file);
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe loop printed no JSON ({e}): {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        // Let the proxy loop drain what is still queued, then stop both loops.
        let connected = summary["connected"].as_u64().unwrap_or(0);
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        while at_proxy.load(Ordering::Relaxed) < connected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        summary
    });
    eprintln!("restart loop: {summary}");
    assert_eq!(
        at_api.load(Ordering::Relaxed),
        0,
        "connections reached the API server directly across a restart"
    );
    assert_eq!(
        summary["failed"], 0,
        "connections failed across a restart: {summary}"
    );
    let connected = summary["connected"].as_u64().unwrap();
    assert!(
        connected >= 80,
        "too few connections to mean anything: {summary}"
    );
    assert_eq!(
        at_proxy.load(Ordering::Relaxed),
        connected,
        "every connection the pod made went to the proxy"
    );
}

#[test]
fn uninstall_removes_every_pin_and_link() {
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let api = f.api_listener(endpoint());
    let pod = f.pod(
        1,
        "enforced",
        CgroupDriver::Systemd,
        QosClass::Guaranteed,
        Some(CgroupClass::Enforced),
    );
    assert_redirected(&mut f, &pod, endpoint(), &proxy, &api, &[]);
    let status = datapath::status(&f.config.bpffs).unwrap();
    assert_eq!(status.links.len(), 5, "links pinned: {status:?}");
    assert_eq!(status.maps.len(), 5, "maps pinned: {status:?}");

    drop(f.dp.take());
    let removed = datapath::uninstall(&f.config.bpffs).unwrap();
    assert!(!removed.is_empty());
    assert!(
        !f.config.bpffs.exists(),
        "the bpffs directory is still there"
    );
    // Nothing is attached any more: the pod goes straight to the API server.
    let result = pod_probe(&pod, endpoint(), &[]);
    assert_connected(&result, endpoint(), "after uninstall");
    accept_within(&api, ACCEPT_TIMEOUT).expect("still redirected after uninstall");
    assert_accepted_nothing(&proxy, "the proxy");
}

/// Runs `tg-probe loop` in `pod` against `addr` for `count` connections while a thread
/// accepts (and closes) them on `listener`; returns the probe's summary and how many
/// connections the listener accepted.
fn connect_loop(
    pod: &PodSandbox,
    addr: SocketAddr,
    listener: &TcpListener,
    count: u64,
) -> (Value, u64) {
    let stop = AtomicBool::new(false);
    let accepted = AtomicU64::new(0);
    let summary = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if accept_within(listener, Duration::from_millis(50)).is_some() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let count = count.to_string();
        let out = pod
            .command(PROBE)
            .unwrap()
            .args(["loop", &addr.to_string(), "--max-count", &count])
            .args(["--max-secs", "60", "--timeout-ms", "2000"])
            .stdin(Stdio::null())
            .output()
            .expect("running the probe loop");
        let summary: Value = serde_json::from_slice(&out.stdout).expect("probe loop JSON");
        let connected = summary["connected"].as_u64().unwrap_or(0);
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        while accepted.load(Ordering::Relaxed) < connected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        summary
    });
    (summary, accepted.load(Ordering::Relaxed))
}

/// The cost of the connect hook per call, from the kernel's own statistics (DESIGN §9):
/// for a redirected connect and for one to an unrelated destination (the common case).
#[test]
fn connect_hook_cost_per_call() {
    const N: u64 = 2000;
    let mut f = Fixture::new();
    let proxy = f.proxy_listener(false);
    let other = f.api_listener(SocketAddr::from((API_SERVER_IP, 8080)));
    let pod = f.pod(
        1,
        "bench",
        CgroupDriver::Systemd,
        QosClass::Burstable,
        Some(CgroupClass::Enforced),
    );
    let _stats = datapath::enable_stats().expect("enabling BPF statistics");
    let connect4 = |f: &mut Fixture| {
        f.dp()
            .program_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "tg_connect4")
            .unwrap()
    };
    let mut per_call = Vec::new();
    for (what, addr, listener) in [
        ("redirected (API server)", cluster_ip(), &proxy),
        (
            "untouched (other destination)",
            SocketAddr::from((API_SERVER_IP, 8080)),
            &other,
        ),
    ] {
        let before = connect4(&mut f);
        let (summary, accepted) = connect_loop(&pod, addr, listener, N);
        let after = connect4(&mut f);
        assert_eq!(summary["connected"], N, "{what}: {summary}");
        assert_eq!(accepted, N, "{what}: listener accepted {accepted} of {N}");
        let calls = after.run_count - before.run_count;
        assert!(
            calls >= N,
            "{what}: connect4 ran {calls} times for {N} connects"
        );
        let nanos = (after.run_time - before.run_time).as_nanos() / u128::from(calls);
        eprintln!("connect4 {what}: {calls} calls, {nanos} ns per call");
        per_call.push(nanos);
    }
    // A generous bound: the point is to catch a slow path (e.g. logging per call), not
    // to benchmark on a loaded CI machine.
    for nanos in per_call {
        assert!(nanos < 20_000, "connect4 takes {nanos} ns per call");
    }
}

/// `gateway-agent doctor` finds everything the data path needs on this machine (the
/// suite itself just proved it works, so a failing check is a wrong check).
#[test]
fn doctor_passes_where_the_data_path_works() {
    tollgate_tests::require_root();
    // The agent mounts bpffs when it starts; doctor reports it missing before that.
    datapath::ensure_bpffs(Path::new(datapath::DEFAULT_BPFFS_DIR)).unwrap();
    let checks = gateway_agent::doctor::run(Path::new(datapath::DEFAULT_BPFFS_DIR));
    let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "kernel",
            "btf",
            "cgroup-bpf",
            "cgroup2",
            "bpffs",
            "privileges"
        ]
    );
    for c in &checks {
        assert!(c.ok, "doctor: {} failed: {}", c.name, c.detail);
    }
}

/// The DaemonSet grants the agent only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
/// (deploy/daemonset.yaml): with exactly those, and nothing else in the bounding set,
/// the data path installs, pins and is removed again.
#[test]
fn the_data_path_installs_with_only_the_daemonsets_capabilities() {
    const AGENT: &str = env!("CARGO_BIN_EXE_tg-agent");
    let id = unique_id();
    let cgroup = tollgate_tests::topology::cgroup2_mount()
        .expect("cgroup2")
        .join(format!("tgcaps-{id}"));
    std::fs::create_dir_all(&cgroup).expect("test cgroup");
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/tgcaps-{id}"));
    let limited = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--bounding-set=-all,+bpf,+net_admin,+perfmon",
                "--inh-caps=-all",
                AGENT,
            ])
            .args(args)
            .output()
            .expect("setpriv runs")
    };
    let doctor = limited(&["doctor"]);
    let doctor_out = String::from_utf8_lossy(&doctor.stdout).into_owned();
    let install = limited(&[
        "datapath",
        "install",
        "--cgroup-root",
        cgroup.to_str().expect("path"),
        "--bpffs",
        bpffs.to_str().expect("path"),
        "--proxy-port",
        "15443",
        "--node-ip",
        "10.77.255.1",
    ]);
    let installed = String::from_utf8_lossy(&install.stdout).into_owned();
    let status = Command::new(AGENT)
        .args(["datapath", "status", "--bpffs"])
        .arg(&bpffs)
        .output()
        .expect("status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let pinned = status.contains("TG_TARGETS") && status.contains("link");
    // Clean up before asserting, whatever happened.
    let _ = Command::new(AGENT)
        .args(["datapath", "uninstall", "--bpffs"])
        .arg(&bpffs)
        .output();
    let _ = std::fs::remove_dir(&bpffs);
    let _ = std::fs::remove_dir(&cgroup);
    assert!(
        doctor_out.contains("ok   privileges  CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"),
        "{doctor_out}"
    );
    assert!(
        install.status.success() && installed.contains("data path attached"),
        "{installed}{}",
        String::from_utf8_lossy(&install.stderr)
    );
    assert!(pinned, "the programs and maps were pinned: {status}");
}
