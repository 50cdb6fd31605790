//! SPEC §1 data path, through the real binary on loopback, with both drivers.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::thread;

use common::process::cpu_ticks;
use common::*;

/// Send `payload` in random chunks while reading the echo in random chunks; return the echo.
fn echo_through(addr: std::net::SocketAddr, payload: Vec<u8>, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let sent = payload.clone();
    let writer = thread::spawn(move || {
        let mut rng = Rng(seed | 1);
        let mut off = 0;
        while off < payload.len() {
            let n = match rng.next() % 4 {
                0 => rng.range(1, 16),
                1 => rng.range(1, 1500),
                _ => rng.range(1, 256 * 1024),
            }
            .min(payload.len() - off);
            w.write_all(&payload[off..off + n]).unwrap();
            off += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut rng = Rng(seed.rotate_left(7) | 1);
    let mut got = Vec::with_capacity(sent.len());
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let want = rng.range(1, buf.len());
        match s.read(&mut buf[..want]).unwrap() {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    writer.join().unwrap();
    (sent, got)
}

fn random_payloads_of_any_size_and_chunking_arrive_byte_exact_on_200_concurrent_connections(driver: &str) {
    let rs = plain_relay(echo_server(), driver, &[]);
    let mut rng = Rng(0x5EED);
    let mut sizes: Vec<usize> = (0..190)
        .map(|_| {
            let max = 1usize << rng.range(0, 18);
            rng.range(1, max)
        })
        .collect();
    sizes.extend((0..9).map(|_| rng.range(1 << 20, 8 << 20)));
    sizes.push(64 << 20);
    let threads: Vec<_> = sizes
        .into_iter()
        .enumerate()
        .map(|(i, size)| {
            let addr = rs.listen;
            let seed = rng.next();
            thread::spawn(move || {
                let payload = Rng(seed | 1).bytes(size);
                let (sent, got) = echo_through(addr, payload, seed);
                assert_eq!(got.len(), sent.len(), "connection {i}: length");
                assert!(got == sent, "connection {i}: {size} bytes differ");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
with_both_drivers!(random_payloads_of_any_size_and_chunking_arrive_byte_exact_on_200_concurrent_connections);

fn half_close_is_forwarded_and_the_other_direction_keeps_flowing(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let mut client = connect(rs.listen);
    let mut server = next_conn(&conns);
    client.write_all(b"ping").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut server), b"ping"); // the FIN arrived
    let big = Rng(3).bytes(3 << 20);
    server.write_all(&big).unwrap(); // still open this way
    server.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut client) == big);
}
with_both_drivers!(half_close_is_forwarded_and_the_other_direction_keeps_flowing);

fn a_reset_from_the_upstream_resets_the_client(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let mut client = connect(rs.listen);
    client.write_all(b"x").unwrap();
    let mut server = next_conn(&conns);
    // Connected and copying (a reset before the connect completes is a connect failure, UF).
    assert_eq!(read_exact(&mut server, 1), b"x");
    socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
    drop(server); // RST
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).expect_err("the client must see the reset, not EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}
with_both_drivers!(a_reset_from_the_upstream_resets_the_client);

fn a_reset_from_the_client_resets_the_upstream(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let mut client = connect(rs.listen);
    client.write_all(b"x").unwrap();
    let mut server = next_conn(&conns);
    assert_eq!(read_exact(&mut server, 1), b"x");
    socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO)).unwrap();
    drop(client);
    let mut buf = [0u8; 16];
    let err = server.read(&mut buf).expect_err("the upstream must see the reset, not EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}
with_both_drivers!(a_reset_from_the_client_resets_the_upstream);

fn an_upstream_that_refuses_closes_the_client_and_counts_uf(driver: &str) {
    let refused = free_addr(); // nothing listens here
    let rs = plain_relay(refused, driver, &[]);
    let mut client = connect(rs.listen);
    let _ = client.write_all(b"hello");
    assert_closed_empty(&mut client, "client");
    rs.wait_for_value("istio_tcp_connections_closed_total", &[("response_flags", "UF")], 1.0);
}
with_both_drivers!(an_upstream_that_refuses_closes_the_client_and_counts_uf);

/// Upstream sockets carry IP_LOCAL_PORT_RANGE (the namespace's own range), with which Linux
/// 6.8+ looks for a local port through the whole range, not its even half first: without it
/// every upstream connection of a quiet machine gets an even port.
fn upstream_connections_take_local_ports_of_either_parity(driver: &str) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = kernel.split(['.', '-']).map(|n| n.parse::<u32>().unwrap_or(0));
    if (version.next().unwrap_or(0), version.next().unwrap_or(0)) < (6, 8) {
        skip("upstream_connections_take_local_ports_of_either_parity", &format!("kernel {}", kernel.trim()));
        return;
    }
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let ports: Vec<u16> = (0..16)
        .map(|_| {
            let mut client = connect(rs.listen);
            client.write_all(b"x").unwrap();
            let up = next_conn(&conns);
            up.peer_addr().unwrap().port()
        })
        .collect();
    // The kernel's scan starts at a random offset and moves on by a random step, so about
    // half the ports are odd; before, none was.
    assert!(ports.iter().any(|p| p % 2 == 1), "only even local ports upstream: {ports:?}");
}
with_both_drivers!(upstream_connections_take_local_ports_of_either_parity);

fn an_upstream_that_never_answers_hits_the_connect_timeout(driver: &str) {
    // A listener whose accept queue is full drops further SYNs: the connect hangs.
    let blackhole = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Port 0: a probed free port may still have TIME_WAIT connections, which a bind
        // without SO_REUSEADDR refuses.
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        s.bind(&any.into()).unwrap();
        s.listen(0).unwrap();
        s
    };
    let addr = blackhole.local_addr().unwrap().as_socket().unwrap();
    let fill: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).ok()
        })
        .collect();
    assert!(!fill.is_empty());
    let rs = plain_relay(addr, driver, &["--connect-timeout", "300ms"]);
    let mut client = connect(rs.listen);
    assert_closed_empty(&mut client, "client");
    rs.wait_for_value("istio_tcp_connections_closed_total", &[("response_flags", "UF")], 1.0);
    drop(blackhole);
}
with_both_drivers!(an_upstream_that_never_answers_hits_the_connect_timeout);

fn an_idle_connection_is_closed_after_the_idle_timeout(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &["--idle-timeout", "500ms"]);
    let mut client = connect(rs.listen);
    let mut server = next_conn(&conns);
    client.write_all(b"a").unwrap();
    assert_eq!(read_exact(&mut server, 1), b"a");
    // Nothing moves now: the proxy closes both sides, gracefully (EOF, not a reset: nothing
    // was in flight).
    assert_eq!(read_to_end(&mut client), b"");
    assert_eq!(read_to_end(&mut server), b"");
    rs.wait_for_value("istio_tcp_connections_closed_total", &[], 1.0);
}
with_both_drivers!(an_idle_connection_is_closed_after_the_idle_timeout);

