//! HBONE on monoio (SPEC §12): one mutual-TLS connection carrying HTTP/2 CONNECT streams,
//! driven over `crate::hbone::conn` (the sans-IO core). This file owns the carrier (the TLS
//! connection: read → `recv` → events to streams, and one writer flushing what the core
//! appended) and [`Tunnel`], one stream as a side of the relay pipeline. What a stream does
//! (authority checks, connect, answer, copy, count) is the pipeline's, in `relay`.
//!
//! Everything lives on one worker: the carrier and its streams share the core through an
//! `Rc<Mux>`, borrowed only between awaits. Received DATA is written to its stream's local
//! socket (its sink) by the carrier straight from the opened TLS records, one vectored send
//! per stream for up to four records (64 KiB): a send per 16 KiB record would wake the local
//! reader per record, and a copy into a burst buffer first costs a user-space copy per byte.
//! Only what the socket does not take (or a stream whose task is writing) is copied into the
//! stream's queue (pool buffers), written by the stream's task; window credit goes back only once
//! written (`consume`), so a slow local reader slows its own sender, not the others on the
//! carrier. Sent DATA is read from the local socket behind room for the frame header, which
//! the core fills in, and handed to rustls as one slice; streams and the carrier's writer take
//! turns at the TLS writer so frames never interleave. A stream hands over several frames
//! before one flush (one send for all their records), and a turn passes to the next waiter
//! alone, not to every stream of the carrier.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::net::TcpStream;

use super::Error;
use crate::config::Listener;
use crate::conn::{BufferPool, Security, WorkerCtx};
use crate::exchange::NodeMetadata;
use crate::hbone::conn::{Config, Connection, Event, Role};
use crate::hbone::frame::HEADER_LEN;
use crate::hbone::headers::HeaderList;
use crate::hbone::turn::{self, Line};
use crate::metrics::{HboneRefused, TlsRefused};
use crate::socket;
use crate::tls::Slot;
use crate::tls::stream::{Fill, TlsStream};

/// ALPN of HBONE (SPEC §12): HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// A PING this often on every carrier (ztunnel's keepalive interval).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How often a carrier looks whether the proxy drains (GOAWAY within this of POST /drain).
const DRAIN_CHECK: Duration = Duration::from_secs(1);

/// A carrier whose PING is not answered within this is closed (ztunnel's keepalive timeout).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A pooled originator carrier with no stream for this long is closed (GOAWAY). Checked on
/// the keepalive tick, so it closes within one more interval.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Streams a pooled carrier takes before the pool opens another (SPEC §12).
const MAX_STREAMS: usize = 100;

/// Room a send buffer keeps before a DATA frame's header: a TLS record's header (5 bytes), so
/// the record can be sealed around the frame in place.
pub(crate) const RECORD_HEAD_ROOM: usize = 5;

/// Room a send buffer keeps after a DATA frame's bytes: TLS 1.3's inner content type (1 byte)
/// and AEAD tag (16 bytes), for the same in-place seal.
pub(crate) const RECORD_TAIL_ROOM: usize = 17;

/// Where a send buffer's payload starts (`Tunnel::send_framed`): the record header's room,
/// then the frame header's.
pub(crate) const DATA_AT: usize = RECORD_HEAD_ROOM + HEADER_LEN;

/// One carrier's shared state: its TLS stream, the HTTP/2 core, the bytes the core appended
/// and not yet written, and each live stream's receive queue.
pub(crate) struct Mux {
    tls: TlsStream,
    role: Role,
    /// Both principals of the carrier, for each stream's istio_tcp_* labels.
    security: Security,
    /// The peer sent GOAWAY (or the carrier ended): open no new stream here.
    going_away: Cell<bool>,
    /// A PING is out and when it went (keepalive).
    ping_sent: Cell<Option<Instant>>,
    h2: RefCell<Connection>,
    /// Control frames (and HEADERS) the core appended, not yet written; DATA never waits here.
    out: RefCell<BytesMut>,
    /// `out`'s twin: what the turn's holder is writing.
    spare: RefCell<BytesMut>,
    streams: RefCell<HashMap<u32, Pipe>>,
    /// Streams whose queue took received DATA in this burst of reads (`write_held`).
    held: RefCell<Vec<u32>>,
    /// DATA of the records being read, not yet written (`write_direct`); emptied per batch,
    /// its capacity kept.
    direct: RefCell<Vec<Direct>>,
    /// The writer, waiting for `out` to fill.
    flush: Cell<Option<Waker>>,
    /// The turn at the TLS stream's write side (a stream's DATA or the writer's `out`): a
    /// frame is handed to rustls whole, after everything the core appended before it.
    turn: Line,
    /// The carrier ended: streams fail, the writer stops.
    closed: Cell<bool>,
}

