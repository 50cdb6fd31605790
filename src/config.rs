//! The YAML configuration model (SPEC §4): keys, defaults, durations and sizes, and
//! `validate()`. Pure: no sockets, no runtime. Errors name the file, the line when there is
//! one, and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A configuration error: where (file and line, when known) and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", location(.file, .line))]
pub struct Error {
    /// The file the error is in, empty for flags.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong, as a lowercase fragment naming the key.
    pub message: String,
}

fn location(file: &str, line: &Option<usize>) -> String {
    match (file.is_empty(), line) {
        (true, _) => String::new(),
        (false, Some(l)) => format!("{file}:{l}: "),
        (false, None) => format!("{file}: "),
    }
}

impl Error {
    /// An error in flags or in an unnamed source.
    pub fn msg(message: impl Into<String>) -> Self {
        Error { file: String::new(), line: None, message: message.into() }
    }
}

/// The whole configuration, as in SPEC §4 (unknown keys are errors).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The local node's identity.
    #[serde(default)]
    pub node: Node,
    /// Worker threads; default the CPUs this process may use (`cpus::plan`, SPEC §1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Whether workers are pinned to CPUs of the affinity mask (SPEC §1).
    #[serde(default)]
    pub pin: Pin,
    /// Event-loop driver.
    #[serde(default)]
    pub driver: Driver,
    /// How long live connections may finish after SIGTERM.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// Keep polling for events this long after the last read instead of sleeping (0s: off),
    /// like HAProxy's `busy-polling`: trades CPU for the wake-up latency of an idle core.
    #[serde(default = "default_busy_poll")]
    pub busy_poll: Dur,
    /// Metrics listener and reporting.
    #[serde(default)]
    pub metrics: Metrics,
    /// Admin listener.
    #[serde(default)]
    pub admin: Admin,
    /// Kubernetes health listener.
    #[serde(default)]
    pub health: Health,
    /// Proxy listeners.
    #[serde(default)]
    pub listeners: Vec<Arc<Listener>>,
    /// Upstream clusters, each behind an `Arc`, in shared chunks: consecutive xDS
    /// generations share every cluster that did not change, and the derived state keyed by
    /// it, and an endpoint change copies one chunk of pointers, not all (SPEC §11).
    #[serde(default)]
    pub clusters: crate::chunks::Chunks<Arc<Cluster>>,
    /// Weighted routes for `service:` listeners by host and port, as VirtualService `tcp:`
    /// routes (SPEC §6); `--istio` fills it from VirtualServices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_routes: Vec<ServiceRoute>,
    /// Listeners, clusters and endpoints from an Aggregated Discovery Service (SPEC §9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xds: Option<Xds>,
    /// Started with Envoy's command line: the arguments, for `/server_info` (SPEC §10).
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub command_line: Vec<String>,
}

/// `xds:` section (SPEC §9).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Xds {
    /// The ADS server: `HOST:PORT` or `unix:PATH`.
    pub address: String,
    /// The workload certificate files that the SDS secrets `default` (certificate and key)
    /// and `ROOTCA` (mesh root) named in xDS TLS contexts stand for: what Istio's agent
    /// writes with file-mounted or output certificates (SPEC §7, §9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificateFiles>,
    /// Started from an Envoy bootstrap: its `node`, sent to the server unchanged (metadata
    /// with its JSON types) instead of one built from `node:` (SPEC §10).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub bootstrap_node: Option<serde_json::Value>,
    /// The variant the server is spoken to in: `api: state_of_the_world | delta` (a
    /// bootstrap's `ads_config.api_type` `GRPC` or `DELTA_GRPC`).
    #[serde(default)]
    pub api: XdsApi,
    /// HTTP/2 keepalive on the ADS stream: a PING this often (ztunnel's 30 s)...
    #[serde(default = "default_keepalive_interval")]
    pub keepalive_interval: Dur,
    /// ...and the stream given up when its ACK takes longer than this (10 s): a silent dead
    /// path is noticed and the stream reopened.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Dur,
    /// Started from an Envoy bootstrap: the SDS server (its `sds-grpc` cluster), `HOST:PORT`
    /// or `unix:PATH`.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub sds: Option<String>,
}

fn default_keepalive_interval() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_keepalive_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

/// Which of ADS's two variants (SPEC §9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XdsApi {
    /// State of the world (`GRPC`).
    #[default]
    StateOfTheWorld,
    /// Incremental (`DELTA_GRPC`).
    Delta,
}

impl Default for Xds {
    fn default() -> Self {
        Xds {
            address: String::new(),
            certificates: None,
            keepalive_interval: default_keepalive_interval(),
            keepalive_timeout: default_keepalive_timeout(),
            bootstrap_node: None,
            api: XdsApi::default(),
            sds: None,
        }
    }
}

/// The PEM files of a workload identity (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert_chain: String,
    /// PEM private key.
    pub private_key: String,
    /// PEM mesh root.
    pub root_cert: String,
}

/// The SDS secret names an xDS TLS context gave (SPEC §9), shown in `/config_dump` beside
/// the files they resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// `tls_certificate_sds_secret_configs[0].name` (Istio: `default`).
    pub certificate: String,
    /// `validation_context_sds_secret_config.name` (Istio: `ROOTCA`).
    pub validation: String,
    /// Those of the two whose `sds_config` is `ads`: fetched over the ADS stream from the
    /// control plane (istiod serves a DestinationRule's `credentialName` so), not from the
    /// agent's SDS server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub over_ads: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: Node::default(),
            workers: None,
            pin: Pin::default(),
            driver: Driver::default(),
            drain_timeout: default_drain_timeout(),
            busy_poll: default_busy_poll(),
            metrics: Metrics::default(),
            admin: Admin::default(),
            health: Health::default(),
            listeners: Vec::new(),
            clusters: Default::default(),
            service_routes: Vec::new(),
            xds: None,
            command_line: Vec::new(),
        }
    }
}

/// The local node identity written into the preamble and used for the local metric labels.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Node id; default `sidecar~127.0.0.1~<workload>.<ns>~<ns>.svc.cluster.local`.
    #[serde(default)]
    pub id: String,
    /// Workload (deployment) name.
    #[serde(default)]
    pub workload_name: String,
    /// Kubernetes namespace; default `default`.
    #[serde(default)]
    pub namespace: String,
    /// Pod labels (app, version, canonical name and revision, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Cluster id; default `Kubernetes`.
    #[serde(default)]
    pub cluster_id: String,
    /// Mesh id.
    #[serde(default)]
    pub mesh_id: String,
    /// Kubernetes service account.
    #[serde(default)]
    pub service_account: String,
    /// Istio version to announce.
    #[serde(default)]
    pub istio_version: String,
}

