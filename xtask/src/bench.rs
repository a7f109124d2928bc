//! `cargo xtask bench`: the gateway measured against the direct path in one run, with
//! every figure of DESIGN §9 (latency and throughput ratios, watch event delivery,
//! masking throughput, the connect hook's cost per call, agent memory, approval release
//! latency), printed as one table and written as JSON.
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
    /// Smaller counts: under two minutes in all, the release build aside (the report
    /// lists what is reduced).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/report.json")]
    out: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    crate::setup::run()?;
    let root = crate::workspace_root();
    let build = std::time::Instant::now();
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
    // The bench's own wall time is in its report; this part is not.
    println!(
        "bench: release build done in {:.0}s",
        build.elapsed().as_secs_f64()
    );
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
