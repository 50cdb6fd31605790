//! HBONE on monoio (SPEC §12): one mutual-TLS connection carrying HTTP/2 CONNECT streams,
//! driven over `crate::hbone::conn` (the sans-IO core). This file owns the carrier (the TLS
//! connection: read → `recv` → events to streams, and one writer flushing what the core
//! appended) and [`Tunnel`], one stream as a side of the relay pipeline. What a stream does
//! (authority checks, connect, answer, copy, count) is the pipeline's, in `relay`.
//!
//! Everything lives on one worker: the carrier and its streams share the core through an
//! `Rc<Mux>`, borrowed only between awaits. A stream's received DATA waits in its queue as
//! slices of the core's read buffer (no copy) until written to the local socket; window
//! credit goes back only then (`consume`), so a slow local reader slows its own sender, not
//! the others on the carrier.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;

use super::Error;
use crate::conn::{Security, WorkerCtx};
use crate::hbone::conn::{Config, Connection, Event, Role};
use crate::hbone::headers::HeaderList;
use crate::metrics::TlsRefused;
use crate::snapshot::Snapshot;
use crate::tls::stream::{Fill, TlsStream};

/// ALPN of HBONE (SPEC §12): HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// One carrier's shared state: its TLS stream, the HTTP/2 core, the bytes the core appended
/// and not yet written, and each live stream's receive queue.
pub(crate) struct Mux {
    tls: TlsStream,
    h2: RefCell<Connection>,
    out: RefCell<BytesMut>,
    streams: RefCell<HashMap<u32, Pipe>>,
    /// The writer, waiting for `out` to fill.
    flush: Cell<Option<Waker>>,
    /// The carrier ended: streams fail, the writer stops.
    closed: Cell<bool>,
}

/// One stream's receive side and who waits on it.
#[derive(Default)]
struct Pipe {
    rx: VecDeque<Bytes>,
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
        let ids: Vec<u32> = self.streams.borrow().keys().copied().collect();
        for id in ids {
            self.with_pipe(id, |p| p.reset = true);
        }
        if let Some(w) = self.flush.take() {
            w.wake();
        }
    }
}

/// What a stream's receive side has next.
pub(crate) enum Received {
    /// Tunnel bytes.
    Data(Bytes),
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
}

impl Tunnel {
    /// The carrier's TCP socket (addresses).
    pub(crate) fn tcp(&self) -> &TcpStream {
        self.mux.tls.tcp()
    }

    /// Answer the CONNECT: `200` (with `headers`, our baggage) opens the tunnel; another
    /// status refuses it (400, 503 as ztunnel).
    pub(crate) fn respond(&self, status: u16, headers: &[(&str, &[u8])]) -> io::Result<()> {
        self.mux.with_h2(|h2, out| h2.respond(self.id, status, headers, out)).map_err(io::Error::other)
    }