impl From<&Node> for crate::exchange::NodeMetadata {
    /// The identity written into the preamble; OWNER is the workload's Deployment, as
    /// Istio's injector writes it (SPEC §2).
    fn from(n: &Node) -> Self {
        let owner = if n.workload_name.is_empty() {
            String::new()
        } else {
            format!("kubernetes://apis/apps/v1/namespaces/{}/deployments/{}", n.namespace, n.workload_name)
        };
        crate::exchange::NodeMetadata {
            id: n.id.clone(),
            name: n.workload_name.clone(),
            namespace: n.namespace.clone(),
            owner,
            workload_name: n.workload_name.clone(),
            cluster_id: n.cluster_id.clone(),
            mesh_id: n.mesh_id.clone(),
            service_account: n.service_account.clone(),
            istio_version: n.istio_version.clone(),
            labels: n.labels.clone(),
            overlong_values: 0,
        }
    }
}

/// Which event-loop driver the workers run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// io_uring, falling back to epoll when io_uring cannot be set up.
    #[default]
    Auto,
    /// io_uring only.
    Uring,
    /// epoll (monoio's legacy driver) only.
    Epoll,
}

/// Whether worker i is pinned to the i-th CPU of the process's affinity mask (SPEC §1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Only when the mask holds exactly `workers` CPUs (CPUs given to this process alone).
    #[default]
    Auto,
    /// Always, wrapping around the mask when there are more workers than CPUs.
    Always,
    /// Never: the kernel schedules the workers.
    Never,
}

/// `metrics:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where `/stats/prometheus` is served; `off` disables it.
    #[serde(default = "default_metrics_listen")]
    pub listen: Bind,
    /// How often live connections report byte deltas.
    #[serde(default = "default_reporting")]
    pub tcp_reporting_duration: Dur,
    /// Cap on distinct label sets.
    #[serde(default = "default_max_label_sets")]
    pub max_label_sets: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: default_metrics_listen(),
            tcp_reporting_duration: default_reporting(),
            max_label_sets: default_max_label_sets(),
        }
    }
}

/// `admin:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Admin address; `off` disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: Bind,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: default_admin_listen() }
    }
}

/// `health:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Health address; `off` disables it.
    #[serde(default = "default_health_listen")]
    pub listen: Bind,
    /// Started from an Istio bootstrap: `/healthz/ready` is asked of Istio's agent at this
    /// address (its `agent` cluster, 127.0.0.1:15020) and its answer returned, as Envoy's
    /// static listener routes it (SPEC §10).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub forward: Option<SocketAddr>,
}

impl Default for Health {
    fn default() -> Self {
        Health { listen: default_health_listen(), forward: None }
    }
}

/// Reporter side of a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// reporter=source.
    Outbound,
    /// reporter=destination.
    Inbound,
}

impl From<Direction> for crate::metrics::Reporter {
    /// Outbound listeners report as the source, inbound ones as the destination (SPEC §3).
    fn from(d: Direction) -> Self {
        match d {
            Direction::Outbound => crate::metrics::Reporter::Source,
            Direction::Inbound => crate::metrics::Reporter::Destination,
        }
    }
}

/// When the peer exchange runs on a listener (SPEC §2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerExchange {
    /// Only when TLS negotiated ALPN `istio-peer-exchange` (Istio's behaviour, the default).
    #[default]
    Alpn,
    /// Plaintext mesh: outbound always writes, inbound sniffs.
    Always,
    /// Never.
    Off,
}

/// Transparent capture mode of a listener (SPEC §8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// A plain listener.
    #[default]
    None,
    /// Redirected outbound traffic.
    Outbound,
    /// Redirected inbound traffic.
    Inbound,
}

/// One proxy listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Address to bind on every worker (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// outbound (reporter=source) or inbound (reporter=destination).
    pub direction: Direction,
    /// Peer exchange mode.
    #[serde(default)]
    pub peer_exchange: PeerExchange,
    /// Route everything to this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Weighted routes, as a VirtualService `tcp:` route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_routes: Option<Vec<TcpRoute>>,
    /// Route as the VirtualService tcp routes for this host say, else to its cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Transparent capture.
    #[serde(default)]
    pub capture: Capture,
    /// Connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// Server-side TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Whether its connections are counted in istio_tcp_* (an xDS listener only when its
    /// filter chain has `istio.stats`, SPEC §9).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub istio_stats: bool,
    /// Where it came from (`xds Listener/NAME version V`), for xDS listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Filter chains chosen per connection by its destination (an xDS listener's
    /// `filter_chain_match`, SPEC §9); when present they replace `cluster`/`tcp_routes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_chains: Vec<FilterChain>,
    /// One access log line per connection when it ends (SPEC §9); a chain's own logs, where
    /// it has any, take its connections instead (xDS: the listener's are for connections no
    /// chain takes, as Envoy's listener-level `access_log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<std::sync::Arc<AccessLog>>,
    /// `hbone`: an HBONE terminator (SPEC §12): each HTTP/2 CONNECT stream inside its mTLS is
    /// relayed to the stream's `:authority`, with no cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<ListenerTunnel>,
}

impl Listener {
    /// Every connection it serves starts with a TLS ClientHello: `tls` strict, or xDS filter
    /// chains that all terminate TLS (a plaintext client matches none).
    pub fn tls_only(&self) -> bool {
        match &self.tls {
            Some(tls) => tls.mode == ListenerTlsMode::Strict,
            None => !self.filter_chains.is_empty() && self.filter_chains.iter().all(|c| c.tls.is_some()),
        }
    }
}

/// What tunnel a listener terminates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTunnel {
    /// Istio ambient's HBONE: HTTP/2 CONNECT inside mutual TLS 1.3 (SPEC §12).
    Hbone,
}

/// An access log (SPEC §9): where lines go and in which format.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// The file lines are appended to (`/dev/stdout` in a pod).
    pub path: String,
    /// Envoy's text format with command operators; Istio's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A JSON object per line instead: each key's value is a format (Envoy's `json_format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_format: Option<BTreeMap<String, String>>,
    /// xDS `response_flag_filter`: only connections ending with one of these flags (any flag
    /// when empty) are logged.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub only_flags: Option<Vec<String>>,
}

