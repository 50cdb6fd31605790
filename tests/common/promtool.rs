//! `promtool check metrics` for tests, accepting exactly what ringside is expected to emit.
//! Included with `#[path]` so the tests need no shared `mod.rs`.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

/// The Istio counters, which carry no HELP line by design.
pub const ISTIO_TCP: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
];

/// Runs `promtool check metrics` on `text` and returns its findings, asserting that it parsed
/// and that the only findings are `no help text` for Istio's own counters.
pub fn check_metrics(text: &str) -> Vec<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian package `prometheus`, tests/deps.sh)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // promtool exits 1 when the exposition does not parse and 3 when it parses but has lint
    // findings. Istio's counters carry no HELP line by design (its golden data has none, and
    // Istio's ExactStat compares the HELP field), so `no help text` for them, and nothing else,
    // is the expected lint.
    let problems: Vec<String> = report.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
    let istio_no_help = |l: &String| ISTIO_TCP.iter().any(|n| *l == format!("{n} no help text"));
    assert!(problems.iter().all(istio_no_help), "promtool found problems:\n{report}\n--- input ---\n{text}");
    let code = out.status.code();
    assert!(code == Some(0) || code == Some(3), "promtool exit {code:?}:\n{report}");
    problems
}
