//! Istio's TCP metadata exchange test (istio/proxy's `TestTCPMetadataExchange`), restated in
//! ringside's own words: the two workloads' node metadata, the service between them, the
//! traffic, and every series each sidecar must then report — metric, label names in order,
//! label values, and the count. Nothing here is read from Istio's files, so a fresh clone
//! checks Istio's label semantics on its own; `tests/metrics_golden.rs`'s conformance tests
//! prove that these facts say what Istio's golden files in `../shared/istio-golden` say.
//! Included with `#[path]` next to `common/exposition.rs` (as `crate::exposition`).
#![allow(dead_code)]

use std::collections::BTreeMap;

use ringside::exchange::NodeMetadata;
use ringside::metrics::{ISTIO_COUNTERS, ISTIO_HELP, ServiceInfo};

/// Connections of the scenario, one after another.
pub const CONNECTIONS: u64 = 10;
/// Each connection's request: `world\n`.
pub const REQUEST_BYTES: u64 = 6;
/// Each connection's response: `hello world\n`.
pub const RESPONSE_BYTES: u64 = 12;
/// The SPIFFE identities the scenario's certificates carry.
pub const CLIENT_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/client";
/// The server workload's certificate identity.
pub const SERVER_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The service host both sidecars' clusters name.
pub const SERVER_SERVICE: &str = "server.default.svc.cluster.local";

fn node(workload: &str, cluster: &str, mesh: &str, account: &str, labels: &[(&str, &str)]) -> NodeMetadata {
    let pod = format!("{workload}-84975bc778-pxz2w");
    NodeMetadata {
        id: String::new(),
        owner: format!("kubernetes://apis/apps/v1/namespaces/default/deployments/{workload}"),
        name: pod,
        namespace: "default".into(),
        workload_name: workload.into(),
        cluster_id: cluster.into(),
        mesh_id: mesh.into(),
        service_account: account.into(),
        istio_version: "1.5-dev".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        overlong_values: 0,
    }
}

/// The client workload: productpage-v1, whose canonical service is its workload name.
pub fn client_node() -> NodeMetadata {
    node(
        "productpage-v1",
        "client-cluster",
        "mesh",
        "bookinfo-productpage",
        &[
            ("role", "client"),
            ("app", "productpage"),
            ("version", "v1"),
            ("pod-template-hash", "84975bc778"),
            ("service.istio.io/canonical-name", "productpage-v1"),
            ("service.istio.io/canonical-revision", "version-1"),
        ],
    )
}

/// The server workload: ratings-v1 in another cluster and mesh id.
pub fn server_node() -> NodeMetadata {
    node(
        "ratings-v1",
        "server-cluster",
        "proj-123",
        "bookinfo-ratings",
        &[
            ("role", "server"),
            ("app", "ratings"),
            ("version", "v1"),
            ("pod-template-hash", "84975bc778"),
            ("service.istio.io/canonical-name", "ratings"),
            ("service.istio.io/canonical-revision", "version-1"),
        ],
    )
}

/// The service both clusters carry in their `istio.services` metadata.
pub fn service() -> ServiceInfo {
    ServiceInfo { host: SERVER_SERVICE.into(), namespace: "default".into() }
}

/// Which sidecar reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// productpage's outbound sidecar, `reporter="source"`.
    Client,
    /// ratings' inbound sidecar, `reporter="destination"`.
    Server,
}

/// How the scenario ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// Istio's run: mTLS with both certificates, the exchange completed.
    Mtls,
    /// Istio's `without_mx` run: mTLS, but the server never learned the client's metadata.
    MtlsWithoutExchange,
    /// ringside's end-to-end run: the exchange completed over plain TCP, no certificates.
    Plaintext,
}

