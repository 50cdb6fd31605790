//! SPEC §3 against Istio's TCP metadata exchange test: its traffic replayed through `metrics`,
//! rendered, parsed, and compared series by series, as Istio's `ExactStat` compares them.
//!
//! The top-level tests compare with the facts restated in `common/istio_tcp.rs` (a fresh clone
//! runs them). `conformance::` replays Istio's own golden files from `../shared/istio-golden`
//! (istio/proxy's testdata, filled as its `Params.Fill` fills them for the plain run: wds=false,
//! native, no additional labels), and checks that the restated facts say what those files say;
//! without `../shared` each prints one SKIP line.

#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/golden.rs"]
mod golden;
#[path = "common/istio_tcp.rs"]
mod istio_tcp;
#[path = "common/skip.rs"]
mod skip;

use istio_tcp::{CLIENT_PRINCIPAL, Run, SERVER_PRINCIPAL, Side, assert_exact_family, family};
use ringside::exchange::NodeMetadata;
use ringside::metrics::{
    ConnLabels, Delta, LabelBudget, Reporter, ServiceInfo, ShardWriter, label_set, render,
    with_canonical_labels,
};

// ---- the replay ------------------------------------------------------------------------------

/// The scenario's two workloads and their service.
struct Scenario {
    client: NodeMetadata,
    server: NodeMetadata,
    client_service: ServiceInfo,
    server_service: ServiceInfo,
}

impl Scenario {
    /// As `common/istio_tcp.rs` restates it.
    fn restated() -> Scenario {
        Scenario {
            client: istio_tcp::client_node(),
            server: istio_tcp::server_node(),
            client_service: istio_tcp::service(),
            server_service: istio_tcp::service(),
        }
    }
}

/// One sidecar of Istio's TestTCPMetadataExchange: 10 sequential connections, each `world\n`
/// (6 bytes) up and `hello world\n` (12 bytes) down, over mTLS with a completed exchange
/// (`exchange`) or without one. Returns that sidecar's scrape.
fn replay(s: &Scenario, reporter: Reporter, exchange: bool) -> String {
    let client = with_canonical_labels(s.client.clone());
    let server = with_canonical_labels(s.server.clone());
    let (local, peer, service, local_principal, peer_principal) = match reporter {
        Reporter::Source => (&client, &server, &s.client_service, CLIENT_PRINCIPAL, SERVER_PRINCIPAL),
        Reporter::Destination => (&server, &client, &s.server_service, SERVER_PRINCIPAL, CLIENT_PRINCIPAL),
    };
    let (mut writer, shard) = ShardWriter::new(0, LabelBudget::new(1000));
    for _ in 0..istio_tcp::CONNECTIONS {
        // The peer settles: labels are built and interned once, opened is counted.
        let labels = label_set(&ConnLabels {
            reporter,
            local,
            peer: exchange.then_some(peer),
            service,
            response_flags: "-",
            local_principal: Some(local_principal),
            peer_principal: Some(peer_principal),
            mutual_tls: true,
        });
        let id = writer.intern(labels);
        writer.fold(id, Delta { opened: 1, ..Delta::default() });
        // Close: the final byte deltas and closed.
        let (received_bytes, sent_bytes) = (istio_tcp::REQUEST_BYTES, istio_tcp::RESPONSE_BYTES);
        writer.fold(id, Delta { opened: 0, closed: 1, received_bytes, sent_bytes });
    }
    render(&[shard], "epoll")
}

const METRICS: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
];

#[test]
fn the_client_sidecar_reports_istios_tcp_series_with_reporter_source() {
    let scrape = replay(&Scenario::restated(), Reporter::Source, true);
    for metric in METRICS {
        assert_exact_family(&scrape, &family(metric, Side::Client, Run::Mtls), metric);
    }
}

#[test]
fn the_server_sidecar_reports_istios_tcp_series_with_reporter_destination() {
    let scrape = replay(&Scenario::restated(), Reporter::Destination, true);
    for metric in METRICS {
        assert_exact_family(&scrape, &family(metric, Side::Server, Run::Mtls), metric);
    }
}

#[test]
fn without_exchange_the_server_reports_the_peer_unknown_but_its_namespace_from_the_certificate() {
    let scrape = replay(&Scenario::restated(), Reporter::Destination, false);
    let opened = "istio_tcp_connections_opened_total";
    assert_exact_family(&scrape, &family(opened, Side::Server, Run::MtlsWithoutExchange), opened);
}

#[test]
fn the_template_filler_takes_else_branches_for_unset_vars_and_the_if_branch_for_true() {
    use std::collections::HashMap;

    use golden::fill;
    let t =
        "a:\n{{- if eq .Vars.X \"true\" }}\n  x: 1\n{{- else }}\n  x: 2\n{{- end }}\nb: \"{{ .Vars.Y }}\"";
    assert_eq!(fill(t, &HashMap::new()), "a:\n  x: 2\nb: \"\"");
    let vars = HashMap::from([("X", "true"), ("Y", "y")]);
    assert_eq!(fill(t, &vars), "a:\n  x: 1\nb: \"y\"");
    let nested = "{{ if .Vars.A }}{{ if .Vars.B }}ab{{ else }}a{{ end }}{{ else }}none{{ end }}";
    assert_eq!(fill(nested, &HashMap::new()), "none");
    assert_eq!(fill(nested, &HashMap::from([("A", "1")])), "a");
}

