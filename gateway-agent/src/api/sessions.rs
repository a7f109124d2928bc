//! The recorded-sessions endpoints (DESIGN §7): list, show (with the hash chain's
//! verdict) and the records themselves.
//!
//! Sessions are files read with blocking I/O ([`Sessions`]), so every read runs in
//! `spawn_blocking`. A session's records can be many megabytes: they are streamed from
//! a blocking reader through a small bounded channel, so an answer holds a few chunks
//! and the largest single record in memory, whatever the session's size; a client that
//! stops reading holds its reader only until [`Limits::stream_stall_timeout`], and
//! [`Limits::max_record_streams`] bounds how many readers run at once.
//!
//! Authorization is SubjectAccessReview on `sessions.tollgate.dev` ([`SESSIONS`]) in the
//! namespace of the recorded pod, read from the session's header before anything else
//! is: `list` for the list (cluster-wide, or namespace by namespace as for approvals),
//! `get` for one session and its records. A session whose header cannot be read has no
//! namespace, so only cluster-wide readers see it.
//!
//! [`Limits::stream_stall_timeout`]: super::Limits::stream_stall_timeout
//! [`Limits::max_record_streams`]: super::Limits::max_record_streams

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::auth::Caller;
use super::authz::{self, SESSIONS};
use super::{json_response, ApiError, ApiState, Body, BodyError};
use crate::recording::format::Header;
use crate::recording::{RecordingError, SessionSummary, Sessions, VerifyReport};

/// Records are sent in chunks of about this many bytes (one record more at most).
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks queued between the reader and the client.
const QUEUED_CHUNKS: usize = 4;

/// A session header is small; a first line longer than this is not one.
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Longest value of `?namespace=` and `?pod=` (a DNS subdomain).
const MAX_NAME_CHARS: usize = 253;

/// `?namespace=`, `?pod=` of `GET /sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only sessions of pods in this namespace.
    pub namespace: Option<String>,
    /// Only sessions of pods with this name.
    pub pod: Option<String>,
}

impl ListQuery {
    /// Strict, as for approvals: an unknown parameter, a repeated one or a value that
    /// is not a Kubernetes name is a 400. Valid names never need percent-encoding, so
    /// nothing is decoded.
    pub fn parse(query: Option<&str>) -> Result<ListQuery, ApiError> {
        let mut parsed = ListQuery::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "namespace" => &mut parsed.namespace,
                "pod" => &mut parsed.pod,
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {key:?}; accepted: namespace, pod"
                    )))
                }
            };
            if slot.is_some() {
                return Err(ApiError::BadRequest(format!("{key} is given twice")));
            }
            if !is_name(value) {
                return Err(ApiError::BadRequest(format!(
                    "{key}={value:?}: expected a Kubernetes name (lower-case letters, \
                     digits, '-' and '.')"
                )));
            }
            *slot = Some(value.to_owned());
        }
        Ok(parsed)
    }

    fn matches(&self, summary: &SessionSummary) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == summary.pod.namespace)
            && self.pod.as_ref().is_none_or(|pod| *pod == summary.pod.name)
    }
}

/// A namespace (DNS label) or pod name (DNS subdomain), loosely: non-empty, at most 253
/// of `[a-z0-9.-]`.
fn is_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME_CHARS
        && value
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
}

/// Refuses any query: the routes that take none say so rather than ignore a typo.
fn no_query(query: Option<&str>) -> Result<(), ApiError> {
    match query.filter(|q| !q.is_empty()) {
        None => Ok(()),
        Some(q) => Err(ApiError::BadRequest(format!(
            "this route takes no query parameters (got {q:?})"
        ))),
    }
}

