//! How the accepted resources become a [`Config`] beside the static one (SPEC §9): the
//! merge, checked as a whole, and what it keeps of what it built ([`Merged`]), so that the
//! next merge shares every cluster and the listener side whose inputs are the same `Arc`s,
//! and an endpoint change patches the clusters it feeds into the last merge's config without
//! a look at the others (SPEC §11: an endpoint change touches its cluster only).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use super::{Accepted, State};
use crate::chunks::Chunks;
use crate::config::{Capture, Cluster, Config, Endpoint, FilterChain, Listener, LoadBalancer, PeerExchange};
use crate::xds::cluster::XdsCluster;
use crate::xds::listener::{Handoff, XdsListener};
use crate::xds::proto::{Error, invalid};
use crate::xds::route::{TcpTarget, XdsRoute, by_original_destination, route_target};
use crate::xds::tls::resolve;

impl State {
    /// An HTTP chain's route from the RouteConfiguration it names over RDS (SPEC §9): the
    /// virtual host holding the listener's address. Until that arrives, or when it routes
    /// nothing there, a chain of a bound listener closes its connections (`NR`: Envoy serves
    /// no listener still warming), and a capture listener's goes by original destination.
    /// Handed-off chains are routed by the addresses their table names (`merge`).
    fn take_route(&self, chain: &mut FilterChain, listen: std::net::SocketAddr, capture: Capture) {
        let Some(name) = &chain.rds else { return };
        if chain.handoff.is_some() || chain.not_served.is_some() {
            return;
        }
        let target = match self.routes.get(name) {
            None => Err(format!("RDS route_config_name {name:?}: not arrived yet")),
            Some(rc) => route_target(&rc.value.config, listen),
        };
        match target {
            Ok(TcpTarget::Cluster(c)) => chain.cluster = Some(c),
            Ok(TcpTarget::Weighted(routes)) => chain.tcp_routes = Some(routes),
            Err(_) if capture != Capture::None => {}
            Err(why) => chain.not_served = Some(why),
        }
    }

    /// Whether cluster `name` is an ORIGINAL_DST cluster (istiod's passthrough): its host is
    /// the connection's original destination, so no address is routed to it by name.
    fn original_dst(&self, name: &str) -> bool {
        self.clusters.get(name).is_some_and(|c| c.value.cluster.original_dst)
    }
}

