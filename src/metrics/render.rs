//! Rendering every shard as Prometheus text 0.0.4 (SPEC §3).

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use super::labels::{LABEL_NAMES, LabelSet};
use super::shard::{ExchangeOutcome, Shard};

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Counter names, in [`Delta`](super::Delta) field order (opened, closed, received, sent).
pub const ISTIO_COUNTERS: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
];

/// `# HELP` of [`ISTIO_COUNTERS`], in the same order: Istio's own descriptions of its standard
/// metrics (istio.io, "Istio Standard Metrics"). Envoy writes no HELP line; SPEC §3 asks for one
/// on every family so that `promtool check metrics` has nothing to report.
pub const ISTIO_HELP: [&str; 4] = [
    "Incremented for every opened TCP connection.",
    "Incremented for every closed TCP connection.",
    "Size of total bytes received during request in case of a TCP connection.",
    "Size of total bytes sent during response in case of a TCP connection.",
];

// Recorder metadata for every series; the Prometheus recorder ignores it.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

fn register_counter(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>, v: u64) {
    let key = Key::from_parts(name, labels);
    recorder.register_counter(&key, &METADATA).absolute(v);
}

fn register_gauge(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>, v: f64) {
    let key = Key::from_parts(name, labels);
    recorder.register_gauge(&key, &METADATA).set(v);
}

fn static_label(key: &'static str, value: impl Into<SharedString>) -> Label {
    Label::new(SharedString::const_str(key), value)
}

/// Sums every shard per label set and renders Prometheus text 0.0.4 through a
/// `metrics-exporter-prometheus` recorder: the four `istio_tcp_*` counters and the `ringside_*`
/// process metrics, each family with `# HELP` and `# TYPE`: `ringside_connections_active
/// {worker}`, `ringside_exchange_total{outcome}`, `ringside_label_sets_overflowed_total`,
/// `ringside_listener_overflowed_total`, `ringside_capture_loops_refused_total`,
/// `ringside_driver_info{driver}` and
/// `ringside_build_info{version}`.
pub fn render(shards: &[Arc<Shard>], driver: &str) -> String {
    let mut totals: HashMap<&LabelSet, [u64; 4]> = HashMap::new();
    for shard in shards {
        for (labels, values) in shard.series() {
            let sum = totals.entry(labels).or_default();
            for (s, v) in sum.iter_mut().zip(values) {
                *s = s.wrapping_add(v);
            }
        }
    }

    // A recorder per scrape: not installed globally, holds exactly the series of this render.
    // The builder adds no `_total` suffix (recommended naming is off) and no unit suffix, and
    // keeps labels in insertion order.
    let recorder = PrometheusBuilder::new().build_recorder();
    for (labels, values) in &totals {
        let keyed: Vec<Label> = LABEL_NAMES
            .iter()
            .zip(labels.values())
            .map(|(k, v)| static_label(k, SharedString::from_shared(Arc::clone(v))))
            .collect();
        for (name, v) in ISTIO_COUNTERS.iter().zip(values) {
            register_counter(&recorder, name, keyed.clone(), *v);
        }
    }

    let describe_counter = |name: &'static str, help: &'static str| {
        recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
    };
    let describe_gauge = |name: &'static str, help: &'static str| {
        recorder.describe_gauge(KeyName::from_const_str(name), None, help.into());
    };
    for (name, help) in ISTIO_COUNTERS.into_iter().zip(ISTIO_HELP) {
        describe_counter(name, help);
    }
    describe_gauge("ringside_connections_active", "Connections currently open, per worker.");
    describe_counter(
        "ringside_exchange_total",
        "Peer exchanges by outcome, like Istio's metadata_exchange stats.",
    );
    describe_counter(
        "ringside_label_sets_overflowed_total",
        "Connections whose label set exceeded the label set budget and was folded into the overflow series.",
    );
    describe_counter(
        "ringside_listener_overflowed_total",
        "Connections closed at once because a listener was at its connection limit.",
    );
    describe_counter(
        "ringside_capture_loops_refused_total",
        "Captured connections refused because their original destination was the proxy's own listener.",
    );
    describe_gauge("ringside_driver_info", "I/O driver in use.");
    describe_gauge("ringside_build_info", "ringside build.");

    let mut exchanges = [0u64; 7];
    let (mut overflowed, mut listener, mut loops) = (0u64, 0u64, 0u64);
    for shard in shards {
        register_gauge(
            &recorder,
            "ringside_connections_active",
            vec![static_label("worker", shard.worker().to_string())],
            shard.active_connections() as f64,
        );
        for (sum, outcome) in exchanges.iter_mut().zip(ExchangeOutcome::ALL) {
            *sum = sum.wrapping_add(shard.exchanges(outcome));
        }
        overflowed = overflowed.wrapping_add(shard.label_sets_overflowed());
        listener = listener.wrapping_add(shard.listener_overflowed());
        loops = loops.wrapping_add(shard.capture_loops_refused());
    }
    for (sum, outcome) in exchanges.iter().zip(ExchangeOutcome::ALL) {
        let labels = vec![static_label("outcome", SharedString::const_str(outcome.as_str()))];
        register_counter(&recorder, "ringside_exchange_total", labels, *sum);
    }
    let overflow_name = "ringside_label_sets_overflowed_total";
    register_counter(&recorder, overflow_name, vec![], overflowed);
    register_counter(&recorder, "ringside_listener_overflowed_total", vec![], listener);
    register_counter(&recorder, "ringside_capture_loops_refused_total", vec![], loops);
    let driver = vec![static_label("driver", driver.to_owned())];
    register_gauge(&recorder, "ringside_driver_info", driver, 1.0);
    let version = vec![static_label("version", env!("CARGO_PKG_VERSION"))];
    register_gauge(&recorder, "ringside_build_info", version, 1.0);

    recorder.handle().render()
}

