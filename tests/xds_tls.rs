//! SPEC §7 + §9: Istio mTLS configured over xDS, through the real binary, real sockets and
//! real TLS peers. An ADS server in the test process serves what istiod writes: outbound EDS
//! clusters with `tlsMode-istio`/`tlsMode-disabled` transport socket matches naming the
//! agent's SDS secrets `default` and `ROOTCA`, endpoints with `tlsMode: istio` metadata, and
//! virtualInbound-shaped listeners with a `tls` chain (DownstreamTlsContext, ALPN
//! `istio-peer-exchange`/`istio`) beside a `raw_buffer` one. ringside reads the secrets from
//! the files `xds.certificates` names (Istio's file-mounted certificates).

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pki.rs"]
mod pki;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;

use ads::{
    AdsServer, CLUSTER, LISTENER, Snapshot, assignment, common_tls, eds_cluster, istio_mutual, reply_to,
    static_cluster, tcp_listener, virtual_inbound, without_sidecar,
};
use common::{
    DEADLINE, Ringside, assert_closed_empty, echo_server, free_addr, istio_series, sum, tag_server, wait_for,
};
use pki::{Ca, Certs};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const REDIS: &str = "spiffe://cluster.local/ns/default/sa/redis";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const HOST: &str = "redis.default.svc.cluster.local";
const OUTBOUND: &str = "outbound|6379||redis.default.svc.cluster.local";
const INBOUND: &str = "inbound|6379||";
const ALPN_OUT: [&str; 2] = ["istio-peer-exchange", "istio"];
/// istiod's downstream ALPN for TCP with the metadata exchange.
const ALPN_IN: [&str; 3] = ["istio-peer-exchange", "h2", "http/1.1"];

fn node(workload: &str, app: &str) -> String {
    format!(
        "node:\n  workload_name: {workload}\n  namespace: default\n  labels: {{app: {app}, version: v1}}\n  \
         cluster_id: Kubernetes\n"
    )
}

/// ringside configured only by xDS, with the workload certificate files (or none).
fn sidecar(server: SocketAddr, node: &str, certs: Option<&Certs>) -> Ringside {
    let certificates = certs.map(|c| format!(", certificates: {{{}}}", c.yaml())).unwrap_or_default();
    let config = format!("{node}drain_timeout: 1s\nxds: {{address: {server}{certificates}}}\n");
    Ringside::spawn_config(&config, server, &["--workers", "2"])
}

/// Connect, send `ping`, read the backend's 2-byte tag and the echo; `None` if closed first.
fn tag_of(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"ping").ok()?;
    let mut got = [0u8; 6];
    s.read_exact(&mut got).ok()?;
    assert_eq!(&got[2..], b"ping", "the echo comes back whole");
    Some(String::from_utf8_lossy(&got[..2]).into_owned())
}

/// redis' inbound sidecar, configured statically (SPEC §7): strict mTLS in front of `app`.
fn static_inbound(certs: &Certs, app: SocketAddr) -> Ringside {
    let listen = free_addr();
    let config = format!(
        "{}listeners:\n  - name: inbound\n    listen: {listen}\n    direction: inbound\n    peer_exchange: alpn\n    \
         cluster: app\n    tls: {{mode: strict, {}}}\nclusters:\n  - name: app\n    service: {HOST}\n    \
         endpoints: [{{address: \"{app}\"}}]\n",
        node("redis-v1", "redis"),
        certs.yaml()
    );
    Ringside::spawn_config(&config, listen, &[])
}

