//! Istio's AuthorizationPolicy as Envoy's RBAC filters evaluate it, once per connection at L4
//! (SPEC §9): the network filter `envoy.filters.network.rbac` and, relayed at L4, the HTTP
//! connection manager's `envoy.filters.http.rbac`. This module owns the model (filters,
//! policies, permissions, principals, string and CIDR matchers) and its evaluation; it does no
//! I/O and knows no proto types (`xds::rbac` translates Envoy's protos into it). Everything is
//! compiled when the filter is built (CIDRs parsed, regexes compiled), so evaluating a
//! connection allocates nothing.
//!
//! # What a connection shows, and three-valued rules
//!
//! At L4, once the TLS handshake (if any) is done, ringside knows the peer's certificate names,
//! the downstream peer address, the original destination and the SNI: a [`Conn`]. Envoy's
//! `source_ip`, `direct_remote_ip` and `remote_ip` are all the downstream peer here (no proxy
//! protocol, no `x-forwarder-for`). Rules about anything else — HTTP methods, paths, hosts,
//! headers, request principals (JWT claims in dynamic metadata), other filter state — cannot be
//! decided, and SPEC §9 says they make a policy stricter, never looser. That is Kleene's
//! three-valued logic: such a leaf is [`Truth::Unknown`]; `and` is the minimum and `or` the
//! maximum of False < Unknown < True, and `not Unknown` is Unknown. An ALLOW policy grants
//! only when it is True (an ALLOW rule with L7 conditions never matches); a DENY policy denies
//! when it is True or Unknown (a DENY rule with L7 conditions matches on its L4 part alone).
//! `not` keeps this sound: `not (path = /admin)` is Unknown, not True.
//!
//! # Filters
//!
//! A filter without rules allows everything (Envoy). With rules, ALLOW denies unless a policy
//! matches (so `rules: {}` with no policies denies all), DENY allows unless one matches, LOG
//! never denies. A filter that holds a rule ringside cannot evaluate at all (an extension
//! matcher, a CEL condition, a regex that does not compile) fails closed: it denies every
//! connection and keeps the reason for a report line. Several filters apply in order and the
//! first denial wins ([`evaluate`]), as in Envoy's filter chains where Istio puts DENY first.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Why a matcher cannot be built (the filter holding it fails closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The regex does not compile (Envoy's RE2 would reject it too, or uses RE2-only syntax).
    #[error("safe_regex {pattern:?}: {reason}")]
    Regex {
        /// The pattern as configured.
        pattern: String,
        /// The compiler's message, on one line.
        reason: String,
    },
    /// A prefix, suffix or contains pattern that is empty (Envoy's validation requires a byte).
    #[error("empty {0} pattern")]
    EmptyPattern(&'static str),
    /// A CIDR whose address does not parse or whose length exceeds the address' bits.
    #[error("cidr {0:?}: invalid")]
    Cidr(String),
    /// A port range outside 0..=65536 or with start >= end (Envoy rejects both).
    #[error("destination_port_range [{start}, {end}): invalid")]
    PortRange {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// The value of a rule for one connection: decided, or needing what L4 does not show.
///
/// Ordered False < Unknown < True, so Kleene's `and` is `min` and `or` is `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Truth {
    /// The rule does not match.
    False,
    /// The rule needs attributes ringside does not see per connection (L7, metadata).
    Unknown,
    /// The rule matches.
    True,
}

impl Truth {
    fn from_bool(b: bool) -> Truth {
        if b { Truth::True } else { Truth::False }
    }

    fn not(self) -> Truth {
        match self {
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
            Truth::True => Truth::False,
        }
    }
}

/// Kleene `and` over `items`, stopping at the first False (empty: True).
fn all<T>(items: &[T], eval: impl Fn(&T) -> Truth) -> Truth {
    let mut acc = Truth::True;
    for item in items {
        let t = eval(item);
        if t == Truth::False {
            return t;
        }
        acc = acc.min(t);
    }
    acc
}

/// Kleene `or` over `items`, stopping at the first True (empty: False).
fn any<T>(items: &[T], eval: impl Fn(&T) -> Truth) -> Truth {
    let mut acc = Truth::False;
    for item in items {
        let t = eval(item);
        if t == Truth::True {
            return t;
        }
        acc = acc.max(t);
    }
    acc
}

/// What one connection shows the RBAC filters at L4, borrowed from the connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    /// The downstream peer address (Envoy's `source_ip`, `direct_remote_ip` and `remote_ip`).
    pub source: SocketAddr,
    /// The original destination (`destination_ip`, `destination_port`).
    pub destination: SocketAddr,
    /// Set when the connection is TLS, once the handshake is done.
    pub tls: Option<Tls<'a>>,
}

