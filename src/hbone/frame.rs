//! HTTP/2 frame codec (RFC 9113 §4, §6): an incremental [`Decoder`] that cuts frames out of byte
//! slices split at any point (DATA as ranges of those slices, never buffered), and `encode_*`
//! functions that append frames to a caller's buffer ([`data_header`] for a caller that writes
//! DATA's bytes from its own).
//!
//! No I/O and no connection state: which frame may come when (CONTINUATION sequencing, stream
//! states, flow control) is `conn`'s business. What a single frame can get wrong on its own —
//! a length over the max frame size, a bad padding length, a SETTINGS value out of range, a
//! frame on the wrong stream — is decided here and returned as an [`Invalid`] carrying the
//! RFC's error code. Peer bytes are hostile: nothing here panics on them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The client connection preface (RFC 9113 §3.4), sent before the client's first SETTINGS.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Size of the frame header: 24-bit length, type, flags, 31-bit stream id.
pub const HEADER_LEN: usize = 9;

/// Smallest value SETTINGS_MAX_FRAME_SIZE may take, and its default (RFC 9113 §6.5.2).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// Largest value SETTINGS_MAX_FRAME_SIZE may take (2^24 - 1).
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
/// Largest flow-control window (2^31 - 1, RFC 9113 §6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// Initial stream and connection window before SETTINGS say otherwise (RFC 9113 §6.9.2).
pub const DEFAULT_WINDOW: u32 = 65_535;

/// Frame type codes (RFC 9113 §6).
mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags (RFC 9113 §6).
mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS parameter identifiers (RFC 9113 §6.5.2).
mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// An HTTP/2 error code (RFC 9113 §7), as carried by RST_STREAM and GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(pub u32);

impl Reason {
    /// Graceful shutdown or a clean stream cancel.
    pub const NO_ERROR: Reason = Reason(0x0);
    /// A protocol violation.
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    /// An unexpected internal failure.
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    /// The peer broke flow control.
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    /// SETTINGS were not acknowledged in time.
    pub const SETTINGS_TIMEOUT: Reason = Reason(0x4);
    /// A frame arrived on a half-closed stream.
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    /// A frame had an invalid size.
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    /// The stream was refused before any processing; safe to retry.
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    /// The stream is no longer needed.
    pub const CANCEL: Reason = Reason(0x8);
    /// The header compression context broke.
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    /// The CONNECT tunnel's TCP connection was reset or failed (RFC 9113 §8.5).
    pub const CONNECT_ERROR: Reason = Reason(0xa);
    /// The peer is generating excessive load.
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
    /// The transport's security properties are not good enough.
    pub const INADEQUATE_SECURITY: Reason = Reason(0xc);
    /// HTTP/1.1 is required instead.
    pub const HTTP_1_1_REQUIRED: Reason = Reason(0xd);
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            other => return write!(f, "error code {other:#x}"),
        };
        f.write_str(name)
    }
}

/// A frame that breaks RFC 9113 on its own; `stream` says whether it is a stream error (reset
/// that stream) or, when `None`, a connection error (GOAWAY and close).
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("{what}: {reason}")]
pub struct Invalid {
    /// The error code the RFC names for this violation.
    pub reason: Reason,
    /// Stream to reset for a stream error; `None` for a connection error.
    pub stream: Option<u32>,
    /// What was wrong, a lowercase fragment.
    pub what: &'static str,
}

impl Invalid {
    fn connection(reason: Reason, what: &'static str) -> Invalid {
        Invalid { reason, stream: None, what }
    }
}

/// SETTINGS parameters a peer sent; `None` for each one it left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub header_table_size: Option<u32>,
    /// SETTINGS_ENABLE_PUSH (0 or 1).
    pub enable_push: Option<u32>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: Option<u32>,
    /// SETTINGS_INITIAL_WINDOW_SIZE (at most 2^31 - 1).
    pub initial_window_size: Option<u32>,
    /// SETTINGS_MAX_FRAME_SIZE (2^14 ..= 2^24 - 1).
    pub max_frame_size: Option<u32>,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: Option<u32>,
}

