//! HBONE data path speed (SPEC §12): bytes/s of DATA framing (`send_data`) plus deframing
//! (`recv` → `Event::Data` → `consume`, WINDOW_UPDATEs flowing back) through a client↔server
//! pair of `ringside::hbone` connections in memory, one tunnel, writes of 16 KiB and 64 KiB as a
//! relay's socket reads would give them. No TLS and no sockets: the HTTP/2 core's own cost.
//!
//! `hbone_data_h2` moves the same bytes through the `h2` crate (the HTTP/2 under hyper and
//! ztunnel), client and server on a current-thread tokio runtime over an in-memory duplex pipe,
//! with the same windows and frame size: what choosing `h2` would cost for framing alone,
//! before any adaptor to monoio's I/O (README Decisions).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringside::hbone::conn::{Config, Connection, Event, Role};

/// Bytes moved per iteration: past the 16 MiB connection window, so credit must flow back.
const TRANSFER: usize = 32 << 20;

struct Pair {
    client: Connection,
    server: Connection,
    c_out: BytesMut,
    s_out: BytesMut,
    id: u32,
}

impl Pair {
    fn new() -> Pair {
        let (mut c_out, mut s_out) = (BytesMut::new(), BytesMut::new());
        let mut client = Connection::new(Role::Client, Config::default(), &mut c_out);
        let mut server = Connection::new(Role::Server, Config::default(), &mut s_out);
        let id = client.open("10.1.2.3:9080", &[], &mut c_out).unwrap();
        server.recv(&c_out.split(), &mut s_out).unwrap();
        while let Some(e) = server.poll_event() {
            if let Event::Request { stream_id, .. } = e {
                server.respond(stream_id, 200, &[], &mut s_out).unwrap();
            }
        }
        client.recv(&s_out.split(), &mut c_out).unwrap();
        while client.poll_event().is_some() {}
        server.recv(&c_out.split(), &mut s_out).unwrap();
        client.recv(&s_out.split(), &mut c_out).unwrap();
        Pair { client, server, c_out, s_out, id }
    }

    /// Moves `TRANSFER` bytes client → server in writes of `chunk.len()`.
    fn transfer(&mut self, chunk: &[u8]) -> usize {
        let (mut sent, mut received) = (0, 0);
        while received < TRANSFER {
            while sent < TRANSFER {
                let n = self.client.send_data(self.id, chunk, &mut self.c_out).unwrap();
                sent += n;
                if n < chunk.len() {
                    break;
                }
            }
            // The wire: what the client wrote is what the server reads.
            self.server.recv(&self.c_out, &mut self.s_out).unwrap();
            while let Some(e) = self.server.poll_event() {
                if let Event::Data { stream_id, data } = e {
                    received += black_box(&self.c_out[data.clone()]).len();
                    self.server.consume(stream_id, data.len(), &mut self.s_out).unwrap();
                }
            }
            self.c_out.clear();
            self.client.recv(&self.s_out, &mut self.c_out).unwrap();
            self.s_out.clear();
            while self.client.poll_event().is_some() {}
        }
        received
    }
}

fn data_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("hbone_data");
    group.throughput(Throughput::Bytes(TRANSFER as u64));
    group.sample_size(20);
    for chunk_len in [16 << 10, 64 << 10] {
        let chunk = vec![0x5a_u8; chunk_len];
        let mut pair = Pair::new();
        group.bench_with_input(BenchmarkId::new("frame_deframe", chunk_len), &chunk, |b, chunk| {
            b.iter(|| pair.transfer(chunk))
        });
    }
    group.finish();
}

/// Moves `TRANSFER` bytes through an `h2` client ↔ server pair in writes of `chunk.len()`.
async fn h2_transfer(chunk: bytes::Bytes) -> usize {
    let (a, b) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(1 << 20)
            .handshake::<_, bytes::Bytes>(b)
            .await
            .unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        let _send = respond.send_response(http::Response::new(()), false).unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = req.into_body();
        let mut received = 0;
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            received += black_box(&data).len();
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        received
    });
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .handshake::<_, bytes::Bytes>(a)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder().method(http::Method::CONNECT).uri("10.1.2.3:9080").body(()).unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let _resp = resp.await.unwrap();
    let mut sent = 0;
    while sent < TRANSFER {
        send.reserve_capacity(chunk.len());
        let cap = std::future::poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
        let n = cap.min(chunk.len());
        send.send_data(chunk.slice(..n), false).unwrap();
        sent += n;
    }
    send.send_data(bytes::Bytes::new(), true).unwrap();
    server.await.unwrap()
}

fn data_path_h2(c: &mut Criterion) {
    let mut group = c.benchmark_group("hbone_data_h2");
    group.throughput(Throughput::Bytes(TRANSFER as u64));
    group.sample_size(20);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for chunk_len in [16 << 10, 64 << 10] {
        let chunk = bytes::Bytes::from(vec![0x5a_u8; chunk_len]);
        group.bench_with_input(BenchmarkId::new("frame_deframe", chunk_len), &chunk, |b, chunk| {
            b.iter(|| rt.block_on(h2_transfer(chunk.clone())))
        });
    }
    group.finish();
}

criterion_group!(benches, data_path, data_path_h2);
criterion_main!(benches);
