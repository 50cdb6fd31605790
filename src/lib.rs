//! ringside: a thread-per-core io_uring L4 sidecar proxy that speaks Istio's
//! `istio-peer-exchange` and exports Istio's TCP metrics.
#![deny(unsafe_code)]

pub mod exchange; // istio-peer-exchange codec; no I/O
pub mod metrics; // label sets, canonical fallbacks, per-worker shards, render; no I/O
