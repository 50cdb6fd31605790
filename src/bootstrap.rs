//! Envoy's bootstrap (`envoy.config.bootstrap.v3.Bootstrap`, JSON or YAML) as Istio's
//! pilot-agent renders it, read into ringside's config (SPEC §10). Pure: text in, a `Config`
//! and the list of what is ignored out; no I/O.
//!
//! What is read: `node` (kept whole, sent to the xDS server unchanged; its Istio metadata
//! also names the local workload), `admin.address`, `dynamic_resources.ads_config` (the
//! `api_type` and the static cluster its gRPC service names: a `pipe` path or a socket
//! address), the `sds-grpc` cluster, and Istio's two static listeners: `/stats/prometheus`
//! (15090) and `/healthz/ready` (15021, forwarded to the `agent` cluster). Everything else is
//! listed once so the log says what is ignored, as the SPEC asks.

use std::net::SocketAddr;

use serde_json::{Map, Value};

use crate::config::{Bind, Config, Xds, XdsApi};

/// Why a bootstrap cannot be served; a lowercase fragment naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Error(String);

fn err(what: impl Into<String>) -> Error {
    Error(what.into())
}

/// The SDS cluster Istio's bootstrap names (`sds-grpc`), served by the agent.
pub const SDS_CLUSTER: &str = "sds-grpc";

/// A bootstrap read: the config to run, and one line per part ignored.
#[derive(Debug)]
pub struct Bootstrap {
    /// ringside's config (listeners and clusters come over xDS).
    pub config: Config,
    /// What the bootstrap has that ringside does not serve, one line each.
    pub ignored: Vec<String>,
}

/// Parse `text` (JSON, or YAML, which is a superset) and merge `overlay` (`--config-yaml`)
/// over it as Envoy does: maps merge key by key, lists are appended, scalars replaced.
pub fn parse(text: &str, overlay: Option<&str>) -> Result<Value, Error> {
    let mut doc = parse_one(text).map_err(|e| err(format!("bootstrap: {e}")))?;
    if let Some(o) = overlay {
        let o = parse_one(o).map_err(|e| err(format!("--config-yaml: {e}")))?;
        merge(&mut doc, o);
    }
    if !doc.is_object() {
        return Err(err("bootstrap: not a map"));
    }
    Ok(doc)
}

fn parse_one(text: &str) -> Result<Value, String> {
    // JSON first: its errors name line and column; Istio renders JSON.
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok(v),
        Err(json) => {
            serde_yaml_ng::from_str::<Value>(text).map_err(|yaml| match text.trim_start().starts_with('{') {
                true => json.to_string(),
                false => yaml.to_string(),
            })
        }
    }
}

/// Protobuf's `MergeFrom` on JSON: what `--config-yaml` does to the file's bootstrap.
fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(old) => merge(old, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => a.extend(b),
        (slot, v) => *slot = v,
    }
}

/// Top-level bootstrap fields read here; any other is listed as ignored.
const READ: [&str; 4] = ["node", "admin", "dynamic_resources", "static_resources"];

