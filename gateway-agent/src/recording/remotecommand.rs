//! exec/attach streams as the proxy splices them: the Kubernetes remote-command
//! WebSocket protocol decoded into channels, from the raw bytes of each direction.
//!
//! After `101 Switching Protocols` the proxy copies bytes both ways. Each direction is
//! a sequence of WebSocket frames (RFC 6455); the client's are masked. A remote-command
//! message (subprotocols `channel.k8s.io`, `v2`…`v5.channel.k8s.io`) is binary and its
//! first byte is the channel: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize (v5 adds
//! 255, "close this channel", which carries no terminal data and is not recorded).
//!
//! The decoder streams: it keeps at most a frame header (14 bytes) between reads and
//! hands out payload as it arrives, so memory does not depend on message size.
//!
//! Not decoded, recorded as opaque `in`/`out` frames instead: SPDY/3.1 (its stream ids
//! map to channels through zlib-compressed header blocks), the `base64.channel.k8s.io`
//! variants, port-forward, and any WebSocket using compression (RSV1): when a frame
//! cannot be decoded, that direction is recorded opaque from then on.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use super::writer::StreamRecorder;
use super::Direction;

/// The protocol an upgraded exchange negotiated, as far as recording cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamProtocol {
    /// A remote-command WebSocket subprotocol with binary channels: decoded.
    Channels(String),
    /// SPDY/3.1: recorded opaque.
    Spdy,
    /// Anything else: recorded opaque.
    Opaque(String),
}

impl StreamProtocol {
    /// From the `101` response: its `Upgrade` and `Sec-WebSocket-Protocol` headers,
    /// and the request's subresource (`exec`, `attach`, `portforward`, …).
    pub fn negotiated(
        upgrade: Option<&str>,
        websocket_protocol: Option<&str>,
        subresource: Option<&str>,
    ) -> StreamProtocol {
        let upgrade = upgrade.unwrap_or_default().trim();
        if upgrade.to_ascii_lowercase().starts_with("spdy/") {
            return StreamProtocol::Spdy;
        }
        let protocol = websocket_protocol.unwrap_or_default().trim();
        let terminal = matches!(subresource, Some("exec" | "attach"));
        let channels = matches!(
            protocol,
            "channel.k8s.io"
                | "v2.channel.k8s.io"
                | "v3.channel.k8s.io"
                | "v4.channel.k8s.io"
                | "v5.channel.k8s.io"
        );
        if upgrade.eq_ignore_ascii_case("websocket") && channels && terminal {
            StreamProtocol::Channels(protocol.to_owned())
        } else if !protocol.is_empty() {
            StreamProtocol::Opaque(protocol.to_owned())
        } else {
            StreamProtocol::Opaque(upgrade.to_owned())
        }
    }

    /// The name recorded in `streamStart.protocol`.
    pub fn name(&self) -> &str {
        match self {
            StreamProtocol::Channels(name) | StreamProtocol::Opaque(name) => name,
            StreamProtocol::Spdy => "SPDY/3.1",
        }
    }

    /// Whether frames will be decoded channels.
    pub fn decoded(&self) -> bool {
        matches!(self, StreamProtocol::Channels(_))
    }
}

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Client → API server: WebSocket frames are masked.
    ClientToServer,
    /// API server → client.
    ServerToClient,
}

/// A WebSocket stream that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("frame with reserved bits {0:#04x} set (a compression extension?)")]
    Reserved(u8),
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("control frame of {0} bytes or fragmented")]
    Control(u64),
    #[error("continuation frame outside a message, or a new message inside one")]
    Fragmentation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Payload,
}

/// Decodes one direction's WebSocket frames into (channel, payload chunk) pieces.
pub struct WsDecoder {
    state: State,
    header: [u8; 14],
    have: usize,
    // The frame being read.
    remaining: u64,
    mask: Option<[u8; 4]>,
    mask_pos: usize,
    data_frame: bool,
    fin: bool,
    // The message being read: its channel is the first payload byte of its first frame.
    in_message: bool,
    channel: Option<u8>,
    scratch: Vec<u8>,
    failed: Option<WsError>,
}

impl Default for WsDecoder {
    fn default() -> Self {
        WsDecoder::new()
    }
}