/// productpage's outbound view of redis as istiod sends it: the EDS cluster with auto mTLS
/// expecting `sans`, its endpoints (`plain` without a sidecar), and a listener on `listen`.
fn outbound_snapshot(
    version: &str,
    listen: SocketAddr,
    sans: &[&str],
    meshed: SocketAddr,
    plain: Option<SocketAddr>,
) -> Snapshot {
    let workloads: Vec<(SocketAddr, &str)> =
        std::iter::once((meshed, "redis-v1;default;redis;v1;Kubernetes"))
            .chain(plain.map(|p| (p, "redis-legacy;default;redis;legacy;Kubernetes")))
            .collect();
    let mut cla = assignment(OUTBOUND, &workloads);
    if let Some(p) = plain {
        cla = without_sidecar(cla, p);
    }
    Snapshot {
        version: version.into(),
        clusters: vec![istio_mutual(
            eds_cluster(OUTBOUND, HOST, "default"),
            common_tls("default", "ROOTCA", sans, &ALPN_OUT),
        )],
        endpoints: vec![cla],
        listeners: vec![tcp_listener(&format!("0.0.0.0_{}", listen.port()), listen, &[(OUTBOUND, 1)])],
        secrets: vec![],
    }
}

/// Tags reached over `n` new connections (`--` for one closed before its tag).
fn tags(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n).map(|_| tag_of(addr).unwrap_or_else(|| "--".into())).collect()
}

#[test]
fn outbound_istio_mutual_speaks_mtls_to_endpoints_labelled_istio_and_plaintext_to_the_others() {
    let ca = Ca::new("mesh");
    let redis = static_inbound(&Certs::new("redis", &ca, REDIS), tag_server("T1"));
    let legacy = tag_server("P2");
    let listen = free_addr();
    let (server, requests) =
        AdsServer::serve(outbound_snapshot("1", listen, &[REDIS], redis.listen, Some(legacy)));
    let pp = Certs::new("pp", &ca, PRODUCTPAGE);
    let rs = sidecar(server.addr, &node("productpage-v1", "productpage"), Some(&pp));
    let mut all = vec![wait_for("the xDS listener", || tag_of(listen))];
    // Least-request over two endpoints: both are reached, each with its transport socket. A
    // TLS client to the plaintext backend, or plaintext to the strict one, gets no tag.
    all.extend(tags(listen, 8));
    let seen: BTreeSet<&str> = all.iter().map(String::as_str).collect();
    assert_eq!(seen, BTreeSet::from(["P2", "T1"]), "{:?}", rs.stderr_lines());
    let count = |tag: &str| all.iter().filter(|t| *t == tag).count() as f64;
    // The mTLS side: the inbound verified our workload certificate and the exchange ran.
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", REDIS),
        ("connection_security_policy", "mutual_tls"),
    ];
    let scrape = redis.wait_for_value("istio_tcp_connections_closed_total", &destination, count("T1"));
    assert_eq!(sum(&scrape, "ringside_exchange_total", &[("outcome", "metadata_added")]), count("T1"));
    let source =
        [("reporter", "source"), ("destination_workload", "redis-v1"), ("destination_principal", REDIS)];
    rs.wait_for_value("istio_tcp_connections_closed_total", &source, count("T1"));
    // The plaintext endpoint: its workload from istio.workload metadata, no principals.
    let legacy_labels = [
        ("reporter", "source"),
        ("destination_workload", "redis-legacy"),
        ("destination_principal", "unknown"),
    ];
    rs.wait_for_value("istio_tcp_connections_closed_total", &legacy_labels, count("P2"));

    // The agent rotates the workload certificate (atomic renames): new connections present
    // the new one, as with static certificates (SPEC §7).
    const ROTATED: &str = "spiffe://cluster.local/ns/default/sa/productpage-rotated";
    pp.install(&ca, ROTATED, &ca.pem, false);
    wait_for("the rotated certificate in use", || {
        let _ = tag_of(listen);
        let rotated = [("reporter", "destination"), ("source_principal", ROTATED)];
        (sum(&redis.scrape(), "istio_tcp_connections_opened_total", &rotated) >= 1.0).then_some(())
    });

    // A wrong SAN: the upstream is refused (UF); the plaintext endpoint is unaffected.
    server.push(outbound_snapshot(
        "2",
        listen,
        &["spiffe://cluster.local/ns/default/sa/other"],
        redis.listen,
        Some(legacy),
    ));
    assert!(reply_to(&requests, CLUSTER, "2").error_detail.is_none());
    wait_for("the new SAN in use", || {
        let t = tags(listen, 4);
        (t.contains(&"--".to_string()) && !t.contains(&"T1".to_string())).then_some(())
    });
    let after = tags(listen, 8);
    let seen: BTreeSet<&str> = after.iter().map(String::as_str).collect();
    assert_eq!(seen, BTreeSet::from(["--", "P2"]));
    let uf = [("reporter", "source"), ("response_flags", "UF"), ("destination_service", HOST)];
    let refused = after.iter().filter(|t| *t == "--").count() as f64;
    // Counted once the connection's task ends, which can be just after the client saw it close.
    wait_for("every refused connection counted as UF", || {
        (sum(&rs.scrape(), "istio_tcp_connections_opened_total", &uf) >= refused).then_some(())
    });
    // /config_dump shows which secrets and which files.
    let (_, dump) = common::http(rs.admin, "GET", "/config_dump").unwrap();
    for want in
        ["\"certificate\": \"default\"", "\"validation\": \"ROOTCA\"", "cert-chain.pem", "\"tlsMode-istio\""]
    {
        assert!(dump.contains(want), "{want} in {dump}");
    }
}

