//! `cargo xtask demo`: Tollgate's story told on a local topology.

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn run(_args: DemoArgs) -> Result<()> {
    bail!("the demo is not written yet")
}
