//! What authorization costs a new connection (SPEC §9): a typical istiod policy set on an
//! inbound chain, a DENY filter (namespace `blocked` by regex, an IP block) before an ALLOW
//! filter (10 principals on ports 8000/9080, and a namespace by regex), translated from
//! Envoy's protos by `xds::rbac` and evaluated once per connection.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3 as proto;
use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    FilterStateMatcher, RegexMatcher, StringMatcher, filter_state_matcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use ringside::rbac::{self, Conn, Decision, Filter, Tls};
use ringside::xds::rbac::from_network;

fn peer_principal(p: MatchPattern) -> proto::Principal {
    let m = StringMatcher { match_pattern: Some(p), ignore_case: false };
    proto::Principal {
        identifier: Some(Identifier::FilterState(FilterStateMatcher {
            key: "io.istio.peer_principal".into(),
            matcher: Some(filter_state_matcher::Matcher::StringMatch(m)),
        })),
    }
}

fn regex(re: &str) -> MatchPattern {
    MatchPattern::SafeRegex(RegexMatcher { regex: re.into(), engine_type: None })
}

fn or_ids(ids: Vec<proto::Principal>) -> proto::Principal {
    proto::Principal { identifier: Some(Identifier::OrIds(proto::principal::Set { ids })) }
}

fn and_ids(ids: Vec<proto::Principal>) -> proto::Principal {
    proto::Principal { identifier: Some(Identifier::AndIds(proto::principal::Set { ids })) }
}

fn ports(ports: &[u32]) -> proto::Permission {
    let rules = ports.iter().map(|p| proto::Permission { rule: Some(Rule::DestinationPort(*p)) }).collect();
    let or = proto::Permission { rule: Some(Rule::OrRules(proto::permission::Set { rules })) };
    proto::Permission { rule: Some(Rule::AndRules(proto::permission::Set { rules: vec![or] })) }
}

fn any() -> proto::Permission {
    proto::Permission { rule: Some(Rule::Any(true)) }
}

fn filter(action: proto::rbac::Action, policies: Vec<(&str, proto::Policy)>) -> Filter {
    let rules = proto::Rbac {
        action: action as i32,
        policies: policies.into_iter().map(|(n, p)| (n.to_owned(), p)).collect(),
        ..Default::default()
    };
    let f = from_network(&NetworkRbac { rules: Some(rules), ..Default::default() });
    assert_eq!(f.fail_closed_reason(), None);
    f
}

fn sa(i: usize) -> String {
    format!("spiffe://cluster.local/ns/default/sa/client-{i}")
}

/// DENY namespace `blocked` and 192.168.0.0/16, then ALLOW 10 principals to 8000/9080 or
/// namespace `monitoring` to any port.
fn chain() -> Vec<Filter> {
    let blocked = and_ids(vec![or_ids(vec![peer_principal(regex(".*/ns/blocked/.*"))])]);
    let block = proto::Principal {
        identifier: Some(Identifier::DirectRemoteIp(CidrRange {
            address_prefix: "192.168.0.0".into(),
            prefix_len: Some(UInt32Value { value: 16 }),
        })),
    };
    let deny = filter(
        proto::rbac::Action::Deny,
        vec![
            (
                "ns[default]-policy[deny-blocked]-rule[0]",
                proto::Policy { permissions: vec![any()], principals: vec![blocked], ..Default::default() },
            ),
            (
                "ns[default]-policy[deny-blocked]-rule[1]",
                proto::Policy {
                    permissions: vec![any()],
                    principals: vec![and_ids(vec![or_ids(vec![block])])],
                    ..Default::default()
                },
            ),
        ],
    );
    let principals = (0..10).map(|i| peer_principal(MatchPattern::Exact(sa(i)))).collect();
    let allow = filter(
        proto::rbac::Action::Allow,
        vec![
            (
                "ns[default]-policy[allow-clients]-rule[0]",
                proto::Policy {
                    permissions: vec![ports(&[8000, 9080])],
                    principals: vec![and_ids(vec![or_ids(principals)])],
                    ..Default::default()
                },
            ),
            (
                "ns[default]-policy[allow-clients]-rule[1]",
                proto::Policy {
                    permissions: vec![any()],
                    principals: vec![and_ids(vec![or_ids(vec![peer_principal(regex(
                        ".*/ns/monitoring/.*",
                    ))])])],
                    ..Default::default()
                },
            ),
        ],
    );
    vec![deny, allow]
}

fn rbac(c: &mut Criterion) {
    let chain = chain();
    let conn = |names: &'static [&'static str], source: &str, port: u16| Conn {
        source: source.parse().unwrap(),
        destination: format!("10.244.0.12:{port}").parse().unwrap(),
        tls: Some(Tls { sni: None, peer_names: names }),
    };
    let tenth: &'static str = Box::leak(sa(9).into_boxed_str());
    let first: &'static str = Box::leak(sa(0).into_boxed_str());
    let cases: [(&str, Conn<'static>, bool); 5] = [
        ("allowed, 1st of 10 principals", conn(Box::leak(Box::new([first])), "10.244.1.7:39000", 8000), true),
        (
            "allowed, 10th of 10 principals",
            conn(Box::leak(Box::new([tenth])), "10.244.1.7:39000", 9080),
            true,
        ),
        (
            "allowed, namespace regex",
            conn(&["spiffe://cluster.local/ns/monitoring/sa/prom"], "10.244.1.7:39000", 15020),
            true,
        ),
        (
            "denied, no policy",
            conn(&["spiffe://cluster.local/ns/default/sa/stranger"], "10.244.1.7:39000", 8000),
            false,
        ),
        (
            "denied, deny policy regex",
            conn(&["spiffe://cluster.local/ns/blocked/sa/x"], "10.244.1.7:39000", 8000),
            false,
        ),
    ];
    let mut g = c.benchmark_group("rbac");
    for (name, conn, allowed) in cases {
        assert_eq!(rbac::evaluate(&chain, &conn) == Decision::Allow, allowed, "{name}");
        g.bench_function(format!("deny + allow chain: {name}"), |b| {
            b.iter(|| rbac::evaluate(black_box(&chain), black_box(&conn)))
        });
    }
    g.finish();
}

criterion_group!(benches, rbac);
criterion_main!(benches);
