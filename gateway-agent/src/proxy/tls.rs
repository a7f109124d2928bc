//! TLS on both sides of the proxy: the serving side presents the certificate issued
//! from the cluster CA (`certs issue`) or, in trust mode `injected-ca`, the one the
//! agent issues from Tollgate's CA (`trust::serving`), with ALPN h2 and http/1.1; the
//! upstream side verifies the real API server against the cluster CA.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the serving certificate and key do not fit together: {0}")]
    Config(rustls::Error),
    #[error("the upstream verifier cannot be built: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

/// The serving side: the API server's names, ALPN h2 then http/1.1 (what the API
/// server offers, so clients negotiate the same protocol they would with it).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The serving side with a certificate that changes (trust mode `injected-ca`): each
/// handshake asks `resolver` for the certificate of the moment.
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The upstream side: trust only the cluster CA.
pub fn upstream_config(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca.to_owned(),
            source,
        })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The serving certificate of trust mode `cluster-ca`, read from its files and read
/// again when they change (a renewed Secret, swapped in by kubelet), so a renewal needs
/// no restart. A pair that cannot be used (unreadable, the key not the certificate's)
/// is refused and the previous one stays in service. Connections already open keep
/// the certificate they were made with.
pub struct FileCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl std::fmt::Debug for FileCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    rustls::sign::CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(TlsError::Config)
}

/// When a file last changed (following symlinks: a Secret volume's swap of `..data`
/// shows as a new modification time).
fn modified(path: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl FileCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<FileCert>, TlsError> {
        Ok(Arc::new(FileCert {
            current: std::sync::RwLock::new(load_pair(cert, key)?),
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
        }))
    }

    /// Reads the files again and serves them from the next handshake on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = load_pair(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
        Ok(())
    }

    /// The end-entity certificate served now (DER).
    pub fn served(&self) -> Vec<u8> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// Checks the files' modification times every `period` and reloads on a change.
    pub async fn follow(self: Arc<Self>, period: std::time::Duration) {
        let stamp = |this: &FileCert| (modified(&this.cert_path), modified(&this.key_path));
        let mut last = stamp(&self);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = stamp(&self);
            if now == last {
                continue;
            }
            last = now;
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded")
                }
                // A cert and key written one after the other can be seen half-way: the
                // next change (the second file) brings the pair together.
                Err(err) => {
                    tracing::warn!(%err, "new serving certificate refused; the previous one stays in service")
                }
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for FileCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::ca;

    fn write_pair(dir: &Path, ca: &ca::CaPair) {
        let leaf = ca::issue_leaf(
            ca,
            &["kubernetes.default.svc".into()],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        fs::write(dir.join("tls.crt"), leaf.cert_pem).unwrap();
        fs::write(dir.join("tls.key"), leaf.key_pem).unwrap();
    }

    #[test]
    fn a_renewed_pair_is_served_and_a_mismatched_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("tollgate-filecert-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ca = ca::generate_ca(std::time::Duration::from_secs(86_400)).unwrap();
        write_pair(&dir, &ca);
        let cert = FileCert::load(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
        let first = cert.served();

        write_pair(&dir, &ca);
        cert.reload().unwrap();
        let second = cert.served();
        assert_ne!(first, second, "the renewed certificate is served");

        // A key that is not the certificate's: refused, the last good pair stays.
        let other = ca::issue_leaf(
            &ca,
            &["x.example".into()],
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        fs::write(dir.join("tls.key"), other.key_pem).unwrap();
        assert!(matches!(cert.reload(), Err(TlsError::Config(_))));
        assert_eq!(cert.served(), second);
        fs::remove_dir_all(&dir).unwrap();
    }
}
