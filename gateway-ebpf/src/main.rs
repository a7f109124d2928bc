//! Tollgate's kernel data path (DESIGN §2).
//!
//! * `tg_connect4` / `tg_connect6` (cgroup/connect4, cgroup/connect6): a TCP connect from a
//!   pod to an API-server target is rewritten to the node-local proxy, and its original
//!   destination and pod cgroup id are remembered by socket cookie.
//! * `tg_sock_ops`: once such a connection is established, the origin is also stored under
//!   the connection's 4-tuple, which is what the proxy can look up after `accept()`.
//! * `tg_getpeername4` / `tg_getpeername6`: the pod sees the peer it dialled.
//!
//! Fail closed comes from rewriting whether or not the proxy listens: when it does not,
//! the connect is refused at the node and never reaches the API server.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use gateway_common::{
    v4_mapped, CgroupClass, Config, FlowKey, Origin, TargetKey, CGROUPS_MAX, CONFIG_HAS_ADDR4,
    CONFIG_HAS_ADDR6, FLOW_ORIGINS_MAX, MAX_CGROUP_DEPTH, SOCK_ORIGINS_MAX, TARGETS_MAX,
};

/// Verdict of a cgroup/sock_addr program: let the call go on (with our rewrite, if any).
const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `TCP_CLOSE` in include/net/tcp_states.h.
const TCP_CLOSE: u32 = 7;
const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

// Every map is pinned by name under the agent's bpffs directory, so a restarted agent
// (and a newer program version) keeps the same state.

/// API-server addresses (ClusterIP:port, every endpoint IP:port).
#[map]
static TG_TARGETS: HashMap<TargetKey, u8> = HashMap::pinned(TARGETS_MAX, 0);
/// cgroup id → CgroupClass (Enforced, Exempt, PodsParent).
#[map]
static TG_CGROUPS: HashMap<u64, u32> = HashMap::pinned(CGROUPS_MAX, 0);
/// Index 0: the agent's Config.
#[map]
static TG_CONFIG: Array<Config> = Array::pinned(1, 0);
/// Socket cookie → origin, from connect until the socket closes (LRU: sockets that never
/// got established, e.g. refused while the proxy was down, age out).
#[map]
static TG_SOCK_ORIGINS: LruHashMap<u64, Origin> = LruHashMap::pinned(SOCK_ORIGINS_MAX, 0);
/// Established 4-tuple → origin, for the proxy after accept(), which consumes it. LRU:
/// records of connections the proxy never accepted age out.
#[map]
static TG_FLOW_ORIGINS: LruHashMap<FlowKey, Origin> = LruHashMap::pinned(FLOW_ORIGINS_MAX, 0);

/// The pod cgroup id of the calling task if its connections must go to the proxy.
///
/// Walks the task's cgroup ancestors from the deepest up; the first classified one
/// decides: Enforced → that pod; Exempt → none; PodsParent → the cgroup just below it is
/// a pod the agent has not classified yet, which is redirected too. No hit at all: a
/// host process (kubelet, the agent on the host) → none.
#[inline(always)]
fn pod_to_redirect() -> Option<u64> {
    let mut below = 0u64;
    let mut i = 0;
    while i < MAX_CGROUP_DEPTH {
        let level = MAX_CGROUP_DEPTH - 1 - i;
        i += 1;
        // SAFETY: a plain helper call; returns 0 above the task's depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            continue;
        }
        // SAFETY: the value is copied at once.
        if let Some(class) = unsafe { TG_CGROUPS.get(&id) } {
            return match CgroupClass::from_u32(*class) {
                Some(CgroupClass::Enforced) => Some(id),
                Some(CgroupClass::PodsParent) if below != 0 => Some(below),
                _ => None,
            };
        }
        below = id;
    }
    None
}

/// Whether the connecting socket carries the agent's own mark (its upstream connections).
#[inline(always)]
fn is_agent_socket(ctx: &SockAddrContext, cfg: &Config) -> bool {
    if cfg.agent_mark == 0 {
        return false;
    }
    // SAFETY: `sk` of a sock_addr context is always a valid socket for reading.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    mark == cfg.agent_mark
}