/// One stream's receive side and who waits on it.
#[derive(Default)]
struct Pipe {
    /// Client: the response to our CONNECT, once it came.
    response: Option<(u16, HeaderList)>,
    /// The local socket received DATA goes to, while the copy toward it runs: written to by
    /// the carrier at the end of its burst of reads when nothing waits before it.
    sink: Option<Rc<TcpStream>>,
    /// Received bytes the sink did not take at once, in pool buffers, oldest first.
    rx: VecDeque<Vec<u8>>,
    /// The stream's task is writing a buffer it took from `rx`: nothing may overtake it.
    busy: bool,
    /// Bytes the carrier wrote straight to the sink, not yet counted by the stream's task.
    written: usize,
    /// Listed in the carrier's `held`: written at the end of its burst of reads.
    held: bool,
    end: bool,
    reset: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Mux {
    /// Run `f` on the core with the output buffer, then wake the writer.
    fn with_h2<R>(&self, f: impl FnOnce(&mut Connection, &mut BytesMut) -> R) -> R {
        let r = f(&mut self.h2.borrow_mut(), &mut self.out.borrow_mut());
        if !self.out.borrow().is_empty()
            && let Some(w) = self.flush.take()
        {
            w.wake();
        }
        r
    }

    /// Wake whoever waits on stream `id`'s pipe after `f` changed it.
    fn with_pipe(&self, id: u32, f: impl FnOnce(&mut Pipe)) -> bool {
        let mut streams = self.streams.borrow_mut();
        let Some(p) = streams.get_mut(&id) else { return false };
        f(p);
        if let Some(w) = p.reader.take() {
            w.wake();
        }
        if let Some(w) = p.writer.take() {
            w.wake();
        }
        true
    }

    /// The carrier ended: every stream is reset (never a clean end), the writer stops.
    fn close(&self) {
        self.closed.set(true);
        self.going_away.set(true);
        // All of them: each finds the carrier closed once it has the turn.
        self.turn.wake_all();
        let ids: Vec<u32> = self.streams.borrow().keys().copied().collect();
        for id in ids {
            self.with_pipe(id, |p| p.reset = true);
        }
        if let Some(w) = self.flush.take() {
            w.wake();
        }
    }
}

impl Mux {
    /// Wait for the turn at the TLS writer; it passes on when the guard drops.
    async fn take_turn(&self) -> Turn<'_> {
        Turn { mux: self, _turn: self.turn.take().await }
    }

    /// Hand `frames` (whole HTTP/2 frames) to the TLS stream, to leave with the next `flush`;
    /// holding the turn, so they follow what was handed over before them. The one place the
    /// carrier's frames enter the TLS stream: a DATA frame comes from `Tunnel::send_framed`
    /// with `RECORD_HEAD_ROOM` bytes free before it and `RECORD_TAIL_ROOM` after it in its
    /// buffer, so a record layer that seals in place can take it there.
    async fn seal(&self, _turn: &Turn<'_>, frames: &[u8]) -> io::Result<()> {
        self.tls.queue(frames).await
    }

    /// Hand over what the core appended so far (holding the turn), without sending it.
    async fn seal_queued(&self, turn: &Turn<'_>) -> io::Result<()> {
        if self.out.borrow().is_empty() {
            return Ok(());
        }
        let mut spare = self.spare.take();
        std::mem::swap(&mut *self.out.borrow_mut(), &mut spare);
        let r = self.seal(turn, &spare).await;
        spare.clear();
        *self.spare.borrow_mut() = spare;
        r
    }

    /// Send everything handed over, with what the core appended last (holding the turn).
    async fn write_queued(&self, turn: &Turn<'_>) -> io::Result<()> {
        self.seal_queued(turn).await?;
        self.tls.flush().await
    }
}

/// The turn at a carrier's TLS writer; dropping it wakes the next in line, and the carrier's
/// writer if the core appended frames meanwhile.
struct Turn<'a> {
    mux: &'a Mux,
    _turn: turn::Turn<'a>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // Not per frame: a stream's frames went with what the core had appended.
        if !self.mux.out.borrow().is_empty()
            && let Some(w) = self.mux.flush.take()
        {
            w.wake();
        }
    }
}

/// What a stream's receive side has next.
pub(crate) enum Received {
    /// Bytes the carrier wrote straight to the sink since the last call (for the counters).
    Written(usize),
    /// Tunnel bytes the sink did not take at once (a pool buffer): write them, then `consume`.
    Data(Vec<u8>),
    /// END_STREAM: the peer half-closed.
    End,
    /// RST_STREAM, or the carrier failed: a reset, never a clean end.
    Reset,
}

/// One CONNECT stream as a side of the relay: bytes both ways under HTTP/2 flow control,
/// END_STREAM as FIN, RST_STREAM(CONNECT_ERROR) as a reset. Dropped without `reset`, it
/// half-closes (END_STREAM) as closing a socket sends a FIN.
pub(crate) struct Tunnel {
    mux: Rc<Mux>,
    id: u32,
    /// Originator: the terminator's metadata from the `baggage` on its 200.
    peer: Option<Box<NodeMetadata>>,
}

impl Tunnel {
    /// The carrier's TCP socket (addresses).
    pub(crate) fn tcp(&self) -> &TcpStream {
        self.mux.tls.tcp()
    }

    /// Originator: the terminator's metadata (its `baggage`), once.
    pub(crate) fn take_peer(&mut self) -> Option<NodeMetadata> {
        self.peer.take().map(|p| *p)
    }

    /// Answer the CONNECT: `200` (with `headers`, our baggage) opens the tunnel; another
    /// status refuses it (400, 503 as ztunnel).
    pub(crate) fn respond(&self, status: u16, headers: &[(&str, &[u8])]) -> io::Result<()> {
        self.mux.with_h2(|h2, out| h2.respond(self.id, status, headers, out)).map_err(io::Error::other)
    }

