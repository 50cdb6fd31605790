//! SPEC §3 settling under pod churn: the per-worker series cache keys on what the label rules
//! read, not on the peer's pod identity, and stays bounded. A rolling deploy (every connection
//! from a new pod of the same workload: new node id, pod name, owner) settles from the cache
//! without allocating; a new workload is a new series; churn through more workloads than the
//! cache holds leaves it bounded and still serving what is in use.
//!
//! Allocations are counted per thread by a counting global allocator, around `settle` alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use ringside::config::Config;
use ringside::conn::{Captured, Flags, SERIES_CACHE_GENERATION, WorkerCtx, settle};
use ringside::exchange::NodeMetadata;
use ringside::metrics::{LabelBudget, Shard, ShardWriter};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; we only count, in a
// const-initialised thread-local that itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// One worker of an outbound sidecar routing to one cluster, with a label budget of `budget`.
/// A connection on the worker's listener 0, under its current snapshot.
fn open(ctx: &WorkerCtx) -> std::rc::Rc<ringside::conn::Conn> {
    let snapshot = ctx.snapshot();
    ctx.open(Arc::clone(&snapshot.config.listeners[0]), snapshot.generation, 0)
}

fn worker(budget: usize) -> (WorkerCtx, Arc<Shard>) {
    let yaml = "
node: {workload_name: productpage-v1, namespace: default, labels: {app: productpage, version: v1}}
workers: 1
listeners:
  - {name: out, listen: 127.0.0.1:0, direction: outbound, peer_exchange: always, cluster: ratings}
clusters:
  - name: ratings
    service: ratings.default.svc.cluster.local
    endpoints: [{address: 127.0.0.1:9080}]
";
    let mut config = Config::parse(yaml, "test").unwrap();
    config.validate("test", yaml).unwrap();
    let (writer, shard) = ShardWriter::new(0, LabelBudget::new(budget));
    let ctx = WorkerCtx::new(
        0,
        &ringside::snapshot::Published::first(config, Default::default()),
        writer,
        Flags { splice: false, istio_metrics: true },
    );
    (ctx, shard)
}

