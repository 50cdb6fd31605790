//! Clusters, subsets, load balancing and weighted TCP routes (SPEC §6). A publication's
//! routing table ([`Routes`]) is built once, on the control thread, and shared by every
//! worker; clusters that did not change are shared with the previous table. Each worker's
//! mutable view (live connections, ejection, round-robin turns: [`Balance`]) lives beside
//! it, keyed by cluster name and endpoint address, so it survives every publication and an
//! endpoint change touches only its cluster. A [`Router`] is a worker's handle on both.
//! Pure: no sockets, no clocks. `istio` turns Istio's own YAML into the same config.

pub mod chains;
pub mod http_sniff;
pub mod istio;

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::chunks::Chunks;
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

/// One endpoint as the router picks it (shared by every worker); its labels and workload
/// are the config endpoint's, held once ([`ClusterState::labels`], SPEC §11).
#[derive(Debug)]
pub struct EndpointState {
    /// Address to connect to.
    pub address: SocketAddr,
    /// Relative weight (xDS `load_balancing_weight`, else 1).
    pub weight: u32,
    /// Its workload as a peer's metadata, made at the first connection that reports it.
    identity: std::sync::OnceLock<Box<NodeMetadata>>,
}

/// One worker's view of one endpoint's load and failures.
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

impl Health {
    /// Ejected as of `now`: an ejection that began later (a failure while this connection was
    /// trying endpoints) does not count, so each endpoint is a candidate exactly once.
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|until| now < until)
            && self.ejected_at.get().is_some_and(|at| at <= now)
    }
}

/// The members of a cluster or subset and how one is picked (shared, immutable).
#[derive(Debug, PartialEq)]
struct Pool {
    members: Vec<usize>,
    load_balancer: LoadBalancer,
    /// With unequal endpoint weights: each member's EDF step and the running sums of the
    /// weights (`None` when every weight is equal: plain turns).
    weighted: Option<Weights>,
}

impl Pool {
    fn new(members: Vec<usize>, load_balancer: LoadBalancer, endpoints: &[EndpointState]) -> Pool {
        let weights: Vec<u32> = members.iter().map(|&e| endpoints[e].weight).collect();
        Pool { members, load_balancer, weighted: Weights::new(&weights) }
    }
}

/// One time unit of the EDF schedule: a member of weight `w` is due every `STEP_UNIT / w`.
/// 2^40 keeps the rounding of `1/w` below one part in 256 for any `u32` weight, and a `u128`
/// clock does not wrap in any lifetime.
const STEP_UNIT: u128 = 1 << 40;

/// Weighted choice among a pool's members (SPEC §6: `load_balancing_weight`) as Envoy's
/// `EdfScheduler` does it: each member's next turn is due one `1/weight` step after its last,
/// and the earliest due goes first (ties: the earlier member). Built in O(n), a pick is
/// O(log n), whatever the weights: a large cluster with unequal weights costs a push no
/// more than one with equal ones (the smooth round robin before it built a cycle as long as
/// the sum of the weights, at O(n) per turn, per pool, per worker, per push). Random draws
/// use the running sums (a binary search).
#[derive(Debug, PartialEq)]
struct Weights {
    /// Each member's step, `STEP_UNIT / weight`.
    steps: Vec<u128>,
    /// Running sums of the weights.
    cumulative: Vec<u64>,
}

impl Weights {
    /// `None` when every weight is equal (plain turns do).
    fn new(weights: &[u32]) -> Option<Weights> {
        if weights.windows(2).all(|w| w[0] == w[1]) {
            return None;
        }
        let steps = weights.iter().map(|&w| STEP_UNIT / u128::from(w.max(1))).collect();
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Some(Weights { steps, cumulative })
    }

    /// A fresh schedule: every member first due one step from 0, the heaviest first. O(n).
    fn schedule(&self) -> Schedule {
        Schedule(BinaryHeap::from(
            self.steps.iter().enumerate().map(|(k, &s)| Reverse((s, k))).collect::<Vec<_>>(),
        ))
    }

    /// The member a random `x` falls on, in proportion to the weights.
    fn at(&self, x: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1).max(1);
        let x = x % total;
        self.cumulative.partition_point(|&upto| upto <= x).min(self.cumulative.len().saturating_sub(1))
    }
}

/// A worker's EDF schedule over one weighted pool: min-heap of (due, member position).
#[derive(Debug)]
struct Schedule(BinaryHeap<Reverse<(u128, usize)>>);

impl Schedule {
    /// The member whose turn is due first; it is due again one step later.
    fn next(&mut self, w: &Weights) -> usize {
        let Some(mut top) = self.0.peek_mut() else { return 0 };
        let Reverse((at, k)) = *top;
        *top = Reverse((at + w.steps.get(k).copied().unwrap_or(STEP_UNIT), k));
        k
    }
}

/// A cluster as the control plane describes it, with its pools (shared by every worker and
/// by consecutive publications while it does not change).
#[derive(Debug)]
pub struct ClusterState {
    /// Name from the config.
    pub name: String,
    /// Service host and namespace for destination_service labels.
    pub service: ServiceInfo,
    /// Endpoints.
    pub endpoints: Vec<EndpointState>,
    /// The config's endpoints (the same `Arc`, in the same order): labels and workloads.
    source: Arc<Vec<crate::config::Endpoint>>,
    all: Pool,
    subsets: Vec<Pool>,
}

