//! `ringside demo`, the first command a new user runs: two sidecars, traffic, and the
//! istio_tcp_* series printed as a table with Istio's own numbers (10 connections, 6 bytes
//! up and 12 bytes down each).

mod common;

use std::process::Command;

#[test]
fn the_demo_prints_istio_tcp_series_for_both_reporters_with_exact_values() {
    let out = Command::new(common::bin()).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {}: {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("istio_tcp_"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 8, "{stdout}");
    for (metric, value) in [
        ("istio_tcp_connections_opened_total", "10"),
        ("istio_tcp_connections_closed_total", "10"),
        ("istio_tcp_received_bytes_total", "60"),
        ("istio_tcp_sent_bytes_total", "120"),
    ] {
        for reporter in ["source", "destination"] {
            // metric reporter source_workload source_version destination_workload
            // destination_version destination_service response_flags value
            let want = [
                metric,
                reporter,
                "ratings-v2",
                "v2",
                "mongodb-v1",
                "v1",
                "mongodb.default.svc.cluster.local",
                "-",
                value,
            ];
            assert!(rows.iter().any(|r| r[..] == want[..]), "missing {want:?} in\n{stdout}");
        }
    }
}
