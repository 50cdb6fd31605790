//! Hot-path and scrape costs of `metrics`: folding one connection's deltas, interning a label set
//! that already has a series (once per settled connection), and rendering a large scrape.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
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

criterion_group!(benches, bench);
criterion_main!(benches);
