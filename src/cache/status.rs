// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the control socket asks of a running cache: its status (the dm-pcache status fields and
//! the counters), gc_percent, persisting the open ksets, and drained mode.
//!
//! Drained mode (`drain_and_hold` … `leave_drained`) is what detaching the cache or migrating
//! the VM needs: when `drain_and_hold` returns, the backing image holds every write completed
//! so far and has been flushed; from the moment it was called until `leave_drained`, a write
//! completes only once writeback has put it on the backing image and flushed it. The cache
//! then only ever holds clean data beyond writes still in flight, and writeback runs without
//! pauses.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::core::Core;
use super::format::{TailPos, MAX_GC_PERCENT};
use super::health::HealthStatus;
use super::pacing::WritebackState;
use super::stats::StatsSnapshot;
use crate::engine::EngineError;

/// A log position: segment, byte offset in its data area, and log sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    pub seg: u32,
    pub off: u32,
    pub seq: u64,
}

impl From<TailPos> for LogPosition {
    fn from(t: TailPos) -> Self {
        LogPosition {
            seg: t.pos.seg,
            off: t.pos.off,
            seq: t.log_seq,
        }
    }
}

/// The cache's flags, as dm-pcache's status line reports them, plus the mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFlags {
    /// Cached data carries a CRC checked on every read hit.
    pub data_crc: bool,
    /// Writes complete only once their keys are on the media (guest write cache off, or
    /// drained mode).
    pub writethrough: bool,
    /// Drained mode: writes also complete only once written back.
    pub drained: bool,
    /// The guest's write-cache setting.
    pub write_cache: bool,
    /// The backing image is read-only, so nothing is written back.
    pub read_only: bool,
}

/// Everything `status` reports about a cache.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// How the media makes writes durable (pmem, msync or volatile), as detected or forced at
    /// open: the one place an operator sees whether a DAX media really runs in pmem mode.
    #[serde(default)]
    pub persistence: String,
    pub segments_total: u32,
    /// Log and data segments in use.
    pub segments_used: u32,
    /// Bytes of cached data one segment holds.
    pub segment_data_bytes: u32,
    pub gc_percent: u8,
    /// Where the next kset goes.
    pub key_head: LogPosition,
    /// Oldest kset not yet written back.
    pub dirty_tail: LogPosition,
    /// Oldest kset not yet reclaimed by GC.
    pub key_tail: LogPosition,
    pub flags: CacheFlags,
    pub stats: StatsSnapshot,
    /// Data given up and background work that cannot go on (absent from older daemons).
    #[serde(default)]
    pub health: HealthStatus,
    /// What writeback is doing and why (absent from older daemons).
    #[serde(default)]
    pub writeback: WritebackStatus,
}

/// Writeback pacing as `status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackStatus {
    pub state: WritebackState,
    /// The watermarks, in percent of the cache's data space that is dirty.
    pub high_watermark: u8,
    pub low_watermark: u8,
    /// How long the guest must be quiet for writeback to count it idle.
    pub idle_ms: u64,
}

/// Counters for status and metrics.
pub(super) fn stats(core: &Core) -> StatsSnapshot {
    let free = core.segments.free_count();
    StatsSnapshot {
        segments_used: core.segments.count() - free,
        segments_free: free,
        journal_full: core.log.journal_full(),
        ..core.stats.snapshot()
    }
}

/// The status fields and counters, read without stopping I/O (each field is current, the
/// whole is not one atomic snapshot).
pub(super) fn status(core: &Core) -> CacheStatus {
    let head = core.log.head();
    let drained = core.drained.load(Ordering::Acquire);
    let write_cache = core.write_cache.load(Ordering::Acquire);
    CacheStatus {
        persistence: core.media.persistence().to_string(),
        segments_total: core.segments.count(),
        segments_used: core.segments.used_count(),
        segment_data_bytes: core.layout.data_size(),
        gc_percent: core.meta.gc_percent(),
        key_head: LogPosition {
            seg: head.pos.seg,
            off: head.pos.off,
            seq: head.seq,
        },
        dirty_tail: core.meta.dirty_tail().into(),
        key_tail: core.meta.key_tail().into(),
        flags: CacheFlags {
            data_crc: core.data_crc,
            writethrough: drained || !write_cache,
            drained,
            write_cache,
            read_only: core.read_only,
        },
        stats: stats(core),
        health: core.health.status(),
        writeback: {
            let opts = core.pacing.options();
            WritebackStatus {
                state: core.pacing.state(),
                high_watermark: opts.high_watermark,
                low_watermark: opts.low_watermark,
                idle_ms: opts.idle.as_millis() as u64,
            }
        },
    }
}

/// Change the GC threshold (0..=90) and persist it in cache_info.
pub(super) fn set_gc_percent(core: &Core, percent: u8) -> Result<(), EngineError> {
    if percent > MAX_GC_PERCENT {
        return Err(EngineError::Invalid(format!(
            "gc_percent {percent} is out of range 0..={MAX_GC_PERCENT}"
        )));
    }
    if core.read_only {
        return Err(EngineError::Invalid(
            "the cache is open read-only; gc_percent cannot be stored".into(),
        ));
    }
    core.meta
        .set_gc_percent(percent)
        .map_err(|e| EngineError::failed("persisting gc_percent", e))
}

/// Enter drained mode, write everything back and flush the backing image. On error the
/// cache stays in drained mode (writes still complete, once written back), so a retry or
/// `leave_drained` decides what happens next.
pub(super) fn drain_and_hold(core: &Core) -> Result<(), EngineError> {
    if core.read_only {
        return Err(EngineError::Invalid(
            "the cache is open read-only, so nothing is written back".into(),
        ));
    }
    // SeqCst, paired with the load in `CacheQueue::hold_if_needed`: every write completed
    // without being held has its keys logged where the drain below closes and writes back.
    core.drained.store(true, Ordering::SeqCst);
    log::info!("drain requested: writing all dirty data back, then writethrough");
    core.drain()
        .map_err(|e| EngineError::failed("writing all dirty data back", e))?;
    core.backing
        .flush()
        .map_err(|e| EngineError::io("flushing the backing image", e))?;
    log::info!("drained: the backing image holds all acknowledged data");
    Ok(())
}

/// Leave drained mode: writes complete as soon as the cache holds them again.
pub(super) fn leave_drained(core: &Core) {
    if core.drained.swap(false, Ordering::SeqCst) {
        log::info!(
            "undrain: back to write-back caching (write cache {})",
            if core.write_cache.load(Ordering::Acquire) {
                "on"
            } else {
                "off"
            }
        );
    }
}
