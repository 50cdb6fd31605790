//! `ringside iptables`: the rules that redirect a pod's TCP to the capture listeners, with the
//! chain names, order and loopback handling of Istio's `istio-iptables` (its init container
//! and istio-cni write the same). Rule generation is pure; `apply` and `clean` run
//! `iptables`, `ip6tables` and (for IPv6) `ip`, nothing else.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::process::Command as Process;

/// Istio's outbound capture port (`ISTIO_REDIRECT` target).
pub const OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port (`ISTIO_IN_REDIRECT` target).
pub const INBOUND_PORT: u16 = 15006;
/// Istio's sidecar uid and gid (`istio-proxy`).
pub const PROXY_ID: u32 = 1337;

/// Which ports or CIDRs a rule set captures: all (`*`), a list, or none (empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Select<T> {
    /// `*`: everything not excluded.
    All,
    /// Only these (empty: nothing).
    Only(Vec<T>),
}

/// An IPv4 or IPv6 network, `a.b.c.d/n` or `fd00::/8` (a bare address is a host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length (at most 32 or 128).
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("bad CIDR {s:?} (want a.b.c.d/n or an IPv6 prefix)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
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
    /// Outbound destination networks to capture (each family gets its own).
    pub include_cidrs: Select<Cidr>,
    /// Outbound destination networks never captured.
    pub exclude_cidrs: Vec<Cidr>,
    /// Also write the IPv6 rules (`ip6tables`) and put `::6` on `lo`, as Istio does for a
    /// pod with IPv6.
    pub ipv6: bool,
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
            ipv6: false,
        }
    }
}

/// Istio's chains, in the order they are created (and flushed by `clean`).
pub const CHAINS: [&str; 4] = ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"];

/// The jumps from built-in chains into ours: the only rules outside our chains.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "ISTIO_INBOUND"), ("OUTPUT", "ISTIO_OUTPUT")];

/// The IPv6 twin of 127.0.0.6 (the inbound capture's source), which must be on `lo` to be bound.
const IPV6_INBOUND_SOURCE: &str = "::6/128";

/// One command of a rule set, and the command that takes it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `iptables`, `ip6tables` or `ip`.
    pub tool: &'static str,
    /// Its arguments.
    pub args: Vec<String>,
    undo: Vec<String>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.tool, self.args.join(" "))
    }
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// One address family's rule set under construction.
struct Family {
    tool: &'static str,
    loopback: &'static str,
    inbound_source: &'static str,
    rules: Vec<Rule>,
}

impl Family {
    fn new_chain(&mut self, chain: &str) {
        let (args, undo) = (strings(&["-t", "nat", "-N", chain]), strings(&["-t", "nat", "-X", chain]));
        self.rules.push(Rule { tool: self.tool, args, undo });
    }

    fn append(&mut self, chain: &str, spec: &[&str]) {
        let rule = |op: &str| {
            let mut a = strings(&["-t", "nat", op, chain]);
            a.extend(strings(spec));
            a
        };
        self.rules.push(Rule { tool: self.tool, args: rule("-A"), undo: rule("-D") });
    }
}

/// The rules for `o`, in the order `apply` adds them: per family, Istio's layout (chains
/// first, then the redirect targets, the inbound chain, the outbound chain), without its DNS
/// and HBONE parts; IPv4 always, IPv6 with `o.ipv6`.
pub fn rules(o: &Options) -> Vec<Rule> {
    let mut all = family_rules(o, false);
    if o.ipv6 {
        let add = strings(&["-6", "addr", "add", IPV6_INBOUND_SOURCE, "dev", "lo"]);
        let del = strings(&["-6", "addr", "del", IPV6_INBOUND_SOURCE, "dev", "lo"]);
        all.push(Rule { tool: "ip", args: add, undo: del });
        all.extend(family_rules(o, true));
    }
    all
}

