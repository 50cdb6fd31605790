//! Istio's TestTCPMetadataExchange topology through two real ringside sidecars: productpage-v1's
//! outbound sidecar (reporter=source) to ratings-v1's inbound sidecar (reporter=destination) to
//! Istio's `hello` TCP server, with the node identities of that test, as `common/istio_tcp.rs`
//! restates them. Included with `#[path]` next to `common/mod.rs` (as `crate::common`) and
//! `common/istio_tcp.rs`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use ringside::exchange::NodeMetadata;

use crate::common::{Ringside, connect, free_addr, read_exact, read_to_end, serve_each};
pub use crate::istio_tcp::SERVER_SERVICE;

/// Istio's `TCPServer{Prefix: "hello"}` (test/envoye2e/driver/tcp.go): answers each line L with
/// `hello L`.
pub fn hello_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    serve_each(l, |s: TcpStream| {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if w.write_all(format!("hello {line}").as_bytes()).is_err() {
                return;
            }
            line.clear();
        }
    });
    addr
}

/// The `node:` section of a config file for a workload's node metadata.
pub fn node_yaml(n: &NodeMetadata) -> String {
    // JSON is YAML: quote every value exactly.
    let q = |s: &str| serde_json::to_string(s).unwrap();
    format!(
        "node:\n  workload_name: {}\n  namespace: {}\n  labels: {}\n  cluster_id: {}\n  mesh_id: {}\n  \
         service_account: {}\n  istio_version: {}\n",
        q(&n.workload_name),
        q(&n.namespace),
        serde_json::to_string(&n.labels).unwrap(),
        q(&n.cluster_id),
        q(&n.mesh_id),
        q(&n.service_account),
        q(&n.istio_version),
    )
}

/// A sidecar with the identity `node`, one `always` listener whose cluster is
/// `server.default.svc.cluster.local` at `upstream`.
pub fn golden_sidecar(
    node: &NodeMetadata,
    direction: &str,
    upstream: SocketAddr,
    extra: &[&str],
) -> Ringside {
    let listen = free_addr();
    let config = format!(
        "{}listeners:\n  - name: {direction}-server\n    listen: {listen}\n    direction: {direction}\n    \
         peer_exchange: always\n    cluster: server\nclusters:\n  - name: server\n    service: {SERVER_SERVICE}\n    \
         endpoints: [{{address: \"{upstream}\"}}]\n",
        node_yaml(node)
    );
    Ringside::spawn_config(&config, listen, extra)
}

/// Istio's TestTCPMetadataExchange topology: productpage-v1's outbound sidecar (reporter=source)
/// to ratings-v1's inbound sidecar (reporter=destination) to a `hello` server.
pub fn golden_pair(extra: &[&str]) -> (Ringside, Ringside) {
    let server = golden_sidecar(&crate::istio_tcp::server_node(), "inbound", hello_server(), extra);
    let client = golden_sidecar(&crate::istio_tcp::client_node(), "outbound", server.listen, extra);
    (client, server)
}

/// One connection of Istio's scenario: write `world\n`, read `hello world\n`, close.
pub fn hello_world(addr: SocketAddr) {
    let mut c = connect(addr);
    c.write_all(b"world\n").unwrap();
    assert_eq!(read_exact(&mut c, 12), b"hello world\n");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"");
}
