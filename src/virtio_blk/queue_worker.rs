// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One virtqueue's worker state: pops descriptor chains, submits them to the engine queue it
//! owns, and completes them in the used ring when the engine reports them.
//!
//! The worker runs on the vring's own thread (vhost-user-backend calls it from `handle_event`)
//! and, when the frontend stops the ring or goes away, on the thread that drains it. The backend
//! keeps each worker behind its own mutex, so queues never wait on one another.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::config::DeviceInfo;
use super::dirty_log::mark_written;
use super::features::{STATUS_IOERR, STATUS_OK};
use super::inflight::QueueInflight;
use super::poll_window::PollWindow;
use super::request::{self, decode, Action, Decoded, Decoder};
use super::split_ring::{Desc, RingAddrs, SplitRing};
use crate::engine::{Engine, EngineError, EngineQueue, IoResult, Request, Submit};

/// Guest memory as mapped from the vhost-user memory table, with the frontend's dirty-page
/// log (SET_LOG_BASE) as its bitmap.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
/// The per-connection, hot-swappable view of guest memory.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// The vring type the backend uses.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// A batch takes chains in groups of this many; after each group the engine is reaped and what
/// is complete is published in the used ring (with a signal if the driver asks), so the driver
/// takes those completions and resubmits on its CPU while the batch goes on.
const GROUP: u16 = 8;

/// A request the engine holds. The guest mapping its buffers point into stays alive until
/// completion, even if the frontend replaces the memory table meanwhile: `mem` holds it, or,
/// while `None`, the worker's `batch_mem` does (which hands it to `mem` before letting go).
struct InFlight {
    status_addr: GuestAddress,
    used_len: u32,
    mem: Option<Arc<GuestMem>>,
    /// Guest ranges the engine writes by pointer, marked dirty on completion.
    data_in: Vec<(GuestAddress, u64)>,
}

pub struct QueueWorker {
    index: usize,
    engine: Arc<dyn Engine>,
    info: Arc<DeviceInfo>,
    vring: Option<Vring>,
    queue: Option<Box<dyn EngineQueue>>,
    /// Requests the engine holds, by head: a chain's head is unique while it is in flight
    /// (the driver reuses it only once it is used), and the engine's tag for it.
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    /// The request the engine answered `Busy`: resubmitted before any new chain is popped.
    stalled: Option<Request>,
    done: Vec<(u64, IoResult)>,
    /// The frontend's inflight area for this queue (INFLIGHT_SHMFD), and the pop counter.
    inflight: Option<QueueInflight>,
    pop_counter: u64,
    /// Chains a previous backend popped and never completed, oldest first: submitted before
    /// any new chain is popped.
    resubmit: VecDeque<(Decoded, Arc<GuestMem>)>,
    /// Decoding buffers reused from chain to chain.
    decoder: Decoder,
    /// How long to poll the ring once it runs empty (adapts to this queue's guest).
    poll: PollWindow,
    /// When the ring ran empty before the worker last went to sleep, to learn how long a
    /// window would have had to be.
    idle_since: Option<Instant>,
    /// Set when the connection ends: a worker polling a ring the guest keeps busy returns, so
    /// the thread stopping the queue gets the worker's lock.
    stop_polling: Arc<AtomicBool>,
    /// This device's workers that poll now.
    polling_now: PollingCount,
    /// The connection's guest memory (set when the ring starts).
    mem: Option<GuestMemAtomic>,
    /// The ring mapped in the guest memory snapshot it holds; the snapshot of a batch.
    ring: Option<SplitRing<Arc<GuestMem>>>,
    /// The snapshot the ring was last mapped in, which requests taken from it point into
    /// without a reference of their own (an Arc clone per request saved).
    batch_mem: Option<Arc<GuestMem>>,
    /// Chains completed and not yet published in the used ring (head, used length).
    used: Vec<(u16, u32)>,
    /// The descriptors of the chain being decoded, reused from chain to chain.
    descs: Vec<Desc>,
    /// How this queue's idle periods ended, logged when the queue stops.
    idle: IdleCounts,
}

