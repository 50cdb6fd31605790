//! Filter chain match (SPEC §9), in Envoy's order: destination port, destination IP, server
//! name, transport protocol, application protocols, direct source IP, source type, source IP,
//! source port. At each step the most specific match wins and the others drop out (no
//! backtracking); a connection no chain takes gets the default chain. Pure: no I/O.
//!
//! Built once per listener and publication ([`ChainIndex::new`]), so a connection costs a
//! hash lookup by handoff address and by port, then steps over the few chains left, with no
//! allocation (up to [`INLINE`] candidates) and no scan of the listener's other chains.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::config::{Cidr, FilterChain, Inspectors, SourceType};

/// What a connection shows the match.
#[derive(Clone, Copy, Debug)]
pub struct ConnFacts<'a> {
    /// The (original) destination.
    pub destination: SocketAddr,
    /// The client's address.
    pub source: SocketAddr,
    /// `tls` or `raw_buffer`.
    pub transport: &'a str,
    /// The ClientHello's SNI, lowercase.
    pub server_name: Option<&'a str>,
    /// The ClientHello's ALPN protocols, in the client's order.
    pub alpn: &'a [String],
}

/// What a connection is peeked for before its chain is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    /// A ClientHello (`tls_inspector`).
    pub tls: bool,
    /// An HTTP/1.x request line or the HTTP/2 preface (`http_inspector`).
    pub http: bool,
}

/// Candidates kept on the stack; a port with more chains than this (after its handoff group)
/// spills to the heap.
pub const INLINE: usize = 32;

/// One listener's chains, indexed for the match.
#[derive(Debug, Default)]
pub struct ChainIndex {
    /// By the listener a chain was handed off from (`None`: the listener's own chains).
    groups: HashMap<Option<SocketAddr>, Group>,
    /// Some chain matches on the client's address or port: only then is it asked for.
    uses_source: bool,
}

#[derive(Debug, Default)]
struct Group {
    /// Non-default chains naming a destination port, by port.
    by_port: HashMap<u16, Bucket>,
    /// Non-default chains with no destination port.
    any_port: Bucket,
    /// The group's default chain.
    default: Option<usize>,
    /// The inspectors of the listener its chains came from (SPEC §9).
    inspectors: Inspectors,
}

/// The chains that compete for one destination port.
#[derive(Debug, Default)]
struct Bucket {
    /// Chains whose destination ranges are all single addresses (istiod's per-service
    /// `VIP/32`), by address: the destination IP step's longest match, found by lookup.
    hosts: HashMap<IpAddr, Vec<usize>>,
    /// The others (no ranges, or wider ones), in order.
    rest: Vec<usize>,
    /// Some of them differ by what a ClientHello says (transport, server name, ALPN): only
    /// then is a connection's first flight peeked (Envoy's `tls_inspector`), so a
    /// server-first protocol on a port whose chains do not care never waits.
    inspects: bool,
    /// Some plaintext chain names application protocols (istiod's `http/1.1`, `h2c`): only
    /// then does `http_inspector`'s verdict change the chain.
    sniffs: bool,
}

impl Bucket {
    fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.rest.is_empty()
    }

    /// The chains that can survive the destination IP step for `ip`, in order: those naming
    /// `ip` as a single address, and the others (host-only chains naming other addresses
    /// can never be the longest match, nor match without ranges).
    fn candidates(&self, ip: IpAddr) -> (&[usize], &[usize]) {
        (self.hosts.get(&ip).map_or(&[][..], |v| &v[..]), &self.rest)
    }
    fn push(&mut self, i: usize, c: &FilterChain) {
        let host = |r: &Cidr| u32::from(r.len) == if r.addr.is_ipv4() { 32 } else { 128 };
        if !c.prefix_ranges.is_empty() && c.prefix_ranges.iter().all(host) {
            for r in &c.prefix_ranges {
                let list = self.hosts.entry(r.addr).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        } else {
            self.rest.push(i);
        }
        self.inspects |= c.transport_protocol.is_some()
            || !c.application_protocols.is_empty()
            || !c.server_names.is_empty();
        self.sniffs |= !c.application_protocols.is_empty() && c.transport_protocol.as_deref() != Some("tls");
    }
}

