//! SPEC §3 rendering pinned: a multi-worker, multi-series scrape (shared label sets summed across
//! workers, the overflow series, label values that need escaping, every `ringside_*` metric)
//! compared byte for byte with `tests/data/metrics/render_pinned.txt`, the output of the
//! `metrics-exporter-prometheus` 0.18 renderer ringside used before (tests/data/metrics/README.md).
//!
//! That exporter wrote families and the series within a family in hash-map order, different on
//! every render; the comparison therefore puts each family's series and the families themselves
//! in a canonical order first, and checks the layout the exporter always had (every counter
//! family before every gauge family, one blank line after each family).

use std::sync::Arc;

use ringside::exchange::NodeMetadata;
use ringside::metrics::{
    ConnLabels, Delta, ExchangeOutcome, LabelBudget, Reporter, ServiceInfo, ShardWriter, label_set, render,
};

/// Local workload names: plain ones and ones whose escaping has to match the exporter's.
const WORKLOADS: [&str; 9] = [
    "productpage-v1",
    "quote\"inside",
    "back\\slash",
    "two\\\\backslashes",
    "escaped\\\"quote",
    "new\nline",
    "back\\\nline",
    "trailing\\",
    "unicode-é-✓",
];

fn labels(reporter: Reporter, workload: &str, flags: &str) -> ringside::metrics::LabelSet {
    let local = NodeMetadata {
        workload_name: workload.into(),
        namespace: "default".into(),
        cluster_id: "c1".into(),
        labels: [("app", "productpage"), ("version", "v1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let peer =
        NodeMetadata { workload_name: "ratings-v1".into(), namespace: "ns-b".into(), ..Default::default() };
    let service = ServiceInfo { host: "ratings.default.svc.cluster.local".into(), namespace: String::new() };
    label_set(&ConnLabels {
        reporter,
        local: &local,
        peer: Some(&peer),
        service: &service,
        response_flags: flags,
        local_principal: Some("spiffe://cluster.local/ns/default/sa/productpage"),
        peer_principal: Some("spiffe://cluster.local/ns/ns-b/sa/ratings"),
        mutual_tls: true,
    })
}

/// Three workers sharing a budget of 38 series: workers 0 and 1 take 18 each for the same sets
/// (rendering sums them), worker 2 gets two more and then overflows; every process metric is
/// non-zero somewhere.
fn scrape() -> String {
    let budget = LabelBudget::new(38);
    let mut out = Vec::new();
    let mut writers = Vec::new();
    for worker in 0..3 {
        let (w, s) = ShardWriter::new(worker, Arc::clone(&budget));
        writers.push(w);
        out.push(s);
    }
    for (i, workload) in WORKLOADS.iter().enumerate() {
        for (k, reporter) in [Reporter::Source, Reporter::Destination].into_iter().enumerate() {
            let flags = if i % 3 == 0 { "UF" } else { "-" };
            let n = (i * 2 + k) as u64;
            // Workers 0 and 1 both see every set: rendering sums them.
            for (w, writer) in writers.iter_mut().take(2).enumerate() {
                let id = writer.intern(labels(reporter, workload, flags));
                let w = w as u64;
                writer.fold(
                    id,
                    Delta {
                        opened: n + w + 1,
                        closed: n + w,
                        received_bytes: 1000 * n + w,
                        sent_bytes: 7 * n + 3 * w,
                    },
                );
            }
        }
    }
    // Worker 2: two units left, then overflow for both reporters.
    for (i, reporter) in
        [Reporter::Source, Reporter::Source, Reporter::Destination, Reporter::Source].into_iter().enumerate()
    {
        let id = writers[2].intern(labels(reporter, &format!("late-{i}"), "-"));
        writers[2].fold(id, Delta { opened: 1, closed: 1, received_bytes: u64::MAX / 3, sent_bytes: 5 });
    }
    for (i, writer) in writers.iter().enumerate() {
        writer.set_active_connections([3, 0, 123_456_789][i]);
        for (k, outcome) in ExchangeOutcome::ALL.into_iter().enumerate() {
            for _ in 0..(i + k) % 4 {
                writer.count_exchange(outcome);
            }
        }
    }
    writers[1].count_listener_overflow();
    writers[1].count_listener_overflow();
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    render(&out, "uring").replace(&version, "version=\"@VERSION@\"")
}

/// The exposition with its families, and each family's series, in a canonical order; panics
/// unless every family is `# HELP`/`# TYPE` lines, then series, then one blank line, with every
/// counter family before every gauge family.
fn canonical(text: &str) -> String {
    assert!(text.ends_with("\n\n"), "a blank line ends every family");
    let mut families: Vec<(bool, String, String)> = Vec::new();
    let mut gauges_started = false;
    for block in text.trim_end_matches('\n').split("\n\n") {
        let lines: Vec<&str> = block.lines().collect();
        let header = lines.iter().take_while(|l| l.starts_with('#')).count();
        let kind = lines.get(header.saturating_sub(1)).and_then(|l| l.strip_prefix("# TYPE "));
        let (name, kind) =
            kind.and_then(|k| k.split_once(' ')).unwrap_or_else(|| panic!("no TYPE in {block:?}"));
        let gauge = kind == "gauge";
        assert!(gauge || !gauges_started, "counter family {name} after a gauge family");
        gauges_started |= gauge;
        let mut series: Vec<&str> = lines[header..].to_vec();
        assert!(series.iter().all(|l| l.starts_with(name)), "{name}: {series:?}");
        series.sort_unstable();
        let body = lines[..header].iter().chain(&series).fold(String::new(), |acc, l| acc + l + "\n");
        families.push((gauge, name.to_owned(), body));
    }
    families.sort();
    families.into_iter().map(|(_, _, body)| body + "\n").collect()
}

#[test]
fn render_matches_the_pinned_exporter_output_up_to_its_hash_map_order() {
    let pinned = include_str!("data/metrics/render_pinned.txt");
    let now = scrape();
    assert_eq!(canonical(&now), canonical(pinned), "now:\n{now}");
}

#[test]
fn render_writes_families_and_series_in_a_fixed_order() {
    let text = scrape();
    assert_eq!(text, scrape());
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    let mut want = ringside::metrics::ISTIO_COUNTERS.to_vec();
    want.extend([
        "ringside_exchange_total",
        "ringside_label_sets_overflowed_total",
        "ringside_listener_overflowed_total",
        "ringside_capture_loops_refused_total",
        "ringside_peer_values_replaced_total",
        "ringside_rbac_denied_total",
        "ringside_tls_refused_total",
        "ringside_hbone_refused_total",
        "ringside_connections_active",
        "ringside_driver_info",
        "ringside_build_info",
    ]);
    assert_eq!(families, want);
}