/// The TLS side of a [`Conn`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Tls<'a> {
    /// The requested server name (`requested_server_name`), if the client sent one.
    pub sni: Option<&'a str>,
    /// The names `authenticated.principal_name` is matched against, in Envoy's order: the
    /// verified peer certificate's URI SANs (`spiffe://td/ns/NS/sa/SA` in a mesh), then its DNS
    /// SANs, then its subject. Empty when the client presented no certificate.
    pub peer_names: &'a [&'a str],
}

impl Conn<'_> {
    /// Istio's `io.istio.peer_principal` filter state: the first `spiffe://` URI SAN of the
    /// peer certificate (istio_authn sets it after the handshake; Istio 1.18+ matches on it).
    fn peer_principal(&self) -> Option<&str> {
        self.tls?.peer_names.iter().copied().find(|n| n.starts_with("spiffe://"))
    }
}

/// A compiled `envoy.type.matcher.v3.StringMatcher`.
#[derive(Clone, Debug)]
pub struct StringMatch {
    pattern: Pattern,
    ignore_case: bool,
}

#[derive(Clone, Debug)]
enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Contains(Box<str>),
    Regex(regex::Regex),
}

impl StringMatch {
    /// Matches the whole value.
    pub fn exact(value: &str) -> StringMatch {
        StringMatch { pattern: Pattern::Exact(value.into()), ignore_case: false }
    }

    /// Matches values that start with `value` (non-empty, as Envoy validates).
    pub fn prefix(value: &str) -> Result<StringMatch, Invalid> {
        Self::non_empty("prefix", value)
            .map(|v| StringMatch { pattern: Pattern::Prefix(v), ignore_case: false })
    }

    /// Matches values that end with `value` (non-empty).
    pub fn suffix(value: &str) -> Result<StringMatch, Invalid> {
        Self::non_empty("suffix", value)
            .map(|v| StringMatch { pattern: Pattern::Suffix(v), ignore_case: false })
    }

    /// Matches values that hold `value` (non-empty).
    pub fn contains(value: &str) -> Result<StringMatch, Invalid> {
        Self::non_empty("contains", value)
            .map(|v| StringMatch { pattern: Pattern::Contains(v), ignore_case: false })
    }

    /// Matches values the regex matches as a whole, as Envoy's RE2 `FullMatch` does. The
    /// `regex` crate stands in for RE2: both guarantee linear time, have no backreferences or
    /// lookaround, and agree on the syntax istiod writes (`.*`, `.+`, classes, groups).
    pub fn regex(pattern: &str) -> Result<StringMatch, Invalid> {
        let anchored = format!("^(?:{pattern})$");
        regex::Regex::new(&anchored)
            .map(|re| StringMatch { pattern: Pattern::Regex(re), ignore_case: false })
            .map_err(|e| Invalid::Regex {
                pattern: pattern.to_owned(),
                reason: e.to_string().lines().last().unwrap_or_default().trim().to_owned(),
            })
    }

    /// Compare ASCII letters without case (Envoy's `ignore_case`; no effect on a regex, as in
    /// Envoy).
    pub fn ignoring_case(mut self) -> StringMatch {
        self.ignore_case = true;
        self
    }

    fn non_empty(kind: &'static str, value: &str) -> Result<Box<str>, Invalid> {
        if value.is_empty() { Err(Invalid::EmptyPattern(kind)) } else { Ok(value.into()) }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let v = value.as_bytes();
        let eq = |a: &[u8], b: &[u8]| if self.ignore_case { a.eq_ignore_ascii_case(b) } else { a == b };
        match &self.pattern {
            Pattern::Exact(p) => eq(v, p.as_bytes()),
            Pattern::Prefix(p) => v.get(..p.len()).is_some_and(|head| eq(head, p.as_bytes())),
            Pattern::Suffix(p) => v
                .len()
                .checked_sub(p.len())
                .and_then(|at| v.get(at..))
                .is_some_and(|tail| eq(tail, p.as_bytes())),
            // Patterns are never empty (constructors check), so windows() gets a positive size.
            Pattern::Contains(p) => v.windows(p.len().max(1)).any(|w| eq(w, p.as_bytes())),
            Pattern::Regex(re) => re.is_match(value),
        }
    }
}

/// A compiled `envoy.config.core.v3.CidrRange`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    /// An IPv4 range: network bits and mask.
    V4 {
        /// The address with host bits cleared.
        net: u32,
        /// The prefix mask.
        mask: u32,
    },
    /// An IPv6 range.
    V6 {
        /// The address with host bits cleared.
        net: u128,
        /// The prefix mask.
        mask: u128,
    },
}

