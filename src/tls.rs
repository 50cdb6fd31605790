//! Istio `ISTIO_MUTUAL` (SPEC §7): rustls configs built from PEM files, the SPIFFE identity
//! checks, and the reload of rotated certificates by a side thread. The connection-level
//! adaptor over monoio lives in `tls/stream.rs`.
//!
//! Workers never touch files: they load the current config of a listener or cluster (one
//! atomic load per new connection) and a side thread replaces it when the files change.

pub mod aead;
pub mod chains;
pub mod hello;
pub mod hkdf;
pub mod record;
pub mod secrets;
pub mod stream;
pub mod tickets;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// ALPN Istio's sidecars offer for mTLS with the metadata exchange (SPEC §2 mode `alpn`).
pub const ALPN_PEER_EXCHANGE: &[u8] = b"istio-peer-exchange";
/// ALPN Istio offers after `istio-peer-exchange`: mTLS without the exchange.
pub const ALPN_ISTIO: &[u8] = b"istio";

/// A certificate set that could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A `cipher_suites` list names a suite that does not exist or leaves none usable.
    #[error("cipher_suites: {0}")]
    CipherSuites(String),
    /// rustls refused the certificate, key or roots (e.g. a key that does not match).
    #[error("{}: {source}", path.display())]
    Rustls {
        /// rustls' reason.
        source: rustls::Error,
        /// The file it concerns.
        path: PathBuf,
    },
}

/// The three PEM files of a workload identity, as Istio mounts them (`cert-chain.pem`,
/// `key.pem`, `root-cert.pem`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Files {
    /// Workload certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// Private key: PKCS#1 (RSA), SEC1 (EC) or PKCS#8.
    pub private_key: PathBuf,
    /// Mesh root certificate(s).
    pub root_cert: PathBuf,
}

/// Which side of the handshake a config is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Inbound: offer `alpn` (empty: Istio's), and require a client certificate signed by
    /// the mesh root unless told otherwise (an xDS DownstreamTlsContext may say so).
    Server {
        /// ALPN offered, in preference order.
        alpn: Vec<String>,
        /// Refuse a client without a certificate (Istio's mTLS always does).
        require_client_certificate: bool,
        /// xDS `match_subject_alt_names`: a client certificate must have a URI SAN equal to
        /// one of these or starting with one of `subject_alt_name_prefixes` (none: any).
        subject_alt_names: Vec<String>,
        /// URI SAN prefixes also accepted.
        subject_alt_name_prefixes: Vec<String>,
        /// Cipher suites by Envoy's names (empty: Envoy's default order), [`cipher_suites`].
        cipher_suites: Vec<String>,
    },
    /// Outbound cluster: verify the server against the root and these SPIFFE ids (any
    /// mesh identity when both lists are empty); `server_name` is sent as SNI.
    Client {
        /// Expected SPIFFE URI SANs of the upstream.
        subject_alt_names: Vec<String>,
        /// SPIFFE id prefixes also accepted (xDS `prefix` SAN matchers).
        subject_alt_name_prefixes: Vec<String>,
        /// SNI: the cluster's service host, or the endpoint's IP (no SNI) without one.
        server_name: Option<String>,
        /// ALPN offered (empty: Istio's for the mesh, none otherwise).
        alpn: Vec<String>,
        /// Istio's mesh mTLS (SPIFFE identities; no names: any mesh identity), else a
        /// DestinationRule's `SIMPLE`/`MUTUAL` origination: the SAN matchers against the
        /// server's URI and DNS SANs, and without matchers its name checked against
        /// `server_name`, as a TLS client checks a hostname.
        mesh: bool,
        /// Cipher suites by Envoy's names (empty: Envoy's default order), [`cipher_suites`].
        cipher_suites: Vec<String>,
    },
}

impl Role {
    /// An Istio mTLS server: Istio's ALPN, client certificate required.
    pub fn mesh_server() -> Role {
        Role::Server {
            alpn: Vec::new(),
            require_client_certificate: true,
            subject_alt_names: Vec::new(),
            subject_alt_name_prefixes: Vec::new(),
            cipher_suites: Vec::new(),
        }
    }

    /// An Istio mTLS client expecting one of `subject_alt_names` (any when empty).
    pub fn mesh_client(subject_alt_names: Vec<String>, server_name: Option<String>) -> Role {
        Role::Client {
            subject_alt_names,
            subject_alt_name_prefixes: Vec::new(),
            server_name,
            alpn: Vec::new(),
            mesh: true,
            cipher_suites: Vec::new(),
        }
    }

    /// The same role with `cipher_suites` (Envoy's names) instead of the default order.
    pub fn with_cipher_suites(mut self, names: Vec<String>) -> Role {
        match &mut self {
            Role::Server { cipher_suites, .. } | Role::Client { cipher_suites, .. } => *cipher_suites = names,
        }
        self
    }

    fn cipher_suites(&self) -> &[String] {
        match self {
            Role::Server { cipher_suites, .. } | Role::Client { cipher_suites, .. } => cipher_suites,
        }
    }
}

/// A built config and the local principal from our own certificate.
pub struct Configured {
    /// Set for `Role::Server`.
    pub server: Option<Arc<ServerConfig>>,
    /// Set for `Role::Client`.
    pub client: Option<Arc<ClientConfig>>,
    /// `spiffe://...` of our own certificate, if it has one (source/destination_principal).
    pub local_principal: Option<Arc<str>>,
    /// SNI for the client side.
    pub server_name: Option<ServerName<'static>>,
    /// The peer chains this config has verified (`None`: `RINGSIDE_TLS_CHAIN_CACHE=0`).
    pub chains: Option<Arc<chains::Chains>>,
}

/// One listener's or cluster's TLS: where its files are and the config in use now.
pub struct Slot {
    /// The PEM files.
    pub files: Files,
    /// Server or client.
    pub role: Role,
    current: ArcSwap<Configured>,
    /// The files' fingerprints when they were last loaded (successfully or not), so the
    /// reload thread sees a change made at any time after, also to a slot built later.
    seen: ArcSwap<Fingerprints>,
}

