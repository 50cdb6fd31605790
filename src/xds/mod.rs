//! The xDS client (SPEC §9): one Aggregated Discovery Service stream to istiod or any ADS
//! server, state of the world or delta (`xds.api`, a bootstrap's `api_type: DELTA_GRPC`), on its own thread with its own current-thread tokio runtime;
//! never on a worker. It subscribes to Clusters and Listeners (wildcard), to the EDS
//! clusters' ClusterLoadAssignments and to the RouteConfigurations HTTP chains name (RDS), translates each response (one module per resource kind:
//! `listener`, `cluster`, `endpoint`, `route`, their TLS contexts in `tls`, shared pieces in `proto`),
//! merges it beside the static config (`state`), and hands the result to `apply` (which checks
//! and publishes it to the workers). Each resource stands alone, as in Envoy: the valid ones
//! are applied, and a NACK names every invalid one and why while its last good version keeps
//! serving, also while the server is away. Secrets (SPEC §10) come from the bootstrap's SDS
//! server on a stream of their own (`Sds` below, decoding in `sds`), or over the ADS stream
//! when a context says `sds_config: ads`; what waits for one is served when it arrives.

pub mod cluster;
pub mod dns;
pub mod endpoint;
#[cfg(test)]
mod fixtures;
pub mod listener;
pub mod proto;
pub mod rbac;
pub mod route;
pub mod sds;
pub mod state;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, XdsAddress, XdsApi};
use proto::{CLUSTER, ENDPOINTS, LISTENER, ROUTES};
use state::{State, Type};

/// First wait before reconnecting; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between reconnects (Envoy's default for its gRPC mux is 30 s; a sidecar
/// whose istiod restarted should catch up within seconds).
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream that stayed up this long was healthy: the back-off starts over. One response is
/// not enough (a server that answers once and then fails must not be hammered).
const HEALTHY_STREAM: Duration = Duration::from_secs(30);
/// TCP keepalive on a TCP xDS connection, Istio's bootstrap values for `xds-grpc`: probes
/// after 300 s idle, every 75 s, 9 of them (no effect on a unix socket).
const TCP_KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(300), Duration::from_secs(75), 9);

/// `backoff` spread over its upper half, so sidecars that lost the same istiod do not
/// reconnect in step (no RNG crate: the clock's low bits are random enough for this).
fn jittered(backoff: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let half = backoff / 2;
    half + half.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

/// What the xDS client did, for `ringside_xds_*` metrics, `/ready` and `/config_dump`.
#[derive(Debug, Default)]
pub struct Status {
    /// ADS streams established.
    pub connects: AtomicU64,
    /// Responses applied (ACKed), by type (index into Cluster, Listener, ClusterLoadAssignment,
    /// RouteConfiguration).
    pub applied: [AtomicU64; 4],
    /// Responses NACKed, by type: one resource or more not applied (the valid ones are).
    pub rejected: [AtomicU64; 4],
    /// SDS responses applied and NACKed (SPEC §10), counted as type `Secret`.
    pub secrets: [AtomicU64; 2],
    /// The stream is up.
    pub connected: AtomicBool,
    /// Each type has arrived once, applied or not (Envoy's initial fetch).
    pub synced: AtomicBool,
    /// The generation published when it synced: `/ready` waits until every worker has
    /// bound its listeners.
    pub ready_generation: AtomicU64,
    /// Valid config that is not served, the resources rejected, and the last NACK, one line
    /// each.
    pub reports: ArcSwap<Vec<String>>,
}

impl Status {
    /// Prometheus text of the `ringside_xds_*` families.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        };
        counter(&mut out, "ringside_xds_connects_total", "ADS streams established with the xDS server.");
        out.push_str(&format!("ringside_xds_connects_total {}\n", self.connects.load(Ordering::Relaxed)));
        for (name, what, counts, secrets) in [
            (
                "ringside_xds_updates_applied_total",
                "xDS responses applied and ACKed, by resource type.",
                &self.applied,
                &self.secrets[0],
            ),
            (
                "ringside_xds_updates_rejected_total",
                "xDS responses NACKed (each invalid resource keeps its last good version; the valid ones are applied), by resource type.",
                &self.rejected,
                &self.secrets[1],
            ),
        ] {
            counter(&mut out, name, what);
            for (t, n) in Type::ALL.iter().zip(counts) {
                out.push_str(&format!("{name}{{type=\"{}\"}} {}\n", t.name(), n.load(Ordering::Relaxed)));
            }
            out.push_str(&format!("{name}{{type=\"Secret\"}} {}\n", secrets.load(Ordering::Relaxed)));
        }
        out.push_str("# HELP ringside_xds_connected Whether the ADS stream is up.\n# TYPE ringside_xds_connected gauge\n");
        out.push_str(&format!(
            "ringside_xds_connected {}\n",
            u8::from(self.connected.load(Ordering::Relaxed))
        ));
        out
    }
}

