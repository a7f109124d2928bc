//! Where approvals live. Two stores behind one type:
//!
//! - [`embedded`]: a redb file on the node (default; single node, survives restarts).
//! - [`kubernetes`]: `ApprovalRequest` custom resources (`tollgate.dev/v1alpha1`), so
//!   every node's agent and every reviewer share one queue.
//!
//! Both give the same guarantees: `update` is read-modify-write with optimistic
//! concurrency (retried on conflict), so two agents or two reviewers can never both
//! move an approval out of `Pending`, and an approved call is claimed for execution
//! exactly once. `subscribe` sees every change, including other agents' (the
//! Kubernetes store feeds it from a watch).

pub mod embedded;
pub mod kubernetes;

use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::model::{self, ApprovalRequest, Mode, State};

/// Room in each store's change channel. A subscriber that falls this far behind gets
/// `RecvError::Lagged` and should re-read what it waits for.
pub(crate) const CHANGES_CAPACITY: usize = 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("approval {0} not found")]
    NotFound(String),
    #[error("approval {0} already exists")]
    Exists(String),
    /// The change the caller asked for was refused by its own closure.
    #[error("{0}")]
    Rejected(#[from] super::model::DecisionError),
    #[error("the store kept conflicting on {0}; try again")]
    Conflict(String),
    #[error("embedded store: {0}")]
    Embedded(String),
    #[error("Kubernetes store: {0}")]
    Kubernetes(String),
}

/// The store in use; cheap to clone.
#[derive(Clone)]
pub enum Store {
    Embedded(embedded::EmbeddedStore),
    Kubernetes(kubernetes::KubeStore),
}

impl Store {
    /// `embedded` or `kubernetes`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Kubernetes(_) => "kubernetes",
        }
    }

    /// Stores a new approval; [`StoreError::Exists`] when its id is taken.
    pub async fn create(&self, approval: ApprovalRequest) -> Result<ApprovalRequest, StoreError> {
        match self {
            Store::Embedded(s) => s.create(approval).await,
            Store::Kubernetes(s) => s.create(approval).await,
        }
    }

    /// One approval by id; `None` when there is none.
    pub async fn get(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        match self {
            Store::Embedded(s) => s.get(id).await,
            Store::Kubernetes(s) => s.get(id).await,
        }
    }

    /// Every approval, or those in `state`; newest first.
    pub async fn list(&self, state: Option<State>) -> Result<Vec<ApprovalRequest>, StoreError> {
        match self {
            Store::Embedded(s) => s.list(state).await,
            Store::Kubernetes(s) => s.list(state).await,
        }
    }

    /// Approvals for the same call (see `HeldRequest::fingerprint`); newest first.
    pub async fn find_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Vec<ApprovalRequest>, StoreError> {
        match self {
            Store::Embedded(s) => s.find_by_fingerprint(fingerprint).await,
            Store::Kubernetes(s) => s.find_by_fingerprint(fingerprint).await,
        }
    }

    /// Read-modify-write of one approval. `change` runs on the current version and may
    /// run again if another writer got there first; an `Err` from it aborts and is
    /// returned as `StoreError::Rejected`. Returns the stored result.
    ///
    /// Only `status` is kept from what the closure leaves: `id` and `spec` are fixed at
    /// creation. A closure that leaves the status as it was writes nothing (and nothing
    /// is sent to subscribers).
    pub async fn update<F>(&self, id: &str, change: F) -> Result<ApprovalRequest, StoreError>
    where
        F: FnMut(&mut ApprovalRequest) -> Result<(), super::model::DecisionError> + Send,
    {
        match self {
            Store::Embedded(s) => s.update(id, change).await,
            Store::Kubernetes(s) => s.update(id, change).await,
        }
    }

    /// Every approval as it is created or changed, from now on (by anyone).
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalRequest> {
        match self {
            Store::Embedded(s) => s.subscribe(),
            Store::Kubernetes(s) => s.subscribe(),
        }
    }
}

impl Store {
    /// Marks every `Pending` approval whose `spec.expiresAt` is not after `now` as
    /// `Expired`; returns how many it expired. An approval decided meanwhile is left
    /// alone (the check runs again inside `update`). One approval that cannot be written
    /// is logged and skipped, so it does not keep the others pending.
    pub async fn expire_due(&self, now: time::OffsetDateTime) -> Result<usize, StoreError> {
        let at = model::format_rfc3339(now);
        let due = |a: &ApprovalRequest| {
            a.status.state == State::Pending
                && model::parse_rfc3339(&a.spec.expires_at).is_some_and(|t| t <= now)
        };
        let mut expired = 0;
        for candidate in self.list(Some(State::Pending)).await? {
            if !due(&candidate) {
                continue;
            }
            let mut changed = false;
            let result = self
                .update(&candidate.id, |a| {
                    changed = due(a);
                    if changed {
                        let message =
                            format!("expired: nobody decided before {}", a.spec.expires_at);
                        a.finish(State::Expired, message, &at);
                    }
                    Ok(())
                })
                .await;
            match result {
                Ok(a) if changed => {
                    info!(id = %a.id, expires_at = %a.spec.expires_at, "approval expired");
                    expired += 1;
                }
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(err) => warn!(id = %candidate.id, %err, "could not expire approval"),
            }
        }
        Ok(expired)
    }

