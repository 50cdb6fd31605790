//! SPEC §9: ringside configured over xDS by an Aggregated Discovery Service (in this test
//! process: tonic, serving Istio-shaped resources), with the real binary and real sockets:
//! traffic follows weighted tcp routes, updates reach new connections within a second while
//! live ones keep their route, EDS-only changes, NACKs keep the last good config, listener
//! removal, reconnect after the server restarts, the node as Istio's agent sends it, and
//! metrics labelled from endpoint metadata.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ads::{
    AdsServer, CLUSTER, ENDPOINTS, LISTENER, Snapshot, assignment, eds_cluster, reply_to, tcp_listener,
};
use common::{DEADLINE, Ringside, free_addr, sum, tag_server, wait_for};
use envoy::{Envoy, envoy_binary};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::value::Kind;

const HOST: &str = "mongodb.default.svc.cluster.local";
const V1: &str = "outbound|27017|v1|mongodb.default.svc.cluster.local";
const V2: &str = "outbound|27017|v2|mongodb.default.svc.cluster.local";

/// Connect and read the backend's 2-byte tag; `None` if refused or closed.
fn tag_of(addr: SocketAddr) -> Option<(String, TcpStream)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).ok()?;
    Some((String::from_utf8_lossy(&tag).into_owned(), s))
}

struct Mesh {
    v1: SocketAddr,
    v2: SocketAddr,
    listen: SocketAddr,
}

impl Mesh {
    fn new() -> Mesh {
        Mesh { v1: tag_server("v1"), v2: tag_server("v2"), listen: free_addr() }
    }

    /// Istio's shape: two subset clusters over EDS, a listener splitting by weight.
    fn snapshot(&self, version: &str, routes: &[(&str, u32)]) -> Snapshot {
        Snapshot {
            version: version.into(),
            clusters: vec![eds_cluster(V1, HOST, "default"), eds_cluster(V2, HOST, "default")],
            endpoints: vec![
                assignment(V1, &[(self.v1, "mongodb-v1;default;mongodb;v1;Kubernetes")]),
                assignment(V2, &[(self.v2, "mongodb-v2;default;mongodb;v2;Kubernetes")]),
            ],
            listeners: vec![tcp_listener(&format!("127.0.0.1_{}", self.listen.port()), self.listen, routes)],
            secrets: vec![],
        }
    }
}

const NODE: &str = "node:
  id: sidecar~127.0.0.1~ratings-v2-7d9f.default~default.svc.cluster.local
  workload_name: ratings-v2
  namespace: default
  labels: {app: ratings, version: v2}
  cluster_id: Kubernetes
  mesh_id: cluster.local
  service_account: bookinfo-ratings-v2
  istio_version: 1.24.0
";

/// ringside with only `xds:` and a node: no static listeners.
fn ringside(server: SocketAddr, extra: &str) -> Ringside {
    let config = format!("{NODE}drain_timeout: 1s\nxds: {{address: {server}}}\n{extra}");
    Ringside::spawn_config(&config, server, &["--workers", "2"])
}

/// Tags of `n` new connections.
fn split(addr: SocketAddr, n: usize) -> (usize, usize) {
    let mut counts = (0, 0);
    for _ in 0..n {
        let (tag, _) = tag_of(addr).unwrap_or_else(|| {
            let mut s = TcpStream::connect(addr).expect("connect through ringside");
            let mut got = Vec::new();
            let r = s.read_to_end(&mut got);
            panic!("connection through ringside: read {r:?} {got:?}")
        });
        match tag.as_str() {
            "v1" => counts.0 += 1,
            _ => counts.1 += 1,
        }
    }
    counts
}

/// Wait until a new connection reaches `tag`.
fn until_tag(addr: SocketAddr, tag: &str) {
    wait_for(&format!("a new connection to reach {tag}"), || {
        tag_of(addr).filter(|(t, _)| t == tag).map(|_| ())
    });
}

/// Wait until 20 new connections in a row (on every worker) reach `tag`; returns how long
/// it took until the first of them.
fn until_all(addr: SocketAddr, tag: &str) -> Duration {
    let start = Instant::now();
    let mut run_began = None;
    let mut run = 0;
    wait_for(&format!("every new connection to reach {tag}"), || {
        let t = Instant::now();
        match tag_of(addr) {
            Some((got, _)) if got == tag => {
                run_began.get_or_insert(t);
                run += 1;
            }
            _ => {
                run_began = None;
                run = 0;
            }
        }
        (run >= 20).then_some(())
    });
    run_began.unwrap_or(start).duration_since(start)
}

