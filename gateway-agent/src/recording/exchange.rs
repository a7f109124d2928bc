//! One HTTP exchange as a record, modelled on the API server's audit event
//! (`audit.k8s.io/v1` `Event`), and the bodies it carries.
//!
//! Bodies reach us already masked (the proxy records what the client sent and saw
//! after masking); this module only decides how they are stored: as JSON when they are
//! JSON and fit the per-record cap, else as a marker with their size and SHA-256.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::format::{hex, sha256_hex, Timestamp};

/// The stage the exchange reached (audit `stage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// The request was read but no response was sent (the client went away first).
    RequestReceived,
    /// The response started but did not finish (cut off, or a stream that broke).
    ResponseStarted,
    /// The response was sent in full.
    #[default]
    ResponseComplete,
}

/// Who made the call (audit `user`): the pod's identity from TokenReview.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The object a request is about (audit `objectRef`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
}

/// The answer's status (audit `responseStatus`, a trimmed `metav1.Status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseStatus {
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What policy did with the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Held for approval (then executed, refused or expired: see `responseStatus`).
    Approve,
}

/// The policy decision and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub action: Action,
    /// The rule that matched, if one did (else the default action applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why a body is not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OmitReason {
    /// Larger than `maxRecordBodyBytes`.
    TooLarge,
    /// Not JSON (protobuf, text, binary): never stored, it cannot be shown to be masked.
    NotJson,
    /// The body ended early (the client or the upstream cut it off).
    Incomplete,
}

/// The marker stored instead of a body: `requestObjectOmitted` /
/// `responseObjectOmitted`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Omitted {
    pub reason: OmitReason,
    /// The body's size (for `incomplete`, what was seen).
    pub bytes: u64,
    /// Hex SHA-256 of the body's bytes, when they were all seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// A request or response body handed to the recorder, masked by the caller.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Body {
    /// There was none.
    #[default]
    None,
    /// A value the caller holds (e.g. a `Status` the proxy wrote itself).
    Json(Value),
    /// JSON text as it went over the wire. Stored as is when it is one JSON value; a
    /// stream of values (a watch) is stored as an array, with `…ObjectStream: true`.
    JsonText(Bytes),
    /// Not stored; see [`Omitted`]. [`BodyCapture`] produces these.
    Omitted(Omitted),
}

impl Body {
    /// The JSON value, when the body is (or parses as) one value.
    pub fn json(&self) -> Option<Value> {
        match self {
            Body::Json(v) => Some(v.clone()),
            Body::JsonText(text) => serde_json::from_slice(text).ok(),
            Body::None | Body::Omitted(_) => None,
        }
    }

    /// Roughly how many bytes this body will take in a line (for the writer's queue
    /// budget; a `Json` value is measured when it is turned into text).
    pub(crate) fn queued_len(&self) -> usize {
        match self {
            Body::JsonText(text) => text.len(),
            Body::None | Body::Json(_) | Body::Omitted(_) => 64,
        }
    }

    /// Before queueing, on the caller's side: a held value becomes text (so the queue
    /// budget counts its real size and the value's memory goes early), and text over
    /// the cap becomes its marker (so it is not queued at all).
    pub(crate) fn prepare(self, cap: usize) -> Body {
        match self.into_text() {
            Body::JsonText(text) if text.trim_ascii().len() > cap => {
                Body::Omitted(too_large(&text))
            }
            other => other,
        }
    }

    fn into_text(self) -> Body {
        match self {
            Body::Json(v) => match serde_json::to_vec(&v) {
                Ok(text) => Body::JsonText(Bytes::from(text)),
                // A `Value` always serialises (its keys are strings); keep the marker
                // path total anyway.
                Err(_) => Body::Omitted(Omitted {
                    reason: OmitReason::NotJson,
                    bytes: 0,
                    sha256: None,
                    content_type: None,
                }),
            },
            other => other,
        }
    }
}

