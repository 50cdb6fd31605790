//! Rendering every shard as Prometheus text 0.0.4 (SPEC §3).

use std::collections::HashMap;
use std::sync::Arc;

use super::labels::{LABEL_NAMES, LabelSet};
use super::shard::{ExchangeOutcome, HboneRefused, Shard, TLS_SUITES, TlsHandshake, TlsRefused};

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

/// `# HELP` of the `ringside_*` families.
const ACTIVE_HELP: &str = "Connections currently open, per worker.";
const EXCHANGE_HELP: &str = "Peer exchanges by outcome, like Istio's metadata_exchange stats.";
const OVERFLOWED_HELP: &str =
    "Connections whose label set exceeded the label set budget and was folded into the overflow series.";
const LISTENER_HELP: &str = "Connections closed at once because a listener was at its connection limit.";
const TLS_REFUSED_HELP: &str =
    "Inbound mTLS handshakes refused, by reason; no byte of theirs reached the application.";
const HBONE_REFUSED_HELP: &str =
    "HBONE CONNECT requests refused by the terminator, by reason; nothing of theirs reached a backend.";
const TLS_HANDSHAKES_HELP: &str =
    "mTLS handshakes completed, by direction, full or resumed session, and negotiated cipher suite.";
const LOOPS_HELP: &str =
    "Captured connections refused because their original destination was the proxy's own listener.";
const REPLACED_HELP: &str = "Values (and label keys) of peers' metadata longer than 256 bytes, replaced by unknown (label keys: left out).";
const RBAC_HELP: &str = "Connections closed because their filter chain's RBAC filters denied them; no byte of theirs reached the upstream.";
const DRIVER_HELP: &str = "I/O driver in use.";
const BUILD_HELP: &str = "ringside build.";

