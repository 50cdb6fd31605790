//! SPEC §6 and §3: Istio's own YAML (`--istio`), routing by VirtualService tcp routes per
//! `match.port`, identities of the chosen endpoint, no route (`NR`), and outlier ejection.
//! Real binary, real sockets. The Bookinfo-shaped YAML is the project's own
//! (`tests/data/istio/bookinfo-like`); `conformance::` runs the same checks on Istio's own
//! Bookinfo files from `../shared/istio/bookinfo`, or prints a SKIP line without them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use common::run_to_end as ringside;
use common::{DEADLINE, Ringside, sum, tag_server_on, wait_for};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/istio");

/// A directory of Bookinfo's networking YAML with Kubernetes objects beside it, and which of
/// its files holds what.
struct Bookinfo {
    dir: String,
    /// DestinationRules of productpage, reviews, ratings and details, without traffic policy.
    rules: &'static str,
    /// The same four rules with `ISTIO_MUTUAL`; ratings' rule is document 3.
    mtls_rules: &'static str,
    /// VirtualServices of reviews and ratings with HTTP routes only; ratings' is document 2.
    http_routes: &'static str,
    /// Where the Deployment mongodb-v1 is: `FILE: document N`.
    mongodb_deployment: &'static str,
}

/// The project's own Bookinfo-shaped YAML.
fn own_bookinfo() -> Bookinfo {
    Bookinfo {
        dir: format!("{DATA}/bookinfo-like"),
        rules: "rules.yaml",
        mtls_rules: "rules-mtls.yaml",
        http_routes: "routes-http.yaml",
        mongodb_deployment: "workloads.yaml: document 2",
    }
}

/// Istio's own Bookinfo files in `../shared/istio/bookinfo`, or a SKIP line.
fn istios_bookinfo(test: &str) -> Option<Bookinfo> {
    let dir = common::shared("istio/bookinfo", &format!("istio::conformance::{test}"))?;
    Some(Bookinfo {
        dir: dir.display().to_string(),
        rules: "destination-rule-all.yaml",
        mtls_rules: "destination-rule-all-mtls.yaml",
        http_routes: "virtual-service-ratings-db.yaml",
        mongodb_deployment: "bookinfo-db.yaml: document 2",
    })
}

/// A fresh directory under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringside-istio-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copy `tests/data/istio/local` and the ratings-v2 config into a temp dir, moving every
/// `127.0.10.` address to `127.0.<net>.`, so tests running at once do not share addresses.
fn local_copy(name: &str, net: u8) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    let moved = |text: String| text.replace("127.0.10.", &format!("127.0.{net}."));
    for entry in std::fs::read_dir(Path::new(DATA).join("local")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(local.join(path.file_name().unwrap()), moved(text)).unwrap();
    }
    let config = dir.join("ringside.yaml");
    let text = std::fs::read_to_string(Path::new(DATA).join("ringside-ratings-v2.yaml")).unwrap();
    std::fs::write(&config, moved(text)).unwrap();
    (config, local)
}

/// A tagging backend on `addr` (`common::tag_server_on`).
fn tag_server(addr: SocketAddr, tag: &'static str) {
    tag_server_on(TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")), tag);
}

/// Connect through the proxy and return the tag of the backend that answered, after a
/// round trip of `ping`.
fn reached(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).unwrap();
    s.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    String::from_utf8_lossy(&tag).into_owned()
}

#[test]
fn bookinfo_files_and_local_entries_validate_and_report_what_is_not_applied() {
    validates_and_reports(&own_bookinfo());
}

#[test]
fn connections_reach_only_the_subset_the_virtual_service_names_per_match_port() {
    routes_per_match_port(&own_bookinfo(), 11);
}

/// Replays of Istio's own Bookinfo files.
mod conformance {
    use super::*;

    #[test]
    fn istios_bookinfo_files_and_local_entries_validate_and_report_what_is_not_applied() {
        if let Some(bookinfo) = istios_bookinfo("bookinfo_validates") {
            validates_and_reports(&bookinfo);
        }
    }