fn family_rules(o: &Options, v6: bool) -> Vec<Rule> {
    let mut f = if v6 {
        Family { tool: "ip6tables", loopback: "::1/128", inbound_source: IPV6_INBOUND_SOURCE, rules: vec![] }
    } else {
        Family { tool: "iptables", loopback: "127.0.0.1/32", inbound_source: "127.0.0.6/32", rules: vec![] }
    };
    let ours = |c: &&Cidr| c.addr.is_ipv6() == v6;
    CHAINS.iter().for_each(|c| f.new_chain(c));
    let (out_port, in_port) = (o.outbound_port.to_string(), o.inbound_port.to_string());
    f.append("ISTIO_REDIRECT", &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &out_port]);
    f.append("ISTIO_IN_REDIRECT", &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &in_port]);
    // Inbound: only arriving traffic passes PREROUTING; the proxy's own ports are never
    // redirected to themselves (the capture listener also refuses them, SPEC §8).
    let inbound = match &o.include_ports {
        Select::All => true,
        Select::Only(ports) => !ports.is_empty(),
    };
    if inbound {
        f.append("PREROUTING", &["-p", "tcp", "-j", "ISTIO_INBOUND"]);
        match &o.include_ports {
            Select::All => {
                for p in &o.exclude_ports {
                    f.append("ISTIO_INBOUND", &["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"]);
                }
                f.append("ISTIO_INBOUND", &["-p", "tcp", "-j", "ISTIO_IN_REDIRECT"]);
            }
            Select::Only(ports) => {
                for p in ports {
                    f.append(
                        "ISTIO_INBOUND",
                        &["-p", "tcp", "--dport", &p.to_string(), "-j", "ISTIO_IN_REDIRECT"],
                    );
                }
            }
        }
    }
    f.append("OUTPUT", &["-p", "tcp", "-j", "ISTIO_OUTPUT"]);
    let out = "ISTIO_OUTPUT";
    let (lo, source) = (f.loopback, f.inbound_source);
    // The inbound capture's own connections to the application (source 127.0.0.6 or ::6).
    f.append(out, &["-o", "lo", "-s", source, "-j", "RETURN"]);
    let owners =
        o.proxy_uid.map(|u| ("--uid-owner", u)).into_iter().chain(o.proxy_gid.map(|g| ("--gid-owner", g)));
    for (flag, id) in owners {
        let id = id.to_string();
        // The proxy calling its own pod's address over lo goes through the inbound capture,
        // as any other client's connection to this pod would.
        f.append(out, &["-o", "lo", "!", "-d", lo, "-m", "owner", flag, &id, "-j", "ISTIO_IN_REDIRECT"]);
        // The application talking to itself over lo is left alone.
        f.append(out, &["-o", "lo", "-m", "owner", "!", flag, &id, "-j", "RETURN"]);
        // Everything else the proxy sends is its upstream traffic: never captured (no loop).
        f.append(out, &["-m", "owner", flag, &id, "-j", "RETURN"]);
    }
    f.append(out, &["-d", lo, "-j", "RETURN"]);
    for c in o.exclude_cidrs.iter().filter(ours) {
        f.append(out, &["-d", &c.to_string(), "-j", "RETURN"]);
    }
    match &o.include_cidrs {
        Select::All => f.append(out, &["-j", "ISTIO_REDIRECT"]),
        Select::Only(cidrs) => {
            for c in cidrs.iter().filter(ours) {
                f.append(out, &["-d", &c.to_string(), "-j", "ISTIO_REDIRECT"]);
            }
        }
    }
    f.rules
}

/// Why `apply` or `clean` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool could not be run.
    #[error("{0}: {1}")]
    Spawn(&'static str, io::Error),
    /// A command failed; `undone` says whether the rules added before it were taken back.
    #[error("{command}: {why}{}", if *.undone { " (rules added before it were removed)" } else { "" })]
    Failed {
        /// The command, as `--print` shows it.
        command: String,
        /// The tool's first line of stderr.
        why: String,
        /// Rules added before it were removed.
        undone: bool,
    },
}

