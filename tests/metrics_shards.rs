//! SPEC §3 counting: per-worker shards summed on scrape, the label set budget, and a render that
//! Prometheus' own `promtool` accepts.

#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/promtool.rs"]
mod promtool;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ringside::exchange::NodeMetadata;
use ringside::metrics::{
    ConnLabels, Delta, ExchangeOutcome, LabelBudget, LabelSet, Reporter, ServiceInfo, Shard, ShardWriter,
    label_set, render,
};

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";

/// A distinct label set per `i` (the local workload differs).
fn labels(reporter: Reporter, i: usize) -> LabelSet {
    let local = NodeMetadata {
        workload_name: format!("workload-{i}"),
        namespace: "default".into(),
        ..Default::default()
    };
    let peer = NodeMetadata { workload_name: "peer".into(), ..Default::default() };
    let service =
        ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: "default".into() };
    label_set(&ConnLabels {
        reporter,
        local: &local,
        peer: Some(&peer),
        service: &service,
        response_flags: "-",
        local_principal: None,
        peer_principal: None,
        mutual_tls: false,
    })
}

fn workload(i: usize) -> String {
    format!("workload-{i}")
}

const CONN: Delta = Delta { opened: 1, closed: 1, received_bytes: 6, sent_bytes: 12 };

#[test]
fn rendering_sums_every_workers_shard_per_label_set_exactly() {
    let budget = LabelBudget::new(100);
    let shards: Vec<Arc<Shard>> = (0..2)
        .map(|worker| {
            let (writer, shard) = ShardWriter::new(worker, Arc::clone(&budget));
            std::thread::spawn(move || {
                let mut writer = writer;
                for _ in 0..10_000 {
                    let id = writer.intern(labels(Reporter::Source, 7));
                    writer.fold(id, CONN);
                }
            })
            .join()
            .unwrap();
            shard
        })
        .collect();
    let scrape = exposition::parse(&render(&shards, "uring"));
    let one = [("source_workload", workload(7))];
    let one: Vec<(&str, &str)> = one.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(scrape.family(OPENED).len(), 1, "one series across both workers");
    assert_eq!(scrape.value(OPENED, &one), Some(20_000.0));
    assert_eq!(scrape.value(CLOSED, &one), Some(20_000.0));
    assert_eq!(scrape.value(RECEIVED, &one), Some(120_000.0));
    assert_eq!(scrape.value(SENT, &one), Some(240_000.0));
}

#[test]
fn a_scrape_during_folding_never_blocks_or_panics_and_counters_only_grow() {
    const FOLDS: u64 = 20_000;
    let budget = LabelBudget::new(1000);
    let (writers, shards): (Vec<ShardWriter>, Vec<Arc<Shard>>) =
        (0..2).map(|worker| ShardWriter::new(worker, Arc::clone(&budget))).unzip();
    let done = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (shards, done) = (shards.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut last = [0f64; 4];
            let mut scrapes = 0;
            // At least one scrape; bounded: stops when the writers are done, or after 10,000.
            loop {
                let finished = done.load(Ordering::Acquire);
                let scrape = exposition::parse(&render(&shards, "uring"));
                for (name, last) in [OPENED, CLOSED, RECEIVED, SENT].iter().zip(&mut last) {
                    let total: f64 = scrape.family(name).iter().map(|s| s.value).sum();
                    assert!(total >= *last, "{name} went back from {last} to {total}");
                    *last = total;
                }
                scrapes += 1;
                if finished || scrapes >= 10_000 {
                    break;
                }
            }
            scrapes
        })
    };
    let folders: Vec<_> = writers
        .into_iter()
        .map(|mut writer| {
            std::thread::spawn(move || {
                for i in 0..FOLDS as usize {
                    // New label sets appear while the scraper reads.
                    let id = writer.intern(labels(Reporter::Destination, i % 300));
                    writer.fold(id, CONN);
                }
            })
        })
        .collect();
    for f in folders {
        f.join().unwrap();
    }
    done.store(true, Ordering::Release);
    assert!(scraper.join().unwrap() > 0);
    let scrape = exposition::parse(&render(&shards, "uring"));
    let total = |name| scrape.family(name).iter().map(|s| s.value).sum::<f64>();
    assert_eq!(total(OPENED), (2 * FOLDS) as f64);
    assert_eq!(total(SENT), (2 * FOLDS * 12) as f64);
    assert_eq!(scrape.family(OPENED).len(), 300);
}