    #[test]
    fn with_istios_bookinfo_files_connections_reach_only_the_subset_named_per_match_port() {
        if let Some(bookinfo) = istios_bookinfo("bookinfo_routes") {
            routes_per_match_port(&bookinfo, 14);
        }
    }
}

/// `validate` with `b`'s directory and the local entries: exit 0, and one line for each thing
/// it does not apply.
fn validates_and_reports(b: &Bookinfo) {
    let bookinfo = &b.dir;
    let local = format!("{DATA}/local");
    let config = format!("{DATA}/ringside-ratings-v2.yaml");
    let (code, err) = ringside(&["validate", "--config", &config, "--istio", bookinfo, "--istio", &local]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let has = |fragment: &str| lines.iter().filter(|l| l.contains(fragment)).count();
    // Kubernetes objects in the same directory: skipped, one line each.
    assert_eq!(has("not an Istio networking document; skipped"), 4, "{err}");
    assert_eq!(has(&format!("{} (Deployment/mongodb-v1", b.mongodb_deployment)), 1, "{err}");
    // Bookinfo's HTTP routes are reported, one line per VirtualService.
    let http = format!(
        "{}: document 2 (VirtualService/ratings): spec.http: HTTP routes are not applied",
        b.http_routes
    );
    assert_eq!(has(&http), 1, "{err}");
    assert_eq!(has("spec.http"), 2, "{err}");
    // ISTIO_MUTUAL without certificates is said clearly.
    let mtls = format!(
        "{}: document 3 (DestinationRule/ratings): tls mode ISTIO_MUTUAL: cluster \
         outbound|9080||ratings.default.svc.cluster.local has no certificates",
        b.mtls_rules
    );
    assert_eq!(has(&mtls), 1, "{err}");
    // Hosts no ServiceEntry serves are named, not silently dropped.
    assert_eq!(
        has("host reviews.default.svc.cluster.local: no ServiceEntry or cluster serves it"),
        2,
        "{err}"
    );
    // Either file alone, as a FILE argument, loads too.
    for file in [b.rules, b.mtls_rules, b.http_routes] {
        let path = format!("{bookinfo}/{file}");
        let (code, err) = ringside(&["validate", "--config", &config, "--istio", &path, "--istio", &local]);
        assert_eq!(code, 0, "{file}: {err}");
    }
}

/// ratings-v2's sidecar with `b`'s directory and the local entries moved to `127.0.<net>.*`:
/// mongodb's ports 27017 and 27018 reach subsets v1 and v2, with v1's and v2's identities.
fn routes_per_match_port(b: &Bookinfo, net: u8) {
    let (config, local) = local_copy(&format!("subsets-{net}"), net);
    let at = |host: u8, port: u16| SocketAddr::from(([127, 0, net, host], port));
    tag_server(at(1, 27017), "v1");
    tag_server(at(2, 27017), "v2");
    let listen = at(100, 27017);
    let config = std::fs::read_to_string(&config).unwrap();
    let rs =
        Ringside::spawn_config(&config, listen, &["--istio", &b.dir, "--istio", local.to_str().unwrap()]);
    for _ in 0..6 {
        assert_eq!(reached(listen), "v1");
        assert_eq!(reached(at(100, 27018)), "v2");
    }
    // /config_dump shows the clusters and routes the documents made.
    let (code, dump) = common::http(rs.admin, "GET", "/config_dump").unwrap();
    assert_eq!(code, 200);
    assert!(dump.contains("\"name\": \"outbound|27017||mongodb.default.svc.cluster.local\""), "{dump}");
    assert!(dump.contains("\"match_port\": 27018"), "{dump}");
    assert!(dump.contains("\"workload_name\": \"mongodb-v1\""), "{dump}");

    // Without an exchange, the peer is the WorkloadEntry (SPEC §3).
    let v1 = [
        ("reporter", "source"),
        ("source_workload", "ratings-v2"),
        ("destination_service", "mongodb.default.svc.cluster.local"),
        ("destination_service_name", "mongodb"),
        ("destination_service_namespace", "default"),
        ("destination_workload", "mongodb-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_app", "mongodb"),
        ("destination_version", "v1"),
        ("destination_canonical_service", "mongodb"),
        ("destination_canonical_revision", "v1"),
        ("response_flags", "-"),
    ];
    let scrape = rs.wait_for_value("istio_tcp_connections_closed_total", &v1, 6.0);
    // No app label: the canonical service falls back to the workload name, as istiod's.
    let v2 = [
        ("destination_service", "mongodb.default.svc.cluster.local"),
        ("destination_workload", "mongodb-v2"),
        ("destination_app", "unknown"),
        ("destination_version", "v2"),
        ("destination_canonical_service", "mongodb-v2"),
        ("destination_canonical_revision", "v2"),
    ];
    assert_eq!(sum(&scrape, "istio_tcp_connections_opened_total", &v2), 6.0, "{scrape}");
    assert_eq!(sum(&scrape, "istio_tcp_received_bytes_total", &v1), 24.0, "{scrape}");
}

/// Write `docs` as one file in a fresh directory; return (config path, istio dir).
fn broken(name: &str, docs: &str) -> (String, String) {
    let dir = temp_dir(name);
    std::fs::write(dir.join("bad.yaml"), format!("{}\n---\n{docs}", MONGO_ENTRY)).unwrap();
    let config = dir.join("ringside.yaml");
    std::fs::write(
        &config,
        "listeners: [{name: m, listen: 127.0.0.1:1, direction: outbound, service: mongodb.default.svc.cluster.local}]\nmetrics: {listen: 127.0.0.1:0}\nadmin: {listen: 127.0.0.1:0}\nhealth: {listen: off}\n",
    )
    .unwrap();
    (config.display().to_string(), dir.display().to_string())
}

const MONGO_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mongodb}
spec:
  hosts: [mongodb.default.svc.cluster.local]
  ports: [{number: 27017, name: mongo}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mongodb}
