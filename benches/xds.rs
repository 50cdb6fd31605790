//! xDS push benchmark (SPEC §9): the real binary configured by an ADS server in this process.
//! 1. Time from a push to the first new connection that uses it (p50/p99 over 100 pushes).
//! 2. Connection rate while pushes arrive every second vs none (target: ratio >= 0.95).
//!
//! Run: `cargo bench --bench xds` (PUSHES=100 SECONDS=5 override: seconds per round). Numbers on a shared
//! machine are indicative; the tick (100 ms) bounds the latency from above.

#[path = "../tests/common/ads.rs"]
mod ads;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use ads::{AdsServer, Snapshot, assignment, eds_cluster, tcp_listener};

const HOST: &str = "mongodb.default.svc.cluster.local";
const V1: &str = "outbound|27017|v1|mongodb.default.svc.cluster.local";
const V2: &str = "outbound|27017|v2|mongodb.default.svc.cluster.local";

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn tag_server(tag: &'static [u8; 2]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(tag);
        }
    });
    addr
}

fn tag_of(addr: SocketAddr) -> Option<[u8; 2]> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).ok()?;
    Some(tag)
}

fn snapshot(version: u64, v1: SocketAddr, v2: SocketAddr, listen: SocketAddr, to: &str) -> Snapshot {
    Snapshot {
        version: version.to_string(),
        clusters: vec![eds_cluster(V1, HOST, "default"), eds_cluster(V2, HOST, "default")],
        endpoints: vec![
            assignment(V1, &[(v1, "mongodb-v1;default;mongodb;v1;Kubernetes")]),
            assignment(V2, &[(v2, "mongodb-v2;default;mongodb;v2;Kubernetes")]),
        ],
        listeners: vec![tcp_listener("bench", listen, &[(to, 100)])],
        secrets: vec![],
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    // `cargo bench` passes --bench; under `cargo test --all-targets` this is a short smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let pushes = env("PUSHES", if full { 100 } else { 3 });
    let seconds = env("SECONDS", if full { 5 } else { 1 });
    let rounds = if full { 3 } else { 1 };
    let (v1, v2, listen) = (tag_server(b"v1"), tag_server(b"v2"), free_addr());
    let (tx, _requests) = mpsc::channel();
    let server = AdsServer::start(free_addr(), snapshot(1, v1, v2, listen, V1), tx);
    let config = std::env::temp_dir().join(format!("ringside-bench-xds-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "node: {{workload_name: bench, namespace: default}}\nworkers: 2\nxds: {{address: {}}}\n",
            server.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringside"))
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--admin",
            "off",
            "--metrics",
            "off",
            "--health",
            "off",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while tag_of(listen).is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "ringside did not come up");
        thread::sleep(Duration::from_millis(10));
    }

    // 1. Push -> first new connection using it.
    let mut took = Vec::new();
    for i in 0..pushes {
        let (to, want) = if i % 2 == 0 { (V2, *b"v2") } else { (V1, *b"v1") };
        let t0 = Instant::now();
        server.push(snapshot(i + 2, v1, v2, listen, to));
        while tag_of(listen) != Some(want) {
            assert!(t0.elapsed() < Duration::from_secs(10), "push {i} never arrived");
        }
        took.push(t0.elapsed());
        // Let every worker take it before the next push.
        thread::sleep(Duration::from_millis(250));
    }
    took.sort();
    let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
    println!(
        "push -> first new connection using it, {pushes} pushes: p50 {:?}, p99 {:?}, max {:?}",
        pct(50),
        pct(99),
        took[took.len() - 1]
    );

    // 2. Connection rate with and without a push every second (same route, new version).
    let rate = |push: bool| {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (stop, count) = (stop.clone(), count.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if tag_of(listen).is_some() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let t0 = Instant::now();
        let mut version = 1000 + u64::from(push) * 1000;
        while t0.elapsed() < Duration::from_secs(seconds) {
            thread::sleep(Duration::from_secs(1));
            if push {
                version += 1;
                server.push(snapshot(version, v1, v2, listen, V1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().for_each(|c| c.join().unwrap());
        count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
    };
    server.push(snapshot(999, v1, v2, listen, V1));
    thread::sleep(Duration::from_millis(500));
    // Alternating rounds, so a change in the machine's load falls on both sides.
    let (mut quiet, mut pushed) = (0.0, 0.0);
    for _ in 0..rounds {
        quiet += rate(false) / rounds as f64;
        pushed += rate(true) / rounds as f64;
    }
    println!(
        "connections/s, {rounds} alternating round(s) of {seconds}s, 2 clients: no pushes {quiet:.0}, a push every second {pushed:.0}, ratio {:.3}",
        pushed / quiet
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&config);
}
