// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One request of a [`super::BackingQueue`] as a sequence of io_uring operations.
//!
//! A job has at most one operation in the ring at a time. It moves through phases: a plain
//! transfer, a read-modify-write (read the surrounding aligned blocks, patch, write them back),
//! a fallocate that falls back mode by mode and finally to writing zeroes chunk by chunk, and an
//! optional fdatasync at the end.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use super::bounce::{
    align_down, align_up, copy_from_segs, copy_to_segs, fill_iovecs, next_zero_chunk_end,
    segs_aligned, segs_to_iovecs, AlignedBuf, MAX_IOVECS,
};
use super::image::BackingImage;
use super::sys;
use crate::engine::DataSeg;

/// Where the bytes of a write come from.
pub(crate) enum WriteSrc {
    Segs(Vec<DataSeg>),
    /// Zeroes: the queue's shared zero buffer of `ZERO_CHUNK` bytes (never written to).
    Zeroes(*const u8),
}

/// A readv/writev that continues after short transfers.
pub(crate) struct Transfer {
    offset: u64,
    iovecs: Vec<libc::iovec>,
    first: usize,
    remaining: u64,
    rw_flags: i32,
    /// Owns the memory the iovecs point at when the request bounces.
    bounce: Option<AlignedBuf>,
}

// SAFETY: the iovecs point into the caller's DataSegs (Send by contract) or into `bounce`.
unsafe impl Send for Transfer {}

impl Transfer {
    fn new(offset: u64, iovecs: Vec<libc::iovec>, rw_flags: i32) -> Transfer {
        let remaining = iovecs.iter().map(|v| v.iov_len as u64).sum();
        Transfer {
            offset,
            iovecs,
            first: 0,
            remaining,
            rw_flags,
            bounce: None,
        }
    }

    fn bounced(offset: u64, mut buf: AlignedBuf, rw_flags: i32) -> Transfer {
        let iovec = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut xfer = Transfer::new(offset, vec![iovec], rw_flags);
        xfer.bounce = Some(buf);
        xfer
    }

