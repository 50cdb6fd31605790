//! Transparent capture (SPEC §8): a redirected connection's original destination, where it
//! goes (a cluster, passthrough, the local application, or refused as a loop), and the
//! upstream connection an inbound capture makes from 127.0.0.6. `iptables` writes the rules
//! that redirect a pod's TCP here.

pub mod iptables;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

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

pub use iptables::PROXY_ID;

/// The destination a redirected connection had before iptables' REDIRECT rewrote it
/// (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST on an IPv6 socket): read once, at accept, by
/// one getsockopt on an IPv4 listener (`listen` is the listener's address).
pub fn original_dst(s: &TcpStream, listen: SocketAddr) -> io::Result<SocketAddr> {
    let fd = socket::borrow_fd(s);
    let sock = socket2::SockRef::from(&fd);
    let v4 = match listen {
        SocketAddr::V4(_) => true,
        // A dual-stack listener sees IPv4 clients as v4-mapped; their NAT entry is IPv4's.
        SocketAddr::V6(_) => match s.local_addr()? {
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
            SocketAddr::V4(_) => true,
        },
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
pub fn is_own_listener(dst: SocketAddr, listeners: &[Arc<Listener>]) -> bool {
    listeners.iter().any(|l| {
        l.listen.port() == dst.port()
            && (l.capture != Capture::None || l.listen.ip().is_unspecified() || l.listen.ip() == dst.ip())
    })
}

/// A start-up line for a config with capture listeners: the rules must exclude this
/// process's uid (or gid), or its own upstream connections would be captured again. Warns
/// when the uid is not Istio's 1337, the `ringside iptables` default.
pub fn startup_note(listeners: &[Arc<Listener>]) -> Option<(log::Level, String)> {
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

/// Decide where a captured connection to `dst` goes (SPEC §8): its original destination, or,
/// when the kernel has no record of one (a client dialled the capture port directly, no NAT
/// happened), its local address, which is a capture listener and so refused, as Envoy falls
/// back to the local address and Istio black-holes it.
pub fn decide(mode: Capture, dst: SocketAddr, listeners: &[Arc<Listener>], router: &Router) -> Decision {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let decide = |mode, dst: &str| decide(mode, dst.parse().unwrap(), &c.listeners, &router);
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
        // No NAT record: the local address (the capture listener) stands in.
        assert_eq!(decide(Capture::Outbound, "10.1.0.5:15001"), Decision::Refuse);
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
