//! SPEC §12 through the real binary: ringside as an HBONE terminator (a listener with
//! `tunnel: hbone`), driven by an independent HTTP/2 client (the `h2` crate, as ztunnel uses,
//! over tokio-rustls): CONNECT relayed byte-exact both ways with half-close, resets both ways,
//! ztunnel's refusals (400 for non-CONNECT, a foreign `:authority` or one of the proxy's own
//! ports, 503 when the upstream refuses, nothing relayed; each counted in
//! `ringside_hbone_refused_total`), TLS refusals (rogue CA, ALPN without `h2`, TLS 1.2 from
//! OpenSSL), and istio_tcp_* labelled from the client's `baggage` and certificate.
//! Then ringside as the originator (a cluster with `tunnel: hbone`) to ringside (local sockets
//! that stop reading get every byte in order: the queue behind the direct write), and a real
//! Envoy 1.40 on either end: tcp_proxy `tunneling_config` as the client into ringside's
//! terminator, an http_connection_manager with CONNECT upgrade as the server behind ringside's
//! originator.

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use pki::{Ca, Certs};
use rustls::pki_types::ServerName;

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const CLIENT: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
/// The terminator's refusals of CONNECT requests, by reason.
const REFUSED: &str = "ringside_hbone_refused_total";
/// ztunnel's keys, as a reviews workload's ztunnel sends them.
const BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=bookinfo,k8s.deployment.name=reviews-v1,\
                       service.name=reviews,service.version=v1";

/// A terminator on a free loopback port, with the server certificate of `ca`.
fn terminator(ca: &Ca) -> (Ringside, SocketAddr) {
    let certs = Certs::new("hbone-server", ca, SERVER);
    let listen = free_addr();
    let config = format!(
        "node:\n  workload_name: productpage-v1\n  namespace: default\n  labels: {{app: productpage, version: v1}}\n  \
         cluster_id: Kubernetes\nlisteners:\n  - {{name: hbone, listen: \"{listen}\", direction: inbound, tunnel: hbone, \
         tls: {{mode: strict, {}}}}}\n",
        certs.yaml()
    );
    (Ringside::spawn_config(&config, listen, &[]), listen)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A client TLS config with `certs`, checking the server's SPIFFE id, offering `alpn`.
fn client_tls(certs: &Certs, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    pki::client_config(certs, SERVER, alpn)
}

/// An HTTP/2 client over mTLS to the terminator; `Err` when TLS or HTTP/2 setup failed.
async fn h2_client(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake(stream)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.map_err(|e| e.to_string())
}

/// A CONNECT to `authority` with our baggage; the response and the stream to send on.
async fn connect_stream(
    client: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), h2::Error> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .header("baggage", BAGGAGE)
        .body(())
        .unwrap();
    let (resp, send) = client.send_request(req, false)?;
    let resp = tokio::time::timeout(DEADLINE, resp).await.expect("a response in time")?;
    Ok((resp, send))
}

/// Read a stream's body to its END_STREAM (or error), giving window credit back.
async fn read_body(body: &mut h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, body.data()).await.expect("data in time") {
        let chunk = chunk?;
        got.extend_from_slice(&chunk);
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(got)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

#[test]
fn a_connect_stream_is_relayed_to_its_authority_byte_exact_both_ways_with_half_close_and_counted_from_baggage()
 {
    let ca = Ca::new("mesh");
    let (rs, listen) = terminator(&ca);
    let echo = echo_server();
    let certs = Certs::new("hbone-client", &ca, CLIENT);
    let sent = payload(6 << 20); // more than a stream's 4 MiB window
    let (status, baggage, got) = runtime().block_on(async {
        let mut client = h2_client(listen, client_tls(&certs, &["h2"])).await.unwrap();
        let (resp, mut send) = connect_stream(&mut client, &echo.to_string()).await.unwrap();
        let status = resp.status();
        let baggage = resp.headers().get("baggage").map(|v| v.to_str().unwrap().to_string());
        let mut body = resp.into_body();
        // Half-close after the bytes: the echo server sees EOF, echoes all and closes.
        send.send_data(Bytes::from(sent.clone()), true).unwrap();
        (status, baggage, read_body(&mut body).await.unwrap())
    });
    assert_eq!(status, StatusCode::OK);
    let baggage = baggage.expect("baggage on the 200");
    assert!(
        baggage.contains("k8s.namespace.name=default")
            && baggage.contains("k8s.deployment.name=productpage-v1"),
        "{baggage}"
    );
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "echoed bytes differ");
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "reviews-v1"),
        ("source_workload_namespace", "bookinfo"),
        ("source_canonical_service", "reviews"),
        ("source_principal", CLIENT),
        ("destination_principal", SERVER),
        ("connection_security_policy", "mutual_tls"),
    ];
    rs.wait_for_value(CLOSED, &labels, 1.0);
    let text = rs.scrape();
    assert_eq!(sum(&text, OPENED, &labels), 1.0, "{text}");
    assert_eq!(sum(&text, RECEIVED, &labels), sent.len() as f64, "{text}");
    assert_eq!(sum(&text, SENT, &labels), sent.len() as f64, "{text}");
}

