//! The kernel data path (DESIGN §2): load the eBPF programs, attach them to the cgroup
//! root, pin links and maps under a bpffs directory, keep the maps in sync, and tell the
//! proxy where an accepted connection was headed.
//!
//! Pins (`<bpffs>` defaults to `/sys/fs/bpf/tollgate`):
//!
//! ```text
//! <bpffs>/maps/TG_TARGETS, TG_CGROUPS, TG_CONFIG, TG_SOCK_ORIGINS, TG_FLOW_ORIGINS
//! <bpffs>/links/tg_connect4, tg_connect6, tg_getpeername4, tg_getpeername6, tg_sock_ops
//! ```
//!
//! A restarted agent adopts them: the loader reuses the pinned maps (state survives), the
//! new programs are attached next to the old links, and only then does the new link's pin
//! replace the old one (an atomic rename), which detaches the old link. Enforcement never
//! has a gap, and an upgrade replaces the programs the same way.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use aya::programs::{
    links::{FdLink, LinkError, PinnedLink},
    CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use gateway_common::{
    maps, programs, v4_mapped, Config, FlowKey, Origin, TargetKey, CONFIG_HAS_ADDR4,
    CONFIG_HAS_ADDR6,
};
use tracing::{debug, info};

pub use gateway_common::CgroupClass;

/// The compiled eBPF object (built by build.rs from `gateway-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// Where the agent pins by default.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/tollgate";
/// The conventional bpffs mount point, mounted when missing.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `SO_NETNS_COOKIE` (Linux 5.14+; not in every libc crate version).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The kubepods parent cgroups kubelet makes below the cgroup root (both drivers, every
/// QoS class): an unclassified cgroup right below one of them is a pod.
pub const PODS_PARENTS: [&str; 6] = [
    "kubepods.slice",
    "kubepods.slice/kubepods-burstable.slice",
    "kubepods.slice/kubepods-besteffort.slice",
    "kubepods",
    "kubepods/burstable",
    "kubepods/besteffort",
];

/// What can go wrong in the data path; each variant names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpf file system ({reason})")]
    Bpffs { path: PathBuf, reason: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("invalid data path configuration: {0}")]
    Config(String),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Io { what, path, source }
}

/// How the data path is set up; validated by [`Datapath::install`].
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// The cgroup the programs attach to (the cgroup-v2 root in production).
    pub cgroup_root: PathBuf,
    /// bpffs directory for the pins.
    pub bpffs: PathBuf,
    /// The proxy's port; redirected connections go there.
    pub proxy_port: u16,
    /// The node address pods reach the proxy at, for IPv4 and IPv6.
    pub proxy_addr4: Option<Ipv4Addr>,
    pub proxy_addr6: Option<Ipv6Addr>,
    /// The node's (host) network namespace cookie; sockets there go to loopback. `None`:
    /// the namespace this process runs in.
    pub host_netns_cookie: Option<u64>,
    /// Socket mark of the agent's upstream connections (0: none).
    pub agent_mark: u32,
    /// The agent's own cgroup, exempt from redirection. `None`: this process's cgroup.
    pub agent_cgroup: Option<PathBuf>,
}

impl DatapathConfig {
    pub fn new(cgroup_root: impl Into<PathBuf>, bpffs: impl Into<PathBuf>) -> DatapathConfig {
        DatapathConfig {
            cgroup_root: cgroup_root.into(),
            bpffs: bpffs.into(),
            proxy_port: 0,
            proxy_addr4: None,
            proxy_addr6: None,
            host_netns_cookie: None,
            agent_mark: 0,
            agent_cgroup: None,
        }
    }
}

/// Where an accepted connection was headed and which pod opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnOrigin {
    /// The address the pod dialled: `V4` through an AF_INET socket, `V6` through AF_INET6
    /// (native, or `::ffff:a.b.c.d` when it dialled an IPv4 address that way).
    pub dst: SocketAddr,
    /// The pod-level cgroup id (the cgroup kubelet made for the pod).
    pub pod_cgroup_id: u64,
}

