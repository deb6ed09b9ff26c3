// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The key log: open ksets in memory, and closing them onto the media at key_head.
//!
//! There is one open kset per queue in count, and a key goes to the kset of its 4 MiB region
//! (`region % n`), never to its submitter's: so every version of one block reaches the log in
//! the order the index saw them, which replay and writeback rely on. The caller appends while
//! holding the index region lock, and closes after releasing it (lock order: index region →
//! open kset; closing kset → open kset, closing kset → head → segment map).
//!
//! A close takes the open kset's keys out under its short lock, so writers go on appending
//! while the close does its I/O; a second lock per kset keeps closes of one kset in order.
//! In msync mode (group commit) the close first syncs the cached data every key names, with
//! one msync for the whole set, so a kset on the media never names data that a crash could
//! lose. Closing writes the keys at key_head as one or more ksets of at most 128 keys, each
//! followed by a zeroed header, carrying the next log sequence number and fenced before the
//! next one is written (replay relies on only the newest kset ever being torn). When a log
//! segment cannot hold
//! the next kset plus a LAST kset, a LAST kset chains to a fresh log segment. If no segment is
//! free the keys stay in memory and the close is retried later; writes are held back by the
//! data-segment reserve long before that can starve the log.
//!
//! With a process-kill journal attached, every key appended is also recorded there, and every
//! kset written is announced to it before and confirmed after (see `journal`), so a daemon
//! restarted after a kill finds the keys that completed writes left in open ksets.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::format::{self, KeyRecord, KsetCodec};
use super::journal::Journal;
use super::media::{Media, MediaError, Persistence, FOLIO_SIZE};
use super::segments::{SegmentKind, SegmentMap};
use super::{CachePos, REGION_SHIFT};
use crate::engine::ErrorChain;
use crate::sync::lock;

/// Ksets are closed at least this often while they hold keys (dm-pcache's delayed flush).
pub const KSET_MAX_AGE: Duration = Duration::from_secs(1);

/// How many ksets' locks a close holds without a heap allocation: a FLUSH closes every kset
/// (one per queue), so devices with up to this many queues close without allocating.
const INLINE_CLOSING_KSETS: usize = 16;

/// Why a close did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("no free segment to extend the key log")]
    NoSpace,
    #[error("cache media error while writing the key log")]
    Media(#[source] MediaError),
    /// The keys could not be encoded as a kset (a key the format cannot hold: a bug).
    #[error("encoding a kset of {keys} keys")]
    Encode {
        keys: usize,
        #[source]
        source: format::FormatError,
    },
}

#[derive(Default)]
struct OpenKset {
    keys: Vec<KeyRecord>,
    /// When the oldest key still waiting here was appended.
    since: Option<Instant>,
    /// Keys at the front that a committer's close left here because their data shares a
    /// page-cache folio with a data head ([`Log::run_committer`]): the kset counts as full
    /// again only once a whole kset of keys came after them.
    deferred: usize,
}

/// One open kset: the keys writers append to, and the lock that orders its closes (holding
/// the spare vector the keys are swapped into, so steady state allocates nothing).
#[derive(Default)]
struct KsetSlot {
    open: Mutex<OpenKset>,
    closing: Mutex<Vec<KeyRecord>>,
}

/// Msync mode: committer threads close full ksets, so the writer whose key filled one does
/// not wait for the syncs. Every committer serves every kset: a key goes to the kset of its
/// region, not of its queue, so a kset must not depend on its own queue being started.
#[derive(Default)]
struct Committers {
    state: Mutex<CommitState>,
    wake: Condvar,
}

#[derive(Default)]
struct CommitState {
    /// Committer threads running.
    attached: usize,
    /// Per kset: a close was asked for since a committer last started one.
    wanted: Vec<bool>,
}

impl CommitState {
    fn any_wanted(&self) -> bool {
        self.wanted.contains(&true)
    }
}

/// Keys a full kset may hold while it waits for its committer; beyond that the writer closes
/// it itself (back-pressure when the media cannot keep up). A close of one device flush per
/// kset can take tens of milliseconds on a busy disk: at 8 ksets the writers of two queues
/// fell back to closing themselves (50 ms p99 at 50k writes/s); 64 ksets absorb that. Its
/// log space, 64 queues x 8,192 keys x 40 bytes = 20 MiB, stays within the log reserve (two
/// 16 MiB segments).
const COMMIT_BACKLOG: usize = 64 * format::KSET_MAX_KEYS;

