//! Tollgate's CA, kept in one Secret all agents share, and its rotation.
//!
//! The Secret's keys:
//! - `ca.crt`, `ca.key`: the CA that signs;
//! - `staged.crt`, `staged.key`, `staged.activates-at` (RFC 3339): its successor,
//!   published to pods at once and signing from that time on;
//! - `retired.crt`: predecessors, still trusted until they expire, because an agent
//!   that has not switched yet still serves from them.
//!
//! Every agent watches the Secret and works out from the clock alone which CA signs,
//! so all switch at the same moment without talking to each other. The writes that
//! move the Secret along (create, stage, promote, prune) are compare-and-set on the
//! resourceVersion: when two agents race, one wins and the other reads the result.
//! The CA is never lost: if the Secret is deleted, the agent that notices writes back
//! what it holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::Api;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{info, warn};

use super::ca::{self, CaPair, Lifetimes};
use super::TrustMaterial;

const ACTIVE_CERT: &str = "ca.crt";
const ACTIVE_KEY: &str = "ca.key";
const STAGED_CERT: &str = "staged.crt";
const STAGED_KEY: &str = "staged.key";
const STAGED_AT: &str = "staged.activates-at";
const RETIRED: &str = "retired.crt";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: {message}")]
    Malformed {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("{0}")]
    Ca(#[from] ca::CaError),
    #[error("Secret {namespace}/{name} kept changing under us; try again")]
    Contended { namespace: String, name: String },
}

/// A successor CA and when it starts signing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub ca: CaPair,
    pub activates_at: OffsetDateTime,
}

/// What the Secret says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaState {
    pub active: CaPair,
    pub staged: Option<Staged>,
    /// PEM certificates of predecessors.
    pub retired: Vec<String>,
}

/// A change the Secret needs at some moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The staged CA's time has come: it becomes `ca.*`, the old one is retired.
    Promote,
    /// The signing CA nears its end and has no successor yet.
    Stage,
    /// Retired CAs past their end leave the bundle.
    PruneRetired,
}

fn split_pem(bundle: &str) -> Vec<String> {
    let mut certs = Vec::new();
    let mut current = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN ") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            certs.push(std::mem::take(&mut current));
        }
    }
    certs
}