impl Cidr {
    /// The range of `address_prefix/prefix_len`; host bits are ignored, as Envoy truncates.
    pub fn new(address_prefix: &str, prefix_len: u32) -> Result<Cidr, Invalid> {
        let bad = || Invalid::Cidr(format!("{address_prefix}/{prefix_len}"));
        let ip: IpAddr = address_prefix.parse().map_err(|_| bad())?;
        match ip {
            IpAddr::V4(v4) if prefix_len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - prefix_len).unwrap_or(0);
                Ok(Cidr::V4 { net: u32::from(v4) & mask, mask })
            }
            IpAddr::V6(v6) if prefix_len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - prefix_len).unwrap_or(0);
                Ok(Cidr::V6 { net: u128::from(v6) & mask, mask })
            }
            _ => Err(bad()),
        }
    }

    /// Whether `ip` is in the range. An IPv4-mapped IPv6 address counts as IPv4 (as Envoy
    /// reads peers of a dual-stack socket); otherwise families never match, even for /0.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Cidr::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == *net,
            (Cidr::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == *net,
            _ => false,
        }
    }
}

/// What a connection does: `envoy.config.rbac.v3.Permission`.
#[derive(Clone, Debug)]
pub enum Permission {
    /// `any`.
    Any,
    /// `and_rules`: all must match.
    And(Vec<Permission>),
    /// `or_rules`: one must match.
    Or(Vec<Permission>),
    /// `not_rule`.
    Not(Box<Permission>),
    /// `destination_ip`: the original destination address.
    DestinationIp(Cidr),
    /// `destination_port` (a value above 65535 never matches).
    DestinationPort(u32),
    /// `destination_port_range`: `start <= port < end`.
    DestinationPortRange {
        /// Inclusive.
        start: u32,
        /// Exclusive.
        end: u32,
    },
    /// `requested_server_name`: the SNI, empty when there is none (as in Envoy).
    RequestedServerName(StringMatch),
    /// A rule on what L4 does not show (`header`, `url_path`, `uri_template`, `metadata`...),
    /// named for debugging: always [`Truth::Unknown`].
    Unseen(&'static str),
}

impl Permission {
    /// The rule's value for `conn`.
    pub fn eval(&self, conn: &Conn<'_>) -> Truth {
        match self {
            Permission::Any => Truth::True,
            Permission::And(rules) => all(rules, |r| r.eval(conn)),
            Permission::Or(rules) => any(rules, |r| r.eval(conn)),
            Permission::Not(rule) => rule.eval(conn).not(),
            Permission::DestinationIp(cidr) => Truth::from_bool(cidr.contains(conn.destination.ip())),
            Permission::DestinationPort(port) => {
                Truth::from_bool(u32::from(conn.destination.port()) == *port)
            }
            Permission::DestinationPortRange { start, end } => {
                let port = u32::from(conn.destination.port());
                Truth::from_bool(*start <= port && port < *end)
            }
            Permission::RequestedServerName(m) => {
                Truth::from_bool(m.matches(conn.tls.and_then(|t| t.sni).unwrap_or("")))
            }
            Permission::Unseen(_) => Truth::Unknown,
        }
    }
}

/// Who connects: `envoy.config.rbac.v3.Principal`.
#[derive(Clone, Debug)]
pub enum Principal {
    /// `any`.
    Any,
    /// `and_ids`: all must match.
    And(Vec<Principal>),
    /// `or_ids`: one must match.
    Or(Vec<Principal>),
    /// `not_id`.
    Not(Box<Principal>),
    /// `authenticated`: a TLS connection; with a matcher, one of the peer's names matches (a
    /// peer without a certificate has the empty subject, as in Envoy).
    Authenticated(Option<StringMatch>),
    /// `filter_state` `io.istio.peer_principal` (how istiod 1.18+ writes `principals` and
    /// `namespaces`): the peer's first `spiffe://` URI SAN; no match without one.
    PeerPrincipal(StringMatch),
    /// `source_ip`, `direct_remote_ip`, `remote_ip`: the downstream peer address.
    SourceIp(Cidr),
    /// An identity L4 does not show (`header`, request principals in `metadata`, other filter
    /// state...), named for debugging: always [`Truth::Unknown`].
    Unseen(&'static str),
}

impl Principal {
    /// The identity's value for `conn`.
    pub fn eval(&self, conn: &Conn<'_>) -> Truth {
        match self {
            Principal::Any => Truth::True,
            Principal::And(ids) => all(ids, |p| p.eval(conn)),
            Principal::Or(ids) => any(ids, |p| p.eval(conn)),
            Principal::Not(id) => id.eval(conn).not(),
            Principal::Authenticated(name) => Truth::from_bool(match (conn.tls, name) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(tls), Some(m)) if tls.peer_names.is_empty() => m.matches(""),
                (Some(tls), Some(m)) => tls.peer_names.iter().any(|n| m.matches(n)),
            }),
            Principal::PeerPrincipal(m) => {
                Truth::from_bool(conn.peer_principal().is_some_and(|p| m.matches(p)))
            }
            Principal::SourceIp(cidr) => Truth::from_bool(cidr.contains(conn.source.ip())),
            Principal::Unseen(_) => Truth::Unknown,
        }
    }
}

