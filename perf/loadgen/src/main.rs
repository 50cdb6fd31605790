//! Load generator and echo backend for `perf/run.sh`. Each client subcommand prints one JSON
//! line; every loop stops at a count limit and at a deadline, whichever comes first.
//!
//! Wire protocol with `echo-server`: the client's first byte picks the mode.
//! - `e` echo: every following byte is sent back.
//! - `s` sink: bytes are discarded until EOF, then the count is answered as 8 bytes
//!   little-endian, so `bulk` reports bytes that crossed the proxy, not bytes that merely
//!   left the client's socket buffer.
//! - `c` close: a 2-byte little-endian length and that many bytes follow; they are sent back
//!   and the backend closes first (as an HTTP/1.0 server does): `connrate --closer backend`.
//!
//! One mode byte instead of one port per mode keeps each proxy at a single listener, so its
//! RSS and CPU are those of one listener whatever the test.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::str::FromStr;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

const MODE_ECHO: u8 = b'e';
const MODE_SINK: u8 = b's';
const MODE_CLOSE: u8 = b'c';
/// Bulk write size: large enough that syscalls, not the generator, are the cost per byte.
const BULK_CHUNK: usize = 256 * 1024;
/// Echo read size: small, because an idle test parks one read per connection in the backend.
const ECHO_CHUNK: usize = 4 * 1024;
/// Upper bound for any single connect or exchange, so a wedged target cannot hang a run.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: loadgen <command> [--flag value]...
  echo-server --listen ADDR [--seconds 600]
  bulk        --target ADDR --streams N --seconds S [--max-bytes B]
  connrate    --target ADDR --concurrency C --seconds S --size B [--max N] [--closer client|backend]
  latency     --target ADDR --connections C --requests N --size B [--seconds 30]
  idle        --target ADDR --connections N --hold-seconds S [--open-seconds 30]";

fn main() {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| fail(USAGE));
    let flags = Flags::parse(args);
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(8192)
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    rt.block_on(async move {
        match cmd.as_str() {
            "echo-server" => echo_server(&flags).await,
            "bulk" => bulk(&flags).await,
            "connrate" => connrate(&flags).await,
            "latency" => latency(&flags).await,
            "idle" => idle(&flags).await,
            _ => fail(USAGE),
        }
    });
}

fn fail(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(64);
}

/// `--name value` pairs.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(mut args: impl Iterator<Item = String>) -> Self {
        let mut map = HashMap::new();
        while let Some(key) = args.next() {
            let Some(name) = key.strip_prefix("--") else { fail(&format!("unexpected {key}")) };
            let value = args.next().unwrap_or_else(|| fail(&format!("{key}: missing value")));
            map.insert(name.to_string(), value);
        }
        Flags(map)
    }

    fn get<T: FromStr>(&self, name: &str, default: Option<T>) -> T {
        match (self.0.get(name), default) {
            (Some(v), _) => v.parse().unwrap_or_else(|_| fail(&format!("--{name}: bad value {v}"))),
            (None, Some(d)) => d,
            (None, None) => fail(&format!("--{name} is required")),
        }
    }

    fn seconds(&self, name: &str, default: Option<f64>) -> Duration {
        Duration::from_secs_f64(self.get(name, default))
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let s = monoio::time::timeout(OP_TIMEOUT, TcpStream::connect_addr(target))
        .await
        .map_err(|_| timed_out())??;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn echo_server(flags: &Flags) {
    let listen: SocketAddr = flags.get("listen", None);
    let lifetime = flags.seconds("seconds", Some(600.0));
    let opts = ListenerOpts::new().reuse_addr(true).backlog(4096);
    let listener = TcpListener::bind_with_config(listen, &opts)
        .unwrap_or_else(|e| fail(&format!("listen {listen}: {e}")));
    println!("{{\"listening\":\"{listen}\"}}");
    let accept_loop = async {
        loop {
            // Accept errors (EMFILE under the idle test) must not end the backend.
            if let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                monoio::spawn(async move {
                    let _ = serve(s).await;
                });
            }
        }
    };
    let _ = monoio::time::timeout(lifetime, accept_loop).await;
}