/// Wait for the replies (ACK or NACK) to every type's response of `version`.
fn replies(requests: &mpsc::Receiver<DiscoveryRequest>, version: &str) -> Vec<DiscoveryRequest> {
    let mut got: Vec<DiscoveryRequest> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while [CLUSTER, ENDPOINTS, LISTENER].iter().any(|t| !got.iter().any(|r| r.type_url == *t)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = requests
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("replies to version {version}: got {got:?}"));
        if !r.response_nonce.is_empty() && (r.version_info == version || r.error_detail.is_some()) {
            got.push(r);
        }
    }
    got
}

#[test]
fn traffic_follows_the_weighted_tcp_routes_and_metrics_come_from_the_endpoint_metadata() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 80), (V2, 20)]));
    let rs = ringside(server.addr, "");
    for ack in replies(&requests, "1") {
        assert!(ack.error_detail.is_none(), "{}: {:?}", ack.type_url, ack.error_detail);
    }
    wait_for("the xDS listener to accept", || tag_of(mesh.listen));
    let n = 300;
    let (v1, v2) = split(mesh.listen, n);
    // 80/20 of 300: 240 expected, sigma ~6.9; 5 sigma either way.
    assert!((205..=275).contains(&v1), "v1 {v1}, v2 {v2}");
    let total = (n + 1) as f64;
    let scrape = rs.wait_for_value("istio_tcp_connections_closed_total", &[("reporter", "source")], total);
    // The peer from `istio.workload` (no exchange: plaintext, alpn): app and version unknown.
    for (workload, revision) in [("mongodb-v1", "v1"), ("mongodb-v2", "v2")] {
        let labels = [
            ("destination_workload", workload),
            ("destination_workload_namespace", "default"),
            ("destination_canonical_service", "mongodb"),
            ("destination_canonical_revision", revision),
            ("destination_cluster", "Kubernetes"),
            ("destination_app", "unknown"),
            ("destination_version", "unknown"),
            ("destination_service", HOST),
            ("destination_service_name", "mongodb"),
            ("destination_service_namespace", "default"),
            ("source_workload", "ratings-v2"),
            ("response_flags", "-"),
        ];
        assert!(sum(&scrape, "istio_tcp_connections_opened_total", &labels) > 0.0, "{workload}:\n{scrape}");
    }
    let v1_seen =
        sum(&scrape, "istio_tcp_connections_opened_total", &[("destination_workload", "mongodb-v1")]);
    let v2_seen =
        sum(&scrape, "istio_tcp_connections_opened_total", &[("destination_workload", "mongodb-v2")]);
    assert_eq!(v1_seen + v2_seen, total, "{scrape}");
    assert!(
        v1_seen == (v1 + 1) as f64 || v2_seen == (v2 + 1) as f64,
        "the warm-up connection is one of them"
    );
    assert_eq!(sum(&scrape, "ringside_xds_connects_total", &[]), 1.0);
    // /config_dump shows the xDS-derived config with each resource's version, and what is
    // valid but not served.
    let (_, dump) = common::http(rs.admin, "GET", "/config_dump").unwrap();
    let port = mesh.listen.port();
    assert!(dump.contains(&format!("\"source\": \"xds Listener/127.0.0.1_{port} version 1\"")), "{dump}");
    assert!(
        dump.contains(&format!("xds Cluster/{V1} version 1, ClusterLoadAssignment/{V1} version 1")),
        "{dump}"
    );
    assert_eq!(sum(&scrape, "ringside_xds_updates_applied_total", &[("type", "Listener")]), 1.0);
    assert_eq!(sum(&scrape, "ringside_xds_updates_rejected_total", &[]), 0.0);
}