impl AccessLog {
    /// Whether a connection that ended with `response_flags` is logged.
    pub fn takes(&self, response_flags: &str) -> bool {
        match &self.only_flags {
            None => true,
            Some(flags) if flags.is_empty() => response_flags != "-",
            Some(flags) => response_flags.split(',').any(|f| flags.iter().any(|x| x == f)),
        }
    }
}

/// One filter chain of a listener: which connections it takes, and where they go.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterChain {
    /// Name (or `filter chain N`), for logs and `/config_dump`.
    pub name: String,
    /// Destination port it takes; any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    /// Destination address ranges it takes (`10.0.0.0/8`); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_ranges: Vec<Cidr>,
    /// `raw_buffer` or `tls`; any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_protocol: Option<String>,
    /// ALPN protocols it takes (only over TLS); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub application_protocols: Vec<String>,
    /// TLS server names (SNI) it takes: exact, or `*.suffix`; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    /// Where the client is: `any` (default), `local` (same IP as the destination, or
    /// loopback: Envoy's SAME_IP_OR_LOOPBACK) or `external`.
    #[serde(default, skip_serializing_if = "SourceType::is_any")]
    pub source_type: SourceType,
    /// The client's address ranges it takes; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_prefix_ranges: Vec<Cidr>,
    /// The client's address ranges it takes, as the socket sees it (Envoy's
    /// `direct_source_prefix_ranges`: the same as the source at L4); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub direct_source_prefix_ranges: Vec<Cidr>,
    /// The client's ports it takes; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ports: Vec<u16>,
    /// Route everything to this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Weighted routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_routes: Option<Vec<TcpRoute>>,
    /// Whether its connections are counted in istio_tcp_* (`istio.stats`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub istio_stats: bool,
    /// Envoy's `default_filter_chain`: taken only when no other chain matches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// Why it serves no connection (an HTTP chain): its connections close with `NR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_served: Option<String>,
    /// xDS: its DownstreamTlsContext: connections that take it are TLS-terminated (SPEC §7,
    /// §9).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ChainTls>,
    /// xDS: the address of the listener not bound to its port (`bind_to_port: false`) it
    /// came from: it takes only the captured connections Envoy hands that listener (SPEC §8).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<SocketAddr>,
    /// xDS: the tcp_proxy's `max_connect_attempts` (Envoy's default 1); the listener's
    /// `limits.max_connect_attempts` when absent.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub max_connect_attempts: Option<u32>,
    /// xDS: its RBAC filters in chain order (`envoy.filters.network.rbac`, then the HTTP
    /// connection manager's `envoy.filters.http.rbac`), evaluated once per connection before
    /// anything is relayed; the first denial closes it (SPEC §9).
    #[serde(skip)]
    pub rbac: Vec<std::sync::Arc<crate::rbac::Filter>>,
    /// xDS: the RouteConfiguration its HTTP connection manager names over RDS
    /// (`route_config_name`); the merge takes its route from it (SPEC §9).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub rds: Option<String>,
    /// xDS: the listener filters of the listener it came from that read a connection's first
    /// bytes before its chain is chosen (SPEC §9); `None` (static config): both run.
    #[serde(skip)]
    pub inspectors: Option<std::sync::Arc<Inspectors>>,
    /// xDS: its tcp_proxy's (or HTTP connection manager's) file access logs (SPEC §9).
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub access_log: Vec<std::sync::Arc<AccessLog>>,
}

/// A listener's inspectors (Envoy's listener filters `tls_inspector` and `http_inspector`),
/// each with the destination ports its `filter_disabled` predicate takes out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspectors {
    /// `tls_inspector` runs (Envoy injects it where chains need it, so it is on unless
    /// disabled for the port).
    pub tls_disabled: Option<PortMatch>,
    /// `http_inspector` is configured.
    pub http: bool,
    /// The ports `http_inspector` is disabled on.
    pub http_disabled: Option<PortMatch>,
}

impl Default for Inspectors {
    fn default() -> Self {
        Inspectors { tls_disabled: None, http: true, http_disabled: None }
    }
}

impl Inspectors {
    /// Whether `tls_inspector` runs for a connection to `port`.
    pub fn tls(&self, port: u16) -> bool {
        !self.tls_disabled.as_ref().is_some_and(|m| m.matches(port))
    }

    /// Whether `http_inspector` runs for a connection to `port`.
    pub fn http(&self, port: u16) -> bool {
        self.http && !self.http_disabled.as_ref().is_some_and(|m| m.matches(port))
    }
}

/// Envoy's `ListenerFilterChainMatchPredicate` over the destination port (the only
/// connection property it reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port.
    Any,
    /// Ports in `[start, end)`.
    Range(u32, u32),
    /// Any of these.
    Or(Vec<PortMatch>),
    /// All of these.
    And(Vec<PortMatch>),
    /// Not this.
    Not(Box<PortMatch>),
}

impl PortMatch {
    /// Whether `port` matches.
    pub fn matches(&self, port: u16) -> bool {
        match self {
            PortMatch::Any => true,
            PortMatch::Range(start, end) => (*start..*end).contains(&u32::from(port)),
            PortMatch::Or(any) => any.iter().any(|m| m.matches(port)),
            PortMatch::And(all) => all.iter().all(|m| m.matches(port)),
            PortMatch::Not(m) => !m.matches(port),
        }
    }
}

/// A filter chain's `source_type` match (Envoy's `ConnectionSourceType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    /// Any client.
    #[default]
    Any,
    /// A client on the same IP as the destination, or on loopback.
    Local,
    /// Any other client.
    External,
}

impl SourceType {
    fn is_any(&self) -> bool {
        *self == SourceType::Any
    }
}

/// A filter chain's TLS server side, from an xDS DownstreamTlsContext.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChainTls {
    /// The SDS secrets it names.
    pub secrets: Secrets,
    /// The files they resolved to (`xds.certificates`, or a `file-cert:`/`file-root:` name).
    pub files: CertificateFiles,
    /// ALPN the server offers, in preference order (empty: Istio's `istio-peer-exchange`,
    /// `istio`); from xDS, the context's list then the protocols the chain matches on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// A client certificate signed by the mesh root is required (Istio's mTLS).
    pub require_client_certificate: bool,
    /// `match_subject_alt_names`: a client certificate's URI SANs must match one of these
    /// exactly...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// ...or start with one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_name_prefixes: Vec<String>,
    /// `tls_params.cipher_suites` (Envoy's names; empty: Envoy's default order, SPEC §7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
}

