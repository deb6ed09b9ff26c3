// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One region's ordered map and the dm-pcache overlap rules.
//!
//! Entries never overlap and never leave their region. The general insert and lookup are
//! driven by one cursor re-searching the map after each mutation (as dm-pcache re-searches its
//! RB-tree), so no operation allocates beyond the map's own chunks and the caller's output
//! vector. What random 4 KiB I/O does nearly always (an insert into a gap, an insert replacing
//! one entry of the same range, a lookup inside one entry) is settled after one search and
//! falls back to the general rules, untouched, whenever it is anything else.

use std::sync::atomic::{AtomicU64, Ordering};

use super::chunk_map::{ChunkMap, MAX_AUX, MAX_KEY};
use super::{push_piece, trim, CrcSpan, FillTicket, IndexKey, KeyKind, Piece};
use crate::cache::{CachePos, REGION_SIZE, SEGMENT_SIZE};

/// A key without its offset (the map key). 28 bytes with 4-byte alignment, so a map slot
/// (entry plus `u32` offset) is 32 bytes: the CRC span's segment is the key's own and its
/// offset and length are counted in sectors (a span lies inside one 16 MiB segment, so both
/// fit 16 bits), the kind lives in the top bits of the length (an entry never exceeds its
/// 4 MiB region), and the generation is stored as two halves. For a
/// placeholder, `gen` holds the id of its fill ticket, as placeholders have no segment; for a
/// zeroes key, the key's stamp (see `Index::remove_zeroes`).
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    len_kind: u32,
    pos: CachePos,
    gen: [u32; 2],
    /// The CRC span, whose segment is always `pos.seg` (a key is cut from one extent).
    crc_off_sectors: u16,
    crc_len_sectors: u16,
    crc: u32,
}

const SECTOR_SHIFT: u32 = 9;
const _: () = assert!(
    SEGMENT_SIZE >> SECTOR_SHIFT <= u16::MAX as u64,
    "a CRC span's offset and length in sectors must fit 16 bits"
);
const _: () = assert!(std::mem::size_of::<Entry>() == 28);

/// `bytes` (a sector multiple inside one segment) in sectors; spans come from keys that
/// replay validated or from the data head's sector-aligned allocations.
fn to_sectors(bytes: u32) -> u16 {
    debug_assert!(
        bytes % (1 << SECTOR_SHIFT) == 0 && u64::from(bytes) <= SEGMENT_SIZE,
        "a CRC span of {bytes} bytes is not sectors inside a segment"
    );
    (bytes >> SECTOR_SHIFT) as u16
}

const _: () = assert!(
    REGION_SIZE >> SECTOR_SHIFT <= MAX_KEY as u64 + 1,
    "sectors inside a region must fit the chunk map's keys"
);
const _: () = assert!(
    REGION_SIZE >> SECTOR_SHIFT <= MAX_AUX as u64 + 1,
    "an entry's sectors less one must fit beside its key"
);

/// What the map keeps beside an entry's offset: its length, so that a search sees where an
/// entry ends without reading the entry (entries are sectors, never empty).
fn aux_of_len(len: u32) -> u16 {
    ((len >> SECTOR_SHIFT) - 1) as u16
}

fn len_of_aux(aux: u16) -> u32 {
    (u32::from(aux) + 1) << SECTOR_SHIFT
}

/// The backing offset of map key `rel` in the region starting at `base`.
fn abs(base: u64, rel: u32) -> u64 {
    base + (u64::from(rel) << SECTOR_SHIFT)
}

const KIND_SHIFT: u32 = 30;
const LEN_MASK: u32 = (1 << KIND_SHIFT) - 1;
const _: () = assert!(
    REGION_SIZE <= LEN_MASK as u64,
    "entry lengths must fit below the kind"
);

impl Entry {
    fn new(len: u32, kind: KeyKind, pos: CachePos, gen: u64, crc: CrcSpan) -> Entry {
        let kind_bits = match kind {
            KeyKind::Dirty => 0,
            KeyKind::Clean => 1,
            KeyKind::Zeroes => 2,
            KeyKind::Empty => 3,
        };
        // An empty span (no data CRC, or none yet) names no segment.
        debug_assert!(
            crc.len == 0 || crc.pos.seg == pos.seg,
            "a CRC span in another segment than its key"
        );
        Entry {
            len_kind: (len & LEN_MASK) | kind_bits << KIND_SHIFT,
            pos,
            gen: [gen as u32, (gen >> 32) as u32],
            crc_off_sectors: to_sectors(crc.pos.off),
            crc_len_sectors: to_sectors(crc.len),
            crc: crc.crc,
        }
    }

    fn of(key: &IndexKey) -> Entry {
        Entry::new(key.len, key.kind, key.pos, key.gen, key.crc)
    }

