//! One connection's life: route, authorize (the chosen chain's RBAC, SPEC §9), connect
//! upstream, run the peer exchange, copy both halves, propagate half-close and reset, and count
//! it (SPEC §1, §2).
//!
//! A read takes a buffer from the pool only for one non-blocking recv(2), and waits for
//! readiness without a buffer once a read would block, so an idle connection holds no buffer;
//! a read that fills the whole buffer marks a bulk flow, which then moves by splice(2) without
//! passing through user space.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::access_log::writer as access_log;
use crate::backoff;
use crate::capture::{self, Decision};
use crate::config::{Capture, Direction, Listener, PeerExchange};
use crate::conn::{Captured, Conn, WorkerCtx, settle};
use crate::exchange::{NodeMetadata, Parser, Status};
use crate::metrics::ExchangeOutcome;
use crate::routing::Target;
use crate::routing::chains::ConnFacts;
use crate::snapshot::Snapshot;
use crate::socket;

mod mtls;

/// Why a connection ended early; each maps to Envoy's response flag where it has one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No route to a cluster (`NR`).
    #[error("no route")]
    NoRoute,
    /// Every endpoint tried refused or timed out (`UF`).
    #[error("upstream connect failed: {0}")]
    Connect(io::Error),
    /// No endpoint, or every one ejected and still down when tried again (`UH`).
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// The peer's preamble was broken (too large or undecodable).
    #[error("broken preamble: {0}")]
    Preamble(crate::exchange::Invalid),
    /// A preamble begun was not finished within exchange_timeout.
    #[error("exchange timeout")]
    ExchangeTimeout,
    /// A captured connection's original destination was the proxy's own listener (`UH`,
    /// as Istio's BlackHoleCluster has no hosts).
    #[error("captured connection to the proxy's own listener refused (loop)")]
    Loop,
    /// An inbound mTLS handshake was refused (counted in `ringside_tls_refused_total`, not
    /// as an istio_tcp connection: no peer, no application byte).
    #[error("tls handshake refused")]
    Refused,
    /// The chosen chain's RBAC filters denied the connection (SPEC §9): closed before any
    /// byte reached an upstream, counted in `ringside_rbac_denied_total`. Envoy's network RBAC
    /// sets no response flag (only termination details), so neither does ringside.
    #[error("rbac: denied")]
    Denied,
    /// A socket error; the other side is reset.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Error {
    fn response_flags(&self) -> &'static str {
        match self {
            Error::NoRoute => "NR",
            Error::Connect(_) => "UF",
            Error::Loop => "UH",
            Error::NoHealthyUpstream => "UH",
            _ => "-",
        }
    }
}

/// Over the listener's connection limit: accept and close at once, counted with `UO`.
pub fn over_limit(ctx: &WorkerCtx, snapshot: Rc<Snapshot>, li: usize, acceptor: u64, down: TcpStream) {
    let conn = ctx.open(snapshot, li, acceptor);
    // Label it with the cluster it would have gone to (no endpoint), so destination_service is
    // the listener's service, as for UF.
    if let Some(target) = conn.snapshot.router.route(li) {
        conn.upstream.set(Some((target.cluster, None)));
    }
    ctx.metrics.borrow().count_listener_overflow();
    settle(ctx, &conn, None, "UO");
    ctx.close(&conn);
    drop(down);
}

/// Serve one accepted connection to its end.
/// Under `snapshot` (listener `li` of it), which the connection keeps for its life.
pub async fn serve(ctx: Rc<WorkerCtx>, snapshot: Rc<Snapshot>, li: usize, acceptor: u64, down: TcpStream) {
    let conn = ctx.open(snapshot, li, acceptor);
    let result = relay(&ctx, li, &conn, down).await;
    match &result {
        Err(Error::Refused) => {}
        Err(e) => {
            log::debug!("listener {}: {e}", conn.snapshot.config.listeners[li].name);
            settle(&ctx, &conn, None, e.response_flags());
        }
        Ok(()) => settle(&ctx, &conn, None, "-"),
    }
    let flags = result.as_ref().err().map_or("-", Error::response_flags);
    crate::access_log::writer::connection_ended(&conn, flags);
    if let Some((c, Some(e))) = conn.upstream.get() {
        conn.snapshot.router.disconnected(c, e);
    }
    ctx.close(&conn);
    conn.snapshot.live[li].fetch_sub(1, Ordering::AcqRel);
}

