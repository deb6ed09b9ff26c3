// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The read path: hits from the cache, misses from the backing image, filling the cache.
//!
//! The index describes the requested range as pieces. Cached pieces are copied out of the
//! cache (with data CRC on, from a checked copy of their whole extent: a mismatch while the
//! segment's generation still holds is an I/O error, never data), data-less pieces read as zeroes, and every gap becomes a backing read. A gap that got
//! a placeholder is read into freshly allocated cache space, copied to the guest, and logged as
//! a clean key — unless a write cut the placeholder meanwhile, in which case only what is left
//! of it is kept. Segment reuse under a reader is detected by re-checking the generation after
//! the copy (a sequence lock on the segment generation) and answered by looking again.

use std::io;
use std::sync::atomic::{fence, Ordering};

use super::core::Filled;
use super::fill;
use super::format;
use super::index::Piece;
use super::queue::{CacheQueue, MissRead, Outcome, ReadInFlight};
use crate::engine::{DataSeg, ErrorChain, IoError};

impl CacheQueue {
    pub(super) fn submit_read(&mut self, tag: u64, offset: u64, bufs: &[DataSeg]) -> Outcome {
        // Borrowed, not cloned, on the hit path: a clone per read would bounce the Arc's count
        // between the queues' CPUs.
        let core = &*self.core;
        let len = DataSeg::total_len(bufs);
        // The queue's vector, put back below: no allocation per read.
        let mut pieces = std::mem::take(&mut self.pieces);
        loop {
            pieces.clear();
            core.index
                .lookup(offset, len, true, &|s| core.segments.gen(s), &mut pieces);
            match self.copy_cached(offset, bufs, &pieces) {
                Ok(true) => break,
                Ok(false) => {
                    abort_fills(self, pieces.drain(..));
                    continue;
                }
                Err(e) => {
                    abort_fills(self, pieces.drain(..));
                    self.pieces = pieces;
                    return Outcome::Done(Err(e));
                }
            }
        }
        let misses: Vec<_> = pieces
            .drain(..)
            .filter_map(|p| match p {
                Piece::Miss { off, len, ticket } => Some((off, len, ticket)),
                _ => None,
            })
            .collect();
        self.pieces = pieces;
        core.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
        if misses.is_empty() {
            core.stats.read_hits.fetch_add(1, Ordering::Relaxed);
            return Outcome::Done(Ok(()));
        }
        core.stats.read_misses.fetch_add(1, Ordering::Relaxed);
        let core = self.core.clone();
        let read = self.next_id();
        self.reads.insert(
            read,
            ReadInFlight {
                tag,
                parts: misses.len(),
                error: None,
            },
        );
        for (off, len, ticket) in misses {
            let guest = DataSeg::sub_range(bufs, off - offset, len as u64);
            let id = self.next_id();
            let space = match &ticket {
                Some(_) => core.alloc_data(self.qid, len, true).ok().flatten(),
                None => None,
            };
            match (ticket, space) {
                (Some(ticket), Some(a)) => {
                    let into = DataSeg {
                        ptr: core.data_ptr(a.pos, a.len),
                        len: a.len as usize,
                    };
                    self.backing.read(off, &[into], id);
                    self.misses.insert(
                        id,
                        MissRead::Fill {
                            read,
                            ticket,
                            pos: a.pos,
                            len,
                            guest,
                        },
                    );
                }
                (ticket, _) => {
                    if let Some(t) = ticket {
                        core.index.abort_fill(t);
                    }
                    self.backing.read(off, &guest, id);
                    self.misses.insert(id, MissRead::Direct { read });
                }
            }
        }
        Outcome::Pending
    }

