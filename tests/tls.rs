//! SPEC §7 through the real binary: mTLS between two ringside sidecars with the exchange in
//! mode `alpn`, principals and connection_security_policy in both reporters, strict and
//! permissive inbound, independent TLS peers (openssl, Python's ssl), certificate rotation
//! and bad certificate files. Certificates are generated at test time with rcgen.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pki::{Ca, Certs};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const RATINGS: &str = "spiffe://cluster.local/ns/ratings-ns/sa/bookinfo-ratings";

fn node(workload: &str, ns: &str, app: &str) -> String {
    format!(
        "node:\n  workload_name: {workload}\n  namespace: {ns}\n  labels: {{app: {app}, version: v1}}\n  \
         cluster_id: Kubernetes\n"
    )
}

/// ratings' inbound sidecar: mTLS listener (`mode`) in front of `app`.
fn inbound(certs: &Certs, mode: &str, exchange: &str, app: SocketAddr) -> Ringside {
    let listen = free_addr();
    let config = format!(
        "{}listeners:\n  - name: inbound\n    listen: {listen}\n    direction: inbound\n    peer_exchange: {exchange}\n    \
         cluster: local-app\n    tls: {{mode: {mode}, {}}}\nclusters:\n  - name: local-app\n    \
         service: ratings.ratings-ns.svc.cluster.local\n    endpoints: [{{address: \"{app}\"}}]\n",
        node("ratings-v1", "ratings-ns", "ratings"),
        certs.yaml()
    );
    Ringside::spawn_config(&config, listen, &[])
}

/// productpage's outbound sidecar: ISTIO_MUTUAL to `upstream`, expecting `sans`.
fn outbound(certs: &Certs, sans: &[&str], upstream: SocketAddr) -> Ringside {
    let listen = free_addr();
    let sans: Vec<String> = sans.iter().map(|s| format!("\"{s}\"")).collect();
    let config = format!(
        "{}listeners:\n  - name: outbound\n    listen: {listen}\n    direction: outbound\n    peer_exchange: alpn\n    \
         cluster: ratings\nclusters:\n  - name: ratings\n    service: ratings.ratings-ns.svc.cluster.local\n    \
         endpoints: [{{address: \"{upstream}\"}}]\n    tls: {{mode: istio_mutual, {}, subject_alt_names: [{}]}}\n",
        node("productpage-v1", "default", "productpage"),
        certs.yaml(),
        sans.join(", ")
    );
    Ringside::spawn_config(&config, listen, &[])
}

fn mesh(ca: &Ca, mode: &str, app: SocketAddr) -> (Ringside, Ringside) {
    let server = inbound(&Certs::new("ratings", ca, RATINGS), mode, "alpn", app);
    let client = outbound(&Certs::new("productpage", ca, PRODUCTPAGE), &[RATINGS], server.listen);
    (client, server)
}

/// Send `payload` through `addr` to an echo server; read it back whole; close.
fn echo_round_trip(addr: SocketAddr, payload: &[u8]) {
    let got = echo_back(connect(addr), payload);
    assert!(got == payload, "echo differs: {} bytes back of {}", got.len(), payload.len());
}

#[test]
fn two_sidecars_speak_mtls_with_the_exchange_in_alpn_mode_and_label_both_reporters() {
    let ca = Ca::new("mesh");
    let (client, server) = mesh(&ca, "strict", echo_server());
    let payload = Rng(7).bytes(3 * 1024 * 1024 + 17);
    echo_round_trip(client.listen, &payload);

    let n = payload.len() as f64;
    let source = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_principal", PRODUCTPAGE),
        ("destination_workload", "ratings-v1"),
        ("destination_workload_namespace", "ratings-ns"),
        ("destination_principal", RATINGS),
        ("destination_app", "ratings"),
        ("connection_security_policy", "unknown"),
    ];
    client.wait_for_value("istio_tcp_connections_closed_total", &source, 1.0);
    let scrape = client.wait_for_value("istio_tcp_received_bytes_total", &source, n);
    assert_eq!(sum(&scrape, "istio_tcp_sent_bytes_total", &source), n);
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "default"),
        ("source_principal", PRODUCTPAGE),
        ("source_app", "productpage"),
        ("destination_workload", "ratings-v1"),
        ("destination_principal", RATINGS),
        ("connection_security_policy", "mutual_tls"),
    ];
    server.wait_for_value("istio_tcp_connections_closed_total", &destination, 1.0);
    let scrape = server.wait_for_value("istio_tcp_received_bytes_total", &destination, n);
    assert_eq!(sum(&scrape, "istio_tcp_sent_bytes_total", &destination), n);
    assert_eq!(sum(&scrape, "ringside_exchange_total", &[("outcome", "metadata_added")]), 1.0);
}

