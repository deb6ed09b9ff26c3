// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The serve loop: one vhost-user socket, one frontend connection at a time, one engine for the
//! life of the process.
//!
//! The listener is created once, so a reconnecting frontend never finds the socket missing.
//! Every connection gets a new backend, a new `GuestMemoryAtomic` and a new `VhostUserDaemon`:
//! the daemon cannot be reused (its owner flag is never reset) and a reused memory map makes a
//! second frontend's memory regions overlap stale ones.

mod inflight_messages;
mod log_base;
pub(crate) mod relay;
pub(crate) mod shutdown;
pub mod state_file;

use std::net::Shutdown;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend::BlkBackend;
use crate::engine::{Engine, EngineError};
use crate::poll::poll_readable;
use crate::virtio_blk::{DeviceInfo, GuestMemAtomic};
use inflight_messages::InflightMessages;
use relay::{relay, Ended};
pub use shutdown::ShutdownSignal;
pub use state_file::{StateFile, StateFileError, WriteCacheChoice};

/// Most queues a vhost-user-backend daemon can run (one bit per queue in a u64 mask).
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue size virtio allows for split rings.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Everything the serve loop needs besides the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Path of the vhost-user unix socket to listen on (replaced if it exists).
    pub socket: PathBuf,
    /// Virtqueues offered, each served by its own thread.
    pub num_queues: u16,
    /// Largest queue size a frontend may configure.
    pub max_queue_size: u16,
    /// GET_ID answer, truncated to 20 bytes.
    pub serial: String,
    /// Longest a queue polls its ring after it runs empty (zero: never).
    pub poll: std::time::Duration,
    /// Where the guest's write-cache choice is kept across restarts; without one it lasts
    /// only as long as the process.
    pub state_file: Option<PathBuf>,
}

/// Whether a frontend is connected, and how many have been; the serve loop updates it and the
/// control socket reports it.
#[derive(Debug, Default)]
pub struct ConnectionState {
    connected: AtomicBool,
    connections: AtomicU64,
}

impl ConnectionState {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Connections accepted since the daemon started.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    fn connect(&self) {
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.connected.store(true, Ordering::Release);
    }

    fn disconnect(&self) {
        self.connected.store(false, Ordering::Release);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {requested} queues requested; 1 to {MAX_QUEUES} are possible")]
    QueueCount { requested: u16 },
    #[error(
        "invalid configuration: {requested} queues requested but the engine was opened for \
         {opened}"
    )]
    MoreQueuesThanEngine { requested: u16, opened: usize },
    #[error("invalid configuration: queue size {0} is not a power of two up to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon failed: accepting a connection")]
    Accept(#[source] vhost::vhost_user::Error),
    // The daemon crate's error is neither a `std::error::Error` nor `Sync` (it can hold a
    // thread's panic), so it can be no source: its text is kept instead.
    #[error("vhost-user daemon failed: creating the connection's daemon: {0}")]
    CreateDaemon(String),
    #[error("vhost-user daemon failed: connecting the relay")]
    Relay(#[source] std::io::Error),
    #[error("vhost-user daemon failed: starting the connection: {0}")]
    StartConnection(String),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("engine shutdown failed")]
    EngineShutdown(#[source] EngineError),
    #[error(transparent)]
    State(#[from] StateFileError),
}

impl ServeConfig {
    fn validate(&self, engine: &dyn Engine) -> Result<(), Error> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(Error::QueueCount {
                requested: self.num_queues,
            });
        }
        if usize::from(self.num_queues) > engine.max_queues() {
            return Err(Error::MoreQueuesThanEngine {
                requested: self.num_queues,
                opened: engine.max_queues(),
            });
        }
        if !self.max_queue_size.is_power_of_two() || self.max_queue_size > MAX_QUEUE_SIZE {
            return Err(Error::QueueSize(self.max_queue_size));
        }
        Ok(())
    }
}

/// Serves `engine` on the configured socket until SIGINT or SIGTERM, then finishes the
/// requests in flight and shuts the engine down (which flushes it).
pub fn run(config: &ServeConfig, engine: Arc<dyn Engine>) -> Result<(), Error> {
    run_with_state(config, engine, &ConnectionState::default())
}

/// [`run`], keeping `state` up to date with the frontend connection.
pub fn run_with_state(
    config: &ServeConfig,
    engine: Arc<dyn Engine>,
    state: &ConnectionState,
) -> Result<(), Error> {
    config.validate(engine.as_ref())?;
    let write_cache = Arc::new(WriteCacheChoice::load(
        config.state_file.clone().map(StateFile::new),
    )?);
    engine.set_write_cache(write_cache.chosen());
    let signal = ShutdownSignal::install().map_err(Error::Signals)?;
    let info = DeviceInfo::new(
        engine.capacity(),
        engine.read_only(),
        config.num_queues,
        &config.serial,
    );
    let mut listener = Listener::new(&config.socket, true).map_err(|source| Error::Listen {
        path: config.socket.clone(),
        source,
    })?;
    info!(
        "listening on {}: {} bytes{}, {} queues of up to {} entries, serial {:?}, write cache {}",
        config.socket.display(),
        info.capacity,
        if info.read_only { " read-only" } else { "" },
        info.num_queues,
        config.max_queue_size,
        config.serial,
        if engine.write_cache() { "on" } else { "off" },
    );
    match write_cache.file() {
        Some(file) => info!(
            "the guest's write-cache choice is kept in {}",
            file.path().display()
        ),
        None => warn!(
            "no state file: a write-cache choice of the guest is lost when the daemon restarts \
             (give --state-file)"
        ),
    }
    crate::notify::ready();

    let mut result = Ok(());
    loop {
        use std::os::fd::AsRawFd;
        // Accept only when a frontend is waiting, so a signal can end an idle daemon.
        match poll_readable(&[signal.fd(), listener.as_raw_fd()], -1) {
            Some(1) => {}
            _ => break,
        }
        let connection = Connection {
            config,
            engine: &engine,
            write_cache: &write_cache,
            info: &info,
            signal_fd: signal.fd(),
            state,
        };
        if let Err(e) = connection.serve(&mut listener) {
            result = Err(e);
            break;
        }
        if signal.requested() {
            break;
        }
    }

    crate::notify::stopping();
    info!("shutting down: flushing the engine");
    let shutdown = engine.shutdown().map_err(Error::EngineShutdown);
    result.and(shutdown)?;
    info!("shutdown complete");
    Ok(())
}

