//! Istio's golden test data (`tests/data/istio-golden`, copied from istio/proxy) for tests: a filler
//! for the subset of Go text/template the files use, the bootstrap node metadata and cluster
//! services they describe, the enforced metric families, and Istio's `ExactStat` comparison.
//! Included with `#[path]` next to `common/exposition.rs` (as `crate::exposition`).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use ringside::exchange::NodeMetadata;
use ringside::metrics::{ISTIO_COUNTERS, ISTIO_HELP, ServiceInfo};
use serde::Deserialize;

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio-golden")
}

pub fn read_golden(rel: &str) -> String {
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
pub fn fill(template: &str, vars: &HashMap<&str, &str>) -> String {
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
pub fn plain_vars() -> HashMap<&'static str, &'static str> {
    HashMap::new()
}

// ---- golden inputs ---------------------------------------------------------------------------

/// A bootstrap `node.metadata` body (fields without the outer braces) as NodeMetadata.
pub fn node_metadata(rel: &str) -> NodeMetadata {
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
pub fn cluster_service(rel: &str) -> ServiceInfo {
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&fill(&read_golden(rel), &plain_vars())).unwrap();
    let service = &yaml["metadata"]["filter_metadata"]["istio"]["services"][0];
    ServiceInfo {
        host: service["host"].as_str().unwrap().to_owned(),
        namespace: service["namespace"].as_str().unwrap().to_owned(),
    }
}

#[derive(Deserialize, Debug, Clone)]
pub struct MetricFamily {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub metric: Vec<Metric>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Metric {
    pub counter: Counter,
    pub label: Vec<LabelPair>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Counter {
    pub value: f64,
}

#[derive(Deserialize, Debug, Clone)]
pub struct LabelPair {
    pub name: String,
    pub value: String,
}

pub fn expected_family(rel: &str) -> MetricFamily {
    serde_yaml_ng::from_str(&fill(&read_golden(rel), &plain_vars())).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Checks a scrape as Istio's `ExactStat` does: exactly the listed series of the family, labels in
/// the listed order with the listed values, the value. ExactStat also compares the HELP field,
/// empty in Istio's golden data because Envoy writes none; SPEC §3 asks for a HELP line on every
/// family, so here it must be Istio's own description of the metric instead.
pub fn assert_exact_stat(scrape: &str, rel: &str) {
    assert_exact_family(scrape, &expected_family(rel), rel);
}

/// [`assert_exact_stat`] against an already loaded (and possibly adjusted) family.
pub fn assert_exact_family(scrape: &str, expected: &MetricFamily, rel: &str) {
    let parsed = crate::exposition::parse(scrape);
    assert_eq!(
        parsed.types.get(&expected.name).map(String::as_str),
        Some(expected.kind.to_lowercase().as_str()),
        "{rel}: TYPE of {}",
        expected.name
    );
    let help = ISTIO_COUNTERS.iter().zip(ISTIO_HELP).find(|(n, _)| **n == expected.name).map(|(_, h)| h);
    assert_eq!(parsed.helps.get(&expected.name).map(String::as_str), help, "{rel}: HELP text");
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
