//! The xDS resources accepted so far and how a response changes them (SPEC §9), for both
//! variants of ADS: a state-of-the-world response replaces the set, a delta one upserts its
//! resources and removes `removed_resources`. **Each resource stands alone, as in Envoy**.
//! Every resource of a response is decoded, translated and checked on its own; a valid one
//! replaces its previous entry, an invalid one keeps its previous version (or stays out),
//! and the reply names every invalid one. Then the merge beside the static config (`merge`),
//! checked as a whole: a cross-resource problem leaves out the resources it names, never the
//! whole response. Pure but for the `apply` it is handed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::config::route::v3 as rds;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;

use super::cluster::{XdsCluster, cluster};
use super::endpoint::load_assignment;
use super::listener::{XdsListener, listener};
use super::proto::{CLUSTER, ENDPOINTS, Error, LISTENER, ROUTES, decode, invalid};
use super::route::{XdsRoute, route_configuration};
use crate::config::{Config, Endpoint};

/// The resource types ringside subscribes to, in the order of `ringside_xds_*` metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    /// `envoy.config.cluster.v3.Cluster` (state of the world).
    Cluster = 0,
    /// `envoy.config.listener.v3.Listener` (state of the world).
    Listener = 1,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (only the names asked for).
    Endpoints = 2,
    /// `envoy.config.route.v3.RouteConfiguration` (the names HTTP chains ask for over RDS).
    Routes = 3,
}

impl Type {
    /// Every type, in index order.
    pub const ALL: [Type; 4] = [Type::Cluster, Type::Listener, Type::Endpoints, Type::Routes];

    /// The type of a type URL, if subscribed.
    pub fn of(type_url: &str) -> Option<Type> {
        match type_url {
            CLUSTER => Some(Type::Cluster),
            LISTENER => Some(Type::Listener),
            ENDPOINTS => Some(Type::Endpoints),
            ROUTES => Some(Type::Routes),
            _ => None,
        }
    }

    /// Its type URL.
    pub fn url(self) -> &'static str {
        [CLUSTER, LISTENER, ENDPOINTS, ROUTES][self as usize]
    }

    /// Its name in resource names (`Cluster/NAME`) and metrics.
    pub fn name(self) -> &'static str {
        ["Cluster", "Listener", "ClusterLoadAssignment", "RouteConfiguration"][self as usize]
    }
}

/// One accepted resource: the version of the response that brought it and its translation,
/// behind an `Arc` so that a later state shares what did not change.
#[derive(Debug)]
pub struct Accepted<T> {
    /// `version_info` of the response that brought it.
    pub version: String,
    /// Its translation.
    pub value: Arc<T>,
}

impl<T> Clone for Accepted<T> {
    fn clone(&self) -> Self {
        Accepted { version: self.version.clone(), value: Arc::clone(&self.value) }
    }
}

impl<T> Accepted<T> {
    /// `value` brought by a response of `version`.
    pub fn new(version: &str, value: T) -> Self {
        Accepted { version: version.to_string(), value: Arc::new(value) }
    }
}

/// The resources accepted so far, per type, by name.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Listeners by name.
    pub listeners: BTreeMap<String, Accepted<XdsListener>>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Accepted<XdsCluster>>,
    /// Endpoints by ClusterLoadAssignment name.
    pub endpoints: BTreeMap<String, Accepted<Vec<Endpoint>>>,
    /// RouteConfigurations by name.
    pub routes: BTreeMap<String, Accepted<XdsRoute>>,
    /// Per type, the version of the last response accepted whole: what an ACK or NACK
    /// carries (as Envoy), and what a new stream tells the server it has.
    pub versions: [String; 4],
    /// Per type, whether a response has arrived (applied or not): Envoy's initial fetch is
    /// done when each has, and a NACK never blocks readiness.
    pub arrived: [bool; 4],
    /// Per type, the resources the last response of that type could not apply, and why.
    pub rejected: [Vec<Error>; 4],
    /// DNS clusters' endpoints as last resolved (`dns`), by cluster name.
    pub resolved: BTreeMap<String, Arc<Vec<Endpoint>>>,
    /// The clusters the last merge built, shared by the next where unchanged.
    merged: RefCell<Merged>,
    /// Counts the changes a response made to `clusters` (`take`, `revert`): what the
    /// [`State::eds_names`] cache is checked against, in O(1).
    clusters_changed: u64,
    /// The last [`State::eds_names`], with `clusters_changed` and the number of clusters
    /// when it was made: every SotW ACK of an EDS response names all 10,000 assignments of
    /// a large mesh, and rebuilding (and sorting) them per ACK was most of an endpoint
    /// change's cost; comparing the clusters one by one was a pass over the mesh per ACK.
    eds_names: RefCell<(u64, usize, Arc<Vec<String>>)>,
}

/// What one response did to the state.
#[derive(Debug)]
pub struct Outcome {
    /// Its resources that were not applied, each with why (empty: an ACK).
    pub rejected: Vec<Error>,
}

impl Outcome {
    /// The NACK's `error_detail`: every rejected resource with its reason, joined.
    pub fn error_detail(&self) -> Option<String> {
        (!self.rejected.is_empty())
            .then(|| self.rejected.iter().map(Error::to_string).collect::<Vec<_>>().join("; "))
    }
}

/// One resource of a response, as [`State::change`] reads it.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// Its name where the response gives it beside the resource (delta).
    pub name: Option<&'a str>,
    /// Its version: the response's `version_info` (state of the world), its own (delta).
    pub version: &'a str,
    /// The resource (a delta TTL heartbeat has none).
    pub any: Option<&'a Any>,
}

/// How a response changes the resources of its type.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// State of the world: Clusters and Listeners carried are the whole set; each
    /// ClusterLoadAssignment carried replaces its name only.
    Replace,
    /// Delta: the resources carried are upserted, `removed` go, the rest stays.
    Delta {
        /// `removed_resources`.
        removed: &'a [String],
    },
}

/// What one response changed, to undo it: the previous entries of the names it touched
/// (absent: the name was not held), never a copy of the whole state.
#[derive(Default)]
struct Undo {
    /// The touched names' previous entries.
    prev: State,
    /// Every name touched (upserted or removed).
    touched: BTreeSet<String>,
    /// The names upserted and still in effect: what the merge may blame.
    upserted: Vec<String>,
}

