// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The cache engine as a whole: opening (format or replay), the shared core the request paths
//! work on, the background writeback and GC threads, and the [`Engine`] implementation.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::data_head::{Allocation, DataHead};
use super::fill::{self, Filled};
use super::format::{self, KeyRecord, Layout};
use super::health::Health;
use super::index::{CrcSpan, FillTicket, Index, IndexKey, KeyKind};
use super::log::{Log, LogError};
use super::media::{self, Media, MediaOptions, Persistence};
use super::meta::Meta;
use super::queue::CacheQueue;
use super::segments::{GenerationStore, SegmentMap};
use super::stats::Stats;
use super::{gc, replay, writeback, CachePos};
use crate::backing::BackingImage;
use crate::engine::{Engine, EngineError, EngineQueue};

/// How to open a cache.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The cache media: a devdax device, a file on a DAX file system, or an ordinary file.
    pub path: PathBuf,
    /// Size of the file to create when `path` does not exist.
    pub create_size: Option<u64>,
    /// Persistence mode; detected when `None`.
    pub persistence: Option<Persistence>,
    /// Checksum cached data (used when formatting; an existing cache keeps its setting unless
    /// this is `Some` and differs, which is an error).
    pub data_crc: Option<bool>,
    /// GC threshold in percent of segments used (0..=90); `None` keeps the stored value.
    pub gc_percent: Option<u8>,
    /// Number of queues, which is also the number of open ksets.
    pub queues: usize,
    /// Reformat the media even if it holds a cache.
    pub force_format: bool,
    /// Write back all dirty data in `shutdown` (`--drain-on-exit`).
    pub drain_on_shutdown: bool,
}

/// Errors opening a cache. The variants with a `source` do not repeat it in their message:
/// `{:#}` of an error chain prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache media {path}")]
    Media {
        path: PathBuf,
        #[source]
        source: media::MediaError,
    },
    #[error("cache {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: format::FormatError,
    },
    #[error("cache {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cache {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// State shared by the queues and the background threads.
pub(crate) struct Core {
    pub media: Arc<dyn Media>,
    pub layout: Layout,
    pub meta: Meta,
    pub segments: SegmentMap,
    pub index: Index,
    pub log: Log,
    pub heads: Vec<Mutex<DataHead>>,
    pub backing: Arc<BackingImage>,
    pub data_crc: bool,
    pub read_only: bool,
    pub write_cache: AtomicBool,
    pub stats: Stats,
    /// Losses and stalls of the background work, for `status`.
    pub health: Health,
    /// The next zeroes key's stamp. Zeroes keys have no segment, so their generation field
    /// carries a number unique to each instead, letting GC drop exactly the index entries of
    /// the zeroes keys it reclaims.
    pub zero_stamp: AtomicU64,
    /// Set when the engine shuts down; background threads stop.
    pub stopping: AtomicBool,
    /// Callers of `drain` in progress; writeback does not pause between ksets while any wait.
    pub draining: AtomicUsize,
    /// Drained mode (`ctl drain` until `ctl undrain`): writes complete only once written back,
    /// and writeback runs without pauses. See `status.rs`.
    pub drained: AtomicBool,
    /// Signalled whenever writeback moved dirty_tail.
    progress: (Mutex<()>, Condvar),
    /// Read fills on their way to the fill thread.
    fills: std::sync::mpsc::Sender<Filled>,
    /// Writeback, GC and fill threads run and open ksets close on their timer. Off only in
    /// tests that step writeback and GC themselves, so a seeded run repeats exactly.
    background: bool,
}

impl GenerationStore for Meta {
    fn store_gen(&self, seg: u32, gen: u64) -> Result<(), format::FormatError> {
        Meta::store_gen(self, seg, gen)
    }
}

