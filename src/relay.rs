//! One connection's life as one pipeline (SPEC §1, §2, §7, §9): accept → terminate TLS? →
//! pick a chain → authorize (its RBAC) → route and connect → originate TLS? → peer exchange →
//! copy both halves (half-close and reset passed on) → settle and count. Each step is written
//! once over `side::Side`, which hides what carries a side; the TLS steps are in `mtls`,
//! the copy loops in `side`.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::access_log::writer as access_log;
use crate::backoff;
use crate::capture::{self, Decision};
use crate::config::{Capture, Direction, Listener, PeerExchange};
use crate::conn::{Captured, Conn, WorkerCtx, settle};
use crate::exchange::{NodeMetadata, Parser, Status};
use crate::metrics::{ExchangeOutcome, HboneRefused};
use crate::routing::Target;
use crate::routing::chains::ConnFacts;
use crate::snapshot::Snapshot;
use crate::socket;

mod hbone;
mod mtls;
mod side;

use side::Side;

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
    /// An HBONE CONNECT was answered with a refusal (400) before anything was relayed: not
    /// an istio_tcp connection.
    #[error("hbone: {0}")]
    BadRequest(&'static str),
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
pub fn over_limit(ctx: &WorkerCtx, snapshot: &Snapshot, li: usize, acceptor: u64, down: TcpStream) {
    let conn = ctx.open(Arc::clone(&snapshot.config.listeners[li]), snapshot.generation, acceptor);
    // Label it with the cluster it would have gone to (no endpoint), so destination_service is
    // the listener's service, as for UF.
    if let Some(target) = snapshot.router.route(li) {
        conn.routed(&snapshot.router, target.cluster, None);
    }
    ctx.metrics.borrow().count_listener_overflow();
    settle(ctx, &conn, None, "UO");
    ctx.close(&conn);
    drop(down);
}

/// Serve one accepted connection to its end, set up under `snapshot` (listener `li` of it),
/// which it drops once connected: a live connection keeps its listener, its cluster and the
/// listener's live counter, not its generation (SPEC §11).
pub async fn serve(ctx: Rc<WorkerCtx>, snapshot: Rc<Snapshot>, li: usize, acceptor: u64, down: TcpStream) {
    let live = Arc::clone(&snapshot.live[li]);
    let listener = Arc::clone(&snapshot.config.listeners[li]);
    if listener.tunnel.is_some() {
        // An HBONE terminator's connection carries many: it keeps its listener's TLS slot,
        // and each CONNECT stream is set up by `serve_stream` under the snapshot current
        // when it opens (SPEC §12).
        let slot = snapshot.tls.listeners[li].clone();
        drop(snapshot);
        // Boxed: its timers are 128-byte aligned (monoio's), and inline they would align
        // every connection's task to 128 bytes, which mimalloc serves from a size class
        // above the task's size (issue 31).
        let _ = Box::pin(hbone::serve_carrier(ctx, listener, slot, acceptor, down)).await;
    } else {
        let conn = ctx.open(listener, snapshot.generation, acceptor);
        let result = relay(&ctx, snapshot, li, &conn, down).await;
        end(&ctx, &conn, result);
    }
    live.fetch_sub(1, Ordering::AcqRel);
}

/// One CONNECT stream of an HBONE terminator (SPEC §12), counted as one connection: check
/// its `:authority`, connect to it, answer (200 only once connected), copy, count.
pub(crate) async fn serve_stream(
    ctx: Rc<WorkerCtx>,
    listener: Arc<Listener>,
    acceptor: u64,
    req: hbone::Request,
) {
    let conn = ctx.open(listener, ctx.snapshot().generation, acceptor);
    *conn.security.borrow_mut() = req.security.clone();
    let result = match Box::pin(set_up_stream(&ctx, &conn, req)).await {
        Ok(Some((down, up))) => side::copy_both(&ctx, &conn, down, up).await,
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    end(&ctx, &conn, result);
}

/// A terminator's stream up to the copy (ztunnel's rules, SPEC §12): the `:authority` must be
/// `IP:port` with the IP the carrier arrived on and a port that is not one of the proxy's
/// own (else 400; the ports of the configuration current when the stream opens); connect to
/// it, then `200` with our baggage (503 when refused). The peer's labels come from its
/// baggage.
async fn set_up_stream(
    ctx: &WorkerCtx,
    conn: &Conn,
    req: hbone::Request,
) -> Result<Option<(Side, Side)>, Error> {
    let listener = &conn.listener;
    let hbone::Request { tunnel, authority, headers, local, .. } = req;
    let target = match check_authority(&authority, local, &ctx.snapshot().config) {
        Ok(t) => t,
        Err(why) => {
            log::debug!("listener {}: hbone: CONNECT {authority}: {why}", listener.name);
            ctx.metrics.borrow().count_hbone_refused(HboneRefused::BadRequest);
            tunnel.respond(400, &[])?;
            return Err(Error::BadRequest(why));
        }
    };
    let connected = monoio::select! {
        r = socket::connect(target, None, listener.limits.connect_timeout.0) => Some(r),
        _ = conn.cancel.wait() => None,
    };
    let up = match connected {
        Some(Ok(up)) => up,
        Some(Err(e)) => {
            ctx.metrics.borrow().count_hbone_refused(HboneRefused::UpstreamUnavailable);
            tunnel.respond(503, &[])?;
            return Err(Error::Connect(e));
        }
        None => {
            cut(conn, Side::Tunnel(tunnel), None);
            return Ok(None);
        }
    };
    let _ = up.set_nodelay(true);
    let ours = crate::hbone::baggage::encode(&ctx.node);
    tunnel.respond(200, &[("baggage", ours.as_bytes())])?;
    let peer = crate::hbone::baggage::decode(
        headers.iter().filter(|(name, _)| name == "baggage").map(|(_, value)| value.as_slice()),
    );
    settle(ctx, conn, Some(&peer), "-");
    Ok(Some((Side::Tunnel(tunnel), Side::Plain(up))))
}

/// Where a terminator's CONNECT may go: `IP:port`, the IP the carrier arrived on, and not a
/// port of the proxy's own (its listeners, admin, metrics, health): a client must not reach
/// the proxy itself through the tunnel (ztunnel answers 400).
fn check_authority(
    authority: &str,
    local: std::net::SocketAddr,
    config: &crate::config::Config,
) -> Result<std::net::SocketAddr, &'static str> {
    let target: std::net::SocketAddr = authority.parse().map_err(|_| ":authority is not IP:port")?;
    if target.ip() != local.ip() {
        return Err(":authority is not the address the connection arrived on");
    }
    let services = [config.admin.listen.0, config.metrics.listen.0, config.health.listen.0];
    let own =
        config.listeners.iter().map(|l| l.listen.port()).chain(services.iter().flatten().map(|a| a.port()));
    if own.into_iter().any(|p| p == target.port()) {
        return Err(":authority is one of the proxy's own ports");
    }
    Ok(target)
}

/// Settle and close a served connection: count it as the result says, free its endpoint.
fn end(ctx: &WorkerCtx, conn: &Conn, result: Result<(), Error>) {
    match &result {
        Err(Error::Refused | Error::BadRequest(_)) => {}
        Err(e) => {
            log::debug!("listener {}: {e}", conn.listener.name);
            settle(ctx, conn, None, e.response_flags());
        }
        Ok(()) => settle(ctx, conn, None, "-"),
    }
    let flags = result.as_ref().err().map_or("-", Error::response_flags);
    access_log::connection_ended(conn, flags);
    ctx.disconnected(conn);
    ctx.close(conn);
}

fn relay<'a>(
    ctx: &'a Rc<WorkerCtx>,
    snapshot: Rc<Snapshot>,
    li: usize,
    conn: &'a Conn,
    down: TcpStream,
) -> impl Future<Output = Result<(), Error>> + 'a {
    // Boxed: what comes before the copy (TLS, the chain, connecting, the exchange) holds
    // timers (monoio's are 640 bytes, cache-aligned), handshake state and the snapshot that
    // an idle, established connection should not carry for the rest of its life. Freed once
    // the connection relays, it leaves the task only the copy's state. Made before the
    // `async` block (not an `async fn`), so the snapshot and the socket go straight into the
    // box and keep no place in the task.
    let set_up = Box::pin(set_up(ctx, snapshot, li, conn, down));
    async move {
        // The copy is made before it is awaited, so the sides live in its state only, not in
        // this future's too.
        let copy = match set_up.await? {
            Some((down, up)) => side::copy_both(ctx, conn, down, up),
            None => return Ok(()),
        };
        copy.await
    }
}