/// A named `envoy.config.rbac.v3.Policy`: one of the permissions and one of the principals.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy's key in `policies` (istiod: `ns[NS]-policy[NAME]-rule[N]`).
    pub name: Box<str>,
    /// OR'ed.
    pub permissions: Vec<Permission>,
    /// OR'ed.
    pub principals: Vec<Principal>,
}

impl Policy {
    /// The policy's value for `conn` (permissions first: a port mismatch skips the names).
    pub fn eval(&self, conn: &Conn<'_>) -> Truth {
        let does = any(&self.permissions, |p| p.eval(conn));
        if does == Truth::False {
            return does;
        }
        does.min(any(&self.principals, |p| p.eval(conn)))
    }
}

/// `envoy.config.rbac.v3.RBAC.Action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Safe list: deny unless a policy matches.
    Allow,
    /// Block list: allow unless a policy matches.
    Deny,
    /// Never denies (Envoy only sets an access-log hint).
    Log,
}

/// One RBAC filter, ready to evaluate connections.
#[derive(Clone, Debug)]
pub struct Filter {
    rules: Rules,
}

#[derive(Clone, Debug)]
enum Rules {
    Unset,
    Set { action: Action, policies: Vec<Policy> },
    FailClosed(Box<str>),
}

/// Why a connection was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial<'f> {
    /// A DENY policy matched (on its L4 part alone when it has L7 conditions).
    Policy(&'f str),
    /// An ALLOW filter where no policy matched.
    NoPolicy,
    /// The filter holds a rule ringside cannot evaluate.
    FailClosed(&'f str),
}

impl fmt::Display for Denial<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Policy(name) => write!(f, "rbac: denied by policy {name}"),
            Denial::NoPolicy => f.write_str("rbac: no allow policy matched"),
            Denial::FailClosed(why) => write!(f, "rbac: fail closed: {why}"),
        }
    }
}

/// The outcome for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'f> {
    /// The connection may proceed.
    Allow,
    /// The connection is closed.
    Deny(Denial<'f>),
}

impl Filter {
    /// A filter whose `rules` are unset: Envoy allows everything.
    pub fn without_rules() -> Filter {
        Filter { rules: Rules::Unset }
    }

    /// A filter with `rules` (policies evaluated in the given order; the first match names the
    /// denial).
    pub fn new(action: Action, policies: Vec<Policy>) -> Filter {
        Filter { rules: Rules::Set { action, policies } }
    }

    /// A filter that denies every connection because a rule cannot be evaluated.
    pub fn fail_closed(why: impl Into<String>) -> Filter {
        Filter { rules: Rules::FailClosed(why.into().into_boxed_str()) }
    }

    /// Why the filter fails closed, for a report line.
    pub fn fail_closed_reason(&self) -> Option<&str> {
        match &self.rules {
            Rules::FailClosed(why) => Some(why),
            _ => None,
        }
    }