spec: {host: mongodb, subsets: [{name: v1, labels: {version: v1}}]}";

#[test]
fn malformed_istio_documents_exit_64_with_one_line_naming_file_document_and_reason() {
    let cases = [
        (
            "syntax",
            "apiVersion: networking.istio.io/v1\nkind: [VirtualService\n",
            "bad.yaml:",
            "document 3: did not find expected",
        ),
        (
            "nohost",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\nspec: {hosts: [mongodb], tcp: [{route: [{destination: {subset: v1}}]}]}\n",
            "bad.yaml: document 3 (VirtualService/db): ",
            "spec.tcp[0].route[0].destination: no host",
        ),
        (
            "subset",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\nspec: {hosts: [mongodb], tcp: [{route: [{destination: {host: mongodb, subset: v7}}]}]}\n",
            "bad.yaml: document 3 (VirtualService/db): ",
            "subset \"v7\": no DestinationRule for host mongodb.default.svc.cluster.local defines it",
        ),
        (
            "zero",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\nspec: {hosts: [mongodb], tcp: [{route: [{destination: {host: mongodb, subset: v1}, weight: 0}, {destination: {host: mongodb}, weight: 0}]}]}\n",
            "bad.yaml: document 3 (VirtualService/db): ",
            "spec.tcp[0].route: weights add up to zero",
        ),
    ];
    for (name, doc, place, reason) in cases {
        let (config, dir) = broken(name, doc);
        for command in ["validate", "run"] {
            let (code, err) = ringside(&[command, "--config", &config, "--istio", &dir]);
            assert_eq!(code, 64, "{name} {command}: {err}");
            let lines: Vec<&str> = err.lines().collect();
            assert_eq!(lines.len(), 1, "{name} {command}: one line: {err}");
            assert!(lines[0].starts_with("ringside: config: "), "{err}");
            assert!(lines[0].contains(place) && lines[0].contains(reason), "{name} {command}: {err}");
            assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
        }
    }
}

