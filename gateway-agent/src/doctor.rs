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
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let ok = (major, minor) >= MIN_KERNEL;
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

/// CONFIG_CGROUP_BPF: the kernel lists cgroup program types only then; the cheapest
/// sign without loading anything is the BPF syscall being there and cgroup2 offering
/// the `cgroup.subtree_control` file plus a kernel config entry when readable.
fn cgroup_bpf() -> Check {
    if let Some(config) = kernel_config() {
        return if config.lines().any(|l| l == "CONFIG_CGROUP_BPF=y") {
            check("cgroup-bpf", true, "CONFIG_CGROUP_BPF=y")
        } else {
            check(
                "cgroup-bpf",
                false,
                "CONFIG_CGROUP_BPF is not set: cgroup/connect programs cannot attach",
            )
        };
    }
    // No config to read: ask the kernel whether the bpf syscall exists at all.
    // SAFETY: BPF_PROG_LOAD with a null attr just fails; ENOSYS means no BPF syscall.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 5, std::ptr::null::<u8>(), 0) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if rc < 0 && errno == Some(libc::ENOSYS) {
        check("cgroup-bpf", false, "the bpf() system call is missing")
    } else {
        check(
            "cgroup-bpf",
            true,
            "bpf() present (kernel config not readable; attaching will tell)",
        )
    }
}

fn kernel_config() -> Option<String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
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
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (cgroup attach, bpffs mount)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        check("privileges", true, "CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN")
    } else {
        check(
            "privileges",
            false,
            format!("missing {}", missing.join(", ")),
        )
    }
}