/// Sums every shard per label set and renders Prometheus text 0.0.4: the four `istio_tcp_*`
/// counters and the `ringside_*` process metrics, each family with `# HELP` and `# TYPE`:
/// `ringside_connections_active{worker}`, `ringside_exchange_total{outcome}`,
/// `ringside_label_sets_overflowed_total`, `ringside_listener_overflowed_total`,
/// `ringside_capture_loops_refused_total`, `ringside_peer_values_replaced_total`,
/// `ringside_rbac_denied_total`, `ringside_tls_refused_total{reason}`,
/// `ringside_hbone_refused_total{reason}`,
/// `ringside_tls_handshakes_total{direction,handshake,cipher_suite}` (only those seen),
/// `ringside_driver_info{driver}` and
/// `ringside_build_info{version}`.
///
/// Written directly, in the layout `metrics-exporter-prometheus` 0.18 wrote (which ringside used
/// before, README "Decisions"): counter families, then gauge families, each followed by a blank
/// line; labels in [`LABEL_NAMES`] order, values escaped as it escaped them; a family without
/// series is left out. Unlike the exporter's hash-map order, families and series come in a
/// fixed order: series in shard order, then the order each shard interned them. Each label set
/// is escaped once and written four times.
pub fn render(shards: &[Arc<Shard>], driver: &str) -> String {
    let series = sum_series(shards);

    // Every label set's `{k="v",...}` once, into one buffer.
    let mut labels = String::new();
    let mut ends = Vec::with_capacity(series.len());
    for (set, _) in &series {
        labels.push('{');
        for (i, (name, value)) in LABEL_NAMES.iter().zip(set.values()).enumerate() {
            if i > 0 {
                labels.push(',');
            }
            push_label(&mut labels, name, value);
        }
        labels.push('}');
        ends.push(labels.len());
    }

    let per_series: usize = ISTIO_COUNTERS.iter().map(|n| n.len() + 22).sum();
    let mut out = String::with_capacity(4 * labels.len() + series.len() * per_series + 4096);
    if !series.is_empty() {
        for (c, (name, help)) in ISTIO_COUNTERS.iter().zip(ISTIO_HELP).enumerate() {
            header(&mut out, name, help, "counter");
            let mut start = 0;
            for ((_, values), end) in series.iter().zip(&ends) {
                out.push_str(name);
                out.push_str(labels.get(start..*end).unwrap_or_default());
                out.push(' ');
                push_u64(&mut out, values.get(c).copied().unwrap_or_default());
                out.push('\n');
                start = *end;
            }
            out.push('\n');
        }
    }

    let mut exchanges = [0u64; 7];
    let mut refused = [0u64; 5];
    let mut hbone_refused = [0u64; 3];
    let mut handshakes = [0u64; TlsHandshake::CELLS];
    let (mut overflowed, mut listener, mut loops, mut replaced, mut rbac) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for shard in shards {
        for (i, sum) in handshakes.iter_mut().enumerate() {
            *sum = sum.wrapping_add(shard.tls_handshakes(i));
        }
        for (sum, outcome) in exchanges.iter_mut().zip(ExchangeOutcome::ALL) {
            *sum = sum.wrapping_add(shard.exchanges(outcome));
        }
        for (sum, reason) in refused.iter_mut().zip(TlsRefused::ALL) {
            *sum = sum.wrapping_add(shard.tls_refused(reason));
        }
        for (sum, reason) in hbone_refused.iter_mut().zip(HboneRefused::ALL) {
            *sum = sum.wrapping_add(shard.hbone_refused(reason));
        }
        overflowed = overflowed.wrapping_add(shard.label_sets_overflowed());
        listener = listener.wrapping_add(shard.listener_overflowed());
        loops = loops.wrapping_add(shard.capture_loops_refused());
        replaced = replaced.wrapping_add(shard.peer_values_replaced());
        rbac = rbac.wrapping_add(shard.rbac_denied());
    }
    header(&mut out, "ringside_exchange_total", EXCHANGE_HELP, "counter");
    for (sum, outcome) in exchanges.iter().zip(ExchangeOutcome::ALL) {
        sample(&mut out, "ringside_exchange_total", Some(("outcome", outcome.as_str())), *sum);
    }
    out.push('\n');
    let overflowed_name = "ringside_label_sets_overflowed_total";
    header(&mut out, overflowed_name, OVERFLOWED_HELP, "counter");
    sample(&mut out, overflowed_name, None, overflowed);
    out.push('\n');
    header(&mut out, "ringside_listener_overflowed_total", LISTENER_HELP, "counter");
    sample(&mut out, "ringside_listener_overflowed_total", None, listener);
    out.push('\n');
    header(&mut out, "ringside_capture_loops_refused_total", LOOPS_HELP, "counter");
    sample(&mut out, "ringside_capture_loops_refused_total", None, loops);
    out.push('\n');
    header(&mut out, "ringside_peer_values_replaced_total", REPLACED_HELP, "counter");
    sample(&mut out, "ringside_peer_values_replaced_total", None, replaced);
    out.push('\n');
    header(&mut out, "ringside_rbac_denied_total", RBAC_HELP, "counter");
    sample(&mut out, "ringside_rbac_denied_total", None, rbac);
    out.push('\n');
    header(&mut out, "ringside_tls_refused_total", TLS_REFUSED_HELP, "counter");
    for (sum, reason) in refused.iter().zip(TlsRefused::ALL) {
        sample(&mut out, "ringside_tls_refused_total", Some(("reason", reason.as_str())), *sum);
    }
    out.push('\n');
    header(&mut out, "ringside_hbone_refused_total", HBONE_REFUSED_HELP, "counter");
    for (sum, reason) in hbone_refused.iter().zip(HboneRefused::ALL) {
        sample(&mut out, "ringside_hbone_refused_total", Some(("reason", reason.as_str())), *sum);
    }
    out.push('\n');
    // Only the combinations seen: 40 mostly-zero series would drown the useful ones.
    if handshakes.iter().any(|n| *n > 0) {
        let name = "ringside_tls_handshakes_total";
        header(&mut out, name, TLS_HANDSHAKES_HELP, "counter");
        for (i, n) in handshakes.iter().enumerate().filter(|(_, n)| **n > 0) {
            let h = TlsHandshake::of_index(i);
            out.push_str(name);
            out.push('{');
            push_label(&mut out, "direction", if h.inbound { "inbound" } else { "outbound" });
            out.push(',');
            push_label(&mut out, "handshake", if h.resumed { "resumed" } else { "full" });
            out.push(',');
            push_label(&mut out, "cipher_suite", TLS_SUITES.get(h.suite).copied().unwrap_or("other"));
            out.push_str("} ");
            push_u64(&mut out, *n);
            out.push('\n');
        }
        out.push('\n');
    }

    if !shards.is_empty() {
        header(&mut out, "ringside_connections_active", ACTIVE_HELP, "gauge");
        for shard in shards {
            let worker = shard.worker().to_string();
            gauge(&mut out, "ringside_connections_active", ("worker", &worker), shard.active_connections());
        }
        out.push('\n');
    }
    header(&mut out, "ringside_driver_info", DRIVER_HELP, "gauge");
    gauge(&mut out, "ringside_driver_info", ("driver", driver), 1);
    out.push('\n');
    header(&mut out, "ringside_build_info", BUILD_HELP, "gauge");
    gauge(&mut out, "ringside_build_info", ("version", env!("CARGO_PKG_VERSION")), 1);
    out.push('\n');
    out
}

