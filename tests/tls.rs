//! SPEC §7 through the real binary: mTLS between two ringside sidecars with the exchange in
//! mode `alpn`, principals and connection_security_policy in both reporters, strict and
//! permissive inbound, independent TLS peers (openssl, Python's ssl), certificate rotation
//! and bad certificate files. Certificates are generated at test time with rcgen.

mod common;
#[path = "common/envoy.rs"]
mod envoy;
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

/// The byte at `i` of a long stream, so a gibibyte is checked without holding it.
fn stream_byte(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

#[test]
fn a_gibibyte_crosses_two_sidecars_both_ways_byte_exact() {
    const TOTAL: usize = 1 << 30;
    let ca = Ca::new("mesh");
    let (client, _server) = mesh(&ca, "strict", echo_server());
    let mut s = connect(client.listen);
    let mut w = s.try_clone().unwrap();
    // Writes of varied sizes, so records and reads fall anywhere in the stream.
    let writer = std::thread::spawn(move || {
        let mut sizes = Rng(5);
        let mut sent = 0;
        let mut chunk = Vec::new();
        while sent < TOTAL {
            let n = sizes.range(1, 200 << 10).min(TOTAL - sent);
            chunk.clear();
            chunk.extend((sent..sent + n).map(stream_byte));
            w.write_all(&chunk).unwrap();
            sent += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = 0;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (k, &b) in buf[..n].iter().enumerate() {
            assert_eq!(b, stream_byte(got + k), "byte {} differs", got + k);
        }
        got += n;
    }
    writer.join().unwrap();
    assert_eq!(got, TOTAL, "bytes back");
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
    let mut s = next_conn(&conns);
    // The byte arrived: the inbound sidecar's connect is complete and the copy running. (A
    // reset that beats the connect's completion is a connect failure, UF, as in Envoy.)
    assert_eq!(read_exact(&mut s, 1), b"x");
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
    openssl_server_with(certs, alpn, &[])
}

/// `openssl_server` with more options (a suite restriction).
fn openssl_server_with(
    certs: &Certs,
    alpn: &str,
    args: &[&str],
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
        .args(args)
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
    let mut child = spawn_s_client(server.listen, &certs, &["-quiet"]);
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
fn an_openssl_client_key_update_mid_stream_is_followed_and_answered() {
    // ringside seals and opens records itself after the handshake: OpenSSL's `K` command
    // sends KeyUpdate(update_requested); the records after it are under its new key, and our
    // answer (our own KeyUpdate, then the echo under our new key) must open in OpenSSL.
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let mut child = spawn_s_client(server.listen, &certs, &["-quiet", "-no_ign_eof", "-tls1_3"]);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    stdin.write_all(b"before the update\n").unwrap();
    let mut got = vec![0u8; 18];
    out.read_exact(&mut got).unwrap();
    assert_eq!(got, b"before the update\n");
    stdin.write_all(b"K\n").unwrap();
    // s_client drops the rest of a stdin read that starts with `K`: the next line must come
    // in a read of its own, and nothing tells when OpenSSL has read this one.
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        let line = format!("after the update {round}\n");
        stdin.write_all(line.as_bytes()).unwrap();
        let mut got = vec![0u8; line.len()];
        out.read_exact(&mut got).unwrap();
        assert_eq!(got, line.as_bytes());
    }
    drop(stdin);
    let _ = child.wait();
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

// Cipher suites and session resumption (README Decisions).

/// The TLS 1.3 suite ringside prefers on this CPU: BoringSSL's order, AES-128-GCM first with
/// AES instructions, ChaCha20 first without.
fn preferred_tls13_suite() -> &'static str {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> =
        cpu.lines().filter(|l| l.starts_with("flags")).flat_map(|l| l.split_whitespace()).collect();
    match flags.contains(&"aes") && flags.contains(&"pclmulqdq") {
        true => "TLS13_AES_128_GCM_SHA256",
        false => "TLS13_CHACHA20_POLY1305_SHA256",
    }
}

/// `ringside_tls_handshakes_total` of one sidecar for `labels`.
fn handshakes(rs: &Ringside, labels: &[(&str, &str)]) -> f64 {
    sum(&rs.scrape(), "ringside_tls_handshakes_total", labels)
}

#[test]
fn a_second_connection_between_two_sidecars_is_resumed_with_aes_128_gcm_and_both_principals() {
    let ca = Ca::new("mesh");
    let (client, server) = mesh(&ca, "strict", echo_server());
    let suite = preferred_tls13_suite();
    echo_round_trip(client.listen, b"first: a full handshake");
    echo_round_trip(client.listen, b"second: resumed from the first's ticket");
    let full = [("handshake", "full"), ("cipher_suite", suite)];
    let resumed = [("handshake", "resumed"), ("cipher_suite", suite)];
    client.wait_for_value(
        "ringside_tls_handshakes_total",
        &[&full[..], &[("direction", "outbound")]].concat(),
        1.0,
    );
    client.wait_for_value(
        "ringside_tls_handshakes_total",
        &[&resumed[..], &[("direction", "outbound")]].concat(),
        1.0,
    );
    server.wait_for_value(
        "ringside_tls_handshakes_total",
        &[&full[..], &[("direction", "inbound")]].concat(),
        1.0,
    );
    server.wait_for_value(
        "ringside_tls_handshakes_total",
        &[&resumed[..], &[("direction", "inbound")]].concat(),
        1.0,
    );
    // The resumed session still names both peers: from the cached server certificate on the
    // client, from the ticket's client certificate on the server.
    let source =
        [("reporter", "source"), ("source_principal", PRODUCTPAGE), ("destination_principal", RATINGS)];
    client.wait_for_value("istio_tcp_connections_closed_total", &source, 2.0);
    let destination = [
        ("reporter", "destination"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", RATINGS),
        ("connection_security_policy", "mutual_tls"),
    ];
    server.wait_for_value("istio_tcp_connections_closed_total", &destination, 2.0);
}

#[test]
fn a_rotated_certificate_on_either_side_forces_a_full_handshake() {
    let ca = Ca::new("mesh");
    let server_certs = Certs::new("ratings", &ca, RATINGS);
    let server = inbound(&server_certs, "strict", "alpn", echo_server());
    let client_certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let client = outbound(&client_certs, &[RATINGS], server.listen);
    let outbound_full = [("direction", "outbound"), ("handshake", "full")];
    let inbound_full = [("direction", "inbound"), ("handshake", "full")];
    echo_round_trip(client.listen, b"full");
    echo_round_trip(client.listen, b"resumed");
    client.wait_for_value("ringside_tls_handshakes_total", &[("handshake", "resumed")], 1.0);

    // The client's certificate rotates: its rebuilt config starts with no session. Until the
    // reload is seen connections resume; once it is, one full handshake, then resumption again.
    client_certs.install(&ca, PRODUCTPAGE, &ca.pem, false);
    wait_for("a full handshake after the client's rotation", || {
        echo_round_trip(client.listen, b"after the client's rotation");
        (handshakes(&client, &outbound_full) == 2.0).then_some(())
    });
    echo_round_trip(client.listen, b"resumed again");
    client.wait_for_value("ringside_tls_handshakes_total", &outbound_full, 2.0);

    // The server's certificate and root rotate (a new mesh CA): its new ticket keys cannot
    // open the client's tickets, so the client's next handshake is full and verifies the new
    // certificate (the client trusts both roots meanwhile, as during an Istio root rotation).
    let ca2 = Ca::new("mesh-2");
    let both = format!("{}{}", ca.pem, ca2.pem);
    client_certs.install(&ca, PRODUCTPAGE, &both, false);
    wait_for("the client to trust both roots", || {
        echo_round_trip(client.listen, b"after the client's root update");
        (handshakes(&client, &outbound_full) == 3.0).then_some(())
    });
    let before = handshakes(&server, &inbound_full);
    server_certs.install(&ca2, RATINGS, &both, false);
    wait_for("a full handshake after the server's rotation", || {
        echo_round_trip(client.listen, b"after the server's rotation");
        (handshakes(&server, &inbound_full) > before).then_some(())
    });
    let source =
        [("reporter", "source"), ("destination_principal", RATINGS), ("source_principal", PRODUCTPAGE)];
    // Every connection the client made, before and after both rotations, is reported with both
    // principals once it has closed (a close is counted just after the echo returns).
    let opened = sum(&client.scrape(), "istio_tcp_connections_opened_total", &[]);
    let last = client.wait_for_value("istio_tcp_connections_closed_total", &[], opened);
    assert_eq!(sum(&last, "istio_tcp_connections_closed_total", &source), opened);
}

#[test]
fn a_session_cached_for_one_expected_identity_never_satisfies_another() {
    // Two clusters with the same certificate files and the same SNI, one expecting the
    // server's identity, one another: a session of the first must not let the second skip
    // its identity check (rustls does not verify again on resumption).
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let (right, wrong) = (free_addr(), free_addr());
    let reviews = "spiffe://cluster.local/ns/default/sa/reviews";
    let cluster = |name: &str, san: &str| {
        format!(
            "  - name: {name}\n    service: ratings.ratings-ns.svc.cluster.local\n    endpoints: [{{address: \"{}\"}}]\n    \
             tls: {{mode: istio_mutual, {}, subject_alt_names: [\"{san}\"]}}\n",
            server.listen,
            certs.yaml()
        )
    };
    let config = format!(
        "{}listeners:\n  - {{name: right, listen: \"{right}\", direction: outbound, peer_exchange: alpn, cluster: right}}\n  \
         - {{name: wrong, listen: \"{wrong}\", direction: outbound, peer_exchange: alpn, cluster: wrong}}\nclusters:\n{}{}",
        node("productpage-v1", "default", "productpage"),
        cluster("right", RATINGS),
        cluster("wrong", reviews)
    );
    let client = Ringside::spawn_config(&config, right, &[]);
    echo_round_trip(right, b"full");
    echo_round_trip(right, b"resumed");
    client.wait_for_value("ringside_tls_handshakes_total", &[("handshake", "resumed")], 1.0);
    let mut c = connect(wrong);
    let _ = c.write_all(b"hi");
    assert_closed_empty(&mut c, "SAN mismatch despite a cached session");
    client.wait_for_value("istio_tcp_connections_closed_total", &[("response_flags", "UF")], 1.0);
    assert_eq!(handshakes(&client, &[("handshake", "resumed")]), 1.0);
}

/// `openssl s_client` with a mesh certificate and Istio's ALPN against `addr`, plus `args`;
/// stdin and stdout piped.
fn spawn_s_client(addr: SocketAddr, certs: &Certs, args: &[&str]) -> std::process::Child {
    Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-cert"])
        .arg(certs.path("cert-chain.pem"))
        .arg("-key")
        .arg(certs.path("key.pem"))
        .arg("-CAfile")
        .arg(certs.path("root-cert.pem"))
        .args(["-alpn", "istio"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl (tests/deps.sh installs it)")
}

/// `openssl s_client` with a mesh certificate against `addr`: sends a line, waits for its
/// echo, then closes stdin (s_client then exits). Returns its stdout (session details).
fn s_client(addr: SocketAddr, certs: &Certs, args: &[&str]) -> String {
    let mut child = spawn_s_client(addr, certs, args);
    let line = b"echo through ringside\n";
    child.stdin.as_mut().unwrap().write_all(line).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    wait_for("s_client to print the echo", || {
        got.extend(rx.try_iter().flatten());
        contains(&got, line).then_some(())
    });
    drop(child.stdin.take()); // EOF: s_client closes the connection and exits
    let _ = child.wait();
    got.extend(rx.iter().flatten());
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn openssl_s_client_gets_aes_128_gcm_and_resumes_its_session() {
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let session = certs.path("session.pem");
    let sess = session.to_str().unwrap();
    // OpenSSL offers AES-256-GCM first; the server's order (BoringSSL's) decides.
    let openssl_name = preferred_tls13_suite().replacen("TLS13_", "TLS_", 1);
    let first = s_client(server.listen, &certs, &["-sess_out", sess]);
    assert!(
        first.contains("New, TLSv1.3") && first.contains(&format!("Cipher is {openssl_name}")),
        "{first}"
    );
    let second = s_client(server.listen, &certs, &["-sess_in", sess]);
    assert!(second.contains("Reused, TLSv1.3"), "{second}");
    let resumed =
        [("direction", "inbound"), ("handshake", "resumed"), ("cipher_suite", preferred_tls13_suite())];
    server.wait_for_value("ringside_tls_handshakes_total", &resumed, 1.0);
    // The resumed connection is labelled with the client certificate of the first.
    server.wait_for_value(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("source_principal", PRODUCTPAGE),
            ("connection_security_policy", "mutual_tls"),
        ],
        2.0,
    );
}

#[test]
fn a_listeners_cipher_suites_decide_what_openssl_gets_in_tls_1_3_and_tls_1_2() {
    let ca = Ca::new("mesh");
    let certs = Certs::new("ratings", &ca, RATINGS);
    let listen = free_addr();
    let config = format!(
        "listeners:\n  - name: inbound\n    listen: {listen}\n    direction: inbound\n    peer_exchange: alpn\n    \
         cluster: app\n    tls: {{mode: strict, {}, cipher_suites: [TLS_CHACHA20_POLY1305_SHA256, \
         ECDHE-ECDSA-AES256-GCM-SHA384]}}\nclusters:\n  - name: app\n    endpoints: [{{address: \"{}\"}}]\n",
        certs.yaml(),
        echo_server()
    );
    let server = Ringside::spawn_config(&config, listen, &[]);
    let client = Certs::new("productpage", &ca, PRODUCTPAGE);
    // OpenSSL offers AES-256-GCM, ChaCha20, AES-128-GCM (TLS 1.3) and many TLS 1.2 suites:
    // the listener's list alone decides.
    let tls13 = s_client(server.listen, &client, &[]);
    assert!(tls13.contains("Cipher is TLS_CHACHA20_POLY1305_SHA256"), "{tls13}");
    let tls12 = s_client(server.listen, &client, &["-tls1_2"]);
    assert!(tls12.contains("Cipher is ECDHE-ECDSA-AES256-GCM-SHA384"), "{tls12}");
    let chacha = [("direction", "inbound"), ("cipher_suite", "TLS13_CHACHA20_POLY1305_SHA256")];
    server.wait_for_value("ringside_tls_handshakes_total", &chacha, 1.0);
}

#[test]
fn python_ssl_gets_the_servers_preferred_suite() {
    let ca = Ca::new("mesh");
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let script = r#"
import socket, ssl, sys
host, port, cert, key, root = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(root)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["istio"])
t = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10))
t.sendall(b"x")
t.recv(1)
print(t.cipher()[0], flush=True)
"#;
    let out = Command::new("python3")
        .args(["-c", script, &server.listen.ip().to_string(), &server.listen.port().to_string()])
        .args([certs.p("cert-chain.pem"), certs.p("key.pem"), certs.p("root-cert.pem")])
        .stderr(Stdio::inherit())
        .output()
        .expect("python3");
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(got, preferred_tls13_suite().replacen("TLS13_", "TLS_", 1));
}

/// Every suite ringside offers, as rustls and OpenSSL name it, with the certificate key type
/// it needs (TLS 1.2 suites are per signature algorithm) and the TLS 1.3 flag.
const SUITES: [(&str, &str, bool, bool); 9] = [
    ("TLS13_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", false, true),
    ("TLS13_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", false, true),
    ("TLS13_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256", false, true),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256", false, false),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384", false, false),
    ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", false, false),
    ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256", true, false),
    ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384", true, false),
    ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-RSA-CHACHA20-POLY1305", true, false),
];

/// OpenSSL's options restricting a peer to one suite.
fn only_suite(openssl: &str, tls13: bool) -> Vec<String> {
    match tls13 {
        true => vec!["-tls1_3".into(), "-ciphersuites".into(), openssl.into()],
        false => vec!["-tls1_2".into(), "-cipher".into(), openssl.into()],
    }
}

#[test]
fn every_suite_ringside_offers_interoperates_with_openssl_both_ways() {
    let ca = Ca::new("mesh");
    let (ec, rsa) = (Certs::new("ratings-ec", &ca, RATINGS), Certs::new("ratings-rsa", &ca, RATINGS));
    rsa.install_rsa(&ca, RATINGS);
    let client_certs = Certs::new("productpage", &ca, PRODUCTPAGE);
    let servers =
        [inbound(&ec, "strict", "alpn", echo_server()), inbound(&rsa, "strict", "alpn", echo_server())];
    for (rustls_name, openssl_name, needs_rsa, tls13) in SUITES {
        // Inbound: s_client restricted to the suite.
        let server = &servers[usize::from(needs_rsa)];
        let opts = only_suite(openssl_name, tls13);
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        let out = s_client(server.listen, &client_certs, &opts);
        assert!(out.contains(&format!("Cipher is {openssl_name}")), "{rustls_name}: {out}");
        server.wait_for_value(
            "ringside_tls_handshakes_total",
            &[("direction", "inbound"), ("handshake", "full"), ("cipher_suite", rustls_name)],
            1.0,
        );

        // Outbound: s_server restricted to the suite.
        let server_certs = if needs_rsa { &rsa } else { &ec };
        let (addr, mut child, got) = openssl_server_with(server_certs, "istio", &opts);
        let client = outbound(&client_certs, &[RATINGS], addr);
        let mut c = connect(client.listen);
        c.write_all(b"application bytes\n").unwrap();
        let mut received = Vec::new();
        wait_for("s_server to receive the application bytes", || {
            received.extend(got.try_iter().flatten());
            contains(&received, b"application bytes\n").then_some(())
        });
        client.wait_for_value(
            "ringside_tls_handshakes_total",
            &[("direction", "outbound"), ("cipher_suite", rustls_name)],
            1.0,
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A real Envoy (BoringSSL) with a static bootstrap: `out13` and `out12` are tcp_proxies to
/// `ringside_in` over ISTIO_MUTUAL-style TLS (its client certificate, expecting
/// `ringside_id`), with Istio's TLS 1.2-1.3 (`tls_params` as istiod writes them) and with
/// Envoy's default for clusters (TLS 1.2 only); `inbound` a listener requiring a mesh client
/// certificate in front of `app`.
struct StaticEnvoy {
    child: std::process::Child,
    admin: SocketAddr,
    out13: SocketAddr,
    out12: SocketAddr,
    inbound: SocketAddr,
}

impl StaticEnvoy {
    fn start(
        bin: &str,
        certs: &Certs,
        ringside_in: SocketAddr,
        ringside_id: &str,
        app: SocketAddr,
    ) -> StaticEnvoy {
        let (admin, out13, out12, inbound) = (free_addr(), free_addr(), free_addr(), free_addr());
        let tls_certificates = format!(
            "[{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]",
            certs.p("cert-chain.pem"),
            certs.p("key.pem")
        );
        let root = certs.p("root-cert.pem");
        let tcp_proxy = |prefix: &str, cluster: &str| {
            format!(
                "{{name: envoy.filters.network.tcp_proxy, typed_config: {{\"@type\": \
                 type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {prefix}, \
                 cluster: {cluster}}}}}"
            )
        };
        let endpoint = |a: SocketAddr| {
            format!(
                "endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]",
                a.ip(),
                a.port()
            )
        };
        let addr =
            |a: SocketAddr| format!("{{socket_address: {{address: {}, port_value: {}}}}}", a.ip(), a.port());
        let listener = |name: &str, at: SocketAddr| {
            format!(
                "  - name: {name}\n    address: {}\n    filter_chains: [{{filters: [{}]}}]\n",
                addr(at),
                tcp_proxy(name, name)
            )
        };
        let to_ringside = |name: &str, tls_params: &str| {
            format!(
                r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment: {{cluster_name: {name}, {ep}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: ratings.ratings-ns.svc.cluster.local
        common_tls_context:
          {tls_params}
          tls_certificates: {tls_certificates}
          alpn_protocols: [istio]
          validation_context:
            trusted_ca: {{filename: {root}}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{ringside_id}"}}}}]
"#,
                ep = endpoint(ringside_in)
            )
        };
        let bootstrap = format!(
            r#"admin: {{address: {admin}}}
static_resources:
  listeners:
{out13}{out12}  - name: in
    address: {inbound}
    filter_chains:
    - filters: [{to_app}]
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: {tls_certificates}
            alpn_protocols: [istio]
            validation_context: {{trusted_ca: {{filename: {root}}}}}
  clusters:
{cluster13}{cluster12}  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment: {{cluster_name: app, {app_ep}}}
"#,
            admin = addr(admin),
            out13 = listener("ringside13", out13),
            out12 = listener("ringside12", out12),
            inbound = addr(inbound),
            to_app = tcp_proxy("in", "app"),
            cluster13 = to_ringside(
                "ringside13",
                "tls_params: {tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3}"
            ),
            cluster12 = to_ringside("ringside12", "tls_params: {}"),
            app_ep = endpoint(app),
        );
        let path = certs.path("envoy.yaml");
        std::fs::write(&path, bootstrap).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", "1", "--use-dynamic-base-id", "-l", "warning"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(certs.path("envoy.log")).unwrap())
            .spawn()
            .expect("spawn envoy");
        let envoy = StaticEnvoy { child, admin, out13, out12, inbound };
        wait_for("Envoy's listeners", || {
            let (_, body) = http(admin, "GET", "/ready")?;
            (body.trim() == "LIVE").then_some(())
        });
        envoy
    }

    /// The sum of Envoy's stats whose name ends with `suffix`.
    fn stat(&self, suffix: &str) -> u64 {
        let (_, body) = http(self.admin, "GET", "/stats").unwrap_or_default();
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(name, _)| name.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }
}

impl Drop for StaticEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_envoy_and_ringside_negotiate_aes_128_gcm_and_resume_both_ways() {
    let Some(bin) = envoy::envoy_binary() else {
        skip("a_real_envoy_and_ringside_negotiate_aes_128_gcm_and_resume_both_ways", "no Envoy binary");
        return;
    };
    let ca = Ca::new("mesh");
    let reviews = "spiffe://cluster.local/ns/default/sa/reviews";
    let server = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "off", echo_server());
    let envoy =
        StaticEnvoy::start(&bin, &Certs::new("envoy", &ca, reviews), server.listen, RATINGS, echo_server());
    let suite = preferred_tls13_suite();
    let boring = suite.replacen("TLS13_", "TLS_", 1);

    // Envoy's client (BoringSSL) to ringside's server, twice per cluster: TLS 1.3 with
    // Istio's tls_params, TLS 1.2 with Envoy's default. Envoy resumes its TLS 1.2 session on
    // the second; its TLS 1.3 client mostly offers no session on its second ClientHello (seen
    // through a relay: no pre_shared_key extension), on Envoy's side, so only the suite is
    // checked there.
    let tls12 = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256";
    for (out, cluster, ours, theirs) in [
        (envoy.out13, "ringside13", suite, boring.as_str()),
        (envoy.out12, "ringside12", tls12, "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ] {
        echo_round_trip(out, b"envoy to ringside, full");
        echo_round_trip(out, b"envoy to ringside, resumed");
        server.wait_for_value(
            "ringside_tls_handshakes_total",
            &[("direction", "inbound"), ("cipher_suite", ours)],
            2.0,
        );
        assert_eq!(envoy.stat(&format!("cluster.{cluster}.ssl.ciphers.{theirs}")), 2, "{cluster}");
        if ours == tls12 {
            let labels = [("direction", "inbound"), ("handshake", "resumed"), ("cipher_suite", ours)];
            server.wait_for_value("ringside_tls_handshakes_total", &labels, 1.0);
            assert_eq!(envoy.stat(&format!("cluster.{cluster}.ssl.session_reused")), 1, "{cluster}");
        }
    }
    let destination =
        [("reporter", "destination"), ("source_principal", reviews), ("destination_principal", RATINGS)];
    server.wait_for_value("istio_tcp_connections_closed_total", &destination, 4.0);

    // ringside's client to Envoy's server, twice: the second resumes with Envoy's ticket.
    let client = outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[reviews], envoy.inbound);
    echo_round_trip(client.listen, b"ringside to envoy, full");
    echo_round_trip(client.listen, b"ringside to envoy, resumed");
    for kind in ["full", "resumed"] {
        let labels = [("direction", "outbound"), ("handshake", kind), ("cipher_suite", suite)];
        client.wait_for_value("ringside_tls_handshakes_total", &labels, 1.0);
    }
    let listener = format!("{}_{}", envoy.inbound.ip(), envoy.inbound.port());
    assert_eq!(envoy.stat(&format!("listener.{listener}.ssl.ciphers.{boring}")), 2);
    assert_eq!(envoy.stat(&format!("listener.{listener}.ssl.session_reused")), 1);
    let source =
        [("reporter", "source"), ("source_principal", PRODUCTPAGE), ("destination_principal", reviews)];
    client.wait_for_value("istio_tcp_connections_closed_total", &source, 2.0);
}

#[test]
fn an_idle_connection_after_bulk_holds_no_record_sized_buffer() {
    // Each connection moves 64 KiB both ways, then stays open and idle. After the handshake
    // a connection keeps its keys and rustls' KernelConnection only: records are read into
    // and sealed in buffers given back as soon as nothing waits in them, so what an idle
    // connection costs does not depend on what it carried (rustls' buffered Connection kept
    // ~4 KiB of record buffer and its own state: ~16 KB per sidecar).
    const CONNS: usize = 300;
    let ca = Ca::new("mesh");
    let (client, server) = mesh(&ca, "strict", echo_server());
    let payload = Rng(5).bytes(64 * 1024);
    echo_round_trip(client.listen, &payload); // warm: pools, first allocations
    let before = [common::process::rss_kib(client.pid()), common::process::rss_kib(server.pid())];
    let mut held = Vec::new();
    for _ in 0..CONNS {
        let mut c = connect(client.listen);
        c.write_all(&payload).unwrap();
        assert!(read_exact(&mut c, payload.len()) == payload);
        held.push(c);
    }
    let after = [common::process::rss_kib(client.pid()), common::process::rss_kib(server.pid())];
    let per_conn: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| (a.saturating_sub(*b)) as f64 * 1024.0 / CONNS as f64)
        .collect();
    eprintln!(
        "RSS per idle connection after 64 KiB each way: outbound {:.0} B, inbound {:.0} B",
        per_conn[0], per_conn[1]
    );
    for (side, bytes) in ["outbound", "inbound"].iter().zip(&per_conn) {
        // ~11.4 KB measured; ~16 KB with rustls' Connection, ~32 KB when its record buffer
        // stayed grown.
        assert!(*bytes < 15.0 * 1024.0, "{side} sidecar: {bytes:.0} B per idle connection");
    }
    drop(held);
}

/// TCP_INFO of a socket: (segments received, of them with data).
fn segments_in(tcp: &std::net::TcpStream) -> (u32, u32) {
    // SAFETY: tcp_info is a plain C struct; all zeroes is a valid value of it.
    let info: libc::tcp_info = tcp_option(tcp, libc::TCP_INFO, unsafe { std::mem::zeroed() });
    (info.tcpi_segs_in, info.tcpi_data_segs_in)
}

/// The kernel's delayed-ACK ("pingpong") mode of the TCP socket from `local` to `remote`, as
/// /proc/net/tcp shows it (its 15th field: quick-ACK count << 1 | pingpong); `None` while no
/// such socket exists.
fn acks_delayed(local: SocketAddr, remote: SocketAddr) -> Option<bool> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_ne_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => unreachable!("the tests use 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f[14].parse::<u32>().unwrap() & 1 == 1)
    })
}

#[test]
fn a_strict_listeners_sockets_delay_the_clienthellos_ack_and_a_tls_upstreams_its_server_flights() {
    let ca = Ca::new("mesh");
    let certs = Certs::new("ratings", &ca, RATINGS);
    // Accepted by a strict listener: delayed ACKs from the first segment (inherited from the
    // listening socket), before ringside has read or sent anything. The accept loop sets the
    // listening socket when it starts: a connection made before may still have quick ACKs.
    let strict = inbound(&certs, "strict", "alpn", echo_server());
    let _client = wait_for("a strict listener's connection with delayed ACKs", || {
        let c = connect(strict.listen);
        acks_delayed(strict.listen, c.local_addr().unwrap()).filter(|&d| d).map(|_| c)
    });
    // Permissive may carry plaintext clients (write, write, read without TCP_NODELAY would
    // wait for a delayed ACK): the kernel's default.
    let permissive = inbound(&certs, "permissive", "alpn", echo_server());
    let c = connect(permissive.listen);
    let quick = wait_for("the permissive connection in /proc/net/tcp", || {
        acks_delayed(permissive.listen, c.local_addr().unwrap())
    });
    assert!(!quick, "a permissive listener's connection delays its ACKs");

    // Outbound to a TLS upstream: delayed from the ClientHello on, so the ACK of the
    // server's flight rides on our Finished. (The kernel's default would still be quick
    // ACKs here: nothing was received yet.)
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let client = outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[RATINGS], up_addr);
    let mut app = connect(client.listen);
    app.write_all(b"hello").unwrap();
    let (mut server_side, sidecar) = upstream.accept().unwrap();
    let mut hello = [0u8; 5];
    server_side.read_exact(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    let delayed = wait_for("the sidecar's upstream socket", || acks_delayed(sidecar, up_addr));
    assert!(delayed, "the sidecar's TLS upstream socket acknowledges at once");
}

/// An IPPROTO_TCP option of a socket, read into `value` (a plain C value of the option's type).
fn tcp_option<T: Copy>(tcp: &std::net::TcpStream, name: libc::c_int, mut value: T) -> T {
    use std::os::fd::AsRawFd;
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a plain C value; the fd is live.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt({name}): {}", std::io::Error::last_os_error());
    value
}

/// A client-first application's connection through productpage's outbound sidecar to a
/// rustls mesh server of the test's own (no session tickets: after its handshake flight the
/// server sends nothing), read until `request` arrived whole after the peer's preamble.
/// Returns the application's socket, the server's socket and TLS state, and the sidecar.
fn request_to_a_test_mesh_server(
    request: &[u8],
) -> (std::net::TcpStream, std::net::TcpStream, rustls::ServerConnection, Ringside) {
    let ca = Ca::new("mesh");
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sidecar =
        outbound(&Certs::new("productpage", &ca, PRODUCTPAGE), &[RATINGS], upstream.local_addr().unwrap());
    let ratings = Certs::new("ratings", &ca, RATINGS);
    let files = ringside::tls::Files {
        cert_chain: ratings.path("cert-chain.pem"),
        private_key: ratings.path("key.pem"),
        root_cert: ratings.path("root-cert.pem"),
    };
    let server =
        ringside::tls::build_with(ringside::tls::provider(), &files, &ringside::tls::Role::mesh_server())
            .unwrap()
            .server
            .unwrap();
    let mut server = (*server).clone();
    server.send_tls13_tickets = 0;
    // The application writes before the sidecar has even connected.
    let mut app = connect(sidecar.listen);
    app.write_all(request).unwrap();
    let (mut tcp, _) = upstream.accept().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut conn = rustls::ServerConnection::new(std::sync::Arc::new(server)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    assert_eq!(conn.alpn_protocol(), Some(&b"istio-peer-exchange"[..]));
    let mut got = Vec::new();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    while !got.ends_with(request) {
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "EOF before the request: {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(&ringside::exchange::MAGIC.to_be_bytes()), "the preamble comes first");
    (app, tcp, conn, sidecar)
}

#[test]
fn the_clients_first_bytes_leave_with_the_handshakes_last_flight_and_the_preamble_in_one_segment() {
    let (_app, tcp, _conn, _sidecar) = request_to_a_test_mesh_server(b"GET /ratings HTTP/1.1\r\n\r\n");
    // The ClientHello, then the client's last flight (Certificate, CertificateVerify,
    // Finished), the preamble and the request together: two segments, not three.
    assert_eq!(segments_in(&tcp).1, 2, "segments with data before the request was whole");
}

#[test]
fn a_half_close_sends_close_notify_and_the_fin_in_one_segment() {
    let (app, mut tcp, mut conn, _sidecar) = request_to_a_test_mesh_server(b"GET /ratings HTTP/1.1\r\n\r\n");
    // The server has sent nothing since its handshake flight, which the request's segment
    // acknowledged: every segment from here on is the sidecar's half-close.
    let before = segments_in(&tcp).0;
    app.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(rustls::Stream::new(&mut conn, &mut tcp).read(&mut buf).unwrap(), 0, "close_notify");
    assert_eq!(tcp.read(&mut buf).unwrap(), 0, "FIN");
    assert_eq!(segments_in(&tcp).0 - before, 1, "segments for close_notify and the FIN");
}

#[test]
fn an_inbound_sidecar_sends_its_ticket_and_preamble_with_the_applications_first_answer() {
    // Arrange: ratings' inbound sidecar in front of an echo application; the test is a mesh
    // client offering istio-peer-exchange.
    let ca = Ca::new("mesh");
    let sidecar = inbound(&Certs::new("ratings", &ca, RATINGS), "strict", "alpn", echo_server());
    let config =
        pki::client_config(&Certs::new("productpage", &ca, PRODUCTPAGE), RATINGS, &["istio-peer-exchange"]);
    let name = rustls::pki_types::ServerName::IpAddress(sidecar.listen.ip().into());
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = connect(sidecar.listen);
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    // Act: a request; the sidecar's answer is its preamble, then the application's echo.
    let request = b"GET /ratings/0 HTTP/1.1\r\n\r\n";
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(request).unwrap();
    let mut got = Vec::new();
    while !got.ends_with(request) {
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "EOF before the echo: {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    // Assert: the server's handshake flight, then its session ticket, the preamble and the
    // echo together: two segments, not three.
    assert!(got.starts_with(&ringside::exchange::MAGIC.to_be_bytes()), "the preamble comes first");
    assert_eq!(segments_in(&tcp).1, 2, "segments with data until the echo was whole");
}

/// TCP_NOTSENT_LOWAT of every TCP socket of `pid` whose (local, peer) addresses `pick`
/// accepts, read on a duplicate of the sidecar's descriptor (pidfd_getfd(2)); 0 means unset.
fn unsent_limits(pid: u32, pick: impl Fn(SocketAddr, SocketAddr) -> bool) -> Vec<i32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags; a negative result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor this test owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut limits = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(target) = entry.file_name().to_str().and_then(|n| n.parse::<libc::c_long>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd duplicates the target's descriptor into this process; checked.
        let fd = unsafe {
            libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd() as libc::c_long, target, 0 as libc::c_long)
        };
        if fd < 0 {
            continue; // closed meanwhile
        }
        // SAFETY: the duplicate is ours; dropping it closes only the duplicate.
        let tcp = unsafe { std::net::TcpStream::from_raw_fd(fd as i32) };
        let (Ok(local), Ok(peer)) = (tcp.local_addr(), tcp.peer_addr()) else { continue };
        if !pick(local, peer) {
            continue;
        }
        limits.push(tcp_option(&tcp, libc::TCP_NOTSENT_LOWAT, -1 as libc::c_int));
    }
    limits.sort_unstable();
    limits
}

#[test]
fn a_bulk_stream_bounds_what_waits_unsent_in_each_sidecars_tls_socket_and_a_short_connection_sets_nothing() {
    // Arrange: two sidecars in front of an echo application; one short connection kept open.
    let ca = Ca::new("mesh");
    let (client, server) = mesh(&ca, "strict", echo_server());
    let mut short = connect(client.listen);
    short.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut short, 4), b"ping");
    // Act: a bulk stream (1 MiB each way, byte-exact) on a second connection, kept open too,
    // once its exchange settled (the bytes before that are relayed by the exchange's loop).
    let payload = Rng(31).bytes(1 << 20);
    let mut bulk = connect(client.listen);
    bulk.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut bulk, 4), b"ping");
    let mut w = bulk.try_clone().unwrap();
    let sent = payload.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    assert!(read_exact(&mut bulk, payload.len()) == payload, "echo differs");
    writer.join().unwrap();
    // Assert: each sidecar's TLS socket of the bulk connection holds at most 128 KiB unsent
    // (the outbound's toward the inbound, the inbound's toward the outbound, as the echo
    // answered in bulk); the short connection's sockets keep the kernel's default.
    let to_inbound = unsent_limits(client.pid(), |_, peer| peer == server.listen);
    assert_eq!(to_inbound, [0, 128 * 1024], "outbound sidecar's TLS sockets: short, bulk");
    let from_outbound = unsent_limits(server.pid(), |local, _| local == server.listen);
    assert_eq!(from_outbound, [0, 128 * 1024], "inbound sidecar's TLS sockets: short, bulk");
    drop((short, bulk));
}

#[test]
fn the_startup_log_names_the_record_aead_and_an_override_naming_neither_is_ignored_with_a_warning() {
    let cases = [
        (None, "(chosen for this CPU)"),
        (Some("ring"), "TLS records: AES-GCM by ring (set by RINGSIDE_AES_GCM)"),
        (Some("aws-lc"), "TLS records: AES-GCM by aws-lc-rs (set by RINGSIDE_AES_GCM)"),
        (Some("rign"), "RINGSIDE_AES_GCM=rign is neither ring nor aws-lc: ignored"),
    ];
    for (value, expected) in cases {
        let mut cmd = Command::new(bin());
        cmd.env_remove("RINGSIDE_AES_GCM");
        if let Some(v) = value {
            cmd.env("RINGSIDE_AES_GCM", v);
        }
        let mut rs = Ringside::spawn_command(cmd, echo_server(), "outbound", &["--peer-exchange", "off"]);
        rs.signal("TERM");
        assert!(rs.wait_exit().success());
        let lines = rs.stderr_lines();
        assert!(lines.iter().any(|l| l.contains(expected)), "{value:?}: {lines:?}");
        let chosen = lines.iter().filter(|l| l.contains("TLS records: AES-GCM by")).count();
        assert_eq!(chosen, 1, "{value:?}: {lines:?}");
    }
}
