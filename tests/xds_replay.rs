//! SPEC §9 against what a real istiod sends: the three Envoy `/config_dump`s of Istio sidecars
//! in `../shared/istio-xds-dumps/` (Istio 1.15-1.18), their JSON turned into protobuf here
//! (against the FileDescriptorSet envoy-types ships; Istio-only types carried as opaque
//! `Any`), served over ADS to the real binary in a network namespace of its own (the dumps
//! bind 15001 and 15006). Each test asserts exactly which resources are applied and which
//! NACKed with which reason, that the pod becomes ready, and what virtualInbound serves; the
//! DSB dump's RouteConfigurations are served over RDS, and an HTTP port it routes that way
//! takes outbound traffic to the endpoint of the service its virtual host names.
//! A real Envoy 1.40 is the reference on the same resources less Istio's own extensions
//! (`for_envoy`): on the DSB dump the same connections reach the same backends (inbound from
//! 127.0.0.6, passthrough both ways, an EDS endpoint in plaintext and one in mTLS) and the same
//! are refused; on the httpbin listeners it says which one it cannot load.
//! Without the dumps, namespaces or Envoy, each test prints a SKIP line and returns.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/dumps.rs"]
mod dumps;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pki.rs"]
mod pki;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use ads::{AdsServer, CLUSTER, ENDPOINTS, LISTENER, ROUTES, Snapshot, lds, rds};
use dumps::{Dump, load};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use netns::{Sidecar, in_ns};
use pki::{Ca, Certs};
use prost::Message;

/// istiod's capture listeners, virtualOutbound and virtualInbound, reached from inside the pod.
const CAPTURE: [&str; 2] = ["127.0.0.1:15001", "127.0.0.1:15006"];

/// The dump `file` in `../shared/istio-xds-dumps`, or None (after one SKIP line naming what
/// is missing) when it is absent or network namespaces are unavailable (every replay runs
/// in its own).
fn dump_in_netns(test: &str, file: &str) -> Option<PathBuf> {
    let path = common::shared("istio-xds-dumps", test)?.join(file);
    netns::unavailable(test).is_none().then_some(path)
}

/// What the sidecar replied to each type of the first push.
struct Replies {
    /// Per type URL, the error_detail of its reply (None: ACK).
    detail: BTreeMap<String, Option<String>>,
}

/// The first reply (ACK or NACK, with a nonce) to each of `types`.
fn replies(requests: &mpsc::Receiver<DiscoveryRequest>, types: &[&str]) -> Replies {
    let mut detail = BTreeMap::new();
    while detail.len() < types.len() {
        let r = requests.recv_timeout(common::DEADLINE).expect("a reply to every type");
        if !r.response_nonce.is_empty() && types.contains(&r.type_url.as_str()) {
            detail.entry(r.type_url.clone()).or_insert(r.error_detail.map(|e| e.message));
        }
    }
    Replies { detail }
}

/// Serve `dump` (and its `routes` over RDS) to a ringside in a namespace of its own; the
/// replies to the first response of each type, its `/config_dump`, and the sidecar (ready:
/// `bound` accept at once).
fn replay(
    ns: &str,
    (dump, routes): (Snapshot, Vec<rds::RouteConfiguration>),
    types: &[&str],
    bound: &[&str],
) -> (Replies, serde_json::Value, Sidecar, AdsServer) {
    let ca = Ca::new("mesh");
    let certs = Certs::new(ns, &ca, "spiffe://cluster.local/ns/default/sa/replay");
    let (tx, requests) = mpsc::channel();
    let server = AdsServer::start_for_sidecar(ns, dump.clone(), tx);
    server.push_routes(dump, routes);
    let yaml = format!(
        "node:\n  workload_name: replay-v1\n  namespace: default\nworkers: 1\n\
         metrics: {{listen: 127.0.0.1:15090}}\nadmin: {{listen: 127.0.0.1:15000}}\nhealth: {{listen: 'off'}}\n\
         xds: {{address: \"{}\", certificates: {{{}}}}}\n",
        server.unix_address(),
        certs.yaml()
    );
    // Sidecar::spawn returns once /ready says 200: every type arrived, the listeners bound.
    let sidecar = Sidecar::spawn(ns, &yaml);
    for listen in bound {
        netns::connect_in(ns, listen).unwrap_or_else(|e| panic!("{listen} not bound at /ready: {e}"));
    }
    let replies = replies(&requests, types);
    let admin = sidecar.admin;
    let dump = in_ns(ns, move || common::http(admin, "GET", "/config_dump")).expect("config_dump").1;
    (replies, serde_json::from_str(&dump).unwrap(), sidecar, server)
}

