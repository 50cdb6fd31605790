//! A side of a connection, whatever carries it (plain TCP, TLS, an HBONE stream), and
//! the copy between two sides: both directions until both ended, half-close passed on, a reset
//! kept a reset, idle timeout and drain deadline (SPEC §1). The pipeline in `relay` sets the
//! sides up; this file only moves bytes and says how the copy ended.
//!
//! Each pair of kinds has its fastest loop: plain ↔ plain reads with one non-blocking
//! recv(2) into a pool buffer and moves bulk flows by splice(2); plain ↔ TLS goes through
//! rustls (no kTLS here: ciphertext socket → pool buffer → rustls, plaintext from rustls'
//! buffer straight into the socket, the other way through one pool buffer); plain ↔ HBONE
//! stream shares the socket with the stream's carrier, which writes received DATA into it
//! once per burst of its reads, and sends DATA read behind room for its frame header,
//! several reads in one send.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;

use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use super::Error;
use super::hbone::{DATA_AT, RECORD_TAIL_ROOM, Received, Tunnel};
use crate::conn::{Conn, WorkerCtx};
use crate::socket;
use crate::tls::record;
use crate::tls::stream::{self, Fill, TlsStream};

/// One side of a connection: the downstream client or the upstream, as the pipeline set it
/// up. The copy and the exchange ask what they need of it; only this file matches on kinds.
pub(crate) enum Side {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (terminated inbound or originated outbound).
    Tls(TlsStream),
    /// One HBONE stream (HTTP/2 CONNECT inside mTLS, SPEC §12).
    Tunnel(Tunnel),
}

impl Side {
    /// The TCP socket underneath (addresses, original destination, readiness).
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Side::Plain(s) => s,
            Side::Tls(t) => t.tcp(),
            Side::Tunnel(t) => t.tcp(),
        }
    }

    /// Close with a TCP reset (a reset stays a reset; a drain deadline cuts).
    pub(crate) fn reset(self) {
        match self {
            Side::Plain(s) => socket::reset(s),
            Side::Tls(t) => socket::reset(t.into_tcp()),
            Side::Tunnel(t) => t.reset(),
        }
    }
}

/// Copy both directions until both ended; on an error in either, reset both sides. Fired
/// by the tick, `conn.cancel` ends it too: gracefully (FIN) after an idle timeout, with a
/// reset at the drain deadline, so a peer never mistakes a cut-off transfer for a whole one.
///
/// Not an `async fn`: its future is most of an idle connection's task, and an `async fn`
/// keeps the two sides three times over (its arguments, the matched pair, the arm's
/// arguments). The pair is matched here, before any future exists, and each arm's future
/// holds its sides once (issue 31: an idle mTLS connection's task 4,224 B, a 5,120 B block,
/// → 1,904 B, a 2,048 B block).
pub(super) fn copy_both<'a>(
    ctx: &'a WorkerCtx,
    conn: &'a Conn,
    down: Side,
    up: Side,
) -> OneOf<
    impl Future<Output = Result<(), Error>> + 'a,
    impl Future<Output = Result<(), Error>> + 'a,
    impl Future<Output = Result<(), Error>> + 'a,
> {
    match (down, up) {
        (Side::Plain(down), Side::Plain(up)) => OneOf::First { arm: copy_plain(ctx, conn, down, up) },
        (Side::Plain(plain), Side::Tunnel(tunnel)) => {
            OneOf::Second { arm: copy_tunnel(ctx, conn, plain, tunnel, true) }
        }
        (Side::Tunnel(tunnel), Side::Plain(plain)) => {
            OneOf::Second { arm: copy_tunnel(ctx, conn, plain, tunnel, false) }
        }
        (down, up) => OneOf::Third { arm: copy_sides(ctx, conn, down, up) },
    }
}

