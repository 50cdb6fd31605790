//! The mTLS choices of README Decisions, in memory: a full mTLS handshake pair (ECDSA P-256
//! workload certificates, as Istio's CA issues, client certificate verified against the mesh
//! root, SPIFFE SAN checked) with aws-lc-rs and with ring, and a resumed one (the proxy's
//! config: tickets, client session cache); bulk record encryption + decryption per provider
//! and per TLS 1.3 suite. Built from `ringside::tls::build_with`, the code the proxy runs.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use ringside::tls::{Configured, Files, Role, build_with};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/ratings";

fn write_identity(dir: &Path, tag: &str, ca: &CertificateParams, ca_key: &KeyPair, id: &str) -> Files {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &Issuer::from_params(ca, ca_key)).unwrap();
    let root = ca.clone().self_signed(ca_key).unwrap();
    let f = Files {
        cert_chain: dir.join(format!("{tag}-cert.pem")),
        private_key: dir.join(format!("{tag}-key.pem")),
        root_cert: dir.join("root.pem"),
    };
    std::fs::write(&f.cert_chain, cert.pem()).unwrap();
    std::fs::write(&f.private_key, key.serialize_pem()).unwrap();
    std::fs::write(&f.root_cert, root.pem()).unwrap();
    f
}

fn identities() -> (Files, Files) {
    let dir = std::env::temp_dir().join(format!("ringside-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let server = write_identity(&dir, "server", &ca, &ca_key, SERVER_ID);
    let client =
        write_identity(&dir, "client", &ca, &ca_key, "spiffe://cluster.local/ns/default/sa/productpage");
    (server, client)
}

struct Pair {
    server: Configured,
    client: Configured,
}

fn configs(provider: CryptoProvider, server: &Files, client: &Files) -> Pair {
    let provider = Arc::new(provider);
    let role = Role::mesh_client(vec![SERVER_ID.into()], None);
    Pair {
        server: build_with(provider.clone(), server, &Role::mesh_server()).unwrap(),
        client: build_with(provider, client, &role).unwrap(),
    }
}

/// Move every pending TLS byte from `a` to `b`; true if any moved.
fn transfer(a: &mut Connection, b: &mut Connection, wire: &mut Vec<u8>) -> bool {
    wire.clear();
    while a.wants_write() {
        a.write_tls(wire).unwrap();
    }
    if wire.is_empty() {
        return false;
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        b.read_tls(&mut rd).unwrap();
        b.process_new_packets().unwrap();
    }
    true
}

fn connect(p: &Pair) -> (Connection, Connection) {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut c: Connection = ClientConnection::new(p.client.client.clone().unwrap(), name).unwrap().into();
    let mut s: Connection = ServerConnection::new(p.server.server.clone().unwrap()).unwrap().into();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        let moved = transfer(&mut c, &mut s, &mut wire) | transfer(&mut s, &mut c, &mut wire);
        assert!(moved, "handshake stalled");
    }
    transfer(&mut s, &mut c, &mut wire); // session tickets
    (c, s)
}

type MakeProvider = fn() -> CryptoProvider;

fn providers() -> [(&'static str, MakeProvider); 2] {
    [
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider),
        ("ring", rustls::crypto::ring::default_provider),
    ]
}

/// The proxy's provider (`ringside::tls::provider`, Envoy's suite order) with one suite.
fn only(suite: rustls::SupportedCipherSuite) -> CryptoProvider {
    let mut p = (*ringside::tls::provider()).clone();
    p.cipher_suites = vec![suite];
    p
}

fn resumed(c: &mut Criterion) {
    let (server, client) = identities();
    let mut g = c.benchmark_group("tls_handshake_mtls_proxy_config");
    let pair = configs((*ringside::tls::provider()).clone(), &server, &client);
    let (cl, _) = connect(&pair); // a full handshake leaves tickets in the client's cache
    assert!(!resumed_kind(&cl));
    assert!(resumed_kind(&connect(&pair).0), "the proxy's configs resume");
    g.bench_function("resumed", |b| b.iter(|| connect(&pair)));
    let mut no_resume = (*pair.client.client.clone().unwrap()).clone();
    no_resume.resumption = rustls::client::Resumption::disabled();
    let full =
        Pair { client: Configured { client: Some(Arc::new(no_resume)), ..pair.client }, server: pair.server };
    g.bench_function("full", |b| b.iter(|| connect(&full)));
    g.finish();
}

fn resumed_kind(c: &Connection) -> bool {
    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

fn handshake(c: &mut Criterion) {
    let (server, client) = identities();
    let mut g = c.benchmark_group("tls_handshake_mtls");
    for (name, provider) in providers() {
        let pair = configs(provider(), &server, &client);
        // A fresh client config per iteration would measure config building; resumption is
        // off so every handshake is a full one (certificates, signatures, key exchange).
        let mut no_resume = (*pair.client.client.clone().unwrap()).clone();
        no_resume.resumption = rustls::client::Resumption::disabled();
        let pair = Pair {
            client: Configured { client: Some(Arc::new(no_resume)), ..pair.client },
            server: pair.server,
        };
        g.bench_function(BenchmarkId::from_parameter(name), |b| b.iter(|| connect(&pair)));
    }
    g.finish();
}

fn bulk(c: &mut Criterion) {
    let (server, client) = identities();
    const CHUNK: usize = 16 * 1024;
    const TOTAL: usize = 1 << 20;
    let mut g = c.benchmark_group("tls_bulk_encrypt_decrypt");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for (name, provider) in providers() {
        let pair = configs(provider(), &server, &client);
        let (mut cl, mut sv) = connect(&pair);
        let data = vec![0x5au8; CHUNK];
        let mut out = vec![0u8; CHUNK];
        let mut wire = Vec::with_capacity(TOTAL + TOTAL / 8);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                for _ in 0..TOTAL / CHUNK {
                    cl.writer().write_all(&data).unwrap();
                    transfer(&mut cl, &mut sv, &mut wire);
                    let mut got = 0;
                    while got < CHUNK {
                        got += sv.reader().read(&mut out).unwrap();
                    }
                }
            })
        });
    }
    g.finish();
}

