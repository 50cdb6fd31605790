//! A TLS connection over a monoio `TcpStream`: rustls runs the handshake through its
//! unbuffered API, then ringside protects the records itself (`tls::record`), as kTLS would
//! in the kernel (README Decisions, issue 31). Records are opened in place in a buffer taken
//! only while ciphertext or plaintext waits, and decrypted bytes go from there straight into
//! the other socket; the relay seals plaintext in place in the buffer it read it into
//! (`seal_and_send`). An idle connection holds no buffer and no rustls `Connection`: its keys
//! and rustls' `KernelConnection` (key updates, session tickets).
//!
//! Both directions of a relay share one `TlsStream` (`&self` methods): its state sits in
//! `RefCell`s borrowed only between awaits, never across one.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;

use monoio::net::TcpStream;
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};

use super::hello::{self, Hello};
use super::record::{self, Kernel, MAX_CIPHERTEXT, MAX_PLAINTEXT, Opened, Session};
use super::{ALPN_PEER_EXCHANGE, Configured};
use crate::conn::BufferPool;
use crate::socket::{self, NonBlocking};

/// What the read side has after `try_fill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Decrypted bytes wait in the stream's buffer.
    Data,
    /// The peer closed its direction (close_notify, or a TCP FIN without one).
    Eof,
    /// Nothing decrypted yet: wait for `readable`.
    WouldBlock,
}

/// The largest record on the wire (header and ciphertext).
const MAX_RECORD: usize = record::HEADER_LEN + MAX_CIPHERTEXT;

/// Whole records a record buffer holds: one recv or one send moves up to this many 16 KiB
/// records of a bulk stream (README Decisions, *Bulk reads and sends*).
pub const RECORDS_PER_BUFFER: usize = 8;

/// Capacity of the buffers records are read into, sealed in and queued in.
pub const RECORD_BUFFER: usize = RECORDS_PER_BUFFER * (MAX_PLAINTEXT + 13 + 17);

/// Record buffers a worker thread keeps for reuse (workers are threads: no lock): 4 MiB.
const RECORDS_KEEP: usize = 32;

thread_local! {
    static RECORDS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of `RECORD_BUFFER` capacity from this thread's pool.
pub fn take_record_buffer() -> Vec<u8> {
    RECORDS.with(|r| r.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(RECORD_BUFFER))
}

/// Give a record buffer back (buffers of another size are dropped).
pub fn put_record_buffer(mut buf: Vec<u8>) {
    if buf.capacity() == RECORD_BUFFER {
        buf.clear();
        RECORDS.with(|r| {
            let mut r = r.borrow_mut();
            if r.len() < RECORDS_KEEP {
                r.push(buf);
            }
        });
    }
}

/// rustls' handshake, per side.
enum Handshake {
    Client(UnbufferedClientConnection),
    /// With the SNI its ClientHello asked for, read as `tls_inspector` reads it (rustls'
    /// unbuffered server does not expose it), once the ClientHello is whole.
    Server(UnbufferedServerConnection, Option<Option<Box<str>>>),
}

/// What one pass of rustls over the received bytes asks for next.
enum Step {
    /// Send what was encoded (a flight that is not the handshake's last).
    Transmit,
    /// Read more from the peer.
    Receive,
    /// The handshake is done.
    Done,
}

/// One pass of rustls over `incoming`: encodes into `out`, moves application data that
/// arrived with the handshake's last records into `early`; returns how many bytes of
/// `incoming` to drop and what to do next.
fn step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    handshaking: bool,
    out: &mut Vec<u8>,
    early: &mut Vec<u8>,
    closed: &mut bool,
) -> (usize, Result<Option<Step>, rustls::Error>) {
    let UnbufferedStatus { mut discard, state } = status;
    let state = match state {
        Ok(s) => s,
        Err(e) => return (discard, Err(e)),
    };
    let next = match state {
        ConnectionState::EncodeTlsData(mut e) => {
            let at = out.len();
            out.resize(at + 4096, 0);
            let n = loop {
                match e.encode(&mut out[at..]) {
                    Ok(n) => break n,
                    Err(EncodeError::InsufficientSize(s)) => out.resize(at + s.required_size, 0),
                    Err(EncodeError::AlreadyEncoded) => break 0,
                }
            };
            out.truncate(at + n);
            None
        }
        ConnectionState::TransmitTlsData(t) => {
            t.done();
            Some(Step::Transmit)
        }
        ConnectionState::ReadTraffic(mut r) => {
            while let Some(rec) = r.next_record() {
                match rec {
                    Ok(rec) => {
                        discard += rec.discard;
                        early.extend_from_slice(rec.payload);
                    }
                    Err(e) => return (discard, Err(e)),
                }
            }
            None
        }
        // A TLS 1.3 server may send before the client's Finished: not done yet.
        ConnectionState::WriteTraffic(_) if !handshaking => Some(Step::Done),
        ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => Some(Step::Receive),
        // close_notify right behind the last handshake records and the data (a client that
        // sent and half-closed at once): rustls read it, the reader will see EOF.
        ConnectionState::PeerClosed if !handshaking => {
            *closed = true;
            None
        }
        ConnectionState::PeerClosed | ConnectionState::Closed => {
            return (discard, Err(rustls::Error::General("peer closed during the TLS handshake".into())));
        }
        _ => return (discard, Err(rustls::Error::General("unexpected TLS handshake state".into()))),
    };
    (discard, Ok(next))
}

