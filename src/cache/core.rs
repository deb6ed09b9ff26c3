// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine's shared state (dm-pcache's `struct pcache_cache` in cache.h): the options a
//! cache is opened with, the [`Core`] every queue and background thread works on, and the
//! operations on it that several of them share (allocation, logging keys, persisting the
//! open ksets, waiting for writeback). The lifecycle (open, threads, shutdown) is in
//! `engine.rs`, which depends on this file and on the workers; nothing here depends on them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::data_head::{Allocation, DataHead, ReleaseError};
use super::format::{self, KeyRecord, Layout};
use super::health::Health;
use super::index::{CrcSpan, FillTicket, Index, IndexKey, KeyKind};
use super::log::{Log, LogError};
use super::media::{self, Media, Persistence};
use super::meta::Meta;
use super::pacing::{Pacing, PacingOptions};
use super::segments::SegmentMap;
use super::stats::Stats;
use super::CachePos;
use crate::backing::BackingImage;
use crate::engine::ErrorChain;
use crate::sync::lock;

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
    /// Directory of the process-kill journal (see `journal`), normally
    /// [`super::journal::default_dir`]; `None`: no journal, so a kill loses the completed
    /// writes whose keys wait in open ksets.
    pub journal_dir: Option<PathBuf>,
    /// When writeback runs (watermarks, guest idle period).
    pub pacing: PacingOptions,
}

/// Errors opening a cache. The variants with a `source` do not repeat it in their message:
/// `{:#}` of an error chain prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    // The media error names the path itself; saying it here too printed it twice.
    #[error("cache media")]
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

/// Why [`Core::drain`] could not wait until the backing image holds every write.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the cache is open read-only, so nothing is written back")]
    ReadOnly,
    #[error("persisting the open ksets")]
    Log(#[source] LogError),
}

/// Backing data already copied into the cache (and to the guest), to be made durable and
/// logged as a clean key by the fill thread (`fill.rs`).
pub(crate) struct Filled {
    pub ticket: FillTicket,
    pub pos: CachePos,
    pub len: u32,
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
    pub(super) progress: (Mutex<()>, Condvar),
    /// When writeback runs; woken when room runs short or a drain starts.
    pub(super) pacing: Pacing,
    /// Read fills on their way to the fill thread.
    pub(super) fills: std::sync::mpsc::Sender<Filled>,
    /// Writeback, GC and fill threads run and open ksets close on their timer. Off only in
    /// tests that step writeback and GC themselves, so a seeded run repeats exactly.
    pub(super) background: bool,
}

