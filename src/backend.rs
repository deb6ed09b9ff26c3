// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `VhostUserBackend` implementation: one object per vhost-user connection, holding the
//! per-queue workers. It takes `&self` everywhere (each queue worker has its own lock), so the
//! vring threads run in parallel instead of taking turns on one backend lock.

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::engine::Engine;
use crate::engine::ErrorChain;
use crate::serve::WriteCacheChoice;
use crate::sync::lock;
use crate::virtio_blk::config::parse_config_write;
use crate::virtio_blk::features::{
    device_features, has_feature, protocol_features, F_CONFIG_WCE, F_FLUSH,
};
use crate::virtio_blk::inflight::InflightArea;
use crate::virtio_blk::{DeviceInfo, GuestMemAtomic, PollingCount, QueueWorker, Vring};

/// The epoll handler type of a daemon running this backend.
pub type EpollHandler = VringEpollHandler<Arc<BlkBackend>>;

/// Why a device state transfer (DEVICE_STATE) failed; the state is empty, so only requests
/// still in flight can make it wrong.
#[derive(Clone, Copy, Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("{0} requests still in flight while the device state was transferred")]
    RequestsInFlight(usize),
}

pub struct BlkBackend {
    engine: Arc<dyn Engine>,
    info: Arc<DeviceInfo>,
    max_queue_size: usize,
    mem: GuestMemAtomic,
    acked_features: AtomicU64,
    write_cache: Arc<WriteCacheChoice>,
    /// The frontend's inflight area (SET_INFLIGHT_FD), taken by each queue when it starts.
    inflight: Mutex<Option<Arc<InflightArea>>>,
    /// Why the last device state transfer failed, for CHECK_DEVICE_STATE.
    state_error: Mutex<Option<DeviceStateError>>,
    /// Set once the connection is over: no queue is (re)started after that, and polling
    /// workers return.
    closed: Arc<AtomicBool>,
    workers: Vec<Mutex<QueueWorker>>,
    /// Each vring thread's event loop, to add the engine's poll fds to. Weak: the handlers own
    /// the backend.
    epoll_handlers: Mutex<Vec<Weak<EpollHandler>>>,
}

impl BlkBackend {
    /// A backend for one connection. `mem` must be the same `GuestMemoryAtomic` given to the
    /// connection's `VhostUserDaemon`, and new for every connection.
    pub fn new(
        engine: Arc<dyn Engine>,
        info: DeviceInfo,
        max_queue_size: usize,
        mem: GuestMemAtomic,
        write_cache: Arc<WriteCacheChoice>,
        poll: Duration,
    ) -> Self {
        let info = Arc::new(info);
        let closed = Arc::new(AtomicBool::new(false));
        let polling_now = PollingCount::default();
        let workers = (0..usize::from(info.num_queues))
            .map(|i| {
                let worker = QueueWorker::new(i, engine.clone(), info.clone());
                Mutex::new(worker.with_polling(poll, closed.clone(), polling_now.clone()))
            })
            .collect();
        BlkBackend {
            engine,
            info,
            max_queue_size,
            mem,
            acked_features: AtomicU64::new(0),
            write_cache,
            inflight: Mutex::new(None),
            state_error: Mutex::new(None),
            closed,
            workers,
            epoll_handlers: Mutex::new(Vec::new()),
        }
    }

    /// Installs the inflight area the frontend handed over; queues started from now on track
    /// their requests in it (and resubmit what it says a previous daemon left in flight).
    pub fn set_inflight(&self, area: InflightArea) {
        info!(
            "inflight area for {} queues of {} entries",
            area.num_queues(),
            area.queue_size()
        );
        *lock(&self.inflight) = Some(Arc::new(area));
    }

    /// Hands over the daemon's epoll handlers (one per vring thread) once it exists.
    pub fn set_epoll_handlers(&self, handlers: &[Arc<EpollHandler>]) {
        *lock(&self.epoll_handlers) = handlers.iter().map(Arc::downgrade).collect();
    }

