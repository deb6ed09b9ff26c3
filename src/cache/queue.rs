// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One worker thread's handle on the cache engine: the request paths' shared state.
//!
//! Writes are copied into the cache in `submit`. In pmem mode they are persisted there too,
//! and all writes of a batch are made durable by one fence in `reap`; in msync mode (group
//! commit) nothing is synced per write, because the log syncs the data of a kset's keys before
//! it writes the kset. Either way the writes are then inserted into the index and logged, and
//! completed: a write completes once its data is in the cache media and will reach it before
//! its key does; the key may still wait in an open kset (see `log`). Reads are served from the cache where it holds the data and from the backing image
//! where it does not, filling the cache on the way (`read`). The 1 s kset timer and the "room
//! again" eventfd are part of this queue's poll fds, so they run in the worker's event loop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::core::Core;
use super::format::KeyRecord;
use super::index::{FillTicket, Piece};
use super::media::Persistence;
use super::CachePos;
use crate::backing::BackingQueue;
use crate::engine::{
    DataSegs, EngineQueue, ErrorChain, IoError, IoResult, Request, RequestKind, Submit,
};

/// io_uring depth of a queue's backing reads.
const BACKING_DEPTH: u32 = 128;

/// Period of the kset timer: ksets are closed by age at least this often.
const TICK: Duration = Duration::from_millis(super::log::KSET_MAX_AGE.as_millis() as u64 / 2);

/// How soon the kset timer is looked at again when it had not fired yet at the moment its
/// schedule says it should have (it is armed just before that schedule starts, so this is
/// rare): the fd is not readable meanwhile, so this costs no spinning.
const TICK_RETRY: Duration = Duration::from_micros(100);

