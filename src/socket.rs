//! Socket operations monoio does not offer: readiness waits on split halves, reset on close
//! (SO_LINGER 0), and a zero-copy splice(2) pump through a pipe. All of the crate's `unsafe`
//! lives here, each block with the reason it holds.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use monoio::io::{OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

/// Kernel pipe capacity for splicing: one splice moves up to this many bytes.
pub const PIPE_SIZE: usize = 1024 * 1024;

fn stream_of_read(half: &OwnedReadHalf<TcpStream>) -> &TcpStream {
    // SAFETY: monoio (0.2.4, pinned in Cargo.lock) shares a split stream through an
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

/// A non-blocking pipe used to move bytes socket → pipe → socket inside the kernel.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new pipe sized `PIPE_SIZE` (best effort: the kernel may cap it).
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure only leaves the default size.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { read, write })
    }

    /// A pipe for splicing `from` → `to`, with both sockets made non-blocking so a splice
    /// can never block the worker (sockets accepted by the io_uring driver are blocking,
    /// which io_uring itself does not mind; O_NONBLOCK on the shared file description does
    /// not change how io_uring completes the other direction's operations).
    pub fn for_halves(from: &OwnedReadHalf<TcpStream>, to: &OwnedWriteHalf<TcpStream>) -> io::Result<Pipe> {
        let pipe = Pipe::new()?;
        set_nonblocking(stream_of_read(from).as_raw_fd())?;
        set_nonblocking(stream_of_write(to).as_raw_fd())?;
        Ok(pipe)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a live fd owned by the caller; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Move up to `len` bytes from the read half's socket into the pipe. `Ok(0)` is EOF;
/// `WouldBlock` means wait for `readable`.
pub fn splice_in(from: &OwnedReadHalf<TcpStream>, pipe: &Pipe, len: usize) -> io::Result<usize> {
    splice(stream_of_read(from).as_raw_fd(), pipe.write.as_raw_fd(), len)
}

/// Move up to `len` bytes from the pipe into the write half's socket. `WouldBlock` means
/// wait for `writable`.
pub fn splice_out(pipe: &Pipe, to: &OwnedWriteHalf<TcpStream>, len: usize) -> io::Result<usize> {
    splice(pipe.read.as_raw_fd(), stream_of_write(to).as_raw_fd(), len)
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

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receive into the spare capacity of `buf` without blocking; `Ok(0)` is EOF.
pub fn recv_spare(s: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: the spare capacity is valid for writes of its length; the kernel writes at most
    // that many bytes and we extend the length by exactly the count it reports.
    let n = unsafe { libc::recv(s.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity (n <= spare.len()).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Look at up to `buf.len()` first bytes without consuming them (permissive TLS sniffing).
pub fn peek(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes and the fd is live for the call.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
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

/// IP_BIND_ADDRESS_NO_PORT: a socket bound to an address with port 0 gets its port at
/// connect(), per destination, instead of holding one of the address's ports for itself.
pub fn bind_address_no_port(s: &socket2::Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `s` is a live socket for the call, and `on` is a correctly sized int option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