impl Undo {
    /// Record `name`'s entry in `state` before it is first changed.
    fn save(&mut self, state: &State, t: Type, name: &str) {
        if !self.touched.insert(name.to_string()) {
            return;
        }
        fn keep<T>(to: &mut BTreeMap<String, Accepted<T>>, from: &BTreeMap<String, Accepted<T>>, name: &str) {
            if let Some(x) = from.get(name) {
                to.insert(name.to_string(), x.clone());
            }
        }
        match t {
            Type::Listener => keep(&mut self.prev.listeners, &state.listeners, name),
            Type::Cluster => keep(&mut self.prev.clusters, &state.clusters, name),
            Type::Endpoints => keep(&mut self.prev.endpoints, &state.endpoints, name),
            Type::Routes => keep(&mut self.prev.routes, &state.routes, name),
        }
    }
}

impl State {
    /// The ClusterLoadAssignment names to subscribe to, sorted; shared with the last call
    /// while no response changed the clusters since (changes to `clusters` go through
    /// responses; one made to the field directly is seen only if it changes their number).
    pub fn eds_names(&self) -> Arc<Vec<String>> {
        let mut cache = self.eds_names.borrow_mut();
        if (cache.0, cache.1) != (self.clusters_changed, self.clusters.len()) {
            let mut names: Vec<String> =
                self.clusters.values().filter_map(|c| c.value.eds_name.clone()).collect();
            names.sort();
            names.dedup();
            *cache = (self.clusters_changed, self.clusters.len(), Arc::new(names));
        }
        Arc::clone(&cache.2)
    }

