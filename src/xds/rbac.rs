//! Envoy's RBAC filters from xDS into [`crate::rbac::Filter`] (SPEC §9): the network filter
//! `envoy.filters.network.rbac` and the HTTP connection manager's `envoy.filters.http.rbac`,
//! both enforced once per connection. Everything is checked and compiled here, so the
//! evaluation never fails: a rule ringside cannot evaluate (an extension matcher or principal,
//! a CEL condition, the xDS `matcher` API, a regex that does not compile, a rule Envoy's
//! validation would refuse) makes a filter that fails closed and names the rule. Rules on what
//! L4 does not show (headers, paths, JWT claims in metadata) become `Unseen` leaves, which make
//! a policy stricter (see `crate::rbac`). `shadow_rules` never deny and are ignored. No I/O.

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3 as proto;
use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, filter_state_matcher, string_matcher};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::rbac::{Action, Cidr, Filter, Permission, Policy, Principal, StringMatch};

/// Name of the network RBAC filter.
pub const NETWORK_RBAC: &str = "envoy.filters.network.rbac";
/// Name of the HTTP RBAC filter (inside an HTTP connection manager).
pub const HTTP_RBAC: &str = "envoy.filters.http.rbac";
/// Type URL of the network RBAC filter's config.
pub const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
/// Type URL of the HTTP RBAC filter's config.
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// The filter state key istio_authn fills with the peer's SPIFFE id.
const PEER_PRINCIPAL_KEY: &str = "io.istio.peer_principal";

/// Why a typed config is not an RBAC filter at all (the listener is NACKed, not served).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The `Any` holds another type.
    #[error("rbac: typed_config of type {found:?}, want {want}")]
    WrongType {
        /// The type URL found.
        found: String,
        /// The type URL expected.
        want: &'static str,
    },
    /// The bytes do not decode as the RBAC message.
    #[error("rbac: cannot decode: {0}")]
    Decode(String),
}

/// The network RBAC filter in `any` (`typed_config` of `envoy.filters.network.rbac`).
pub fn network_filter(any: &Any) -> Result<Filter, Error> {
    decode::<NetworkRbac>(any, NETWORK_RBAC_TYPE).map(|m| from_network(&m))
}

/// The HTTP RBAC filter in `any` (`typed_config` of `envoy.filters.http.rbac`), for an HTTP
/// connection manager relayed at L4.
pub fn http_filter(any: &Any) -> Result<Filter, Error> {
    decode::<HttpRbac>(any, HTTP_RBAC_TYPE).map(|m| from_http(&m))
}

fn decode<M: Message + Default>(any: &Any, want: &'static str) -> Result<M, Error> {
    if any.type_url != want {
        return Err(Error::WrongType { found: any.type_url.clone(), want });
    }
    M::decode(any.value.as_slice()).map_err(|e| Error::Decode(e.to_string()))
}

/// The network filter: `rules`, or fail closed for the xDS `matcher` API.
pub fn from_network(m: &NetworkRbac) -> Filter {
    build(m.rules.as_ref(), m.matcher.is_some())
}

/// The HTTP filter: the same `rules` (the route's per-filter override is not read).
pub fn from_http(m: &HttpRbac) -> Filter {
    build(m.rules.as_ref(), m.matcher.is_some())
}

fn build(rules: Option<&proto::Rbac>, has_matcher: bool) -> Filter {
    match (rules, has_matcher) {
        // Envoy's validation allows only one of the two; `matcher` is what we cannot evaluate.
        (_, true) => Filter::fail_closed("matcher (xDS matcher API) not evaluated"),
        (None, false) => Filter::without_rules(),
        (Some(r), false) => compile(r).unwrap_or_else(Filter::fail_closed),
    }
}

fn compile(rules: &proto::Rbac) -> Result<Filter, String> {
    let action = match proto::rbac::Action::try_from(rules.action) {
        Ok(proto::rbac::Action::Allow) => Action::Allow,
        Ok(proto::rbac::Action::Deny) => Action::Deny,
        Ok(proto::rbac::Action::Log) => Action::Log,
        Err(_) => return Err(format!("action {}: unknown", rules.action)),
    };
    // Envoy keeps policies in a map ordered by name; so does the first DENY match we report.
    let mut named: Vec<(&String, &proto::Policy)> = rules.policies.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut policies = Vec::with_capacity(named.len());
    for (name, p) in named {
        policies.push(policy(name, p).map_err(|e| format!("policy {name:?}: {e}"))?);
    }
    Ok(Filter::new(action, policies))
}