impl State {
    /// `base` (the static config) with these resources beside it. A cluster a listener names
    /// but the control plane has not sent (yet) is there without endpoints (`UH`). TLS
    /// contexts naming the SDS secrets `default`/`ROOTCA` get `base.xds.certificates`' files;
    /// without those, the resource is an error (never plaintext instead).
    pub fn merge(&self, base: &Config) -> Result<Config, Error> {
        let certificates = base.xds.as_ref().and_then(|x| x.certificates.as_ref());
        let sds = base.xds.as_ref().is_some_and(|x| x.sds.is_some());
        let mut cfg = base.clone();
        let mut merged = self.merged.borrow_mut();
        let Merged {
            base: resolved_with,
            clusters: was_built,
            side,
            endpoints: endpoints_seen,
            validated,
            partial,
            config: patchable,
            by_eds,
            looked_at,
        } = &mut *merged;
        // Made again below if this merge succeeds whole.
        (*patchable, *by_eds, *looked_at) = (None, None, self.clusters.len());
        let mut any_waiting = false;
        // Whether the last merge's config passed validation: only then may this one's be
        // checked for what it rebuilt alone (`validate_merged`).
        let was_validated = std::mem::take(validated);
        *partial = None;
        let with = (certificates.cloned(), sds, base.clusters.iter().map(|c| c.name.clone()).collect());
        if *resolved_with != with {
            (*resolved_with, *was_built, *side, *endpoints_seen) = (with, Vec::new(), None, Vec::new());
        }
        // The listener side (the addresses routed to each cluster, the merged listeners and
        // the clusters they name but were not sent) depends on the listeners, route tables
        // and clusters held: unchanged (an endpoint change), it is the last merge's, shared.
        if !side.as_ref().is_some_and(|s| s.holds(self)) {
            *side = None;
        }
        let routed = match &*side {
            Some(s) => std::borrow::Cow::Borrowed(&s.routed),
            None => std::borrow::Cow::Owned(self.routed()),
        };
        // The cache is in the state's order: while the clusters held are the very same
        // (`side` holds them), entry i is cluster i's and its routed addresses are current,
        // so an endpoint change looks no name up but its assignment's. Else by name.
        let aligned = side.is_some() && was_built.len() == self.clusters.len();
        // The assignments that changed since the last merge, found by one pass of pointer
        // compares in order (a position whose assignment is another holds both names); `None`
        // when the set of names moved or too many changed: then each cluster looks its up.
        let changed_assignments = assignments_changed(&self.endpoints, endpoints_seen);
        let mut old = std::mem::take(was_built).into_iter();
        let mut by_name: HashMap<String, (Inputs, Arc<Cluster>)> = HashMap::new();
        if !aligned {
            by_name = old.by_ref().map(|(i, c)| (i.from.cluster.name.clone(), (i, c))).collect();
        }
        let mut built = Vec::with_capacity(self.clusters.len());
        let mut rebuilt = Vec::new();
        for (i, (name, x)) in self.clusters.iter().enumerate() {
            let was = if aligned { old.next() } else { by_name.remove(name.as_str()) };
            // Its assignment unchanged (and not a DNS cluster): the one it was built with.
            let unchanged = aligned
                && x.value.dns.is_none()
                && changed_assignments
                    .as_ref()
                    .is_some_and(|c| x.value.eds_name.as_ref().is_none_or(|e| !c.contains(e)));
            let endpoints = match (&x.value.eds_name, &was) {
                (_, Some((w, _))) if unchanged => w.endpoints.clone(),
                (Some(eds), _) => self.endpoints.get(eds).map(|e| Arc::clone(&e.value)),
                (None, _) => self.resolved.get(name).filter(|_| x.value.dns.is_some()).cloned(),
            };
            let addresses = match (&was, aligned) {
                (Some((w, _)), true) => w.addresses.as_slice(),
                _ => routed.get(name.as_str()).map_or(&[][..], Vec::as_slice),
            };
            // A cluster none of whose inputs changed is the previous publication's, shared
            // (SPEC §11: an endpoint change touches its cluster only). One waiting for a
            // secret is built again: the secret may have arrived.
            let kept = was.as_ref().is_some_and(|(w, c)| {
                w.same(&x.value, endpoints.as_ref(), addresses)
                    && c.tls.is_some() == x.value.cluster.tls.is_some()
            });
            let entry = match was {
                Some(entry) if kept => entry,
                _ => {
                    let inputs =
                        Inputs { from: Arc::clone(&x.value), endpoints, addresses: addresses.to_vec() };
                    let c = Arc::new(self.merge_cluster(&inputs, certificates, sds)?);
                    rebuilt.push(base.clusters.len() + i);
                    (inputs, c)
                }
            };
            any_waiting |= entry.1.tls.is_none() && x.value.cluster.tls.is_some();
            cfg.clusters.push(Arc::clone(&entry.1));
            built.push(entry);
        }
        *was_built = built;
        // Aligned, with the listener side the last one's: the clusters rebuilt differ from
        // the validated config's only in their endpoints or TLS files.
        if was_validated && aligned && matches!(routed, std::borrow::Cow::Borrowed(_)) {
            *partial = Some(rebuilt);
        }
        let routed = match routed {
            std::borrow::Cow::Owned(r) => Some(r),
            std::borrow::Cow::Borrowed(_) => None,
        };
        if let Some(routed) = routed {
            let (listeners, named, waiting) = self.merge_listeners(&cfg.clusters, certificates, sds)?;
            let made = Side::of(self, routed, listeners, named);
            if waiting {
                // What waits for a secret is merged again next time: it may have arrived.
                cfg.listeners.extend(made.listeners);
                cfg.clusters.extend(made.named);
                return Ok(cfg);
            }
            *side = Some(made);
        }
        if let Some(s) = side {
            cfg.listeners.extend(s.listeners.iter().cloned());
            cfg.clusters.extend(s.named.iter().cloned());
        }
        // Nothing waits for a secret (its arrival merges the whole again): the next endpoint
        // change may patch this config.
        if !any_waiting {
            *patchable = Some(cfg.clone());
        }
        Ok(cfg)
    }

