//! State-machine tests: a client and a server `Connection` wired back to back in memory, and
//! raw frames for what our own client never sends.

use std::collections::HashMap;

use bytes::BytesMut;
use proptest::prelude::*;

use super::conn::{Config, Connection, Error, Event, Role};
use super::frame::{self, Frame, Reason, Settings};
use super::turn::Line;

/// A client and a server connection joined in memory. DATA events are gathered per stream
/// (`c_data`, `s_data`) as they come, while their input is at hand; the rest queue in order.
struct Pair {
    client: Connection,
    server: Connection,
    c_out: BytesMut,
    s_out: BytesMut,
    c_events: Vec<Event>,
    s_events: Vec<Event>,
    c_data: HashMap<u32, Vec<u8>>,
    s_data: HashMap<u32, Vec<u8>>,
}

/// Drains `conn`'s events after a `recv` of `input`: DATA's bytes (ranges of `input`) appended
/// to `data`, the others to `events`.
fn drain(conn: &mut Connection, input: &[u8], events: &mut Vec<Event>, data: &mut HashMap<u32, Vec<u8>>) {
    while let Some(e) = conn.poll_event() {
        match e {
            Event::Data { stream_id, data: range } => {
                data.entry(stream_id).or_default().extend_from_slice(&input[range]);
            }
            e => events.push(e),
        }
    }
}

impl Pair {
    fn new(client_cfg: Config, server_cfg: Config) -> Pair {
        let mut c_out = BytesMut::new();
        let mut s_out = BytesMut::new();
        let client = Connection::new(Role::Client, client_cfg, &mut c_out);
        let server = Connection::new(Role::Server, server_cfg, &mut s_out);
        let mut p = Pair {
            client,
            server,
            c_out,
            s_out,
            c_events: Vec::new(),
            s_events: Vec::new(),
            c_data: HashMap::new(),
            s_data: HashMap::new(),
        };
        p.pump();
        p
    }

    fn default() -> Pair {
        Pair::new(Config::default(), Config::default())
    }

    /// Moves bytes both ways until neither side has anything to say.
    fn pump(&mut self) {
        while !self.c_out.is_empty() || !self.s_out.is_empty() {
            let c = self.c_out.split();
            self.server.recv(&c, &mut self.s_out).unwrap();
            drain(&mut self.server, &c, &mut self.s_events, &mut self.s_data);
            let s = self.s_out.split();
            self.client.recv(&s, &mut self.c_out).unwrap();
            drain(&mut self.client, &s, &mut self.c_events, &mut self.c_data);
        }
    }

    /// Opens a tunnel: CONNECT, the server's 200; returns the stream id.
    fn tunnel(&mut self) -> u32 {
        let id = self.client.open("10.1.2.3:9080", &[], &mut self.c_out).unwrap();
        self.pump();
        assert!(matches!(self.s_events.pop(), Some(Event::Request { stream_id, .. }) if stream_id == id));
        self.server.respond(id, 200, &[], &mut self.s_out).unwrap();
        self.pump();
        assert!(matches!(self.c_events.pop(), Some(Event::Response { status: 200, .. })));
        id
    }

    fn take_data(data: &mut HashMap<u32, Vec<u8>>, id: u32) -> Vec<u8> {
        data.remove(&id).unwrap_or_default()
    }
}

/// Frames a server wrote, decoded from the client's point of view.
fn frames_from_server(bytes: &[u8]) -> Vec<Frame> {
    let mut dec = frame::Decoder::client(frame::MAX_MAX_FRAME_SIZE);
    let (mut v, mut at) = (Vec::new(), 0);
    while let Some(f) = dec.next_frame(bytes, &mut at).unwrap() {
        v.push(f);
    }
    v
}

/// A server that has seen a client preface and SETTINGS, with its own opening bytes dropped.
fn raw_server() -> (Connection, BytesMut) {
    let mut out = BytesMut::new();
    let mut server = Connection::new(Role::Server, Config::default(), &mut out);
    let mut hello = BytesMut::new();
    hello.extend_from_slice(frame::PREFACE);
    frame::encode_settings(&mut hello, &Settings::default());
    server.recv(&hello, &mut out).unwrap();
    out.clear();
    (server, out)
}

fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

fn status_of(frames: &[Frame]) -> (u16, bool) {
    for f in frames {
        if let Frame::Headers { block, end_stream, .. } = f {
            let fields = loona_hpack::Decoder::new().decode(block).unwrap();
            let status = std::str::from_utf8(&fields[0].1).unwrap().parse().unwrap();
            return (status, *end_stream);
        }
    }
    panic!("no headers in {frames:?}");
}

#[test]
fn a_connect_is_accepted_and_the_200_carries_the_terminators_baggage() {
    let mut p = Pair::default();
    let id = p.client.open("10.1.2.3:9080", &[("baggage", b"k8s.namespace.name=a")], &mut p.c_out).unwrap();
    p.pump();
    assert_eq!(
        p.s_events,
        vec![Event::Request {
            stream_id: id,
            authority: "10.1.2.3:9080".into(),
            headers: vec![("baggage".into(), b"k8s.namespace.name=a".to_vec())],
        }]
    );
    p.server.respond(id, 200, &[("baggage", b"k8s.namespace.name=b")], &mut p.s_out).unwrap();
    p.pump();
    assert_eq!(
        p.c_events,
        vec![Event::Response {
            stream_id: id,
            status: 200,
            headers: vec![("baggage".into(), b"k8s.namespace.name=b".to_vec())],
        }]
    );
}

