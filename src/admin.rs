//! Admin, metrics and health listeners (SPEC §3, §5): a tiny blocking HTTP/1.1 server on its
//! own thread, off the data path. Requests are bounded in size and time.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

mod envoy;

use crate::backoff::{self, Backoff};
use crate::metrics::CONTENT_TYPE;
use crate::worker::Shared;

/// Time a client has to send its whole request head; then it gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest request head; beyond it the client gets 431.
pub const MAX_HEAD: usize = 16 * 1024;

/// Requests served at once per listener. When all are taken, the oldest one still sending its
/// head after GRACE is cut to make room, so clients that hold connections open (slowloris)
/// cannot lock a probe out; a request whose head has arrived is left to finish.
const MAX_IN_FLIGHT: usize = 64;
/// How long a new connection has to send its head before it may be cut for a newcomer.
const GRACE: Duration = Duration::from_secs(1);
/// Beyond MAX_IN_FLIGHT while every request is within its grace: the hard bound, at which the
/// oldest is cut regardless.
const HARD_MAX_IN_FLIGHT: usize = 4 * MAX_IN_FLIGHT;

/// After an error answer, how long and how much we read and discard before closing, so the
/// client's unread request does not turn our close into a reset that destroys the answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 4 << 20;

/// Request threads need little stack: a head buffer on the heap and a rendered page.
const STACK: usize = 256 * 1024;

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
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || accept_loop(role, &name, &listener, &shared))?;
    Ok(bound)
}

fn accept_loop(role: Role, name: &str, listener: &TcpListener, shared: &Arc<Shared>) {
    let mut backoff = Backoff::default();
    // The requests being served, oldest first. Weak: a finished request's socket closes when
    // its thread drops it, and its entry is then dead.
    let mut in_flight: VecDeque<(Instant, Weak<Request>)> = VecDeque::with_capacity(MAX_IN_FLIGHT);
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if backoff::is_resource_error(&e) => {
                // Retrying at once would spin: the connection stays queued and fails again.
                let p = backoff.failed(Instant::now());
                if let Some(n) = p.log {
                    log::warn!("{role:?} listener: accept: {e} ({n} times); pausing up to {:?}", p.pause);
                }
                std::thread::sleep(p.pause);
                continue;
            }
            Err(e) => {
                log::debug!("{role:?} listener: accept: {e}");
                continue;
            }
        };
        // A thread per request: a slow client holds only its own thread, for REQUEST_TIMEOUT.
        in_flight.retain(|(_, r)| r.strong_count() > 0);
        if in_flight.len() >= MAX_IN_FLIGHT
            && let Some(victim) = victim(&in_flight, Instant::now())
            && let Some((_, r)) = in_flight.remove(victim)
            && let Some(r) = r.upgrade()
        {
            // Its read or write fails at once and its thread ends; the newcomer (often a
            // probe whose request is already here) is served.
            let _ = r.stream.shutdown(Shutdown::Both);
        }
        let request = Arc::new(Request { stream, head_done: AtomicBool::new(false) });
        let (handle, shared) = (Arc::downgrade(&request), shared.clone());
        let spawned = std::thread::Builder::new().name(name.to_string()).stack_size(STACK).spawn(move || {
            if let Err(e) = handle_request(role, &request, &shared) {
                log::debug!("{role:?} request: {e}");
            }
        });
        match spawned {
            Ok(_) => in_flight.push_back((Instant::now(), handle)),
            Err(e) => log::warn!("{role:?} listener: cannot start a request thread: {e}"),
        }
    }
}

/// One request's socket, shared by its thread and the accept loop (which may cut it).
struct Request {
    stream: TcpStream,
    /// Set once the whole head has arrived: from then on the request is only being answered.
    head_done: AtomicBool,
}

/// Which request to cut for a newcomer: the oldest still sending its head after GRACE; at
/// HARD_MAX_IN_FLIGHT, the oldest still sending its head, else the oldest. None: admit the
/// newcomer beyond MAX_IN_FLIGHT.
fn victim(in_flight: &VecDeque<(Instant, Weak<Request>)>, now: Instant) -> Option<usize> {
    let sending = |r: &Weak<Request>| r.upgrade().is_some_and(|r| !r.head_done.load(Ordering::Acquire));
    let slow = in_flight.iter().position(|(t, r)| now.saturating_duration_since(*t) >= GRACE && sending(r));
    match slow {
        Some(i) => Some(i),
        None if in_flight.len() >= HARD_MAX_IN_FLIGHT => {
            Some(in_flight.iter().position(|(_, r)| sending(r)).unwrap_or(0))
        }
        None => None,
    }
}

