// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One thread's asynchronous path to a backing image: an io_uring plus an eventfd doorbell.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::IoUring;

use super::bounce::{align_down, align_up, AlignedBuf, ZERO_CHUNK};
use super::error::BackingError;
use super::image::BackingImage;
use super::job::{plan_read, plan_write_segs, Job, Step};
use super::sys::{self, EventFd};
use crate::engine::DataSeg;

/// Most operations one queue keeps in its ring; more requests wait inside the queue.
const MAX_DEPTH: u32 = 4096;

/// Submits requests to one backing image through an io_uring. Not shared between threads:
/// each worker opens its own. Every request completes exactly once, through `reap` or `wait`,
/// with the caller's `user_data`.
pub struct BackingQueue {
    image: Arc<BackingImage>,
    ring: IoUring,
    doorbell: Arc<EventFd>,
    depth: usize,
    /// Jobs by slot; a slot number is the io_uring user_data of the job's current operation.
    slots: Vec<Option<Job>>,
    free_slots: Vec<usize>,
    live_jobs: usize,
    /// Operations in the ring (pushed and not yet completed).
    ring_ops: usize,
    /// Jobs whose next operation has yet to enter the ring.
    runnable: VecDeque<usize>,
    /// Jobs waiting for a read-modify-write range another cycle holds.
    blocked: Vec<usize>,
    /// Completions not yet handed out.
    ready: Vec<(u64, io::Result<()>)>,
    /// Source for zero-filling fallbacks; allocated on first use.
    zeroes: Option<AlignedBuf>,
    /// Iovec arrays of finished jobs, reused by new ones: no allocation per request.
    spare_iovecs: SpareIovecs,
    /// Completion entries of one pass over the ring, reused from pass to pass.
    cqes: Vec<(u64, i32)>,
    /// New operations wait in the submission queue until the next `reap` or `wait`, or until
    /// this many wait (`usize::MAX`: only then); 1 submits each at once.
    submit_group: usize,
    /// System calls that gave the kernel entries.
    #[cfg(test)]
    submissions: usize,
}

/// How many deferred entries a queue worker lets wait before they enter the kernel
/// ([`BackingQueue::defer_submit`]), rather than only at the end of its batch: a worker decodes
/// and dispatches up to a ring's worth of requests (a few microseconds each), and the first of
/// a batch of 32 waiting for all of them to be decoded cost a disk-bound 4 KiB random read load
/// at QD32 a fifth of its rate (46k against 53-60k IOPS with one submit per request,
/// `benches/compare.sh`'s read-miss case on `--cache none`; 56-58k with groups of 4). Groups
/// of 4 keep the system calls per request at a quarter.
pub const WORKER_SUBMIT_GROUP: usize = 4;

impl BackingQueue {
    pub fn new(image: Arc<BackingImage>, depth: u32) -> Result<BackingQueue, BackingError> {
        let ring_err = |source| BackingError::Ring {
            path: image.path().to_owned(),
            source,
        };
        let depth = depth.clamp(1, MAX_DEPTH);
        let ring = IoUring::new(depth.next_power_of_two()).map_err(ring_err)?;
        let doorbell = Arc::new(EventFd::new().map_err(ring_err)?);
        ring.submitter()
            .register_eventfd(doorbell.raw())
            .map_err(ring_err)?;
        image.rmw_locks.register_waiter(Arc::downgrade(&doorbell));
        Ok(BackingQueue {
            image,
            ring,
            doorbell,
            depth: depth as usize,
            slots: Vec::new(),
            free_slots: Vec::new(),
            live_jobs: 0,
            ring_ops: 0,
            runnable: VecDeque::new(),
            blocked: Vec::new(),
            ready: Vec::new(),
            zeroes: None,
            spare_iovecs: SpareIovecs(Vec::new()),
            cqes: Vec::new(),
            submit_group: 1,
            #[cfg(test)]
            submissions: 0,
        })
    }

    /// From now on a request enters the kernel at the next `reap` or `wait`, with every other
    /// request queued since, or as soon as `group` of them wait: one system call per batch (or
    /// group) instead of one per request. Only for a caller that reaps or waits after each
    /// batch it submits (a queue worker reaps at the end of every pass over its ring, writeback
    /// waits for each kset); otherwise its requests would never start. `usize::MAX`: no group
    /// limit.
    pub fn defer_submit(&mut self, group: usize) {
        self.submit_group = group.max(1);
    }

