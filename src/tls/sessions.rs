//! A client config's resumption state, kept per server name: rustls' `ClientSessionStore`.
//! Pure: no I/O.
//!
//! Why not rustls' `ClientSessionMemoryCache`: it keeps 8 TLS 1.3 tickets per name, too few
//! for connections that start together (at 16 and 64 in flight through the mTLS pair, 36 %
//! and 69 % of the handshakes found none and were full ones), and it hashes the name with
//! std's SipHash, which `ServerName`'s case-insensitive `Hash` feeds one character at a time,
//! on every call (three to five per handshake). Here a name keeps `TICKETS_PER_NAME`
//! tickets, and the map hashes with FNV-1a: the names come from configuration, never from a
//! peer, so a keyed hash buys nothing.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

/// Server names a store keeps; past it the name stored first is forgotten.
pub const NAMES: usize = 32;

/// TLS 1.3 tickets a name keeps, newest used first; past it the oldest is dropped. A
/// resumption uses one up and ringside's server sends one back, so a client's
/// tickets number as many handshakes as it once had in flight; with 64, no handshake of the
/// pair at 64 in flight was a full one after the first (with 32, 11 % were).
pub const TICKETS_PER_NAME: usize = 64;

/// What a store keeps for one server name.
#[derive(Debug, Default)]
struct Sessions {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    /// Oldest first.
    tls13: VecDeque<Tls13ClientSessionValue>,
}

#[derive(Debug, Default)]
struct Names {
    by_name: HashMap<ServerName<'static>, Sessions, BuildHasherDefault<Fnv1a>>,
    /// Insertion order, for forgetting the oldest name.
    order: VecDeque<ServerName<'static>>,
}

impl Names {
    fn get_or_insert(&mut self, name: ServerName<'static>) -> &mut Sessions {
        if !self.by_name.contains_key(&name) {
            if self.order.len() == NAMES
                && let Some(oldest) = self.order.pop_front()
            {
                self.by_name.remove(&oldest);
            }
            self.order.push_back(name.clone());
        }
        self.by_name.entry(name).or_default()
    }
}

/// A client config's sessions: one uncontended lock per call, three to five per handshake.
/// Nothing is allocated before the first session comes (a mesh's 10,000 clusters each have
/// a config, most never dialled; SPEC §11).
#[derive(Debug, Default)]
pub struct SessionStore(Mutex<Names>);

impl SessionStore {
    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        // A panic under the lock would abort the process (panic = "abort"): never poisoned.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientSessionStore for SessionStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.names().get_or_insert(server_name).kx_hint = Some(group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.names().by_name.get(server_name)?.kx_hint
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.names().get_or_insert(server_name).tls12 = Some(value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.names().by_name.get(server_name)?.tls12.clone()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        if let Some(s) = self.names().by_name.get_mut(server_name) {
            s.tls12 = None;
        }
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut names = self.names();
        let tickets = &mut names.get_or_insert(server_name).tls13;
        if tickets.len() == TICKETS_PER_NAME {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.names().by_name.get_mut(server_name)?.tls13.pop_back()
    }
}

/// FNV-1a (64 bits); `ServerName` hashes each lowercased character as a `u32`, so that is
/// the step.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.step(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.step(u64::from(n));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Fnv1a {
    fn step(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x0000_0100_0000_01b3);
    }
}
