//! Clusters, subsets, load balancing and weighted TCP routes (SPEC §6), one `Router` per
//! worker. Pure: no sockets, no clocks; per-worker state lives in `Cell`s (single thread).
//! `istio` turns Istio's own YAML into the same config.

pub mod chains;
pub mod http_sniff;
pub mod istio;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::{Capture, Config, LoadBalancer, TcpRoute};
use crate::exchange::NodeMetadata;
use crate::metrics::{self, ServiceInfo};

/// How long an endpoint that refused or timed out is skipped: 1 s after its first failure in
/// a row, doubling with each further one, at most 30 s (outlier ejection, simple form,
/// SPEC §6). Envoy's default base ejection time is 30 s; a sidecar whose upstream restarts
/// should find it again within a second or two.
pub const EJECTION_BASE: Duration = Duration::from_secs(1);
/// The longest ejection (see [`EJECTION_BASE`]).
pub const EJECTION_MAX: Duration = Duration::from_secs(30);

/// A cluster (optionally a subset) a connection was routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Index into the router's clusters.
    pub cluster: usize,
    /// Index into that cluster's subsets.
    pub subset: Option<usize>,
}

/// One endpoint and this worker's view of it: live connections, failures, ejection.
#[derive(Debug)]
pub struct EndpointState {
    /// Address to connect to.
    pub address: SocketAddr,
    /// Labels (subset selection).
    pub labels: BTreeMap<String, String>,
    /// The endpoint's workload as Istio's control plane describes it (workload name,
    /// namespace, labels with the canonical name and revision filled by istiod's fallbacks):
    /// the peer side of the metrics when there was no exchange (SPEC §3).
    pub identity: NodeMetadata,
    /// Relative weight (xDS `load_balancing_weight`, else 1).
    pub weight: u32,
    /// Live connections and ejection, shared with the routers of earlier and later
    /// snapshots in which this endpoint (cluster name and address) also exists, so a config
    /// update forgets neither (a connection routed by an old snapshot still ends in it).
    health: Rc<Health>,
}

/// This worker's view of one endpoint's load and failures.
#[derive(Debug, Default)]
struct Health {
    live: Cell<u32>,
    /// Failures in a row (refused or timed out); 0 once a connect succeeds.
    failures: Cell<u32>,
    /// Skipped until then.
    ejected_until: Cell<Option<Instant>>,
    /// When the current ejection began: a failure after `now` is not part of the state at
    /// `now` (see `candidates`).
    ejected_at: Cell<Option<Instant>>,
}

impl EndpointState {
    /// Ejected as of `now`: an ejection that began later (a failure while this connection was
    /// trying endpoints) does not count, so each endpoint is a candidate exactly once.
    fn ejected(&self, now: Instant) -> bool {
        self.health.ejected_until.get().is_some_and(|until| now < until)
            && self.health.ejected_at.get().is_some_and(|at| at <= now)
    }
}

#[derive(Debug)]
struct Pool {
    members: Vec<usize>,
    load_balancer: LoadBalancer,
    next: Cell<usize>,
    /// With unequal endpoint weights: member positions in weighted turn (smooth weighted
    /// round robin, as nginx's), one full cycle; empty when every weight is equal.
    rotation: Vec<usize>,
}

impl Pool {
    fn new(members: Vec<usize>, load_balancer: LoadBalancer, endpoints: &[EndpointState]) -> Pool {
        let rotation = rotation(&members.iter().map(|&e| endpoints[e].weight).collect::<Vec<_>>());
        Pool { members, load_balancer, next: Cell::new(0), rotation }
    }

    /// How many turns one cycle has.
    fn turns(&self) -> usize {
        if self.rotation.is_empty() { self.members.len() } else { self.rotation.len() }
    }

    /// The member position whose turn `i` is.
    fn turn(&self, i: usize) -> usize {
        if self.rotation.is_empty() { i } else { self.rotation[i] }
    }
}

/// Longest weighted cycle: beyond it weights are scaled down (kept at least 1).
const MAX_ROTATION: u64 = 4096;

