//! The test control plane and the harness every cluster-backed suite uses.
//!
//! [`controlplane`] starts or reuses etcd, kube-apiserver, kube-controller-manager (its
//! root-ca-cert-publisher only: `kube-root-ca.crt` in every namespace) and the simulated
//! kubelets (the code path of `cargo xtask cluster up`); [`harness`] is what tests call:
//! [`harness::Cluster::shared`], namespaces, service accounts, RBAC, tokens, pods.

pub mod controlplane;
pub mod harness;

pub use harness::{Cluster, PodOptions, RunningPod, TestNamespace};
