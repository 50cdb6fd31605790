//! Per-worker shards of per-label-set counters (SPEC §3): a worker owns one [`ShardWriter`]
//! (single writer, relaxed load + store, no read-modify-write); the scraper reads every worker's
//! [`Shard`] through an `Arc` and never blocks a writer. Series are bounded by a shared
//! [`LabelBudget`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::labels::LabelSet;

/// Plain per-connection deltas folded on the tick and at close.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Connections opened (0 or 1 per connection, counted when its peer settles).
    pub opened: u64,
    /// Connections closed (0 or 1 per connection, counted at close).
    pub closed: u64,
    /// Application bytes downstream→upstream since the last fold.
    pub received_bytes: u64,
    /// Application bytes upstream→downstream since the last fold.
    pub sent_bytes: u64,
}

/// Why an inbound TLS handshake was refused (`ringside_tls_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsRefused {
    /// The client spoke something other than TLS (plaintext against `strict`).
    NotTls,
    /// The client presented no certificate.
    NoClientCertificate,
    /// The client's certificate did not verify against the mesh root (other CA, expired).
    BadCertificate,
    /// The handshake did not finish within connect_timeout.
    Timeout,
    /// Anything else (no common cipher or ALPN, a peer alert, a socket error).
    Other,
}

impl TlsRefused {
    /// Every reason, in the order they are rendered.
    pub const ALL: [TlsRefused; 5] = [
        TlsRefused::NotTls,
        TlsRefused::NoClientCertificate,
        TlsRefused::BadCertificate,
        TlsRefused::Timeout,
        TlsRefused::Other,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsRefused::NotTls => "not_tls",
            TlsRefused::NoClientCertificate => "no_client_certificate",
            TlsRefused::BadCertificate => "bad_certificate",
            TlsRefused::Timeout => "timeout",
            TlsRefused::Other => "other",
        }
    }
}

/// Why an HBONE terminator refused a CONNECT request (`ringside_hbone_refused_total{reason}`,
/// SPEC §12): nothing of it reached any backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HboneRefused {
    /// Answered 400: not a CONNECT, or an `:authority` that is not the carrier's address or
    /// names one of the proxy's own ports (ztunnel's answers); 431 for a header list too large.
    BadRequest,
    /// Answered 503: the upstream refused or did not answer in connect_timeout.
    UpstreamUnavailable,
    /// Reset (RST_STREAM) unanswered: malformed, over the concurrent-stream limit, or draining.
    Reset,
}

impl HboneRefused {
    /// Every reason, in the order they are rendered.
    pub const ALL: [HboneRefused; 3] =
        [HboneRefused::BadRequest, HboneRefused::UpstreamUnavailable, HboneRefused::Reset];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HboneRefused::BadRequest => "bad_request",
            HboneRefused::UpstreamUnavailable => "upstream_unavailable",
            HboneRefused::Reset => "reset",
        }
    }
}

/// The cipher suites named in `ringside_tls_handshakes_total{cipher_suite}`: every suite
/// ringside offers (rustls' names), then `other` for anything else.
pub const TLS_SUITES: [&str; 10] = [
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "other",
];

/// One completed mTLS handshake (`ringside_tls_handshakes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsHandshake {
    /// An inbound listener's (server side), else an outbound cluster's (client side).
    pub inbound: bool,
    /// The session was resumed (a ticket or session id), no certificate exchanged.
    pub resumed: bool,
    /// Index into [`TLS_SUITES`].
    pub suite: usize,
}

impl TlsHandshake {
    /// Cells per shard: direction × full/resumed × suite.
    pub const CELLS: usize = 2 * 2 * TLS_SUITES.len();

    /// This handshake's cell.
    pub fn index(self) -> usize {
        let suite = self.suite.min(TLS_SUITES.len() - 1);
        (usize::from(self.inbound) * 2 + usize::from(self.resumed)) * TLS_SUITES.len() + suite
    }

    /// The handshake of cell `index` (the inverse of [`TlsHandshake::index`]).
    pub fn of_index(index: usize) -> TlsHandshake {
        let n = TLS_SUITES.len();
        TlsHandshake { inbound: index / n / 2 == 1, resumed: (index / n) % 2 == 1, suite: index % n }
    }
}