/// The pipeline up to the copy: terminate TLS? → pick a chain (peeking a ClientHello where
/// chains differ by it; a chain may terminate TLS) → authorize → connect → originate TLS? →
/// exchange. The two sides to copy between once the peer is settled (and the connection
/// counted), or `None` when it was closed here (cancelled). `snapshot` is read up to the
/// connect and dropped before the exchange, which may wait on the peer.
async fn set_up(
    ctx: &Rc<WorkerCtx>,
    snapshot: Rc<Snapshot>,
    li: usize,
    conn: &Conn,
    down: TcpStream,
) -> Result<Option<(Side, Side)>, Error> {
    let listener = &conn.listener;
    // An mTLS listener (SPEC §7) terminates TLS first, unless `permissive` found a plaintext
    // client. The certificates are the snapshot's, by the same index as its config.
    let mut down = match &snapshot.tls.listeners[li] {
        Some(slot) => match terminate(ctx, conn, listener, slot, down).await? {
            Some(side) => side,
            None => return Ok(None),
        },
        None => Side::Plain(down),
    };
    // Filter chains (SPEC §9): one is chosen per connection, by its destination and, where a
    // chain asks for a transport protocol or ALPN (Envoy's tls_inspector), its ClientHello,
    // peeked. A chain with a DownstreamTlsContext terminates TLS.
    if let Side::Plain(tcp) = &down
        && !listener.filter_chains.is_empty()
    {
        let dst = match listener.capture {
            Capture::None => tcp.local_addr()?,
            _ => capture::original_dst(tcp, listener.listen).or_else(|_| tcp.local_addr())?,
        };
        let index = snapshot.router.chain_index(li);
        // Peeked only where an inspector runs for this port and the chains competing for this
        // destination differ by what it would find: a server-first protocol on a plain TCP
        // port never waits.
        let what = index.map(|x| x.inspection(dst)).unwrap_or_default();
        let inspected = match what.tls || what.http {
            false => mtls::Inspected::default(),
            true => monoio::select! {
                r = mtls::inspect(ctx, tcp, listener.limits.sniff_timeout.0, what) => r?,
                _ = conn.cancel.wait() => {
                    cut(conn, down, None);
                    return Ok(None);
                }
            },
        };
        let hello = inspected.hello;
        // The client's address costs a syscall: asked only when a chain matches on it.
        let source = match index.is_some_and(|x| x.uses_source()) {
            true => tcp.peer_addr()?,
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
        let chain = snapshot.router.select_chain(li, &listener.filter_chains, &facts);
        conn.chain.set(chain);
        if access_log::logged(conn) {
            let remote = match facts.source.port() {
                0 => tcp.peer_addr().ok(),
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
        let slots = snapshot.tls.chains.get(li);
        if let Some(slot) = chain.and_then(|c| slots?.get(c)?.as_ref()) {
            let Side::Plain(tcp) = down else { unreachable!("matched as plain above") };
            down = match terminate(ctx, conn, listener, slot, tcp).await? {
                Some(side) => side,
                None => return Ok(None),
            };
        } else if let Some(c) = chain {
            // A plaintext chain's RBAC, before connecting (a TLS chain's runs after its
            // handshake, below).
            let source = match facts.source.port() {
                0 => None,
                _ => Some(facts.source),
            };
            authorize(ctx, &snapshot, li, conn, c, tcp, dst, source, None)?;
        }
    }
    if let Side::Tls(tls) = &down {
        mtls::check_rbac(ctx, &snapshot, li, conn, tls)?;
        // Read for the principal and RBAC, both done (idle memory).
        tls.forget_peer_certificate();
    }
    if listener.filter_chains.is_empty() && access_log::logged(conn) {
        let tcp = down.tcp();
        let local = match listener.capture {
            Capture::None => tcp.local_addr()?,
            _ => capture::original_dst(tcp, listener.listen).or_else(|_| tcp.local_addr())?,
        };
        access_log::note_downstream(conn, tcp.peer_addr().ok(), local, None);
    }
    // Connecting and the exchange borrow the sides rather than own them, so a cancel (idle
    // timeout, drain deadline) leaves them here to be closed the way the cancel asks.
    let connected = monoio::select! {
        r = connect_any(ctx, &snapshot, li, conn, listener, down.tcp()) => Some(r?),
        _ = conn.cancel.wait() => None,
    };
    let Some(up) = connected else {
        cut(conn, down, None);
        return Ok(None);
    };
    if access_log::logged(conn) {
        access_log::note_upstream(conn, up.tcp().local_addr().ok());
    }
    // The downstream inherits TCP_NODELAY from its listener socket.
    if let Side::Plain(up) = &up {
        let _ = up.set_nodelay(true);
    }
    // An mTLS cluster (SPEC §7) when the client is plain: originate TLS. (An mTLS
    // downstream's upstream is the local application: plaintext; a tunnel's TLS is its
    // carrier's.)
    let mut up = match (up, &down, upstream_tls(&snapshot, conn)) {
        (Side::Plain(up), Side::Plain(_), Some(slot)) => {
            let originated = monoio::select! {
                r = Box::pin(mtls::originate(ctx, listener, conn, up, slot)) => Some(r?),
                _ = conn.cancel.wait() => None,
            };
            match originated {
                Some(tls) => Side::Tls(tls),
                None => {
                    cut(conn, down, None);
                    return Ok(None);
                }
            }
        }
        (up, _, _) => up,
    };
    // Connected: from here on the connection reads what it kept (SPEC §11), and the exchange
    // may wait on its peer as long as the peer likes.
    drop(snapshot);
    let exchanged = monoio::select! {
        r = exchange(ctx, listener, conn, &mut down, &mut up) => Some(r),
        _ = conn.cancel.wait() => None,
    };
    match exchanged {
        Some(Ok(peer)) => {
            settle(ctx, conn, peer.as_deref(), "-");
            Ok(Some((down, up)))
        }
        Some(Err(e)) => {
            // A broken exchange: reset both sides.
            down.reset();
            up.reset();
            Err(e)
        }
        None => {
            cut(conn, down, Some(up));
            Ok(None)
        }
    }
}

/// Terminate TLS inbound, or close the connection when cancelled meanwhile. Boxed, as the
/// rest of the setup: the handshake's timer should not stay with the connection.
async fn terminate(
    ctx: &WorkerCtx,
    conn: &Conn,
    listener: &Listener,
    slot: &crate::tls::Slot,
    down: TcpStream,
) -> Result<Option<Side>, Error> {
    monoio::select! {
        r = Box::pin(mtls::terminate(ctx, conn, listener, slot, down)) => r.map(Some),
        _ = conn.cancel.wait() => Ok(None),
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
    snapshot: &Snapshot,
    li: usize,
    conn: &Conn,
    chain: usize,
    down: &TcpStream,
    destination: std::net::SocketAddr,
    source: Option<std::net::SocketAddr>,
    tls: Option<crate::rbac::Tls<'_>>,
) -> Result<(), Error> {
    let listener = &conn.listener;
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
            if let Some(t) = snapshot.router.route_chain(li, chain) {
                conn.routed(&snapshot.router, t.cluster, None);
            }
            return Err(Error::Denied);
        }
    }
    Ok(())
}

/// The TLS client config of the cluster the connection was routed to, when it speaks TLS to
/// the chosen endpoint (an xDS cluster picks it per endpoint: Istio's `tlsMode-istio`).
fn upstream_tls<'a>(snapshot: &'a Snapshot, conn: &Conn) -> Option<&'a crate::tls::Slot> {
    let (c, e) = conn.upstream.get()?;
    let slot = snapshot.tls.clusters.get(c)?.as_ref()?;
    let cluster = snapshot.config.clusters.get(c)?;
    let tls = cluster.tls.as_ref()?;
    match e.and_then(|e| cluster.endpoints.get(e)) {
        Some(endpoint) => tls.applies_to(endpoint).then_some(slot),
        None => (tls.endpoint_matches.is_empty() && !tls.unmatched_plaintext).then_some(slot),
    }
}