#[test]
fn the_node_is_sent_as_istios_agent_sends_it() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let _rs = ringside(server.addr, "");
    let first = requests.recv_timeout(DEADLINE).expect("a request");
    let node = first.node.expect("node");
    assert_eq!(node.id, "sidecar~127.0.0.1~ratings-v2-7d9f.default~default.svc.cluster.local");
    assert_eq!(node.cluster, "ratings-v2.default");
    let meta = node.metadata.expect("metadata").fields;
    let string = |k: &str| match meta.get(k).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    for (k, v) in [
        ("NAMESPACE", "default"),
        ("NAME", "ratings-v2-7d9f"),
        ("WORKLOAD_NAME", "ratings-v2"),
        ("CLUSTER_ID", "Kubernetes"),
        ("MESH_ID", "cluster.local"),
        ("ISTIO_VERSION", "1.24.0"),
        ("SERVICE_ACCOUNT", "bookinfo-ratings-v2"),
        ("INTERCEPTION_MODE", "REDIRECT"),
    ] {
        assert_eq!(string(k), v, "{k}");
    }
    let Some(Kind::StructValue(labels)) = meta.get("LABELS").and_then(|v| v.kind.clone()) else {
        panic!("LABELS")
    };
    let label = |k: &str| labels.fields.get(k).and_then(|v| v.kind.clone());
    assert_eq!(label("app"), Some(Kind::StringValue("ratings".into())));
    assert_eq!(label("version"), Some(Kind::StringValue("v2".into())));
    // Clusters and Listeners are wildcard subscriptions.
    assert!(first.resource_names.is_empty());
    // The node goes on a stream's first request only, as Istio's agent sends it.
    let later = requests.recv_timeout(DEADLINE).expect("a second request");
    assert_eq!(later.node, None, "{later:?}");
}

/// A TCP relay to `to` that forwards both ways until `freeze` is set; then the connections it
/// holds go silent (open, nothing forwarded), as a dead network path or a stopped istiod
/// looks. New connections after that are relayed again.
fn freezable_relay(to: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let freeze = std::sync::Arc::new(AtomicBool::new(false));
    let frozen = freeze.clone();
    std::thread::spawn(move || {
        for down in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(to) else { continue };
            let born_frozen = frozen.load(Ordering::Acquire);
            for (mut from, mut into) in [(down.try_clone().unwrap(), up.try_clone().unwrap()), (up, down)] {
                let frozen = frozen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        // Frozen: keep reading (so nothing backs up) but forward nothing.
                        let silent = frozen.load(Ordering::Acquire) && !born_frozen;
                        if !silent && into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    (addr, freeze)
}

#[test]
fn a_frozen_xds_peer_is_noticed_by_http2_keepalive_and_the_stream_reopened() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let (relay, freeze) = freezable_relay(server.addr);
    let config = format!("{NODE}xds: {{address: {relay}, keepalive_interval: 1s, keepalive_timeout: 1s}}\n");
    let rs = Ringside::spawn_config(&config, relay, &["--workers", "1"]);
    reply_to(&requests, LISTENER, "1");
    wait_for("the xDS listener to accept", || tag_of(mesh.listen));
    assert_eq!(sum(&rs.scrape(), "ringside_xds_connects_total", &[]), 1.0);
    freeze.store(true, std::sync::atomic::Ordering::Release);
    // Unanswered PINGs end the silent stream; the new one goes through the relay again.
    rs.wait_for_value("ringside_xds_connects_total", &[], 2.0);
    let hello = wait_for("the first request of the new stream", || {
        requests.recv_timeout(DEADLINE).ok().filter(|r| r.type_url == CLUSTER && r.response_nonce.is_empty())
    });
    assert!(hello.node.is_some(), "the node again on the new stream's first request");
    assert_eq!(split(mesh.listen, 3), (3, 0), "the last good config served throughout");
}

#[test]
fn an_update_reaches_new_connections_within_a_second_while_a_live_connection_keeps_its_route() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let rs = ringside(server.addr, "");
    reply_to(&requests, LISTENER, "1");
    let (tag, mut live) = wait_for("the xDS listener to accept", || tag_of(mesh.listen));
    assert_eq!(tag, "v1");
    server.push(mesh.snapshot("2", &[(V2, 100)]));
    let ack = reply_to(&requests, LISTENER, "2");
    assert!(ack.error_detail.is_none());
    let took = until_all(mesh.listen, "v2");
    assert!(took < Duration::from_secs(1), "the update took {took:?} to reach every new connection");
    // The live connection still relays, to v1, and is counted under v1 when it closes.
    live.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    live.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    // Counted under v1 at close: all v1 connections but the live one are closed, then it too.
    let v1 = [("destination_workload", "mongodb-v1")];
    let opened = sum(&rs.scrape(), "istio_tcp_connections_opened_total", &v1);
    rs.wait_for_value("istio_tcp_connections_closed_total", &v1, opened - 1.0);
    drop(live);
    rs.wait_for_value("istio_tcp_connections_closed_total", &v1, opened);
}

#[test]
fn an_endpoints_only_change_moves_new_connections() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let _rs = ringside(server.addr, "");
    reply_to(&requests, LISTENER, "1");
    wait_for("the xDS listener to accept", || tag_of(mesh.listen).filter(|(t, _)| t == "v1"));
    // Only the v1 subset's endpoints change: to a new backend.
    let v1b = tag_server("vb");
    let mut s = mesh.snapshot("2", &[(V1, 100)]);
    s.endpoints[0] = assignment(V1, &[(v1b, "mongodb-v1b;default;mongodb;v1;Kubernetes")]);
    server.push(s);
    let ack = reply_to(&requests, ENDPOINTS, "2");
    assert!(ack.error_detail.is_none());
    assert!(ack.resource_names.contains(&V1.to_string()), "{:?}", ack.resource_names);
    until_tag(mesh.listen, "vb");
}

