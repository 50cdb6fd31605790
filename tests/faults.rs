//! SPEC §1 under faults, with both drivers: an upstream killed, reset, or never reading; a
//! downstream that stops reading; both peers half-closing at once; connections cut by the
//! drain deadline while connecting or exchanging. The other side is always closed properly
//! (FIN for an end, RST for a reset), memory stays bounded, and every connection is counted
//! opened and closed exactly once.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::process::rss_kib;
use common::*;

/// Wait until `n` connections are counted opened and closed, all with `flags`; the scrape.
fn counted_once(rs: &Ringside, n: f64, flags: &str) -> String {
    let s = rs.wait_for_scrape("every connection counted closed", DEADLINE, |s| {
        sum(s, CLOSED, &[]) == n && sum(s, OPENED, &[]) == n
    });
    assert_eq!(sum(&s, OPENED, &[("response_flags", flags)]), n, "{s}");
    s
}

/// How a read ended: bytes then EOF, or a reset.
fn read_outcome(s: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => Ok(got),
        Err(e) => Err(e.kind()),
    }
}

/// Write until the write would block (the path is full), bounded; returns bytes written.
fn fill(s: &mut TcpStream, limit: usize) -> usize {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let (mut total, mut stalls) = (0, 0);
    // The path is full once writes have failed for a while (the proxy moves bytes in steps).
    while total < limit && stalls < 20 {
        match s.write(&chunk) {
            Ok(n) => {
                total += n;
                stalls = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stalls += 1;
                thread::sleep(Duration::from_millis(10)); // pacing the probe, not synchronising
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    total
}

/// What the kernel may hold on one proxied path: two sockets' receive and send buffers at
/// their autotuning maxima (net.ipv4.tcp_rmem/tcp_wmem) each way, and one splice pipe.
fn path_bound() -> usize {
    let max = |f: &str| -> usize {
        let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).unwrap();
        text.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    2 * (max("tcp_rmem") + max("tcp_wmem")) + (1 << 20)
}

// ---- the upstream fails ---------------------------------------------------------------------

fn an_upstream_killed_mid_transfer_ends_the_client_connection_and_it_is_counted_once(driver: &str) {
    // A real process, killed with SIGKILL while the client streams: the kernel closes its
    // socket with unread data in it, which is a reset.
    let port = free_addr().port();
    let script = format!(
        "import socket,sys\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('127.0.0.1',{port}))\nl.listen(8)\nprint('up',flush=True)\nc,_=l.accept()\nc.sendall(b'hello')\nimport time\ntime.sleep(60)\n"
    );
    let mut upstream = Command::new("python3").args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut ready = [0u8; 3];
    upstream.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    let rs = plain_relay(SocketAddr::from(([127, 0, 0, 1], port)), driver, &[]);
    let mut client = connect(rs.listen);
    assert_eq!(read_exact(&mut client, 5), b"hello");
    client.write_all(&vec![1u8; 256 * 1024]).unwrap();
    upstream.kill().unwrap();
    upstream.wait().unwrap();
    // The client's side ends (reset or EOF, never a hang), and what it already had stays.
    let ended = read_outcome(&mut client);
    assert!(matches!(&ended, Ok(b) if b.is_empty()) || ended == Err(ErrorKind::ConnectionReset), "{ended:?}");
    let s = counted_once(&rs, 1.0, "-");
    assert_eq!(sum(&s, SENT, &[]), 5.0);
}
with_both_drivers!(an_upstream_killed_mid_transfer_ends_the_client_connection_and_it_is_counted_once);

fn an_upstream_reset_resets_the_client_and_is_counted_once(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let mut client = connect(rs.listen);
    client.write_all(b"request").unwrap();
    let mut server = next_conn(&conns);
    assert_eq!(read_exact(&mut server, 7), b"request");
    server.write_all(b"partial").unwrap();
    assert_eq!(read_exact(&mut client, 7), b"partial");
    socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO)).unwrap();
    drop(server); // RST
    assert_eq!(read_outcome(&mut client), Err(ErrorKind::ConnectionReset));
    let s = counted_once(&rs, 1.0, "-");
    assert_eq!((sum(&s, RECEIVED, &[]), sum(&s, SENT, &[])), (7.0, 7.0));
}
with_both_drivers!(an_upstream_reset_resets_the_client_and_is_counted_once);

fn an_upstream_that_never_reads_holds_a_bounded_amount_per_connection(driver: &str) {
    // Upstreams accept and never read; each client pushes until the whole path is full.
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let before = rss_kib(rs.pid());
    let n = 16;
    let mut pairs = Vec::new();
    let mut in_flight = 0;
    for _ in 0..n {
        let mut client = connect(rs.listen);
        in_flight += fill(&mut client, 64 << 20);
        pairs.push((client, next_conn(&conns)));
    }
    let grown = rss_kib(rs.pid()).saturating_sub(before);
    eprintln!(
        "{driver}: {n} connections to upstreams that never read: RSS +{grown} KiB ({} KiB each); {} KiB in flight per connection (socket buffers and pipe, kernel memory)",
        grown / n as u64,
        in_flight / n / 1024
    );
    assert!(grown / (n as u64) < 256, "RSS grew {grown} KiB for {n} stuck connections");
    assert!(in_flight / n < path_bound(), "{} bytes accepted per connection: unbounded", in_flight / n);
    // The client gives up: its reset reaches the upstream, and each is counted once.
    for (client, mut server) in pairs {
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let mut buf = vec![0u8; 1 << 20];
        let ended = loop {
            match server.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => continue, // bytes still in flight
                Err(e) => break Err(e.kind()),
            }
        };
        assert_eq!(ended, Err(ErrorKind::ConnectionReset));
    }
    counted_once(&rs, n as f64, "-");
}
with_both_drivers!(an_upstream_that_never_reads_holds_a_bounded_amount_per_connection);

