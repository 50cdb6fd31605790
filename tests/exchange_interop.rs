//! SPEC §2 wire compatibility: ringside's preamble against Google's protobuf library (Python,
//! `tests/interop/peer.py`), an implementation independent of prost.
//!
//! Needs `python3` with the `protobuf` package (`pip install protobuf`); without them these
//! tests fail, they do not skip. `conformance::` also encodes Istio's own golden node metadata
//! from `../shared/istio-golden` both ways (a SKIP line without `../shared`).

#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/golden.rs"]
mod golden;
#[path = "common/istio_tcp.rs"]
mod istio_tcp;
#[path = "common/skip.rs"]
mod skip;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use ringside::exchange::{HEADER_LEN, NodeMetadata, Parser, Status, decode_payload, encode};
use serde_json::{Value, json};

fn manifest_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Run `peer.py <mode>` with `input` on stdin and return its stdout.
fn peer_py(mode: &str, input: &[u8]) -> Vec<u8> {
    let script = manifest_path("tests/interop/peer.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("interop needs python3 with protobuf (pip install protobuf): {error}")
        });
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "python3 {} {mode} failed (interop needs `pip install protobuf`): {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn to_json(node: &NodeMetadata) -> Value {
    json!({
        "id": node.id,
        "name": node.name,
        "namespace": node.namespace,
        "owner": node.owner,
        "workload_name": node.workload_name,
        "cluster_id": node.cluster_id,
        "mesh_id": node.mesh_id,
        "service_account": node.service_account,
        "istio_version": node.istio_version,
        "labels": node.labels,
    })
}

fn from_json(json: &Value) -> NodeMetadata {
    let text = |key: &str| json[key].as_str().unwrap().to_owned();
    NodeMetadata {
        id: text("id"),
        name: text("name"),
        namespace: text("namespace"),
        owner: text("owner"),
        workload_name: text("workload_name"),
        cluster_id: text("cluster_id"),
        mesh_id: text("mesh_id"),
        service_account: text("service_account"),
        istio_version: text("istio_version"),
        overlong_values: 0,
        labels: json["labels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(key, value)| (key.clone(), value.as_str().unwrap().to_owned()))
            .collect(),
    }
}

/// Python's preamble for `node`.
fn python_encode(node: &NodeMetadata) -> Vec<u8> {
    peer_py("encode", to_json(node).to_string().as_bytes())
}

/// What Python reads from `preamble`.
fn python_decode(preamble: &[u8]) -> NodeMetadata {
    from_json(&serde_json::from_slice(&peer_py("decode", preamble)).unwrap())
}

/// What ringside reads from a whole `preamble`.
fn ringside_decode(preamble: &[u8]) -> NodeMetadata {
    match Parser::new(64 * 1024).feed(preamble) {
        Status::Done { peer, consumed } => {
            assert_eq!(consumed, preamble.len());
            std::rc::Rc::unwrap_or_clone(peer)
        }
        other => panic!("expected Done, got {other:?}"),
    }
}

fn golden_client() -> NodeMetadata {
    let json = std::fs::read(manifest_path("tests/data/preamble_golden_client.json")).unwrap();
    from_json(&serde_json::from_slice(&json).unwrap())
}

#[test]
fn ringside_preamble_decodes_in_google_protobuf_to_the_exact_fields() {
    let node = golden_client();
    assert_eq!(python_decode(&encode(&node)), node);
}

#[test]
fn google_protobuf_preamble_decodes_in_ringside_to_the_exact_fields() {
    let node = golden_client();
    assert_eq!(ringside_decode(&python_encode(&node)), node);
}

#[test]
fn ringside_writes_the_same_bytes_as_google_protobuf_deterministic_serialization() {
    let node = golden_client();
    assert_eq!(encode(&node), python_encode(&node));
}

#[test]
fn the_stored_google_protobuf_golden_preamble_decodes_and_re_encodes_byte_identically() {
    let golden = std::fs::read(manifest_path("tests/data/preamble_golden_client.bin")).unwrap();
    let node = golden_client();

    assert_eq!(ringside_decode(&golden), node);
    assert_eq!(decode_payload(&golden[HEADER_LEN..]), Ok(node.clone()));
    assert_eq!(encode(&node), golden);
}

/// Istio's own node metadata, from its golden bootstrap templates.
mod conformance {
    use super::*;

    #[test]
    fn istios_golden_node_metadata_is_byte_identical_and_reads_the_same_in_both_implementations() {
        let test = "exchange_interop::conformance::istios_golden_node_metadata";
        let Some(dir) = crate::skip::shared(crate::golden::FOLDER, test) else { return };
        let g = crate::golden::Golden(dir);
        for rel in ["client_node_metadata.json.tmpl", "server_node_metadata.json.tmpl"] {
            let node = g.node_metadata(rel);
            assert!(!node.workload_name.is_empty() && node.labels.len() == 6, "{rel}: {node:?}");
            let ours = encode(&node);
            assert_eq!(ours, python_encode(&node), "{rel}");
            assert_eq!(python_decode(&ours), node, "{rel}");
        }
    }
}

#[test]
fn an_empty_label_key_reads_the_same_on_both_sides_though_its_bytes_differ() {
    // proto3 leaves a map entry's default key off the wire in prost, while Google's protobuf
    // (C++ and Python) writes it as `0a 00`; both decode to the same entry. Kubernetes label
    // keys are never empty, so this is the one place ringside's bytes may differ.
    let node = NodeMetadata {
        id: "id".into(),
        labels: BTreeMap::from([(String::new(), "empty key".into())]),
        ..NodeMetadata::default()
    };
    let ours = encode(&node);
    let theirs = python_encode(&node);
    assert_eq!(theirs.len(), ours.len() + 2);
    assert_eq!(python_decode(&ours), node);
    assert_eq!(ringside_decode(&theirs), node);
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "\\PC{1,24}"]
}

fn node_metadata() -> impl Strategy<Value = NodeMetadata> {
    (vec(text(), 9), btree_map("[a-z0-9./-]{1,20}", "\\PC{0,20}", 0..8)).prop_map(|(texts, labels)| {
        let mut texts = texts.into_iter();
        let mut next = || texts.next().unwrap();
        NodeMetadata {
            id: next(),
            name: next(),
            namespace: next(),
            owner: next(),
            workload_name: next(),
            cluster_id: next(),
            mesh_id: next(),
            service_account: next(),
            istio_version: next(),
            overlong_values: 0,
            labels,
        }
    })
}

proptest! {
    // Each case starts two Python processes; a few dozen cover the shapes.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_node_metadata_is_byte_identical_and_reads_the_same_in_both_implementations(
        node in node_metadata(),
    ) {
        let ours = encode(&node);
        let theirs = python_encode(&node);
        prop_assert_eq!(&ours, &theirs);
        prop_assert_eq!(python_decode(&ours), node.clone());
        prop_assert_eq!(ringside_decode(&theirs), node);
    }
}
