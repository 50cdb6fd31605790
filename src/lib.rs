//! ringside: a thread-per-core io_uring L4 sidecar proxy that speaks Istio's
//! `istio-peer-exchange` and exports Istio's TCP metrics.
//!
//! `unsafe` is denied everywhere; the two spots that need it (a readiness wait on a split
//! socket half, SO_LINGER for reset propagation) are in `relay` and say why.
#![deny(unsafe_code)]

pub mod admin; // /ready, /stats/prometheus, /config_dump, /drain, /healthz/ready
pub mod cli; // flags -> config overrides
pub mod config; // YAML model, defaults, validate(); durations; file:line errors
pub mod demo; // the built-in two-sidecar demo
pub mod exchange; // istio-peer-exchange codec: encode + incremental parser. No I/O.
pub mod metrics; // label sets, canonical fallbacks, per-worker shards, render. No I/O.
pub mod relay; // one connection: connect, exchange, copy both halves, close, count
pub mod routing; // clusters, subsets, load balancing, weighted routes
pub mod worker; // driver choice, core pinning, per-worker listeners, buffer pool, ticks
