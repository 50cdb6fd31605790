//! SPEC §9 access logs: a real connection through ringside writes exactly one line when it
//! ends, in Istio's default format or the format given, from static config
//! (`access_log: {path, format}`) and from xDS (tcp_proxy's file logger, as istiod sends it
//! with `meshConfig.accessLogFile`), where a real Envoy fed the same listeners writes the same
//! lines, for a relayed connection and one its AuthorizationPolicy denies.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ads::{AdsServer, Snapshot, lds, static_cluster, tcp_listener};
use common::{DEADLINE, Ringside, echo_server, free_addr};
use envoy::{Envoy, envoy_binary};
use envoy_types::pb::envoy::config::accesslog::v3 as accesslog;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use prost::Message;

/// A fresh log file path for `name`.
fn log_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ringside-access-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// The lines of `path` once it holds `n` (bounded wait: the writer thread is asynchronous).
fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<String> = text.lines().map(str::to_string).collect();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::yield_now();
    }
}

/// One echoed connection through `addr`: `hello` up, 5 bytes back, then both sides closed.
/// Returns the client's address.
fn echo_once(addr: SocketAddr) -> SocketAddr {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    c.local_addr().unwrap()
}

/// `line` with what changes from run to run replaced: the start time, the duration (the
/// number after the two byte counts) and every port of 127.0.0.1 but `keep`'s.
fn masked(line: &str, keep: &[SocketAddr]) -> String {
    let mut fields: Vec<String> = line.split(' ').map(str::to_string).collect();
    if let Some(t) = fields.first_mut() {
        let ok = t.len() == 26 && t.starts_with("[20") && t.ends_with("Z]") && t.as_bytes()[11] == b'T';
        *t = if ok { "[TIME]".into() } else { format!("[BAD TIME {t}]") };
    }
    if let Some(d) = fields.get_mut(11) {
        *d = if d.parse::<u64>().is_ok() { "DURATION".into() } else { format!("BAD DURATION {d}") };
    }
    fields
        .iter()
        .map(|f| {
            let bare = f.trim_matches('"');
            match bare.parse::<SocketAddr>() {
                Ok(a) if !keep.contains(&a) => f.replace(bare, &format!("{}:PORT", a.ip())),
                _ => f.clone(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_connection_through_a_static_listener_writes_exactly_one_line_in_istios_format() {
    let (echo, closed, out, refused) = (echo_server(), free_addr(), free_addr(), free_addr());
    let path = log_path("static");
    let config = format!(
        "node: {{workload_name: productpage-v1, namespace: default}}
listeners:
  - {{name: out, listen: '{out}', direction: outbound, peer_exchange: 'off', cluster: echo,
      access_log: {{path: '{p}'}}}}
  - {{name: refused, listen: '{refused}', direction: outbound, peer_exchange: 'off', cluster: closed,
      access_log: {{path: '{p}', format: \"%RESPONSE_FLAGS% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %BYTES_RECEIVED%\\n\"}}}}
clusters:
  - {{name: echo, endpoints: [{{address: '{echo}'}}]}}
  - {{name: closed, endpoints: [{{address: '{closed}'}}]}}
",
        p = path.display()
    );
    let rs = Ringside::spawn_config(&config, out, &["--workers", "2"]);
    let client = echo_once(out);
    let got = lines(&path, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        masked(&got[0], &[client, echo, out]),
        format!(
            "[TIME] \"- - -\" 0 - - - \"-\" 5 5 DURATION - \"-\" \"-\" \"-\" \"-\" \"{echo}\" echo 127.0.0.1:PORT {out} {client} - -"
        )
    );
    // A refused upstream: one line in the format given, with its flag.
    let mut c = TcpStream::connect(refused).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = c.read_to_end(&mut Vec::new());
    let got = lines(&path, 2);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1], format!("UF {closed} closed 0"));
    // Exactly one line per connection: a third connection's line comes right after the
    // second's (the writer keeps their order), with no other line between.
    let again = echo_once(out);
    let got = lines(&path, 3);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[2].contains(&format!(" {out} {again} ")), "{got:?}");
    assert!(rs.scrape().contains("ringside_access_log_dropped_total 0\n"));
    let _ = std::fs::remove_file(&path);
}

/// A file access log in Istio 1.18's inline text format (the DSB dump's), to `path`.
fn istio_file_log(path: &Path) -> accesslog::AccessLog {
    let format = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
                  %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
                  \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
                  %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
                  \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% \
                  %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
                  %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";
    let f = file::FileAccessLog {
        path: path.display().to_string(),
        access_log_format: Some(file::file_access_log::AccessLogFormat::LogFormat(
            core::SubstitutionFormatString {
                format: Some(core::substitution_format_string::Format::TextFormatSource(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString(format.into())),
                    ..Default::default()
                })),
                ..Default::default()
            },
        )),
    };
    accesslog::AccessLog {
        name: "envoy.access_loggers.file".into(),
        filter: None,
        config_type: Some(accesslog::access_log::ConfigType::TypedConfig(ads::any(
            "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            &f,
        ))),
    }
}

/// istiod's TCP listener on `listen` to cluster `echo`, its tcp_proxy logging to `path`.
fn logged_listener(listen: SocketAddr, path: &Path) -> lds::Listener {
    let mut l = tcp_listener(&format!("127.0.0.1_{}", listen.port()), listen, &[("echo", 1)]);
    for f in &mut l.filter_chains[0].filters {
        if let Some(lds::filter::ConfigType::TypedConfig(any)) = &mut f.config_type
            && f.name == "envoy.filters.network.tcp_proxy"
        {
            let mut p = tcp::TcpProxy::decode(any.value.as_slice()).unwrap();
            p.access_log.push(istio_file_log(path));
            any.value = p.encode_to_vec();
        }
    }
    l
}

/// `logged_listener` with Istio's AuthorizationPolicy DENY for clients on 127.0.0.1 before
/// its tcp_proxy (`envoy.filters.network.rbac`, as istiod writes it).
fn denying_listener(listen: SocketAddr, path: &Path) -> lds::Listener {
    use envoy_types::pb::envoy::config::rbac::v3 as rbac;
    let policy = rbac::Policy {
        permissions: vec![rbac::Permission { rule: Some(rbac::permission::Rule::Any(true)) }],
        principals: vec![rbac::Principal {
            identifier: Some(rbac::principal::Identifier::DirectRemoteIp(core::CidrRange {
                address_prefix: "127.0.0.1".into(),
                prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 32 }),
            })),
        }],
        ..Default::default()
    };
    let rules = rbac::Rbac {
        action: rbac::rbac::Action::Deny as i32,
        policies: [("ns[default]-policy[deny-local]-rule[0]".to_string(), policy)].into(),
        ..Default::default()
    };
    let config = envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac {
        rules: Some(rules),
        stat_prefix: "tcp.".into(),
        ..Default::default()
    };
    let url = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    let mut l = logged_listener(listen, path);
    let filter = lds::Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(ads::any(url, &config))),
    };
    l.filter_chains[0].filters.insert(0, filter);
    l
}

