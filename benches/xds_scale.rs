//! A mesh of N services (SPEC §11, issue #29): ringside and a real Envoy one after the other
//! on the same Istio-shaped snapshot (`tests/common/istio_mesh.rs`: N EDS clusters with
//! ISTIO_MUTUAL transport socket matches, 5 endpoints each, a `bind_to_port: false` listener
//! per service behind virtualOutbound), one worker each pinned to core `CORE`. Per proxy and
//! N, in one run:
//! - push: from the first request (the server answers it with all Clusters) to the last ACK
//!   of Clusters, ClusterLoadAssignments and Listeners; then until a connection through the
//!   capture listener to service 0 is echoed (`serving`);
//! - RSS after the full push (`/proc/PID/status` VmRSS, once serving, after a second);
//! - connection rate through the capture listener to service 0 (CONCURRENCY clients, one
//!   byte echoed per connection, CONN_SECONDS) and the proxy's CPU (schedstat ns) per
//!   connection made in that window (`conn_cpu_us`);
//! - one cluster's endpoints change (service 1's five move), as istiod pushes it over state
//!   of the world (one EDS response with that assignment alone): time from handing it to
//!   the server's stream to its ACK, and the process's CPU (its threads' schedstat ns) from
//!   then until 200 ms after the ACK, the median (and the ACK's p90) of EDS_PUSHES (20)
//!   changes, on stderr how much of the time to the ACK the proxy was on a CPU and how much
//!   runnable but waiting for one (schedstat), and beside it
//!   the CPU of as long a window with nothing pushed (`idle_cpu_ms`), then IDLE_SECONDS (3)
//!   more with nothing pushed, their CPU per second by thread name on stderr;
//! - during one EDS push a second for PUSH_SECONDS with HELD long-lived connections open:
//!   the connection rate and the RSS growth. Each push patches the moved assignment into
//!   the served snapshot ([`ads::AdsServer::push_assignment`]: nothing rebuilt or compared),
//!   so that the clients on the load core lose no CPU to the bench; its time per push is on
//!   stderr.
//!
//! Needs a network namespace whose OUTPUT chain redirects 10.96.0.0/12 to port 15001 (the
//! capture): run it through `perf/xds-scale.sh`, which makes one and pins the processes.
//! Env: SERVICES (comma list, default 100,1000,10000), PROXIES (default ringside,envoy;
//! `ringside@PATH` runs the ringside binary at PATH, to compare two builds in one run),
//! RINGSIDE_BIN (default the release binary cargo built beside the bench),
//! ENVOY_MAX_SERVICES (Envoy is skipped above it; default 10000), CORE (default 1),
//! CONN_SECONDS (3), CONCURRENCY (16), EDS_PUSHES (20), PUSH_SECONDS (10), HELD (20), HOLD_PER_PUSH (0: one
//! more connection held after each push's ACK, so that each pins its own generation), API
//! (`sotw`, default, or `delta`: the server and both proxies speak delta xDS, Envoy with
//! `api_type: DELTA_GRPC`; an endpoint change is then the one assignment upserted),
//! METRICS_PORT (ringside's metrics listener on 127.0.0.1 there, off by default: its
//! workers' longest tick gap over the full push is printed on stderr).

#[path = "../tests/common/ads.rs"]
mod ads;
#[path = "../tests/common/istio_mesh.rs"]
mod istio_mesh;
#[path = "../tests/common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ads::{AdsServer, CLUSTER, ENDPOINTS, LISTENER};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use istio_mesh::Mesh;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Five echo backends (service 0's endpoints). Each keeps a pool of threads that accept
/// and echo one connection at a time, and starts another thread when its last idle one
/// takes a connection: held connections never starve new ones, and the load core does not
/// spawn a thread per connection (at ~7,000 connections/s that was a large part of its
/// work, and so of what set the rate, whichever proxy was measured).
fn backends() -> Vec<SocketAddr> {
    (0..5)
        .map(|_| {
            let l = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
            let a = l.local_addr().unwrap();
            let idle = Arc::new(AtomicU64::new(0));
            for _ in 0..8 {
                echo_worker(l.clone(), idle.clone());
            }
            a
        })
        .collect()
}