/// Replays of Istio's own golden files from `../shared/istio-golden`.
mod conformance {
    use super::*;
    use crate::golden::{FOLDER, Golden};

    /// The golden folder, or a SKIP line naming it.
    fn golden(test: &str) -> Option<Golden> {
        crate::skip::shared(FOLDER, &format!("metrics_golden::conformance::{test}")).map(Golden)
    }

    /// The scenario as Istio's golden bootstrap and cluster files describe it.
    fn scenario(g: &Golden) -> Scenario {
        Scenario {
            client: g.node_metadata("client_node_metadata.json.tmpl"),
            server: g.node_metadata("server_node_metadata.json.tmpl"),
            client_service: g.cluster_service("cluster/tcp_client.yaml.tmpl"),
            server_service: g.cluster_service("cluster/tcp_server.yaml.tmpl"),
        }
    }

    /// The enforced metric files of one side, with the family each names.
    fn files(side: &str) -> [(String, &'static str); 4] {
        let file = |f: &str| format!("metric/tcp_{side}_{f}.yaml.tmpl");
        [
            (file("connection_open"), METRICS[0]),
            (file("connection_close"), METRICS[1]),
            (file("received_bytes"), METRICS[2]),
            (file("sent_bytes"), METRICS[3]),
        ]
    }

    #[test]
    fn the_client_sidecar_reports_istios_golden_tcp_series_with_reporter_source() {
        let Some(g) = golden("client_golden_series") else { return };
        let scrape = replay(&scenario(&g), Reporter::Source, true);
        for (rel, _) in files("client") {
            assert_exact_family(&scrape, &g.family(&rel), &rel);
        }
    }

    #[test]
    fn the_server_sidecar_reports_istios_golden_tcp_series_with_reporter_destination() {
        let Some(g) = golden("server_golden_series") else { return };
        let scrape = replay(&scenario(&g), Reporter::Destination, true);
        for (rel, _) in files("server") {
            assert_exact_family(&scrape, &g.family(&rel), &rel);
        }
    }

    #[test]
    fn without_exchange_the_server_reports_istios_golden_without_mx_series() {
        // Istio's tcp_server_connection_open_without_mx (native: WasmRuntime unset).
        let Some(g) = golden("server_golden_without_mx") else { return };
        let scrape = replay(&scenario(&g), Reporter::Destination, false);
        let rel = "metric/tcp_server_connection_open_without_mx.yaml.tmpl";
        assert_exact_family(&scrape, &g.family(rel), rel);
    }

    #[test]
    fn the_restated_scenario_says_what_istios_golden_files_say() {
        let Some(g) = golden("restated_facts") else { return };
        let genuine = scenario(&g);
        assert_eq!(genuine.client, istio_tcp::client_node(), "client_node_metadata.json.tmpl");
        assert_eq!(genuine.server, istio_tcp::server_node(), "server_node_metadata.json.tmpl");
        let service = |s: &ServiceInfo| (s.host.clone(), s.namespace.clone());
        let restated = service(&istio_tcp::service());
        assert_eq!(service(&genuine.client_service), restated, "cluster/tcp_client.yaml.tmpl");
        assert_eq!(service(&genuine.server_service), restated, "cluster/tcp_server.yaml.tmpl");
        for (side, name) in [(Side::Client, "client"), (Side::Server, "server")] {
            for (rel, metric) in files(name) {
                assert_eq!(g.family(&rel), family(metric, side, Run::Mtls), "{rel}");
            }
        }
        let rel = "metric/tcp_server_connection_open_without_mx.yaml.tmpl";
        let without = family(METRICS[0], Side::Server, Run::MtlsWithoutExchange);
        assert_eq!(g.family(rel), without, "{rel}");
    }

    #[test]
    fn istios_golden_node_metadata_survives_ringsides_encode_and_decode() {
        use ringside::exchange::{Parser, Status, encode};
        let Some(g) = golden("node_metadata_round_trip") else { return };
        for rel in ["client_node_metadata.json.tmpl", "server_node_metadata.json.tmpl"] {
            let node = g.node_metadata(rel);
            assert_eq!(node.labels.len(), 6, "{rel}");
            let preamble = encode(&node);
            match Parser::new(64 * 1024).feed(&preamble) {
                Status::Done { peer, consumed } => {
                    assert_eq!((&*peer, consumed), (&node, preamble.len()), "{rel}");
                }
                other => panic!("{rel}: expected Done, got {other:?}"),
            }
        }
    }
}