impl Slot {
    /// Load the files and build the config; an error names the file.
    pub fn new(files: Files, role: Role) -> Result<Slot, Error> {
        let seen = fingerprints(&files);
        let identity = load(&files)?;
        Slot::with(files, role, &identity, seen)
    }

    /// A slot built from `identity`, already read from `files` when they were `seen`.
    fn with(files: Files, role: Role, identity: &Identity, seen: Fingerprints) -> Result<Slot, Error> {
        let built = build_from(provider(), &files, identity, &role)?;
        Ok(Slot { files, role, current: ArcSwap::from_pointee(built), seen: ArcSwap::from_pointee(seen) })
    }

    /// The config to use for a new connection (live connections keep the one they had).
    pub fn current(&self) -> Arc<Configured> {
        self.current.load_full()
    }

    /// Load the files again; on success new connections use the result, on failure the
    /// previous config stays.
    pub fn reload(&self) -> Result<(), Error> {
        self.seen.store(Arc::new(fingerprints(&self.files)));
        self.rebuild(&load(&self.files)?)
    }

    /// Build again from `identity` (its files, read anew); on failure the previous config
    /// stays.
    fn rebuild(&self, identity: &Identity) -> Result<(), Error> {
        let built = build_from(provider(), &self.files, identity, &self.role)?;
        self.current.store(Arc::new(built));
        Ok(())
    }
}

/// Every listener's, filter chain's and cluster's TLS slot, by index (`None`: plaintext).
#[derive(Default)]
pub struct Certs {
    /// Per listener (server side, a static listener's `tls:`).
    pub listeners: Vec<Option<Arc<Slot>>>,
    /// Per listener, per filter chain (server side, an xDS chain's DownstreamTlsContext).
    pub chains: Vec<Arc<[Option<Arc<Slot>>]>>,
    /// The config listeners `listeners` and `chains` were made for: a listener the next
    /// publication shares (the same `Arc`) keeps its slots without a look at its chains (a
    /// capture listener holds a mesh's 10,000).
    listeners_from: Vec<Arc<crate::config::Listener>>,
    /// Per cluster (client side), in chunks shared with the previous publication's.
    pub clusters: crate::chunks::Chunks<Option<Arc<Slot>>>,
    /// The config clusters `clusters` were made for: the next publication keeps the slot of
    /// a cluster it shares (the same `Arc`) without building its role again, and looks
    /// only at the chunks of clusters it does not share (SPEC §11).
    from: crate::chunks::Chunks<Arc<crate::config::Cluster>>,
    /// The distinct slots by their files, made once (`Certs::groups`).
    groups: std::sync::OnceLock<Arc<[Group]>>,
}

/// The slots that share one set of files: the reload thread looks at the files once per
/// group and round, and at the slots only when the files changed.
pub struct Group {
    /// The PEM files every slot of the group loads.
    pub files: Files,
    /// The slots, each once.
    pub slots: Vec<Arc<Slot>>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |v: &[Option<Arc<Slot>>]| v.iter().flatten().count();
        let chains: usize = self.chains.iter().map(|c| count(c)).sum();
        let (l, c) = (count(&self.listeners), self.clusters.iter().flatten().count());
        write!(f, "Certs {{ listeners: {l}, chains: {chains}, clusters: {c} }}")
    }
}

/// A certificate set a resource asks for could not be loaded: which resource and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct LoadError {
    /// `Listener/NAME` or `Cluster/NAME` (with the filter chain).
    pub what: String,
    /// The file and why.
    pub source: Error,
}

fn files(f: &crate::config::CertificateFiles) -> Files {
    Files {
        cert_chain: f.cert_chain.clone().into(),
        private_key: f.private_key.clone().into(),
        root_cert: f.root_cert.clone().into(),
    }
}

impl Certs {
    /// Load every configured certificate set; a file that fails is a config error naming it.
    pub fn load(config: &crate::config::Config) -> Result<Certs, LoadError> {
        Certs::next(&Certs::default(), config)
    }