/// `GET /sessions`: the summaries of the sessions the caller may list, newest first.
pub async fn list(
    state: &ApiState,
    caller: &Caller,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let query = ListQuery::parse(query)?;
    let sessions = recorded(state)?;
    // Asked for one namespace: one review there (a ClusterRoleBinding answers yes in
    // every namespace), and an empty list is an answer, not a 403.
    if let Some(namespace) = &query.namespace {
        authz::authorize(state, caller, SESSIONS, "list", namespace, "").await?;
    }
    let mut items = blocking(move || {
        // Nothing recorded yet (the recorder makes the directory): an empty list.
        if !sessions.dir().is_dir() {
            return Ok(Vec::new());
        }
        sessions.list()
    })
    .await?;
    items.retain(|s| query.matches(s));
    if query.namespace.is_none() {
        let scope = authz::scope(
            state,
            caller,
            SESSIONS,
            "list",
            items.iter().map(|s| s.pod.namespace.clone()),
        )
        .await?;
        items.retain(|s| scope.includes(&s.pod.namespace));
    }
    // `list` is oldest first.
    items.reverse();
    let items: Vec<Value> = items.iter().map(summary_json).collect();
    let body = serde_json::json!({ "kind": "SessionList", "items": items });
    Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
}

/// `GET /sessions/{id}`: the header, the summary, every exchange and stream in brief,
/// and the hash chain's verdict naming the first bad record.
pub async fn get(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    no_query(query)?;
    let sessions = find(state, caller, id).await?;
    let id = id.to_owned();
    let (detail, report) = blocking(move || {
        let report = sessions.verify(&id)?;
        let detail = match sessions.show(&id) {
            Ok(detail) => Ok(detail),
            // A header that cannot be read at all: the verdict says where and why.
            Err(RecordingError::Malformed { why, .. }) => Err(why),
            Err(other) => return Err(other),
        };
        Ok((detail, report))
    })
    .await?;
    let mut body = match detail {
        Ok(detail) => serde_json::to_value(&detail).unwrap_or_default(),
        Err(why) => serde_json::json!({ "unreadable": why }),
    };
    if let Some(object) = body.as_object_mut() {
        if let Some(summary) = object.get_mut("summary").and_then(Value::as_object_mut) {
            summary.remove("file");
        }
        object.insert("kind".into(), "Session".into());
        object.insert("id".into(), report.session.clone().into());
        object.insert("verify".into(), verify_json(&report));
    }
    Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
}

/// `GET /sessions/{id}/records`: every record in file order (the header and a tail cut
/// short by a crash left out), as the recorder wrote them; a JSON array, or one record
/// per line with `Accept: application/x-ndjson`. Streamed.
pub async fn records(
    state: &Arc<ApiState>,
    caller: &Caller,
    id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    no_query(query)?;
    let format = RecordsFormat::negotiate(headers)?;
    let sessions = find(state, caller, id).await?;
    let slot = StreamSlot::acquire(state)?;
    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    let writer = ChunkWriter {
        tx,
        runtime: tokio::runtime::Handle::current(),
        stall: state.limits.stream_stall_timeout,
        format,
        buffer: Vec::with_capacity(CHUNK_BYTES),
        records: 0,
        bytes: 0,
        stopped: None,
    };
    let id = id.to_owned();
    let span = tracing::Span::current();
    // Not awaited: the reader runs while hyper sends what it produces.
    drop(tokio::task::spawn_blocking(move || {
        span.in_scope(|| {
            let _slot = slot;
            stream_records(&sessions, &id, writer);
        })
    }));
    let mut response = Response::new(RecordStream { rx, done: false }.boxed());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(VARY, HeaderValue::from_static("Accept"));
    Ok(response)
}

/// The sessions, or 404 when this agent does not record.
fn recorded(state: &ApiState) -> Result<Sessions, ApiError> {
    state.sessions.clone().ok_or(ApiError::RecordingDisabled)
}