impl Core {
    /// Writeback moved dirty_tail: wake `drain`, and GC when writes wait for room.
    pub fn writeback_progress(&self) {
        let _g = lock(&self.progress.0);
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
    pub fn drain(&self) -> Result<(), DrainError> {
        self.draining.fetch_add(1, Ordering::AcqRel);
        self.pacing.wake();
        let result = self.drain_inner();
        self.draining.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn drain_inner(&self) -> Result<(), DrainError> {
        // Every completed write's key must be on the log before writeback can see it.
        self.persist_open_ksets().map_err(DrainError::Log)?;
        let target = self.log.head().seq;
        let mut g = lock(&self.progress.0);
        while self.meta.dirty_tail().log_seq < target {
            if self.stopping.load(Ordering::Acquire) {
                return Err(DrainError::ShuttingDown);
            }
            if self.read_only {
                return Err(DrainError::ReadOnly);
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

    /// Data CRC of `len` bytes at `pos`, or 0 when data CRC is off.
    pub fn crc_of(&self, pos: CachePos, len: u32) -> u32 {
        self.crc_with(pos, len, &mut Vec::new())
    }

    /// [`Core::crc_of`], reading the data into `buf` (a buffer its caller reuses, so a
    /// thread that checks CRCs allocates only while the buffer grows).
    pub fn crc_with(&self, pos: CachePos, len: u32, buf: &mut Vec<u8>) -> u32 {
        if !self.data_crc {
            return 0;
        }
        buf.resize(len as usize, 0);
        match self.media.read(self.media_offset(pos), buf) {
            Ok(()) => format::data_crc(buf),
            Err(_) => 0,
        }
    }

    /// Allocate cache space from queue `qid`'s data head. The returned space is pinned.
    pub fn alloc_data(
        &self,
        qid: usize,
        len: u32,
        exact: bool,
    ) -> Result<Option<Allocation>, ReleaseError> {
        let mut head = lock(&self.heads[qid]);
        head.alloc(len, exact, self.data_size(), &self.segments, &self.meta)
    }

    /// Read the kset at `at` (a tail position), which must carry `at.log_seq`, into `bytes`
    /// and decode its keys into `keys`. Writeback and GC read kset after kset through the
    /// same two vectors, so once grown they allocate nothing per kset (with a FLUSH after
    /// every guest write each kset holds one key: an allocation per kset was one per write).
    pub fn read_kset_into(
        &self,
        at: format::TailPos,
        bytes: &mut Vec<u8>,
        keys: &mut Vec<KeyRecord>,
    ) -> Result<format::KsetFound, format::FormatError> {
        let avail = (self.layout.data_size() - at.pos.off).min(format::KSET_MAX_SIZE as u32);
        bytes.resize(avail as usize, 0);
        self.media.read(self.media_offset(at.pos), bytes)?;
        self.log.codec().decode_kset_into(bytes, at.log_seq, keys)
    }

    /// Drop a pin taken by [`Core::alloc_data`].
    pub fn unpin(&self, seg: u32) {
        if let Err(e) = self.segments.put(seg, &self.meta) {
            log::error!("cannot persist the generation of segment {seg}: {e}");
        }
    }

    /// Give up queue `qid`'s data head (the queue is going away).
    pub fn release_head(&self, qid: usize) {
        let mut head = lock(&self.heads[qid]);
        if let Err(e) = head.release(&self.segments, &self.meta) {
            log::error!(
                "cannot release data head of queue {qid}: {}",
                ErrorChain(&e)
            );
        }
    }

    /// Put a new key in the index and, under the same region lock, in the log: so the log
    /// holds the versions of every block in index order. False when the process-kill journal
    /// had no room for it: its write must not complete before its kset is on the log.
    pub fn insert_and_log(&self, rec: KeyRecord) -> bool {
        self.insert_logged(rec, false)
    }

    /// [`Core::insert_and_log`] for a data key of a batch of staged writes: its space is
    /// pinned ([`Core::alloc_data`]) and its bytes were counted dirty with the whole batch's
    /// ([`Core::count_dirty`]: one update of the shared counter per batch, not per key). The
    /// pin becomes the logged key's reference on its segment, instead of a new reference taken
    /// and the pin dropped (two atomic updates fewer per write); it is gone either way when
    /// this returns.
    pub fn insert_and_log_staged(&self, rec: KeyRecord) -> bool {
        self.insert_logged(rec, true)
    }

    /// Count `len` bytes of new dirty keys, waking writeback if that crosses the high
    /// watermark.
    pub fn count_dirty(&self, len: u64) {
        let before = self.stats.dirty_bytes.fetch_add(len, Ordering::Relaxed);
        self.pacing.dirty_added(before, len);
    }

    fn insert_logged(&self, mut rec: KeyRecord, staged: bool) -> bool {
        debug_assert!(
            !staged || rec.flags & (format::KEY_ZEROES | format::KEY_CLEAN) == 0,
            "a staged key is dirty data"
        );
        if rec.flags & format::KEY_ZEROES != 0 {
            rec.gen = self.zero_stamp.fetch_add(1, Ordering::Relaxed);
        }
        let key = index_key(&rec, true);
        if rec.flags & format::KEY_CLEAN == 0 && !staged {
            self.count_dirty(rec.len as u64);
        }
        let mut pinned = staged;
        let mut full = false;
        let mut journaled = true;
        self.index.insert(key, &mut |_| {
            if rec.flags & format::KEY_ZEROES == 0 && !std::mem::take(&mut pinned) {
                self.segments.get(rec.seg);
            }
            let appended = self.log.append(rec);
            full |= appended.full;
            journaled &= appended.journaled;
        });
        if pinned {
            // The index logged no part of it (it never does so for a key inside one region).
            self.unpin(rec.seg);
        }
        if full {
            self.close_full_kset(rec.off);
        }
        journaled
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
                // A clean key the journal has no room for may be lost: the data is on the
                // backing image.
                if filled.full {
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
            log::debug!("full kset stays open for now: {}", ErrorChain(&e));
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

    /// Persist every open kset, waiting for log room while the engine runs: a full log frees
    /// up as writeback and GC proceed. The one policy of every caller that needs the keys of
    /// completed writes on the media (FLUSH from the control socket, drain, the guest turning
    /// its write cache off): lack of room is waited for, anything else is the caller's error.
    pub fn persist_open_ksets(&self) -> Result<(), LogError> {
        let started = Instant::now();
        let mut warned = false;
        loop {
            let e = match self.close_all_ksets() {
                Ok(()) => return Ok(()),
                Err(e @ LogError::NoSpace) => e,
                Err(e) => return Err(e),
            };
            // Stepped tests have no writeback or GC thread to free room: unless another
            // thread of the test does within a while, nothing will.
            let hopeless = !self.background && started.elapsed() > Duration::from_secs(2);
            if self.stopping.load(Ordering::Acquire) || hopeless {
                return Err(e);
            }
            if !warned {
                log::warn!("waiting for room in the key log to persist the open ksets");
                warned = true;
            }
            std::thread::sleep(Duration::from_millis(10));
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

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::super::data_head::ReleaseError;
    use super::super::gc::GcError;
    use super::super::media::MediaError;
    use super::super::queue::QueueError;
    use super::super::writeback::WritebackError;
    use super::*;
    use crate::engine::{EngineError, ErrorChain, IoError};

    fn io() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    fn format_error() -> format::FormatError {
        format::FormatError::InvalidArgument("bad value".into())
    }

    /// Every error of the engine that has a source leaves it out of its own message, so the
    /// chain (`{:#}` in the binary, `ErrorChain` in log lines) shows each cause exactly once.
    #[test]
    fn no_error_repeats_its_source() {
        let media = || MediaError::OutOfRange {
            offset: 1,
            len: 2,
            media_len: 3,
        };
        let errors: Vec<Box<dyn Error + Send + Sync>> = vec![
            Box::new(LogError::Media(media())),
            Box::new(LogError::Encode {
                keys: 3,
                source: format_error(),
            }),
            Box::new(DrainError::Log(LogError::Media(media()))),
            Box::new(ReleaseError {
                seg: 4,
                source: format_error(),
            }),
            Box::new(WritebackError::BackingFlush(io())),
            Box::new(WritebackError::BackingWrite {
                len: 512,
                offset: 0,
                source: io(),
            }),
            Box::new(WritebackError::StoreTail(format_error())),
            Box::new(GcError::StoreKeyTail(format_error())),
            Box::new(GcError::Free {
                kind: "data",
                seg: 1,
                source: format_error(),
            }),
            Box::new(QueueError::EventFd(io())),
            Box::new(IoError::Backing(io())),
            Box::new(IoError::Media(Box::new(media()))),
            Box::new(EngineError::io("flushing the backing image", io())),
            Box::new(EngineError::failed(
                "persisting the key log",
                LogError::Media(media()),
            )),
        ];
        for e in &errors {
            let source = e.source().expect("each has a source").to_string();
            assert!(
                !e.to_string().contains(&source),
                "{e} repeats its source {source}"
            );
            let shown = ErrorChain(e.as_ref()).to_string();
            assert_eq!(shown.matches(&source).count(), 1, "{shown}");
        }
    }
}
