// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Garbage collection: reclaim the log behind dirty_tail, FIFO, as dm-pcache does.
//!
//! When at least gc_percent of the segments are in use, the thread takes the kset at
//! key_tail (which writeback has already written back: GC never passes dirty_tail), moves and
//! persists key_tail past it, and then drops the reference each of its keys held on its data
//! segment; a segment whose last reference goes is invalidated and freed. A LAST kset frees the
//! log segment it ends, again only after key_tail has left it. A kset is decoded whole before
//! anything changes, so a decode error leaves nothing half-collected: it is reported and GC
//! stops, the cache keeps serving and writing back, and `check` can tell what is wrong.
//!
//! The same thread keeps the index proportional to what the cache holds: the zeroes keys of a
//! reclaimed kset leave the index with it, and after segments were freed a cleaner pass drops
//! the keys that pointed into them (dm-pcache's clean work).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::core::Core;
use super::data_head::{SegmentError, LOG_RESERVE};
use super::format::{self, KsetFound, TailPos};
use super::CachePos;
use crate::engine::ErrorChain;
use crate::sync::lock;

pub(super) fn spawn(core: Arc<Core>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("pcache-gc".into())
        .spawn(move || run(&core))
        .expect("spawning the GC thread")
}

/// Whether to collect: enough of the cache is in use, or so little is free that data
/// allocation has stopped (whatever gc_percent says, a cache that cannot take writes must
/// reclaim what writeback has made clean).
pub(super) fn need_gc(used: u32, total: u32, gc_percent: u8) -> bool {
    used as u64 * 100 >= total as u64 * gc_percent as u64 || total - used <= LOG_RESERVE + 1
}

/// Least time between two passes of the index cleaner while segments keep being freed.
const CLEAN_INTERVAL: Duration = Duration::from_millis(200);
/// Stale keys removed under one region lock at most, so the cleaner never holds up requests.
const CLEAN_BATCH: usize = 256;

/// The index cleaner's progress: the invalidation count its last pass covered.
#[derive(Default)]
pub(super) struct Cleaner {
    covered: u64,
    last: Option<std::time::Instant>,
}

impl Cleaner {
    /// A pass over the whole index when segments were invalidated since the last one and
    /// the last is at least `min_interval` ago. Returns the stale keys removed.
    pub(super) fn maybe_clean(&mut self, core: &Core, min_interval: Duration) -> usize {
        let invalidations = core.segments.invalidations();
        if invalidations == self.covered || self.last.is_some_and(|t| t.elapsed() < min_interval) {
            return 0;
        }
        self.covered = invalidations;
        self.last = Some(std::time::Instant::now());
        clean_stale(core)
    }
}

/// Drop every index key whose segment was invalidated since the key was made: dm-pcache's
/// clean work. Without it such keys stay until a lookup meets them, so the index would grow
/// with every block of the disk ever written rather than with what the cache holds. Runs on
/// the GC thread, one region lock at a time, batch by batch: nothing on the request paths.
pub(super) fn clean_stale(core: &Core) -> usize {
    let gen_of = |s| core.segments.gen(s);
    let mut total = 0;
    loop {
        let n = core.index.remove_stale(&gen_of, CLEAN_BATCH);
        total += n;
        if n < CLEAN_BATCH || core.stopping.load(Ordering::Acquire) {
            return total;
        }
    }
}

/// Longest time GC sleeps when it found nothing to collect.
const IDLE: Duration = Duration::from_millis(50);

fn run(core: &Core) {
    run_with(core, IDLE)
}

