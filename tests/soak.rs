//! A one-minute soak (perf/soak.sh runs ten): mixed traffic through two sidecars with the
//! peer exchange on — bulk transfers, short connections, idle churn — both scraped every
//! second. Every byte arrives intact, every scrape answers, RSS stays flat after warm-up, and
//! afterwards both reporters count the same connections, all closed, and the bytes sent.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use common::process::rss_kib;
use common::*;

/// Counts of what the clients did, to check the proxies' counters against.
#[derive(Default)]
struct Done {
    connections: AtomicU64,
    bytes: AtomicU64,
}

/// One connection: send `payload`, half-close, expect it echoed whole, then EOF.
fn echo_once(addr: SocketAddr, payload: &[u8], done: &Done) {
    let got = echo_back(TcpStream::connect(addr).unwrap(), payload);
    assert!(got == payload, "echo of {} bytes differs ({} back)", payload.len(), got.len());
    done.connections.fetch_add(1, Relaxed);
    done.bytes.fetch_add(payload.len() as u64, Relaxed);
}

#[test]
fn a_minute_of_mixed_traffic_keeps_memory_flat_and_every_count_exact() {
    let soak = Duration::from_secs(60);
    let sample_every = Duration::from_secs(5);
    let extra = ["--peer-exchange", "always", "--workers", "1", "--tcp-reporting-duration", "1s"];
    let server = Ringside::spawn(echo_server(), "inbound", &extra);
    let client = Ringside::spawn(server.listen, "outbound", &extra);
    let addr = client.listen;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Done::default());
    let mut loads = Vec::new();
    // Bulk: 4 MiB transfers, one after another.
    loads.push({
        let (stop, done) = (stop.clone(), done.clone());
        thread::spawn(move || {
            let payload = Rng(7).bytes(4 << 20);
            while !stop.load(Relaxed) {
                echo_once(addr, &payload, &done);
            }
        })
    });
    // Short connections: two clients, 1-2,000 bytes each.
    for t in 0..2 {
        let (stop, done) = (stop.clone(), done.clone());
        loads.push(thread::spawn(move || {
            let mut rng = Rng(t + 11);
            while !stop.load(Relaxed) {
                let len = rng.range(1, 2000);
                echo_once(addr, &rng.bytes(len), &done);
            }
        }));
    }
    // Idle churn: 200 connections opened (one byte echoed), held 3 s, closed, again.
    loads.push({
        let (stop, done) = (stop.clone(), done.clone());
        thread::spawn(move || {
            while !stop.load(Relaxed) {
                let held: Vec<TcpStream> = (0..200)
                    .map(|_| {
                        let mut s = connect(addr);
                        s.write_all(b"i").unwrap();
                        assert_eq!(read_exact(&mut s, 1), b"i");
                        s
                    })
                    .collect();
                done.connections.fetch_add(200, Relaxed);
                done.bytes.fetch_add(200, Relaxed);
                thread::sleep(Duration::from_secs(3)); // how long they idle
                drop(held);
            }
        })
    });
    // Scrapes every second, both sidecars; each must answer.
    let scrapes = {
        let stop = stop.clone();
        let (a, b) = (client.metrics.unwrap(), server.metrics.unwrap());
        thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Relaxed) {
                for m in [a, b] {
                    assert_eq!(http(m, "GET", "/stats/prometheus").map(|r| r.0), Some(200));
                }
                n += 1;
                thread::sleep(Duration::from_secs(1)); // the scrape interval
            }
            n
        })
    };
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < soak {
        samples.push((start.elapsed().as_secs_f64(), rss_kib(client.pid()), rss_kib(server.pid())));
        thread::sleep(sample_every); // the sampling interval
    }
    stop.store(true, Relaxed);
    for l in loads {
        l.join().unwrap();
    }
    let scrapes = scrapes.join().unwrap();

    // After warm-up (the first third), RSS is flat: a least-squares slope per sidecar.
    let warm = &samples[samples.len() / 3..];
    let slope = |f: fn(&(f64, u64, u64)) -> u64| {
        let n = warm.len() as f64;
        let (mx, my) =
            (warm.iter().map(|s| s.0).sum::<f64>() / n, warm.iter().map(|s| f(s) as f64).sum::<f64>() / n);
        let num: f64 = warm.iter().map(|s| (s.0 - mx) * (f(s) as f64 - my)).sum();
        let den: f64 = warm.iter().map(|s| (s.0 - mx).powi(2)).sum();
        num / den * 60.0 // KiB per minute
    };
    let (out_slope, in_slope) = (slope(|s| s.1), slope(|s| s.2));
    let n = done.connections.load(Relaxed) as f64;
    let bytes = done.bytes.load(Relaxed) as f64;
    eprintln!(
        "soak 60 s: {n} connections, {bytes} bytes each way, {scrapes} scrape rounds; RSS outbound {:?} KiB (slope {out_slope:+.0} KiB/min), inbound {:?} KiB (slope {in_slope:+.0} KiB/min)",
        samples.iter().map(|s| s.1).collect::<Vec<_>>(),
        samples.iter().map(|s| s.2).collect::<Vec<_>>(),
    );
    for (rs, reporter) in [(&client, "source"), (&server, "destination")] {
        let r = [("reporter", reporter)];
        let s = rs.wait_for_scrape("every connection closed", DEADLINE, |s| sum(s, CLOSED, &r) == n);
        assert_eq!(sum(&s, OPENED, &r), n, "{reporter}");
        assert_eq!((sum(&s, RECEIVED, &r), sum(&s, SENT, &r)), (bytes, bytes), "{reporter}");
    }
    assert!(scrapes >= 30, "only {scrapes} scrape rounds in a minute");
    // Flat: a leak of a few KiB per connection would climb by megabytes a minute here.
    for (name, slope) in [("outbound", out_slope), ("inbound", in_slope)] {
        assert!(slope < 2048.0, "{name} RSS climbs {slope:.0} KiB/min after warm-up");
    }
}
