// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The write side of the request paths: WRITE, WRITE_ZEROES, DISCARD and FLUSH.
//!
//! A write is split at 4 MiB region boundaries (a key never spans index regions) and at the
//! end of the queue's data segment. Each piece is copied from guest memory into the cache; in
//! pmem mode it is also persisted, and its key waits in `staged` until the batch's fence
//! (`CacheQueue::commit_staged`). In msync mode nothing is synced per write (group commit): the
//! log syncs the data of a kset's keys before it writes the kset (`log`).
//! A write that finds no room keeps what it copied so far (logged like any write, but not
//! completed) and is handed back to the worker, which resubmits it when space is freed; it goes
//! on where it stopped. So a write larger than all the space the cache can free completes
//! piece by piece.

use std::sync::atomic::Ordering;

use super::format::{self, KeyRecord};
use super::log::LogError;
use super::queue::{CacheQueue, Outcome, PartialWrite, StagedWrite};
use super::{CachePos, REGION_SIZE};
use crate::engine::{DataSeg, ErrorChain, IoError};

/// Split `offset..offset + len` at region boundaries, as `(offset, len)` pieces.
pub(super) fn region_pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let piece = (REGION_SIZE - at % REGION_SIZE).min(end - at);
        let out = (at, piece as u32);
        at += piece;
        Some(out)
    })
}

impl CacheQueue {
    pub(super) fn submit_write(&mut self, tag: u64, offset: u64, bufs: &[DataSeg]) -> Outcome {
        // Borrowed, not cloned: a clone per write would bounce the Arc's count between the
        // queues' CPUs.
        let core = &*self.core;
        // The key goes in after the copy: have its region's lock line on the way meanwhile.
        core.index.prefetch(offset);
        if core.read_only {
            return Outcome::Done(Err(IoError::ReadOnly));
        }
        let len = DataSeg::total_len(bufs);
        let first_key = self.staged_keys.len();
        let first_buf = bufs.first().map_or(0, |b| b.ptr as usize);
        let (mut copied, earlier) = match self.partial.take() {
            Some(p) if (p.tag, p.offset, p.len, p.first_buf) == (tag, offset, len, first_buf) => {
                (p.copied, p.offs)
            }
            _ => (0, Vec::new()),
        };
        for (off, piece) in region_pieces(offset + copied, len - copied) {
            let mut left = piece;
            while left > 0 {
                let alloc = match core.alloc_data(self.qid, left, false) {
                    Ok(Some(a)) => a,
                    Ok(None) => {
                        // What was copied is kept (logged at the next reap) and the request
                        // goes on from there when it comes back, so a write larger than
                        // the space the cache can ever free completes piece by piece.
                        if copied > 0 {
                            let mut offs = earlier;
                            offs.extend(self.staged_keys[first_key..].iter().map(|k| k.off));
                            self.partial = Some(PartialWrite {
                                tag,
                                offset,
                                len,
                                first_buf,
                                copied,
                                offs,
                            });
                        }
                        if self.staged_keys.len() > first_key {
                            self.staged.push(StagedWrite {
                                tag,
                                keys: first_key..self.staged_keys.len(),
                                last: false,
                                earlier: Vec::new(),
                            });
                        }
                        core.stats.busy.fetch_add(1, Ordering::Relaxed);
                        core.pacing.wake();
                        // Space comes back only through writeback and GC, which see only
                        // closed ksets: do not make them wait for the kset timer.
                        if let Err(e) = core.close_all_ksets() {
                            log::debug!(
                                "full cache: open ksets not closed yet: {}",
                                ErrorChain(&e)
                            );
                        }
                        return Outcome::Busy;
                    }
                    Err(e) => {
                        self.unstage_keys(first_key);
                        return Outcome::Done(Err(IoError::Media(e.into())));
                    }
                };
                if copied == 0 && alloc.len as u64 == len {
                    // The usual case, the whole write in one piece: no sub-list to build.
                    // SAFETY: as below, with `bufs` itself as the source.
                    unsafe { self.copy_in(bufs, alloc.pos, alloc.len) };
                } else {
                    let src = DataSeg::sub_range(bufs, copied, alloc.len as u64);
                    // SAFETY: `src` is guest memory valid for the request's lifetime (DataSeg
                    // contract); the destination is freshly allocated cache space of
                    // `alloc.len` bytes that nothing else writes or reads as current data
                    // until its key is inserted.
                    unsafe { self.copy_in(&src, alloc.pos, alloc.len) };
                }
                self.staged_keys.push(KeyRecord {
                    off: off + (piece - left) as u64,
                    len: alloc.len,
                    flags: 0,
                    seg: alloc.pos.seg,
                    seg_off: alloc.pos.off,
                    gen: core.segments.gen(alloc.pos.seg),
                    data_crc: core.crc_with(alloc.pos, alloc.len, &mut self.crc_buf),
                });
                copied += alloc.len as u64;
                left -= alloc.len;
            }
        }
        core.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        let keys = first_key..self.staged_keys.len();
        self.staged.push(StagedWrite {
            tag,
            keys,
            last: true,
            earlier,
        });
        Outcome::Pending
    }

