//! Writing sessions: the [`Recorder`] the proxy holds, a [`SessionHandle`] per client
//! connection, a [`StreamRecorder`] per exec/attach stream.
//!
//! All file I/O happens on one dedicated thread. The request path only serialises an
//! exchange's small members and queues them (bodies travel as the `Bytes` the proxy
//! already has); the writer thread validates bodies, chains, hashes and appends each
//! line with one `write` to a file opened `O_APPEND`. That keeps a slow or failing disk
//! off the proxy's tasks: the queue is bounded by bytes, and when it is full a record
//! is dropped and counted (the session is then reported incomplete), never waited for.
//!
//! Records are taken in batches: the first record queued while the writer sleeps wakes
//! it, and it lets more gather for up to [`LINGER`] before writing them all. Waking a
//! thread per record cost more than writing the record (a futex wake on the request
//! path, two context switches), once per request. Everything else (open, close, flush,
//! shutdown) is taken at once.
//!
//! Durability: a line is in the page cache as soon as the writer has written it, which
//! survives `kill -9` of the agent; `SyncPolicy` adds `fdatasync` for power loss. A
//! record is queued when the exchange completes and written within [`LINGER`] (plus the
//! time to write the batch); [`SessionHandle::flush`] waits for it when a caller needs
//! certainty.

use std::collections::{HashMap, HashSet};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::exchange::{splice_bodies, Body, Exchange};
use super::format::{
    header_object, record_object, seal, End, Frame, Header, Kind, Limits, PodRef, SessionTruncated,
    StreamEnd, StreamStart, StreamTruncated, Timestamp, FORMAT,
};
use super::remotecommand::StreamProtocol;
use super::{valid_id, Direction, RecordingError};

/// How long queued records may wait for company before the writer takes them.
pub const LINGER: Duration = Duration::from_millis(5);

/// When the writer calls `fdatasync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Never: the page cache survives a crash of the agent, not of the node.
    Never,
    /// When a session closes (one sync per client connection).
    #[default]
    OnClose,
    /// After every record: survives power loss, costs a disk flush per exchange.
    EveryRecord,
}

/// What the recorder needs; built once by the agent's config.
#[derive(Clone, Debug)]
pub struct RecordingConfig {
    /// Sessions go to `<dir>/<yyyy-mm-dd>/<session-id>.jsonl`.
    pub dir: PathBuf,
    /// This node's name, written in every session header.
    pub node: String,
    /// A session file stops growing here (then one `sessionTruncated` record and the
    /// `end` record, which are always written).
    pub max_session_bytes: u64,
    /// A body larger than this is replaced by a marker with its size and SHA-256.
    pub max_record_body_bytes: usize,
    /// An exec/attach stream records this many bytes of frames, then a
    /// `streamTruncated` marker.
    pub max_stream_bytes: u64,
    /// Sessions last modified longer ago are deleted by retention (`None`: kept).
    pub retention_max_age: Option<Duration>,
    /// Beyond this total, retention deletes the oldest sessions (`None`: no limit).
    pub retention_max_total_bytes: Option<u64>,
    pub sync: SyncPolicy,
    /// Records waiting for the writer may hold this many bytes; beyond, records are
    /// dropped (and counted) rather than held.
    pub max_queued_bytes: usize,
}

impl RecordingConfig {
    /// The defaults: 64 MiB per session, 1 MiB per body, 16 MiB per stream, 30 days,
    /// 8 GiB in all, sync on close, a 64 MiB queue.
    pub fn new(dir: impl Into<PathBuf>, node: impl Into<String>) -> RecordingConfig {
        RecordingConfig {
            dir: dir.into(),
            node: node.into(),
            max_session_bytes: 64 << 20,
            max_record_body_bytes: 1 << 20,
            max_stream_bytes: 16 << 20,
            retention_max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            retention_max_total_bytes: Some(8 << 30),
            sync: SyncPolicy::OnClose,
            max_queued_bytes: 64 << 20,
        }
    }
}

