//! SPEC §1 accept errors: at the descriptor limit a listener pauses accepting with a growing
//! back-off instead of spinning, logs one line per interval with a count, keeps serving live
//! connections and resumes by itself once descriptors free up; an upstream connect that hits
//! the limit is UF, counted once, and leaks nothing. The limit is lowered on the running
//! process with util-linux's `prlimit --pid`, so it lands exactly on what the process holds.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::process::{cpu_ticks, fds};
use common::*;

/// The process's descriptor count once it holds still: the admin request thread that answered
/// the last probe closes its socket just after the client saw the answer.
fn settled_fds(pid: u32) -> usize {
    wait_for("the descriptor count to settle", || {
        let before = fds(pid);
        thread::sleep(Duration::from_millis(100));
        (fds(pid) == before).then_some(before)
    })
}

fn fd_numbers(pid: u32) -> Vec<usize> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    dir.map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap()).collect()
}

fn set_nofile(pid: u32, n: usize) {
    let ok = Command::new("prlimit").args([format!("--pid={pid}"), format!("--nofile={n}:20000")]).status();
    assert!(ok.unwrap().success(), "prlimit --pid {pid} --nofile={n}");
}

fn round_trip(s: &mut TcpStream, what: &[u8]) {
    s.write_all(what).unwrap();
    assert_eq!(read_exact(s, what.len()), what);
}

fn at_the_descriptor_limit_accepting_pauses_without_spinning_and_resumes_when_descriptors_free(driver: &str) {
    let mut rs = plain_relay(echo_server(), driver, &[]);
    let pid = rs.pid();
    let mut held: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut c = connect(rs.listen);
            round_trip(&mut c, b"held");
            c
        })
        .collect();
    // Not one descriptor more: stdin, stdout and stderr fill the allowed numbers, so every
    // accept fails with EMFILE (exactly so, whatever else the runtime holds). 150 clients
    // wait in the accept queues, and a readiness probe in the admin listener's.
    set_nofile(pid, 3);
    let queued: Vec<TcpStream> = (0..150)
        .map(|_| {
            let mut c = TcpStream::connect(rs.listen).unwrap();
            c.write_all(b"q").unwrap();
            c
        })
        .collect();
    let mut probe = TcpStream::connect(rs.admin).unwrap();
    probe.write_all(b"GET /ready HTTP/1.1\r\n\r\n").unwrap();
    // Saturated: the process's CPU over a window (10 ms ticks; a retry loop burns a core).
    let window = Duration::from_secs(3);
    let before = cpu_ticks(pid);
    thread::sleep(window); // the measurement window itself, not a synchronisation
    let used = cpu_ticks(pid) - before;
    // Live connections are still served meanwhile.
    for c in held.iter_mut() {
        round_trip(c, b"still live");
    }
    // Descriptors free up: every listener resumes by itself, within its longest pause (1 s).
    let freed = Instant::now();
    set_nofile(pid, 20000);
    probe.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    probe.read_to_string(&mut answer).unwrap();
    let probe_after = freed.elapsed();
    let mut fresh = connect(rs.listen);
    round_trip(&mut fresh, b"fresh");
    let recovered = freed.elapsed();
    eprintln!(
        "{driver}: {used} ticks of CPU in {window:?} while saturated; probe answered {probe_after:?} and a new client served {recovered:?} after descriptors freed"
    );
    assert!(used * 10 <= window.as_millis() as u64 / 10, "{used} CPU ticks in {window:?}: spinning");
    assert!(recovered < Duration::from_secs(5), "recovered only after {recovered:?}");

    // Every connection, held, queued or fresh, is counted opened and closed once; the queued
    // ones were proxied too (their request arrived before they closed).
    drop((held, queued, fresh));
    let s = rs.wait_for_scrape("every connection closed", DEADLINE, |s| {
        sum(s, OPENED, &[]) == 161.0 && sum(s, CLOSED, &[]) == 161.0
    });
    // An accept already under way in a worker (an io_uring op in flight) when the limit fell
    // had its descriptor; its upstream connect then failed: UF, at most one per worker.
    let uf = sum(&s, OPENED, &[("response_flags", "UF")]);
    assert!(uf <= 2.0, "{uf} UF");
    assert_eq!(sum(&s, OPENED, &[("response_flags", "-")]) + uf, 161.0);
    rs.signal("TERM");
    assert!(rs.wait_exit().success());
    let all = rs.stderr_lines();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}: {all:?}");
    let lines: Vec<&String> = all.iter().filter(|l| l.contains("pausing")).collect();
    eprintln!("{driver}: {} back-off lines, e.g. {:?}", lines.len(), lines.first());
    // One line per interval per listener: the first at once, then at most one a second
    // (two workers and the admin listener, for ~4 s).
    assert!(lines.iter().any(|l| l.contains("listener main: accept: Too many open files")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("Admin listener: accept: Too many open files")), "{lines:?}");
    assert!(lines.len() <= 3 * 7, "{} lines: {lines:?}", lines.len());
}
with_both_drivers!(
    at_the_descriptor_limit_accepting_pauses_without_spinning_and_resumes_when_descriptors_free
);

fn an_upstream_connect_that_hits_the_descriptor_limit_is_uf_counted_once_and_leaks_nothing(driver: &str) {
    let rs = plain_relay(echo_server(), driver, &[]);
    let pid = rs.pid();
    let base = settled_fds(pid);
    // One descriptor number left: each client is accepted, and its upstream socket cannot be
    // made. The numbers not listed in /proc below that one are the admin and metrics threads'
    // accept(2), which holds the lowest free number while it waits; numbers far above (a
    // pipe inherited from cargo) do not matter.
    let listed = fd_numbers(pid);
    let free = (0..).filter(|n| !listed.contains(n)).nth(2).unwrap();
    set_nofile(pid, free + 1);
    for _ in 0..20 {
        let mut c = connect(rs.listen);
        c.write_all(b"lost").unwrap();
        assert_closed_empty(&mut c, "a client whose upstream could not be opened");
    }
    assert_eq!(fds(pid), base, "a descriptor leaked");
    set_nofile(pid, 20000);
    let uf = [("response_flags", "UF")];
    let s = rs.wait_for_value(CLOSED, &uf, 20.0);
    assert_eq!(sum(&s, OPENED, &uf), 20.0);
    assert_eq!(sum(&s, OPENED, &[]), 20.0);
    // Still healthy once descriptors are back.
    let mut c = connect(rs.listen);
    round_trip(&mut c, b"ok");
}
with_both_drivers!(an_upstream_connect_that_hits_the_descriptor_limit_is_uf_counted_once_and_leaks_nothing);
