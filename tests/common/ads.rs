//! An Aggregated Discovery Service for the xDS tests (SPEC §9), in both variants: state of
//! the world and delta (`DeltaAggregatedResources`: the whole subscribed set first, then only
//! the resources that changed and the names removed, each resource versioned by its bytes).
//! tonic on its own thread and runtime, serving Istio-shaped resources as istiod writes them,
//! and recording every request (ACKs, NACKs, the node) — and, in delta, every response — for
//! the tests to read.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
pub use envoy_types::pb::envoy::config::endpoint::v3 as eds;
pub use envoy_types::pb::envoy::config::listener::v3 as lds;
pub use envoy_types::pb::envoy::config::route::v3 as rds;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
pub use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, UInt32Value, Value, value::Kind};
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// What the server serves: one version of every resource.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub version: String,
    pub clusters: Vec<cds::Cluster>,
    pub endpoints: Vec<eds::ClusterLoadAssignment>,
    pub listeners: Vec<lds::Listener>,
    /// SDS over ADS (for Envoy; ringside has no SDS client and never asks).
    pub secrets: Vec<tls::Secret>,
}

/// A running ADS server; dropping it (or `stop`) closes every stream, as a crashed istiod.
pub struct AdsServer {
    pub addr: SocketAddr,
    snapshot: watch::Sender<Arc<Served>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The socket file `start_for_sidecar` made, removed on drop.
    sock: Option<std::path::PathBuf>,
}

impl AdsServer {
    /// Serve `first` on `addr`, sending every request it receives to `requests`.
    pub fn start(addr: SocketAddr, first: Snapshot, requests: mpsc::Sender<DiscoveryRequest>) -> AdsServer {
        AdsServer::start_on(Bind::Tcp(addr), first, requests)
    }