    /// Operations in the submission queue that the kernel has not been given yet.
    #[cfg(test)]
    pub(crate) fn unsubmitted(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// System calls so far that gave the kernel entries (each may carry many).
    #[cfg(test)]
    pub(crate) fn submissions(&self) -> usize {
        self.submissions
    }

    pub fn image(&self) -> &Arc<BackingImage> {
        &self.image
    }

    /// Readable when completions are ready for `reap`.
    pub fn event_fd(&self) -> RawFd {
        self.doorbell.raw()
    }

    pub fn read(&mut self, offset: u64, bufs: &[DataSeg], user_data: u64) {
        let len = DataSeg::total_len(bufs);
        if let Err(e) = self.image.check_range(offset, len) {
            return self.finish_now(user_data, Err(e));
        }
        if len == 0 {
            return self.finish_now(user_data, Ok(()));
        }
        let iovecs = self.spare_iovecs.0.pop().unwrap_or_default();
        let phase = plan_read(&self.image, offset, bufs, iovecs);
        self.start(Job::new(user_data, phase));
    }

    /// With `dsync` the write is durable when it completes (RWF_DSYNC).
    pub fn write(&mut self, offset: u64, bufs: &[DataSeg], dsync: bool, user_data: u64) {
        let len = DataSeg::total_len(bufs);
        if self.answered_before_writing(offset, len, user_data) {
            return;
        }
        let iovecs = self.spare_iovecs.0.pop().unwrap_or_default();
        let phase = plan_write_segs(&self.image, offset, bufs, dsync, iovecs);
        self.start(Job::new(user_data, phase));
    }

    /// fdatasync: makes every write completed before it durable.
    pub fn flush(&mut self, user_data: u64) {
        #[cfg(test)]
        self.image.before_flush();
        #[cfg(test)]
        if self.image.writes_fail() {
            return self.finish_now(user_data, Err(injected_failure()));
        }
        self.start(Job::new(user_data, super::job::Phase::Fsync));
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool, user_data: u64) {
        self.zeroing(offset, len, may_unmap, false, user_data);
    }

    /// Like `write_zeroes`, and durable on completion (an fdatasync follows).
    pub fn write_zeroes_dsync(&mut self, offset: u64, len: u64, may_unmap: bool, user_data: u64) {
        self.zeroing(offset, len, may_unmap, true, user_data);
    }

    /// The range reads as zeroes afterwards (a hole punch where possible).
    pub fn discard(&mut self, offset: u64, len: u64, user_data: u64) {
        self.zeroing(offset, len, true, false, user_data);
    }

    /// Like `discard`, and durable on completion (an fdatasync follows).
    pub fn discard_dsync(&mut self, offset: u64, len: u64, user_data: u64) {
        self.zeroing(offset, len, true, true, user_data);
    }

    /// Append ready completions to `out` without blocking.
    pub fn reap(&mut self, out: &mut Vec<(u64, io::Result<()>)>) {
        // Clear first: a completion posted after the drain below rings the doorbell again.
        self.doorbell.clear();
        self.process_completions();
        self.pump();
        out.append(&mut self.ready);
    }

    /// Block until every request submitted so far has completed, appending the completions.
    /// Entries not yet given to the kernel (deferred, or the next operations of running jobs)
    /// enter it with the wait itself: one system call per round.
    pub fn wait(&mut self, out: &mut Vec<(u64, io::Result<()>)>) {
        loop {
            // `reap` without its submit: the wait below submits.
            self.doorbell.clear();
            self.process_completions();
            self.fill_ring();
            out.append(&mut self.ready);
            if self.live_jobs == 0 {
                return;
            }
            if self.ring_ops > 0 {
                #[cfg(test)]
                let submitting = !self.ring.submission().is_empty();
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {
                        #[cfg(test)]
                        {
                            self.submissions += usize::from(submitting);
                        }
                    }
                    Err(e) if is_transient(&e) => {}
                    Err(e) => {
                        log::error!("io_uring wait on {}: {e}", self.image.path().display());
                        // Entries the kernel refused are submitted again on the next round;
                        // waiting for a completion now might wait for one that never comes.
                        if self.ring.submission().is_empty() {
                            self.doorbell.wait_readable();
                        }
                    }
                }
            } else {
                // Only jobs blocked on another queue's read-modify-write (whose release rings
                // our doorbell) or a stalled submission (which rang it already) remain.
                self.doorbell.wait_readable();
            }
        }
    }

    /// Requests submitted and not yet handed out by `reap` or `wait`.
    pub fn in_flight(&self) -> usize {
        self.live_jobs + self.ready.len()
    }

    /// Answers a write-like request that must not reach the image (read-only, out of range,
    /// an injected test failure) or needs no I/O (empty); true when it was answered.
    fn answered_before_writing(&mut self, offset: u64, len: u64, user_data: u64) -> bool {
        #[cfg(test)]
        if self.image.writes_fail() {
            self.finish_now(user_data, Err(injected_failure()));
            return true;
        }
        let checked = self
            .image
            .check_writable()
            .and_then(|()| self.image.check_range(offset, len));
        match checked {
            Err(e) => self.finish_now(user_data, Err(e)),
            Ok(()) if len == 0 => self.finish_now(user_data, Ok(())),
            Ok(()) => return false,
        }
        true
    }