#[test]
fn half_close_across_tls_keeps_the_other_direction_flowing() {
    let ca = Ca::new("mesh");
    let (app, conns) = manual_server();
    let (client, _server) = mesh(&ca, "strict", app);
    let mut c = connect(client.listen);
    c.write_all(b"ping").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut s = next_conn(&conns);
    assert_eq!(read_to_end(&mut s), b"ping"); // close_notify + FIN arrived as a FIN
    s.write_all(b"pong").unwrap(); // still open this way
    assert_eq!(read_exact(&mut c, 4), b"pong");
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"");
}

#[test]
fn a_server_first_application_greets_through_mtls() {
    let ca = Ca::new("mesh");
    let (app, conns) = manual_server();
    let (client, _server) = mesh(&ca, "strict", app);
    let mut c = connect(client.listen);
    let mut s = next_conn(&conns);
    s.write_all(b"220 greeting\r\n").unwrap();
    assert_eq!(read_exact(&mut c, 14), b"220 greeting\r\n");
}

#[test]
fn a_reset_stays_a_reset_across_tls() {
    let ca = Ca::new("mesh");
    let (app, conns) = manual_server();
    let (client, _server) = mesh(&ca, "strict", app);
    let mut c = connect(client.listen);
    c.write_all(b"x").unwrap();
    let s = next_conn(&conns);
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s); // RST from the application
    let mut buf = [0u8; 1];
    let err = c.read(&mut buf).expect_err("the client must see a reset, not EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// Assert the strict listener refused this connection: closed within seconds, counted, and
/// nothing reached the application.
fn assert_refused(
    server: &Ringside,
    app_conns: &std::sync::mpsc::Receiver<std::net::TcpStream>,
    reason: &str,
) {
    server.wait_for_value("ringside_tls_refused_total", &[("reason", reason)], 1.0);
    assert!(app_conns.try_recv().is_err(), "a refused client reached the application");
    let scrape = server.scrape();
    assert_eq!(sum(&scrape, "istio_tcp_connections_opened_total", &[]), 0.0, "{scrape}");
}

#[test]
fn strict_refuses_plaintext() {
    let ca = Ca::new("mesh");
    let (app, conns) = manual_server();
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", app);
    let mut c = connect(server.listen);
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(start.elapsed() < Duration::from_secs(4));
    // A TLS alert at most, never an application byte.
    assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
    assert_refused(&server, &conns, "not_tls");
}

/// A Python `ssl` client (an independent TLS stack: OpenSSL via CPython) against `addr`.
/// Prints the negotiated ALPN, then the bytes it read (hex) after sending `send`.
fn python_client(
    addr: SocketAddr,
    certs: Option<&Certs>,
    root: &Path,
    alpn: &[&str],
    send: &[u8],
) -> (String, Vec<u8>) {
    let script = r#"
import socket, ssl, sys
host, port, cert, key, root, alpn, send = sys.argv[1:8]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(root)
if cert:
    ctx.load_cert_chain(cert, key)
if alpn:
    ctx.set_alpn_protocols(alpn.split(","))
s = socket.create_connection((host, int(port)), timeout=10)
try:
    t = ctx.wrap_socket(s)
    print(t.selected_alpn_protocol(), flush=True)
    t.sendall(bytes.fromhex(send))
    out = b""
    while True:
        d = t.recv(65536)
        if not d:
            break
        out += d
        if out.endswith(bytes.fromhex(send)):
            break
    print(out.hex(), flush=True)
except Exception as e:
    print("error", type(e).__name__, e, flush=True)
"#;
    let (cert, key) = match certs {
        Some(c) => (c.p("cert-chain.pem"), c.p("key.pem")),
        None => (String::new(), String::new()),
    };
    let out = Command::new("python3")
        .args(["-c", script, &addr.ip().to_string(), &addr.port().to_string(), &cert, &key])
        .arg(root)
        .arg(alpn.join(","))
        .arg(hex(send))
        .stderr(Stdio::inherit())
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default().to_string();
    let data = lines.next().filter(|l| !l.starts_with("error")).map(unhex).unwrap_or_default();
    (first, data)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

#[test]
fn strict_refuses_a_client_without_a_certificate_and_one_from_another_ca() {
    let ca = Ca::new("mesh");
    let (app, conns) = manual_server();
    let server_certs = Certs::new("ratings", &ca, RATINGS);
    let server = inbound(&server_certs, "strict", "alpn", app);
    let root = server_certs.path("root-cert.pem");

    let (first, _) = python_client(server.listen, None, &root, &["istio"], b"hi");
    assert!(first.starts_with("error") || first == "istio", "{first}");
    assert_refused(&server, &conns, "no_client_certificate");

    let rogue = Ca::new("rogue");
    let rogue_certs = Certs::new("rogue", &rogue, PRODUCTPAGE);
    let (first, data) = python_client(server.listen, Some(&rogue_certs), &root, &["istio"], b"hi");
    assert!(data.is_empty(), "{first} {data:?}");
    server.wait_for_value("ringside_tls_refused_total", &[("reason", "bad_certificate")], 1.0);

    let expired = Certs::with_root("expired", &ca, PRODUCTPAGE, &ca.pem, true);
    let (first, data) = python_client(server.listen, Some(&expired), &root, &["istio"], b"hi");
    assert!(data.is_empty(), "{first} {data:?}");
    server.wait_for_value("ringside_tls_refused_total", &[("reason", "bad_certificate")], 2.0);
    assert!(conns.try_recv().is_err(), "a refused client reached the application");
}

#[test]
fn a_python_mtls_client_gets_the_preamble_only_when_it_negotiated_istio_peer_exchange() {
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let client_certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let root = client_certs.path("root-cert.pem");

    // ALPN "istio": no exchange, the echo comes back as it was sent.
    let (alpn, data) = python_client(server.listen, Some(&client_certs), &root, &["istio"], b"hello");
    assert_eq!(alpn, "istio");
    assert_eq!(data, b"hello");

    // ALPN istio-peer-exchange: our preamble comes first (magic 0x3D230467), then the echo
    // of bytes that were not a preamble (a non-mesh client is passed through).
    let (alpn, data) =
        python_client(server.listen, Some(&client_certs), &root, &["istio-peer-exchange", "istio"], b"hello");
    assert_eq!(alpn, "istio-peer-exchange");
    assert_eq!(data.get(..4), Some(&[0x3D, 0x23, 0x04, 0x67][..]), "{data:?}");
    let len = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
    assert_eq!(&data[8 + len..], b"hello");
    let scrape = server.scrape();
    assert_eq!(sum(&scrape, "istio_tcp_connections_opened_total", &[("source_principal", PRODUCTPAGE)]), 2.0);
}

#[test]
fn permissive_serves_mtls_and_plaintext_on_one_port() {
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "permissive", "alpn", echo_server());
    // A plaintext client that sends one byte and waits is answered.
    let mut c = connect(server.listen);
    c.write_all(b"x").unwrap();
    assert_eq!(read_exact(&mut c, 1), b"x");
    c.write_all(b"yz").unwrap();
    assert_eq!(read_exact(&mut c, 2), b"yz");
    drop(c);
    // An mTLS client on the same port.
    let client = outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[RATINGS], server.listen);
    echo_round_trip(client.listen, b"through tls");
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
        ("source_principal", "unknown"),
    ];
    server.wait_for_value("istio_tcp_connections_closed_total", &plain, 1.0);
    let mtls = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", PRODUCTPAGE),
    ];
    server.wait_for_value("istio_tcp_connections_closed_total", &mtls, 1.0);
}