/// The loaded and attached data path: one owner for the programs, maps and links.
pub struct Datapath {
    config: DatapathConfig,
    ebpf: Ebpf,
    _links: Vec<PinnedLink>,
    targets: HashMap<MapData, TargetKey, u8>,
    cgroups: HashMap<MapData, u64, u32>,
    flows: HashMap<MapData, FlowKey, Origin>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the programs, adopting pinned maps, writes the configuration, attaches to the
    /// cgroup root and pins the links (replacing older links without a gap), and marks the
    /// kubepods parents and the agent's own cgroup.
    pub fn install(config: &DatapathConfig) -> Result<Datapath> {
        if config.proxy_port == 0 {
            return Err(DatapathError::Config("the proxy port must be set".into()));
        }
        let cgroup = File::open(&config.cgroup_root)
            .map_err(io_err("opening cgroup root", &config.cgroup_root))?;
        ensure_bpffs(&config.bpffs)?;
        let maps_dir = config.bpffs.join("maps");
        let links_dir = config.bpffs.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        }
        let adopted = maps_dir.join(maps::CONFIG).exists();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)?;

        // The configuration first: the programs read it on their first call.
        let host_netns_cookie = match config.host_netns_cookie {
            Some(cookie) => cookie,
            None => current_netns_cookie().map_err(io_err(
                "reading netns cookie of",
                Path::new("/proc/self/ns/net"),
            ))?,
        };
        let mut cfg = Config {
            proxy_port: config.proxy_port,
            flags: 0,
            agent_mark: config.agent_mark,
            proxy_addr4: [0; 4],
            _pad: 0,
            proxy_addr6: [0; 16],
            host_netns_cookie,
        };
        if let Some(a) = config.proxy_addr4 {
            cfg.proxy_addr4 = a.octets();
            cfg.flags |= CONFIG_HAS_ADDR4;
        }
        if let Some(a) = config.proxy_addr6 {
            cfg.proxy_addr6 = a.octets();
            cfg.flags |= CONFIG_HAS_ADDR6;
        }
        let mut config_map: Array<MapData, Config> = take_map(&mut ebpf, maps::CONFIG)?;
        config_map
            .set(0, cfg, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::CONFIG,
                source,
            })?;

        let mut links = Vec::new();
        for name in programs::ALL {
            links.push(attach_and_pin(&mut ebpf, name, &cgroup, &links_dir)?);
        }
        let mut datapath = Datapath {
            config: config.clone(),
            targets: take_map(&mut ebpf, maps::TARGETS)?,
            cgroups: take_map(&mut ebpf, maps::CGROUPS)?,
            flows: take_map(&mut ebpf, maps::FLOW_ORIGINS)?,
            ebpf,
            _links: links,
        };
        let agent_cgroup = match &config.agent_cgroup {
            Some(path) => path.clone(),
            None => own_cgroup().map_err(io_err(
                "finding the cgroup of",
                Path::new("/proc/self/cgroup"),
            ))?,
        };
        datapath.set_cgroup(cgroup_id(&agent_cgroup)?, CgroupClass::Exempt)?;
        let parents = datapath.sync_pod_parents()?;
        info!(
            cgroup_root = %config.cgroup_root.display(),
            bpffs = %config.bpffs.display(),
            proxy_port = config.proxy_port,
            adopted,
            pods_parents = parents,
            "data path attached"
        );
        Ok(datapath)
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }

    /// Adds an API-server address (ClusterIP:port or endpoint IP:port).
    pub fn add_target(&mut self, target: SocketAddr) -> Result<()> {
        self.targets
            .insert(target_key(target), 1, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::TARGETS,
                source,
            })
    }

    pub fn remove_target(&mut self, target: SocketAddr) -> Result<()> {
        match self.targets.remove(&target_key(target)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: maps::TARGETS,
                source,
            }),
        }
    }

    /// Makes the target set exactly `targets` (adds first, then removes the rest).
    pub fn set_targets(&mut self, targets: &[SocketAddr]) -> Result<()> {
        for t in targets {
            self.add_target(*t)?;
        }
        let want: BTreeSet<SocketAddr> = targets.iter().copied().collect();
        for t in self.targets()? {
            if !want.contains(&t) {
                self.remove_target(t)?;
            }
        }
        Ok(())
    }

    /// The current targets (IPv4 ones as `V4`).
    pub fn targets(&self) -> Result<Vec<SocketAddr>> {
        let keys: Result<Vec<TargetKey>, MapError> = self.targets.keys().collect();
        let keys = keys.map_err(|source| DatapathError::Map {
            name: maps::TARGETS,
            source,
        })?;
        Ok(keys
            .iter()
            .map(|k| socket_addr(k.addr, k.port, 4))
            .collect())
    }

    /// Classifies a cgroup (a pod cgroup as Enforced or Exempt, or a kubepods parent).
    pub fn set_cgroup(&mut self, cgroup_id: u64, class: CgroupClass) -> Result<()> {
        debug!(cgroup_id, ?class, "classifying cgroup");
        self.cgroups
            .insert(cgroup_id, class as u32, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::CGROUPS,
                source,
            })
    }

    /// Forgets a cgroup (e.g. a deleted pod).
    pub fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<()> {
        match self.cgroups.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: maps::CGROUPS,
                source,
            }),
        }
    }

    /// Marks the kubepods parents that exist below the cgroup root; returns how many.
    /// Call again when a parent may have appeared (kubelet makes them lazily).
    pub fn sync_pod_parents(&mut self) -> Result<usize> {
        let mut n = 0;
        for rel in PODS_PARENTS {
            let path = self.config.cgroup_root.join(rel);
            if let Ok(meta) = fs::metadata(&path) {
                // Called periodically: write only what is not there yet.
                if self.cgroups.get(&meta.ino(), 0).ok() != Some(CgroupClass::PodsParent as u32) {
                    self.set_cgroup(meta.ino(), CgroupClass::PodsParent)?;
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Where the connection between `peer` (the pod) and `local` (the proxy) was headed.
    pub fn origin(&self, local: SocketAddr, peer: SocketAddr) -> Result<Option<ConnOrigin>> {
        match self.flows.get(&flow_key(local, peer), 0) {
            Ok(o) => Ok(Some(ConnOrigin {
                dst: socket_addr(o.addr, o.port, o.family),
                pod_cgroup_id: o.pod_cgroup_id,
            })),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: maps::FLOW_ORIGINS,
                source,
            }),
        }
    }

    /// Run counts and times of each program, accumulated by the kernel while statistics
    /// are enabled (see [`enable_stats`]).
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        programs::ALL
            .iter()
            .map(|&name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(DatapathError::MissingProgram(name))?;
                let info = program
                    .info()
                    .map_err(|source| DatapathError::Program { name, source })?;
                Ok(ProgramStats {
                    name,
                    run_count: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect()
    }

    /// [`Datapath::origin`], and forgets the record: what the proxy calls once per
    /// accepted connection, so that a record never outlives its connection (a later
    /// connection with the same 4-tuple, e.g. from a new pod on a recycled IP dialling
    /// the proxy directly, must not inherit it).
    pub fn take_origin(
        &mut self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Option<ConnOrigin>> {
        let origin = self.origin(local, peer)?;
        if origin.is_some() {
            match self.flows.remove(&flow_key(local, peer)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: maps::FLOW_ORIGINS,
                        source,
                    })
                }
            }
        }
        Ok(origin)
    }

    /// [`Datapath::take_origin`] for an accepted stream.
    pub fn take_origin_of(&mut self, stream: &TcpStream) -> Result<Option<ConnOrigin>> {
        let (local, peer) = stream_addrs(stream)?;
        self.take_origin(local, peer)
    }

    /// [`Datapath::origin`] for an accepted stream.
    pub fn origin_of(&self, stream: &TcpStream) -> Result<Option<ConnOrigin>> {
        let (local, peer) = stream_addrs(stream)?;
        self.origin(local, peer)
    }
}

/// How often a program ran and for how long in total.
#[derive(Debug, Clone, Copy)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time: std::time::Duration,
}

