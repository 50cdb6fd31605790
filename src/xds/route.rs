//! Route tables as an HTTP chain relayed at L4 reads them (SPEC §9): RouteConfiguration
//! resources (RDS, by the `route_config_name` an HTTP connection manager names) and inline
//! `route_config`s alike. A connection takes the virtual host whose `domains` hold its
//! original destination (`IP:port`, then `IP`, then `*`) and that host's first route without
//! header or query matches (L4 sees neither). Pure: protos in, targets out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::route::v3 as rds;

use super::proto::{Error, invalid};
use crate::config::TcpRoute;

/// Where a route (or a tcp_proxy) sends a connection.
#[derive(Clone, Debug)]
pub enum TcpTarget {
    /// One cluster.
    Cluster(String),
    /// Weighted clusters.
    Weighted(Vec<TcpRoute>),
}

/// An accepted RouteConfiguration: kept whole, read by the merge for each HTTP chain that
/// names it (the address a chain is reached at decides its virtual host).
#[derive(Clone, Debug)]
pub struct XdsRoute {
    /// The resource as sent.
    pub config: rds::RouteConfiguration,
}

/// A RouteConfiguration resource, checked as Envoy checks it: a name, and no domain claimed
/// by two virtual hosts (Envoy rejects the whole resource for either).
pub fn route_configuration(pb: &rds::RouteConfiguration) -> Result<XdsRoute, Error> {
    if pb.name.is_empty() {
        return Err(invalid("RouteConfiguration", "", "a route configuration needs a name"));
    }
    let mut seen = BTreeSet::new();
    for v in &pb.virtual_hosts {
        for d in &v.domains {
            if !seen.insert(d.to_ascii_lowercase()) {
                return Err(invalid(
                    "RouteConfiguration",
                    &pb.name,
                    format!("virtual host {:?}: domain {d:?} is claimed by two virtual hosts", v.name),
                ));
            }
        }
    }
    Ok(XdsRoute { config: pb.clone() })
}

/// The target of route table `rc` for connections to `dst`: the virtual host whose `domains`
/// hold `IP:port`, then `IP`, then `*`, and its first route that matches on nothing but the
/// path (headers and query parameters are not seen at L4).
pub fn route_target(rc: &rds::RouteConfiguration, dst: SocketAddr) -> Result<TcpTarget, String> {
    let (ip_port, ip) = (dst.to_string(), dst.ip().to_string());
    let vhost = [ip_port.as_str(), ip.as_str(), "*"]
        .iter()
        .find_map(|d| rc.virtual_hosts.iter().find(|v| v.domains.iter().any(|x| x == d)))
        .ok_or_else(|| format!("route_config {:?}: no virtual host for {dst}", rc.name))?;
    vhost_target(vhost)
}

/// Where table `rc` sends each original destination a capture listener hands the listener at
/// `listen` (SPEC §8): every address a virtual host names (`IP:port` on `listen`'s port, or
/// `IP`, on that port), and `listen` itself for `*`, each with its target, `IP:port` before
/// `IP` before `*` where two hosts name one address. Host names name no address at L4.
pub fn by_original_destination(
    rc: &rds::RouteConfiguration,
    listen: SocketAddr,
) -> Vec<(SocketAddr, Result<TcpTarget, String>)> {
    // (address) -> (precedence: 0 IP:port, 1 IP, 2 `*`; the target).
    let mut best: BTreeMap<SocketAddr, (u8, &rds::VirtualHost)> = BTreeMap::new();
    for v in &rc.virtual_hosts {
        for d in &v.domains {
            let named = if d == "*" {
                Some((listen, 2))
            } else if let Ok(a) = d.parse::<SocketAddr>() {
                (a.port() == listen.port()).then_some((a, 0))
            } else if let Ok(ip) = d.parse::<IpAddr>() {
                Some((SocketAddr::new(ip, listen.port()), 1))
            } else {
                None
            };
            if let Some((a, rank)) = named
                && best.get(&a).is_none_or(|(r, _)| rank < *r)
            {
                best.insert(a, (rank, v));
            }
        }
    }
    best.into_iter().map(|(a, (_, v))| (a, vhost_target(v))).collect()
}