/// One decoded frame, DATA in pieces. Control frames' payload slices share the decoder's buffer;
/// DATA is ranges of the caller's input (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The start of a DATA frame: its header (and pad length) arrived. The data follows as
    /// [`Frame::DataChunk`]s, as it arrives, then [`Frame::DataEnd`]; nothing of it is copied.
    DataHead {
        /// Stream the data belongs to.
        stream_id: u32,
        /// Data bytes that follow (padding removed).
        len: u32,
        /// The whole payload length, padding included: what flow control counts (RFC 9113
        /// §6.9), known from the header so windows are checked before any data is delivered.
        flow_len: u32,
        /// END_STREAM: the sender's last frame on this stream.
        end_stream: bool,
    },
    /// Some of the current DATA frame's data: `input[data]` of the `next_frame` call that
    /// returned it (a slice of the caller's buffer, not a copy).
    DataChunk {
        /// Stream the data belongs to.
        stream_id: u32,
        /// Where the bytes are in the input.
        data: std::ops::Range<usize>,
    },
    /// The current DATA frame's last byte (and padding) arrived.
    DataEnd {
        /// Stream the data belonged to.
        stream_id: u32,
        /// END_STREAM, as in the frame's header.
        end_stream: bool,
    },
    /// HEADERS (padding and priority fields removed): the start of a header block.
    Headers {
        /// Stream the header block opens or continues.
        stream_id: u32,
        /// HPACK-encoded header block fragment.
        block: Bytes,
        /// END_STREAM: no DATA follows.
        end_stream: bool,
        /// END_HEADERS: no CONTINUATION follows.
        end_headers: bool,
    },
    /// CONTINUATION: more of a header block.
    Continuation {
        /// Stream of the header block.
        stream_id: u32,
        /// HPACK-encoded header block fragment.
        block: Bytes,
        /// END_HEADERS: the block is complete.
        end_headers: bool,
    },
    /// PRIORITY: deprecated by RFC 9113 and ignored, but still parsed for its length check.
    Priority {
        /// Stream the priority was about.
        stream_id: u32,
    },
    /// RST_STREAM: the sender ends the stream abruptly.
    RstStream {
        /// Stream being reset.
        stream_id: u32,
        /// Why.
        reason: Reason,
    },
    /// SETTINGS (not an ACK).
    Settings(Settings),
    /// SETTINGS with ACK: the peer applied our SETTINGS.
    SettingsAck,
    /// PING, or its ACK.
    Ping {
        /// ACK flag: this answers one of our PINGs.
        ack: bool,
        /// Opaque payload echoed by the ACK.
        payload: [u8; 8],
    },
    /// GOAWAY: the sender accepts no stream above `last_stream_id`.
    GoAway {
        /// Highest peer-initiated stream the sender processed or may process.
        last_stream_id: u32,
        /// Why the connection is going away.
        reason: Reason,
        /// Opaque debug data.
        debug: Bytes,
    },
    /// WINDOW_UPDATE: the sender allows `increment` more bytes (stream 0: the connection).
    WindowUpdate {
        /// Stream, or 0 for the connection window.
        stream_id: u32,
        /// Bytes added to the window (never 0: that is rejected while decoding).
        increment: u32,
    },
    /// PUSH_PROMISE: never allowed here, since we send SETTINGS_ENABLE_PUSH = 0.
    PushPromise {
        /// Stream the promise arrived on.
        stream_id: u32,
    },
    /// A frame type this codec does not know: ignored (RFC 9113 §4.1).
    Unknown {
        /// The frame type code.
        kind: u8,
    },
}

/// Incremental frame decoder: call [`Decoder::next_frame`] with each slice as it arrives until
/// it returns `Ok(None)` (the slice is used up, any partial frame kept).
///
/// DATA payloads are never buffered: they come out as [`Frame::DataChunk`] ranges of the
/// caller's slice, as much as each slice holds, so a tunnel's bytes go from the TLS layer's
/// plaintext to the local socket without a copy here (and without a refcount per frame). The
/// decoder keeps at most a frame header and one partial non-DATA frame, and a frame longer
/// than `max_frame_size` is refused from its 9-byte header, before its payload is buffered.
#[derive(Debug)]
pub struct Decoder {
    /// The current frame's header as it arrives, and DATA's pad length byte after it.
    head: [u8; HEADER_LEN + 1],
    head_len: usize,
    /// The payload of a partial non-DATA frame.
    buf: BytesMut,
    /// Inside a DATA frame: what is left of it.
    data: Option<DataLeft>,
    /// Preface bytes still expected (server side), compared as they arrive so that a non-HTTP/2
    /// peer is refused at its first wrong byte.
    preface_left: usize,
    max_frame_size: u32,
}

/// The rest of the DATA frame being decoded.
#[derive(Debug, Clone, Copy)]
struct DataLeft {
    stream_id: u32,
    data: usize,
    padding: usize,
    end_stream: bool,
}

impl Decoder {
    /// A decoder for the server side: expects the client preface first.
    pub fn server(max_frame_size: u32) -> Decoder {
        Decoder::new(PREFACE.len(), max_frame_size)
    }

    /// A decoder for the client side: frames from the first byte.
    pub fn client(max_frame_size: u32) -> Decoder {
        Decoder::new(0, max_frame_size)
    }