/// redis' inbound over xDS: a virtualInbound-shaped listener on `listen` to `app`.
fn inbound_snapshot(version: &str, listen: SocketAddr, app: SocketAddr, permissive: bool) -> Snapshot {
    Snapshot {
        version: version.into(),
        // istiod labels its inbound clusters with the service (`istio.services`) too.
        clusters: vec![cds_with_service(static_cluster(INBOUND, app))],
        endpoints: vec![],
        listeners: vec![virtual_inbound(
            "virtualInbound",
            listen,
            listen.port(),
            INBOUND,
            common_tls("default", "ROOTCA", &[], &ALPN_IN),
            permissive,
        )],
        secrets: vec![],
    }
}

fn cds_with_service(
    mut c: envoy_types::pb::envoy::config::cluster::v3::Cluster,
) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    c.metadata = eds_cluster(INBOUND, HOST, "default").metadata;
    c
}

/// productpage's outbound sidecar, static (SPEC §7): ISTIO_MUTUAL to `upstream`.
fn static_outbound(certs: &Certs, upstream: SocketAddr) -> Ringside {
    let listen = free_addr();
    let config = format!(
        "{}listeners:\n  - name: outbound\n    listen: {listen}\n    direction: outbound\n    peer_exchange: alpn\n    \
         cluster: redis\nclusters:\n  - name: redis\n    service: {HOST}\n    endpoints: [{{address: \"{upstream}\"}}]\n    \
         tls: {{mode: istio_mutual, {}, subject_alt_names: [\"{REDIS}\"]}}\n",
        node("productpage-v1", "productpage"),
        certs.yaml()
    );
    Ringside::spawn_config(&config, listen, &[])
}

