//! What routing costs a new connection (SPEC §6): the route and the endpoint to try first,
//! for one cluster and for a 3-way weighted route over subsets (perf/run.sh's
//! `ringside-1-split` measures the same end to end).

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use ringside::config::{Cidr, Config, FilterChain};
use ringside::routing::Router;
use ringside::routing::chains::{ChainIndex, ConnFacts};

const CONFIG: &str = "
listeners:
  - {name: one, listen: 127.0.0.1:1, direction: outbound, cluster: echo}
  - name: split
    listen: 127.0.0.1:2
    direction: outbound
    tcp_routes:
      - {cluster: echo, subset: v1, weight: 50}
      - {cluster: echo, subset: v2, weight: 30}
      - {cluster: echo, subset: v3, weight: 20}
clusters:
  - name: echo
    endpoints:
      - {address: 127.0.0.1:10, labels: {version: v1}}
      - {address: 127.0.0.1:11, labels: {version: v2}}
      - {address: 127.0.0.1:12, labels: {version: v3}}
    subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
      - {name: v3, labels: {version: v3}}
";

fn routing(c: &mut Criterion) {
    let mut cfg = Config::parse(CONFIG, "bench").expect("bench config parses");
    cfg.validate("bench", CONFIG).expect("bench config is valid");
    let router = Router::new(&cfg, 7);
    let now = Instant::now();
    for (name, listener) in [("one cluster", 0), ("3-way weighted over subsets", 1)] {
        c.bench_function(&format!("route + first endpoint: {name}"), |b| {
            b.iter(|| {
                let target = router.route(black_box(listener)).expect("routed");
                let healthy = router.healthy(target, now);
                black_box((router.candidates(target, now).next(), healthy))
            })
        });
    }
}

/// A capture listener shaped as istiod's virtualOutbound with the chains of the listeners it
/// hands off to merged in (as ringside serves them, SPEC §8-§9), at the scale of a
/// DeathStarBench hotel-reservation sidecar: per service, a `VIP:port`
/// listener's chain, and per port a `0.0.0.0:port` listener's TLS and plaintext chains; 140
/// of each, and 70 services on one port told apart by /32 prefixes: 491 chains.
fn virtual_outbound() -> Vec<FilterChain> {
    let mut chains = Vec::new();
    for k in 0..140u16 {
        let vip: std::net::SocketAddr =
            format!("10.96.{}.{}:{}", k / 200, k % 200 + 1, 8000 + k % 40).parse().unwrap();
        chains.push(FilterChain { handoff: Some(vip), ..FilterChain::default() });
        let any: std::net::SocketAddr = format!("0.0.0.0:{}", 9000 + k).parse().unwrap();
        chains.push(FilterChain {
            handoff: Some(any),
            transport_protocol: Some("tls".into()),
            application_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            ..FilterChain::default()
        });
        chains.push(FilterChain {
            handoff: Some(any),
            transport_protocol: Some("raw_buffer".into()),
            ..FilterChain::default()
        });
    }
    for k in 0..70u16 {
        chains.push(FilterChain {
            destination_port: Some(27017),
            prefix_ranges: vec![Cidr { addr: format!("10.97.0.{k}").parse().unwrap(), len: 32 }],
            ..FilterChain::default()
        });
    }
    chains.push(FilterChain { default: true, ..FilterChain::default() });
    chains
}

fn chain_match(c: &mut Criterion) {
    let chains = virtual_outbound();
    let index = ChainIndex::new(&chains);
    let source = "10.1.0.9:40000".parse().unwrap();
    let alpn = vec!["istio-peer-exchange".to_string(), "istio".to_string()];
    for (name, dst, transport) in [
        ("VIP:port handoff", "10.96.0.77:8036", "raw_buffer"),
        ("0.0.0.0:port handoff, TLS", "10.1.2.3:9100", "tls"),
        ("port + /32 prefix among 70", "10.97.0.42:27017", "raw_buffer"),
        ("no chain: default", "192.168.1.1:1234", "raw_buffer"),
    ] {
        let facts = ConnFacts {
            destination: dst.parse().unwrap(),
            source,
            transport,
            server_name: None,
            alpn: &alpn,
        };
        c.bench_function(&format!("chain match, {} chains: {name}", chains.len()), |b| {
            b.iter(|| black_box(index.select(black_box(&chains), black_box(&facts))));
        });
    }
}

criterion_group!(benches, routing, chain_match);
criterion_main!(benches);