pin_project_lite::pin_project! {
    /// The future of the arm a match over kinds of sides took: one future the size of the
    /// largest arm's, with nothing kept beside it.
    #[project = OneOfProj]
    pub(super) enum OneOf<A, B, C> {
        /// The first arm's future.
        First { #[pin] arm: A },
        /// The second arm's future.
        Second { #[pin] arm: B },
        /// The third arm's future.
        Third { #[pin] arm: C },
    }
}

impl<O, A, B, C> Future for OneOf<A, B, C>
where
    A: Future<Output = O>,
    B: Future<Output = O>,
    C: Future<Output = O>,
{
    type Output = O;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<O> {
        match self.project() {
            OneOfProj::First { arm } => arm.poll(cx),
            OneOfProj::Second { arm } => arm.poll(cx),
            OneOfProj::Third { arm } => arm.poll(cx),
        }
    }
}

/// Plain ↔ HBONE stream (`plain_is_down`: the plain side is the downstream). The socket is
/// shared with the stream's carrier (`Tunnel::attach`) for the copy's length, so received DATA
/// is written to it straight from the carrier's read. Idle: close gracefully (FIN, END_STREAM);
/// anything else resets both. (An `async` block, not an `async fn`: its sides are kept once,
/// as `copy_both` says.)
fn copy_tunnel<'a>(
    ctx: &'a WorkerCtx,
    conn: &'a Conn,
    plain: TcpStream,
    tunnel: Tunnel,
    plain_is_down: bool,
) -> impl Future<Output = Result<(), Error>> + 'a {
    let plain = Rc::new(plain);
    async move {
        let result = {
            let to_tunnel = pin!(plain_to_tunnel(ctx, conn, &plain, &tunnel, plain_is_down));
            let to_plain = pin!(tunnel_to_plain(ctx, conn, &tunnel, &plain, !plain_is_down));
            if plain_is_down {
                both(to_tunnel, to_plain, conn).await
            } else {
                both(to_plain, to_tunnel, conn).await
            }
        };
        if let Err(Ended::Drain | Ended::Reset(_)) = &result {
            // The tunnel first: its pipe lets go of the socket, so the reset below is its last close.
            tunnel.reset();
            if let Ok(plain) = Rc::try_unwrap(plain) {
                socket::reset(plain);
            }
        }
        result.map_err(|e| Error::Io(e.into()))
    }
}

/// Two sides of which at least one is not plain TCP: one loop per direction, chosen by the
/// pair of kinds. Idle: close gracefully (dropping both sends FIN); anything else resets both.
/// (An `async` block, not an `async fn`: its sides are kept once, as `copy_both` says.)
// clippy's `async fn` would keep its arguments twice (rustc moves them into locals).
#[allow(clippy::manual_async_fn)]
fn copy_sides<'a>(
    ctx: &'a WorkerCtx,
    conn: &'a Conn,
    down: Side,
    up: Side,
) -> impl Future<Output = Result<(), Error>> + 'a {
    async move {
        let result = {
            let request = pin!(direction(ctx, conn, &down, &up, true));
            let response = pin!(direction(ctx, conn, &up, &down, false));
            both(request, response, conn).await
        };
        if let Err(Ended::Drain | Ended::Reset(_)) = &result {
            down.reset();
            up.reset();
        }
        result.map_err(|e| Error::Io(e.into()))
    }
}

/// One direction, `from` → `to` (`request`: downstream → upstream, for the byte counters).
/// Not an `async fn`, as `copy_both` says: the arm's future is all there is.
fn direction<'a>(
    ctx: &'a WorkerCtx,
    conn: &'a Conn,
    from: &'a Side,
    to: &'a Side,
    request: bool,
) -> OneOf<
    impl Future<Output = io::Result<()>> + 'a,
    impl Future<Output = io::Result<()>> + 'a,
    std::future::Ready<io::Result<()>>,
