//! One connection over mTLS (SPEC §7): the inbound handshake (and, in `permissive`, the
//! ClientHello sniff), the outbound handshake, the peer exchange inside TLS (mode `alpn`:
//! only when ALPN resolved to `istio-peer-exchange`), and the copy loop between a plaintext
//! socket and a TLS one. The rustls side lives in `crate::tls`; this file only moves bytes.
//!
//! Bulk over TLS cannot splice (no kTLS here): ciphertext goes socket → pool buffer →
//! rustls, plaintext rustls' buffer → socket with non-blocking calls after readiness, and the
//! other way through one pool buffer (rustls encrypts from it into a record).

use std::io;
use std::pin::pin;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use super::{Error, Verdict, authorize, connect_any, count, feed};
use crate::capture;
use crate::config::{Capture, Listener, ListenerTlsMode, PeerExchange};
use crate::conn::{Conn, Security, WorkerCtx, settle};
use crate::exchange::{NodeMetadata, Parser};
use crate::metrics::{ExchangeOutcome, TlsHandshake, TlsRefused};
use crate::socket;
use crate::tls::Slot;
use crate::tls::hello::ClientHello;
use crate::tls::stream::{Fill, TlsStream};

/// Shortest wait for a permissive client's first bytes (see `accept`).
const PERMISSIVE_SNIFF_MIN: Duration = Duration::from_secs(1);

/// A set-up connection with one TLS side.
struct TlsPair {
    plain: TcpStream,
    tls: TlsStream,
    /// The TLS side is the downstream (inbound listener), else the upstream (outbound).
    tls_is_down: bool,
}

/// What an inbound TLS listener accepted.
enum Accepted {
    /// `permissive` and the client spoke plaintext: relay it as any plaintext connection.
    Plain(TcpStream),
    /// A verified mTLS client.
    Tls(TlsStream),
}

/// The inbound handshake: sniff in `permissive`, then require a client certificate signed
/// by the mesh root. A refused client is closed and counted, nothing of it relayed.
async fn accept(
    ctx: &WorkerCtx,
    conn: &Conn,
    listener: &Listener,
    slot: &Slot,
    down: TcpStream,
) -> Result<Accepted, Error> {
    let permissive = listener.tls.as_ref().is_some_and(|t| t.mode == ListenerTlsMode::Permissive);
    // A TLS client's ClientHello follows its connect at once, but building one (key shares)
    // under load can take longer than the exchange's 20 ms sniff window: wait at least 1 s
    // before deciding a silent client is plaintext. A plaintext server-first protocol behind
    // `permissive` therefore greets after up to 1 s (Istio asks such ports to be declared).
    let window = listener.limits.sniff_timeout.0.max(PERMISSIVE_SNIFF_MIN);
    if permissive && !sniff_client_hello(ctx, &down, window).await? {
        return Ok(Accepted::Plain(down));
    }
    let config = slot.current();
    let Some(server) = config.server.clone() else { return Err(Error::Refused) };
    let tls = TlsStream::server(down, server)?;
    let reason =
        match monoio::time::timeout(listener.limits.connect_timeout.0, tls.handshake(&ctx.pool)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                log::debug!("listener {}: tls handshake refused: {e}", listener.name);
                Some(refused_reason(&e))
            }
            Err(_) => {
                log::debug!("listener {}: tls handshake timed out", listener.name);
                Some(TlsRefused::Timeout)
            }
        };
    if let Some(reason) = reason {
        ctx.metrics.borrow().count_tls_refused(reason);
        return Err(Error::Refused);
    }
    count_handshake(ctx, &tls, true);
    // Resumed or not, the principal comes from the session's client certificate (rustls
    // restores the chain a resumed session was established with).
    *conn.security.borrow_mut() = Security {
        local_principal: config.local_principal.clone(),
        peer_principal: tls.peer_principal().map(Into::into),
        // A chain that does not require a client certificate terminates plain TLS for a
        // client without one: `mutual_tls` only when it presented one (SPEC §9).
        mutual_tls: tls.peer_presented_certificate(),
    };
    Ok(Accepted::Tls(tls))
}

