//! SPEC §2 over loopback: two sidecars exchanging metadata, non-mesh and server-first
//! applications, Google-protobuf peers on the wire, broken and slow preambles.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;

use common::*;

const MAGIC: [u8; 4] = 0x3D23_0467u32.to_be_bytes();

fn inbound(upstream: SocketAddr, extra: &[&str]) -> Ringside {
    let mut args = vec![
        "--peer-exchange",
        "always",
        "--workload-name",
        "mongodb-v1",
        "--namespace",
        "db",
        "--label",
        "app=mongodb",
        "--label",
        "version=v1",
        "--cluster-id",
        "server-cluster",
        "--service",
        "mongodb.db.svc.cluster.local",
    ];
    args.extend_from_slice(extra);
    Ringside::spawn(upstream, "inbound", &args)
}

fn outbound(upstream: SocketAddr, extra: &[&str]) -> Ringside {
    let mut args = vec![
        "--peer-exchange",
        "always",
        "--workload-name",
        "ratings-v2",
        "--namespace",
        "default",
        "--label",
        "app=ratings",
        "--label",
        "version=v2",
        "--service",
        "mongodb.db.svc.cluster.local",
    ];
    args.extend_from_slice(extra);
    Ringside::spawn(upstream, "outbound", &args)
}

/// Python (Google protobuf) decoding of a whole preamble to JSON.
fn python_decode(preamble: &[u8]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/peer.py");
    let mut child = Command::new("python3")
        .args([script, "decode"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed (tests/deps.sh installs it)");
    child.stdin.take().unwrap().write_all(preamble).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "peer.py decode failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Read one whole preamble (header + payload) off a stream.
fn read_preamble(s: &mut std::net::TcpStream) -> Vec<u8> {
    let header = read_exact(s, 8);
    assert_eq!(header[..4], MAGIC, "a preamble starts with the magic");
    let len = u32::from_be_bytes(header[4..8].try_into().unwrap()) as usize;
    let mut all = header;
    all.extend(read_exact(s, len));
    all
}

#[test]
fn metadata_arrives_both_ways_and_the_stream_is_byte_exact_through_two_sidecars() {
    let server = inbound(echo_server(), &[]);
    let client = outbound(server.listen, &[]);
    let payload = Rng(11).bytes(2 << 20);
    assert!(echo_back(connect(client.listen), &payload) == payload);
    let bytes = payload.len() as f64;
    // Each side names the other, learned from the exchange only.
    let out = client.wait_for_value(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("destination_workload", "mongodb-v1"),
            ("destination_cluster", "server-cluster"),
        ],
        1.0,
    );
    assert_eq!(sum(&out, "istio_tcp_received_bytes_total", &[("destination_app", "mongodb")]), bytes);
    assert_eq!(sum(&out, "istio_tcp_sent_bytes_total", &[("destination_version", "v1")]), bytes);
    let inb = server.wait_for_value(
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("source_workload", "ratings-v2"), ("source_app", "ratings")],
        1.0,
    );
    assert_eq!(sum(&inb, "istio_tcp_received_bytes_total", &[("source_version", "v2")]), bytes);
    assert_eq!(sum(&inb, "istio_tcp_sent_bytes_total", &[("source_workload", "ratings-v2")]), bytes);
}

#[test]
fn a_google_protobuf_peer_is_answered_with_a_preamble_it_decodes() {
    let (upstream, conns) = manual_server();
    let server = inbound(upstream, &[]);
    let golden =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/preamble_golden_client.bin")).unwrap();
    let mut c = connect(server.listen);
    let mut first = golden.clone();
    first.extend_from_slice(b"app-bytes");
    c.write_all(&first).unwrap();
    let ours = read_preamble(&mut c);
    let node = python_decode(&ours);
    assert_eq!(node["workload_name"], "mongodb-v1");
    assert_eq!(node["namespace"], "db");
    assert_eq!(node["cluster_id"], "server-cluster");
    assert_eq!(node["owner"], "kubernetes://apis/apps/v1/namespaces/db/deployments/mongodb-v1");
    assert_eq!(node["labels"]["service.istio.io/canonical-name"], "mongodb");
    assert_eq!(node["labels"]["service.istio.io/canonical-revision"], "v1");
    // Exactly the preamble was removed: the upstream sees the application bytes only.
    let mut up = next_conn(&conns);
    assert_eq!(read_exact(&mut up, 9), b"app-bytes");
    up.write_all(b"reply").unwrap();
    assert_eq!(read_exact(&mut c, 5), b"reply");
    drop(c);
    server.wait_for_value(
        "istio_tcp_connections_opened_total",
        &[("source_workload", "productpage-v1")],
        1.0,
    );
}

#[test]
fn a_non_mesh_client_passes_through_an_inbound_always_listener_untouched() {
    let server = inbound(echo_server(), &[]);
    // Including clients whose first bytes happen to match the start of the magic.
    for prefix in [&b""[..], &MAGIC[..1], &MAGIC[..3]] {
        let mut payload = prefix.to_vec();
        payload.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        payload.extend(Rng(5).bytes(100_000));
        let mut c = connect(server.listen);
        // Dribble the prefix byte by byte: the sniffer must not need all 8 header bytes.
        for b in prefix {
            c.write_all(&[*b]).unwrap();
            thread::sleep(std::time::Duration::from_millis(5));
        }
        c.write_all(&payload[prefix.len()..]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert!(read_to_end(&mut c) == payload, "prefix {prefix:?}");
    }
    server.wait_for_value("istio_tcp_connections_closed_total", &[("source_workload", "unknown")], 3.0);
}

/// A server-first application: greets on accept, then echoes.
fn greeting_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    serve_each(l, |mut s: TcpStream| {
        if s.write_all(b"220 mysql ready\r\n").is_ok() {
            echo_until_eof(s);
        }
    });
    addr
}

#[test]
fn a_server_first_application_works_through_both_sidecars() {
    let server = inbound(greeting_server(), &[]);
    let client = outbound(server.listen, &[]);
    let mut c = connect(client.listen);
    assert_eq!(read_exact(&mut c, 17), b"220 mysql ready\r\n");
    c.write_all(b"LOGIN").unwrap();
    assert_eq!(read_exact(&mut c, 5), b"LOGIN");
    drop(c);
    client.wait_for_value(
        "istio_tcp_connections_closed_total",
        &[("destination_workload", "mongodb-v1")],
        1.0,
    );
}

#[test]
fn a_server_first_application_greets_a_silent_non_mesh_client_after_the_sniff_window() {
    let server = inbound(greeting_server(), &[]);
    let mut c = connect(server.listen);
    assert_eq!(read_exact(&mut c, 17), b"220 mysql ready\r\n");
    c.write_all(b"hi").unwrap();
    assert_eq!(read_exact(&mut c, 2), b"hi");
}

#[test]
fn an_oversized_preamble_closes_only_that_connection_and_never_reaches_the_upstream() {
    let (upstream, conns) = manual_server();
    let server = inbound(upstream, &["--max-preamble", "1KiB"]);
    let mut c = connect(server.listen);
    let mut bad = MAGIC.to_vec();
    bad.extend_from_slice(&(1u32 << 20).to_be_bytes());
    bad.extend_from_slice(b"not protobuf at all");
    c.write_all(&bad).unwrap();
    assert_closed_empty(&mut c, "c");
    let mut up = next_conn(&conns);
    assert_closed_empty(&mut up, "up");
    server.wait_for_value("istio_tcp_connections_closed_total", &[("source_workload", "unknown")], 1.0);
    // The worker is fine: the next connection relays.
    let mut ok = connect(server.listen);
    ok.write_all(b"plain").unwrap();
    let mut up = next_conn(&conns);
    assert_eq!(read_exact(&mut up, 5), b"plain");
}

#[test]
fn an_undecodable_preamble_closes_the_connection() {
    let (upstream, conns) = manual_server();
    let server = inbound(upstream, &[]);
    let mut c = connect(server.listen);
    let mut bad = MAGIC.to_vec();
    bad.extend_from_slice(&5u32.to_be_bytes());
    bad.extend_from_slice(&[0xff; 5]);
    c.write_all(&bad).unwrap();
    assert_closed_empty(&mut c, "c");
    let mut up = next_conn(&conns);
    assert_closed_empty(&mut up, "up");
    server.wait_for_value("ringside_exchange_total", &[("outcome", "invalid")], 1.0);
}

#[test]
fn a_preamble_dripped_slower_than_the_exchange_timeout_closes_the_connection_and_others_flow() {
    let server = inbound(echo_server(), &["--exchange-timeout", "300ms"]);
    let mut slow = connect(server.listen);
    slow.write_all(&MAGIC).unwrap(); // begun, never finished
    let mut other = connect(server.listen);
    other.write_all(b"meanwhile").unwrap();
    other.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut other), b"meanwhile");
    assert_closed_empty(&mut slow, "slow");
    server.wait_for_value("ringside_exchange_total", &[("outcome", "timeout")], 1.0);
}

