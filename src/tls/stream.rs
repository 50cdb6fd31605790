//! A TLS connection over a monoio `TcpStream`, written over rustls' `Connection` API rather
//! than `monoio-rustls` (README Decisions): it runs on readiness plus non-blocking
//! `recv`/`send`, so plaintext goes from rustls' buffer straight into the other socket, and
//! ciphertext reaches rustls through a pool buffer taken only for the read: no buffer is held
//! while idle.
//!
//! Both directions of a relay share one `TlsStream` (`&self` methods): its rustls state sits
//! in a `RefCell` borrowed only between awaits, never across one.

use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, Write};
use std::net::IpAddr;
use std::sync::Arc;

use monoio::net::TcpStream;
use rustls::pki_types::ServerName;

use super::{ALPN_PEER_EXCHANGE, Configured};
use crate::conn::BufferPool;
use crate::socket::{self, NonBlocking};

/// What the read side has after `try_fill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Decrypted bytes wait in rustls' buffer.
    Data,
    /// The peer closed its direction (close_notify, or a TCP FIN without one).
    Eof,
    /// Nothing decrypted yet: wait for `readable`.
    WouldBlock,
}

/// Let rustls shrink its incoming record buffer, grown to a whole record (up to ~20 KiB)
/// by the last read, back to its 4 KiB minimum: rustls resizes it only at the start of a read,
/// so a read from a source that has nothing (`WouldBlock`) does just that. Called when a
/// connection goes back to waiting for the socket, so an idle connection after bulk holds
/// 4 KiB there, not a record's worth (README Decisions: idle memory).
pub fn trim(conn: &mut rustls::Connection) {
    struct Nothing;
    impl io::Read for Nothing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
    // Errors (plaintext waiting, a full buffer) leave the connection as it was.
    let _ = conn.read_tls(&mut Nothing);
}

/// One TLS connection, client or server side.
pub struct TlsStream {
    tcp: TcpStream,
    // Boxed: rustls' state is ~1.3 KiB, and the stream moves through the setup futures.
    conn: RefCell<Box<rustls::Connection>>,
    /// Ciphertext received but not yet taken by rustls (a pool buffer and where its rest
    /// starts): only while decrypted bytes wait for the other socket.
    pending: RefCell<Option<(Vec<u8>, usize)>>,
    /// The last recv was short: the socket held nothing more then, so the next `try_fill`
    /// that finds no plaintext goes back to waiting for readiness without a recv that would
    /// only say EAGAIN (2-3 per connection and side: after the handshake, after each answer).
    drained: Cell<bool>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// A client connection with `config`'s client config; the SNI is the cluster's service
    /// host, else the endpoint IP (no SNI sent).
    pub fn client(tcp: TcpStream, config: &Configured, ip: IpAddr) -> io::Result<TlsStream> {
        let Some(client) = config.client.clone() else {
            return Err(io::Error::other("no client TLS config"));
        };
        let name = config.server_name.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        let conn = rustls::ClientConnection::new(client, name).map_err(tls_err)?;
        Ok(TlsStream::new(tcp, conn.into()))
    }

    fn new(tcp: TcpStream, conn: rustls::Connection) -> TlsStream {
        TlsStream {
            tcp,
            conn: RefCell::new(Box::new(conn)),
            pending: RefCell::new(None),
            drained: Cell::new(false),
        }
    }

