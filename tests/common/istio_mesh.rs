//! Istio-shaped meshes of N services for the scale tests and benchmarks (SPEC §11), as istiod
//! sends them to a sidecar without a `Sidecar` resource: every service is an EDS cluster
//! `outbound|9000||svc-I.ns-K.svc.cluster.local` (istiod's `istio` metadata, the metadata
//! exchange as an upstream filter, ISTIO_MUTUAL under `tlsMode-istio` and plaintext under
//! `tlsMode-disabled`), five endpoints with `istio.workload` metadata and `tlsMode: istio`,
//! and a listener per service port not bound to its port (`VIP_9000`, `bind_to_port: false`:
//! `istio.stats` and tcp_proxy), reached through the capture listener `virtualOutbound`
//! (`use_original_dst`, its own chain to `PassthroughCluster`). Service 0 is the real one:
//! its endpoints are the caller's backends, written as workloads without a sidecar
//! (plaintext). The same snapshot serves ringside and, through [`for_envoy`], a real Envoy.
//! Included next to `ads.rs` (as `super::ads`) by tests and benches.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;

use super::ads;

/// The service port of every service.
pub const PORT: u16 = 9000;
/// Endpoints per service.
pub const ENDPOINTS_PER_SERVICE: usize = 5;
/// The ORIGINAL_DST cluster of virtualOutbound's own chain.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// Service `i`'s host.
pub fn host(i: usize) -> String {
    format!("svc-{i}.ns-{}.svc.cluster.local", i / 1000)
}

/// Service `i`'s cluster, as istiod names an outbound cluster.
pub fn cluster_name(i: usize) -> String {
    format!("outbound|{PORT}||{}", host(i))
}

/// Service `i`'s ClusterIP and port (10.96.0.0/12, Kubernetes' default service range).
pub fn vip(i: usize) -> SocketAddr {
    let ip = u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32;
    SocketAddr::from((Ipv4Addr::from(ip), PORT))
}

/// Endpoint `j` of service `i` (pod IPs from 10.128.0.0/9, never connected to).
fn pod(i: usize, j: usize) -> SocketAddr {
    let ip = u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * ENDPOINTS_PER_SERVICE + j) as u32;
    SocketAddr::from((Ipv4Addr::from(ip), PORT))
}

/// The workload string istiod writes for endpoint `j` of service `i` (`moved` changes the
/// pod's name, as a rollout does).
fn workload(i: usize, j: usize, moved: u64) -> String {
    format!("svc-{i}-v1-{moved:x}{j};ns-{};svc-{i};v1;Kubernetes", i / 1000)
}

/// How a mesh is made.
#[derive(Clone, Debug)]
pub struct Mesh {
    /// Services (and clusters, and service listeners).
    pub services: usize,
    /// virtualOutbound's address (`0.0.0.0:15001` in a pod).
    pub capture: SocketAddr,
    /// Service 0's endpoints: real backends.
    pub backends: Vec<SocketAddr>,
    /// The TLS context of every cluster's `tlsMode-istio` match (SDS secrets `default` and
    /// `ROOTCA`); `None`: the matches carry no transport socket.
    pub tls: Option<tls::CommonTlsContext>,
}