#[derive(Clone, Debug)]
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

/// One publication's routing table (SPEC §6, §8, §9): built once on the control thread,
/// read by every worker.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Route>,
    /// Per listener, its filter chains' routes and index (SPEC §9), shared with the
    /// previous publication while the listener and the clusters' order stay.
    listeners: Vec<Arc<ChainTable>>,
    /// Clusters by index (the config's order), in chunks shared with the previous
    /// publication's where no cluster of the chunk changed.
    clusters: Chunks<Arc<ClusterState>>,
    /// The config clusters `clusters` were built from (the same `Arc`: nothing changed).
    from: Chunks<Arc<crate::config::Cluster>>,
    /// Routes by the addresses an outbound capture matches (SPEC §8).
    by_address: Addresses,
}

/// One listener's filter chains as the router holds them.
#[derive(Debug)]
struct ChainTable {
    /// The listener they were built from.
    from: Arc<crate::config::Listener>,
    /// Each chain's route.
    routes: Vec<Route>,
    /// The chains indexed for the per-connection match.
    index: chains::ChainIndex,
}

/// The routes by original destination: a map shared by consecutive publications and what
/// changed since it was built (an endpoint change costs the addresses of its cluster, not
/// a copy of the mesh's 60,000, SPEC §11). Built anew once the changes outgrow a quarter
/// of it, so a lookup stays two probes at most and the changes are amortised O(1).
#[derive(Debug, Default)]
struct Addresses {
    built: Arc<HashMap<SocketAddr, Route>>,
    /// Addresses changed since `built`: their route now, or none (gone).
    changed: HashMap<SocketAddr, Option<Route>>,
    /// Addresses more than one cluster holds when `built` was made: a change touching one
    /// of them builds the map anew, since the winner depends on the others.
    contested: Arc<std::collections::HashSet<SocketAddr>>,
}

impl Addresses {
    fn get(&self, address: &SocketAddr) -> Option<&Route> {
        if !self.changed.is_empty()
            && let Some(now) = self.changed.get(address)
        {
            return now.as_ref();
        }
        self.built.get(address)
    }

    /// `previous` with clusters `changed` (indices; each was `was`, is `now`) applied,
    /// when none of their addresses is held by another cluster; `None` otherwise.
    fn update(
        previous: &Addresses,
        changed: &[(usize, &crate::config::Cluster, &crate::config::Cluster)],
    ) -> Option<Addresses> {
        fn claims(c: &crate::config::Cluster) -> impl Iterator<Item = SocketAddr> + '_ {
            c.addresses.iter().copied().chain(c.endpoints.iter().map(|e| e.address))
        }
        let mut next = Addresses {
            built: Arc::clone(&previous.built),
            changed: previous.changed.clone(),
            contested: Arc::clone(&previous.contested),
        };
        for &(_, was, _) in changed {
            for a in claims(was) {
                if next.contested.contains(&a) {
                    return None;
                }
                next.changed.insert(a, None);
            }
        }
        for &(i, _, now) in changed {
            for a in claims(now) {
                match next.get(&a) {
                    Some(Route::One(t)) if t.cluster == i => {}
                    Some(_) => return None,
                    None => {}
                }
                let one = Target { cluster: i, subset: None };
                match next.built.get(&a) {
                    // As when the map was built (the cluster kept this address).
                    Some(Route::One(t)) if *t == one => next.changed.remove(&a),
                    _ => next.changed.insert(a, Some(Route::One(one))),
                };
            }
        }
        Some(next)
    }
}

/// One worker's mutable routing state, kept across publications: per cluster name, the
/// health of its endpoints by address and its pools' turns. A cluster's entry is made when
/// the worker first routes to it and renewed only when that cluster changes, so a push costs
/// a worker nothing until it routes to what changed.
#[derive(Debug, Default)]
pub struct Balance {
    rng: Cell<u64>,
    clusters: RefCell<HashMap<String, Rc<Live>>>,
}

impl Balance {
    /// Forget the clusters no longer published that carry no connection, once the worker
    /// holds more than twice as many as `published` (plus a margin): a mesh whose services
    /// come and go must not grow a worker's state without bound, and pruning only after the
    /// table has doubled keeps its cost amortised O(1) per cluster name ever routed, never a
    /// scan of the mesh per push (SPEC §11).
    fn forget_gone(&self, published: &Chunks<Arc<ClusterState>>) {
        const MARGIN: usize = 64;
        let mut all = self.clusters.borrow_mut();
        if all.len() <= 2 * published.len() + MARGIN {
            return;
        }
        let names: std::collections::HashSet<&str> = published.iter().map(|c| c.name.as_str()).collect();
        all.retain(|name, live| {
            names.contains(name.as_str()) || live.health.borrow().values().any(|h| h.live.get() > 0)
        });
    }
}

/// A worker's state for one cluster (by name).
#[derive(Debug, Default)]
struct Live {
    /// Every endpoint this worker has routed to or counted, by address: what a connection
    /// routed under an older publication ends in, and what a changed cluster keeps.
    health: RefCell<HashMap<SocketAddr, Rc<Health>>>,
    /// The turns for the cluster's current table.
    turns: RefCell<Turns>,
}

