//! Workers: driver choice, core pinning, one SO_REUSEPORT socket per listener per worker, the
//! accept loops, and the one timer tick per worker that folds metrics, enforces idle timeouts,
//! picks up a newly published config (binding added listeners, draining removed ones) and
//! drives the drain. A connection's own context lives in `conn`, its I/O in `relay`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use monoio::net::TcpListener;

use crate::backoff::{self, Backoff};
use crate::config::{self, Config};
use crate::conn::{Flags, Signal, WorkerCtx};
use crate::cpus;
use crate::metrics::{self, Delta, LabelBudget, Shard, ShardWriter};
use crate::relay;
use crate::snapshot::{Published, Snapshot};
use crate::tls::aead;

/// The worker tick: clock, drain checks, idle timeouts and config updates run at this period.
const TICK: Duration = Duration::from_millis(100);

/// How often the side thread looks at the certificate files' metadata (SPEC §7: reloaded
/// within seconds of a rotation).
const TLS_RELOAD_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// A runtime failure while starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener socket could not be bound.
    #[error("listener {name}: bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `--driver uring` but io_uring cannot be set up.
    #[error("driver uring: io_uring is unavailable: {0}")]
    Uring(std::io::Error),
    /// A worker thread could not start.
    #[error("worker {0}: {1}")]
    Spawn(usize, std::io::Error),
    /// The certificate reload thread could not start.
    #[error("tls reload thread: {0}")]
    Reload(std::io::Error),
    /// A certificate file could not be loaded (a config error: exit 64).
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::LoadError),
}

/// The event-loop driver that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring; `coop`: set up with IORING_SETUP_COOP_TASKRUN (kernel 5.19+).
    Uring {
        /// Completions wait for our next io_uring_enter instead of interrupting us.
        coop: bool,
    },
    /// epoll (monoio's legacy driver).
    Epoll,
}

impl DriverKind {
    /// Name as shown in logs and `ringside_driver_info`.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Uring { .. } => "uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// Pick the driver: `auto` tries io_uring (it fails under seccomp or
/// `kernel.io_uring_disabled`) and falls back to epoll.
pub fn choose_driver(wanted: config::Driver) -> Result<DriverKind, Error> {
    let probe = |coop| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(uring_builder(coop))
            .with_entries(8)
            .build()
            .map(|_| DriverKind::Uring { coop })
    };
    // COOP_TASKRUN first; kernels before 5.19 reject it and get a plain ring.
    let uring = || probe(true).or_else(|_| probe(false));
    match wanted {
        config::Driver::Epoll => Ok(DriverKind::Epoll),
        config::Driver::Uring => uring().map_err(Error::Uring),
        config::Driver::Auto => uring().or_else(|e| {
            log::warn!("io_uring unavailable ({e}); falling back to epoll");
            Ok(DriverKind::Epoll)
        }),
    }
}

/// With `coop` (IORING_SETUP_COOP_TASKRUN) a completion that arrives while the worker runs
/// waits for the worker's next io_uring_enter, which comes within one loop turn, instead of
/// interrupting it with an IPI: with 14 ring operations per short connection, 19 % less
/// CPU per connection here (perf/RESULTS.md).
fn uring_builder(coop: bool) -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    if coop {
        b.setup_coop_taskrun();
    }
    b
}

