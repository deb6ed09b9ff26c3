// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-memory index: which cache position holds each byte of backing space.
//!
//! As in dm-pcache, backing space is cut into 4 MiB regions ([`REGION_SIZE`]), each with its own
//! ordered map and its own lock, so requests to different regions never contend. A key never
//! spans regions: [`Index::insert`] splits it at region boundaries. No operation holds two
//! region locks at once; operations that cover several regions take them one at a time, in
//! offset order.
//!
//! The overlap rules (the four dm-pcache fix-up cases, newest key wins) live in `subtree`;
//! this file holds the public types and routes each operation to its regions.

mod chunk_map;
mod subtree;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{CachePos, REGION_SHIFT, REGION_SIZE};
use crate::sync::lock;
use subtree::Subtree;

/// What an index key stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// Data written by the guest and not yet written back.
    Dirty,
    /// Data copied from the backing image (a filled read miss), or already written back.
    Clean,
    /// A data-less key that reads as zeroes (WRITE_ZEROES, DISCARD); dirty until written back.
    Zeroes,
    /// A placeholder for a read miss whose backing read is in flight.
    Empty,
}

/// The CRC-protected on-media extent a key was cut from. Splits and cuts keep it unchanged, so
/// a read hit on any fragment can verify the whole extent's data CRC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrcSpan {
    pub pos: CachePos,
    pub len: u32,
    pub crc: u32,
}

/// One extent of backing space and where its bytes live in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexKey {
    /// Backing byte offset (a multiple of 512).
    pub off: u64,
    /// Length in bytes (a multiple of 512, never 0).
    pub len: u32,
    pub kind: KeyKind,
    /// Where byte `off` lives in the cache (meaningless for `Zeroes` and `Empty`).
    pub pos: CachePos,
    /// Generation of segment `pos.seg` when the key was made; for a `Zeroes` key, its stamp
    /// (unique per zeroes key, 0 on caches written by older versions).
    pub gen: u64,
    /// The on-media extent this key was cut from.
    pub crc: CrcSpan,
}

impl IndexKey {
    /// One past the last backing byte of the key.
    pub fn end(&self) -> u64 {
        self.off + u64::from(self.len)
    }

    /// Whether the key points at cache data (and so can go stale when its segment is reused).
    pub fn has_data(&self) -> bool {
        matches!(self.kind, KeyKind::Dirty | KeyKind::Clean)
    }
}

/// Identifies one placeholder inserted by [`Index::lookup`] with `fill = true`. Hand it back
/// exactly once, to [`Index::complete_fill`] or [`Index::abort_fill`]; a ticket that is dropped
/// instead leaves its placeholder behind, and reads of that range then keep missing unfilled.
#[derive(Debug, PartialEq, Eq)]
pub struct FillTicket {
    id: u64,
    /// The placeholder's range when it was inserted; its fragments all lie inside it, in one
    /// region.
    off: u64,
    len: u32,
}

impl FillTicket {
    /// Backing byte offset of the placeholder's first byte.
    pub fn off(&self) -> u64 {
        self.off
    }

    /// Length of the placeholder when it was inserted.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Always false: placeholders cover at least one sector.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One piece of a looked-up range. The pieces of one lookup are consecutive and cover the range
/// exactly.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The bytes are in the cache; `key` is trimmed to the piece (its `pos` is the position of
    /// byte `off`), its `crc` still names the whole on-media extent.
    Hit { off: u64, len: u32, key: IndexKey },
    /// The bytes read as zeroes.
    Zeroes { off: u64, len: u32 },
    /// Read the bytes from the backing image; if `ticket` is `Some`, copy them into the cache
    /// and call [`Index::complete_fill`].
    Miss {
        off: u64,
        len: u32,
        ticket: Option<FillTicket>,
    },
}

impl Piece {
    pub fn off(&self) -> u64 {
        match self {
            Piece::Hit { off, .. } | Piece::Zeroes { off, .. } | Piece::Miss { off, .. } => *off,
        }
    }

    pub fn len(&self) -> u32 {
        match self {
            Piece::Hit { len, .. } | Piece::Zeroes { len, .. } | Piece::Miss { len, .. } => *len,
        }
    }

    /// Always false: lookups produce no empty pieces.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One region's lock and map in a cache line of its own: a request touches one line to lock
/// and find its region's map, and queues working in neighbouring regions do not share lines.
#[repr(align(64))]
pub(super) struct Region(Mutex<Subtree>);

/// The striped extent index. `Send + Sync`; every method takes `&self`.
pub struct Index {
    capacity: u64,
    regions: Vec<Region>,
    next_ticket: AtomicU64,
    /// Where the next [`Index::remove_stale`] scan starts, so successive calls make progress.
    stale_scan_at: AtomicU64,
}

impl Index {
    /// An index for `capacity_bytes` of backing space. Parts of keys beyond it are ignored and
    /// looked-up bytes beyond it are misses without a ticket: callers validate request ranges.
    pub fn new(capacity_bytes: u64) -> Index {
        let n = capacity_bytes.div_ceil(REGION_SIZE);
        Index {
            capacity: capacity_bytes,
            regions: (0..n)
                .map(|r| Region(Mutex::new(Subtree::new(r << REGION_SHIFT))))
                .collect(),
            next_ticket: AtomicU64::new(1),
            stale_scan_at: AtomicU64::new(0),
        }
    }

