//! Hot-path and scrape costs of `metrics`: folding one connection's deltas, interning a label set
//! that already has a series, rendering a large scrape, and settling a connection into its
//! series (`conn::settle`, once per connection) with one peer pod and under pod churn.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ringside::config::Config;
use ringside::conn::{Flags, WorkerCtx, settle};
use ringside::exchange::NodeMetadata;
use ringside::metrics::{
    ConnLabels, Delta, LabelBudget, LabelSet, Reporter, ServiceInfo, ShardWriter, label_set, render,
};

// The binary's allocator, so render's allocation-heavy path is measured as it runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn local_node(i: usize) -> NodeMetadata {
    NodeMetadata {
        workload_name: format!("productpage-v{i}"),
        namespace: "default".into(),
        cluster_id: "client-cluster".into(),
        labels: [("app", "productpage"), ("version", "v1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn peer_node() -> NodeMetadata {
    NodeMetadata {
        workload_name: "ratings-v1".into(),
        namespace: "default".into(),
        cluster_id: "server-cluster".into(),
        ..Default::default()
    }
}

fn service() -> ServiceInfo {
    ServiceInfo { host: "ratings.default.svc.cluster.local".into(), namespace: "default".into() }
}

fn conn<'a>(local: &'a NodeMetadata, peer: &'a NodeMetadata, service: &'a ServiceInfo) -> ConnLabels<'a> {
    ConnLabels {
        reporter: Reporter::Source,
        local,
        peer: Some(peer),
        service,
        response_flags: "-",
        local_principal: Some("spiffe://cluster.local/ns/default/sa/productpage"),
        peer_principal: Some("spiffe://cluster.local/ns/default/sa/ratings"),
        mutual_tls: true,
    }
}

fn labels(i: usize) -> LabelSet {
    label_set(&conn(&local_node(i), &peer_node(), &service()))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");

    let (mut writer, _shard) = ShardWriter::new(0, LabelBudget::new(100_000));
    let id = writer.intern(labels(0));
    let delta = Delta { opened: 0, closed: 1, received_bytes: 6, sent_bytes: 12 };
    g.bench_function("fold_one_delta", |b| b.iter(|| writer.fold(black_box(id), black_box(delta))));

    let existing = labels(0);
    g.bench_function("intern_existing_label_set", |b| b.iter(|| writer.intern(black_box(existing.clone()))));

    let (local, peer, svc) = (local_node(1), peer_node(), service());
    g.bench_function("label_set_build", |b| b.iter(|| label_set(black_box(&conn(&local, &peer, &svc)))));

    let budget = LabelBudget::new(100_000);
    let shards: Vec<_> = (0..2)
        .map(|worker| {
            let (mut w, shard) = ShardWriter::new(worker, Arc::clone(&budget));
            for i in 0..5_000 {
                let id = w.intern(labels(worker * 5_000 + i));
                w.fold(id, delta);
            }
            shard
        })
        .collect();
    g.sample_size(10);
    g.bench_function("render_10k_label_sets_2_shards", |b| {
        b.iter(|| render(black_box(&shards), "uring").len())
    });
    g.finish();
}

/// One worker of an outbound sidecar routing to one cluster.
fn worker() -> WorkerCtx {
    let yaml = "
node: {workload_name: productpage-v1, namespace: default, labels: {app: productpage, version: v1}}
workers: 1
metrics: {max_label_sets: 100000}
listeners:
  - {name: out, listen: 127.0.0.1:0, direction: outbound, peer_exchange: always, cluster: ratings}
clusters:
  - name: ratings
    service: ratings.default.svc.cluster.local
    endpoints: [{address: 127.0.0.1:9080}]
";
    let mut config = Config::parse(yaml, "bench").expect("bench config");
    config.validate("bench", yaml).expect("bench config");
    let (writer, _shard) = ShardWriter::new(0, LabelBudget::new(100_000));
    WorkerCtx::new(
        0,
        &ringside::snapshot::Published::first(config, Default::default()),
        writer,
        Flags { splice: false, istio_metrics: true },
    )
}

/// Pod `pod` of deployment generation `generation` of ratings-v1: node id, pod name and owner
/// differ per pod and generation, what the labels read does not.
fn pod(generation: &str, pod: usize) -> NodeMetadata {
    let name = format!("ratings-v1-{generation}-{pod:05}");
    NodeMetadata {
        id: format!("sidecar~10.0.{}.{}~{name}.default~default.svc.cluster.local", pod / 250, pod % 250),
        owner: format!("kubernetes://apis/apps/v1/namespaces/default/replicasets/ratings-v1-{generation}"),
        name,
        namespace: "default".into(),
        workload_name: "ratings-v1".into(),
        cluster_id: "Kubernetes".into(),
        labels: [("app", "ratings"), ("version", "v1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// One connection: open, routed, settled with `peer`, closed.
fn connection(ctx: &WorkerCtx, peer: &NodeMetadata) {
    let snapshot = ctx.snapshot();
    let conn = ctx.open(std::sync::Arc::clone(&snapshot.config.listeners[0]), snapshot.generation, 0);
    conn.routed(&snapshot.router, 0, Some(0));
    settle(ctx, &conn, Some(black_box(peer)), "-");
    ctx.close(&conn);
}

fn settle_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("settle");
    let ctx = worker();
    let one = pod("a", 0);
    g.bench_function("steady_one_pod", |b| b.iter(|| connection(&ctx, &one)));

    // After a rolling deploy: 5,000 pods of the old generation connected once, then every
    // connection comes from one of 2,000 pods of the new one.
    let ctx = worker();
    for i in 0..5_000 {
        connection(&ctx, &pod("old", i));
    }
    let pods: Vec<NodeMetadata> = (0..2_000).map(|i| pod("new", i)).collect();
    let mut next = pods.iter().cycle();
    g.bench_function("churn_2000_pods_after_a_rolling_deploy", |b| {
        b.iter(|| connection(&ctx, next.next().unwrap_or(&one)))
    });
    g.finish();
}

criterion_group!(benches, bench, settle_bench);
criterion_main!(benches);