/// A virtual host's first route without header or query matches, as a target.
fn vhost_target(vhost: &rds::VirtualHost) -> Result<TcpTarget, String> {
    use rds::route::Action;
    use rds::route_action::ClusterSpecifier;
    let route = vhost
        .routes
        .iter()
        .find(|r| {
            r.r#match.as_ref().is_none_or(|m| {
                m.headers.is_empty()
                    && m.query_parameters.is_empty()
                    && !matches!(m.path_specifier, Some(rds::route_match::PathSpecifier::ConnectMatcher(_)))
            })
        })
        .ok_or_else(|| format!("virtual host {:?}: no route without header or query matches", vhost.name))?;
    let action = match &route.action {
        Some(Action::Route(a)) => a,
        _ => return Err(format!("virtual host {:?}: its route does not name a cluster", vhost.name)),
    };
    match &action.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => Ok(TcpTarget::Cluster(c.clone())),
        Some(ClusterSpecifier::WeightedClusters(w)) if !w.clusters.is_empty() => {
            let mut routes = Vec::new();
            for c in &w.clusters {
                let weight = c.weight.map_or(0, |w| w.value);
                if c.name.is_empty() || weight == 0 {
                    return Err(format!(
                        "virtual host {:?}: weighted cluster {:?} weight {weight}",
                        vhost.name, c.name
                    ));
                }
                routes.push(TcpRoute { cluster: c.name.clone(), subset: None, weight: i64::from(weight) });
            }
            Ok(TcpTarget::Weighted(routes))
        }
        _ => Err(format!("virtual host {:?}: its route names no cluster", vhost.name)),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A virtual host `name` for `domains` whose one route (prefix `/`) goes to `cluster`.
    pub(in crate::xds) fn vhost(name: &str, domains: &[&str], cluster: &str) -> rds::VirtualHost {
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

    /// A RouteConfiguration `name` of `vhosts`.
    pub(in crate::xds) fn table(name: &str, vhosts: Vec<rds::VirtualHost>) -> rds::RouteConfiguration {
        rds::RouteConfiguration { name: name.into(), virtual_hosts: vhosts, ..Default::default() }
    }

    /// A target as a test reads it: `cluster`, `a:1 b:3`, or `!why`.
    fn shown(t: Result<TcpTarget, String>) -> String {
        match t {
            Ok(TcpTarget::Cluster(c)) => c,
            Ok(TcpTarget::Weighted(w)) => {
                w.iter().map(|r| format!("{}:{}", r.cluster, r.weight)).collect::<Vec<_>>().join(" ")
            }
            Err(why) => format!("!{why}"),
        }
    }

    fn cluster(c: &str) -> String {
        c.to_string()
    }

    #[test]
    fn the_virtual_host_holding_ip_port_wins_over_ip_which_wins_over_star() {
        // istiod's `9080`: one host per service (its names and its ClusterIP), allow_any last.
        let rc = table(
            "9080",
            vec![
                vhost("details", &["details.default.svc.cluster.local", "10.0.0.1"], "details"),
                vhost("reviews", &["reviews", "10.0.0.2:9080"], "reviews"),
                vhost("reviews-ip", &["10.0.0.2"], "reviews-by-ip"),
                vhost("allow_any", &["*"], "PassthroughCluster"),
            ],
        );
        let at = |dst: &str| shown(route_target(&rc, dst.parse().unwrap()));
        assert_eq!(at("10.0.0.1:9080"), cluster("details"));
        assert_eq!(at("10.0.0.2:9080"), cluster("reviews"), "IP:port before IP");
        assert_eq!(at("10.0.0.2:9081"), cluster("reviews-by-ip"));
        assert_eq!(at("10.9.9.9:9080"), cluster("PassthroughCluster"));
        let by = by_original_destination(&rc, "0.0.0.0:9080".parse().unwrap());
        let by: Vec<(String, String)> = by.into_iter().map(|(a, t)| (a.to_string(), shown(t))).collect();
        assert_eq!(
            by,
            [
                ("0.0.0.0:9080".to_string(), cluster("PassthroughCluster")),
                ("10.0.0.1:9080".to_string(), cluster("details")),
                ("10.0.0.2:9080".to_string(), cluster("reviews")),
            ]
        );
    }

    #[test]
    fn the_first_route_without_header_or_query_matches_gives_the_cluster_or_weighted_clusters() {
        use envoy_types::pb::google::protobuf::UInt32Value;
        let mut v = vhost("v", &["*"], "by-header");
        v.routes[0].r#match.as_mut().unwrap().headers.push(Default::default());
        let weighted = rds::WeightedCluster {
            clusters: ["a", "b"]
                .iter()
                .zip([1, 3])
                .map(|(n, w)| rds::weighted_cluster::ClusterWeight {
                    name: n.to_string(),
                    weight: Some(UInt32Value { value: w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut second = vhost("v", &[], "unused").routes.remove(0);
        second.action = Some(rds::route::Action::Route(rds::RouteAction {
            cluster_specifier: Some(rds::route_action::ClusterSpecifier::WeightedClusters(weighted)),
            ..Default::default()
        }));
        v.routes.push(second);
        let rc = table("t", vec![v]);
        assert_eq!(shown(route_target(&rc, "10.0.0.1:80".parse().unwrap())), "a:1 b:3");
        let elsewhere = table("t", vec![vhost("h", &["example.com"], "c")]);
        assert_eq!(
            shown(route_target(&elsewhere, "10.0.0.1:80".parse().unwrap())),
            "!route_config \"t\": no virtual host for 10.0.0.1:80"
        );
    }

    #[test]
    fn a_route_configuration_without_a_name_or_with_a_domain_claimed_twice_is_invalid() {
        assert!(route_configuration(&table("ok", vec![vhost("a", &["*"], "c")])).is_ok());
        let e = route_configuration(&table("", vec![])).unwrap_err();
        assert_eq!(e.resource, "RouteConfiguration/");
        let e = route_configuration(&table("t", vec![vhost("a", &["x", "*"], "c"), vhost("b", &["*"], "d")]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "RouteConfiguration/t: virtual host \"b\": domain \"*\" is claimed by two virtual hosts"
        );
    }
}