> {
    match (from, to) {
        (Side::Plain(p), Side::Tls(t)) => OneOf::First { arm: plain_to_tls(ctx, conn, p, t, request) },
        (Side::Tls(t), Side::Plain(p)) => OneOf::Second { arm: tls_to_plain(ctx, conn, t, p, request) },
        // The pipeline never pairs two encrypted sides (a terminated downstream's upstream is
        // the local application, plaintext); plain ↔ plain takes `copy_plain` and plain ↔
        // HBONE stream `copy_tunnel`.
        _ => OneOf::Third {
            arm: std::future::ready(Err(io::Error::other("no copy between these kinds of sides"))),
        },
    }
}

/// Records sealed and sent together by `plain_to_tls`: as many as a record buffer holds.
const RECORDS_PER_SEND: usize = stream::RECORDS_PER_BUFFER;

/// Full reads `plain_to_tls` makes without a readiness wait between them (1 MiB): the wait
/// goes through the ring, so the worker's other connections get their turn at least this
/// often while one stream's reads and sends never block.
const READS_WITHOUT_WAIT: u32 = 8;

/// Unsent bytes a TLS socket queues once its connection has moved as many this way
/// (TCP_NOTSENT_LOWAT): a send beyond them waits for the peer to take some. Without a bound
/// the kernel queues up to its send buffer (autotuned to 4 MiB), so a sidecar whose peer shares
/// its core writes MiBs before the peer reads any, and the peer then copies them out of L3
/// instead of L2: CPU per GB of the mTLS pair 0.92× with 128 KiB (perf/RESULTS.md, issue
/// 31). Bytes in flight are not bounded (the peer's window and the congestion window still
/// decide them), so a long path keeps its throughput.
const UNSENT_LIMIT: usize = 128 * 1024;

/// Plaintext → TLS: a record buffer only between readiness and the send. One recvmsg(2)
/// reads up to a buffer's worth of records (8, 128 KiB) at once, each record's plaintext behind room
/// for its header and before room for its tag, so they are sealed in place and sent together
/// in one send: no copy besides the AEAD's pass (issue 31). A read that filled every record
/// means more is waiting: the next read is tried before any readiness wait (a wait is one
/// ring operation and a wake-up per 128 KiB of a bulk stream), up to [`READS_WITHOUT_WAIT`]
/// in a row: a send that never blocks would otherwise never yield the worker.
async fn plain_to_tls(
    ctx: &WorkerCtx,
    conn: &Conn,
    plain: &TcpStream,
    tls: &TlsStream,
    request: bool,
) -> io::Result<()> {
    let mut lens = [0usize; RECORDS_PER_SEND];
    let mut ready = false;
    let mut streak = 0;
    // Bytes moved until the bound is set: before a connection has moved as many as the bound,
    // its socket cannot hold more unsent, so a short connection never pays the setsockopt.
    let mut until_bound = UNSENT_LIMIT;
    loop {
        if !ready || streak == READS_WITHOUT_WAIT {
            plain.readable(false).await?;
            streak = 0;
        }
        streak += 1;
        let (head, tail) = tls.record_rooms();
        let mut buf = stream::take_record_buffer();
        let records = match socket::recv_spare_spaced(
            plain,
            &mut buf,
            (head, record::MAX_PLAINTEXT, tail),
            &mut lens,
        ) {
            Ok(0) => {
                stream::put_record_buffer(buf);
                return tls.shutdown().await;
            }
            Ok(records) => records,
            Err(e) => {
                stream::put_record_buffer(buf);
                if e.kind() == io::ErrorKind::WouldBlock {
                    ready = false;
                    continue;
                }
                return Err(e);
            }
        };
        let lens = &lens[..records];
        let n = lens.iter().sum();
        count_bytes(ctx, conn, n, request);
        ready = records == RECORDS_PER_SEND && lens.iter().all(|&n| n == record::MAX_PLAINTEXT);
        if until_bound > 0 {
            until_bound = until_bound.saturating_sub(n);
            if until_bound == 0
                && let Err(e) = socket::set_notsent_low_water(tls.tcp(), UNSENT_LIMIT)
            {
                log::debug!("TCP_NOTSENT_LOWAT: {e}");
            }
        }
        let r = tls.seal_and_send(&mut buf, lens).await;
        stream::put_record_buffer(buf);
        r?;
    }
}

