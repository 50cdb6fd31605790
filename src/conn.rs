//! A connection's context on its worker: the worker's shared per-thread state (`WorkerCtx`:
//! current snapshot, buffer pool, metrics shard writer, series cache), one connection's
//! counters and control (`Conn`, which keeps the snapshot it was accepted under), and how a
//! connection settles into its label set (SPEC §3).
//!
//! Below both `worker` (threads, accepting, the tick) and `relay` (one connection's I/O): it
//! imports neither. Single-threaded: `Cell`/`RefCell`, no locks, no atomics per byte.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::busy_poll::BusyPoll;
use crate::config::Direction;
use crate::exchange::NodeMetadata;
use crate::metrics::{self, ConnLabels, Delta, SeriesId, ServiceInfo, ShardWriter};
use crate::snapshot::{Published, Snapshot};

/// Size of one relay buffer. Small messages fit in one; a read that fills it marks a bulk
/// flow, which then moves by splice(2) without a buffer (see `relay::pump`).
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
    pub series_cache: RefCell<HashMap<u64, (SettleKey, SeriesId)>>,
    /// Bounded busy-polling after activity (off unless configured).
    pub busy: Rc<BusyPoll>,
    conns: RefCell<Vec<Option<Rc<Conn>>>>,
    free: RefCell<Vec<usize>>,
    active: Cell<u64>,
}

/// One connection's counters and control, shared by its task and the worker tick.
pub struct Conn {
    /// The config and routes it was accepted under, kept for its whole life (SPEC §9).
    pub snapshot: Rc<Snapshot>,
    /// Listener index in `snapshot`.
    pub listener: usize,
    /// The accept loop it came from (a removed listener drains its own connections).
    pub acceptor: u64,
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
    /// The filter chain of its listener it matched, for listeners with chains (SPEC §9).
    pub chain: Cell<Option<usize>>,
    /// Cluster and endpoint it was routed to (for labels), once known.
    pub upstream: Cell<Option<(usize, Option<usize>)>>,
    /// An outbound-captured connection no cluster matched (for labels, SPEC §8).
    pub captured: Cell<Option<Captured>>,
    slot: Cell<usize>,
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
            pipes: Default::default(),
            metrics: RefCell::new(writer),
            preamble: crate::exchange::encode(&node),
            node,
            splice: flags.splice,
            istio_metrics: flags.istio_metrics,
            now: Cell::new(Instant::now()),
            series_cache: RefCell::new(HashMap::new()),
            busy: Rc::new(BusyPoll::default()),
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
    pub fn swap(&self, published: &Published) -> Rc<Snapshot> {
        let next = Rc::new(Snapshot::new(published, seed(self.index), Some(&self.snapshot.borrow())));
        // Cached series name listeners and endpoints by index, which a new config reorders.
        self.series_cache.borrow_mut().clear();
        self.snapshot.replace(next)
    }

    /// Live connections on this worker.
    pub fn active(&self) -> u64 {
        self.active.get()
    }

