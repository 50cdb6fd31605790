//! ringside: a thread-per-core io_uring L4 sidecar proxy that speaks Istio's
//! `istio-peer-exchange` and exports Istio's TCP metrics.
//!
//! `unsafe` is denied everywhere but `socket`, which wraps the few syscalls monoio does not
//! offer (readiness on split halves, SO_LINGER reset, splice) and says why each is sound.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log; // access log lines: Envoy's command operators at L4, Istio's format; a writer thread
pub mod admin; // /ready, /stats/prometheus, /config_dump, /drain, /healthz/ready
pub mod backoff; // accept back-off on EMFILE and friends: pause length, log pacing. No I/O.
pub mod bootstrap; // Envoy's bootstrap (JSON/YAML) as pilot-agent renders it -> config. No I/O.
pub mod busy_poll; // opt-in: poll instead of sleeping for a window after activity
pub mod capture; // original destination, inbound bind to 127.0.0.6, iptables rules (§8)
pub mod chunks; // a vector generations share in chunks: O(1) clone, one chunk copied per change. No I/O.
pub mod cli; // flags -> config overrides
pub mod config; // YAML model, defaults, validate(); durations; file:line errors
pub mod conn; // a connection's context: worker state, counters, settling into labels
pub mod cpus; // workers and pinning from the affinity mask and cgroup CPU quota
pub mod demo; // the built-in two-sidecar demo
pub mod envoy_cli; // Envoy's command line as pilot-agent passes it. No I/O.
pub mod exchange; // istio-peer-exchange codec: encode + incremental parser. No I/O.
pub mod hbone; // HBONE's HTTP/2 CONNECT core: frames, HPACK, connection state. No I/O.
pub mod metrics; // label sets, canonical fallbacks, per-worker shards, render. No I/O.
pub mod rbac; // AuthorizationPolicy as Envoy RBAC filters, evaluated per connection at L4. No I/O.
pub mod recent; // the last few values made from peer bytes, by those bytes: decode once per peer. No I/O.
pub mod relay; // one connection: connect, exchange, copy both halves, close, count
pub mod routing; // clusters, subsets, load balancing, weighted routes; routing::istio reads Istio YAML
pub mod snapshot; // the listener/cluster/route model as per-worker snapshots swapped between connections
pub mod socket; // readiness on split halves, reset, splice: the only unsafe
pub mod tls; // rustls configs, SPIFFE checks, reload; the monoio adaptor (SPEC §7)
pub mod worker; // driver choice, core pinning, per-worker listeners, accept loops, ticks
pub mod xds; // ADS client on its own thread; one module per resource kind: Envoy protos into the config model
