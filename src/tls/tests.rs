//! Tests of `crate::tls`: contexts built from files and reloaded, identities, cipher suites,
//! session tickets and resumption, the cache of verified chains, and the record layer
//! (`stream`) over real sockets.

use super::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

struct Ca {
    cert: rcgen::Certificate,
    params: CertificateParams,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::OrganizationName, name);
    let key = KeyPair::generate().unwrap();
    Ca { cert: p.self_signed(&key).unwrap(), params: p, key }
}

fn leaf(ca: &Ca, spiffe: &str, key: KeyPair) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn rbac_principal_names_are_every_uri_san_then_dns_sans_then_the_rfc2253_subject() {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![
        SanType::DnsName("reviews.default.svc".try_into().unwrap()),
        SanType::URI("spiffe://cluster.local/ns/default/sa/first".try_into().unwrap()),
        SanType::URI("spiffe://cluster.local/ns/default/sa/second".try_into().unwrap()),
    ];
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "mesh");
    p.distinguished_name.push(rcgen::DnType::CommonName, "reviews");
    let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
    assert_eq!(
        peer_names(cert.der()),
        [
            "spiffe://cluster.local/ns/default/sa/first",
            "spiffe://cluster.local/ns/default/sa/second",
            "reviews.default.svc",
            "CN=reviews,O=mesh",
        ]
    );
    assert!(peer_names(&CertificateDer::from(vec![0x30, 0x03])).is_empty(), "not a certificate");
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ringside-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A mesh server config for ratings, its files in `dir`.
fn ratings_server(dir: &Path, mesh: &Ca) -> Arc<ServerConfig> {
    let built = build(&files(dir, mesh, RATINGS, KeyPair::generate().unwrap()), &Role::mesh_server());
    built.unwrap().server.unwrap()
}

/// productpage's client files, in a temporary directory named `name`.
fn productpage_files(name: &str, mesh: &Ca) -> Files {
    let id = "spiffe://cluster.local/ns/default/sa/productpage";
    files(&tmpdir(name), mesh, id, KeyPair::generate().unwrap())
}

/// A ratings server config and productpage's client files under one new mesh root, in
/// temporary directories named after `name`.
fn ratings_server_and_files(name: &str) -> (Arc<ServerConfig>, Files) {
    let mesh = ca("mesh");
    let server = ratings_server(&tmpdir(name), &mesh);
    (server, productpage_files(&format!("{name}-client"), &mesh))
}

/// [`ratings_server_and_files`] with productpage's mesh client config built (expecting ratings).
fn ratings_server_and_client(name: &str) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let (server, cf) = ratings_server_and_files(name);
    let client = build(&cf, &Role::mesh_client(vec![RATINGS.into()], None)).unwrap().client.unwrap();
    (server, client)
}

fn files(dir: &Path, ca: &Ca, id: &str, key: KeyPair) -> Files {
    let (cert, key) = leaf(ca, id, key);
    Files {
        cert_chain: write(dir, "cert-chain.pem", &cert),
        private_key: write(dir, "key.pem", &key),
        root_cert: write(dir, "root-cert.pem", &ca.cert.pem()),
    }
}

const RATINGS: &str = "spiffe://cluster.local/ns/default/sa/ratings";

#[test]
fn certificates_follow_their_files_across_a_config_swap_and_new_ones_load_naming_the_resource() {
    let dir = tmpdir("rekey");
    let f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    let tls = |chain: &Path| {
        format!(
            "{{mode: strict, cert_chain: {}, private_key: {}, root_cert: {}}}",
            chain.display(),
            f.private_key.display(),
            f.root_cert.display()
        )
    };
    let yaml = |listeners: &[&str]| {
        let mut y = String::from("listeners:\n");
        for l in listeners {
            y += &format!("  - {{name: {l}, listen: 127.0.0.1:0, direction: inbound, cluster: app");
            y += &match *l {
                "bad" => format!(", tls: {}}}\n", tls(&dir.join("missing.pem"))),
                l if l.starts_with("tls") => format!(", tls: {}}}\n", tls(&f.cert_chain)),
                _ => "}\n".into(),
            };
        }
        y + "clusters:\n  - {name: app, endpoints: [{address: 127.0.0.1:1}]}\n"
    };
    let parse = |y: &str| crate::config::Config::parse(y, "t.yaml").unwrap();
    let certs = Certs::load(&parse(&yaml(&["plain", "tls-a"]))).unwrap();
    // tls-a moves from index 1 to 0; tls-b asks for the same files: one slot for both.
    let next = Certs::next(&certs, &parse(&yaml(&["tls-a", "new", "tls-b"]))).unwrap();
    let old = certs.listeners[1].as_ref().unwrap();
    assert!(Arc::ptr_eq(old, next.listeners[0].as_ref().unwrap()), "tls-a keeps its slot");
    assert!(Arc::ptr_eq(old, next.listeners[2].as_ref().unwrap()), "same files, same slot");
    assert!(next.listeners[1].is_none());
    assert_eq!(next.slots().len(), 1);
    let e = Certs::next(&next, &parse(&yaml(&["tls-a", "bad"]))).err().unwrap().to_string();
    assert!(e.starts_with("Listener/bad: ") && e.contains("missing.pem"), "{e}");
}