    /// Bytes of backing space the index covers.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Insert `key`: it wins over every key it overlaps (those are cut, split or deleted;
    /// placeholders are cut or deleted, never split). A key crossing region boundaries is
    /// inserted as one part per region, in offset order; `on_insert` sees each part while that
    /// region's lock is held, right after the part became visible, so anything the callback
    /// appends to a log is in index order for every block. `on_insert` must not call back into
    /// the index.
    pub fn insert(&self, key: IndexKey, on_insert: &mut dyn FnMut(&IndexKey)) {
        let end = key
            .off
            .saturating_add(u64::from(key.len))
            .min(self.capacity);
        let mut off = key.off;
        while off < end {
            let part_end = region_end(off).min(end);
            let part = trim(&key, off, (part_end - off) as u32);
            let mut region = self.lock_region(off);
            region.insert(&part);
            on_insert(&part);
            drop(region);
            off = part_end;
        }
    }

    /// Start loading the cache line of the region holding byte `off` (its lock and where its
    /// map lives), so that an insert made later, after the request's data was copied, does
    /// not wait for it: under random writes over a large disk that line is rarely still
    /// cached, and locking it was a miss on every write. Only a hint; changes nothing.
    pub fn prefetch(&self, off: u64) {
        if let Some(region) = self.regions.get((off >> REGION_SHIFT) as usize) {
            prefetch_line(region);
        }
    }

    /// Describe `[off, off + len)` (multiples of 512, as every offset the index takes) as
    /// consecutive pieces in `out` (cleared first).
    ///
    /// Data keys whose `gen` is below `gen_of(key.pos.seg)` are stale: they are removed and
    /// their bytes treated as absent. Absent bytes become `Miss` pieces; with `fill` each such
    /// gap (per region) also gets a placeholder and a ticket. Bytes under someone else's
    /// placeholder are a `Miss` without ticket. `gen_of` is called under a region lock.
    pub fn lookup(
        &self,
        off: u64,
        len: u64,
        fill: bool,
        gen_of: &dyn Fn(u32) -> u64,
        out: &mut Vec<Piece>,
    ) {
        out.clear();
        let end = off.saturating_add(len);
        let indexed_end = end.min(self.capacity);
        let mut at = off;
        while at < indexed_end {
            let part_end = region_end(at).min(indexed_end);
            let mut region = self.lock_region(at);
            let tickets = fill.then_some(&self.next_ticket);
            region.lookup(at, part_end, tickets, gen_of, out);
            drop(region);
            at = part_end;
        }
        // Beyond the capacity nothing is cached; piece lengths must still fit a u32.
        while at < end {
            let part_end = region_end(at).min(end);
            let len = (part_end - at) as u32;
            push_piece(
                out,
                Piece::Miss {
                    off: at,
                    len,
                    ticket: None,
                },
            );
            at = part_end;
        }
    }

    /// The backing read for `ticket` finished and its bytes were copied to the cache at `pos`
    /// (the position of the placeholder's first byte). Whatever fragments of the placeholder
    /// writes left in place become `Clean` keys (generation `gen`, CRC span `crc`), each passed
    /// to `on_insert` under the region lock. Returns the bytes kept.
    pub fn complete_fill(
        &self,
        ticket: FillTicket,
        pos: CachePos,
        gen: u64,
        crc: CrcSpan,
        on_insert: &mut dyn FnMut(&IndexKey),
    ) -> u64 {
        let Some(mut region) = self.lock_region_if_any(ticket.off) else {
            return 0;
        };
        region.complete_fill(&ticket, pos, gen, crc, on_insert)
    }

    /// The fill for `ticket` failed or was abandoned: remove what is left of its placeholder.
    pub fn abort_fill(&self, ticket: FillTicket) {
        if let Some(mut region) = self.lock_region_if_any(ticket.off) {
            region.abort_fill(&ticket);
        }
    }

    /// Remove up to `max` stale data keys, resuming where the previous call stopped and going
    /// round the whole index at most once. Returns how many were removed.
    pub fn remove_stale(&self, gen_of: &dyn Fn(u32) -> u64, max: usize) -> usize {
        if self.regions.is_empty() || max == 0 {
            return 0;
        }
        let n = self.regions.len();
        let start = match self.stale_scan_at.load(Ordering::Relaxed) {
            at if at < self.capacity => at,
            _ => 0,
        };
        let first = (start >> REGION_SHIFT) as usize;
        let mut removed = 0;
        // Visit the start region twice: from `start` first, and its head at the very end.
        for step in 0..=n {
            let r = (first + step) % n;
            let region_start = (r as u64) << REGION_SHIFT;
            let from = if step == 0 {
                start.max(region_start)
            } else {
                region_start
            };
            let to = if step == n {
                start
            } else {
                region_start + REGION_SIZE
            };
            let mut region = lock(&self.regions[r].0);
            let (n_removed, stopped_at) = region.remove_stale(from, to, gen_of, max - removed);
            drop(region);
            removed += n_removed;
            if removed >= max {
                self.stale_scan_at.store(stopped_at, Ordering::Relaxed);
                return removed;
            }
        }
        self.stale_scan_at.store(start, Ordering::Relaxed);
        removed
    }