/// Who a session belongs to; the proxy has all of it when a connection is accepted.
#[derive(Clone, Debug, Default)]
pub struct SessionInfo {
    /// Unique on this node (the proxy's connection id). Characters outside
    /// `[A-Za-z0-9._-]` are replaced by `_` (the id names a file).
    pub id: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub pod_service_account: String,
    /// The client's address.
    pub peer: String,
    /// The API server address the pod dialled.
    pub api_server: String,
    /// Defaults to now when left at the epoch.
    pub started_at: Timestamp,
}

/// Counters over every session (for metrics and `/readyz`-style checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecorderStats {
    pub sessions_opened: u64,
    pub sessions_failed: u64,
    pub sessions_open: u64,
    pub records_written: u64,
    /// Bytes of records written (headers included).
    pub bytes_written: u64,
    pub records_dropped: u64,
    pub write_errors: u64,
    pub queued_bytes: u64,
}

/// Where one session stands. A session is complete when everything the proxy
/// recorded is in the file: see [`SessionStatus::complete`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStatus {
    /// Records written (the header and `end` not counted).
    pub records: u64,
    /// Records lost: the queue was full, the disk failed, or the recorder stopped.
    pub dropped: u64,
    /// Records not stored because the session was over `max_session_bytes`.
    pub omitted: u64,
    pub write_errors: u64,
    /// The file could not be created, or a failed write could not be undone.
    pub failed: bool,
    pub truncated: bool,
    /// The `end` record is written.
    pub closed: bool,
}

impl SessionStatus {
    /// Nothing was lost or left out.
    pub fn complete(&self) -> bool {
        !self.failed && !self.truncated && self.dropped == 0 && self.omitted == 0
    }
}

/// The recorder: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    queue: Arc<Queue>,
    common: Arc<Common>,
    next_key: AtomicU64,
}

impl Drop for RecorderInner {
    fn drop(&mut self) {
        // The last handle is gone: the writer closes what is open and ends.
        self.queue.disconnect();
    }
}

/// The writer's queue (see the module documentation): a list under a lock, and a
/// condition variable the writer sleeps on, signalled only when it must wake.
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

