# syntax=docker/dockerfile:1
#
# The Tollgate node agent (`gateway-agent`), the image deploy/daemonset.yaml runs:
#
#   docker build -t REGISTRY/tollgate/gateway-agent:0.1.0 .
#
# The build needs what `cargo xtask setup` installs on a development machine (see
# xtask/src/setup.rs and ../shared/TOOLCHAIN.md): Rust 1.95.0 with rust-src (the eBPF
# crate is built with -Z build-std=core) and bpf-linker 0.13.0 linked against LLVM 22,
# the LLVM of rustc 1.95. Pin the two base images by digest in your own pipeline.

# ---- toolchain: Rust 1.95.0, rust-src, bpf-linker on LLVM 22 -----------------------
# Debian 12 (bookworm), like the machines the toolchain was verified on: it has the
# llvm-22 packages and the same glibc as the runtime image below.
FROM rust:1.95.0-bookworm AS toolchain
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup component add rust-src --toolchain 1.95.0
# Without LLVM_PREFIX bpf-linker's build does not find libLLVM. A layer of its own: it
# takes minutes and changes only with its version.
RUN LLVM_PREFIX=/usr/lib/llvm-22 PATH="/usr/lib/llvm-22/bin:${PATH}" \
    cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22

# ---- build: gateway-agent in release, the eBPF object embedded by its build.rs --------
FROM toolchain AS build
WORKDIR /src
COPY . .
# Cargo's registry and the target directory are cache mounts, so rebuilds after a source
# change recompile only what changed; the binary is copied out of the cache in the same
# step. --locked: exactly the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package gateway-agent \
    && cp target/release/gateway-agent /usr/local/bin/gateway-agent

# ---- runtime: glibc, libgcc, CA certificates and the binary; no shell, no packages ---
# distroless/cc is Debian 12 with what a Rust binary links against (glibc, libgcc_s) and
# the system trust roots (the approval webhook and an OIDC issuer may use them). Its
# default user is root, which the agent needs (see the DaemonSet's securityContext).
FROM gcr.io/distroless/cc-debian12 AS runtime
LABEL org.opencontainers.image.title="tollgate gateway-agent" \
      org.opencontainers.image.description="Tollgate node agent: eBPF steering, enforcing proxy, approvals, masking, recording" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/gateway-agent /usr/local/bin/gateway-agent
# The same binary is the reviewers' CLI and kubectl plugin (`gateway-agent approvals`).
ENTRYPOINT ["/usr/local/bin/gateway-agent"]
CMD ["run"]