impl Handshake {
    fn is_handshaking(&self) -> bool {
        match self {
            Handshake::Client(c) => c.is_handshaking(),
            Handshake::Server(s, _) => s.is_handshaking(),
        }
    }

    /// Process `incoming` until rustls asks for I/O.
    fn run(
        &mut self,
        incoming: &mut Vec<u8>,
        out: &mut Vec<u8>,
        early: &mut Vec<u8>,
        closed: &mut bool,
    ) -> Result<Step, rustls::Error> {
        if let Handshake::Server(_, sni @ None) = self
            && let Hello::Tls(h) = hello::parse(incoming)
        {
            // rustls keeps the name lowercased.
            *sni = Some(h.server_name.map(|n| n.to_ascii_lowercase().into_boxed_str()));
        }
        loop {
            let handshaking = self.is_handshaking();
            let (discard, next) = match self {
                Handshake::Client(c) => {
                    step(c.process_tls_records(incoming), handshaking, out, early, closed)
                }
                Handshake::Server(s, _) => {
                    step(s.process_tls_records(incoming), handshaking, out, early, closed)
                }
            };
            incoming.drain(..discard.min(incoming.len()));
            match next? {
                // The handshake's last flight stays for the caller's first write.
                Some(Step::Transmit) if !self.is_handshaking() => {}
                // `handshaking` was read before this pass, which may have finished it.
                Some(Step::Receive) if !self.is_handshaking() => return Ok(Step::Done),
                Some(s) => return Ok(s),
                None => {}
            }
        }
    }

    /// After a failure: the alert rustls queued, encoded into `out`.
    fn alert(&mut self, out: &mut Vec<u8>) {
        let (mut early, mut closed) = (Vec::new(), false);
        let handshaking = self.is_handshaking();
        let _ = match self {
            Handshake::Client(c) => {
                step(c.process_tls_records(&mut []), handshaking, out, &mut early, &mut closed)
            }
            Handshake::Server(s, _) => {
                step(s.process_tls_records(&mut []), handshaking, out, &mut early, &mut closed)
            }
        };
    }

    /// What the relay asks of a finished handshake, copied out of rustls' state.
    fn info(&self) -> Info {
        let common: &rustls::CommonState = match self {
            Handshake::Client(c) => c,
            Handshake::Server(s, _) => s,
        };
        Info {
            alpn: common.alpn_protocol().map(Box::from),
            tls13: common.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
            leaf: common.peer_certificates().and_then(|c| c.first()).cloned(),
            sni: match self {
                Handshake::Server(_, sni) => sni.clone().flatten(),
                Handshake::Client(_) => None,
            },
            resumed: common.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            suite: common.negotiated_cipher_suite().map_or(usize::MAX, |s| super::suite_index(s.suite())),
        }
    }

