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
