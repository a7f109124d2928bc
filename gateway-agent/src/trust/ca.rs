//! Tollgate's own CA and the certificates it signs (ECDSA P-256, rcgen). Pure
//! functions: where the CA is kept is [`super::secret`]'s business.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA certificate cannot be read: {0}")]
    BadCert(rcgen::Error),
    #[error("the CA key cannot be read: {0}")]
    BadKey(rcgen::Error),
    #[error("{0:?} is neither a DNS name nor an IP address")]
    BadName(String),
}

/// A CA certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaPair {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPair")
            .field("not_after", &not_after(&self.cert_pem).ok())
            .finish_non_exhaustive()
    }
}

/// How long things live, and when rotation starts (`run --ca-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca_validity: Duration,
    /// A successor is staged when the signing CA has less than this left.
    pub rotate_before: Duration,
    /// A staged CA signs this long after it was staged.
    pub propagation: Duration,
    pub serving_validity: Duration,
}

impl Lifetimes {
    /// The order rotation needs: the successor is published, then signs, and only then
    /// does its predecessor expire.
    pub fn check(&self) -> Result<(), String> {
        if self.propagation >= self.rotate_before {
            return Err(format!(
                "--ca-propagation ({}s) must be shorter than --ca-rotate-before ({}s): the \
                 successor must sign before its predecessor expires",
                self.propagation.as_secs(),
                self.rotate_before.as_secs()
            ));
        }
        if self.rotate_before >= self.ca_validity {
            return Err(format!(
                "--ca-rotate-before ({}s) must be shorter than --ca-validity ({}s)",
                self.rotate_before.as_secs(),
                self.ca_validity.as_secs()
            ));
        }
        if self.serving_validity.is_zero() || self.serving_validity > self.ca_validity {
            return Err("--serving-cert-validity must be positive and within --ca-validity".into());
        }
        Ok(())
    }
}

/// A few minutes of backdating tolerate clock skew between the nodes.
const BACKDATE: time::Duration = time::Duration::minutes(5);

fn to_time(d: Duration) -> time::Duration {
    time::Duration::seconds(d.as_secs().min(i64::MAX as u64) as i64)
}

/// A new self-signed CA, valid from now for `validity`.
pub fn generate_ca(validity: Duration) -> Result<CaPair, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    // The date in the name tells two generations apart in `openssl x509 -subject`.
    name.push(
        DnType::CommonName,
        format!("Tollgate CA {}", now.unix_timestamp()),
    );
    name.push(DnType::OrganizationName, "tollgate");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + to_time(validity);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CaPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// When a PEM certificate expires.
pub fn not_after(cert_pem: &str) -> Result<OffsetDateTime, CaError> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or(CaError::BadCert(rcgen::Error::CouldNotParseCertificate))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| CaError::BadCert(rcgen::Error::CouldNotParseCertificate))?;
    Ok(cert.validity().not_after.to_datetime())
}

/// Letters, digits, `-` and `.` in labels of at most 63 (a leading `*.` for a
/// wildcard): what a client can match a host name against.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A server certificate's parameters for `sans` (DNS names and IP addresses), named
/// like the API server's: what both trust modes serve (`certs issue` signs it with the
/// cluster CA, [`issue_leaf`] with Tollgate's). Dates are the caller's.
pub fn api_server_params(sans: &[String]) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "kube-apiserver");
    name.push(DnType::OrganizationName, "tollgate");
    params.distinguished_name = name;
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_dns_name(san) => san
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| CaError::BadName(san.clone())),
            Err(_) => Err(CaError::BadName(san.clone())),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// A serving (leaf) certificate from `ca`.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// Issues a server certificate for `sans` (DNS names and IP addresses) from `ca`.
pub fn issue_leaf(ca: &CaPair, sans: &[String], validity: Duration) -> Result<Leaf, CaError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(CaError::BadKey)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca_key).map_err(CaError::BadCert)?;
    let ca_not_after = not_after(&ca.cert_pem)?;
    let now = OffsetDateTime::now_utc();
    let mut params = api_server_params(sans)?;
    params.not_before = now - BACKDATE;
    // Never outlive the issuer: a client would refuse the chain past its end anyway.
    params.not_after = (now + to_time(validity)).min(ca_not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: params.not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    fn verifies(leaf_pem: &str, roots_pem: &str, name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut roots_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap();
        let leaf = rustls_pemfile::certs(&mut leaf_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn a_leaf_verifies_against_its_ca_and_not_another() {
        let day = Duration::from_secs(86_400);
        let ca = generate_ca(30 * day).unwrap();
        let other = generate_ca(30 * day).unwrap();
        let sans = vec!["kubernetes.default.svc".to_owned(), "10.96.0.1".to_owned()];
        let leaf = issue_leaf(&ca, &sans, day).unwrap();
        assert!(verifies(
            &leaf.cert_pem,
            &ca.cert_pem,
            "kubernetes.default.svc"
        ));
        assert!(verifies(&leaf.cert_pem, &ca.cert_pem, "10.96.0.1"));
        assert!(!verifies(&leaf.cert_pem, &ca.cert_pem, "example.com"));
        assert!(!verifies(
            &leaf.cert_pem,
            &other.cert_pem,
            "kubernetes.default.svc"
        ));
        // A bundle of both trusts it: what a pod has during a rotation.
        let both = format!("{}{}", other.cert_pem, ca.cert_pem);
        assert!(verifies(&leaf.cert_pem, &both, "kubernetes.default.svc"));
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let ca = generate_ca(Duration::from_secs(3600)).unwrap();
        let leaf = issue_leaf(&ca, &["a.example".into()], Duration::from_secs(86_400)).unwrap();
        assert_eq!(leaf.not_after, not_after(&ca.cert_pem).unwrap());
    }

    #[test]
    fn lifetimes_must_be_ordered() {
        let day = Duration::from_secs(86_400);
        let good = Lifetimes {
            ca_validity: 365 * day,
            rotate_before: 90 * day,
            propagation: 30 * day,
            serving_validity: 7 * day,
        };
        assert!(good.check().is_ok());
        let bad = Lifetimes {
            propagation: 90 * day,
            ..good
        };
        assert!(bad.check().unwrap_err().contains("--ca-propagation"));
        let bad = Lifetimes {
            rotate_before: 365 * day,
            ..good
        };
        assert!(bad.check().unwrap_err().contains("--ca-rotate-before"));
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = generate_ca(Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            issue_leaf(&ca, &["not a name".into()], Duration::from_secs(60)),
            Err(CaError::BadName(_))
        ));
    }
}
