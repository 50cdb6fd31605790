//! Connection rate through a real istiod virtualOutbound (SPEC §9): the DSB hotel-reservation
//! sidecar's resources (an Envoy `/config_dump` of Istio 1.18, its path in `XDS_DUMP`: a file
//! from a public repository, never part of this one), served over ADS to the
//! release binary in a network-namespace pod with Istio's capture rules, against the same pod
//! whose virtualOutbound holds only what one service needs (its own two chains and that
//! service's). Both connect from inside the pod to the same ClusterIP
//! (`mongodb-user.hotel-res`, 10.68.121.137:27017), routed by chain to its EDS endpoint
//! (172.16.18.221, a backend in a second pod); the two configs alternate on the same process
//! by ADS pushes, so only the listener's chains differ. Target: ratio >= 0.95.
//!
//! Run: `XDS_DUMP=PATH cargo bench --bench xds_chains` (root: namespaces, iptables;
//! SECONDS=3 ROUNDS=3 override; `tests/run.sh` sets `XDS_DUMP` when the dump lies beside the
//! checkout). Numbers on a shared machine are indicative; the ratio is from one run.

#[path = "../tests/common/ads.rs"]
mod ads;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/dumps.rs"]
mod dumps;
#[path = "../tests/common/netns.rs"]
mod netns;
#[path = "../tests/common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use ads::{AdsServer, LISTENER, Snapshot};

