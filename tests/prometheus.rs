//! SPEC §3 with a real Prometheus server (Debian's `prometheus`, installed by tests/deps.sh)
//! scraping two ringside sidecars, queried as Istio's "Collecting Metrics for TCP Services" task
//! queries it.

mod common;
#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/istio_tcp.rs"]
mod istio_tcp;
#[path = "common/mesh.rs"]
mod mesh;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use mesh::{golden_pair, hello_world};
use serde_json::Value;

/// Scrapes every second plus Prometheus' own start-up on a loaded 2-core box.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(60);

/// A Prometheus server on a free loopback port with its own TSDB in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with one scrape job `job` over `targets`, and waits until it is ready.
    fn start(job: &str, targets: &[SocketAddr]) -> Prometheus {
        let addr = free_addr();
        let dir =
            std::env::temp_dir().join(format!("ringside-prometheus-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: {job}\n    \
             metrics_path: /stats/prometheus\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run the Prometheus server binary `prometheus` ({e}); install it with \
                     tests/deps.sh (Debian package `prometheus`)"
                )
            });
        let mut p = Prometheus { child, addr, dir };
        let start = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited early with {status}");
            }
            if http(addr, "GET", "/-/ready").is_some_and(|(code, _)| code == 200) {
                return p;
            }
            assert!(start.elapsed() < PROMETHEUS_DEADLINE, "prometheus not ready on {addr}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The instant vector of PromQL `query`, as `result` of `/api/v1/query`.
    fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let r = http_response(self.addr, "GET", &path).expect("prometheus answers");
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        let json: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["status"], "success", "{query}: {json}");
        assert_eq!(json["data"]["resultType"], "vector", "{query}: {json}");
        json["data"]["result"].as_array().unwrap().clone()
    }

    /// Polls `query` until `done` holds for its result, and returns that result.
    fn wait_for(&self, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let result = self.query(query);
            if done(&result) {
                return result;
            }
            assert!(
                start.elapsed() < PROMETHEUS_DEADLINE,
                "timed out waiting on Prometheus for {query}; last result: {result:?}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sample's value as Prometheus returns it (`[timestamp, "value"]`).
fn sample_value(sample: &Value) -> f64 {
    sample["value"][1].as_str().expect("a value").parse().unwrap()
}

/// The series' label `name`.
fn label<'a>(sample: &'a Value, name: &str) -> &'a str {
    sample["metric"][name].as_str().unwrap_or_else(|| panic!("no label {name} in {sample}"))
}

/// Every series carries the sample value `n` (and there are `count` of them).
fn all_equal(count: usize, n: f64) -> impl Fn(&[Value]) -> bool {
    move |r: &[Value]| r.len() == count && r.iter().all(|s| sample_value(s) == n)
}

#[test]
fn prometheus_scrapes_both_sidecars_and_istios_tcp_task_queries_return_their_series() {
    let (client, server) = golden_pair(&[]);
    let prometheus = Prometheus::start("istio-mesh", &[client.metrics.unwrap(), server.metrics.unwrap()]);
    const N: usize = 3;
    for _ in 0..N {
        hello_world(client.listen);
    }
    let n = N as f64;
    let closed = prometheus.wait_for("istio_tcp_connections_closed_total", all_equal(2, n));
    let opened = prometheus.wait_for("istio_tcp_connections_opened_total", all_equal(2, n));
    for result in [&closed, &opened] {
        let mut reporters: Vec<(&str, &str)> =
            result.iter().map(|s| (label(s, "reporter"), label(s, "instance"))).collect();
        reporters.sort();
        let (c, s) = (client.metrics.unwrap().to_string(), server.metrics.unwrap().to_string());
        assert_eq!(reporters, [("destination", s.as_str()), ("source", c.as_str())]);
        for sample in result.iter() {
            assert_eq!(label(sample, "job"), "istio-mesh");
            assert_eq!(label(sample, "destination_version"), "v1");
            assert_eq!(label(sample, "destination_canonical_service"), "ratings");
            assert_eq!(label(sample, "destination_canonical_revision"), "version-1");
            assert_eq!(label(sample, "source_canonical_service"), "productpage-v1");
            assert_eq!(label(sample, "source_workload"), "productpage-v1");
            assert_eq!(label(sample, "destination_workload"), "ratings-v1");
            assert_eq!(label(sample, "destination_service"), "server.default.svc.cluster.local");
        }
    }
    // The task's query, by destination version: both sidecars' views of the same connections.
    let v1 = prometheus.query(r#"istio_tcp_connections_opened_total{destination_version="v1"}"#);
    assert!(all_equal(2, n)(&v1), "{v1:?}");
    assert!(prometheus.query(r#"istio_tcp_connections_opened_total{destination_version="v2"}"#).is_empty());
    // Bytes, as the task's received/sent queries: `world\n` up, `hello world\n` down.
    let received = prometheus.wait_for(
        r#"sum by (reporter) (istio_tcp_received_bytes_total{destination_app="ratings",job="istio-mesh"})"#,
        all_equal(2, 6.0 * n),
    );
    assert_eq!(received.len(), 2);
    prometheus.wait_for(
        r#"sum by (reporter) (istio_tcp_sent_bytes_total{destination_app="ratings",job="istio-mesh"})"#,
        all_equal(2, 12.0 * n),
    );
}