#[test]
fn an_inbound_tls_chain_terminates_mtls_and_permissive_takes_plaintext_on_its_raw_buffer_chain() {
    let ca = Ca::new("mesh");
    let listen = free_addr();
    let (server, requests) = AdsServer::serve(inbound_snapshot("1", listen, tag_server("A1"), true));
    let rs = sidecar(server.addr, &node("redis-v1", "redis"), Some(&Certs::new("redis", &ca, REDIS)));
    let client = static_outbound(&Certs::new("pp", &ca, PRODUCTPAGE), listen);
    // mTLS with a mesh certificate: the tls chain, the exchange inside it.
    assert_eq!(wait_for("mTLS through the tls chain", || tag_of(client.listen)), "A1");
    let mtls = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("source_app", "productpage"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", REDIS),
        ("connection_security_policy", "mutual_tls"),
    ];
    let scrape = rs.wait_for_value("istio_tcp_connections_closed_total", &mtls, 1.0);
    assert_eq!(sum(&scrape, "ringside_exchange_total", &[("outcome", "metadata_added")]), 1.0);
    // The client saw redis' identity from the exchange too.
    client.wait_for_value(
        "istio_tcp_connections_closed_total",
        &[("reporter", "source"), ("destination_workload", "redis-v1"), ("destination_principal", REDIS)],
        1.0,
    );
    // PERMISSIVE: a plaintext client takes the raw_buffer chain, unauthenticated.
    assert_eq!(tag_of(listen).as_deref(), Some("A1"));
    let plain = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
        ("source_principal", "unknown"),
    ];
    rs.wait_for_value("istio_tcp_connections_closed_total", &plain, 1.0);

    // STRICT: only the tls chain. Plaintext finds no chain and is closed (NR); mTLS works.
    server.push(inbound_snapshot("2", listen, tag_server("A1"), false));
    assert!(reply_to(&requests, LISTENER, "2").error_detail.is_none());
    // Each worker takes the update on its own tick: until eight probes in a row are refused,
    // one may have landed on a worker still serving the PERMISSIVE config.
    let refused = || {
        let mut s = TcpStream::connect(listen).ok()?;
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(b"ping").ok()?;
        // Half-closed: under the old config the echo ends too, and the loop tries again.
        s.shutdown(std::net::Shutdown::Write).ok()?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got.is_empty().then_some(())
    };
    wait_for("plaintext refused by every worker", || (0..8).try_for_each(|_| refused()));
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"ping").unwrap();
    assert_closed_empty(&mut s, "plaintext under STRICT");
    let nr = [("reporter", "destination"), ("response_flags", "NR")];
    assert!(sum(&rs.scrape(), "istio_tcp_connections_opened_total", &nr) >= 1.0);
    assert_eq!(tag_of(client.listen).as_deref(), Some("A1"), "mTLS still served");
    // A client certificate from another CA is refused by the chain's context.
    let stranger = static_outbound(&Certs::new("stranger", &Ca::new("other"), PRODUCTPAGE), listen);
    assert_eq!(tag_of(stranger.listen), None);
    rs.wait_for_scrape("a refused handshake", DEADLINE, |s| sum(s, "ringside_tls_refused_total", &[]) >= 1.0);
}

