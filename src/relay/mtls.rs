//! The pipeline's TLS steps (SPEC §7): terminate inbound (and, in `permissive`, the
//! ClientHello sniff), a chain's `tls_inspector` peek, originate outbound, and the peer
//! exchange inside TLS (mode `alpn`: only when ALPN resolved to `istio-peer-exchange`). Each
//! returns to the pipeline in `relay`; the copy is `relay::side`'s. The rustls side lives in
//! `crate::tls`.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use super::side::Side;
use super::{Error, Verdict, authorize, count, feed};
use crate::capture;
use crate::config::{Capture, Listener, ListenerTlsMode, PeerExchange};
use crate::conn::{Conn, Security, WorkerCtx};
use crate::exchange::{NodeMetadata, Parser};
use crate::metrics::{ExchangeOutcome, TlsHandshake, TlsRefused};
use crate::snapshot::Snapshot;
use crate::socket;
use crate::tls::Slot;
use crate::tls::hello::ClientHello;
use crate::tls::stream::{Fill, TlsStream};

/// Shortest wait for a permissive client's first bytes (see `accept`).
const PERMISSIVE_SNIFF_MIN: Duration = Duration::from_secs(1);

/// Terminate TLS inbound: sniff in `permissive` (a plaintext client stays a plain side),
/// then require a client certificate signed by the mesh root. A refused client is closed and
/// counted, nothing of it relayed.
pub(super) async fn terminate(
    ctx: &WorkerCtx,
    conn: &Conn,
    listener: &Listener,
    slot: &Slot,
    down: TcpStream,
) -> Result<Side, Error> {
    let permissive = listener.tls.as_ref().is_some_and(|t| t.mode == ListenerTlsMode::Permissive);
    // A TLS client's ClientHello follows its connect at once, but building one (key shares)
    // under load can take longer than the exchange's 20 ms sniff window: wait at least 1 s
    // before deciding a silent client is plaintext. A plaintext server-first protocol behind
    // `permissive` therefore greets after up to 1 s (Istio asks such ports to be declared).
    let window = listener.limits.sniff_timeout.0.max(PERMISSIVE_SNIFF_MIN);
    if permissive && !sniff_client_hello(ctx, &down, window).await? {
        return Ok(Side::Plain(down));
    }
    let (tls, security) = handshake_unsent(ctx, listener, slot, down).await?;
    *conn.security.borrow_mut() = security;
    Ok(Side::Tls(tls))
}

/// The server handshake: a client certificate signed by the mesh root is required. A refused
/// client is counted in `ringside_tls_refused_total`. The principals for istio_tcp_*.
pub(super) async fn handshake(
    ctx: &WorkerCtx,
    listener: &Listener,
    slot: &Slot,
    down: TcpStream,
) -> Result<(TlsStream, Security), Error> {
    let done = handshake_unsent(ctx, listener, slot, down).await?;
    done.0.flush().await?;
    Ok(done)
}

/// `handshake`, its last flight (the session tickets) left queued for `exchange`, which
/// sends it with the preamble or on its own.
async fn handshake_unsent(
    ctx: &WorkerCtx,
    listener: &Listener,
    slot: &Slot,
    down: TcpStream,
) -> Result<(TlsStream, Security), Error> {
    let config = slot.current();
    let Some(server) = config.server.clone() else { return Err(Error::Refused) };
    let tls = TlsStream::server(down, server)?;
    let reason =
        match monoio::time::timeout(listener.limits.connect_timeout.0, tls.handshake_unsent(&ctx.pool)).await
        {
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
    let security = Security {
        local_principal: config.local_principal.clone(),
        peer_principal: tls.peer_principal(&ctx.principals),
        // A chain that does not require a client certificate terminates plain TLS for a
        // client without one: `mutual_tls` only when it presented one (SPEC §9).
        mutual_tls: tls.peer_presented_certificate(),
    };
    Ok((tls, security))
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

/// A TLS chain's RBAC (SPEC §9), once the handshake is done: the peer certificate's names as
/// Envoy matches principals (every URI SAN, then DNS SANs, then the subject) and the SNI it
/// asked for. Only chains with RBAC filters read the certificate and ask the socket for the
/// connection's addresses.
pub(super) fn check_rbac(
    ctx: &WorkerCtx,
    snapshot: &Snapshot,
    li: usize,
    conn: &Conn,
    tls: &TlsStream,
) -> Result<(), Error> {
    let listener = &conn.listener;
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
        authorize(ctx, snapshot, li, conn, c, tcp, dst, None, Some(t))
    })
}

/// Originate TLS to a connected upstream with the cluster's config. A failed handshake is an
/// upstream failure (`UF`).
pub(super) async fn originate(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    up: TcpStream,
    slot: &Slot,
) -> Result<TlsStream, Error> {
    // The server's flight is answered at once by ours: its ACK rides on our Finished.
    let _ = socket::delay_acks(&up, true);
    let (tls, security) = client_handshake_unsent(ctx, listener.limits.connect_timeout.0, up, slot).await?;
    *conn.security.borrow_mut() = security;
    Ok(tls)
}