#[cfg(test)]
mod tests {
    use super::super::labels::tests::{conn, no_service, node};
    use super::super::labels::{Reporter, label_set};
    use super::super::shard::{Delta, LabelBudget, ShardWriter};
    use super::*;

    #[test]
    fn process_counters_are_per_worker_and_rendered() {
        let budget = LabelBudget::new(10);
        let (w0, s0) = ShardWriter::new(0, Arc::clone(&budget));
        let (w1, s1) = ShardWriter::new(1, budget);
        w0.set_active_connections(3);
        w1.set_active_connections(4);
        w0.count_exchange(ExchangeOutcome::MetadataAdded);
        w1.count_exchange(ExchangeOutcome::MetadataAdded);
        w1.count_exchange(ExchangeOutcome::Timeout);
        w1.count_listener_overflow();
        let text = render(&[s0, s1], "epoll");
        for line in [
            "ringside_connections_active{worker=\"0\"} 3",
            "ringside_connections_active{worker=\"1\"} 4",
            "ringside_exchange_total{outcome=\"metadata_added\"} 2",
            "ringside_exchange_total{outcome=\"timeout\"} 1",
            "ringside_exchange_total{outcome=\"header_not_found\"} 0",
            "ringside_label_sets_overflowed_total 0",
            "ringside_listener_overflowed_total 1",
            "ringside_driver_info{driver=\"epoll\"} 1",
            &format!("ringside_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
            "# TYPE ringside_exchange_total counter",
            "# TYPE ringside_connections_active gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn render_keeps_label_order_escapes_values_and_writes_help_and_type_for_istio_counters() {
        let (mut w, shard) = ShardWriter::new(0, LabelBudget::new(10));
        let local = node("a\"b\\c\nd", "ns", "", &[]);
        let s = no_service();
        let set = label_set(&conn(Reporter::Source, &local, None, &s));
        let id = w.intern(set);
        w.fold(id, Delta { opened: 2, closed: 1, received_bytes: 5, sent_bytes: 9 });
        let text = render(&[shard], "uring");
        assert!(text.lines().any(|l| l == format!("# HELP {} {}", ISTIO_COUNTERS[3], ISTIO_HELP[3])));
        assert!(!text.contains("_total_total"));
        let line = text.lines().find(|l| l.starts_with("istio_tcp_sent_bytes_total{")).unwrap();
        assert!(line.ends_with("} 9"), "{line}");
        let names: Vec<&str> = line
            .split(['{', ','])
            .skip(1)
            .filter_map(|kv| kv.split_once("=\"").map(|(k, _)| k))
            .filter(|k| LABEL_NAMES.contains(k))
            .collect();
        assert_eq!(names, LABEL_NAMES);
        assert!(line.contains(r#"source_workload="a\"b\\c\nd""#), "{line}");
        assert!(text.lines().any(|l| l == "# TYPE istio_tcp_connections_opened_total counter"));
    }
}