fn bulk_suites(c: &mut Criterion) {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let (server, client) = identities();
    const CHUNK: usize = 16 * 1024;
    const TOTAL: usize = 1 << 20;
    let mut g = c.benchmark_group("tls_bulk_encrypt_decrypt_suite");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for suite in
        [cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256]
    {
        let pair = configs(only(suite), &server, &client);
        let (mut cl, mut sv) = connect(&pair);
        assert_eq!(cl.negotiated_cipher_suite().map(|s| s.suite()), Some(suite.suite()));
        let data = vec![0x5au8; CHUNK];
        let mut out = vec![0u8; CHUNK];
        let mut wire = Vec::with_capacity(TOTAL + TOTAL / 8);
        let name = suite.suite().as_str().unwrap_or("?");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                for _ in 0..TOTAL / CHUNK {
                    cl.writer().write_all(&data).unwrap();
                    transfer(&mut cl, &mut sv, &mut wire);
                    let mut got = 0;
                    while got < CHUNK {
                        got += sv.reader().read(&mut out).unwrap();
                    }
                }
            })
        });
    }
    g.finish();
}

/// Encrypt `total` bytes in 16 KiB records on `cl` and decrypt them on `sv`.
fn pump(cl: &mut Connection, sv: &mut Connection, total: usize, wire: &mut Vec<u8>) {
    const CHUNK: usize = 16 * 1024;
    let data = [0x5au8; CHUNK];
    let mut out = [0u8; CHUNK];
    for _ in 0..total / CHUNK {
        cl.writer().write_all(&data).unwrap();
        transfer(cl, sv, wire);
        let mut got = 0;
        while got < CHUNK {
            got += sv.reader().read(&mut out).unwrap();
        }
    }
}

