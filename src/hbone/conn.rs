//! One HTTP/2 connection carrying CONNECT tunnels, as a sans-IO state machine: the caller feeds
//! the bytes it read ([`Connection::recv`]), takes [`Event`]s ([`Connection::poll_event`]), acts
//! (`open`, `respond`, `send_frame`, `consume`, `finish`, `reset`, `ping`, `go_away`), and writes
//! out whatever was appended to its `BytesMut`. Tunnel bytes never pass through the core: received
//! DATA is handed out as ranges of the caller's input, and sent DATA is a header the core returns
//! for the caller to write in front of its own bytes.
//!
//! No sockets, no runtime, no clocks, no timers: keepalive timing and idle timeouts belong to the
//! driver, which calls [`Connection::ping`] and watches for [`Event::PingAck`].
//!
//! Flow control follows ztunnel's choices (`src/config.rs`, `src/proxy/h2/*.rs`): windows sized
//! for bulk transfer (4 MiB a stream through SETTINGS_INITIAL_WINDOW_SIZE, 16 MiB the connection
//! through a WINDOW_UPDATE right after SETTINGS), frames up to 1 MiB, and window credit given
//! back only as the caller [`Connection::consume`]s data (as ztunnel releases capacity after each
//! read), in WINDOW_UPDATEs of at least half a window. The receive side is therefore bounded by
//! the windows we advertise, whatever the peer does; the send side never queues: `send_frame`
//! takes what the windows allow and the caller keeps the rest until [`Event::Writable`].

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use bytes::BytesMut;

use super::frame::{self, DEFAULT_WINDOW, Frame, MAX_WINDOW, Reason, Settings};
use super::headers::{self, HeaderList};

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The originator: sends the preface and opens CONNECT streams.
    Client,
    /// The terminator: accepts CONNECT streams.
    Server,
}

/// Limits and windows for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE); ztunnel's 4 MiB.
    pub stream_window: u32,
    /// Receive window of the connection; ztunnel's 16 MiB (larger than a stream's, so one
    /// stream cannot starve the others).
    pub connection_window: u32,
    /// Largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE); ztunnel's 1 MiB.
    pub max_frame_size: u32,
    /// Streams the peer may open, and that we open at most (SPEC §12: 100).
    pub max_concurrent_streams: u32,
    /// Largest decoded header list we accept (SETTINGS_MAX_HEADER_LIST_SIZE); ztunnel's
    /// server uses 64 KiB. The compressed block is bounded by the same number.
    pub max_header_list_size: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_concurrent_streams: 100,
            max_header_list_size: 64 << 10,
        }
    }
}

/// Something the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Server: a well-formed CONNECT arrived; answer with [`Connection::respond`].
    Request {
        /// The new stream.
        stream_id: u32,
        /// `:authority`, `host:port`.
        authority: String,
        /// Regular headers, `baggage` among them.
        headers: HeaderList,
    },
    /// Server: a request was refused inside the core (400 for a non-CONNECT or a missing
    /// `:authority`, RST_STREAM for a malformed one or over the stream limit); for counting.
    Refused {
        /// The refused stream.
        stream_id: u32,
        /// The status answered (400, 431), or `None` when the stream was reset unanswered.
        status: Option<u16>,
        /// What was wrong.
        why: &'static str,
    },
    /// Client: the response to our CONNECT (`200` opens the tunnel; others end it).
    Response {
        /// Our stream.
        stream_id: u32,
        /// `:status`.
        status: u16,
        /// Regular headers, the terminator's `baggage` among them.
        headers: HeaderList,
    },
    /// Tunnel bytes from the peer: `input[data]` of the [`Connection::recv`] call that queued
    /// the event (the caller's read buffer, not a copy: drain events before the next `recv`).
    /// Call [`Connection::consume`] once they are passed on.
    Data {
        /// The stream.
        stream_id: u32,
        /// Where the bytes are in the `recv` input.
        data: Range<usize>,
    },
    /// The peer half-closed the stream (END_STREAM): a FIN for the other side.
    End {
        /// The stream.
        stream_id: u32,
    },
    /// The stream was reset, by the peer's RST_STREAM or by us for the peer's protocol error:
    /// never a clean end (a TCP reset for the other side).
    Reset {
        /// The stream, now gone.
        stream_id: u32,
        /// The error code.
        reason: Reason,
    },
    /// The stream's send windows reopened after `send_data` took less than offered.
    Writable {
        /// The stream.
        stream_id: u32,
    },
    /// The peer acknowledged one of our PINGs.
    PingAck {
        /// The payload we sent.
        payload: [u8; 8],
    },
    /// The peer sent GOAWAY: open no new streams; streams above `last_stream_id` were reset.
    GoAway {
        /// The highest of our streams the peer will process.
        last_stream_id: u32,
        /// The peer's reason.
        reason: Reason,
    },
}