impl CaState {
    /// A fresh CA and nothing else.
    pub fn generate(lifetimes: &Lifetimes) -> Result<CaState, ca::CaError> {
        Ok(CaState {
            active: ca::generate_ca(lifetimes.ca_validity)?,
            staged: None,
            retired: Vec::new(),
        })
    }

    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Result<CaState, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            data.get(key)
                .map(|v| String::from_utf8(v.0.clone()).map_err(|_| format!("{key} is not text")))
                .transpose()
        };
        let need =
            |key: &str| -> Result<String, String> { text(key)?.ok_or_else(|| format!("no {key}")) };
        let active = CaPair {
            cert_pem: need(ACTIVE_CERT)?,
            key_pem: need(ACTIVE_KEY)?,
        };
        ca::not_after(&active.cert_pem).map_err(|e| format!("{ACTIVE_CERT}: {e}"))?;
        let staged = match (text(STAGED_CERT)?, text(STAGED_KEY)?, text(STAGED_AT)?) {
            (Some(cert_pem), Some(key_pem), Some(at)) => {
                ca::not_after(&cert_pem).map_err(|e| format!("{STAGED_CERT}: {e}"))?;
                Some(Staged {
                    ca: CaPair { cert_pem, key_pem },
                    activates_at: OffsetDateTime::parse(at.trim(), &Rfc3339)
                        .map_err(|e| format!("{STAGED_AT} {at:?}: {e}"))?,
                })
            }
            (None, None, None) => None,
            _ => {
                return Err(format!(
                    "{STAGED_CERT}, {STAGED_KEY} and {STAGED_AT} go together"
                ))
            }
        };
        let retired = text(RETIRED)?.map(|b| split_pem(&b)).unwrap_or_default();
        Ok(CaState {
            active,
            staged,
            retired,
        })
    }

    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
        };
        put(ACTIVE_CERT, &self.active.cert_pem);
        put(ACTIVE_KEY, &self.active.key_pem);
        if let Some(staged) = &self.staged {
            put(STAGED_CERT, &staged.ca.cert_pem);
            put(STAGED_KEY, &staged.ca.key_pem);
            let at = staged
                .activates_at
                .format(&Rfc3339)
                .unwrap_or_else(|_| staged.activates_at.unix_timestamp().to_string());
            put(STAGED_AT, &at);
        }
        if !self.retired.is_empty() {
            put(RETIRED, &self.retired.concat());
        }
        data
    }

    /// Which CA signs at `now`, and what clients must trust.
    pub fn material(&self, now: OffsetDateTime) -> TrustMaterial {
        let signing = match &self.staged {
            Some(staged) if now >= staged.activates_at => staged.ca.clone(),
            _ => self.active.clone(),
        };
        let mut trusted: Vec<&str> = vec![&self.active.cert_pem];
        if let Some(staged) = &self.staged {
            trusted.push(&staged.ca.cert_pem);
        }
        for cert in &self.retired {
            if ca::not_after(cert).is_ok_and(|end| end > now) {
                trusted.push(cert);
            }
        }
        // One order whatever the roles, oldest end first: promotion then changes
        // nothing a client sees, and no bundle is rewritten for it.
        trusted.sort_by_key(|cert| (ca::not_after(cert).ok(), cert.trim()));
        trusted.dedup_by_key(|cert| cert.trim());
        let mut bundle = String::new();
        for cert in trusted {
            bundle.push_str(cert.trim_end());
            bundle.push('\n');
        }
        TrustMaterial {
            signing,
            tollgate_bundle_pem: bundle,
        }
    }

    /// The change due at `now`, if any (at most one; call again after applying it).
    pub fn due(&self, now: OffsetDateTime, lifetimes: &Lifetimes) -> Option<Step> {
        if self.staged.as_ref().is_some_and(|s| now >= s.activates_at) {
            return Some(Step::Promote);
        }
        let active_end = ca::not_after(&self.active.cert_pem).ok()?;
        if self.staged.is_none() && now + to_time(lifetimes.rotate_before) >= active_end {
            return Some(Step::Stage);
        }
        if self
            .retired
            .iter()
            .any(|c| ca::not_after(c).map_or(true, |end| end <= now))
        {
            return Some(Step::PruneRetired);
        }
        None
    }

    /// When [`CaState::due`] next has something to say.
    pub fn next_deadline(&self, lifetimes: &Lifetimes) -> Option<OffsetDateTime> {
        let mut times = Vec::new();
        if let Some(staged) = &self.staged {
            times.push(staged.activates_at);
        } else if let Ok(end) = ca::not_after(&self.active.cert_pem) {
            times.push(end - to_time(lifetimes.rotate_before));
        }
        times.extend(self.retired.iter().filter_map(|c| ca::not_after(c).ok()));
        times.into_iter().min()
    }

    /// The state after `step`.
    pub fn apply(
        &self,
        step: &Step,
        now: OffsetDateTime,
        lifetimes: &Lifetimes,
    ) -> Result<CaState, ca::CaError> {
        let mut next = self.clone();
        match step {
            Step::Promote => {
                if let Some(staged) = next.staged.take() {
                    next.retired
                        .push(std::mem::replace(&mut next.active, staged.ca).cert_pem);
                }
            }
            Step::Stage => next.stage(
                ca::generate_ca(lifetimes.ca_validity)?,
                now + to_time(lifetimes.propagation),
            ),
            Step::PruneRetired => next
                .retired
                .retain(|c| ca::not_after(c).is_ok_and(|end| end > now)),
        }
        Ok(next)
    }

    /// Stages `successor` to sign from `activates_at` (replacing a staged one that has
    /// not signed yet).
    pub fn stage(&mut self, successor: CaPair, activates_at: OffsetDateTime) {
        self.staged = Some(Staged {
            ca: successor,
            activates_at,
        });
    }
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::seconds(d.as_secs().min(i64::MAX as u64) as i64)
}