/// A namespace with only loopback up, removed on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("rs-replay-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap();
        assert!(ok.success());
        netns::exec(&name, &["ip", "link", "set", "lo", "up"]);
        Ns(name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The listeners of `/config_dump` by name: (listen, capture, number of chains).
fn served_listeners(config: &serde_json::Value) -> BTreeMap<String, (String, String, usize)> {
    config["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or("").to_string(),
                (
                    l["listen"].as_str().unwrap_or("").to_string(),
                    l["capture"].as_str().unwrap_or("none").to_string(),
                    l["filter_chains"].as_array().map_or(0, Vec::len),
                ),
            )
        })
        .collect()
}

fn snapshot(dump: &Dump) -> (Snapshot, Vec<rds::RouteConfiguration>) {
    let s = Snapshot {
        version: "1".into(),
        clusters: dump.clusters.clone(),
        endpoints: dump.endpoints.clone(),
        listeners: dump.listeners.clone(),
        secrets: vec![],
    };
    (s, dump.routes.clone())
}

/// The lines of `/config_dump`'s `xds_status.not_served`.
fn reports(config: &serde_json::Value) -> Vec<String> {
    let lines = config["xds_status"]["not_served"].as_array().cloned().unwrap_or_default();
    lines.iter().filter_map(|l| l.as_str().map(String::from)).collect()
}

/// The bound listeners: istiod's two capture listeners, and nothing else a sidecar binds.
fn assert_capture_listeners_only(config: &serde_json::Value) -> BTreeMap<String, (String, String, usize)> {
    let served = served_listeners(config);
    assert_eq!(served.keys().collect::<Vec<_>>(), ["virtualInbound", "virtualOutbound"], "{served:?}");
    assert_eq!(
        (served["virtualInbound"].0.as_str(), served["virtualInbound"].1.as_str()),
        ("0.0.0.0:15006", "inbound"),
        "virtualInbound captures through its original_dst listener filter"
    );
    assert_eq!(
        (served["virtualOutbound"].0.as_str(), served["virtualOutbound"].1.as_str()),
        ("0.0.0.0:15001", "outbound")
    );
    served
}

#[test]
fn the_real_httpbin_sidecar_listeners_are_all_applied_internal_ones_unbound_and_the_pod_ready() {
    const TEST: &str = "xds_replay::httpbin";
    let Some(path) = dump_in_netns(TEST, "istio-authz-httpbin-sidecar-listeners.json") else { return };
    let dump = load(&path);
    assert_eq!((dump.listeners.len(), dump.clusters.len(), dump.endpoints.len()), (27, 0, 0));
    let ns = Ns::new("httpbin");
    // Ready (Sidecar::spawn waits for /ready) though the dump has no clusters: the Cluster
    // response arrived, empty.
    let (replies, config, _sidecar, _server) = replay(&ns.0, snapshot(&dump), &[CLUSTER, LISTENER], &CAPTURE);
    assert_eq!(replies.detail[LISTENER], None, "every listener applied");
    assert_eq!(replies.detail[CLUSTER], None);
    let served = assert_capture_listeners_only(&config);
    // virtualInbound: its 4 TCP and 4 HTTP chains (every chain stays in the match, served
    // or not). virtualOutbound: its 2 chains and the 34 chains of the 22 outbound
    // listeners not bound to their port (10 TCP-only, 12 with an HTTP chain beside).
    assert_eq!((served["virtualInbound"].2, served["virtualOutbound"].2), (8, 2 + 10 + 12 * 2), "{served:?}");
    let reports = reports(&config);
    for internal in ["main_internal", "connect_originate"] {
        let line = format!("Listener/{internal}: internal listener (internal_listener): accepted, not bound");
        assert!(reports.contains(&line), "{line}: {reports:?}");
    }
    // Its AuthorizationPolicy: the network RBAC of the TCP chains and the HTTP RBAC of the
    // HTTP chains are run (SPEC §9), nothing in them fails closed, no chain is left unserved.
    assert!(
        !reports.iter().any(|l| l.contains("rbac") || l.contains("RBAC") || l.contains("virtualInbound")),
        "{reports:?}"
    );
    assert!(
        reports
            .iter()
            .any(|l| l.starts_with("Listener/connect_terminate: ") && l.contains("http_connection_manager")),
        "HBONE's connect_terminate is HTTP CONNECT: not bound, reported: {reports:?}"
    );
    assert!(
        !reports.iter().any(|l| l.starts_with("rejected") || l.starts_with("last rejected")),
        "{reports:?}"
    );
}

