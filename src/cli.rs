//! Command-line flags (SPEC §4) and how they override the YAML file; Envoy's command line and
//! bootstrap into the same config (SPEC §10). No I/O beyond reading the config, bootstrap and
//! `--istio` files.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::de::{DeserializeOwned, IntoDeserializer};

use crate::capture::iptables;
use crate::config::{self, Bind, Cluster, Config, Dur, Endpoint, Listener, Size};
use crate::{bootstrap, envoy_cli, routing};

/// ringside: an L4 sidecar proxy with Istio's peer exchange and TCP metrics.
#[derive(Debug, Parser)]
#[command(name = "ringside", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Check a configuration and exit.
    Validate(RunArgs),
    /// Run the built-in two-sidecar demo and print the TCP metrics.
    Demo(DemoArgs),
    /// Print, add or remove the transparent-capture iptables rules of this network
    /// namespace (SPEC §8), as Istio's init container does.
    Iptables(IptablesArgs),
}

/// Flags of `ringside iptables`: exactly one action, and what to capture.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["print", "apply", "clean"])))]
pub struct IptablesArgs {
    /// Write the rules, one `iptables` command per line; change nothing.
    #[arg(long)]
    pub print: bool,
    /// Add the rules (all or, on a failure, none).
    #[arg(long)]
    pub apply: bool,
    /// Remove what --apply added.
    #[arg(long)]
    pub clean: bool,
    /// The proxy's uid, whose own connections are never captured.
    #[arg(long, default_value_t = iptables::PROXY_ID)]
    pub proxy_uid: u32,
    /// The proxy's gid, likewise (optional).
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Inbound destination ports to capture: `*` or a comma-separated list (empty: none).
    #[arg(long, default_value = "*", value_parser = iptables::parse_select::<u16>)]
    pub include_ports: iptables::Select<u16>,
    /// Inbound destination ports never captured (with --include-ports '*').
    #[arg(long, default_value = "15090,15021,15020", value_parser = iptables::parse_list::<u16>)]
    pub exclude_ports: iptables::List<u16>,
    /// Outbound destination CIDRs to capture: `*` or a comma-separated list (empty: none).
    #[arg(long, default_value = "*", value_parser = iptables::parse_select::<iptables::Cidr>)]
    pub include_cidrs: iptables::Select<iptables::Cidr>,
    /// Outbound destination CIDRs never captured.
    #[arg(long, default_value = "", value_parser = iptables::parse_list::<iptables::Cidr>)]
    pub exclude_cidrs: iptables::List<iptables::Cidr>,
    /// Port of the outbound capture listener.
    #[arg(long, default_value_t = iptables::OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Port of the inbound capture listener.
    #[arg(long, default_value_t = iptables::INBOUND_PORT)]
    pub inbound_port: u16,
    /// Also write the IPv6 rules (ip6tables) and put ::6 on lo; with --clean, remove them.
    #[arg(long)]
    pub ipv6: bool,
}

impl IptablesArgs {
    /// What to capture, from the flags.
    pub fn options(&self) -> iptables::Options {
        iptables::Options {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uid: Some(self.proxy_uid),
            proxy_gid: self.proxy_gid,
            include_ports: self.include_ports.clone(),
            exclude_ports: self.exclude_ports.0.clone(),
            include_cidrs: self.include_cidrs.clone(),
            exclude_cidrs: self.exclude_cidrs.0.clone(),
            ipv6: self.ipv6,
        }
    }
}

/// Flags of `ringside demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Connections to drive through the two sidecars.
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
}

