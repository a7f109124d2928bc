//! The agent's approval settings (flattened into `run`'s flags) and the two things
//! built from them at start-up: the store and the webhook notifier.

use std::path::{Path, PathBuf};

use tracing::info;

use super::notify::{Notifier, NotifyConfig, NotifyError};
use super::store::embedded::EmbeddedStore;
use super::store::kubernetes::KubeStore;
use super::store::{Store, StoreError};

/// Where the embedded store keeps its file by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tollgate";
/// The embedded store's file name inside the state directory.
pub const EMBEDDED_FILE: &str = "approvals.redb";

/// Which store holds approvals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreKind {
    /// A redb file on this node (`<state-dir>/approvals.redb`): one node, survives
    /// restarts.
    #[default]
    Embedded,
    /// `ApprovalRequest` custom resources (CRD `approvalrequests.tollgate.dev`): one
    /// queue for every node and reviewer.
    Kubernetes,
}

/// Approval flags of `gateway-agent run`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApprovalArgs {
    /// Where approvals are kept: `embedded` (a file on this node) or `kubernetes`
    /// (ApprovalRequest custom resources shared by every node).
    #[arg(
        long = "approval-store",
        env = "TOLLGATE_APPROVAL_STORE",
        value_enum,
        default_value_t = StoreKind::Embedded
    )]
    pub approval_store: StoreKind,
    /// Directory for the agent's persistent state (the embedded store's
    /// approvals.redb); created when missing.
    #[arg(long, env = "TOLLGATE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// URL (http or https) to POST a signed summary of each new approval to.
    #[arg(long, env = "TOLLGATE_APPROVAL_WEBHOOK_URL")]
    pub approval_webhook_url: Option<String>,
    /// File holding the webhook's HMAC secret (required with the URL; surrounding
    /// whitespace is ignored).
    #[arg(long, env = "TOLLGATE_APPROVAL_WEBHOOK_SECRET_FILE")]
    pub approval_webhook_secret_file: Option<PathBuf>,
    /// PEM CA certificates to trust for an https webhook instead of the system's.
    #[arg(long, env = "TOLLGATE_APPROVAL_WEBHOOK_CA_FILE")]
    pub approval_webhook_ca_file: Option<PathBuf>,
}

impl Default for ApprovalArgs {
    /// The same as the flags' defaults.
    fn default() -> ApprovalArgs {
        ApprovalArgs {
            approval_store: StoreKind::Embedded,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            approval_webhook_url: None,
            approval_webhook_secret_file: None,
            approval_webhook_ca_file: None,
        }
    }
}

impl ApprovalArgs {
    /// The embedded store's file.
    pub fn embedded_path(&self) -> PathBuf {
        self.state_dir.join(EMBEDDED_FILE)
    }
}

/// Why the webhook settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("--approval-webhook-url needs --approval-webhook-secret-file")]
    NoSecret,
    #[error(
        "--approval-webhook-secret-file and --approval-webhook-ca-file need --approval-webhook-url"
    )]
    NoUrl,
    #[error("reading the webhook secret {path}: {source}")]
    ReadSecret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// Opens the configured store. The embedded store's directory is created (0700: the
/// file names who asked for what) when missing. `client` is used only by the
/// Kubernetes store, which returns once its first listing is in.
pub async fn open_store(args: &ApprovalArgs, client: kube::Client) -> Result<Store, StoreError> {
    match args.approval_store {
        StoreKind::Embedded => {
            let dir = args.state_dir.clone();
            let path = args.embedded_path();
            let store = tokio::task::spawn_blocking(move || {
                create_private_dir(&dir)?;
                EmbeddedStore::open(&path)
            })
            .await
            .map_err(|e| StoreError::Embedded(format!("opening the store failed: {e}")))??;
            Ok(Store::Embedded(store))
        }
        StoreKind::Kubernetes => Ok(Store::Kubernetes(KubeStore::start(client).await?)),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::Embedded(format!("creating {}: {e}", dir.display())))
}

