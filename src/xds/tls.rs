//! TLS contexts of xDS resources (SPEC §7, §9): a chain's DownstreamTlsContext, a cluster's
//! UpstreamTlsContext (its `transport_socket` or istiod's `transport_socket_matches`), the SDS
//! secrets they name (`default`/`ROOTCA` from `xds.certificates`, `file-cert:`/`file-root:`).
//! What cannot be served as written is an error, never plaintext instead. Pure.

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{Any, value::Kind};

use super::proto::decode;
use crate::config::{CertificateFiles, ChainTls, ClusterTls, ClusterTlsMode, Secrets, SocketMatch};

pub(super) const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub(super) const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub(super) const RAW_BUFFER: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
/// Istio agent's SDS secret of the workload certificate and key.
pub const SECRET_CERTIFICATE: &str = "default";
/// Istio agent's SDS secret of the mesh root.
pub const SECRET_ROOT: &str = "ROOTCA";
/// Istio's SDS name for a certificate and key in files: `file-cert:CERT~KEY`.
const FILE_CERT: &str = "file-cert:";
/// Istio's SDS name for a root in a file: `file-root:ROOT`.
const FILE_ROOT: &str = "file-root:";

/// A transport socket's TLS context (`Any` of `tls_type`), `None` for raw_buffer; any other
/// kind is an error: serving plaintext where TLS was asked is never an option.
fn transport_socket<'a>(ts: &'a core::TransportSocket, tls_type: &str) -> Result<Option<&'a Any>, String> {
    use core::transport_socket::ConfigType;
    match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) if any.type_url == tls_type => Ok(Some(any)),
        Some(ConfigType::TypedConfig(any)) if any.type_url == RAW_BUFFER => Ok(None),
        None if ts.name == "envoy.transport_sockets.raw_buffer" || ts.name == "raw_buffer" => Ok(None),
        Some(ConfigType::TypedConfig(any)) => {
            Err(format!("transport socket {:?} of type {:?}: not served", ts.name, any.type_url))
        }
        None => Err(format!("transport socket {:?} without typed_config: not served", ts.name)),
    }
}

/// What a CommonTlsContext gives: the secrets it names, the files known so far (a
/// `file-cert:`/`file-root:` name; `default`/`ROOTCA` are resolved by [`State::merge`]),
/// ALPN and the SAN matchers.
#[derive(Debug, PartialEq)]
struct Common {
    secrets: Secrets,
    files: CertificateFiles,
    alpn: Vec<String>,
    sans: Vec<String>,
    san_prefixes: Vec<String>,
    cipher_suites: Vec<String>,
}