/// TLS → plaintext: decrypted bytes go from rustls' buffer straight into the socket.
async fn tls_to_plain(
    ctx: &WorkerCtx,
    conn: &Conn,
    tls: &TlsStream,
    plain: &TcpStream,
    request: bool,
) -> io::Result<()> {
    loop {
        if tls.fill(&ctx.pool).await? == Fill::Eof {
            return socket::shutdown_write(plain);
        }
        match tls.send_to(plain) {
            Ok(n) => count_bytes(ctx, conn, n, request),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => plain.writable(false).await?,
            Err(e) => return Err(e),
        }
    }
}

/// DATA frames of a full pool buffer each handed to the TLS stream before one flush: their
/// records fill its record buffer but one record's room, kept for the frames the HTTP/2 core
/// queues meanwhile (WINDOW_UPDATE, PING), so none is sent on its own.
const READS_PER_TLS_SEND: usize = stream::RECORDS_PER_BUFFER - 1;

/// Plaintext → HBONE stream: read behind room for a TLS record's and a DATA frame's headers
/// (pool buffers, only between readiness and the hand-over), so each frame goes to the TLS
/// stream without a copy here; EOF is END_STREAM. One recvmsg(2) reads into
/// `READS_PER_TLS_SEND` buffers (a frame each), all handed over and then sent in one flush; a
/// full read means more is waiting, so the next is tried before any readiness wait (a wait is
/// one ring operation and a wake-up).
async fn plain_to_tunnel(
    ctx: &WorkerCtx,
    conn: &Conn,
    plain: &TcpStream,
    tunnel: &Tunnel,
    request: bool,
) -> io::Result<()> {
    let mut ready = false;
    let mut streak = 0;
    loop {
        if !ready || streak == READS_WITHOUT_WAIT {
            plain.readable(false).await?;
            streak = 0;
        }
        streak += 1;
        let mut bufs: [Vec<u8>; READS_PER_TLS_SEND] = std::array::from_fn(|_| {
            let mut b = ctx.pool.take();
            b.resize(DATA_AT, 0);
            b
        });
        let n = match socket::recv_spare_vectored(plain, &mut bufs, RECORD_TAIL_ROOM) {
            Ok(n) => n,
            Err(e) => {
                bufs.into_iter().for_each(|b| ctx.pool.put(b));
                if e.kind() == io::ErrorKind::WouldBlock {
                    ready = false;
                    continue;
                }
                return Err(e);
            }
        };
        if n == 0 {
            bufs.into_iter().for_each(|b| ctx.pool.put(b));
            return tunnel.finish();
        }
        count_bytes(ctx, conn, n, request);
        ready = bufs.last().is_some_and(|b| b.len() + RECORD_TAIL_ROOM == b.capacity());
        let mut r = Ok(());
        for b in bufs.iter_mut().filter(|b| b.len() > DATA_AT) {
            // The record's tag room (capacity kept free by the read).
            b.resize(b.len() + RECORD_TAIL_ROOM, 0);
            r = tunnel.send_framed(b).await;
            if r.is_err() {
                break;
            }
        }
        bufs.into_iter().for_each(|b| ctx.pool.put(b));
        r?;
        tunnel.flush().await?;
    }
}