async fn relay(ctx: &WorkerCtx, li: usize, conn: &Conn, down: TcpStream) -> Result<(), Error> {
    // Boxed: what comes before the copy (TLS, the chain, connecting, the exchange) holds
    // timers (monoio's are 640 bytes, cache-aligned) and handshake state that an idle,
    // established connection should not carry for the rest of its life. Freed once the
    // connection relays, it leaves the task only the copy's state.
    match Box::pin(set_up(ctx, li, conn, down)).await? {
        Some((down, up)) => copy_both(ctx, conn, down, up).await,
        None => Ok(()),
    }
}

/// Everything before the copy: the sockets to copy between once the peer is settled, or
/// `None` when the connection was served here (mTLS) or closed (cancelled).
async fn set_up(
    ctx: &WorkerCtx,
    li: usize,
    conn: &Conn,
    down: TcpStream,
) -> Result<Option<(TcpStream, TcpStream)>, Error> {
    let listener = &conn.snapshot.config.listeners[li];
    // An mTLS listener (SPEC §7) serves the connection in `mtls`, unless `permissive` found a
    // plaintext client, which continues here. The certificates are the snapshot's, by the
    // same index as its config.
    let mut down = match &conn.snapshot.tls.listeners[li] {
        Some(slot) => match mtls::serve_inbound(ctx, li, conn, slot, down).await? {
            Some(plain) => plain,
            None => return Ok(None),
        },
        None => down,
    };
    // Filter chains (SPEC §9): one is chosen per connection, by its destination and, where a
    // chain asks for a transport protocol or ALPN (Envoy's tls_inspector), its ClientHello,
    // peeked. A chain with a DownstreamTlsContext terminates TLS in `mtls`.
    if !listener.filter_chains.is_empty() {
        let dst = match listener.capture {
            Capture::None => down.local_addr()?,
            _ => capture::original_dst(&down, listener.listen).or_else(|_| down.local_addr())?,
        };
        let index = conn.snapshot.router.chain_index(li);
        // Peeked only where an inspector runs for this port and the chains competing for this
        // destination differ by what it would find: a server-first protocol on a plain TCP
        // port never waits.
        let what = index.map(|x| x.inspection(dst)).unwrap_or_default();
        let inspected = match what.tls || what.http {
            false => mtls::Inspected::default(),
            true => monoio::select! {
                r = mtls::inspect(ctx, &down, listener.limits.sniff_timeout.0, what) => r?,
                _ = conn.cancel.wait() => {
                    cut(conn, down, None);
                    return Ok(None);
                }
            },
        };
        let hello = inspected.hello;
        // The client's address costs a syscall: asked only when a chain matches on it.
        let source = match index.is_some_and(|x| x.uses_source()) {
            true => down.peer_addr()?,
            false => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let facts = match &hello {
            None => ConnFacts {
                destination: dst,
                source,
                transport: "raw_buffer",
                server_name: None,
                // What `http_inspector` found stands for ALPN, as Envoy sets it.
                alpn: inspected.http.map_or(&[][..], crate::routing::http_sniff::application_protocols),
            },
            Some(h) => ConnFacts {
                destination: dst,
                source,
                transport: "tls",
                server_name: h.server_name.as_deref(),
                alpn: &h.alpn,
            },
        };
        let chain = conn.snapshot.router.select_chain(li, &listener.filter_chains, &facts);
        conn.chain.set(chain);
        if access_log::logged(conn) {
            let remote = match facts.source.port() {
                0 => down.peer_addr().ok(),
                _ => Some(facts.source),
            };
            access_log::note_downstream(conn, remote, dst, facts.server_name);
        }
        // A capture listener routes by original destination, but only what a chain takes and
        // serves (an HTTP chain's connections too: relayed as TCP); a chain that is not served
        // closes its connections (`NR`), in every listener.
        let served =
            chain.and_then(|c| listener.filter_chains.get(c)).is_some_and(|c| c.not_served.is_none());
        if !served && (chain.is_some() || listener.capture != Capture::None) {
            drop(down);
            return Err(Error::NoRoute);
        }
        let slots = conn.snapshot.tls.chains.get(li);
        if let Some(slot) = chain.and_then(|c| slots?.get(c)?.as_ref()) {
            mtls::serve_inbound(ctx, li, conn, slot, down).await?;
            return Ok(None);
        }
        // A plaintext chain's RBAC, before connecting (a TLS chain's runs after its handshake).
        if let Some(c) = chain {
            let source = match facts.source.port() {
                0 => None,
                _ => Some(facts.source),
            };
            authorize(ctx, li, conn, c, &down, dst, source, None)?;
        }
    }
    if listener.filter_chains.is_empty() && access_log::logged(conn) {
        let local = match listener.capture {
            Capture::None => down.local_addr()?,
            _ => capture::original_dst(&down, listener.listen).or_else(|_| down.local_addr())?,
        };
        access_log::note_downstream(conn, down.peer_addr().ok(), local, None);
    }
    // Connecting and the exchange borrow the sockets rather than own them, so a cancel (idle
    // timeout, drain deadline) leaves them here to be closed the way the cancel asks.
    let connected = monoio::select! {
        r = connect_any(ctx, li, conn, listener, &down) => Some(r?),
        _ = conn.cancel.wait() => None,
    };
    let Some(mut up) = connected else {
        cut(conn, down, None);
        return Ok(None);
    };
    if access_log::logged(conn) {
        access_log::note_upstream(conn, up.local_addr().ok());
    }
    // An mTLS cluster (SPEC §7): the TLS client, the exchange inside it and the copy.
    if let Some(slot) = upstream_tls(conn) {
        return mtls::serve_outbound(ctx, listener, conn, down, up, slot).await.map(|()| None);
    }
    // The downstream inherits TCP_NODELAY from its listener socket.
    let _ = up.set_nodelay(true);
    let exchanged = monoio::select! {
        r = exchange(ctx, listener, conn, &mut down, &mut up) => Some(r),
        _ = conn.cancel.wait() => None,
    };
    match exchanged {
        Some(Ok(peer)) => {
            settle(ctx, conn, peer.as_ref(), "-");
            Ok(Some((down, up)))
        }
        Some(Err(e)) => {
            // A broken exchange: reset both sides.
            socket::reset(down);
            socket::reset(up);
            Err(e)
        }
        None => {
            cut(conn, down, Some(up));
            Ok(None)
        }
    }
}

/// The chosen chain's RBAC filters (SPEC §9), evaluated once, before any byte of the
/// connection reaches an upstream: `Err(Denied)` closes it (dropped: close(2), as Envoy's
/// network RBAC closes without flushing — a FIN, or a RST when the client's bytes wait
/// unread). Counted opened and closed in istio_tcp_* as the chain says, destination_service
/// named by the chain's route, and in `ringside_rbac_denied_total`. Allocates nothing; the
/// client's address is asked of the socket only when the chain has RBAC filters and the
/// caller did not have it.
#[allow(clippy::too_many_arguments)]
fn authorize(
    ctx: &WorkerCtx,
    li: usize,
    conn: &Conn,
    chain: usize,
    down: &TcpStream,
    destination: std::net::SocketAddr,
    source: Option<std::net::SocketAddr>,
    tls: Option<crate::rbac::Tls<'_>>,
) -> Result<(), Error> {
    let listener = &conn.snapshot.config.listeners[li];
    let Some(filters) = listener.filter_chains.get(chain).map(|c| &c.rbac).filter(|f| !f.is_empty()) else {
        return Ok(());
    };
    let source = match source {
        Some(s) => s,
        None => down.peer_addr()?,
    };
    let rc = crate::rbac::Conn { source, destination, tls };
    for f in filters {
        if let crate::rbac::Decision::Deny(why) = f.evaluate(&rc) {
            log::debug!("listener {}: {source} -> {destination}: {why}", listener.name);
            if access_log::logged(conn) {
                // Envoy's network RBAC: the DENY policy that matched, else `none`.
                let policy = match why {
                    crate::rbac::Denial::Policy(name) => name,
                    _ => "none",
                };
                access_log::note_termination(conn, format!("rbac_access_denied_matched_policy[{policy}]"));
            }
            ctx.metrics.borrow().count_rbac_denied();
            if let Some(t) = conn.snapshot.router.route_chain(li, chain) {
                conn.upstream.set(Some((t.cluster, None)));
            }
            return Err(Error::Denied);
        }
    }
    Ok(())
}

/// The TLS client config of the cluster the connection was routed to, when it speaks TLS to
/// the chosen endpoint (an xDS cluster picks it per endpoint: Istio's `tlsMode-istio`).
fn upstream_tls(conn: &Conn) -> Option<&crate::tls::Slot> {
    let (c, e) = conn.upstream.get()?;
    let slot = conn.snapshot.tls.clusters.get(c)?.as_ref()?;
    let cluster = conn.snapshot.config.clusters.get(c)?;
    let tls = cluster.tls.as_ref()?;
    match e.and_then(|e| cluster.endpoints.get(e)) {
        Some(endpoint) => tls.applies_to(endpoint).then_some(slot),
        None => (tls.endpoint_matches.is_empty() && !tls.unmatched_plaintext).then_some(slot),
    }
}

/// Close a connection cancelled before it was relaying: gracefully after an idle timeout, with
/// a reset at the drain deadline (as `copy_both` does), so a peer never mistakes a cut-off
/// exchange for a finished one.
fn cut(conn: &Conn, down: TcpStream, up: Option<TcpStream>) {
    if conn.idle_expired.get() {
        return; // dropping closes with FIN
    }
    socket::reset(down);
    if let Some(up) = up {
        socket::reset(up);
    }
}

/// Run the peer exchange the listener asks for; the peer, if it is a mesh peer.
async fn exchange(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Option<NodeMetadata>, Error> {
    // A passthrough destination is not known to be a mesh peer: writing a preamble to it
    // would put bytes in front of its protocol (Istio's PassthroughCluster has no exchange).
    let mode = match conn.captured.get() {
        Some(Captured::Passthrough(_)) => PeerExchange::Off,
        _ => listener.peer_exchange,
    };
    match (mode, listener.direction) {
        (PeerExchange::Always, direction) => {
            // A preamble split across reads is gathered in a pool buffer (copied once).
            let mut parser = Parser::with_buffer(listener.limits.max_preamble.0, ctx.pool.take());
            let peer = match direction {
                Direction::Outbound => exchange_outbound(ctx, listener, conn, &mut parser, down, up).await,
                Direction::Inbound => exchange_inbound(ctx, listener, conn, &mut parser, down, up).await,
            };
            ctx.pool.put(parser.into_buffer());
            peer
        }
        (PeerExchange::Alpn, _) => {
            // Plaintext has no ALPN, so Istio's filter does not exchange (alpn_protocol_not_found).
            ctx.metrics.borrow().count_exchange(ExchangeOutcome::AlpnProtocolNotFound);
            Ok(None)
        }
        (PeerExchange::Off, _) => Ok(None),
    }
}

/// Connect as the listener says: by its route, or by the original destination of a captured
/// connection.
async fn connect_any(
    ctx: &WorkerCtx,
    li: usize,
    conn: &Conn,
    listener: &Listener,
    down: &TcpStream,
) -> Result<TcpStream, Error> {
    match listener.capture {
        Capture::None if !listener.filter_chains.is_empty() => {
            // The chain `relay` chose (SPEC §9).
            let chain = conn.chain.get();
            let target = chain.and_then(|c| conn.snapshot.router.route_chain(li, c)).ok_or(Error::NoRoute)?;
            connect(li, conn, listener, down, Some(target)).await
        }
        Capture::None => connect(li, conn, listener, down, None).await,
        _ => connect_captured(ctx, li, conn, listener, down).await,
    }
}

/// A captured connection: where its original destination says (SPEC §8), read once here.
async fn connect_captured(
    ctx: &WorkerCtx,
    li: usize,
    conn: &Conn,
    listener: &Listener,
    down: &TcpStream,
) -> Result<TcpStream, Error> {
    let dst = capture::original_dst(down, listener.listen).or_else(|_| down.local_addr())?;
    let timeout = listener.limits.connect_timeout.0;
    match capture::decide(listener.capture, dst, &conn.snapshot.config.listeners, &conn.snapshot.router) {
        Decision::Refuse => {
            conn.captured.set(Some(Captured::BlackHole));
            ctx.metrics.borrow().count_capture_loop();
            Err(Error::Loop)
        }
        Decision::Cluster(target) => connect(li, conn, listener, down, Some(target)).await,
        Decision::Passthrough(dst) => {
            conn.captured.set(Some(Captured::Passthrough(dst)));
            match monoio::time::timeout(timeout, TcpStream::connect_addr(dst)).await {
                Ok(r) => r.map_err(Error::Connect),
                Err(_) => Err(Error::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect {dst}: timed out"),
                ))),
            }
        }
        Decision::Local(dst) => {
            // The chain's (else the listener's) cluster, if any, only names
            // destination_service: istiod's inbound clusters carry the service.
            let router = &conn.snapshot.router;
            let named = conn.chain.get().and_then(|c| router.route_chain(li, c)).or_else(|| router.route(li));
            if let Some(t) = named {
                conn.upstream.set(Some((t.cluster, None)));
            }
            capture::connect_from(capture::inbound_source(dst), dst, timeout).await.map_err(Error::Connect)
        }
    }
}