    /// Serve `first` on a free loopback port; the requests it receives arrive on the
    /// returned channel.
    pub fn serve(first: Snapshot) -> (AdsServer, mpsc::Receiver<DiscoveryRequest>) {
        let (tx, requests) = mpsc::channel();
        (AdsServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), first, tx), requests)
    }

    /// Serve on a unix socket at `path`, as Istio's agent serves its XDS proxy.
    pub fn start_unix(
        path: &std::path::Path,
        first: Snapshot,
        requests: mpsc::Sender<DiscoveryRequest>,
    ) -> AdsServer {
        AdsServer::start_on(Bind::Unix(path.to_path_buf()), first, requests)
    }

    /// Serve on a unix socket in the temp dir, named after `name` and this process, that any
    /// user may connect to: a sidecar in a test's network namespace (which does not hide the
    /// file system) runs as uid 1337. Its `xds:` address is [`AdsServer::unix_address`].
    pub fn start_for_sidecar(
        name: &str,
        first: Snapshot,
        requests: mpsc::Sender<DiscoveryRequest>,
    ) -> AdsServer {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("ringside-{name}-{}.sock", std::process::id()));
        let mut server = AdsServer::start_unix(&path, first, requests);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        server.sock = Some(path);
        server
    }

    /// `unix:PATH` of a server from [`AdsServer::start_for_sidecar`].
    pub fn unix_address(&self) -> String {
        format!("unix:{}", self.sock.as_ref().expect("a unix socket server").display())
    }

    /// Serve `first` over delta xDS on a free loopback port; what it receives and sends
    /// arrives on the returned [`DeltaLog`].
    pub fn serve_delta(first: Snapshot) -> (AdsServer, DeltaLog) {
        AdsServer::start_delta(Bind::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))), first)
    }

    /// Serve `first` over delta xDS on `addr` (to restart a server on the same address).
    pub fn serve_delta_at(addr: SocketAddr, first: Snapshot) -> (AdsServer, DeltaLog) {
        AdsServer::start_delta(Bind::Tcp(addr), first)
    }

    /// Serve `first` over delta xDS on a unix socket at `path`, as Istio's agent serves its
    /// XDS proxy by default (`DELTA_GRPC`).
    pub fn serve_delta_unix(path: &std::path::Path, first: Snapshot) -> (AdsServer, DeltaLog) {
        AdsServer::start_delta(Bind::Unix(path.to_path_buf()), first)
    }

    fn start_delta(bind: Bind, first: Snapshot) -> (AdsServer, DeltaLog) {
        let (requests_tx, requests) = mpsc::channel();
        let (responses_tx, responses) = mpsc::channel();
        let (sotw, _) = mpsc::channel();
        let delta = DeltaRecorder { requests: requests_tx, responses: responses_tx };
        (AdsServer::start_with(bind, first, sotw, Some(delta)), DeltaLog { requests, responses })
    }

    fn start_on(bind: Bind, first: Snapshot, requests: mpsc::Sender<DiscoveryRequest>) -> AdsServer {
        AdsServer::start_with(bind, first, requests, None)
    }

    fn start_with(
        bind: Bind,
        first: Snapshot,
        requests: mpsc::Sender<DiscoveryRequest>,
        delta: Option<DeltaRecorder>,
    ) -> AdsServer {
        let (snapshot, rx) = watch::channel(Arc::new(Served::next(None, first, Vec::new())));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let service = AggregatedDiscoveryServiceServer::new(Ads { snapshot: rx, requests, delta });
                let router = tonic::transport::Server::builder().add_service(service);
                match bind {
                    Bind::Tcp(addr) => {
                        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                        ready_tx.send(listener.local_addr().unwrap()).unwrap();
                        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                        tokio::select! {
                            _ = router.serve_with_incoming(incoming) => {}
                            _ = stopped => {}
                        }
                    }
                    Bind::Unix(path) => {
                        let _ = std::fs::remove_file(&path);
                        let listener = tokio::net::UnixListener::bind(&path).unwrap();
                        ready_tx.send(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
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
        let addr = ready_rx.recv_timeout(Duration::from_secs(20)).expect("ADS server bound");
        AdsServer { addr, snapshot, stop: Some(stop), thread: Some(thread), sock: None }
    }

    /// Push a new snapshot to every stream (the RouteConfigurations served stay).
    pub fn push(&self, s: Snapshot) {
        let prev = self.snapshot.borrow().clone();
        let routes = prev.routes.to_vec();
        self.snapshot.send_replace(Arc::new(Served::next(Some(&prev), s, routes)));
    }

    /// Push a new snapshot and the RouteConfigurations served over RDS (by the names asked
    /// for, as istiod serves them).
    pub fn push_routes(&self, s: Snapshot, routes: Vec<rds::RouteConfiguration>) {
        let prev = self.snapshot.borrow().clone();
        self.snapshot.send_replace(Arc::new(Served::next(Some(&prev), s, routes)));
    }

    /// Push `s`, of which only the ClusterLoadAssignments named `changed` differ from what
    /// is served: a state-of-the-world stream gets one EDS response with those alone, as
    /// istiod pushes an endpoint change (Envoy keeps the assignments a response leaves out);
    /// a delta stream gets what changed, as always. Returns when the streams were handed
    /// it (after this server's own bookkeeping, which a benchmark does not count), with
    /// the snapshot served before: freeing a mesh's takes this process longer than the
    /// proxy takes to ACK, so a benchmark drops it after the ACK it times.
    pub fn push_endpoints(&self, s: Snapshot, changed: &[&str]) -> (std::time::Instant, Retired) {
        let prev = self.snapshot.borrow().clone();
        let mut next = Served::next(Some(&prev), s, prev.routes.to_vec());
        next.endpoints_only = Some(changed.iter().map(|n| n.to_string()).collect());
        let sent = std::time::Instant::now();
        let replaced = self.snapshot.send_replace(Arc::new(next));
        drop(prev);
        (sent, Retired(replaced))
    }

    /// Push `assignment` at snapshot `version` in place of the served assignment of its
    /// cluster, everything else unchanged, streams served as by [`AdsServer::push_endpoints`]
    /// with that one name. It costs this process what changed — no snapshot built, nothing
    /// compared — so a benchmark pushing beside its load measures the proxy, not itself.
    /// Panics when the assignment's cluster is not served.
    pub fn push_assignment(
        &self,
        version: &str,
        assignment: eds::ClusterLoadAssignment,
    ) -> (std::time::Instant, Retired) {
        let next = self.snapshot.borrow().patched(version, assignment);
        let sent = std::time::Instant::now();
        (sent, Retired(self.snapshot.send_replace(Arc::new(next))))
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

/// A snapshot no longer served, freed where its holder drops it.
pub struct Retired(#[allow(dead_code)] Arc<Served>);

impl Drop for AdsServer {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(path) = &self.sock {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Bind {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

struct Ads {
    snapshot: watch::Receiver<Arc<Served>>,
    requests: mpsc::Sender<DiscoveryRequest>,
    /// Set: delta is served (and state of the world is still, recording nothing).
    delta: Option<DeltaRecorder>,
}

/// Where a delta server records what it receives and sends.
#[derive(Clone)]
struct DeltaRecorder {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<DeltaDiscoveryResponse>,
}

/// What a delta server received and sent, in order.
pub struct DeltaLog {
    /// Every request received (subscriptions, ACKs, NACKs), on every stream.
    pub requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    /// Every response sent, on every stream.
    pub responses: mpsc::Receiver<DeltaDiscoveryResponse>,
}

impl DeltaLog {
    /// The next response of `type_url` the server sent, within 20 s.
    pub fn response(&self, type_url: &str) -> DeltaDiscoveryResponse {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let r = self.responses.recv_timeout(left).unwrap_or_else(|_| panic!("no {type_url} response"));
            if r.type_url == type_url {
                return r;
            }
        }
    }

    /// The next request matching `what`, within 20 s.
    pub fn request(
        &self,
        describe: &str,
        what: impl Fn(&DeltaDiscoveryRequest) -> bool,
    ) -> DeltaDiscoveryRequest {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let r = self.requests.recv_timeout(left).unwrap_or_else(|_| panic!("no request: {describe}"));
            if what(&r) {
                return r;
            }
        }
    }

    /// The next response of `type_url` and the client's reply to its nonce (ACK or NACK).
    pub fn reply(&self, type_url: &str) -> (DeltaDiscoveryResponse, DeltaDiscoveryRequest) {
        let response = self.response(type_url);
        let reply = self.request(&format!("the reply to {type_url} nonce {}", response.nonce), |r| {
            r.response_nonce == response.nonce
        });
        (response, reply)
    }
}

/// A snapshot as served, with each resource's version: the snapshot version that last
/// changed it (istiod's push versions), so that a push sends only what changed. Its lists
/// sit behind `Arc`s and each assignment behind its own, so that a push of one assignment
/// ([`AdsServer::push_assignment`]) shares everything else with the snapshot before it.
pub struct Served {
    /// The snapshot's version: every state-of-the-world response's `version_info`.
    version: String,
    clusters: Arc<Vec<cds::Cluster>>,
    listeners: Arc<Vec<lds::Listener>>,
    secrets: Arc<Vec<tls::Secret>>,
    /// RouteConfigurations served (RDS).
    routes: Arc<Vec<rds::RouteConfiguration>>,
    /// Each ClusterLoadAssignment with its version, in the snapshot's order.
    endpoints: Vec<Arc<Assignment>>,
    /// Cluster name -> position in `endpoints`; names and positions never change on a
    /// [`Served::patched`], so it is shared.
    endpoint_index: Arc<HashMap<String, usize>>,
    /// (type URL, name) -> version, of every type but ClusterLoadAssignments (which carry
    /// theirs).
    versions: Arc<Versions>,
    /// Set by [`AdsServer::push_endpoints`]: a state-of-the-world push sends only these
    /// ClusterLoadAssignments (istiod's incremental EDS push), no other type.
    endpoints_only: Option<Vec<String>>,
}

/// (type URL, name) -> the snapshot version that last changed that resource.
type Versions = HashMap<(&'static str, String), String>;

/// One ClusterLoadAssignment as served and the snapshot version that last changed it.
struct Assignment {
    version: String,
    cla: eds::ClusterLoadAssignment,
}

impl Served {
    /// `s` after `prev`: a resource equal to its previous one keeps its version (and an
    /// assignment its shared copy). Linear in the snapshot (a mesh of 50,000 services is
    /// served too).
    fn next(prev: Option<&Served>, s: Snapshot, routes: Vec<rds::RouteConfiguration>) -> Served {
        fn keep<M: PartialEq>(
            versions: &mut Versions,
            prev: Option<(&[M], &Versions)>,
            t: &'static str,
            now: &[M],
            name: fn(&M) -> &str,
            version: &str,
        ) {
            let before: HashMap<&str, &M> =
                prev.map(|(was, _)| was.iter().map(|x| (name(x), x)).collect()).unwrap_or_default();
            for m in now {
                let key = (t, name(m).to_string());
                let same =
                    prev.and_then(|(_, vs)| before.get(name(m)).filter(|x| **x == m).and(vs.get(&key)));
                versions.insert(key, same.cloned().unwrap_or_else(|| version.to_string()));
            }
        }
        let Snapshot { version, clusters, endpoints, listeners, secrets } = s;
        let v = version.as_str();
        let mut versions = HashMap::new();
        keep(
            &mut versions,
            prev.map(|p| (&p.clusters[..], &*p.versions)),
            CLUSTER,
            &clusters,
            |c| &c.name,
            v,
        );
        keep(
            &mut versions,
            prev.map(|p| (&p.listeners[..], &*p.versions)),
            LISTENER,
            &listeners,
            |l| &l.name,
            v,
        );
        keep(&mut versions, prev.map(|p| (&p.secrets[..], &*p.versions)), SECRET, &secrets, |x| &x.name, v);
        for r in &routes {
            let same = prev.and_then(|p| {
                p.routes.iter().find(|x| *x == r).and(p.versions.get(&(ROUTES, r.name.clone())))
            });
            versions.insert((ROUTES, r.name.clone()), same.cloned().unwrap_or_else(|| v.to_string()));
        }
        let before: HashMap<&str, &Arc<Assignment>> = prev
            .map(|p| p.endpoints.iter().map(|a| (a.cla.cluster_name.as_str(), a)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Assignment>> = endpoints
            .into_iter()
            .map(|cla| match before.get(cla.cluster_name.as_str()) {
                Some(a) if a.cla == cla => Arc::clone(a),
                _ => Arc::new(Assignment { version: v.to_string(), cla }),
            })
            .collect();
        let endpoint_index =
            endpoints.iter().enumerate().map(|(i, a)| (a.cla.cluster_name.clone(), i)).collect();
        Served {
            clusters: Arc::new(clusters),
            listeners: Arc::new(listeners),
            secrets: Arc::new(secrets),
            routes: Arc::new(routes),
            endpoints,
            endpoint_index: Arc::new(endpoint_index),
            versions: Arc::new(versions),
            endpoints_only: None,
            version,
        }
    }

    /// `self` at `version` with `cla` replacing the assignment of its cluster, everything
    /// else shared: a copy of one pointer per assignment, no resource compared or copied.
    /// Panics when `cla`'s cluster is not served (a bench's mistake, not a peer's).
    fn patched(&self, version: &str, cla: eds::ClusterLoadAssignment) -> Served {
        let at = *self
            .endpoint_index
            .get(&cla.cluster_name)
            .unwrap_or_else(|| panic!("push_assignment: {} is not served", cla.cluster_name));
        let name = cla.cluster_name.clone();
        let mut endpoints = self.endpoints.clone();
        endpoints[at] = Arc::new(Assignment { version: version.to_string(), cla });
        Served {
            version: version.to_string(),
            clusters: Arc::clone(&self.clusters),
            listeners: Arc::clone(&self.listeners),
            secrets: Arc::clone(&self.secrets),
            routes: Arc::clone(&self.routes),
            endpoints,
            endpoint_index: Arc::clone(&self.endpoint_index),
            versions: Arc::clone(&self.versions),
            endpoints_only: Some(vec![name]),
        }
    }

    /// The served assignment of cluster `name`.
    fn assignment(&self, name: &str) -> Option<&Assignment> {
        self.endpoint_index.get(name).and_then(|&i| self.endpoints.get(i)).map(|a| &**a)
    }

    /// The version of resource `name` of `type_url`.
    fn version(&self, type_url: &str, name: &str) -> String {
        if type_url == ENDPOINTS {
            return self.assignment(name).map(|a| a.version.clone()).unwrap_or_default();
        }
        // The key's type URL is one of the constants: find which, then one lookup.
        [CLUSTER, LISTENER, ROUTES, SECRET]
            .into_iter()
            .find(|t| *t == type_url)
            .and_then(|t| self.versions.get(&(t, name.to_string())))
            .cloned()
            .unwrap_or_default()
    }
}

/// Every resource of `type_url` in `s`, by name.
fn resources_of(served: &Served, type_url: &str) -> BTreeMap<String, Any> {
    match type_url {
        ROUTES => served.routes.iter().map(|r| (r.name.clone(), any(ROUTES, r))).collect(),
        CLUSTER => served.clusters.iter().map(|c| (c.name.clone(), any(CLUSTER, c))).collect(),
        LISTENER => served.listeners.iter().map(|l| (l.name.clone(), any(LISTENER, l))).collect(),
        ENDPOINTS => {
            served.endpoints.iter().map(|a| (a.cla.cluster_name.clone(), any(ENDPOINTS, &a.cla))).collect()
        }
        SECRET => served.secrets.iter().map(|c| (c.name.clone(), any(SECRET, c))).collect(),
        _ => BTreeMap::new(),
    }
}

/// One type's subscription on a delta stream and the versions the client holds.
#[derive(Default)]
struct Subscription {
    /// Wildcard (Clusters, Listeners), else `names`.
    wildcard: bool,
    names: std::collections::BTreeSet<String>,
    /// What the client holds: name -> version.
    held: HashMap<String, String>,
}

impl Subscription {
    /// The resources that changed since what the client holds, and the names gone; `held`
    /// becomes the snapshot's. After [`AdsServer::push_endpoints`] only the assignments it
    /// names are looked at (nothing else changed, nothing was removed).
    fn diff(&mut self, served: &Served, type_url: &str) -> (Vec<Resource>, Vec<String>) {
        let now: BTreeMap<String, Any> = match (&served.endpoints_only, type_url) {
            (Some(only), ENDPOINTS) => only
                .iter()
                .filter(|n| self.wildcard || self.names.contains(*n))
                .filter_map(|n| served.assignment(n).map(|a| (n.clone(), any(ENDPOINTS, &a.cla))))
                .collect(),
            _ => resources_of(served, type_url)
                .into_iter()
                .filter(|(n, _)| self.wildcard || self.names.contains(n))
                .collect(),
        };
        let mut changed = Vec::new();
        for (name, any) in &now {
            let version = served.version(type_url, name);
            if self.held.get(name) != Some(&version) {
                self.held.insert(name.clone(), version.clone());
                changed.push(Resource {
                    name: name.clone(),
                    version,
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        if served.endpoints_only.is_some() && type_url == ENDPOINTS {
            return (changed, Vec::new());
        }
        let mut removed: Vec<String> = self.held.keys().filter(|n| !now.contains_key(*n)).cloned().collect();
        removed.sort();
        for n in &removed {
            self.held.remove(n);
        }
        (changed, removed)
    }
}

fn response(served: &Served, type_url: &str, names: &[String], nonce: u64) -> DiscoveryResponse {
    let resources: Vec<Any> = match type_url {
        ROUTES => served.routes.iter().filter(|r| names.contains(&r.name)).map(|r| any(ROUTES, r)).collect(),
        CLUSTER => served.clusters.iter().map(|c| any(CLUSTER, c)).collect(),
        LISTENER => served.listeners.iter().map(|l| any(LISTENER, l)).collect(),
        SECRET => served.secrets.iter().filter(|c| names.contains(&c.name)).map(|c| any(SECRET, c)).collect(),
        _ => {
            let names: std::collections::HashSet<&String> = names.iter().collect();
            served
                .endpoints
                .iter()
                .filter(|a| names.contains(&a.cla.cluster_name))
                .map(|a| any(ENDPOINTS, &a.cla))
                .collect()
        }
    };
    DiscoveryResponse {
        version_info: served.version.clone(),
        resources,
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

/// The assignments named `names` alone (an incremental EDS push, as istiod sends one over
/// state of the world): looked up by name, not by a scan of every assignment served.
fn endpoints_response(served: &Served, names: &[String], nonce: u64) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: served.version.clone(),
        resources: names
            .iter()
            .filter_map(|n| served.assignment(n))
            .map(|a| any(ENDPOINTS, &a.cla))
            .collect(),
        type_url: ENDPOINTS.to_string(),
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
                        if let (Some(only), Some(names)) = (&s.endpoints_only, subscribed.get(ENDPOINTS)) {
                            let only: Vec<String> = only.iter().filter(|n| names.contains(n)).cloned().collect();
                            nonce += 1;
                            let _ = tx.send(Ok(endpoints_response(&s, &only, nonce))).await;
                            continue;
                        }
                        // istiod's order: clusters, endpoints, listeners, routes.
                        for t in [CLUSTER, ENDPOINTS, LISTENER, ROUTES, SECRET] {
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
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let Some(record) = self.delta.clone() else {
            return Err(tonic::Status::unimplemented("delta xDS"));
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut snapshot = self.snapshot.clone();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            let mut subscribed: HashMap<String, Subscription> = HashMap::new();
            // Send what changed of `type_url`; `always`: even nothing (a new subscription
            // is answered, as istiod answers it).
            let mut send =
                |subscribed: &mut HashMap<String, Subscription>, s: &Served, type_url: &str, always: bool| {
                    let sub = subscribed.get_mut(type_url)?;
                    let (resources, removed_resources) = sub.diff(s, type_url);
                    if resources.is_empty() && removed_resources.is_empty() && !always {
                        return None;
                    }
                    nonce += 1;
                    let r = DeltaDiscoveryResponse {
                        system_version_info: s.version.clone(),
                        resources,
                        type_url: type_url.to_string(),
                        removed_resources,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    let _ = record.responses.send(r.clone());
                    Some(r)
                };
            loop {
                let out: Vec<DeltaDiscoveryResponse> = tokio::select! {
                    r = inbound.message() => {
                        let Ok(Some(r)) = r else { break };
                        let _ = record.requests.send(r.clone());
                        let s = snapshot.borrow().clone();
                        let fresh = !subscribed.contains_key(&r.type_url);
                        let sub = subscribed.entry(r.type_url.clone()).or_default();
                        if fresh {
                            sub.wildcard = r.resource_names_subscribe.is_empty()
                                || r.resource_names_subscribe.iter().any(|n| n == "*");
                            sub.held = r.initial_resource_versions.clone();
                        }
                        let more = r.resource_names_subscribe.iter().any(|n| n != "*" && !sub.names.contains(n));
                        sub.names.extend(r.resource_names_subscribe.iter().filter(|n| *n != "*").cloned());
                        for n in &r.resource_names_unsubscribe {
                            sub.names.remove(n);
                            sub.held.remove(n);
                        }
                        if fresh || more {
                            send(&mut subscribed, &s, &r.type_url, fresh).into_iter().collect()
                        } else {
                            Vec::new()
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let s = snapshot.borrow_and_update().clone();
                        // istiod's order: clusters, endpoints, listeners, routes. After
                        // `push_endpoints` only assignments differ: the other types are not
                        // diffed (a mesh's take this task ~0.1 s, during which it would read
                        // no reply).
                        let types: &[&str] = if s.endpoints_only.is_some() {
                            &[ENDPOINTS]
                        } else {
                            &[CLUSTER, ENDPOINTS, LISTENER, ROUTES, SECRET]
                        };
                        types
                            .iter()
                            .filter_map(|t| send(&mut subscribed, &s, t, false))
                            .collect()
                    }
                };
                for r in out {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
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

pub const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const RAW_BUFFER: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

fn sds(name: &str) -> tls::SdsSecretConfig {
    // istiod's shape: the agent's SDS server over the `sds-grpc` cluster, ADS-style.
    let grpc = core::GrpcService {
        target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
            core::grpc_service::EnvoyGrpc { cluster_name: "sds-grpc".into(), ..Default::default() },
        )),
        ..Default::default()
    };
    tls::SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(core::ConfigSource {
            config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::ApiConfigSource(
                core::ApiConfigSource {
                    api_type: core::api_config_source::ApiType::Grpc as i32,
                    transport_api_version: core::ApiVersion::V3 as i32,
                    grpc_services: vec![grpc],
                    set_node_on_first_message_only: true,
                    ..Default::default()
                },
            )),
            resource_api_version: core::ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

/// A CommonTlsContext as istiod writes it for ISTIO_MUTUAL: the workload certificate
/// (`cert`, Istio: `default`) and root (`root`, Istio: `ROOTCA`) as SDS secrets, exact
/// SPIFFE SANs, ALPN.
pub fn common_tls(cert: &str, root: &str, sans: &[&str], alpn: &[&str]) -> tls::CommonTlsContext {
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
    #[allow(deprecated)] // istiod still writes the untyped matchers
    let validation = tls::CertificateValidationContext {
        match_subject_alt_names: sans
            .iter()
            .map(|s| StringMatcher {
                match_pattern: Some(MatchPattern::Exact(s.to_string())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    tls::CommonTlsContext {
        tls_params: Some(tls::TlsParameters {
            tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv12 as i32,
            tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(cert)],
        validation_context_type: Some(
            tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                tls::common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(validation),
                    validation_context_sds_secret_config: Some(sds(root)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

fn socket(name: &str, any: Any) -> Option<core::TransportSocket> {
    Some(core::TransportSocket {
        name: name.into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any)),
    })
}

fn raw_buffer() -> Option<core::TransportSocket> {
    socket("envoy.transport_sockets.raw_buffer", Any { type_url: RAW_BUFFER.into(), value: vec![] })
}

/// `cluster` (from [`eds_cluster`]) with istiod's auto-mTLS transport sockets: `tlsMode-istio`
/// speaks ISTIO_MUTUAL with `common` and SNI `outbound_.PORT_._.HOST`, `tlsMode-disabled`
/// plaintext.
pub fn istio_mutual(mut cluster: cds::Cluster, common: tls::CommonTlsContext) -> cds::Cluster {
    let mut parts = cluster.name.split('|');
    let (_, port, subset, host) = (parts.next(), parts.next(), parts.next(), parts.next());
    let sni = format!("outbound_.{}_.{}_.{}", port.unwrap_or(""), subset.unwrap_or(""), host.unwrap_or(""));
    let upstream = tls::UpstreamTlsContext { common_tls_context: Some(common), sni, ..Default::default() };
    cluster.transport_socket_matches[0].transport_socket =
        socket("envoy.transport_sockets.tls", any(UPSTREAM_TLS, &upstream));
    cluster.transport_socket_matches[1].transport_socket = raw_buffer();
    cluster
}

/// `cla` with endpoint `addr` as istiod writes a workload without a sidecar: no tlsMode.
pub fn without_sidecar(mut cla: eds::ClusterLoadAssignment, addr: SocketAddr) -> eds::ClusterLoadAssignment {
    for e in cla.endpoints.iter_mut().flat_map(|l| &mut l.lb_endpoints) {
        let at = match &e.host_identifier {
            Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.clone(),
            _ => None,
        };
        if at == Some(address(addr))
            && let Some(m) = &mut e.metadata
        {
            m.filter_metadata.remove("envoy.transport_socket_match");
        }
    }
    cla
}

/// A STATIC cluster with one endpoint, as istiod's `inbound|PORT||` to the local app.
pub fn static_cluster(name: &str, endpoint: SocketAddr) -> cds::Cluster {
    cds::Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(eds::ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![eds::LbEndpoint {
                    host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                        address: Some(address(endpoint)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An inbound listener shaped as istiod's virtualInbound chains for one TCP port `port`
/// (bound to `listen`; the caller sets `use_original_dst` to capture): a `tls_inspector`, a
/// chain for mTLS clients (transport `tls`, ALPN `istio-peer-exchange`/`istio`, a DownstreamTlsContext requiring a
/// client certificate, the metadata exchange), and, when `permissive`, a `raw_buffer`
/// chain for plaintext clients; both count istio_tcp_* and go to `cluster`.
pub fn virtual_inbound(
    name: &str,
    listen: SocketAddr,
    port: u16,
    cluster: &str,
    tls_ctx: tls::CommonTlsContext,
    permissive: bool,
) -> lds::Listener {
    let filter = |name: &str, any: Any| lds::Filter {
        name: name.to_string(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(any)),
    };
    let proxy = tcp::TcpProxy {
        stat_prefix: cluster.to_string(),
        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    let stats = || {
        filter(
            "istio.stats",
            Any { type_url: "type.googleapis.com/stats.PluginConfig".into(), value: vec![] },
        )
    };
    let tcp_proxy = || {
        filter(
            "envoy.filters.network.tcp_proxy",
            any("type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", &proxy),
        )
    };
    let exchange = filter(
        "istio.metadata_exchange",
        Any {
            type_url: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange".into(),
            value: vec![],
        },
    );
    let downstream = tls::DownstreamTlsContext {
        common_tls_context: Some(tls_ctx),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    let port_match = Some(UInt32Value { value: u32::from(port) });
    let mut chains = vec![lds::FilterChain {
        name: format!("0.0.0.0_{port}"),
        filter_chain_match: Some(lds::FilterChainMatch {
            destination_port: port_match,
            transport_protocol: "tls".into(),
            application_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            ..Default::default()
        }),
        filters: vec![exchange, stats(), tcp_proxy()],
        transport_socket: socket("envoy.transport_sockets.tls", any(DOWNSTREAM_TLS, &downstream)),
        ..Default::default()
    }];
    if permissive {
        chains.push(lds::FilterChain {
            name: format!("0.0.0.0_{port}-plaintext"),
            filter_chain_match: Some(lds::FilterChainMatch {
                destination_port: port_match,
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
            filters: vec![stats(), tcp_proxy()],
            ..Default::default()
        });
    }
    lds::Listener {
        name: name.to_string(),
        address: Some(address(listen)),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        listener_filters: vec![lds::ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(lds::listener_filter::ConfigType::TypedConfig(Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                        .into(),
                value: vec![],
            })),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    }
}

/// `common` with its secrets fetched over ADS (`sds_config: {ads: {}}`), for an Envoy fed by
/// this server rather than by Istio's agent.
pub fn secrets_over_ads(mut common: tls::CommonTlsContext) -> tls::CommonTlsContext {
    let ads = || {
        Some(core::ConfigSource {
            config_source_specifier: Some(
                core::config_source::ConfigSourceSpecifier::Ads(Default::default()),
            ),
            resource_api_version: core::ApiVersion::V3 as i32,
            ..Default::default()
        })
    };
    for s in &mut common.tls_certificate_sds_secret_configs {
        s.sds_config = ads();
    }
    if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
        &mut common.validation_context_type
        && let Some(s) = &mut c.validation_context_sds_secret_config
    {
        s.sds_config = ads();
    }
    common
}

/// The agent's two secrets, `default` (certificate chain and key) and `ROOTCA`, from files.
pub fn workload_secrets(cert_chain: &str, private_key: &str, root_cert: &str) -> Vec<tls::Secret> {
    let file = |p: &str| {
        Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::Filename(p.to_string())),
            ..Default::default()
        })
    };
    vec![
        tls::Secret {
            name: "default".into(),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: file(cert_chain),
                private_key: file(private_key),
                ..Default::default()
            })),
        },
        tls::Secret {
            name: "ROOTCA".into(),
            r#type: Some(tls::secret::Type::ValidationContext(tls::CertificateValidationContext {
                trusted_ca: file(root_cert),
                ..Default::default()
            })),
        },
    ]
}

/// `cluster` speaking TLS with `common` to every endpoint (its own `transport_socket`, as
/// istiod writes for a DestinationRule's explicit ISTIO_MUTUAL).
pub fn with_upstream_tls(mut cluster: cds::Cluster, common: tls::CommonTlsContext) -> cds::Cluster {
    let upstream = tls::UpstreamTlsContext { common_tls_context: Some(common), ..Default::default() };
    cluster.transport_socket = socket("envoy.transport_sockets.tls", any(UPSTREAM_TLS, &upstream));
    cluster
}

/// The next request of `type_url` whose version is `version` (an ACK or NACK of it), within
/// 20 s, the tests' `common::DEADLINE` (this file is also built into a bench, without `common`).
pub fn reply_to(
    requests: &mpsc::Receiver<DiscoveryRequest>,
    type_url: &str,
    version: &str,
) -> DiscoveryRequest {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let r = requests
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no reply to {type_url} version {version}"));
        if r.type_url == type_url
            && !r.response_nonce.is_empty()
            && (r.version_info == version || r.error_detail.is_some())
        {
            return r;
        }
    }
}