    /// The last merge's config with the clusters built from the assignments `touched` built
    /// again, and nothing else looked at (SPEC §11: an endpoint change costs its clusters,
    /// not a pass over the mesh's). `None` when there is no such config to patch (the
    /// first merge, or the last one was not whole, or the base changed): merge the whole.
    /// Only for a state whose clusters, listeners, routes and DNS answers are those of the
    /// last merge (an endpoint change: `change` of ClusterLoadAssignments).
    pub(super) fn merge_endpoints(
        &self,
        base: &Config,
        touched: &BTreeSet<String>,
    ) -> Option<Result<Config, Error>> {
        let certificates = base.xds.as_ref().and_then(|x| x.certificates.as_ref());
        let sds = base.xds.as_ref().is_some_and(|x| x.sds.is_some());
        let mut merged = self.merged.borrow_mut();
        let merged = &mut *merged;
        let same_base = merged.base.0.as_ref() == certificates
            && merged.base.1 == sds
            && merged.base.2.len() == base.clusters.len()
            && merged.base.2.iter().zip(base.clusters.iter()).all(|(a, b)| *a == b.name);
        if !same_base || merged.clusters.len() != self.clusters.len() {
            return None;
        }
        let mut cfg = merged.config.clone()?;
        // Which clusters each assignment feeds, made once per set of clusters (the first
        // endpoint change after a cluster change pays it).
        let built = &merged.clusters;
        let by_eds = merged.by_eds.get_or_insert_with(|| {
            let mut by_eds: HashMap<String, Vec<usize>> = HashMap::new();
            for (i, (inputs, _)) in built.iter().enumerate() {
                if let (Some(eds), None) = (&inputs.from.eds_name, &inputs.from.dns) {
                    by_eds.entry(eds.clone()).or_default().push(i);
                }
            }
            by_eds
        });
        let mut patches = Vec::new();
        for name in touched {
            for &i in by_eds.get(name).map_or(&[][..], Vec::as_slice) {
                let (was, _) = &merged.clusters[i];
                let endpoints = self.endpoints.get(name).map(|e| Arc::clone(&e.value));
                if was.same(&was.from, endpoints.as_ref(), &was.addresses) {
                    continue;
                }
                let inputs =
                    Inputs { from: Arc::clone(&was.from), endpoints, addresses: was.addresses.clone() };
                match self.merge_cluster(&inputs, certificates, sds) {
                    Ok(c) => patches.push((i, (inputs, Arc::new(c)))),
                    Err(e) => {
                        merged.config = None;
                        return Some(Err(e));
                    }
                }
            }
        }
        let was_validated = std::mem::take(&mut merged.validated);
        // The whole merge's record of the assignments it saw no longer holds for the
        // clusters patched here: the next whole merge looks each up.
        merged.endpoints = Vec::new();
        merged.looked_at = patches.len();
        let mut rebuilt = Vec::with_capacity(patches.len());
        let mut any_waiting = false;
        for (i, entry) in patches {
            let at = base.clusters.len() + i;
            any_waiting |= entry.1.tls.is_none() && entry.0.from.cluster.tls.is_some();
            cfg.clusters[at] = Arc::clone(&entry.1);
            merged.clusters[i] = entry;
            rebuilt.push(at);
        }
        merged.partial = was_validated.then_some(rebuilt);
        merged.config = (!any_waiting).then(|| cfg.clone());
        Some(Ok(cfg))
    }

    /// The addresses the handed-off listeners and their RDS tables route to each cluster
    /// held, gathered before the clusters are built so that each is built once, whole.
    fn routed(&self) -> HashMap<String, Vec<SocketAddr>> {
        let handoffs = self.listeners.values().filter_map(|x| x.value.handoff.as_ref());
        let mut routed: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        for (address, cluster) in handoffs.clone().flat_map(|h| &h.addresses) {
            if self.clusters.contains_key(cluster) {
                routed.entry(cluster.clone()).or_default().push(*address);
            }
        }
        // Handed-off HTTP chains routed over RDS: each address their table names goes where
        // its virtual host says, as a capture routes by original destination (SPEC §8). A
        // route table may name thousands of services: clusters are found by name, not scanned.
        for c in handoffs.flat_map(|h| &h.chains).filter(|c| c.not_served.is_none()) {
            let (Some(name), Some(listen)) = (&c.rds, c.handoff) else { continue };
            let Some(rc) = self.routes.get(name) else { continue };
            for (address, target) in by_original_destination(&rc.value.config, listen) {
                // Weighted clusters and istiod's passthrough (`allow_any`) are left to the
                // original destination itself.
                let Ok(TcpTarget::Cluster(cluster)) = target else { continue };
                if self.original_dst(&cluster) || !self.clusters.contains_key(&cluster) {
                    continue;
                }
                let at = routed.entry(cluster).or_default();
                if !at.contains(&address) {
                    at.push(address);
                }
            }
        }
        routed
    }