    /// Copy hits and zeroes into the guest buffers. `Ok(false)` when a segment was reused
    /// while we copied from it, so the lookup must be redone.
    ///
    /// With data CRC on, the CRC covers the whole on-media extent a key was cut from, so a hit
    /// on part of it reads the whole extent once into a buffer, checks the CRC of that copy and
    /// serves the guest from the same copy: the bytes served are exactly bytes that were
    /// verified. A mismatch only counts as corruption when the segment's generation still
    /// holds after the copy; a changed generation means GC and a new write reused the space
    /// under us, and the lookup is redone instead.
    pub(super) fn copy_cached(
        &self,
        offset: u64,
        bufs: &[DataSeg],
        pieces: &[Piece],
    ) -> Result<bool, IoError> {
        let core = &self.core;
        let mut extent = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Hit { off, len, key } => {
                    if !core.data_crc {
                        let src = core.data_ptr(key.pos, *len);
                        if *off == offset && *len as u64 == DataSeg::total_len(bufs) {
                            // One hit covering the whole read: no sub-list to build.
                            // SAFETY: as below, with `bufs` itself as the destination.
                            unsafe { DataSeg::scatter(bufs, src) };
                            continue;
                        }
                        let dst = DataSeg::sub_range(bufs, off - offset, *len as u64);
                        // SAFETY: `dst` is guest memory valid for this request (DataSeg
                        // contract); the source is cache space inside the mapping
                        // (bounds-checked by `data_ptr`). A concurrent reuse of the segment is
                        // caught by the generation check below.
                        unsafe { DataSeg::scatter(&dst, src) };
                        continue;
                    }
                    let dst = DataSeg::sub_range(bufs, off - offset, *len as u64);
                    let span = &key.crc;
                    extent.resize(span.len as usize, 0);
                    let read = core.media.read(core.media_offset(span.pos), &mut extent);
                    let intact = read.is_ok() && format::data_crc(&extent) == span.crc;
                    fence(Ordering::Acquire);
                    if core.segments.gen(key.pos.seg) != key.gen {
                        return Ok(false);
                    }
                    if !intact {
                        core.stats.crc_errors.fetch_add(1, Ordering::Relaxed);
                        log::error!(
                            "data CRC mismatch in cached extent at backing byte {} (cache segment {} offset {}); answering the read with an I/O error",
                            key.off, span.pos.seg, span.pos.off
                        );
                        return Err(IoError::DataCrc {
                            offset: *off,
                            len: *len,
                        });
                    }
                    let skip = key.pos.off.wrapping_sub(span.pos.off) as usize;
                    let served = &extent[skip..skip + *len as usize];
                    // SAFETY: `dst` is guest memory valid for this request (DataSeg contract);
                    // the source is our own buffer of exactly `len` bytes.
                    unsafe { DataSeg::scatter(&dst, served.as_ptr()) };
                }
                Piece::Zeroes { off, len } => {
                    let dst = DataSeg::sub_range(bufs, off - offset, *len as u64);
                    // SAFETY: guest memory valid for this request (DataSeg contract).
                    unsafe { DataSeg::zero(&dst) };
                }
                Piece::Miss { .. } => {}
            }
        }
        fence(Ordering::Acquire);
        Ok(pieces.iter().all(|p| match p {
            Piece::Hit { key, .. } => core.segments.gen(key.pos.seg) == key.gen,
            _ => true,
        }))
    }

    /// A backing read of a miss finished.
    pub(super) fn miss_done(&mut self, id: u64, res: io::Result<()>) {
        let Some(miss) = self.misses.remove(&id) else {
            return;
        };
        let core = self.core.clone();
        let (read, error) = match miss {
            MissRead::Direct { read } => (read, res.err().map(IoError::Backing)),
            MissRead::Fill {
                read,
                ticket,
                pos,
                len,
                guest,
            } => match res {
                Ok(()) => {
                    // SAFETY: `guest` is valid for this request (DataSeg contract); the source
                    // is the cache space this fill owns (pinned until `unpin` below).
                    unsafe { DataSeg::scatter(&guest, core.data_ptr(pos, len)) };
                    fill::submit(&core, Filled { ticket, pos, len });
                    (read, None)
                }
                Err(e) => {
                    core.index.abort_fill(ticket);
                    core.unpin(pos.seg);
                    (read, Some(IoError::Backing(e)))
                }
            },
        };
        if let Some(e) = &error {
            log::warn!("backing read for a cache miss failed: {}", ErrorChain(e));
        }
        let Some(r) = self.reads.get_mut(&read) else {
            return;
        };
        r.parts -= 1;
        if r.error.is_none() {
            r.error = error;
        }
        if r.parts == 0 {
            let r = self.reads.remove(&read).expect("present above");
            self.completed.push((r.tag, r.error.map_or(Ok(()), Err)));
        }
    }
}

fn abort_fills(q: &CacheQueue, pieces: impl Iterator<Item = Piece>) {
    for p in pieces {
        if let Piece::Miss {
            ticket: Some(t), ..
        } = p
        {
            q.core.index.abort_fill(t);
        }
    }
}
