//! SPEC §2, istio-peer-exchange: the preamble parser against every way a stream can be split.

use std::collections::BTreeMap;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use ringside::exchange::{HEADER_LEN, Invalid, MAGIC, NodeMetadata, Parser, Status, encode};

const MAX_PREAMBLE: usize = 64 * 1024;
const MAGIC_BYTES: [u8; 4] = MAGIC.to_be_bytes();

/// What feeding a sequence of reads produced, as a relay would see it.
#[derive(Debug, Default)]
struct Outcome {
    peer: Option<NodeMetadata>,
    /// Preamble bytes removed from the stream, over all reads.
    consumed: usize,
    /// Bytes the relay forwards to the application.
    application: Vec<u8>,
    not_present: bool,
    invalid: Option<Invalid>,
}

/// Feed `chunks` in order until the parser settles, then pass the rest through.
fn run(chunks: &[&[u8]]) -> Outcome {
    let mut parser = Parser::new(MAX_PREAMBLE);
    let mut outcome = Outcome::default();
    let mut settled = false;
    for chunk in chunks {
        if settled {
            outcome.application.extend_from_slice(chunk);
            continue;
        }
        match parser.feed(chunk) {
            Status::NeedMore => outcome.consumed += chunk.len(),
            Status::Done { peer, consumed } => {
                assert!(consumed <= chunk.len());
                outcome.consumed += consumed;
                outcome.application.extend_from_slice(&chunk[consumed..]);
                outcome.peer = Some(std::rc::Rc::unwrap_or_clone(peer));
                settled = true;
            }
            Status::NotPresent => {
                // Forward the bytes earlier reads absorbed, then this whole read.
                outcome.consumed -= parser.held_prefix().len();
                outcome.application.extend_from_slice(parser.held_prefix());
                outcome.application.extend_from_slice(chunk);
                outcome.not_present = true;
                settled = true;
            }
            Status::Invalid(invalid) => {
                outcome.invalid = Some(invalid);
                return outcome;
            }
        }
    }
    outcome
}

/// Split `bytes` at the given cut points (taken modulo its length, sorted).
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        chunks.push(&bytes[start..cut]);
        start = cut;
    }
    chunks
}

fn one_byte_at_a_time(bytes: &[u8]) -> Vec<&[u8]> {
    bytes.chunks(1).collect()
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "\\PC{1,24}"]
}

fn node_metadata() -> impl Strategy<Value = NodeMetadata> {
    (vec(text(), 9), btree_map("[a-z0-9./-]{0,20}", "\\PC{0,20}", 0..8)).prop_map(|(texts, labels)| {
        let [id, name, namespace, owner, workload_name, cluster_id, mesh_id, service_account, istio_version] =
            <[String; 9]>::try_from(texts).unwrap();
        NodeMetadata {
            id,
            name,
            namespace,
            owner,
            workload_name,
            cluster_id,
            mesh_id,
            service_account,
            istio_version,
            labels,
            overlong_values: 0,
        }
    })
}

fn ratings() -> NodeMetadata {
    NodeMetadata {
        id: "sidecar~10.1.2.3~ratings-v2-abc.default~default.svc.cluster.local".into(),
        name: "ratings-v2-abc".into(),
        namespace: "default".into(),
        owner: "kubernetes://apis/apps/v1/namespaces/default/deployments/ratings-v2".into(),
        workload_name: "ratings-v2".into(),
        cluster_id: "Kubernetes".into(),
        mesh_id: "cluster.local".into(),
        service_account: "bookinfo-ratings-v2".into(),
        istio_version: "1.24.0".into(),
        overlong_values: 0,
        labels: BTreeMap::from([
            ("app".into(), "ratings".into()),
            ("version".into(), "v2".into()),
            ("service.istio.io/canonical-name".into(), "ratings".into()),
            ("service.istio.io/canonical-revision".into(), "v2".into()),
        ]),
    }
}

