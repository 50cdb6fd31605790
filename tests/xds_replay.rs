//! SPEC §9 against what a real istiod sends: the three Envoy `/config_dump`s of Istio sidecars
//! in `../shared/istio-xds-dumps/` (Istio 1.15-1.18), their JSON turned into protobuf here
//! (against the FileDescriptorSet envoy-types ships; Istio-only types carried as opaque
//! `Any`), served over ADS to the real binary in a network namespace of its own (the dumps
//! bind 15001 and 15006). Each test asserts exactly which resources are applied and which
//! NACKed with which reason, that the pod becomes ready, and what virtualInbound serves; the
//! DSB dump's RouteConfigurations are served over RDS, and an HTTP port it routes that way
//! takes outbound traffic to the endpoint of the service its virtual host names.
//! Without the dumps, or without namespaces, each test prints a SKIP line and returns.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pki.rs"]
mod pki;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use ads::{AdsServer, CLUSTER, ENDPOINTS, LISTENER, ROUTES, Snapshot, cds, eds, lds, rds};
use envoy_types::pb::envoy::admin::v3 as admin;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use netns::{Sidecar, in_ns};
use pki::{Ca, Certs};
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

/// istiod's capture listeners, virtualOutbound and virtualInbound, reached from inside the pod.
const CAPTURE: [&str; 2] = ["127.0.0.1:15001", "127.0.0.1:15006"];

/// The dump `file` in `../shared/istio-xds-dumps`, or None (after one SKIP line naming the
/// folder) when it is absent.
fn dump_file(test: &str, file: &str) -> Option<PathBuf> {
    Some(common::shared("istio-xds-dumps", test)?.join(file))
}

/// envoy-types' FileDescriptorSet of every Envoy proto (`src/generated/types.bin` in its
/// crate directory, found through `cargo metadata`).
fn envoy_pool() -> DescriptorPool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types in cargo metadata");
    let bin = PathBuf::from(manifest).parent().unwrap().join("src/generated/types.bin");
    DescriptorPool::decode(std::fs::read(&bin).unwrap().as_slice()).unwrap()
}

/// Every `@type` in `json`.
fn type_urls(json: &serde_json::Value, out: &mut BTreeSet<String>) {
    match json {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(t)) = o.get("@type") {
                out.insert(t.clone());
            }
            o.values().for_each(|v| type_urls(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| type_urls(v, out)),
        _ => {}
    }
}

/// The resources of one dump, as istiod sent them.
#[derive(Default)]
struct Dump {
    listeners: Vec<lds::Listener>,
    clusters: Vec<cds::Cluster>,
    endpoints: Vec<eds::ClusterLoadAssignment>,
    /// RouteConfigurations (RDS).
    routes: Vec<rds::RouteConfiguration>,
    /// Istio-only types carried as opaque `Any` (an empty message of that name).
    opaque: BTreeSet<String>,
}

/// Parse a `/config_dump` (`envoy.admin.v3.ConfigDump` in JSON): types the pool lacks
/// (Istio's `stats.PluginConfig`, `istio.*`) become empty messages of their name, so their
/// `Any` keeps its type URL and drops its body (ringside reads those filters by name only).
/// A listener Envoy rejected (`error_state`) is served as what istiod sent for it.
fn load(path: &std::path::Path) -> Dump {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut pool = envoy_pool();
    let mut urls = BTreeSet::new();
    type_urls(&json, &mut urls);
    let mut dump = Dump::default();
    for url in urls {
        let name = url.rsplit('/').next().unwrap().to_string();
        if pool.get_message_by_name(&name).is_some() {
            continue;
        }
        let (package, message) = name.rsplit_once('.').unwrap_or(("", &name));
        let file = prost_types::FileDescriptorProto {
            name: Some(format!("opaque/{name}.proto")),
            package: (!package.is_empty()).then(|| package.to_string()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some(message.to_string()),
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        pool.add_file_descriptor_proto(file).unwrap();
        dump.opaque.insert(name);
    }
    let desc = pool.get_message_by_name("envoy.admin.v3.ConfigDump").unwrap();
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let msg =
        DynamicMessage::deserialize_with_options(desc, json, &options).expect("the dump as a ConfigDump");
    let config = admin::ConfigDump::decode(msg.encode_to_vec().as_slice()).unwrap();
    let mut names = BTreeSet::new();
    for any in &config.configs {
        match any.type_url.rsplit('/').next().unwrap() {
            "envoy.admin.v3.ListenersConfigDump" => {
                let d = admin::ListenersConfigDump::decode(any.value.as_slice()).unwrap();
                for l in d.dynamic_listeners {
                    let sent = l
                        .active_state
                        .and_then(|s| s.listener)
                        .or(l.error_state.and_then(|e| e.failed_configuration));
                    let pb = lds::Listener::decode(sent.expect("a listener").value.as_slice()).unwrap();
                    // Envoy dumps a rejected listener twice: serve it once.
                    if names.insert(pb.name.clone()) {
                        dump.listeners.push(pb);
                    }
                }
            }
            "envoy.admin.v3.ClustersConfigDump" => {
                let d = admin::ClustersConfigDump::decode(any.value.as_slice()).unwrap();
                for c in d.dynamic_active_clusters {
                    dump.clusters.push(cds::Cluster::decode(c.cluster.unwrap().value.as_slice()).unwrap());
                }
            }
            "envoy.admin.v3.RoutesConfigDump" => {
                let d = admin::RoutesConfigDump::decode(any.value.as_slice()).unwrap();
                for r in d.dynamic_route_configs {
                    let rc = r.route_config.unwrap().value;
                    dump.routes.push(rds::RouteConfiguration::decode(rc.as_slice()).unwrap());
                }
            }
            "envoy.admin.v3.EndpointsConfigDump" => {
                let d = admin::EndpointsConfigDump::decode(any.value.as_slice()).unwrap();
                for e in d.dynamic_endpoint_configs {
                    let cla = e.endpoint_config.unwrap().value;
                    dump.endpoints.push(eds::ClusterLoadAssignment::decode(cla.as_slice()).unwrap());
                }
            }
            _ => {}
        }
    }
    dump
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
    let Some(path) = dump_file(TEST, "istio-authz-httpbin-sidecar-listeners.json") else { return };
    if netns::unavailable(TEST).is_some() {
        return;
    }
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
    let Some(path) = dump_file(TEST, "istio-istioctl-bookinfo-sidecar-endpoints.json") else { return };
    if netns::unavailable(TEST).is_some() {
        return;
    }
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
    let Some(path) = dump_file(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    if netns::unavailable(TEST).is_some() {
        return;
    }
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
    let Some(path) = dump_file(TEST, "istio-authz-httpbin-sidecar-listeners.json") else { return };
    if netns::unavailable(TEST).is_some() {
        return;
    }
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
    let Some(path) = dump_file(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    if netns::unavailable(TEST).is_some() {
        return;
    }
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

#[test]
fn outbound_http_to_a_service_address_the_real_dsb_routes_over_rds_reaches_its_endpoint() {
    const TEST: &str = "xds_replay::dsb_rds";
    let Some(path) = dump_file(TEST, "dsb-hotelres-geo-sidecar-istio-1.18.2.json") else { return };
    if netns::unavailable(TEST).is_some() {
        return;
    }
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
