//! Istio's own networking YAML (`--istio`, SPEC §6): `DestinationRule`, `VirtualService` (tcp
//! routes), `ServiceEntry` and `WorkloadEntry` documents become the same clusters and
//! `service_routes` the native YAML describes. Pure: text in, config and report lines out;
//! reading the files is the caller's business.
//!
//! What Istio would apply and ringside does not (HTTP routes, connection pools, `exportTo`,
//! ...) is reported, one line each, never dropped silently. Broken input (YAML syntax, a
//! destination without host, a subset no DestinationRule defines, weights that add up to
//! zero) is an error naming the file, the document and the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::config::{Cluster, ClusterTls, Config, Endpoint, LoadBalancer, ServiceRoute, Subset, TcpRoute};

/// A broken Istio document: where it is and why it cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct Error {
    /// The file.
    pub file: String,
    /// 1-based line, when known (YAML syntax errors).
    pub line: Option<usize>,
    /// `document N (Kind/name): what is wrong`.
    pub reason: String,
}

impl From<Error> for crate::config::Error {
    fn from(e: Error) -> Self {
        crate::config::Error { file: e.file, line: e.line, message: e.reason }
    }
}

/// One YAML file: its name (for messages) and its text.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// File name as the user gave it.
    pub file: &'a str,
    /// Its contents.
    pub text: &'a str,
}

/// The domain of a short host, as Istio's default `cluster.local` trust domain says.
const DOMAIN: &str = "svc.cluster.local";

/// Read every document of `sources` and add what they say to `cfg`: clusters from
/// ServiceEntries (one per host and port, named as Istio names them,
/// `outbound|PORT||HOST`), subsets, load balancers and TLS mode from DestinationRules, and
/// `service_routes` from VirtualService tcp routes. Returns the report lines (what was not
/// applied, and why), each naming its file and document.
pub fn apply(cfg: &mut Config, sources: &[Source]) -> Result<Vec<String>, Error> {
    let mut reports = Vec::new();
    let mut docs = Vec::new();
    for source in sources {
        parse_file(source, &mut docs, &mut reports)?;
    }
    let workload_entries: Vec<(&Doc, &WorkloadEntry)> = docs
        .iter()
        .filter_map(|d| match &d.body {
            Body::WorkloadEntry(w) => Some((d, w)),
            _ => None,
        })
        .collect();
    let mut selected = BTreeSet::new();
    for doc in &docs {
        if let Body::ServiceEntry(se) = &doc.body {
            service_entry(cfg, doc, se, &workload_entries, &mut selected, &mut reports)?;
        }
    }
    for (doc, _) in &workload_entries {
        if !selected.contains(&(doc.namespace.as_str(), doc.name.as_str())) {
            reports.push(format!("{}: no ServiceEntry selects it; unused", doc.at()));
        }
    }
    let mut ruled = BTreeSet::new();
    for doc in &docs {
        if let Body::DestinationRule(dr) = &doc.body {
            destination_rule(cfg, doc, dr, &mut ruled, &mut reports)?;
        }
    }
    for doc in &docs {
        if let Body::VirtualService(vs) = &doc.body {
            virtual_service(cfg, doc, vs, &mut reports)?;
        }
    }
    Ok(reports)
}

/// One parsed Istio document and where it came from.
struct Doc {
    file: String,
    index: usize,
    kind: &'static str,
    name: String,
    namespace: String,
    body: Body,
}

impl Doc {
    /// `FILE: document N (Kind/name)`, the prefix of every line about it.
    fn at(&self) -> String {
        format!("{}: {}", self.file, self.what())
    }

    fn what(&self) -> String {
        format!("document {} ({}/{})", self.index, self.kind, self.name)
    }

    fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error { file: self.file.clone(), line: None, reason: format!("{}: {reason}", self.what()) }
    }

    /// Istio's short-host rule: `ratings` means `ratings.<namespace>.svc.cluster.local`, with
    /// the namespace of the document (as istiod's `ResolveShortnameToFQDN`).
    fn fqdn(&self, host: &str) -> String {
        if host.contains('.') || host.starts_with('*') {
            host.to_string()
        } else {
            format!("{host}.{}.{DOMAIN}", self.namespace)
        }
    }

    /// Report every field ringside does not read, under `path` (e.g. `spec.trafficPolicy.`).
    fn unsupported(&self, path: &str, other: &Other, reports: &mut Vec<String>) {
        for key in other.keys() {
            reports.push(format!("{}: {path}{key}: {}", self.at(), why_unsupported(key)));
        }
    }
}

enum Body {
    DestinationRule(DestinationRule),
    VirtualService(VirtualService),
    ServiceEntry(ServiceEntry),
    WorkloadEntry(WorkloadEntry),
}

fn why_unsupported(key: &str) -> &'static str {
    match key {
        "http" => "HTTP routes are not applied (ringside is an L4 proxy)",
        "tls" => "TLS (SNI) routes are not applied",
        "exportTo" => "not supported: every document applies to this proxy",
        "connectionPool" => "not honoured",
        "outlierDetection" => {
            "not honoured: ringside ejects an endpoint that refused or timed out for 1s, doubling to 30s"
        }
        "portLevelSettings" => "not honoured: the rule's settings apply to every port",
        "workloadSelector" => "not supported: the rule applies to this proxy",
        "location" => "not used: ringside routes by its listeners",
        _ => "not supported, ignored",
    }
}

