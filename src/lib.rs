// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-pcache: a vhost-user-blk backend whose storage engine is a persistent-memory
//! write-back cache in front of a backing image (a userspace take on Linux dm-pcache).
//!
//! Layers, each knowing only the one below it:
//! - [`serve`] and [`backend`]: the vhost-user socket, one daemon object per connection;
//! - [`virtio_blk`]: descriptor chains, the config space, feature bits, status codes;
//! - [`engine`]: the interface between virtio-blk and storage;
//! - [`passthrough`] (`--cache none`) and [`cache`] (the dm-pcache engine): the engines;
//! - [`backing`]: the only code that does I/O on the backing image;
//! - [`control`]: the control socket of a running daemon (status, drain, metrics).
//! - [`file_lock`]: one process at a time on a cache media or a backing image (flock).
//! - [`sync`]: the one mutex helper and the panic policy (a panic stops the daemon).

pub mod backend;
pub mod backing;
pub mod cache;
pub mod control;
pub mod engine;
pub mod file_lock;
pub mod notify;
pub mod passthrough;
pub mod poll;
pub mod serve;
pub mod sync;
pub mod virtio_blk;
