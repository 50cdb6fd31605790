//! Socket operations monoio does not offer: upstream connects with options set first,
//! readiness waits on split halves, reset on close (SO_LINGER 0), and a zero-copy splice(2)
//! pump through a pipe. All of the crate's `unsafe`
//! lives here, each block with the reason it holds.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use monoio::io::{OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

/// Pipe capacity asked for the first `LARGE_PIPES` pipes of a worker: one splice moves up to
/// this many bytes (1 MiB measured best for one stream; 256 KiB and 4 MiB were slower).
const PIPE_SIZE: usize = 1024 * 1024;
/// Pipes of a worker sized `PIPE_SIZE`; the rest keep the kernel's default (64 KiB), so one
/// worker's pipes stay a small share of the uid's pipe-page budget that every sidecar on the
/// node shares (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default).
const LARGE_PIPES: usize = 4;
/// A pipe smaller than this does not pay: over its uid's soft budget the kernel hands out
/// 2-page pipes and refuses to grow them; such a flow copies through a 16 KiB buffer instead.
const MIN_PIPE: usize = 64 * 1024;
/// Pipes (in use plus idle) one worker may hold: each costs 2 fds and budget pages.
const MAX_PIPES: usize = 64;
/// Idle pipes a worker keeps for the next bulk flow; beyond it a returned pipe is closed.
const KEEP_PIPES: usize = 8;
/// A worker whose flows took no pipe for this long closes its idle ones: an idle sidecar
/// should not hold budget pages (or fds) the node's busy sidecars could use.
const IDLE_PIPES_KEPT_FOR: Duration = Duration::from_secs(1);

/// The monoio version whose split halves `stream_of_read`/`stream_of_write` were checked
/// against; Cargo.toml pins exactly it, and a unit test fails when Cargo.lock names another.
pub const MONOIO_CHECKED: &str = "0.2.4";

// Compile-time half of the check: a split half is still a tuple struct sharing the stream
// through `Rc<UnsafeCell<_>>` (a change of representation fails the build here).
const _: fn(&OwnedReadHalf<TcpStream>) -> &std::rc::Rc<std::cell::UnsafeCell<TcpStream>> = |h| &h.0;
const _: fn(&OwnedWriteHalf<TcpStream>) -> &std::rc::Rc<std::cell::UnsafeCell<TcpStream>> = |h| &h.0;

fn stream_of_read(half: &OwnedReadHalf<TcpStream>) -> &TcpStream {
    // SAFETY: monoio (exactly `MONOIO_CHECKED`, pinned in Cargo.toml) shares a split stream through an
    // `Rc<UnsafeCell<_>>` and takes `&mut` to it only while *creating* a read or write op:
    // the op future then owns a cloned `SharedFd`, not a reference. This worker is one
    // thread, so no `&mut` is live while we hold this shared reference for a `&self` call
    // (readiness, raw fd). The stream lives as long as the half.
    unsafe { &*half.0.get() }
}

fn stream_of_write(half: &OwnedWriteHalf<TcpStream>) -> &TcpStream {
    // SAFETY: as in `stream_of_read`.
    unsafe { &*half.0.get() }
}

/// Wait until the read half's socket has data (or EOF/error) without taking a buffer.
pub async fn readable(half: &OwnedReadHalf<TcpStream>) -> io::Result<()> {
    // relaxed=false: on the epoll driver a relaxed wait may report stale readiness, which
    // would make an idle connection take a buffer and park a read with it.
    stream_of_read(half).readable(false).await
}