/// An address range, `ADDR/LEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len.min(32))).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len.min(128))).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Cidr, String> {
        let bad = || format!("bad address range {s:?}: want ADDR/LEN");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Cidr { addr, len })
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.addr, c.len)
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A weighted TCP route destination.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// Target cluster.
    pub cluster: String,
    /// Subset of that cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Relative weight.
    #[serde(default = "default_weight")]
    pub weight: i64,
}

/// The tcp routes of a host, as one VirtualService `tcp:` route with one `match.port`: a
/// `service:` listener for `host` whose port is `match_port` (or any port, when absent)
/// routes by `tcp_routes`. The first matching entry wins, in order.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRoute {
    /// Service host, e.g. `mongodb.default.svc.cluster.local`.
    pub host: String,
    /// The listener port this route applies to; any port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_port: Option<u16>,
    /// Weighted destinations.
    pub tcp_routes: Vec<TcpRoute>,
    /// Where it came from (`FILE: document N (VirtualService/NAME)`), for `--istio` routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Per-listener limits (SPEC §1).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Upstream connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Close a connection with no bytes either way for this long.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// Live connections across all workers; beyond it accept and close (`UO`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest preamble payload accepted.
    #[serde(default = "default_max_preamble")]
    pub max_preamble: Size,
    /// A preamble begun but not finished in this time closes the connection.
    #[serde(default = "default_exchange_timeout")]
    pub exchange_timeout: Dur,
    /// How long an inbound `always` listener waits for a client's first bytes once the
    /// upstream has spoken.
    #[serde(default = "default_sniff_timeout")]
    pub sniff_timeout: Dur,
    /// Endpoints tried per connection before it fails (`UF`), all within one
    /// `connect_timeout`: a black-holed cluster costs a client one timeout, not one per
    /// endpoint. xDS chains take theirs from the tcp_proxy (`max_connect_attempts`, default 1).
    #[serde(default = "default_max_connect_attempts")]
    pub max_connect_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_preamble: default_max_preamble(),
            exchange_timeout: default_exchange_timeout(),
            sniff_timeout: default_sniff_timeout(),
            max_connect_attempts: default_max_connect_attempts(),
        }
    }
}

/// Listener-side TLS (SPEC §7).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// strict | permissive.
    pub mode: ListenerTlsMode,
    /// PEM certificate chain.
    pub cert_chain: String,
    /// PEM private key.
    pub private_key: String,
    /// PEM mesh root.
    pub root_cert: String,
    /// Cipher suites by Envoy's (OpenSSL) names, in preference order (empty: Envoy's
    /// default order, SPEC §7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
}

/// Inbound mTLS mode, as Istio's PeerAuthentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTlsMode {
    /// Only mTLS: plaintext, a client without a certificate and other CAs are refused.
    Strict,
    /// mTLS and plaintext on the same port (the ClientHello is sniffed).
    Permissive,
}

/// Outbound TLS mode, as a DestinationRule's `tls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterTlsMode {
    /// Istio's mesh mTLS with the workload certificate.
    IstioMutual,
    /// xDS: a DestinationRule's `SIMPLE` origination: the server verified against the given
    /// CA, no client certificate.
    Simple,
    /// xDS: a DestinationRule's `MUTUAL` origination: as `Simple`, presenting the given
    /// client certificate.
    Mutual,
}

/// An upstream cluster.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Unique name.
    pub name: String,
    /// Service host (destination_service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Service namespace; derived from a `*.NS.svc.*` host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_namespace: Option<String>,
    /// The service port it serves (a ServiceEntry port): a `service:` listener on this port,
    /// and a VirtualService destination `port.number`, pick it among the host's clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
    /// Load balancer for the whole cluster.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Service addresses clients dial (`IP:port`), as a Kubernetes ClusterIP or a
    /// ServiceEntry's addresses and ports: an outbound capture routes a connection whose
    /// original destination is one of them (or one of the endpoints) here (SPEC §8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// Endpoints, shared with the xDS state they came from (held once, SPEC §11).
    pub endpoints: Arc<Vec<Endpoint>>,
    /// Label-selected subsets.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Client-side TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
    /// xDS `ORIGINAL_DST` (`lb_policy: CLUSTER_PROVIDED`, istiod's passthrough and inbound
    /// clusters): each connection's upstream is its own original destination, not an endpoint.
    #[serde(default, skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub original_dst: bool,
    /// xDS `upstream_bind_config.source_address`: upstream sockets bind this address before
    /// connecting (istiod's 127.0.0.6 for inbound clusters).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub bind_source: Option<std::net::IpAddr>,
    /// Where it came from (`FILE: document N (ServiceEntry/NAME)`), for `--istio` clusters.
    /// Such a cluster may have no endpoints (a selector matching no WorkloadEntry): its
    /// connections then fail with `UH`, as in Istio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Reach the endpoints through an HBONE tunnel (SPEC §12): a connection to `IP:port`
    /// dials `IP:tunnel.port` (mTLS with `tls`) and sends `CONNECT IP:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<ClusterTunnel>,
}

/// A cluster's tunnel: the protocol and the port it listens on at each endpoint's address.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTunnel {
    /// `hbone`.
    pub protocol: TunnelProtocol,
    /// The tunnel port at each endpoint's address; Istio's 15008 by default.
    #[serde(default = "default_hbone_port")]
    pub port: u16,
}

fn default_hbone_port() -> u16 {
    15008
}

/// A tunnel protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelProtocol {
    /// Istio ambient's HBONE (SPEC §12).
    Hbone,
}

/// Load-balancing policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// In turn.
    #[default]
    RoundRobin,
    /// Fewest live connections (this worker's view), ties in turn.
    LeastConnection,
    /// Uniformly random.
    Random,
}

/// One upstream endpoint.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Address.
    pub address: SocketAddr,
    /// Labels for subsets and for peer labels when there was no exchange.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Workload name (a WorkloadEntry's name): destination_workload and the last canonical
    /// fallback when there was no exchange (SPEC §3).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_name: String,
    /// Namespace of that workload (destination_workload_namespace without exchange).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Its Kubernetes service account.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
    /// Its cluster id (destination_cluster without exchange), from xDS endpoint metadata.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    /// Relative load-balancing weight (xDS `load_balancing_weight`); default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// xDS: its `filter_metadata["envoy.transport_socket_match"]` (Istio: `tlsMode: istio`
    /// on a workload with a sidecar), which picks its cluster's transport socket.
    #[serde(default, skip_deserializing, skip_serializing_if = "BTreeMap::is_empty")]
    pub transport_socket_match: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint with only an address.
    pub fn at(address: SocketAddr) -> Endpoint {
        Endpoint {
            address,
            labels: BTreeMap::new(),
            workload_name: String::new(),
            namespace: String::new(),
            service_account: String::new(),
            cluster_id: String::new(),
            weight: None,
            transport_socket_match: BTreeMap::new(),
        }
    }
}