/// Round-robin turns and EDF schedules for one version of a cluster, and its endpoints'
/// health in endpoint order (no lookup per connection).
#[derive(Debug, Default)]
struct Turns {
    /// The version they are for (a `Weak` keeps the address from being reused).
    table: Weak<ClusterState>,
    health: Rc<[Rc<Health>]>,
    /// Per pool (the whole cluster, then each subset): the next plain turn and the EDF
    /// schedule, made at its first weighted pick.
    next: Vec<Cell<usize>>,
    schedules: Vec<Option<Schedule>>,
}

/// A worker's router: a publication's [`Routes`] and the worker's [`Balance`].
#[derive(Debug)]
pub struct Router {
    routes: Arc<Routes>,
    /// Clusters by index.
    pub clusters: Chunks<Arc<ClusterState>>,
    balance: Rc<Balance>,
}

/// Which cluster a captured connection's original destination belongs to: a cluster's
/// service addresses first, then its endpoints; the first cluster in config order wins.
/// Which cluster a captured connection's original destination belongs to: a cluster's
/// service addresses first, then its endpoints; the first cluster in config order wins.
/// With the addresses more than one cluster holds.
fn address_index(cfg: &Config) -> (HashMap<SocketAddr, usize>, std::collections::HashSet<SocketAddr>) {
    let mut index = HashMap::new();
    let mut contested = std::collections::HashSet::new();
    let mut claim = |a: SocketAddr, i: usize| match index.entry(a) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(i);
        }
        std::collections::hash_map::Entry::Occupied(o) => {
            if *o.get() != i {
                contested.insert(a);
            }
        }
    };
    for (i, c) in cfg.clusters.iter().enumerate() {
        for a in &c.addresses {
            claim(*a, i);
        }
    }
    for (i, c) in cfg.clusters.iter().enumerate() {
        for e in c.endpoints.iter() {
            claim(e.address, i);
        }
    }
    (index, contested)
}

impl Routes {
    /// The routing table of a validated config, sharing with `previous` every cluster that
    /// did not change (the same `Arc`, or the same name, endpoints, subsets and policy), each
    /// listener's chain table while the listener and the clusters' order stay, and the
    /// address map but for the changed clusters' addresses: a push costs what it changed
    /// plus pointer compares, and no lookup scans the clusters (SPEC §11).
    pub fn new(cfg: &Config, previous: Option<&Routes>) -> Routes {
        // Same length: only the chunks that are not the previous config's are looked at (an
        // endpoint change: one chunk of 64, not the mesh's 10,000 clusters).
        let (clusters, changed, order_kept) = match previous.and_then(|p| Routes::patched(cfg, p)) {
            Some(patched) => patched,
            None => Routes::rebuilt(cfg, previous),
        };
        // Name -> index once, when a route needs it: each lookup is O(1), not a scan of every
        // cluster (a mesh's 10,000 chains each naming one of 10,000 clusters).
        let by_name: std::cell::OnceCell<HashMap<&str, usize>> = std::cell::OnceCell::new();
        let index = |name: &str| {
            let by_name = by_name.get_or_init(|| {
                clusters.iter().enumerate().rev().map(|(i, c)| (c.name.as_str(), i)).collect()
            });
            by_name.get(name).copied().unwrap_or(0)
        };
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
                    let serves =
                        |c: &&Arc<crate::config::Cluster>| c.service.as_deref() == Some(host.as_str());
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
        // A listener's chain table names clusters by index: it stays while the listener and
        // the clusters' order do.
        let old_tables: &[Arc<ChainTable>] = previous.filter(|_| order_kept).map_or(&[], |p| &p.listeners);
        let listeners = cfg
            .listeners
            .iter()
            .enumerate()
            .map(|(li, l)| {
                if let Some(t) = old_tables.get(li).filter(|t| Arc::ptr_eq(&t.from, l)) {
                    return Arc::clone(t);
                }
                let routes = l
                    .filter_chains
                    .iter()
                    .map(|c| match (&c.cluster, &c.tcp_routes) {
                        (Some(name), _) if c.not_served.is_none() => {
                            Route::One(Target { cluster: index(name), subset: None })
                        }
                        (None, Some(routes)) if c.not_served.is_none() => weighted(routes),
                        _ => Route::None,
                    })
                    .collect();
                Arc::new(ChainTable {
                    from: Arc::clone(l),
                    routes,
                    index: chains::ChainIndex::new(&l.filter_chains),
                })
            })
            .collect();
        // The address map: the previous one with the changed clusters' addresses, while the
        // order stays and no VirtualService routes by host (else built anew).
        let incremental = previous
            .filter(|p| {
                order_kept
                    && cfg.service_routes.is_empty()
                    && p.by_address.changed.len() <= p.by_address.built.len() / 4 + 1024
            })
            .and_then(|p| Addresses::update(&p.by_address, &changed));
        let by_address = incremental.unwrap_or_else(|| {
            // An outbound capture's address: the matched cluster's host routes as its
            // VirtualService tcp routes say for that port, as a `service:` listener's would.
            let (index, contested) = address_index(cfg);
            let built = index
                .into_iter()
                .map(|(addr, c)| {
                    let host = cfg.clusters[c].service.as_deref();
                    let route = cfg.service_routes.iter().find(|r| {
                        Some(r.host.as_str()) == host && r.match_port.is_none_or(|p| p == addr.port())
                    });
                    let route = match route {
                        Some(r) => weighted(&r.tcp_routes),
                        None => Route::One(Target { cluster: c, subset: None }),
                    };
                    (addr, route)
                })
                .collect();
            Addresses { built: Arc::new(built), changed: HashMap::new(), contested: Arc::new(contested) }
        });
        let from = cfg.clusters.clone();
        Routes { routes, listeners, clusters, from, by_address }
    }

