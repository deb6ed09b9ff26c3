// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One region's ordered map from offset to entry, laid out for few cache misses per search.
//!
//! A region holds at most a few thousand entries, so two levels always suffice: a sorted
//! array of each chunk's first key (with a parallel array of the chunks) and fixed-size chunks
//! of up to [`CAP`] entries. A chunk's first cache line holds one word per entry, sorted: the
//! key, a small number the caller keeps beside it (the index keeps the entry's length there)
//! and the slot of the entry's value among the lines that follow. A search reads the
//! first-key array (a few adjacent lines), one chunk pointer and one line of words; it reads
//! a value only when the caller wants that value, where a `BTreeMap` of the same size walks
//! three levels of nodes, two lines each, every one depending on the one before.
//!
//! Costs stay bounded: an insert shifts at most one chunk's words (one line) and writes its
//! value into a free slot, values never moving once placed; a full chunk splits in two (the
//! arrays, one element per chunk of about 10 entries, shift by one element), and a removal
//! that leaves a chunk and a neighbour fitting one chunk merges them, so chunks stay about
//! half full or better even after many removals.

/// Entries per chunk: each value in a 32-byte slot of its own, so that no value straddles two
/// cache lines, and the whole chunk is 512 bytes.
pub(super) const CAP: usize = 14;
/// Words per chunk: with the count and the slot bitmap they fill one 64-byte line; the last
/// is always [`UNUSED`].
const WORDS: usize = 15;

/// Low bits of a word: the slot of its value.
const SLOT_BITS: u32 = 4;
/// The bits above the slot: the caller's number beside the key (its "aux").
const AUX_BITS: u32 = 13;
/// The key is the rest of the word, so words sort by key.
const KEY_SHIFT: u32 = SLOT_BITS + AUX_BITS;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
const _: () = assert!(CAP <= 1 << SLOT_BITS, "a slot must fit its bits");

/// The greatest key a map can hold.
pub(super) const MAX_KEY: u32 = u32::MAX >> KEY_SHIFT;
/// The greatest number kept beside a key.
pub(super) const MAX_AUX: u16 = (1 << AUX_BITS) - 1;

/// A word past the live ones, above every live word: its slot, [`CAP`], is never used.
const UNUSED: u32 = u32::MAX;
const _: () = assert!(UNUSED & SLOT_MASK >= CAP as u32);

/// Up to [`CAP`] entries: `words[..len]` hold `key << KEY_SHIFT | aux << SLOT_BITS | slot`,
/// sorted by key, and `vals[slot]` is that key's value. Values stay in their slot while words
/// shift around them, so an insert writes one value instead of moving every later one (up to
/// seven lines that random inserts rarely find cached); `used` marks the live slots. The words
/// past `len` are [`UNUSED`], so a search runs over the whole line in fixed steps.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Chunk<V> {
    len: u16,
    used: u16,
    words: [u32; WORDS],
    vals: [Slot<V>; CAP],
}

/// A value, alone in an aligned 32-byte slot (the index's 28-byte entries) or more.
#[repr(align(32))]
#[derive(Clone, Copy, Default)]
struct Slot<V>(V);

/// The least word of `key`, or [`UNUSED`] (above every word) when `key` is beyond the keys.
fn lowest_word(key: u32) -> u32 {
    if key > MAX_KEY {
        UNUSED
    } else {
        key << KEY_SHIFT
    }
}

fn word(key: u32, aux: u16, slot: u32) -> u32 {
    key << KEY_SHIFT | u32::from(aux) << SLOT_BITS | slot
}

fn key_of(word: u32) -> u32 {
    word >> KEY_SHIFT
}

fn aux_of(word: u32) -> u16 {
    (word >> SLOT_BITS) as u16 & MAX_AUX
}

fn slot_of(word: u32) -> usize {
    (word & SLOT_MASK) as usize
}

impl<V: Copy + Default> Chunk<V> {
    fn empty() -> Box<Chunk<V>> {
        Box::new(Chunk {
            len: 0,
            used: 0,
            words: [UNUSED; WORDS],
            vals: [Slot::default(); CAP],
        })
    }

    fn live(&self) -> &[u32] {
        &self.words[..usize::from(self.len)]
    }

    fn key(&self, i: usize) -> u32 {
        key_of(self.words[i])
    }

    fn aux(&self, i: usize) -> u16 {
        aux_of(self.words[i])
    }

    fn val(&self, i: usize) -> &V {
        &self.vals[slot_of(self.words[i])].0
    }