/// HBONE stream → plaintext: the socket is the stream's sink, so DATA mostly arrives already
/// written (by the carrier at the end of its burst of reads, window credit given back then);
/// what the socket did not take comes queued and is written here, credited as it goes.
/// END_STREAM is a FIN, RST_STREAM an error (the copy then resets the socket).
async fn tunnel_to_plain(
    ctx: &WorkerCtx,
    conn: &Conn,
    tunnel: &Tunnel,
    plain: &Rc<TcpStream>,
    request: bool,
) -> io::Result<()> {
    use std::io::Write;
    let _attached = tunnel.attach(Rc::clone(plain));
    loop {
        let buf = match tunnel.recv().await {
            Received::Written(n) => {
                count_bytes(ctx, conn, n, request);
                continue;
            }
            Received::Data(buf) => buf,
            Received::End => return socket::shutdown_write(plain),
            Received::Reset => {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "hbone stream reset"));
            }
        };
        let mut at = 0;
        while let Some(rest) = buf.get(at..).filter(|r| !r.is_empty()) {
            match socket::NonBlocking(plain).write(rest) {
                Ok(n) => {
                    at += n;
                    tunnel.consume(n);
                    count_bytes(ctx, conn, n, request);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => plain.writable(false).await?,
                Err(e) => return Err(e),
            }
        }
        ctx.pool.put(buf);
    }
}

/// Count `n` bytes one way and mark the connection active.
pub(super) fn count_bytes(ctx: &WorkerCtx, conn: &Conn, n: usize, request: bool) {
    let counter = if request { &conn.received_bytes } else { &conn.sent_bytes };
    counter.set(counter.get() + n as u64);
    conn.last_active.set(ctx.now.get());
    ctx.busy.note();
}

/// Plain ↔ plain: split both sockets and pump each way (splice for bulk). (An `async` block,
/// not an `async fn`: its sockets are kept once, as `copy_both` says.)
fn copy_plain<'a>(
    ctx: &'a WorkerCtx,
    conn: &'a Conn,
    down: TcpStream,
    up: TcpStream,
) -> impl Future<Output = Result<(), Error>> + 'a {
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    async move {
        let one_ended = Cell::new(false);
        let result = {
            let request = pin!(pump(ctx, conn, &mut down_r, &mut up_w, true, &one_ended));
            let response = pin!(pump(ctx, conn, &mut up_r, &mut down_w, false, &one_ended));
            both(request, response, conn).await
        };
        match &result {
            // Both sides sent their FIN and read ours: closing the sockets ends them. Reunited,
            // they close without the shutdown(2) a dropped write half makes (which would fail).
            Ok(()) => {
                let _ = (down_r.reunite(down_w), up_r.reunite(up_w));
            }
            // Idle: nothing in flight; dropping the write halves shuts them (FIN) and closes.
            Err(Ended::Idle) => {}
            Err(Ended::Drain | Ended::Reset(_)) => {
                if let (Ok(d), Ok(u)) = (down_r.reunite(down_w), up_r.reunite(up_w)) {
                    socket::reset(d);
                    socket::reset(u);
                }
            }
        }
        result.map_err(|e| Error::Io(e.into()))
    }
}

/// Why a copy stopped before both directions ended, decided where it happened: by the idle
/// timer (close gracefully), by the drain deadline or a socket error (reset both sides). A
/// socket's own `ETIMEDOUT` (retransmissions exhausted, the peer host gone) is a reset,
/// never the idle timeout: a cut-off transfer must not look complete to the other side.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The connection's idle timeout fired.
    Idle,
    /// The drain deadline passed with the connection still open.
    Drain,
    /// A read or write failed.
    Reset(io::Error),
}

impl From<Ended> for io::Error {
    fn from(e: Ended) -> io::Error {
        match e {
            Ended::Idle => io::Error::new(io::ErrorKind::TimedOut, "idle timeout"),
            Ended::Drain => io::Error::new(io::ErrorKind::ConnectionAborted, "drain deadline"),
            Ended::Reset(e) => e,
        }
    }
}