/// Which data a close makes durable before writing the keys that name it (msync mode).
#[derive(Clone, Copy)]
enum SyncScope<'a> {
    /// Every key taken: FLUSH, write cache off, the age limit, a writer closing itself.
    All,
    /// A committer's close: the keys of each kset up to the first one whose data ends inside
    /// the folio a data head (at these positions) still writes into; the rest stay open.
    /// Syncing that folio now would clean it, the head's next write would dirty all of it
    /// again, and the next sync would write the whole folio once more.
    WholeFolios(&'a [CachePos]),
}

/// What [`Log::append`] did with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The kset is full and should be closed (after the caller released the index region
    /// lock).
    pub full: bool,
    /// A kill cannot lose the key: it is in the journal, or there is no journal to keep it.
    /// False when the journal had no room: the write must wait until its kset is on the log.
    pub journaled: bool,
}

/// Position of the next kset and the sequence number it will carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHead {
    pub pos: CachePos,
    pub seq: u64,
}

pub struct Log {
    ksets: Vec<KsetSlot>,
    committers: Committers,
    /// `0..ksets.len()`, the indices `close_all` closes.
    all_ksets: Vec<usize>,
    head: Mutex<LogHead>,
    /// Locked only while `head` is held, right after it.
    scratch: Mutex<CloseScratch>,
    /// Signalled after every close, for writeback waiting on new ksets.
    closed: Condvar,
    layout: format::Layout,
    codec: KsetCodec,
    /// The process-kill journal, when the cache has one.
    journal: Option<Journal>,
    /// Keys appended while the journal's ring for their kset was full ([`Log::journal_full`]).
    journal_full: AtomicU64,
}

/// Buffers every kset close reuses (behind `Log::scratch`), so a close allocates nothing once
/// they have grown (its list of kset locks is inline).
#[derive(Default)]
struct CloseScratch {
    /// Per kset being closed, the journal index of its next key to be written.
    next: Vec<u64>,
    /// The keys of the kset being encoded.
    chunk: Vec<KeyRecord>,
    /// The journal marks of `chunk`: (kset, index after its last key in `chunk`).
    marks: Vec<(usize, u64)>,
    /// `chunk` encoded.
    buf: Vec<u8>,
}

impl Log {
    /// A log whose next kset goes at `head`; `n_ksets` is the number of queues.
    pub fn new(layout: format::Layout, codec: KsetCodec, head: LogHead, n_ksets: usize) -> Log {
        Log {
            ksets: (0..n_ksets.max(1)).map(|_| KsetSlot::default()).collect(),
            committers: Committers {
                state: Mutex::new(CommitState {
                    attached: 0,
                    wanted: vec![false; n_ksets.max(1)],
                }),
                wake: Condvar::new(),
            },
            all_ksets: (0..n_ksets.max(1)).collect(),
            head: Mutex::new(head),
            scratch: Mutex::new(CloseScratch::default()),
            closed: Condvar::new(),
            layout,
            codec,
            journal: None,
            journal_full: AtomicU64::new(0),
        }
    }

