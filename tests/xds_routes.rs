//! SPEC §9, RDS: an HTTP chain (`http_connection_manager`, relayed at L4) that names its
//! route over RDS takes it from the RouteConfiguration of that name, served over ADS in both
//! variants (state of the world and delta) to the real binary: traffic goes where the virtual
//! host holding the listener's address says, and moves for new connections when the
//! RouteConfiguration changes.

#[path = "common/ads.rs"]
mod ads;
mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};

use ads::{AdsServer, ROUTES, Snapshot, lds, rds, static_cluster};
use common::{DEADLINE, Ringside, free_addr, tag_server, wait_for};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;

/// Connect and read the backend's 2-byte tag; `None` if refused or closed.
fn tag_of(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tag = [0u8; 2];
    s.read_exact(&mut tag).ok()?;
    Some(String::from_utf8_lossy(&tag).into_owned())
}

/// Wait until 10 new connections in a row reach `tag` (both workers see the update).
fn until_all(addr: SocketAddr, tag: &str) {
    let mut run = 0;
    wait_for(&format!("every new connection to reach {tag}"), || {
        run = if tag_of(addr).as_deref() == Some(tag) { run + 1 } else { 0 };
        (run >= 10).then_some(())
    });
}

/// A listener on `listen` whose one chain is an HTTP connection manager naming `route`
/// over RDS, as istiod writes an outbound HTTP port.
fn http_listener(listen: SocketAddr, route: &str) -> lds::Listener {
    let m = hcm::HttpConnectionManager {
        stat_prefix: format!("outbound_{listen}"),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            route_config_name: route.into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let url = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    lds::Listener {
        name: format!("{}_{}", listen.ip(), listen.port()),
        address: Some(ads::address(listen)),
        filter_chains: vec![lds::FilterChain {
            filters: vec![lds::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(lds::filter::ConfigType::TypedConfig(ads::any(url, &m))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A virtual host for `domains` whose one route (prefix `/`) goes to `cluster`.
fn vhost(name: &str, domains: &[&str], cluster: &str) -> rds::VirtualHost {
    rds::VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes: vec![rds::Route {
            r#match: Some(rds::RouteMatch {
                path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(rds::route::Action::Route(rds::RouteAction {
                cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Route `name`: the listener's `IP:port` to `exact` (if any), everything else to `star`.
fn table(name: &str, listen: SocketAddr, exact: Option<&str>, star: &str) -> rds::RouteConfiguration {
    let ip_port = listen.to_string();
    let mut vhosts: Vec<rds::VirtualHost> =
        exact.map(|c| vhost("exact", &["example.com", &ip_port], c)).into_iter().collect();
    vhosts.push(vhost("allow_any", &["*"], star));
    rds::RouteConfiguration { name: name.into(), virtual_hosts: vhosts, ..Default::default() }
}

struct Mesh {
    v1: SocketAddr,
    v2: SocketAddr,
    listen: SocketAddr,
}

impl Mesh {
    fn new() -> Mesh {
        Mesh { v1: tag_server("v1"), v2: tag_server("v2"), listen: free_addr() }
    }

    fn snapshot(&self, version: &str) -> Snapshot {
        Snapshot {
            version: version.into(),
            clusters: vec![static_cluster("v1", self.v1), static_cluster("v2", self.v2)],
            listeners: vec![http_listener(self.listen, "http")],
            ..Default::default()
        }
    }
}

fn ringside(server: SocketAddr, api: &str, listen: SocketAddr) -> Ringside {
    let config = format!(
        "node: {{workload_name: productpage-v1, namespace: default}}\ndrain_timeout: 1s\n\
         xds: {{address: \"{server}\", api: {api}}}\n"
    );
    Ringside::spawn_config(&config, listen, &["--workers", "2"])
}

#[test]
fn an_http_chain_goes_where_its_route_configuration_says_and_moves_when_it_changes() {
    let mesh = Mesh::new();
    let (server, requests) = AdsServer::serve(mesh.snapshot("1"));
    server.push_routes(mesh.snapshot("1"), vec![table("http", mesh.listen, Some("v1"), "v2")]);
    // Ready only once the route arrived (spawn waits for /ready): the virtual host holding
    // the listener's IP:port wins over `*`.
    let rs = ringside(server.addr, "state_of_the_world", mesh.listen);
    assert_eq!(tag_of(mesh.listen).as_deref(), Some("v1"));
    // The route was asked for by the name the chain gives, and ACKed.
    let asked = requests.try_iter().find(|r| r.type_url == ROUTES && r.response_nonce.is_empty());
    assert_eq!(asked.map(|r| r.resource_names), Some(vec!["http".to_string()]));
    // The RouteConfiguration changes: new connections follow it.
    server.push_routes(mesh.snapshot("2"), vec![table("http", mesh.listen, None, "v2")]);
    until_all(mesh.listen, "v2");
    // One that routes nothing for the address is not served (NR), as Envoy answers 404.
    let elsewhere = rds::RouteConfiguration {
        name: "http".into(),
        virtual_hosts: vec![vhost("other", &["example.com"], "v1")],
        ..Default::default()
    };
    server.push_routes(mesh.snapshot("3"), vec![elsewhere]);
    wait_for("connections closed without a route", || tag_of(mesh.listen).is_none().then_some(()));
    drop(rs);
}

#[test]
fn over_delta_xds_the_route_is_subscribed_by_name_and_follows_its_updates() {
    let mesh = Mesh::new();
    let (server, log) = AdsServer::serve_delta(mesh.snapshot("1"));
    server.push_routes(mesh.snapshot("1"), vec![table("http", mesh.listen, None, "v1")]);
    let _rs = ringside(server.addr, "delta", mesh.listen);
    let subscribed = log.request("the RDS subscription", |r| r.type_url == ROUTES);
    assert_eq!(subscribed.resource_names_subscribe, ["http"]);
    let (first, ack) = log.reply(ROUTES);
    assert_eq!(first.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["http"]);
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(tag_of(mesh.listen).as_deref(), Some("v1"));
    server.push_routes(mesh.snapshot("2"), vec![table("http", mesh.listen, None, "v2")]);
    let (changed, ack) = log.reply(ROUTES);
    assert_eq!(changed.resources.len(), 1, "only the route that changed");
    assert!(ack.error_detail.is_none(), "{ack:?}");
    until_all(mesh.listen, "v2");
}
