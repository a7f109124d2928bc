//! Approvals (DESIGN §5): a mutating call the policy marks `approve` is held until
//! people decide on it.
//!
//! - [`model`]: the `ApprovalRequest`, its states and the decision rules.
//! - [`store`]: where approvals live (embedded redb file, or Kubernetes custom
//!   resources shared by every node).
//! - [`notify`]: the signed webhook sent on each new approval.
//! - [`config`]: the agent's approval flags, and opening the store and notifier.

pub mod config;
pub mod model;
pub mod notify;
pub mod store;

pub use model::{ApprovalRequest, Mode, Reviewer, State, Verdict};
pub use store::{Store, StoreError};