    /// The clusters of `cfg` as `previous`'s with the changed ones replaced, when `cfg` holds
    /// as many clusters as `previous` was built from and each changed one has the name it
    /// had (an endpoint change); with the clusters whose contents changed (place, previous,
    /// now). Looks only at the chunks `cfg` does not share with `previous`: O(what changed).
    #[allow(clippy::type_complexity)]
    fn patched<'a>(
        cfg: &'a Config,
        previous: &'a Routes,
    ) -> Option<(
        Chunks<Arc<ClusterState>>,
        Vec<(usize, &'a crate::config::Cluster, &'a crate::config::Cluster)>,
        bool,
    )> {
        let ranges = cfg.clusters.differing(&previous.from)?;
        let mut clusters = previous.clusters.clone();
        let mut changed = Vec::new();
        for i in ranges.into_iter().flatten() {
            let (c, f, o) = (&cfg.clusters[i], &previous.from[i], &previous.clusters[i]);
            if Arc::ptr_eq(f, c) {
                continue;
            }
            if o.name != c.name {
                return None;
            }
            changed.push((i, &**f, &**c));
            if !same(o, c) {
                clusters[i] = Arc::new(cluster_state(c));
            }
        }
        Some((clusters, changed, true))
    }

    /// The clusters of `cfg`, each shared with `previous` where built from the same `Arc`
    /// (or of the same name and contents); with the clusters whose contents changed at the
    /// same place and name, and whether every place kept its name.
    #[allow(clippy::type_complexity)]
    fn rebuilt<'a>(
        cfg: &'a Config,
        previous: Option<&'a Routes>,
    ) -> (Chunks<Arc<ClusterState>>, Vec<(usize, &'a crate::config::Cluster, &'a crate::config::Cluster)>, bool)
    {
        // A cluster at the same place as before, or of the same name, built from the same
        // `Arc` is shared without a look at its contents; the map by name is made only when
        // the order changed (a push adding or removing clusters).
        let Some(previous) = previous else {
            return (cfg.clusters.iter().map(|c| Arc::new(cluster_state(c))).collect(), Vec::new(), false);
        };
        let (old, old_from) = (&previous.clusters, &previous.from);
        let mut before: Option<HashMap<&str, &Arc<ClusterState>>> = None;
        let mut order_kept = old.len() == cfg.clusters.len();
        let mut changed = Vec::new();
        let clusters = cfg
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if let (Some(o), Some(f)) = (old.get(i), old_from.get(i))
                    && Arc::ptr_eq(f, c)
                {
                    return Arc::clone(o);
                }
                let was = match old.get(i) {
                    Some(o) if o.name == c.name => {
                        if let Some(f) = old_from.get(i) {
                            changed.push((i, &**f, &**c));
                        }
                        Some(o)
                    }
                    _ => {
                        order_kept = false;
                        before
                            .get_or_insert_with(|| old.iter().map(|o| (o.name.as_str(), o)).collect())
                            .get(c.name.as_str())
                            .copied()
                    }
                };
                match was {
                    Some(o) if same(o, c) => Arc::clone(o),
                    _ => Arc::new(cluster_state(c)),
                }
            })
            .collect();
        (clusters, changed, order_kept)
    }
}

impl Router {
    /// Build from a validated config; `seed` varies the random choices per worker.
    pub fn new(cfg: &Config, seed: u64) -> Router {
        Router::with(Arc::new(Routes::new(cfg, None)), Rc::new(Balance::seeded(seed)))
    }

    /// A worker's handle on `routes` with its `balance`: two pointer copies, and now and
    /// then the balance's forgetting of clusters gone (see [`Balance::forget_gone`]).
    pub fn with(routes: Arc<Routes>, balance: Rc<Balance>) -> Router {
        balance.forget_gone(&routes.clusters);
        Router { clusters: routes.clusters.clone(), routes, balance }
    }

    /// This worker's state, to hand to the router of the next publication.
    pub fn balance(&self) -> &Rc<Balance> {
        &self.balance
    }

    /// The routing table, taken out (for the reaper: freeing a mesh's table is not a
    /// worker's job); this router routes nothing afterwards.
    pub fn take_routes(&mut self) -> impl Send + use<> {
        static EMPTY: std::sync::OnceLock<Arc<Routes>> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(|| Arc::new(Routes::new(&Config::default(), None)));
        let clusters = std::mem::replace(&mut self.clusters, empty.clusters.clone());
        (std::mem::replace(&mut self.routes, Arc::clone(empty)), clusters)
    }

    /// The filter chain of listener `li` (whose chains are `chains`) a connection takes
    /// (SPEC §9): an index lookup, no scan of the listener's other chains.
    pub fn select_chain(
        &self,
        li: usize,
        chains: &[crate::config::FilterChain],
        facts: &chains::ConnFacts<'_>,
    ) -> Option<usize> {
        self.routes.listeners.get(li)?.index.select(chains, facts)
    }

