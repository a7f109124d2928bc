//! OIDC ID tokens for the REST API: a reviewer's JWT from the configured issuer,
//! checked against the issuer's published keys (JWKS), the way kube-apiserver's
//! `--oidc-*` flags do it.
//!
//! The keys come from a file (`--oidc-jwks-file`) or from the issuer's discovery
//! document (`<issuer>/.well-known/openid-configuration` → `jwks_uri`). They are loaded
//! at start and again when a token names a key id that is not known (the issuer
//! rotated its keys), at most once per [`REFRESH_INTERVAL`], so a stream of tokens with
//! made-up key ids cannot make the agent hammer the issuer.
//!
//! Only asymmetric algorithms are accepted and only RSA and EC keys are used: a token
//! that says `HS256` (or `none`) is refused before any key is looked at, which closes the
//! classic trick of signing with the public key as an HMAC secret.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tracing::{debug, warn};

/// The least time between two key refreshes caused by unknown key ids.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// How long fetching the discovery document or the keys may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Discovery documents and key sets are small; anything larger is refused.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

/// The algorithms a token may be signed with.
const ACCEPTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Where the issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A JWKS file (`{"keys": [...]}`), re-read on refresh.
    File(PathBuf),
    /// The issuer's discovery document, over HTTPS; `ca_file` replaces the system's
    /// trust roots when set.
    Discovery {
        /// CA bundle (PEM) for the issuer's HTTPS certificate.
        ca_file: Option<PathBuf>,
    },
}

/// What kube-apiserver's `--oidc-*` flags configure.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Must equal the token's `iss` exactly.
    pub issuer: String,
    /// Must be one of the token's `aud`.
    pub audience: String,
    /// Where the issuer's keys come from.
    pub keys: KeySource,
    /// The claim naming the user (`sub` by default).
    pub username_claim: String,
    /// The claim listing the user's groups (`groups` by default; absent means none).
    pub groups_claim: String,
    /// Put before the username. `None` means kube-apiserver's default: `<issuer>#` for
    /// every claim but `email`, so an issuer's `sub` can never collide with a
    /// Kubernetes user; `Some("-")` means no prefix.
    pub username_prefix: Option<String>,
    /// Put before every group.
    pub groups_prefix: String,
}

/// Who a valid token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcUser {
    /// The prefixed user name.
    pub username: String,
    /// The prefixed groups, `system:` ones dropped.
    pub groups: Vec<String>,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The token is not acceptable; the message says why (it is shown to the caller).
    #[error("{0}")]
    Rejected(String),
    /// The issuer's keys cannot be had; not the caller's fault.
    #[error("the OIDC issuer's keys are not available: {0}")]
    Keys(String),
}

/// Validates ID tokens of one issuer.
pub struct OidcVerifier {
    config: OidcConfig,
    keys: RwLock<Arc<Vec<Jwk>>>,
    /// Serialises refreshes and remembers the last one.
    refresh: tokio::sync::Mutex<LastRefresh>,
    refresh_interval: Duration,
}

impl OidcVerifier {
    /// Loads the keys once. A failure is logged, not fatal: an issuer that is down when
    /// the agent starts should not keep reviewers with Kubernetes tokens out, and the
    /// keys are fetched again when an OIDC token arrives.
    pub async fn new(config: OidcConfig) -> OidcVerifier {
        let verifier = OidcVerifier {
            config,
            keys: RwLock::new(Arc::new(Vec::new())),
            refresh: tokio::sync::Mutex::new(LastRefresh::default()),
            refresh_interval: REFRESH_INTERVAL,
        };
        if let Err(err) = verifier.refresh_keys(true).await {
            warn!(issuer = %verifier.config.issuer, %err, "OIDC keys not loaded yet");
        }
        verifier
    }

    /// Another least time between refreshes (tests use zero).
    pub fn with_refresh_interval(mut self, interval: Duration) -> OidcVerifier {
        self.refresh_interval = interval;
        self
    }

