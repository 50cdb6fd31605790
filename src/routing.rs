//! Clusters, subsets, load balancing and weighted TCP routes (SPEC §6), one `Router` per
//! worker. Pure: no sockets, no clocks; per-worker state lives in `Cell`s (single thread).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::config::{Capture, Config, LoadBalancer};
use crate::metrics::ServiceInfo;

/// A cluster (optionally a subset) a connection was routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Index into the router's clusters.
    pub cluster: usize,
    /// Index into that cluster's subsets.
    pub subset: Option<usize>,
}

/// One endpoint and this worker's live-connection count for it.
#[derive(Debug)]
pub struct EndpointState {
    /// Address to connect to.
    pub address: SocketAddr,
    /// Labels (subset selection; peer labels when there was no exchange).
    pub labels: BTreeMap<String, String>,
    live: Cell<u32>,
}

#[derive(Debug)]
struct Pool {
    members: Vec<usize>,
    load_balancer: LoadBalancer,
    next: Cell<usize>,
}

/// A cluster as a worker sees it.
#[derive(Debug)]
pub struct ClusterState {
    /// Name from the config.
    pub name: String,
    /// Service host and namespace for destination_service labels.
    pub service: ServiceInfo,
    /// Endpoints.
    pub endpoints: Vec<EndpointState>,
    all: Pool,
    subsets: Vec<Pool>,
}

#[derive(Debug)]
enum Route {
    One(Target),
    Weighted { targets: Vec<(Target, u64)>, total: u64 },
    Captured,
}

/// Per-worker routing table.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Clusters by index.
    pub clusters: Vec<ClusterState>,
    rng: Cell<u64>,
    /// Cluster by the addresses an outbound capture matches (SPEC §8).
    by_address: HashMap<SocketAddr, usize>,
}

/// Which cluster a captured connection's original destination belongs to: a cluster's
/// service addresses first, then its endpoints; the first cluster in config order wins.
fn address_index(cfg: &Config) -> HashMap<SocketAddr, usize> {
    let mut index = HashMap::new();
    for (i, c) in cfg.clusters.iter().enumerate() {
        for a in &c.addresses {
            index.entry(*a).or_insert(i);
        }
    }
    for (i, c) in cfg.clusters.iter().enumerate() {
        for e in &c.endpoints {
            index.entry(e.address).or_insert(i);
        }
    }
    index
}

impl Router {
    /// Build from a validated config; `seed` varies the random choices per worker.
    pub fn new(cfg: &Config, seed: u64) -> Router {
        let clusters: Vec<ClusterState> = cfg
            .clusters
            .iter()
            .map(|c| {
                let host = c.service.clone().unwrap_or_default();
                // Empty: metrics derives it from a `NAME.NS.svc.*` host, or falls back further.
                let namespace = c.service_namespace.clone().unwrap_or_default();
                let endpoints: Vec<EndpointState> = c
                    .endpoints
                    .iter()
                    .map(|e| EndpointState {
                        address: e.address,
                        labels: e.labels.clone(),
                        live: Cell::new(0),
                    })
                    .collect();
                let subsets = c
                    .subsets
                    .iter()
                    .map(|s| Pool {
                        members: (0..endpoints.len())
                            .filter(|&i| s.labels.iter().all(|(k, v)| endpoints[i].labels.get(k) == Some(v)))
                            .collect(),
                        load_balancer: s.load_balancer.unwrap_or(c.load_balancer),
                        next: Cell::new(0),
                    })
                    .collect();
                ClusterState {
                    name: c.name.clone(),
                    service: ServiceInfo { host, namespace },
                    all: Pool {
                        members: (0..endpoints.len()).collect(),
                        load_balancer: c.load_balancer,
                        next: Cell::new(0),
                    },
                    endpoints,
                    subsets,
                }
            })
            .collect();
        let index = |name: &str| clusters.iter().position(|c| c.name == name).unwrap_or(0);
        let routes = cfg
            .listeners
            .iter()
            .map(|l| {
                if let Some(routes) = &l.tcp_routes {
                    let mut total = 0u64;
                    let targets = routes
                        .iter()
                        .filter(|r| r.weight > 0)
                        .map(|r| {
                            let cluster = index(&r.cluster);
                            let subset = r.subset.as_ref().and_then(|s| {
                                cfg.clusters[cluster].subsets.iter().position(|x| &x.name == s)
                            });
                            // Saturating, as validate() sums them: huge weights must not wrap.
                            total = total.saturating_add(r.weight as u64);
                            (Target { cluster, subset }, total)
                        })
                        .collect();
                    Route::Weighted { targets, total }
                } else if l.capture != Capture::None && l.cluster.is_none() && l.service.is_none() {
                    // Routed per connection by its original destination (SPEC §8).
                    Route::Captured
                } else if let Some(host) = &l.service {
                    let cluster = clusters.iter().position(|c| &c.service.host == host).unwrap_or(0);
                    Route::One(Target { cluster, subset: None })
                } else {
                    Route::One(Target { cluster: l.cluster.as_deref().map(index).unwrap_or(0), subset: None })
                }
            })
            .collect();
        Router { routes, clusters, rng: Cell::new(seed | 1), by_address: address_index(cfg) }
    }

    /// The cluster for an outbound-captured connection to `dst`, whose service addresses or
    /// endpoints include it; `None` means passthrough to `dst` itself (SPEC §8).
    pub fn route_original_dst(&self, dst: SocketAddr) -> Option<Target> {
        self.by_address.get(&dst).map(|&cluster| Target { cluster, subset: None })
    }

