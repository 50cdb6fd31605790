//! ClusterLoadAssignment resources into endpoints (SPEC §9): addresses, weights, the
//! transport socket match (istiod's `tlsMode`) and the `istio.workload` string. Pure.

use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::google::protobuf::value::Kind;

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
    use eds::lb_endpoint::HostIdentifier;
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        for e in &locality.lb_endpoints {
            let address = match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => socket_address(&ep.address)?,
                _ => return Err("an endpoint without an address".into()),
            };
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
            let workload = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("istio"))
                .and_then(|s| string(s, "workload"));
            if let Some(w) = workload {
                let mut parts = w.split(';');
                let mut next = || parts.next().unwrap_or("").to_string();
                endpoint.workload_name = next();
                endpoint.namespace = next();
                for key in ["service.istio.io/canonical-name", "service.istio.io/canonical-revision"] {
                    let v = next();
                    if !v.is_empty() {
                        endpoint.labels.insert(key.to_string(), v);
                    }
                }
                endpoint.cluster_id = next();
            }
            out.push(endpoint);
        }
    }
    Ok(out)
}

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
}
