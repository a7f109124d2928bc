//! `gateway-agent certs issue`: the proxy's serving certificate, signed by the cluster CA.
//!
//! In-pod clients verify the API server's certificate against the cluster CA for the
//! name or address they dialled (`kubernetes.default.svc`, the ClusterIP, an endpoint
//! address). A connection steered to Tollgate must pass the same check, so the operator
//! issues a certificate with the API server's names from the cluster CA once, stores it
//! in a Secret, and the agent never holds the CA key.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{Issuer, KeyPair};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error(
        "{path}: the key is in SEC1 form (\"EC PRIVATE KEY\"); convert it with \
         `openssl pkcs8 -topk8 -nocrypt -in {path} -out ca-pkcs8.key` and pass that file"
    )]
    Sec1Key { path: PathBuf },
    #[error("{path}: the CA key cannot be used for signing: {source}")]
    BadKey { path: PathBuf, source: rcgen::Error },
    #[error("{path}: not a usable CA certificate: {source}")]
    BadCaCert { path: PathBuf, source: rcgen::Error },
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid DNS name {0:?} in --extra-san")]
    BadName(String),
    #[error("the certificate's parameters: {0}")]
    Params(String),
}

/// What to put in the serving certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Where `tls.crt` and `tls.key` (the Secret's layout) are written.
    pub out_dir: PathBuf,
    /// The `kubernetes` Service ClusterIP.
    pub cluster_ip: IpAddr,
    /// The cluster DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// Further names or addresses: the API server's endpoint addresses (pods that dial
    /// an endpoint directly verify against it), a load balancer name.
    pub extra_sans: Vec<String>,
    pub validity: Duration,
}

/// The files written, for the caller to report.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub sans: Vec<String>,
}

/// The names every in-cluster client may dial the API server by.
pub fn api_server_sans(request: &IssueRequest) -> Vec<String> {
    let mut sans = vec![
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        format!("kubernetes.default.svc.{}", request.cluster_domain),
        request.cluster_ip.to_string(),
    ];
    for extra in &request.extra_sans {
        if !sans.contains(extra) {
            sans.push(extra.clone());
        }
    }
    sans
}

pub fn issue(request: &IssueRequest) -> Result<Issued, CertsError> {
    let ca_cert_pem = read(&request.ca_cert)?;
    let ca_key = load_signing_key(&request.ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, &ca_key).map_err(|source| {
        CertsError::BadCaCert {
            path: request.ca_cert.clone(),
            source,
        }
    })?;

    let sans = api_server_sans(request);
    let mut params = crate::trust::ca::api_server_params(&sans).map_err(|err| match err {
        crate::trust::ca::CaError::BadName(name) => CertsError::BadName(name),
        other => CertsError::Params(other.to_string()),
    })?;
    let now = time::OffsetDateTime::now_utc();
    // A little backdating tolerates clock skew between the issuing machine and nodes.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(request.validity.as_secs() as i64);

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    verify_chain(&cert.pem(), &ca_cert_pem)?;

    fs::create_dir_all(&request.out_dir).map_err(|source| CertsError::Write {
        path: request.out_dir.clone(),
        source,
    })?;
    let cert_path = request.out_dir.join("tls.crt");
    let key_path = request.out_dir.join("tls.key");
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        sans,
    })
}

/// Checks that the new certificate verifies against the CA as a client would, so a
/// mismatched key/cert pair is caught here rather than by every pod at connect time.
fn verify_chain(cert_pem: &str, ca_pem: &str) -> Result<(), CertsError> {
    let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or(CertsError::KeyMismatch)?;
    let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or(CertsError::KeyMismatch)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).map_err(|_| CertsError::KeyMismatch)?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.into(),
        rustls::crypto::ring::default_provider().into(),
    )
    .build()
    .map_err(|_| CertsError::KeyMismatch)?;
    let name = rustls::pki_types::ServerName::try_from("kubernetes.default.svc")
        .map_err(|_| CertsError::KeyMismatch)?;
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(
            &cert_der,
            &[],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|_| CertsError::KeyMismatch)
}

