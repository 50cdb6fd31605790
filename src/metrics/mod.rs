//! Istio TCP metrics (SPEC §3): label sets with Istio's canonical fallbacks ([`labels`]),
//! per-worker shards of per-label-set counters ([`shard`]), and rendering in Prometheus text
//! format 0.0.4 ([`render()`]).
//!
//! Pure: no I/O, no runtime, no clocks, no threads, no locks. A worker owns one [`ShardWriter`]
//! (single writer, relaxed load + store, no read-modify-write); the scraper reads every worker's
//! [`Shard`] through an `Arc` and never blocks a writer.

pub mod labels;
pub mod render;
pub mod shard;

pub use labels::{
    CANONICAL_NAME, CANONICAL_REVISION, ConnLabels, LABEL_NAMES, LabelSet, OVERFLOW, PeerLabels, Reporter,
    ServiceInfo, label_set, principal_namespace, with_canonical_labels,
};
pub use render::{CONTENT_TYPE, ISTIO_COUNTERS, ISTIO_HELP, render};
pub use shard::{
    Delta, ExchangeOutcome, HboneRefused, LabelBudget, SeriesId, Shard, ShardWriter, TLS_SUITES,
    TlsHandshake, TlsRefused,
};
