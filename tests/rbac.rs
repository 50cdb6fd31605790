//! SPEC §9: Istio's AuthorizationPolicy enforced per connection, through the real binary
//! configured over ADS: `envoy.filters.network.rbac` on an mTLS chain (an ALLOW for one SPIFFE
//! principal) and on a plaintext chain (a DENY by source IP block), and an HTTP chain
//! (`http_connection_manager`) relayed at L4 to the cluster its route names. A denied
//! connection is closed before the application sees it.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use ads::{AdsServer, LISTENER, Snapshot, common_tls, lds, reply_to, static_cluster, virtual_inbound};
use common::{DEADLINE, Ringside, assert_closed_empty, free_addr, manual_server, sum, tag_server, wait_for};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use pki::{Ca, Certs};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const REDIS: &str = "spiffe://cluster.local/ns/default/sa/redis";
const HOST: &str = "redis.default.svc.cluster.local";
const INBOUND: &str = "inbound|6379||";
const ALPN_IN: [&str; 3] = ["istio-peer-exchange", "h2", "http/1.1"];
const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

fn node(workload: &str, app: &str) -> String {
    format!(
        "node:\n  workload_name: {workload}\n  namespace: default\n  labels: {{app: {app}, version: v1}}\n  \
         cluster_id: Kubernetes\n"
    )
}

/// ringside configured only by xDS, with the workload certificate files.
fn sidecar(server: SocketAddr, certs: &Certs) -> Ringside {
    let config = format!(
        "{}drain_timeout: 1s\nxds: {{address: {server}, certificates: {{{}}}}}\n",
        node("redis-v1", "redis"),
        certs.yaml()
    );
    Ringside::spawn_config(&config, server, &["--workers", "2"])
}

/// An outbound sidecar, static (SPEC §7): ISTIO_MUTUAL to `upstream` with `certs`' identity.
fn client(certs: &Certs, upstream: SocketAddr) -> Ringside {
    let listen = free_addr();
    let config = format!(
        "{}listeners:\n  - name: outbound\n    listen: {listen}\n    direction: outbound\n    peer_exchange: alpn\n    \
         cluster: redis\nclusters:\n  - name: redis\n    service: {HOST}\n    endpoints: [{{address: \"{upstream}\"}}]\n    \
         tls: {{mode: istio_mutual, {}, subject_alt_names: [\"{REDIS}\"]}}\n",
        node("client", "client"),
        certs.yaml()
    );
    Ringside::spawn_config(&config, listen, &[])
}

fn any<M: prost::Message>(type_url: &str, m: &M) -> Any {
    Any { type_url: type_url.into(), value: m.encode_to_vec() }
}

/// `envoy.filters.network.rbac` with one policy of `action` for `principal`, as istiod writes
/// an AuthorizationPolicy for TCP (permissions `any`).
fn network_rbac(action: rbac::rbac::Action, principal: rbac::principal::Identifier) -> lds::Filter {
    let policy = rbac::Policy {
        permissions: vec![rbac::Permission { rule: Some(rbac::permission::Rule::Any(true)) }],
        principals: vec![rbac::Principal { identifier: Some(principal) }],
        ..Default::default()
    };
    let rules = rbac::Rbac {
        action: action as i32,
        policies: [("ns[default]-policy[p]-rule[0]".to_string(), policy)].into(),
        ..Default::default()
    };
    let config = envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac {
        rules: Some(rules),
        stat_prefix: "tcp.".into(),
        ..Default::default()
    };
    lds::Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(any(NETWORK_RBAC_TYPE, &config))),
    }
}

fn principal_exact(name: &str) -> rbac::principal::Identifier {
    rbac::principal::Identifier::Authenticated(rbac::principal::Authenticated {
        principal_name: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(name.into())),
            ..Default::default()
        }),
    })
}

fn source_block(prefix: &str, len: u32) -> rbac::principal::Identifier {
    rbac::principal::Identifier::DirectRemoteIp(core::CidrRange {
        address_prefix: prefix.into(),
        prefix_len: Some(UInt32Value { value: len }),
    })
}

