//! Secrets over SDS (SPEC §10): what a `Secret` as Istio's agent sends it
//! (`tls_certificate` or `validation_context`, PEM inline) gives, checked before it is used —
//! a secret that does not parse, a key that does not match its certificate, a validation
//! context asking for what ringside cannot check: an error naming it, and the previous
//! version stays. Its parts go to the in-memory store (`tls::secrets`) that TLS contexts read
//! as files. Pure but for [`store`]; the stream lives beside the ADS stream (`xds/mod.rs`).

use std::path::PathBuf;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::Any;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::proto::decode;
use crate::tls::secrets;

/// Type URL of a Secret resource.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A secret that cannot be used: which one and why (the NACK's error_detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Secret/{name}: {reason}")]
pub struct Error {
    /// The secret's name (`#N` when it has none).
    pub name: String,
    /// What is wrong, a lowercase fragment.
    pub reason: String,
}

/// A secret checked and ready to store: its name and its parts (store path, PEM).
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Its name (`default`, `ROOTCA`, `kubernetes://NAME`, ...).
    pub name: String,
    /// The parts it replaces: a certificate chain and key, or a trusted CA.
    pub parts: Vec<(PathBuf, Vec<u8>)>,
}

/// Decode and check the `index`th resource of a response.
pub fn secret(any: &Any, index: usize) -> Result<Decoded, Error> {
    let unnamed = |reason: String| Error { name: format!("#{index}"), reason };
    let pb: tls::Secret = decode(any, SECRET).map_err(unnamed)?;
    if pb.name.is_empty() {
        return Err(unnamed("a secret without a name".into()));
    }
    let name = pb.name.clone();
    parts(pb).map(|parts| Decoded { name: name.clone(), parts }).map_err(|reason| Error { name, reason })
}

/// Put a decoded secret where TLS contexts read it.
pub fn store(d: Decoded) {
    secrets::put(d.parts);
}

/// Whether secret `name` has arrived (and was valid).
pub fn arrived(name: &str) -> bool {
    secrets::get(&secrets::cert_chain(name)).is_some() || secrets::get(&secrets::root_cert(name)).is_some()
}

fn parts(pb: tls::Secret) -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    use tls::secret::Type;
    let name = pb.name.as_str();
    match pb.r#type {
        Some(Type::TlsCertificate(c)) => {
            if c.private_key_provider.is_some() || c.password.is_some() {
                return Err("tls_certificate with a private key provider or password: not served".into());
            }
            let chain = inline(c.certificate_chain.as_ref(), "certificate_chain")?;
            let key = inline(c.private_key.as_ref(), "private_key")?;
            let certs = CertificateDer::pem_slice_iter(&chain)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("certificate_chain: bad PEM: {e:?}"))?;
            if certs.is_empty() {
                return Err("certificate_chain: no CERTIFICATE in PEM".into());
            }
            for (i, c) in certs.iter().enumerate() {
                x509_parser::parse_x509_certificate(c)
                    .map_err(|e| format!("certificate_chain: certificate {i} is not X.509: {e}"))?;
            }
            let der =
                PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("private_key: bad PEM: {e:?}"))?;
            // The key must be one rustls can sign with and match the leaf, as Envoy checks
            // (BoringSSL's SSL_CTX_check_private_key): else every handshake would fail later.
            rustls::sign::CertifiedKey::from_der(certs, der, &crate::tls::provider())
                .map_err(|e| format!("tls_certificate: {e}"))?;
            Ok(vec![(secrets::cert_chain(name), chain), (secrets::private_key(name), key)])
        }
        Some(Type::ValidationContext(v)) => {
            if let Some(why) = super::tls::unchecked(&v) {
                return Err(format!("validation_context {why}"));
            }
            let ca = inline(v.trusted_ca.as_ref(), "trusted_ca")?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                let c = c.map_err(|e| format!("trusted_ca: bad PEM: {e:?}"))?;
                roots.add(c).map_err(|e| format!("trusted_ca: bad root certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("trusted_ca: no CERTIFICATE in PEM".into());
            }
            Ok(vec![(secrets::root_cert(name), ca)])
        }
        Some(Type::SessionTicketKeys(_)) => Err("session_ticket_keys: not served".into()),
        Some(Type::GenericSecret(_)) => Err("generic_secret: not served".into()),
        None => Err("a secret without a type".into()),
    }
}