/// Run both directions to completion; stop at the first error, or when the connection is
/// cancelled by the tick (idle timeout or drain deadline).
async fn both<A, B>(
    mut a: std::pin::Pin<&mut A>,
    mut b: std::pin::Pin<&mut B>,
    conn: &Conn,
) -> Result<(), Ended>
where
    A: Future<Output = io::Result<()>>,
    B: Future<Output = io::Result<()>>,
{
    let (mut a_done, mut b_done) = (false, false);
    let mut cancel = pin!(conn.cancel.wait());
    poll_fn(|cx| {
        if !a_done && let Poll::Ready(r) = a.as_mut().poll(cx) {
            r.map_err(Ended::Reset)?;
            a_done = true;
        }
        if !b_done && let Poll::Ready(r) = b.as_mut().poll(cx) {
            r.map_err(Ended::Reset)?;
            b_done = true;
        }
        if a_done && b_done {
            return Poll::Ready(Ok(()));
        }
        if cancel.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(if conn.idle_expired.get() { Ended::Idle } else { Ended::Drain }));
        }
        Poll::Pending
    })
    .await
}

/// One direction's sender half-closed: pass its FIN on. The first direction to end does so
/// with shutdown(2); the second leaves it to the close that follows at once in `copy_both`
/// (a socket with nothing left unread sends a FIN when closed), as HAProxy does: one
/// shutdown per connection instead of two.
async fn pass_fin(to: &mut OwnedWriteHalf<TcpStream>, one_ended: &Cell<bool>) -> io::Result<()> {
    if one_ended.replace(true) {
        return Ok(());
    }
    shutdown_write(to).await
}

/// Shut the write half (half-close). The peer may already have closed the socket entirely,
/// after a FIN we relayed during the exchange: `ENOTCONN` then means "already done".
async fn shutdown_write(to: &mut OwnedWriteHalf<TcpStream>) -> io::Result<()> {
    match to.shutdown().await {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

/// One direction: read, write all, count; on EOF shut the other side's write half
/// (half-close). A read is one non-blocking recv(2) into a pool buffer, taken only for the
/// call: readiness is awaited (one ring operation, no buffer) only once a read would block,
/// so an idle connection holds no buffer and a read costs no ring operation of its own. A
/// read that fills the whole buffer marks a bulk flow: from then on each burst moves by
/// splice(2) through a pipe borrowed from the worker's pool for the burst.
async fn pump(
    ctx: &WorkerCtx,
    conn: &Conn,
    from: &mut OwnedReadHalf<TcpStream>,
    to: &mut OwnedWriteHalf<TcpStream>,
    request: bool,
    one_ended: &Cell<bool>,
) -> io::Result<()> {
    let counter = if request { &conn.received_bytes } else { &conn.sent_bytes };
    let mut splice = ctx.splice;
    let mut bulk = false;
    // A client usually sent its first bytes while we connected upstream: try at once. The
    // upstream speaks when asked, so its side starts by waiting.
    let mut ready = request;
    // The look for a FIN behind a short read (below) is made once per direction: an
    // answer-and-close comes as the first message, and a chatty connection must not pay a
    // second recv (EAGAIN) for every message it relays.
    let mut looked_for_fin = false;
    loop {
        if !ready {
            socket::readable(from).await?;
        }
        if bulk
            && splice
            && let Some(pipe) = ctx.pipes.take(ctx.now.get())
        {
            match splice_burst(ctx, conn, from, to, counter, &pipe).await? {
                Burst::Quiet => {
                    pipe.release();
                    ready = false;
                    continue;
                }
                Burst::Eof => {
                    pipe.release();
                    return pass_fin(to, one_ended).await;
                }
                Burst::Unsupported { error, left } => {
                    log::debug!("splice failed, copying instead: {error}");
                    splice = false;
                    // Boxed: at most once in a flow's life; inline, its write's state would
                    // sit in every connection's task.
                    Box::pin(copy_out_of_pipe(ctx, &pipe, to, left)).await?;
                }
            }
        }
        let mut buf = ctx.pool.take();
        let n = match socket::recv(from, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                ctx.pool.put(buf);
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        ready = false;
                        continue;
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
        };
        if n == 0 {
            ctx.pool.put(buf);
            return pass_fin(to, one_ended).await;
        }
        // A full read: more is probably waiting, so read again at once.
        ready = n == buf.capacity();
        // A short read is often a message's end, and a sender that answers and closes
        // (HTTP/1.0 style) has its FIN right behind it: look once more, so that the data and
        // the FIN leave in one segment and no readiness wait is armed for the EOF (HAProxy
        // learns that FIN from EPOLLRDHUP with the data; monoio's poll does not report it).
        let mut fin = false;
        if !ready && !looked_for_fin {
            looked_for_fin = true;
            match socket::recv(from, &mut buf) {
                Ok(0) => fin = true,
                Ok(_) => ready = buf.len() == buf.capacity(),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => {
                    ctx.pool.put(buf);
                    return Err(e);
                }
            }
        }
        let n = buf.len();
        if ready && splice && !bulk {
            bulk = true;
            if let Err(e) = socket::nonblocking(from, to) {
                log::debug!("splice unavailable, copying instead: {e}");
                splice = false;
            }
        }
        ctx.busy.note();
        counter.set(counter.get() + n as u64);
        conn.last_active.set(ctx.now.get());
        if fin {
            let sent = socket::send_before_fin(to, &buf).unwrap_or(0);
            buf.drain(..sent.min(n));
        }
        let res = match buf.is_empty() {
            true => Ok(0),
            false => {
                let (res, b) = to.write_all(buf).await;
                buf = b;
                res
            }
        };
        ctx.pool.put(buf);
        res?;
        if fin {
            return pass_fin(to, one_ended).await;
        }
    }
}

/// How a splice burst ended.
enum Burst {
    /// Nothing more to read for now; the pipe is empty and goes back to the pool.
    Quiet,
    /// The sender half-closed; the pipe is empty.
    Eof,
    /// splice(2) itself failed, not the connection; `left` bytes are still in the pipe.
    Unsupported { error: io::Error, left: usize },
}

/// Errors that are the connection's (a reset, a closed peer), not splice's: they end the
/// connection as a copy would. Any other splice error makes the flow copy instead.
fn connection_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | NotConnected
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
    )
}