/// Fields of a document ringside does not read; each is reported.
type Other = BTreeMap<String, Value>;

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Value,
}

#[derive(Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DestinationRule {
    #[serde(default)]
    host: String,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    subsets: Vec<DrSubset>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrafficPolicy {
    #[serde(default)]
    load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    tls: Option<ClientTls>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct LoadBalancerSettings {
    #[serde(default)]
    simple: Option<String>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct ClientTls {
    #[serde(default)]
    mode: Option<String>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DrSubset {
    #[serde(default)]
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicy>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct VirtualService {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    tcp: Vec<VsTcpRoute>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct VsTcpRoute {
    #[serde(rename = "match", default)]
    matches: Vec<L4Match>,
    #[serde(default)]
    route: Vec<RouteDestination>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct L4Match {
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    source_namespace: Option<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct RouteDestination {
    #[serde(default)]
    destination: Option<Destination>,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct Destination {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<PortSelector>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct PortSelector {
    #[serde(default)]
    number: Option<u32>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceEntry {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    endpoints: Vec<WorkloadEntry>,
    /// Virtual IPs clients dial: an outbound capture routes `address:port` here (SPEC §8).
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    workload_selector: Option<WorkloadSelector>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    #[serde(default)]
    number: u32,
    #[serde(default)]
    name: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    target_port: Option<u32>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
struct WorkloadSelector {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(flatten)]
    other: Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadEntry {
    #[serde(default)]
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    service_account: String,
    #[serde(flatten)]
    other: Other,
}

/// Split a file into documents; keep the Istio networking ones, report the others.
fn parse_file(source: &Source, docs: &mut Vec<Doc>, reports: &mut Vec<String>) -> Result<(), Error> {
    let file = source.file;
    for (i, de) in serde_yaml_ng::Deserializer::from_str(source.text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(de).map_err(|e| Error {
            file: file.to_string(),
            line: e.location().map(|l| l.line()),
            reason: format!("document {index}: {}", strip_location(&e.to_string())),
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let head: Head = serde_yaml_ng::from_value(value).map_err(|e| Error {
            file: file.to_string(),
            line: None,
            reason: format!("document {index}: {}", strip_location(&e.to_string())),
        })?;
        let (group, version) = head.api_version.split_once('/').unwrap_or(("", &head.api_version));
        let name = if head.metadata.name.is_empty() { "-".to_string() } else { head.metadata.name };
        let kind = match head.kind.as_str() {
            "DestinationRule" => "DestinationRule",
            "VirtualService" => "VirtualService",
            "ServiceEntry" => "ServiceEntry",
            "WorkloadEntry" => "WorkloadEntry",
            _ => "",
        };
        let istio = group == "networking.istio.io" && matches!(version, "v1" | "v1beta1" | "v1alpha3");
        if kind.is_empty() || !istio {
            let why = if group == "networking.istio.io" {
                "an Istio networking kind or version ringside does not read"
            } else {
                "not an Istio networking document"
            };
            let kind = if head.kind.is_empty() { "no kind" } else { head.kind.as_str() };
            reports.push(format!(
                "{file}: document {index} ({kind}/{name}, apiVersion {:?}): {why}; skipped",
                head.api_version
            ));
            continue;
        }
        let bad = |e: serde_yaml_ng::Error| Error {
            file: file.to_string(),
            line: None,
            reason: format!("document {index} ({kind}/{name}): spec: {}", strip_location(&e.to_string())),
        };
        let spec = head.spec;
        let body = match kind {
            "DestinationRule" => Body::DestinationRule(serde_yaml_ng::from_value(spec).map_err(bad)?),
            "VirtualService" => Body::VirtualService(serde_yaml_ng::from_value(spec).map_err(bad)?),
            "ServiceEntry" => Body::ServiceEntry(serde_yaml_ng::from_value(spec).map_err(bad)?),
            _ => Body::WorkloadEntry(serde_yaml_ng::from_value(spec).map_err(bad)?),
        };
        let doc = Doc {
            file: file.to_string(),
            index,
            kind,
            name,
            namespace: head.metadata.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
            body,
        };
        docs.push(doc);
    }
    Ok(())
}

/// serde_yaml appends " at line L column C"; the line is reported separately.
fn strip_location(message: &str) -> &str {
    message.find(" at line ").map_or(message, |i| &message[..i])
}

fn port(doc: &Doc, what: &str, n: u32) -> Result<u16, Error> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| doc.error(format!("{what}: port {n} is not 1-65535")))
}

/// A ServiceEntry: one cluster per host and port, its endpoints inline or the selected
/// WorkloadEntries (same namespace, labels including the selector's).
fn service_entry<'a>(
    cfg: &mut Config,
    doc: &Doc,
    se: &ServiceEntry,
    workload_entries: &[(&'a Doc, &'a WorkloadEntry)],
    selected: &mut BTreeSet<(&'a str, &'a str)>,
    reports: &mut Vec<String>,
) -> Result<(), Error> {
    doc.unsupported("spec.", &se.other, reports);
    if se.hosts.is_empty() {
        return Err(doc.error("spec.hosts: at least one host is needed"));
    }
    if se.ports.is_empty() {
        return Err(doc.error("spec.ports: at least one port is needed"));
    }
    match se.resolution.as_deref() {
        Some("STATIC") => {}
        other => reports.push(format!(
            "{}: spec.resolution {}: not supported; IP endpoints are used as STATIC, hostnames skipped",
            doc.at(),
            other.unwrap_or("NONE (the default)")
        )),
    }
    // The workloads behind every port: (entry, workload name and namespace, or none inline).
    let mut workloads: Vec<(&WorkloadEntry, Option<(&str, &str)>)> =
        se.endpoints.iter().map(|e| (e, None)).collect();
    if let Some(selector) = &se.workload_selector {
        doc.unsupported("spec.workloadSelector.", &selector.other, reports);
        if !se.endpoints.is_empty() {
            return Err(doc.error("spec: endpoints and workloadSelector are mutually exclusive"));
        }
        for (we_doc, we) in workload_entries {
            if we_doc.namespace == doc.namespace && contains_all(&we.labels, &selector.labels) {
                selected.insert((we_doc.namespace.as_str(), we_doc.name.as_str()));
                workloads.push((we, Some((we_doc.name.as_str(), we_doc.namespace.as_str()))));
            }
        }
    }
    // Single addresses only: a CIDR would need a prefix match the capture lookup does not do.
    let vips: Vec<IpAddr> = se
        .addresses
        .iter()
        .filter_map(|a| {
            let ip = a.strip_suffix("/32").or_else(|| a.strip_suffix("/128")).unwrap_or(a).parse().ok();
            if ip.is_none() {
                reports.push(format!(
                    "{}: spec.addresses {a}: only single IP addresses are supported; skipped",
                    doc.at()
                ));
            }
            ip
        })
        .collect();
    for (i, sp) in se.ports.iter().enumerate() {
        let number = port(doc, &format!("spec.ports[{i}]"), sp.number)?;
        doc.unsupported(&format!("spec.ports[{i}]."), &sp.other, reports);
        if let Some(p) = sp.protocol.as_deref()
            && matches!(p, "HTTP" | "HTTP2" | "HTTPS" | "GRPC" | "GRPC-WEB")
        {
            reports.push(format!("{}: spec.ports[{i}] protocol {p}: relayed as TCP", doc.at()));
        }
        for host in &se.hosts {
            if host.starts_with('*') {
                reports.push(format!("{}: host {host}: wildcard hosts are not supported; skipped", doc.at()));
                continue;
            }
            let name = format!("outbound|{number}||{host}");
            if let Some(c) = cfg.clusters.iter().find(|c| c.name == name) {
                let by = c.source.as_deref().unwrap_or("the config file");
                reports.push(format!(
                    "{}: host {host} port {number}: already defined by {by}; skipped",
                    doc.at()
                ));
                continue;
            }
            let mut endpoints = Vec::new();
            for (we, workload) in &workloads {
                let Ok(ip) = we.address.parse::<IpAddr>() else {
                    reports.push(format!(
                        "{}: endpoint {:?}: only IP addresses are supported; skipped",
                        doc.at(),
                        we.address
                    ));
                    continue;
                };
                let target = we.ports.get(&sp.name).copied().or(sp.target_port).unwrap_or(u32::from(number));
                let (workload_name, namespace) = workload.unwrap_or(("", &doc.namespace));
                endpoints.push(Endpoint {
                    labels: we.labels.clone(),
                    workload_name: workload_name.to_string(),
                    namespace: namespace.to_string(),
                    service_account: we.service_account.clone(),
                    ..Endpoint::at(SocketAddr::new(
                        ip,
                        port(doc, &format!("endpoint {}", we.address), target)?,
                    ))
                });
            }
            if endpoints.is_empty() {
                reports.push(format!(
                    "{}: host {host} port {number}: no endpoints; its connections fail with UH",
                    doc.at()
                ));
            }
            cfg.clusters.push(std::sync::Arc::new(Cluster {
                name,
                service: Some(host.clone()),
                service_namespace: Some(doc.namespace.clone()),
                service_port: Some(number),
                load_balancer: LoadBalancer::default(),
                addresses: vips.iter().map(|ip| SocketAddr::new(*ip, number)).collect(),
                endpoints: std::sync::Arc::new(endpoints),
                subsets: Vec::new(),
                tls: None,
                original_dst: false,
                bind_source: None,
                source: Some(doc.at()),
                tunnel: None,
            }));
        }
    }
    for (we, workload) in &workloads {
        let at = match workload {
            Some((name, _)) => format!("WorkloadEntry {name}: "),
            None => format!("endpoint {}: ", we.address),
        };
        doc.unsupported(&at, &we.other, reports);
    }
    Ok(())
}

fn contains_all(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A DestinationRule: subsets, load balancer and TLS mode onto every cluster of its host.
/// A second rule for a host adds its subsets; its traffic policy is reported, not applied
/// (istiod merges rules for one host the same way).
fn destination_rule(
    cfg: &mut Config,
    doc: &Doc,
    dr: &DestinationRule,
    ruled: &mut BTreeSet<String>,
    reports: &mut Vec<String>,
) -> Result<(), Error> {
    doc.unsupported("spec.", &dr.other, reports);
    if dr.host.is_empty() {
        return Err(doc.error("spec.host: a host is needed"));
    }
    let host = doc.fqdn(&dr.host);
    if host.starts_with('*') {
        reports.push(format!("{}: host {host}: wildcard hosts are not supported; skipped", doc.at()));
        return Ok(());
    }
    let mut subsets = Vec::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        if s.name.is_empty() {
            return Err(doc.error(format!("spec.subsets[{i}]: a subset needs a name")));
        }
        doc.unsupported(&format!("spec.subsets[{i}]."), &s.other, reports);
        let mut load_balancer = None;
        if let Some(tp) = &s.traffic_policy {
            let path = format!("spec.subsets[{i}].trafficPolicy.");
            doc.unsupported(&path, &tp.other, reports);
            if let Some(lb) = &tp.load_balancer {
                load_balancer = simple(doc, &format!("{path}loadBalancer."), lb, reports)?;
            }
            if tp.tls.is_some() {
                reports.push(format!(
                    "{}: {path}tls: not supported per subset; the rule's tls mode applies",
                    doc.at()
                ));
            }
        }
        subsets.push(Subset { name: s.name.clone(), labels: s.labels.clone(), load_balancer });
    }
    let first = ruled.insert(host.clone());
    let mut load_balancer = None;
    let mut tls_mode = None;
    if let Some(tp) = &dr.traffic_policy {
        if first {
            doc.unsupported("spec.trafficPolicy.", &tp.other, reports);
            if let Some(lb) = &tp.load_balancer {
                load_balancer = simple(doc, "spec.trafficPolicy.loadBalancer.", lb, reports)?;
            }
            if let Some(tls) = &tp.tls {
                doc.unsupported("spec.trafficPolicy.tls.", &tls.other, reports);
                tls_mode = tls.mode.as_deref();
            }
        } else {
            reports.push(format!(
                "{}: spec.trafficPolicy: an earlier DestinationRule for {host} sets the policy; not applied",
                doc.at()
            ));
        }
    }
    let workload_tls = cfg.clusters.iter().find_map(|c| c.tls.clone());
    let mut matched = false;
    let serving: Vec<usize> = (0..cfg.clusters.len())
        .filter(|&i| cfg.clusters[i].service.as_deref() == Some(host.as_str()))
        .collect();
    for i in serving {
        let c = std::sync::Arc::make_mut(&mut cfg.clusters[i]);
        matched = true;
        let mut taken = Vec::new();
        for s in &subsets {
            if c.subsets.iter().any(|x| x.name == s.name) {
                taken.push(s.name.as_str());
            } else {
                c.subsets.push(s.clone());
            }
        }
        if !taken.is_empty() {
            reports.push(format!(
                "{}: subsets {}: cluster {} already has them (an earlier rule); not applied",
                doc.at(),
                taken.join(", "),
                c.name
            ));
        }
        if let Some(lb) = load_balancer {
            c.load_balancer = lb;
        }
        match tls_mode {
            None | Some("UNSET") => {}
            // A cluster's `tls:` is ISTIO_MUTUAL (SPEC §7); one without gets the workload's
            // certificates from another cluster's `tls:` (a pod has one workload certificate),
            // without subject_alt_names to check (the rule names none).
            Some("ISTIO_MUTUAL") => match (&c.tls, &workload_tls) {
                (Some(_), _) => {}
                (None, Some(tls)) => c.tls = Some(ClusterTls { subject_alt_names: Vec::new(), ..tls.clone() }),
                (None, None) => reports.push(format!(
                    "{}: tls mode ISTIO_MUTUAL: cluster {} has no certificates (no cluster in the config has a tls: block); its connections stay plaintext",
                    doc.at(),
                    c.name
                )),
            },
            Some("DISABLE") => {
                if c.tls.take().is_some() {
                    reports.push(format!("{}: tls mode DISABLE: cluster {} is plaintext", doc.at(), c.name));
                }
            }
            Some(mode @ ("SIMPLE" | "MUTUAL")) => reports.push(format!(
                "{}: tls mode {mode}: not supported (only ISTIO_MUTUAL and DISABLE); not applied",
                doc.at()
            )),
            Some(mode) => return Err(doc.error(format!("spec.trafficPolicy.tls.mode {mode:?}: unknown mode"))),
        }
    }
    if !matched {
        reports.push(format!("{}: host {host}: no ServiceEntry or cluster serves it; not applied", doc.at()));
    }
    Ok(())
}

/// `loadBalancer.simple` as a ringside load balancer (`None`: keep the default).
fn simple(
    doc: &Doc,
    path: &str,
    lb: &LoadBalancerSettings,
    reports: &mut Vec<String>,
) -> Result<Option<LoadBalancer>, Error> {
    doc.unsupported(path, &lb.other, reports);
    Ok(match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") => None,
        Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        // LEAST_CONN is the deprecated name of LEAST_REQUEST; both pick the fewest live
        // connections at L4.
        Some("LEAST_REQUEST" | "LEAST_CONN") => Some(LoadBalancer::LeastConnection),
        Some("RANDOM") => Some(LoadBalancer::Random),
        Some("PASSTHROUGH") => {
            reports.push(format!("{}: {path}simple PASSTHROUGH: not supported; round robin", doc.at()));
            None
        }
        Some(other) => return Err(doc.error(format!("{path}simple {other:?}: unknown load balancer"))),
    })
}

/// A VirtualService: its tcp routes become `service_routes`, one per host and match port
/// that applies to this proxy (a match whose `sourceLabels`/`sourceNamespace` do not fit the
/// local node, or that names only gateways, does not).
fn virtual_service(
    cfg: &mut Config,
    doc: &Doc,
    vs: &VirtualService,
    reports: &mut Vec<String>,
) -> Result<(), Error> {
    doc.unsupported("spec.", &vs.other, reports);
    if vs.hosts.is_empty() {
        return Err(doc.error("spec.hosts: at least one host is needed"));
    }
    if !applies_to_sidecars(&vs.gateways) {
        reports.push(format!(
            "{}: spec.gateways {:?}: applies to gateways only (no \"mesh\"); skipped",
            doc.at(),
            vs.gateways
        ));
        return Ok(());
    }
    let hosts: Vec<String> = vs
        .hosts
        .iter()
        .map(|h| doc.fqdn(h))
        .filter(|h| {
            let wildcard = h.starts_with('*');
            if wildcard {
                reports.push(format!("{}: host {h}: wildcard hosts are not supported; skipped", doc.at()));
            }
            !wildcard
        })
        .collect();
    let node_namespace = if cfg.node.namespace.is_empty() { "default" } else { cfg.node.namespace.as_str() };
    let mut routes = Vec::new();
    for (ri, tcp) in vs.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{ri}]");
        doc.unsupported(&format!("{path}."), &tcp.other, reports);
        if tcp.route.is_empty() {
            return Err(doc.error(format!("{path}.route: at least one destination is needed")));
        }
        // Match ports that apply here; `None` is any port (no match at all).
        let mut ports: Vec<Option<u16>> = Vec::new();
        if tcp.matches.is_empty() {
            ports.push(None);
        }
        for (mi, m) in tcp.matches.iter().enumerate() {
            let mpath = format!("{path}.match[{mi}]");
            if !m.other.is_empty() {
                doc.unsupported(&format!("{mpath}."), &m.other, reports);
                reports.push(format!("{}: {mpath}: has conditions ringside cannot check; skipped", doc.at()));
                continue;
            }
            let fits = applies_to_sidecars(&m.gateways)
                && contains_all(&cfg.node.labels, &m.source_labels)
                && m.source_namespace.as_deref().is_none_or(|ns| ns == node_namespace);
            if fits {
                let p = m.port.map(|p| port(doc, &format!("{mpath}.port"), p)).transpose()?;
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        // The destinations are checked even when no match applies: broken config is broken.
        let check_port = match ports.first() {
            Some(p) => *p,
            None => tcp.matches.iter().find_map(|m| m.port).and_then(|p| u16::try_from(p).ok()),
        };
        resolve(cfg, doc, &path, tcp, check_port, reports)?;
        for p in ports {
            let tcp_routes = resolve(cfg, doc, &path, tcp, p, &mut Vec::new())?;
            for host in &hosts {
                // First match wins (SPEC §6): an earlier route for the host on this port (or
                // any port) leaves this one unused; say so rather than drop it silently.
                let earlier = cfg
                    .service_routes
                    .iter()
                    .chain(&routes)
                    .find(|r| &r.host == host && (r.match_port.is_none() || r.match_port == p));
                if let Some(earlier) = earlier {
                    let port = p.map_or("any port".to_string(), |p| format!("port {p}"));
                    let by = earlier.source.as_deref().unwrap_or("the config file");
                    reports.push(format!(
                        "{}: {path} ({host}, {port}): never used, an earlier route matches first ({by})",
                        doc.at()
                    ));
                }
                routes.push(ServiceRoute {
                    host: host.clone(),
                    match_port: p,
                    tcp_routes: tcp_routes.clone(),
                    source: Some(doc.at()),
                });
            }
        }
    }
    cfg.service_routes.extend(routes);
    Ok(())
}

fn applies_to_sidecars(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// The weighted destinations of one tcp route, for a listener on `match_port`: each
/// destination host's cluster for that port, its subset checked against the rules.
fn resolve(
    cfg: &Config,
    doc: &Doc,
    path: &str,
    tcp: &VsTcpRoute,
    match_port: Option<u16>,
    reports: &mut Vec<String>,
) -> Result<Vec<TcpRoute>, Error> {
    let single = tcp.route.len() == 1;
    let mut out = Vec::new();
    let mut total: i64 = 0;
    for (di, rd) in tcp.route.iter().enumerate() {
        let dpath = format!("{path}.route[{di}]");
        doc.unsupported(&format!("{dpath}."), &rd.other, reports);
        let Some(d) = &rd.destination else {
            return Err(doc.error(format!("{dpath}: no destination")));
        };
        doc.unsupported(&format!("{dpath}.destination."), &d.other, reports);
        let Some(host) = d.host.as_deref().filter(|h| !h.is_empty()) else {
            return Err(doc.error(format!("{dpath}.destination: no host")));
        };
        let host = doc.fqdn(host);
        let wanted = match d.port.as_ref() {
            Some(p) => {
                doc.unsupported(&format!("{dpath}.destination.port."), &p.other, reports);
                p.number.map(|n| port(doc, &format!("{dpath}.destination.port.number"), n)).transpose()?
            }
            None => None,
        };
        let cluster = pick_cluster(cfg, &host, wanted.or(match_port), wanted.is_some())
            .map_err(|why| doc.error(format!("{dpath}.destination: {why}")))?;
        if let Some(s) = &d.subset
            && !cluster.subsets.iter().any(|x| &x.name == s)
        {
            return Err(doc.error(format!(
                "{dpath}.destination: subset {s:?}: no DestinationRule for host {host} defines it"
            )));
        }
        // Istio: one destination takes all traffic; with several, an unset weight is 0.
        let weight = rd.weight.unwrap_or(if single { 100 } else { 0 });
        if weight < 0 {
            return Err(doc.error(format!("{dpath}.weight: negative weight {weight}")));
        }
        total = total.saturating_add(weight);
        out.push(TcpRoute { cluster: cluster.name.clone(), subset: d.subset.clone(), weight });
    }
    if total == 0 {
        return Err(doc.error(format!("{path}.route: weights add up to zero")));
    }
    Ok(out)
}

/// The cluster of `host` for `port`: the one serving that port, else one that serves the
/// host on any port (a cluster from the config file has no port). Without a port, the
/// host's only cluster.
fn pick_cluster<'c>(
    cfg: &'c Config,
    host: &str,
    port: Option<u16>,
    explicit: bool,
) -> Result<&'c Cluster, String> {
    let all: Vec<&Cluster> =
        cfg.clusters.iter().map(|c| &**c).filter(|c| c.service.as_deref() == Some(host)).collect();
    if all.is_empty() {
        return Err(format!("host {host}: no ServiceEntry or cluster serves it"));
    }
    let ports = || {
        let p: Vec<String> = all.iter().filter_map(|c| c.service_port).map(|p| p.to_string()).collect();
        p.join(", ")
    };
    if let Some(p) = port {
        if let Some(c) = all
            .iter()
            .find(|c| c.service_port == Some(p))
            .or_else(|| all.iter().find(|c| c.service_port.is_none()))
        {
            return Ok(c);
        }
        if explicit || all.len() > 1 {
            return Err(format!("host {host} has no port {p} (it serves {})", ports()));
        }
    }
    match all.as_slice() {
        [one] => Ok(one),
        _ => Err(format!("host {host} serves several ports ({}): say destination.port.number", ports())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(docs: &[(&str, &str)]) -> Result<(Config, Vec<String>), Error> {
        let mut cfg = Config::default();
        let sources: Vec<Source> = docs.iter().map(|(file, text)| Source { file, text }).collect();
        let reports = apply(&mut cfg, &sources)?;
        Ok((cfg, reports))
    }

    const MONGO: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mongodb, namespace: default}
spec:
  hosts: [mongodb.default.svc.cluster.local]
  ports: [{number: 27017, name: mongo, protocol: MONGO}]
  resolution: STATIC
  workloadSelector: {labels: {app: mongodb}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: mongodb-v1}
spec:
  address: 127.0.10.1
  ports: {mongo: 27018}
  labels: {app: mongodb, version: v1}
  serviceAccount: bookinfo-mongodb
---
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadEntry
metadata: {name: mongodb-v2}
spec:
  address: 127.0.10.2
  labels: {app: mongodb, version: v2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mongodb}
spec:
  host: mongodb
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
";

    #[test]
    fn a_service_entry_with_workload_entries_becomes_a_cluster_per_port() {
        let (cfg, reports) = load(&[("mongo.yaml", MONGO)]).unwrap();
        assert!(reports.is_empty(), "{reports:?}");
        let all: Vec<_> = cfg.clusters.iter().collect();
        let [c] = all.as_slice() else { panic!("{:?}", cfg.clusters) };
        assert_eq!(c.name, "outbound|27017||mongodb.default.svc.cluster.local");
        assert_eq!(c.service.as_deref(), Some("mongodb.default.svc.cluster.local"));
        assert_eq!(c.service_port, Some(27017));
        // The port by name from the WorkloadEntry, else the service port.
        let addrs: Vec<String> = c.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["127.0.10.1:27018", "127.0.10.2:27017"]);
        assert_eq!(c.endpoints[0].workload_name, "mongodb-v1");
        assert_eq!(c.endpoints[0].namespace, "default");
        assert_eq!(c.endpoints[0].service_account, "bookinfo-mongodb");
        assert_eq!(c.endpoints[1].labels["version"], "v2");
        // The short host `mongodb` in the rule is mongodb.default.svc.cluster.local.
        assert_eq!(c.load_balancer, LoadBalancer::LeastConnection);
        assert_eq!(c.subsets.len(), 2);
        assert_eq!(c.subsets[1].load_balancer, Some(LoadBalancer::Random));
    }

    fn vs(tcp: &str) -> String {
        format!(
            "{MONGO}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: mongodb}}
spec:
  hosts: [mongodb]
  tcp:
{tcp}"
        )
    }

    #[test]
    fn tcp_routes_become_service_routes_per_host_and_match_port() {
        let text = vs("  - match: [{port: 27017}, {port: 27018}]
    route:
    - {destination: {host: mongodb, subset: v1, port: {number: 27017}}, weight: 80}
    - {destination: {host: mongodb.default.svc.cluster.local, subset: v2}, weight: 20}
  - route: [{destination: {host: mongodb, subset: v2}}]
");
        let (mut cfg, reports) = load(&[("vs.yaml", &text)]).unwrap();
        assert!(reports.is_empty(), "{reports:?}");
        type Summary<'a> = Vec<(Option<u16>, Vec<(Option<&'a str>, i64)>)>;
        let summary: Summary = cfg
            .service_routes
            .iter()
            .map(|r| (r.match_port, r.tcp_routes.iter().map(|t| (t.subset.as_deref(), t.weight)).collect()))
            .collect();
        assert_eq!(
            summary,
            [
                (Some(27017), vec![(Some("v1"), 80), (Some("v2"), 20)]),
                (Some(27018), vec![(Some("v1"), 80), (Some("v2"), 20)]),
                (None, vec![(Some("v2"), 100)]),
            ]
        );
        assert!(cfg.service_routes.iter().all(|r| r.host == "mongodb.default.svc.cluster.local"));
        assert_eq!(
            cfg.service_routes[0].tcp_routes[0].cluster,
            "outbound|27017||mongodb.default.svc.cluster.local"
        );
        assert!(
            cfg.service_routes[0]
                .source
                .as_deref()
                .unwrap()
                .contains("vs.yaml: document 5 (VirtualService/mongodb)")
        );
        // What it produced is a valid config.
        cfg.listeners = crate::config::Config::parse(
            "listeners: [{name: m, listen: 127.0.0.1:27017, direction: outbound, service: mongodb.default.svc.cluster.local}]",
            "t",
        )
        .unwrap()
        .listeners;
        cfg.validate("t", "").unwrap();
    }

    #[test]
    fn a_route_an_earlier_one_shadows_is_reported() {
        let text = vs("  - route: [{destination: {host: mongodb, subset: v1}}]
  - match: [{port: 27017}]
    route: [{destination: {host: mongodb, subset: v2}}]
");
        let (_, reports) = load(&[("vs.yaml", &text)]).unwrap();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(
            reports[0].contains("spec.tcp[1] (mongodb.default.svc.cluster.local, port 27017): never used, an earlier route matches first (vs.yaml: document 5 (VirtualService/mongodb))"),
            "{reports:?}"
        );
    }

    #[test]
    fn matches_for_other_workloads_or_gateways_do_not_apply_here() {
        let text = vs("  - match: [{port: 1, sourceLabels: {app: other}}, {port: 2, gateways: [gw]}, {port: 3, sourceNamespace: prod}, {port: 4, destinationSubnets: [10.0.0.0/8]}]
    route: [{destination: {host: mongodb, port: {number: 27017}}}]
");
        let (cfg, reports) = load(&[("vs.yaml", &text)]).unwrap();
        assert!(cfg.service_routes.is_empty(), "{:?}", cfg.service_routes);
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert!(reports[0].contains("spec.tcp[0].match[3].destinationSubnets: not supported"), "{reports:?}");
    }

    #[test]
    fn unsupported_fields_and_other_kinds_are_reported_one_line_each() {
        let text = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: mongodb-v1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: prod}
spec:
  hosts: [ratings]
  exportTo: ['.']
  http: [{route: [{destination: {host: ratings, subset: v2}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: prod}
spec:
  host: ratings
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}, outlierDetection: {consecutive5xxErrors: 1}}
---
";
        let (cfg, reports) = load(&[("mixed.yaml", text)]).unwrap();
        assert!(cfg.clusters.is_empty() && cfg.service_routes.is_empty());
        let expected = [
            "mixed.yaml: document 1 (Deployment/mongodb-v1, apiVersion \"apps/v1\"): not an Istio networking document; skipped",
            // Rules are applied (and reported) before routes.
            "mixed.yaml: document 3 (DestinationRule/ratings): spec.trafficPolicy.connectionPool: not honoured",
            "mixed.yaml: document 3 (DestinationRule/ratings): spec.trafficPolicy.outlierDetection: not honoured",
            "mixed.yaml: document 3 (DestinationRule/ratings): host ratings.prod.svc.cluster.local: no ServiceEntry or cluster serves it",
            "mixed.yaml: document 2 (VirtualService/ratings): spec.exportTo: not supported",
            "mixed.yaml: document 2 (VirtualService/ratings): spec.http: HTTP routes are not applied",
        ];
        assert_eq!(reports.len(), expected.len(), "{reports:#?}");
        for (r, e) in reports.iter().zip(expected) {
            assert!(r.starts_with(e), "{r:?} does not start with {e:?}");
        }
    }

    #[test]
    fn bookinfo_rules_load_and_report_what_they_cannot_apply() {
        let all = include_str!("../../tests/data/istio/bookinfo-like/rules.yaml");
        let mtls = include_str!("../../tests/data/istio/bookinfo-like/rules-mtls.yaml");
        let vs = include_str!("../../tests/data/istio/bookinfo-like/routes-http.yaml");
        let ratings = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v2}}]
";
        let (cfg, reports) = load(&[("dr.yaml", all), ("vs.yaml", vs), ("ratings.yaml", ratings)]).unwrap();
        assert_eq!(cfg.clusters[0].subsets.len(), 4);
        let http: Vec<&String> = reports.iter().filter(|r| r.contains("spec.http: HTTP routes")).collect();
        assert_eq!(http.len(), 2, "{reports:#?}");
        let (_, reports) = load(&[("mtls.yaml", mtls), ("ratings.yaml", ratings)]).unwrap();
        assert!(
            reports.iter().any(|r| r.contains("(DestinationRule/ratings): tls mode ISTIO_MUTUAL: cluster outbound|9080||ratings.default.svc.cluster.local has no certificates")),
            "{reports:#?}"
        );
    }

    proptest::proptest! {
        /// A valid file cut and spliced anywhere: an error or a config, never a panic, and a
        /// config that validates builds a router.
        #[test]
        fn any_text_gives_an_error_or_a_config_without_panicking(
            cut in 0usize..2000, splice in 0usize..2000, junk in "[ -~\n]{0,40}",
        ) {
            let text = vs("  - match: [{port: 27017}]\n    route: [{destination: {host: mongodb, subset: v1}, weight: 3}]\n");
            let at = |i: usize| (0..=i.min(text.len())).rev().find(|&j| text.is_char_boundary(j)).unwrap_or(0);
            let mutated = format!("{}{junk}{}", &text[..at(splice)], &text[at(cut)..]);
            if let Ok((mut cfg, _)) = load(&[("p.yaml", &mutated)]) {
                let service = "listeners: [{name: m, listen: 127.0.0.1:27017, direction: outbound, service: mongodb.default.svc.cluster.local}]";
                cfg.listeners = Config::parse(service, "t").unwrap().listeners;
                if cfg.validate("p.yaml", &mutated).is_ok() {
                    crate::routing::Router::new(&cfg, 1);
                }
            }
        }
    }

    #[test]
    fn istio_mutual_gives_a_service_entry_cluster_the_workload_certificates_of_the_config() {
        let mtls = include_str!("../../tests/data/istio/bookinfo-like/rules-mtls.yaml");
        let ratings = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
";
        let mut cfg = Config::parse(
            "clusters: [{name: db, endpoints: [{address: 127.0.0.1:1}], tls: {mode: istio_mutual, cert_chain: c.pem, private_key: k.pem, root_cert: r.pem, subject_alt_names: [spiffe://cluster.local/ns/default/sa/db]}}]",
            "t",
        )
        .unwrap();
        let sources =
            [Source { file: "mtls.yaml", text: mtls }, Source { file: "ratings.yaml", text: ratings }];
        let reports = apply(&mut cfg, &sources).unwrap();
        assert!(!reports.iter().any(|r| r.contains("ISTIO_MUTUAL")), "{reports:#?}");
        let tls = cfg.clusters[1].tls.as_ref().expect("ISTIO_MUTUAL applied");
        assert_eq!((tls.cert_chain.as_str(), tls.root_cert.as_str()), ("c.pem", "r.pem"));
        assert!(tls.subject_alt_names.is_empty());
    }

    #[test]
    fn service_entry_addresses_are_the_clusters_capture_addresses_per_port() {
        let se = MONGO.replace(
            "  resolution: STATIC",
            "  resolution: STATIC\n  addresses: [240.0.0.7, 240.0.0.8/32, 240.1.0.0/16]",
        );
        let (cfg, reports) = load(&[("se.yaml", &se)]).unwrap();
        let want: Vec<SocketAddr> =
            vec!["240.0.0.7:27017".parse().unwrap(), "240.0.0.8:27017".parse().unwrap()];
        assert_eq!(cfg.clusters[0].addresses, want);
        assert!(
            reports.iter().any(|r| r.contains("spec.addresses 240.1.0.0/16: only single IP")),
            "{reports:#?}"
        );
    }

    fn error(text: &str) -> String {
        load(&[("bad.yaml", text)]).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn broken_documents_name_file_document_and_reason() {
        let e = error("apiVersion: networking.istio.io/v1\nkind: [unclosed\n");
        assert!(e.starts_with("bad.yaml:3: document 1: did not find expected"), "{e}");
        let e = error(&vs("  - route: [{destination: {subset: v1}}]\n"));
        assert_eq!(
            e,
            "bad.yaml: document 5 (VirtualService/mongodb): spec.tcp[0].route[0].destination: no host"
        );
        let e = error(&vs("  - route: [{destination: {host: mongodb, subset: v9}}]\n"));
        assert!(
            e.ends_with(
                "subset \"v9\": no DestinationRule for host mongodb.default.svc.cluster.local defines it"
            ),
            "{e}"
        );
        let e = error(&vs(
            "  - route: [{destination: {host: mongodb}, weight: 0}, {destination: {host: mongodb}, weight: 0}]\n",
        ));
        assert!(e.ends_with("spec.tcp[0].route: weights add up to zero"), "{e}");
        let e = error(&vs("  - route: [{destination: {host: nosuch}}]\n"));
        assert!(
            e.ends_with("host nosuch.default.svc.cluster.local: no ServiceEntry or cluster serves it"),
            "{e}"
        );
        let e = error(&vs("  - route: [{destination: {host: mongodb, port: {number: 1}}}]\n"));
        assert!(e.contains("has no port 1 (it serves 27017)"), "{e}");
        let e = error(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x}\nspec: {host: 7, subsets: 3}\n",
        );
        assert!(e.starts_with("bad.yaml: document 1 (DestinationRule/x): spec: "), "{e}");
    }
}