// ---- the downstream fails -------------------------------------------------------------------

fn a_downstream_that_stops_reading_holds_a_bounded_amount_and_the_upstream_is_closed_after(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let before = rss_kib(rs.pid());
    let n = 16;
    let mut pairs = Vec::new();
    let mut in_flight = 0;
    for _ in 0..n {
        let client = connect(rs.listen);
        let mut server = next_conn(&conns);
        in_flight += fill(&mut server, 64 << 20);
        pairs.push((client, server));
    }
    let grown = rss_kib(rs.pid()).saturating_sub(before);
    eprintln!(
        "{driver}: {n} downstreams that stopped reading: RSS +{grown} KiB ({} KiB each); {} KiB in flight per connection",
        grown / n as u64,
        in_flight / n / 1024
    );
    assert!(grown / (n as u64) < 256, "RSS grew {grown} KiB for {n} stuck connections");
    assert!(in_flight / n < path_bound(), "{} bytes accepted per connection: unbounded", in_flight / n);
    // The client closes without reading: unread data makes it a reset, which reaches the
    // upstream (whose writes then fail).
    for (client, mut server) in pairs {
        drop(client);
        server.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    }
    counted_once(&rs, n as f64, "-");
}
with_both_drivers!(a_downstream_that_stops_reading_holds_a_bounded_amount_and_the_upstream_is_closed_after);

// ---- both ends at once ----------------------------------------------------------------------

fn both_peers_half_closing_at_once_each_get_the_others_bytes_then_eof(driver: &str) {
    let (upstream, conns) = manual_server();
    let rs = plain_relay(upstream, driver, &[]);
    let rounds = 20;
    for i in 0..rounds {
        let mut client = connect(rs.listen);
        client.write_all(b"q").unwrap();
        let mut server = next_conn(&conns);
        assert_eq!(read_exact(&mut server, 1), b"q");
        // Both write their last bytes and FIN at the same moment.
        let (c, s) = (Rng(i + 1).bytes(1000 + i as usize * 997), Rng(i + 99).bytes(3000));
        let (c2, s2) = (c.clone(), s.clone());
        let mut client_w = client.try_clone().unwrap();
        let mut server_w = server.try_clone().unwrap();
        let a = thread::spawn(move || {
            client_w.write_all(&c2).unwrap();
            client_w.shutdown(Shutdown::Write).unwrap();
        });
        let b = thread::spawn(move || {
            server_w.write_all(&s2).unwrap();
            server_w.shutdown(Shutdown::Write).unwrap();
        });
        a.join().unwrap();
        b.join().unwrap();
        assert!(read_to_end(&mut server) == c, "round {i}: upstream got other bytes");
        assert!(read_to_end(&mut client) == s, "round {i}: client got other bytes");
    }
    let s = counted_once(&rs, rounds as f64, "-");
    let received: usize = (0..rounds).map(|i| 1 + 1000 + i as usize * 997).sum();
    assert_eq!((sum(&s, RECEIVED, &[]), sum(&s, SENT, &[])), (received as f64, 3000.0 * rounds as f64));
}
with_both_drivers!(both_peers_half_closing_at_once_each_get_the_others_bytes_then_eof);

// ---- the drain deadline ---------------------------------------------------------------------

/// A loopback listener whose accept queue is full, so further connects to it hang in SYN-SENT.
fn black_hole() -> (SocketAddr, Vec<TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    s.listen(0).unwrap();
    let l: TcpListener = s.into();
    let addr = l.local_addr().unwrap();
    // Fill the queue (backlog 0 still takes one); later SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    std::mem::forget(l); // kept open, never accepted, for the test's life
    (addr, fillers)
}

fn a_connection_still_connecting_at_the_drain_deadline_is_reset(driver: &str) {
    let (upstream, _fillers) = black_hole();
    let mut rs = plain_relay(upstream, driver, &["--drain-timeout", "500ms", "--connect-timeout", "60s"]);
    let mut client = connect(rs.listen);
    client.write_all(b"x").unwrap();
    rs.signal("TERM");
    assert_eq!(read_outcome(&mut client), Err(ErrorKind::ConnectionReset));
    assert!(rs.wait_exit().success());
}
with_both_drivers!(a_connection_still_connecting_at_the_drain_deadline_is_reset);

fn a_connection_still_exchanging_at_the_drain_deadline_resets_both_sides(driver: &str) {
    // Inbound `always`: the client has sent the first bytes of a preamble and waits.
    let (upstream, conns) = manual_server();
    let extra = ["--peer-exchange", "always", "--driver", driver, "--drain-timeout", "500ms"];
    let mut rs = Ringside::spawn(upstream, "inbound", &[&extra[..], &["--exchange-timeout", "60s"]].concat());
    let mut client = connect(rs.listen);
    client.write_all(&[0x3d, 0x23, 0x04]).unwrap(); // the first 3 bytes of Istio's magic
    let mut server = next_conn(&conns);
    rs.signal("TERM");
    assert_eq!(read_outcome(&mut client), Err(ErrorKind::ConnectionReset));
    assert_eq!(read_outcome(&mut server), Err(ErrorKind::ConnectionReset));
    assert!(rs.wait_exit().success());
}
with_both_drivers!(a_connection_still_exchanging_at_the_drain_deadline_resets_both_sides);