/// The config a bootstrap asks for.
pub fn to_config(doc: &Value) -> Result<Bootstrap, Error> {
    let mut cfg = Config::default();
    let mut ignored: Vec<String> = Vec::new();
    let top = doc.as_object().ok_or_else(|| err("bootstrap: not a map"))?;
    ignored
        .extend(top.keys().filter(|k| !READ.contains(&k.as_str())).map(|k| format!("bootstrap field {k}")));
    let statics = top.get("static_resources").and_then(Value::as_object);
    let clusters: Vec<&Map<String, Value>> = list(statics, "clusters").collect();
    let cluster = |name: &str| clusters.iter().find(|c| text(c, "name") == Some(name)).copied();

    let node = top.get("node").and_then(Value::as_object).ok_or_else(|| err("bootstrap: node: missing"))?;
    read_node(node, &mut cfg);

    // Admin: no admin address means no admin listener, as in Envoy.
    cfg.admin.listen = Bind(match top.get("admin").and_then(|a| a.get("address")) {
        Some(a) => Some(socket_address(a).map_err(|e| err(format!("admin.address: {e}")))?),
        None => None,
    });
    // Only what Istio's static listeners ask for is served, and only through them.
    cfg.metrics.listen = Bind(None);
    cfg.health.listen = Bind(None);

    let ads = top.get("dynamic_resources").and_then(|d| d.get("ads_config"));
    if let Some(ads) = ads {
        let api = match str_at(ads, "api_type") {
            Some("GRPC") | None => XdsApi::StateOfTheWorld,
            Some("DELTA_GRPC") => XdsApi::Delta,
            Some(other) => {
                return Err(err(format!("ads_config.api_type: {other} is not GRPC or DELTA_GRPC")));
            }
        };
        let name = ads
            .get("grpc_services")
            .and_then(Value::as_array)
            .and_then(|s| s.first())
            .and_then(|s| s.get("envoy_grpc"))
            .and_then(|g| str_at(g, "cluster_name"))
            .ok_or_else(|| err("ads_config: needs grpc_services[0].envoy_grpc.cluster_name"))?;
        let c = cluster(name)
            .ok_or_else(|| err(format!("ads_config: cluster {name} is not a static cluster")))?;
        let address = grpc_address(c).map_err(|e| err(format!("cluster {name}: {e}")))?;
        let sds = match cluster(SDS_CLUSTER) {
            Some(c) => Some(grpc_address(c).map_err(|e| err(format!("cluster {SDS_CLUSTER}: {e}")))?),
            None => None,
        };
        cfg.xds = Some(Xds {
            address,
            bootstrap_node: Some(Value::Object(node.clone())),
            api,
            sds,
            ..Xds::default()
        });
    }

    let mut used =
        vec![ads.and_then(|_| ads_cluster(doc)), cluster(SDS_CLUSTER).map(|_| SDS_CLUSTER.to_string())];
    for l in list(statics, "listeners") {
        let name = text(l, "name").unwrap_or("(unnamed)");
        let address = l.get("address").map(socket_address);
        match (http_route(l), address) {
            (Some(("/stats/prometheus", target)), Some(Ok(addr))) => {
                cfg.metrics.listen = Bind(Some(addr));
                used.push(Some(target.to_string()));
            }
            (Some(("/healthz/ready", target)), Some(Ok(addr))) => {
                let agent = cluster(target)
                    .and_then(first_endpoint)
                    .and_then(|a| socket_address(a).ok())
                    .ok_or_else(|| {
                        err(format!("listener {name}: cluster {target} needs a socket address"))
                    })?;
                cfg.health.listen = Bind(Some(addr));
                cfg.health.forward = Some(agent);
                used.push(Some(target.to_string()));
            }
            _ => ignored.push(format!("static listener {name}")),
        }
    }
    for c in &clusters {
        let name = text(c, "name").unwrap_or("(unnamed)");
        if !used.iter().flatten().any(|u| u == name) {
            ignored.push(format!("static cluster {name}"));
        }
    }
    for kind in ["secrets"] {
        if statics.is_some_and(|s| s.contains_key(kind)) {
            ignored.push(format!("static_resources.{kind}"));
        }
    }
    Ok(Bootstrap { config: cfg, ignored })
}

/// The cluster ADS is served over.
fn ads_cluster(doc: &Value) -> Option<String> {
    doc.pointer("/dynamic_resources/ads_config/grpc_services/0/envoy_grpc/cluster_name")
        .and_then(Value::as_str)
        .map(String::from)
}

/// The Istio node metadata ringside's own identity comes from (what the injector put in the
/// pod's environment and pilot-agent copied into the node).
fn read_node(node: &Map<String, Value>, cfg: &mut Config) {
    let meta = node.get("metadata").and_then(Value::as_object);
    let field = |k: &str| meta.and_then(|m| text(m, k)).unwrap_or_default().to_string();
    let n = &mut cfg.node;
    n.id = text(node, "id").unwrap_or_default().to_string();
    n.workload_name = field("WORKLOAD_NAME");
    n.namespace = field("NAMESPACE");
    n.cluster_id = field("CLUSTER_ID");
    n.mesh_id = field("MESH_ID");
    n.service_account = field("SERVICE_ACCOUNT");
    n.istio_version = field("ISTIO_VERSION");
    if let Some(labels) = meta.and_then(|m| m.get("LABELS")).and_then(Value::as_object) {
        n.labels = labels.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect();
    }
}

