//! Builds the eBPF programs (`gateway-ebpf`) for the bpf target and embeds them.
//!
//! See TOOLCHAIN.md: the stable 1.95 toolchain with `RUSTC_BOOTSTRAP=1` (so aya-build can
//! pass `-Z build-std=core`) and bpf-linker linked against LLVM 22.

use aya_build::{build_ebpf, Package, Toolchain};

/// The toolchain the kernel-side crate is built with (the workspace's rust-version).
const EBPF_TOOLCHAIN: &str = "1.95.0";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../gateway-common/src");
    // aya-build reads this from our environment and passes it on to the nested cargo.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let ebpf = Package {
        name: "gateway-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-ebpf"),
        ..Default::default()
    };
    build_ebpf([ebpf], Toolchain::Custom(EBPF_TOOLCHAIN))
}
