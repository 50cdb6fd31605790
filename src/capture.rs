//! Transparent capture (SPEC §8): a redirected connection's original destination, the
//! upstream connection an inbound capture makes from 127.0.0.6, and the iptables rules that
//! redirect a pod's TCP to the proxy, with the chain names and loopback handling of Istio's
//! `istio-iptables` (the init container / istio-cni). Rule generation is pure; `apply` and
//! `clean` run the `iptables` binary and nothing else.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::config::{Capture, Listener};
use crate::routing::{Router, Target};
use crate::socket;

/// Source address of inbound-capture upstream connections: Istio's
/// `InboundPassthroughBindIpv4`. The rules return `-o lo -s 127.0.0.6` before anything else,
/// so the proxy's own connection to the application is never captured again.
pub const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// IPv6 twin of [`INBOUND_SOURCE`]: Istio's `InboundPassthroughBindIpv6`.
pub const INBOUND_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The source address of an inbound-capture connection to `dst`.
pub fn inbound_source(dst: SocketAddr) -> IpAddr {
    match dst {
        SocketAddr::V4(_) => IpAddr::V4(INBOUND_SOURCE),
        SocketAddr::V6(_) => IpAddr::V6(INBOUND_SOURCE_V6),
    }
}

/// Istio's outbound capture port (`ISTIO_REDIRECT` target).
pub const OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port (`ISTIO_IN_REDIRECT` target).
pub const INBOUND_PORT: u16 = 15006;
/// Istio's sidecar uid and gid (`istio-proxy`).
pub const PROXY_ID: u32 = 1337;

/// The destination a redirected connection had before iptables' REDIRECT rewrote it
/// (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST on an IPv6 socket): read once, at accept.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let fd = socket::borrow_fd(s);
    let sock = socket2::SockRef::from(&fd);
    let local = s.local_addr()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        // A dual-stack listener sees IPv4 clients as v4-mapped; their NAT entry is IPv4's.
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let original = if v4 { sock.original_dst_v4()? } else { sock.original_dst_v6()? };
    let addr = original.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "original destination is not an IP address")
    })?;
    Ok(canonical(addr))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(IpAddr::V4(ip), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Whether a captured connection's original destination is one of this proxy's capture
/// listeners. Relaying it would connect the proxy to itself, so it is refused (Istio's
/// `virtualOutbound-blackhole` / `virtualInbound-blackhole` filter chains do the same on
/// ports 15001 and 15006): by port, whatever the address, since a capture listener's port
/// is reserved on every address of the pod.
pub fn is_own_listener(dst: SocketAddr, listeners: &[Listener]) -> bool {
    listeners.iter().any(|l| {
        l.listen.port() == dst.port()
            && (l.capture != Capture::None || l.listen.ip().is_unspecified() || l.listen.ip() == dst.ip())
    })
}

/// A start-up line for a config with capture listeners: the rules must exclude this
/// process's uid (or gid), or its own upstream connections would be captured again. Warns
/// when the uid is not Istio's 1337, the `ringside iptables` default.
pub fn startup_note(listeners: &[Listener]) -> Option<(log::Level, String)> {
    use std::os::unix::fs::MetadataExt;
    if listeners.iter().all(|l| l.capture == Capture::None) {
        return None;
    }
    let me = std::fs::metadata("/proc/self").ok()?;
    let (uid, gid) = (me.uid(), me.gid());
    let level = if uid == PROXY_ID { log::Level::Info } else { log::Level::Warn };
    Some((
        level,
        format!(
            "capture: running as uid {uid} gid {gid}; the capture rules must exclude it \
             (`ringside iptables --apply --proxy-uid {uid}`), or upstream connections loop"
        ),
    ))
}

/// Connect to `dst` from `src` (port chosen by the kernel at connect time), waiting at most
/// `timeout`. monoio's connect cannot bind first, so the socket is made here and handed to
/// the runtime; it stays O_NONBLOCK for the epoll driver, which needs it, and is made
/// blocking again for io_uring, as monoio makes its own sockets.
pub async fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), None)?;
    // The port is picked at connect(), per destination: binding first must not spend one of
    // the source address's ports per connection (as Envoy's upstream bind does).
    socket::bind_address_no_port(&s)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.set_nonblocking(true)?;
    match s.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(s))?;
    match monoio::time::timeout(timeout, stream.writable(false)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect {dst}: timed out"))),
    }
    let fd = socket::borrow_fd(&stream);
    let sock = socket2::SockRef::from(&fd);
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    if !monoio::utils::is_legacy() {
        sock.set_nonblocking(false)?;
    }
    Ok(stream)
}