    /// The slots for `config`: one that `old` holds for the same files and role is kept (a
    /// listener, chain or cluster that stays keeps its certificates and their reloads);
    /// others are loaded now (xDS resources that ask for TLS, SPEC §9). Items with the same
    /// files and role share a slot. A file that fails names the resource that asked.
    pub fn next(old: &Certs, config: &crate::config::Config) -> Result<Certs, LoadError> {
        // Every slot of `old` by files and role, made at the first item whose slot is not
        // the one at its own place in `old`: a push that changes a few items keeps the rest
        // without hashing them.
        let mut known: Option<HashMap<(Files, Role), Arc<Slot>>> = None;
        // Files read in this round, each once, with their fingerprints from before the read.
        let mut read: HashMap<Files, (Arc<Identity>, Fingerprints)> = HashMap::new();
        let mut slot = |what: &dyn Fn() -> String, files: Files, role: Role, here: Option<&Arc<Slot>>| {
            if let Some(s) = here.filter(|s| s.files == files && s.role == role) {
                return Ok(Arc::clone(s));
            }
            let known = known.get_or_insert_with(|| {
                old.slots().into_iter().map(|s| ((s.files.clone(), s.role.clone()), s)).collect()
            });
            if let Some(s) = known.get(&(files.clone(), role.clone())) {
                return Ok(Arc::clone(s));
            }
            let fail = |source| LoadError { what: what(), source };
            let (identity, seen) = match read.get(&files) {
                Some(r) => r.clone(),
                None => {
                    let seen = fingerprints(&files);
                    let r = (Arc::new(load(&files).map_err(fail)?), seen);
                    read.insert(files.clone(), r.clone());
                    r
                }
            };
            let s = Arc::new(Slot::with(files.clone(), role.clone(), &identity, seen).map_err(fail)?);
            known.insert((files, role), Arc::clone(&s));
            Ok(s)
        };
        let mut certs = Certs::default();
        for (li, l) in config.listeners.iter().enumerate() {
            certs.listeners_from.push(Arc::clone(l));
            if old.listeners_from.get(li).is_some_and(|o| Arc::ptr_eq(o, l))
                && let (Some(here), Some(chains)) = (old.listeners.get(li), old.chains.get(li))
            {
                certs.listeners.push(here.clone());
                certs.chains.push(Arc::clone(chains));
                continue;
            }
            let here = old.listeners.get(li).and_then(Option::as_ref);
            let what = || format!("Listener/{}", l.name);
            certs.listeners.push(match &l.tls {
                // An HBONE terminator speaks HTTP/2 only (SPEC §12); the handshake's version
                // and ALPN are checked again once done (`relay::hbone`).
                Some(t) if l.tunnel.is_some() => {
                    let role = Role::Server {
                        alpn: vec!["h2".into()],
                        require_client_certificate: true,
                        subject_alt_names: Vec::new(),
                        subject_alt_name_prefixes: Vec::new(),
                        cipher_suites: t.cipher_suites.clone(),
                    };
                    Some(slot(&what, files(&t.files()), role, here)?)
                }
                Some(t) => {
                    let role = Role::mesh_server().with_cipher_suites(t.cipher_suites.clone());
                    Some(slot(&what, files(&t.files()), role, here)?)
                }
                None => None,
            });
            let mut chains = Vec::new();
            for (ci, c) in l.filter_chains.iter().enumerate() {
                let what = || format!("Listener/{}: {}", l.name, c.name);
                let here = old.chains.get(li).and_then(|c| c.get(ci)?.as_ref());
                chains.push(match &c.tls {
                    Some(t) => {
                        let role = Role::Server {
                            alpn: t.alpn.clone(),
                            require_client_certificate: t.require_client_certificate,
                            subject_alt_names: t.subject_alt_names.clone(),
                            subject_alt_name_prefixes: t.subject_alt_name_prefixes.clone(),
                            cipher_suites: t.cipher_suites.clone(),
                        };
                        Some(slot(&what, files(&t.files), role, here)?)
                    }
                    None => None,
                });
            }
            certs.chains.push(chains.into());
        }
        let mut cluster_slot = |c: &crate::config::Cluster, here: Option<&Arc<Slot>>| {
            let what = || format!("Cluster/{}", c.name);
            Ok(match &c.tls {
                Some(t) => {
                    let role = Role::Client {
                        subject_alt_names: t.subject_alt_names.clone(),
                        subject_alt_name_prefixes: t.subject_alt_name_prefixes.clone(),
                        server_name: t.sni.clone().or_else(|| c.service.clone()),
                        // An HBONE tunnel speaks HTTP/2 only (SPEC §12).
                        alpn: match c.tunnel {
                            Some(_) => vec!["h2".into()],
                            None => t.alpn.clone(),
                        },
                        mesh: t.mode == crate::config::ClusterTlsMode::IstioMutual,
                        cipher_suites: t.cipher_suites.clone(),
                    };
                    Some(slot(&what, files(&t.files()), role, here)?)
                }
                None => None,
            })
        };
        certs.from = config.clusters.clone();
        match config.clusters.differing(&old.from) {
            // As many clusters as before: the old slots, but at the clusters not shared with
            // the old config (only the chunks not shared are looked at: an endpoint change
            // costs its chunk, not the mesh's 10,000 clusters).
            Some(ranges) => {
                certs.clusters = old.clusters.clone();
                for i in ranges.into_iter().flatten() {
                    let c = &config.clusters[i];
                    if old.from.get(i).is_some_and(|o| Arc::ptr_eq(o, c)) {
                        continue;
                    }
                    let here = old.clusters.get(i).and_then(Option::as_ref);
                    let s = cluster_slot(c, here)?;
                    if let Some(at) = certs.clusters.get_mut(i) {
                        *at = s;
                    }
                }
            }
            None => {
                let mut clusters = Vec::with_capacity(config.clusters.len());
                for (i, c) in config.clusters.iter().enumerate() {
                    let here = old.clusters.get(i).and_then(Option::as_ref);
                    if old.from.get(i).is_some_and(|o| Arc::ptr_eq(o, c)) {
                        clusters.push(here.cloned());
                        continue;
                    }
                    clusters.push(cluster_slot(c, here)?);
                }
                certs.clusters = clusters.into();
            }
        }
        // Every slot where it was (an endpoint change): the groups are the old ones, so the
        // reload thread neither groups a mesh's 10,000 slots again nor looks at them.
        if let Some(groups) = old.groups.get()
            && certs.same_slots(old)
        {
            let _ = certs.groups.set(Arc::clone(groups));
        }
        Ok(certs)
    }

    /// Whether each place holds the very slot it holds in `other` (the clusters compared
    /// in the chunks the two do not share only).
    fn same_slots(&self, other: &Certs) -> bool {
        fn one(a: &Option<Arc<Slot>>, b: &Option<Arc<Slot>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
        }
        fn same(a: &[Option<Arc<Slot>>], b: &[Option<Arc<Slot>>]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| one(a, b))
        }
        let clusters = self.clusters.differing(&other.clusters).is_some_and(|ranges| {
            ranges.into_iter().flatten().all(|i| one(&self.clusters[i], &other.clusters[i]))
        });
        same(&self.listeners, &other.listeners)
            && self.chains.len() == other.chains.len()
            && self.chains.iter().zip(&other.chains).all(|(a, b)| Arc::ptr_eq(a, b) || same(a, b))
            && clusters
    }

    /// All distinct slots, for the reload thread.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        let mut seen = std::collections::HashSet::new();
        let every = self
            .listeners
            .iter()
            .chain(self.chains.iter().flat_map(|c| c.iter()))
            .chain(self.clusters.iter());
        every.flatten().filter(|s| seen.insert(Arc::as_ptr(s))).cloned().collect()
    }

    /// The distinct slots grouped by their files, made once per `Certs` (on the reload
    /// thread's first ask, off the publish path): a reload round then costs the number of
    /// file sets, not of clusters (a mesh's 10,000 clusters share the workload's files).
    pub fn groups(&self) -> Arc<[Group]> {
        Arc::clone(self.groups.get_or_init(|| {
            let mut groups: Vec<Group> = Vec::new();
            let mut at: HashMap<Files, usize> = HashMap::new();
            for s in self.slots() {
                // Nearly every slot has the last one's files: compared before hashed.
                let i = match groups.last() {
                    Some(g) if g.files == s.files => groups.len() - 1,
                    _ => *at.entry(s.files.clone()).or_insert_with(|| {
                        groups.push(Group { files: s.files.clone(), slots: Vec::new() });
                        groups.len() - 1
                    }),
                };
                groups[i].slots.push(s);
            }
            groups.into()
        }))
    }
}