    /// Listener `li`'s chain index (SPEC §9): whether a connection is peeked, whether its
    /// source is read.
    pub fn chain_index(&self, li: usize) -> Option<&chains::ChainIndex> {
        self.routes.listeners.get(li).map(|t| &t.index)
    }

    /// The cluster (and subset) for an outbound-captured connection to `dst`: a cluster whose
    /// service addresses or endpoints hold it, through its host's tcp routes for that port;
    /// `None` means passthrough to `dst` itself (SPEC §8).
    /// An address `0.0.0.0:port` (`[::]:port`) holds every `dst` on that port that no exact
    /// address holds, as Envoy hands a connection to a wildcard listener last.
    pub fn route_original_dst(&self, dst: SocketAddr) -> Option<Target> {
        let wildcard = || {
            let any = if dst.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
            self.routes.by_address.get(&SocketAddr::new(any, dst.port()))
        };
        self.pick(self.routes.by_address.get(&dst).or_else(wildcard)?)
    }

    /// The cluster (and subset) for a new connection on `listener`; `None`: no route (`NR`).
    pub fn route(&self, listener: usize) -> Option<Target> {
        self.pick(self.routes.routes.get(listener)?)
    }

    /// The cluster for a new connection that matched filter chain `chain` of `listener`.
    pub fn route_chain(&self, listener: usize, chain: usize) -> Option<Target> {
        self.pick(self.routes.listeners.get(listener)?.routes.get(chain)?)
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

    /// This worker's state for cluster `c` (made at its first use).
    fn live(&self, c: &ClusterState) -> Rc<Live> {
        self.balance.live(c)
    }

    /// The health of `cluster`'s endpoints in endpoint order, with its turns, renewed when
    /// the cluster changed since this worker last picked in it: endpoints that stay keep
    /// their health (by address); addresses gone and idle are forgotten. O(n) per change
    /// of that cluster, O(1) otherwise.
    fn turns<'a>(&self, cluster: &Arc<ClusterState>, live: &'a Live) -> std::cell::RefMut<'a, Turns> {
        let mut turns = live.turns.borrow_mut();
        if !std::ptr::eq(turns.table.as_ptr(), Arc::as_ptr(cluster)) {
            let mut by_address = live.health.borrow_mut();
            let old = std::mem::take(&mut *by_address);
            let health: Rc<[Rc<Health>]> = cluster
                .endpoints
                .iter()
                .map(|e| {
                    Rc::clone(
                        by_address
                            .entry(e.address)
                            .or_insert_with(|| old.get(&e.address).cloned().unwrap_or_default()),
                    )
                })
                .collect();
            // Endpoints gone but still carrying connections stay until those end.
            for (a, h) in old {
                if h.live.get() > 0 {
                    by_address.entry(a).or_insert(h);
                }
            }
            let pools = 1 + cluster.subsets.len();
            *turns = Turns {
                table: Arc::downgrade(cluster),
                health,
                next: (0..pools).map(|_| Cell::new(0)).collect(),
                schedules: (0..pools).map(|_| None).collect(),
            };
        }
        turns
    }

    /// The health of endpoint `endpoint` of cluster `cluster` (by index).
    fn health(&self, cluster: usize, endpoint: usize) -> Option<Rc<Health>> {
        self.balance.health(self.clusters.get(cluster)?, endpoint)
    }

    /// Endpoints of `target` in the order to try them at `now`: the load balancer's pick
    /// first, then the others in turn; ejected endpoints after all of those, as a last resort,
    /// so that no connection fails while any endpoint is up (SPEC §6). Ejection reorders, it
    /// never refuses: an endpoint that restarted is found by the first connection that needs it.
    pub fn candidates(&self, target: Target, now: Instant) -> impl Iterator<Item = usize> + '_ {
        let cluster = &self.clusters[target.cluster];
        let (p, pool) = pool(cluster, target);
        let live = self.live(cluster);
        let mut turns = self.turns(cluster, &live);
        let health = Rc::clone(&turns.health);
        let n = pool.members.len();
        let up = {
            let health = Rc::clone(&health);
            move |k: &usize| !health[pool.members[*k]].ejected(now)
        };
        let start = if n == 0 {
            0
        } else {
            match (pool.load_balancer, &pool.weighted) {
                (LoadBalancer::RoundRobin, Some(w)) => {
                    turns.schedules[p].get_or_insert_with(|| w.schedule()).next(w) % n
                }
                (LoadBalancer::RoundRobin, None) => {
                    let i = turns.next[p].get() % n;
                    turns.next[p].set((i + 1) % n);
                    i
                }
                (LoadBalancer::Random, Some(w)) => w.at(self.random()) % n,
                (LoadBalancer::Random, None) => (self.random() % n as u64) as usize,
                (LoadBalancer::LeastConnection, _) => {
                    // Fewest live connections; ties broken in turn so equal endpoints share load.
                    let turn = turns.next[p].get() % n;
                    turns.next[p].set((turn + 1) % n);
                    (0..n)
                        .map(|k| (turn + k) % n)
                        .filter(&up)
                        .min_by_key(|&k| {
                            // Live connections per unit of weight (equal weights: live).
                            let e = pool.members[k];
                            u64::from(health[e].live.get()) * 1_000_000
                                / u64::from(cluster.endpoints[e].weight.max(1))
                        })
                        .unwrap_or(turn)
                }
            }
        };
        drop(turns);
        let order = move || (0..n).map(move |k| (start + k) % n);
        let down = up.clone();
        order().filter(up).chain(order().filter(move |k| !down(k))).map(move |k| pool.members[k])
    }

    /// Whether `target` has an endpoint that is not ejected at `now`; when it has none, a
    /// connection that finds them all still down fails with `UH` (no healthy upstream).
    pub fn healthy(&self, target: Target, now: Instant) -> bool {
        let cluster = &self.clusters[target.cluster];
        let (_, pool) = pool(cluster, target);
        let live = self.live(cluster);
        let turns = self.turns(cluster, &live);
        pool.members.iter().any(|&e| turns.health.get(e).is_some_and(|h| !h.ejected(now)))
    }

    /// A connection to an endpoint was established: count it live (least_connection) and
    /// forget the endpoint's failures.
    pub fn connected(&self, cluster: usize, endpoint: usize) {
        let Some(e) = self.health(cluster, endpoint) else { return };
        e.live.set(e.live.get() + 1);
        e.failures.set(0);
        e.ejected_until.set(None);
    }

    /// A connection to an endpoint ended.
    pub fn disconnected(&self, cluster: usize, endpoint: usize) {
        if let Some(c) = self.clusters.get(cluster) {
            self.balance.disconnected(c, endpoint);
        }
    }

    /// Connecting to an endpoint was refused or timed out at `now`: eject it for
    /// [`EJECTION_BASE`] doubled per earlier failure in a row, at most [`EJECTION_MAX`].
    pub fn failed(&self, cluster: usize, endpoint: usize, now: Instant) -> Ejection {
        let Some(e) = self.health(cluster, endpoint) else {
            return Ejection { duration: EJECTION_BASE, failures: 1, newly: false };
        };
        let newly = !e.ejected(now);
        let failures = e.failures.get().saturating_add(1);
        e.failures.set(failures);
        let duration = ejection_time(failures);
        e.ejected_until.set(Some(now + duration));
        e.ejected_at.set(Some(now));
        Ejection { duration, failures, newly }
    }

    fn random(&self) -> u64 {
        // xorshift64: per-worker, no atomics; quality is plenty for load balancing.
        let mut x = self.balance.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.balance.rng.set(x);
        x
    }
}