    fn new(preface_left: usize, max_frame_size: u32) -> Decoder {
        Decoder {
            head: [0; HEADER_LEN + 1],
            head_len: 0,
            buf: BytesMut::new(),
            data: None,
            preface_left,
            max_frame_size,
        }
    }

    /// Bytes held but not yet decoded: a partial frame header and a partial non-DATA frame.
    pub fn buffered(&self) -> usize {
        self.head_len + self.buf.len()
    }

    /// The next frame (or piece of DATA) from `input[*at..]`, advancing `*at` past what it
    /// used; `Ok(None)` once `input` is used up, or the violation.
    pub fn next_frame(&mut self, input: &[u8], at: &mut usize) -> Result<Option<Frame>, Invalid> {
        let avail = |at: usize| input.len().saturating_sub(at);
        if self.preface_left > 0 {
            let done = PREFACE.len() - self.preface_left;
            let n = avail(*at).min(self.preface_left);
            let expected = PREFACE.get(done..done + n).unwrap_or_default();
            if input.get(*at..*at + n) != Some(expected) {
                return Err(Invalid::connection(Reason::PROTOCOL_ERROR, "client preface mismatch"));
            }
            *at += n;
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(None);
            }
        }
        if let Some(d) = &mut self.data {
            if d.data > 0 {
                let n = d.data.min(avail(*at));
                if n == 0 {
                    return Ok(None);
                }
                d.data -= n;
                let data = *at..*at + n;
                *at += n;
                return Ok(Some(Frame::DataChunk { stream_id: d.stream_id, data }));
            }
            let n = d.padding.min(avail(*at));
            d.padding -= n;
            *at += n;
            if d.padding > 0 {
                return Ok(None);
            }
            let DataLeft { stream_id, end_stream, .. } = *d;
            self.data = None;
            return Ok(Some(Frame::DataEnd { stream_id, end_stream }));
        }
        if !self.fill_head(input, at, HEADER_LEN) {
            return Ok(None);
        }
        let h = self.head;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let (kind, flags) = (h[3], h[4]);
        let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_WINDOW;
        if len > self.max_frame_size {
            return Err(Invalid::connection(Reason::FRAME_SIZE_ERROR, "frame longer than max frame size"));
        }
        // len <= 2^24 - 1, so this cannot overflow a usize.
        let len_usize = len as usize;
        if kind == kind::DATA {
            need_stream(stream_id, "data on stream 0")?;
            let (mut data, mut padding) = (len_usize, 0);
            if flags & flag::PADDED != 0 {
                if len == 0 {
                    return Err(Invalid::connection(
                        Reason::FRAME_SIZE_ERROR,
                        "padded frame without pad length",
                    ));
                }
                if !self.fill_head(input, at, HEADER_LEN + 1) {
                    return Ok(None);
                }
                padding = usize::from(self.head[HEADER_LEN]);
                data = len_usize - 1; // len >= 1
                if padding > data {
                    return Err(Invalid::connection(Reason::PROTOCOL_ERROR, "padding longer than payload"));
                }
                data -= padding;
            }
            self.head_len = 0;
            let end_stream = flags & flag::END_STREAM != 0;
            self.data = Some(DataLeft { stream_id, data, padding, end_stream });
            // data <= len < 2^24.
            return Ok(Some(Frame::DataHead { stream_id, len: data as u32, flow_len: len, end_stream }));
        }
        if self.buf.is_empty() {
            // Reserve the whole payload once, rather than growing by each slice.
            self.buf.reserve(len_usize);
        }
        let n = (len_usize - self.buf.len()).min(avail(*at));
        self.buf.extend_from_slice(input.get(*at..*at + n).unwrap_or_default());
        *at += n;
        if self.buf.len() < len_usize {
            return Ok(None);
        }
        self.head_len = 0;
        let payload = self.buf.split().freeze();
        parse(kind, flags, stream_id, payload).map(Some)
    }

    /// Copies header bytes from `input[*at..]` until `head` holds `want`; true once it does.
    fn fill_head(&mut self, input: &[u8], at: &mut usize, want: usize) -> bool {
        let n = want.saturating_sub(self.head_len).min(input.len().saturating_sub(*at));
        if let (Some(dst), Some(src)) =
            (self.head.get_mut(self.head_len..self.head_len + n), input.get(*at..*at + n))
        {
            dst.copy_from_slice(src);
        }
        self.head_len += n;
        *at += n;
        self.head_len >= want
    }
}