    /// Marks `node`'s `Pending` hold-mode approvals `Cancelled`; returns how many. Run
    /// at agent start: the clients of those held requests were connected to the
    /// previous agent process, so nobody is waiting for them any more. Retry-mode
    /// approvals stay: their clients come back on their own.
    /// Removes approvals decided more than `retention` ago (their decisions stay in the
    /// agents' logs and in the session records). Pending ones are never removed.
    pub async fn prune_decided(
        &self,
        now: time::OffsetDateTime,
        retention: Duration,
    ) -> Result<usize, StoreError> {
        let cutoff = now - retention;
        let mut removed = 0;
        for approval in self.list(None).await? {
            let decided = approval
                .status
                .decided_at
                .as_deref()
                .and_then(super::model::parse_rfc3339);
            if !approval.status.state.is_final() || decided.is_none_or(|t| t > cutoff) {
                continue;
            }
            let result = match self {
                Store::Embedded(s) => s.delete(&approval.id).await,
                Store::Kubernetes(s) => s.delete(&approval.id).await,
            };
            match result {
                Ok(()) => removed += 1,
                Err(err) => warn!(id = %approval.id, %err, "could not remove a decided approval"),
            }
        }
        Ok(removed)
    }

    pub async fn cancel_held_on_node(&self, node: &str) -> Result<usize, StoreError> {
        let at = model::now_rfc3339();
        let held_here = |a: &ApprovalRequest| {
            a.status.state == State::Pending
                && a.spec.mode == Mode::Hold
                && a.spec.requester.node == node
        };
        let mut cancelled = 0;
        for candidate in self.list(Some(State::Pending)).await? {
            if !held_here(&candidate) {
                continue;
            }
            let mut changed = false;
            let result = self
                .update(&candidate.id, |a| {
                    changed = held_here(a);
                    if changed {
                        let message = format!(
                            "cancelled: the agent on {node} restarted while the request was held"
                        );
                        a.finish(State::Cancelled, message, &at);
                    }
                    Ok(())
                })
                .await;
            match result {
                Ok(a) if changed => {
                    info!(id = %a.id, %node, "held approval cancelled (agent restarted)");
                    cancelled += 1;
                }
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(err) => warn!(id = %candidate.id, %err, "could not cancel approval"),
            }
        }
        Ok(cancelled)
    }
}

/// Expires due approvals every `every`, until the task is dropped. With the Kubernetes
/// store every agent runs this; they race harmlessly (`update` lets one win, the
/// others find the approval already final and write nothing).
pub async fn run_expiry(store: Store, every: Duration, retention: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pruning is not urgent: about once a minute, whatever the expiry interval.
    let prune_every = (Duration::from_secs(60).as_millis() / every.as_millis().max(1)).max(1);
    let mut round: u128 = 0;
    loop {
        tick.tick().await;
        let now = time::OffsetDateTime::now_utc();
        match store.expire_due(now).await {
            Ok(0) => {}
            Ok(n) => debug!(expired = n, "expiry pass"),
            Err(err) => warn!(%err, "expiry pass failed; trying again next round"),
        }
        if round.is_multiple_of(prune_every) {
            match store.prune_decided(now, retention).await {
                Ok(0) => {}
                Ok(n) => info!(removed = n, "decided approvals past retention removed"),
                Err(err) => warn!(%err, "pruning decided approvals failed; trying again later"),
            }
        }
        round += 1;
    }
}

/// Newest first by `spec.createdAt` (then by id, so the order is stable); an
/// unparseable time sorts last.
pub(crate) fn newest_first(approvals: &mut [ApprovalRequest]) {
    approvals.sort_by_cached_key(|a| {
        (
            std::cmp::Reverse(model::parse_rfc3339(&a.spec.created_at)),
            std::cmp::Reverse(a.id.clone()),
        )
    });
}

#[cfg(test)]
pub(crate) mod testing {
    //! Fixtures shared by the stores' tests.

    use std::path::{Path, PathBuf};

    use crate::approvals::model::*;