#[test]
fn an_invalid_listener_is_nacked_naming_it_and_the_last_good_config_keeps_serving() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let rs = ringside(server.addr, "");
    reply_to(&requests, LISTENER, "1");
    wait_for("the xDS listener to accept", || tag_of(mesh.listen));
    // A weight of 0: invalid (SPEC §9).
    server.push(mesh.snapshot("2", &[(V2, 0), (V1, 1)]));
    let nack = reply_to(&requests, LISTENER, "2");
    let detail = nack.error_detail.expect("a NACK");
    let name = format!("Listener/127.0.0.1_{}", mesh.listen.port());
    assert!(detail.message.contains(&name) && detail.message.contains("weight 0"), "{}", detail.message);
    assert_eq!(nack.version_info, "1", "a NACK names the last good version");
    // A tcp_proxy without a cluster: invalid too.
    let mut s = mesh.snapshot("3", &[(V1, 100)]);
    s.listeners[0] = tcp_listener(&format!("127.0.0.1_{}", mesh.listen.port()), mesh.listen, &[("", 1)]);
    server.push(s);
    let nack = reply_to(&requests, LISTENER, "3");
    assert!(nack.error_detail.expect("a NACK").message.contains("without a cluster"));
    // A listener on an address another process holds: it cannot bind, NACKed as Envoy does.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = mesh.snapshot("4", &[(V1, 100)]);
    s.listeners.push(tcp_listener("taken", taken.local_addr().unwrap(), &[(V2, 100)]));
    server.push(s);
    let nack = reply_to(&requests, LISTENER, "4");
    let detail = nack.error_detail.expect("a NACK").message;
    assert!(detail.contains("Listener/taken: cannot bind"), "{detail}");
    // Still served by version 1: every connection to v1.
    assert_eq!(split(mesh.listen, 10), (10, 0));
    let scrape = rs.scrape();
    assert_eq!(sum(&scrape, "ringside_xds_updates_rejected_total", &[("type", "Listener")]), 3.0);
}