/// Removes the PADDED fields: the pad length byte at the front and the padding at the end.
fn strip_padding(flags: u8, mut payload: Bytes) -> Result<Bytes, Invalid> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(Invalid::connection(Reason::FRAME_SIZE_ERROR, "padded frame without pad length"));
    };
    payload.advance(1);
    let pad = usize::from(pad);
    if pad > payload.len() {
        return Err(Invalid::connection(Reason::PROTOCOL_ERROR, "padding longer than payload"));
    }
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

fn need_stream(stream_id: u32, what: &'static str) -> Result<(), Invalid> {
    if stream_id == 0 {
        return Err(Invalid::connection(Reason::PROTOCOL_ERROR, what));
    }
    Ok(())
}

fn need_connection(stream_id: u32, what: &'static str) -> Result<(), Invalid> {
    if stream_id != 0 {
        return Err(Invalid::connection(Reason::PROTOCOL_ERROR, what));
    }
    Ok(())
}

fn be32(b: &[u8]) -> u32 {
    match b {
        [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

fn parse(kind: u8, flags: u8, stream_id: u32, mut payload: Bytes) -> Result<Frame, Invalid> {
    let len = payload.len();
    match kind {
        kind::HEADERS => {
            need_stream(stream_id, "headers on stream 0")?;
            let mut block = strip_padding(flags, payload)?;
            if flags & flag::PRIORITY != 0 {
                if block.len() < 5 {
                    return Err(Invalid::connection(
                        Reason::FRAME_SIZE_ERROR,
                        "headers too short for priority",
                    ));
                }
                let dependency = be32(&block) & MAX_WINDOW;
                if dependency == stream_id {
                    return Err(Invalid {
                        reason: Reason::PROTOCOL_ERROR,
                        stream: Some(stream_id),
                        what: "stream depends on itself",
                    });
                }
                block.advance(5);
            }
            Ok(Frame::Headers {
                stream_id,
                block,
                end_stream: flags & flag::END_STREAM != 0,
                end_headers: flags & flag::END_HEADERS != 0,
            })
        }
        kind::PRIORITY => {
            need_stream(stream_id, "priority on stream 0")?;
            if len != 5 {
                return Err(Invalid {
                    reason: Reason::FRAME_SIZE_ERROR,
                    stream: Some(stream_id),
                    what: "priority length not 5",
                });
            }
            Ok(Frame::Priority { stream_id })
        }
        kind::RST_STREAM => {
            need_stream(stream_id, "rst_stream on stream 0")?;
            if len != 4 {
                return Err(Invalid::connection(Reason::FRAME_SIZE_ERROR, "rst_stream length not 4"));
            }
            Ok(Frame::RstStream { stream_id, reason: Reason(be32(&payload)) })
        }
        kind::SETTINGS => {
            need_connection(stream_id, "settings on a stream")?;
            if flags & flag::ACK != 0 {
                if len != 0 {
                    return Err(Invalid::connection(Reason::FRAME_SIZE_ERROR, "settings ack with payload"));
                }
                return Ok(Frame::SettingsAck);
            }
            if !len.is_multiple_of(6) {
                return Err(Invalid::connection(
                    Reason::FRAME_SIZE_ERROR,
                    "settings length not a multiple of 6",
                ));
            }
            let mut s = Settings::default();
            while payload.remaining() >= 6 {
                let id = payload.get_u16();
                let value = payload.get_u32();
                match id {
                    setting::HEADER_TABLE_SIZE => s.header_table_size = Some(value),
                    setting::ENABLE_PUSH => {
                        if value > 1 {
                            return Err(Invalid::connection(
                                Reason::PROTOCOL_ERROR,
                                "enable_push not 0 or 1",
                            ));
                        }
                        s.enable_push = Some(value);
                    }
                    setting::MAX_CONCURRENT_STREAMS => s.max_concurrent_streams = Some(value),
                    setting::INITIAL_WINDOW_SIZE => {
                        if value > MAX_WINDOW {
                            return Err(Invalid::connection(
                                Reason::FLOW_CONTROL_ERROR,
                                "initial window size over 2^31-1",
                            ));
                        }
                        s.initial_window_size = Some(value);
                    }
                    setting::MAX_FRAME_SIZE => {
                        if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) {
                            return Err(Invalid::connection(
                                Reason::PROTOCOL_ERROR,
                                "max frame size out of range",
                            ));
                        }
                        s.max_frame_size = Some(value);
                    }
                    setting::MAX_HEADER_LIST_SIZE => s.max_header_list_size = Some(value),
                    // Unknown settings MUST be ignored (RFC 9113 §6.5.2).
                    _ => {}
                }
            }
            Ok(Frame::Settings(s))
        }
        kind::PUSH_PROMISE => Ok(Frame::PushPromise { stream_id }),
        kind::PING => {
            need_connection(stream_id, "ping on a stream")?;
            let payload: [u8; 8] = payload[..]
                .try_into()
                .map_err(|_| Invalid::connection(Reason::FRAME_SIZE_ERROR, "ping length not 8"))?;
            Ok(Frame::Ping { ack: flags & flag::ACK != 0, payload })
        }
        kind::GOAWAY => {
            need_connection(stream_id, "goaway on a stream")?;
            if len < 8 {
                return Err(Invalid::connection(Reason::FRAME_SIZE_ERROR, "goaway shorter than 8"));
            }
            let last_stream_id = be32(&payload) & MAX_WINDOW;
            let reason = Reason(be32(payload.get(4..).unwrap_or_default()));
            payload.advance(8);
            Ok(Frame::GoAway { last_stream_id, reason, debug: payload })
        }
        kind::WINDOW_UPDATE => {
            if len != 4 {
                return Err(Invalid::connection(Reason::FRAME_SIZE_ERROR, "window_update length not 4"));
            }
            let increment = be32(&payload) & MAX_WINDOW;
            if increment == 0 {
                return Err(Invalid {
                    reason: Reason::PROTOCOL_ERROR,
                    stream: (stream_id != 0).then_some(stream_id),
                    what: "window_update of 0",
                });
            }
            Ok(Frame::WindowUpdate { stream_id, increment })
        }
        kind::CONTINUATION => {
            need_stream(stream_id, "continuation on stream 0")?;
            Ok(Frame::Continuation { stream_id, block: payload, end_headers: flags & flag::END_HEADERS != 0 })
        }
        other => Ok(Frame::Unknown { kind: other }),
    }
}

/// Appends a frame header. `len` must fit 24 bits (callers split at the max frame size).
pub fn encode_header(dst: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    debug_assert!(len <= MAX_MAX_FRAME_SIZE as usize);
    let len = (len as u32).to_be_bytes();
    dst.put_slice(&[len[1], len[2], len[3], kind, flags]);
    dst.put_u32(stream_id & MAX_WINDOW);
}

/// The header of a DATA frame of `len` bytes (no padding), for a caller that writes it in front
/// of its own bytes; `len` must not exceed the peer's max frame size.
pub fn data_header(stream_id: u32, len: usize, end_stream: bool) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_MAX_FRAME_SIZE as usize);
    let l = (len as u32).to_be_bytes();
    let id = (stream_id & MAX_WINDOW).to_be_bytes();
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    [l[1], l[2], l[3], kind::DATA, flags, id[0], id[1], id[2], id[3]]
}

