// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Queue worker tests against an asynchronous in-memory engine double: completions that come
//! later from `reap`, back-pressure with `Submit::Busy`, and draining on stop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::config::DeviceInfo;
use super::features::*;
use super::queue_worker::{GuestMem, QueueWorker};
use crate::engine::*;

const DISK: usize = 1 << 16;

#[derive(Default)]
struct Shared {
    disk: Vec<u8>,
    /// How many submissions to refuse with Busy.
    busy: usize,
    /// While set, `reap` completes nothing (only `drain` does).
    hold: bool,
    pending: Vec<Request>,
    /// The thread that submitted each pending write: like msync mode, which records what a
    /// write must persist per thread, the double persists a write only in a reap on that thread.
    write_threads: HashMap<u64, ThreadId>,
    /// Writes completed by a reap on another thread than their submission's (not persisted).
    unpersisted: Vec<u64>,
    /// While set, requests complete at submission (`Submit::Done`), as pmem-path hits do.
    complete_at_submit: bool,
    /// Where the used ring's index is: each submission records the value it finds there.
    watch_used_idx: Option<(GuestMem, GuestAddress)>,
    used_idx_at_submit: Vec<u16>,
}

struct Double {
    shared: Arc<Mutex<Shared>>,
    event: Arc<EventFd>,
}

impl Engine for Double {
    fn capacity(&self) -> u64 {
        DISK as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn max_queues(&self) -> usize {
        1
    }
    fn open_queue(&self, _index: usize) -> Result<Box<dyn EngineQueue>, EngineError> {
        Ok(Box::new(DoubleQueue {
            shared: self.shared.clone(),
            event: self.event.clone(),
        }))
    }
    fn set_write_cache(&self, _enabled: bool) {}
    fn write_cache(&self) -> bool {
        true
    }
    fn shutdown(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

struct DoubleQueue {
    shared: Arc<Mutex<Shared>>,
    event: Arc<EventFd>,
}

fn execute(disk: &mut [u8], req: Request) -> (u64, IoResult) {
    let copy = |offset: u64, bufs: &[DataSeg], into_guest: bool, disk: &mut [u8]| {
        let mut at = offset as usize;
        for b in bufs {
            // SAFETY: the worker keeps the guest mapping alive until completion; test buffers
            // do not overlap the disk vector.
            let guest = unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) };
            if into_guest {
                guest.copy_from_slice(&disk[at..at + b.len]);
            } else {
                disk[at..at + b.len].copy_from_slice(guest);
            }
            at += b.len;
        }
    };
    match &req.kind {
        RequestKind::Read { offset, bufs } => copy(*offset, bufs, true, disk),
        RequestKind::Write { offset, bufs } => copy(*offset, bufs, false, disk),
        RequestKind::WriteZeroes { offset, len, .. } | RequestKind::Discard { offset, len } => {
            disk[*offset as usize..(*offset + *len) as usize].fill(0)
        }
        RequestKind::Flush => {}
    }
    (req.tag, Ok(()))
}

impl EngineQueue for DoubleQueue {
    fn submit(&mut self, req: Request) -> Submit {
        let mut s = self.shared.lock().unwrap();
        if s.busy > 0 {
            s.busy -= 1;
            return Submit::Busy(req);
        }
        if let Some((mem, at)) = &s.watch_used_idx {
            let idx: u16 = mem.read_obj(*at).unwrap();
            s.used_idx_at_submit.push(idx);
        }
        if s.complete_at_submit {
            let (_, result) = execute(&mut s.disk, req);
            return Submit::Done(result);
        }
        if matches!(req.kind, RequestKind::Write { .. }) {
            s.write_threads.insert(req.tag, thread::current().id());
        }
        s.pending.push(req);
        self.event.write(1).unwrap();
        Submit::Pending
    }
    fn poll_fds(&self) -> Vec<RawFd> {
        vec![self.event.as_raw_fd()]
    }
    fn reap(&mut self, done: &mut Vec<(u64, IoResult)>) {
        let mut s = self.shared.lock().unwrap();
        if s.hold {
            return;
        }
        let _ = self.event.read();
        let pending = std::mem::take(&mut s.pending);
        for req in pending {
            if let Some(submitter) = s.write_threads.remove(&req.tag) {
                if submitter != thread::current().id() {
                    s.unpersisted.push(req.tag);
                }
            }
            done.push(execute(&mut s.disk, req));
        }
    }
    fn in_flight(&self) -> usize {
        self.shared.lock().unwrap().pending.len()
    }
    fn drain(&mut self, done: &mut Vec<(u64, IoResult)>) {
        // Separate statement: the guard must be gone before reap locks again.
        self.shared.lock().unwrap().hold = false;
        self.reap(done);
    }
}

struct Rig<'a> {
    mem: &'a GuestMem,
    mock: MockSplitQueue<'a, GuestMem>,
    atomic: GuestMemoryAtomic<GuestMem>,
    vring: VringRwLock<GuestMemoryAtomic<GuestMem>>,
    shared: Arc<Mutex<Shared>>,
    worker: QueueWorker,
    next_desc: u16,
    size: u16,
}

fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMem) -> Rig<'a> {
        Rig::polling(mem, Duration::ZERO, Arc::new(AtomicBool::new(false)))
    }

    /// A rig whose worker polls its ring for up to `max` once it runs empty.
    fn polling(mem: &'a GuestMem, max: Duration, stop: Arc<AtomicBool>) -> Rig<'a> {
        Rig::sized(mem, max, stop, 16)
    }

    /// A rig whose ring holds `size` descriptors.
    fn sized(mem: &'a GuestMem, max: Duration, stop: Arc<AtomicBool>, size: u16) -> Rig<'a> {
        let mock = MockSplitQueue::new(mem, size);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let vring = VringRwLock::new(atomic.clone(), size).unwrap();
        vring.set_queue_size(size);
        vring
            .set_queue_info(
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let shared = Arc::new(Mutex::new(Shared {
            disk: vec![0; DISK],
            ..Default::default()
        }));
        let engine = Arc::new(Double {
            shared: shared.clone(),
            event: Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()),
        });
        let info = Arc::new(DeviceInfo::new(DISK as u64, false, 1, "double"));
        let mut worker =
            QueueWorker::new(0, engine, info).with_polling(max, stop, Default::default());
        let fds = worker
            .start(&vring, || None, &atomic)
            .unwrap()
            .expect("first start opens");
        assert_eq!(fds.len(), 1);
        Rig {
            mem,
            mock,
            atomic,
            vring,
            shared,
            worker,
            next_desc: 0,
            size,
        }
    }

    /// Adds a request chain: header at `base`, then `data_len` bytes, then a status byte.
    fn add(&mut self, base: u64, request_type: u32, sector: u64, data_len: u32, to_guest: bool) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(base)).unwrap();
        let data_flags = if to_guest { VRING_DESC_F_WRITE } else { 0 } as u16;
        let mut descs = vec![(base, 16, 0u16)];
        if data_len > 0 {
            descs.push((base + 0x100, data_len, data_flags));
        }
        descs.push((base + 0x80, 1, VRING_DESC_F_WRITE as u16));
        // A status byte the device must overwrite, before the chain is published: a polling
        // worker may complete it at once.
        self.mem
            .write_obj(0xffu8, GuestAddress(base + 0x80))
            .unwrap();
        let first = self.next_desc;
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if i + 1 < n {
                    (flags | VRING_DESC_F_NEXT as u16, first + i + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, first).unwrap();
        self.next_desc += n;
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let n = self.mock.used().idx().load();
        (0..n)
            .map(|i| {
                let e = self.mock.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn status(&self, base: u64) -> u8 {
        self.mem.read_obj(GuestAddress(base + 0x80)).unwrap()
    }

    fn process(&mut self) {
        self.worker.process(&self.atomic).unwrap();
    }

    /// Turns EVENT_IDX on and gives the vring a call eventfd, returned for counting the
    /// interrupts; with the address of the driver's used_event.
    fn with_interrupts(&self) -> (EventFd, GuestAddress) {
        use std::os::fd::BorrowedFd;
        self.vring.set_queue_event_idx(true);
        let call = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        // SAFETY: `call` is open for the whole borrow, which only duplicates it.
        let dup = unsafe { BorrowedFd::borrow_raw(call.as_raw_fd()) }
            .try_clone_to_owned()
            .unwrap();
        self.vring.set_call(Some(std::fs::File::from(dup)));
        let used_event = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        (call, GuestAddress(used_event))
    }
}

#[test]
fn pending_requests_complete_through_reap() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    mem.write_slice(&[7u8; 1024], GuestAddress(0x1_0100))
        .unwrap();
    rig.add(0x1_0000, VIRTIO_BLK_T_OUT, 4, 1024, false);
    rig.add(0x2_0000, VIRTIO_BLK_T_IN, 4, 1024, true);
    rig.process();
    assert_eq!(rig.used(), vec![(0, 1), (3, 1025)]);
    assert_eq!(rig.status(0x1_0000), STATUS_OK);
    assert_eq!(rig.status(0x2_0000), STATUS_OK);
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x2_0100)).unwrap();
    assert_eq!(back, [7u8; 1024]);
    assert_eq!(&rig.shared.lock().unwrap().disk[2048..3072], &[7u8; 1024]);
    assert_eq!(rig.worker.in_flight(), 0);
}