#[test]
fn a_service_host_without_cluster_or_route_is_valid_and_its_connections_close_with_nr() {
    let listen = common::free_addr();
    let config = format!(
        "workers: 1\nlisteners: [{{name: later, listen: {listen}, direction: outbound, service: reviews.default.svc.cluster.local}}]\n"
    );
    let path = temp_dir("nr").join("ringside.yaml");
    std::fs::write(&path, &config).unwrap();
    let (code, err) = ringside(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("listener later: service reviews.default.svc.cluster.local: no cluster or route yet"),
        "{err}"
    );

    let rs = Ringside::spawn_config(&config, listen, &[]);
    for _ in 0..3 {
        let mut s = TcpStream::connect(listen).unwrap();
        common::assert_closed_empty(&mut s, "a connection with no route");
    }
    rs.wait_for_value("istio_tcp_connections_closed_total", &[("response_flags", "NR")], 3.0);
    let scrape = rs.scrape();
    assert_eq!(
        sum(&scrape, "istio_tcp_connections_opened_total", &[("response_flags", "NR")]),
        3.0,
        "{scrape}"
    );
}

/// Native config: one cluster with a refusing endpoint (nothing listens) before a good one.
fn ejection_config(listen: SocketAddr, refusing: SocketAddr, good: Option<SocketAddr>) -> String {
    let good = good.map(|g| format!(", {{address: {g}}}")).unwrap_or_default();
    format!(
        "listeners: [{{name: db, listen: {listen}, direction: outbound, cluster: db}}]\nclusters: [{{name: db, service: db.default.svc.cluster.local, endpoints: [{{address: {refusing}}}{good}]}}]\n"
    )
}

#[test]
fn a_refusing_endpoint_is_ejected_the_connection_retried_and_it_is_tried_again_later() {
    let (listen, refusing, good) = ("127.0.12.100:27017", "127.0.12.1:27017", "127.0.12.2:27017");
    let [listen, refusing, good]: [SocketAddr; 3] = [listen, refusing, good].map(|a| a.parse().unwrap());
    tag_server(good, "ok");
    // One worker: each worker ejects on its own, and the count below assumes one view.
    let mut rs =
        Ringside::spawn_config(&ejection_config(listen, refusing, Some(good)), listen, &["--workers", "1"]);
    // Round robin would send every other connection to the refusing endpoint; each is
    // retried on the good one, so none fails.
    for _ in 0..10 {
        assert_eq!(reached(listen), "ok");
    }
    // Once it listens, it gets connections again: after its back-off (1 s, 2 s, ...).
    tag_server(refusing, "up");
    wait_for("the ejected endpoint to be tried again", || (reached(listen) == "up").then_some(()));
    let scrape = rs.wait_for_scrape("every connection closed", DEADLINE, |s| {
        sum(s, "istio_tcp_connections_closed_total", &[]) == sum(s, "istio_tcp_connections_opened_total", &[])
    });
    assert_eq!(
        sum(&scrape, "istio_tcp_connections_closed_total", &[("response_flags", "UF")]),
        0.0,
        "{scrape}"
    );
    assert_eq!(
        sum(&scrape, "istio_tcp_connections_closed_total", &[("response_flags", "UH")]),
        0.0,
        "{scrape}"
    );
    rs.signal("TERM");
    rs.wait_exit();
    // Without ejection, 5 of the first 10 connections would have tried it first.
    let failures =
        rs.stderr_lines().iter().filter(|l| l.contains(&format!("endpoint {refusing}: connect"))).count();
    assert!((1..5).contains(&failures), "{failures} connect failures logged");
}

#[test]
fn with_every_endpoint_ejected_connections_fail_with_uh() {
    let listen: SocketAddr = "127.0.13.100:27017".parse().unwrap();
    let refusing: SocketAddr = "127.0.13.1:27017".parse().unwrap();
    let rs = Ringside::spawn_config(&ejection_config(listen, refusing, None), listen, &["--workers", "1"]);
    // The first tries it (UF) and ejects it; the next, within its back-off, find none up.
    let mut s = TcpStream::connect(listen).unwrap();
    common::assert_closed_empty(&mut s, "the first connection");
    rs.wait_for_value("istio_tcp_connections_closed_total", &[("response_flags", "UF")], 1.0);
    wait_for("a connection closed with UH", || {
        let mut s = TcpStream::connect(listen).unwrap();
        common::assert_closed_empty(&mut s, "a connection with no healthy upstream");
        (sum(&rs.scrape(), "istio_tcp_connections_closed_total", &[("response_flags", "UH")]) >= 1.0)
            .then_some(())
    });
}