/// Outcome of one peer exchange, like Istio's `metadata_exchange` stats (plus ours: `invalid`,
/// `timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeOutcome {
    /// TLS negotiated ALPN `istio-peer-exchange` (Istio: alpn_protocol_found).
    AlpnProtocolFound,
    /// No such ALPN, so no exchange in mode `alpn` (Istio: alpn_protocol_not_found).
    AlpnProtocolNotFound,
    /// The first bytes were not the magic: a non-mesh peer (Istio: initial_header_not_found).
    InitialHeaderNotFound,
    /// The peer closed or went silent before any preamble (Istio: header_not_found).
    HeaderNotFound,
    /// A preamble was read and its metadata kept (Istio: metadata_added).
    MetadataAdded,
    /// A broken preamble: too large or undecodable; the connection was closed.
    Invalid,
    /// A preamble begun but not finished within exchange_timeout; the connection was closed.
    Timeout,
}

impl ExchangeOutcome {
    /// Every outcome, in the order they are rendered.
    pub const ALL: [ExchangeOutcome; 7] = [
        ExchangeOutcome::AlpnProtocolFound,
        ExchangeOutcome::AlpnProtocolNotFound,
        ExchangeOutcome::InitialHeaderNotFound,
        ExchangeOutcome::HeaderNotFound,
        ExchangeOutcome::MetadataAdded,
        ExchangeOutcome::Invalid,
        ExchangeOutcome::Timeout,
    ];

    /// The `outcome` label value: Istio's metadata_exchange stat name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeOutcome::AlpnProtocolFound => "alpn_protocol_found",
            ExchangeOutcome::AlpnProtocolNotFound => "alpn_protocol_not_found",
            ExchangeOutcome::InitialHeaderNotFound => "initial_header_not_found",
            ExchangeOutcome::HeaderNotFound => "header_not_found",
            ExchangeOutcome::MetadataAdded => "metadata_added",
            ExchangeOutcome::Invalid => "invalid",
            ExchangeOutcome::Timeout => "timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Cap on distinct label sets, shared by all workers. It counts series: a label set interned on
/// two workers takes two units, so the total number of cells (and their memory) is bounded by
/// `max_label_sets` plus two overflow series per worker.
#[derive(Debug)]
pub struct LabelBudget {
    max: usize,
    used: AtomicUsize,
}

impl LabelBudget {
    /// A budget of `max_label_sets` series across all workers.
    pub fn new(max_label_sets: usize) -> Arc<Self> {
        Arc::new(LabelBudget { max: max_label_sets, used: AtomicUsize::new(0) })
    }

    /// Takes one unit; false once the budget is spent.
    fn try_take(&self) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| (used < self.max).then_some(used + 1))
            .is_ok()
    }

    /// Series interned so far, across workers.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// A single writer's add: a relaxed load and store, never a read-modify-write (SPEC §1, §3).
