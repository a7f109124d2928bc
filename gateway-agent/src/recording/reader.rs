//! Reading sessions from a directory (on the node, or a copy of it): list, show,
//! records, verify, export. Replay is in [`super::replay`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use super::exchange::{Decision, Exchange, UserInfo};
use super::format::{
    End, Frame, Header, Kind, PodRef, SessionTruncated, StreamEnd, StreamStart, Timestamp,
};
use super::verify::{for_each_line, verify_file, VerifyReport};
use super::{valid_id, RecordingError};

/// A directory of recorded sessions.
#[derive(Clone, Debug)]
pub struct Sessions {
    dir: PathBuf,
}

/// How a session file ends, as far as a quick look tells (see `verify` for certainty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FileState {
    /// It has its `end` record.
    Closed,
    /// No `end` record: still being written, or the agent was stopped hard.
    Open,
    /// The header cannot be read.
    Unreadable,
}

/// One line of `sessions list`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    pub id: String,
    pub file: PathBuf,
    pub node: String,
    pub pod: PodRef,
    pub peer: String,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    /// Records in the file (`end` not counted).
    pub records: u64,
    pub bytes: u64,
    pub state: FileState,
    /// Closed, and nothing omitted (size cap) or dropped (writer behind, disk errors).
    pub complete: bool,
}

/// One exchange, in brief.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSummary {
    pub seq: u64,
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub at: Timestamp,
    pub duration_ms: i64,
    pub user: UserInfo,
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub code: Option<u16>,
    pub decision: Decision,
    #[serde(rename = "approvalID", skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
}

/// One exec/attach stream, in brief.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSummary {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub protocol: String,
    pub decoded: bool,
    pub started_at: Timestamp,
    pub frames: u64,
    pub bytes: u64,
    /// Milliseconds from start to the last frame (or to `streamEnd`).
    pub duration_ms: u64,
    pub truncated: bool,
    pub ended: bool,
}

/// `sessions show`: the header and a summary of what happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionDetail {
    pub summary: SessionSummary,
    pub header: Header,
    pub exchanges: Vec<ExchangeSummary>,
    pub streams: Vec<StreamSummary>,
    pub truncated: Option<SessionTruncated>,
    pub end: Option<End>,
    /// Complete lines that do not parse (see `verify`).
    pub unreadable_lines: u64,
    /// The last line is cut short.
    pub incomplete_tail: bool,
}

/// One record as stored: its `seq`, `kind` and the whole line as JSON. Serialises as
/// the line.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub kind: Kind,
    pub value: Value,
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl Record {
    /// The record as `T` (members it does not know are ignored).
    pub fn parse<T: DeserializeOwned>(&self) -> Option<T> {
        T::deserialize(&self.value).ok()
    }

    /// The exchange, bodies included, when this is one.
    pub fn exchange(&self) -> Option<Exchange> {
        if self.kind != Kind::Exchange {
            return None;
        }
        let mut exchange = Exchange::deserialize(&self.value).ok()?;
        exchange.read_bodies(self.value.as_object()?);
        Some(exchange)
    }

    /// The frame, when this is one.
    pub fn frame(&self) -> Option<Frame> {
        (self.kind == Kind::Frame).then(|| self.parse()).flatten()
    }
}

/// How `export` writes a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The file as it is, byte for byte (verifiable elsewhere).
    Raw,
    /// One JSON array: the header, then every record (an incomplete tail left out).
    JsonArray,
}