#[test]
fn a_context_naming_an_unknown_sds_secret_is_nacked_and_the_last_good_config_keeps_serving() {
    let ca = Ca::new("mesh");
    let redis = static_inbound(&Certs::new("redis", &ca, REDIS), tag_server("T1"));
    let listen = free_addr();
    let (server, requests) = AdsServer::serve(outbound_snapshot("1", listen, &[REDIS], redis.listen, None));
    let rs = sidecar(
        server.addr,
        &node("productpage-v1", "productpage"),
        Some(&Certs::new("pp", &ca, PRODUCTPAGE)),
    );
    assert_eq!(wait_for("mTLS over xDS", || tag_of(listen)), "T1");
    // A DestinationRule with credentialName: istiod names a kubernetes:// secret.
    let mut bad = outbound_snapshot("2", listen, &[REDIS], redis.listen, None);
    bad.clusters[0] = istio_mutual(
        eds_cluster(OUTBOUND, HOST, "default"),
        common_tls("kubernetes://redis-client", "ROOTCA", &[REDIS], &ALPN_OUT),
    );
    server.push(bad);
    let nack = reply_to(&requests, CLUSTER, "2");
    let detail = nack.error_detail.expect("a NACK").message;
    assert!(detail.contains(&format!("Cluster/{OUTBOUND}")), "{detail}");
    assert!(detail.contains("SDS secret \"kubernetes://redis-client\": unknown"), "{detail}");
    assert_eq!(nack.version_info, "1", "the NACK carries the last good version");
    assert_eq!(tag_of(listen).as_deref(), Some("T1"), "the last good config keeps serving");
    assert_eq!(sum(&rs.scrape(), "ringside_xds_updates_rejected_total", &[("type", "Cluster")]), 1.0);

    // Without xds.certificates, TLS is refused too: NACKed, never served as plaintext.
    let (server, requests) =
        AdsServer::serve(outbound_snapshot("1", free_addr(), &[REDIS], redis.listen, None));
    let config = format!("{}xds: {{address: {}}}\n", node("productpage-v1", "productpage"), server.addr);
    let path = std::env::temp_dir().join(format!("ringside-xds-tls-nocerts-{}.yaml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let _rs = std::process::Command::new(common::bin())
        .args(["run", "--config", &path.display().to_string(), "--admin", &free_addr().to_string()])
        .args(["--metrics", "off", "--health", "off", "--workers", "1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let nack = reply_to(&requests, CLUSTER, "1");
    let detail = nack.error_detail.expect("a NACK").message;
    assert!(
        detail.contains(&format!("Cluster/{OUTBOUND}")) && detail.contains("xds.certificates"),
        "{detail}"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The istio_tcp_* series of a scrape, sorted; `UH` ones (a connection before the endpoints
/// arrived) left out.
fn series(scrape: &str) -> Vec<String> {
    istio_series(scrape).into_iter().filter(|l| l.contains("response_flags=\"-\"")).collect()
}

#[test]
fn two_sidecars_configured_only_by_xds_give_the_static_pairs_istio_tcp_series() {
    let ca = Ca::new("mesh");
    let (pp, redis) = (Certs::new("pp", &ca, PRODUCTPAGE), Certs::new("redis", &ca, REDIS));
    let app = echo_server();
    let payload = b"0123456789".repeat(1000);
    // Until one connection went through: an xDS listener can be in place before its
    // cluster's endpoints (then `UH`), and a connection can fail on a loaded machine (`UF`:
    // CI once saw it while that sidecar's worker showed a 3.7 s tick gap). Failed attempts are reported with
    // their flag and left out of the comparison below, which is of the connection that went
    // through.
    let exchange = |client: SocketAddr| {
        wait_for("a connection through both sidecars", || {
            let mut s = TcpStream::connect(client).ok()?;
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.write_all(&payload).ok()?;
            s.shutdown(std::net::Shutdown::Write).ok()?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).ok()?;
            (got == payload).then_some(())
        })
    };
    let done = [("reporter", "destination"), ("connection_security_policy", "mutual_tls")];
    let settled = |rs: &Ringside, reporter: &str| {
        let through = [("reporter", reporter), ("response_flags", "-")];
        rs.wait_for_value("istio_tcp_connections_closed_total", &through, 1.0);
        rs.wait_for_scrape("every attempt closed and the bytes folded", DEADLINE, |s| {
            let all = [("reporter", reporter)];
            sum(s, "istio_tcp_connections_closed_total", &all)
                == sum(s, "istio_tcp_connections_opened_total", &all)
                && sum(s, "istio_tcp_received_bytes_total", &through) == payload.len() as f64
        })
    };

    // Static: SPEC §7's two sidecars.
    let inbound = static_inbound(&redis, app);
    let outbound = static_outbound(&pp, inbound.listen);
    exchange(outbound.listen);
    let static_series = (series(&settled(&outbound, "source")), series(&settled(&inbound, "destination")));
    inbound.wait_for_value("istio_tcp_connections_closed_total", &done, 1.0);

    // xDS: the same two sidecars, each from its own ADS stream.
    let (in_listen, out_listen) = (free_addr(), free_addr());
    let (tx, _requests) = mpsc::channel();
    let in_server = AdsServer::start(free_addr(), inbound_snapshot("1", in_listen, app, false), tx.clone());
    let in_rs = sidecar(in_server.addr, &node("redis-v1", "redis"), Some(&redis));
    // Bound once we cannot bind it: no probe connection, which would be counted.
    let bound = |a: SocketAddr| TcpListener::bind(a).is_err().then_some(());
    wait_for("the xDS inbound listener bound", || bound(in_listen));
    let mut snapshot = outbound_snapshot("1", out_listen, &[REDIS], in_listen, None);
    // The endpoint's istio.workload is what istiod writes for redis-v1.
    snapshot.endpoints[0] = assignment(OUTBOUND, &[(in_listen, "redis-v1;default;redis;v1;Kubernetes")]);
    let out_server = AdsServer::start(free_addr(), snapshot, tx);
    let out_rs = sidecar(out_server.addr, &node("productpage-v1", "productpage"), Some(&pp));
    wait_for("the xDS outbound listener bound", || bound(out_listen));
    exchange(out_listen);
    let xds_series = (series(&settled(&out_rs, "source")), series(&settled(&in_rs, "destination")));
    assert_eq!(xds_series.0, static_series.0, "reporter=source");
    assert_eq!(xds_series.1, static_series.1, "reporter=destination");
}

/// `ringside iptables --apply ARGS` in `ns`, as Istio's init container runs it.
fn capture_rules(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, common::bin(), "iptables", "--apply"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables --apply in {ns}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Write `text` into a fresh temporary YAML file readable by the sidecar's uid 1337.
fn sidecar_admin_yaml(node: &str, rest: &str) -> String {
    format!(
        "{node}workers: 1\nmetrics: {{listen: 127.0.0.1:15090}}\nadmin: {{listen: 127.0.0.1:15000}}\n\
         health: {{listen: 'off'}}\n{rest}"
    )
}

#[test]
fn a_captured_virtual_inbound_over_xds_terminates_mesh_mtls_and_permissive_passes_plaintext() {
    use netns::{B_IP, B_IP2, Pods, Sidecar, connect_in, echo_server_in, unavailable};
    if unavailable("xds_tls::captured_virtual_inbound").is_some() {
        return;
    }
    let ca = Ca::new("mesh");
    let (pp, redis) = (Certs::new("pp", &ca, PRODUCTPAGE), Certs::new("redis", &ca, REDIS));
    let pods = Pods::new();
    // A: outbound capture, except pod B's second address (the plaintext client's way in).
    capture_rules(&pods.a, &["--exclude-cidrs", &format!("{B_IP2}/32")]);
    capture_rules(&pods.b, &[]);
    let _app = echo_server_in(&pods.b, "0.0.0.0:9080");
    // B: configured only by xDS over a unix socket (as Istio's agent serves it).
    let inbound = |version: &str, permissive: bool| {
        let listen: SocketAddr = "0.0.0.0:15006".parse().unwrap();
        let mut l = virtual_inbound(
            "virtualInbound",
            listen,
            9080,
            "inbound|9080||",
            common_tls("default", "ROOTCA", &[], &ALPN_IN),
            permissive,
        );
        l.use_original_dst = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        Snapshot {
            version: version.into(),
            clusters: vec![cds_with_service(static_cluster(
                "inbound|9080||",
                "127.0.0.1:9080".parse().unwrap(),
            ))],
            endpoints: vec![],
            listeners: vec![l],
            secrets: vec![],
        }
    };
    let (tx, requests) = mpsc::channel();
    let server = AdsServer::start_for_sidecar("xds-tls", inbound("1", true), tx);
    let b = Sidecar::spawn(
        &pods.b,
        &sidecar_admin_yaml(
            &node("redis-v1", "redis"),
            &format!("xds: {{address: \"{}\", certificates: {{{}}}}}\n", server.unix_address(), redis.yaml()),
        ),
    );
    let a = Sidecar::spawn(
        &pods.a,
        &sidecar_admin_yaml(
            &node("productpage-v1", "productpage"),
            &format!(
                "listeners:\n  - {{name: virtual-outbound, listen: 0.0.0.0:15001, direction: outbound, \
                 peer_exchange: alpn, capture: outbound}}\nclusters:\n  - name: redis\n    service: {HOST}\n    \
                 endpoints: [{{address: \"{B_IP}:9080\"}}]\n    \
                 tls: {{mode: istio_mutual, {}, subject_alt_names: [\"{REDIS}\"]}}\n",
                pp.yaml()
            ),
        ),
    );
    let echo = |to: &str| {
        let mut s = connect_in(&pods.a, to).ok()?;
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(b"ping").ok()?;
        s.shutdown(std::net::Shutdown::Write).ok()?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        Some(got)
    };
    // mTLS: A's capture speaks ISTIO_MUTUAL to B_IP:9080; B's capture takes it to 15006,
    // where the tls chain (by original destination port 9080 and ALPN) terminates it. (B
    // binds its xDS listener on its first tick: until then A's upstream connect fails.)
    let first =
        wait_for("mTLS through both captures", || echo(&format!("{B_IP}:9080")).filter(|g| !g.is_empty()));
    assert_eq!(first, b"ping");
    let mtls = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", REDIS),
        ("destination_service", HOST),
        ("connection_security_policy", "mutual_tls"),
    ];
    let scrape = b.wait_for_scrape("the mTLS connection counted", |t| {
        sum(t, "istio_tcp_connections_closed_total", &mtls) == 1.0
    });
    assert_eq!(sum(&scrape, "ringside_exchange_total", &[("outcome", "metadata_added")]), 1.0);
    a.wait_for_scrape("the source side", |t| {
        sum(t, "istio_tcp_connections_closed_total", &[("destination_principal", REDIS)]) == 1.0
    });
    // PERMISSIVE: plaintext (not captured in A) takes the raw_buffer chain.
    assert_eq!(echo(&format!("{B_IP2}:9080")).as_deref(), Some(&b"ping"[..]));
    let plain = [("reporter", "destination"), ("connection_security_policy", "none")];
    b.wait_for_scrape("the plaintext connection counted", |t| {
        sum(t, "istio_tcp_connections_closed_total", &plain) == 1.0
    });
    // STRICT: plaintext finds no chain and is closed (NR); mTLS still goes through.
    server.push(inbound("2", false));
    assert!(reply_to(&requests, LISTENER, "2").error_detail.is_none());
    wait_for("plaintext refused", || echo(&format!("{B_IP2}:9080")).filter(|g| g.is_empty()));
    b.wait_for_scrape("NR counted", |t| {
        sum(t, "istio_tcp_connections_opened_total", &[("response_flags", "NR")]) >= 1.0
    });
    assert_eq!(echo(&format!("{B_IP}:9080")).as_deref(), Some(&b"ping"[..]));
    drop((a, b));
    drop(pods);
    drop(server);
}

#[test]
fn ringside_and_a_real_envoy_speak_istio_mutual_both_ways_over_xds_with_secrets_verified() {
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(
            "ringside_and_a_real_envoy_speak_istio_mutual_both_ways",
            "no Envoy binary (perf/fetch-envoy.sh failed)",
        );
        return;
    };
    let ca = Ca::new("mesh");
    let (pp, redis) = (Certs::new("pp", &ca, PRODUCTPAGE), Certs::new("redis", &ca, REDIS));
    // Envoy: the same virtualInbound chain, its secrets over ADS from this server (as the
    // agent's SDS would serve them), without Istio's own filters. ALPN `istio` only: an
    // upstream Envoy has no metadata exchange to answer `istio-peer-exchange` with.
    let envoy_listen = free_addr();
    // Envoy's outbound: to a ringside inbound (below), DestinationRule-style ISTIO_MUTUAL.
    let (envoy_out, ringside_in) = (free_addr(), free_addr());
    const TO_RINGSIDE: &str = "outbound|9080||reviews.default.svc.cluster.local";
    let to_ringside = ads::with_upstream_tls(
        static_cluster(TO_RINGSIDE, ringside_in),
        // ALPN `istio` only: it cannot answer the exchange that `istio-peer-exchange` asks for.
        ads::secrets_over_ads(common_tls("default", "ROOTCA", &[REVIEWS], &["istio"])),
    );
    let mut theirs = ads::without_istio_extensions(Snapshot {
        version: "1".into(),
        clusters: vec![static_cluster(INBOUND, tag_server("E1")), to_ringside],
        endpoints: vec![],
        listeners: vec![
            tcp_listener(&format!("0.0.0.0_{}", envoy_out.port()), envoy_out, &[(TO_RINGSIDE, 1)]),
            virtual_inbound(
                "virtualInbound",
                envoy_listen,
                envoy_listen.port(),
                INBOUND,
                ads::secrets_over_ads(common_tls("default", "ROOTCA", &[], &["istio"])),
                false,
            ),
        ],
        secrets: vec![],
    });
    // Its tls chain takes only the SNI istiod writes for the cluster: ringside must send it.
    let sni = format!("outbound_.6379_._.{HOST}");
    theirs.listeners[1].filter_chains[0].filter_chain_match.as_mut().unwrap().server_names = vec![sni];
    theirs.secrets =
        ads::workload_secrets(&redis.p("cert-chain.pem"), &redis.p("key.pem"), &redis.p("root-cert.pem"));
    let (tx_e, _req_e) = mpsc::channel();
    let ads_e = AdsServer::start(free_addr(), theirs, tx_e);
    let envoy = envoy::Envoy::start(&bin, ads_e.addr);
    // ringside: configured only by xDS, ISTIO_MUTUAL to Envoy's address (tlsMode istio).
    let listen = free_addr();
    let (server, _requests) = AdsServer::serve(outbound_snapshot("1", listen, &[REDIS], envoy_listen, None));
    let rs = sidecar(server.addr, &node("productpage-v1", "productpage"), Some(&pp));
    assert_eq!(wait_for("ringside to Envoy over mTLS", || tag_of(listen)), "E1");
    // Envoy completed a handshake that required our client certificate; we verified its SAN.
    let stat = |name: &str| {
        let (_, body) = common::http(envoy.admin, "GET", "/stats?filter=ssl").unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with("listener.") && l.contains(&format!(".ssl.{name}:")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(stat("handshake") >= 1, "Envoy counts the handshake");
    assert_eq!(stat("no_certificate"), 0);
    let source =
        [("reporter", "source"), ("destination_principal", REDIS), ("source_principal", PRODUCTPAGE)];
    let scrape = rs.wait_for_value("istio_tcp_connections_closed_total", &source, 1.0);
    assert_eq!(sum(&scrape, "ringside_exchange_total", &[("outcome", "alpn_protocol_not_found")]), 1.0);
    // A certificate from another CA (trusting the mesh root itself) is refused by Envoy.
    // (over xDS too: Envoy's chain wants istiod's SNI)
    let stranger_listen = free_addr();
    let (tx_s, _req_s) = mpsc::channel();
    let ads_s = AdsServer::start(
        free_addr(),
        outbound_snapshot("1", stranger_listen, &[REDIS], envoy_listen, None),
        tx_s,
    );
    let other = Certs::with_root("stranger", &Ca::new("other"), PRODUCTPAGE, &ca.pem, false);
    let _stranger = sidecar(ads_s.addr, &node("productpage-v1", "productpage"), Some(&other));
    wait_for("the stranger's listener bound", || TcpListener::bind(stranger_listen).is_err().then_some(()));
    // (Tried until Envoy saw it: the stranger's endpoints may reach its workers last.)
    wait_for("Envoy to refuse the stranger's certificate", || {
        assert_eq!(tag_of(stranger_listen), None, "never relayed");
        (stat("fail_verify_error") >= 1).then_some(())
    });

    // The other way: Envoy's TLS client (BoringSSL's ClientHello, its ALPN) to ringside's
    // xDS tls chain (STRICT), which verifies Envoy's certificate; Envoy checks our SAN.
    let (tx_in, _req_in) = mpsc::channel();
    let ads_in =
        AdsServer::start(free_addr(), inbound_snapshot("1", ringside_in, tag_server("R1"), false), tx_in);
    let inbound =
        sidecar(ads_in.addr, &node("reviews-v1", "reviews"), Some(&Certs::new("reviews", &ca, REVIEWS)));
    assert_eq!(wait_for("Envoy to ringside over mTLS", || tag_of(envoy_out)), "R1");
    let destination = [
        ("reporter", "destination"),
        ("source_principal", REDIS),
        ("destination_principal", REVIEWS),
        ("connection_security_policy", "mutual_tls"),
    ];
    let scrape = inbound.wait_for_value("istio_tcp_connections_closed_total", &destination, 1.0);
    assert_eq!(
        sum(&scrape, "ringside_exchange_total", &[("outcome", "alpn_protocol_not_found")]),
        1.0,
        "ALPN istio"
    );
    drop(envoy);
}