/// Checks and publishes a merged config, returning the generation published; `Err` says
/// why it cannot serve it, naming the resource to blame (`Listener/NAME: ...`).
pub type Apply = Box<dyn Fn(Config) -> Result<u64, String> + Send>;

/// Start the client thread for `base.xds`. `base` is the static config that xDS resources
/// are merged beside.
pub fn spawn(base: Config, apply: Apply, status: Arc<Status>) -> std::io::Result<()> {
    let Some(xds) = &base.xds else { return Ok(()) };
    let address = XdsAddress::parse(&xds.address).map_err(std::io::Error::other)?;
    let node = node(&base);
    let keepalive = (xds.keepalive_interval.0, xds.keepalive_timeout.0);
    let api = xds.api;
    let sds = match &xds.sds {
        Some(a) => Some(XdsAddress::parse(a).map_err(std::io::Error::other)?),
        None => None,
    };
    std::thread::Builder::new().name("ringside-xds".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("xds: cannot start its runtime: {e}");
                return;
            }
        };
        let (wanted, wanted_rx) = watch::channel(BTreeSet::new());
        let (arrived_tx, secret_arrived) = mpsc::unbounded_channel();
        if let Some(sds) = sds {
            let stream = Sds {
                address: sds,
                node: node.clone(),
                keepalive,
                wanted: wanted_rx,
                arrived: arrived_tx.clone(),
                status: Arc::clone(&status),
            };
            rt.spawn(stream.run());
        }
        let (dns_tx, dns_rx) = mpsc::unbounded_channel();
        let mut client = Client {
            address,
            node,
            keepalive,
            api,
            base,
            apply,
            status,
            state: State::default(),
            generation: 0,
            wanted,
            secret_arrived,
            _arrived: arrived_tx,
            ads_secrets: BTreeSet::new(),
            secret_version: String::new(),
            dns: None,
            dns_tx,
            dns_rx,
            dns_watched: BTreeMap::new(),
        };
        rt.block_on(client.run());
    })?;
    Ok(())
}

/// The node as Istio's agent sends it (SPEC §9): started from a bootstrap, its `node`
/// unchanged (SPEC §10); else id, cluster `<workload>.<namespace>`, and the metadata istiod
/// reads.
pub fn node(cfg: &Config) -> Node {
    if let Some(json) = cfg.xds.as_ref().and_then(|x| x.bootstrap_node.as_ref()) {
        return bootstrap_node(json);
    }
    let n = &cfg.node;
    let s = |v: &str| Value { kind: Some(Kind::StringValue(v.to_string())) };
    // The pod name is the third `~` field of a sidecar id (`POD.NAMESPACE`), as the agent
    // builds it; else the workload name.
    let pod =
        n.id.split('~')
            .nth(2)
            .and_then(|p| p.strip_suffix(&format!(".{}", n.namespace)))
            .unwrap_or(&n.workload_name);
    let labels = Struct { fields: n.labels.iter().map(|(k, v)| (k.clone(), s(v))).collect() };
    let mut fields: BTreeMap<&str, Value> = BTreeMap::new();
    fields.insert("NAMESPACE", s(&n.namespace));
    fields.insert("NAME", s(pod));
    fields.insert("WORKLOAD_NAME", s(&n.workload_name));
    fields.insert("LABELS", Value { kind: Some(Kind::StructValue(labels)) });
    fields.insert("CLUSTER_ID", s(&n.cluster_id));
    fields.insert("MESH_ID", s(&n.mesh_id));
    fields.insert("ISTIO_VERSION", s(&n.istio_version));
    fields.insert("SERVICE_ACCOUNT", s(&n.service_account));
    fields.insert("INTERCEPTION_MODE", s("REDIRECT"));
    let owner = crate::exchange::NodeMetadata::from(n).owner;
    if !owner.is_empty() {
        fields.insert("OWNER", s(&owner));
    }
    Node {
        id: n.id.clone(),
        cluster: format!("{}.{}", n.workload_name, n.namespace),
        metadata: Some(Struct { fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }),
        user_agent_name: "ringside".into(),
        ..Node::default()
    }
}

