//! Shared test code: spawn the real binary on free ports, backends, scrapes, deadlines.
#![allow(dead_code)]

/// Run a test body once per driver (`#[macro_use] mod common;` in the test file).
#[allow(unused_macros)]
macro_rules! with_both_drivers {
    ($name:ident) => {
        mod $name {
            #[test]
            fn uring() {
                super::$name("uring");
            }
            #[test]
            fn epoll() {
                super::$name("epoll");
            }
        }
    };
}

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub mod process;
mod skip;

#[allow(unused_imports)]
pub use skip::{shared, skip};

/// Istio's TCP metric names (SPEC §3).
pub const OPENED: &str = "istio_tcp_connections_opened_total";
/// Connections closed.
pub const CLOSED: &str = "istio_tcp_connections_closed_total";
/// Request-direction bytes.
pub const RECEIVED: &str = "istio_tcp_received_bytes_total";
/// Response-direction bytes.
pub const SENT: &str = "istio_tcp_sent_bytes_total";

/// A generous bound for anything that should happen "at once" on a loaded 2-core CI box.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A free loopback port, bound and released. Taken below the kernel's ephemeral range
/// (32768-60999 by default): a port 0 bind would hand out one that any test connection's
/// local end may take before the proxy binds it (seen: "Address already in use" in CI).
/// Spread by process id, so test binaries running at once start far apart.
pub fn free_addr() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(2654435761) % 20000;
    for _ in 0..22000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 10000 + (base + n * 7) % 22000; // 10000..=31999
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap();
        }
    }
    panic!("no free loopback port in 10000-31999");
}

/// Poll `f` until it returns Some, or panic after `DEADLINE`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A running `ringside` process.
pub struct Ringside {
    child: Option<Child>,
    /// The first listener's address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Metrics address, when enabled.
    pub metrics: Option<SocketAddr>,
    /// stderr lines, collected by a thread.
    stderr: mpsc::Receiver<String>,
}

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringside")
}

impl Ringside {
    /// `ringside run --listen FREE --upstream UPSTREAM --direction D ... extra`, waiting for /ready.
    pub fn spawn(upstream: SocketAddr, direction: &str, extra: &[&str]) -> Ringside {
        Self::spawn_command(Command::new(bin()), upstream, direction, extra)
    }

    /// As `spawn`, from a prepared `Command` of the binary (e.g. with a `pre_exec` hook).
    pub fn spawn_command(cmd: Command, upstream: SocketAddr, direction: &str, extra: &[&str]) -> Ringside {
        let listen = free_addr();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--listen".into(),
            listen.to_string(),
            "--upstream".into(),
            upstream.to_string(),
            "--direction".into(),
            direction.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_in(cmd, listen, args)
    }

    /// Run with a config file (written by the test) plus extra flags; `listen` is its first listener.
    pub fn spawn_config(config: &str, listen: SocketAddr, extra: &[&str]) -> Ringside {
        Self::spawn_config_wrapped(&[], config, listen, extra)
    }