/// One thread of a backend's pool (see [`backends`]).
fn echo_worker(l: Arc<TcpListener>, idle: Arc<AtomicU64>) {
    idle.fetch_add(1, Ordering::SeqCst);
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            if idle.fetch_sub(1, Ordering::SeqCst) == 1 {
                echo_worker(l.clone(), idle.clone());
            }
            let mut b = [0u8; 64];
            while let Ok(n @ 1..) = s.read(&mut b) {
                if s.write_all(&b[..n]).is_err() {
                    break;
                }
            }
            drop(s);
            idle.fetch_add(1, Ordering::SeqCst);
        }
    });
}

/// One connection through the capture to service 0: one byte echoed.
fn one(to: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && b == *b"x"
}

/// Connections per second to `to` with `concurrency` clients for `seconds`, and how many
/// were made.
fn conn_rate(to: SocketAddr, concurrency: u64, seconds: u64) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            thread::spawn(move || {
                // Bounded by the deadline and by a count.
                for _ in 0..2_000_000 {
                    if Instant::now() >= end {
                        break;
                    }
                    if one(to) {
                        done.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("xds_scale: {f} connections failed");
    }
    let done = done.load(Ordering::Relaxed);
    (done as f64 / start.elapsed().as_secs_f64(), done)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time of the whole process, in ms: the sum of its threads' time on a CPU
/// (`/proc/PID/task/*/schedstat`, nanoseconds), not `stat`'s 10 ms ticks, so that a push
/// costing a few ms is measured rather than rounded.
fn cpu_ms(pid: u32) -> f64 {
    let ns: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    ns as f64 / 1e6
}

/// The whole process's time on a CPU and time waiting for one while runnable (the run
/// queue: `schedstat`'s second field), in ms, summed over its threads.
fn sched_ms(pid: u32) -> (f64, f64) {
    let (mut run, mut wait) = (0u64, 0u64);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        let mut f = s.split(' ').filter_map(|v| v.trim().parse::<u64>().ok());
        run += f.next().unwrap_or(0);
        wait += f.next().unwrap_or(0);
    }
    (run as f64 / 1e6, wait as f64 / 1e6)
}

/// The `ringside_worker_tick_gap_max_seconds` lines of the metrics listener at
/// 127.0.0.1:`port` (the longest gap since the process started, so over the full push).
fn tick_gaps(port: &str) -> String {
    let Ok(mut s) = TcpStream::connect(format!("127.0.0.1:{port}")) else {
        return "no metrics listener".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /stats/prometheus HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("ringside_worker_tick_gap_max_seconds"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// TCP segments sent in this network namespace (`/proc/net/snmp`'s `Tcp: OutSegs`): every
/// segment of the clients, the proxy and the backends, all in the bench's namespace.
fn tcp_out_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find_map(|(n, v)| (n == "OutSegs").then(|| v.parse().ok()).flatten())
        .unwrap_or(0)
}

/// Busy time of CPU `core` in ms (`/proc/stat`, everything but idle and iowait; 10 ms
/// ticks, fine over a window of seconds): what the load core spends, in the clients,
/// the backends and the kernel's softirqs, whatever process they run in.
fn core_busy_ms(core: u64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with(&format!("cpu{core} "))) else { return 0.0 };
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy as f64 * 1000.0 / 100.0
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0)
}

/// Each thread's time on a CPU, in ms, summed by thread name (`comm`).
fn cpu_by_thread(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        *by.entry(name).or_insert(0.0) += ns as f64 / 1e6;
    }
    by
}

/// Waits for the ACK (or NACK: panics) of `version` for each of `types`; returns when the
/// last arrived.
fn acks(
    requests: &mpsc::Receiver<DiscoveryRequest>,
    version: &str,
    types: &[&str],
    first: &mut Option<Instant>,
) {
    let mut left: Vec<&str> = types.to_vec();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !left.is_empty() {
        let r = requests
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no ACK of version {version} for {left:?}"));
        first.get_or_insert_with(Instant::now);
        if r.response_nonce.is_empty() {
            continue;
        }
        if let Some(e) = &r.error_detail {
            panic!("NACK of {}: {}", r.type_url, &e.message[..e.message.len().min(2000)]);
        }
        if r.version_info == version {
            left.retain(|t| *t != r.type_url);
        }
    }
}

/// What the server receives, by the variant it speaks (API: `sotw` or `delta`).
enum Feed {
    Sotw(mpsc::Receiver<DiscoveryRequest>),
    Delta(ads::DeltaLog),
}

impl Feed {
    /// Waits for the ACK (or NACK: panics) of `version` of each of `types` (delta: the
    /// first ACK of each type, whose versions are per resource); `first` is set when the
    /// first request arrives.
    fn acked(&self, version: &str, types: &[&str], first: &mut Option<Instant>) {
        let log = match self {
            Feed::Sotw(requests) => return acks(requests, version, types, first),
            Feed::Delta(log) => log,
        };
        let mut left: Vec<&str> = types.to_vec();
        let deadline = Instant::now() + Duration::from_secs(600);
        while !left.is_empty() {
            let r = log
                .requests
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no delta ACK for {left:?}"));
            first.get_or_insert_with(Instant::now);
            if r.response_nonce.is_empty() {
                continue;
            }
            if let Some(e) = &r.error_detail {
                panic!("NACK of {}: {}", r.type_url, &e.message[..e.message.len().min(2000)]);
            }
            left.retain(|t| *t != r.type_url);
        }
    }

    /// Forgets what arrived so far: the next reply waited for is the next push's.
    fn drain(&self) {
        if let Feed::Delta(log) = self {
            while log.responses.try_recv().is_ok() {}
            while log.requests.try_recv().is_ok() {}
        }
    }

    /// Waits for the ACK of the endpoint push of `version` (delta: of the next EDS response).
    /// Delta: returns when the server made the response (after its diff of the mesh's
    /// assignments, this process's cost, not the proxy's), as the state-of-the-world clock
    /// starts when `push_endpoints` returns after the server's bookkeeping.
    fn endpoints_acked(&self, version: &str) -> Option<Instant> {
        match self {
            Feed::Sotw(requests) => {
                acks(requests, version, &[ENDPOINTS], &mut None);
                None
            }
            Feed::Delta(log) => {
                let response = log.response(ENDPOINTS);
                let sent = Instant::now();
                let reply = log.request("the endpoint push's ACK", |r| r.response_nonce == response.nonce);
                assert!(reply.error_detail.is_none(), "NACK of the endpoint push {version}: {reply:?}");
                Some(sent)
            }
        }
    }
}

struct Proxy {
    child: Child,
    files: Vec<std::path::PathBuf>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("ringside-xds-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = pki::Ca::new("cluster.local");
        let (cert, key) = ca.workload("spiffe://cluster.local/ns/default/sa/bench", false);
        std::fs::write(dir.join("cert-chain.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        std::fs::write(dir.join("root-cert.pem"), &ca.pem).unwrap();
        Pki { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

fn pinned(core: u64, bin: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", &core.to_string(), bin]);
    c
}

fn ringside(core: u64, ads: SocketAddr, pki: &Pki, bin: Option<&str>, api: &str) -> Proxy {
    let config = std::env::temp_dir().join(format!("ringside-xds-scale-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "node: {{workload_name: bench-v1, namespace: default}}\nworkers: 1\n\
             xds: {{address: {ads}, api: {api}, certificates: {{cert_chain: {}, private_key: {}, root_cert: {}}}}}\n",
            pki.path("cert-chain.pem"),
            pki.path("key.pem"),
            pki.path("root-cert.pem")
        ),
    )
    .unwrap();
    // RINGSIDE_BIN: another build of the binary (a release one under a debug driver).
    let bin = bin.map(str::to_string).unwrap_or_else(|| {
        std::env::var("RINGSIDE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringside").into())
    });
    // METRICS_PORT: the metrics listener on 127.0.0.1 there, to read the workers' longest
    // tick gap after the full push (off otherwise, as Envoy runs without Istio's stats).
    let metrics = std::env::var("METRICS_PORT").map_or_else(|_| "off".into(), |p| format!("127.0.0.1:{p}"));
    let child = pinned(core, &bin)
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--admin",
            "off",
            "--metrics",
            &metrics,
            "--health",
            "off",
        ])
        .env("RUST_LOG", std::env::var("PROXY_LOG").unwrap_or_else(|_| "error".into()))
        .stderr(if std::env::var("PROXY_LOG").is_ok() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .unwrap();
    Proxy { child, files: vec![config] }
}

fn envoy(core: u64, bin: &str, ads: SocketAddr, api_type: &str) -> Proxy {
    let bootstrap =
        std::env::temp_dir().join(format!("ringside-xds-scale-envoy-{}.yaml", std::process::id()));
    std::fs::write(
        &bootstrap,
        format!(
            r#"node: {{id: "sidecar~10.244.0.9~bench-v1.default~default.svc.cluster.local", cluster: bench.default}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]
"#,
            ads.port()
        ),
    )
    .unwrap();
    let child = pinned(core, bin)
        .args([
            "-c",
            bootstrap.to_str().unwrap(),
            "--concurrency",
            "1",
            "--use-dynamic-base-id",
            "-l",
            "error",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proxy { child, files: vec![bootstrap] }
}

#[derive(Default)]
struct Row {
    push_ms: f64,
    serving_ms: f64,
    rss_mib: f64,
    rate: f64,
    conn_cpu_us: f64,
    eds_ack_ms: f64,
    eds_ack_p90_ms: f64,
    eds_cpu_ms: f64,
    idle_cpu_ms: f64,
    rate_pushing: f64,
    rss_growth_mib: f64,
}

fn measure(proxy: &str, services: usize, pki: &Pki, envoy_bin: Option<&str>) -> Row {
    let core = env("CORE", 1);
    let seconds = env("CONN_SECONDS", 3);
    let concurrency = env("CONCURRENCY", 16);
    let mesh = Mesh {
        services,
        capture: "0.0.0.0:15001".parse().unwrap(),
        backends: backends(),
        tls: std::env::var("NO_TLS").is_err().then(|| {
            ads::common_tls(
                "default",
                "ROOTCA",
                &["spiffe://cluster.local/ns/ns-0/sa/svc-0"],
                &["istio-peer-exchange", "istio"],
            )
        }),
    };
    let secrets = || {
        ads::workload_secrets(&pki.path("cert-chain.pem"), &pki.path("key.pem"), &pki.path("root-cert.pem"))
    };
    let shape = |s: ads::Snapshot| if proxy == "envoy" { istio_mesh::for_envoy(s, secrets()) } else { s };
    let delta = std::env::var("API").is_ok_and(|a| a == "delta");
    let (server, feed) = if delta {
        let (server, log) = AdsServer::serve_delta(shape(mesh.snapshot("1")));
        (server, Feed::Delta(log))
    } else {
        let (server, requests) = AdsServer::serve(shape(mesh.snapshot("1")));
        (server, Feed::Sotw(requests))
    };
    let p = match proxy {
        "envoy" => envoy(
            core,
            envoy_bin.expect("envoy binary"),
            server.addr,
            if delta { "DELTA_GRPC" } else { "GRPC" },
        ),
        _ => ringside(
            core,
            server.addr,
            pki,
            proxy.strip_prefix("ringside@"),
            if delta { "delta" } else { "state_of_the_world" },
        ),
    };
    let pid = p.child.id();
    let mut first = None;
    feed.acked("1", &[CLUSTER, ENDPOINTS, LISTENER], &mut first);
    let first = first.unwrap();
    eprintln!("xds_scale: {proxy} {services}: pushed");
    let push_ms = first.elapsed().as_secs_f64() * 1000.0;
    let target = istio_mesh::vip(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !one(target) {
        assert!(Instant::now() < deadline, "{proxy}: service 0 not served through the capture");
        thread::sleep(Duration::from_millis(5));
    }
    let serving_ms = first.elapsed().as_secs_f64() * 1000.0;
    eprintln!("xds_scale: {proxy} {services}: serving");
    if let (false, Ok(port)) = (proxy == "envoy", std::env::var("METRICS_PORT")) {
        eprintln!("xds_scale: {proxy} {services}: after the full push: {}", tick_gaps(&port));
    }
    thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(pid);
    // The proxy's CPU per connection made: unlike the rate, barely moved by what else runs
    // on the machine, so it shows per-connection work that grows with the mesh.
    let cpu0 = cpu_ms(pid);
    let load_core = if core == 0 { 1 } else { 0 };
    let (segments0, load0) = (tcp_out_segments(), core_busy_ms(load_core));
    let (rate, made) = conn_rate(target, concurrency, seconds);
    let conn_cpu_us = (cpu_ms(pid) - cpu0) * 1000.0 / made.max(1) as f64;
    // What each connection costs the other side of the bench: the rate is the clients'
    // (16 on the load core), so a proxy that makes them or the backends work more per
    // connection (more segments, a later close) is slower however little CPU it uses.
    let per = |v: f64| v / made.max(1) as f64;
    eprintln!(
        "xds_scale: {proxy} {services}: {rate:.0} connections/s, {conn_cpu_us:.1} µs CPU each; \
         {:.1} TCP segments each (all legs), load core busy {:.1} µs each",
        per((tcp_out_segments() - segments0) as f64),
        per(core_busy_ms(load_core) - load0) * 1000.0,
    );

    // One cluster's endpoints change, pushed as istiod does over state of the world (that
    // assignment alone). Built before the clock starts: the assignment and the server's
    // bookkeeping are this process's cost, not the proxy's.
    // EDS_PUSHES changes, each measured alone: a few ms each, so one alone is noise on a
    // shared machine; the median and p90 are reported.
    let changes = env("EDS_PUSHES", 20).max(1);
    let (mut acks_ms, mut cpus_ms, mut to_ack_cpu, mut to_ack_wait) = (vec![], vec![], vec![], vec![]);
    let threads0 = cpu_by_thread(pid);
    for i in 0..changes {
        let v = (2 + i).to_string();
        let next = mesh.assignment(1, 1 + i);
        feed.drain();
        let (cpu0, wait0) = sched_ms(pid);
        let (pushed, retired) = server.push_assignment(&v, next);
        let t0 = feed.endpoints_acked(&v).unwrap_or(pushed);
        acks_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        // Where the time to the ACK went: the proxy on a CPU, or runnable and waiting for one.
        let (cpu1, wait1) = sched_ms(pid);
        to_ack_cpu.push(cpu1 - cpu0);
        to_ack_wait.push(wait1 - wait0);
        drop(retired);
        // Two ticks: ringside's workers take the publication on their next one.
        thread::sleep(Duration::from_millis(200));
        cpus_ms.push(cpu_ms(pid) - cpu0);
    }
    let (eds_ack_ms, eds_ack_p90_ms, eds_cpu_ms) =
        (quantile(&acks_ms, 0.5), quantile(&acks_ms, 0.9), quantile(&cpus_ms, 0.5));
    eprintln!(
        "xds_scale: {proxy} {services}: endpoint change to ACK (ms, median / p90 / max): {eds_ack_ms:.2} / \
         {eds_ack_p90_ms:.2} / {:.2}; the proxy's CPU before the ACK {:.2} / {:.2}, runnable but waiting \
         for a CPU {:.2} / {:.2}; CPU to 200 ms after {eds_cpu_ms:.2} / {:.2}",
        quantile(&acks_ms, 1.0),
        quantile(&to_ack_cpu, 0.5),
        quantile(&to_ack_cpu, 0.9),
        quantile(&to_ack_wait, 0.5),
        quantile(&to_ack_wait, 0.9),
        quantile(&cpus_ms, 0.9),
    );
    // Where it went, per thread name and change (stderr: for the profile notes).
    for (name, ms) in cpu_by_thread(pid) {
        let per = (ms - threads0.get(&name).copied().unwrap_or(0.0)) / changes as f64;
        if per >= 0.01 {
            eprintln!("xds_scale: {proxy} {services}: endpoint change CPU on {name}: {per:.2} ms");
        }
    }
    // What the process spends over the same window with nothing pushed (ticks, timers): the
    // part of eds_cpu_ms that is not the push's.
    let idle0 = cpu_ms(pid);
    thread::sleep(Duration::from_millis(200) + Duration::from_secs_f64(eds_ack_ms / 1000.0));
    let idle_cpu_ms = cpu_ms(pid) - idle0;
    // A longer window with nothing pushed, per thread name (stderr: what the process spends
    // each second at this mesh size, such as a reload round over every TLS slot's files).
    let idle_seconds = env("IDLE_SECONDS", 3);
    if idle_seconds > 0 {
        let threads0 = cpu_by_thread(pid);
        thread::sleep(Duration::from_secs(idle_seconds));
        for (name, ms) in cpu_by_thread(pid) {
            let per = (ms - threads0.get(&name).copied().unwrap_or(0.0)) / idle_seconds as f64;
            if per >= 0.01 {
                eprintln!("xds_scale: {proxy} {services}: idle CPU per second on {name}: {per:.2} ms");
            }
        }
    }
    eprintln!("xds_scale: {proxy} {services}: {changes} endpoint changes ACKed");

    // Pushes every second while long-lived connections are held and new ones are made.
    let hold = || {
        let mut s = TcpStream::connect(target).unwrap();
        s.write_all(b"h").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    let mut held: Vec<TcpStream> = (0..env("HELD", 20)).map(|_| hold()).collect();
    let rss_before = rss_kib(pid);
    let push_seconds = env("PUSH_SECONDS", 10);
    let cpu0 = cpu_ms(pid);
    let connecting = thread::spawn(move || conn_rate(target, concurrency, push_seconds));
    let mut pushes = 0u64;
    // Each push is made on the load core, beside the connecting clients: the moved
    // assignment alone, patched into the served snapshot (everything else shared), so that
    // the clients lose no CPU to a rebuild of the mesh. How long it takes, summed.
    let mut building = Duration::ZERO;
    // Bounded: the connecting thread ends after PUSH_SECONDS; at most 600 pushes.
    while !connecting.is_finished() && pushes < 600 {
        pushes += 1;
        let v = (pushes + 1 + changes).to_string();
        feed.drain();
        let built = Instant::now();
        let (_, retired) = server.push_assignment(&v, mesh.assignment(1, pushes + changes));
        building += built.elapsed();
        feed.endpoints_acked(&v);
        let freed = Instant::now();
        drop(retired);
        building += freed.elapsed();
        if env("HOLD_PER_PUSH", 0) == 1 {
            // After the worker's next tick (100 ms): accepted under this push's generation.
            thread::sleep(Duration::from_millis(200));
            held.push(hold());
        }
        thread::sleep(Duration::from_secs(1));
    }
    let (rate_pushing, made) = connecting.join().unwrap();
    let pushing_cpu_us = (cpu_ms(pid) - cpu0) * 1000.0 / made.max(1) as f64;
    let rss_growth = rss_kib(pid) as f64 - rss_before as f64;
    for mut s in held {
        s.write_all(b"h").unwrap();
        let mut b = [0u8; 1];
        assert!(s.read_exact(&mut b).is_ok(), "{proxy}: a held connection died during the pushes");
    }
    eprintln!(
        "xds_scale: {proxy} {services}: {pushes} pushes while connecting, {pushing_cpu_us:.1} µs CPU per connection; \
         {:.3} ms of the load core's time per push building, handing over and freeing it",
        building.as_secs_f64() * 1000.0 / pushes.max(1) as f64
    );
    drop(p);
    Row {
        push_ms,
        serving_ms,
        rss_mib: rss as f64 / 1024.0,
        rate,
        conn_cpu_us,
        eds_ack_ms,
        eds_ack_p90_ms,
        eds_cpu_ms,
        idle_cpu_ms,
        rate_pushing,
        rss_growth_mib: rss_growth / 1024.0,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    if !std::env::args().any(|a| a == "--bench") {
        return; // needs perf/xds-scale.sh's namespace; nothing to smoke-test without it
    }
    let services: Vec<usize> = std::env::var("SERVICES")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let proxies = std::env::var("PROXIES").unwrap_or_else(|_| "ringside,envoy".into());
    let envoy_max = env("ENVOY_MAX_SERVICES", 10_000) as usize;
    let envoy_bin = std::env::var("ENVOY").ok();
    let pki = Pki::new();
    println!(
        "proxy     services  push_ms  serving_ms  rss_MiB  KiB/service  conn/s  conn_cpu_us  eds_ack_ms  eds_ack_p90  eds_cpu_ms  idle_cpu_ms  conn/s_pushing  rss_growth_MiB"
    );
    for &n in &services {
        for proxy in proxies.split(',') {
            if proxy == "envoy" && (n > envoy_max || envoy_bin.is_none()) {
                println!(
                    "{proxy:<9} {n:>8}  skipped (ENVOY_MAX_SERVICES={envoy_max}, ENVOY set: {})",
                    envoy_bin.is_some()
                );
                continue;
            }
            let r = measure(proxy, n, &pki, envoy_bin.as_deref());
            println!(
                "{proxy:<9} {n:>8} {:>8.0} {:>11.0} {:>8.1} {:>12.1} {:>7.0} {:>12.1} {:>11.1} {:>12.1} {:>11.2} {:>12.2} {:>15.0} {:>15.1}",
                r.push_ms,
                r.serving_ms,
                r.rss_mib,
                r.rss_mib * 1024.0 / n as f64,
                r.rate,
                r.conn_cpu_us,
                r.eds_ack_ms,
                r.eds_ack_p90_ms,
                r.eds_cpu_ms,
                r.idle_cpu_ms,
                r.rate_pushing,
                r.rss_growth_mib
            );
        }
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
}