/// A bootstrap's `node` as the protobuf it stands for: id, cluster, locality, and metadata
/// with its JSON types kept (a number stays a number: istiod reads some as numbers).
fn bootstrap_node(json: &serde_json::Value) -> Node {
    use envoy_types::pb::envoy::config::core::v3::Locality;
    let text =
        |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
    let locality = json.get("locality").map(|l| Locality {
        region: text(l.get("region")),
        zone: text(l.get("zone")),
        sub_zone: text(l.get("sub_zone")),
    });
    let metadata = match json.get("metadata").map(to_value).and_then(|v| v.kind) {
        Some(Kind::StructValue(s)) => Some(s),
        _ => None,
    };
    Node {
        id: text(json.get("id")),
        cluster: text(json.get("cluster")),
        locality,
        metadata,
        user_agent_name: "ringside".into(),
        ..Node::default()
    }
}

/// JSON as a `google.protobuf.Value`, as protobuf's JSON mapping reads it.
fn to_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match json {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        J::Object(o) => {
            Kind::StructValue(Struct { fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() })
        }
    };
    Value { kind: Some(kind) }
}

struct Client {
    address: XdsAddress,
    node: Node,
    /// HTTP/2 keepalive: PING interval and how long its ACK may take.
    keepalive: (Duration, Duration),
    /// State of the world or delta.
    api: XdsApi,
    base: Config,
    apply: Apply,
    status: Arc<Status>,
    /// The last accepted resources: what serves while the server is away.
    state: State,
    /// The generation the last `apply` published.
    generation: u64,
    /// The SDS secrets the accepted resources name, for the SDS stream.
    wanted: watch::Sender<BTreeSet<String>>,
    /// A secret arrived for the first time: what waited for it can be served now.
    secret_arrived: mpsc::UnboundedReceiver<()>,
    /// Keeps `secret_arrived` open without an SDS stream (it then never fires).
    _arrived: mpsc::UnboundedSender<()>,
    /// The secrets to ask the ADS stream for (`sds_config: {ads: {}}`).
    ads_secrets: BTreeSet<String>,
    /// The version of the last Secret response on the ADS stream accepted whole.
    secret_version: String,
    /// The DNS clusters' resolver thread, started with the first DNS cluster.
    dns: Option<dns::Resolver>,
    /// Where the resolver sends its answers.
    dns_tx: mpsc::UnboundedSender<dns::Resolved>,
    dns_rx: mpsc::UnboundedReceiver<dns::Resolved>,
    /// What the resolver was last told to watch.
    dns_watched: BTreeMap<String, Arc<dns::Dns>>,
}

/// Why a stream ended.
type StreamError = String;

impl Client {
    async fn run(&mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let began = tokio::time::Instant::now();
            let (result, got_response) = match self.api {
                XdsApi::StateOfTheWorld => self.session().await,
                XdsApi::Delta => self.delta_session().await,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            if got_response && began.elapsed() >= HEALTHY_STREAM {
                backoff = BACKOFF_MIN;
            }
            let wait = jittered(backoff);
            match result {
                Ok(()) => log::warn!("xds: stream to {:?} closed by the server; reconnecting", self.address),
                Err(e) => log::warn!("xds: {e}; retrying in {} ms", wait.as_millis()),
            }
            // Secrets that arrive and DNS answers are served while the server is away.
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    _ = self.secret_arrived.recv() => self.republish(),
                    Some(r) = self.dns_rx.recv() => self.resolved(r),
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, StreamError> {
        channel(&self.address, self.keepalive).await
    }

    /// The next message of `stream`, serving what waited for a secret that arrives
    /// meanwhile (Envoy's warming ends when its secrets arrive, not at the next push) and
    /// publishing DNS answers as they come.
    async fn next<T>(&mut self, stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
        loop {
            tokio::select! {
                m = stream.message() => return m,
                _ = self.secret_arrived.recv() => self.republish(),
                Some(r) = self.dns_rx.recv() => self.resolved(r),
            }
        }
    }

    /// Publish the accepted resources again: a secret they waited for has arrived.
    fn republish(&mut self) {
        let published = self.state.merge(&self.base).map_err(|e| e.to_string()).and_then(|mut cfg| {
            cfg.validate("xds", "").map_err(|e| e.message)?;
            (self.apply)(cfg)
        });
        match published {
            Ok(generation) => self.generation = generation,
            Err(e) => log::warn!("xds: a secret arrived, but the config it completes cannot be served: {e}"),
        }
        self.check_synced();
    }

    /// Ask the SDS stream for the secrets the accepted resources name now, and note those
    /// to ask the ADS stream for.
    fn want_secrets(&mut self) {
        let names = self.state.secret_names(false);
        self.wanted.send_if_modified(|w| {
            let changed = *w != names;
            *w = names;
            changed
        });
        self.ads_secrets = self.state.secret_names(true);
    }

    /// Store the secrets of a response on the ADS stream; what waited for one that arrived
    /// is served at once. The NACK's error_detail, if any.
    fn handle_ads_secrets<'a>(
        &mut self,
        resources: impl Iterator<Item = &'a envoy_types::pb::google::protobuf::Any>,
        version: &str,
    ) -> Option<String> {
        let (error, first_arrival) = store_secrets(resources, version, &self.status);
        if first_arrival {
            self.republish();
        }
        error
    }

    /// A state-of-the-world Secret request (on the ADS stream, and on the SDS stream).
    fn secret_request(
        names: &BTreeSet<String>,
        version: &str,
        nonce: &str,
        error: Option<String>,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_string(),
            resource_names: names.iter().cloned().collect(),
            type_url: sds::SECRET.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(nack_status),
            ..DiscoveryRequest::default()
        }
    }