/// Read the parts of a CommonTlsContext istiod writes (SPEC §7, §9): for ISTIO_MUTUAL the
/// workload certificate and the root as the agent's SDS secrets; for a DestinationRule's
/// SIMPLE/MUTUAL the CA and client certificate as `file-cert:`/`file-root:` or
/// `kubernetes://` secrets, or as files inline (`tls_certificates`, `validation_context`
/// with `filename`s); the SAN matchers (exact and prefix URI SANs); ALPN. What cannot be
/// served as written is an error: another kind of SAN matcher, a validation context asking
/// for what ringside cannot check (CRL, pins), no validation at all. `client`: a context
/// without a certificate is a client that presents none (SIMPLE); a server needs one.
fn tls_context(common: Option<&tls::CommonTlsContext>, client: bool) -> Result<Common, String> {
    use tls::common_tls_context::ValidationContextType as V;
    let common = common.ok_or("TLS without common_tls_context")?;
    let mut files = CertificateFiles::default();
    let mut over_ads = Vec::new();
    let mut note = |s: &tls::SdsSecretConfig| {
        if over_ads_config(s) {
            over_ads.push(s.name.clone());
        }
        s.name.clone()
    };
    let certificate = match (&common.tls_certificate_sds_secret_configs[..], &common.tls_certificates[..]) {
        ([one], []) => note(one),
        ([], [inline]) => {
            if inline.private_key_provider.is_some() || inline.password.is_some() {
                return Err("tls_certificates with a private key provider or password: not served".into());
            }
            files.cert_chain =
                filename(inline.certificate_chain.as_ref(), "tls_certificates certificate_chain")?;
            files.private_key = filename(inline.private_key.as_ref(), "tls_certificates private_key")?;
            String::new()
        }
        ([], []) if client => String::new(),
        ([], []) => return Err("no tls_certificate_sds_secret_configs: no certificate to present".into()),
        ([_, _, ..], _) => return Err("more than one tls_certificate_sds_secret_configs: not served".into()),
        _ => return Err("more than one certificate (tls_certificates and SDS): not served".into()),
    };
    let (validation, context) = match &common.validation_context_type {
        Some(V::CombinedValidationContext(c)) => {
            let name = c.validation_context_sds_secret_config.as_ref().map(&mut note);
            (
                name.ok_or("combined_validation_context without validation_context_sds_secret_config")?,
                c.default_validation_context.as_ref(),
            )
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => (note(s), None),
        Some(V::ValidationContext(v)) => {
            // A DestinationRule's caCertificates as a file (Envoy reads it, ringside too).
            if v.trusted_ca.is_none() {
                return Err("validation_context without trusted_ca: the peer would not be verified".into());
            }
            files.root_cert = filename(v.trusted_ca.as_ref(), "validation_context trusted_ca")?;
            (String::new(), Some(v))
        }
        Some(_) => return Err("validation by certificate provider: not served".into()),
        None => return Err("no validation context: the peer would not be verified".into()),
    };
    if let Some(why) = context.and_then(unchecked) {
        return Err(format!("validation context {why}"));
    }
    // Names other than these are resolved by the merge: over SDS when there is an SDS
    // server, else an error there.
    if let Some(pair) = certificate.strip_prefix(FILE_CERT) {
        let (cert, key) = pair
            .split_once('~')
            .ok_or_else(|| format!("SDS secret {certificate:?}: want file-cert:CERT~KEY"))?;
        files.cert_chain = cert.to_string();
        files.private_key = key.to_string();
    }
    if let Some(root) = validation.strip_prefix(FILE_ROOT) {
        files.root_cert = root.to_string();
    }
    let (mut sans, mut san_prefixes) = (Vec::new(), Vec::new());
    if let Some(v) = context {
        use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern as P;
        let uri = tls::subject_alt_name_matcher::SanType::Uri as i32;
        // istiod still writes the deprecated untyped matchers (URI SANs by meaning).
        #[allow(deprecated)]
        let untyped = &v.match_subject_alt_names;
        let typed = v.match_typed_subject_alt_names.iter().map(|m| (m.san_type == uri, m.matcher.as_ref()));
        for (is_uri, m) in untyped.iter().map(|m| (true, Some(m))).chain(typed) {
            match m.and_then(|m| m.match_pattern.as_ref().filter(|_| is_uri && !m.ignore_case)) {
                Some(P::Exact(id)) => sans.push(id.clone()),
                Some(P::Prefix(p)) => san_prefixes.push(p.clone()),
                _ => return Err("SAN matcher other than an exact or prefix URI: not served".into()),
            }
        }
    }
    Ok(Common {
        secrets: Secrets { certificate, validation, over_ads },
        files,
        alpn: common.alpn_protocols.clone(),
        sans,
        san_prefixes,
        // Checked where the config is built (tls::cipher_suites): an unknown name NACKs.
        cipher_suites: common.tls_params.as_ref().map(|p| p.cipher_suites.clone()).unwrap_or_default(),
    })
}

/// Whether a secret is fetched over the ADS stream (`sds_config: {ads: {}}`, istiod's shape
/// for `credentialName`), rather than from the SDS server (the agent's `sds-grpc`).
fn over_ads_config(s: &tls::SdsSecretConfig) -> bool {
    use core::config_source::ConfigSourceSpecifier;
    matches!(
        s.sds_config.as_ref().and_then(|c| c.config_source_specifier.as_ref()),
        Some(ConfigSourceSpecifier::Ads(_))
    )
}

/// The file a data source names (DestinationRule files inline in a TLS context); inline PEM
/// in a resource is not what istiod writes, and is refused.
fn filename(d: Option<&core::DataSource>, what: &str) -> Result<String, String> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(core::data_source::Specifier::Filename(f)) => Ok(f.clone()),
        Some(_) => Err(format!("{what}: only a filename is served")),
        None => Err(format!("{what}: missing")),
    }
}

/// A filter chain's transport socket: its DownstreamTlsContext (terminated with its ALPN,
/// requiring client certificates if it says so), `None` for raw_buffer. `matched`: the
/// application protocols the chain's match names, which its ALPN takes after its own (empty:
/// Istio's): rustls ends a handshake whose client offers none of the server's protocols
/// (`no_application_protocol`) where Envoy goes on without one, and a chain chosen by the
/// client's ALPN must not refuse that client (an Envoy offering only `istio-http/1.1` to
/// istiod's HTTP chain, whose own ALPN is `h2`, `http/1.1`).
pub(super) fn downstream(ts: &core::TransportSocket, matched: &[String]) -> Result<Option<ChainTls>, String> {
    let Some(any) = transport_socket(ts, DOWNSTREAM_TLS)? else { return Ok(None) };
    let ctx: tls::DownstreamTlsContext = decode(any, DOWNSTREAM_TLS)?;
    let common = tls_context(ctx.common_tls_context.as_ref(), false)?;
    let mut alpn = common.alpn;
    if alpn.is_empty() && !matched.is_empty() {
        alpn = [crate::tls::ALPN_PEER_EXCHANGE, crate::tls::ALPN_ISTIO]
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
    }
    for p in matched {
        if !alpn.contains(p) {
            alpn.push(p.clone());
        }
    }
    Ok(Some(ChainTls {
        secrets: common.secrets,
        files: common.files,
        alpn,
        require_client_certificate: ctx.require_client_certificate.is_some_and(|b| b.value),
        subject_alt_names: common.sans,
        subject_alt_name_prefixes: common.san_prefixes,
        cipher_suites: common.cipher_suites,
    }))
}

