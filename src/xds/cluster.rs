//! Cluster resources into clusters (SPEC §9): discovery type (EDS, STATIC, ORIGINAL_DST,
//! STRICT_DNS and LOGICAL_DNS, whose names `dns` resolves), `lb_policy`,
//! `upstream_bind_config`, `istio.services` metadata, `istio.metadata_exchange` in its
//! `filters`, and its upstream TLS (`tls.rs`). What is valid but not served is reported. Pure.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::google::protobuf::value::Kind;

use super::dns::{self, Dns, Family};
use super::endpoint::{dns_targets, lb_endpoints};
use super::proto::{Error, METADATA_EXCHANGE, field, invalid, string};
use super::tls::cluster_tls;
use crate::config::{Cluster, LoadBalancer};

/// A translated Cluster.
#[derive(Clone, Debug)]
pub struct XdsCluster {
    /// The cluster; an EDS cluster's endpoints arrive separately.
    pub cluster: Cluster,
    /// The ClusterLoadAssignment name an EDS cluster subscribes to.
    pub eds_name: Option<String>,
    /// A STRICT_DNS or LOGICAL_DNS cluster's names: its endpoints are what they resolve to.
    pub dns: Option<Arc<Dns>>,
    /// It carries `istio.metadata_exchange` in its `filters` (SPEC §9).
    pub exchange: bool,
    /// Valid config that is not served.
    pub reports: Vec<String>,
}

