//! Envoy's xDS resources into ringside's config model (SPEC §9): the TCP part of what istiod
//! sends a sidecar. Pure: protos in, config pieces out; errors name the resource and why.
//! What is valid but not served (HTTP filter chains, DNS clusters) is reported, not an error.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{Any, Struct, value::Kind};
use prost::Message;

use crate::config::{
    Capture, CertificateFiles, ChainTls, Cidr, Cluster, ClusterTls, ClusterTlsMode, Config, Direction,
    Endpoint, FilterChain, Listener, LoadBalancer, PeerExchange, Secrets, SocketMatch, TcpRoute,
};

/// Type URL of a Listener resource.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of a Cluster resource.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of a ClusterLoadAssignment resource.
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
const ISTIO_STATS: &str = "istio.stats";
const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const RAW_BUFFER: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
/// Istio agent's SDS secret of the workload certificate and key.
pub const SECRET_CERTIFICATE: &str = "default";
/// Istio agent's SDS secret of the mesh root.
pub const SECRET_ROOT: &str = "ROOTCA";
/// Istio's SDS name for a certificate and key in files: `file-cert:CERT~KEY`.
const FILE_CERT: &str = "file-cert:";
/// Istio's SDS name for a root in a file: `file-root:ROOT`.
const FILE_ROOT: &str = "file-root:";
const METADATA_EXCHANGE: &str = "istio.metadata_exchange";

/// A resource that cannot be applied: which one and why (the NACK's error_detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct Error {
    /// `Listener/NAME`, `Cluster/NAME` or `ClusterLoadAssignment/NAME`.
    pub resource: String,
    /// What is wrong, a lowercase fragment.
    pub reason: String,
}

fn invalid(kind: &str, name: &str, reason: impl Into<String>) -> Error {
    Error { resource: format!("{kind}/{name}"), reason: reason.into() }
}

/// A translated Listener.
#[derive(Clone, Debug)]
pub struct XdsListener {
    /// The listener to bind, or `None` when it serves nothing an L4 proxy can (HTTP only,
    /// or not bound to a port).
    pub listener: Option<Listener>,
    /// Valid config that is not served, one line each (log and `/config_dump`).
    pub reports: Vec<String>,
    /// A listener not bound to its port (`bind_to_port: false`, istiod's per-service
    /// outbound listeners): what the capture listener of its direction hands it (SPEC §8).
    pub handoff: Option<Handoff>,
}

/// A listener not bound to its port, which Envoy hands a captured connection whose original
/// destination is its address: its chains serve that connection (route, `istio.stats`,
/// reporter direction), as if they were the capture listener's own.
#[derive(Clone, Debug)]
pub struct Handoff {
    /// Its traffic direction: the capture listener of the same direction takes its chains.
    pub direction: Direction,
    /// Its chains, each marked with the listener's address (`FilterChain::handoff`).
    pub chains: Vec<FilterChain>,
    /// The original destinations each cluster is reached at through it: the listener's
    /// address, or its chains' single-address prefix ranges on its port.
    pub addresses: Vec<(SocketAddr, String)>,
}

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

