//! HBONE (SPEC §12): Istio ambient's tunnel, HTTP/2 CONNECT streams inside mutual TLS to port
//! 15008. This first slice is the sans-IO HTTP/2 core: bytes in, events and bytes out, no
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
//!
//! Checked against the `h2` crate (`tests/hbone_interop.rs`) in both roles.
//!
//! What the next slice must add (SPEC §12, issue #30):
//! - a monoio driver per connection over the rustls stream (TLS 1.3, ALPN `h2`, SPIFFE checks
//!   as §7): read into a pooled buffer → [`conn::Connection::recv`] → events to streams; each
//!   stream a "side" of the relay pipeline (END_STREAM ↔ FIN, Reset ↔ TCP RST, `consume` after
//!   each write to the local socket, `send_data` + `Event::Writable` for backpressure);
//! - the terminator's policy: `:authority` IP = the address the connection arrived on, port not
//!   one of ours, `200` only after the upstream connect succeeded, else 400/503;
//! - pooling per worker keyed by (source identity, destination identity, address), opening a new
//!   connection when `open` says `AtCapacity`, idle close, PING keepalive timing (ztunnel: every
//!   10 s, 20 s timeout), GOAWAY on drain wired to the worker's drain;
//! - config `tunnel: hbone` / `tunnel: {protocol: hbone, port}`, `baggage` both ways (ztunnel's
//!   keys) and istio_tcp_* metrics with peer labels from it.

pub mod baggage;
pub mod conn;
pub mod frame;
pub mod headers;

#[cfg(test)]
mod tests;
