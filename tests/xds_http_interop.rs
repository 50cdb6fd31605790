//! SPEC §9 (issue #27, HTTP chains): an HTTP port between a ringside pod and a real Envoy
//! 1.40 pod, both ways, over Istio mTLS, each proxy configured only by xDS from the test's
//! ADS server with the resources istiod writes for an HTTP port (Envoy's secrets over ADS, as
//! the agent's SDS would serve them; ringside's from the files `xds.certificates` names).
//!
//! - An Envoy client sidecar sends HTTP/1.1 with the ALPN Istio's `istio.alpn` filter sets
//!   for it (`istio-http/1.1`, `istio`, `http/1.1`; upstream Envoy has no such filter, so the
//!   cluster's UpstreamTlsContext carries that list) to ringside's inbound, shaped as istiod's
//!   inbound chains for an HTTP port: a TLS chain matching `istio-http/*` with an
//!   `http_connection_manager` (`istio.stats` among its HTTP filters) routing to the inbound
//!   cluster, beside the port's TCP chain (`istio-peer-exchange`, `istio`).
//! - A ringside client sidecar's outbound HTTP chain (an inline route to an EDS cluster whose
//!   endpoint is `tlsMode: istio`) calls Envoy's inbound HTTP port (a TLS chain accepting
//!   `istio`, `istio-peer-exchange`, `istio-http/1.1` and an `http_connection_manager`).
//!
//! The app is a small HTTP/1.1 server in the test: it answers each request with the request
//! body reversed and closes the connection, and hands the test the request it received.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;

use ads::{AdsServer, Snapshot, assignment, common_tls, eds_cluster, istio_mutual, lds, rds, static_cluster};
use common::{DEADLINE, Ringside, free_addr, sum, tag_server, wait_for};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};
use pki::{Ca, Certs};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";
const HOST: &str = "reviews.default.svc.cluster.local";
const OUTBOUND: &str = "outbound|9080||reviews.default.svc.cluster.local";
const INBOUND: &str = "inbound|9080||";
/// What Istio's `istio.alpn` filter makes an Envoy client offer for HTTP/1.1 upstreams
/// (istiod 1.18's `alpn_override` for `HTTP11`).
const ALPN_HTTP11: [&str; 3] = ["istio-http/1.1", "istio", "http/1.1"];
/// istiod's inbound chain match for mTLS HTTP.
const MATCH_HTTP: [&str; 3] = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];
/// istiod's downstream ALPN on its HTTP chains (`h2`, `http/1.1`: never `istio`).
const ALPN_IN_HTTP: [&str; 2] = ["h2", "http/1.1"];
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

fn node(workload: &str, app: &str) -> String {
    format!(
        "node:\n  workload_name: {workload}\n  namespace: default\n  labels: {{app: {app}, version: v1}}\n  \
         cluster_id: Kubernetes\n"
    )
}

/// ringside configured only by xDS, with the workload certificate files.
fn sidecar(server: SocketAddr, node: &str, certs: &Certs) -> Ringside {
    let config =
        format!("{node}drain_timeout: 1s\nxds: {{address: {server}, certificates: {{{}}}}}\n", certs.yaml());
    Ringside::spawn_config(&config, server, &["--workers", "2"])
}

fn filter(name: &str, any: Any) -> lds::Filter {
    lds::Filter { name: name.into(), config_type: Some(lds::filter::ConfigType::TypedConfig(any)) }
}

fn http_filter(name: &str, type_url: &str) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
            type_url: type_url.into(),
            value: vec![],
        })),
        ..Default::default()
    }
}