fn connections_over_the_limit_are_accepted_and_closed_at_once(driver: &str) {
    let rs = plain_relay(echo_server(), driver, &["--max-connections", "2"]);
    let mut live: Vec<_> = (0..2).map(|_| connect(rs.listen)).collect();
    for s in &mut live {
        s.write_all(b"hi").unwrap();
        assert_eq!(read_exact(s, 2), b"hi");
    }
    let mut third = connect(rs.listen);
    let _ = third.write_all(b"hi");
    assert_closed_empty(&mut third, "third");
    rs.wait_for_value("istio_tcp_connections_opened_total", &[("response_flags", "UO")], 1.0);
    // The first two still work.
    for s in &mut live {
        s.write_all(b"again").unwrap();
        assert_eq!(read_exact(s, 5), b"again");
    }
}
with_both_drivers!(connections_over_the_limit_are_accepted_and_closed_at_once);

fn sigterm_lets_live_transfers_finish_then_exits_zero(driver: &str) {
    let (upstream, conns) = manual_server();
    let mut rs = plain_relay(upstream, driver, &["--drain-timeout", "10s"]);
    // Pair each client with its upstream connection, one at a time.
    let (mut clients, mut servers): (Vec<_>, Vec<_>) = (0..4)
        .map(|_| {
            let mut c = connect(rs.listen);
            c.write_all(b"go").unwrap();
            let mut s = next_conn(&conns);
            assert_eq!(read_exact(&mut s, 2), b"go");
            (c, s)
        })
        .unzip();
    rs.signal("TERM");
    wait_for("/ready to turn 503", || {
        (http(rs.admin, "GET", "/ready").map(|r| r.0) == Some(503)).then_some(())
    });
    // In-flight transfers in both directions still complete, every byte.
    let payload = Rng(9).bytes(4 << 20);
    let writers: Vec<_> = servers
        .drain(..)
        .map(|mut s| {
            let p = payload.clone();
            thread::spawn(move || {
                s.write_all(&p).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                read_to_end(&mut s)
            })
        })
        .collect();
    for c in &mut clients {
        c.write_all(b"tail").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert!(read_to_end(c) == payload);
    }
    for w in writers {
        assert_eq!(w.join().unwrap(), b"tail");
    }
    drop(clients);
    let status = rs.wait_exit();
    assert!(status.success(), "exit status {status}");
}
with_both_drivers!(sigterm_lets_live_transfers_finish_then_exits_zero);