    /// Ready once each type has arrived and every secret the accepted resources name has
    /// (SPEC §10: `server.state` waits for the named secrets).
    fn check_synced(&self) {
        if self.status.synced.load(Ordering::Acquire) || !self.state.synced() {
            return;
        }
        if self.wanted.borrow().iter().any(|name| !sds::arrived(name))
            && self.base.xds.as_ref().is_some_and(|x| x.sds.is_some())
        {
            return;
        }
        if self.ads_secrets.iter().any(|name| !sds::arrived(name)) {
            return;
        }
        self.status.ready_generation.store(self.generation, Ordering::Release);
        self.status.synced.store(true, Ordering::Release);
    }
}

/// A gRPC channel to an xDS or SDS server (`HOST:PORT` or a unix socket), with HTTP/2 and
/// TCP keepalive.
async fn channel(
    address: &XdsAddress,
    keepalive: (Duration, Duration),
) -> Result<tonic::transport::Channel, StreamError> {
    use tonic::transport::Endpoint;
    let connect_timeout = Duration::from_secs(5);
    // HTTP/2 PINGs even while no request is in flight: a frozen peer (a dead path, a
    // stopped istiod) ends the stream within interval + timeout, and it is reopened.
    let keepalive = |e: Endpoint| {
        e.http2_keep_alive_interval(keepalive.0).keep_alive_timeout(keepalive.1).keep_alive_while_idle(true)
    };
    match address {
        XdsAddress::Tcp(hostport) => keepalive(
            Endpoint::from_shared(format!("http://{hostport}"))
                .map_err(|e| format!("xds address {hostport}: {e}"))?,
        )
        .tcp_keepalive(Some(TCP_KEEPALIVE.0))
        .tcp_keepalive_interval(Some(TCP_KEEPALIVE.1))
        .tcp_keepalive_retries(Some(TCP_KEEPALIVE.2))
        .connect_timeout(connect_timeout)
        .connect()
        .await
        .map_err(|e| format!("connect {hostport}: {e}")),
        XdsAddress::Unix(path) => {
            let path = path.clone();
            let shown = path.clone();
            keepalive(Endpoint::from_static("http://localhost"))
                .connect_timeout(connect_timeout)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| format!("connect unix:{shown}: {e}"))
        }
    }
}

