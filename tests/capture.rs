//! SPEC §8 in network namespaces the tests create and remove: two "pods" joined by a veth
//! pair, each with a ringside sidecar (uid 1337) and the capture rules `ringside iptables
//! --apply` writes, and an unmodified client and server. Without root, `ip`, `iptables` or
//! namespaces, each test prints a SKIP line (collected in target/test-skips.txt, which
//! tests/run.sh prints) and returns: skipped, never passed silently.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::Command;

use common::{Rng, bin, sum};
use netns::{A_IP, B_IP, B_IP2, Pods, Sidecar, connect_in, echo_server_in, exec, iptables_save, unavailable};

/// A sidecar with Istio's two capture listeners; `clusters` is YAML for its `clusters:` key.
fn sidecar_yaml(workload: &str, app: &str, clusters: &str) -> String {
    format!(
        "node:
  workload_name: {workload}
  namespace: default
  labels: {{app: {app}, version: v1}}
workers: 1
metrics: {{listen: 127.0.0.1:15090}}
admin: {{listen: 127.0.0.1:15000}}
health: {{listen: 'off'}}
listeners:
  - {{name: virtual-outbound, listen: 0.0.0.0:15001, direction: outbound, peer_exchange: always, capture: outbound}}
  - {{name: virtual-inbound, listen: 0.0.0.0:15006, direction: inbound, peer_exchange: always, capture: inbound}}
clusters: {clusters}
"
    )
}

const RATINGS: &str = "
  - name: ratings
    service: ratings.default.svc.cluster.local
    endpoints: [{address: 10.77.0.2:9080, labels: {app: ratings, version: v1}}]";

/// `ringside iptables ARGS` inside `ns` (as root, as Istio's init container runs).
fn iptables(ns: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("ip").args(["netns", "exec", ns, bin(), "iptables"]).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn apply(ns: &str, args: &[&str]) {
    let mut all = vec!["--apply"];
    all.extend_from_slice(args);
    let (code, _, err) = iptables(ns, &all);
    assert_eq!(code, 0, "iptables --apply in {ns}: {err}");
}

/// Two pods, each with capture rules and a sidecar (A: productpage, knows the ratings
/// cluster; B: ratings). Returned in drop order: sidecars first, then the namespaces.
fn mesh(a_rules: &[&str], b_rules: &[&str]) -> (Sidecar, Sidecar, Pods) {
    let pods = Pods::new();
    apply(&pods.a, a_rules);
    apply(&pods.b, b_rules);
    let a = Sidecar::spawn(&pods.a, &sidecar_yaml("productpage-v1", "productpage", RATINGS));
    let b = Sidecar::spawn(&pods.b, &sidecar_yaml("ratings-v1", "ratings", "[]"));
    (a, b, pods)
}

/// Write `data`, half-close, read everything back (writing on its own thread, so a large
/// echo cannot deadlock on full buffers).
fn echo_through(mut s: std::net::TcpStream, data: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

fn counter(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    sum(text, metric, labels)
}

#[test]
fn an_unmodified_client_is_relayed_byte_exact_through_both_sidecars_with_exchange_and_metrics() {
    if unavailable("capture::two_pods_byte_exact").is_some() {
        return;
    }
    let (a, b, pods) = mesh(&[], &[]);
    let seen = echo_server_in(&pods.b, &format!("{B_IP}:9080"));

    let data = Rng(18).bytes(1 << 20);
    let client = connect_in(&pods.a, &format!("{B_IP}:9080")).expect("connect to the server's real address");
    assert_eq!(echo_through(client, &data), data, "relayed byte-exact both ways");

    // Inbound capture connected to the application from 127.0.0.6, so it was not captured again.
    let peer = seen.recv_timeout(common::DEADLINE).unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.6");

    let n = data.len() as f64;
    let src = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("destination_workload", "ratings-v1"), // from the exchange: endpoints carry no workload
        ("destination_service", "ratings.default.svc.cluster.local"),
        ("destination_service_name", "ratings"),
        ("response_flags", "-"),
    ];
    let text = a.wait_for_scrape("source-side close", |t| {
        counter(t, "istio_tcp_connections_closed_total", &src) == 1.0
    });
    assert_eq!(counter(&text, "istio_tcp_connections_opened_total", &src), 1.0, "{text}");
    assert_eq!(counter(&text, "istio_tcp_received_bytes_total", &src), n, "{text}");
    assert_eq!(counter(&text, "istio_tcp_sent_bytes_total", &src), n, "{text}");
    let dst = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("source_app", "productpage"),
        ("destination_workload", "ratings-v1"),
        ("response_flags", "-"),
    ];
    let text = b.wait_for_scrape("destination-side close", |t| {
        counter(t, "istio_tcp_connections_closed_total", &dst) == 1.0
    });
    assert_eq!(counter(&text, "istio_tcp_received_bytes_total", &dst), n, "{text}");
    assert_eq!(counter(&text, "istio_tcp_sent_bytes_total", &dst), n, "{text}");
    assert_eq!(counter(&text, "ringside_exchange_total", &[("outcome", "metadata_added")]), 1.0, "{text}");
}

