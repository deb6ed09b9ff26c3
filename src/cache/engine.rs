// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The cache engine's lifecycle (dm-pcache's cache.c): opening (format or replay) into a
//! [`Core`], starting and stopping the fill, writeback and GC threads, and the [`Engine`] and
//! control operations, which hand their work to the files that own it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::core::{CacheError, CacheOptions, Core};
use super::health::Health;
use super::media::{self, Media, MediaOptions};
use super::pacing::Pacing;
use super::queue::CacheQueue;
use super::stats::{Stats, StatsSnapshot};
use super::status::{self, CacheStatus};
use super::{fill, gc, replay, writeback};
use crate::backing::BackingImage;
use crate::engine::{Engine, EngineError, EngineQueue, ErrorChain};
use crate::sync::lock;

/// The pmem cache engine.
pub struct CacheEngine {
    pub(super) core: Arc<Core>,
    drain_on_shutdown: bool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl CacheEngine {
    /// Open (formatting when new) the cache described by `opts` in front of `backing`.
    pub fn open(
        opts: &CacheOptions,
        backing: Arc<BackingImage>,
    ) -> Result<CacheEngine, CacheError> {
        let media = media::open_media(
            &opts.path,
            &MediaOptions {
                create_size: opts.create_size,
                persistence: opts.persistence,
            },
        )
        .map_err(|source| CacheError::Media {
            path: opts.path.clone(),
            source,
        })?;
        Self::open_with_media(opts, media, backing)
    }

    /// Open a cache on an already opened media (tests use a recording media; `opts.path` is
    /// only used in messages).
    pub fn open_with_media(
        opts: &CacheOptions,
        media: Arc<dyn Media>,
        backing: Arc<BackingImage>,
    ) -> Result<CacheEngine, CacheError> {
        Self::open_inner(opts, media, backing, true)
    }

    /// Open without writeback and GC threads and without closing ksets by age: the test
    /// drives writeback and GC with [`CacheEngine::writeback_step`] and
    /// [`CacheEngine::gc_step`], so a seeded workload is deterministic.
    #[cfg(test)]
    pub(crate) fn open_stepped(
        opts: &CacheOptions,
        media: Arc<dyn Media>,
        backing: Arc<BackingImage>,
    ) -> Result<CacheEngine, CacheError> {
        Self::open_inner(opts, media, backing, false)
    }

    /// Write back one kset (what one turn of the writeback thread does). `Ok(false)` when
    /// nothing persisted lies beyond dirty_tail.
    #[cfg(test)]
    pub(crate) fn writeback_step(
        &self,
        queue: &mut crate::backing::BackingQueue,
    ) -> Result<bool, writeback::WritebackError> {
        writeback::step(&self.core, queue)
    }

    /// Collect one kset if GC is due (what one turn of the GC thread does).
    #[cfg(test)]
    pub(crate) fn gc_step(&self) -> Result<bool, gc::GcError> {
        gc::collect_one(&self.core)
    }

    fn open_inner(
        opts: &CacheOptions,
        media: Arc<dyn Media>,
        backing: Arc<BackingImage>,
        background: bool,
    ) -> Result<CacheEngine, CacheError> {
        opts.pacing.validate().map_err(|e| CacheError::Invalid {
            path: opts.path.clone(),
            reason: e.to_string(),
        })?;
        let opened = replay::open(opts, media.clone(), &backing)?;
        let capacity = u64::from(opened.layout.data_size()) * u64::from(opened.segments.count());
        let (fill_tx, fill_rx) = std::sync::mpsc::channel();
        let core = Arc::new(Core {
            media,
            layout: opened.layout,
            meta: opened.meta,
            segments: opened.segments,
            index: opened.index,
            log: opened.log,
            heads: (0..opts.queues.max(1)).map(|_| Mutex::default()).collect(),
            read_only: backing.read_only(),
            backing,
            data_crc: opened.data_crc,
            write_cache: AtomicBool::new(true),
            stats: Stats {
                dirty_bytes: opened.dirty_bytes.into(),
                ..Stats::default()
            },
            health: Health::default(),
            zero_stamp: AtomicU64::new(opened.zero_stamp + 1),
            stopping: AtomicBool::new(false),
            draining: AtomicUsize::new(0),
            drained: AtomicBool::new(false),
            progress: (Mutex::new(()), Condvar::new()),
            pacing: Pacing::new(opts.pacing, capacity),
            fills: fill_tx,
            background,
        });
        let mut threads = Vec::new();
        if background {
            threads.push(fill::spawn(core.clone(), fill_rx));
        }
        if !core.read_only && background {
            threads.push(writeback::spawn(core.clone()));
            threads.push(gc::spawn(core.clone()));
        }
        Ok(CacheEngine {
            core,
            drain_on_shutdown: opts.drain_on_shutdown,
            threads: Mutex::new(threads),
        })
    }

    #[cfg(test)]
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Write back all dirty data and wait until the backing image holds every write
    /// acknowledged before the call.
    pub fn drain(&self) -> Result<(), EngineError> {
        self.core
            .drain()
            .map_err(|e| EngineError::failed("writing all dirty data back", e))
    }

    /// Stop the background threads without persisting anything, as if the process died here
    /// (the media keeps what was persisted so far).
    #[cfg(test)]
    pub(crate) fn shutdown_for_crash_test(&self) {
        self.core.stopping.store(true, Ordering::Release);
        self.core.segments.wake();
        self.core.log.wake_waiters();
        self.core.pacing.wake();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> StatsSnapshot {
        status::stats(&self.core)
    }

    /// The GC threshold in force.
    pub fn gc_percent(&self) -> u8 {
        self.core.meta.gc_percent()
    }

    /// The status fields and counters, read without stopping I/O (each field is current, the
    /// whole is not one atomic snapshot).
    pub fn status(&self) -> CacheStatus {
        status::status(&self.core)
    }

    /// Change the GC threshold (0..=90) and persist it in cache_info.
    pub fn set_gc_percent(&self, percent: u8) -> Result<(), EngineError> {
        status::set_gc_percent(&self.core, percent)
    }

    /// Persist every open kset, as a guest FLUSH does. A full log frees up as writeback and
    /// GC proceed, so this waits for room rather than failing.
    pub fn flush_log(&self) -> Result<(), EngineError> {
        self.core
            .persist_open_ksets()
            .map_err(|e| EngineError::failed("persisting the key log", e))
    }

    /// Enter drained mode, write everything back and flush the backing image (see
    /// `status.rs`). On error the cache stays in drained mode.
    pub fn drain_and_hold(&self) -> Result<(), EngineError> {
        status::drain_and_hold(&self.core)
    }

    /// Leave drained mode: writes complete as soon as the cache holds them again.
    pub fn leave_drained(&self) {
        status::leave_drained(&self.core)
    }

    /// Whether drained mode is on.
    pub fn drained(&self) -> bool {
        self.core.drained.load(Ordering::Acquire)
    }
}

impl Engine for CacheEngine {
    fn capacity(&self) -> u64 {
        self.core.backing.size()
    }

    fn read_only(&self) -> bool {
        self.core.read_only
    }

    fn max_queues(&self) -> usize {
        self.core.heads.len()
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn EngineQueue>, EngineError> {
        if index >= self.core.heads.len() {
            return Err(EngineError::Invalid(format!(
                "queue {index} requested, the cache was opened for {}",
                self.core.heads.len()
            )));
        }
        let q = CacheQueue::new(self.core.clone(), index)
            .map_err(|e| EngineError::failed(format!("opening queue {index}"), e))?;
        Ok(Box::new(q))
    }

    fn set_write_cache(&self, enabled: bool) {
        let was = self.core.write_cache.swap(enabled, Ordering::AcqRel);
        if was && !enabled {
            // Writes completed while the cache was on become durable now, as if flushed: a
            // guest that switched to write-through sends no more FLUSH, so the switch is not
            // done until they are. A full log frees up as writeback and GC proceed.
            if let Err(e) = self.core.persist_open_ksets() {
                log::error!(
                    "turning the write cache off: open ksets not persisted: {}",
                    ErrorChain(&e)
                );
            }
        }
        log::info!(
            "guest set write cache {}",
            if enabled { "on" } else { "off" }
        );
    }

    fn write_cache(&self) -> bool {
        self.core.write_cache.load(Ordering::Acquire)
    }

    fn shutdown(&self) -> Result<(), EngineError> {
        if self.drain_on_shutdown && !self.core.read_only {
            log::info!("writing all dirty data back before exit");
            self.core
                .drain()
                .map_err(|e| EngineError::failed("writing all dirty data back", e))?;
            self.core
                .backing
                .flush()
                .map_err(|e| EngineError::io("flushing the backing image", e))?;
            log::info!("the backing image holds all data");
        }
        self.core
            .close_all_ksets()
            .map_err(|e| EngineError::failed("persisting the key log", e))?;
        self.core.stopping.store(true, Ordering::Release);
        self.core.segments.wake();
        self.core.log.wake_waiters();
        self.core.pacing.wake();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        for qid in 0..self.core.heads.len() {
            self.core.release_head(qid);
        }
        if let Some(journal) = self.core.log.journal() {
            // Every key of a completed write is on the log: nothing for a next start to apply.
            if let Err(e) = journal.remove() {
                log::warn!("{}", ErrorChain(&e));
            }
        }
        Ok(())
    }
}