#[test]
fn a_get_is_answered_400_and_never_reaches_the_caller() {
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    let block = hpack(&[(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")]);
    frame::encode_headers(&mut req, 1, &block, true, 16_384);
    server.recv(&req, &mut out).unwrap();
    assert_eq!(status_of(&frames_from_server(&out)), (400, true));
    assert_eq!(
        server.poll_event(),
        Some(Event::Refused { stream_id: 1, status: Some(400), why: "method not CONNECT" })
    );
    assert_eq!(server.active_streams(), 0);
}

#[test]
fn a_connect_without_authority_is_answered_400() {
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    frame::encode_headers(&mut req, 1, &hpack(&[(":method", "CONNECT")]), false, 16_384);
    server.recv(&req, &mut out).unwrap();
    let frames = frames_from_server(&out);
    assert_eq!(status_of(&frames), (400, true));
    // The client had not finished sending: told to stop.
    assert!(frames.contains(&Frame::RstStream { stream_id: 1, reason: Reason::NO_ERROR }));
}

#[test]
fn a_connect_with_a_path_is_reset_as_malformed() {
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    let block = hpack(&[(":method", "CONNECT"), (":authority", "a:1"), (":path", "/")]);
    frame::encode_headers(&mut req, 1, &block, false, 16_384);
    server.recv(&req, &mut out).unwrap();
    assert_eq!(
        frames_from_server(&out),
        vec![Frame::RstStream { stream_id: 1, reason: Reason::PROTOCOL_ERROR }]
    );
}

#[test]
fn an_error_status_ends_the_stream_for_the_client() {
    let mut p = Pair::default();
    let id = p.client.open("10.1.2.3:1", &[], &mut p.c_out).unwrap();
    p.pump();
    p.server.respond(id, 503, &[], &mut p.s_out).unwrap();
    p.pump();
    assert_eq!(
        p.c_events,
        vec![Event::Response { stream_id: id, status: 503, headers: vec![] }, Event::End { stream_id: id }]
    );
    assert_eq!((p.client.active_streams(), p.server.active_streams()), (0, 0));
}

#[test]
fn windows_are_sized_for_bulk_as_ztunnel() {
    let mut out = BytesMut::new();
    Connection::new(Role::Client, Config::default(), &mut out);
    assert_eq!(&out[..24], frame::PREFACE);
    let frames = frames_from_server(&out[24..]);
    assert_eq!(
        frames,
        vec![
            Frame::Settings(Settings {
                enable_push: Some(0),
                max_concurrent_streams: Some(100),
                initial_window_size: Some(4 << 20),
                max_frame_size: Some(1 << 20),
                max_header_list_size: Some(64 << 10),
                ..Settings::default()
            }),
            Frame::WindowUpdate { stream_id: 0, increment: (16 << 20) - 65_535 },
        ]
    );
}

#[test]
fn data_larger_than_one_read_arrives_as_slices_of_each_read_and_its_credit_returns_only_once_consumed() {
    let mut p = Pair::default();
    let id = p.tunnel();
    // 3 MiB in 1 MiB frames (the server's max frame size): over half the 4 MiB stream window.
    let payload: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(p.client.send_data(id, &payload, &mut p.c_out).unwrap(), payload.len());
    let wire = p.c_out.split();
    let (mut got, mut out) = (Vec::new(), BytesMut::new());
    // Reads of 5,000 bytes, as TLS records cut the stream: every frame spans hundreds.
    for read in wire.chunks(5_000) {
        p.server.recv(read, &mut out).unwrap();
        while let Some(e) = p.server.poll_event() {
            let Event::Data { stream_id, data } = e else { panic!("unexpected {e:?}") };
            assert_eq!(stream_id, id);
            got.extend_from_slice(&read[data]);
        }
        // Never more than a frame header held: the data is not copied into the core.
        assert!(p.server.buffered() < frame::HEADER_LEN, "{} buffered", p.server.buffered());
    }
    assert_eq!(got, payload);
    assert!(out.is_empty(), "credit before anything was consumed: {:?}", frames_from_server(&out));
    p.server.consume(id, 1 << 20, &mut out).unwrap();
    assert!(out.is_empty(), "under half a window owed: no WINDOW_UPDATE yet");
    p.server.consume(id, 2 << 20, &mut out).unwrap();
    assert_eq!(frames_from_server(&out), vec![Frame::WindowUpdate { stream_id: id, increment: 3 << 20 }]);
}

#[test]
fn a_data_frame_is_a_header_for_the_callers_own_bytes_as_the_peers_frame_size_and_windows_allow() {
    let server_cfg = Config { max_frame_size: 16_384, stream_window: 20_000, ..Config::default() };
    let mut p = Pair::new(Config::default(), server_cfg);
    let id = p.tunnel();
    // The server's max frame size bounds the first frame, its stream window the second.
    let (n, head) = p.client.send_frame(id, 100_000).unwrap();
    assert_eq!((n, head), (16_384, frame::data_header(id, 16_384, false)));
    let (m, head2) = p.client.send_frame(id, 100_000 - n).unwrap();
    assert_eq!((m, head2), (20_000 - 16_384, frame::data_header(id, 20_000 - 16_384, false)));
    assert_eq!(p.client.send_frame(id, 1).unwrap().0, 0, "windows spent");
    assert!(p.c_out.is_empty(), "the core appended none of the bytes");
    // Header and bytes written by the caller are what the server delivers.
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    let mut wire = head.to_vec();
    wire.extend_from_slice(&bytes[..n]);
    wire.extend_from_slice(&head2);
    wire.extend_from_slice(&bytes[n..]);
    p.c_out.extend_from_slice(&wire);
    p.pump();
    assert_eq!(Pair::take_data(&mut p.s_data, id), bytes);
}

#[test]
fn a_sender_blocked_at_window_zero_resumes_after_window_update() {
    let mut p = Pair::default();
    let id = p.tunnel();
    let data = vec![7u8; 5 << 20];
    let n = p.client.send_data(id, &data, &mut p.c_out).unwrap();
    assert_eq!(n, 4 << 20, "the stream window, 4 MiB, caps the first send");
    assert_eq!(p.client.send_capacity(id), 0);
    p.pump();
    let got = Pair::take_data(&mut p.s_data, id);
    assert_eq!(got.len(), 4 << 20);
    // Nothing consumed yet: no credit, the sender stays blocked.
    assert!(p.c_events.is_empty());
    assert_eq!(p.client.send_capacity(id), 0);
    // Consuming gives credit back, and the sender hears it can write.
    p.server.consume(id, got.len(), &mut p.s_out).unwrap();
    p.pump();
    assert_eq!(p.c_events, vec![Event::Writable { stream_id: id }]);
    let m = p.client.send_data(id, &data[n..], &mut p.c_out).unwrap();
    assert_eq!(m, 1 << 20);
    p.pump();
    assert_eq!(Pair::take_data(&mut p.s_data, id).len(), 1 << 20);
}

#[test]
fn the_connection_window_is_shared_by_streams() {
    let mut p = Pair::default();
    let ids: Vec<u32> = (0..5).map(|_| p.tunnel()).collect();
    let chunk = vec![1u8; 4 << 20];
    let mut total = 0;
    for id in &ids {
        total += p.client.send_data(*id, &chunk, &mut p.c_out).unwrap();
    }
    assert_eq!(total, 16 << 20, "the 16 MiB connection window caps all streams together");
    assert_eq!(p.client.send_capacity(ids[4]), 0);
}

#[test]
fn data_past_the_stream_window_resets_that_stream() {
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    frame::encode_headers(
        &mut req,
        1,
        &hpack(&[(":method", "CONNECT"), (":authority", "a:1")]),
        false,
        16_384,
    );
    server.recv(&req, &mut out).unwrap();
    let mut bulk = BytesMut::new();
    let chunk = vec![0u8; 16_384];
    for _ in 0..(4 << 20) / 16_384 {
        frame::encode_data(&mut bulk, 1, &chunk, false);
    }
    frame::encode_data(&mut bulk, 1, b"x", false);
    out.clear();
    server.recv(&bulk, &mut out).unwrap();
    assert_eq!(
        frames_from_server(&out),
        vec![Frame::RstStream { stream_id: 1, reason: Reason::FLOW_CONTROL_ERROR }]
    );
    let events: Vec<Event> = std::iter::from_fn(|| server.poll_event()).collect();
    assert_eq!(events.last(), Some(&Event::Reset { stream_id: 1, reason: Reason::FLOW_CONTROL_ERROR }));
}

#[test]
fn half_close_is_forwarded_and_the_other_direction_keeps_flowing() {
    let mut p = Pair::default();
    let id = p.tunnel();
    p.client.send_data(id, b"ping", &mut p.c_out).unwrap();
    p.client.finish(id, &mut p.c_out).unwrap();
    p.pump();
    assert_eq!(Pair::take_data(&mut p.s_data, id), b"ping");
    assert_eq!(p.s_events, vec![Event::End { stream_id: id }]);
    assert!(matches!(p.client.send_data(id, b"x", &mut p.c_out), Err(Error::State(..))));
    p.server.send_data(id, b"pong", &mut p.s_out).unwrap();
    p.server.finish(id, &mut p.s_out).unwrap();
    p.pump();
    assert_eq!(Pair::take_data(&mut p.c_data, id), b"pong");
    assert_eq!(p.c_events, vec![Event::End { stream_id: id }]);
    assert_eq!((p.client.active_streams(), p.server.active_streams()), (0, 0));
}

#[test]
fn a_callers_reset_becomes_rst_stream_connect_error_both_ways() {
    let mut p = Pair::default();
    let a = p.tunnel();
    let b = p.tunnel();
    p.client.reset(a, &mut p.c_out).unwrap();
    p.server.reset(b, &mut p.s_out).unwrap();
    p.pump();
    assert_eq!(p.s_events, vec![Event::Reset { stream_id: a, reason: Reason::CONNECT_ERROR }]);
    assert_eq!(p.c_events, vec![Event::Reset { stream_id: b, reason: Reason::CONNECT_ERROR }]);
    assert_eq!((p.client.active_streams(), p.server.active_streams()), (0, 0));
}

#[test]
fn a_peer_reset_with_no_error_is_still_a_reset_never_a_clean_end() {
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    frame::encode_headers(
        &mut req,
        1,
        &hpack(&[(":method", "CONNECT"), (":authority", "a:1")]),
        false,
        16_384,
    );
    frame::encode_rst_stream(&mut req, 1, Reason::NO_ERROR);
    server.recv(&req, &mut out).unwrap();
    assert!(matches!(server.poll_event(), Some(Event::Request { .. })));
    assert_eq!(server.poll_event(), Some(Event::Reset { stream_id: 1, reason: Reason::NO_ERROR }));
}

#[test]
fn ping_is_answered_and_our_ping_ack_is_reported() {
    let mut p = Pair::default();
    p.client.ping(*b"keepaliv", &mut p.c_out).unwrap();
    p.pump();
    assert_eq!(p.c_events, vec![Event::PingAck { payload: *b"keepaliv" }]);
    assert!(p.s_events.is_empty());
}

#[test]
fn goaway_on_drain_keeps_open_streams_and_refuses_new_ones() {
    let mut p = Pair::default();
    let id = p.tunnel();
    // A stream the client opens while the GOAWAY is in flight.
    let late = p.client.open("10.1.2.3:9080", &[], &mut p.c_out).unwrap();
    p.server.go_away(&mut p.s_out).unwrap();
    let s = p.s_out.split();
    p.client.recv(&s, &mut p.c_out).unwrap();
    while let Some(e) = p.client.poll_event() {
        p.c_events.push(e);
    }
    p.pump();
    assert!(p.c_events.contains(&Event::GoAway { last_stream_id: id, reason: Reason::NO_ERROR }));
    assert!(p.c_events.contains(&Event::Reset { stream_id: late, reason: Reason::REFUSED_STREAM }));
    assert_eq!(p.client.open("10.1.2.3:9080", &[], &mut p.c_out), Err(Error::GoingAway));
    // The stream below last_stream_id still carries data both ways.
    p.client.send_data(id, b"still", &mut p.c_out).unwrap();
    p.pump();
    assert_eq!(Pair::take_data(&mut p.s_data, id), b"still");
    assert!(!p.server.is_done());
    p.client.finish(id, &mut p.c_out).unwrap();
    p.server.finish(id, &mut p.s_out).unwrap();
    p.pump();
    assert!(p.server.is_done() && p.client.is_done());
}

#[test]
fn the_101st_stream_is_refused_in_both_roles() {
    // Client role: our own limit of 100.
    let mut p = Pair::default();
    for _ in 0..100 {
        p.client.open("10.1.2.3:9080", &[], &mut p.c_out).unwrap();
    }
    assert_eq!(p.client.open("10.1.2.3:9080", &[], &mut p.c_out), Err(Error::AtCapacity(100)));
    p.pump();
    assert_eq!(p.s_events.len(), 100);

    // Server role: a client allowed more (and not yet told our SETTINGS) opens 101.
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    let block = hpack(&[(":method", "CONNECT"), (":authority", "a:1")]);
    for i in 0..101u32 {
        // A fresh encoder each time: a stateless block the server decodes alike.
        frame::encode_headers(&mut req, 2 * i + 1, &block, false, 16_384);
    }
    server.recv(&req, &mut out).unwrap();
    assert_eq!(server.active_streams(), 100);
    assert_eq!(
        frames_from_server(&out),
        vec![Frame::RstStream { stream_id: 201, reason: Reason::REFUSED_STREAM }]
    );
}

#[test]
fn a_header_block_split_over_continuation_frames_is_one_request() {
    let (mut server, mut out) = raw_server();
    let mut req = BytesMut::new();
    let block = hpack(&[(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("baggage", "a=b")]);
    // Frames of 4 bytes: HEADERS and several CONTINUATIONs.
    frame::encode_headers(&mut req, 1, &block, false, 4);
    server.recv(&req, &mut out).unwrap();
    assert_eq!(
        server.poll_event(),
        Some(Event::Request {
            stream_id: 1,
            authority: "10.0.0.1:80".into(),
            headers: vec![("baggage".into(), b"a=b".to_vec())],
        })
    );
}

#[test]
fn the_client_honours_the_peers_lower_stream_limit() {
    let server_cfg = Config { max_concurrent_streams: 2, ..Config::default() };
    let mut p = Pair::new(Config::default(), server_cfg);
    p.client.open("10.1.2.3:1", &[], &mut p.c_out).unwrap();
    p.client.open("10.1.2.3:2", &[], &mut p.c_out).unwrap();
    assert_eq!(p.client.open("10.1.2.3:3", &[], &mut p.c_out), Err(Error::AtCapacity(2)));
}

fn connection_error(bytes: &[u8]) -> (Reason, &'static str, Vec<Frame>) {
    let (mut server, mut out) = raw_server();
    match server.recv(bytes, &mut out) {
        Err(Error::Protocol { reason, what }) => {
            assert_eq!(server.recv(b"", &mut out), Err(Error::Closed));
            (reason, what, frames_from_server(&out))
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
}

#[test]
fn protocol_violations_end_the_connection_with_goaway_and_the_rfc_code() {
    let mut b = BytesMut::new();
    frame::encode_data(&mut b, 1, b"x", false);
    let (reason, what, frames) = connection_error(&b);
    assert_eq!((reason, what), (Reason::PROTOCOL_ERROR, "data on idle stream"));
    assert!(matches!(frames.last(), Some(Frame::GoAway { reason: Reason::PROTOCOL_ERROR, .. })));

    let mut b = BytesMut::new();
    // HEADERS without END_HEADERS, then a PING where a CONTINUATION must come.
    frame::encode_header(&mut b, 1, 0x1, 0, 1);
    b.extend_from_slice(&[0x82]);
    frame::encode_ping(&mut b, false, [0; 8]);
    assert_eq!(connection_error(&b).1, "header block interrupted");

    let mut b = BytesMut::new();
    frame::encode_headers(&mut b, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff], true, 16_384);
    assert_eq!(connection_error(&b).0, Reason::COMPRESSION_ERROR);

    let mut b = BytesMut::new();
    frame::encode_headers(&mut b, 2, &hpack(&[(":method", "CONNECT"), (":authority", "a:1")]), false, 16_384);
    assert_eq!(connection_error(&b).0, Reason::PROTOCOL_ERROR);

    let mut b = BytesMut::new();
    frame::encode_window_update(&mut b, 0, frame::MAX_WINDOW);
    assert_eq!(connection_error(&b).0, Reason::FLOW_CONTROL_ERROR);

    let mut b = BytesMut::new();
    frame::encode_header(&mut b, 0, 0x5, 0x4, 1); // PUSH_PROMISE
    assert_eq!(connection_error(&b).0, Reason::PROTOCOL_ERROR);

    // The first frame after the preface must be SETTINGS.
    let mut out = BytesMut::new();
    let mut server = Connection::new(Role::Server, Config::default(), &mut out);
    let mut b = BytesMut::new();
    b.extend_from_slice(frame::PREFACE);
    frame::encode_ping(&mut b, false, [0; 8]);
    assert_eq!(
        server.recv(&b, &mut out),
        Err(Error::Protocol { reason: Reason::PROTOCOL_ERROR, what: "first frame not settings" })
    );
}

#[test]
fn a_connection_error_resets_every_open_stream() {
    let mut p = Pair::default();
    let id = p.tunnel();
    let mut b = BytesMut::new();
    frame::encode_data(&mut b, 99, b"x", false);
    assert!(p.server.recv(&b, &mut p.s_out).is_err());
    assert_eq!(p.server.poll_event(), Some(Event::Reset { stream_id: id, reason: Reason::PROTOCOL_ERROR }));
    assert!(p.server.is_done());
}

#[test]
fn a_stream_split_at_every_point_gives_the_same_events() {
    let mut c_bytes = BytesMut::new();
    let mut client = Connection::new(Role::Client, Config::default(), &mut c_bytes);
    let id = client.open("10.1.2.3:9080", &[("baggage", b"a=b")], &mut c_bytes).unwrap();
    client.ping([1; 8], &mut c_bytes).unwrap();
    let mut reference = Vec::new();
    {
        let mut out = BytesMut::new();
        let mut server = Connection::new(Role::Server, Config::default(), &mut out);
        server.recv(&c_bytes, &mut out).unwrap();
        reference.extend(std::iter::from_fn(|| server.poll_event()));
    }
    assert!(matches!(&reference[..], [Event::Request { stream_id, .. }] if *stream_id == id));
    for split in 0..=c_bytes.len() {
        let mut out = BytesMut::new();
        let mut server = Connection::new(Role::Server, Config::default(), &mut out);
        server.recv(&c_bytes[..split], &mut out).unwrap();
        server.recv(&c_bytes[split..], &mut out).unwrap();
        let got: Vec<Event> = std::iter::from_fn(|| server.poll_event()).collect();
        assert_eq!(got, reference, "split at {split}");
    }
}

/// A waker that counts its wakes.
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `n` counting wakers and their tasks' contexts' wakers.
fn counting_wakers(n: usize) -> Vec<(std::sync::Arc<CountingWaker>, std::task::Waker)> {
    (0..n)
        .map(|_| {
            let c = std::sync::Arc::new(CountingWaker(0.into()));
            (c.clone(), std::task::Waker::from(c))
        })
        .collect()
}

fn wakes(c: &CountingWaker) -> usize {
    c.0.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn a_turn_given_back_wakes_the_first_in_line_alone_not_every_stream_of_the_carrier() {
    use std::future::Future;
    use std::task::{Context, Poll};
    let line = Line::default();
    let held = std::pin::pin!(line.take());
    let Poll::Ready(turn) = held.poll(&mut Context::from_waker(std::task::Waker::noop())) else {
        panic!("a free turn is taken at once")
    };
    // 100 streams wait for the turn, in order.
    let wakers = counting_wakers(100);
    let mut waiting: Vec<_> = (0..100).map(|_| Box::pin(line.take())).collect();
    for (w, (_, waker)) in waiting.iter_mut().zip(&wakers) {
        assert!(w.as_mut().poll(&mut Context::from_waker(waker)).is_pending());
    }
    assert_eq!(line.waiting(), 100);
    drop(turn);
    let woken: Vec<usize> = wakers.iter().map(|(c, _)| wakes(c)).collect();
    assert_eq!(woken.iter().sum::<usize>(), 1, "one wake for one turn: {woken:?}");
    assert_eq!(woken[0], 1, "the oldest waiter is the one woken");
    // The woken one takes the turn; giving it back wakes the next.
    let Poll::Ready(turn) = waiting[0].as_mut().poll(&mut Context::from_waker(&wakers[0].1)) else {
        panic!("the woken waiter takes the free turn")
    };
    assert_eq!(line.waiting(), 99);
    drop(turn);
    assert_eq!(wakes(&wakers[1].0), 1);
    assert_eq!(wakers.iter().map(|(c, _)| wakes(c)).sum::<usize>(), 2);
}

#[test]
fn a_waiter_dropped_after_being_woken_passes_the_turn_to_the_next() {
    use std::future::Future;
    use std::task::{Context, Poll};
    let line = Line::default();
    let held = std::pin::pin!(line.take());
    let Poll::Ready(turn) = held.poll(&mut Context::from_waker(std::task::Waker::noop())) else {
        panic!("a free turn is taken at once")
    };
    let wakers = counting_wakers(2);
    let mut first = Box::pin(line.take());
    let mut second = Box::pin(line.take());
    assert!(first.as_mut().poll(&mut Context::from_waker(&wakers[0].1)).is_pending());
    assert!(second.as_mut().poll(&mut Context::from_waker(&wakers[1].1)).is_pending());
    drop(turn);
    assert_eq!((wakes(&wakers[0].0), wakes(&wakers[1].0)), (1, 0));
    // Its connection was cut before it ran: the turn must not be stranded.
    drop(first);
    assert_eq!(wakes(&wakers[1].0), 1);
    assert!(second.as_mut().poll(&mut Context::from_waker(&wakers[1].1)).is_ready());
    assert_eq!(line.waiting(), 0);
}

/// A frame with a random type, flags, small stream id and short payload.
fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    (0u8..12, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
        |(kind, flags, stream, payload)| {
            let mut b = BytesMut::new();
            frame::encode_header(&mut b, payload.len(), kind, flags, stream);
            b.extend_from_slice(&payload);
            b.to_vec()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_header_blocks_never_panic_the_hpack_decoder(
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8),
    ) {
        // Several blocks through one decoder: the dynamic table carries state between them.
        let mut dec = super::headers::decoder();
        for block in &blocks {
            if let Ok(fields) = super::headers::decode(&mut dec, block, 4096) {
                let size: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
                prop_assert!(size <= 4096);
            }
        }
    }

    #[test]
    fn random_frames_never_panic_the_client(
        frames in proptest::collection::vec(arb_frame(), 0..24),
    ) {
        let mut out = BytesMut::new();
        let mut client = Connection::new(Role::Client, Config::default(), &mut out);
        client.open("10.1.2.3:9080", &[], &mut out).unwrap();
        let mut hello = BytesMut::new();
        frame::encode_settings(&mut hello, &Settings::default());
        // The 200: HPACK static index 8, `:status 200`.
        frame::encode_headers(&mut hello, 1, &[0x88], false, 16_384);
        client.recv(&hello, &mut out).unwrap();
        for f in &frames {
            if client.recv(f, &mut out).is_err() {
                break;
            }
            while let Some(e) = client.poll_event() {
                if let Event::Data { stream_id, data } = e {
                    prop_assert!(data.end <= f.len(), "a range of the input");
                    let _ = client.consume(stream_id, data.len(), &mut out);
                }
            }
        }
        prop_assert!(client.buffered() <= frame::HEADER_LEN + (1 << 20) + (64 << 10));
    }

    #[test]
    fn random_bytes_never_panic_the_server_and_memory_stays_bounded(
        noise in proptest::collection::vec(any::<u8>(), 0..512),
        split in 0usize..512,
    ) {
        let (mut server, mut out) = raw_server();
        let cut = split.min(noise.len());
        let _ = server.recv(&noise[..cut], &mut out);
        let _ = server.recv(&noise[cut..], &mut out);
        while server.poll_event().is_some() {}
        prop_assert!(server.buffered() <= frame::HEADER_LEN + (1 << 20));
        prop_assert!(server.active_streams() <= 100);
    }

    #[test]
    fn random_frames_never_panic_the_server(
        frames in proptest::collection::vec(arb_frame(), 0..24),
        with_request in any::<bool>(),
    ) {
        let (mut server, mut out) = raw_server();
        if with_request {
            let mut req = BytesMut::new();
            frame::encode_headers(&mut req, 1, &hpack(&[(":method", "CONNECT"), (":authority", "a:1")]), false, 16_384);
            server.recv(&req, &mut out).unwrap();
        }
        for f in &frames {
            if server.recv(f, &mut out).is_err() {
                break;
            }
            while let Some(e) = server.poll_event() {
                // Act like a caller: answer and consume, to reach more states.
                match e {
                    Event::Request { stream_id, .. } => { let _ = server.respond(stream_id, 200, &[], &mut out); }
                    Event::Data { stream_id, data } => {
                        prop_assert!(data.end <= f.len(), "a range of the input");
                        let _ = server.consume(stream_id, data.len(), &mut out);
                    }
                    _ => {}
                }
            }
        }
        prop_assert!(server.buffered() <= frame::HEADER_LEN + (1 << 20) + (64 << 10));
        prop_assert!(out.len() < 1 << 20);
    }
}