fn stream(preamble: &[u8], application: &[u8]) -> Vec<u8> {
    [preamble, application].concat()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_preamble_split_across_any_reads_removes_exactly_8_plus_n_bytes_and_leaves_the_rest(
        node in node_metadata(),
        application in vec(any::<u8>(), 0..64),
        cuts in vec(any::<usize>(), 0..12),
    ) {
        let preamble = encode(&node);
        let bytes = stream(&preamble, &application);
        for chunks in [one_byte_at_a_time(&bytes), split(&bytes, &cuts)] {
            let outcome = run(&chunks);
            prop_assert_eq!(outcome.peer.as_ref(), Some(&node));
            prop_assert_eq!(outcome.consumed, preamble.len());
            prop_assert_eq!(&outcome.application, &application);
        }
    }

    #[test]
    fn an_input_that_does_not_start_with_the_magic_is_passed_through_untouched(
        matched in 0usize..4,
        wrong in any::<u8>(),
        tail in vec(any::<u8>(), 0..32),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        prop_assume!(wrong != MAGIC_BYTES[matched]);
        let bytes = [&MAGIC_BYTES[..matched], &[wrong], &tail[..]].concat();
        for chunks in [one_byte_at_a_time(&bytes), split(&bytes, &cuts)] {
            let outcome = run(&chunks);
            prop_assert!(outcome.not_present);
            prop_assert_eq!(outcome.consumed, 0);
            prop_assert_eq!(&outcome.application, &bytes);
        }
    }

    #[test]
    fn a_truncated_preamble_needs_more(
        node in node_metadata(),
        cut in any::<usize>(),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let preamble = encode(&node);
        let truncated = &preamble[..cut % preamble.len()];
        let mut parser = Parser::new(MAX_PREAMBLE);
        for chunk in split(truncated, &cuts) {
            prop_assert!(matches!(parser.feed(chunk), Status::NeedMore));
        }
        prop_assert_eq!(parser.begun(), !truncated.is_empty());
    }

    #[test]
    fn a_length_above_max_preamble_is_invalid_before_any_payload_arrives(
        max in 0usize..1024,
        excess in 1u32..=u32::MAX - 1024,
    ) {
        let length = max as u32 + excess;
        let header = [MAGIC_BYTES, length.to_be_bytes()].concat();
        let mut parser = Parser::new(max);
        for byte in &header[..HEADER_LEN - 1] {
            prop_assert!(matches!(parser.feed(&[*byte]), Status::NeedMore));
        }
        let status = parser.feed(&header[HEADER_LEN - 1..]);
        prop_assert!(
            matches!(&status, Status::Invalid(Invalid::TooLarge { length: l, max: m }) if *l == length && *m == max),
            "{:?}", status
        );
    }

    #[test]
    fn garbage_after_a_valid_magic_is_invalid_or_needs_more_never_a_panic(
        garbage in vec(any::<u8>(), 0..256),
        small_length in any::<bool>(),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let mut bytes = [&MAGIC_BYTES[..], &garbage].concat();
        if small_length && bytes.len() >= HEADER_LEN {
            // Announce a length that fits, so the garbage reaches the decoder.
            let length = (bytes.len() - HEADER_LEN) as u32;
            bytes[4..HEADER_LEN].copy_from_slice(&length.to_be_bytes());
        }
        let outcome = run(&split(&bytes, &cuts));
        prop_assert!(outcome.peer.is_none() && !outcome.not_present);
        if small_length && bytes.len() >= HEADER_LEN {
            prop_assert!(outcome.invalid.is_some());
        }
    }
}

#[test]
fn every_two_way_split_of_a_preamble_reads_the_same() {
    let node = ratings();
    let preamble = encode(&node);
    let bytes = stream(&preamble, b"GET / HTTP/1.1\r\n");
    for cut in 0..=bytes.len() {
        let outcome = run(&[&bytes[..cut], &bytes[cut..]]);
        assert_eq!(outcome.peer.as_ref(), Some(&node), "split at {cut}");
        assert_eq!(outcome.consumed, preamble.len(), "split at {cut}");
        assert_eq!(outcome.application, b"GET / HTTP/1.1\r\n", "split at {cut}");
    }
}

#[test]
fn a_non_mesh_client_that_sends_a_few_bytes_gets_not_present_as_soon_as_a_byte_differs() {
    let mut parser = Parser::new(MAX_PREAMBLE);
    assert!(!parser.begun());
    assert!(matches!(parser.feed(&MAGIC_BYTES[..2]), Status::NeedMore));
    assert!(parser.begun());
    assert_eq!(parser.held_prefix(), &MAGIC_BYTES[..2]);

    assert!(matches!(parser.feed(b"x"), Status::NotPresent));

    assert_eq!(parser.held_prefix(), &[0x3D, 0x23]);
}