/// The bytes of a data source as the agent sends them (inline); a file or environment
/// variable is not what an SDS server sends, and is refused rather than read.
fn inline(d: Option<&core::DataSource>, what: &str) -> Result<Vec<u8>, String> {
    use core::data_source::Specifier;
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(_) => Err(format!("{what}: only inline bytes or string are served")),
        None => Err(format!("{what}: missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::fixtures::any;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    fn pem_pair(ca: bool) -> (String, String) {
        let mut p = CertificateParams::new(vec!["app.example.com".to_string()]).unwrap();
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let key = KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn bytes(b: &str) -> Option<core::DataSource> {
        Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineBytes(b.as_bytes().to_vec())),
            ..Default::default()
        })
    }

    fn certificate(name: &str, chain: &str, key: &str) -> Any {
        any(
            SECRET,
            &tls::Secret {
                name: name.into(),
                r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                    certificate_chain: bytes(chain),
                    private_key: bytes(key),
                    ..Default::default()
                })),
            },
        )
    }

    fn validation(name: &str, v: tls::CertificateValidationContext) -> Any {
        any(SECRET, &tls::Secret { name: name.into(), r#type: Some(tls::secret::Type::ValidationContext(v)) })
    }

    #[test]
    fn a_tls_certificate_and_a_validation_context_as_the_agent_sends_them_give_their_parts() {
        let (chain, key) = pem_pair(false);
        let d = secret(&certificate("default", &chain, &key), 0).unwrap();
        assert_eq!(d.name, "default");
        assert_eq!(
            d.parts,
            [
                (secrets::cert_chain("default"), chain.into_bytes()),
                (secrets::private_key("default"), key.into_bytes())
            ]
        );
        let (root, _) = pem_pair(true);
        let v = tls::CertificateValidationContext { trusted_ca: bytes(&root), ..Default::default() };
        let d = secret(&validation("ROOTCA", v), 1).unwrap();
        assert_eq!(d.parts, [(secrets::root_cert("ROOTCA"), root.into_bytes())]);
    }

    #[test]
    fn a_secret_that_does_not_parse_is_an_error_naming_it_and_why() {
        let (chain, key) = pem_pair(false);
        let (_, other_key) = pem_pair(false);
        let reason = |a: Any| secret(&a, 3).unwrap_err().to_string();
        assert!(
            reason(certificate("default", "garbage", &key)).starts_with("Secret/default: certificate_chain")
        );
        let not_x509 = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let r = reason(certificate("default", not_x509, &key));
        assert!(r.starts_with("Secret/default: certificate_chain: certificate 0 is not X.509"), "{r}");
        let r = reason(certificate("default", &chain, "-----BEGIN PRIVATE KEY-----\nAAAA\n"));
        assert!(r.starts_with("Secret/default: private_key"), "{r}");
        let r = reason(certificate("kubernetes://app", &chain, &other_key));
        assert!(r.starts_with("Secret/kubernetes://app: tls_certificate:"), "{r}");
        let empty = tls::CertificateValidationContext { trusted_ca: bytes(""), ..Default::default() };
        assert!(reason(validation("ROOTCA", empty)).contains("trusted_ca: no CERTIFICATE"));
        let nameless = any(SECRET, &tls::Secret::default());
        assert_eq!(reason(nameless), "Secret/#3: a secret without a name");
        let file = tls::CertificateValidationContext {
            trusted_ca: Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::Filename("/etc/root.pem".into())),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(reason(validation("ROOTCA", file)).contains("only inline"));
    }

    #[test]
    fn a_validation_context_secret_with_a_crl_or_pins_is_refused_never_served_weaker() {
        let (root, _) = pem_pair(true);
        let with = |f: &dyn Fn(&mut tls::CertificateValidationContext)| {
            let mut v = tls::CertificateValidationContext { trusted_ca: bytes(&root), ..Default::default() };
            f(&mut v);
            secret(&validation("kubernetes://app-cacert", v), 0).unwrap_err().to_string()
        };
        assert!(with(&|v| v.crl = bytes("crl")).contains("crl"));
        assert!(
            with(&|v| v.verify_certificate_spki = vec!["pin".into()]).contains("verify_certificate_spki")
        );
        assert!(with(&|v| v.verify_certificate_hash = vec!["ab".into()]).contains("verify_certificate_hash"));
    }
}