#[test]
fn the_answer_is_200_only_after_the_upstream_connected_else_503_and_a_non_connect_gets_400_each_counted() {
    let ca = Ca::new("mesh");
    let (rs, listen) = terminator(&ca);
    let certs = Certs::new("hbone-client", &ca, CLIENT);
    // A port with nothing listening: refused.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    runtime().block_on(async {
        let mut client = h2_client(listen, client_tls(&certs, &["h2"])).await.unwrap();
        let (resp, _send) = connect_stream(&mut client, &closed.to_string()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let get = Request::builder().method(Method::GET).uri(format!("http://{closed}/")).body(()).unwrap();
        let (resp, _send) = client.send_request(get, true).unwrap();
        let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    });
    let text = rs.wait_for_scrape("a 503 and a 400 counted", DEADLINE, |t| sum(t, REFUSED, &[]) >= 2.0);
    assert_eq!(sum(&text, REFUSED, &[("reason", "upstream_unavailable")]), 1.0, "{text}");
    assert_eq!(sum(&text, REFUSED, &[("reason", "bad_request")]), 1.0, "{text}");
    assert_eq!(sum(&text, REFUSED, &[("reason", "reset")]), 0.0, "{text}");
}

#[test]
fn a_foreign_authority_or_one_of_the_proxys_own_ports_gets_400_counted_and_nothing_reaches_any_backend() {
    let ca = Ca::new("mesh");
    let (rs, listen) = terminator(&ca);
    let certs = Certs::new("hbone-client", &ca, CLIENT);
    // A backend on another loopback address than the one the carrier arrives on.
    let foreign = TcpListener::bind("127.0.0.2:0").unwrap();
    foreign.set_nonblocking(true).unwrap();
    let foreign_addr = foreign.local_addr().unwrap();
    runtime().block_on(async {
        let mut client = h2_client(listen, client_tls(&certs, &["h2"])).await.unwrap();
        for authority in [foreign_addr.to_string(), listen.to_string(), "backend.local:80".into()] {
            let (resp, _send) = connect_stream(&mut client, &authority).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{authority}");
        }
    });
    assert!(foreign.accept().is_err(), "a refused CONNECT reached a backend");
    let text = rs.wait_for_scrape("three 400s counted", DEADLINE, |t| sum(t, REFUSED, &[]) >= 3.0);
    assert_eq!(sum(&text, REFUSED, &[("reason", "bad_request")]), 3.0, "{text}");
}

