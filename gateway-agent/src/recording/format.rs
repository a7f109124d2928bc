//! The on-disk format: record kinds, the records other than exchanges, timestamps, and
//! the hash that seals every line (the format itself is described in [`super`]).
//!
//! Lines are assembled by hand rather than by serialising one struct, so that the
//! bytes a hash covers are exactly the bytes on disk: `verify` never re-serialises
//! anything, and does not depend on key order or number formatting.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, UtcOffset};

/// The `format` a session header names; a reader refuses any other.
pub const FORMAT: &str = "tollgate.dev/session/v1";

/// How every sealed line ends: `,"hash":"` + 64 hex digits + `"}`.
const HASH_KEY: &[u8] = br#","hash":""#;
const SEAL_LEN: usize = HASH_KEY.len() + 64 + 2;

/// What a line is (its `kind` member).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// The first line: who the session belongs to. Not numbered.
    Header,
    /// One HTTP exchange, modelled on an audit event.
    Exchange,
    /// An exec/attach/port-forward stream began.
    StreamStart,
    /// A timed chunk of a stream.
    Frame,
    /// A stream reached its byte cap; later frames are counted, not stored.
    StreamTruncated,
    /// A stream ended.
    StreamEnd,
    /// The session reached its byte cap; later records are counted, not stored.
    SessionTruncated,
    /// The session was closed cleanly; nothing may follow.
    End,
}