/// State shared by all workers and the admin threads; touched per accept/close at most.
pub struct Shared {
    /// The configuration at start, with the bound addresses and worker count filled in:
    /// process-wide settings (drain, metrics, admin) come from here. Listeners and clusters
    /// as served now are in `published`.
    pub config: Arc<Config>,
    /// The listeners, clusters and routes served to new connections (SPEC §9): replaced by
    /// `publish`, read by each worker once per tick.
    pub published: ArcSwap<Published>,
    /// Set by POST /drain and by SIGTERM/SIGINT: stop accepting, /ready answers 503.
    pub draining: AtomicBool,
    /// Set by SIGTERM/SIGINT: exit once idle, or at `drain_timeout` (live connections reset).
    pub terminating: AtomicBool,
    /// Envoy's `POST /drain_listeners?inboundonly`: inbound listeners stop accepting;
    /// outbound ones go on (SPEC §10).
    pub inbound_drained: AtomicBool,
    /// A drain was asked for over admin (graceful ones accept until their end): Envoy's
    /// `server.state` DRAINING from then on.
    pub drain_announced: AtomicBool,
    /// When the process started, for Envoy's `server.uptime`.
    pub started: Instant,
    /// Workers that have bound their listeners and started.
    pub workers_started: AtomicUsize,
    /// Per worker, the generation whose listeners it has bound (SPEC §9's `/ready`: every
    /// listener accepted over xDS is bound).
    pub bound_generations: Vec<AtomicU64>,
    /// Per worker, the longest time between two of its ticks so far, in microseconds: how
    /// long its event loop was ever kept from turning (SPEC §11: a push never blocks it).
    pub tick_gaps_max_us: Vec<AtomicU64>,
    /// Worker count.
    pub workers: usize,
    /// Each worker's metrics shard, for rendering.
    pub shards: Vec<Arc<Shard>>,
    /// Driver that runs.
    pub driver: DriverKind,
    /// Bulk flows switch to splice(2) (`RINGSIDE_SPLICE=0` turns it off, for benchmarks).
    pub splice: bool,
    /// istio_tcp_* series are counted (`RINGSIDE_ISTIO_METRICS=0` turns it off, for benchmarks).
    pub istio_metrics: bool,
    /// Workers and pinning chosen, with the reasons (start-up log, `/config_dump`).
    pub cpus: cpus::Plan,
    /// What the xDS client did (SPEC §9), when `xds:` is configured.
    pub xds: Option<Arc<crate::xds::Status>>,
}

impl Shared {
    /// Stop accepting and exit once idle or at the drain deadline (SIGTERM, SIGINT).
    pub fn terminate(&self) {
        self.draining.store(true, Ordering::Release);
        self.terminating.store(true, Ordering::Release);
    }

    /// True once every listener is bound on every worker, xDS (when configured) is synced
    /// ([`Shared::xds_synced`]), and we are not draining.
    pub fn ready(&self) -> bool {
        self.workers_started.load(Ordering::Acquire) == self.workers
            && !self.draining.load(Ordering::Acquire)
            && self.xds_synced()
    }

    /// Without xDS, true; with it, each type has arrived once and every worker has bound the
    /// listeners applied by then (SPEC §9's `/ready`).
    pub fn xds_synced(&self) -> bool {
        let bound =
            |generation: u64| self.bound_generations.iter().all(|g| g.load(Ordering::Acquire) >= generation);
        self.xds.as_ref().is_none_or(|x| {
            x.synced.load(Ordering::Acquire) && bound(x.ready_generation.load(Ordering::Acquire))
        })
    }

    /// Check that `config` can serve, then publish it: every listener it adds (or moves)
    /// must bind, as Envoy refuses a listener it cannot bind. `Err` says which and why.
    pub fn publish_checked(&self, config: Config) -> Result<u64, String> {
        let current = self.published.load();
        // Certificates of new TLS resources are loaded here, on the control thread: one that
        // fails refuses the config (never plaintext instead), naming the resource and file.
        let tls = crate::tls::Certs::next(&current.tls, &config).map_err(|e| e.to_string())?;
        for l in &config.listeners {
            let known = current.config.listeners.iter().any(|c| c.name == l.name && c.listen == l.listen);
            if !known && let Err(e) = can_bind(l.listen) {
                return Err(format!("Listener/{}: cannot bind {}: {e}", l.name, l.listen));
            }
        }
        Ok(self.publish(config, Arc::new(tls)))
    }

    /// Serve `config` to new connections: workers pick it up within a tick. Called by one
    /// thread at a time (the control thread), so a load-then-store is not a lost update.
    pub fn publish(&self, config: Config, tls: Arc<crate::tls::Certs>) -> u64 {
        let next = self.published.load().next(config, tls);
        let generation = next.generation;
        self.published.store(Arc::new(next));
        generation
    }

