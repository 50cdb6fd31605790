//! SPEC §9, authorization at L4 on a real istiod config: the RBAC filters of httpbin's sidecar
//! in `shared/istio-xds-dumps/istio-authz-httpbin-sidecar-listeners.json` (Istio 1.18, an
//! ALLOW AuthorizationPolicy on httpbin), translated by `xds::rbac` and evaluated per
//! connection. The dump is JSON (Envoy's `/config_dump`); a small reader below turns the RBAC
//! subset into envoy-types' protos and panics on any field it does not know, so a shape it
//! skipped can never pass unnoticed.
//!
//! What the dump holds: one policy, `ns[default]-policy[httpbin]-rule[0]`, ALLOW
//! (GET `/info*` or POST `/data`) from (principal `spiffe://cluster.local/ns/default/sa/sleep`
//! or namespace `test`, matched on the `io.istio.peer_principal` filter state) and'ed with a
//! JWT issuer `https://accounts.google.com` (request.auth.claims[iss], dynamic metadata). On
//! the HTTP chains it is the HCM's `envoy.filters.http.rbac`; on the TCP chains istiod drops
//! the HTTP-only rule and leaves `rules: {}`: ALLOW nothing. At L4 both deny every
//! connection: the methods, paths and claims are unseen, so the ALLOW never matches.

mod common;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3 as proto;
use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    FilterStateMatcher, MetadataMatcher, PathMatcher, RegexMatcher, StringMatcher, filter_state_matcher,
    metadata_matcher, path_matcher, string_matcher::MatchPattern,
};
use envoy_types::pb::envoy::r#type::v3::Int32Range;
use envoy_types::pb::google::protobuf::UInt32Value;
use ringside::rbac::{self, Conn, Decision, Denial, Filter, Tls};
use ringside::xds::rbac::{from_http, from_network};
use serde_json::{Map, Value};

const DUMP: &str = "istio-authz-httpbin-sidecar-listeners.json";
const POLICY: &str = "ns[default]-policy[httpbin]-rule[0]";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const TEST_NS: &str = "spiffe://cluster.local/ns/test/sa/client";
const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

/// The dump's JSON, or None (a SKIP line naming the folder) when ../shared is absent.
fn dump(test: &str) -> Option<Value> {
    let dir = common::shared("istio-xds-dumps", test)?;
    let text =
        std::fs::read_to_string(dir.join(DUMP)).expect("the httpbin dump in ../shared/istio-xds-dumps");
    Some(serde_json::from_str(&text).expect("the dump is JSON"))
}

/// Every filter named `name` in the dump, with the listener and chain it sits in.
fn filters<'a>(v: &'a Value, name: &str, at: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) => {
            if m.get("name").and_then(Value::as_str) == Some(name) {
                out.push((at.clone(), &m["typed_config"]));
            }
            for (k, child) in m {
                filters(child, name, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                filters(child, name, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

// A reader for the RBAC subset of Envoy's JSON: each takes an object and panics on a key it
// does not know.

fn fields<'a>(v: &'a Value, what: &str) -> &'a Map<String, Value> {
    v.as_object().unwrap_or_else(|| panic!("{what}: not an object: {v}"))
}

fn one_field<'a>(v: &'a Value, what: &str) -> (&'a str, &'a Value) {
    let m = fields(v, what);
    assert_eq!(m.len(), 1, "{what}: want one field: {v}");
    let (k, v) = m.iter().next().unwrap();
    (k.as_str(), v)
}

fn list<T>(v: &Value, f: impl Fn(&Value) -> T) -> Vec<T> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(f).collect()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_owned()
}

fn rules(v: &Value) -> proto::Rbac {
    let mut r = proto::Rbac::default();
    for (k, v) in fields(v, "rules") {
        match k.as_str() {
            "action" => {
                r.action = proto::rbac::Action::from_str_name(v.as_str().unwrap()).expect("action") as i32;
            }
            "policies" => {
                for (name, p) in fields(v, "policies") {
                    r.policies.insert(name.clone(), policy(p));
                }
            }
            other => panic!("rules: unknown field {other}"),
        }
    }
    r
}

fn policy(v: &Value) -> proto::Policy {
    let mut p = proto::Policy::default();
    for (k, v) in fields(v, "policy") {
        match k.as_str() {
            "permissions" => p.permissions = list(v, permission),
            "principals" => p.principals = list(v, principal),
            other => panic!("policy: unknown field {other}"),
        }
    }
    p
}