#[test]
fn a_tcp_reset_becomes_rst_stream_connect_error_and_an_rst_stream_becomes_a_tcp_reset() {
    let ca = Ca::new("mesh");
    let (_rs, listen) = terminator(&ca);
    let certs = Certs::new("hbone-client", &ca, CLIENT);
    let (backend, conns) = manual_server();
    runtime().block_on(async {
        let mut client = h2_client(listen, client_tls(&certs, &["h2"])).await.unwrap();
        // Upstream resets: the client's stream is reset with CONNECT_ERROR, never ended cleanly.
        let (resp, _send) = connect_stream(&mut client, &backend.to_string()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let up = next_conn(&conns);
        socket2::SockRef::from(&up).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(up);
        let err = read_body(&mut resp.into_body()).await.expect_err("a reset, not a clean end");
        assert_eq!(err.reason(), Some(h2::Reason::CONNECT_ERROR), "{err}");
        // The client resets its stream: the upstream socket sees a TCP reset.
        let (resp, mut send) = connect_stream(&mut client, &backend.to_string()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut up = next_conn(&conns);
        send.send_data(Bytes::from_static(b"ping"), false).unwrap();
        let mut four = [0u8; 4];
        tokio::task::block_in_place(|| up.read_exact(&mut four)).ok();
        assert_eq!(&four, b"ping");
        send.send_reset(h2::Reason::CANCEL);
        let mut rest = Vec::new();
        let err = tokio::task::block_in_place(|| up.read_to_end(&mut rest)).expect_err("a reset, not EOF");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        let _ = up.write_all(b"x");
    });
}

#[test]
fn a_client_of_another_ca_without_alpn_h2_or_below_tls_1_3_is_refused() {
    let ca = Ca::new("mesh");
    let (rs, listen) = terminator(&ca);
    let echo = echo_server();
    let rogue = Ca::new("rogue");
    let rogue_certs = Certs::with_root("hbone-rogue", &rogue, CLIENT, &ca.pem, false);
    let certs = Certs::new("hbone-client", &ca, CLIENT);
    runtime().block_on(async {
        for (what, tls) in [
            ("rogue CA", client_tls(&rogue_certs, &["h2"])),
            ("ALPN istio only", client_tls(&certs, &["istio"])),
            ("no ALPN", client_tls(&certs, &[])),
        ] {
            let refused = match h2_client(listen, tls).await {
                Err(_) => true,
                Ok(mut client) => connect_stream(&mut client, &echo.to_string()).await.is_err(),
            };
            assert!(refused, "{what}: accepted");
        }
    });
    // TLS 1.2 with ALPN h2 and a mesh certificate: ztunnel's rule is TLS 1.3 only. OpenSSL
    // as the client (rustls' test client above is built for 1.3); its stdin ends at once.
    let tls12 = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &listen.to_string(), "-tls1_2", "-alpn", "h2", "-cert"])
        .arg(certs.path("cert-chain.pem"))
        .arg("-key")
        .arg(certs.path("key.pem"))
        .arg("-CAfile")
        .arg(certs.path("root-cert.pem"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = rs.wait_for_scrape("four refusals (TLS 1.2 among them)", DEADLINE, |t| {
        sum(t, "ringside_tls_refused_total", &[]) >= 4.0
    });
    assert_eq!(sum(&text, OPENED, &[]), 0.0, "{text}\n{}", String::from_utf8_lossy(&tls12.stdout));
    let text =
        rs.wait_for_scrape("three refusals", DEADLINE, |t| sum(t, "ringside_tls_refused_total", &[]) >= 3.0);
    assert_eq!(sum(&text, OPENED, &[]), 0.0, "{text}");
}

/// An originator: an outbound listener whose cluster reaches `app` through the HBONE
/// terminator at `terminator` (its tunnel port), with `certs`, expecting the server's SAN.
fn originator(ca: &Ca, terminator: SocketAddr, app: SocketAddr) -> (Ringside, SocketAddr) {
    let certs = Certs::new("hbone-origin", ca, CLIENT);
    let listen = free_addr();
    let config = format!(
        "node:\n  workload_name: reviews-v1\n  namespace: bookinfo\n  labels: {{app: reviews, version: v1}}\n  \
         cluster_id: Kubernetes\nlisteners:\n  - {{name: outbound, listen: \"{listen}\", direction: outbound, \
         peer_exchange: off, cluster: productpage}}\nclusters:\n  - name: productpage\n    \
         service: productpage.default.svc.cluster.local\n    endpoints: [{{address: \"{app}\"}}]\n    \
         tunnel: {{protocol: hbone, port: {}}}\n    tls: {{mode: istio_mutual, {}, subject_alt_names: [\"{SERVER}\"]}}\n",
        terminator.port(),
        certs.yaml()
    );
    // One worker: one pool, so the carriers counted are all of them.
    (Ringside::spawn_config(&config, listen, &["--workers", "1"]), listen)
}

#[test]
fn ringside_to_ringside_over_hbone_both_reporters_name_each_other_from_baggage() {
    let ca = Ca::new("mesh");
    let (server, terminator_addr) = terminator(&ca);
    let echo = echo_server();
    let (client, listen) = originator(&ca, terminator_addr, echo);
    let mut s = connect(listen);
    let sent = payload(3 << 20);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap(); // END_STREAM, then the echo's FIN
        })
    };
    let got = read_to_end(&mut s);
    writer.join().unwrap();
    assert!(got == sent, "echoed {} bytes of {}", got.len(), sent.len());
    let source = [
        ("reporter", "source"),
        ("source_workload", "reviews-v1"),
        ("destination_workload", "productpage-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "productpage"),
        ("destination_service", "productpage.default.svc.cluster.local"),
        ("destination_principal", SERVER),
    ];
    client.wait_for_value(CLOSED, &source, 1.0);
    assert_eq!(sum(&client.scrape(), SENT, &source), sent.len() as f64);
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "reviews-v1"),
        ("source_workload_namespace", "bookinfo"),
        ("source_canonical_service", "reviews"),
        ("source_principal", CLIENT),
        ("destination_workload", "productpage-v1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    server.wait_for_value(CLOSED, &destination, 1.0);
    assert_eq!(sum(&server.scrape(), RECEIVED, &destination), sent.len() as f64);
}

