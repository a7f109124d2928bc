//! `gateway-agent approvals ...`: the reviewer's CLI over the REST API. (Being written.)

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ApprovalsArgs {}

impl ApprovalsArgs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("not written yet")
    }
}
