//! The proxy's side of recording (DESIGN §7): each exchange of an enforced pod's
//! session becomes one record, written when the response ends.
//!
//! - The handler fills an [`Exchanged`] as it goes (who, what, the decision, the
//!   approval) and tees the request body into a [`RequestTap`].
//! - [`attach`] wraps the response body the client receives (already masked) so that
//!   what the client saw is what is recorded, and records the exchange when the body
//!   ends, fails, or is dropped (the client went away): a watch is recorded when it
//!   ends, with every event it delivered (up to the body cap).
//! - Request bodies pass through the same masking as responses before they are
//!   recorded: a Secret an agent writes is recorded with its values masked. A body
//!   that cannot be masked is recorded by size and hash only, never as it was.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use hyper::body::{Body, Frame, SizeHint};
use serde_json::Value;

use super::classify::RequestInfo;
use super::upstream::{BoxError, ProxyBody};
use crate::masking::{Context as MaskContext, Masker};
use crate::recording::{
    Action, Body as RecordedBody, BodyCapture, Decision, Exchange, ObjectRef, OmitReason, Omitted,
    ResponseStatus, SessionHandle, Stage, Timestamp, UserInfo,
};

/// What the handler learnt about one exchange, for its record.
#[derive(Default)]
pub struct Exchanged {
    /// The verb, once classified (metrics label every request with it).
    pub verb: String,
    /// The whole classification, kept only when the session is recorded.
    pub info: Option<RequestInfo>,
    pub user: Option<crate::identity::UserInfo>,
    pub decision: Option<(Action, Option<String>, String)>,
    pub approval_id: Option<String>,
    pub request_body: Option<RequestTap>,
}

impl Exchanged {
    pub fn verb(&self) -> &str {
        &self.verb
    }
}

/// The request body as the client sent it, kept up to the record's body cap.
#[derive(Clone)]
pub struct RequestTap(Arc<Mutex<BodyCapture>>);

impl RequestTap {
    pub fn new(limit: usize, content_type: Option<&str>) -> RequestTap {
        RequestTap(Arc::new(Mutex::new(BodyCapture::new(limit, content_type))))
    }

    pub fn push(&self, chunk: &[u8]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(chunk);
    }

    fn take(&self) -> RecordedBody {
        let mut capture = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *capture, BodyCapture::new(0, None)).finish()
    }
}

/// The parts of the request the record needs, taken before the handler consumes it.
pub struct RequestHead {
    pub audit_id: String,
    pub received: Timestamp,
    pub uri: String,
    pub user_agent: Option<String>,
    pub source_ip: String,
}

/// Wraps `response` so that the exchange is recorded when its body ends.
pub fn attach(
    session: &SessionHandle,
    limit: usize,
    masker: Arc<Masker>,
    head: RequestHead,
    exchanged: Exchanged,
    response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = response.status().as_u16();
    let pending = Pending {
        session: session.clone(),
        masker,
        head,
        exchanged,
        status,
        response_started: Timestamp::now(),
        capture: BodyCapture::new(limit, content_type.as_deref()),
    };
    let (parts, body) = response.into_parts();
    let body = RecordingBody {
        inner: body,
        pending: Some(pending),
    };
    Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
}

struct Pending {
    session: SessionHandle,
    masker: Arc<Masker>,
    head: RequestHead,
    exchanged: Exchanged,
    status: u16,
    response_started: Timestamp,
    capture: BodyCapture,
}