#[test]
fn each_resource_stands_alone_the_valid_ones_apply_and_the_nack_names_every_invalid_one() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let rs = ringside(server.addr, "");
    reply_to(&requests, LISTENER, "1");
    until_tag(mesh.listen, "v1");
    // Version 2: the listener moves to v2 (valid) beside two new invalid ones.
    let (zero, none) = (free_addr(), free_addr());
    let mut s = mesh.snapshot("2", &[(V2, 100)]);
    s.listeners.push(tcp_listener("weight-zero", zero, &[(V2, 0), (V1, 1)]));
    s.listeners.push(tcp_listener("no-cluster", none, &[("", 1)]));
    server.push(s);
    let nack = reply_to(&requests, LISTENER, "2");
    let detail = nack.error_detail.expect("a NACK").message;
    assert_eq!(
        detail,
        "Listener/weight-zero: filter chain 0: tcp_proxy weighted_clusters: cluster \
         outbound|27017|v2|mongodb.default.svc.cluster.local: weight 0; \
         Listener/no-cluster: filter chain 0: tcp_proxy without a cluster",
        "every invalid resource, in the response's order"
    );
    assert_eq!(nack.version_info, "1", "the last version accepted whole, as Envoy");
    until_all(mesh.listen, "v2");
    assert!(TcpStream::connect(zero).is_err() && TcpStream::connect(none).is_err(), "never bound");
    let (config, listener) = (rs.admin, [("type", "Listener")]);
    let dump = common::http(config, "GET", "/config_dump").expect("config_dump").1;
    assert!(dump.contains("rejected: Listener/weight-zero: filter chain 0"), "{dump}");
    let scrape = rs.scrape();
    assert_eq!(
        sum(&scrape, "ringside_xds_updates_rejected_total", &listener),
        1.0,
        "applied, with rejections"
    );
    assert_eq!(sum(&scrape, "ringside_xds_updates_applied_total", &listener), 1.0);
    // Version 3 fixes both: applied whole, ACKed, all three bound.
    let mut s = mesh.snapshot("3", &[(V2, 100)]);
    s.listeners.push(tcp_listener("weight-zero", zero, &[(V2, 1), (V1, 1)]));
    s.listeners.push(tcp_listener("no-cluster", none, &[(V1, 1)]));
    server.push(s);
    assert!(reply_to(&requests, LISTENER, "3").error_detail.is_none());
    assert_eq!(wait_for("the fixed listener to accept", || tag_of(none)).0, "v1");
}

#[test]
fn a_removed_listener_stops_accepting_at_once_and_drains_its_connections() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1", &[(V1, 100)]));
    let _rs = ringside(server.addr, "");
    reply_to(&requests, LISTENER, "1");
    let (_, mut live) = wait_for("the xDS listener to accept", || tag_of(mesh.listen));
    let mut s = mesh.snapshot("2", &[(V1, 100)]);
    s.listeners.clear();
    server.push(s);
    reply_to(&requests, LISTENER, "2");
    let removed = Instant::now();
    wait_for("the removed listener to refuse", || TcpStream::connect(mesh.listen).is_err().then_some(()));
    assert!(removed.elapsed() < Duration::from_secs(1), "took {:?}", removed.elapsed());
    // The live connection keeps working while it drains...
    live.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    live.read_exact(&mut back).unwrap();
    // ...and is closed at drain_timeout (1 s).
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
    let drained = removed.elapsed();
    assert!(drained >= Duration::from_millis(900) && drained < DEADLINE, "closed after {drained:?}");
}

#[test]
fn it_reconnects_after_the_server_restarts_and_serves_the_last_good_config_meanwhile() {
    let mesh = Mesh::new();
    let (tx, requests) = mpsc::channel();
    let addr = free_addr();
    let server = AdsServer::start(addr, mesh.snapshot("1", &[(V1, 100)]), tx.clone());
    let rs = ringside(server.addr, "");
    reply_to(&requests, LISTENER, "1");
    wait_for("the xDS listener to accept", || tag_of(mesh.listen));
    server.stop();
    rs.wait_for_value("ringside_xds_connected", &[], 0.0);
    // The last good config keeps serving.
    assert_eq!(split(mesh.listen, 5), (5, 0));
    let server = AdsServer::start(addr, mesh.snapshot("2", &[(V2, 100)]), tx);
    // The versions held are sent on the new stream, as Envoy does.
    let hello = wait_for("a request on the new stream", || {
        requests.recv_timeout(DEADLINE).ok().filter(|r| r.type_url == LISTENER && r.response_nonce.is_empty())
    });
    assert_eq!(hello.version_info, "1");
    reply_to(&requests, LISTENER, "2");
    until_tag(mesh.listen, "v2");
    assert_eq!(sum(&rs.scrape(), "ringside_xds_connects_total", &[]), 2.0);
    drop(server);
}