impl ProgramStats {
    /// Mean time per run.
    pub fn per_call(&self) -> std::time::Duration {
        if self.run_count == 0 {
            return std::time::Duration::ZERO;
        }
        let nanos = self.run_time.as_nanos() / u128::from(self.run_count);
        std::time::Duration::from_nanos(nanos as u64)
    }
}

/// Turns on the kernel's run-time statistics for every BPF program until the returned
/// fd is dropped (BPF_ENABLE_STATS; no sysctl is changed).
pub fn enable_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| DatapathError::Io {
        what: "enabling BPF statistics",
        path: PathBuf::from("BPF_ENABLE_STATS"),
        source: e.io_error,
    })
}

/// Loads, attaches and pins one program. The new link is pinned beside the old one and
/// renamed over it: the old link stays attached until the new one is.
fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    links_dir: &Path,
) -> Result<PinnedLink> {
    let prog_err = |source| DatapathError::Program { name, source };
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    let link: FdLink = if name == programs::SOCK_OPS {
        let p: &mut SockOps = program.try_into().map_err(prog_err)?;
        p.load().map_err(prog_err)?;
        let id = p
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        let link = p.take_link(id).map_err(prog_err)?;
        FdLink::try_from(link)
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(prog_err)?;
        p.load().map_err(prog_err)?;
        let id = p
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        let link = p.take_link(id).map_err(prog_err)?;
        FdLink::try_from(link)
    }
    .map_err(|source| DatapathError::Link {
        path: links_dir.join(name),
        source,
    })?;
    let final_path = links_dir.join(name);
    let new_path = links_dir.join(format!("{name}_new"));
    // A crash between pin and rename leaves a `_new` pin (bpffs forbids dots in names): its link is a duplicate.
    let _ = fs::remove_file(&new_path);
    let pinned = link.pin(&new_path).map_err(|source| DatapathError::Pin {
        path: new_path.clone(),
        source,
    })?;
    fs::rename(&new_path, &final_path).map_err(io_err("renaming pin", &new_path))?;
    // PinnedLink remembers the path it was pinned at; reopen it under its final name so
    // the handle we keep says the truth.
    drop(pinned);
    PinnedLink::from_pin(&final_path).map_err(|source| DatapathError::Link {
        path: final_path,
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Map {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// What is pinned under a bpffs directory.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub links: Vec<(String, Option<u32>)>,
    pub maps: Vec<String>,
    pub targets: Vec<SocketAddr>,
    pub cgroups: Vec<(u64, Option<CgroupClass>)>,
    pub config: Option<Config>,
}

/// Reads what is pinned under `bpffs` without loading anything.
pub fn status(bpffs: &Path) -> Result<Status> {
    let mut status = Status::default();
    for name in programs::ALL {
        let path = bpffs.join("links").join(name);
        if path.exists() {
            let prog_id = PinnedLink::from_pin(&path)
                .ok()
                .and_then(|l| FdLink::from(l).info().ok())
                .map(|info| info.program_id());
            status.links.push((name.to_owned(), prog_id));
        }
    }
    let maps_dir = bpffs.join("maps");
    for name in maps::ALL {
        if maps_dir.join(name).exists() {
            status.maps.push(name.to_owned());
        }
    }
    if let Some(map) = open_pinned_map(&maps_dir, maps::TARGETS)? {
        let targets: HashMap<MapData, TargetKey, u8> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map {
                name: maps::TARGETS,
                source,
            })?;
        for k in targets.keys().flatten() {
            status.targets.push(socket_addr(k.addr, k.port, 4));
        }
    }
    if let Some(map) = open_pinned_map(&maps_dir, maps::CGROUPS)? {
        let cgroups: HashMap<MapData, u64, u32> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map {
                name: maps::CGROUPS,
                source,
            })?;
        for (id, class) in cgroups.iter().flatten() {
            status.cgroups.push((id, CgroupClass::from_u32(class)));
        }
    }
    if let Some(map) = open_pinned_map(&maps_dir, maps::CONFIG)? {
        let config: Array<MapData, Config> =
            Array::try_from(map).map_err(|source| DatapathError::Map {
                name: maps::CONFIG,
                source,
            })?;
        status.config = config.get(&0, 0).ok();
    }
    Ok(status)
}

fn open_pinned_map(dir: &Path, name: &'static str) -> Result<Option<Map>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::Map { name, source })?;
    Map::from_map_data(data)
        .map(Some)
        .map_err(|source| DatapathError::Map { name, source })
}

/// Removes every pin under `bpffs` that the data path makes: the link pins (which detaches
/// the programs once no process holds them) and the map pins, then the directories.
/// Returns the removed paths.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links_dir = bpffs.join("links");
    let maps_dir = bpffs.join("maps");
    let mut pins: Vec<PathBuf> = Vec::new();
    for name in programs::ALL {
        pins.push(links_dir.join(name));
        pins.push(links_dir.join(format!("{name}_new")));
    }
    for name in maps::ALL {
        pins.push(maps_dir.join(name));
    }
    for path in pins {
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing pin", &path)(e)),
        }
    }
    for dir in [&links_dir, &maps_dir, &bpffs.to_path_buf()] {
        match fs::remove_dir(dir) {
            Ok(()) => removed.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing directory", dir)(e)),
        }
    }
    info!(bpffs = %bpffs.display(), removed = removed.len(), "data path uninstalled");
    Ok(removed)
}

