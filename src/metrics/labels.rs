//! Istio's label rules (SPEC §3): the reporter, the local and peer sides with Istio's canonical
//! fallbacks, and the 23 values of one series ([`LabelSet`], built by [`label_set`]).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use crate::exchange::NodeMetadata;

/// Label names of every Istio TCP series, in the order Istio's proxy emits them (SPEC §3).
pub const LABEL_NAMES: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const UNKNOWN: &str = "unknown";
const LATEST: &str = "latest";
/// Value of every label but `reporter` on the overflow series of a full [`LabelBudget`](super::LabelBudget).
pub const OVERFLOW: &str = "overflow";

/// Pod label Istio's injector reads (and writes into the preamble) for the canonical service.
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Pod label Istio's injector reads (and writes into the preamble) for the canonical revision.
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
const K8S_NAME: &str = "app.kubernetes.io/name";
const K8S_VERSION: &str = "app.kubernetes.io/version";

/// Which side of the connection reports: `source` on outbound listeners, `destination` inbound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The outbound side: the local node is `source_*`, the peer `destination_*`.
    Source,
    /// The inbound side: the local node is `destination_*`, the peer `source_*`.
    Destination,
}

impl Reporter {
    /// The `reporter` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Looks a label up, treating an empty value as absent.
fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

/// The local node's canonical service (SPEC §3): `service.istio.io/canonical-name`, else
/// `app.kubernetes.io/name`, else `app`, else the workload name.
fn local_canonical_service(node: &NodeMetadata) -> Option<&str> {
    label(&node.labels, CANONICAL_NAME)
        .or_else(|| label(&node.labels, K8S_NAME))
        .or_else(|| label(&node.labels, "app"))
        .or_else(|| non_empty(&node.workload_name))
}

/// The local node's canonical revision (SPEC §3): `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
fn local_canonical_revision(node: &NodeMetadata) -> &str {
    label(&node.labels, CANONICAL_REVISION)
        .or_else(|| label(&node.labels, K8S_VERSION))
        .or_else(|| label(&node.labels, "version"))
        .unwrap_or(LATEST)
}

/// Fills LABELS `service.istio.io/canonical-name` / `-revision` of the local node from the SPEC §3
/// local fallbacks when absent (the preamble ringside writes carries them, as an injected Istio
/// pod's does). Without any name source (no labels, no workload name) the name stays absent.
pub fn with_canonical_labels(mut node: NodeMetadata) -> NodeMetadata {
    if label(&node.labels, CANONICAL_NAME).is_none()
        && let Some(name) = local_canonical_service(&node).map(str::to_owned)
    {
        node.labels.insert(CANONICAL_NAME.to_owned(), name);
    }
    if label(&node.labels, CANONICAL_REVISION).is_none() {
        let revision = local_canonical_revision(&node).to_owned();
        node.labels.insert(CANONICAL_REVISION.to_owned(), revision);
    }
    node
}

/// Service a connection's cluster represents (empty = unknown).
#[derive(Clone, Debug, Default)]
pub struct ServiceInfo {
    /// Service host, e.g. `server.default.svc.cluster.local`.
    pub host: String,
    /// The cluster's service namespace (its `service_namespace` key, else the namespace of the
    /// ServiceEntry it came from); empty lets [`label_set`] derive it from a `NAME.NS.svc.*` host.
    pub namespace: String,
}

/// Everything that decides a connection's labels, gathered once when its peer settles.
#[derive(Clone, Copy, Debug)]
pub struct ConnLabels<'a> {
    /// Which side reports.
    pub reporter: Reporter,
    /// This sidecar's node (see [`with_canonical_labels`]).
    pub local: &'a NodeMetadata,
    /// The peer's metadata: from the exchange, else (reporter=source) the chosen endpoint's
    /// workload as Istio's control plane describes it, its canonical labels filled by
    /// [`with_canonical_labels`] (SPEC §3 "Peer from the chosen endpoint").
    pub peer: Option<&'a NodeMetadata>,
    /// The service of the connection's cluster.
    pub service: &'a ServiceInfo,
    /// `-` or Envoy's flags (`UF`, `UO`, `NR`, `UH`); empty means `-`.
    pub response_flags: &'a str,
    /// `spiffe://...` of the local certificate under mTLS.
    pub local_principal: Option<&'a str>,
    /// `spiffe://...` of the peer certificate under mTLS.
    pub peer_principal: Option<&'a str>,
    /// Whether the connection is mTLS with a verified peer certificate.
    pub mutual_tls: bool,
}