/// Pod `pod` of workload `workload`, as its sidecar's preamble describes it: node id, pod name
/// and owner differ per pod; workload, namespace, cluster and labels do not.
fn pod(workload: &str, pod: usize) -> NodeMetadata {
    let name = format!("{workload}-7d9f{pod:05}");
    NodeMetadata {
        id: format!("sidecar~10.0.{}.{}~{name}.default~default.svc.cluster.local", pod / 250, pod % 250),
        name: name.clone(),
        namespace: "default".into(),
        owner: format!("kubernetes://apis/apps/v1/namespaces/default/replicasets/{workload}-7d9f{pod}"),
        workload_name: workload.into(),
        cluster_id: "Kubernetes".into(),
        labels: [("app", "ratings"), ("version", "v1"), ("pod-template-hash", &*name)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Opens a connection, settles it with `peer` and closes it; returns what settling allocated.
fn connection(ctx: &WorkerCtx, peer: &NodeMetadata) -> u64 {
    let conn = open(ctx);
    conn.routed(&ctx.snapshot().router, 0, Some(0));
    let before = allocations();
    settle(ctx, &conn, Some(peer), "-");
    let allocated = allocations() - before;
    ctx.close(&conn);
    allocated
}

#[test]
fn two_thousand_new_pods_of_one_workload_settle_from_the_cache_without_allocating() {
    let (ctx, shard) = worker(1000);
    let pods: Vec<NodeMetadata> = (0..2000).map(|i| pod("ratings-v1", i)).collect();
    let first = connection(&ctx, &pods[0]);
    assert!(first > 0, "the first connection builds its label set");
    let per_settle: Vec<u64> = pods[1..].iter().map(|p| connection(&ctx, p)).collect();
    assert!(per_settle.iter().all(|n| *n == 0), "allocations per settle: {per_settle:?}");
    assert_eq!(ctx.series_cache.borrow().hits_and_misses(), (1999, 1));
    assert_eq!(ctx.series_cache.borrow().len(), 1);
    // One series, all 2,000 connections in it.
    let series: Vec<_> = shard.series().collect();
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].1[..2], [2000, 2000]);
    assert_eq!(series[0].0.get("destination_workload"), Some("ratings-v1"));
}

#[test]
fn what_the_labels_read_still_tells_series_apart() {
    let (ctx, shard) = worker(1000);
    let v1 = pod("ratings-v1", 1);
    let mut v2 = pod("ratings-v2", 2);
    v2.labels.insert("version".into(), "v2".into());
    let mut other_ns = pod("ratings-v1", 3);
    other_ns.namespace = "prod".into();
    let mut canonical = pod("ratings-v1", 4);
    canonical.labels.insert("service.istio.io/canonical-name".into(), "ratings".into());
    for p in [&v1, &v2, &other_ns, &canonical, &pod("ratings-v1", 5)] {
        connection(&ctx, p);
    }
    // A flag is part of the key too.
    let conn = open(&ctx);
    conn.routed(&ctx.snapshot().router, 0, Some(0));
    settle(&ctx, &conn, Some(&v1), "UF");
    ctx.close(&conn);
    let series: Vec<_> = shard.series().map(|(l, v)| (l.clone(), v[0])).collect();
    assert_eq!(series.len(), 5, "{series:?}");
    assert_eq!(series[0].1, 2, "v1's second pod shares its series");
    assert_eq!(series[1].0.get("destination_version"), Some("v2"));
    assert_eq!(series[2].0.get("destination_workload_namespace"), Some("prod"));
    assert_eq!(series[3].0.get("destination_canonical_service"), Some("ratings"));
    assert_eq!(series[4].0.get("response_flags"), Some("UF"));
}

#[test]
fn churn_through_more_workloads_than_the_cache_holds_keeps_it_bounded_and_useful() {
    let workloads = 3 * SERIES_CACHE_GENERATION;
    let (ctx, shard) = worker(2 * workloads + 100);
    for w in 0..workloads {
        connection(&ctx, &pod(&format!("w{w}"), w));
    }
    let len = ctx.series_cache.borrow().len();
    assert!(len <= 2 * SERIES_CACHE_GENERATION, "{len} entries");
    assert!(len > SERIES_CACHE_GENERATION, "the previous generation is kept: {len}");
    // The most recent workloads, now from new pods: cached, no allocation.
    for w in workloads - 100..workloads {
        assert_eq!(connection(&ctx, &pod(&format!("w{w}"), w + 1)), 0, "workload {w}");
    }
    // A workload in use survives rotations (three here) by moving up from the previous
    // generation when it is hit there.
    let hot = pod("w-hot", 0);
    connection(&ctx, &hot);
    for w in 0..workloads {
        connection(&ctx, &pod(&format!("x{w}"), w));
        if w % 100 == 0 {
            assert_eq!(connection(&ctx, &pod("w-hot", w)), 0, "w-hot after x{w}");
        }
    }
    assert_eq!(connection(&ctx, &pod("w-hot", 9)), 0);
    assert_eq!(shard.series().count(), 2 * workloads + 1);
}

#[test]
fn captured_connections_key_on_their_original_destination() {
    let (ctx, shard) = worker(1000);
    let peer = pod("ratings-v1", 1);
    for dst in ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80"] {
        let conn = open(&ctx);
        conn.captured.set(Some(Captured::Passthrough(dst.parse().unwrap())));
        settle(&ctx, &conn, Some(&peer), "-");
        ctx.close(&conn);
    }
    let series: Vec<_> = shard.series().map(|(l, v)| (l.clone(), v[0])).collect();
    assert_eq!(series.len(), 2, "{series:?}");
    assert_eq!(series[0].0.get("destination_service"), Some("10.0.0.1:80"));
    assert_eq!(series[0].0.get("destination_service_name"), Some("PassthroughCluster"));
    assert_eq!(series[0].1, 2);
    assert_eq!(series[1].0.get("destination_service"), Some("10.0.0.2:80"));
    assert_eq!(ctx.series_cache.borrow().hits_and_misses(), (1, 2));
}