/// A TCP socket with a small receive buffer (so the peer's sends stall early), `bind`ed and
/// listening, or connected to `to`.
fn small_receive_buffer(to: Option<SocketAddr>) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    match to {
        Some(to) => s.connect(&to.into()).unwrap(),
        None => {
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
            s.listen(8).unwrap();
        }
    }
    s
}

/// Writes `data` then half-closes, on a thread; joined, it says the bytes were all taken.
fn write_and_close(
    mut s: std::net::TcpStream,
    data: Vec<u8>,
) -> std::thread::JoinHandle<std::net::TcpStream> {
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    std::thread::spawn(move || {
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s
    })
}

#[test]
fn a_local_socket_that_stops_reading_still_gets_every_byte_in_order_then_its_fin() {
    // Received DATA goes straight into the local socket while it takes it, and waits in the
    // stream's queue (in order, credited only once written) when it does not. Neither end
    // reads until the other wrote 5 MiB: more than the socket toward it can hold (4 MiB send
    // buffer at most, a 4 KiB receive buffer), so a part must wait in the queue.
    let ca = Ca::new("mesh");
    let (_server, terminator_addr) = terminator(&ca);
    let backend: std::net::TcpListener = small_receive_buffer(None).into();
    let (_client, listen) = originator(&ca, terminator_addr, backend.local_addr().unwrap());
    let s: std::net::TcpStream = small_receive_buffer(Some(listen)).into();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let request = payload(5 << 20);
    let writer = write_and_close(s.try_clone().unwrap(), request.clone());
    let (mut up, _) = backend.accept().unwrap();
    up.set_read_timeout(Some(DEADLINE)).unwrap();
    writer.join().unwrap();
    assert!(read_to_end(&mut up) == request, "the terminator's side got other bytes");
    let response: Vec<u8> = request.into_iter().rev().collect();
    write_and_close(up, response.clone()).join().unwrap();
    let mut s = s;
    assert!(read_to_end(&mut s) == response, "the originator's side got other bytes");
}

#[test]
fn connections_to_one_destination_share_pooled_tunnels_of_at_most_100_streams() {
    let ca = Ca::new("mesh");
    let (server, terminator_addr) = terminator(&ca);
    let echo = echo_server();
    let (_client, listen) = originator(&ca, terminator_addr, echo);
    // 150 connections open at once (each waits for its echo): two carriers, 100 + 50.
    let mut conns: Vec<_> = (0..150).map(|_| connect(listen)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("hello {i:03}").as_bytes()).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut got = [0u8; 9];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, format!("hello {i:03}").as_bytes());
    }
    let text =
        server.wait_for_scrape("150 tunnelled connections", DEADLINE, |t| sum(t, OPENED, &[]) >= 150.0);
    let handshakes = sum(&text, "ringside_tls_handshakes_total", &[("direction", "inbound")]);
    assert_eq!(handshakes, 2.0, "{text}");
}

/// A real Envoy from a static bootstrap, killed on drop; its log kept for a failed test.
struct StaticEnvoy {
    child: std::process::Child,
    admin: SocketAddr,
}

impl StaticEnvoy {
    fn start(bin: &str, certs: &Certs, bootstrap: &str, admin: SocketAddr) -> StaticEnvoy {
        let path = certs.path("envoy.yaml");
        std::fs::write(&path, bootstrap).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", "1", "--use-dynamic-base-id", "-l", "warning"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(certs.path("envoy.log")).unwrap())
            .spawn()
            .expect("spawn envoy");
        wait_for("Envoy's listeners", || {
            let (_, body) = http(admin, "GET", "/ready")?;
            (body.trim() == "LIVE").then_some(())
        });
        StaticEnvoy { child, admin }
    }

