//! SPEC §3 against Istio's own golden data (`shared/istio-golden`, copied from istio/proxy): the
//! TCP metadata exchange test's traffic replayed through `metrics`, rendered, parsed, and
//! compared with the enforced `metric/tcp_{client,server}_*` files, filled as Istio's
//! `Params.Fill` fills them for the plain (wds=false, native, no additional labels) run.

#[path = "common/exposition.rs"]
mod exposition;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use ringside::exchange::NodeMetadata;
use ringside::metrics::{
    ConnLabels, Delta, LabelBudget, Reporter, ServiceInfo, ShardWriter, label_set, render,
    with_canonical_labels,
};
use serde::Deserialize;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-golden")
}

fn read_golden(rel: &str) -> String {
    let path = golden_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- a filler for the subset of Go text/template these files use ----------------------------

enum Piece {
    Text(String),
    Action(String),
}

/// Splits a template into text and `{{ }}` actions, applying `{{-` / `-}}` whitespace trimming.
fn lex(template: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("unclosed {{");
        let mut action = &after[..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        pieces.push(Piece::Text(text.to_owned()));
        pieces.push(Piece::Action(action.trim().to_owned()));
        rest = &after[end + 2..];
    }
    let text = if trim_next { rest.trim_start() } else { rest };
    pieces.push(Piece::Text(text.to_owned()));
    pieces
}

/// Value of an operand: `.Vars.X` (missing = "", Go's missingkey=zero), `.Ports.X` (""), or a
/// quoted literal.
fn operand<'a>(op: &'a str, vars: &'a HashMap<&str, &str>) -> &'a str {
    if let Some(name) = op.strip_prefix(".Vars.") {
        vars.get(name).copied().unwrap_or("")
    } else if op.starts_with('.') {
        ""
    } else {
        op.trim_matches('"')
    }
}

fn condition(cond: &str, vars: &HashMap<&str, &str>) -> bool {
    let words: Vec<&str> = cond.split_whitespace().collect();
    match words.as_slice() {
        ["eq", a, b] => operand(a, vars) == operand(b, vars),
        ["ne", a, b] => operand(a, vars) != operand(b, vars),
        [a] => !operand(a, vars).is_empty(),
        _ => panic!("unsupported condition {cond:?}"),
    }
}

/// Fills a template as Istio's `Params.Fill` does (Go text/template, missingkey=zero) for the
/// constructs in the golden files: `if` / `else` / `end`, `eq` / `ne`, and value actions (which
/// are all `.Vars.*` / `.Ports.*` values, `""` when unset; a `| fill` pipe fills nothing more).
fn fill(template: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::new();
    // Per open `if`: (enclosing scope emits, this branch emits).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let emitting = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(outer, b)| outer && b);
    for piece in lex(template) {
        match piece {
            Piece::Text(t) => {
                if emitting(&stack) {
                    out.push_str(&t);
                }
            }
            Piece::Action(a) => {
                if let Some(cond) = a.strip_prefix("if ") {
                    let outer = emitting(&stack);
                    stack.push((outer, condition(cond, vars)));
                } else if a == "else" {
                    let top = stack.last_mut().expect("else without if");
                    top.1 = !top.1;
                } else if a == "end" {
                    stack.pop().expect("end without if");
                } else if emitting(&stack) {
                    let value = a.split('|').next().unwrap_or("").trim();
                    out.push_str(operand(value, vars));
                }
            }
        }
    }
    assert!(stack.is_empty(), "unclosed if");
    out
}

/// The plain run's variables: AppVersionFallback, EnableAdditionalLabels and WasmRuntime unset.
fn plain_vars() -> HashMap<&'static str, &'static str> {
    HashMap::new()
}

// ---- golden inputs ---------------------------------------------------------------------------

/// A bootstrap `node.metadata` body (fields without the outer braces) as NodeMetadata.
fn node_metadata(rel: &str) -> NodeMetadata {
    let body = fill(&read_golden(rel), &plain_vars());
    let json: serde_json::Value =
        serde_json::from_str(&format!("{{{body}}}")).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let field = |k: &str| json[k].as_str().unwrap_or_default().to_owned();
    let labels: BTreeMap<String, String> = json["LABELS"]
        .as_object()
        .expect("LABELS")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string label").to_owned()))
        .collect();
    NodeMetadata {
        id: String::new(),
        name: field("NAME"),
        namespace: field("NAMESPACE"),
        owner: field("OWNER"),
        workload_name: field("WORKLOAD_NAME"),
        cluster_id: field("CLUSTER_ID"),
        mesh_id: field("MESH_ID"),
        service_account: field("SERVICE_ACCOUNT"),
        istio_version: field("ISTIO_VERSION"),
        labels,
    }
}

/// `istio.services[0]` of a cluster template.
fn cluster_service(rel: &str) -> ServiceInfo {
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&fill(&read_golden(rel), &plain_vars())).unwrap();
    let service = &yaml["metadata"]["filter_metadata"]["istio"]["services"][0];
    ServiceInfo {
        host: service["host"].as_str().unwrap().to_owned(),
        namespace: service["namespace"].as_str().unwrap().to_owned(),
    }
}