/// A cluster's upstream TLS (ISTIO_MUTUAL): its `transport_socket` or its
/// `transport_socket_matches` (istiod's `tlsMode-istio` with the context, then
/// `tlsMode-disabled` plaintext for endpoints without a sidecar).
pub(super) fn cluster_tls(pb: &cds::Cluster) -> Result<Option<ClusterTls>, String> {
    if pb.transport_socket_matcher.is_some() {
        // It could ask for TLS: refused rather than served in plaintext.
        return Err("transport_socket_matcher: not served (transport_socket_matches are)".into());
    }
    let mut context: Option<(Any, String)> = None;
    let mut take = |ts: &Option<core::TransportSocket>, what: String| -> Result<bool, String> {
        let Some(ts) = ts else { return Ok(false) };
        let Some(any) = transport_socket(ts, UPSTREAM_TLS).map_err(|r| format!("{what}: {r}"))? else {
            return Ok(false);
        };
        match &context {
            Some((seen, first)) if seen != any => {
                Err(format!("{what}: a TLS context other than {first}'s: not served"))
            }
            _ => {
                context.get_or_insert_with(|| (any.clone(), what));
                Ok(true)
            }
        }
    };
    let default_tls = take(&pb.transport_socket, "transport_socket".into())?;
    let mut matches = Vec::new();
    for m in &pb.transport_socket_matches {
        let what = format!("transport_socket_matches {:?}", m.name);
        let tls = take(&m.transport_socket, what.clone())?;
        let mut criteria = std::collections::BTreeMap::new();
        for (k, v) in m.r#match.iter().flat_map(|s| &s.fields) {
            match &v.kind {
                Some(Kind::StringValue(v)) => criteria.insert(k.clone(), v.clone()),
                _ => return Err(format!("{what}: match {k:?} is not a string: not served")),
            };
        }
        matches.push(SocketMatch { name: m.name.clone(), criteria, tls });
    }
    let Some((any, what)) = context else { return Ok(None) };
    let ctx: tls::UpstreamTlsContext = decode(&any, UPSTREAM_TLS).map_err(|r| format!("{what}: {r}"))?;
    let common = tls_context(ctx.common_tls_context.as_ref(), true).map_err(|r| format!("{what}: {r}"))?;
    let s = &common.secrets;
    // Envoy makes no difference; ringside verifies the agent's workload identity the mesh's
    // way (SPIFFE, any mesh identity), anything else as a DestinationRule's origination.
    let mode = match (s.certificate.as_str(), s.validation.as_str()) {
        (SECRET_CERTIFICATE, SECRET_ROOT) => ClusterTlsMode::IstioMutual,
        ("", _) if common.files.cert_chain.is_empty() => ClusterTlsMode::Simple,
        _ => ClusterTlsMode::Mutual,
    };
    let named = !s.certificate.is_empty() || !s.validation.is_empty();
    Ok(Some(ClusterTls {
        mode,
        cert_chain: common.files.cert_chain,
        private_key: common.files.private_key,
        root_cert: common.files.root_cert,
        subject_alt_names: common.sans,
        cipher_suites: common.cipher_suites,
        subject_alt_name_prefixes: common.san_prefixes,
        secrets: named.then_some(common.secrets),
        alpn: common.alpn,
        sni: (!ctx.sni.is_empty()).then_some(ctx.sni),
        endpoint_matches: matches,
        unmatched_plaintext: !default_tls,
    }))
}

/// What a validation context asks for that ringside cannot check, or that would verify less
/// than it says: serving it anyway would be weaker, so the resource is refused (SPEC §9).
pub(super) fn unchecked(v: &tls::CertificateValidationContext) -> Option<String> {
    let asks = [
        (v.crl.is_some(), "crl"),
        (!v.verify_certificate_spki.is_empty(), "verify_certificate_spki"),
        (!v.verify_certificate_hash.is_empty(), "verify_certificate_hash"),
        (v.custom_validator_config.is_some(), "custom_validator_config"),
        (v.ca_certificate_provider_instance.is_some(), "ca_certificate_provider_instance"),
        (v.system_root_certs.is_some(), "system_root_certs"),
        (
            v.require_signed_certificate_timestamp.is_some_and(|b| b.value),
            "require_signed_certificate_timestamp",
        ),
        (v.allow_expired_certificate, "allow_expired_certificate"),
        // 1: ACCEPT_UNTRUSTED.
        (v.trust_chain_verification != 0, "trust_chain_verification"),
    ];
    let named: Vec<&str> = asks.iter().filter(|(on, _)| *on).map(|(_, what)| *what).collect();
    (!named.is_empty()).then(|| format!("asks for {}: not served", named.join(", ")))
}