impl Core {
    /// Writeback moved dirty_tail: wake `drain`.
    pub fn writeback_progress(&self) {
        let _g = self.progress.0.lock().unwrap();
        self.progress.1.notify_all();
        if self.drained.load(Ordering::Acquire) {
            // Queues hold drained-mode writes until dirty_tail passes them.
            self.segments.wake();
        }
    }

    /// Whether writeback should run flat out (a `drain` waits, or drained mode is on).
    pub fn writeback_unpaced(&self) -> bool {
        self.draining.load(Ordering::Acquire) > 0 || self.drained.load(Ordering::Acquire)
    }

    /// Write back everything acknowledged so far and wait until the backing image holds it.
    pub fn drain(&self) -> Result<(), String> {
        self.draining.fetch_add(1, Ordering::AcqRel);
        let result = self.drain_inner();
        self.draining.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn drain_inner(&self) -> Result<(), String> {
        // Every completed write's key must be on the log before writeback can see it; a full
        // log frees up as writeback and GC proceed.
        loop {
            match self.close_all_ksets() {
                Ok(()) => break,
                Err(LogError::NoSpace) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e.to_string()),
            }
            if self.stopping.load(Ordering::Acquire) {
                return Err("the engine is shutting down".into());
            }
        }
        let target = self.log.head().seq;
        let mut g = self.progress.0.lock().unwrap();
        while self.meta.dirty_tail().log_seq < target {
            if self.stopping.load(Ordering::Acquire) {
                return Err("the engine is shutting down".into());
            }
            if self.read_only {
                return Err("the cache is open read-only, so nothing is written back".into());
            }
            g = self
                .progress
                .1
                .wait_timeout(g, Duration::from_millis(200))
                .unwrap()
                .0;
        }
        Ok(())
    }

    fn data_size(&self) -> u32 {
        self.layout.data_size()
    }

    /// Media offset of cache position `pos`.
    pub fn media_offset(&self, pos: CachePos) -> u64 {
        self.layout.media_offset(pos)
    }

    /// Address of `len` bytes of cached data at `pos`. Positions come from the index or the
    /// allocator, which only hold validated ones; a bad one is a bug, not bad input.
    pub fn data_ptr(&self, pos: CachePos, len: u32) -> *mut u8 {
        self.media
            .slice_ptr(self.media_offset(pos), len as u64)
            .expect("cache position inside the media")
    }

    /// Start persisting cached data (durable after the caller's fence).
    pub fn persist_data(&self, pos: CachePos, len: u32) {
        if let Err(e) = self.media.persist(self.media_offset(pos), len as u64) {
            log::error!("persisting cache data failed: {e}");
        }
    }

    /// Data CRC of `len` bytes at `pos`, or 0 when data CRC is off.
    pub fn crc_of(&self, pos: CachePos, len: u32) -> u32 {
        if !self.data_crc {
            return 0;
        }
        let mut buf = vec![0u8; len as usize];
        match self.media.read(self.media_offset(pos), &mut buf) {
            Ok(()) => format::data_crc(&buf),
            Err(_) => 0,
        }
    }

    /// Allocate cache space from queue `qid`'s data head. The returned space is pinned.
    pub fn alloc_data(
        &self,
        qid: usize,
        len: u32,
        exact: bool,
    ) -> Result<Option<Allocation>, String> {
        let mut head = self.heads[qid].lock().unwrap();
        head.alloc(len, exact, self.data_size(), &self.segments, &self.meta)
    }

    /// Decode the kset at `at` (a tail position), which must carry `at.log_seq`.
    pub fn read_kset(&self, at: format::TailPos) -> Result<format::Kset, format::FormatError> {
        let avail = (self.layout.data_size() - at.pos.off).min(format::KSET_MAX_SIZE as u32);
        let mut buf = vec![0u8; avail as usize];
        self.media.read(self.media_offset(at.pos), &mut buf)?;
        self.log.codec().decode_kset(&buf, at.log_seq)
    }