/// Makes sure `dir` can hold pins: it must be on bpffs. When it lies below
/// `/sys/fs/bpf` and nothing is mounted there, bpffs is mounted.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    if dir.starts_with(BPFFS_MOUNT) && Path::new(BPFFS_MOUNT).is_dir() {
        info!("mounting bpffs at {BPFFS_MOUNT}");
        nix::mount::mount(
            Some("bpf"),
            BPFFS_MOUNT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::Bpffs {
            path: dir.to_owned(),
            reason: format!("mounting bpffs at {BPFFS_MOUNT}: {e}"),
        })?;
        return Ok(());
    }
    Err(DatapathError::Bpffs {
        path: dir.to_owned(),
        reason: format!("{} is not bpffs", probe.display()),
    })
}

/// Whether `path` lies on a bpf file system.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The cookie of the network namespace this thread runs in (`SO_NETNS_COOKIE`), the
/// value `bpf_get_netns_cookie` returns for sockets there.
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len are valid out pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cgroup-v2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
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
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup2 file system in /proc/self/mountinfo",
    ))
}

/// This process's cgroup-v2 directory.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")?;
    let rel = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup-v2 line"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// A cgroup's id as eBPF sees it: the inode number of its cgroup2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .map_err(io_err("reading cgroup", path))?
        .ino())
}