    /// Prometheus text of every shard (and the `ringside_xds_*` families with xDS, and the
    /// access log's drops), with each worker's longest tick gap.
    pub fn render(&self) -> String {
        let mut text = metrics::render(&self.shards, self.driver.name());
        if let Some(x) = &self.xds {
            text.push_str(&x.render());
        }
        text.push_str(&crate::access_log::writer::render());
        text.push_str(
            "# HELP ringside_worker_tick_gap_max_seconds The longest time between two ticks of a worker's event loop (100 ms apart when nothing holds it).\n\
             # TYPE ringside_worker_tick_gap_max_seconds gauge\n",
        );
        for (w, gap) in self.tick_gaps_max_us.iter().enumerate() {
            let seconds = gap.load(Ordering::Relaxed) as f64 / 1e6;
            text.push_str(&format!("ringside_worker_tick_gap_max_seconds{{worker=\"{w}\"}} {seconds}\n"));
        }
        text.push_str(&format!(
            "# HELP ringside_config_generations Configuration generations alive: the one published and each older one a worker or a live connection still holds.\n\
             # TYPE ringside_config_generations gauge\nringside_config_generations {}\n",
            self.published.load().held.alive()
        ));
        text
    }
}

/// A running proxy: its shared state and worker threads.
pub struct Proxy {
    /// Shared state.
    pub shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Wait until every worker has drained and exited.
    pub fn join(self) {
        for t in self.threads {
            // A worker that panicked already aborted the process (panic = abort in release).
            let _ = t.join();
        }
    }
}

/// Bind every listener once per worker and start the workers.
pub fn start(config: Config) -> Result<Proxy, Error> {
    // Certificates first: a bad file is a config error, reported before anything binds.
    let tls = Arc::new(crate::tls::Certs::load(&config)?);
    let watch_tls = !tls.slots().is_empty() || config.xds.is_some();
    let driver = choose_driver(config.driver)?;
    // Before any thread starts, so the affinity mask read is the process's (SPEC §1).
    let cpus = cpus::plan(&cpus::probe(), config.workers, config.pin);
    let workers = cpus.workers;
    let mut sockets: Vec<Vec<(String, std::net::TcpListener)>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for l in &config.listeners {
        let mut addr = l.listen;
        for per_worker in sockets.iter_mut() {
            let s =
                bind_reuseport(addr).map_err(|source| Error::Bind { name: l.name.clone(), addr, source })?;
            // Port 0 means "any": the first worker's port is then shared by the rest.
            addr = s.local_addr().unwrap_or(addr);
            per_worker.push((l.name.clone(), s));
        }
        bound.push(addr);
    }
    let budget = LabelBudget::new(config.metrics.max_label_sets);
    let mut writers = Vec::new();
    let mut shards = Vec::new();
    for w in 0..workers {
        let (writer, shard) = ShardWriter::new(w, budget.clone());
        writers.push(writer);
        shards.push(shard);
    }
    let effective_xds = config.xds.is_some();
    let mut effective = config;
    effective.workers = Some(workers);
    for (l, addr) in effective.listeners.iter_mut().zip(&bound) {
        Arc::make_mut(l).listen = *addr;
    }
    let shared = Arc::new(Shared {
        published: ArcSwap::from_pointee(Published::first(effective.clone(), tls)),
        config: Arc::new(effective),
        draining: AtomicBool::new(false),
        terminating: AtomicBool::new(false),
        inbound_drained: AtomicBool::new(false),
        drain_announced: AtomicBool::new(false),
        started: Instant::now(),
        workers_started: AtomicUsize::new(0),
        bound_generations: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        tick_gaps_max_us: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        workers,
        shards,
        driver,
        splice: benchmark_switch("RINGSIDE_SPLICE", "bulk flows are copied, not spliced"),
        istio_metrics: benchmark_switch("RINGSIDE_ISTIO_METRICS", "istio_tcp_* metrics are not counted"),
        cpus,
        xds: effective_xds.then(|| Arc::new(crate::xds::Status::default())),
    });
    if watch_tls {
        // Asks for the current publication's slots each time: xDS resources bring new ones.
        let weak = Arc::downgrade(&shared);
        let groups = move || weak.upgrade().map(|s| s.published.load().tls.groups());
        crate::tls::watch(groups, TLS_RELOAD_PERIOD).map_err(Error::Reload)?;
    }
    let detail = match driver {
        DriverKind::Uring { coop: true } => " (COOP_TASKRUN)",
        DriverKind::Uring { coop: false } => " (COOP_TASKRUN unsupported by this kernel)",
        DriverKind::Epoll => "",
    };
    let busy = match shared.config.busy_poll.0.is_zero() {
        true => String::new(),
        false => format!(", busy-polling {} after activity", shared.config.busy_poll),
    };
    log::info!("driver {}{detail} with {workers} workers{busy}", driver.name());
    log::info!("workers {workers}: {}", shared.cpus.workers_reason);
    let library = aead::gcm_backend().library();
    match std::env::var(aead::OVERRIDE).ok() {
        Some(v) if aead::GcmBackend::named(&v).is_some() => {
            log::info!("TLS records: AES-GCM by {library} (set by {})", aead::OVERRIDE);
        }
        forced => {
            if let Some(v) = forced {
                log::warn!("{}={v} is neither ring nor aws-lc: ignored", aead::OVERRIDE);
            }
            log::info!("TLS records: AES-GCM by {library} (chosen for this CPU)");
        }
    }
    match shared.cpus.pinned.is_empty() {
        true => log::info!("workers not pinned: {}", shared.cpus.pin_reason),
        false => log::info!(
            "workers pinned to CPUs {}: {}",
            cpus::cpu_list(&shared.cpus.pinned),
            shared.cpus.pin_reason
        ),
    }
    for l in &shared.config.listeners {
        log::info!(
            "listener {} bound on {} ({:?}, peer_exchange {:?})",
            l.name,
            l.listen,
            l.direction,
            l.peer_exchange
        );
    }
    let mut threads = Vec::new();
    for (index, (listeners, writer)) in sockets.into_iter().zip(writers).enumerate() {
        let core = shared.cpus.pinned.get(index).map(|&id| core_affinity::CoreId { id });
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("ringside-w{index}"))
            .spawn(move || {
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    log::warn!("worker {index}: cannot pin to CPU {}", core.id);
                }
                run_worker(index, shared, listeners, writer)
            })
            .map_err(|e| Error::Spawn(index, e))?;
        threads.push(t);
    }
    Ok(Proxy { shared, threads })
}