    /// The issuer this verifier accepts.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Whether `token` is a JWT that claims to come from this issuer. Nothing is
    /// verified here; it only decides which authenticator gets the token.
    pub fn claims_to_be_ours(&self, token: &str) -> bool {
        #[derive(serde::Deserialize)]
        struct Peek {
            #[serde(default)]
            iss: Option<String>,
        }
        matches!(
            jsonwebtoken::dangerous::insecure_decode_claims::<Peek>(token),
            Ok(Peek { iss: Some(iss) }) if iss == self.config.issuer
        )
    }

    /// Verifies signature, issuer, audience, expiry and not-before, then maps the claims
    /// to a user.
    pub async fn verify(&self, token: &str) -> Result<OidcUser, OidcError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|err| OidcError::Rejected(format!("malformed token: {err}")))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(OidcError::Rejected(format!(
                "tokens signed with {:?} are not accepted",
                header.alg
            )));
        }
        let key = match self.find_key(header.kid.as_deref(), header.alg) {
            Some(key) => key,
            None => {
                // Perhaps the issuer rotated its keys since we last looked.
                self.refresh_keys(false).await?;
                self.find_key(header.kid.as_deref(), header.alg)
                    .ok_or_else(|| {
                        OidcError::Rejected(match &header.kid {
                            Some(kid) => format!("the issuer has no key {kid:?} for {:?}", header.alg),
                            None => format!(
                                "the token names no key id and the issuer has no single key for {:?}",
                                header.alg
                            ),
                        })
                    })?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|err| OidcError::Rejected(describe(&err)))?;
        self.user(&data.claims)
    }

    /// The user the verified claims name, with the configured prefixes.
    fn user(&self, claims: &Map<String, Value>) -> Result<OidcUser, OidcError> {
        let claim = &self.config.username_claim;
        let name = match claims.get(claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(OidcError::Rejected(format!(
                    "the token has no string claim {claim:?} to name the user"
                )))
            }
        };
        // kube-apiserver trusts an email only when the issuer says it was verified.
        if claim == "email" && claims.get("email_verified") == Some(&Value::Bool(false)) {
            return Err(OidcError::Rejected(
                "the token's email is not verified".to_owned(),
            ));
        }
        let prefix = match self.config.username_prefix.as_deref() {
            Some("-") => String::new(),
            Some(prefix) => prefix.to_owned(),
            None if claim == "email" => String::new(),
            None => format!("{}#", self.config.issuer),
        };
        let username = format!("{prefix}{name}");
        // `system:` names belong to Kubernetes itself (service accounts, nodes); an
        // issuer must not be able to mint them.
        if username.starts_with("system:") {
            return Err(OidcError::Rejected(format!(
                "the user name {username:?} is reserved for Kubernetes"
            )));
        }
        let raw_groups: Vec<String> = match claims.get(&self.config.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(g)) => vec![g.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Some(_) => {
                return Err(OidcError::Rejected(format!(
                    "the claim {:?} is neither a string nor a list of strings",
                    self.config.groups_claim
                )))
            }
        };
        let mut groups = Vec::with_capacity(raw_groups.len());
        for group in raw_groups {
            let group = format!("{}{group}", self.config.groups_prefix);
            // A `system:masters` group from an identity provider would make every
            // SubjectAccessReview say yes; such groups are never taken from a token.
            if group.starts_with("system:") {
                warn!(%username, %group, "dropping a reserved group from an OIDC token");
                continue;
            }
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        Ok(OidcUser { username, groups })
    }

    /// The key for `kid` usable with `alg`; without a kid, the only such key.
    fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut usable = keys.iter().filter(|jwk| usable_with(jwk, alg));
        let jwk = match kid {
            Some(kid) => usable.find(|jwk| jwk.common.key_id.as_deref() == Some(kid))?,
            None => {
                let first = usable.next()?;
                if usable.next().is_some() {
                    return None;
                }
                first
            }
        };
        DecodingKey::from_jwk(jwk)
            .map_err(|err| debug!(%err, "unusable key in the issuer's key set"))
            .ok()
    }

    /// Loads the keys again, unless that happened less than the refresh interval ago
    /// (`force` skips that check, for start-up).
    async fn refresh_keys(&self, force: bool) -> Result<(), OidcError> {
        let mut last = self.refresh.lock().await;
        if !force
            && last
                .at
                .is_some_and(|at| at.elapsed() < self.refresh_interval)
        {
            // Too soon to ask again; if the last attempt failed, say so rather than
            // blame the token.
            return match &last.error {
                Some(err) => Err(OidcError::Keys(err.clone())),
                None => Ok(()),
            };
        }
        last.at = Some(Instant::now());
        let loaded = match &self.config.keys {
            KeySource::File(path) => match tokio::fs::read(path).await {
                Ok(text) => parse_jwks(&text),
                Err(err) => Err(OidcError::Keys(format!(
                    "reading {}: {err}",
                    path.display()
                ))),
            },
            KeySource::Discovery { ca_file } => {
                match tokio::time::timeout(FETCH_TIMEOUT, discover(&self.config.issuer, ca_file))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(OidcError::Keys(format!(
                        "no answer within {FETCH_TIMEOUT:?}"
                    ))),
                }
            }
        };
        match loaded {
            Ok(keys) => {
                debug!(issuer = %self.config.issuer, keys = keys.len(), "OIDC keys loaded");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                last.error = None;
                Ok(())
            }
            Err(err) => {
                // The keys we had stay in use: a failed refresh must not lock everyone out.
                last.error = Some(match &err {
                    OidcError::Keys(why) | OidcError::Rejected(why) => why.clone(),
                });
                Err(err)
            }
        }
    }
}