impl Sessions {
    /// Sessions under `dir` (`<dir>/<day>/<id>.jsonl`; files directly in `dir` too, for
    /// a copied session).
    pub fn open(dir: impl Into<PathBuf>) -> Sessions {
        Sessions { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every session, oldest first.
    pub fn list(&self) -> Result<Vec<SessionSummary>, RecordingError> {
        let mut out = Vec::new();
        for path in self.files()? {
            out.push(summarize(&path)?);
        }
        out.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(out)
    }

    /// The file of session `id`.
    pub fn find(&self, id: &str) -> Result<PathBuf, RecordingError> {
        if !valid_id(id) {
            return Err(RecordingError::InvalidId(id.to_owned()));
        }
        let name = format!("{id}.jsonl");
        let top = self.dir.join(&name);
        if top.is_file() {
            return Ok(top);
        }
        for day in self.days()? {
            let path = day.join(&name);
            if path.is_file() {
                return Ok(path);
            }
        }
        Err(RecordingError::NotFound(id.to_owned()))
    }

    /// The header and a summary of every exchange and stream.
    pub fn show(&self, id: &str) -> Result<SessionDetail, RecordingError> {
        let path = self.find(id)?;
        let summary = summarize(&path)?;
        let mut header = None;
        let mut exchanges = Vec::new();
        let mut streams: Vec<StreamSummary> = Vec::new();
        let mut truncated = None;
        let mut end = None;
        let mut unreadable_lines = 0;
        let mut incomplete_tail = false;
        read_lines(&path, |index, line, complete| {
            if !complete {
                incomplete_tail = true;
                return;
            }
            if index == 0 {
                header = serde_json::from_slice::<Header>(line).ok();
                return;
            }
            let Some(record) = parse_record(line) else {
                unreadable_lines += 1;
                return;
            };
            match record.kind {
                Kind::Exchange => match record.exchange() {
                    Some(ex) => exchanges.push(ExchangeSummary {
                        seq: record.seq,
                        duration_ms: ((ex.stage_timestamp.0 - ex.request_received_timestamp.0)
                            .whole_milliseconds())
                        .clamp(0, i128::from(i64::MAX)) as i64,
                        at: ex.request_received_timestamp,
                        audit_id: ex.audit_id,
                        user: ex.user,
                        verb: ex.verb,
                        request_uri: ex.request_uri,
                        code: ex.response_status.map(|s| s.code),
                        decision: ex.decision,
                        approval_id: ex.approval_id,
                    }),
                    None => unreadable_lines += 1,
                },
                Kind::StreamStart => {
                    if let Some(start) = record.parse::<StreamStart>() {
                        streams.push(StreamSummary {
                            audit_id: start.audit_id,
                            protocol: start.protocol,
                            decoded: start.decoded,
                            started_at: start.started_at,
                            frames: 0,
                            bytes: 0,
                            duration_ms: 0,
                            truncated: false,
                            ended: false,
                        });
                    }
                }
                Kind::Frame => {
                    if let Some(frame) = record.frame() {
                        if let Some(s) = streams
                            .iter_mut()
                            .rev()
                            .find(|s| s.audit_id == frame.audit_id)
                        {
                            s.frames += 1;
                            s.bytes += frame.bytes().map_or(0, |b| b.len() as u64);
                            s.duration_ms = s.duration_ms.max(frame.t);
                        }
                    }
                }
                Kind::StreamTruncated => {
                    let audit_id = record.value["auditID"].as_str().unwrap_or_default();
                    if let Some(s) = streams.iter_mut().rev().find(|s| s.audit_id == audit_id) {
                        s.truncated = true;
                    }
                }
                Kind::StreamEnd => {
                    if let Some(e) = record.parse::<StreamEnd>() {
                        if let Some(s) = streams.iter_mut().rev().find(|s| s.audit_id == e.audit_id)
                        {
                            s.ended = true;
                            s.duration_ms = s.duration_ms.max(e.t);
                        }
                    }
                }
                Kind::SessionTruncated => truncated = record.parse(),
                Kind::End => end = record.parse(),
                Kind::Header => unreadable_lines += 1,
            }
        })?;
        let header = header.ok_or_else(|| RecordingError::Malformed {
            path: path.clone(),
            line: 1,
            why: "no readable session header".into(),
        })?;
        Ok(SessionDetail {
            summary,
            header,
            exchanges,
            streams,
            truncated,
            end,
            unreadable_lines,
            incomplete_tail,
        })
    }

    /// Every record of session `id` in file order (the header and an incomplete tail
    /// left out; lines that do not parse are skipped: `verify` names them).
    pub fn records(&self, id: &str) -> Result<Vec<Record>, RecordingError> {
        let mut out = Vec::new();
        self.for_each_record(id, |record| out.push(record))?;
        Ok(out)
    }

    /// [`Sessions::records`] without holding them all.
    pub fn for_each_record(
        &self,
        id: &str,
        mut f: impl FnMut(Record),
    ) -> Result<(), RecordingError> {
        let path = self.find(id)?;
        read_lines(&path, |index, line, complete| {
            if index > 0 && complete {
                if let Some(record) = parse_record(line) {
                    f(record);
                }
            }
        })
    }

    /// Every record line of session `id` as the file holds it, byte for byte (what the
    /// hash chain covers; the header, an incomplete tail and lines that do not parse
    /// left out, as in [`Sessions::records`]).
    pub fn for_each_record_line(
        &self,
        id: &str,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), RecordingError> {
        let path = self.find(id)?;
        read_lines(&path, |index, line, complete| {
            if index > 0 && complete && parse_record(line).is_some() {
                f(line);
            }
        })
    }

    /// Checks session `id`'s hash chain.
    pub fn verify(&self, id: &str) -> Result<VerifyReport, RecordingError> {
        let path = self.find(id)?;
        verify_file(&path, id)
    }

    /// Checks every session, oldest first.
    pub fn verify_all(&self) -> Result<Vec<VerifyReport>, RecordingError> {
        let mut reports = Vec::new();
        for summary in self.list()? {
            reports.push(verify_file(&summary.file, &summary.id)?);
        }
        Ok(reports)
    }

    /// Writes session `id` to `out`.
    pub fn export(
        &self,
        id: &str,
        format: ExportFormat,
        out: &mut impl Write,
    ) -> Result<(), RecordingError> {
        let path = self.find(id)?;
        match format {
            ExportFormat::Raw => {
                let mut file = File::open(&path).map_err(|error| io_error(&path, error))?;
                std::io::copy(&mut file, out).map_err(RecordingError::Output)?;
            }
            ExportFormat::JsonArray => {
                let mut result = out.write_all(b"[");
                read_lines(&path, |index, line, complete| {
                    if complete && result.is_ok() {
                        let sep: &[u8] = if index == 0 { b"\n" } else { b",\n" };
                        result = out.write_all(sep).and_then(|()| out.write_all(line));
                    }
                })?;
                result
                    .and_then(|()| out.write_all(b"\n]\n"))
                    .map_err(RecordingError::Output)?;
            }
        }
        out.flush().map_err(RecordingError::Output)
    }

    /// Session files: `<dir>/*.jsonl` and `<dir>/<day>/*.jsonl`.
    pub(crate) fn files(&self) -> Result<Vec<PathBuf>, RecordingError> {
        let mut out = jsonl_in(&self.dir)?;
        for day in self.days()? {
            out.extend(jsonl_in(&day)?);
        }
        Ok(out)
    }

    fn days(&self) -> Result<Vec<PathBuf>, RecordingError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|error| io_error(&self.dir, error))?;
        let mut days: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        days.sort();
        Ok(days)
    }
}

