//! STYLE's hot-path rule, checked rather than claimed: a relayed read/write allocates
//! nothing. The proxy runs in this process (the crate is a library) under a counting global
//! allocator; steady-state round trips on one connection must not allocate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use ringside::config::{Bind, Cluster, Config, Direction, Endpoint, Listener, LoadBalancer, PeerExchange};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; we only count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Echoes one connection at a time, allocating nothing per connection (no thread per client).
fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((mut s, _)) = l.accept() {
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    });
    addr
}

fn proxy(upstream: SocketAddr, driver: ringside::config::Driver) -> ringside::worker::Proxy {
    let mut cfg = Config {
        workers: Some(1),
        driver,
        listeners: vec![std::sync::Arc::new(Listener {
            name: "hot".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            direction: Direction::Outbound,
            peer_exchange: PeerExchange::Off,
            cluster: Some("backend".into()),
            tcp_routes: None,
            service: None,
            capture: Default::default(),
            limits: Default::default(),
            tls: None,
            istio_stats: true,
            source: None,
            filter_chains: Vec::new(),
            tunnel: None,
            access_log: None,
        })],
        clusters: vec![std::sync::Arc::new(Cluster {
            name: "backend".into(),
            service: Some("backend.default.svc.cluster.local".into()),
            service_namespace: None,
            load_balancer: LoadBalancer::RoundRobin,
            addresses: Vec::new(),
            endpoints: std::sync::Arc::new(vec![Endpoint::at(upstream)]),
            subsets: vec![],
            tls: None,
            service_port: None,
            original_dst: false,
            bind_source: None,
            source: None,
            tunnel: None,
        })]
        .into(),
        ..Config::default()
    };
    // Metrics are counted (an admin listener could serve them) but nothing scrapes.
    cfg.metrics.listen = Bind(None);
    cfg.admin.listen = Bind(Some(SocketAddr::from(([127, 0, 0, 1], 0))));
    cfg.health.listen = Bind(None);
    cfg.validate("hot_path", "").unwrap();
    ringside::worker::start(cfg).unwrap()
}

fn round_trips(s: &mut TcpStream, n: usize) {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..n {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
}

fn relayed_round_trips_allocate_nothing(driver: ringside::config::Driver) {
    let p = proxy(echo_backend(), driver);
    let mut s = TcpStream::connect(p.shared.config.listeners[0].listen).unwrap();
    s.set_nodelay(true).unwrap();
    round_trips(&mut s, 200); // warm up: pool buffers, slabs, the connection's own setup
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    round_trips(&mut s, 5_000); // 10,000 reads and 10,000 writes in the proxy
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    // The worker's 100 ms tick and this thread may allocate a handful of times; a per-read
    // allocation would show as thousands.
    assert!(allocated < 100, "{allocated} allocations during 5,000 relayed round trips");
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);

    // A whole short connection (accept, connect upstream, one round trip, close) allocates a
    // bounded handful of times: its task, its counters, the sockets' handles. Nothing per
    // byte and no label-set rebuilding for a peer seen before.
    let listen = p.shared.config.listeners[0].listen;
    let one = || {
        let mut c = TcpStream::connect(listen).unwrap();
        round_trips(&mut c, 1);
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = [0u8; 1];
        assert_eq!(c.read(&mut rest).unwrap(), 0); // the proxy relayed the upstream's EOF
    };
    for _ in 0..50 {
        one();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..500 {
        one();
    }
    let per_connection = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 500.0;
    eprintln!("{driver:?}: {per_connection:.1} allocations per connection");
    assert!(per_connection <= MAX_ALLOCATIONS_PER_CONNECTION, "{per_connection} allocations per connection");
    p.shared.terminate();
    p.join();
}

/// Allocations a relayed connection may make, measured, with a little headroom.
const MAX_ALLOCATIONS_PER_CONNECTION: f64 = 20.0;

// One test, both drivers in turn: a parallel test would count its own allocations here.
#[test]
fn relayed_round_trips_allocate_nothing_with_either_driver() {
    relayed_round_trips_allocate_nothing(ringside::config::Driver::Uring);
    relayed_round_trips_allocate_nothing(ringside::config::Driver::Epoll);
}