/// The crypto provider: aws-lc-rs with Envoy's (BoringSSL's) cipher suite order (README
/// Decisions has both measurements).
pub fn provider() -> Arc<CryptoProvider> {
    // One for the process: every config (a mesh's 10,000 clusters') shares it.
    static SHARED: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    Arc::clone(SHARED.get_or_init(|| {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites = envoy_suite_order(aes_hardware());
        Arc::new(p)
    }))
}

/// True when the CPU has AES and carry-less multiply instructions (AES-GCM in hardware).
pub fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// rustls' suites in the order BoringSSL (Envoy, Istio's sidecars) prefers them: with AES
/// hardware AES-128-GCM first, then AES-256-GCM, then ChaCha20-Poly1305 (TLS 1.3), and for
/// TLS 1.2 Envoy's default list, ECDHE-ECDSA before ECDHE-RSA, AES-128-GCM (or ChaCha20,
/// in the same preference group) before AES-256-GCM. Without AES hardware ChaCha20 comes
/// first, as in BoringSSL. rustls' own order puts AES-256-GCM first.
pub fn envoy_suite_order(aes: bool) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let aes_128 = own_hkdf(cs::TLS13_AES_128_GCM_SHA256, &AES_128_GCM);
    let chacha = own_hkdf(cs::TLS13_CHACHA20_POLY1305_SHA256, &CHACHA20_POLY1305);
    let (tls13, tls12) = match aes {
        true => (
            [aes_128, cs::TLS13_AES_256_GCM_SHA384, chacha],
            [
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ],
        ),
        false => (
            [chacha, aes_128, cs::TLS13_AES_256_GCM_SHA384],
            [
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ],
        ),
    };
    tls13.into_iter().chain(tls12).collect()
}

/// The TLS 1.3 suites on SHA-256, each with ringside's HKDF (`tls::hkdf`) instead of
/// aws-lc-rs': the same suite on the wire, fewer SHA-256 blocks and no allocation per step.
static AES_128_GCM: LazyLock<Option<rustls::Tls13CipherSuite>> =
    LazyLock::new(|| with_own_hkdf(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256));
static CHACHA20_POLY1305: LazyLock<Option<rustls::Tls13CipherSuite>> =
    LazyLock::new(|| with_own_hkdf(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256));

fn with_own_hkdf(suite: rustls::SupportedCipherSuite) -> Option<rustls::Tls13CipherSuite> {
    let s = suite.tls13()?;
    Some(rustls::Tls13CipherSuite {
        common: rustls::CipherSuiteCommon { ..s.common },
        hkdf_provider: &hkdf::HkdfSha256,
        aead_alg: s.aead_alg,
        quic: s.quic,
    })
}

fn own_hkdf(
    suite: rustls::SupportedCipherSuite,
    own: &'static LazyLock<Option<rustls::Tls13CipherSuite>>,
) -> rustls::SupportedCipherSuite {
    own.as_ref().map_or(suite, rustls::SupportedCipherSuite::Tls13)
}

