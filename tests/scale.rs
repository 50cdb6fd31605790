//! SPEC §1-§3 at scale: 50,000 short connections through two sidecars with the peer exchange
//! on; every one is counted opened and closed once by both reporters and every byte is
//! counted. (perf/million.sh runs the same with 1,000,000 connections on release builds.)

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use common::*;

#[test]
fn fifty_thousand_short_connections_through_two_sidecars_are_each_counted_once_with_exact_bytes() {
    let total: u64 = 50_000;
    let threads: u64 = 8;
    let server = Ringside::spawn(echo_server(), "inbound", &["--peer-exchange", "always"]);
    let client = Ringside::spawn(server.listen, "outbound", &["--peer-exchange", "always"]);
    let failures = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (addr, failures) = (client.listen, failures.clone());
            thread::spawn(move || {
                let mut rng = Rng(t + 1);
                let mut bytes = 0u64;
                // Bounded: total / threads connections each.
                for _ in 0..total / threads {
                    let len = rng.range(1, 300);
                    let payload = rng.bytes(len);
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(DEADLINE)).unwrap();
                    s.write_all(&payload).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut echo = Vec::with_capacity(payload.len());
                    if s.read_to_end(&mut echo).is_err() || echo != payload {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    bytes += payload.len() as u64;
                }
                bytes
            })
        })
        .collect();
    let bytes: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "connections whose echo differed");
    let n = total as f64;
    for (rs, reporter) in [(&client, "source"), (&server, "destination")] {
        let r = [("reporter", reporter)];
        let s = rs.wait_for_scrape("every connection closed", DEADLINE * 3, |s| sum(s, CLOSED, &r) == n);
        assert_eq!(sum(&s, OPENED, &r), n, "{reporter}");
        // Every connection settled with its peer: none counted without the exchange.
        assert_eq!(sum(&s, OPENED, &[("reporter", reporter), ("response_flags", "-")]), n, "{reporter}");
        assert_eq!((sum(&s, RECEIVED, &r), sum(&s, SENT, &r)), (bytes as f64, bytes as f64), "{reporter}");
    }
}
