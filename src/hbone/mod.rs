//! HBONE (SPEC §12): Istio ambient's tunnel, HTTP/2 CONNECT streams inside mutual TLS to port
//! 15008. This module is the sans-IO HTTP/2 core: bytes in, events and bytes out, no
//! sockets, no runtime, no clocks, so a monoio worker can drive it over a rustls stream and
//! tests can drive it over anything.
//!
//! - [`frame`]: the RFC 9113 frame codec (incremental decoder, encoders).
//! - [`headers`]: HPACK (decoding by `loona-hpack`, bounded; literal encoding of our own) and
//!   the CONNECT request/response checks with ztunnel's answers (400 for non-CONNECT).
//! - [`conn`]: one connection's state machine in either role: server (terminator) accepts
//!   CONNECT streams, client (originator) opens them; DATA both ways under flow control with
//!   ztunnel's bulk windows (4 MiB a stream, 16 MiB the connection), END_STREAM as half-close,
//!   RST_STREAM(CONNECT_ERROR) for a reset, PING, GOAWAY on drain, at most 100 concurrent
//!   streams each way.
//! - [`baggage`]: peer metadata in the `baggage` header with ztunnel's keys.
//! - [`turn`]: turns at a carrier's shared writer, a turn given back waking one waiter.
//!
//! Checked against the `h2` crate (`tests/hbone_interop.rs`) in both roles.
//!
//! The monoio driver (carriers, pooling, the terminator's rules) is `relay::hbone`; each stream
//! is a side of the relay pipeline (`relay::side`).

pub mod baggage;
pub mod conn;
pub mod frame;
pub mod headers;
pub mod turn;

#[cfg(test)]
mod tests;