/// One exchange: an audit event's fields, plus Tollgate's decision and approval.
///
/// Fill it in with `..Default::default()` for what does not apply. The bodies are
/// written as `requestObject` / `responseObject` (or `…Omitted` markers).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exchange {
    /// The `Audit-ID` the proxy sent upstream (the API server logs the same id).
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub stage: Stage,
    pub request_received_timestamp: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_started_timestamp: Option<Timestamp>,
    /// When the response completed (or when the exchange ended at `stage`).
    pub stage_timestamp: Timestamp,
    pub user: UserInfo,
    /// The account an approved call was executed as, when not the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonated_user: Option<UserInfo>,
    #[serde(rename = "sourceIPs", default)]
    pub source_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_ref: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_status: Option<ResponseStatus>,
    pub decision: Decision,
    #[serde(
        rename = "approvalID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub approval_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Written as `requestObject` (or `requestObjectOmitted`) after the other members.
    #[serde(skip)]
    pub request_object: Body,
    /// Written as `responseObject` (or `responseObjectOmitted`).
    #[serde(skip)]
    pub response_object: Body,
}

impl Exchange {
    /// Reads the bodies back from a record's members (`requestObject`,
    /// `requestObjectOmitted`, and the same for the response).
    pub(crate) fn read_bodies(&mut self, record: &serde_json::Map<String, Value>) {
        self.request_object = body_from(record, "requestObject");
        self.response_object = body_from(record, "responseObject");
    }
}

fn body_from(record: &serde_json::Map<String, Value>, name: &str) -> Body {
    if let Some(v) = record.get(name) {
        return Body::Json(v.clone());
    }
    record
        .get(&format!("{name}Omitted"))
        .and_then(|v| Omitted::deserialize(v).ok())
        .map_or(Body::None, Body::Omitted)
}

/// Appends the bodies to an exchange's members (`meta`, an object's text) and closes
/// the object. Runs on the writer's thread: validating and copying JSON text is the
/// costly part of a record, and the request path should not pay for it.
pub(crate) fn splice_bodies(
    mut meta: Vec<u8>,
    request: Body,
    response: Body,
    cap: usize,
) -> Vec<u8> {
    // `meta` always has members (auditID, verb, …), so each body follows a comma.
    if meta.last() == Some(&b'}') {
        meta.pop();
    }
    body_members(&mut meta, "requestObject", request, cap);
    body_members(&mut meta, "responseObject", response, cap);
    meta.push(b'}');
    meta
}

fn body_members(out: &mut Vec<u8>, name: &str, body: Body, cap: usize) {
    match body.into_text() {
        Body::None => {}
        Body::Json(_) => {} // into_text turned it into text
        Body::JsonText(text) => json_members(out, name, &text, cap),
        Body::Omitted(omitted) => omitted_member(out, name, &omitted),
    }
}

