//! The listener, cluster and route model as immutable snapshots (SPEC §9): the control side
//! publishes a `Published` config (`Arc`, shared by all workers); each worker builds its own
//! `Snapshot` from it (its router, with per-worker `Cell` state) on its tick, and every new
//! connection keeps the snapshot it was accepted under for its whole life, so an update
//! reaches new connections without touching live ones. No I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::config::Config;
use crate::routing::Router;
use crate::tls::Certs;

/// A configuration as published to the workers.
#[derive(Debug)]
pub struct Published {
    /// Increases by one with every publication; workers compare it on their tick.
    pub generation: u64,
    /// The effective configuration (static and xDS parts merged).
    pub config: Arc<Config>,
    /// Live connections per listener (by index) across workers, for `max_connections`: a
    /// listener that stays (same name) keeps its counter across publications.
    pub live: Vec<Arc<AtomicUsize>>,
    /// TLS certificates per listener, filter chain and cluster (by index of `config`), kept
    /// across publications for the same files ([`Certs::next`]).
    pub tls: Arc<Certs>,
}

impl Published {
    /// The first publication, with the certificates loaded for `config`.
    pub fn first(config: Config, tls: Arc<Certs>) -> Published {
        let live = config.listeners.iter().map(|_| Arc::default()).collect();
        Published { generation: 1, config: Arc::new(config), live, tls }
    }

    /// The publication that replaces this one with `config` and its certificates.
    pub fn next(&self, config: Config, tls: Arc<Certs>) -> Published {
        let old: HashMap<&str, &Arc<AtomicUsize>> =
            self.config.listeners.iter().map(|l| l.name.as_str()).zip(&self.live).collect();
        let live = config
            .listeners
            .iter()
            .map(|l| old.get(l.name.as_str()).map_or_else(Arc::default, |c| Arc::clone(c)))
            .collect();
        Published { generation: self.generation + 1, config: Arc::new(config), live, tls }
    }
}

/// One worker's view of a publication: the config, its router and the listener counters.
#[derive(Debug)]
pub struct Snapshot {
    /// The publication it was built from.
    pub generation: u64,
    /// The configuration (read-only).
    pub config: Arc<Config>,
    /// This worker's routing table for it.
    pub router: Router,
    /// Live connections per listener across workers (see [`Published::live`]).
    pub live: Vec<Arc<AtomicUsize>>,
    /// TLS certificates per listener and cluster of `config` (see [`Published::tls`]).
    pub tls: Arc<Certs>,
}

impl Snapshot {
    /// Build a worker's snapshot of `published`; endpoints that were in `previous` keep
    /// their live counts and ejection (`Router::after`).
    pub fn new(published: &Published, seed: u64, previous: Option<&Snapshot>) -> Snapshot {
        Snapshot {
            generation: published.generation,
            router: Router::after(&published.config, seed, previous.map(|p| &p.router)),
            config: published.config.clone(),
            live: published.live.clone(),
            tls: published.tls.clone(),
        }
    }

    /// Index of the listener named `name`.
    pub fn listener(&self, name: &str) -> Option<usize> {
        self.config.listeners.iter().position(|l| l.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn cfg(yaml: &str) -> Config {
        let mut c = Config::parse(yaml, "t.yaml").unwrap();
        c.validate("t.yaml", yaml).unwrap();
        c
    }

    const A: &str = "
listeners:
  - {name: a, listen: 127.0.0.1:1, direction: outbound, cluster: db}
  - {name: b, listen: 127.0.0.1:2, direction: outbound, cluster: db}
clusters:
  - name: db
    load_balancer: least_connection
    endpoints: [{address: 127.0.0.1:10}, {address: 127.0.0.1:11}]
";

    #[test]
    fn a_listener_that_stays_keeps_its_live_counter_and_an_endpoint_that_stays_its_load() {
        let first = Published::first(cfg(A), Default::default());
        first.live[1].fetch_add(3, Ordering::Relaxed);
        let s1 = Snapshot::new(&first, 7, None);
        // Endpoint :10 carries two live connections of the old snapshot.
        s1.router.connected(0, 0);
        s1.router.connected(0, 0);
        let b = A.replace("  - {name: a, listen: 127.0.0.1:1, direction: outbound, cluster: db}\n", "");
        let b = b.replace("{address: 127.0.0.1:10}, ", "{address: 127.0.0.1:12}, {address: 127.0.0.1:10}, ");
        let second = first.next(cfg(&b), Default::default());
        assert_eq!(second.generation, 2);
        assert_eq!(second.live[0].load(Ordering::Relaxed), 3, "listener b kept its counter");
        let s2 = Snapshot::new(&second, 7, Some(&s1));
        assert_eq!(s2.listener("b"), Some(0));
        assert_eq!(s2.listener("a"), None);
        let target = s2.router.route(0).unwrap();
        // :12 (new) and :11 have none; :10 is busy: least_connection never picks it first.
        for _ in 0..4 {
            assert_ne!(s2.router.candidates(target, std::time::Instant::now()).next(), Some(1));
        }
        // The old connections end through the old snapshot and free :10 in the new one too.
        s1.router.disconnected(0, 0);
        s1.router.disconnected(0, 0);
        s2.router.connected(0, 0);
        s2.router.connected(0, 2);
        assert_eq!(s2.router.candidates(target, std::time::Instant::now()).next(), Some(1));
    }
}
