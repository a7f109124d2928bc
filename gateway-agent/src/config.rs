//! The agent's configuration: one plain struct, from flags (and their environment
//! variables) and an optional YAML file holding any of the same settings, validated
//! once at start. Every component takes the part it needs; none reads the environment
//! itself.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `gateway-agent run` flags. Every flag may also come from the config file (its field
/// name in camelCase: `proxyPort`, `approvalStore`, `recordRetention`, `trustMode`) or
/// the environment variable shown; see [`with_config_file`] for which wins.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// YAML file with any of the settings below, by camelCase name (the command line
    /// wins over the file, the file over the environment).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Node addresses pods reach the proxy at (IPv4 and/or IPv6; repeat the flag).
    #[arg(
        long = "proxy-address",
        env = "TOLLGATE_PROXY_ADDRESSES",
        value_delimiter = ','
    )]
    pub proxy_addresses: Vec<IpAddr>,
    /// The proxy's port on those addresses and on loopback, for host-network pods
    /// [default: 15443].
    #[arg(long, env = "TOLLGATE_PROXY_PORT")]
    pub proxy_port: Option<u16>,
    /// Serving certificate issued from the cluster CA (`certs issue`); trust mode
    /// `cluster-ca` only.
    #[arg(long, env = "TOLLGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "TOLLGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA, to verify the real API server.
    #[arg(long, env = "TOLLGATE_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// kubeconfig for the agent's own API access (default: in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Policy file (reloaded when it changes).
    #[arg(
        long,
        env = "TOLLGATE_POLICY_FILE",
        conflicts_with = "policy_configmap"
    )]
    pub policy_file: Option<PathBuf>,
    /// Policy ConfigMap as namespace/name (watched; key `policy.yaml`).
    #[arg(long, env = "TOLLGATE_POLICY_CONFIGMAP")]
    pub policy_configmap: Option<String>,
    /// cgroup-v2 directory holding kubelet's kubepods hierarchy (default: the
    /// cgroup2 mount).
    #[arg(long, env = "TOLLGATE_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// The agent's own cgroup, whose connections are never steered (default: this
    /// process's cgroup as `/proc/self/cgroup` names it under the cgroup2 mount). Give
    /// it when the agent's view of the cgroup tree is not the container's own.
    #[arg(long, env = "TOLLGATE_AGENT_CGROUP")]
    pub agent_cgroup: Option<PathBuf>,
    /// bpffs directory for pinned programs and maps [default: /sys/fs/bpf/tollgate].
    #[arg(long, env = "TOLLGATE_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Plain-HTTP address for /healthz, /readyz and /metrics [default: 127.0.0.1:15090].
    #[arg(long, env = "TOLLGATE_ADMIN_ADDRESS")]
    pub admin_address: Option<SocketAddr>,
    /// How long a connection from a pod discovery does not know yet waits before it is
    /// refused (500ms, 5s, 1m) [default: 5s].
    #[arg(long, env = "TOLLGATE_CLASSIFY_TIMEOUT", value_parser = parse_duration)]
    pub classify_timeout: Option<Duration>,
    /// Accept service-account tokens not bound to a pod (legacy Secret tokens).
    #[arg(long, env = "TOLLGATE_ALLOW_UNBOUND_TOKENS")]
    pub allow_unbound_tokens: bool,
    /// Largest request body forwarded, in bytes [default: 3145728, the API server's own].
    #[arg(long, env = "TOLLGATE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// How often pending approvals past their expiry are marked Expired [default: 5s].
    #[arg(long, env = "TOLLGATE_APPROVAL_EXPIRY_INTERVAL", value_parser = parse_duration)]
    pub approval_expiry_interval: Option<Duration>,
    /// Decided approvals are removed from the store this long after their decision
    /// (7d, 12h); the agents' logs and the session records keep them [default: 7d].
    #[arg(long, env = "TOLLGATE_APPROVAL_RETENTION", value_parser = parse_duration)]
    pub approval_retention: Option<Duration>,
    /// On SIGTERM, how long requests in flight get to finish before the agent exits
    /// and cuts what is still open (watches, exec, held approvals) [default: 10s]. Keep
    /// it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Where approvals are kept.
    #[command(flatten)]
    pub approvals: crate::approvals::config::ApprovalArgs,
    /// The reviewers' REST API.
    #[command(flatten)]
    pub api: crate::api::ApiArgs,
    /// Session recording.
    #[command(flatten)]
    pub recording: RecordingArgs,
    /// How pods come to trust the proxy.
    #[command(flatten)]
    pub trust: crate::trust::config::TrustArgs,
}

