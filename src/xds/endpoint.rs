//! ClusterLoadAssignment resources into endpoints (SPEC §9): addresses, weights, the
//! transport socket match (istiod's `tlsMode`) and the `istio.workload` string; the names of a
//! DNS cluster's `load_assignment`. Pure.

use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::google::protobuf::value::Kind;

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3 as core;

use super::dns::Target;
use super::proto::{Error, invalid, socket_address, string};
use crate::config::Endpoint;

/// A ClusterLoadAssignment's endpoints.
pub fn load_assignment(cla: &eds::ClusterLoadAssignment) -> Result<Vec<Endpoint>, Error> {
    lb_endpoints(cla).map_err(|r| invalid("ClusterLoadAssignment", &cla.cluster_name, r))
}

/// Endpoints with their weights and `istio.workload` metadata
/// (`name;namespace;canonical-name;canonical-revision;cluster`, as istiod writes it): the
/// peer's identity when there is no exchange, app and version unknown (SPEC §9).
pub(super) fn lb_endpoints(cla: &eds::ClusterLoadAssignment) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    for e in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
        let address = socket_address(&Some(endpoint_address(e)?))?;
        out.push(endpoint(e, address)?);
    }
    Ok(out)
}

/// The names a STRICT_DNS or LOGICAL_DNS cluster's `load_assignment` gives, each with its
/// endpoint's weight and metadata (SPEC §9). A LOGICAL_DNS cluster has exactly one, as Envoy
/// requires.
pub(super) fn dns_targets(cla: &eds::ClusterLoadAssignment, logical: bool) -> Result<Vec<Target>, String> {
    use core::address::Address as A;
    use core::socket_address::PortSpecifier;
    let mut out = Vec::new();
    for e in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
        let (host, port) = match endpoint_address(e)?.address {
            Some(A::SocketAddress(sa)) => match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => {
                    (sa.address, u16::try_from(p).map_err(|_| format!("port {p} out of range"))?)
                }
                _ => return Err(format!("{}: a DNS endpoint needs a port_value", sa.address)),
            },
            _ => return Err("a DNS endpoint needs a socket_address".into()),
        };
        if host.is_empty() {
            return Err("a DNS endpoint without a name".into());
        }
        let endpoint = endpoint(e, SocketAddr::new(IpAddr::from([0u8; 4]), port))?;
        out.push(Target { host, port, endpoint });
    }
    if logical && out.len() != 1 {
        return Err(format!("LOGICAL_DNS needs exactly one endpoint, it has {}", out.len()));
    }
    Ok(out)
}

fn endpoint_address(e: &eds::LbEndpoint) -> Result<core::Address, String> {
    use eds::lb_endpoint::HostIdentifier;
    match &e.host_identifier {
        Some(HostIdentifier::Endpoint(ep)) => ep.address.clone().ok_or_else(|| "no address".to_string()),
        _ => Err("an endpoint without an address".into()),
    }
}

/// One endpoint at `address` with its weight, transport socket match and `istio.workload`.
fn endpoint(e: &eds::LbEndpoint, address: SocketAddr) -> Result<Endpoint, String> {
    let weight = match e.load_balancing_weight {
        Some(w) if w.value == 0 => {
            return Err(format!("endpoint {address}: load_balancing_weight 0"));
        }
        w => w.map(|w| w.value),
    };
    let mut endpoint = Endpoint { weight, ..Endpoint::at(address) };
    // Which of its cluster's transport_socket_matches it takes (istiod: tlsMode).
    let socket_match =
        e.metadata.as_ref().and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"));
    for (k, v) in socket_match.iter().flat_map(|s| &s.fields) {
        if let Some(Kind::StringValue(v)) = &v.kind {
            endpoint.transport_socket_match.insert(k.clone(), v.clone());
        }
    }
    let workload =
        e.metadata.as_ref().and_then(|m| m.filter_metadata.get("istio")).and_then(|s| string(s, "workload"));
    if let Some(w) = workload {
        // An empty field is `unknown` (a revision `latest`), as Istio's proxy reads the
        // string: never a fallback to another field (SPEC §9).
        let mut parts = w.split(';');
        let mut next = |empty: &str| match parts.next().unwrap_or("") {
            "" => empty.to_string(),
            v => v.to_string(),
        };
        endpoint.workload_name = next(UNKNOWN);
        endpoint.namespace = next(UNKNOWN);
        endpoint.labels.insert("service.istio.io/canonical-name".into(), next(UNKNOWN));
        endpoint.labels.insert("service.istio.io/canonical-revision".into(), next("latest"));
        endpoint.cluster_id = next(UNKNOWN);
    }
    Ok(endpoint)
}

const UNKNOWN: &str = "unknown";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::fixtures::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::google::protobuf::{Struct, UInt32Value};

    #[test]
    fn endpoints_carry_weights_and_the_istio_workload_string() {
        let mut meta = core::Metadata::default();
        meta.filter_metadata.insert(
            "istio".into(),
            Struct {
                fields: [("workload".to_string(), s("mongodb-v1;prod;mongodb;v1;east"))]
                    .into_iter()
                    .collect(),
            },
        );
        let endpoint = |weight: u32| eds::LbEndpoint {
            host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                address: addr("10.0.0.9:27017"),
                ..Default::default()
            })),
            metadata: Some(meta.clone()),
            load_balancing_weight: Some(UInt32Value { value: weight }),
            ..Default::default()
        };
        let cla = |weight| eds::ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint(weight)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = &load_assignment(&cla(5)).unwrap()[0];
        assert_eq!(e.address, "10.0.0.9:27017".parse().unwrap());
        assert_eq!(e.weight, Some(5));
        assert_eq!(
            (e.workload_name.as_str(), e.namespace.as_str(), e.cluster_id.as_str()),
            ("mongodb-v1", "prod", "east")
        );
        assert_eq!(e.labels["service.istio.io/canonical-name"], "mongodb");
        assert_eq!(e.labels["service.istio.io/canonical-revision"], "v1");
        assert!(!e.labels.contains_key("app"), "app and version stay unknown");
        let err = load_assignment(&cla(0)).unwrap_err();
        assert_eq!(err.resource, "ClusterLoadAssignment/c");
        assert!(err.reason.contains("load_balancing_weight 0"), "{err}");
    }

    #[test]
    fn istio_workload_strings_with_empty_fields_give_unknown_and_latest_for_a_revision() {
        let mut meta = core::Metadata::default();
        meta.filter_metadata.insert(
            "istio".into(),
            Struct { fields: [("workload".to_string(), s("ratings-v1;;;;"))].into_iter().collect() },
        );
        let cla = eds::ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![eds::LbEndpoint {
                    host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                        address: addr("10.0.0.9:9080"),
                        ..Default::default()
                    })),
                    metadata: Some(meta),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = &load_assignment(&cla).unwrap()[0];
        assert_eq!(
            (e.workload_name.as_str(), e.namespace.as_str(), e.cluster_id.as_str()),
            ("ratings-v1", "unknown", "unknown")
        );
        assert_eq!(e.labels["service.istio.io/canonical-name"], "unknown", "not the workload name");
        assert_eq!(e.labels["service.istio.io/canonical-revision"], "latest");
    }
}