/// Count a completed handshake: direction, full or resumed, suite.
fn count_handshake(ctx: &WorkerCtx, tls: &TlsStream, inbound: bool) {
    let (resumed, suite) = tls.handshake_info();
    ctx.metrics.borrow().count_tls_handshake(TlsHandshake { inbound, resumed, suite });
}

fn refused_reason(e: &io::Error) -> TlsRefused {
    use rustls::Error as R;
    match e.get_ref().and_then(|e| e.downcast_ref::<R>()) {
        Some(R::NoCertificatesPresented) => TlsRefused::NoClientCertificate,
        Some(R::InvalidCertificate(_)) => TlsRefused::BadCertificate,
        Some(
            R::InvalidMessage(_) | R::InappropriateMessage { .. } | R::InappropriateHandshakeMessage { .. },
        ) => TlsRefused::NotTls,
        _ => TlsRefused::Other,
    }
}

/// `permissive`: does the client start with a TLS handshake record (0x16 0x03 ..)? Looks
/// without consuming, so a plaintext client loses nothing; a plaintext client that sends one
/// byte and waits is told apart at once; one that sends nothing within `sniff_timeout` is
/// plaintext (a server-first protocol).
async fn sniff_client_hello(
    ctx: &WorkerCtx,
    down: &TcpStream,
    sniff_timeout: Duration,
) -> Result<bool, Error> {
    let mut buf = ctx.pool.take();
    let tls = peek_until(down, &mut buf, 3, Instant::now() + sniff_timeout, |bytes, _| match bytes {
        [b, ..] if *b != 0x16 => Some(false),
        [_, v, ..] if *v != 0x03 => Some(false),
        [_, _, _, ..] => Some(true),
        _ => None, // a TLS header prefix
    })
    .await;
    ctx.pool.put(buf);
    Ok(tls? == Some(true))
}

/// What a listener's inspectors found in a connection's first bytes (SPEC §9).
#[derive(Debug, Default)]
pub(super) struct Inspected {
    /// `tls_inspector`: the ClientHello's offers; `None`: plaintext.
    pub hello: Option<ClientHello>,
    /// `http_inspector`: the HTTP protocol of a plaintext client (`http/1.1`, `h2c`, ...).
    pub http: Option<&'static str>,
}

/// A listener's `tls_inspector` and `http_inspector` (SPEC §9), as `what` asks for them: what
/// the client's ClientHello offers (server name, ALPN), or `None` for a plaintext client, and
/// then for a plaintext one its HTTP protocol, peeked without consuming a byte. A client that
/// sends nothing within `sniff_timeout` (at least 1 s, as `permissive`), or whose first bytes
/// decide nothing within it, is plaintext without a protocol, as Envoy's inspectors give up
/// at its timeout (istiod sets `continue_on_listener_filters_timeout`). A ClientHello too
/// large for a pool buffer is TLS with no ALPN seen; a request line too, not HTTP.
pub(super) async fn inspect(
    ctx: &WorkerCtx,
    down: &TcpStream,
    sniff_timeout: Duration,
    what: crate::routing::chains::Inspection,
) -> Result<Inspected, Error> {
    use crate::routing::http_sniff::{Sniff, sniff};
    use crate::tls::hello::{Hello, parse};
    let deadline = Instant::now() + sniff_timeout.max(PERMISSIVE_SNIFF_MIN);
    let mut buf = ctx.pool.take();
    let limit = buf.capacity();
    let found = peek_until(down, &mut buf, limit, deadline, |bytes, full| {
        if what.tls {
            match parse(bytes) {
                Hello::NotTls => {}
                Hello::Tls(offers) => return Some(Inspected { hello: Some(offers), http: None }),
                Hello::NeedMore if full => {
                    return Some(Inspected { hello: Some(ClientHello::default()), http: None });
                }
                Hello::NeedMore => return None,
            }
        }
        if !what.http {
            return Some(Inspected::default());
        }
        match sniff(bytes) {
            Sniff::Http(p) => Some(Inspected { hello: None, http: Some(p) }),
            Sniff::NeedMore if !full => None,
            Sniff::NeedMore | Sniff::NotHttp => Some(Inspected::default()),
        }
    })
    .await;
    ctx.pool.put(buf);
    Ok(found?.unwrap_or_default())
}