impl Balance {
    /// A worker's state before any routing; `seed` varies its random choices.
    pub fn seeded(seed: u64) -> Balance {
        Balance { rng: Cell::new(seed | 1), clusters: RefCell::default() }
    }

    /// A connection to endpoint `endpoint` of `cluster` (the version it was routed in)
    /// ended: what a connected connection calls with what it kept, without the routing
    /// table of its publication (SPEC §11).
    pub fn disconnected(&self, cluster: &Arc<ClusterState>, endpoint: usize) {
        let Some(e) = self.health(cluster, endpoint) else { return };
        e.live.set(e.live.get().saturating_sub(1));
    }

    /// This worker's state for cluster `c` (made at its first use).
    fn live(&self, c: &ClusterState) -> Rc<Live> {
        let mut all = self.clusters.borrow_mut();
        match all.get(c.name.as_str()) {
            Some(l) => Rc::clone(l),
            None => Rc::clone(all.entry(c.name.clone()).or_default()),
        }
    }

    /// The health of endpoint `endpoint` of `c`, found by address when the cluster changed
    /// since (a connection routed under an older publication).
    fn health(&self, c: &Arc<ClusterState>, endpoint: usize) -> Option<Rc<Health>> {
        let live = self.live(c);
        let turns = live.turns.borrow();
        if std::ptr::eq(turns.table.as_ptr(), Arc::as_ptr(c)) {
            return turns.health.get(endpoint).cloned();
        }
        drop(turns);
        let address = c.endpoints.get(endpoint)?.address;
        Some(Rc::clone(live.health.borrow_mut().entry(address).or_default()))
    }
}