/// The Secret, by namespace and name.
#[derive(Clone)]
pub struct CaSecret {
    api: Api<Secret>,
    pub namespace: String,
    pub name: String,
}

impl CaSecret {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> CaSecret {
        CaSecret {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn kube_error(&self, source: kube::Error) -> SecretError {
        SecretError::Kube {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    fn parse(&self, secret: &Secret) -> Result<CaState, SecretError> {
        let data = secret.data.clone().unwrap_or_default();
        CaState::from_data(&data).map_err(|message| SecretError::Malformed {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            message,
        })
    }

    /// The state and the resourceVersion it was read at; None when there is no Secret.
    pub async fn read(&self) -> Result<Option<(CaState, String)>, SecretError> {
        match self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.kube_error(e))?
        {
            Some(secret) => {
                let version = secret.metadata.resource_version.clone().unwrap_or_default();
                Ok(Some((self.parse(&secret)?, version)))
            }
            None => Ok(None),
        }
    }

    fn object(&self, state: &CaState, resource_version: Option<String>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version,
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "tollgate".to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(state.to_data()),
            ..Default::default()
        }
    }

    /// Reads the Secret, or creates it with `fresh()` when there is none. When another
    /// agent creates it first, theirs is used.
    pub async fn load_or_create(
        &self,
        fresh: impl FnOnce() -> Result<CaState, ca::CaError>,
    ) -> Result<CaState, SecretError> {
        if let Some((state, _)) = self.read().await? {
            return Ok(state);
        }
        let state = fresh()?;
        match self
            .api
            .create(&PostParams::default(), &self.object(&state, None))
            .await
        {
            Ok(_) => {
                info!(secret = %format!("{}/{}", self.namespace, self.name), "generated Tollgate's CA");
                Ok(state)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => match self.read().await? {
                Some((state, _)) => Ok(state),
                None => Err(SecretError::Contended {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                }),
            },
            Err(e) => Err(self.kube_error(e)),
        }
    }

    /// Applies `change` to the current state and writes it if it changed anything,
    /// compare-and-set; retried a few times on conflict. Returns the state written (or
    /// found unchanged). A missing Secret is created from `fallback`.
    pub async fn update(
        &self,
        fallback: Option<&CaState>,
        mut change: impl FnMut(&CaState) -> Result<Option<CaState>, ca::CaError>,
    ) -> Result<CaState, SecretError> {
        for _ in 0..5 {
            let (current, version) = match self.read().await? {
                Some((state, version)) => (state, Some(version)),
                None => match fallback {
                    Some(state) => (state.clone(), None),
                    None => {
                        return Err(SecretError::Malformed {
                            namespace: self.namespace.clone(),
                            name: self.name.clone(),
                            message: "does not exist".into(),
                        })
                    }
                },
            };
            let Some(next) = change(&current)? else {
                if version.is_none() {
                    // Deleted: write back what we hold, unchanged.
                    if self.write(&current, None).await? {
                        return Ok(current);
                    }
                    continue;
                }
                return Ok(current);
            };
            if self.write(&next, version).await? {
                return Ok(next);
            }
        }
        Err(SecretError::Contended {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        })
    }

    /// Ok(false) when someone else wrote first.
    async fn write(&self, state: &CaState, version: Option<String>) -> Result<bool, SecretError> {
        let result = match &version {
            Some(_) => {
                self.api
                    .replace(
                        &self.name,
                        &PostParams::default(),
                        &self.object(state, version),
                    )
                    .await
            }
            None => {
                self.api
                    .create(&PostParams::default(), &self.object(state, None))
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(self.kube_error(e)),
        }
    }
}

/// Loads (or creates) the CA, then keeps the trust material current: from the Secret's
/// changes (watched) and the clock (staging, promotion, pruning when due).
pub async fn start(
    secret: CaSecret,
    lifetimes: Lifetimes,
) -> Result<(super::TrustWatch, tokio::task::JoinHandle<()>), SecretError> {
    let state = secret
        .load_or_create(|| CaState::generate(&lifetimes))
        .await?;
    let (tx, rx) = watch::channel(Arc::new(state.material(OffsetDateTime::now_utc())));
    let task = tokio::spawn(keep(secret, lifetimes, state, tx));
    Ok((rx, task))
}

async fn keep(
    secret: CaSecret,
    lifetimes: Lifetimes,
    mut state: CaState,
    tx: watch::Sender<Arc<TrustMaterial>>,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", secret.name));
    let mut events = watcher::watcher(secret.api.clone(), config).boxed();
    loop {
        let now = OffsetDateTime::now_utc();
        let mut failed = false;
        // Changes due now: each agent tries; the compare-and-set lets one through.
        if let Some(step) = state.due(now, &lifetimes) {
            let result = secret
                .update(Some(&state), |current| match current.due(now, &lifetimes) {
                    Some(step) => current.apply(&step, now, &lifetimes).map(Some),
                    None => Ok(None),
                })
                .await;
            match result {
                Ok(next) => {
                    if next != state {
                        info!(?step, "Tollgate CA: {}", describe(&step));
                    }
                    state = next;
                }
                Err(err) => {
                    failed = true;
                    warn!(%err, ?step, "Tollgate CA: could not update the Secret; retrying in 10s")
                }
            }
        }
        publish(&tx, &state, OffsetDateTime::now_utc());

        // Sleep until the next deadline, a change of the Secret, or a minute (a retry
        // after an error, and a guard against a clock that jumped).
        let wait = state
            .next_deadline(&lifetimes)
            .map(|at| (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(60));
        // A step that failed is still due: without a pause the loop would retry at once,
        // for ever (RBAC refusing the update, the API server down).
        let wait = if failed {
            wait.max(Duration::from_secs(10))
        } else {
            wait
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj))) => {
                    match secret.parse(&obj) {
                        Ok(read) => state = read,
                        Err(err) => warn!(%err, "Tollgate CA: ignoring a Secret that cannot be read; keeping the CA in memory"),
                    }
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    warn!("Tollgate CA: the Secret was deleted; writing back the CA in memory");
                    if let Err(err) = secret.update(Some(&state), |_| Ok(None)).await {
                        warn!(%err, "Tollgate CA: could not recreate the Secret");
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    warn!(%err, "Tollgate CA: watching the Secret failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => {
                    warn!("Tollgate CA: the Secret watch ended; restarting it");
                    events = watcher::watcher(secret.api.clone(), watcher::Config::default().fields(&format!("metadata.name={}", secret.name))).boxed();
                }
            },
        }
    }
}

fn publish(tx: &watch::Sender<Arc<TrustMaterial>>, state: &CaState, now: OffsetDateTime) {
    let material = state.material(now);
    tx.send_if_modified(|current| {
        if **current == material {
            return false;
        }
        if current.signing != material.signing {
            info!("Tollgate CA: a new CA signs serving certificates from now on");
        }
        *current = Arc::new(material);
        true
    });
}

fn describe(step: &Step) -> &'static str {
    match step {
        Step::Promote => "the staged CA signs from now on; its predecessor is retired",
        Step::Stage => "a successor CA is staged and published to pods",
        Step::PruneRetired => "expired retired CAs removed from the bundle",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            ca_validity: 10 * DAY,
            rotate_before: 4 * DAY,
            propagation: 2 * DAY,
            serving_validity: DAY,
        }
    }

