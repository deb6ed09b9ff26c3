// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device: feature bits, the config space, the request codec and the per-queue
//! worker that connects virtqueues to an engine.

pub mod config;
pub mod dirty_log;
pub mod features;
pub mod inflight;
mod poll_window;
pub mod queue_worker;
pub mod request;
mod resubmit;
pub mod split_ring;

pub use config::DeviceInfo;
pub use queue_worker::{GuestMem, GuestMemAtomic, PollingCount, QueueWorker, Vring};

#[cfg(test)]
mod queue_worker_tests;
#[cfg(test)]
mod request_tests;
#[cfg(test)]
mod split_ring_tests;