/// Decode an `Any` of the expected type.
pub fn decode<M: Message + Default>(any: &Any, type_url: &str) -> Result<M, String> {
    if any.type_url != type_url {
        return Err(format!("resource of type {:?} in a {type_url} response", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}

fn socket_address(addr: &Option<core::Address>) -> Result<SocketAddr, String> {
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

fn traffic_direction(d: i32) -> Direction {
    match core::TrafficDirection::try_from(d) {
        Ok(core::TrafficDirection::Inbound) => Direction::Inbound,
        _ => Direction::Outbound,
    }
}

/// A Listener: its address, its filter chains (their `filter_chain_match`, tcp_proxy route,
/// `istio.stats`), `istio.metadata_exchange`, and `use_original_dst` (capture).
pub fn listener(pb: &lds::Listener, version: &str) -> Result<XdsListener, Error> {
    let name = pb.name.as_str();
    let bad = |reason: String| invalid("Listener", name, reason);
    if name.is_empty() {
        return Err(invalid("Listener", "", "a listener needs a name"));
    }
    let listen = socket_address(&pb.address).map_err(bad)?;
    let direction = traffic_direction(pb.traffic_direction);
    let mut reports = Vec::new();
    let mut exchange = pb.listener_filters.iter().any(|f| f.name == METADATA_EXCHANGE);
    let mut chains: Vec<FilterChain> = Vec::new();
    let all =
        pb.filter_chains.iter().map(|c| (c, false)).chain(pb.default_filter_chain.iter().map(|c| (c, true)));
    for (i, (chain, default)) in all.enumerate() {
        let what = match (default, chain.name.is_empty()) {
            (true, _) => "default_filter_chain".to_string(),
            (false, true) => format!("filter chain {i}"),
            (false, false) => format!("filter chain {:?}", chain.name),
        };
        let mut fc = FilterChain { name: what.clone(), default, ..FilterChain::default() };
        if let Some(m) = chain.filter_chain_match.as_ref().filter(|_| !default) {
            if !m.server_names.is_empty()
                || !m.source_prefix_ranges.is_empty()
                || !m.source_ports.is_empty()
                || !m.direct_source_prefix_ranges.is_empty()
            {
                reports.push(format!(
                    "Listener/{name}: {what}: matches on server names or source: never taken yet"
                ));
                continue;
            }
            fc.destination_port = match m.destination_port {
                Some(p) => Some(
                    u16::try_from(p.value)
                        .map_err(|_| bad(format!("{what}: destination_port {}", p.value)))?,
                ),
                None => None,
            };
            for r in &m.prefix_ranges {
                let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                    bad(format!("{what}: prefix_ranges: {:?} is not an IP address", r.address_prefix))
                })?;
                let len = r.prefix_len.map_or(if ip.is_ipv4() { 32 } else { 128 }, |l| l.value);
                let cidr = Cidr::try_from(format!("{ip}/{len}")).map_err(|e| bad(format!("{what}: {e}")))?;
                fc.prefix_ranges.push(cidr);
            }
            fc.transport_protocol = (!m.transport_protocol.is_empty()).then(|| m.transport_protocol.clone());
            fc.application_protocols = m.application_protocols.clone();
        }
        fc.tls = match &chain.transport_socket {
            Some(ts) => {
                match transport_socket(ts, DOWNSTREAM_TLS).map_err(|r| bad(format!("{what}: {r}")))? {
                    Some(any) => {
                        let ctx: tls::DownstreamTlsContext =
                            decode(any, DOWNSTREAM_TLS).map_err(|r| bad(format!("{what}: {r}")))?;
                        let common = tls_context(ctx.common_tls_context.as_ref(), false)
                            .map_err(|r| bad(format!("{what}: {r}")))?;
                        Some(ChainTls {
                            secrets: common.secrets,
                            files: common.files,
                            alpn: common.alpn,
                            require_client_certificate: ctx
                                .require_client_certificate
                                .is_some_and(|b| b.value),
                        })
                    }
                    None => None,
                }
            }
            None => None,
        };
        if chain.filters.iter().any(|f| f.name == HTTP_CONNECTION_MANAGER) {
            let why = "HTTP (http_connection_manager) is not served by an L4 proxy";
            reports.push(format!("Listener/{name}: {what}: {why}; its connections close (NR)"));
            fc.not_served = Some(why.into());
            chains.push(fc);
            continue;
        }
        let Some(proxy) = chain.filters.iter().find(|f| f.name == TCP_PROXY) else {
            let why = "no tcp_proxy filter";
            reports.push(format!("Listener/{name}: {what}: {why}; its connections close (NR)"));
            fc.not_served = Some(why.into());
            chains.push(fc);
            continue;
        };
        match tcp_target(proxy).map_err(|r| bad(format!("{what}: {r}")))? {
            TcpTarget::Cluster(c) => fc.cluster = Some(c),
            TcpTarget::Weighted(routes) => fc.tcp_routes = Some(routes),
        }
        fc.istio_stats = chain.filters.iter().any(|f| f.name == ISTIO_STATS);
        exchange |= chain.filters.iter().any(|f| f.name == METADATA_EXCHANGE);
        chains.push(fc);
    }
    // A chain that takes every plaintext connection of this listener.
    let plain = |c: &FilterChain| {
        c.not_served.is_none()
            && c.destination_port.is_none_or(|p| p == listen.port())
            && c.prefix_ranges.is_empty()
            && c.transport_protocol.as_deref().is_none_or(|t| t == "raw_buffer")
            && c.application_protocols.is_empty()
            && c.tls.is_none()
    };
    if pb.bind_to_port.is_some_and(|b| !b.value) {
        return Ok(XdsListener {
            listener: None,
            handoff: Some(handoff(name, listen, direction, chains, &mut reports)),
            reports,
        });
    }
    let capture = match (pb.use_original_dst.is_some_and(|b| b.value), direction) {
        (true, Direction::Inbound) => Capture::Inbound,
        (true, Direction::Outbound) => Capture::Outbound,
        _ => Capture::None,
    };
    let mut listener = base_listener(name, listen, direction, capture, exchange, false, version);
    if capture != Capture::None {
        // Routed by original destination (SPEC §8): outbound to the cluster holding it,
        // inbound to its port on the local host. The chains are kept to choose, per
        // connection, whether TLS is terminated and whether it is counted: istiod puts
        // `istio.stats` on each (the passthrough chains too), and Istio reports what the
        // chain that served the connection says. A connection no chain takes is closed.
        listener.istio_stats = chains.iter().any(|c| c.istio_stats);
        listener.filter_chains = chains;
        return Ok(XdsListener { listener: Some(listener), reports, handoff: None });
    }
    if chains.iter().all(|c| c.not_served.is_some()) {
        return Ok(XdsListener { listener: None, reports, handoff: None });
    }
    match &chains[..] {
        // One chain for every connection: the plain listener model.
        [only] if plain(only) => {
            listener.cluster = only.cluster.clone();
            listener.tcp_routes = only.tcp_routes.clone();
            listener.istio_stats = only.istio_stats;
        }
        _ => {
            listener.istio_stats = chains.iter().any(|c| c.istio_stats);
            listener.filter_chains = chains;
        }
    }
    Ok(XdsListener { listener: Some(listener), reports, handoff: None })
}

/// A `bind_to_port: false` listener's chains, as a capture listener takes them: Envoy hands
/// it the captured connections to its address (an exact `IP:port` listener before a
/// `0.0.0.0:port` one, both before the capture listener's own chains, `select_chain`), and
/// its chain that matches serves them (an HTTP chain's connection is relayed, not counted).
/// Weighted routes are not taken (an original destination routes to one cluster), reported.
fn handoff(
    name: &str,
    listen: SocketAddr,
    direction: Direction,
    chains: Vec<FilterChain>,
    reports: &mut Vec<String>,
) -> Handoff {
    let mut handoff = Handoff { direction, chains: Vec::new(), addresses: Vec::new() };
    let single = |r: &&Cidr| r.len == if r.addr.is_ipv4() { 32 } else { 128 };
    for mut c in chains {
        if c.tcp_routes.is_some() {
            reports.push(format!(
                "Listener/{name}: {}: bind_to_port false with weighted_clusters: not served yet through capture",
                c.name
            ));
            continue;
        }
        c.name = format!("Listener/{name} {}", c.name);
        c.handoff = Some(listen);
        // Where the connection is routed (by original destination): the listener's own
        // address, or a chain's single-address prefix ranges (istiod's `0.0.0.0_PORT` with
        // one chain per service address). Its default chain (istiod's goes to the
        // passthrough) and chains that serve nothing name no address.
        if let Some(cluster) = c.cluster.clone().filter(|_| !c.default && c.not_served.is_none()) {
            if c.prefix_ranges.is_empty() {
                handoff.addresses.push((listen, cluster.clone()));
            }
            for r in c.prefix_ranges.iter().filter(single) {
                handoff.addresses.push((SocketAddr::new(r.addr, listen.port()), cluster.clone()));
            }
        }
        handoff.chains.push(c);
    }
    handoff
}

fn base_listener(
    name: &str,
    listen: SocketAddr,
    direction: Direction,
    capture: Capture,
    exchange: bool,
    istio_stats: bool,
    version: &str,
) -> Listener {
    Listener {
        name: name.to_string(),
        listen,
        direction,
        // Istio's exchange runs only inside mTLS with ALPN istio-peer-exchange (SPEC §2).
        peer_exchange: if exchange { PeerExchange::Alpn } else { PeerExchange::Off },
        cluster: None,
        tcp_routes: None,
        service: None,
        capture,
        limits: Default::default(),
        tls: None,
        istio_stats,
        source: Some(format!("xds Listener/{name} version {version}")),
        filter_chains: Vec::new(),
    }
}

enum TcpTarget {
    Cluster(String),
    Weighted(Vec<TcpRoute>),
}

fn tcp_target(filter: &lds::Filter) -> Result<TcpTarget, String> {
    use lds::filter::ConfigType;
    use tcp_proxy::tcp_proxy::ClusterSpecifier;
    let any = match &filter.config_type {
        Some(ConfigType::TypedConfig(any)) => any,
        _ => return Err("tcp_proxy without typed_config".into()),
    };
    let proxy: tcp_proxy::TcpProxy = decode(any, TCP_PROXY_TYPE)?;
    match proxy.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => Ok(TcpTarget::Cluster(c)),
        Some(ClusterSpecifier::WeightedClusters(w)) if !w.clusters.is_empty() => {
            let mut routes = Vec::new();
            for c in &w.clusters {
                if c.name.is_empty() {
                    return Err("tcp_proxy weighted_clusters: a cluster without a name".into());
                }
                if c.weight == 0 {
                    return Err(format!("tcp_proxy weighted_clusters: cluster {}: weight 0", c.name));
                }
                routes.push(TcpRoute { cluster: c.name.clone(), subset: None, weight: i64::from(c.weight) });
            }
            Ok(TcpTarget::Weighted(routes))
        }
        _ => Err("tcp_proxy without a cluster".into()),
    }
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
    };
    Ok(XdsCluster { cluster, eds_name, exchange, reports })
}