/// Where and how sessions are recorded (DESIGN §7). On by default: a proxy that holds
/// and masks calls but keeps no record of them cannot be audited.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordingArgs {
    /// Do not record sessions (the proxy still enforces and masks).
    #[arg(long, env = "TOLLGATE_NO_RECORDING")]
    pub no_recording: bool,
    /// Directory of session files [default: <state-dir>/sessions].
    #[arg(long, env = "TOLLGATE_SESSIONS_DIR")]
    pub sessions_dir: Option<PathBuf>,
    /// Bytes one session may take before later exchanges are only counted.
    #[arg(long, env = "TOLLGATE_RECORD_MAX_SESSION_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub record_max_session_bytes: u64,
    /// Largest request or response body kept in a record (larger ones keep their size
    /// and SHA-256).
    #[arg(long, env = "TOLLGATE_RECORD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub record_max_body_bytes: usize,
    /// Session files older than this are deleted (30d, 12h).
    #[arg(long, env = "TOLLGATE_RECORD_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub record_retention: Duration,
    /// The oldest session files are deleted beyond this many bytes in all.
    #[arg(long, env = "TOLLGATE_RECORD_RETENTION_BYTES", default_value_t = 8 * 1024 * 1024 * 1024)]
    pub record_retention_bytes: u64,
    /// When records reach the disk: `close` (fsync when a session ends), `every-record`
    /// (survives power loss, one flush per exchange) or `never` (the page cache; a
    /// killed agent still loses nothing it wrote).
    #[arg(long, env = "TOLLGATE_RECORD_SYNC", default_value = "close", value_parser = ["close", "every-record", "never"])]
    pub record_sync: String,
}

impl RecordingArgs {
    /// The recorder's configuration, or None when recording is off.
    pub fn recording_config(
        &self,
        state_dir: &Path,
        node: &str,
    ) -> Option<crate::recording::RecordingConfig> {
        if self.no_recording {
            return None;
        }
        let dir = self
            .sessions_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("sessions"));
        let mut config = crate::recording::RecordingConfig::new(dir, node);
        config.max_session_bytes = self.record_max_session_bytes;
        config.max_record_body_bytes = self.record_max_body_bytes;
        config.retention_max_age = Some(self.record_retention);
        config.retention_max_total_bytes = Some(self.record_retention_bytes);
        config.sync = match self.record_sync.as_str() {
            "every-record" => crate::recording::SyncPolicy::EveryRecord,
            "never" => crate::recording::SyncPolicy::Never,
            _ => crate::recording::SyncPolicy::OnClose,
        };
        Some(config)
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub proxy_addresses: Vec<IpAddr>,
    pub proxy_port: u16,
    /// Where the serving certificate comes from (the trust mode).
    pub serving: Serving,
    pub cluster_ca: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub policy: crate::policy::source::PolicySource,
    pub cgroup_root: PathBuf,
    pub agent_cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub admin_address: SocketAddr,
    pub classify_timeout: Duration,
    pub allow_unbound_tokens: bool,
    pub max_body_bytes: usize,
    pub approval_expiry_interval: Duration,
    pub approval_retention: Duration,
    pub drain_timeout: Duration,
    pub approvals: crate::approvals::config::ApprovalArgs,
    pub api: crate::api::ApiArgs,
    pub recording: RecordingArgs,
}

/// The proxy's serving certificate, by trust mode (docs/trust.md).
#[derive(Debug, Clone)]
pub enum Serving {
    /// `cluster-ca`: files the operator issued from the cluster CA.
    Files { cert: PathBuf, key: PathBuf },
    /// `injected-ca`: issued by the agent from Tollgate's own CA.
    InjectedCa(Box<crate::trust::config::InjectedCa>),
}

