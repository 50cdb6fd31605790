//! A connection's context on its worker: the worker's shared per-thread state (`WorkerCtx`:
//! current snapshot, buffer pool, metrics shard writer, series cache), one connection's
//! counters and control (`Conn`, which keeps only its listener and the cluster it was routed
//! to, not the snapshot it was set up under: SPEC §11), and how a connection settles into
//! its label set (SPEC §3).
//!
//! Below both `worker` (threads, accepting, the tick) and `relay` (one connection's I/O): it
//! imports neither. Single-threaded: `Cell`/`RefCell`, no locks, no atomics per byte.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::busy_poll::BusyPoll;
use crate::config::{Direction, Listener};
use crate::exchange::NodeMetadata;
use crate::metrics::{self, ConnLabels, Delta, PeerLabels, Reporter, SeriesId, ServiceInfo, ShardWriter};
use crate::routing::{ClusterState, Router};
use crate::snapshot::{Published, Snapshot};

/// Size of one relay buffer. Small messages fit in one; a read that fills it marks a bulk
/// flow, which then moves by splice(2) without a buffer (see `relay::side::pump`).
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers kept in a worker's pool when idle; beyond this they are freed.
const POOL_KEEP: usize = 256;

/// Everything one worker's connections share. Single-threaded: `Cell`/`RefCell`, no atomics.
pub struct WorkerCtx {
    /// Worker index.
    pub index: usize,
    /// The snapshot new connections are accepted under; replaced by the tick when the
    /// control side publishes a new config (SPEC §9).
    snapshot: RefCell<Rc<Snapshot>>,
    /// Buffer pool.
    pub pool: BufferPool,
    /// The peers this worker's exchanges heard from last, decoded once.
    pub peers: crate::exchange::Peers,
    /// The principals of the peer certificates this worker's handshakes saw last.
    pub principals: crate::tls::Principals,
    /// Splice pipes, borrowed by a bulk flow for one burst.
    pub pipes: crate::socket::PipePool,
    /// This worker's metrics shard writer.
    pub metrics: RefCell<ShardWriter>,
    /// The local node (canonical labels filled) and its encoded preamble.
    pub node: NodeMetadata,
    /// The preamble we write, encoded once.
    pub preamble: Vec<u8>,
    /// Whether bulk flows switch to splice(2).
    pub splice: bool,
    /// Whether istio_tcp_* series are counted at all. Always, except under
    /// `RINGSIDE_ISTIO_METRICS=0`, which exists to measure what metrics cost (perf/run.sh).
    pub istio_metrics: bool,
    /// Coarse clock, advanced by the tick; read per read instead of a syscall.
    pub now: Cell<Instant>,
    /// Series of recently settled label inputs (see `settle`).
    pub series_cache: RefCell<SeriesCache>,
    /// Bounded busy-polling after activity (off unless configured).
    pub busy: Rc<BusyPoll>,
    /// The proxy is draining (POST /drain, SIGTERM): HBONE carriers send GOAWAY (SPEC §12).
    pub draining: Cell<bool>,
    conns: RefCell<Vec<Option<Rc<Conn>>>>,
    free: RefCell<Vec<usize>>,
    active: Cell<u64>,
}

/// One connection's counters and control, shared by its task and the worker tick. Its setup
/// reads the snapshot it was accepted under (SPEC §9); the connection itself keeps only what
/// it uses after: its listener and the cluster it was routed to, each shared with every
/// generation that did not change it, so a live connection pins no generation (SPEC §11).
pub struct Conn {
    /// Its listener: idle timeout, chains, direction and access logs.
    pub listener: Arc<Listener>,
    /// The generation it was accepted under: `upstream`'s cluster index is into its clusters
    /// (the series cache's key).
    pub generation: u64,
    /// The accept loop it came from (a removed listener drains its own connections).
    pub acceptor: u64,
    /// The filter chain of its listener it matched, for listeners with chains (SPEC §9).
    pub chain: Cell<Option<usize>>,
    /// Application bytes downstream→upstream.
    pub received_bytes: Cell<u64>,
    /// Application bytes upstream→downstream.
    pub sent_bytes: Cell<u64>,
    reported: Cell<(u64, u64)>,
    /// The series it counts into, once its peer settled.
    pub series: Cell<Option<SeriesId>>,
    /// Last time a byte moved either way.
    pub last_active: Cell<Instant>,
    /// Fired by the tick (idle timeout, drain deadline); the connection then closes.
    pub cancel: Signal,
    /// Why `cancel` fired: the idle timeout (close gracefully) rather than the drain deadline.
    pub idle_expired: Cell<bool>,
    /// Cluster (by index in its generation) and endpoint it was routed to, once known; set
    /// with `cluster` by [`Conn::routed`].
    pub upstream: Cell<Option<(usize, Option<usize>)>>,
    /// The cluster of `upstream` (labels, access log, `disconnected`).
    pub cluster: RefCell<Option<Arc<ClusterState>>>,
    /// mTLS identities, once the handshake is done (principals and security policy labels).
    pub security: RefCell<Security>,
    /// An outbound-captured connection no cluster matched (for labels, SPEC §8).
    pub captured: Cell<Option<Captured>>,
    /// When it was accepted: wall clock (an access log's START_TIME) and monotonic (its
    /// DURATION), SPEC §9.
    pub started: (std::time::SystemTime, Instant),
    /// What its access log line needs beyond the counters, recorded only where a log is
    /// configured (`access_log::writer`).
    pub access: RefCell<Option<Box<crate::access_log::Entry>>>,
    slot: Cell<usize>,
}