impl Kind {
    /// The name written in the `kind` member.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::Exchange => "exchange",
            Kind::StreamStart => "streamStart",
            Kind::Frame => "frame",
            Kind::StreamTruncated => "streamTruncated",
            Kind::StreamEnd => "streamEnd",
            Kind::SessionTruncated => "sessionTruncated",
            Kind::End => "end",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point in time, written as RFC 3339 in UTC with microseconds (as the API server's
/// audit events are), e.g. `2026-01-02T03:04:05.123456Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub OffsetDateTime);

impl Timestamp {
    /// Now, from the system clock.
    pub fn now() -> Self {
        Timestamp(OffsetDateTime::now_utc())
    }

    /// Parses the RFC 3339 form (any offset).
    pub fn parse(text: &str) -> Option<Self> {
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(Timestamp)
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> i128 {
        self.0.unix_timestamp_nanos() / 1_000_000
    }

    /// The UTC day, `yyyy-mm-dd`: the directory a session started on is filed under.
    pub fn day(&self) -> String {
        let t = self.0.to_offset(UtcOffset::UTC);
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    }
}

impl Default for Timestamp {
    fn default() -> Self {
        Timestamp(OffsetDateTime::UNIX_EPOCH)
    }
}

impl From<OffsetDateTime> for Timestamp {
    fn from(t: OffsetDateTime) -> Self {
        Timestamp(t)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp(OffsetDateTime::from(t))
    }
}

impl fmt::Display for Timestamp {
    // Written by hand: a fixed six-digit fraction, so that every timestamp in a file
    // has the same width and sorts as text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.to_offset(UtcOffset::UTC);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {text:?}")))
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// `{"kind":"header", <fields>}`: the header's object before sealing.
pub(crate) fn header_object(fields: &[u8]) -> Vec<u8> {
    let prefix = format!(r#"{{"kind":"{}""#, Kind::Header);
    join_object(prefix.into_bytes(), fields)
}

/// `{"seq":N,"prevHash":"…","kind":"…", <fields>}`: a record's object before sealing.
/// The chain members come first so that a reader sees them without parsing the rest.
pub(crate) fn record_object(seq: u64, prev_hash: &str, kind: Kind, fields: &[u8]) -> Vec<u8> {
    let prefix = format!(r#"{{"seq":{seq},"prevHash":"{prev_hash}","kind":"{kind}""#);
    join_object(prefix.into_bytes(), fields)
}

/// `prefix` (an object's opening without its `}`) followed by the members of the
/// object `fields`, closed.
fn join_object(mut out: Vec<u8>, fields: &[u8]) -> Vec<u8> {
    let inner = fields
        .trim_ascii()
        .strip_prefix(b"{")
        .and_then(|f| f.strip_suffix(b"}"))
        .unwrap_or_default()
        .trim_ascii();
    out.reserve(inner.len() + 2 + SEAL_LEN + 1);
    if !inner.is_empty() {
        out.push(b',');
        out.extend_from_slice(inner);
    }
    out.push(b'}');
    out
}

/// Seals an object's text: the hash of the object as it stands becomes its last
/// member, `"hash"`, and the line gets its newline. Returns the line and the hash.
///
/// The object must have at least one member (ours always have `kind`), so that the
/// hash member follows a comma.
pub(crate) fn seal(mut object: Vec<u8>) -> (Vec<u8>, String) {
    debug_assert!(object.ends_with(b"}") && object.len() > 2);
    let hash = sha256_hex(&object);
    object.pop();
    object.extend_from_slice(HASH_KEY);
    object.extend_from_slice(hash.as_bytes());
    object.extend_from_slice(b"\"}\n");
    (object, hash)
}

/// A sealed line's stated hash and the hash of its content (the line with the hash
/// member removed), or `None` when the line does not end the way [`seal`] ends lines.
/// `line` excludes the newline.
pub(crate) fn unseal(line: &[u8]) -> Option<(&str, String)> {
    if line.len() < SEAL_LEN + 2 || !line.starts_with(b"{") || !line.ends_with(b"\"}") {
        return None;
    }
    let cut = line.len() - SEAL_LEN;
    if &line[cut..cut + HASH_KEY.len()] != HASH_KEY {
        return None;
    }
    let stated = &line[cut + HASH_KEY.len()..line.len() - 2];
    if !stated
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    let stated = std::str::from_utf8(stated).ok()?;
    let mut hasher = Sha256::new();
    hasher.update(&line[..cut]);
    hasher.update(b"}");
    Some((stated, hex(&hasher.finalize())))
}

/// The pod a session belongs to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// The limits a session was written under (so a reader knows what "truncated" meant).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_session_bytes: u64,
    pub max_record_body_bytes: u64,
    pub max_stream_bytes: u64,
}

/// The first line of a session file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The session id; also the file's name.
    pub session: String,
    pub node: String,
    pub pod: PodRef,
    /// The client's address as the proxy saw it.
    pub peer: String,
    /// Where the pod was connecting (the API server address it dialled).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_server: String,
    pub started_at: Timestamp,
    pub limits: Limits,
    pub agent_version: String,
}

/// Which part of a stream a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Remote-command channel 0 (client → container).
    Stdin,
    /// Channel 1.
    Stdout,
    /// Channel 2.
    Stderr,
    /// Channel 3: the server's final status (exit code).
    Error,
    /// Channel 4: terminal size, `{"Width":…,"Height":…}`.
    Resize,
    /// Undecoded bytes client → server (SPDY, or a protocol we do not decode).
    In,
    /// Undecoded bytes server → client.
    Out,
}

impl Direction {
    /// The remote-command channel number's meaning (channel.k8s.io and v2–v5).
    pub fn from_channel(channel: u8) -> Option<Direction> {
        match channel {
            0 => Some(Direction::Stdin),
            1 => Some(Direction::Stdout),
            2 => Some(Direction::Stderr),
            3 => Some(Direction::Error),
            4 => Some(Direction::Resize),
            _ => None,
        }
    }
}

/// `streamStart`: an upgraded stream (exec, attach, port-forward) began; its frames
/// carry the same `auditID`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamStart {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    /// The negotiated protocol: a WebSocket subprotocol (`v5.channel.k8s.io`) or
    /// `SPDY/3.1`.
    pub protocol: String,
    /// Whether frames are decoded channels (`stdin`…) or opaque bytes (`in`/`out`).
    pub decoded: bool,
    pub started_at: Timestamp,
}

/// `frame`: bytes of one channel, `t` milliseconds after the stream started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Frame {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub t: u64,
    pub dir: Direction,
    /// The bytes when they are UTF-8 …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// … else base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data64: Option<String>,
}

impl Frame {
    /// A frame holding `bytes`, as text when they are UTF-8.
    pub fn new(audit_id: &str, t: u64, dir: Direction, bytes: &[u8]) -> Frame {
        let (data, data64) = match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => {
                use base64::Engine as _;
                (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                )
            }
        };
        Frame {
            audit_id: audit_id.to_owned(),
            t,
            dir,
            data,
            data64,
        }
    }