#[test]
fn beyond_the_label_set_budget_connections_fold_into_one_overflow_series_and_memory_stays_bounded() {
    let budget = LabelBudget::new(100);
    let (mut writer, shard) = ShardWriter::new(0, Arc::clone(&budget));
    let capacity = shard.capacity();
    for i in 0..1000 {
        let id = writer.intern(labels(Reporter::Source, i));
        writer.fold(id, CONN);
    }
    assert_eq!(shard.len(), 101, "100 series + the overflow series");
    assert_eq!(budget.used(), 100);

    let scrape = exposition::parse(&render(&[Arc::clone(&shard)], "uring"));
    assert_eq!(scrape.family(OPENED).len(), 101);
    assert_eq!(scrape.value("ringside_label_sets_overflowed_total", &[]), Some(900.0));
    let overflow = [("reporter", "source"), ("source_workload", "overflow")];
    assert_eq!(scrape.value(OPENED, &overflow), Some(900.0));
    assert_eq!(scrape.value(SENT, &overflow), Some(900.0 * 12.0));
    let w0 = workload(0);
    assert_eq!(scrape.value(OPENED, &[("source_workload", &w0)]), Some(1.0));
    let overflow_series =
        scrape.family(OPENED).into_iter().find(|s| s.labels.iter().any(|(_, v)| v == "overflow")).unwrap();
    for (k, v) in &overflow_series.labels {
        let want = if k == "reporter" { "source" } else { "overflow" };
        assert_eq!(v, want, "{k}");
    }

    // A thousand more new label sets: no new cells.
    for i in 1000..2000 {
        let id = writer.intern(labels(Reporter::Source, i));
        writer.fold(id, CONN);
    }
    assert_eq!(shard.len(), 101);
    assert_eq!(shard.capacity(), capacity);
    assert_eq!(shard.label_sets_overflowed(), 1900);
}

#[test]
fn the_budget_is_shared_by_all_workers() {
    let budget = LabelBudget::new(100);
    let (mut w0, s0) = ShardWriter::new(0, Arc::clone(&budget));
    let (mut w1, s1) = ShardWriter::new(1, Arc::clone(&budget));
    for i in 0..100 {
        w0.intern(labels(Reporter::Source, i));
        w1.intern(labels(Reporter::Source, 1000 + i));
    }
    assert_eq!(s0.len() + s1.len(), 100 + 2, "100 series + one overflow per worker");
    assert_eq!(s0.label_sets_overflowed() + s1.label_sets_overflowed(), 100);
}

/// A scrape with every kind of series ringside renders.
fn full_render() -> String {
    let budget = LabelBudget::new(3);
    let (mut w0, s0) = ShardWriter::new(0, Arc::clone(&budget));
    let (mut w1, s1) = ShardWriter::new(1, budget);
    for i in 0..5 {
        let id = w0.intern(labels(Reporter::Source, i));
        w0.fold(id, CONN);
        let id = w1.intern(labels(Reporter::Destination, i));
        w1.fold(id, CONN);
    }
    w0.set_active_connections(2);
    w0.count_exchange(ExchangeOutcome::MetadataAdded);
    w1.count_exchange(ExchangeOutcome::Invalid);
    w1.count_listener_overflow();
    render(&[s0, s1], "uring")
}

#[test]
fn promtool_reports_nothing_on_a_render_with_every_family() {
    promtool::check_metrics(&full_render());
}
