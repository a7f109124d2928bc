//! Types shared by the kernel programs (`gateway-ebpf`) and user space (`gateway-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so the two sides
//! agree byte for byte and hash keys never carry uninitialised bytes. Addresses are
//! 16 bytes in network order: IPv6 as is, IPv4 as v4-mapped (`::ffff:a.b.c.d`). Ports are
//! in host order.
#![no_std]

/// Map names, as the programs declare them and user space finds them (and pins them).
pub mod maps {
    /// API-server targets: [`super::TargetKey`] → `u8` (1 = present).
    pub const TARGETS: &str = "TG_TARGETS";
    /// Cgroup classification: cgroup id (`u64`) → [`super::CgroupClass`] as `u32`.
    pub const CGROUPS: &str = "TG_CGROUPS";
    /// One [`super::Config`] at index 0.
    pub const CONFIG: &str = "TG_CONFIG";
    /// Socket cookie (`u64`) → [`super::Origin`] for redirected sockets.
    pub const SOCK_ORIGINS: &str = "TG_SOCK_ORIGINS";
    /// [`super::FlowKey`] → [`super::Origin`] once a redirected connection is established.
    pub const FLOW_ORIGINS: &str = "TG_FLOW_ORIGINS";

    pub const ALL: [&str; 5] = [TARGETS, CGROUPS, CONFIG, SOCK_ORIGINS, FLOW_ORIGINS];
}

/// Program names (the functions in `gateway-ebpf`), also the names their links are pinned by.
pub mod programs {
    pub const CONNECT4: &str = "tg_connect4";
    pub const CONNECT6: &str = "tg_connect6";
    pub const GETPEERNAME4: &str = "tg_getpeername4";
    pub const GETPEERNAME6: &str = "tg_getpeername6";
    pub const SOCK_OPS: &str = "tg_sock_ops";

    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6, SOCK_OPS];
}

pub const TARGETS_MAX: u32 = 1024;
pub const CGROUPS_MAX: u32 = 65536;
pub const SOCK_ORIGINS_MAX: u32 = 65536;
pub const FLOW_ORIGINS_MAX: u32 = 65536;
/// How many cgroup levels the programs walk up from a socket's cgroup.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// What the agent knows about a cgroup (values of [`maps::CGROUPS`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupClass {
    /// A pod whose API-server connections go to the proxy.
    Enforced = 1,
    /// A pod (or the agent itself) that talks to the API server directly.
    Exempt = 2,
    /// A kubepods parent (`kubepods.slice`, `kubepods/burstable`, …): a cgroup below it
    /// that is not classified yet is a pod the agent has not seen, and is redirected.
    PodsParent = 3,
}

impl CgroupClass {
    pub fn from_u32(v: u32) -> Option<CgroupClass> {
        match v {
            1 => Some(CgroupClass::Enforced),
            2 => Some(CgroupClass::Exempt),
            3 => Some(CgroupClass::PodsParent),
            _ => None,
        }
    }
}

/// An API-server address: Service ClusterIP:port or an endpoint IP:port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

/// Configuration written by the agent, read by every program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where redirected connections go (host order); 0 = not configured yet.
    pub proxy_port: u16,
    /// Bit 0: `proxy_addr4` is set; bit 1: `proxy_addr6` is set.
    pub flags: u16,
    /// Socket mark of the agent's own upstream connections (0 = none): never redirected.
    pub agent_mark: u32,
    /// The pod-facing proxy address for IPv4 (network order).
    pub proxy_addr4: [u8; 4],
    pub _pad: u32,
    /// The pod-facing proxy address for IPv6.
    pub proxy_addr6: [u8; 16],
    /// The host network namespace's cookie: sockets there are sent to loopback instead.
    pub host_netns_cookie: u64,
}

pub const CONFIG_HAS_ADDR4: u16 = 1;
pub const CONFIG_HAS_ADDR6: u16 = 2;

/// Where a redirected connection was headed, and from which pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The dialled address (v4-mapped for IPv4).
    pub addr: [u8; 16],
    pub port: u16,
    /// 4 when dialled through an AF_INET socket, 6 through AF_INET6 (mapped or native).
    pub family: u16,
    pub _pad: u32,
    /// The pod-level cgroup id of the connecting socket.
    pub pod_cgroup_id: u64,
}

/// An established connection seen from the client: its own address and the peer
/// (the proxy) it is connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub proxy_addr: [u8; 16],
    pub client_port: u16,
    pub proxy_port: u16,
}

/// `::ffff:a.b.c.d` for an IPv4 address given in network order.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is #[repr(C)], made of integers and byte arrays, with explicit
    // padding fields: any bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::FlowKey {}
}
