//! How in-pod clients come to trust the proxy (issue 8, docs/trust.md).
//!
//! Two trust modes:
//! - `cluster-ca`: the operator issues the proxy's serving certificate from the cluster
//!   CA (`certs issue`) and the agent serves it from files. Pods change in no way.
//! - `injected-ca`: for managed clusters, where nobody can sign with the cluster CA.
//!   Tollgate keeps a CA of its own in a Secret ([`secret`]), signs its serving
//!   certificates with it ([`serving`]), and a mutating admission webhook ([`webhook`])
//!   points the projected service-account volume of every pod that will be enforced at
//!   a ConfigMap Tollgate keeps in the pod's namespace ([`bundle`]): the cluster CA and
//!   Tollgate's CAs together. Nothing else in the pod changes.
//!
//! The modules share one value, [`TrustMaterial`], published on a watch channel by
//! [`secret`] whenever the CA Secret changes or a staged CA becomes the signing one.

use std::sync::Arc;

pub mod bundle;
pub mod ca;
pub mod cli;
pub mod config;
pub mod secret;
pub mod serving;
pub mod webhook;

/// The label a pod or namespace carries to be enforced (same as discovery's).
pub use crate::discovery::ENFORCE_LABEL;

/// What clients must trust and what the agent signs with, right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustMaterial {
    /// The CA that signs the agent's serving certificates now.
    pub signing: ca::CaPair,
    /// Tollgate's CA certificates a client must trust now, PEM, concatenated: the
    /// signing CA, a staged successor (published before it signs anything, so clients
    /// have it by the time it does) and a retired predecessor until it expires (agents
    /// that have not switched yet still serve from it).
    pub tollgate_bundle_pem: String,
}

/// The receiving end every consumer of the trust material holds.
pub type TrustWatch = tokio::sync::watch::Receiver<Arc<TrustMaterial>>;

/// The CA bundle a mutated pod trusts: the cluster CA first (so a connection that is
/// not steered still verifies), then Tollgate's CAs.
pub fn pod_bundle(cluster_ca_pem: &str, material: &TrustMaterial) -> String {
    let mut bundle =
        String::with_capacity(cluster_ca_pem.len() + material.tollgate_bundle_pem.len() + 1);
    bundle.push_str(cluster_ca_pem.trim_end());
    bundle.push('\n');
    bundle.push_str(material.tollgate_bundle_pem.trim_end());
    bundle.push('\n');
    bundle
}