/// virtualInbound for redis (PERMISSIVE: an mTLS chain and a plaintext one), the mTLS chain
/// allowing only `allow`, the plaintext chain denying the source block `deny`.
fn snapshot(version: &str, listen: SocketAddr, app: SocketAddr, allow: &str, deny: (&str, u32)) -> Snapshot {
    let mut l = virtual_inbound(
        "virtualInbound",
        listen,
        listen.port(),
        INBOUND,
        common_tls("default", "ROOTCA", &[], &ALPN_IN),
        true,
    );
    // istiod puts RBAC after the exchange and before istio.stats and tcp_proxy.
    l.filter_chains[0].filters.insert(1, network_rbac(rbac::rbac::Action::Allow, principal_exact(allow)));
    l.filter_chains[1]
        .filters
        .insert(0, network_rbac(rbac::rbac::Action::Deny, source_block(deny.0, deny.1)));
    Snapshot {
        version: version.into(),
        clusters: vec![static_cluster(INBOUND, app)],
        endpoints: vec![],
        listeners: vec![l],
        secrets: vec![],
    }
}

#[test]
fn network_rbac_allows_the_named_principal_over_mtls_and_closes_others_before_the_app_sees_them() {
    let ca = Ca::new("mesh");
    let listen = free_addr();
    let (app, accepted) = manual_server();
    let (server, requests) = AdsServer::serve(snapshot("1", listen, app, PRODUCTPAGE, ("127.0.0.1", 32)));
    let rs = sidecar(server.addr, &Certs::new("redis", &ca, REDIS));
    assert!(reply_to(&requests, LISTENER, "1").error_detail.is_none());
    let allowed = client(&Certs::new("pp", &ca, PRODUCTPAGE), listen);
    let other = client(&Certs::new("reviews", &ca, REVIEWS), listen);
    // The allowed principal's bytes reach the app (retried until the listener is bound).
    let _kept = wait_for("the allowed principal reaches the app", || {
        let mut s = TcpStream::connect(allowed.listen).ok()?;
        s.write_all(b"ping").ok()?;
        let mut app = accepted.recv_timeout(std::time::Duration::from_millis(500)).ok()?;
        app.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut got = [0u8; 4];
        app.read_exact(&mut got).ok()?;
        (&got == b"ping").then_some((s, app))
    });
    assert_eq!(sum(&rs.scrape(), "ringside_rbac_denied_total", &[]), 0.0);

    // Another mesh identity: the handshake succeeds, then the connection is closed before
    // any byte reaches the app, which never even sees a connection.
    let mut s = TcpStream::connect(other.listen).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"ping").unwrap();
    assert_closed_empty(&mut s, "a principal the ALLOW policy does not name");
    let scrape = rs.wait_for_scrape("the denial counted", DEADLINE, |s| {
        sum(s, "ringside_rbac_denied_total", &[]) >= 1.0
    });
    assert_eq!(sum(&scrape, "ringside_rbac_denied_total", &[]), 1.0);
    // A plaintext client from 127.0.0.1: the plaintext chain's DENY for 127.0.0.1/32.
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"ping").unwrap();
    assert_closed_empty(&mut s, "a plaintext client in the denied block");
    rs.wait_for_scrape("both denials counted", DEADLINE, |s| {
        sum(s, "ringside_rbac_denied_total", &[]) >= 2.0
    });
    assert!(accepted.try_recv().is_err(), "the app saw a denied connection");
    // Denied connections are counted in istio_tcp_* (opened and closed) as the chain says.
    let scrape = rs.wait_for_value(
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("connection_security_policy", "none")],
        1.0,
    );
    assert!(sum(&scrape, "istio_tcp_connections_opened_total", &[("reporter", "destination")]) >= 3.0);

    // The block decides: denying 10.0.0.0/8 instead lets the plaintext client through.
    server.push(snapshot("2", listen, app, PRODUCTPAGE, ("10.0.0.0", 8)));
    assert!(reply_to(&requests, LISTENER, "2").error_detail.is_none());
    wait_for("the plaintext client allowed", || {
        let mut s = TcpStream::connect(listen).ok()?;
        s.write_all(b"ping").ok()?;
        accepted.recv_timeout(std::time::Duration::from_millis(500)).ok()
    });
}