#[test]
fn the_driver_in_use_is_logged_once() {
    let mut rs = plain_relay(echo_server(), "epoll", &[]);
    rs.signal("TERM");
    assert!(rs.wait_exit().success());
    let lines = rs.stderr_lines();
    assert_eq!(lines.iter().filter(|l| l.contains("driver epoll")).count(), 1, "{lines:?}");
    // io_uring runs with COOP_TASKRUN where the kernel takes it (5.19+) and says so either
    // way, as a ring set up here with the flag tells; busy-polling is announced.
    let mut rs = plain_relay(echo_server(), "uring", &["--busy-poll", "50us"]);
    rs.signal("TERM");
    assert!(rs.wait_exit().success());
    let lines = rs.stderr_lines();
    let coop = match io_uring::IoUring::<io_uring::squeue::Entry>::builder().setup_coop_taskrun().build(8) {
        Ok(_) => "(COOP_TASKRUN)",
        Err(_) => "(COOP_TASKRUN unsupported by this kernel)",
    };
    let wanted = format!("driver uring {coop} with 2 workers, busy-polling 50us after activity");
    assert_eq!(lines.iter().filter(|l| l.contains(&wanted)).count(), 1, "{lines:?}");
}

fn a_half_close_during_the_exchange_is_relayed_and_the_response_ends_with_eof_not_a_reset(driver: &str) {
    // Outbound `always` to a plain server: the client sends and half-closes at once, so its
    // FIN is relayed while the proxy still waits for the upstream's first bytes.
    let (upstream, conns) = manual_server();
    let rs = Ringside::spawn(upstream, "outbound", &["--peer-exchange", "always", "--driver", driver]);
    for _ in 0..20 {
        let mut client = connect(rs.listen);
        client.write_all(b"request").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut server = next_conn(&conns);
        let mut got = read_to_end(&mut server); // our preamble, the request, then the FIN
        assert!(got.ends_with(b"request"));
        got.clear();
        server.write_all(b"response").unwrap();
        drop(server); // close fully
        assert_eq!(read_to_end(&mut client), b"response"); // EOF, never ECONNRESET
    }
}
with_both_drivers!(a_half_close_during_the_exchange_is_relayed_and_the_response_ends_with_eof_not_a_reset);

fn sigterm_stops_every_listener_of_a_worker(driver: &str) {
    let upstream = echo_server();
    let (a, b) = (free_addr(), free_addr());
    let config = format!(
        "workers: 1\nlisteners:\n  - {{name: a, listen: '{a}', direction: outbound, peer_exchange: off, cluster: up}}\n  - {{name: b, listen: '{b}', direction: outbound, peer_exchange: off, cluster: up}}\nclusters:\n  - {{name: up, endpoints: [{{address: '{upstream}'}}]}}\n"
    );
    let mut rs =
        Ringside::spawn_config(&config, a, &["--driver", driver, "--drain-timeout", "30s", "--workers", "1"]);
    let mut live = connect(a); // keeps the process draining
    live.write_all(b"x").unwrap();
    assert_eq!(read_exact(&mut live, 1), b"x");
    rs.signal("TERM");
    for addr in [a, b] {
        wait_for("every listener to stop accepting", || {
            std::net::TcpStream::connect(addr).is_err().then_some(())
        });
    }
    live.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut live), b"");
    assert!(rs.wait_exit().success());
}
with_both_drivers!(sigterm_stops_every_listener_of_a_worker);