impl Client {
    fn request(&self, type_url: &str, version: &str, nonce: &str, error: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_string(),
            // The node goes on a stream's first request only (`session`), as Istio's agent
            // sends it (`set_node_on_first_message_only`).
            node: None,
            resource_names: match type_url {
                ENDPOINTS => self.state.eds_names().to_vec(),
                ROUTES => self.state.rds_names(),
                _ => Vec::new(),
            },
            type_url: type_url.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(nack_status),
            ..DiscoveryRequest::default()
        }
    }

    /// One ADS stream: subscribe, then apply and ACK (or NACK) every response until it ends.
    /// Returns whether any response arrived (then the back-off starts over).
    async fn session(&mut self) -> (Result<(), StreamError>, bool) {
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => return (Err(e), false),
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::unbounded_channel();
        // On a reconnect, the versions held tell the server what we have (as Envoy does).
        let mut first = self.request(CLUSTER, self.state.version(Type::Cluster), "", None);
        first.node = Some(self.node.clone());
        let _ = tx.send(first);
        let _ = tx.send(self.request(LISTENER, self.state.version(Type::Listener), "", None));
        if !self.state.eds_names().is_empty() {
            let _ = tx.send(self.request(ENDPOINTS, self.state.version(Type::Endpoints), "", None));
        }
        if !self.state.rds_names().is_empty() {
            let _ = tx.send(self.request(ROUTES, self.state.version(Type::Routes), "", None));
        }
        let mut secret_names = self.ads_secrets.clone();
        if !secret_names.is_empty() {
            let _ = tx.send(Self::secret_request(&secret_names, &self.secret_version, "", None));
        }
        let mut secret_nonce = String::new();
        let mut stream = match client
            .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return (Err(format!("stream: {}", e.message())), false),
        };
        self.status.connects.fetch_add(1, Ordering::Relaxed);
        self.status.connected.store(true, Ordering::Relaxed);
        log::info!("xds: connected to {:?}", self.address);
        let mut eds_nonce = String::new();
        let mut rds_nonce = String::new();
        let mut got = false;
        loop {
            let response = match self.next(&mut stream).await {
                Ok(Some(r)) => r,
                Ok(None) => return (Ok(()), got),
                Err(e) => return (Err(format!("stream: {}", e.message())), got),
            };
            got = true;
            if response.type_url == sds::SECRET {
                let error = self.handle_ads_secrets(response.resources.iter(), &response.version_info);
                if error.is_none() {
                    self.secret_version.clone_from(&response.version_info);
                }
                secret_nonce.clone_from(&response.nonce);
                let _ =
                    tx.send(Self::secret_request(&secret_names, &self.secret_version, &secret_nonce, error));
                continue;
            }
            // Only Clusters change which ClusterLoadAssignments are needed, only Listeners
            // which RouteConfigurations.
            let clusters = response.type_url == CLUSTER;
            let listeners = response.type_url == LISTENER;
            let names_before = clusters.then(|| self.state.eds_names());
            let routes_before = if listeners { self.state.rds_names() } else { Vec::new() };
            let reply = self.handle(&response);
            if clusters {
                self.watch_dns();
            }
            if response.type_url == ENDPOINTS {
                eds_nonce = response.nonce.clone();
            }
            if response.type_url == ROUTES {
                rds_nonce = response.nonce.clone();
            }
            let _ = tx.send(reply);
            // Listeners changed which RouteConfigurations we need: ask for those (as Envoy's
            // RDS subscriptions follow the HTTP chains that name them).
            if listeners && self.state.rds_names() != routes_before {
                let _ = tx.send(self.request(ROUTES, self.state.version(Type::Routes), &rds_nonce, None));
            }
            // Clusters changed which ClusterLoadAssignments we need: ask for those.
            if names_before.is_some_and(|before| self.state.eds_names() != before) {
                let _ =
                    tx.send(self.request(ENDPOINTS, self.state.version(Type::Endpoints), &eds_nonce, None));
            }
            // Clusters or Listeners changed which secrets come over ADS: ask for those.
            if self.ads_secrets != secret_names {
                secret_names = self.ads_secrets.clone();
                let _ =
                    tx.send(Self::secret_request(&secret_names, &self.secret_version, &secret_nonce, None));
            }
        }
    }

    /// Tell the resolver which DNS clusters there are now (started with the first one).
    fn watch_dns(&mut self) {
        let clusters = self.state.dns_clusters();
        let same = clusters.len() == self.dns_watched.len()
            && clusters.iter().zip(&self.dns_watched).all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
        if same {
            return;
        }
        self.state.resolved.retain(|name, _| clusters.contains_key(name));
        if self.dns.is_none() {
            match dns::Resolver::spawn(self.dns_tx.clone()) {
                Ok(r) => self.dns = Some(r),
                Err(e) => {
                    log::error!(
                        "xds: cannot start the DNS resolver thread: {e}; DNS clusters stay without endpoints"
                    );
                    return;
                }
            }
        }
        if let Some(r) = &self.dns {
            r.watch(clusters.clone());
        }
        self.dns_watched = clusters;
    }

    /// A DNS cluster's new endpoints, published as an EDS update is.
    fn resolved(&mut self, r: dns::Resolved) {
        if !self.dns_watched.contains_key(&r.cluster) {
            return; // gone meanwhile
        }
        self.state.resolved.insert(r.cluster.clone(), Arc::new(r.endpoints));
        let published = self.state.merge(&self.base).map_err(|e| e.to_string()).and_then(|mut cfg| {
            cfg.validate("xds", "").map_err(|e| e.message)?;
            (self.apply)(cfg)
        });
        match published {
            Ok(g) => self.generation = g,
            Err(why) => log::warn!("xds: Cluster/{}: resolved addresses not applied: {why}", r.cluster),
        }
    }

    /// Apply one response, each resource on its own (`State::update`); the ACK, or the
    /// NACK naming every resource that was not applied.
    fn handle(&mut self, r: &DiscoveryResponse) -> DiscoveryRequest {
        let apply = &self.apply;
        let generation = &mut self.generation;
        let outcome = self.state.update(r, &self.base, &mut |cfg| apply(cfg).map(|g| *generation = g));
        let Some(t) = Type::of(&r.type_url) else {
            // Not subscribed: refuse it, naming the type.
            return self.request(&r.type_url, "", &r.nonce, outcome.error_detail());
        };
        self.record(t, &r.version_info, r.resources.len(), &outcome);
        let version = self.state.version(t).to_string();
        self.request(&r.type_url, &version, &r.nonce, outcome.error_detail())
    }

    /// What a response of type `t` did: counted, logged, reported, and readiness once each
    /// type has arrived.
    fn record(&mut self, t: Type, version: &str, resources: usize, outcome: &state::Outcome) {
        let type_name = t.name();
        let counts = if outcome.rejected.is_empty() { &self.status.applied } else { &self.status.rejected };
        counts[t as usize].fetch_add(1, Ordering::Relaxed);
        let before = self.status.reports.load();
        // Endpoints carry no reports of their own: an EDS response that rejects nothing, after
        // one that rejected nothing, leaves the lines as they were (no walk of the mesh).
        let quiet = t == Type::Endpoints
            && outcome.rejected.is_empty()
            && !before.iter().any(|l| {
                l.starts_with("rejected: ClusterLoadAssignment/")
                    || l.starts_with("last rejected: ClusterLoadAssignment")
            });
        match outcome.error_detail() {
            None => log::info!("xds: applied {type_name} version {version} ({resources} resources)"),
            Some(why) => log::warn!("xds: {type_name} version {version}: not applied: {why}"),
        }
        if !quiet {
            let mut reports = self.state.reports();
            if let Some(why) = outcome.error_detail() {
                reports.push(format!("last rejected: {type_name} version {version}: {why}"));
            }
            // Once each: a line already reported for an earlier version is not repeated.
            for line in reports.iter().filter(|l| !before.contains(l) && !l.starts_with("last rejected")) {
                log::info!("xds: {line}");
            }
            self.status.reports.store(Arc::new(reports));
        }
        if t != Type::Endpoints {
            self.want_secrets();
        }
        self.check_synced();
    }

    /// A delta request of `t` with the node left out (it goes on a stream's first only).
    fn delta_request(t: Type, nonce: &str, error: Option<String>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: t.url().to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(nack_status),
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// One delta ADS stream (`DeltaAggregatedResources`): Clusters and Listeners as wildcard
    /// subscriptions, ClusterLoadAssignments by the EDS clusters' names (subscribed and
    /// unsubscribed as Clusters change), every resource held announced with its version
    /// (`initial_resource_versions`) so that the server sends only what changed; then each
    /// response applied (upserts and `removed_resources`) and ACKed or NACKed by its nonce.
    /// Returns whether any response arrived.
    async fn delta_session(&mut self) -> (Result<(), StreamError>, bool) {
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => return (Err(e), false),
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::unbounded_channel();
        // Wildcard: no names on the first request of a type (the legacy wildcard, which
        // istiod and Envoy's servers read as such).
        let mut first = Self::delta_request(Type::Cluster, "", None);
        first.node = Some(self.node.clone());
        first.initial_resource_versions = self.state.resource_versions(Type::Cluster);
        let _ = tx.send(first);
        let mut listeners = Self::delta_request(Type::Listener, "", None);
        listeners.initial_resource_versions = self.state.resource_versions(Type::Listener);
        let _ = tx.send(listeners);
        let mut eds_subscribed: std::collections::BTreeSet<String> =
            self.state.eds_names().iter().cloned().collect();
        if !eds_subscribed.is_empty() {
            let mut eds = Self::delta_request(Type::Endpoints, "", None);
            eds.resource_names_subscribe = eds_subscribed.iter().cloned().collect();
            eds.initial_resource_versions = self.state.resource_versions(Type::Endpoints);
            let _ = tx.send(eds);
        }
        let mut rds_subscribed: std::collections::BTreeSet<String> =
            self.state.rds_names().into_iter().collect();
        if !rds_subscribed.is_empty() {
            let mut rds = Self::delta_request(Type::Routes, "", None);
            rds.resource_names_subscribe = rds_subscribed.iter().cloned().collect();
            rds.initial_resource_versions = self.state.resource_versions(Type::Routes);
            let _ = tx.send(rds);
        }
        let mut secrets_subscribed: BTreeSet<String> = BTreeSet::new();
        let subscribe_secrets = |subscribed: &mut BTreeSet<String>, wanted: &BTreeSet<String>| {
            let change = DeltaDiscoveryRequest {
                type_url: sds::SECRET.to_string(),
                resource_names_subscribe: wanted.difference(subscribed).cloned().collect(),
                resource_names_unsubscribe: subscribed.difference(wanted).cloned().collect(),
                ..DeltaDiscoveryRequest::default()
            };
            *subscribed = wanted.clone();
            change
        };
        if !self.ads_secrets.is_empty() {
            let _ = tx.send(subscribe_secrets(&mut secrets_subscribed, &self.ads_secrets));
        }
        let mut stream = match client
            .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return (Err(format!("delta stream: {}", e.message())), false),
        };
        self.status.connects.fetch_add(1, Ordering::Relaxed);
        self.status.connected.store(true, Ordering::Relaxed);
        log::info!("xds: connected to {:?} (delta)", self.address);
        let mut got = false;
        loop {
            let response = match self.next(&mut stream).await {
                Ok(Some(r)) => r,
                Ok(None) => return (Ok(()), got),
                Err(e) => return (Err(format!("delta stream: {}", e.message())), got),
            };
            got = true;
            if response.type_url == sds::SECRET {
                let bodies = response.resources.iter().filter_map(|r| r.resource.as_ref());
                let error = self.handle_ads_secrets(bodies, &response.system_version_info);
                let reply = DeltaDiscoveryRequest {
                    type_url: sds::SECRET.to_string(),
                    response_nonce: response.nonce.clone(),
                    error_detail: error.map(nack_status),
                    ..DeltaDiscoveryRequest::default()
                };
                let _ = tx.send(reply);
                continue;
            }
            let _ = tx.send(self.handle_delta(&response));
            if response.type_url == LISTENER {
                // Listeners changed which RouteConfigurations we need: subscribe to the new
                // names, unsubscribe from those gone (their routes are already forgotten).
                let names: std::collections::BTreeSet<String> = self.state.rds_names().into_iter().collect();
                if names != rds_subscribed {
                    let mut change = Self::delta_request(Type::Routes, "", None);
                    change.resource_names_subscribe = names.difference(&rds_subscribed).cloned().collect();
                    change.resource_names_unsubscribe = rds_subscribed.difference(&names).cloned().collect();
                    let _ = tx.send(change);
                    rds_subscribed = names;
                }
            }
            // Clusters or Listeners changed which secrets come over ADS: (un)subscribe.
            if self.ads_secrets != secrets_subscribed {
                let _ = tx.send(subscribe_secrets(&mut secrets_subscribed, &self.ads_secrets));
            }
            if response.type_url != CLUSTER {
                continue;
            }
            self.watch_dns();
            // Clusters changed which ClusterLoadAssignments we need: subscribe to the new
            // names, unsubscribe from those gone (their endpoints are already forgotten).
            let names: std::collections::BTreeSet<String> = self.state.eds_names().iter().cloned().collect();
            if names != eds_subscribed {
                let mut change = Self::delta_request(Type::Endpoints, "", None);
                change.resource_names_subscribe = names.difference(&eds_subscribed).cloned().collect();
                change.resource_names_unsubscribe = eds_subscribed.difference(&names).cloned().collect();
                let _ = tx.send(change);
                eds_subscribed = names;
            }
        }
    }

    /// Apply one delta response, each resource on its own (`State::update_delta`); the ACK
    /// of its nonce, or the NACK naming every resource that was not applied.
    fn handle_delta(&mut self, r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let apply = &self.apply;
        let generation = &mut self.generation;
        let outcome = self.state.update_delta(r, &self.base, &mut |cfg| apply(cfg).map(|g| *generation = g));
        let Some(t) = Type::of(&r.type_url) else {
            // Not subscribed: refuse it, naming the type.
            return DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                error_detail: outcome.error_detail().map(nack_status),
                ..DeltaDiscoveryRequest::default()
            };
        };
        self.record(t, &r.system_version_info, r.resources.len() + r.removed_resources.len(), &outcome);
        Self::delta_request(t, &r.nonce, outcome.error_detail())
    }
}