/// Errors of [`Connection`] calls.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The peer broke the protocol; GOAWAY with `reason` was appended and the connection is
    /// finished.
    #[error("hbone peer: {what}: {reason}")]
    Protocol {
        /// The error code sent in GOAWAY.
        reason: Reason,
        /// What was wrong.
        what: &'static str,
    },
    /// The connection already failed.
    #[error("hbone connection closed")]
    Closed,
    /// `open` on a connection with as many streams as it may carry: use another connection.
    #[error("hbone connection at its {0} concurrent streams")]
    AtCapacity(u32),
    /// `open` after GOAWAY (either way), or with stream ids used up.
    #[error("hbone connection going away")]
    GoingAway,
    /// The call does not fit this role (`open` on a server, `respond` on a client).
    #[error("hbone: not for this role")]
    WrongRole,
    /// No such stream (never opened, or already closed or reset).
    #[error("hbone stream {0} unknown")]
    UnknownStream(u32),
    /// The stream cannot take this call in its state (data before the 200, after END_STREAM,
    /// a second response).
    #[error("hbone stream {0}: {1}")]
    State(u32, &'static str),
}

/// One stream's state.
#[derive(Debug)]
struct Stream {
    /// Bytes we may still send (can go negative after a SETTINGS change, RFC 9113 §6.9.2).
    send_window: i64,
    /// Bytes the peer may still send.
    recv_window: i64,
    /// Delivered in `Event::Data`, not yet consumed.
    recv_held: u32,
    /// Consumed, not yet given back in a WINDOW_UPDATE.
    recv_unacked: u32,
    /// We sent END_STREAM (or an error response).
    local_closed: bool,
    /// The peer sent END_STREAM.
    remote_closed: bool,
    /// Server: the caller responded. Client: the final response arrived.
    answered: bool,
    /// `send_data` took less than offered; `Event::Writable` is owed.
    blocked: bool,
    /// We opened it (counts against our limit rather than the peer's).
    local: bool,
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct Partial {
    stream_id: u32,
    block: BytesMut,
    end_stream: bool,
}

/// One HTTP/2 connection's state; see the module doc for the calling pattern.
pub struct Connection {
    role: Role,
    cfg: Config,
    dec: frame::Decoder,
    hpack: loona_hpack::Decoder<'static>,
    peer_max_frame_size: u32,
    peer_initial_window: u32,
    peer_max_streams: u32,
    send_window: i64,
    recv_window: i64,
    recv_unacked: u32,
    streams: HashMap<u32, Stream>,
    next_local_id: u32,
    last_peer_id: u32,
    local_open: u32,
    peer_open: u32,
    partial: Option<Partial>,
    /// The stream whose DATA frame is being received and was accepted at its head.
    rx: Option<u32>,
    got_settings: bool,
    goaway_sent: bool,
    goaway_received: bool,
    failed: bool,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("streams", &self.streams.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

type Step = Result<(), frame::Invalid>;

fn conn_err(reason: Reason, what: &'static str) -> frame::Invalid {
    frame::Invalid { reason, stream: None, what }
}

fn stream_err(stream_id: u32, reason: Reason, what: &'static str) -> frame::Invalid {
    frame::Invalid { reason, stream: Some(stream_id), what }
}

impl Connection {
    /// A new connection; appends what we send first: the client preface (client), our SETTINGS,
    /// and the WINDOW_UPDATE that raises the connection window to `cfg.connection_window`.
    pub fn new(role: Role, cfg: Config, out: &mut BytesMut) -> Connection {
        let dec = match role {
            Role::Client => {
                out.extend_from_slice(frame::PREFACE);
                frame::Decoder::client(cfg.max_frame_size)
            }
            Role::Server => frame::Decoder::server(cfg.max_frame_size),
        };
        frame::encode_settings(
            out,
            &Settings {
                // Only a client may send ENABLE_PUSH (RFC 9113 §6.5.2); 0 refuses pushes.
                enable_push: (role == Role::Client).then_some(0),
                max_concurrent_streams: Some(cfg.max_concurrent_streams),
                initial_window_size: Some(cfg.stream_window.min(MAX_WINDOW)),
                max_frame_size: Some(
                    cfg.max_frame_size.clamp(frame::DEFAULT_MAX_FRAME_SIZE, frame::MAX_MAX_FRAME_SIZE),
                ),
                max_header_list_size: Some(cfg.max_header_list_size),
                ..Settings::default()
            },
        );
        let connection_window = cfg.connection_window.clamp(DEFAULT_WINDOW, MAX_WINDOW);
        if connection_window > DEFAULT_WINDOW {
            frame::encode_window_update(out, 0, connection_window - DEFAULT_WINDOW);
        }
        Connection {
            role,
            cfg,
            dec,
            hpack: headers::decoder(),
            peer_max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE,
            peer_initial_window: DEFAULT_WINDOW,
            // Unlimited until the peer's SETTINGS say otherwise (RFC 9113 §6.5.2).
            peer_max_streams: u32::MAX,
            send_window: i64::from(DEFAULT_WINDOW),
            recv_window: i64::from(connection_window),
            recv_unacked: 0,
            streams: HashMap::new(),
            next_local_id: match role {
                Role::Client => 1,
                Role::Server => 2,
            },
            last_peer_id: 0,
            local_open: 0,
            peer_open: 0,
            partial: None,
            rx: None,
            got_settings: false,
            goaway_sent: false,
            goaway_received: false,
            failed: false,
            events: VecDeque::new(),
            scratch: Vec::new(),
        }
    }

    /// Feeds bytes read from the peer: decodes every complete frame, queues events and appends
    /// the answers due (SETTINGS ACK, PING ACK, RST_STREAM for a stream error; WINDOW_UPDATEs
    /// wait for `consume`). A connection error appends GOAWAY, resets every stream (as events)
    /// and is returned; the connection is then finished.
    pub fn recv(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Closed);
        }
        let mut at = 0;
        loop {
            let step = match self.dec.next_frame(input, &mut at) {
                Ok(None) => return Ok(()),
                Ok(Some(f)) => self.on_frame(f, out),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                match e.stream {
                    Some(id) => self.reset_stream(id, e.reason, out),
                    None => return Err(self.fail(e.reason, e.what, out)),
                }
            }
        }
    }

