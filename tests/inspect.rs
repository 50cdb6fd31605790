//! SPEC §9 listener inspection without polling: a connection whose first bytes must be looked
//! at (the permissive TLS sniff, the `tls_inspector`) waits for more bytes asleep. Clients that
//! send the start of a TLS record and stop cost the proxy nothing while they wait; once the
//! rest arrives, the connection is served as TLS.

#[macro_use]
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::Write;
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
