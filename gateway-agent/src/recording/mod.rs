//! Session recording (DESIGN §7): every client connection of an enforced pod is a
//! session; every exchange on it is one record modelled on the API server's audit
//! event; exec/attach streams are timed frames; the records are hash-chained JSON lines
//! so that a change, a removal, an insertion or a reordering is detectable.
//!
//! # Using it (the proxy)
//!
//! ```text
//! let recorder = Recorder::new(RecordingConfig::new(dir, node))?;   // once, in app
//! tokio::spawn(run_retention(recorder.clone(), Duration::from_secs(600)));
//! let session = recorder.open_session(SessionInfo { id, pod_namespace, .. }); // per connection
//! session.record(Exchange { audit_id, verb, .., response_object: capture.finish(), .. });
//! let stream = session.stream(&audit_id, &StreamProtocol::negotiated(..));   // on 101
//! let (up, down) = RemoteCommandTap::pair(stream);
//! splice_recorded(client, upstream, up, down).await;
//! recorder.shutdown().await;                                          // at drain
//! ```
//!
//! `record` never blocks: it queues, and a writer thread does the file work (see
//! [`writer`]). Bodies must be masked by the caller; [`BodyCapture`] collects them as
//! they stream, bounded by the per-record cap. [`SessionHandle::flush`] waits until
//! what was queued is written, for a caller that must know.
//!
//! The readers ([`Sessions`]: list, show, records, verify, export, replay) do blocking
//! file I/O; from async code (the REST API) call them in `spawn_blocking`.
//!
//! # On disk
//!
//! One file per session: `<dir>/<yyyy-mm-dd>/<session-id>.jsonl` (the UTC day the
//! session started; mode 0600 in 0700 directories). One JSON object per line, each
//! ending with a `hash` member:
//!
//! ```text
//! {"kind":"header","format":"tollgate.dev/session/v1","session":"…","node":"…","pod":{…},"peer":"…","startedAt":"…","limits":{…},"agentVersion":"…","hash":"H0"}
//! {"seq":0,"prevHash":"H0","kind":"exchange","auditID":"…","stage":"ResponseComplete","requestReceivedTimestamp":"…","stageTimestamp":"…","user":{…},"sourceIPs":[…],"verb":"get","requestURI":"…","objectRef":{…},"responseStatus":{"code":200},"decision":{"action":"allow","rule":"…"},"responseObject":{…},"hash":"H1"}
//! {"seq":1,"prevHash":"H1","kind":"streamStart","auditID":"…","protocol":"v5.channel.k8s.io","decoded":true,"startedAt":"…","hash":"H2"}
//! {"seq":2,"prevHash":"H2","kind":"frame","auditID":"…","t":120,"dir":"stdout","data":"$ ","hash":"H3"}
//! …
//! {"seq":9,"prevHash":"H9","kind":"end","endedAt":"…","reason":"closed","records":9,"exchanges":3,"frames":4,"omitted":0,"dropped":0,"bytes":4711,"hash":"H10"}
//! ```
//!
//! - Each line's `hash` is the hex SHA-256 of the line's own bytes as written, minus
//!   the `,"hash":"…"` member (i.e. of the object as it was before `hash` was added).
//!   `verify` recomputes it from the raw bytes: nothing is re-serialised.
//! - Records are numbered by `seq` from 0; each one's `prevHash` is the previous line's
//!   `hash`; the first record's is the header's.
//! - Kinds: `exchange` (audit-event fields, plus `decision`, `approvalID`; bodies as
//!   `requestObject` / `responseObject`, or `…Omitted` markers `{reason: tooLarge |
//!   notJson | incomplete, bytes, sha256}`; a watch's events as an array with
//!   `responseObjectStream: true`), `streamStart`, `frame` (`t` ms since the stream
//!   started, `dir` stdin | stdout | stderr | error | resize, or in | out for opaque
//!   protocols, `data` as text or `data64` as base64), `streamTruncated`, `streamEnd`,
//!   `sessionTruncated`, and `end`, whose `records` equals its own `seq`.
//! - A session closed cleanly ends with `end`; without it the agent was killed (or the
//!   session is open). A last line without its newline is a write cut short by a crash.
//!
//! # Modules
//!
//! [`format`](mod@format) (lines, hashes, record types), [`exchange`] (the audit-like record and
//! bodies), [`writer`] (recorder, sessions, streams), [`remotecommand`] (WebSocket
//! channel decoding for exec/attach), [`reader`] (list, show, records, export),
//! [`verify`], [`replay`], [`retention`], and [`cli`] (`gateway-agent sessions`).

pub mod cli;
pub mod exchange;
pub mod format;
pub mod reader;
pub mod remotecommand;
pub mod replay;
pub mod retention;
pub mod verify;
pub mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use exchange::{
    Action, Body, BodyCapture, Decision, Exchange, ObjectRef, OmitReason, Omitted, ResponseStatus,
    Stage, UserInfo,
};
pub use format::{Direction, Frame, Kind, Timestamp};
pub use reader::{ExportFormat, Record, SessionDetail, SessionSummary, Sessions};
pub use remotecommand::{splice_recorded, RemoteCommandTap, Side, StreamProtocol, WsDecoder};
pub use replay::{ReplayOptions, ReplaySummary};
pub use retention::{prune_dir, run_retention, PruneReport, RetentionPolicy};
pub use verify::{At, BadRecord, Problem, Tail, VerifyReport};
pub use writer::{
    Recorder, RecorderStats, RecordingConfig, SessionHandle, SessionInfo, SessionStatus,
    StreamRecorder, SyncPolicy,
};

/// Errors reading sessions, and the few setting the recorder up. (Writing never
/// returns errors: they are counted in [`SessionStatus`] and logged.)
///
/// Messages include their cause and no `source()` is chained, so that a log line and
/// anyhow's `{:#}` both print it once.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("no session {0:?}")]
    NotFound(String),
    #[error("{0:?} is not a session id (letters, digits, '.', '-', '_')")]
    InvalidId(String),
    #[error("{}: line {line}: {why}", path.display())]
    Malformed {
        path: PathBuf,
        line: u64,
        why: String,
    },
    #[error("session {session} has no recorded stream{}", audit_id.as_deref().map(|a| format!(" for exchange {a}")).unwrap_or_default())]
    NoStream {
        session: String,
        audit_id: Option<String>,
    },
    #[error("writing output: {0}")]
    Output(std::io::Error),
}

/// A session id names a file: `[A-Za-z0-9._-]{1,128}`, not starting with a dot.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}
