//! SPEC §3 and §5 through the real binary: Istio's TCP metrics as two sidecars report them, the
//! reporting tick, response flags, the admin, metrics and health listeners, the `ringside_*`
//! process metrics, promtool on a live scrape, and the label set cap.

mod common;
#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/istio_tcp.rs"]
mod istio_tcp;
#[path = "common/mesh.rs"]
mod mesh;
#[path = "common/promtool.rs"]
mod promtool;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use mesh::{golden_pair, hello_world};
use ringside::exchange::{self, NodeMetadata};
use ringside::metrics::LABEL_NAMES;

// ---- arrange ---------------------------------------------------------------------------------

/// A plain outbound sidecar (no exchange) to `upstream`.
fn plain(upstream: SocketAddr, extra: &[&str]) -> Ringside {
    let mut args =
        vec!["--peer-exchange", "off", "--workload-name", "productpage-v1", "--namespace", "default"];
    args.extend_from_slice(extra);
    Ringside::spawn(upstream, "outbound", &args)
}

/// Write `bytes` and read their echo.
fn echo(c: &mut TcpStream, bytes: &[u8]) {
    c.write_all(bytes).unwrap();
    assert_eq!(read_exact(c, bytes.len()), bytes);
}

/// The value of the only series of `name` whose labels include `labels`; None if there is none.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition::parse(scrape).value(name, labels)
}

/// The four Istio counters of the series matching `labels`: opened, closed, received, sent.
fn counters(scrape: &str, labels: &[(&str, &str)]) -> [Option<f64>; 4] {
    [OPENED, CLOSED, RECEIVED, SENT].map(|n| value(scrape, n, labels))
}

fn some(v: [u64; 4]) -> [Option<f64>; 4] {
    v.map(|v| Some(v as f64))
}

/// A bound for one reporting tick of 1 s (plus the 100 ms worker tick) on a loaded 2-core box;
/// well under the 15 s default, so a tick that ignores the flag fails.
const ONE_TICK: Duration = Duration::from_secs(6);

// ---- 1. Istio's scenario ---------------------------------------------------------------------

#[test]
fn istios_tcp_exchange_scenario_reports_exact_counts_and_all_23_labels_in_istio_order_on_both_sidecars() {
    let (client, server) = golden_pair(&[]);
    for _ in 0..10 {
        hello_world(client.listen);
    }
    let source = client.wait_for_value(CLOSED, &[("reporter", "source")], 10.0);
    let destination = server.wait_for_value(CLOSED, &[("reporter", "destination")], 10.0);
    // Istio's run is over mTLS. Ours is plaintext (peer exchange `always`), so every principal
    // is `unknown` and connection_security_policy is `none` for reporter=destination (SPEC §3;
    // it stays `unknown` for reporter=source). Every other label, the order of all 23, and the
    // values (10, 10, 60, 120) are Istio's.
    for (scrape, side) in [(&source, istio_tcp::Side::Client), (&destination, istio_tcp::Side::Server)] {
        for (metric, _) in istio_tcp::counts() {
            let expected = istio_tcp::family(metric, side, istio_tcp::Run::Plaintext);
            let names: Vec<&str> = expected.series[0].0.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(names, LABEL_NAMES, "{metric}: SPEC §3 label order");
            istio_tcp::assert_exact_family(scrape, &expected, &format!("{side:?} {metric}"));
        }
    }
}

// ---- 2. and 3. when bytes are reported ---------------------------------------------------------

