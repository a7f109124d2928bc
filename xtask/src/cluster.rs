//! `cargo xtask cluster up|down|status|env`: the local control plane.

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct ClusterArgs {}

pub fn run(_args: ClusterArgs) -> Result<()> {
    bail!("the local control plane is not written yet")
}