/// A static cluster's gRPC server: `unix:PATH` for a `pipe`, else `HOST:PORT`.
fn grpc_address(cluster: &Map<String, Value>) -> Result<String, String> {
    let a = first_endpoint(cluster).ok_or("no endpoint")?;
    if let Some(path) = a.get("pipe").and_then(|p| str_at(p, "path")) {
        return Ok(format!("unix:{path}"));
    }
    socket_address(a).map(|s| s.to_string())
}

/// `load_assignment.endpoints[0].lb_endpoints[0].endpoint.address`.
fn first_endpoint(cluster: &Map<String, Value>) -> Option<&Value> {
    cluster.get("load_assignment")?.pointer("/endpoints/0/lb_endpoints/0/endpoint/address")
}

/// An Envoy `Address` with a `socket_address`.
fn socket_address(a: &Value) -> Result<SocketAddr, String> {
    let s = a.get("socket_address").ok_or("not a socket address")?;
    let ip = str_at(s, "address").ok_or("socket_address.address missing")?;
    let port = s.get("port_value").and_then(Value::as_u64).unwrap_or(0);
    let port = u16::try_from(port).map_err(|_| format!("port {port} out of range"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// An HTTP static listener's one route: (path prefix, cluster), as Istio's are written.
fn http_route(l: &Map<String, Value>) -> Option<(&str, &str)> {
    let hcm = l.get("filter_chains")?.pointer("/0/filters/0/typed_config")?;
    let route = hcm.pointer("/route_config/virtual_hosts/0/routes/0")?;
    Some((route.pointer("/match/prefix")?.as_str()?, route.pointer("/route/cluster")?.as_str()?))
}

fn list<'a>(m: Option<&'a Map<String, Value>>, key: &str) -> impl Iterator<Item = &'a Map<String, Value>> {
    m.and_then(|m| m.get(key)).and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_object)
}