#[test]
fn busy_engine_holds_the_queue_until_room_returns() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.shared.lock().unwrap().busy = 1;
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.add(0x2_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.process();
    assert!(rig.used().is_empty(), "nothing completes while busy");
    // The second chain stays in the ring: no request is popped behind a stalled one.
    assert_eq!(rig.vring.get_ref().get_queue().next_avail(), 1);
    // A poll fd fired: the worker retries and then drains the ring.
    rig.process();
    assert_eq!(rig.used().len(), 2);
    assert_eq!(rig.status(0x1_0000), STATUS_OK);
    assert_eq!(rig.status(0x2_0000), STATUS_OK);
}

#[test]
fn stop_drains_requests_in_flight() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.shared.lock().unwrap().hold = true;
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.add(0x2_0000, VIRTIO_BLK_T_IN, 0, 512, true);
    rig.process();
    assert!(rig.used().is_empty());
    assert_eq!(rig.worker.in_flight(), 2);
    let mut unregistered = Vec::new();
    rig.worker.stop(|fds| unregistered.extend_from_slice(fds));
    assert_eq!(unregistered.len(), 1);
    assert_eq!(rig.used().len(), 2);
    assert_eq!(rig.worker.in_flight(), 0);
    // Restarting opens a new engine queue.
    assert!(rig
        .worker
        .start(&rig.vring, || None, &rig.atomic)
        .unwrap()
        .is_some());
}

#[test]
fn malformed_and_unsupported_chains_complete_without_the_engine() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.add(0x1_0000, 0xdead, 0, 0, false);
    rig.add(0x2_0000, VIRTIO_BLK_T_IN, (DISK / 512) as u64, 512, true);
    rig.process();
    assert_eq!(rig.used(), vec![(0, 1), (2, 1)]);
    assert_eq!(rig.status(0x1_0000), STATUS_UNSUPP);
    assert_eq!(rig.status(0x2_0000), STATUS_IOERR);
    assert!(rig.shared.lock().unwrap().pending.is_empty());
}

#[test]
fn a_disabled_ring_gives_out_no_requests_until_enabled() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.vring.set_enabled(false);
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.process();
    assert_eq!(rig.vring.get_ref().get_queue().next_avail(), 0);
    assert!(rig.used().is_empty());
    rig.vring.set_enabled(true);
    rig.process();
    assert_eq!(rig.used().len(), 1);
    assert_eq!(rig.status(0x1_0000), STATUS_OK);
}

#[test]
fn a_stalled_write_resubmitted_on_a_stopped_ring_is_reaped_by_its_own_thread() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.shared.lock().unwrap().busy = 1;
    mem.write_slice(&[9u8; 512], GuestAddress(0x1_0100))
        .unwrap();
    rig.add(0x1_0000, VIRTIO_BLK_T_OUT, 0, 512, false);
    rig.process();
    assert!(rig.used().is_empty(), "the write is stalled");
    // The frontend stops the ring; the engine's room event still wakes the vring thread, which
    // resubmits the stalled write. Then another thread (GET_VRING_BASE, or the end of the
    // connection) drains the queue.
    rig.vring.set_queue_ready(false);
    let worker = &mut rig.worker;
    let atomic = &rig.atomic;
    thread::scope(|scope| {
        scope
            .spawn(|| worker.process(atomic).unwrap())
            .join()
            .unwrap();
    });
    rig.worker.stop(|_| {});
    assert_eq!(rig.used(), vec![(0, 1)]);
    assert_eq!(rig.status(0x1_0000), STATUS_OK);
    assert_eq!(&rig.shared.lock().unwrap().disk[..512], &[9u8; 512]);
    assert!(
        rig.shared.lock().unwrap().unpersisted.is_empty(),
        "a write was completed by a reap on another thread than the one that submitted it"
    );
}

