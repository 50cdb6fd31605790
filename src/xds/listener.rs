//! Listener resources into listeners (SPEC §8, §9): address, filter chains and their matches,
//! tcp_proxy routes, `istio.stats`, the metadata exchange, RBAC (network filters, then an HTTP
//! connection manager's), HTTP chains relayed at L4 by their inline route table, capture
//! (`use_original_dst` or the `original_dst` listener filter), and listeners not bound to their
//! port (handed captured connections). Internal listeners are accepted, not bound. Pure:
//! protos in, config out.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;

use std::sync::Arc;

use super::proto::{Error, METADATA_EXCHANGE, decode, invalid, socket_address};
use super::rbac::{HTTP_RBAC, NETWORK_RBAC, http_filter, network_filter};
use super::route::{TcpTarget, route_target};
use super::tls::downstream;
use crate::config::{
    AccessLog, Capture, Cidr, Direction, Dur, FilterChain, Inspectors, Listener, PeerExchange, PortMatch,
    TcpRoute,
};

pub(super) const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
pub(super) const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ISTIO_STATS: &str = "istio.stats";
/// Network filters a served chain may carry: run (tcp_proxy, `istio.stats`, the exchange,
/// RBAC), or never refusing a connection (`istio_authn` only records the peer's identity).
const RUN_OR_HARMLESS: [&str; 5] = [TCP_PROXY, ISTIO_STATS, METADATA_EXCHANGE, "istio_authn", NETWORK_RBAC];
/// HTTP filters that can deny a request on what L4 cannot see and that ringside does not run:
/// an HTTP chain holding one closes its connections (SPEC §9), never relays them unjudged.
const HTTP_AUTHORIZERS: [&str; 5] = [
    "envoy.filters.http.ext_authz",
    "envoy.filters.http.ext_proc",
    "envoy.filters.http.lua",
    "envoy.filters.http.wasm",
    "envoy.filters.http.golang",
];
/// The listener filter that makes a capture listener, as `use_original_dst` does.
const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";
/// The listener filters that read a connection's first bytes before its chain is chosen.
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const HTTP_INSPECTOR: &str = "envoy.filters.listener.http_inspector";

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

fn traffic_direction(d: i32) -> Direction {
    match core::TrafficDirection::try_from(d) {
        Ok(core::TrafficDirection::Inbound) => Direction::Inbound,
        _ => Direction::Outbound,
    }
}

