//! Admin, metrics and health listeners (SPEC §3, §5): a tiny blocking HTTP/1.1 server on its
//! own thread, off the data path. Requests are bounded in size and time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::CONTENT_TYPE;
use crate::worker::Shared;

/// Time a client has to send its whole request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Requests served at once per listener; more are closed unanswered.
const MAX_IN_FLIGHT: usize = 16;

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `/ready`, `/stats/prometheus`, `/config_dump`, `/drain`.
    Admin,
    /// `/stats/prometheus` only.
    Metrics,
    /// `/healthz/ready` only.
    Health,
}

/// Bind `addr` and serve `role` on a background thread; returns the bound address.
pub fn spawn(role: Role, addr: SocketAddr, shared: Arc<Shared>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let name = format!("ringside-{role:?}").to_lowercase();
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        // A thread per request, at most MAX_IN_FLIGHT at once: a slow client holds only its
        // own thread (for at most the 2 s read timeout), never the next probe or scrape.
        let in_flight = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming().flatten() {
            if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: the client sees a reset or EOF and retries
            }
            let (shared, done) = (shared.clone(), in_flight.clone());
            let spawned = std::thread::Builder::new().name(name.clone()).spawn(move || {
                if let Err(e) = handle(role, stream, &shared) {
                    log::debug!("{role:?} request: {e}");
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
            if let Err(e) = spawned {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                log::warn!("{role:?} listener: cannot start a request thread: {e}");
            }
        }
    })?;
    Ok(bound)
}

fn handle(role: Role, mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    // The whole request head must arrive within REQUEST_TIMEOUT, however it is dripped.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request head too slow"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 || head.len() + n > 16 * 1024 {
            return respond(&mut stream, 400, "text/plain", "bad request\n");
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = route(role, method, path, shared);
    respond(&mut stream, status, kind, &body)
}

fn route(role: Role, method: &str, path: &str, shared: &Shared) -> (u16, &'static str, String) {
    let ready = || {
        if shared.ready() {
            (200, "text/plain", "LIVE\n".to_string())
        } else {
            (503, "text/plain", "DRAINING\n".to_string())
        }
    };
    match (role, method, path) {
        (Role::Admin | Role::Metrics, "GET", "/stats/prometheus") => (200, CONTENT_TYPE, shared.render()),
        (Role::Admin, "GET", "/ready") | (Role::Health, "GET", "/healthz/ready") => ready(),
        (Role::Admin, "GET", "/config_dump") => match config_dump(shared) {
            Ok(json) => (200, "application/json", json + "\n"),
            Err(e) => (500, "text/plain", format!("{e}\n")),
        },
        (Role::Admin, "POST", "/drain" | "/drain_listeners?graceful" | "/drain_listeners") => {
            // As Envoy's drain_listeners: stop accepting and fail readiness, but keep serving
            // live connections and metrics until SIGTERM ends the process.
            shared.draining.store(true, Ordering::Release);
            log::info!("drain requested over admin: listeners stop accepting");
            (200, "text/plain", "OK\n".to_string())
        }
        _ => (404, "text/plain", "not found\n".to_string()),
    }
}

/// The config served now (static and xDS parts; each xDS resource names its version in
/// `source`), plus `cpus`: the workers and pinning chosen and why (SPEC §1, §9).
fn config_dump(shared: &Shared) -> serde_json::Result<String> {
    let published = shared.published.load();
    let mut dump = serde_json::to_value(&*published.config)?;
    if let Some(map) = dump.as_object_mut() {
        map.insert("cpus".into(), serde_json::to_value(&shared.cpus)?);
        map.insert("generation".into(), published.generation.into());
        if let Some(x) = &shared.xds {
            let status = serde_json::json!({
                "connected": x.connected.load(Ordering::Relaxed),
                "not_served": &**x.reports.load(),
            });
            map.insert("xds_status".into(), status);
        }
    }
    serde_json::to_string_pretty(&dump)
}

fn respond(stream: &mut TcpStream, status: u16, kind: &str, body: &str) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