    /// The sum of Envoy's stats named `name`.
    fn stat(&self, name: &str) -> u64 {
        let (_, body) = http(self.admin, "GET", "/stats").unwrap_or_default();
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| *n == name)
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

fn socket_address(a: SocketAddr) -> String {
    format!("{{socket_address: {{address: {}, port_value: {}}}}}", a.ip(), a.port())
}

fn endpoints(a: SocketAddr) -> String {
    format!("endpoints: [{{lb_endpoints: [{{endpoint: {{address: {}}}}}]}}]", socket_address(a))
}

/// Envoy's TLS context: the workload certificate of `certs`, TLS 1.3, ALPN h2, the mesh root.
fn envoy_tls(certs: &Certs, san: Option<&str>) -> String {
    let san = san.map_or(String::new(), |s| {
        format!(", match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{s}\"}}}}]")
    });
    format!(
        "{{tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}, tls_certificates: [{{certificate_chain: {{filename: {}}}, \
         private_key: {{filename: {}}}}}], alpn_protocols: [h2], validation_context: {{trusted_ca: {{filename: {}}}{san}}}}}",
        certs.p("cert-chain.pem"),
        certs.p("key.pem"),
        certs.p("root-cert.pem")
    )
}

/// Envoy as an HBONE client: a plain listener whose tcp_proxy tunnels each connection as a
/// CONNECT to `target` over HTTP/2 with mTLS to `terminator`, with a reviews baggage.
fn envoy_originator(
    bin: &str,
    ca: &Ca,
    terminator: SocketAddr,
    target: SocketAddr,
) -> (StaticEnvoy, SocketAddr) {
    let certs = Certs::new("envoy-origin", ca, CLIENT);
    let (admin, listen) = (free_addr(), free_addr());
    let bootstrap = format!(
        r#"admin: {{address: {admin}}}
static_resources:
  listeners:
  - name: out
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: out
          cluster: hbone
          tunneling_config:
            hostname: "{target}"
            headers_to_add: [{{header: {{key: baggage, value: "{BAGGAGE}"}}}}]
  clusters:
  - name: hbone
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: hbone, {eps}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context: {tls}
"#,
        admin = socket_address(admin),
        listen = socket_address(listen),
        eps = endpoints(terminator),
        tls = envoy_tls(&certs, Some(SERVER)),
    );
    (StaticEnvoy::start(bin, &certs, &bootstrap, admin), listen)
}

/// Envoy as an HBONE server: mTLS (client certificates of the mesh), HTTP/2, CONNECT upgraded
/// to a TCP tunnel to `app`, answering with a details baggage.
fn envoy_terminator(bin: &str, ca: &Ca, app: SocketAddr) -> (StaticEnvoy, SocketAddr) {
    let certs = Certs::new("envoy-term", ca, SERVER);
    let (admin, listen) = (free_addr(), free_addr());
    let bootstrap = format!(
        r#"admin: {{address: {admin}}}
static_resources:
  listeners:
  - name: hbone
    address: {listen}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context: {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            response_headers_to_add:
            - header: {{key: baggage, value: "k8s.cluster.name=Kubernetes,k8s.namespace.name=details-ns,k8s.deployment.name=details-v1,service.name=details,service.version=v1"}}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route: {{cluster: app, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment: {{cluster_name: app, {eps}}}
"#,
        admin = socket_address(admin),
        listen = socket_address(listen),
        eps = endpoints(app),
        tls = envoy_tls(&certs, None),
    );
    (StaticEnvoy::start(bin, &certs, &bootstrap, admin), listen)
}

/// Send `sent` through `addr`, half-close, and read the echo to its end.
fn echo_through(addr: SocketAddr, sent: &[u8]) -> Vec<u8> {
    let mut s = common::connect(addr);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let sent = sent.to_vec();
        // A write refused (the proxy reset the connection) shows as a short echo.
        std::thread::spawn(move || {
            let _ = w.write_all(&sent);
            let _ = w.shutdown(std::net::Shutdown::Write);
        })
    };
    let got = read_to_end(&mut s);
    writer.join().unwrap();
    got
}

#[test]
fn a_real_envoy_tunnels_into_the_terminator_byte_exact_with_half_close_over_pooled_streams() {
    let Some(bin) = envoy::envoy_binary() else {
        skip(
            "a_real_envoy_tunnels_into_the_terminator_byte_exact_with_half_close_over_pooled_streams",
            "no Envoy binary",
        );
        return;
    };
    let ca = Ca::new("mesh");
    let (rs, terminator_addr) = terminator(&ca);
    let echo = echo_server();
    let (envoy, listen) = envoy_originator(&bin, &ca, terminator_addr, echo);
    let sent = payload(3 << 20);
    let got = echo_through(listen, &sent);
    assert!(got == sent, "echoed {} bytes of {}", got.len(), sent.len());
    let labels =
        [("reporter", "destination"), ("source_workload", "reviews-v1"), ("source_principal", CLIENT)];
    rs.wait_for_value(CLOSED, &labels, 1.0);
    assert_eq!(sum(&rs.scrape(), RECEIVED, &labels), sent.len() as f64);
    // 200 connections at once: streams over Envoy's pooled HTTP/2 connections.
    let mut conns: Vec<_> = (0..200).map(|_| common::connect(listen)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("hello {i:03}").as_bytes()).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut got = [0u8; 9];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, format!("hello {i:03}").as_bytes());
    }
    rs.wait_for_scrape("201 tunnelled connections", DEADLINE, |t| sum(t, OPENED, &[]) >= 201.0);
    let cx = envoy.stat("cluster.hbone.upstream_cx_total");
    let rq = envoy.stat("cluster.hbone.upstream_rq_total");
    assert_eq!(rq, 201);
    // Envoy honours the terminator's SETTINGS_MAX_CONCURRENT_STREAMS (100): 200 at once need 2.
    assert_eq!(cx, 2, "HTTP/2 connections for 201 streams");
}

#[test]
fn ringside_tunnels_into_a_real_envoy_terminator_byte_exact_with_half_close_and_its_baggage() {
    let Some(bin) = envoy::envoy_binary() else {
        skip(
            "ringside_tunnels_into_a_real_envoy_terminator_byte_exact_with_half_close_and_its_baggage",
            "no Envoy binary",
        );
        return;
    };
    let ca = Ca::new("mesh");
    let echo = echo_server();
    let (envoy, envoy_addr) = envoy_terminator(&bin, &ca, echo);
    let (rs, listen) = originator(&ca, envoy_addr, echo);
    let sent = payload(3 << 20);
    let got = echo_through(listen, &sent);
    assert!(got == sent, "echoed {} bytes of {}", got.len(), sent.len());
    let labels = [
        ("reporter", "source"),
        ("destination_workload", "details-v1"),
        // The namespace from the certificate first (SPEC §3), then the baggage.
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "details"),
        ("destination_principal", SERVER),
    ];
    rs.wait_for_value(CLOSED, &labels, 1.0);
    assert_eq!(sum(&rs.scrape(), SENT, &labels), sent.len() as f64);
    assert_eq!(envoy.stat("http.hbone.downstream_rq_total"), 1);
}