/// Route (unless `target` is given) and connect, trying other endpoints when one refuses or
/// times out, at most `max_connect_attempts` of them (the chain's tcp_proxy, else the
/// listener's limit) and all within one `connect_timeout`: a black-holed cluster costs a
/// client one timeout, not one per endpoint. A failed endpoint is ejected for a while
/// (SPEC §6), so the next connections do not wait on it. An ORIGINAL_DST cluster's one
/// upstream is the connection's original destination; a cluster with
/// `upstream_bind_config` connects from its source address (SPEC §9).
async fn connect(
    li: usize,
    conn: &Conn,
    listener: &Listener,
    down: &TcpStream,
    target: Option<Target>,
) -> Result<TcpStream, Error> {
    let target = match target {
        Some(t) => t,
        None => conn.snapshot.router.route(li).ok_or(Error::NoRoute)?,
    };
    conn.upstream.set(Some((target.cluster, None)));
    let router = &conn.snapshot.router;
    let cluster = &router.clusters[target.cluster];
    // The router's clusters are the config's, in the same order.
    let bind_source = conn.snapshot.config.clusters.get(target.cluster).and_then(|c| c.bind_source);
    if conn.snapshot.config.clusters.get(target.cluster).is_some_and(|c| c.original_dst) {
        let dst = match listener.capture {
            Capture::None => down.local_addr()?,
            _ => capture::original_dst(down, listener.listen).or_else(|_| down.local_addr())?,
        };
        // A connection that reached a listener directly has itself as its destination:
        // connecting there would loop through this proxy.
        if capture::is_own_listener(dst, &conn.snapshot.config.listeners) {
            return Err(Error::Loop);
        }
        return connect_to(bind_source, dst, listener.limits.connect_timeout.0).await.map_err(Error::Connect);
    }
    let now = Instant::now();
    let healthy = router.healthy(target, now);
    let attempts = conn
        .chain
        .get()
        .and_then(|c| listener.filter_chains.get(c))
        .and_then(|c| c.max_connect_attempts)
        .unwrap_or(listener.limits.max_connect_attempts)
        .max(1);
    let deadline = now + listener.limits.connect_timeout.0;
    let mut last = None;
    for e in router.candidates(target, now).take(attempts as usize) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let addr = cluster.endpoints[e].address;
        if access_log::logged(conn) {
            access_log::note_upstream_host(conn, addr);
        }
        let err = match monoio::time::timeout(left, connect_to(bind_source, addr, left)).await {
            Ok(Ok(s)) => {
                conn.upstream.set(Some((target.cluster, Some(e))));
                router.connected(target.cluster, e);
                return Ok(s);
            }
            // Out of descriptors or memory here, not the endpoint's fault: no ejection,
            // no other endpoint (it would fail alike), no log line per connection. UF.
            Ok(Err(err)) if backoff::is_resource_error(&err) => return Err(Error::Connect(err)),
            Ok(Err(err)) => err,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        };
        // One line when an endpoint is newly ejected, none while it stays ejected (tried as
        // a last resort): at most one per endpoint per ejection period, however many
        // connections find it down.
        let ejection = router.failed(target.cluster, e, Instant::now());
        if ejection.newly {
            log::warn!(
                "cluster {}: endpoint {addr}: connect: {err}; ejected for {}s ({} failure(s) in a row)",
                cluster.name,
                ejection.duration.as_secs(),
                ejection.failures
            );
        }
        last = Some(err);
    }
    // No endpoint at all, or every one was ejected and is still down: no healthy upstream.
    match last {
        Some(err) if healthy => Err(Error::Connect(err)),
        None if healthy => Err(Error::Connect(io::Error::new(io::ErrorKind::TimedOut, "timed out"))),
        _ => Err(Error::NoHealthyUpstream),
    }
}