    /// The next event, if any. Drain after each `recv`.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Client: opens a CONNECT stream to `authority` (`IP:port`) with extra `headers` (lowercase
    /// names, e.g. `baggage`). Refused past the concurrent-stream limit (ours or the peer's) so
    /// the pool opens another connection, as ztunnel's pool does.
    pub fn open(
        &mut self,
        authority: &str,
        extra: &[(&str, &[u8])],
        out: &mut BytesMut,
    ) -> Result<u32, Error> {
        self.check_alive()?;
        if self.role != Role::Client {
            return Err(Error::WrongRole);
        }
        if self.goaway_sent || self.goaway_received || self.next_local_id > MAX_WINDOW {
            return Err(Error::GoingAway);
        }
        let limit = self.cfg.max_concurrent_streams.min(self.peer_max_streams);
        if self.local_open >= limit {
            return Err(Error::AtCapacity(limit));
        }
        let id = self.next_local_id;
        self.next_local_id += 2;
        self.scratch.clear();
        headers::encode_request(&mut self.scratch, authority, extra);
        frame::encode_headers(out, id, &self.scratch, false, self.peer_max_frame_size);
        self.streams.insert(id, self.new_stream(true));
        self.local_open += 1;
        Ok(id)
    }

    /// Server: answers a [`Event::Request`]. A 2xx opens the tunnel; any other status ends the
    /// stream (END_STREAM on the HEADERS, as ztunnel's `send_error`), and if the client has not
    /// finished sending, RST_STREAM(NO_ERROR) tells it to stop (RFC 9113 §8.1).
    pub fn respond(
        &mut self,
        stream_id: u32,
        status: u16,
        extra: &[(&str, &[u8])],
        out: &mut BytesMut,
    ) -> Result<(), Error> {
        self.check_alive()?;
        if self.role != Role::Server {
            return Err(Error::WrongRole);
        }
        let s = self.streams.get_mut(&stream_id).ok_or(Error::UnknownStream(stream_id))?;
        if s.answered {
            return Err(Error::State(stream_id, "already answered"));
        }
        s.answered = true;
        let success = (200..300).contains(&status);
        self.scratch.clear();
        headers::encode_response(&mut self.scratch, status, extra);
        frame::encode_headers(out, stream_id, &self.scratch, !success, self.peer_max_frame_size);
        if !success {
            s.local_closed = true;
            if !s.remote_closed {
                frame::encode_rst_stream(out, stream_id, Reason::NO_ERROR);
                self.remove(stream_id, out);
                return Ok(());
            }
            self.remove_if_closed(stream_id, out);
        }
        Ok(())
    }