/// A finished handshake between ringside's client side over rustls' unbuffered API (as
/// `tls::stream` drives it) and a buffered rustls server: our side's record layer.
fn record_session(p: &Pair) -> ringside::tls::record::Session {
    use ringside::tls::record::{Kernel, Session};
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut ours =
        rustls::client::UnbufferedClientConnection::new(p.client.client.clone().unwrap(), name).unwrap();
    let mut peer: Connection = ServerConnection::new(p.server.server.clone().unwrap()).unwrap().into();
    let (mut incoming, mut out) = (Vec::new(), Vec::new());
    loop {
        let handshaking = ours.is_handshaking();
        let UnbufferedStatus { discard, state } = ours.process_tls_records(&mut incoming);
        match state.unwrap() {
            ConnectionState::EncodeTlsData(mut e) => {
                let at = out.len();
                out.resize(at + 8192, 0);
                let n = e.encode(&mut out[at..]).unwrap();
                out.truncate(at + n);
            }
            ConnectionState::TransmitTlsData(t) => {
                let mut rd = &out[..];
                while !rd.is_empty() {
                    peer.read_tls(&mut rd).unwrap();
                    peer.process_new_packets().unwrap();
                }
                out.clear();
                t.done();
            }
            ConnectionState::BlockedHandshake => {
                incoming.drain(..discard);
                while peer.wants_write() {
                    peer.write_tls(&mut incoming).unwrap();
                }
                continue;
            }
            ConnectionState::WriteTraffic(_) if !handshaking => break,
            ConnectionState::WriteTraffic(_) => {
                while peer.wants_write() {
                    peer.write_tls(&mut incoming).unwrap();
                }
            }
            _ => panic!("unexpected handshake state"),
        }
        incoming.drain(..discard);
    }
    let (secrets, kernel) = ours.dangerous_into_kernel_connection().unwrap();
    Session::new(secrets, Kernel::Client(kernel)).unwrap()
}