/// Socket → pipe → socket inside the kernel until the socket has nothing more to read, with
/// non-blocking splices and writability waits, so the worker never blocks.
async fn splice_burst(
    ctx: &WorkerCtx,
    conn: &Conn,
    from: &mut OwnedReadHalf<TcpStream>,
    to: &mut OwnedWriteHalf<TcpStream>,
    counter: &Cell<u64>,
    pipe: &socket::Lease<'_>,
) -> io::Result<Burst> {
    loop {
        let n = match socket::splice_in(from, pipe) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Quiet),
            Err(e) if connection_error(&e) => return Err(e),
            Err(error) => return Ok(Burst::Unsupported { error, left: 0 }),
        };
        ctx.busy.note();
        counter.set(counter.get() + n as u64);
        conn.last_active.set(ctx.now.get());
        let mut left = n;
        while left > 0 {
            match socket::splice_out(pipe, to, left) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket::writable(to).await?,
                Err(e) if connection_error(&e) => return Err(e),
                Err(error) => return Ok(Burst::Unsupported { error, left }),
            }
        }
    }
}

/// After a failed splice: write what is still in the pipe by copying it through buffers.
async fn copy_out_of_pipe(
    ctx: &WorkerCtx,
    pipe: &socket::Lease<'_>,
    to: &mut OwnedWriteHalf<TcpStream>,
    mut left: usize,
) -> io::Result<()> {
    while left > 0 {
        let mut buf = ctx.pool.take();
        match socket::drain_pipe(pipe, &mut buf) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            r => {
                ctx.pool.put(buf);
                return r.and(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
        let (res, buf) = to.write_all(buf).await;
        ctx.pool.put(buf);
        res?;
    }
    Ok(())
}