#[test]
fn an_upstream_with_another_identity_is_refused_as_an_upstream_failure() {
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let wrong = "spiffe://cluster.local/ns/default/sa/reviews";
    let client = outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[wrong], server.listen);
    let mut c = connect(client.listen);
    let _ = c.write_all(b"hi");
    assert_closed_empty(&mut c, "SAN mismatch");
    client.wait_for_value("istio_tcp_connections_closed_total", &[("response_flags", "UF")], 1.0);
}

#[test]
fn certificates_rotate_during_live_traffic_and_a_corrupt_file_keeps_the_previous_one() {
    let ca = Ca::new("mesh");
    let server_certs = Certs::new("ratings", &ca, RATINGS);
    let server = inbound(&server_certs, "strict", "alpn", echo_server());
    let client = outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[RATINGS], server.listen);

    // A live connection through the rotation.
    let mut live = connect(client.listen);
    live.write_all(b"before").unwrap();
    assert_eq!(read_exact(&mut live, 6), b"before");

    // The server gets a new identity (same root): new connections show it, the live one goes on.
    let rotated = "spiffe://cluster.local/ns/ratings-ns/sa/ratings-rotated";
    server_certs.install(&ca, rotated, &ca.pem, false);
    let client2 = outbound(&Certs::new("productpage2", &ca, PRODUCTPAGE), &[rotated], server.listen);
    wait_for("the rotated certificate to be served", || {
        let mut c = connect(client2.listen);
        let _ = c.write_all(b"1");
        let mut b = [0u8; 1];
        (c.read(&mut b).ok() == Some(1)).then_some(())
    });
    live.write_all(b"after").unwrap();
    assert_eq!(read_exact(&mut live, 5), b"after");

    // A corrupt file: one log line naming it, and the previous certificate stays in use.
    std::fs::write(server_certs.path("cert-chain.pem"), "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    // Not a synchronisation: what must hold is that nothing changes, so give the watcher
    // (a 1 s poll) a few rounds to have seen the corrupt file before checking.
    std::thread::sleep(Duration::from_millis(2500));
    echo_round_trip(client2.listen, b"still served");
    live.write_all(b"again").unwrap();
    assert_eq!(read_exact(&mut live, 5), b"again");
    let mut server = server;
    server.signal("TERM");
    server.wait_exit();
    let named = server_certs.p("cert-chain.pem");
    let lines = server.stderr_lines();
    let failed: Vec<_> = lines.iter().filter(|l| l.contains("reload failed") && l.contains(&named)).collect();
    assert!(!failed.is_empty(), "{lines:#?}");
}

