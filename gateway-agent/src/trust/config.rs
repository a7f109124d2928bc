//! `run` flags of the trust modes, validated once by [`TrustArgs::validate`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::parse_duration;

/// How in-pod clients come to trust the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrustMode {
    /// The operator issued the serving certificate from the cluster CA (`certs issue`,
    /// `--tls-cert`/`--tls-key`); pods are not changed.
    ClusterCa,
    /// Tollgate's own CA, injected into enforced pods by the admission webhook: for
    /// managed clusters, where nobody can sign with the cluster CA.
    InjectedCa,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// `cluster-ca` or `injected-ca` (docs/trust.md says which to use).
    #[arg(
        long,
        env = "TOLLGATE_TRUST_MODE",
        value_enum,
        default_value = "cluster-ca"
    )]
    pub trust_mode: TrustMode,
    /// injected-ca: the Secret holding Tollgate's CA, as namespace/name (created on
    /// first start).
    #[arg(
        long,
        env = "TOLLGATE_CA_SECRET",
        default_value = "tollgate-system/tollgate-ca"
    )]
    pub ca_secret: String,
    /// injected-ca: how long a new CA is valid.
    #[arg(long, env = "TOLLGATE_CA_VALIDITY", default_value = "365d", value_parser = parse_duration)]
    pub ca_validity: Duration,
    /// injected-ca: a successor CA is staged when the signing one has less than this
    /// left.
    #[arg(long, env = "TOLLGATE_CA_ROTATE_BEFORE", default_value = "90d", value_parser = parse_duration)]
    pub ca_rotate_before: Duration,
    /// injected-ca: a staged CA is published to pods this long before it signs, so
    /// every pod's bundle has it by then (kubelet refreshes projected volumes within a
    /// minute or two; clients that read their CA file once at start need it too).
    #[arg(long, env = "TOLLGATE_CA_PROPAGATION", default_value = "30d", value_parser = parse_duration)]
    pub ca_propagation: Duration,
    /// injected-ca: how long a serving certificate is valid; it is renewed when a third
    /// of that is left, and at once when the signing CA changes.
    #[arg(long, env = "TOLLGATE_SERVING_CERT_VALIDITY", default_value = "7d", value_parser = parse_duration)]
    pub serving_cert_validity: Duration,
    /// injected-ca: the ConfigMap (in each enforced pod's namespace) with the cluster
    /// CA and Tollgate's CAs, key `ca.crt`.
    #[arg(
        long,
        env = "TOLLGATE_TRUST_BUNDLE_CONFIGMAP",
        default_value = "tollgate-ca-bundle"
    )]
    pub trust_bundle_configmap: String,
    /// injected-ca: the cluster's DNS domain (for `kubernetes.default.svc.<domain>`).
    #[arg(long, env = "TOLLGATE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// injected-ca: further names or addresses for the serving certificate (repeat).
    #[arg(
        long = "serving-san",
        env = "TOLLGATE_SERVING_SANS",
        value_delimiter = ','
    )]
    pub serving_sans: Vec<String>,
    /// injected-ca: the admission webhook's address (TLS).
    #[arg(long, env = "TOLLGATE_WEBHOOK_LISTEN", default_value = "0.0.0.0:15445")]
    pub webhook_listen: SocketAddr,
    /// injected-ca: the webhook's Service as namespace/name (its DNS names go into the
    /// serving certificate).
    #[arg(
        long,
        env = "TOLLGATE_WEBHOOK_SERVICE",
        default_value = "tollgate-system/tollgate-webhook"
    )]
    pub webhook_service: String,
    /// injected-ca: the MutatingWebhookConfiguration whose `caBundle` the agent keeps
    /// current.
    #[arg(
        long,
        env = "TOLLGATE_WEBHOOK_CONFIGURATION",
        default_value = "tollgate"
    )]
    pub webhook_configuration: String,
}

/// The validated settings of `injected-ca`.
#[derive(Debug, Clone)]
pub struct InjectedCa {
    pub ca_secret_namespace: String,
    pub ca_secret_name: String,
    pub lifetimes: crate::trust::ca::Lifetimes,
    pub trust_bundle_configmap: String,
    pub cluster_domain: String,
    pub serving_sans: Vec<String>,
    pub webhook_listen: SocketAddr,
    pub webhook_service_namespace: String,
    pub webhook_service_name: String,
    pub webhook_configuration: String,
}

fn split_reference(what: &str, reference: &str) -> Result<(String, String), String> {
    reference
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .ok_or_else(|| format!("{what} {reference:?} must be written namespace/name"))
}

impl TrustArgs {
    /// None in `cluster-ca` mode; the checked settings in `injected-ca` mode.
    pub fn validate(&self) -> Result<Option<InjectedCa>, String> {
        if self.trust_mode == TrustMode::ClusterCa {
            return Ok(None);
        }
        let (ca_secret_namespace, ca_secret_name) =
            split_reference("--ca-secret", &self.ca_secret)?;
        let (webhook_service_namespace, webhook_service_name) =
            split_reference("--webhook-service", &self.webhook_service)?;
        let lifetimes = crate::trust::ca::Lifetimes {
            ca_validity: self.ca_validity,
            rotate_before: self.ca_rotate_before,
            propagation: self.ca_propagation,
            serving_validity: self.serving_cert_validity,
        };
        lifetimes.check()?;
        if self.trust_bundle_configmap.is_empty()
            || self.trust_bundle_configmap == "kube-root-ca.crt"
        {
            return Err("--trust-bundle-configmap must name a ConfigMap of Tollgate's own".into());
        }
        if self.webhook_configuration.is_empty() {
            return Err("--webhook-configuration cannot be empty".into());
        }
        Ok(Some(InjectedCa {
            ca_secret_namespace,
            ca_secret_name,
            lifetimes,
            trust_bundle_configmap: self.trust_bundle_configmap.clone(),
            cluster_domain: self.cluster_domain.clone(),
            serving_sans: self.serving_sans.clone(),
            webhook_listen: self.webhook_listen,
            webhook_service_namespace,
            webhook_service_name,
            webhook_configuration: self.webhook_configuration.clone(),
        }))
    }
}