#[test]
fn a_first_byte_that_differs_is_not_present_with_nothing_held() {
    let mut parser = Parser::new(MAX_PREAMBLE);
    assert!(matches!(parser.feed(b"\x16\x03\x01"), Status::NotPresent));
    assert_eq!(parser.held_prefix(), b"");
    assert!(!parser.begun());
}

#[test]
fn an_empty_read_needs_more() {
    let mut parser = Parser::new(MAX_PREAMBLE);
    assert!(matches!(parser.feed(b""), Status::NeedMore));
    assert!(!parser.begun());
}

#[test]
fn a_payload_that_does_not_decode_is_invalid() {
    let mut parser = Parser::new(MAX_PREAMBLE);
    let bytes = [&MAGIC_BYTES[..], &3u32.to_be_bytes(), b"\xff\xff\xff"].concat();
    assert!(matches!(parser.feed(&bytes), Status::Invalid(Invalid::Undecodable)));
}

#[test]
fn feeding_a_finished_parser_is_invalid_never_a_panic() {
    let preamble = encode(&ratings());
    let finished = [&preamble[..], b"\x00abc", b"\x3D\x23\x04\x67\xff\xff\xff\xff"];
    for bytes in finished {
        let mut parser = Parser::new(MAX_PREAMBLE);
        assert!(!matches!(parser.feed(bytes), Status::NeedMore));
        assert!(matches!(parser.feed(b"more"), Status::Invalid(Invalid::Finished)));
    }
}

#[test]
fn a_pooled_buffer_is_reused_and_given_back_empty() {
    let preamble = encode(&ratings());
    let mut parser = Parser::with_buffer(MAX_PREAMBLE, Vec::with_capacity(4096));
    let (head, tail) = preamble.split_at(HEADER_LEN + 10);
    assert!(matches!(parser.feed(head), Status::NeedMore));
    assert!(matches!(parser.feed(tail), Status::Done { .. }));
    let buffer = parser.into_buffer();
    assert!(buffer.is_empty());
    assert_eq!(buffer.capacity(), 4096);
}

/// xorshift64*: a seeded generator so the fuzz run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn twenty_thousand_random_streams_never_panic_and_never_consume_more_than_they_were_fed() {
    let mut rng = Rng(0x5EED_0467_3D23_0001);
    let valid = encode(&ratings());
    for round in 0..20_000 {
        // Mix pure noise, noise behind the magic, noise behind a fitting header, and
        // valid preambles with a few bytes flipped, so every parser state gets hostile input.
        let mut bytes: Vec<u8> = (0..rng.below(600)).map(|_| rng.next() as u8).collect();
        match round % 4 {
            0 => {}
            1 => bytes.splice(0..0, MAGIC_BYTES).for_each(drop),
            2 => {
                let length = (bytes.len() as u32).to_be_bytes();
                bytes.splice(0..0, [MAGIC_BYTES, length].concat()).for_each(drop);
            }
            _ => {
                bytes = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.next() as u8;
                }
            }
        }
        let max_preamble = [0, 16, 512, MAX_PREAMBLE][rng.below(4)];
        let mut parser = Parser::new(max_preamble);
        let mut rest = &bytes[..];
        let finished = loop {
            let (chunk, tail) = rest.split_at(rng.below(rest.len() + 1));
            rest = tail;
            let status = parser.feed(chunk);
            let held = parser.held_prefix();
            assert!(held.len() <= 3 && MAGIC_BYTES.starts_with(held), "{held:?}");
            match status {
                Status::NeedMore if rest.is_empty() => break false,
                Status::NeedMore => {}
                Status::Done { consumed, .. } => {
                    assert!(consumed <= chunk.len());
                    break true;
                }
                Status::NotPresent | Status::Invalid(_) => break true,
            }
        };
        if finished {
            assert!(matches!(parser.feed(rest), Status::Invalid(Invalid::Finished)));
        }
    }
}