/// Fill in the files that a TLS context's secrets stand for: with an SDS server (started
/// from a bootstrap) every name is a secret received over SDS, held in memory
/// (`tls::secrets`); else `default` and `ROOTCA` are `xds.certificates`' files and
/// `file-cert:`/`file-root:` name their files. `Ok(Some(name))`: secret `name` has not
/// arrived yet, and what names it waits (Envoy's warming; never served without it).
pub(super) fn resolve(
    secrets: &Secrets,
    files: &mut CertificateFiles,
    certificates: Option<&CertificateFiles>,
    sds: bool,
) -> Result<Option<String>, String> {
    use crate::tls::secrets as store;
    let path = |p: std::path::PathBuf| p.display().to_string();
    // A secret from the SDS server, or over ADS from the control plane (with or without an
    // SDS server), is read from memory; `Some(name)` until it has arrived.
    let held = |name: &String| sds || secrets.over_ads.contains(name);
    let mut waiting = None;
    let mut wait_for = |part: std::path::PathBuf, name: &String| {
        if waiting.is_none() && store::get(&part).is_none() {
            waiting = Some(name.clone());
        }
    };
    let need = |name: &str| {
        certificates.ok_or_else(|| {
            format!(
                "TLS names SDS secret {name:?}, which needs xds.certificates (the workload certificate files) or an SDS server"
            )
        })
    };
    let unknown = |name: &str, served: String| {
        format!("SDS secret {name:?}: unknown without an SDS server (served: {served})")
    };
    // An empty name: that part is not a secret (none, or files inline in the context).
    let (cert, root) = (&secrets.certificate, &secrets.validation);
    if cert.is_empty() {
    } else if held(cert) {
        files.cert_chain = path(store::cert_chain(cert));
        files.private_key = path(store::private_key(cert));
        wait_for(store::cert_chain(cert), cert);
    } else if cert == SECRET_CERTIFICATE {
        let c = need(SECRET_CERTIFICATE)?;
        files.cert_chain.clone_from(&c.cert_chain);
        files.private_key.clone_from(&c.private_key);
    } else if !cert.starts_with(FILE_CERT) {
        return Err(unknown(cert, format!("{SECRET_CERTIFICATE:?}, {FILE_CERT}CERT~KEY")));
    }
    if root.is_empty() {
    } else if held(root) {
        files.root_cert = path(store::root_cert(root));
        wait_for(store::root_cert(root), root);
    } else if root == SECRET_ROOT {
        files.root_cert.clone_from(&need(SECRET_ROOT)?.root_cert);
    } else if !root.starts_with(FILE_ROOT) {
        return Err(unknown(root, format!("{SECRET_ROOT:?}, {FILE_ROOT}ROOT")));
    }
    Ok(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Endpoint};
    use crate::xds::cluster::cluster;
    use crate::xds::endpoint::load_assignment;
    use crate::xds::fixtures::*;
    use crate::xds::state::{Accepted, State};
    use envoy_types::pb::envoy::config::endpoint::v3 as eds;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    #[test]
    fn tls_mode_istio_matches_give_istio_mutual_to_endpoints_labelled_istio_and_plaintext_to_the_rest() {
        let alpn = ["istio-peer-exchange", "istio"];
        let x = cluster(&istio_mutual(common("default", "ROOTCA", &[REDIS], &alpn)), "1").unwrap();
        let t = x.cluster.tls.clone().unwrap();
        assert_eq!(
            t.secrets,
            Some(Secrets { certificate: "default".into(), validation: "ROOTCA".into(), over_ads: vec![] })
        );
        assert_eq!(t.subject_alt_names, [REDIS]);
        assert_eq!(t.alpn, alpn);
        assert_eq!(t.sni.as_deref(), Some("outbound_.6379_._.redis.default.svc.cluster.local"));
        assert!(t.unmatched_plaintext);
        assert!(x.reports.is_empty(), "{:?}", x.reports);
        // Endpoints: metadata as istiod writes it for a pod with a sidecar, and one without.
        let mut meta = core::Metadata::default();
        meta.filter_metadata.insert(
            "envoy.transport_socket_match".into(),
            Struct { fields: [("tlsMode".to_string(), s("istio"))].into_iter().collect() },
        );
        let lb = |a: &str, m: Option<core::Metadata>| eds::LbEndpoint {
            host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                address: addr(a),
                ..Default::default()
            })),
            metadata: m,
            ..Default::default()
        };
        let cla = eds::ClusterLoadAssignment {
            cluster_name: x.cluster.name.clone(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![lb("10.0.0.1:6379", Some(meta)), lb("10.0.0.2:6379", None)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let endpoints = load_assignment(&cla).unwrap();
        assert_eq!(endpoints[0].transport_socket_match["tlsMode"], "istio");
        assert!(t.applies_to(&endpoints[0]), "tlsMode istio: mTLS");
        assert!(!t.applies_to(&endpoints[1]), "no tlsMode: tlsMode-disabled, plaintext");
        // Merged beside a config with xds.certificates: the secrets resolve to those files.
        let mut state = State::default();
        state.clusters.insert(x.cluster.name.clone(), Accepted::new("1", x));
        let cfg = state.merge(&certificates()).unwrap();
        let t = cfg.clusters[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.cert_chain.as_str(), t.private_key.as_str(), t.root_cert.as_str()),
            ("/etc/certs/cert-chain.pem", "/etc/certs/key.pem", "/etc/certs/root-cert.pem")
        );
    }

    #[test]
    fn tls_without_xds_certificates_is_an_error_naming_the_resource_and_the_secret() {
        let x = cluster(&istio_mutual(common("default", "ROOTCA", &[], &[])), "1").unwrap();
        let mut state = State::default();
        state.clusters.insert(x.cluster.name.clone(), Accepted::new("1", x));
        let e = state.merge(&Config::default()).unwrap_err();
        assert_eq!(e.resource, "Cluster/outbound|6379||redis.default.svc.cluster.local");
        assert!(e.reason.contains("\"default\"") && e.reason.contains("xds.certificates"), "{e}");
    }

    #[test]
    fn file_cert_and_file_root_secrets_name_their_files() {
        let c =
            common("file-cert:/etc/certs/a.pem~/etc/certs/a.key", "file-root:/etc/certs/root.pem", &[], &[]);
        let x = cluster(&istio_mutual(c), "1").unwrap();
        let mut state = State::default();
        state.clusters.insert(x.cluster.name.clone(), Accepted::new("1", x));
        let cfg = state.merge(&Config::default()).unwrap();
        let t = cfg.clusters[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.cert_chain.as_str(), t.private_key.as_str(), t.root_cert.as_str()),
            ("/etc/certs/a.pem", "/etc/certs/a.key", "/etc/certs/root.pem")
        );
    }

    #[test]
    fn contexts_that_cannot_be_served_as_written_are_errors_naming_the_cluster_and_why() {
        let name = "Cluster/outbound|6379||redis.default.svc.cluster.local";
        let reason = |c: tls::CommonTlsContext| {
            let e = cluster(&istio_mutual(c), "1").unwrap_err();
            assert_eq!(e.resource, name);
            e.reason
        };
        // Without an SDS server, only the names that stand for files are known.
        let merged = |c: tls::CommonTlsContext| {
            let x = cluster(&istio_mutual(c), "1").unwrap();
            let mut state = State::default();
            state.clusters.insert(x.cluster.name.clone(), Accepted::new("1", x));
            let e = state.merge(&certificates()).unwrap_err();
            assert_eq!(e.resource, name);
            e.reason
        };
        let r = merged(common("kubernetes://redis-cert", "ROOTCA", &[], &[]));
        assert!(r.contains("SDS secret \"kubernetes://redis-cert\": unknown without an SDS server"), "{r}");
        let r = merged(common("default", "kubernetes://redis-cacert", &[], &[]));
        assert!(r.contains("SDS secret \"kubernetes://redis-cacert\": unknown without an SDS server"), "{r}");
        let mut inline = common("default", "ROOTCA", &[], &[]);
        inline.tls_certificates = vec![tls::TlsCertificate::default()];
        assert!(reason(inline).contains("more than one certificate (tls_certificates and SDS)"));
        let mut none = common("default", "ROOTCA", &[], &[]);
        none.validation_context_type = None;
        assert!(reason(none).contains("no validation context"));
        let mut regex = common("default", "ROOTCA", &[], &[]);
        if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
            &mut regex.validation_context_type
        {
            use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
            c.default_validation_context.as_mut().unwrap().match_typed_subject_alt_names =
                vec![tls::SubjectAltNameMatcher {
                    san_type: tls::subject_alt_name_matcher::SanType::Dns as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(MatchPattern::Exact("redis".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                }];
        }
        assert!(reason(regex).contains("SAN matcher"));
        // A transport socket that is neither TLS nor raw_buffer.
        let mut alts = istio_mutual(common("default", "ROOTCA", &[], &[]));
        alts.transport_socket_matches[0].transport_socket = socket(
            "envoy.transport_sockets.alts",
            Any {
                type_url: "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts".into(),
                value: vec![],
            },
        );
        let e = cluster(&alts, "1").unwrap_err();
        assert!(
            e.reason.contains("transport_socket_matches \"tlsMode-istio\"")
                && e.reason.contains("not served"),
            "{e}"
        );
    }

    #[test]
    fn every_tls_context_shape_that_cannot_be_served_is_an_error_saying_why() {
        use tls::common_tls_context::{CombinedCertificateValidationContext, ValidationContextType as V};
        let base = || common("default", "ROOTCA", &[], &[]);
        let with = |f: &dyn Fn(&mut tls::CommonTlsContext)| {
            let mut c = base();
            f(&mut c);
            c
        };
        let cases: Vec<(tls::CommonTlsContext, &str)> = vec![
            (with(&|c| c.tls_certificate_sds_secret_configs.push(sds("default"))), "more than one"),
            (
                with(&|c| {
                    c.validation_context_type =
                        Some(V::CombinedValidationContext(CombinedCertificateValidationContext::default()))
                }),
                "without validation_context_sds_secret_config",
            ),
            (
                with(&|c| c.validation_context_type = Some(V::ValidationContext(Default::default()))),
                "validation_context without trusted_ca",
            ),
            (
                // Deprecated in Envoy's API, still what an old control plane may send.
                #[allow(deprecated)]
                with(&|c| {
                    c.validation_context_type =
                        Some(V::ValidationContextCertificateProviderInstance(Default::default()))
                }),
                "certificate provider",
            ),
            (common("file-cert:/only-one-path", "ROOTCA", &[], &[]), "want file-cert:CERT~KEY"),
        ];
        for (c, want) in cases {
            let e = cluster(&istio_mutual(c), "1").unwrap_err();
            assert!(e.reason.contains(want), "{want}: {e}");
        }
        // No common_tls_context at all.
        let mut pb = istio_mutual(base());
        let empty = tls::UpstreamTlsContext::default();
        pb.transport_socket_matches[0].transport_socket =
            socket("envoy.transport_sockets.tls", any(UPSTREAM_TLS, &empty));
        assert!(cluster(&pb, "1").unwrap_err().reason.contains("without common_tls_context"));
        // Two different TLS contexts among the matches.
        let mut pb = istio_mutual(base());
        let other = istio_mutual(common("default", "ROOTCA", &["spiffe://x"], &[]));
        pb.transport_socket_matches[1].transport_socket =
            other.transport_socket_matches[0].transport_socket.clone();
        let e = cluster(&pb, "1").unwrap_err();
        assert!(e.reason.contains("a TLS context other than"), "{e}");
        // A match criterion that is not a string.
        let mut pb = istio_mutual(base());
        let number = Value { kind: Some(Kind::NumberValue(1.0)) };
        pb.transport_socket_matches[0].r#match =
            Some(Struct { fields: [("tlsMode".to_string(), number)].into_iter().collect() });
        assert!(cluster(&pb, "1").unwrap_err().reason.contains("is not a string"));
        // The newer matcher API, which istiod does not write.
        let mut pb = istio_mutual(base());
        pb.transport_socket_matcher = Some(Default::default());
        assert!(cluster(&pb, "1").unwrap_err().reason.contains("transport_socket_matcher"));
    }

    #[test]
    fn a_cluster_transport_socket_speaks_tls_to_every_endpoint_and_prefix_sans_are_kept() {
        use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
        let mut c = common("default", "ROOTCA", &[REDIS], &[]);
        if let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
            &mut c.validation_context_type
        {
            v.default_validation_context.as_mut().unwrap().match_typed_subject_alt_names =
                vec![tls::SubjectAltNameMatcher {
                    san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(MatchPattern::Prefix("spiffe://td-alias/".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                }];
        }
        let mut pb = istio_mutual(c);
        pb.transport_socket = pb.transport_socket_matches[0].transport_socket.clone();
        pb.transport_socket_matches.clear();
        let t = cluster(&pb, "1").unwrap().cluster.tls.unwrap();
        assert_eq!(
            (t.subject_alt_names.as_slice(), t.subject_alt_name_prefixes.as_slice()),
            (&[REDIS.to_string()][..], &["spiffe://td-alias/".to_string()][..])
        );
        assert!(!t.unmatched_plaintext && t.endpoint_matches.is_empty());
        assert!(t.applies_to(&Endpoint::at("10.0.0.1:6379".parse().unwrap())), "no match needed");
        // No TLS anywhere (istiod's matches without sockets, as an old test server sends): none.
        let mut plain = istio_mutual(common("default", "ROOTCA", &[], &[]));
        for m in &mut plain.transport_socket_matches {
            m.transport_socket = None;
        }
        assert!(cluster(&plain, "1").unwrap().cluster.tls.is_none());
    }

    /// A config started from a bootstrap: secrets come from the SDS server.
    fn with_sds() -> Config {
        let xds = crate::config::Xds {
            address: "unix:./etc/istio/proxy/XDS".into(),
            sds: Some("unix:./var/run/secrets/workload-spiffe-uds/socket".into()),
            ..crate::config::Xds::default()
        };
        Config { xds: Some(xds), ..Config::default() }
    }

    fn pem_pair(ca: bool) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec!["redis.example.com".to_string()]).unwrap();
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn with_an_sds_server_every_name_is_asked_for_and_what_waits_for_a_secret_is_not_served() {
        use crate::tls::secrets as store;
        use crate::xds::fixtures::{chain, listener_with, to};
        use crate::xds::listener::listener;
        // Names no other test stores (the store is the process's).
        let (cert, root) = ("kubernetes://t-wait", "kubernetes://t-wait-cacert");
        let x = cluster(&istio_mutual(common(cert, root, &[], &[])), "1").unwrap();
        let cluster_name = x.cluster.name.clone();
        let mut state = State::default();
        state.clusters.insert(cluster_name.clone(), Accepted::new("1", x));
        let mut mtls = chain(vec![to(&cluster_name)]);
        let downstream = tls::DownstreamTlsContext {
            common_tls_context: Some(common("file-cert:/a.pem~/a.key", root, &[], &[])),
            ..Default::default()
        };
        mtls.transport_socket = socket("envoy.transport_sockets.tls", any(DOWNSTREAM_TLS, &downstream));
        state
            .listeners
            .insert("l".into(), Accepted::new("1", listener(&listener_with(vec![mtls]), "1").unwrap()));
        assert_eq!(
            state.secret_names(false).into_iter().collect::<Vec<_>>(),
            ["file-cert:/a.pem~/a.key", cert, root]
        );
        // Nothing arrived: the listener is not bound, the cluster serves nothing, never in
        // plaintext.
        let cfg = state.merge(&with_sds()).unwrap();
        assert!(cfg.listeners.is_empty(), "{:?}", cfg.listeners);
        let c = &cfg.clusters[0];
        assert!(c.tls.is_none() && c.endpoints.is_empty(), "{c:?}");
        assert_eq!(c.source.as_deref(), Some("xds: waiting for SDS secret kubernetes://t-wait"));
        // The cluster's secrets arrive: it is served with them, read from memory.
        let (chain_pem, key_pem) = pem_pair(false);
        let (root_pem, _) = pem_pair(true);
        store::put(vec![
            (store::cert_chain(cert), chain_pem.into_bytes()),
            (store::private_key(cert), key_pem.clone().into_bytes()),
            (store::root_cert(root), root_pem.into_bytes()),
        ]);
        let cfg = state.merge(&with_sds()).unwrap();
        let t = cfg.clusters[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.cert_chain.as_str(), t.private_key.as_str(), t.root_cert.as_str()),
            (
                "sds:kubernetes://t-wait#cert_chain",
                "sds:kubernetes://t-wait#private_key",
                "sds:kubernetes://t-wait-cacert#root_cert"
            )
        );
        assert!(cfg.listeners.is_empty(), "the listener still waits for its certificate");
        let (other, _) = pem_pair(false);
        let file_cert = "file-cert:/a.pem~/a.key";
        store::put(vec![
            (store::cert_chain(file_cert), other.into_bytes()),
            (store::private_key(file_cert), key_pem.into_bytes()),
        ]);
        assert_eq!(state.merge(&with_sds()).unwrap().listeners.len(), 1);
    }

    #[test]
    fn a_validation_context_asking_for_a_crl_or_pins_is_an_error_naming_the_resource() {
        use tls::common_tls_context::ValidationContextType as V;
        type Set = fn(&mut tls::CertificateValidationContext);
        let cases: [(&str, Set); 3] = [
            ("crl", |v| v.crl = Some(Default::default())),
            ("verify_certificate_spki", |v| v.verify_certificate_spki = vec!["pin".into()]),
            ("verify_certificate_hash", |v| v.verify_certificate_hash = vec!["ab:cd".into()]),
        ];
        for (what, set) in cases {
            let mut c = common("default", "ROOTCA", &[], &[]);
            if let Some(V::CombinedValidationContext(v)) = &mut c.validation_context_type {
                set(v.default_validation_context.as_mut().unwrap());
            }
            let e = cluster(&istio_mutual(c), "1").unwrap_err();
            assert_eq!(e.resource, "Cluster/outbound|6379||redis.default.svc.cluster.local");
            assert!(e.reason.ends_with(&format!(" validation context asks for {what}: not served")), "{e}");
        }
    }

    #[test]
    fn destination_rule_contexts_give_simple_or_mutual_with_their_files_or_sds_secrets() {
        use tls::common_tls_context::ValidationContextType as V;
        let file = |p: &str| {
            Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::Filename(p.into())),
                ..Default::default()
            })
        };
        let tls_of = |c: tls::CommonTlsContext| {
            let mut pb = istio_mutual(c);
            pb.transport_socket = pb.transport_socket_matches[0].transport_socket.clone();
            pb.transport_socket_matches.clear();
            let x = cluster(&pb, "1").unwrap();
            let mut state = State::default();
            state.clusters.insert(x.cluster.name.clone(), Accepted::new("1", x));
            (state.clone(), state.merge(&Config::default()).map(|cfg| cfg.clusters[0].tls.clone().unwrap()))
        };
        // SIMPLE: the CA as the agent's file-root: secret, no certificate.
        let mut simple = common("default", "file-root:/etc/certs/ca.pem", &["httpbin.org"], &[]);
        simple.tls_certificate_sds_secret_configs.clear();
        let t = tls_of(simple).1.unwrap();
        assert_eq!(t.mode, ClusterTlsMode::Simple);
        assert_eq!((t.cert_chain.as_str(), t.root_cert.as_str()), ("", "/etc/certs/ca.pem"));
        assert_eq!(t.subject_alt_names, ["httpbin.org"]);
        // MUTUAL: the client certificate as file-cert:.
        let t = tls_of(common("file-cert:/c.pem~/c.key", "file-root:/ca.pem", &[], &[])).1.unwrap();
        assert_eq!(t.mode, ClusterTlsMode::Mutual);
        assert_eq!((t.cert_chain.as_str(), t.private_key.as_str()), ("/c.pem", "/c.key"));
        // MUTUAL with the files inline in the context, as Envoy reads them.
        let mut inline = common("default", "ROOTCA", &[], &[]);
        inline.tls_certificate_sds_secret_configs.clear();
        inline.tls_certificates = vec![tls::TlsCertificate {
            certificate_chain: file("/c.pem"),
            private_key: file("/c.key"),
            ..Default::default()
        }];
        inline.validation_context_type = Some(V::ValidationContext(tls::CertificateValidationContext {
            trusted_ca: file("/ca.pem"),
            ..Default::default()
        }));
        let t = tls_of(inline).1.unwrap();
        assert_eq!(
            (t.mode, t.secrets.is_none(), t.cert_chain.as_str(), t.root_cert.as_str()),
            (ClusterTlsMode::Mutual, true, "/c.pem", "/ca.pem")
        );
        // credentialName: kubernetes:// secrets, which only an SDS server gives.
        let (state, merged) = tls_of(common("kubernetes://t-cred", "kubernetes://t-cred-cacert", &[], &[]));
        assert!(merged.unwrap_err().reason.contains("unknown without an SDS server"));
        assert_eq!(
            state.secret_names(false).into_iter().collect::<Vec<_>>(),
            ["kubernetes://t-cred", "kubernetes://t-cred-cacert"]
        );
        let c = &state.merge(&with_sds()).unwrap().clusters[0];
        assert_eq!(c.source.as_deref(), Some("xds: waiting for SDS secret kubernetes://t-cred"));
        // A server needs a certificate.
        let mut none = common("default", "ROOTCA", &[], &[]);
        none.tls_certificate_sds_secret_configs.clear();
        let ts = socket(
            "envoy.transport_sockets.tls",
            any(
                DOWNSTREAM_TLS,
                &tls::DownstreamTlsContext { common_tls_context: Some(none), ..Default::default() },
            ),
        );
        assert!(downstream(ts.as_ref().unwrap(), &[]).unwrap_err().contains("no certificate to present"));
    }

    #[test]
    fn a_chain_chosen_by_the_clients_alpn_takes_the_protocols_it_matches_in_its_handshake() {
        let chain = |alpn: &[&str], matched: &[&str]| {
            let c = common("default", "ROOTCA", &[], alpn);
            let ctx = tls::DownstreamTlsContext { common_tls_context: Some(c), ..Default::default() };
            let matched: Vec<String> = matched.iter().map(|p| p.to_string()).collect();
            downstream(&socket("tls", any(DOWNSTREAM_TLS, &ctx)).unwrap(), &matched).unwrap().unwrap().alpn
        };
        // istiod's inbound HTTP chain: its own list first, then what it matches on.
        let http = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];
        assert_eq!(
            chain(&["h2", "http/1.1"], &http),
            ["h2", "http/1.1", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
        );
        // No list of its own: Istio's, then the matched ones.
        assert_eq!(
            chain(&[], &http),
            ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
        );
        // A chain matching no protocol keeps its own list (empty: Istio's, at the handshake).
        assert_eq!(chain(&["h2"], &[]), ["h2"]);
        assert!(chain(&[], &[]).is_empty());
    }

    #[test]
    fn tls_params_cipher_suites_are_carried_to_the_cluster_and_the_chain() {
        let suites = vec!["ECDHE-ECDSA-AES256-GCM-SHA384".to_string(), "TLS_AES_256_GCM_SHA384".into()];
        let mut c = common("default", "ROOTCA", &[REDIS], &[]);
        c.tls_params = Some(tls::TlsParameters { cipher_suites: suites.clone(), ..Default::default() });
        let t = cluster(&istio_mutual(c.clone()), "1").unwrap().cluster.tls.unwrap();
        assert_eq!(t.cipher_suites, suites);
        let ctx = tls::DownstreamTlsContext { common_tls_context: Some(c), ..Default::default() };
        let chain = downstream(&socket("tls", any(DOWNSTREAM_TLS, &ctx)).unwrap(), &[]).unwrap().unwrap();
        assert_eq!(chain.cipher_suites, suites);
    }
}