    /// The RouteConfiguration names to subscribe to: those the HTTP chains of the listeners
    /// held name over RDS (bound or handed off).
    pub fn rds_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .listeners
            .values()
            .flat_map(|x| {
                let own = x.value.listener.iter().flat_map(|l| &l.filter_chains);
                own.chain(x.value.handoff.iter().flat_map(|h| &h.chains))
            })
            .filter_map(|c| c.rds.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The DNS clusters held, by name: what the resolver watches.
    pub fn dns_clusters(&self) -> BTreeMap<String, Arc<super::dns::Dns>> {
        self.clusters
            .iter()
            .filter_map(|(n, c)| Some((n.clone(), Arc::clone(c.value.dns.as_ref()?))))
            .collect()
    }

    /// The version of `t` an ACK or NACK carries.
    pub fn version(&self, t: Type) -> &str {
        &self.versions[t as usize]
    }

    /// Clusters and Listeners have each arrived once, and the endpoints of EDS clusters and
    /// the routes of RDS chains if there are any (Envoy's initial fetch: a listener warms
    /// until its RouteConfiguration arrives, and istiod's `initial_fetch_timeout: 0s` sets no
    /// bound on that wait), applied or not.
    pub fn synced(&self) -> bool {
        self.arrived[Type::Cluster as usize]
            && self.arrived[Type::Listener as usize]
            && (self.arrived[Type::Endpoints as usize] || self.eds_names().is_empty())
            && (self.arrived[Type::Routes as usize] || self.rds_names().is_empty())
    }

    /// Valid config that is not served, and the resources rejected, one line each.
    pub fn reports(&self) -> Vec<String> {
        let served = self
            .listeners
            .values()
            .flat_map(|l| &l.value.reports)
            .chain(self.clusters.values().flat_map(|c| &c.value.reports))
            .cloned();
        let rejected = self.rejected.iter().flatten().map(|e| format!("rejected: {e}"));
        // One line for what reads the same (a chain is named by its index too).
        let mut seen = BTreeSet::new();
        served.chain(rejected).filter(|l| seen.insert(l.clone())).collect()
    }

    /// The secrets the accepted resources' TLS contexts name: from the SDS server
    /// (`over_ads` false) or over the ADS stream (true, istiod's `credentialName`).
    pub fn secret_names(&self, over_ads: bool) -> BTreeSet<String> {
        let listeners = self.listeners.values().flat_map(|x| {
            let own = x.value.listener.iter().flat_map(|l| &l.filter_chains);
            own.chain(x.value.handoff.iter().flat_map(|h| &h.chains)).filter_map(|c| c.tls.as_ref())
        });
        let clusters = self.clusters.values().filter_map(|x| x.value.cluster.tls.as_ref()?.secrets.as_ref());
        let mut names = BTreeSet::new();
        for s in listeners.map(|t| &t.secrets).chain(clusters) {
            // An empty name is no secret (none, or files inline in the context).
            let named = [&s.certificate, &s.validation].into_iter().filter(|n| !n.is_empty());
            names.extend(named.filter(|n| s.over_ads.contains(n) == over_ads).cloned());
        }
        names
    }

    /// Apply state-of-the-world response `r`: its resources are the whole set of their type
    /// (Clusters and Listeners it no longer carries go; ClusterLoadAssignments it carries
    /// replace those names only). See [`State::change`].
    pub fn update(
        &mut self,
        r: &DiscoveryResponse,
        base: &Config,
        apply: &mut dyn FnMut(Config) -> Result<(), String>,
    ) -> Outcome {
        let items: Vec<Incoming> = r
            .resources
            .iter()
            .map(|any| Incoming { name: None, version: &r.version_info, any: Some(any) })
            .collect();
        self.change(&r.type_url, &r.version_info, &items, Change::Replace, base, apply)
    }

    /// Apply delta response `r`: its resources are upserted, each with its own version, and
    /// `removed_resources` go; nothing else is touched. See [`State::change`].
    pub fn update_delta(
        &mut self,
        r: &DeltaDiscoveryResponse,
        base: &Config,
        apply: &mut dyn FnMut(Config) -> Result<(), String>,
    ) -> Outcome {
        let items: Vec<Incoming> = r
            .resources
            .iter()
            .map(|x| Incoming { name: Some(&x.name), version: &x.version, any: x.resource.as_ref() })
            .collect();
        let removed = Change::Delta { removed: &r.removed_resources };
        self.change(&r.type_url, &r.system_version_info, &items, removed, base, apply)
    }

    /// Apply `items` of `type_url` as `how` says: each resource on its own, then the merge
    /// beside `base` checked as a whole and handed to `apply` (which publishes it, or says
    /// why it cannot and which resource it blames). A resource the whole blames is left out
    /// (its previous version kept) and the rest tried again. `self` becomes the state that
    /// was applied. The state is changed in place with an undo record of only the names
    /// touched: the work before the merge is proportional to the response, not to the
    /// state (an incremental EDS change costs its one assignment until the merge).
    pub fn change(
        &mut self,
        type_url: &str,
        version: &str,
        items: &[Incoming],
        how: Change,
        base: &Config,
        apply: &mut dyn FnMut(Config) -> Result<(), String>,
    ) -> Outcome {
        let Some(t) = Type::of(type_url) else {
            let why = format!("type {type_url:?} is not subscribed");
            return Outcome { rejected: vec![Error { resource: type_url.to_string(), reason: why }] };
        };
        let mut undo = Undo::default();
        let mut rejected = self.upsert(t, items, &how, base, &mut undo);
        // The merged whole, checked and applied; what it blames is left out, one at a time.
        // Each round reverts one changed resource, so this ends.
        loop {
            // An endpoint change patches the last merge's config (SPEC §11: O(what changed));
            // anything else, or nothing to patch, merges the whole.
            let fast = match t {
                Type::Endpoints => self.merge_endpoints(base, &undo.touched),
                _ => None,
            };
            let why = match fast.unwrap_or_else(|| self.merge(base)) {
                Err(e) => Err(e.to_string()),
                Ok(mut cfg) => match self.validate_merged(&mut cfg) {
                    Err(e) => Err(e.message),
                    Ok(()) => apply(cfg),
                },
            };
            let Err(why) = why else { break };
            match blamed(&why, t, &undo.upserted) {
                Some(name) => {
                    self.revert(&undo.prev, t, &name);
                    undo.upserted.retain(|n| *n != name);
                    rejected.push(invalid(t.name(), &name, strip_name(&why, t, &name)));
                }
                None => {
                    // Nothing this response changed is named: refuse what it changed. The
                    // last merge saw it: the next one starts from the whole state.
                    for name in &undo.touched {
                        self.revert(&undo.prev, t, name);
                    }
                    self.merged.borrow_mut().config = None;
                    rejected = undo.upserted.iter().map(|n| invalid(t.name(), n, why.clone())).collect();
                    if rejected.is_empty() {
                        rejected.push(Error { resource: t.name().to_string(), reason: why });
                    }
                    break;
                }
            }
        }
        if t == Type::Cluster {
            self.forget_orphaned_endpoints(&undo.prev);
        }
        if t == Type::Listener {
            self.forget_orphaned_routes(&undo.prev);
        }
        self.arrived[t as usize] = true;
        if rejected.is_empty() {
            self.versions[t as usize] = version.to_string();
        }
        self.rejected[t as usize] = rejected.clone();
        Outcome { rejected }
    }

    /// Each valid resource of `items` in place and the others as they were, then the
    /// removals `how` says; every name touched is recorded in `undo` first. Each resource
    /// is checked alone beside `base`. Returns the resources refused.
    fn upsert(
        &mut self,
        t: Type,
        items: &[Incoming],
        how: &Change,
        base: &Config,
        undo: &mut Undo,
    ) -> Vec<Error> {
        let mut rejected = Vec::new();
        let mut carried = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let version = item.version;
            let label = item.name.map_or_else(|| format!("#{i}"), str::to_string);
            let unnamed = |e: String| invalid(t.name(), &label, e);
            let translated: Result<(String, State), Error> = match item.any {
                // A delta resource without a body (a TTL heartbeat: ringside asks for none).
                None => Err(unnamed("no resource body".into())),
                Some(any) => match t {
                    Type::Listener => {
                        decode::<lds::Listener>(any, LISTENER).map_err(unnamed).and_then(|pb| {
                            let x = listener(&pb, version)?;
                            let mut alone = State::default();
                            alone.listeners.insert(pb.name.clone(), Accepted::new(version, x));
                            Ok((pb.name, alone))
                        })
                    }
                    Type::Cluster => decode::<cds::Cluster>(any, CLUSTER).map_err(unnamed).and_then(|pb| {
                        let x = cluster(&pb, version)?;
                        let mut alone = State::default();
                        alone.clusters.insert(pb.name.clone(), Accepted::new(version, x));
                        Ok((pb.name, alone))
                    }),
                    Type::Endpoints => {
                        decode::<eds::ClusterLoadAssignment>(any, ENDPOINTS).map_err(unnamed).and_then(|pb| {
                            let x = load_assignment(&pb)?;
                            let mut alone = State::default();
                            alone.endpoints.insert(pb.cluster_name.clone(), Accepted::new(version, x));
                            Ok((pb.cluster_name, alone))
                        })
                    }
                    Type::Routes => {
                        decode::<rds::RouteConfiguration>(any, ROUTES).map_err(unnamed).and_then(|pb| {
                            let x = route_configuration(&pb)?;
                            let mut alone = State::default();
                            alone.routes.insert(pb.name.clone(), Accepted::new(version, x));
                            Ok((pb.name, alone))
                        })
                    }
                },
            };
            let translated = translated.and_then(|(name, alone)| match item.name {
                // A delta response names each resource twice: both must agree.
                Some(outer) if outer != name => {
                    Err(invalid(t.name(), outer, format!("the resource inside is named {name:?}")))
                }
                _ => Ok((name, alone)),
            });
            let (name, alone) = match translated {
                Ok(x) => x,
                Err(e) => {
                    // Its name still counts as carried: what it replaces is kept, not removed.
                    if let Some(name) = e.resource.strip_prefix(&format!("{}/", t.name())) {
                        carried.insert(name.to_string());
                    }
                    rejected.push(e);
                    continue;
                }
            };
            if !carried.insert(name.clone()) {
                // As Envoy: one response naming a resource twice is ambiguous.
                rejected.push(invalid(t.name(), &name, "duplicate name in one response"));
                continue;
            }
            // Alone beside the static config: what makes this one resource unservable
            // (an address the static config holds, a TLS secret without files) is its own.
            let checked = alone
                .merge(base)
                .map_err(|e| e.reason)
                .and_then(|mut cfg| cfg.validate("xds", "").map_err(|e| strip_name(&e.message, t, &name)));
            if let Err(why) = checked {
                rejected.push(invalid(t.name(), &name, why));
                continue;
            }
            undo.save(self, t, &name);
            undo.upserted.push(name.clone());
            self.take(t, &name, alone);
        }
        let gone: Vec<String> = match (how, t) {
            // EDS and RDS responses carry only the names asked for, or only those that changed.
            (Change::Replace, Type::Endpoints | Type::Routes) => Vec::new(),
            (Change::Replace, Type::Listener) => {
                self.listeners.keys().filter(|n| !carried.contains(*n)).cloned().collect()
            }
            (Change::Replace, Type::Cluster) => {
                self.clusters.keys().filter(|n| !carried.contains(*n)).cloned().collect()
            }
            (Change::Delta { removed }, _) => {
                removed.iter().filter(|n| !carried.contains(*n) && self.holds(t, n)).cloned().collect()
            }
        };
        for name in gone {
            undo.save(self, t, &name);
            self.revert(&State::default(), t, &name);
        }
        rejected
    }