/// rustls' suites by the names Envoy's `cipher_suites` takes (BoringSSL's, as OpenSSL's), and
/// by the IANA names of the TLS 1.3 suites, which Envoy does not let one configure.
const SUITE_NAMES: [(&str, rustls::CipherSuite); 9] = {
    use rustls::CipherSuite as C;
    [
        ("ECDHE-ECDSA-AES128-GCM-SHA256", C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
        ("ECDHE-RSA-AES128-GCM-SHA256", C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
        ("ECDHE-RSA-AES256-GCM-SHA384", C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
        ("ECDHE-RSA-CHACHA20-POLY1305", C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
        ("TLS_AES_128_GCM_SHA256", C::TLS13_AES_128_GCM_SHA256),
        ("TLS_AES_256_GCM_SHA384", C::TLS13_AES_256_GCM_SHA384),
        ("TLS_CHACHA20_POLY1305_SHA256", C::TLS13_CHACHA20_POLY1305_SHA256),
    ]
};

/// Suites BoringSSL knows (Envoy's default server list has them) that rustls does not
/// implement (CBC, SHA-1 MACs, RSA key exchange): skipped, as if the build lacked them.
const SUITES_NOT_IMPLEMENTED: [&str; 10] = [
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
];

/// The suites `names` ask for, in their order, taken from `available` (the provider's): a
/// name of a TLS 1.2 suite (`ECDHE-ECDSA-AES128-GCM-SHA256`) replaces the TLS 1.2 list, a TLS
/// 1.3 one (`TLS_AES_128_GCM_SHA256`) the TLS 1.3 list; a version none of the names is for
/// keeps its default order, as Envoy's `cipher_suites` leaves TLS 1.3 alone. BoringSSL's
/// equal-preference groups (`[A|B]`) count in their written order. An unknown name is an
/// error naming it; known suites rustls lacks (CBC, SHA-1) are skipped, and a list left with
/// nothing usable is an error.
pub fn cipher_suites(
    names: &[String],
    available: &[rustls::SupportedCipherSuite],
) -> Result<Vec<rustls::SupportedCipherSuite>, String> {
    let mut wanted: Vec<rustls::SupportedCipherSuite> = Vec::new();
    for name in names.iter().flat_map(|n| n.trim_matches(|c| c == '[' || c == ']').split('|')) {
        let name = name.trim();
        if SUITES_NOT_IMPLEMENTED.contains(&name) {
            continue;
        }
        let Some((_, id)) = SUITE_NAMES.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = SUITE_NAMES.iter().map(|(n, _)| *n).collect();
            return Err(format!("unknown suite {name:?} (known: {})", known.join(", ")));
        };
        match available.iter().find(|s| s.suite() == *id) {
            Some(s) if !wanted.contains(s) => wanted.push(*s),
            _ => {}
        }
    }
    if wanted.is_empty() {
        return Err(format!("none of {names:?} is implemented (rustls has no CBC or SHA-1 suites)"));
    }
    let tls13 = |s: &rustls::SupportedCipherSuite| s.version() == &rustls::version::TLS13;
    let pick = |of_13: bool| -> Vec<rustls::SupportedCipherSuite> {
        let named: Vec<_> = wanted.iter().filter(|s| tls13(s) == of_13).copied().collect();
        match named.is_empty() {
            true => available.iter().filter(|s| tls13(s) == of_13).copied().collect(),
            false => named,
        }
    };
    Ok(pick(true).into_iter().chain(pick(false)).collect())
}

/// The index of a negotiated suite in `ringside_tls_handshakes_total`'s table (the last,
/// `other`, for a suite it does not name).
pub fn suite_index(suite: rustls::CipherSuite) -> usize {
    let names = &crate::metrics::TLS_SUITES;
    let name = suite.as_str().unwrap_or_default();
    names.iter().position(|n| *n == name).unwrap_or(names.len() - 1)
}

/// TLS 1.3 tickets ringside's server sends after each handshake, full or resumed.
const SERVER_TICKETS: usize = 1;

/// The size given to each of rustls' caches, which keep sessions for `CLIENT_SESSIONS / 8`
/// server names (32; each resumption uses a TLS 1.3 ticket up and the server sends another).
/// Each cache shard is a mutex of rustls' shared by the config's users, every worker: one or
/// a few uncontended locks per outbound handshake.
const CLIENT_SESSIONS: usize = 256;

/// rustls' client cache keeps at most 8 TLS 1.3 tickets per server name. Connections that
/// start together take them faster than finished ones bring new ones back: at 16 and 64 in
/// flight through the mTLS pair, 36 % and 69 % of the handshakes found none and were full
/// ones (a signature and a chain each way). `TicketShards` keeps `TICKET_SHARDS` × 8 per
/// name (a ticket is ≈1 KiB: the server seals our certificate into it).
const TICKET_SHARDS: usize = 8;

/// `TICKET_SHARDS` rustls client caches: tickets go into them in turn and are taken from the
/// first one, in turn, that holds one for the name; the rest (key-exchange hints, TLS 1.2
/// sessions) stays in the first. Each ticket is still used at most once. Nothing is made
/// before it is needed: rustls' cache reserves room for all its servers up front (~10 KiB),
/// and a mesh's 10,000 clusters each have a config of their own though most are never
/// dialled (SPEC §11); the first shard is made at the first handshake, the others at the
/// first ticket that goes past it.
#[derive(Debug, Default)]
struct TicketShards {
    first: std::sync::OnceLock<rustls::client::ClientSessionMemoryCache>,
    more: std::sync::OnceLock<Vec<rustls::client::ClientSessionMemoryCache>>,
    next_insert: std::sync::atomic::AtomicUsize,
    next_take: std::sync::atomic::AtomicUsize,
}

impl TicketShards {
    /// The first shard, made on first use.
    fn first(&self) -> &rustls::client::ClientSessionMemoryCache {
        self.first.get_or_init(|| rustls::client::ClientSessionMemoryCache::new(CLIENT_SESSIONS))
    }

    /// Shard `i` (taken modulo `TICKET_SHARDS`), made on first use.
    fn shard(&self, i: usize) -> &rustls::client::ClientSessionMemoryCache {
        match i % TICKET_SHARDS {
            0 => self.first(),
            k => {
                let more = self.more.get_or_init(|| {
                    (1..TICKET_SHARDS)
                        .map(|_| rustls::client::ClientSessionMemoryCache::new(CLIENT_SESSIONS))
                        .collect()
                });
                // `more` holds TICKET_SHARDS - 1 caches and 1 <= k < TICKET_SHARDS.
                &more[k - 1]
            }
        }
    }

    /// Shard `i` if it was made (a lookup never makes one).
    fn made(&self, i: usize) -> Option<&rustls::client::ClientSessionMemoryCache> {
        match i % TICKET_SHARDS {
            0 => self.first.get(),
            k => self.more.get().map(|more| &more[k - 1]),
        }
    }
}

impl rustls::client::ClientSessionStore for TicketShards {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.first().set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.first.get()?.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.first().set_tls12_session(server_name, value)
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.first.get()?.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        if let Some(c) = self.first.get() {
            c.remove_tls12_session(server_name);
        }
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let i = self.next_insert.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shard(i).insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let start = self.next_take.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..TICKET_SHARDS).find_map(|k| self.made(start.wrapping_add(k))?.take_tls13_ticket(server_name))
    }
}

/// Build the config of `role` from `files` with the process's provider.
pub fn build(files: &Files, role: &Role) -> Result<Configured, Error> {
    build_with(provider(), files, role)
}

/// The parsed contents of a certificate set: read once, shared by every config built from
/// it (an xDS publication's clusters and chains mostly name the same workload files).
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    /// None: no certificate to present (a DestinationRule's `SIMPLE` origination).
    key: Option<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    /// The certificate and its key as a client presents them, made once for every client
    /// config built from this identity: a mesh's 10,000 clusters each have a config of
    /// their own (their SANs differ) but one workload identity (SPEC §11).
    client: std::sync::OnceLock<Arc<rustls::sign::CertifiedKey>>,
    /// Its certificate's `spiffe://` id, parsed once for all its configs.
    principal: std::sync::OnceLock<Option<Arc<str>>>,
}

impl Identity {
    /// Its certificate's `spiffe://` id, if it has one.
    fn principal(&self) -> Option<Arc<str>> {
        self.principal.get_or_init(|| self.certs.first().and_then(spiffe_id).map(Arc::from)).clone()
    }

