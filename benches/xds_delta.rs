//! Delta vs state-of-the-world xDS at mesh scale (SPEC §9, issue #29): the real binary on a
//! mesh of CLUSTERS EDS clusters (one endpoint each) and one listener, fed by this process's
//! test ADS server in each variant; then PUSHES one-endpoint changes (one cluster's endpoint
//! moves), each waited for until its reply (ACK) arrives. Per change: bytes the sidecar
//! received on its xDS connection (counted by a relay in front of the server: gRPC and HTTP/2
//! framing included) and CPU time of its xDS control thread (`ringside-xds`, from
//! /proc/PID/task/*/stat, 10 ms ticks summed over all pushes).
//!
//! The test server's state of the world pushes every subscribed type in full on each change
//! (what a SotW server must do for Clusters and Listeners); delta sends the one assignment.
//!
//! Run: `cargo bench --bench xds_delta` (CLUSTERS=1000 PUSHES=20 override).

#[path = "../tests/common/ads.rs"]
mod ads;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ads::{AdsServer, ENDPOINTS, Snapshot, assignment, eds_cluster, tcp_listener};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A TCP relay to `to` counting the bytes sent back to the client.
fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    thread::spawn(move || {
        for down in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(to) else { continue };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let pairs =
                [(down.try_clone().unwrap(), up.try_clone().unwrap(), None), (up, down, Some(count.clone()))];
            for (mut from, mut into, counter) in pairs {
                thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if let Some(c) = &counter {
                            c.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        if into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, received)
}

fn name(i: u64) -> String {
    format!("outbound|80||svc-{i}.default.svc.cluster.local")
}

/// CLUSTERS EDS clusters, one endpoint each (`moved`: cluster 1's endpoint port is 2000+moved),
/// one listener to cluster 0.
fn mesh(clusters: u64, version: u64, listen: SocketAddr, backend: SocketAddr, moved: u64) -> Snapshot {
    let endpoint = |i: u64| {
        let port = if i == 1 { 2000 + moved as u16 } else { 1000 + (i % 50_000) as u16 };
        let at = match i {
            0 => backend,
            _ => SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], port)),
        };
        assignment(&name(i), &[(at, &format!("svc-{i};default;svc-{i};v1;Kubernetes"))])
    };
    Snapshot {
        version: version.to_string(),
        clusters: (0..clusters)
            .map(|i| eds_cluster(&name(i), &format!("svc-{i}.default.svc.cluster.local"), "default"))
            .collect(),
        endpoints: (0..clusters).map(endpoint).collect(),
        listeners: vec![tcp_listener("bench", listen, &[(&name(0), 100)])],
        secrets: vec![],
    }
}

/// CPU ticks (utime + stime) of `pid`'s thread named `comm`.
fn thread_ticks(pid: u32, comm: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if &stat[open + 1..close] != comm {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the comm: state is field 3, utime 14, stime 15 (1-based in proc(5)).
        total += fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

fn ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100)
}

fn spawn(xds: SocketAddr, api: &str) -> (Child, std::path::PathBuf) {
    let config =
        std::env::temp_dir().join(format!("ringside-bench-xds-delta-{}-{api}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!("node: {{workload_name: bench, namespace: default}}\nworkers: 1\nxds: {{address: {xds}, api: {api}}}\n"),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ringside"))
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
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, config)
}

fn until_up(listen: SocketAddr) {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(listen) {
            let mut b = [0u8; 2];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if s.read_exact(&mut b).is_ok() {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "ringside did not come up");
        thread::sleep(Duration::from_millis(20));
    }
}

struct Measured {
    bytes_per_change: f64,
    cpu_ms_per_change: f64,
    initial_bytes: u64,
}

fn run(api: &str, clusters: u64, pushes: u64) -> Measured {
    let backend = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(b"ok");
            }
        });
        a
    };
    let listen = free_addr();
    let first = mesh(clusters, 1, listen, backend, 0);
    let delta = api == "delta";
    let (server, sotw, log) = if delta {
        let (server, log) = AdsServer::serve_delta(first);
        (server, None, Some(log))
    } else {
        let (server, requests) = AdsServer::serve(first);
        (server, Some(requests), None)
    };
    let (relay, received) = counting_relay(server.addr);
    let (mut child, config) = spawn(relay, api);
    until_up(listen);
    // Every initial reply in, so that nothing of the initial sync is counted below.
    let settle = |version: u64| match (&sotw, &log) {
        (Some(requests), _) => {
            ads::reply_to(requests, ENDPOINTS, &version.to_string());
        }
        (_, Some(log)) => {
            let (_, ack) = log.reply(ENDPOINTS);
            assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
        }
        _ => unreachable!(),
    };
    if let Some(requests) = &sotw {
        ads::reply_to(requests, ENDPOINTS, "1");
    } else if let Some(log) = &log {
        // Clusters, Listeners, ClusterLoadAssignments: their three replies.
        let mut left = 3;
        while left > 0 {
            log.responses.recv_timeout(Duration::from_secs(60)).expect("initial responses");
            left -= 1;
        }
        thread::sleep(Duration::from_millis(500));
        while log.requests.try_recv().is_ok() {}
    }
    thread::sleep(Duration::from_millis(500));
    let initial_bytes = received.load(Ordering::Relaxed);
    let pid = child.id();
    let (bytes0, ticks0) = (received.load(Ordering::Relaxed), thread_ticks(pid, "ringside-xds"));
    for i in 0..pushes {
        let version = i + 2;
        server.push(mesh(clusters, version, listen, backend, i + 1));
        settle(version);
        if let Some(requests) = &sotw {
            // The Listener reply comes last in the server's order (clusters, endpoints, listeners).
            ads::reply_to(requests, ads::LISTENER, &version.to_string());
        }
    }
    let (bytes1, ticks1) = (received.load(Ordering::Relaxed), thread_ticks(pid, "ringside-xds"));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(config);
    let ms = (ticks1 - ticks0) as f64 * 1000.0 / ticks_per_second() as f64;
    Measured {
        bytes_per_change: (bytes1 - bytes0) as f64 / pushes as f64,
        cpu_ms_per_change: ms / pushes as f64,
        initial_bytes,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    // `cargo bench` passes --bench; under `cargo test --all-targets` this is a short smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let clusters = env("CLUSTERS", if full { 1000 } else { 50 });
    let pushes = env("PUSHES", if full { 20 } else { 2 });
    for api in ["state_of_the_world", "delta"] {
        let m = run(api, clusters, pushes);
        println!(
            "{api}: {clusters} EDS clusters, {pushes} one-endpoint changes: {:.0} bytes received per change, \
             xDS thread CPU {:.1} ms per change (initial sync {} bytes)",
            m.bytes_per_change, m.cpu_ms_per_change, m.initial_bytes
        );
    }
}
