// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Segment accounting: which segments are in use, their reference counts and generations.
//!
//! A data segment's reference count is the number of live log keys pointing into it, plus one
//! while it is some queue's data head, plus short-lived pins taken between allocating space and
//! logging the key (so a segment can never be reused under a write that is still in flight).
//! When the count drops to zero the segment is invalidated: its generation is bumped and
//! persisted first, which makes every in-memory key still pointing into it stale, and only then
//! is it marked free. Log segments are not counted: GC frees them explicitly once key_tail has
//! left them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::sync::lock;

use super::format::FormatError;

/// What a segment in use holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    Free,
    Log,
    Data,
}

/// Persists a segment's new generation; implemented by the engine over the media.
pub trait GenerationStore: Send + Sync {
    fn store_gen(&self, seg: u32, gen: u64) -> Result<(), FormatError>;
}

/// What each segment holds and how many are free: the state allocation searches.
struct SegmentUsage {
    kind: Vec<SegmentKind>,
    free: u32,
    /// Where the next search for a free segment starts, so allocation rotates over the media.
    hint: u32,
}

/// In-memory state of every segment of one cache.
pub struct SegmentMap {
    usage: Mutex<SegmentUsage>,
    refs: Vec<AtomicU32>,
    gens: Vec<AtomicU64>,
    /// Queues that found no room; each is woken when a segment is freed.
    waiters: Mutex<Vec<EventFd>>,
    /// Segments invalidated so far, so the index cleaner knows when keys may have gone stale.
    invalidations: AtomicU64,
    /// Wake-ups so far, counted after the waiters' eventfds were written: a queue reads its
    /// eventfd only when this moved (no syscall per request).
    wakes: AtomicU64,
}

impl SegmentMap {
    /// All segments free, with the generations read from the media.
    pub fn new(gens: &[u64]) -> SegmentMap {
        let n = gens.len();
        SegmentMap {
            usage: Mutex::new(SegmentUsage {
                kind: vec![SegmentKind::Free; n],
                free: n as u32,
                hint: 0,
            }),
            refs: (0..n).map(|_| AtomicU32::new(0)).collect(),
            gens: gens.iter().map(|&g| AtomicU64::new(g)).collect(),
            waiters: Mutex::new(Vec::new()),
            invalidations: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
        }
    }

