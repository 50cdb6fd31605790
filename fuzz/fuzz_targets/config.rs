//! Fuzz the config loader (SPEC §4, §6: a bad file is a one-line error, never a panic): the
//! first byte splits the rest into a native YAML config and an Istio (`--istio`) document set;
//! the config is parsed and validated, then the Istio documents are applied to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringside::config::Config;
use ringside::routing::istio::{self, Source};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (usize::from(split) * rest.len() / 255).min(rest.len());
    let (native, documents) = rest.split_at(at);
    let (Ok(native), Ok(documents)) = (std::str::from_utf8(native), std::str::from_utf8(documents)) else {
        return;
    };
    let Ok(mut cfg) = Config::parse(native, "fuzz.yaml") else {
        return;
    };
    if cfg.validate("fuzz.yaml", native).is_err() {
        return;
    }
    let _ = istio::apply(&mut cfg, &[Source { file: "istio.yaml", text: documents }]);
});