/// A transport socket's TLS context (`Any` of `tls_type`), `None` for raw_buffer; any other
/// kind is an error: serving plaintext where TLS was asked is never an option.
fn transport_socket<'a>(ts: &'a core::TransportSocket, tls_type: &str) -> Result<Option<&'a Any>, String> {
    use core::transport_socket::ConfigType;
    match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) if any.type_url == tls_type => Ok(Some(any)),
        Some(ConfigType::TypedConfig(any)) if any.type_url == RAW_BUFFER => Ok(None),
        None if ts.name == "envoy.transport_sockets.raw_buffer" || ts.name == "raw_buffer" => Ok(None),
        Some(ConfigType::TypedConfig(any)) => {
            Err(format!("transport socket {:?} of type {:?}: not served", ts.name, any.type_url))
        }
        None => Err(format!("transport socket {:?} without typed_config: not served", ts.name)),
    }
}

/// What a CommonTlsContext gives: the secrets it names, the files known so far (a
/// `file-cert:`/`file-root:` name; `default`/`ROOTCA` are resolved by [`State::merge`]),
/// ALPN and the SAN matchers.
#[derive(Debug, PartialEq)]
struct Common {
    secrets: Secrets,
    files: CertificateFiles,
    alpn: Vec<String>,
    sans: Vec<String>,
    san_prefixes: Vec<String>,
}

/// Read the parts of a CommonTlsContext istiod writes for ISTIO_MUTUAL (SPEC §7, §9): the
/// workload certificate and the root as SDS secrets, the SAN matchers (exact, and prefix for
/// trust domain aliases), ALPN. What cannot be served as written is an error: certificates
/// inline or from another SDS secret (there is no SDS client), other SAN matchers, or no
/// validation at all. `client`: SAN matchers are checked (an upstream's); a server's are
/// not read (istiod writes none for mesh mTLS).
fn tls_context(common: Option<&tls::CommonTlsContext>, client: bool) -> Result<Common, String> {
    use tls::common_tls_context::ValidationContextType as V;
    let common = common.ok_or("TLS without common_tls_context")?;
    if !common.tls_certificates.is_empty() {
        return Err("inline tls_certificates: not served (SDS secrets default and ROOTCA only)".into());
    }
    let certificate = match &common.tls_certificate_sds_secret_configs[..] {
        [one] => one.name.clone(),
        [] => return Err("no tls_certificate_sds_secret_configs: no certificate to present".into()),
        _ => return Err("more than one tls_certificate_sds_secret_configs: not served".into()),
    };
    let (validation, context) = match &common.validation_context_type {
        Some(V::CombinedValidationContext(c)) => {
            let name = c.validation_context_sds_secret_config.as_ref().map(|s| s.name.clone());
            (
                name.ok_or("combined_validation_context without validation_context_sds_secret_config")?,
                c.default_validation_context.as_ref(),
            )
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => (s.name.clone(), None),
        Some(V::ValidationContext(_)) => {
            return Err("inline validation_context: not served (SDS secret ROOTCA only)".into());
        }
        Some(_) => return Err("validation by certificate provider: not served".into()),
        None => return Err("no validation context: the peer would not be verified".into()),
    };
    let mut files = CertificateFiles::default();
    if let Some(pair) = certificate.strip_prefix(FILE_CERT) {
        let (cert, key) = pair
            .split_once('~')
            .ok_or_else(|| format!("SDS secret {certificate:?}: want file-cert:CERT~KEY"))?;
        files.cert_chain = cert.to_string();
        files.private_key = key.to_string();
    } else if certificate != SECRET_CERTIFICATE {
        return Err(format!(
            "SDS secret {certificate:?}: unknown (served: {SECRET_CERTIFICATE:?}, {FILE_CERT}CERT~KEY)"
        ));
    }
    if let Some(root) = validation.strip_prefix(FILE_ROOT) {
        files.root_cert = root.to_string();
    } else if validation != SECRET_ROOT {
        return Err(format!("SDS secret {validation:?}: unknown (served: {SECRET_ROOT:?}, {FILE_ROOT}ROOT)"));
    }
    let (mut sans, mut san_prefixes) = (Vec::new(), Vec::new());
    if let Some(v) = context.filter(|_| client) {
        use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern as P;
        let uri = tls::subject_alt_name_matcher::SanType::Uri as i32;
        // istiod still writes the deprecated untyped matchers (URI SANs by meaning).
        #[allow(deprecated)]
        let untyped = &v.match_subject_alt_names;
        let typed = v.match_typed_subject_alt_names.iter().map(|m| (m.san_type == uri, m.matcher.as_ref()));
        for (is_uri, m) in untyped.iter().map(|m| (true, Some(m))).chain(typed) {
            match m.and_then(|m| m.match_pattern.as_ref().filter(|_| is_uri && !m.ignore_case)) {
                Some(P::Exact(id)) => sans.push(id.clone()),
                Some(P::Prefix(p)) => san_prefixes.push(p.clone()),
                _ => return Err("SAN matcher other than an exact or prefix URI: not served".into()),
            }
        }
    }
    Ok(Common {
        secrets: Secrets { certificate, validation },
        files,
        alpn: common.alpn_protocols.clone(),
        sans,
        san_prefixes,
    })
}

/// A cluster's upstream TLS (ISTIO_MUTUAL): its `transport_socket` or its
/// `transport_socket_matches` (istiod's `tlsMode-istio` with the context, then
/// `tlsMode-disabled` plaintext for endpoints without a sidecar).
fn cluster_tls(pb: &cds::Cluster) -> Result<Option<ClusterTls>, String> {
    if pb.transport_socket_matcher.is_some() {
        // It could ask for TLS: refused rather than served in plaintext.
        return Err("transport_socket_matcher: not served (transport_socket_matches are)".into());
    }
    let mut context: Option<(Any, String)> = None;
    let mut take = |ts: &Option<core::TransportSocket>, what: String| -> Result<bool, String> {
        let Some(ts) = ts else { return Ok(false) };
        let Some(any) = transport_socket(ts, UPSTREAM_TLS).map_err(|r| format!("{what}: {r}"))? else {
            return Ok(false);
        };
        match &context {
            Some((seen, first)) if seen != any => {
                Err(format!("{what}: a TLS context other than {first}'s: not served"))
            }
            _ => {
                context.get_or_insert_with(|| (any.clone(), what));
                Ok(true)
            }
        }
    };
    let default_tls = take(&pb.transport_socket, "transport_socket".into())?;
    let mut matches = Vec::new();
    for m in &pb.transport_socket_matches {
        let what = format!("transport_socket_matches {:?}", m.name);
        let tls = take(&m.transport_socket, what.clone())?;
        let mut criteria = std::collections::BTreeMap::new();
        for (k, v) in m.r#match.iter().flat_map(|s| &s.fields) {
            match &v.kind {
                Some(Kind::StringValue(v)) => criteria.insert(k.clone(), v.clone()),
                _ => return Err(format!("{what}: match {k:?} is not a string: not served")),
            };
        }
        matches.push(SocketMatch { name: m.name.clone(), criteria, tls });
    }
    let Some((any, what)) = context else { return Ok(None) };
    let ctx: tls::UpstreamTlsContext = decode(&any, UPSTREAM_TLS).map_err(|r| format!("{what}: {r}"))?;
    let common = tls_context(ctx.common_tls_context.as_ref(), true).map_err(|r| format!("{what}: {r}"))?;
    Ok(Some(ClusterTls {
        mode: ClusterTlsMode::IstioMutual,
        cert_chain: common.files.cert_chain,
        private_key: common.files.private_key,
        root_cert: common.files.root_cert,
        subject_alt_names: common.sans,
        subject_alt_name_prefixes: common.san_prefixes,
        secrets: Some(common.secrets),
        alpn: common.alpn,
        sni: (!ctx.sni.is_empty()).then_some(ctx.sni),
        endpoint_matches: matches,
        unmatched_plaintext: !default_tls,
    }))
}