impl WsDecoder {
    pub fn new() -> WsDecoder {
        WsDecoder {
            state: State::Header,
            header: [0; 14],
            have: 0,
            remaining: 0,
            mask: None,
            mask_pos: 0,
            data_frame: false,
            fin: false,
            in_message: false,
            channel: None,
            scratch: Vec::new(),
            failed: None,
        }
    }

    /// Feeds the next bytes of the stream, however they were split; `out` gets each
    /// piece of message payload with its channel. After an error the decoder stays
    /// failed (a stream out of step cannot be re-synchronised).
    pub fn push(
        &mut self,
        mut data: &[u8],
        out: &mut impl FnMut(u8, &[u8]),
    ) -> Result<(), WsError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        while !data.is_empty() {
            match self.state {
                State::Header => {
                    let need = self.header_len();
                    let take = (need - self.have).min(data.len());
                    self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                    self.have += take;
                    data = &data[take..];
                    // The length and mask bytes change how long the header is.
                    if self.have == self.header_len() {
                        if let Err(err) = self.start_frame() {
                            self.failed = Some(err.clone());
                            return Err(err);
                        }
                    }
                }
                State::Payload => {
                    let n = usize::try_from(self.remaining)
                        .unwrap_or(usize::MAX)
                        .min(data.len());
                    let (chunk, rest) = data.split_at(n);
                    data = rest;
                    self.remaining -= n as u64;
                    if self.data_frame {
                        self.deliver(chunk, out);
                    }
                    if self.remaining == 0 {
                        self.end_frame();
                    }
                }
            }
        }
        Ok(())
    }

    /// The header's full length as far as the bytes so far tell.
    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn start_frame(&mut self) -> Result<(), WsError> {
        let b0 = self.header[0];
        let b1 = self.header[1];
        let (len, at) = match b1 & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                4,
            ),
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&self.header[2..10]);
                (u64::from_be_bytes(be), 10)
            }
            n => (u64::from(n), 2),
        };
        self.mask = (b1 & 0x80 != 0).then(|| {
            let mut key = [0u8; 4];
            key.copy_from_slice(&self.header[at..at + 4]);
            key
        });
        self.mask_pos = 0;
        self.remaining = len;
        self.fin = b0 & 0x80 != 0;
        let reserved = b0 & 0x70;
        if reserved != 0 {
            return Err(WsError::Reserved(reserved));
        }
        match b0 & 0x0f {
            0 => {
                if !self.in_message {
                    return Err(WsError::Fragmentation);
                }
                self.data_frame = true;
            }
            1 | 2 => {
                if self.in_message {
                    return Err(WsError::Fragmentation);
                }
                self.in_message = true;
                self.channel = None;
                self.data_frame = true;
            }
            // Close, ping, pong: may come between fragments; never carry terminal data.
            8..=10 => {
                if len > 125 || !self.fin {
                    return Err(WsError::Control(len));
                }
                self.data_frame = false;
            }
            opcode => return Err(WsError::Opcode(opcode)),
        }
        self.have = 0;
        if self.remaining == 0 {
            self.end_frame();
        } else {
            self.state = State::Payload;
        }
        Ok(())
    }

    fn deliver(&mut self, chunk: &[u8], out: &mut impl FnMut(u8, &[u8])) {
        let payload: &[u8] = match self.mask {
            Some(key) => {
                self.scratch.clear();
                self.scratch.extend(
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ key[(self.mask_pos + i) % 4]),
                );
                self.mask_pos = (self.mask_pos + chunk.len()) % 4;
                &self.scratch
            }
            None => chunk,
        };
        let payload = match self.channel {
            Some(_) => payload,
            None => match payload.split_first() {
                Some((&channel, rest)) => {
                    self.channel = Some(channel);
                    rest
                }
                None => return,
            },
        };
        if let (Some(channel), false) = (self.channel, payload.is_empty()) {
            out(channel, payload);
        }
    }

    fn end_frame(&mut self) {
        if self.data_frame && self.fin {
            self.in_message = false;
            self.channel = None;
        }
        self.state = State::Header;
        self.have = 0;
    }
}

/// How much of a channel's last bytes is kept to find a secret split between two
/// reads (a PEM private key of 4096-bit RSA is about 3.3 KiB).
const MASK_CARRY: usize = 8 * 1024;