/// When keys were last loaded, and why that failed if it did.
#[derive(Default)]
struct LastRefresh {
    at: Option<Instant>,
    error: Option<String>,
}

/// Whether `jwk` may verify a token signed with `alg`: RSA keys for RS*/PS*, EC keys on
/// the matching curve for ES*, never a symmetric key; a key's own `alg` and `use`, when
/// present, must agree.
fn usable_with(jwk: &Jwk, alg: Algorithm) -> bool {
    let type_fits = match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        _ => false,
    };
    let alg_fits = match &jwk.common.key_algorithm {
        None => true,
        Some(key_alg) => key_algorithm_name(key_alg) == Some(alg),
    };
    let use_fits = !matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
    );
    type_fits && alg_fits && use_fits
}

fn key_algorithm_name(alg: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

/// A person-readable reason for a failed validation.
fn describe(err: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
        ErrorKind::ImmatureSignature => "the token is not valid yet".to_owned(),
        ErrorKind::InvalidIssuer => "the token's issuer is not the configured one".to_owned(),
        ErrorKind::InvalidAudience => "the token is not meant for this audience".to_owned(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim:?} claim"),
        _ => format!("the token is not valid: {err}"),
    }
}

/// Parses a JWKS document, keeping every key that parses; a key of a type this
/// library does not know does not spoil the others.
pub fn parse_jwks(bytes: &[u8]) -> Result<Vec<Jwk>, OidcError> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(bytes)
        .map_err(|err| OidcError::Keys(format!("not a JWKS document: {err}")))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for key in set.keys {
        match serde_json::from_value::<Jwk>(key) {
            Ok(jwk) => keys.push(jwk),
            Err(err) => debug!(%err, "skipping a key of the issuer's key set"),
        }
    }
    Ok(keys)
}