/// Read what the socket holds into `buf`'s spare capacity without waiting (MSG_DONTWAIT):
/// one recv(2), no ring operation. `WouldBlock` means wait for `readable`; `Ok(0)` is EOF.
pub fn recv(half: &OwnedReadHalf<TcpStream>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: the fd is the half's live socket; `spare` is writable memory of `spare.len()`
    // bytes owned by `buf`, and only the `n` bytes recv(2) reports written are marked
    // initialised below.
    let n = unsafe {
        libc::recv(
            stream_of_read(half).as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Wait until the write half's socket has room.
pub async fn writable(half: &OwnedWriteHalf<TcpStream>) -> io::Result<()> {
    stream_of_write(half).writable(false).await
}

/// Close with RST (SO_LINGER 0), so the peer sees the reset the other side sent us.
pub fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: the fd is a live socket owned by `s` for the duration of the call, and
    // `linger` is a valid, correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        log::debug!("SO_LINGER: {}; closing with FIN instead of RST", io::Error::last_os_error());
    }
    drop(s);
}

/// A non-blocking pipe used to move bytes socket → pipe → socket inside the kernel. Always
/// empty when not in a splice loop (the loop moves out everything it moved in).
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    /// A new pipe, asked to hold `want` bytes; `size` is what the kernel granted.
    fn new(want: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let fd = write.as_raw_fd();
        // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ on a pipe fd we own. Growing fails (EPERM) past the
        // uid's soft page budget without CAP_SYS_RESOURCE; the pipe then keeps what it has.
        let size = unsafe {
            if want > MIN_PIPE {
                libc::fcntl(fd, libc::F_SETPIPE_SZ, want as libc::c_int);
            }
            libc::fcntl(fd, libc::F_GETPIPE_SZ)
        };
        let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        Ok(Pipe { read, write, size })
    }
}

/// A worker's splice pipes. A bulk flow takes one while bytes move and gives it back once it
/// goes quiet, so a connection holds no pipe (2 fds, budget pages) between bursts; pipes that
/// come out too small under the uid's budget are closed and the flow copies instead.
#[derive(Default)]
pub struct PipePool {
    free: RefCell<Vec<Pipe>>,
    /// Pipes in use or idle in `free`, for `MAX_PIPES`.
    held: Cell<usize>,
    /// Large pipes held (`LARGE_PIPES`).
    large: Cell<usize>,
    /// Until when a new pipe is not tried after the kernel gave one too small.
    starved_until: Cell<Option<Instant>>,
    /// When a flow last took a pipe (coarse clock), for `trim`.
    last_taken: Cell<Option<Instant>>,
}

impl PipePool {
    /// An empty pipe for a bulk flow, or `None` when this worker holds its share or the uid's
    /// budget is spent (the flow copies meanwhile). `now` is the worker's coarse clock.
    pub fn take(&self, now: Instant) -> Option<Lease<'_>> {
        self.last_taken.set(Some(now));
        let pooled = self.free.borrow_mut().pop();
        if let Some(pipe) = pooled {
            return Some(Lease { pool: self, pipe: Some(pipe) });
        }
        if self.held.get() >= MAX_PIPES || self.starved_until.get().is_some_and(|t| now < t) {
            return None;
        }
        let want = if self.large.get() < LARGE_PIPES { PIPE_SIZE } else { MIN_PIPE };
        match Pipe::new(want) {
            Ok(pipe) if pipe.size >= MIN_PIPE => {
                self.held.set(self.held.get() + 1);
                if pipe.size >= PIPE_SIZE {
                    self.large.set(self.large.get() + 1);
                }
                Some(Lease { pool: self, pipe: Some(pipe) })
            }
            // Too small to pay, or out of fds: copy, and do not retry for a second.
            r => {
                if let Err(e) = r {
                    log::debug!("no splice pipe, copying instead: {e}");
                }
                self.starved_until.set(Some(now + Duration::from_secs(1)));
                None
            }
        }
    }

    /// Close the idle pipes once no flow has taken one for `IDLE_PIPES_KEPT_FOR` (called by
    /// the worker tick).
    pub fn trim(&self, now: Instant) {
        let quiet = self.last_taken.get().is_none_or(|t| now.duration_since(t) >= IDLE_PIPES_KEPT_FOR);
        if quiet && !self.free.borrow().is_empty() {
            let idle = std::mem::take(&mut *self.free.borrow_mut());
            idle.into_iter().for_each(|p| self.close(p));
        }
    }

    fn put(&self, pipe: Pipe) {
        let mut free = self.free.borrow_mut();
        if free.len() < KEEP_PIPES {
            free.push(pipe);
        } else {
            drop(free);
            self.close(pipe);
        }
    }

    fn close(&self, pipe: Pipe) {
        self.held.set(self.held.get().saturating_sub(1));
        if pipe.size >= PIPE_SIZE {
            self.large.set(self.large.get().saturating_sub(1));
        }
    }
}