/// The 23 label values of one series, in [`LABEL_NAMES`] order; cheap to clone.
///
/// Carries the hash of its values, computed once when built: a scrape and the intern table look
/// label sets up by it without hashing ~700 bytes again. The hash is keyed per process, so peers
/// that choose label values cannot choose colliding hashes.
#[derive(Clone, Debug)]
pub struct LabelSet {
    values: Arc<[Arc<str>]>,
    hash: u64,
}

impl PartialEq for LabelSet {
    fn eq(&self, other: &LabelSet) -> bool {
        self.hash == other.hash && self.values == other.values
    }
}

impl Eq for LabelSet {}

impl Hash for LabelSet {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl LabelSet {
    /// The value of label `name`, if it is one of [`LABEL_NAMES`].
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = LABEL_NAMES.iter().position(|n| *n == name)?;
        self.values.get(i).map(|v| &**v)
    }

    /// All 23 values, in [`LABEL_NAMES`] order.
    pub fn values(&self) -> &[Arc<str>] {
        &self.values
    }

    /// The reporter this set was built for.
    pub fn reporter(&self) -> Reporter {
        match self.values.first().map(|v| &**v) {
            Some("destination") => Reporter::Destination,
            _ => Reporter::Source,
        }
    }

    /// The series every label set beyond the [`LabelBudget`](super::LabelBudget) is folded into: the same
    /// `reporter`, every other label `overflow`.
    pub fn overflow(reporter: Reporter) -> LabelSet {
        let values: Vec<Arc<str>> = LABEL_NAMES
            .iter()
            .enumerate()
            .map(|(i, _)| Arc::from(if i == 0 { reporter.as_str() } else { OVERFLOW }))
            .collect();
        LabelSet::new(values.into())
    }

    /// This set with label `name` set to `value`: for a value Istio's rules do not derive
    /// from a service host, as destination_service_name `PassthroughCluster` (SPEC §8).
    pub fn with(&self, name: &str, value: &str) -> LabelSet {
        let mut values = self.values.to_vec();
        if let Some(v) = LABEL_NAMES.iter().position(|n| *n == name).and_then(|i| values.get_mut(i)) {
            *v = Arc::from(value);
        }
        LabelSet::new(values.into())
    }

    fn from_values(values: [&str; 23]) -> LabelSet {
        let values: Vec<Arc<str>> = values.iter().map(|v| Arc::from(*v)).collect();
        LabelSet::new(values.into())
    }

    fn new(values: Arc<[Arc<str>]>) -> LabelSet {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        let hash = KEYS.get_or_init(RandomState::new).hash_one(&*values);
        LabelSet { values, hash }
    }
}

/// The labels of one side of a connection.
struct Side<'a> {
    workload: &'a str,
    canonical_service: &'a str,
    canonical_revision: &'a str,
    namespace: &'a str,
    principal: &'a str,
    app: &'a str,
    version: &'a str,
    cluster: &'a str,
}

/// The namespace of a SPIFFE id `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let path = principal.strip_prefix("spiffe://")?;
    let mut segments = path.split('/').skip(1); // trust domain
    while let Some(segment) = segments.next() {
        if segment == "ns" {
            return segments.next().filter(|ns| !ns.is_empty());
        }
    }
    None
}

fn local_side<'a>(node: &'a NodeMetadata, principal: Option<&'a str>) -> Side<'a> {
    let labels = &node.labels;
    Side {
        workload: non_empty(&node.workload_name).unwrap_or(UNKNOWN),
        canonical_service: local_canonical_service(node).unwrap_or(UNKNOWN),
        canonical_revision: local_canonical_revision(node),
        namespace: non_empty(&node.namespace).unwrap_or(UNKNOWN),
        principal: principal.and_then(non_empty).unwrap_or(UNKNOWN),
        app: label(labels, "app").or_else(|| label(labels, K8S_NAME)).unwrap_or(UNKNOWN),
        version: label(labels, "version").or_else(|| label(labels, K8S_VERSION)).unwrap_or(UNKNOWN),
        // Istio's proxy reports its own cluster as `Kubernetes` when CLUSTER_ID is unset.
        cluster: non_empty(&node.cluster_id).unwrap_or("Kubernetes"),
    }
}