fn mapped_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

fn stream_addrs(stream: &TcpStream) -> Result<(SocketAddr, SocketAddr)> {
    let local = stream
        .local_addr()
        .map_err(io_err("local address of", Path::new("accepted stream")))?;
    let peer = stream
        .peer_addr()
        .map_err(io_err("peer address of", Path::new("accepted stream")))?;
    Ok((local, peer))
}

/// The 4-tuple key of a connection between `peer` (the pod) and `local` (the proxy).
fn flow_key(local: SocketAddr, peer: SocketAddr) -> FlowKey {
    FlowKey {
        client_addr: mapped_octets(peer.ip()),
        proxy_addr: mapped_octets(local.ip()),
        client_port: peer.port(),
        proxy_port: local.port(),
    }
}

fn target_key(target: SocketAddr) -> TargetKey {
    TargetKey {
        addr: mapped_octets(target.ip()),
        port: target.port(),
        _pad: 0,
    }
}

/// Back from the 16-byte form: v4-mapped addresses become `V4` when `family` is 4.
fn socket_addr(addr: [u8; 16], port: u16, family: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if family == 4 => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        _ => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        let v4: SocketAddr = "10.96.0.1:443".parse().unwrap();
        let k = target_key(v4);
        assert_eq!(k.addr, v4_mapped([10, 96, 0, 1]));
        assert_eq!(socket_addr(k.addr, k.port, 4), v4);
        let mapped: SocketAddr = "[::ffff:10.96.0.1]:443".parse().unwrap();
        assert_eq!(target_key(mapped).addr, k.addr);
        assert_eq!(socket_addr(k.addr, 443, 6), mapped);
        let v6: SocketAddr = "[fd77::10]:6443".parse().unwrap();
        assert_eq!(socket_addr(target_key(v6).addr, 6443, 6), v6);
        assert_eq!(socket_addr(target_key(v6).addr, 6443, 4), v6);
    }
}
