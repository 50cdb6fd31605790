//! SPEC §9, delta xDS: ringside configured by a `DeltaAggregatedResources` server (in this
//! test process) with `xds: {api: delta}`, the real binary and real sockets: the initial sync
//! and traffic, an incremental EDS change touching only its cluster, `removed_resources`, a
//! NACK of one bad resource among good ones with readiness kept, `initial_resource_versions`
//! on a new stream, and unsubscribing from a cluster's assignment when the cluster goes; and a
//! real Envoy fed by the same delta server, as the reference.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};

use ads::{
    AdsServer, CLUSTER, DeltaLog, ENDPOINTS, LISTENER, Snapshot, assignment, eds_cluster, tcp_listener,
};
use common::{DEADLINE, Ringside, free_addr, tag_server, wait_for};

const HOST: &str = "mongodb.default.svc.cluster.local";
const V1: &str = "outbound|27017|v1|mongodb.default.svc.cluster.local";
const V2: &str = "outbound|27017|v2|mongodb.default.svc.cluster.local";

const NODE: &str = "node:
  id: sidecar~127.0.0.1~ratings-v2-7d9f.default~default.svc.cluster.local
  workload_name: ratings-v2
  namespace: default
";

/// Connect and read the backend's 2-byte tag; `None` if refused or closed.
fn tag_of(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).ok()?;
    Some(String::from_utf8_lossy(&tag).into_owned())
}

/// Wait until 20 new connections in a row (on every worker) reach `tag`.
fn until_all(addr: SocketAddr, tag: &str) {
    let mut run = 0;
    wait_for(&format!("every new connection to reach {tag}"), || {
        run = if tag_of(addr).as_deref() == Some(tag) { run + 1 } else { 0 };
        (run >= 20).then_some(())
    });
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

    fn listener_name(&self) -> String {
        format!("127.0.0.1_{}", self.listen.port())
    }

    /// Istio's shape: two subset clusters over EDS, a listener to one of them.
    fn snapshot(&self, version: &str, to: &str) -> Snapshot {
        Snapshot {
            version: version.into(),
            clusters: vec![eds_cluster(V1, HOST, "default"), eds_cluster(V2, HOST, "default")],
            endpoints: vec![
                assignment(V1, &[(self.v1, "mongodb-v1;default;mongodb;v1;Kubernetes")]),
                assignment(V2, &[(self.v2, "mongodb-v2;default;mongodb;v2;Kubernetes")]),
            ],
            listeners: vec![tcp_listener(&self.listener_name(), self.listen, &[(to, 100)])],
            secrets: vec![],
        }
    }
}

/// ringside speaking delta to `server`, with only `xds:` and a node.
fn ringside(server: SocketAddr) -> Ringside {
    let config = format!("{NODE}drain_timeout: 1s\nxds: {{address: {server}, api: delta}}\n");
    Ringside::spawn_config(&config, server, &["--workers", "2"])
}

/// The ACKs of the initial sync, checked: one per type, no error.
fn initial_acks(log: &DeltaLog) {
    let mut nonces = HashMap::new();
    while nonces.len() < 3 {
        let r = log.responses.recv_timeout(DEADLINE).expect("the initial responses");
        nonces.insert(r.nonce, r.type_url);
    }
    while !nonces.is_empty() {
        let ack = log.request("the initial ACKs", |r| nonces.contains_key(&r.response_nonce));
        assert!(ack.error_detail.is_none(), "{}: {:?}", ack.type_url, ack.error_detail);
        nonces.remove(&ack.response_nonce);
    }
}

#[test]
fn delta_subscribes_clusters_and_listeners_by_wildcard_and_endpoints_by_name_and_serves_traffic() {
    let mesh = Mesh::new();
    let (server, log) = AdsServer::serve_delta(mesh.snapshot("1", V1));
    let _rs = ringside(server.addr);
    // The first request: Clusters, wildcard, with the node; the node never again.
    let first = log.request("the first request", |_| true);
    assert_eq!(first.type_url, CLUSTER);
    assert!(first.resource_names_subscribe.is_empty() && first.initial_resource_versions.is_empty());
    assert_eq!(
        first.node.expect("the node on the first request").id,
        "sidecar~127.0.0.1~ratings-v2-7d9f.default~default.svc.cluster.local"
    );
    let listeners = log.request("the Listener subscription", |r| r.type_url == LISTENER);
    assert!(listeners.node.is_none() && listeners.resource_names_subscribe.is_empty());
    let endpoints = log.request("the EDS subscription", |r| r.type_url == ENDPOINTS);
    assert!(endpoints.node.is_none());
    let mut names = endpoints.resource_names_subscribe.clone();
    names.sort();
    assert_eq!(names, [V1, V2], "the EDS clusters' names");
    assert_eq!(tag_of(mesh.listen).as_deref(), Some("v1"));
    until_all(mesh.listen, "v1");
}