/// Long enough that a test never sees a window end on its own: polling then ends only by what
/// the test does (or, if the worker is wrong, by the failsafe below).
const FOREVER: Duration = Duration::from_secs(3600);
/// How long a test waits for the worker before it declares it stuck. Not a speed check: it
/// only keeps a broken worker from hanging the test run.
const FAILSAFE: Duration = Duration::from_secs(60);

fn no_notify_flag(mem: &GuestMem, rig_used: GuestAddress) -> bool {
    let flags: u16 = mem.read_obj(rig_used).unwrap();
    flags & virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16 != 0
}

impl Rig<'_> {
    /// Runs `process` on another thread (as the vring thread would), leaving the rig's worker
    /// a placeholder until `join_worker`.
    fn spawn_process(&mut self) -> thread::JoinHandle<QueueWorker> {
        let engine = Arc::new(Double {
            shared: Arc::new(Mutex::new(Shared::default())),
            event: Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()),
        });
        let placeholder = QueueWorker::new(0, engine, Arc::new(DeviceInfo::new(0, false, 1, "")));
        let mut worker = std::mem::replace(&mut self.worker, placeholder);
        let atomic = self.atomic.clone();
        thread::spawn(move || {
            worker.process(&atomic).unwrap();
            worker
        })
    }

    /// Waits for `cond`; on the failsafe, disables the ring (which ends any polling), joins the
    /// worker and fails with `what`.
    fn wait_for(
        &mut self,
        handle: &mut Option<thread::JoinHandle<QueueWorker>>,
        what: &str,
        cond: impl Fn(&Self) -> bool,
    ) {
        let deadline = Instant::now() + FAILSAFE;
        while !cond(self) {
            if Instant::now() > deadline {
                self.vring.set_enabled(false);
                if let Some(h) = handle.take() {
                    self.worker = h.join().unwrap();
                }
                panic!("{what}");
            }
            thread::yield_now();
        }
    }

    fn join_worker(&mut self, handle: thread::JoinHandle<QueueWorker>) {
        let deadline = Instant::now() + FAILSAFE;
        while !handle.is_finished() {
            if Instant::now() > deadline {
                self.vring.set_enabled(false);
                self.worker = handle.join().unwrap();
                panic!("the worker never returned");
            }
            thread::yield_now();
        }
        self.worker = handle.join().unwrap();
    }
}

