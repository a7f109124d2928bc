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

use tokio::sync::broadcast;

use super::model::{ApprovalRequest, State};

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
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Kubernetes(_) => "kubernetes",
        }
    }

    pub async fn create(&self, approval: ApprovalRequest) -> Result<ApprovalRequest, StoreError> {
        match self {
            Store::Embedded(s) => s.create(approval).await,
            Store::Kubernetes(s) => s.create(approval).await,
        }
    }

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
