//! `promtool check metrics` for tests: SPEC §3 asks for a scrape it has nothing to say about.
//! Included with `#[path]` so the tests need no shared `mod.rs`.

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `promtool check metrics` on `text` and asserts that it parsed and reported nothing at
/// all: no lint finding (`no help text`, naming, ...), no error.
pub fn check_metrics(text: &str) {
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
    // promtool exits 1 when the exposition does not parse and 3 when it parses with lint findings.
    assert!(report.trim().is_empty(), "promtool found problems:\n{report}\n--- input ---\n{text}");
    assert_eq!(out.status.code(), Some(0), "promtool exit status");
}
