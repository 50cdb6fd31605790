//! The cache of verified peer chains: a full handshake whose peer presents a chain this
//! config has already verified against its roots skips the path building and signature
//! checks of that chain (one ECDSA or RSA verification per certificate). What stays on every
//! handshake: the peer's proof that it holds the key (CertificateVerify), its identity check
//! (SPIFFE SANs), the validity period. No I/O.
//!
//! A cache belongs to one built config, so to one set of roots: a rotated root (or
//! certificate, or key) builds a new config with an empty cache, and a chain verified under
//! the old root is verified again under the new one.

use std::collections::HashMap;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, UnixTime};

/// Chains kept per config. A sidecar talks to a bounded set of peers, each with one
/// certificate at a time (Istio rotates them every 12 h by default); when the cache is full
/// it starts over rather than tracking use (a miss costs one verification, as without it).
pub const CAPACITY: usize = 512;

/// Chains that verified against this config's roots, each with the span over which every
/// certificate in it is valid. Read once per full handshake without a lock (an `ArcSwap`
/// load); written once per new chain, by copying (chains are few and change rarely).
#[derive(Debug, Default)]
pub struct Chains {
    verified: ArcSwap<HashMap<Box<[u8]>, Validity>>,
}

/// When a verified chain stops being valid: the latest `notBefore` and earliest `notAfter`
/// of its certificates, in seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Validity {
    not_before: u64,
    not_after: u64,
}

/// The cache key: the chain's certificates exactly as presented, each after its length, so
/// that a hit means the same bytes (no hash that another chain could collide with).
fn key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Box<[u8]> {
    let mut k =
        Vec::with_capacity(end_entity.len() + intermediates.iter().map(|c| c.len() + 8).sum::<usize>() + 8);
    for c in std::iter::once(end_entity).chain(intermediates) {
        k.extend_from_slice(&(c.len() as u64).to_le_bytes());
        k.extend_from_slice(c);
    }
    k.into_boxed_slice()
}

/// The validity span shared by every certificate of a chain; `None` if one does not parse
/// (the chain is then simply not cached).
fn validity(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Option<Validity> {
    let mut v = Validity { not_before: 0, not_after: u64::MAX };
    for c in std::iter::once(end_entity).chain(intermediates) {
        let (_, parsed) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
        let span = parsed.validity();
        v.not_before = v.not_before.max(u64::try_from(span.not_before.timestamp()).unwrap_or(0));
        v.not_after = v.not_after.min(u64::try_from(span.not_after.timestamp()).ok()?);
    }
    Some(v)
}

impl Chains {
    /// Whether this exact chain verified before and every certificate in it is valid `now`.
    pub fn holds(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        let verified = self.verified.load();
        if verified.is_empty() {
            return false;
        }
        let now = now.as_secs();
        verified
            .get(&key(end_entity, intermediates))
            .is_some_and(|v| v.not_before <= now && now < v.not_after)
    }

    /// Remember a chain that has just verified against this config's roots.
    pub fn insert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) {
        let Some(v) = validity(end_entity, intermediates) else { return };
        let k = key(end_entity, intermediates);
        self.verified.rcu(|old| {
            let mut next = match old.len() >= CAPACITY {
                true => HashMap::new(),
                false => HashMap::clone(old),
            };
            next.insert(k.clone(), v);
            next
        });
    }

    /// How many chains are held (tests and benches).
    pub fn len(&self) -> usize {
        self.verified.load().len()
    }

    /// True when no chain is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Off when `RINGSIDE_TLS_CHAIN_CACHE=0`, a benchmarking switch like `RINGSIDE_SPLICE=0`:
/// read once, and a warning logged once when used.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        let on = std::env::var_os("RINGSIDE_TLS_CHAIN_CACHE").is_none_or(|v| v != "0");
        if !on {
            log::warn!(
                "RINGSIDE_TLS_CHAIN_CACHE=0 (benchmarking): peer chains verified on every full handshake"
            );
        }
        on
    })
}