/// A switch that exists only to measure what a feature costs: on unless the variable is "0",
/// and loud when off.
fn benchmark_switch(var: &str, off: &str) -> bool {
    let on = std::env::var_os(var).is_none_or(|v| v != "0");
    if !on {
        log::warn!("{var}=0: {off} (a benchmarking switch)");
    }
    on
}

/// Whether the workers will be able to bind `addr`: bound (SO_REUSEPORT, as they bind it)
/// but never listening, so no connection can land in this probe and be dropped.
fn can_bind(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per connection.
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn run_worker(
    index: usize,
    shared: Arc<Shared>,
    listeners: Vec<(String, std::net::TcpListener)>,
    writer: ShardWriter,
) {
    let entries = 1024;
    let result = match shared.driver {
        DriverKind::Uring { coop } => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(uring_builder(coop))
            .with_entries(entries)
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(worker_main(index, shared.clone(), listeners, writer))),
        DriverKind::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(worker_main(index, shared.clone(), listeners, writer))),
    };
    if let Err(e) = result {
        log::error!("worker {index}: cannot start the {} runtime: {e}", shared.driver.name());
        std::process::exit(1);
    }
}

/// One accept loop of this worker: its listener's address, and the signal that stops it.
struct Acceptor {
    id: u64,
    listen: SocketAddr,
    stop: Rc<Signal>,
}

/// This worker's accept loops by listener name, and the removed ones still draining.
struct Acceptors {
    by_name: HashMap<String, Acceptor>,
    /// Removed accept loops and when their connections are cut (`drain_timeout` later).
    draining: Vec<(u64, Instant)>,
    next_id: u64,
}

impl Acceptors {
    fn start(&mut self, ctx: &Rc<WorkerCtx>, name: &str, listen: SocketAddr, socket: std::net::TcpListener) {
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                log::error!("worker {}: listener {name}: {e}", ctx.index);
                return;
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        let stop = Rc::new(Signal::default());
        monoio::spawn(accept_loop(ctx.clone(), name.to_string(), id, listener, stop.clone()));
        if let Some(old) = self.by_name.insert(name.to_string(), Acceptor { id, listen, stop }) {
            old.stop.fire();
        }
    }