/// Replies to `version`, checked: the Listener one is a NACK when `listener_nack`, every
/// other one an ACK.
fn expect_replies(
    requests: &mpsc::Receiver<DiscoveryRequest>,
    version: &str,
    listener_nack: bool,
    who: &str,
) {
    for r in replies(requests, version) {
        let nack = r.error_detail.is_some();
        let want = listener_nack && r.type_url == LISTENER;
        assert_eq!(nack, want, "{who}: {} version {version}: {:?}", r.type_url, r.error_detail);
    }
}

#[test]
fn a_real_envoy_fed_the_same_snapshot_splits_updates_rejects_and_removes_alike() {
    let Some(bin) = envoy_binary() else {
        common::skip(
            "a_real_envoy_fed_the_same_snapshot_splits_updates_rejects_and_removes_alike",
            "no Envoy binary (perf/fetch-envoy.sh failed)",
        );
        return;
    };
    let ours = Mesh::new();
    let theirs = Mesh { v1: ours.v1, v2: ours.v2, listen: free_addr() };
    let (tx_r, req_r) = mpsc::channel();
    let (tx_e, req_e) = mpsc::channel();
    let snap = |mesh: &Mesh, version: &str, routes: &[(&str, u32)]| mesh.snapshot(version, routes);
    let envoy_snap = |s: Snapshot| ads::without_istio_extensions(s);
    let ads_r = AdsServer::start(free_addr(), snap(&ours, "1", &[(V1, 80), (V2, 20)]), tx_r);
    let ads_e = AdsServer::start(free_addr(), envoy_snap(snap(&theirs, "1", &[(V1, 80), (V2, 20)])), tx_e);
    let _rs = ringside(ads_r.addr, "");
    let _envoy = Envoy::start(&bin, ads_e.addr);
    let sides = [("ringside", &ours, &req_r), ("envoy", &theirs, &req_e)];
    for (who, mesh, requests) in sides {
        expect_replies(requests, "1", false, who);
        wait_for(&format!("{who}'s xDS listener"), || tag_of(mesh.listen));
    }
    // The same weighted split: 80/20 of 300 within 5 sigma (~6.9 each) for both.
    for (who, mesh, _) in sides {
        let (v1, v2) = split(mesh.listen, 300);
        assert!((205..=275).contains(&v1), "{who}: v1 {v1}, v2 {v2}");
    }
    // An update: every new connection to v2.
    ads_r.push(snap(&ours, "2", &[(V2, 100)]));
    ads_e.push(envoy_snap(snap(&theirs, "2", &[(V2, 100)])));
    for (who, mesh, requests) in sides {
        expect_replies(requests, "2", false, who);
        let took = until_all(mesh.listen, "v2");
        assert!(took < Duration::from_secs(2), "{who}: {took:?}");
    }
    // An EDS-only change: v2's endpoint moves to a new backend.
    let moved = tag_server("vb");
    let eds_only = |mesh: &Mesh| {
        let mut s = snap(mesh, "3", &[(V2, 100)]);
        s.endpoints[1] = assignment(V2, &[(moved, "mongodb-v2b;default;mongodb;v2;Kubernetes")]);
        s
    };
    ads_r.push(eds_only(&ours));
    ads_e.push(envoy_snap(eds_only(&theirs)));
    for (who, mesh, requests) in sides {
        expect_replies(requests, "3", false, who);
        until_all(mesh.listen, "vb");
    }
    // An invalid listener (a weight of 0): both NACK it and keep serving version 3.
    let invalid = |mesh: &Mesh| {
        let mut s = eds_only(mesh);
        s.version = "4".into();
        s.listeners = snap(mesh, "4", &[(V2, 0), (V1, 1)]).listeners;
        s
    };
    ads_r.push(invalid(&ours));
    ads_e.push(envoy_snap(invalid(&theirs)));
    for (who, mesh, requests) in sides {
        expect_replies(requests, "4", true, who);
        assert_eq!(split(mesh.listen, 10), (0, 10), "{who} still serves version 3");
    }
    // The listener removed: both stop accepting new connections.
    let removed = |mesh: &Mesh| Snapshot { listeners: Vec::new(), ..eds_only(mesh) };
    ads_r.push(Snapshot { version: "5".into(), ..removed(&ours) });
    ads_e.push(envoy_snap(Snapshot { version: "5".into(), ..removed(&theirs) }));
    for (who, mesh, requests) in sides {
        expect_replies(requests, "5", false, who);
        wait_for(&format!("{who} to refuse on the removed listener"), || {
            TcpStream::connect(mesh.listen).is_err().then_some(())
        });
    }
}