impl Pending {
    fn finish(self, complete: bool) {
        let Pending {
            session,
            masker,
            head,
            exchanged,
            status,
            response_started,
            capture,
        } = self;
        let info = exchanged.info.as_ref();
        let kind = info.map(|i| super::masking::kind_of(&i.api_group, &i.resource));
        let response_object = if complete {
            capture.finish()
        } else {
            capture.incomplete()
        };
        // What the proxy passed through unmasked (a `proxy` subresource's JSON, a
        // non-resource path) is masked before it is recorded: a recording must never
        // become a store of secrets. What it masked on the way out is recorded as is.
        let response_object = match info {
            Some(i) if super::masking::needs_masking(i) => response_object,
            _ => masked(response_object, &masker, kind.as_deref()),
        };
        let request_object = exchanged
            .request_body
            .as_ref()
            .map(|tap| masked(tap.take(), &masker, kind.as_deref()))
            .unwrap_or_default();
        let response_status = Some(ResponseStatus {
            code: status,
            reason: None,
            message: status_message(&response_object),
        });
        let (action, rule, reason) = exchanged.decision.clone().unwrap_or((
            Action::Deny,
            None,
            "refused before a decision".to_owned(),
        ));
        let exchange = Exchange {
            audit_id: head.audit_id,
            stage: if complete {
                Stage::ResponseComplete
            } else {
                Stage::ResponseStarted
            },
            request_received_timestamp: head.received,
            response_started_timestamp: Some(response_started),
            stage_timestamp: Timestamp::now(),
            user: exchanged
                .user
                .as_ref()
                .map(|u| UserInfo {
                    username: u.username.clone(),
                    uid: u.uid.clone(),
                    groups: u.groups.clone(),
                    ..UserInfo::default()
                })
                .unwrap_or_default(),
            source_ips: vec![head.source_ip],
            user_agent: head.user_agent,
            verb: exchanged.verb().to_owned(),
            request_uri: head.uri,
            object_ref: info.filter(|i| i.is_resource_request).map(|i| ObjectRef {
                resource: non_empty(&i.resource),
                namespace: non_empty(&i.namespace),
                name: non_empty(&i.name),
                api_group: Some(i.api_group.clone()),
                api_version: non_empty(&i.api_version),
                subresource: non_empty(&i.subresource),
            }),
            response_status,
            decision: Decision {
                action,
                rule,
                reason: Some(reason),
            },
            approval_id: exchanged.approval_id,
            request_object,
            response_object,
            ..Exchange::default()
        };
        if !session.record(exchange) {
            tracing::debug!("exchange not recorded (recording off, or the queue is full)");
        }
    }
}

/// A request body as it may be recorded: masked like a response, or only measured.
fn masked(body: RecordedBody, masker: &Masker, kind: Option<&str>) -> RecordedBody {
    let RecordedBody::JsonText(bytes) = body else {
        return body;
    };
    let omitted = |bytes: &Bytes| {
        RecordedBody::Omitted(Omitted {
            reason: OmitReason::NotJson,
            bytes: bytes.len() as u64,
            sha256: None,
            content_type: None,
        })
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return omitted(&bytes);
    };
    let ctx = MaskContext {
        kind: kind.map(str::to_owned),
    };
    match masker.mask_value(&mut value, &ctx) {
        Ok(_) => RecordedBody::Json(value),
        Err(_) => omitted(&bytes),
    }
}

/// A Status answer's message, for `responseStatus.message`.
fn status_message(body: &RecordedBody) -> Option<String> {
    let parsed: Value;
    let value = match body {
        RecordedBody::Json(v) => v,
        // Most answers are objects and lists, not Statuses: they are not parsed again
        // here (that was a second parse of every answer, on the request's task).
        RecordedBody::JsonText(bytes) if bytes.len() < 64 * 1024 && may_be_status(bytes) => {
            parsed = serde_json::from_slice(bytes).ok()?;
            &parsed
        }
        _ => return None,
    };
    (value["kind"] == "Status")
        .then(|| value["message"].as_str().map(str::to_owned))
        .flatten()
}

/// Whether JSON text can hold `"kind": "Status"`: it has the word, or a `\u` escape
/// that could spell it.
fn may_be_status(text: &[u8]) -> bool {
    text.windows(6).any(|w| w == b"Status") || text.windows(2).any(|w| w == b"\\u")
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// The response body, teeing each data frame into the record and recording the
/// exchange once when it ends (or is dropped before it did).
struct RecordingBody {
    inner: ProxyBody,
    pending: Option<Pending>,
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(pending)) = (frame.data_ref(), self.pending.as_mut()) {
                    pending.capture.push(data);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(pending) = self.pending.take() {
                    pending.finish(false);
                }
            }
            Poll::Ready(None) => {
                if let Some(pending) = self.pending.take() {
                    pending.finish(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            // hyper drops a body it has fully sent without polling it to its end when
            // the length was known: that is a complete answer.
            let complete = self.inner.is_end_stream();
            pending.finish(complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: &'static str) -> RecordedBody {
        RecordedBody::JsonText(Bytes::from_static(json.as_bytes()))
    }

    #[test]
    fn status_messages_come_from_statuses_only() {
        let status = text(r#"{"kind":"Status","status":"Failure","message":"gone"}"#);
        assert_eq!(status_message(&status).as_deref(), Some("gone"));
        // Spelt with an escape, it is still a Status.
        let escaped = text(r#"{"kind":"\u0053tatus","message":"gone"}"#);
        assert_eq!(status_message(&escaped).as_deref(), Some("gone"));
        let object = text(r#"{"kind":"ConfigMap","data":{"message":"not a Status"}}"#);
        assert_eq!(status_message(&object), None);
        let held = RecordedBody::Json(serde_json::json!({"kind": "Status", "message": "m"}));
        assert_eq!(status_message(&held).as_deref(), Some("m"));
    }
}