/// One cycle of smooth weighted round robin over `weights` (member positions), spreading
/// each member's turns through the cycle; empty when all weights are equal.
fn rotation(weights: &[u32]) -> Vec<usize> {
    if weights.windows(2).all(|w| w[0] == w[1]) {
        return Vec::new();
    }
    let gcd = weights.iter().fold(0u64, |g, &w| {
        let (mut a, mut b) = (g, u64::from(w.max(1)));
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    });
    let sum: u64 = weights.iter().map(|&w| u64::from(w.max(1)) / gcd).sum();
    let scaled: Vec<i64> = weights
        .iter()
        .map(|&w| {
            let w = u64::from(w.max(1)) / gcd;
            let w = if sum > MAX_ROTATION { (w * MAX_ROTATION / sum).max(1) } else { w };
            w as i64
        })
        .collect();
    let total: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&scaled) {
                *c += w;
            }
            let pick = (0..current.len()).max_by_key(|&k| (current[k], std::cmp::Reverse(k))).unwrap_or(0);
            current[pick] -= total;
            pick
        })
        .collect()
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
    Weighted {
        targets: Vec<(Target, u64)>,
        total: u64,
    },
    /// A `service:` host with no cluster or route: connections close with `NR` (SPEC §6).
    None,
    /// A capture listener: routed per connection by its original destination (SPEC §8).
    Captured,
}

