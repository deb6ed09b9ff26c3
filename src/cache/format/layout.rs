// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where everything lives on the media. See `docs/on-media-format.md`.
//!
//! Every replica of every metadata record has a 4 KiB page of its own, so a page or sector
//! torn by a power failure in msync mode can only damage the one replica being written.

use crate::cache::{CachePos, SEGMENT_SIZE};

use super::record::{RecordKind, ReplicaSlots};
use super::FormatError;

/// Size of one metadata page (the stride between replicas).
pub const META_PAGE: u64 = 4096;
/// Offset of the superblock (bytes 0..4 KiB are never used).
pub const SUPERBLOCK_OFFSET: u64 = 4 * 1024;
/// Offsets of the two cache_info replicas.
pub const CACHE_INFO_OFFSETS: [u64; 2] = [8 * 1024, 12 * 1024];
/// Start of the control block: `key_tail[0]`, `key_tail[1]`, `dirty_tail[0]`, `dirty_tail[1]`.
pub const CONTROL_OFFSET: u64 = 16 * 1024;
/// Offsets of the two key_tail replicas.
pub const KEY_TAIL_OFFSETS: [u64; 2] = [16 * 1024, 20 * 1024];
/// Offsets of the two dirty_tail replicas.
pub const DIRTY_TAIL_OFFSETS: [u64; 2] = [24 * 1024, 28 * 1024];
/// Offsets of the two backing_identity replicas (the first records of the reserved area).
pub const BACKING_IDENTITY_OFFSETS: [u64; 2] = [32 * 1024, 36 * 1024];
/// Offset of the first segment. 64 KiB leaves room for new global records without moving
/// the segments and keeps every segment 64 KiB aligned.
pub const SEGMENTS_OFFSET: u64 = 64 * 1024;
/// Offsets, inside a segment, of its segment-info replicas.
pub const SEGMENT_INFO_OFFSETS: [u64; 2] = [0, 4 * 1024];
/// Offsets, inside a segment, of its generation replicas.
pub const GENERATION_OFFSETS: [u64; 2] = [8 * 1024, 12 * 1024];
/// Offset, inside a segment, of its data area (ksets and cached data).
pub const SEGMENT_DATA_OFFSET: u64 = 16 * 1024;
/// Bytes of data area in every segment.
pub const SEGMENT_DATA_SIZE: u32 = (SEGMENT_SIZE - SEGMENT_DATA_OFFSET) as u32;
/// The fewest segments a cache can have (one log segment, one data segment).
pub const MIN_SEGMENTS: u32 = 2;

/// The geometry of a cache: how many segments, where they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    n_segments: u32,
}

impl Layout {
    /// The largest layout that fits a media of `media_len` bytes.
    pub fn new(media_len: u64) -> Result<Layout, FormatError> {
        let n = media_len.saturating_sub(SEGMENTS_OFFSET) / SEGMENT_SIZE;
        Self::with_segments(media_len, n.min(u32::MAX as u64) as u32)
    }

    /// A layout of exactly `n_segments`, checked against the media size.
    pub fn with_segments(media_len: u64, n_segments: u32) -> Result<Layout, FormatError> {
        let needed = Self::media_len_for(n_segments);
        if n_segments < MIN_SEGMENTS || needed > media_len {
            return Err(FormatError::MediaTooSmall {
                media_len,
                n_segments,
                min_len: Self::media_len_for(n_segments.max(MIN_SEGMENTS)),
            });
        }
        Ok(Layout { n_segments })
    }

    /// Bytes a media needs to hold `n_segments` segments.
    pub fn media_len_for(n_segments: u32) -> u64 {
        SEGMENTS_OFFSET + n_segments as u64 * SEGMENT_SIZE
    }

    /// Number of segments.
    pub fn n_segments(&self) -> u32 {
        self.n_segments
    }

    /// Media offset of segment `seg`. Callers pass a validated segment (`seg < n_segments`).
    pub fn segment_offset(&self, seg: u32) -> u64 {
        debug_assert!(
            seg < self.n_segments,
            "segment {seg} out of {}",
            self.n_segments
        );
        SEGMENTS_OFFSET + seg as u64 * SEGMENT_SIZE
    }

    /// Media offset of segment `seg`'s data area.
    pub fn data_start(&self, seg: u32) -> u64 {
        self.segment_offset(seg) + SEGMENT_DATA_OFFSET
    }

    /// Bytes in each segment's data area.
    pub fn data_size(&self) -> u32 {
        SEGMENT_DATA_SIZE
    }

    /// Media offset of a cache position. `pos.off` counts from the start of the segment's
    /// data area (so offset 0 is where a log segment's first kset goes).
    pub fn media_offset(&self, pos: CachePos) -> u64 {
        debug_assert!(pos.off <= SEGMENT_DATA_SIZE);
        self.data_start(pos.seg) + pos.off as u64
    }

    /// True when `pos` names a byte inside (or the end of) a data area of this layout.
    pub fn contains(&self, pos: CachePos) -> bool {
        pos.seg < self.n_segments && pos.off <= SEGMENT_DATA_SIZE
    }

    /// Replica slots of cache_info.
    pub fn cache_info_slots(&self) -> ReplicaSlots {
        ReplicaSlots::new(RecordKind::CacheInfo, CACHE_INFO_OFFSETS)
    }

    /// Replica slots of backing_identity.
    pub fn backing_identity_slots(&self) -> ReplicaSlots {
        ReplicaSlots::new(RecordKind::BackingIdentity, BACKING_IDENTITY_OFFSETS)
    }

    /// Replica slots of key_tail.
    pub fn key_tail_slots(&self) -> ReplicaSlots {
        ReplicaSlots::new(RecordKind::KeyTail, KEY_TAIL_OFFSETS)
    }

    /// Replica slots of dirty_tail.
    pub fn dirty_tail_slots(&self) -> ReplicaSlots {
        ReplicaSlots::new(RecordKind::DirtyTail, DIRTY_TAIL_OFFSETS)
    }

    /// Replica slots of segment `seg`'s segment info.
    pub fn segment_info_slots(&self, seg: u32) -> ReplicaSlots {
        let base = self.segment_offset(seg);
        ReplicaSlots::new(
            RecordKind::SegmentInfo,
            SEGMENT_INFO_OFFSETS.map(|o| base + o),
        )
    }

    /// Replica slots of segment `seg`'s generation.
    pub fn generation_slots(&self, seg: u32) -> ReplicaSlots {
        let base = self.segment_offset(seg);
        ReplicaSlots::new(RecordKind::Generation, GENERATION_OFFSETS.map(|o| base + o))
    }
}