    /// The frame's bytes; `None` when `data64` is not valid base64.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        match (&self.data, &self.data64) {
            (Some(text), _) => Some(text.as_bytes().to_vec()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD.decode(b64).ok(),
            (None, None) => Some(Vec::new()),
        }
    }
}

/// `streamTruncated`: the stream reached `maxStreamBytes` after `afterBytes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamTruncated {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub t: u64,
    pub after_bytes: u64,
}

/// `streamEnd`: totals of a stream, stored and omitted (over the cap or dropped).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamEnd {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub t: u64,
    pub frames: u64,
    pub bytes: u64,
    pub omitted_frames: u64,
    pub omitted_bytes: u64,
}

/// `sessionTruncated`: the session reached `maxSessionBytes`; the records after this
/// one are counted in `end`, not stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionTruncated {
    pub at_bytes: u64,
    pub max_session_bytes: u64,
}

/// `end`: the session closed cleanly. `records` equals this record's `seq` (the number
/// of records before it), which is how a reader knows none is missing at the tail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct End {
    pub ended_at: Timestamp,
    /// `closed` (the connection ended) or `shutdown` (the agent stopped first).
    pub reason: String,
    pub records: u64,
    pub exchanges: u64,
    pub frames: u64,
    /// Records not stored because the session was over its cap.
    pub omitted: u64,
    /// Records lost: the writer was behind (queue full) or the disk failed.
    pub dropped: u64,
    /// The file's size before this line.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_unseal_agree() {
        let object = record_object(3, "ab", Kind::Exchange, br#"{"verb":"get"}"#);
        assert_eq!(
            object,
            br#"{"seq":3,"prevHash":"ab","kind":"exchange","verb":"get"}"#
        );
        let (line, hash) = seal(object.clone());
        assert_eq!(hash, sha256_hex(&object));
        assert!(line.ends_with(b"\"}\n"));
        let (stated, computed) = unseal(&line[..line.len() - 1]).unwrap();
        assert_eq!(stated, hash);
        assert_eq!(computed, hash);
        // The sealed line is still JSON.
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["hash"], hash.as_str());
    }

    #[test]
    fn empty_fields_add_nothing() {
        assert_eq!(header_object(b"{}"), br#"{"kind":"header"}"#);
        assert_eq!(header_object(b" { } "), br#"{"kind":"header"}"#);
    }

    #[test]
    fn unseal_refuses_lines_without_a_hash() {
        assert!(unseal(br#"{"seq":1}"#).is_none());
        let (line, _) = seal(header_object(br#"{"a":1}"#));
        let mut upper = line[..line.len() - 1].to_vec();
        let n = upper.len();
        upper[n - 3] = b'G';
        assert!(unseal(&upper).is_none());
    }

    #[test]
    fn timestamps_have_six_fraction_digits_and_parse_back() {
        let t = Timestamp::parse("2026-01-02T03:04:05.5Z").unwrap();
        assert_eq!(t.to_string(), "2026-01-02T03:04:05.500000Z");
        assert_eq!(Timestamp::parse(&t.to_string()), Some(t));
        assert_eq!(t.day(), "2026-01-02");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-01-02T03:04:05.500000Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn frames_keep_text_or_base64() {
        let text = Frame::new("a", 1, Direction::Stdout, b"ls\r\n");
        assert_eq!(text.data.as_deref(), Some("ls\r\n"));
        assert_eq!(text.bytes().unwrap(), b"ls\r\n");
        let binary = Frame::new("a", 1, Direction::Stdout, &[0xff, 0x00, 0x80]);
        assert!(binary.data.is_none());
        assert_eq!(binary.bytes().unwrap(), vec![0xff, 0x00, 0x80]);
    }
}