fn add(cell: &AtomicU64, n: u64) {
    if n != 0 {
        cell.store(cell.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// One series' counters, alone on a cache line so neighbouring series never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Cells {
    opened: AtomicU64,
    closed: AtomicU64,
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
}

impl Cells {
    fn load(&self) -> [u64; 4] {
        // Acquire pairs with `fold`'s Release of `closed`: a scrape that sees a close sees the
        // bytes folded with it (SPEC §3: exact final byte counts right after a close).
        let closed = self.closed.load(Ordering::Acquire);
        [
            self.opened.load(Ordering::Relaxed),
            closed,
            self.received_bytes.load(Ordering::Relaxed),
            self.sent_bytes.load(Ordering::Relaxed),
        ]
    }
}

/// Series per lazily allocated chunk: an idle worker holds no cells at all.
const CHUNK: usize = 256;

#[derive(Debug)]
struct Chunk {
    cells: Box<[Cells]>,
    labels: Box<[OnceLock<LabelSet>]>,
}

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            cells: (0..CHUNK).map(|_| Cells::default()).collect(),
            labels: (0..CHUNK).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// Process counters of one worker, on their own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct ProcessCells {
    active_connections: AtomicU64,
    label_sets_overflowed: AtomicU64,
    listener_overflowed: AtomicU64,
    capture_loops_refused: AtomicU64,
    peer_values_replaced: AtomicU64,
    rbac_denied: AtomicU64,
    exchange: [AtomicU64; 7],
    tls_refused: [AtomicU64; 5],
    hbone_refused: [AtomicU64; 3],
    /// By direction × full/resumed, then suite (`TlsHandshake::index`).
    tls_handshakes: [[AtomicU64; TLS_SUITES.len()]; 4],
}

impl ProcessCells {
    fn handshake_cell(&self, index: usize) -> Option<&AtomicU64> {
        let n = TLS_SUITES.len();
        self.tls_handshakes.get(index / n)?.get(index % n)
    }
}

/// Read side of one worker's counters, shared with the scraper: per-series cells and process
/// counters. Readers never block the writer.
#[derive(Debug)]
pub struct Shard {
    worker: usize,
    /// Series published to readers (Release by the writer after the series' labels are set).
    len: AtomicUsize,
    chunks: Box<[OnceLock<Chunk>]>,
    process: ProcessCells,
}

impl Shard {
    /// Index of the worker that writes this shard.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Number of series (cells) this shard holds.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether the shard holds no series yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most series this shard can ever hold.
    pub fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    fn cells(&self, i: usize) -> Option<&Cells> {
        self.chunks.get(i / CHUNK)?.get()?.cells.get(i % CHUNK)
    }

    /// Every published series with its current values (opened, closed, received, sent).
    pub fn series(&self) -> impl Iterator<Item = (&LabelSet, [u64; 4])> + '_ {
        (0..self.len()).filter_map(move |i| {
            let chunk = self.chunks.get(i / CHUNK)?.get()?;
            let labels = chunk.labels.get(i % CHUNK)?.get()?;
            Some((labels, chunk.cells.get(i % CHUNK)?.load()))
        })
    }

    /// Connections currently open on this worker.
    pub fn active_connections(&self) -> u64 {
        self.process.active_connections.load(Ordering::Relaxed)
    }

    /// Label sets folded into the overflow series since start.
    pub fn label_sets_overflowed(&self) -> u64 {
        self.process.label_sets_overflowed.load(Ordering::Relaxed)
    }

    /// Peer metadata values over the bound, replaced (SPEC §11), on this worker.
    pub fn peer_values_replaced(&self) -> u64 {
        self.process.peer_values_replaced.load(Ordering::Relaxed)
    }

    /// Connections refused by a listener's connection limit on this worker.
    pub fn listener_overflowed(&self) -> u64 {
        self.process.listener_overflowed.load(Ordering::Relaxed)
    }

    /// Captured connections refused on this worker because their original destination was
    /// the proxy's own listener (SPEC §8).
    pub fn capture_loops_refused(&self) -> u64 {
        self.process.capture_loops_refused.load(Ordering::Relaxed)
    }

    /// Connections closed on this worker because a chain's RBAC filters denied them (SPEC §9).
    pub fn rbac_denied(&self) -> u64 {
        self.process.rbac_denied.load(Ordering::Relaxed)
    }

    /// Inbound TLS handshakes refused for `reason` on this worker.
    pub fn tls_refused(&self, reason: TlsRefused) -> u64 {
        self.process.tls_refused[reason as usize].load(Ordering::Relaxed)
    }

    /// HBONE CONNECT requests refused for `reason` on this worker.
    pub fn hbone_refused(&self, reason: HboneRefused) -> u64 {
        self.process.hbone_refused[reason as usize].load(Ordering::Relaxed)
    }

    /// mTLS handshakes completed on this worker, by [`TlsHandshake::index`].
    pub fn tls_handshakes(&self, index: usize) -> u64 {
        self.process.handshake_cell(index).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Exchanges that ended with `outcome` on this worker.
    pub fn exchanges(&self, outcome: ExchangeOutcome) -> u64 {
        self.process.exchange[outcome.index()].load(Ordering::Relaxed)
    }
}

/// Handle to one series of a [`ShardWriter`]; only meaningful to the writer that interned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesId(u32);

/// Write side of one worker's counters, owned by that worker's thread.
#[derive(Debug)]
pub struct ShardWriter {
    shard: Arc<Shard>,
    budget: Arc<LabelBudget>,
    ids: HashMap<LabelSet, SeriesId>,
    /// The overflow series per reporter (Source, Destination), interned on first use.
    overflow: [Option<SeriesId>; 2],
    /// Set once the shared budget refused a unit: it never frees, so stop touching it.
    exhausted: bool,
}

impl ShardWriter {
    /// A writer for worker `worker` and the shard the scraper reads.
    pub fn new(worker: usize, budget: Arc<LabelBudget>) -> (ShardWriter, Arc<Shard>) {
        // Room for the whole budget plus the two overflow series.
        let capacity = budget.max.saturating_add(2);
        let chunks = capacity.div_ceil(CHUNK);
        let shard = Arc::new(Shard {
            worker,
            len: AtomicUsize::new(0),
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            process: ProcessCells::default(),
        });
        let writer = ShardWriter {
            shard: Arc::clone(&shard),
            budget,
            ids: HashMap::new(),
            overflow: [None, None],
            exhausted: false,
        };
        (writer, shard)
    }

    /// The series of `labels`, created on first sight. Beyond the [`LabelBudget`] (or this
    /// shard's capacity) the label set is not kept: it maps to the overflow series (same
    /// `reporter`, every other label `overflow`) and counts `ringside_label_sets_overflowed_total`
    /// once per call, i.e. once per connection whose labels were lost.
    pub fn intern(&mut self, labels: LabelSet) -> SeriesId {
        if let Some(id) = self.ids.get(&labels) {
            return *id;
        }
        if !self.exhausted && self.budget.try_take() {
            if let Some(id) = self.push(labels.clone()) {
                self.ids.insert(labels, id);
                return id;
            }
        } else {
            self.exhausted = true;
        }
        let p = &self.shard.process;
        add(&p.label_sets_overflowed, 1);
        let reporter = labels.reporter();
        let slot = reporter as usize;
        if let Some(id) = self.overflow.get(slot).copied().flatten() {
            return id;
        }
        // Two slots beyond the budget are reserved for the overflow series; `push` only fails
        // past capacity, which the budget keeps at least two short of.
        let id = self.push(LabelSet::overflow(reporter)).unwrap_or(SeriesId(0));
        if let Some(o) = self.overflow.get_mut(slot) {
            *o = Some(id);
        }
        id
    }

    /// Whether `id` is an overflow series (callers must not cache it: every connection that
    /// lands there is counted by `intern`).
    pub fn is_overflow(&self, id: SeriesId) -> bool {
        self.overflow.contains(&Some(id))
    }

    /// Appends a series and publishes it; None past the shard's capacity.
    fn push(&mut self, labels: LabelSet) -> Option<SeriesId> {
        let i = self.shard.len.load(Ordering::Relaxed);
        let id = u32::try_from(i).ok()?;
        let chunk = self.shard.chunks.get(i / CHUNK)?.get_or_init(Chunk::new);
        chunk.labels.get(i % CHUNK)?.set(labels).ok()?;
        // Release: a reader that sees the new length sees the series' labels and zeroed cells.
        self.shard.len.store(i + 1, Ordering::Release);
        Some(SeriesId(id))
    }

    /// Adds a connection's deltas to series `id`.
    pub fn fold(&self, id: SeriesId, d: Delta) {
        debug_assert!((id.0 as usize) < self.shard.len.load(Ordering::Relaxed));
        if let Some(c) = self.shard.cells(id.0 as usize) {
            add(&c.opened, d.opened);
            add(&c.received_bytes, d.received_bytes);
            add(&c.sent_bytes, d.sent_bytes);
            // Last and Release (a plain store, still no read-modify-write): see `Cells::load`.
            if d.closed != 0 {
                c.closed.store(c.closed.load(Ordering::Relaxed).wrapping_add(d.closed), Ordering::Release);
            }
        }
    }

    /// Sets the number of connections open on this worker.
    pub fn set_active_connections(&self, n: u64) {
        self.shard.process.active_connections.store(n, Ordering::Relaxed);
    }

    /// Counts one exchange outcome.
    pub fn count_exchange(&self, outcome: ExchangeOutcome) {
        add(&self.shard.process.exchange[outcome.index()], 1);
    }

    /// Counts one connection refused by a listener's connection limit.
    pub fn count_listener_overflow(&self) {
        add(&self.shard.process.listener_overflowed, 1);
    }

    /// Counts `n` peer metadata values over the bound, replaced (SPEC §11).
    pub fn count_peer_values_replaced(&self, n: u32) {
        add(&self.shard.process.peer_values_replaced, u64::from(n));
    }

    /// Counts one inbound TLS handshake refused (SPEC §7 strict: closed, never relayed).
    pub fn count_tls_refused(&self, reason: TlsRefused) {
        add(&self.shard.process.tls_refused[reason as usize], 1);
    }

    /// Counts one completed mTLS handshake, full or resumed (README Decisions: resumption).
    pub fn count_tls_handshake(&self, h: TlsHandshake) {
        if let Some(cell) = self.shard.process.handshake_cell(h.index()) {
            add(cell, 1);
        }
    }

    /// Counts one captured connection refused as a loop (SPEC §8).
    pub fn count_capture_loop(&self) {
        add(&self.shard.process.capture_loops_refused, 1);
    }

    /// Counts one connection denied by its chain's RBAC filters (SPEC §9: closed, never relayed).
    pub fn count_rbac_denied(&self) {
        add(&self.shard.process.rbac_denied, 1);
    }

    /// Counts one HBONE CONNECT request refused (SPEC §12: nothing reached a backend).
    pub fn count_hbone_refused(&self, reason: HboneRefused) {
        add(&self.shard.process.hbone_refused[reason as usize], 1);
    }
}

#[cfg(test)]
mod tests {
    use super::super::labels::tests::{conn, no_service, node};
    use super::super::labels::{Reporter, label_set};
    use super::*;
    use crate::exchange::NodeMetadata;

    fn distinct(i: usize) -> LabelSet {
        let local = node(&format!("wl-{i}"), "ns", "", &[]);
        let s = no_service();
        label_set(&conn(Reporter::Source, &local, None, &s))
    }

    #[test]
    fn fold_adds_deltas_and_intern_returns_the_same_series_for_the_same_labels() {
        let (mut w, shard) = ShardWriter::new(3, LabelBudget::new(10));
        let a = w.intern(distinct(1));
        let b = w.intern(distinct(2));
        assert_ne!(a, b);
        assert_eq!(w.intern(distinct(1)), a);
        w.fold(a, Delta { opened: 1, closed: 0, received_bytes: 6, sent_bytes: 12 });
        w.fold(a, Delta { opened: 0, closed: 1, received_bytes: 1, sent_bytes: 0 });
        let series: Vec<_> = shard.series().collect();
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].0, &distinct(1));
        assert_eq!(series[0].1, [1, 1, 7, 12]);
        assert_eq!(series[1].1, [0, 0, 0, 0]);
        assert_eq!(shard.worker(), 3);
    }

    #[test]
    fn an_idle_shard_allocates_no_cells() {
        let (_w, shard) = ShardWriter::new(0, LabelBudget::new(100_000));
        assert!(shard.is_empty());
        assert!(shard.chunks.iter().all(|c| c.get().is_none()));
        assert!(shard.capacity() >= 100_002);
    }

    #[test]
    fn each_series_cells_sit_on_their_own_cache_line() {
        assert_eq!(std::mem::align_of::<Cells>(), 64);
        assert_eq!(std::mem::size_of::<Cells>(), 64);
    }

    #[test]
    fn overflow_series_keeps_the_reporter_and_sets_every_other_label_to_overflow() {
        let (mut w, shard) = ShardWriter::new(0, LabelBudget::new(0));
        let (l, s) = (NodeMetadata::default(), no_service());
        let dst = label_set(&conn(Reporter::Destination, &l, None, &s));
        let a = w.intern(distinct(1));
        let b = w.intern(dst);
        assert_ne!(a, b);
        let series: Vec<_> = shard.series().map(|(l, _)| l.clone()).collect();
        assert_eq!(series, [LabelSet::overflow(Reporter::Source), LabelSet::overflow(Reporter::Destination)]);
        assert_eq!(series[1].get("reporter"), Some("destination"));
        assert!(series[1].values()[1..].iter().all(|v| &**v == "overflow"));
        assert_eq!(shard.label_sets_overflowed(), 2);
    }
}