fn connections_still_open_at_the_drain_deadline_are_reset_and_the_process_exits_zero(driver: &str) {
    let (upstream, conns) = manual_server();
    let mut rs = plain_relay(upstream, driver, &["--drain-timeout", "500ms"]);
    let mut client = connect(rs.listen);
    client.write_all(b"x").unwrap();
    let mut server = next_conn(&conns);
    assert_eq!(read_exact(&mut server, 1), b"x");
    rs.signal("TERM");
    // Neither side closes: at the deadline both are reset, never a clean EOF that would make
    // a cut-off transfer look complete.
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    assert_eq!(server.read(&mut buf).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    assert!(rs.wait_exit().success());
}
with_both_drivers!(connections_still_open_at_the_drain_deadline_are_reset_and_the_process_exits_zero);

fn busy_polling_relays_exactly_keeps_every_task_running_and_stops_when_quiet(driver: &str) {
    // The longest window allowed, so a poller that starved the relay tasks would show.
    let rs = plain_relay(echo_server(), driver, &["--busy-poll", "10ms", "--workers", "1"]);
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            let addr = rs.listen;
            thread::spawn(move || {
                let payload = Rng(i + 1).bytes(1 << (i + 4).min(22));
                let (sent, got) = echo_through(addr, payload, i + 77);
                assert!(got == sent, "connection {i}: bytes differ");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Sequential round trips: each needs the relay task to run while the poller spins. A
    // poller that kept the turn to itself would delay every one by the window (10 ms); count
    // those that took that long. A slow or loaded machine delays some, not the majority; a
    // starving poller delays all. (Each read also has the generous DEADLINE.)
    let mut s = connect(rs.listen);
    let window = std::time::Duration::from_millis(10);
    let mut delayed = 0;
    for i in 0..200u32 {
        let start = std::time::Instant::now();
        s.write_all(&i.to_le_bytes()).unwrap();
        assert_eq!(read_exact(&mut s, 4), i.to_le_bytes());
        delayed += usize::from(start.elapsed() >= window);
    }
    assert!(delayed < 100, "{delayed} of 200 round trips waited a whole busy-poll window: the relay starved");
    // Quiet now: the window closes and the worker sleeps (a spinning one burns ~100 ticks/s).
    drop(s);
    let pid = rs.pid();
    wait_for("the worker to stop spinning", || {
        let before = cpu_ticks(pid);
        thread::sleep(std::time::Duration::from_millis(500));
        (cpu_ticks(pid) - before <= 5).then_some(())
    });
}
with_both_drivers!(busy_polling_relays_exactly_keeps_every_task_running_and_stops_when_quiet);

fn busy_polling_under_constant_traffic_still_fires_timers(driver: &str) {
    // monoio fires timers only when it parks; a poller that never let it park would keep the
    // idle timeout (and every other timer) from firing while any connection is busy.
    let rs = plain_relay(
        echo_server(),
        driver,
        &["--busy-poll", "10ms", "--idle-timeout", "300ms", "--workers", "1"],
    );
    let mut idle = connect(rs.listen);
    idle.write_all(b"i").unwrap();
    assert_eq!(read_exact(&mut idle, 1), b"i");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (addr, stop) = (rs.listen, stop.clone());
        thread::spawn(move || {
            let mut s = connect(addr);
            let mut trips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && trips < 2_000_000 {
                s.write_all(b"b").unwrap();
                assert_eq!(read_exact(&mut s, 1), b"b");
                trips += 1;
            }
            trips
        })
    };
    idle.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    let closed = idle.read(&mut buf);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let trips = busy.join().unwrap();
    assert!(matches!(closed, Ok(0)), "the idle connection was not closed by its timeout: {closed:?}");
    assert!(trips > 100, "the busy connection barely ran ({trips} round trips)");
}
with_both_drivers!(busy_polling_under_constant_traffic_still_fires_timers);
