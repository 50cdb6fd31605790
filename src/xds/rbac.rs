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
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let p = &rules.policies[name];
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
        Some(Rule::RequestedServerName(m)) => Permission::RequestedServerName(string(m, "requested_server_name")?),
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
        Some(Identifier::Custom(ext)) => return Err(format!("principal custom {:?}: not evaluated", ext.name)),
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
        Some(MatchPattern::Custom(ext)) => return Err(format!("{what}: custom matcher {:?} not evaluated", ext.name)),
    };
    let compiled = compiled.map_err(|e| format!("{what}: {e}"))?;
    Ok(if m.ignore_case { compiled.ignoring_case() } else { compiled })
}

fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    // An unset prefix_len is 0, as Envoy reads it.
    Cidr::new(&c.address_prefix, c.prefix_len.as_ref().map_or(0, |l| l.value)).map_err(|e| e.to_string())
}
