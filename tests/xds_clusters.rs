//! SPEC §9, clusters as istiod sends them, with the real binary and real sockets:
//! `upstream_bind_config.source_address` is the source the backend sees, STRICT_DNS /
//! LOGICAL_DNS clusters are resolved with the system resolver and refreshed at their
//! `dns_refresh_rate` (a temporary /etc/hosts in a mount namespace of the sidecar's own; the
//! host's file is never touched), and an ORIGINAL_DST cluster (`CLUSTER_PROVIDED`, a headless
//! service) behind a capture listener reaches the connection's original destination.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

use ads::{AdsServer, BoolValue, Snapshot, cds, eds, static_cluster, tcp_listener};
use common::{DEADLINE, Ringside, free_addr, manual_server, next_conn, tag_server_on, wait_for};
use envoy_types::pb::envoy::config::core::v3 as core;

const NODE: &str = "node:\n  workload_name: sleep-v1\n  namespace: default\n";

/// ringside with only `xds:` and a node, run through `wrapper` (empty: none).
fn ringside(server: SocketAddr, wrapper: &[&str]) -> Ringside {
    let config = format!("{NODE}xds: {{address: {server}}}\n");
    Ringside::spawn_config_wrapped(wrapper, &config, server, &["--workers", "2"])
}

/// One listener on `listen` to `cluster`.
fn snapshot(listen: SocketAddr, cluster: cds::Cluster) -> Snapshot {
    Snapshot {
        version: "1".into(),
        listeners: vec![tcp_listener("l", listen, &[(&cluster.name.clone(), 1)])],
        clusters: vec![cluster],
        ..Snapshot::default()
    }
}

fn socket_address(host: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: host.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// A DNS cluster as istiod writes one for a `resolution: DNS` ServiceEntry.
#[allow(deprecated)] // dns_refresh_rate: what istiod 1.15-1.18 writes
fn dns_cluster(kind: cds::cluster::DiscoveryType, host: &str, port: u16, refresh_ms: u32) -> cds::Cluster {
    let mut c = static_cluster("outbound|9411||zipkin.istio-system", "127.0.0.1:1".parse().unwrap());
    c.cluster_discovery_type = Some(cds::cluster::ClusterDiscoveryType::Type(kind as i32));
    let endpoint = &mut c.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints[0];
    endpoint.host_identifier = Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
        address: Some(socket_address(host, port)),
        ..Default::default()
    }));
    c.dns_lookup_family = cds::cluster::DnsLookupFamily::V4Only as i32;
    c.dns_refresh_rate = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: i64::from(refresh_ms / 1000),
        nanos: (refresh_ms % 1000 * 1_000_000) as i32,
    });
    c
}

/// The 2-byte tag of the backend a new connection through `listen` reaches, if any.
fn tag_through(listen: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(listen).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).ok()?;
    Some(String::from_utf8_lossy(&tag).into_owned())
}

#[test]
fn upstream_bind_config_source_address_is_the_source_address_the_backend_sees() {
    let (backend, accepted) = manual_server();
    let mut cluster = static_cluster("inbound|9080||", backend);
    cluster.upstream_bind_config = Some(core::BindConfig {
        source_address: Some(core::SocketAddress {
            address: "127.0.0.6".into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(0)),
            ..Default::default()
        }),
        ..Default::default()
    });
    let listen = free_addr();
    let (server, _requests) = AdsServer::serve(snapshot(listen, cluster));
    let _rs = ringside(server.addr, &[]);
    let _client = wait_for("a connection through the listener", || TcpStream::connect(listen).ok());
    let up = next_conn(&accepted);
    assert_eq!(up.peer_addr().unwrap().ip(), "127.0.0.6".parse::<IpAddr>().unwrap());
}

#[test]
fn a_strict_dns_cluster_naming_localhost_is_resolved_off_the_workers_and_reached() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    tag_server_on(listener, "dn");
    let listen = free_addr();
    let cluster = dns_cluster(cds::cluster::DiscoveryType::StrictDns, "localhost", port, 5000);
    let (server, _requests) = AdsServer::serve(snapshot(listen, cluster));
    let rs = ringside(server.addr, &[]);
    // Ready does not wait for the first answer (no endpoints yet: UH), as a new DNS name
    // must not keep a pod unready; it arrives within the first refresh.
    wait_for("localhost resolved", || (tag_through(listen)? == "dn").then_some(()));
    let dump: serde_json::Value =
        serde_json::from_str(&common::http(rs.admin, "GET", "/config_dump").unwrap().1).unwrap();
    let cluster = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outbound|9411||zipkin.istio-system");
    let addresses: Vec<&str> = cluster.unwrap()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["address"].as_str())
        .collect();
    assert_eq!(addresses, [format!("127.0.0.1:{port}")], "localhost, IPv4 only (V4_ONLY), one host");
}

/// `/etc/hosts` inside a private mount namespace of the sidecar: `hosts` bind-mounted over
/// it, so rewriting that file (in place) changes what the sidecar's resolver answers.
fn private_hosts_wrapper(hosts: &std::path::Path) -> Vec<String> {
    let script = format!("mount --bind {} /etc/hosts && exec \"$0\" \"$@\"", hosts.display());
    ["unshare", "--mount", "--propagation", "private", "sh", "-c", &script].map(String::from).to_vec()
}