/// A Listener: its address, its filter chains (their `filter_chain_match`, tcp_proxy route
/// and settings, `istio.stats`), `istio.metadata_exchange`, and capture (`use_original_dst`
/// or the `original_dst` listener filter). An internal listener is accepted, not bound.
pub fn listener(pb: &lds::Listener, version: &str) -> Result<XdsListener, Error> {
    use core::address::Address as A;
    let name = pb.name.as_str();
    let bad = |reason: String| invalid("Listener", name, reason);
    if name.is_empty() {
        return Err(invalid("Listener", "", "a listener needs a name"));
    }
    // Internal listeners (istiod's HBONE `main_internal` and `connect_originate`) take
    // connections from clusters inside Envoy, never from a socket: nothing to bind, and no
    // cluster ringside serves reaches them.
    let address = pb.address.as_ref().and_then(|a| a.address.as_ref());
    let internal = match address {
        _ if pb.listener_specifier.is_some() => Some("internal_listener"),
        None => Some("no address"),
        Some(A::EnvoyInternalAddress(_)) => Some("an envoy internal address"),
        Some(A::Pipe(p)) => return Err(bad(format!("unsupported address family: pipe {:?}", p.path))),
        Some(A::SocketAddress(_)) => None,
    };
    if let Some(why) = internal {
        let line = format!("Listener/{name}: internal listener ({why}): accepted, not bound");
        return Ok(XdsListener { listener: None, reports: vec![line], handoff: None });
    }
    let listen = socket_address(&pb.address).map_err(bad)?;
    let direction = traffic_direction(pb.traffic_direction);
    let mut reports = Vec::new();
    let mut exchange = pb.listener_filters.iter().any(|f| f.name == METADATA_EXCHANGE);
    let mut chains: Vec<FilterChain> = Vec::new();
    let mut idle_timeouts: Vec<Duration> = Vec::new();
    // istiod's virtualInbound takes its original destination from the listener filter,
    // virtualOutbound from `use_original_dst`: Envoy reads both the same way.
    let original_dst = pb.use_original_dst.is_some_and(|b| b.value)
        || pb.listener_filters.iter().any(|f| f.name == ORIGINAL_DST);
    let unbound = pb.bind_to_port.is_some_and(|b| !b.value);
    let by_original_dst = original_dst || unbound;
    let inspectors = Arc::new(inspectors(&pb.listener_filters).map_err(bad)?);
    let all =
        pb.filter_chains.iter().map(|c| (c, false)).chain(pb.default_filter_chain.iter().map(|c| (c, true)));
    for (i, (chain, default)) in all.enumerate() {
        let what = match (default, chain.name.is_empty()) {
            (true, _) => "default_filter_chain".to_string(),
            (false, true) => format!("filter chain {i}"),
            (false, false) => format!("filter chain {i} {:?}", chain.name),
        };
        let mut fc = FilterChain {
            name: what.clone(),
            default,
            inspectors: Some(Arc::clone(&inspectors)),
            ..FilterChain::default()
        };
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
            Some(ts) => downstream(ts, &fc.application_protocols).map_err(|r| bad(format!("{what}: {r}")))?,
            None => None,
        };
        // RBAC (Istio's AuthorizationPolicy for TCP), in chain order; one that holds a rule
        // ringside cannot evaluate denies every connection and is reported (fail closed).
        for f in chain.filters.iter().filter(|f| f.name == NETWORK_RBAC) {
            let filter = network_filter(typed_config(f).unwrap_or(&EMPTY_ANY))
                .map_err(|e| bad(format!("{what}: {e}")))?;
            report_fail_closed(&mut reports, name, &what, &filter);
            fc.rbac.push(Arc::new(filter));
        }
        if let Some(f) = chain.filters.iter().find(|f| f.name == HTTP_CONNECTION_MANAGER) {
            let network = fc.rbac.len();
            let http = http_chain(f, listen, &mut fc).map_err(|r| bad(format!("{what}: {r}")))?;
            if let Some(any) = typed_config(f) {
                let m: hcm::HttpConnectionManager = decode(any, HCM_TYPE).map_err(bad)?;
                fc.access_log = access_logs(&m.access_log, &mut reports, name, &what).map_err(bad)?;
            }
            for filter in &fc.rbac[network..] {
                report_fail_closed(&mut reports, name, &what, filter);
            }
            // Without a route of its own, a chain of a capture listener (or one handed off to
            // it) goes by original destination, as its tcp_proxy chains do.
            let why = match http {
                Http::Closes(why) => Some(why),
                Http::Unrouted(_) if by_original_dst => None,
                Http::Unrouted(why) => Some(why),
                Http::Routed => None,
            };
            if let Some(why) = why {
                reports.push(format!("Listener/{name}: {what}: {why}; its connections close (NR)"));
                fc.not_served = Some(why);
            }
            chains.push(fc);
            continue;
        }
        // A network filter ringside does not run may deny: the chain is not served, never
        // relayed as if the filter had allowed (SPEC §9).
        if let Some(f) = chain.filters.iter().find(|f| !RUN_OR_HARMLESS.contains(&f.name.as_str())) {
            let why = format!("network filter {} is not run", f.name);
            reports.push(format!("Listener/{name}: {what}: {why}; its connections close (NR)"));
            fc.not_served = Some(why);
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
        let (target, settings) = tcp_target(proxy).map_err(|r| bad(format!("{what}: {r}")))?;
        match target {
            TcpTarget::Cluster(c) => fc.cluster = Some(c),
            TcpTarget::Weighted(routes) => fc.tcp_routes = Some(routes),
        }
        fc.max_connect_attempts = Some(settings.max_connect_attempts);
        fc.access_log = access_logs(&settings.access_log, &mut reports, name, &what).map_err(bad)?;
        idle_timeouts.push(settings.idle_timeout);
        fc.istio_stats = chain.filters.iter().any(|f| f.name == ISTIO_STATS);
        exchange |= chain.filters.iter().any(|f| f.name == METADATA_EXCHANGE);
        chains.push(fc);
    }
    // A chain that takes every plaintext connection of this listener.
    let plain = |c: &FilterChain| {
        c.not_served.is_none()
            && c.rbac.is_empty()
            && c.destination_port.is_none_or(|p| p == listen.port())
            && c.prefix_ranges.is_empty()
            && c.transport_protocol.as_deref().is_none_or(|t| t == "raw_buffer")
            && c.application_protocols.is_empty()
            && c.tls.is_none()
            && c.rds.is_none()
            && c.access_log.is_empty()
    };
    if unbound {
        return Ok(XdsListener {
            listener: None,
            handoff: Some(handoff(name, listen, direction, chains, &mut reports)),
            reports,
        });
    }
    let capture = match (original_dst, direction) {
        (true, Direction::Inbound) => Capture::Inbound,
        (true, Direction::Outbound) => Capture::Outbound,
        _ => Capture::None,
    };
    let mut listener = base_listener(name, listen, direction, capture, exchange, false, version);
    // The listener's own logs are for connections no chain takes (Envoy's listener-level
    // `access_log`: istiod's, filtered to `NR`).
    listener.access_log =
        access_logs(&pb.access_log, &mut reports, name, "listener").map_err(bad)?.into_iter().next();
    // The listener's idle timer serves all its chains: the longest of theirs, so that no
    // connection is closed before Envoy would close it; a difference is reported.
    idle_timeouts.sort();
    idle_timeouts.dedup();
    if let Some(longest) = idle_timeouts.last() {
        listener.limits.idle_timeout = Dur(*longest);
    }
    if idle_timeouts.len() > 1 {
        reports.push(format!(
            "Listener/{name}: chains with different tcp_proxy idle_timeout: all served with the longest, {}",
            Dur(listener.limits.idle_timeout.0)
        ));
    }
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
            if let Some(n) = only.max_connect_attempts {
                listener.limits.max_connect_attempts = n;
            }
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

/// The file access logs among `logs` (SPEC §9): `envoy.access_loggers.file` with its path and
/// format (text, or JSON; Envoy's default format when none is given), and a
/// `response_flag_filter`. Another logger or filter is reported and not written; a format
/// with an operator ringside does not know is invalid (Envoy rejects it too).
fn access_logs(
    logs: &[envoy_types::pb::envoy::config::accesslog::v3::AccessLog],
    reports: &mut Vec<String>,
    listener: &str,
    what: &str,
) -> Result<Vec<Arc<AccessLog>>, String> {
    use envoy_types::pb::envoy::config::accesslog::v3::{access_log, access_log_filter::FilterSpecifier};
    use envoy_types::pb::envoy::config::core::v3::{
        data_source::Specifier, substitution_format_string::Format,
    };
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
    const FILE_TYPE: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
    let mut out = Vec::new();
    for log in logs {
        let not_written = |reports: &mut Vec<String>, why: String| {
            reports.push(format!("Listener/{listener}: {what}: access log {}: {why}: not written", log.name));
        };
        let Some(access_log::ConfigType::TypedConfig(any)) = &log.config_type else {
            not_written(reports, "no typed_config".into());
            continue;
        };
        if any.type_url != FILE_TYPE {
            not_written(reports, format!("logger {} is not run (only the file logger is)", any.type_url));
            continue;
        }
        let file: FileAccessLog = decode(any, FILE_TYPE)?;
        let only_flags = match log.filter.as_ref().and_then(|f| f.filter_specifier.as_ref()) {
            None => None,
            Some(FilterSpecifier::ResponseFlagFilter(f)) => Some(f.flags.clone()),
            Some(other) => {
                let kind = format!("{other:?}");
                let kind = kind.split('(').next().unwrap_or_default().to_string();
                not_written(reports, format!("filter {kind} is not evaluated"));
                continue;
            }
        };
        let struct_fields = |s: &envoy_types::pb::google::protobuf::Struct| {
            use envoy_types::pb::google::protobuf::value::Kind;
            s.fields
                .iter()
                .map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(x)) => Ok((k.clone(), x.clone())),
                    _ => Err(format!(
                        "access log json_format: {k:?} is not a string (nested values are not written)"
                    )),
                })
                .collect::<Result<std::collections::BTreeMap<_, _>, String>>()
        };
        #[allow(deprecated)]
        let (format, json_format) = match &file.access_log_format {
            None => (Some(crate::access_log::ENVOY_DEFAULT_FORMAT.to_string()), None),
            Some(file_access_log::AccessLogFormat::Format(t)) => (Some(t.clone()), None),
            Some(
                file_access_log::AccessLogFormat::JsonFormat(j)
                | file_access_log::AccessLogFormat::TypedJsonFormat(j),
            ) => (None, Some(struct_fields(j)?)),
            Some(file_access_log::AccessLogFormat::LogFormat(f)) => match &f.format {
                Some(Format::TextFormat(t)) => (Some(t.clone()), None),
                Some(Format::JsonFormat(j)) => (None, Some(struct_fields(j)?)),
                Some(Format::TextFormatSource(d)) => match &d.specifier {
                    Some(Specifier::InlineString(t)) => (Some(t.clone()), None),
                    Some(Specifier::InlineBytes(b)) => (Some(String::from_utf8_lossy(b).into_owned()), None),
                    _ => {
                        not_written(reports, "a format from a file or the environment is not read".into());
                        continue;
                    }
                },
                None => (Some(crate::access_log::ENVOY_DEFAULT_FORMAT.to_string()), None),
            },
        };
        crate::access_log::LogFormat::parse(format.as_deref(), json_format.as_ref())
            .map_err(|e| e.to_string())?;
        if file.path.is_empty() {
            return Err(format!("access log {}: a file logger needs a path", log.name));
        }
        out.push(Arc::new(AccessLog { path: file.path, format, json_format, only_flags }));
    }
    Ok(out)
}