    fn into_session(self) -> Result<Session, record::Error> {
        match self {
            Handshake::Client(c) => {
                let (secrets, kernel) = c.dangerous_into_kernel_connection()?;
                Session::new(secrets, Kernel::Client(kernel))
            }
            Handshake::Server(s, _) => {
                let (secrets, kernel) = s.dangerous_into_kernel_connection()?;
                Session::new(secrets, Kernel::Server(kernel))
            }
        }
    }
}

/// What the relay asks after the handshake, kept from rustls' handshake state.
#[derive(Default)]
struct Info {
    alpn: Option<Box<[u8]>>,
    tls13: bool,
    /// The peer's certificate, for its principal and RBAC names.
    leaf: Option<CertificateDer<'static>>,
    sni: Option<Box<str>>,
    resumed: bool,
    suite: usize,
}

enum State {
    Handshaking(Box<Handshake>),
    Open(Box<Session>),
    /// A handshake in progress (taken out) or failed.
    Gone,
}

/// Records opened ahead of the reader, so one vectored send delivers a recv's worth.
const OPENED_AHEAD: usize = RECORDS_PER_BUFFER;

/// Ciphertext received and plaintext opened in place: `buf[plain[i]]` for `i < opened` wait
/// for the reader in order, `buf[at..]` is ciphertext not opened yet. `buf` is a record
/// buffer only while either waits, else empty (no allocation).
#[derive(Default)]
struct Rx {
    buf: Vec<u8>,
    // u32 offsets: eight ranges in the room four `Range<usize>` took, so an idle `TlsStream`
    // is no larger for opening eight records ahead.
    plain: [Range<u32>; OPENED_AHEAD],
    opened: usize,
    at: usize,
}

impl Rx {
    /// The first waiting plaintext (empty when none).
    fn first(&self) -> &[u8] {
        match self.opened {
            0 => &[],
            _ => self.buf.get(span(&self.plain[0])).unwrap_or_default(),
        }
    }

    /// Nothing waits: neither plaintext nor ciphertext.
    fn is_empty(&self) -> bool {
        self.opened == 0 && self.at >= self.buf.len()
    }

    /// Mark `n` bytes of the waiting plaintext taken, in order.
    fn consume(&mut self, mut n: usize) {
        while n > 0 && self.opened > 0 {
            let r = &mut self.plain[0];
            let k = n.min(span(r).len());
            r.start += offset(k);
            n -= k;
            if r.start >= r.end {
                self.plain.rotate_left(1);
                self.opened -= 1;
            }
        }
    }
}

/// An offset in a receive buffer as stored in `Rx::plain`: receive buffers are record
/// buffers (`RECORD_BUFFER`) or the handshake's leftovers (a few records), far below 4 GiB.
fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A stored range as indices into the receive buffer.
fn span(r: &Range<u32>) -> Range<usize> {
    r.start as usize..r.end as usize
}

/// Sealed records not yet sent: `buf[sent..]` (a record buffer while any wait).
#[derive(Default)]
struct Tx {
    buf: Vec<u8>,
    sent: usize,
}

/// One TLS connection, client or server side.
pub struct TlsStream {
    tcp: TcpStream,
    state: RefCell<State>,
    // Boxed: read a few times after the handshake, and `TlsStream` sits in the relay's `Side`.
    info: RefCell<Box<Info>>,
    rx: RefCell<Rx>,
    tx: RefCell<Tx>,
    /// A `seal_and_send` batch is on its way: records sealed after it wait in `tx`.
    batch: Cell<bool>,
    /// close_notify or a TCP FIN was read.
    eof: Cell<bool>,
    /// Our close_notify is sealed: a second `shutdown` sends nothing (as rustls sends one).
    closed: Cell<bool>,
    /// The last recv was short: the socket held nothing more then, so the next `try_fill`
    /// that finds no plaintext goes back to waiting for readiness without a recv that would
    /// only say EAGAIN (2-3 per connection and side: after the handshake, after each answer).
    drained: Cell<bool>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn record_err(e: record::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn not_open() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS handshake not done")
}

impl TlsStream {
    /// A client connection with `config`'s client config; the SNI is the cluster's service
    /// host, else the endpoint IP (no SNI sent).
    pub fn client(tcp: TcpStream, config: &Configured, ip: IpAddr) -> io::Result<TlsStream> {
        let Some(client) = config.client.clone() else {
            return Err(io::Error::other("no client TLS config"));
        };
        let name = config.server_name.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        let conn = UnbufferedClientConnection::new(client, name).map_err(tls_err)?;
        Ok(TlsStream::new(tcp, Handshake::Client(conn)))
    }