fn permission(v: &Value) -> proto::Permission {
    let (k, v) = one_field(v, "permission");
    let set = |v: &Value| proto::permission::Set { rules: list(&fields(v, "set")["rules"], permission) };
    let rule = match k {
        "and_rules" => Rule::AndRules(set(v)),
        "or_rules" => Rule::OrRules(set(v)),
        "not_rule" => Rule::NotRule(Box::new(permission(v))),
        "any" => Rule::Any(v.as_bool().unwrap()),
        "destination_port" => Rule::DestinationPort(v.as_u64().unwrap().try_into().unwrap()),
        "destination_port_range" => Rule::DestinationPortRange(Int32Range {
            start: v["start"].as_i64().unwrap_or(0).try_into().unwrap(),
            end: v["end"].as_i64().unwrap_or(0).try_into().unwrap(),
        }),
        "destination_ip" => Rule::DestinationIp(cidr(v)),
        "requested_server_name" => Rule::RequestedServerName(string(v)),
        "header" => Rule::Header(header(v)),
        "url_path" => Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(string(&v["path"]))) }),
        other => panic!("permission: unknown rule {other}"),
    };
    proto::Permission { rule: Some(rule) }
}

#[allow(deprecated)] // source_ip and metadata: deprecated in Envoy, still written by istiod
fn principal(v: &Value) -> proto::Principal {
    let (k, v) = one_field(v, "principal");
    let set = |v: &Value| proto::principal::Set { ids: list(&fields(v, "set")["ids"], principal) };
    let id = match k {
        "and_ids" => Identifier::AndIds(set(v)),
        "or_ids" => Identifier::OrIds(set(v)),
        "not_id" => Identifier::NotId(Box::new(principal(v))),
        "any" => Identifier::Any(v.as_bool().unwrap()),
        "authenticated" => Identifier::Authenticated(proto::principal::Authenticated {
            principal_name: v.get("principal_name").map(string),
        }),
        "source_ip" => Identifier::SourceIp(cidr(v)),
        "direct_remote_ip" => Identifier::DirectRemoteIp(cidr(v)),
        "remote_ip" => Identifier::RemoteIp(cidr(v)),
        "header" => Identifier::Header(header(v)),
        "filter_state" => {
            let m = fields(v, "filter_state");
            assert!(m.keys().all(|k| k == "key" || k == "string_match"), "filter_state: {v}");
            Identifier::FilterState(FilterStateMatcher {
                key: text(&m["key"]),
                matcher: Some(filter_state_matcher::Matcher::StringMatch(string(&m["string_match"]))),
            })
        }
        "metadata" => {
            // Unseen at L4 whatever it holds: its filter and path are kept, the value skipped.
            let m = fields(v, "metadata");
            assert!(m.keys().all(|k| ["filter", "path", "value"].contains(&k.as_str())), "metadata: {v}");
            Identifier::Metadata(MetadataMatcher {
                filter: text(&m["filter"]),
                path: list(&m["path"], |s| metadata_matcher::PathSegment {
                    segment: Some(metadata_matcher::path_segment::Segment::Key(text(&s["key"]))),
                }),
                ..Default::default()
            })
        }
        other => panic!("principal: unknown identifier {other}"),
    };
    proto::Principal { identifier: Some(id) }
}

fn header(v: &Value) -> HeaderMatcher {
    let m = fields(v, "header");
    let mut h = HeaderMatcher { name: text(&m["name"]), ..Default::default() };
    for (k, v) in m {
        match k.as_str() {
            "name" => {}
            "exact_match" => {
                let exact =
                    StringMatcher { match_pattern: Some(MatchPattern::Exact(text(v))), ignore_case: false };
                h.header_match_specifier = Some(header_matcher::HeaderMatchSpecifier::StringMatch(exact));
            }
            "string_match" => {
                h.header_match_specifier = Some(header_matcher::HeaderMatchSpecifier::StringMatch(string(v)))
            }
            other => panic!("header: unknown field {other}"),
        }
    }
    h
}

fn string(v: &Value) -> StringMatcher {
    let mut s = StringMatcher::default();
    for (k, v) in fields(v, "string matcher") {
        s.match_pattern = Some(match k.as_str() {
            "ignore_case" => {
                s.ignore_case = v.as_bool().unwrap();
                continue;
            }
            "exact" => MatchPattern::Exact(text(v)),
            "prefix" => MatchPattern::Prefix(text(v)),
            "suffix" => MatchPattern::Suffix(text(v)),
            "contains" => MatchPattern::Contains(text(v)),
            "safe_regex" => {
                MatchPattern::SafeRegex(RegexMatcher { regex: text(&v["regex"]), engine_type: None })
            }
            other => panic!("string matcher: unknown field {other}"),
        });
    }
    s
}

fn cidr(v: &Value) -> CidrRange {
    CidrRange {
        address_prefix: text(&v["address_prefix"]),
        prefix_len: v
            .get("prefix_len")
            .map(|l| UInt32Value { value: l.as_u64().unwrap().try_into().unwrap() }),
    }
}