/// The GC thread's loop, sleeping at most `idle` when there is nothing to collect.
pub(super) fn run_with(core: &Core, idle: Duration) {
    let mut cleaner = Cleaner::default();
    let mut scratch = Scratch::default();
    while !core.stopping.load(Ordering::Acquire) {
        let collected = collect_one_with(core, &mut scratch);
        cleaner.maybe_clean(core, CLEAN_INTERVAL);
        match collected {
            Ok(true) => {}
            Ok(false) => wait_for_work(core, idle),
            Err(e) => {
                log::error!("GC stopped: {}; the cache keeps serving but will not reclaim space. Run `check` on it after stopping the daemon.", ErrorChain(&e));
                core.stats.gc_errors.fetch_add(1, Ordering::Relaxed);
                while !core.stopping.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

/// Nothing to collect: wait up to `idle`. While data allocation has stopped or is about to,
/// writes wait for the next segment GC frees, which writeback's progress makes collectable:
/// then writeback wakes GC (`Core::writeback_progress`) so a freed segment does not wait for
/// the end of a sleep. Otherwise GC only sleeps, so writeback does not wake it for every kset
/// while nothing waits for room.
fn wait_for_work(core: &Core, idle: Duration) {
    if core.segments.free_count() > LOG_RESERVE + 1 {
        std::thread::sleep(idle);
        return;
    }
    let g = lock(&core.progress.0);
    // Looked at under the lock writeback notifies under, after storing dirty_tail: a move
    // between this check and the wait cannot go unnoticed.
    if core.stopping.load(Ordering::Acquire)
        || core.meta.dirty_tail().log_seq > core.meta.key_tail().log_seq
    {
        return;
    }
    drop(core.progress.1.wait_timeout(g, idle));
}

/// Why GC stopped. Nothing was half-collected: the kset at key_tail stays where it was, or
/// key_tail moved past it and only the freeing of its segments failed.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("decoding the kset at key_tail (segment {seg} offset {off}, kset {seq})")]
    Decode {
        seg: u32,
        off: u32,
        seq: u64,
        #[source]
        source: format::FormatError,
    },
    #[error("persisting key_tail")]
    StoreKeyTail(#[source] format::FormatError),
    #[error("freeing {kind} segment {seg}")]
    Free {
        kind: &'static str,
        seg: u32,
        #[source]
        source: SegmentError,
    },
}

/// Buffers GC reuses from kset to kset, as writeback does, so that collecting a kset
/// allocates nothing once they have grown.
#[derive(Default)]
pub(super) struct Scratch {
    /// The encoded kset at key_tail, as read from the media.
    kset: Vec<u8>,
    keys: Vec<format::KeyRecord>,
}

/// Collect one kset if GC is due, with buffers of its own; see [`collect_one_with`].
#[cfg(test)]
pub(super) fn collect_one(core: &Core) -> Result<bool, GcError> {
    collect_one_with(core, &mut Scratch::default())
}

/// Collect one kset if GC is due. `Ok(false)` when there was nothing to do. The GC thread
/// runs exactly this; stepped tests call it through `collect_one`.
pub(super) fn collect_one_with(core: &Core, scratch: &mut Scratch) -> Result<bool, GcError> {
    let total = core.segments.count();
    if !need_gc(core.segments.used_count(), total, core.meta.gc_percent()) {
        return Ok(false);
    }
    let tail = core.meta.key_tail();
    if tail.log_seq >= core.meta.dirty_tail().log_seq {
        return Ok(false);
    }
    let Scratch { kset, keys } = scratch;
    let found = core
        .read_kset_into(tail, kset, keys)
        .map_err(|source| GcError::Decode {
            seg: tail.pos.seg,
            off: tail.pos.off,
            seq: tail.log_seq,
            source,
        })?;
    match found {
        KsetFound::Last { next_seg, .. } => {
            let next = TailPos {
                pos: CachePos {
                    seg: next_seg,
                    off: 0,
                },
                log_seq: tail.log_seq + 1,
            };
            core.meta
                .store_key_tail(next)
                .map_err(GcError::StoreKeyTail)?;
            core.segments
                .invalidate(tail.pos.seg, &core.meta)
                .map_err(|e| GcError::Free {
                    kind: "log",
                    seg: tail.pos.seg,
                    source: e,
                })?;
        }
        KsetFound::Keys { .. } => {
            let next = TailPos {
                pos: CachePos {
                    seg: tail.pos.seg,
                    off: tail.pos.off + format::kset_size(keys.len()) as u32,
                },
                log_seq: tail.log_seq + 1,
            };
            // Only keys of the segment's current life hold a reference (replay counts the
            // same ones), so a key older than its segment's generation is passed over. A kset
            // holds at most KSET_MAX_KEYS keys, so the list never leaves the stack.
            let live: smallvec::SmallVec<[u32; format::KSET_MAX_KEYS]> = keys
                .iter()
                .filter(|k| k.flags & format::KEY_ZEROES == 0)
                .filter(|k| core.segments.gen(k.seg) == k.gen)
                .map(|k| k.seg)
                .collect();
            core.meta
                .store_key_tail(next)
                .map_err(GcError::StoreKeyTail)?;
            for seg in live {
                core.segments
                    .put(seg, &core.meta)
                    .map_err(|e| GcError::Free {
                        kind: "data",
                        seg,
                        source: e,
                    })?;
            }
            // The image holds these zeroes (GC never passes dirty_tail), so reads can go to
            // it: the index keeps only what the log still holds. Unstamped keys (written by
            // older versions) cannot be told from later ones and stay until overwritten.
            for k in keys.iter().filter(|k| k.is_zeroes() && k.gen != 0) {
                core.index.remove_zeroes(k.off, k.len, k.gen);
            }
        }
    }
    core.stats.gc_runs.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold() {
        assert!(!need_gc(6, 10, 70));
        assert!(need_gc(7, 10, 70));
        assert!(need_gc(0, 10, 0));
        assert!(!need_gc(2, 10, 90));
        assert!(
            need_gc(7, 10, 90),
            "only the log reserve and one more are free"
        );
    }
}