    /// A server connection with `config`.
    pub fn server(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
        Ok(TlsStream::new(tcp, Handshake::Server(conn, None)))
    }

    fn new(tcp: TcpStream, hs: Handshake) -> TlsStream {
        TlsStream {
            tcp,
            state: RefCell::new(State::Handshaking(Box::new(hs))),
            info: RefCell::default(),
            rx: RefCell::default(),
            tx: RefCell::default(),
            batch: Cell::new(false),
            eof: Cell::new(false),
            closed: Cell::new(false),
            drained: Cell::new(false),
        }
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
        let taken = std::mem::replace(&mut *self.state.borrow_mut(), State::Gone);
        let State::Handshaking(mut hs) = taken else {
            return Err(not_open());
        };
        let mut incoming = pool.take();
        let mut out = take_record_buffer();
        let (mut early, mut closed) = (Vec::new(), false);
        let r = self.drive(&mut hs, &mut incoming, &mut out, &mut early, &mut closed).await;
        if let Err(e) = r {
            // Send the alert rustls queued (bad certificate, unknown CA), best effort.
            out.clear();
            hs.alert(&mut out);
            let _ = NonBlocking(&self.tcp).write(&out);
            put_record_buffer(out);
            pool.put(incoming);
            return Err(e);
        }
        **self.info.borrow_mut() = hs.info();
        let session = match hs.into_session() {
            Ok(s) => s,
            Err(e) => {
                put_record_buffer(out);
                pool.put(incoming);
                return Err(record_err(e));
            }
        };
        *self.state.borrow_mut() = State::Open(Box::new(session));
        self.eof.set(closed);
        *self.tx.borrow_mut() = Tx { buf: out, sent: 0 };
        // Application data that came with the handshake's last records (a client's Finished
        // and its preamble in one segment): the opened part first, then whole or partial
        // records not yet opened.
        if !early.is_empty() || !incoming.is_empty() {
            let mut buf = take_record_buffer();
            buf.extend_from_slice(&early);
            buf.extend_from_slice(&incoming);
            let mut rx = Rx { buf, at: early.len(), ..Rx::default() };
            if !early.is_empty() {
                rx.plain[0] = 0..offset(early.len());
                rx.opened = 1;
            }
            *self.rx.borrow_mut() = rx;
        }
        pool.put(incoming);
        Ok(())
    }

