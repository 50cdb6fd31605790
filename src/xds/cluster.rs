//! Cluster resources into clusters (SPEC §9): discovery type (EDS, STATIC, ORIGINAL_DST),
//! `lb_policy`, `istio.services` metadata, `istio.metadata_exchange` in its `filters`, and its
//! upstream TLS (`tls.rs`). What is valid but not served (DNS clusters) is reported. Pure.

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::google::protobuf::value::Kind;

use super::endpoint::lb_endpoints;
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
    /// It carries `istio.metadata_exchange` in its `filters` (SPEC §9).
    pub exchange: bool,
    /// Valid config that is not served.
    pub reports: Vec<String>,
}

/// A Cluster: type EDS, STATIC or ORIGINAL_DST, `lb_policy`, `istio.services` metadata and
/// `istio.metadata_exchange` in its `filters`.
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
        DiscoveryType::OriginalDst => {
            reports.push(format!(
                "Cluster/{name}: ORIGINAL_DST: reached only through a capture listener (SPEC §8)"
            ));
            Vec::new()
        }
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
            reports
                .push(format!("Cluster/{name}: DNS clusters are not resolved; its connections fail with UH"));
            Vec::new()
        }
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
        endpoints,
        subsets: Vec::new(),
        tls,
        source: Some(format!("xds Cluster/{name} version {version}")),
        tunnel: None,
    };
    Ok(XdsCluster { cluster, eds_name, exchange, reports })
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
        let dns = cds::Cluster {
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32)),
            ..pb
        };
        assert!(cluster(&dns, "3").unwrap().reports[0].contains("DNS"));
    }

    #[test]
    fn an_original_dst_cluster_with_cluster_provided_is_istiods_passthrough_reported_once() {
        use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
        let pb = cds::Cluster {
            name: "InboundPassthroughClusterIpv4".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
            lb_policy: LbPolicy::ClusterProvided as i32,
            ..Default::default()
        };
        let x = cluster(&pb, "1").unwrap();
        assert_eq!(
            x.reports,
            [
                "Cluster/InboundPassthroughClusterIpv4: ORIGINAL_DST: reached only through a capture listener (SPEC §8)"
            ]
        );
        let eds = cds::Cluster {
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..pb
        };
        assert!(
            cluster(&eds, "1").unwrap().reports[0]
                .contains("lb_policy Ok(ClusterProvided) served as ROUND_ROBIN")
        );
    }
}