    /// Whether resource `name` of type `t` is held.
    fn holds(&self, t: Type, name: &str) -> bool {
        match t {
            Type::Listener => self.listeners.contains_key(name),
            Type::Cluster => self.clusters.contains_key(name),
            Type::Endpoints => self.endpoints.contains_key(name),
            Type::Routes => self.routes.contains_key(name),
        }
    }

    /// Forget the routes no listener names any more (`prev` holds the listeners a response
    /// changed, as they were): only the names those named are looked at.
    fn forget_orphaned_routes(&mut self, prev: &State) {
        let candidates: Vec<String> = State { listeners: prev.listeners.clone(), ..State::default() }
            .rds_names()
            .into_iter()
            .filter(|n| self.routes.contains_key(n))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let used: BTreeSet<String> = self.rds_names().into_iter().collect();
        for name in candidates {
            if !used.contains(&name) {
                self.routes.remove(&name);
            }
        }
    }

    /// Forget the endpoints of clusters that are gone or no longer ask for them (`prev`
    /// holds the clusters a response changed, as they were): only those are looked at.
    fn forget_orphaned_endpoints(&mut self, prev: &State) {
        let candidates: Vec<&String> = prev
            .clusters
            .values()
            .filter_map(|c| c.value.eds_name.as_ref())
            .filter(|n| self.endpoints.contains_key(*n))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let used = self.eds_names();
        for name in candidates {
            if used.binary_search(name).is_err() {
                self.endpoints.remove(name);
            }
        }
    }

    /// The versions held of type `t`, by name: what a new delta stream tells the server it
    /// has (`initial_resource_versions`).
    pub fn resource_versions(&self, t: Type) -> std::collections::HashMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Accepted<T>>) -> std::collections::HashMap<String, String> {
            m.iter().map(|(n, x)| (n.clone(), x.version.clone())).collect()
        }
        match t {
            Type::Listener => of(&self.listeners),
            Type::Cluster => of(&self.clusters),
            Type::Endpoints => of(&self.endpoints),
            Type::Routes => of(&self.routes),
        }
    }

    /// Take resource `name` of type `t` from `from`.
    fn take(&mut self, t: Type, name: &str, mut from: State) {
        self.clusters_changed += u64::from(t == Type::Cluster);
        if let Some(x) = from.listeners.remove(name).filter(|_| t == Type::Listener) {
            self.listeners.insert(name.into(), x);
        }
        if let Some(x) = from.clusters.remove(name).filter(|_| t == Type::Cluster) {
            self.clusters.insert(name.into(), x);
        }
        if let Some(x) = from.endpoints.remove(name).filter(|_| t == Type::Endpoints) {
            self.endpoints.insert(name.into(), x);
        }
        if let Some(x) = from.routes.remove(name).filter(|_| t == Type::Routes) {
            self.routes.insert(name.into(), x);
        }
    }

    /// Resource `name` of type `t` back as it is in `prev` (or gone if it is not there).
    fn revert(&mut self, prev: &State, t: Type, name: &str) {
        self.clusters_changed += u64::from(t == Type::Cluster);
        fn back<T>(now: &mut BTreeMap<String, Accepted<T>>, was: &BTreeMap<String, Accepted<T>>, name: &str) {
            match was.get(name) {
                Some(x) => now.insert(name.to_string(), x.clone()),
                None => now.remove(name),
            };
        }
        match t {
            Type::Listener => back(&mut self.listeners, &prev.listeners, name),
            Type::Cluster => back(&mut self.clusters, &prev.clusters, name),
            Type::Endpoints => back(&mut self.endpoints, &prev.endpoints, name),
            Type::Routes => back(&mut self.routes, &prev.routes, name),
        }
    }
}

/// The ways a message names resource `name` of type `t`: `Listener/NAME` (a resource error,
/// `apply`'s), `listener NAME` and `cluster "NAME"` (`Config::validate`'s).
fn mentions(t: Type, name: &str) -> Vec<String> {
    let kinds: &[&str] = match t {
        Type::Listener => &["listener"],
        Type::Cluster | Type::Endpoints => &["cluster"],
        Type::Routes => &["route_config"],
    };
    let mut ways = vec![format!("{}/{name}", t.name()), format!("{name:?}")];
    ways.extend(kinds.iter().map(|k| format!("{k} {name}")));
    ways
}

/// Which of `changed` (names of type `t`) message `why` blames: the longest one it names,
/// followed by something that cannot continue a name.
fn blamed(why: &str, t: Type, changed: &[String]) -> Option<String> {
    let ends_name =
        |rest: &str| rest.chars().next().is_none_or(|c| c == ':' || c == ' ' || c == ',' || c == ')');
    changed
        .iter()
        .filter(|name| {
            mentions(t, name)
                .iter()
                .any(|way| why.match_indices(way.as_str()).any(|(i, _)| ends_name(&why[i + way.len()..])))
        })
        .max_by_key(|name| name.len())
        .cloned()
}

/// `why` without a leading naming of the resource (it is named once, by the error).
fn strip_name(why: &str, t: Type, name: &str) -> String {
    mentions(t, name)
        .iter()
        .find_map(|way| why.strip_prefix(way.as_str()).and_then(|r| r.strip_prefix(": ")))
        .unwrap_or(why)
        .to_string()
}

mod merge;

