// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The superblock: written once, last, by `format`; says "this is a cache of this geometry".

use crate::cache::SEGMENT_SIZE;

use super::layout::{Layout, SEGMENTS_OFFSET};
use super::record::{get_u32, get_u64, put_u32, put_u64, FieldFault, MetaRecord};

/// Identifies a vhost-user-pcache cache ("pcache-u" in ASCII, little-endian).
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"pcache-u");

/// Superblock flags this build understands (none yet). Unknown bits are refused, so a later
/// incompatible feature can be marked here.
pub const SUPERBLOCK_KNOWN_FLAGS: u32 = 0;

/// The superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub n_segments: u32,
    pub segment_size: u64,
    pub segments_offset: u64,
    /// Random at format; mixed into every kset CRC so ksets of an earlier format of the same
    /// media never pass as log entries.
    pub cache_id: [u8; 16],
}

impl Superblock {
    /// The superblock for a fresh format of `layout`.
    pub fn new(layout: &Layout, cache_id: [u8; 16]) -> Self {
        Superblock {
            flags: 0,
            n_segments: layout.n_segments(),
            segment_size: SEGMENT_SIZE,
            segments_offset: SEGMENTS_OFFSET,
            cache_id,
        }
    }

    /// The layout this superblock describes, checked against the media size.
    pub fn layout(&self, media_len: u64) -> Result<Layout, super::FormatError> {
        Layout::with_segments(media_len, self.n_segments)
    }
}

impl MetaRecord for Superblock {
    const LEN: usize = 64;

    fn encode_body(&self, b: &mut [u8]) {
        put_u64(b, 0, SUPERBLOCK_MAGIC);
        put_u32(b, 8, self.flags);
        put_u32(b, 12, self.n_segments);
        put_u64(b, 16, self.segment_size);
        put_u64(b, 24, self.segments_offset);
        b[32..48].copy_from_slice(&self.cache_id);
    }

    fn decode_body(b: &[u8]) -> Result<Self, FieldFault> {
        let magic = get_u64(b, 0);
        if magic != SUPERBLOCK_MAGIC {
            return Err(FieldFault::NotACacheMagic(magic));
        }
        let mut cache_id = [0u8; 16];
        cache_id.copy_from_slice(&b[32..48]);
        let sb = Superblock {
            flags: get_u32(b, 8),
            n_segments: get_u32(b, 12),
            segment_size: get_u64(b, 16),
            segments_offset: get_u64(b, 24),
            cache_id,
        };
        if sb.flags & !SUPERBLOCK_KNOWN_FLAGS != 0 {
            return Err(FieldFault::UnknownFlags {
                record: "superblock",
                flags: sb.flags,
            });
        }
        if sb.segment_size != SEGMENT_SIZE {
            return Err(FieldFault::SegmentSize(sb.segment_size));
        }
        if sb.segments_offset != SEGMENTS_OFFSET {
            return Err(FieldFault::SegmentsOffset(sb.segments_offset));
        }
        Ok(sb)
    }
}
