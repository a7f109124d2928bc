//! Tollgate's node agent: one module per concern (DESIGN §1). The binary (`main.rs`) is
//! a thin CLI over these; [`app`] is the one place where `run` assembles them.
//!
//! - [`datapath`]: the eBPF programs: load, attach, pin, map sync, connection origins.
//! - [`discovery`]: pods on this node → cgroups, the API server's addresses; keeps the
//!   kernel maps right.
//! - [`proxy`]: TLS, classification, forwarding, upgrades.
//! - [`identity`]: TokenReview and the pod a token belongs to.
//! - [`policy`]: allow / deny rules, validated, hot-reloaded.
//! - [`approvals`]: held calls, their stores and the decision rules; [`api`]: the
//!   reviewers' REST API and CLI.
//! - [`recording`]: sessions as hash-chained JSON lines.
//! - [`status`]: every error a client sees, as a `metav1.Status`.
//! - [`certs`]: the serving certificate from the cluster CA; [`trust`]: the trust modes,
//!   Tollgate's own CA, the admission webhook that injects it (managed clusters).
//! - [`config`], [`readiness`], [`metrics`], [`admin`], [`https`]: the daemon's frame.
//! - [`doctor`]: can this node run the data path?

pub mod admin;
pub mod api;
pub mod app;
pub mod approvals;
pub mod certs;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod doctor;
pub mod https;
pub mod identity;
pub mod masking;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod recording;
pub mod status;
pub mod trust;
