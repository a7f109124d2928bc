//! The serving certificate in `injected-ca` mode: signed by Tollgate's signing CA,
//! held behind a rustls certificate resolver and replaced — never restarted — when it
//! nears its end or the signing CA changes. A handshake picks up the certificate of
//! the moment; connections already open keep theirs, so a rotation drops nothing.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::ca::{self, Leaf};
use super::{TrustMaterial, TrustWatch};

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("{0}")]
    Ca(#[from] ca::CaError),
    #[error("the new serving certificate cannot be used: {0}")]
    Load(String),
}

/// The certificate every TLS listener of the agent presents in `injected-ca` mode.
pub struct ServingCert {
    current: RwLock<Current>,
    validity: Duration,
}

struct Current {
    key: Arc<CertifiedKey>,
    /// The names and addresses it was issued for.
    sans: Vec<String>,
    /// The PEM of the CA that signed it, to notice a change of signer.
    signer: String,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("sans", &self.sans())
            .finish_non_exhaustive()
    }
}

fn certified_key(leaf: &Leaf) -> Result<Arc<CertifiedKey>, ServingError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ServingError::Load(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut leaf.key_pem.as_bytes())
        .map_err(|e| ServingError::Load(e.to_string()))?
        .ok_or_else(|| ServingError::Load("no private key".into()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| ServingError::Load(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

impl ServingCert {
    /// Issues the first certificate from `material` at once.
    pub fn new(
        material: &TrustMaterial,
        sans: Vec<String>,
        validity: Duration,
    ) -> Result<Arc<ServingCert>, ServingError> {
        let current = Self::issue(material, sans, validity)?;
        Ok(Arc::new(ServingCert {
            current: RwLock::new(current),
            validity,
        }))
    }

    fn issue(
        material: &TrustMaterial,
        sans: Vec<String>,
        validity: Duration,
    ) -> Result<Current, ServingError> {
        let leaf = ca::issue_leaf(&material.signing, &sans, validity)?;
        Ok(Current {
            key: certified_key(&leaf)?,
            sans,
            signer: material.signing.cert_pem.clone(),
            not_after: leaf.not_after,
        })
    }

    /// When the certificate served now expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .not_after
    }

    /// The names and addresses in the certificate.
    pub fn sans(&self) -> Vec<String> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .sans
            .clone()
    }

    /// Re-issues for `sans` when they differ from the certificate's (the API server's
    /// addresses changed); true when it did.
    pub fn set_sans(
        &self,
        material: &TrustMaterial,
        sans: Vec<String>,
    ) -> Result<bool, ServingError> {
        if self.sans() == sans {
            return Ok(false);
        }
        let next = Self::issue(material, sans, self.validity)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(true)
    }

    /// Re-issues when the signing CA changed or a third of the lifetime is left.
    fn refresh(&self, material: &TrustMaterial) -> Result<bool, ServingError> {
        let (signer_changed, renew_at) = {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            (
                current.signer != material.signing.cert_pem,
                current.not_after - time::Duration::seconds(self.validity.as_secs() as i64 / 3),
            )
        };
        if !signer_changed && OffsetDateTime::now_utc() < renew_at {
            return Ok(false);
        }
        let next = Self::issue(material, self.sans(), self.validity)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(true)
    }

    /// Time until the certificate should be renewed.
    fn until_renewal(&self) -> Duration {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let renew_at =
            current.not_after - time::Duration::seconds(self.validity.as_secs() as i64 / 3);
        Duration::try_from(renew_at - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
    }

    /// Keeps the certificate current until the trust material's sender goes away.
    pub async fn keep_current(self: Arc<Self>, mut trust: TrustWatch) {
        loop {
            let wait = self
                .until_renewal()
                .clamp(Duration::from_secs(1), Duration::from_secs(3600));
            tokio::select! {
                changed = trust.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
            let material = trust.borrow_and_update().clone();
            match self.refresh(&material) {
                Ok(true) => info!("serving certificate re-issued from Tollgate's signing CA"),
                Ok(false) => {}
                Err(err) => {
                    warn!(%err, "could not re-issue the serving certificate; retrying in 10s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .key
                .clone(),
        )
    }
}

/// The names in-cluster clients dial the API server by (the same list `certs issue`
/// uses), the webhook Service's names, and the given extra names and addresses.
pub fn serving_sans(
    cluster_domain: &str,
    api_addresses: &[std::net::IpAddr],
    webhook_service: (&str, &str),
    extra: &[String],
) -> Vec<String> {
    let (ns, name) = webhook_service;
    let mut sans = vec![
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        format!("kubernetes.default.svc.{cluster_domain}"),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}.svc.{cluster_domain}"),
    ];
    for addr in api_addresses {
        sans.push(addr.to_string());
    }
    sans.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::ca::generate_ca;

    fn material(signing: &ca::CaPair) -> TrustMaterial {
        TrustMaterial {
            signing: signing.clone(),
            tollgate_bundle_pem: signing.cert_pem.clone(),
        }
    }

    fn served(cert: &ServingCert) -> Vec<u8> {
        let current = cert.current.read().unwrap();
        current.key.cert[0].to_vec()
    }

    #[test]
    fn a_new_signer_means_a_new_certificate_and_the_same_signer_does_not() {
        let day = Duration::from_secs(86_400);
        let first = generate_ca(10 * day).unwrap();
        let cert = ServingCert::new(
            &material(&first),
            vec!["kubernetes.default.svc".into()],
            day,
        )
        .unwrap();
        let before = served(&cert);
        assert!(!cert.refresh(&material(&first)).unwrap());
        assert_eq!(served(&cert), before);
        let second = generate_ca(10 * day).unwrap();
        assert!(cert.refresh(&material(&second)).unwrap());
        assert_ne!(served(&cert), before);
    }

    #[test]
    fn new_addresses_mean_a_new_certificate_and_the_same_ones_do_not() {
        let day = Duration::from_secs(86_400);
        let ca = generate_ca(10 * day).unwrap();
        let m = material(&ca);
        let cert = ServingCert::new(&m, vec!["kubernetes".into(), "10.0.0.1".into()], day).unwrap();
        let before = served(&cert);
        assert!(!cert
            .set_sans(&m, vec!["kubernetes".into(), "10.0.0.1".into()])
            .unwrap());
        assert_eq!(served(&cert), before);
        assert!(cert
            .set_sans(&m, vec!["kubernetes".into(), "10.0.0.2".into()])
            .unwrap());
        assert_ne!(served(&cert), before);
        assert_eq!(
            cert.sans(),
            vec!["kubernetes".to_owned(), "10.0.0.2".to_owned()]
        );
    }

    #[test]
    fn sans_cover_the_api_server_and_the_webhook() {
        let sans = serving_sans(
            "cluster.local",
            &["10.96.0.1".parse().unwrap()],
            ("tollgate-system", "tollgate-webhook"),
            &["10.0.0.5".into(), "kubernetes".into()],
        );
        for name in [
            "kubernetes.default.svc.cluster.local",
            "tollgate-webhook.tollgate-system.svc",
            "10.96.0.1",
            "10.0.0.5",
        ] {
            assert!(sans.contains(&name.to_owned()), "{name} in {sans:?}");
        }
        assert_eq!(sans.iter().filter(|s| *s == "kubernetes").count(), 1);
    }
}