fn jsonl_in(dir: &Path) -> Result<Vec<PathBuf>, RecordingError> {
    let entries = std::fs::read_dir(dir).map_err(|error| io_error(dir, error))?;
    Ok(entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect())
}

fn io_error(path: &Path, error: std::io::Error) -> RecordingError {
    RecordingError::Io {
        path: path.to_owned(),
        error,
    }
}

fn read_lines(path: &Path, f: impl FnMut(usize, &[u8], bool)) -> Result<(), RecordingError> {
    for_each_line(path, f).map_err(|error| io_error(path, error))
}

fn parse_record(line: &[u8]) -> Option<Record> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let seq = value.get("seq")?.as_u64()?;
    let kind = Kind::deserialize(value.get("kind")?).ok()?;
    Some(Record { seq, kind, value })
}

/// A quick look at a session file: the header and the last line (an `end` record
/// gives the counts; without one, lines are counted).
fn summarize(path: &Path) -> Result<SessionSummary, RecordingError> {
    let id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut file = File::open(path).map_err(|error| io_error(path, error))?;
    let bytes = file
        .metadata()
        .map_err(|error| io_error(path, error))?
        .len();
    let header = first_line(&mut file)
        .ok()
        .and_then(|line| serde_json::from_slice::<Header>(&line).ok());
    let Some(header) = header else {
        return Ok(SessionSummary {
            id,
            file: path.to_owned(),
            node: String::new(),
            pod: PodRef::default(),
            peer: String::new(),
            started_at: None,
            ended_at: None,
            records: 0,
            bytes,
            state: FileState::Unreadable,
            complete: false,
        });
    };
    let end = last_line(&mut file, bytes)
        .ok()
        .flatten()
        .and_then(|line| parse_record(&line))
        .filter(|r| r.kind == Kind::End)
        .and_then(|r| r.parse::<End>());
    let (records, state) = match &end {
        Some(end) => (end.records, FileState::Closed),
        None => {
            let lines = count_lines(path)?;
            (lines.saturating_sub(1), FileState::Open)
        }
    };
    Ok(SessionSummary {
        id,
        file: path.to_owned(),
        node: header.node,
        pod: header.pod,
        peer: header.peer,
        started_at: Some(header.started_at),
        ended_at: end.as_ref().map(|e| e.ended_at),
        records,
        bytes,
        state,
        complete: end
            .as_ref()
            .is_some_and(|e| e.omitted == 0 && e.dropped == 0),
    })
}

/// The header line (a header is small; more than 1 MiB is not one).
fn first_line(file: &mut File) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.take(1 << 20).read_to_end(&mut buf)?;
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            buf.truncate(end);
            Ok(buf)
        }
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no complete first line",
        )),
    }
}

/// The last complete line, when it is short enough to be an `end` record.
fn last_line(file: &mut File, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    const TAIL: u64 = 8 * 1024;
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    if buf.last() != Some(&b'\n') {
        return Ok(None);
    }
    buf.pop();
    let from = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    if from == 0 && start > 0 {
        return Ok(None);
    }
    Ok(Some(buf[from..].to_vec()))
}

fn count_lines(path: &Path) -> Result<u64, RecordingError> {
    let mut file = File::open(path).map_err(|error| io_error(path, error))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|error| io_error(path, error))?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}