#[test]
fn the_real_bookinfo_endpoints_are_all_applied_with_their_workloads() {
    const TEST: &str = "xds_replay::bookinfo";
    let Some(path) = dump_in_netns(TEST, "istio-istioctl-bookinfo-sidecar-endpoints.json") else { return };
    let dump = load(&path);
    assert_eq!((dump.listeners.len(), dump.clusters.len(), dump.endpoints.len()), (0, 0, 32));
    // The dump holds endpoints only: an EDS cluster per assignment (built here, as istiod's
    // outbound clusters are) makes ringside ask for each of them.
    let (mut s, routes) = snapshot(&dump);
    s.clusters = dump
        .endpoints
        .iter()
        .map(|e| ads::eds_cluster(&e.cluster_name, "bookinfo.default.svc.cluster.local", "default"))
        .collect();
    let ns = Ns::new("bookinfo");
    let (replies, config, _sidecar, _server) =
        replay(&ns.0, (s, routes), &[CLUSTER, LISTENER, ENDPOINTS], &[]);
    assert_eq!(replies.detail[ENDPOINTS], None, "every assignment applied");
    let clusters = config["clusters"].as_array().unwrap();
    let endpoints = |name: &str| {
        let c = clusters.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name}"));
        c["endpoints"].as_array().unwrap().len()
    };
    for cla in &dump.endpoints {
        let want: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
        assert_eq!(endpoints(&cla.cluster_name), want, "{}", cla.cluster_name);
    }
    // istio.workload strings become the endpoints' identity (SPEC §9).
    let dump_text = config.to_string();
    assert!(dump_text.contains("\"workload_name\":\"reviews-v1\""), "reviews-v1 read from istio.workload");
}