/// The common part of connect4/connect6: is this connect to be redirected? Returns the
/// config and records the origin under the socket cookie when it is.
#[inline(always)]
fn redirect_decision(
    ctx: &SockAddrContext,
    addr: [u8; 16],
    port: u16,
    family: u16,
) -> Option<(&'static Config, bool)> {
    // SAFETY: reading the context.
    if unsafe { (*ctx.sock_addr).protocol } != IPPROTO_TCP {
        return None;
    }
    // Cheapest test first: almost every connect is to something else.
    let key = TargetKey {
        addr,
        port,
        _pad: 0,
    };
    TG_TARGETS.get_ptr(&key)?;
    let cfg = TG_CONFIG.get(0)?;
    if is_agent_socket(ctx, cfg) {
        return None;
    }
    let pod_cgroup_id = pod_to_redirect()?;
    // SAFETY: helper calls on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let host_netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.host_netns_cookie;
    let origin = Origin {
        addr,
        port,
        family,
        _pad: 0,
        pod_cgroup_id,
    };
    // Redirect even if recording fails: the proxy then refuses an unattributed peer, which
    // is still closed rather than open.
    let _ = TG_SOCK_ORIGINS.insert(&cookie, &origin, 0);
    Some((cfg, host_netns))
}

#[cgroup_sock_addr(connect4)]
pub fn tg_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: reading the context; user_ip4/user_port are in network order.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let port = u16::from_be(port as u16);
    if let Some((cfg, host_netns)) = redirect_decision(&ctx, v4_mapped(ip.to_ne_bytes()), port, 4) {
        let new = if !host_netns && cfg.flags & CONFIG_HAS_ADDR4 != 0 {
            cfg.proxy_addr4
        } else {
            // Host network namespace (or no pod-facing address yet: nothing listens on a
            // pod's loopback, so the connect is refused).
            LOOPBACK4
        };
        // SAFETY: connect4 may rewrite user_ip4/user_port.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(new);
            (*sa).user_port = u32::from(cfg.proxy_port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tg_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: reading the context (4-byte loads, as the verifier wants).
    let (words, port) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
    let addr = words_to_bytes(words);
    let port = u16::from_be(port as u16);
    if let Some((cfg, host_netns)) = redirect_decision(&ctx, addr, port, 6) {
        // `::ffff:a.b.c.d` stays v4-mapped (the socket talks IPv4 underneath).
        let mapped = is_v4_mapped(&addr);
        let new = match (mapped, host_netns) {
            (true, false) if cfg.flags & CONFIG_HAS_ADDR4 != 0 => v4_mapped(cfg.proxy_addr4),
            (true, _) => v4_mapped(LOOPBACK4),
            (false, false) if cfg.flags & CONFIG_HAS_ADDR6 != 0 => cfg.proxy_addr6,
            (false, _) => LOOPBACK6,
        };
        let words = bytes_to_words(new);
        // SAFETY: connect6 may rewrite user_ip6/user_port.
        unsafe {
            (*sa).user_ip6[0] = words[0];
            (*sa).user_ip6[1] = words[1];
            (*sa).user_ip6[2] = words[2];
            (*sa).user_ip6[3] = words[3];
            (*sa).user_port = u32::from(cfg.proxy_port.to_be());
        }
    }
    ALLOW
}

/// getpeername on an AF_INET socket: report the dialled address, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn tg_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied at once.
    if let Some(origin) = unsafe { TG_SOCK_ORIGINS.get(&cookie) } {
        let a = origin.addr;
        // SAFETY: getpeername4 may rewrite user_ip4/user_port.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
            (*ctx.sock_addr).user_port = u32::from(origin.port.to_be());
        }
    }
    ALLOW
}