#[test]
fn clusters_of_one_identity_share_its_key_and_each_keeps_its_own_expected_sans() {
    let dir = tmpdir("shared-key");
    let f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    let cluster = |name: &str, san: &str| {
        format!(
            "  - {{name: {name}, endpoints: [{{address: 127.0.0.1:1}}], tls: {{mode: istio_mutual, cert_chain: {}, private_key: {}, root_cert: {}, subject_alt_names: [{san}]}}}}\n",
            f.cert_chain.display(),
            f.private_key.display(),
            f.root_cert.display()
        )
    };
    let yaml = format!(
        "clusters:\n{}{}",
        cluster("a", "spiffe://cluster.local/ns/default/sa/a"),
        cluster("b", "spiffe://cluster.local/ns/default/sa/b")
    );
    let certs = Certs::load(&crate::config::Config::parse(&yaml, "t.yaml").unwrap()).unwrap();
    let client = |i: usize| certs.clusters[i].as_ref().unwrap().current().client.clone().unwrap();
    let (a, b) = (client(0), client(1));
    assert!(!Arc::ptr_eq(&a, &b), "a config per cluster: each verifies its own SANs");
    let key = |c: &ClientConfig| c.client_auth_cert_resolver.resolve(&[], &[]).unwrap();
    assert!(Arc::ptr_eq(&key(&a), &key(&b)), "one certificate and key for the identity");
    assert!(Arc::ptr_eq(&a.crypto_provider().clone(), &b.crypto_provider().clone()));
    let sans = |i: usize| match &certs.clusters[i].as_ref().unwrap().role {
        Role::Client { subject_alt_names, .. } => subject_alt_names.clone(),
        Role::Server { .. } => unreachable!(),
    };
    assert_eq!(sans(0), ["spiffe://cluster.local/ns/default/sa/a"]);
    assert_eq!(sans(1), ["spiffe://cluster.local/ns/default/sa/b"]);
}

/// A config of `n` ISTIO_MUTUAL clusters on one set of files, each expecting its own SAN
/// (`.../sa/s<i>`), their endpoint at 127.0.0.1:`port`.
fn mtls_clusters(f: &Files, n: usize, port: u16) -> String {
    let mut yaml = String::from("clusters:\n");
    for i in 0..n {
        yaml += &format!(
            "  - {{name: c{i}, endpoints: [{{address: 127.0.0.1:{port}}}], tls: {{mode: istio_mutual, cert_chain: {}, private_key: {}, root_cert: {}, subject_alt_names: [spiffe://cluster.local/ns/default/sa/s{i}]}}}}\n",
            f.cert_chain.display(),
            f.private_key.display(),
            f.root_cert.display()
        );
    }
    yaml
}

#[test]
fn a_reload_round_looks_at_each_set_of_files_once_and_at_the_slots_only_when_they_changed() {
    let dir = tmpdir("round");
    let mesh = ca("mesh");
    let f = files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap());
    // 1,000 clusters of one identity, each with its own SAN: 1,000 slots, one file set.
    let yaml = mtls_clusters(&f, 1000, 1);
    let certs = Certs::load(&crate::config::Config::parse(&yaml, "t.yaml").unwrap()).unwrap();
    let groups = certs.groups();
    assert_eq!(groups.len(), 1, "one file set");
    assert_eq!(groups[0].slots.len(), 1000);
    assert!(Arc::ptr_eq(&groups, &certs.groups()), "grouped once per Certs");
    let mut round = Round::default();
    assert_eq!(round.run(certs.groups()), 1000, "new groups: each slot is looked at");
    assert_eq!(round.run(certs.groups()), 0, "unchanged files: no slot is looked at");
    // A rotation (a new key and certificate) reaches every slot in the next round.
    let before = certs.clusters[999].as_ref().unwrap().current();
    let other = "spiffe://cluster.local/ns/prod/sa/reviews";
    let (cert, key) = leaf(&mesh, other, KeyPair::generate().unwrap());
    std::fs::write(&f.cert_chain, cert).unwrap();
    std::fs::write(&f.private_key, key).unwrap();
    assert_eq!(round.run(certs.groups()), 1000);
    for slot in certs.clusters.iter().flatten() {
        assert_eq!(slot.current().local_principal.as_deref(), Some(other));
    }
    assert!(!Arc::ptr_eq(&before, &certs.clusters[999].as_ref().unwrap().current()));
    assert_eq!(round.run(certs.groups()), 0);
}