/// A listener's inspectors (SPEC §9): `tls_inspector` runs unless its `filter_disabled` takes
/// the port out (Envoy injects it where chains need it), `http_inspector` only where it is
/// configured, minus its `filter_disabled` ports.
fn inspectors(filters: &[lds::ListenerFilter]) -> Result<Inspectors, String> {
    let mut x = Inspectors { tls_disabled: None, http: false, http_disabled: None };
    for f in filters {
        let disabled = f.filter_disabled.as_ref().map(port_match).transpose();
        let disabled = disabled.map_err(|e| format!("listener filter {}: filter_disabled: {e}", f.name))?;
        match f.name.as_str() {
            TLS_INSPECTOR => x.tls_disabled = disabled,
            HTTP_INSPECTOR => (x.http, x.http_disabled) = (true, disabled),
            _ => {}
        }
    }
    Ok(x)
}

/// A `ListenerFilterChainMatchPredicate` (over the destination port).
fn port_match(p: &lds::ListenerFilterChainMatchPredicate) -> Result<PortMatch, String> {
    use lds::listener_filter_chain_match_predicate::Rule;
    Ok(match &p.rule {
        Some(Rule::AnyMatch(true)) => PortMatch::Any,
        Some(Rule::DestinationPortRange(r)) => {
            let start = u32::try_from(r.start).map_err(|_| format!("port range start {}", r.start))?;
            let end = u32::try_from(r.end).map_err(|_| format!("port range end {}", r.end))?;
            PortMatch::Range(start, end)
        }
        Some(Rule::OrMatch(set)) => {
            PortMatch::Or(set.rules.iter().map(port_match).collect::<Result<_, _>>()?)
        }
        Some(Rule::AndMatch(set)) => {
            PortMatch::And(set.rules.iter().map(port_match).collect::<Result<_, _>>()?)
        }
        Some(Rule::NotMatch(inner)) => PortMatch::Not(Box::new(port_match(inner)?)),
        Some(Rule::AnyMatch(false)) | None => return Err("a predicate without a rule".into()),
    })
}

static EMPTY_ANY: envoy_types::pb::google::protobuf::Any =
    envoy_types::pb::google::protobuf::Any { type_url: String::new(), value: Vec::new() };