fn omitted_member(out: &mut Vec<u8>, name: &str, omitted: &Omitted) {
    // An `Omitted` has only strings, numbers and enums: it always serialises.
    if let Ok(text) = serde_json::to_vec(omitted) {
        out.extend_from_slice(format!(r#","{name}Omitted":"#).as_bytes());
        out.extend_from_slice(&text);
    }
}

fn json_members(out: &mut Vec<u8>, name: &str, text: &[u8], cap: usize) {
    let trimmed = text.trim_ascii();
    if trimmed.is_empty() {
        return;
    }
    if trimmed.len() > cap {
        return omitted_member(out, name, &too_large(text));
    }
    match json_values(trimmed) {
        Some(values) if values.len() == 1 => {
            out.extend_from_slice(format!(r#","{name}":"#).as_bytes());
            push_one_line(out, trimmed);
        }
        Some(values) => {
            out.extend_from_slice(format!(r#","{name}":["#).as_bytes());
            for (i, (start, end)) in values.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_one_line(out, trimmed[start..end].trim_ascii());
            }
            out.extend_from_slice(format!(r#"],"{name}Stream":true"#).as_bytes());
        }
        None => {
            let omitted = Omitted {
                reason: OmitReason::NotJson,
                bytes: text.len() as u64,
                sha256: Some(sha256_hex(text)),
                content_type: None,
            };
            omitted_member(out, name, &omitted);
        }
    }
}

fn too_large(text: &[u8]) -> Omitted {
    Omitted {
        reason: OmitReason::TooLarge,
        bytes: text.len() as u64,
        sha256: Some(sha256_hex(text)),
        content_type: None,
    }
}

/// The byte ranges of the JSON values `text` holds (one, or a stream of them as a
/// watch sends), or `None` when it is not JSON.
fn json_values(text: &[u8]) -> Option<Vec<(usize, usize)>> {
    // serde_json skips strings without checking their UTF-8 when it ignores them; a
    // line that is not UTF-8 would not read back, so check the whole text first.
    std::str::from_utf8(text).ok()?;
    let mut values = Vec::new();
    let mut stream =
        serde_json::Deserializer::from_slice(text).into_iter::<serde::de::IgnoredAny>();
    let mut start = 0;
    while let Some(next) = stream.next() {
        next.ok()?;
        let end = stream.byte_offset();
        values.push((start, end));
        start = end;
    }
    (!values.is_empty()).then_some(values)
}

/// Copies valid JSON text onto one line. A raw CR or LF in valid JSON can only be
/// whitespace between tokens (inside strings they must be escaped), so a space
/// replaces it without changing the value.
fn push_one_line(out: &mut Vec<u8>, json: &[u8]) {
    out.extend(
        json.iter()
            .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
}

/// Collects a body as it streams through the proxy, bounded by the per-record cap:
/// `push` each (masked) chunk the client sends or receives, `finish` at the end.
///
/// Nothing is hashed while the body fits the cap (the common case costs one copy);
/// past the cap, or for a body that is not JSON, the bytes are hashed as they pass and
/// not kept.
pub struct BodyCapture {
    limit: usize,
    keep: bool,
    kept: Vec<u8>,
    total: u64,
    hasher: Option<Sha256>,
    content_type: Option<String>,
}

impl BodyCapture {
    /// `limit` is the recorder's `max_record_body_bytes`; `content_type` the body's
    /// `Content-Type` (JSON types are kept, others only measured; `None` = try JSON).
    pub fn new(limit: usize, content_type: Option<&str>) -> BodyCapture {
        let json = content_type.is_none_or(is_json_type);
        BodyCapture {
            limit,
            keep: json,
            kept: Vec::new(),
            total: 0,
            hasher: (!json).then(Sha256::new),
            content_type: content_type.map(str::to_owned),
        }
    }

    /// Another chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if self.keep && self.kept.len() + chunk.len() > self.limit {
            // Over the cap: from here on only the hash is kept.
            let mut hasher = Sha256::new();
            hasher.update(&self.kept);
            self.hasher = Some(hasher);
            self.kept = Vec::new();
            self.keep = false;
        }
        if self.keep {
            self.kept.extend_from_slice(chunk);
        } else if let Some(hasher) = &mut self.hasher {
            hasher.update(chunk);
        }
    }

    /// Bytes seen so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The body, complete.
    pub fn finish(self) -> Body {
        if self.total == 0 {
            return Body::None;
        }
        if self.keep {
            return Body::JsonText(Bytes::from(self.kept));
        }
        let reason = if self.content_type.as_deref().is_none_or(is_json_type) {
            OmitReason::TooLarge
        } else {
            OmitReason::NotJson
        };
        Body::Omitted(Omitted {
            reason,
            bytes: self.total,
            sha256: self.hasher.map(|h| hex(&h.finalize())),
            content_type: self.content_type,
        })
    }

    /// The body ended before it was complete: only its size so far is recorded.
    pub fn incomplete(self) -> Body {
        Body::Omitted(Omitted {
            reason: OmitReason::Incomplete,
            bytes: self.total,
            sha256: None,
            content_type: self.content_type,
        })
    }
}

/// `application/json`, `application/merge-patch+json`, `…;stream=watch` and friends.
fn is_json_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spliced(request: Body, response: Body, cap: usize) -> Value {
        let meta = br#"{"verb":"get"}"#.to_vec();
        serde_json::from_slice(&splice_bodies(meta, request, response, cap)).unwrap()
    }

    #[test]
    fn json_text_is_copied_onto_one_line() {
        let text = Bytes::from_static(b"{\n  \"kind\": \"Pod\",\r\n  \"a\": \"x\\ny\"\n}\n");
        let meta = br#"{"verb":"get"}"#.to_vec();
        let out = splice_bodies(meta, Body::None, Body::JsonText(text), 1024);
        assert!(!out.contains(&b'\n'));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["responseObject"]["a"], "x\ny");
        assert!(v.get("requestObject").is_none());
    }

    #[test]
    fn a_watch_stream_becomes_an_array() {
        let text = Bytes::from_static(b"{\"type\":\"ADDED\"}\n{\"type\":\"DELETED\"}\n");
        let v = spliced(Body::None, Body::JsonText(text), 1024);
        assert_eq!(v["responseObject"][1]["type"], "DELETED");
        assert_eq!(v["responseObjectStream"], true);
    }

    #[test]
    fn oversized_and_non_json_bodies_become_markers() {
        let big = Bytes::from(format!("{{\"a\":\"{}\"}}", "x".repeat(100)));
        let v = spliced(
            Body::JsonText(big.clone()),
            Body::JsonText(Bytes::from_static(b"\x00\x01k8s")),
            50,
        );
        assert_eq!(v["requestObjectOmitted"]["reason"], "tooLarge");
        assert_eq!(v["requestObjectOmitted"]["bytes"], big.len() as u64);
        assert_eq!(v["requestObjectOmitted"]["sha256"], sha256_hex(&big));
        assert_eq!(v["responseObjectOmitted"]["reason"], "notJson");
    }

    #[test]
    fn values_are_measured_against_the_cap_too() {
        let v = spliced(
            Body::Json(serde_json::json!({"a": "x".repeat(100)})),
            Body::None,
            50,
        );
        assert_eq!(v["requestObjectOmitted"]["reason"], "tooLarge");
        let v = spliced(Body::Json(serde_json::json!({"a": 1})), Body::None, 50);
        assert_eq!(v["requestObject"]["a"], 1);
    }

    #[test]
    fn capture_keeps_small_json_and_hashes_the_rest() {
        let mut c = BodyCapture::new(10, Some("application/json"));
        c.push(b"{\"a\":");
        c.push(b"1}");
        assert_eq!(c.finish(), Body::JsonText(Bytes::from_static(b"{\"a\":1}")));

        let mut c = BodyCapture::new(10, Some("application/json"));
        c.push(b"{\"a\":\"012");
        c.push(b"3456789\"}");
        let Body::Omitted(o) = c.finish() else {
            panic!()
        };
        assert_eq!(o.reason, OmitReason::TooLarge);
        assert_eq!(o.bytes, 18);
        assert_eq!(o.sha256.unwrap(), sha256_hex(b"{\"a\":\"0123456789\"}"));

        let mut c = BodyCapture::new(10, Some("application/vnd.kubernetes.protobuf"));
        c.push(b"k8s\x00");
        let Body::Omitted(o) = c.finish() else {
            panic!()
        };
        assert_eq!(o.reason, OmitReason::NotJson);
        assert_eq!(o.sha256.unwrap(), sha256_hex(b"k8s\x00"));

        assert_eq!(BodyCapture::new(10, None).finish(), Body::None);
    }

    #[test]
    fn exchange_members_are_audit_names() {
        let ex = Exchange {
            audit_id: "id".into(),
            verb: "get".into(),
            request_uri: "/api/v1/pods".into(),
            approval_id: Some("ar-1".into()),
            source_ips: vec!["10.0.0.1".into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&ex).unwrap();
        for key in [
            "auditID",
            "requestURI",
            "sourceIPs",
            "approvalID",
            "stageTimestamp",
            "requestReceivedTimestamp",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["stage"], "ResponseComplete");
        assert_eq!(v["decision"]["action"], "allow");
    }
}
