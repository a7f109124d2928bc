//! Retention: whole session files are deleted when older than the maximum age, then the
//! oldest while the directory is over its size. Age is the file's last modification
//! (a session's end). Files being written are never deleted.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::reader::Sessions;
use super::writer::Recorder;
use super::RecordingError;

/// What retention keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_age: Option<Duration>,
    pub max_total_bytes: Option<u64>,
}

/// What a prune did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub deleted: Vec<PathBuf>,
    pub freed_bytes: u64,
    pub kept: usize,
    pub kept_bytes: u64,
}

/// Prunes `dir` as of `now`, never touching `open` files. A file that cannot be
/// deleted is logged and counted as kept; the next prune tries again.
pub fn prune_dir(
    dir: &Path,
    policy: RetentionPolicy,
    now: SystemTime,
    open: &HashSet<PathBuf>,
) -> Result<PruneReport, RecordingError> {
    let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    let mut open_bytes = 0u64;
    for path in Sessions::open(dir).files()? {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // gone since it was listed
        };
        if open.contains(&path) {
            open_bytes += meta.len();
            continue;
        }
        files.push((meta.modified().unwrap_or(now), meta.len(), path));
    }
    // Oldest first: both rules delete from the front.
    files.sort();
    let mut report = PruneReport::default();
    let mut total: u64 = open_bytes + files.iter().map(|(_, len, _)| len).sum::<u64>();
    for (modified, len, path) in files {
        let too_old = policy
            .max_age
            .is_some_and(|max| now.duration_since(modified).is_ok_and(|age| age > max));
        let too_much = policy.max_total_bytes.is_some_and(|max| total > max);
        if !(too_old || too_much) {
            report.kept += 1;
            report.kept_bytes += len;
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= len;
                report.freed_bytes += len;
                if let Some(day) = path.parent().filter(|p| *p != dir) {
                    // Only succeeds once the day's directory is empty.
                    let _ = std::fs::remove_dir(day);
                }
                report.deleted.push(path);
            }
            Err(err) => {
                warn!(path = %path.display(), %err, "retention: cannot delete session");
                report.kept += 1;
                report.kept_bytes += len;
            }
        }
    }
    Ok(report)
}

impl Recorder {
    /// Prunes the recorder's directory by its configured retention, skipping the
    /// sessions it is writing.
    pub fn prune(&self, now: SystemTime) -> Result<PruneReport, RecordingError> {
        let config = self.config();
        let policy = RetentionPolicy {
            max_age: config.retention_max_age,
            max_total_bytes: config.retention_max_total_bytes,
        };
        let open = self
            .common()
            .open_paths
            .lock()
            .map(|open| open.clone())
            .unwrap_or_default();
        prune_dir(&config.dir, policy, now, &open)
    }
}

/// Prunes every `every`, forever (spawn it; abort it at shutdown). The file work runs
/// on the blocking pool.
pub async fn run_retention(recorder: Recorder, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = recorder.clone();
        match tokio::task::spawn_blocking(move || r.prune(SystemTime::now())).await {
            Ok(Ok(report)) if !report.deleted.is_empty() => info!(
                deleted = report.deleted.len(),
                freed_bytes = report.freed_bytes,
                kept = report.kept,
                kept_bytes = report.kept_bytes,
                "retention pruned sessions"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(err)) => warn!(%err, "retention failed"),
            Err(err) => warn!(%err, "retention task failed"),
        }
    }
}