async fn serve(mut s: TcpStream) -> io::Result<()> {
    let (r, mode) = s.read_exact(Vec::with_capacity(1)).await;
    r?;
    match mode[0] {
        MODE_ECHO => {
            let mut buf = Vec::with_capacity(ECHO_CHUNK);
            loop {
                let (r, b) = s.read(buf).await;
                if r? == 0 {
                    return Ok(());
                }
                let (r, b) = s.write_all(b).await;
                r?;
                buf = b;
            }
        }
        MODE_SINK => {
            let mut buf = Vec::with_capacity(BULK_CHUNK);
            let mut total: u64 = 0;
            loop {
                let (r, b) = s.read(buf).await;
                buf = b;
                match r? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            let (r, _) = s.write_all(total.to_le_bytes().to_vec()).await;
            r.map(|_| ())
        }
        MODE_CLOSE => {
            let (r, len) = s.read_exact(Vec::with_capacity(2)).await;
            r?;
            let len = u16::from_le_bytes([len[0], len[1]]) as usize;
            let (r, body) = s.read_exact(Vec::with_capacity(len)).await;
            r?;
            let (r, _) = s.write_all(body).await;
            // Dropped here: our FIN goes first; the client closes once it has read it.
            r.map(|_| ())
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unknown mode")),
    }
}

async fn bulk(flags: &Flags) {
    let target: SocketAddr = flags.get("target", None);
    let streams: usize = flags.get("streams", None);
    let duration = flags.seconds("seconds", None);
    let max_bytes: u64 = flags.get("max-bytes", Some(200 << 30));
    let start = Instant::now();
    let deadline = start + duration;
    let per_stream = max_bytes / streams.max(1) as u64;
    let tasks: Vec<_> =
        (0..streams).map(|_| monoio::spawn(bulk_stream(target, deadline, per_stream))).collect();
    let (mut bytes, mut errors, mut last_error) = (0u64, 0u32, String::new());
    // The slowest stream, so many streams sharing a proxy show whether any of them starved.
    let mut min_stream = u64::MAX;
    for t in tasks {
        match t.await {
            Ok(n) => (bytes, min_stream) = (bytes + n, min_stream.min(n)),
            Err(e) => (errors, last_error) = (errors + 1, e.to_string()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let gbit = |b: u64| b as f64 * 8.0 / secs / 1e9;
    println!(
        "{{\"test\":\"bulk\",\"streams\":{streams},\"seconds\":{secs:.3},\"bytes\":{bytes},\
         \"gbit_per_s\":{:.3},\"min_stream_gbit_per_s\":{:.4},\"errors\":{errors},\
         \"last_error\":\"{last_error}\"}}",
        gbit(bytes),
        if min_stream == u64::MAX { 0.0 } else { gbit(min_stream) }
    );
}

/// Writes until the deadline, half-closes, and returns the byte count the sink received.
async fn bulk_stream(target: SocketAddr, deadline: Instant, max_bytes: u64) -> io::Result<u64> {
    let mut s = connect(target).await?;
    let mut buf = vec![b'x'; BULK_CHUNK];
    buf[0] = MODE_SINK;
    let (r, b) = s.write_all(buf).await;
    r?;
    buf = b;
    buf[0] = b'x';
    let mut sent = BULK_CHUNK as u64;
    while sent < max_bytes && Instant::now() < deadline {
        let (r, b) = s.write_all(buf).await;
        r?;
        buf = b;
        sent += BULK_CHUNK as u64;
    }
    s.shutdown().await?;
    let (r, count) = monoio::time::timeout(OP_TIMEOUT, s.read_exact(Vec::with_capacity(8)))
        .await
        .map_err(|_| timed_out())?;
    r?;
    let count: [u8; 8] = count[..8].try_into().expect("read_exact filled 8 bytes");
    Ok(u64::from_le_bytes(count))
}

async fn connrate(flags: &Flags) {
    let target: SocketAddr = flags.get("target", None);
    let concurrency: usize = flags.get("concurrency", None);
    let duration = flags.seconds("seconds", None);
    let size: usize = flags.get("size", None);
    let closer: String = flags.get("closer", Some("client".into()));
    let backend_closes = match closer.as_str() {
        "client" => false,
        "backend" if size <= usize::from(u16::MAX) => true,
        _ => fail("--closer: client or backend (backend: --size at most 65535)"),
    };
    let budget = Rc::new(Cell::new(flags.get::<u64>("max", Some(2_000_000))));
    let (done, errors) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
    let last_error = Rc::new(RefCell::new(String::new()));
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (budget, done, errors, last_error) =
                (budget.clone(), done.clone(), errors.clone(), last_error.clone());
            monoio::spawn(async move {
                while budget.get() > 0 && Instant::now() < deadline {
                    budget.set(budget.get() - 1);
                    let exchange =
                        monoio::time::timeout(OP_TIMEOUT, one_exchange(target, size, backend_closes));
                    match exchange.await.unwrap_or_else(|_| Err(timed_out())) {
                        Ok(()) => done.set(done.get() + 1),
                        Err(e) => {
                            errors.set(errors.get() + 1);
                            *last_error.borrow_mut() = e.to_string();
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"test\":\"connrate\",\"concurrency\":{concurrency},\"size\":{size},\
         \"closer\":\"{closer}\",\"seconds\":{secs:.3},\"connections\":{},\"conn_per_s\":{:.1},\"errors\":{},\
         \"last_error\":\"{}\"}}",
        done.get(),
        done.get() as f64 / secs,
        errors.get(),
        last_error.borrow()
    );
}

/// One short-lived connection: `size` bytes each way, then close; with `backend_closes` the
/// backend closes after its answer and the client closes once it has seen that EOF.
async fn one_exchange(target: SocketAddr, size: usize, backend_closes: bool) -> io::Result<()> {
    let mut s = connect(target).await?;
    let mut req = vec![b'x'; size + 1];
    req[0] = MODE_ECHO;
    if backend_closes {
        req = [&[MODE_CLOSE][..], &(size as u16).to_le_bytes(), &req[1..]].concat();
    }
    let (r, _) = s.write_all(req).await;
    r?;
    let (r, mut buf) = s.read_exact(Vec::with_capacity(size)).await;
    r?;
    if backend_closes {
        buf.clear();
        buf.reserve(1);
        let (r, _) = s.read(buf).await;
        if r? != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bytes after the answer"));
        }
    }
    Ok(())
}

async fn latency(flags: &Flags) {
    let target: SocketAddr = flags.get("target", None);
    let connections: usize = flags.get("connections", None);
    let requests: usize = flags.get("requests", None);
    let size: usize = flags.get("size", None);
    let deadline = Instant::now() + flags.seconds("seconds", Some(30.0));
    let per_conn = requests / connections.max(1);
    let tasks: Vec<_> = (0..connections)
        .map(|_| monoio::spawn(ping_pong(target, per_conn, size, deadline)))
        .collect();
    let (mut samples, mut errors, mut last_error) = (Vec::with_capacity(requests), 0, String::new());
    for t in tasks {
        match t.await {
            Ok(s) => samples.extend(s),
            Err(e) => (errors, last_error) = (errors + 1, e.to_string()),
        }
    }
    samples.sort_unstable();
    let us = |q: f64| percentile_ns(&samples, q) as f64 / 1000.0;
    println!(
        "{{\"test\":\"latency\",\"connections\":{connections},\"size\":{size},\
         \"requests\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\
         \"errors\":{errors},\"last_error\":\"{last_error}\"}}",
        samples.len(),
        us(0.50),
        us(0.99),
        us(0.999),
        us(1.0)
    );
}

/// Request/response round trips on one kept-alive connection, in nanoseconds, after a warm-up.
async fn ping_pong(
    target: SocketAddr,
    count: usize,
    size: usize,
    deadline: Instant,
) -> io::Result<Vec<u64>> {
    let mut s = connect(target).await?;
    let (r, _) = s.write_all(vec![MODE_ECHO]).await;
    r?;
    let warmup = (count / 10).min(1000);
    let mut samples = Vec::with_capacity(count);
    let (mut req, mut resp) = (vec![b'x'; size], Vec::with_capacity(size));
    for i in 0..warmup + count {
        if Instant::now() >= deadline {
            break;
        }
        let t0 = Instant::now();
        let (r, b) = s.write_all(req).await;
        r?;
        req = b;
        let (r, b) = s.read_exact(resp).await;
        r?;
        resp = b;
        if i >= warmup {
            samples.push(t0.elapsed().as_nanos() as u64);
        }
    }
    Ok(samples)
}

/// Nearest-rank percentile of sorted samples; 0 when there are none.
fn percentile_ns(sorted: &[u64], q: f64) -> u64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0)
}

/// Opens connections that each complete one echo (so both legs of the proxy exist and have
/// carried data), prints a ready line, holds them, then exits without printing more.
async fn idle(flags: &Flags) {
    let target: SocketAddr = flags.get("target", None);
    let wanted: usize = flags.get("connections", None);
    let hold = flags.seconds("hold-seconds", None);
    let open_deadline = Instant::now() + flags.seconds("open-seconds", Some(30.0));
    let start = Instant::now();
    let held = Rc::new(RefCell::new(Vec::with_capacity(wanted)));
    let (next, errors) = (Rc::new(Cell::new(0usize)), Rc::new(Cell::new(0usize)));
    // A bounded number of connects in flight stays under the listeners' accept backlogs.
    let tasks: Vec<_> = (0..256.min(wanted))
        .map(|_| {
            let (held, next, errors) = (held.clone(), next.clone(), errors.clone());
            monoio::spawn(async move {
                while next.get() < wanted && Instant::now() < open_deadline {
                    next.set(next.get() + 1);
                    match monoio::time::timeout(OP_TIMEOUT, open_idle(target)).await {
                        Ok(Ok(s)) => held.borrow_mut().push(s),
                        _ => errors.set(errors.get() + 1),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    println!(
        "{{\"test\":\"idle\",\"ready\":true,\"connections\":{},\"errors\":{},\"open_seconds\":{:.3}}}",
        held.borrow().len(),
        errors.get(),
        start.elapsed().as_secs_f64()
    );
    monoio::time::sleep(hold).await;
}

async fn open_idle(target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = connect(target).await?;
    let (r, _) = s.write_all(vec![MODE_ECHO, b'x']).await;
    r?;
    let (r, _) = s.read_exact(Vec::with_capacity(1)).await;
    r?;
    Ok(s)
}