    /// Received DATA goes straight into `sink` from now until the guard drops.
    pub(crate) fn attach(&self, sink: Rc<TcpStream>) -> Attached<'_> {
        if let Some(p) = self.mux.streams.borrow_mut().get_mut(&self.id) {
            p.sink = Some(sink);
        }
        Attached(self)
    }

    /// The next thing the peer sent on this stream. Calling it again means the buffer of the
    /// last `Data` was written.
    pub(crate) async fn recv(&self) -> Received {
        poll_fn(|cx| {
            let mut streams = self.mux.streams.borrow_mut();
            let Some(p) = streams.get_mut(&self.id) else { return Poll::Ready(Received::Reset) };
            p.busy = false;
            if p.written > 0 {
                return Poll::Ready(Received::Written(std::mem::take(&mut p.written)));
            }
            if let Some(b) = p.rx.pop_front() {
                p.busy = true;
                return Poll::Ready(Received::Data(b));
            }
            if p.reset {
                return Poll::Ready(Received::Reset);
            }
            if p.end {
                return Poll::Ready(Received::End);
            }
            p.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// `n` received bytes were passed on: window credit back to the peer.
    pub(crate) fn consume(&self, n: usize) {
        let _ = self.mux.with_h2(|h2, out| h2.consume(self.id, n, out));
    }

    /// Hand `buf[DATA_AT..buf.len() - RECORD_TAIL_ROOM]` to the carrier as DATA, to leave with
    /// the next `flush` (several buffers then go in one send), waiting for window credit when
    /// the peer's windows are spent (what was handed over is sent first). The buffer is shaped
    /// for a TLS record around each frame: `RECORD_HEAD_ROOM` free bytes, the frame header's
    /// room (written in place, so header and bytes go to the TLS stream as one slice), the
    /// payload, and `RECORD_TAIL_ROOM` free bytes. A second frame (the windows allowed less
    /// than the whole) has its header written over bytes already handed over.
    pub(crate) async fn send_framed(&self, buf: &mut [u8]) -> io::Result<()> {
        let reset = |e| io::Error::new(io::ErrorKind::ConnectionReset, e);
        let mut at = RECORD_HEAD_ROOM;
        let end = buf.len().saturating_sub(RECORD_TAIL_ROOM);
        while let Some(len) = end.checked_sub(at + HEADER_LEN).filter(|n| *n > 0) {
            let turn = self.mux.take_turn().await;
            if self.mux.closed.get() {
                return Err(io::Error::from(io::ErrorKind::ConnectionReset));
            }
            let (n, head) = self.mux.h2.borrow_mut().send_frame(self.id, len).map_err(reset)?;
            if n > 0 {
                if let Some(room) = buf.get_mut(at..at + HEADER_LEN) {
                    room.copy_from_slice(&head);
                }
                // What the core appended before this frame goes first.
                self.mux.seal_queued(&turn).await?;
                self.mux.seal(&turn, buf.get(at..at + HEADER_LEN + n).unwrap_or_default()).await?;
                at += n;
                continue;
            }
            // The peer gives credit back only for what it received.
            self.mux.write_queued(&turn).await?;
            drop(turn);
            poll_fn(|cx| {
                if self.mux.h2.borrow().send_capacity(self.id) > 0 {
                    return Poll::Ready(Ok(()));
                }
                let mut streams = self.mux.streams.borrow_mut();
                match streams.get_mut(&self.id) {
                    Some(p) if !p.reset => {
                        p.writer = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    _ => Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset))),
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Send what `send_framed` handed over (and any frame the core appended), in one send
    /// where the socket takes it.
    pub(crate) async fn flush(&self) -> io::Result<()> {
        let turn = self.mux.take_turn().await;
        self.mux.write_queued(&turn).await
    }

    /// Half-close our direction (END_STREAM; the carrier's writer sends it after any DATA
    /// handed over before).
    pub(crate) fn finish(&self) -> io::Result<()> {
        self.mux
            .with_h2(|h2, out| h2.finish(self.id, out))
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e))
    }

    /// Reset the stream: RST_STREAM(CONNECT_ERROR), the local side was reset or failed.
    pub(crate) fn reset(self) {
        let _ = self.mux.with_h2(|h2, out| h2.reset(self.id, out));
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Bytes received and never passed on are credited back to the connection, and later
        // DATA on this stream is consumed as it arrives (`dispatch`): a stream we stopped
        // reading must not hold the whole carrier's window.
        let held: usize = match self.mux.streams.borrow_mut().remove(&self.id) {
            Some(p) => p.rx.iter().map(Vec::len).sum(),
            None => 0,
        };
        self.mux.with_h2(|h2, out| {
            if held > 0 {
                let _ = h2.consume(self.id, held, out);
            }
            // Already closed our way, or reset: the core says so and nothing is sent.
            let _ = h2.finish(self.id, out);
        });
    }
}

/// A stream's sink attached (`Tunnel::attach`); dropping it detaches the sink, before the
/// socket may be reset or closed.
pub(crate) struct Attached<'a>(&'a Tunnel);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0.mux.streams.borrow_mut().get_mut(&self.0.id) {
            p.sink = None;
        }
    }
}

/// A CONNECT accepted on a terminator's carrier, for the pipeline to serve.
pub(crate) struct Request {
    /// The stream.
    pub tunnel: Tunnel,
    /// `:authority`, the destination `IP:port` asked for.
    pub authority: String,
    /// Regular headers (`baggage` among them).
    pub headers: HeaderList,
    /// The address the carrier arrived on.
    pub local: SocketAddr,
    /// The carrier's principals.
    pub security: Security,
}

/// A terminator's connection (SPEC §12): TLS 1.3 with ALPN `h2` and a client certificate of
/// the mesh, then an HTTP/2 server; each CONNECT is served by `relay::serve_stream` as its own
/// task. Ends when the client closes, the HTTP/2 connection fails or finishes. A carrier
/// lives long: it keeps its listener and TLS slot, no snapshot (SPEC §11).
pub(super) async fn serve_carrier(
    ctx: Rc<WorkerCtx>,
    listener: Arc<Listener>,
    slot: Option<Arc<Slot>>,
    acceptor: u64,
    down: TcpStream,
) -> Result<(), Error> {
    let Some(slot) = slot else { return Err(Error::Refused) };
    let (tls, security) = super::mtls::handshake(&ctx, &listener, &slot, down).await?;
    // ztunnel's rules: TLS 1.3 and HTTP/2 only (a client without ALPN is refused too).
    if !tls.is_tls13() || !tls.alpn_is(ALPN_H2) {
        log::debug!("listener {}: hbone: refused: not TLS 1.3 with ALPN h2", listener.name);
        ctx.metrics.borrow().count_tls_refused(TlsRefused::Other);
        return Err(Error::Refused);
    }
    let local = tls.tcp().local_addr()?;
    let mux = Mux::new(tls, Role::Server, security);
    let accept = |id: u32, authority: String, headers: HeaderList| {
        let tunnel = Tunnel { mux: Rc::clone(&mux), id, peer: None };
        mux.streams.borrow_mut().insert(id, Pipe::default());
        let req = Request { tunnel, authority, headers, local, security: mux.security.clone() };
        monoio::spawn(super::serve_stream(Rc::clone(&ctx), Arc::clone(&listener), acceptor, req));
    };
    if let Err(e) = drive(&ctx, &mux, accept).await {
        log::debug!("listener {}: hbone carrier: {e}", listener.name);
    }
    Ok(())
}