/// What a capture listener does with a connection, by its original destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The proxy's own listener: refuse (a loop).
    Refuse,
    /// Outbound, a cluster matched: route there.
    Cluster(Target),
    /// Outbound, nothing matched: relay to the original destination itself.
    Passthrough(SocketAddr),
    /// Inbound: relay to the application on the original destination, from 127.0.0.6.
    Local(SocketAddr),
}

/// Decide where a captured connection goes (SPEC §8). `original` is what SO_ORIGINAL_DST
/// said; when the kernel has no record (a client dialled the capture port directly, no NAT
/// happened), the connection's local address stands in, which is a capture listener and so
/// refused, as Envoy falls back to the local address and Istio black-holes it.
pub fn decide(
    mode: Capture,
    original: io::Result<SocketAddr>,
    local: SocketAddr,
    listeners: &[Listener],
    router: &Router,
) -> Decision {
    let dst = original.unwrap_or(local);
    if is_own_listener(dst, listeners) {
        return Decision::Refuse;
    }
    match mode {
        Capture::Inbound => Decision::Local(dst),
        _ => match router.route_original_dst(dst) {
            Some(t) => Decision::Cluster(t),
            None => Decision::Passthrough(dst),
        },
    }
}

/// Which ports or CIDRs a rule set captures: all (`*`), a list, or none (empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Select<T> {
    /// `*`: everything not excluded.
    All,
    /// Only these (empty: nothing).
    Only(Vec<T>),
}

/// An IPv4 network, `a.b.c.d/n` (a bare address is `/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("bad IPv4 CIDR {s:?} (want a.b.c.d/n)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parse a comma-separated list: `*` is all, empty is none (flag values of `ringside iptables`).
pub fn parse_select<T: std::str::FromStr>(s: &str) -> Result<Select<T>, String> {
    if s.trim() == "*" {
        return Ok(Select::All);
    }
    parse_list(s).map(|l| Select::Only(l.0))
}

/// A comma-separated flag value (empty is none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

/// Parse a comma-separated list (empty is none).
pub fn parse_list<T: std::str::FromStr>(s: &str) -> Result<List<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<T>().map_err(|_| format!("bad list item {x:?}")))
        .collect::<Result<Vec<T>, String>>()
        .map(List)
}

/// What to capture: the flags of `ringside iptables`, with Istio's injected-pod defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Port of the outbound capture listener (Istio: 15001).
    pub outbound_port: u16,
    /// Port of the inbound capture listener (Istio: 15006).
    pub inbound_port: u16,
    /// The proxy's uid: its own connections are never captured.
    pub proxy_uid: Option<u32>,
    /// The proxy's gid: likewise.
    pub proxy_gid: Option<u32>,
    /// Inbound destination ports to capture.
    pub include_ports: Select<u16>,
    /// Inbound destination ports never captured (with `include_ports` `*`).
    pub exclude_ports: Vec<u16>,
    /// Outbound destination networks to capture.
    pub include_cidrs: Select<Cidr>,
    /// Outbound destination networks never captured.
    pub exclude_cidrs: Vec<Cidr>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            proxy_uid: Some(PROXY_ID),
            proxy_gid: None,
            include_ports: Select::All,
            // What Istio's injector passes (`-d 15090,15021,15020`): the proxy's own metrics,
            // health and agent ports are served directly, not through the inbound capture.
            exclude_ports: vec![15090, 15021, 15020],
            include_cidrs: Select::All,
            exclude_cidrs: Vec::new(),
        }
    }
}

/// Istio's chains, in the order they are created (and flushed by `clean`).
pub const CHAINS: [&str; 4] = ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"];

/// The jumps from built-in chains into ours: the only rules outside our chains.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "ISTIO_INBOUND"), ("OUTPUT", "ISTIO_OUTPUT")];