#[test]
fn an_endpoint_change_keeps_the_reload_groups_so_a_round_looks_at_no_slot() {
    let dir = tmpdir("groups-kept");
    let f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    let config = |port: u16| crate::config::Config::parse(&mtls_clusters(&f, 100, port), "t.yaml").unwrap();
    let certs = Certs::load(&config(1)).unwrap();
    let mut round = Round::default();
    assert_eq!(round.run(certs.groups()), 100, "new groups: each slot is looked at");
    // Other endpoints, the same TLS: the same slots, so the same groups.
    let next = Certs::next(&certs, &config(2)).unwrap();
    assert!(Arc::ptr_eq(&certs.groups(), &next.groups()), "the groups are kept");
    assert_eq!(round.run(next.groups()), 0, "no slot is looked at");
    // A cluster's TLS changed: grouped again.
    let mut changed = config(2);
    let mut c = (*changed.clusters[7]).clone();
    c.tls.as_mut().unwrap().subject_alt_names = vec!["spiffe://cluster.local/ns/x/sa/y".into()];
    changed.clusters[7] = Arc::new(c);
    let after = Certs::next(&next, &changed).unwrap();
    assert!(!Arc::ptr_eq(&next.groups(), &after.groups()), "a new slot: new groups");
}

#[test]
fn local_principal_is_the_spiffe_uri_san_of_our_certificate() {
    let dir = tmpdir("principal");
    let f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    let c = build(&f, &Role::mesh_server()).unwrap();
    assert_eq!(c.local_principal.as_deref(), Some(RATINGS));
    let c = build(&f, &Role::mesh_client(vec![], None)).unwrap();
    assert_eq!(c.client.unwrap().alpn_protocols, vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()]);
}