fn typed_config(f: &lds::Filter) -> Option<&envoy_types::pb::google::protobuf::Any> {
    match &f.config_type {
        Some(lds::filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    }
}

fn report_fail_closed(reports: &mut Vec<String>, name: &str, what: &str, filter: &crate::rbac::Filter) {
    if let Some(why) = filter.fail_closed_reason() {
        reports.push(format!("Listener/{name}: {what}: RBAC fails closed (every connection denied): {why}"));
    }
}

/// An HTTP connection manager relayed at L4 (SPEC §9): its `envoy.filters.http.rbac` filters
/// join the chain's RBAC, `istio.stats` among its HTTP filters counts it, and an inline
/// `route_config` names where it goes (the virtual host whose `domains` hold the listener's
/// `IP:port`, then its `IP`, then `*`; its first route without header or query matches). A
/// capture listener's chain, or one handed off, goes by original destination instead. `Err`:
/// the manager's config is invalid (the listener is NACKed).
fn http_chain(f: &lds::Filter, listen: SocketAddr, fc: &mut FilterChain) -> Result<Http, String> {
    use hcm::http_connection_manager::RouteSpecifier;
    use hcm::http_filter::ConfigType;
    let any = typed_config(f).ok_or("http_connection_manager without typed_config")?;
    let m: hcm::HttpConnectionManager = decode(any, HCM_TYPE)?;
    let mut authorizer = None;
    for h in m.http_filters.iter().filter(|h| !h.disabled) {
        let typed = match &h.config_type {
            Some(ConfigType::TypedConfig(any)) => Some(any),
            _ => None,
        };
        if h.name == HTTP_RBAC {
            let filter = match typed {
                Some(any) => http_filter(any).map_err(|e| e.to_string())?,
                None => crate::rbac::Filter::fail_closed("envoy.filters.http.rbac without typed_config"),
            };
            fc.rbac.push(Arc::new(filter));
        } else if h.name == ISTIO_STATS {
            fc.istio_stats = true;
        } else if authorizer.is_none() && can_deny(&h.name, &h.config_type) {
            authorizer = Some(h.name.clone());
        }
    }
    if let Some(a) = authorizer {
        return Ok(Http::Closes(format!("HTTP filter {a} can deny and is not run at L4")));
    }
    // HBONE's `connect_terminate`: the bytes are HTTP/2 CONNECT streams to unwrap, not an
    // application's to relay.
    if m.upgrade_configs.iter().any(|u| u.upgrade_type.eq_ignore_ascii_case("CONNECT")) {
        return Ok(Http::Closes(
            "http_connection_manager terminating CONNECT (HBONE) is not served at L4".into(),
        ));
    }
    let target = match &m.route_specifier {
        Some(RouteSpecifier::RouteConfig(rc)) => route_target(rc, listen),
        Some(RouteSpecifier::Rds(r)) if !r.route_config_name.is_empty() => {
            // Its route comes with the RouteConfiguration of that name: the merge reads it.
            fc.rds = Some(r.route_config_name.clone());
            return Ok(Http::Routed);
        }
        Some(RouteSpecifier::Rds(_)) => Err("RDS without a route_config_name".to_string()),
        _ => Err("http_connection_manager without route_config or RDS".to_string()),
    };
    match target {
        Ok(TcpTarget::Cluster(c)) => fc.cluster = Some(c),
        Ok(TcpTarget::Weighted(routes)) => fc.tcp_routes = Some(routes),
        Err(why) => return Ok(Http::Unrouted(why)),
    }
    Ok(Http::Routed)
}

/// Whether an HTTP filter ringside does not run may deny a request: an authorizer by name or
/// by type (ext_authz, ext_proc, Lua, Go, Wasm other than Istio's own `istio.*` extensions),
/// or one whose config comes over ECDS (Istio's WasmPlugins), unknown until it arrives.
fn can_deny(name: &str, config: &Option<hcm::http_filter::ConfigType>) -> bool {
    const TYPES: [&str; 5] = [
        "ext_authz.v3.ExtAuthz",
        "ext_proc.v3.ExternalProcessor",
        "lua.v3.Lua",
        "wasm.v3.Wasm",
        "golang.v3alpha.Config",
    ];
    if HTTP_AUTHORIZERS.contains(&name) {
        return true;
    }
    match config {
        Some(hcm::http_filter::ConfigType::TypedConfig(any)) => {
            !name.starts_with("istio.") && TYPES.iter().any(|t| any.type_url.ends_with(t))
        }
        Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) => true,
        None => false,
    }
}

/// How an HTTP chain is served at L4.
enum Http {
    /// Its route names a cluster or weighted clusters.
    Routed,
    /// No route of its own (RDS, no virtual host for the listener's address): served by
    /// original destination where the listener routes that way, else closed (`NR`).
    Unrouted(String),
    /// It holds an authorizer ringside does not run: its connections close (`NR`).
    Closes(String),
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
        tunnel: None,
        access_log: None,
    }
}

/// A tcp_proxy's settings that change how a connection is served.
struct TcpSettings {
    /// Its access logs, as sent.
    access_log: Vec<envoy_types::pb::envoy::config::accesslog::v3::AccessLog>,
    /// Endpoints tried before the connection fails (Envoy's default 1).
    max_connect_attempts: u32,
    /// No bytes either way for this long closes the connection (Envoy's default 1 h).
    idle_timeout: Duration,
}

/// Envoy's tcp_proxy idle timeout when unset.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// What `idle_timeout: 0s` (Envoy: disabled) becomes: a year is "never" for a connection,
/// and unlike `Duration::MAX` it cannot overflow when added to a clock reading.
const IDLE_TIMEOUT_DISABLED: Duration = Duration::from_secs(365 * 24 * 3600);

