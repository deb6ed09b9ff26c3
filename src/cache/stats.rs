// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Counters the engine keeps for `status` and metrics. Relaxed atomics: they are statistics,
//! not synchronisation. The ones every request touches are sharded per thread, so queue
//! workers on different CPUs do not pass one cache line back and forth.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots of a [`ShardedCounter`]; threads beyond this many share slots.
const SHARDS: usize = 16;

/// One counter slot on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

/// A counter with one slot per thread (up to 16): adding touches only the calling
/// thread's cache line, reading sums the slots.
#[derive(Default)]
pub struct ShardedCounter {
    slots: [Slot; SHARDS],
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

fn my_shard() -> usize {
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        s.get()
    })
}

impl ShardedCounter {
    /// Add `n` (the ordering is accepted for the same call shape as an atomic; always
    /// relaxed).
    pub fn fetch_add(&self, n: u64, _order: Ordering) {
        self.slots[my_shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of all slots.
    pub fn load(&self, _order: Ordering) -> u64 {
        self.slots
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl std::fmt::Debug for ShardedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub read_hits: ShardedCounter,
    pub read_misses: ShardedCounter,
    pub read_bytes: ShardedCounter,
    pub write_bytes: ShardedCounter,
    /// Requests handed back to their queue because the cache had no room.
    pub busy: AtomicU64,
    pub crc_errors: AtomicU64,
    pub writeback_bytes: AtomicU64,
    pub writeback_errors: AtomicU64,
    pub gc_runs: AtomicU64,
    pub gc_errors: AtomicU64,
    /// Bytes of dirty keys in the log (closed or open) not yet written back.
    pub dirty_bytes: AtomicU64,
}

/// A consistent-enough copy of the counters for reporting.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub read_hits: u64,
    pub read_misses: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub busy: u64,
    /// Writes (keys) held because the process-kill journal's ring for their kset was full:
    /// the key log fell that far behind (absent from older daemons).
    #[serde(default)]
    pub journal_full: u64,
    pub crc_errors: u64,
    pub writeback_bytes: u64,
    pub writeback_errors: u64,
    pub gc_runs: u64,
    pub gc_errors: u64,
    pub dirty_bytes: u64,
    /// Segments in use (log, data, data heads) and free, out of the cache's whole count.
    pub segments_used: u32,
    pub segments_free: u32,
}

impl Stats {
    /// A number that changes whenever the guest reads or writes: what writeback pacing looks
    /// at to tell a busy guest from an idle one. Reads only the per-thread slots, so the
    /// request path pays nothing for it.
    pub fn activity(&self) -> u64 {
        self.read_bytes
            .load(Ordering::Relaxed)
            .wrapping_add(self.write_bytes.load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            read_hits: self.read_hits.load(Ordering::Relaxed),
            read_misses: self.read_misses.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            busy: g(&self.busy),
            journal_full: 0,
            crc_errors: g(&self.crc_errors),
            writeback_bytes: g(&self.writeback_bytes),
            writeback_errors: g(&self.writeback_errors),
            gc_runs: g(&self.gc_runs),
            gc_errors: g(&self.gc_errors),
            dirty_bytes: g(&self.dirty_bytes),
            segments_used: 0,
            segments_free: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_counter_sums_every_thread() {
        let c = std::sync::Arc::new(ShardedCounter::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..1000).for_each(|_| c.fetch_add(3, Ordering::Relaxed))
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.load(Ordering::Relaxed), 20 * 1000 * 3);
    }
}