/// Finds session `id` and checks `get` on it in its pod's namespace. A missing one is a
/// 404 only for a caller who could have read it anywhere; others get the 403 they
/// would get for an existing one, so ids cannot be probed.
async fn find(state: &ApiState, caller: &Caller, id: &str) -> Result<Sessions, ApiError> {
    let sessions = recorded(state)?;
    let lookup = {
        let (sessions, id) = (sessions.clone(), id.to_owned());
        blocking(move || pod_namespace(&sessions, &id)).await
    };
    match lookup {
        Ok(namespace) => {
            authz::authorize(state, caller, SESSIONS, "get", &namespace, id).await?;
            Ok(sessions)
        }
        Err(ApiError::SessionNotFound(_)) => {
            authz::authorize(state, caller, SESSIONS, "get", "", id).await?;
            Err(ApiError::SessionNotFound(id.to_owned()))
        }
        Err(other) => Err(other),
    }
}

/// The recorded pod's namespace, from the session's header line; empty when the header
/// cannot be read.
fn pod_namespace(sessions: &Sessions, id: &str) -> Result<String, RecordingError> {
    if !sessions.dir().is_dir() {
        return Err(RecordingError::NotFound(id.to_owned()));
    }
    let path = sessions.find(id)?;
    let io = |error| RecordingError::Io {
        path: path.clone(),
        error,
    };
    let file = File::open(&path).map_err(io)?;
    let mut line = Vec::new();
    BufReader::new(file.take(MAX_HEADER_BYTES))
        .read_until(b'\n', &mut line)
        .map_err(io)?;
    if line.pop() != Some(b'\n') {
        return Ok(String::new());
    }
    Ok(serde_json::from_slice::<Header>(&line)
        .map(|header| header.pod.namespace)
        .unwrap_or_default())
}

/// Runs a blocking session read off the async threads, in the request's span.
async fn blocking<T, F>(read: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RecordingError> + Send + 'static,
{
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(read)).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(err) => Err(ApiError::Internal(format!("session reader failed: {err}"))),
    }
}

/// A summary as the API shows it: without the file's path on the node.
fn summary_json(summary: &SessionSummary) -> Value {
    let mut value = serde_json::to_value(summary).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.remove("file");
    }
    value
}

/// A verify report as the API shows it: without the file's path on the node.
fn verify_json(report: &VerifyReport) -> Value {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.remove("file");
    }
    value
}

/// How the records are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordsFormat {
    /// One JSON array (`application/json`, the default).
    JsonArray,
    /// One record per line (`application/x-ndjson`).
    Ndjson,
}

impl RecordsFormat {
    const JSON: &'static str = "application/json";
    const NDJSON: &'static str = "application/x-ndjson";

    /// From the `Accept` header: NDJSON when the client ranks it above JSON, or names
    /// it and not JSON; JSON otherwise (also with no `Accept`, or `*/*`); 406 when it
    /// accepts neither.
    pub fn negotiate(headers: &HeaderMap) -> Result<RecordsFormat, ApiError> {
        let mut ranges: Vec<(String, f32)> = Vec::new();
        for value in headers.get_all(ACCEPT) {
            let text = value
                .to_str()
                .map_err(|_| ApiError::BadRequest("Accept is not ASCII".to_owned()))?;
            for range in text.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let mut parts = range.split(';');
                let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .next_back()
                    .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok())
                    .filter(|q| (0.0..=1.0).contains(q))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("Accept: bad quality in {range:?}"))
                    })?;
                ranges.push((essence, q));
            }
        }
        if ranges.is_empty() {
            return Ok(RecordsFormat::JsonArray);
        }
        // The most specific range that matches decides (RFC 9110 §12.5.1).
        let quality = |media: &str| -> (f32, bool) {
            let exact = ranges.iter().find(|(r, _)| r == media);
            let wild = ranges.iter().find(|(r, _)| r == "application/*");
            let any = ranges.iter().find(|(r, _)| r == "*/*");
            match exact.or(wild).or(any) {
                Some((_, q)) => (*q, exact.is_some()),
                None => (0.0, false),
            }
        };
        let (json, json_named) = quality(Self::JSON);
        let (ndjson, ndjson_named) = quality(Self::NDJSON);
        // NDJSON only when asked for by name, and not ranked below JSON (on a tie, JSON
        // named as well wins: it is the default).
        let prefer_ndjson = ndjson > json || (ndjson == json && !json_named);
        if ndjson_named && ndjson > 0.0 && prefer_ndjson {
            return Ok(RecordsFormat::Ndjson);
        }
        if json > 0.0 {
            return Ok(RecordsFormat::JsonArray);
        }
        let asked = headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        Err(ApiError::NotAcceptable(asked))
    }

    fn content_type(self) -> &'static str {
        match self {
            RecordsFormat::JsonArray => Self::JSON,
            RecordsFormat::Ndjson => Self::NDJSON,
        }
    }
}