impl Mux {
    /// A carrier over an established TLS stream, its first frames (preface, SETTINGS, the
    /// connection window) waiting in `out`.
    fn new(tls: TlsStream, role: Role, security: Security) -> Rc<Mux> {
        let mut out = BytesMut::new();
        let h2 = Connection::new(role, Config::default(), &mut out);
        Rc::new(Mux {
            tls,
            role,
            security,
            going_away: Cell::new(false),
            ping_sent: Cell::new(None),
            h2: RefCell::new(h2),
            out: RefCell::new(out),
            spare: RefCell::new(BytesMut::new()),
            streams: RefCell::new(HashMap::new()),
            held: RefCell::new(Vec::new()),
            direct: RefCell::new(Vec::new()),
            flush: Cell::new(None),
            turn: Line::default(),
            closed: Cell::new(false),
        })
    }
}

/// Run a carrier until the peer closes it, it fails, a keepalive PING goes unanswered, or
/// (originator) it stayed unused for `POOL_IDLE_TIMEOUT`; then every stream left is reset.
async fn drive(ctx: &WorkerCtx, mux: &Mux, accept: impl FnMut(u32, String, HeaderList)) -> io::Result<()> {
    let result = {
        let reader = pin!(read_in(ctx, mux, accept));
        let writer = pin!(write_out(mux));
        let keepalive = pin!(keepalive(ctx, mux));
        run(reader, writer, keepalive).await
    };
    mux.close();
    result
}

/// Keepalive (ztunnel's: a PING every 10 s, the carrier closed when one is not answered in
/// 20 s), GOAWAY once the proxy drains (streams in flight go on), and, for the originator's
/// pooled carriers, the idle close. One timer per carrier, not per stream: carriers are few.
async fn keepalive(ctx: &WorkerCtx, mux: &Mux) -> io::Result<()> {
    let mut idle_since: Option<Instant> = None;
    let mut next_ping = Instant::now() + KEEPALIVE_INTERVAL;
    loop {
        monoio::time::sleep(DRAIN_CHECK).await;
        let now = Instant::now();
        if ctx.draining.get() && !mux.going_away.replace(true) {
            mux.with_h2(|h2, out| h2.go_away(out)).map_err(io::Error::other)?;
        }
        if now < next_ping {
            continue;
        }
        next_ping = now + KEEPALIVE_INTERVAL;
        if let Some(sent) = mux.ping_sent.get() {
            if now.duration_since(sent) >= KEEPALIVE_TIMEOUT {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "hbone keepalive: no PING ack"));
            }
        } else {
            mux.ping_sent.set(Some(now));
            mux.with_h2(|h2, out| h2.ping(*b"ringside", out)).map_err(io::Error::other)?;
        }
        let unused = mux.h2.borrow().active_streams() == 0 && mux.streams.borrow().is_empty();
        idle_since = if unused { Some(idle_since.unwrap_or(now)) } else { None };
        if mux.role == Role::Client && idle_since.is_some_and(|t| now.duration_since(t) >= POOL_IDLE_TIMEOUT)
        {
            // Nothing in flight: close, as ztunnel's pool drops an unused connection.
            return Ok(());
        }
    }
}

/// Run the reader, the writer and the keepalive until one of them ends.
async fn run(
    mut reader: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
    mut writer: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
    mut keepalive: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
) -> io::Result<()> {
    poll_fn(|cx| {
        if let Poll::Ready(r) = writer.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if let Poll::Ready(r) = keepalive.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        reader.as_mut().poll(cx)
    })
    .await
}

/// Read, decrypt, feed the core, act on its events, until EOF or the connection is done.
async fn read_in(
    ctx: &WorkerCtx,
    mux: &Mux,
    mut accept: impl FnMut(u32, String, HeaderList),
) -> io::Result<()> {
    loop {
        match mux.tls.try_fill(&ctx.pool)? {
            Fill::Data => {}
            Fill::WouldBlock => {
                // What a stream's queue took (its task was writing) is tried before waiting.
                write_held(ctx, mux);
                mux.tls.readable().await?;
                continue;
            }
            Fill::Eof => {
                write_held(ctx, mux);
                return Ok(());
            }
        }
        // Straight from rustls' buffer into the core's frame decoder; the events (DATA: ranges
        // of those records) are acted on while the records are still there, and their DATA
        // written from there (`write_direct`) before they are consumed.
        let fed = mux.tls.with_opened(BURST_RECORDS, |records| {
            let mut fed = Ok(());
            for (i, bytes) in records.iter().enumerate() {
                fed = mux.with_h2(|h2, out| h2.recv(bytes, out));
                loop {
                    let event = mux.h2.borrow_mut().poll_event();
                    let Some(event) = event else { break };
                    dispatch(ctx, mux, event, i, bytes, &mut accept);
                }
                if fed.is_err() {
                    break;
                }
            }
            write_direct(ctx, mux, records);
            fed
        });
        fed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if mux.h2.borrow().is_done() {
            return Ok(());
        }
    }
}