/// Close a connection cancelled before it was relaying: gracefully after an idle timeout, with
/// a reset at the drain deadline (as `copy_both` does), so a peer never mistakes a cut-off
/// exchange for a finished one.
fn cut(conn: &Conn, down: Side, up: Option<Side>) {
    if conn.idle_expired.get() {
        return; // dropping closes with FIN
    }
    down.reset();
    if let Some(up) = up {
        up.reset();
    }
}

/// Run the peer exchange the listener asks for over these sides; the peer, if it is a mesh
/// peer. With a TLS side it runs inside TLS, as ALPN says (SPEC §7); between plain sockets
/// as the listener's mode says (SPEC §2).
async fn exchange(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    down: &mut Side,
    up: &mut Side,
) -> Result<Option<Rc<NodeMetadata>>, Error> {
    match (down, up) {
        (Side::Plain(down), Side::Plain(up)) => exchange_plain(ctx, listener, conn, down, up).await,
        (Side::Tls(tls), Side::Plain(plain)) => mtls::exchange(ctx, listener, conn, plain, tls, true).await,
        (Side::Plain(plain), Side::Tls(tls)) => mtls::exchange(ctx, listener, conn, plain, tls, false).await,
        // HBONE's peer metadata rides in `baggage`: the terminator's, on its 200 (SPEC §12).
        (Side::Plain(_), Side::Tunnel(tunnel)) => Ok(tunnel.take_peer().map(Rc::new)),
        _ => Ok(None),
    }
}