/// Convert a key file with `openssl` (in tests/deps.sh): PKCS#1 and SEC1 are what
/// openssl's `-traditional` writes, as older Istio CAs and cert-manager do.
fn openssl_convert(kind: &str, path: &Path) -> String {
    let out = std::process::Command::new("openssl")
        // `rsa` writes PKCS#8 unless told -traditional; `ec` writes SEC1 by default.
        .args(if kind == "rsa" { vec!["rsa", "-traditional", "-in"] } else { vec![kind, "-in"] })
        .arg(path)
        .output()
        .expect("openssl (tests/deps.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A `key` builds a server config as rcgen writes it (PKCS#8), and again once `openssl
/// <command>` rewrote it in its traditional form (a PEM section named `section`).
fn key_loads_in_pkcs8_and_its_traditional_form(name: &str, key: KeyPair, command: &str, section: &str) {
    let f = files(&tmpdir(name), &ca("mesh"), RATINGS, key);
    build(&f, &Role::mesh_server()).unwrap(); // PKCS#8, as rcgen writes it
    let traditional = openssl_convert(command, &f.private_key);
    assert!(traditional.contains(&format!("BEGIN {section}")), "{traditional}");
    std::fs::write(&f.private_key, traditional).unwrap();
    build(&f, &Role::mesh_server()).unwrap();
}

#[test]
fn rsa_keys_load_in_pkcs1_and_pkcs8() {
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    key_loads_in_pkcs8_and_its_traditional_form("rsa", key, "rsa", "RSA PRIVATE KEY");
}

#[test]
fn ec_keys_load_in_sec1_and_pkcs8() {
    key_loads_in_pkcs8_and_its_traditional_form("ec", KeyPair::generate().unwrap(), "ec", "EC PRIVATE KEY");
}

#[test]
fn a_bad_file_is_an_error_naming_it() {
    let dir = tmpdir("bad");
    let mut f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    std::fs::write(&f.private_key, "garbage").unwrap();
    let e = build(&f, &Role::mesh_server()).err().unwrap().to_string();
    assert!(e.starts_with(&f.private_key.display().to_string()), "{e}");
    f.cert_chain = dir.join("missing.pem");
    let e = build(&f, &Role::mesh_server()).err().unwrap().to_string();
    assert!(e.contains("missing.pem") && !e.contains('\n'), "{e}");
}

#[test]
fn a_failed_reload_keeps_the_previous_config() {
    let dir = tmpdir("reload");
    let mesh = ca("mesh");
    let f = files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap());
    let slot = Slot::new(f.clone(), Role::mesh_server()).unwrap();
    let before = slot.current();
    std::fs::write(&f.cert_chain, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    assert!(slot.reload().is_err());
    assert!(Arc::ptr_eq(&before, &slot.current()));
    let other = "spiffe://cluster.local/ns/prod/sa/reviews";
    let (cert, key) = leaf(&mesh, other, KeyPair::generate().unwrap());
    std::fs::write(&f.cert_chain, cert).unwrap();
    std::fs::write(&f.private_key, key).unwrap();
    slot.reload().unwrap();
    assert_eq!(slot.current().local_principal.as_deref(), Some(other));
}

/// Run a handshake in memory between `client` and `server`, then deliver the server's
/// post-handshake messages (tickets); returns whether the session was resumed.
fn handshake_in_memory(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> bool {
    complete_in_memory(client_in_memory(client), server)
}

/// A client connection to ratings: its ClientHello (and the ticket it takes) is made now.
fn client_in_memory(client: &Arc<ClientConfig>) -> rustls::Connection {
    let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
    rustls::ClientConnection::new(client.clone(), name).unwrap().into()
}

/// `handshake_in_memory` for a client connection made earlier.
fn complete_in_memory(mut c: rustls::Connection, server: &Arc<ServerConfig>) -> bool {
    let mut s: rustls::Connection = rustls::ServerConnection::new(server.clone()).unwrap().into();
    let mut wire = Vec::new();
    let mut pump = |a: &mut rustls::Connection, b: &mut rustls::Connection| {
        wire.clear();
        while a.wants_write() {
            a.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            b.read_tls(&mut rd).unwrap();
            b.process_new_packets().unwrap();
        }
    };
    while c.is_handshaking() || s.is_handshaking() {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
    }
    pump(&mut s, &mut c);
    assert_eq!(c.handshake_kind(), s.handshake_kind());
    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

#[test]
fn the_server_resumes_with_stateless_tickets_whatever_the_number_of_clients() {
    // rustls' default server cache holds 256 sessions (2 per TLS 1.3 handshake): with
    // tickets the server keeps nothing, so the first of 300 clients still resumes.
    let (server, cf) = ratings_server_and_files("tickets");
    let role = Role::mesh_client(vec![RATINGS.into()], None);
    let clients: Vec<_> = (0..300).map(|_| build(&cf, &role).unwrap().client.unwrap()).collect();
    for c in &clients {
        assert!(!handshake_in_memory(c, &server), "a first handshake is a full one");
    }
    assert!(handshake_in_memory(&clients[0], &server), "the first client's ticket resumes");
}

#[test]
fn the_sha256_suites_run_ringsides_hkdf_and_the_server_seals_tickets_with_aes_gcm() {
    // The provider's TLS 1.3 SHA-256 suites carry `tls::hkdf`, AES-256-GCM-SHA384 aws-lc-rs'.
    let own: &dyn rustls::crypto::tls13::Hkdf = &super::hkdf::HkdfSha256;
    for suite in &provider().cipher_suites {
        let Some(s) = suite.tls13() else { continue };
        let sha256 = s.common.suite != rustls::CipherSuite::TLS13_AES_256_GCM_SHA384;
        assert_eq!(std::ptr::addr_eq(s.hkdf_provider, own), sha256, "{:?}", s.common.suite);
    }
    // A mesh server's tickets: a 12-byte nonce and a 16-byte tag around the session (RFC 5077's
    // construction adds a 16-byte key name, a 16-byte IV, CBC padding and a 32-byte MAC).
    let (server, cf) = ratings_server_and_files("gcm-tickets");
    let ticket = server.ticketer.encrypt(&[7; 100]).unwrap();
    assert_eq!(ticket.len(), 12 + 100 + 16);
    assert_eq!(server.ticketer.decrypt(&ticket).as_deref(), Some(&[7u8; 100][..]));
    // And a client of the same provider handshakes and resumes with them.
    let client = build(&cf, &Role::mesh_client(vec![RATINGS.into()], None)).unwrap().client.unwrap();
    assert!(!handshake_in_memory(&client, &server), "the first handshake is a full one");
    assert!(handshake_in_memory(&client, &server), "the second resumes");
}

/// A client session store that counts the TLS 1.3 tickets it is given.
#[derive(Debug)]
struct CountTickets {
    inner: rustls::client::ClientSessionMemoryCache,
    given: std::sync::atomic::AtomicUsize,
}

impl CountTickets {
    fn new() -> Self {
        CountTickets { inner: rustls::client::ClientSessionMemoryCache::new(4), given: Default::default() }
    }

    fn take_count(&self) -> usize {
        self.given.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

impl rustls::client::ClientSessionStore for CountTickets {
    fn set_kx_hint(&self, n: ServerName<'static>, g: rustls::NamedGroup) {
        self.inner.set_kx_hint(n, g)
    }
    fn kx_hint(&self, n: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(n)
    }
    fn set_tls12_session(&self, n: ServerName<'static>, v: rustls::client::Tls12ClientSessionValue) {
        self.inner.set_tls12_session(n, v)
    }
    fn tls12_session(&self, n: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(n)
    }
    fn remove_tls12_session(&self, n: &ServerName<'static>) {
        self.inner.remove_tls12_session(n)
    }
    fn insert_tls13_ticket(&self, n: ServerName<'static>, v: rustls::client::Tls13ClientSessionValue) {
        self.given.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.insert_tls13_ticket(n, v)
    }
    fn take_tls13_ticket(&self, n: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(n)
    }
}

#[test]
fn the_server_sends_one_ticket_per_handshake_full_or_resumed() {
    let (server, cf) = ratings_server_and_files("one-ticket");
    let built = build(&cf, &Role::mesh_client(vec![RATINGS.into()], None)).unwrap().client.unwrap();
    let store = Arc::new(CountTickets::new());
    let mut config = (*built).clone();
    config.resumption = rustls::client::Resumption::store(store.clone());
    let client = Arc::new(config);
    assert!(!handshake_in_memory(&client, &server), "the first handshake is a full one");
    assert_eq!(store.take_count(), 1, "tickets after a full handshake");
    for _ in 0..3 {
        assert!(handshake_in_memory(&client, &server), "each handshake resumes with the last ticket");
        assert_eq!(store.take_count(), 1, "tickets after a resumed handshake");
    }
}

#[test]
fn twelve_connections_started_together_all_resume_once_twelve_tickets_came_back() {
    // rustls' own cache keeps 8 tickets per server name: 4 of these 12 were full handshakes.
    let (server, client) = ratings_server_and_client("ticket-shards");
    // Twelve started together with no ticket are full handshakes and bring one ticket each.
    let first: Vec<_> = (0..12).map(|_| client_in_memory(&client)).collect();
    assert!(first.into_iter().all(|c| !complete_in_memory(c, &server)));
    let together: Vec<_> = (0..12).map(|_| client_in_memory(&client)).collect();
    let resumed = together.into_iter().map(|c| complete_in_memory(c, &server));
    assert_eq!(resumed.filter(|&r| r).count(), 12);
}

#[test]
fn after_a_short_read_the_next_fill_waits_for_readiness_instead_of_reading_again() {
    use std::io::Write;
    use stream::{Fill, TlsStream};
    let (server, client) = ratings_server_and_client("drained");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
        tls.write_all(b"one").unwrap();
        tls.flush().unwrap();
        wait.recv().unwrap();
        tls.write_all(b"two").unwrap();
        tls.flush().unwrap();
        wait.recv().unwrap(); // open until the server is done
    });
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_nonblocking(true).unwrap();
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
    rt.block_on(async move {
        let pool = crate::conn::BufferPool::default();
        let tls = TlsStream::server(monoio::net::TcpStream::from_std(tcp).unwrap(), server).unwrap();
        tls.handshake(&pool).await.unwrap();
        assert_eq!(tls.fill(&pool).await.unwrap(), Fill::Data);
        let mut got = Vec::with_capacity(16);
        tls.take_into(&mut got);
        assert_eq!(got, b"one"); // a short read: the socket had nothing more
        go.send(()).unwrap();
        tls.readable().await.unwrap(); // "two" waits in the socket
        assert_eq!(tls.try_fill(&pool).unwrap(), Fill::WouldBlock, "no recv right after a short one");
        assert_eq!(tls.try_fill(&pool).unwrap(), Fill::Data, "the next call reads");
        got.clear();
        tls.take_into(&mut got);
        assert_eq!(got, b"two");
        go.send(()).unwrap();
    });
    peer.join().unwrap();
}

#[test]
fn a_workers_handshakes_with_the_same_peer_certificate_read_its_principal_once() {
    use stream::TlsStream;
    let (server, client) = ratings_server_and_client("principals");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        for _ in 0..2 {
            let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
            let conn = rustls::ClientConnection::new(client.clone(), name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock).unwrap();
            }
        }
    });
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
    let principals = Principals::default();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let server = server.clone();
        seen.push(rt.block_on(async {
            let pool = crate::conn::BufferPool::default();
            let tls = TlsStream::server(monoio::net::TcpStream::from_std(tcp).unwrap(), server).unwrap();
            tls.handshake(&pool).await.unwrap();
            tls.peer_principal(&principals).unwrap()
        }));
    }
    peer.join().unwrap();
    assert_eq!(&*seen[0], "spiffe://cluster.local/ns/default/sa/productpage");
    assert!(Arc::ptr_eq(&seen[0], &seen[1]), "the second handshake read the certificate again");
    assert_eq!(principals.len(), 1);
}

