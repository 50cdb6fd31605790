//! A Secret Discovery Service as Istio's agent serves it on its unix socket
//! (`./var/run/secrets/workload-spiffe-uds/socket`): state of the world
//! (`StreamSecrets`), the names a request asks for answered with the secrets held under
//! them (PEM inline, as the agent sends; nothing until it holds one), every push sent to
//! every stream. One stream for all names (ringside) or one per name (Envoy) both work. Every request
//! (the node, ACKs, NACKs) is recorded for the tests to read.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// One version of the secrets served.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    pub version: String,
    pub secrets: Vec<tls::Secret>,
}

fn inline(pem: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// A certificate and key secret, PEM inline (the agent's `default`).
pub fn certificate(name: &str, chain: &str, key: &str) -> tls::Secret {
    tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// A trusted CA secret, PEM inline (the agent's `ROOTCA`).
pub fn root(name: &str, ca: &str) -> tls::Secret {
    tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::ValidationContext(tls::CertificateValidationContext {
            trusted_ca: inline(ca),
            ..Default::default()
        })),
    }
}

/// A running SDS server; dropping it closes every stream and removes its socket.
pub struct SdsServer {
    secrets: watch::Sender<Arc<Secrets>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Every request received, on every stream.
    pub requests: mpsc::Receiver<DiscoveryRequest>,
}

impl SdsServer {
    /// Serve `first` on a unix socket at `path` (its directories made).
    pub fn serve_unix(path: &Path, first: Secrets) -> SdsServer {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(path);
        let (secrets, rx) = watch::channel(Arc::new(first));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (requests_tx, requests) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let at = path.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let service = SecretDiscoveryServiceServer::new(Sds { secrets: rx, requests: requests_tx });
                let listener = tokio::net::UnixListener::bind(&at).unwrap();
                ready_tx.send(()).unwrap();
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                tokio::select! {
                    _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming) => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        ready_rx.recv_timeout(Duration::from_secs(20)).expect("SDS server bound");
        SdsServer { secrets, stop: Some(stop), thread: Some(thread), path: path.to_path_buf(), requests }
    }

    /// Push a new version to every stream.
    pub fn push(&self, s: Secrets) {
        self.secrets.send_replace(Arc::new(s));
    }

    /// The next reply (ACK or NACK) to a response of `version`, within 20 s.
    pub fn reply_to(&self, version: &str) -> DiscoveryRequest {
        self.request(&format!("the reply to version {version}"), |r| {
            !r.response_nonce.is_empty() && (r.version_info == version || r.error_detail.is_some())
        })
    }

    /// The next request matching `what`, within 20 s.
    pub fn request(&self, describe: &str, what: impl Fn(&DiscoveryRequest) -> bool) -> DiscoveryRequest {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let r = self.requests.recv_timeout(left).unwrap_or_else(|_| panic!("no SDS request: {describe}"));
            if what(&r) {
                return r;
            }
        }
    }
}

impl Drop for SdsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Sds {
    secrets: watch::Receiver<Arc<Secrets>>,
    requests: mpsc::Sender<DiscoveryRequest>,
}

/// The secrets of `s` that `names` asks for; none held: no response (the agent answers once
/// it has the certificate).
fn response(s: &Secrets, names: &[String], nonce: &mut u64) -> Option<DiscoveryResponse> {
    let resources: Vec<Any> = s
        .secrets
        .iter()
        .filter(|x| names.contains(&x.name))
        .map(|x| Any { type_url: SECRET.into(), value: x.encode_to_vec() })
        .collect();
    if resources.is_empty() {
        return None;
    }
    *nonce += 1;
    Some(DiscoveryResponse {
        version_info: s.version.clone(),
        resources,
        type_url: SECRET.into(),
        nonce: nonce.to_string(),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaSecretsStream = ReceiverStream<
        Result<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse, tonic::Status>,
    >;

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut secrets = self.secrets.clone();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            let mut names: Vec<String> = Vec::new();
            loop {
                tokio::select! {
                    r = inbound.message() => {
                        let Ok(Some(r)) = r else { break };
                        let _ = requests.send(r.clone());
                        // New names (a first request, or more asked for): answer them.
                        if r.resource_names != names {
                            names = r.resource_names.clone();
                            let s = secrets.borrow().clone();
                            if let Some(out) = response(&s, &names, &mut nonce)
                                && tx.send(Ok(out)).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                    changed = secrets.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let s = secrets.borrow_and_update().clone();
                        if let Some(out) = response(&s, &names, &mut nonce) {
                            let _ = tx.send(Ok(out)).await;
                        }
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        _: tonic::Request<
            tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest>,
        >,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the agent serves SDS in state of the world"))
    }

    async fn fetch_secrets(
        &self,
        _: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("the agent serves SDS as a stream"))
    }
}