    /// The listeners beside `clusters` (the merged ones): each capture listener with the
    /// handed-off chains, every chain's route and TLS files, and the clusters they name but
    /// were not sent (without endpoints: `UH`). True when something waits for a secret.
    #[allow(clippy::type_complexity)]
    fn merge_listeners(
        &self,
        clusters: &Chunks<Arc<Cluster>>,
        certificates: Option<&crate::config::CertificateFiles>,
        sds: bool,
    ) -> Result<(Vec<Arc<Listener>>, Vec<Arc<Cluster>>, bool), Error> {
        let handoffs: Vec<&Handoff> =
            self.listeners.values().filter_map(|x| x.value.handoff.as_ref()).collect();
        let (mut listeners, mut named, mut any_waiting) = (Vec::new(), Vec::new(), false);
        // Clusters by name, once: a mesh's 10,000 handed-off listeners and chains each name
        // one of its 10,000 clusters, and a scan per name would be quadratic (SPEC §11).
        let mut by_name: std::collections::HashSet<String> =
            clusters.iter().map(|c| c.name.clone()).collect();
        for x in self.listeners.values() {
            let Some(mut l) = x.value.listener.clone() else { continue };
            if l.capture != Capture::None {
                // Handed-off listeners' chains, marked with their listener's address.
                let mut chains: Vec<FilterChain> = handoffs
                    .iter()
                    .filter(|h| h.direction == l.direction)
                    .flat_map(|h| h.chains.iter().cloned())
                    .collect();
                if !chains.is_empty() && l.filter_chains.is_empty() {
                    // Everything else still goes by original destination, counted as the
                    // listener says.
                    chains.push(FilterChain {
                        name: "original destination".into(),
                        default: true,
                        istio_stats: l.istio_stats,
                        ..FilterChain::default()
                    });
                }
                chains.append(&mut l.filter_chains);
                l.filter_chains = chains;
            }
            let mut waiting = None;
            let mut chains = Vec::with_capacity(l.filter_chains.len());
            for mut chain in std::mem::take(&mut l.filter_chains) {
                self.take_route(&mut chain, l.listen, l.capture);
                if let Some(t) = &mut chain.tls
                    && let Some(secret) = resolve(&t.secrets, &mut t.files, certificates, sds)
                        .map_err(|r| invalid("Listener", &l.name, format!("{}: {r}", chain.name)))?
                {
                    any_waiting = true;
                    // Envoy's warming: a listener not bound to its port waits alone (its
                    // chains stay out); any other is not bound until its secrets arrive.
                    if chain.handoff.is_some() {
                        continue;
                    }
                    waiting = Some(secret);
                }
                chains.push(chain);
            }
            l.filter_chains = chains;
            if waiting.is_some() {
                continue;
            }
            let mut targets: Vec<String> = Vec::new();
            let routes = std::iter::once((&l.cluster, &l.tcp_routes))
                .chain(l.filter_chains.iter().map(|c| (&c.cluster, &c.tcp_routes)));
            for (cluster, tcp_routes) in routes {
                targets.extend(cluster.iter().cloned());
                targets.extend(tcp_routes.iter().flatten().map(|r| r.cluster.clone()));
            }
            // Outbound, Istio runs the exchange as the cluster's upstream filter.
            if targets.iter().any(|t| self.clusters.get(t).is_some_and(|c| c.value.exchange)) {
                l.peer_exchange = PeerExchange::Alpn;
            }
            for t in targets {
                if !by_name.contains(&t) {
                    by_name.insert(t.clone());
                    named.push(Arc::new(Cluster {
                        name: t.clone(),
                        service: None,
                        service_namespace: None,
                        service_port: None,
                        addresses: Vec::new(),
                        load_balancer: LoadBalancer::RoundRobin,
                        endpoints: Arc::default(),
                        subsets: Vec::new(),
                        tls: None,
                        original_dst: false,
                        bind_source: None,
                        source: Some(format!("xds: named by Listener/{} but not sent (yet)", l.name)),
                        tunnel: None,
                    }));
                }
            }
            listeners.push(Arc::new(l));
        }
        Ok((listeners, named, any_waiting))
    }

