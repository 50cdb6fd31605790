//! Secrets held in memory (SDS, SPEC §10), read where PEM files are read: a TLS context's
//! secret `NAME` received over SDS is the three "files" `sds:NAME#cert_chain`,
//! `sds:NAME#private_key` and `sds:NAME#root_cert`. Certificates and keys are never written
//! to disk (Envoy keeps them in memory too), and everything built on files — slots shared
//! per file set, a rebuild when a fingerprint changes, the previous config kept when a
//! load fails — serves SDS secrets unchanged.
//!
//! One store per process, as there is one SDS client: written by the xDS thread, read by
//! the control and reload threads, never by a worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use arc_swap::{ArcSwap, ArcSwapOption};

/// What a path of a secret in memory starts with. No PEM file is called that: Istio's are
/// absolute, or relative under `etc/` and `var/`.
const PREFIX: &str = "sds:";

/// One part of a secret: its PEM bytes and the store's version when it was put.
#[derive(Debug)]
pub struct Part {
    /// PEM text.
    pub pem: Vec<u8>,
    /// Changes whenever the part is replaced: the reload thread's fingerprint.
    pub version: u64,
}

static STORE: LazyLock<ArcSwap<HashMap<PathBuf, Arc<Part>>>> = LazyLock::new(ArcSwap::default);
static VERSION: AtomicU64 = AtomicU64::new(1);
/// The reload thread, woken when a secret changes so that a rotation is used at once.
static WATCHER: ArcSwapOption<std::thread::Thread> = ArcSwapOption::const_empty();

/// The certificate chain of secret `name`.
pub fn cert_chain(name: &str) -> PathBuf {
    PathBuf::from(format!("{PREFIX}{name}#cert_chain"))
}

/// The private key of secret `name`.
pub fn private_key(name: &str) -> PathBuf {
    PathBuf::from(format!("{PREFIX}{name}#private_key"))
}

/// The trusted CA of secret `name` (a validation context).
pub fn root_cert(name: &str) -> PathBuf {
    PathBuf::from(format!("{PREFIX}{name}#root_cert"))
}

/// Whether `path` names a secret in memory rather than a file.
pub fn is_secret(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with(PREFIX))
}

/// The part at `path`, if it has arrived.
pub fn get(path: &Path) -> Option<Arc<Part>> {
    STORE.load().get(path).cloned()
}

/// Put parts (path, PEM) at once, replacing what they replace, and wake the reload thread.
/// Called by one thread (the xDS thread), so a load-then-store loses no update.
pub fn put(parts: Vec<(PathBuf, Vec<u8>)>) {
    let mut next = HashMap::clone(&STORE.load());
    for (path, pem) in parts {
        let version = VERSION.fetch_add(1, Ordering::Relaxed);
        next.insert(path, Arc::new(Part { pem, version }));
    }
    STORE.store(Arc::new(next));
    if let Some(t) = WATCHER.load().as_ref() {
        t.unpark();
    }
}

/// Register the calling thread as the one to wake when a secret changes.
pub fn watch_from_here() {
    WATCHER.store(Some(Arc::new(std::thread::current())));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_part_has_a_new_version_and_other_parts_stay() {
        put(vec![(cert_chain("t-a"), b"one".to_vec()), (root_cert("t-b"), b"root".to_vec())]);
        let (a, b) = (get(&cert_chain("t-a")).unwrap(), get(&root_cert("t-b")).unwrap());
        put(vec![(cert_chain("t-a"), b"two".to_vec())]);
        let a2 = get(&cert_chain("t-a")).unwrap();
        assert_eq!((a2.pem.as_slice(), a2.version > a.version), (&b"two"[..], true));
        assert!(Arc::ptr_eq(&b, &get(&root_cert("t-b")).unwrap()));
        assert!(get(&private_key("t-a")).is_none());
        assert!(is_secret(&cert_chain("kubernetes://x")) && !is_secret(Path::new("/etc/certs/a.pem")));
    }
}