    fn val_mut(&mut self, i: usize) -> &mut V {
        &mut self.vals[slot_of(self.words[i])].0
    }

    fn set_aux(&mut self, i: usize, aux: u16) {
        let w = self.words[i];
        self.words[i] = word(key_of(w), aux, w & SLOT_MASK);
    }

    /// Position of `key`, or where it would go.
    fn search(&self, key: u32) -> Result<usize, usize> {
        let i = self.below(key);
        match self.words.get(i) {
            Some(&w) if i < usize::from(self.len) && key_of(w) == key => Ok(i),
            _ => Err(i),
        }
    }

    /// How many keys lie below `key`.
    fn below(&self, key: u32) -> usize {
        // A binary search of fixed steps over the 15 words (and an imaginary 16th above
        // them): no branch depends on the keys or on the count.
        const _: () = assert!(WORDS == 15 && CAP < WORDS);
        let (bound, w) = (lowest_word(key), &self.words);
        let mut n = 0;
        for step in [8, 4, 2, 1] {
            if w[n + step - 1] < bound {
                n += step;
            }
        }
        n
    }

    /// Put `key` at position `i` (the chunk is not full), its value in a free slot.
    fn insert_at(&mut self, i: usize, key: u32, aux: u16, val: V) {
        let len = usize::from(self.len);
        let slot = (!self.used).trailing_zeros();
        self.words.copy_within(i..len, i + 1);
        self.words[i] = word(key, aux, slot);
        self.vals[slot as usize] = Slot(val);
        self.used |= 1 << slot;
        self.len += 1;
    }

    /// Append `key` (above every key here; the chunk is not full).
    fn push(&mut self, key: u32, aux: u16, val: V) {
        self.insert_at(usize::from(self.len), key, aux, val);
    }

    /// Take out the entry at position `i` and return its value.
    fn remove_at(&mut self, i: usize) -> V {
        let len = usize::from(self.len);
        let slot = slot_of(self.words[i]);
        self.words.copy_within(i + 1..len, i);
        self.words[len - 1] = UNUSED;
        self.used &= !(1 << slot);
        self.len -= 1;
        self.vals[slot].0
    }
}