/// What Istio's rules read from a peer's metadata (SPEC §3 "Peer"), fallbacks applied; `None`
/// is unknown. Two peers with equal `PeerLabels` get equal labels whatever else differs (node
/// id, pod name, owner, ...): a cache of label sets keys on this. Borrowed, built without
/// allocating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerLabels<'a> {
    /// WORKLOAD_NAME.
    pub workload: Option<&'a str>,
    /// NAMESPACE (a peer certificate's SPIFFE namespace wins over it, see [`label_set`]).
    pub namespace: Option<&'a str>,
    /// CLUSTER_ID.
    pub cluster: Option<&'a str>,
    /// LABELS `service.istio.io/canonical-name` only.
    pub canonical_service: Option<&'a str>,
    /// LABELS `service.istio.io/canonical-revision` only.
    pub canonical_revision: Option<&'a str>,
    /// LABELS `app.kubernetes.io/name`, else `app`.
    pub app: Option<&'a str>,
    /// LABELS `app.kubernetes.io/version`, else `version`.
    pub version: Option<&'a str>,
}

impl<'a> PeerLabels<'a> {
    /// Reads `node` exactly as Istio's proxy reads peer metadata.
    pub fn of(node: &'a NodeMetadata) -> PeerLabels<'a> {
        let lookup = |key: &str| label(&node.labels, key);
        PeerLabels {
            workload: non_empty(&node.workload_name),
            namespace: non_empty(&node.namespace),
            cluster: non_empty(&node.cluster_id),
            canonical_service: lookup(CANONICAL_NAME),
            canonical_revision: lookup(CANONICAL_REVISION),
            app: lookup(K8S_NAME).or_else(|| lookup("app")),
            version: lookup(K8S_VERSION).or_else(|| lookup("version")),
        }
    }

    /// The seven fields, in declaration order.
    pub fn fields(&self) -> [Option<&'a str>; 7] {
        [
            self.workload,
            self.namespace,
            self.cluster,
            self.canonical_service,
            self.canonical_revision,
            self.app,
            self.version,
        ]
    }
}

/// The peer's side (SPEC §3): its [`PeerLabels`], the namespace from its certificate first.
fn peer_side<'a>(node: Option<&'a NodeMetadata>, principal: Option<&'a str>) -> Side<'a> {
    let principal = principal.and_then(non_empty);
    let peer = node.map(PeerLabels::of).unwrap_or_default();
    Side {
        workload: peer.workload.unwrap_or(UNKNOWN),
        canonical_service: peer.canonical_service.unwrap_or(UNKNOWN),
        canonical_revision: peer.canonical_revision.unwrap_or(LATEST),
        namespace: principal.and_then(principal_namespace).or(peer.namespace).unwrap_or(UNKNOWN),
        principal: principal.unwrap_or(UNKNOWN),
        app: peer.app.unwrap_or(UNKNOWN),
        version: peer.version.unwrap_or(UNKNOWN),
        cluster: peer.cluster.unwrap_or(UNKNOWN),
    }
}

/// NS of a Kubernetes service host `NAME.NS.svc.DOMAIN`.
fn host_namespace(host: &str) -> Option<&str> {
    let mut parts = host.split('.');
    let (_name, ns, svc) = (parts.next()?, parts.next()?, parts.next()?);
    (svc == "svc" && !ns.is_empty()).then_some(ns)
}

/// Builds a connection's 23 label values by the rules of SPEC §3.
pub fn label_set(c: &ConnLabels) -> LabelSet {
    let local = local_side(c.local, c.local_principal);
    let peer = peer_side(c.peer, c.peer_principal);
    let host = non_empty(&c.service.host);
    let host_name = host.and_then(|h| h.split('.').next()).and_then(non_empty);
    let (source, destination, service, service_name, service_namespace, policy) = match c.reporter {
        Reporter::Source => {
            let namespace = non_empty(&c.service.namespace)
                .or_else(|| host.and_then(host_namespace))
                .unwrap_or(if peer.namespace == UNKNOWN { UNKNOWN } else { peer.namespace });
            let service = host.unwrap_or(UNKNOWN);
            let name = host_name.unwrap_or(UNKNOWN);
            (local, peer, service, name, namespace, UNKNOWN)
        }
        Reporter::Destination => {
            let service = host.unwrap_or(local.canonical_service);
            let name = host_name.unwrap_or(local.canonical_service);
            let namespace = local.namespace;
            let policy = if c.mutual_tls { "mutual_tls" } else { "none" };
            (peer, local, service, name, namespace, policy)
        }
    };
    LabelSet::from_values([
        c.reporter.as_str(),
        source.workload,
        source.canonical_service,
        source.canonical_revision,
        source.namespace,
        source.principal,
        source.app,
        source.version,
        source.cluster,
        destination.workload,
        destination.namespace,
        destination.principal,
        destination.app,
        destination.version,
        service,
        destination.canonical_service,
        destination.canonical_revision,
        service_name,
        service_namespace,
        destination.cluster,
        "tcp",
        non_empty(c.response_flags).unwrap_or("-"),
        policy,
    ])
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub(crate) fn node(workload: &str, ns: &str, cluster: &str, l: &[(&str, &str)]) -> NodeMetadata {
        NodeMetadata {
            workload_name: workload.into(),
            namespace: ns.into(),
            cluster_id: cluster.into(),
            labels: labels(l),
            ..Default::default()
        }
    }

    pub(crate) fn conn<'a>(
        reporter: Reporter,
        local: &'a NodeMetadata,
        peer: Option<&'a NodeMetadata>,
        service: &'a ServiceInfo,
    ) -> ConnLabels<'a> {
        ConnLabels {
            reporter,
            local,
            peer,
            service,
            response_flags: "-",
            local_principal: None,
            peer_principal: None,
            mutual_tls: false,
        }
    }

    pub(crate) fn no_service() -> ServiceInfo {
        ServiceInfo::default()
    }

    /// The local node's labels as reporter=source (local = source_*).
    fn local_src(n: &NodeMetadata) -> LabelSet {
        let s = no_service();
        label_set(&conn(Reporter::Source, n, None, &s))
    }

    /// The peer's labels as reporter=source (peer = destination_*).
    fn peer_dst(p: &NodeMetadata) -> LabelSet {
        let (l, s) = (NodeMetadata::default(), no_service());
        label_set(&conn(Reporter::Source, &l, Some(p), &s))
    }

    #[test]
    fn label_names_are_the_23_of_spec_3_in_order() {
        assert_eq!(LABEL_NAMES.len(), 23);
        assert_eq!(LABEL_NAMES[0], "reporter");
        assert_eq!(LABEL_NAMES[22], "connection_security_policy");
        let s = local_src(&NodeMetadata::default());
        assert_eq!(s.values().len(), 23);
        assert_eq!(s.get("request_protocol"), Some("tcp"));
        assert_eq!(s.get("no_such_label"), None);
    }

    #[test]
    fn local_canonical_service_is_canonical_name_else_k8s_name_else_app_else_workload() {
        let full = [(CANONICAL_NAME, "canon"), (K8S_NAME, "k8s"), ("app", "app")];
        let cs = |l: &[(&str, &str)], w: &str| {
            local_src(&node(w, "", "", l)).get("source_canonical_service").unwrap().to_owned()
        };
        assert_eq!(cs(&full, "wl"), "canon");
        assert_eq!(cs(&full[1..], "wl"), "k8s");
        assert_eq!(cs(&full[2..], "wl"), "app");
        assert_eq!(cs(&[], "wl"), "wl");
        assert_eq!(cs(&[], ""), "unknown");
        // An empty label value is absent.
        assert_eq!(cs(&[(CANONICAL_NAME, ""), ("app", "app")], "wl"), "app");
    }

    #[test]
    fn local_canonical_revision_is_canonical_revision_else_k8s_version_else_version_else_latest() {
        let full = [(CANONICAL_REVISION, "rev"), (K8S_VERSION, "k8sv"), ("version", "v1")];
        let cr = |l: &[(&str, &str)]| {
            local_src(&node("wl", "", "", l)).get("source_canonical_revision").unwrap().to_owned()
        };
        assert_eq!(cr(&full), "rev");
        assert_eq!(cr(&full[1..]), "k8sv");
        assert_eq!(cr(&full[2..]), "v1");
        assert_eq!(cr(&[]), "latest");
    }

    #[test]
    fn local_app_is_app_else_k8s_name_and_version_is_version_else_k8s_version() {
        let both = node("", "", "", &[("app", "a"), (K8S_NAME, "kn"), ("version", "v"), (K8S_VERSION, "kv")]);
        let s = local_src(&both);
        assert_eq!(s.get("source_app"), Some("a"));
        assert_eq!(s.get("source_version"), Some("v"));
        let k8s = node("", "", "", &[(K8S_NAME, "kn"), (K8S_VERSION, "kv")]);
        let s = local_src(&k8s);
        assert_eq!(s.get("source_app"), Some("kn"));
        assert_eq!(s.get("source_version"), Some("kv"));
        let s = local_src(&NodeMetadata::default());
        assert_eq!(s.get("source_app"), Some("unknown"));
        assert_eq!(s.get("source_version"), Some("unknown"));
    }

    #[test]
    fn local_cluster_is_cluster_id_else_kubernetes_and_missing_fields_are_unknown() {
        let s = local_src(&node("wl", "ns", "c1", &[]));
        assert_eq!(s.get("source_cluster"), Some("c1"));
        assert_eq!(s.get("source_workload"), Some("wl"));
        assert_eq!(s.get("source_workload_namespace"), Some("ns"));
        let s = local_src(&NodeMetadata::default());
        assert_eq!(s.get("source_cluster"), Some("Kubernetes"));
        assert_eq!(s.get("source_workload"), Some("unknown"));
        assert_eq!(s.get("source_workload_namespace"), Some("unknown"));
        assert_eq!(s.get("source_principal"), Some("unknown"));
    }

    #[test]
    fn peer_app_is_k8s_name_else_app_and_version_is_k8s_version_else_version() {
        let both = node("", "", "", &[("app", "a"), (K8S_NAME, "kn"), ("version", "v"), (K8S_VERSION, "kv")]);
        let s = peer_dst(&both);
        assert_eq!(s.get("destination_app"), Some("kn"));
        assert_eq!(s.get("destination_version"), Some("kv"));
        let plain = node("", "", "", &[("app", "a"), ("version", "v")]);
        let s = peer_dst(&plain);
        assert_eq!(s.get("destination_app"), Some("a"));
        assert_eq!(s.get("destination_version"), Some("v"));
        let s = peer_dst(&NodeMetadata::default());
        assert_eq!(s.get("destination_app"), Some("unknown"));
        assert_eq!(s.get("destination_version"), Some("unknown"));
    }

    #[test]
    fn peer_canonical_labels_come_only_from_the_canonical_keys_else_unknown_and_latest() {
        let canon = node("wl", "", "", &[(CANONICAL_NAME, "cn"), (CANONICAL_REVISION, "cr")]);
        let s = peer_dst(&canon);
        assert_eq!(s.get("destination_canonical_service"), Some("cn"));
        assert_eq!(s.get("destination_canonical_revision"), Some("cr"));
        // No local-style fallback to app/version/workload for a peer.
        let other = node("wl", "", "", &[("app", "a"), ("version", "v"), (K8S_NAME, "k")]);
        let s = peer_dst(&other);
        assert_eq!(s.get("destination_canonical_service"), Some("unknown"));
        assert_eq!(s.get("destination_canonical_revision"), Some("latest"));
    }

    #[test]
    fn peer_workload_and_cluster_come_from_its_metadata_else_unknown() {
        let s = peer_dst(&node("wl", "ns", "c2", &[]));
        assert_eq!(s.get("destination_workload"), Some("wl"));
        assert_eq!(s.get("destination_cluster"), Some("c2"));
        assert_eq!(s.get("destination_workload_namespace"), Some("ns"));
        let s = peer_dst(&NodeMetadata::default());
        assert_eq!(s.get("destination_workload"), Some("unknown"));
        // A peer's missing cluster is unknown, not the local default `Kubernetes`.
        assert_eq!(s.get("destination_cluster"), Some("unknown"));
        assert_eq!(s.get("destination_workload_namespace"), Some("unknown"));
    }

    #[test]
    fn peer_namespace_comes_from_the_spiffe_id_when_there_is_one_else_from_metadata() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let p = node("", "meta-ns", "", &[]);
        let mut c = conn(Reporter::Destination, &l, Some(&p), &s);
        c.peer_principal = Some("spiffe://cluster.local/ns/cert-ns/sa/client");
        let set = label_set(&c);
        assert_eq!(set.get("source_workload_namespace"), Some("cert-ns"));
        assert_eq!(set.get("source_principal"), Some("spiffe://cluster.local/ns/cert-ns/sa/client"));
        c.peer_principal = None;
        assert_eq!(label_set(&c).get("source_workload_namespace"), Some("meta-ns"));
        // Without exchange, the certificate still names the namespace.
        c.peer = None;
        c.peer_principal = Some("spiffe://td/ns/only-cert/sa/x");
        assert_eq!(label_set(&c).get("source_workload_namespace"), Some("only-cert"));
        c.peer_principal = Some("spiffe://td/weird");
        assert_eq!(label_set(&c).get("source_workload_namespace"), Some("unknown"));
    }

    #[test]
    fn principal_namespace_parses_only_spiffe_ns_segments() {
        assert_eq!(principal_namespace("spiffe://cluster.local/ns/default/sa/x"), Some("default"));
        assert_eq!(principal_namespace("spiffe://td/ns//sa/x"), None);
        assert_eq!(principal_namespace("spiffe://ns/sa/x"), None);
        assert_eq!(principal_namespace("https://td/ns/a/sa/x"), None);
        assert_eq!(principal_namespace("spiffe://td/ns"), None);
    }

    #[test]
    fn principals_are_the_certificates_else_unknown_and_follow_the_reporter() {
        let (l, p, s) = (NodeMetadata::default(), NodeMetadata::default(), no_service());
        let mut c = conn(Reporter::Source, &l, Some(&p), &s);
        c.local_principal = Some("spiffe://td/ns/a/sa/me");
        c.peer_principal = Some("spiffe://td/ns/b/sa/you");
        c.mutual_tls = true;
        let set = label_set(&c);
        assert_eq!(set.get("source_principal"), Some("spiffe://td/ns/a/sa/me"));
        assert_eq!(set.get("destination_principal"), Some("spiffe://td/ns/b/sa/you"));
        c.reporter = Reporter::Destination;
        let set = label_set(&c);
        assert_eq!(set.get("source_principal"), Some("spiffe://td/ns/b/sa/you"));
        assert_eq!(set.get("destination_principal"), Some("spiffe://td/ns/a/sa/me"));
        c.local_principal = None;
        c.peer_principal = Some("");
        let set = label_set(&c);
        assert_eq!(set.get("source_principal"), Some("unknown"));
        assert_eq!(set.get("destination_principal"), Some("unknown"));
    }

    #[test]
    fn connection_security_policy_is_mutual_tls_or_none_inbound_and_unknown_outbound() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let mut c = conn(Reporter::Destination, &l, None, &s);
        c.mutual_tls = true;
        assert_eq!(label_set(&c).get("connection_security_policy"), Some("mutual_tls"));
        c.mutual_tls = false;
        assert_eq!(label_set(&c).get("connection_security_policy"), Some("none"));
        c.reporter = Reporter::Source;
        c.mutual_tls = true;
        assert_eq!(label_set(&c).get("connection_security_policy"), Some("unknown"));
    }

    #[test]
    fn reporter_source_puts_the_local_node_in_source_and_the_peer_in_destination() {
        let local = node("me", "ns-a", "ca", &[("app", "mine")]);
        let peer = node("you", "ns-b", "cb", &[("app", "yours")]);
        let s = no_service();
        let set = label_set(&conn(Reporter::Source, &local, Some(&peer), &s));
        assert_eq!(set.get("reporter"), Some("source"));
        assert_eq!(set.get("source_workload"), Some("me"));
        assert_eq!(set.get("source_app"), Some("mine"));
        assert_eq!(set.get("destination_workload"), Some("you"));
        assert_eq!(set.get("destination_app"), Some("yours"));
        let set = label_set(&conn(Reporter::Destination, &local, Some(&peer), &s));
        assert_eq!(set.get("reporter"), Some("destination"));
        assert_eq!(set.get("source_workload"), Some("you"));
        assert_eq!(set.get("source_cluster"), Some("cb"));
        assert_eq!(set.get("destination_workload"), Some("me"));
        assert_eq!(set.get("destination_cluster"), Some("ca"));
    }

    #[test]
    fn reporter_source_destination_service_is_the_host_its_first_label_and_service_namespace() {
        let (l, p) = (NodeMetadata::default(), node("", "peer-ns", "", &[]));
        let svc = ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: "svc-ns".into() };
        let set = label_set(&conn(Reporter::Source, &l, Some(&p), &svc));
        assert_eq!(set.get("destination_service"), Some("server.default.svc.cluster.local"));
        assert_eq!(set.get("destination_service_name"), Some("server"));
        assert_eq!(set.get("destination_service_namespace"), Some("svc-ns"));
        // No service namespace: NS of NAME.NS.svc.DOMAIN.
        let svc = ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: String::new() };
        let set = label_set(&conn(Reporter::Source, &l, Some(&p), &svc));
        assert_eq!(set.get("destination_service_namespace"), Some("default"));
        // Not a Kubernetes host: the peer's namespace.
        let svc = ServiceInfo { host: "db.example.com".into(), namespace: String::new() };
        let set = label_set(&conn(Reporter::Source, &l, Some(&p), &svc));
        assert_eq!(set.get("destination_service_name"), Some("db"));
        assert_eq!(set.get("destination_service_namespace"), Some("peer-ns"));
        // Nothing known.
        let (s, none) = (no_service(), NodeMetadata::default());
        let set = label_set(&conn(Reporter::Source, &l, Some(&none), &s));
        assert_eq!(set.get("destination_service"), Some("unknown"));
        assert_eq!(set.get("destination_service_name"), Some("unknown"));
        assert_eq!(set.get("destination_service_namespace"), Some("unknown"));
    }

    #[test]
    fn reporter_destination_service_is_the_inbound_host_else_local_canonical_service() {
        let local = node("wl", "local-ns", "", &[("app", "ratings")]);
        let p = node("", "peer-ns", "", &[]);
        let svc = ServiceInfo { host: "server.default.svc.cluster.local".into(), namespace: "svc-ns".into() };
        let set = label_set(&conn(Reporter::Destination, &local, Some(&p), &svc));
        assert_eq!(set.get("destination_service"), Some("server.default.svc.cluster.local"));
        assert_eq!(set.get("destination_service_name"), Some("server"));
        // Always the local namespace inbound, whatever the service or peer say.
        assert_eq!(set.get("destination_service_namespace"), Some("local-ns"));
        let s = no_service();
        let set = label_set(&conn(Reporter::Destination, &local, Some(&p), &s));
        assert_eq!(set.get("destination_service"), Some("ratings"));
        assert_eq!(set.get("destination_service_name"), Some("ratings"));
        let set = label_set(&conn(Reporter::Destination, &NodeMetadata::default(), None, &s));
        assert_eq!(set.get("destination_service"), Some("unknown"));
        assert_eq!(set.get("destination_service_namespace"), Some("unknown"));
    }

    #[test]
    fn the_chosen_endpoint_is_the_peer_with_istiods_canonical_fallbacks() {
        let (l, s) = (NodeMetadata::default(), no_service());
        // As routing builds an endpoint's peer: a WorkloadEntry's name, namespace and labels.
        let endpoint = |workload: &str, pairs: &[(&str, &str)]| {
            with_canonical_labels(NodeMetadata {
                workload_name: workload.into(),
                namespace: "db".into(),
                labels: labels(pairs),
                ..NodeMetadata::default()
            })
        };
        let ep = endpoint("mongodb-v1", &[("app", "a"), ("version", "v2")]);
        let set = label_set(&conn(Reporter::Source, &l, Some(&ep), &s));
        assert_eq!(set.get("destination_app"), Some("a"));
        assert_eq!(set.get("destination_version"), Some("v2"));
        assert_eq!(set.get("destination_canonical_service"), Some("a"));
        assert_eq!(set.get("destination_canonical_revision"), Some("v2"));
        assert_eq!(set.get("destination_workload"), Some("mongodb-v1"));
        assert_eq!(set.get("destination_workload_namespace"), Some("db"));
        assert_eq!(set.get("destination_service_namespace"), Some("db"));
        // Without a name label, the workload name; an explicit canonical name wins.
        let ep = endpoint("mongodb-v2", &[("version", "v2")]);
        let set = label_set(&conn(Reporter::Source, &l, Some(&ep), &s));
        assert_eq!(set.get("destination_canonical_service"), Some("mongodb-v2"));
        assert_eq!(set.get("destination_app"), Some("unknown"));
        let ep = endpoint("w", &[("app", "a"), (K8S_NAME, "k"), (CANONICAL_NAME, "cn")]);
        let set = label_set(&conn(Reporter::Source, &l, Some(&ep), &s));
        assert_eq!(set.get("destination_canonical_service"), Some("cn"));
        assert_eq!(set.get("destination_app"), Some("k"));
        // Nothing known: unknown and latest.
        let ep = endpoint("", &[]);
        let set = label_set(&conn(Reporter::Source, &l, Some(&ep), &s));
        assert_eq!(set.get("destination_canonical_service"), Some("unknown"));
        assert_eq!(set.get("destination_canonical_revision"), Some("latest"));
    }

    #[test]
    fn response_flags_and_request_protocol() {
        let (l, s) = (NodeMetadata::default(), no_service());
        let mut c = conn(Reporter::Source, &l, None, &s);
        c.response_flags = "UF";
        let set = label_set(&c);
        assert_eq!(set.get("response_flags"), Some("UF"));
        assert_eq!(set.get("request_protocol"), Some("tcp"));
        c.response_flags = "";
        assert_eq!(label_set(&c).get("response_flags"), Some("-"));
    }

    #[test]
    fn with_canonical_labels_fills_absent_canonical_name_and_revision_from_local_fallbacks() {
        let n = with_canonical_labels(node("wl", "", "", &[("app", "a"), ("version", "v1")]));
        assert_eq!(n.labels.get(CANONICAL_NAME).map(String::as_str), Some("a"));
        assert_eq!(n.labels.get(CANONICAL_REVISION).map(String::as_str), Some("v1"));
        let n = with_canonical_labels(node("wl", "", "", &[]));
        assert_eq!(n.labels.get(CANONICAL_NAME).map(String::as_str), Some("wl"));
        assert_eq!(n.labels.get(CANONICAL_REVISION).map(String::as_str), Some("latest"));
        let n = with_canonical_labels(node(
            "wl",
            "",
            "",
            &[(CANONICAL_NAME, "keep"), (CANONICAL_REVISION, "r"), ("app", "a")],
        ));
        assert_eq!(n.labels.get(CANONICAL_NAME).map(String::as_str), Some("keep"));
        assert_eq!(n.labels.get(CANONICAL_REVISION).map(String::as_str), Some("r"));
        let n = with_canonical_labels(NodeMetadata::default());
        assert_eq!(n.labels.get(CANONICAL_NAME), None);
        // What the peer reads from the filled preamble equals what the local side reports.
        let local = node("wl", "", "", &[(K8S_NAME, "k"), (K8S_VERSION, "kv")]);
        let filled = with_canonical_labels(local.clone());
        let l = local_src(&local);
        let p = peer_dst(&filled);
        assert_eq!(l.get("source_canonical_service"), p.get("destination_canonical_service"));
        assert_eq!(l.get("source_canonical_revision"), p.get("destination_canonical_revision"));
    }

    proptest::proptest! {
        #[test]
        fn any_metadata_gives_23_non_empty_values_without_panicking(
            workload in ".*", ns in ".*", cluster in ".*", key in ".*", value in ".*",
            principal in ".*", host in ".*", flags in ".*", source in proptest::bool::ANY,
        ) {
            let n = node(&workload, &ns, &cluster, &[(&key, &value), (CANONICAL_NAME, &value)]);
            let svc = ServiceInfo { host: host.clone(), namespace: String::new() };
            let reporter = if source { Reporter::Source } else { Reporter::Destination };
            let mut c = conn(reporter, &n, Some(&n), &svc);
            c.peer_principal = Some(&principal);
            c.response_flags = &flags;
            let set = label_set(&c);
            proptest::prop_assert_eq!(set.values().len(), 23);
            proptest::prop_assert!(set.values().iter().all(|v| !v.is_empty()));
        }
    }
}