    /// The cluster (and subset) for a new connection on `listener`.
    pub fn route(&self, listener: usize) -> Option<Target> {
        match self.routes.get(listener)? {
            Route::One(t) => Some(*t),
            Route::Weighted { targets, total } => {
                let x = self.random() % (*total).max(1);
                targets.iter().find(|(_, upto)| x < *upto).map(|(t, _)| *t)
            }
            Route::Captured => None,
        }
    }

    /// Endpoints of `target` in the order to try them: the load balancer's pick first, then
    /// the others in turn (a refused endpoint is skipped for this connection).
    pub fn candidates(&self, target: Target) -> impl Iterator<Item = usize> + '_ {
        let cluster = &self.clusters[target.cluster];
        let pool = target.subset.and_then(|s| cluster.subsets.get(s)).unwrap_or(&cluster.all);
        let n = pool.members.len();
        let start = if n == 0 {
            0
        } else {
            match pool.load_balancer {
                LoadBalancer::RoundRobin => {
                    let i = pool.next.get();
                    pool.next.set((i + 1) % n);
                    i % n
                }
                LoadBalancer::Random => (self.random() % n as u64) as usize,
                LoadBalancer::LeastConnection => {
                    // Fewest live connections; ties broken in turn so equal endpoints share load.
                    let turn = pool.next.get();
                    pool.next.set((turn + 1) % n);
                    (0..n)
                        .map(|k| (turn + k) % n)
                        .min_by_key(|&k| cluster.endpoints[pool.members[k]].live.get())
                        .unwrap_or(0)
                }
            }
        };
        (0..n).map(move |k| pool.members[(start + k) % n])
    }

    /// Count a live connection to an endpoint (least_connection).
    pub fn connected(&self, cluster: usize, endpoint: usize) {
        let e = &self.clusters[cluster].endpoints[endpoint];
        e.live.set(e.live.get() + 1);
    }

    /// A connection to an endpoint ended.
    pub fn disconnected(&self, cluster: usize, endpoint: usize) {
        let e = &self.clusters[cluster].endpoints[endpoint];
        e.live.set(e.live.get().saturating_sub(1));
    }

    fn random(&self) -> u64 {
        // xorshift64: per-worker, no atomics; quality is plenty for load balancing.
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        let mut c = Config::parse(yaml, "t.yaml").unwrap();
        c.validate("t.yaml", yaml).unwrap();
        c
    }

    const BASE: &str = "
listeners:
  - {name: a, listen: 127.0.0.1:1, direction: outbound, cluster: db}
  - name: split
    listen: 127.0.0.1:2
    direction: outbound
    tcp_routes: [{cluster: db, subset: v1, weight: 80}, {cluster: db, subset: v2, weight: 20}]
clusters:
  - name: db
    service: mongodb.prod.svc.cluster.local
    endpoints:
      - {address: 127.0.0.1:10, labels: {version: v1}}
      - {address: 127.0.0.1:11, labels: {version: v2}}
      - {address: 127.0.0.1:12, labels: {version: v1}}
    subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}, load_balancer: least_connection}
";

    #[test]
    fn round_robin_takes_endpoints_in_turn_and_falls_back_to_the_others() {
        let r = Router::new(&cfg(BASE), 7);
        let t = r.route(0).unwrap();
        let firsts: Vec<usize> = (0..4).map(|_| r.candidates(t).next().unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0]);
        assert_eq!(r.candidates(t).collect::<Vec<_>>(), [1, 2, 0]);
    }

    #[test]
    fn weighted_routes_split_by_relative_weight_into_subsets() {
        let r = Router::new(&cfg(BASE), 7);
        let mut v1 = 0;
        for _ in 0..10_000 {
            let t = r.route(1).unwrap();
            let e = r.candidates(t).next().unwrap();
            if r.clusters[0].endpoints[e].labels["version"] == "v1" {
                v1 += 1;
            }
        }
        assert!((7_500..8_500).contains(&v1), "v1 got {v1} of 10000");
    }

    #[test]
    fn least_connection_prefers_the_endpoint_with_fewest_live_connections() {
        let yaml = BASE
            .replace("load_balancer: least_connection", "")
            .replace("endpoints:\n", "load_balancer: least_connection\n    endpoints:\n");
        let r = Router::new(&cfg(&yaml), 7);
        let t = r.route(0).unwrap();
        r.connected(0, 0);
        r.connected(0, 1);
        assert_eq!(r.candidates(t).next(), Some(2));
    }

    #[test]
    fn an_original_destination_matches_service_addresses_then_endpoints() {
        let yaml = format!(
            "{BASE}  - name: vip\n    addresses: [10.96.0.1:27017, 127.0.0.1:11]\n    endpoints: [{{address: 127.0.0.1:20}}]\n"
        );
        let r = Router::new(&cfg(&yaml), 7);
        let at = |s: &str| r.route_original_dst(s.parse().unwrap()).map(|t| t.cluster);
        assert_eq!(at("10.96.0.1:27017"), Some(1));
        assert_eq!(at("127.0.0.1:11"), Some(1), "a service address wins over another cluster's endpoint");
        assert_eq!(at("127.0.0.1:10"), Some(0));
        assert_eq!(at("127.0.0.1:20"), Some(1));
        assert_eq!(at("10.96.0.1:80"), None, "another port: passthrough");
    }

    #[test]
    fn weights_near_the_integer_limit_do_not_overflow() {
        let max = i64::MAX;
        let yaml = BASE
            .replace("weight: 80}", &format!("weight: {max}}}"))
            .replace("weight: 20}", &format!("weight: {max}}}"));
        let r = Router::new(&cfg(&yaml), 3);
        for _ in 0..100 {
            assert!(r.route(1).is_some());
        }
    }
}
