//! An Aggregated Discovery Service (state of the world) for the xDS tests (SPEC §9): tonic on
//! its own thread and runtime, serving Istio-shaped resources as istiod writes them, and
//! recording every request (ACKs, NACKs, the node) for the tests to read.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, ListValue, Struct, UInt32Value, Value, value::Kind};
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// What the server serves: one version of every resource.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub version: String,
    pub clusters: Vec<cds::Cluster>,
    pub endpoints: Vec<eds::ClusterLoadAssignment>,
    pub listeners: Vec<lds::Listener>,
}

/// A running ADS server; dropping it (or `stop`) closes every stream, as a crashed istiod.
pub struct AdsServer {
    pub addr: SocketAddr,
    snapshot: watch::Sender<Arc<Snapshot>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdsServer {
    /// Serve `first` on `addr`, sending every request it receives to `requests`.
    pub fn start(addr: SocketAddr, first: Snapshot, requests: mpsc::Sender<DiscoveryRequest>) -> AdsServer {
        AdsServer::start_on(Bind::Tcp(addr), first, requests)
    }

    /// Serve on a unix socket at `path`, as Istio's agent serves its XDS proxy.
    pub fn start_unix(
        path: &std::path::Path,
        first: Snapshot,
        requests: mpsc::Sender<DiscoveryRequest>,
    ) -> AdsServer {
        AdsServer::start_on(Bind::Unix(path.to_path_buf()), first, requests)
    }

    fn start_on(bind: Bind, first: Snapshot, requests: mpsc::Sender<DiscoveryRequest>) -> AdsServer {
        let addr = match &bind {
            Bind::Tcp(a) => *a,
            Bind::Unix(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let (snapshot, rx) = watch::channel(Arc::new(first));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let service = AggregatedDiscoveryServiceServer::new(Ads { snapshot: rx, requests });
                let router = tonic::transport::Server::builder().add_service(service);
                match bind {
                    Bind::Tcp(addr) => {
                        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                        ready_tx.send(()).unwrap();
                        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                        tokio::select! {
                            _ = router.serve_with_incoming(incoming) => {}
                            _ = stopped => {}
                        }
                    }
                    Bind::Unix(path) => {
                        let _ = std::fs::remove_file(&path);
                        let listener = tokio::net::UnixListener::bind(&path).unwrap();
                        ready_tx.send(()).unwrap();
                        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                        tokio::select! {
                            _ = router.serve_with_incoming(incoming) => {}
                            _ = stopped => {}
                        }
                    }
                }
            });
            // Dropping the runtime drops every stream task: clients see their stream end.
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        ready_rx.recv_timeout(Duration::from_secs(20)).expect("ADS server bound");
        AdsServer { addr, snapshot, stop: Some(stop), thread: Some(thread) }
    }

    /// Push a new snapshot to every stream.
    pub fn push(&self, s: Snapshot) {
        self.snapshot.send_replace(Arc::new(s));
    }

    /// Stop serving and close every stream.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

enum Bind {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

struct Ads {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    requests: mpsc::Sender<DiscoveryRequest>,
}

fn response(s: &Snapshot, type_url: &str, names: &[String], nonce: u64) -> DiscoveryResponse {
    let resources: Vec<Any> = match type_url {
        CLUSTER => s.clusters.iter().map(|c| any(CLUSTER, c)).collect(),
        LISTENER => s.listeners.iter().map(|l| any(LISTENER, l)).collect(),
        _ => s
            .endpoints
            .iter()
            .filter(|c| names.contains(&c.cluster_name))
            .map(|c| any(ENDPOINTS, c))
            .collect(),
    };
    DiscoveryResponse {
        version_info: s.version.clone(),
        resources,
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut snapshot = self.snapshot.clone();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            // Subscribed types, with the EDS names asked for.
            let mut subscribed: HashMap<String, Vec<String>> = HashMap::new();
            loop {
                tokio::select! {
                    r = inbound.message() => {
                        let Ok(Some(r)) = r else { break };
                        let _ = requests.send(r.clone());
                        let known = subscribed.get(&r.type_url);
                        // A new subscription, or new EDS names: send what is current.
                        let fresh = known.is_none() || known != Some(&r.resource_names);
                        subscribed.insert(r.type_url.clone(), r.resource_names.clone());
                        if fresh {
                            nonce += 1;
                            let s = snapshot.borrow().clone();
                            if tx.send(Ok(response(&s, &r.type_url, &r.resource_names, nonce))).await.is_err() {
                                break;
                            }
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let s = snapshot.borrow_and_update().clone();
                        // istiod's order: clusters, endpoints, listeners.
                        for t in [CLUSTER, ENDPOINTS, LISTENER] {
                            if let Some(names) = subscribed.get(t) {
                                nonce += 1;
                                let _ = tx.send(Ok(response(&s, t, names, nonce))).await;
                            }
                        }
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("delta xDS"))
    }
}

pub fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any { type_url: type_url.to_string(), value: m.encode_to_vec() }
}

fn s(v: &str) -> Value {
    Value { kind: Some(Kind::StringValue(v.to_string())) }
}

fn strukt(fields: &[(&str, Value)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
    }
}

fn metadata(filter: &str, fields: &[(&str, Value)]) -> core::Metadata {
    core::Metadata {
        filter_metadata: [(filter.to_string(), strukt(fields))].into_iter().collect(),
        ..Default::default()
    }
}

pub fn address(a: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    }
}

/// An EDS cluster as istiod writes one for a DestinationRule subset: `istio.services`
/// metadata, the metadata exchange as an upstream filter, and the tlsMode transport socket
/// matches.
pub fn eds_cluster(name: &str, host: &str, namespace: &str) -> cds::Cluster {
    use cds::cluster::{
        ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy, TransportSocketMatch,
    };
    let service = Value {
        kind: Some(Kind::StructValue(strukt(&[
            ("host", s(host)),
            ("name", s(host.split('.').next().unwrap())),
            ("namespace", s(namespace)),
        ]))),
    };
    cds::Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    Default::default(),
                )),
                ..Default::default()
            }),
            service_name: name.to_string(),
        }),
        lb_policy: LbPolicy::LeastRequest as i32,
        metadata: Some(metadata(
            "istio",
            &[("services", Value { kind: Some(Kind::ListValue(ListValue { values: vec![service] })) })],
        )),
        filters: vec![cds::Filter { name: "istio.metadata_exchange".into(), ..Default::default() }],
        transport_socket_matches: vec![
            TransportSocketMatch {
                name: "tlsMode-istio".into(),
                r#match: Some(strukt(&[("tlsMode", s("istio"))])),
                ..Default::default()
            },
            TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                r#match: Some(Struct::default()),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// Endpoints as istiod writes them: `istio.workload` is
/// `name;namespace;canonical-name;canonical-revision;cluster`.
pub fn assignment(cluster: &str, endpoints: &[(SocketAddr, &str)]) -> eds::ClusterLoadAssignment {
    eds::ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![eds::LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(a, workload)| {
                    let mut m = metadata("istio", &[("workload", s(workload))]);
                    m.filter_metadata
                        .insert("envoy.transport_socket_match".into(), strukt(&[("tlsMode", s("istio"))]));
                    eds::LbEndpoint {
                        host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                            address: Some(address(*a)),
                            ..Default::default()
                        })),
                        metadata: Some(m),
                        load_balancing_weight: Some(UInt32Value { value: 1 }),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An outbound TCP listener as istiod writes one for a service port: `istio.stats` then
/// tcp_proxy to one cluster or weighted clusters.
pub fn tcp_listener(name: &str, listen: SocketAddr, routes: &[(&str, u32)]) -> lds::Listener {
    use tcp::tcp_proxy::{ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight};
    let spec = match routes {
        [(one, _)] => ClusterSpecifier::Cluster(one.to_string()),
        many => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|(c, w)| ClusterWeight { name: c.to_string(), weight: *w, ..Default::default() })
                .collect(),
        }),
    };
    let proxy =
        tcp::TcpProxy { stat_prefix: name.to_string(), cluster_specifier: Some(spec), ..Default::default() };
    let filter = |name: &str, any: Any| lds::Filter {
        name: name.to_string(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(any)),
    };
    lds::Listener {
        name: name.to_string(),
        address: Some(address(listen)),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        bind_to_port: Some(BoolValue { value: true }),
        filter_chains: vec![lds::FilterChain {
            filters: vec![
                // istiod sends a stats.PluginConfig; its content is not read (SPEC §9).
                filter(
                    "istio.stats",
                    Any { type_url: "type.googleapis.com/stats.PluginConfig".into(), value: vec![] },
                ),
                filter(
                    "envoy.filters.network.tcp_proxy",
                    any("type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", &proxy),
                ),
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The snapshot without Istio's own extensions (`istio.stats`, `istio.metadata_exchange`,
/// tlsMode transport socket matches), which an upstream Envoy does not have: the rest is
/// what istiod sends.
pub fn without_istio_extensions(mut s: Snapshot) -> Snapshot {
    for l in &mut s.listeners {
        l.listener_filters.retain(|f| !f.name.starts_with("istio."));
        for c in &mut l.filter_chains {
            c.filters.retain(|f| !f.name.starts_with("istio."));
        }
    }
    for c in &mut s.clusters {
        c.filters.retain(|f| !f.name.starts_with("istio."));
        c.transport_socket_matches.clear();
    }
    s
}
