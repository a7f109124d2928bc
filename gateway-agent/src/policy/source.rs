//! Where the policy comes from, and keeping it current: a file (checked every few
//! seconds; a ConfigMap mounted into the pod changes by an atomic symlink swap, which
//! file-change notifications miss) or a ConfigMap watched through the API server.
//!
//! A new version that does not validate is refused with every problem in the log, and
//! the version in force stays: a typo must never open the gate (or close it).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{error, info, warn};

use super::{Policy, PolicyError};
use crate::proxy::PolicyHandle;

/// The key a policy ConfigMap keeps the document under.
pub const CONFIGMAP_KEY: &str = "policy.yaml";

#[derive(Debug, Clone)]
pub enum PolicySource {
    File(PathBuf),
    ConfigMap { namespace: String, name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {error}")]
    Invalid { origin: String, error: PolicyError },
    #[error("ConfigMap {namespace}/{name}: {message}")]
    ConfigMap {
        namespace: String,
        name: String,
        message: String,
    },
}

/// Reads and validates a policy file (also what `policy check` does).
pub fn load_file(path: &std::path::Path) -> Result<Policy, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    Policy::parse(&text).map_err(|error| LoadError::Invalid {
        origin: path.display().to_string(),
        error,
    })
}

/// Keeps `handle` current from a file until the task is dropped.
pub async fn follow_file(path: PathBuf, handle: PolicyHandle, period: Duration) {
    let mut last = modified(&path);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = modified(&path);
        if now == last {
            continue;
        }
        last = now;
        match load_file(&path) {
            Ok(policy) => {
                info!(path = %path.display(), rules = policy.rules.len(), "policy reloaded");
                handle.replace(policy);
            }
            Err(err) => error!("new policy refused, the previous one stays in force: {err}"),
        }
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    // metadata follows symlinks: a ConfigMap volume's swap shows as a new mtime.
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Parses the policy document out of a ConfigMap.
pub fn from_configmap(cm: &ConfigMap, namespace: &str, name: &str) -> Result<Policy, LoadError> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIGMAP_KEY))
        .ok_or_else(|| LoadError::ConfigMap {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            message: format!("has no {CONFIGMAP_KEY:?} key"),
        })?;
    Policy::parse(text).map_err(|error| LoadError::Invalid {
        origin: format!("ConfigMap {namespace}/{name} key {CONFIGMAP_KEY}"),
        error,
    })
}

/// Keeps `handle` current from a ConfigMap (watched, not polled). `first` is called
/// once with the first outcome, so start-up can wait for a policy.
pub async fn follow_configmap(
    client: Client,
    namespace: String,
    name: String,
    handle: PolicyHandle,
    first: tokio::sync::oneshot::Sender<Result<(), LoadError>>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).boxed();
    let mut first = Some(first);
    while let Some(event) = events.next().await {
        let cm = match event {
            Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => cm,
            Ok(watcher::Event::Delete(_)) => {
                warn!(%namespace, %name, "policy ConfigMap deleted; the policy in force stays");
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(LoadError::ConfigMap {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        message: "does not exist".into(),
                    }));
                }
                continue;
            }
            Ok(watcher::Event::Init) => continue,
            Err(err) => {
                warn!(%err, "watching the policy ConfigMap failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match from_configmap(&cm, &namespace, &name) {
            Ok(policy) => {
                info!(%namespace, %name, rules = policy.rules.len(), "policy loaded");
                handle.replace(policy);
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
            }
            Err(err) => {
                error!("new policy refused, the previous one stays in force: {err}");
                if let Some(first) = first.take() {
                    let _ = first.send(Err(err));
                }
            }
        }
    }
}