/// What mTLS tells the labels (SPEC §3): both principals and whether the peer was verified.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Security {
    /// `spiffe://...` of our own certificate.
    pub local_principal: Option<Arc<str>>,
    /// `spiffe://...` of the peer's certificate.
    pub peer_principal: Option<Arc<str>>,
    /// The connection is mutual TLS (connection_security_policy, reporter=destination).
    pub mutual_tls: bool,
}

/// Where an outbound-captured connection went when no cluster matched its original
/// destination, named as Istio's catch-all clusters are (SPEC §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Captured {
    /// Relayed to the original destination as it was: `PassthroughCluster`.
    Passthrough(SocketAddr),
    /// Refused: the original destination was the proxy's own listener (a loop):
    /// `BlackHoleCluster`.
    BlackHole,
}

impl Conn {
    /// Fold the bytes not yet reported (and `extra` opened/closed) into the shard.
    pub fn report(&self, writer: &ShardWriter, mut d: Delta) {
        let Some(id) = self.series.get() else { return };
        let (r, s) = self.reported.get();
        d.received_bytes = self.received_bytes.get() - r;
        d.sent_bytes = self.sent_bytes.get() - s;
        if d != Delta::default() {
            writer.fold(id, d);
        }
        self.reported.set((self.received_bytes.get(), self.sent_bytes.get()));
    }

    /// Routed to cluster `cluster` of `router` (and endpoint `endpoint`, once connected): the
    /// cluster is kept for the connection's life, not the router.
    pub fn routed(&self, router: &Router, cluster: usize, endpoint: Option<usize>) {
        self.upstream.set(Some((cluster, endpoint)));
        let Some(c) = router.clusters.get(cluster) else { return };
        let mut kept = self.cluster.borrow_mut();
        if !kept.as_ref().is_some_and(|k| Arc::ptr_eq(k, c)) {
            *kept = Some(Arc::clone(c));
        }
    }
}

/// Benchmark switches copied from the process-wide state (see `worker::Shared`).
#[derive(Clone, Copy, Debug)]
pub struct Flags {
    /// Bulk flows switch to splice(2).
    pub splice: bool,
    /// istio_tcp_* series are counted.
    pub istio_metrics: bool,
}

impl WorkerCtx {
    /// A worker's context: its snapshot of `published`, pool and shard writer, and the local
    /// node with its canonical labels filled in and its preamble encoded once.
    pub fn new(index: usize, published: &Published, writer: ShardWriter, flags: Flags) -> WorkerCtx {
        let node = metrics::with_canonical_labels(NodeMetadata::from(&published.config.node));
        WorkerCtx {
            index,
            snapshot: RefCell::new(Rc::new(Snapshot::new(published, seed(index), None))),
            pool: BufferPool::default(),
            peers: crate::exchange::Peers::default(),
            principals: crate::tls::Principals::default(),
            pipes: Default::default(),
            metrics: RefCell::new(writer),
            preamble: crate::exchange::encode(&node),
            node,
            splice: flags.splice,
            istio_metrics: flags.istio_metrics,
            now: Cell::new(Instant::now()),
            series_cache: RefCell::new(SeriesCache::default()),
            busy: Rc::new(BusyPoll::default()),
            draining: Cell::new(false),
            conns: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            active: Cell::new(0),
        }
    }