impl Mesh {
    /// The whole snapshot at `version`.
    pub fn snapshot(&self, version: &str) -> ads::Snapshot {
        let mut clusters: Vec<ads::cds::Cluster> = (0..self.services).map(|i| self.cluster(i)).collect();
        clusters.push(ads::cds::Cluster {
            name: PASSTHROUGH.into(),
            cluster_discovery_type: Some(ads::cds::cluster::ClusterDiscoveryType::Type(
                ads::cds::cluster::DiscoveryType::OriginalDst as i32,
            )),
            lb_policy: ads::cds::cluster::LbPolicy::ClusterProvided as i32,
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: 10, nanos: 0 }),
            ..Default::default()
        });
        let mut listeners = vec![self.virtual_outbound()];
        listeners.extend((0..self.services).map(service_listener));
        ads::Snapshot {
            version: version.to_string(),
            clusters,
            endpoints: (0..self.services).map(|i| self.assignment(i, 0)).collect(),
            listeners,
            secrets: vec![],
        }
    }

    /// Service `i`'s cluster.
    fn cluster(&self, i: usize) -> ads::cds::Cluster {
        let name = cluster_name(i);
        let mut c = ads::eds_cluster(&name, &host(i), &format!("ns-{}", i / 1000));
        c.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration { seconds: 10, nanos: 0 });
        match &self.tls {
            Some(common) => {
                let mut common = common.clone();
                let san = format!("spiffe://cluster.local/ns/ns-{}/sa/svc-{i}", i / 1000);
                if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
                    &mut common.validation_context_type
                    && let Some(d) = &mut v.default_validation_context
                {
                    #[allow(deprecated)] // istiod still writes the untyped matchers
                    for m in &mut d.match_subject_alt_names {
                        m.match_pattern = Some(
                            envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                                san.clone(),
                            ),
                        );
                    }
                }
                ads::istio_mutual(c, common)
            }
            None => c,
        }
    }

    /// Service `i`'s endpoints; `moved` renames and moves them (a rollout).
    pub fn assignment(&self, i: usize, moved: u64) -> ads::eds::ClusterLoadAssignment {
        let name = cluster_name(i);
        if i == 0 {
            let endpoints: Vec<(SocketAddr, String)> =
                self.backends.iter().enumerate().map(|(j, a)| (*a, workload(0, j, moved))).collect();
            let refs: Vec<(SocketAddr, &str)> = endpoints.iter().map(|(a, w)| (*a, w.as_str())).collect();
            return self
                .backends
                .iter()
                .fold(ads::assignment(&name, &refs), |cla, a| ads::without_sidecar(cla, *a));
        }
        let endpoints: Vec<(SocketAddr, String)> = (0..ENDPOINTS_PER_SERVICE)
            .map(|j| {
                let mut at = pod(i, j);
                at.set_port(PORT + moved as u16);
                (at, workload(i, j, moved))
            })
            .collect();
        let refs: Vec<(SocketAddr, &str)> = endpoints.iter().map(|(a, w)| (*a, w.as_str())).collect();
        ads::assignment(&name, &refs)
    }

    /// istiod's virtualOutbound: `use_original_dst` on the capture port, one chain
    /// (`istio.stats`, tcp_proxy to PassthroughCluster).
    fn virtual_outbound(&self) -> ads::lds::Listener {
        let mut l = ads::tcp_listener("virtualOutbound", self.capture, &[(PASSTHROUGH, 1)]);
        l.use_original_dst = Some(ads::BoolValue { value: true });
        l
    }
}

/// Service `i`'s outbound listener as istiod writes one per TCP service port: `VIP_PORT`,
/// not bound to its port, reached through virtualOutbound by original destination.
fn service_listener(i: usize) -> ads::lds::Listener {
    let at = vip(i);
    let mut l = ads::tcp_listener(&format!("{}_{}", at.ip(), at.port()), at, &[(&cluster_name(i), 1)]);
    l.bind_to_port = Some(ads::BoolValue { value: false });
    l
}

/// `s` as an upstream Envoy takes it: without Istio's own extensions (`istio.stats`,
/// `istio.metadata_exchange`), the TLS contexts' secrets fetched over ADS (`secrets`: the
/// agent's `default` and `ROOTCA`); the transport socket matches stay.
pub fn for_envoy(mut s: ads::Snapshot, secrets: Vec<tls::Secret>) -> ads::Snapshot {
    use prost::Message;
    for l in &mut s.listeners {
        for c in &mut l.filter_chains {
            c.filters.retain(|f| !f.name.starts_with("istio."));
        }
    }
    for c in &mut s.clusters {
        c.filters.retain(|f| !f.name.starts_with("istio."));
        for m in &mut c.transport_socket_matches {
            let Some(core::TransportSocket {
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(any)),
                ..
            }) = &mut m.transport_socket
            else {
                continue;
            };
            if any.type_url != ads::UPSTREAM_TLS {
                continue;
            }
            let mut upstream = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
            upstream.common_tls_context = upstream.common_tls_context.map(ads::secrets_over_ads);
            *any = ads::any(ads::UPSTREAM_TLS, &upstream);
        }
    }
    s.secrets = secrets;
    s
}
