//! STRICT_DNS and LOGICAL_DNS clusters (SPEC §9): their names resolved with the system
//! resolver (getaddrinfo: /etc/hosts, then DNS as nsswitch says) on a thread of their own,
//! never on a worker nor on the xDS thread, refreshed every `dns_refresh_rate`; each change of
//! a cluster's addresses is handed to the xDS client, which publishes it as it publishes an
//! EDS update. What an answer becomes (`endpoints`) is pure; the thread is `Resolver`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use crate::config::Endpoint;

/// Envoy's default `dns_refresh_rate`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);

/// Which addresses of an answer are used (`dns_lookup_family`, as Envoy reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv6 if the answer has any, else IPv4 (Envoy's `AUTO`).
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 if the answer has any, else IPv6.
    V4Preferred,
    /// Every address.
    All,
}

/// One name to resolve: an endpoint of the cluster's `load_assignment` whose address is a
/// host name (or an IP address, which resolves to itself).
#[derive(Clone, Debug)]
pub struct Target {
    /// The name.
    pub host: String,
    /// The port of every address it resolves to.
    pub port: u16,
    /// The endpoint's weight and metadata; its address is replaced by each answer's.
    pub endpoint: Endpoint,
}

/// How a DNS cluster finds its endpoints.
#[derive(Clone, Debug)]
pub struct Dns {
    /// The names, in `load_assignment` order.
    pub targets: Vec<Target>,
    /// `dns_refresh_rate` (Envoy's default 5 s).
    pub refresh: Duration,
    /// LOGICAL_DNS: one endpoint, the first address of the answer (Envoy connects to one
    /// address of a logical host); STRICT_DNS: every address of every name.
    pub logical: bool,
    /// `dns_lookup_family`.
    pub family: Family,
}

impl Dns {
    /// The endpoints `answers` (one per target, in order) give, as Envoy builds its hosts.
    pub fn endpoints(&self, answers: &[Vec<SocketAddr>]) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for (target, answer) in self.targets.iter().zip(answers) {
            let v4 = answer.iter().filter(|a| a.is_ipv4());
            let v6 = answer.iter().filter(|a| a.is_ipv6());
            let has = |v6_wanted: bool| answer.iter().any(|a| a.is_ipv6() == v6_wanted);
            let chosen: Vec<&SocketAddr> = match self.family {
                Family::V4Only => v4.collect(),
                Family::V6Only => v6.collect(),
                Family::Auto if has(true) => v6.collect(),
                Family::Auto => v4.collect(),
                Family::V4Preferred if has(false) => v4.collect(),
                Family::V4Preferred => v6.collect(),
                Family::All => answer.iter().collect(),
            };
            let mut seen = Vec::new();
            for a in chosen {
                let address = SocketAddr::new(a.ip(), target.port);
                // getaddrinfo answers once per socket type unless told otherwise; one host each.
                if seen.contains(&address) {
                    continue;
                }
                seen.push(address);
                out.push(Endpoint { address, ..target.endpoint.clone() });
                if self.logical {
                    return out;
                }
            }
        }
        out
    }
}

/// A DNS cluster's endpoints after a resolution that changed them.
#[derive(Debug)]
pub struct Resolved {
    /// The cluster's name.
    pub cluster: String,
    /// Its endpoints now.
    pub endpoints: Vec<Endpoint>,
}

/// The resolver thread: told which clusters to resolve (`watch`), it resolves each when it
/// appears or changes and again every `refresh`, and sends a [`Resolved`] whenever a
/// cluster's addresses changed. A failed lookup keeps the previous addresses, as Envoy keeps a
/// STRICT_DNS cluster's hosts when a resolution fails. It ends when its `Resolver` is dropped.
pub struct Resolver {
    watch: Sender<BTreeMap<String, Arc<Dns>>>,
}

impl Resolver {
    /// Start the thread; each change goes to `out`.
    pub fn spawn(out: tokio::sync::mpsc::UnboundedSender<Resolved>) -> std::io::Result<Resolver> {
        let (watch, rx) = channel();
        std::thread::Builder::new().name("ringside-dns".into()).spawn(move || run(&rx, &out, lookup))?;
        Ok(Resolver { watch })
    }

    /// Resolve these clusters from now on (the whole set; the others are forgotten).
    pub fn watch(&self, clusters: BTreeMap<String, Arc<Dns>>) {
        let _ = self.watch.send(clusters);
    }
}

/// The system resolver's addresses for `host`.
fn lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

struct Watched {
    dns: Arc<Dns>,
    due: Instant,
    /// What was last sent (None: nothing yet).
    sent: Option<Vec<SocketAddr>>,
    /// A failure was logged since the last success (one line per outage, not per refresh).
    failing: bool,
}

