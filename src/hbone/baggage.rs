//! Peer metadata in the W3C `baggage` header, with ztunnel's keys (SPEC §12): the originator
//! sends its own on the CONNECT, the terminator answers with its own on the `200`, and each
//! side's istio_tcp_* peer labels come from the other's. Values in, values out: no I/O.

use crate::exchange::{MAX_PEER_VALUE, NodeMetadata};
use crate::metrics::labels::{CANONICAL_NAME, CANONICAL_REVISION};

/// Workload kinds whose `k8s.<kind>.name` names the workload, as ztunnel reads them.
const WORKLOAD_KEYS: [&str; 4] = ["k8s.deployment.name", "k8s.cronjob.name", "k8s.pod.name", "k8s.job.name"];

/// Our `baggage` value: cluster, namespace, workload (as a deployment), canonical service and
/// revision; empty values are left out, as ztunnel does.
pub fn encode(node: &NodeMetadata) -> String {
    let label = |key: &str| node.labels.get(key).map(String::as_str).unwrap_or_default();
    let pairs = [
        ("k8s.cluster.name", node.cluster_id.as_str()),
        ("k8s.namespace.name", node.namespace.as_str()),
        ("k8s.deployment.name", node.workload_name.as_str()),
        ("service.name", label(CANONICAL_NAME)),
        ("service.version", label(CANONICAL_REVISION)),
    ];
    let mut out = String::new();
    for (key, value) in pairs.iter().filter(|(_, v)| !v.is_empty() && baggage_safe(v)) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// A value we can put in baggage as it is (no separators, no characters a header refuses).
fn baggage_safe(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b';' | b'=' | b'"' | b'\\'))
}

/// The peer's metadata from its `baggage` values (one per header line): the keys ztunnel
/// reads; others, properties after `;`, and malformed members are ignored. A value longer
/// than [`MAX_PEER_VALUE`] becomes `unknown` and is counted in `overlong_values`, as for the
/// peer exchange (SPEC §11).
pub fn decode<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> NodeMetadata {
    let mut node = NodeMetadata::default();
    for value in values {
        let Ok(text) = std::str::from_utf8(value) else { continue };
        for member in text.split(',') {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, value)) = member.split_once('=') else { continue };
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() {
                continue;
            }
            let value = if value.len() > MAX_PEER_VALUE {
                node.overlong_values = node.overlong_values.saturating_add(1);
                "unknown"
            } else {
                value
            };
            match key {
                "k8s.cluster.name" => node.cluster_id = value.to_owned(),
                "k8s.namespace.name" => node.namespace = value.to_owned(),
                k if WORKLOAD_KEYS.contains(&k) => node.workload_name = value.to_owned(),
                "service.name" => {
                    node.labels.insert(CANONICAL_NAME.to_owned(), value.to_owned());
                }
                "service.version" => {
                    node.labels.insert(CANONICAL_REVISION.to_owned(), value.to_owned());
                }
                _ => {}
            }
        }
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeMetadata {
        let mut n = NodeMetadata {
            cluster_id: "K1".into(),
            namespace: "NS1".into(),
            workload_name: "N1".into(),
            ..NodeMetadata::default()
        };
        n.labels.insert(CANONICAL_NAME.into(), "N2".into());
        n.labels.insert(CANONICAL_REVISION.into(), "V1".into());
        n
    }

    #[test]
    fn baggage_carries_ztunnels_keys() {
        assert_eq!(
            encode(&node()),
            "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,service.name=N2,service.version=V1"
        );
    }

    #[test]
    fn the_peers_baggage_gives_its_labels_whatever_the_workload_kind_or_line_split() {
        let one = decode([encode(&node()).as_bytes()]);
        assert_eq!(one, node());
        let lines: [&[u8]; 3] = [
            b"k8s.cluster.name=K1,k8s.namespace.name=NS1",
            b"k8s.job.name=N1;prop=x",
            b"service.name=N2,service.version=V1,other=1",
        ];
        assert_eq!(decode(lines), node());
    }

    #[test]
    fn empty_malformed_and_overlong_baggage_values_are_not_labels() {
        let long = format!("k8s.namespace.name={}", "x".repeat(MAX_PEER_VALUE + 1));
        let n = decode([b"k8s.cluster.name=,junk,=v".as_slice(), long.as_bytes(), b"\xff"]);
        assert_eq!(n.cluster_id, "");
        assert_eq!(n.namespace, "unknown");
        assert_eq!(n.overlong_values, 1);
    }
}
