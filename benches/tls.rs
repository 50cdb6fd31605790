//! Which rustls crypto provider (README Decisions): a full mTLS handshake pair (ECDSA P-256
//! workload certificates, as Istio's CA issues, client certificate verified against the mesh
//! root, SPIFFE SAN checked) and bulk record encryption + decryption, in memory, with
//! aws-lc-rs and with ring. Built from `ringside::tls::build_with`, the code the proxy runs.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use ringside::tls::{Configured, Files, Role, build_with};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/ratings";

fn write_identity(dir: &Path, tag: &str, ca: &CertificateParams, ca_key: &KeyPair, id: &str) -> Files {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &Issuer::from_params(ca, ca_key)).unwrap();
    let root = ca.clone().self_signed(ca_key).unwrap();
    let f = Files {
        cert_chain: dir.join(format!("{tag}-cert.pem")),
        private_key: dir.join(format!("{tag}-key.pem")),
        root_cert: dir.join("root.pem"),
    };
    std::fs::write(&f.cert_chain, cert.pem()).unwrap();
    std::fs::write(&f.private_key, key.serialize_pem()).unwrap();
    std::fs::write(&f.root_cert, root.pem()).unwrap();
    f
}

fn identities() -> (Files, Files) {
    let dir = std::env::temp_dir().join(format!("ringside-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let server = write_identity(&dir, "server", &ca, &ca_key, SERVER_ID);
    let client =
        write_identity(&dir, "client", &ca, &ca_key, "spiffe://cluster.local/ns/default/sa/productpage");
    (server, client)
}

struct Pair {
    server: Configured,
    client: Configured,
}

fn configs(provider: CryptoProvider, server: &Files, client: &Files) -> Pair {
    let provider = Arc::new(provider);
    let role = Role::mesh_client(vec![SERVER_ID.into()], None);
    Pair {
        server: build_with(provider.clone(), server, &Role::mesh_server()).unwrap(),
        client: build_with(provider, client, &role).unwrap(),
    }
}

/// Move every pending TLS byte from `a` to `b`; true if any moved.
fn transfer(a: &mut Connection, b: &mut Connection, wire: &mut Vec<u8>) -> bool {
    wire.clear();
    while a.wants_write() {
        a.write_tls(wire).unwrap();
    }
    if wire.is_empty() {
        return false;
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        b.read_tls(&mut rd).unwrap();
        b.process_new_packets().unwrap();
    }
    true
}

fn connect(p: &Pair) -> (Connection, Connection) {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut c: Connection = ClientConnection::new(p.client.client.clone().unwrap(), name).unwrap().into();
    let mut s: Connection = ServerConnection::new(p.server.server.clone().unwrap()).unwrap().into();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        let moved = transfer(&mut c, &mut s, &mut wire) | transfer(&mut s, &mut c, &mut wire);
        assert!(moved, "handshake stalled");
    }
    transfer(&mut s, &mut c, &mut wire); // session tickets
    (c, s)
}

type MakeProvider = fn() -> CryptoProvider;

fn providers() -> [(&'static str, MakeProvider); 2] {
    [
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider),
        ("ring", rustls::crypto::ring::default_provider),
    ]
}

fn handshake(c: &mut Criterion) {
    let (server, client) = identities();
    let mut g = c.benchmark_group("tls_handshake_mtls");
    for (name, provider) in providers() {
        let pair = configs(provider(), &server, &client);
        // A fresh client config per iteration would measure config building; resumption is
        // off so every handshake is a full one (certificates, signatures, key exchange).
        let mut no_resume = (*pair.client.client.clone().unwrap()).clone();
        no_resume.resumption = rustls::client::Resumption::disabled();
        let pair = Pair {
            client: Configured { client: Some(Arc::new(no_resume)), ..pair.client },
            server: pair.server,
        };
        g.bench_function(BenchmarkId::from_parameter(name), |b| b.iter(|| connect(&pair)));
    }
    g.finish();
}

fn bulk(c: &mut Criterion) {
    let (server, client) = identities();
    const CHUNK: usize = 16 * 1024;
    const TOTAL: usize = 1 << 20;
    let mut g = c.benchmark_group("tls_bulk_encrypt_decrypt");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for (name, provider) in providers() {
        let pair = configs(provider(), &server, &client);
        let (mut cl, mut sv) = connect(&pair);
        let data = vec![0x5au8; CHUNK];
        let mut out = vec![0u8; CHUNK];
        let mut wire = Vec::with_capacity(TOTAL + TOTAL / 8);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                for _ in 0..TOTAL / CHUNK {
                    cl.writer().write_all(&data).unwrap();
                    transfer(&mut cl, &mut sv, &mut wire);
                    let mut got = 0;
                    while got < CHUNK {
                        got += sv.reader().read(&mut out).unwrap();
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, handshake, bulk);
criterion_main!(benches);