    /// A directory removed when dropped.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn temp_dir(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-{what}-{}-{}",
            std::process::id(),
            new_id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// A pending hold-mode approval by alice on node-1, one step of one `ops` approval.
    pub fn approval(id: &str, fingerprint: &str, created_at: &str) -> ApprovalRequest {
        ApprovalRequest {
            id: id.into(),
            spec: ApprovalSpec {
                requester: Requester {
                    user: "alice".into(),
                    uid: String::new(),
                    groups: vec![],
                    pod_namespace: "agents".into(),
                    pod_name: "agent-0".into(),
                    node: "node-1".into(),
                    session: String::new(),
                },
                request: HeldRequest {
                    audit_id: "audit".into(),
                    verb: "create".into(),
                    method: "POST".into(),
                    uri: "/api/v1/namespaces/prod/configmaps".into(),
                    api_group: String::new(),
                    api_version: "v1".into(),
                    resource: "configmaps".into(),
                    subresource: String::new(),
                    namespace: "prod".into(),
                    name: "settings".into(),
                    content_type: "application/json".into(),
                    body_sha256: "00".repeat(32),
                    fingerprint: fingerprint.into(),
                },
                rule: "prod-writes".into(),
                mode: Mode::Hold,
                execute_as: None,
                steps: vec![StepSpec {
                    name: String::new(),
                    groups: vec!["ops".into()],
                    approvals: 1,
                }],
                created_at: created_at.into(),
                expires_at: "2999-01-01T00:00:00Z".into(),
                dry_run: None,
            },
            status: ApprovalStatus::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{approval, temp_dir};
    use super::*;

    fn store(dir: &std::path::Path) -> Store {
        Store::Embedded(embedded::EmbeddedStore::open(&dir.join("a.redb")).expect("open"))
    }

    #[tokio::test]
    async fn expire_due_marks_only_past_pending() {
        let dir = temp_dir("expire");
        let store = store(dir.path());
        let mut due = approval("ar-0000000000000001", "fp1", "2026-01-01T10:00:00Z");
        due.spec.expires_at = "2026-01-01T10:10:00Z".into();
        let mut later = approval("ar-0000000000000002", "fp2", "2026-01-01T10:00:00Z");
        later.spec.expires_at = "2026-01-01T12:00:00Z".into();
        let mut decided = approval("ar-0000000000000003", "fp3", "2026-01-01T10:00:00Z");
        decided.spec.expires_at = "2026-01-01T10:10:00Z".into();
        decided.finish(State::Denied, "no".into(), "2026-01-01T10:01:00Z");
        for a in [&due, &later, &decided] {
            store.create(a.clone()).await.unwrap();
        }
        let now = model::parse_rfc3339("2026-01-01T11:00:00Z").unwrap();
        assert_eq!(store.expire_due(now).await.unwrap(), 1);
        let expired = store.get(&due.id).await.unwrap().unwrap();
        assert_eq!(expired.status.state, State::Expired);
        assert_eq!(
            expired.status.message,
            "expired: nobody decided before 2026-01-01T10:10:00Z"
        );
        assert_eq!(
            expired.status.decided_at.as_deref(),
            Some("2026-01-01T11:00:00Z")
        );
        assert_eq!(
            store.get(&later.id).await.unwrap().unwrap().status.state,
            State::Pending
        );
        assert_eq!(store.get(&decided.id).await.unwrap().unwrap(), decided);
        // Nothing left to do.
        assert_eq!(store.expire_due(now).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn cancel_held_on_node_leaves_retry_and_other_nodes() {
        let dir = temp_dir("cancel");
        let store = store(dir.path());
        let held = approval("ar-0000000000000001", "fp1", "2026-01-01T10:00:00Z");
        let mut retry = approval("ar-0000000000000002", "fp2", "2026-01-01T10:00:00Z");
        retry.spec.mode = Mode::Retry;
        let mut elsewhere = approval("ar-0000000000000003", "fp3", "2026-01-01T10:00:00Z");
        elsewhere.spec.requester.node = "node-2".into();
        for a in [&held, &retry, &elsewhere] {
            store.create(a.clone()).await.unwrap();
        }
        assert_eq!(store.cancel_held_on_node("node-1").await.unwrap(), 1);
        let state = |id: &'static str| {
            let store = store.clone();
            async move { store.get(id).await.unwrap().unwrap().status.state }
        };
        assert_eq!(state("ar-0000000000000001").await, State::Cancelled);
        assert_eq!(state("ar-0000000000000002").await, State::Pending);
        assert_eq!(state("ar-0000000000000003").await, State::Pending);
    }

    #[tokio::test]
    async fn prune_decided_removes_only_decided_approvals_past_retention() {
        let dir = temp_dir("prune");
        let store = store(dir.path());
        let mut old = approval("ar-0000000000000001", "fp1", "2026-01-01T10:00:00Z");
        old.finish(State::Denied, "no".into(), "2026-01-01T10:01:00Z");
        let mut recent = approval("ar-0000000000000002", "fp2", "2026-01-07T10:00:00Z");
        recent.finish(State::Approved, "yes".into(), "2026-01-07T10:01:00Z");
        let pending = approval("ar-0000000000000003", "fp3", "2026-01-01T09:00:00Z");
        for a in [&old, &recent, &pending] {
            store.create(a.clone()).await.unwrap();
        }
        let now = model::parse_rfc3339("2026-01-09T10:00:00Z").unwrap();
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(store.prune_decided(now, week).await.unwrap(), 1);
        assert!(store.get(&old.id).await.unwrap().is_none());
        assert!(store.get(&recent.id).await.unwrap().is_some());
        assert!(
            store.get(&pending.id).await.unwrap().is_some(),
            "pending stays"
        );
        assert_eq!(store.prune_decided(now, week).await.unwrap(), 0);
    }
}
