//! The `gateway-agent` command line: the daemon and the operator's commands.
//! (`main.rs` only calls [`main`]; the test suites build the same CLI as a binary of
//! their own, so they always run the agent of the tree they test.)
//!
//! Subcommands: `run` (the daemon), `certs issue`, `trust status|rotate`, `policy
//! check|rbac`, `doctor`, `datapath install|status|uninstall`, and the reviewer
//! commands `approvals` and `sessions`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::datapath::{self, Datapath, DatapathConfig, DEFAULT_BPFFS_DIR};
use crate::doctor;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gateway-agent", version, about = "Tollgate node agent")]
struct Cli {
    /// Log lines as `text` (for people) or `json` (one object per line, with the
    /// request id and session of every proxied request, for log collectors).
    #[arg(long, global = true, env = "TOLLGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: data path, discovery, proxy, admin port.
    Run(Box<crate::config::RunArgs>),
    /// Serving certificates for the proxy.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Work with policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Check that this node can run the data path (one line per check).
    Doctor {
        /// bpffs directory the agent pins to.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Review held API calls (talks to an agent's REST API).
    Approvals(crate::api::client::ApprovalsArgs),
    /// Recorded sessions: list, show, replay, verify, export.
    Sessions(crate::recording::cli::SessionsArgs),
    /// Tollgate's own CA (trust mode injected-ca): status, rotate.
    Trust(crate::trust::cli::TrustArgs),
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

#[derive(Subcommand)]
enum CertsCommand {
    /// Issue the proxy's serving certificate from the cluster CA, with the API server's
    /// names; writes tls.crt and tls.key (the layout of a kubernetes.io/tls Secret).
    Issue(IssueArgs),
}

#[derive(Args)]
struct IssueArgs {
    /// The cluster CA certificate (PEM).
    #[arg(long)]
    ca_cert: PathBuf,
    /// The cluster CA key (PEM, PKCS#8 or PKCS#1). Used once here; the agent never
    /// needs it.
    #[arg(long)]
    ca_key: PathBuf,
    /// Directory to write tls.crt and tls.key to.
    #[arg(long)]
    out: PathBuf,
    /// The `kubernetes` Service ClusterIP.
    #[arg(long, default_value = "10.96.0.1")]
    cluster_ip: std::net::IpAddr,
    /// The cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// More names or addresses clients dial the API server by (its endpoint
    /// addresses, a load balancer name); repeatable.
    #[arg(long = "extra-san")]
    extra_sans: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u64,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file; prints every problem with its line and column.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the RBAC (Roles and RoleBindings) that lets the agent impersonate exactly
    /// the service accounts the policy's `executeAs` rules name, and no other.
    Rbac {
        /// The policy file.
        file: PathBuf,
        /// The agent's namespace.
        #[arg(long, default_value = "tollgate-system")]
        agent_namespace: String,
        /// The agent's service account.
        #[arg(long, default_value = "tollgate-agent")]
        agent_service_account: String,
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

/// Parses the command line and runs the command; the process exit code.
pub fn main() -> ExitCode {
    // Installed as `kubectl-tollgate`, `kubectl tollgate approvals ...` arrives here.
    let args = crate::api::client::plugin_args(std::env::args_os().collect());
    // `run --config FILE`: the file's settings join the command line as flags.
    let args = match crate::config::with_config_file(args, std::env::var_os("TOLLGATE_CONFIG")) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("gateway-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_format == "json" {
        // Spans (request id, session, pod, user, verb, rule) go with every event.
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal; logs collected from a file or a
            // container runtime stay plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gateway-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = crate::config::Config::load(*args, || datapath::cgroup2_mount().ok())?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(crate::app::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command: CertsCommand::Issue(args),
        } => {
            let issued = crate::certs::issue(&crate::certs::IssueRequest {
                ca_cert: args.ca_cert,
                ca_key: args.ca_key,
                out_dir: args.out,
                cluster_ip: args.cluster_ip,
                cluster_domain: args.cluster_domain,
                extra_sans: args.extra_sans,
                validity: std::time::Duration::from_secs(args.days * 86_400),
            })?;
            println!(
                "wrote {} and {}",
                issued.cert.display(),
                issued.key.display()
            );
            println!("names: {}", issued.sans.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command:
                PolicyCommand::Rbac {
                    file,
                    agent_namespace,
                    agent_service_account,
                },
        } => match crate::policy::source::load_file(&file) {
            Ok(policy) => {
                print!(
                    "{}",
                    crate::policy::impersonation_rbac(
                        &policy,
                        &agent_namespace,
                        &agent_service_account
                    )
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("{err}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => match crate::policy::source::load_file(&file) {
            Ok(policy) => {
                println!(
                    "{}: ok ({} rule{}, default {})",
                    file.display(),
                    policy.rules.len(),
                    if policy.rules.len() == 1 { "" } else { "s" },
                    policy.default
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("{err}");
                Ok(ExitCode::FAILURE)
            }
        },
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
        Command::Approvals(args) => args.run(),
        Command::Sessions(args) => args.run(),
        Command::Trust(args) => args.run(),
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
                        match class {
                            Some(class) => println!("cgroup {id} {class:?}"),
                            None => println!("cgroup {id} (unknown class)"),
                        }
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