    /// The snapshot a connection accepted now gets.
    pub fn snapshot(&self) -> Rc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Serve `published` to new connections from now on: live connections keep theirs, and
    /// endpoints that stay keep their load and ejection. Returns the snapshot replaced.
    /// (Cached series stay valid: their inputs carry the snapshot's generation.)
    pub fn swap(&self, published: &Published) -> Rc<Snapshot> {
        let next = Rc::new(Snapshot::new(published, seed(self.index), Some(&self.snapshot.borrow())));
        self.snapshot.replace(next)
    }

    /// Live connections on this worker.
    pub fn active(&self) -> u64 {
        self.active.get()
    }

    /// Register a new connection on `listener`, accepted under `generation`.
    pub fn open(&self, listener: Arc<Listener>, generation: u64, acceptor: u64) -> Rc<Conn> {
        let conn = Rc::new(Conn {
            listener,
            generation,
            acceptor,
            chain: Cell::new(None),
            received_bytes: Cell::new(0),
            sent_bytes: Cell::new(0),
            reported: Cell::new((0, 0)),
            series: Cell::new(None),
            last_active: Cell::new(self.now.get()),
            cancel: Signal::default(),
            idle_expired: Cell::new(false),
            upstream: Cell::new(None),
            cluster: RefCell::new(None),
            security: RefCell::new(Security::default()),
            captured: Cell::new(None),
            started: (std::time::SystemTime::now(), Instant::now()),
            access: RefCell::new(None),
            slot: Cell::new(0),
        });
        let mut conns = self.conns.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                conns.push(None);
                conns.len() - 1
            }
        };
        conn.slot.set(slot);
        conns[slot] = Some(conn.clone());
        self.active.set(self.active.get() + 1);
        self.metrics.borrow().set_active_connections(self.active.get());
        conn
    }

    /// The connection's peer is settled: count it as opened under `series`.
    pub fn settle(&self, conn: &Conn, series: SeriesId) {
        if conn.series.get().is_some() {
            return;
        }
        conn.series.set(Some(series));
        conn.report(&self.metrics.borrow(), Delta { opened: 1, ..Delta::default() });
    }

    /// The connection ended: fold its last bytes and count it closed.
    pub fn close(&self, conn: &Conn) {
        conn.report(&self.metrics.borrow(), Delta { closed: 1, ..Delta::default() });
        let slot = conn.slot.get();
        if let Some(entry) = self.conns.borrow_mut().get_mut(slot) {
            *entry = None;
            self.free.borrow_mut().push(slot);
        }
        self.active.set(self.active.get().saturating_sub(1));
        self.metrics.borrow().set_active_connections(self.active.get());
    }

    /// The connection's endpoint no longer carries it: counted in this worker's balancing
    /// state (shared by its snapshots) through the cluster the connection kept.
    pub fn disconnected(&self, conn: &Conn) {
        if let (Some((_, Some(e))), Some(cluster)) = (conn.upstream.get(), conn.cluster.borrow().as_ref()) {
            self.snapshot.borrow().router.balance().disconnected(cluster, e);
        }
    }

    /// Intern a label set in this worker's shard.
    pub fn intern(&self, labels: metrics::LabelSet) -> SeriesId {
        self.metrics.borrow_mut().intern(labels)
    }

    /// Run `f` on every live connection of this worker.
    pub fn for_each_conn(&self, mut f: impl FnMut(&Conn)) {
        for c in self.conns.borrow().iter().flatten() {
            f(c);
        }
    }
}

/// Per-worker seeds, so workers do not pick the same random endpoints in step.
fn seed(index: usize) -> u64 {
    0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1)
}