use merge::Merged;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::fixtures::*;
    use envoy_types::pb::google::protobuf::Any;

    fn response(t: Type, version: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources,
            type_url: t.url().into(),
            nonce: version.into(),
            ..Default::default()
        }
    }

    fn listeners(version: &str, ls: &[lds::Listener]) -> DiscoveryResponse {
        response(Type::Listener, version, ls.iter().map(|l| any(LISTENER, l)).collect())
    }

    fn tcp(name: &str, address: &str, cluster: Option<&str>) -> lds::Listener {
        let target = match cluster {
            Some(c) => to(c),
            None => proxy(None),
        };
        outbound(name, address, vec![chain(vec![target])])
    }

    fn routes(state: &State) -> Vec<(String, String, Option<String>)> {
        state
            .listeners
            .iter()
            .map(|(n, x)| {
                let l = x.value.listener.as_ref().unwrap();
                (n.clone(), x.version.clone(), l.cluster.clone())
            })
            .collect()
    }

    fn ok(_: Config) -> Result<(), String> {
        Ok(())
    }

    fn rejected(o: &Outcome) -> Vec<&str> {
        o.rejected.iter().map(|e| e.resource.as_str()).collect()
    }

    #[test]
    fn valid_resources_apply_and_each_invalid_one_keeps_its_previous_version_named_in_the_nack() {
        let mut state = State::default();
        let base = certificates();
        let first =
            listeners("1", &[tcp("a", "127.0.0.1:1001", Some("c1")), tcp("b", "127.0.0.1:1002", Some("c1"))]);
        let o = state.update(&first, &base, &mut ok);
        assert!(o.error_detail().is_none(), "{:?}", o.rejected);
        assert_eq!(state.version(Type::Listener), "1");
        // a changes (valid), b turns invalid (it had a version), n is new and invalid.
        let second = listeners(
            "2",
            &[
                tcp("a", "127.0.0.1:1001", Some("c2")),
                tcp("b", "127.0.0.1:1002", None),
                tcp("n", "127.0.0.1:1003", None),
            ],
        );
        let o = state.update(&second, &base, &mut ok);
        assert_eq!(rejected(&o), ["Listener/b", "Listener/n"]);
        assert_eq!(
            o.error_detail().unwrap(),
            "Listener/b: filter chain 0: tcp_proxy without a cluster; Listener/n: filter chain 0: tcp_proxy without a cluster"
        );
        assert_eq!(
            routes(&state),
            [("a".into(), "2".into(), Some("c2".into())), ("b".into(), "1".into(), Some("c1".into()))]
        );
        assert_eq!(state.version(Type::Listener), "1", "the last version accepted whole, as Envoy");
        assert!(
            state.reports().iter().any(|l| l.starts_with("rejected: Listener/n:")),
            "{:?}",
            state.reports()
        );
        // A state-of-the-world response without b removes it, invalid or not.
        let o = state.update(&listeners("3", &[tcp("a", "127.0.0.1:1001", Some("c2"))]), &base, &mut ok);
        assert!(o.rejected.is_empty());
        assert_eq!(routes(&state), [("a".into(), "3".into(), Some("c2".into()))]);
    }

    #[test]
    fn a_cross_resource_problem_leaves_out_only_the_resource_it_names() {
        let mut state = State::default();
        // Each alone is valid; together they claim one address.
        let r =
            listeners("1", &[tcp("x", "127.0.0.1:1001", Some("c")), tcp("y", "127.0.0.1:1001", Some("c"))]);
        let o = state.update(&r, &certificates(), &mut ok);
        assert_eq!(rejected(&o), ["Listener/y"]);
        assert!(o.rejected[0].reason.contains("address already used"), "{:?}", o.rejected);
        assert_eq!(state.listeners.keys().collect::<Vec<_>>(), ["x"]);
        // What `apply` blames (a listener that cannot bind) is left out the same way.
        let r = listeners(
            "2",
            &[tcp("x", "127.0.0.1:1001", Some("c")), tcp("taken", "127.0.0.1:1009", Some("c"))],
        );
        let mut apply = |cfg: Config| match cfg.listeners.iter().any(|l| l.name == "taken") {
            true => Err("Listener/taken: cannot bind 127.0.0.1:1009: address in use".to_string()),
            false => Ok(()),
        };
        let o = state.update(&r, &certificates(), &mut apply);
        assert_eq!(o.error_detail().unwrap(), "Listener/taken: cannot bind 127.0.0.1:1009: address in use");
        assert_eq!(state.listeners.keys().collect::<Vec<_>>(), ["x"]);
    }

    fn eds_cluster(name: &str) -> cds::Cluster {
        cds::Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        }
    }

    fn assignment(name: &str, address: &str, weight: u32) -> Any {
        use envoy_types::pb::google::protobuf::UInt32Value;
        let cla = eds::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![eds::LbEndpoint {
                    host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                        address: addr(address),
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        any(ENDPOINTS, &cla)
    }

    #[test]
    fn per_push_cost_is_linear_in_what_changed_the_eds_names_an_ack_carries_are_kept_while_the_clusters_are()
    {
        let (mut state, base) = (State::default(), certificates());
        let two = |v| {
            response(Type::Cluster, v, vec![any(CLUSTER, &eds_cluster("a")), any(CLUSTER, &eds_cluster("b"))])
        };
        state.update(&two("1"), &base, &mut ok);
        let first = state.eds_names();
        assert_eq!(*first, ["a", "b"]);
        // An EDS response leaves the clusters as they were: the same names, not rebuilt.
        state.update(
            &response(Type::Endpoints, "1", vec![assignment("a", "10.0.0.1:80", 1)]),
            &base,
            &mut ok,
        );
        assert!(Arc::ptr_eq(&first, &state.eds_names()), "rebuilt with no cluster changed");
        // A cluster dropped: the names follow.
        state.update(&response(Type::Cluster, "2", vec![any(CLUSTER, &eds_cluster("a"))]), &base, &mut ok);
        assert_eq!(*state.eds_names(), ["a"]);
        // Both again: a new list with both.
        state.update(&two("3"), &base, &mut ok);
        assert_eq!(*state.eds_names(), ["a", "b"]);
    }

    #[test]
    fn eds_responses_touch_only_the_assignments_they_carry_and_a_nack_never_blocks_readiness() {
        let (mut state, base) = (State::default(), certificates());
        let clusters = response(
            Type::Cluster,
            "1",
            vec![any(CLUSTER, &eds_cluster("a")), any(CLUSTER, &eds_cluster("b"))],
        );
        state.update(&clusters, &base, &mut ok);
        // Every listener invalid: NACKed, and the type still counts as arrived.
        let o = state.update(&listeners("1", &[tcp("l", "127.0.0.1:1001", None)]), &base, &mut ok);
        assert_eq!(rejected(&o), ["Listener/l"]);
        assert!(!state.synced(), "the EDS clusters' endpoints have not arrived");
        let both = vec![assignment("a", "10.0.0.1:80", 1), assignment("b", "10.0.0.2:80", 1)];
        state.update(&response(Type::Endpoints, "1", both), &base, &mut ok);
        assert!(state.synced());
        assert_eq!(state.version(Type::Listener), "", "nothing accepted whole yet");
        // Only a, and invalid: a keeps version 1, b untouched.
        let o = state.update(
            &response(Type::Endpoints, "2", vec![assignment("a", "10.0.0.9:80", 0)]),
            &base,
            &mut ok,
        );
        assert_eq!(rejected(&o), ["ClusterLoadAssignment/a"]);
        let at = |s: &State, n: &str| {
            (s.endpoints[n].version.clone(), s.endpoints[n].value[0].address.to_string())
        };
        assert_eq!(at(&state, "a"), ("1".into(), "10.0.0.1:80".into()));
        state.update(
            &response(Type::Endpoints, "3", vec![assignment("b", "10.0.0.3:80", 1)]),
            &base,
            &mut ok,
        );
        assert_eq!(
            (at(&state, "a"), at(&state, "b")),
            (("1".into(), "10.0.0.1:80".into()), ("3".into(), "10.0.0.3:80".into()))
        );
        // A cluster gone takes its endpoints with it.
        state.update(&response(Type::Cluster, "2", vec![any(CLUSTER, &eds_cluster("b"))]), &base, &mut ok);
        assert_eq!(state.endpoints.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_response_of_one_type_shares_every_other_resource_with_the_state_before() {
        let (mut state, base) = (State::default(), certificates());
        state.update(&response(Type::Cluster, "1", vec![any(CLUSTER, &eds_cluster("a"))]), &base, &mut ok);
        state.update(&listeners("1", &[tcp("l", "127.0.0.1:1001", Some("a"))]), &base, &mut ok);
        let before = state.clone();
        state.update(
            &response(Type::Endpoints, "1", vec![assignment("a", "10.0.0.1:80", 1)]),
            &base,
            &mut ok,
        );
        assert!(Arc::ptr_eq(&before.listeners["l"].value, &state.listeners["l"].value));
        assert!(Arc::ptr_eq(&before.clusters["a"].value, &state.clusters["a"].value));
    }

    #[test]
    fn an_endpoint_change_touches_only_its_cluster_shares_the_listeners_and_holds_the_endpoints_once() {
        let (mut state, base) = (State::default(), certificates());
        let last: std::cell::RefCell<Option<Config>> = Default::default();
        let mut keep = |c: Config| {
            last.replace(Some(c));
            Ok(())
        };
        let clusters = response(
            Type::Cluster,
            "1",
            vec![any(CLUSTER, &eds_cluster("a")), any(CLUSTER, &eds_cluster("b"))],
        );
        state.update(&clusters, &base, &mut keep);
        state.update(&listeners("1", &[tcp("l", "127.0.0.1:1001", Some("a"))]), &base, &mut keep);
        let both = vec![assignment("a", "10.0.0.1:80", 1), assignment("b", "10.0.0.2:80", 1)];
        state.update(&response(Type::Endpoints, "1", both), &base, &mut keep);
        let before = last.take().unwrap();
        state.update(
            &response(Type::Endpoints, "2", vec![assignment("a", "10.0.0.9:80", 1)]),
            &base,
            &mut keep,
        );
        let after = last.take().unwrap();
        let (a, b) = (&after.clusters[0], &after.clusters[1]);
        assert_eq!((a.name.as_str(), b.name.as_str()), ("a", "b"));
        assert!(Arc::ptr_eq(b, &before.clusters[1]), "b did not change: the same Arc");
        assert!(!Arc::ptr_eq(a, &before.clusters[0]));
        assert_eq!(a.endpoints[0].address.to_string(), "10.0.0.9:80");
        // The merged cluster holds the state's endpoints, not a copy.
        assert!(Arc::ptr_eq(&a.endpoints, &state.endpoints["a"].value));
        assert!(Arc::ptr_eq(&b.endpoints, &state.endpoints["b"].value));
        // The listeners did not change: the same merged listener, not a copy.
        assert_eq!(after.listeners.len(), 1);
        assert!(Arc::ptr_eq(&after.listeners[0], &before.listeners[0]));
    }

    /// A state holding `n` EDS clusters `c0..`, each with one endpoint, and a listener to
    /// `c0`; with the configs `apply` was handed.
    fn mesh(n: usize) -> (State, Config, std::rc::Rc<std::cell::RefCell<Vec<Config>>>) {
        let (mut state, base) = (State::default(), certificates());
        let applied: std::rc::Rc<std::cell::RefCell<Vec<Config>>> = Default::default();
        let log = std::rc::Rc::clone(&applied);
        let mut keep = move |c: Config| {
            log.borrow_mut().push(c);
            Ok(())
        };
        let clusters = (0..n).map(|i| any(CLUSTER, &eds_cluster(&format!("c{i}")))).collect();
        state.update(&response(Type::Cluster, "1", clusters), &base, &mut keep);
        state.update(&listeners("1", &[tcp("l", "127.0.0.1:1001", Some("c0"))]), &base, &mut keep);
        let all =
            (0..n).map(|i| assignment(&format!("c{i}"), &format!("10.0.{}.{}:80", i / 250, i % 250), 1));
        state.update(&response(Type::Endpoints, "1", all.collect()), &base, &mut keep);
        (state, base, applied)
    }

    #[test]
    fn an_endpoint_change_builds_its_cluster_only_and_the_new_config_shares_every_other_chunk() {
        let (mut state, base, applied) = mesh(1000);
        let before = applied.borrow().last().unwrap().clone();
        let mut keep = |c: Config| {
            applied.borrow_mut().push(c);
            Ok(())
        };
        // Delta: one assignment.
        let change = delta(Type::Endpoints, vec![("c700", "2", assignment("c700", "10.9.9.9:80", 1))], &[]);
        let o = state.update_delta(&change, &base, &mut keep);
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        let after = applied.borrow().last().unwrap().clone();
        assert_eq!(state.merged.borrow().looked_at, 1, "one cluster looked at, not the 1,000");
        let at = after.clusters.iter().position(|c| c.name == "c700").unwrap();
        assert_eq!(after.clusters[at].endpoints[0].address.to_string(), "10.9.9.9:80");
        assert_eq!(
            after.clusters.shared_chunks(&before.clusters),
            before.clusters.chunk_count() - 1,
            "every chunk but c700's is the previous config's"
        );
        assert_eq!(after.clusters.differing(&before.clusters).unwrap().len(), 1);
        for (i, (a, b)) in after.clusters.iter().zip(before.clusters.iter()).enumerate() {
            assert_eq!(Arc::ptr_eq(a, b), i != at, "{}", a.name);
        }
        assert!(Arc::ptr_eq(&after.listeners[0], &before.listeners[0]));
        // The same over state of the world; what it carries again unchanged is not rebuilt.
        let same = assignment("c700", "10.9.9.9:80", 1);
        state.update(&response(Type::Endpoints, "3", vec![same]), &base, &mut keep);
        assert_eq!(state.merged.borrow().looked_at, 1);
        assert_eq!(
            applied.borrow().last().unwrap().clusters[at].endpoints[0].address.to_string(),
            "10.9.9.9:80"
        );
    }

    #[test]
    fn an_endpoint_change_undone_whole_leaves_its_cluster_as_applied_before_for_the_next_change() {
        let (mut state, base, applied) = mesh(200);
        // `apply` refuses, naming nothing of the response: it is undone whole.
        let mut refuse = |_: Config| Err("no worker took it".to_string());
        let change = vec![assignment("c5", "10.9.9.5:80", 1)];
        let o = state.update(&response(Type::Endpoints, "2", change), &base, &mut refuse);
        assert_eq!(rejected(&o), ["ClusterLoadAssignment/c5"]);
        let mut keep = |c: Config| {
            applied.borrow_mut().push(c);
            Ok(())
        };
        state.update(
            &response(Type::Endpoints, "3", vec![assignment("c6", "10.9.9.6:80", 1)]),
            &base,
            &mut keep,
        );
        let cfg = applied.borrow().last().unwrap().clone();
        let address = |name: &str| {
            let c = cfg.clusters.iter().find(|c| c.name == name).unwrap();
            c.endpoints[0].address.to_string()
        };
        assert_eq!((address("c5"), address("c6")), ("10.0.0.5:80".to_string(), "10.9.9.6:80".to_string()));
        // And the next patch starts from that whole merge again.
        state.update(
            &response(Type::Endpoints, "4", vec![assignment("c7", "10.9.9.7:80", 1)]),
            &base,
            &mut keep,
        );
        assert_eq!(state.merged.borrow().looked_at, 1);
        let cfg = applied.borrow().last().unwrap().clone();
        let c5 = cfg.clusters.iter().find(|c| c.name == "c5").unwrap();
        assert_eq!(c5.endpoints[0].address.to_string(), "10.0.0.5:80");
    }

    fn delta(t: Type, resources: Vec<(&str, &str, Any)>, removed: &[&str]) -> DeltaDiscoveryResponse {
        use envoy_types::pb::envoy::service::discovery::v3::Resource;
        DeltaDiscoveryResponse {
            system_version_info: "sys".into(),
            resources: resources
                .into_iter()
                .map(|(name, version, any)| Resource {
                    name: name.into(),
                    version: version.into(),
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            type_url: t.url().into(),
            removed_resources: removed.iter().map(|n| n.to_string()).collect(),
            nonce: "n".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_response_upserts_what_it_carries_with_its_own_versions_and_removes_removed_resources() {
        let (mut state, base) = (State::default(), certificates());
        fn cl<'a>(n: &'a str, v: &'a str) -> (&'a str, &'a str, Any) {
            (n, v, any(CLUSTER, &eds_cluster(n)))
        }
        let o = state.update_delta(
            &delta(Type::Cluster, vec![cl("a", "a1"), cl("b", "b1")], &[]),
            &base,
            &mut ok,
        );
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        let eps = vec![
            ("a", "ea1", assignment("a", "10.0.0.1:80", 1)),
            ("b", "eb1", assignment("b", "10.0.0.2:80", 1)),
        ];
        state.update_delta(&delta(Type::Endpoints, eps, &[]), &base, &mut ok);
        fn lis<'a>(n: &'a str, v: &'a str, a: &str) -> (&'a str, &'a str, Any) {
            (n, v, any(LISTENER, &tcp(n, a, Some("a"))))
        }
        state.update_delta(
            &delta(
                Type::Listener,
                vec![lis("x", "x1", "127.0.0.1:1001"), lis("y", "y1", "127.0.0.1:1002")],
                &[],
            ),
            &base,
            &mut ok,
        );
        assert!(state.synced());
        let before = state.clone();
        // One assignment changes, one bad one beside it: only a's entry is new.
        let o = state.update_delta(
            &delta(
                Type::Endpoints,
                vec![
                    ("a", "ea2", assignment("a", "10.0.0.9:80", 1)),
                    ("b", "eb2", assignment("b", "10.0.0.8:80", 0)),
                ],
                &[],
            ),
            &base,
            &mut ok,
        );
        assert_eq!(rejected(&o), ["ClusterLoadAssignment/b"]);
        assert_eq!(state.endpoints["a"].version, "ea2");
        assert!(Arc::ptr_eq(&before.endpoints["b"].value, &state.endpoints["b"].value), "b keeps eb1");
        assert!(Arc::ptr_eq(&before.clusters["a"].value, &state.clusters["a"].value));
        assert_eq!(
            state.resource_versions(Type::Endpoints),
            [("a".to_string(), "ea2".to_string()), ("b".into(), "eb1".into())].into_iter().collect()
        );
        // A listener removed by name; the other untouched (a delta response is not the set).
        let o = state.update_delta(&delta(Type::Listener, vec![], &["y", "never-held"]), &base, &mut ok);
        assert!(o.rejected.is_empty());
        assert_eq!(state.listeners.keys().collect::<Vec<_>>(), ["x"]);
        // A cluster removed takes its endpoints with it; the other cluster's stay.
        state.update_delta(&delta(Type::Cluster, vec![], &["b"]), &base, &mut ok);
        assert_eq!(state.endpoints.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(*state.eds_names(), ["a"]);
        // A resource whose outer name disagrees with its own is refused under the outer name.
        let o = state.update_delta(
            &delta(Type::Cluster, vec![("c", "c1", any(CLUSTER, &eds_cluster("d")))], &[]),
            &base,
            &mut ok,
        );
        assert_eq!(rejected(&o), ["Cluster/c"]);
    }

    #[test]
    fn what_the_merge_blames_in_a_delta_response_is_undone_alone_and_the_rest_applies() {
        let (mut state, base) = (State::default(), certificates());
        fn lis<'a>(n: &'a str, v: &'a str, a: &str) -> (&'a str, &'a str, Any) {
            (n, v, any(LISTENER, &tcp(n, a, Some("c"))))
        }
        state.update_delta(
            &delta(Type::Listener, vec![lis("x", "x1", "127.0.0.1:1001")], &[]),
            &base,
            &mut ok,
        );
        let mut apply = |cfg: Config| match cfg.listeners.iter().any(|l| l.name == "taken") {
            true => Err("Listener/taken: cannot bind 127.0.0.1:1009: address in use".to_string()),
            false => Ok(()),
        };
        let r = delta(
            Type::Listener,
            vec![lis("x", "x2", "127.0.0.1:1003"), lis("taken", "t1", "127.0.0.1:1009")],
            &[],
        );
        let o = state.update_delta(&r, &base, &mut apply);
        assert_eq!(rejected(&o), ["Listener/taken"]);
        assert_eq!(
            state.resource_versions(Type::Listener),
            [("x".to_string(), "x2".to_string())].into_iter().collect()
        );
    }

    /// An HTTP connection manager naming route `name` over RDS.
    fn http_rds(name: &str) -> lds::Filter {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
        let m = hcm::HttpConnectionManager {
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
                route_config_name: name.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let url = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
        filter("envoy.filters.network.http_connection_manager", any(url, &m))
    }

    fn route_tables(version: &str, tables: Vec<rds::RouteConfiguration>) -> DiscoveryResponse {
        response(Type::Routes, version, tables.iter().map(|t| any(ROUTES, t)).collect())
    }

    #[test]
    fn an_http_chain_takes_its_route_from_the_route_configuration_it_names_and_follows_its_updates() {
        use crate::xds::route::tests::{table, vhost};
        let (mut state, base) = (State::default(), certificates());
        state.update(&response(Type::Cluster, "1", vec![]), &base, &mut ok);
        let http = outbound("http", "127.0.0.1:9080", vec![chain(vec![http_rds("9080")])]);
        let o = state.update(&listeners("1", &[http]), &base, &mut ok);
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        assert_eq!(state.rds_names(), ["9080"]);
        assert!(!state.synced(), "a listener warms until its RouteConfiguration arrives");
        let served = |s: &State| {
            let cfg = s.merge(&base).unwrap();
            let c = &cfg.listeners.iter().find(|l| l.name == "http").unwrap().filter_chains[0];
            (c.cluster.clone(), c.not_served.clone())
        };
        assert_eq!(served(&state), (None, Some("RDS route_config_name \"9080\": not arrived yet".into())));
        // IP:port before `*`.
        let first = table("9080", vec![vhost("svc", &["127.0.0.1:9080"], "a"), vhost("any", &["*"], "b")]);
        let o = state.update(&route_tables("1", vec![first]), &base, &mut ok);
        assert!(o.rejected.is_empty() && state.synced(), "{:?}", o.rejected);
        assert_eq!(served(&state), (Some("a".into()), None));
        // An update moves the chain; an invalid one is NACKed by name and the last good kept.
        state.update(
            &route_tables("2", vec![table("9080", vec![vhost("any", &["*"], "b")])]),
            &base,
            &mut ok,
        );
        assert_eq!(served(&state), (Some("b".into()), None));
        let twice = table("9080", vec![vhost("x", &["*"], "c"), vhost("y", &["*"], "d")]);
        let o = state.update(&route_tables("3", vec![twice]), &base, &mut ok);
        assert_eq!(rejected(&o), ["RouteConfiguration/9080"]);
        assert_eq!(served(&state), (Some("b".into()), None));
        assert_eq!(state.version(Type::Routes), "2");
        // No listener names it any more: forgotten, and no longer asked for.
        state.update(&listeners("2", &[]), &base, &mut ok);
        assert!(state.rds_names().is_empty() && state.routes.is_empty());
    }

    #[test]
    fn a_handed_off_http_chain_routes_each_address_its_route_configuration_names() {
        use crate::xds::route::tests::{table, vhost};
        // istiod's 0.0.0.0_9080 (not bound) under virtualOutbound, its routes over RDS.
        let mut port = outbound("0.0.0.0_9080", "0.0.0.0:9080", vec![chain(vec![http_rds("9080")])]);
        port.bind_to_port = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
        let mut capture =
            outbound("virtualOutbound", "0.0.0.0:15001", vec![chain(vec![to("PassthroughCluster")])]);
        capture.use_original_dst = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        let mut state = xds_state(vec![port, capture], &["details", "reviews", "reviews-v2"]);
        let passthrough = cds::Cluster {
            name: "PassthroughCluster".into(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::OriginalDst as i32,
            )),
            ..Default::default()
        };
        state.clusters.insert(
            "PassthroughCluster".into(),
            Accepted::new("1", crate::xds::cluster::cluster(&passthrough, "1").unwrap()),
        );
        assert_eq!(state.rds_names(), ["9080"]);
        let table = |reviews: &str| {
            table(
                "9080",
                vec![
                    vhost("details", &["details.default.svc.cluster.local", "10.96.0.1"], "details"),
                    vhost("reviews", &["reviews", "10.96.0.2:9080"], reviews),
                    vhost("allow_any", &["*"], "PassthroughCluster"),
                ],
            )
        };
        let to = |s: &State, dst: &str| {
            let cfg = s.merge(&certificates()).unwrap();
            let router = crate::routing::Router::new(&cfg, 1);
            router.route_original_dst(dst.parse().unwrap()).map(|t| cfg.clusters[t.cluster].name.clone())
        };
        assert_eq!(to(&state, "10.96.0.1:9080"), None, "before its routes: by original destination");
        let o = state.update(&route_tables("1", vec![table("reviews")]), &certificates(), &mut ok);
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        assert_eq!(to(&state, "10.96.0.1:9080").as_deref(), Some("details"));
        assert_eq!(to(&state, "10.96.0.2:9080").as_deref(), Some("reviews"));
        assert_eq!(to(&state, "10.96.0.9:9080"), None, "allow_any: the original destination itself");
        state.update(&route_tables("2", vec![table("reviews-v2")]), &certificates(), &mut ok);
        assert_eq!(to(&state, "10.96.0.2:9080").as_deref(), Some("reviews-v2"), "an update moves it");
    }
}