/// One `iptables -t nat` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `-N CHAIN`: a new chain.
    New(&'static str),
    /// `-A CHAIN spec...`: append a rule.
    Append(&'static str, Vec<String>),
}

impl Rule {
    /// The iptables arguments that add this rule.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-t".into(), "nat".into()];
        match self {
            Rule::New(chain) => a.extend(["-N".to_string(), chain.to_string()]),
            Rule::Append(chain, spec) => {
                a.extend(["-A".to_string(), chain.to_string()]);
                a.extend(spec.iter().cloned());
            }
        }
        a
    }

    /// The iptables arguments that take this rule back.
    fn undo_args(&self) -> Vec<String> {
        let mut a = self.args();
        a[2] = if matches!(self, Rule::New(_)) { "-X".into() } else { "-D".into() };
        a
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iptables {}", self.args().join(" "))
    }
}

fn spec(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The rules for `o`, in the order `apply` adds them: Istio's layout (chains first, then the
/// redirect targets, the inbound chain, the outbound chain), without its DNS and HBONE parts.
pub fn rules(o: &Options) -> Vec<Rule> {
    let mut r: Vec<Rule> = CHAINS.iter().map(|c| Rule::New(c)).collect();
    let (out_port, in_port) = (o.outbound_port.to_string(), o.inbound_port.to_string());
    r.push(Rule::Append("ISTIO_REDIRECT", spec(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &out_port])));
    r.push(Rule::Append("ISTIO_IN_REDIRECT", spec(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &in_port])));
    // Inbound: only arriving traffic passes PREROUTING; the proxy's own ports are never
    // redirected to themselves (the capture listener also refuses them, SPEC §8).
    let inbound = match &o.include_ports {
        Select::All => true,
        Select::Only(ports) => !ports.is_empty(),
    };
    if inbound {
        r.push(Rule::Append("PREROUTING", spec(&["-p", "tcp", "-j", "ISTIO_INBOUND"])));
        match &o.include_ports {
            Select::All => {
                for p in &o.exclude_ports {
                    let p = p.to_string();
                    r.push(Rule::Append(
                        "ISTIO_INBOUND",
                        spec(&["-p", "tcp", "--dport", &p, "-j", "RETURN"]),
                    ));
                }
                r.push(Rule::Append("ISTIO_INBOUND", spec(&["-p", "tcp", "-j", "ISTIO_IN_REDIRECT"])));
            }
            Select::Only(ports) => {
                for p in ports {
                    let p = p.to_string();
                    r.push(Rule::Append(
                        "ISTIO_INBOUND",
                        spec(&["-p", "tcp", "--dport", &p, "-j", "ISTIO_IN_REDIRECT"]),
                    ));
                }
            }
        }
    }
    r.push(Rule::Append("OUTPUT", spec(&["-p", "tcp", "-j", "ISTIO_OUTPUT"])));
    let out = "ISTIO_OUTPUT";
    // The inbound capture's own connections to the application (source 127.0.0.6).
    r.push(Rule::Append(out, spec(&["-o", "lo", "-s", "127.0.0.6/32", "-j", "RETURN"])));
    let owners =
        o.proxy_uid.map(|u| ("--uid-owner", u)).into_iter().chain(o.proxy_gid.map(|g| ("--gid-owner", g)));
    for (flag, id) in owners {
        let id = id.to_string();
        // The proxy calling its own pod's address over lo goes through the inbound capture,
        // as any other client's connection to this pod would.
        r.push(Rule::Append(
            out,
            spec(&[
                "-o",
                "lo",
                "!",
                "-d",
                "127.0.0.1/32",
                "-m",
                "owner",
                flag,
                &id,
                "-j",
                "ISTIO_IN_REDIRECT",
            ]),
        ));
        // The application talking to itself over lo is left alone.
        r.push(Rule::Append(out, spec(&["-o", "lo", "-m", "owner", "!", flag, &id, "-j", "RETURN"])));
        // Everything else the proxy sends is its upstream traffic: never captured (no loop).
        r.push(Rule::Append(out, spec(&["-m", "owner", flag, &id, "-j", "RETURN"])));
    }
    r.push(Rule::Append(out, spec(&["-d", "127.0.0.1/32", "-j", "RETURN"])));
    for c in &o.exclude_cidrs {
        r.push(Rule::Append(out, spec(&["-d", &c.to_string(), "-j", "RETURN"])));
    }
    match &o.include_cidrs {
        Select::All => r.push(Rule::Append(out, spec(&["-j", "ISTIO_REDIRECT"]))),
        Select::Only(cidrs) => {
            for c in cidrs {
                r.push(Rule::Append(out, spec(&["-d", &c.to_string(), "-j", "ISTIO_REDIRECT"])));
            }
        }
    }
    r
}