#[test]
fn a_bad_certificate_path_at_start_up_is_a_one_line_config_error() {
    let listen = free_addr();
    let config = format!(
        "listeners:\n  - name: inbound\n    listen: {listen}\n    direction: inbound\n    cluster: app\n    \
         tls: {{mode: strict, cert_chain: /nonexistent/cert-chain.pem, private_key: /nonexistent/key.pem, \
         root_cert: /nonexistent/root-cert.pem}}\nclusters:\n  - name: app\n    endpoints: [{{address: \"127.0.0.1:9\"}}]\n"
    );
    let path = std::env::temp_dir().join(format!("ringside-tls-badpath-{}.yaml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .args(["--admin", "off", "--metrics", "off", "--health", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ringside:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("/nonexistent/cert-chain.pem"), "{err}");
}

/// `openssl s_server` requiring a client certificate from the mesh root, offering `alpn`;
/// returns its port and everything it received (its stdout), gathered by a thread.
fn openssl_server(
    certs: &Certs,
    alpn: &str,
) -> (SocketAddr, std::process::Child, std::sync::mpsc::Receiver<Vec<u8>>) {
    let addr = free_addr();
    let mut child = Command::new("openssl")
        .args(["s_server", "-quiet", "-accept", &addr.to_string(), "-cert"])
        .arg(certs.path("cert-chain.pem"))
        .arg("-key")
        .arg(certs.path("key.pem"))
        .arg("-CAfile")
        .arg(certs.path("root-cert.pem"))
        .args(["-Verify", "1", "-alpn", alpn])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl (tests/deps.sh installs it)");
    let (tx, got) = std::sync::mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    wait_for("openssl s_server to listen", || std::net::TcpStream::connect(addr).ok().map(drop));
    (addr, child, got)
}

const MAGIC: [u8; 4] = [0x3D, 0x23, 0x04, 0x67];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn outbound_to_openssl_s_server_writes_the_preamble_only_when_it_chose_istio_peer_exchange() {
    let ca = Ca::new("mesh");
    let server_certs = Certs::new("ratings", &ca, RATINGS);
    for (alpn, preamble) in [("istio", false), ("istio-peer-exchange", true)] {
        let (addr, mut child, got) = openssl_server(&server_certs, alpn);
        let client = outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[RATINGS], addr);
        let mut c = connect(client.listen);
        c.write_all(b"application bytes\n").unwrap();
        let mut received = Vec::new();
        wait_for("s_server to receive the application bytes", || {
            received.extend(got.try_iter().flatten());
            contains(&received, b"application bytes\n").then_some(())
        });
        assert_eq!(contains(&received, &MAGIC), preamble, "ALPN {alpn}: {received:?}");
        if !preamble {
            assert!(received.ends_with(b"application bytes\n") && !contains(&received, &MAGIC));
        }
        let _ = child.kill();
        let _ = child.wait();
        // The principal of s_server's certificate labels the connection (reporter=source).
        drop(c);
        client.wait_for_value(
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_principal", RATINGS), ("source_principal", PRODUCTPAGE)],
            1.0,
        );
    }
}

#[test]
fn openssl_s_client_with_a_mesh_certificate_reaches_the_application_through_strict() {
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &server.listen.to_string(), "-cert"])
        .arg(certs.path("cert-chain.pem"))
        .arg("-key")
        .arg(certs.path("key.pem"))
        .arg("-CAfile")
        .arg(certs.path("root-cert.pem"))
        .args(["-alpn", "istio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    child.stdin.as_mut().unwrap().write_all(b"hello from openssl\n").unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = vec![0u8; 19];
    out.read_exact(&mut got).unwrap();
    assert_eq!(got, b"hello from openssl\n");
    let _ = child.kill();
    let _ = child.wait();
    server.wait_for_value(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", PRODUCTPAGE),
            ("connection_security_policy", "mutual_tls"),
        ],
        1.0,
    );
}