#[derive(Deserialize, Debug)]
struct MetricFamily {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    metric: Vec<Metric>,
}

#[derive(Deserialize, Debug)]
struct Metric {
    counter: Counter,
    label: Vec<LabelPair>,
}

#[derive(Deserialize, Debug)]
struct Counter {
    value: f64,
}

#[derive(Deserialize, Debug)]
struct LabelPair {
    name: String,
    value: String,
}

fn expected_family(rel: &str) -> MetricFamily {
    serde_yaml_ng::from_str(&fill(&read_golden(rel), &plain_vars())).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---- the replay ------------------------------------------------------------------------------

const CLIENT_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/server";

/// One sidecar of Istio's TestTCPMetadataExchange: 10 sequential connections, each `world\n`
/// (6 bytes) up and `hello world\n` (12 bytes) down, over mTLS with a completed exchange.
/// Returns that sidecar's scrape.
fn replay(reporter: Reporter) -> String {
    let client = with_canonical_labels(node_metadata("client_node_metadata.json.tmpl"));
    let server = with_canonical_labels(node_metadata("server_node_metadata.json.tmpl"));
    let (local, peer, service, local_principal, peer_principal) = match reporter {
        Reporter::Source => (
            &client,
            &server,
            cluster_service("cluster/tcp_client.yaml.tmpl"),
            CLIENT_PRINCIPAL,
            SERVER_PRINCIPAL,
        ),
        Reporter::Destination => (
            &server,
            &client,
            cluster_service("cluster/tcp_server.yaml.tmpl"),
            SERVER_PRINCIPAL,
            CLIENT_PRINCIPAL,
        ),
    };
    let (mut writer, shard) = ShardWriter::new(0, LabelBudget::new(1000));
    for _ in 0..10 {
        // The peer settles: labels are built and interned once, opened is counted.
        let labels = label_set(&ConnLabels {
            reporter,
            local,
            peer: Some(peer),
            endpoint_labels: None,
            service: &service,
            response_flags: "-",
            local_principal: Some(local_principal),
            peer_principal: Some(peer_principal),
            mutual_tls: true,
        });
        let id = writer.intern(labels);
        writer.fold(id, Delta { opened: 1, ..Delta::default() });
        // Close: the final byte deltas and closed.
        writer.fold(id, Delta { opened: 0, closed: 1, received_bytes: 6, sent_bytes: 12 });
    }
    render(&[shard], "epoll")
}

/// Checks a scrape as Istio's `ExactStat` does: exactly the listed series of the family, labels in
/// the listed order with the listed values, the value, no HELP text.
fn assert_exact_stat(scrape: &str, rel: &str) {
    let expected = expected_family(rel);
    let parsed = exposition::parse(scrape);
    assert_eq!(
        parsed.types.get(&expected.name).map(String::as_str),
        Some(expected.kind.to_lowercase().as_str()),
        "{rel}: TYPE of {}",
        expected.name
    );
    assert_eq!(parsed.helps.get(&expected.name), None, "{rel}: HELP text");
    let actual = parsed.family(&expected.name);
    assert_eq!(actual.len(), expected.metric.len(), "{rel}: series count");
    for (want, got) in expected.metric.iter().zip(actual) {
        let want_labels: Vec<(&str, &str)> =
            want.label.iter().map(|l| (l.name.as_str(), l.value.as_str())).collect();
        let got_labels: Vec<(&str, &str)> =
            got.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got_labels, want_labels, "{rel}: labels");
        assert_eq!(got.value, want.counter.value, "{rel}: value");
    }
}