#[derive(Default)]
struct QueueState {
    commands: Vec<Command>,
    /// The writer sleeps until a command comes: the next one wakes it.
    idle: bool,
    /// The writer lets records gather: only a command that must not wait wakes it.
    lingering: bool,
    /// A command that must not wait is queued.
    urgent: bool,
    /// Every handle is gone: the writer ends once the queue is empty.
    disconnected: bool,
    /// The writer has ended: nothing more is taken.
    closed: bool,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `command`; gives it back when the writer has ended.
    fn send(&self, command: Command) -> Result<(), Command> {
        let urgent = !matches!(command, Command::Append { .. });
        let mut state = self.lock();
        if state.closed {
            return Err(command);
        }
        state.commands.push(command);
        let wake = state.idle || (urgent && state.lingering && !state.urgent);
        state.urgent |= urgent;
        if wake {
            // Woken once: later senders need not signal again.
            state.idle = false;
            state.lingering = false;
        }
        drop(state);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    fn disconnect(&self) {
        self.lock().disconnected = true;
        self.wake.notify_one();
    }

    /// For the writer: waits for commands, lets records gather for up to [`LINGER`],
    /// then moves every queued command to `into`. False once every handle is gone and
    /// nothing is left.
    fn take(&self, into: &mut Vec<Command>) -> bool {
        let mut state = self.lock();
        while state.commands.is_empty() {
            if state.disconnected {
                return false;
            }
            state.idle = true;
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle = false;
        }
        let deadline = Instant::now() + LINGER;
        while !state.urgent && !state.disconnected {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if left.is_zero() {
                break;
            }
            state.lingering = true;
            state = self
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            state.lingering = false;
        }
        state.urgent = false;
        std::mem::swap(&mut state.commands, into);
        true
    }

    /// For the writer, as it ends: later sends fail; what was still queued.
    fn close(&self) -> Vec<Command> {
        let mut state = self.lock();
        state.closed = true;
        std::mem::take(&mut state.commands)
    }
}

/// What the writer thread and the callers share. (The writer holds no sender, so the
/// thread ends once every `Recorder` and handle is gone.)
pub(crate) struct Common {
    pub(crate) config: RecordingConfig,
    queued_bytes: AtomicUsize,
    sessions_opened: AtomicU64,
    sessions_failed: AtomicU64,
    records_written: AtomicU64,
    bytes_written: AtomicU64,
    records_dropped: AtomicU64,
    write_errors: AtomicU64,
    /// The writer has stopped (shutdown): records are dropped at once.
    stopped: AtomicBool,
    /// Files being written: retention leaves them alone.
    pub(crate) open_paths: Mutex<HashSet<PathBuf>>,
}

#[derive(Default)]
struct SessionState {
    written: AtomicU64,
    dropped: AtomicU64,
    omitted: AtomicU64,
    write_errors: AtomicU64,
    failed: AtomicBool,
    truncated: AtomicBool,
    closed: AtomicBool,
}

enum Ack {
    Async(tokio::sync::oneshot::Sender<()>),
    Blocking(mpsc::SyncSender<()>),
}

impl Ack {
    fn send(self) {
        // The waiter may have given up; nothing to do then.
        match self {
            Ack::Async(tx) => {
                let _ = tx.send(());
            }
            Ack::Blocking(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

enum Command {
    Open {
        key: u64,
        path: PathBuf,
        header: Vec<u8>,
        state: Arc<SessionState>,
    },
    Append {
        key: u64,
        kind: Kind,
        fields: Vec<u8>,
        bodies: Option<Box<(Body, Body)>>,
        budget: usize,
        state: Arc<SessionState>,
    },
    Close {
        key: u64,
        reason: &'static str,
    },
    /// Forget a session without its `end` record, as a crash would (tests).
    #[cfg(test)]
    Abandon {
        key: u64,
    },
    Flush(Ack),
    Shutdown(Ack),
}

impl Recorder {
    /// Creates `config.dir` (mode 0700) and starts the writer thread.
    pub fn new(config: RecordingConfig) -> Result<Recorder, RecordingError> {
        create_dir(&config.dir).map_err(|error| RecordingError::Io {
            path: config.dir.clone(),
            error,
        })?;
        let common = Arc::new(Common {
            config,
            queued_bytes: AtomicUsize::new(0),
            sessions_opened: AtomicU64::new(0),
            sessions_failed: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            records_dropped: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            open_paths: Mutex::new(HashSet::new()),
        });
        let queue = Arc::new(Queue::new());
        let writer = Writer {
            common: common.clone(),
            sessions: HashMap::new(),
        };
        let taken = queue.clone();
        std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || writer.run(&taken))
            .map_err(|error| RecordingError::Io {
                path: common.config.dir.clone(),
                error,
            })?;
        Ok(Recorder {
            inner: Arc::new(RecorderInner {
                queue,
                common,
                next_key: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &RecordingConfig {
        &self.inner.common.config
    }

    pub(crate) fn common(&self) -> &Common {
        &self.inner.common
    }

    /// Starts a session: its file and header are written by the writer thread, so this
    /// never blocks. A session that cannot be created reports `failed` in its status.
    pub fn open_session(&self, info: SessionInfo) -> SessionHandle {
        let common = &self.inner.common;
        let id = file_safe_id(&info.id);
        let started_at = if info.started_at == Timestamp::default() {
            Timestamp::now()
        } else {
            info.started_at
        };
        let path = common
            .config
            .dir
            .join(started_at.day())
            .join(format!("{id}.jsonl"));
        let header = Header {
            format: FORMAT.to_owned(),
            session: id.clone(),
            node: common.config.node.clone(),
            pod: PodRef {
                namespace: info.pod_namespace,
                name: info.pod_name,
                uid: info.pod_uid,
                service_account: info.pod_service_account,
            },
            peer: info.peer,
            api_server: info.api_server,
            started_at,
            limits: Limits {
                max_session_bytes: common.config.max_session_bytes,
                max_record_body_bytes: common.config.max_record_body_bytes as u64,
                max_stream_bytes: common.config.max_stream_bytes,
            },
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let state = Arc::new(SessionState::default());
        let key = self.inner.next_key.fetch_add(1, Relaxed);
        common.sessions_opened.fetch_add(1, Relaxed);
        // A header has only strings and numbers: it always serialises.
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let open = Command::Open {
            key,
            path: path.clone(),
            header,
            state: state.clone(),
        };
        if common.stopped.load(Relaxed) || self.inner.queue.send(open).is_err() {
            state.failed.store(true, Relaxed);
            common.sessions_failed.fetch_add(1, Relaxed);
            warn!(session = %id, "recorder stopped; session not recorded");
        }
        SessionHandle {
            inner: Some(Arc::new(SessionInner {
                key,
                id,
                path,
                recorder: self.inner.clone(),
                state,
                abandoned: AtomicBool::new(false),
            })),
        }
    }

    pub fn stats(&self) -> RecorderStats {
        let c = &self.inner.common;
        let open = c.open_paths.lock().map_or(0, |p| p.len() as u64);
        RecorderStats {
            sessions_opened: c.sessions_opened.load(Relaxed),
            sessions_failed: c.sessions_failed.load(Relaxed),
            sessions_open: open,
            records_written: c.records_written.load(Relaxed),
            bytes_written: c.bytes_written.load(Relaxed),
            records_dropped: c.records_dropped.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
            queued_bytes: c.queued_bytes.load(Relaxed) as u64,
        }
    }

    /// Waits until everything queued before this call is written.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .inner
            .queue
            .send(Command::Flush(Ack::Async(tx)))
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// [`Recorder::flush`] for threads outside the runtime; false on timeout.
    pub fn flush_blocking(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner
            .queue
            .send(Command::Flush(Ack::Blocking(tx)))
            .is_ok()
            && rx.recv_timeout(timeout).is_ok()
    }

    /// Closes every open session with `reason: shutdown` and stops the writer; later
    /// records are dropped. For the agent's drain, after connections are drained.
    pub async fn shutdown(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .inner
            .queue
            .send(Command::Shutdown(Ack::Async(tx)))
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// [`Recorder::shutdown`] for threads outside the runtime; false on timeout.
    pub fn shutdown_blocking(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner
            .queue
            .send(Command::Shutdown(Ack::Blocking(tx)))
            .is_ok()
            && rx.recv_timeout(timeout).is_ok()
    }
}

/// One client connection's recording. Clone it freely (an HTTP/2 connection serves
/// requests concurrently); the session closes, writing its `end` record, when the last
/// clone (and the last [`StreamRecorder`] of it) is dropped.
///
/// [`SessionHandle::disabled`] records nothing, so the proxy needs no `Option`.
#[derive(Clone, Default)]
pub struct SessionHandle {
    inner: Option<Arc<SessionInner>>,
}

struct SessionInner {
    key: u64,
    id: String,
    path: PathBuf,
    recorder: Arc<RecorderInner>,
    state: Arc<SessionState>,
    abandoned: AtomicBool,
}

impl SessionHandle {
    /// A handle that records nothing (recording off, or an exempt pod).
    pub fn disabled() -> SessionHandle {
        SessionHandle::default()
    }

    /// The session id (as filed: see [`SessionInfo::id`]); empty when disabled.
    pub fn id(&self) -> &str {
        self.inner.as_ref().map_or("", |i| i.id.as_str())
    }

    /// The session's file; `None` when disabled.
    pub fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.path.as_path())
    }

    /// Appends one exchange. Never blocks: serialises the small members, queues them
    /// with the bodies, returns. Bodies must already be masked. False when the record
    /// was dropped (counted in [`SessionHandle::status`]).
    pub fn record(&self, exchange: Exchange) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let mut exchange = exchange;
        let cap = inner.recorder.common.config.max_record_body_bytes;
        let request = std::mem::take(&mut exchange.request_object).prepare(cap);
        let response = std::mem::take(&mut exchange.response_object).prepare(cap);
        let fields = match serde_json::to_vec(&exchange) {
            Ok(fields) => fields,
            Err(err) => {
                inner.lost(&format!("exchange not serialisable: {err}"));
                return false;
            }
        };
        let budget = fields.len() + request.queued_len() + response.queued_len();
        inner.append(
            Kind::Exchange,
            fields,
            Some(Box::new((request, response))),
            budget,
        )
    }

    /// Starts recording an upgraded stream (exec, attach, port-forward) of the exchange
    /// `audit_id`. Feed it frames directly or through
    /// [`super::remotecommand::RemoteCommandTap`].
    pub fn stream(&self, audit_id: &str, protocol: &StreamProtocol) -> StreamRecorder {
        let Some(inner) = &self.inner else {
            return StreamRecorder { inner: None };
        };
        let start = StreamStart {
            audit_id: audit_id.to_owned(),
            protocol: protocol.name().to_owned(),
            decoded: protocol.decoded(),
            started_at: Timestamp::now(),
        };
        inner.append_marker(Kind::StreamStart, &start);
        StreamRecorder {
            inner: Some(Arc::new(StreamInner {
                session: self.clone(),
                audit_id: audit_id.to_owned(),
                decoded: protocol.decoded(),
                start: Instant::now(),
                max_bytes: inner.recorder.common.config.max_stream_bytes,
                bytes: AtomicU64::new(0),
                frames: AtomicU64::new(0),
                omitted_frames: AtomicU64::new(0),
                omitted_bytes: AtomicU64::new(0),
                truncated: AtomicBool::new(false),
            })),
        }
    }

    /// Where the session stands now.
    pub fn status(&self) -> SessionStatus {
        let Some(inner) = &self.inner else {
            return SessionStatus::default();
        };
        let s = &inner.state;
        SessionStatus {
            records: s.written.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            omitted: s.omitted.load(Relaxed),
            write_errors: s.write_errors.load(Relaxed),
            failed: s.failed.load(Relaxed),
            truncated: s.truncated.load(Relaxed),
            closed: s.closed.load(Relaxed),
        }
    }

    /// Waits until this session's records queued so far are written.
    pub async fn flush(&self) {
        if let Some(inner) = &self.inner {
            Recorder {
                inner: inner.recorder.clone(),
            }
            .flush()
            .await
        }
    }

    /// Forgets the session without writing `end`, as `kill -9` would leave it.
    #[cfg(test)]
    pub(crate) fn abandon(self) {
        if let Some(inner) = &self.inner {
            inner.abandoned.store(true, Relaxed);
            let _ = inner
                .recorder
                .queue
                .send(Command::Abandon { key: inner.key });
        }
    }
}

impl SessionInner {
    fn append(
        &self,
        kind: Kind,
        fields: Vec<u8>,
        bodies: Option<Box<(Body, Body)>>,
        budget: usize,
    ) -> bool {
        let common = &self.recorder.common;
        if common.stopped.load(Relaxed) {
            self.lost("recorder stopped");
            return false;
        }
        if self.state.failed.load(Relaxed) {
            self.lost("session file failed");
            return false;
        }
        let before = common.queued_bytes.fetch_add(budget, Relaxed);
        if before + budget > common.config.max_queued_bytes {
            common.queued_bytes.fetch_sub(budget, Relaxed);
            self.lost("writer queue full");
            return false;
        }
        let append = Command::Append {
            key: self.key,
            kind,
            fields,
            bodies,
            budget,
            state: self.state.clone(),
        };
        if self.recorder.queue.send(append).is_err() {
            common.queued_bytes.fetch_sub(budget, Relaxed);
            self.lost("recorder stopped");
            return false;
        }
        true
    }

    /// A small record of ours (stream markers): it always serialises.
    fn append_marker<T: serde::Serialize>(&self, kind: Kind, record: &T) -> bool {
        match serde_json::to_vec(record) {
            Ok(fields) => {
                let budget = fields.len();
                self.append(kind, fields, None, budget)
            }
            Err(err) => {
                self.lost(&format!("{kind} not serialisable: {err}"));
                false
            }
        }
    }

    fn lost(&self, why: &str) {
        self.recorder.common.records_dropped.fetch_add(1, Relaxed);
        // One warning per session: a full queue would otherwise log per record.
        if self.state.dropped.fetch_add(1, Relaxed) == 0 {
            warn!(session = %self.id, why, "recording: record dropped; session will be incomplete");
        }
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        if !self.abandoned.load(Relaxed) {
            let _ = self.recorder.queue.send(Command::Close {
                key: self.key,
                reason: "closed",
            });
        }
    }
}

/// Records one stream's frames, timed from when the stream started, up to
/// `max_stream_bytes`. Cloneable (one clone per direction of a splice); the
/// `streamEnd` record is written when the last clone is dropped.
#[derive(Clone)]
pub struct StreamRecorder {
    inner: Option<Arc<StreamInner>>,
}

struct StreamInner {
    session: SessionHandle,
    audit_id: String,
    decoded: bool,
    start: Instant,
    max_bytes: u64,
    bytes: AtomicU64,
    frames: AtomicU64,
    omitted_frames: AtomicU64,
    omitted_bytes: AtomicU64,
    truncated: AtomicBool,
}

impl StreamRecorder {
    /// A recorder that records nothing.
    pub fn disabled() -> StreamRecorder {
        StreamRecorder { inner: None }
    }

    pub fn audit_id(&self) -> &str {
        self.inner.as_ref().map_or("", |i| i.audit_id.as_str())
    }

    /// Whether frames are decoded channels (else opaque `in`/`out` bytes).
    pub fn decoded(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.decoded)
    }

    /// Records `data` seen now on `dir`.
    pub fn frame(&self, dir: Direction, data: &[u8]) {
        let Some(inner) = &self.inner else { return };
        let Some(session) = &inner.session.inner else {
            return;
        };
        if data.is_empty() {
            return;
        }
        let t = inner.start.elapsed().as_millis() as u64;
        let len = data.len() as u64;
        // Reserve before recording, so the two directions together respect the cap.
        let before = if inner.truncated.load(Relaxed) {
            u64::MAX
        } else {
            inner.bytes.fetch_add(len, Relaxed)
        };
        if before.saturating_add(len) > inner.max_bytes {
            if before != u64::MAX {
                inner.bytes.fetch_sub(len, Relaxed);
            }
            inner.omitted_frames.fetch_add(1, Relaxed);
            inner.omitted_bytes.fetch_add(len, Relaxed);
            if !inner.truncated.swap(true, Relaxed) {
                let marker = StreamTruncated {
                    audit_id: inner.audit_id.clone(),
                    t,
                    after_bytes: inner.bytes.load(Relaxed),
                };
                session.append_marker(Kind::StreamTruncated, &marker);
            }
            return;
        }
        let frame = Frame::new(&inner.audit_id, t, dir, data);
        if session.append_marker(Kind::Frame, &frame) {
            inner.frames.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for StreamInner {
    fn drop(&mut self) {
        let Some(session) = &self.session.inner else {
            return;
        };
        let end = StreamEnd {
            audit_id: self.audit_id.clone(),
            t: self.start.elapsed().as_millis() as u64,
            frames: self.frames.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            omitted_frames: self.omitted_frames.load(Relaxed),
            omitted_bytes: self.omitted_bytes.load(Relaxed),
        };
        session.append_marker(Kind::StreamEnd, &end);
    }
}

/// A session as the writer thread holds it.
struct OpenSession {
    file: File,
    path: PathBuf,
    id: String,
    next_seq: u64,
    prev_hash: String,
    /// The file's length: every byte up to here is whole lines.
    bytes: u64,
    truncated: bool,
    /// A failed write could not be undone: nothing more is written.
    failed: bool,
    exchanges: u64,
    frames: u64,
    omitted: u64,
    state: Arc<SessionState>,
}

struct Writer {
    common: Arc<Common>,
    sessions: HashMap<u64, OpenSession>,
}

impl Writer {
    fn run(mut self, queue: &Queue) {
        let mut batch = Vec::new();
        let mut behind = Vec::new();
        let shutdown = 'run: loop {
            // False: every handle is gone, so every one was dropped and sent its Close.
            if !queue.take(&mut batch) {
                break None;
            }
            let mut commands = batch.drain(..);
            while let Some(command) = commands.next() {
                if let Command::Shutdown(ack) = command {
                    behind.extend(commands);
                    break 'run Some(ack);
                }
                self.handle(command);
            }
        };
        self.common.stopped.store(true, Relaxed);
        // Records queued behind the shutdown are lost: count them, so that the end
        // records and the sessions' status say so.
        behind.extend(queue.close());
        for command in behind {
            match command {
                Command::Append { budget, state, .. } => {
                    state.dropped.fetch_add(1, Relaxed);
                    self.common.records_dropped.fetch_add(1, Relaxed);
                    self.common.queued_bytes.fetch_sub(budget, Relaxed);
                }
                Command::Flush(ack) | Command::Shutdown(ack) => ack.send(),
                _ => {}
            }
        }
        self.close_all(if shutdown.is_some() {
            "shutdown"
        } else {
            "closed"
        });
        if let Some(ack) = shutdown {
            ack.send();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Open {
                key,
                path,
                header,
                state,
            } => self.open(key, path, &header, state),
            Command::Append {
                key,
                kind,
                fields,
                bodies,
                budget,
                state,
            } => {
                self.append(key, kind, fields, bodies, &state);
                self.common.queued_bytes.fetch_sub(budget, Relaxed);
            }
            Command::Close { key, reason } => self.close(key, reason),
            #[cfg(test)]
            Command::Abandon { key } => {
                if let Some(session) = self.sessions.remove(&key) {
                    self.forget_path(&session.path);
                }
            }
            Command::Flush(ack) => ack.send(),
            // Handled by `run`.
            Command::Shutdown(ack) => ack.send(),
        }
    }

    fn open(&mut self, key: u64, path: PathBuf, header: &[u8], state: Arc<SessionState>) {
        let (line, hash) = seal(header_object(header));
        let created = create_session_file(&path).and_then(|mut file| {
            file.write_all(&line)?;
            Ok(file)
        });
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match created {
            Ok(file) => {
                debug!(session = %id, path = %path.display(), "session opened");
                if let Ok(mut open) = self.common.open_paths.lock() {
                    open.insert(path.clone());
                }
                self.sessions.insert(
                    key,
                    OpenSession {
                        file,
                        path,
                        id,
                        next_seq: 0,
                        prev_hash: hash,
                        bytes: line.len() as u64,
                        truncated: false,
                        failed: false,
                        exchanges: 0,
                        frames: 0,
                        omitted: 0,
                        state,
                    },
                );
            }
            Err(err) => {
                state.failed.store(true, Relaxed);
                self.common.sessions_failed.fetch_add(1, Relaxed);
                self.common.write_errors.fetch_add(1, Relaxed);
                error!(session = %id, path = %path.display(), %err, "cannot create session file; session not recorded");
            }
        }
    }

    fn append(
        &mut self,
        key: u64,
        kind: Kind,
        fields: Vec<u8>,
        bodies: Option<Box<(Body, Body)>>,
        state: &SessionState,
    ) {
        let session = match self.sessions.get_mut(&key) {
            Some(session) if !session.failed => session,
            // Never opened (creation failed), failed since, or already closed.
            _ => {
                state.dropped.fetch_add(1, Relaxed);
                self.common.records_dropped.fetch_add(1, Relaxed);
                return;
            }
        };
        if session.truncated {
            session.omitted += 1;
            state.omitted.fetch_add(1, Relaxed);
            return;
        }
        let fields = match bodies {
            Some(bodies) => {
                let (request, response) = *bodies;
                splice_bodies(
                    fields,
                    request,
                    response,
                    self.common.config.max_record_body_bytes,
                )
            }
            None => fields,
        };
        let (line, hash) = seal(record_object(
            session.next_seq,
            &session.prev_hash,
            kind,
            &fields,
        ));
        let max = self.common.config.max_session_bytes;
        if session.bytes + line.len() as u64 > max {
            // The marker goes past the cap: a reader must learn why the rest is missing.
            let marker = SessionTruncated {
                at_bytes: session.bytes,
                max_session_bytes: max,
            };
            let marker = serde_json::to_vec(&marker).unwrap_or_default();
            write_record(&self.common, session, Kind::SessionTruncated, &marker);
            session.truncated = true;
            session.omitted += 1;
            state.truncated.store(true, Relaxed);
            state.omitted.fetch_add(1, Relaxed);
            warn!(session = %session.id, max, "session reached its size cap; later records are counted, not stored");
            return;
        }
        if write_line(&self.common, session, &line, hash) {
            match kind {
                Kind::Exchange => session.exchanges += 1,
                Kind::Frame => session.frames += 1,
                _ => {}
            }
        }
    }

    fn close(&mut self, key: u64, reason: &'static str) {
        let Some(mut session) = self.sessions.remove(&key) else {
            return;
        };
        self.forget_path(&session.path);
        let end = End {
            ended_at: Timestamp::now(),
            reason: reason.to_owned(),
            records: session.next_seq,
            exchanges: session.exchanges,
            frames: session.frames,
            omitted: session.omitted,
            dropped: session.state.dropped.load(Relaxed),
            bytes: session.bytes,
        };
        if session.failed {
            return;
        }
        let end = serde_json::to_vec(&end).unwrap_or_default();
        let written = write_record(&self.common, &mut session, Kind::End, &end);
        if self.common.config.sync != SyncPolicy::Never {
            if let Err(err) = session.file.sync_data() {
                warn!(session = %session.id, %err, "fdatasync at close failed");
            }
        }
        session.state.closed.store(written, Relaxed);
        // The last hash, in the agent's log: an anchor outside the file, so that even a
        // consistent rewrite of the whole file can be caught by comparing it.
        info!(
            session = %session.id,
            records = session.next_seq,
            bytes = session.bytes,
            last_hash = %session.prev_hash,
            reason,
            "session closed"
        );
    }

    fn close_all(&mut self, reason: &'static str) {
        let keys: Vec<u64> = self.sessions.keys().copied().collect();
        for key in keys {
            self.close(key, reason);
        }
    }

    fn forget_path(&self, path: &Path) {
        if let Ok(mut open) = self.common.open_paths.lock() {
            open.remove(path);
        }
    }
}

/// Chains, seals and writes one record of ours.
fn write_record(common: &Common, session: &mut OpenSession, kind: Kind, fields: &[u8]) -> bool {
    let (line, hash) = seal(record_object(
        session.next_seq,
        &session.prev_hash,
        kind,
        fields,
    ));
    write_line(common, session, &line, hash)
}

/// Appends a sealed line; on success it becomes the chain's head.
fn write_line(common: &Common, session: &mut OpenSession, line: &[u8], hash: String) -> bool {
    // One write of the whole line (the file is O_APPEND): a crash leaves at most a
    // partial last line, which `verify` reports as an incomplete tail.
    match session.file.write_all(line) {
        Ok(()) => {
            if common.config.sync == SyncPolicy::EveryRecord {
                if let Err(err) = session.file.sync_data() {
                    warn!(session = %session.id, %err, "fdatasync failed");
                }
            }
            session.next_seq += 1;
            session.prev_hash = hash;
            session.bytes += line.len() as u64;
            session.state.written.fetch_add(1, Relaxed);
            common.records_written.fetch_add(1, Relaxed);
            common.bytes_written.fetch_add(line.len() as u64, Relaxed);
            true
        }
        Err(err) => {
            session.state.write_errors.fetch_add(1, Relaxed);
            session.state.dropped.fetch_add(1, Relaxed);
            common.write_errors.fetch_add(1, Relaxed);
            common.records_dropped.fetch_add(1, Relaxed);
            // A short write (disk full) leaves part of a line: cut it off so the next
            // line starts on a line boundary and the chain stays whole.
            if let Err(undo) = session.file.set_len(session.bytes) {
                session.state.failed.store(true, Relaxed);
                error!(session = %session.id, %err, %undo, "session write failed and could not be undone; recording of this session stops");
                // Later appends find the session failed and count themselves dropped.
                session.failed = true;
            } else {
                warn!(session = %session.id, %err, "session write failed; record dropped");
            }
            false
        }
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// A new session file, readable by the agent only: recordings are masked, but still
/// say who did what.
fn create_session_file(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// `id` with every character a file name should not have replaced by `_`.
fn file_safe_id(id: &str) -> String {
    if valid_id(id) {
        return id.to_owned();
    }
    let mut safe: String = id
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() || safe.starts_with('.') {
        safe.insert(0, 's');
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_file_names() {
        assert_eq!(file_safe_id("18c0f09a-12"), "18c0f09a-12");
        assert_eq!(file_safe_id("../etc/passwd"), "s.._etc_passwd");
        assert_eq!(file_safe_id(""), "s");
        assert!(valid_id(&file_safe_id("a b/c")));
    }

    #[test]
    fn status_complete_means_nothing_lost() {
        let mut s = SessionStatus::default();
        assert!(s.complete());
        s.dropped = 1;
        assert!(!s.complete());
    }
}
