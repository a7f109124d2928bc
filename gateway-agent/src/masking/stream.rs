//! Masking a body that arrives in chunks, with memory bounded by the largest single
//! object or event rather than by the size of the body.
//!
//! The approach: a small resumable framer finds where one JSON value ends (it tracks
//! nesting, strings and escapes; serde_json then parses and validates the value). Only
//! the value in progress is buffered; every complete value is parsed, masked, written
//! out and dropped.
//!
//! - Watch streams ([`BodyFormat::WatchStream`]): one event after another (the API
//!   server writes one per line; any whitespace between them is accepted). Each event
//!   is masked on its own and written out followed by a newline.
//! - Documents ([`BodyFormat::Document`]): the top-level object's members are read one
//!   by one. When the `items` member of a `...List` (or the `rows` of a `Table`) starts
//!   and the document's `kind` has been seen — the API server always writes `kind`,
//!   `apiVersion`, `metadata` (and `columnDefinitions`) first — the members read so far
//!   are written out and the array is streamed element by element: each list item or
//!   row is one bounded value. Members after the array are written as they come. Any
//!   other document (a single object, or a list whose `kind` comes late) is collected
//!   member by member, masked whole, then written: it is one object, so the bound
//!   holds. A single object (its `kind`, written first, is not a list's or a Table's)
//!   whose text is all buffered within [`WHOLE_OBJECT_BYTES`] is parsed in one go
//!   instead, and written byte for byte when nothing in it was masked: the common `get`
//!   of a small object costs one parse and no serialisation.
//!
//! The bound enforced: no single value (event, list item, row, or the sum of a
//! collected document's members) may exceed [`Masker::max_object_bytes`]; beyond it the
//! body is refused with [`MaskError::TooLarge`]. The buffer holds the value in progress
//! plus one chunk, and consumed bytes until they are half of it or 64 KiB
//! ([`StreamMasker::peak_buffered`] reports what it held). An item whose masking
//! changed nothing is written out byte for byte as it came (and not re-serialised).
//!
//! Once output has started an error cannot be turned into a clean answer: the proxy
//! must then abort the response (reset the HTTP/2 stream or close the connection) and
//! send nothing more; what was already sent was masked.

use std::sync::Arc;

use serde_json::Value;

use super::{list_item_kind, table, Context, MaskError, MaskStats, Masker};

/// The masker a [`StreamMasker`] uses: borrowed (tests, [`Masker::mask_body`]) or shared
/// (the proxy, whose response bodies outlive the request handler that built them, so
/// they must own what they use).
#[derive(Debug)]
enum MaskerRef<'m> {
    Borrowed(&'m Masker),
    Shared(Arc<Masker>),
}

impl std::ops::Deref for MaskerRef<'_> {
    type Target = Masker;

    fn deref(&self) -> &Masker {
        match self {
            MaskerRef::Borrowed(masker) => masker,
            MaskerRef::Shared(masker) => masker,
        }
    }
}

/// A single object up to this size is framed and parsed whole (see the module
/// documentation); a larger one is read member by member.
pub const WHOLE_OBJECT_BYTES: usize = 64 * 1024;

/// What kind of body is being masked; the proxy knows from the request (`watch=true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document: an object, a list or a Table.
    Document,
    /// A watch stream: JSON events one after another.
    WatchStream,
}

/// Finds where one JSON value ends, across chunks. Not a validator: serde_json parses
/// every framed value.
#[derive(Debug, Default)]
struct Framer {
    started: bool,
    depth: u32,
    in_string: bool,
    escape: bool,
    scalar: bool,
    scanned: usize,
}

impl Framer {
    /// `data` starts at the value's first byte. The length of the value once complete
    /// (the framer is then reset), or `None` when more data is needed.
    fn scan(&mut self, data: &[u8], eof: bool) -> Option<usize> {
        let mut i = self.scanned;
        let len = data.len();
        while i < len {
            let b = data[i];
            if !self.started {
                self.started = true;
                match b {
                    b'{' | b'[' => self.depth = 1,
                    b'"' => self.in_string = true,
                    _ => self.scalar = true,
                }
                i += 1;
                continue;
            }
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    i += 1;
                    continue;
                }
                // The common case: a run of plain string bytes.
                while i < len && data[i] != b'"' && data[i] != b'\\' {
                    i += 1;
                }
                if i == len {
                    break;
                }
                if data[i] == b'\\' {
                    self.escape = true;
                } else {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(self.done(i + 1));
                    }
                }
            } else if self.scalar {
                if matches!(
                    b,
                    b' ' | b'\t' | b'\n' | b'\r' | b',' | b']' | b'}' | b'{' | b'[' | b'"'
                ) {
                    return Some(self.done(i));
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Some(self.done(i + 1));
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        self.scanned = i;
        if eof && self.scalar {
            return Some(self.done(len));
        }
        None
    }

    fn done(&mut self, len: usize) -> usize {
        *self = Framer::default();
        len
    }
}