    /// Drop a pin taken by [`Core::alloc_data`].
    pub fn unpin(&self, seg: u32) {
        if let Err(e) = self.segments.put(seg, &self.meta) {
            log::error!("cannot persist the generation of segment {seg}: {e}");
        }
    }

    /// Give up queue `qid`'s data head (the queue is going away).
    pub fn release_head(&self, qid: usize) {
        let mut head = self.heads[qid].lock().unwrap();
        if let Err(e) = head.release(&self.segments, &self.meta) {
            log::error!("cannot release data head of queue {qid}: {e}");
        }
    }

    /// Put a new key in the index and, under the same region lock, in the log: so the log
    /// holds the versions of every block in index order.
    pub fn insert_and_log(&self, mut rec: KeyRecord) {
        if rec.flags & format::KEY_ZEROES != 0 {
            rec.gen = self.zero_stamp.fetch_add(1, Ordering::Relaxed);
        }
        let key = index_key(&rec, true);
        if rec.flags & format::KEY_CLEAN == 0 {
            self.stats
                .dirty_bytes
                .fetch_add(rec.len as u64, Ordering::Relaxed);
        }
        let mut full = false;
        self.index.insert(key, &mut |_| {
            if rec.flags & format::KEY_ZEROES == 0 {
                self.segments.get(rec.seg);
            }
            full |= self.log.append(rec);
        });
        if full {
            self.close_full_kset(rec.off);
        }
    }

    /// Hand a fill to the fill thread, which makes it durable and logs it.
    pub fn commit_fill(&self, f: Filled) {
        if !self.background {
            // Stepped tests: on the caller's thread, so the media events stay in one order.
            fill::commit(self, vec![f], true);
            return;
        }
        let sent = self.fills.send(f);
        if let Err(std::sync::mpsc::SendError(f)) = sent {
            // The engine is shutting down: the data is just not cached.
            self.index.abort_fill(f.ticket);
            self.unpin(f.pos.seg);
        }
    }

    /// Replace what is left of a fill's placeholder with clean keys, logged as such.
    pub fn complete_fill(&self, ticket: FillTicket, pos: CachePos, len: u32) {
        let gen = self.segments.gen(pos.seg);
        let crc = CrcSpan {
            pos,
            len,
            crc: self.crc_of(pos, len),
        };
        let mut full = None;
        self.index
            .complete_fill(ticket, pos, gen, crc, &mut |k: &IndexKey| {
                self.segments.get(k.pos.seg);
                let filled = self.log.append(KeyRecord {
                    off: k.off,
                    len: k.len,
                    flags: format::KEY_CLEAN,
                    seg: k.pos.seg,
                    seg_off: k.pos.off,
                    gen: k.gen,
                    data_crc: self.crc_of(k.pos, k.len),
                });
                if filled {
                    full = Some(k.off);
                }
            });
        if let Some(off) = full {
            self.close_full_kset(off);
        }
    }

    /// Close a kset that filled up, outside the index region lock its key was added under.
    fn close_full_kset(&self, off: u64) {
        if let Err(e) = self.log.close_full(off, &*self.media, &self.segments) {
            log::debug!("full kset stays open for now: {e}");
        }
    }

    pub fn close_kset_for(&self, off: u64) -> Result<(), LogError> {
        self.log.close_for(off, &*self.media, &self.segments)
    }

    pub fn close_all_ksets(&self) -> Result<(), LogError> {
        self.log.close_all(&*self.media, &self.segments)
    }

    /// Whether background threads run (off in stepped tests).
    pub fn background(&self) -> bool {
        self.background
    }