#[test]
fn a_live_connection_reports_its_bytes_every_tcp_reporting_duration_and_its_exact_totals_at_close() {
    let rs = plain(echo_server(), &["--tcp-reporting-duration", "1s"]);
    let mut c = connect(rs.listen);
    echo(&mut c, b"abc");
    let live = [("reporter", "source"), ("response_flags", "-")];
    // Opened is counted when the peer settles, long before the close.
    let s = rs.wait_for_scrape("opened=1", DEADLINE, |s| value(s, OPENED, &live) == Some(1.0));
    assert_eq!(value(&s, CLOSED, &live), Some(0.0));
    // The tick reports the live connection's bytes without closing it.
    let s = rs.wait_for_scrape("the first tick", ONE_TICK, |s| counters(s, &live) == some([1, 0, 3, 3]));
    assert_eq!(counters(&s, &live), some([1, 0, 3, 3]));
    echo(&mut c, b"defgh");
    rs.wait_for_scrape("the next tick", ONE_TICK, |s| counters(s, &live) == some([1, 0, 8, 8]));
    echo(&mut c, b"ij");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"");
    drop(c);
    // The scrape that first shows the close shows the exact totals.
    let s = rs.wait_for_value(CLOSED, &live, 1.0);
    assert_eq!(counters(&s, &live), some([1, 1, 10, 10]));
}

#[test]
fn a_scrape_right_after_a_connection_closed_shows_its_exact_final_byte_counts() {
    // Default tcp_reporting_duration (15 s): only the close can have reported these bytes.
    let rs = plain(echo_server(), &[]);
    let payload = Rng(3).bytes(100_000);
    assert!(echo_back(connect(rs.listen), &payload) == payload);
    let s = rs.wait_for_value(CLOSED, &[("reporter", "source")], 1.0);
    assert_eq!(counters(&s, &[("reporter", "source")]), some([1, 1, 100_000, 100_000]));
}

// ---- 4. response flags -------------------------------------------------------------------------

// `NR` (no route) is not reachable from flags: `--upstream` always gives the one listener a
// cluster with endpoints. A `service:` host without cluster or route gives it (SPEC §6);
// tests/istio.rs checks it.

#[test]
fn an_upstream_connect_failure_is_counted_opened_and_closed_with_response_flags_uf() {
    let refused = free_addr(); // bound and released: nothing listens there
    let rs = plain(refused, &["--service", "db.prod.svc.cluster.local"]);
    for _ in 0..3 {
        let mut c = connect(rs.listen);
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut got);
        assert!(got.is_empty(), "the downstream is closed without bytes");
    }
    let s = rs.wait_for_value(CLOSED, &[], 3.0);
    // The first connection on a worker finds the endpoint healthy: UF. It is then ejected
    // (SPEC §6), so the next ones, tried anyway and refused again, find no healthy upstream: UH.
    let (uf, uh) = ([("response_flags", "UF")], [("response_flags", "UH")]);
    let flagged = |labels: &[(&str, &str)]| common::sum(&s, CLOSED, labels);
    assert!(flagged(&uf) >= 1.0, "{s}");
    assert_eq!(flagged(&uf) + flagged(&uh), 3.0, "{s}");
    assert_eq!(common::sum(&s, OPENED, &[]), 3.0, "{s}");
    assert_eq!(common::sum(&s, RECEIVED, &[]), 0.0, "{s}");
    let parsed = exposition::parse(&s);
    let series = parsed.family(OPENED);
    assert!((1..=2).contains(&series.len()), "only the UF and UH series: {series:?}");
    for (k, v) in [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("destination_workload", "unknown"),
        ("destination_service", "db.prod.svc.cluster.local"),
        ("destination_service_name", "db"),
        ("destination_service_namespace", "prod"),
        ("connection_security_policy", "unknown"),
    ] {
        for one in &series {
            assert!(one.labels.contains(&(k.into(), v.into())), "{k}={v} in {:?}", one.labels);
        }
    }
}