#[test]
fn a_principal_is_matched_against_every_uri_san_of_the_peer_certificate_not_only_the_first() {
    let ca = Ca::new("mesh");
    let listen = free_addr();
    let (app, accepted) = manual_server();
    let (server, requests) = AdsServer::serve(snapshot("1", listen, app, PRODUCTPAGE, ("127.0.0.1", 32)));
    let rs = sidecar(server.addr, &Certs::new("redis", &ca, REDIS));
    assert!(reply_to(&requests, LISTENER, "1").error_detail.is_none());
    // The allowed identity is the certificate's second URI SAN; the first is another one.
    let certs = Certs::new("two-sans", &ca, REVIEWS);
    certs.install_uris(&ca, &[REVIEWS, PRODUCTPAGE]);
    let two = client(&certs, listen);
    let _kept = wait_for("the second URI SAN's principal reaches the app", || {
        let mut s = TcpStream::connect(two.listen).ok()?;
        s.write_all(b"ping").ok()?;
        let mut app = accepted.recv_timeout(std::time::Duration::from_millis(500)).ok()?;
        app.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut got = [0u8; 4];
        app.read_exact(&mut got).ok()?;
        (&got == b"ping").then_some((s, app))
    });
    assert_eq!(sum(&rs.scrape(), "ringside_rbac_denied_total", &[]), 0.0);
}

/// A listener whose one chain is an HTTP connection manager with an inline route table: the
/// virtual host `*` goes to `star`, the one holding the listener's `IP:port` to `exact`.
fn http_listener(listen: SocketAddr, star: &str, exact: &str) -> lds::Listener {
    let vhost = |name: &str, domain: String, cluster: &str| route::VirtualHost {
        name: name.into(),
        domains: vec![domain],
        routes: vec![route::Route {
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::route::Action::Route(route::RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    };
    let m = hcm::HttpConnectionManager {
        stat_prefix: "inbound_0.0.0.0_8000".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            route::RouteConfiguration {
                name: "inbound|8000||".into(),
                virtual_hosts: vec![
                    vhost("star", "*".into(), star),
                    vhost("exact", listen.to_string(), exact),
                ],
                ..Default::default()
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    lds::Listener {
        name: "http".into(),
        address: Some(ads::address(listen)),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        filter_chains: vec![lds::FilterChain {
            filters: vec![lds::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(lds::filter::ConfigType::TypedConfig(any(HCM_TYPE, &m))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn an_http_chain_is_relayed_at_l4_to_the_cluster_of_the_virtual_host_holding_the_destination() {
    let listen = free_addr();
    let snapshot = Snapshot {
        version: "1".into(),
        clusters: vec![static_cluster("star", tag_server("S1")), static_cluster("exact", tag_server("E1"))],
        endpoints: vec![],
        listeners: vec![http_listener(listen, "star", "exact")],
        secrets: vec![],
    };
    let (server, requests) = AdsServer::serve(snapshot);
    let config = format!("{}xds: {{address: {}}}\n", node("httpbin-v1", "httpbin"), server.addr);
    let _rs = Ringside::spawn_config(&config, server.addr, &[]);
    assert!(reply_to(&requests, LISTENER, "1").error_detail.is_none());
    let request = format!("GET /get HTTP/1.1\r\nHost: {listen}\r\n\r\n");
    let mut s = wait_for("the HTTP listener bound", || TcpStream::connect(listen).ok());
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    // The backend writes its tag, then echoes: the request arrives byte for byte.
    let mut got = vec![0u8; 2 + request.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got[..2], b"E1", "the virtual host holding IP:port wins over *");
    assert_eq!(&got[2..], request.as_bytes(), "relayed untouched");
}