    /// Its certificate and key for a client (`None`: it presents none).
    fn client_cert(
        &self,
        provider: &CryptoProvider,
    ) -> Result<Option<Arc<rustls::sign::CertifiedKey>>, rustls::Error> {
        let Some(key) = &self.key else { return Ok(None) };
        if let Some(made) = self.client.get() {
            return Ok(Some(Arc::clone(made)));
        }
        // As rustls' `with_client_auth_cert` checks it: a key that does not match fails.
        let made =
            Arc::new(rustls::sign::CertifiedKey::from_der(self.certs.clone(), key.clone_key(), provider)?);
        Ok(Some(Arc::clone(self.client.get_or_init(|| made))))
    }
}

/// A client presenting one certificate whatever the server asks (rustls' own resolver for
/// `with_client_auth_cert`, over a key shared by every config of the identity).
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Read and parse `files`; an error names the file. No certificate and key paths: a client
/// that presents none.
pub fn load(files: &Files) -> Result<Identity, Error> {
    let (certs, key) =
        match files.cert_chain.as_os_str().is_empty() && files.private_key.as_os_str().is_empty() {
            true => (Vec::new(), None),
            false => (load_certs(&files.cert_chain)?, Some(load_key(&files.private_key)?)),
        };
    Ok(Identity {
        certs,
        key,
        roots: Arc::new(load_roots(&files.root_cert)?),
        client: Default::default(),
        principal: Default::default(),
    })
}

/// Build the config of `role` from `files` with `provider` (benchmarks compare providers).
pub fn build_with(provider: Arc<CryptoProvider>, files: &Files, role: &Role) -> Result<Configured, Error> {
    build_from(provider, files, &load(files)?, role)
}

/// As [`build_with`], with the cache of verified peer chains on or off whatever
/// `RINGSIDE_TLS_CHAIN_CACHE` says (benchmarks compare both in one process).
pub fn build_with_chain_cache(
    provider: Arc<CryptoProvider>,
    files: &Files,
    role: &Role,
    chain_cache: bool,
) -> Result<Configured, Error> {
    build_configured(provider, files, &load(files)?, role, chain_cache)
}

/// Build the config of `role` from `identity`, read from `files` (named in errors).
fn build_from(
    provider: Arc<CryptoProvider>,
    files: &Files,
    identity: &Identity,
    role: &Role,
) -> Result<Configured, Error> {
    build_configured(provider, files, identity, role, chains::enabled())
}

fn build_configured(
    provider: Arc<CryptoProvider>,
    files: &Files,
    identity: &Identity,
    role: &Role,
    chain_cache: bool,
) -> Result<Configured, Error> {
    let roots = Arc::clone(&identity.roots);
    let local_principal = identity.principal();
    let key_err = |source| Error::Rustls { source, path: files.private_key.clone() };
    let versions = rustls::ALL_VERSIONS;
    let chains = chain_cache.then(|| Arc::new(chains::Chains::default()));
    let provider = match role.cipher_suites() {
        [] => provider,
        names => {
            let suites = cipher_suites(names, &provider.cipher_suites).map_err(Error::CipherSuites)?;
            Arc::new(CryptoProvider { cipher_suites: suites, ..(*provider).clone() })
        }
    };
    match role {
        Role::Server {
            alpn,
            require_client_certificate,
            subject_alt_names,
            subject_alt_name_prefixes,
            ..
        } => {
            let (certs, key) = (identity.certs.clone(), identity.key.as_ref().map(PrivateKeyDer::clone_key));
            let key =
                key.ok_or_else(|| file_err(&files.private_key, "a server needs a certificate and key"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            let verifier = match require_client_certificate {
                true => verifier,
                false => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| Error::File { path: files.root_cert.clone(), why: e.to_string() })?;
            // The chain's verdict may come from the cache; the SAN matchers run every time.
            let names =
                SanNames { exact: subject_alt_names.clone(), prefixes: subject_alt_name_prefixes.clone() };
            let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
                match chains.is_none() && names.is_empty() {
                    true => verifier,
                    false => Arc::new(ClientVerifier { inner: verifier, chains: chains.clone(), names }),
                };
            let mut c = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .map_err(key_err)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .map_err(key_err)?;
            c.alpn_protocols = server_alpn(alpn);
            // Our suite order, not the client's: OpenSSL and Python clients put AES-256-GCM
            // first; BoringSSL's server picks AES-128-GCM.
            c.ignore_client_order = true;
            // Stateless tickets (sealed with AES-256-GCM, `tls::tickets`; keys rotated every
            // 6 h by rustls' rotator) rather than the default stateful cache, a mutex shared
            // by every worker. A rebuilt config (a rotated certificate or root) has a new
            // ticketer: earlier tickets no longer resume, so the next handshake is a full one
            // against the new files.
            c.ticketer = tickets::ticketer().map_err(key_err)?;
            // One ticket per handshake, not rustls' (and BoringSSL's) two: each resumed
            // handshake uses one up and brings one back, so a client's pool stays as large
            // as the most handshakes it ever had in flight (a miss is a full handshake that
            // adds one). The second ticket cost every handshake a ticket sealed, a record
            // each way and a ~1 KiB session stored, and Envoy's client keeps only the last.
            c.send_tls13_tickets = SERVER_TICKETS;
            // After the handshake ringside protects the records itself (`tls::record`).
            c.enable_secret_extraction = true;
            Ok(Configured {
                server: Some(Arc::new(c)),
                client: None,
                local_principal,
                server_name: None,
                chains,
            })
        }
        Role::Client { subject_alt_names, subject_alt_name_prefixes, server_name, alpn, mesh, .. } => {
            let verifier = Arc::new(SpiffeVerifier {
                roots,
                names: SanNames {
                    exact: subject_alt_names.clone(),
                    prefixes: subject_alt_name_prefixes.clone(),
                },
                mesh: *mesh,
                algs: provider.signature_verification_algorithms,
                chains: chains.clone(),
            });
            let cert = identity.client_cert(&provider).map_err(key_err)?;
            let builder = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .map_err(key_err)?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let mut c = match cert {
                Some(cert) => builder.with_client_cert_resolver(Arc::new(ClientCert(cert))),
                None => builder.with_no_client_auth(),
            };
            // Sessions are cached in this config, built per cluster TLS context (files and
            // expected identities, `Certs::next`): rustls does not verify the server again on
            // resumption, so a session can only come from a handshake whose server passed
            // this very verifier. A rebuilt config (rotation) starts with an empty cache.
            c.resumption = rustls::client::Resumption::store(Arc::new(TicketShards::default()));
            c.alpn_protocols = match alpn.is_empty() && *mesh {
                true => istio_alpn(),
                false => alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
            };
            // After the handshake ringside protects the records itself (`tls::record`).
            c.enable_secret_extraction = true;
            let server_name = server_name.as_deref().and_then(|n| ServerName::try_from(n.to_owned()).ok());
            Ok(Configured { server: None, client: Some(Arc::new(c)), local_principal, server_name, chains })
        }
    }
}

/// Istio's mesh ALPN: `istio-peer-exchange`, then `istio`.
fn istio_alpn() -> Vec<Vec<u8>> {
    vec![ALPN_PEER_EXCHANGE.to_vec(), ALPN_ISTIO.to_vec()]
}

/// The server's ALPN: as configured (else Istio's), and `istio` last when missing. rustls
/// fails a handshake whose client offers ALPN the server lacks, where Envoy (BoringSSL)
/// goes on without one: an Istio client offering only `istio` must still get through
/// (istiod's TCP inbound list is `istio-peer-exchange`, `h2`, `http/1.1`).
fn server_alpn(alpn: &[String]) -> Vec<Vec<u8>> {
    if alpn.is_empty() {
        return istio_alpn();
    }
    let mut out: Vec<Vec<u8>> = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if !out.iter().any(|p| p == ALPN_ISTIO) {
        out.push(ALPN_ISTIO.to_vec());
    }
    out
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::File { path: path.to_owned(), why: why.to_string() }
}

/// Read a PEM certificate chain (leaf first); at least one certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = match secrets::is_secret(path) {
        true => CertificateDer::pem_slice_iter(&secret(path)?.pem).collect::<Result<Vec<_>, _>>(),
        false => CertificateDer::pem_file_iter(path)
            .map_err(|e| file_err(path, pem_why(e)))?
            .collect::<Result<Vec<_>, _>>(),
    }
    .map_err(|e| file_err(path, pem_why(e)))?;
    if certs.is_empty() {
        return Err(file_err(path, "no CERTIFICATE in PEM file"));
    }
    Ok(certs)
}