/// Act on one event of the core; `input` is what it was fed, record `record` of the batch.
fn dispatch(
    ctx: &WorkerCtx,
    mux: &Mux,
    event: Event,
    record: usize,
    input: &[u8],
    accept: &mut impl FnMut(u32, String, HeaderList),
) {
    match event {
        Event::Request { stream_id, authority, headers } => accept(stream_id, authority, headers),
        Event::Data { stream_id, data } => {
            if data.start < data.end && data.end <= input.len() {
                let at = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                let d = Direct { stream_id, record, start: at(data.start), end: at(data.end) };
                mux.direct.borrow_mut().push(d);
            }
        }
        Event::End { stream_id } => {
            mux.with_pipe(stream_id, |p| p.end = true);
        }
        Event::Reset { stream_id, .. } => {
            mux.with_pipe(stream_id, |p| p.reset = true);
        }
        Event::Writable { stream_id } => {
            mux.with_pipe(stream_id, |_| {});
        }
        Event::Refused { stream_id, status, why } => {
            log::debug!("hbone: stream {stream_id} refused: {why}");
            let reason = if status.is_some() { HboneRefused::BadRequest } else { HboneRefused::Reset };
            ctx.metrics.borrow().count_hbone_refused(reason);
        }
        Event::Response { stream_id, status, headers } => {
            mux.with_pipe(stream_id, |p| p.response = Some((status, headers)));
        }
        Event::PingAck { .. } => mux.ping_sent.set(None),
        Event::GoAway { .. } => mux.going_away.set(true),
    }
}

/// Pool buffers of received DATA queued for a stream that the carrier writes in one send.
const HELD_BUFFERS: usize = 4;

/// Opened records whose DATA the carrier writes on before reading more (64 KiB in one send
/// per stream; 128 KiB measured worse in the third round: more partial writes).
const BURST_RECORDS: usize = 4;

/// Slices of one vectored send to a stream's socket: its queued buffers, then DATA ranges of
/// the records (a peer whose frames do not line up with records brings a few per record).
const MAX_SLICES: usize = 32;

/// Received DATA of stream `stream_id`: `start..end` of record `record` of the batch.
#[derive(Clone, Copy)]
struct Direct {
    stream_id: u32,
    record: usize,
    start: u32,
    end: u32,
}

impl Direct {
    /// The payload in the batch's records (empty if the range is not there).
    fn bytes<'a>(&self, records: &[&'a [u8]]) -> &'a [u8] {
        let range = self.start as usize..self.end as usize;
        records.get(self.record).and_then(|r| r.get(range)).unwrap_or_default()
    }
}

/// Write the DATA the batch `records` brought to each stream's socket straight from the
/// records, one vectored send per stream (after what its queue holds), and give the credit
/// back for what went; what the socket does not take, or a stream whose task is writing
/// takes, is copied into the stream's queue. A stream gone gets its credit back at once.
fn write_direct(ctx: &WorkerCtx, mux: &Mux, records: &[&[u8]]) {
    let mut direct = mux.direct.take();
    // Each stream once, with all of its ranges in the order they arrived (record, then place
    // in it): sorted in place, O(n log n) however many tiny DATA frames a peer packs into the
    // burst, where a scan for each stream's earlier ranges was quadratic in them.
    direct.sort_unstable_by_key(|d| (d.stream_id, d.record, d.start));
    for ranges in direct.chunk_by(|a, b| a.stream_id == b.stream_id) {
        let Some(id) = ranges.first().map(|d| d.stream_id) else { continue };
        let slices = ranges.iter().map(|e| e.bytes(records));
        let mut first = false;
        let mut credit = 0;
        let known = mux.with_pipe(id, |p| {
            credit = write_slices(p, slices.clone(), &ctx.pool);
            if !p.rx.is_empty() && !p.held {
                p.held = true;
                first = true;
            }
        });
        if !known {
            // Nobody reads this stream any more.
            credit = slices.map(<[u8]>::len).sum();
        }
        if first {
            mux.held.borrow_mut().push(id);
        }
        if credit > 0 {
            let _ = mux.with_h2(|h2, out| h2.consume(id, credit, out));
        }
    }
    direct.clear();
    // Back, so its capacity is reused (no allocation per batch).
    *mux.direct.borrow_mut() = direct;
}

/// Write a stream's queue and then `data` to its socket in one vectored send (unless its task
/// is writing a buffer it took, or no socket is attached), as far as the socket takes it now,
/// and copy what did not go to the end of its queue; returns how many bytes went (counted in
/// `written` for the stream's task).
fn write_slices<'a>(p: &mut Pipe, data: impl Iterator<Item = &'a [u8]> + Clone, pool: &BufferPool) -> usize {
    let mut n = 0;
    if let Some(sink) = p.sink.as_ref().filter(|_| !p.busy && p.rx.len() <= HELD_BUFFERS) {
        let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        for (slice, b) in slices.iter_mut().zip(&p.rx) {
            *slice = io::IoSlice::new(b);
            count += 1;
        }
        for (slice, b) in slices.iter_mut().skip(count).zip(data.clone()) {
            *slice = io::IoSlice::new(b);
            count += 1;
        }
        // An error is left to the stream's own write, which meets it again.
        n = socket::NonBlocking(sink).write_vectored(slices.get(..count).unwrap_or_default()).unwrap_or(0);
    }
    let mut left = drain_written(p, n, pool);
    for b in data {
        let skip = left.min(b.len());
        left -= skip;
        queue(&mut p.rx, b.get(skip..).unwrap_or_default(), pool);
    }
    p.written += n;
    n
}