    /// Remove the zeroes keys (and fragments of them) in `[off, off + len)` that carry
    /// `stamp`: GC calls this for a zeroes key it reclaims, whose zeroes the backing image
    /// holds by then. Keys of later writes carry other stamps and stay. Returns how many went.
    pub fn remove_zeroes(&self, off: u64, len: u32, stamp: u64) -> usize {
        let end = off.saturating_add(u64::from(len)).min(self.capacity);
        let mut at = off;
        let mut removed = 0;
        while at < end {
            let part_end = region_end(at).min(end);
            let mut region = self.lock_region(at);
            removed += region.remove_zeroes(at, part_end, stamp);
            drop(region);
            at = part_end;
        }
        removed
    }

    /// Number of keys in the index, placeholders not counted. Each region counts its own, so
    /// that requests share no counter (this takes every region's lock in turn).
    #[cfg(any(test, feature = "test-util"))]
    pub fn extent_count(&self) -> usize {
        self.regions.iter().map(|r| lock(&r.0).extents()).sum()
    }

    /// Visit every key except placeholders, in offset order, one region lock at a time. `f`
    /// must not call back into the index.
    pub fn for_each(&self, f: &mut dyn FnMut(&IndexKey)) {
        for region in &self.regions {
            let region = lock(&region.0);
            region.for_each(f);
        }
    }

    /// Every entry, placeholders included, after checking that entries are non-empty, do not
    /// overlap, stay inside their region, and that the extent count adds up.
    #[cfg(test)]
    fn checked_entries(&self) -> Vec<IndexKey> {
        let mut all = Vec::new();
        for (r, region) in self.regions.iter().enumerate() {
            let region = lock(&region.0);
            let (start, end) = ((r as u64) << REGION_SHIFT, ((r as u64) + 1) << REGION_SHIFT);
            let mut at = start;
            for key in region.all_keys() {
                assert!(key.len > 0, "empty entry {key:?}");
                assert!(key.off >= at, "entry {key:?} overlaps its predecessor");
                assert!(key.end() <= end, "entry {key:?} leaves region {r}");
                at = key.end();
                all.push(key);
            }
        }
        let extents = all.iter().filter(|k| k.kind != KeyKind::Empty).count();
        assert_eq!(extents, self.extent_count());
        all
    }

    /// Lock the region holding byte `off`, which must be below the capacity.
    fn lock_region(&self, off: u64) -> MutexGuard<'_, Subtree> {
        lock(&self.regions[(off >> REGION_SHIFT) as usize].0)
    }

    /// Lock the region holding byte `off`; `None` when `off` is beyond the capacity.
    fn lock_region_if_any(&self, off: u64) -> Option<MutexGuard<'_, Subtree>> {
        let region = self.regions.get((off >> REGION_SHIFT) as usize)?;
        Some(lock(&region.0))
    }
}

// Queue workers share one index.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Index>();
};

/// Ask the CPU to start loading `value`'s first cache line; a no-op where there is no such
/// instruction.
#[inline(always)]
fn prefetch_line<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults and reads nothing the program can observe; SSE,
        // which it needs, is part of every x86_64 CPU.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// One past the last byte of the region holding `off`.
fn region_end(off: u64) -> u64 {
    (off | (REGION_SIZE - 1)).saturating_add(1)
}

/// `key` restricted to `[off, off + len)`, which must lie inside it.
fn trim(key: &IndexKey, off: u64, len: u32) -> IndexKey {
    let skip = (off - key.off) as u32;
    let mut part = *key;
    part.off = off;
    part.len = len;
    if key.has_data() {
        part.pos.off = key.pos.off.wrapping_add(skip);
    }
    part
}

/// Append `piece`, merging it into the previous piece when both are zeroes or both are misses
/// without ticket, so callers issue fewer backing reads.
fn push_piece(out: &mut Vec<Piece>, piece: Piece) {
    if let Some(last) = out.last_mut() {
        let contiguous = last.off() + u64::from(last.len()) == piece.off();
        match (last, &piece) {
            (Piece::Zeroes { len, .. }, Piece::Zeroes { len: add, .. })
            | (
                Piece::Miss {
                    len, ticket: None, ..
                },
                Piece::Miss {
                    len: add,
                    ticket: None,
                    ..
                },
            ) if contiguous && len.checked_add(*add).is_some() => {
                *len += *add;
                return;
            }
            _ => {}
        }
    }
    out.push(piece);
}