    /// Register a new connection on listener `listener` of `snapshot`.
    pub fn open(&self, snapshot: Rc<Snapshot>, listener: usize, acceptor: u64) -> Rc<Conn> {
        let conn = Rc::new(Conn {
            snapshot,
            listener,
            acceptor,
            received_bytes: Cell::new(0),
            sent_bytes: Cell::new(0),
            reported: Cell::new((0, 0)),
            series: Cell::new(None),
            last_active: Cell::new(self.now.get()),
            cancel: Signal::default(),
            idle_expired: Cell::new(false),
            chain: Cell::new(None),
            upstream: Cell::new(None),
            captured: Cell::new(None),
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

/// Label the connection and count it as opened, once (later calls do nothing).
pub fn settle(ctx: &WorkerCtx, conn: &Conn, peer: Option<&NodeMetadata>, response_flags: &'static str) {
    if conn.series.get().is_some() || !ctx.istio_metrics {
        return;
    }
    // An xDS listener or chain without `istio.stats` is not counted (SPEC §9).
    let listener = &conn.snapshot.config.listeners[conn.listener];
    let stats = match conn.chain.get().and_then(|c| listener.filter_chains.get(c)) {
        Some(chain) => chain.istio_stats,
        None => listener.istio_stats,
    };
    if !stats {
        return;
    }
    // Everything the labels depend on besides the fixed local node. (With mTLS, the
    // principals join the key.)
    // Indices are per snapshot: the generation tells them apart.
    let (generation, listener, upstream, captured) =
        (conn.snapshot.generation, conn.listener, conn.upstream.get(), conn.captured.get());
    let hash = {
        let mut h = std::hash::DefaultHasher::new();
        (generation, listener, upstream, captured, response_flags, peer).hash(&mut h);
        h.finish()
    };
    let cached = ctx.series_cache.borrow().get(&hash).and_then(|(known, id)| {
        let same = known.generation == generation
            && known.listener == listener
            && known.upstream == upstream
            && known.captured == captured
            && known.response_flags == response_flags
            && known.peer.as_ref() == peer;
        same.then_some(*id)
    });
    if let Some(id) = cached {
        ctx.settle(conn, id);
        return;
    }
    let id = ctx.intern(labels(ctx, conn, peer, response_flags));
    let mut cache = ctx.series_cache.borrow_mut();
    if cache.len() < SERIES_CACHE_MAX && !ctx.metrics.borrow().is_overflow(id) {
        let key = SettleKey { generation, listener, upstream, captured, response_flags, peer: peer.cloned() };
        cache.insert(hash, (key, id));
    }
    drop(cache);
    ctx.settle(conn, id);
}

/// Label inputs of a settled connection, to reuse its series for the next such connection
/// without rebuilding 23 label values (two dozen allocations).
pub struct SettleKey {
    generation: u64,
    listener: usize,
    upstream: Option<(usize, Option<usize>)>,
    captured: Option<Captured>,
    response_flags: &'static str,
    peer: Option<NodeMetadata>,
}

/// Entries per worker; beyond it, label sets are built per connection (still correct).
const SERIES_CACHE_MAX: usize = 4096;

/// The 23 label values of a connection (SPEC §3).
fn labels(
    ctx: &WorkerCtx,
    conn: &Conn,
    peer: Option<&NodeMetadata>,
    response_flags: &str,
) -> metrics::LabelSet {
    let snapshot = &conn.snapshot;
    let listener = &snapshot.config.listeners[conn.listener];
    // Istio's catch-all clusters: destination_service is the original `IP:port` for a
    // passthrough (where Istio says `unknown`), the cluster's name for the black hole.
    let special = match conn.captured.get() {
        Some(Captured::Passthrough(dst)) => Some((dst.to_string(), "PassthroughCluster")),
        Some(Captured::BlackHole) => Some(("BlackHoleCluster".to_string(), "BlackHoleCluster")),
        None => None,
    };
    let unknown = ServiceInfo {
        host: special.as_ref().map(|(host, _)| host.clone()).unwrap_or_default(),
        ..ServiceInfo::default()
    };
    let (service, endpoint) = match conn.upstream.get() {
        Some((c, e)) => {
            let cluster = &snapshot.router.clusters[c];
            (&cluster.service, e.map(|e| &cluster.endpoints[e].identity))
        }
        None => (&unknown, None),
    };
    // Outbound without an exchange, the peer is the chosen endpoint's workload, as Istio's
    // control plane describes it (SPEC §3 "Peer from the chosen endpoint").
    let endpoint = endpoint.filter(|_| listener.direction == Direction::Outbound);
    let set = metrics::label_set(&ConnLabels {
        reporter: listener.direction.into(),
        local: &ctx.node,
        peer: peer.or(endpoint),
        service,
        response_flags,
        local_principal: None,
        peer_principal: None,
        mutual_tls: false,
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