/// Take `n` written bytes off the front of a stream's queue; returns how many of them were
/// beyond it.
fn drain_written(p: &mut Pipe, n: usize, pool: &BufferPool) -> usize {
    let mut left = n;
    while let Some(front) = p.rx.front_mut() {
        if left < front.len() {
            // The socket is full: rare, and the stream's task takes over from here.
            front.drain(..left);
            return 0;
        }
        left -= front.len();
        if let Some(mut b) = p.rx.pop_front() {
            b.clear();
            pool.put(b);
        }
    }
    left
}

/// Write what the streams received in this burst of the carrier's reads to their sockets, one
/// vectored send each (Envoy's terminator writes a read burst of records so too, where one
/// send per 16 KiB record wakes the local reader per record), and give the credit back. What
/// a socket does not take stays for the stream's task, already woken.
fn write_held(ctx: &WorkerCtx, mux: &Mux) {
    let mut held = mux.held.take();
    for id in held.drain(..) {
        let written = match mux.streams.borrow_mut().get_mut(&id) {
            Some(p) => {
                p.held = false;
                write_pipe(p, &ctx.pool)
            }
            None => continue,
        };
        if written > 0 {
            let _ = mux.with_h2(|h2, out| h2.consume(id, written, out));
        }
    }
    // Back, so its capacity is reused (no allocation per burst).
    *mux.held.borrow_mut() = held;
}

/// Write the front of a stream's queue to its socket in one vectored send (unless its task is
/// writing a buffer it took, or no socket is attached), as far as the socket takes it now;
/// returns how many bytes went (counted in `written` for the stream's task).
fn write_pipe(p: &mut Pipe, pool: &BufferPool) -> usize {
    let Some(sink) = p.sink.as_ref().filter(|_| !p.busy && !p.rx.is_empty()) else { return 0 };
    let mut slices = [io::IoSlice::new(&[]); HELD_BUFFERS];
    let mut count = 0;
    for (slice, b) in slices.iter_mut().zip(&p.rx) {
        *slice = io::IoSlice::new(b);
        count += 1;
    }
    // An error is left to the stream's own write, which meets it again.
    let n = socket::NonBlocking(sink).write_vectored(slices.get(..count).unwrap_or_default()).unwrap_or(0);
    drain_written(p, n, pool);
    p.written += n;
    n
}

/// Copies `bytes` to the end of a stream's queue, filling its last pool buffer first.
fn queue(rx: &mut VecDeque<Vec<u8>>, mut bytes: &[u8], pool: &BufferPool) {
    while !bytes.is_empty() {
        let room = rx.back().map_or(0, |b| b.capacity() - b.len());
        if room == 0 {
            rx.push_back(pool.take());
            continue;
        }
        let (now, later) = bytes.split_at(room.min(bytes.len()));
        if let Some(b) = rx.back_mut() {
            b.extend_from_slice(now);
        }
        bytes = later;
    }
}