/// Read a PEM private key: `RSA PRIVATE KEY` (PKCS#1), `EC PRIVATE KEY` (SEC1) or
/// `PRIVATE KEY` (PKCS#8).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    match secrets::is_secret(path) {
        true => PrivateKeyDer::from_pem_slice(&secret(path)?.pem),
        false => PrivateKeyDer::from_pem_file(path),
    }
    .map_err(|e| file_err(path, pem_why(e)))
}

/// A secret received over SDS, read where a file would be (`tls/secrets.rs`).
fn secret(path: &Path) -> Result<Arc<secrets::Part>, Error> {
    secrets::get(path).ok_or_else(|| file_err(path, "SDS secret not received (yet)"))
}

fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| file_err(path, format!("bad root certificate: {e}")))?;
    }
    Ok(roots)
}

/// pki-types' PEM errors say "no items found" for an empty file; name the sections we want.
fn pem_why(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::NoItemsFound => "no usable PEM section (want CERTIFICATE or a PRIVATE KEY)".into(),
        E::Io(e) => e.to_string(),
        other => format!("bad PEM: {other:?}"),
    }
}

/// The principals (`spiffe_id`) of the peer certificates a worker's handshakes saw last, by
/// the certificate's bytes (`crate::recent`): a peer presents the same certificate on every
/// connection until it rotates. At most 16 certificates of at most 16 KiB.
pub type Principals = crate::recent::Recent<Option<Arc<str>>, 16, { 16 * 1024 }>;

/// The `spiffe://` URI SAN of a certificate (Istio's workload identity), if it has one.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
        _ => None,
    })
}

/// The names an RBAC `authenticated.principal_name` is matched against, in Envoy's order
/// (`AuthenticatedMatcher`): every URI SAN, then every DNS SAN, then the subject as Envoy
/// prints it (RFC 2253: the last RDN first, `CN=a,O=b`; no escaping of special characters).
/// An unparsable certificate has none.
pub fn peer_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let sans = parsed.subject_alternative_name().ok().flatten();
    let general = sans.iter().flat_map(|s| s.value.general_names.iter());
    let mut names: Vec<String> = general
        .clone()
        .filter_map(|n| if let GeneralName::URI(u) = n { Some((*u).to_owned()) } else { None })
        .collect();
    names.extend(
        general.filter_map(|n| if let GeneralName::DNSName(d) = n { Some((*d).to_owned()) } else { None }),
    );
    let registry = x509_parser::objects::oid_registry();
    let mut rdns: Vec<String> = parsed
        .subject()
        .iter_rdn()
        .map(|rdn| {
            let attrs: Vec<String> = rdn
                .iter()
                .map(|a| {
                    let key = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                        .map_or_else(|_| a.attr_type().to_id_string(), str::to_string);
                    format!("{key}={}", a.as_str().unwrap_or(""))
                })
                .collect();
            attrs.join("+")
        })
        .collect();
    rdns.reverse();
    names.push(rdns.join(","));
    names
}