/// Flags of `ringside run` and `ringside validate`; they override the file.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// YAML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// An Envoy bootstrap file (JSON or YAML), as Envoy's `-c` (SPEC §10).
    #[arg(short = 'c', long = "bootstrap", conflicts_with = "config")]
    pub bootstrap: Option<PathBuf>,
    /// Istio networking YAML: a file, or a directory whose *.yaml/*.yml files are read
    /// (repeatable; SPEC §6).
    #[arg(long)]
    pub istio: Vec<PathBuf>,
    /// Listener address (flags describe one listener and one cluster).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Upstream endpoint of the listener's cluster (repeatable).
    #[arg(long)]
    pub upstream: Vec<SocketAddr>,
    /// outbound (reporter=source) or inbound (reporter=destination).
    #[arg(long, value_parser = parse_enum::<config::Direction>)]
    pub direction: Option<config::Direction>,
    /// alpn | always | off.
    #[arg(long, value_parser = parse_enum::<config::PeerExchange>)]
    pub peer_exchange: Option<config::PeerExchange>,
    /// Service host of the cluster, e.g. mongodb.default.svc.cluster.local.
    #[arg(long)]
    pub service: Option<String>,
    /// Node id.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Workload name.
    #[arg(long)]
    pub workload_name: Option<String>,
    /// Namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Pod label KEY=VALUE (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Cluster id.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Service account.
    #[arg(long)]
    pub service_account: Option<String>,
    /// Mesh id.
    #[arg(long)]
    pub mesh_id: Option<String>,
    /// Metrics listener address or `off`.
    #[arg(long)]
    pub metrics: Option<Bind>,
    /// Admin listener address or `off`.
    #[arg(long)]
    pub admin: Option<Bind>,
    /// Health listener address or `off`.
    #[arg(long)]
    pub health: Option<Bind>,
    /// How often live connections report.
    #[arg(long)]
    pub tcp_reporting_duration: Option<Dur>,
    /// Cap on distinct label sets.
    #[arg(long)]
    pub max_label_sets: Option<usize>,
    /// Worker threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// auto | always | never: pin workers to CPUs of the affinity mask.
    #[arg(long, value_parser = parse_enum::<config::Pin>)]
    pub pin: Option<config::Pin>,
    /// auto | uring | epoll.
    #[arg(long, value_parser = parse_enum::<config::Driver>)]
    pub driver: Option<config::Driver>,
    /// Drain time on SIGTERM.
    #[arg(long)]
    pub drain_timeout: Option<Dur>,
    /// Busy-poll window after activity, e.g. 50us (0s: off).
    #[arg(long)]
    pub busy_poll: Option<Dur>,
    /// Upstream connect timeout (every listener).
    #[arg(long)]
    pub connect_timeout: Option<Dur>,
    /// Idle timeout (every listener).
    #[arg(long)]
    pub idle_timeout: Option<Dur>,
    /// Max connections per listener (every listener).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Max preamble size (every listener).
    #[arg(long)]
    pub max_preamble: Option<Size>,
    /// Exchange timeout (every listener).
    #[arg(long)]
    pub exchange_timeout: Option<Dur>,
    /// Sniff timeout (every listener).
    #[arg(long)]
    pub sniff_timeout: Option<Dur>,
    /// ADS server, `HOST:PORT` or `unix:PATH` (SPEC §9).
    #[arg(long)]
    pub xds: Option<String>,
}

/// The config an Envoy bootstrap asks for: the file at `path` (relative to the working
/// directory, `/` in Istio's image) with `overlay` (`--config-yaml`) merged over it. What it
/// holds that ringside does not serve is logged in one line.
pub fn bootstrap_config(
    path: Option<&std::path::Path>,
    overlay: Option<&str>,
) -> Result<Config, config::Error> {
    let file = path.map(|p| p.display().to_string()).unwrap_or_else(|| "--config-yaml".into());
    let error = |message: String| config::Error { file: file.clone(), line: None, message };
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| error(format!("cannot read: {e}")))?,
        None => "{}".to_string(),
    };
    let doc = bootstrap::parse(&text, overlay).map_err(|e| error(e.to_string()))?;
    let b = bootstrap::to_config(&doc).map_err(|e| error(e.to_string()))?;
    if !b.ignored.is_empty() {
        log::warn!("bootstrap: not served by ringside, ignored: {}", b.ignored.join(", "));
    }
    Ok(b.config)
}

/// The validated config of Envoy's command line (SPEC §10): the bootstrap, `--concurrency`
/// as workers, `--drain-time-s` as the drain time.
pub fn envoy_config(o: &envoy_cli::Options) -> Result<Config, config::Error> {
    let path = o.config_path.as_deref().map(std::path::Path::new);
    let mut cfg = bootstrap_config(path, o.config_yaml.as_deref())?;
    if o.concurrency.is_some() {
        cfg.workers = o.concurrency;
    }
    if let Some(d) = o.drain_time {
        cfg.drain_timeout = Dur(d);
    }
    cfg.command_line.clone_from(&o.given);
    cfg.validate(o.config_path.as_deref().unwrap_or("--config-yaml"), "")?;
    Ok(cfg)
}