/// The pool `target` picks from (its subset, else the whole cluster) and its position.
fn pool(cluster: &ClusterState, target: Target) -> (usize, &Pool) {
    match target.subset.and_then(|s| Some((s + 1, cluster.subsets.get(s)?))) {
        Some(x) => x,
        None => (0, &cluster.all),
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

impl ClusterState {
    /// Endpoint `e`'s labels.
    pub fn labels(&self, e: usize) -> Option<&BTreeMap<String, String>> {
        Some(&self.source.get(e)?.labels)
    }

    /// Endpoint `e`'s workload as Istio's control plane describes it (workload name,
    /// namespace, labels with the canonical name and revision filled by istiod's fallbacks):
    /// the peer side of the metrics when there was no exchange (SPEC §3). Made at its first
    /// use: a mesh's 50,000 endpoints are mostly never reported on.
    pub fn identity(&self, e: usize) -> Option<&NodeMetadata> {
        let (state, source) = (self.endpoints.get(e)?, self.source.get(e)?);
        let made = state.identity.get_or_init(|| {
            Box::new(metrics::with_canonical_labels(NodeMetadata {
                workload_name: source.workload_name.clone(),
                namespace: source.namespace.clone(),
                service_account: source.service_account.clone(),
                cluster_id: source.cluster_id.clone(),
                labels: source.labels.clone(),
                ..NodeMetadata::default()
            }))
        });
        Some(made)
    }
}

/// The endpoints of config cluster `c` as the router holds them.
fn endpoint_states(c: &crate::config::Cluster) -> impl Iterator<Item = EndpointState> + '_ {
    c.endpoints.iter().map(|e| EndpointState {
        address: e.address,
        weight: e.weight.unwrap_or(1).max(1),
        identity: std::sync::OnceLock::new(),
    })
}

/// Whether `old` is what config cluster `c` builds: compared field by field, allocating
/// nothing (a push compares every cluster it carries but rebuilds only those it changed).
fn same(old: &ClusterState, c: &crate::config::Cluster) -> bool {
    let endpoints_same = Arc::ptr_eq(&old.source, &c.endpoints)
        || old.source.len() == c.endpoints.len()
            && old.source.iter().zip(c.endpoints.iter()).all(|(o, e)| {
                o.address == e.address
                    && o.weight.unwrap_or(1).max(1) == e.weight.unwrap_or(1).max(1)
                    && o.labels == e.labels
                    && o.workload_name == e.workload_name
                    && o.namespace == e.namespace
                    && o.service_account == e.service_account
                    && o.cluster_id == e.cluster_id
            });
    endpoints_same
        && old.service.host == c.service.as_deref().unwrap_or_default()
        && old.service.namespace == c.service_namespace.as_deref().unwrap_or_default()
        && old.all.load_balancer == c.load_balancer
        && old.subsets.len() == c.subsets.len()
        && old.subsets.iter().zip(&c.subsets).all(|(p, s)| {
            p.load_balancer == s.load_balancer.unwrap_or(c.load_balancer)
                && p.members.len() == old.source.iter().filter(|e| selects(&s.labels, e)).count()
                && p.members.iter().all(|&i| old.source.get(i).is_some_and(|e| selects(&s.labels, e)))
        })
}

fn selects(labels: &BTreeMap<String, String>, e: &crate::config::Endpoint) -> bool {
    labels.iter().all(|(k, v)| e.labels.get(k) == Some(v))
}

fn cluster_state(c: &crate::config::Cluster) -> ClusterState {
    let host = c.service.clone().unwrap_or_default();
    // Empty: metrics derives it from a `NAME.NS.svc.*` host, or falls back further.
    let namespace = c.service_namespace.clone().unwrap_or_default();
    let endpoints: Vec<EndpointState> = endpoint_states(c).collect();
    let subsets = c
        .subsets
        .iter()
        .map(|s| {
            let members = (0..endpoints.len()).filter(|&i| selects(&s.labels, &c.endpoints[i])).collect();
            Pool::new(members, s.load_balancer.unwrap_or(c.load_balancer), &endpoints)
        })
        .collect();
    ClusterState {
        name: c.name.clone(),
        service: ServiceInfo { host, namespace },
        all: Pool::new((0..endpoints.len()).collect(), c.load_balancer, &endpoints),
        endpoints,
        source: Arc::clone(&c.endpoints),
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
            if r.clusters[0].labels(e).unwrap()["version"] == "v1" {
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
    fn endpoint_weights_share_turns_in_proportion_and_equal_weights_keep_plain_turns() {
        assert!(Weights::new(&[1, 1, 1]).is_none());
        let turns = |w: &Weights, n: usize| {
            let mut s = w.schedule();
            (0..n).map(|_| s.next(w)).collect::<Vec<_>>()
        };
        let w = Weights::new(&[5, 1, 1]).unwrap();
        assert_eq!(turns(&w, 14), [0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(turns(&Weights::new(&[200, 100]).unwrap(), 6), [0, 0, 1, 0, 0, 1]);
        // Extreme weights: the light member still gets its turn, nothing overflows.
        let huge = Weights::new(&[u32::MAX, 1]).unwrap();
        assert_eq!(huge.at(u64::from(u32::MAX)), 1);
        assert_eq!(huge.at(0), 0);
        let light = turns(&huge, 2);
        assert_eq!(light, [0, 0]);
        let w = Weights::new(&[3, 1]).unwrap();
        let mut draws = [0u32; 2];
        for x in 0..4_000u64 {
            draws[w.at(x)] += 1;
        }
        assert_eq!(draws, [3_000, 1_000]);
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
    fn an_endpoint_change_moves_only_its_clusters_addresses_and_shares_the_rest_of_the_table() {
        let yaml = "
listeners:
  - {name: capture, listen: 127.0.0.1:15001, direction: outbound, capture: outbound}
clusters:
  - {name: a, addresses: [10.96.0.1:80], endpoints: [{address: 10.1.0.1:80}]}
  - {name: b, addresses: [10.96.0.2:80], endpoints: [{address: 10.1.0.2:80}]}
";
        let first_cfg = cfg(yaml);
        let first = Routes::new(&first_cfg, None);
        // `a`'s endpoint moves; everything else is the same `Arc`s (as the xDS merge shares).
        let mut second_cfg = first_cfg.clone();
        let mut a = (*second_cfg.clusters[0]).clone();
        a.endpoints = Arc::new(vec![crate::config::Endpoint::at("10.1.0.9:80".parse().unwrap())]);
        second_cfg.clusters[0] = Arc::new(a);
        let second = Routes::new(&second_cfg, Some(&first));
        assert!(Arc::ptr_eq(&first.clusters[1], &second.clusters[1]), "b is shared");
        assert!(Arc::ptr_eq(&first.listeners[0], &second.listeners[0]), "the chain table is shared");
        assert!(Arc::ptr_eq(&first.by_address.built, &second.by_address.built), "the map is shared");
        assert_eq!(second.by_address.changed.len(), 2, "only a's old and new endpoint");
        let router = Router::with(Arc::new(second), Rc::new(Balance::seeded(1)));
        let at = |a: &str| router.route_original_dst(a.parse().unwrap()).map(|t| t.cluster);
        assert_eq!(
            [at("10.96.0.1:80"), at("10.1.0.9:80"), at("10.1.0.1:80"), at("10.96.0.2:80"), at("10.1.0.2:80")],
            [Some(0), Some(0), None, Some(1), Some(1)]
        );
        // `a` now claims b's endpoint too: the first cluster wins, as a full build says.
        let mut third_cfg = second_cfg.clone();
        let mut a = (*third_cfg.clusters[0]).clone();
        a.endpoints = Arc::new(vec![crate::config::Endpoint::at("10.1.0.2:80".parse().unwrap())]);
        third_cfg.clusters[0] = Arc::new(a);
        let third = Routes::new(&third_cfg, Some(&router.routes));
        assert!(third.by_address.changed.is_empty(), "built anew");
        let router = Router::with(Arc::new(third), Rc::new(Balance::seeded(1)));
        assert_eq!(router.route_original_dst("10.1.0.2:80".parse().unwrap()).map(|t| t.cluster), Some(0));
    }

    #[test]
    fn an_endpoint_change_builds_the_table_of_its_cluster_only_sharing_every_other_chunk() {
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
        let first = Routes::new(&first_cfg, None);
        let mut second_cfg = first_cfg.clone();
        let mut c = (*second_cfg.clusters[700]).clone();
        c.endpoints = Arc::new(vec![crate::config::Endpoint::at("10.2.0.9:80".parse().unwrap())]);
        second_cfg.clusters[700] = Arc::new(c);
        let second = Routes::new(&second_cfg, Some(&first));
        assert_eq!(second.clusters.shared_chunks(&first.clusters), first.clusters.chunk_count() - 1);
        assert!(!Arc::ptr_eq(&second.clusters[700], &first.clusters[700]));
        assert!(Arc::ptr_eq(&second.clusters[701], &first.clusters[701]));
        assert_eq!(second.clusters[700].source[0].address.to_string(), "10.2.0.9:80");
        // The clusters of shared chunks were not even cloned: held by the two tables only
        // through their shared chunk.
        assert_eq!(Arc::strong_count(&first.clusters[0]), 1);
    }

    #[test]
    fn a_publication_shares_the_clusters_that_did_not_change_and_a_workers_turns_in_them() {
        let two = format!(
            "{BASE}  - {{name: other, endpoints: [{{address: 127.0.0.1:20}}, {{address: 127.0.0.1:21}}]}}\n"
        );
        let first = Arc::new(Routes::new(&cfg(&two), None));
        // An endpoint change of `db` alone (SPEC §11: it touches only its cluster).
        let second = Arc::new(Routes::new(&cfg(&two.replace("127.0.0.1:12", "127.0.0.1:13")), Some(&first)));
        assert!(!Arc::ptr_eq(&first.clusters[0], &second.clusters[0]), "db changed");
        assert!(Arc::ptr_eq(&first.clusters[1], &second.clusters[1]), "other is shared");
        let balance = Rc::new(Balance::seeded(7));
        let before = Router::with(first, Rc::clone(&balance));
        let other = Target { cluster: 1, subset: None };
        assert_eq!(before.candidates(other, now()).next(), Some(0));
        before.connected(1, 0);
        before.failed(1, 1, now());
        let after = Router::with(second, balance);
        // The worker's turn, live count and ejection in `other` carry over: :21 is ejected,
        // so :20 first although its turn has passed.
        assert_eq!(after.candidates(other, now()).collect::<Vec<_>>(), [0, 1]);
        after.connected(1, 1);
        // The turns went on: :20 again (turns started over at this publication would give :21).
        assert_eq!(after.candidates(other, now()).next(), Some(0));
        after.disconnected(1, 0);
    }

    #[test]
    fn a_workers_state_forgets_clusters_gone_but_keeps_those_carrying_connections() {
        // 200 generations, each publishing one new cluster in place of the last (a mesh whose
        // services come and go): the worker routes to each, and one connection stays open
        // on the first.
        let generation = |i: usize| {
            let yaml =
                format!("{BASE}  - {{name: svc-{i}, endpoints: [{{address: 127.0.0.1:{}}}]}}\n", 20 + i);
            Arc::new(Routes::new(&cfg(&yaml), None))
        };
        let balance = Rc::new(Balance::seeded(7));
        for i in 0..200 {
            let r = Router::with(generation(i), Rc::clone(&balance));
            let t = Target { cluster: r.clusters.len() - 1, subset: None };
            assert_eq!(r.candidates(t, now()).next(), Some(0));
            if i == 0 {
                r.connected(t.cluster, 0);
            }
        }
        let held = balance.clusters.borrow().len();
        let published = generation(200).clusters.len();
        assert!(held <= 2 * published + 64 + 1, "{held} cluster states for {published} published");
        assert!(balance.clusters.borrow().contains_key("svc-0"), "svc-0 still carries a connection");
        assert!(!balance.clusters.borrow().contains_key("svc-1"), "svc-1 is gone and idle");
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
