// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The 40-byte key: one extent of backing space and where its data is in the cache.

use crate::engine::SECTOR_SIZE;

use super::layout::Layout;
use super::record::{get_u32, get_u64, put_u32, put_u64};

/// Encoded size of a key.
pub const KEY_SIZE: usize = 40;

/// Key flag: the data has been written back (or came from the backing image).
pub const KEY_CLEAN: u32 = 1 << 0;
/// Key flag: the extent reads as zeroes and has no data in the cache (write-zeroes, discard).
pub const KEY_ZEROES: u32 = 1 << 1;
/// Key flag, only with [`KEY_ZEROES`]: the guest allowed deallocating the extent (DISCARD, or
/// WRITE_ZEROES with unmap), so writeback may punch a hole instead of writing zeroes.
pub const KEY_UNMAP: u32 = 1 << 2;
/// Key flags this build understands.
pub const KEY_KNOWN_FLAGS: u32 = KEY_CLEAN | KEY_ZEROES | KEY_UNMAP;

/// A key as stored in a kset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyRecord {
    /// Byte offset in the backing image (multiple of 512).
    pub off: u64,
    /// Length in bytes (non-zero multiple of 512).
    pub len: u32,
    /// [`KEY_CLEAN`], [`KEY_ZEROES`].
    pub flags: u32,
    /// Segment holding the data (0 for a ZEROES key).
    pub seg: u32,
    /// Offset of the data in the segment's data area (0 for a ZEROES key).
    pub seg_off: u32,
    /// Generation of `seg` when the data was written; older than the segment's → stale.
    pub gen: u64,
    /// [`super::data_crc`] of the data when the cache has data CRC on, else 0.
    pub data_crc: u32,
}

impl KeyRecord {
    pub fn is_clean(&self) -> bool {
        self.flags & KEY_CLEAN != 0
    }

    pub fn is_zeroes(&self) -> bool {
        self.flags & KEY_ZEROES != 0
    }

    pub(crate) fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.off);
        put_u32(b, 8, self.len);
        put_u32(b, 12, self.flags);
        put_u32(b, 16, self.seg);
        put_u32(b, 20, self.seg_off);
        put_u64(b, 24, self.gen);
        put_u32(b, 32, self.data_crc);
        put_u32(b, 36, 0);
    }

    /// Decode 40 bytes without checking them.
    pub(crate) fn decode_raw(b: &[u8]) -> (KeyRecord, u32) {
        let key = KeyRecord {
            off: get_u64(b, 0),
            len: get_u32(b, 8),
            flags: get_u32(b, 12),
            seg: get_u32(b, 16),
            seg_off: get_u32(b, 20),
            gen: get_u64(b, 24),
            data_crc: get_u32(b, 32),
        };
        (key, get_u32(b, 36))
    }

    /// Check every field against the layout and the backing image size.
    pub fn validate(&self, layout: &Layout, backing_size: u64) -> Result<(), KeyFault> {
        if self.flags & !KEY_KNOWN_FLAGS != 0 {
            return Err(KeyFault::UnknownFlags(self.flags));
        }
        if self.len == 0 || self.len as u64 % SECTOR_SIZE != 0 {
            return Err(KeyFault::Length(self.len));
        }
        if self.off % SECTOR_SIZE != 0 {
            return Err(KeyFault::UnalignedOffset(self.off));
        }
        match self.off.checked_add(self.len as u64) {
            Some(end) if end <= backing_size => {}
            _ => {
                return Err(KeyFault::BeyondBacking {
                    off: self.off,
                    len: self.len,
                    backing_size,
                })
            }
        }
        if self.flags & KEY_UNMAP != 0 && !self.is_zeroes() {
            return Err(KeyFault::UnmapWithData);
        }
        if self.is_zeroes() {
            if self.seg != 0 || self.seg_off != 0 || self.data_crc != 0 {
                return Err(KeyFault::ZeroesWithData);
            }
            return Ok(());
        }
        if self.seg >= layout.n_segments() {
            return Err(KeyFault::SegmentOutOfRange {
                seg: self.seg,
                n_segments: layout.n_segments(),
            });
        }
        // The data head hands out whole sectors, so cached data starts on one; the index
        // counts a key's CRC span in sectors and relies on it.
        if self.seg_off as u64 % SECTOR_SIZE != 0 {
            return Err(KeyFault::UnalignedCachePosition(self.seg_off));
        }
        if self.seg_off as u64 + self.len as u64 > layout.data_size() as u64 {
            return Err(KeyFault::BeyondSegment {
                seg_off: self.seg_off,
                len: self.len,
                data_size: layout.data_size(),
            });
        }
        Ok(())
    }
}

/// Why a key whose kset passed its CRC is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFault {
    #[error("unknown key flags {0:#x}")]
    UnknownFlags(u32),
    #[error("length {0} is not a non-zero multiple of 512")]
    Length(u32),
    #[error("backing offset {0} is not a multiple of 512")]
    UnalignedOffset(u64),
    #[error("extent {off}+{len} beyond the backing image of {backing_size} bytes")]
    BeyondBacking {
        off: u64,
        len: u32,
        backing_size: u64,
    },
    #[error("the unmap flag on a key with data")]
    UnmapWithData,
    #[error("a zeroes key names cache data")]
    ZeroesWithData,
    #[error("segment {seg} out of {n_segments}")]
    SegmentOutOfRange { seg: u32, n_segments: u32 },
    #[error("cache position {0} in its segment is not a multiple of 512")]
    UnalignedCachePosition(u32),
    #[error("data {seg_off}+{len} beyond the segment's {data_size} data bytes")]
    BeyondSegment {
        seg_off: u32,
        len: u32,
        data_size: u32,
    },
    #[error("reserved field {0:#x} is not zero")]
    ReservedNotZero(u32),
}