    /// Bring the accept loops in line with `config`: bind added listeners (and those whose
    /// address changed), stop removed ones at once; their connections drain until `deadline`.
    fn reconcile(&mut self, ctx: &Rc<WorkerCtx>, config: &Config, deadline: Instant) {
        let gone: Vec<String> = self
            .by_name
            .iter()
            .filter(|(name, a)| !config.listeners.iter().any(|l| &l.name == *name && l.listen == a.listen))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(a) = self.by_name.remove(&name) {
                a.stop.fire();
                self.draining.push((a.id, deadline));
                if ctx.index == 0 {
                    log::info!("listener {name} on {} removed: draining its connections", a.listen);
                }
            }
        }
        for l in &config.listeners {
            if self.by_name.contains_key(&l.name) {
                continue;
            }
            match bind_reuseport(l.listen) {
                Ok(socket) => {
                    self.start(ctx, &l.name, l.listen, socket);
                    if ctx.index == 0 {
                        log::info!("listener {} bound on {} ({:?})", l.name, l.listen, l.direction);
                    }
                }
                // The control side bound it before publishing; losing the address since is rare.
                Err(e) => log::error!("worker {}: listener {}: bind {}: {e}", ctx.index, l.name, l.listen),
            }
        }
    }

    fn stop_all(&self) {
        self.by_name.values().for_each(|a| a.stop.fire());
    }

    /// Stop the inbound listeners' accept loops (Envoy's `drain_listeners?inboundonly`).
    fn stop_inbound(&self, config: &Config) {
        for l in config.listeners.iter().filter(|l| l.direction == crate::config::Direction::Inbound) {
            if let Some(a) = self.by_name.get(&l.name) {
                a.stop.fire();
            }
        }
    }
}

/// Worker `index` has bound the listeners of `generation`.
fn mark_bound(shared: &Shared, index: usize, generation: u64) {
    if let Some(g) = shared.bound_generations.get(index) {
        g.store(generation, Ordering::Release);
    }
}

async fn worker_main(
    index: usize,
    shared: Arc<Shared>,
    listeners: Vec<(String, std::net::TcpListener)>,
    writer: ShardWriter,
) {
    let ctx = Rc::new(WorkerCtx::new(
        index,
        &shared.published.load(),
        writer,
        Flags { splice: shared.splice, istio_metrics: shared.istio_metrics },
    ));
    if !shared.config.busy_poll.0.is_zero() {
        ctx.busy.start(shared.config.busy_poll.0);
    }
    let mut acceptors = Acceptors { by_name: HashMap::new(), draining: Vec::new(), next_id: 0 };
    for (name, socket) in listeners {
        let listen = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        acceptors.start(&ctx, &name, listen, socket);
    }
    // xDS may have published before this worker started: bind what its snapshot holds.
    let first = ctx.snapshot();
    acceptors.reconcile(&ctx, &first.config, Instant::now() + shared.config.drain_timeout.0);
    mark_bound(&shared, index, first.generation);
    // Not kept for the loop's life: it would pin this generation after the next (found by
    // `ringside_config_generations`).
    drop(first);
    shared.workers_started.fetch_add(1, Ordering::AcqRel);

    let reporting = shared.config.metrics.tcp_reporting_duration.0;
    let mut next_report = Instant::now() + reporting;
    let mut drain_deadline: Option<Instant> = None;
    let mut ticker = monoio::time::interval(TICK);
    let mut last_tick: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        // A single writer (this worker), read by scrapes: a load and a store, no RMW.
        if let (Some(last), Some(max)) = (last_tick, shared.tick_gaps_max_us.get(index)) {
            let gap = u64::try_from(now.duration_since(last).as_micros()).unwrap_or(u64::MAX);
            if gap > max.load(Ordering::Relaxed) {
                max.store(gap, Ordering::Relaxed);
            }
        }
        last_tick = Some(now);
        ctx.now.set(now);
        ctx.pipes.trim(now);
        let draining = shared.draining.load(Ordering::Acquire);
        ctx.draining.set(draining);
        // A new config: one pointer load per tick when nothing changed (SPEC §9).
        if !draining {
            let published = shared.published.load();
            if published.generation != ctx.snapshot().generation {
                ctx.swap(&published);
                acceptors.reconcile(&ctx, &published.config, now + shared.config.drain_timeout.0);
                mark_bound(&shared, ctx.index, published.generation);
            }
        }
        if now >= next_report {
            next_report = now + reporting;
            let w = ctx.metrics.borrow();
            ctx.for_each_conn(|c| c.report(&w, Delta::default()));
        }
        let cut =
            |c: &crate::conn::Conn| acceptors.draining.iter().any(|&(id, at)| c.acceptor == id && now >= at);
        ctx.for_each_conn(|c| {
            let idle = c.listener.limits.idle_timeout.0;
            if now.duration_since(c.last_active.get()) >= idle && !c.cancel.fired() {
                c.idle_expired.set(true);
                c.cancel.fire();
            } else if !c.cancel.fired() && cut(c) {
                c.cancel.fire();
            }
        });
        acceptors.draining.retain(|&(_, at)| now < at);
        if draining {
            acceptors.stop_all();
        } else if shared.inbound_drained.load(Ordering::Acquire) {
            acceptors.stop_inbound(&ctx.snapshot().config);
        }
        if drain_deadline.is_none() && shared.terminating.load(Ordering::Acquire) {
            drain_deadline = Some(now + shared.config.drain_timeout.0);
        }
        if let Some(deadline) = drain_deadline {
            if ctx.active() == 0 {
                break;
            }
            if now >= deadline {
                ctx.for_each_conn(|c| c.cancel.fire());
            }
        }
    }
}

