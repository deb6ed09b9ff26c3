// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writeback: copy dirty data from the cache to the backing image, a batch of ksets at a time.
//!
//! The thread walks the log from dirty_tail. It gathers the ksets there (up to [`BATCH_KEYS`]
//! keys, [`BATCH_BYTES`] or [`BATCH_KSETS`] ksets), writes every dirty key to the backing
//! image straight from the cache mapping (several writes in flight), flushes the backing
//! image, and only then advances and persists dirty_tail past the batch. So the backing image
//! always holds a state that some prefix of the log explains, and a crash at any point only
//! means writing some keys again. A failed write leaves dirty_tail where it is: the batch is
//! retried with a growing pause, the data stays dirty in the cache, and guest I/O goes on.
//! Batching pays the backing flush, the dirty_tail store and the wait for the slowest write
//! once per batch instead of once per kset: when the cache is full, that is what the guest's
//! writes wait for.
//!
//! When it runs is `pacing`'s decision, taken before every batch: while the guest is busy and
//! the cache has room it waits; when the guest is idle or room is short it runs at full speed.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::core::Core;
use super::data_head::LOG_RESERVE;
use super::format::{self, KeyRecord, KsetFound, TailPos};
use super::index::Piece;
use super::pacing::{Look, Pacer, Verdict, WritebackState};
use super::CachePos;
use crate::backing::BackingQueue;
use crate::engine::DataSeg;
use crate::engine::ErrorChain;

/// Longest pause between retries of a failing batch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Writes in flight to the backing image. Deeper than a guest's usual QD32: when the cache is
/// full, guest writes go at the pace of writeback, and in msync mode the cache file shares the
/// disk, so writeback must get more from it than the guest's own random writes would (with 64
/// the full-cache case reached 0.84-0.89x qsd-file's rate, with 128 0.97x; 256 gave no more).
const DEPTH: u32 = 128;
/// A batch takes no further kset once it holds this many keys (eight full ksets: enough to
/// keep the backing queue full between flushes, few enough that a batch stays milliseconds).
const BATCH_KEYS: usize = 8 * format::KSET_MAX_KEYS;
/// Nor more ksets than this (with a FLUSH after every guest write, each kset holds one key).
const BATCH_KSETS: usize = 256;
/// Nor once its keys name this many bytes: pacing decides between batches whether writeback
/// goes on (down to the low watermark, say), so a batch stays a small step of the dirty data.
const BATCH_BYTES: u64 = 4 << 20;

pub(super) fn spawn(core: Arc<Core>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("pcache-writeback".into())
        .spawn(move || run(&core))
        .expect("spawning the writeback thread")
}

