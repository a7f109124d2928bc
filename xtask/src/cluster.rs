//! `cargo xtask cluster up|down|status|env`: the local control plane.
//!
//! The work is done by `tollgate_harness::cluster::controlplane`, the same code that
//! `Cluster::shared()` runs in tests, so both always agree on layout and state.

use anyhow::{bail, Result};
use tollgate_harness::cluster::controlplane::{self, Layout};

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(clap::Subcommand)]
enum ClusterCommand {
    /// Build what is missing, then start the control plane (or reuse a healthy one).
    Up,
    /// Stop every process and remove namespaces, cgroups, rules and state.
    Down,
    /// Tell what runs.
    Status,
    /// Print the kubeconfig path and addresses.
    Env {
        /// Print only the admin kubeconfig path.
        #[arg(long)]
        kubeconfig: bool,
    },
}

pub fn run(args: ClusterArgs) -> Result<()> {
    let layout = Layout::from_env();
    match args.command {
        ClusterCommand::Up => {
            let report = controlplane::up(&layout)?;
            if report.reused {
                println!(
                    "cluster: already up and healthy (checked in {:.1}s)",
                    report.elapsed.as_secs_f64()
                );
            } else {
                println!(
                    "cluster: started in {:.1}s (build {:.1}s + start {:.1}s)",
                    report.elapsed.as_secs_f64(),
                    report.build.as_secs_f64(),
                    (report.elapsed - report.build).as_secs_f64()
                );
            }
            print_env(&layout);
            Ok(())
        }
        ClusterCommand::Down => {
            controlplane::down(&layout);
            println!("cluster: down");
            Ok(())
        }
        ClusterCommand::Status => {
            for line in controlplane::status(&layout) {
                println!("{line}");
            }
            if !controlplane::healthy(&layout) {
                bail!("the cluster is not (fully) running; `cargo xtask cluster up` starts it");
            }
            Ok(())
        }
        ClusterCommand::Env { kubeconfig } => {
            if kubeconfig {
                println!("{}", layout.admin_kubeconfig().display());
            } else {
                print_env(&layout);
            }
            Ok(())
        }
    }
}

fn print_env(layout: &Layout) {
    println!("KUBECONFIG={}", layout.admin_kubeconfig().display());
    println!("TOLLGATE_API_URL={}", layout.api_url());
    println!(
        "TOLLGATE_API_SERVER_IN_TOPOLOGY=https://{}:{}",
        tollgate_harness::topology::API_SERVER_IP,
        tollgate_harness::topology::API_SERVER_PORT
    );
    println!(
        "TOLLGATE_CLUSTER_IP=https://{}:{}",
        tollgate_harness::topology::CLUSTER_IP,
        tollgate_harness::topology::CLUSTER_PORT
    );
    println!("TOLLGATE_STATE={}", layout.state.display());
    println!("TOLLGATE_BIN_CACHE={}", layout.cache_bin.display());
    for node in controlplane::nodes() {
        println!(
            "NODE {} ip={} netns={} cgroup-driver={:?}",
            node.name, node.ip, node.netns, node.driver
        );
    }
}