#[test]
fn an_eds_change_for_one_cluster_sends_only_that_assignment_and_moves_new_connections() {
    let mesh = Mesh::new();
    let (server, log) = AdsServer::serve_delta(mesh.snapshot("1", V1));
    let rs = ringside(server.addr);
    initial_acks(&log);
    until_all(mesh.listen, "v1");
    // Only the v1 subset's endpoints change: to a new backend.
    let moved = tag_server("vb");
    let mut s = mesh.snapshot("2", V1);
    s.endpoints[0] = assignment(V1, &[(moved, "mongodb-v1b;default;mongodb;v1;Kubernetes")]);
    server.push(s);
    let (response, ack) = log.reply(ENDPOINTS);
    assert_eq!(response.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), [V1]);
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    until_all(mesh.listen, "vb");
    // Each assignment carries its own version: v1's is new, v2's untouched.
    let dump = common::http(rs.admin, "GET", "/config_dump").unwrap().1;
    for (name, version) in [(V1, "2"), (V2, "1")] {
        let shown = format!("ClusterLoadAssignment/{name} version {version}");
        assert!(dump.contains(&shown), "{shown}:\n{dump}");
    }
    // Nothing else was sent for version 2.
    assert!(log.responses.try_recv().is_err(), "only the one assignment");
}

#[test]
fn a_listener_in_removed_resources_stops_accepting() {
    let mesh = Mesh::new();
    let (server, log) = AdsServer::serve_delta(mesh.snapshot("1", V1));
    let _rs = ringside(server.addr);
    initial_acks(&log);
    until_all(mesh.listen, "v1");
    server.push(Snapshot { listeners: vec![], ..mesh.snapshot("2", V1) });
    let (response, ack) = log.reply(LISTENER);
    assert_eq!(response.removed_resources, [mesh.listener_name()]);
    assert!(response.resources.is_empty());
    assert!(ack.error_detail.is_none());
    wait_for("the removed listener to refuse", || TcpStream::connect(mesh.listen).is_err().then_some(()));
}

#[test]
fn a_nack_names_the_one_bad_resource_among_good_ones_and_readiness_is_kept() {
    let mesh = Mesh::new();
    let bad_at = free_addr();
    let mut s = mesh.snapshot("1", V1);
    // A weight of 0: invalid (SPEC §9), beside a good listener.
    s.listeners.push(tcp_listener("weight-zero", bad_at, &[(V2, 0), (V1, 1)]));
    let (server, log) = AdsServer::serve_delta(s);
    // `spawn` waits for /ready: the NACK does not block readiness.
    let rs = ringside(server.addr);
    let (_, nack) = log.reply(LISTENER);
    let detail = nack.error_detail.expect("a NACK").message;
    assert_eq!(
        detail,
        "Listener/weight-zero: filter chain 0: tcp_proxy weighted_clusters: cluster \
         outbound|27017|v2|mongodb.default.svc.cluster.local: weight 0"
    );
    until_all(mesh.listen, "v1");
    assert!(TcpStream::connect(bad_at).is_err(), "never bound");
    // An update of the good one beside the bad one (sent again as changed): applied alone.
    let mut s = mesh.snapshot("2", V2);
    s.listeners.push(tcp_listener("weight-zero", bad_at, &[(V2, 0), (V1, 2)]));
    server.push(s);
    let (response, nack) = log.reply(LISTENER);
    assert_eq!(response.resources.len(), 2);
    assert!(nack.error_detail.expect("a NACK").message.starts_with("Listener/weight-zero: "));
    until_all(mesh.listen, "v2");
    assert_eq!(common::http(rs.admin, "GET", "/ready").map(|r| r.0), Some(200));
}

#[test]
fn a_new_stream_sends_the_versions_held_as_initial_resource_versions() {
    let mesh = Mesh::new();
    let addr = free_addr();
    let (server, log) = AdsServer::serve_delta_at(addr, mesh.snapshot("1", V1));
    let rs = ringside(server.addr);
    initial_acks(&log);
    until_all(mesh.listen, "v1");
    server.stop();
    rs.wait_for_value("ringside_xds_connected", &[], 0.0);
    let (server, log) = AdsServer::serve_delta_at(addr, mesh.snapshot("2", V2));
    // Every resource held, at the version it came with (all of snapshot 1).
    let held = |names: Vec<&str>| -> HashMap<String, String> {
        names.into_iter().map(|n| (n.to_string(), "1".to_string())).collect()
    };
    let hello = log.request("the new stream's Cluster request", |r| r.type_url == CLUSTER);
    assert!(hello.node.is_some());
    assert_eq!(hello.initial_resource_versions, held(vec![V1, V2]));
    let listeners = log.request("the new stream's Listener request", |r| r.type_url == LISTENER);
    assert_eq!(listeners.initial_resource_versions, held(vec![&mesh.listener_name()]));
    assert!(listeners.node.is_none());
    let endpoints = log.request("the new stream's EDS request", |r| r.type_url == ENDPOINTS);
    assert_eq!(endpoints.initial_resource_versions, held(vec![V1, V2]));
    assert_eq!(endpoints.resource_names_subscribe.len(), 2);
    // The server sends only what changed since: the listener, now to v2.
    until_all(mesh.listen, "v2");
    assert_eq!(common::sum(&rs.scrape(), "ringside_xds_connects_total", &[]), 2.0);
    drop(server);
}

