//! Shared pieces of xDS translation (SPEC §9): the type URLs ringside subscribes to, decoding
//! an `Any`, the error naming a resource, socket addresses and Struct fields. Pure: no I/O.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf::{Any, Struct, value::Kind};
use prost::Message;

/// Type URL of a Listener resource.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of a Cluster resource.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of a ClusterLoadAssignment resource.
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of a RouteConfiguration resource (RDS).
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Istio's metadata exchange, as a listener, network or cluster filter.
pub(super) const METADATA_EXCHANGE: &str = "istio.metadata_exchange";

/// A resource that cannot be applied: which one and why (the NACK's error_detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct Error {
    /// `Listener/NAME`, `Cluster/NAME`, `ClusterLoadAssignment/NAME` or
    /// `RouteConfiguration/NAME`.
    pub resource: String,
    /// What is wrong, a lowercase fragment.
    pub reason: String,
}

/// The error for resource `kind/name`.
pub(super) fn invalid(kind: &str, name: &str, reason: impl Into<String>) -> Error {
    Error { resource: format!("{kind}/{name}"), reason: reason.into() }
}

/// Decode an `Any` of the expected type.
pub fn decode<M: Message + Default>(any: &Any, type_url: &str) -> Result<M, String> {
    if any.type_url != type_url {
        return Err(format!("resource of type {:?} in a {type_url} response", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}

pub(super) fn socket_address(addr: &Option<core::Address>) -> Result<SocketAddr, String> {
    use core::address::Address as A;
    use core::socket_address::PortSpecifier;
    match addr.as_ref().and_then(|a| a.address.as_ref()) {
        Some(A::SocketAddress(sa)) => {
            let ip: IpAddr =
                sa.address.parse().map_err(|_| format!("address {:?} is not an IP address", sa.address))?;
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => {
                    u16::try_from(p).map_err(|_| format!("port {p} out of range"))?
                }
                _ => return Err("address without a port_value".into()),
            };
            Ok(SocketAddr::new(ip, port))
        }
        Some(A::Pipe(p)) => Err(format!("unsupported address family: pipe {:?}", p.path)),
        Some(A::EnvoyInternalAddress(_)) => Err("unsupported address family: envoy internal address".into()),
        None => Err("no address".into()),
    }
}

/// The IP address of a bind `source_address` (its port must be 0: the kernel picks one per
/// connection, as istiod writes it).
pub(super) fn source_ip(sa: &core::SocketAddress) -> Result<IpAddr, String> {
    use core::socket_address::PortSpecifier;
    let ip: IpAddr =
        sa.address.parse().map_err(|_| format!("address {:?} is not an IP address", sa.address))?;
    match &sa.port_specifier {
        None | Some(PortSpecifier::PortValue(0)) => Ok(ip),
        Some(other) => Err(format!("source port {other:?}: only 0 (any) is served")),
    }
}

pub(super) fn field<'a>(s: &'a Struct, key: &str) -> Option<&'a Kind> {
    s.fields.get(key).and_then(|v| v.kind.as_ref())
}

pub(super) fn string<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match field(s, key) {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}