/// The client handshake with `slot`'s config, the server's SPIFFE id checked, within
/// `timeout`; the principals for istio_tcp_*.
pub(super) async fn client_handshake(
    ctx: &WorkerCtx,
    timeout: Duration,
    up: TcpStream,
    slot: &Slot,
) -> Result<(TlsStream, Security), Error> {
    // `originate`'s upstream has it already (the pipeline sets it on every plain upstream).
    let _ = up.set_nodelay(true);
    let done = client_handshake_unsent(ctx, timeout, up, slot).await?;
    done.0.flush().await.map_err(Error::Connect)?;
    Ok(done)
}

/// `client_handshake`, its last flight (Certificate, CertificateVerify, Finished) left
/// queued for `exchange`, which sends it with the preamble or on its own.
async fn client_handshake_unsent(
    ctx: &WorkerCtx,
    timeout: Duration,
    up: TcpStream,
    slot: &Slot,
) -> Result<(TlsStream, Security), Error> {
    let config = slot.current();
    // The endpoint's IP names the server only without a service host: a getpeername fewer
    // per connection for every mesh cluster.
    let ip = match config.server_name {
        Some(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        None => up.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let tls = TlsStream::client(up, &config, ip).map_err(Error::Connect)?;
    match monoio::time::timeout(timeout, tls.handshake_unsent(&ctx.pool)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Connect(e)),
        Err(_) => {
            return Err(Error::Connect(io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out")));
        }
    }
    count_handshake(ctx, &tls, false);
    let security = Security {
        local_principal: config.local_principal.clone(),
        peer_principal: tls.peer_principal(&ctx.principals),
        mutual_tls: true,
    };
    // An upstream's certificate is read only for its principal (idle memory).
    tls.forget_peer_certificate();
    Ok((tls, security))
}

/// The exchange inside TLS (mode `alpn`: only when ALPN resolved to `istio-peer-exchange`),
/// or none. `tls_is_down`: the TLS side is the downstream (inbound), else the upstream. A
/// broken exchange is an error: the caller resets both sides. Sends the handshake's last
/// flight (`terminate` and `originate` leave it queued), with the preamble when there is one.
pub(super) async fn exchange(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    plain: &mut TcpStream,
    tls: &TlsStream,
    tls_is_down: bool,
) -> Result<Option<Rc<NodeMetadata>>, Error> {
    if listener.peer_exchange == PeerExchange::Off {
        tls.flush().await?;
        return Ok(None);
    }
    if !tls.alpn_is_peer_exchange() {
        tls.flush().await?;
        count(ctx, ExchangeOutcome::AlpnProtocolNotFound);
        return Ok(None);
    }
    count(ctx, ExchangeOutcome::AlpnProtocolFound);
    let mut parser = Parser::with_peers(listener.limits.max_preamble.0, ctx.pool.take(), &ctx.peers);
    let peer = exchange_alpn(ctx, listener, conn, &mut parser, plain, tls, tls_is_down).await;
    ctx.pool.put(parser.into_buffer());
    peer
}

/// Both sides write their preamble at once after the handshake (SPEC §2, mode `alpn`), then
/// strip the peer's from the TLS side. Outbound, the client's bytes flow meanwhile; inbound,
/// an upstream that speaks first (server-first protocol) makes us wait for the client's
/// preamble at most `sniff_timeout`.
async fn exchange_alpn(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    parser: &mut Parser<'_>,
    plain: &mut TcpStream,
    tls: &TlsStream,
    tls_is_down: bool,
) -> Result<Option<Rc<NodeMetadata>>, Error> {
    let request = tls_is_down; // bytes from the TLS side go downstream→upstream
    tls.queue(&ctx.preamble).await?;
    let mut plain_open = true;
    if !request {
        // Outbound: a client-first protocol's first bytes followed its connect and have
        // waited a TLS round trip in the socket: they leave with the handshake's last flight
        // and the preamble, one send and one segment (one wake-up of the peer) for all
        // three. A server-first client costs one recv that finds nothing.
        plain_open = relay_plain_to_tls(ctx, conn, plain, tls).await?;
        tls.flush().await?;
    } else {
        // Inbound: the ticket and the preamble wait in the socket for the application's
        // first answer and leave in its segment (a request-response exchange: one segment and
        // one wake-up of the peer fewer). An application that stays silent lets the kernel
        // send them after 200 ms, well within the peer's exchange timeout.
        tls.flush_more().await?;
    }
    let limits = &listener.limits;
    let start = Instant::now();
    let mut begun_at: Option<Instant> = None;
    let mut plain_spoke_at: Option<Instant> = None;
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
                    tls.flush().await?;
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

/// Seal what the plaintext side has now into TLS's send queue (the caller flushes); false
/// once it reached EOF (then TLS is half-closed, the queue sent).
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
            super::side::count_bytes(ctx, conn, n, true);
            let r = tls.queue(&buf).await;
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
