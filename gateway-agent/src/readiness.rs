//! Readiness as a set of named start-up tasks: each component holds a [`BlockReady`]
//! guard while it comes up and drops it when it is up. The agent is ready when no
//! guard is left; `/readyz` names the ones still pending.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Ready {
    pending: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    next: Arc<Mutex<u64>>,
}

/// Holds readiness back while it lives.
pub struct BlockReady {
    ready: Ready,
    id: u64,
}

impl Ready {
    pub fn new() -> Ready {
        Ready::default()
    }

    /// Registers a start-up task; the agent is not ready until the guard is dropped.
    pub fn register(&self, name: &'static str) -> BlockReady {
        let id = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, name);
        BlockReady {
            ready: self.clone(),
            id,
        }
    }

    /// The tasks still pending, empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .copied()
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.ready
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_task_is_up() {
        let ready = Ready::new();
        let maps = ready.register("kernel maps");
        let watches = ready.register("watches");
        assert_eq!(ready.pending(), vec!["kernel maps", "watches"]);
        drop(maps);
        assert!(!ready.is_ready());
        drop(watches);
        assert!(ready.is_ready());
    }
}