#[test]
fn the_real_dsb_sidecar_is_applied_whole_including_the_virtual_inbound_envoy_rejected_for_lua() {
    const TEST: &str = "xds_replay::dsb";
    let Some(path) = dump_in_netns(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    let dump = load(&path);
    // 142 dynamic listeners, virtualInbound dumped twice (Envoy rejected it).
    assert_eq!((dump.listeners.len(), dump.clusters.len(), dump.endpoints.len()), (141, 138, 138));
    let ns = Ns::new("dsb");
    assert_eq!(dump.routes.len(), 90);
    let (replies, config, _sidecar, _server) =
        replay(&ns.0, snapshot(&dump), &[CLUSTER, LISTENER, ENDPOINTS, ROUTES], &CAPTURE);
    // Envoy NACKed virtualInbound for a Lua filter's source; ringside runs no HTTP filter and
    // does not validate them (SPEC §9): applied.
    assert_eq!(replies.detail[LISTENER], None);
    assert_eq!(replies.detail[CLUSTER], None);
    assert_eq!(replies.detail[ENDPOINTS], None);
    assert_eq!(replies.detail[ROUTES], None, "every RouteConfiguration its HTTP chains name, applied");
    assert_capture_listeners_only(&config);
    let clusters = config["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 138, "every dynamic cluster, no stub");
    // The HTTP port 9080 (0.0.0.0_9080, its chain routed over RDS by route `9080`): each
    // service's ClusterIP there goes to the cluster its virtual host names (SPEC §9).
    let addresses = |name: &str| {
        let c = clusters.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name}"));
        c["addresses"].as_array().cloned().unwrap_or_default()
    };
    assert_eq!(
        addresses("outbound|9080||details.default.svc.cluster.local"),
        [serde_json::json!("10.68.49.224:9080")]
    );
    // Access logs as `meshConfig.accessLogFile` makes istiod send them (the demo profile):
    // every tcp_proxy and HTTP chain writes /dev/stdout but the blackhole chain (15001), and
    // virtualOutbound's own log takes the connections no chain does (`NR`).
    let outbound =
        config["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "virtualOutbound").unwrap();
    let chains = outbound["filter_chains"].as_array().unwrap();
    let silent: Vec<&serde_json::Value> =
        chains.iter().filter(|c| c["access_log"][0]["path"] != "/dev/stdout").collect();
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(
        (&silent[0]["destination_port"], &silent[0]["cluster"]),
        (&serde_json::json!(15001), &serde_json::json!("BlackHoleCluster"))
    );
    assert_eq!(
        (&outbound["access_log"]["path"], &outbound["access_log"]["only_flags"]),
        (&serde_json::json!("/dev/stdout"), &serde_json::json!(["NR"]))
    );
    let reports = reports(&config);
    assert!(!reports.iter().any(|l| l.contains("rejected")), "{reports:?}");
}

#[test]
fn the_real_httpbin_authorization_policy_denies_captured_connections_before_the_app_sees_them() {
    const TEST: &str = "xds_replay::httpbin_rbac";
    let Some(path) = dump_in_netns(TEST, "istio-authz-httpbin-sidecar-listeners.json") else { return };
    let dump = load(&path);
    let pods = netns::Pods::new();
    capture_rules(&pods.b);
    // httpbin's port 80 (an HTTP chain: its HTTP RBAC ALLOWs only method/path rules, which
    // never match at L4) and an undeclared port (virtualInbound's TCP chain: a network RBAC
    // with `rules: {}`, deny all).
    let http = netns::echo_server_in(&pods.b, "0.0.0.0:80");
    let tcp = netns::echo_server_in(&pods.b, "0.0.0.0:7777");
    let (_, _, b, _server) = replay(&pods.b, snapshot(&dump), &[CLUSTER, LISTENER], &CAPTURE);
    let request = b"GET /info HTTP/1.1\r\nHost: httpbin\r\n\r\n".as_slice();
    for (port, bytes) in [(80, request), (7777, b"ping".as_slice())] {
        let mut client =
            netns::connect_in(&pods.a, &format!("{}:{port}", netns::B_IP)).expect("connect to B");
        client.set_read_timeout(Some(common::DEADLINE)).unwrap();
        client.write_all(bytes).unwrap();
        common::assert_closed_empty(
            &mut client,
            &format!("httpbin port {port} under its AuthorizationPolicy"),
        );
    }
    b.wait_for_scrape("both denials counted", |t| common::sum(t, "ringside_rbac_denied_total", &[]) == 2.0);
    assert!(http.try_recv().is_err() && tcp.try_recv().is_err(), "the app saw a denied connection");
}

/// `ringside iptables --apply` inside `ns` (as root, as Istio's init container runs it).
fn capture_rules(ns: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, common::bin(), "iptables", "--apply"])
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables --apply in {ns}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn inbound_traffic_captured_to_the_real_dsb_virtual_inbound_reaches_the_app_and_is_counted() {
    const TEST: &str = "xds_replay::dsb_inbound";
    let Some(path) = dump_in_netns(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    let dump = load(&path);
    let pods = netns::Pods::new();
    capture_rules(&pods.b);
    // A port the pod's service does not declare: virtualInbound's plaintext passthrough chain
    // (istio_authn, the exchange, istio.stats, tcp_proxy to InboundPassthroughClusterIpv4).
    let app = netns::echo_server_in(&pods.b, "0.0.0.0:7777");
    let (_, _, b, _server) = replay(&pods.b, snapshot(&dump), &[CLUSTER, LISTENER, ENDPOINTS], &CAPTURE);
    let client = netns::connect_in(&pods.a, &format!("{}:7777", netns::B_IP)).expect("connect to B");
    assert_eq!(common::echo_back(client, b"geo?"), b"geo?");
    assert!(app.recv_timeout(common::DEADLINE).is_ok(), "the app got the connection");
    // Counted as the chain says (istio.stats), apart from the probes of the capture ports
    // (loops, closed as BlackHoleCluster, UH).
    let served =
        [("reporter", "destination"), ("response_flags", "-"), ("destination_workload", "replay-v1")];
    let text = b.wait_for_scrape("the connection counted", |t| {
        common::sum(t, "istio_tcp_connections_closed_total", &served) == 1.0
    });
    assert_eq!(common::sum(&text, "istio_tcp_received_bytes_total", &served), 4.0, "{text}");
    assert_eq!(common::sum(&text, "istio_tcp_sent_bytes_total", &served), 4.0, "{text}");
}

// Envoy as the reference (SPEC §9): the same dump, less what only Istio's proxy has, served
// over the same ADS server to a real Envoy 1.40 in the same pod, and the same connections
// made through each.

/// Istio's own extensions, which an upstream Envoy does not have: `istio.*` filters
/// (stats, metadata exchange as a network, listener, cluster or null-VM Wasm HTTP filter,
/// `istio.alpn`), `istio_authn`, the ambient HTTP filters, and any type only Istio defines.
fn istio_only(
    name: &str,
    config: Option<&envoy_types::pb::google::protobuf::Any>,
    opaque: &BTreeSet<String>,
) -> bool {
    let ty = config.map_or("", |a| a.type_url.rsplit('/').next().unwrap_or(""));
    name.starts_with("istio")
        || ["connect_authority", "connect_baggage", "set_dst_address"].contains(&name)
        || opaque.contains(ty)
        || ty == "envoy.extensions.filters.http.wasm.v3.Wasm"
}

/// A TLS transport socket with its SDS secrets fetched over ADS (istiod names the agent's
/// `sds-grpc` pipe, which the reference has not).
fn tls_over_ads(ts: &mut Option<envoy_types::pb::envoy::config::core::v3::TransportSocket>) {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    let Some(ConfigType::TypedConfig(any)) = ts.as_mut().and_then(|t| t.config_type.as_mut()) else { return };
    if any.type_url.ends_with(".DownstreamTlsContext") {
        let mut d = tls::DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        d.common_tls_context = d.common_tls_context.map(ads::secrets_over_ads);
        any.value = d.encode_to_vec();
    } else if any.type_url.ends_with(".UpstreamTlsContext") {
        let mut u = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        u.common_tls_context = u.common_tls_context.map(ads::secrets_over_ads);
        any.value = u.encode_to_vec();
    }
}

/// What upstream Envoy can be given of `dump`: Istio-only extensions stripped
/// ([`istio_only`]), SDS over ADS with `certs` as the secrets `default` and `ROOTCA`, RDS
/// route configurations inlined from the dump (this ADS server does not serve RDS); with
/// `lua` false, the Lua HTTP filters are stripped too. The rest is as istiod sent it.
fn for_envoy(dump: &Dump, certs: &Certs, lua: bool) -> Snapshot {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use hcm::http_connection_manager::RouteSpecifier;
    let mut listeners = dump.listeners.clone();
    for l in &mut listeners {
        l.listener_filters.retain(|f| {
            let any = match &f.config_type {
                Some(lds::listener_filter::ConfigType::TypedConfig(a)) => Some(a),
                _ => None,
            };
            !istio_only(&f.name, any, &dump.opaque)
        });
        for c in l.filter_chains.iter_mut().chain(l.default_filter_chain.as_mut()) {
            c.filters.retain(|f| {
                let any = match &f.config_type {
                    Some(lds::filter::ConfigType::TypedConfig(a)) => Some(a),
                    _ => None,
                };
                !istio_only(&f.name, any, &dump.opaque)
            });
            for f in &mut c.filters {
                let Some(lds::filter::ConfigType::TypedConfig(any)) = &mut f.config_type else { continue };
                if !any.type_url.ends_with(".HttpConnectionManager") {
                    continue;
                }
                let mut m = hcm::HttpConnectionManager::decode(any.value.as_slice()).unwrap();
                m.http_filters.retain(|h| {
                    let any = match &h.config_type {
                        Some(hcm::http_filter::ConfigType::TypedConfig(a)) => Some(a),
                        _ => None,
                    };
                    !istio_only(&h.name, any, &dump.opaque) && (lua || h.name != "envoy.filters.http.lua")
                });
                if let Some(RouteSpecifier::Rds(rds)) = &m.route_specifier
                    && let Some(rc) = dump.routes.iter().find(|r| r.name == rds.route_config_name)
                {
                    m.route_specifier = Some(RouteSpecifier::RouteConfig(rc.clone()));
                }
                // Per-route configs of the filters stripped above (istiod's `connect_authority`).
                if let Some(RouteSpecifier::RouteConfig(rc)) = &mut m.route_specifier {
                    for vh in &mut rc.virtual_hosts {
                        vh.typed_per_filter_config.retain(|k, v| !istio_only(k, Some(v), &dump.opaque));
                        for r in &mut vh.routes {
                            r.typed_per_filter_config.retain(|k, v| !istio_only(k, Some(v), &dump.opaque));
                        }
                    }
                }
                any.value = m.encode_to_vec();
            }
            tls_over_ads(&mut c.transport_socket);
        }
    }
    let mut clusters = dump.clusters.clone();
    for c in &mut clusters {
        c.filters.retain(|f| !istio_only(&f.name, f.typed_config.as_ref(), &dump.opaque));
        tls_over_ads(&mut c.transport_socket);
        for m in &mut c.transport_socket_matches {
            tls_over_ads(&mut m.transport_socket);
        }
    }
    Snapshot {
        version: "1".into(),
        clusters,
        endpoints: dump.endpoints.clone(),
        listeners,
        secrets: ads::workload_secrets(
            &certs.p("cert-chain.pem"),
            &certs.p("key.pem"),
            &certs.p("root-cert.pem"),
        ),
    }
}

/// A real Envoy in `ns` as istio-proxy (uid 1337, which the capture rules exclude), its ADS
/// server the unix socket `ads` (`unix:PATH`), admin on 127.0.0.1:15000 as in a pod.
struct EnvoyIn {
    child: std::process::Child,
    ns: String,
    log: PathBuf,
}

impl EnvoyIn {
    /// Start it; with `ready`, wait until its /ready says 200.
    fn spawn(ns: &str, bin: &str, ads: &str, ready: bool) -> EnvoyIn {
        let sock = ads.strip_prefix("unix:").unwrap();
        let bootstrap = format!(
            r#"node: {{id: "sidecar~{b}~geo-1.hr2~hr2.svc.cluster.local", cluster: geo.hr2}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config: {{"@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{sock}"}}}}}}}}]}}]
  - name: zipkin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: zipkin
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9411}}}}}}}}]}}]
"#,
            b = netns::B_IP
        );
        let path = std::env::temp_dir().join(format!("ringside-envoy-{ns}.yaml"));
        std::fs::write(&path, bootstrap).unwrap();
        let log = path.with_extension("log");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", bin])
            .args([
                "-c",
                path.to_str().unwrap(),
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "-l",
                "warning",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn envoy");
        let mut e = EnvoyIn { child, ns: ns.to_string(), log };
        if !ready {
            return e;
        }
        common::wait_for("envoy /ready", || {
            if let Some(status) = e.child.try_wait().unwrap() {
                panic!("envoy exited with {status}: {}", std::fs::read_to_string(&e.log).unwrap_or_default());
            }
            let admin: std::net::SocketAddr = "127.0.0.1:15000".parse().unwrap();
            let ready = in_ns(&e.ns, move || common::http(admin, "GET", "/ready"));
            (ready.map(|(c, _)| c) == Some(200)).then_some(())
        });
        e
    }
}