    fn advance(&mut self, done: u64) {
        let done = done.min(self.remaining);
        self.offset += done;
        self.remaining -= done;
        let mut left = done as usize;
        while left > 0 {
            let iov = &mut self.iovecs[self.first];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                self.first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(left).cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
    }

    fn sqe(&self, fd: RawFd, write: bool) -> squeue::Entry {
        let iovecs = &self.iovecs[self.first..];
        let count = iovecs.len().min(MAX_IOVECS) as u32;
        if write {
            opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(self.offset)
                .rw_flags(self.rw_flags)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(self.offset)
                .rw_flags(self.rw_flags)
                .build()
        }
    }
}

pub(crate) enum Phase {
    Read {
        xfer: Transfer,
        /// For a bounced read: where the requested bytes start in the bounce buffer, and the
        /// caller's segments to copy them into.
        copy_back: Option<(usize, Vec<DataSeg>)>,
    },
    Write {
        xfer: Transfer,
    },
    RmwRead {
        xfer: Transfer,
        range: (u64, u64),
        skip: usize,
        len: usize,
        src: WriteSrc,
        dsync: bool,
    },
    RmwWrite {
        xfer: Transfer,
    },
    Fallocate {
        offset: u64,
        len: u64,
        modes: &'static [i32],
        next: usize,
    },
    Fsync,
}

/// What became of a job after one of its operations completed.
pub(crate) enum Step {
    /// Its next operation is ready to go into the ring.
    Again,
    Finished(io::Result<()>),
}

struct ZeroFill {
    cursor: u64,
    end: u64,
    zeroes: *const u8,
}

pub(crate) struct Job {
    pub(crate) user_data: u64,
    phase: Phase,
    /// The aligned range this job's read-modify-write holds in the image's `RangeLocks`.
    pub(crate) locked: Option<(u64, u64)>,
    fill: Option<ZeroFill>,
    then_fsync: bool,
    /// For a zeroing job, the aligned range it holds while it runs.
    zeroing_range: Option<(u64, u64)>,
    /// The iovec array of the zero-copy transfer it finished, for the queue to reuse.
    spent_iovecs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in a job point at caller segments (Send by contract), its own bounce
// buffer, or the owning queue's zero buffer, which outlives every job.
unsafe impl Send for Job {}

/// `iovecs` is an array to reuse for the transfer (any contents).
pub(crate) fn plan_read(
    image: &BackingImage,
    offset: u64,
    segs: &[DataSeg],
    iovecs: Vec<libc::iovec>,
) -> Phase {
    let align = image.io_align();
    let len = DataSeg::total_len(segs);
    let (start, end) = (align_down(offset, align), align_up(offset + len, align));
    if start == offset && end == offset + len && segs_aligned(segs, align) {
        return Phase::Read {
            xfer: Transfer::new(offset, fill_iovecs(iovecs, segs), 0),
            copy_back: None,
        };
    }
    let buf = AlignedBuf::zeroed((end - start) as usize, align);
    Phase::Read {
        xfer: Transfer::bounced(start, buf, 0),
        copy_back: Some(((offset - start) as usize, segs.to_vec())),
    }
}

/// A write from the caller's segments: straight from them when everything is aligned (with
/// `iovecs`, an array to reuse), otherwise through a copy of the segment list.
pub(crate) fn plan_write_segs(
    image: &BackingImage,
    offset: u64,
    segs: &[DataSeg],
    dsync: bool,
    iovecs: Vec<libc::iovec>,
) -> Phase {
    let align = image.io_align();
    let len = DataSeg::total_len(segs);
    let aligned = align_down(offset, align) == offset && align_down(len, align) == len;
    if aligned && segs_aligned(segs, align) {
        let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
        return Phase::Write {
            xfer: Transfer::new(offset, fill_iovecs(iovecs, segs), rw_flags),
        };
    }
    plan_write(image, offset, len, WriteSrc::Segs(segs.to_vec()), dsync)
}

pub(crate) fn plan_write(
    image: &BackingImage,
    offset: u64,
    len: u64,
    src: WriteSrc,
    dsync: bool,
) -> Phase {
    let align = image.io_align();
    let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
    let (start, end) = (align_down(offset, align), align_up(offset + len, align));
    if start != offset || end != offset + len {
        let buf = AlignedBuf::zeroed((end - start) as usize, align);
        return Phase::RmwRead {
            xfer: Transfer::bounced(start, buf, 0),
            range: (start, end),
            skip: (offset - start) as usize,
            len: len as usize,
            src,
            dsync,
        };
    }
    let xfer = match src {
        WriteSrc::Segs(segs) if segs_aligned(&segs, align) => {
            Transfer::new(offset, segs_to_iovecs(&segs), rw_flags)
        }
        WriteSrc::Segs(segs) => {
            let mut buf = AlignedBuf::zeroed(len as usize, align);
            copy_from_segs(&segs, buf.as_mut_slice());
            Transfer::bounced(offset, buf, rw_flags)
        }
        WriteSrc::Zeroes(zeroes) => {
            let iovec = libc::iovec {
                iov_base: zeroes as *mut libc::c_void,
                iov_len: len as usize,
            };
            Transfer::new(offset, vec![iovec], rw_flags)
        }
    };
    Phase::Write { xfer }
}

impl Job {
    /// The iovec array of the job's current transfer, for reuse once the job has finished.
    pub(crate) fn take_iovecs(&mut self) -> Vec<libc::iovec> {
        if self.spent_iovecs.capacity() > 0 {
            return std::mem::take(&mut self.spent_iovecs);
        }
        match &mut self.phase {
            Phase::Read { xfer, .. }
            | Phase::Write { xfer }
            | Phase::RmwRead { xfer, .. }
            | Phase::RmwWrite { xfer } => std::mem::take(&mut xfer.iovecs),
            Phase::Fallocate { .. } | Phase::Fsync => Vec::new(),
        }
    }

    pub(crate) fn new(user_data: u64, phase: Phase) -> Job {
        Job {
            user_data,
            phase,
            locked: None,
            fill: None,
            then_fsync: false,
            zeroing_range: None,
            spent_iovecs: Vec::new(),
        }
    }

    /// A write-zeroes or discard: fallocate with `modes` in turn, then plain zero writes from
    /// `zeroes`; `durable` adds an fdatasync at the end. The job holds `range` (the aligned
    /// blocks it touches) in the image's `RangeLocks` from its first operation to its end: a
    /// read-modify-write of one of those blocks running meanwhile would write the block's old
    /// bytes back over the zeroes.
    pub(crate) fn zeroing(
        user_data: u64,
        (offset, len): (u64, u64),
        range: (u64, u64),
        modes: &'static [i32],
        zeroes: *const u8,
        durable: bool,
    ) -> Job {
        let phase = Phase::Fallocate {
            offset,
            len,
            modes,
            next: 0,
        };
        let mut job = Job::new(user_data, phase);
        job.fill = Some(ZeroFill {
            cursor: offset,
            end: offset,
            zeroes,
        });
        job.then_fsync = durable;
        job.zeroing_range = Some(range);
        job
    }

    /// The range this job must lock before its next operation, if it does not hold it yet.
    pub(crate) fn wants_lock(&self) -> Option<(u64, u64)> {
        match (&self.phase, self.locked) {
            (Phase::RmwRead { range, .. }, None) => Some(*range),
            (Phase::Fallocate { .. }, None) => self.zeroing_range,
            _ => None,
        }
    }

