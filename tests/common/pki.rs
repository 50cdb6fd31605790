//! Test PKI for the mTLS tests (SPEC §7): a mesh CA made at test time with rcgen, and
//! workload certificates with SPIFFE URI SANs written as Istio mounts them.
#![allow(dead_code)]

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// A certificate authority made at test time.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::OrganizationName, name);
        let key = KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        Ca { params: p, key, pem }
    }

    /// A workload certificate with a SPIFFE URI SAN, as Istio's CA issues; `expired` makes
    /// one whose validity ended yesterday.
    pub fn workload(&self, spiffe: &str, expired: bool) -> (String, String) {
        self.workload_with(spiffe, expired, KeyPair::generate().unwrap())
    }

    /// A workload certificate with serial number `serial` (to tell rotations apart).
    pub fn workload_serial(&self, spiffe: &str, serial: u64) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
        p.serial_number = Some(serial.into());
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &Issuer::from_params(&self.params, &self.key)).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf certificate with these SANs (`dns:NAME` or `uri:URI`) and common name.
    pub fn leaf(&self, sans: &[&str], cn: &str) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans
            .iter()
            .map(|s| match s.split_once(':') {
                Some(("dns", n)) => SanType::DnsName(n.try_into().unwrap()),
                Some(("uri", u)) => SanType::URI(u.try_into().unwrap()),
                _ => panic!("SAN {s}: want dns:NAME or uri:URI"),
            })
            .collect();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &Issuer::from_params(&self.params, &self.key)).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A workload certificate for `key` (an RSA key for the ECDHE-RSA suites).
    pub fn workload_with(&self, spiffe: &str, expired: bool, key: KeyPair) -> (String, String) {
        self.workload_uris(&[spiffe], expired, key)
    }

    /// A workload certificate whose URI SANs are `uris`, in that order.
    pub fn workload_uris(&self, uris: &[&str], expired: bool, key: KeyPair) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &Issuer::from_params(&self.params, &self.key)).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Istio's file-mounted certificates (`cert-chain.pem`, `key.pem`, `root-cert.pem`) in a
/// fresh directory.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn new(tag: &str, ca: &Ca, spiffe: &str) -> Certs {
        Self::with_root(tag, ca, spiffe, &ca.pem, false)
    }

    pub fn with_root(tag: &str, ca: &Ca, spiffe: &str, root: &str, expired: bool) -> Certs {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringside-tls-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Certs { dir };
        c.install(ca, spiffe, root, expired);
        c
    }

    /// Write a new certificate set by atomic renames, as the Istio agent does.
    pub fn install(&self, ca: &Ca, spiffe: &str, root: &str, expired: bool) {
        self.install_pem(ca.workload(spiffe, expired), root);
    }

    /// Replace the workload certificate with one whose URI SANs are `uris`, in order.
    pub fn install_uris(&self, ca: &Ca, uris: &[&str]) {
        self.install_pem(ca.workload_uris(uris, false, KeyPair::generate().unwrap()), &ca.pem);
    }

    /// Replace the workload certificate with one for an RSA key (same root).
    pub fn install_rsa(&self, ca: &Ca, spiffe: &str) {
        let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        self.install_pem(ca.workload_with(spiffe, false, key), &ca.pem);
    }

    fn install_pem(&self, (cert, key): (String, String), root: &str) {
        for (name, body) in
            [("cert-chain.pem", &cert), ("key.pem", &key), ("root-cert.pem", &root.to_string())]
        {
            let tmp = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn yaml(&self) -> String {
        format!(
            "cert_chain: {}, private_key: {}, root_cert: {}",
            self.p("cert-chain.pem"),
            self.p("key.pem"),
            self.p("root-cert.pem")
        )
    }
}

/// Accepts any server certificate: a test reads it rather than trusts it.
#[derive(Debug)]
struct ReadAny(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for ReadAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client session to `addr` presenting `client` (PEM chain, key; none: no
/// certificate), offering ALPN `alpn`, reading whatever certificate the server presents.
/// The handshake completes (or its error is returned), then `ping` goes through and 4 bytes
/// come back (the proxied echo). Returns the server certificate's serial number, decimal.
pub fn tls_echo(
    addr: std::net::SocketAddr,
    client: Option<&(String, String)>,
    alpn: &str,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReadAny(provider)));
    let mut config = match client {
        Some((chain, key)) => {
            let chain =
                CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    let name = ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let timeout = std::time::Duration::from_secs(20);
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    let leaf = conn.peer_certificates().and_then(|c| c.first()).ok_or("no server certificate")?.clone();
    let serial = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?.1.serial.to_string();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).map_err(|e| e.to_string())?;
    match &echo {
        b"ping" => Ok(serial),
        other => Err(format!("echo {other:?}")),
    }
}

/// A client config as ringside builds it with `certs`, checking the server's SPIFFE id
/// `server`, offering `alpn`.
pub fn client_config(certs: &Certs, server: &str, alpn: &[&str]) -> std::sync::Arc<rustls::ClientConfig> {
    use ringside::tls::{Files, Role};
    let files = Files {
        cert_chain: certs.path("cert-chain.pem"),
        private_key: certs.path("key.pem"),
        root_cert: certs.path("root-cert.pem"),
    };
    let role = Role::Client {
        subject_alt_names: vec![server.into()],
        subject_alt_name_prefixes: Vec::new(),
        server_name: None,
        alpn: Vec::new(),
        mesh: true,
        cipher_suites: Vec::new(),
    };
    let built = ringside::tls::build_with(ringside::tls::provider(), &files, &role).unwrap();
    let mut config = (*built.client.unwrap()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    std::sync::Arc::new(config)
}