#[test]
fn a_connection_over_max_connections_is_accepted_closed_and_counted_with_response_flags_uo() {
    let (upstream, conns) = manual_server();
    let rs = plain(upstream, &["--max-connections", "1", "--service", "db.prod.svc.cluster.local"]);
    let mut held = connect(rs.listen);
    held.write_all(b"x").unwrap();
    let mut up = next_conn(&conns);
    assert_eq!(read_exact(&mut up, 1), b"x"); // the one allowed connection is live
    for _ in 0..2 {
        let mut c = connect(rs.listen);
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut got);
        assert!(got.is_empty());
    }
    let uo = [("response_flags", "UO")];
    let s = rs.wait_for_value(CLOSED, &uo, 2.0);
    assert_eq!(counters(&s, &uo), some([2, 2, 0, 0]));
    assert_eq!(value(&s, "ringside_listener_overflowed_total", &[]), Some(2.0));
    for (k, v) in [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("destination_service", "db.prod.svc.cluster.local"),
        ("destination_service_name", "db"),
        ("destination_service_namespace", "prod"),
    ] {
        assert_eq!(value(&s, OPENED, &[uo[0], (k, v)]), Some(2.0), "{k}={v}");
    }
    // The held connection is untouched: opened, not closed, and still relaying.
    assert_eq!(value(&s, OPENED, &[("response_flags", "-")]), Some(1.0));
    assert_eq!(value(&s, CLOSED, &[("response_flags", "-")]), Some(0.0));
    up.write_all(b"y").unwrap();
    assert_eq!(read_exact(&mut held, 1), b"y");
}

// ---- 5. admin, metrics and health listeners -------------------------------------------------

/// The `# TYPE` lines of a scrape, sorted.
fn families(scrape: &str) -> Vec<String> {
    let mut f: Vec<String> = scrape.lines().filter(|l| l.starts_with("# TYPE ")).map(str::to_owned).collect();
    f.sort();
    f
}

#[test]
fn stats_prometheus_is_text_0_0_4_with_the_same_families_on_the_metrics_and_the_admin_listener() {
    let rs = plain(echo_server(), &[]);
    let mut c = connect(rs.listen);
    echo(&mut c, b"ping");
    drop(c);
    rs.wait_for_value(CLOSED, &[], 1.0);
    let metrics = http_response(rs.metrics.unwrap(), "GET", "/stats/prometheus").unwrap();
    let admin = http_response(rs.admin, "GET", "/stats/prometheus").unwrap();
    for r in [&metrics, &admin] {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    }
    let f = families(&metrics.body);
    assert!(f.contains(&format!("# TYPE {OPENED} counter")), "{f:?}");
    assert!(f.contains(&"# TYPE ringside_build_info gauge".to_string()), "{f:?}");
    assert_eq!(f, families(&admin.body));
    // Same numbers too (nothing moves between the two scrapes).
    assert_eq!(counters(&metrics.body, &[]), counters(&admin.body, &[]));
    assert_eq!(counters(&admin.body, &[]), some([1, 1, 4, 4]));
    // The metrics listener serves metrics only.
    assert_eq!(http(rs.metrics.unwrap(), "GET", "/config_dump").map(|r| r.0), Some(404));
}

#[test]
fn config_dump_is_json_with_the_listener_name_and_the_address_it_is_bound_on() {
    let upstream = echo_server();
    // Port 0: the effective address is only known after the bind.
    let config = format!(
        "listeners:\n  - name: outbound-echo\n    listen: 127.0.0.1:0\n    direction: outbound\n    \
         peer_exchange: 'off'\n    cluster: echo\nclusters:\n  - name: echo\n    endpoints: [{{address: \"{upstream}\"}}]\n"
    );
    let rs = Ringside::spawn_config(&config, "127.0.0.1:0".parse().unwrap(), &[]);
    let r = http_response(rs.admin, "GET", "/config_dump").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let dump: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let listener = &dump["listeners"][0];
    assert_eq!(listener["name"], "outbound-echo");
    let bound: SocketAddr = listener["listen"].as_str().expect("listen address").parse().unwrap();
    assert_eq!(bound.ip().to_string(), "127.0.0.1");
    assert_ne!(bound.port(), 0, "config_dump shows the effective (bound) address");
    let mut c = connect(bound);
    echo(&mut c, b"it is the real one");
}