#[test]
fn an_outbound_sidecar_passes_a_non_mesh_upstream_through() {
    // The upstream speaks no preamble: after ours is sent, its bytes pass through unchanged.
    let (upstream, conns) = manual_server();
    let client = outbound(upstream, &[]);
    let mut c = connect(client.listen);
    let mut up = next_conn(&conns);
    let ours = read_preamble(&mut up);
    assert_eq!(python_decode(&ours)["workload_name"], "ratings-v2");
    up.write_all(b"no preamble here").unwrap();
    assert_eq!(read_exact(&mut c, 16), b"no preamble here");
    c.write_all(b"ok").unwrap();
    assert_eq!(read_exact(&mut up, 2), b"ok");
}

#[test]
fn a_preamble_split_across_many_reads_is_reassembled_and_stripped() {
    let (upstream, conns) = manual_server();
    let server = inbound(upstream, &[]);
    let golden =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/preamble_golden_client.bin")).unwrap();
    let mut c = connect(server.listen);
    c.set_nodelay(true).unwrap();
    // Small chunks with pauses, so the proxy sees them as separate reads.
    for chunk in golden.chunks(97) {
        c.write_all(chunk).unwrap();
        thread::sleep(std::time::Duration::from_millis(3));
    }
    c.write_all(b"after").unwrap();
    assert_eq!(python_decode(&read_preamble(&mut c))["workload_name"], "mongodb-v1");
    let mut up = next_conn(&conns);
    assert_eq!(read_exact(&mut up, 5), b"after");
    drop(c);
    server.wait_for_value(
        "istio_tcp_connections_opened_total",
        &[("source_workload", "productpage-v1")],
        1.0,
    );
}