#[test]
fn one_receive_opens_eight_records_and_one_send_delivers_them() {
    use std::io::Write;
    use stream::{Fill, TlsStream};
    let (server, client) = ratings_server_and_client("bulk-records");
    // Socket buffers large enough that every record waits in the server's socket and the
    // plaintext fits the sink's at once, so the counts below are the stream's, not TCP's.
    let big = |s: &socket2::Socket| {
        s.set_recv_buffer_size(4 << 20).unwrap();
        s.set_send_buffer_size(4 << 20).unwrap();
    };
    let listen = |addr: std::net::SocketAddr| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        big(&s);
        s.bind(&addr.into()).unwrap();
        s.listen(8).unwrap();
        std::net::TcpListener::from(s)
    };
    let listener = listen("127.0.0.1:0".parse().unwrap());
    let addr = listener.local_addr().unwrap();
    let sink_listener = listen("127.0.0.1:0".parse().unwrap());
    let sink_addr = sink_listener.local_addr().unwrap();
    // Eight full records: 128 KiB per receive and per send (four before, issue 31).
    let bulk: Vec<u8> = (0..8 * record::MAX_PLAINTEXT).map(|i| (i % 251) as u8).collect();
    let sent = bulk.clone();
    let (ready, wait_ready) = std::sync::mpsc::channel::<()>();
    let (done, wait_done) = std::sync::mpsc::channel::<()>();
    let (handshake, wait_handshake) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        // The server's handshake read ends before the records come, so they all wait.
        wait_handshake.recv().unwrap();
        tls.write_all(&sent).unwrap(); // full 16 KiB records
        tls.flush().unwrap();
        ready.send(()).unwrap();
        wait_done.recv().unwrap(); // open until the server is done
    });
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_nonblocking(true).unwrap();
    let sink = std::net::TcpStream::connect(sink_addr).unwrap();
    let (mut sink_peer, _) = sink_listener.accept().unwrap();
    sink.set_nonblocking(true).unwrap();
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
    let delivered = rt.block_on(async move {
        let pool = crate::conn::BufferPool::default();
        let tls = TlsStream::server(monoio::net::TcpStream::from_std(tcp).unwrap(), server).unwrap();
        tls.handshake(&pool).await.unwrap();
        handshake.send(()).unwrap();
        wait_ready.recv().unwrap(); // every record is in the socket
        let sink = monoio::net::TcpStream::from_std(sink).unwrap();
        assert_eq!(tls.fill(&pool).await.unwrap(), Fill::Data);
        let n = tls.send_to(&sink).unwrap();
        done.send(()).unwrap();
        n
    });
    assert_eq!(delivered, bulk.len(), "eight records opened by one receive, sent by one send");
    let mut got = vec![0; bulk.len()];
    std::io::Read::read_exact(&mut sink_peer, &mut got).unwrap();
    assert!(got == bulk, "bytes intact and in order");
    peer.join().unwrap();
}