/// A place among the [`Limits::max_record_streams`](super::Limits::max_record_streams),
/// given back however the reader ends.
struct StreamSlot(Arc<ApiState>);

impl StreamSlot {
    fn acquire(state: &Arc<ApiState>) -> Result<StreamSlot, ApiError> {
        let max = state.limits.max_record_streams;
        state
            .record_streams
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| ApiError::TooManyStreams(max))?;
        Ok(StreamSlot(state.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.record_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why the reader stopped sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The client went away.
    ClientGone,
    /// The client did not take a chunk within the stall timeout.
    Stalled,
}

/// What the reader hands the response body.
enum Piece {
    Data(Bytes),
    /// Everything was sent. A channel that closes without it was cut short.
    Done,
}

/// Serialises records into chunks and hands them to the response body, blocking (on
/// the reader's own thread) while the client is slow.
struct ChunkWriter {
    tx: mpsc::Sender<Piece>,
    runtime: tokio::runtime::Handle,
    stall: Duration,
    format: RecordsFormat,
    buffer: Vec<u8>,
    records: u64,
    bytes: u64,
    stopped: Option<Stopped>,
}

impl ChunkWriter {
    /// One record as the file holds it: clients can re-hash what they are sent.
    fn record(&mut self, line: &[u8]) {
        if self.stopped.is_some() {
            return;
        }
        match self.format {
            RecordsFormat::JsonArray => {
                self.buffer
                    .extend_from_slice(if self.records == 0 { b"[\n" } else { b",\n" });
            }
            RecordsFormat::Ndjson => {}
        }
        self.buffer
            .extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
        if self.format == RecordsFormat::Ndjson {
            self.buffer.push(b'\n');
        }
        self.records += 1;
        if self.buffer.len() >= CHUNK_BYTES {
            self.flush();
        }
    }

    /// Ends the answer: the array's end, whatever is buffered, and the mark that
    /// nothing is missing.
    fn finish(&mut self) {
        if self.format == RecordsFormat::JsonArray {
            let end: &[u8] = if self.records == 0 { b"[]\n" } else { b"\n]\n" };
            self.buffer.extend_from_slice(end);
        }
        self.flush();
        if self.stopped.is_none() {
            self.send(Piece::Done);
        }
    }

    fn flush(&mut self) {
        if self.buffer.is_empty() || self.stopped.is_some() {
            return;
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        let len = chunk.len() as u64;
        if self.send(Piece::Data(chunk)) {
            self.bytes += len;
        }
    }

    /// Sends one piece, waiting at most the stall timeout; false when it did not go.
    fn send(&mut self, item: Piece) -> bool {
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(self.stall, self.tx.send(item)));
        match sent {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                self.stopped = Some(Stopped::ClientGone);
                false
            }
            Err(_) => {
                self.stopped = Some(Stopped::Stalled);
                false
            }
        }
    }
}

/// Reads session `id` record by record into `writer` (on a blocking thread), and logs
/// who read how much. Without [`Piece::Done`] the client sees the answer cut short.
fn stream_records(sessions: &Sessions, id: &str, mut writer: ChunkWriter) {
    let read = sessions.for_each_record_line(id, |line| writer.record(line));
    if let Err(err) = read {
        warn!(session = %id, %err, records = writer.records, "reading session records failed; answer cut short");
        return;
    }
    writer.finish();
    match writer.stopped {
        None => info!(
            session = %id,
            records = writer.records,
            bytes = writer.bytes,
            format = writer.format.content_type(),
            "session records read"
        ),
        Some(Stopped::ClientGone) => info!(
            session = %id,
            bytes = writer.bytes,
            "session records: the client went away before the end"
        ),
        Some(Stopped::Stalled) => warn!(
            session = %id,
            bytes = writer.bytes,
            stall_s = writer.stall.as_secs(),
            "session records: the client stopped reading; answer cut short"
        ),
    }
}

/// The body of a records answer: what the reader sends, until [`Piece::Done`] (the
/// end) or until the reader drops its sender without it (an error: cut short). Hyper
/// drops it when the client goes away, which the reader notices at its next send.
struct RecordStream {
    rx: mpsc::Receiver<Piece>,
    done: bool,
}

impl hyper::body::Body for RecordStream {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Piece::Data(chunk))) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(Some(Piece::Done)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(BodyError(
                    "the session reader stopped before the end; see the agent's log".to_owned(),
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries() {
        assert_eq!(ListQuery::parse(None).unwrap(), ListQuery::default());
        let q = ListQuery::parse(Some("namespace=team-a&pod=coder-0")).unwrap();
        assert_eq!(q.namespace.as_deref(), Some("team-a"));
        assert_eq!(q.pod.as_deref(), Some("coder-0"));
        for bad in [
            "ns=team",
            "namespace=",
            "namespace",
            "namespace=Team",
            "namespace=a%2fb",
            "namespace=a/b",
            "namespace=a&namespace=b",
            "pod=a b",
            "pod=..%2f",
        ] {
            assert!(
                matches!(ListQuery::parse(Some(bad)), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
        let long = format!("pod={}", "a".repeat(MAX_NAME_CHARS + 1));
        assert!(ListQuery::parse(Some(&long)).is_err());
    }

    #[test]
    fn routes_without_parameters_refuse_them() {
        assert!(no_query(None).is_ok());
        assert!(no_query(Some("")).is_ok());
        assert!(matches!(
            no_query(Some("limit=5")),
            Err(ApiError::BadRequest(_))
        ));
    }

    fn accept(values: &[&str]) -> Result<RecordsFormat, ApiError> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        RecordsFormat::negotiate(&headers)
    }

    #[test]
    fn records_format_follows_accept() {
        use RecordsFormat::*;
        for (values, want) in [
            (&[][..], JsonArray),
            (&["*/*"][..], JsonArray),
            (&["application/json"][..], JsonArray),
            (&["application/*"][..], JsonArray),
            (&["application/x-ndjson"][..], Ndjson),
            (&["Application/X-NDJSON; charset=utf-8"][..], Ndjson),
            (&["application/x-ndjson, */*;q=0.1"][..], Ndjson),
            (
                &["application/json;q=0.5, application/x-ndjson"][..],
                Ndjson,
            ),
            (&["application/json, application/x-ndjson"][..], JsonArray),
            (
                &["application/x-ndjson;q=0.5, application/json"][..],
                JsonArray,
            ),
            (&["application/x-ndjson;q=0, */*"][..], JsonArray),
            (&["text/plain", "application/x-ndjson"][..], Ndjson),
        ] {
            assert_eq!(accept(values).unwrap(), want, "{values:?}");
        }
        assert!(matches!(
            accept(&["text/html"]),
            Err(ApiError::NotAcceptable(_))
        ));
        assert!(matches!(
            accept(&["application/json;q=0"]),
            Err(ApiError::NotAcceptable(_))
        ));
        assert!(matches!(
            accept(&["application/json;q=2"]),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            accept(&["application/json;q=x"]),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn names() {
        assert!(is_name("kube-system"));
        assert!(is_name("coder-0.x"));
        for bad in ["", "A", "a_b", "a/b", "a%2f", "é"] {
            assert!(!is_name(bad), "{bad:?}");
        }
    }
}
