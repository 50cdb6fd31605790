//! SPEC §8 in network namespaces the tests create and remove: two "pods" joined by a veth
//! pair, each with a ringside sidecar (uid 1337) and the capture rules `ringside iptables
//! --apply` writes, and an unmodified client and server; some sidecars are configured over
//! xDS as istiod configures them (virtualOutbound with per-service listeners not bound to
//! their ports, virtualInbound), for SPEC §9's counting of captured connections. Without root, `ip`, `iptables` or
//! namespaces, each test prints a SKIP line (collected in target/test-skips.txt, which
//! tests/run.sh prints) and returns: skipped, never passed silently.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;

use common::{Rng, bin, echo_back, istio_series, sum, wait_for};
use netns::{
    A_IP, B_IP, B_IP2, B_IP6, Pods, Sidecar, connect_in, echo_server_in, exec, iptables_save, unavailable,
};

/// A sidecar with Istio's two capture listeners; `clusters` is YAML for its `clusters:` key.
fn sidecar_yaml(workload: &str, app: &str, clusters: &str, driver: &str) -> String {
    format!(
        "node:
  workload_name: {workload}
  namespace: default
  labels: {{app: {app}, version: v1}}
workers: 1
driver: {driver}
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
    addresses: [10.96.0.10:9080]
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
/// cluster; B: ratings). Fields drop in order: the sidecars stop before the namespaces go.
struct Mesh {
    a: Sidecar,
    b: Sidecar,
    pods: Pods,
}

/// `b_driver`: pod B's sidecar (the inbound side, which binds before connecting) runs on
/// `epoll` in one test and io_uring in the others, so both drivers' sockets are covered.
fn mesh(a_rules: &[&str], b_rules: &[&str], b_driver: &str) -> Mesh {
    let pods = Pods::new();
    apply(&pods.a, a_rules);
    apply(&pods.b, b_rules);
    let a = Sidecar::spawn(&pods.a, &sidecar_yaml("productpage-v1", "productpage", RATINGS, "auto"));
    let b = Sidecar::spawn(&pods.b, &sidecar_yaml("ratings-v1", "ratings", "[]", b_driver));
    Mesh { a, b, pods }
}

fn counter(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    sum(text, metric, labels)
}

#[test]
fn an_unmodified_client_is_relayed_byte_exact_through_both_sidecars_with_exchange_and_metrics() {
    if unavailable("capture::two_pods_byte_exact").is_some() {
        return;
    }
    let Mesh { a, b, pods } = &mesh(&[], &[], "epoll");
    let seen = echo_server_in(&pods.b, &format!("{B_IP}:9080"));

    let data = Rng(18).bytes(1 << 20);
    let client = connect_in(&pods.a, &format!("{B_IP}:9080")).expect("connect to the server's real address");
    assert_eq!(echo_back(client, &data), data, "relayed byte-exact both ways");

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
    assert_eq!(
        counter(&text, "ringside_driver_info", &[("driver", "epoll")]),
        1.0,
        "B binds before connect on epoll"
    );

    // The service's address (a ClusterIP no interface holds) reaches the same cluster.
    let client = connect_in(&pods.a, "10.96.0.10:9080").expect("connect to the service address");
    assert_eq!(echo_back(client, b"via the ClusterIP"), b"via the ClusterIP");
    a.wait_for_scrape("the second source-side close", |t| {
        counter(t, "istio_tcp_connections_closed_total", &src) == 2.0
    });
}

#[test]
fn a_destination_with_no_cluster_goes_passthrough_and_excluded_ports_and_cidrs_are_not_captured() {
    if unavailable("capture::passthrough_and_exclusions").is_some() {
        return;
    }
    let Mesh { a, b, pods } = &mesh(
        &["--exclude-cidrs", &format!("{B_IP2}/32")],
        &["--exclude-ports", "15090,15021,15020,7071"],
        "auto",
    );
    let plain = echo_server_in(&pods.b, "0.0.0.0:7070");
    let excluded_port = echo_server_in(&pods.b, "0.0.0.0:7071");
    let data = b"no cluster for this one".to_vec();

    // No cluster has 10.77.0.2:7070: relayed as it was, named PassthroughCluster.
    let s = connect_in(&pods.a, &format!("{B_IP}:7070")).unwrap();
    assert_eq!(echo_back(s, &data), data);
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
    drop(echo_back(s, b""));
    let peer: SocketAddr = excluded_port.recv_timeout(common::DEADLINE).unwrap();
    assert_eq!(peer.ip().to_string(), A_IP, "not captured inbound");

    // An excluded CIDR: pod A's rules leave it alone; B still captures it inbound.
    let s = connect_in(&pods.a, &format!("{B_IP2}:7070")).unwrap();
    assert_eq!(echo_back(s, &data), data);
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

    // Nothing listens on the original port: B's connection from 127.0.0.6 is refused, the
    // client is closed, and B counts it with `UF`, as for any failed upstream.
    let mut s = connect_in(&pods.a, &format!("{B_IP}:7072")).unwrap();
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "closed, nothing relayed");
    let refused = [("reporter", "destination"), ("response_flags", "UF")];
    b.wait_for_scrape("UF at B", |t| counter(t, "istio_tcp_connections_closed_total", &refused) == 1.0);
}

#[test]
fn a_captured_connection_to_the_proxys_own_port_is_refused_and_counted_not_relayed() {
    if unavailable("capture::loop_refused").is_some() {
        return;
    }
    let Mesh { a, pods, .. } = &mesh(&[], &[], "auto");
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

/// Istio's two capture listeners on `[::]`, which take IPv4 (v4-mapped) and IPv6 alike.
fn dual_stack_yaml(workload: &str, clusters: &str) -> String {
    format!(
        "node: {{workload_name: {workload}, namespace: default, labels: {{app: {workload}}}}}
workers: 1
metrics: {{listen: 127.0.0.1:15090}}
admin: {{listen: 127.0.0.1:15000}}
health: {{listen: 'off'}}
listeners:
  - {{name: virtual-outbound, listen: '[::]:15001', direction: outbound, peer_exchange: always, capture: outbound}}
  - {{name: virtual-inbound, listen: '[::]:15006', direction: inbound, peer_exchange: always, capture: inbound}}
clusters: {clusters}
"
    )
}

#[test]
fn ipv6_is_captured_both_ways_with_ipv6_rules_and_clean_removes_them() {
    if unavailable("capture::ipv6_both_ways").is_some() {
        return;
    }
    let pods = Pods::new();
    pods.add_ipv6();
    let saved = |ns: &str| {
        let v6: Vec<String> = exec(ns, &["ip6tables-save"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect();
        (iptables_save(ns), v6, exec(ns, &["ip", "-6", "addr", "show", "dev", "lo"]))
    };
    // Rules that were there before ours: kept. (They also make the nat tables exist, which
    // the nft backend creates only with a first rule.)
    exec(&pods.b, &["iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9/32", "-j", "RETURN"]);
    exec(&pods.b, &["ip6tables", "-t", "nat", "-A", "OUTPUT", "-d", "fd00:9::9/128", "-j", "RETURN"]);
    let before = saved(&pods.b);
    apply(&pods.a, &["--ipv6"]);
    apply(&pods.b, &["--ipv6"]);
    let clusters =
        "[{name: web, service: web.default.svc.cluster.local, endpoints: [{address: '[fd00:77::2]:7070'}]}]";
    let a = Sidecar::spawn(&pods.a, &dual_stack_yaml("client", clusters));
    let b = Sidecar::spawn(&pods.b, &dual_stack_yaml("web", "[]"));
    let seen = echo_server_in(&pods.b, "[::]:7070");

    // IPv6 (IP6T_SO_ORIGINAL_DST on both sides): A routes to the cluster, B relays from ::6.
    let s = connect_in(&pods.a, &format!("[{B_IP6}]:7070")).expect("IPv6 connect");
    assert_eq!(echo_back(s, b"over IPv6"), b"over IPv6");
    assert_eq!(seen.recv_timeout(common::DEADLINE).unwrap().ip().to_string(), "::6");
    // IPv4 through the same dual-stack listeners: passthrough at A, 127.0.0.6 at B.
    let s = connect_in(&pods.a, &format!("{B_IP}:7070")).expect("IPv4 connect");
    assert_eq!(echo_back(s, b"over IPv4"), b"over IPv4");
    assert_eq!(seen.recv_timeout(common::DEADLINE).unwrap().ip().to_string(), "::ffff:127.0.0.6");

    let v6 = [("destination_service", "web.default.svc.cluster.local"), ("destination_workload", "web")];
    a.wait_for_scrape("the IPv6 connection", |t| {
        counter(t, "istio_tcp_connections_closed_total", &v6) == 1.0
    });
    let v4 = [("destination_service", "10.77.0.2:7070"), ("destination_service_name", "PassthroughCluster")];
    a.wait_for_scrape("the IPv4 connection", |t| {
        counter(t, "istio_tcp_connections_closed_total", &v4) == 1.0
    });
    let inbound = [("reporter", "destination"), ("destination_workload", "web")];
    b.wait_for_scrape("both at B", |t| counter(t, "istio_tcp_connections_closed_total", &inbound) == 2.0);

    drop((a, b));
    let (code, _, err) = iptables(&pods.b, &["--clean", "--ipv6"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(saved(&pods.b), before, "--clean --ipv6 restores both tables and lo");
}

#[test]
fn without_iptables_apply_fails_in_one_line_with_exit_1() {
    // No namespace needed: nothing can be changed when the tool is not there.
    let out = Command::new(bin()).args(["iptables", "--apply"]).env("PATH", "/nonexistent").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ringside: iptables: iptables: "), "{err}");
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

/// An outbound listener as istiod writes one per TCP service port, not bound to its port:
/// reached only through virtualOutbound by original destination; with or without `istio.stats`.
fn service_listener(listen: SocketAddr, cluster: &str, stats: bool) -> ads::lds::Listener {
    let mut l = ads::tcp_listener(&format!("{}_{}", listen.ip(), listen.port()), listen, &[(cluster, 1)]);
    l.bind_to_port = Some(ads::BoolValue { value: false });
    if !stats {
        l.filter_chains[0].filters.retain(|f| f.name != "istio.stats");
    }
    l
}

/// istiod's virtualOutbound: `use_original_dst` on the capture port, one chain (`istio.stats`,
/// tcp_proxy to PassthroughCluster).
fn virtual_outbound() -> ads::lds::Listener {
    let mut l =
        ads::tcp_listener("virtualOutbound", "0.0.0.0:15001".parse().unwrap(), &[("PassthroughCluster", 1)]);
    l.use_original_dst = Some(ads::BoolValue { value: true });
    l
}

/// A sidecar in `ns` (workload `WORKLOAD-v1`, app `WORKLOAD`) configured only by xDS from
/// `snapshot`, served on a unix socket; returned once its /config_dump names every one of
/// `applied` (the endpoints come last), so no connection sees half the config.
fn xds_sidecar(
    ns: &str,
    workload: &str,
    snapshot: ads::Snapshot,
    applied: &[String],
) -> (Sidecar, ads::AdsServer) {
    let (tx, _requests) = std::sync::mpsc::channel();
    let server = ads::AdsServer::start_for_sidecar(&format!("capture-{workload}"), snapshot, tx);
    let sidecar = Sidecar::spawn(
        ns,
        &format!(
            "node:\n  workload_name: {workload}-v1\n  namespace: default\n  \
             labels: {{app: {workload}, version: v1}}\nworkers: 1\nmetrics: {{listen: 127.0.0.1:15090}}\n\
             admin: {{listen: 127.0.0.1:15000}}\nhealth: {{listen: 'off'}}\nxds: {{address: \"{}\"}}\n",
            server.unix_address()
        ),
    );
    let admin = sidecar.admin;
    wait_for("the xDS config in place", || {
        let dump = netns::in_ns(ns, move || common::http(admin, "GET", "/config_dump"))?.1;
        applied.iter().all(|s| dump.contains(s.as_str())).then_some(())
    });
    (sidecar, server)
}

#[test]
fn a_connection_captured_to_a_service_is_counted_as_the_listener_istiod_wrote_for_it_says() {
    if unavailable("capture::xds_service_listeners").is_some() {
        return;
    }
    const REDIS: &str = "outbound|6379||redis.default.svc.cluster.local";
    const MONGO: &str = "outbound|27017||mongo.default.svc.cluster.local";
    let pods = Pods::new();
    apply(&pods.a, &[]);
    for port in ["6379", "27017", "8080"] {
        echo_server_in(&pods.b, &format!("0.0.0.0:{port}"));
    }
    let at = |port: u16| SocketAddr::new(B_IP.parse().unwrap(), port);
    let original_dst = ads::cds::Cluster {
        name: "PassthroughCluster".into(),
        cluster_discovery_type: Some(ads::cds::cluster::ClusterDiscoveryType::Type(
            ads::cds::cluster::DiscoveryType::OriginalDst as i32,
        )),
        ..Default::default()
    };
    // Plaintext endpoints (no sidecar in B), with the workload istiod writes for them.
    let endpoints = |cluster: &str, port: u16, workload: &str| {
        ads::without_sidecar(ads::assignment(cluster, &[(at(port), workload)]), at(port))
    };
    let snapshot = ads::Snapshot {
        version: "1".into(),
        clusters: vec![
            ads::eds_cluster(REDIS, "redis.default.svc.cluster.local", "default"),
            ads::eds_cluster(MONGO, "mongo.default.svc.cluster.local", "default"),
            original_dst,
        ],
        endpoints: vec![
            endpoints(REDIS, 6379, "redis-v1;default;redis;v1;Kubernetes"),
            endpoints(MONGO, 27017, "mongo-v1;default;mongo;v1;Kubernetes"),
        ],
        listeners: vec![
            virtual_outbound(),
            service_listener("10.96.0.20:6379".parse().unwrap(), REDIS, true),
            service_listener("10.96.0.30:27017".parse().unwrap(), MONGO, false),
        ],
        secrets: vec![],
    };
    let applied = ["virtualOutbound".to_string(), at(6379).to_string(), at(27017).to_string()];
    let (a, server) = xds_sidecar(&pods.a, "productpage", snapshot, &applied);

    // Mongo's listener has no istio.stats: relayed, not counted. Then redis's, counted.
    // (The capture listener binds on the worker's next tick: refused until then, uncounted.)
    let mongo = wait_for("virtualOutbound bound", || connect_in(&pods.a, "10.96.0.30:27017").ok());
    assert_eq!(echo_back(mongo, b"find"), b"find");
    let redis = connect_in(&pods.a, "10.96.0.20:6379").expect("connect to redis's ClusterIP");
    assert_eq!(echo_back(redis, b"PING\r\n"), b"PING\r\n");
    // No listener has B's port 8080: virtualOutbound's own chain, counted as passthrough.
    let other = connect_in(&pods.a, &format!("{B_IP}:8080")).expect("connect to B");
    assert_eq!(echo_back(other, b"hi"), b"hi");
    let text = a.wait_for_scrape("both counted connections closed", |t| {
        sum(t, "istio_tcp_connections_closed_total", &[]) == 2.0
    });
    let source = "reporter=\"source\",source_workload=\"productpage-v1\",source_canonical_service=\"productpage\",\
        source_canonical_revision=\"v1\",source_workload_namespace=\"default\",source_principal=\"unknown\",\
        source_app=\"productpage\",source_version=\"v1\",source_cluster=\"Kubernetes\"";
    let redis = format!(
        "{source},destination_workload=\"redis-v1\",destination_workload_namespace=\"default\",\
         destination_principal=\"unknown\",destination_app=\"unknown\",destination_version=\"unknown\",\
         destination_service=\"redis.default.svc.cluster.local\",destination_canonical_service=\"redis\",\
         destination_canonical_revision=\"v1\",destination_service_name=\"redis\",\
         destination_service_namespace=\"default\",destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",\
         response_flags=\"-\",connection_security_policy=\"unknown\""
    );
    let passthrough = format!(
        "{source},destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",\
         destination_principal=\"unknown\",destination_app=\"unknown\",destination_version=\"unknown\",\
         destination_service=\"{B_IP}:8080\",destination_canonical_service=\"unknown\",\
         destination_canonical_revision=\"latest\",destination_service_name=\"PassthroughCluster\",\
         destination_service_namespace=\"unknown\",destination_cluster=\"unknown\",request_protocol=\"tcp\",\
         response_flags=\"-\",connection_security_policy=\"unknown\""
    );
    let mut want = Vec::new();
    for (labels, sent, received) in [(&redis, 6, 6), (&passthrough, 2, 2)] {
        want.push(format!("istio_tcp_connections_closed_total{{{labels}}} 1"));
        want.push(format!("istio_tcp_connections_opened_total{{{labels}}} 1"));
        want.push(format!("istio_tcp_received_bytes_total{{{labels}}} {received}"));
        want.push(format!("istio_tcp_sent_bytes_total{{{labels}}} {sent}"));
    }
    want.sort();
    assert_eq!(istio_series(&text), want, "{text}");
    drop(a);
    drop(server);
}

#[test]
fn a_captured_inbound_connection_is_counted_as_the_virtual_inbound_chain_that_served_it_says() {
    if unavailable("capture::xds_virtual_inbound").is_some() {
        return;
    }
    use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
    use envoy_types::pb::google::protobuf::UInt32Value;
    const HOST: &str = "ratings.default.svc.cluster.local";
    let pods = Pods::new();
    apply(&pods.b, &[]);
    for port in ["9080", "9090", "9091"] {
        echo_server_in(&pods.b, &format!("0.0.0.0:{port}"));
    }
    // istiod's virtualInbound under PeerAuthentication DISABLE: plaintext chains only, one per
    // service port (9080 with istio.stats, 9091 here without), and the passthrough chain
    // (istio.stats) for every other port.
    let chain = |cluster: &str, port: Option<u32>, stats: bool| {
        let mut c =
            ads::tcp_listener("x", "0.0.0.0:1".parse().unwrap(), &[(cluster, 1)]).filter_chains.remove(0);
        if !stats {
            c.filters.retain(|f| f.name != "istio.stats");
        }
        c.filter_chain_match = port.map(|p| ads::lds::FilterChainMatch {
            destination_port: Some(UInt32Value { value: p }),
            ..Default::default()
        });
        c
    };
    let mut inbound = ads::tcp_listener("virtualInbound", "0.0.0.0:15006".parse().unwrap(), &[("x", 1)]);
    inbound.traffic_direction = TrafficDirection::Inbound as i32;
    inbound.use_original_dst = Some(ads::BoolValue { value: true });
    inbound.filter_chains = vec![
        chain("inbound|9080||", Some(9080), true),
        chain("inbound|9091||", Some(9091), false),
        chain("InboundPassthroughCluster", None, true),
    ];
    let local = |name: &str, port: u16| {
        let mut c = ads::static_cluster(name, SocketAddr::from(([127, 0, 0, 1], port)));
        c.metadata = ads::eds_cluster(name, HOST, "default").metadata;
        c
    };
    let passthrough = ads::cds::Cluster {
        name: "InboundPassthroughCluster".into(),
        cluster_discovery_type: Some(ads::cds::cluster::ClusterDiscoveryType::Type(
            ads::cds::cluster::DiscoveryType::OriginalDst as i32,
        )),
        ..Default::default()
    };
    let snapshot = ads::Snapshot {
        version: "1".into(),
        clusters: vec![local("inbound|9080||", 9080), local("inbound|9091||", 9091), passthrough],
        endpoints: vec![],
        listeners: vec![inbound],
        secrets: vec![],
    };
    let applied = ["virtualInbound", "inbound|9091||", "InboundPassthroughCluster"].map(String::from);
    let (b, server) = xds_sidecar(&pods.b, "ratings", snapshot, &applied);
    // A client in A (no sidecar, no capture): the 9091 chain has no istio.stats.
    let first = wait_for("virtualInbound bound", || connect_in(&pods.a, &format!("{B_IP}:9091")).ok());
    assert_eq!(echo_back(first, b"uncounted"), b"uncounted");
    let service = connect_in(&pods.a, &format!("{B_IP}:9080")).unwrap();
    assert_eq!(echo_back(service, b"ratings"), b"ratings");
    let other = connect_in(&pods.a, &format!("{B_IP}:9090")).unwrap();
    assert_eq!(echo_back(other, b"other"), b"other");

    let text = b.wait_for_scrape("both counted connections closed", |t| {
        sum(t, "istio_tcp_connections_closed_total", &[]) == 2.0
    });
    assert_eq!(sum(&text, "istio_tcp_connections_opened_total", &[]), 2.0, "{text}");
    let served = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("destination_workload", "ratings-v1"),
        ("destination_service", HOST),
        ("destination_service_name", "ratings"),
        ("connection_security_policy", "none"),
        ("response_flags", "-"),
    ];
    assert_eq!(sum(&text, "istio_tcp_connections_closed_total", &served), 1.0, "{text}");
    assert_eq!(sum(&text, "istio_tcp_received_bytes_total", &served), 7.0, "{text}");
    let passthrough =
        [("reporter", "destination"), ("destination_workload", "ratings-v1"), ("response_flags", "-")];
    assert_eq!(sum(&text, "istio_tcp_received_bytes_total", &passthrough), 12.0, "7 + 5: {text}");
    assert_eq!(istio_series(&text).len(), 8, "two label sets, four families: {text}");
    drop(b);
    drop(server);
}