/// Per-worker routing table.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Routes of each listener's filter chains (SPEC §9).
    chains: Vec<Vec<Route>>,
    /// Clusters by index.
    pub clusters: Vec<ClusterState>,
    rng: Cell<u64>,
    /// Routes by the addresses an outbound capture matches (SPEC §8).
    by_address: HashMap<SocketAddr, Route>,
    /// Each listener's filter chains indexed for the per-connection match (SPEC §9).
    chain_index: Vec<chains::ChainIndex>,
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
        Router::after(cfg, seed, None)
    }

    /// The filter chain of listener `li` (whose chains are `chains`) a connection takes
    /// (SPEC §9): an index lookup, no scan of the listener's other chains.
    pub fn select_chain(
        &self,
        li: usize,
        chains: &[crate::config::FilterChain],
        facts: &chains::ConnFacts<'_>,
    ) -> Option<usize> {
        self.chain_index.get(li)?.select(chains, facts)
    }

    /// Listener `li`'s chain index (SPEC §9): whether a connection is peeked, whether its
    /// source is read.
    pub fn chain_index(&self, li: usize) -> Option<&chains::ChainIndex> {
        self.chain_index.get(li)
    }

    /// Build from a validated config that replaces the one `previous` was built from:
    /// endpoints that still exist (same cluster name and address) keep their live counts
    /// and ejection, and the random sequence continues.
    pub fn after(cfg: &Config, seed: u64, previous: Option<&Router>) -> Router {
        let mut known: HashMap<(&str, SocketAddr), &Rc<Health>> = HashMap::new();
        for c in previous.map_or(&[][..], |p| &p.clusters[..]) {
            for e in &c.endpoints {
                known.insert((c.name.as_str(), e.address), &e.health);
            }
        }
        let clusters: Vec<ClusterState> = cfg
            .clusters
            .iter()
            .map(|c| cluster_state(c, |address| known.get(&(c.name.as_str(), address)).map(|h| Rc::clone(h))))
            .collect();
        let seed = previous.map_or(seed, |p| p.rng.get());
        let index = |name: &str| clusters.iter().position(|c| c.name == name).unwrap_or(0);
        let weighted = |routes: &[TcpRoute]| {
            let mut total = 0u64;
            let targets = routes
                .iter()
                .filter(|r| r.weight > 0)
                .map(|r| {
                    let cluster = index(&r.cluster);
                    let subset = r
                        .subset
                        .as_ref()
                        .and_then(|s| cfg.clusters.get(cluster)?.subsets.iter().position(|x| &x.name == s));
                    // Saturating, as validate() sums them: huge weights must not wrap.
                    total = total.saturating_add(r.weight as u64);
                    (Target { cluster, subset }, total)
                })
                .collect();
            Route::Weighted { targets, total }
        };
        let routes = cfg
            .listeners
            .iter()
            .map(|l| {
                if !l.filter_chains.is_empty() && l.capture == Capture::None {
                    Route::None // routed by the chain each connection matches
                } else if l.capture != Capture::None && l.cluster.is_none() && l.service.is_none() {
                    Route::Captured
                } else if let Some(routes) = &l.tcp_routes {
                    weighted(routes)
                } else if let Some(host) = &l.service {
                    // As the VirtualService tcp routes for HOST say (the first whose match.port
                    // is the listener's port, or that has none), else HOST's cluster for this
                    // port, else any of HOST's clusters, else no route (SPEC §6).
                    let port = l.listen.port();
                    let serves = |c: &&crate::config::Cluster| c.service.as_deref() == Some(host.as_str());
                    let route = cfg
                        .service_routes
                        .iter()
                        .find(|r| &r.host == host && r.match_port.is_none_or(|p| p == port));
                    let cluster = cfg
                        .clusters
                        .iter()
                        .filter(serves)
                        .find(|c| c.service_port == Some(port))
                        .or_else(|| cfg.clusters.iter().find(serves));
                    match (route, cluster) {
                        (Some(r), _) => weighted(&r.tcp_routes),
                        (None, Some(c)) => Route::One(Target { cluster: index(&c.name), subset: None }),
                        (None, None) => Route::None,
                    }
                } else {
                    Route::One(Target { cluster: l.cluster.as_deref().map(index).unwrap_or(0), subset: None })
                }
            })
            .collect();
        let chain_index = cfg.listeners.iter().map(|l| chains::ChainIndex::new(&l.filter_chains)).collect();
        let chains = cfg
            .listeners
            .iter()
            .map(|l| {
                l.filter_chains
                    .iter()
                    .map(|c| match (&c.cluster, &c.tcp_routes) {
                        (Some(name), _) if c.not_served.is_none() => {
                            Route::One(Target { cluster: index(name), subset: None })
                        }
                        (None, Some(routes)) if c.not_served.is_none() => weighted(routes),
                        _ => Route::None,
                    })
                    .collect()
            })
            .collect();
        // An outbound capture's address: the matched cluster's host routes as its
        // VirtualService tcp routes say for that port, as a `service:` listener's would.
        let by_address = address_index(cfg)
            .into_iter()
            .map(|(addr, c)| {
                let host = cfg.clusters[c].service.as_deref();
                let route = cfg
                    .service_routes
                    .iter()
                    .find(|r| Some(r.host.as_str()) == host && r.match_port.is_none_or(|p| p == addr.port()));
                let route = match route {
                    Some(r) => weighted(&r.tcp_routes),
                    None => Route::One(Target { cluster: c, subset: None }),
                };
                (addr, route)
            })
            .collect();
        Router { routes, chains, clusters, rng: Cell::new(seed | 1), by_address, chain_index }
    }

    /// The cluster (and subset) for an outbound-captured connection to `dst`: a cluster whose
    /// service addresses or endpoints hold it, through its host's tcp routes for that port;
    /// `None` means passthrough to `dst` itself (SPEC §8).
    /// An address `0.0.0.0:port` (`[::]:port`) holds every `dst` on that port that no exact
    /// address holds, as Envoy hands a connection to a wildcard listener last.
    pub fn route_original_dst(&self, dst: SocketAddr) -> Option<Target> {
        let wildcard = || {
            let any = if dst.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
            self.by_address.get(&SocketAddr::new(any, dst.port()))
        };
        self.pick(self.by_address.get(&dst).or_else(wildcard)?)
    }

    /// The cluster (and subset) for a new connection on `listener`; `None`: no route (`NR`).
    pub fn route(&self, listener: usize) -> Option<Target> {
        self.pick(self.routes.get(listener)?)
    }

    /// The cluster for a new connection that matched filter chain `chain` of `listener`.
    pub fn route_chain(&self, listener: usize, chain: usize) -> Option<Target> {
        self.pick(self.chains.get(listener)?.get(chain)?)
    }

    fn pick(&self, route: &Route) -> Option<Target> {
        match route {
            Route::One(t) => Some(*t),
            Route::Weighted { targets, total } => {
                let x = self.random() % (*total).max(1);
                targets.iter().find(|(_, upto)| x < *upto).map(|(t, _)| *t)
            }
            Route::None | Route::Captured => None,
        }
    }

    /// Endpoints of `target` in the order to try them at `now`: the load balancer's pick
    /// first, then the others in turn; ejected endpoints after all of those, as a last resort,
    /// so that no connection fails while any endpoint is up (SPEC §6). Ejection reorders, it
    /// never refuses: an endpoint that restarted is found by the first connection that needs it.
    pub fn candidates(&self, target: Target, now: Instant) -> impl Iterator<Item = usize> + '_ {
        let cluster = &self.clusters[target.cluster];
        let pool = self.pool(target);
        let n = pool.members.len();
        let up = move |k: &usize| !cluster.endpoints[pool.members[*k]].ejected(now);
        let start = if n == 0 {
            0
        } else {
            let turns = pool.turns();
            match pool.load_balancer {
                LoadBalancer::RoundRobin => {
                    let i = pool.next.get();
                    pool.next.set((i + 1) % turns);
                    pool.turn(i % turns)
                }
                LoadBalancer::Random => pool.turn((self.random() % turns as u64) as usize),
                LoadBalancer::LeastConnection => {
                    // Fewest live connections; ties broken in turn so equal endpoints share load.
                    let turn = pool.next.get();
                    pool.next.set((turn + 1) % n);
                    (0..n)
                        .map(|k| (turn + k) % n)
                        .filter(up)
                        .min_by_key(|&k| {
                            // Live connections per unit of weight (equal weights: live).
                            let e = &cluster.endpoints[pool.members[k]];
                            u64::from(e.health.live.get()) * 1_000_000 / u64::from(e.weight.max(1))
                        })
                        .unwrap_or(turn % n)
                }
            }
        };
        let order = move || (0..n).map(move |k| (start + k) % n);
        order().filter(up).chain(order().filter(move |k| !up(k))).map(move |k| pool.members[k])
    }

    /// Whether `target` has an endpoint that is not ejected at `now`; when it has none, a
    /// connection that finds them all still down fails with `UH` (no healthy upstream).
    pub fn healthy(&self, target: Target, now: Instant) -> bool {
        let cluster = &self.clusters[target.cluster];
        self.pool(target).members.iter().any(|&e| !cluster.endpoints[e].ejected(now))
    }

    fn pool(&self, target: Target) -> &Pool {
        let cluster = &self.clusters[target.cluster];
        target.subset.and_then(|s| cluster.subsets.get(s)).unwrap_or(&cluster.all)
    }

    /// A connection to an endpoint was established: count it live (least_connection) and
    /// forget the endpoint's failures.
    pub fn connected(&self, cluster: usize, endpoint: usize) {
        let e = &self.clusters[cluster].endpoints[endpoint].health;
        e.live.set(e.live.get() + 1);
        e.failures.set(0);
        e.ejected_until.set(None);
    }

    /// A connection to an endpoint ended.
    pub fn disconnected(&self, cluster: usize, endpoint: usize) {
        let e = &self.clusters[cluster].endpoints[endpoint].health;
        e.live.set(e.live.get().saturating_sub(1));
    }

    /// Connecting to an endpoint was refused or timed out at `now`: eject it for
    /// [`EJECTION_BASE`] doubled per earlier failure in a row, at most [`EJECTION_MAX`].
    pub fn failed(&self, cluster: usize, endpoint: usize, now: Instant) -> Ejection {
        let state = &self.clusters[cluster].endpoints[endpoint];
        let newly = !state.ejected(now);
        let e = &state.health;
        let failures = e.failures.get().saturating_add(1);
        e.failures.set(failures);
        let duration = ejection_time(failures);
        e.ejected_until.set(Some(now + duration));
        e.ejected_at.set(Some(now));
        Ejection { duration, failures, newly }
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

/// What a failed connect did to its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// How long the endpoint is skipped.
    pub duration: Duration,
    /// Failures in a row.
    pub failures: u32,
    /// It was not ejected before this failure (tried as a last resort, it was): the one
    /// failure of an ejection period worth a log line.
    pub newly: bool,
}