fn snapshot(echo: SocketAddr, listen: SocketAddr, denying: SocketAddr, path: &Path) -> Snapshot {
    Snapshot {
        version: "1".into(),
        clusters: vec![static_cluster("echo", echo)],
        listeners: vec![logged_listener(listen, path), denying_listener(denying, path)],
        ..Default::default()
    }
}

/// A connection the listener at `addr` closes without a byte: returns the client's address.
fn closed_once(addr: SocketAddr) -> SocketAddr {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = c.read_to_end(&mut Vec::new());
    c.local_addr().unwrap()
}

#[test]
fn a_tcp_proxys_file_access_log_over_xds_writes_the_line_envoy_writes() {
    let echo = echo_server();
    let (ours, theirs, ours_denying, theirs_denying) = (free_addr(), free_addr(), free_addr(), free_addr());
    let (path_r, path_e) = (log_path("xds-ringside"), log_path("xds-envoy"));
    let (ads_r, _requests) = AdsServer::serve(snapshot(echo, ours, ours_denying, &path_r));
    let config = format!(
        "node: {{workload_name: productpage-v1, namespace: default}}\nxds: {{address: \"{}\"}}\n",
        ads_r.addr
    );
    let _rs = Ringside::spawn_config(&config, ours, &["--workers", "2"]);
    let client = echo_once(ours);
    let got = lines(&path_r, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    let line = masked(&got[0], &[client, echo, ours]);
    assert_eq!(
        line,
        format!(
            "[TIME] \"- - -\" 0 - - - \"-\" 5 5 DURATION - \"-\" \"-\" \"-\" \"-\" \"{echo}\" echo 127.0.0.1:PORT {ours} {client} - -"
        )
    );
    // Denied by the AuthorizationPolicy: the matched policy in the termination details, no
    // response flag, the chain's cluster.
    let denied_client = closed_once(ours_denying);
    let got = lines(&path_r, 2);
    assert_eq!(got.len(), 2, "{got:?}");
    let denied = masked(&got[1], &[denied_client, ours_denying]);
    assert_eq!(
        denied,
        format!(
            "[TIME] \"- - -\" 0 - - rbac_access_denied_matched_policy[ns[default]-policy[deny-local]-rule[0]] \"-\" 0 0 DURATION - \"-\" \"-\" \"-\" \"-\" \"-\" echo - {ours_denying} {denied_client} - -"
        )
    );
    // The reference: a real Envoy on the same listeners (its own addresses and file).
    let Some(bin) = envoy_binary() else {
        common::skip("access_log::envoy_reference", "no Envoy binary (perf/fetch-envoy.sh)");
        return;
    };
    let (ads_e, _requests_e) =
        AdsServer::serve(ads::without_istio_extensions(snapshot(echo, theirs, theirs_denying, &path_e)));
    let _envoy = Envoy::start(&bin, ads_e.addr);
    common::wait_for("Envoy's listener", || TcpStream::connect(theirs).ok().map(drop));
    let envoy_client = echo_once(theirs);
    let envoy_denied_client = closed_once(theirs_denying);
    // Envoy flushes its log file every 10 s: one wait for all three lines (its probe too).
    let got = lines(&path_e, 3);
    let of = |client: SocketAddr| got.iter().find(|l| l.contains(&client.to_string())).expect("Envoy's line");
    let reference = masked(of(envoy_client), &[envoy_client, echo, theirs])
        .replace(&theirs.to_string(), &ours.to_string())
        .replace(&envoy_client.to_string(), &client.to_string());
    assert_eq!(line, reference, "ringside vs Envoy");
    // The same denial line but for the upstream connection Envoy's tcp_proxy made before its
    // RBAC closed the connection, which ringside never makes (SPEC §9: closed before a byte
    // reaches the app): there, its host and local address are `-`.
    let reference = masked(of(envoy_denied_client), &[envoy_denied_client, theirs_denying])
        .replace(&theirs_denying.to_string(), &ours_denying.to_string())
        .replace(&envoy_denied_client.to_string(), &denied_client.to_string())
        .replace("\"127.0.0.1:PORT\" echo 127.0.0.1:PORT", "\"-\" echo -");
    assert_eq!(denied, reference, "ringside vs Envoy, denied");
    let _ = std::fs::remove_file(&path_r);
    let _ = std::fs::remove_file(&path_e);
}