fn run(
    rx: &Receiver<BTreeMap<String, Arc<Dns>>>,
    out: &tokio::sync::mpsc::UnboundedSender<Resolved>,
    lookup: impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>,
) {
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let next = watched.values().map(|w| w.due).min();
        let wait = next.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(now));
        match rx.recv_timeout(wait) {
            Ok(clusters) => {
                watched.retain(|name, _| clusters.contains_key(name));
                for (name, dns) in clusters {
                    match watched.get_mut(&name) {
                        Some(w) if Arc::ptr_eq(&w.dns, &dns) => {}
                        // New or changed: resolved at once.
                        Some(w) => (w.dns, w.due, w.sent) = (dns, Instant::now(), None),
                        None => {
                            watched.insert(
                                name,
                                Watched { dns, due: Instant::now(), sent: None, failing: false },
                            );
                        }
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        for (name, w) in watched.iter_mut().filter(|(_, w)| w.due <= now) {
            w.due = now + w.dns.refresh.max(Duration::from_millis(1));
            let mut answers = Vec::with_capacity(w.dns.targets.len());
            let mut failed = None;
            for t in &w.dns.targets {
                match lookup(&t.host, t.port) {
                    Ok(a) => answers.push(a),
                    Err(e) => {
                        failed = Some(format!("{}: {e}", t.host));
                        break;
                    }
                }
            }
            if let Some(why) = failed {
                if !w.failing {
                    log::warn!("dns: Cluster/{name}: {why}; keeping its previous addresses");
                    w.failing = true;
                }
                continue;
            }
            w.failing = false;
            let endpoints = w.dns.endpoints(&answers);
            let addresses: Vec<SocketAddr> = endpoints.iter().map(|e| e.address).collect();
            if w.sent.as_ref() == Some(&addresses) {
                continue;
            }
            log::info!("dns: Cluster/{name}: {addresses:?}");
            w.sent = Some(addresses);
            if out.send(Resolved { cluster: name.clone(), endpoints }).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(hosts: &[&str], logical: bool, family: Family) -> Dns {
        Dns {
            targets: hosts
                .iter()
                .map(|h| Target {
                    host: h.to_string(),
                    port: 9411,
                    endpoint: Endpoint::at(([0; 4], 0).into()),
                })
                .collect(),
            refresh: Duration::from_millis(10),
            logical,
            family,
        }
    }

    fn addrs(a: &[&str]) -> Vec<SocketAddr> {
        a.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn shown(e: &[Endpoint]) -> Vec<String> {
        e.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn strict_dns_takes_every_address_of_every_name_on_the_endpoints_port_in_the_family_asked() {
        let answers = [addrs(&["10.0.0.1:0", "[fd00::1]:0", "10.0.0.2:0"]), addrs(&["10.0.0.3:0"])];
        let d = dns(&["a", "b"], false, Family::V4Only);
        assert_eq!(shown(&d.endpoints(&answers)), ["10.0.0.1:9411", "10.0.0.2:9411", "10.0.0.3:9411"]);
        let d = dns(&["a", "b"], false, Family::Auto);
        assert_eq!(
            shown(&d.endpoints(&answers)),
            ["[fd00::1]:9411", "10.0.0.3:9411"],
            "v6 where a name has it"
        );
        let d = dns(&["a", "b"], false, Family::V4Preferred);
        assert_eq!(shown(&d.endpoints(&answers)), ["10.0.0.1:9411", "10.0.0.2:9411", "10.0.0.3:9411"]);
        let d = dns(&["a"], false, Family::V6Only);
        assert_eq!(shown(&d.endpoints(&answers[..1])), ["[fd00::1]:9411"]);
        let d = dns(&["a"], false, Family::All);
        assert_eq!(d.endpoints(&answers[..1]).len(), 3);
        // getaddrinfo's duplicates (one per socket type) are one host.
        let d = dns(&["a"], false, Family::V4Only);
        assert_eq!(shown(&d.endpoints(&[addrs(&["10.0.0.1:0", "10.0.0.1:0"])])), ["10.0.0.1:9411"]);
    }

    #[test]
    fn logical_dns_is_one_endpoint_the_first_address_of_the_answer() {
        let d = dns(&["a"], true, Family::V4Only);
        let answers = [addrs(&["[fd00::1]:0", "10.0.0.7:0", "10.0.0.8:0"])];
        assert_eq!(shown(&d.endpoints(&answers)), ["10.0.0.7:9411"]);
    }

    #[test]
    fn a_dns_cluster_is_resolved_at_once_again_every_refresh_and_sent_only_when_it_changed() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (watch, watched) = channel();
        let calls = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&calls);
        // The answer changes on the third lookup, fails on the fourth and later.
        let lookup = move |_: &str, _: u16| match counted.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Ok(addrs(&["10.0.0.1:0"])),
            2 => Ok(addrs(&["10.0.0.2:0"])),
            _ => Err(std::io::Error::other("no such host")),
        };
        let thread = std::thread::spawn(move || run(&watched, &tx, lookup));
        let d = Arc::new(dns(&["a"], false, Family::V4Only));
        watch.send([("zipkin".to_string(), d)].into_iter().collect()).unwrap();
        let first = rx.blocking_recv().unwrap();
        assert_eq!(
            (first.cluster.as_str(), shown(&first.endpoints)),
            ("zipkin", vec!["10.0.0.1:9411".into()])
        );
        let second = rx.blocking_recv().unwrap();
        assert_eq!(shown(&second.endpoints), ["10.0.0.2:9411"], "the unchanged second answer was not sent");
        assert!(calls.load(Ordering::SeqCst) >= 3);
        drop(watch);
        thread.join().unwrap();
        assert!(rx.try_recv().is_err(), "a failed lookup keeps the previous addresses: nothing sent");
    }
}