fn parse_enum<T: DeserializeOwned>(s: &str) -> Result<T, String> {
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = s.into_deserializer();
    T::deserialize(de).map_err(|e| e.to_string())
}

impl RunArgs {
    /// The effective, validated configuration: the file (if any) with the flags on top, then
    /// the `--istio` documents. What the Istio documents say that is not applied, and valid
    /// config that will not serve (a `service:` host with no route), is logged, one line each.
    pub fn into_config(mut self) -> Result<Config, config::Error> {
        let istio = std::mem::take(&mut self.istio);
        let (mut cfg, file, text) = match &self.config {
            None if self.bootstrap.is_some() => {
                let path = self.bootstrap.as_deref();
                (
                    bootstrap_config(path, None)?,
                    path.map(|p| p.display().to_string()).unwrap_or_default(),
                    String::new(),
                )
            }
            Some(path) => {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| config::Error {
                    file: file.clone(),
                    line: None,
                    message: format!("cannot read: {e}"),
                })?;
                (Config::parse(&text, &file)?, file, text)
            }
            None => (Config::default(), String::new(), String::new()),
        };
        self.apply(&mut cfg)?;
        let reports = match istio.is_empty() {
            true => Vec::new(),
            false => {
                let files = read_istio(&istio)?;
                let sources: Vec<routing::istio::Source> =
                    files.iter().map(|(file, text)| routing::istio::Source { file, text }).collect();
                routing::istio::apply(&mut cfg, &sources)?
            }
        };
        cfg.validate(&file, &text)?;
        // Only once the whole config is good, so a bad one prints its one error line alone.
        for r in reports {
            log::warn!("istio: {r}");
        }
        for w in cfg.warnings() {
            log::warn!("{w}");
        }
        Ok(cfg)
    }

    fn apply(self, cfg: &mut Config) -> Result<(), config::Error> {
        self.apply_listener(cfg)?;
        let n = &mut cfg.node;
        set(&mut n.id, self.node_id);
        set(&mut n.workload_name, self.workload_name);
        set(&mut n.namespace, self.namespace);
        set(&mut n.cluster_id, self.cluster_id);
        set(&mut n.service_account, self.service_account);
        set(&mut n.mesh_id, self.mesh_id);
        for l in &self.label {
            let (k, v) = l
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| config::Error::msg(format!("--label {l:?}: want KEY=VALUE")))?;
            n.labels.insert(k.to_string(), v.to_string());
        }
        if let Some(address) = self.xds {
            // The flag sets the address; certificates stay as the file says.
            let certificates = cfg.xds.take().and_then(|x| x.certificates);
            cfg.xds = Some(config::Xds { address, certificates, ..config::Xds::default() });
        }
        if let Some(w) = self.workers {
            cfg.workers = Some(w);
        }
        if let Some(p) = self.pin {
            cfg.pin = p;
        }
        if let Some(d) = self.driver {
            cfg.driver = d;
        }
        if let Some(d) = self.drain_timeout {
            cfg.drain_timeout = d;
        }
        if let Some(d) = self.busy_poll {
            cfg.busy_poll = d;
        }
        if let Some(b) = self.metrics {
            cfg.metrics.listen = b;
        }
        if let Some(d) = self.tcp_reporting_duration {
            cfg.metrics.tcp_reporting_duration = d;
        }
        if let Some(m) = self.max_label_sets {
            cfg.metrics.max_label_sets = m;
        }
        if let Some(b) = self.admin {
            cfg.admin.listen = b;
        }
        if let Some(b) = self.health {
            cfg.health.listen = b;
        }
        for l in &mut cfg.listeners {
            let lim = &mut std::sync::Arc::make_mut(l).limits;
            if let Some(d) = self.connect_timeout {
                lim.connect_timeout = d;
            }
            if let Some(d) = self.idle_timeout {
                lim.idle_timeout = d;
            }
            if let Some(m) = self.max_connections {
                lim.max_connections = m;
            }
            if let Some(s) = self.max_preamble {
                lim.max_preamble = s;
            }
            if let Some(d) = self.exchange_timeout {
                lim.exchange_timeout = d;
            }
            if let Some(d) = self.sniff_timeout {
                lim.sniff_timeout = d;
            }
        }
        Ok(())
    }

    /// `--listen/--upstream/--direction/--peer-exchange/--service` describe one listener and
    /// its cluster; with a file they override the file's only listener.
    fn apply_listener(&self, cfg: &mut Config) -> Result<(), config::Error> {
        let any = self.listen.is_some()
            || !self.upstream.is_empty()
            || self.direction.is_some()
            || self.peer_exchange.is_some()
            || self.service.is_some();
        if !any {
            return Ok(());
        }
        if cfg.listeners.len() > 1 {
            return Err(config::Error::msg(
                "--listen/--upstream/--direction/--peer-exchange/--service need a config with at most one listener",
            ));
        }
        if cfg.listeners.is_empty() {
            let listen =
                self.listen.ok_or_else(|| config::Error::msg("--listen is required without --config"))?;
            if self.upstream.is_empty() {
                return Err(config::Error::msg("--upstream is required without --config"));
            }
            let direction = self
                .direction
                .ok_or_else(|| config::Error::msg("--direction is required without --config"))?;
            cfg.listeners.push(std::sync::Arc::new(Listener {
                name: "main".into(),
                listen,
                direction,
                peer_exchange: config::PeerExchange::default(),
                cluster: Some("upstream".into()),
                tcp_routes: None,
                service: None,
                capture: config::Capture::None,
                limits: config::Limits::default(),
                tls: None,
                istio_stats: true,
                source: None,
                filter_chains: Vec::new(),
                tunnel: None,
                access_log: None,
            }));
            cfg.clusters.push(std::sync::Arc::new(Cluster {
                name: "upstream".into(),
                service: None,
                service_namespace: None,
                load_balancer: config::LoadBalancer::RoundRobin,
                addresses: Vec::new(),
                endpoints: Default::default(),
                subsets: vec![],
                tls: None,
                service_port: None,
                original_dst: false,
                bind_source: None,
                source: None,
                tunnel: None,
            }));
        }
        let l = std::sync::Arc::make_mut(&mut cfg.listeners[0]);
        if let Some(a) = self.listen {
            l.listen = a;
        }
        if let Some(d) = self.direction {
            l.direction = d;
        }
        if let Some(p) = self.peer_exchange {
            l.peer_exchange = p;
        }
        if !self.upstream.is_empty() || self.service.is_some() {
            let name = l.cluster.clone().ok_or_else(|| {
                config::Error::msg("--upstream/--service need the listener to route to one cluster")
            })?;
            let at = cfg.clusters.iter().position(|c| c.name == name);
            let Some(c) = at.and_then(|i| cfg.clusters.get_mut(i)).map(std::sync::Arc::make_mut) else {
                return Err(config::Error::msg(format!(
                    "listener {}: cluster {name:?} is not defined",
                    l.name
                )));
            };
            if !self.upstream.is_empty() {
                c.endpoints = std::sync::Arc::new(self.upstream.iter().map(|a| Endpoint::at(*a)).collect());
            }
            if let Some(s) = &self.service {
                c.service = Some(s.clone());
            }
        }
        Ok(())
    }
}

/// The `--istio` files in order: a file as given; a directory's `*.yaml`/`*.yml` files by name.
fn read_istio(paths: &[PathBuf]) -> Result<Vec<(String, String)>, config::Error> {
    let unreadable = |path: &std::path::Path, e: std::io::Error| config::Error {
        file: path.display().to_string(),
        line: None,
        message: format!("--istio: cannot read: {e}"),
    };
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| unreadable(path, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            found.sort();
            if found.is_empty() {
                log::warn!("--istio {}: no *.yaml or *.yml files", path.display());
            }
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    files
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(&p)
                .map(|text| (p.display().to_string(), text))
                .map_err(|e| unreadable(&p, e))
        })
        .collect()
}

fn set(field: &mut String, value: Option<String>) {
    if let Some(v) = value {
        *field = v;
    }
}
