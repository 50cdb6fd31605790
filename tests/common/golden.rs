//! Conformance: Istio's golden TCP-stats data, read from `../shared/istio-golden` (istio/proxy's
//! testdata; never copied into this repository): a filler for the subset of Go text/template
//! the files use, and readers of the bootstrap node metadata, the cluster services and the
//! enforced metric families they describe, in `common/istio_tcp.rs`'s terms so the two can be
//! compared. Included with `#[path]` next to `common/istio_tcp.rs` (as `crate::istio_tcp`).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use ringside::exchange::NodeMetadata;
use ringside::metrics::ServiceInfo;
use serde::Deserialize;

use crate::istio_tcp::Family;

/// The folder under `../shared`.
pub const FOLDER: &str = "istio-golden";

/// Istio's golden files in `dir` (what `shared(FOLDER, ..)` gave).
pub struct Golden(pub PathBuf);

impl Golden {
    /// The text of file `rel` (e.g. `metric/tcp_client_connection_open.yaml.tmpl`), unfilled.
    pub fn read(&self, rel: &str) -> String {
        let path = self.0.join(rel);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// File `rel` filled as Istio's plain run fills it.
    pub fn filled(&self, rel: &str) -> String {
        fill(&self.read(rel), &plain_vars())
    }
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

impl Golden {
    /// A bootstrap `node.metadata` body (fields without the outer braces) as NodeMetadata.
    pub fn node_metadata(&self, rel: &str) -> NodeMetadata {
        let body = self.filled(rel);
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
            overlong_values: 0,
        }
    }

    /// `istio.services[0]` of a cluster template.
    pub fn cluster_service(&self, rel: &str) -> ServiceInfo {
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&self.filled(rel)).unwrap();
        let service = &yaml["metadata"]["filter_metadata"]["istio"]["services"][0];
        ServiceInfo {
            host: service["host"].as_str().unwrap().to_owned(),
            namespace: service["namespace"].as_str().unwrap().to_owned(),
        }
    }

    /// A `metric/*.yaml.tmpl` file's family, filled for the plain run.
    pub fn family(&self, rel: &str) -> Family {
        let family: MetricFamily =
            serde_yaml_ng::from_str(&self.filled(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        Family {
            name: family.name,
            kind: family.kind.to_lowercase(),
            series: family
                .metric
                .into_iter()
                .map(|m| (m.label.into_iter().map(|l| (l.name, l.value)).collect(), m.counter.value))
                .collect(),
        }
    }
}

/// Istio's `MetricFamily` YAML (the shape of prometheus' `dto.MetricFamily`).
#[derive(Deserialize)]
struct MetricFamily {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    metric: Vec<Metric>,
}

#[derive(Deserialize)]
struct Metric {
    counter: Counter,
    label: Vec<LabelPair>,
}

#[derive(Deserialize)]
struct Counter {
    value: f64,
}

#[derive(Deserialize)]
struct LabelPair {
    name: String,
    value: String,
}