impl ChainIndex {
    /// Index `chains` (a listener's, in order).
    pub fn new(chains: &[FilterChain]) -> ChainIndex {
        let mut groups: HashMap<Option<SocketAddr>, Group> = HashMap::new();
        for (i, c) in chains.iter().enumerate() {
            let g = groups.entry(c.handoff).or_default();
            // Every chain of a group came from one listener: the first that says gives them.
            if let Some(x) = &c.inspectors
                && g.default.is_none()
                && g.by_port.is_empty()
                && g.any_port.is_empty()
            {
                g.inspectors = Inspectors::clone(x);
            }
            if c.default {
                g.default.get_or_insert(i);
            } else if let Some(port) = c.destination_port {
                g.by_port.entry(port).or_default().push(i, c);
            } else {
                g.any_port.push(i, c);
            }
        }
        let uses_source = chains.iter().any(|c| {
            c.source_type != SourceType::Any
                || !c.source_prefix_ranges.is_empty()
                || !c.direct_source_prefix_ranges.is_empty()
                || !c.source_ports.is_empty()
        });
        ChainIndex { groups, uses_source }
    }

    /// Whether a connection to `destination` must show its ClientHello (if any) before its
    /// chain is known: the chains competing for it differ by transport, server name or ALPN.
    pub fn inspects(&self, destination: SocketAddr) -> bool {
        self.inspection(destination).tls
    }

    /// What a connection to `destination` is peeked for before its chain is known (SPEC §9):
    /// each inspector only where it runs for the destination port (its `filter_disabled`) and
    /// the chains competing for the connection differ by what it would find.
    pub fn inspection(&self, destination: SocketAddr) -> Inspection {
        match self.group_and_bucket(destination) {
            None => Inspection::default(),
            Some((g, b)) => Inspection {
                tls: b.inspects && g.inspectors.tls(destination.port()),
                http: b.sniffs && g.inspectors.http(destination.port()),
            },
        }
    }

    /// Whether the match reads the client's address (else any address will do).
    pub fn uses_source(&self) -> bool {
        self.uses_source
    }

    /// The handoff group and port bucket a connection to `dst` competes in.
    fn group_and_bucket(&self, dst: SocketAddr) -> Option<(&Group, &Bucket)> {
        let wildcard = SocketAddr::new(
            if dst.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) },
            dst.port(),
        );
        let group = [Some(dst), Some(wildcard), None].iter().find_map(|k| self.groups.get(k))?;
        let bucket = group.by_port.get(&dst.port()).filter(|b| !b.is_empty()).unwrap_or(&group.any_port);
        Some((group, bucket))
    }

    /// The chain `facts` takes among `chains` (those this index was built from), if any.
    ///
    /// As Envoy hands a captured connection to the listener not bound to its port whose
    /// address is the original destination (`IP:port`, else `0.0.0.0:port`), only the chains
    /// handed off from that listener compete; when there is none, the listener's own.
    pub fn select(&self, chains: &[FilterChain], facts: &ConnFacts<'_>) -> Option<usize> {
        let (group, bucket) = self.group_and_bucket(facts.destination)?;
        let (hosts, rest) = bucket.candidates(facts.destination.ip());
        let total = hosts.len() + rest.len();
        let mut inline = [0usize; INLINE];
        let mut spilled = Vec::new();
        let candidates: &mut [usize] = if total <= INLINE {
            &mut inline[..total]
        } else {
            spilled.resize(total, 0);
            &mut spilled
        };
        merge_in_order(hosts, rest, candidates);
        let chosen = narrow_all(chains, candidates, facts);
        chosen.or(group.default)
    }
}