#[test]
fn a_destination_with_no_cluster_goes_passthrough_and_excluded_ports_and_cidrs_are_not_captured() {
    if unavailable("capture::passthrough_and_exclusions").is_some() {
        return;
    }
    let (a, b, pods) =
        mesh(&["--exclude-cidrs", &format!("{B_IP2}/32")], &["--exclude-ports", "15090,15021,15020,7071"]);
    let plain = echo_server_in(&pods.b, "0.0.0.0:7070");
    let excluded_port = echo_server_in(&pods.b, "0.0.0.0:7071");
    let data = b"no cluster for this one".to_vec();

    // No cluster has 10.77.0.2:7070: relayed as it was, named PassthroughCluster.
    let s = connect_in(&pods.a, &format!("{B_IP}:7070")).unwrap();
    assert_eq!(echo_through(s, &data), data);
    assert_eq!(plain.recv_timeout(common::DEADLINE).unwrap().ip().to_string(), "127.0.0.6");
    let pass = [
        ("reporter", "source"),
        ("destination_service", "10.77.0.2:7070"),
        ("destination_service_name", "PassthroughCluster"),
        ("destination_workload", "unknown"), // no preamble is written to an unknown destination
    ];
    a.wait_for_scrape("passthrough close", |t| {
        counter(t, "istio_tcp_connections_closed_total", &pass) == 1.0
    });
    let plain_client = [("reporter", "destination"), ("source_workload", "unknown")];
    b.wait_for_scrape("passthrough at B, as a plain client", |t| {
        counter(t, "istio_tcp_connections_closed_total", &plain_client) == 1.0
    });

    // An excluded inbound port: pod B's rules leave it alone, so the server sees pod A.
    let s = connect_in(&pods.a, &format!("{B_IP}:7071")).unwrap();
    drop(echo_through(s, b""));
    let peer: SocketAddr = excluded_port.recv_timeout(common::DEADLINE).unwrap();
    assert_eq!(peer.ip().to_string(), A_IP, "not captured inbound");

    // An excluded CIDR: pod A's rules leave it alone; B still captures it inbound.
    let s = connect_in(&pods.a, &format!("{B_IP2}:7070")).unwrap();
    assert_eq!(echo_through(s, &data), data);
    assert_eq!(plain.recv_timeout(common::DEADLINE).unwrap().ip().to_string(), "127.0.0.6");
    b.wait_for_scrape("the uncaptured-outbound connection at B", |t| {
        counter(t, "istio_tcp_connections_closed_total", &plain_client) == 2.0
    });
    let text = a.scrape();
    assert_eq!(
        counter(&text, "istio_tcp_connections_opened_total", &[("reporter", "source")]),
        2.0,
        "A captured the passthrough and the excluded-port connection only:\n{text}"
    );
}