/// The exchange between two plain sockets (SPEC §2).
async fn exchange_plain(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Option<Rc<NodeMetadata>>, Error> {
    // A passthrough destination is not known to be a mesh peer: writing a preamble to it
    // would put bytes in front of its protocol (Istio's PassthroughCluster has no exchange).
    let mode = match conn.captured.get() {
        Some(Captured::Passthrough(_)) => PeerExchange::Off,
        _ => listener.peer_exchange,
    };
    match (mode, listener.direction) {
        (PeerExchange::Always, direction) => {
            // A preamble split across reads is gathered in a pool buffer (copied once).
            let mut parser = Parser::with_peers(listener.limits.max_preamble.0, ctx.pool.take(), &ctx.peers);
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
    ctx: &Rc<WorkerCtx>,
    snapshot: &Snapshot,
    li: usize,
    conn: &Conn,
    listener: &Listener,
    down: &TcpStream,
) -> Result<Side, Error> {
    match listener.capture {
        Capture::None if !listener.filter_chains.is_empty() => {
            // The chain `relay` chose (SPEC §9).
            let chain = conn.chain.get();
            let target = chain.and_then(|c| snapshot.router.route_chain(li, c)).ok_or(Error::NoRoute)?;
            connect(ctx, snapshot, li, conn, listener, down, Some(target)).await
        }
        Capture::None => connect(ctx, snapshot, li, conn, listener, down, None).await,
        _ => connect_captured(ctx, snapshot, li, conn, listener, down).await,
    }
}

/// A captured connection: where its original destination says (SPEC §8), read once here.
async fn connect_captured(
    ctx: &Rc<WorkerCtx>,
    snapshot: &Snapshot,
    li: usize,
    conn: &Conn,
    listener: &Listener,
    down: &TcpStream,
) -> Result<Side, Error> {
    let dst = capture::original_dst(down, listener.listen).or_else(|_| down.local_addr())?;
    let timeout = listener.limits.connect_timeout.0;
    match capture::decide(listener.capture, dst, &snapshot.config.listeners, &snapshot.router) {
        Decision::Refuse => {
            conn.captured.set(Some(Captured::BlackHole));
            ctx.metrics.borrow().count_capture_loop();
            Err(Error::Loop)
        }
        Decision::Cluster(target) => connect(ctx, snapshot, li, conn, listener, down, Some(target)).await,
        Decision::Passthrough(dst) => {
            conn.captured.set(Some(Captured::Passthrough(dst)));
            socket::connect(dst, None, timeout).await.map(Side::Plain).map_err(Error::Connect)
        }
        Decision::Local(dst) => {
            // The chain's (else the listener's) cluster, if any, only names
            // destination_service: istiod's inbound clusters carry the service.
            let router = &snapshot.router;
            let named = conn.chain.get().and_then(|c| router.route_chain(li, c)).or_else(|| router.route(li));
            if let Some(t) = named {
                conn.routed(router, t.cluster, None);
            }
            let up = socket::connect(dst, Some(capture::inbound_source(dst)), timeout).await;
            up.map(Side::Plain).map_err(Error::Connect)
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
    ctx: &Rc<WorkerCtx>,
    snapshot: &Snapshot,
    li: usize,
    conn: &Conn,
    listener: &Listener,
    down: &TcpStream,
    target: Option<Target>,
) -> Result<Side, Error> {
    let target = match target {
        Some(t) => t,
        None => snapshot.router.route(li).ok_or(Error::NoRoute)?,
    };
    let router = &snapshot.router;
    conn.routed(router, target.cluster, None);
    let cluster = &router.clusters[target.cluster];
    // The router's clusters are the config's, in the same order.
    let bind_source = snapshot.config.clusters.get(target.cluster).and_then(|c| c.bind_source);
    if snapshot.config.clusters.get(target.cluster).is_some_and(|c| c.original_dst) {
        let dst = match listener.capture {
            Capture::None => down.local_addr()?,
            _ => capture::original_dst(down, listener.listen).or_else(|_| down.local_addr())?,
        };
        // A connection that reached a listener directly has itself as its destination:
        // connecting there would loop through this proxy.
        if capture::is_own_listener(dst, &snapshot.config.listeners) {
            return Err(Error::Loop);
        }
        let up = socket::connect(dst, bind_source, listener.limits.connect_timeout.0).await;
        return up.map(Side::Plain).map_err(Error::Connect);
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
        let dialed = dial(ctx, snapshot, conn, target.cluster, bind_source, addr, left);
        let err = match monoio::time::timeout(left, dialed).await {
            Ok(Ok(s)) => {
                conn.routed(router, target.cluster, Some(e));
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

/// Open the connection to one endpoint: a TCP connect, or for a tunnelled cluster (SPEC §12)
/// an HBONE stream to it over a pooled mTLS connection to the endpoint's tunnel port.
async fn dial(
    ctx: &Rc<WorkerCtx>,
    snapshot: &Snapshot,
    conn: &Conn,
    cluster: usize,
    bind_source: Option<std::net::IpAddr>,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> io::Result<Side> {
    let tunnel = snapshot.config.clusters.get(cluster).and_then(|c| c.tunnel.as_ref());
    let slot = snapshot.tls.clusters.get(cluster).and_then(Option::as_ref);
    match (tunnel, slot) {
        (Some(t), Some(slot)) => {
            let via = std::net::SocketAddr::new(addr.ip(), t.port);
            let (tunnel, security) = hbone::open(ctx, slot, via, addr).await?;
            *conn.security.borrow_mut() = security;
            Ok(Side::Tunnel(tunnel))
        }
        _ => socket::connect(addr, bind_source, timeout).await.map(Side::Plain),
    }
}

/// Outbound `always`: write our preamble first, relay the client's bytes meanwhile, and
/// strip the upstream's preamble from the response direction.
async fn exchange_outbound(
    ctx: &WorkerCtx,
    listener: &Listener,
    conn: &Conn,
    parser: &mut Parser<'_>,
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Option<Rc<NodeMetadata>>, Error> {
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
    parser: &mut Parser<'_>,
    down: &mut TcpStream,
    up: &mut TcpStream,
) -> Result<Option<Rc<NodeMetadata>>, Error> {
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
    Settled(Option<Rc<NodeMetadata>>),
}

/// Feed one read (empty: EOF) from the side that carries the peer's preamble. On a verdict, forward the
/// application bytes to `to` (`request`: downstream→upstream), after answering with our own
/// preamble on `answer` (inbound). A broken preamble is an error: the caller resets both.
async fn feed(
    ctx: &WorkerCtx,
    conn: &Conn,
    parser: &mut Parser<'_>,
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

#[cfg(test)]
mod task_size {
    /// The size and alignment of the future a function of five arguments returns.
    fn future_layout<A, B, C, D, E, F: std::future::Future, G: Fn(A, B, C, D, E) -> F>(
        _: G,
    ) -> (usize, usize) {
        (std::mem::size_of::<F>(), std::mem::align_of::<F>())
    }

    /// The size of the future a function of four arguments returns.
    fn copy_size<A, B, C, D, F: std::future::Future, G: Fn(A, B, C, D) -> F>(_: G) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_established_connections_task_holds_its_two_sides_once() {
        // An idle connection's memory is mostly its task's future: the copy's state plus what
        // `relay` keeps around it. The sides live in the copy's arm alone (1,664 B with 576 B
        // of sides; 3,472 B when `copy_both` and `copy_sides` were `async fn`s that kept them
        // three times), and `relay` keeps three pointers beside the copy (it kept its
        // arguments, the socket's 80 B among them, when it was an `async fn`).
        let (relay, _) = future_layout(super::relay);
        let copy = copy_size(super::side::copy_both);
        let sides = 2 * std::mem::size_of::<super::side::Side>();
        assert!(copy < 3 * sides, "the copy's future {copy} B for {sides} B of sides");
        assert!(relay <= copy + 32, "relay's future {relay} B around the copy's {copy} B");
    }

    #[test]
    fn an_idle_connections_task_fits_a_2_kib_allocation() {
        // monoio allocates a task as its header (24 B), the future with a discriminant of its
        // alignment, and a trailer (16 B), from mimalloc's size classes (…, 1,792, 2,048,
        // 2,560, …; blocks aligned over 16 B only in power-of-two classes). A task of 4,224 B
        // (a 128-aligned future of 3,840 B) took a 5,120 B block per connection and sidecar;
        // this one fits 2,048 (issue 31).
        let (serve, align) = future_layout(super::serve);
        assert!(align <= 16, "a connection's future aligned to {align} B");
        let task = 24 + serve + align.max(8) + 16;
        assert!(task <= 2048, "a connection's task {task} B (its future {serve} B)");
    }
}