pub const DEFAULT_PROXY_PORT: u16 = 15443;
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15090";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/tollgate";
pub const DEFAULT_CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_APPROVAL_EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0} is required (flag --{1} or config file field {2})")]
    Missing(&'static str, &'static str, &'static str),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(
        args: RunArgs,
        default_cgroup_root: impl FnOnce() -> Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let node_name = args.node_name.ok_or(ConfigError::Missing(
            "the node name",
            "node-name",
            "nodeName",
        ))?;
        let proxy_addresses = args.proxy_addresses;
        if proxy_addresses.is_empty() {
            return Err(ConfigError::Missing(
                "a pod-facing proxy address",
                "proxy-address",
                "proxyAddresses",
            ));
        }
        if proxy_addresses.iter().filter(|a| a.is_ipv4()).count() > 1
            || proxy_addresses.iter().filter(|a| a.is_ipv6()).count() > 1
        {
            return Err(ConfigError::Invalid(
                "at most one IPv4 and one IPv6 proxy address".into(),
            ));
        }
        let proxy_port = args.proxy_port.unwrap_or(DEFAULT_PROXY_PORT);
        if proxy_port == 0 {
            return Err(ConfigError::Invalid("the proxy port cannot be 0".into()));
        }
        let tls_cert = args.tls_cert;
        let tls_key = args.tls_key;
        let serving = match args.trust.validate().map_err(ConfigError::Invalid)? {
            None => Serving::Files {
                cert: tls_cert.ok_or(ConfigError::Missing(
                    "the serving certificate",
                    "tls-cert",
                    "tlsCert",
                ))?,
                key: tls_key.ok_or(ConfigError::Missing("the serving key", "tls-key", "tlsKey"))?,
            },
            Some(injected) => {
                if tls_cert.is_some() || tls_key.is_some() {
                    return Err(ConfigError::Invalid(
                        "--tls-cert and --tls-key belong to --trust-mode cluster-ca; \
                         injected-ca issues its own serving certificate from Tollgate's CA"
                            .into(),
                    ));
                }
                Serving::InjectedCa(Box::new(injected))
            }
        };
        let cluster_ca = args.cluster_ca.ok_or(ConfigError::Missing(
            "the cluster CA",
            "cluster-ca",
            "clusterCa",
        ))?;
        let policy = match (args.policy_file, args.policy_configmap) {
            (Some(path), None) => crate::policy::source::PolicySource::File(path),
            (None, Some(reference)) => {
                let (namespace, name) = reference
                    .split_once('/')
                    .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "policy ConfigMap {reference:?} must be written namespace/name"
                        ))
                    })?;
                crate::policy::source::PolicySource::ConfigMap {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give a policy file or a policy ConfigMap, not both".into(),
                ))
            }
            (None, None) => {
                return Err(ConfigError::Missing(
                    "a policy",
                    "policy-file or --policy-configmap",
                    "policyFile or policyConfigmap",
                ))
            }
        };
        let cgroup_root = match args.cgroup_root {
            Some(root) => root,
            None => default_cgroup_root().ok_or_else(|| {
                ConfigError::Invalid("no cgroup2 mount found; pass --cgroup-root".into())
            })?,
        };
        let classify_timeout = args.classify_timeout.unwrap_or(DEFAULT_CLASSIFY_TIMEOUT);
        let admin_address = args
            .admin_address
            .unwrap_or_else(|| DEFAULT_ADMIN_ADDRESS.parse().expect("valid default"));
        Ok(Config {
            node_name,
            proxy_addresses,
            proxy_port,
            serving,
            cluster_ca,
            kubeconfig: args.kubeconfig,
            policy,
            cgroup_root,
            agent_cgroup: args.agent_cgroup,
            bpffs: args.bpffs.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS)),
            admin_address,
            classify_timeout,
            allow_unbound_tokens: args.allow_unbound_tokens,
            max_body_bytes: args.max_body_bytes.unwrap_or(3 * 1024 * 1024),
            approval_expiry_interval: args
                .approval_expiry_interval
                .unwrap_or(DEFAULT_APPROVAL_EXPIRY_INTERVAL),
            approval_retention: args
                .approval_retention
                .unwrap_or(Duration::from_secs(7 * 86_400)),
            drain_timeout: args.drain_timeout.unwrap_or(Duration::from_secs(10)),
            approvals: args.approvals,
            api: args.api,
            recording: args.recording,
        })
    }
}

