//! Istio TCP metrics (SPEC §3): label sets with Istio's canonical fallbacks, per-worker shards of
//! per-label-set counters, and rendering in Prometheus text format 0.0.4.
//!
//! Pure: no I/O, no runtime, no clocks, no threads, no locks. A worker owns one [`ShardWriter`]
//! (single writer, relaxed load + store, no read-modify-write); the scraper reads every worker's
//! [`Shard`] through an `Arc` and never blocks a writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::{Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use crate::exchange::NodeMetadata;

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Label names of every Istio TCP series, in the order Istio's proxy emits them (SPEC §3).
pub const LABEL_NAMES: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Counter names, in [`Delta`] field order (opened, closed, received, sent).
pub const ISTIO_COUNTERS: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
];

const UNKNOWN: &str = "unknown";
const LATEST: &str = "latest";
/// Value of every label but `reporter` on the overflow series of a full [`LabelBudget`].
pub const OVERFLOW: &str = "overflow";

/// Pod label Istio's injector reads (and writes into the preamble) for the canonical service.
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Pod label Istio's injector reads (and writes into the preamble) for the canonical revision.
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
const K8S_NAME: &str = "app.kubernetes.io/name";
const K8S_VERSION: &str = "app.kubernetes.io/version";

/// Which side of the connection reports: `source` on outbound listeners, `destination` inbound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The outbound side: the local node is `source_*`, the peer `destination_*`.
    Source,
    /// The inbound side: the local node is `destination_*`, the peer `source_*`.
    Destination,
}

impl Reporter {
    /// The `reporter` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Looks a label up, treating an empty value as absent.
fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

/// The local node's canonical service (SPEC §3): `service.istio.io/canonical-name`, else
/// `app.kubernetes.io/name`, else `app`, else the workload name.
fn local_canonical_service(node: &NodeMetadata) -> Option<&str> {
    label(&node.labels, CANONICAL_NAME)
        .or_else(|| label(&node.labels, K8S_NAME))
        .or_else(|| label(&node.labels, "app"))
        .or_else(|| non_empty(&node.workload_name))
}

/// The local node's canonical revision (SPEC §3): `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
fn local_canonical_revision(node: &NodeMetadata) -> &str {
    label(&node.labels, CANONICAL_REVISION)
        .or_else(|| label(&node.labels, K8S_VERSION))
        .or_else(|| label(&node.labels, "version"))
        .unwrap_or(LATEST)
}

/// Fills LABELS `service.istio.io/canonical-name` / `-revision` of the local node from the SPEC §3
/// local fallbacks when absent (the preamble ringside writes carries them, as an injected Istio
/// pod's does). Without any name source (no labels, no workload name) the name stays absent.
pub fn with_canonical_labels(mut node: NodeMetadata) -> NodeMetadata {
    if label(&node.labels, CANONICAL_NAME).is_none()
        && let Some(name) = local_canonical_service(&node).map(str::to_owned)
    {
        node.labels.insert(CANONICAL_NAME.to_owned(), name);
    }
    if label(&node.labels, CANONICAL_REVISION).is_none() {
        let revision = local_canonical_revision(&node).to_owned();
        node.labels.insert(CANONICAL_REVISION.to_owned(), revision);
    }
    node
}

/// Service a connection's cluster represents (empty = unknown).
#[derive(Clone, Debug, Default)]
pub struct ServiceInfo {
    /// Service host, e.g. `server.default.svc.cluster.local`.
    pub host: String,
    /// The cluster's service namespace (its `service_namespace` key, else the namespace of the
    /// ServiceEntry it came from); empty lets [`label_set`] derive it from a `NAME.NS.svc.*` host.
    pub namespace: String,
}

/// Everything that decides a connection's labels, gathered once when its peer settles.
#[derive(Clone, Copy, Debug)]
pub struct ConnLabels<'a> {
    /// Which side reports.
    pub reporter: Reporter,
    /// This sidecar's node (see [`with_canonical_labels`]).
    pub local: &'a NodeMetadata,
    /// The peer's metadata from the exchange.
    pub peer: Option<&'a NodeMetadata>,
    /// reporter=source fallback when there was no exchange: the chosen endpoint's labels.
    pub endpoint_labels: Option<&'a BTreeMap<String, String>>,
    /// The service of the connection's cluster.
    pub service: &'a ServiceInfo,
    /// `-` or Envoy's flags (`UF`, `UO`, `NR`, `UH`); empty means `-`.
    pub response_flags: &'a str,
    /// `spiffe://...` of the local certificate under mTLS.
    pub local_principal: Option<&'a str>,
    /// `spiffe://...` of the peer certificate under mTLS.
    pub peer_principal: Option<&'a str>,
    /// Whether the connection is mTLS with a verified peer certificate.
    pub mutual_tls: bool,
}

/// The 23 label values of one series, in [`LABEL_NAMES`] order; cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LabelSet(Arc<[Arc<str>]>);