/// Loads a CA key in PKCS#8 or PKCS#1 ("RSA PRIVATE KEY", what kubeadm writes).
fn load_signing_key(path: &Path) -> Result<KeyPair, CertsError> {
    let pem = read(path)?;
    let key = rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or_else(|| CertsError::NoKey {
            path: path.to_owned(),
        })?;
    let pkcs8 = match &key {
        rustls::pki_types::PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
        rustls::pki_types::PrivateKeyDer::Pkcs1(der) => rsa_pkcs1_to_pkcs8(der.secret_pkcs1_der()),
        rustls::pki_types::PrivateKeyDer::Sec1(_) => {
            return Err(CertsError::Sec1Key {
                path: path.to_owned(),
            })
        }
        _ => {
            return Err(CertsError::NoKey {
                path: path.to_owned(),
            })
        }
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|source| CertsError::BadKey {
        path: path.to_owned(),
        source,
    })
}

/// Wraps an RSA key in PKCS#8: `SEQUENCE { INTEGER 0, SEQUENCE { rsaEncryption, NULL },
/// OCTET STRING <pkcs1> }` (RFC 5208), the only form ring signs with.
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION_AND_ALGORITHM: &[u8] = &[
        0x02, 0x01, 0x00, // INTEGER 0
        0x30, 0x0d, // SEQUENCE (13 bytes)
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, // rsaEncryption
        0x05, 0x00, // NULL
    ];
    let mut octet_string = vec![0x04];
    octet_string.extend(der_length(pkcs1.len()));
    octet_string.extend_from_slice(pkcs1);
    let body_len = VERSION_AND_ALGORITHM.len() + octet_string.len();
    let mut out = vec![0x30];
    out.extend(der_length(body_len));
    out.extend_from_slice(VERSION_AND_ALGORITHM);
    out.extend(octet_string);
    out
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|&b| b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|source| CertsError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let status = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tollgate-certs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn request(dir: &Path, key: &str) -> IssueRequest {
        IssueRequest {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join(key),
            out_dir: dir.join("out"),
            cluster_ip: "10.96.0.1".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            extra_sans: vec!["10.77.0.10".into()],
            validity: Duration::from_secs(86400),
        }
    }

    /// A kubeadm-style CA (RSA, PKCS#1 key) and an openssl 3 one (PKCS#8) both work,
    /// and openssl itself verifies the result for every name a pod may dial.
    #[test]
    fn issues_a_certificate_openssl_verifies_for_every_api_server_name() {
        let dir = temp_dir("rsa");
        openssl(
            &dir,
            &["genrsa", "-traditional", "-out", "ca-pkcs1.key", "2048"],
        );
        openssl(
            &dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "ca-pkcs1.key",
                "-out",
                "ca.key",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=kubernetes",
                "-days",
                "1",
                "-out",
                "ca.crt",
            ],
        );
        for key in ["ca-pkcs1.key", "ca.key"] {
            let issued = issue(&request(&dir, key)).unwrap();
            assert!(issued
                .sans
                .contains(&"kubernetes.default.svc.cluster.local".to_owned()));
            for name in [
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ] {
                openssl(
                    &dir,
                    &[
                        "verify",
                        "-CAfile",
                        "ca.crt",
                        "-verify_hostname",
                        name,
                        "out/tls.crt",
                    ],
                );
            }
            for ip in ["10.96.0.1", "10.77.0.10"] {
                openssl(
                    &dir,
                    &[
                        "verify",
                        "-CAfile",
                        "ca.crt",
                        "-verify_ip",
                        ip,
                        "out/tls.crt",
                    ],
                );
            }
            let mode = fs::metadata(&issued.key).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let dir = temp_dir("mismatch");
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ca.key",
            ],
        );
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "other.key",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=kubernetes",
                "-days",
                "1",
                "-out",
                "ca.crt",
            ],
        );
        assert!(issue(&request(&dir, "ca.key")).is_ok());
        let err = issue(&request(&dir, "other.key")).unwrap_err();
        assert!(matches!(err, CertsError::KeyMismatch), "{err}");
        let err = issue(&request(&dir, "missing.key")).unwrap_err();
        assert!(err.to_string().contains("missing.key"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