/// The 23 labels of the one series each side reports, in the order Istio writes them.
pub fn labels(side: Side, run: Run) -> Vec<(String, String)> {
    let exchanged = run != Run::MtlsWithoutExchange;
    let principal = |p: &'static str| if run == Run::Plaintext { "unknown" } else { p };
    // The source workload, as the server sees it: from the exchange, or, without one, only
    // the namespace its certificate names.
    let source: [&str; 7] = if exchanged {
        ["productpage-v1", "productpage-v1", "version-1", "default", "productpage", "v1", "client-cluster"]
    } else {
        ["unknown", "unknown", "latest", "default", "unknown", "unknown", "unknown"]
    };
    let security = match (side, run) {
        // The client side never claims what it cannot see (Istio: unknown).
        (Side::Client, _) => "unknown",
        (Side::Server, Run::Plaintext) => "none",
        (Side::Server, _) => "mutual_tls",
    };
    let pairs: [(&str, &str); 23] = [
        ("reporter", if side == Side::Client { "source" } else { "destination" }),
        ("source_workload", source[0]),
        ("source_canonical_service", source[1]),
        ("source_canonical_revision", source[2]),
        ("source_workload_namespace", source[3]),
        ("source_principal", principal(CLIENT_PRINCIPAL)),
        ("source_app", source[4]),
        ("source_version", source[5]),
        ("source_cluster", source[6]),
        ("destination_workload", "ratings-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", principal(SERVER_PRINCIPAL)),
        ("destination_app", "ratings"),
        ("destination_version", "v1"),
        ("destination_service", SERVER_SERVICE),
        ("destination_canonical_service", "ratings"),
        ("destination_canonical_revision", "version-1"),
        ("destination_service_name", "server"),
        ("destination_service_namespace", "default"),
        ("destination_cluster", "server-cluster"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", security),
    ];
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// One metric family as a scrape must show it: its type, and each series' labels (in order)
/// and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: String,
    /// `counter`, as `# TYPE` writes it.
    pub kind: String,
    pub series: Vec<(Vec<(String, String)>, f64)>,
}

/// The four Istio counters and each one's value after the scenario's ten connections.
pub fn counts() -> [(&'static str, u64); 4] {
    [
        ("istio_tcp_connections_opened_total", CONNECTIONS),
        ("istio_tcp_connections_closed_total", CONNECTIONS),
        ("istio_tcp_received_bytes_total", CONNECTIONS * REQUEST_BYTES),
        ("istio_tcp_sent_bytes_total", CONNECTIONS * RESPONSE_BYTES),
    ]
}

/// Family `metric` as `side` reports it after the scenario `run`: one series.
pub fn family(metric: &str, side: Side, run: Run) -> Family {
    let (_, value) = counts().into_iter().find(|(n, _)| *n == metric).expect("an Istio TCP counter");
    Family { name: metric.into(), kind: "counter".into(), series: vec![(labels(side, run), value as f64)] }
}

/// Checks a scrape as Istio's `ExactStat` does: exactly the listed series of the family, labels
/// in the listed order with the listed values, the value. ExactStat also compares the HELP
/// field, empty in Istio's data because Envoy writes none; SPEC §3 asks for a HELP line on
/// every family, so here it must be Istio's own description of the metric instead.
pub fn assert_exact_family(scrape: &str, expected: &Family, what: &str) {
    let parsed = crate::exposition::parse(scrape);
    assert_eq!(
        parsed.types.get(&expected.name).map(String::as_str),
        Some(expected.kind.as_str()),
        "{what}: TYPE of {}",
        expected.name
    );
    let help = ISTIO_COUNTERS.iter().zip(ISTIO_HELP).find(|(n, _)| **n == expected.name).map(|(_, h)| h);
    assert_eq!(parsed.helps.get(&expected.name).map(String::as_str), help, "{what}: HELP text");
    let actual = parsed.family(&expected.name);
    assert_eq!(actual.len(), expected.series.len(), "{what}: series count");
    for ((labels, value), got) in expected.series.iter().zip(actual) {
        assert_eq!(&got.labels, labels, "{what}: labels");
        assert_eq!(got.value, *value, "{what}: value");
    }
}
