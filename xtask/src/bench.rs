//! `cargo xtask bench`: the gateway measured against the direct path in one run.
//!
//! Runs setup, builds (release: the agent is measured as it ships) the orchestrator
//! `tollgate-bench`, the in-pod load generator `tg-load` and the agent `tg-agent` of the
//! test package, then runs the orchestrator (`tests/src/bin/tollgate-bench.rs`). Like the
//! demo it lives in the test package because it drives the agent, whose build needs what
//! setup installs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::setup::run_checked;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smaller counts (well under two minutes of measuring).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/report.json")]
    out: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    crate::setup::run()?;
    let root = crate::workspace_root();
    run_checked(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "tollgate-tests",
        "--bin",
        "tg-agent",
        "--bin",
        "tg-load",
        "--bin",
        "tollgate-bench",
    ]))?;
    let out = if args.out.is_absolute() {
        args.out
    } else {
        root.join(args.out)
    };
    let mut run = Command::new(env!("CARGO"));
    run.current_dir(&root).args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "tollgate-tests",
        "--bin",
        "tollgate-bench",
        "--",
        "--out",
    ]);
    run.arg(&out);
    if args.quick {
        run.arg("--quick");
    }
    run_checked(&mut run)
}