/// Appends one DATA frame (no padding); `data.len()` must not exceed the peer's max frame size.
pub fn encode_data(dst: &mut BytesMut, stream_id: u32, data: &[u8], end_stream: bool) {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    dst.reserve(HEADER_LEN + data.len());
    encode_header(dst, data.len(), kind::DATA, flags, stream_id);
    dst.put_slice(data);
}

/// Appends a header block as HEADERS plus as many CONTINUATION frames as `max_frame_size`
/// requires.
pub fn encode_headers(
    dst: &mut BytesMut,
    stream_id: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
) {
    let max = (max_frame_size as usize).max(1);
    let mut chunks = block.chunks(max);
    let first = chunks.next().unwrap_or_default();
    let mut rest = chunks.peekable();
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if rest.peek().is_none() {
        flags |= flag::END_HEADERS;
    }
    dst.reserve(HEADER_LEN + block.len());
    encode_header(dst, first.len(), kind::HEADERS, flags, stream_id);
    dst.put_slice(first);
    while let Some(chunk) = rest.next() {
        let flags = if rest.peek().is_none() { flag::END_HEADERS } else { 0 };
        encode_header(dst, chunk.len(), kind::CONTINUATION, flags, stream_id);
        dst.put_slice(chunk);
    }
}

/// Appends RST_STREAM.
pub fn encode_rst_stream(dst: &mut BytesMut, stream_id: u32, reason: Reason) {
    encode_header(dst, 4, kind::RST_STREAM, 0, stream_id);
    dst.put_u32(reason.0);
}

