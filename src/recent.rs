//! A per-worker memo of the last few values derived from peer bytes, keyed by the bytes
//! themselves: a sidecar's connections come from a few peers that send the same preamble and
//! present the same certificate every time, so most connections find what they need here
//! instead of decoding it again (each decode is tens of allocations, as many frees later).
//! No I/O; bounded: at most `KEPT` keys of at most `MAX_KEY` bytes, replaced in turn (a peer
//! whose bytes change, a rotated certificate, is simply a new entry).

use std::cell::{Cell, RefCell};

/// The last `KEPT` values made from keys of at most `MAX_KEY` bytes.
#[derive(Debug)]
pub struct Recent<V, const KEPT: usize, const MAX_KEY: usize> {
    entries: RefCell<Vec<(Box<[u8]>, V)>>,
    next: Cell<usize>,
}

impl<V, const KEPT: usize, const MAX_KEY: usize> Default for Recent<V, KEPT, MAX_KEY> {
    fn default() -> Self {
        Self { entries: RefCell::new(Vec::new()), next: Cell::new(0) }
    }
}

impl<V: Clone, const KEPT: usize, const MAX_KEY: usize> Recent<V, KEPT, MAX_KEY> {
    /// The value kept for exactly these `key` bytes, else `make`'s (kept when it succeeds and
    /// the key is not over `MAX_KEY`). Compares whole keys: no hash another key could share.
    pub fn get_or_make<E>(&self, key: &[u8], make: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        if let Some((_, value)) = self.entries.borrow().iter().find(|(k, _)| **k == *key) {
            return Ok(value.clone());
        }
        let value = make()?;
        if key.len() <= MAX_KEY && KEPT > 0 {
            let entry = (Box::from(key), value.clone());
            let mut entries = self.entries.borrow_mut();
            match entries.get_mut(self.next.get()) {
                Some(slot) => *slot = entry,
                None => entries.push(entry),
            }
            self.next.set((self.next.get() + 1) % KEPT);
        }
        Ok(value)
    }

    /// How many keys are kept.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Nothing kept yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::Recent;
    use std::rc::Rc;

    #[test]
    fn the_same_bytes_make_once_other_bytes_make_their_own_and_the_oldest_goes_first() {
        let recent: Recent<Rc<String>, 2, 4> = Recent::default();
        let made = std::cell::Cell::new(0);
        let make = |s: &str| {
            made.set(made.get() + 1);
            Ok::<_, ()>(Rc::new(s.to_owned()))
        };
        let a = recent.get_or_make(b"a", || make("a")).unwrap();
        assert!(Rc::ptr_eq(&a, &recent.get_or_make(b"a", || make("again")).unwrap()));
        assert_eq!(made.get(), 1);
        recent.get_or_make(b"b", || make("b")).unwrap();
        recent.get_or_make(b"c", || make("c")).unwrap(); // replaces "a"
        assert_eq!((recent.len(), made.get()), (2, 3));
        assert_eq!(*recent.get_or_make(b"a", || make("a2")).unwrap(), "a2");
        assert_eq!(*recent.get_or_make(b"c", || make("c2")).unwrap(), "c");
    }

    #[test]
    fn a_failure_or_a_key_over_the_bound_is_not_kept() {
        let recent: Recent<u32, 4, 4> = Recent::default();
        assert_eq!(recent.get_or_make(b"bad", || Err::<u32, _>("no")), Err("no"));
        assert_eq!(recent.get_or_make(b"toolong", || Ok::<_, ()>(1)), Ok(1));
        assert!(recent.is_empty());
        assert_eq!(recent.get_or_make(b"toolong", || Ok::<_, ()>(2)), Ok(2));
    }
}
