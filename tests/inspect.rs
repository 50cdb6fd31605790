//! SPEC §9 listener inspection without polling: a connection whose first bytes must be looked
//! at (the permissive TLS sniff, the `tls_inspector`) waits for more bytes asleep. Clients that
//! send the start of a TLS record and stop cost the proxy nothing while they wait; once the
//! rest arrives, the connection is served as TLS. `http_inspector`: HTTP/1.1 and h2c clients
//! take the chains naming their protocol, and a server-first protocol on a port whose chains
//! do not differ by it is served at once, never waiting for a sniff.

#[macro_use]
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::process::cpu_ticks;
use common::*;
use pki::{Ca, Certs};

/// An inbound permissive listener on `listen` in front of `app`, sniffing for up to 5 s.
fn permissive(listen: SocketAddr, app: SocketAddr, certs: &Certs) -> String {
    format!(
        "node: {{workload_name: server, namespace: default}}
workers: 1
listeners:
  - {{name: in, listen: '{listen}', direction: inbound, peer_exchange: 'off', cluster: app,
      limits: {{sniff_timeout: 5s}}, tls: {{mode: permissive, {}}}}}
clusters:
  - {{name: app, endpoints: [{{address: '{app}'}}]}}
",
        certs.yaml()
    )
}

with_both_drivers!(clients_stalled_mid_tls_header_cost_no_cpu_while_the_sniff_waits);

fn clients_stalled_mid_tls_header_cost_no_cpu_while_the_sniff_waits(driver: &str) {
    let ca = Ca::new("mesh");
    let certs = Certs::new("inspect", &ca, "spiffe://cluster.local/ns/default/sa/server");
    let listen = free_addr();
    let rs = Ringside::spawn_config(
        &permissive(listen, echo_server(), &certs),
        listen,
        &["--workers", "1", "--driver", driver],
    );
    // 100 clients each send the first two bytes of a TLS record header and stop: the sniff
    // needs a third byte to decide.
    let stalled: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = connect(listen);
            c.write_all(&[0x16, 0x03]).unwrap();
            c
        })
        .collect();
    let before = cpu_ticks(rs.pid());
    // A measurement window (not a synchronisation): polling every millisecond would cost
    // 100 clients x 1,000 wake-ups a second, well over a second of CPU in these 1.5 s.
    std::thread::sleep(Duration::from_millis(1500));
    let spent = cpu_ticks(rs.pid()) - before;
    assert!(spent <= 15, "{spent} ticks (1/100 s) spent on 100 stalled sniffs in 1.5 s");
    // The sniff still decides when the bytes come: a plaintext client (a third byte that is not
    // a TLS version) is relayed as plaintext, with nothing it sent lost.
    let mut late = connect(listen);
    late.write_all(&[0x16]).unwrap();
    late.write_all(b"Xhello").unwrap();
    assert_eq!(read_exact(&mut late, 7), b"\x16Xhello");
    drop(stalled);
}

/// Two listeners in front of tag servers: `sniffed` (an HTTP port as istiod writes one:
/// chains for `http/1.1` and `h2c`, the rest to a TCP chain) and `tcp` (its port's one chain
/// names no protocol, though a chain for another port does), sniffing for up to 10 s.
fn http_ports(sniffed: SocketAddr, tcp: SocketAddr) -> String {
    let (h1, h2, plain) = (tag_server("h1"), tag_server("h2"), tag_server("tc"));
    format!(
        "node: {{workload_name: server, namespace: default}}
workers: 1
listeners:
  - name: sniffed
    listen: '{sniffed}'
    direction: inbound
    peer_exchange: 'off'
    limits: {{sniff_timeout: 10s}}
    filter_chains:
      - {{name: http1, transport_protocol: raw_buffer, application_protocols: [http/1.1], cluster: h1}}
      - {{name: h2c, transport_protocol: raw_buffer, application_protocols: [h2c], cluster: h2}}
      - {{name: tcp, default: true, cluster: plain}}
  - name: tcp
    listen: '{tcp}'
    direction: inbound
    peer_exchange: 'off'
    limits: {{sniff_timeout: 10s}}
    filter_chains:
      - {{name: mysql, destination_port: {}, cluster: plain}}
      - {{name: other, destination_port: {}, application_protocols: [http/1.1], cluster: h1}}
clusters:
  - {{name: h1, endpoints: [{{address: '{h1}'}}]}}
  - {{name: h2, endpoints: [{{address: '{h2}'}}]}}
  - {{name: plain, endpoints: [{{address: '{plain}'}}]}}
",
        tcp.port(),
        sniffed.port()
    )
}

/// Send `first` (if any) and read the 2-byte tag of the backend the connection reached.
fn reached(addr: SocketAddr, first: &[u8]) -> String {
    let mut c = connect(addr);
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(first).unwrap();
    let mut tag = [0u8; 2];
    c.read_exact(&mut tag).unwrap();
    String::from_utf8_lossy(&tag).into_owned()
}

with_both_drivers!(http_1_1_h2c_and_server_first_clients_each_get_the_chain_their_first_bytes_say);

fn http_1_1_h2c_and_server_first_clients_each_get_the_chain_their_first_bytes_say(driver: &str) {
    let (sniffed, tcp) = (free_addr(), free_addr());
    let _rs =
        Ringside::spawn_config(&http_ports(sniffed, tcp), sniffed, &["--workers", "1", "--driver", driver]);
    assert_eq!(reached(sniffed, b"GET /ratings HTTP/1.1\r\nHost: ratings\r\n\r\n"), "h1");
    assert_eq!(reached(sniffed, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "h2");
    // HTTP/1.0 is found, but no chain names it (istiod's name http/1.1 and h2c): the TCP chain.
    assert_eq!(reached(sniffed, b"GET / HTTP/1.0\r\n\r\n"), "tc");
    // A binary first byte decides at once.
    assert_eq!(reached(sniffed, &[0x03, 0x00, 0x00, 0x01]), "tc");
    // Server-first on the TCP port: the banner comes with nothing sent, well within the 10 s
    // the sniff would wait.
    let began = std::time::Instant::now();
    assert_eq!(reached(tcp, b""), "tc");
    assert!(began.elapsed() < Duration::from_secs(5), "waited {:?} for a sniff", began.elapsed());
}

with_both_drivers!(clients_stalled_mid_request_line_cost_no_cpu_while_the_http_sniff_waits);

fn clients_stalled_mid_request_line_cost_no_cpu_while_the_http_sniff_waits(driver: &str) {
    let (sniffed, tcp) = (free_addr(), free_addr());
    let rs =
        Ringside::spawn_config(&http_ports(sniffed, tcp), sniffed, &["--workers", "1", "--driver", driver]);
    // 100 clients each send the start of a request line and stop: the sniff needs its end.
    let stalled: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = connect(sniffed);
            c.write_all(b"GET /rat").unwrap();
            c
        })
        .collect();
    let before = cpu_ticks(rs.pid());
    // A measurement window (not a synchronisation), as for the TLS sniff above.
    std::thread::sleep(Duration::from_millis(1500));
    let spent = cpu_ticks(rs.pid()) - before;
    assert!(spent <= 15, "{spent} ticks (1/100 s) spent on 100 stalled HTTP sniffs in 1.5 s");
    // The rest of the line decides: HTTP/1.1, its chain.
    let mut late = stalled.into_iter().next().unwrap();
    late.set_read_timeout(Some(DEADLINE)).unwrap();
    late.write_all(b"ings HTTP/1.1\r\n\r\n").unwrap();
    let mut tag = [0u8; 2];
    late.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"h1");
}