    async fn drive(
        &self,
        hs: &mut Handshake,
        incoming: &mut Vec<u8>,
        out: &mut Vec<u8>,
        early: &mut Vec<u8>,
        closed: &mut bool,
    ) -> io::Result<()> {
        // A server reads at once what its client sent right after connecting (the ClientHello
        // is usually there by the time the accept completes): one recv(2), no readiness wait
        // on the ring; when it is not, the wait follows. Every later read follows a flight of
        // ours, whose answer cannot be there yet: wait first.
        let mut read_first = matches!(hs, Handshake::Server(..));
        loop {
            match hs.run(incoming, out, early, closed).map_err(tls_err)? {
                Step::Done => return Ok(()),
                Step::Transmit => {
                    send_all(&self.tcp, out).await?;
                    out.clear();
                }
                Step::Receive => {
                    if !std::mem::take(&mut read_first) {
                        self.tcp.readable(false).await?;
                    }
                    if incoming.len() == incoming.capacity() {
                        incoming.reserve(4096);
                    }
                    match socket::recv_spare(&self.tcp, incoming) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "peer closed during the TLS handshake",
                            ));
                        }
                        Ok(_) => self.drained.set(incoming.len() < incoming.capacity()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// True when ALPN resolved to `istio-peer-exchange` (SPEC §7: the exchange runs only then).
    pub fn alpn_is_peer_exchange(&self) -> bool {
        self.alpn_is(ALPN_PEER_EXCHANGE)
    }

    /// True when ALPN resolved to `protocol`.
    pub fn alpn_is(&self, protocol: &[u8]) -> bool {
        self.info.borrow().alpn.as_deref() == Some(protocol)
    }

    /// True when the handshake negotiated TLS 1.3.
    pub fn is_tls13(&self) -> bool {
        self.info.borrow().tls13
    }

    /// The peer certificate's SPIFFE id (its principal), if it has one: from `principals`
    /// when this worker saw the same certificate lately, else read from it (and kept there).
    pub fn peer_principal(&self, principals: &super::Principals) -> Option<Arc<str>> {
        let info = self.info.borrow();
        let leaf = info.leaf.as_ref()?;
        let Ok(principal) = principals
            .get_or_make(leaf, || Ok::<_, std::convert::Infallible>(super::spiffe_id(leaf).map(Arc::from)));
        principal
    }

    /// Whether the peer presented a certificate (a server's client with one: mutual TLS).
    pub fn peer_presented_certificate(&self) -> bool {
        self.info.borrow().leaf.is_some()
    }

    /// The peer certificate's names for RBAC principals, in Envoy's order (`tls::peer_names`);
    /// empty without a certificate.
    pub fn peer_names(&self) -> Vec<String> {
        self.info.borrow().leaf.as_ref().map(super::peer_names).unwrap_or_default()
    }

    /// Drop the peer's certificate once its principal and names were read: an idle
    /// connection then holds only what its records need (`peer_principal` and `peer_names`
    /// answer as without a certificate afterwards, `peer_presented_certificate` too).
    pub fn forget_peer_certificate(&self) {
        self.info.borrow_mut().leaf = None;
    }

    /// Calls `f` with the server name (SNI) the client asked for, on a server connection.
    pub fn with_server_name<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> R {
        f(self.info.borrow().sni.as_deref())
    }

    /// After the handshake: whether the session was resumed, and the negotiated suite's
    /// index in `ringside_tls_handshakes_total` (`crate::tls::suite_index`).
    pub fn handshake_info(&self) -> (bool, usize) {
        let i = self.info.borrow();
        (i.resumed, i.suite)
    }

    /// The socket underneath (its addresses, its original destination when captured).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The socket, to reset it (a reset stays a reset).
    pub fn into_tcp(self) -> TcpStream {
        let TlsStream { tcp, rx, tx, .. } = self;
        put_record_buffer(rx.into_inner().buf);
        put_record_buffer(tx.into_inner().buf);
        tcp
    }

    /// Wait until the socket has bytes (or EOF/error).
    pub async fn readable(&self) -> io::Result<()> {
        self.tcp.readable(false).await
    }

    /// Open the next whole record waiting in the receive buffer; false when none is whole.
    fn open_next(&self) -> Result<bool, record::Error> {
        let mut rx = self.rx.borrow_mut();
        let Rx { buf, plain, opened, at } = &mut *rx;
        if *opened == OPENED_AHEAD {
            return Ok(false);
        }
        let Some(len) = record::record_len(buf.get(*at..).unwrap_or_default())? else {
            return Ok(false);
        };
        let mut state = self.state.borrow_mut();
        let State::Open(session) = &mut *state else { return Err(record::Error::UnexpectedMessage) };
        let start = *at;
        let Some(rec) = buf.get_mut(start..start + len) else { return Ok(false) };
        match session.open(rec)? {
            Opened::Data(r) if r.start < r.end => {
                plain[*opened] = offset(start + r.start)..offset(start + r.end);
                *opened += 1;
            }
            Opened::Data(_) => {}
            Opened::Eof => self.eof.set(true),
            Opened::Session => {}
        }
        *at += len;
        // Our KeyUpdate goes after every record sealed before it.
        move_control(session, &mut self.tx.borrow_mut());
        Ok(true)
    }

    /// Give the receive buffer back when nothing waits in it.
    fn release_rx(&self) {
        let mut rx = self.rx.borrow_mut();
        if rx.is_empty() && rx.buf.capacity() > 0 {
            put_record_buffer(std::mem::take(&mut rx.buf));
            *rx = Rx::default();
        }
    }

    /// Receive ciphertext after what waits, with room for a whole record.
    fn recv(&self) -> io::Result<usize> {
        let mut rx = self.rx.borrow_mut();
        let rx = &mut *rx;
        if rx.buf.capacity() == 0 {
            rx.buf = take_record_buffer();
        }
        if rx.buf.capacity() - rx.buf.len() < MAX_RECORD && rx.at > 0 {
            // The partial record at the end moves to the front (at most one record per
            // buffer's worth of records).
            rx.buf.copy_within(rx.at.., 0);
            let keep = rx.buf.len() - rx.at;
            rx.buf.truncate(keep);
            rx.at = 0;
        }
        let n = socket::recv_spare(&self.tcp, &mut rx.buf)?;
        // EOF (0) is not "drained".
        self.drained.set(n > 0 && rx.buf.len() < rx.buf.capacity());
        Ok(n)
    }

    /// Send an alert for `e` when one is due, best effort, and make it an I/O error.
    fn fail(&self, e: record::Error) -> io::Error {
        if let (Some(alert), State::Open(s)) = (e.alert(), &mut *self.state.borrow_mut()) {
            let mut out = Vec::new();
            if s.seal_alert(alert, &mut out).is_ok() {
                let _ = NonBlocking(&self.tcp).write(&out);
            }
        }
        record_err(e)
    }

    /// Make decrypted bytes available without blocking.
    pub fn try_fill(&self, _pool: &BufferPool) -> io::Result<Fill> {
        loop {
            // Open what is whole (up to `OPENED_AHEAD` records), then deliver.
            loop {
                match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => return Err(self.fail(e)),
                }
            }
            // A key update may want an answer; the write side flushes whatever the socket
            // does not take now.
            let _ = self.flush_now();
            if self.rx.borrow().opened > 0 {
                return Ok(Fill::Data);
            }
            if self.eof.get() {
                return Ok(Fill::Eof);
            }
            // Once only: a caller told `WouldBlock` waits for readiness (or comes back having
            // waited for something else), and the next call reads.
            if self.drained.replace(false) {
                self.release_rx();
                return Ok(Fill::WouldBlock);
            }
            match self.recv() {
                // A TCP FIN without close_notify: Istio's peers end a direction so too.
                Ok(0) => self.eof.set(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release_rx();
                    return Ok(Fill::WouldBlock);
                }
                Err(e) => return Err(e),
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

    /// Mark `n` decrypted bytes taken.
    fn consume(&self, n: usize) {
        let done = {
            let mut rx = self.rx.borrow_mut();
            rx.consume(n);
            rx.is_empty()
        };
        if done {
            self.release_rx();
        }
    }

    /// Copy decrypted bytes into `out`'s spare capacity; returns how many.
    pub fn take_into(&self, out: &mut Vec<u8>) -> usize {
        let n = {
            let rx = self.rx.borrow();
            let chunk = rx.first();
            let n = chunk.len().min(out.capacity() - out.len());
            out.extend_from_slice(&chunk[..n]);
            n
        };
        self.consume(n);
        n
    }

    /// Calls `f` with the decrypted bytes waiting (after `fill` said `Data`), which are then
    /// consumed: a reader that parses them (HBONE's HTTP/2 core) takes them without a copy
    /// into a buffer of its own first.
    pub fn with_plaintext<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let (out, n) = {
            let rx = self.rx.borrow();
            let chunk = rx.first();
            (f(chunk), chunk.len())
        };
        self.consume(n);
        out
    }

    /// Calls `f` with the plaintexts of up to `max` records opened ahead (after `fill` said
    /// `Data`), in order, which are then consumed: a reader that parses several records and
    /// writes their payloads on from here (HBONE's terminator) needs no copy of them first.
    pub fn with_opened<R>(&self, max: usize, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        let (out, n) = {
            let rx = self.rx.borrow();
            let mut records: [&[u8]; OPENED_AHEAD] = [&[]; OPENED_AHEAD];
            let count = rx.opened.min(max);
            for (s, r) in records.iter_mut().zip(&rx.plain[..count]) {
                *s = rx.buf.get(span(r)).unwrap_or_default();
            }
            let n = records.iter().map(|r| r.len()).sum();
            (f(&records[..count]), n)
        };
        self.consume(n);
        out
    }

    /// Send decrypted bytes straight to `to` without blocking (`WouldBlock`: wait for
    /// `to` to be writable), the records opened ahead in one vectored send; returns how
    /// many left the buffer.
    pub fn send_to(&self, to: &TcpStream) -> io::Result<usize> {
        let n = {
            let rx = self.rx.borrow();
            let mut slices = [io::IoSlice::new(&[]); OPENED_AHEAD];
            for (s, r) in slices.iter_mut().zip(&rx.plain[..rx.opened]) {
                *s = io::IoSlice::new(rx.buf.get(span(r)).unwrap_or_default());
            }
            NonBlocking(to).write_vectored(&slices[..rx.opened])?
        };
        self.consume(n);
        Ok(n)
    }

    /// Write what is queued as far as the socket takes it now; true when all went.
    fn flush_now(&self) -> io::Result<bool> {
        self.send_queued(false)
    }

    /// `flush_now`; `more`: the bytes wait in the socket (MSG_MORE) for the next send or the
    /// FIN, and leave with it in one segment.
    fn send_queued(&self, more: bool) -> io::Result<bool> {
        if self.batch.get() {
            return Ok(false);
        }
        let mut tx = self.tx.borrow_mut();
        while tx.sent < tx.buf.len() {
            let rest = &tx.buf[tx.sent..];
            let sent = match more {
                true => socket::send_more(&self.tcp, rest),
                false => NonBlocking(&self.tcp).write(rest),
            };
            match sent {
                Ok(n) => tx.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if tx.buf.capacity() > 0 {
            put_record_buffer(std::mem::take(&mut tx.buf));
            tx.sent = 0;
        }
        Ok(true)
    }

    /// Write everything queued.
    pub async fn flush(&self) -> io::Result<()> {
        while !self.flush_now()? {
            self.tcp.writable(false).await?;
        }
        Ok(())
    }

    /// Write everything queued, but held in the socket (MSG_MORE) until the next send or the
    /// FIN, to leave in its segment: one segment and one wake-up of the peer fewer. The
    /// kernel sends held bytes on its own after its cork ceiling (200 ms).
    pub async fn flush_more(&self) -> io::Result<()> {
        while !self.send_queued(true)? {
            self.tcp.writable(false).await?;
        }
        Ok(())
    }

    /// Encrypt and send all of `data`.
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.queue(data).await?;
        self.flush().await
    }

    /// Encrypt all of `data` into the send queue without sending it, but for what does not
    /// fit a record buffer: the records leave with the next `flush`, together in one send.
    /// A copy into the queue, for the preamble and HBONE's frames; the relay's bulk path
    /// seals where it read (`seal_and_send`).
    pub async fn queue(&self, mut data: &[u8]) -> io::Result<()> {
        loop {
            {
                let mut state = self.state.borrow_mut();
                let State::Open(session) = &mut *state else { return Err(not_open()) };
                let mut tx = self.tx.borrow_mut();
                if tx.buf.capacity() == 0 {
                    tx.buf = take_record_buffer();
                }
                let room = tx.buf.capacity() - tx.buf.len();
                let fits = (room / (MAX_PLAINTEXT + 30)) * MAX_PLAINTEXT
                    + (room % (MAX_PLAINTEXT + 30)).saturating_sub(30);
                let n = data.len().min(fits);
                if n > 0 || data.is_empty() {
                    let (now, rest) = data.split_at(n);
                    // A KeyUpdate due at the confidentiality limit goes before these records.
                    session.reserve(now.len().div_ceil(MAX_PLAINTEXT).max(1) as u64).map_err(record_err)?;
                    move_control(session, &mut tx);
                    session.seal_append(now, &mut tx.buf).map_err(record_err)?;
                    data = rest;
                }
                if data.is_empty() {
                    return Ok(());
                }
            }
            self.flush().await?;
        }
    }

    /// Room a record needs before and after its plaintext for `seal_and_send` (the header
    /// and, in TLS 1.2 AES-GCM, the explicit nonce; the content type and tag).
    pub fn record_rooms(&self) -> (usize, usize) {
        match &*self.state.borrow() {
            State::Open(s) => (s.head_room(), s.tail_room()),
            _ => (13, 17),
        }
    }

    /// Seal in place the records laid out back to back in `buf` (each `head + len + tail`
    /// bytes, `record_rooms`, with `len` from `lens`, at most `MAX_PLAINTEXT`) and send them
    /// after what is queued, in one send: the relay's plaintext is encrypted where it was
    /// read, with no copy.
    pub async fn seal_and_send(&self, buf: &mut [u8], lens: &[usize]) -> io::Result<()> {
        {
            let mut state = self.state.borrow_mut();
            let State::Open(session) = &mut *state else { return Err(not_open()) };
            session.reserve(lens.len() as u64).map_err(record_err)?;
            move_control(session, &mut self.tx.borrow_mut());
        }
        // Records sealed earlier (the handshake's last flight, a KeyUpdate) go first.
        self.flush().await?;
        {
            let mut state = self.state.borrow_mut();
            let State::Open(session) = &mut *state else { return Err(not_open()) };
            let mut at = 0;
            for &len in lens {
                let end = at + session.sealed_len(len);
                let rec = buf.get_mut(at..end).ok_or_else(|| io::Error::other("record layout"))?;
                session.seal_data(rec).map_err(record_err)?;
                at = end;
            }
        }
        // Cleared on drop too: a cancelled send (idle timeout, drain) must not leave `tx`
        // blocked behind it.
        struct Batch<'a>(&'a Cell<bool>);
        impl Drop for Batch<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        self.batch.set(true);
        let guard = Batch(&self.batch);
        let r = send_all(&self.tcp, buf).await;
        drop(guard);
        r?;
        // A KeyUpdate queued meanwhile by the read side.
        self.flush().await
    }

    /// Half-close: close_notify, then FIN; the other direction keeps flowing.
    pub async fn shutdown(&self) -> io::Result<()> {
        if !self.closed.replace(true) {
            let mut state = self.state.borrow_mut();
            let State::Open(session) = &mut *state else { return Err(not_open()) };
            let mut tx = self.tx.borrow_mut();
            if tx.buf.capacity() == 0 {
                tx.buf = take_record_buffer();
            }
            session.seal_close_notify(&mut tx.buf).map_err(record_err)?;
        }
        // close_notify and the FIN in one segment, not two (one per closing direction).
        self.flush_more().await?;
        socket::shutdown_write(&self.tcp)
    }
}

/// Queue the session's own records (a KeyUpdate) behind what is queued.
fn move_control(session: &mut Session, tx: &mut Tx) {
    if session.control().is_empty() {
        return;
    }
    if tx.buf.capacity() == 0 {
        tx.buf = take_record_buffer();
    }
    tx.buf.extend_from_slice(session.control());
    session.clear_control();
}

/// Send all of `data`, waiting for the socket when it is full.
async fn send_all(tcp: &TcpStream, data: &[u8]) -> io::Result<()> {
    let mut at = 0;
    while at < data.len() {
        match NonBlocking(tcp).write(&data[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable(false).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