    fn placeholder(len: u32, ticket_id: u64) -> Entry {
        let (pos, crc) = (CachePos::default(), CrcSpan::default());
        Entry::new(len, KeyKind::Empty, pos, ticket_id, crc)
    }

    fn len(&self) -> u32 {
        self.len_kind & LEN_MASK
    }

    fn set_len(&mut self, len: u32) {
        self.len_kind = (self.len_kind & !LEN_MASK) | (len & LEN_MASK);
    }

    fn kind(&self) -> KeyKind {
        match self.len_kind >> KIND_SHIFT {
            0 => KeyKind::Dirty,
            1 => KeyKind::Clean,
            2 => KeyKind::Zeroes,
            _ => KeyKind::Empty,
        }
    }

    fn gen(&self) -> u64 {
        u64::from(self.gen[0]) | u64::from(self.gen[1]) << 32
    }

    fn key_at(&self, off: u64) -> IndexKey {
        IndexKey {
            off,
            len: self.len(),
            kind: self.kind(),
            pos: self.pos,
            gen: self.gen(),
            crc: self.crc_span(),
        }
    }

    fn crc_span(&self) -> CrcSpan {
        CrcSpan {
            pos: CachePos {
                seg: self.pos.seg,
                off: u32::from(self.crc_off_sectors) << SECTOR_SHIFT,
            },
            len: u32::from(self.crc_len_sectors) << SECTOR_SHIFT,
            crc: self.crc,
        }
    }

    fn end(&self, off: u64) -> u64 {
        off + u64::from(self.len())
    }

    /// The entry starting at `off` with its first `by` bytes cut away.
    fn cut_front(&self, off: u64, by: u32) -> Entry {
        Entry::of(&trim(
            &self.key_at(off),
            off + u64::from(by),
            self.len() - by,
        ))
    }

    /// What a lookup reads of `[at, at + len)`, inside this entry starting at `off`.
    fn piece(&self, off: u64, at: u64, len: u32) -> Piece {
        match self.kind() {
            KeyKind::Dirty | KeyKind::Clean => Piece::Hit {
                off: at,
                len,
                key: trim(&self.key_at(off), at, len),
            },
            KeyKind::Zeroes => Piece::Zeroes { off: at, len },
            // Someone else's fill is pending: read the backing, do not fill.
            KeyKind::Empty => Piece::Miss {
                off: at,
                len,
                ticket: None,
            },
        }
    }

    fn is_placeholder_of(&self, ticket: &FillTicket) -> bool {
        self.kind() == KeyKind::Empty && self.gen() == ticket.id
    }

    /// A data key whose segment was reused since the key was made. Placeholders and zeroes keys
    /// point at no segment and never go stale.
    fn is_stale(&self, gen_of: &dyn Fn(u32) -> u64) -> bool {
        matches!(self.kind(), KeyKind::Dirty | KeyKind::Clean) && self.gen() < gen_of(self.pos.seg)
    }
}

/// The keys of one region, by offset inside the region. Methods take and return absolute
/// backing offsets, which must lie inside the region.
pub(super) struct Subtree {
    base: u64,
    map: ChunkMap<Entry>,
    /// Entries that are not placeholders, for tests that check it against the entries (no
    /// request needs it).
    #[cfg(any(test, feature = "test-util"))]
    extents: usize,
}

impl Subtree {
    pub(super) fn new(base: u64) -> Subtree {
        Subtree {
            base,
            map: ChunkMap::new(),
            #[cfg(any(test, feature = "test-util"))]
            extents: 0,
        }
    }

    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn extents(&self) -> usize {
        self.extents
    }

    /// Keep the test-only count of extents: `added` went in, `removed` went.
    fn count_extents(&mut self, added: usize, removed: usize) {
        #[cfg(any(test, feature = "test-util"))]
        {
            self.extents = self.extents + added - removed;
        }
        #[cfg(not(any(test, feature = "test-util")))]
        let _ = (added, removed);
    }

    /// The map key of backing offset `off` (a sector multiple): sectors into the region.
    fn rel(&self, off: u64) -> u32 {
        debug_assert!(
            off % (1 << SECTOR_SHIFT) == 0,
            "offset {off} is not a sector's"
        );
        ((off - self.base) >> SECTOR_SHIFT) as u32
    }

    fn abs(&self, rel: u32) -> u64 {
        abs(self.base, rel)
    }

    /// Offset of the first entry starting in `[from, to)` that satisfies `pred`.
    fn find(&self, from: u64, to: u64, pred: impl Fn(&Entry) -> bool) -> Option<u64> {
        let found = self.map.find(self.rel(from), self.rel(to), pred);
        found.map(|rel| self.abs(rel))
    }