/// The ejection after `failures` failures in a row (≥ 1): 1 s, 2 s, 4 s, ... 30 s.
pub fn ejection_time(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(5); // 2^5 s > 30 s already
    (EJECTION_BASE * (1u32 << doublings)).min(EJECTION_MAX)
}

fn cluster_state(
    c: &crate::config::Cluster,
    mut known: impl FnMut(SocketAddr) -> Option<Rc<Health>>,
) -> ClusterState {
    let host = c.service.clone().unwrap_or_default();
    // Empty: metrics derives it from a `NAME.NS.svc.*` host, or falls back further.
    let namespace = c.service_namespace.clone().unwrap_or_default();
    let endpoints: Vec<EndpointState> = c
        .endpoints
        .iter()
        .map(|e| EndpointState {
            address: e.address,
            labels: e.labels.clone(),
            identity: metrics::with_canonical_labels(NodeMetadata {
                workload_name: e.workload_name.clone(),
                namespace: e.namespace.clone(),
                service_account: e.service_account.clone(),
                cluster_id: e.cluster_id.clone(),
                labels: e.labels.clone(),
                ..NodeMetadata::default()
            }),
            health: known(e.address).unwrap_or_default(),
            weight: e.weight.unwrap_or(1).max(1),
        })
        .collect();
    let subsets = c
        .subsets
        .iter()
        .map(|s| {
            let members = (0..endpoints.len())
                .filter(|&i| s.labels.iter().all(|(k, v)| endpoints[i].labels.get(k) == Some(v)))
                .collect();
            Pool::new(members, s.load_balancer.unwrap_or(c.load_balancer), &endpoints)
        })
        .collect();
    ClusterState {
        name: c.name.clone(),
        service: ServiceInfo { host, namespace },
        all: Pool::new((0..endpoints.len()).collect(), c.load_balancer, &endpoints),
        endpoints,
        subsets,
    }
}

