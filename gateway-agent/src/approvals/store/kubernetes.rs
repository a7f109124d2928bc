//! The Kubernetes store: ApprovalRequest custom resources. (Being written.)

use tokio::sync::broadcast;

use super::StoreError;
use crate::approvals::model::{ApprovalRequest, DecisionError, State};

#[derive(Clone)]
pub struct KubeStore {
    changes: broadcast::Sender<ApprovalRequest>,
}

impl KubeStore {
    pub async fn create(&self, _a: ApprovalRequest) -> Result<ApprovalRequest, StoreError> {
        Err(StoreError::Kubernetes("not written yet".into()))
    }
    pub async fn get(&self, _id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        Err(StoreError::Kubernetes("not written yet".into()))
    }
    pub async fn list(&self, _s: Option<State>) -> Result<Vec<ApprovalRequest>, StoreError> {
        Err(StoreError::Kubernetes("not written yet".into()))
    }
    pub async fn find_by_fingerprint(&self, _f: &str) -> Result<Vec<ApprovalRequest>, StoreError> {
        Err(StoreError::Kubernetes("not written yet".into()))
    }
    pub async fn update<F>(&self, _id: &str, _change: F) -> Result<ApprovalRequest, StoreError>
    where
        F: FnMut(&mut ApprovalRequest) -> Result<(), DecisionError> + Send,
    {
        Err(StoreError::Kubernetes("not written yet".into()))
    }
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalRequest> {
        self.changes.subscribe()
    }
}