/// An `http_connection_manager` whose inline route sends every host and path (`*`, `/`) to
/// `cluster`, with `istio.stats` among its HTTP filters when `istio_stats` (an upstream Envoy
/// has no such filter), the router last. `xfcc`: Istio's inbound forwarding of the client
/// certificate (`APPEND_FORWARD`, subject, URI and DNS).
fn manager(stat_prefix: &str, cluster: &str, istio_stats: bool, xfcc: bool) -> lds::Filter {
    let route = rds::Route {
        r#match: Some(rds::RouteMatch {
            path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(rds::route::Action::Route(rds::RouteAction {
            cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut http_filters = Vec::new();
    if istio_stats {
        http_filters.push(http_filter("istio.stats", "type.googleapis.com/stats.PluginConfig"));
    }
    http_filters.push(http_filter(
        "envoy.filters.http.router",
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    ));
    let mut m = hcm::HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            rds::RouteConfiguration {
                name: cluster.into(),
                virtual_hosts: vec![rds::VirtualHost {
                    name: format!("{cluster}:*"),
                    domains: vec!["*".into()],
                    routes: vec![route],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters,
        ..Default::default()
    };
    if xfcc {
        use hcm::http_connection_manager::{ForwardClientCertDetails, SetCurrentClientCertDetails};
        m.forward_client_cert_details = ForwardClientCertDetails::AppendForward as i32;
        m.set_current_client_cert_details = Some(SetCurrentClientCertDetails {
            subject: Some(BoolValue { value: true }),
            uri: true,
            dns: true,
            ..Default::default()
        });
    }
    filter("envoy.filters.network.http_connection_manager", ads::any(HCM_TYPE, &m))
}

/// `envoy.transport_sockets.tls` with `ctx` (a Downstream- or UpstreamTlsContext).
fn tls_socket(ctx: Any) -> Option<core::TransportSocket> {
    Some(core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(ctx)),
    })
}

/// A TLS chain for destination port `port`, matching `alpn`, terminating mTLS with `ctx`
/// (client certificate required), serving `filters`.
fn tls_chain(
    port: u16,
    alpn: &[&str],
    ctx: tls::CommonTlsContext,
    filters: Vec<lds::Filter>,
) -> lds::FilterChain {
    let downstream = tls::DownstreamTlsContext {
        common_tls_context: Some(ctx),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    lds::FilterChain {
        name: format!("0.0.0.0_{port}"),
        filter_chain_match: Some(lds::FilterChainMatch {
            destination_port: Some(UInt32Value { value: u32::from(port) }),
            transport_protocol: "tls".into(),
            application_protocols: alpn.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        }),
        filters,
        transport_socket: tls_socket(ads::any(ads::DOWNSTREAM_TLS, &downstream)),
        ..Default::default()
    }
}

/// An inbound listener `name` on `listen` with a `tls_inspector` and `chains`.
fn inbound_listener(name: &str, listen: SocketAddr, chains: Vec<lds::FilterChain>) -> lds::Listener {
    lds::Listener {
        name: name.into(),
        address: Some(ads::address(listen)),
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

/// An outbound listener on `listen` whose one chain is `manager`.
fn outbound_listener(listen: SocketAddr, manager: lds::Filter) -> lds::Listener {
    lds::Listener {
        name: format!("0.0.0.0_{}", listen.port()),
        address: Some(ads::address(listen)),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        filter_chains: vec![lds::FilterChain { filters: vec![manager], ..Default::default() }],
        ..Default::default()
    }
}

/// istiod's inbound cluster to the app, labelled with the service (`istio.services`).
fn inbound_cluster(app: SocketAddr) -> ads::cds::Cluster {
    let mut c = static_cluster(INBOUND, app);
    c.metadata = eds_cluster(INBOUND, HOST, "default").metadata;
    c
}

/// A request as the app received it: its head (request line and headers) and body.
struct Received {
    head: String,
    body: Vec<u8>,
}

/// Read one HTTP/1.1 message head (through the blank line) and its `content-length` body;
/// `None` at EOF before a head.
fn read_message(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// The app: one request per connection, answered with its body reversed
/// (`connection: close`, then closed); each request it received goes to the returned channel.
fn app() -> (SocketAddr, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    common::serve_each(listener, move |mut s: TcpStream| {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let Some((head, body)) = read_message(&mut s) else { return };
        let answer: Vec<u8> = body.iter().rev().copied().collect();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            answer.len()
        )
        .into_bytes();
        out.extend_from_slice(&answer);
        let _ = s.write_all(&out);
        let _ = tx.send(Received { head, body });
    });
    (addr, rx)
}

/// POST `body` to `addr` (`connection: close`); the status and response body, `None` if the
/// connection failed or closed before a response.
fn post(addr: SocketAddr, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut req = format!(
        "POST /reviews/0?user=jason HTTP/1.1\r\nhost: {HOST}:9080\r\ncontent-type: application/octet-stream\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).ok()?;
    let (head, answer) = read_message(&mut s)?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, answer))
}

/// 64 KiB of varied bytes (CR, LF and NUL among them).
fn payload() -> Vec<u8> {
    let mut rng = common::Rng(27);
    rng.bytes(64 * 1024)
}

/// A header's value in a request head, by name (case-insensitive).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Envoy's `listener.*.ssl.NAME` counters, summed.
fn envoy_ssl_stat(envoy: &envoy::Envoy, name: &str) -> u64 {
    let (_, body) = common::http(envoy.admin, "GET", "/stats?filter=ssl").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("listener.") && l.contains(&format!(".ssl.{name}:")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn an_envoy_sidecar_sending_http_to_a_ringside_pod_works() {
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(
            "an_envoy_sidecar_sending_http_to_a_ringside_pod_works",
            "no Envoy binary (perf/fetch-envoy.sh failed)",
        );
        return;
    };
    let ca = Ca::new("mesh");
    let (pp, reviews) = (Certs::new("pp", &ca, PRODUCTPAGE), Certs::new("reviews", &ca, REVIEWS));
    let (app_addr, received) = app();
    // ringside: reviews' inbound as istiod shapes an HTTP port, configured only by xDS. The
    // port's TCP chain (ALPN `istio`) goes elsewhere: Envoy offers `istio` too, and its first
    // listed protocol that a chain names (`istio-http/1.1`) must pick the HTTP chain.
    let ringside_in = free_addr();
    let port = ringside_in.port();
    const TCP_CHAIN: &str = "inbound|9080||tcp";
    const TCP_SERVICE: &str = "tcp-only.default.svc.cluster.local";
    let mut tcp_chain = ads::virtual_inbound(
        "tcp",
        ringside_in,
        port,
        TCP_CHAIN,
        common_tls("default", "ROOTCA", &[], &["istio-peer-exchange", "h2", "http/1.1"]),
        false,
    )
    .filter_chains
    .remove(0);
    tcp_chain.name = format!("0.0.0.0_{port}-tcp");
    // Its own service label, to tell in the metrics which chain a connection took.
    let mut tcp_cluster = static_cluster(TCP_CHAIN, tag_server("TC"));
    tcp_cluster.metadata = eds_cluster(TCP_CHAIN, TCP_SERVICE, "default").metadata;
    let http_chain = tls_chain(
        port,
        &MATCH_HTTP,
        common_tls("default", "ROOTCA", &[], &ALPN_IN_HTTP),
        vec![
            // Names only: the exchange filter of an HTTP chain (its HTTP peer metadata is
            // headers, not read at L4).
            filter(
                "istio.metadata_exchange",
                Any {
                    type_url: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange".into(),
                    value: vec![],
                },
            ),
            manager(INBOUND, INBOUND, true, false),
        ],
    );
    let ours = Snapshot {
        version: "1".into(),
        clusters: vec![inbound_cluster(app_addr), tcp_cluster],
        endpoints: vec![],
        listeners: vec![inbound_listener("virtualInbound", ringside_in, vec![http_chain, tcp_chain])],
        secrets: vec![],
    };
    let (server, _requests) = AdsServer::serve(ours);
    let rs = sidecar(server.addr, &node("reviews-v1", "reviews"), &reviews);
    wait_for("ringside's inbound bound", || TcpListener::bind(ringside_in).is_err().then_some(()));

    // Envoy: productpage's outbound HTTP port, its cluster ISTIO_MUTUAL to ringside with the
    // ALPN `istio.alpn` sets for HTTP/1.1 and SNI as istiod writes it; and a second port whose
    // cluster offers `istio-http/1.1` alone (no protocol of the chain's own list), which Envoy
    // as a server would take without negotiating one.
    let (envoy_out, envoy_only) = (free_addr(), free_addr());
    const ONLY: &str = "outbound|9080|only|reviews.default.svc.cluster.local";
    let to_ringside = |name: &str, alpn: &[&str]| {
        let upstream = tls::UpstreamTlsContext {
            common_tls_context: Some(ads::secrets_over_ads(common_tls(
                "default",
                "ROOTCA",
                &[REVIEWS],
                alpn,
            ))),
            sni: format!("outbound_.9080_._.{HOST}"),
            ..Default::default()
        };
        let mut c = static_cluster(name, ringside_in);
        c.transport_socket = tls_socket(ads::any(ads::UPSTREAM_TLS, &upstream));
        c
    };
    let out = |listen: SocketAddr, cluster: &str| {
        outbound_listener(
            listen,
            manager(&format!("outbound_0.0.0.0_{}", listen.port()), cluster, false, false),
        )
    };
    let theirs = Snapshot {
        version: "1".into(),
        clusters: vec![to_ringside(OUTBOUND, &ALPN_HTTP11), to_ringside(ONLY, &["istio-http/1.1"])],
        endpoints: vec![],
        listeners: vec![out(envoy_out, OUTBOUND), out(envoy_only, ONLY)],
        secrets: ads::workload_secrets(&pp.p("cert-chain.pem"), &pp.p("key.pem"), &pp.p("root-cert.pem")),
    };
    let (tx_e, _req_e) = mpsc::channel();
    let ads_e = AdsServer::start(free_addr(), theirs, tx_e);
    let envoy = envoy::Envoy::start(&bin, ads_e.addr);

    // The first request that Envoy serves with its secrets and cluster in place.
    let small = b"ping".to_vec();
    let (status, answer) = wait_for("an HTTP answer through Envoy and ringside", || {
        post(envoy_out, &small).filter(|(status, _)| *status != 503)
    });
    assert_eq!((status, answer.as_slice()), (200, &b"gnip"[..]), "{:?}", rs.stderr_lines());
    let first = received.recv_timeout(DEADLINE).expect("the app got the request");
    assert_eq!(first.body, small);

    // 64 KiB each way, byte-exact: the app got Envoy's request (its request line, and the
    // headers Envoy adds) with the body whole, and Envoy's client got the app's answer whole.
    let body = payload();
    let (status, answer) = post(envoy_out, &body).expect("a response");
    assert_eq!(status, 200);
    assert!(answer.iter().rev().eq(body.iter()), "the answer is the body reversed, byte for byte");
    let got = received.recv_timeout(DEADLINE).expect("the app got the request");
    assert!(got.head.starts_with("POST /reviews/0?user=jason HTTP/1.1\r\n"), "{}", got.head);
    assert!(header(&got.head, "x-request-id").is_some(), "Envoy's request: {}", got.head);
    assert_eq!(header(&got.head, "x-forwarded-proto"), Some("http"), "{}", got.head);
    assert!(got.body == body, "the request body arrives byte for byte");

    // `istio-http/1.1` alone takes the HTTP chain too, its handshake not refused.
    let answer = wait_for("an HTTP answer offering istio-http/1.1 alone", || {
        post(envoy_only, &small).filter(|(status, _)| *status != 503)
    });
    assert_eq!((answer.0, answer.1.as_slice()), (200, &b"gnip"[..]));
    assert_eq!(received.recv_timeout(DEADLINE).expect("the app got the request").body, small);

    // Envoy completed the mTLS handshakes; ringside verified Envoy's certificate and counted
    // each connection on the HTTP chain, reporter=destination, mutual_tls.
    let destination = [
        ("reporter", "destination"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", REVIEWS),
        ("destination_service", HOST),
        ("destination_workload", "reviews-v1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let scrape = rs.wait_for_scrape("every connection counted when it closes", DEADLINE, |s| {
        sum(s, "istio_tcp_connections_closed_total", &destination) >= 3.0
            && sum(s, "istio_tcp_received_bytes_total", &destination) >= body.len() as f64
    });
    assert!(sum(&scrape, "istio_tcp_sent_bytes_total", &destination) >= body.len() as f64, "{scrape}");
    assert_eq!(sum(&scrape, "istio_tcp_connections_opened_total", &[("response_flags", "NR")]), 0.0);
    assert_eq!(
        sum(&scrape, "istio_tcp_connections_opened_total", &[("destination_service", TCP_SERVICE)]),
        0.0,
        "the TCP chain took nothing"
    );
    drop(envoy);
    drop(rs);
}

#[test]
fn a_ringside_pod_calling_an_envoy_pods_http_port_works() {
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(
            "a_ringside_pod_calling_an_envoy_pods_http_port_works",
            "no Envoy binary (perf/fetch-envoy.sh failed)",
        );
        return;
    };
    let ca = Ca::new("mesh");
    let (pp, reviews) = (Certs::new("pp", &ca, PRODUCTPAGE), Certs::new("reviews", &ca, REVIEWS));
    let (app_addr, received) = app();
    // Envoy: reviews' inbound HTTP port, a TLS chain accepting the mesh's ALPN and an
    // http_connection_manager to the app that forwards the client certificate (XFCC).
    let envoy_in = free_addr();
    let envoy_chain = tls_chain(
        envoy_in.port(),
        &["istio", "istio-peer-exchange", "istio-http/1.1"],
        ads::secrets_over_ads(common_tls("default", "ROOTCA", &[], &ALPN_IN_HTTP)),
        vec![manager(INBOUND, INBOUND, false, true)],
    );
    // And a second port laid out as istiod 1.18 lays out an HTTP port (the DSB dump's
    // `0.0.0.0_8083` chains): `istio-http/*` to the connection manager, `istio-peer-exchange`
    // and `istio` to tcp_proxy (its Istio filters left out: upstream Envoy lacks them, so
    // its context does not offer `istio-peer-exchange`, an exchange it could not answer).
    let envoy_in_1_18 = free_addr();
    let http_1_18 = tls_chain(
        envoy_in_1_18.port(),
        &MATCH_HTTP,
        ads::secrets_over_ads(common_tls("default", "ROOTCA", &[], &ALPN_IN_HTTP)),
        vec![manager(INBOUND, INBOUND, false, true)],
    );
    let mut tcp_1_18 = ads::virtual_inbound(
        "tcp",
        envoy_in_1_18,
        envoy_in_1_18.port(),
        INBOUND,
        ads::secrets_over_ads(common_tls("default", "ROOTCA", &[], &ALPN_IN_HTTP)),
        false,
    )
    .filter_chains
    .remove(0);
    tcp_1_18.filters.retain(|f| !f.name.starts_with("istio."));
    let theirs = Snapshot {
        version: "1".into(),
        clusters: vec![inbound_cluster(app_addr)],
        endpoints: vec![],
        listeners: vec![
            inbound_listener("virtualInbound", envoy_in, vec![envoy_chain]),
            inbound_listener("inbound_1_18", envoy_in_1_18, vec![http_1_18, tcp_1_18]),
        ],
        secrets: ads::workload_secrets(
            &reviews.p("cert-chain.pem"),
            &reviews.p("key.pem"),
            &reviews.p("root-cert.pem"),
        ),
    };
    let (tx_e, _req_e) = mpsc::channel();
    let ads_e = AdsServer::start(free_addr(), theirs, tx_e);
    let envoy = envoy::Envoy::start(&bin, ads_e.addr);

    // ringside: productpage's outbound HTTP port, an inline route to reviews' EDS cluster,
    // whose one endpoint (Envoy) is tlsMode istio: ISTIO_MUTUAL expecting reviews' identity.
    // A second port to the subset `v118`, whose endpoint is Envoy's 1.18-style port.
    const V118: &str = "outbound|9080|v118|reviews.default.svc.cluster.local";
    let (listen, listen_1_18) = (free_addr(), free_addr());
    let cluster = |name: &str| {
        istio_mutual(
            eds_cluster(name, HOST, "default"),
            common_tls("default", "ROOTCA", &[REVIEWS], &["istio-peer-exchange", "istio"]),
        )
    };
    let out = |listen: SocketAddr, cluster: &str| {
        outbound_listener(
            listen,
            manager(&format!("outbound_0.0.0.0_{}", listen.port()), cluster, true, false),
        )
    };
    let workload = "reviews-v1;default;reviews;v1;Kubernetes";
    let ours = Snapshot {
        version: "1".into(),
        clusters: vec![cluster(OUTBOUND), cluster(V118)],
        endpoints: vec![
            assignment(OUTBOUND, &[(envoy_in, workload)]),
            assignment(V118, &[(envoy_in_1_18, workload)]),
        ],
        listeners: vec![out(listen, OUTBOUND), out(listen_1_18, V118)],
        secrets: vec![],
    };
    let (server, _requests) = AdsServer::serve(ours);
    let rs = sidecar(server.addr, &node("productpage-v1", "productpage"), &pp);

    // The first request once Envoy's listener and secrets are in place.
    let small = b"ping".to_vec();
    let (status, answer) = wait_for("an HTTP answer through ringside and Envoy", || {
        post(listen, &small).filter(|(status, _)| *status != 503)
    });
    assert_eq!((status, answer.as_slice()), (200, &b"gnip"[..]), "{:?}", rs.stderr_lines());
    let first = received.recv_timeout(DEADLINE).expect("the app got the request");
    assert_eq!(first.body, small);

    let body = payload();
    let (status, answer) = post(listen, &body).expect("a response");
    assert_eq!(status, 200);
    assert!(answer.iter().rev().eq(body.iter()), "the answer is the body reversed, byte for byte");
    let got = received.recv_timeout(DEADLINE).expect("the app got the request");
    assert!(got.head.starts_with("POST /reviews/0?user=jason HTTP/1.1\r\n"), "{}", got.head);
    assert!(got.body == body, "the request body arrives byte for byte");
    // Envoy's HTTP connection manager served it, and took ringside's client certificate.
    let xfcc = header(&got.head, "x-forwarded-client-cert").unwrap_or_else(|| panic!("XFCC in {}", got.head));
    assert!(xfcc.contains(&format!("URI={PRODUCTPAGE}")), "{xfcc}");
    assert!(xfcc.contains(&format!("By={REVIEWS}")), "{xfcc}");
    assert!(envoy_ssl_stat(&envoy, "handshake") >= 2, "Envoy counts the handshakes");
    assert_eq!(envoy_ssl_stat(&envoy, "no_certificate"), 0);

    // Envoy's 1.18-style port: ringside relays at L4 and offers its cluster's ALPN
    // (`istio-peer-exchange` first), so Envoy's TCP chain takes it, as a real Istio proxy's
    // would (and there runs the exchange): the HTTP exchange works all the same, without
    // Envoy's HTTP filters (no XFCC).
    let (status, answer) = wait_for("an HTTP answer through Envoy's 1.18-style port", || {
        post(listen_1_18, &body).filter(|(status, _)| *status != 503)
    });
    assert_eq!(status, 200);
    assert!(answer.iter().rev().eq(body.iter()), "the answer is the body reversed, byte for byte");
    let got = received.recv_timeout(DEADLINE).expect("the app got the request");
    assert!(got.head.starts_with("POST /reviews/0?user=jason HTTP/1.1\r\n"), "{}", got.head);
    assert!(got.body == body, "the request body arrives byte for byte");
    assert_eq!(header(&got.head, "x-forwarded-client-cert"), None, "Envoy's TCP chain: {}", got.head);

    // ringside counted each connection at the source, with reviews' verified identity.
    let source = [
        ("reporter", "source"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", REVIEWS),
        ("destination_workload", "reviews-v1"),
        ("destination_service", HOST),
        ("connection_security_policy", "unknown"),
    ];
    let scrape = rs.wait_for_scrape("every connection counted when it closes", DEADLINE, |s| {
        sum(s, "istio_tcp_connections_closed_total", &source) >= 3.0
            && sum(s, "istio_tcp_sent_bytes_total", &source) >= body.len() as f64
    });
    assert!(sum(&scrape, "istio_tcp_received_bytes_total", &source) >= body.len() as f64, "{scrape}");
    drop(rs);
    drop(envoy);
}