impl Drop for EnvoyIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The DSB pod's flows, made from pod A (inbound) and from inside pod B (outbound, captured),
/// each described as the far end saw it.
struct Flows {
    /// B's app on 7777: the source address of each connection it got.
    b_app: mpsc::Receiver<std::net::SocketAddr>,
    /// A's app on 7777.
    a_app: mpsc::Receiver<std::net::SocketAddr>,
    /// A's backends on :27017 at two mesh endpoints' addresses: (where, from, first byte).
    mongo: mpsc::Receiver<(std::net::SocketAddr, std::net::SocketAddr, u8)>,
}

/// Write `data`, read as many bytes back (or until the far end closes; a reset ends it too),
/// then half-close. The half-close comes after the answer: Envoy closes a connection whose
/// client half-closes while its listener filters (http_inspector) still wait for bytes.
fn send_and_read(mut c: std::net::TcpStream, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    c.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let _ = c.write_all(data);
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < data.len() {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = c.read_to_end(&mut got);
    got
}

/// The plaintext endpoint of `mongodb-user.hotel-res` (VIP 10.68.121.137) and the `tlsMode:
/// istio` endpoint of `mongodb-recommendation.hr2` (VIP 10.68.107.140), as the dump has them.
const MONGO_PLAIN: &str = "172.16.18.221";
const MONGO_MTLS: &str = "172.16.188.21";

impl Flows {
    fn new(pods: &netns::Pods) -> Flows {
        for ip in [MONGO_PLAIN, MONGO_MTLS] {
            netns::exec(&pods.a, &["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        }
        let listener = in_ns(&pods.a, || std::net::TcpListener::bind("0.0.0.0:27017").unwrap());
        let (tx, mongo) = mpsc::channel();
        common::serve_each(listener, move |mut s: std::net::TcpStream| {
            use std::io::Read;
            s.set_read_timeout(Some(common::DEADLINE)).unwrap();
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).is_err() {
                return;
            }
            let _ = tx.send((s.local_addr().unwrap(), s.peer_addr().unwrap(), first[0]));
            if first[0] != 0x16 && s.write_all(&first).is_ok() {
                common::echo_until_eof(s);
            }
        });
        Flows {
            b_app: netns::echo_server_in(&pods.b, "0.0.0.0:7777"),
            a_app: netns::echo_server_in(&pods.a, "0.0.0.0:7777"),
            mongo,
        }
    }

    /// Each flow and what the far end saw, in order.
    fn run(&self, pods: &netns::Pods) -> Vec<(&'static str, String)> {
        let echo = |ns: &str, to: String, app: &mpsc::Receiver<std::net::SocketAddr>| {
            let Ok(c) = netns::connect_in(ns, &to) else { return "refused".to_string() };
            // A line, so that Envoy's http_inspector can tell at once it is not HTTP
            // (istiod's `listener_filters_timeout: 0s` lets it wait forever on "ping").
            match send_and_read(c, b"hello\r\n").as_slice() {
                b"hello\r\n" => match app.recv_timeout(common::DEADLINE) {
                    Ok(from) => format!("echoed; the app saw {}", from.ip()),
                    Err(_) => "echoed by whom?".into(),
                },
                other => format!("closed after {} bytes", other.len()),
            }
        };
        let mongo = |to: &str| {
            let Ok(c) = netns::connect_in(&pods.b, to) else { return "refused".to_string() };
            let got = send_and_read(c, b"ping");
            match self.mongo.recv_timeout(common::DEADLINE) {
                Ok((at, from, 0x16)) => format!("a TLS ClientHello at {at} from {}", from.ip()),
                Ok((at, from, _)) => format!("{} bytes echoed by {at} to {}", got.len(), from.ip()),
                Err(_) => "no backend reached".into(),
            }
        };
        let closed = |ns: &str, to: String| {
            let Ok(mut c) = netns::connect_in(ns, &to) else { return "refused".to_string() };
            c.set_read_timeout(Some(common::DEADLINE)).unwrap();
            let _ = c.write_all(b"ping");
            let mut got = Vec::new();
            match std::io::Read::read_to_end(&mut c, &mut got) {
                Ok(_) | Err(_) if got.is_empty() => "closed".to_string(),
                _ => format!("{} bytes", got.len()),
            }
        };
        vec![
            ("inbound, undeclared port", echo(&pods.a, format!("{}:7777", netns::B_IP), &self.b_app)),
            ("inbound, nothing listening", closed(&pods.a, format!("{}:7778", netns::B_IP))),
            ("outbound passthrough", echo(&pods.b, format!("{}:7777", netns::A_IP), &self.a_app)),
            ("outbound EDS, plaintext endpoint", mongo("10.68.121.137:27017")),
            ("outbound EDS, tlsMode istio endpoint", mongo("10.68.107.140:27017")),
        ]
    }
}

#[test]
fn a_real_envoy_on_the_dsb_dump_reaches_the_same_backends_and_refuses_the_same_connections() {
    const TEST: &str = "xds_replay::dsb_envoy_reference";
    let Some(path) = dump_in_netns(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(TEST, "no Envoy binary (perf/fetch-envoy.sh failed)");
        return;
    };
    let dump = load(&path);
    let pods = netns::Pods::new();
    capture_rules(&pods.b);
    let flows = Flows::new(&pods);
    let expected = [
        ("inbound, undeclared port", "echoed; the app saw 127.0.0.6".to_string()),
        ("inbound, nothing listening", "closed".into()),
        ("outbound passthrough", format!("echoed; the app saw {}", netns::B_IP)),
        (
            "outbound EDS, plaintext endpoint",
            format!("4 bytes echoed by {MONGO_PLAIN}:27017 to {}", netns::B_IP),
        ),
        (
            "outbound EDS, tlsMode istio endpoint",
            format!("a TLS ClientHello at {MONGO_MTLS}:27017 from {}", netns::B_IP),
        ),
    ];
    // ringside, on what istiod sent.
    let ours = {
        let (_, _, _sidecar, _server) =
            replay(&pods.b, snapshot(&dump), &[CLUSTER, LISTENER, ENDPOINTS], &CAPTURE);
        flows.run(&pods)
    };
    assert_eq!(ours, expected, "ringside");
    // Envoy, on the same resources less Istio's own extensions: it rejects virtualInbound for
    // its Lua filter (as the Envoy that made the dump did); everything else loads.
    let ca = Ca::new("mesh");
    let certs = Certs::new(&format!("{}-envoy", pods.b), &ca, "spiffe://cluster.local/ns/hr2/sa/geo");
    let (tx, requests) = mpsc::channel();
    let server =
        AdsServer::start_for_sidecar(&format!("{}-envoy", pods.b), for_envoy(&dump, &certs, true), tx);
    let envoy = EnvoyIn::spawn(&pods.b, &bin, &server.unix_address(), true);
    let first = replies(&requests, &[CLUSTER, LISTENER]);
    assert_eq!(first.detail[CLUSTER], None, "Envoy takes every cluster");
    let nack = first.detail[LISTENER].clone().expect("Envoy rejects virtualInbound");
    assert!(nack.contains("virtualInbound") && nack.to_lowercase().contains("lua"), "{nack}");
    drop(envoy);
    drop(server);
    // Without the Lua filter (ringside runs no HTTP filter, SPEC §9), Envoy takes every
    // listener, and the same connections go where ringside sent them.
    let (tx, requests) = mpsc::channel();
    let server =
        AdsServer::start_for_sidecar(&format!("{}-envoy2", pods.b), for_envoy(&dump, &certs, false), tx);
    let _envoy = EnvoyIn::spawn(&pods.b, &bin, &server.unix_address(), true);
    let second = replies(&requests, &[CLUSTER, LISTENER]);
    assert_eq!((second.detail[CLUSTER].as_deref(), second.detail[LISTENER].as_deref()), (None, None));
    for listen in CAPTURE {
        common::wait_for("envoy's capture listeners", || netns::connect_in(&pods.b, listen).ok());
    }
    let theirs = flows.run(&pods);
    assert_eq!(theirs, ours, "Envoy as the reference");
}

#[test]
fn a_real_envoy_takes_every_httpbin_listener_but_the_one_whose_inline_route_names_a_cluster_the_dump_lacks() {
    const TEST: &str = "xds_replay::httpbin_envoy_reference";
    let Some(path) = dump_in_netns(TEST, "istio-authz-httpbin-sidecar-listeners.json") else { return };
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(TEST, "no Envoy binary (perf/fetch-envoy.sh failed)");
        return;
    };
    let dump = load(&path);
    let ns = Ns::new("httpbin-envoy");
    let ca = Ca::new("mesh");
    let certs = Certs::new(&ns.0, &ca, "spiffe://cluster.local/ns/default/sa/httpbin");
    let (tx, requests) = mpsc::channel();
    let server = AdsServer::start_for_sidecar(&ns.0, for_envoy(&dump, &certs, true), tx);
    // Not waited ready: the dump's HTTP chains ask for RDS routes it does not hold.
    let envoy = EnvoyIn::spawn(&ns.0, &bin, &server.unix_address(), false);
    let replies = replies(&requests, &[CLUSTER, LISTENER]);
    let log = std::fs::read_to_string(&envoy.log).unwrap_or_default();
    assert_eq!(replies.detail[CLUSTER], None, "no clusters in this dump: {log}");
    // Once Istio's extensions are out, Envoy takes every listener but one: the dump has no
    // clusters, and an inline route naming an unknown cluster fails Envoy's validation
    // (`validate_clusters` defaults to true for inline routes). ringside takes it, its
    // connections failing UH until the cluster arrives (the replay test above).
    assert_eq!(
        replies.detail[LISTENER].as_deref(),
        Some("Error adding/updating listener(s) connect_terminate: route: unknown cluster 'main_internal'\n"),
        "{log}"
    );
}

#[test]
fn outbound_http_to_a_service_address_the_real_dsb_routes_over_rds_reaches_its_endpoint() {
    const TEST: &str = "xds_replay::dsb_rds";
    let Some(path) = dump_in_netns(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    let dump = load(&path);
    let pods = netns::Pods::new();
    capture_rules(&pods.a);
    // kiali (istio-system, no sidecar: plaintext) is reached at ClusterIP 10.68.49.223:9090,
    // an HTTP port istiod serves through 0.0.0.0_9090, whose chain takes its route over RDS
    // (`9090`: one virtual host per service address). Its one endpoint lives in pod B.
    netns::exec(&pods.b, &["ip", "addr", "add", "172.16.18.214/32", "dev", "lo"]);
    let app = netns::echo_server_in(&pods.b, "0.0.0.0:9090");
    let (_, _, a, _server) =
        replay(&pods.a, snapshot(&dump), &[CLUSTER, LISTENER, ENDPOINTS, ROUTES], &CAPTURE);
    let client = netns::connect_in(&pods.a, "10.68.49.223:9090").expect("connect to kiali's ClusterIP");
    // HTTP/1.1: http_inspector finds it, the HTTP chain routes it by its virtual host.
    let request = b"GET /kiali/api HTTP/1.1\r\nHost: kiali.istio-system:9090\r\n\r\n";
    assert_eq!(common::echo_back(client, request), request);
    assert!(app.recv_timeout(common::DEADLINE).is_ok(), "kiali's endpoint got the connection");
    // Counted as the HTTP chain says (istio.stats among its HTTP filters), to kiali's service.
    let to_kiali = [("reporter", "source"), ("destination_service", "kiali.istio-system.svc.cluster.local")];
    let text = a.wait_for_scrape("the connection counted", |t| {
        common::sum(t, "istio_tcp_connections_closed_total", &to_kiali) == 1.0
    });
    assert_eq!(common::sum(&text, "istio_tcp_sent_bytes_total", &to_kiali), request.len() as f64, "{text}");
}
