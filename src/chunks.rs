//! A vector that consecutive configuration generations share in chunks (SPEC §11): a clone
//! is one reference count, a change to one element copies its chunk of [`CHUNK`] and the list
//! of chunk pointers (not the other elements, whose reference counts are not touched), and
//! two versions are compared chunk by chunk by pointer, so an endpoint change in a mesh of
//! 10,000 clusters costs ~160 pointer copies and compares, not 10,000. Dropping a version
//! frees only the chunks no other version holds. Pure: no I/O.

use std::ops::{Index, IndexMut, Range};
use std::sync::Arc;

/// Elements per chunk: a change copies this many pointers, a version holds `len / CHUNK`.
pub const CHUNK: usize = 64;

/// A persistent vector of `T` in shared chunks of [`CHUNK`] (every chunk full but the last).
pub struct Chunks<T> {
    chunks: Arc<Vec<Arc<Vec<T>>>>,
    len: usize,
}

impl<T> Clone for Chunks<T> {
    fn clone(&self) -> Self {
        Chunks { chunks: Arc::clone(&self.chunks), len: self.len }
    }
}

impl<T> Default for Chunks<T> {
    fn default() -> Self {
        Chunks { chunks: Arc::default(), len: 0 }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Chunks<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T> Chunks<T> {
    /// How many elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// The elements in order.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter { of: self, front: 0, back: self.len }
    }

    /// The index ranges where `self` may differ from `other`: those of each chunk that is
    /// not the very chunk `other` holds at its place (pointer compares, one per chunk).
    /// `None` when the lengths differ (then the places do not correspond).
    pub fn differing(&self, other: &Chunks<T>) -> Option<Vec<Range<usize>>> {
        if self.len != other.len {
            return None;
        }
        if Arc::ptr_eq(&self.chunks, &other.chunks) {
            return Some(Vec::new());
        }
        let ranges = self.chunks.iter().zip(other.chunks.iter()).enumerate();
        Some(
            ranges
                .filter(|(_, (a, b))| !Arc::ptr_eq(a, b))
                .map(|(k, (a, _))| k * CHUNK..k * CHUNK + a.len())
                .collect(),
        )
    }

    /// How many chunks `self` holds that `other` holds too, at the same place (for tests and
    /// benches: what a new version shares with the previous one).
    pub fn shared_chunks(&self, other: &Chunks<T>) -> usize {
        self.chunks.iter().zip(other.chunks.iter()).filter(|(a, b)| Arc::ptr_eq(a, b)).count()
    }

    /// How many chunks it holds.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

impl<T: Clone> Chunks<T> {
    /// Add `x` at the end (copies the last chunk only if another version shares it).
    pub fn push(&mut self, x: T) {
        let chunks = Arc::make_mut(&mut self.chunks);
        match chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(x),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(x);
                chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Element `i` to change: its chunk (and the chunk list) copied first if another
    /// version shares them.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        let chunk = Arc::make_mut(&mut self.chunks).get_mut(i / CHUNK)?;
        Arc::make_mut(chunk).get_mut(i % CHUNK)
    }
}

impl<T> Index<usize> for Chunks<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        // As a slice's: indexing out of bounds is a bug of the caller.
        match self.get(i) {
            Some(x) => x,
            None => panic!("index {i} out of bounds of {} elements", self.len),
        }
    }
}

impl<T: Clone> IndexMut<usize> for Chunks<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        let len = self.len;
        match self.get_mut(i) {
            Some(x) => x,
            None => panic!("index {i} out of bounds of {len} elements"),
        }
    }
}

impl<T> FromIterator<T> for Chunks<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let (mut chunks, mut len) = (Vec::new(), 0);
        let mut chunk = Vec::with_capacity(CHUNK);
        for x in items {
            chunk.push(x);
            len += 1;
            if chunk.len() == CHUNK {
                chunks.push(Arc::new(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK))));
            }
        }
        if !chunk.is_empty() {
            chunks.push(Arc::new(chunk));
        }
        Chunks { chunks: Arc::new(chunks), len }
    }
}

impl<T> From<Vec<T>> for Chunks<T> {
    fn from(v: Vec<T>) -> Self {
        v.into_iter().collect()
    }
}

impl<T: Clone> Extend<T> for Chunks<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for x in items {
            self.push(x);
        }
    }
}

impl<'a, T> IntoIterator for &'a Chunks<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T: PartialEq> PartialEq for Chunks<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<T: serde::Serialize> serde::Serialize for Chunks<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Chunks<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(Chunks::from)
    }
}

/// The elements of a [`Chunks`] in order, from either end.
#[derive(Clone)]
pub struct Iter<'a, T> {
    of: &'a Chunks<T>,
    front: usize,
    back: usize,
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        if self.front >= self.back {
            return None;
        }
        self.front += 1;
        self.of.get(self.front - 1)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.back.saturating_sub(self.front);
        (n, Some(n))
    }
}

impl<T> DoubleEndedIterator for Iter<'_, T> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.back -= 1;
        self.of.get(self.back)
    }
}

impl<T> ExactSizeIterator for Iter<'_, T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_element_copies_its_chunk_only_and_the_rest_is_shared() {
        let first: Chunks<Arc<usize>> = (0..1000).map(Arc::new).collect();
        assert_eq!(first.len(), 1000);
        assert_eq!(first.chunk_count(), 1000usize.div_ceil(CHUNK));
        let mut second = first.clone();
        second[130] = Arc::new(7);
        assert_eq!(*second[130], 7);
        assert_eq!(*first[130], 130, "the previous version is unchanged");
        assert_eq!(second.shared_chunks(&first), first.chunk_count() - 1);
        let changed = second.differing(&first).unwrap();
        assert_eq!((changed.len(), changed[0].clone()), (1, 128..192));
        // The elements of shared chunks are not even cloned: their counts stay at one.
        assert_eq!(Arc::strong_count(&first[0]), 1);
        // The changed chunk's others are: held by both versions.
        assert_eq!(Arc::strong_count(&first[129]), 2);
        assert_eq!(first.differing(&first.clone()), Some(vec![]));
    }

    #[test]
    fn pushes_iteration_from_both_ends_and_lengths_agree_with_a_vec() {
        let mut c = Chunks::default();
        let v: Vec<usize> = (0..200).collect();
        c.extend(v.iter().copied());
        assert_eq!(c.iter().copied().collect::<Vec<_>>(), v);
        assert_eq!(c.iter().rev().copied().collect::<Vec<_>>(), v.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(c.iter().enumerate().next_back(), Some((199, &199)));
        assert_eq!(c.get(200), None);
        let shorter: Chunks<usize> = (0..199).collect();
        assert_eq!(c.differing(&shorter), None);
        assert_eq!(c, Chunks::from(v));
    }
}
