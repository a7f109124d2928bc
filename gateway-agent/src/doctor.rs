//! `gateway-agent doctor`: can this node run the data path? One line per check.

use std::fs;
use std::path::Path;

use crate::datapath::{cgroup2_mount, is_bpffs, BPFFS_MOUNT};

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found, or why it fails and what to do.
    pub detail: String,
}

/// The oldest kernel with everything the data path uses (netns cookies in sock_addr
/// programs need 5.7; cgroup.kill and SO_NETNS_COOKIE 5.14).
const MIN_KERNEL: (u32, u32) = (5, 14);

/// Capabilities the agent needs (bit numbers from linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Runs every check; `bpffs` is the pin directory the agent will use.
pub fn run(bpffs: &Path) -> Vec<Check> {
    vec![
        kernel(),
        btf(),
        cgroup_bpf(),
        cgroup2(),
        bpffs_check(bpffs),
        privileges(),
    ]
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
    }
}

fn kernel() -> Check {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let ok = kernel_version(release) >= MIN_KERNEL;
    let detail = if ok {
        format!("Linux {release}")
    } else {
        format!(
            "Linux {release} is older than {}.{}: cgroup sock_addr netns cookies and SO_NETNS_COOKIE are missing",
            MIN_KERNEL.0, MIN_KERNEL.1
        )
    };
    check("kernel", ok, detail)
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc-v769`.
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        check("btf", true, "/sys/kernel/btf/vmlinux present")
    } else {
        check(
            "btf",
            false,
            "/sys/kernel/btf/vmlinux missing: the kernel needs CONFIG_DEBUG_INFO_BTF",
        )
    }
}

/// CONFIG_CGROUP_BPF, asked of the kernel itself: it loads a trivial program of each
/// type the data path uses (cgroup/sock_addr, sock_ops) and unloads it.
fn cgroup_bpf() -> Check {
    use aya::programs::ProgramType;
    use aya::sys::is_program_supported;
    let mut missing = Vec::new();
    for (name, ty) in [
        ("cgroup/sock_addr", ProgramType::CgroupSockAddr),
        ("sock_ops", ProgramType::SockOps),
    ] {
        match is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{name} programs are not supported")),
            Err(e) => missing.push(format!("probing {name} programs failed: {e}")),
        }
    }
    if missing.is_empty() {
        check(
            "cgroup-bpf",
            true,
            "cgroup/sock_addr and sock_ops programs load",
        )
    } else {
        check(
            "cgroup-bpf",
            false,
            format!(
                "{} (the kernel needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF)",
                missing.join("; ")
            ),
        )
    }
}

fn cgroup2() -> Check {
    match cgroup2_mount() {
        Ok(mount) => check("cgroup2", true, format!("mounted at {}", mount.display())),
        Err(e) => check(
            "cgroup2",
            false,
            format!("no cgroup-v2 mount in /proc/self/mountinfo ({e}): mount cgroup2"),
        ),
    }
}

fn bpffs_check(bpffs: &Path) -> Check {
    let mut probe = bpffs.to_path_buf();
    while !probe.exists() && probe.pop() {}
    if is_bpffs(&probe) {
        check("bpffs", true, format!("{} is on bpffs", probe.display()))
    } else if bpffs.starts_with(BPFFS_MOUNT) {
        check(
            "bpffs",
            false,
            format!("{BPFFS_MOUNT} is not mounted: `mount -t bpf bpf {BPFFS_MOUNT}` (the agent mounts it when it starts)"),
        )
    } else {
        check(
            "bpffs",
            false,
            format!("{} is not on a bpf file system", bpffs.display()),
        )
    }
}

fn privileges() -> Check {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    // Loading and attaching cgroup programs: CAP_BPF with CAP_NET_ADMIN (networking
    // program types), or CAP_SYS_ADMIN, which implies both for BPF.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // The verifier allows the programs' pointer arithmetic on socket context fields
    // only with CAP_PERFMON (measured: without it and CAP_SYS_ADMIN, loading fails with
    // EACCES).
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    // CAP_SYS_ADMIN only mounts bpffs when nobody has; a DaemonSet mounts the host's.
    let bpffs_mounted = is_bpffs(std::path::Path::new(BPFFS_MOUNT));
    if !bpffs_mounted && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (to mount bpffs, which is not mounted)");
    }
    if missing.is_empty() {
        let held: Vec<&str> = [
            (CAP_BPF, "CAP_BPF"),
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_PERFMON, "CAP_PERFMON"),
            (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        ]
        .into_iter()
        .filter(|(cap, _)| has(*cap))
        .map(|(_, name)| name)
        .collect();
        check("privileges", true, held.join(", "))
    } else {
        check(
            "privileges",
            false,
            format!("missing {}", missing.join(", ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v769"), (6, 18));
        assert_eq!(kernel_version("5.4.0-150-generic"), (5, 4));
        assert_eq!(kernel_version("garbage"), (0, 0));
        assert!(kernel_version("5.4.0") < MIN_KERNEL);
        assert!(kernel_version("5.15.0") >= MIN_KERNEL);
    }
}
