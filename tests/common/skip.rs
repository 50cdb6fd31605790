//! The one way a test says it did not run, and the one way it reaches `../shared`.
//!
//! A skipped test returns like a passed one as far as cargo can tell, so [`skip`] writes a
//! `SKIP` line to stderr and to `target/test-skips.txt`; tests/run.sh prints that list at the
//! end and, under CI (`CI=true`), fails when it is not empty: CI runs as root, with every tool
//! installed and `../shared` beside the checkout, so there every test must really run.
//!
//! Conformance tests replay files from public repositories (Istio's goldens, Bookinfo YAML,
//! bootstraps, xDS dumps). Those files are never committed here: they live in `../shared`
//! beside the checkout, and [`shared`] is how a test finds one of its folders, or skips.
//! Included by `common/mod.rs`, or alone with `#[path = "common/skip.rs"] mod skip;`.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Where skips are listed for tests/run.sh (next to the build, whatever CARGO_TARGET_DIR says).
const SKIPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-skips.txt");

/// Report `test` as skipped for `why`: a `SKIP` line on stderr, also appended to
/// `target/test-skips.txt`, which tests/run.sh prints, so a skip is never mistaken for a pass.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIP {test}: {why}");
    eprintln!("{line}");
    let path = std::path::Path::new(SKIPS);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // One write per line: tests of one binary run on parallel threads, and several test
    // binaries may append at once.
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// The checkout's `../shared/<folder>` (e.g. `istio-golden`, `istio/bookinfo`), or, when it is
/// not there, `None` after one SKIP line naming the missing folder.
pub fn shared(folder: &str, test: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")).join(folder);
    if dir.is_dir() {
        return Some(dir);
    }
    let why = format!(
        "../shared/{folder} is missing (files from public repositories live only beside the \
         checkout, never in it; CI has them)"
    );
    skip(test, &why);
    None
}
