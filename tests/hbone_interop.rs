//! SPEC §12 wire compatibility: ringside's sans-IO HTTP/2 core (`ringside::hbone`) against the
//! `h2` crate, the HTTP/2 implementation under hyper, tonic and ztunnel, written by others.
//! Both roles, over an in-memory duplex pipe: CONNECT and its 200 with `baggage` both ways,
//! 20 MiB each way at once (more than the 16 MiB connection window, so window credit must flow
//! back as data is consumed), half-close, RST_STREAM(CONNECT_ERROR) both ways, 400 for a GET,
//! PING, GOAWAY on drain.

use std::collections::VecDeque;
use std::future::poll_fn;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason as H2Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use ringside::hbone::conn::{Config, Connection, Event, Role};
use ringside::hbone::frame::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

const BULK: usize = 20 << 20;

/// Deterministic bytes that differ at every offset, so a lost, duplicated or reordered chunk
/// changes the checksum.
fn payload(seed: u32) -> Bytes {
    (0..BULK as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// FNV-1a over a byte stream fed in pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checksum(u64, usize);

impl Checksum {
    fn new() -> Checksum {
        Checksum(0xcbf2_9ce4_8422_2325, 0)
    }
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += data.len();
    }
    fn of(data: &[u8]) -> Checksum {
        let mut c = Checksum::new();
        c.update(data);
        c
    }
}

/// Our connection driven over one end of the pipe: reads feed `recv`, `out` is written while
/// reading goes on (so neither side can block the other on a full pipe).
struct Ours {
    conn: Connection,
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    out: BytesMut,
    rbuf: Vec<u8>,
    /// Events of the reads so far, each DATA with its bytes copied out of the read buffer
    /// (which the next read overwrites).
    pending: VecDeque<(Event, Vec<u8>)>,
    /// The bytes of the last `Event::Data` that `event` returned.
    data: Vec<u8>,
}

enum Io {
    Read(usize),
    Wrote(usize),
}

impl Ours {
    fn new(role: Role, io: DuplexStream) -> Ours {
        let mut out = BytesMut::new();
        let conn = Connection::new(role, Config::default(), &mut out);
        let (rd, wr) = tokio::io::split(io);
        Ours { conn, rd, wr, out, rbuf: vec![0; 64 << 10], pending: VecDeque::new(), data: Vec::new() }
    }

    /// One read or write, whichever is ready first; false once the peer closed.
    async fn step(&mut self) -> bool {
        let io = if self.out.is_empty() {
            Io::Read(self.rd.read(&mut self.rbuf).await.unwrap())
        } else {
            tokio::select! {
                r = self.rd.read(&mut self.rbuf) => Io::Read(r.unwrap()),
                w = self.wr.write(&self.out) => Io::Wrote(w.unwrap()),
            }
        };
        match io {
            Io::Read(0) => return false,
            Io::Read(n) => {
                self.conn.recv(&self.rbuf[..n], &mut self.out).unwrap();
                while let Some(e) = self.conn.poll_event() {
                    let bytes = match &e {
                        Event::Data { data, .. } => self.rbuf[data.clone()].to_vec(),
                        _ => Vec::new(),
                    };
                    self.pending.push_back((e, bytes));
                }
            }
            Io::Wrote(n) => self.out.advance(n),
        }
        true
    }

    async fn event(&mut self) -> Event {
        loop {
            if let Some((e, data)) = self.pending.pop_front() {
                self.data = data;
                return e;
            }
            assert!(self.step().await, "peer closed the connection");
        }
    }

    async fn flush(&mut self) {
        while !self.out.is_empty() {
            assert!(self.step().await, "peer closed the connection");
        }
        self.wr.flush().await.unwrap();
    }

    /// Sends `data` then END_STREAM while receiving the peer's bytes until its END_STREAM;
    /// returns what was received.
    async fn bulk(&mut self, id: u32, data: &[u8]) -> Checksum {
        let (mut sent, mut finished, mut ended) = (0, false, false);
        let mut got = Checksum::new();
        let mut blocked = 0;
        loop {
            while !finished {
                let end = (sent + (256 << 10)).min(data.len());
                let n = self.conn.send_data(id, &data[sent..end], &mut self.out).unwrap();
                sent += n;
                if sent == data.len() {
                    self.conn.finish(id, &mut self.out).unwrap();
                    finished = true;
                } else if sent < end {
                    blocked += 1;
                    break;
                }
            }
            if finished && ended {
                self.flush().await;
                assert!(blocked > 0, "20 MiB must outrun the windows at least once");
                return got;
            }
            match self.event().await {
                Event::Data { stream_id, data } => {
                    assert_eq!(stream_id, id);
                    got.update(&self.data);
                    self.conn.consume(id, data.len(), &mut self.out).unwrap();
                }
                Event::End { stream_id } => {
                    assert_eq!(stream_id, id);
                    ended = true;
                }
                Event::Writable { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

async fn h2_send(mut tx: SendStream<Bytes>, data: Bytes) {
    let mut off = 0;
    while off < data.len() {
        tx.reserve_capacity((data.len() - off).min(1 << 20));
        let cap = poll_fn(|cx| tx.poll_capacity(cx)).await.unwrap().unwrap();
        let n = cap.min(data.len() - off);
        tx.send_data(data.slice(off..off + n), false).unwrap();
        off += n;
    }
    tx.send_data(Bytes::new(), true).unwrap();
}

async fn h2_recv(mut rx: RecvStream) -> Checksum {
    let mut got = Checksum::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.unwrap();
        got.update(&chunk);
        rx.flow_control().release_capacity(chunk.len()).unwrap();
    }
    got
}

#[tokio::test]
async fn our_client_tunnels_through_an_h2_server() {
    let (a, b) = tokio::io::duplex(256 << 10);
    let from_h2 = payload(1);
    let to_h2 = payload(2);

    let expected_from_h2 = from_h2.clone();
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(b).await.unwrap();
        // Tunnel 1: bulk both ways.
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.1.2.3:9080");
        assert_eq!(req.headers()["baggage"], "k8s.namespace.name=client-ns");
        let rx = req.into_body();
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header("baggage", "k8s.namespace.name=server-ns")
            .body(())
            .unwrap();
        let tx = respond.send_response(resp, false).unwrap();
        let sender = tokio::spawn(h2_send(tx, expected_from_h2));
        let receiver = tokio::spawn(h2_recv(rx));
        // Tunnel 2: we reset it; tunnel 3: h2 resets it.
        let (req2, mut respond2) = conn.accept().await.unwrap().unwrap();
        let _tx2 = respond2.send_response(Response::new(()), false).unwrap();
        let (req3, mut respond3) = conn.accept().await.unwrap().unwrap();
        let mut tx3 = respond3.send_response(Response::new(()), false).unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut rx2 = req2.into_body();
        let reset = rx2.data().await.unwrap().unwrap_err();
        assert_eq!(reset.reason(), Some(H2Reason::CONNECT_ERROR));
        tx3.send_reset(H2Reason::CONNECT_ERROR);
        drop(req3);
        sender.await.unwrap();
        receiver.await.unwrap()
    });

    let mut ours = Ours::new(Role::Client, a);
    let id = ours
        .conn
        .open("10.1.2.3:9080", &[("baggage", b"k8s.namespace.name=client-ns")], &mut ours.out)
        .unwrap();
    match ours.event().await {
        Event::Response { stream_id, status, headers } => {
            assert_eq!((stream_id, status), (id, 200));
            assert_eq!(headers, vec![("baggage".into(), b"k8s.namespace.name=server-ns".to_vec())]);
        }
        other => panic!("expected the 200, got {other:?}"),
    }
    ours.conn.ping(*b"ringside", &mut ours.out).unwrap();
    let id2 = ours.conn.open("10.1.2.3:1", &[], &mut ours.out).unwrap();
    let id3 = ours.conn.open("10.1.2.3:2", &[], &mut ours.out).unwrap();

    // Bulk both ways on tunnel 1, the other events handled as they come.
    let mut got = Checksum::new();
    let (mut sent, mut finished, mut ended, mut blocked) = (0, false, false, 0);
    let (mut pinged, mut reset_seen, mut answered) = (false, false, 0);
    loop {
        while !finished {
            let end = (sent + (256 << 10)).min(to_h2.len());
            let n = ours.conn.send_data(id, &to_h2[sent..end], &mut ours.out).unwrap();
            sent += n;
            if sent == to_h2.len() {
                ours.conn.finish(id, &mut ours.out).unwrap();
                finished = true;
            } else if sent < end {
                blocked += 1;
                break;
            }
        }
        if finished && ended && pinged && reset_seen {
            break;
        }
        match ours.event().await {
            Event::Data { stream_id, data } if stream_id == id => {
                got.update(&ours.data);
                ours.conn.consume(id, data.len(), &mut ours.out).unwrap();
            }
            Event::End { stream_id } if stream_id == id => ended = true,
            Event::Writable { .. } => {}
            Event::PingAck { payload } => {
                assert_eq!(&payload, b"ringside");
                pinged = true;
            }
            Event::Response { stream_id, status, .. } => {
                assert_eq!(status, 200);
                answered += 1;
                if stream_id == id2 {
                    ours.conn.reset(id2, &mut ours.out).unwrap();
                }
            }
            Event::Reset { stream_id, reason } => {
                assert_eq!((stream_id, reason), (id3, Reason::CONNECT_ERROR));
                reset_seen = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    ours.flush().await;
    assert_eq!(answered, 2);
    assert!(blocked > 0, "20 MiB must outrun the windows");
    assert_eq!(got, Checksum::of(&from_h2), "bytes from h2");
    assert_eq!(server.await.unwrap(), Checksum::of(&to_h2), "bytes to h2");
}

#[tokio::test]
async fn an_h2_client_tunnels_through_our_server() {
    let (a, b) = tokio::io::duplex(256 << 10);
    let from_h2 = payload(3);
    let to_h2 = payload(4);

    let expected_from_h2 = from_h2.clone();
    let client = tokio::spawn(async move {
        let (send_request, conn) = h2::client::handshake(b).await.unwrap();
        tokio::spawn(async move { conn.await.unwrap() });
        let mut send_request = send_request.ready().await.unwrap();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.1.2.3:9080")
            .header("baggage", "k8s.namespace.name=client-ns")
            .body(())
            .unwrap();
        let (resp, tx) = send_request.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["baggage"], "k8s.namespace.name=server-ns");
        let sender = tokio::spawn(h2_send(tx, expected_from_h2));
        let got = h2_recv(resp.into_body()).await;
        sender.await.unwrap();

        // A GET is answered 400 (ztunnel's answer), never reaching the caller.
        let get = Request::builder().method(Method::GET).uri("https://10.1.2.3:9080/").body(()).unwrap();
        let (resp, _) = send_request.send_request(get, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST);

        // Reset both ways: h2 resets one tunnel, ours resets the other.
        let connect = |port: u16| {
            Request::builder().method(Method::CONNECT).uri(format!("10.1.2.3:{port}")).body(()).unwrap()
        };
        let (resp, mut tx) = send_request.send_request(connect(1), false).unwrap();
        let _ = resp.await.unwrap();
        tx.send_reset(H2Reason::CONNECT_ERROR);
        let (resp, _tx) = send_request.send_request(connect(2), false).unwrap();
        let mut rx = resp.await.unwrap().into_body();
        let err = rx.data().await.unwrap().unwrap_err();
        assert_eq!(err.reason(), Some(H2Reason::CONNECT_ERROR));
        got
    });

    let mut ours = Ours::new(Role::Server, a);
    let id = match ours.event().await {
        Event::Request { stream_id, authority, headers } => {
            assert_eq!(authority, "10.1.2.3:9080");
            assert_eq!(headers, vec![("baggage".into(), b"k8s.namespace.name=client-ns".to_vec())]);
            stream_id
        }
        other => panic!("expected a request, got {other:?}"),
    };
    ours.conn.respond(id, 200, &[("baggage", b"k8s.namespace.name=server-ns")], &mut ours.out).unwrap();
    let got = ours.bulk(id, &to_h2).await;
    assert_eq!(got, Checksum::of(&from_h2), "bytes from h2");

    assert!(matches!(ours.event().await, Event::Refused { why: "method not CONNECT", .. }));
    let Event::Request { stream_id: r1, .. } = ours.event().await else { panic!("expected a request") };
    ours.conn.respond(r1, 200, &[], &mut ours.out).unwrap();
    // h2 may write its RST_STREAM for r1 before or after the next HEADERS.
    let (mut r1_reset, mut r2_seen) = (false, false);
    while !(r1_reset && r2_seen) {
        match ours.event().await {
            Event::Reset { stream_id, reason } => {
                assert_eq!((stream_id, reason), (r1, Reason::CONNECT_ERROR));
                r1_reset = true;
            }
            Event::Request { stream_id: r2, .. } => {
                ours.conn.respond(r2, 200, &[], &mut ours.out).unwrap();
                ours.conn.reset(r2, &mut ours.out).unwrap();
                r2_seen = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Keep serving the connection (the reset, window updates) until the h2 side is done.
    let mut client = client;
    let got_by_h2 = loop {
        tokio::select! {
            done = &mut client => break done.unwrap(),
            open = ours.step() => if !open { break client.await.unwrap() },
        }
    };
    assert_eq!(got_by_h2, Checksum::of(&to_h2), "bytes to h2");
}

#[tokio::test]
async fn an_h2_client_keeps_its_open_tunnel_after_our_goaway_and_opens_no_new_one() {
    let (a, b) = tokio::io::duplex(64 << 10);
    let client = tokio::spawn(async move {
        let (send_request, conn) = h2::client::handshake(b).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send_request = send_request.ready().await.unwrap();
        let connect = || Request::builder().method(Method::CONNECT).uri("10.1.2.3:9080").body(()).unwrap();
        let (resp, mut tx) = send_request.send_request(connect(), false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        tx.send_data(Bytes::from_static(b"after goaway"), true).unwrap();
        let mut rx = resp.into_body();
        let mut body = Vec::new();
        while let Some(chunk) = rx.data().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        // The GOAWAY came before our END_STREAM: a new tunnel must fail one way or another.
        let refused = match send_request.ready().await {
            Err(_) => true,
            Ok(mut s) => match s.send_request(connect(), false) {
                Err(_) => true,
                Ok((resp, _tx)) => resp.await.is_err(),
            },
        };
        (body, refused)
    });

    let mut ours = Ours::new(Role::Server, a);
    let Event::Request { stream_id: id, .. } = ours.event().await else { panic!("expected a request") };
    ours.conn.respond(id, 200, &[], &mut ours.out).unwrap();
    ours.conn.go_away(&mut ours.out).unwrap();
    let mut got = Vec::new();
    loop {
        match ours.event().await {
            Event::Data { data, .. } => {
                got.extend_from_slice(&ours.data);
                ours.conn.consume(id, data.len(), &mut ours.out).unwrap();
            }
            Event::End { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"after goaway");
    ours.conn.send_data(id, b"bye", &mut ours.out).unwrap();
    ours.conn.finish(id, &mut ours.out).unwrap();
    assert!(ours.conn.is_done(), "draining and no stream left");
    let mut client = client;
    let (body, refused) = loop {
        tokio::select! {
            done = &mut client => break done.unwrap(),
            open = ours.step() => if !open { break client.await.unwrap() },
        }
    };
    assert_eq!(body, b"bye");
    assert!(refused, "h2 opened a tunnel after GOAWAY");
}