    /// Copy `segs` (`len` bytes in all) into the cache space at `pos`; in pmem mode also start
    /// its write-back, made durable by the batch's fence (`Media::write_and_persist`: large
    /// segments go in with non-temporal stores).
    ///
    /// # Safety
    /// As `DataSeg::gather`, the destination being `len` bytes of cache space at `pos` that
    /// nothing else accesses meanwhile.
    unsafe fn copy_in(&self, segs: &[DataSeg], pos: CachePos, len: u32) {
        let core = &self.core;
        let mut at = core.media_offset(pos);
        if !self.persist_per_write {
            debug_assert_eq!(DataSeg::total_len(segs), len as u64);
            for s in segs {
                // SAFETY: as below (`Media::write_from`: msync mode streams the bytes in).
                unsafe { core.media.write_from(at, s.ptr, s.len) }
                    .expect("cache position inside the media");
                at += s.len as u64;
            }
            return;
        }
        for s in segs {
            // SAFETY: the caller's contract: `s` is readable and the range at `at` is ours.
            // Its only error is a range outside the media, which `pos` never is (as for
            // `data_ptr`): a write must not complete over bytes that were not copied.
            unsafe { core.media.write_and_persist(at, s.ptr, s.len) }
                .expect("cache position inside the media");
            at += s.len as u64;
        }
    }

    /// Give back the keys a write staged from `first` on (it found no room or failed).
    fn unstage_keys(&mut self, first: usize) {
        for k in self.staged_keys.drain(first..) {
            self.core.unpin(k.seg);
        }
    }

    /// WRITE_ZEROES and DISCARD: data-less keys that read as zeroes and reach the backing
    /// image as zero-range or discard at writeback.
    pub(super) fn submit_zeroes(
        &mut self,
        tag: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Outcome {
        let core = self.core.clone();
        if core.read_only {
            return Outcome::Done(Err(IoError::ReadOnly));
        }
        // Earlier writes of this queue go first, so a write then a discard of the same block
        // from one queue lands in that order.
        self.commit_staged();
        let flags = format::KEY_ZEROES | if unmap { format::KEY_UNMAP } else { 0 };
        let mut offs = Vec::new();
        let mut unjournaled = false;
        for (off, piece) in region_pieces(offset, len) {
            unjournaled |= !core.insert_and_log(KeyRecord {
                off,
                len: piece,
                flags,
                seg: 0,
                seg_off: 0,
                gen: 0,
                data_crc: 0,
            });
            offs.push(off);
        }
        self.check_journal(unjournaled);
        if self.hold_if_needed(tag, || offs) {
            Outcome::Pending
        } else {
            Outcome::Done(Ok(()))
        }
    }

    /// FLUSH: every write completed before it becomes durable, by persisting every open kset.
    pub(super) fn submit_flush(&mut self) -> Outcome {
        self.commit_staged();
        match self.core.close_all_ksets() {
            Ok(()) => Outcome::Done(Ok(())),
            Err(LogError::NoSpace) => {
                self.core.stats.busy.fetch_add(1, Ordering::Relaxed);
                self.core.pacing.wake();
                Outcome::Busy
            }
            Err(e) => Outcome::Done(Err(IoError::Media(e.into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_regions() {
        let p: Vec<_> = region_pieces(REGION_SIZE - 512, 1024 + REGION_SIZE).collect();
        assert_eq!(
            p,
            vec![
                (REGION_SIZE - 512, 512),
                (REGION_SIZE, REGION_SIZE as u32),
                (2 * REGION_SIZE, 512)
            ]
        );
        assert_eq!(region_pieces(0, 0).count(), 0);
    }
}