    /// As `spawn_config`, with the binary run through `wrapper` (empty: none).
    pub fn spawn_config_wrapped(
        wrapper: &[&str],
        config: &str,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Ringside {
        // Unique per spawn: two sidecars of one test may share a (port 0) listen address.
        static SPAWNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SPAWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "ringside-test-{}-{}-{n}.yaml",
            std::process::id(),
            listen.port()
        ));
        std::fs::write(&path, config).unwrap();
        let mut args = vec!["run".to_string(), "--config".into(), path.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        match wrapper {
            [] => Self::spawn_args(listen, args),
            [first, rest @ ..] => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(bin());
                Self::spawn_in(cmd, listen, args)
            }
        }
    }

    /// As `spawn`, with the binary run through `wrapper` (e.g. `setpriv --reuid 1337 --`).
    pub fn spawn_wrapped(
        wrapper: &[&str],
        upstream: SocketAddr,
        direction: &str,
        extra: &[&str],
    ) -> Ringside {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(bin());
        Self::spawn_command(cmd, upstream, direction, extra)
    }

    fn spawn_args(listen: SocketAddr, args: Vec<String>) -> Ringside {
        Self::spawn_in(Command::new(bin()), listen, args)
    }

    fn spawn_in(mut cmd: Command, listen: SocketAddr, mut args: Vec<String>) -> Ringside {
        let admin = free_addr();
        let has = |args: &Vec<String>, flag: &str| args.iter().any(|a| a == flag);
        if !has(&args, "--admin") {
            args.extend(["--admin".into(), admin.to_string()]);
        }
        let metrics = if has(&args, "--metrics") {
            let i = args.iter().position(|a| a == "--metrics").unwrap();
            args[i + 1].parse().ok()
        } else {
            let m = free_addr();
            args.extend(["--metrics".into(), m.to_string()]);
            Some(m)
        };
        if !has(&args, "--health") {
            args.extend(["--health".into(), "off".into()]);
        }
        if !has(&args, "--workers") {
            args.extend(["--workers".into(), "2".into()]);
        }
        let mut child = cmd
            .args(&args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringside");
        let (tx, rx) = mpsc::channel();
        let mut err = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            for l in s.lines() {
                let _ = tx.send(l.to_string());
            }
        });
        let mut rs = Ringside { child: Some(child), listen, admin, metrics, stderr: rx };
        wait_for("ringside /ready", || {
            if let Some(status) = rs.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ringside exited early with {status}: {:?}", rs.stderr_lines());
            }
            (http(rs.admin, "GET", "/ready").map(|(code, _)| code) == Some(200)).then_some(())
        });
        rs
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// GET /stats/prometheus from the metrics listener.
    pub fn scrape(&self) -> String {
        let addr = self.metrics.unwrap_or(self.admin);
        let (code, body) = http(addr, "GET", "/stats/prometheus").expect("scrape");
        assert_eq!(code, 200);
        body
    }

    /// Wait until `metric` with all `labels` has `value`, and return the scrape.
    pub fn wait_for_value(&self, metric: &str, labels: &[(&str, &str)], value: f64) -> String {
        let start = Instant::now();
        loop {
            let last = self.scrape();
            if sum(&last, metric, labels) == value {
                return last;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {metric}{labels:?} = {value}; last scrape:\n{last}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Scrape until `done` holds for a scrape, and return that scrape; panic after `deadline`.
    pub fn wait_for_scrape(&self, what: &str, deadline: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let last = self.scrape();
            if done(&last) {
                return last;
            }
            assert!(
                start.elapsed() < deadline,
                "timed out ({deadline:?}) waiting for {what}; last scrape:\n{last}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Send a signal to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args(["-s", sig, &pid]).status().unwrap().success());
    }

    /// Wait for the process to exit (bounded).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = wait_for("ringside to exit", || child.try_wait().unwrap());
        self.child = None;
        status
    }

    /// stderr lines: all of them once `wait_exit` returned (this then waits for the reader
    /// thread to see the pipe close), else those so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        if self.child.is_none() {
            return self.stderr.iter().collect();
        }
        self.stderr.try_iter().collect()
    }
}

impl Drop for Ringside {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failing test shows what each ringside it started logged (the last lines).
        if thread::panicking() {
            let lines: Vec<String> = self.stderr.iter().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!(
                "--- ringside on {} logged ({} lines, the last {}):",
                self.listen,
                lines.len(),
                lines.len() - from
            );
            lines[from..].iter().for_each(|l| eprintln!("{l}"));
        }
    }
}

/// One HTTP/1.1 request; returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    http_response(addr, method, path).map(|r| (r.status, r.body))
}