impl LabelSet {
    /// The value of label `name`, if it is one of [`LABEL_NAMES`].
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = LABEL_NAMES.iter().position(|n| *n == name)?;
        self.0.get(i).map(|v| &**v)
    }

    /// All 23 values, in [`LABEL_NAMES`] order.
    pub fn values(&self) -> &[Arc<str>] {
        &self.0
    }

    /// The reporter this set was built for.
    pub fn reporter(&self) -> Reporter {
        match self.0.first().map(|v| &**v) {
            Some("destination") => Reporter::Destination,
            _ => Reporter::Source,
        }
    }

    /// The series every label set beyond the [`LabelBudget`] is folded into: the same
    /// `reporter`, every other label `overflow`.
    pub fn overflow(reporter: Reporter) -> LabelSet {
        let values: Vec<Arc<str>> = LABEL_NAMES
            .iter()
            .enumerate()
            .map(|(i, _)| Arc::from(if i == 0 { reporter.as_str() } else { OVERFLOW }))
            .collect();
        LabelSet(values.into())
    }

    fn from_values(values: [&str; 23]) -> LabelSet {
        let values: Vec<Arc<str>> = values.iter().map(|v| Arc::from(*v)).collect();
        LabelSet(values.into())
    }
}

/// The labels of one side of a connection.
struct Side<'a> {
    workload: &'a str,
    canonical_service: &'a str,
    canonical_revision: &'a str,
    namespace: &'a str,
    principal: &'a str,
    app: &'a str,
    version: &'a str,
    cluster: &'a str,
}

/// The namespace of a SPIFFE id `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let path = principal.strip_prefix("spiffe://")?;
    let mut segments = path.split('/').skip(1); // trust domain
    while let Some(segment) = segments.next() {
        if segment == "ns" {
            return segments.next().filter(|ns| !ns.is_empty());
        }
    }
    None
}

fn local_side<'a>(node: &'a NodeMetadata, principal: Option<&'a str>) -> Side<'a> {
    let labels = &node.labels;
    Side {
        workload: non_empty(&node.workload_name).unwrap_or(UNKNOWN),
        canonical_service: local_canonical_service(node).unwrap_or(UNKNOWN),
        canonical_revision: local_canonical_revision(node),
        namespace: non_empty(&node.namespace).unwrap_or(UNKNOWN),
        principal: principal.and_then(non_empty).unwrap_or(UNKNOWN),
        app: label(labels, "app").or_else(|| label(labels, K8S_NAME)).unwrap_or(UNKNOWN),
        version: label(labels, "version").or_else(|| label(labels, K8S_VERSION)).unwrap_or(UNKNOWN),
        // Istio's proxy reports its own cluster as `Kubernetes` when CLUSTER_ID is unset.
        cluster: non_empty(&node.cluster_id).unwrap_or("Kubernetes"),
    }
}

/// The peer's side, read exactly as Istio's proxy reads peer metadata (SPEC §3): `node` is the
/// exchanged metadata, `labels` its LABELS (or the chosen endpoint's labels without exchange).
fn peer_side<'a>(
    node: Option<&'a NodeMetadata>,
    labels: Option<&'a BTreeMap<String, String>>,
    principal: Option<&'a str>,
) -> Side<'a> {
    let principal = principal.and_then(non_empty);
    let lookup = |key: &str| labels.and_then(|l| label(l, key));
    let field = |f: fn(&'a NodeMetadata) -> &'a str| node.map(f).and_then(non_empty);
    Side {
        workload: field(|n| &n.workload_name).unwrap_or(UNKNOWN),
        canonical_service: lookup(CANONICAL_NAME).unwrap_or(UNKNOWN),
        canonical_revision: lookup(CANONICAL_REVISION).unwrap_or(LATEST),
        namespace: principal
            .and_then(principal_namespace)
            .or_else(|| field(|n| &n.namespace))
            .unwrap_or(UNKNOWN),
        principal: principal.unwrap_or(UNKNOWN),
        app: lookup(K8S_NAME).or_else(|| lookup("app")).unwrap_or(UNKNOWN),
        version: lookup(K8S_VERSION).or_else(|| lookup("version")).unwrap_or(UNKNOWN),
        cluster: field(|n| &n.cluster_id).unwrap_or(UNKNOWN),
    }
}

/// NS of a Kubernetes service host `NAME.NS.svc.DOMAIN`.
fn host_namespace(host: &str) -> Option<&str> {
    let mut parts = host.split('.');
    let (_name, ns, svc) = (parts.next()?, parts.next()?, parts.next()?);
    (svc == "svc" && !ns.is_empty()).then_some(ns)
}

