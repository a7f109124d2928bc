//! Tollgate's test harness: the namespace topology every kernel and cluster test runs in.
//!
//! Network safety (TOOLCHAIN.md): every address used by a test lives inside network
//! namespaces that the harness creates here, and none of them has a route out of the
//! machine. eBPF programs attach to a cgroup subtree made here, never the machine's root.

pub mod cluster;
pub mod topology;

/// Fails (never skips) when not root: kernel tests must run, and CI runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test builds network namespaces and loads eBPF programs: run it as root"
    );
}