/// Peek at a client's first bytes (at most `limit`, within `buf`'s capacity) until `decide`
/// (given what is there and whether `limit` is reached) returns an answer. `None`: the client
/// sent nothing decisive before `deadline`, or closed (the plaintext path then relays what it
/// sent). Between looks the worker sleeps until more bytes than seen have arrived (the
/// socket's receive low-water mark), so a client that sends a few bytes and stops costs one
/// wake-up, not one per millisecond.
async fn peek_until<T>(
    down: &TcpStream,
    buf: &mut Vec<u8>,
    limit: usize,
    deadline: Instant,
    mut decide: impl FnMut(&[u8], bool) -> Option<T>,
) -> Result<Option<T>, Error> {
    let mut raised = false;
    let answer = loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        if monoio::time::timeout(wait, down.readable(false)).await.is_err() {
            break Ok(None);
        }
        let n = match socket::peek(down, buf, limit) {
            Ok(0) => break Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => break Err(e.into()),
        };
        if let Some(answer) = decide(buf.get(..n).unwrap_or_default(), n >= limit) {
            break Ok(Some(answer));
        }
        if Instant::now() >= deadline {
            break Ok(None);
        }
        // Readiness stays set while bytes wait unread: ask to be woken for more than `n`.
        if let Err(e) = socket::set_receive_low_water(down, n + 1) {
            break Err(e.into());
        }
        raised = true;
    };
    if raised {
        // Back to the default (1) before the relay reads: its reads must not wait for more.
        socket::set_receive_low_water(down, 1)?;
    }
    answer
}

/// An inbound mTLS listener's connection: the handshake (after the sniff, in `permissive`),
/// then connect, exchange and copy. `Some(socket)`: a plaintext client in `permissive`, for
/// the caller to relay as plaintext. A cancel (idle timeout, drain deadline) before the copy
/// closes the sockets; nothing of the connection was relayed yet but the exchange's first
/// bytes.
pub(super) async fn serve_inbound(
    ctx: &WorkerCtx,
    li: usize,
    conn: &Conn,
    slot: &Slot,
    down: TcpStream,
) -> Result<Option<TcpStream>, Error> {
    let listener = &conn.snapshot.config.listeners[li];
    // Boxed, as the plaintext setup is: its timers should not stay with the connection.
    let accepted = monoio::select! {
        r = Box::pin(accept(ctx, conn, listener, slot, down)) => r?,
        _ = conn.cancel.wait() => return Ok(None),
    };
    let tls = match accepted {
        Accepted::Plain(down) => return Ok(Some(down)),
        Accepted::Tls(tls) => tls,
    };
    check_rbac(ctx, li, conn, &tls)?;
    let (pair, peer) = monoio::select! {
        r = Box::pin(open_inbound(ctx, li, conn, tls)) => r?,
        _ = conn.cancel.wait() => return Ok(None),
    };
    settle(ctx, conn, peer.as_ref(), "-");
    copy(ctx, conn, pair).await?;
    Ok(None)
}

/// A TLS chain's RBAC (SPEC §9), once the handshake is done: the peer certificate's names as
/// Envoy matches principals (every URI SAN, then DNS SANs, then the subject) and the SNI it
/// asked for. Only chains with RBAC filters read the certificate and ask the socket for the
/// connection's addresses.
fn check_rbac(ctx: &WorkerCtx, li: usize, conn: &Conn, tls: &TlsStream) -> Result<(), Error> {
    let listener = &conn.snapshot.config.listeners[li];
    let Some(c) =
        conn.chain.get().filter(|&c| listener.filter_chains.get(c).is_some_and(|f| !f.rbac.is_empty()))
    else {
        return Ok(());
    };
    let tcp = tls.tcp();
    let dst = match listener.capture {
        Capture::None => tcp.local_addr()?,
        _ => capture::original_dst(tcp, listener.listen).or_else(|_| tcp.local_addr())?,
    };
    let owned = tls.peer_names();
    let names: Vec<&str> = owned.iter().map(String::as_str).collect();
    tls.with_server_name(|sni| {
        let t = crate::rbac::Tls { sni, peer_names: &names };
        authorize(ctx, li, conn, c, tcp, dst, None, Some(t))
    })
}