/// Ratios on a shared machine: criterion measures one case after the other, so a neighbour's
/// build moves one case and not the other (±30 % run to run here). This runs the cases in
/// alternation, round after round, and prints each one's best and median round and the
/// ratios of both. Only under `cargo bench` (not `cargo test --benches`).
fn interleaved() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    use std::time::{Duration, Instant};
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    const ROUNDS: usize = 40;
    let report =
        |what: &str, names: &[String], times: &mut [Vec<Duration>], unit: &dyn Fn(Duration) -> String| {
            let (mut medians, mut bests) = (Vec::new(), Vec::new());
            for (name, t) in names.iter().zip(times.iter_mut()) {
                t.sort();
                let median = t[t.len() / 2];
                medians.push(median);
                bests.push(t[0]);
                println!(
                    "{what}/{name}: best {} median {} ({ROUNDS} interleaved rounds)",
                    unit(t[0]),
                    unit(median)
                );
            }
            // The best round is the least disturbed one: its ratio moves least between runs.
            for ((name, m), b) in names.iter().zip(&medians).zip(&bests).skip(1) {
                let median = m.as_secs_f64() / medians[0].as_secs_f64();
                let best = b.as_secs_f64() / bests[0].as_secs_f64();
                println!("{what}: {name} / {} = {best:.3} (best round), {median:.3} (median)", names[0]);
            }
        };

    let (server, client) = identities();
    const TOTAL: usize = 4 << 20;
    let suites =
        [cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256];
    let mut conns: Vec<_> = suites.iter().map(|s| connect(&configs(only(*s), &server, &client))).collect();
    let names: Vec<String> = suites.iter().map(|s| s.suite().as_str().unwrap_or("?").to_owned()).collect();
    let mut times = vec![Vec::new(); suites.len()];
    let mut wire = Vec::with_capacity(64 * 1024);
    for _ in 0..ROUNDS {
        for ((cl, sv), t) in conns.iter_mut().zip(&mut times) {
            let start = Instant::now();
            pump(cl, sv, TOTAL, &mut wire);
            t.push(start.elapsed());
        }
    }
    let mib_s = |d: Duration| format!("{:.0} MiB/s", TOTAL as f64 / (1 << 20) as f64 / d.as_secs_f64());
    report("tls_bulk_interleaved", &names, &mut times, &mib_s);

    // Sealing 16 KiB records (issue 31): rustls' buffered writer (a copy into a fresh `Vec`
    // per record, then the seal) against ringside's record layer sealing in place in a
    // 4-record buffer, as the relay's plaintext -> TLS way does.
    {
        use ringside::tls::record::MAX_PLAINTEXT;
        let pair = configs(only(cs::TLS13_AES_128_GCM_SHA256), &server, &client);
        let (mut cl, _sv) = connect(&pair);
        let mut session = record_session(&pair);
        let data = vec![0x5au8; MAX_PLAINTEXT];
        let rec = session.sealed_len(MAX_PLAINTEXT);
        let mut buf = vec![0x5au8; 4 * rec];
        let mut times = vec![Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..TOTAL / MAX_PLAINTEXT {
                cl.writer().write_all(&data).unwrap();
                wire.clear();
                while cl.wants_write() {
                    cl.write_tls(&mut wire).unwrap();
                }
            }
            times[0].push(start.elapsed());
            let start = Instant::now();
            for _ in 0..TOTAL / MAX_PLAINTEXT / 4 {
                session.reserve(4).unwrap();
                for r in buf.chunks_mut(rec) {
                    session.seal_data(r).unwrap();
                }
                std::hint::black_box(&buf);
            }
            times[1].push(start.elapsed());
        }
        let names = ["rustls_buffered".to_string(), "ringside_in_place".to_string()];
        report("tls_seal_interleaved", &names, &mut times, &mib_s);
    }

    // The providers (README Decisions: aws-lc-rs), each with AES-128-GCM.
    let with = |mut p: CryptoProvider, suite| {
        p.cipher_suites = vec![suite];
        p
    };
    let mut conns = [
        connect(&configs(
            with(rustls::crypto::aws_lc_rs::default_provider(), cs::TLS13_AES_128_GCM_SHA256),
            &server,
            &client,
        )),
        connect(&configs(
            with(
                rustls::crypto::ring::default_provider(),
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ),
            &server,
            &client,
        )),
    ];
    let mut times = vec![Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for ((cl, sv), t) in conns.iter_mut().zip(&mut times) {
            let start = Instant::now();
            pump(cl, sv, TOTAL, &mut wire);
            t.push(start.elapsed());
        }
    }
    report("tls_bulk_provider_interleaved", &["aws-lc-rs".into(), "ring".into()], &mut times, &mib_s);

    let pair = configs((*ringside::tls::provider()).clone(), &server, &client);
    let mut no_resume = (*pair.client.client.clone().unwrap()).clone();
    no_resume.resumption = rustls::client::Resumption::disabled();
    let full = Pair {
        client: Configured {
            client: Some(Arc::new(no_resume)),
            ..configs((*ringside::tls::provider()).clone(), &server, &client).client
        },
        server: Configured {
            server: pair.server.server.clone(),
            ..configs((*ringside::tls::provider()).clone(), &server, &client).server
        },
    };
    connect(&pair);
    const EACH: u32 = 20;
    let mut times = vec![Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (p, t) in [&full, &pair].into_iter().zip(&mut times) {
            let start = Instant::now();
            for _ in 0..EACH {
                connect(p);
            }
            t.push(start.elapsed() / EACH);
        }
    }
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    report("tls_handshake_interleaved", &["full".into(), "resumed".into()], &mut times, &us);

    // Resumed handshakes, AES-128-GCM (issue 31): rustls' aws-lc-rs HKDF and RFC 5077
    // tickets against ringside's HKDF (`tls::hkdf`) and AES-256-GCM tickets (`tls::tickets`).
    let mut rustls_parts = configs(
        with(rustls::crypto::aws_lc_rs::default_provider(), cs::TLS13_AES_128_GCM_SHA256),
        &server,
        &client,
    );
    let mut s = (*rustls_parts.server.server.clone().unwrap()).clone();
    s.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
    rustls_parts.server.server = Some(Arc::new(s));
    let pairs = [rustls_parts, configs((*ringside::tls::provider()).clone(), &server, &client)];
    for p in &pairs {
        connect(p);
        assert!(resumed_kind(&connect(p).0));
    }
    let mut times = vec![Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (p, t) in pairs.iter().zip(&mut times) {
            let start = Instant::now();
            for _ in 0..EACH {
                connect(p);
            }
            t.push(start.elapsed() / EACH);
        }
    }
    let names = ["rustls_hkdf_and_tickets".into(), "ringside_hkdf_and_tickets".into()];
    report("tls_resumed_interleaved", &names, &mut times, &us);

    // Full handshakes (no resumption) with the cache of verified peer chains (README
    // Decisions), warm, against none: both sides' chain verification is what it saves.
    let full_pair = |cache: bool| {
        let provider = ringside::tls::provider();
        let role = Role::mesh_client(vec![SERVER_ID.into()], None);
        let client = ringside::tls::build_with_chain_cache(provider.clone(), &client, &role, cache).unwrap();
        let mut no_resume = (*client.client.clone().unwrap()).clone();
        no_resume.resumption = rustls::client::Resumption::disabled();
        Pair {
            client: Configured { client: Some(Arc::new(no_resume)), ..client },
            server: ringside::tls::build_with_chain_cache(provider, &server, &Role::mesh_server(), cache)
                .unwrap(),
        }
    };
    let (uncached, cached) = (full_pair(false), full_pair(true));
    connect(&cached);
    let mut times = vec![Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (p, t) in [&uncached, &cached].into_iter().zip(&mut times) {
            let start = Instant::now();
            for _ in 0..EACH {
                connect(p);
            }
            t.push(start.elapsed() / EACH);
        }
    }
    report("tls_full_handshake_chain_cache", &["uncached".into(), "cached".into()], &mut times, &us);
}