#[test]
fn a_non_mesh_client_that_sends_a_magic_prefix_and_half_closes_gets_those_bytes_delivered() {
    let server = inbound(echo_server(), &[]);
    for prefix in [&MAGIC[..1], &MAGIC[..2], &MAGIC[..3]] {
        let mut c = connect(server.listen);
        c.write_all(prefix).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c), prefix, "the held magic bytes are application data");
    }
}

#[test]
fn a_peers_overlong_label_values_are_replaced_by_unknown_and_counted() {
    let (upstream, conns) = manual_server();
    let server = inbound(upstream, &[]);
    // A peer whose workload name and app label are each one byte over the 256-byte bound.
    let long = "w".repeat(257);
    let peer = ringside::exchange::NodeMetadata {
        workload_name: long.clone(),
        namespace: "default".into(),
        labels: [("app".to_string(), long)].into(),
        ..Default::default()
    };
    let mut c = connect(server.listen);
    c.write_all(&ringside::exchange::encode(&peer)).unwrap();
    c.write_all(b"after").unwrap();
    let _ = read_preamble(&mut c);
    let mut up = next_conn(&conns);
    assert_eq!(read_exact(&mut up, 5), b"after");
    drop(c);
    let s = server.wait_for_value(OPENED, &[("source_workload", "unknown"), ("source_app", "unknown")], 1.0);
    assert_eq!(sum(&s, "ringside_peer_values_replaced_total", &[]), 2.0, "{s}");
    assert!(!s.contains("www"), "no overlong value reaches a label: {s}");
}