/// Why a turn of writeback did not move dirty_tail. The kset stays dirty and is retried.
#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error("the kset at dirty_tail (segment {seg} offset {off}, kset {seq}) cannot be read")]
    ReadKset {
        seg: u32,
        off: u32,
        seq: u64,
        #[source]
        source: format::FormatError,
    },
    #[error("backing write of {len} bytes at byte {offset} failed")]
    BackingWrite {
        len: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("flushing the backing image failed")]
    BackingFlush(#[source] std::io::Error),
    #[error("persisting dirty_tail")]
    StoreTail(#[source] format::FormatError),
}

/// The writeback thread: [`step`] after step, with the waits around it that tests leave out
/// (for its turn, see `pacing`; for new ksets; backing off after failures).
fn run(core: &Core) {
    let mut queue = match BackingQueue::new(core.backing.clone(), DEPTH) {
        Ok(q) => q,
        Err(e) => {
            log::error!(
                "writeback cannot start, dirty data stays in the cache: {}",
                ErrorChain(&e)
            );
            return;
        }
    };
    let mut scratch = Scratch::default();
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    let mut pacer = Pacer::new(Instant::now());
    while !core.stopping.load(Ordering::Acquire) {
        if core.log.head().seq > core.meta.dirty_tail().log_seq {
            match pacer.decide(&core.pacing, look(core), Instant::now()) {
                Verdict::Run(state) => core.pacing.set_state(state),
                Verdict::Wait(d) => {
                    core.pacing.set_state(WritebackState::WaitingForIdleGuest);
                    core.pacing.wait(d);
                    continue;
                }
            }
        }
        match step_with(core, &mut queue, &mut scratch) {
            Ok(false) => {
                core.pacing.set_state(WritebackState::Clean);
                // Nothing persisted beyond dirty_tail. Keys may still wait in open ksets when
                // no queue is running to close them on its timer, so close aged ones here,
                // and all of them when the cache is about to refuse writes.
                let closed = if core.segments.free_count() <= LOG_RESERVE + 1 {
                    core.close_all_ksets()
                } else {
                    core.close_aged_ksets()
                };
                if let Err(e) = closed {
                    log::debug!("writeback: aged kset not closed yet: {}", ErrorChain(&e));
                }
                let tail = core.meta.dirty_tail();
                core.log
                    .wait_beyond(tail.log_seq, Duration::from_millis(500));
            }
            Ok(true) => {
                if failing {
                    log::info!("writeback recovered; writing dirty data back again");
                    failing = false;
                }
                backoff = Duration::from_millis(100);
            }
            Err(e @ WritebackError::StoreTail(_)) => {
                log::error!("writeback: {}", ErrorChain(&e));
                sleep_unless_stopping(core, MAX_BACKOFF);
            }
            Err(e) => {
                if !failing {
                    log::error!(
                        "writeback failed, data stays dirty in the cache and will be retried: {}",
                        ErrorChain(&e)
                    );
                    failing = true;
                }
                sleep_unless_stopping(core, backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// What pacing looks at before a batch: a few loads, the request counters summed over their
/// per-thread slots.
fn look(core: &Core) -> Look {
    Look {
        unpaced: core.writeback_unpaced(),
        dirty_bytes: core.stats.dirty_bytes.load(Ordering::Relaxed),
        // One segment more than allocation needs to go on: writeback starts before writes wait.
        free_low: core.segments.free_count() <= LOG_RESERVE + 2,
        busy: core.stats.busy.load(Ordering::Relaxed),
        activity: core.stats.activity(),
    }
}

/// Buffers writeback reuses from batch to batch, so that writing a batch back allocates nothing
/// once they have grown (with a FLUSH after every guest write each kset holds one key, and an
/// allocation per kset was one per write).
#[derive(Default)]
pub(super) struct Scratch {
    /// The encoded kset being read, as read from the media, and its keys.
    kset: Vec<u8>,
    kset_keys: Vec<KeyRecord>,
    /// The keys of the batch's ksets, in log order.
    keys: Vec<KeyRecord>,
    /// Per key: its data failed its CRC.
    damaged: Vec<bool>,
    parts: VisibleParts,
    done: Vec<(u64, io::Result<()>)>,
    /// A key's data, copied out to check its CRC.
    data: Vec<u8>,
    /// The index's answer for a damaged key's range.
    pieces: Vec<Piece>,
}

/// One turn of writeback without its pauses, with buffers of its own; see [`step_with`].
#[cfg(test)]
pub(super) fn step(core: &Core, queue: &mut BackingQueue) -> Result<bool, WritebackError> {
    step_with(core, queue, &mut Scratch::default())
}

/// One turn of writeback without its pauses: write back a batch of ksets from dirty_tail and
/// persist the new dirty_tail. `Ok(false)` when nothing persisted lies beyond dirty_tail. The
/// writeback thread runs exactly this; stepped tests call it directly.
///
/// The queue defers submission: the writes of a batch enter the kernel together when writeback
/// waits for them (one system call for the batch instead of one per key).
pub(super) fn step_with(
    core: &Core,
    queue: &mut BackingQueue,
    scratch: &mut Scratch,
) -> Result<bool, WritebackError> {
    let tail = core.meta.dirty_tail();
    if core.log.head().seq <= tail.log_seq {
        return Ok(false);
    }
    queue.defer_submit(usize::MAX);
    let next = write_back_batch(core, queue, scratch, tail).inspect_err(|_| {
        core.stats.writeback_errors.fetch_add(1, Ordering::Relaxed);
    })?;
    core.meta
        .store_dirty_tail(next)
        .map_err(WritebackError::StoreTail)?;
    core.writeback_progress();
    core.health.writeback_moving();
    Ok(true)
}

fn sleep_unless_stopping(core: &Core, d: Duration) {
    if !d.is_zero() && !core.stopping.load(Ordering::Acquire) {
        std::thread::sleep(d);
    }
}

/// Reads the ksets from `tail` into `scratch.keys`, in log order, until the batch is full or
/// the log's persisted end; returns the position after the last one read. A kset that cannot
/// be read fails the turn only when it is the first: otherwise the batch ends before it, and
/// the next turn, which starts there, reports it.
fn gather(core: &Core, scratch: &mut Scratch, tail: TailPos) -> Result<TailPos, WritebackError> {
    let Scratch {
        kset,
        kset_keys,
        keys,
        ..
    } = scratch;
    keys.clear();
    let mut at = tail;
    let (mut ksets, mut bytes) = (0, 0u64);
    while ksets < BATCH_KSETS
        && keys.len() < BATCH_KEYS
        && bytes < BATCH_BYTES
        && core.log.head().seq > at.log_seq
    {
        let found = match core.read_kset_into(at, kset, kset_keys) {
            Ok(found) => found,
            Err(source) if at == tail => {
                let e = WritebackError::ReadKset {
                    seg: tail.pos.seg,
                    off: tail.pos.off,
                    seq: tail.log_seq,
                    source,
                };
                core.health.writeback_stalled(&ErrorChain(&e).to_string());
                return Err(e);
            }
            Err(_) => break,
        };
        ksets += 1;
        let pos = match found {
            KsetFound::Last { next_seg, .. } => CachePos {
                seg: next_seg,
                off: 0,
            },
            KsetFound::Keys { .. } => {
                keys.extend_from_slice(kset_keys);
                bytes += kset_keys.iter().map(|k| u64::from(k.len)).sum::<u64>();
                CachePos {
                    seg: at.pos.seg,
                    off: at.pos.off + format::kset_size(kset_keys.len()) as u32,
                }
            }
        };
        at = TailPos {
            pos,
            log_seq: at.log_seq + 1,
        };
    }
    Ok(at)
}

/// Write back a batch of ksets from `tail`; returns the position after it.
fn write_back_batch(
    core: &Core,
    queue: &mut BackingQueue,
    scratch: &mut Scratch,
    tail: TailPos,
) -> Result<TailPos, WritebackError> {
    let next = gather(core, scratch, tail)?;
    let Scratch {
        keys,
        damaged,
        parts,
        done,
        data,
        pieces,
        ..
    } = scratch;
    let keys = &keys[..];
    let mut bytes = 0u64;
    let mut issued = 0u64;
    // Keys whose data is not written: damaged in the cache. One that a later write replaced
    // is passed over quietly (the newer version is written back in its turn); one still
    // holding the newest data of some bytes is a loss, reported and accounted, and writeback
    // goes on, since retrying cannot repair it and stopping would stall the whole device.
    damaged.clear();
    damaged.resize(keys.len(), false);
    for (i, k) in keys.iter().enumerate().filter(|(_, k)| !k.is_clean()) {
        bytes += k.len as u64;
        if !k.is_zeroes() && core.data_crc {
            let pos = CachePos {
                seg: k.seg,
                off: k.seg_off,
            };
            if core.crc_with(pos, k.len, data) != k.data_crc {
                damaged[i] = true;
                let live = live_bytes(core, k, pieces);
                if live == 0 {
                    log::debug!(
                        "writeback: damaged dirty extent at backing byte {} was overwritten since; passing over it",
                        k.off
                    );
                    continue;
                }
                core.stats.crc_errors.fetch_add(1, Ordering::Relaxed);
                core.health.lost(k.off, k.len, live, k.seg);
            }
        }
    }
    // Writes of one batch run concurrently, so only the newest version of each byte in the
    // batch is written: the backing image then ends up as if the keys had been applied in log
    // order.
    for &(i, off, len) in parts.of(keys) {
        let k = &keys[i];
        if k.is_clean() || damaged[i] {
            continue;
        }
        let id = i as u64;
        if k.is_zeroes() {
            if k.flags & format::KEY_UNMAP != 0 {
                queue.discard(off, len as u64, id);
            } else {
                queue.write_zeroes(off, len as u64, false, id);
            }
        } else {
            let pos = CachePos {
                seg: k.seg,
                off: k.seg_off + (off - k.off) as u32,
            };
            let seg = DataSeg {
                ptr: core.data_ptr(pos, len),
                len: len as usize,
            };
            queue.write(off, &[seg], false, id);
        }
        issued += 1;
    }
    if issued > 0 {
        done.clear();
        queue.wait(done);
        if let Some(i) = done.iter().position(|(_, r)| r.is_err()) {
            let (id, result) = done.swap_remove(i);
            let k = &keys[id as usize];
            return Err(WritebackError::BackingWrite {
                len: k.len,
                offset: k.off,
                source: result.expect_err("found as an error"),
            });
        }
        done.clear();
        queue.flush(u64::MAX);
        queue.wait(done);
        if let Some((_, Err(_))) = done.first() {
            let (_, result) = done.swap_remove(0);
            return Err(WritebackError::BackingFlush(
                result.expect_err("found as an error"),
            ));
        }
    }
    core.stats
        .writeback_bytes
        .fetch_add(bytes, Ordering::Relaxed);
    core.stats.dirty_bytes.fetch_sub(
        bytes.min(core.stats.dirty_bytes.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    Ok(next)
}

/// Bytes of `k`'s extent the index still serves from it: the newest version of those bytes.
/// `pieces` is a buffer to reuse.
fn live_bytes(core: &Core, k: &format::KeyRecord, pieces: &mut Vec<Piece>) -> u64 {
    let at = CachePos {
        seg: k.seg,
        off: k.seg_off,
    };
    pieces.clear();
    core.index.lookup(
        k.off,
        u64::from(k.len),
        false,
        &|s| core.segments.gen(s),
        pieces,
    );
    pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Hit { len, key, .. }
                if key.crc.pos == at && key.crc.len == k.len && key.gen == k.gen =>
            {
                Some(u64::from(*len))
            }
            _ => None,
        })
        .sum()
}

/// The parts of each key that no later key of the same batch overwrites, with the lists that
/// compute them kept from batch to batch.
#[derive(Default)]
pub(super) struct VisibleParts {
    out: Vec<(usize, u64, u32)>,
    /// The parts of the key being cut, as `(start, end)`, and the next cut of them.
    parts: Vec<(u64, u64)>,
    cut: Vec<(u64, u64)>,
    /// The keys' indices in offset order, and each key's place in it: the keys that overlap
    /// one are its neighbours there, so finding them does not scan every later key.
    by_off: Vec<u32>,
    place: Vec<u32>,
}

impl VisibleParts {
    /// The visible parts of `keys`, as `(key index, offset, length)`, in key order.
    pub(super) fn of(&mut self, keys: &[format::KeyRecord]) -> &[(usize, u64, u32)] {
        self.out.clear();
        self.by_off.clear();
        self.by_off.extend(0..keys.len() as u32);
        self.by_off.sort_unstable_by_key(|&i| keys[i as usize].off);
        self.place.clear();
        self.place.resize(keys.len(), 0);
        for (p, &i) in self.by_off.iter().enumerate() {
            self.place[i as usize] = p as u32;
        }
        let longest = keys.iter().map(|k| k.len as u64).max().unwrap_or(0);
        for (i, k) in keys.iter().enumerate() {
            let (s, e) = (k.off, k.off + k.len as u64);
            // Most keys of a kset overlap no later one: they go out whole, with no list of
            // parts to cut (looking for an overlap among all later keys was a quarter of the
            // writeback thread's instructions under 4 KiB random writes).
            if !self.overlapped_later(keys, i, longest) {
                self.out.push((i, k.off, k.len));
                continue;
            }
            self.parts.clear();
            self.parts.push((s, e));
            for later in &keys[i + 1..] {
                let (ls, le) = (later.off, later.off + later.len as u64);
                // Most later keys miss this one: only an overlap recuts the parts (recutting
                // for every pair of a kset's keys was most of the daemon's instructions under
                // 4 KiB random writes).
                if !self.parts.iter().any(|&(s, e)| ls < e && le > s) {
                    continue;
                }
                self.cut.clear();
                for &(s, e) in &self.parts {
                    if le <= s || ls >= e {
                        self.cut.push((s, e));
                    } else {
                        self.cut.extend(
                            [(s, ls.max(s)), (le.min(e), e)]
                                .into_iter()
                                .filter(|(a, b)| a < b),
                        );
                    }
                }
                std::mem::swap(&mut self.parts, &mut self.cut);
                if self.parts.is_empty() {
                    // Wholly overwritten (a hot block written again and again): no later key
                    // can change that, so a batch of them costs no scan of all later keys each.
                    break;
                }
            }
            (self.out).extend(self.parts.iter().map(|&(s, e)| (i, s, (e - s) as u32)));
        }
        &self.out
    }

    /// Whether a key after `keys[i]` overlaps it, `longest` being the longest key's length.
    /// Keys starting from it on in offset order overlap it while they start before its end;
    /// keys starting before it can only while they start less than `longest` before it.
    fn overlapped_later(&self, keys: &[format::KeyRecord], i: usize, longest: u64) -> bool {
        let k = &keys[i];
        let (s, e) = (k.off, k.off + k.len as u64);
        let later_overlap = |&j: &u32| {
            let l = &keys[j as usize];
            j as usize > i && l.off < e && l.off + l.len as u64 > s
        };
        let p = self.place[i] as usize;
        (self.by_off[p + 1..].iter())
            .take_while(|&&j| keys[j as usize].off < e)
            .any(later_overlap)
            || (self.by_off[..p].iter().rev())
                .take_while(|&&j| keys[j as usize].off + longest > s)
                .any(later_overlap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(off: u64, len: u32) -> format::KeyRecord {
        format::KeyRecord {
            off,
            len,
            ..Default::default()
        }
    }

    #[test]
    fn later_keys_hide_earlier_ones() {
        let keys = [
            key(0, 8192),
            key(1024, 1024),
            key(4096, 8192),
            key(20480, 512),
        ];
        assert_eq!(
            VisibleParts::default().of(&keys),
            [
                (0, 0, 1024),
                (0, 2048, 2048),
                (1, 1024, 1024),
                (2, 4096, 8192),
                (3, 20480, 512)
            ]
        );
    }

    #[test]
    fn visible_parts_match_a_per_sector_model() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        // One set of lists for every kset, as the writeback thread keeps them.
        let mut parts = VisibleParts::default();
        for _ in 0..200 {
            let keys: Vec<_> = (0..1 + next() % 40)
                .map(|_| key((next() % 64) * 512, (1 + next() % 8) as u32 * 512))
                .collect();
            let mut newest = std::collections::HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                for s in (k.off..k.off + k.len as u64).step_by(512) {
                    newest.insert(s, i);
                }
            }
            let mut seen = std::collections::HashMap::new();
            for &(i, off, len) in parts.of(&keys) {
                for s in (off..off + len as u64).step_by(512) {
                    assert!(seen.insert(s, i).is_none(), "sector {s} written twice");
                }
            }
            assert_eq!(seen, newest);
        }
    }
}