/// Two `TlsStream`s over loopback, each on its own thread and runtime: `client` and
/// `server` run against each other.
fn stream_pair(
    name: &str,
    client: impl FnOnce(stream::TlsStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
    + Send
    + 'static,
    server: impl FnOnce(stream::TlsStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
    + Send
    + 'static,
) {
    let dir = tmpdir(name);
    let mesh = ca("mesh");
    let server_config = ratings_server(&dir, &mesh);
    let cf = productpage_files(&format!("{name}-client"), &mesh);
    let client_config = build(&cf, &Role::mesh_client(vec![RATINGS.into()], None)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let c = std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
        rt.block_on(async move {
            let tcp = monoio::net::TcpStream::from_std(tcp).unwrap();
            let ip = addr.ip();
            client(stream::TlsStream::client(tcp, &client_config, ip).unwrap()).await
        });
    });
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_nonblocking(true).unwrap();
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
    rt.block_on(async move {
        let tcp = monoio::net::TcpStream::from_std(tcp).unwrap();
        server(stream::TlsStream::server(tcp, server_config).unwrap()).await
    });
    c.join().unwrap();
}

/// Everything `tls` delivers until EOF.
async fn read_all(tls: &stream::TlsStream, pool: &crate::conn::BufferPool) -> Vec<u8> {
    let mut got = Vec::new();
    while tls.fill(pool).await.unwrap() == stream::Fill::Data {
        tls.with_plaintext(|b| got.extend_from_slice(b));
    }
    got
}

#[test]
fn data_and_close_notify_right_behind_the_clients_finished_arrive_and_the_other_way_flows() {
    stream_pair(
        "half-close",
        |tls| {
            Box::pin(async move {
                let pool = crate::conn::BufferPool::default();
                tls.handshake_unsent(&pool).await.unwrap();
                // Finished, data and close_notify in one send.
                tls.queue(b"ping").await.unwrap();
                tls.shutdown().await.unwrap();
                assert_eq!(read_all(&tls, &pool).await, b"pong");
            })
        },
        |tls| {
            Box::pin(async move {
                let pool = crate::conn::BufferPool::default();
                tls.handshake_unsent(&pool).await.unwrap();
                tls.flush().await.unwrap();
                assert_eq!(read_all(&tls, &pool).await, b"ping");
                tls.write_all(b"pong").await.unwrap();
                tls.shutdown().await.unwrap();
            })
        },
    );
}

#[test]
fn a_key_update_from_the_peer_mid_stream_is_followed_and_answered_with_bytes_intact() {
    use std::io::{Read, Write};
    use stream::TlsStream;
    let (server, client) = ratings_server_and_client("key-update");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let before: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let after: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
    let (b, a) = (before.clone(), after.clone());
    let peer = std::thread::spawn(move || {
        let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
        tls.write_all(&b).unwrap();
        // rustls sends KeyUpdate(update_requested) and seals what follows with its new key.
        tls.conn.refresh_traffic_keys().unwrap();
        tls.write_all(&a).unwrap();
        tls.flush().unwrap();
        // Our answer (its KeyUpdate, then the echo under its new key) must open here.
        let mut echo = vec![0u8; b.len() + a.len()];
        tls.read_exact(&mut echo).unwrap();
        echo
    });
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_nonblocking(true).unwrap();
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
    let want = [before.as_slice(), after.as_slice()].concat();
    let expect = want.clone();
    rt.block_on(async move {
        let pool = crate::conn::BufferPool::default();
        let tls = TlsStream::server(monoio::net::TcpStream::from_std(tcp).unwrap(), server).unwrap();
        tls.handshake(&pool).await.unwrap();
        let mut got = Vec::new();
        while got.len() < expect.len() {
            assert_eq!(tls.fill(&pool).await.unwrap(), stream::Fill::Data);
            tls.with_plaintext(|b| got.extend_from_slice(b));
        }
        assert!(got == expect, "bytes across the key update differ");
        tls.write_all(&got).await.unwrap();
    });
    assert!(peer.join().unwrap() == want, "the echo after our key update differs");
}

#[test]
fn both_sides_prefer_aes_128_gcm_with_aes_instructions() {
    let dir = tmpdir("suites");
    let mesh = ca("mesh");
    let server = build(&files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap()), &Role::mesh_server());
    let server = server.unwrap().server.unwrap();
    let client =
        build(&files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap()), &Role::mesh_client(vec![], None));
    let client = client.unwrap().client.unwrap();
    let first = |suites: &[rustls::SupportedCipherSuite]| suites.first().map(|s| s.suite());
    let want = match aes_hardware() {
        true => rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        false => rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    };
    assert_eq!(first(&client.crypto_provider().cipher_suites), Some(want));
    assert_eq!(first(&server.crypto_provider().cipher_suites), Some(want));
    assert!(server.ignore_client_order, "the server's order decides, as BoringSSL's");
    let tls12 = envoy_suite_order(true).into_iter().find(|s| s.version() == &rustls::version::TLS12);
    assert_eq!(tls12.map(|s| s.suite()), Some(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
    // Every suite rustls offers by default is still offered, and named in the metric.
    let ours = envoy_suite_order(true);
    for s in rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES {
        assert!(ours.contains(s), "{:?}", s.suite());
        assert_ne!(suite_index(s.suite()), crate::metrics::TLS_SUITES.len() - 1, "{:?}", s.suite());
    }
    assert_eq!(ours.len(), rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES.len());
}

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}