/// The SDS stream (SPEC §10): `SecretDiscoveryService.StreamSecrets`, state of the world, as
/// Istio's agent serves it on its unix socket. Asks for every secret the accepted TLS
/// contexts name (all of them on each request, as SotW does), stores each valid one where TLS
/// contexts read it (`tls::secrets`: new handshakes use a rotation at once, live connections
/// keep theirs), and ACKs, or NACKs naming each secret that does not parse (its previous
/// version stays). A response carries some of the names: the others are kept, as EDS's.
struct Sds {
    address: XdsAddress,
    node: Node,
    keepalive: (Duration, Duration),
    /// The names to ask for, from the ADS client.
    wanted: watch::Receiver<BTreeSet<String>>,
    /// Told when a secret arrives that had not before.
    arrived: mpsc::UnboundedSender<()>,
    status: Arc<Status>,
}

impl Sds {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        // The version last accepted whole, told to the server on a new stream.
        let mut version = String::new();
        loop {
            // Nothing to ask for yet: no stream (Envoy opens one per secret it needs).
            if self.wanted.wait_for(|w| !w.is_empty()).await.is_err() {
                return;
            }
            let began = tokio::time::Instant::now();
            let (result, got) = self.session(&mut version).await;
            if got && began.elapsed() >= HEALTHY_STREAM {
                backoff = BACKOFF_MIN;
            }
            let wait = jittered(backoff);
            match result {
                Ok(()) => log::warn!("sds: stream to {:?} closed by the server; reconnecting", self.address),
                Err(e) => log::warn!("sds: {e}; retrying in {} ms", wait.as_millis()),
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream; returns whether a response arrived.
    async fn session(&mut self, version: &mut String) -> (Result<(), StreamError>, bool) {
        let channel = match channel(&self.address, self.keepalive).await {
            Ok(c) => c,
            Err(e) => return (Err(e), false),
        };
        let mut client = SecretDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut names = self.wanted.borrow_and_update().clone();
        // The node on the first request only, as the agent's SDS server expects.
        let mut first = Client::secret_request(&names, version, "", None);
        first.node = Some(self.node.clone());
        let _ = tx.send(first);
        let mut stream =
            match client.stream_secrets(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(e) => return (Err(format!("stream: {}", e.message())), false),
            };
        log::info!("sds: connected to {:?}", self.address);
        let mut nonce = String::new();
        let mut got = false;
        loop {
            let response = tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(r)) => r,
                    Ok(None) => return (Ok(()), got),
                    Err(e) => return (Err(format!("stream: {}", e.message())), got),
                },
                changed = self.wanted.changed() => {
                    if changed.is_err() {
                        return (Ok(()), got);
                    }
                    names = self.wanted.borrow_and_update().clone();
                    let _ = tx.send(Client::secret_request(&names, version, &nonce, None));
                    continue;
                }
            };
            got = true;
            nonce.clone_from(&response.nonce);
            let error = self.apply(&response);
            if error.is_none() {
                version.clone_from(&response.version_info);
            }
            let _ = tx.send(Client::secret_request(&names, version, &nonce, error));
        }
    }

    /// Store each valid secret of `r`; the NACK's error_detail naming each invalid one.
    fn apply(&self, r: &DiscoveryResponse) -> Option<String> {
        if r.type_url != sds::SECRET {
            return Some(format!("type {:?} is not subscribed on the SDS stream", r.type_url));
        }
        let (error, first_arrival) = store_secrets(r.resources.iter(), &r.version_info, &self.status);
        if first_arrival {
            let _ = self.arrived.send(());
        }
        error
    }
}

