//! Session tickets sealed with AES-256-GCM under a random key per ticketer (rotated by rustls'
//! `TicketRotator` every 6 h, the previous key kept to open older tickets).
//!
//! rustls' aws-lc-rs ticketer follows RFC 5077's recommended construction: AES-256-CBC and
//! an HMAC-SHA256 over the whole sealed session (a client's certificate chain, ≈ 700 bytes:
//! a dozen SHA-256 blocks to seal and as many to open), with three `Vec`s per ticket. The
//! ticket is opaque to the client, so its format is ours: one AEAD pass in place instead,
//! with a hardware GCM, and 37-52 bytes shorter (no key name, no CBC padding, a 16-byte
//! tag; perf/RESULTS.md). Which key sealed a ticket is found by trying the current key and
//! then the previous one (the rotator's way), the tag telling them apart.

use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::server::ProducesTickets;
use rustls::ticketer::TicketRotator;

/// How long a ticket key seals new tickets: rustls' own ticketer's period.
const ROTATE_AFTER_SECONDS: u32 = 6 * 60 * 60;

const TAG_LEN: usize = 16;

/// A ticketer for a server config: AES-256-GCM keys, rotated.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    let rotator = TicketRotator::new(ROTATE_AFTER_SECONDS, || {
        Sealer::new().map(|s| Box::new(s) as Box<dyn ProducesTickets>).ok_or(rustls::crypto::GetRandomFailed)
    })?;
    Ok(Arc::new(rotator))
}

/// One key: tickets are nonce ‖ sealed session ‖ tag.
struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    fn new() -> Option<Sealer> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).ok()?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).ok();
        zeroize::Zeroize::zeroize(&mut bytes);
        Some(Sealer { key: LessSafeKey::new(key?) })
    }
}

impl ProducesTickets for Sealer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        ROTATE_AFTER_SECONDS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        // Random nonces: a key seals at most one rotation period's tickets, far fewer than
        // the 2^32 that random 96-bit nonces allow under one key.
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut ticket[NONCE_LEN..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, sealed) = ticket.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut plain = sealed.to_vec();
        let len = self.key.open_in_place(nonce, Aad::empty(), &mut plain).ok()?.len();
        plain.truncate(len);
        Some(plain)
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(AES-256-GCM)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_under_its_key_only_and_not_once_altered() {
        let (a, b) = (Sealer::new().unwrap(), Sealer::new().unwrap());
        let session = b"a session, with the client's certificate chain".repeat(20);
        let ticket = a.encrypt(&session).unwrap();
        assert_eq!(ticket.len(), NONCE_LEN + session.len() + TAG_LEN);
        assert_eq!(a.decrypt(&ticket).as_deref(), Some(&session[..]));
        assert_ne!(a.encrypt(&session), Some(ticket.clone()), "a fresh nonce each time");
        assert_eq!(b.decrypt(&ticket), None, "another key");
        for at in [0, NONCE_LEN, ticket.len() - 1] {
            let mut altered = ticket.clone();
            altered[at] ^= 1;
            assert_eq!(a.decrypt(&altered), None, "byte {at} altered");
        }
        for len in [0, NONCE_LEN, NONCE_LEN + TAG_LEN - 1] {
            assert_eq!(a.decrypt(&ticket[..len]), None, "{len} bytes");
        }
    }

    #[test]
    fn the_rotating_ticketer_seals_and_opens() {
        let t = ticketer().unwrap();
        assert!(t.enabled());
        let ticket = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(t.decrypt(b"not a ticket at all, too short?"), None);
    }
}
