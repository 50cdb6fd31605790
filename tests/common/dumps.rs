//! Envoy `/config_dump`s of real Istio sidecars (`../shared/istio-xds-dumps/`) turned into the
//! resources istiod sent: JSON to protobuf against the FileDescriptorSet envoy-types ships,
//! Istio-only types carried as opaque `Any`. Shared by tests/xds_replay.rs and
//! benches/xds_chains.rs; the caller finds the file (tests through `common::shared`).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::ads::{cds, eds, lds};
use envoy_types::pb::envoy::admin::v3 as admin;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

/// envoy-types' FileDescriptorSet of every Envoy proto (`src/generated/types.bin` in its
/// crate directory, found through `cargo metadata`). The metadata is filtered to the host:
/// offline, cargo has only the packages a build here downloaded, and unfiltered it resolves
/// every platform's (a fresh machine lacks the Windows-only ones and the command fails).
pub fn envoy_pool() -> DescriptorPool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host_triple()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types in cargo metadata");
    let bin = PathBuf::from(manifest).parent().unwrap().join("src/generated/types.bin");
    DescriptorPool::decode(std::fs::read(&bin).unwrap().as_slice()).unwrap()
}

/// The platform rustc builds for by default here (`host:` of `rustc -vV`).
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc).arg("-vV").output().expect("rustc -vV");
    let text = String::from_utf8_lossy(&out.stdout);
    let host = text.lines().find_map(|l| l.strip_prefix("host: "));
    host.expect("rustc -vV names the host").trim().to_string()
}

/// Every `@type` in `json`.
pub fn type_urls(json: &serde_json::Value, out: &mut BTreeSet<String>) {
    match json {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(t)) = o.get("@type") {
                out.insert(t.clone());
            }
            o.values().for_each(|v| type_urls(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| type_urls(v, out)),
        _ => {}
    }
}

/// The resources of one dump, as istiod sent them.
#[derive(Default)]
pub struct Dump {
    pub listeners: Vec<lds::Listener>,
    pub clusters: Vec<cds::Cluster>,
    pub endpoints: Vec<eds::ClusterLoadAssignment>,
    /// RouteConfigurations (RDS), for the Envoy reference (ringside does not ask for them yet).
    pub routes: Vec<envoy_types::pb::envoy::config::route::v3::RouteConfiguration>,
    /// Istio-only types carried as opaque `Any` (an empty message of that name).
    pub opaque: BTreeSet<String>,
}

/// Parse a `/config_dump` (`envoy.admin.v3.ConfigDump` in JSON): types the pool lacks
/// (Istio's `stats.PluginConfig`, `istio.*`) become empty messages of their name, so their
/// `Any` keeps its type URL and drops its body (ringside reads those filters by name only).
/// A listener Envoy rejected (`error_state`) is served as what istiod sent for it.
pub fn load(path: &std::path::Path) -> Dump {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut pool = envoy_pool();
    let mut urls = BTreeSet::new();
    type_urls(&json, &mut urls);
    let mut dump = Dump::default();
    for url in urls {
        let name = url.rsplit('/').next().unwrap().to_string();
        if pool.get_message_by_name(&name).is_some() {
            continue;
        }
        let (package, message) = name.rsplit_once('.').unwrap_or(("", &name));
        let file = prost_types::FileDescriptorProto {
            name: Some(format!("opaque/{name}.proto")),
            package: (!package.is_empty()).then(|| package.to_string()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some(message.to_string()),
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        pool.add_file_descriptor_proto(file).unwrap();
        dump.opaque.insert(name);
    }
    let desc = pool.get_message_by_name("envoy.admin.v3.ConfigDump").unwrap();
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let msg =
        DynamicMessage::deserialize_with_options(desc, json, &options).expect("the dump as a ConfigDump");
    let config = admin::ConfigDump::decode(msg.encode_to_vec().as_slice()).unwrap();
    let mut names = BTreeSet::new();
    for any in &config.configs {
        match any.type_url.rsplit('/').next().unwrap() {
            "envoy.admin.v3.ListenersConfigDump" => {
                let d = admin::ListenersConfigDump::decode(any.value.as_slice()).unwrap();
                for l in d.dynamic_listeners {
                    let sent = l
                        .active_state
                        .and_then(|s| s.listener)
                        .or(l.error_state.and_then(|e| e.failed_configuration));
                    let pb = lds::Listener::decode(sent.expect("a listener").value.as_slice()).unwrap();
                    // Envoy dumps a rejected listener twice: serve it once.
                    if names.insert(pb.name.clone()) {
                        dump.listeners.push(pb);
                    }
                }
            }
            "envoy.admin.v3.ClustersConfigDump" => {
                let d = admin::ClustersConfigDump::decode(any.value.as_slice()).unwrap();
                for c in d.dynamic_active_clusters {
                    dump.clusters.push(cds::Cluster::decode(c.cluster.unwrap().value.as_slice()).unwrap());
                }
            }
            "envoy.admin.v3.EndpointsConfigDump" => {
                let d = admin::EndpointsConfigDump::decode(any.value.as_slice()).unwrap();
                for e in d.dynamic_endpoint_configs {
                    let cla = e.endpoint_config.unwrap().value;
                    dump.endpoints.push(eds::ClusterLoadAssignment::decode(cla.as_slice()).unwrap());
                }
            }
            "envoy.admin.v3.RoutesConfigDump" => {
                use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
                let d = admin::RoutesConfigDump::decode(any.value.as_slice()).unwrap();
                for r in d.dynamic_route_configs {
                    let rc = r.route_config.unwrap().value;
                    dump.routes.push(RouteConfiguration::decode(rc.as_slice()).unwrap());
                }
            }
            _ => {}
        }
    }
    dump
}
