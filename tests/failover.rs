//! SPEC §6 failover, bounded: a connection tries at most `limits.max_connect_attempts`
//! endpoints (static config: 3) within one `connect_timeout` overall, and a failing endpoint
//! is logged once per ejection, not once per connection that finds it down. A black-holed
//! cluster of N endpoints costs a client one connect timeout, not N.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::Read;
use std::net::SocketAddr;

use common::*;
use netns::{B_IP, Pods, Sidecar};

/// A listener on `listen` to one cluster of `endpoints`, no exchange; admin and metrics on
/// `admin` and `metrics`.
fn one_cluster(listen: &str, endpoints: &[SocketAddr], limits: &str, admin: &str, metrics: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{{address: '{e}'}}")).collect();
    format!(
        "node: {{workload_name: client, namespace: default}}
workers: 1
admin: {{listen: '{admin}'}}
metrics: {{listen: '{metrics}'}}
health: {{listen: 'off'}}
listeners:
  - {{name: out, listen: '{listen}', direction: outbound, peer_exchange: 'off', cluster: five,
      limits: {{{limits}}}}}
clusters:
  - {{name: five, endpoints: [{}]}}
",
        eps.join(", ")
    )
}

#[test]
fn a_connection_tries_at_most_three_refusing_endpoints_and_each_ejection_is_logged_once() {
    let dead: Vec<SocketAddr> = (0..5).map(|_| free_addr()).collect(); // nothing listens: refused
    let listen = free_addr();
    let mut rs = Ringside::spawn_config(
        &one_cluster(&listen.to_string(), &dead, "connect_timeout: 5s", "127.0.0.1:0", "127.0.0.1:0"),
        listen,
        // One worker: endpoint health is each worker's own view.
        &["--workers", "1"],
    );
    for _ in 0..3 {
        let mut c = connect(listen);
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf); // closed: UF, or UH once all are ejected
        assert!(buf.is_empty());
    }
    let s = rs.wait_for_scrape("three connections closed", DEADLINE, |s| sum(s, CLOSED, &[]) == 3.0);
    // 1st: endpoints 1-3 refuse (UF); 2nd: 4 and 5 (still up) and one ejected (UF); 3rd: all
    // five are ejected, three of them tried again as a last resort (UH).
    assert_eq!(sum(&s, CLOSED, &[("response_flags", "UF")]), 2.0, "{s}");
    assert_eq!(sum(&s, CLOSED, &[("response_flags", "UH")]), 1.0, "{s}");
    rs.signal("TERM");
    rs.wait_exit();
    let ejected: Vec<String> = rs.stderr_lines().into_iter().filter(|l| l.contains("ejected for")).collect();
    assert_eq!(ejected.len(), 5, "one line per endpoint newly ejected, none per retry: {ejected:#?}");
    for e in &dead {
        assert_eq!(ejected.iter().filter(|l| l.contains(&format!("endpoint {e}:"))).count(), 1, "{e}");
    }
}

#[test]
fn a_black_holed_cluster_costs_a_client_one_connect_timeout_not_one_per_endpoint() {
    if netns::unavailable("failover::black_holed_cluster").is_some() {
        return;
    }
    let pods = Pods::new();
    // Pod B drops every SYN to ports 7001-7005, each port counted by its own rule.
    let ports = 7001..=7005u16;
    for port in ports.clone() {
        let p = port.to_string();
        netns::exec(&pods.b, &["iptables", "-A", "INPUT", "-p", "tcp", "--dport", &p, "--syn", "-j", "DROP"]);
    }
    let endpoints: Vec<SocketAddr> = ports.clone().map(|p| format!("{B_IP}:{p}").parse().unwrap()).collect();
    let yaml = one_cluster(
        "127.0.0.1:15001",
        &endpoints,
        "connect_timeout: 1s",
        "127.0.0.1:15000",
        "127.0.0.1:15090",
    );
    let sidecar = Sidecar::spawn(&pods.a, &yaml);
    let mut c = netns::connect_in(&pods.a, "127.0.0.1:15001").expect("connect to the sidecar");
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    sidecar.wait_for_scrape("the connection counted closed with UF", |s| {
        sum(s, CLOSED, &[("response_flags", "UF")]) == 1.0
    });
    // The first endpoint took the whole connect timeout: no other was dialled.
    let rules = netns::exec(&pods.b, &["iptables", "-L", "INPUT", "-v", "-x", "-n"]);
    let dialled: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("dpt:700"))
        .filter(|l| l.split_whitespace().next().is_some_and(|packets| packets != "0"))
        .collect();
    assert_eq!(dialled.len(), 1, "{rules}");
}