    /// Persist every open kset, waiting for log room as long as the engine runs. A media
    /// error is retried too: nothing else can make those writes durable.
    pub fn persist_open_ksets(&self, why: &str) {
        let mut warned = false;
        let started = std::time::Instant::now();
        loop {
            match self.close_all_ksets() {
                Ok(()) => return,
                Err(e) => {
                    // Stepped tests have no writeback or GC thread to free room: unless
                    // another thread of the test does within a while, nothing will.
                    let hopeless = !self.background && started.elapsed() > Duration::from_secs(2);
                    if self.stopping.load(Ordering::Acquire) || hopeless {
                        log::error!("{why}: open ksets not persisted: {e}");
                        return;
                    }
                    if !warned {
                        log::warn!("{why}: waiting to persist the open ksets: {e}");
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn close_aged_ksets(&self) -> Result<(), LogError> {
        if !self.background {
            return Ok(());
        }
        self.log.close_aged(&*self.media, &self.segments)
    }
}

/// The in-memory key for an on-media key record.
pub(crate) fn index_key(rec: &KeyRecord, dirty: bool) -> IndexKey {
    let pos = CachePos {
        seg: rec.seg,
        off: rec.seg_off,
    };
    let kind = if rec.flags & format::KEY_ZEROES != 0 {
        KeyKind::Zeroes
    } else if rec.flags & format::KEY_CLEAN != 0 || !dirty {
        KeyKind::Clean
    } else {
        KeyKind::Dirty
    };
    IndexKey {
        off: rec.off,
        len: rec.len,
        kind,
        pos,
        gen: rec.gen,
        crc: CrcSpan {
            pos,
            len: rec.len,
            crc: rec.data_crc,
        },
    }
}

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
    ) -> Result<bool, String> {
        writeback::step(&self.core, queue)
    }

    /// Collect one kset if GC is due (what one turn of the GC thread does).
    #[cfg(test)]
    pub(crate) fn gc_step(&self) -> Result<bool, String> {
        gc::collect_one(&self.core)
    }

    fn open_inner(
        opts: &CacheOptions,
        media: Arc<dyn Media>,
        backing: Arc<BackingImage>,
        background: bool,
    ) -> Result<CacheEngine, CacheError> {
        let opened = replay::open(opts, media.clone(), &backing)?;
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
        self.core.drain().map_err(EngineError::Invalid)
    }

    /// Stop the background threads without persisting anything, as if the process died here
    /// (the media keeps what was persisted so far).
    #[cfg(test)]
    pub(crate) fn shutdown_for_crash_test(&self) {
        self.core.stopping.store(true, Ordering::Release);
        self.core.segments.wake();
        self.core.log.wake_waiters();
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> super::stats::StatsSnapshot {
        let free = self.core.segments.free_count();
        super::stats::StatsSnapshot {
            segments_used: self.core.segments.count() - free,
            segments_free: free,
            ..self.core.stats.snapshot()
        }
    }

    /// The GC threshold in force.
    pub fn gc_percent(&self) -> u8 {
        self.core.meta.gc_percent()
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
        let q = CacheQueue::new(self.core.clone(), index).map_err(EngineError::Invalid)?;
        Ok(Box::new(q))
    }

    fn set_write_cache(&self, enabled: bool) {
        let was = self.core.write_cache.swap(enabled, Ordering::AcqRel);
        if was && !enabled {
            // Writes completed while the cache was on become durable now, as if flushed: a
            // guest that switched to write-through sends no more FLUSH, so the switch is not
            // done until they are. A full log frees up as writeback and GC proceed.
            self.core.persist_open_ksets("turning the write cache off");
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
            self.core.drain().map_err(EngineError::Invalid)?;
            self.core
                .backing
                .flush()
                .map_err(|e| EngineError::io("flushing the backing image", e))?;
            log::info!("the backing image holds all data");
        }
        self.core
            .close_all_ksets()
            .map_err(|e| EngineError::Invalid(format!("persisting the key log: {e}")))?;
        self.core.stopping.store(true, Ordering::Release);
        self.core.segments.wake();
        self.core.log.wake_waiters();
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
        for qid in 0..self.core.heads.len() {
            self.core.release_head(qid);
        }
        Ok(())
    }
}