/// Builds a connection's 23 label values by the rules of SPEC §3.
pub fn label_set(c: &ConnLabels) -> LabelSet {
    let local = local_side(c.local, c.local_principal);
    let peer_labels = match (c.peer, c.reporter) {
        (Some(peer), _) => Some(&peer.labels),
        (None, Reporter::Source) => c.endpoint_labels,
        (None, Reporter::Destination) => None,
    };
    let peer = peer_side(c.peer, peer_labels, c.peer_principal);
    let host = non_empty(&c.service.host);
    let host_name = host.and_then(|h| h.split('.').next()).and_then(non_empty);
    let (source, destination, service, service_name, service_namespace, policy) = match c.reporter {
        Reporter::Source => {
            let namespace = non_empty(&c.service.namespace)
                .or_else(|| host.and_then(host_namespace))
                .unwrap_or(if peer.namespace == UNKNOWN { UNKNOWN } else { peer.namespace });
            let service = host.unwrap_or(UNKNOWN);
            let name = host_name.unwrap_or(UNKNOWN);
            (local, peer, service, name, namespace, UNKNOWN)
        }
        Reporter::Destination => {
            let service = host.unwrap_or(local.canonical_service);
            let name = host_name.unwrap_or(local.canonical_service);
            let namespace = local.namespace;
            let policy = if c.mutual_tls { "mutual_tls" } else { "none" };
            (peer, local, service, name, namespace, policy)
        }
    };
    LabelSet::from_values([
        c.reporter.as_str(),
        source.workload,
        source.canonical_service,
        source.canonical_revision,
        source.namespace,
        source.principal,
        source.app,
        source.version,
        source.cluster,
        destination.workload,
        destination.namespace,
        destination.principal,
        destination.app,
        destination.version,
        service,
        destination.canonical_service,
        destination.canonical_revision,
        service_name,
        service_namespace,
        destination.cluster,
        "tcp",
        non_empty(c.response_flags).unwrap_or("-"),
        policy,
    ])
}

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
    exchange: [AtomicU64; 7],
    tls_refused: [AtomicU64; 5],
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

    /// Connections refused by a listener's connection limit on this worker.
    pub fn listener_overflowed(&self) -> u64 {
        self.process.listener_overflowed.load(Ordering::Relaxed)
    }

    /// Inbound TLS handshakes refused for `reason` on this worker.
    pub fn tls_refused(&self, reason: TlsRefused) -> u64 {
        self.process.tls_refused[reason as usize].load(Ordering::Relaxed)
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

    /// Counts one inbound TLS handshake refused (SPEC §7 strict: closed, never relayed).
    pub fn count_tls_refused(&self, reason: TlsRefused) {
        add(&self.shard.process.tls_refused[reason as usize], 1);
    }

    /// Counts one exchange outcome.
    pub fn count_exchange(&self, outcome: ExchangeOutcome) {
        add(&self.shard.process.exchange[outcome.index()], 1);
    }

    /// Counts one connection refused by a listener's connection limit.
    pub fn count_listener_overflow(&self) {
        add(&self.shard.process.listener_overflowed, 1);
    }
}

// Recorder metadata for every series; the Prometheus recorder ignores it.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

fn register_counter(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>, v: u64) {
    let key = Key::from_parts(name, labels);
    recorder.register_counter(&key, &METADATA).absolute(v);
}

fn register_gauge(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>, v: f64) {
    let key = Key::from_parts(name, labels);
    recorder.register_gauge(&key, &METADATA).set(v);
}

fn static_label(key: &'static str, value: impl Into<SharedString>) -> Label {
    Label::new(SharedString::const_str(key), value)
}