/// How reading a request head ended.
enum Head {
    /// The whole head, up to and including the blank line.
    Complete(Vec<u8>),
    /// The client closed (or was cut) before finishing it.
    Closed,
    /// Larger than MAX_HEAD.
    TooLarge,
    /// Not finished within REQUEST_TIMEOUT.
    TooSlow,
}

fn read_head(mut stream: &TcpStream) -> io::Result<Head> {
    // The whole head must arrive within REQUEST_TIMEOUT, however it is dripped.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // Only the bytes just read (and the 3 before) can complete the blank line.
        let from = head.len().saturating_sub(chunk.len() + 3);
        if head.get(from..).is_some_and(|tail| tail.windows(4).any(|w| w == b"\r\n\r\n")) {
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::TooSlow);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(Head::TooSlow);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn handle_request(role: Role, request: &Request, shared: &Arc<Shared>) -> io::Result<()> {
    let stream = &request.stream;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let head = match read_head(stream)? {
        Head::Complete(head) => {
            request.head_done.store(true, Ordering::Release);
            head
        }
        Head::Closed => return Ok(()),
        Head::TooLarge => return refuse(stream, 431, "request head over 16 KiB\n"),
        Head::TooSlow => return refuse(stream, 408, "request head not received in time\n"),
    };
    let Some((method, path)) = request_line(&head) else {
        return refuse(stream, 400, "malformed request line\n");
    };
    // A scrape keeps its render turn until its body is written (at most 5 s, the write
    // timeout), so at most MAX_RENDERS bodies exist at once: 20 scrapers of a 6 MB body held
    // 100 MiB more when the turn ended with the render (SPEC §11).
    let _turn = (path.split('?').next() == Some("/stats/prometheus")).then(|| RENDERS.enter());
    let (status, kind, body, allow) = route(role, method, path, shared);
    respond(stream, status, kind, allow, &body)?;
    let _ = stream.shutdown(Shutdown::Write);
    if role == Role::Admin && status == 200 && path == "/quitquitquit" {
        // Envoy's quitquitquit: exit at once once the answer is out. Metrics are scraped, not
        // flushed at exit (SPEC §10), so nothing counted is lost.
        log::info!("quitquitquit: exiting");
        std::process::exit(0);
    }
    Ok(())
}

/// `METHOD SP request-target SP HTTP/1.x` (RFC 9112 §3), or None when malformed.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line.strip_suffix(b"\r")?).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let target_ok = target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic());
    let version_ok = matches!(version, "HTTP/1.0" | "HTTP/1.1");
    (parts.next().is_none() && token(method) && target_ok && version_ok).then_some((method, target))
}

/// Answer an error, then read and discard what the client still sends (bounded), so our
/// close does not reset the connection before the client has read the answer.
fn refuse(mut stream: &TcpStream, status: u16, body: &str) -> io::Result<()> {
    respond(stream, status, "text/plain", None, body)?;
    stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + LINGER;
    let (mut chunk, mut discarded) = ([0u8; 4096], 0);
    while discarded < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
    Ok(())
}

/// Status, content type and body for a well-formed request: 404 for a path this role does
/// not serve, 405 (with the methods it allows) for a known path and another method.
fn route(
    role: Role,
    method: &str,
    target: &str,
    shared: &Arc<Shared>,
) -> (u16, &'static str, String, Option<&'static str>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let allowed = match (role, path) {
        (Role::Admin | Role::Metrics, "/stats/prometheus")
        | (Role::Admin, "/ready" | "/config_dump" | "/stats" | "/server_info")
        | (Role::Health, "/healthz/ready") => "GET",
        (Role::Admin, "/drain" | "/drain_listeners" | "/quitquitquit") => "POST",
        _ => return (404, "text/plain", "not found\n".to_string(), None),
    };
    if method != allowed {
        return (405, "text/plain", "method not allowed\n".to_string(), Some(allowed));
    }
    let (status, kind, body) = match path {
        // At most MAX_RENDERS at once (SPEC §11): the caller holds a turn of the render gate
        // until the body is written, so a flood of scrapes cannot hold a body per thread.
        "/stats/prometheus" => (200, CONTENT_TYPE, shared.render()),
        // Under Istio's agent, readiness is the agent's to say (it asks our admin API itself),
        // as the bootstrap's static listener routes it (SPEC §10).
        "/healthz/ready" if let Some(agent) = shared.config.health.forward => ask_agent(agent),
        // Envoy's /ready: 200 only when LIVE; else 503 naming the state.
        "/ready" | "/healthz/ready" => {
            let state = envoy::server_state(shared);
            let status = if state == envoy::ServerState::Live && shared.ready() { 200 } else { 503 };
            (status, "text/plain", format!("{}\n", state.name()))
        }
        "/stats" => match envoy::render_stats(&envoy::stats(shared), query) {
            Ok(text) => (200, "text/plain", text),
            Err(e) => (400, "text/plain", format!("{e}\n")),
        },
        "/server_info" => (200, "application/json", envoy::server_info(shared)),
        "/drain_listeners" => (200, "text/plain", envoy::drain_listeners(shared, query)),
        "/quitquitquit" => (200, "text/plain", "OK\n".to_string()),
        "/config_dump" => match config_dump(shared) {
            Ok(json) => (200, "application/json", json + "\n"),
            Err(e) => (500, "text/plain", format!("{e}\n")),
        },
        _ => {
            // /drain, as Envoy's drain_listeners without flags: stop accepting and fail readiness, but keep
            // serving live connections and metrics until SIGTERM ends the process.
            shared.draining.store(true, Ordering::Release);
            log::info!("drain requested over admin: listeners stop accepting");
            (200, "text/plain", "OK\n".to_string())
        }
    };
    (status, kind, body, None)
}

