//! The listener, cluster and route model as immutable snapshots (SPEC §9, §11): the control
//! side publishes a `Published` config with its routing table, both built once there (`Arc`,
//! shared by all workers; unchanged clusters shared with the previous publication); a worker
//! takes it on its tick in O(1) (its `Snapshot`: the shared table and the worker's own
//! balancing state, which outlives publications). A new connection is set up under the
//! snapshot it was accepted under and, once connected, keeps only its listener and cluster
//! (`conn::Conn`), so an update reaches new connections without touching live ones and a
//! live connection pins no generation. No I/O.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};

use crate::config::Config;
use crate::routing::{Balance, Router, Routes};
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
    /// The routing table of `config`, built here once for every worker.
    pub routes: Arc<Routes>,
    /// This generation's mark, held by every worker snapshot made from it (so by every
    /// connection being set up under it): what `ringside_config_generations` counts.
    pub held: Arc<Generation>,
}

/// One publication, counted while anything holds it (the published pointer, a worker's
/// snapshot, a connection's while it is set up, the reaper's queue): the count of
/// generations alive shows that live connections pin none (SPEC §11).
#[derive(Debug)]
pub struct Generation {
    /// Generations alive, shared by every generation of one proxy.
    alive: Arc<AtomicUsize>,
}

impl Generation {
    /// A new generation counted in `alive`.
    fn new(alive: &Arc<AtomicUsize>) -> Arc<Generation> {
        // Once per publication, never per connection.
        alive.fetch_add(1, Ordering::Relaxed);
        Arc::new(Generation { alive: Arc::clone(alive) })
    }

    /// How many generations of this proxy are alive (this one included).
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Published {
    /// The first publication, with the certificates loaded for `config`.
    pub fn first(config: Config, tls: Arc<Certs>) -> Published {
        let live = config.listeners.iter().map(|_| Arc::default()).collect();
        let routes = Arc::new(Routes::new(&config, None));
        let held = Generation::new(&Arc::default());
        Published { generation: 1, config: Arc::new(config), live, tls, routes, held }
    }

    /// The publication that replaces this one with `config` and its certificates; its
    /// routing table shares the clusters that did not change.
    pub fn next(&self, config: Config, tls: Arc<Certs>) -> Published {
        let old: HashMap<&str, &Arc<AtomicUsize>> =
            self.config.listeners.iter().map(|l| l.name.as_str()).zip(&self.live).collect();
        let live = config
            .listeners
            .iter()
            .map(|l| old.get(l.name.as_str()).map_or_else(Arc::default, |c| Arc::clone(c)))
            .collect();
        let routes = Arc::new(Routes::new(&config, Some(&self.routes)));
        let held = Generation::new(&self.held.alive);
        Published { generation: self.generation + 1, config: Arc::new(config), live, tls, routes, held }
    }
}

/// One worker's view of a publication: the config, its router and the listener counters.
#[derive(Debug)]
pub struct Snapshot {
    /// The publication it was built from.
    pub generation: u64,
    /// The configuration (read-only).
    pub config: Arc<Config>,
    /// The publication's routing table with this worker's balancing state.
    pub router: Router,
    /// Live connections per listener across workers (see [`Published::live`]).
    pub live: Vec<Arc<AtomicUsize>>,
    /// TLS certificates per listener and cluster of `config` (see [`Published::tls`]).
    pub tls: Arc<Certs>,
    /// The publication's mark (see [`Published::held`]).
    held: Arc<Generation>,
}

impl Snapshot {
    /// A worker's snapshot of `published`: O(1), pointers only. The worker's balancing state
    /// comes from `previous` (endpoints keep their live counts and ejection), else starts
    /// fresh with `seed`.
    pub fn new(published: &Published, seed: u64, previous: Option<&Snapshot>) -> Snapshot {
        let balance =
            previous.map_or_else(|| Rc::new(Balance::seeded(seed)), |p| Rc::clone(p.router.balance()));
        Snapshot {
            generation: published.generation,
            router: Router::with(Arc::clone(&published.routes), balance),
            config: published.config.clone(),
            live: published.live.clone(),
            tls: published.tls.clone(),
            held: Arc::clone(&published.held),
        }
    }

    /// Index of the listener named `name`.
    pub fn listener(&self, name: &str) -> Option<usize> {
        self.config.listeners.iter().position(|l| l.name == name)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // Freeing a mesh's configuration (10,000 clusters, their endpoints and chains) takes
        // longer than a worker's tick, and a worker often holds the last reference (its
        // previous snapshot, a connection's setup): the references leave for the reaper thread,
        // and the worker only sends two pointers (SPEC §11: a push never holds a worker).
        let empty = EMPTY.get_or_init(|| Arc::new(Config::default()));
        let config = std::mem::replace(&mut self.config, Arc::clone(empty));
        let routes = self.router.take_routes();
        let tls = std::mem::take(&mut self.tls);
        // Counted until the reaper has freed the rest (a tuple drops its fields in order).
        reap(Box::new((config, routes, tls, Arc::clone(&self.held))));
    }
}

/// The configuration a dropped snapshot is left holding (nothing).
static EMPTY: OnceLock<Arc<Config>> = OnceLock::new();

/// Drop `garbage` on the reaper thread (started at the first call); where no thread can be
/// started, here.
fn reap(garbage: Box<dyn Send>) {
    static REAPER: OnceLock<Option<mpsc::Sender<Box<dyn Send>>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Box<dyn Send>>();
        let started = std::thread::Builder::new().name("ringside-reaper".into()).spawn(move || {
            for garbage in rx {
                drop(garbage);
            }
        });
        started.ok().map(|_| tx)
    });
    if let Some(tx) = reaper {
        // Sent, or dropped here if the reaper is gone (the error hands it back).
        let _ = tx.send(garbage);
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
    fn an_endpoint_change_publishes_a_generation_sharing_every_other_chunk_of_clusters_routes_and_tls() {
        let mut yaml = String::from(
            "listeners:\n  - {name: l, listen: 127.0.0.1:1, direction: outbound, cluster: c0}\nclusters:\n",
        );
        for i in 0..1000 {
            yaml.push_str(&format!(
                "  - {{name: c{i}, endpoints: [{{address: 10.1.{}.{}:80}}]}}\n",
                i / 250,
                i % 250
            ));
        }
        let first_cfg = cfg(&yaml);
        let first_tls = Arc::new(Certs::load(&first_cfg).unwrap());
        let first = Published::first(first_cfg.clone(), first_tls);
        let mut second_cfg = first_cfg;
        let mut c = (*second_cfg.clusters[700]).clone();
        c.endpoints = Arc::new(vec![crate::config::Endpoint::at("10.2.0.9:80".parse().unwrap())]);
        second_cfg.clusters[700] = Arc::new(c);
        let second_tls = Arc::new(Certs::next(&first.tls, &second_cfg).unwrap());
        let second = first.next(second_cfg, second_tls);
        let all_but_one = first.config.clusters.chunk_count() - 1;
        assert_eq!(second.config.clusters.shared_chunks(&first.config.clusters), all_but_one);
        let (s1, s2) = (Snapshot::new(&first, 1, None), Snapshot::new(&second, 1, None));
        assert_eq!(s2.router.clusters.shared_chunks(&s1.router.clusters), all_but_one);
        assert_eq!(second.tls.clusters.shared_chunks(&first.tls.clusters), all_but_one);
        assert!(!Arc::ptr_eq(&s2.router.clusters[700], &s1.router.clusters[700]));
        assert!(Arc::ptr_eq(&s2.router.clusters[699], &s1.router.clusters[699]));
    }

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
