//! One worker thread's handle on the cache engine: the request paths' shared state.
//!
//! Writes are copied into the cache and persisted in `submit`, then all writes of a batch are
//! made durable by one fence in `reap`, inserted into the index and logged, and completed: a
//! write completes once its data is persisted; its key may still wait in an open kset (see
//! `log`). Reads are served from the cache where it holds the data and from the backing image
//! where it does not, filling the cache on the way (`read`). The 1 s kset timer and the "room
//! again" eventfd are part of this queue's poll fds, so they run in the worker's event loop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::engine::Core;
use super::format::KeyRecord;
use super::index::FillTicket;
use super::CachePos;
use crate::backing::BackingQueue;
use crate::engine::{DataSeg, EngineQueue, IoError, IoResult, Request, RequestKind, Submit};

/// io_uring depth of a queue's backing reads.
const BACKING_DEPTH: u32 = 128;

/// What a request path did with a request.
pub(super) enum Outcome {
    Done(IoResult),
    Pending,
    /// No room in the cache: hand the request back to the worker.
    Busy,
}

/// A write whose data is in the cache and persisted, waiting for the batch's fence.
pub(super) struct StagedWrite {
    pub tag: u64,
    /// Keys to log, each with the pin on its segment taken at allocation.
    pub keys: Vec<KeyRecord>,
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
        guest: Vec<DataSeg>,
    },
}

pub struct CacheQueue {
    pub(super) core: Arc<Core>,
    pub(super) qid: usize,
    pub(super) backing: BackingQueue,
    timer: TimerFd,
    room: EventFd,
    pub(super) staged: Vec<StagedWrite>,
    pub(super) partial: Option<PartialWrite>,
    /// Write-through writes not complete yet, in completion order.
    pub(super) unclosed: Vec<HeldWrite>,
    pub(super) reads: HashMap<u64, ReadInFlight>,
    pub(super) misses: HashMap<u64, MissRead>,
    pub(super) next_id: u64,
    pub(super) completed: Vec<(u64, IoResult)>,
    in_flight: usize,
    backing_done: Vec<(u64, std::io::Result<()>)>,
}

impl CacheQueue {
    pub(super) fn new(core: Arc<Core>, qid: usize) -> Result<CacheQueue, String> {
        let backing = BackingQueue::new(core.backing.clone(), BACKING_DEPTH)
            .map_err(|e| format!("cannot set up backing I/O for queue {qid}: {e}"))?;
        let mut timer = TimerFd::new().map_err(|e| format!("timerfd: {e}"))?;
        let tick = super::log::KSET_MAX_AGE / 2;
        timer
            .reset(tick, Some(tick))
            .map_err(|e| format!("timerfd: {e}"))?;
        let room = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        core.segments
            .add_waiter(room.try_clone().map_err(|e| format!("eventfd: {e}"))?);
        Ok(CacheQueue {
            core,
            qid,
            backing,
            timer,
            room,
            staged: Vec::new(),
            partial: None,
            unclosed: Vec::new(),
            reads: HashMap::new(),
            misses: HashMap::new(),
            next_id: 0,
            completed: Vec::new(),
            in_flight: 0,
            backing_done: Vec::new(),
        })
    }

    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Fence the staged writes, put their keys in the index and the log, and complete them.
    pub(super) fn commit_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        if let Err(e) = self.core.media.fence() {
            log::error!(
                "cache media fence failed; failing {} writes: {e}",
                self.staged.len()
            );
            for w in std::mem::take(&mut self.staged) {
                w.keys.iter().for_each(|k| self.core.unpin(k.seg));
                self.completed
                    .push((w.tag, Err(IoError::Media(e.to_string()))));
            }
            return;
        }
        for w in std::mem::take(&mut self.staged) {
            for key in &w.keys {
                self.core.insert_and_log(*key);
                self.core.unpin(key.seg);
            }
            if !w.last {
                continue;
            }
            let offs = (w.earlier.into_iter())
                .chain(w.keys.iter().map(|k| k.off))
                .collect();
            if !self.hold_if_needed(w.tag, offs) {
                self.completed.push((w.tag, Ok(())));
            }
        }
        self.close_unclosed();
    }

    /// Hold a write whose keys are in the index and the log until it is as durable as the mode
    /// asks; false when it may complete now. Call only after its keys were logged: drained
    /// mode is read afterwards (SeqCst, paired with `CacheEngine::drain_and_hold`), so a write
    /// that sees it off has its keys in a kset that the drain's close covers.
    pub(super) fn hold_if_needed(&mut self, tag: u64, offs: Vec<u64>) -> bool {
        let drained = self.core.drained.load(Ordering::SeqCst);
        if !drained && self.core.write_cache.load(Ordering::Acquire) {
            return false;
        }
        self.unclosed.push(HeldWrite {
            tag,
            offs,
            write_back: drained,
            until_seq: None,
        });
        true
    }

    /// Complete held writes, oldest first, once their ksets are persisted (and, in drained
    /// mode, written back).
    fn close_unclosed(&mut self) {
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
            Outcome::Busy => Submit::Busy(req),
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
        if self.timer.wait_nonblocking() {
            if let Err(e) = self.core.close_aged_ksets() {
                log::debug!("queue {}: aged kset not closed yet: {e}", self.qid);
            }
        }
        let _ = self.room.read();
        self.close_unclosed();
        self.handle_backing_completions();
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
    }
}

/// Small extension so the timer can be polled without blocking.
trait NonBlockingTimer {
    fn wait_nonblocking(&mut self) -> bool;
}

impl NonBlockingTimer for TimerFd {
    fn wait_nonblocking(&mut self) -> bool {
        self.is_armed().unwrap_or(false)
            && crate::poll::poll_readable(&[self.as_raw_fd()], 0).is_some()
            && self.wait().is_ok()
    }
}
