//! ringside: a thread-per-core io_uring L4 sidecar proxy that speaks Istio's
//! `istio-peer-exchange` and exports Istio's TCP metrics.
#![deny(unsafe_code)]
pub mod exchange;