/// Connect to `dst`, from `source` when a cluster binds one (`connect_from`), within `timeout`.
async fn connect_to(
    source: Option<std::net::IpAddr>,
    dst: std::net::SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match source {
        Some(src) => capture::connect_from(src, dst, timeout).await,
        None => match monoio::time::timeout(timeout, TcpStream::connect_addr(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect {dst}: timed out"))),
        },
    }
}

/// Outbound `always`: write our preamble first, relay the client's bytes meanwhile, and
/// strip the upstream's preamble from the response direction.
async fn exchange_outbound(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    parser: &mut Parser,
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Option<NodeMetadata>, Error> {
    write_preamble(ctx, up).await?;
    let limits = &listener.limits;
    let start = Instant::now();
    let mut begun_at: Option<Instant> = None;
    let mut down_open = true;
    loop {
        let deadline = begun_at.unwrap_or(start) + limits.exchange_timeout.0;
        let wait = deadline.saturating_duration_since(Instant::now());
        monoio::select! {
            r = up.readable(false) => {
                r?;
                let (_, buf) = read(ctx, up).await?;
                match feed(ctx, conn, parser, buf, down, false, None).await? {
                    Verdict::Pending => {
                        begun_at.get_or_insert_with(Instant::now);
                    }
                    Verdict::Settled(peer) => return Ok(peer),
                }
            }
            r = down.readable(false), if down_open => {
                r?;
                let (n, buf) = read(ctx, down).await?;
                if n == 0 {
                    ctx.pool.put(buf);
                    let _ = up.shutdown().await;
                    down_open = false;
                } else {
                    forward(ctx, conn, up, buf, true).await?;
                }
            }
            _ = monoio::time::sleep(wait) => {
                if begun_at.is_some() {
                    count(ctx, ExchangeOutcome::Timeout);
                    return Err(Error::ExchangeTimeout);
                }
                // The upstream said nothing at all: not a mesh peer that answers; stop waiting.
                count(ctx, ExchangeOutcome::InitialHeaderNotFound);
                return Ok(None);
            }
        }
    }
}

/// Inbound `always`: sniff the client's first bytes; answer a valid preamble with ours; pass
/// a non-mesh client through untouched. Upstream bytes wait (in the kernel) until the client
/// is settled, at most sniff_timeout when the client has sent nothing yet.
async fn exchange_inbound(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    parser: &mut Parser,
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Option<NodeMetadata>, Error> {
    let limits = &listener.limits;
    let mut begun_at: Option<Instant> = None;
    let mut upstream_spoke_at: Option<Instant> = None;
    loop {
        let deadline = match (begun_at, upstream_spoke_at) {
            (Some(t), _) => Some(t + limits.exchange_timeout.0),
            (None, Some(t)) => Some(t + limits.sniff_timeout.0),
            (None, None) => None,
        };
        let wait = deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(Instant::now()));
        monoio::select! {
            r = down.readable(false) => {
                r?;
                let (_, buf) = read(ctx, down).await?;
                match feed(ctx, conn, parser, buf, up, true, Some(down)).await? {
                    Verdict::Pending => {
                        begun_at.get_or_insert_with(Instant::now);
                    }
                    Verdict::Settled(peer) => return Ok(peer),
                }
            }
            r = up.readable(false), if upstream_spoke_at.is_none() => {
                r?;
                upstream_spoke_at = Some(Instant::now());
            }
            _ = monoio::time::sleep(wait), if deadline.is_some() => {
                if begun_at.is_some() {
                    count(ctx, ExchangeOutcome::Timeout);
                    return Err(Error::ExchangeTimeout);
                }
                // Server-first application: the client sent nothing, so it is not a mesh peer.
                count(ctx, ExchangeOutcome::InitialHeaderNotFound);
                return Ok(None);
            }
        }
    }
}

/// What the bytes read so far from the preamble side mean.
// Lives for one await inside the (boxed) connection-setup future; boxing the peer would only
// add an allocation per exchange.
#[allow(clippy::large_enum_variant)]
enum Verdict {
    /// A preamble has begun (or nothing decisive yet): read more.
    Pending,
    /// The exchange is over: the peer, or `None` for a non-mesh peer.
    Settled(Option<NodeMetadata>),
}

/// Feed one read (empty: EOF) from the side that carries the peer's preamble. On a verdict, forward the
/// application bytes to `to` (`request`: downstream→upstream), after answering with our own
/// preamble on `answer` (inbound). A broken preamble is an error: the caller resets both.
async fn feed(
    ctx: &WorkerCtx,
    conn: &Conn,
    parser: &mut Parser,
    mut buf: Vec<u8>,
    to: &mut TcpStream,
    request: bool,
    answer: Option<&mut TcpStream>,
) -> Result<Verdict, Error> {
    if buf.is_empty() {
        // The peer half-closed during the exchange: peer unknown; the 1-3 magic bytes it may
        // have sent were application data; relay them, then the FIN.
        ctx.pool.put(buf);
        forward_held(ctx, conn, to, parser.held_prefix(), request).await?;
        let _ = to.shutdown().await;
        count(ctx, ExchangeOutcome::HeaderNotFound);
        return Ok(Verdict::Settled(None));
    }
    match parser.feed(&buf) {
        Status::NeedMore => {
            ctx.pool.put(buf);
            Ok(Verdict::Pending)
        }
        Status::Done { peer, consumed } => {
            if let Some(answer) = answer {
                write_preamble(ctx, answer).await?;
            }
            buf.drain(..consumed.min(buf.len()));
            forward(ctx, conn, to, buf, request).await?;
            count(ctx, ExchangeOutcome::MetadataAdded);
            Ok(Verdict::Settled(Some(peer)))
        }
        Status::NotPresent => {
            forward_held(ctx, conn, to, parser.held_prefix(), request).await?;
            forward(ctx, conn, to, buf, request).await?;
            count(ctx, ExchangeOutcome::InitialHeaderNotFound);
            Ok(Verdict::Settled(None))
        }
        Status::Invalid(e) => {
            ctx.pool.put(buf);
            count(ctx, ExchangeOutcome::Invalid);
            Err(Error::Preamble(e))
        }
    }
}

/// Write our encoded preamble (copied into a pool buffer: monoio writes owned buffers).
async fn write_preamble(ctx: &WorkerCtx, to: &mut TcpStream) -> io::Result<()> {
    let mut buf = ctx.pool.take();
    buf.extend_from_slice(&ctx.preamble);
    let (res, buf) = to.write_all(buf).await;
    ctx.pool.put(buf);
    res.map(drop)
}

fn count(ctx: &WorkerCtx, outcome: ExchangeOutcome) {
    ctx.metrics.borrow().count_exchange(outcome);
}

async fn read(ctx: &WorkerCtx, s: &mut TcpStream) -> io::Result<(usize, Vec<u8>)> {
    let (res, buf) = s.read(ctx.pool.take()).await;
    match res {
        Ok(n) => Ok((n, buf)),
        Err(e) => {
            ctx.pool.put(buf);
            Err(e)
        }
    }
}

/// Write application bytes read during the exchange, counting them by direction.
async fn forward(
    ctx: &WorkerCtx,
    conn: &Conn,
    to: &mut TcpStream,
    buf: Vec<u8>,
    request: bool,
) -> io::Result<()> {
    let n = buf.len() as u64;
    if n == 0 {
        ctx.pool.put(buf);
        return Ok(());
    }
    let (res, buf) = to.write_all(buf).await;
    ctx.pool.put(buf);
    res?;
    let counter = if request { &conn.received_bytes } else { &conn.sent_bytes };
    counter.set(counter.get() + n);
    conn.last_active.set(ctx.now.get());
    Ok(())
}

/// The 1-3 magic bytes a non-mesh peer happened to start with, absorbed before the mismatch.
async fn forward_held(
    ctx: &WorkerCtx,
    conn: &Conn,
    to: &mut TcpStream,
    held: &[u8],
    request: bool,
) -> io::Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    let mut buf = ctx.pool.take();
    buf.extend_from_slice(held);
    forward(ctx, conn, to, buf, request).await
}

/// Copy both directions until both ended; on an error in either, reset both sides. Fired
/// by the tick, `conn.cancel` ends it too: gracefully (FIN) after an idle timeout, with a
/// reset at the drain deadline, so a peer never mistakes a cut-off transfer for a whole one.
async fn copy_both(ctx: &WorkerCtx, conn: &Conn, down: TcpStream, up: TcpStream) -> Result<(), Error> {
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
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
        if !ready {
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