    fn count(bundle: &str) -> usize {
        bundle.matches("BEGIN CERTIFICATE").count()
    }

    #[test]
    fn the_secret_data_round_trips() {
        let l = lifetimes();
        let mut state = CaState::generate(&l).unwrap();
        let now = OffsetDateTime::now_utc();
        state.stage(
            ca::generate_ca(l.ca_validity).unwrap(),
            now + time::Duration::hours(1),
        );
        state
            .retired
            .push(ca::generate_ca(l.ca_validity).unwrap().cert_pem);
        let back = CaState::from_data(&state.to_data()).unwrap();
        assert_eq!(back.active, state.active);
        assert_eq!(back.retired, state.retired);
        assert_eq!(
            back.staged
                .as_ref()
                .map(|s| s.activates_at.unix_timestamp()),
            state
                .staged
                .as_ref()
                .map(|s| s.activates_at.unix_timestamp())
        );
    }

    #[test]
    fn half_a_staged_ca_is_refused() {
        let state = CaState::generate(&lifetimes()).unwrap();
        let mut data = state.to_data();
        data.insert(
            STAGED_CERT.into(),
            ByteString(state.active.cert_pem.into_bytes()),
        );
        assert!(CaState::from_data(&data)
            .unwrap_err()
            .contains("go together"));
        assert!(CaState::from_data(&BTreeMap::new())
            .unwrap_err()
            .contains("ca.crt"));
    }