/// Store each valid secret of a response (SDS's, or ADS's for istiod's `credentialName`),
/// counted as type `Secret`. Returns the NACK's error_detail naming each invalid one, and
/// whether a secret arrived that had not before (what waited for it can be served).
fn store_secrets<'a>(
    resources: impl Iterator<Item = &'a envoy_types::pb::google::protobuf::Any>,
    version: &str,
    status: &Status,
) -> (Option<String>, bool) {
    let mut rejected = Vec::new();
    let mut first_arrival = false;
    for (i, any) in resources.enumerate() {
        match sds::secret(any, i) {
            Ok(d) => {
                first_arrival |= !sds::arrived(&d.name);
                log::info!("sds: secret {} version {version}", d.name);
                sds::store(d);
            }
            Err(e) => rejected.push(e.to_string()),
        }
    }
    let i = usize::from(!rejected.is_empty());
    status.secrets[i].fetch_add(1, Ordering::Relaxed);
    let error = (!rejected.is_empty()).then(|| {
        let why = rejected.join("; ");
        log::warn!("sds: version {version}: not applied: {why}");
        why
    });
    (error, first_arrival)
}

/// The status a NACK carries: 3 (INVALID_ARGUMENT), as Envoy's NACKs, with every reason.
fn nack_status(message: String) -> RpcStatus {
    RpcStatus { code: 3, message, details: Vec::new() }
}
