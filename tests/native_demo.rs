//! docker/native-demo.sh, Istio's TCP metrics task on real software (Redis, redis-benchmark,
//! redis-cli, Prometheus) with two ringside sidecars: the series Prometheus holds match what
//! the real server saw, and the script leaves nothing running, also when interrupted.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn demo(connections: &str, result: Option<&Path>) -> Child {
    let mut cmd = Command::new("bash");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/native-demo.sh"))
        .args(["--connections", connections])
        .env("RINGSIDE", env!("CARGO_BIN_EXE_ringside"))
        .env("DEMO_DEADLINE", "150")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(r) = result {
        cmd.env("DEMO_RESULT", r);
    }
    cmd.spawn().expect("bash")
}

/// Processes whose command line mentions `dir` (every process the demo starts names its
/// temporary directory: config files, redis' --dir, Prometheus' storage).
fn processes_using(dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(dir) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Waits for the child with a deadline (killing it past that) and returns (code, stdout, stderr).
fn finish(mut child: Child, deadline: Duration) -> (Option<i32>, String, String) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn temp_dir_of(stdout: &str) -> String {
    let line = stdout.lines().find(|l| l.contains("state in ")).expect("the demo names its temp dir");
    line.rsplit(' ').next().unwrap().to_string()
}

#[test]
fn the_native_demo_counts_every_client_connection_on_both_sidecars_in_prometheus() {
    let result = std::env::temp_dir().join(format!("ringside-native-demo-{}.json", std::process::id()));
    let (code, stdout, stderr) = finish(demo("12", Some(&result)), Duration::from_secs(180));
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    let _ = std::fs::remove_file(&result);

    // Counted by redis-server itself: redis-benchmark's 4 connections per test (SET, GET) plus
    // its config probe, and 12 redis-cli calls.
    let connections = json["connections"].as_f64().unwrap();
    assert!(connections >= 12.0 + 8.0, "{json}");
    let series = json["series"].as_array().unwrap();
    let value = |metric: &str, reporter: &str| -> f64 {
        let rows: Vec<&serde_json::Value> =
            series.iter().filter(|r| r["metric"] == metric && r["labels"]["reporter"] == reporter).collect();
        assert_eq!(rows.len(), 1, "one {metric} series for reporter={reporter}: {rows:?}");
        let labels = &rows[0]["labels"];
        assert_eq!(labels["destination_version"], "v1", "{labels}");
        assert_eq!(labels["destination_canonical_service"], "redis", "{labels}");
        assert_eq!(labels["source_canonical_service"], "ratings", "{labels}");
        rows[0]["value"].as_f64().unwrap()
    };
    for reporter in ["source", "destination"] {
        assert_eq!(value("istio_tcp_connections_opened_total", reporter), connections, "{reporter}");
        assert_eq!(value("istio_tcp_connections_closed_total", reporter), connections, "{reporter}");
        assert!(value("istio_tcp_received_bytes_total", reporter) > 0.0, "{reporter}");
        assert!(value("istio_tcp_sent_bytes_total", reporter) > 0.0, "{reporter}");
    }
    // Both sidecars saw the same application bytes: the preamble is not counted.
    assert_eq!(
        value("istio_tcp_received_bytes_total", "source"),
        value("istio_tcp_received_bytes_total", "destination")
    );
    // The exchange ran on every connection, on both sides.
    let exchanges: Vec<f64> = series
        .iter()
        .filter(|r| r["metric"] == "ringside_exchange_total")
        .map(|r| r["value"].as_f64().unwrap())
        .collect();
    assert_eq!(exchanges, vec![connections, connections], "{json}");

    // Nothing left running, nothing left on disk.
    for pid in json["pids"].as_array().unwrap() {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still running");
    }
    let tmp = json["tmp"].as_str().unwrap();
    assert_eq!(temp_dir_of(&stdout), tmp);
    assert!(!Path::new(tmp).exists(), "{tmp} removed");
    assert_eq!(processes_using(tmp), Vec::<String>::new());
    assert!(stdout.contains("istio_tcp_connections_opened_total{"), "{stdout}");
}

#[test]
fn an_interrupted_native_demo_stops_everything_it_started_and_removes_its_directory() {
    let mut child = demo("1000", None);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // Interrupt once the whole mesh is up and the client is running.
    let start = Instant::now();
    while !seen.contains("ratings-v2 client") {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 || start.elapsed() > Duration::from_secs(120) {
            panic!("the demo did not reach its client step:\n{seen}");
        }
        seen.push_str(&line);
    }
    let tmp = temp_dir_of(&seen);
    assert!(!processes_using(&tmp).is_empty(), "the demo's processes run");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    // Read the rest on a thread: a process that kept the pipe open must not hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        let _ = tx.send(rest);
    });
    let (code, _, stderr) = finish(child, Duration::from_secs(60));
    let rest = rx.recv_timeout(Duration::from_secs(30)).expect("the demo's output ends");
    assert_eq!(code, Some(130), "exit 130 after Ctrl-C; stdout:\n{seen}{rest}\nstderr:\n{stderr}");
    assert!(rest.contains("native-demo: stopped 4 processes"), "{rest}");
    assert!(!Path::new(&tmp).exists(), "{tmp} removed");
    assert_eq!(processes_using(&tmp), Vec::<String>::new());
}
