//! `cargo xtask setup`: installs what building and testing need, only what is missing.
//!
//! Each step checks first (package status, component list, tool version) so a warm
//! machine finishes in seconds; each prints one line saying what it found or did.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The toolchain the eBPF crate is built with (see TOOLCHAIN.md): stable 1.95 with
/// `RUSTC_BOOTSTRAP=1` so aya-build can pass `-Z build-std=core`.
pub const EBPF_TOOLCHAIN: &str = "1.95.0";
/// bpf-linker must be linked against the LLVM that rustc 1.95 uses (LLVM 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages needed to build (bpf-linker against LLVM 22) and to test (network
/// namespaces, the kube-proxy-style DNAT, bpftool for kernel statistics, kubectl).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "iputils-ping",
    "bpftool",
    "kubectl",
    "openssl",
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    let mut installed_anything = false;
    installed_anything |= debian_packages()?;
    installed_anything |= rust_src()?;
    installed_anything |= bpf_linker()?;
    go_toolchain()?;
    println!(
        "setup: done in {:.1}s{}",
        started.elapsed().as_secs_f64(),
        if installed_anything {
            ""
        } else {
            " (nothing was missing)"
        }
    );
    Ok(())
}

fn debian_packages() -> Result<bool> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !debian_package_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present ({})", DEBIAN_PACKAGES.len());
        return Ok(false);
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    if !is_root() {
        bail!(
            "installing Debian packages needs root; run as root or install: apt-get install -y {}",
            missing.join(" ")
        );
    }
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing),
    )?;
    Ok(true)
}

fn debian_package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn rust_src() -> Result<bool> {
    let out = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .context("running rustup (is rustup installed?)")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && listed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src for {EBPF_TOOLCHAIN} present");
        return Ok(false);
    }
    println!("setup: installing toolchain {EBPF_TOOLCHAIN} with rust-src");
    run_checked(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    Ok(true)
}

fn bpf_linker() -> Result<bool> {
    if let Some(version) = bpf_linker_version() {
        if version.contains(BPF_LINKER_VERSION) && bpf_linker_uses_llvm22() {
            println!("setup: bpf-linker {BPF_LINKER_VERSION} (LLVM 22) present");
            return Ok(false);
        }
        println!("setup: bpf-linker present but not {BPF_LINKER_VERSION} on LLVM 22 ({version}); reinstalling");
    } else {
        println!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes)"
        );
    }
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_checked(
        Command::new("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path)
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )?;
    Ok(true)
}

/// `bpf-linker --version` prints only the linker's own version.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .replace('\n', " ")
    })
}

/// The LLVM a bpf-linker uses is the shared library it is linked against.
fn bpf_linker_uses_llvm22() -> bool {
    let Ok(out) = Command::new("sh")
        .args(["-c", "ldd \"$(command -v bpf-linker)\""])
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).contains("libLLVM.so.22")
}

fn go_toolchain() -> Result<()> {
    let out = Command::new("go")
        .arg("version")
        .output()
        .context("the control plane is built from Go modules and needs the go command on PATH")?;
    println!("setup: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