#[test]
fn a_real_envoy_clients_reset_reaches_the_backend_as_a_tcp_reset() {
    let Some(bin) = envoy::envoy_binary() else {
        skip("a_real_envoy_clients_reset_reaches_the_backend_as_a_tcp_reset", "no Envoy binary");
        return;
    };
    let ca = Ca::new("mesh");
    let (_rs, terminator_addr) = terminator(&ca);
    let (backend, conns) = manual_server();
    let (_envoy, listen) = envoy_originator(&bin, &ca, terminator_addr, backend);
    let mut client = common::connect(listen);
    client.write_all(b"ping").unwrap();
    let mut up = next_conn(&conns);
    let mut four = [0u8; 4];
    up.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ping");
    // The client resets: Envoy resets its stream, ringside resets the backend's socket.
    socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO)).unwrap();
    drop(client);
    let mut rest = Vec::new();
    let err = up.read_to_end(&mut rest).expect_err("a reset, not EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn on_drain_the_terminator_sends_goaway_and_streams_in_flight_go_on() {
    let ca = Ca::new("mesh");
    let (rs, listen) = terminator(&ca);
    let echo = echo_server();
    let certs = Certs::new("hbone-client", &ca, CLIENT);
    runtime().block_on(async {
        let mut client = h2_client(listen, client_tls(&certs, &["h2"])).await.unwrap();
        let (resp, mut send) = connect_stream(&mut client, &echo.to_string()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        assert_eq!(http(rs.admin, "POST", "/drain").map(|r| r.0), Some(200));
        // GOAWAY arrives (within a second): a new CONNECT is refused, by h2 or by the server.
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let refused = match connect_stream(&mut client.clone(), &echo.to_string()).await {
                Err(_) => true,
                Ok((resp, _)) => resp.status() != StatusCode::OK,
            };
            if refused {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no GOAWAY after POST /drain");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // The stream opened before goes on to its end.
        send.send_data(Bytes::from_static(b"after drain"), true).unwrap();
        assert_eq!(read_body(&mut body).await.unwrap(), b"after drain");
    });
}