    /// Takes one DATA frame of at most `len` bytes, as much as the stream and connection
    /// windows and the peer's max frame size allow, and returns how many bytes it carries and
    /// its 9-byte header (0 bytes: the windows are spent, wait for [`Event::Writable`]). The
    /// caller writes the header and then those bytes from its own buffer, after everything
    /// appended to `out` so far and before anything appended later: the payload is never
    /// copied into the core.
    pub fn send_frame(
        &mut self,
        stream_id: u32,
        len: usize,
    ) -> Result<(usize, [u8; frame::HEADER_LEN]), Error> {
        self.check_alive()?;
        let conn_window = self.send_window;
        let max_frame = self.peer_max_frame_size as usize;
        let s = self.writable_stream(stream_id)?;
        let window = usize::try_from(s.send_window.min(conn_window).max(0)).unwrap_or(usize::MAX);
        s.blocked = window < len;
        let n = len.min(window).min(max_frame);
        // n <= window <= 2^31 - 1, so it fits an i64 and the windows stay >= 0.
        s.send_window -= n as i64;
        self.send_window -= n as i64;
        Ok((n, frame::data_header(stream_id, n, false)))
    }

    /// Sends as much of `data` as the windows allow, copied into `out` as DATA frames no
    /// larger than the peer's max frame size; returns how many bytes were taken. For callers
    /// with no room for a header in front of their bytes (tests, in-memory peers); the relay
    /// uses [`Connection::send_frame`].
    pub fn send_data(&mut self, stream_id: u32, data: &[u8], out: &mut BytesMut) -> Result<usize, Error> {
        let mut sent = 0;
        while let Some(rest) = data.get(sent..).filter(|r| !r.is_empty()) {
            let (n, head) = self.send_frame(stream_id, rest.len())?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&head);
            out.extend_from_slice(rest.get(..n).unwrap_or_default());
            sent += n;
        }
        Ok(sent)
    }

    /// Bytes `send_data` would take now on this stream (0 for an unknown or closed stream).
    pub fn send_capacity(&self, stream_id: u32) -> usize {
        self.streams
            .get(&stream_id)
            .filter(|s| !s.local_closed)
            .map_or(0, |s| usize::try_from(s.send_window.min(self.send_window).max(0)).unwrap_or(0))
    }

    /// Half-closes our direction (END_STREAM): the other side's FIN.
    pub fn finish(&mut self, stream_id: u32, out: &mut BytesMut) -> Result<(), Error> {
        self.check_alive()?;
        let s = self.writable_stream(stream_id)?;
        s.local_closed = true;
        frame::encode_data(out, stream_id, &[], true);
        self.remove_if_closed(stream_id, out);
        Ok(())
    }

    /// Resets the stream with RST_STREAM(CONNECT_ERROR): the other side's TCP connection was
    /// reset or failed (RFC 9113 §8.5). Unknown streams are ignored (already gone).
    pub fn reset(&mut self, stream_id: u32, out: &mut BytesMut) -> Result<(), Error> {
        self.check_alive()?;
        if self.streams.contains_key(&stream_id) {
            frame::encode_rst_stream(out, stream_id, Reason::CONNECT_ERROR);
            self.remove(stream_id, out);
        }
        Ok(())
    }

    /// Tells the core that `n` bytes of the stream's [`Event::Data`] were passed on: window
    /// credit goes back to the peer (a WINDOW_UPDATE once half a window is owed).
    pub fn consume(&mut self, stream_id: u32, n: usize, out: &mut BytesMut) -> Result<(), Error> {
        self.check_alive()?;
        let Some(s) = self.streams.get_mut(&stream_id) else {
            // Gone: its held bytes were credited to the connection when it went.
            return Ok(());
        };
        let n = u32::try_from(n).unwrap_or(u32::MAX).min(s.recv_held);
        s.recv_held -= n;
        Self::credit_stream(&self.cfg, s, stream_id, n, out);
        self.credit_connection(n, out);
        Ok(())
    }

    /// Sends a PING; its ACK comes back as [`Event::PingAck`] (keepalive).
    pub fn ping(&mut self, payload: [u8; 8], out: &mut BytesMut) -> Result<(), Error> {
        self.check_alive()?;
        frame::encode_ping(out, false, payload);
        Ok(())
    }

    /// Starts draining: GOAWAY(NO_ERROR) naming the last stream the peer opened. Streams up to
    /// it go on; newer ones are refused (REFUSED_STREAM, safe to retry elsewhere); `open` fails.
    pub fn go_away(&mut self, out: &mut BytesMut) -> Result<(), Error> {
        self.check_alive()?;
        if !self.goaway_sent {
            self.goaway_sent = true;
            frame::encode_goaway(out, self.last_peer_id, Reason::NO_ERROR, b"");
        }
        Ok(())
    }