#[derive(Debug)]
enum State {
    /// Before the document.
    Start,
    /// At the top-level `{`, framing the object whole (see [`WHOLE_OBJECT_BYTES`]).
    Object,
    /// The document is not an object: framed whole.
    Whole,
    /// After the top-level `{`: a key or `}`.
    FirstKey,
    /// After a member: `,` or `}`.
    AfterMember,
    /// After `,`: a key.
    Key,
    Colon(String),
    MemberValue(String),
    /// After the streamed array's `[`: an element or `]`.
    FirstElement,
    /// After an element: `,` or `]`.
    AfterElement,
    /// After `,` in the array: an element.
    Element,
    /// After the document: only whitespace.
    End,
    /// A watch stream: events.
    Events,
}

/// What the streamed array holds.
#[derive(Debug)]
enum Streamed {
    Items(Option<String>),
    Rows,
}

/// Masks one response body pushed in chunks; see the module documentation.
#[derive(Debug)]
pub struct StreamMasker<'m> {
    masker: MaskerRef<'m>,
    hint: Option<String>,
    buf: Vec<u8>,
    pos: usize,
    framer: Framer,
    state: State,
    stats: MaskStats,
    columns: Option<Vec<String>>,
    members: Vec<(String, Value)>,
    /// Every top-level key so far (duplicates are refused, see [`super::strict`]).
    keys: Vec<String>,
    member_bytes: usize,
    streamed: Option<Streamed>,
    elements_written: bool,
    peak: usize,
}

impl StreamMasker<'static> {
    /// A masker for one body that keeps the compiled configuration alive itself: what
    /// the proxy uses, as a response body is polled after the handler has returned (and
    /// a policy reload must not pull the configuration from under a running watch).
    pub fn shared(masker: Arc<Masker>, format: BodyFormat, ctx: Context) -> Self {
        Self::with(MaskerRef::Shared(masker), format, ctx)
    }
}

impl<'m> StreamMasker<'m> {
    /// A masker for one body, borrowing the compiled configuration.
    pub fn new(masker: &'m Masker, format: BodyFormat, ctx: Context) -> Self {
        Self::with(MaskerRef::Borrowed(masker), format, ctx)
    }

    fn with(masker: MaskerRef<'m>, format: BodyFormat, ctx: Context) -> Self {
        StreamMasker {
            masker,
            hint: ctx.kind,
            buf: Vec::new(),
            pos: 0,
            framer: Framer::default(),
            state: match format {
                BodyFormat::Document => State::Start,
                BodyFormat::WatchStream => State::Events,
            },
            stats: MaskStats::default(),
            columns: None,
            members: Vec::new(),
            keys: Vec::new(),
            member_bytes: 0,
            streamed: None,
            elements_written: false,
            peak: 0,
        }
    }