/// Scrapes rendered at once, across the admin and metrics listeners (SPEC §11).
const MAX_RENDERS: usize = 2;

/// The process's render gate.
static RENDERS: Gate = Gate::new(MAX_RENDERS);

/// A counting gate: at most `limit` holders at once; others wait (sleeping briefly between
/// looks: admin threads only, never a worker). std's Mutex/Condvar are banned here, and a
/// scrape is rare enough that a 1 ms re-check costs nothing.
struct Gate {
    limit: usize,
    inside: AtomicUsize,
}

/// One holder of a [`Gate`]; leaving on drop.
struct Turn<'a>(&'a Gate);

impl Gate {
    const fn new(limit: usize) -> Gate {
        Gate { limit, inside: AtomicUsize::new(0) }
    }

    fn enter(&self) -> Turn<'_> {
        loop {
            if let Some(turn) = self.try_enter() {
                return turn;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A turn if fewer than `limit` hold one.
    fn try_enter(&self) -> Option<Turn<'_>> {
        let n = self.inside.load(Ordering::Acquire);
        let free = n < self.limit
            && self.inside.compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire).is_ok();
        free.then(|| Turn(self)) // lazily: a Turn built and dropped would leave the gate
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Time Istio's agent has to answer a forwarded readiness probe (Envoy's static cluster
/// `agent` has a 250 ms connect timeout; the answer itself is quick).
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest agent answer relayed.
const AGENT_MAX: u64 = 64 * 1024;

/// `GET /healthz/ready` of Istio's agent at `agent`: its status and body, or 503 when it
/// cannot be asked (Envoy answers an unreachable upstream with 503 too).
fn ask_agent(agent: SocketAddr) -> (u16, &'static str, String) {
    let unreachable = |e: io::Error| (503, "text/plain", format!("agent {agent}: {e}\n"));
    let mut s = match TcpStream::connect_timeout(&agent, AGENT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return unreachable(e),
    };
    let asked = s
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(AGENT_TIMEOUT)))
        .and_then(|()| {
            s.write_all(
                format!("GET /healthz/ready HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
        });
    let mut answer = Vec::new();
    if let Err(e) = asked.and_then(|()| (&mut s).take(AGENT_MAX).read_to_end(&mut answer)) {
        return unreachable(e);
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    match (status, text.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => (status, "text/plain", body.to_string()),
        _ => unreachable(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer")),
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

/// Write a whole response; `allow` is the Allow header a 405 must carry (RFC 9110 §15.5.6).
fn respond(
    mut stream: &TcpStream,
    status: u16,
    kind: &str,
    allow: Option<&str>,
    body: &str,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let allow = allow.map(|a| format!("Allow: {a}\r\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    // A small answer in one write (one segment); a large one (a scrape at the label budget,
    // megabytes) written as it is, not copied behind its head (SPEC §11).
    if body.len() <= SMALL_BODY {
        return stream.write_all((head + body).as_bytes());
    }
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Bodies up to this size are copied behind their head and written at once.
const SMALL_BODY: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_render_gate_lets_two_in_and_a_third_only_once_one_left() {
        let gate = Gate::new(2);
        let first = gate.enter();
        let _second = gate.enter();
        assert!(gate.try_enter().is_none(), "a third waits while two render");
        drop(first);
        let third = gate.try_enter();
        assert!(third.is_some());
        assert!(gate.try_enter().is_none());
        // A waiter gets in as soon as a turn is given back.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| drop(gate.enter()));
            drop(third);
            waiter.join().unwrap();
        });
    }
}