/// Sums every shard per label set and renders Prometheus text 0.0.4 through a
/// `metrics-exporter-prometheus` recorder: the four `istio_tcp_*` counters (no HELP line, as
/// Istio's proxy) and the `ringside_*` process metrics (with HELP): `ringside_connections_active
/// {worker}`, `ringside_exchange_total{outcome}`, `ringside_label_sets_overflowed_total`,
/// `ringside_listener_overflowed_total`, `ringside_driver_info{driver}` and
/// `ringside_build_info{version}`.
pub fn render(shards: &[Arc<Shard>], driver: &str) -> String {
    let mut totals: HashMap<&LabelSet, [u64; 4]> = HashMap::new();
    for shard in shards {
        for (labels, values) in shard.series() {
            let sum = totals.entry(labels).or_default();
            for (s, v) in sum.iter_mut().zip(values) {
                *s = s.wrapping_add(v);
            }
        }
    }

    // A recorder per scrape: not installed globally, holds exactly the series of this render.
    // The builder adds no `_total` suffix (recommended naming is off) and no unit suffix, and
    // keeps labels in insertion order.
    let recorder = PrometheusBuilder::new().build_recorder();
    for (labels, values) in &totals {
        let keyed: Vec<Label> = LABEL_NAMES
            .iter()
            .zip(labels.values())
            .map(|(k, v)| static_label(k, SharedString::from_shared(Arc::clone(v))))
            .collect();
        for (name, v) in ISTIO_COUNTERS.iter().zip(values) {
            register_counter(&recorder, name, keyed.clone(), *v);
        }
    }

    let describe_counter = |name: &'static str, help: &'static str| {
        recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
    };
    let describe_gauge = |name: &'static str, help: &'static str| {
        recorder.describe_gauge(KeyName::from_const_str(name), None, help.into());
    };
    describe_gauge("ringside_connections_active", "Connections currently open, per worker.");
    describe_counter(
        "ringside_exchange_total",
        "Peer exchanges by outcome, like Istio's metadata_exchange stats.",
    );
    describe_counter(
        "ringside_label_sets_overflowed_total",
        "Connections whose label set exceeded the label set budget and was folded into the overflow series.",
    );
    describe_counter(
        "ringside_listener_overflowed_total",
        "Connections closed at once because a listener was at its connection limit.",
    );
    describe_counter(
        "ringside_tls_refused_total",
        "Inbound mTLS handshakes refused, by reason; no byte of theirs reached the application.",
    );
    describe_gauge("ringside_driver_info", "I/O driver in use.");
    describe_gauge("ringside_build_info", "ringside build.");

    let mut exchanges = [0u64; 7];
    let mut refused = [0u64; 5];
    let (mut overflowed, mut listener) = (0u64, 0u64);
    for shard in shards {
        register_gauge(
            &recorder,
            "ringside_connections_active",
            vec![static_label("worker", shard.worker.to_string())],
            shard.active_connections() as f64,
        );
        for (sum, outcome) in exchanges.iter_mut().zip(ExchangeOutcome::ALL) {
            *sum = sum.wrapping_add(shard.exchanges(outcome));
        }
        for (sum, reason) in refused.iter_mut().zip(TlsRefused::ALL) {
            *sum = sum.wrapping_add(shard.tls_refused(reason));
        }
        overflowed = overflowed.wrapping_add(shard.label_sets_overflowed());
        listener = listener.wrapping_add(shard.listener_overflowed());
    }
    for (sum, outcome) in exchanges.iter().zip(ExchangeOutcome::ALL) {
        let labels = vec![static_label("outcome", SharedString::const_str(outcome.as_str()))];
        register_counter(&recorder, "ringside_exchange_total", labels, *sum);
    }
    for (sum, reason) in refused.iter().zip(TlsRefused::ALL) {
        let labels = vec![static_label("reason", SharedString::const_str(reason.as_str()))];
        register_counter(&recorder, "ringside_tls_refused_total", labels, *sum);
    }
    let overflow_name = "ringside_label_sets_overflowed_total";
    register_counter(&recorder, overflow_name, vec![], overflowed);
    register_counter(&recorder, "ringside_listener_overflowed_total", vec![], listener);
    let driver = vec![static_label("driver", driver.to_owned())];
    register_gauge(&recorder, "ringside_driver_info", driver, 1.0);
    let version = vec![static_label("version", env!("CARGO_PKG_VERSION"))];
    register_gauge(&recorder, "ringside_build_info", version, 1.0);

    recorder.handle().render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn node(workload: &str, ns: &str, cluster: &str, l: &[(&str, &str)]) -> NodeMetadata {
        NodeMetadata {
            workload_name: workload.into(),
            namespace: ns.into(),
            cluster_id: cluster.into(),
            labels: labels(l),
            ..Default::default()
        }
    }

    fn conn<'a>(
        reporter: Reporter,
        local: &'a NodeMetadata,
        peer: Option<&'a NodeMetadata>,
        service: &'a ServiceInfo,
    ) -> ConnLabels<'a> {
        ConnLabels {
            reporter,
            local,
            peer,
            endpoint_labels: None,
            service,
            response_flags: "-",
            local_principal: None,
            peer_principal: None,
            mutual_tls: false,
        }
    }

    fn no_service() -> ServiceInfo {
        ServiceInfo::default()
    }

    /// The local node's labels as reporter=source (local = source_*).
    fn local_src(n: &NodeMetadata) -> LabelSet {
        let s = no_service();
        label_set(&conn(Reporter::Source, n, None, &s))
    }

    /// The peer's labels as reporter=source (peer = destination_*).
    fn peer_dst(p: &NodeMetadata) -> LabelSet {
        let (l, s) = (NodeMetadata::default(), no_service());
        label_set(&conn(Reporter::Source, &l, Some(p), &s))
    }

    #[test]
    fn label_names_are_the_23_of_spec_3_in_order() {
        assert_eq!(LABEL_NAMES.len(), 23);
        assert_eq!(LABEL_NAMES[0], "reporter");
        assert_eq!(LABEL_NAMES[22], "connection_security_policy");
        let s = local_src(&NodeMetadata::default());
        assert_eq!(s.values().len(), 23);
        assert_eq!(s.get("request_protocol"), Some("tcp"));
        assert_eq!(s.get("no_such_label"), None);
    }

    #[test]
    fn local_canonical_service_is_canonical_name_else_k8s_name_else_app_else_workload() {
        let full = [(CANONICAL_NAME, "canon"), (K8S_NAME, "k8s"), ("app", "app")];
        let cs = |l: &[(&str, &str)], w: &str| {
            local_src(&node(w, "", "", l)).get("source_canonical_service").unwrap().to_owned()
        };
        assert_eq!(cs(&full, "wl"), "canon");
        assert_eq!(cs(&full[1..], "wl"), "k8s");
        assert_eq!(cs(&full[2..], "wl"), "app");
        assert_eq!(cs(&[], "wl"), "wl");
        assert_eq!(cs(&[], ""), "unknown");
        // An empty label value is absent.
        assert_eq!(cs(&[(CANONICAL_NAME, ""), ("app", "app")], "wl"), "app");
    }

    #[test]
    fn local_canonical_revision_is_canonical_revision_else_k8s_version_else_version_else_latest() {
        let full = [(CANONICAL_REVISION, "rev"), (K8S_VERSION, "k8sv"), ("version", "v1")];
        let cr = |l: &[(&str, &str)]| {
            local_src(&node("wl", "", "", l)).get("source_canonical_revision").unwrap().to_owned()
        };
        assert_eq!(cr(&full), "rev");
        assert_eq!(cr(&full[1..]), "k8sv");
        assert_eq!(cr(&full[2..]), "v1");
        assert_eq!(cr(&[]), "latest");
    }

    #[test]
    fn local_app_is_app_else_k8s_name_and_version_is_version_else_k8s_version() {
        let both = node("", "", "", &[("app", "a"), (K8S_NAME, "kn"), ("version", "v"), (K8S_VERSION, "kv")]);
        let s = local_src(&both);
        assert_eq!(s.get("source_app"), Some("a"));
        assert_eq!(s.get("source_version"), Some("v"));
        let k8s = node("", "", "", &[(K8S_NAME, "kn"), (K8S_VERSION, "kv")]);
        let s = local_src(&k8s);
        assert_eq!(s.get("source_app"), Some("kn"));
        assert_eq!(s.get("source_version"), Some("kv"));
        let s = local_src(&NodeMetadata::default());
        assert_eq!(s.get("source_app"), Some("unknown"));
        assert_eq!(s.get("source_version"), Some("unknown"));
    }

    #[test]
    fn local_cluster_is_cluster_id_else_kubernetes_and_missing_fields_are_unknown() {
        let s = local_src(&node("wl", "ns", "c1", &[]));
        assert_eq!(s.get("source_cluster"), Some("c1"));
        assert_eq!(s.get("source_workload"), Some("wl"));
        assert_eq!(s.get("source_workload_namespace"), Some("ns"));
        let s = local_src(&NodeMetadata::default());
        assert_eq!(s.get("source_cluster"), Some("Kubernetes"));
        assert_eq!(s.get("source_workload"), Some("unknown"));
        assert_eq!(s.get("source_workload_namespace"), Some("unknown"));
        assert_eq!(s.get("source_principal"), Some("unknown"));
    }

    #[test]
    fn peer_app_is_k8s_name_else_app_and_version_is_k8s_version_else_version() {
        let both = node("", "", "", &[("app", "a"), (K8S_NAME, "kn"), ("version", "v"), (K8S_VERSION, "kv")]);
        let s = peer_dst(&both);
        assert_eq!(s.get("destination_app"), Some("kn"));
        assert_eq!(s.get("destination_version"), Some("kv"));
        let plain = node("", "", "", &[("app", "a"), ("version", "v")]);
        let s = peer_dst(&plain);
        assert_eq!(s.get("destination_app"), Some("a"));
        assert_eq!(s.get("destination_version"), Some("v"));
        let s = peer_dst(&NodeMetadata::default());
        assert_eq!(s.get("destination_app"), Some("unknown"));
        assert_eq!(s.get("destination_version"), Some("unknown"));
    }

    #[test]
    fn peer_canonical_labels_come_only_from_the_canonical_keys_else_unknown_and_latest() {
        let canon = node("wl", "", "", &[(CANONICAL_NAME, "cn"), (CANONICAL_REVISION, "cr")]);
        let s = peer_dst(&canon);
        assert_eq!(s.get("destination_canonical_service"), Some("cn"));
        assert_eq!(s.get("destination_canonical_revision"), Some("cr"));
        // No local-style fallback to app/version/workload for a peer.
        let other = node("wl", "", "", &[("app", "a"), ("version", "v"), (K8S_NAME, "k")]);
        let s = peer_dst(&other);
        assert_eq!(s.get("destination_canonical_service"), Some("unknown"));
        assert_eq!(s.get("destination_canonical_revision"), Some("latest"));
    }

    #[test]
    fn peer_workload_and_cluster_come_from_its_metadata_else_unknown() {
        let s = peer_dst(&node("wl", "ns", "c2", &[]));
        assert_eq!(s.get("destination_workload"), Some("wl"));
        assert_eq!(s.get("destination_cluster"), Some("c2"));
        assert_eq!(s.get("destination_workload_namespace"), Some("ns"));
        let s = peer_dst(&NodeMetadata::default());
        assert_eq!(s.get("destination_workload"), Some("unknown"));
        // A peer's missing cluster is unknown, not the local default `Kubernetes`.
        assert_eq!(s.get("destination_cluster"), Some("unknown"));
        assert_eq!(s.get("destination_workload_namespace"), Some("unknown"));
    }

    #[test]
    fn peer_namespace_comes_from_the_spiffe_id_when_there_is_one_else_from_metadata() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let p = node("", "meta-ns", "", &[]);
        let mut c = conn(Reporter::Destination, &l, Some(&p), &s);
        c.peer_principal = Some("spiffe://cluster.local/ns/cert-ns/sa/client");
        let set = label_set(&c);
        assert_eq!(set.get("source_workload_namespace"), Some("cert-ns"));
        assert_eq!(set.get("source_principal"), Some("spiffe://cluster.local/ns/cert-ns/sa/client"));
        c.peer_principal = None;
        assert_eq!(label_set(&c).get("source_workload_namespace"), Some("meta-ns"));
        // Without exchange, the certificate still names the namespace.
        c.peer = None;
        c.peer_principal = Some("spiffe://td/ns/only-cert/sa/x");
        assert_eq!(label_set(&c).get("source_workload_namespace"), Some("only-cert"));
        c.peer_principal = Some("spiffe://td/weird");
        assert_eq!(label_set(&c).get("source_workload_namespace"), Some("unknown"));
    }

    #[test]
    fn principal_namespace_parses_only_spiffe_ns_segments() {
        assert_eq!(principal_namespace("spiffe://cluster.local/ns/default/sa/x"), Some("default"));
        assert_eq!(principal_namespace("spiffe://td/ns//sa/x"), None);
        assert_eq!(principal_namespace("spiffe://ns/sa/x"), None);
        assert_eq!(principal_namespace("https://td/ns/a/sa/x"), None);
        assert_eq!(principal_namespace("spiffe://td/ns"), None);
    }

    #[test]
    fn principals_are_the_certificates_else_unknown_and_follow_the_reporter() {
        let (l, p, s) = (NodeMetadata::default(), NodeMetadata::default(), no_service());
        let mut c = conn(Reporter::Source, &l, Some(&p), &s);
        c.local_principal = Some("spiffe://td/ns/a/sa/me");
        c.peer_principal = Some("spiffe://td/ns/b/sa/you");
        c.mutual_tls = true;
        let set = label_set(&c);
        assert_eq!(set.get("source_principal"), Some("spiffe://td/ns/a/sa/me"));
        assert_eq!(set.get("destination_principal"), Some("spiffe://td/ns/b/sa/you"));
        c.reporter = Reporter::Destination;
        let set = label_set(&c);
        assert_eq!(set.get("source_principal"), Some("spiffe://td/ns/b/sa/you"));
        assert_eq!(set.get("destination_principal"), Some("spiffe://td/ns/a/sa/me"));
        c.local_principal = None;
        c.peer_principal = Some("");
        let set = label_set(&c);
        assert_eq!(set.get("source_principal"), Some("unknown"));
        assert_eq!(set.get("destination_principal"), Some("unknown"));
    }

    #[test]
    fn connection_security_policy_is_mutual_tls_or_none_inbound_and_unknown_outbound() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let mut c = conn(Reporter::Destination, &l, None, &s);
        c.mutual_tls = true;
        assert_eq!(label_set(&c).get("connection_security_policy"), Some("mutual_tls"));
        c.mutual_tls = false;
        assert_eq!(label_set(&c).get("connection_security_policy"), Some("none"));
        c.reporter = Reporter::Source;
        c.mutual_tls = true;
        assert_eq!(label_set(&c).get("connection_security_policy"), Some("unknown"));
    }

    #[test]
    fn reporter_source_puts_the_local_node_in_source_and_the_peer_in_destination() {
        let local = node("me", "ns-a", "ca", &[("app", "mine")]);
        let peer = node("you", "ns-b", "cb", &[("app", "yours")]);
        let s = no_service();
        let set = label_set(&conn(Reporter::Source, &local, Some(&peer), &s));
        assert_eq!(set.get("reporter"), Some("source"));
        assert_eq!(set.get("source_workload"), Some("me"));
        assert_eq!(set.get("source_app"), Some("mine"));
        assert_eq!(set.get("destination_workload"), Some("you"));
        assert_eq!(set.get("destination_app"), Some("yours"));
        let set = label_set(&conn(Reporter::Destination, &local, Some(&peer), &s));
        assert_eq!(set.get("reporter"), Some("destination"));
        assert_eq!(set.get("source_workload"), Some("you"));
        assert_eq!(set.get("source_cluster"), Some("cb"));
        assert_eq!(set.get("destination_workload"), Some("me"));
        assert_eq!(set.get("destination_cluster"), Some("ca"));
    }

    #[test]
    fn reporter_source_destination_service_is_the_host_its_first_label_and_service_namespace() {
        let (l, p) = (NodeMetadata::default(), node("", "peer-ns", "", &[]));
        let svc = ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: "svc-ns".into() };
        let set = label_set(&conn(Reporter::Source, &l, Some(&p), &svc));
        assert_eq!(set.get("destination_service"), Some("server.default.svc.cluster.local"));
        assert_eq!(set.get("destination_service_name"), Some("server"));
        assert_eq!(set.get("destination_service_namespace"), Some("svc-ns"));
        // No service namespace: NS of NAME.NS.svc.DOMAIN.
        let svc = ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: String::new() };
        let set = label_set(&conn(Reporter::Source, &l, Some(&p), &svc));
        assert_eq!(set.get("destination_service_namespace"), Some("default"));
        // Not a Kubernetes host: the peer's namespace.
        let svc = ServiceInfo { host: "db.example.com".into(), namespace: String::new() };
        let set = label_set(&conn(Reporter::Source, &l, Some(&p), &svc));
        assert_eq!(set.get("destination_service_name"), Some("db"));
        assert_eq!(set.get("destination_service_namespace"), Some("peer-ns"));
        // Nothing known.
        let (s, none) = (no_service(), NodeMetadata::default());
        let set = label_set(&conn(Reporter::Source, &l, Some(&none), &s));
        assert_eq!(set.get("destination_service"), Some("unknown"));
        assert_eq!(set.get("destination_service_name"), Some("unknown"));
        assert_eq!(set.get("destination_service_namespace"), Some("unknown"));
    }

    #[test]
    fn reporter_destination_service_is_the_inbound_host_else_local_canonical_service() {
        let local = node("wl", "local-ns", "", &[("app", "ratings")]);
        let p = node("", "peer-ns", "", &[]);
        let svc = ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: "svc-ns".into() };
        let set = label_set(&conn(Reporter::Destination, &local, Some(&p), &svc));
        assert_eq!(set.get("destination_service"), Some("server.default.svc.cluster.local"));
        assert_eq!(set.get("destination_service_name"), Some("server"));
        // Always the local namespace inbound, whatever the service or peer say.
        assert_eq!(set.get("destination_service_namespace"), Some("local-ns"));
        let s = no_service();
        let set = label_set(&conn(Reporter::Destination, &local, Some(&p), &s));
        assert_eq!(set.get("destination_service"), Some("ratings"));
        assert_eq!(set.get("destination_service_name"), Some("ratings"));
        let set = label_set(&conn(Reporter::Destination, &NodeMetadata::default(), None, &s));
        assert_eq!(set.get("destination_service"), Some("unknown"));
        assert_eq!(set.get("destination_service_namespace"), Some("unknown"));
    }

    #[test]
    fn without_exchange_reporter_source_reads_the_endpoint_labels_as_a_peer() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let ep = labels(&[("app", "a"), ("version", "v2"), (CANONICAL_NAME, "cn")]);
        let mut c = conn(Reporter::Source, &l, None, &s);
        c.endpoint_labels = Some(&ep);
        let set = label_set(&c);
        assert_eq!(set.get("destination_app"), Some("a"));
        assert_eq!(set.get("destination_version"), Some("v2"));
        assert_eq!(set.get("destination_canonical_service"), Some("cn"));
        assert_eq!(set.get("destination_canonical_revision"), Some("latest"));
        assert_eq!(set.get("destination_workload"), Some("unknown"));
        // The exchange wins over endpoint labels.
        let p = node("", "", "", &[("app", "from-peer")]);
        c.peer = Some(&p);
        assert_eq!(label_set(&c).get("destination_app"), Some("from-peer"));
        // Inbound has no endpoint: the peer is unknown.
        c.peer = None;
        c.reporter = Reporter::Destination;
        assert_eq!(label_set(&c).get("source_app"), Some("unknown"));
    }

    #[test]
    fn response_flags_and_request_protocol() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let mut c = conn(Reporter::Source, &l, None, &s);
        c.response_flags = "UF";
        let set = label_set(&c);
        assert_eq!(set.get("response_flags"), Some("UF"));
        assert_eq!(set.get("request_protocol"), Some("tcp"));
        c.response_flags = "";
        assert_eq!(label_set(&c).get("response_flags"), Some("-"));
    }

    #[test]
    fn with_canonical_labels_fills_absent_canonical_name_and_revision_from_local_fallbacks() {
        let n = with_canonical_labels(node("wl", "", "", &[("app", "a"), ("version", "v1")]));
        assert_eq!(n.labels.get(CANONICAL_NAME).map(String::as_str), Some("a"));
        assert_eq!(n.labels.get(CANONICAL_REVISION).map(String::as_str), Some("v1"));
        let n = with_canonical_labels(node("wl", "", "", &[]));
        assert_eq!(n.labels.get(CANONICAL_NAME).map(String::as_str), Some("wl"));
        assert_eq!(n.labels.get(CANONICAL_REVISION).map(String::as_str), Some("latest"));
        let n = with_canonical_labels(node(
            "wl",
            "",
            "",
            &[(CANONICAL_NAME, "keep"), (CANONICAL_REVISION, "r"), ("app", "a")],
        ));
        assert_eq!(n.labels.get(CANONICAL_NAME).map(String::as_str), Some("keep"));
        assert_eq!(n.labels.get(CANONICAL_REVISION).map(String::as_str), Some("r"));
        let n = with_canonical_labels(NodeMetadata::default());
        assert_eq!(n.labels.get(CANONICAL_NAME), None);
        // What the peer reads from the filled preamble equals what the local side reports.
        let local = node("wl", "", "", &[(K8S_NAME, "k"), (K8S_VERSION, "kv")]);
        let filled = with_canonical_labels(local.clone());
        let l = local_src(&local);
        let p = peer_dst(&filled);
        assert_eq!(l.get("source_canonical_service"), p.get("destination_canonical_service"));
        assert_eq!(l.get("source_canonical_revision"), p.get("destination_canonical_revision"));
    }

    proptest::proptest! {
        #[test]
        fn any_metadata_gives_23_non_empty_values_without_panicking(
            workload in ".*", ns in ".*", cluster in ".*", key in ".*", value in ".*",
            principal in ".*", host in ".*", flags in ".*", source in proptest::bool::ANY,
        ) {
            let n = node(&workload, &ns, &cluster, &[(&key, &value), (CANONICAL_NAME, &value)]);
            let svc = ServiceInfo { host: host.clone(), namespace: String::new() };
            let reporter = if source { Reporter::Source } else { Reporter::Destination };
            let mut c = conn(reporter, &n, Some(&n), &svc);
            c.peer_principal = Some(&principal);
            c.response_flags = &flags;
            let set = label_set(&c);
            proptest::prop_assert_eq!(set.values().len(), 23);
            proptest::prop_assert!(set.values().iter().all(|v| !v.is_empty()));
        }
    }

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

    #[test]
    fn process_counters_are_per_worker_and_rendered() {
        let budget = LabelBudget::new(10);
        let (w0, s0) = ShardWriter::new(0, Arc::clone(&budget));
        let (w1, s1) = ShardWriter::new(1, budget);
        w0.set_active_connections(3);
        w1.set_active_connections(4);
        w0.count_exchange(ExchangeOutcome::MetadataAdded);
        w1.count_exchange(ExchangeOutcome::MetadataAdded);
        w1.count_exchange(ExchangeOutcome::Timeout);
        w1.count_listener_overflow();
        let text = render(&[s0, s1], "epoll");
        for line in [
            "ringside_connections_active{worker=\"0\"} 3",
            "ringside_connections_active{worker=\"1\"} 4",
            "ringside_exchange_total{outcome=\"metadata_added\"} 2",
            "ringside_exchange_total{outcome=\"timeout\"} 1",
            "ringside_exchange_total{outcome=\"header_not_found\"} 0",
            "ringside_label_sets_overflowed_total 0",
            "ringside_listener_overflowed_total 1",
            "ringside_driver_info{driver=\"epoll\"} 1",
            &format!("ringside_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
            "# TYPE ringside_exchange_total counter",
            "# TYPE ringside_connections_active gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn render_keeps_label_order_escapes_values_and_writes_no_help_for_istio_counters() {
        let (mut w, shard) = ShardWriter::new(0, LabelBudget::new(10));
        let local = node("a\"b\\c\nd", "ns", "", &[]);
        let s = no_service();
        let set = label_set(&conn(Reporter::Source, &local, None, &s));
        let id = w.intern(set);
        w.fold(id, Delta { opened: 2, closed: 1, received_bytes: 5, sent_bytes: 9 });
        let text = render(&[shard], "uring");
        assert!(!text.contains("# HELP istio_"));
        assert!(!text.contains("_total_total"));
        let line = text.lines().find(|l| l.starts_with("istio_tcp_sent_bytes_total{")).unwrap();
        assert!(line.ends_with("} 9"), "{line}");
        let names: Vec<&str> = line
            .split(['{', ','])
            .skip(1)
            .filter_map(|kv| kv.split_once("=\"").map(|(k, _)| k))
            .filter(|k| LABEL_NAMES.contains(k))
            .collect();
        assert_eq!(names, LABEL_NAMES);
        assert!(line.contains(r#"source_workload="a\"b\\c\nd""#), "{line}");
        assert!(text.lines().any(|l| l == "# TYPE istio_tcp_connections_opened_total counter"));
    }
}
