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

/// Read the parts of a CommonTlsContext istiod writes for ISTIO_MUTUAL (SPEC §7, §9): the
/// workload certificate and the root as SDS secrets, the SAN matchers (exact, and prefix for
/// trust domain aliases), ALPN. What cannot be served as written is an error: certificates
/// inline or from another SDS secret (there is no SDS client), other SAN matchers, or no
/// validation at all. `client`: SAN matchers are checked (an upstream's); a server's are
/// not read (istiod writes none for mesh mTLS).
fn tls_context(common: Option<&tls::CommonTlsContext>, client: bool) -> Result<Common, String> {
    use tls::common_tls_context::ValidationContextType as V;
    let common = common.ok_or("TLS without common_tls_context")?;
    if !common.tls_certificates.is_empty() {
        return Err("inline tls_certificates: not served (SDS secrets default and ROOTCA only)".into());
    }
    let certificate = match &common.tls_certificate_sds_secret_configs[..] {
        [one] => one.name.clone(),
        [] => return Err("no tls_certificate_sds_secret_configs: no certificate to present".into()),
        _ => return Err("more than one tls_certificate_sds_secret_configs: not served".into()),
    };
    let (validation, context) = match &common.validation_context_type {
        Some(V::CombinedValidationContext(c)) => {
            let name = c.validation_context_sds_secret_config.as_ref().map(|s| s.name.clone());
            (
                name.ok_or("combined_validation_context without validation_context_sds_secret_config")?,
                c.default_validation_context.as_ref(),
            )
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => (s.name.clone(), None),
        Some(V::ValidationContext(_)) => {
            return Err("inline validation_context: not served (SDS secret ROOTCA only)".into());
        }
        Some(_) => return Err("validation by certificate provider: not served".into()),
        None => return Err("no validation context: the peer would not be verified".into()),
    };
    let mut files = CertificateFiles::default();
    if let Some(pair) = certificate.strip_prefix(FILE_CERT) {
        let (cert, key) = pair
            .split_once('~')
            .ok_or_else(|| format!("SDS secret {certificate:?}: want file-cert:CERT~KEY"))?;
        files.cert_chain = cert.to_string();
        files.private_key = key.to_string();
    } else if certificate != SECRET_CERTIFICATE {
        return Err(format!(
            "SDS secret {certificate:?}: unknown (served: {SECRET_CERTIFICATE:?}, {FILE_CERT}CERT~KEY)"
        ));
    }
    if let Some(root) = validation.strip_prefix(FILE_ROOT) {
        files.root_cert = root.to_string();
    } else if validation != SECRET_ROOT {
        return Err(format!("SDS secret {validation:?}: unknown (served: {SECRET_ROOT:?}, {FILE_ROOT}ROOT)"));
    }
    let (mut sans, mut san_prefixes) = (Vec::new(), Vec::new());
    if let Some(v) = context.filter(|_| client) {
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
        secrets: Secrets { certificate, validation },
        files,
        alpn: common.alpn_protocols.clone(),
        sans,
        san_prefixes,
        // Checked where the config is built (tls::cipher_suites): an unknown name NACKs.
        cipher_suites: common.tls_params.as_ref().map(|p| p.cipher_suites.clone()).unwrap_or_default(),
    })
}

/// A filter chain's transport socket: its DownstreamTlsContext (terminated with its ALPN,
/// requiring client certificates if it says so), `None` for raw_buffer.
pub(super) fn downstream(ts: &core::TransportSocket) -> Result<Option<ChainTls>, String> {
    let Some(any) = transport_socket(ts, DOWNSTREAM_TLS)? else { return Ok(None) };
    let ctx: tls::DownstreamTlsContext = decode(any, DOWNSTREAM_TLS)?;
    let common = tls_context(ctx.common_tls_context.as_ref(), false)?;
    Ok(Some(ChainTls {
        secrets: common.secrets,
        files: common.files,
        alpn: common.alpn,
        require_client_certificate: ctx.require_client_certificate.is_some_and(|b| b.value),
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
    Ok(Some(ClusterTls {
        mode: ClusterTlsMode::IstioMutual,
        cert_chain: common.files.cert_chain,
        private_key: common.files.private_key,
        root_cert: common.files.root_cert,
        subject_alt_names: common.sans,
        cipher_suites: common.cipher_suites,
        subject_alt_name_prefixes: common.san_prefixes,
        secrets: Some(common.secrets),
        alpn: common.alpn,
        sni: (!ctx.sni.is_empty()).then_some(ctx.sni),
        endpoint_matches: matches,
        unmatched_plaintext: !default_tls,
    }))
}

/// Fill in the files that the secrets `default` and `ROOTCA` stand for.
pub(super) fn resolve(
    secrets: &Secrets,
    files: &mut CertificateFiles,
    certificates: Option<&CertificateFiles>,
) -> Result<(), String> {
    let need = |name: &str| {
        certificates.ok_or_else(|| {
            format!(
                "TLS names SDS secret {name:?}, which needs xds.certificates (the workload certificate files; there is no SDS client)"
            )
        })
    };
    if secrets.certificate == SECRET_CERTIFICATE {
        let c = need(SECRET_CERTIFICATE)?;
        files.cert_chain.clone_from(&c.cert_chain);
        files.private_key.clone_from(&c.private_key);
    }
    if secrets.validation == SECRET_ROOT {
        files.root_cert.clone_from(&need(SECRET_ROOT)?.root_cert);
    }
    Ok(())
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
        assert_eq!(t.secrets, Some(Secrets { certificate: "default".into(), validation: "ROOTCA".into() }));
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
        let r = reason(common("kubernetes://redis-cert", "ROOTCA", &[], &[]));
        assert!(r.contains("SDS secret \"kubernetes://redis-cert\": unknown"), "{r}");
        let r = reason(common("default", "kubernetes://redis-cacert", &[], &[]));
        assert!(r.contains("SDS secret \"kubernetes://redis-cacert\": unknown"), "{r}");
        let mut inline = common("default", "ROOTCA", &[], &[]);
        inline.tls_certificates = vec![tls::TlsCertificate::default()];
        assert!(reason(inline).contains("inline tls_certificates"));
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
            (
                with(&|c| c.tls_certificate_sds_secret_configs.clear()),
                "no tls_certificate_sds_secret_configs",
            ),
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
                "inline validation_context",
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

    #[test]
    fn tls_params_cipher_suites_are_carried_to_the_cluster_and_the_chain() {
        let suites = vec!["ECDHE-ECDSA-AES256-GCM-SHA384".to_string(), "TLS_AES_256_GCM_SHA384".into()];
        let mut c = common("default", "ROOTCA", &[REDIS], &[]);
        c.tls_params = Some(tls::TlsParameters { cipher_suites: suites.clone(), ..Default::default() });
        let t = cluster(&istio_mutual(c.clone()), "1").unwrap().cluster.tls.unwrap();
        assert_eq!(t.cipher_suites, suites);
        let ctx = tls::DownstreamTlsContext { common_tls_context: Some(c), ..Default::default() };
        let chain = downstream(&socket("tls", any(DOWNSTREAM_TLS, &ctx)).unwrap()).unwrap().unwrap();
        assert_eq!(chain.cipher_suites, suites);
    }
}