    /// Check a config `merge` just made: in whole, or, when it differs from the last one
    /// that passed only in the endpoints or TLS files of the clusters it rebuilt, those
    /// clusters (an endpoint change: SPEC §11, linear in what changed).
    pub(super) fn validate_merged(&self, cfg: &mut Config) -> Result<(), crate::config::Error> {
        let partial = self.merged.borrow_mut().partial.take();
        let checked = match partial {
            Some(changed) => cfg.validate_clusters(&changed, "xds", ""),
            None => cfg.validate("xds", ""),
        };
        self.merged.borrow_mut().validated = checked.is_ok();
        checked
    }

    /// One cluster as a publication holds it: its translation with its TLS files resolved,
    /// its endpoints (shared with this state, not copied) and the addresses routed to it.
    fn merge_cluster(
        &self,
        inputs: &Inputs,
        certificates: Option<&crate::config::CertificateFiles>,
        sds: bool,
    ) -> Result<Cluster, Error> {
        let x = &inputs.from;
        let mut c = x.cluster.clone();
        if let Some(t) = &mut c.tls
            && let Some(secrets) = &t.secrets
        {
            let mut files = t.files();
            let waiting = resolve(secrets, &mut files, certificates, sds)
                .map_err(|r| invalid("Cluster", &c.name, r))?;
            if let Some(secret) = waiting {
                // Envoy's warming: a cluster whose secrets have not arrived serves no
                // connection (no endpoints: `UH`), and never one in plaintext.
                c.tls = None;
                c.endpoints = Arc::default();
                c.source = Some(format!("xds: waiting for SDS secret {secret}"));
                return Ok(c);
            }
            (t.cert_chain, t.private_key, t.root_cert) =
                (files.cert_chain, files.private_key, files.root_cert);
        }
        if let Some(eds) = &x.eds_name {
            let assignment = self.endpoints.get(eds);
            c.endpoints = inputs.endpoints.clone().unwrap_or_default();
            c.source = Some(format!(
                "{}, ClusterLoadAssignment/{eds} version {}",
                c.source.unwrap_or_default(),
                assignment.map_or("(none yet)", |e| e.version.as_str())
            ));
        } else if x.dns.is_some() {
            // Until the first answer, none (`UH`).
            c.endpoints = inputs.endpoints.clone().unwrap_or_default();
        }
        c.addresses.extend(&inputs.addresses);
        Ok(c)
    }
}

/// What the last merge built, per cluster, with what it was built from: the next merge
/// shares every cluster whose inputs are the same `Arc`s, and the listener side while the
/// listeners, route tables and clusters held are (SPEC §11). A cache only: a clone starts
/// empty.
#[derive(Debug, Default)]
pub struct Merged {
    /// The static config's certificate files, whether an SDS server is used, and its
    /// clusters' names: what the last merge was made beside.
    base: (Option<crate::config::CertificateFiles>, bool, Vec<String>),
    /// In the state's order at the last merge.
    clusters: Vec<(Inputs, Arc<Cluster>)>,
    /// The last merge's config passed validation.
    validated: bool,
    /// Set by a merge whose config differs from the last validated one only in the clusters
    /// it names (indices): the checks of those clusters suffice.
    partial: Option<Vec<usize>>,
    side: Option<Side>,
    /// The assignments held at the last merge, in the state's order.
    endpoints: Vec<(String, Arc<Vec<Endpoint>>)>,
    /// The config the last merge made (before validation), as `clusters` and `side` hold
    /// it: an endpoint change patches its clusters into it (`State::merge_endpoints`).
    /// `None` when the next merge must be whole (the first; after a merge that failed, or
    /// with a cluster waiting for a secret; after a change undone without a merge).
    pub(super) config: Option<Config>,
    /// Per ClusterLoadAssignment name, the places (state order) of the clusters built
    /// from it: made at the first endpoint change after the clusters changed.
    by_eds: Option<HashMap<String, Vec<usize>>>,
    /// How many clusters the last merge built or compared (what a test bounds).
    pub(super) looked_at: usize,
}

impl Clone for Merged {
    fn clone(&self) -> Self {
        Merged::default()
    }
}

/// The listener side of a merge and the resources it was made from (their `Arc`s, in the
/// state's order).
#[derive(Debug)]
struct Side {
    listeners_from: Vec<Arc<XdsListener>>,
    routes_from: Vec<Arc<XdsRoute>>,
    clusters_from: Vec<Arc<XdsCluster>>,
    routed: HashMap<String, Vec<SocketAddr>>,
    listeners: Vec<Arc<Listener>>,
    named: Vec<Arc<Cluster>>,
}

