//! The access log writer (SPEC §9): one thread that owns the log files and renders and writes
//! the lines, fed by a bounded channel. A worker records what a line needs as its connection
//! goes (`note_*`, only where a log is configured) and hands the entry over when the
//! connection ends ([`connection_ended`]) with a `try_send`: it never waits on the log. When
//! the channel is full the line is dropped and counted (`ringside_access_log_dropped_total`),
//! as is a line whose file cannot be written.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::{Entry, LogFormat};
use crate::config::{AccessLog, Capture, Listener};
use crate::conn::{Captured, Conn};

/// Lines waiting for the writer at most; beyond, lines are dropped (a burst of this many
/// connections ending at once is written, a disk that stalls for longer costs lines, never a
/// worker's time).
pub const CAPACITY: usize = 8192;

/// Lines the writer thread takes off the channel before it writes them out, at most (so a
/// steady stream still gets written).
const BATCH: usize = 1024;

/// One line to write: its log and what its connection recorded.
#[derive(Debug)]
pub struct Line {
    /// Where and how.
    pub log: Arc<AccessLog>,
    /// What.
    pub entry: Entry,
}

/// A running writer thread and what it dropped.
#[derive(Debug)]
pub struct Writer {
    tx: SyncSender<Line>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    /// Start a writer thread whose channel holds `capacity` lines.
    pub fn start(capacity: usize) -> io::Result<Writer> {
        let (writer, rx) = Writer::unread(capacity);
        let counted = Arc::clone(&writer.dropped);
        std::thread::Builder::new().name("ringside-access-log".into()).spawn(move || run(&rx, &counted))?;
        Ok(writer)
    }

    /// The sending half and the channel's receiving end, which nothing reads yet.
    fn unread(capacity: usize) -> (Writer, Receiver<Line>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        (Writer { tx, dropped: Arc::new(AtomicU64::new(0)) }, rx)
    }