/// A string field of a JSON value (a map).
fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A string field of a JSON map.
fn text<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sidecar bootstrap in the shape pilot-agent renders (the project's own, trimmed):
    /// delta ADS and SDS over unix sockets, Istio's two static listeners and clusters.
    const SIDECAR: &str = r#"{
      "node": {"id": "sidecar~10.1.2.3~ratings-v2-abc.default~default.svc.cluster.local",
               "cluster": "ratings.default",
               "metadata": {"NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v2", "CLUSTER_ID": "Kubernetes",
                            "MESH_ID": "cluster.local", "SERVICE_ACCOUNT": "bookinfo-ratings",
                            "ISTIO_VERSION": "1.24.0", "ENVOY_STATUS_PORT": 15021,
                            "LABELS": {"app": "ratings", "version": "v2"}}},
      "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
      "stats_config": {"use_all_default_tags": false},
      "layered_runtime": {},
      "dynamic_resources": {"ads_config": {"api_type": "DELTA_GRPC",
                            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}},
      "static_resources": {
        "clusters": [
          {"name": "prometheus_stats", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}}}]}]}},
          {"name": "agent", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15020}}}}]}]}},
          {"name": "sds-grpc", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": "./var/run/secrets/workload-spiffe-uds/socket"}}}}]}]}},
          {"name": "xds-grpc", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": "./etc/istio/proxy/XDS"}}}}]}]}},
          {"name": "zipkin", "load_assignment": {"endpoints": []}}
        ],
        "listeners": [
          {"name": "0.0.0.0_15090", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15090}},
           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
             "typed_config": {"route_config": {"virtual_hosts": [{"domains": ["*"], "routes": [{"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}]}]}}}]}]},
          {"name": "0.0.0.0_15021", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15021}},
           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
             "typed_config": {"route_config": {"virtual_hosts": [{"domains": ["*"], "routes": [{"match": {"prefix": "/healthz/ready"}, "route": {"cluster": "agent"}}]}]}}}]}]}
        ]
      }
    }"#;

    fn read(text: &str, overlay: Option<&str>) -> Bootstrap {
        to_config(&parse(text, overlay).unwrap()).unwrap()
    }

    #[test]
    fn an_istio_sidecar_bootstrap_gives_admin_ads_sds_metrics_and_the_forwarded_health_check() {
        let b = read(SIDECAR, None);
        let c = &b.config;
        assert_eq!(c.admin.listen.0, Some("127.0.0.1:15000".parse().unwrap()));
        assert_eq!(c.metrics.listen.0, Some("0.0.0.0:15090".parse().unwrap()));
        assert_eq!(c.health.listen.0, Some("0.0.0.0:15021".parse().unwrap()));
        assert_eq!(c.health.forward, Some("127.0.0.1:15020".parse().unwrap()));
        let x = c.xds.as_ref().unwrap();
        assert_eq!(x.address, "unix:./etc/istio/proxy/XDS");
        assert_eq!(x.sds.as_deref(), Some("unix:./var/run/secrets/workload-spiffe-uds/socket"));
        assert_eq!(x.api, XdsApi::Delta);
        // The node goes to the server unchanged, numbers staying numbers.
        let node = x.bootstrap_node.as_ref().unwrap();
        assert_eq!(node.pointer("/metadata/ENVOY_STATUS_PORT"), Some(&Value::from(15021)));
        assert_eq!(node.pointer("/cluster"), Some(&Value::from("ratings.default")));
        assert_eq!(
            (c.node.workload_name.as_str(), c.node.namespace.as_str(), c.node.service_account.as_str()),
            ("ratings-v2", "default", "bookinfo-ratings")
        );
        assert_eq!(c.node.labels.get("version").map(String::as_str), Some("v2"));
        assert_eq!(
            b.ignored,
            ["bootstrap field layered_runtime", "bootstrap field stats_config", "static cluster zipkin"]
        );
    }

    #[test]
    fn config_yaml_merges_over_the_file_as_envoy_does() {
        let overlay = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 15005}}}\n\
                       dynamic_resources: {ads_config: {api_type: GRPC}}";
        let b = read(SIDECAR, Some(overlay));
        assert_eq!(b.config.admin.listen.0, Some("127.0.0.1:15005".parse().unwrap()));
        assert_eq!(b.config.xds.unwrap().api, XdsApi::StateOfTheWorld);
        // Lists are appended, not replaced.
        let mut doc =
            parse("{\"a\": [1], \"b\": {\"c\": 1, \"d\": 2}}", Some("{a: [2], b: {c: 3}}")).unwrap();
        assert_eq!(doc["a"], serde_json::json!([1, 2]));
        assert_eq!(doc["b"], serde_json::json!({"c": 3, "d": 2}));
        merge(&mut doc, serde_json::json!({"b": 7}));
        assert_eq!(doc["b"], 7);
    }

    #[test]
    fn a_yaml_bootstrap_reads_like_its_json() {
        let yaml = "node: {id: sidecar~1.2.3.4~a.ns~ns.svc.cluster.local, metadata: {NAMESPACE: ns}}\n\
                    admin: {address: {socket_address: {address: 127.0.0.1, port_value: 15000}}}\n\
                    dynamic_resources: {ads_config: {api_type: GRPC, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}}\n\
                    static_resources: {clusters: [{name: xds, load_assignment: {endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 15010}}}}]}]}}]}\n";
        let b = read(yaml, None);
        assert_eq!(b.config.xds.unwrap().address, "127.0.0.1:15010");
        assert_eq!(b.config.node.namespace, "ns");
        assert!(b.ignored.is_empty(), "{:?}", b.ignored);
    }

    #[test]
    fn a_bootstrap_ringside_cannot_serve_names_the_field() {
        for (text, says) in [
            ("[1, 2]", "not a map"),
            ("{\"admin\": {}}", "node: missing"),
            (
                "{\"node\": {}, \"admin\": {\"address\": {\"pipe\": {\"path\": \"/a\"}}}}",
                "admin.address: not a socket address",
            ),
            (
                "{\"node\": {}, \"dynamic_resources\": {\"ads_config\": {\"api_type\": \"REST\"}}}",
                "api_type: REST",
            ),
            (
                "{\"node\": {}, \"dynamic_resources\": {\"ads_config\": {\"grpc_services\": [{\"envoy_grpc\": {\"cluster_name\": \"x\"}}]}}}",
                "cluster x is not a static cluster",
            ),
            ("{\"node\": ", "bootstrap: "),
        ] {
            let e = parse(text, None).and_then(|d| to_config(&d)).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