    /// Ends the connection's I/O: no new requests are taken, every request in flight is
    /// finished and every engine queue closed.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for index in 0..self.workers.len() {
            self.stop_queue(index);
        }
    }

    fn stop_queue(&self, index: usize) {
        let handler = lock(&self.epoll_handlers)
            .get(index)
            .and_then(Weak::upgrade);
        let data_base = self.poll_fd_data_base();
        lock(&self.workers[index]).stop(|fds| {
            if let Some(handler) = &handler {
                for (k, &fd) in fds.iter().enumerate() {
                    let _ = handler.unregister_listener(fd, EventSet::IN, data_base + k as u64);
                }
            }
        });
    }

    /// Event ids `0..num_queues` are vrings and `num_queues` is the framework's own, so the
    /// engine's poll fds start above it.
    fn poll_fd_data_base(&self) -> u64 {
        u64::from(self.info.num_queues) + 1
    }

    fn register_poll_fds(&self, thread: usize, fds: &[RawFd]) -> io::Result<()> {
        let handler = lock(&self.epoll_handlers)
            .get(thread)
            .and_then(Weak::upgrade)
            .ok_or_else(|| io::Error::other("no event loop for this vring thread"))?;
        for (k, &fd) in fds.iter().enumerate() {
            handler.register_listener(fd, EventSet::IN, self.poll_fd_data_base() + k as u64)?;
        }
        Ok(())
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.info.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        device_features(self.info.read_only)
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
        info!("frontend acknowledged features {features:#x}");
        // Without FLUSH the driver can never ask for durability, so every write must be durable
        // on completion; without CONFIG_WCE the driver cannot change the default; with both,
        // the guest's own choice holds (QEMU acks a set without FLUSH before the driver's, so
        // every ack must set the mode, not only the restrictive ones).
        let write_cache = if !has_feature(features, F_FLUSH) {
            false
        } else if !has_feature(features, F_CONFIG_WCE) {
            true
        } else {
            self.write_cache.chosen()
        };
        if write_cache != self.engine.write_cache() {
            self.engine.set_write_cache(write_cache);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The guest's choice, not the engine's mode of the moment: QEMU reads the config once,
        // possibly after acking a feature set without FLUSH (which makes the engine write
        // through until the driver's own ack), and shows the guest that value for good.
        self.info
            .config_slice(self.write_cache.chosen(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let writeback = parse_config_write(offset, buf).map_err(|e| {
            warn!("refusing config write: {e}");
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })?;
        let mode = if writeback {
            "write-back"
        } else {
            "write-through"
        };
        self.write_cache.choose(writeback).map_err(|e| {
            warn!(
                "refusing the guest's write-cache change to {mode}: {}",
                ErrorChain(&e)
            );
            io::Error::other(e)
        })?;
        info!("guest set the write cache to {mode}");
        self.engine.set_write_cache(writeback);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemAtomic) -> io::Result<()> {
        // The shared GuestMemoryAtomic already holds the new table; each batch takes a fresh
        // snapshot and in-flight requests keep their own.
        debug!("guest memory table updated");
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.info.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a vring thread exit event: {e}");
                None
            }
        }
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        // The device's state is the rings' positions, which the frontend reads itself
        // (GET_VRING_BASE): stopping a ring completes every request popped from it, so nothing
        // is in flight to carry over. The state blob is empty: closing `file` ends it when
        // saving; when loading, the frontend's (empty) blob is not read.
        let busy: usize = self.workers.iter().map(|w| lock(w).in_flight()).sum();
        *lock(&self.state_error) = (busy > 0).then_some(DeviceStateError::RequestsInFlight(busy));
        info!("device state transfer ({direction:?}, {phase:?}): empty state");
        drop(file);
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        match lock(&self.state_error).take() {
            None => Ok(()),
            Some(e) => {
                warn!("device state transfer failed: {e}");
                Err(io::Error::other(e))
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let index = queue_index as usize;
        if index >= self.workers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no queue {queue_index}"),
            ));
        }
        self.stop_queue(index);
        debug!("queue {queue_index} stopped by the frontend");
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(worker) = self.workers.get(thread_id) else {
            return Err(io::Error::other(format!(
                "no worker for thread {thread_id}"
            )));
        };
        let mut worker = lock(worker);
        // With one queue per thread, event 0 is this thread's vring; ids above num_queues are
        // the engine's poll fds.
        if device_event == 0 {
            let vring = vrings
                .first()
                .ok_or_else(|| io::Error::other("vring thread without a vring"))?;
            let inflight = || {
                let area = lock(&self.inflight).clone()?;
                let view = area.queue_view(u16::try_from(thread_id).ok()?);
                if view.is_none() {
                    warn!("queue {thread_id} is outside the inflight area: not tracked");
                }
                view
            };
            let new_fds = worker
                .start(vring, inflight, &self.mem)
                .map_err(|e| io::Error::other(format!("queue {thread_id}: {e}")))?;
            if let Some(fds) = new_fds {
                self.register_poll_fds(thread_id, &fds)?;
                // The previous daemon's last interrupt may never have reached the guest (with
                // QEMU it can be lost when the daemon is killed right after signalling, and a
                // kill can also fall between add_used and the signal). With EVENT_IDX the
                // guest then still asks for an interrupt at an entry this ring already passed,
                // so none of this daemon's completions would be signalled and a guest with
                // every request "with the device" waits for good. Signal once when a queue
                // starts, as the kernel's vhost does after a ring (re)start (its
                // signalled_used_valid) and libvhost-user on every SET_VRING_CALL; a guest
                // with nothing new ignores it.
                vring.signal_used_queue()?;
            }
        }
        worker.process(&self.mem)
    }
}
