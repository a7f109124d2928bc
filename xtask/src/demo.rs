//! `cargo xtask demo`: runs setup, builds the demo and the binaries it runs inside
//! pods, then runs it (`tests/src/bin/tollgate-demo.rs`). The demo itself lives in the
//! test package because it drives the agent, whose build needs what setup installs.

use std::process::Command;

use anyhow::Result;

use crate::setup::run_checked;

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn run(_args: DemoArgs) -> Result<()> {
    crate::setup::run()?;
    let root = crate::workspace_root();
    run_checked(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--quiet",
        "--package",
        "tollgate-tests",
        "--bin",
        "tg-probe",
        "--bin",
        "tollgate-demo",
    ]))?;
    run_checked(Command::new(env!("CARGO")).current_dir(&root).args([
        "run",
        "--quiet",
        "--package",
        "tollgate-tests",
        "--bin",
        "tollgate-demo",
    ]))
}