    pub(crate) fn release_lock(&mut self, image: &BackingImage) {
        if let Some((start, end)) = self.locked.take() {
            image.rmw_locks.unlock(start, end);
        }
    }

    pub(crate) fn sqe(&self, fd: RawFd) -> squeue::Entry {
        match &self.phase {
            Phase::Read { xfer, .. } | Phase::RmwRead { xfer, .. } => xfer.sqe(fd, false),
            Phase::Write { xfer } | Phase::RmwWrite { xfer } => xfer.sqe(fd, true),
            Phase::Fallocate {
                offset,
                len,
                modes,
                next,
            } => opcode::Fallocate::new(types::Fd(fd), *len)
                .offset(*offset)
                .mode(modes[*next])
                .build(),
            Phase::Fsync => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    /// Account for the completion `res` of this job's operation.
    pub(crate) fn complete(&mut self, res: i32, image: &BackingImage) -> Step {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return Step::Again;
        }
        match &mut self.phase {
            Phase::Fallocate {
                offset,
                len,
                modes,
                next,
            } if res < 0 && sys::fallocate_unsupported(-res) => {
                *next += 1;
                if *next < modes.len() {
                    return Step::Again;
                }
                let fill = self.fill.as_mut().expect("a zeroing job has a fill");
                fill.cursor = *offset;
                fill.end = *offset + *len;
                return self.next_piece(image);
            }
            Phase::Fallocate { .. } | Phase::Fsync if res < 0 => {
                return Step::Finished(Err(io::Error::from_raw_os_error(-res)));
            }
            Phase::Fallocate { .. } | Phase::Fsync => {}
            Phase::Read { xfer, .. }
            | Phase::RmwRead { xfer, .. }
            | Phase::Write { xfer }
            | Phase::RmwWrite { xfer } => {
                if res < 0 {
                    return Step::Finished(Err(io::Error::from_raw_os_error(-res)));
                }
                if res == 0 {
                    return Step::Finished(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "backing image {} transferred nothing at offset {}",
                            image.path().display(),
                            xfer.offset
                        ),
                    )));
                }
                xfer.advance(res as u64);
                if xfer.remaining > 0 {
                    return Step::Again;
                }
            }
        }
        self.phase_done(image)
    }

    fn phase_done(&mut self, image: &BackingImage) -> Step {
        let placeholder = Phase::Fsync;
        match std::mem::replace(&mut self.phase, placeholder) {
            Phase::Read {
                xfer,
                copy_back: Some((skip, segs)),
            } => {
                let buf = xfer
                    .bounce
                    .as_ref()
                    .expect("a bounced read owns its buffer");
                let len = DataSeg::total_len(&segs) as usize;
                copy_to_segs(&buf.as_slice()[skip..skip + len], &segs);
                self.next_piece(image)
            }
            Phase::RmwRead {
                mut xfer,
                range,
                skip,
                len,
                src,
                dsync,
            } => {
                let mut buf = xfer
                    .bounce
                    .take()
                    .expect("a read-modify-write owns its buffer");
                let patch = &mut buf.as_mut_slice()[skip..skip + len];
                match src {
                    WriteSrc::Segs(segs) => copy_from_segs(&segs, patch),
                    WriteSrc::Zeroes(_) => patch.fill(0),
                }
                let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
                self.phase = Phase::RmwWrite {
                    xfer: Transfer::bounced(range.0, buf, rw_flags),
                };
                Step::Again
            }
            Phase::RmwWrite { .. } => {
                self.release_lock(image);
                self.next_piece(image)
            }
            Phase::Fsync => Step::Finished(Ok(())),
            Phase::Fallocate { .. } => {
                // fallocate did the whole range: no zero writes left.
                self.fill = None;
                self.next_piece(image)
            }
            Phase::Read { mut xfer, .. } | Phase::Write { mut xfer } => {
                self.spent_iovecs = std::mem::take(&mut xfer.iovecs);
                self.next_piece(image)
            }
        }
    }

    /// Start the next zero-fill chunk, or the final fdatasync, or finish.
    fn next_piece(&mut self, image: &BackingImage) -> Step {
        if let Some(fill) = self.fill.as_mut().filter(|f| f.cursor < f.end) {
            let next = next_zero_chunk_end(fill.cursor, fill.end, image.io_align());
            let (offset, len) = (fill.cursor, next - fill.cursor);
            fill.cursor = next;
            let zeroes = WriteSrc::Zeroes(fill.zeroes);
            self.phase = plan_write(image, offset, len, zeroes, false);
            return Step::Again;
        }
        if self.then_fsync {
            self.then_fsync = false;
            self.phase = Phase::Fsync;
            return Step::Again;
        }
        Step::Finished(Ok(()))
    }
}