#[test]
fn a_polling_worker_takes_a_request_that_arrives_without_a_kick_until_the_ring_is_disabled() {
    let mem = memory();
    let mut rig = Rig::polling(&mem, FOREVER, Arc::new(AtomicBool::new(false)));
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    let mut handle = Some(rig.spawn_process());
    rig.wait_for(&mut handle, "the first request never completed", |r| {
        r.used().len() == 1
    });
    // Notifications are off while the worker polls: the guest would not kick for this one,
    // and `process` is not called again.
    assert!(no_notify_flag(&mem, rig.mock.used_addr()));
    rig.add(0x2_0000, VIRTIO_BLK_T_OUT, 8, 512, false);
    rig.wait_for(&mut handle, "the polling worker missed a request", |r| {
        r.used().len() == 2
    });
    assert_eq!(rig.status(0x2_0000), STATUS_OK);
    // The frontend disables the ring: the worker stops polling and takes nothing more.
    rig.vring.set_enabled(false);
    rig.join_worker(handle.take().unwrap());
    let idle = rig.worker.idle_counts();
    assert_eq!(
        (idle.caught, idle.slept),
        (1, 0),
        "the second request was found by polling, and the worker never slept"
    );
    rig.add(0x3_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.process();
    assert_eq!(rig.used().len(), 2, "a disabled ring gave out a request");
}

/// While the engine holds a request the worker does not poll (its completion event wakes the
/// worker, and the I/O may need the CPU): it sleeps with notifications on, so a guest request
/// arriving meanwhile kicks.
#[test]
fn a_worker_whose_engine_holds_requests_sleeps_instead_of_polling() {
    let mem = memory();
    let mut rig = Rig::polling(&mem, FOREVER, Arc::new(AtomicBool::new(false)));
    rig.shared.lock().unwrap().hold = true;
    rig.add(0x1_0000, VIRTIO_BLK_T_IN, 0, 512, true);
    let handle = rig.spawn_process();
    rig.join_worker(handle);
    assert!(rig.used().is_empty());
    assert_eq!(rig.worker.in_flight(), 1);
    assert!(!no_notify_flag(&mem, rig.mock.used_addr()));
    // The engine's event: the read completes, and the now idle worker polls again.
    rig.shared.lock().unwrap().hold = false;
    let mut handle = Some(rig.spawn_process());
    rig.wait_for(&mut handle, "the read never completed", |r| {
        r.used().len() == 1
    });
    assert!(no_notify_flag(&mem, rig.mock.used_addr()));
    rig.vring.set_enabled(false);
    rig.join_worker(handle.take().unwrap());
    assert_eq!(rig.status(0x1_0000), STATUS_OK);
}

#[test]
fn after_its_window_a_polling_worker_turns_notifications_on_and_returns() {
    let mem = memory();
    let mut rig = Rig::polling(
        &mem,
        Duration::from_micros(200),
        Arc::new(AtomicBool::new(false)),
    );
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    let handle = rig.spawn_process();
    rig.join_worker(handle);
    assert_eq!(rig.used().len(), 1);
    assert!(
        !no_notify_flag(&mem, rig.mock.used_addr()),
        "the worker sleeps with notifications off: the guest's next kick would never come"
    );
    // Asleep: a request without a kick waits for the next `process`.
    rig.add(0x2_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    assert_eq!(rig.used().len(), 1);
    rig.process();
    assert_eq!(rig.used().len(), 2);
}

#[test]
fn a_stalled_worker_does_not_poll() {
    let mem = memory();
    let mut rig = Rig::polling(&mem, FOREVER, Arc::new(AtomicBool::new(false)));
    rig.shared.lock().unwrap().busy = 1;
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    let handle = rig.spawn_process();
    rig.join_worker(handle);
    assert!(rig.used().is_empty(), "nothing completes while busy");
    // The engine's room event wakes it; notifications stayed off meanwhile.
    assert!(no_notify_flag(&mem, rig.mock.used_addr()));
}

#[test]
fn a_polling_worker_returns_when_the_connection_ends() {
    let mem = memory();
    let stop = Arc::new(AtomicBool::new(false));
    let mut rig = Rig::polling(&mem, FOREVER, stop.clone());
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    let mut handle = Some(rig.spawn_process());
    rig.wait_for(&mut handle, "the request never completed", |r| {
        r.used().len() == 1
    });
    // What the backend's close sets before it takes the worker's lock to stop the queue.
    stop.store(true, Ordering::Relaxed);
    rig.join_worker(handle.take().unwrap());
    let mut unregistered = 0;
    rig.worker.stop(|fds| unregistered += fds.len());
    assert_eq!(unregistered, 1);
}

/// A queue whose idle periods now and then outlast the window keeps polling: one idle
/// period longer than the maximum does not drop the window to nothing (as QEMU's rule does,
/// which at QD32 left the worker sleeping between batches). A guest that stays quiet does stop
/// it, within nine idle periods, and the worker sleeps after each of them.
#[test]
fn a_polling_worker_keeps_its_window_after_one_long_idle_period_and_drops_it_when_the_guest_stays_quiet(
) {
    let mem = memory();
    let max = Duration::from_micros(200);
    let mut rig = Rig::polling(&mem, max, Arc::new(AtomicBool::new(false)));
    let mut windows = Vec::new();
    for n in 0..10u64 {
        // The previous chain was used: its descriptors may be reused.
        rig.next_desc = 0;
        rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
        rig.process();
        assert_eq!(rig.used().len() as u64, n + 1);
        windows.push(rig.worker.poll_window().as_micros());
        // Quiet for longer than the window: the next request comes after a wake-up.
        thread::sleep(max * 5);
    }
    // The window the worker learned at each wake-up, from the idle period before it.
    assert_eq!(windows, [200, 200, 200, 200, 200, 200, 200, 200, 200, 0]);
    let idle = rig.worker.idle_counts();
    assert_eq!(idle.caught, 0, "no request came while the worker polled");
    assert_eq!(idle.slept, 10, "the worker slept after every window");
}

/// With EVENT_IDX the guest kicks only when it passes the avail event the device published:
/// when the worker stops polling and sleeps, that event must be where the next request will
/// go, or the guest never kicks for it.
#[test]
fn with_event_idx_a_worker_that_stops_polling_asks_for_a_kick_at_the_next_request() {
    let mem = memory();
    let mut rig = Rig::polling(
        &mem,
        Duration::from_micros(200),
        Arc::new(AtomicBool::new(false)),
    );
    rig.vring.set_queue_event_idx(true);
    let avail_event = rig.mock.used_addr().0 + 4 + 8 * 16;
    for (n, base) in [0x1_0000u64, 0x2_0000, 0x3_0000].into_iter().enumerate() {
        rig.add(base, VIRTIO_BLK_T_FLUSH, 0, 0, false);
        let handle = rig.spawn_process();
        rig.join_worker(handle);
        assert_eq!(rig.used().len(), n + 1);
        let event: u16 = mem.read_obj(GuestAddress(avail_event)).unwrap();
        assert_eq!(event, n as u16 + 1, "avail event after request {n}");
    }
}

/// Completions are published as a batch (one used index store), and with EVENT_IDX the guest
/// is interrupted once for a batch its used_event falls in, and not for one it does not.
#[test]
fn a_batch_is_published_at_once_and_signalled_only_when_used_event_is_in_it() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let (call, used_event) = rig.with_interrupts();
    let signals = || call.read().unwrap_or(0);

    // The guest wants an interrupt once element 2 is used.
    mem.write_obj(2u16, used_event).unwrap();
    rig.shared.lock().unwrap().hold = true;
    for base in [0x1_0000u64, 0x2_0000, 0x3_0000, 0x4_0000] {
        rig.add(base, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    }
    rig.process();
    assert!(rig.used().is_empty());
    assert_eq!(rig.worker.in_flight(), 4);
    assert_eq!(signals(), 0);
    rig.shared.lock().unwrap().hold = false;
    rig.process();
    assert_eq!(rig.used(), vec![(0, 1), (2, 1), (4, 1), (6, 1)]);
    assert_eq!(rig.vring.get_ref().get_queue().next_used(), 4);
    assert_eq!(signals(), 1);

    // The next batch (elements 4 and 5) does not reach an event at 10: no interrupt.
    mem.write_obj(10u16, used_event).unwrap();
    rig.shared.lock().unwrap().hold = true;
    rig.add(0x5_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.add(0x6_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.process();
    rig.shared.lock().unwrap().hold = false;
    rig.process();
    assert_eq!(rig.used().len(), 6);
    assert_eq!(rig.vring.get_ref().get_queue().next_used(), 6);
    assert_eq!(signals(), 0);
}

/// A batch is taken in groups of 8 chains; after each, what is complete is handed to the
/// driver, so it can take those completions and resubmit on its own CPU instead of waiting for
/// the whole batch; with EVENT_IDX the first group interrupts a waiting guest. Requests that the
/// engine completes at submission (read hits) and in its reap (the cache's staged writes) alike.
fn a_long_batch_publishes_completions_group_by_group(complete_at_submit: bool) {
    let mem = memory();
    let mut rig = Rig::sized(&mem, Duration::ZERO, Arc::new(AtomicBool::new(false)), 64);
    let (call, used_event) = rig.with_interrupts();
    // The guest waits for the first completion (used_event 0).
    mem.write_obj(0u16, used_event).unwrap();
    {
        let mut s = rig.shared.lock().unwrap();
        s.complete_at_submit = complete_at_submit;
        s.watch_used_idx = Some((mem.clone(), GuestAddress(rig.mock.used_addr().0 + 2)));
    }
    let n = 20u64;
    for i in 0..n {
        rig.add(0x1_0000 + i * 0x1000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    }
    rig.process();
    assert_eq!(rig.used().len(), n as usize);
    assert!((0..n).all(|i| rig.status(0x1_0000 + i * 0x1000) == STATUS_OK));
    let seen = rig.shared.lock().unwrap().used_idx_at_submit.clone();
    // Nothing is published before the first group is complete, and every request of a later
    // group finds the groups before it in the used ring.
    assert_eq!(seen[..8], [0; 8], "{seen:?}");
    assert_eq!(seen[8..16], [8; 8], "{seen:?}");
    assert_eq!(seen[16..], [16; 4], "{seen:?}");
    // used_event 0 lies in the first group only: one interrupt.
    assert_eq!(call.read().unwrap_or(0), 1);
}

#[test]
fn a_long_batch_of_requests_done_at_submission_publishes_completions_group_by_group() {
    a_long_batch_publishes_completions_group_by_group(true);
}

#[test]
fn a_long_batch_of_requests_done_in_the_reap_publishes_completions_group_by_group() {
    a_long_batch_publishes_completions_group_by_group(false);
}

/// The in-flight table is indexed by head: a driver offering a chain again while it is in
/// flight gets an error for the second offer, and the first still completes with its own
/// buffers.
#[test]
fn a_chain_offered_again_while_in_flight_is_refused_and_the_first_completes() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.shared.lock().unwrap().hold = true;
    rig.add(0x1_0000, VIRTIO_BLK_T_FLUSH, 0, 0, false);
    rig.process();
    assert_eq!(rig.worker.in_flight(), 1);
    rig.mock
        .avail()
        .ring()
        .ref_at(1)
        .unwrap()
        .store(0u16.to_le());
    rig.mock.avail().idx().store(2u16.to_le());
    rig.process();
    assert_eq!(rig.used(), vec![(0, 1)]);
    assert_eq!(rig.status(0x1_0000), STATUS_IOERR);
    assert_eq!(rig.worker.in_flight(), 1);
    rig.shared.lock().unwrap().hold = false;
    rig.process();
    assert_eq!(rig.used(), vec![(0, 1), (0, 1)]);
    assert_eq!(rig.status(0x1_0000), STATUS_OK);
    assert_eq!(rig.worker.in_flight(), 0);
}

/// A request taken before the frontend replaced the memory table completes into the mapping
/// it was taken from (kept alive for it), while the worker maps the ring in the new table.
#[test]
fn a_request_in_flight_across_a_memory_table_change_completes_into_its_own_mapping() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    mem.write_slice(&[9u8; 512], GuestAddress(0x1_0100))
        .unwrap();
    rig.add(0x1_0000, VIRTIO_BLK_T_OUT, 0, 512, false);
    rig.process();
    rig.shared.lock().unwrap().hold = true;
    rig.add(0x2_0000, VIRTIO_BLK_T_IN, 0, 512, true);
    rig.process();
    assert_eq!(rig.worker.in_flight(), 1);
    // The new table maps other pages at the same guest addresses, holding a copy of the ring.
    let new_mem = memory();
    let mut ring_copy = vec![0u8; 0x1000];
    mem.read_slice(&mut ring_copy, GuestAddress(0)).unwrap();
    new_mem.write_slice(&ring_copy, GuestAddress(0)).unwrap();
    rig.atomic.lock().unwrap().replace(new_mem.clone());
    rig.process();
    rig.shared.lock().unwrap().hold = false;
    rig.process();
    assert_eq!(rig.worker.in_flight(), 0);
    // The read's data and status went to the mapping the request was taken from...
    assert_eq!(rig.status(0x2_0000), STATUS_OK);
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(0x2_0100)).unwrap();
    assert_eq!(back, [9u8; 512]);
    // ... and its used element to the ring in the new table.
    let used_idx: u16 = new_mem
        .read_obj(GuestAddress(rig.mock.used_addr().0 + 2))
        .unwrap();
    assert_eq!(used_idx, 2);
}