/// A Cluster: type EDS, STATIC, ORIGINAL_DST, STRICT_DNS or LOGICAL_DNS, `lb_policy`,
/// `upstream_bind_config`, `istio.services` metadata and `istio.metadata_exchange` in its
/// `filters`.
// `dns_refresh_rate` and `respect_dns_ttl` are deprecated in Envoy's API in favour of the
// `envoy.clusters.dns` extension, but they are what istiod (1.15-1.18) writes.
#[allow(deprecated)]
pub fn cluster(pb: &cds::Cluster, version: &str) -> Result<XdsCluster, Error> {
    use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let name = pb.name.as_str();
    let bad = |reason: String| invalid("Cluster", name, reason);
    if name.is_empty() {
        return Err(invalid("Cluster", "", "a cluster needs a name"));
    }
    let mut reports = Vec::new();
    let kind = match &pb.cluster_discovery_type {
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::Type(t)) => {
            DiscoveryType::try_from(*t).map_err(|_| bad(format!("unknown type {t}")))?
        }
        Some(ClusterDiscoveryType::ClusterType(c)) => {
            reports.push(format!(
                "Cluster/{name}: custom cluster type {:?}: no endpoints; its connections fail with UH",
                c.name
            ));
            DiscoveryType::Static
        }
    };
    let load_balancer = match LbPolicy::try_from(pb.lb_policy) {
        Ok(LbPolicy::RoundRobin) => LoadBalancer::RoundRobin,
        Ok(LbPolicy::LeastRequest) => LoadBalancer::LeastConnection,
        Ok(LbPolicy::Random) => LoadBalancer::Random,
        // An ORIGINAL_DST cluster's own policy (istiod's passthrough clusters): its one host is
        // the connection's original destination, nothing to balance.
        Ok(LbPolicy::ClusterProvided) if kind == DiscoveryType::OriginalDst => LoadBalancer::RoundRobin,
        other => {
            reports.push(format!("Cluster/{name}: lb_policy {other:?} served as ROUND_ROBIN"));
            LoadBalancer::RoundRobin
        }
    };
    let mut eds_name = None;
    let mut dns = None;
    let endpoints = match kind {
        DiscoveryType::Static => match &pb.load_assignment {
            Some(cla) => lb_endpoints(cla).map_err(bad)?,
            None => Vec::new(),
        },
        DiscoveryType::Eds => {
            let service_name = pb.eds_cluster_config.as_ref().map(|c| c.service_name.as_str()).unwrap_or("");
            eds_name = Some(if service_name.is_empty() { name } else { service_name }.to_string());
            Vec::new()
        }
        // Each connection's upstream is its original destination (relay.rs).
        DiscoveryType::OriginalDst => {
            use cds::cluster::LbConfig;
            if let Some(LbConfig::OriginalDstLbConfig(o)) = &pb.lb_config
                && (o.use_http_header || o.upstream_port_override.is_some() || o.metadata_key.is_some())
            {
                reports.push(format!(
                    "Cluster/{name}: original_dst_lb_config (HTTP header, metadata key, port override) \
                     not served: connections go to the original destination as it is"
                ));
            }
            Vec::new()
        }
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
            use cds::cluster::DnsLookupFamily as F;
            let logical = kind == DiscoveryType::LogicalDns;
            let targets = match &pb.load_assignment {
                Some(cla) => dns_targets(cla, logical).map_err(bad)?,
                None if logical => {
                    return Err(bad("LOGICAL_DNS needs exactly one endpoint, it has 0".into()));
                }
                None => Vec::new(),
            };
            let refresh = match &pb.dns_refresh_rate {
                None => dns::DEFAULT_REFRESH,
                Some(d) => match u64::try_from(d.seconds) {
                    // Envoy's floor: at least 1 ms.
                    Ok(s) if d.nanos >= 0 && (s > 0 || d.nanos >= 1_000_000) => {
                        Duration::new(s, d.nanos as u32)
                    }
                    _ => return Err(bad("dns_refresh_rate must be at least 1ms".into())),
                },
            };
            let family = match F::try_from(pb.dns_lookup_family) {
                Ok(F::Auto) => Family::Auto,
                Ok(F::V4Only) => Family::V4Only,
                Ok(F::V6Only) => Family::V6Only,
                Ok(F::V4Preferred) => Family::V4Preferred,
                Ok(F::All) => Family::All,
                Err(_) => return Err(bad(format!("unknown dns_lookup_family {}", pb.dns_lookup_family))),
            };
            if pb.respect_dns_ttl {
                reports.push(format!(
                    "Cluster/{name}: respect_dns_ttl: refreshed every dns_refresh_rate (the system resolver gives no TTL)"
                ));
            }
            dns = Some(Arc::new(Dns { targets, refresh, logical, family }));
            Vec::new()
        }
    };
    let bind_source = match pb.upstream_bind_config.as_ref().and_then(|b| b.source_address.as_ref()) {
        None => None,
        Some(a) => Some(super::proto::source_ip(a).map_err(|r| bad(format!("upstream_bind_config: {r}")))?),
    };
    let services =
        pb.metadata.as_ref().and_then(|m| m.filter_metadata.get("istio")).and_then(|s| field(s, "services"));
    let first_service = match services {
        Some(Kind::ListValue(list)) => list.values.first().and_then(|v| match &v.kind {
            Some(Kind::StructValue(s)) => Some(s),
            _ => None,
        }),
        _ => None,
    };
    let service = first_service.and_then(|s| string(s, "host")).map(str::to_string);
    let service_namespace = first_service.and_then(|s| string(s, "namespace")).map(str::to_string);
    let tls = cluster_tls(pb).map_err(bad)?;
    let exchange = pb.filters.iter().any(|f| f.name == METADATA_EXCHANGE);
    let cluster = Cluster {
        name: name.to_string(),
        service,
        service_namespace,
        service_port: None,
        addresses: Vec::new(),
        load_balancer,
        endpoints: Arc::new(endpoints),
        subsets: Vec::new(),
        tls,
        original_dst: kind == DiscoveryType::OriginalDst,
        bind_source,
        source: Some(format!("xds Cluster/{name} version {version}")),
        tunnel: None,
    };
    Ok(XdsCluster { cluster, eds_name, dns, exchange, reports })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::fixtures::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value};

    #[test]
    fn clusters_take_type_lb_policy_services_metadata_and_the_exchange_filter() {
        use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
        let service = Value {
            kind: Some(Kind::StructValue(Struct {
                fields: [
                    ("host".to_string(), s("mongodb.prod.svc.cluster.local")),
                    ("namespace".into(), s("prod")),
                ]
                .into_iter()
                .collect(),
            })),
        };
        let mut meta = core::Metadata::default();
        meta.filter_metadata.insert(
            "istio".into(),
            Struct {
                fields: [(
                    "services".to_string(),
                    Value { kind: Some(Kind::ListValue(ListValue { values: vec![service] })) },
                )]
                .into_iter()
                .collect(),
            },
        );
        let pb = cds::Cluster {
            name: "outbound|27017|v1|mongodb.prod.svc.cluster.local".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            lb_policy: LbPolicy::Random as i32,
            metadata: Some(meta),
            filters: vec![cds::Filter { name: METADATA_EXCHANGE.into(), ..Default::default() }],
            ..Default::default()
        };
        let x = cluster(&pb, "3").unwrap();
        assert_eq!(x.eds_name.as_deref(), Some(pb.name.as_str()), "no service_name: the cluster's name");
        assert!(x.exchange);
        assert_eq!(x.cluster.load_balancer, LoadBalancer::Random);
        assert_eq!(x.cluster.service.as_deref(), Some("mongodb.prod.svc.cluster.local"));
        assert_eq!(x.cluster.service_namespace.as_deref(), Some("prod"));
        let lr = cds::Cluster { lb_policy: LbPolicy::LeastRequest as i32, ..pb.clone() };
        assert_eq!(cluster(&lr, "3").unwrap().cluster.load_balancer, LoadBalancer::LeastConnection);
    }

    #[test]
    fn an_original_dst_cluster_with_cluster_provided_connects_to_the_original_destination_from_its_bind_address()
     {
        use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
        let pb = cds::Cluster {
            name: "InboundPassthroughClusterIpv4".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
            lb_policy: LbPolicy::ClusterProvided as i32,
            upstream_bind_config: Some(core::BindConfig {
                source_address: Some(core::SocketAddress {
                    address: "127.0.0.6".into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(0)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let x = cluster(&pb, "1").unwrap();
        assert!(x.cluster.original_dst);
        assert_eq!(x.cluster.bind_source, Some("127.0.0.6".parse().unwrap()));
        assert!(x.reports.is_empty(), "served, not reported: {:?}", x.reports);
        let port_override = cds::Cluster {
            lb_config: Some(cds::cluster::LbConfig::OriginalDstLbConfig(cds::cluster::OriginalDstLbConfig {
                upstream_port_override: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 8080 }),
                ..Default::default()
            })),
            ..pb.clone()
        };
        assert!(cluster(&port_override, "1").unwrap().reports[0].contains("original_dst_lb_config"));
        let mut fixed_port = pb.clone();
        if let Some(sa) = fixed_port.upstream_bind_config.as_mut().and_then(|b| b.source_address.as_mut()) {
            sa.port_specifier = Some(core::socket_address::PortSpecifier::PortValue(4000));
        }
        assert!(cluster(&fixed_port, "1").unwrap_err().reason.contains("upstream_bind_config: source port"));
        let eds = cds::Cluster {
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            upstream_bind_config: None,
            ..pb
        };
        let x = cluster(&eds, "1").unwrap();
        assert!(!x.cluster.original_dst && x.cluster.bind_source.is_none());
        assert!(x.reports[0].contains("lb_policy Ok(ClusterProvided) served as ROUND_ROBIN"));
    }

    fn dns_cluster(kind: cds::cluster::DiscoveryType, hosts: &[&str]) -> cds::Cluster {
        use envoy_types::pb::envoy::config::endpoint::v3 as eds;
        let endpoint = |host: &str| eds::LbEndpoint {
            host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: host.into(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(9411)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        #[allow(deprecated)]
        cds::Cluster {
            name: "zipkin".into(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(kind as i32)),
            load_assignment: Some(eds::ClusterLoadAssignment {
                cluster_name: "zipkin".into(),
                endpoints: vec![eds::LocalityLbEndpoints {
                    lb_endpoints: hosts.iter().map(|h| endpoint(h)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            dns_lookup_family: cds::cluster::DnsLookupFamily::V4Only as i32,
            dns_refresh_rate: Some(envoy_types::pb::google::protobuf::Duration { seconds: 30, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn strict_and_logical_dns_clusters_name_their_hosts_refresh_rate_and_family_and_start_without_endpoints()
    {
        use cds::cluster::DiscoveryType;
        let x = cluster(&dns_cluster(DiscoveryType::StrictDns, &["zipkin.istio-system", "10.0.0.9"]), "1")
            .unwrap();
        assert!(x.cluster.endpoints.is_empty(), "resolved later, off the workers");
        assert!(x.reports.is_empty(), "{:?}", x.reports);
        let d = x.dns.unwrap();
        let hosts: Vec<(&str, u16)> = d.targets.iter().map(|t| (t.host.as_str(), t.port)).collect();
        assert_eq!(hosts, [("zipkin.istio-system", 9411), ("10.0.0.9", 9411)]);
        assert_eq!((d.refresh, d.logical, d.family), (Duration::from_secs(30), false, Family::V4Only));
        let mut default_rate = dns_cluster(DiscoveryType::LogicalDns, &["zipkin"]);
        #[allow(deprecated)]
        {
            default_rate.dns_refresh_rate = None;
        }
        let d = cluster(&default_rate, "1").unwrap().dns.unwrap();
        assert_eq!((d.refresh, d.logical), (Duration::from_secs(5), true), "Envoy's default 5 s");
        let two = cluster(&dns_cluster(DiscoveryType::LogicalDns, &["a", "b"]), "1").unwrap_err();
        assert_eq!(two.to_string(), "Cluster/zipkin: LOGICAL_DNS needs exactly one endpoint, it has 2");
    }
}
