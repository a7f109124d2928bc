//! `gateway-agent`: Tollgate's node agent and CLI.
//!
//! Subcommands today: `doctor` and `datapath install|status|uninstall`. The daemon
//! (`run`) and the reviewer commands (`approvals`, `sessions`, `certs`, `policy`) join
//! here as their issues land.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gateway_agent::datapath::{self, Datapath, DatapathConfig, DEFAULT_BPFFS_DIR};
use gateway_agent::doctor;

#[derive(Parser)]
#[command(name = "gateway-agent", version, about = "Tollgate node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can run the data path (one line per check).
    Doctor {
        /// bpffs directory the agent pins to.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Manage the kernel data path by hand.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
}

#[derive(Subcommand)]
enum DatapathCommand {
    /// Load, attach and pin the programs (adopting existing pins), then exit.
    Install(InstallArgs),
    /// Show what is pinned.
    Status {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Remove every pin and link the data path made.
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(Args)]
struct InstallArgs {
    /// Cgroup to attach to (default: the cgroup-v2 root).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// The proxy's port.
    #[arg(long)]
    proxy_port: u16,
    /// The node's IPv4 address as pods reach it (where the proxy listens).
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// The node's IPv6 address as pods reach it.
    #[arg(long)]
    node_ip6: Option<Ipv6Addr>,
    /// API-server address to redirect (ClusterIP:port, endpoint IP:port); repeatable.
    #[arg(long = "target")]
    targets: Vec<SocketAddr>,
    /// Socket mark of the agent's own upstream connections.
    #[arg(long, default_value_t = 0)]
    agent_mark: u32,
    /// The agent's cgroup, never redirected (default: this process's cgroup).
    #[arg(long)]
    agent_cgroup: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gateway-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { bpffs } => {
            let checks = doctor::run(&bpffs);
            for c in &checks {
                println!(
                    "{:<4} {:<11} {}",
                    if c.ok { "ok" } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
            let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
            if failed.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("doctor: failed: {}", failed.join(", "));
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Datapath { command } => {
            match command {
                DatapathCommand::Install(args) => install(args)?,
                DatapathCommand::Status { bpffs } => {
                    let s = datapath::status(&bpffs)?;
                    if s.links.is_empty() && s.maps.is_empty() {
                        println!("nothing pinned under {}", bpffs.display());
                    }
                    for (name, prog) in &s.links {
                        let prog = prog.map_or("?".into(), |p| p.to_string());
                        println!("link   {name} (program id {prog})");
                    }
                    for name in &s.maps {
                        println!("map    {name}");
                    }
                    if let Some(c) = s.config {
                        println!(
                            "config proxy port {}, ipv4 {}, ipv6 {}, agent mark {}",
                            c.proxy_port,
                            Ipv4Addr::from(c.proxy_addr4),
                            Ipv6Addr::from(c.proxy_addr6),
                            c.agent_mark
                        );
                    }
                    for t in &s.targets {
                        println!("target {t}");
                    }
                    for (id, class) in &s.cgroups {
                        println!("cgroup {id} {class:?}");
                    }
                }
                DatapathCommand::Uninstall { bpffs } => {
                    let removed = datapath::uninstall(&bpffs)?;
                    for p in &removed {
                        println!("removed {}", p.display());
                    }
                    if removed.is_empty() {
                        println!("nothing pinned under {}", bpffs.display());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn install(args: InstallArgs) -> Result<()> {
    let cgroup_root = match args.cgroup_root {
        Some(p) => p,
        None => datapath::cgroup2_mount().context("finding the cgroup-v2 mount")?,
    };
    let mut config = DatapathConfig::new(cgroup_root, args.bpffs);
    config.proxy_port = args.proxy_port;
    config.proxy_addr4 = args.node_ip;
    config.proxy_addr6 = args.node_ip6;
    config.agent_mark = args.agent_mark;
    config.agent_cgroup = args.agent_cgroup;
    let mut dp = Datapath::install(&config)?;
    if !args.targets.is_empty() {
        dp.set_targets(&args.targets)?;
    }
    println!(
        "data path attached to {} and pinned under {}",
        config.cgroup_root.display(),
        config.bpffs.display()
    );
    Ok(())
}