/// A named subset of a cluster's endpoints.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    /// Name.
    pub name: String,
    /// Endpoints whose labels include all of these.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the cluster's load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// Cluster-side TLS (SPEC §7).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// istio_mutual.
    pub mode: ClusterTlsMode,
    /// PEM certificate chain.
    pub cert_chain: String,
    /// PEM private key.
    pub private_key: String,
    /// PEM mesh root.
    pub root_cert: String,
    /// Expected SPIFFE ids of the upstream.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Cipher suites by Envoy's (OpenSSL) names, in preference order (empty: Envoy's
    /// default order, SPEC §7); over xDS, `tls_params.cipher_suites`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
    /// xDS: SPIFFE id prefixes also accepted (Istio's trust domain aliases, `prefix` SAN
    /// matchers).
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_name_prefixes: Vec<String>,
    /// xDS: the SDS secrets its UpstreamTlsContext named (the files above are what they
    /// resolved to).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Secrets>,
    /// xDS: ALPN offered (empty: Istio's `istio-peer-exchange`, `istio`).
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// xDS: SNI sent (else the cluster's service host).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// xDS `transport_socket_matches`, in order: an endpoint takes the first whose criteria
    /// its `envoy.transport_socket_match` metadata hold (Istio: `tlsMode-istio` → TLS,
    /// `tlsMode-disabled` → plaintext).
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_matches: Vec<SocketMatch>,
    /// xDS: an endpoint no match takes is plaintext (the cluster's own `transport_socket`
    /// is not TLS). Static config: every endpoint speaks TLS.
    #[serde(default, skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub unmatched_plaintext: bool,
}

/// One xDS `transport_socket_matches` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketMatch {
    /// Its name (`tlsMode-istio`).
    pub name: String,
    /// Metadata an endpoint must hold (all of them; none: every endpoint).
    pub criteria: BTreeMap<String, String>,
    /// TLS (the cluster's context), else plaintext.
    pub tls: bool,
}

impl ListenerTls {
    /// Its three files.
    pub fn files(&self) -> CertificateFiles {
        CertificateFiles {
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone(),
            root_cert: self.root_cert.clone(),
        }
    }
}

impl ClusterTls {
    /// Its three files.
    pub fn files(&self) -> CertificateFiles {
        CertificateFiles {
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone(),
            root_cert: self.root_cert.clone(),
        }
    }

    /// Whether a connection to `endpoint` speaks TLS, as Envoy picks a transport socket per
    /// endpoint: the first match whose criteria the endpoint's metadata hold, else the
    /// cluster's own.
    pub fn applies_to(&self, endpoint: &Endpoint) -> bool {
        let holds = |m: &&SocketMatch| {
            m.criteria.iter().all(|(k, v)| endpoint.transport_socket_match.get(k) == Some(v))
        };
        self.endpoint_matches.iter().find(holds).map_or(!self.unmatched_plaintext, |m| m.tls)
    }
}

/// A listen address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind(pub Option<SocketAddr>);

impl std::str::FromStr for Bind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Bind(None));
        }
        s.parse().map(|a| Bind(Some(a))).map_err(|_| format!("bad address {s:?} (want IP:PORT or off)"))
    }
}

impl<'de> Deserialize<'de> for Bind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Bind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }
}

/// A duration written `15s`, `500ms`, `50us`, `1m` or `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad duration {s:?} (want e.g. 15s, 500ms, 50us, 1m, 1h)");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let us = match unit {
            "us" => Some(n),
            "ms" => n.checked_mul(1000),
            "s" => n.checked_mul(1_000_000),
            "m" => n.checked_mul(60_000_000),
            "h" => n.checked_mul(3_600_000_000),
            _ => None,
        }
        .ok_or_else(bad)?;
        Ok(Dur(Duration::from_micros(us)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        match us {
            _ if us.is_multiple_of(3_600_000_000) && us > 0 => write!(f, "{}h", us / 3_600_000_000),
            _ if us.is_multiple_of(60_000_000) && us > 0 => write!(f, "{}m", us / 60_000_000),
            _ if us.is_multiple_of(1_000_000) => write!(f, "{}s", us / 1_000_000),
            _ if us.is_multiple_of(1000) => write!(f, "{}ms", us / 1000),
            _ => write!(f, "{us}us"),
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A size written `64KiB`, `1MiB` or a byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub usize);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad size {s:?} (want e.g. 65536, 64KiB, 1MiB)");
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num.parse().map_err(|_| bad())?;
        let mult = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(Size).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => usize::try_from(n).map(Size).map_err(serde::de::Error::custom),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0 as u64)
    }
}