/// How a queue's idle periods (its ring empty, the engine holding none of its requests) ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleCounts {
    /// Polling found the next request: no kick, no wake-up.
    pub caught: u64,
    /// The worker turned notifications back on and returned to its event loop to sleep.
    pub slept: u64,
}

/// Counts the queue workers of one device that poll their rings right now (shared by its
/// workers). Two workers on one CPU (the daemon pinned to one, or more queues than CPUs) that
/// both spin through their windows keep each other's requests waiting for the CPU, and a
/// window adapted to busy queues stays open: measured, two queues on one CPU lost up to half
/// their IOPS at QD1. So a worker yields the CPU between looks at its ring while another
/// polls. Alone it does not: a yield hands the CPU to any other runnable task, which measured
/// far slower for one queue on a busy host.
#[derive(Clone, Debug, Default)]
pub struct PollingCount(Arc<AtomicUsize>);

impl PollingCount {
    /// Counts the caller as polling until the guard drops.
    fn enter(&self) -> PollingGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        PollingGuard(self)
    }

    /// Whether a worker other than the caller (which entered) polls now.
    fn others(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 1
    }
}

struct PollingGuard<'a>(&'a PollingCount);

impl Drop for PollingGuard<'_> {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What polling an empty ring came to.
enum PollOutcome {
    /// A chain arrived.
    Work,
    /// The window passed with nothing to do.
    Expired,
    /// The ring was stopped or disabled, or the connection is ending: no notification change.
    Stopped,
}

impl QueueWorker {
    pub fn new(index: usize, engine: Arc<dyn Engine>, info: Arc<DeviceInfo>) -> Self {
        QueueWorker {
            index,
            engine,
            info,
            vring: None,
            queue: None,
            in_flight: Vec::new(),
            in_flight_count: 0,
            stalled: None,
            done: Vec::new(),
            inflight: None,
            pop_counter: 0,
            resubmit: VecDeque::new(),
            decoder: Decoder::default(),
            poll: PollWindow::new(Duration::ZERO),
            idle_since: None,
            stop_polling: Arc::new(AtomicBool::new(false)),
            polling_now: PollingCount::default(),
            mem: None,
            ring: None,
            batch_mem: None,
            used: Vec::new(),
            descs: Vec::new(),
            idle: IdleCounts::default(),
        }
    }

    /// Polls the ring for up to `max` after it runs empty (zero: never); `stop` set ends any
    /// polling for good. `polling_now` is shared by the device's workers.
    pub fn with_polling(
        mut self,
        max: Duration,
        stop: Arc<AtomicBool>,
        polling_now: PollingCount,
    ) -> Self {
        self.poll = PollWindow::new(max);
        self.stop_polling = stop;
        self.polling_now = polling_now;
        self
    }

    /// Opens the engine queue when the ring starts. Returns the engine's poll fds when it was
    /// just opened, so the caller adds them to this thread's event loop.
    ///
    /// With an inflight area (`inflight`, taken only when the queue opens), the chains a previous
    /// backend left in flight are queued for resubmission and the ring continues after them.
    pub fn start(
        &mut self,
        vring: &Vring,
        inflight: impl FnOnce() -> Option<QueueInflight>,
        mem: &GuestMemAtomic,
    ) -> Result<Option<Vec<RawFd>>, EngineError> {
        self.vring = Some(vring.clone());
        self.mem = Some(mem.clone());
        if self.queue.is_some() {
            return Ok(None);
        }
        self.inflight = inflight();
        if self.inflight.is_some() {
            self.recover_inflight(vring, mem)?;
        }
        let queue = self.engine.open_queue(self.index)?;
        let fds = queue.poll_fds();
        debug!("queue {}: started, engine poll fds {fds:?}", self.index);
        self.queue = Some(queue);
        Ok(Some(fds))
    }