#[test]
fn filter_chains_take_connections_by_destination_and_count_only_with_istio_stats() {
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChainMatch};
    use envoy_types::pb::google::protobuf::UInt32Value;
    let mesh = Mesh::new();
    let port = mesh.listen.port();
    let wildcard = SocketAddr::from(([0, 0, 0, 0], port));
    let mut s = mesh.snapshot("1", &[(V1, 100)]);
    // Istio-shaped: istio.stats + tcp_proxy to V1, as the default chain.
    let mut l = tcp_listener("chains", wildcard, &[(V1, 100)]);
    let default = l.filter_chains.remove(0);
    let to_v2 = tcp_listener("x", wildcard, &[(V2, 100)]).filter_chains.remove(0);
    let only = |ip: &str| FilterChainMatch {
        prefix_ranges: vec![CidrRange {
            address_prefix: ip.into(),
            prefix_len: Some(UInt32Value { value: 32 }),
        }],
        ..Default::default()
    };
    // 127.0.0.2 goes to v2, without istio.stats: not counted.
    let mut v2_chain = to_v2;
    v2_chain.filters.retain(|f| f.name != "istio.stats");
    v2_chain.filter_chain_match = Some(only("127.0.0.2"));
    // 127.0.0.3 is an HTTP chain whose route ringside does not have (RDS not subscribed):
    // closed at once, NR.
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            route_config_name: "27017".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut http = default.clone();
    http.filters = vec![Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            ads::any(
                "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                &manager,
            ),
        )),
    }];
    http.filter_chain_match = Some(only("127.0.0.3"));
    l.filter_chains = vec![v2_chain, http];
    l.default_filter_chain = Some(default);
    s.listeners = vec![l];
    let (server, requests) = AdsServer::serve(s);
    let rs = ringside(server.addr, "");
    for r in replies(&requests, "1") {
        assert!(r.error_detail.is_none(), "{:?}", r.error_detail);
    }
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let (tag, _) = wait_for("the chained listener", || tag_of(at([127, 0, 0, 1])));
    assert_eq!(tag, "v1");
    assert_eq!(split(at([127, 0, 0, 2]), 5), (0, 5));
    assert!(tag_of(at([127, 0, 0, 3])).is_none(), "the HTTP chain's connection is closed");
    // Only the default chain has istio.stats: its one connection is all that is counted
    // (besides `UH` ones of the wait above, before the endpoints reached the workers).
    let v1 = [("destination_workload", "mongodb-v1")];
    let scrape = rs.wait_for_value("istio_tcp_connections_closed_total", &v1, 1.0);
    let relayed = [("response_flags", "-")];
    assert_eq!(sum(&scrape, "istio_tcp_connections_opened_total", &relayed), 1.0, "{scrape}");
    assert_eq!(
        sum(&scrape, "istio_tcp_connections_opened_total", &[("destination_workload", "mongodb-v2")]),
        0.0
    );
}

#[test]
fn a_unix_socket_ads_server_configures_it_as_istios_agent_proxy_would() {
    let mesh = Mesh::new();
    let (tx, requests) = mpsc::channel();
    let path =
        std::env::temp_dir().join(format!("ringside-xds-{}-{}.sock", std::process::id(), mesh.listen.port()));
    let server = AdsServer::start_unix(&path, mesh.snapshot("1", &[(V2, 100)]), tx);
    let config = format!("{NODE}xds: {{address: \"unix:{}\"}}\n", path.display());
    let _rs = Ringside::spawn_config(&config, mesh.listen, &[]);
    reply_to(&requests, LISTENER, "1");
    until_tag(mesh.listen, "v2");
    drop(server);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_bad_xds_address_is_a_one_line_usage_error() {
    for (address, why) in [("nope", "expected HOST:PORT or unix:PATH"), ("unix:", "unix: needs a path")] {
        let out =
            std::process::Command::new(common::bin()).args(["validate", "--xds", address]).output().unwrap();
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    }
    // With xds: alone, no listener is needed.
    let out = std::process::Command::new(common::bin())
        .args(["validate", "--xds", "127.0.0.1:15010"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}
