//! SPEC §1 "a reset on one side resets the other" when the reset is the kernel's own: a
//! connection whose retransmissions are exhausted (the peer host gone) fails with
//! `ETIMEDOUT`. That is a socket error, not the idle timeout: the other side must get a reset,
//! never a clean FIN that makes a cut-off transfer look complete. Real retransmissions, in two
//! network namespaces: pod A (client and sidecar, `net.ipv4.tcp_retries2` lowered so the kernel
//! gives up in about 1.4 s) and pod B (the upstream), whose firewall then drops every packet.

mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pki.rs"]
mod pki;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::read_exact;
use netns::{B_IP, Pods, Sidecar};
use pki::{Ca, Certs};

/// The sidecar's YAML in pod A: one outbound listener on 127.0.0.1:15001 to `cluster`.
fn outbound_yaml(peer_exchange: &str, cluster: &str) -> String {
    format!(
        "node: {{workload_name: client, namespace: default}}
workers: 1
admin: {{listen: 127.0.0.1:15000}}
metrics: {{listen: 127.0.0.1:15090}}
health: {{listen: 'off'}}
listeners:
  - {{name: out, listen: 127.0.0.1:15001, direction: outbound, peer_exchange: {peer_exchange}, cluster: app}}
clusters:
  - {cluster}
"
    )
}

/// Through the sidecar on 127.0.0.1:15001 in pod A to `listener` in pod B: relay `hello` up
/// and `hi` down, then cut pod B off the network and send more, so the sidecar's upstream
/// socket dies of exhausted retransmissions. The client must then read a reset.
fn assert_a_cut_off_upstream_resets_the_client(pods: &Pods, listener: &TcpListener, what: &str) {
    let mut client = netns::connect_in(&pods.a, "127.0.0.1:15001").expect("connect to the sidecar");
    let (mut upstream, _) = listener.accept().unwrap();
    let got = cut_off_while_sending(pods, &mut client, &mut upstream);
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "ETIMEDOUT on the {what} upstream must reach the client as a reset, not an end of stream"
    );
}

/// What the client reads after the cut (see above).
fn cut_off_while_sending(
    pods: &Pods,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> std::io::Result<usize> {
    client.write_all(b"hello").unwrap();
    assert_eq!(read_exact(upstream, 5), b"hello");
    upstream.write_all(b"hi").unwrap();
    assert_eq!(read_exact(client, 2), b"hi");
    netns::exec(&pods.b, &["iptables", "-A", "INPUT", "-j", "DROP"]);
    netns::exec(&pods.b, &["iptables", "-A", "OUTPUT", "-j", "DROP"]);
    client.write_all(b"more").unwrap();
    // Retransmissions give up after ~1.4 s (tcp_retries2=2); a hang would be a failure too.
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    client.read(&mut buf)
}

/// Pods with retransmissions in pod A exhausted after 2 retries, and an upstream listener in
/// pod B on `addr`; None (a SKIP) where namespaces cannot be made.
fn pods_with_upstream(test: &str, addr: &str) -> Option<(Pods, TcpListener)> {
    if netns::unavailable(test).is_some() {
        return None;
    }
    let pods = Pods::new();
    netns::exec(&pods.a, &["sysctl", "-qw", "net.ipv4.tcp_retries2=2"]);
    let listener = netns::in_ns(&pods.b, || TcpListener::bind(addr).expect("bind upstream"));
    Some((pods, listener))
}

#[test]
fn a_plaintext_upstream_lost_to_exhausted_retransmissions_resets_the_client() {
    let Some((pods, listener)) = pods_with_upstream("socket_errors::plaintext", "10.77.0.2:7000") else {
        return;
    };
    let _sidecar = Sidecar::spawn(
        &pods.a,
        &outbound_yaml("'off'", &format!("{{name: app, endpoints: [{{address: '{B_IP}:7000'}}]}}")),
    );
    assert_a_cut_off_upstream_resets_the_client(&pods, &listener, "plaintext");
}

#[test]
fn an_mtls_upstream_lost_to_exhausted_retransmissions_resets_the_client() {
    let Some((pods, listener)) = pods_with_upstream("socket_errors::mtls", "127.0.0.1:7001") else { return };
    let ca = Ca::new("mesh");
    let (a_certs, b_certs) = (
        Certs::new("etimedout-a", &ca, "spiffe://cluster.local/ns/default/sa/client"),
        Certs::new("etimedout-b", &ca, "spiffe://cluster.local/ns/default/sa/server"),
    );
    // Pod B: an inbound sidecar terminating mTLS in front of the app on 127.0.0.1:7001.
    let _b = Sidecar::spawn(
        &pods.b,
        &format!(
            "node: {{workload_name: server, namespace: default}}
workers: 1
admin: {{listen: 127.0.0.1:15000}}
metrics: {{listen: 127.0.0.1:15090}}
health: {{listen: 'off'}}
listeners:
  - {{name: in, listen: '{B_IP}:15006', direction: inbound, peer_exchange: alpn, cluster: app,
      tls: {{mode: strict, {}}}}}
clusters:
  - {{name: app, endpoints: [{{address: 127.0.0.1:7001}}]}}
",
            b_certs.yaml()
        ),
    );
    let _a = Sidecar::spawn(
        &pods.a,
        &outbound_yaml(
            "alpn",
            &format!(
                "{{name: app, endpoints: [{{address: '{B_IP}:15006'}}], tls: {{mode: istio_mutual, {}}}}}",
                a_certs.yaml()
            ),
        ),
    );
    assert_a_cut_off_upstream_resets_the_client(&pods, &listener, "mTLS");
}
