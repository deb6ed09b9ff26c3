// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! cache_info: the cache's settings and the identity of the backing image it belongs to.

use std::fmt;

use super::record::{get_u32, get_u64, put_u32, put_u64, FieldFault, MetaRecord};
use super::FormatError;

/// Flag: every key carries a CRC of its data, checked on read.
pub const CACHE_INFO_DATA_CRC: u32 = 1 << 0;
/// Flag: the first start after format completed.
pub const CACHE_INFO_INIT_DONE: u32 = 1 << 1;
const KNOWN_FLAGS: u32 = CACHE_INFO_DATA_CRC | CACHE_INFO_INIT_DONE;

/// Default GC threshold: collect once this percentage of segments is in use.
pub const DEFAULT_GC_PERCENT: u8 = 70;
/// Largest accepted GC threshold.
pub const MAX_GC_PERCENT: u8 = 90;

/// Which backing image a cache belongs to. The engine fills `id` (for example a hash of a
/// stable identity of the image); the format only stores and compares it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackingFingerprint {
    /// Size of the backing image in bytes.
    pub size: u64,
    pub id: [u8; 32],
}

impl fmt::Display for BackingFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "size {} id ", self.size)?;
        for b in self.id {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BackingFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The cache_info record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub n_segments: u32,
    pub data_crc: bool,
    pub init_done: bool,
    /// 0..=[`MAX_GC_PERCENT`].
    pub gc_percent: u8,
    pub backing: BackingFingerprint,
}

impl CacheInfo {
    /// `Ok` when `found` is the backing image this cache was formatted for.
    pub fn check_backing(&self, found: &BackingFingerprint) -> Result<(), FormatError> {
        if self.backing == *found {
            Ok(())
        } else {
            Err(FormatError::WrongBacking {
                recorded: Box::new(self.backing.into()),
                found: Box::new((*found).into()),
            })
        }
    }
}

impl MetaRecord for CacheInfo {
    const LEN: usize = 72;

    fn encode_body(&self, b: &mut [u8]) {
        put_u32(b, 0, self.n_segments);
        let mut flags = 0;
        if self.data_crc {
            flags |= CACHE_INFO_DATA_CRC;
        }
        if self.init_done {
            flags |= CACHE_INFO_INIT_DONE;
        }
        put_u32(b, 4, flags);
        put_u32(b, 8, self.gc_percent as u32);
        put_u64(b, 16, self.backing.size);
        b[24..56].copy_from_slice(&self.backing.id);
    }

    fn decode_body(b: &[u8]) -> Result<Self, FieldFault> {
        let flags = get_u32(b, 4);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FieldFault::UnknownFlags {
                record: "cache_info",
                flags,
            });
        }
        let gc = get_u32(b, 8);
        if gc > MAX_GC_PERCENT as u32 {
            return Err(FieldFault::GcPercentTooHigh(gc));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[24..56]);
        Ok(CacheInfo {
            n_segments: get_u32(b, 0),
            data_crc: flags & CACHE_INFO_DATA_CRC != 0,
            init_done: flags & CACHE_INFO_INIT_DONE != 0,
            gc_percent: gc as u8,
            backing: BackingFingerprint {
                size: get_u64(b, 16),
                id,
            },
        })
    }
}