fn tcp_target(filter: &lds::Filter) -> Result<(TcpTarget, TcpSettings), String> {
    use lds::filter::ConfigType;
    use tcp_proxy::tcp_proxy::ClusterSpecifier;
    let any = match &filter.config_type {
        Some(ConfigType::TypedConfig(any)) => any,
        _ => return Err("tcp_proxy without typed_config".into()),
    };
    let proxy: tcp_proxy::TcpProxy = decode(any, TCP_PROXY_TYPE)?;
    let idle_timeout = match proxy.idle_timeout {
        None => DEFAULT_IDLE_TIMEOUT,
        Some(d) if d.seconds == 0 && d.nanos == 0 => IDLE_TIMEOUT_DISABLED,
        Some(d) => match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
            (Ok(s), Ok(n)) if n < 1_000_000_000 => Duration::new(s, n).min(IDLE_TIMEOUT_DISABLED),
            _ => return Err(format!("tcp_proxy idle_timeout {}s {}ns: not a duration", d.seconds, d.nanos)),
        },
    };
    let max_connect_attempts = match proxy.max_connect_attempts {
        None => 1,
        Some(n) if n.value == 0 => return Err("tcp_proxy max_connect_attempts 0: at least 1".into()),
        Some(n) => n.value,
    };
    let settings = TcpSettings { access_log: proxy.access_log.clone(), max_connect_attempts, idle_timeout };
    let target = match proxy.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => TcpTarget::Cluster(c),
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
            TcpTarget::Weighted(routes)
        }
        _ => return Err("tcp_proxy without a cluster".into()),
    };
    Ok((target, settings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::xds::fixtures::*;
    use crate::xds::state::{Accepted, State};
    use crate::xds::tls::DOWNSTREAM_TLS;
    use envoy_types::pb::envoy::config::route::v3 as rds;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};

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

    /// An HTTP connection manager with `http_filters` (name, typed config) and a route.
    fn manager(
        http_filters: Vec<(&str, Any)>,
        route: Option<hcm::http_connection_manager::RouteSpecifier>,
    ) -> lds::Filter {
        let m = hcm::HttpConnectionManager {
            http_filters: http_filters
                .into_iter()
                .map(|(name, a)| hcm::HttpFilter {
                    name: name.into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(a)),
                    ..Default::default()
                })
                .collect(),
            route_specifier: route,
            ..Default::default()
        };
        filter(HTTP_CONNECTION_MANAGER, any(HCM_TYPE, &m))
    }

    fn rds(name: &str) -> Option<hcm::http_connection_manager::RouteSpecifier> {
        Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            route_config_name: name.into(),
            ..Default::default()
        }))
    }

    /// A virtual host: its domains, its routes as (has a header match, cluster).
    type VirtualHost<'a> = (&'a [&'a str], Vec<(bool, &'a str)>);

    /// An inline route table.
    fn routes(vhosts: Vec<VirtualHost<'_>>) -> Option<hcm::http_connection_manager::RouteSpecifier> {
        let virtual_hosts = vhosts
            .into_iter()
            .enumerate()
            .map(|(i, (domains, routes))| rds::VirtualHost {
                name: format!("vh{i}"),
                domains: domains.iter().map(|d| d.to_string()).collect(),
                routes: routes
                    .into_iter()
                    .map(|(header, cluster)| rds::Route {
                        r#match: Some(rds::RouteMatch {
                            headers: if header {
                                vec![rds::HeaderMatcher { name: "x-canary".into(), ..Default::default() }]
                            } else {
                                vec![]
                            },
                            ..Default::default()
                        }),
                        action: Some(rds::route::Action::Route(rds::RouteAction {
                            cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(
                                cluster.into(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rds::RouteConfiguration {
            name: "inline".into(),
            virtual_hosts,
            ..Default::default()
        }))
    }

    fn network_rbac(rules: Option<envoy_types::pb::envoy::config::rbac::v3::Rbac>) -> Any {
        use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac;
        any(
            super::super::rbac::NETWORK_RBAC_TYPE,
            &Rbac { rules, stat_prefix: "tcp.".into(), ..Default::default() },
        )
    }

    fn http_rbac(rules: Option<envoy_types::pb::envoy::config::rbac::v3::Rbac>) -> Any {
        use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
        any(super::super::rbac::HTTP_RBAC_TYPE, &Rbac { rules, ..Default::default() })
    }

    /// An ALLOW (or DENY) rule set with one policy: any permission, the principal `any: true`
    /// or, with `source`, the source IP block.
    fn rules(action: i32, source: Option<&str>) -> envoy_types::pb::envoy::config::rbac::v3::Rbac {
        use envoy_types::pb::envoy::config::rbac::v3 as r;
        let id = match source {
            Some(ip) => r::principal::Identifier::DirectRemoteIp(core::CidrRange {
                address_prefix: ip.into(),
                prefix_len: Some(UInt32Value { value: 32 }),
            }),
            None => r::principal::Identifier::Any(true),
        };
        let policy = r::Policy {
            permissions: vec![r::Permission { rule: Some(r::permission::Rule::Any(true)) }],
            principals: vec![r::Principal { identifier: Some(id) }],
            ..Default::default()
        };
        r::Rbac { action, policies: [("p".to_string(), policy)].into(), ..Default::default() }
    }

    fn conn(source: &str, destination: &str) -> crate::rbac::Conn<'static> {
        crate::rbac::Conn {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            tls: None,
        }
    }

    #[test]
    fn a_chains_rbac_filters_are_collected_in_order_network_then_http_and_the_chain_is_served() {
        use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
        let deny_7 = filter(NETWORK_RBAC, network_rbac(Some(rules(Action::Deny as i32, Some("10.0.0.7")))));
        let deny_all = filter(NETWORK_RBAC, network_rbac(Some(Default::default())));
        let x = listener(&listener_with(vec![chain(vec![deny_7.clone(), to("c")])]), "1").unwrap();
        let l = x.listener.unwrap();
        assert!(x.reports.is_empty(), "{:?}", x.reports);
        assert!(l.cluster.is_none(), "a chain with RBAC is never collapsed into the plain model");
        let c = &l.filter_chains[0];
        assert_eq!((c.not_served.as_deref(), c.cluster.as_deref(), c.rbac.len()), (None, Some("c"), 1));
        assert!(!c.rbac[0].allows(&conn("10.0.0.7:1", "127.0.0.1:27017")));
        assert!(c.rbac[0].allows(&conn("10.0.0.8:1", "127.0.0.1:27017")));
        // Network filters first, then the HTTP manager's, each in its order.
        let http = manager(
            vec![
                (HTTP_RBAC, http_rbac(Some(rules(Action::Allow as i32, None)))),
                (ISTIO_STATS, Any::default()),
                (HTTP_RBAC, http_rbac(Some(rules(Action::Deny as i32, Some("10.0.0.9"))))),
            ],
            routes(vec![(&["*"], vec![(false, "inbound|8000||")])]),
        );
        let x = listener(&listener_with(vec![chain(vec![deny_7, http])]), "1").unwrap();
        let c = x.listener.unwrap().filter_chains.remove(0);
        assert_eq!(c.rbac.len(), 3);
        assert!(c.istio_stats, "istio.stats among the HTTP filters counts the chain");
        let allowed: Vec<bool> = ["10.0.0.7:1", "10.0.0.8:1", "10.0.0.9:1"]
            .iter()
            .map(|s| c.rbac.iter().all(|f| f.allows(&conn(s, "127.0.0.1:27017"))))
            .collect();
        assert_eq!(allowed, [false, true, false]);
        assert!(c.rbac[1].allows(&conn("10.0.0.7:1", "127.0.0.1:27017")), "the HTTP ALLOW is second");
        // Empty rules deny all; a rule ringside cannot evaluate is reported (fail closed).
        let x = listener(&listener_with(vec![chain(vec![deny_all, to("c")])]), "1").unwrap();
        assert!(!x.listener.unwrap().filter_chains[0].rbac[0].allows(&conn("10.0.0.8:1", "127.0.0.1:1")));
        let matcher = envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac {
            matcher: Some(Default::default()),
            ..Default::default()
        };
        let cel = filter(NETWORK_RBAC, any(super::super::rbac::NETWORK_RBAC_TYPE, &matcher));
        let x = listener(&listener_with(vec![chain(vec![cel, to("c")])]), "1").unwrap();
        assert_eq!(x.reports.len(), 1, "{:?}", x.reports);
        assert!(x.reports[0].starts_with("Listener/l: filter chain 0: RBAC fails closed"), "{:?}", x.reports);
        // Not an RBAC config at all: the listener is invalid.
        let e =
            listener(&listener_with(vec![chain(vec![filter(NETWORK_RBAC, Any::default()), to("c")])]), "1")
                .unwrap_err();
        assert!(e.reason.contains("rbac: typed_config"), "{e}");
    }

    #[test]
    fn an_http_chain_takes_the_route_of_the_virtual_host_holding_its_destination() {
        let plain = |route| {
            let x = listener(&listener_with(vec![chain(vec![manager(vec![], route)])]), "1").unwrap();
            (x.listener, x.reports)
        };
        // listener_with listens on 127.0.0.1:27017: IP:port before IP before `*`; the first
        // route without header or query matches.
        let vhosts = |first: &'static [&'static str]| {
            routes(vec![
                (&["*"], vec![(false, "star")]),
                (first, vec![(true, "canary"), (false, "exact")]),
                (&["127.0.0.1"], vec![(false, "ip")]),
            ])
        };
        let cluster = |r| plain(r).0.unwrap().cluster;
        assert_eq!(cluster(vhosts(&["127.0.0.1:27017"])).as_deref(), Some("exact"));
        assert_eq!(cluster(vhosts(&["example.com"])).as_deref(), Some("ip"));
        assert_eq!(cluster(routes(vec![(&["*"], vec![(false, "star")])])).as_deref(), Some("star"));
        // No virtual host for the address: the chain closes (NR).
        let (l, reports) = plain(routes(vec![(&["example.com"], vec![(false, "x")])]));
        assert!(l.is_none() && reports[0].contains("no virtual host for 127.0.0.1:27017"), "{reports:?}");
        // RDS: the chain names its RouteConfiguration, which the merge reads (never collapsed).
        let (l, reports) = plain(rds("27017"));
        let l = l.unwrap();
        assert!(reports.is_empty() && l.cluster.is_none(), "{reports:?}");
        assert_eq!(l.filter_chains[0].rds.as_deref(), Some("27017"));
        // In a capture listener an unrouted HTTP chain goes by original destination.
        let mut pb = listener_with(vec![chain(vec![manager(vec![], routes(vec![]))])]);
        pb.use_original_dst = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        let x = listener(&pb, "1").unwrap();
        let c = &x.listener.unwrap().filter_chains[0];
        assert!(c.not_served.is_none() && c.cluster.is_none() && x.reports.is_empty(), "{:?}", x.reports);
        // An authorizer ringside cannot run closes the chain, even by original destination.
        let authz = manager(
            vec![("envoy.filters.http.ext_authz", Any::default())],
            routes(vec![(&["*"], vec![(false, "c")])]),
        );
        pb.filter_chains = vec![chain(vec![authz])];
        let x = listener(&pb, "1").unwrap();
        assert_eq!(
            x.listener.unwrap().filter_chains[0].not_served.as_deref(),
            Some("HTTP filter envoy.filters.http.ext_authz can deny and is not run at L4")
        );
        // A WasmPlugin (Wasm config under its own name) too; Istio's own Wasm extensions not.
        let mut wasm = |name: &str| {
            let any = Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm".into(),
                value: vec![],
            };
            pb.filter_chains =
                vec![chain(vec![manager(vec![(name, any)], routes(vec![(&["*"], vec![(false, "c")])]))])];
            listener(&pb, "1").unwrap().listener.unwrap().filter_chains[0].not_served.clone()
        };
        assert!(wasm("extensions.istio.io/wasmplugin/default.authz").is_some());
        assert_eq!(wasm("istio.metadata_exchange"), None);
    }

    #[test]
    fn http_chains_are_reported_and_chains_keep_their_matches() {
        let hcm = manager(vec![], routes(vec![(&["example.com"], vec![(false, "x")])]));
        let x = listener(&listener_with(vec![chain(vec![hcm.clone()])]), "1").unwrap();
        assert!(x.listener.is_none(), "an HTTP-only listener that routes nothing is not bound");
        assert!(x.reports[0].contains("no virtual host"), "{:?}", x.reports);
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
        // Its own, then what the chain matches on that it lacks.
        assert_eq!(t.alpn, ["istio-peer-exchange", "h2", "http/1.1", "istio"]);
        assert!(t.require_client_certificate);
        assert_eq!(t.secrets.certificate, "default");
        // Resolved on merge; NACKed without certificates, naming the listener and chain.
        let mut state = State::default();
        state.listeners.insert(
            "l".into(),
            Accepted::new("1", listener(&listener_with(vec![mtls.clone()]), "1").unwrap()),
        );
        let cfg = state.merge(&certificates()).unwrap();
        assert_eq!(
            cfg.listeners[0].filter_chains[0].tls.as_ref().unwrap().files.root_cert,
            "/etc/certs/root-cert.pem"
        );
        let e = state.merge(&Config::default()).unwrap_err();
        assert_eq!(e.resource, "Listener/l");
        assert!(e.reason.contains("filter chain 0") && e.reason.contains("xds.certificates"), "{e}");
        // An unknown secret in a chain without an SDS server: the listener is invalid.
        let mut unknown = mtls;
        unknown.transport_socket = socket(
            "envoy.transport_sockets.tls",
            any(DOWNSTREAM_TLS, &downstream(common("spire", "ROOTCA", &[], &[]))),
        );
        state
            .listeners
            .insert("l".into(), Accepted::new("1", listener(&listener_with(vec![unknown]), "1").unwrap()));
        let e = state.merge(&certificates()).unwrap_err();
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

    #[test]
    fn internal_listeners_are_accepted_and_not_bound_and_a_pipe_address_is_invalid() {
        // istiod's HBONE listeners: `connect_originate` without an address, `main_internal`
        // with `internal_listener` set.
        let mut no_address = listener_with(vec![chain(vec![to("c")])]);
        no_address.name = "connect_originate".into();
        no_address.address = None;
        let x = listener(&no_address, "1").unwrap();
        assert!(x.listener.is_none() && x.handoff.is_none());
        assert_eq!(
            x.reports,
            ["Listener/connect_originate: internal listener (no address): accepted, not bound"]
        );
        let mut internal = listener_with(vec![chain(vec![to("c")])]);
        internal.name = "main_internal".into();
        internal.address = None;
        internal.listener_specifier =
            Some(lds::listener::ListenerSpecifier::InternalListener(Default::default()));
        let x = listener(&internal, "1").unwrap();
        assert!(x.listener.is_none());
        assert!(x.reports[0].contains("internal listener (internal_listener)"), "{:?}", x.reports);
        let mut pipe = listener_with(vec![chain(vec![to("c")])]);
        pipe.address = Some(core::Address {
            address: Some(core::address::Address::Pipe(core::Pipe { path: "/x.sock".into(), mode: 0 })),
        });
        let e = listener(&pipe, "1").unwrap_err();
        assert_eq!(
            (e.resource.as_str(), e.reason.as_str()),
            ("Listener/l", "unsupported address family: pipe \"/x.sock\"")
        );
    }

    #[test]
    fn the_original_dst_listener_filter_makes_a_capture_listener_as_use_original_dst_does() {
        let mut pb = listener_with(vec![chain(vec![to("inbound|9080||")])]);
        assert_eq!(listener(&pb, "1").unwrap().listener.unwrap().capture, Capture::None);
        pb.listener_filters.push(lds::ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            ..Default::default()
        });
        let l = listener(&pb, "1").unwrap().listener.unwrap();
        assert_eq!(l.capture, Capture::Inbound);
        assert_eq!(l.filter_chains.len(), 1, "the chains choose TLS and counting per connection");
        pb.traffic_direction = core::TrafficDirection::Outbound as i32;
        assert_eq!(listener(&pb, "1").unwrap().listener.unwrap().capture, Capture::Outbound);
    }

    #[test]
    fn tcp_proxy_max_connect_attempts_and_idle_timeout_take_envoys_defaults_when_unset() {
        use envoy_types::pb::google::protobuf::Duration as PbDuration;
        let with = |attempts: Option<u32>, idle: Option<i64>| {
            let p = tcp_proxy::TcpProxy {
                cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster("c".into())),
                max_connect_attempts: attempts.map(|value| UInt32Value { value }),
                idle_timeout: idle.map(|seconds| PbDuration { seconds, nanos: 0 }),
                ..Default::default()
            };
            filter(TCP_PROXY, any(TCP_PROXY_TYPE, &p))
        };
        let plain = |f| listener(&listener_with(vec![chain(vec![f])]), "1").unwrap().listener.unwrap();
        let l = plain(with(None, None));
        assert_eq!(l.limits.max_connect_attempts, 1, "Envoy's default: one attempt");
        assert_eq!(l.limits.idle_timeout.0, Duration::from_secs(3600), "Envoy's default: 1 h");
        let l = plain(with(Some(3), Some(30)));
        assert_eq!((l.limits.max_connect_attempts, l.limits.idle_timeout.0), (3, Duration::from_secs(30)));
        assert_eq!(plain(with(None, Some(0))).limits.idle_timeout.0, IDLE_TIMEOUT_DISABLED, "0s: disabled");
        // Chains carry their own attempts; the listener's idle timer takes the longest.
        let mut pb =
            listener_with(vec![chain(vec![with(Some(2), Some(10))]), chain(vec![with(None, Some(20))])]);
        pb.filter_chains[0].filter_chain_match =
            Some(lds::FilterChainMatch { transport_protocol: "tls".into(), ..Default::default() });
        let x = listener(&pb, "1").unwrap();
        let l = x.listener.unwrap();
        let attempts: Vec<_> = l.filter_chains.iter().map(|c| c.max_connect_attempts).collect();
        assert_eq!(attempts, [Some(2), Some(1)]);
        assert_eq!(l.limits.idle_timeout.0, Duration::from_secs(20));
        assert!(x.reports[0].contains("different tcp_proxy idle_timeout"), "{:?}", x.reports);
        let e = listener(&listener_with(vec![chain(vec![with(Some(0), None)])]), "1").unwrap_err();
        assert!(e.reason.contains("max_connect_attempts 0"), "{e}");
    }

    #[test]
    fn a_chain_with_a_network_filter_ringside_does_not_run_closes_its_connections() {
        let redis = filter("envoy.filters.network.redis_proxy", Any::default());
        let authn = filter("istio_authn", Any::default());
        let mut pb = listener_with(vec![chain(vec![authn.clone(), redis, to("inbound|9080||")])]);
        pb.filter_chains.push(chain(vec![authn, to("inbound|9090||")]));
        pb.filter_chains[1].filter_chain_match = Some(lds::FilterChainMatch {
            destination_port: Some(UInt32Value { value: 9090 }),
            ..Default::default()
        });
        let x = listener(&pb, "1").unwrap();
        let chains = x.listener.unwrap().filter_chains;
        assert_eq!(
            chains[0].not_served.as_deref(),
            Some("network filter envoy.filters.network.redis_proxy is not run")
        );
        assert_eq!(
            (chains[1].not_served.as_deref(), chains[1].cluster.as_deref()),
            (None, Some("inbound|9090||"))
        );
        assert_eq!(
            x.reports,
            [
                "Listener/l: filter chain 0: network filter envoy.filters.network.redis_proxy is not run; its connections close (NR)"
            ]
        );
    }

    #[test]
    fn listener_filters_give_the_inspectors_and_their_disabled_ports_to_every_chain() {
        use envoy_types::pb::envoy::r#type::v3::Int32Range;
        use lds::listener_filter_chain_match_predicate::{MatchSet, Rule};
        let range = |start, end| lds::ListenerFilterChainMatchPredicate {
            rule: Some(Rule::DestinationPortRange(Int32Range { start, end })),
        };
        let f = |name: &str, disabled| lds::ListenerFilter {
            name: name.into(),
            filter_disabled: disabled,
            ..Default::default()
        };
        let mut pb = listener_with(vec![chain(vec![to("a")]), chain(vec![to("b")])]);
        pb.filter_chains[0].filter_chain_match =
            Some(lds::FilterChainMatch { transport_protocol: "tls".into(), ..Default::default() });
        let either = lds::ListenerFilterChainMatchPredicate {
            rule: Some(Rule::OrMatch(MatchSet { rules: vec![range(15006, 15007), range(3306, 3307)] })),
        };
        pb.listener_filters =
            vec![f(TLS_INSPECTOR, Some(range(15006, 15007))), f(HTTP_INSPECTOR, Some(either))];
        let l = listener(&pb, "1").unwrap().listener.unwrap();
        let x = l.filter_chains[1].inspectors.clone().unwrap();
        assert!(x.tls(8080) && !x.tls(15006));
        assert!(x.http(8080) && !x.http(15006) && !x.http(3306) && x.http(3307));
        // No http_inspector: never sniffed; a predicate without a rule is invalid.
        pb.listener_filters = vec![f(TLS_INSPECTOR, None)];
        let l = listener(&pb, "1").unwrap().listener.unwrap();
        assert!(!l.filter_chains[0].inspectors.clone().unwrap().http(8080));
        pb.listener_filters = vec![f(HTTP_INSPECTOR, Some(Default::default()))];
        let e = listener(&pb, "1").unwrap_err();
        assert!(e.reason.contains("filter_disabled: a predicate without a rule"), "{e}");
    }

    #[test]
    fn tcp_proxy_and_listener_file_access_logs_are_read_with_their_format_and_response_flag_filter() {
        use envoy_types::pb::envoy::config::accesslog::v3 as accesslog;
        use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
        const FILE: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
        let text = |path: &str, format: Option<&str>| file::FileAccessLog {
            path: path.into(),
            access_log_format: format.map(|f| {
                file::file_access_log::AccessLogFormat::LogFormat(core::SubstitutionFormatString {
                    format: Some(core::substitution_format_string::Format::TextFormatSource(
                        core::DataSource {
                            specifier: Some(core::data_source::Specifier::InlineString(f.into())),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })
            }),
        };
        let log = |name: &str, url: &str, f: &file::FileAccessLog, nr: bool| accesslog::AccessLog {
            name: name.into(),
            filter: nr.then(|| accesslog::AccessLogFilter {
                filter_specifier: Some(accesslog::access_log_filter::FilterSpecifier::ResponseFlagFilter(
                    accesslog::ResponseFlagFilter { flags: vec!["NR".into()] },
                )),
            }),
            config_type: Some(accesslog::access_log::ConfigType::TypedConfig(any(url, f))),
        };
        let with_logs = |logs: Vec<accesslog::AccessLog>| {
            let p = tcp_proxy::TcpProxy {
                cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster("c".into())),
                access_log: logs,
                ..Default::default()
            };
            filter(TCP_PROXY, any(TCP_PROXY_TYPE, &p))
        };
        let stdout = text("/dev/stdout", Some("%RESPONSE_FLAGS% %UPSTREAM_HOST%\n"));
        let grpc = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig";
        let mut pb = listener_with(vec![chain(vec![with_logs(vec![
            log("envoy.access_loggers.file", FILE, &stdout, false),
            log("envoy.access_loggers.tcp_grpc", grpc, &stdout, false),
        ])])]);
        pb.access_log = vec![log("envoy.access_loggers.file", FILE, &text("/dev/stdout", None), true)];
        let x = listener(&pb, "1").unwrap();
        let l = x.listener.unwrap();
        let chain_logs = &l.filter_chains[0].access_log;
        assert_eq!(chain_logs.len(), 1, "the file logger only");
        assert_eq!(
            (chain_logs[0].path.as_str(), chain_logs[0].format.as_deref()),
            ("/dev/stdout", Some("%RESPONSE_FLAGS% %UPSTREAM_HOST%\n"))
        );
        assert!(l.cluster.is_none(), "a chain with a log is never collapsed into the plain model");
        let own = l.access_log.unwrap();
        assert_eq!(
            own.format.as_deref(),
            Some(crate::access_log::ENVOY_DEFAULT_FORMAT),
            "no format: Envoy's"
        );
        assert!(own.takes("NR") && !own.takes("-"), "istiod's listener log: NR only");
        assert_eq!(x.reports.len(), 1, "{:?}", x.reports);
        assert!(
            x.reports[0].contains("access log envoy.access_loggers.tcp_grpc")
                && x.reports[0].ends_with("not written")
        );
        // An operator Envoy does not have: the listener is invalid, as Envoy rejects it.
        let bad = text("/dev/stdout", Some("%NOT_AN_OPERATOR%"));
        let pb = listener_with(vec![chain(vec![with_logs(vec![log(
            "envoy.access_loggers.file",
            FILE,
            &bad,
            false,
        )])])]);
        let e = listener(&pb, "1").unwrap_err();
        assert!(e.reason.contains("unsupported command operator %NOT_AN_OPERATOR%"), "{e}");
    }
}