/// The webhook notifier, or `None` when no URL is configured.
pub fn notifier(args: &ApprovalArgs) -> Result<Option<Notifier>, WebhookConfigError> {
    let Some(url) = &args.approval_webhook_url else {
        if args.approval_webhook_secret_file.is_some() || args.approval_webhook_ca_file.is_some() {
            return Err(WebhookConfigError::NoUrl);
        }
        return Ok(None);
    };
    let path = args
        .approval_webhook_secret_file
        .as_ref()
        .ok_or(WebhookConfigError::NoSecret)?;
    let secret = std::fs::read(path).map_err(|source| WebhookConfigError::ReadSecret {
        path: path.clone(),
        source,
    })?;
    // A Secret made with `echo` or `kubectl create secret --from-file` often ends in a
    // newline the receiver's copy does not have.
    let secret = secret.trim_ascii().to_vec();
    let mut config = NotifyConfig::new(url.clone(), secret);
    config.ca_file = args.approval_webhook_ca_file.clone();
    let notifier = Notifier::new(config)?;
    info!(%url, "approval notifications enabled");
    Ok(Some(notifier))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::approvals::store::testing::temp_dir;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        approvals: ApprovalArgs,
    }

    fn parse(args: &[&str]) -> ApprovalArgs {
        Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .expect("parse")
            .approvals
    }

    #[test]
    fn flags_and_defaults() {
        let defaults = parse(&[]);
        assert_eq!(defaults.approval_store, StoreKind::Embedded);
        assert_eq!(defaults.state_dir, ApprovalArgs::default().state_dir);
        assert_eq!(
            defaults.embedded_path(),
            Path::new("/var/lib/tollgate/approvals.redb")
        );
        let set = parse(&[
            "--approval-store",
            "kubernetes",
            "--state-dir",
            "/tmp/x",
            "--approval-webhook-url",
            "https://hooks.example/tollgate",
            "--approval-webhook-secret-file",
            "/s",
            "--approval-webhook-ca-file",
            "/ca",
        ]);
        assert_eq!(set.approval_store, StoreKind::Kubernetes);
        assert_eq!(set.state_dir, Path::new("/tmp/x"));
        assert_eq!(
            set.approval_webhook_url.as_deref(),
            Some("https://hooks.example/tollgate")
        );
        assert!(Cli::try_parse_from(["agent", "--approval-store", "etcd"]).is_err());
    }

    #[test]
    fn webhook_settings() {
        let dir = temp_dir("webhook-config");
        assert!(notifier(&ApprovalArgs::default()).unwrap().is_none());
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let args = ApprovalArgs {
            approval_webhook_url: Some("http://127.0.0.1:9/hook".into()),
            approval_webhook_secret_file: Some(secret.clone()),
            ..ApprovalArgs::default()
        };
        assert!(notifier(&args).unwrap().is_some());
        let no_secret = ApprovalArgs {
            approval_webhook_secret_file: None,
            ..args.clone()
        };
        assert!(matches!(
            notifier(&no_secret),
            Err(WebhookConfigError::NoSecret)
        ));
        let no_url = ApprovalArgs {
            approval_webhook_url: None,
            ..args.clone()
        };
        assert!(matches!(notifier(&no_url), Err(WebhookConfigError::NoUrl)));
        let unreadable = ApprovalArgs {
            approval_webhook_secret_file: Some(dir.path().join("missing")),
            ..args
        };
        assert!(matches!(
            notifier(&unreadable),
            Err(WebhookConfigError::ReadSecret { .. })
        ));
    }

    /// The embedded store through `open_store`: its directory is made, and a reopened
    /// store has what the first one wrote. (The client is never used for it.)
    #[tokio::test]
    async fn open_embedded_creates_the_state_dir() {
        let dir = temp_dir("open-store");
        let args = ApprovalArgs {
            state_dir: dir.path().join("state"),
            ..ApprovalArgs::default()
        };
        let client = unused_client();
        let store = open_store(&args, client.clone()).await.expect("open");
        assert_eq!(store.kind(), "embedded");
        let a = crate::approvals::store::testing::approval("ar-0000000000000001", "fp", "now");
        store.create(a.clone()).await.unwrap();
        drop(store);
        let store = open_store(&args, client).await.expect("reopen");
        assert_eq!(store.get(&a.id).await.unwrap(), Some(a));
        assert!(args.embedded_path().is_file());
    }

    /// A client that is never called (it points at a loopback port nobody serves).
    fn unused_client() -> kube::Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        kube::Client::try_from(config).expect("client")
    }
}