#[test]
fn cipher_suites_take_envoys_names_in_their_order_and_a_version_not_named_keeps_its_default() {
    use rustls::CipherSuite as C;
    let all = envoy_suite_order(true);
    let ids = |v: Vec<rustls::SupportedCipherSuite>| v.iter().map(|s| s.suite()).collect::<Vec<_>>();
    // TLS 1.2 names (a BoringSSL equal-preference group counts in its written order, a CBC
    // suite rustls lacks is skipped): TLS 1.3 keeps its order, as Envoy's does.
    let tls12 = names(&[
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "[ECDHE-ECDSA-CHACHA20-POLY1305|ECDHE-ECDSA-AES128-GCM-SHA256]",
        "ECDHE-ECDSA-AES128-SHA",
    ]);
    assert_eq!(
        ids(cipher_suites(&tls12, &all).unwrap()),
        [
            C::TLS13_AES_128_GCM_SHA256,
            C::TLS13_AES_256_GCM_SHA384,
            C::TLS13_CHACHA20_POLY1305_SHA256,
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ]
    );
    // TLS 1.3 names restrict TLS 1.3 only; TLS 1.2 keeps Envoy's default list.
    let tls13 = ids(cipher_suites(&names(&["TLS_CHACHA20_POLY1305_SHA256"]), &all).unwrap());
    assert_eq!(tls13[0], C::TLS13_CHACHA20_POLY1305_SHA256);
    assert_eq!(&tls13[1..], &ids(all.clone())[3..]);
}

#[test]
fn an_unknown_cipher_suite_is_an_error_naming_it_and_the_resource() {
    let e =
        cipher_suites(&names(&["ECDHE-ECDSA-AES128-GCM-SHA256", "AES-128-GCM"]), &envoy_suite_order(true));
    assert!(
        e.unwrap_err().starts_with("unknown suite \"AES-128-GCM\" (known: ECDHE-ECDSA-AES128-GCM-SHA256,")
    );
    let e = cipher_suites(&names(&["AES128-SHA"]), &envoy_suite_order(true)).unwrap_err();
    assert!(e.contains("none of [\"AES128-SHA\"] is implemented"), "{e}");
    let dir = tmpdir("suites-config");
    let f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    let yaml = format!(
        "listeners:\n  - {{name: inbound, listen: 127.0.0.1:0, direction: inbound, cluster: app, tls: \
         {{mode: strict, cert_chain: {}, private_key: {}, root_cert: {}, cipher_suites: [TLS_AES_129_GCM]}}}}\n\
         clusters:\n  - {{name: app, endpoints: [{{address: 127.0.0.1:1}}]}}\n",
        f.cert_chain.display(),
        f.private_key.display(),
        f.root_cert.display()
    );
    let config = crate::config::Config::parse(&yaml, "t.yaml").unwrap();
    let e = Certs::load(&config).err().unwrap().to_string();
    assert!(e.starts_with("Listener/inbound: cipher_suites: unknown suite \"TLS_AES_129_GCM\""), "{e}");
}

/// The suite a handshake between `client` and `server` negotiates.
fn negotiated(client: &Role, server: &Role) -> rustls::CipherSuite {
    let dir = tmpdir("negotiate");
    let mesh = ca("mesh");
    let s = build(&files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap()), server).unwrap();
    let c = build(&files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap()), client).unwrap();
    let (client, server) = (c.client.unwrap(), s.server.unwrap());
    let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
    let mut c = rustls::ClientConnection::new(client, name).unwrap();
    let mut s = rustls::ServerConnection::new(server).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets().unwrap();
    }
    assert_eq!(
        c.negotiated_cipher_suite().map(|s| s.suite()),
        s.negotiated_cipher_suite().map(|s| s.suite())
    );
    s.negotiated_cipher_suite().unwrap().suite()
}

