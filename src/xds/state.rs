//! The xDS resources accepted so far, per type, and their merge beside the static config
//! (SPEC §9). Pure: no I/O.

use std::collections::BTreeMap;

use super::cluster::XdsCluster;
use super::listener::{Handoff, XdsListener};
use super::proto::{Error, invalid};
use super::tls::resolve;
use crate::config::{Capture, Cluster, Config, Endpoint, FilterChain, LoadBalancer, PeerExchange};

/// The resources last accepted, per type, with their versions.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Listeners by name.
    pub listeners: BTreeMap<String, XdsListener>,
    /// Version of the last accepted Listener response.
    pub listener_version: String,
    /// Clusters by name.
    pub clusters: BTreeMap<String, XdsCluster>,
    /// Version of the last accepted Cluster response.
    pub cluster_version: String,
    /// Endpoints by ClusterLoadAssignment name.
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
    /// Version of the last accepted ClusterLoadAssignment response.
    pub endpoint_version: String,
}

impl State {
    /// The ClusterLoadAssignment names to subscribe to.
    pub fn eds_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.clusters.values().filter_map(|c| c.eds_name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Valid config that is not served, one line each.
    pub fn reports(&self) -> impl Iterator<Item = &String> {
        self.listeners
            .values()
            .flat_map(|l| &l.reports)
            .chain(self.clusters.values().flat_map(|c| &c.reports))
    }

    /// `base` (the static config) with these resources beside it. A cluster a listener names
    /// but the control plane has not sent (yet) is there without endpoints (`UH`). TLS
    /// contexts naming the SDS secrets `default`/`ROOTCA` get `base.xds.certificates`' files;
    /// without those, the resource is an error (never plaintext instead).
    pub fn merge(&self, base: &Config) -> Result<Config, Error> {
        let certificates = base.xds.as_ref().and_then(|x| x.certificates.as_ref());
        let mut cfg = base.clone();
        for x in self.clusters.values() {
            let mut c = x.cluster.clone();
            if let Some(t) = &mut c.tls
                && let Some(secrets) = &t.secrets
            {
                let mut files = t.files();
                resolve(secrets, &mut files, certificates).map_err(|r| invalid("Cluster", &c.name, r))?;
                (t.cert_chain, t.private_key, t.root_cert) =
                    (files.cert_chain, files.private_key, files.root_cert);
            }
            if let Some(eds) = &x.eds_name {
                c.endpoints = self.endpoints.get(eds).cloned().unwrap_or_default();
                c.source = Some(format!(
                    "{}, ClusterLoadAssignment/{eds} version {}",
                    c.source.unwrap_or_default(),
                    self.endpoint_version
                ));
            }
            cfg.clusters.push(c);
        }
        let handoffs: Vec<&Handoff> = self.listeners.values().filter_map(|x| x.handoff.as_ref()).collect();
        for (address, cluster) in handoffs.iter().flat_map(|h| &h.addresses) {
            if let Some(c) = cfg.clusters.iter_mut().find(|c| &c.name == cluster) {
                c.addresses.push(*address);
            }
        }
        for x in self.listeners.values() {
            let Some(mut l) = x.listener.clone() else { continue };
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
            for chain in &mut l.filter_chains {
                if let Some(t) = &mut chain.tls {
                    resolve(&t.secrets, &mut t.files, certificates)
                        .map_err(|r| invalid("Listener", &l.name, format!("{}: {r}", chain.name)))?;
                }
            }
            let mut targets: Vec<String> = Vec::new();
            let routes = std::iter::once((&l.cluster, &l.tcp_routes))
                .chain(l.filter_chains.iter().map(|c| (&c.cluster, &c.tcp_routes)));
            for (cluster, tcp_routes) in routes {
                targets.extend(cluster.iter().cloned());
                targets.extend(tcp_routes.iter().flatten().map(|r| r.cluster.clone()));
            }
            // Outbound, Istio runs the exchange as the cluster's upstream filter.
            if targets.iter().any(|t| self.clusters.get(t).is_some_and(|c| c.exchange)) {
                l.peer_exchange = PeerExchange::Alpn;
            }
            for t in targets {
                if !cfg.clusters.iter().any(|c| c.name == t) {
                    cfg.clusters.push(Cluster {
                        name: t.clone(),
                        service: None,
                        service_namespace: None,
                        service_port: None,
                        addresses: Vec::new(),
                        load_balancer: LoadBalancer::RoundRobin,
                        endpoints: Vec::new(),
                        subsets: Vec::new(),
                        tls: None,
                        source: Some(format!("xds: named by Listener/{} but not sent (yet)", l.name)),
                    });
                }
            }
            cfg.listeners.push(l);
        }
        Ok(cfg)
    }
}