/// A pipe taken from a worker's pool. `release` gives it back empty; dropped otherwise (the
/// connection ended mid-splice, or a splice failed), it may hold bytes and is closed.
pub struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
}

impl Lease<'_> {
    /// Give the (empty) pipe back to the pool.
    pub fn release(mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.put(pipe);
        }
    }

    fn pipe(&self) -> &Pipe {
        // Only `release` and `drop` take it, and both consume the lease.
        self.pipe.as_ref().expect("lease holds its pipe until released")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.close(pipe);
        }
    }
}

/// Make both sockets of a direction non-blocking, so a splice can never block the worker
/// (sockets accepted by the io_uring driver are blocking, which io_uring itself does not mind;
/// O_NONBLOCK on the shared file description does not change how io_uring completes the other
/// direction's operations).
pub fn nonblocking(from: &OwnedReadHalf<TcpStream>, to: &OwnedWriteHalf<TcpStream>) -> io::Result<()> {
    set_nonblocking(stream_of_read(from).as_raw_fd(), true)?;
    set_nonblocking(stream_of_write(to).as_raw_fd(), true)
}

/// O_NONBLOCK on or off with one ioctl(FIONBIO), where fcntl takes two (F_GETFL, F_SETFL).
fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    let value = libc::c_int::from(on);
    // SAFETY: ioctl on a live fd owned by the caller, with a pointer to a c_int that
    // outlives the call, as FIONBIO takes.
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &value) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Move what the read half's socket holds into the (empty) pipe, up to its size. `Ok(0)` is
/// EOF; `WouldBlock` means nothing to read now.
pub fn splice_in(from: &OwnedReadHalf<TcpStream>, lease: &Lease<'_>) -> io::Result<usize> {
    let pipe = lease.pipe();
    splice(stream_of_read(from).as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
}

/// Move up to `len` bytes from the pipe into the write half's socket. `WouldBlock` means
/// wait for `writable`.
pub fn splice_out(lease: &Lease<'_>, to: &OwnedWriteHalf<TcpStream>, len: usize) -> io::Result<usize> {
    splice(lease.pipe().read.as_raw_fd(), stream_of_write(to).as_raw_fd(), len)
}

/// Read up to `buf`'s spare capacity out of the pipe (to copy what a failed splice left in it).
pub fn drain_pipe(lease: &Lease<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let pipe = lease.pipe();
    let spare = buf.spare_capacity_mut();
    // SAFETY: the pipe fd is live; `spare` is writable memory of `spare.len()` bytes owned by
    // `buf`, and only the `n` bytes read(2) reports written are marked initialised below.
    let n = unsafe { libc::read(pipe.read.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: read(2) initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both fds are live for the call; null offsets are valid for pipes and sockets.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Non-blocking `send` on a whole stream, for rustls' `write_tls` and for relaying decrypted
/// bytes straight from rustls' buffer: the TLS side of a connection runs on readiness plus
/// non-blocking calls, so bytes are not copied through an extra owned buffer.
pub struct NonBlocking<'a>(pub &'a TcpStream);

impl io::Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes and the fd is live for the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// All of `bufs` in one sendmsg(2): rustls hands its queued records over as slices, one
    /// per record, and the default (the first slice only) made each record of a handshake
    /// flight its own syscall and, with TCP_NODELAY, its own segment.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: a zeroed msghdr is a valid empty one; only the iovec fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is ABI-compatible with `iovec` on Unix (std's documented guarantee); the
        // kernel only reads through the pointer, the cast to *mut is what the C type asks.
        msg.msg_iov = bufs.as_ptr().cast_mut().cast();
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: `msg` points at `msg_iovlen` valid iovecs borrowed for the call; the fd is live.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, flags) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receive into the spare capacity of `buf` without blocking; `Ok(0)` is EOF.
pub fn recv_spare(s: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    recv_spare_max(s, buf, usize::MAX)
}

/// As `recv_spare`, at most `max` bytes: a TLS record's plaintext, read behind room for its
/// header in a buffer that holds several records (`tls::stream::TlsStream::seal_and_send`).
pub fn recv_spare_max(s: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: the spare capacity is valid for writes of its length (>= `len`); the kernel
    // writes at most `len` bytes and we extend the length by exactly the count it reports.
    let n = unsafe { libc::recv(s.as_raw_fd(), spare.as_mut_ptr().cast(), len, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity (n <= len).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// As `recv_spare`, with one recvmsg(2) into up to `lens.len()` (at most 8) pieces laid out
/// back to back in `buf`'s spare capacity, each `head` free bytes, at most `max` received
/// bytes and `tail` free bytes: TLS records' plaintexts read where they are sealed, with room
/// for the record's header and tag (`tls::stream::TlsStream::seal_and_send`). The rooms are zeroed; `buf` then ends after the
/// last piece that received bytes (with its tail room), `lens` holds each piece's count, and
/// the return is how many pieces got bytes (`Ok(0)` is EOF). A piece is filled before the
/// next gets any.
pub fn recv_spare_spaced(
    s: &TcpStream,
    buf: &mut Vec<u8>,
    (head, max, tail): (usize, usize, usize),
    lens: &mut [usize],
) -> io::Result<usize> {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 8];
    let spare = buf.spare_capacity_mut();
    let mut count = 0;
    let mut at = 0;
    for v in iov.iter_mut().take(lens.len()) {
        let Some(room) = spare.len().checked_sub(at + head + tail).filter(|r| *r > 0) else { break };
        let Some(piece) = spare.get_mut(at + head..) else { break };
        *v = libc::iovec { iov_base: piece.as_mut_ptr().cast(), iov_len: room.min(max) };
        at += head + room.min(max) + tail;
        count += 1;
    }
    // SAFETY: each iovec points at `iov_len` bytes of `buf`'s spare capacity (checked against
    // its length above), disjoint from the others, borrowed for the call.
    let mut left = unsafe { recvmsg_into(s, &mut iov[..count]) }?;
    let mut filled = 0;
    let mut at = 0;
    for (v, len) in iov.iter().take(count).zip(lens.iter_mut()) {
        if left == 0 {
            break;
        }
        let k = left.min(v.iov_len);
        left -= k;
        *len = k;
        // The rooms around what the kernel wrote: in range, as the iovecs were.
        for b in spare.iter_mut().skip(at).take(head) {
            b.write(0);
        }
        for b in spare.iter_mut().skip(at + head + k).take(tail) {
            b.write(0);
        }
        at += head + k + tail;
        filled += 1;
    }
    // SAFETY: `buf`'s first `at` spare bytes are initialised: each filled piece's rooms were
    // written above and its `k` bytes by the kernel (pieces before the last were filled whole,
    // so they are contiguous); `at` is within the spare capacity as the iovecs were.
    unsafe { buf.set_len(buf.len() + at) };
    Ok(filled)
}

/// One non-blocking recvmsg(2) on `s` into `iov`; returns the bytes received (filled in
/// order).
///
/// # Safety
/// Each iovec must point at `iov_len` writable bytes, disjoint from the others, that outlive
/// the call.
unsafe fn recvmsg_into(s: &TcpStream, iov: &mut [libc::iovec]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is a valid empty one; only the iovec fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: the caller's iovecs point at writable memory of their lengths, borrowed for the
    // call; the fd is live.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// As `recv_spare`, into several buffers with one recvmsg(2): the first's spare capacity (but
/// its last `tail` bytes, room the caller keeps behind the bytes, such as a TLS record's tag)
/// is filled first, then the next's; returns the total received. At most 8 buffers are read
/// into.
pub fn recv_spare_vectored(s: &TcpStream, bufs: &mut [Vec<u8>], tail: usize) -> io::Result<usize> {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 8];
    let mut count = 0;
    for (v, buf) in iov.iter_mut().zip(bufs.iter_mut()) {
        let spare = buf.spare_capacity_mut();
        let len = spare.len().saturating_sub(tail.min(spare.len()));
        *v = libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: len };
        count += 1;
    }
    // SAFETY: each iovec points at writable spare capacity of its own buffer, `iov_len` bytes
    // long, borrowed for the call.
    let total = unsafe { recvmsg_into(s, &mut iov[..count]) }?;
    let mut left = total;
    for (v, buf) in iov.iter().zip(bufs.iter_mut()).take(count) {
        let k = left.min(v.iov_len);
        // SAFETY: the kernel filled the iovecs in order, so this buffer's first `k` spare
        // bytes are initialised (k <= iov_len <= its spare capacity).
        unsafe { buf.set_len(buf.len() + k) };
        left -= k;
    }
    Ok(total)
}

/// Look at the first bytes waiting (at most `limit`, and `buf`'s capacity) without consuming
/// them, into `buf`, replacing what it held: the listener inspectors' and permissive sniff's
/// peek. The buffer is never zeroed first (a pool buffer is 16 KiB).
pub fn peek(s: &TcpStream, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    buf.clear();
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(limit);
    let spare = &mut spare[..len]; // len <= spare.len(): cannot panic
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `buf`, the fd is live
    // for the call, and only the `n` bytes recv(2) reports written are marked initialised.
    let n = unsafe { libc::recv(s.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), flags) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(n) };
    Ok(n)
}

/// Readiness only once at least `bytes` are waiting (SO_RCVLOWAT; EOF and errors still wake):
/// an inspector that has seen part of a ClientHello sleeps until more arrives instead of
/// polling. Both drivers wait through the socket's poll, which honours it.
pub fn set_receive_low_water(s: &TcpStream, bytes: usize) -> io::Result<()> {
    set_int_option(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Unsent bytes the kernel queues for `s` before a send says EAGAIN (TCP_NOTSENT_LOWAT): bytes
/// in flight still go as far as the peer's window and the congestion window allow (so a long
/// path keeps its throughput), but what waits behind them is bounded.
pub fn set_notsent_low_water(s: &TcpStream, bytes: usize) -> io::Result<()> {
    set_int_option(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, bytes)
}

/// TCP_QUICKACK off: the socket's ACKs wait (up to the kernel's delayed-ACK timeout) to ride
/// on the next segment it sends, instead of leaving on their own. Linux turns this on by
/// itself once a socket answers within that timeout, so it only changes a connection's
/// first exchanges: where ringside answers at once (a ClientHello with the server's flight,
/// the server's flight with our Finished), the answer carries the ACK, one segment fewer.
/// A listening socket passes it on to the sockets it accepts; `false` gives back the
/// kernel's default (quick ACKs at a connection's start).
pub fn delay_acks(s: &impl AsRawFd, delay: bool) -> io::Result<()> {
    set_int_option(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_QUICKACK, usize::from(!delay))
}

/// setsockopt(2) of an int option (`value`, capped at `c_int::MAX`) on the live socket `fd`.
fn set_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a live fd with a pointer to a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Write the last bytes before a FIN without waiting; returns how many the socket took (the
/// rest, if any, is written the usual way; an error is left to that write to meet again).
/// MSG_MORE holds them back for the FIN that follows (shutdown or close), so both leave in
/// one segment.
pub fn send_before_fin(half: &OwnedWriteHalf<TcpStream>, data: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_MORE | libc::MSG_NOSIGNAL;
    // SAFETY: the fd is the half's live socket; `data` is readable memory of its length.
    let n = unsafe { libc::send(stream_of_write(half).as_raw_fd(), data.as_ptr().cast(), data.len(), flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Non-blocking `send` with MSG_MORE on a whole stream: the bytes wait in the socket for the
/// next send or the FIN, to leave with it in one segment (the kernel sends them on their own
/// after its cork ceiling, 200 ms). A TLS side's close_notify, an inbound handshake's ticket
/// and preamble.
pub fn send_more(s: &TcpStream, data: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_MORE | libc::MSG_NOSIGNAL;
    // SAFETY: the fd is the stream's live socket; `data` is readable memory of its length.
    let n = unsafe { libc::send(s.as_raw_fd(), data.as_ptr().cast(), data.len(), flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Half-close: send FIN; `ENOTCONN` (the peer already closed entirely) counts as done.
pub fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    // SAFETY: shutdown on a live fd; no pointers involved.
    if unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotConnected {
            return Err(e);
        }
    }
    Ok(())
}

/// A borrowed fd of a monoio stream, for socket options monoio does not wrap
/// (SO_ORIGINAL_DST, SO_ERROR) through `socket2::SockRef`.
pub fn borrow_fd(s: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the fd is owned by `s` and stays open while `s` is borrowed, which the
    // returned `BorrowedFd` cannot outlive.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(s.as_raw_fd()) }
}

/// Connect to `dst`, from `source` if given (its port chosen at connect time), waiting at
/// most `timeout`: every upstream connection of the proxy is made here. monoio's connect
/// makes its own socket and sets no option on it, so the socket is made here and handed to
/// the runtime; it stays O_NONBLOCK for the epoll driver, which needs it, and is made
/// blocking again for io_uring, as monoio makes its own sockets. An upstream that accepts
/// and resets before the connect is seen complete gives ECONNRESET here: a connect failure
/// (UF), as Envoy counts one whose socket error it reads on the connect event.
pub async fn connect(dst: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, SockRef, Socket, Type};
    let s = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec().nonblocking(), None)?;
    scan_every_local_port(&s);
    if let Some(src) = source {
        // The port is picked at connect(), per destination: binding first must not spend
        // one of the source address's ports per connection (as Envoy's upstream bind does).
        bind_address_no_port(&s)?;
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    let connected = match s.connect(&dst.into()) {
        Ok(()) => true,
        // Over loopback (a sidecar's inbound connections, a gateway's local backends) the
        // handshake has usually finished by now: then skip a turn of the event loop.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => s.peer_addr().is_ok(),
        Err(e) => return Err(e),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(s))?;
    if !connected {
        match monoio::time::timeout(timeout, stream.writable(false)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect {dst}: timed out")));
            }
        }
        if let Some(e) = SockRef::from(&borrow_fd(&stream)).take_error()? {
            return Err(e);
        }
    }
    if !monoio::utils::is_legacy() {
        set_nonblocking(stream.as_raw_fd(), false)?;
    }
    Ok(stream)
}

/// IP_LOCAL_PORT_RANGE with no bound narrowed (the namespace's range stays in force): since
/// Linux 6.8 connect() then looks for a free local port through the whole range in order,
/// instead of through its even half first. A proxy connecting to one backend at a high rate
/// leaves a TIME_WAIT on each port it closed first; over loopback the kernel reuses one only
/// after `tcp_tw_reuse_delay` (1 s), and at ~14,000 connections/s the even half's ports all
/// come round within that second, so connect() walked past many of them: 11 % of the
/// proxy's CPU per connection (`__inet_hash_connect`, README "Decisions"). Best effort: an
/// older kernel refuses the option (before 6.3) or accepts it and scans as before.
fn scan_every_local_port(s: &socket2::Socket) {
    /// Low bound 1 and high bound 0 (none): a bound outside the namespace's range is
    /// ignored, so the range stays the namespace's, and the option counts as set.
    const NAMESPACE_RANGE: usize = 1;
    let _ = set_int_option(s.as_raw_fd(), libc::IPPROTO_IP, IP_LOCAL_PORT_RANGE, NAMESPACE_RANGE);
}

/// linux/in.h (not in every libc crate release).
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

/// IP_BIND_ADDRESS_NO_PORT: a socket bound to an address with port 0 gets its port at
/// connect(), per destination, instead of holding one of the address's ports for itself.
fn bind_address_no_port(s: &socket2::Socket) -> io::Result<()> {
    set_int_option(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

#[cfg(test)]
mod tests {
    use super::{MONOIO_CHECKED, NonBlocking};
    use std::io::{IoSlice, Read, Write};

    #[test]
    fn set_nonblocking_turns_o_nonblock_on_and_off() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        // SAFETY: F_GETFL on a live fd (the listener outlives every call).
        let flags = || unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK;
        assert_eq!(flags(), 0);
        super::set_nonblocking(fd, true).unwrap();
        assert_eq!(flags(), libc::O_NONBLOCK);
        super::set_nonblocking(fd, false).unwrap();
        assert_eq!(flags(), 0);
    }

    #[test]
    fn a_vectored_write_sends_every_slice_in_one_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
        rt.block_on(async move {
            let s = monoio::net::TcpStream::connect(addr).await.unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            let bufs =
                [IoSlice::new(b"one "), IoSlice::new(b""), IoSlice::new(b"two "), IoSlice::new(b"three")];
            assert_eq!(NonBlocking(&s).write_vectored(&bufs).unwrap(), 13);
            let mut got = [0u8; 13];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"one two three");
        });
    }

    #[test]
    fn a_vectored_receive_fills_each_buffer_but_its_tail_room_in_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
        rt.block_on(async move {
            let s = monoio::net::TcpStream::connect(addr).await.unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            let sent: Vec<u8> = (0..40u32).map(|i| i as u8).collect();
            peer.write_all(&sent).unwrap();
            // Each buffer: 2 bytes already there, capacity 16, 4 kept free at the end.
            let mut bufs: [Vec<u8>; 3] = std::array::from_fn(|_| {
                let mut b = Vec::with_capacity(16);
                b.extend_from_slice(b"hh");
                b
            });
            let mut n = 0;
            while n < 30 {
                s.readable(false).await.unwrap();
                n += super::recv_spare_vectored(&s, &mut bufs, 4).unwrap();
            }
            assert_eq!(n, 30, "3 buffers of 10 free bytes each");
            for (i, b) in bufs.iter().enumerate() {
                assert_eq!(&b[..2], b"hh");
                assert_eq!(&b[2..], &sent[i * 10..i * 10 + 10], "buffer {i}");
                assert_eq!(b.capacity() - b.len(), 4, "the tail room left unwritten");
            }
        });
    }

    #[test]
    fn a_spaced_receive_fills_each_piece_between_its_zeroed_rooms_in_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
        rt.block_on(async move {
            let s = monoio::net::TcpStream::connect(addr).await.unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            let sent: Vec<u8> = (1..=25u32).map(|i| i as u8).collect();
            peer.write_all(&sent).unwrap();
            // Pieces of 2 free bytes, at most 10 received, 3 free bytes; the third gets 5.
            let mut buf = Vec::with_capacity(64);
            buf.push(0xee);
            let mut lens = [0usize; 4];
            s.readable(false).await.unwrap();
            // 25 bytes written at once are one loopback segment: one read takes them.
            let pieces = super::recv_spare_spaced(&s, &mut buf, (2, 10, 3), &mut lens).unwrap();
            assert_eq!(pieces, 3);
            assert_eq!(&lens[..3], &[10, 10, 5]);
            let mut want = vec![0xee];
            for chunk in sent.chunks(10) {
                want.extend_from_slice(&[0, 0]);
                want.extend_from_slice(chunk);
                want.extend_from_slice(&[0, 0, 0]);
            }
            assert_eq!(buf, want, "header rooms, bytes, tail rooms, back to back");
        });
    }

    #[test]
    fn the_monoio_in_cargo_lock_is_the_version_the_unsafe_borrows_were_checked_against() {
        let lock = include_str!("../Cargo.lock");
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("\nname = \"monoio\"\n"))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
            .and_then(|v| v.strip_suffix('"'));
        assert_eq!(
            version,
            Some(MONOIO_CHECKED),
            "monoio changed: re-check stream_of_read/stream_of_write against its split halves"
        );
    }
}