/// Every label set of `shards` with its counters summed over the shards, in first-seen order.
fn sum_series(shards: &[Arc<Shard>]) -> Vec<(&LabelSet, [u64; 4])> {
    let mut series: Vec<(&LabelSet, [u64; 4])> = Vec::with_capacity(shards.iter().map(|s| s.len()).sum());
    // A shard holds each label set once, so one shard needs no lookup.
    if let [shard] = shards {
        series.extend(shard.series());
        return series;
    }
    let mut index: HashMap<&LabelSet, usize> = HashMap::with_capacity(series.capacity());
    for shard in shards {
        for (set, values) in shard.series() {
            match index.get(set) {
                Some(&i) => {
                    if let Some((_, sum)) = series.get_mut(i) {
                        for (s, v) in sum.iter_mut().zip(values) {
                            *s = s.wrapping_add(v);
                        }
                    }
                }
                None => {
                    index.insert(set, series.len());
                    series.push((set, values));
                }
            }
        }
    }
    series
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    for part in ["# HELP ", name, " ", help, "\n# TYPE ", name, " ", kind, "\n"] {
        out.push_str(part);
    }
}

fn sample(out: &mut String, name: &str, label: Option<(&str, &str)>, value: u64) {
    out.push_str(name);
    if let Some((k, v)) = label {
        out.push('{');
        push_label(out, k, v);
        out.push('}');
    }
    out.push(' ');
    push_u64(out, value);
    out.push('\n');
}

/// A gauge sample: the exporter kept gauges as `f64` and wrote them with `Display`.
fn gauge(out: &mut String, name: &str, (k, v): (&str, &str), value: u64) {
    use std::fmt::Write;
    out.push_str(name);
    out.push('{');
    push_label(out, k, v);
    let _ = writeln!(out, "}} {}", value as f64);
}

/// `name="value"`, the value escaped as `metrics-exporter-prometheus` 0.18 escapes it.
fn push_label(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str("=\"");
    push_escaped(out, value);
    out.push('"');
}

/// Escapes a label value exactly as `metrics-exporter-prometheus` 0.18 did (pinned by
/// tests/data/metrics): a line feed becomes `\n` and a quote `\"`; a backslash followed by a
/// quote or by another backslash is taken as an escape the value already carries, so `\"` stays
/// `\"` and `\\` stays `\\`; any other backslash is doubled.
fn push_escaped(out: &mut String, value: &str) {
    // Without short-circuit, so that the scan vectorises: most values need no escaping.
    if !value.bytes().fold(false, |any, b| any | matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(value);
        return;
    }
    let mut pending_backslash = false;
    for c in value.chars() {
        match c {
            // The pending backslash stays pending across a line feed, as in the exporter.
            '\n' => out.push_str("\\n"),
            '"' => {
                pending_backslash = false;
                out.push_str("\\\"");
            }
            '\\' => {
                if pending_backslash {
                    out.push_str("\\\\");
                }
                pending_backslash = !pending_backslash;
            }
            c => {
                if pending_backslash {
                    pending_backslash = false;
                    out.push_str("\\\\");
                }
                out.push(c);
            }
        }
    }
    if pending_backslash {
        out.push_str("\\\\");
    }
}

/// Decimal digits of `v`, without `fmt` machinery (40,000 of them in a large scrape).
fn push_u64(out: &mut String, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    while let Some(d) = i.checked_sub(1).and_then(|j| buf.get_mut(j)) {
        *d = b'0' + (v % 10) as u8;
        i -= 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(buf.get(i..).unwrap_or_default()).unwrap_or_default());
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

    #[test]
    fn label_values_are_escaped_as_the_exporter_escaped_them() {
        for (raw, escaped) in [
            ("plain-é", "plain-é"),
            ("a\"b", "a\\\"b"),
            ("a\nb", "a\\nb"),
            ("a\\b", "a\\\\b"),
            // A backslash before a quote or a backslash counts as an escape already made.
            ("a\\\"b", "a\\\"b"),
            ("a\\\\b", "a\\\\b"),
            // A pending backslash survives a line feed and is doubled after it.
            ("a\\\nb", "a\\n\\\\b"),
            ("a\\", "a\\\\"),
        ] {
            let mut out = String::new();
            push_escaped(&mut out, raw);
            assert_eq!(out, escaped, "{raw:?}");
        }
    }

    #[test]
    fn numbers_are_decimal() {
        for v in [0, 7, 10, 1_234_567_890, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string());
        }
    }

    #[test]
    fn a_scrape_without_series_has_no_istio_family_and_a_blank_line_after_every_family() {
        let (_w, shard) = ShardWriter::new(0, LabelBudget::new(10));
        let text = render(&[shard], "epoll");
        assert!(!text.contains("istio_"), "{text}");
        assert!(text.starts_with("# HELP ringside_exchange_total "), "{text}");
        assert_eq!(text.matches("\n\n").count(), 11, "{text}");
        assert!(text.ends_with("} 1\n\n"), "{text}");
        let two = render(&[], "epoll");
        assert!(!two.contains("ringside_connections_active"), "{two}");
    }
}
