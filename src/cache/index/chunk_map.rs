// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One region's ordered map from offset to entry, laid out for few cache misses per search.
//!
//! A region holds at most a few thousand entries, so two levels always suffice: a sorted
//! array of each chunk's first key (with a parallel array of the chunks) and fixed-size chunks
//! of up to [`CAP`] sorted entries, the keys of a chunk in one cache line apart from its
//! values. A search reads the first-key array (a few adjacent lines), one chunk pointer, one
//! line of keys and the value it wants, where a `BTreeMap` of the same size walks three levels
//! of nodes, two lines each, every one depending on the one before.
//!
//! Costs stay bounded: an insert shifts at most one chunk's entries, a full chunk splits in
//! two (the arrays, one element per chunk of about 10 entries, shift by one element), and a
//! removal that leaves a chunk and a neighbour fitting one chunk merges them, so chunks stay
//! about half full or better even after many removals.

/// Entries per chunk: with the count, the keys fill one 64-byte line.
pub(super) const CAP: usize = 15;

/// Up to [`CAP`] entries sorted by key; `keys[..len]` and `vals[..len]` are live, never none.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Chunk<V> {
    len: u32,
    keys: [u32; CAP],
    vals: [V; CAP],
}

/// An ordered map from `u32` keys to `Copy` values (see the module's doc).
pub(super) struct ChunkMap<V> {
    /// The first key of each chunk, ascending.
    firsts: Vec<u32>,
    chunks: Vec<Box<Chunk<V>>>,
}

impl<V: Copy + Default> ChunkMap<V> {
    pub(super) fn new() -> ChunkMap<V> {
        ChunkMap {
            firsts: Vec::new(),
            chunks: Vec::new(),
        }
    }

    fn chunk(&self, h: usize) -> &Chunk<V> {
        &self.chunks[h]
    }

    fn chunk_mut(&mut self, h: usize) -> &mut Chunk<V> {
        &mut self.chunks[h]
    }

    /// The chunk whose range holds `key`: the last one starting at or before it (the first
    /// when `key` lies before every chunk). `None` when the map is empty.
    fn chunk_for(&self, key: u32) -> Option<usize> {
        if self.firsts.is_empty() {
            return None;
        }
        Some(self.firsts.partition_point(|&f| f <= key).saturating_sub(1))
    }

    /// (chunk, position) of `key`, if present.
    fn position(&self, key: u32) -> Option<(usize, usize)> {
        let h = self.chunk_for(key)?;
        let c = self.chunk(h);
        let i = c.keys[..c.len as usize].binary_search(&key).ok()?;
        Some((h, i))
    }

    pub(super) fn get(&self, key: u32) -> Option<&V> {
        let (h, i) = self.position(key)?;
        Some(&self.chunk(h).vals[i])
    }

    pub(super) fn get_mut(&mut self, key: u32) -> Option<&mut V> {
        let (h, i) = self.position(key)?;
        Some(&mut self.chunk_mut(h).vals[i])
    }

    /// (chunk, position) of the greatest key below `key`.
    fn position_before(&self, key: u32) -> Option<(usize, usize)> {
        let h = self.firsts.partition_point(|&f| f < key).checked_sub(1)?;
        let c = self.chunk(h);
        // The chunk's first key is below `key`, so at least one key is.
        let i = c.keys[..c.len as usize].partition_point(|&k| k < key);
        Some((h, i - 1))
    }

    /// The entry with the greatest key below `key`.
    pub(super) fn last_before(&self, key: u32) -> Option<(u32, &V)> {
        let (h, i) = self.position_before(key)?;
        let c = self.chunk(h);
        Some((c.keys[i], &c.vals[i]))
    }

    /// The entry with the greatest key below `key`, to change its value.
    pub(super) fn last_before_mut(&mut self, key: u32) -> Option<(u32, &mut V)> {
        let (h, i) = self.position_before(key)?;
        let c = self.chunk_mut(h);
        Some((c.keys[i], &mut c.vals[i]))
    }

    /// The first key in `[from, to)` whose value satisfies `pred`.
    pub(super) fn find(&self, from: u32, to: u32, pred: impl Fn(&V) -> bool) -> Option<u32> {
        let mut found = None;
        self.scan(from, to, |k, v| {
            if pred(v) {
                found = Some(k);
                false
            } else {
                true
            }
        });
        found
    }

    /// Visit the entries with keys in `[from, to)` in order while `f` returns true.
    fn scan(&self, from: u32, to: u32, mut f: impl FnMut(u32, &V) -> bool) {
        let Some(first) = self.chunk_for(from) else {
            return;
        };
        for h in first..self.chunks.len() {
            let c = self.chunk(h);
            let live = &c.keys[..c.len as usize];
            let start = if h == first {
                live.partition_point(|&k| k < from)
            } else {
                0
            };
            for (&k, v) in live[start..].iter().zip(&c.vals[start..]) {
                if k >= to || !f(k, v) {
                    return;
                }
            }
        }
    }