    fn zeroing(&mut self, offset: u64, len: u64, may_unmap: bool, durable: bool, user_data: u64) {
        if self.answered_before_writing(offset, len, user_data) {
            return;
        }
        let align = self.image.alignment().max(4096);
        let zeroes = self
            .zeroes
            .get_or_insert_with(|| AlignedBuf::zeroed(ZERO_CHUNK, align))
            .as_ptr();
        let modes = sys::zeroing_modes(may_unmap);
        let io_align = self.image.io_align();
        let range = (
            align_down(offset, io_align),
            align_up(offset + len, io_align),
        );
        self.start(Job::zeroing(
            user_data,
            (offset, len),
            range,
            modes,
            zeroes,
            durable,
        ));
    }

    fn finish_now(&mut self, user_data: u64, result: io::Result<()>) {
        self.ready.push((user_data, result));
        self.doorbell.signal();
    }

    fn start(&mut self, job: Job) {
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot] = Some(job);
                slot
            }
            None => {
                self.slots.push(Some(job));
                self.slots.len() - 1
            }
        };
        self.live_jobs += 1;
        self.runnable.push_back(slot);
        self.fill_ring();
        if self.ring.submission().len() >= self.submit_group {
            self.submit_ring();
        }
    }

    /// Move runnable jobs into the ring, up to `depth` operations, and submit.
    fn pump(&mut self) {
        self.fill_ring();
        self.submit_ring();
    }

    /// Move runnable jobs into the submission queue, up to `depth` operations.
    fn fill_ring(&mut self) {
        for slot in self.blocked.drain(..).rev() {
            self.runnable.push_front(slot);
        }
        let fd = self.image.raw_fd();
        while self.ring_ops < self.depth {
            let Some(slot) = self.runnable.pop_front() else {
                break;
            };
            let job = self.slots[slot]
                .as_mut()
                .expect("runnable slot holds a job");
            if let Some((start, end)) = job.wants_lock() {
                if !self.image.rmw_locks.try_lock(start, end) {
                    self.blocked.push(slot);
                    continue;
                }
                job.locked = Some((start, end));
            }
            let sqe = job.sqe(fd).user_data(slot as u64);
            // SAFETY: the buffers the entry points at (caller segments, the job's bounce
            // buffer, the queue's zero buffer, the job's iovec array) stay alive and unmoved
            // until its completion is reaped: the job stays in its slot until then, and Drop
            // waits for every operation in the ring.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                self.runnable.push_front(slot);
                break;
            }
            self.ring_ops += 1;
        }
    }

    fn submit_ring(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    #[cfg(test)]
                    {
                        self.submissions += 1;
                    }
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    if !is_transient(&e) {
                        log::error!("io_uring submit on {}: {e}", self.image.path().display());
                    }
                    // The entries stay in the submission queue; ring the doorbell so the
                    // caller comes back to `reap`, which submits them again.
                    self.doorbell.signal();
                    return;
                }
            }
        }
    }

    fn process_completions(&mut self) {
        let mut done = std::mem::take(&mut self.cqes);
        done.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for (slot, res) in done.drain(..) {
            let slot = slot as usize;
            self.ring_ops -= 1;
            let job = self.slots[slot]
                .as_mut()
                .expect("completion for a live job");
            match job.complete(res, &self.image) {
                Step::Again => self.runnable.push_back(slot),
                Step::Finished(result) => {
                    job.release_lock(&self.image);
                    self.ready.push((job.user_data, result));
                    let mut iovecs = job.take_iovecs();
                    // Up to as many as jobs were ever live at once: writeback hands over a
                    // whole kset, more jobs than the ring's depth, and each needs an array.
                    if iovecs.capacity() > 0 && self.spare_iovecs.0.len() < self.slots.len() {
                        iovecs.clear();
                        self.spare_iovecs.0.push(iovecs);
                    }
                    self.slots[slot] = None;
                    self.free_slots.push(slot);
                    self.live_jobs -= 1;
                }
            }
        }
        self.cqes = done;
    }
}

/// Emptied iovec arrays kept for reuse.
struct SpareIovecs(Vec<Vec<libc::iovec>>);

// SAFETY: every array in the pool is empty (cleared before it is put back), so no raw pointer
// crosses threads with it.
unsafe impl Send for SpareIovecs {}

#[cfg(test)]
fn injected_failure() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl Drop for BackingQueue {
    fn drop(&mut self) {
        // The kernel may still read or write memory this queue owns: wait for it.
        let mut lost = Vec::new();
        self.wait(&mut lost);
        if !lost.is_empty() {
            log::debug!(
                "backing queue for {} dropped with {} unreaped completions",
                self.image.path().display(),
                lost.len()
            );
        }
    }
}