    fn recover_inflight(&mut self, vring: &Vring, mem: &GuestMemAtomic) -> Result<(), EngineError> {
        let Some(inflight) = &self.inflight else {
            return Ok(());
        };
        let snapshot = mem.memory().into_inner();
        let addrs = ring_addrs(vring.get_ref().get_queue());
        let ring = SplitRing::new(snapshot.clone(), addrs)
            .map_err(|e| EngineError::Invalid(format!("mapping the ring: {e}")))?;
        let used_idx = ring.used_idx();
        let recovered = inflight.recover(used_idx, |i| ring.used_head(i));
        self.pop_counter = recovered.next_counter;
        let (queue_size, desc_table) = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            queue.set_next_avail(recovered.next_avail);
            queue.set_next_used(used_idx);
            (queue.size(), queue.desc_table())
        };
        if recovered.heads.is_empty() {
            return Ok(());
        }
        warn!(
            "queue {}: resubmitting {} requests a previous daemon left in flight",
            self.index,
            recovered.heads.len()
        );
        let (shadow, chains) =
            super::resubmit::chains_for_heads(&snapshot, desc_table, queue_size, &recovered.heads)
                .map_err(|e| {
                    let cause = std::error::Error::source(&e)
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default();
                    EngineError::Invalid(format!("rebuilding chains in flight: {e}{cause}"))
                })?;
        for chain in chains {
            self.resubmit
                .push_back((decode(chain, &self.info), shadow.clone()));
        }
        Ok(())
    }

    /// Handles a kick or an engine event: completes what the engine finished, then takes new
    /// chains until the ring is empty or the engine is full.
    pub fn process(&mut self, mem: &GuestMemAtomic) -> io::Result<()> {
        let (Some(vring), Some(mut queue)) = (self.vring.clone(), self.queue.take()) else {
            return Ok(());
        };
        let result = self.process_with(&vring, queue.as_mut(), mem);
        self.queue = Some(queue);
        result
    }

    fn process_with(
        &mut self,
        vring: &Vring,
        queue: &mut dyn EngineQueue,
        mem: &GuestMemAtomic,
    ) -> io::Result<()> {
        if let Some(since) = self.idle_since.take() {
            // Woken after polling gave up: a window this long would have caught the work.
            self.poll.adjust(since.elapsed());
        }
        loop {
            // One guest memory snapshot per batch: a memory-table update between batches is
            // picked up.
            let current = mem.memory();
            let ready = self.begin_batch(vring, mem, &current);
            let mut completed = self.reap(queue);
            if self.stalled.is_some() {
                completed |= self.resubmit_stalled(queue);
                // Reap on the thread that submitted: an engine may record what a submission
                // must persist per thread (msync mode) and fence it only in that thread's reap.
                completed |= self.reap(queue);
            }
            if ready && self.stalled.is_none() {
                while self.stalled.is_none() {
                    let Some((decoded, shadow)) = self.resubmit.pop_front() else {
                        break;
                    };
                    completed |= self.dispatch(queue, decoded, &shadow, Some(&shadow));
                }
                loop {
                    let (taken, done) = self.pop_batch(vring, queue, mem, &current, GROUP);
                    // An engine may complete requests only in its reap (the cache commits the
                    // writes it staged there), so each group is reaped before it is published.
                    completed |= done | self.reap(queue);
                    if taken < GROUP || self.stalled.is_some() {
                        break;
                    }
                    // More chains may wait: the driver gets what is done so far first, so it
                    // can resubmit while this batch goes on instead of the two taking turns.
                    if self.publish_used(vring, mem, &current) {
                        vring.signal_used_queue()?;
                    }
                }
            }
            if completed && self.publish_used(vring, mem, &current) {
                vring.signal_used_queue()?;
            }
            // While stalled, notifications stay off: an engine poll fd wakes this worker (a
            // worker that cannot submit does not poll either).
            if !ready || self.stalled.is_some() {
                return Ok(());
            }
            // While the engine holds requests their completion wakes this thread, and the I/O
            // may need this CPU to finish (an io_uring worker inherits the daemon's affinity):
            // spinning beside it measured slower than sleeping (docs/performance.md,
            // "Polling"). Such a wait teaches the window nothing either.
            let poll = self.poll.enabled() && queue.in_flight() == 0;
            let empty_at = poll.then(Instant::now);
            if let Some(empty_at) = empty_at {
                match self.poll_for_work(vring, empty_at) {
                    PollOutcome::Work => {
                        self.idle.caught += 1;
                        self.poll.adjust(empty_at.elapsed());
                        continue;
                    }
                    PollOutcome::Stopped => return Ok(()),
                    PollOutcome::Expired => {}
                }
            }
            // Re-check after re-enabling: chains that arrived meanwhile sent no kick.
            if !self.enable_notification(vring, mem, &current)? {
                self.idle.slept += 1;
                self.idle_since = empty_at;
                return Ok(());
            }
            if let Some(empty_at) = empty_at {
                self.poll.adjust(empty_at.elapsed());
            }
        }
    }

    /// Takes up to `limit` of the chains the driver made available, under one vring lock:
    /// checked under it, the frontend may stop or disable the ring meanwhile. The queue's
    /// next_avail follows every chain taken, so the frontend reads an exact position whenever
    /// it gets the lock. Returns how many chains were taken and whether something was
    /// completed.
    fn pop_batch(
        &mut self,
        vring: &Vring,
        queue: &mut dyn EngineQueue,
        mem: &GuestMemAtomic,
        current: &GuestMem,
        limit: u16,
    ) -> (u16, bool) {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return (0, false);
        }
        let vq = state.get_queue_mut();
        let Some(ring) = self.take_ring(vq, mem, current) else {
            return (0, false);
        };
        let size = ring.addrs().size;
        let mut next_avail = vq.next_avail();
        let mut avail = ring.avail_idx();
        let mut descs = std::mem::take(&mut self.descs);
        let mut completed = false;
        let mut taken = 0;
        while self.stalled.is_none() && taken < limit {
            if next_avail == avail {
                avail = ring.avail_idx();
                if next_avail == avail {
                    break;
                }
            }
            // A driver never offers more than the ring holds: taking more would take chains
            // twice (and spin on a corrupt index).
            if avail.wrapping_sub(next_avail) > size {
                error!(
                    "queue {}: available index {avail} is more than {size} past {next_avail}",
                    self.index
                );
                break;
            }
            let head = ring.avail_head(next_avail);
            next_avail = next_avail.wrapping_add(1);
            vq.set_next_avail(next_avail);
            if let Some(inflight) = &self.inflight {
                inflight.popped(head, self.pop_counter);
                self.pop_counter += 1;
            }
            ring.chain(head, &mut descs);
            let decoded = self
                .decoder
                .decode_descs(head, &descs, ring.mem().as_ref(), &self.info);
            completed |= self.dispatch(queue, decoded, ring.mem(), None);
            taken += 1;
        }
        self.descs = descs;
        self.ring = Some(ring);
        (taken, completed)
    }

    /// Publishes the completed chains in the used ring with one index store, keeping the
    /// queue's next_used and the inflight area in step. Returns whether the guest wants an
    /// interrupt for them.
    fn publish_used(&mut self, vring: &Vring, mem: &GuestMemAtomic, current: &GuestMem) -> bool {
        if self.used.is_empty() {
            return false;
        }
        let mut state = vring.get_mut();
        let vq = state.get_queue_mut();
        let Some(ring) = self.take_ring(vq, mem, current) else {
            warn!(
                "queue {}: cannot return {} descriptor chains: the used ring is not guest memory",
                self.index,
                self.used.len()
            );
            self.used.clear();
            return false;
        };
        let size = ring.addrs().size;
        let old = vq.next_used();
        let mut next_used = old;
        for &(head, len) in &self.used {
            if head >= size {
                warn!("cannot return descriptor chain {head} to the used ring: not below {size}");
                continue;
            }
            ring.put_used(next_used, head, len);
            next_used = next_used.wrapping_add(1);
        }
        ring.publish_used(next_used);
        vq.set_next_used(next_used);
        if let Some(inflight) = &self.inflight {
            inflight.completed(self.used.iter().map(|&(head, _)| head), next_used);
        }
        let notify =
            next_used != old && ring.needs_notification(old, next_used, vq.event_idx_enabled());
        drop(state);
        self.ring = Some(ring);
        self.used.clear();
        notify
    }

    /// Whether the ring gives out chains (a ring the frontend disabled with SET_VRING_ENABLE 0
    /// keeps its popped requests but gives out no new ones until it is enabled again); if so,
    /// the driver is asked not to kick while the batch runs.
    fn begin_batch(&mut self, vring: &Vring, mem: &GuestMemAtomic, current: &GuestMem) -> bool {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        let vq = state.get_queue_mut();
        if let Some(ring) = self.take_ring(vq, mem, current) {
            ring.disable_notification(vq.event_idx_enabled());
            self.ring = Some(ring);
        }
        true
    }

    /// Asks the driver to kick again; true when chains arrived meanwhile (they sent no kick).
    fn enable_notification(
        &mut self,
        vring: &Vring,
        mem: &GuestMemAtomic,
        current: &GuestMem,
    ) -> io::Result<bool> {
        let mut state = vring.get_mut();
        let vq = state.get_queue_mut();
        let Some(ring) = self.take_ring(vq, mem, current) else {
            return Err(io::Error::other(
                "virtqueue: the ring is not in guest memory",
            ));
        };
        let more = ring.enable_notification(vq.next_avail(), vq.event_idx_enabled());
        self.ring = Some(ring);
        Ok(more)
    }

    /// The ring mapped in `current` (the connection's guest memory `mem` now), taken out of
    /// `self` (put it back): mapped again only when the memory table or the ring's place
    /// changed. `None` (logged) when the ring is not inside guest memory.
    fn take_ring(
        &mut self,
        vq: &Queue,
        mem: &GuestMemAtomic,
        current: &GuestMem,
    ) -> Option<SplitRing<Arc<GuestMem>>> {
        let addrs = ring_addrs(vq);
        if let Some(ring) = self.ring.take() {
            if ring.addrs() == addrs && std::ptr::eq(ring.mem().as_ref(), current) {
                return Some(ring);
            }
        }
        let snapshot = mem.memory().into_inner();
        if !std::ptr::eq(snapshot.as_ref(), current) {
            // The table changed since the batch began: the next batch maps the new one.
            debug!("queue {}: memory table replaced during a batch", self.index);
        }
        match SplitRing::new(snapshot, addrs) {
            Ok(ring) => {
                self.adopt_batch_mem(ring.mem());
                Some(ring)
            }
            Err(e) => {
                error!("queue {}: {e}", self.index);
                None
            }
        }
    }

    /// Makes `snapshot` the one requests taken from now on point into; the requests in flight
    /// from the previous one get a reference of their own to it first.
    fn adopt_batch_mem(&mut self, snapshot: &Arc<GuestMem>) {
        if let Some(old) = &self.batch_mem {
            if Arc::ptr_eq(old, snapshot) {
                return;
            }
            for req in self.in_flight.iter_mut().flatten() {
                req.mem.get_or_insert_with(|| old.clone());
            }
        }
        self.batch_mem = Some(snapshot.clone());
    }

    /// With notifications still off, watches the avail ring for the current window from
    /// `empty_at` (the caller polls only while the engine holds no requests), through the ring
    /// the batch mapped.
    fn poll_for_work(&self, vring: &Vring, empty_at: Instant) -> PollOutcome {
        let deadline = empty_at + self.poll.current();
        // Not mapped: left to the usual path, which re-checks after enabling notifications.
        let Some(ring) = &self.ring else {
            return PollOutcome::Expired;
        };
        let _polling = self.polling_now.enter();
        loop {
            if self.stop_polling.load(Ordering::Relaxed) {
                return PollOutcome::Stopped;
            }
            {
                let state = vring.get_ref();
                let vq = state.get_queue();
                // A frontend stopping (GET_VRING_BASE) or disabling the ring takes effect here:
                // it changes the vring state, which this loop reads every round. A ring is
                // only moved while stopped; after a memory-table update the batch's mapping
                // stays valid (its snapshot is held) for the rest of the window, and the next
                // batch maps the new table.
                if !vq.ready() || !state.is_enabled() {
                    return PollOutcome::Stopped;
                }
                if ring.avail_idx() != vq.next_avail() {
                    return PollOutcome::Work;
                }
            }
            if Instant::now() >= deadline {
                return PollOutcome::Expired;
            }
            if self.polling_now.others() {
                // Another queue's worker polls too, maybe on this CPU: let it look at its
                // ring instead of spinning through our window while its requests wait.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Submits a decoded chain or answers it. Returns whether something was completed.
    fn dispatch(
        &mut self,
        queue: &mut dyn EngineQueue,
        decoded: Decoded,
        snapshot: &GuestMem,
        pin: Option<&Arc<GuestMem>>,
    ) -> bool {
        let Decoded {
            head,
            status_addr,
            action,
            data_in,
        } = decoded;
        match (action, status_addr) {
            (Action::Submit { kind, used_len }, Some(status_addr)) => {
                let slot = usize::from(head);
                if self.in_flight.len() <= slot {
                    self.in_flight.resize_with(slot + 1, || None);
                }
                if self.in_flight[slot].is_some() {
                    // A driver bug (or worse): the engine must not get two requests with one
                    // tag, nor the first lose the buffers it holds.
                    warn!(
                        "queue {}: descriptor chain {head} offered again while in flight",
                        self.index
                    );
                    write_status(snapshot, status_addr, STATUS_IOERR);
                    self.used.push((head, 1));
                    self.decoder.recycle(data_in);
                    return true;
                }
                self.in_flight[slot] = Some(InFlight {
                    status_addr,
                    used_len,
                    mem: pin.cloned(),
                    data_in,
                });
                self.in_flight_count += 1;
                let tag = u64::from(head);
                self.submit(queue, Request { tag, kind })
            }
            (Action::Answer { status, used_len }, Some(status_addr)) => {
                write_status(snapshot, status_addr, status);
                self.used.push((head, used_len));
                true
            }
            _ => {
                self.used.push((head, 0));
                true
            }
        }
    }

    fn submit(&mut self, queue: &mut dyn EngineQueue, req: Request) -> bool {
        let tag = req.tag;
        match queue.submit(req) {
            Submit::Done(result) => self.complete(tag, result),
            Submit::Pending => false,
            Submit::Busy(req) => {
                debug!(
                    "queue {}: engine busy, holding request {}",
                    self.index, req.tag
                );
                self.stalled = Some(req);
                false
            }
        }
    }

    fn resubmit_stalled(&mut self, queue: &mut dyn EngineQueue) -> bool {
        let Some(req) = self.stalled.take() else {
            return false;
        };
        let tag = req.tag;
        match queue.submit(req) {
            Submit::Done(result) => self.complete(tag, result),
            Submit::Pending => false,
            Submit::Busy(req) => {
                self.stalled = Some(req);
                false
            }
        }
    }

    fn reap(&mut self, queue: &mut dyn EngineQueue) -> bool {
        queue.reap(&mut self.done);
        self.complete_done()
    }

    fn complete_done(&mut self) -> bool {
        let mut done = std::mem::take(&mut self.done);
        let mut completed = false;
        for (tag, result) in done.drain(..) {
            completed |= self.complete(tag, result);
        }
        self.done = done;
        completed
    }

    fn complete(&mut self, tag: u64, result: IoResult) -> bool {
        // The tag is the chain's head (`dispatch`).
        let head = u16::try_from(tag).ok();
        let req = head
            .and_then(|head| self.in_flight.get_mut(usize::from(head)))
            .and_then(Option::take);
        let (Some(head), Some(req)) = (head, req) else {
            error!(
                "queue {}: engine completed unknown request {tag}",
                self.index
            );
            return false;
        };
        self.in_flight_count -= 1;
        let (status, used_len) = match result {
            Ok(()) => (STATUS_OK, req.used_len),
            Err(e) => {
                warn!("queue {}: request failed: {e}", self.index);
                (STATUS_IOERR, 1)
            }
        };
        // Also after a failure: the engine may have written part of the data.
        let Some(mem) = req.mem.as_deref().or(self.batch_mem.as_deref()) else {
            error!("queue {}: request {tag} has no guest memory", self.index);
            return false;
        };
        mark_written(mem, &req.data_in);
        write_status(mem, req.status_addr, status);
        self.used.push((head, used_len));
        self.decoder.recycle(req.data_in);
        true
    }

    /// Stops the ring: finishes every request the engine holds (and a stalled one), completes
    /// them in the used ring, then closes the engine queue. `unregister` gets the engine's poll
    /// fds while they are still open.
    pub fn stop(&mut self, unregister: impl FnOnce(&[RawFd])) {
        let Some(mut queue) = self.queue.take() else {
            return;
        };
        let vring = self.vring.clone();
        loop {
            queue.drain(&mut self.done);
            self.complete_done();
            let Some(req) = self.stalled.take() else {
                break;
            };
            let tag = req.tag;
            match queue.submit(req) {
                Submit::Done(result) => self.done.push((tag, result)),
                Submit::Pending => {}
                Submit::Busy(req) => {
                    self.stalled = Some(req);
                    wait_readable(&queue.poll_fds());
                    queue.reap(&mut self.done);
                }
            }
        }
        if self.in_flight_count > 0 {
            error!(
                "queue {}: engine drained with {} requests unreported",
                self.index, self.in_flight_count
            );
            for slot in 0..self.in_flight.len() {
                if self.in_flight[slot].is_some() {
                    self.complete(slot as u64, Err(crate::engine::IoError::ShuttingDown));
                }
            }
        }
        if let (Some(vring), Some(mem)) = (&vring, self.mem.clone()) {
            let current = mem.memory();
            self.publish_used(vring, &mem, &current);
            if let Err(e) = vring.signal_used_queue() {
                debug!("queue {}: signal after drain: {e}", self.index);
            }
        }
        self.used.clear();
        // The next start may come with another memory table.
        self.ring = None;
        self.batch_mem = None;
        unregister(&queue.poll_fds());
        drop(queue);
        debug!(
            "queue {}: stopped; of its idle periods polling caught {}, {} ended in a sleep",
            self.index, self.idle.caught, self.idle.slept
        );
    }

    /// How this queue's idle periods ended so far.
    pub fn idle_counts(&self) -> IdleCounts {
        self.idle
    }

    /// How long this queue polls now once its ring runs empty.
    pub fn poll_window(&self) -> Duration {
        self.poll.current()
    }

    /// Requests the engine holds for this queue.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }
}

fn write_status(mem: &GuestMem, addr: GuestAddress, status: u8) {
    if !request::write_status(mem, addr, status) {
        warn!(
            "cannot write status byte at {:#x}: not guest memory",
            addr.0
        );
    }
}

fn ring_addrs(queue: &Queue) -> RingAddrs {
    RingAddrs {
        desc_table: queue.desc_table(),
        avail_ring: queue.avail_ring(),
        used_ring: queue.used_ring(),
        size: queue.size(),
    }
}

/// Blocks until one of `fds` is readable (or a second has passed), for the rare drain that must
/// wait for the engine to make room.
fn wait_readable(fds: &[RawFd]) {
    if fds.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    } else {
        crate::poll::poll_readable(fds, 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::PollingCount;

    /// Two workers of one device polling at once see each other (and yield); one alone, or
    /// beside another device's, does not.
    #[test]
    fn a_polling_worker_sees_another_one_polling() {
        let (device, other_device) = (PollingCount::default(), PollingCount::default());
        let same_device = device.clone();
        let first = device.enter();
        let _elsewhere = other_device.enter();
        assert!(!device.others());
        let second = same_device.enter();
        assert!(device.others());
        drop(first);
        assert!(!same_device.others());
        drop(second);
    }
}