/// The command line with the `run` config file's settings added, for the parser to
/// read as if they were flags: every `run` flag may be set in the file under its field
/// name in camelCase (`proxyAddresses: [10.0.0.5]`, `approvalStore: kubernetes`,
/// `noRecording: true`). A setting is added (right after `run`) only when the command
/// line does not give that flag, so the command line wins over the file, and the file
/// over the environment (clap reads the environment only for flags not given).
///
/// `argv` is returned unchanged when it runs no `run` or names no config file (by
/// `--config` or `TOLLGATE_CONFIG`). A setting no flag has, or a value of the wrong
/// shape, is an error naming the file and the setting.
pub fn with_config_file(
    argv: Vec<std::ffi::OsString>,
    env_config: Option<std::ffi::OsString>,
) -> Result<Vec<std::ffi::OsString>, ConfigError> {
    use clap::CommandFactory;
    use std::ffi::OsString;

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        run: RunArgs,
    }

    // The subcommand: the first word that is not an option (`--log-format` is the one
    // global option with a separate value).
    let mut at = None;
    let mut i = 1;
    while let Some(word) = argv.get(i) {
        if word == "--log-format" {
            i += 2;
            continue;
        }
        if !word.to_string_lossy().starts_with('-') {
            at = (word == "run").then_some(i);
            break;
        }
        i += 1;
    }
    let Some(at) = at else {
        return Ok(argv);
    };
    let after = &argv[at + 1..];
    let given = |long: &str| {
        let flag = format!("--{long}");
        let with_value = format!("--{long}=");
        after.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&with_value))
        })
    };
    let named = after
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| after.get(i + 1).cloned())
        .or_else(|| {
            after.iter().find_map(|a| {
                a.to_str()
                    .and_then(|a| a.strip_prefix("--config="))
                    .map(OsString::from)
            })
        })
        .or(env_config);
    let Some(path) = named.map(PathBuf::from) else {
        return Ok(argv);
    };
    let parse_error = |message: String| ConfigError::Parse {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let settings: BTreeMap<String, serde_json::Value> = if text.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_saphyr::from_str(&text).map_err(|err| {
            parse_error(
                err.to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })?
    };
    let command = Run::command();
    let mut added: Vec<OsString> = Vec::new();
    for (key, value) in settings {
        // Field names: `proxyAddresses` is the field proxy_addresses, flag
        // --proxy-address.
        let mut id = String::with_capacity(key.len() + 4);
        for c in key.chars() {
            if c.is_ascii_uppercase() {
                id.push('_');
                id.push(c.to_ascii_lowercase());
            } else {
                id.push(c);
            }
        }
        let arg = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some() && id != "config")
            .ok_or_else(|| {
                parse_error(format!(
                    "unknown setting {key:?} (settings are the flags of `gateway-agent run \
                     --help` in camelCase)"
                ))
            })?;
        let long = arg.get_long().unwrap_or_default();
        if given(long) {
            continue;
        }
        let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let scalar = |v: &serde_json::Value| -> Result<String, ConfigError> {
            match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                serde_json::Value::Bool(b) => Ok(b.to_string()),
                _ => Err(parse_error(format!(
                    "{key}: expected a string, number or boolean"
                ))),
            }
        };
        match (&value, switch) {
            (serde_json::Value::Null, _) => {}
            (serde_json::Value::Bool(on), true) => {
                if *on {
                    added.push(format!("--{long}").into());
                }
            }
            (_, true) => return Err(parse_error(format!("{key}: expected true or false"))),
            (serde_json::Value::Array(_), false)
                if !matches!(arg.get_action(), clap::ArgAction::Append) =>
            {
                return Err(parse_error(format!("{key}: takes one value, not a list")))
            }
            (serde_json::Value::Array(items), false) => {
                for item in items {
                    added.push(format!("--{long}={}", scalar(item)?).into());
                }
            }
            (value, false) => added.push(format!("--{long}={}", scalar(value)?).into()),
        }
    }
    let mut out = argv[..=at].to_vec();
    out.extend(added);
    out.extend_from_slice(after);
    Ok(out)
}