/// Label the connection and count it as opened, once (later calls do nothing). A connection
/// whose label inputs match a recent one's takes that series from the worker's
/// [`SeriesCache`] without allocating; otherwise its 23 label values are built and interned.
pub fn settle(ctx: &WorkerCtx, conn: &Conn, peer: Option<&NodeMetadata>, response_flags: &'static str) {
    if conn.series.get().is_some() || !ctx.istio_metrics {
        return;
    }
    if let Some(overlong) = peer.map(|p| p.overlong_values).filter(|&n| n > 0) {
        ctx.metrics.borrow().count_peer_values_replaced(overlong);
    }
    let listener = &conn.listener;
    // An xDS listener or chain without `istio.stats` is not counted (SPEC §9).
    let stats = match conn.chain.get().and_then(|c| listener.filter_chains.get(c)) {
        Some(chain) => chain.istio_stats,
        None => listener.istio_stats,
    };
    if !stats {
        return;
    }
    let kept = conn.cluster.borrow();
    let cluster = conn.upstream.get().and_then(|(_, e)| Some((kept.as_deref()?, e)));
    // Outbound without an exchange, the peer is the chosen endpoint's workload, as Istio's
    // control plane describes it (SPEC §3 "Peer from the chosen endpoint").
    let endpoint =
        cluster.and_then(|(c, e)| c.identity(e?)).filter(|_| listener.direction == Direction::Outbound);
    let peer = peer.or(endpoint);
    // Held for the whole settle: the principals are borrowed into the cache key.
    let security = conn.security.borrow();
    let inputs = LabelInputs {
        generation: conn.generation,
        reporter: listener.direction.into(),
        cluster: conn.upstream.get().map(|(c, _)| c),
        captured: conn.captured.get(),
        response_flags,
        peer: peer.map(PeerLabels::of).unwrap_or_default(),
        local_principal: security.local_principal.as_deref(),
        peer_principal: security.peer_principal.as_deref(),
        mutual_tls: security.mutual_tls,
    };
    let cached = ctx.series_cache.borrow_mut().get(&inputs);
    if let Some(id) = cached {
        ctx.settle(conn, id);
        return;
    }
    let service = cluster.map(|(c, _)| &c.service);
    let id = ctx.intern(labels(ctx, &inputs, service, peer));
    // Overflow series are not cached: `intern` counts every connection that lands there.
    if !ctx.metrics.borrow().is_overflow(id) {
        ctx.series_cache.borrow_mut().insert(&inputs, id);
    }
    ctx.settle(conn, id);
}

/// Everything a connection's labels are built from besides the worker's fixed local node
/// (SPEC §3), borrowed: what the series cache keys on. Of the peer only what the label rules
/// read ([`PeerLabels`]): a new pod of a known workload (new node id, pod name, owner) finds
/// the series of the pods before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LabelInputs<'a> {
    /// The snapshot's generation: `cluster` is an index into that snapshot's clusters.
    pub generation: u64,
    /// From the listener's direction.
    pub reporter: Reporter,
    /// The cluster it was routed to (its service), if any.
    pub cluster: Option<usize>,
    /// Istio's catch-all cluster it went to, if captured without a cluster (SPEC §8).
    pub captured: Option<Captured>,
    /// `-` or Envoy's flags.
    pub response_flags: &'static str,
    /// The exchanged peer, else (outbound) the chosen endpoint's workload.
    pub peer: PeerLabels<'a>,
    /// The local certificate's SPIFFE id under mTLS.
    pub local_principal: Option<&'a str>,
    /// The peer certificate's SPIFFE id under mTLS.
    pub peer_principal: Option<&'a str>,
    /// Whether the connection is mutual TLS.
    pub mutual_tls: bool,
}

/// [`LabelInputs`], owned, as the cache keeps them.
#[derive(Debug)]
struct SettleKey {
    generation: u64,
    reporter: Reporter,
    cluster: Option<usize>,
    captured: Option<Captured>,
    response_flags: &'static str,
    peer: [Option<Box<str>>; 7],
    local_principal: Option<Box<str>>,
    peer_principal: Option<Box<str>>,
    mutual_tls: bool,
}

impl SettleKey {
    fn new(i: &LabelInputs<'_>) -> SettleKey {
        SettleKey {
            generation: i.generation,
            reporter: i.reporter,
            cluster: i.cluster,
            captured: i.captured,
            response_flags: i.response_flags,
            peer: i.peer.fields().map(|f| f.map(Box::from)),
            local_principal: i.local_principal.map(Box::from),
            peer_principal: i.peer_principal.map(Box::from),
            mutual_tls: i.mutual_tls,
        }
    }

    fn matches(&self, i: &LabelInputs<'_>) -> bool {
        self.generation == i.generation
            && self.reporter == i.reporter
            && self.cluster == i.cluster
            && self.captured == i.captured
            && self.response_flags == i.response_flags
            && self.peer.iter().zip(i.peer.fields()).all(|(a, b)| a.as_deref() == b)
            && self.local_principal.as_deref() == i.local_principal
            && self.peer_principal.as_deref() == i.peer_principal
            && self.mutual_tls == i.mutual_tls
    }
}

/// Entries per generation of a [`SeriesCache`]; the cache holds at most two generations.
pub const SERIES_CACHE_GENERATION: usize = 2048;

type Generation = HashMap<u64, (Box<SettleKey>, SeriesId)>;

/// A worker's recently settled label inputs and their series, so that a connection like an
/// earlier one settles without building 23 label values (two dozen allocations). Bounded by
/// two generations: inserts go to the current one; when it is full it becomes the previous
/// one and the old previous is dropped; a hit in the previous generation moves to the current
/// one, so what is still in use survives. Tables are sized once, at the first insert, so a
/// hit never allocates.
pub struct SeriesCache {
    /// Keyed per process, so peers that choose label values cannot choose colliding hashes.
    keys: RandomState,
    current: Generation,
    previous: Generation,
    hits: u64,
    misses: u64,
}

