//! Fuzz the preamble parser (SPEC §2: a peer's bytes never crash a worker): the first byte picks
//! the read size and max preamble, the rest is the stream, fed read by read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringside::exchange::{MAGIC, Parser, Status};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(knobs & 0x1F) + 1;
    let max_preamble = [0, 64, 4096, 64 * 1024][usize::from(knobs >> 6)];
    let mut parser = Parser::new(max_preamble);
    for chunk in stream.chunks(read_size) {
        let status = parser.feed(chunk);
        let held = parser.held_prefix();
        assert!(held.len() <= 3 && MAGIC.to_be_bytes().starts_with(held));
        match status {
            Status::NeedMore => {}
            Status::Done { consumed, .. } => {
                assert!(consumed <= chunk.len());
                return;
            }
            Status::NotPresent | Status::Invalid(_) => return,
        }
    }
});
