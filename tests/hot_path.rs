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

fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
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
        listeners: vec![Listener {
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
        }],
        clusters: vec![Cluster {
            name: "backend".into(),
            service: Some("backend.default.svc.cluster.local".into()),
            service_namespace: None,
            load_balancer: LoadBalancer::RoundRobin,
            endpoints: vec![Endpoint { address: upstream, labels: Default::default() }],
            subsets: vec![],
            tls: None,
        }],
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
    p.shared.terminate();
    p.join();
}

// One test, both drivers in turn: a parallel test would count its own allocations here.
#[test]
fn relayed_round_trips_allocate_nothing_with_either_driver() {
    relayed_round_trips_allocate_nothing(ringside::config::Driver::Uring);
    relayed_round_trips_allocate_nothing(ringside::config::Driver::Epoll);
}