    /// The whole life of a CA: nothing due while young; staged near its end and
    /// published at once while the old one still signs; the successor signs from its
    /// activation time; then promoted, the old one retired and trusted to its end.
    #[test]
    fn a_rotation_publishes_first_and_signs_later() {
        let l = lifetimes();
        let start = OffsetDateTime::now_utc();
        let state = CaState::generate(&l).unwrap();
        assert_eq!(state.due(start, &l), None);
        assert_eq!(count(&state.material(start).tollgate_bundle_pem), 1);

        let late = start + time::Duration::days(7);
        assert_eq!(state.due(late, &l), Some(Step::Stage));
        let staged = state.apply(&Step::Stage, late, &l).unwrap();
        let successor = staged.staged.clone().unwrap();
        assert_eq!(successor.activates_at, late + time::Duration::days(2));
        let m = staged.material(late);
        assert_eq!(m.signing, state.active, "the old CA still signs");
        assert_eq!(count(&m.tollgate_bundle_pem), 2, "both are trusted");
        assert_eq!(staged.due(late, &l), None);
        assert_eq!(staged.next_deadline(&l), Some(successor.activates_at));

        let after = successor.activates_at + time::Duration::seconds(1);
        assert_eq!(
            staged.material(after).signing,
            successor.ca,
            "by the clock alone"
        );
        assert_eq!(staged.due(after, &l), Some(Step::Promote));
        let promoted = staged.apply(&Step::Promote, after, &l).unwrap();
        assert_eq!(promoted.active, successor.ca);
        assert_eq!(promoted.retired, vec![state.active.cert_pem.clone()]);
        assert_eq!(
            promoted.material(after),
            staged.material(after),
            "promotion changes nothing a client sees"
        );

        // Past a retired CA's end it leaves the bundle. (The certificates here were
        // all made by the real clock, so a short-lived one stands for the old CA.)
        let mut promoted = promoted;
        promoted.retired = vec![ca::generate_ca(DAY).unwrap().cert_pem];
        let gone = start + time::Duration::days(2);
        assert_eq!(count(&promoted.material(start).tollgate_bundle_pem), 2);
        assert_eq!(promoted.due(gone, &l), Some(Step::PruneRetired));
        let pruned = promoted.apply(&Step::PruneRetired, gone, &l).unwrap();
        assert!(pruned.retired.is_empty());
        assert_eq!(count(&pruned.material(gone).tollgate_bundle_pem), 1);
    }
}
