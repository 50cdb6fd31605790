//! What routing costs a new connection (SPEC §6): the route and the endpoint to try first,
//! for one cluster and for a 3-way weighted route over subsets (perf/run.sh's
//! `ringside-1-split` measures the same end to end).

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use ringside::config::Config;
use ringside::routing::Router;

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

criterion_group!(benches, routing);
criterion_main!(benches);