/// Write what the core appended (control frames, HEADERS) as it comes, taking turns with the
/// streams' DATA; `out` and `spare` swap so no buffer is allocated per write.
async fn write_out(mux: &Mux) -> io::Result<()> {
    loop {
        poll_fn(|cx| {
            if (!mux.out.borrow().is_empty() && !mux.turn.is_held()) || mux.closed.get() {
                return Poll::Ready(());
            }
            mux.flush.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if mux.closed.get() && mux.out.borrow().is_empty() {
            return Ok(()); // closed, all written
        }
        let turn = mux.take_turn().await;
        mux.write_queued(&turn).await?;
    }
}

/// A pool key: the TLS config slot (source identity and the destination identities it
/// expects) and the tunnel address.
type PoolKey = (usize, SocketAddr);

thread_local! {
    /// This worker's originator carriers, by (TLS config slot: source identity and expected
    /// destination identities, tunnel address). Per thread: a worker's connections use only
    /// its own carriers (thread-per-core, no lock).
    static POOL: RefCell<HashMap<PoolKey, Vec<Rc<Mux>>>> = RefCell::new(HashMap::new());
    /// Keys with a carrier being dialled: connections that find no room wait for it rather
    /// than each dialling its own (a burst of 1,000 connections makes 10 carriers, not 1,000).
    static DIALING: RefCell<HashMap<PoolKey, Rc<Dialing>>> = RefCell::new(HashMap::new());
}

/// A dial in progress, and who waits for it.
#[derive(Default)]
struct Dialing {
    done: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Dialing {
    async fn wait(&self) {
        poll_fn(|cx| {
            if self.done.get() {
                return Poll::Ready(());
            }
            self.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn finish(&self) {
        self.done.set(true);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// A carrier for `key` with room: a pooled one, else the one being dialled once it is up,
/// else a new one (`fresh`: dialled for this call).
async fn carrier(ctx: &Rc<WorkerCtx>, slot: &Slot, key: PoolKey) -> io::Result<(Rc<Mux>, bool)> {
    loop {
        if let Some(m) = pooled(key) {
            return Ok((m, false));
        }
        let pending = DIALING.with(|d| d.borrow().get(&key).cloned());
        match pending {
            Some(d) => d.wait().await,
            None => return Ok((dial_pooled(ctx, slot, key).await?, true)),
        }
    }
}

/// Dial a carrier for `key` and put it in the pool, others waiting meanwhile.
async fn dial_pooled(ctx: &Rc<WorkerCtx>, slot: &Slot, key: PoolKey) -> io::Result<Rc<Mux>> {
    let dialing = Rc::new(Dialing::default());
    DIALING.with(|d| d.borrow_mut().insert(key, Rc::clone(&dialing)));
    // Wakes the waiters however this ends (a dropped, cancelled connection too).
    struct Finish(Rc<Dialing>, PoolKey);
    impl Drop for Finish {
        fn drop(&mut self) {
            DIALING.with(|d| d.borrow_mut().remove(&self.1));
            self.0.finish();
        }
    }
    let _finish = Finish(dialing, key);
    let m = dial(ctx, slot, key).await?;
    POOL.with(|p| p.borrow_mut().entry(key).or_default().push(Rc::clone(&m)));
    Ok(m)
}

/// Originator (SPEC §12): a CONNECT stream to `target` through the HBONE terminator at `via`,
/// over a pooled carrier for (`slot`, `via`) with room for another stream, else a new one
/// (TLS with the source workload's certificate, the server's SPIFFE id checked, ALPN `h2`).
/// `Ok` only once the terminator answered 200; its baggage is the tunnel's peer.
pub(crate) async fn open(
    ctx: &Rc<WorkerCtx>,
    slot: &Slot,
    via: SocketAddr,
    target: SocketAddr,
) -> io::Result<(Tunnel, Security)> {
    let key = (std::ptr::from_ref(slot) as usize, via);
    let authority = target.to_string();
    let baggage = crate::hbone::baggage::encode(&ctx.node);
    let headers: [(&str, &[u8]); 1] = [("baggage", baggage.as_bytes())];
    // A carrier with room; one that turns out full as the peer counts (its SETTINGS allow
    // fewer streams) or going away is left to its streams, and another is found, once.
    let mut tries = 0;
    let (mux, id) = loop {
        tries += 1;
        let (mux, fresh) = carrier(ctx, slot, key).await?;
        match mux.with_h2(|h2, out| h2.open(&authority, &headers, out)) {
            Ok(id) => break (mux, id),
            Err(e) if fresh || tries > 2 => return Err(io::Error::other(e)),
            Err(_) => mux.going_away.set(true),
        }
    };
    mux.streams.borrow_mut().insert(id, Pipe::default());
    let mut tunnel = Tunnel { mux: Rc::clone(&mux), id, peer: None };
    let response = poll_fn(|cx| {
        let mut streams = mux.streams.borrow_mut();
        let Some(p) = streams.get_mut(&id) else { return Poll::Ready(None) };
        if let Some(r) = p.response.take() {
            return Poll::Ready(Some(r));
        }
        if p.reset {
            return Poll::Ready(None);
        }
        p.reader = Some(cx.waker().clone());
        Poll::Pending
    })
    .await;
    match response {
        Some((200, headers)) => {
            let values = headers.iter().filter(|(n, _)| n == "baggage").map(|(_, v)| v.as_slice());
            tunnel.peer = Some(Box::new(crate::hbone::baggage::decode(values)));
            Ok((tunnel, mux.security.clone()))
        }
        Some((status, _)) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hbone: CONNECT {authority} via {via}: {status}"),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("hbone: CONNECT {authority} via {via}: reset"),
        )),
    }
}

/// A pooled carrier for `key` with room for another stream; closed ones are forgotten.
fn pooled(key: PoolKey) -> Option<Rc<Mux>> {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let carriers = pool.get_mut(&key)?;
        carriers.retain(|m| !m.closed.get());
        let found = carriers
            .iter()
            .find(|m| !m.going_away.get() && m.h2.borrow().active_streams() < MAX_STREAMS)
            .cloned();
        if carriers.is_empty() {
            pool.remove(&key);
        }
        found
    })
}

/// A new originator carrier to `via`, its driver running on this worker.
async fn dial(ctx: &Rc<WorkerCtx>, slot: &Slot, key: PoolKey) -> io::Result<Rc<Mux>> {
    let via = key.1;
    let tcp = crate::socket::connect(via, None, CONNECT_TIMEOUT).await?;
    // Without it a stream's small DATA frame waits behind an unacknowledged one of another
    // stream (or a WINDOW_UPDATE): Nagle on a carrier delays every tunnel on it.
    let _ = tcp.set_nodelay(true);
    let (tls, security) = match super::mtls::client_handshake(ctx, CONNECT_TIMEOUT, tcp, slot).await {
        Ok(t) => t,
        Err(Error::Connect(e)) => return Err(e),
        Err(e) => return Err(io::Error::other(e.to_string())),
    };
    if !tls.alpn_is(ALPN_H2) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("hbone: {via}: ALPN is not h2")));
    }
    let mux = Mux::new(tls, Role::Client, security);
    let (ctx, driven) = (Rc::clone(ctx), Rc::clone(&mux));
    monoio::spawn(async move {
        if let Err(e) = drive(&ctx, &driven, |_, _, _| {}).await {
            log::debug!("hbone carrier to {via}: {e}");
        }
        // Out of the pool, so its socket closes once its last stream is gone.
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if let Some(carriers) = pool.get_mut(&key) {
                carriers.retain(|m| !Rc::ptr_eq(m, &driven));
                if carriers.is_empty() {
                    pool.remove(&key);
                }
            }
        });
    });
    Ok(mux)
}