#[test]
fn configured_cipher_suites_decide_the_negotiated_suite_on_either_side() {
    use rustls::CipherSuite as C;
    let client = || Role::mesh_client(vec![], None);
    let server = Role::mesh_server().with_cipher_suites(names(&["TLS_AES_256_GCM_SHA384"]));
    assert_eq!(negotiated(&client(), &server), C::TLS13_AES_256_GCM_SHA384);
    let chacha = client().with_cipher_suites(names(&["TLS_CHACHA20_POLY1305_SHA256"]));
    assert_eq!(negotiated(&chacha, &Role::mesh_server()), C::TLS13_CHACHA20_POLY1305_SHA256);
    // Naming TLS 1.2 suites leaves TLS 1.3 and its order alone, as in Envoy.
    let tls12 = client().with_cipher_suites(names(&["ECDHE-ECDSA-AES256-GCM-SHA384"]));
    assert_eq!(negotiated(&tls12, &Role::mesh_server()), C::TLS13_AES_128_GCM_SHA256);
}

/// A full handshake (no session offered) between a fresh client of `client` and `server`.
fn full_handshake(client: &Role, cf: &Files, server: &Arc<ServerConfig>) -> Result<(), rustls::Error> {
    let c = build(cf, client).unwrap().client.unwrap();
    let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
    let mut c = rustls::ClientConnection::new(c, name).unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        s.read_tls(&mut &wire[..]).unwrap();
        let server_result = s.process_new_packets().map(|_| ());
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        c.read_tls(&mut &wire[..]).unwrap();
        server_result?;
        c.process_new_packets()?;
    }
    Ok(())
}

#[test]
fn a_verified_client_chain_is_cached_per_config_and_a_rotated_root_verifies_it_again() {
    let mesh = ca("mesh");
    let dir = tmpdir("chains");
    let slot =
        Slot::new(files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap()), Role::mesh_server()).unwrap();
    let cdir = tmpdir("chains-client");
    let client =
        files(&cdir, &mesh, "spiffe://cluster.local/ns/default/sa/productpage", KeyPair::generate().unwrap());
    let role = Role::mesh_client(vec![RATINGS.into()], None);
    let before = slot.current();
    for _ in 0..3 {
        full_handshake(&role, &client, before.server.as_ref().unwrap()).unwrap();
    }
    assert_eq!(before.chains.as_ref().unwrap().len(), 1, "one client chain, verified once and kept");
    // The mesh root rotates to another CA: the new config starts with no verified chain,
    // and the client whose chain the old config had cached is refused.
    let other = ca("other-mesh");
    std::fs::write(&slot.files.root_cert, other.cert.pem()).unwrap();
    slot.reload().unwrap();
    let after = slot.current();
    assert!(after.chains.as_ref().unwrap().is_empty());
    let e = full_handshake(&role, &client, after.server.as_ref().unwrap()).unwrap_err();
    assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    assert!(after.chains.as_ref().unwrap().is_empty(), "a refused chain is never cached");
}

#[test]
fn a_cached_server_chain_still_has_its_identity_checked_on_every_connection() {
    let mesh = ca("mesh");
    let dir = tmpdir("chains-san");
    let f = files(&dir, &mesh, RATINGS, KeyPair::generate().unwrap());
    let chains = Arc::new(chains::Chains::default());
    let expecting = |id: &str| SpiffeVerifier {
        roots: Arc::new(load_roots(&f.root_cert).unwrap()),
        names: SanNames { exact: vec![id.into()], prefixes: Vec::new() },
        mesh: true,
        algs: provider().signature_verification_algorithms,
        chains: Some(Arc::clone(&chains)),
    };
    let name = ServerName::try_from("ratings.default.svc.cluster.local").unwrap();
    let leaf = load_certs(&f.cert_chain).unwrap();
    let now = UnixTime::now();
    expecting(RATINGS).verify_server_cert(&leaf[0], &[], &name, &[], now).unwrap();
    assert_eq!(chains.len(), 1);
    assert!(chains.holds(&leaf[0], &[], now));
    // The same chain, now cached, against a verifier expecting another identity: refused.
    let e = expecting("spiffe://cluster.local/ns/prod/sa/reviews").verify_server_cert(
        &leaf[0],
        &[],
        &name,
        &[],
        now,
    );
    assert_eq!(e.unwrap_err(), rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
    // Past the certificate's notAfter the cached entry does not hold (and a full
    // verification refuses the expired certificate).
    let later = UnixTime::since_unix_epoch(Duration::from_secs(100_000_000_000)); // rcgen: 4096-01-01
    assert!(!chains.holds(&leaf[0], &[], later));
    assert!(expecting(RATINGS).verify_server_cert(&leaf[0], &[], &name, &[], later).is_err());
}

#[test]
fn an_atomic_rename_changes_the_fingerprint() {
    let dir = tmpdir("rename");
    let f = files(&dir, &ca("mesh"), RATINGS, KeyPair::generate().unwrap());
    let before = fingerprints(&f);
    let tmp = dir.join("new.pem");
    std::fs::copy(&f.cert_chain, &tmp).unwrap(); // same bytes, same length
    std::fs::rename(&tmp, &f.cert_chain).unwrap();
    assert_ne!(before, fingerprints(&f));
}