/// Shows one direction of a spliced stream to a [`StreamRecorder`]: decoded into
/// channel frames when the protocol allows, else as opaque `in`/`out` frames. With
/// [`RemoteCommandTap::masking`], what the value detectors find (private keys, tokens,
/// cloud keys) is masked in the record; the bytes forwarded are never changed.
pub struct RemoteCommandTap {
    stream: StreamRecorder,
    side: Side,
    decoder: Option<WsDecoder>,
    masker: Option<std::sync::Arc<crate::masking::Masker>>,
    /// Per channel (opaque frames: 255), its last bytes as they were, unmasked.
    carry: Vec<(u8, Vec<u8>)>,
}

impl RemoteCommandTap {
    pub fn new(stream: StreamRecorder, side: Side) -> RemoteCommandTap {
        let decoder = stream.decoded().then(WsDecoder::new);
        RemoteCommandTap {
            stream,
            side,
            decoder,
            masker: None,
            carry: Vec::new(),
        }
    }

    /// Masks what `masker`'s value detectors find in the frames recorded.
    pub fn masking(mut self, masker: std::sync::Arc<crate::masking::Masker>) -> Self {
        self.masker = Some(masker);
        self
    }

    /// Records one frame of `channel`, masked when masking is on.
    fn record(&mut self, channel: u8, dir: Direction, data: &[u8]) {
        let Some(masker) = &self.masker else {
            self.stream.frame(dir, data);
            return;
        };
        let slot = match self.carry.iter().position(|(c, _)| *c == channel) {
            Some(slot) => slot,
            None => {
                self.carry.push((channel, Vec::new()));
                self.carry.len() - 1
            }
        };
        let before = &mut self.carry[slot].1;
        match masker.detectors().mask_chunk(before, data) {
            Some((masked, spans)) => {
                tracing::debug!(audit_id = %self.stream.audit_id(), spans, "secrets masked in a recorded terminal frame");
                self.stream.frame(dir, &masked);
            }
            None => self.stream.frame(dir, data),
        }
        before.extend_from_slice(data);
        if before.len() > MASK_CARRY {
            before.drain(..before.len() - MASK_CARRY);
        }
    }

    /// The two taps of a stream: client → server, server → client.
    pub fn pair(stream: StreamRecorder) -> (RemoteCommandTap, RemoteCommandTap) {
        (
            RemoteCommandTap::new(stream.clone(), Side::ClientToServer),
            RemoteCommandTap::new(stream, Side::ServerToClient),
        )
    }

    /// Bytes that just went this tap's way.
    pub fn observe(&mut self, bytes: &[u8]) {
        let Some(decoder) = &mut self.decoder else {
            let dir = match self.side {
                Side::ClientToServer => Direction::In,
                Side::ServerToClient => Direction::Out,
            };
            self.record(255, dir, bytes);
            return;
        };
        // Everything one read brought for a channel becomes one frame: a message split
        // over several WebSocket frames should replay as one write.
        let mut frames: Vec<(u8, Vec<u8>)> = Vec::new();
        let result = decoder.push(bytes, &mut |channel, data| match frames.last_mut() {
            Some((last, buf)) if *last == channel => buf.extend_from_slice(data),
            _ => frames.push((channel, data.to_vec())),
        });
        for (channel, data) in frames {
            if let Some(dir) = Direction::from_channel(channel) {
                self.record(channel, dir, &data);
            }
        }
        if let Err(err) = result {
            warn!(audit_id = %self.stream.audit_id(), side = ?self.side, %err, "stream not decodable; recording the rest opaque");
            self.decoder = None;
        }
    }
}

/// Copies both ways between the client and the upstream until both directions end
/// (like `tokio::io::copy_bidirectional`), showing every chunk to its tap after it
/// was forwarded. Returns the bytes sent (to the server, to the client).
pub async fn splice_recorded<C, U>(
    client: C,
    upstream: U,
    to_server: RemoteCommandTap,
    to_client: RemoteCommandTap,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    tokio::try_join!(
        copy_tapped(client_read, upstream_write, to_server),
        copy_tapped(upstream_read, client_write, to_client)
    )
}