impl Default for SeriesCache {
    fn default() -> SeriesCache {
        SeriesCache {
            keys: RandomState::new(),
            current: HashMap::new(),
            previous: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }
}

impl SeriesCache {
    /// The series of `inputs`, if cached.
    pub fn get(&mut self, inputs: &LabelInputs<'_>) -> Option<SeriesId> {
        let hash = self.keys.hash_one(inputs);
        let found = match self.current.get(&hash) {
            Some((key, id)) if key.matches(inputs) => Some(*id),
            _ => match self.previous.remove(&hash) {
                Some((key, id)) if key.matches(inputs) => {
                    self.put(hash, key, id);
                    Some(id)
                }
                Some(other) => {
                    self.previous.insert(hash, other);
                    None
                }
                None => None,
            },
        };
        match found {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        found
    }

    /// Remembers `inputs` → `id`.
    pub fn insert(&mut self, inputs: &LabelInputs<'_>, id: SeriesId) {
        if self.current.capacity() == 0 {
            self.current.reserve(SERIES_CACHE_GENERATION);
            self.previous.reserve(SERIES_CACHE_GENERATION);
        }
        let hash = self.keys.hash_one(inputs);
        self.put(hash, Box::new(SettleKey::new(inputs)), id);
    }

    fn put(&mut self, hash: u64, key: Box<SettleKey>, id: SeriesId) {
        if self.current.len() >= SERIES_CACHE_GENERATION && !self.current.contains_key(&hash) {
            // Clearing keeps the table's capacity: the next generation allocates nothing.
            self.previous.clear();
            std::mem::swap(&mut self.current, &mut self.previous);
        }
        self.current.insert(hash, (key, id));
    }

    /// Entries held (at most two generations).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lookups that found their series, and lookups that did not, since start.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// The 23 label values of a connection (SPEC §3) from its [`LabelInputs`], the service of its
/// cluster and its peer (exchanged, else the chosen endpoint's workload).
fn labels(
    ctx: &WorkerCtx,
    inputs: &LabelInputs<'_>,
    service: Option<&ServiceInfo>,
    peer: Option<&NodeMetadata>,
) -> metrics::LabelSet {
    // Istio's catch-all clusters: destination_service is the original `IP:port` for a
    // passthrough (where Istio says `unknown`), the cluster's name for the black hole.
    let special = match inputs.captured {
        Some(Captured::Passthrough(dst)) => Some((dst.to_string(), "PassthroughCluster")),
        Some(Captured::BlackHole) => Some(("BlackHoleCluster".to_string(), "BlackHoleCluster")),
        None => None,
    };
    let unknown = ServiceInfo {
        host: special.as_ref().map(|(host, _)| host.clone()).unwrap_or_default(),
        ..ServiceInfo::default()
    };
    let set = metrics::label_set(&ConnLabels {
        reporter: inputs.reporter,
        local: &ctx.node,
        peer,
        service: service.unwrap_or(&unknown),
        response_flags: inputs.response_flags,
        local_principal: inputs.local_principal,
        peer_principal: inputs.peer_principal,
        mutual_tls: inputs.mutual_tls,
    });
    match special {
        Some((_, name)) => set.with("destination_service_name", name),
        None => set,
    }
}

/// Per-worker relay buffers: taken for a read that does not wait, given back after the
/// write, so an idle connection holds none.
#[derive(Default)]
pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// An empty buffer with `BUFFER_SIZE` capacity.
    pub fn take(&self) -> Vec<u8> {
        self.free.borrow_mut().pop().unwrap_or_else(|| Vec::with_capacity(BUFFER_SIZE))
    }

    /// Give a buffer back (cleared); buffers of another size are dropped.
    pub fn put(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        if buf.capacity() == BUFFER_SIZE && free.len() < POOL_KEEP {
            buf.clear();
            free.push(buf);
        }
    }
}

/// A one-shot, single-thread signal with one waiter at a time.
#[derive(Default)]
pub struct Signal {
    fired: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Signal {
    /// Fire it, waking the waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Whether it fired.
    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Resolves once fired.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait(self)
    }
}

/// Future of `Signal::wait`.
pub struct SignalWait<'a>(&'a Signal);

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.fired.get() {
            return Poll::Ready(());
        }
        self.0.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}
