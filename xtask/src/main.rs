//! `cargo xtask`: the developer and CI entry points.
//!
//! Every command here is what the README promises: `setup` installs what is missing,
//! `test` runs setup and then the named suites (or all of them), `demo` tells the story
//! on a local topology, `cluster` drives the local control plane, `bench` measures.

mod bench;
mod cluster;
mod demo;
mod setup;
mod suites;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tollgate developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install whatever is missing for building and testing (idempotent).
    Setup,
    /// Run setup, then the named test suites (all when none are named).
    Test {
        /// Suites to run; see `cargo xtask test --list`.
        suites: Vec<String>,
        /// List the suites and exit.
        #[arg(long)]
        list: bool,
    },
    /// Show Tollgate at work on a local topology.
    Demo(demo::DemoArgs),
    /// Drive the local Kubernetes control plane used by tests and the demo.
    Cluster(cluster::ClusterArgs),
    /// Measure the gateway against the direct path in one run.
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Test { suites, list } => {
            if list {
                suites::list();
                return Ok(());
            }
            setup::run()?;
            suites::run(&suites)
        }
        Command::Demo(args) => demo::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}