#[test]
fn a_captured_connection_to_the_proxys_own_port_is_refused_and_counted_not_relayed() {
    if unavailable("capture::loop_refused").is_some() {
        return;
    }
    let (a, _b, pods) = mesh(&[], &[]);
    // Captured outbound with original destination port 15001: relaying it would reach a
    // capture listener again (Istio black-holes it).
    let mut s = connect_in(&pods.a, &format!("{B_IP}:15001")).unwrap();
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let _ = s.write_all(b"loop?");
    let mut buf = [0u8; 16];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "closed without relaying");
    let refused =
        [("reporter", "source"), ("destination_service_name", "BlackHoleCluster"), ("response_flags", "UH")];
    let text = a.wait_for_scrape("the refused connection", |t| {
        counter(t, "istio_tcp_connections_closed_total", &refused) == 1.0
    });
    assert_eq!(
        counter(&text, "istio_tcp_connections_opened_total", &[("reporter", "source")]),
        1.0,
        "{text}"
    );
    assert_eq!(counter(&text, "ringside_capture_loops_refused_total", &[]), 1.0, "{text}");
    // Dialled directly (no NAT: the original destination is the listener itself): refused too.
    let mut s = connect_in(&pods.a, &format!("{A_IP}:15001")).unwrap();
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    a.wait_for_scrape("the second refused connection", |t| {
        counter(t, "istio_tcp_connections_closed_total", &refused) == 2.0
            && counter(t, "ringside_capture_loops_refused_total", &[]) == 2.0
    });
}

#[test]
fn print_changes_nothing_apply_is_all_or_nothing_and_clean_restores_iptables_save_exactly() {
    if unavailable("capture::iptables_print_apply_clean").is_some() {
        return;
    }
    let pods = Pods::new();
    let ns = &pods.a;
    // A rule that was there before ours, in a chain we also use: kept.
    exec(ns, &["iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9/32", "-j", "RETURN"]);
    let before = iptables_save(ns);

    let (code, printed, err) = iptables(ns, &["--print", "--proxy-gid", "1337", "--include-ports", "9080"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(iptables_save(ns), before, "--print changed nothing");
    assert!(printed.lines().all(|l| l.starts_with("iptables -t nat ")), "{printed}");

    // Every printed command, run by hand, gives the same state as --apply.
    for line in printed.lines() {
        let args: Vec<&str> = line.split(' ').collect();
        exec(ns, &args);
    }
    let by_hand = iptables_save(ns);
    assert_eq!(iptables(ns, &["--clean"]).0, 0);
    assert_eq!(iptables_save(ns), before, "--clean restores exactly");
    apply(ns, &["--proxy-gid", "1337", "--include-ports", "9080"]);
    assert_eq!(iptables_save(ns), by_hand, "--apply adds exactly what --print shows");
    assert_eq!(iptables(ns, &["--clean"]).0, 0);
    assert_eq!(iptables_save(ns), before, "--clean restores exactly");

    // A failure midway (our last chain already exists): one line, exit 1, nothing left.
    exec(ns, &["iptables", "-t", "nat", "-N", "ISTIO_OUTPUT"]);
    let with_chain = iptables_save(ns);
    let (code, _, err) = iptables(ns, &["--apply"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("ringside: iptables: iptables -t nat -N ISTIO_OUTPUT"), "{err}");
    assert_eq!(iptables_save(ns), with_chain, "nothing half-applied");

    // Bad flags: one line, exit 64, nothing changed.
    for bad in [
        &["--apply", "--include-cidrs", "10.0.0.0/40"][..],
        &["--apply", "--exclude-ports", "http"],
        &["--print", "--clean"],
        &[],
    ] {
        let (code, _, err) = iptables(ns, bad);
        assert_eq!(code, 64, "{bad:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
        assert!(err.starts_with("ringside: "), "{err}");
    }
    assert_eq!(iptables_save(ns), with_chain);
}

#[test]
fn capture_rules_are_printed_without_privileges() {
    // Pure: no namespace needed, so this one always runs.
    let out =
        Command::new(bin()).args(["iptables", "--print", "--include-cidrs", "10.0.0.0/8"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("iptables -t nat -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\n"), "{text}");
    assert!(text.contains("-m owner --uid-owner 1337 -j RETURN\n"), "{text}");
}