fn default_busy_poll() -> Dur {
    Dur(Duration::ZERO)
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_metrics_listen() -> Bind {
    Bind(Some(SocketAddr::from(([0, 0, 0, 0], 15090))))
}
fn default_admin_listen() -> Bind {
    Bind(Some(SocketAddr::from(([127, 0, 0, 1], 15000))))
}
fn default_health_listen() -> Bind {
    Bind(Some(SocketAddr::from(([0, 0, 0, 0], 15021))))
}
fn default_reporting() -> Dur {
    Dur(Duration::from_secs(15))
}
fn default_max_label_sets() -> usize {
    10_000
}
fn default_weight() -> i64 {
    100
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_preamble() -> Size {
    Size(64 << 10)
}
fn default_exchange_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_sniff_timeout() -> Dur {
    Dur(Duration::from_millis(20))
}

fn default_max_connect_attempts() -> u32 {
    3
}

impl Config {
    /// Parse YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| {
            let mut line = e.location().map(|l| l.line());
            // serde_yaml appends " at line L column C"; the line is already in front.
            let message = e.to_string();
            let message = match message.find(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            // Our own value errors (`bad duration "5 seconds"`) carry no useful position:
            // find the quoted value in the text instead.
            if let Some(value) = message.split('"').nth(1).filter(|_| message.starts_with("bad ")) {
                line = line_of(text, value).or(line);
            }
            Error { file: file.to_string(), line, message }
        })
    }

    /// What [`Config::validate`] checks of clusters `changed` (indices) alone, for a config
    /// that passed it but for those clusters' endpoints and TLS (an xDS endpoint change:
    /// their names, subsets and everything naming them are as validated; SPEC §11: a push
    /// costs what it changed).
    pub fn validate_clusters(&mut self, changed: &[usize], file: &str, text: &str) -> Result<(), Error> {
        self.fill_node_defaults();
        for c in changed.iter().filter_map(|&i| self.clusters.get(i)) {
            if let Some((needle, message)) = cluster_problem(c) {
                return Err(Error { file: file.to_string(), line: line_of(text, &needle), message });
            }
        }
        Ok(())
    }

    /// Fill derived defaults (node identity) and check what serde cannot: unique names and
    /// ports, references between listeners and clusters, weights, unsupported features.
    /// `text` is the YAML source, used only to find the line of an offending value.
    pub fn validate(&mut self, file: &str, text: &str) -> Result<(), Error> {
        let at = |needle: &str, message: String| Error {
            file: file.to_string(),
            line: line_of(text, needle),
            message,
        };
        self.fill_node_defaults();
        if self.workers == Some(0) {
            return Err(at("workers:", "workers: must be at least 1".into()));
        }
        if self.metrics.tcp_reporting_duration.0.is_zero() {
            return Err(at(
                "tcp_reporting_duration",
                "metrics.tcp_reporting_duration: must be positive".into(),
            ));
        }
        if self.busy_poll.0 > MAX_BUSY_POLL {
            return Err(at(
                "busy_poll",
                format!("busy_poll: at most {} (0s turns it off)", Dur(MAX_BUSY_POLL)),
            ));
        }
        if self.metrics.max_label_sets == 0 || self.metrics.max_label_sets > MAX_LABEL_SETS {
            return Err(at(
                "max_label_sets",
                format!("metrics.max_label_sets: must be between 1 and {MAX_LABEL_SETS}"),
            ));
        }
        if self.listeners.is_empty() && self.xds.is_none() {
            return Err(at("listeners", "listeners: at least one listener is needed (or xds:)".into()));
        }
        if let Some(x) = &self.xds {
            crate::config::XdsAddress::parse(&x.address)
                .map_err(|m| at("address", format!("xds.address: {m}")))?;
            for (key, d) in
                [("keepalive_interval", x.keepalive_interval), ("keepalive_timeout", x.keepalive_timeout)]
            {
                if d.0.is_zero() {
                    return Err(at(key, format!("xds.{key}: must be positive")));
                }
            }
        }
        // The metrics, admin and health listeners must not collide with each other.
        let services = [
            ("metrics", self.metrics.listen.0),
            ("admin", self.admin.listen.0),
            ("health", self.health.listen.0),
        ];
        for (i, (a_name, a)) in services.iter().enumerate() {
            for (b_name, b) in &services[i + 1..] {
                if let (Some(a), Some(b)) = (a, b)
                    && overlaps(*a, *b)
                {
                    return Err(at("listen", format!("{b_name}.listen {b}: overlaps {a_name}.listen {a}")));
                }
            }
        }
        let mut cluster_names = std::collections::HashSet::with_capacity(self.clusters.len());
        for c in &self.clusters {
            if !cluster_names.insert(c.name.as_str()) {
                return Err(at(
                    &format!("name: {}", c.name),
                    format!("clusters: duplicate cluster name {:?}", c.name),
                ));
            }
            if let Some((needle, message)) = cluster_problem(c) {
                return Err(at(&needle, message));
            }
        }
        let mut names = BTreeSet::new();
        let mut binds: Vec<SocketAddr> = Vec::new();
        for l in &self.listeners {
            let here = |m: String| at(&format!("name: {}", l.name), format!("listener {}: {m}", l.name));
            if l.name.is_empty() {
                return Err(at("listeners", "listeners: a listener needs a name".into()));
            }
            if !names.insert(l.name.as_str()) {
                return Err(here("duplicate listener name".into()));
            }
            let taken = binds.iter().chain(services.iter().filter_map(|(_, a)| a.as_ref()));
            if let Some(other) = taken.into_iter().find(|b| overlaps(l.listen, **b)) {
                return Err(here(format!(
                    "listen {}: address already used by another listener ({other})",
                    l.listen
                )));
            }
            binds.push(l.listen);
            let logs = l.access_log.iter().chain(l.filter_chains.iter().flat_map(|c| &c.access_log));
            for log in logs {
                crate::access_log::LogFormat::parse(log.format.as_deref(), log.json_format.as_ref())
                    .map_err(|e| here(e.to_string()))?;
                if log.path.is_empty() {
                    return Err(here("access_log: a path is needed".into()));
                }
            }
            let targets = [
                l.cluster.is_some(),
                l.tcp_routes.is_some(),
                l.service.is_some(),
                !l.filter_chains.is_empty(),
            ];
            if l.tunnel.is_some() {
                // A terminator relays each CONNECT to its `:authority` (SPEC §12).
                if targets.iter().any(|t| *t) || l.capture != Capture::None {
                    return Err(here("tunnel: hbone relays to each CONNECT's :authority: no cluster, tcp_routes, service, filter_chains or capture".into()));
                }
                if l.direction != Direction::Inbound {
                    return Err(here("tunnel: hbone needs direction: inbound".into()));
                }
                if l.tls.as_ref().map(|t| t.mode) != Some(ListenerTlsMode::Strict) {
                    return Err(here("tunnel: hbone needs tls: {mode: strict, ...}".into()));
                }
            }
            match targets.iter().filter(|t| **t).count() {
                0 if l.capture == Capture::None && l.tunnel.is_some() => {}
                0 if l.capture == Capture::None => {
                    return Err(here("needs one of cluster, tcp_routes, service".into()));
                }
                0 | 1 => {}
                _ => {
                    return Err(here(
                        "cluster, tcp_routes, service and filter_chains are mutually exclusive".into(),
                    ));
                }
            }
            if let Some(c) = &l.cluster
                && !cluster_names.contains(c.as_str())
            {
                return Err(at(
                    &format!("cluster: {c}"),
                    format!("listener {}: cluster {c:?} is not defined", l.name),
                ));
            }
            for chain in &l.filter_chains {
                // Named only when needed: a mesh's capture listener has 10,000 chains, checked
                // on every push (SPEC §11).
                let what = || format!("listener {} {}", l.name, chain.name);
                if let Some(c) = &chain.cluster
                    && !cluster_names.contains(c.as_str())
                {
                    return Err(at("", format!("{}: cluster {c:?} is not defined", what())));
                }
                if let Some(routes) = &chain.tcp_routes {
                    self.check_routes(routes, &|_: &str, m| at("", m), &what())?;
                }
            }
            if let Some(routes) = &l.tcp_routes {
                let needle = format!("name: {}", l.name);
                self.check_routes(
                    routes,
                    &|n: &str, m| at(if n.is_empty() { &needle } else { n }, m),
                    &format!("listener {}", l.name),
                )?;
            }
            match (l.capture, l.direction) {
                (Capture::None, _) => {}
                // Filter chains only say how a connection is counted (and TLS-terminated):
                // it still goes where its original destination says (SPEC §8, §9).
                (Capture::Outbound, Direction::Outbound) if targets[..3].iter().any(|t| *t) => {
                    return Err(here(
                        "capture: outbound routes by each connection's original destination; \
                         remove cluster, tcp_routes and service"
                            .into(),
                    ));
                }
                (Capture::Inbound, Direction::Inbound) if l.tcp_routes.is_some() => {
                    return Err(here(
                        "capture: inbound relays to the original destination port; tcp_routes \
                         cannot apply (cluster or service only name destination_service)"
                            .into(),
                    ));
                }
                (Capture::Outbound, Direction::Outbound) | (Capture::Inbound, Direction::Inbound) => {}
                (c, d) => {
                    return Err(here(format!(
                        "capture: {} needs direction: {} (not {})",
                        format!("{c:?}").to_lowercase(),
                        format!("{c:?}").to_lowercase(),
                        format!("{d:?}").to_lowercase()
                    )));
                }
            }
            if l.limits.max_connections == 0 {
                return Err(here("limits.max_connections: must be at least 1".into()));
            }
            if l.limits.max_connect_attempts == 0 {
                return Err(here("limits.max_connect_attempts: must be at least 1".into()));
            }
            for (key, d) in [
                ("connect_timeout", l.limits.connect_timeout),
                ("exchange_timeout", l.limits.exchange_timeout),
                ("idle_timeout", l.limits.idle_timeout),
            ] {
                if d.0.is_zero() {
                    return Err(here(format!("limits.{key}: must be positive")));
                }
            }
        }
        for r in &self.service_routes {
            let what = match &r.source {
                Some(source) => format!("{source}: service route {}", r.host),
                None => format!("service route {}", r.host),
            };
            if r.host.is_empty() {
                return Err(at("service_routes", "service_routes: a route needs a host".into()));
            }
            let needle = format!("host: {}", r.host);
            self.check_routes(
                &r.tcp_routes,
                &|n: &str, m| at(if n.is_empty() { &needle } else { n }, m),
                &what,
            )?;
        }
        Ok(())
    }

    /// Weighted destinations: at least one, every cluster and subset defined, no negative
    /// weight, not all zero (SPEC §6).
    fn check_routes(
        &self,
        routes: &[TcpRoute],
        at: &dyn Fn(&str, String) -> Error,
        what: &str,
    ) -> Result<(), Error> {
        if routes.is_empty() {
            return Err(at("", format!("{what}: tcp_routes: at least one route is needed")));
        }
        let mut total: i64 = 0;
        for r in routes {
            if r.weight < 0 {
                return Err(at("", format!("{what}: tcp_routes: negative weight {}", r.weight)));
            }
            total = total.saturating_add(r.weight);
            let Some(cluster) = self.clusters.iter().find(|c| c.name == r.cluster) else {
                return Err(at(
                    &format!("cluster: {}", r.cluster),
                    format!("{what}: tcp_routes: cluster {:?} is not defined", r.cluster),
                ));
            };
            if let Some(s) = &r.subset
                && !cluster.subsets.iter().any(|x| &x.name == s)
            {
                return Err(at("", format!("{what}: tcp_routes: cluster {} has no subset {s:?}", r.cluster)));
            }
        }
        if total == 0 {
            return Err(at("", format!("{what}: tcp_routes: weights add up to zero")));
        }
        Ok(())
    }

    /// Valid config that will not serve as the user may expect, one line each: a `service:`
    /// listener whose host has no cluster or route yet (its connections close with `NR`).
    pub fn warnings(&self) -> Vec<String> {
        self.listeners
            .iter()
            .filter_map(|l| {
                let host = l.service.as_deref()?;
                let port = l.listen.port();
                let routed = self.service_routes.iter().any(|r| r.host == host && r.match_port.is_none_or(|p| p == port))
                    || self.clusters.iter().any(|c| c.service.as_deref() == Some(host));
                (!routed).then(|| {
                    format!(
                        "listener {}: service {host}: no cluster or route yet; its connections close at once (response_flags NR)",
                        l.name
                    )
                })
            })
            .collect()
    }

    fn fill_node_defaults(&mut self) {
        let n = &mut self.node;
        if n.namespace.is_empty() {
            n.namespace = "default".into();
        }
        if n.cluster_id.is_empty() {
            n.cluster_id = "Kubernetes".into();
        }
        if n.id.is_empty() && !n.workload_name.is_empty() {
            n.id = format!(
                "sidecar~127.0.0.1~{}.{ns}~{ns}.svc.cluster.local",
                n.workload_name,
                ns = n.namespace
            );
        }
    }
}