/// An HTTP response: status, headers in order, body (de-chunked).
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (as sent) and values.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// The value of header `name` (case-insensitive), if exactly one was sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        let first = values.next()?;
        assert!(values.next().is_none(), "header {name} sent twice: {:?}", self.headers);
        Some(&first.1)
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to EOF; None if the server is not there
/// or the answer is not HTTP.
pub fn http_response(addr: SocketAddr, method: &str, path: &str) -> Option<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut r = Response { status, headers, body: body.to_string() };
    if r.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        r.body = dechunk(&r.body)?;
    }
    Some(r)
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// `s` percent-encoded for a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One exposition line: name, labels in order, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parse one exposition line `name{k="v",...} value`.
pub fn parse_line(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.to_string(), vec![], value));
    };
    let mut labels = Vec::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (k, v) = rest.split_once("=\"")?;
        let end = v.find('"')?;
        labels.push((k.to_string(), v[..end].to_string()));
        rest = v[end + 1..].trim_start_matches(',');
    }
    Some((name.to_string(), labels, value))
}

/// Sum of every series of `metric` whose labels include all of `labels`.
pub fn sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(parse_line)
        .filter(|(n, ls, _)| {
            n == metric && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// A backend that echoes every byte and half-closes after the client does.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    serve_each(l, echo_until_eof);
    addr
}

/// Serve every connection `listener` accepts with `handle`, each on its own thread (forever,
/// on detached threads).
pub fn serve_each<F: Fn(TcpStream) + Send + Clone + 'static>(listener: TcpListener, handle: F) {
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let handle = handle.clone();
            thread::spawn(move || handle(s));
        }
    });
}

/// Echo what `s` reads until EOF, then half-close; a failed write ends it at once.
pub fn echo_until_eof(s: TcpStream) {
    let mut r = s.try_clone().unwrap();
    let mut w = s;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = w.shutdown(Shutdown::Write);
}

/// A backend that hands each accepted server-side socket to the test.
pub fn manual_server() -> (SocketAddr, mpsc::Receiver<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// Accept the next upstream connection (bounded).
pub fn next_conn(rx: &mpsc::Receiver<TcpStream>) -> TcpStream {
    let s = rx.recv_timeout(DEADLINE).expect("an upstream connection");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Connect to `addr` with a read timeout set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Read until EOF.
pub fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

/// An outbound ringside on `driver` that relays plain TCP to `upstream` (no peer exchange),
/// with `extra` flags.
pub fn plain_relay(upstream: SocketAddr, driver: &str, extra: &[&str]) -> Ringside {
    let mut args = vec!["--peer-exchange", "off", "--driver", driver];
    args.extend_from_slice(extra);
    Ringside::spawn(upstream, "outbound", &args)
}

/// Run the binary with `args` to completion; (exit code, stderr).
pub fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Write `data` on its own thread (so a large echo cannot deadlock on full buffers),
/// half-close, and read everything back until EOF (reads time out after `DEADLINE`).
pub fn echo_back(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut w = s.try_clone().unwrap();
    let sent = data.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let got = read_to_end(&mut s);
    writer.join().unwrap();
    got
}

/// Read exactly `n` bytes.
pub fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// A small deterministic PRNG (xorshift) for payloads and chunkings.
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    /// `n` pseudo-random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Assert that the proxy closed `s` (EOF or reset) without sending anything; a read timeout
/// (the proxy left it open) fails.
pub fn assert_closed_empty(s: &mut TcpStream, what: &str) {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected the proxy to close the connection, got {e}"),
    }
    assert!(got.is_empty(), "{what}: {} unexpected bytes", got.len());
}

/// A backend on `listener` that writes `tag` on every connection, then echoes until EOF.
pub fn tag_server_on(listener: TcpListener, tag: &'static str) {
    serve_each(listener, move |mut s: TcpStream| {
        if s.write_all(tag.as_bytes()).is_ok() {
            echo_until_eof(s);
        }
    });
}

/// A tagging backend ([`tag_server_on`]) on a free loopback port.
pub fn tag_server(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    tag_server_on(listener, tag);
    addr
}

/// The istio_tcp_* series of a scrape, `name{labels} value`, sorted.
pub fn istio_series(scrape: &str) -> Vec<String> {
    let mut out: Vec<String> =
        scrape.lines().filter(|l| l.starts_with("istio_tcp_")).map(str::to_string).collect();
    out.sort();
    out
}