    fn get(&self, off: u64) -> Entry {
        *self.map.get(self.rel(off)).expect("an entry starts there")
    }

    fn put(&mut self, off: u64, entry: Entry) {
        if entry.kind() != KeyKind::Empty {
            self.count_extents(1, 0);
        }
        let replaced = self
            .map
            .insert(self.rel(off), aux_of_len(entry.len()), entry);
        debug_assert!(replaced.is_none(), "index entries overlap at {off}");
    }

    fn take(&mut self, off: u64) -> Option<Entry> {
        let entry = self.map.remove(self.rel(off))?;
        if entry.kind() != KeyKind::Empty {
            self.count_extents(0, 1);
        }
        Some(entry)
    }

    /// The entry starting before `off` and reaching past it, if any.
    fn reaching_into(&self, off: u64) -> Option<u64> {
        let (rel, aux, _) = self.map.last_before(self.rel(off))?;
        let start = self.abs(rel);
        (start + u64::from(len_of_aux(aux)) > off).then_some(start)
    }

    /// Insert `key` (inside this region), cutting everything it overlaps.
    pub(super) fn insert(&mut self, key: &IndexKey) {
        if !self.insert_without_overlap(key) {
            self.insert_cutting(key);
        }
    }

    /// The two inserts a random-write workload makes nearly all of, each after one search: into
    /// a gap that overlaps no entry, and over exactly one entry of the same range (which is
    /// then replaced in place, so the map neither shrinks nor grows a node). False, having
    /// changed nothing, when the key overlaps entries any other way.
    fn insert_without_overlap(&mut self, key: &IndexKey) -> bool {
        let (start, end) = (key.off, key.end());
        let base = self.base;
        // The last entry starting before the key's end: any entry the key overlaps is it or
        // lies before it, and those before it end where it starts.
        // Its length is beside its key: a gap is found without reading the entry.
        let last_before_end = self.map.last_before_mut(self.rel(end));
        match last_before_end {
            Some((rel, aux, entry)) if abs(base, rel) + u64::from(len_of_aux(aux)) > start => {
                if abs(base, rel) != start || len_of_aux(aux) != key.len {
                    return false;
                }
                let was_extent = entry.kind() != KeyKind::Empty;
                *entry = Entry::of(key);
                let is_extent = key.kind != KeyKind::Empty;
                self.count_extents(usize::from(is_extent), usize::from(was_extent));
            }
            _ => self.put(start, Entry::of(key)),
        }
        true
    }

    /// Insert `key` by the four dm-pcache fix-up cases, whatever it overlaps.
    fn insert_cutting(&mut self, key: &IndexKey) {
        let (start, end) = (key.off, key.end());
        // At most one entry starts before the key and reaches into it.
        if let Some(off) = self.reaching_into(start) {
            let whole = self.get(off);
            let rel = self.rel(off);
            // overlap_head: keep the front. Also the front half of overlap_contained.
            let front = (start - off) as u32;
            if let Some(entry) = self.map.get_mut_setting_aux(rel, aux_of_len(front)) {
                entry.set_len(front);
            }
            // overlap_contained: the back half survives as a new entry, except that a
            // placeholder is only truncated (its fill covers one contiguous prefix).
            if whole.end(off) > end && whole.kind() != KeyKind::Empty {
                self.put(end, whole.cut_front(off, (end - off) as u32));
            }
        }
        while let Some(off) = self.find(start, end, |_| true) {
            let Some(entry) = self.take(off) else { break };
            // overlap_tail keeps the back; overlap_contain deletes. A placeholder whose front
            // is overwritten is deleted whole, so what remains of it is always a prefix.
            if entry.end(off) > end && entry.kind() != KeyKind::Empty {
                self.put(end, entry.cut_front(off, (end - off) as u32));
            }
        }
        self.put(start, Entry::of(key));
    }

    /// Append the pieces of `[start, end)` (inside this region) to `out`. With `tickets`, each
    /// gap gets a placeholder whose ticket id is drawn from it.
    pub(super) fn lookup(
        &mut self,
        start: u64,
        end: u64,
        tickets: Option<&AtomicU64>,
        gen_of: &dyn Fn(u32) -> u64,
        out: &mut Vec<Piece>,
    ) {
        if self.lookup_inside_one_entry(start, end, gen_of, out) {
            return;
        }
        let mut at = start;
        let mut reaching_in = self.reaching_into(start);
        while at < end {
            let next = reaching_in.take().or_else(|| self.find(at, end, |_| true));
            let Some(off) = next else {
                self.gap(at, end, tickets, out);
                return;
            };
            let entry = self.get(off);
            if entry.is_stale(gen_of) {
                self.take(off);
                continue;
            }
            if off > at {
                self.gap(at, off, tickets, out);
                at = off;
            }
            let piece_end = entry.end(off).min(end);
            push_piece(out, entry.piece(off, at, (piece_end - at) as u32));
            at = piece_end;
        }
    }

