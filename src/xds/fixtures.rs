//! Envoy resources as istiod writes them, for the unit tests of the xDS translation.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::Message;

use super::listener::{TCP_PROXY, TCP_PROXY_TYPE};
use super::state::{Accepted, State};
use super::tls::{RAW_BUFFER, UPSTREAM_TLS};
use crate::config::{CertificateFiles, Config};

pub(super) fn addr(a: &str) -> Option<core::Address> {
    let sa: SocketAddr = a.parse().unwrap();
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: sa.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(sa.port()))),
            ..Default::default()
        })),
    })
}

pub(super) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any { type_url: type_url.into(), value: m.encode_to_vec() }
}

pub(super) fn filter(name: &str, any: Any) -> lds::Filter {
    lds::Filter { name: name.into(), config_type: Some(lds::filter::ConfigType::TypedConfig(any)) }
}

pub(super) fn proxy(spec: Option<tcp_proxy::tcp_proxy::ClusterSpecifier>) -> lds::Filter {
    let p = tcp_proxy::TcpProxy { cluster_specifier: spec, ..Default::default() };
    filter(TCP_PROXY, any(TCP_PROXY_TYPE, &p))
}

pub(super) fn to(cluster: &str) -> lds::Filter {
    proxy(Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())))
}

pub(super) fn listener_with(chains: Vec<lds::FilterChain>) -> lds::Listener {
    lds::Listener {
        name: "l".into(),
        address: addr("127.0.0.1:27017"),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        filter_chains: chains,
        ..Default::default()
    }
}

pub(super) fn chain(filters: Vec<lds::Filter>) -> lds::FilterChain {
    lds::FilterChain { filters, ..Default::default() }
}

pub(super) fn s(v: &str) -> Value {
    Value { kind: Some(Kind::StringValue(v.into())) }
}

pub(super) fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig { name: name.into(), sds_config: None }
}

/// A CommonTlsContext as istiod writes it for ISTIO_MUTUAL.
pub(super) fn common(cert: &str, root: &str, sans: &[&str], alpn: &[&str]) -> tls::CommonTlsContext {
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
    let exact = |s: &&str| StringMatcher {
        match_pattern: Some(MatchPattern::Exact(s.to_string())),
        ..Default::default()
    };
    #[allow(deprecated)]
    let validation = tls::CertificateValidationContext {
        match_subject_alt_names: sans.iter().map(exact).collect(),
        ..Default::default()
    };
    tls::CommonTlsContext {
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(cert)],
        validation_context_type: Some(
            tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                tls::common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(validation),
                    validation_context_sds_secret_config: Some(sds(root)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

pub(super) fn socket(name: &str, any_of: Any) -> Option<core::TransportSocket> {
    Some(core::TransportSocket {
        name: name.into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any_of)),
    })
}

pub(super) const REDIS: &str = "spiffe://cluster.local/ns/default/sa/redis";

/// An outbound cluster with istiod's `tlsMode-istio` / `tlsMode-disabled` matches.
pub(super) fn istio_mutual(common: tls::CommonTlsContext) -> cds::Cluster {
    use cds::cluster::{ClusterDiscoveryType, DiscoveryType, TransportSocketMatch};
    let upstream = tls::UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: "outbound_.6379_._.redis.default.svc.cluster.local".into(),
        ..Default::default()
    };
    let raw = Any { type_url: RAW_BUFFER.into(), value: Vec::new() };
    cds::Cluster {
        name: "outbound|6379||redis.default.svc.cluster.local".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        transport_socket_matches: vec![
            TransportSocketMatch {
                name: "tlsMode-istio".into(),
                r#match: Some(Struct { fields: [("tlsMode".to_string(), s("istio"))].into_iter().collect() }),
                transport_socket: socket("envoy.transport_sockets.tls", any(UPSTREAM_TLS, &upstream)),
            },
            TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                r#match: Some(Struct::default()),
                transport_socket: socket("envoy.transport_sockets.raw_buffer", raw),
            },
        ],
        ..Default::default()
    }
}

pub(super) fn certificates() -> Config {
    let xds = crate::config::Xds {
        address: "127.0.0.1:15010".into(),
        certificates: Some(CertificateFiles {
            cert_chain: "/etc/certs/cert-chain.pem".into(),
            private_key: "/etc/certs/key.pem".into(),
            root_cert: "/etc/certs/root-cert.pem".into(),
        }),
        ..crate::config::Xds::default()
    };
    Config { xds: Some(xds), ..Config::default() }
}

pub(super) fn outbound(name: &str, address: &str, chains: Vec<lds::FilterChain>) -> lds::Listener {
    lds::Listener {
        name: name.into(),
        address: addr(address),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        filter_chains: chains,
        ..Default::default()
    }
}

pub(super) fn xds_state(listeners: Vec<lds::Listener>, clusters: &[&str]) -> State {
    let mut state = State::default();
    for pb in listeners {
        state
            .listeners
            .insert(pb.name.clone(), Accepted::new("1", super::listener::listener(&pb, "1").unwrap()));
    }
    for name in clusters {
        let pb = cds::Cluster {
            name: name.to_string(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::Static as i32,
            )),
            ..Default::default()
        };
        state
            .clusters
            .insert(name.to_string(), Accepted::new("1", super::cluster::cluster(&pb, "1").unwrap()));
    }
    state
}
