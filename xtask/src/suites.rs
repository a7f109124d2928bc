//! `cargo xtask test [SUITE...]`: the test suites, named by concern.
//!
//! A suite is one cargo test target. Suites that need the kernel or the control plane
//! live in the `tollgate-tests` package (`tests/tests/<suite>.rs`) and run as root; the
//! `unit` suite is every crate's own unit tests.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::setup::run_checked;

pub struct Suite {
    pub name: &'static str,
    pub about: &'static str,
    /// Arguments after `cargo test`.
    cargo_args: &'static [&'static str],
    /// Arguments for the test harness (after `--`).
    harness_args: &'static [&'static str],
}

/// Every suite, in the order `cargo xtask test` runs them.
pub const SUITES: &[Suite] = &[
    Suite {
        name: "unit",
        about: "unit tests of every crate (pure logic, no kernel, no cluster)",
        // The default members: everything but gateway-ebpf, which only builds for the
        // bpf target (gateway-agent's build.rs builds it).
        cargo_args: &["--lib", "--bins"],
        harness_args: &[],
    },
    Suite {
        name: "datapath",
        about: "eBPF redirect on the real kernel, in a namespace topology the test builds (root)",
        cargo_args: &[
            "--package",
            "tollgate-tests",
            "--test",
            "topology",
            "--test",
            "datapath",
        ],
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "cluster",
        about: "real kube-apiserver + etcd and simulated nodes: in-pod kubectl, RBAC, tokens, exec/logs/port-forward (root)",
        cargo_args: &["--package", "tollgate-tests", "--test", "cluster"],
        harness_args: &["--test-threads=3"],
    },
    Suite {
        name: "proxy",
        about: "the agent on a simulated node in front of the real API server: kubectl in enforced pods, policy, identity, bad input (root)",
        cargo_args: &["--package", "tollgate-tests", "--test", "proxy"],
        // One agent per test on node 1: tests take turns.
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "approvals",
        about: "held calls end to end: kubectl/kube-rs/client-go in enforced pods, reviewers over the REST API and CLI, both stores, two nodes (root)",
        cargo_args: &[
            "--package",
            "tollgate-tests",
            "--test",
            "approval_stores",
            "--test",
            "approvals_api",
            "--test",
            "approvals",
        ],
        // Agents hold a per-node lock; the store and API tests share the cluster.
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "masking",
        about: "what enforced pods read is masked: kubectl (yaml, json, lists, watch, table, describe), client-go with JSON and protobuf, curl with gzip, refusals, exempt pods untouched (root)",
        cargo_args: &["--package", "tollgate-tests", "--test", "masking"],
        // One agent per test on node 1: tests take turns.
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "recording",
        about: "sessions recorded as kubectl made them: request by request, exec replay, tamper evidence, kill -9; the sessions REST API (root)",
        cargo_args: &[
            "--package",
            "tollgate-tests",
            "--test",
            "recording",
            "--test",
            "sessions_api",
        ],
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "e2e",
        about: "the demo's story as assertions: a pod's kubectl apply held, the dry-run diff, a CLI approval, the apply done, a masked Secret read, a refused delete, the session shown and verified (root)",
        cargo_args: &["--package", "tollgate-tests", "--test", "e2e"],
        // One agent on node 1.
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "trust",
        about: "trust mode injected-ca: the admission webhook called by the real API server over TLS, enforced pods' projected CA bundle and their unmodified kubectl through Tollgate, pods not enforced untouched, a webhook outage, a CA rotation under a live watch (root)",
        cargo_args: &["--package", "tollgate-tests", "--test", "trust"],
        // One agent on node 1, and the one webhook configuration: tests take turns.
        harness_args: &["--test-threads=1"],
    },
    Suite {
        name: "deploy",
        about: "deploy/ against the real API server: every object of the kustomize base accepted (server-side dry-run), the agent's Pod admitted, the default policy checked, the agent's and reviewers' RBAC by can-i, the DaemonSet's privileges, the Dockerfile's toolchain (root)",
        cargo_args: &["--package", "tollgate-tests", "--test", "deploy"],
        // The tests apply the same RBAC and CRD; they take turns.
        harness_args: &["--test-threads=1"],
    },
];

pub fn list() {
    for suite in SUITES {
        println!("{:<10} {}", suite.name, suite.about);
    }
}

pub fn run(names: &[String]) -> Result<()> {
    let selected: Vec<&Suite> = if names.is_empty() {
        SUITES.iter().collect()
    } else {
        let mut selected = Vec::new();
        for name in names {
            match SUITES.iter().find(|s| s.name == name) {
                Some(suite) => selected.push(suite),
                None => bail!(
                    "unknown suite {name:?}; known suites: {}",
                    SUITES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        selected
    };
    for suite in selected {
        let started = Instant::now();
        println!("test: suite {} — {}", suite.name, suite.about);
        run_checked(
            Command::new(env!("CARGO"))
                .current_dir(crate::workspace_root())
                .arg("test")
                .args(suite.cargo_args)
                .arg("--")
                .args(suite.harness_args),
        )?;
        println!(
            "test: suite {} passed in {:.1}s",
            suite.name,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