/// The filter chain a connection to `dst` takes among `chains` (SPEC §9), for the tests'
/// one-off matches: builds the index each call; connections use the one the router keeps
/// ([`Router::select_chain`]). The source is taken as unknown (`0.0.0.0:0`).
#[cfg(test)]
pub(crate) fn select_chain(
    chains: &[crate::config::FilterChain],
    dst: SocketAddr,
    transport: &str,
    alpn: &[&str],
) -> Option<usize> {
    let alpn: Vec<String> = alpn.iter().map(|p| p.to_string()).collect();
    let facts = chains::ConnFacts {
        destination: dst,
        source: SocketAddr::from(([0, 0, 0, 0], 0)),
        transport,
        server_name: None,
        alpn: &alpn,
    };
    chains::ChainIndex::new(chains).select(chains, &facts)
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
        let firsts: Vec<usize> = (0..4).map(|_| r.candidates(t, now()).next().unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0]);
        assert_eq!(r.candidates(t, now()).collect::<Vec<_>>(), [1, 2, 0]);
    }

    #[test]
    fn weighted_routes_split_by_relative_weight_into_subsets() {
        let r = Router::new(&cfg(BASE), 7);
        let mut v1 = 0;
        for _ in 0..10_000 {
            let t = r.route(1).unwrap();
            let e = r.candidates(t, now()).next().unwrap();
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
        assert_eq!(r.candidates(t, now()).next(), Some(2));
    }

    /// A fixed instant: the router never reads the clock.
    fn now() -> Instant {
        static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T.get_or_init(Instant::now)
    }

    #[test]
    fn ejection_grows_from_1s_doubling_to_30s() {
        let secs: Vec<u64> = (1..=8).map(|n| ejection_time(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(ejection_time(u32::MAX), EJECTION_MAX);
    }

    #[test]
    fn a_failed_endpoint_is_skipped_until_its_ejection_ends_then_tried_again() {
        let r = Router::new(&cfg(BASE), 7);
        let t = r.route(0).unwrap();
        let t0 = now();
        let first = Ejection { duration: Duration::from_secs(1), failures: 1, newly: true };
        assert_eq!(r.failed(0, 0, t0), first);
        // Tried last by every pick while ejected.
        for _ in 0..4 {
            assert_eq!(r.candidates(t, t0).last(), Some(0));
        }
        let later = t0 + Duration::from_secs(1);
        assert_eq!(r.candidates(t, later).collect::<Vec<_>>(), [1, 2, 0], "in turn again");
        assert_eq!(r.candidates(t, later).next(), Some(2));
        assert_eq!(r.candidates(t, later).next(), Some(0));
        // A second failure in a row doubles it; a success forgets them.
        let second = Ejection { duration: Duration::from_secs(2), failures: 2, newly: true };
        assert_eq!(r.failed(0, 0, later), second);
        for _ in 0..3 {
            assert_eq!(r.candidates(t, later + Duration::from_millis(1999)).last(), Some(0));
        }
        // Failing again while ejected (tried as a last resort) is not a new ejection: the
        // caller logs one line per ejection period, not one per connection.
        let again = r.failed(0, 0, later + Duration::from_millis(10));
        assert_eq!((again.failures, again.newly), (3, false));
        r.connected(0, 0);
        assert_eq!(r.failed(0, 0, later).failures, 1);
    }

    #[test]
    fn an_endpoint_that_fails_while_a_connection_tries_it_is_not_tried_again_by_that_connection() {
        let r = Router::new(&cfg(BASE), 7);
        let t = r.route(0).unwrap();
        let t0 = now();
        let mut tried = Vec::new();
        for e in r.candidates(t, t0) {
            tried.push(e);
            r.failed(0, e, t0 + Duration::from_millis(1)); // each fails while being tried
        }
        tried.sort();
        assert_eq!(tried, [0, 1, 2], "each endpoint once");
    }

    #[test]
    fn ejected_endpoints_are_tried_last_and_a_pool_of_only_ejected_ones_is_not_healthy() {
        let r = Router::new(&cfg(BASE), 7);
        let v2 = Target { cluster: 0, subset: Some(1) };
        assert_eq!(r.candidates(v2, now()).collect::<Vec<_>>(), [1]);
        assert!(r.healthy(v2, now()));
        r.failed(0, 1, now());
        // Still tried, as the last resort, but the pool is not healthy.
        assert_eq!(r.candidates(v2, now()).collect::<Vec<_>>(), [1]);
        assert!(!r.healthy(v2, now()));
        let v1 = Target { cluster: 0, subset: Some(0) };
        let lc = Router::new(
            &cfg(&BASE.replace("endpoints:\n", "load_balancer: least_connection\n    endpoints:\n")),
            7,
        );
        lc.connected(0, 2);
        lc.failed(0, 0, now());
        assert_eq!(
            lc.candidates(v1, now()).collect::<Vec<_>>(),
            [2, 0],
            "the busier one, since the idle one is ejected"
        );
    }

    #[test]
    fn a_service_listener_routes_by_the_routes_for_its_port_else_the_cluster_else_none() {
        let yaml = format!(
            "{BASE}
  - {{name: other, service: other.prod.svc.cluster.local, endpoints: [{{address: 127.0.0.1:20}}]}}
service_routes:
  - {{host: mongodb.prod.svc.cluster.local, match_port: 3, tcp_routes: [{{cluster: db, subset: v2}}]}}
"
        )
        .replace(
            "clusters:",
            "  - {name: s3, listen: 127.0.0.1:3, direction: outbound, service: mongodb.prod.svc.cluster.local}
  - {name: s4, listen: 127.0.0.1:4, direction: outbound, service: mongodb.prod.svc.cluster.local}
  - {name: s5, listen: 127.0.0.1:5, direction: outbound, service: reviews.prod.svc.cluster.local}
clusters:",
        );
        let c = cfg(&yaml);
        assert_eq!(c.warnings().len(), 1, "{:?}", c.warnings());
        let r = Router::new(&c, 7);
        assert_eq!(r.route(2), Some(Target { cluster: 0, subset: Some(1) }));
        assert_eq!(r.route(3), Some(Target { cluster: 0, subset: None }));
        assert_eq!(r.route(4), None);
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
    fn an_original_destination_follows_its_hosts_tcp_routes_for_that_port() {
        let yaml = BASE.replace("clusters:", "service_routes:\n  - {host: mongodb.prod.svc.cluster.local, match_port: 11, tcp_routes: [{cluster: db, subset: v2}]}\nclusters:");
        let r = Router::new(&cfg(&yaml), 7);
        let v2 = Some(Target { cluster: 0, subset: Some(1) });
        assert_eq!(r.route_original_dst("127.0.0.1:11".parse().unwrap()), v2);
        assert_eq!(
            r.route_original_dst("127.0.0.1:10".parse().unwrap()),
            Some(Target { cluster: 0, subset: None })
        );
    }

    #[test]
    fn filter_chains_match_port_then_longest_prefix_then_transport_then_alpn_else_the_default() {
        use crate::config::{Cidr, FilterChain};
        let chain =
            |port: Option<u16>, prefixes: &[&str], transport: Option<&str>, alpn: &[&str]| FilterChain {
                destination_port: port,
                prefix_ranges: prefixes.iter().map(|p| Cidr::try_from(p.to_string()).unwrap()).collect(),
                transport_protocol: transport.map(str::to_string),
                application_protocols: alpn.iter().map(|p| p.to_string()).collect(),
                ..FilterChain::default()
            };
        let chains = vec![
            chain(Some(9080), &[], Some("tls"), &["istio-peer-exchange"]), // 0: mTLS on 9080
            chain(Some(9080), &[], Some("raw_buffer"), &[]),               // 1: plaintext on 9080
            chain(None, &["10.0.0.0/8"], None, &[]),                       // 2
            chain(None, &["10.1.0.0/16"], None, &[]),                      // 3
            chain(None, &[], None, &[]),                                   // 4
            FilterChain { default: true, ..chain(Some(1), &[], None, &[]) }, // 5
        ];
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(select_chain(&chains, at("10.1.2.3:9080"), "raw_buffer", &[]), Some(1));
        assert_eq!(select_chain(&chains, at("10.1.2.3:9080"), "tls", &["istio-peer-exchange"]), Some(0));
        assert_eq!(select_chain(&chains, at("10.1.2.3:80"), "raw_buffer", &[]), Some(3), "longest prefix");
        assert_eq!(select_chain(&chains, at("10.9.2.3:80"), "raw_buffer", &[]), Some(2));
        assert_eq!(select_chain(&chains, at("192.168.0.1:80"), "raw_buffer", &[]), Some(4));
        // Port 9080 chains exist, so the others are out even when those do not match: the default.
        assert_eq!(select_chain(&chains, at("10.1.2.3:9080"), "tls", &["h2"]), Some(5));
        assert_eq!(select_chain(&chains[..4], at("192.168.0.1:80"), "raw_buffer", &[]), None);
    }

    #[test]
    fn endpoint_weights_share_turns_smoothly_and_equal_weights_keep_plain_turns() {
        assert!(rotation(&[1, 1, 1]).is_empty());
        assert_eq!(rotation(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(rotation(&[200, 100]), [0, 1, 0]);
        let huge = rotation(&[u32::MAX, 1]);
        assert!(huge.len() as u64 <= MAX_ROTATION + 1 && huge.contains(&1));
        let yaml = BASE.replace(
            "{address: 127.0.0.1:10, labels: {version: v1}}",
            "{address: 127.0.0.1:10, labels: {version: v1}, weight: 3}",
        );
        let r = Router::new(&cfg(&yaml), 7);
        let t = r.route(0).unwrap();
        let firsts: Vec<usize> = (0..10).map(|_| r.candidates(t, now()).next().unwrap()).collect();
        assert_eq!(firsts.iter().filter(|&&e| e == 0).count(), 6, "{firsts:?}");
        // The fallback order still holds every endpoint once.
        let mut all: Vec<usize> = r.candidates(t, now()).collect();
        all.sort();
        assert_eq!(all, [0, 1, 2]);
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