/// The match after the destination port, over `candidates` (narrowed in place).
fn narrow_all(chains: &[FilterChain], candidates: &mut [usize], f: &ConnFacts<'_>) -> Option<usize> {
    let chain = |i: usize| chains.get(i);
    let mut n = candidates.len();
    // Destination IP: the longest prefix holding it, else chains without ranges.
    n = by_longest_prefix(candidates, n, |i| chain(i).map(|c| &c.prefix_ranges[..]), f.destination.ip());
    // Server name: exact, else the longest `*.suffix`, else chains without names.
    n = by_server_name(candidates, n, |i| chain(i).map(|c| &c.server_names[..]), f.server_name);
    // Transport protocol.
    n = by_exact(candidates, n, |i| {
        chain(i).map(|c| match &c.transport_protocol {
            None => Level::Any,
            Some(t) if t == f.transport => Level::Exact,
            Some(_) => Level::No,
        })
    });
    // Application protocols: the client's first listed protocol that any chain names wins
    // (Envoy's rule), else chains naming none.
    let named = |p: &String| {
        candidates[..n].iter().any(|&i| chain(i).is_some_and(|c| c.application_protocols.contains(p)))
    };
    let wanted = f.alpn.iter().find(|p| named(p));
    n = by_exact(candidates, n, |i| {
        chain(i).map(|c| match (c.application_protocols.is_empty(), wanted) {
            (true, _) => Level::Any,
            (false, Some(p)) if c.application_protocols.contains(p) => Level::Exact,
            (false, _) => Level::No,
        })
    });
    // Direct source IP (the socket's peer: the same as the source at L4).
    n = by_longest_prefix(
        candidates,
        n,
        |i| chain(i).map(|c| &c.direct_source_prefix_ranges[..]),
        f.source.ip(),
    );
    // Source type.
    let local = f.source.ip() == f.destination.ip() || f.source.ip().is_loopback();
    n = by_exact(candidates, n, |i| {
        chain(i).map(|c| match c.source_type {
            SourceType::Any => Level::Any,
            SourceType::Local if local => Level::Exact,
            SourceType::External if !local => Level::Exact,
            _ => Level::No,
        })
    });
    // Source IP, then source port.
    n = by_longest_prefix(candidates, n, |i| chain(i).map(|c| &c.source_prefix_ranges[..]), f.source.ip());
    n = by_exact(candidates, n, |i| {
        chain(i).map(|c| match (c.source_ports.is_empty(), c.source_ports.contains(&f.source.port())) {
            (true, _) => Level::Any,
            (false, true) => Level::Exact,
            (false, false) => Level::No,
        })
    });
    candidates[..n].first().copied()
}

/// `a` and `b` (each ascending) into `out` (their total length), ascending: config order.
fn merge_in_order(a: &[usize], b: &[usize], out: &mut [usize]) {
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    for slot in out.iter_mut() {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            _ => false,
        };
        if let Some(&i) = if take_a { a.next() } else { b.next() } {
            *slot = i;
        }
    }
}

/// How a chain's condition at one step meets the connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// It names this value.
    Exact,
    /// It names nothing at this step.
    Any,
    /// It names other values.
    No,
}

/// Keep the candidates whose level is the best present (Exact over Any); returns how many.
fn by_exact(c: &mut [usize], n: usize, level: impl Fn(usize) -> Option<Level>) -> usize {
    let exact = c[..n].iter().any(|&i| level(i) == Some(Level::Exact));
    let want = if exact { Level::Exact } else { Level::Any };
    retain(c, n, |i| level(i) == Some(want))
}

/// Keep the candidates with the longest range holding `ip`, else those with no range.
fn by_longest_prefix<'a>(
    c: &mut [usize],
    n: usize,
    ranges: impl Fn(usize) -> Option<&'a [Cidr]>,
    ip: IpAddr,
) -> usize {
    let longest = |i: usize| ranges(i)?.iter().filter(|r| r.contains(ip)).map(|r| r.len).max();
    match c[..n].iter().filter_map(|&i| longest(i)).max() {
        Some(best) => retain(c, n, |i| longest(i) == Some(best)),
        None => retain(c, n, |i| ranges(i).is_some_and(<[Cidr]>::is_empty)),
    }
}