    /// How many segments were invalidated since the map was made.
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Acquire)
    }

    pub fn count(&self) -> u32 {
        self.refs.len() as u32
    }

    /// Current generation of `seg`, or `u64::MAX` for an out-of-range id instead of a panic.
    /// Keys are checked against the layout before their segment is looked up, so no caller
    /// passes one today.
    pub fn gen(&self, seg: u32) -> u64 {
        self.gens
            .get(seg as usize)
            .map_or(u64::MAX, |g| g.load(Ordering::Acquire))
    }

    pub fn free_count(&self) -> u32 {
        lock(&self.usage).free
    }

    pub fn used_count(&self) -> u32 {
        self.count() - self.free_count()
    }

    pub fn kind(&self, seg: u32) -> SegmentKind {
        lock(&self.usage).kind[seg as usize]
    }

    /// Mark `seg` as in use during replay (log segments and segments that live keys point to).
    pub fn mark_used(&self, seg: u32, kind: SegmentKind) {
        let mut a = lock(&self.usage);
        if a.kind[seg as usize] == SegmentKind::Free {
            a.free -= 1;
        }
        a.kind[seg as usize] = kind;
    }

    /// Take a free segment for `kind`, provided more than `reserve` segments are free. Data
    /// allocation keeps a reserve so the log can always grow far enough to persist the keys of
    /// the data already written; otherwise a full cache could not be written back and freed.
    /// A data segment starts with one reference: the data head's.
    pub fn alloc(&self, kind: SegmentKind, reserve: u32) -> Option<u32> {
        let mut a = lock(&self.usage);
        if a.free <= reserve {
            return None;
        }
        let n = a.kind.len() as u32;
        let start = a.hint;
        let seg = (0..n)
            .map(|i| (start + i) % n)
            .find(|&s| a.kind[s as usize] == SegmentKind::Free)?;
        a.kind[seg as usize] = kind;
        a.free -= 1;
        a.hint = (seg + 1) % n;
        if kind == SegmentKind::Data {
            self.refs[seg as usize].store(1, Ordering::Release);
        }
        Some(seg)
    }

    /// Add a reference to a data segment.
    pub fn get(&self, seg: u32) {
        self.refs[seg as usize].fetch_add(1, Ordering::AcqRel);
    }

    /// Reference count of `seg` (for statistics and checks).
    pub fn refs(&self, seg: u32) -> u32 {
        self.refs[seg as usize].load(Ordering::Acquire)
    }

    /// Drop a reference; the last one invalidates and frees the segment.
    pub fn put(&self, seg: u32, store: &dyn GenerationStore) -> Result<(), FormatError> {
        let before = self.refs[seg as usize].fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "segment {seg} reference count underflow");
        if before == 1 {
            self.invalidate(seg, store)?;
        }
        Ok(())
    }

    /// Bump and persist the generation of `seg`, then free it. The generation is persisted
    /// before the segment can be handed out again, so no key of its previous life survives a
    /// crash as current.
    pub fn invalidate(&self, seg: u32, store: &dyn GenerationStore) -> Result<(), FormatError> {
        let gen = self.gens[seg as usize].load(Ordering::Acquire) + 1;
        store.store_gen(seg, gen)?;
        self.gens[seg as usize].store(gen, Ordering::Release);
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        {
            let mut a = lock(&self.usage);
            if a.kind[seg as usize] != SegmentKind::Free {
                a.kind[seg as usize] = SegmentKind::Free;
                a.free += 1;
            }
        }
        self.wake();
        Ok(())
    }

    /// Register an eventfd to be written whenever a segment becomes free.
    pub fn add_waiter(&self, fd: EventFd) {
        lock(&self.waiters).push(fd);
    }

    /// Forget a waiter previously added (matched by file descriptor number).
    pub fn remove_waiter(&self, raw: std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        lock(&self.waiters).retain(|w| w.as_raw_fd() != raw);
    }

    /// Wake every waiting queue (space was freed, or something else they wait for happened).
    pub fn wake(&self) {
        for w in lock(&self.waiters).iter() {
            let _ = w.write(1);
        }
        self.wakes.fetch_add(1, Ordering::Release);
    }

    /// How many wake-ups there were; each is counted once every waiter's eventfd was written.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gens(Mutex<Vec<(u32, u64)>>);
    impl GenerationStore for Gens {
        fn store_gen(&self, seg: u32, gen: u64) -> Result<(), FormatError> {
            lock(&self.0).push((seg, gen));
            Ok(())
        }
    }

    #[test]
    fn alloc_respects_reserve_and_rotates() {
        let map = SegmentMap::new(&[0; 4]);
        assert_eq!(map.alloc(SegmentKind::Log, 0), Some(0));
        assert_eq!(map.alloc(SegmentKind::Data, 2), Some(1));
        assert_eq!(
            map.alloc(SegmentKind::Data, 2),
            None,
            "two left, two reserved"
        );
        assert_eq!(map.alloc(SegmentKind::Log, 0), Some(2));
        assert_eq!(map.free_count(), 1);
    }

    #[test]
    fn last_put_bumps_generation_then_frees() {
        let store = Gens(Mutex::new(Vec::new()));
        let map = SegmentMap::new(&[5, 7]);
        let seg = map.alloc(SegmentKind::Data, 0).unwrap();
        map.get(seg);
        map.put(seg, &store).unwrap();
        assert_eq!(map.kind(seg), SegmentKind::Data);
        map.put(seg, &store).unwrap();
        assert_eq!(map.kind(seg), SegmentKind::Free);
        assert_eq!(map.gen(seg), 6);
        assert_eq!(*lock(&store.0), vec![(seg, 6)]);
    }

    #[test]
    fn waiters_are_woken_on_free() {
        let store = Gens(Mutex::new(Vec::new()));
        let map = SegmentMap::new(&[0; 2]);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        map.add_waiter(fd.try_clone().unwrap());
        let seg = map.alloc(SegmentKind::Data, 0).unwrap();
        assert!(fd.read().is_err(), "nothing freed yet");
        map.put(seg, &store).unwrap();
        assert_eq!(fd.read().unwrap(), 1);
    }
}