/// `500ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        "d" => Ok(Duration::from_secs(n * 86_400)),
        _ => Err(format!(
            "{text:?} is not a duration like 500ms, 5s, 2m, 1h or 30d"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        run: RunArgs,
    }

    /// The flags every test starts from, parsed as the CLI parses them (so the
    /// defaults of flattened groups apply).
    fn args() -> RunArgs {
        let mut args = <Command as clap::Parser>::parse_from([
            "run",
            "--node-name=node1",
            "--proxy-address=10.244.1.1",
            "--tls-cert=tls.crt",
            "--tls-key=tls.key",
            "--cluster-ca=ca.crt",
            "--policy-file=policy.yaml",
        ])
        .run;
        // The test process's environment must not leak in.
        args.kubeconfig = None;
        args
    }

    #[test]
    fn defaults_fill_in() {
        let config = Config::load(args(), || Some("/sys/fs/cgroup".into())).unwrap();
        assert_eq!(config.proxy_port, DEFAULT_PROXY_PORT);
        assert_eq!(config.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(config.classify_timeout, DEFAULT_CLASSIFY_TIMEOUT);
        assert_eq!(config.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn missing_settings_are_named() {
        let mut a = args();
        a.node_name = None;
        let err = Config::load(a, || None).unwrap_err().to_string();
        assert!(err.contains("--node-name"), "{err}");
        let mut a = args();
        a.policy_file = None;
        let err = Config::load(a, || Some("/x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy"), "{err}");
        let mut a = args();
        a.policy_file = None;
        a.policy_configmap = Some("justaname".into());
        let err = Config::load(a, || Some("/x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespace/name"), "{err}");
    }

    #[test]
    fn trust_modes_take_their_own_certificates() {
        let config = Config::load(args(), || Some("/x".into())).unwrap();
        assert!(matches!(config.serving, Serving::Files { .. }));
        let mut a = args();
        a.trust.trust_mode = crate::trust::config::TrustMode::InjectedCa;
        let err = Config::load(a.clone(), || Some("/x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        a.tls_cert = None;
        a.tls_key = None;
        let config = Config::load(a.clone(), || Some("/x".into())).unwrap();
        let Serving::InjectedCa(injected) = config.serving else {
            panic!("injected-ca expected");
        };
        assert_eq!(injected.ca_secret_namespace, "tollgate-system");
        assert_eq!(injected.ca_secret_name, "tollgate-ca");
        a.trust.ca_secret = "no-namespace".into();
        let err = Config::load(a.clone(), || Some("/x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespace/name"), "{err}");
        a.trust.ca_secret = "tollgate-system/tollgate-ca".into();
        a.trust.ca_propagation = Duration::from_secs(200 * 86_400);
        let err = Config::load(a, || Some("/x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ca-propagation"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    /// The flags of `run` as [`with_config_file`] leaves them, parsed.
    fn parsed(argv: &[&str], file: &Path) -> Result<RunArgs, ConfigError> {
        let argv: Vec<std::ffi::OsString> = argv.iter().map(|a| a.into()).collect();
        let argv = with_config_file(argv, Some(file.as_os_str().to_owned()))?;
        // What follows `run`, as the run command's parser sees it.
        let at = argv.iter().position(|a| a == "run").unwrap();
        let mut run = <Command as clap::Parser>::try_parse_from(&argv[at..])
            .map_err(|e| ConfigError::Invalid(e.to_string()))?
            .run;
        run.kubeconfig = None;
        Ok(run)
    }

    #[test]
    fn every_flag_may_come_from_the_file_and_the_command_line_wins() {
        let dir = std::env::temp_dir().join(format!("tollgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.yaml");
        std::fs::write(
            &file,
            "nodeName: node1\nproxyAddresses: [10.244.1.1]\nproxyPort: 16443\n\
             classifyTimeout: 2s\ntlsCert: tls.crt\ntlsKey: tls.key\nclusterCa: ca.crt\n\
             policyFile: policy.yaml\napprovalStore: kubernetes\nnoRecording: true\n\
             drainTimeout: 3s\nservingSans: [a.example, 10.0.0.9]\n",
        )
        .unwrap();
        let base = ["gateway-agent", "--log-format", "json", "run"];
        let run = parsed(&base, &file).unwrap();
        let config = Config::load(run, || Some("/x".into())).unwrap();
        assert_eq!(config.proxy_port, 16443);
        assert_eq!(config.classify_timeout, Duration::from_secs(2));
        assert_eq!(config.drain_timeout, Duration::from_secs(3));
        assert!(config.recording.no_recording);
        assert_eq!(
            config.approvals.approval_store,
            crate::approvals::config::StoreKind::Kubernetes
        );
        assert_eq!(config.node_name, "node1");
        // The command line wins, also for lists.
        let mut argv = base.to_vec();
        argv.extend(["--proxy-port", "17443", "--serving-san=b.example"]);
        let run = parsed(&argv, &file).unwrap();
        assert_eq!(run.proxy_port, Some(17443));
        assert_eq!(run.trust.serving_sans, vec!["b.example".to_owned()]);

        std::fs::write(&file, "proxyPrt: 16443\n").unwrap();
        let err = parsed(&base, &file).unwrap_err().to_string();
        assert!(
            err.contains("proxyPrt") && err.contains("config.yaml"),
            "{err}"
        );
        std::fs::write(&file, "noRecording: sometimes\n").unwrap();
        let err = parsed(&base, &file).unwrap_err().to_string();
        assert!(err.contains("noRecording"), "{err}");
        std::fs::write(&file, "proxyPort: [1, 2]\n").unwrap();
        let err = parsed(&base, &file).unwrap_err().to_string();
        assert!(err.contains("proxyPort: takes one value"), "{err}");
        std::fs::write(&file, "config: other.yaml\n").unwrap();
        assert!(
            parsed(&base, &file).is_err(),
            "a config file cannot name another"
        );
        // Other commands are left alone.
        let argv: Vec<std::ffi::OsString> = ["gateway-agent", "doctor"]
            .iter()
            .map(|a| a.into())
            .collect();
        assert_eq!(
            with_config_file(argv.clone(), Some(file.as_os_str().into())).unwrap(),
            argv
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
