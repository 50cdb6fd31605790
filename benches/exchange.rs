//! istio-peer-exchange codec speed (SPEC §2): parse a typical preamble (Istio's golden client
//! node metadata) fed whole and in 3 reads, and encode it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ringside::exchange::{Parser, Peers, Status, encode};

const MAX_PREAMBLE: usize = 64 * 1024;

fn golden_preamble() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/preamble_golden_client.bin"))
        .expect("tests/data/preamble_golden_client.bin")
}

fn parse(chunks: &[&[u8]], buffer: Vec<u8>, peers: Option<&Peers>) -> Vec<u8> {
    let mut parser = match peers {
        Some(peers) => Parser::with_peers(MAX_PREAMBLE, buffer, peers),
        None => Parser::with_buffer(MAX_PREAMBLE, buffer),
    };
    for chunk in chunks {
        match parser.feed(black_box(chunk)) {
            Status::NeedMore => {}
            Status::Done { peer, .. } => {
                black_box(peer);
                break;
            }
            other => panic!("golden preamble did not parse: {other:?}"),
        }
    }
    parser.into_buffer()
}

fn exchange(c: &mut Criterion) {
    let preamble = golden_preamble();
    let third = preamble.len() / 3;
    let (first, rest) = preamble.split_at(third);
    let (second, last) = rest.split_at(third);
    let mut peer = None;
    if let Status::Done { peer: node, .. } = Parser::new(MAX_PREAMBLE).feed(&preamble) {
        peer = Some(node);
    }
    let node = peer.expect("golden preamble parses");

    let mut group = c.benchmark_group("exchange");
    let mut buffer = Vec::with_capacity(MAX_PREAMBLE);
    group.bench_function("parse_whole", |b| {
        b.iter(|| buffer = parse(&[&preamble], std::mem::take(&mut buffer), None))
    });
    // A worker's exchanges with a peer it heard from before: its metadata is not decoded again.
    let peers = Peers::default();
    group.bench_function("parse_whole_known_peer", |b| {
        b.iter(|| buffer = parse(&[&preamble], std::mem::take(&mut buffer), Some(&peers)))
    });
    group.bench_function("parse_3_reads", |b| {
        b.iter(|| buffer = parse(&[first, second, last], std::mem::take(&mut buffer), None))
    });
    group.bench_function("encode", |b| b.iter(|| encode(black_box(&node))));
    group.finish();
}

criterion_group!(benches, exchange);
criterion_main!(benches);