/// Why `apply` or `clean` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The iptables binary could not be run.
    #[error("iptables: {0}")]
    Spawn(io::Error),
    /// An iptables command failed; `undone` says whether the rules added before it were
    /// taken back.
    #[error("{command}: {why}{}", if *.undone { " (rules added before it were removed)" } else { "" })]
    Failed {
        /// The command, as `--print` shows it.
        command: String,
        /// iptables' first line of stderr.
        why: String,
        /// Rules added before it were removed.
        undone: bool,
    },
}

fn iptables(args: &[String]) -> Result<(), Error> {
    let out = Command::new("iptables").args(args).output().map_err(Error::Spawn)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed").trim();
    Err(Error::Failed {
        command: format!("iptables {}", args.join(" ")),
        why: format!("{why} ({})", out.status),
        undone: false,
    })
}

/// Add the rules in order; on the first failure, remove the ones already added (in reverse),
/// so nothing is left half-applied. Returns how many rules were added.
pub fn apply(o: &Options) -> Result<usize, Error> {
    let all = rules(o);
    for (i, rule) in all.iter().enumerate() {
        if let Err(e) = iptables(&rule.args()) {
            for done in all[..i].iter().rev() {
                // Best effort: each undo takes back a rule this call just added.
                let _ = iptables(&done.undo_args());
            }
            return Err(match e {
                Error::Failed { command, why, .. } => Error::Failed { command, why, undone: i > 0 },
                spawn => spawn,
            });
        }
    }
    Ok(all.len())
}

