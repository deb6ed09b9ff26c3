// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: a running daemon answers status, statistics, gc_percent, flush and
//! drain requests from `vhost-user-pcache ctl` (or any script) over a Unix socket, one JSON
//! request per line and one JSON response per line.
//!
//! The server knows engines only through [`ControlTarget`], so `--cache none` answers what it
//! can and the cache engine stays unaware of sockets.

mod metrics;
pub mod protocol;
mod server;
mod targets;

pub use metrics::render_metrics;
pub use protocol::{ConnectionStatus, EngineStatus, Request, Response, Status};
pub use server::{ControlError, ControlServer};
pub use targets::{CacheControl, PassthroughControl};

use crate::engine::EngineError;

/// Why an engine did not do what the control socket asked. The server answers the operator
/// with the whole chain of causes.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("the daemon runs without a cache (--cache none): there is no gc_percent")]
    NoCache,
    #[error("flushing the backing image")]
    FlushImage(#[source] std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What the control socket can ask of an engine.
pub trait ControlTarget: Send + Sync {
    /// The engine's part of `status`.
    fn status(&self) -> EngineStatus;

    /// Change and persist the GC threshold.
    fn set_gc_percent(&self, percent: u8) -> Result<(), TargetError>;

    /// Make every write completed so far durable, as a guest FLUSH does.
    fn flush(&self) -> Result<(), TargetError>;

    /// Put all acknowledged data on the backing image and flush it, then keep it there until
    /// [`ControlTarget::undrain`].
    fn drain(&self) -> Result<(), TargetError>;

    /// Leave drained mode.
    fn undrain(&self) -> Result<(), TargetError>;
}