/// Appends SETTINGS with the parameters that are `Some`, in identifier order.
pub fn encode_settings(dst: &mut BytesMut, s: &Settings) {
    let params = [
        (setting::HEADER_TABLE_SIZE, s.header_table_size),
        (setting::ENABLE_PUSH, s.enable_push),
        (setting::MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
        (setting::INITIAL_WINDOW_SIZE, s.initial_window_size),
        (setting::MAX_FRAME_SIZE, s.max_frame_size),
        (setting::MAX_HEADER_LIST_SIZE, s.max_header_list_size),
    ];
    let n = params.iter().filter(|(_, v)| v.is_some()).count();
    encode_header(dst, n * 6, kind::SETTINGS, 0, 0);
    for (id, value) in params {
        if let Some(value) = value {
            dst.put_u16(id);
            dst.put_u32(value);
        }
    }
}

/// Appends a SETTINGS ACK.
pub fn encode_settings_ack(dst: &mut BytesMut) {
    encode_header(dst, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Appends PING (or its ACK).
pub fn encode_ping(dst: &mut BytesMut, ack: bool, payload: [u8; 8]) {
    encode_header(dst, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    dst.put_slice(&payload);
}

/// Appends GOAWAY.
pub fn encode_goaway(dst: &mut BytesMut, last_stream_id: u32, reason: Reason, debug: &[u8]) {
    encode_header(dst, 8 + debug.len(), kind::GOAWAY, 0, 0);
    dst.put_u32(last_stream_id & MAX_WINDOW);
    dst.put_u32(reason.0);
    dst.put_slice(debug);
}

/// Appends WINDOW_UPDATE; `increment` must be in 1 ..= 2^31 - 1.
pub fn encode_window_update(dst: &mut BytesMut, stream_id: u32, increment: u32) {
    encode_header(dst, 4, kind::WINDOW_UPDATE, 0, stream_id);
    dst.put_u32(increment & MAX_WINDOW);
}

/// Appends PRIORITY (only tests send it: we never prioritise).
pub fn encode_priority(dst: &mut BytesMut, stream_id: u32, dependency: u32, weight: u8) {
    encode_header(dst, 5, kind::PRIORITY, 0, stream_id);
    dst.put_u32(dependency & MAX_WINDOW);
    dst.put_u8(weight);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as the tests compare it: DATA gathered from its pieces.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Got {
        Frame(Frame),
        Data { stream_id: u32, data: Vec<u8>, end_stream: bool, flow_len: u32 },
    }

    /// A decoder whose DATA pieces are gathered into whole frames, checking that each piece is a
    /// range of the slice just fed.
    struct Reader {
        dec: Decoder,
        data: Option<(u32, Vec<u8>, u32)>,
    }

    impl Reader {
        fn server() -> Reader {
            Reader { dec: Decoder::server(DEFAULT_MAX_FRAME_SIZE), data: None }
        }

        fn client() -> Reader {
            Reader { dec: Decoder::client(DEFAULT_MAX_FRAME_SIZE), data: None }
        }

        fn feed(&mut self, input: &[u8]) -> Result<Vec<Got>, Invalid> {
            let (mut at, mut got) = (0, Vec::new());
            while let Some(f) = self.dec.next_frame(input, &mut at)? {
                match f {
                    Frame::DataHead { stream_id, flow_len, .. } => {
                        self.data = Some((stream_id, Vec::new(), flow_len));
                    }
                    Frame::DataChunk { stream_id, data } => {
                        let (id, bytes, _) = self.data.as_mut().expect("a chunk inside DATA");
                        assert_eq!(*id, stream_id);
                        bytes.extend_from_slice(&input[data]);
                    }
                    Frame::DataEnd { stream_id, end_stream } => {
                        let (id, data, flow_len) = self.data.take().expect("an end inside DATA");
                        assert_eq!(id, stream_id);
                        got.push(Got::Data { stream_id, data, end_stream, flow_len });
                    }
                    f => got.push(Got::Frame(f)),
                }
            }
            assert_eq!(at, input.len(), "the input is used up");
            Ok(got)
        }
    }

    fn one(bytes: &[u8]) -> Result<Got, Invalid> {
        let mut r = Reader::client();
        let mut got = r.feed(bytes)?;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(r.dec.buffered(), 0);
        Ok(got.remove(0))
    }

    /// A sample of every frame type we send, after the preface, with the frames expected back.
    fn sample() -> (Vec<u8>, Vec<Got>) {
        let mut b = BytesMut::new();
        b.put_slice(PREFACE);
        let settings = Settings {
            enable_push: Some(0),
            max_concurrent_streams: Some(100),
            initial_window_size: Some(4 << 20),
            max_frame_size: Some(1 << 20),
            max_header_list_size: Some(65_536),
            ..Settings::default()
        };
        encode_settings(&mut b, &settings);
        encode_settings_ack(&mut b);
        encode_window_update(&mut b, 0, 16 << 20);
        encode_headers(&mut b, 1, b"0123456789", false, 4);
        encode_data(&mut b, 1, b"hello", false);
        encode_data(&mut b, 1, b"", true);
        encode_priority(&mut b, 3, 1, 16);
        encode_rst_stream(&mut b, 3, Reason::CONNECT_ERROR);
        encode_ping(&mut b, false, *b"12345678");
        encode_ping(&mut b, true, *b"abcdefgh");
        encode_goaway(&mut b, 7, Reason::NO_ERROR, b"drain");
        let expected = vec![
            Got::Frame(Frame::Settings(settings)),
            Got::Frame(Frame::SettingsAck),
            Got::Frame(Frame::WindowUpdate { stream_id: 0, increment: 16 << 20 }),
            Got::Frame(Frame::Headers {
                stream_id: 1,
                block: Bytes::from_static(b"0123"),
                end_stream: false,
                end_headers: false,
            }),
            Got::Frame(Frame::Continuation {
                stream_id: 1,
                block: Bytes::from_static(b"4567"),
                end_headers: false,
            }),
            Got::Frame(Frame::Continuation {
                stream_id: 1,
                block: Bytes::from_static(b"89"),
                end_headers: true,
            }),
            Got::Data { stream_id: 1, data: b"hello".to_vec(), end_stream: false, flow_len: 5 },
            Got::Data { stream_id: 1, data: Vec::new(), end_stream: true, flow_len: 0 },
            Got::Frame(Frame::Priority { stream_id: 3 }),
            Got::Frame(Frame::RstStream { stream_id: 3, reason: Reason::CONNECT_ERROR }),
            Got::Frame(Frame::Ping { ack: false, payload: *b"12345678" }),
            Got::Frame(Frame::Ping { ack: true, payload: *b"abcdefgh" }),
            Got::Frame(Frame::GoAway {
                last_stream_id: 7,
                reason: Reason::NO_ERROR,
                debug: Bytes::from_static(b"drain"),
            }),
        ];
        (b.to_vec(), expected)
    }

    #[test]
    fn every_frame_type_round_trips() {
        let (bytes, expected) = sample();
        let mut r = Reader::server();
        assert_eq!(r.feed(&bytes).unwrap(), expected);
        assert_eq!(r.dec.buffered(), 0);
    }

    #[test]
    fn a_stream_fed_one_byte_at_a_time_decodes_the_same() {
        let (bytes, expected) = sample();
        let mut r = Reader::server();
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(r.feed(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn a_stream_split_at_every_point_decodes_the_same() {
        let (bytes, expected) = sample();
        for split in 0..=bytes.len() {
            let mut r = Reader::server();
            let mut got = r.feed(&bytes[..split]).unwrap();
            got.extend(r.feed(&bytes[split..]).unwrap());
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn a_data_frame_larger_than_one_read_arrives_intact_as_slices_of_each_read_never_buffered() {
        let payload: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut b = BytesMut::new();
        for chunk in payload.chunks(16_384) {
            encode_data(&mut b, 1, chunk, false);
        }
        let mut dec = Decoder::client(DEFAULT_MAX_FRAME_SIZE);
        let (mut got, mut heads) = (Vec::new(), 0);
        // Reads of 5,000 bytes, as TLS records would cut the stream: frames straddle them.
        for read in b.chunks(5_000) {
            let mut at = 0;
            while let Some(f) = dec.next_frame(read, &mut at).unwrap() {
                match f {
                    Frame::DataHead { stream_id: 1, len, flow_len, end_stream: false } => {
                        assert_eq!(len, flow_len);
                        heads += 1;
                    }
                    Frame::DataChunk { stream_id: 1, data } => {
                        assert!(data.end <= read.len(), "a range of this read");
                        got.extend_from_slice(&read[data]);
                    }
                    Frame::DataEnd { stream_id: 1, end_stream: false } => {}
                    other => panic!("unexpected {other:?}"),
                }
                // At most a frame header is ever held: the data is never copied in.
                assert!(dec.buffered() < HEADER_LEN, "{} buffered", dec.buffered());
            }
        }
        assert_eq!(heads, 3);
        assert_eq!(got, payload);
    }

    #[test]
    fn padding_is_removed_but_counted_for_flow_control() {
        // DATA, PADDED, pad length 3, "abc", 3 bytes of padding.
        let f = one(&[0, 0, 7, 0, 0x8 | 0x1, 0, 0, 0, 1, 3, b'a', b'b', b'c', 0, 0, 0]).unwrap();
        assert_eq!(f, Got::Data { stream_id: 1, data: b"abc".to_vec(), end_stream: true, flow_len: 7 });
        // HEADERS, PADDED | PRIORITY: pad 1, 5 priority bytes, block "x", 1 pad byte.
        let f = one(&[0, 0, 8, 1, 0x8 | 0x20 | 0x4, 0, 0, 0, 3, 1, 0, 0, 0, 1, 9, b'x', 0]).unwrap();
        assert_eq!(
            f,
            Got::Frame(Frame::Headers {
                stream_id: 3,
                block: Bytes::from_static(b"x"),
                end_stream: false,
                end_headers: true
            })
        );
    }

    #[test]
    fn unknown_frame_types_are_ignored() {
        assert_eq!(
            one(&[0, 0, 2, 0xfa, 0, 0, 0, 0, 1, 1, 2]).unwrap(),
            Got::Frame(Frame::Unknown { kind: 0xfa })
        );
    }

    fn err(bytes: &[u8]) -> (Reason, Option<u32>) {
        let e = one(bytes).unwrap_err();
        (e.reason, e.stream)
    }

    #[test]
    fn malformed_frames_are_errors_with_the_rfc_error_code() {
        use Reason as R;
        // Longer than max frame size: refused from the header alone.
        let mut dec = Decoder::client(DEFAULT_MAX_FRAME_SIZE);
        let err_at = dec.next_frame(&[0, 0x40, 1, 0, 0, 0, 0, 0, 1], &mut 0).unwrap_err();
        assert_eq!(err_at.reason, R::FRAME_SIZE_ERROR);
        // Padding longer than the payload.
        assert_eq!(err(&[0, 0, 2, 0, 0x8, 0, 0, 0, 1, 5, 0]), (R::PROTOCOL_ERROR, None));
        // Padded with no pad length byte.
        assert_eq!(err(&[0, 0, 0, 0, 0x8, 0, 0, 0, 1]), (R::FRAME_SIZE_ERROR, None));
        // DATA on stream 0.
        assert_eq!(err(&[0, 0, 0, 0, 0, 0, 0, 0, 0]), (R::PROTOCOL_ERROR, None));
        // SETTINGS on a stream, of bad length, ACK with payload, push = 2, window too big,
        // frame size too small.
        assert_eq!(err(&[0, 0, 0, 4, 0, 0, 0, 0, 1]), (R::PROTOCOL_ERROR, None));
        assert_eq!(err(&[0, 0, 5, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), (R::FRAME_SIZE_ERROR, None));
        assert_eq!(err(&[0, 0, 6, 4, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]), (R::FRAME_SIZE_ERROR, None));
        assert_eq!(err(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2]), (R::PROTOCOL_ERROR, None));
        assert_eq!(err(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0x80, 0, 0, 0]), (R::FLOW_CONTROL_ERROR, None));
        assert_eq!(err(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0x10, 0]), (R::PROTOCOL_ERROR, None));
        // PING of 7 bytes, on a stream.
        assert_eq!(err(&[0, 0, 7, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]), (R::FRAME_SIZE_ERROR, None));
        assert_eq!(err(&[0, 0, 8, 6, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]), (R::PROTOCOL_ERROR, None));
        // WINDOW_UPDATE of 0: a connection error on stream 0, a stream error elsewhere.
        assert_eq!(err(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0]), (R::PROTOCOL_ERROR, None));
        assert_eq!(err(&[0, 0, 4, 8, 0, 0, 0, 0, 5, 0, 0, 0, 0]), (R::PROTOCOL_ERROR, Some(5)));
        assert_eq!(err(&[0, 0, 3, 8, 0, 0, 0, 0, 5, 0, 0, 1]), (R::FRAME_SIZE_ERROR, None));
        // RST_STREAM of 3 bytes; PRIORITY of 4 bytes (a stream error); GOAWAY of 7 bytes.
        assert_eq!(err(&[0, 0, 3, 3, 0, 0, 0, 0, 1, 0, 0, 8]), (R::FRAME_SIZE_ERROR, None));
        assert_eq!(err(&[0, 0, 4, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0]), (R::FRAME_SIZE_ERROR, Some(1)));
        assert_eq!(err(&[0, 0, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), (R::FRAME_SIZE_ERROR, None));
        // HEADERS with PRIORITY depending on itself.
        assert_eq!(err(&[0, 0, 5, 1, 0x20, 0, 0, 0, 1, 0, 0, 0, 1, 0]), (R::PROTOCOL_ERROR, Some(1)));
    }

    #[test]
    fn a_wrong_preface_is_refused_at_its_first_wrong_byte() {
        let mut dec = Decoder::server(DEFAULT_MAX_FRAME_SIZE);
        assert_eq!(dec.next_frame(b"PRI * HTTP/2.0\r\n", &mut 0), Ok(None));
        assert_eq!(dec.next_frame(b"\r\nGET", &mut 0).unwrap_err().what, "client preface mismatch");
        let mut dec = Decoder::server(DEFAULT_MAX_FRAME_SIZE);
        assert_eq!(dec.next_frame(b"GET / HTTP/1.1\r\n", &mut 0).unwrap_err().reason, Reason::PROTOCOL_ERROR);
    }
}
