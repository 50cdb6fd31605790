//! Splice under a sidecar's production limits (SPEC §1: bytes arrive unchanged; buffers and
//! pipes come from a per-worker pool): ringside runs as an unprivileged uid, as Istio's
//! sidecar does (1337, no CAP_SYS_RESOURCE), so its pipes count against that uid's page budget.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;

use common::{Ringside, echo_server, wait_for};

/// Concurrent bulk connections: more than the pipes a worker keeps idle (8).
const CONNECTIONS: usize = 24;
/// Bytes each connection sends (and gets echoed): many full 16 KiB reads, so each splices.
const BYTES: usize = 2 * 1024 * 1024;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Deterministic, non-repeating bytes, different per connection.
fn payload(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..BYTES)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// setpriv to an unprivileged uid; `None` when this host cannot (not root, no setpriv).
fn unprivileged() -> Option<[&'static str; 6]> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).exists())?;
    let works = root
        && Command::new(setpriv)
            .args(["--reuid", "1337", "--regid", "1337", "--clear-groups", "true"])
            .status()
            .is_ok_and(|s| s.success());
    works.then_some([setpriv, "--reuid", "1337", "--regid", "1337", "--clear-groups"])
}

#[test]
fn bulk_flows_through_an_unprivileged_sidecar_stay_byte_exact_and_give_their_pipes_back() {
    let Some(setpriv) = unprivileged() else {
        eprintln!("skipped: needs root and setpriv to run ringside as uid 1337");
        return;
    };
    let backend = echo_server();
    let mut wrapper = setpriv.to_vec();
    wrapper.push("--");
    let rs =
        Ringside::spawn_wrapped(&wrapper, backend, "outbound", &["--workers", "1", "--peer-exchange", "off"]);
    let pid = rs.pid();
    let baseline = fd_count(pid);

    // Each connection sends its payload while a reader thread checks the echo byte for byte;
    // the connection then stays open, idle.
    let clients: Vec<(TcpStream, thread::JoinHandle<()>)> = (0..CONNECTIONS)
        .map(|i| {
            let s = TcpStream::connect(rs.listen).unwrap();
            let mut r = s.try_clone().unwrap();
            let mut w = s.try_clone().unwrap();
            thread::spawn(move || w.write_all(&payload(i as u64)).unwrap());
            let reader = thread::spawn(move || {
                let mut echoed = vec![0u8; BYTES];
                r.read_exact(&mut echoed).unwrap();
                assert!(echoed == payload(i as u64), "connection {i}: echo differs from what was sent");
            });
            (s, reader)
        })
        .collect();
    let clients: Vec<TcpStream> = clients
        .into_iter()
        .map(|(s, reader)| {
            reader.join().unwrap();
            s
        })
        .collect();

    // Quiet now: each connection holds its two sockets; its pipes went back to the worker,
    // which keeps at most 8 idle (2 fds each). Before pooling, every bulk direction kept its
    // own pipe: 4 more fds per connection.
    let bound = baseline + 2 * CONNECTIONS + 2 * 8;
    wait_for("pipes returned after the flows went quiet", || (fd_count(pid) <= bound).then_some(()));

    for s in &clients {
        s.shutdown(Shutdown::Both).unwrap();
    }
    drop(clients);
    wait_for("sockets closed", || (fd_count(pid) <= baseline + 2 * 8).then_some(()));
}