    /// A read hit (or a read of zeroes or of a pending fill) inside one live entry, after one
    /// search: push its one piece. False, having pushed and changed nothing, otherwise.
    fn lookup_inside_one_entry(
        &self,
        start: u64,
        end: u64,
        gen_of: &dyn Fn(u32) -> u64,
        out: &mut Vec<Piece>,
    ) -> bool {
        let Some((rel, aux, entry)) = self.map.last_before(self.rel(start) + 1) else {
            return false;
        };
        let off = self.abs(rel);
        // The length beside the key settles a miss without reading the entry.
        if off + u64::from(len_of_aux(aux)) < end || entry.is_stale(gen_of) {
            return false;
        }
        let len = (end - start) as u32;
        push_piece(out, entry.piece(off, start, len));
        true
    }

    fn gap(&mut self, off: u64, end: u64, tickets: Option<&AtomicU64>, out: &mut Vec<Piece>) {
        let len = (end - off) as u32;
        let ticket = tickets.map(|next| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            self.put(off, Entry::placeholder(len, id));
            FillTicket { id, off, len }
        });
        push_piece(out, Piece::Miss { off, len, ticket });
    }

    /// Turn the remaining fragments of `ticket`'s placeholder into clean keys.
    pub(super) fn complete_fill(
        &mut self,
        ticket: &FillTicket,
        pos: CachePos,
        gen: u64,
        crc: CrcSpan,
        on_insert: &mut dyn FnMut(&IndexKey),
    ) -> u64 {
        let (mut kept, mut filled) = (0, 0);
        let (from, to) = (
            self.rel(ticket.off),
            self.rel(ticket.off + u64::from(ticket.len)),
        );
        let base = self.base;
        self.map.for_each_in_mut(from, to, |rel, entry| {
            if entry.is_placeholder_of(ticket) {
                let fragment_pos = CachePos {
                    seg: pos.seg,
                    off: pos.off.wrapping_add((rel - from) << SECTOR_SHIFT),
                };
                *entry = Entry::new(entry.len(), KeyKind::Clean, fragment_pos, gen, crc);
                kept += u64::from(entry.len());
                filled += 1;
                on_insert(&entry.key_at(abs(base, rel)));
            }
        });
        self.count_extents(filled, 0);
        kept
    }

    /// Remove the remaining fragments of `ticket`'s placeholder.
    pub(super) fn abort_fill(&mut self, ticket: &FillTicket) {
        let (mut at, end) = (ticket.off, ticket.off + u64::from(ticket.len));
        while let Some(off) = self.find(at, end, |e| e.is_placeholder_of(ticket)) {
            self.take(off);
            at = off;
        }
    }

    /// Remove up to `max` stale keys starting in `[from, to)` (clamped to the region).
    /// Returns how many were removed and where a later scan should resume.
    pub(super) fn remove_stale(
        &mut self,
        from: u64,
        to: u64,
        gen_of: &dyn Fn(u32) -> u64,
        max: usize,
    ) -> (usize, u64) {
        let to = to.min(self.base + REGION_SIZE);
        let (mut at, mut removed) = (from.max(self.base), 0);
        while removed < max && at < to {
            let Some(off) = self.find(at, to, |e| e.is_stale(gen_of)) else {
                return (removed, to);
            };
            self.take(off);
            removed += 1;
            at = off;
        }
        (removed, at)
    }

    /// Remove the zeroes entries starting in `[from, to)` whose generation field holds
    /// `stamp` (the fragments of one key all lie inside its range). Returns how many went.
    pub(super) fn remove_zeroes(&mut self, from: u64, to: u64, stamp: u64) -> usize {
        let is_it = |e: &Entry| e.kind() == KeyKind::Zeroes && e.gen() == stamp;
        let mut removed = 0;
        let mut at = from;
        while let Some(off) = self.find(at, to, is_it) {
            self.take(off);
            removed += 1;
            at = off;
        }
        removed
    }

    pub(super) fn for_each(&self, f: &mut dyn FnMut(&IndexKey)) {
        for (rel, _, entry) in self.map.iter() {
            if entry.kind() != KeyKind::Empty {
                f(&entry.key_at(self.abs(rel)));
            }
        }
    }

    /// Every entry, placeholders included, for tests that check the map's shape.
    #[cfg(test)]
    pub(super) fn all_keys(&self) -> impl Iterator<Item = IndexKey> + '_ {
        self.map.iter().map(|(rel, aux, entry)| {
            assert_eq!(
                len_of_aux(aux),
                entry.len(),
                "the length beside a key is not its entry's"
            );
            entry.key_at(self.abs(rel))
        })
    }
}