    /// Attach (or detach) the process-kill journal. Only while the log is not shared yet: a
    /// new journal must already hold the keys of the open ksets ([`Log::open_keys`]).
    pub fn set_journal(&mut self, journal: Option<Journal>) {
        self.journal = journal;
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Keys appended so far that the journal had no room for (its ring for their kset was
    /// full, the log being that far behind): each made its writer close the open ksets at
    /// once, and held its write until that succeeded. Counted per key, which is per write for
    /// writes within one 4 MiB region.
    pub fn journal_full(&self) -> u64 {
        self.journal_full.load(Ordering::Relaxed)
    }

    /// The keys waiting in each open kset, oldest first.
    pub fn open_keys(&self) -> Vec<Vec<KeyRecord>> {
        self.ksets
            .iter()
            .map(|k| lock(&k.open).keys.clone())
            .collect()
    }

    /// Number of open ksets.
    pub fn kset_count(&self) -> usize {
        self.ksets.len()
    }

    pub fn head(&self) -> LogHead {
        *lock(&self.head)
    }

    /// Which kset a key at backing offset `off` belongs to.
    pub fn kset_for(&self, off: u64) -> usize {
        ((off >> REGION_SHIFT) % self.ksets.len() as u64) as usize
    }

    /// Add a key to its region's kset, and to the journal.
    pub fn append(&self, key: KeyRecord) -> Appended {
        let idx = self.kset_for(key.off);
        let mut k = lock(&self.ksets[idx].open);
        k.keys.push(key);
        k.since.get_or_insert_with(Instant::now);
        // Under the open kset's lock: the journal's entries of a slot follow its keys' order.
        let journaled = self.journal.as_ref().map_or(true, |j| j.append(idx, &key));
        if !journaled {
            self.journal_full.fetch_add(1, Ordering::Relaxed);
        }
        Appended {
            full: k.keys.len() >= k.deferred + format::KSET_MAX_KEYS,
            journaled,
        }
    }

    /// A key appended for backing offset `off` filled its kset: have a committer close it, or
    /// close it here when no committer runs or the kset is too far behind.
    pub fn close_full(
        &self,
        off: u64,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        let idx = self.kset_for(off);
        let mut c = lock(&self.committers.state);
        if c.attached > 0 && lock(&self.ksets[idx].open).keys.len() < COMMIT_BACKLOG {
            if !c.wanted[idx] {
                c.wanted[idx] = true;
                self.committers.wake.notify_one();
            }
            return Ok(());
        }
        drop(c);
        self.close(idx, media, segments)
    }

    /// Count a committer as running before its thread starts, so a kset that fills meanwhile
    /// already waits for it. Each call is matched by one [`Log::run_committer`] (which undoes
    /// it when it returns) or one [`Log::detach_committer`].
    pub fn attach_committer(&self) {
        lock(&self.committers.state).attached += 1;
    }

    /// Undo [`Log::attach_committer`] for a committer that could not be started.
    pub fn detach_committer(&self) {
        lock(&self.committers.state).attached -= 1;
    }

    /// Serve as an attached committer until `stop` is set (and [`Log::wake_committers`]
    /// called): close the ksets [`Log::close_full`] asked for, all those waiting together, so
    /// their data costs one sync. `data_heads` fills in where the data heads are; the keys
    /// whose data lies in a folio a head has not left yet stay open for a later close (or
    /// the next FLUSH, or the age limit), so each folio of data is written back once.
    pub fn run_committer(
        &self,
        stop: &AtomicBool,
        media: &dyn Media,
        segments: &SegmentMap,
        data_heads: &dyn Fn(&mut Vec<CachePos>),
    ) {
        let mut idxs = Vec::with_capacity(self.ksets.len());
        let mut heads = Vec::new();
        loop {
            let mut c = lock(&self.committers.state);
            while !c.any_wanted() && !stop.load(Ordering::Acquire) {
                c = self
                    .committers
                    .wake
                    .wait_timeout(c, KSET_MAX_AGE)
                    .unwrap()
                    .0;
            }
            if stop.load(Ordering::Acquire) {
                c.attached -= 1;
                if c.any_wanted() {
                    // The wake-up may have been meant for a committer that goes on.
                    self.committers.wake.notify_one();
                }
                return;
            }
            idxs.clear();
            for (i, w) in c.wanted.iter_mut().enumerate() {
                if std::mem::take(w) {
                    idxs.push(i);
                }
            }
            drop(c);
            // Before any kset lock: a writer may hold its head while it appends.
            heads.clear();
            data_heads(&mut heads);
            let scope = SyncScope::WholeFolios(&heads);
            if let Err(e) = self.close_set(&idxs, scope, media, segments) {
                log::debug!("ksets {idxs:?} stay open for now: {}", ErrorChain(&e));
            }
        }
    }

    /// Wake every committer, so one whose stop flag is set returns.
    pub fn wake_committers(&self) {
        let _c = lock(&self.committers.state);
        self.committers.wake.notify_all();
    }

    /// Persist kset `idx` if it holds keys.
    pub fn close(
        &self,
        idx: usize,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        self.close_set(&[idx], SyncScope::All, media, segments)
    }

    /// Persist every kset that holds keys (FLUSH, write cache off, shutdown): their keys go out
    /// together, so a FLUSH costs one data sync and one fence per 128 keys, not per queue.
    pub fn close_all(&self, media: &dyn Media, segments: &SegmentMap) -> Result<(), LogError> {
        self.close_set(&self.all_ksets, SyncScope::All, media, segments)
    }

    /// Persist the kset holding keys for backing offset `off`.
    pub fn close_for(
        &self,
        off: u64,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        self.close(self.kset_for(off), media, segments)
    }

    /// Persist the ksets whose oldest key waited longer than [`KSET_MAX_AGE`].
    pub fn close_aged(&self, media: &dyn Media, segments: &SegmentMap) -> Result<(), LogError> {
        for idx in 0..self.ksets.len() {
            let aged = lock(&self.ksets[idx].open)
                .since
                .is_some_and(|t| t.elapsed() >= KSET_MAX_AGE);
            if aged {
                self.close(idx, media, segments)?;
            }
        }
        Ok(())
    }

    /// Close the open ksets `idxs` (ascending) as one run of keys in the log.
    ///
    /// Each kset's closing lock is held from taking its keys until they are on the media, so
    /// the versions of a block (which all go to one kset) reach the log in append order even
    /// when several threads close. Keys that could not be written, or that `scope` leaves for
    /// later, go back to the front of their kset.
    fn close_set(
        &self,
        idxs: &[usize],
        scope: SyncScope<'_>,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        let mut closing: SmallVec<[_; INLINE_CLOSING_KSETS]> =
            idxs.iter().map(|&i| lock(&self.ksets[i].closing)).collect();
        let mut since: SmallVec<[Option<Instant>; INLINE_CLOSING_KSETS]> =
            SmallVec::from_elem(None, idxs.len());
        let mut taken = 0;
        for (n, &i) in idxs.iter().enumerate() {
            let mut open = lock(&self.ksets[i].open);
            if !open.keys.is_empty() {
                std::mem::swap(&mut open.keys, &mut *closing[n]);
                since[n] = open.since.take();
                open.deferred = 0;
                taken += closing[n].len();
            }
        }
        if taken == 0 {
            return Ok(());
        }
        // Per kset, how many of its keys (from the front) go out now.
        let ready: SmallVec<[usize; INLINE_CLOSING_KSETS]> = closing
            .iter()
            .map(|keys| match scope {
                SyncScope::All => keys.len(),
                SyncScope::WholeFolios(heads) => keys
                    .iter()
                    .take_while(|k| self.data_folio_left(k, heads))
                    .count(),
            })
            .collect();
        let mut written = 0;
        let result = if ready.iter().any(|&r| r > 0) {
            self.write_keys(idxs, &closing, &ready, media, segments, &mut written)
        } else {
            Ok(())
        };
        for (n, &i) in idxs.iter().enumerate() {
            let keys = &mut *closing[n];
            let done = written.min(ready[n]);
            written -= done;
            if done < keys.len() {
                let left = keys.len() - done;
                let mut open = lock(&self.ksets[i].open);
                open.keys.splice(0..0, keys.drain(done..));
                if done < ready[n] {
                    // Not written (the error is returned): try again a while from now.
                    open.since = Some(Instant::now());
                } else {
                    // Left for later on purpose: the age limit still counts from the oldest.
                    open.deferred = left;
                    open.since = since[n].or(open.since);
                }
            }
            keys.clear();
        }
        drop(closing);
        self.closed.notify_all();
        result
    }

    /// Whether no data head writes into the folio that holds the end of `key`'s data any
    /// more (or the key names no data), so syncing it now writes that folio back only once.
    fn data_folio_left(&self, key: &KeyRecord, heads: &[CachePos]) -> bool {
        if key.flags & format::KEY_ZEROES != 0 {
            return true;
        }
        let end = self.layout.media_offset(CachePos {
            seg: key.seg,
            off: key.seg_off + key.len,
        });
        heads
            .iter()
            .filter(|h| h.seg == key.seg)
            .all(|&h| end <= self.layout.media_offset(h) & !(FOLIO_SIZE - 1))
    }

    /// Sync the data the keys name (msync mode), then write them as ksets at the head.
    /// `lists` are the keys taken from open ksets `idxs`, of which the first `ready[n]` of
    /// each go out; `written` counts the keys on the media, in the order of those prefixes.
    fn write_keys(
        &self,
        idxs: &[usize],
        lists: &[std::sync::MutexGuard<'_, Vec<KeyRecord>>],
        ready: &[usize],
        media: &dyn Media,
        segments: &SegmentMap,
        written: &mut usize,
    ) -> Result<(), LogError> {
        if media.persistence() == Persistence::Msync {
            self.sync_data(
                lists.iter().zip(ready).flat_map(|(l, &r)| l[..r].iter()),
                media,
            )?;
        }
        let mut head = lock(&self.head);
        let mut scratch = lock(&self.scratch);
        let CloseScratch {
            next,
            chunk,
            marks,
            buf,
        } = &mut *scratch;
        // Per list: the journal index its next key to be written has (its keys are the
        // slot's entries from `committed` on), so each kset can name how far it takes them.
        next.clear();
        next.extend(
            idxs.iter()
                .map(|&i| self.journal.as_ref().map_or(0, |j| j.committed(i))),
        );
        chunk.clear();
        marks.clear();
        for (n, list) in lists.iter().enumerate() {
            for key in list[..ready[n]].iter() {
                chunk.push(*key);
                next[n] += 1;
                match marks.last_mut() {
                    Some(m) if m.0 == idxs[n] => m.1 = next[n],
                    _ => marks.push((idxs[n], next[n])),
                }
                if chunk.len() == format::KSET_MAX_KEYS {
                    self.write_kset(&mut head, chunk, marks, buf, media, segments)?;
                    *written += chunk.len();
                    chunk.clear();
                    marks.clear();
                }
            }
        }
        if !chunk.is_empty() {
            self.write_kset(&mut head, chunk, marks, buf, media, segments)?;
            *written += chunk.len();
        }
        Ok(())
    }

    /// Make the cached data of `keys` durable before a kset names it (msync group commit).
    fn sync_data<'k>(
        &self,
        keys: impl Iterator<Item = &'k KeyRecord>,
        media: &dyn Media,
    ) -> Result<(), LogError> {
        for k in keys.filter(|k| k.flags & format::KEY_ZEROES == 0) {
            let at = self.layout.media_offset(CachePos {
                seg: k.seg,
                off: k.seg_off,
            });
            media.persist(at, k.len as u64).map_err(LogError::Media)?;
        }
        fence(media)
    }

    /// Wait until the head moves past `seq` or `timeout` passes; returns the head.
    pub fn wait_beyond(&self, seq: u64, timeout: Duration) -> LogHead {
        let head = lock(&self.head);
        let (head, _) = self
            .closed
            .wait_timeout_while(head, timeout, |h| h.seq <= seq)
            .unwrap();
        *head
    }

    /// The codec of this cache's ksets.
    pub fn codec(&self) -> &KsetCodec {
        &self.codec
    }

    /// Wake everyone in [`Log::wait_beyond`] (shutdown).
    pub fn wake_waiters(&self) {
        self.closed.notify_all();
    }

    /// Write one kset at the head, chaining to a new log segment first when it does not fit.
    /// `marks` names, for the journal, each open kset whose keys it holds and the journal
    /// index just past its last one.
    fn write_kset(
        &self,
        head: &mut LogHead,
        keys: &[KeyRecord],
        marks: &[(usize, u64)],
        buf: &mut Vec<u8>,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        let result = self.write_kset_inner(head, keys, marks, buf, media, segments);
        if let (Err(_), Some(j)) = (&result, &self.journal) {
            // Its keys stay open, and its sequence number goes to another kset.
            j.kset_failed(&marks.iter().map(|m| m.0).collect::<Vec<_>>());
        }
        result
    }

    fn write_kset_inner(
        &self,
        head: &mut LogHead,
        keys: &[KeyRecord],
        marks: &[(usize, u64)],
        buf: &mut Vec<u8>,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        buf.clear();
        self.codec
            .encode_kset(head.seq, keys, buf)
            .map_err(|source| LogError::Encode {
                keys: keys.len(),
                source,
            })?;
        let data_size = self.layout.data_size() as u64;
        // Always leave room for the LAST kset that chains to the next segment, and for the
        // zeroed header that ends the log.
        let needed = buf.len() as u64 + format::KSET_HEADER_SIZE as u64;
        if head.pos.off as u64 + needed + format::KSET_HEADER_SIZE as u64 > data_size {
            let next = segments
                .alloc(SegmentKind::Log, 0)
                .ok_or(LogError::NoSpace)?;
            let next_start = self.layout.media_offset(CachePos { seg: next, off: 0 });
            write(media, next_start, &format::KSET_ZERO_HEADER)?;
            let mut last = Vec::with_capacity(format::KSET_HEADER_SIZE);
            self.codec
                .encode_last_kset(head.seq, next, &mut last)
                .map_err(|source| LogError::Encode { keys: 0, source })?;
            self.announce(head.seq, &last, &[]);
            write(media, self.layout.media_offset(head.pos), &last)?;
            fence(media)?;
            self.confirm(head.seq, &[]);
            *head = LogHead {
                pos: CachePos { seg: next, off: 0 },
                seq: head.seq + 1,
            };
            buf.clear();
            self.codec
                .encode_kset(head.seq, keys, buf)
                .map_err(|source| LogError::Encode {
                    keys: keys.len(),
                    source,
                })?;
        }
        let at = self.layout.media_offset(head.pos);
        // The zeroed header after the kset ends replay at the true end of the log even when
        // older ksets from an earlier use of this segment follow; the sequence number in every
        // header is the second line of defence.
        if head.pos.off as u64 + buf.len() as u64 + format::KSET_HEADER_SIZE as u64 <= data_size {
            write(media, at + buf.len() as u64, &format::KSET_ZERO_HEADER)?;
        }
        self.announce(head.seq, buf, marks);
        write(media, at, buf)?;
        fence(media)?;
        self.confirm(head.seq, marks);
        head.pos.off += buf.len() as u32;
        head.seq += 1;
        Ok(())
    }

    /// Tell the journal that the encoded kset `kset` is about to be written.
    fn announce(&self, seq: u64, kset: &[u8], marks: &[(usize, u64)]) {
        if let Some(j) = &self.journal {
            j.kset_writing(seq, super::journal::kset_crc(kset), marks);
        }
    }

    /// Tell the journal that kset `seq` is on the media.
    fn confirm(&self, seq: u64, marks: &[(usize, u64)]) {
        if let Some(j) = &self.journal {
            j.kset_written(seq, marks);
        }
    }
}

fn write(media: &dyn Media, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
    media
        .write(offset, bytes)
        .and_then(|()| media.persist(offset, bytes.len() as u64))
        .map_err(LogError::Media)
}

fn fence(media: &dyn Media) -> Result<(), LogError> {
    media.fence().map_err(LogError::Media)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{SyncScope, FOLIO_SIZE, INLINE_CLOSING_KSETS};
    use crate::cache::driver::Driver;
    use crate::cache::format::{self, KeyRecord, Layout};
    use crate::cache::journal;
    use crate::cache::media::RecordingMedia;
    use crate::cache::replay::min_segments;
    use crate::cache::tests::{pattern, Fixture};
    use crate::cache::{CacheEngine, CachePos};

    /// A committer's close writes the keys whose data lies in folios the data heads have left,
    /// that data synced first; a key whose data ends in the folio a head still writes into
    /// stays open, unsynced, with the keys after it in its kset (so the versions of a block
    /// keep their order), and its kset counts as full again only after a whole kset of new
    /// keys. A FLUSH's close (every key) then writes them too.
    #[test]
    fn a_committer_close_leaves_the_keys_in_a_data_heads_folio_for_later() {
        let queues = 2;
        let mut fx = Fixture::new(64, queues, 2);
        let len = Layout::media_len_for(min_segments(queues) + 2);
        fx.media = Arc::new(RecordingMedia::new_msync(len).unwrap());
        let engine =
            CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
        let core = engine.core();
        let (log, media) = (&core.log, &*core.media);
        let seg = if log.head().pos.seg == 2 { 3 } else { 2 };
        let start = core.layout.media_offset(CachePos { seg, off: 0 });
        // The offset in the segment where the next folio starts.
        let boundary = (FOLIO_SIZE - start % FOLIO_SIZE) as u32;
        let key = |off: u64, seg_off: u32| KeyRecord {
            off,
            len: 4096,
            flags: 0,
            seg,
            seg_off,
            gen: 0,
            data_crc: 0,
        };
        // Kset 0 (region 0): two keys in the folio the head left (one ends at its end), one in
        // the head's folio, then one naming no data. Kset 1 (region 1): one key, folio left.
        let keys0 = [
            key(0, boundary - 8192),
            key(4096, boundary - 4096),
            key(8192, boundary),
            KeyRecord {
                flags: format::KEY_ZEROES,
                seg: 0,
                seg_off: 0,
                ..key(12288, 0)
            },
        ];
        let key1 = key(4 << 20, boundary - 12288);
        for k in keys0.iter().chain([&key1]) {
            if k.flags & format::KEY_ZEROES == 0 {
                let at = core.layout.media_offset(CachePos {
                    seg,
                    off: k.seg_off,
                });
                media.write(at, &pattern(k.off, 4096, 1)).unwrap();
            }
            assert!(!log.append(*k).full);
        }
        let durable_at = |k: &KeyRecord| {
            let at = core.layout.media_offset(CachePos {
                seg,
                off: k.seg_off,
            }) as usize;
            fx.media
                .with_durable(|d| d[at..at + 4096] == pattern(k.off, 4096, 1))
        };
        let seq = log.head().seq;
        let head = [CachePos {
            seg,
            off: boundary + 8192,
        }];
        log.close_set(
            &[0, 1],
            SyncScope::WholeFolios(&head),
            media,
            &core.segments,
        )
        .unwrap();

        assert_eq!(
            log.head().seq,
            seq + 1,
            "one kset with the three ready keys"
        );
        assert_eq!(log.open_keys(), vec![keys0[2..].to_vec(), vec![]]);
        assert!(durable_at(&keys0[0]) && durable_at(&keys0[1]) && durable_at(&key1));
        assert!(
            !durable_at(&keys0[2]),
            "the data in the head's folio was synced"
        );
        // Two keys left: full after 128 more, not before.
        for n in 1..=format::KSET_MAX_KEYS {
            let full = log.append(key(16384, 0)).full;
            assert_eq!(full, n == format::KSET_MAX_KEYS, "after {n} more keys");
        }

        log.close_all(media, &core.segments).unwrap();
        assert!(log.open_keys().iter().all(Vec::is_empty));
        assert!(durable_at(&keys0[2]));
        // Its keys name data no engine wrote: nothing of it may be replayed or written back.
        std::mem::forget(engine);
    }

    /// A FLUSH on a device with more queues, so more ksets, than a close holds locks of inline:
    /// the list goes to the heap, and every kset's keys still reach the media.
    #[test]
    fn a_flush_closing_more_ksets_than_held_inline_makes_every_write_durable() {
        let queues = INLINE_CLOSING_KSETS + 2;
        let mut fx = Fixture::new(4 * queues as u64, queues, 0);
        let engine =
            CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
        let mut d = Driver::new(&engine);
        // One write per 4 MiB region: region r's key goes to kset r % queues, so every kset
        // holds one key when the FLUSH comes.
        let offsets: Vec<u64> = (0..queues as u64).map(|r| (r << 22) + 8192).collect();
        for (q, &off) in offsets.iter().enumerate() {
            d.write(q, off, &pattern(off, 4096, 3)).unwrap();
        }
        d.flush(0).unwrap();
        drop(d);

        let engine = fx.crash_and_open(None);
        let mut d = Driver::new(&engine);
        for &off in &offsets {
            assert!(
                d.read(0, off, 4096).unwrap() == pattern(off, 4096, 3),
                "the write at {off} was not durable after the FLUSH"
            );
        }
    }

    /// A key the process-kill journal has no room for is counted, and `status` (so `ctl
    /// status` and the metrics) reports how many there were.
    #[test]
    fn keys_the_journal_has_no_room_for_are_counted_in_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut fx = Fixture::new(64, 1, 0);
        // The journal is named after the media's file, which must exist.
        fx.opts.path = dir.path().join("cache");
        std::fs::write(&fx.opts.path, b"").unwrap();
        fx.opts.journal_dir = Some(dir.path().to_path_buf());
        let engine =
            CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
        let log = &engine.core().log;
        assert!(log.journal().is_some(), "the cache has a journal");
        // Appends without a close: the log as far behind as a media that cannot keep up.
        let over = 5;
        for n in 0..journal::DEFAULT_CAPACITY as u64 + over {
            let appended = log.append(KeyRecord {
                off: (n % 1024) * 4096,
                len: 4096,
                flags: 0,
                seg: 0,
                seg_off: 0,
                gen: 0,
                data_crc: 0,
            });
            assert_eq!(appended.journaled, n < journal::DEFAULT_CAPACITY as u64);
        }
        assert_eq!(engine.stats().journal_full, over);
        assert_eq!(engine.status().stats.journal_full, over);
        // Its open kset names no real data: nothing of it may reach the media.
        std::mem::forget(engine);
    }
}
