//! SPEC §11 at test scale: a sidecar in a network namespace (capture rules as `ringside
//! iptables --apply` writes them, uid 1337) configured over xDS with an Istio-shaped mesh of
//! 2,000 services (`common/istio_mesh.rs`), whose service 0 is five echo servers in a second
//! namespace. Without root, `ip`, `iptables` or namespaces, each test prints a SKIP line and
//! returns: skipped, never passed silently.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/istio_mesh.rs"]
mod istio_mesh;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;

use common::{CLOSED, OPENED, RECEIVED, Rng, SENT, bin, sum, tag_server_on, wait_for};
use istio_mesh::Mesh;
use netns::{B_IP, B_IP2, Pods, Sidecar, connect_in, echo_server_in, in_ns, unavailable};

/// Services in the tests' mesh: enough that anything quadratic shows, few enough for CI.
const SERVICES: usize = 2_000;

/// Capture rules in `ns`, as Istio's init container writes them.
fn apply(ns: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, bin(), "iptables", "--apply"])
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables --apply in {ns}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Pod A with capture rules and a sidecar fed `snapshot` over xDS (returned once /ready),
/// pod B for the backends. Fields drop in order: the sidecar stops before the namespaces go.
struct Scale {
    sidecar: Sidecar,
    server: ads::AdsServer,
    requests: mpsc::Receiver<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    pods: Pods,
}

impl Scale {
    fn start(pods: Pods, snapshot: ads::Snapshot) -> Scale {
        apply(&pods.a);
        let (tx, requests) = mpsc::channel();
        let server = ads::AdsServer::start_for_sidecar(&format!("scale-{}", pods.a), snapshot, tx);
        let sidecar = Sidecar::spawn(
            &pods.a,
            &format!(
                "node:\n  workload_name: client-v1\n  namespace: default\n  labels: {{app: client, version: v1}}\n\
                 workers: 1\nmetrics: {{listen: 127.0.0.1:15090}}\nadmin: {{listen: 127.0.0.1:15000}}\n\
                 health: {{listen: 'off'}}\nxds: {{address: \"{}\"}}\n",
                server.unix_address()
            ),
        );
        Scale { sidecar, server, requests, pods }
    }
}

/// Five echo servers in pod B (service 0's endpoints) and the channels their accepted
/// connections' peers arrive on.
fn backends(pods: &Pods) -> (Vec<SocketAddr>, Vec<mpsc::Receiver<SocketAddr>>) {
    (0..5)
        .map(|k| {
            let at = format!("{B_IP}:{}", 9101 + k);
            let seen = echo_server_in(&pods.b, &at);
            (at.parse::<SocketAddr>().unwrap(), seen)
        })
        .unzip()
}

fn mesh(backends: Vec<SocketAddr>) -> Mesh {
    Mesh { services: SERVICES, capture: "0.0.0.0:15001".parse().unwrap(), backends, tls: None }
}