/// Bound on an originator carrier's TCP connect and on its TLS handshake (the caller's
/// connect timeout bounds the whole open as well).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::{HELD_BUFFERS, Pipe, write_pipe, write_slices};
    use crate::conn::{BUFFER_SIZE, BufferPool};
    use std::io::Read;
    use std::rc::Rc;

    /// A pipe whose queue holds `HELD_BUFFERS` full pool buffers, attached to a local socket,
    /// and that socket's peer.
    fn held_pipe(pool: &BufferPool, sink: monoio::net::TcpStream) -> (Pipe, Vec<u8>) {
        let mut p = Pipe { sink: Some(Rc::new(sink)), ..Pipe::default() };
        let bytes: Vec<u8> = (0..HELD_BUFFERS * BUFFER_SIZE).map(|i| (i % 251) as u8).collect();
        super::queue(&mut p.rx, &bytes, pool);
        (p, bytes)
    }

    /// Runs `test` with a pool, a monoio socket connected over loopback (a stream's local
    /// socket) and its peer; `small` gives both ends 4 KiB buffers, so a 64 KiB send goes only
    /// in part.
    fn with_local_socket(
        small: bool,
        test: impl FnOnce(&BufferPool, monoio::net::TcpStream, std::net::TcpStream),
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        if small {
            socket2::SockRef::from(&listener).set_recv_buffer_size(4096).unwrap();
        }
        let addr = listener.local_addr().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
        rt.block_on(async move {
            let sink = monoio::net::TcpStream::connect(addr).await.unwrap();
            if small {
                socket2::SockRef::from(&crate::socket::borrow_fd(&sink)).set_send_buffer_size(4096).unwrap();
            }
            let (peer, _) = listener.accept().unwrap();
            test(&BufferPool::default(), sink, peer);
        });
    }

    #[test]
    fn a_burst_of_received_data_goes_to_the_local_socket_in_one_send_in_order() {
        with_local_socket(false, |pool, sink, mut peer| {
            let (mut p, bytes) = held_pipe(pool, sink);
            assert_eq!(p.rx.len(), HELD_BUFFERS);
            // One call: every held buffer in one vectored send (64 KiB fits a loopback socket).
            assert_eq!(write_pipe(&mut p, pool), bytes.len());
            assert!(p.rx.is_empty());
            assert_eq!(p.written, bytes.len(), "counted for the stream's task");
            let mut got = vec![0; bytes.len()];
            peer.read_exact(&mut got).unwrap();
            assert!(got == bytes, "the bytes, in order");
        });
    }

    /// Four opened records of one frame each (a 9-byte header, then payload), and the
    /// payloads' ranges.
    fn records() -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut payloads = Vec::new();
        let records: Vec<Vec<u8>> = (0..4)
            .map(|r| {
                let mut rec = vec![0u8; 9];
                let payload: Vec<u8> = (0..16_000).map(|i| ((i + r * 7) % 253) as u8).collect();
                payloads.extend_from_slice(&payload);
                rec.extend_from_slice(&payload);
                rec
            })
            .collect();
        (records, payloads)
    }

    #[test]
    fn received_data_goes_from_the_opened_records_to_the_local_socket_in_one_send_without_a_copy() {
        with_local_socket(false, |pool, sink, mut peer| {
            let mut p = Pipe { sink: Some(Rc::new(sink)), ..Pipe::default() };
            let (records, payloads) = records();
            let data = records.iter().map(|r| &r[9..]);
            // One call, one vectored send of every record's payload (64 KiB fits a loopback
            // socket), and nothing copied into the stream's queue on the way.
            assert_eq!(write_slices(&mut p, data, pool), payloads.len());
            assert!(p.rx.is_empty(), "no pool buffer took a copy");
            assert_eq!(p.written, payloads.len(), "counted for the stream's task");
            let mut got = vec![0; payloads.len()];
            peer.read_exact(&mut got).unwrap();
            assert!(got == payloads, "the payloads, in order");
        });
    }

    #[test]
    fn received_data_follows_what_the_streams_queue_holds_in_the_same_send() {
        with_local_socket(false, |pool, sink, mut peer| {
            let mut p = Pipe { sink: Some(Rc::new(sink)), ..Pipe::default() };
            super::queue(&mut p.rx, b"queued first", pool);
            let (records, payloads) = records();
            let n = write_slices(&mut p, records.iter().map(|r| &r[9..]), pool);
            assert_eq!(n, 12 + payloads.len());
            assert!(p.rx.is_empty());
            let mut got = vec![0; n];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got[..12], b"queued first");
            assert!(got[12..] == payloads[..], "then the payloads, in order");
        });
    }

    #[test]
    fn received_data_the_socket_does_not_take_at_once_is_queued_in_order_after_what_it_took() {
        // Small buffers on both ends, so the 64 KiB burst goes only in part.
        with_local_socket(true, |pool, sink, mut peer| {
            let mut p = Pipe { sink: Some(Rc::new(sink)), ..Pipe::default() };
            let (records, payloads) = records();
            let n = write_slices(&mut p, records.iter().map(|r| &r[9..]), pool);
            assert!(n > 0 && n < payloads.len(), "{n} of {} bytes taken", payloads.len());
            assert_eq!(p.written, n);
            // What did not go waits in the stream's queue, whole and in order, for its task.
            let queued: Vec<u8> = p.rx.iter().flatten().copied().collect();
            assert!(queued[..] == payloads[n..], "the queue holds the rest ({} bytes)", queued.len());
            let mut got = vec![0; n];
            peer.read_exact(&mut got).unwrap();
            assert!(got[..] == payloads[..n], "the socket got the first {n} bytes");
        });
    }

    #[test]
    fn received_data_is_queued_in_order_while_the_streams_task_writes_a_buffer_it_took() {
        with_local_socket(false, |pool, sink, _peer| {
            let mut p = Pipe { sink: Some(Rc::new(sink)), busy: true, ..Pipe::default() };
            let (records, payloads) = records();
            assert_eq!(write_slices(&mut p, records.iter().map(|r| &r[9..]), pool), 0);
            let queued: Vec<u8> = p.rx.iter().flatten().copied().collect();
            assert!(queued == payloads, "copied for the stream's task, in order");
            assert_eq!(p.written, 0);
        });
    }

    #[test]
    fn held_data_waits_while_the_streams_task_writes_a_buffer_it_took() {
        with_local_socket(false, |pool, sink, _peer| {
            let (mut p, _) = held_pipe(pool, sink);
            p.busy = true;
            // Nothing may overtake the buffer the task is writing.
            assert_eq!(write_pipe(&mut p, pool), 0);
            assert_eq!(p.rx.len(), HELD_BUFFERS);
        });
    }
}