/// An ordered map from `u32` keys up to [`MAX_KEY`] to `Copy` values, each key with a number
/// up to [`MAX_AUX`] beside it that a search reads without reading the value (see the
/// module's doc).
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
        let i = self.chunk(h).search(key).ok()?;
        Some((h, i))
    }

    pub(super) fn get(&self, key: u32) -> Option<&V> {
        let (h, i) = self.position(key)?;
        Some(self.chunk(h).val(i))
    }

    /// `key`'s value, to change, after setting the number beside it to `aux`.
    pub(super) fn get_mut_setting_aux(&mut self, key: u32, aux: u16) -> Option<&mut V> {
        assert!(aux <= MAX_AUX, "aux {aux} beyond the chunk map's");
        let (h, i) = self.position(key)?;
        let c = self.chunk_mut(h);
        c.set_aux(i, aux);
        Some(c.val_mut(i))
    }

    /// (chunk, position) of the greatest key below `key`.
    fn position_before(&self, key: u32) -> Option<(usize, usize)> {
        let h = self.firsts.partition_point(|&f| f < key).checked_sub(1)?;
        // The chunk's first key is below `key`, so at least one key is.
        let i = self.chunk(h).below(key);
        Some((h, i - 1))
    }

    /// The entry with the greatest key below `key`: its key, the number beside it and its
    /// value (which is only read if the caller reads it).
    pub(super) fn last_before(&self, key: u32) -> Option<(u32, u16, &V)> {
        let (h, i) = self.position_before(key)?;
        let c = self.chunk(h);
        Some((c.key(i), c.aux(i), c.val(i)))
    }

    /// As [`ChunkMap::last_before`], to change the value.
    pub(super) fn last_before_mut(&mut self, key: u32) -> Option<(u32, u16, &mut V)> {
        let (h, i) = self.position_before(key)?;
        let c = self.chunk_mut(h);
        Some((c.key(i), c.aux(i), c.val_mut(i)))
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
            let start = if h == first { c.below(from) } else { 0 };
            for i in start..usize::from(c.len) {
                let k = c.key(i);
                if k >= to || !f(k, c.val(i)) {
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
            for i in c.below(from)..usize::from(c.len) {
                let k = c.key(i);
                if k >= to {
                    return;
                }
                f(k, c.val_mut(i));
            }
        }
    }

    /// Every entry in key order: key, the number beside it, value.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, u16, &V)> + '_ {
        self.chunks.iter().flat_map(|c| {
            c.live()
                .iter()
                .map(|&w| (key_of(w), aux_of(w), &c.vals[slot_of(w)].0))
        })
    }

    /// Insert or replace `key`'s value and the number beside it; returns the value replaced.
    pub(super) fn insert(&mut self, key: u32, aux: u16, val: V) -> Option<V> {
        assert!(key <= MAX_KEY, "key {key} beyond the chunk map's keys");
        assert!(aux <= MAX_AUX, "aux {aux} beyond the chunk map's");
        let Some(h) = self.chunk_for(key) else {
            self.add_chunk(0, key, aux, val);
            return None;
        };
        let c = self.chunk_mut(h);
        let i = match c.search(key) {
            Ok(i) => {
                c.set_aux(i, aux);
                return Some(std::mem::replace(c.val_mut(i), val));
            }
            Err(i) => i,
        };
        if usize::from(c.len) < CAP {
            c.insert_at(i, key, aux, val);
            if i == 0 {
                self.firsts[h] = key;
            }
            return None;
        }
        if i == CAP {
            // Past the full chunk's last key: start the next chunk and leave this one full,
            // so ascending inserts fill chunks completely.
            self.add_chunk(h + 1, key, aux, val);
            return None;
        }
        // Split in halves; the key then goes into one of them.
        let keep = CAP.div_ceil(2);
        let mut upper = Chunk::empty();
        for i in keep..CAP {
            let w = c.words[i];
            upper.push(key_of(w), aux_of(w), c.vals[slot_of(w)].0);
            c.used &= !(1 << slot_of(w));
            c.words[i] = UNUSED;
        }
        c.len = keep as u16;
        self.firsts.insert(h + 1, upper.key(0));
        self.chunks.insert(h + 1, upper);
        self.insert(key, aux, val)
    }

    /// A new chunk at position `h` holding only `key`.
    fn add_chunk(&mut self, h: usize, key: u32, aux: u16, val: V) {
        let mut c = Chunk::empty();
        c.push(key, aux, val);
        self.firsts.insert(h, key);
        self.chunks.insert(h, c);
    }

    /// Remove `key`'s entry and return its value.
    pub(super) fn remove(&mut self, key: u32) -> Option<V> {
        let (h, i) = self.position(key)?;
        let c = self.chunk_mut(h);
        let val = c.remove_at(i);
        let left = usize::from(c.len);
        if left == 0 {
            self.firsts.remove(h);
            self.chunks.remove(h);
            return Some(val);
        }
        self.firsts[h] = c.key(0);
        // Merge with a neighbour when both fit one chunk, into the earlier of the two.
        if h + 1 < self.chunks.len() && left + usize::from(self.chunk(h + 1).len) <= CAP {
            self.merge_next_into(h);
        } else if h > 0 && left + usize::from(self.chunk(h - 1).len) <= CAP {
            self.merge_next_into(h - 1);
        }
        Some(val)
    }

    /// Move chunk `h + 1`'s entries to the end of chunk `h` (they fit) and drop it.
    fn merge_next_into(&mut self, h: usize) {
        self.firsts.remove(h + 1);
        let next = self.chunks.remove(h + 1);
        let c = self.chunk_mut(h);
        for i in 0..usize::from(next.len) {
            c.push(next.key(i), next.aux(i), *next.val(i));
        }
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
            let live = c.live();
            assert!(!live.is_empty(), "chunk {n} is empty");
            assert_eq!(key_of(live[0]), first, "chunk {n} has another first key");
            let mut slots = 0u16;
            for &w in live {
                let k = key_of(w);
                assert!(prev.is_none_or(|p| p < k), "key {k} out of order");
                prev = Some(k);
                assert!(
                    slot_of(w) < CAP,
                    "chunk {n}: key {k} in slot {}",
                    slot_of(w)
                );
                assert_eq!(
                    slots & 1 << slot_of(w),
                    0,
                    "chunk {n}: two keys share a slot"
                );
                slots |= 1 << slot_of(w);
            }
            assert_eq!(
                slots, c.used,
                "chunk {n}: the slots in use are not the keys' slots"
            );
            let rest = &c.words[live.len()..];
            assert!(
                rest.iter().all(|&w| w == UNUSED),
                "chunk {n}: a word past the keys"
            );
        }
    }
}