/// Where the ADS server is (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdsAddress {
    /// `HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(String),
}

impl XdsAddress {
    /// Parse `HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<XdsAddress, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return match path.is_empty() {
                true => Err("unix: needs a path".into()),
                false => Ok(XdsAddress::Unix(path.to_string())),
            };
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
                Ok(XdsAddress::Tcp(s.to_string()))
            }
            _ => Err(format!("{s:?}: expected HOST:PORT or unix:PATH")),
        }
    }
}

/// Upper bound for `metrics.max_label_sets`: each worker reserves its shard index up front.
pub const MAX_LABEL_SETS: usize = 1_000_000;

/// Longest busy-poll window: beyond this it is spinning, not bridging a wake-up.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// Whether two listen addresses would fight over one port: same port (not 0) and the same
/// IP, or either one the wildcard.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// What is wrong with cluster `c` alone, as the needle of its line and the message.
fn cluster_problem(c: &Cluster) -> Option<(String, String)> {
    let at = |m: String| Some((format!("name: {}", c.name), m));
    if c.endpoints.is_empty() && c.source.is_none() {
        return at(format!("cluster {}: endpoints: at least one endpoint is needed", c.name));
    }
    if let Some(e) = c.endpoints.iter().find(|e| e.weight == Some(0)) {
        return at(format!("cluster {}: endpoint {}: weight must be at least 1", c.name, e.address));
    }
    if c.tunnel.is_some() && c.tls.is_none() {
        return at(format!("cluster {}: tunnel: hbone needs tls: {{mode: istio_mutual, ...}}", c.name));
    }
    let mut subsets = BTreeSet::new();
    for s in &c.subsets {
        if !subsets.insert(s.name.as_str()) {
            return Some((
                format!("name: {}", s.name),
                format!("cluster {}: duplicate subset {:?}", c.name, s.name),
            ));
        }
    }
    None
}