    /// A server connection with `config`.
    pub fn server(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_err)?;
        Ok(TlsStream::new(tcp, conn.into()))
    }

    /// Run the handshake to its end (the caller bounds it with a timeout).
    pub async fn handshake(&self, pool: &BufferPool) -> io::Result<()> {
        self.handshake_unsent(pool).await?;
        self.flush().await
    }

    /// Run the handshake to its end but leave its last flight (a client's Finished, a server's
    /// session tickets) queued for the caller's first write or `flush`: sent with the peer
    /// exchange's preamble, it costs one send and one segment fewer per connection. The
    /// caller must flush before it waits on the peer.
    pub async fn handshake_unsent(&self, pool: &BufferPool) -> io::Result<()> {
        loop {
            if !self.conn.borrow().is_handshaking() {
                return Ok(());
            }
            self.flush().await?;
            self.tcp.readable(false).await?;
            match self.read_tls(pool) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // Send the alert rustls queued (bad certificate, unknown CA), best effort.
                    let _ = self.flush_now();
                    return Err(e);
                }
            }
        }
    }

    /// True when ALPN resolved to `istio-peer-exchange` (SPEC §7: the exchange runs only then).
    pub fn alpn_is_peer_exchange(&self) -> bool {
        self.conn.borrow().alpn_protocol() == Some(ALPN_PEER_EXCHANGE)
    }

    /// True when ALPN resolved to `protocol`.
    pub fn alpn_is(&self, protocol: &[u8]) -> bool {
        self.conn.borrow().alpn_protocol() == Some(protocol)
    }

    /// True when the handshake negotiated TLS 1.3.
    pub fn is_tls13(&self) -> bool {
        self.conn.borrow().protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
    }

    /// The peer certificate's SPIFFE id (its principal), if it has one.
    pub fn peer_principal(&self) -> Option<String> {
        self.conn.borrow().peer_certificates().and_then(|c| c.first()).and_then(super::spiffe_id)
    }

    /// Whether the peer presented a certificate (a server's client with one: mutual TLS).
    pub fn peer_presented_certificate(&self) -> bool {
        self.conn.borrow().peer_certificates().is_some_and(|c| !c.is_empty())
    }

    /// The peer certificate's names for RBAC principals, in Envoy's order (`tls::peer_names`);
    /// empty without a certificate.
    pub fn peer_names(&self) -> Vec<String> {
        self.conn
            .borrow()
            .peer_certificates()
            .and_then(|c| c.first())
            .map(super::peer_names)
            .unwrap_or_default()
    }

    /// Calls `f` with the server name (SNI) the client asked for, on a server connection.
    pub fn with_server_name<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> R {
        match &**self.conn.borrow() {
            rustls::Connection::Server(s) => f(s.server_name()),
            rustls::Connection::Client(_) => f(None),
        }
    }

    /// After the handshake: whether the session was resumed, and the negotiated suite's
    /// index in `ringside_tls_handshakes_total` (`crate::tls::suite_index`).
    pub fn handshake_info(&self) -> (bool, usize) {
        let c = self.conn.borrow();
        let resumed = c.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let suite = c.negotiated_cipher_suite().map_or(usize::MAX, |s| super::suite_index(s.suite()));
        (resumed, suite)
    }

    /// The socket underneath (its addresses, its original destination when captured).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The socket, to reset it (a reset stays a reset).
    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// Wait until the socket has bytes (or EOF/error).
    pub async fn readable(&self) -> io::Result<()> {
        self.tcp.readable(false).await
    }

    /// Read ciphertext without blocking and decrypt it; `Ok(0)` is EOF.
    ///
    /// One `recv` of up to a pool buffer (16 KiB) and then rustls takes it from memory: handed
    /// the socket, rustls reads at most 4 KiB per call, four syscalls per record instead of
    /// one copy. rustls refuses more ciphertext while 16 KiB of plaintext wait, so feeding
    /// stops once a record is decrypted and the rest waits in `pending` until the plaintext
    /// is delivered; otherwise the buffer goes back at once (an idle connection holds none).
    fn read_tls(&self, pool: &BufferPool) -> io::Result<usize> {
        let (mut buf, at) = match self.pending.borrow_mut().take() {
            Some(p) => p,
            None => {
                let mut buf = pool.take();
                match socket::recv_spare(&self.tcp, &mut buf) {
                    // EOF (0) is not "drained": it must reach rustls on every call.
                    Ok(n) => self.drained.set(n > 0 && buf.len() < buf.capacity()),
                    Err(e) => {
                        pool.put(buf);
                        return Err(e);
                    }
                }
                (buf, 0)
            }
        };
        let n = buf.len() - at;
        match self.feed(&buf, at) {
            Ok(Some(at)) => {
                *self.pending.borrow_mut() = Some((buf, at));
                Ok(n)
            }
            Ok(None) => {
                buf.clear();
                pool.put(buf);
                Ok(n)
            }
            Err(e) => {
                pool.put(buf);
                Err(e)
            }
        }
    }

    /// Hand `buf[at..]` to rustls (empty: EOF) until it is all taken (`None`) or decrypted
    /// bytes wait to be delivered (`Some(where the rest starts)`).
    fn feed(&self, buf: &[u8], mut at: usize) -> io::Result<Option<usize>> {
        let mut c = self.conn.borrow_mut();
        loop {
            let mut rest = buf.get(at..).unwrap_or_default();
            let taken = c.read_tls(&mut rest)?;
            c.process_new_packets().map_err(tls_err)?;
            at += taken;
            if at >= buf.len() || taken == 0 {
                return Ok(None);
            }
            if c.reader().fill_buf().is_ok_and(|b| !b.is_empty()) {
                return Ok(Some(at));
            }
        }
    }

    /// Write what rustls has queued as far as the socket takes it now; true when all went.
    fn flush_now(&self) -> io::Result<bool> {
        let mut c = self.conn.borrow_mut();
        while c.wants_write() {
            match c.write_tls(&mut NonBlocking(&self.tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Write everything rustls has queued.
    pub async fn flush(&self) -> io::Result<()> {
        while !self.flush_now()? {
            self.tcp.writable(false).await?;
        }
        Ok(())
    }

    /// Make decrypted bytes available without blocking.
    pub fn try_fill(&self, pool: &BufferPool) -> io::Result<Fill> {
        loop {
            match self.conn.borrow_mut().reader().fill_buf() {
                Ok([]) => return Ok(Fill::Eof),
                Ok(_) => return Ok(Fill::Data),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A TCP FIN without close_notify: Istio's peers end a direction so too.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Fill::Eof),
                Err(e) => return Err(e),
            }
            // Once only: a caller told `WouldBlock` waits for readiness (or comes back having
            // waited for something else), and the next call reads.
            if self.drained.replace(false) && self.pending.borrow().is_none() {
                trim(&mut self.conn.borrow_mut());
                return Ok(Fill::WouldBlock);
            }
            match self.read_tls(pool) {
                Ok(_) => {
                    // Post-handshake messages (session tickets, key updates) may want an
                    // answer; the write side flushes whatever the socket does not take now.
                    let _ = self.flush_now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    trim(&mut self.conn.borrow_mut());
                    return Ok(Fill::WouldBlock);
                }
                Err(e) => {
                    let _ = self.flush_now();
                    return Err(e);
                }
            }
        }
    }

    /// Wait for decrypted bytes or EOF.
    pub async fn fill(&self, pool: &BufferPool) -> io::Result<Fill> {
        loop {
            match self.try_fill(pool)? {
                Fill::WouldBlock => self.readable().await?,
                f => return Ok(f),
            }
        }
    }

    /// Copy decrypted bytes into `out`'s spare capacity; returns how many.
    pub fn take_into(&self, out: &mut Vec<u8>) -> usize {
        let mut c = self.conn.borrow_mut();
        let mut r = c.reader();
        let Ok(chunk) = r.fill_buf() else { return 0 };
        let n = chunk.len().min(out.capacity() - out.len());
        out.extend_from_slice(&chunk[..n]);
        r.consume(n);
        n
    }

    /// Calls `f` with the decrypted bytes waiting in rustls' buffer (after `fill` said
    /// `Data`), which are then consumed: a reader that parses them (HBONE's HTTP/2 core)
    /// takes them without a copy into a buffer of its own first.
    pub fn with_plaintext<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let mut c = self.conn.borrow_mut();
        let mut r = c.reader();
        let chunk = r.fill_buf().unwrap_or_default();
        let n = chunk.len();
        let out = f(chunk);
        r.consume(n);
        out
    }

    /// Send decrypted bytes straight to `to` without blocking (`WouldBlock`: wait for
    /// `to` to be writable); returns how many left rustls' buffer.
    pub fn send_to(&self, to: &TcpStream) -> io::Result<usize> {
        let mut c = self.conn.borrow_mut();
        let mut r = c.reader();
        let chunk = r.fill_buf()?;
        let n = NonBlocking(to).write(chunk)?;
        r.consume(n);
        Ok(n)
    }

    /// Encrypt and send all of `data` (records of up to 16 KiB, as rustls cuts them).
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.queue(data).await?;
        self.flush().await
    }

    /// Encrypt all of `data` into rustls' queue without sending it, but for what does not fit
    /// under rustls' limit (64 KiB): the records leave with the next `flush`, several in one
    /// vectored send.
    pub async fn queue(&self, mut data: &[u8]) -> io::Result<()> {
        loop {
            let n = self.conn.borrow_mut().writer().write(data)?;
            data = data.get(n..).unwrap_or_default();
            if data.is_empty() {
                return Ok(());
            }
            self.flush().await?;
        }
    }

    /// Half-close: close_notify, then FIN; the other direction keeps flowing.
    pub async fn shutdown(&self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.flush().await?;
        socket::shutdown_write(&self.tcp)
    }
}