/// Every URI SAN of a certificate, and its DNS SANs (empty when it does not parse).
fn subject_alt_names(cert: &CertificateDer<'_>) -> (Vec<String>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref())
        && let Ok(Some(san)) = parsed.subject_alternative_name()
    {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

/// xDS SAN matchers (SPEC §9): exact names and prefixes, any of them matching any SAN.
#[derive(Debug)]
struct SanNames {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl SanNames {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    fn any_matches<'a>(&self, mut sans: impl Iterator<Item = &'a String>) -> bool {
        sans.any(|san| self.exact.contains(san) || self.prefixes.iter().any(|p| san.starts_with(p.as_str())))
    }
}

/// A server's client-certificate check (rustls' WebPKI one): the chain's verdict from the
/// config's cache of verified chains when it holds the chain, else the mesh root's (then
/// cached); then, with the chain's SAN matchers (a DownstreamTlsContext's
/// `match_subject_alt_names`), a URI SAN must match. Everything else is the inner verifier's.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    chains: Option<Arc<chains::Chains>>,
    names: SanNames,
}

impl rustls::server::danger::ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = match &self.chains {
            Some(c) if c.holds(end_entity, intermediates, now) => {
                rustls::server::danger::ClientCertVerified::assertion()
            }
            _ => {
                let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
                if let Some(c) = &self.chains {
                    c.insert(end_entity, intermediates);
                }
                verified
            }
        };
        match self.names.is_empty() || self.names.any_matches(subject_alt_names(end_entity).0.iter()) {
            true => Ok(verified),
            false => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies an upstream: the chain against the root, then its names. Istio's `ISTIO_MUTUAL`
/// (`mesh`): instead of a DNS name, every URI SAN against the SAN matchers (any mesh identity
/// when there are none). A DestinationRule's `SIMPLE`/`MUTUAL`: the matchers against every
/// URI and DNS SAN (Envoy's untyped matchers match any SAN), and without matchers the server
/// name we sent, as any TLS client checks a hostname.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    names: SanNames,
    mesh: bool,
    algs: WebPkiSupportedAlgorithms,
    /// Server chains already verified against `roots` (the SANs are checked every time).
    chains: Option<Arc<chains::Chains>>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let cached = self.chains.as_ref().is_some_and(|c| c.holds(end_entity, intermediates, now));
        if !cached {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.algs.all,
            )?;
            if let Some(c) = &self.chains {
                c.insert(end_entity, intermediates);
            }
        }
        let valid = match (self.names.is_empty(), self.mesh) {
            (true, true) => true,
            (false, true) => self.names.any_matches(subject_alt_names(end_entity).0.iter()),
            (false, false) => {
                let (uris, dns) = subject_alt_names(end_entity);
                self.names.any_matches(uris.iter().chain(&dns))
            }
            // No SNI (an IP endpoint without a service host): the chain alone, as Envoy.
            (true, false) => match server_name {
                ServerName::DnsName(_) => rustls::client::verify_server_name(&cert, server_name).is_ok(),
                _ => true,
            },
        };
        if !valid {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// What identifies a file version: a rename onto the path (the Istio agent, Kubernetes'
/// `..data` symlink swap) changes the inode, an in-place write the mtime or length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    if secrets::is_secret(path) {
        // A secret in memory: its version is its identity (no device has id u64::MAX).
        let part = secrets::get(path)?;
        let len = part.pem.len() as u64;
        return Some(Fingerprint { dev: u64::MAX, ino: part.version, mtime_ns: 0, len });
    }
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        len: m.len(),
    })
}

/// The fingerprints of a set's three files.
type Fingerprints = [Option<Fingerprint>; 3];

fn fingerprints(f: &Files) -> Fingerprints {
    [fingerprint(&f.cert_chain), fingerprint(&f.private_key), fingerprint(&f.root_cert)]
}

/// Poll the files of every group `groups` returns each `period` on a side thread (never a
/// worker) and reload the slots whose files changed since they were last loaded. A failed
/// load logs one line naming the file and keeps the previous config; it is retried when
/// the files change again. `groups` is asked each time, so slots built later (xDS
/// resources) are watched too; `None` ends the thread.
pub fn watch(
    groups: impl Fn() -> Option<Arc<[Group]>> + Send + 'static,
    period: Duration,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("tls-reload".into()).spawn(move || {
        // A secret pushed over SDS wakes this thread: a rotation is used at once, not at
        // the next period.
        secrets::watch_from_here();
        let mut round = Round::default();
        loop {
            std::thread::park_timeout(period);
            let Some(groups) = groups() else { return };
            round.run(groups);
        }
    })?;
    Ok(())
}

/// What the reload thread saw last round: the groups and their files' fingerprints then.
/// Every slot of a group matched those fingerprints when the round ended, so a round with
/// the same groups and unchanged files looks at no slot.
#[derive(Default)]
struct Round {
    groups: Option<Arc<[Group]>>,
    seen: Vec<Fingerprints>,
}

impl Round {
    /// Look at each group's files once; in a group whose files changed (or that is new),
    /// reload each slot that last loaded other files, reading them once. Returns the number
    /// of slots looked at.
    fn run(&mut self, groups: Arc<[Group]>) -> usize {
        let same = self.groups.as_ref().is_some_and(|g| Arc::ptr_eq(g, &groups));
        let mut seen = Vec::with_capacity(groups.len());
        let mut looked = 0;
        for (i, group) in groups.iter().enumerate() {
            let now = fingerprints(&group.files);
            seen.push(now);
            if same && self.seen.get(i) == Some(&now) {
                continue;
            }
            let mut read: Option<Option<Identity>> = None;
            for slot in &group.slots {
                looked += 1;
                if now == **slot.seen.load() {
                    continue;
                }
                slot.seen.store(Arc::new(now));
                let identity = read.get_or_insert_with(|| match load(&group.files) {
                    Ok(identity) => {
                        log::info!("tls: reloaded {}", group.files.cert_chain.display());
                        Some(identity)
                    }
                    Err(e) => {
                        log::warn!("tls: reload failed, previous certificate stays in use: {e}");
                        None
                    }
                });
                if let Some(identity) = identity
                    && let Err(e) = slot.rebuild(identity)
                {
                    log::warn!("tls: reload failed, previous certificate stays in use: {e}");
                }
            }
        }
        (self.groups, self.seen) = (Some(groups), seen);
        looked
    }
}

#[cfg(test)]
mod tests;