/// Remove what `apply` added, whatever flags it was given: the jumps from PREROUTING and
/// OUTPUT into our chains (each as often as present), then our chains. Rules of other
/// chains are kept; running it twice is harmless.
pub fn clean() -> Result<(), Error> {
    for (from, to) in JUMPS {
        let check = spec(&["-t", "nat", "-C", from, "-p", "tcp", "-j", to]);
        let delete = spec(&["-t", "nat", "-D", from, "-p", "tcp", "-j", to]);
        // Bounded: one delete per copy of the jump.
        for _ in 0..64 {
            match iptables(&check) {
                Ok(()) => iptables(&delete)?,
                Err(Error::Spawn(e)) => return Err(Error::Spawn(e)),
                Err(_) => break, // not (or no longer) there
            }
        }
    }
    let present: Vec<&str> =
        CHAINS.iter().copied().filter(|c| iptables(&spec(&["-t", "nat", "-S", c])).is_ok()).collect();
    for flag in ["-F", "-X"] {
        for c in &present {
            iptables(&spec(&["-t", "nat", flag, c]))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printed(o: &Options) -> String {
        rules(o).iter().map(|r| format!("{r}\n")).collect()
    }

    #[test]
    fn default_rules_are_istios_for_an_injected_pod() {
        let o = Options { proxy_gid: Some(1337), ..Options::default() };
        assert_eq!(
            printed(&o),
            "\
iptables -t nat -N ISTIO_INBOUND
iptables -t nat -N ISTIO_REDIRECT
iptables -t nat -N ISTIO_IN_REDIRECT
iptables -t nat -N ISTIO_OUTPUT
iptables -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
iptables -t nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
iptables -t nat -A PREROUTING -p tcp -j ISTIO_INBOUND
iptables -t nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
iptables -t nat -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
iptables -t nat -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
iptables -t nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
iptables -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT
iptables -t nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
iptables -t nat -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
iptables -t nat -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT
"
        );
    }

    #[test]
    fn included_ports_and_cidrs_are_listed_and_exclusions_return_first() {
        let o = Options {
            include_ports: parse_select("9080, 3306").unwrap(),
            include_cidrs: parse_select("10.0.0.0/8,192.168.1.7").unwrap(),
            exclude_cidrs: parse_list("10.9.0.0/16").unwrap().0,
            ..Options::default()
        };
        let text = printed(&o);
        assert!(text.contains("-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT\n"));
        assert!(text.contains("-A ISTIO_INBOUND -p tcp --dport 3306 -j ISTIO_IN_REDIRECT\n"));
        assert!(!text.contains("--dport 15090"), "exclusions only apply to `*`: {text}");
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        assert_eq!(
            tail,
            [
                "iptables -t nat -A ISTIO_OUTPUT -d 192.168.1.7/32 -j ISTIO_REDIRECT",
                "iptables -t nat -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
                "iptables -t nat -A ISTIO_OUTPUT -d 10.9.0.0/16 -j RETURN",
            ]
        );
    }

    #[test]
    fn empty_include_lists_capture_nothing_that_way() {
        let o = Options {
            include_ports: Select::Only(vec![]),
            include_cidrs: Select::Only(vec![]),
            ..Options::default()
        };
        let text = printed(&o);
        assert!(!text.contains("PREROUTING"));
        assert!(!text.contains("-j ISTIO_REDIRECT"));
    }

    #[test]
    fn undo_takes_back_exactly_the_rule() {
        let r = Rule::Append("OUTPUT", spec(&["-p", "tcp", "-j", "ISTIO_OUTPUT"]));
        assert_eq!(r.undo_args().join(" "), "-t nat -D OUTPUT -p tcp -j ISTIO_OUTPUT");
        assert_eq!(Rule::New("ISTIO_OUTPUT").undo_args().join(" "), "-t nat -X ISTIO_OUTPUT");
    }

    #[test]
    fn bad_list_items_are_errors() {
        assert!(parse_list::<Cidr>("10.0.0.0/33").is_err());
        assert!(parse_list::<Cidr>("10.0.0/8").is_err());
        assert!(parse_list::<Cidr>("1.2.3.4; rm").is_err());
        assert!(parse_list::<u16>("80,http").is_err());
        assert!(parse_list::<u16>("70000").is_err());
        assert_eq!(parse_select::<u16>("*"), Ok(Select::All));
        assert_eq!(parse_select::<u16>(""), Ok(Select::Only(vec![])));
    }

    #[test]
    fn captured_connections_go_to_a_matching_cluster_else_through_and_never_to_the_proxy() {
        let yaml = "
listeners:
  - {name: out, listen: 0.0.0.0:15001, direction: outbound, capture: outbound}
  - {name: in, listen: 0.0.0.0:15006, direction: inbound, capture: inbound}
clusters: [{name: c, addresses: [10.96.0.1:80], endpoints: [{address: 10.1.0.9:8080}]}]
";
        let c = crate::config::Config::parse(yaml, "t.yaml").unwrap();
        let router = Router::new(&c, 1);
        let local: SocketAddr = "10.1.0.5:15001".parse().unwrap();
        let decide = |mode, dst: &str| decide(mode, Ok(dst.parse().unwrap()), local, &c.listeners, &router);
        let to_c = Decision::Cluster(Target { cluster: 0, subset: None });
        assert_eq!(decide(Capture::Outbound, "10.96.0.1:80"), to_c);
        assert_eq!(decide(Capture::Outbound, "10.1.0.9:8080"), to_c);
        assert_eq!(
            decide(Capture::Outbound, "10.1.0.9:80"),
            Decision::Passthrough("10.1.0.9:80".parse().unwrap())
        );
        assert_eq!(
            decide(Capture::Inbound, "10.1.0.5:9080"),
            Decision::Local("10.1.0.5:9080".parse().unwrap())
        );
        assert_eq!(decide(Capture::Outbound, "10.9.9.9:15006"), Decision::Refuse);
        assert_eq!(decide(Capture::Inbound, "10.1.0.5:15001"), Decision::Refuse);
        let none = Err(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(super::decide(Capture::Outbound, none, local, &c.listeners, &router), Decision::Refuse);
        assert_eq!(inbound_source("[fd00::5]:9080".parse().unwrap()).to_string(), "::6");
        assert_eq!(inbound_source("10.1.0.5:9080".parse().unwrap()).to_string(), "127.0.0.6");
    }

    #[test]
    fn a_capture_listeners_own_port_is_refused_on_any_address() {
        let yaml = "
listeners:
  - {name: out, listen: 0.0.0.0:15001, direction: outbound, capture: outbound}
  - {name: plain, listen: 127.0.0.1:7000, direction: outbound, cluster: c}
clusters: [{name: c, endpoints: [{address: 127.0.0.1:1}]}]
";
        let c = crate::config::Config::parse(yaml, "t.yaml").unwrap();
        let own = |s: &str| is_own_listener(s.parse().unwrap(), &c.listeners);
        assert!(own("10.1.2.3:15001"));
        assert!(own("127.0.0.1:7000"));
        assert!(!own("10.1.2.3:7000"));
        assert!(!own("10.1.2.3:80"));
    }
}