#[test]
fn a_logical_dns_cluster_is_resolved_again_every_dns_refresh_rate() {
    const TEST: &str = "xds_clusters::dns_refresh";
    if netns::unavailable(TEST).is_some() {
        return; // needs root for the mount namespace, as the network namespaces do
    }
    // Two backends on one port at two loopback addresses.
    let first = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = first.local_addr().unwrap().port();
    let second = TcpListener::bind(("127.0.0.2", port)).expect("127.0.0.2 on the same port");
    tag_server_on(first, "v1");
    tag_server_on(second, "v2");
    let hosts = std::env::temp_dir().join(format!("ringside-hosts-{}", std::process::id()));
    std::fs::write(&hosts, "127.0.0.1 zipkin.ringside.test\n").unwrap();
    let listen = free_addr();
    let cluster = dns_cluster(cds::cluster::DiscoveryType::LogicalDns, "zipkin.ringside.test", port, 100);
    let (server, _requests) = AdsServer::serve(snapshot(listen, cluster));
    let wrapper = private_hosts_wrapper(&hosts);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let _rs = ringside(server.addr, &wrapper);
    wait_for("the name resolved to 127.0.0.1", || (tag_through(listen)? == "v1").then_some(()));
    std::fs::write(&hosts, "127.0.0.2 zipkin.ringside.test\n").unwrap();
    // Every worker picks the new address up (one host: LOGICAL_DNS): ten new connections in
    // a row reach it.
    let mut in_a_row = 0;
    wait_for("the name resolved again, to 127.0.0.2", || {
        in_a_row = if tag_through(listen)? == "v2" { in_a_row + 1 } else { 0 };
        (in_a_row == 10).then_some(())
    });
    let _ = std::fs::remove_file(&hosts);
}

#[test]
fn an_original_dst_cluster_behind_the_capture_listener_reaches_the_original_destination() {
    const TEST: &str = "xds_clusters::original_dst";
    if netns::unavailable(TEST).is_some() {
        return;
    }
    let pods = netns::Pods::new();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pods.b, common::bin(), "iptables", "--apply"])
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables --apply: {}", String::from_utf8_lossy(&out.stderr));
    // A headless service's port in pod A: istiod's `0.0.0.0_7070` listener (not bound, handed
    // the captured connections) to an ORIGINAL_DST cluster, no endpoints of its own.
    let seen = netns::echo_server_in(&pods.a, "0.0.0.0:7070");
    const HEADLESS: &str = "outbound|7070||headless.default.svc.cluster.local";
    let mut headless = ads::eds_cluster(HEADLESS, "headless.default.svc.cluster.local", "default");
    headless.cluster_discovery_type =
        Some(cds::cluster::ClusterDiscoveryType::Type(cds::cluster::DiscoveryType::OriginalDst as i32));
    headless.lb_policy = cds::cluster::LbPolicy::ClusterProvided as i32;
    headless.eds_cluster_config = None;
    headless.filters.clear();
    headless.transport_socket_matches.clear();
    let mut port_listener = tcp_listener("0.0.0.0_7070", "0.0.0.0:7070".parse().unwrap(), &[(HEADLESS, 1)]);
    port_listener.bind_to_port = Some(BoolValue { value: false });
    let mut capture =
        tcp_listener("virtualOutbound", "0.0.0.0:15001".parse().unwrap(), &[("PassthroughCluster", 1)]);
    capture.use_original_dst = Some(BoolValue { value: true });
    let mut passthrough = headless.clone();
    passthrough.name = "PassthroughCluster".into();
    passthrough.metadata = None;
    let (tx, _requests) = std::sync::mpsc::channel();
    let server = AdsServer::start_for_sidecar(
        &pods.b,
        Snapshot {
            version: "1".into(),
            listeners: vec![capture, port_listener],
            clusters: vec![headless, passthrough],
            ..Snapshot::default()
        },
        tx,
    );
    let yaml = format!(
        "{NODE}workers: 1\nmetrics: {{listen: 127.0.0.1:15090}}\nadmin: {{listen: 127.0.0.1:15000}}\n\
         health: {{listen: 'off'}}\nxds: {{address: \"{}\"}}\n",
        server.unix_address()
    );
    let b = netns::Sidecar::spawn(&pods.b, &yaml);
    let client = netns::connect_in(&pods.b, &format!("{}:7070", netns::A_IP)).expect("connect to A");
    assert_eq!(common::echo_back(client, b"ping"), b"ping");
    let from = seen.recv_timeout(DEADLINE).expect("the app in A got the connection");
    assert_eq!(from.ip().to_string(), netns::B_IP, "relayed by B's sidecar");
    let text = b.wait_for_scrape("the connection counted", |t| {
        common::sum(t, "istio_tcp_connections_closed_total", &[("reporter", "source")]) == 1.0
    });
    let to_headless =
        [("destination_service", "headless.default.svc.cluster.local"), ("response_flags", "-")];
    assert_eq!(common::sum(&text, "istio_tcp_connections_closed_total", &to_headless), 1.0, "{text}");
}