    /// Takes the next chunk of the body; appends to `out` what can be sent now.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        // Consumed bytes are dropped once they are at least half the buffer (or 64 KiB):
        // a large value arriving in small chunks is not moved on every chunk.
        if self.pos > 0 && (self.pos * 2 >= self.buf.len() || self.pos >= 64 * 1024) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
        self.peak = self.peak.max(self.buf.len() + self.member_bytes);
        self.drive(out, false)
    }

    /// The body has ended: appends the rest to `out` and returns the counts. A body that
    /// stops in the middle of a value is [`MaskError::Truncated`].
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<MaskStats, MaskError> {
        self.drive(out, true)?;
        let rest_is_blank = self.buf[self.pos..].iter().all(u8::is_ascii_whitespace);
        match self.state {
            State::End | State::Events if rest_is_blank => Ok(self.stats),
            _ => Err(MaskError::Truncated),
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> MaskStats {
        self.stats
    }

    /// The most bytes held at once (the buffer plus a collected document's members).
    pub fn peak_buffered(&self) -> usize {
        self.peak
    }

    /// Skips whitespace; the next byte, if there is one yet.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.buf.get(self.pos) {
            if !b.is_ascii_whitespace() {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    /// Frames the value at `pos` (after [`Self::peek`]): its byte range once complete.
    fn frame(&mut self, eof: bool) -> Result<Option<std::ops::Range<usize>>, MaskError> {
        match self.framer.scan(&self.buf[self.pos..], eof) {
            Some(len) => {
                if len > self.masker.max_object_bytes() {
                    return Err(self.too_large());
                }
                let range = self.pos..self.pos + len;
                self.pos += len;
                Ok(Some(range))
            }
            None if self.buf.len() - self.pos > self.masker.max_object_bytes() => {
                Err(self.too_large())
            }
            None => Ok(None),
        }
    }

    fn too_large(&self) -> MaskError {
        MaskError::TooLarge {
            limit: self.masker.max_object_bytes(),
        }
    }

    fn parse(&self, range: std::ops::Range<usize>) -> Result<Value, MaskError> {
        super::strict::from_slice(&self.buf[range])
    }

    fn unexpected(&self, b: u8, wanted: &str) -> MaskError {
        MaskError::Malformed(format!(
            "expected {wanted}, found {:?}",
            char::from(b).escape_default().to_string()
        ))
    }

    fn drive(&mut self, out: &mut Vec<u8>, eof: bool) -> Result<(), MaskError> {
        loop {
            let state = std::mem::replace(&mut self.state, State::End);
            let Some(b) = self.peek() else {
                self.state = state;
                return Ok(());
            };
            self.state = match state {
                State::Start if b == b'{' => State::Object,
                State::Object => match self.whole_object(out, eof)? {
                    None => {
                        self.state = State::Object;
                        return Ok(());
                    }
                    Some(true) => State::End,
                    Some(false) => {
                        // Read member by member from the `{`.
                        self.pos += 1;
                        State::FirstKey
                    }
                },
                State::Start => State::Whole,
                State::Whole => match self.frame(eof)? {
                    None => {
                        self.state = State::Whole;
                        return Ok(());
                    }
                    Some(range) => {
                        let mut doc = self.parse(range)?;
                        self.masker.mask_document(
                            &mut doc,
                            self.hint.as_deref(),
                            &mut self.columns,
                            &mut self.stats,
                        )?;
                        write_json(out, &doc)?;
                        State::End
                    }
                },
                State::FirstKey | State::AfterMember if b == b'}' => {
                    self.pos += 1;
                    self.finish_object(out)?;
                    State::End
                }
                State::AfterMember if b == b',' => {
                    self.pos += 1;
                    State::Key
                }
                State::AfterMember => return Err(self.unexpected(b, "',' or '}'")),
                State::FirstKey | State::Key if b == b'"' => match self.frame(eof)? {
                    None => {
                        self.state = state;
                        return Ok(());
                    }
                    Some(range) => {
                        let key: String = serde_json::from_slice(&self.buf[range])
                            .map_err(MaskError::malformed)?;
                        if self.keys.contains(&key) {
                            return Err(MaskError::Malformed(format!("duplicate key {key:?}")));
                        }
                        self.keys.push(key.clone());
                        State::Colon(key)
                    }
                },
                State::FirstKey | State::Key => return Err(self.unexpected(b, "a key")),
                State::Colon(key) if b == b':' => {
                    self.pos += 1;
                    State::MemberValue(key)
                }
                State::Colon(_) => return Err(self.unexpected(b, "':'")),
                State::MemberValue(key) => {
                    if b == b'[' && self.streamed.is_none() && self.start_streaming(&key) {
                        self.pos += 1;
                        self.write_header(out, &key)?;
                        State::FirstElement
                    } else {
                        match self.frame(eof)? {
                            None => {
                                self.state = State::MemberValue(key);
                                return Ok(());
                            }
                            Some(range) => {
                                let len = range.len();
                                let value = self.parse(range)?;
                                if self.streamed.is_some() {
                                    // After the streamed array: written as it comes.
                                    out.push(b',');
                                    write_json(out, &key)?;
                                    out.push(b':');
                                    write_json(out, &value)?;
                                } else {
                                    self.member_bytes += len;
                                    if self.member_bytes > self.masker.max_object_bytes() {
                                        return Err(self.too_large());
                                    }
                                    self.members.push((key, value));
                                }
                                State::AfterMember
                            }
                        }
                    }
                }
                State::FirstElement | State::AfterElement if b == b']' => {
                    self.pos += 1;
                    out.push(b']');
                    State::AfterMember
                }
                State::AfterElement if b == b',' => {
                    self.pos += 1;
                    State::Element
                }
                State::AfterElement => return Err(self.unexpected(b, "',' or ']'")),
                State::FirstElement | State::Element => match self.frame(eof)? {
                    None => {
                        self.state = state;
                        return Ok(());
                    }
                    Some(range) => {
                        self.write_element(out, range)?;
                        State::AfterElement
                    }
                },
                State::End => return Err(self.unexpected(b, "the end of the body")),
                State::Events => match self.frame(eof)? {
                    None => {
                        self.state = State::Events;
                        return Ok(());
                    }
                    Some(range) => {
                        let mut event = self.parse(range.clone())?;
                        let before = self.stats.masked();
                        self.masker.mask_event_in(
                            &mut event,
                            self.hint.as_deref(),
                            &mut self.columns,
                            &mut self.stats,
                        )?;
                        self.write_masked(out, range, &event, before)?;
                        out.push(b'\n');
                        State::Events
                    }
                },
            };
        }
    }

    /// Writes what was read from `range` and masked into `value`: the original bytes
    /// when masking changed nothing since `before` (the masked count then), else the
    /// masked value.
    fn write_masked(
        &self,
        out: &mut Vec<u8>,
        range: std::ops::Range<usize>,
        value: &Value,
        before: u64,
    ) -> Result<(), MaskError> {
        if self.stats.masked() == before {
            out.extend_from_slice(&self.buf[range]);
            Ok(())
        } else {
            write_json(out, value)
        }
    }

    /// At the top-level `{`: when the document opens as a single object (see
    /// [`Opening`]) and its text is at most [`WHOLE_OBJECT_BYTES`], frames, masks and
    /// writes it whole (`Some(true)`). `None`: more data is needed; `Some(false)`: it is
    /// read member by member (a list or a Table, its `kind` not first, or too large).
    fn whole_object(&mut self, out: &mut Vec<u8>, eof: bool) -> Result<Option<bool>, MaskError> {
        match opening(&self.buf[self.pos..]) {
            Opening::Single => {}
            Opening::Incomplete if !eof => return Ok(None),
            Opening::Incomplete | Opening::Other => return Ok(Some(false)),
        }
        let limit = WHOLE_OBJECT_BYTES.min(self.masker.max_object_bytes());
        let len = match self.framer.scan(&self.buf[self.pos..], eof) {
            Some(len) => len,
            None if !eof && self.buf.len() - self.pos <= limit => return Ok(None),
            None => {
                self.framer = Framer::default();
                return Ok(Some(false));
            }
        };
        if len > limit {
            return Ok(Some(false));
        }
        let range = self.pos..self.pos + len;
        self.pos += len;
        let mut doc = self.parse(range.clone())?;
        let before = self.stats.masked();
        self.masker.mask_document(
            &mut doc,
            self.hint.as_deref(),
            &mut self.columns,
            &mut self.stats,
        )?;
        self.write_masked(out, range, &doc, before)?;
        Ok(Some(true))
    }

    /// Whether the array in member `key` is streamed: the `items` of a list or the
    /// `rows` of a Table, once the document's kind is known.
    fn start_streaming(&mut self, key: &str) -> bool {
        let kind = self
            .members
            .iter()
            .find(|(k, _)| k == "kind")
            .and_then(|(_, v)| v.as_str());
        match (key, kind) {
            ("items", Some(list)) if list.ends_with("List") => {
                let item = list_item_kind(list, self.hint.as_deref()).map(str::to_string);
                self.streamed = Some(Streamed::Items(item));
                true
            }
            ("rows", Some("Table")) => {
                if let Some((_, defs)) = self.members.iter().find(|(k, _)| k == "columnDefinitions")
                {
                    let table = serde_json::json!({ "columnDefinitions": defs });
                    self.columns = table::column_names(&table);
                }
                self.streamed = Some(Streamed::Rows);
                true
            }
            _ => false,
        }
    }

    /// `{`, the members read so far, then `"key":[`.
    fn write_header(&mut self, out: &mut Vec<u8>, key: &str) -> Result<(), MaskError> {
        out.push(b'{');
        for (name, value) in self.members.drain(..) {
            write_json(out, &name)?;
            out.push(b':');
            write_json(out, &value)?;
            out.push(b',');
        }
        self.member_bytes = 0;
        write_json(out, &key)?;
        out.extend_from_slice(b":[");
        Ok(())
    }

    /// One list item or Table row.
    fn write_element(
        &mut self,
        out: &mut Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> Result<(), MaskError> {
        let mut element = self.parse(range.clone())?;
        let before = self.stats.masked();
        match &self.streamed {
            Some(Streamed::Rows) => table::mask_row(
                &self.masker,
                &mut element,
                self.columns.as_deref(),
                self.hint.as_deref(),
                &mut self.stats,
            )?,
            Some(Streamed::Items(kind)) => {
                self.masker
                    .mask_object(&mut element, kind.as_deref(), &mut self.stats)?
            }
            None => {}
        }
        if self.elements_written {
            out.push(b',');
        }
        self.elements_written = true;
        self.write_masked(out, range, &element, before)?;
        Ok(())
    }

    /// The top-level `}`: closes a streamed document, or masks and writes a collected
    /// one.
    fn finish_object(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        if self.streamed.is_some() {
            out.push(b'}');
            return Ok(());
        }
        let map: serde_json::Map<String, Value> = self.members.drain(..).collect();
        self.member_bytes = 0;
        let mut doc = Value::Object(map);
        self.masker.mask_document(
            &mut doc,
            self.hint.as_deref(),
            &mut self.columns,
            &mut self.stats,
        )?;
        write_json(out, &doc)
    }
}

/// What the start of a document says about it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// `{"kind":"…"` with a kind that is neither a list's nor a Table's: a single
    /// object, as the API server writes every object (`{"kind":"ConfigMap",...`).
    Single,
    /// Anything else: read member by member (a list's items streamed).
    Other,
    /// Too little of it is here yet to tell.
    Incomplete,
}

/// The longest kind looked for at the start of a document.
const MAX_KIND_BYTES: usize = 256;

pub(crate) fn opening(text: &[u8]) -> Opening {
    const PREFIX: &[u8] = br#"{"kind":""#;
    let seen = text.len().min(PREFIX.len());
    if text[..seen] != PREFIX[..seen] {
        return Opening::Other;
    }
    let Some(rest) = text.get(PREFIX.len()..) else {
        return Opening::Incomplete;
    };
    match rest
        .iter()
        .take(MAX_KIND_BYTES)
        .position(|&b| b == b'"' || b == b'\\')
    {
        None if rest.len() < MAX_KIND_BYTES => Opening::Incomplete,
        Some(end) if rest[end] == b'"' && end > 0 => {
            let kind = &rest[..end];
            if kind.ends_with(b"List") || kind == b"Table" {
                Opening::Other
            } else {
                Opening::Single
            }
        }
        // No kind, a kind with an escape, or a very long one.
        _ => Opening::Other,
    }
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), MaskError> {
    serde_json::to_writer(&mut *out, value).map_err(MaskError::malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(text: &str) -> Vec<String> {
        let data = text.as_bytes();
        let mut out = Vec::new();
        let mut start = 0;
        let mut framer = Framer::default();
        while start < data.len() {
            if data[start].is_ascii_whitespace() {
                start += 1;
                continue;
            }
            let len = framer.scan(&data[start..], true).unwrap();
            out.push(text[start..start + len].to_string());
            start += len;
        }
        out
    }

    #[test]
    fn framer_finds_value_ends() {
        assert_eq!(
            frame_all(r#"{"a":"}\"{"} [1,[2]] "x\\" 12 true {}"#),
            vec![r#"{"a":"}\"{"}"#, "[1,[2]]", r#""x\\""#, "12", "true", "{}"]
        );
    }

    #[test]
    fn framer_resumes_byte_by_byte() {
        let text = br#"{"k":["a\"]",{"b":"\\"}],"n":-1.5e3}tail"#;
        let mut framer = Framer::default();
        let mut found = None;
        for end in 1..=text.len() {
            if let Some(len) = framer.scan(&text[..end], false) {
                found = Some(len);
                break;
            }
        }
        assert_eq!(found, Some(text.len() - 4));
        // A scalar needs a delimiter, or the end of the body.
        let mut framer = Framer::default();
        assert_eq!(framer.scan(b"123", false), None);
        assert_eq!(framer.scan(b"123", true), Some(3));
    }
}
