//! SPEC §3 against Istio's own golden data (`tests/data/istio-golden`, copied from istio/proxy): the
//! TCP metadata exchange test's traffic replayed through `metrics`, rendered, parsed, and
//! compared with the enforced `metric/tcp_{client,server}_*` files, filled as Istio's
//! `Params.Fill` fills them for the plain (wds=false, native, no additional labels) run.

#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/golden.rs"]
mod golden;

use std::collections::HashMap;

use golden::{assert_exact_stat, cluster_service, fill, node_metadata};
use ringside::metrics::{
    ConnLabels, Delta, LabelBudget, Reporter, ShardWriter, label_set, render, with_canonical_labels,
};

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