#[test]
fn a_bulk_upload_through_mtls_arrives_whole_whatever_the_record_boundaries() {
    // The outbound sidecar makes one record per read, so paced writes make records of mixed
    // sizes: a large record's tail followed by small records in one 16 KiB read decrypts to
    // more than rustls' 16 KiB plaintext limit; the rest must wait, not fail the connection.
    let ca = Ca::new("mesh");
    let (app, conns) = manual_server();
    let (client, _server) = mesh(&ca, "strict", app);
    let mut rng = Rng(11);
    let mut payload = Vec::new();
    let mut pieces = Vec::new();
    for round in 0..200 {
        for size in [16 * 1024 + 9000, 1500, 2500, 700, 3000, 1200] {
            let piece = rng.bytes(size + round);
            payload.extend_from_slice(&piece);
            pieces.push(piece);
        }
    }
    let mut c = connect(client.listen);
    c.set_nodelay(true).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for piece in pieces {
            w.write_all(&piece).unwrap();
            // Pacing (not synchronisation): lets the sidecar read each write on its own.
            std::thread::sleep(Duration::from_micros(300));
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut s = next_conn(&conns);
    // A slow application: the mixed records pile up in the inbound sidecar's socket, to be
    // read 16 KiB at a time once the application reads (pacing, not synchronisation).
    std::thread::sleep(Duration::from_millis(400));
    let got = read_to_end(&mut s);
    writer.join().unwrap();
    assert!(got == payload, "{} bytes arrived of {}", got.len(), payload.len());
    s.write_all(b"ok").unwrap();
    drop(s);
    assert_eq!(read_to_end(&mut c), b"ok");
}

/// ratings' inbound sidecar on `listen` (a ServiceEntry endpoint address), strict mTLS.
fn inbound_at(listen: SocketAddr, certs: &Certs, app: SocketAddr) -> Ringside {
    let config = format!(
        "{}listeners:\n  - name: inbound\n    listen: \"{listen}\"\n    direction: inbound\n    peer_exchange: alpn\n    \
         cluster: local-app\n    tls: {{mode: strict, {}}}\nclusters:\n  - name: local-app\n    \
         service: ratings.default.svc.cluster.local\n    endpoints: [{{address: \"{app}\"}}]\n",
        node("ratings-v1", "default", "ratings"),
        certs.yaml()
    );
    Ringside::spawn_config(&config, listen, &[])
}

#[test]
fn bookinfo_destination_rule_all_mtls_runs_end_to_end() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/istio/bookinfo-like/rules-mtls.yaml");
    istio_mutual_rules_run_end_to_end(rules, 23);
}