/// The filter's own fields: `rules` and the ones that never deny.
fn check_filter_fields(typed: &Value, type_name: &str) -> Option<proto::Rbac> {
    let m = fields(typed, "typed_config");
    assert_eq!(m["@type"], format!("type.googleapis.com/envoy.extensions.filters.{type_name}.rbac.v3.RBAC"));
    for k in m.keys() {
        let known = ["@type", "rules", "stat_prefix", "shadow_rules_stat_prefix"];
        assert!(known.contains(&k.as_str()), "{type_name} rbac: unknown field {k}");
    }
    m.get("rules").map(rules)
}

/// Translated filters, each with the JSON path of where it sits in the dump.
type Located = Vec<(String, Filter)>;

/// The dump's network and HTTP RBAC filters, translated.
fn translated(dump: &Value) -> (Located, Located) {
    let (mut network, mut http) = (Vec::new(), Vec::new());
    filters(dump, "envoy.filters.network.rbac", String::new(), &mut network);
    filters(dump, "envoy.filters.http.rbac", String::new(), &mut http);
    let network = network
        .into_iter()
        .map(|(at, t)| {
            let rules = check_filter_fields(t, "network");
            (at, from_network(&NetworkRbac { rules, ..Default::default() }))
        })
        .collect();
    let http = http
        .into_iter()
        .map(|(at, t)| {
            let rules = check_filter_fields(t, "http");
            (at, from_http(&HttpRbac { rules, ..Default::default() }))
        })
        .collect();
    (network, http)
}

fn inbound<'a>(names: &'a [&'a str], port: u16) -> Conn<'a> {
    Conn {
        source: "10.244.1.7:39000".parse().unwrap(),
        destination: format!("10.244.0.12:{port}").parse().unwrap(),
        tls: if names.is_empty() { None } else { Some(Tls { sni: None, peer_names: names }) },
    }
}

#[test]
fn httpbins_authorization_policy_denies_every_connection_at_l4_because_its_allow_rule_needs_http() {
    let Some(dump) =
        dump("httpbins_authorization_policy_denies_every_connection_at_l4_because_its_allow_rule_needs_http")
    else {
        return;
    };
    let (network, http) = translated(&dump);
    assert_eq!(
        (network.len(), http.len()),
        (3, 5),
        "virtualInbound's 3 TCP chains; 4 HTTP chains and main_internal's"
    );
    let callers: [&[&str]; 4] = [&[SLEEP], &[TEST_NS], &[OTHER], &[]];
    for (at, f) in network.iter().chain(&http) {
        assert_eq!(f.fail_closed_reason(), None, "{at}: every rule in the dump is understood");
        for names in callers {
            for port in [80, 8000] {
                assert_eq!(
                    f.evaluate(&inbound(names, port)),
                    Decision::Deny(Denial::NoPolicy),
                    "{at}: {names:?} to port {port}"
                );
            }
        }
    }
}

#[test]
fn the_dumps_rule_as_a_deny_matches_on_the_peer_principal_alone() {
    // The same permissions and principals with action DENY: the methods, paths and JWT issuer
    // are unseen, so it denies sleep and namespace test, on their principals, and no one else.
    let Some(dump) = dump("the_dumps_rule_as_a_deny_matches_on_the_peer_principal_alone") else {
        return;
    };
    let mut found = Vec::new();
    filters(&dump, "envoy.filters.http.rbac", String::new(), &mut found);
    let (at, typed) = found.first().expect("an HTTP RBAC filter");
    let mut rules = check_filter_fields(typed, "http").expect("rules");
    assert_eq!(rules.policies.keys().collect::<Vec<_>>(), [POLICY], "{at}");
    rules.action = proto::rbac::Action::Deny as i32;
    let deny = from_http(&HttpRbac { rules: Some(rules), ..Default::default() });
    assert_eq!(deny.evaluate(&inbound(&[SLEEP], 80)), Decision::Deny(Denial::Policy(POLICY)));
    assert_eq!(deny.evaluate(&inbound(&[TEST_NS], 80)), Decision::Deny(Denial::Policy(POLICY)));
    assert_eq!(deny.evaluate(&inbound(&[OTHER], 80)), Decision::Allow);
    assert_eq!(deny.evaluate(&inbound(&[], 80)), Decision::Allow, "plaintext: no peer principal");
    // And in a chain before an ALLOW-any, as Istio orders them: the deny decides.
    let allow_any = rbac::Filter::new(
        rbac::Action::Allow,
        vec![rbac::Policy {
            name: "allow-any".into(),
            permissions: vec![rbac::Permission::Any],
            principals: vec![rbac::Principal::Any],
        }],
    );
    let chain = [deny, allow_any];
    assert_eq!(rbac::evaluate(&chain, &inbound(&[TEST_NS], 80)), Decision::Deny(Denial::Policy(POLICY)));
    assert_eq!(rbac::evaluate(&chain, &inbound(&[OTHER], 80)), Decision::Allow);
}