#[test]
fn the_client_sidecar_reports_istios_golden_tcp_series_with_reporter_source() {
    let scrape = replay(Reporter::Source);
    for rel in [
        "metric/tcp_client_connection_open.yaml.tmpl",
        "metric/tcp_client_connection_close.yaml.tmpl",
        "metric/tcp_client_received_bytes.yaml.tmpl",
        "metric/tcp_client_sent_bytes.yaml.tmpl",
    ] {
        assert_exact_stat(&scrape, rel);
    }
}

#[test]
fn the_server_sidecar_reports_istios_golden_tcp_series_with_reporter_destination() {
    let scrape = replay(Reporter::Destination);
    for rel in [
        "metric/tcp_server_connection_open.yaml.tmpl",
        "metric/tcp_server_connection_close.yaml.tmpl",
        "metric/tcp_server_received_bytes.yaml.tmpl",
        "metric/tcp_server_sent_bytes.yaml.tmpl",
    ] {
        assert_exact_stat(&scrape, rel);
    }
}

#[test]
fn without_exchange_the_server_reports_the_peer_unknown_but_its_namespace_from_the_certificate() {
    // Istio's tcp_server_connection_open_without_mx (native: WasmRuntime unset).
    let server = with_canonical_labels(node_metadata("server_node_metadata.json.tmpl"));
    let service = cluster_service("cluster/tcp_server.yaml.tmpl");
    let (mut writer, shard) = ShardWriter::new(0, LabelBudget::new(10));
    for _ in 0..10 {
        let id = writer.intern(label_set(&ConnLabels {
            reporter: Reporter::Destination,
            local: &server,
            peer: None,
            endpoint_labels: None,
            service: &service,
            response_flags: "-",
            local_principal: Some(SERVER_PRINCIPAL),
            peer_principal: Some(CLIENT_PRINCIPAL),
            mutual_tls: true,
        }));
        writer.fold(id, Delta { opened: 1, closed: 1, ..Delta::default() });
    }
    assert_exact_stat(&render(&[shard], "epoll"), "metric/tcp_server_connection_open_without_mx.yaml.tmpl");
}

#[test]
fn the_template_filler_takes_else_branches_for_unset_vars_and_the_if_branch_for_true() {
    let t =
        "a:\n{{- if eq .Vars.X \"true\" }}\n  x: 1\n{{- else }}\n  x: 2\n{{- end }}\nb: \"{{ .Vars.Y }}\"";
    assert_eq!(fill(t, &HashMap::new()), "a:\n  x: 2\nb: \"\"");
    let vars = HashMap::from([("X", "true"), ("Y", "y")]);
    assert_eq!(fill(t, &vars), "a:\n  x: 1\nb: \"y\"");
    let nested = "{{ if .Vars.A }}{{ if .Vars.B }}ab{{ else }}a{{ end }}{{ else }}none{{ end }}";
    assert_eq!(fill(nested, &HashMap::new()), "none");
    assert_eq!(fill(nested, &HashMap::from([("A", "1")])), "a");
}
