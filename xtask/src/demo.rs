//! `cargo xtask demo [--interactive]`: runs setup, builds the demo and the agent it
//! runs (`tg-agent`, beside it), then runs it (`tests/src/bin/tollgate-demo.rs`). The
//! demo itself lives in the test package because it drives the agent, whose build needs
//! what setup installs.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result};

use crate::setup::run_checked;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// At the approval, print the command a person runs and wait for their decision
    /// instead of approving as the demo's reviewer.
    #[arg(long)]
    interactive: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    crate::setup::run()?;
    let root = crate::workspace_root();
    run_checked(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--quiet",
        "--package",
        "tollgate-tests",
        "--bin",
        "tg-agent",
        "--bin",
        "tollgate-demo",
    ]))?;
    let mut demo = Command::new(env!("CARGO"));
    demo.current_dir(&root).args([
        "run",
        "--quiet",
        "--package",
        "tollgate-tests",
        "--bin",
        "tollgate-demo",
    ]);
    if args.interactive {
        demo.args(["--", "--interactive"]);
    }
    // In place of this process (cargo run execs the demo in turn), so Ctrl-C reaches
    // only the demo, which then cleans up, and the shell waits until it has.
    Err(demo.exec()).with_context(|| format!("starting {demo:?}"))
}