/// A listener whose every client starts with a TLS ClientHello (`Listener::tls_only`)
/// delays its ACKs from a connection's first segment, which its accepted sockets inherit:
/// the ClientHello's ACK then rides on the server's flight (README, Decisions). Followed
/// when a new config changes the listener; a failure leaves the kernel's default.
fn sync_ack_mode(listener: &TcpListener, config: &crate::config::Listener, delayed: &mut bool) {
    let want = config.tls_only();
    if want != *delayed && crate::socket::delay_acks(listener, want).is_ok() {
        *delayed = want;
    }
}

async fn accept_loop(ctx: Rc<WorkerCtx>, name: String, id: u64, listener: TcpListener, stop: Rc<Signal>) {
    // The listener's index in the current snapshot, looked up again only when it changes.
    let mut index: Option<(u64, usize)> = None;
    let mut backoff = Backoff::default();
    let mut acks_delayed = false;
    if let Some(li) = ctx.snapshot().listener(&name) {
        sync_ack_mode(&listener, &ctx.snapshot().config.listeners[li], &mut acks_delayed);
    }
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = stop.wait() => return,
        };
        let (down, _peer) = match accepted {
            Ok(x) => x,
            Err(e) if backoff::is_resource_error(&e) => {
                // Out of descriptors or memory (SPEC §1): the connection stays queued, so
                // retrying at once would fail again and spin. Pause accepting (live
                // connections keep being served), with one log line per interval.
                let p = backoff.failed(Instant::now());
                if let Some(n) = p.log {
                    log::warn!(
                        "listener {name}: accept: {e} ({n} times); pausing accepts up to {:?}",
                        p.pause
                    );
                }
                monoio::select! {
                    _ = monoio::time::sleep(p.pause) => continue,
                    _ = stop.wait() => return,
                }
            }
            Err(e) => {
                // The client gave up while queued (ECONNABORTED) and the like: its own problem.
                log::debug!("listener {name}: accept: {e}");
                continue;
            }
        };
        let snapshot: Rc<Snapshot> = ctx.snapshot();
        let li = match index {
            Some((generation, li)) if generation == snapshot.generation => li,
            _ => match snapshot.listener(&name) {
                Some(li) => {
                    index = Some((snapshot.generation, li));
                    sync_ack_mode(&listener, &snapshot.config.listeners[li], &mut acks_delayed);
                    li
                }
                // Removed in the snapshot just swapped in; this loop stops on this tick.
                None => continue,
            },
        };
        let limit = snapshot.config.listeners[li].limits.max_connections;
        let live = &snapshot.live[li];
        if live.fetch_add(1, Ordering::AcqRel) >= limit {
            live.fetch_sub(1, Ordering::AcqRel);
            relay::over_limit(&ctx, &snapshot, li, id, down);
            continue;
        }
        ctx.busy.note();
        monoio::spawn(relay::serve(ctx.clone(), snapshot, li, id, down));
    }
}