/// getpeername on an AF_INET6 socket (native or v4-mapped): the dialled address.
#[cgroup_sock_addr(getpeername6)]
pub fn tg_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied at once.
    if let Some(origin) = unsafe { TG_SOCK_ORIGINS.get(&cookie) } {
        let words = bytes_to_words(origin.addr);
        // SAFETY: getpeername6 may rewrite user_ip6/user_port.
        unsafe {
            (*ctx.sock_addr).user_ip6[0] = words[0];
            (*ctx.sock_addr).user_ip6[1] = words[1];
            (*ctx.sock_addr).user_ip6[2] = words[2];
            (*ctx.sock_addr).user_ip6[3] = words[3];
            (*ctx.sock_addr).user_port = u32::from(origin.port.to_be());
        }
    }
    ALLOW
}

/// Established (client side): copy the origin to the 4-tuple map for the proxy, and ask
/// for state callbacks so that the per-socket record goes when the socket closes.
///
/// The 4-tuple record is NOT removed at close: an orphaned client socket reaches
/// TCP_CLOSE as soon as its FIN is acknowledged, possibly before the proxy has accepted
/// the connection. The proxy consumes the record after accept() instead
/// (`Datapath::take_origin`); the LRU bounds what is never accepted.
#[sock_ops]
pub fn tg_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        on_established(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE {
        // args[1] is the new state. Only redirected sockets asked for this callback.
        on_close(&ctx);
    }
    1
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied at once.
    let Some(origin) = (unsafe { TG_SOCK_ORIGINS.get(&cookie) }).copied() else {
        return; // not a redirected connection
    };
    let Some(key) = flow_key(ctx) else {
        return;
    };
    let _ = TG_FLOW_ORIGINS.insert(&key, &origin, 0);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = TG_SOCK_ORIGINS.remove(&cookie);
}

/// The connection's 4-tuple as the proxy sees it after accept(): client and proxy
/// addresses (IPv4 as v4-mapped) and ports in host order.
#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> Option<FlowKey> {
    // Every field is read unconditionally, each with its own load: LLVM would otherwise
    // merge the family branches into one load through a computed context pointer, which
    // the verifier refuses.
    let f = SockOpsFields::read(ctx);
    let (client_addr, proxy_addr) = match f.family {
        AF_INET => (
            v4_mapped(f.local_ip4.to_ne_bytes()),
            v4_mapped(f.remote_ip4.to_ne_bytes()),
        ),
        AF_INET6 => (words_to_bytes(f.local_ip6), words_to_bytes(f.remote_ip6)),
        _ => return None,
    };
    // local_port is in host order; remote_port in network order, which little-endian
    // kernels hand over in the upper 16 bits.
    let remote = if f.remote_port > 0xffff {
        f.remote_port >> 16
    } else {
        f.remote_port
    };
    Some(FlowKey {
        client_addr,
        proxy_addr,
        client_port: f.local_port as u16,
        proxy_port: u16::from_be(remote as u16),
    })
}

/// The sock_ops context fields we use, each read with a plain 4-byte load.
struct SockOpsFields {
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

impl SockOpsFields {
    #[inline(always)]
    fn read(ctx: &SockOpsContext) -> SockOpsFields {
        let o = ctx.ops;
        // SAFETY: reading context fields; volatile keeps every load separate.
        unsafe {
            use core::ptr::{addr_of, read_volatile as rv};
            SockOpsFields {
                family: rv(addr_of!((*o).family)),
                local_ip4: rv(addr_of!((*o).local_ip4)),
                remote_ip4: rv(addr_of!((*o).remote_ip4)),
                local_ip6: [
                    rv(addr_of!((*o).local_ip6[0])),
                    rv(addr_of!((*o).local_ip6[1])),
                    rv(addr_of!((*o).local_ip6[2])),
                    rv(addr_of!((*o).local_ip6[3])),
                ],
                remote_ip6: [
                    rv(addr_of!((*o).remote_ip6[0])),
                    rv(addr_of!((*o).remote_ip6[1])),
                    rv(addr_of!((*o).remote_ip6[2])),
                    rv(addr_of!((*o).remote_ip6[3])),
                ],
                local_port: rv(addr_of!((*o).local_port)),
                remote_port: rv(addr_of!((*o).remote_port)),
            }
        }
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0..10] == [0u8; 10] && a[10] == 0xff && a[11] == 0xff
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The programs use no GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
