//! Conformance inputs from `../shared` that no feature test replays yet: Istio's golden
//! sidecar bootstraps (`../shared/istio-bootstrap`, what pilot-agent writes) and real sidecars'
//! Envoy config dumps (`../shared/istio-xds-dumps`). These tests prove the files are read and
//! hold what a bootstrap loader or an xDS replay will rely on; those replays build on the same
//! `shared()` helper and belong next to them. Without `../shared` each test prints one SKIP
//! line naming the missing folder (tests/run.sh lists them; under CI a skip fails the run).
//! Istio's files are never copied into this repository.

#[path = "common/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// `file` in `dir`, parsed as JSON.
fn json(dir: &Path, file: &str) -> Value {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// The golden bootstraps, by case: `<case>_golden.json`, rendered from `<case>.proxycfg`.
const BOOTSTRAPS: [&str; 4] = ["default", "running", "tracing_none", "stats_inclusion"];

fn bootstraps(test: &str) -> Option<PathBuf> {
    skip::shared("istio-bootstrap", &format!("conformance::{test}"))
}

fn dumps(test: &str) -> Option<PathBuf> {
    skip::shared("istio-xds-dumps", &format!("conformance::{test}"))
}

/// The port of `v`'s `address.socket_address`.
fn port(v: &Value) -> Option<u64> {
    v["address"]["socket_address"]["port_value"].as_u64()
}

#[test]
fn every_golden_bootstrap_has_a_node_an_admin_address_ads_over_xds_grpc_and_the_15090_and_15021_listeners() {
    let Some(dir) = bootstraps("golden_bootstraps") else { return };
    for case in BOOTSTRAPS {
        assert!(dir.join(format!("{case}.proxycfg")).is_file(), "{case}.proxycfg");
        let b = json(&dir, &format!("{case}_golden.json"));
        // The node: its id in Istio's `TYPE~IP~POD.NS~NS.svc.cluster.local` shape (here the
        // test's fixed one), and metadata as a map.
        let id = b["node"]["id"].as_str().unwrap_or_else(|| panic!("{case}: node.id"));
        assert_eq!(id.split('~').count(), 4, "{case}: node.id {id}");
        assert!(id.starts_with("sidecar~"), "{case}: node.id {id}");
        assert!(b["node"]["metadata"].is_object(), "{case}: node.metadata");
        // The admin listener on loopback.
        let admin = &b["admin"]["address"]["socket_address"];
        assert_eq!(admin["address"], "127.0.0.1", "{case}: admin address");
        let admin_port = admin["port_value"].as_u64().unwrap_or_else(|| panic!("{case}: admin port"));
        // ADS (delta by default since ISTIO_DELTA_XDS) through the xds-grpc cluster.
        let ads = &b["dynamic_resources"]["ads_config"];
        assert_eq!(ads["api_type"], "DELTA_GRPC", "{case}: ads_config.api_type");
        assert_eq!(ads["grpc_services"][0]["envoy_grpc"]["cluster_name"], "xds-grpc", "{case}");
        let clusters = b["static_resources"]["clusters"].as_array().expect("static clusters");
        let cluster = |name: &str| clusters.iter().find(|c| c["name"] == name);
        for name in ["xds-grpc", "sds-grpc", "prometheus_stats", "agent"] {
            assert!(cluster(name).is_some(), "{case}: static cluster {name}");
        }
        // prometheus_stats points at the admin port, whatever it is (running: 15005).
        let stats = cluster("prometheus_stats").unwrap();
        let endpoint = &stats["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
        assert_eq!(port(endpoint), Some(admin_port), "{case}: prometheus_stats follows the admin port");
        // The two static listeners: merged Prometheus stats and the readiness probe.
        let listeners = b["static_resources"]["listeners"].as_array().expect("static listeners");
        let ports: Vec<Option<u64>> = listeners.iter().map(port).collect();
        assert_eq!(ports, [Some(15090), Some(15021)], "{case}: static listener ports");
        let text = |i: usize| listeners[i].to_string();
        assert!(text(0).contains("/stats/prometheus") && text(0).contains("prometheus_stats"), "{case}");
        assert!(text(1).contains("/healthz/ready") && text(1).contains("\"agent\""), "{case}");
    }
}

#[test]
fn the_running_golden_bootstrap_carries_a_pods_identity_and_a_non_default_admin_port() {
    let Some(dir) = bootstraps("running_bootstrap") else { return };
    let b = json(&dir, "running_golden.json");
    let meta = &b["node"]["metadata"];
    for key in ["NAMESPACE", "NAME", "LABELS", "ISTIO_VERSION", "INTERCEPTION_MODE"] {
        assert!(!meta[key].is_null(), "running: node.metadata.{key}");
    }
    assert_eq!(b["node"]["cluster"], "test.test");
    assert_eq!(b["admin"]["address"]["socket_address"]["port_value"], 15005);
    // Extras a non-Envoy proxy must tolerate.
    assert!(b["tracing"].is_object() && b["stats_sinks"].is_array());
}

/// The config dump sections of `dump`, by the last word of their `@type`.
fn section<'a>(dump: &'a Value, kind: &str) -> &'a Value {
    let configs = dump["configs"].as_array().expect("configs");
    configs
        .iter()
        .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(&format!(".{kind}"))))
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn count(v: &Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

#[test]
fn the_httpbin_listener_dump_holds_2_static_and_27_dynamic_listeners_with_both_virtual_ones() {
    let Some(dir) = dumps("httpbin_listeners") else { return };
    let dump = json(&dir, "istio-authz-httpbin-sidecar-listeners.json");
    let listeners = section(&dump, "ListenersConfigDump");
    assert_eq!(count(&listeners["static_listeners"]), 2);
    let dynamic = listeners["dynamic_listeners"].as_array().unwrap();
    assert_eq!(dynamic.len(), 27);
    assert!(dynamic.iter().all(|l| !l["active_state"]["listener"].is_null()), "all active");
    let names: Vec<&str> = dynamic.iter().filter_map(|l| l["name"].as_str()).collect();
    for name in ["virtualOutbound", "virtualInbound", "0.0.0.0_9080"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
}

#[test]
fn the_bookinfo_endpoint_dump_holds_37_load_assignments_with_the_four_bookinfo_services() {
    let Some(dir) = dumps("bookinfo_endpoints") else { return };
    let dump = json(&dir, "istio-istioctl-bookinfo-sidecar-endpoints.json");
    let endpoints = section(&dump, "EndpointsConfigDump");
    assert_eq!(count(&endpoints["static_endpoint_configs"]), 5);
    let dynamic = endpoints["dynamic_endpoint_configs"].as_array().unwrap();
    assert_eq!(dynamic.len(), 32);
    let names: Vec<&str> =
        dynamic.iter().filter_map(|e| e["endpoint_config"]["cluster_name"].as_str()).collect();
    for service in ["productpage", "reviews", "ratings", "details"] {
        let cluster = format!("outbound|9080||{service}.default.svc.cluster.local");
        assert!(names.contains(&cluster.as_str()), "{cluster} in {names:?}");
    }
}

#[test]
fn the_hotel_reservation_dump_is_a_full_config_dump_with_a_rejected_virtual_inbound() {
    let Some(dir) = dumps("hotel_reservation_full_dump") else { return };
    let dump = json(&dir, "dsb-hotelres-geo-sidecar-istio-1.18.2.json");
    let node = &section(&dump, "BootstrapConfigDump")["bootstrap"]["node"];
    assert_eq!(node["metadata"]["ISTIO_VERSION"], "1.18.2");
    assert_eq!(node["metadata"]["NAMESPACE"], "hr2");
    let clusters = section(&dump, "ClustersConfigDump");
    assert_eq!((count(&clusters["static_clusters"]), count(&clusters["dynamic_active_clusters"])), (5, 138));
    let listeners = section(&dump, "ListenersConfigDump");
    assert_eq!(count(&listeners["static_listeners"]), 2);
    let dynamic = listeners["dynamic_listeners"].as_array().unwrap();
    assert_eq!(dynamic.len(), 142);
    let mongo = dynamic.iter().filter(|l| l["name"].as_str().is_some_and(|n| n.ends_with("_27017"))).count();
    assert_eq!(mongo, 18, "MongoDB TCP listeners");
    // Envoy NACKed virtualInbound (an EnvoyFilter's Lua): the dump keeps the error, twice.
    let rejected: Vec<&Value> = dynamic.iter().filter(|l| !l["error_state"].is_null()).collect();
    assert_eq!(rejected.len(), 2);
    assert!(rejected.iter().any(|l| l["name"] == "virtualInbound"));
    assert_eq!(dynamic.iter().filter(|l| !l["active_state"].is_null()).count(), 140);
}