#[test]
fn post_drain_stops_accepting_turns_ready_503_and_keeps_live_connections_and_metrics_until_sigterm() {
    let health = free_addr();
    let health_arg = health.to_string();
    let mut rs = plain(echo_server(), &["--health", &health_arg, "--drain-timeout", "60s"]);
    assert_eq!(http(rs.admin, "GET", "/ready").map(|r| r.0), Some(200));
    assert_eq!(http(health, "GET", "/healthz/ready").map(|r| r.0), Some(200));
    let mut live = connect(rs.listen);
    echo(&mut live, b"before");
    assert_eq!(http(rs.admin, "POST", "/drain").map(|r| r.0), Some(200));
    assert_eq!(http(rs.admin, "GET", "/ready").map(|r| r.0), Some(503));
    assert_eq!(http(health, "GET", "/healthz/ready").map(|r| r.0), Some(503));
    // New connections are refused once the listeners are closed (the tick closes them).
    wait_for("the listener to close", || TcpStream::connect(rs.listen).is_err().then_some(()));
    // Draining lets the live connection finish: it still relays.
    echo(&mut live, b"during");
    live.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut live), b"");
    drop(live);
    // As Envoy's drain_listeners, the process stays up, its final numbers scrapeable...
    rs.wait_for_value("ringside_connections_active", &[], 0.0);
    assert!(rs.running(), "a drain alone must not end the process");
    // ...until SIGTERM, which exits at once since nothing is live (well before 60 s).
    rs.signal("TERM");
    let status = rs.wait_exit();
    assert!(status.success(), "{status}");
}

#[test]
fn metrics_off_binds_no_metrics_listener_even_when_the_file_configures_one() {
    let upstream = echo_server();
    let configured = free_addr();
    let listen = free_addr();
    let config = format!(
        "metrics: {{listen: \"{configured}\"}}\nlisteners:\n  - name: main\n    listen: {listen}\n    \
         direction: outbound\n    peer_exchange: 'off'\n    cluster: echo\nclusters:\n  - name: echo\n    \
         endpoints: [{{address: \"{upstream}\"}}]\n"
    );
    let rs = Ringside::spawn_config(&config, listen, &["--metrics", "off"]);
    assert!(rs.metrics.is_none());
    assert!(TcpStream::connect_timeout(&configured, Duration::from_secs(1)).is_err(), "something listens");
    // The admin listener still serves the metrics.
    assert!(rs.scrape().contains("# TYPE ringside_build_info gauge"));
}

// ---- 6. ringside_* -----------------------------------------------------------------------------

#[test]
fn ringside_connections_active_counts_a_live_connection_on_its_worker_and_drops_to_0_at_close() {
    let rs = plain(echo_server(), &["--workers", "2"]);
    let s = rs.scrape();
    for w in ["0", "1"] {
        assert_eq!(value(&s, "ringside_connections_active", &[("worker", w)]), Some(0.0), "worker {w}");
    }
    let mut c = connect(rs.listen);
    echo(&mut c, b"live");
    let s = rs.wait_for_value("ringside_connections_active", &[], 1.0);
    let per_worker: Vec<f64> = ["0", "1"]
        .iter()
        .map(|w| value(&s, "ringside_connections_active", &[("worker", w)]).unwrap())
        .collect();
    assert!(per_worker == [1.0, 0.0] || per_worker == [0.0, 1.0], "{per_worker:?}");
    drop(c);
    rs.wait_for_value("ringside_connections_active", &[], 0.0);
}

#[test]
fn ringside_exchange_total_counts_metadata_added_once_on_each_sidecar_of_an_exchange() {
    let (client, server) = golden_pair(&[]);
    hello_world(client.listen);
    for rs in [&client, &server] {
        let s = rs.wait_for_value(CLOSED, &[], 1.0);
        let parsed = exposition::parse(&s);
        let outcomes: Vec<(String, f64)> = parsed
            .family("ringside_exchange_total")
            .iter()
            .map(|s| (s.labels[0].1.clone(), s.value))
            .filter(|(_, v)| *v != 0.0)
            .collect();
        assert_eq!(outcomes, [("metadata_added".to_string(), 1.0)]);
    }
}

