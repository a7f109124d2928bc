//! Tollgate's integration suites share this: the harness (topology, control plane) and
//! the agent as a node runs it.

pub use tollgate_harness::{cluster, require_root, topology};

pub mod agent;
pub mod agent_bench;
pub mod approval_bench;
pub mod masking_bench;
pub mod output;
pub mod story;
pub mod watch_bench;