const BENCH: &str = "xds_chains";
const VIP: &str = "10.68.121.137:27017";
const SERVICE_LISTENER: &str = "10.68.121.137_27017";
const CLUSTER: &str = "outbound|27017||mongodb-user.hotel-res.svc.cluster.local";
const ENDPOINT_IP: &str = "172.16.18.221";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    // `cargo bench` passes --bench; under `cargo test --all-targets` this is a short smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let seconds = env("SECONDS", if full { 3 } else { 1 });
    let rounds = env("ROUNDS", if full { 3 } else { 1 });
    let Some(path) = std::env::var_os("XDS_DUMP").map(std::path::PathBuf::from) else {
        common::skip(BENCH, "XDS_DUMP (the DSB hotel-reservation sidecar's config dump) is not set");
        return;
    };
    if netns::unavailable(BENCH).is_some() {
        return;
    }
    let dump = dumps::load(&path);
    let whole = |version: String| Snapshot {
        version,
        clusters: dump.clusters.clone(),
        endpoints: dump.endpoints.clone(),
        listeners: dump.listeners.clone(),
        secrets: vec![],
    };
    let one_service = |version: String| Snapshot {
        version,
        clusters: dump.clusters.iter().filter(|c| c.name == CLUSTER).cloned().collect(),
        endpoints: dump.endpoints.iter().filter(|e| e.cluster_name == CLUSTER).cloned().collect(),
        listeners: dump
            .listeners
            .iter()
            .filter(|l| l.name == "virtualOutbound" || l.name == SERVICE_LISTENER)
            .cloned()
            .collect(),
        secrets: vec![],
    };

    let pods = netns::Pods::new();
    for ns in [&pods.a, &pods.b] {
        // Short connections to one address:port: reuse TIME_WAIT ports, inside the pods only.
        netns::exec(ns, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    }
    netns::exec(&pods.b, &[common::bin(), "iptables", "--apply"]);
    netns::exec(&pods.a, &["ip", "addr", "add", &format!("{ENDPOINT_IP}/32"), "dev", "lo"]);
    // The backend writes two bytes and closes first (its TIME_WAIT, not the client's).
    let backend = netns::in_ns(&pods.a, || std::net::TcpListener::bind("0.0.0.0:27017").unwrap());
    common::serve_each(backend, |mut s: TcpStream| {
        let _ = s.write_all(b"ok");
    });

    let ca = pki::Ca::new("mesh");
    let certs = pki::Certs::new(BENCH, &ca, "spiffe://cluster.local/ns/hr2/sa/geo");
    let (tx, requests) = mpsc::channel();
    let server = AdsServer::start_for_sidecar(&pods.b, whole("whole-0".into()), tx);
    let config = std::env::temp_dir().join(format!("ringside-bench-{BENCH}-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "node: {{workload_name: geo, namespace: hr2}}\nworkers: 1\nadmin: {{listen: 127.0.0.1:15000}}\n\
             metrics: {{listen: 127.0.0.1:15090}}\nhealth: {{listen: 'off'}}\n\
             xds: {{address: \"{}\", certificates: {{{}}}}}\n",
            server.unix_address(),
            certs.yaml()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // As Istio's istio-proxy (uid 1337, which the capture rules exclude); no debug logging.
    let mut sidecar = std::process::Command::new("ip")
        .args(["netns", "exec", &pods.b, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"])
        .args([common::bin(), "run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    common::wait_for("the sidecar ready", || {
        let code = netns::in_ns(&pods.b, move || common::http(admin, "GET", "/ready")).map(|(c, _)| c);
        (code == Some(200)).then_some(())
    });
    let dump_json = netns::in_ns(&pods.b, move || common::http(admin, "GET", "/config_dump")).unwrap().1;
    let served: serde_json::Value = serde_json::from_str(&dump_json).unwrap();
    let chains = |cfg: &serde_json::Value| {
        cfg["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "virtualOutbound").unwrap()["filter_chains"]
            .as_array()
            .unwrap()
            .len()
    };
    let whole_chains = chains(&served);

    // The sidecar's CPU time (utime + stime, clock ticks): `ip netns exec` and `setpriv` exec
    // it, so the child's pid is ringside's.
    let pid = sidecar.id();
    let cpu_ticks = move || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<u64> = after.split(' ').skip(11).take(2).map(|f| f.parse().unwrap()).collect();
        fields[0] + fields[1]
    };
    let ticks_per_second = 100.0; // Linux USER_HZ
    let rate = |seconds: u64| {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let vip: SocketAddr = VIP.parse().unwrap();
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (stop, count, ns) = (stop.clone(), count.clone(), pods.b.clone());
                thread::spawn(move || {
                    netns::in_ns(&ns, || {
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(mut s) = TcpStream::connect(vip) else { continue };
                            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut tag = [0u8; 2];
                            if s.read_exact(&mut tag).is_ok() {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
            })
            .collect();
        let (t0, cpu0) = (Instant::now(), cpu_ticks());
        thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().for_each(|c| c.join().unwrap());
        let n = count.load(Ordering::Relaxed) as f64;
        let cpu_us = (cpu_ticks() - cpu0) as f64 / ticks_per_second * 1e6;
        (n / t0.elapsed().as_secs_f64(), cpu_us / n.max(1.0))
    };
    let mut version = 0;
    let mut apply = |snapshot: &dyn Fn(String) -> Snapshot, name: &str| {
        version += 1;
        let v = format!("{name}-{version}");
        server.push(snapshot(v.clone()));
        let reply = ads::reply_to(&requests, LISTENER, &v);
        assert!(reply.error_detail.is_none(), "{name}: {:?}", reply.error_detail);
        // Updates reach every worker's new connections within a second (SPEC §9).
        thread::sleep(Duration::from_millis(1500));
    };
    apply(&one_service, "one");
    let one_json = netns::in_ns(&pods.b, move || common::http(admin, "GET", "/config_dump")).unwrap().1;
    let one_chains = chains(&serde_json::from_str(&one_json).unwrap());
    // Alternating rounds, so a change in the machine's load falls on both sides.
    let (mut through_whole, mut through_one) = ((0.0, 0.0), (0.0, 0.0));
    for _ in 0..rounds {
        apply(&whole, "whole");
        let (r, c) = rate(seconds);
        through_whole = (through_whole.0 + r / rounds as f64, through_whole.1 + c / rounds as f64);
        apply(&one_service, "one");
        let (r, c) = rate(seconds);
        through_one = (through_one.0 + r / rounds as f64, through_one.1 + c / rounds as f64);
    }
    println!(
        "connections/s to {VIP} through the DSB virtualOutbound, {rounds} alternating round(s) of {seconds}s, \
         2 clients, 1 worker: {whole_chains} chains {:.0} ({:.1} us sidecar CPU/connection), {one_chains} chains \
         {:.0} ({:.1} us), ratio {:.3} (CPU per connection {:.3})",
        through_whole.0,
        through_whole.1,
        through_one.0,
        through_one.1,
        through_whole.0 / through_one.0,
        through_whole.1 / through_one.1
    );
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let _ = std::fs::remove_file(&config);
}