/// Why a queue could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot set up backing I/O")]
    Backing(#[source] crate::backing::BackingError),
    #[error("cannot create the kset timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error("cannot create the eventfd that signals free space")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the log committer thread")]
    Committer(#[source] std::io::Error),
}

/// What a request path did with a request.
pub(super) enum Outcome {
    Done(IoResult),
    Pending,
    /// No room in the cache: hand the request back to the worker.
    Busy,
}

/// A write whose data is in the cache (and persisted in pmem mode), waiting for the batch's
/// fence.
pub(super) struct StagedWrite {
    pub tag: u64,
    /// Its keys in the queue's `staged_keys`, each with the pin on its segment taken at
    /// allocation (one vector for the whole batch: no allocation per write).
    pub keys: std::ops::Range<usize>,
    /// False for a leading part of a write larger than the free space: it is logged, and
    /// the write completes with its last part.
    pub last: bool,
    /// Backing offsets of the keys of the write's earlier parts.
    pub earlier: Vec<u64>,
}

/// How far a write that went Busy after some of it was staged has come; the worker hands the
/// same request back, and it goes on from there.
pub(super) struct PartialWrite {
    pub tag: u64,
    pub offset: u64,
    pub len: u64,
    /// The request's first buffer, so a different request with the same tag is not mistaken
    /// for it.
    pub first_buf: usize,
    pub copied: u64,
    pub offs: Vec<u64>,
}

/// A write that completes only once the ksets holding its keys are on the media (write cache
/// off or drained mode) and, in drained mode, once writeback has put it on the backing image.
pub(super) struct HeldWrite {
    pub tag: u64,
    /// Backing offsets of its keys, which name the ksets to close.
    pub offs: Vec<u64>,
    /// Drained mode: complete only after writeback.
    pub write_back: bool,
    /// Set once its ksets are closed in drained mode: the log sequence dirty_tail must reach.
    pub until_seq: Option<u64>,
}

/// A read waiting for its backing parts.
pub(super) struct ReadInFlight {
    pub tag: u64,
    pub parts: usize,
    pub error: Option<IoError>,
}

/// One backing read of a read miss.
pub(super) enum MissRead {
    /// Straight into the guest's buffers; the cache is not filled.
    Direct { read: u64 },
    /// Into cache space at `pos`, then copied to the guest and logged as a clean key.
    Fill {
        read: u64,
        ticket: FillTicket,
        pos: CachePos,
        len: u32,
        guest: DataSegs,
    },
}

pub struct CacheQueue {
    pub(super) core: Arc<Core>,
    pub(super) qid: usize,
    pub(super) backing: BackingQueue,
    /// Pmem mode: each write is persisted on submit and the batch fenced before its keys are
    /// logged. Off in msync mode (the log syncs data before the kset naming it) and volatile.
    pub(super) persist_per_write: bool,
    timer: TimerFd,
    /// Just after the timer was armed: it fires at this moment plus whole TICKs, or a little
    /// before each (the kernel started it first).
    timer_armed: Instant,
    /// The timer's fd is only looked at from this moment on (no syscall per reap).
    next_tick: Instant,
    room: EventFd,
    /// `SegmentMap::wakes` when the room eventfd was last read: the fd is read (a syscall)
    /// only after a wake-up wrote it, not on every reap.
    seen_wakes: u64,
    /// A request was handed back Busy since the last reap.
    saw_busy: bool,
    /// Backing reads were in flight at the last reap, so the doorbell must be cleared once more
    /// after the last of them (a completion can ring it after the clear that preceded it).
    backing_armed: bool,
    pub(super) staged: Vec<StagedWrite>,
    pub(super) staged_keys: Vec<KeyRecord>,
    /// The data of a write read back for its CRC (`--data-crc`), reused from write to write.
    pub(super) crc_buf: Vec<u8>,
    /// The index's answer for the read being served, reused from read to read.
    pub(super) pieces: Vec<Piece>,
    pub(super) partial: Option<PartialWrite>,
    /// Write-through writes not complete yet, in completion order.
    pub(super) unclosed: Vec<HeldWrite>,
    /// Keys of this queue's writes that the process-kill journal had no room for may still
    /// wait in open ksets: writes are held until their ksets are on the log.
    journal_behind: bool,
    pub(super) reads: HashMap<u64, ReadInFlight>,
    pub(super) misses: HashMap<u64, MissRead>,
    pub(super) next_id: u64,
    pub(super) completed: Vec<(u64, IoResult)>,
    in_flight: usize,
    backing_done: Vec<(u64, std::io::Result<()>)>,
    /// Msync mode: this queue's committer thread (it closes full ksets of every queue), and
    /// its stop flag.
    committer: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl CacheQueue {
    pub(super) fn new(core: Arc<Core>, qid: usize) -> Result<CacheQueue, QueueError> {
        let mut backing =
            BackingQueue::new(core.backing.clone(), BACKING_DEPTH).map_err(QueueError::Backing)?;
        // A batch's miss reads enter the kernel together at the reap that ends it (`reap` looks
        // at the backing queue whenever misses are in flight).
        backing.defer_submit(crate::backing::WORKER_SUBMIT_GROUP);
        let mut timer = TimerFd::new().map_err(QueueError::Timer)?;
        timer.reset(TICK, Some(TICK)).map_err(QueueError::Timer)?;
        let timer_armed = Instant::now();
        let room = EventFd::new(libc::EFD_NONBLOCK).map_err(QueueError::EventFd)?;
        core.segments
            .add_waiter(room.try_clone().map_err(QueueError::EventFd)?);
        let persist_per_write = core.media.persistence() == Persistence::Pmem;
        let committer = if core.media.persistence() == Persistence::Msync && core.background() {
            Some(spawn_committer(core.clone(), qid).map_err(QueueError::Committer)?)
        } else {
            None
        };
        Ok(CacheQueue {
            core,
            qid,
            backing,
            persist_per_write,
            timer,
            timer_armed,
            next_tick: timer_armed + TICK,
            room,
            seen_wakes: 0,
            saw_busy: false,
            backing_armed: false,
            staged: Vec::new(),
            staged_keys: Vec::new(),
            crc_buf: Vec::new(),
            pieces: Vec::new(),
            partial: None,
            unclosed: Vec::new(),
            journal_behind: false,
            reads: HashMap::new(),
            misses: HashMap::new(),
            next_id: 0,
            completed: Vec::new(),
            in_flight: 0,
            backing_done: Vec::new(),
            committer,
        })
    }

    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Fence the staged writes, put their keys in the index and the log, and complete them.
    /// Inlined test for the common case of a reap with nothing staged.
    #[inline]
    pub(super) fn commit_staged(&mut self) {
        if !self.staged.is_empty() {
            self.commit_staged_now();
        }
    }

    fn commit_staged_now(&mut self) {
        let fenced = if self.persist_per_write {
            self.core.media.fence()
        } else {
            Ok(())
        };
        // Taken out and put back empty, so their allocations serve the next batch too.
        let mut staged = std::mem::take(&mut self.staged);
        let mut keys = std::mem::take(&mut self.staged_keys);
        if let Err(e) = fenced {
            log::error!(
                "cache media fence failed; failing {} writes: {}",
                staged.len(),
                ErrorChain(&e)
            );
            for w in staged.drain(..) {
                keys[w.keys].iter().for_each(|k| self.core.unpin(k.seg));
                if w.last {
                    self.completed
                        .push((w.tag, Err(IoError::Media(e.to_string().into()))));
                } else if self.partial.as_ref().is_some_and(|p| p.tag == w.tag) {
                    // A leading part that was not logged: the write, handed back, starts over.
                    self.partial = None;
                }
            }
        } else {
            let mut unjournaled = false;
            self.core
                .count_dirty(keys.iter().map(|k| u64::from(k.len)).sum());
            for key in &keys {
                // Its pin becomes the logged key's reference on the segment.
                unjournaled |= !self.core.insert_and_log_staged(*key);
            }
            self.check_journal(unjournaled);
            for w in staged.drain(..) {
                let mine = &keys[w.keys];
                if !w.last {
                    continue;
                }
                // The offsets are gathered only for a write that is held: most complete here.
                let offs = || {
                    (w.earlier.into_iter())
                        .chain(mine.iter().map(|k| k.off))
                        .collect()
                };
                if !self.hold_if_needed(w.tag, offs) {
                    self.completed.push((w.tag, Ok(())));
                }
            }
        }
        keys.clear();
        self.staged = staged;
        self.staged_keys = keys;
        self.close_unclosed();
    }

    /// Hold a write whose keys are in the index and the log until it is as durable as the mode
    /// asks; false when it may complete now. Call only after its keys were logged: drained
    /// mode is read afterwards (SeqCst, paired with `CacheEngine::drain_and_hold`), so a write
    /// that sees it off has its keys in a kset that the drain's close covers.
    /// `offs` gives the write's region offsets, called only when it is held.
    pub(super) fn hold_if_needed(&mut self, tag: u64, offs: impl FnOnce() -> Vec<u64>) -> bool {
        if !self.must_hold() && !self.journal_behind {
            return false;
        }
        self.hold(tag, offs());
        true
    }

    /// Some keys just logged were not journaled (the journal's ring for their kset was full):
    /// a kill could lose them, so close every open kset now, or, when that fails, hold this
    /// queue's writes until it succeeds (see `journal_behind`).
    pub(super) fn check_journal(&mut self, unjournaled: bool) {
        if unjournaled || self.journal_behind {
            self.journal_behind = self.core.close_all_ksets().is_err();
        }
    }

    /// Whether a write whose keys were just logged must be held (see `hold_if_needed`).
    fn must_hold(&self) -> bool {
        self.core.drained.load(Ordering::SeqCst) || !self.core.write_cache.load(Ordering::Acquire)
    }

    fn hold(&mut self, tag: u64, offs: Vec<u64>) {
        self.unclosed.push(HeldWrite {
            tag,
            offs,
            write_back: self.core.drained.load(Ordering::SeqCst),
            until_seq: None,
        });
    }

    /// Complete held writes, oldest first, once their ksets are persisted (and, in drained
    /// mode, written back). Inlined test for the common case: no write is held.
    #[inline]
    fn close_unclosed(&mut self) {
        if !self.unclosed.is_empty() {
            self.close_held();
        }
    }

    fn close_held(&mut self) {
        while let Some(w) = self.unclosed.first_mut() {
            if w.until_seq.is_none() {
                let closed = w
                    .offs
                    .iter()
                    .all(|&off| self.core.close_kset_for(off).is_ok());
                if !closed {
                    return;
                }
                if w.write_back {
                    // Its keys are in ksets before the head now.
                    w.until_seq = Some(self.core.log.head().seq);
                }
            }
            if let Some(seq) = w.until_seq {
                if self.core.meta.dirty_tail().log_seq < seq {
                    return;
                }
            }
            let tag = w.tag;
            self.unclosed.remove(0);
            self.completed.push((tag, Ok(())));
        }
    }

    /// Read the room eventfd if a wake-up wrote it since it was last read, so a worker that
    /// waits for its fds does not wake again for the same one. Not while a request handed back
    /// Busy waits: then the fd stays readable and its worker comes back at once to retry
    /// (reading it here would leave that worker waiting for a later wake-up), and the next
    /// reap reads it.
    fn look_at_room(&mut self) {
        let wakes = self.core.segments.wakes();
        let busy = std::mem::take(&mut self.saw_busy);
        if wakes != self.seen_wakes && !busy {
            self.seen_wakes = wakes;
            let _ = self.room.read();
        }
    }

    fn handle_backing_completions(&mut self) {
        let mut done = std::mem::take(&mut self.backing_done);
        self.backing.reap(&mut done);
        for (id, res) in done.drain(..) {
            self.miss_done(id, res);
        }
        self.backing_done = done;
    }
}

impl EngineQueue for CacheQueue {
    fn submit(&mut self, req: Request) -> Submit {
        let result = match req.kind {
            RequestKind::Read { offset, ref bufs } => self.submit_read(req.tag, offset, bufs),
            RequestKind::Write { offset, ref bufs } => self.submit_write(req.tag, offset, bufs),
            RequestKind::Flush => self.submit_flush(),
            RequestKind::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => self.submit_zeroes(req.tag, offset, len, may_unmap),
            RequestKind::Discard { offset, len } => self.submit_zeroes(req.tag, offset, len, true),
        };
        match result {
            Outcome::Pending => {
                self.in_flight += 1;
                Submit::Pending
            }
            Outcome::Busy => {
                self.saw_busy = true;
                Submit::Busy(req)
            }
            Outcome::Done(r) => Submit::Done(r),
        }
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        vec![
            self.backing.event_fd(),
            self.timer.as_raw_fd(),
            self.room.as_raw_fd(),
        ]
    }

    fn reap(&mut self, done: &mut Vec<(u64, IoResult)>) {
        self.commit_staged();
        // The fds are looked at only when they may have fired: the timer once its schedule
        // says it did, the room eventfd after a wake-up wrote it, the backing doorbell while
        // backing reads are in flight.
        let now = Instant::now();
        if now >= self.next_tick {
            self.next_tick = if self.timer.wait_nonblocking() {
                if let Err(e) = self.core.close_aged_ksets() {
                    log::debug!(
                        "queue {}: aged kset not closed yet: {}",
                        self.qid,
                        ErrorChain(&e)
                    );
                }
                next_tick_after(self.timer_armed, now)
            } else {
                now + TICK_RETRY
            };
        }
        self.look_at_room();
        self.close_unclosed();
        if self.backing_armed || !self.misses.is_empty() {
            self.backing_armed = !self.misses.is_empty();
            self.handle_backing_completions();
        }
        self.in_flight -= self.completed.len();
        done.append(&mut self.completed);
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn drain(&mut self, done: &mut Vec<(u64, IoResult)>) {
        loop {
            self.reap(done);
            if self.in_flight == 0 {
                return;
            }
            if !self.misses.is_empty() {
                let mut finished = Vec::new();
                self.backing.wait(&mut finished);
                for (id, res) in finished {
                    self.miss_done(id, res);
                }
            } else if !self.unclosed.is_empty() {
                // Write-through writes wait for log space that writeback and GC will free.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

impl Drop for CacheQueue {
    fn drop(&mut self) {
        let mut done = Vec::new();
        self.drain(&mut done);
        self.core.segments.remove_waiter(self.room.as_raw_fd());
        self.core.release_head(self.qid);
        if let Some((stop, thread)) = self.committer.take() {
            stop.store(true, Ordering::Release);
            self.core.log.wake_committers();
            let _ = thread.join();
        }
    }
}

/// Where the data heads of every queue that holds a segment write next: a committer leaves
/// the keys whose data ends in one of their folios for a later close.
pub(super) fn data_head_positions(core: &Core, out: &mut Vec<CachePos>) {
    out.extend(core.heads.iter().filter_map(|h| crate::sync::lock(h).pos()));
}

/// Start queue `qid`'s committer thread (msync mode), which closes full ksets of any queue:
/// closing syncs the data the keys name and then the kset, and no writer should wait for that.
fn spawn_committer(
    core: Arc<Core>,
    qid: usize,
) -> std::io::Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    core.log.attach_committer();
    let log_core = core.clone();
    let thread = std::thread::Builder::new()
        .name(format!("pcache-log-{qid}"))
        .spawn(move || {
            let heads = |out: &mut Vec<_>| data_head_positions(&log_core, out);
            log_core
                .log
                .run_committer(&flag, &*log_core.media, &log_core.segments, &heads)
        })
        .inspect_err(|_| core.log.detach_committer())?;
    Ok((stop, thread))
}

/// The first tick of a timer armed (with period TICK) at `armed` that comes after `now`:
/// the timer fires then or slightly before.
fn next_tick_after(armed: Instant, now: Instant) -> Instant {
    let ticks = now.saturating_duration_since(armed).as_nanos() / TICK.as_nanos() + 1;
    armed + TICK * ticks as u32
}

/// Small extension so the timer can be polled without blocking.
trait NonBlockingTimer {
    fn wait_nonblocking(&mut self) -> bool;
}

impl NonBlockingTimer for TimerFd {
    fn wait_nonblocking(&mut self) -> bool {
        crate::poll::poll_readable(&[self.as_raw_fd()], 0).is_some() && self.wait().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_tick_is_the_first_of_the_schedule_after_now() {
        let armed = Instant::now();
        let ns = Duration::from_nanos(1);
        assert_eq!(next_tick_after(armed, armed), armed + TICK);
        assert_eq!(next_tick_after(armed, armed + TICK - ns), armed + TICK);
        assert_eq!(next_tick_after(armed, armed + TICK), armed + 2 * TICK);
        assert_eq!(
            next_tick_after(armed, armed + TICK * 11 / 2),
            armed + 6 * TICK
        );
        // A clock read before the arming (it cannot be, but must not panic).
        assert_eq!(next_tick_after(armed + TICK, armed), armed + 2 * TICK);
    }
}
