// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pmem cache engine: the Linux dm-pcache design rebuilt in userspace.
//!
//! Layout of this module (one concern a file, as in dm-pcache): `media` (the mapping and its
//! persistence primitives), `format` (on-media records), `index` (the in-memory extent map),
//! and the engine itself (segments, the kset log, request paths, replay, writeback, GC).

/// Size of a cache segment, the unit of allocation, writeback and garbage collection.
pub const SEGMENT_SIZE: u64 = 16 << 20;

/// Keys are indexed, and routed to ksets, by 4 MiB region of backing space
/// (`offset >> REGION_SHIFT`), so every version of a block reaches the log in write order.
pub const REGION_SHIFT: u32 = 22;
/// Size of one index/kset region in bytes.
pub const REGION_SIZE: u64 = 1 << REGION_SHIFT;

/// A byte position in the cache: a segment index and a byte offset inside that segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CachePos {
    pub seg: u32,
    pub off: u32,
}

pub mod check;
mod core;
mod data_head;
#[cfg(any(test, feature = "test-util"))]
pub mod driver;
mod engine;
mod fill;
pub mod format;
mod gc;
pub mod health;
pub mod index;
pub mod inspect;
pub mod journal;
mod log;
pub mod media;
mod meta;
pub mod pacing;
mod queue;
mod read;
pub mod replay;
mod segments;
pub mod stats;
pub mod status;
mod write;
mod writeback;

pub use self::core::{CacheError, CacheOptions};
pub use engine::CacheEngine;
pub use status::CacheStatus;

#[cfg(test)]
mod tests;