async fn copy_tapped<R, W>(
    mut from: R,
    mut to: W,
    mut tap: RemoteCommandTap,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other direction may still have data to deliver.
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        tap.observe(&buf[..n]);
        total += n as u64;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One WebSocket frame: `mask` makes it a client's.
    pub(crate) fn ws_frame(
        fin: bool,
        opcode: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    fn channel_message(channel: u8, data: &[u8]) -> Vec<u8> {
        let mut m = vec![channel];
        m.extend_from_slice(data);
        m
    }

    /// Decodes `wire` fed in pieces of `step` bytes; joins pieces of the same channel.
    fn decode(wire: &[u8], step: usize) -> Vec<(u8, Vec<u8>)> {
        let mut decoder = WsDecoder::new();
        let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
        for piece in wire.chunks(step) {
            decoder
                .push(piece, &mut |c, d| match got.last_mut() {
                    Some((last, buf)) if *last == c => buf.extend_from_slice(d),
                    _ => got.push((c, d.to_vec())),
                })
                .unwrap();
        }
        got
    }

    fn sample_wire(mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut wire = Vec::new();
        wire.extend(ws_frame(true, 2, &channel_message(0, b"ls -l\n"), mask));
        // A ping between messages, and one between fragments.
        wire.extend(ws_frame(true, 9, b"hi", mask));
        let big = vec![b'x'; 300];
        wire.extend(ws_frame(true, 2, &channel_message(1, &big), mask));
        wire.extend(ws_frame(false, 2, &channel_message(2, b"err"), mask));
        wire.extend(ws_frame(true, 10, b"", mask));
        wire.extend(ws_frame(true, 0, b"or\n", mask));
        wire.extend(ws_frame(
            true,
            2,
            &channel_message(4, br#"{"Width":80,"Height":24}"#),
            mask,
        ));
        // v5 close signal for stdin.
        wire.extend(ws_frame(true, 2, &[255, 0], mask));
        wire
    }

    fn expected() -> Vec<(u8, Vec<u8>)> {
        vec![
            (0, b"ls -l\n".to_vec()),
            (1, vec![b'x'; 300]),
            (2, b"error\n".to_vec()),
            (4, br#"{"Width":80,"Height":24}"#.to_vec()),
            (255, vec![0]),
        ]
    }

    #[test]
    fn decodes_unmasked_and_masked_frames_split_anywhere() {
        for mask in [None, Some([0x12, 0x34, 0x56, 0x78])] {
            let wire = sample_wire(mask);
            for step in [1, 2, 3, 5, 7, 13, 64, wire.len()] {
                assert_eq!(
                    decode(&wire, step),
                    expected(),
                    "mask {mask:?}, step {step}"
                );
            }
        }
    }

    #[test]
    fn sixty_four_bit_lengths() {
        let payload = channel_message(1, &vec![7u8; 70_000]);
        let wire = ws_frame(true, 2, &payload, Some([1, 2, 3, 4]));
        assert_eq!(wire[1] & 0x7f, 127);
        assert_eq!(decode(&wire, 4096), vec![(1, vec![7u8; 70_000])]);
    }

    #[test]
    fn compression_and_bad_fragments_are_errors() {
        let mut d = WsDecoder::new();
        let mut compressed = ws_frame(true, 2, b"\x01abc", None);
        compressed[0] |= 0x40;
        assert_eq!(
            d.push(&compressed, &mut |_, _| {}),
            Err(WsError::Reserved(0x40))
        );
        // Stays failed.
        assert!(d
            .push(&ws_frame(true, 2, b"\x01a", None), &mut |_, _| {})
            .is_err());

        let mut d = WsDecoder::new();
        let stray = ws_frame(true, 0, b"x", None);
        assert_eq!(d.push(&stray, &mut |_, _| {}), Err(WsError::Fragmentation));
    }

    #[test]
    fn negotiated_protocols() {
        let p =
            StreamProtocol::negotiated(Some("websocket"), Some("v5.channel.k8s.io"), Some("exec"));
        assert_eq!(p, StreamProtocol::Channels("v5.channel.k8s.io".into()));
        assert!(p.decoded());
        assert_eq!(
            StreamProtocol::negotiated(Some("SPDY/3.1"), None, Some("exec")),
            StreamProtocol::Spdy
        );
        let pf = StreamProtocol::negotiated(
            Some("websocket"),
            Some("v4.channel.k8s.io"),
            Some("portforward"),
        );
        assert!(!pf.decoded());
        let b64 = StreamProtocol::negotiated(
            Some("websocket"),
            Some("base64.channel.k8s.io"),
            Some("exec"),
        );
        assert_eq!(b64.name(), "base64.channel.k8s.io");
        assert!(!b64.decoded());
    }
}