fn policy(name: &str, p: &proto::Policy) -> Result<Policy, String> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return Err("CEL condition not evaluated".into());
    }
    if p.permissions.is_empty() {
        return Err("no permissions".into());
    }
    if p.principals.is_empty() {
        return Err("no principals".into());
    }
    Ok(Policy {
        name: name.into(),
        permissions: p.permissions.iter().map(permission).collect::<Result<_, _>>()?,
        principals: p.principals.iter().map(principal).collect::<Result<_, _>>()?,
    })
}

fn permission(p: &proto::Permission) -> Result<Permission, String> {
    let set = |s: &proto::permission::Set, what: &str| {
        if s.rules.is_empty() {
            return Err(format!("{what}: empty"));
        }
        s.rules.iter().map(permission).collect::<Result<Vec<_>, _>>()
    };
    Ok(match p.rule.as_ref() {
        None => return Err("permission without a rule".into()),
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Any(false)) => return Err("permission any: false".into()),
        Some(Rule::AndRules(s)) => Permission::And(set(s, "and_rules")?),
        Some(Rule::OrRules(s)) => Permission::Or(set(s, "or_rules")?),
        Some(Rule::NotRule(r)) => Permission::Not(Box::new(permission(r)?)),
        Some(Rule::DestinationIp(c)) => Permission::DestinationIp(cidr(c)?),
        Some(Rule::DestinationPort(port)) => Permission::DestinationPort(*port),
        Some(Rule::DestinationPortRange(r)) => {
            let ok = 0..=65536;
            if !ok.contains(&r.start) || !ok.contains(&r.end) || r.start >= r.end {
                let e = crate::rbac::Invalid::PortRange { start: r.start.into(), end: r.end.into() };
                return Err(e.to_string());
            }
            // In range: both are within 0..=65536 (checked just above).
            Permission::DestinationPortRange { start: r.start.unsigned_abs(), end: r.end.unsigned_abs() }
        }
        Some(Rule::RequestedServerName(m)) => {
            Permission::RequestedServerName(string(m, "requested_server_name")?)
        }
        Some(Rule::Header(_)) => Permission::Unseen("header"),
        Some(Rule::UrlPath(_)) => Permission::Unseen("url_path"),
        Some(Rule::UriTemplate(_)) => Permission::Unseen("uri_template"),
        #[allow(deprecated)] // istiod still writes `metadata`, Envoy still reads it
        Some(Rule::Metadata(_)) => Permission::Unseen("metadata"),
        Some(Rule::SourcedMetadata(_)) => Permission::Unseen("sourced_metadata"),
        Some(Rule::Matcher(ext)) => return Err(format!("permission matcher {:?}: not evaluated", ext.name)),
    })
}