fn field<'a>(s: &'a Struct, key: &str) -> Option<&'a Kind> {
    s.fields.get(key).and_then(|v| v.kind.as_ref())
}

fn string<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match field(s, key) {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}

/// A ClusterLoadAssignment's endpoints.
pub fn load_assignment(cla: &eds::ClusterLoadAssignment) -> Result<Vec<Endpoint>, Error> {
    lb_endpoints(cla).map_err(|r| invalid("ClusterLoadAssignment", &cla.cluster_name, r))
}

/// Endpoints with their weights and `istio.workload` metadata
/// (`name;namespace;canonical-name;canonical-revision;cluster`, as istiod writes it): the
/// peer's identity when there is no exchange, app and version unknown (SPEC §9).
fn lb_endpoints(cla: &eds::ClusterLoadAssignment) -> Result<Vec<Endpoint>, String> {
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

/// Fill in the files that the secrets `default` and `ROOTCA` stand for.
fn resolve(
    secrets: &Secrets,
    files: &mut CertificateFiles,
    certificates: Option<&CertificateFiles>,
) -> Result<(), String> {
    let need = |name: &str| {
        certificates.ok_or_else(|| {
            format!(
                "TLS names SDS secret {name:?}, which needs xds.certificates (the workload certificate files; there is no SDS client)"
            )
        })
    };
    if secrets.certificate == SECRET_CERTIFICATE {
        let c = need(SECRET_CERTIFICATE)?;
        files.cert_chain.clone_from(&c.cert_chain);
        files.private_key.clone_from(&c.private_key);
    }
    if secrets.validation == SECRET_ROOT {
        files.root_cert.clone_from(&need(SECRET_ROOT)?.root_cert);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{ListValue, UInt32Value, Value};

    fn addr(a: &str) -> Option<core::Address> {
        let sa: SocketAddr = a.parse().unwrap();
        Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: sa.ip().to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(sa.port()))),
                ..Default::default()
            })),
        })
    }

    fn any<M: Message>(type_url: &str, m: &M) -> Any {
        Any { type_url: type_url.into(), value: m.encode_to_vec() }
    }

    fn filter(name: &str, any: Any) -> lds::Filter {
        lds::Filter { name: name.into(), config_type: Some(lds::filter::ConfigType::TypedConfig(any)) }
    }

    fn proxy(spec: Option<tcp_proxy::tcp_proxy::ClusterSpecifier>) -> lds::Filter {
        let p = tcp_proxy::TcpProxy { cluster_specifier: spec, ..Default::default() };
        filter(TCP_PROXY, any(TCP_PROXY_TYPE, &p))
    }

    fn to(cluster: &str) -> lds::Filter {
        proxy(Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())))
    }

    fn listener_with(chains: Vec<lds::FilterChain>) -> lds::Listener {
        lds::Listener {
            name: "l".into(),
            address: addr("127.0.0.1:27017"),
            traffic_direction: core::TrafficDirection::Inbound as i32,
            filter_chains: chains,
            ..Default::default()
        }
    }

    fn chain(filters: Vec<lds::Filter>) -> lds::FilterChain {
        lds::FilterChain { filters, ..Default::default() }
    }

    fn s(v: &str) -> Value {
        Value { kind: Some(Kind::StringValue(v.into())) }
    }

    #[test]
    fn a_tcp_listener_becomes_a_listener_with_stats_exchange_and_direction() {
        let stats = filter(ISTIO_STATS, Any::default());
        let mx = filter(METADATA_EXCHANGE, Any::default());
        let x = listener(&listener_with(vec![chain(vec![mx, stats, to("inbound|27017||")])]), "7").unwrap();
        let l = x.listener.unwrap();
        assert_eq!(l.listen, "127.0.0.1:27017".parse().unwrap());
        assert_eq!(l.direction, Direction::Inbound);
        assert_eq!(l.peer_exchange, PeerExchange::Alpn);
        assert!(l.istio_stats);
        assert_eq!(l.cluster.as_deref(), Some("inbound|27017||"));
        assert_eq!(l.source.as_deref(), Some("xds Listener/l version 7"));
        // Without istio.stats, not counted; without the exchange, off.
        let l = listener(&listener_with(vec![chain(vec![to("c")])]), "1").unwrap().listener.unwrap();
        assert!(!l.istio_stats);
        assert_eq!(l.peer_exchange, PeerExchange::Off);
    }

    #[test]
    fn weight_zero_no_cluster_and_unknown_address_families_are_invalid_naming_the_listener() {
        use tcp_proxy::tcp_proxy::{ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight};
        let weighted = |w: u32| {
            let clusters = vec![
                ClusterWeight { name: "a".into(), weight: 1, ..Default::default() },
                ClusterWeight { name: "b".into(), weight: w, ..Default::default() },
            ];
            proxy(Some(ClusterSpecifier::WeightedClusters(WeightedCluster { clusters })))
        };
        let ok = listener(&listener_with(vec![chain(vec![weighted(3)])]), "1").unwrap().listener.unwrap();
        let routes = ok.tcp_routes.unwrap();
        assert_eq!(
            routes.iter().map(|r| (r.cluster.as_str(), r.weight)).collect::<Vec<_>>(),
            [("a", 1), ("b", 3)]
        );
        let e = listener(&listener_with(vec![chain(vec![weighted(0)])]), "1").unwrap_err();
        assert_eq!(e.resource, "Listener/l");
        assert!(e.reason.contains("cluster b: weight 0"), "{e}");
        let e = listener(&listener_with(vec![chain(vec![proxy(None)])]), "1").unwrap_err();
        assert!(e.reason.contains("without a cluster"), "{e}");
        let mut pipe = listener_with(vec![chain(vec![to("c")])]);
        pipe.address = Some(core::Address {
            address: Some(core::address::Address::Pipe(core::Pipe { path: "/x".into(), mode: 0 })),
        });
        let e = listener(&pipe, "1").unwrap_err();
        assert!(e.reason.contains("unsupported address family"), "{e}");
    }

    #[test]
    fn http_chains_are_reported_and_chains_keep_their_matches() {
        let hcm = filter(HTTP_CONNECTION_MANAGER, Any::default());
        let x = listener(&listener_with(vec![chain(vec![hcm.clone()])]), "1").unwrap();
        assert!(x.listener.is_none(), "an HTTP-only listener is not bound");
        assert!(x.reports[0].contains("HTTP"), "{:?}", x.reports);
        let mut tls = chain(vec![to("tls")]);
        tls.filter_chain_match = Some(lds::FilterChainMatch {
            transport_protocol: "tls".into(),
            application_protocols: vec!["istio-peer-exchange".into()],
            ..Default::default()
        });
        let mut ten = chain(vec![to("ten"), filter(ISTIO_STATS, Any::default())]);
        ten.filter_chain_match = Some(lds::FilterChainMatch {
            destination_port: Some(UInt32Value { value: 27017 }),
            prefix_ranges: vec![core::CidrRange {
                address_prefix: "10.0.0.0".into(),
                prefix_len: Some(UInt32Value { value: 8 }),
            }],
            ..Default::default()
        });
        let mut pb = listener_with(vec![tls, ten, chain(vec![hcm])]);
        pb.default_filter_chain = Some(chain(vec![to("fallback")]));
        let x = listener(&pb, "1").unwrap();
        let chains = x.listener.unwrap().filter_chains;
        assert_eq!(chains.len(), 4);
        assert_eq!(chains[0].transport_protocol.as_deref(), Some("tls"));
        assert_eq!(String::from(chains[1].prefix_ranges[0]), "10.0.0.0/8");
        assert_eq!((chains[1].destination_port, chains[1].istio_stats), (Some(27017), true));
        assert!(chains[2].not_served.is_some(), "the HTTP chain closes its connections");
        assert!(chains[3].default && chains[3].cluster.as_deref() == Some("fallback"));
        // One chain that takes every connection: the plain model.
        let mut same_port = chain(vec![to("plain")]);
        same_port.filter_chain_match = Some(lds::FilterChainMatch {
            destination_port: Some(UInt32Value { value: 27017 }),
            ..Default::default()
        });
        let l = listener(&listener_with(vec![same_port]), "1").unwrap().listener.unwrap();
        assert_eq!(l.cluster.as_deref(), Some("plain"));
        assert!(l.filter_chains.is_empty());
    }

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

    fn sds(name: &str) -> tls::SdsSecretConfig {
        tls::SdsSecretConfig { name: name.into(), sds_config: None }
    }

    /// A CommonTlsContext as istiod writes it for ISTIO_MUTUAL.
    fn common(cert: &str, root: &str, sans: &[&str], alpn: &[&str]) -> tls::CommonTlsContext {
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

    fn socket(name: &str, any_of: Any) -> Option<core::TransportSocket> {
        Some(core::TransportSocket {
            name: name.into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any_of)),
        })
    }

    const REDIS: &str = "spiffe://cluster.local/ns/default/sa/redis";

    /// An outbound cluster with istiod's `tlsMode-istio` / `tlsMode-disabled` matches.
    fn istio_mutual(common: tls::CommonTlsContext) -> cds::Cluster {
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
                    r#match: Some(Struct {
                        fields: [("tlsMode".to_string(), s("istio"))].into_iter().collect(),
                    }),
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

    fn certificates() -> Config {
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

    #[test]
    fn tls_mode_istio_matches_give_istio_mutual_to_endpoints_labelled_istio_and_plaintext_to_the_rest() {
        let alpn = ["istio-peer-exchange", "istio"];
        let x = cluster(&istio_mutual(common("default", "ROOTCA", &[REDIS], &alpn)), "1").unwrap();
        let t = x.cluster.tls.clone().unwrap();
        assert_eq!(t.secrets, Some(Secrets { certificate: "default".into(), validation: "ROOTCA".into() }));
        assert_eq!(t.subject_alt_names, [REDIS]);
        assert_eq!(t.alpn, alpn);
        assert_eq!(t.sni.as_deref(), Some("outbound_.6379_._.redis.default.svc.cluster.local"));
        assert!(t.unmatched_plaintext);
        assert!(x.reports.is_empty(), "{:?}", x.reports);
        // Endpoints: metadata as istiod writes it for a pod with a sidecar, and one without.
        let mut meta = core::Metadata::default();
        meta.filter_metadata.insert(
            "envoy.transport_socket_match".into(),
            Struct { fields: [("tlsMode".to_string(), s("istio"))].into_iter().collect() },
        );
        let lb = |a: &str, m: Option<core::Metadata>| eds::LbEndpoint {
            host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                address: addr(a),
                ..Default::default()
            })),
            metadata: m,
            ..Default::default()
        };
        let cla = eds::ClusterLoadAssignment {
            cluster_name: x.cluster.name.clone(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![lb("10.0.0.1:6379", Some(meta)), lb("10.0.0.2:6379", None)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let endpoints = load_assignment(&cla).unwrap();
        assert_eq!(endpoints[0].transport_socket_match["tlsMode"], "istio");
        assert!(t.applies_to(&endpoints[0]), "tlsMode istio: mTLS");
        assert!(!t.applies_to(&endpoints[1]), "no tlsMode: tlsMode-disabled, plaintext");
        // Merged beside a config with xds.certificates: the secrets resolve to those files.
        let mut state = State::default();
        state.clusters.insert(x.cluster.name.clone(), x);
        let cfg = state.merge(&certificates()).unwrap();
        let t = cfg.clusters[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.cert_chain.as_str(), t.private_key.as_str(), t.root_cert.as_str()),
            ("/etc/certs/cert-chain.pem", "/etc/certs/key.pem", "/etc/certs/root-cert.pem")
        );
    }

    #[test]
    fn tls_without_xds_certificates_is_an_error_naming_the_resource_and_the_secret() {
        let x = cluster(&istio_mutual(common("default", "ROOTCA", &[], &[])), "1").unwrap();
        let mut state = State::default();
        state.clusters.insert(x.cluster.name.clone(), x);
        let e = state.merge(&Config::default()).unwrap_err();
        assert_eq!(e.resource, "Cluster/outbound|6379||redis.default.svc.cluster.local");
        assert!(e.reason.contains("\"default\"") && e.reason.contains("xds.certificates"), "{e}");
    }

    #[test]
    fn file_cert_and_file_root_secrets_name_their_files() {
        let c =
            common("file-cert:/etc/certs/a.pem~/etc/certs/a.key", "file-root:/etc/certs/root.pem", &[], &[]);
        let x = cluster(&istio_mutual(c), "1").unwrap();
        let mut state = State::default();
        state.clusters.insert(x.cluster.name.clone(), x);
        let cfg = state.merge(&Config::default()).unwrap();
        let t = cfg.clusters[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.cert_chain.as_str(), t.private_key.as_str(), t.root_cert.as_str()),
            ("/etc/certs/a.pem", "/etc/certs/a.key", "/etc/certs/root.pem")
        );
    }

    #[test]
    fn contexts_that_cannot_be_served_as_written_are_errors_naming_the_cluster_and_why() {
        let name = "Cluster/outbound|6379||redis.default.svc.cluster.local";
        let reason = |c: tls::CommonTlsContext| {
            let e = cluster(&istio_mutual(c), "1").unwrap_err();
            assert_eq!(e.resource, name);
            e.reason
        };
        let r = reason(common("kubernetes://redis-cert", "ROOTCA", &[], &[]));
        assert!(r.contains("SDS secret \"kubernetes://redis-cert\": unknown"), "{r}");
        let r = reason(common("default", "kubernetes://redis-cacert", &[], &[]));
        assert!(r.contains("SDS secret \"kubernetes://redis-cacert\": unknown"), "{r}");
        let mut inline = common("default", "ROOTCA", &[], &[]);
        inline.tls_certificates = vec![tls::TlsCertificate::default()];
        assert!(reason(inline).contains("inline tls_certificates"));
        let mut none = common("default", "ROOTCA", &[], &[]);
        none.validation_context_type = None;
        assert!(reason(none).contains("no validation context"));
        let mut regex = common("default", "ROOTCA", &[], &[]);
        if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
            &mut regex.validation_context_type
        {
            use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
            c.default_validation_context.as_mut().unwrap().match_typed_subject_alt_names =
                vec![tls::SubjectAltNameMatcher {
                    san_type: tls::subject_alt_name_matcher::SanType::Dns as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(MatchPattern::Exact("redis".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                }];
        }
        assert!(reason(regex).contains("SAN matcher"));
        // A transport socket that is neither TLS nor raw_buffer.
        let mut alts = istio_mutual(common("default", "ROOTCA", &[], &[]));
        alts.transport_socket_matches[0].transport_socket = socket(
            "envoy.transport_sockets.alts",
            Any {
                type_url: "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts".into(),
                value: vec![],
            },
        );
        let e = cluster(&alts, "1").unwrap_err();
        assert!(
            e.reason.contains("transport_socket_matches \"tlsMode-istio\"")
                && e.reason.contains("not served"),
            "{e}"
        );
    }

    #[test]
    fn every_tls_context_shape_that_cannot_be_served_is_an_error_saying_why() {
        use tls::common_tls_context::{CombinedCertificateValidationContext, ValidationContextType as V};
        let base = || common("default", "ROOTCA", &[], &[]);
        let with = |f: &dyn Fn(&mut tls::CommonTlsContext)| {
            let mut c = base();
            f(&mut c);
            c
        };
        let cases: Vec<(tls::CommonTlsContext, &str)> = vec![
            (
                with(&|c| c.tls_certificate_sds_secret_configs.clear()),
                "no tls_certificate_sds_secret_configs",
            ),
            (with(&|c| c.tls_certificate_sds_secret_configs.push(sds("default"))), "more than one"),
            (
                with(&|c| {
                    c.validation_context_type =
                        Some(V::CombinedValidationContext(CombinedCertificateValidationContext::default()))
                }),
                "without validation_context_sds_secret_config",
            ),
            (
                with(&|c| c.validation_context_type = Some(V::ValidationContext(Default::default()))),
                "inline validation_context",
            ),
            (
                // Deprecated in Envoy's API, still what an old control plane may send.
                #[allow(deprecated)]
                with(&|c| {
                    c.validation_context_type =
                        Some(V::ValidationContextCertificateProviderInstance(Default::default()))
                }),
                "certificate provider",
            ),
            (common("file-cert:/only-one-path", "ROOTCA", &[], &[]), "want file-cert:CERT~KEY"),
        ];
        for (c, want) in cases {
            let e = cluster(&istio_mutual(c), "1").unwrap_err();
            assert!(e.reason.contains(want), "{want}: {e}");
        }
        // No common_tls_context at all.
        let mut pb = istio_mutual(base());
        let empty = tls::UpstreamTlsContext::default();
        pb.transport_socket_matches[0].transport_socket =
            socket("envoy.transport_sockets.tls", any(UPSTREAM_TLS, &empty));
        assert!(cluster(&pb, "1").unwrap_err().reason.contains("without common_tls_context"));
        // Two different TLS contexts among the matches.
        let mut pb = istio_mutual(base());
        let other = istio_mutual(common("default", "ROOTCA", &["spiffe://x"], &[]));
        pb.transport_socket_matches[1].transport_socket =
            other.transport_socket_matches[0].transport_socket.clone();
        let e = cluster(&pb, "1").unwrap_err();
        assert!(e.reason.contains("a TLS context other than"), "{e}");
        // A match criterion that is not a string.
        let mut pb = istio_mutual(base());
        let number = Value { kind: Some(Kind::NumberValue(1.0)) };
        pb.transport_socket_matches[0].r#match =
            Some(Struct { fields: [("tlsMode".to_string(), number)].into_iter().collect() });
        assert!(cluster(&pb, "1").unwrap_err().reason.contains("is not a string"));
        // The newer matcher API, which istiod does not write.
        let mut pb = istio_mutual(base());
        pb.transport_socket_matcher = Some(Default::default());
        assert!(cluster(&pb, "1").unwrap_err().reason.contains("transport_socket_matcher"));
    }

    #[test]
    fn a_cluster_transport_socket_speaks_tls_to_every_endpoint_and_prefix_sans_are_kept() {
        use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
        let mut c = common("default", "ROOTCA", &[REDIS], &[]);
        if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
            &mut c.validation_context_type
        {
            v.default_validation_context.as_mut().unwrap().match_typed_subject_alt_names =
                vec![tls::SubjectAltNameMatcher {
                    san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(MatchPattern::Prefix("spiffe://td-alias/".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                }];
        }
        let mut pb = istio_mutual(c);
        pb.transport_socket = pb.transport_socket_matches[0].transport_socket.clone();
        pb.transport_socket_matches.clear();
        let t = cluster(&pb, "1").unwrap().cluster.tls.unwrap();
        assert_eq!(
            (t.subject_alt_names.as_slice(), t.subject_alt_name_prefixes.as_slice()),
            (&[REDIS.to_string()][..], &["spiffe://td-alias/".to_string()][..])
        );
        assert!(!t.unmatched_plaintext && t.endpoint_matches.is_empty());
        assert!(t.applies_to(&Endpoint::at("10.0.0.1:6379".parse().unwrap())), "no match needed");
        // No TLS anywhere (istiod's matches without sockets, as an old test server sends): none.
        let mut plain = istio_mutual(common("default", "ROOTCA", &[], &[]));
        for m in &mut plain.transport_socket_matches {
            m.transport_socket = None;
        }
        assert!(cluster(&plain, "1").unwrap().cluster.tls.is_none());
    }

    #[test]
    fn a_chain_with_a_downstream_tls_context_terminates_tls_with_its_alpn_and_client_certificates() {
        let downstream = |c: tls::CommonTlsContext| tls::DownstreamTlsContext {
            common_tls_context: Some(c),
            require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            ..Default::default()
        };
        let alpn = ["istio-peer-exchange", "h2", "http/1.1"];
        let mut mtls = chain(vec![to("inbound|6379||")]);
        mtls.filter_chain_match = Some(lds::FilterChainMatch {
            transport_protocol: "tls".into(),
            application_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            ..Default::default()
        });
        mtls.transport_socket = socket(
            "envoy.transport_sockets.tls",
            any(DOWNSTREAM_TLS, &downstream(common("default", "ROOTCA", &[], &alpn))),
        );
        // STRICT: the TLS chain alone is still a chain (never collapsed into plaintext).
        let x = listener(&listener_with(vec![mtls.clone()]), "1").unwrap();
        let l = x.listener.unwrap();
        assert!(l.cluster.is_none());
        let t = l.filter_chains[0].tls.clone().unwrap();
        assert_eq!(t.alpn, alpn);
        assert!(t.require_client_certificate);
        assert_eq!(t.secrets.certificate, "default");
        // Resolved on merge; NACKed without certificates, naming the listener and chain.
        let mut state = State::default();
        state.listeners.insert("l".into(), listener(&listener_with(vec![mtls.clone()]), "1").unwrap());
        let cfg = state.merge(&certificates()).unwrap();
        assert_eq!(
            cfg.listeners[0].filter_chains[0].tls.as_ref().unwrap().files.root_cert,
            "/etc/certs/root-cert.pem"
        );
        let e = state.merge(&Config::default()).unwrap_err();
        assert_eq!(e.resource, "Listener/l");
        assert!(e.reason.contains("filter chain 0") && e.reason.contains("xds.certificates"), "{e}");
        // An unknown secret in a chain: the listener is invalid.
        let mut unknown = mtls;
        unknown.transport_socket = socket(
            "envoy.transport_sockets.tls",
            any(DOWNSTREAM_TLS, &downstream(common("spire", "ROOTCA", &[], &[]))),
        );
        let e = listener(&listener_with(vec![unknown]), "1").unwrap_err();
        assert!(e.reason.contains("filter chain 0: SDS secret \"spire\": unknown"), "{e}");
    }

    #[test]
    fn a_capture_listener_keeps_its_chains_to_choose_tls_and_counting_per_connection() {
        let mut mtls = chain(vec![to("inbound|9080||"), filter(ISTIO_STATS, Any::default())]);
        mtls.filter_chain_match =
            Some(lds::FilterChainMatch { transport_protocol: "tls".into(), ..Default::default() });
        let downstream = tls::DownstreamTlsContext {
            common_tls_context: Some(common("default", "ROOTCA", &[], &[])),
            ..Default::default()
        };
        mtls.transport_socket = socket("envoy.transport_sockets.tls", any(DOWNSTREAM_TLS, &downstream));
        let mut pb = listener_with(vec![mtls, chain(vec![to("inbound|9080||")])]);
        pb.use_original_dst = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        let x = listener(&pb, "1").unwrap();
        let l = x.listener.unwrap();
        assert_eq!(l.capture, Capture::Inbound);
        assert_eq!(l.filter_chains.len(), 2, "virtualInbound's chains choose TLS per connection");
        assert!(
            l.istio_stats
                && l.filter_chains[0].tls.is_some()
                && !l.filter_chains[0].tls.as_ref().unwrap().require_client_certificate
        );
        assert!(x.reports.is_empty(), "{:?}", x.reports);
        // Without a TLS chain (PeerAuthentication DISABLE) the chains still say what is
        // counted: a chain without istio.stats counts nothing.
        pb.filter_chains.remove(0);
        let x = listener(&pb, "1").unwrap();
        let l = x.listener.unwrap();
        assert_eq!(l.filter_chains.len(), 1);
        assert!(!l.filter_chains[0].istio_stats && !l.istio_stats);
        assert!(x.reports.is_empty(), "{:?}", x.reports);
    }

    fn outbound(name: &str, address: &str, chains: Vec<lds::FilterChain>) -> lds::Listener {
        lds::Listener {
            name: name.into(),
            address: addr(address),
            traffic_direction: core::TrafficDirection::Outbound as i32,
            filter_chains: chains,
            ..Default::default()
        }
    }

    fn xds_state(listeners: Vec<lds::Listener>, clusters: &[&str]) -> State {
        let mut state = State::default();
        for pb in listeners {
            state.listeners.insert(pb.name.clone(), listener(&pb, "1").unwrap());
        }
        for name in clusters {
            let pb = cds::Cluster {
                name: name.to_string(),
                cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                    cds::cluster::DiscoveryType::Static as i32,
                )),
                ..Default::default()
            };
            state.clusters.insert(name.to_string(), cluster(&pb, "1").unwrap());
        }
        state
    }

    #[test]
    fn a_listener_not_bound_to_its_port_serves_the_connections_captured_to_its_address() {
        let stats = || filter(ISTIO_STATS, Any::default());
        let unbound = |mut l: lds::Listener| {
            l.bind_to_port = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
            l
        };
        let mongo =
            unbound(outbound("10.0.0.5_27017", "10.0.0.5:27017", vec![chain(vec![stats(), to("mongo")])]));
        let redis = unbound(outbound("0.0.0.0_6379", "0.0.0.0:6379", vec![chain(vec![to("redis")])]));
        // istiod's 0.0.0.0_PORT for services sharing a port: one chain per service address.
        let mut a = chain(vec![stats(), to("db-a")]);
        a.filter_chain_match = Some(lds::FilterChainMatch {
            prefix_ranges: vec![core::CidrRange {
                address_prefix: "10.0.0.7".into(),
                prefix_len: Some(UInt32Value { value: 32 }),
            }],
            ..Default::default()
        });
        let mut shared = unbound(outbound("0.0.0.0_5432", "0.0.0.0:5432", vec![a]));
        shared.default_filter_chain = Some(chain(vec![stats(), to("PassthroughCluster")]));
        let mut capture = outbound(
            "virtualOutbound",
            "0.0.0.0:15001",
            vec![chain(vec![stats(), to("PassthroughCluster")])],
        );
        capture.use_original_dst = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });

        let x = listener(&mongo, "1").unwrap();
        assert!(x.listener.is_none() && x.reports.is_empty(), "{:?}", x.reports);
        let h = x.handoff.unwrap();
        assert_eq!(h.direction, Direction::Outbound);
        assert_eq!(h.addresses, vec![("10.0.0.5:27017".parse().unwrap(), "mongo".to_string())]);
        assert_eq!(h.chains[0].handoff, Some("10.0.0.5:27017".parse().unwrap()));
        assert!(h.chains[0].istio_stats);

        let state =
            xds_state(vec![mongo, redis, shared, capture], &["mongo", "redis", "db-a", "PassthroughCluster"]);
        let cfg = state.merge(&Config::default()).unwrap();
        let l = cfg.listeners.iter().find(|l| l.name == "virtualOutbound").unwrap();
        let chains = &l.filter_chains;
        let served = |dst: &str| {
            let i = crate::routing::select_chain(chains, dst.parse().unwrap(), "raw_buffer", &[]).unwrap();
            (chains[i].cluster.as_deref().unwrap(), chains[i].istio_stats)
        };
        assert_eq!(served("10.0.0.5:27017"), ("mongo", true));
        assert_eq!(
            served("10.9.9.9:6379"),
            ("redis", false),
            "a listener without istio.stats counts nothing"
        );
        assert_eq!(served("10.0.0.7:5432"), ("db-a", true));
        assert_eq!(served("10.0.0.8:5432"), ("PassthroughCluster", true));
        assert_eq!(served("10.0.0.5:27018"), ("PassthroughCluster", true));
        // An address no listener has (an endpoint's, a port of no service): the capture
        // listener's own chains, though a handed-off chain names its port.
        assert_eq!(served("10.1.1.1:27017"), ("PassthroughCluster", true));
        let own = |dst: &str| {
            let i = crate::routing::select_chain(chains, dst.parse().unwrap(), "raw_buffer", &[]).unwrap();
            chains[i].handoff
        };
        assert_eq!(own("10.1.1.1:27017"), None);
        assert_eq!(own("10.0.0.8:5432"), Some("0.0.0.0:5432".parse().unwrap()), "its default chain");
        let addresses = |name: &str| cfg.clusters.iter().find(|c| c.name == name).unwrap().addresses.clone();
        assert_eq!(addresses("mongo"), vec!["10.0.0.5:27017".parse().unwrap()]);
        assert_eq!(addresses("redis"), vec!["0.0.0.0:6379".parse().unwrap()]);
        assert_eq!(addresses("db-a"), vec!["10.0.0.7:5432".parse().unwrap()]);
        assert_eq!(addresses("PassthroughCluster"), vec![], "a default chain names no address");
        let router = crate::routing::Router::new(&cfg, 1);
        let to = |dst: &str| {
            router.route_original_dst(dst.parse().unwrap()).map(|t| cfg.clusters[t.cluster].name.as_str())
        };
        assert_eq!(to("10.9.9.9:6379"), Some("redis"), "a wildcard address takes its port");
        assert_eq!(to("10.0.0.8:5432"), None, "passthrough");
    }

    #[test]
    fn a_capture_listener_without_chains_still_passes_through_beside_handed_off_ones() {
        let mut mongo = outbound("10.0.0.5_27017", "10.0.0.5:27017", vec![chain(vec![to("mongo")])]);
        mongo.bind_to_port = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
        let mut capture = outbound("virtualOutbound", "0.0.0.0:15001", vec![]);
        capture.use_original_dst = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        let cfg = xds_state(vec![mongo, capture], &["mongo"]).merge(&Config::default()).unwrap();
        let chains = &cfg.listeners[0].filter_chains;
        let i =
            crate::routing::select_chain(chains, "10.1.1.1:80".parse().unwrap(), "raw_buffer", &[]).unwrap();
        assert!(chains[i].default && !chains[i].istio_stats);
    }
}