#[test]
fn ringside_driver_info_names_the_driver_and_build_info_the_version() {
    let rs = plain(echo_server(), &["--driver", "epoll"]);
    let s = rs.scrape();
    let parsed = exposition::parse(&s);
    let driver = parsed.family("ringside_driver_info");
    assert_eq!(driver.len(), 1);
    assert_eq!(driver[0].labels, [("driver".to_string(), "epoll".to_string())]);
    assert_eq!(driver[0].value, 1.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(value(&s, "ringside_build_info", &[("version", version)]), Some(1.0));
    assert_eq!(parsed.family("ringside_build_info").len(), 1);
}

// ---- 7. promtool ---------------------------------------------------------------------------------

#[test]
fn promtool_reports_nothing_on_a_live_scrape_after_traffic() {
    let (client, server) = golden_pair(&[]);
    hello_world(client.listen);
    for rs in [&client, &server] {
        let s = rs.wait_for_value(CLOSED, &[], 1.0);
        promtool::check_metrics(&s);
    }
}

// ---- 8. the label set cap -----------------------------------------------------------------------

#[test]
fn beyond_max_label_sets_new_label_sets_fold_into_one_overflow_series_and_are_counted() {
    let rs = Ringside::spawn(
        echo_server(),
        "inbound",
        &[
            "--peer-exchange",
            "always",
            "--max-label-sets",
            "5",
            "--workers",
            "1",
            "--workload-name",
            "ratings-v1",
            "--namespace",
            "default",
        ],
    );
    for i in 0..12 {
        let client = NodeMetadata {
            workload_name: format!("client-{i}"),
            namespace: "default".into(),
            labels: [("app".to_string(), "client".to_string())].into(),
            ..NodeMetadata::default()
        };
        let mut bytes = exchange::encode(&client);
        bytes.extend_from_slice(b"ping");
        let mut c = connect(rs.listen);
        c.write_all(&bytes).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let got = read_to_end(&mut c);
        assert!(got.ends_with(b"ping") && got.len() > 4, "their preamble, then the echo");
    }
    let s = rs.wait_for_value(CLOSED, &[], 12.0);
    let parsed = exposition::parse(&s);
    assert_eq!(parsed.family(OPENED).len(), 6, "5 label sets + the overflow series");
    // Sequential connections on one worker: the first five got the budget.
    for i in 0..5 {
        let workload = format!("client-{i}");
        assert_eq!(counters(&s, &[("source_workload", &workload)]), some([1, 1, 4, 4]), "{workload}");
    }
    let overflow = parsed.family(OPENED).into_iter().find(|s| s.labels[1].1 == "overflow").unwrap();
    let expected: Vec<(String, String)> = LABEL_NAMES
        .iter()
        .map(|n| (n.to_string(), if *n == "reporter" { "destination" } else { "overflow" }.to_string()))
        .collect();
    assert_eq!(overflow.labels, expected);
    assert_eq!(counters(&s, &[("source_workload", "overflow")]), some([7, 7, 28, 28]));
    assert_eq!(value(&s, "ringside_label_sets_overflowed_total", &[]), Some(7.0));
}

#[test]
fn silent_clients_on_the_admin_listener_do_not_hold_up_a_readiness_probe() {
    let rs = plain(echo_server(), &[]);
    // Five clients connect and say nothing; each is read with a 2 s timeout.
    let silent: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(rs.admin).unwrap()).collect();
    let asked = std::time::Instant::now();
    assert_eq!(http(rs.admin, "GET", "/ready").map(|r| r.0), Some(200));
    // Served one by one, the probe would wait behind them for 10 s.
    assert!(asked.elapsed() < std::time::Duration::from_secs(1), "probe took {:?}", asked.elapsed());
    drop(silent);
}