/// An outbound connection to an mTLS cluster, once connected: handshake, exchange, copy.
pub(super) async fn serve_outbound(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    down: TcpStream,
    up: TcpStream,
    slot: &Slot,
) -> Result<(), Error> {
    let (pair, peer) = monoio::select! {
        r = Box::pin(open_outbound(ctx, listener, conn, down, up, slot)) => r?,
        _ = conn.cancel.wait() => return Ok(()),
    };
    settle(ctx, conn, peer.as_ref(), "-");
    copy(ctx, conn, pair).await
}

/// Inbound after the handshake: connect upstream, run the exchange when ALPN says so.
async fn open_inbound(
    ctx: &WorkerCtx,
    li: usize,
    conn: &Conn,
    tls: TlsStream,
) -> Result<(TlsPair, Option<NodeMetadata>), Error> {
    let listener = &conn.snapshot.config.listeners[li];
    let up = connect_any(ctx, li, conn, listener, tls.tcp()).await?;
    let _ = up.set_nodelay(true);
    finish(ctx, listener, conn, TlsPair { plain: up, tls, tls_is_down: true }).await
}

/// Outbound: TLS client to the upstream with the cluster's config, then the exchange when
/// the server chose `istio-peer-exchange`. A failed handshake is an upstream failure (`UF`).
async fn open_outbound(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    down: TcpStream,
    up: TcpStream,
    slot: &Slot,
) -> Result<(TlsPair, Option<NodeMetadata>), Error> {
    let config = slot.current();
    let ip = up.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    let _ = up.set_nodelay(true);
    let tls = TlsStream::client(up, &config, ip).map_err(Error::Connect)?;
    match monoio::time::timeout(listener.limits.connect_timeout.0, tls.handshake(&ctx.pool)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Connect(e)),
        Err(_) => {
            return Err(Error::Connect(io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out")));
        }
    }
    count_handshake(ctx, &tls, false);
    *conn.security.borrow_mut() = Security {
        local_principal: config.local_principal.clone(),
        peer_principal: tls.peer_principal().map(Into::into),
        mutual_tls: true,
    };
    finish(ctx, listener, conn, TlsPair { plain: down, tls, tls_is_down: false }).await
}

/// The exchange inside TLS, or none; a broken one resets both sides.
async fn finish(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    mut pair: TlsPair,
) -> Result<(TlsPair, Option<NodeMetadata>), Error> {
    if listener.peer_exchange == PeerExchange::Off {
        return Ok((pair, None));
    }
    if !pair.tls.alpn_is_peer_exchange() {
        count(ctx, ExchangeOutcome::AlpnProtocolNotFound);
        return Ok((pair, None));
    }
    count(ctx, ExchangeOutcome::AlpnProtocolFound);
    let mut parser = Parser::with_buffer(listener.limits.max_preamble.0, ctx.pool.take());
    let peer = exchange(ctx, listener, conn, &mut parser, &mut pair).await;
    ctx.pool.put(parser.into_buffer());
    match peer {
        Ok(p) => Ok((pair, p)),
        Err(e) => {
            socket::reset(pair.plain);
            socket::reset(pair.tls.into_tcp());
            Err(e)
        }
    }
}

/// Both sides write their preamble at once after the handshake (SPEC §2, mode `alpn`), then
/// strip the peer's from the TLS side. Outbound, the client's bytes flow meanwhile; inbound,
/// an upstream that speaks first (server-first protocol) makes us wait for the client's
/// preamble at most `sniff_timeout`.
async fn exchange(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    parser: &mut Parser,
    pair: &mut TlsPair,
) -> Result<Option<NodeMetadata>, Error> {
    let TlsPair { plain, tls, tls_is_down } = pair;
    let request = *tls_is_down; // bytes from the TLS side go downstream→upstream
    tls.write_all(&ctx.preamble).await?;
    let limits = &listener.limits;
    let start = Instant::now();
    let mut begun_at: Option<Instant> = None;
    let mut plain_spoke_at: Option<Instant> = None;
    let mut plain_open = true;
    loop {
        let deadline = match (begun_at, plain_spoke_at) {
            (Some(t), _) => t + limits.exchange_timeout.0,
            (None, Some(t)) if request => t + limits.sniff_timeout.0,
            _ => start + limits.exchange_timeout.0,
        };
        let fill = tls.try_fill(&ctx.pool)?;
        if fill != Fill::WouldBlock {
            let mut buf = ctx.pool.take();
            if fill == Fill::Data {
                tls.take_into(&mut buf);
            }
            match feed(ctx, conn, parser, buf, plain, request, None).await? {
                Verdict::Pending => {
                    begun_at.get_or_insert_with(Instant::now);
                }
                Verdict::Settled(peer) => return Ok(peer),
            }
            continue;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        monoio::select! {
            r = tls.readable() => r?,
            r = plain.readable(false), if plain_open && plain_spoke_at.is_none() => {
                r?;
                if request {
                    // Upstream spoke first: it waits in the kernel, at most sniff_timeout.
                    plain_spoke_at = Some(Instant::now());
                } else {
                    // Outbound: the client's bytes go up at once.
                    plain_open = relay_plain_to_tls(ctx, conn, plain, tls).await?;
                }
            }
            _ = monoio::time::sleep(wait) => {
                if begun_at.is_some() {
                    count(ctx, ExchangeOutcome::Timeout);
                    return Err(Error::ExchangeTimeout);
                }
                count(ctx, ExchangeOutcome::InitialHeaderNotFound);
                return Ok(None);
            }
        }
    }
}

/// Move what the plaintext side has now into TLS; false once it reached EOF (then TLS
/// is half-closed).
async fn relay_plain_to_tls(
    ctx: &WorkerCtx,
    conn: &Conn,
    plain: &TcpStream,
    tls: &TlsStream,
) -> io::Result<bool> {
    let mut buf = ctx.pool.take();
    let res = socket::recv_spare(plain, &mut buf);
    let open = match res {
        Ok(0) => {
            tls.shutdown().await?;
            false
        }
        Ok(n) => {
            count_bytes(ctx, conn, n, true);
            let r = tls.write_all(&buf).await;
            ctx.pool.put(buf);
            r?;
            return Ok(true);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(e) => {
            ctx.pool.put(buf);
            return Err(e);
        }
    };
    ctx.pool.put(buf);
    Ok(open)
}

fn count_bytes(ctx: &WorkerCtx, conn: &Conn, n: usize, request: bool) {
    let counter = if request { &conn.received_bytes } else { &conn.sent_bytes };
    counter.set(counter.get() + n as u64);
    conn.last_active.set(ctx.now.get());
    ctx.busy.note();
}

/// Copy both directions until both ended; an error on either resets both sides, as for
/// plaintext (a reset stays a reset). Half-close: close_notify + FIN one way, the other
/// direction keeps flowing.
async fn copy(ctx: &WorkerCtx, conn: &Conn, pair: TlsPair) -> Result<(), Error> {
    let TlsPair { plain, tls, tls_is_down } = pair;
    let result = {
        let to_tls = pin!(plain_to_tls(ctx, conn, &plain, &tls, !tls_is_down));
        let from_tls = pin!(tls_to_plain(ctx, conn, &tls, &plain, tls_is_down));
        super::both(to_tls, from_tls, conn).await
    };
    // Idle: close gracefully (dropping both sends FIN); anything else resets both sides.
    if let Err(super::Ended::Drain | super::Ended::Reset(_)) = &result {
        socket::reset(plain);
        socket::reset(tls.into_tcp());
    }
    result.map_err(|e| Error::Io(e.into()))
}

/// Plaintext → TLS: a pool buffer only between readiness and the encrypting write.
async fn plain_to_tls(
    ctx: &WorkerCtx,
    conn: &Conn,
    plain: &TcpStream,
    tls: &TlsStream,
    request: bool,
) -> io::Result<()> {
    loop {
        plain.readable(false).await?;
        let mut buf = ctx.pool.take();
        let n = match socket::recv_spare(plain, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                ctx.pool.put(buf);
                if e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
        };
        if n == 0 {
            ctx.pool.put(buf);
            return tls.shutdown().await;
        }
        count_bytes(ctx, conn, n, request);
        let r = tls.write_all(&buf).await;
        ctx.pool.put(buf);
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
