//! `gateway-agent trust status|rotate`: Tollgate's CA as the operator sees it (trust
//! mode `injected-ca`). Both talk to the API server with the kubeconfig's credentials
//! (who may read or write the CA Secret is RBAC's business).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::ca;
use super::secret::{CaSecret, CaState};
use crate::config::parse_duration;

#[derive(clap::Args)]
pub struct TrustArgs {
    /// kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The CA Secret as namespace/name (the agents' --ca-secret).
    #[arg(long, global = true, default_value = "tollgate-system/tollgate-ca")]
    ca_secret: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Show the signing CA, a staged successor and retired CAs, with their dates.
    Status,
    /// Stage a new CA now: it is published to pods at once and signs from
    /// `--activate-in` on. A staged CA that has not signed yet is replaced.
    Rotate {
        /// How long pods get to receive the new CA before it signs (30d, 10m, 15s):
        /// at least kubelet's projected-volume refresh (a minute or two), and longer
        /// than the oldest process that read its CA file once at start.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        activate_in: Duration,
        /// How long the new CA is valid.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        ca_validity: Duration,
    },
}

impl TrustArgs {
    pub fn run(self) -> Result<ExitCode> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(self.run_async())
    }

    async fn run_async(self) -> Result<ExitCode> {
        let (namespace, name) = self
            .ca_secret
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .with_context(|| {
                format!(
                    "--ca-secret {:?} must be written namespace/name",
                    self.ca_secret
                )
            })?;
        let client = client(self.kubeconfig.as_ref()).await?;
        let secret = CaSecret::new(client, namespace, name);
        match self.command {
            Command::Status => {
                let Some((state, _)) = secret.read().await? else {
                    println!(
                        "no CA yet: Secret {namespace}/{name} does not exist (an agent in \
                         --trust-mode injected-ca creates it on first start)"
                    );
                    return Ok(ExitCode::FAILURE);
                };
                print!("{}", describe(&state, OffsetDateTime::now_utc()));
                Ok(ExitCode::SUCCESS)
            }
            Command::Rotate {
                activate_in,
                ca_validity,
            } => {
                let successor = ca::generate_ca(ca_validity)?;
                let activates_at = OffsetDateTime::now_utc()
                    + time::Duration::seconds(activate_in.as_secs() as i64);
                let state = secret
                    .update(None, |current| {
                        let mut next = current.clone();
                        next.stage(successor.clone(), activates_at);
                        Ok(Some(next))
                    })
                    .await
                    .with_context(|| format!("staging a new CA in {namespace}/{name}"))?;
                println!(
                    "staged a new CA: published to pods now, signing from {}",
                    format_time(activates_at)
                );
                print!("{}", describe(&state, OffsetDateTime::now_utc()));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .context("loading the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("finding a kubeconfig")?,
    };
    kube::Client::try_from(config).context("building the API client")
}

fn format_time(at: OffsetDateTime) -> String {
    at.format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn subject(cert_pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok);
    der.and_then(|der| {
        x509_parser::parse_x509_certificate(&der)
            .ok()
            .map(|(_, cert)| cert.subject().to_string())
    })
    .unwrap_or_else(|| "(unreadable)".to_owned())
}

/// One line per CA: its role, subject and dates.
fn describe(state: &CaState, now: OffsetDateTime) -> String {
    let until = |pem: &str| {
        ca::not_after(pem)
            .map(format_time)
            .unwrap_or_else(|_| "?".into())
    };
    let signing = state.material(now).signing;
    let mut out = String::new();
    let role = if signing == state.active {
        "signing"
    } else {
        "active (superseded by the staged CA's time)"
    };
    out.push_str(&format!(
        "{role}: {} (valid until {})\n",
        subject(&state.active.cert_pem),
        until(&state.active.cert_pem)
    ));
    if let Some(staged) = &state.staged {
        let role = if signing == staged.ca {
            "signing (staged, promotion pending)"
        } else {
            "staged"
        };
        out.push_str(&format!(
            "{role}: {} (signs from {}, valid until {})\n",
            subject(&staged.ca.cert_pem),
            format_time(staged.activates_at),
            until(&staged.ca.cert_pem)
        ));
    }
    for cert in &state.retired {
        out.push_str(&format!(
            "retired: {} (trusted until {})\n",
            subject(cert),
            until(cert)
        ));
    }
    out
}