    /// Visit the entries with keys in `[from, to)` in order, each able to change its value.
    pub(super) fn for_each_in_mut(&mut self, from: u32, to: u32, mut f: impl FnMut(u32, &mut V)) {
        let Some(first) = self.chunk_for(from) else {
            return;
        };
        for h in first..self.chunks.len() {
            let c = self.chunk_mut(h);
            let len = c.len as usize;
            let start = c.keys[..len].partition_point(|&k| k < from);
            for i in start..len {
                if c.keys[i] >= to {
                    return;
                }
                f(c.keys[i], &mut c.vals[i]);
            }
        }
    }

    /// Every entry in key order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &V)> + '_ {
        self.chunks.iter().flat_map(|c| {
            let n = c.len as usize;
            c.keys[..n].iter().copied().zip(&c.vals[..n])
        })
    }

    /// Insert or replace; returns the value replaced.
    pub(super) fn insert(&mut self, key: u32, val: V) -> Option<V> {
        let Some(h) = self.chunk_for(key) else {
            self.add_chunk(0, key, val);
            return None;
        };
        let c = self.chunk_mut(h);
        let len = c.len as usize;
        let i = match c.keys[..len].binary_search(&key) {
            Ok(i) => return Some(std::mem::replace(&mut c.vals[i], val)),
            Err(i) => i,
        };
        if len < CAP {
            c.keys.copy_within(i..len, i + 1);
            c.vals.copy_within(i..len, i + 1);
            (c.keys[i], c.vals[i], c.len) = (key, val, c.len + 1);
            if i == 0 {
                self.firsts[h] = key;
            }
            return None;
        }
        if i == CAP {
            // Past the full chunk's last key: start the next chunk and leave this one full,
            // so ascending inserts fill chunks completely.
            self.add_chunk(h + 1, key, val);
            return None;
        }
        // Split in halves; the key then goes into one of them.
        let keep = CAP.div_ceil(2);
        let mut upper = Box::new(Chunk {
            len: (CAP - keep) as u32,
            keys: [0; CAP],
            vals: [V::default(); CAP],
        });
        upper.keys[..CAP - keep].copy_from_slice(&c.keys[keep..]);
        upper.vals[..CAP - keep].copy_from_slice(&c.vals[keep..]);
        c.len = keep as u32;
        self.firsts.insert(h + 1, upper.keys[0]);
        self.chunks.insert(h + 1, upper);
        self.insert(key, val)
    }

    /// A new chunk at position `h` holding only `key`.
    fn add_chunk(&mut self, h: usize, key: u32, val: V) {
        let mut c = Box::new(Chunk {
            len: 1,
            keys: [0; CAP],
            vals: [V::default(); CAP],
        });
        (c.keys[0], c.vals[0]) = (key, val);
        self.firsts.insert(h, key);
        self.chunks.insert(h, c);
    }

    /// Remove `key`'s entry and return its value.
    pub(super) fn remove(&mut self, key: u32) -> Option<V> {
        let (h, i) = self.position(key)?;
        let c = self.chunk_mut(h);
        let len = c.len as usize;
        let val = c.vals[i];
        c.keys.copy_within(i + 1..len, i);
        c.vals.copy_within(i + 1..len, i);
        c.len -= 1;
        let (left, first) = (c.len as usize, c.keys[0]);
        if left == 0 {
            self.firsts.remove(h);
            self.chunks.remove(h);
            return Some(val);
        }
        self.firsts[h] = first;
        // Merge with a neighbour when both fit one chunk, into the earlier of the two.
        if h + 1 < self.chunks.len() && left + self.chunk(h + 1).len as usize <= CAP {
            self.merge_next_into(h);
        } else if h > 0 && left + self.chunk(h - 1).len as usize <= CAP {
            self.merge_next_into(h - 1);
        }
        Some(val)
    }

    /// Move chunk `h + 1`'s entries to the end of chunk `h` (they fit) and drop it.
    fn merge_next_into(&mut self, h: usize) {
        self.firsts.remove(h + 1);
        let next = self.chunks.remove(h + 1);
        let n = next.len as usize;
        let c = self.chunk_mut(h);
        let len = c.len as usize;
        c.keys[len..len + n].copy_from_slice(&next.keys[..n]);
        c.vals[len..len + n].copy_from_slice(&next.vals[..n]);
        c.len += n as u32;
    }

    /// Chunks in use (tests only).
    #[cfg(test)]
    pub(super) fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Check the layout's invariants (tests only).
    #[cfg(test)]
    pub(super) fn check(&self) {
        let mut prev: Option<u32> = None;
        assert_eq!(self.firsts.len(), self.chunks.len());
        for (n, (c, &first)) in self.chunks.iter().zip(&self.firsts).enumerate() {
            let live = &c.keys[..c.len as usize];
            assert!(!live.is_empty(), "chunk {n} is empty");
            assert_eq!(live[0], first, "chunk {n} has another first key");
            for &k in live {
                assert!(prev.is_none_or(|p| p < k), "key {k} out of order");
                prev = Some(k);
            }
        }
    }
}