/// One connection from pod A to `to`: `payload` written, the echo read to its end.
fn echo(pods: &Pods, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = connect_in(&pods.a, &to.to_string()).expect("connect through the capture");
    s.write_all(payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back
}

/// Service 1 moving between two real endpoints in pod B, each answering with its tag
/// (`old`, `new`): a connection to service 1 says which push the worker serves. Odd
/// versions put it at `old`, even ones at `new`.
struct MovingService {
    mesh: Mesh,
    old: SocketAddr,
    new: SocketAddr,
}

impl MovingService {
    fn start(pods: &Pods, backends: Vec<SocketAddr>) -> MovingService {
        let (old, new): (SocketAddr, SocketAddr) =
            (format!("{B_IP2}:9201").parse().unwrap(), format!("{B_IP2}:9202").parse().unwrap());
        for (at, tag) in [(old, "old"), (new, "new")] {
            tag_server_on(in_ns(&pods.b, move || TcpListener::bind(at).unwrap()), tag);
        }
        MovingService { mesh: mesh(backends), old, new }
    }

    /// Where version `v` puts service 1, and the tag a connection there reads.
    fn at(&self, v: usize) -> (SocketAddr, [u8; 3]) {
        if v % 2 == 1 { (self.old, *b"old") } else { (self.new, *b"new") }
    }

    /// Service 1's assignment at version `v`.
    fn assignment(&self, v: usize) -> ads::eds::ClusterLoadAssignment {
        let to = self.at(v).0;
        ads::without_sidecar(
            ads::assignment(&istio_mesh::cluster_name(1), &[(to, "svc-1-v1;ns-0;svc-1;v1;Kubernetes")]),
            to,
        )
    }

    /// The whole mesh at version `v`.
    fn snapshot(&self, v: usize) -> ads::Snapshot {
        let mut s = self.mesh.snapshot(&v.to_string());
        s.endpoints[1] = self.assignment(v);
        s
    }

    /// The tag service 1 answers with from pod A, if it answers.
    fn tag(pods: &Pods) -> Option<[u8; 3]> {
        let mut s = connect_in(&pods.a, &istio_mesh::vip(1).to_string()).ok()?;
        let mut b = [0u8; 3];
        s.read_exact(&mut b).ok()?;
        Some(b)
    }
}

#[test]
fn after_a_full_push_of_a_mesh_connections_to_a_service_are_byte_exact_and_balanced() {
    if unavailable("xds_scale::full_push").is_some() {
        return;
    }
    let pods = Pods::new();
    let (addrs, seen) = backends(&pods);
    let scale = Scale::start(pods, mesh(addrs).snapshot("1"));
    let mut rng = Rng(29);
    let total = 250;
    for _ in 0..total {
        let len = rng.range(1, 3000);
        let payload = rng.bytes(len);
        assert_eq!(echo(&scale.pods, istio_mesh::vip(0), &payload), payload);
    }
    let counts: Vec<usize> = seen.iter().map(|rx| rx.try_iter().count()).collect();
    assert_eq!(counts.iter().sum::<usize>(), total, "{counts:?}");
    // Least request (istiod's lb_policy) over sequential connections: each endpoint in turn.
    for c in &counts {
        assert!((40..=60).contains(c), "unbalanced: {counts:?}");
    }
}

#[test]
fn an_endpoint_push_of_one_cluster_keeps_every_other_clusters_live_connections() {
    if unavailable("xds_scale::eds_push_keeps_state").is_some() {
        return;
    }
    let pods = Pods::new();
    let (addrs, seen) = backends(&pods);
    // Service 1 is real too: one endpoint tagged `old`, moved by the push to one tagged `new`.
    let (old, new): (SocketAddr, SocketAddr) =
        (format!("{B_IP2}:9201").parse().unwrap(), format!("{B_IP2}:9202").parse().unwrap());
    for (at, tag) in [(old, "old"), (new, "new")] {
        tag_server_on(in_ns(&pods.b, move || TcpListener::bind(at).unwrap()), tag);
    }
    let m = mesh(addrs);
    let one = |at: SocketAddr| {
        let cla = ads::assignment(&istio_mesh::cluster_name(1), &[(at, "svc-1-v1;ns-0;svc-1;v1;Kubernetes")]);
        ads::without_sidecar(cla, at)
    };
    let mut first = m.snapshot("1");
    first.endpoints[1] = one(old);
    let scale = Scale::start(pods, first);
    let tag = |pods: &Pods| {
        let mut s = connect_in(&pods.a, &istio_mesh::vip(1).to_string()).ok()?;
        let mut b = [0u8; 3];
        s.read_exact(&mut b).ok()?;
        Some(b)
    };
    assert_eq!(tag(&scale.pods), Some(*b"old"));

    // Two long-lived connections to service 0: on two of its five endpoints.
    let hold = |pods: &Pods| {
        let mut s = connect_in(&pods.a, &istio_mesh::vip(0).to_string()).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    let held: Vec<TcpStream> = (0..2).map(|_| hold(&scale.pods)).collect();
    let busy: Vec<usize> = (0..5).filter(|&k| seen[k].try_iter().count() > 0).collect();
    assert_eq!(busy.len(), 2, "two endpoints hold the two connections");

    // Service 1's endpoints change alone, as istiod pushes it.
    let mut second = m.snapshot("2");
    second.endpoints[1] = one(new);
    scale.server.push_endpoints(second, &[&istio_mesh::cluster_name(1)]);
    let ack = ads::reply_to(&scale.requests, ads::ENDPOINTS, "2");
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    wait_for("service 1 at its new endpoint", || (tag(&scale.pods) == Some(*b"new")).then_some(()));

    // Service 0 kept its live counts: three more connections go to the three idle endpoints.
    let more: Vec<TcpStream> = (0..3).map(|_| hold(&scale.pods)).collect();
    let counts: Vec<usize> = seen.iter().map(|rx| rx.try_iter().count()).collect();
    for k in 0..5 {
        let expected = usize::from(!busy.contains(&k));
        assert_eq!(counts[k], expected, "endpoint {k}: {counts:?} (busy before the push: {busy:?})");
    }
    drop((held, more));
}

#[test]
fn an_endpoint_change_pushed_alone_or_in_a_whole_snapshot_is_acked_and_served_and_the_rest_stays() {
    if unavailable("xds_scale::push_assignment").is_some() {
        return;
    }
    let pods = Pods::new();
    let (addrs, _seen) = backends(&pods);
    let service = MovingService::start(&pods, addrs);
    let scale = Scale::start(pods, service.snapshot(1));
    let tag = MovingService::tag;
    wait_for("service 1 served", || (tag(&scale.pods) == Some(*b"old")).then_some(()));
    // Pushes alternate: a whole snapshot whose one assignment differs, then the one
    // assignment patched into the served snapshot (`push_assignment`, what the bench's push
    // window uses so that its own cost does not crowd the clients).
    for v in 2..=9 {
        let (_, retired) = if v % 2 == 0 {
            scale.server.push_endpoints(service.snapshot(v), &[&istio_mesh::cluster_name(1)])
        } else {
            scale.server.push_assignment(&v.to_string(), service.assignment(v))
        };
        let ack = ads::reply_to(&scale.requests, ads::ENDPOINTS, &v.to_string());
        assert!(ack.error_detail.is_none(), "push {v}: {:?}", ack.error_detail);
        wait_for("the worker serving the push", || (tag(&scale.pods) == Some(service.at(v).1)).then_some(()));
        drop(retired);
    }
    // Service 0 is still served after the patched pushes: its assignment was shared, not lost.
    assert_eq!(echo(&scale.pods, istio_mesh::vip(0), b"kept"), b"kept");
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn unchanged_parts_are_shared_between_generations_and_a_live_connection_pins_only_what_it_uses() {
    if unavailable("xds_scale::generations").is_some() {
        return;
    }
    let pods = Pods::new();
    let (addrs, _seen) = backends(&pods);
    let service = MovingService::start(&pods, addrs);
    let scale = Scale::start(pods, service.snapshot(1));
    let tag = MovingService::tag;
    let generations = |text: &str| {
        text.lines()
            .filter_map(common::parse_line)
            .find(|(name, _, _)| name == "ringside_config_generations")
            .map(|(_, _, v)| v)
    };
    let alive = |n: usize| move |text: &str| generations(text) == Some(n as f64);
    scale.sidecar.wait_for_scrape("one generation alive", alive(1));
    let hold = |pods: &Pods| {
        let mut s = connect_in(&pods.a, &istio_mesh::vip(0).to_string()).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    let pid = scale.sidecar.pid();
    let before = rss_kib(pid);
    // A connection held from each generation, accepted while that generation was served.
    let pushes = 8;
    let mut held = vec![hold(&scale.pods)];
    for v in 2..=pushes + 1 {
        scale.server.push_endpoints(service.snapshot(v), &[&istio_mesh::cluster_name(1)]);
        let ack = ads::reply_to(&scale.requests, ads::ENDPOINTS, &v.to_string());
        assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
        wait_for("the worker serving the push", || (tag(&scale.pods) == Some(service.at(v).1)).then_some(()));
        held.push(hold(&scale.pods));
    }
    // None of them pins its generation: the old ones are freed while they live (before
    // SPEC §11 was met, each held connection kept its whole generation alive: 9 here).
    let text = scale.sidecar.wait_for_scrape("only the current generation alive", alive(1));
    let grown = rss_kib(pid).saturating_sub(before);
    println!(
        "{} connections held from {} generations, 1 generation alive; RSS grew {grown} KiB",
        held.len(),
        pushes + 1
    );
    assert!(grown < 4096, "RSS grew {grown} KiB over {pushes} pushes with held connections\n{text}");
    // They keep relaying, byte-exact, and close counted once each with every byte.
    let mut rng = Rng(11);
    let mut bytes = held.len();
    for s in &mut held {
        let len = rng.range(1, 3000);
        let payload = rng.bytes(len);
        s.write_all(&payload).unwrap();
        let mut back = vec![0u8; len];
        s.read_exact(&mut back).unwrap();
        assert!(back == payload, "a held connection echoed other bytes");
        bytes += len;
    }
    for mut s in held.drain(..) {
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after the echo", rest.len());
    }
    let service = [("destination_service", "svc-0.ns-0.svc.cluster.local")];
    let n = (pushes + 1) as f64;
    let text =
        scale.sidecar.wait_for_scrape("the held connections closed", |t| sum(t, CLOSED, &service) == n);
    assert_eq!(sum(&text, OPENED, &service), n, "{text}");
    assert_eq!(sum(&text, RECEIVED, &service), bytes as f64, "{text}");
    assert_eq!(sum(&text, SENT, &service), bytes as f64, "{text}");
    assert_eq!(generations(&text), Some(1.0), "{text}");
}

/// The proxy's workload in the mTLS test, and its two clients.
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const TLS_CLIENT: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const HBONE_CLIENT: &str = "spiffe://cluster.local/ns/default/sa/details";

/// A client TLS config with `certs`, checking the server's SPIFFE id, offering `alpn`.
fn client_tls(certs: &pki::Certs, alpn: &[&str]) -> std::sync::Arc<rustls::ClientConfig> {
    pki::client_config(certs, SERVER, alpn)
}

/// One HBONE stream held open: what is sent on it, what comes back.
type Stream = (h2::SendStream<bytes::Bytes>, h2::RecvStream);

/// Send `payload` on `stream` and read as many bytes back (the upstream echoes).
async fn stream_echo(stream: &mut Stream, payload: &[u8]) -> Vec<u8> {
    stream.0.send_data(bytes::Bytes::copy_from_slice(payload), false).unwrap();
    let mut back = Vec::new();
    while back.len() < payload.len() {
        let chunk = tokio::time::timeout(common::DEADLINE, stream.1.data()).await.unwrap().unwrap().unwrap();
        let _ = stream.1.flow_control().release_capacity(chunk.len());
        back.extend_from_slice(&chunk);
    }
    back
}

#[test]
fn an_mtls_connection_and_an_hbone_carrier_held_across_pushes_pin_only_what_they_use() {
    use rustls::pki_types::ServerName;
    let ca = pki::Ca::new("mesh");
    let server_certs = pki::Certs::new("scale-server", &ca, SERVER);
    let app = common::echo_server();
    let m = Mesh { services: 100, capture: common::free_addr(), backends: vec![app], tls: None };
    let (server, requests) = ads::AdsServer::serve(m.snapshot("1"));
    let (mtls, hbone) = (common::free_addr(), common::free_addr());
    let tls = server_certs.yaml();
    let rs = common::Ringside::spawn_config(
        &format!(
            "node: {{workload_name: ratings-v1, namespace: default}}\nlisteners:\n  \
             - {{name: mtls, listen: \"{mtls}\", direction: inbound, peer_exchange: alpn, cluster: app, \
             tls: {{mode: strict, {tls}}}}}\n  \
             - {{name: hbone, listen: \"{hbone}\", direction: inbound, tunnel: hbone, tls: {{mode: strict, {tls}}}}}\n\
             clusters:\n  - {{name: app, service: ratings.default.svc.cluster.local, endpoints: [{{address: \"{app}\"}}]}}\n\
             xds: {{address: {}}}\n",
            server.addr
        ),
        mtls,
        &[],
    );
    wait_for("the mesh served", || TcpStream::connect(m.capture).ok());
    let alive = |t: &str| sum(t, "ringside_config_generations", &[]) == 1.0;
    rs.wait_for_scrape("one generation alive", common::DEADLINE, alive);
    let tls_config = client_tls(&pki::Certs::new("scale-reviews", &ca, TLS_CLIENT), &[]);
    let open_tls = || {
        let tcp = TcpStream::connect(mtls).unwrap();
        tcp.set_read_timeout(Some(common::DEADLINE)).unwrap();
        let conn = rustls::ClientConnection::new(tls_config.clone(), ServerName::IpAddress(mtls.ip().into()));
        let mut s = rustls::StreamOwned::new(conn.unwrap(), tcp);
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    // One HBONE carrier for the whole test; a CONNECT stream on it per generation.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let hbone_config = client_tls(&pki::Certs::new("scale-details", &ca, HBONE_CLIENT), &["h2"]);
    let mut carrier = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(hbone).await.unwrap();
        let name = ServerName::IpAddress(hbone.ip().into());
        let tls = tokio_rustls::TlsConnector::from(hbone_config).connect(name, tcp).await.unwrap();
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        send.ready().await.unwrap()
    });
    let mut open_stream = || -> Stream {
        rt.block_on(async {
            let req =
                http::Request::builder().method(http::Method::CONNECT).uri(app.to_string()).body(()).unwrap();
            let (resp, send) = carrier.send_request(req, false).unwrap();
            let resp = tokio::time::timeout(common::DEADLINE, resp).await.unwrap().unwrap();
            assert_eq!(resp.status(), http::StatusCode::OK);
            let mut stream = (send, resp.into_body());
            assert_eq!(stream_echo(&mut stream, b"x").await, b"x");
            stream
        })
    };
    let (mut conns, mut streams) = (vec![open_tls()], vec![open_stream()]);
    // After each push (an endpoint change of one cluster), once the workers serve it, only
    // its generation is alive while connections and streams from every earlier one live.
    let pushes = 5;
    for v in 2..=pushes + 1 {
        let mut next = m.snapshot(&v.to_string());
        next.endpoints[1] = m.assignment(1, v as u64);
        server.push_endpoints(next, &[&istio_mesh::cluster_name(1)]);
        let ack = ads::reply_to(&requests, ads::ENDPOINTS, &v.to_string());
        assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
        rs.wait_for_scrape(
            &format!("push {v} served, the earlier generations freed"),
            common::DEADLINE,
            alive,
        );
        conns.push(open_tls());
        streams.push(open_stream());
    }
    // Every one still relays byte-exact, and closes counted once with every byte.
    let mut rng = Rng(12);
    let (mut tls_bytes, mut hbone_bytes) = (conns.len(), streams.len());
    for s in &mut conns {
        let len = rng.range(1, 3000);
        let payload = rng.bytes(len);
        s.write_all(&payload).unwrap();
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).unwrap();
        assert!(back == payload, "a held mTLS connection echoed other bytes");
        tls_bytes += payload.len();
    }
    for s in &mut streams {
        let len = rng.range(1, 3000);
        let payload = rng.bytes(len);
        assert!(rt.block_on(stream_echo(s, &payload)) == payload, "a held HBONE stream echoed other bytes");
        hbone_bytes += payload.len();
    }
    for mut s in conns.drain(..) {
        s.conn.send_close_notify();
        let _ = s.flush();
    }
    rt.block_on(async {
        for (mut send, mut recv) in streams.drain(..) {
            send.send_data(bytes::Bytes::new(), true).unwrap();
            while let Some(chunk) = tokio::time::timeout(common::DEADLINE, recv.data()).await.unwrap() {
                assert!(chunk.unwrap().is_empty(), "bytes after the echo");
            }
        }
    });
    let n = (pushes + 1) as f64;
    for (client, bytes) in [(TLS_CLIENT, tls_bytes), (HBONE_CLIENT, hbone_bytes)] {
        let labels = [("source_principal", client), ("connection_security_policy", "mutual_tls")];
        let text = rs.wait_for_scrape(&format!("{client}'s connections closed"), common::DEADLINE, |t| {
            sum(t, CLOSED, &labels) == n
        });
        assert_eq!(sum(&text, OPENED, &labels), n, "{text}");
        assert_eq!(sum(&text, RECEIVED, &labels), bytes as f64, "{text}");
        assert_eq!(sum(&text, SENT, &labels), bytes as f64, "{text}");
    }
    drop(carrier);
}

#[test]
fn a_push_of_the_whole_mesh_never_holds_a_workers_event_loop() {
    // No capture here: the push is what is measured, and the moved capture listener says
    // when the workers have it.
    let (first, second) = (common::free_addr(), common::free_addr());
    let m = Mesh { services: SERVICES, capture: first, backends: vec![common::echo_server()], tls: None };
    let (server, requests) = ads::AdsServer::serve(m.snapshot("1"));
    let rs = common::Ringside::spawn_config(
        &format!(
            "node: {{workload_name: client-v1, namespace: default}}\nxds: {{address: {}}}\n",
            server.addr
        ),
        first,
        &[],
    );
    // Every service's endpoints move, and virtualOutbound moves to another port.
    let moved = Mesh { capture: second, ..m.clone() };
    let mut next = moved.snapshot("2");
    for (i, cla) in next.endpoints.iter_mut().enumerate().skip(1) {
        *cla = moved.assignment(i, 1);
    }
    server.push(next);
    for t in [ads::CLUSTER, ads::ENDPOINTS, ads::LISTENER] {
        let ack = ads::reply_to(&requests, t, "2");
        assert!(ack.error_detail.is_none(), "{t}: {:?}", ack.error_detail);
    }
    wait_for("the workers serving the push", || TcpStream::connect(second).ok());
    let text = rs.scrape();
    let gaps: Vec<f64> = text
        .lines()
        .filter_map(common::parse_line)
        .filter(|(name, _, _)| name == "ringside_worker_tick_gap_max_seconds")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(gaps.len(), 2, "one gauge per worker:\n{text}");
    // Ticks are 100 ms apart; SPEC §11's target is 50 ms beyond that at 10,000 services in a
    // release build. This debug build on a shared machine gets a generous bound.
    println!("longest tick gaps during a {SERVICES}-service push: {gaps:?} s");
    for g in gaps {
        assert!(g < 0.35, "a worker's event loop was held {g} s: {text}");
    }
}

/// The most resident memory process `pid` has had, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn peers_sending_64_kib_label_values_cannot_grow_memory_beyond_the_bound() {
    use common::read_exact;
    let server = common::Ringside::spawn(
        common::echo_server(),
        "inbound",
        &["--peer-exchange", "always", "--max-preamble", "256KiB", "--workload-name", "db-v1"],
    );
    let peers = 400u32;
    let before = peak_rss_kib(server.pid());
    for i in 0..peers {
        // Each peer different: unbounded, every one would be a label set of 128 KiB.
        let long = format!("{i:06}{}", "w".repeat(64 << 10));
        let peer = ringside::exchange::NodeMetadata {
            workload_name: long.clone(),
            namespace: "default".into(),
            labels: [("app".to_string(), long)].into(),
            ..Default::default()
        };
        let mut c = common::connect(server.listen);
        c.write_all(&ringside::exchange::encode(&peer)).unwrap();
        c.write_all(b"x").unwrap();
        // The sidecar's own preamble, then the echo.
        let header = read_exact(&mut c, 8);
        let len = u32::from_be_bytes(header[4..8].try_into().unwrap()) as usize;
        read_exact(&mut c, len);
        assert_eq!(read_exact(&mut c, 1), b"x");
    }
    let s = server.wait_for_value(OPENED, &[("source_workload", "unknown")], f64::from(peers));
    assert_eq!(sum(&s, "ringside_peer_values_replaced_total", &[]), f64::from(2 * peers), "{s}");
    let grown = peak_rss_kib(server.pid()).saturating_sub(before);
    // 400 label sets of 128 KiB would be 50 MiB; the bound keeps them all at one.
    println!("RSS grew {grown} KiB over {peers} peers sending 64 KiB label values");
    assert!(grown < 16 << 10, "RSS grew {grown} KiB");
}

#[test]
fn twenty_clients_scraping_in_a_loop_at_the_full_label_budget_leave_rss_bounded_and_probes_answering() {
    use common::{OPENED, sum};
    let server = common::Ringside::spawn(
        common::echo_server(),
        "inbound",
        &["--peer-exchange", "always", "--workload-name", "db-v1", "--max-label-sets", "2000"],
    );
    // 2,000 label sets (the budget): one peer workload each.
    for i in 0..2_000 {
        let peer = ringside::exchange::NodeMetadata {
            workload_name: format!("client-{i}"),
            namespace: "default".into(),
            ..Default::default()
        };
        let mut c = common::connect(server.listen);
        c.write_all(&ringside::exchange::encode(&peer)).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        common::read_to_end(&mut c);
    }
    let s = server.wait_for_scrape("every label set", common::DEADLINE, |s| sum(s, OPENED, &[]) == 2_000.0);
    let body = s.len();
    let before = peak_rss_kib(server.pid());
    let metrics = server.metrics.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..20)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                // Bounded: until told, at most 200 scrapes each.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                    if let Some((200, text)) = common::http(metrics, "GET", "/stats/prometheus") {
                        assert!(text.len() >= body / 2, "a whole scrape");
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Meanwhile the readiness probe answers, and connections are served.
    for _ in 0..20 {
        assert_eq!(common::http(server.admin, "GET", "/ready").map(|r| r.0), Some(200));
        let mut c = common::connect(server.listen);
        c.write_all(b"x").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert!(!common::read_to_end(&mut c).is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes: usize = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
    let peak = peak_rss_kib(server.pid());
    // At most two renders at once, each body held until written: the peak does not grow with
    // the scrapers. (Measured: 20 bodies' worth, 103 MiB, when a turn ended with its render;
    // 50-56 MiB with the turn held through the write, the allocator's per-thread caches
    // included.)
    let grown = peak.saturating_sub(before);
    println!("{scrapes} scrapes of {body} bytes; RSS grew {grown} KiB");
    assert!(grown < 15 * body as u64 / 1024, "RSS grew {grown} KiB with 20 scrapers of a {body}-byte body");
}