    /// Hand `line` to the writer without waiting; `false`: the channel was full (or the
    /// writer gone) and the line was dropped and counted.
    pub fn send(&self, line: Line) -> bool {
        match self.tx.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The process's writer, started by the first line (`None`: its thread could not start).
static WRITER: OnceLock<Option<Writer>> = OnceLock::new();

/// Lines dropped because the writer thread could not start.
static DROPPED_WITHOUT_WRITER: AtomicU64 = AtomicU64::new(0);

/// Prometheus text of `ringside_access_log_dropped_total` (0 while nothing was logged).
pub fn render() -> String {
    let writer = WRITER.get().and_then(Option::as_ref).map_or(0, Writer::dropped);
    let dropped = writer + DROPPED_WITHOUT_WRITER.load(Ordering::Relaxed);
    format!(
        "# HELP ringside_access_log_dropped_total Access log lines dropped: the writer's queue was full or the file could not be written.\n\
         # TYPE ringside_access_log_dropped_total counter\nringside_access_log_dropped_total {dropped}\n"
    )
}

/// Send `line` to the process's writer, starting it with the first line.
fn send(line: Line) {
    let writer = WRITER.get_or_init(|| match Writer::start(CAPACITY) {
        Ok(w) => Some(w),
        Err(e) => {
            log::error!("access log: cannot start its writer thread: {e}; lines are dropped");
            None
        }
    });
    match writer {
        Some(w) => {
            w.send(line);
        }
        None => {
            DROPPED_WITHOUT_WRITER.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer thread: take what is queued, render it, append each file's lines with one
/// write, until every sender is gone.
fn run(rx: &Receiver<Line>, dropped: &AtomicU64) {
    let mut files: HashMap<String, std::fs::File> = HashMap::new();
    type Key = (Option<String>, Option<std::collections::BTreeMap<String, String>>);
    let mut formats: HashMap<Key, LogFormat> = HashMap::new();
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut failed_once: std::collections::HashSet<String> = std::collections::HashSet::new();
    while let Ok(first) = rx.recv() {
        let mut batch = 0;
        let mut next = Some(first);
        // Up to a bounded batch, so a steady stream still gets written.
        while let Some(line) = next.take() {
            let key = (line.log.format.clone(), line.log.json_format.clone());
            let format = formats.entry(key).or_insert_with(|| {
                // Checked when the config was (validate, xDS translation).
                LogFormat::parse(line.log.format.as_deref(), line.log.json_format.as_ref())
                    .unwrap_or_else(|_| LogFormat::parse(None, None).unwrap_or(LogFormat::Json(Vec::new())))
            });
            format.render(&line.entry, pending.entry(line.log.path.clone()).or_default());
            batch += 1;
            if batch < BATCH {
                next = rx.try_recv().ok();
            }
        }
        for (path, text) in pending.iter_mut().filter(|(_, t)| !t.is_empty()) {
            let lines = text.matches('\n').count().max(1) as u64;
            let written = match files.get_mut(path) {
                Some(f) => f.write_all(text.as_bytes()),
                None => match std::fs::OpenOptions::new().append(true).create(true).open(path) {
                    Ok(mut f) => {
                        let r = f.write_all(text.as_bytes());
                        files.insert(path.clone(), f);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = written {
                dropped.fetch_add(lines, Ordering::Relaxed);
                files.remove(path);
                if failed_once.insert(path.clone()) {
                    log::warn!("access log {path}: {e}; its lines are dropped until it can be written");
                }
            }
            text.clear();
        }
    }
}

/// The logs a connection of `listener` that took chain `chain` writes to: its chain's, else
/// the listener's.
fn logs(listener: &Listener, chain: Option<usize>) -> &[Arc<AccessLog>] {
    match chain.and_then(|c| listener.filter_chains.get(c)) {
        Some(c) if !c.access_log.is_empty() => &c.access_log,
        _ => listener.access_log.as_slice(),
    }
}

/// Whether `conn` (with the chain it took, if any) writes an access log line.
pub fn logged(conn: &Conn) -> bool {
    !logs(&conn.listener, conn.chain.get()).is_empty()
}

/// Record the downstream side for the line: the client's address (`remote`, asked of the
/// socket by the caller only when [`logged`]), the address it connected to (the original
/// destination when captured) and the server name it asked for.
pub fn note_downstream(
    conn: &Conn,
    remote: Option<SocketAddr>,
    local: SocketAddr,
    server_name: Option<&str>,
) {
    let mut access = conn.access.borrow_mut();
    let e = access.get_or_insert_with(Box::default);
    e.downstream_remote = remote;
    e.downstream_local = Some(local);
    e.requested_server_name = server_name.map(str::to_string);
}

/// Record the upstream connection's local address.
pub fn note_upstream(conn: &Conn, local: Option<SocketAddr>) {
    conn.access.borrow_mut().get_or_insert_with(Box::default).upstream_local = local;
}

/// Record the endpoint a connect is tried to (`UPSTREAM_HOST` of a connection that fails).
pub fn note_upstream_host(conn: &Conn, host: SocketAddr) {
    conn.access.borrow_mut().get_or_insert_with(Box::default).upstream_host = Some(host);
}

/// Record why a filter closed the connection (`CONNECTION_TERMINATION_DETAILS`).
pub fn note_termination(conn: &Conn, details: String) {
    conn.access.borrow_mut().get_or_insert_with(Box::default).termination_details = Some(details);
}

/// The connection ended with `response_flags`: its line, to each log that takes it.
pub fn connection_ended(conn: &Conn, response_flags: &'static str) {
    let listener = &conn.listener;
    let logs = logs(listener, conn.chain.get());
    if !logs.iter().any(|l| l.takes(response_flags)) {
        return;
    }
    let mut e = conn.access.borrow_mut().take().map_or_else(Entry::default, |b| *b);
    let (wall, mono) = conn.started;
    e.start = Some(wall);
    e.duration = Instant::now().saturating_duration_since(mono);
    e.bytes_received = conn.received_bytes.get();
    e.bytes_sent = conn.sent_bytes.get();
    e.response_flags = response_flags;
    match (conn.captured.get(), conn.upstream.get()) {
        (Some(Captured::Passthrough(dst)), _) => {
            e.upstream_host = Some(dst);
            e.upstream_cluster = Some("PassthroughCluster".into());
        }
        (Some(Captured::BlackHole), _) => e.upstream_cluster = Some("BlackHoleCluster".into()),
        (None, Some((_, endpoint))) => {
            let kept = conn.cluster.borrow();
            let cluster = kept.as_ref();
            e.upstream_cluster = cluster.map(|c| c.name.clone());
            // The endpoint connected to, else the last one tried (noted).
            if let Some(host) = endpoint.and_then(|i| cluster?.endpoints.get(i)) {
                e.upstream_host = Some(host.address);
            }
            // Inbound capture connects to the original destination itself.
            if e.upstream_host.is_none()
                && listener.capture == Capture::Inbound
                && response_flags == "-"
                && e.termination_details.is_none()
            {
                e.upstream_host = e.downstream_local;
            }
        }
        (None, None) => {}
    }
    let security = conn.security.borrow();
    e.peer_uri_san = security.peer_principal.as_deref().map(str::to_string);
    e.local_uri_san = security.local_principal.as_deref().map(str::to_string);
    drop(security);
    let mut takers = logs.iter().filter(|l| l.takes(response_flags)).peekable();
    while let Some(log) = takers.next() {
        let entry = if takers.peek().is_some() { e.clone() } else { std::mem::take(&mut e) };
        send(Line { log: Arc::clone(log), entry });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(path: &str, flags: &'static str) -> Line {
        let log = Arc::new(AccessLog {
            path: path.into(),
            format: Some("%RESPONSE_FLAGS%\n".into()),
            json_format: None,
            only_flags: None,
        });
        Line { log, entry: Entry { response_flags: flags, ..Entry::default() } }
    }

    #[test]
    fn lines_are_appended_to_their_file_in_order() {
        let dir = std::env::temp_dir().join(format!("ringside-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let _ = std::fs::remove_file(&path);
        let w = Writer::start(16).unwrap();
        for flags in ["-", "UF", "NR"] {
            assert!(w.send(line(path.to_str().unwrap(), flags)));
        }
        // Wait (bounded) for the writer thread to have written all three.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 3 || Instant::now() > deadline {
                break text;
            }
            std::thread::yield_now();
        };
        assert_eq!(text, "-\nUF\nNR\n");
        assert_eq!(w.dropped(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_channel_drops_and_counts_rather_than_blocks() {
        // Nothing reads the channel: exactly its capacity is taken, every later line dropped
        // and counted, and a line taken off makes room for one more.
        let (w, rx) = Writer::unread(4);
        let sent: Vec<bool> = (0..100).map(|_| w.send(line("unused", "-"))).collect();
        assert_eq!(sent.iter().position(|s| !s), Some(4), "{sent:?}");
        assert!(sent[4..].iter().all(|s| !s), "{sent:?}");
        assert_eq!(w.dropped(), 96);
        assert!(rx.try_recv().is_ok());
        assert!(w.send(line("unused", "-")), "a taken line makes room");
        assert!(!w.send(line("unused", "-")));
        assert_eq!(w.dropped(), 97);
    }

    #[test]
    fn a_stalled_file_costs_lines_never_a_senders_time() {
        // A FIFO nobody reads: the writer thread takes one batch, then blocks opening the
        // FIFO for good. However the two threads interleave, at most that batch and the
        // channel's 4 lines are taken; the rest are dropped and counted, and no send waits
        // (one that did would never return: the bound below is for liveness, not speed).
        let dir = std::env::temp_dir().join(format!("ringside-access-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stalled");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let w = Arc::new(Writer::start(4).unwrap());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn({
            let (w, fifo) = (Arc::clone(&w), fifo.to_str().unwrap().to_owned());
            move || {
                let accepted = (0..3 * BATCH).filter(|_| w.send(line(&fifo, "-"))).count();
                let _ = done_tx.send(accepted);
            }
        });
        let accepted = done_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("a send blocked");
        assert!((4..=BATCH + 4).contains(&accepted), "{accepted} of {} accepted", 3 * BATCH);
        assert_eq!(w.dropped(), (3 * BATCH - accepted) as u64);
        // Unblock the writer (a reader opens the FIFO) so its thread ends with the test.
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::read(&fifo)
        });
        drop(w);
        let _ = reader.join();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_response_flag_filter_takes_only_its_flags() {
        let log = |only: Option<Vec<&str>>| AccessLog {
            path: "x".into(),
            format: None,
            json_format: None,
            only_flags: only.map(|v| v.into_iter().map(String::from).collect()),
        };
        assert!(log(None).takes("-"));
        assert!(log(Some(vec!["NR"])).takes("NR") && !log(Some(vec!["NR"])).takes("UF"));
        assert!(!log(Some(vec!["NR"])).takes("-"));
        assert!(log(Some(vec![])).takes("UH") && !log(Some(vec![])).takes("-"), "empty: any flag");
    }
}