/// What serving one frontend connection needs.
struct Connection<'a> {
    config: &'a ServeConfig,
    engine: &'a Arc<dyn Engine>,
    write_cache: &'a Arc<WriteCacheChoice>,
    info: &'a DeviceInfo,
    /// Readable once SIGTERM or SIGINT arrived.
    signal_fd: RawFd,
    state: &'a ConnectionState,
}

impl Connection<'_> {
    /// Serves the frontend waiting on `listener` until it leaves or a stop signal arrives.
    fn serve(&self, listener: &mut Listener) -> Result<(), Error> {
        let frontend = match listener.accept() {
            Ok(Some(stream)) => stream,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Error::Accept(e)),
        };
        let mem = GuestMemAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            self.engine.clone(),
            self.info.clone(),
            usize::from(self.config.max_queue_size),
            mem.clone(),
            self.write_cache.clone(),
            self.config.poll,
        ));
        let mut daemon =
            VhostUserDaemon::new("vhost-user-pcache".to_string(), backend.clone(), mem)
                .map_err(|e| Error::CreateDaemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        backend.set_epoll_handlers(&handlers);

        // The daemon talks to the relay, the relay to the frontend.
        let (mut inner_listener, relay_end) =
            inner_connection(&self.config.socket).map_err(Error::Relay)?;
        daemon
            .start(&mut inner_listener)
            .map_err(|e| Error::StartConnection(e.to_string()))?;
        info!("frontend connected");
        self.state.connect();

        let over = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC);
        let listener: &Listener = listener;
        let ended = std::thread::scope(|scope| {
            if let Ok(over) = &over {
                let refuser = std::thread::Builder::new()
                    .name("refuse-frontends".to_string())
                    .spawn_scoped(scope, || refuse_other_frontends(listener, over));
                if let Err(e) = refuser {
                    warn!("cannot watch for a second frontend: {e}");
                }
            }
            let inflight = InflightMessages {
                backend: backend.as_ref(),
            };
            match relay(&frontend, &relay_end, self.signal_fd, &inflight) {
                Ok(Ended::Stopped) => {
                    info!("stop requested by signal");
                    // Graceful stop: take no new request and complete every popped one before
                    // the socket closes, so the frontend's used index is final when it sees the
                    // disconnect and a restarted daemon continues from exactly there.
                    backend.close();
                    info!("requests in flight completed; closing the connection");
                }
                Ok(Ended::FrontendLeft) => {}
                Err(e) => warn!("connection to the frontend failed: {e}"),
            }
            let _ = frontend.shutdown(Shutdown::Both);
            let _ = relay_end.shutdown(Shutdown::Both);
            let ended = daemon.wait();
            if let Ok(over) = &over {
                let _ = over.write(1);
            }
            ended
        });
        self.state.disconnect();
        match ended {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!("connection ended with an error: {e}"),
        }

        for handler in &handlers {
            handler.send_exit_event();
        }
        backend.close();
        info!("requests of the connection finished");
        Ok(())
    }
}

/// A connected pair for the daemon and the relay: the daemon crate accepts connections only
/// from a listener, so one is bound in a private directory beside the socket, connected to and
/// removed again.
fn inner_connection(socket: &Path) -> std::io::Result<(Listener, UnixStream)> {
    use std::os::unix::fs::DirBuilderExt;
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = socket.with_file_name(format!(".{name}.{}.relay", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("s");
    let bound = UnixListener::bind(&path).and_then(|l| Ok((l, UnixStream::connect(&path)?)));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (listener, stream) = bound?;
    Ok((Listener::from(listener), stream))
}

/// How long a new connection waits for the current one to end before it is refused: a
/// frontend that has just closed its connection (a reconnecting QEMU, a probe) is served next.
const HANDOVER_GRACE_MS: i32 = 1000;

/// Accepts and at once closes every connection made while a frontend is being served, so a
/// second frontend gets an error instead of waiting forever for its first reply. Returns when
/// `over` becomes readable.
fn refuse_other_frontends(listener: &Listener, over: &EventFd) {
    use std::os::fd::AsRawFd;
    while let Some(0) = poll_readable(&[listener.as_raw_fd(), over.as_raw_fd()], -1) {
        if poll_readable(&[over.as_raw_fd()], HANDOVER_GRACE_MS).is_some() {
            return;
        }
        match listener.accept() {
            Ok(Some(stream)) => {
                warn!("refused a second frontend: one is already connected to this disk");
                drop(stream);
            }
            Ok(None) => {}
            Err(e) => {
                warn!("accepting a second frontend to refuse it: {e}");
                return;
            }
        }
    }
}