    /// The decision for `conn`.
    pub fn evaluate(&self, conn: &Conn<'_>) -> Decision<'_> {
        match &self.rules {
            Rules::Unset => Decision::Allow,
            Rules::FailClosed(why) => Decision::Deny(Denial::FailClosed(why)),
            Rules::Set { action: Action::Log, .. } => Decision::Allow,
            Rules::Set { action: Action::Allow, policies } => {
                if policies.iter().any(|p| p.eval(conn) == Truth::True) {
                    Decision::Allow
                } else {
                    Decision::Deny(Denial::NoPolicy)
                }
            }
            Rules::Set { action: Action::Deny, policies } => {
                match policies.iter().find(|p| p.eval(conn) != Truth::False) {
                    Some(p) => Decision::Deny(Denial::Policy(&p.name)),
                    None => Decision::Allow,
                }
            }
        }
    }

    /// Whether `conn` may proceed.
    pub fn allows(&self, conn: &Conn<'_>) -> bool {
        self.evaluate(conn) == Decision::Allow
    }
}

/// A chain's RBAC filters in order: the first denial wins, else the connection is allowed.
pub fn evaluate<'f>(filters: &'f [Filter], conn: &Conn<'_>) -> Decision<'f> {
    for f in filters {
        if let d @ Decision::Deny(_) = f.evaluate(conn) {
            return d;
        }
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/test/sa/other";

    fn plain(source: &str, destination: &str) -> Conn<'static> {
        Conn { source: source.parse().unwrap(), destination: destination.parse().unwrap(), tls: None }
    }

    fn mtls<'a>(names: &'a [&'a str], destination: &str) -> Conn<'a> {
        Conn {
            source: "10.0.0.7:40000".parse().unwrap(),
            destination: destination.parse().unwrap(),
            tls: Some(Tls { sni: None, peer_names: names }),
        }
    }

    fn policy(name: &str, permissions: Vec<Permission>, principals: Vec<Principal>) -> Policy {
        Policy { name: name.into(), permissions, principals }
    }

    fn principal_exact(name: &str) -> Principal {
        Principal::Authenticated(Some(StringMatch::exact(name)))
    }

    #[test]
    fn string_matchers_exact_prefix_suffix_contains_and_regex_match_as_envoy_does() {
        let exact = StringMatch::exact(SLEEP);
        assert!(exact.matches(SLEEP));
        assert!(!exact.matches(&SLEEP.to_uppercase()));
        assert!(!exact.matches("spiffe://cluster.local/ns/default/sa/sleep2"));
        let prefix = StringMatch::prefix("spiffe://cluster.local/ns/default/").unwrap();
        assert!(prefix.matches(SLEEP));
        assert!(!prefix.matches(OTHER));
        assert!(!prefix.matches("spiffe://"));
        let suffix = StringMatch::suffix("/sa/sleep").unwrap();
        assert!(suffix.matches(SLEEP));
        assert!(!suffix.matches(OTHER));
        assert!(!suffix.matches("sleep"));
        let contains = StringMatch::contains("/ns/test/").unwrap();
        assert!(contains.matches(OTHER));
        assert!(!contains.matches(SLEEP));
        assert!(!contains.matches("/ns/"));
        // Envoy's safe_regex is a full match: ".*/ns/test/.*" must cover the whole name.
        let regex = StringMatch::regex(".*/ns/test/.*").unwrap();
        assert!(regex.matches(OTHER));
        assert!(!regex.matches(SLEEP));
        let partial = StringMatch::regex("ns/test").unwrap();
        assert!(!partial.matches(OTHER), "a regex matches the whole value, not a substring");
        let alternation = StringMatch::regex("a|b").unwrap();
        assert!(alternation.matches("a") && alternation.matches("b") && !alternation.matches("ab"));
    }

    #[test]
    fn ignore_case_compares_ascii_letters_without_case_except_in_a_regex() {
        let upper = SLEEP.to_uppercase();
        assert!(StringMatch::exact(SLEEP).ignoring_case().matches(&upper));
        assert!(StringMatch::prefix("SPIFFE://Cluster.Local/").unwrap().ignoring_case().matches(SLEEP));
        assert!(StringMatch::suffix("/SA/SLEEP").unwrap().ignoring_case().matches(SLEEP));
        assert!(StringMatch::contains("/NS/Default/").unwrap().ignoring_case().matches(SLEEP));
        assert!(!StringMatch::contains("/NS/test/").unwrap().ignoring_case().matches(SLEEP));
        assert!(!StringMatch::regex("SPIFFE://.*").unwrap().ignoring_case().matches(SLEEP));
    }

    #[test]
    fn empty_prefix_suffix_contains_and_bad_regexes_are_invalid() {
        assert_eq!(StringMatch::prefix("").unwrap_err(), Invalid::EmptyPattern("prefix"));
        assert_eq!(StringMatch::suffix("").unwrap_err(), Invalid::EmptyPattern("suffix"));
        assert_eq!(StringMatch::contains("").unwrap_err(), Invalid::EmptyPattern("contains"));
        assert!(matches!(StringMatch::regex("(unclosed"), Err(Invalid::Regex { .. })));
        // Backreferences are RE2-invalid too.
        assert!(matches!(StringMatch::regex(r"(a)\1"), Err(Invalid::Regex { .. })));
    }

    #[test]
    fn cidr_ranges_match_their_family_with_host_bits_ignored() {
        let ten = Cidr::new("10.1.2.3", 8).unwrap();
        assert!(ten.contains("10.200.0.1".parse().unwrap()));
        assert!(!ten.contains("11.0.0.1".parse().unwrap()));
        // A peer of a dual-stack socket, IPv4-mapped, is IPv4.
        assert!(ten.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one = Cidr::new("192.168.1.5", 32).unwrap();
        assert!(one.contains("192.168.1.5".parse().unwrap()));
        assert!(!one.contains("192.168.1.6".parse().unwrap()));
        let all_v4 = Cidr::new("0.0.0.0", 0).unwrap();
        assert!(all_v4.contains("203.0.113.9".parse().unwrap()));
        assert!(!all_v4.contains("2001:db8::1".parse().unwrap()), "families never match, even /0");
        let v6 = Cidr::new("2001:db8::", 32).unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(Cidr::new("10.0.0.0", 33).unwrap_err(), Invalid::Cidr("10.0.0.0/33".into()));
        assert!(Cidr::new("2001:db8::", 129).is_err());
        assert!(Cidr::new("not-an-ip", 8).is_err());
    }

    #[test]
    fn permissions_match_destination_ip_port_port_range_and_sni() {
        let conn = Conn {
            source: "10.0.0.7:40000".parse().unwrap(),
            destination: "10.0.0.9:8080".parse().unwrap(),
            tls: Some(Tls {
                sni: Some("outbound_.8000_._.httpbin.default.svc.cluster.local"),
                peer_names: &[],
            }),
        };
        let eval = |p: Permission| p.eval(&conn);
        assert_eq!(eval(Permission::Any), Truth::True);
        assert_eq!(eval(Permission::DestinationPort(8080)), Truth::True);
        assert_eq!(eval(Permission::DestinationPort(80)), Truth::False);
        assert_eq!(eval(Permission::DestinationPort(8080 + 65536)), Truth::False);
        assert_eq!(eval(Permission::DestinationPortRange { start: 8000, end: 8081 }), Truth::True);
        assert_eq!(
            eval(Permission::DestinationPortRange { start: 8000, end: 8080 }),
            Truth::False,
            "end is exclusive"
        );
        assert_eq!(
            eval(Permission::DestinationPortRange { start: 8080, end: 8081 }),
            Truth::True,
            "start is inclusive"
        );
        assert_eq!(eval(Permission::DestinationIp(Cidr::new("10.0.0.0", 24).unwrap())), Truth::True);
        assert_eq!(eval(Permission::DestinationIp(Cidr::new("10.0.1.0", 24).unwrap())), Truth::False);
        let sni = |m: StringMatch| Permission::RequestedServerName(m);
        assert_eq!(eval(sni(StringMatch::suffix(".default.svc.cluster.local").unwrap())), Truth::True);
        assert_eq!(eval(sni(StringMatch::exact("other"))), Truth::False);
        // Without TLS the requested server name is empty, as in Envoy.
        let plaintext = plain("10.0.0.7:40000", "10.0.0.9:8080");
        assert_eq!(sni(StringMatch::exact("")).eval(&plaintext), Truth::True);
        assert_eq!(sni(StringMatch::regex(".+").unwrap()).eval(&plaintext), Truth::False);
    }

    #[test]
    fn principals_match_authenticated_names_peer_principal_and_source_ip() {
        let names = [SLEEP, "sleep.default.svc"];
        let conn = mtls(&names, "10.0.0.9:8080");
        assert_eq!(principal_exact(SLEEP).eval(&conn), Truth::True);
        assert_eq!(principal_exact("sleep.default.svc").eval(&conn), Truth::True, "DNS SANs are names too");
        assert_eq!(principal_exact(OTHER).eval(&conn), Truth::False);
        assert_eq!(Principal::Authenticated(None).eval(&conn), Truth::True);
        let peer = |m: StringMatch| Principal::PeerPrincipal(m);
        assert_eq!(peer(StringMatch::exact(SLEEP)).eval(&conn), Truth::True);
        assert_eq!(
            peer(StringMatch::exact("sleep.default.svc")).eval(&conn),
            Truth::False,
            "only the spiffe id"
        );
        assert_eq!(Principal::SourceIp(Cidr::new("10.0.0.0", 16).unwrap()).eval(&conn), Truth::True);
        assert_eq!(Principal::SourceIp(Cidr::new("10.1.0.0", 16).unwrap()).eval(&conn), Truth::False);
        assert_eq!(Principal::Any.eval(&conn), Truth::True);

        let plaintext = plain("10.0.0.7:40000", "10.0.0.9:8080");
        assert_eq!(Principal::Authenticated(None).eval(&plaintext), Truth::False);
        assert_eq!(
            Principal::Authenticated(Some(StringMatch::regex(".*").unwrap())).eval(&plaintext),
            Truth::False
        );
        assert_eq!(peer(StringMatch::regex(".*").unwrap()).eval(&plaintext), Truth::False);
        // TLS without a client certificate: Envoy matches the empty subject.
        let anonymous = mtls(&[], "10.0.0.9:8080");
        assert_eq!(Principal::Authenticated(None).eval(&anonymous), Truth::True);
        assert_eq!(
            Principal::Authenticated(Some(StringMatch::regex(".*").unwrap())).eval(&anonymous),
            Truth::True
        );
        assert_eq!(principal_exact(SLEEP).eval(&anonymous), Truth::False);
        assert_eq!(peer(StringMatch::regex(".*").unwrap()).eval(&anonymous), Truth::False);
    }

    #[test]
    fn a_principal_name_matches_any_uri_san_then_dns_sans_then_the_subject_as_envoy_does() {
        // Names as `tls::peer_names` gives them: URI SANs, DNS SANs, the subject last.
        let names = [OTHER, SLEEP, "sleep.default.svc", "CN=sleep,O=mesh"];
        let conn = mtls(&names, "10.0.0.9:8080");
        assert_eq!(principal_exact(SLEEP).eval(&conn), Truth::True, "the second URI SAN");
        assert_eq!(principal_exact("CN=sleep,O=mesh").eval(&conn), Truth::True, "the subject");
        let prefix = Principal::Authenticated(Some(
            StringMatch::prefix("spiffe://cluster.local/ns/default/").unwrap(),
        ));
        assert_eq!(prefix.eval(&conn), Truth::True);
        assert_eq!(principal_exact("spiffe://cluster.local/ns/default/sa/nobody").eval(&conn), Truth::False);
        // io.istio.peer_principal stays the first spiffe URI SAN (istio_authn's filter state).
        assert_eq!(Principal::PeerPrincipal(StringMatch::exact(SLEEP)).eval(&conn), Truth::False);
        assert_eq!(Principal::PeerPrincipal(StringMatch::exact(OTHER)).eval(&conn), Truth::True);
    }

    #[test]
    fn and_or_not_follow_kleene_logic_with_l7_leaves_unknown() {
        use Permission::{And, Any, Not, Or, Unseen};
        let conn = plain("10.0.0.7:40000", "10.0.0.9:8080");
        let f = || Permission::DestinationPort(1);
        let eval = |p: Permission| p.eval(&conn);
        assert_eq!(eval(Unseen("header")), Truth::Unknown);
        assert_eq!(eval(And(vec![Any, Unseen("header")])), Truth::Unknown);
        assert_eq!(eval(And(vec![Unseen("header"), f()])), Truth::False, "False wins an and");
        assert_eq!(eval(And(vec![Any, Any])), Truth::True);
        assert_eq!(eval(Or(vec![f(), Unseen("url_path")])), Truth::Unknown);
        assert_eq!(eval(Or(vec![Unseen("url_path"), Any])), Truth::True, "True wins an or");
        assert_eq!(eval(Or(vec![f(), f()])), Truth::False);
        assert_eq!(eval(Not(Box::new(Unseen("header")))), Truth::Unknown, "not Unknown stays Unknown");
        assert_eq!(eval(Not(Box::new(f()))), Truth::True);
        assert_eq!(eval(Not(Box::new(Any))), Truth::False);

        let p = |id: Principal| id.eval(&conn);
        let ten = || Principal::SourceIp(Cidr::new("10.0.0.0", 8).unwrap());
        assert_eq!(p(Principal::And(vec![ten(), Principal::Unseen("metadata")])), Truth::Unknown);
        assert_eq!(p(Principal::Or(vec![ten(), Principal::Unseen("metadata")])), Truth::True);
        assert_eq!(p(Principal::Not(Box::new(ten()))), Truth::False);
        assert_eq!(p(Principal::Not(Box::new(Principal::Unseen("header")))), Truth::Unknown);
    }

    #[test]
    fn an_allow_rule_with_l7_conditions_never_matches() {
        // ALLOW GET /info from sleep: the path and method are not seen at L4.
        let get_info = Permission::And(vec![Permission::Unseen("header"), Permission::Unseen("url_path")]);
        let filter = Filter::new(
            Action::Allow,
            vec![policy("allow-get", vec![get_info], vec![principal_exact(SLEEP)])],
        );
        let names = [SLEEP];
        assert_eq!(filter.evaluate(&mtls(&names, "10.0.0.9:8000")), Decision::Deny(Denial::NoPolicy));
        // The same rule on the port alone grants.
        let port = Filter::new(
            Action::Allow,
            vec![policy("allow-port", vec![Permission::DestinationPort(8000)], vec![principal_exact(SLEEP)])],
        );
        assert!(port.allows(&mtls(&names, "10.0.0.9:8000")));
    }

    #[test]
    fn a_deny_rule_with_l7_conditions_matches_on_its_l4_part_alone() {
        // DENY POST from sleep: the method is unseen, the principal decides.
        let filter = Filter::new(
            Action::Deny,
            vec![policy("deny-post", vec![Permission::Unseen("header")], vec![principal_exact(SLEEP)])],
        );
        let sleep = [SLEEP];
        let other = [OTHER];
        assert_eq!(
            filter.evaluate(&mtls(&sleep, "10.0.0.9:8000")),
            Decision::Deny(Denial::Policy("deny-post"))
        );
        assert_eq!(filter.evaluate(&mtls(&other, "10.0.0.9:8000")), Decision::Allow);
        // An L4 part that does not match still lets the connection through.
        let on_port = Filter::new(
            Action::Deny,
            vec![policy(
                "deny-post-9000",
                vec![Permission::And(vec![Permission::Unseen("header"), Permission::DestinationPort(9000)])],
                vec![Principal::Any],
            )],
        );
        assert!(on_port.allows(&mtls(&sleep, "10.0.0.9:8000")));
        assert!(!on_port.allows(&mtls(&sleep, "10.0.0.9:9000")));
    }

    #[test]
    fn a_policy_needs_one_permission_and_one_principal() {
        let p = policy(
            "p",
            vec![Permission::DestinationPort(1), Permission::DestinationPort(8000)],
            vec![principal_exact(OTHER), principal_exact(SLEEP)],
        );
        let sleep = [SLEEP];
        assert_eq!(p.eval(&mtls(&sleep, "10.0.0.9:8000")), Truth::True);
        assert_eq!(p.eval(&mtls(&sleep, "10.0.0.9:8001")), Truth::False);
        let nobody = ["spiffe://cluster.local/ns/x/sa/y"];
        assert_eq!(p.eval(&mtls(&nobody, "10.0.0.9:8000")), Truth::False);
    }

    #[test]
    fn rules_unset_allow_all_and_allow_without_policies_denies_all() {
        let conn = plain("10.0.0.7:40000", "10.0.0.9:8080");
        assert!(Filter::without_rules().allows(&conn));
        assert_eq!(Filter::new(Action::Allow, vec![]).evaluate(&conn), Decision::Deny(Denial::NoPolicy));
        assert!(Filter::new(Action::Deny, vec![]).allows(&conn));
        assert!(Filter::new(Action::Log, vec![]).allows(&conn));
    }

    #[test]
    fn a_log_filter_never_denies() {
        let conn = plain("10.0.0.7:40000", "10.0.0.9:8080");
        let log = Filter::new(Action::Log, vec![policy("log", vec![Permission::Any], vec![Principal::Any])]);
        assert!(log.allows(&conn));
    }

    #[test]
    fn a_rule_ringside_cannot_evaluate_denies_every_connection_and_says_why() {
        let filter = Filter::fail_closed("policy p: permission matcher extension not evaluated");
        let conn = plain("10.0.0.7:40000", "10.0.0.9:8080");
        assert_eq!(
            filter.evaluate(&conn),
            Decision::Deny(Denial::FailClosed("policy p: permission matcher extension not evaluated"))
        );
        assert_eq!(filter.fail_closed_reason(), Some("policy p: permission matcher extension not evaluated"));
        assert_eq!(Filter::without_rules().fail_closed_reason(), None);
        assert_eq!(
            Denial::FailClosed("x").to_string(),
            "rbac: fail closed: x",
            "the reason reads as a report line"
        );
    }

    #[test]
    fn several_filters_apply_in_order_and_the_first_denial_wins() {
        let deny = Filter::new(
            Action::Deny,
            vec![policy(
                "deny-test-ns",
                vec![Permission::Any],
                vec![Principal::PeerPrincipal(StringMatch::regex(".*/ns/test/.*").unwrap())],
            )],
        );
        let allow = Filter::new(
            Action::Allow,
            vec![policy("allow-mesh", vec![Permission::Any], vec![Principal::Authenticated(None)])],
        );
        let chain = [deny, allow];
        let sleep = [SLEEP];
        let other = [OTHER];
        assert_eq!(evaluate(&chain, &mtls(&sleep, "10.0.0.9:8000")), Decision::Allow);
        assert_eq!(
            evaluate(&chain, &mtls(&other, "10.0.0.9:8000")),
            Decision::Deny(Denial::Policy("deny-test-ns"))
        );
        assert_eq!(
            evaluate(&chain, &plain("10.0.0.7:40000", "10.0.0.9:8000")),
            Decision::Deny(Denial::NoPolicy)
        );
        assert_eq!(evaluate(&[], &plain("10.0.0.7:40000", "10.0.0.9:8000")), Decision::Allow);
    }
}
