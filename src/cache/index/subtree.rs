//! One region's ordered map and the dm-pcache overlap rules.
//!
//! Entries never overlap and never leave their region. Every change is driven by one cursor
//! re-searching the map after each mutation (as dm-pcache re-searches its RB-tree), so no
//! operation allocates beyond the map's own nodes and the caller's output vector.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{push_piece, trim, CrcSpan, FillTicket, IndexKey, KeyKind, Piece};
use crate::cache::CachePos;

/// A key without its offset (the map key). 40 bytes: for a placeholder, `gen` holds the id of
/// its fill ticket instead, as placeholders have no segment and so no generation.
#[derive(Clone, Copy, Debug)]
struct Entry {
    len: u32,
    kind: KeyKind,
    pos: CachePos,
    gen: u64,
    crc: CrcSpan,
}

impl Entry {
    fn of(key: &IndexKey) -> Entry {
        Entry {
            len: key.len,
            kind: key.kind,
            pos: key.pos,
            gen: key.gen,
            crc: key.crc,
        }
    }

    fn placeholder(len: u32, ticket_id: u64) -> Entry {
        Entry {
            len,
            kind: KeyKind::Empty,
            pos: CachePos::default(),
            gen: ticket_id,
            crc: CrcSpan::default(),
        }
    }

    fn key_at(&self, off: u64) -> IndexKey {
        IndexKey {
            off,
            len: self.len,
            kind: self.kind,
            pos: self.pos,
            gen: self.gen,
            crc: self.crc,
        }
    }

    /// The entry starting at `off` with its first `by` bytes cut away.
    fn cut_front(&self, off: u64, by: u32) -> Entry {
        Entry::of(&trim(&self.key_at(off), off + u64::from(by), self.len - by))
    }

    fn is_placeholder_of(&self, ticket: &FillTicket) -> bool {
        self.kind == KeyKind::Empty && self.gen == ticket.id
    }

    /// A data key whose segment was reused since the key was made. Placeholders and zeroes keys
    /// point at no segment and never go stale.
    fn is_stale(&self, gen_of: &dyn Fn(u32) -> u64) -> bool {
        matches!(self.kind, KeyKind::Dirty | KeyKind::Clean) && self.gen < gen_of(self.pos.seg)
    }
}

/// The keys of one region, by backing offset.
#[derive(Default)]
pub(super) struct Subtree {
    map: BTreeMap<u64, Entry>,
    /// Entries that are not placeholders.
    extents: usize,
}

impl Subtree {
    pub(super) fn extents(&self) -> usize {
        self.extents
    }

    fn put(&mut self, off: u64, entry: Entry) {
        if entry.kind != KeyKind::Empty {
            self.extents += 1;
        }
        let replaced = self.map.insert(off, entry);
        debug_assert!(replaced.is_none(), "index entries overlap at {off}");
    }

    fn take(&mut self, off: u64) -> Option<Entry> {
        let entry = self.map.remove(&off)?;
        if entry.kind != KeyKind::Empty {
            self.extents -= 1;
        }
        Some(entry)
    }

    /// Insert `key` (inside this region), cutting everything it overlaps.
    pub(super) fn insert(&mut self, key: &IndexKey) {
        let (start, end) = (key.off, key.end());
        // At most one entry starts before the key and reaches into it.
        if let Some((&off, entry)) = self.map.range_mut(..start).next_back() {
            let entry_end = off + u64::from(entry.len);
            if entry_end > start {
                let whole = *entry;
                // overlap_head: keep the front. Also the front half of overlap_contained.
                entry.len = (start - off) as u32;
                // overlap_contained: the back half survives as a new entry, except that a
                // placeholder is only truncated (its fill covers one contiguous prefix).
                if entry_end > end && whole.kind != KeyKind::Empty {
                    self.put(end, whole.cut_front(off, (end - off) as u32));
                }
            }
        }
        while let Some((&off, _)) = self.map.range(start..end).next() {
            let Some(entry) = self.take(off) else { break };
            // overlap_tail keeps the back; overlap_contain deletes. A placeholder whose front
            // is overwritten is deleted whole, so what remains of it is always a prefix.
            if off + u64::from(entry.len) > end && entry.kind != KeyKind::Empty {
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
        let mut at = start;
        let mut reaching_in = self
            .map
            .range(..start)
            .next_back()
            .filter(|(&off, entry)| off + u64::from(entry.len) > start)
            .map(|(&off, _)| off);
        while at < end {
            let next = reaching_in
                .take()
                .or_else(|| self.map.range(at..end).next().map(|(&off, _)| off));
            let Some(off) = next else {
                self.gap(at, end, tickets, out);
                return;
            };
            let entry = self.map[&off];
            if entry.is_stale(gen_of) {
                self.take(off);
                continue;
            }
            if off > at {
                self.gap(at, off, tickets, out);
                at = off;
            }
            let piece_end = (off + u64::from(entry.len)).min(end);
            let len = (piece_end - at) as u32;
            let piece = match entry.kind {
                KeyKind::Dirty | KeyKind::Clean => Piece::Hit {
                    off: at,
                    len,
                    key: trim(&entry.key_at(off), at, len),
                },
                KeyKind::Zeroes => Piece::Zeroes { off: at, len },
                KeyKind::Empty => Piece::Miss {
                    off: at,
                    len,
                    ticket: None,
                },
            };
            push_piece(out, piece);
            at = piece_end;
        }
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
        let range = ticket.off..ticket.off + u64::from(ticket.len);
        for (&off, entry) in self.map.range_mut(range) {
            if entry.is_placeholder_of(ticket) {
                entry.kind = KeyKind::Clean;
                entry.pos = CachePos {
                    seg: pos.seg,
                    off: pos.off.wrapping_add((off - ticket.off) as u32),
                };
                entry.gen = gen;
                entry.crc = crc;
                kept += u64::from(entry.len);
                filled += 1;
                on_insert(&entry.key_at(off));
            }
        }
        self.extents += filled;
        kept
    }

    /// Remove the remaining fragments of `ticket`'s placeholder.
    pub(super) fn abort_fill(&mut self, ticket: &FillTicket) {
        let (mut at, end) = (ticket.off, ticket.off + u64::from(ticket.len));
        while let Some(off) = self
            .map
            .range(at..end)
            .find(|(_, entry)| entry.is_placeholder_of(ticket))
            .map(|(&off, _)| off)
        {
            self.take(off);
            at = off;
        }
    }

    /// Remove up to `max` stale keys starting in `[from, to)`. Returns how many were removed
    /// and where a later scan should resume.
    pub(super) fn remove_stale(
        &mut self,
        from: u64,
        to: u64,
        gen_of: &dyn Fn(u32) -> u64,
        max: usize,
    ) -> (usize, u64) {
        let (mut at, mut removed) = (from, 0);
        while removed < max && at < to {
            let Some(off) = self
                .map
                .range(at..to)
                .find(|(_, entry)| entry.is_stale(gen_of))
                .map(|(&off, _)| off)
            else {
                return (removed, to);
            };
            self.take(off);
            removed += 1;
            at = off;
        }
        (removed, at.max(from))
    }

    pub(super) fn for_each(&self, f: &mut dyn FnMut(&IndexKey)) {
        for (&off, entry) in &self.map {
            if entry.kind != KeyKind::Empty {
                f(&entry.key_at(off));
            }
        }
    }

    /// Every entry, placeholders included, for tests that check the map's shape.
    #[cfg(test)]
    pub(super) fn all_keys(&self) -> impl Iterator<Item = IndexKey> + '_ {
        self.map.iter().map(|(&off, entry)| entry.key_at(off))
    }
}