    /// Streams not yet fully closed or reset.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// True once the connection failed, or a GOAWAY went either way and no stream is left:
    /// the driver can close the transport.
    pub fn is_done(&self) -> bool {
        self.failed || ((self.goaway_sent || self.goaway_received) && self.streams.is_empty())
    }

    /// Bytes buffered inside the core: an incomplete frame and a header block being gathered.
    pub fn buffered(&self) -> usize {
        self.dec.buffered() + self.partial.as_ref().map_or(0, |p| p.block.len())
    }

    fn check_alive(&self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn new_stream(&self, local: bool) -> Stream {
        Stream {
            send_window: i64::from(self.peer_initial_window),
            recv_window: i64::from(self.cfg.stream_window.min(MAX_WINDOW)),
            recv_held: 0,
            recv_unacked: 0,
            local_closed: false,
            remote_closed: false,
            answered: false,
            blocked: false,
            local,
        }
    }

    fn writable_stream(&mut self, stream_id: u32) -> Result<&mut Stream, Error> {
        let s = self.streams.get_mut(&stream_id).ok_or(Error::UnknownStream(stream_id))?;
        if s.local_closed {
            return Err(Error::State(stream_id, "already finished"));
        }
        if !s.answered {
            return Err(Error::State(stream_id, "tunnel not established"));
        }
        Ok(s)
    }

    /// Whether a stream id was never opened (RFC 9113 §5.1 "idle").
    fn is_idle(&self, id: u32) -> bool {
        let ours = (id % 2 == 1) == (self.role == Role::Client);
        if ours { id >= self.next_local_id } else { id > self.last_peer_id }
    }

    fn credit_stream(cfg: &Config, s: &mut Stream, stream_id: u32, n: u32, out: &mut BytesMut) {
        s.recv_unacked = s.recv_unacked.saturating_add(n);
        if !s.remote_closed && s.recv_unacked >= cfg.stream_window / 2 && s.recv_unacked > 0 {
            frame::encode_window_update(out, stream_id, s.recv_unacked);
            s.recv_window += i64::from(s.recv_unacked);
            s.recv_unacked = 0;
        }
    }

    fn credit_connection(&mut self, n: u32, out: &mut BytesMut) {
        self.recv_unacked = self.recv_unacked.saturating_add(n);
        if self.recv_unacked >= self.cfg.connection_window / 2 && self.recv_unacked > 0 {
            frame::encode_window_update(out, 0, self.recv_unacked);
            self.recv_window += i64::from(self.recv_unacked);
            self.recv_unacked = 0;
        }
    }

    /// Forgets a stream; bytes the caller still holds are credited to the connection, since
    /// no `consume` will come for them.
    fn remove(&mut self, stream_id: u32, out: &mut BytesMut) {
        if let Some(s) = self.streams.remove(&stream_id) {
            if s.local {
                self.local_open -= 1;
            } else {
                self.peer_open -= 1;
            }
            self.credit_connection(s.recv_held, out);
        }
    }

    fn remove_if_closed(&mut self, stream_id: u32, out: &mut BytesMut) {
        if self.streams.get(&stream_id).is_some_and(|s| s.local_closed && s.remote_closed) {
            self.remove(stream_id, out);
        }
    }

    /// A stream error: RST_STREAM with `reason`, and a reset event if the caller knew it.
    fn reset_stream(&mut self, stream_id: u32, reason: Reason, out: &mut BytesMut) {
        frame::encode_rst_stream(out, stream_id, reason);
        if self.streams.contains_key(&stream_id) {
            self.remove(stream_id, out);
            self.events.push_back(Event::Reset { stream_id, reason });
        }
    }

    /// A connection error: GOAWAY, every stream reset (as events), the connection finished.
    fn fail(&mut self, reason: Reason, what: &'static str, out: &mut BytesMut) -> Error {
        frame::encode_goaway(out, self.last_peer_id, reason, what.as_bytes());
        self.failed = true;
        self.partial = None;
        let mut ids: Vec<u32> = self.streams.drain().map(|(id, _)| id).collect();
        ids.sort_unstable();
        (self.local_open, self.peer_open) = (0, 0);
        self.events.extend(ids.into_iter().map(|stream_id| Event::Reset { stream_id, reason }));
        Error::Protocol { reason, what }
    }

    fn on_frame(&mut self, f: Frame, out: &mut BytesMut) -> Step {
        if let Some(p) = &self.partial {
            let continues = matches!(&f, Frame::Continuation { stream_id, .. } if *stream_id == p.stream_id);
            if !continues {
                return Err(conn_err(Reason::PROTOCOL_ERROR, "header block interrupted"));
            }
        }
        if !self.got_settings && !matches!(f, Frame::Settings(_)) {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "first frame not settings"));
        }
        match f {
            Frame::DataHead { stream_id, len, flow_len, .. } => {
                self.on_data_head(stream_id, len, flow_len, out)
            }
            Frame::DataChunk { stream_id, data } => {
                self.on_data_chunk(stream_id, data, out);
                Ok(())
            }
            Frame::DataEnd { stream_id, end_stream } => {
                self.on_data_end(stream_id, end_stream, out);
                Ok(())
            }
            Frame::Headers { stream_id, block, end_stream, end_headers } => {
                if block.len() > self.cfg.max_header_list_size as usize {
                    return Err(conn_err(Reason::ENHANCE_YOUR_CALM, "header block too large"));
                }
                if end_headers {
                    return self.on_header_block(stream_id, &block, end_stream, out);
                }
                self.partial = Some(Partial { stream_id, block: BytesMut::from(&block[..]), end_stream });
                Ok(())
            }
            Frame::Continuation { stream_id, block, end_headers } => {
                let Some(mut p) = self.partial.take() else {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "continuation without headers"));
                };
                if p.block.len() + block.len() > self.cfg.max_header_list_size as usize {
                    return Err(conn_err(Reason::ENHANCE_YOUR_CALM, "header block too large"));
                }
                p.block.extend_from_slice(&block);
                if end_headers {
                    return self.on_header_block(stream_id, &p.block.freeze(), p.end_stream, out);
                }
                self.partial = Some(p);
                Ok(())
            }
            Frame::Priority { .. } | Frame::Unknown { .. } | Frame::SettingsAck => Ok(()),
            Frame::RstStream { stream_id, reason } => {
                if self.is_idle(stream_id) {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "rst_stream on idle stream"));
                }
                if self.streams.contains_key(&stream_id) {
                    self.remove(stream_id, out);
                    self.events.push_back(Event::Reset { stream_id, reason });
                }
                Ok(())
            }
            Frame::Settings(s) => self.on_settings(s, out),
            Frame::Ping { ack, payload } => {
                if ack {
                    self.events.push_back(Event::PingAck { payload });
                } else {
                    frame::encode_ping(out, true, payload);
                }
                Ok(())
            }
            Frame::GoAway { last_stream_id, reason, .. } => {
                self.goaway_received = true;
                let mut refused: Vec<u32> = self
                    .streams
                    .iter()
                    .filter(|(id, s)| s.local && **id > last_stream_id)
                    .map(|(id, _)| *id)
                    .collect();
                refused.sort_unstable();
                for stream_id in refused {
                    self.remove(stream_id, out);
                    self.events.push_back(Event::Reset { stream_id, reason: Reason::REFUSED_STREAM });
                }
                self.events.push_back(Event::GoAway { last_stream_id, reason });
                Ok(())
            }
            Frame::WindowUpdate { stream_id, increment } => self.on_window_update(stream_id, increment),
            Frame::PushPromise { .. } => {
                Err(conn_err(Reason::PROTOCOL_ERROR, "push_promise with push disabled"))
            }
        }
    }

    /// A DATA frame starts: windows and the stream's state are checked for the whole frame
    /// before any of it is delivered; its data is then delivered as it arrives (`rx`).
    fn on_data_head(&mut self, stream_id: u32, len: u32, flow_len: u32, out: &mut BytesMut) -> Step {
        self.rx = None;
        let flow = i64::from(flow_len);
        if flow > self.recv_window {
            return Err(conn_err(Reason::FLOW_CONTROL_ERROR, "data beyond connection window"));
        }
        self.recv_window -= flow;
        if self.is_idle(stream_id) {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "data on idle stream"));
        }
        let role = self.role;
        let Some(s) = self.streams.get_mut(&stream_id) else {
            // A stream we already closed or reset: frames in flight are ignored, but they
            // still used connection window.
            self.credit_connection(flow_len, out);
            return Ok(());
        };
        if s.remote_closed {
            self.credit_connection(flow_len, out);
            return Err(stream_err(stream_id, Reason::STREAM_CLOSED, "data after end_stream"));
        }
        if role == Role::Client && !s.answered {
            self.credit_connection(flow_len, out);
            return Err(stream_err(stream_id, Reason::PROTOCOL_ERROR, "data before response"));
        }
        if flow > s.recv_window {
            self.credit_connection(flow_len, out);
            return Err(stream_err(stream_id, Reason::FLOW_CONTROL_ERROR, "data beyond stream window"));
        }
        s.recv_window -= flow;
        // flow_len counts the data and its padding; the caller never sees padding, so its
        // share is credited now (len <= flow_len, the decoder checked).
        let padding = flow_len - len;
        if padding > 0 {
            Self::credit_stream(&self.cfg, s, stream_id, padding, out);
            self.credit_connection(padding, out);
        }
        self.rx = Some(stream_id);
        Ok(())
    }

    /// Some of the current DATA frame's data, `input[data]`: an event for the caller, unless
    /// the frame was refused at its head (already credited) or the stream went since.
    fn on_data_chunk(&mut self, stream_id: u32, data: Range<usize>, out: &mut BytesMut) {
        if self.rx != Some(stream_id) {
            return;
        }
        // A DATA frame is at most 2^24 - 1 bytes, so its chunks fit a u32.
        let len = data.len() as u32;
        match self.streams.get_mut(&stream_id) {
            Some(s) => {
                s.recv_held += len;
                self.events.push_back(Event::Data { stream_id, data });
            }
            // Reset by the caller mid-frame: no `consume` will come for the rest.
            None => self.credit_connection(len, out),
        }
    }

    /// The current DATA frame ended; END_STREAM is the peer's half-close.
    fn on_data_end(&mut self, stream_id: u32, end_stream: bool, out: &mut BytesMut) {
        if self.rx.take() != Some(stream_id) || !end_stream {
            return;
        }
        let Some(s) = self.streams.get_mut(&stream_id) else { return };
        s.remote_closed = true;
        self.events.push_back(Event::End { stream_id });
        self.remove_if_closed(stream_id, out);
    }

    fn on_settings(&mut self, s: Settings, out: &mut BytesMut) -> Step {
        self.got_settings = true;
        if let Some(v) = s.max_frame_size {
            self.peer_max_frame_size = v;
        }
        if let Some(v) = s.max_concurrent_streams {
            self.peer_max_streams = v;
        }
        if let Some(v) = s.initial_window_size {
            let delta = i64::from(v) - i64::from(self.peer_initial_window);
            self.peer_initial_window = v;
            let conn_open = self.send_window > 0;
            for (id, st) in self.streams.iter_mut() {
                st.send_window += delta;
                if st.send_window > i64::from(MAX_WINDOW) {
                    return Err(conn_err(Reason::FLOW_CONTROL_ERROR, "settings push a window over 2^31-1"));
                }
                if delta > 0 && st.blocked && st.send_window > 0 && conn_open {
                    st.blocked = false;
                    self.events.push_back(Event::Writable { stream_id: *id });
                }
            }
        }
        // SETTINGS_HEADER_TABLE_SIZE needs nothing: our encoder never uses the dynamic table.
        frame::encode_settings_ack(out);
        Ok(())
    }

    fn on_window_update(&mut self, stream_id: u32, increment: u32) -> Step {
        if stream_id == 0 {
            self.send_window += i64::from(increment);
            if self.send_window > i64::from(MAX_WINDOW) {
                return Err(conn_err(Reason::FLOW_CONTROL_ERROR, "connection window over 2^31-1"));
            }
            if self.send_window > 0 {
                let mut ready: Vec<u32> = Vec::new();
                for (id, s) in self.streams.iter_mut() {
                    if s.blocked && s.send_window > 0 {
                        s.blocked = false;
                        ready.push(*id);
                    }
                }
                ready.sort_unstable();
                self.events.extend(ready.into_iter().map(|stream_id| Event::Writable { stream_id }));
            }
            return Ok(());
        }
        if self.is_idle(stream_id) {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "window_update on idle stream"));
        }
        let conn_open = self.send_window > 0;
        let Some(s) = self.streams.get_mut(&stream_id) else {
            return Ok(());
        };
        s.send_window += i64::from(increment);
        if s.send_window > i64::from(MAX_WINDOW) {
            return Err(stream_err(stream_id, Reason::FLOW_CONTROL_ERROR, "stream window over 2^31-1"));
        }
        if s.blocked && s.send_window > 0 && conn_open {
            s.blocked = false;
            self.events.push_back(Event::Writable { stream_id });
        }
        Ok(())
    }

    fn on_header_block(
        &mut self,
        stream_id: u32,
        block: &[u8],
        end_stream: bool,
        out: &mut BytesMut,
    ) -> Step {
        // Decode first, whatever becomes of the stream: the HPACK context is shared by the
        // connection and must see every block (RFC 9113 §4.3).
        let fields = match headers::decode(&mut self.hpack, block, self.cfg.max_header_list_size as usize) {
            Ok(f) => Ok(f),
            Err(headers::Invalid::Compression(what)) => {
                return Err(conn_err(Reason::COMPRESSION_ERROR, what));
            }
            Err(e) => Err(e),
        };
        if self.streams.contains_key(&stream_id) {
            return self.on_stream_headers(stream_id, fields, end_stream, out);
        }
        if self.is_idle(stream_id) {
            let ours = (stream_id % 2 == 1) == (self.role == Role::Client);
            if self.role == Role::Client || ours {
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "headers opening a stream the peer may not open",
                ));
            }
        } else {
            // A stream already closed or reset: trailers in flight, ignored.
            return Ok(());
        }
        self.last_peer_id = stream_id;
        let refuse = |c: &mut Connection, out: &mut BytesMut, reason: Reason, why: &'static str| {
            frame::encode_rst_stream(out, stream_id, reason);
            c.events.push_back(Event::Refused { stream_id, status: None, why });
            Ok(())
        };
        if self.goaway_sent {
            return refuse(self, out, Reason::REFUSED_STREAM, "draining");
        }
        if self.peer_open >= self.cfg.max_concurrent_streams {
            return refuse(self, out, Reason::REFUSED_STREAM, "max concurrent streams");
        }
        let request = fields.and_then(|f| headers::parse_request(&f));
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                let (status, why) = match e {
                    headers::Invalid::BadRequest(why) => (400, why),
                    headers::Invalid::TooLarge(_) => (431, "header list too large"),
                    headers::Invalid::Malformed(why) | headers::Invalid::Compression(why) => {
                        return refuse(self, out, Reason::PROTOCOL_ERROR, why);
                    }
                };
                self.scratch.clear();
                headers::encode_response(&mut self.scratch, status, &[]);
                frame::encode_headers(out, stream_id, &self.scratch, true, self.peer_max_frame_size);
                if !end_stream {
                    frame::encode_rst_stream(out, stream_id, Reason::NO_ERROR);
                }
                self.events.push_back(Event::Refused { stream_id, status: Some(status), why });
                return Ok(());
            }
        };
        let mut s = self.new_stream(false);
        s.remote_closed = end_stream;
        self.streams.insert(stream_id, s);
        self.peer_open += 1;
        self.events.push_back(Event::Request {
            stream_id,
            authority: request.authority,
            headers: request.headers,
        });
        if end_stream {
            self.events.push_back(Event::End { stream_id });
        }
        Ok(())
    }

    /// A header block on a stream we know: the client's response, or trailers.
    fn on_stream_headers(
        &mut self,
        stream_id: u32,
        fields: Result<headers::Fields, headers::Invalid>,
        end_stream: bool,
        out: &mut BytesMut,
    ) -> Step {
        let role = self.role;
        let Some(s) = self.streams.get_mut(&stream_id) else {
            return Ok(());
        };
        if s.remote_closed {
            return Err(stream_err(stream_id, Reason::STREAM_CLOSED, "headers after end_stream"));
        }
        if role == Role::Client && !s.answered {
            let response = fields
                .and_then(|f| headers::parse_response(&f))
                .map_err(|_| stream_err(stream_id, Reason::PROTOCOL_ERROR, "malformed response"))?;
            if (100..200).contains(&response.status) {
                // Interim responses carry nothing for a tunnel; 101 is banned in HTTP/2.
                if response.status == 101 || end_stream {
                    return Err(stream_err(stream_id, Reason::PROTOCOL_ERROR, "bad interim response"));
                }
                return Ok(());
            }
            s.answered = true;
            s.remote_closed = end_stream;
            let refused = !(200..300).contains(&response.status);
            self.events.push_back(Event::Response {
                stream_id,
                status: response.status,
                headers: response.headers,
            });
            if refused {
                // No tunnel: we will send nothing, so end our side now rather than leave the
                // peer's stream half-open.
                if end_stream {
                    self.events.push_back(Event::End { stream_id });
                }
                frame::encode_rst_stream(out, stream_id, Reason::CANCEL);
                self.remove(stream_id, out);
                return Ok(());
            }
        } else {
            // Trailers: only as the last frame; their fields mean nothing to a tunnel.
            if !end_stream {
                return Err(stream_err(stream_id, Reason::PROTOCOL_ERROR, "trailers without end_stream"));
            }
            s.remote_closed = true;
        }
        if end_stream {
            self.events.push_back(Event::End { stream_id });
            self.remove_if_closed(stream_id, out);
        }
        Ok(())
    }
}