fn principal(p: &proto::Principal) -> Result<Principal, String> {
    let set = |s: &proto::principal::Set, what: &str| {
        if s.ids.is_empty() {
            return Err(format!("{what}: empty"));
        }
        s.ids.iter().map(principal).collect::<Result<Vec<_>, _>>()
    };
    Ok(match p.identifier.as_ref() {
        None => return Err("principal without an identifier".into()),
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::Any(false)) => return Err("principal any: false".into()),
        Some(Identifier::AndIds(s)) => Principal::And(set(s, "and_ids")?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(s, "or_ids")?),
        Some(Identifier::NotId(id)) => Principal::Not(Box::new(principal(id)?)),
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(
            a.principal_name.as_ref().map(|m| string(m, "authenticated.principal_name")).transpose()?,
        ),
        // At L4 all three are the downstream peer (no proxy protocol, no x-forwarded-for).
        #[allow(deprecated)] // source_ip: deprecated in Envoy, still accepted
        Some(Identifier::SourceIp(c)) => Principal::SourceIp(cidr(c)?),
        Some(Identifier::DirectRemoteIp(c)) | Some(Identifier::RemoteIp(c)) => Principal::SourceIp(cidr(c)?),
        Some(Identifier::FilterState(fs)) => match fs.matcher.as_ref() {
            None => return Err(format!("filter_state {:?}: no matcher", fs.key)),
            Some(filter_state_matcher::Matcher::StringMatch(m)) if fs.key == PEER_PRINCIPAL_KEY => {
                Principal::PeerPrincipal(string(m, "filter_state")?)
            }
            Some(_) => Principal::Unseen("filter_state"),
        },
        Some(Identifier::Header(_)) => Principal::Unseen("header"),
        Some(Identifier::UrlPath(_)) => Principal::Unseen("url_path"),
        #[allow(deprecated)] // istiod writes request principals and claims as `metadata`
        Some(Identifier::Metadata(_)) => Principal::Unseen("metadata"),
        Some(Identifier::SourcedMetadata(_)) => Principal::Unseen("sourced_metadata"),
        Some(Identifier::Custom(ext)) => {
            return Err(format!("principal custom {:?}: not evaluated", ext.name));
        }
    })
}

fn string(m: &StringMatcher, what: &str) -> Result<StringMatch, String> {
    use string_matcher::MatchPattern;
    let compiled = match m.match_pattern.as_ref() {
        None => return Err(format!("{what}: no pattern")),
        Some(MatchPattern::Exact(v)) => Ok(StringMatch::exact(v)),
        Some(MatchPattern::Prefix(v)) => StringMatch::prefix(v),
        Some(MatchPattern::Suffix(v)) => StringMatch::suffix(v),
        Some(MatchPattern::Contains(v)) => StringMatch::contains(v),
        Some(MatchPattern::SafeRegex(r)) => StringMatch::regex(&r.regex),
        Some(MatchPattern::Custom(ext)) => {
            return Err(format!("{what}: custom matcher {:?} not evaluated", ext.name));
        }
    };
    let compiled = compiled.map_err(|e| format!("{what}: {e}"))?;
    Ok(if m.ignore_case { compiled.ignoring_case() } else { compiled })
}

fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    // An unset prefix_len is 0, as Envoy reads it.
    Cidr::new(&c.address_prefix, c.prefix_len.as_ref().map_or(0, |l| l.value)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbac::{Conn, Decision, Denial, Tls};
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        FilterStateMatcher, MetadataMatcher, PathMatcher, RegexMatcher, path_matcher,
    };
    use envoy_types::pb::envoy::r#type::v3::Int32Range;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use string_matcher::MatchPattern;

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const TEST_NS: &str = "spiffe://cluster.local/ns/test/sa/client";
    const RULE0: &str = "ns[default]-policy[httpbin]-rule[0]";

    // Builders in the shapes istiod writes: each rule field is an or-set, the fields are and'ed.
    fn perm(rule: Rule) -> proto::Permission {
        proto::Permission { rule: Some(rule) }
    }
    fn id(identifier: Identifier) -> proto::Principal {
        proto::Principal { identifier: Some(identifier) }
    }
    fn and_rules(rules: Vec<proto::Permission>) -> proto::Permission {
        perm(Rule::AndRules(proto::permission::Set { rules }))
    }
    fn or_rules(rules: Vec<proto::Permission>) -> proto::Permission {
        perm(Rule::OrRules(proto::permission::Set { rules }))
    }
    fn and_ids(ids: Vec<proto::Principal>) -> proto::Principal {
        id(Identifier::AndIds(proto::principal::Set { ids }))
    }
    fn or_ids(ids: Vec<proto::Principal>) -> proto::Principal {
        id(Identifier::OrIds(proto::principal::Set { ids }))
    }
    fn matcher(p: MatchPattern) -> StringMatcher {
        StringMatcher { match_pattern: Some(p), ignore_case: false }
    }
    fn regex(re: &str) -> StringMatcher {
        matcher(MatchPattern::SafeRegex(RegexMatcher { regex: re.into(), engine_type: None }))
    }
    fn authenticated(m: StringMatcher) -> proto::Principal {
        id(Identifier::Authenticated(proto::principal::Authenticated { principal_name: Some(m) }))
    }
    fn peer_principal(m: StringMatcher) -> proto::Principal {
        id(Identifier::FilterState(FilterStateMatcher {
            key: PEER_PRINCIPAL_KEY.into(),
            matcher: Some(filter_state_matcher::Matcher::StringMatch(m)),
        }))
    }
    fn cidr_range(prefix: &str, len: u32) -> CidrRange {
        CidrRange { address_prefix: prefix.into(), prefix_len: Some(UInt32Value { value: len }) }
    }
    fn port(p: u32) -> proto::Permission {
        perm(Rule::DestinationPort(p))
    }
    fn method(m: &str) -> proto::Permission {
        let exact = matcher(MatchPattern::Exact(m.into()));
        let specifier = header_matcher::HeaderMatchSpecifier::StringMatch(exact);
        perm(Rule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(specifier),
            ..Default::default()
        }))
    }
    fn path(p: &str) -> proto::Permission {
        let exact = matcher(MatchPattern::Exact(p.into()));
        perm(Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(exact)) }))
    }
    fn policy(permissions: Vec<proto::Permission>, principals: Vec<proto::Principal>) -> proto::Policy {
        proto::Policy { permissions, principals, ..Default::default() }
    }
    fn rules(action: proto::rbac::Action, policies: Vec<(&str, proto::Policy)>) -> proto::Rbac {
        proto::Rbac {
            action: action as i32,
            policies: policies.into_iter().map(|(n, p)| (n.to_owned(), p)).collect(),
            ..Default::default()
        }
    }
    fn network(r: proto::Rbac) -> Filter {
        let m = NetworkRbac { rules: Some(r), stat_prefix: "tcp.".into(), ..Default::default() };
        network_filter(&Any { type_url: NETWORK_RBAC_TYPE.into(), value: m.encode_to_vec() }).unwrap()
    }
    fn http(r: proto::Rbac) -> Filter {
        let m = HttpRbac { rules: Some(r), ..Default::default() };
        http_filter(&Any { type_url: HTTP_RBAC_TYPE.into(), value: m.encode_to_vec() }).unwrap()
    }

    fn conn<'a>(source: &str, port: u16, names: &'a [&'a str]) -> Conn<'a> {
        Conn {
            source: format!("{source}:41000").parse().unwrap(),
            destination: format!("10.244.0.12:{port}").parse().unwrap(),
            tls: if names.is_empty() { None } else { Some(Tls { sni: None, peer_names: names }) },
        }
    }

    #[test]
    fn an_istiod_allow_policy_grants_its_principals_on_its_ports_and_denies_the_rest() {
        // AuthorizationPolicy httpbin: ALLOW from principals [cluster.local/ns/default/sa/sleep]
        // to ports [8000], as istiod writes it for a TCP chain.
        let allow = rules(
            proto::rbac::Action::Allow,
            vec![(
                RULE0,
                policy(
                    vec![and_rules(vec![or_rules(vec![port(8000)])])],
                    vec![and_ids(vec![or_ids(vec![authenticated(matcher(MatchPattern::Exact(
                        SLEEP.into(),
                    )))])])],
                ),
            )],
        );
        let f = network(allow);
        assert_eq!(f.fail_closed_reason(), None);
        assert!(f.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        assert_eq!(f.evaluate(&conn("10.244.0.5", 8000, &[TEST_NS])), Decision::Deny(Denial::NoPolicy));
        assert!(!f.allows(&conn("10.244.0.5", 9000, &[SLEEP])), "another port");
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[])), "plaintext has no principal");
    }

    #[test]
    fn an_istiod_deny_policy_with_not_principals_denies_everyone_else() {
        // DENY when notPrincipals [cluster.local/ns/default/sa/sleep].
        let deny = rules(
            proto::rbac::Action::Deny,
            vec![(
                "ns[default]-policy[deny-others]-rule[0]",
                policy(
                    vec![and_rules(vec![perm(Rule::Any(true))])],
                    vec![and_ids(vec![id(Identifier::NotId(Box::new(or_ids(vec![authenticated(
                        matcher(MatchPattern::Exact(SLEEP.into())),
                    )]))))])],
                ),
            )],
        );
        let f = network(deny);
        assert!(f.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        assert_eq!(
            f.evaluate(&conn("10.244.0.5", 8000, &[TEST_NS])),
            Decision::Deny(Denial::Policy("ns[default]-policy[deny-others]-rule[0]"))
        );
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[])));
    }

    #[test]
    fn source_ip_blocks_match_the_downstream_peer_for_all_three_ip_fields() {
        // ipBlocks -> direct_remote_ip, remoteIpBlocks -> remote_ip, and the old source_ip.
        #[allow(deprecated)]
        let source_ip = Identifier::SourceIp(cidr_range("10.1.0.0", 16));
        for (what, block) in [
            ("direct_remote_ip", Identifier::DirectRemoteIp(cidr_range("10.1.0.0", 16))),
            ("remote_ip", Identifier::RemoteIp(cidr_range("10.1.0.0", 16))),
            ("source_ip", source_ip),
        ] {
            let f = network(rules(
                proto::rbac::Action::Deny,
                vec![(
                    "ns[default]-policy[block]-rule[0]",
                    policy(vec![perm(Rule::Any(true))], vec![id(block)]),
                )],
            ));
            assert!(!f.allows(&conn("10.1.200.3", 8000, &[])), "{what}: in the block");
            assert!(f.allows(&conn("10.2.0.3", 8000, &[])), "{what}: outside the block");
        }
        // notIpBlocks on an ALLOW: everything but the block.
        let f = network(rules(
            proto::rbac::Action::Allow,
            vec![(
                RULE0,
                policy(
                    vec![perm(Rule::Any(true))],
                    vec![id(Identifier::NotId(Box::new(id(Identifier::DirectRemoteIp(cidr_range(
                        "192.168.0.0",
                        24,
                    ))))))],
                ),
            )],
        ));
        assert!(f.allows(&conn("10.2.0.3", 8000, &[])));
        assert!(!f.allows(&conn("192.168.0.77", 8000, &[])));
    }

    #[test]
    fn namespaces_as_istiod_1_18_writes_them_match_the_peer_principal_filter_state() {
        let f = network(rules(
            proto::rbac::Action::Allow,
            vec![(
                RULE0,
                policy(
                    vec![perm(Rule::Any(true))],
                    vec![or_ids(vec![peer_principal(regex(".*/ns/test/.*"))])],
                ),
            )],
        ));
        assert!(f.allows(&conn("10.244.0.5", 8000, &[TEST_NS])));
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        // Other filter state keys are not seen at L4: stricter, never looser.
        let other_key = id(Identifier::FilterState(FilterStateMatcher {
            key: "io.istio.local_principal".into(),
            matcher: Some(filter_state_matcher::Matcher::StringMatch(regex(".*"))),
        }));
        let f = network(rules(
            proto::rbac::Action::Allow,
            vec![(RULE0, policy(vec![perm(Rule::Any(true))], vec![other_key]))],
        ));
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[TEST_NS])));
    }

    #[test]
    fn sni_port_ranges_destination_ips_and_ignore_case_translate() {
        let sni = StringMatcher {
            match_pattern: Some(MatchPattern::Suffix(".Example.COM".into())),
            ignore_case: true,
        };
        let f = network(rules(
            proto::rbac::Action::Allow,
            vec![(
                RULE0,
                policy(
                    vec![and_rules(vec![
                        perm(Rule::RequestedServerName(sni)),
                        perm(Rule::DestinationPortRange(Int32Range { start: 8000, end: 8100 })),
                        perm(Rule::DestinationIp(cidr_range("10.244.0.0", 16))),
                    ])],
                    vec![perm_any_id()],
                ),
            )],
        ));
        let with_sni = |sni: &'static str, port: u16| Conn {
            source: "10.244.0.5:41000".parse().unwrap(),
            destination: format!("10.244.0.12:{port}").parse().unwrap(),
            tls: Some(Tls { sni: Some(sni), peer_names: &[] }),
        };
        assert!(f.allows(&with_sni("api.example.com", 8000)));
        assert!(f.allows(&with_sni("api.example.com", 8099)));
        assert!(!f.allows(&with_sni("api.example.com", 8100)), "the range end is exclusive");
        assert!(!f.allows(&with_sni("api.example.org", 8000)));
    }

    fn perm_any_id() -> proto::Principal {
        id(Identifier::Any(true))
    }

    #[test]
    fn an_http_allow_rule_on_methods_and_paths_never_matches_at_l4() {
        // ALLOW GET /info or POST /data from sleep: the HTTP parts are unseen, nothing is granted.
        let f = http(rules(
            proto::rbac::Action::Allow,
            vec![(
                RULE0,
                policy(
                    vec![
                        and_rules(vec![or_rules(vec![method("GET")]), or_rules(vec![path("/info")])]),
                        and_rules(vec![or_rules(vec![method("POST")]), or_rules(vec![path("/data")])]),
                    ],
                    vec![and_ids(vec![or_ids(vec![peer_principal(matcher(MatchPattern::Exact(
                        SLEEP.into(),
                    )))])])],
                ),
            )],
        ));
        assert_eq!(f.fail_closed_reason(), None);
        assert_eq!(f.evaluate(&conn("10.244.0.5", 8000, &[SLEEP])), Decision::Deny(Denial::NoPolicy));
    }

    #[test]
    fn an_http_deny_rule_on_methods_and_a_principal_matches_on_the_principal() {
        // DENY POST from ns test: denies every connection from ns test, none from elsewhere.
        #[allow(deprecated)] // istiod writes JWT claims as `metadata`
        let jwt =
            id(Identifier::Metadata(MetadataMatcher { filter: "istio_authn".into(), ..Default::default() }));
        let f = http(rules(
            proto::rbac::Action::Deny,
            vec![(
                "ns[default]-policy[deny-post]-rule[0]",
                policy(
                    vec![and_rules(vec![or_rules(vec![method("POST")])])],
                    vec![and_ids(vec![or_ids(vec![peer_principal(regex(".*/ns/test/.*"))])])],
                ),
            )],
        ));
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[TEST_NS])));
        assert!(f.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        // With a request principal (a JWT claim) and'ed in, the principal part is Unknown: deny.
        let f = http(rules(
            proto::rbac::Action::Deny,
            vec![("deny-jwt", policy(vec![port(8000)], vec![and_ids(vec![jwt])]))],
        ));
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        assert!(f.allows(&conn("10.244.0.5", 9000, &[SLEEP])), "the L4 part still has to match");
    }

    #[test]
    fn rules_unset_allow_all_and_empty_rules_deny_all() {
        let unset = NetworkRbac { stat_prefix: "tcp.".into(), ..Default::default() };
        let any = Any { type_url: NETWORK_RBAC_TYPE.into(), value: unset.encode_to_vec() };
        assert!(network_filter(&any).unwrap().allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        // `rules: {}` (istiod's ALLOW whose rules all needed HTTP on a TCP chain).
        let empty = network(proto::Rbac::default());
        assert_eq!(empty.evaluate(&conn("10.244.0.5", 8000, &[SLEEP])), Decision::Deny(Denial::NoPolicy));
        let deny_none = network(rules(proto::rbac::Action::Deny, vec![]));
        assert!(deny_none.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
        let http_unset = Any { type_url: HTTP_RBAC_TYPE.into(), value: HttpRbac::default().encode_to_vec() };
        assert!(http_filter(&http_unset).unwrap().allows(&conn("10.244.0.5", 8000, &[])));
    }

    #[test]
    fn the_first_matching_deny_policy_by_name_is_reported() {
        let f = network(rules(
            proto::rbac::Action::Deny,
            vec![
                ("z-last", policy(vec![port(8000)], vec![perm_any_id()])),
                ("a-first", policy(vec![port(8000)], vec![perm_any_id()])),
            ],
        ));
        assert_eq!(f.evaluate(&conn("10.244.0.5", 8000, &[])), Decision::Deny(Denial::Policy("a-first")));
    }

    #[test]
    fn shadow_rules_never_deny() {
        let m = NetworkRbac {
            shadow_rules: Some(proto::Rbac::default()),
            shadow_rules_stat_prefix: "istio_dry_run_allow_".into(),
            ..Default::default()
        };
        assert!(from_network(&m).allows(&conn("10.244.0.5", 8000, &[])));
    }

    /// A rule ringside cannot evaluate: the filter denies everything and names it.
    fn fails_closed(r: proto::Rbac, reason: &str) {
        let f = network(r);
        let why = f.fail_closed_reason().unwrap_or_else(|| panic!("served: {reason}"));
        assert!(why.contains(reason), "{why:?} should say {reason:?}");
        assert!(!f.allows(&conn("10.244.0.5", 8000, &[SLEEP])));
    }

    fn one(permission: proto::Permission, principal: proto::Principal) -> proto::Rbac {
        rules(proto::rbac::Action::Deny, vec![("p", policy(vec![permission], vec![principal]))])
    }

    #[test]
    fn a_rule_ringside_cannot_evaluate_fails_closed_and_says_why() {
        let any_perm = || perm(Rule::Any(true));
        let ext =
            TypedExtensionConfig { name: "envoy.rbac.matchers.upstream_ip_port".into(), typed_config: None };
        fails_closed(one(perm(Rule::Matcher(ext.clone())), perm_any_id()), "permission matcher");
        fails_closed(one(any_perm(), id(Identifier::Custom(ext))), "principal custom");
        fails_closed(one(any_perm(), authenticated(regex("(unclosed"))), "safe_regex \"(unclosed\"");
        fails_closed(
            one(any_perm(), authenticated(matcher(MatchPattern::Prefix(String::new())))),
            "empty prefix",
        );
        fails_closed(one(any_perm(), authenticated(StringMatcher::default())), "no pattern");
        fails_closed(one(perm(Rule::Any(false)), perm_any_id()), "any: false");
        fails_closed(one(and_rules(vec![]), perm_any_id()), "and_rules: empty");
        fails_closed(one(any_perm(), or_ids(vec![])), "or_ids: empty");
        fails_closed(one(proto::Permission { rule: None }, perm_any_id()), "without a rule");
        fails_closed(
            one(perm(Rule::DestinationIp(cidr_range("10.0.0.0", 40))), perm_any_id()),
            "10.0.0.0/40",
        );
        fails_closed(
            one(perm(Rule::DestinationPortRange(Int32Range { start: 9000, end: 8000 })), perm_any_id()),
            "destination_port_range",
        );
        fails_closed(
            rules(proto::rbac::Action::Allow, vec![("p", policy(vec![], vec![perm_any_id()]))]),
            "no permissions",
        );
        let mut cel = policy(vec![any_perm()], vec![perm_any_id()]);
        cel.condition = Some(Default::default());
        fails_closed(rules(proto::rbac::Action::Allow, vec![("p", cel)]), "CEL condition");
        fails_closed(proto::Rbac { action: 7, ..Default::default() }, "action 7");
        // The policy is named so a report line points at it.
        fails_closed(one(perm(Rule::Any(false)), perm_any_id()), "policy \"p\"");
        // Even a LOG or DENY filter that never denies otherwise: fail closed means closed.
        let mut log = one(perm(Rule::Any(false)), perm_any_id());
        log.action = proto::rbac::Action::Log as i32;
        fails_closed(log, "any: false");
    }

    #[test]
    fn the_xds_matcher_api_fails_closed() {
        let m = NetworkRbac { matcher: Some(Default::default()), ..Default::default() };
        assert_eq!(from_network(&m).fail_closed_reason(), Some("matcher (xDS matcher API) not evaluated"));
        let m = HttpRbac { matcher: Some(Default::default()), ..Default::default() };
        assert!(!from_http(&m).allows(&conn("10.244.0.5", 8000, &[])));
    }

    #[test]
    fn another_type_or_undecodable_bytes_are_errors() {
        let wrong = Any { type_url: HTTP_RBAC_TYPE.into(), value: Vec::new() };
        assert_eq!(
            network_filter(&wrong).unwrap_err(),
            Error::WrongType { found: HTTP_RBAC_TYPE.into(), want: NETWORK_RBAC_TYPE }
        );
        let garbage = Any { type_url: NETWORK_RBAC_TYPE.into(), value: vec![0x0a, 0xff] };
        assert!(matches!(network_filter(&garbage), Err(Error::Decode(_))));
    }
}