/// 1-based line of the first line containing `needle`, if any.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_ms_s_m_h() {
        assert_eq!("500ms".parse::<Dur>().unwrap().0, Duration::from_millis(500));
        assert_eq!("15s".parse::<Dur>().unwrap().0, Duration::from_secs(15));
        assert_eq!("1m".parse::<Dur>().unwrap().0, Duration::from_secs(60));
        assert_eq!("1h".parse::<Dur>().unwrap().0, Duration::from_secs(3600));
        assert!("15".parse::<Dur>().is_err());
        assert!("s".parse::<Dur>().is_err());
        assert!("1d".parse::<Dur>().is_err());
        assert!("99999999999999999999h".parse::<Dur>().is_err());
        // Microseconds (busy_poll) parse, and every duration prints in its largest exact unit.
        assert_eq!("50us".parse::<Dur>().unwrap().0, Duration::from_micros(50));
        for text in ["50us", "1500us", "250ms", "5s", "2m", "1h", "0s"] {
            assert_eq!(text.parse::<Dur>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn a_listener_is_tls_only_when_strict_or_when_every_xds_chain_terminates_tls() {
        let listener = |l: &str| {
            let text = format!(
                "listeners:\n  - {{name: l, listen: 127.0.0.1:1, direction: inbound, cluster: c{l}}}\n"
            );
            std::sync::Arc::unwrap_or_clone(Config::parse(&text, "t.yaml").unwrap().listeners.remove(0))
        };
        let tls =
            |mode: &str| format!(", tls: {{mode: {mode}, cert_chain: c, private_key: k, root_cert: r}}");
        assert!(listener(&tls("strict")).tls_only());
        assert!(!listener(&tls("permissive")).tls_only());
        let mut chains = listener("");
        assert!(!chains.tls_only(), "no tls and no chains");
        let chain = |tls: bool| FilterChain { tls: tls.then(ChainTls::default), ..FilterChain::default() };
        chains.filter_chains = vec![chain(true), chain(true)];
        assert!(chains.tls_only());
        chains.filter_chains.push(chain(false));
        assert!(!chains.tls_only(), "a plaintext chain (permissive)");
    }

    #[test]
    fn an_hbone_terminator_is_inbound_strict_mtls_with_no_cluster() {
        let tls = "tls: {mode: strict, cert_chain: c, private_key: k, root_cert: r}";
        let read = |l: &str| {
            let text = format!(
                "listeners:
  - {{name: hbone, listen: 127.0.0.1:15008, {l}}}
"
            );
            let mut c = Config::parse(&text, "t.yaml")?;
            c.validate("t.yaml", &text).map(|()| c)
        };
        let ok = read(&format!("direction: inbound, tunnel: hbone, {tls}")).unwrap();
        assert_eq!(ok.listeners[0].tunnel, Some(ListenerTunnel::Hbone));
        for (bad, why) in [
            (format!("direction: outbound, tunnel: hbone, {tls}"), "direction: inbound"),
            ("direction: inbound, tunnel: hbone".to_string(), "mode: strict"),
            (format!("direction: inbound, tunnel: hbone, cluster: x, {tls}"), "no cluster"),
        ] {
            let e = read(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn xds_api_is_state_of_the_world_unless_delta_is_asked_for() {
        let read = |text: &str| Config::parse(text, "t.yaml").map(|c| c.xds.unwrap().api);
        assert_eq!(read("xds: {address: 127.0.0.1:15010}\n").unwrap(), XdsApi::StateOfTheWorld);
        assert_eq!(read("xds: {address: 127.0.0.1:15010, api: delta}\n").unwrap(), XdsApi::Delta);
        assert_eq!(
            read("xds: {address: 127.0.0.1:15010, api: state_of_the_world}\n").unwrap(),
            XdsApi::StateOfTheWorld
        );
        let err = read("xds: {address: 127.0.0.1:15010, api: incremental}\n").unwrap_err();
        assert!(err.to_string().contains("api"), "{err}");
    }

    #[test]
    fn xds_certificates_name_the_workload_files_and_xds_only_tls_keys_are_not_static_keys() {
        let text = "xds:\n  address: 127.0.0.1:15010\n  certificates: {cert_chain: /etc/certs/cert-chain.pem, private_key: /etc/certs/key.pem, root_cert: /etc/certs/root-cert.pem}\n";
        let mut cfg = Config::parse(text, "x.yaml").unwrap();
        cfg.validate("x.yaml", text).unwrap();
        let c = cfg.xds.unwrap().certificates.unwrap();
        assert_eq!(c.root_cert, "/etc/certs/root-cert.pem");
        let typo = text.replace("root_cert", "root");
        assert!(Config::parse(&typo, "x.yaml").is_err(), "unknown keys are errors");
        // What xDS fills in (secrets, per-endpoint matches) is not written by hand.
        let sds = "clusters:\n  - name: c\n    endpoints: []\n    tls: {mode: istio_mutual, cert_chain: a, private_key: b, root_cert: c, secrets: {certificate: default, validation: ROOTCA}}\n";
        assert!(Config::parse(sds, "x.yaml").is_err());
    }

    #[test]
    fn sizes_accept_kib_mib_and_bytes() {
        assert_eq!("64KiB".parse::<Size>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<Size>().unwrap().0, 1 << 20);
        assert_eq!("100".parse::<Size>().unwrap().0, 100);
        assert!("1GB".parse::<Size>().is_err());
    }

    #[test]
    fn the_spec_example_parses_and_validates() {
        // Every key of SPEC §4's example is implemented, tls: (§7) and capture: (§8) included.
        let text = include_str!("../tests/data/spec-example.yaml");
        let mut cfg = Config::parse(text, "spec-example.yaml").unwrap();
        assert_eq!(cfg.listeners.len(), 3);
        assert_eq!(cfg.listeners[0].limits.sniff_timeout.0, Duration::from_millis(20));
        cfg.validate("spec-example.yaml", text).unwrap();
    }
}