/// Reads `<issuer>/.well-known/openid-configuration`, checks that it names the same
/// issuer (OpenID Connect Discovery §4.3), and fetches its `jwks_uri`.
async fn discover(issuer: &str, ca_file: &Option<PathBuf>) -> Result<Vec<Jwk>, OidcError> {
    #[derive(serde::Deserialize)]
    struct Discovery {
        issuer: String,
        jwks_uri: String,
    }
    let client = https_client(ca_file)?;
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let body = get(&client, &url).await?;
    let discovery: Discovery = serde_json::from_slice(&body)
        .map_err(|err| OidcError::Keys(format!("{url}: not a discovery document: {err}")))?;
    if discovery.issuer != issuer {
        return Err(OidcError::Keys(format!(
            "{url} names issuer {:?}, not {issuer:?}",
            discovery.issuer
        )));
    }
    if !discovery.jwks_uri.starts_with("https://") {
        return Err(OidcError::Keys(format!(
            "the issuer's jwks_uri {:?} is not https",
            discovery.jwks_uri
        )));
    }
    let body = get(&client, &discovery.jwks_uri).await?;
    parse_jwks(&body)
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

fn https_client(ca_file: &Option<PathBuf>) -> Result<HttpsClient, OidcError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = crate::proxy::tls::load_certs(path)
                .map_err(|err| OidcError::Keys(err.to_string()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|err| OidcError::Keys(format!("{}: {err}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system bundle often has a few certificates rustls cannot use; the
                // rest still serve.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(OidcError::Keys(
                    "no system trust roots; pass --oidc-ca-file".to_owned(),
                ));
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| OidcError::Keys(err.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

async fn get(client: &HttpsClient, url: &str) -> Result<Bytes, OidcError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|err| OidcError::Keys(format!("{url}: {err}")))?;
    let response = client
        .get(uri)
        .await
        .map_err(|err| OidcError::Keys(format!("{url}: {err}")))?;
    if !response.status().is_success() {
        return Err(OidcError::Keys(format!(
            "{url}: HTTP {}",
            response.status()
        )));
    }
    let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map_err(|err| OidcError::Keys(format!("{url}: {err}")))?;
    Ok(body.to_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    pub const ISSUER: &str = "https://issuer.test";
    pub const AUDIENCE: &str = "tollgate";

    /// URL-safe base64 without padding (JWK coordinates).
    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    /// An ES256 signing key and its JWK.
    pub struct TestKey {
        pub kid: String,
        encoding: EncodingKey,
        pub jwk: Value,
    }

    impl TestKey {
        pub fn generate(kid: &str) -> TestKey {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let point = key.public_key_raw();
            assert_eq!(point.len(), 65, "uncompressed P-256 point");
            TestKey {
                kid: kid.to_owned(),
                encoding: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
                jwk: json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": b64url(&point[1..33]), "y": b64url(&point[33..]),
                }),
            }
        }

        pub fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
        }
    }

    pub fn jwks(keys: &[&TestKey]) -> String {
        json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
    }

    pub fn claims(sub: &str, groups: &[&str]) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "groups": groups,
            "iat": now, "exp": now + 600,
        })
    }

    static FILES: AtomicUsize = AtomicUsize::new(0);

    /// A file of its own under the system's temporary directory.
    pub fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-api-{}-{}",
            std::process::id(),
            FILES.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn config(keys: KeySource) -> OidcConfig {
        OidcConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            keys,
            username_claim: "sub".into(),
            groups_claim: "groups".into(),
            username_prefix: None,
            groups_prefix: "oidc:".into(),
        }
    }

    pub async fn verifier(keys: &[&TestKey]) -> OidcVerifier {
        let file = temp_file("jwks.json", &jwks(keys));
        OidcVerifier::new(config(KeySource::File(file))).await
    }

    fn rejected(result: Result<OidcUser, OidcError>) -> String {
        match result {
            Err(OidcError::Rejected(why)) => why,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_valid_token_names_the_user_and_groups_with_prefixes() {
        let key = TestKey::generate("k1");
        let v = verifier(&[&key]).await;
        let token = key.sign(&claims("alice", &["dev", "ops", "dev"]));
        assert!(v.claims_to_be_ours(&token));
        let user = v.verify(&token).await.unwrap();
        assert_eq!(user.username, "https://issuer.test#alice");
        assert_eq!(user.groups, ["oidc:dev", "oidc:ops"]);
    }

    #[tokio::test]
    async fn other_issuers_are_not_ours_and_fail_verification() {
        let key = TestKey::generate("k1");
        let v = verifier(&[&key]).await;
        let mut c = claims("alice", &[]);
        c["iss"] = json!("https://elsewhere.test");
        let token = key.sign(&c);
        assert!(!v.claims_to_be_ours(&token));
        assert!(rejected(v.verify(&token).await).contains("issuer"));
        // Not JWTs at all.
        assert!(!v.claims_to_be_ours("opaque-token"));
        assert!(!v.claims_to_be_ours("a.b.c"));
    }

    #[tokio::test]
    async fn wrong_audience_expired_and_future_tokens_are_refused() {
        let key = TestKey::generate("k1");
        let v = verifier(&[&key]).await;
        let mut c = claims("alice", &[]);
        c["aud"] = json!(["someone-else"]);
        assert!(rejected(v.verify(&key.sign(&c)).await).contains("audience"));
        let mut c = claims("alice", &[]);
        c["exp"] = json!(jsonwebtoken::get_current_timestamp() - 3600);
        assert!(rejected(v.verify(&key.sign(&c)).await).contains("expired"));
        let mut c = claims("alice", &[]);
        c["nbf"] = json!(jsonwebtoken::get_current_timestamp() + 3600);
        assert!(rejected(v.verify(&key.sign(&c)).await).contains("not valid yet"));
        let mut c = claims("alice", &[]);
        c.as_object_mut().unwrap().remove("exp");
        assert!(rejected(v.verify(&key.sign(&c)).await).contains("exp"));
    }

    #[tokio::test]
    async fn a_bad_signature_is_refused() {
        let key = TestKey::generate("k1");
        // Same key id, another key: what a forger would try.
        let forger = TestKey::generate("k1");
        let v = verifier(&[&key]).await;
        let token = forger.sign(&claims("alice", &[]));
        assert!(rejected(v.verify(&token).await).contains("signature"));
        // A token whose payload was changed after signing.
        let good = key.sign(&claims("alice", &[]));
        let parts: Vec<&str> = good.split('.').collect();
        let evil = key.sign(&claims("mallory", &[]));
        let evil_payload = evil.split('.').nth(1).unwrap();
        let spliced = format!("{}.{}.{}", parts[0], evil_payload, parts[2]);
        assert!(rejected(v.verify(&spliced).await).contains("signature"));
    }

    #[tokio::test]
    async fn symmetric_and_unknown_algorithms_are_refused() {
        let key = TestKey::generate("k1");
        let v = verifier(&[&key]).await;
        // HS256 "signed" with the public JWK as the secret: the classic confusion.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let secret = key.jwk.to_string();
        let token = jsonwebtoken::encode(
            &header,
            &claims("alice", &[]),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert!(rejected(v.verify(&token).await).contains("not accepted"));
        // alg "none" does not even parse as a header.
        let none = format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(claims("alice", &[]).to_string().as_bytes())
        );
        assert!(rejected(v.verify(&none).await).contains("malformed"));
    }

    #[tokio::test]
    async fn rotated_keys_are_picked_up_from_the_file() {
        let old = TestKey::generate("k1");
        let new = TestKey::generate("k2");
        let file = temp_file("jwks.json", &jwks(&[&old]));
        let v = OidcVerifier::new(config(KeySource::File(file.clone())))
            .await
            .with_refresh_interval(Duration::ZERO);
        let token = new.sign(&claims("alice", &[]));
        assert!(rejected(v.verify(&token).await).contains("no key \"k2\""));
        // An unreadable file keeps the keys there were.
        std::fs::write(&file, "{").unwrap();
        assert!(v.verify(&old.sign(&claims("bob", &[]))).await.is_ok());
        std::fs::write(&file, jwks(&[&old, &new])).unwrap();
        assert_eq!(
            v.verify(&token).await.unwrap().username,
            "https://issuer.test#alice"
        );
    }

    #[tokio::test]
    async fn unknown_key_ids_do_not_reload_more_than_once_per_interval() {
        let old = TestKey::generate("k1");
        let new = TestKey::generate("k2");
        let file = temp_file("jwks.json", &jwks(&[&old]));
        // The start-up load counts as the last refresh.
        let v = OidcVerifier::new(config(KeySource::File(file.clone()))).await;
        std::fs::write(&file, jwks(&[&old, &new])).unwrap();
        let token = new.sign(&claims("alice", &[]));
        assert!(v.verify(&token).await.is_err());
    }

    #[tokio::test]
    async fn reserved_names_and_groups_are_not_taken_from_tokens() {
        let key = TestKey::generate("k1");
        let file = temp_file("jwks.json", &jwks(&[&key]));
        let mut cfg = config(KeySource::File(file));
        cfg.username_prefix = Some("-".into());
        cfg.groups_prefix = String::new();
        let v = OidcVerifier::new(cfg).await;
        let token = key.sign(&claims("system:serviceaccount:kube-system:admin", &[]));
        assert!(rejected(v.verify(&token).await).contains("reserved"));
        let token = key.sign(&claims("alice", &["system:masters", "dev"]));
        let user = v.verify(&token).await.unwrap();
        assert_eq!(user.username, "alice");
        assert_eq!(user.groups, ["dev"]);
    }

    #[tokio::test]
    async fn email_claims_need_verification_and_groups_may_be_one_string() {
        let key = TestKey::generate("k1");
        let file = temp_file("jwks.json", &jwks(&[&key]));
        let mut cfg = config(KeySource::File(file));
        cfg.username_claim = "email".into();
        cfg.groups_claim = "team".into();
        let v = OidcVerifier::new(cfg).await;
        let mut c = claims("x", &[]);
        c["email"] = json!("alice@example.test");
        c["team"] = json!("dev");
        let user = v.verify(&key.sign(&c)).await.unwrap();
        assert_eq!(user.username, "alice@example.test");
        assert_eq!(user.groups, ["oidc:dev"]);
        c["email_verified"] = json!(false);
        assert!(rejected(v.verify(&key.sign(&c)).await).contains("not verified"));
    }

    #[test]
    fn a_jwks_with_odd_keys_keeps_the_good_ones() {
        let key = TestKey::generate("k1");
        let text = json!({ "keys": [
            { "kty": "weird", "kid": "x" },
            { "kty": "oct", "k": "c2VjcmV0", "kid": "hmac" },
            key.jwk,
        ]})
        .to_string();
        let keys = parse_jwks(text.as_bytes()).unwrap();
        assert!(keys
            .iter()
            .any(|k| k.common.key_id.as_deref() == Some("k1")));
        // A symmetric key is never usable, whatever the token says.
        for k in &keys {
            if matches!(k.algorithm, AlgorithmParameters::OctetKey(_)) {
                assert!(ACCEPTED.iter().all(|alg| !usable_with(k, *alg)));
            }
        }
        assert!(parse_jwks(b"not json").is_err());
    }

    /// The issuer's discovery document and keys over HTTPS, from a server on loopback.
    #[tokio::test]
    async fn keys_are_discovered_over_https() {
        use http_body_util::Full;
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = format!("https://{addr}");
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let ca_file = temp_file("ca.crt", &cert.cert.pem());
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let key = TestKey::generate("k1");
        let documents = Arc::new((
            json!({ "issuer": issuer, "jwks_uri": format!("{issuer}/keys") }).to_string(),
            jwks(&[&key]),
        ));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let documents = documents.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |request: http::Request<_>| {
                        let documents = documents.clone();
                        async move {
                            let body = match request.uri().path() {
                                "/.well-known/openid-configuration" => documents.0.clone(),
                                "/keys" => documents.1.clone(),
                                _ => String::new(),
                            };
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let mut cfg = config(KeySource::Discovery {
            ca_file: Some(ca_file),
        });
        cfg.issuer = issuer.clone();
        let v = OidcVerifier::new(cfg).await;
        let mut c = claims("alice", &[]);
        c["iss"] = json!(issuer);
        let user = v.verify(&key.sign(&c)).await.unwrap();
        assert_eq!(user.username, format!("{issuer}#alice"));

        // Without the CA the issuer's certificate is not trusted, and nothing loads.
        let mut cfg = config(KeySource::Discovery { ca_file: None });
        cfg.issuer = issuer.clone();
        let v = OidcVerifier::new(cfg).await;
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Err(OidcError::Keys(_))
        ));
    }
}