/// Keep the candidates naming the server name exactly, else the longest `*.suffix` it ends
/// with, else those naming none. A connection without SNI matches only those naming none.
fn by_server_name<'a>(
    c: &mut [usize],
    n: usize,
    names: impl Fn(usize) -> Option<&'a [String]>,
    sni: Option<&str>,
) -> usize {
    // Specificity: exact beats any wildcard; a longer suffix beats a shorter one.
    let score = |i: usize| -> Option<usize> {
        let sni = sni?;
        names(i)?
            .iter()
            .filter_map(|name| match name.strip_prefix('*') {
                None if name.eq_ignore_ascii_case(sni) => Some(usize::MAX),
                Some(suffix)
                    if suffix.starts_with('.')
                        && sni.len() > suffix.len()
                        && ends_with_ignore_case(sni, suffix) =>
                {
                    Some(suffix.len())
                }
                _ => None,
            })
            .max()
    };
    match c[..n].iter().filter_map(|&i| score(i)).max() {
        Some(best) => retain(c, n, |i| score(i) == Some(best)),
        None => retain(c, n, |i| names(i).is_some_and(<[String]>::is_empty)),
    }
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len() && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// Move the first `n` candidates that `keep` accepts to the front, in order; how many.
fn retain(c: &mut [usize], n: usize, keep: impl Fn(usize) -> bool) -> usize {
    let mut kept = 0;
    for k in 0..n {
        let i = c[k];
        if keep(i) {
            c[kept] = i;
            kept += 1;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(f: impl FnOnce(&mut FilterChain)) -> FilterChain {
        let mut c = FilterChain::default();
        f(&mut c);
        c
    }

    fn cidr(s: &str) -> Cidr {
        Cidr::try_from(s.to_string()).unwrap()
    }

    fn facts<'a>(
        dst: &str,
        src: &str,
        transport: &'a str,
        sni: Option<&'a str>,
        alpn: &'a [String],
    ) -> ConnFacts<'a> {
        ConnFacts {
            destination: dst.parse().unwrap(),
            source: src.parse().unwrap(),
            transport,
            server_name: sni,
            alpn,
        }
    }

    fn pick(chains: &[FilterChain], f: &ConnFacts<'_>) -> Option<usize> {
        ChainIndex::new(chains).select(chains, f)
    }

    #[test]
    fn server_names_exact_beats_the_longest_wildcard_which_beats_none() {
        let chains = vec![
            chain(|c| c.server_names = vec!["*.example.com".into()]),
            chain(|c| c.server_names = vec!["*.api.example.com".into()]),
            chain(|c| c.server_names = vec!["www.api.example.com".into()]),
            chain(|_| {}),
        ];
        let none: &[String] = &[];
        let at = |sni| pick(&chains, &facts("10.0.0.1:443", "10.0.0.9:5000", "tls", sni, none));
        assert_eq!(at(Some("www.api.example.com")), Some(2));
        assert_eq!(at(Some("v1.api.example.com")), Some(1));
        assert_eq!(at(Some("shop.example.com")), Some(0));
        assert_eq!(at(Some("example.com")), Some(3), "a wildcard needs a label before its suffix");
        assert_eq!(at(Some("other.org")), Some(3));
        assert_eq!(at(None), Some(3));
    }

    #[test]
    fn the_clients_first_alpn_protocol_that_any_chain_names_wins() {
        let chains = vec![
            chain(|c| c.application_protocols = vec!["h2".into()]),
            chain(|c| c.application_protocols = vec!["http/1.1".into()]),
            chain(|_| {}),
        ];
        let offered = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let at = |alpn: &[String]| pick(&chains, &facts("10.0.0.1:80", "10.0.0.9:5000", "tls", None, alpn));
        assert_eq!(at(&offered(&["http/1.1", "h2"])), Some(1));
        assert_eq!(at(&offered(&["h2", "http/1.1"])), Some(0));
        assert_eq!(at(&offered(&["istio"])), Some(2));
    }

    #[test]
    fn source_type_ip_and_port_come_after_the_destination_steps_with_no_backtracking() {
        let chains = vec![
            chain(|c| {
                c.destination_port = Some(80);
                c.source_type = SourceType::Local;
            }),
            chain(|c| {
                c.destination_port = Some(80);
                c.source_prefix_ranges = vec![cidr("10.1.0.0/16")];
            }),
            chain(|c| {
                c.destination_port = Some(80);
                c.source_ports = vec![5000];
            }),
            chain(|c| c.destination_port = Some(80)),
            // Matches the source, but the port step already chose the port 80 chains.
            chain(|c| c.source_prefix_ranges = vec![cidr("10.0.0.0/8")]),
            chain(|c| c.default = true),
        ];
        let none: &[String] = &[];
        let at = |dst, src| pick(&chains, &facts(dst, src, "raw_buffer", None, none));
        assert_eq!(at("10.0.0.1:80", "127.0.0.1:4000"), Some(0), "loopback is local");
        assert_eq!(at("10.0.0.1:80", "10.0.0.1:4000"), Some(0), "same IP is local");
        assert_eq!(at("10.0.0.1:80", "10.1.2.3:4000"), Some(1));
        assert_eq!(at("10.0.0.1:80", "10.2.2.3:5000"), Some(2));
        assert_eq!(at("10.0.0.1:80", "10.2.2.3:5001"), Some(3));
        assert_eq!(at("10.0.0.1:81", "10.2.2.3:5001"), Some(4));
        assert_eq!(at("10.0.0.1:81", "192.168.0.1:5001"), Some(5), "no chain: the default");
    }

    #[test]
    fn chains_handed_off_by_address_compete_only_among_themselves() {
        let handed = |addr: &str| {
            let a: SocketAddr = addr.parse().unwrap();
            move |c: &mut FilterChain| c.handoff = Some(a)
        };
        let chains = vec![
            chain(handed("10.96.0.10:6379")),
            chain(handed("0.0.0.0:6379")),
            chain(|c| c.default = true),
        ];
        let none: &[String] = &[];
        let at = |dst| pick(&chains, &facts(dst, "10.0.0.9:5000", "raw_buffer", None, none));
        assert_eq!(at("10.96.0.10:6379"), Some(0));
        assert_eq!(at("10.96.0.11:6379"), Some(1));
        assert_eq!(at("10.96.0.11:6380"), Some(2));
    }

    #[test]
    fn only_ports_whose_chains_differ_by_the_client_hello_are_peeked() {
        let chains = vec![
            chain(|c| {
                c.destination_port = Some(9080);
                c.transport_protocol = Some("tls".into());
                c.application_protocols = vec!["istio-peer-exchange".into()];
            }),
            chain(|c| {
                c.destination_port = Some(9080);
                c.transport_protocol = Some("raw_buffer".into());
            }),
            // A MySQL port: server-first, one chain, nothing to peek for.
            chain(|c| c.destination_port = Some(3306)),
            chain(|c| c.default = true),
        ];
        let index = ChainIndex::new(&chains);
        assert!(index.inspects("10.0.0.1:9080".parse().unwrap()));
        assert!(!index.inspects("10.0.0.1:3306".parse().unwrap()));
        assert!(!index.inspects("10.0.0.1:5432".parse().unwrap()), "only the default chain");
        assert!(!index.uses_source());
    }

    #[test]
    fn more_candidates_than_fit_inline_still_match() {
        let mut chains: Vec<FilterChain> = (0..100)
            .map(|k| {
                chain(|c| {
                    c.destination_port = Some(9080);
                    c.prefix_ranges = vec![cidr(&format!("10.96.{k}.0/24"))];
                })
            })
            .collect();
        chains.push(chain(|c| c.default = true));
        let none: &[String] = &[];
        let f = facts("10.96.77.5:9080", "10.0.0.9:5000", "raw_buffer", None, none);
        assert_eq!(pick(&chains, &f), Some(77));
    }

    #[test]
    fn per_service_host_ranges_are_looked_up_and_still_lose_to_nothing_longer() {
        // istiod's per-service chains: one /32 each on a shared port, then a /16 and a
        // catch-all on the same port.
        let mut chains: Vec<FilterChain> = (0..100)
            .map(|k| {
                chain(|c| {
                    c.destination_port = Some(27017);
                    c.prefix_ranges = vec![cidr(&format!("10.97.0.{k}/32"))];
                })
            })
            .collect();
        chains.push(chain(|c| {
            c.destination_port = Some(27017);
            c.prefix_ranges = vec![cidr("10.97.0.0/16")];
        }));
        chains.push(chain(|c| c.destination_port = Some(27017)));
        let none: &[String] = &[];
        let at = |dst| pick(&chains, &facts(dst, "10.0.0.9:5000", "raw_buffer", None, none));
        assert_eq!(at("10.97.0.42:27017"), Some(42));
        assert_eq!(at("10.97.3.3:27017"), Some(100), "the /16");
        assert_eq!(at("10.98.0.1:27017"), Some(101), "no range holds it: the chain without ranges");
    }

    #[test]
    fn http_is_sniffed_only_where_http_inspector_runs_for_the_port_and_plaintext_chains_name_protocols() {
        use crate::config::PortMatch;
        use std::sync::Arc;
        // istiod's virtualInbound: inspectors off on [15006, 15007), an HTTP and a TCP chain
        // on 8083, a TCP-only chain on 3306.
        let x = Arc::new(Inspectors {
            tls_disabled: Some(PortMatch::Range(15006, 15007)),
            http: true,
            http_disabled: Some(PortMatch::Range(15006, 15007)),
        });
        let on = |port: Option<u16>, transport: &str, alpn: &[&str]| {
            chain(|c| {
                c.destination_port = port;
                c.transport_protocol = Some(transport.into());
                c.application_protocols = alpn.iter().map(|s| s.to_string()).collect();
                c.inspectors = Some(Arc::clone(&x));
            })
        };
        let chains = vec![
            on(Some(8083), "raw_buffer", &["http/1.1", "h2c"]),
            on(Some(8083), "raw_buffer", &[]),
            on(Some(3306), "raw_buffer", &[]),
            on(Some(15006), "raw_buffer", &["http/1.1"]),
            on(None, "tls", &["istio-peer-exchange"]),
        ];
        let index = ChainIndex::new(&chains);
        let at = |dst: &str| index.inspection(dst.parse().unwrap());
        assert_eq!(at("10.0.0.1:8083"), Inspection { tls: true, http: true });
        assert_eq!(at("10.0.0.1:3306"), Inspection { tls: true, http: false }, "no chain names a protocol");
        assert_eq!(at("10.0.0.1:15006"), Inspection::default(), "both disabled for the port");
        assert_eq!(at("10.0.0.1:9999"), Inspection { tls: true, http: false }, "only a TLS chain names ALPN");
        // What the sniff found picks the chain; nothing found, the one naming none.
        let http: Vec<String> = vec!["http/1.1".into()];
        let f = facts("10.0.0.1:8083", "10.0.0.9:5000", "raw_buffer", None, &http);
        assert_eq!(index.select(&chains, &f), Some(0));
        let f = facts("10.0.0.1:8083", "10.0.0.9:5000", "raw_buffer", None, &[]);
        assert_eq!(index.select(&chains, &f), Some(1));
        // Without http_inspector on the listener, its chains are never sniffed.
        let mut without = chains.clone();
        let no_http = Arc::new(Inspectors { http: false, ..Inspectors::clone(&x) });
        without.iter_mut().for_each(|c| c.inspectors = Some(Arc::clone(&no_http)));
        assert!(!ChainIndex::new(&without).inspection("10.0.0.1:8083".parse().unwrap()).http);
    }
}