/// Counts live heap bytes, to see what an idle connection holds (README Decisions: idle
/// memory). One relaxed add per allocation, the same for every case measured here.
struct Counting;

static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Heap bytes an idle connection holds on each side, after the handshake and 1 KiB each way
/// (as an idle proxied connection that carried one request): full and resumed handshakes.
fn idle_heap() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let (server, client) = identities();
    let pair = configs((*ringside::tls::provider()).clone(), &server, &client);
    let mut no_resume = (*pair.client.client.clone().unwrap()).clone();
    no_resume.resumption = rustls::client::Resumption::disabled();
    let full = Pair {
        client: Configured {
            client: Some(Arc::new(no_resume)),
            ..configs(rustls::crypto::aws_lc_rs::default_provider(), &server, &client).client
        },
        server: Configured {
            server: pair.server.server.clone(),
            ..configs(rustls::crypto::aws_lc_rs::default_provider(), &server, &client).server
        },
    };
    connect(&pair);
    let mut wire = Vec::with_capacity(64 * 1024);
    for (name, p, size) in
        [("full", &full, 1024), ("resumed", &pair, 1024), ("after 32 KiB each way", &pair, 32 << 10)]
    {
        let (mut cl, mut sv) = connect(p);
        let mut one_way = |a: &mut Connection, b: &mut Connection| {
            a.writer().write_all(&vec![1u8; size]).unwrap();
            transfer(a, b, &mut wire);
            let mut out = vec![0u8; size];
            b.reader().read_exact(&mut out).unwrap();
        };
        one_way(&mut cl, &mut sv);
        one_way(&mut sv, &mut cl);
        let before = live();
        drop(sv);
        let server_bytes = before - live();
        let before = live();
        drop(cl);
        let client_bytes = before - live();
        println!(
            "tls_idle_heap/{name}: server connection {server_bytes} B, client connection {client_bytes} B"
        );
    }
}

/// `tls::aead` alone: seal and open a full 16 KiB record with each library's AES-128-GCM
/// (the machine's CPU decides which `tls::record` uses; README "AES-GCM records by CPU").
fn record_aead(c: &mut Criterion) {
    use ringside::tls::aead::{Cipher, GcmBackend, RecordKey};
    let mut g = c.benchmark_group("record_aead_seal_open_aes_128_gcm");
    g.throughput(Throughput::Bytes(2 * 16384));
    for (name, backend) in [("aws-lc-rs", GcmBackend::AwsLc), ("ring", GcmBackend::Ring)] {
        let key = RecordKey::with_backend(Cipher::Aes128Gcm, &[7; 16], backend).unwrap();
        let mut record = vec![0x5a; 16384 + 16];
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let (body, tag) = record.split_at_mut(16384);
                tag.copy_from_slice(&key.seal([1; 12], b"hdr", body).unwrap());
                key.open([1; 12], b"hdr", &mut record).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, handshake, resumed, bulk, bulk_suites, record_aead);

fn main() {
    benches();
    idle_heap();
    interleaved();
    Criterion::default().configure_from_args().final_summary();
}