    /// The next thing the peer sent on this stream.
    pub(crate) async fn recv(&self) -> Received {
        poll_fn(|cx| {
            let mut streams = self.mux.streams.borrow_mut();
            let Some(p) = streams.get_mut(&self.id) else { return Poll::Ready(Received::Reset) };
            if let Some(b) = p.rx.pop_front() {
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

    /// Send all of `data`, waiting for window credit when the peer's windows are spent.
    pub(crate) async fn send(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let taken = self.mux.with_h2(|h2, out| h2.send_data(self.id, data, out));
            let taken = taken.map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e))?;
            data = data.get(taken..).unwrap_or_default();
            if data.is_empty() {
                break;
            }
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

    /// Half-close our direction (END_STREAM).
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
            Some(p) => p.rx.iter().map(Bytes::len).sum(),
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
/// task. Ends when the client closes, the HTTP/2 connection fails or finishes.
pub(super) async fn serve_carrier(
    ctx: Rc<WorkerCtx>,
    snapshot: Rc<Snapshot>,
    li: usize,
    acceptor: u64,
    down: TcpStream,
) -> Result<(), Error> {
    let listener = &snapshot.config.listeners[li];
    let Some(slot) = &snapshot.tls.listeners[li] else { return Err(Error::Refused) };
    let (tls, security) = super::mtls::handshake(&ctx, listener, slot, down).await?;
    // ztunnel's rules: TLS 1.3 and HTTP/2 only (a client without ALPN is refused too).
    if !tls.is_tls13() || !tls.alpn_is(ALPN_H2) {
        log::debug!("listener {}: hbone: refused: not TLS 1.3 with ALPN h2", listener.name);
        ctx.metrics.borrow().count_tls_refused(TlsRefused::Other);
        return Err(Error::Refused);
    }
    let local = tls.tcp().local_addr()?;
    let mut out = BytesMut::new();
    let h2 = Connection::new(Role::Server, Config::default(), &mut out);
    let mux = Rc::new(Mux {
        tls,
        h2: RefCell::new(h2),
        out: RefCell::new(out),
        streams: RefCell::new(HashMap::new()),
        flush: Cell::new(None),
        closed: Cell::new(false),
    });
    let accept = |id: u32, authority: String, headers: HeaderList| {
        let tunnel = Tunnel { mux: Rc::clone(&mux), id };
        mux.streams.borrow_mut().insert(id, Pipe::default());
        let req = Request { tunnel, authority, headers, local, security: security.clone() };
        monoio::spawn(super::serve_stream(Rc::clone(&ctx), Rc::clone(&snapshot), li, acceptor, req));
    };
    let result = {
        let reader = pin!(read_in(&ctx, &mux, accept));
        let writer = pin!(write_out(&mux));
        run(reader, writer).await
    };
    mux.close();
    if let Err(e) = &result {
        log::debug!("listener {}: hbone carrier: {e}", listener.name);
    }
    Ok(())
}

/// Run the reader and the writer until the reader ends (the writer then flushes what is left)
/// or either fails.
async fn run(
    mut reader: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
    mut writer: std::pin::Pin<&mut impl Future<Output = io::Result<()>>>,
) -> io::Result<()> {
    poll_fn(|cx| {
        if let Poll::Ready(r) = writer.as_mut().poll(cx) {
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
        if mux.tls.fill(&ctx.pool).await? == Fill::Eof {
            return Ok(());
        }
        let mut buf = ctx.pool.take();
        mux.tls.take_into(&mut buf);
        let fed = mux.with_h2(|h2, out| h2.recv(&buf, out));
        ctx.pool.put(buf);
        loop {
            let event = mux.h2.borrow_mut().poll_event();
            let Some(event) = event else { break };
            dispatch(mux, event, &mut accept);
        }
        fed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if mux.h2.borrow().is_done() {
            return Ok(());
        }
    }
}

/// Act on one event of the core.
fn dispatch(mux: &Mux, event: Event, accept: &mut impl FnMut(u32, String, HeaderList)) {
    match event {
        Event::Request { stream_id, authority, headers } => accept(stream_id, authority, headers),
        Event::Data { stream_id, data } => {
            let n = data.len();
            if !mux.with_pipe(stream_id, |p| p.rx.push_back(data)) {
                // Nobody reads this stream any more: give the window back at once.
                let _ = mux.with_h2(|h2, out| h2.consume(stream_id, n, out));
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
        Event::Refused { stream_id, why } => log::debug!("hbone: stream {stream_id} refused: {why}"),
        Event::Response { .. } | Event::PingAck { .. } | Event::GoAway { .. } => {}
    }
}

/// Write what the core appended, as it comes; two buffers swap so none is allocated per write.
async fn write_out(mux: &Mux) -> io::Result<()> {
    let mut spare = BytesMut::new();
    loop {
        poll_fn(|cx| {
            if !mux.out.borrow().is_empty() || mux.closed.get() {
                return Poll::Ready(());
            }
            mux.flush.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        std::mem::swap(&mut *mux.out.borrow_mut(), &mut spare);
        if spare.is_empty() {
            return Ok(()); // closed, all written
        }
        mux.tls.write_all(&spare).await?;
        spare.clear();
    }
}