/// Replays of Istio's own Bookinfo files.
mod conformance {
    #[test]
    fn istios_bookinfo_destination_rule_all_mtls_runs_end_to_end() {
        let test = "tls::conformance::bookinfo_destination_rule_all_mtls";
        if let Some(dir) = crate::common::shared("istio/bookinfo", test) {
            let rules = dir.join("destination-rule-all-mtls.yaml");
            super::istio_mutual_rules_run_end_to_end(rules.to_str().unwrap(), 24);
        }
    }
}

/// Bookinfo's DestinationRules with `ISTIO_MUTUAL` (file `rules`; ratings among them) and a
/// ServiceEntry giving ratings two loopback endpoints on `127.0.<net>.*`, each a ringside
/// inbound sidecar in strict mode: productpage's sidecar takes its workload certificate from
/// the config's `tls:` block, as Istio's agent mounts one per pod.
fn istio_mutual_rules_run_end_to_end(rules: &str, net: u8) {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/istio");
    let dir = std::env::temp_dir().join(format!("ringside-tls-bookinfo-{}-{net}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let entry = std::fs::read_to_string(format!("{data}/local/ratings.yaml"))
        .unwrap()
        .replace("127.0.10.", &format!("127.0.{net}."));
    std::fs::write(dir.join("ratings.yaml"), entry).unwrap();
    let ca = Ca::new("mesh");
    let ratings = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings";
    let app = echo_server();
    let at = |host: u8| SocketAddr::from(([127, 0, net, host], 9080));
    let v1 = inbound_at(at(11), &Certs::new("ratings-v1", &ca, ratings), app);
    let v2 = inbound_at(at(12), &Certs::new("ratings-v2", &ca, ratings), app);
    let certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let listen = at(100);
    let config = format!(
        "{}listeners:\n  - name: ratings\n    listen: \"{listen}\"\n    direction: outbound\n    \
         service: ratings.default.svc.cluster.local\nclusters:\n  - name: workload-certificate\n    \
         endpoints: [{{address: \"127.0.0.1:9\"}}]\n    tls: {{mode: istio_mutual, {}}}\n",
        node("productpage-v1", "default", "productpage"),
        certs.yaml()
    );
    let client =
        Ringside::spawn_config(&config, listen, &["--istio", rules, "--istio", dir.to_str().unwrap()]);
    for i in 0..4 {
        echo_round_trip(listen, format!("rating request {i}").as_bytes());
    }
    let source = [
        ("reporter", "source"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", ratings),
        ("destination_workload", "ratings-v1"),
        ("destination_service", "ratings.default.svc.cluster.local"),
        ("connection_security_policy", "unknown"),
    ];
    client.wait_for_value("istio_tcp_connections_closed_total", &source, 4.0);
    let destination = [
        ("reporter", "destination"),
        ("source_principal", PRODUCTPAGE),
        ("connection_security_policy", "mutual_tls"),
    ];
    // Round robin over both endpoints; together they saw the four, all mutual TLS.
    wait_for("both inbound sidecars to count four mTLS connections", || {
        let closed = |rs: &Ringside| sum(&rs.scrape(), "istio_tcp_connections_closed_total", &destination);
        (closed(&v1) + closed(&v2) == 4.0).then_some(())
    });
}
