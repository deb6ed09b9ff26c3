//! Counters the engine keeps for `status` and metrics. Relaxed atomics: they are statistics,
//! not synchronisation.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    pub read_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
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
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            read_hits: g(&self.read_hits),
            read_misses: g(&self.read_misses),
            read_bytes: g(&self.read_bytes),
            write_bytes: g(&self.write_bytes),
            busy: g(&self.busy),
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