impl Side {
    fn of(
        state: &State,
        routed: HashMap<String, Vec<SocketAddr>>,
        listeners: Vec<Arc<Listener>>,
        named: Vec<Arc<Cluster>>,
    ) -> Side {
        fn arcs<T>(m: &BTreeMap<String, Accepted<T>>) -> Vec<Arc<T>> {
            m.values().map(|a| Arc::clone(&a.value)).collect()
        }
        Side {
            listeners_from: arcs(&state.listeners),
            routes_from: arcs(&state.routes),
            clusters_from: arcs(&state.clusters),
            routed,
            listeners,
            named,
        }
    }

    /// Whether `state` holds the very resources this was made from: pointer compares.
    fn holds(&self, state: &State) -> bool {
        fn same<T>(was: &[Arc<T>], now: &BTreeMap<String, Accepted<T>>) -> bool {
            was.len() == now.len() && was.iter().zip(now.values()).all(|(a, b)| Arc::ptr_eq(a, &b.value))
        }
        same(&self.listeners_from, &state.listeners)
            && same(&self.routes_from, &state.routes)
            && same(&self.clusters_from, &state.clusters)
    }
}

/// The names of the assignments in `now` that are not the ones `seen` (both in name order)
/// holds at the same place, found by a pass of pointer compares; `seen` becomes `now`.
/// `None` when the names moved (one added or removed) or more than a few changed.
fn assignments_changed(
    now: &BTreeMap<String, Accepted<Vec<Endpoint>>>,
    seen: &mut Vec<(String, Arc<Vec<Endpoint>>)>,
) -> Option<Vec<String>> {
    const FEW: usize = 64;
    let mut changed = Vec::new();
    if now.len() == seen.len() {
        for ((name, a), (was_name, was)) in now.iter().zip(seen.iter_mut()) {
            if Arc::ptr_eq(&a.value, was) {
                continue;
            }
            if changed.len() < FEW {
                // A place whose assignment is another one names both.
                changed.push(name.clone());
                if was_name != name {
                    changed.push(std::mem::replace(was_name, name.clone()));
                }
            } else {
                changed.push(String::new()); // too many: counted, not named
                was_name.clone_from(name);
            }
            *was = Arc::clone(&a.value);
        }
        if changed.len() <= FEW {
            return Some(changed);
        }
    }
    *seen = now.iter().map(|(n, a)| (n.clone(), Arc::clone(&a.value))).collect();
    None
}

/// What a merged cluster is built from (its `Arc`s keep their addresses from being reused).
#[derive(Debug)]
struct Inputs {
    from: Arc<XdsCluster>,
    endpoints: Option<Arc<Vec<Endpoint>>>,
    addresses: Vec<SocketAddr>,
}

impl Inputs {
    /// Built from the same translation, endpoints and routed addresses: O(1) but for the
    /// addresses.
    fn same(
        &self,
        from: &Arc<XdsCluster>,
        endpoints: Option<&Arc<Vec<Endpoint>>>,
        addresses: &[SocketAddr],
    ) -> bool {
        Arc::ptr_eq(&self.from, from)
            && match (&self.endpoints, endpoints) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.addresses == addresses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assignments_changed_since_the_last_merge_are_named_with_any_they_replaced() {
        let held = |names: &[(&str, &Arc<Vec<Endpoint>>)]| -> BTreeMap<String, Accepted<Vec<Endpoint>>> {
            names
                .iter()
                .map(|(n, v)| (n.to_string(), Accepted { version: "1".into(), value: Arc::clone(v) }))
                .collect()
        };
        let (a1, b1, b2, c1) = (Arc::default(), Arc::default(), Arc::default(), Arc::default());
        let mut seen = Vec::new();
        assert_eq!(assignments_changed(&held(&[("a", &a1), ("b", &b1)]), &mut seen), None, "first");
        assert_eq!(assignments_changed(&held(&[("a", &a1), ("b", &b1)]), &mut seen), Some(vec![]));
        assert_eq!(assignments_changed(&held(&[("a", &a1), ("b", &b2)]), &mut seen), Some(vec!["b".into()]));
        // b gone and c come at its place: both named.
        let now = held(&[("a", &a1), ("c", &c1)]);
        assert_eq!(assignments_changed(&now, &mut seen), Some(vec!["c".into(), "b".into()]));
        assert_eq!(assignments_changed(&held(&[("a", &a1)]), &mut seen), None, "names moved");
    }
}