#[test]
fn a_cluster_gone_unsubscribes_its_assignment() {
    let mesh = Mesh::new();
    let (server, log) = AdsServer::serve_delta(mesh.snapshot("1", V1));
    let _rs = ringside(server.addr);
    initial_acks(&log);
    until_all(mesh.listen, "v1");
    let mut s = mesh.snapshot("2", V1);
    s.clusters.retain(|c| c.name != V2);
    s.endpoints.retain(|e| e.cluster_name != V2);
    server.push(s);
    let (response, ack) = log.reply(CLUSTER);
    assert_eq!(response.removed_resources, [V2]);
    assert!(ack.error_detail.is_none());
    let change =
        log.request("the EDS unsubscribe", |r| r.type_url == ENDPOINTS && r.response_nonce.is_empty());
    assert_eq!(change.resource_names_unsubscribe, [V2]);
    assert!(change.resource_names_subscribe.is_empty());
    // And a new cluster is subscribed to by name.
    let mut s = mesh.snapshot("3", V1);
    s.clusters.retain(|c| c.name != V2);
    s.clusters.push(eds_cluster("outbound|27017|v3|mongodb.default.svc.cluster.local", HOST, "default"));
    server.push(s);
    log.reply(CLUSTER);
    let change = log.request("the EDS subscribe", |r| r.type_url == ENDPOINTS && r.response_nonce.is_empty());
    assert_eq!(change.resource_names_subscribe, ["outbound|27017|v3|mongodb.default.svc.cluster.local"]);
    until_all(mesh.listen, "v1");
}

#[test]
fn a_real_envoy_fed_by_the_same_delta_server_applies_rejects_and_removes_alike() {
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(
            "a_real_envoy_fed_by_the_same_delta_server_applies_rejects_and_removes_alike",
            "no Envoy binary (perf/fetch-envoy.sh failed)",
        );
        return;
    };
    let ours = Mesh::new();
    let theirs = Mesh { v1: ours.v1, v2: ours.v2, listen: free_addr() };
    let envoy_snap = ads::without_istio_extensions;
    let (ads_r, log_r) = AdsServer::serve_delta(ours.snapshot("1", V1));
    let (ads_e, log_e) = AdsServer::serve_delta(envoy_snap(theirs.snapshot("1", V1)));
    let _rs = ringside(ads_r.addr);
    let _envoy = envoy::Envoy::start_delta(&bin, ads_e.addr);
    let sides = [("ringside", &ours, &log_r), ("envoy", &theirs, &log_e)];
    for (who, mesh, log) in sides {
        initial_acks(log);
        wait_for(&format!("{who}'s xDS listener"), || tag_of(mesh.listen));
        until_all(mesh.listen, "v1");
    }
    // One assignment changes: only it is sent, both ACK and move.
    let moved = tag_server("vb");
    let eds_only = |mesh: &Mesh| {
        let mut s = mesh.snapshot("2", V1);
        s.endpoints[0] = assignment(V1, &[(moved, "mongodb-v1b;default;mongodb;v1;Kubernetes")]);
        s
    };
    ads_r.push(eds_only(&ours));
    ads_e.push(envoy_snap(eds_only(&theirs)));
    for (who, mesh, log) in sides {
        let (response, ack) = log.reply(ENDPOINTS);
        assert_eq!(response.resources.len(), 1, "{who}");
        assert!(ack.error_detail.is_none(), "{who}: {:?}", ack.error_detail);
        until_all(mesh.listen, "vb");
    }
    // A bad listener beside the good one: both NACK, and keep serving.
    let bad = |mesh: &Mesh, at: SocketAddr| {
        let mut s = eds_only(mesh);
        s.version = "3".into();
        s.listeners.push(tcp_listener("weight-zero", at, &[(V2, 0), (V1, 1)]));
        s
    };
    ads_r.push(bad(&ours, free_addr()));
    ads_e.push(envoy_snap(bad(&theirs, free_addr())));
    for (who, mesh, log) in sides {
        let (response, nack) = log.reply(LISTENER);
        assert_eq!(response.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["weight-zero"]);
        assert!(nack.error_detail.is_some(), "{who} NACKs");
        until_all(mesh.listen, "vb");
    }
    // The listeners removed: both stop accepting.
    ads_r.push(Snapshot { version: "4".into(), listeners: vec![], ..eds_only(&ours) });
    ads_e.push(envoy_snap(Snapshot { version: "4".into(), listeners: vec![], ..eds_only(&theirs) }));
    for (who, mesh, log) in sides {
        let (response, ack) = log.reply(LISTENER);
        assert_eq!(response.removed_resources.len(), 2, "{who}: {response:?}");
        assert!(ack.error_detail.is_none(), "{who}: {:?}", ack.error_detail);
        wait_for(&format!("{who} to refuse on the removed listener"), || {
            TcpStream::connect(mesh.listen).is_err().then_some(())
        });
    }
}