fn run(tool: &'static str, args: &[String]) -> Result<(), Error> {
    let out = Process::new(tool).args(args).output().map_err(|e| Error::Spawn(tool, e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed").trim();
    Err(Error::Failed {
        command: format!("{tool} {}", args.join(" ")),
        why: format!("{why} ({})", out.status),
        undone: false,
    })
}

/// Add the rules in order; on the first failure, remove the ones already added (in reverse),
/// so nothing is left half-applied. Returns how many rules were added.
pub fn apply(o: &Options) -> Result<usize, Error> {
    let all = rules(o);
    for (i, rule) in all.iter().enumerate() {
        if let Err(e) = run(rule.tool, &rule.args) {
            for done in all[..i].iter().rev() {
                // Best effort: each undo takes back a rule this call just added.
                let _ = run(done.tool, &done.undo);
            }
            return Err(match e {
                Error::Failed { command, why, .. } => Error::Failed { command, why, undone: i > 0 },
                spawn => spawn,
            });
        }
    }
    Ok(all.len())
}

/// Remove what `apply` added, whatever port and CIDR flags it was given: the jumps from
/// PREROUTING and OUTPUT into our chains (each as often as present), then our chains; with
/// `ipv6`, the same for ip6tables and `::6` on `lo`. Rules of other chains are kept; running
/// it twice is harmless.
pub fn clean(ipv6: bool) -> Result<(), Error> {
    clean_family("iptables")?;
    if ipv6 {
        clean_family("ip6tables")?;
        let on_lo = Process::new("ip")
            .args(["-6", "addr", "show", "dev", "lo"])
            .output()
            .map_err(|e| Error::Spawn("ip", e))?;
        if String::from_utf8_lossy(&on_lo.stdout).contains(" ::6/128 ") {
            run("ip", &strings(&["-6", "addr", "del", IPV6_INBOUND_SOURCE, "dev", "lo"]))?;
        }
    }
    Ok(())
}

fn clean_family(tool: &'static str) -> Result<(), Error> {
    for (from, to) in JUMPS {
        let check = strings(&["-t", "nat", "-C", from, "-p", "tcp", "-j", to]);
        let delete = strings(&["-t", "nat", "-D", from, "-p", "tcp", "-j", to]);
        // Bounded: one delete per copy of the jump.
        for _ in 0..64 {
            match run(tool, &check) {
                Ok(()) => run(tool, &delete)?,
                Err(Error::Spawn(t, e)) => return Err(Error::Spawn(t, e)),
                Err(_) => break, // not (or no longer) there
            }
        }
    }
    let present: Vec<&str> =
        CHAINS.iter().copied().filter(|c| run(tool, &strings(&["-t", "nat", "-S", c])).is_ok()).collect();
    for flag in ["-F", "-X"] {
        for c in &present {
            run(tool, &strings(&["-t", "nat", flag, c]))?;
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
    fn ipv6_mirrors_the_ipv4_rules_with_ipv6_loopback_and_source_and_its_own_cidrs() {
        let o = Options {
            ipv6: true,
            exclude_cidrs: parse_list("10.9.0.0/16,fd00:9::/32").unwrap().0,
            ..Options::default()
        };
        let text = printed(&o);
        let v4: Vec<&str> = text.lines().filter(|l| l.starts_with("iptables ")).collect();
        let v6: Vec<&str> = text.lines().filter(|l| l.starts_with("ip6tables ")).collect();
        assert_eq!(v4.len(), v6.len(), "{text}");
        assert!(
            text.contains("\nip -6 addr add ::6/128 dev lo\nip6tables -t nat -N ISTIO_INBOUND\n"),
            "{text}"
        );
        assert!(text.contains("ip6tables -t nat -A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN\n"));
        assert!(
            text.contains("ip6tables -t nat -A ISTIO_OUTPUT -o lo ! -d ::1/128 -m owner --uid-owner 1337")
        );
        assert!(text.contains("ip6tables -t nat -A ISTIO_OUTPUT -d fd00:9::/32 -j RETURN\n"));
        assert!(text.contains("iptables -t nat -A ISTIO_OUTPUT -d 10.9.0.0/16 -j RETURN\n"));
        assert!(!v6.iter().any(|l| l.contains("10.9.0.0")) && !v4.iter().any(|l| l.contains("fd00")));
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
        let all = rules(&Options { ipv6: true, ..Options::default() });
        let undo = |r: &Rule| format!("{} {}", r.tool, r.undo.join(" "));
        let jump =
            all.iter().find(|r| r.to_string() == "iptables -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT").unwrap();
        assert_eq!(undo(jump), "iptables -t nat -D OUTPUT -p tcp -j ISTIO_OUTPUT");
        assert_eq!(undo(&all[3]), "iptables -t nat -X ISTIO_OUTPUT");
        let lo = all.iter().find(|r| r.tool == "ip").unwrap();
        assert_eq!(undo(lo), "ip -6 addr del ::6/128 dev lo");
    }

    #[test]
    fn bad_list_items_are_errors() {
        assert!(parse_list::<Cidr>("10.0.0.0/33").is_err());
        assert!(parse_list::<Cidr>("fd00::/129").is_err());
        assert!(parse_list::<Cidr>("10.0.0/8").is_err());
        assert!(parse_list::<Cidr>("1.2.3.4; rm").is_err());
        assert!(parse_list::<u16>("80,http").is_err());
        assert!(parse_list::<u16>("70000").is_err());
        assert_eq!(parse_select::<u16>("*"), Ok(Select::All));
        assert_eq!(parse_select::<u16>(""), Ok(Select::Only(vec![])));
        assert_eq!(parse_list::<Cidr>("fd00::1").unwrap().0[0].to_string(), "fd00::1/128");
    }
}
