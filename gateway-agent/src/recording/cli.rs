//! `gateway-agent sessions ...`: the recorded sessions. (Being written.)

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct SessionsArgs {}

impl SessionsArgs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("not written yet")
    }
}
