// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The on-media format: every record, encoded and decoded by explicit little-endian byte
//! offsets, and the replica logic. `docs/on-media-format.md` describes it byte by byte.
//!
//! Entry points for the engine:
//! - [`probe`] / [`format()`] / [`open_metadata`] at start-up;
//! - [`load_tail`] / [`store_tail`], [`load_generation`] / [`store_generation`],
//!   [`load_segment_info`] / [`store_segment_info`], [`load_latest`] / [`store`] of
//!   [`CacheInfo`] (at `layout.cache_info_slots()`);
//! - [`KsetCodec`] for the log, [`data_crc`] for cached data.

mod backing_identity;
#[cfg(test)]
mod backing_identity_tests;
mod cache_info;
mod init;
mod key;
mod kset;
mod layout;
mod record;
mod segment;
mod superblock;
mod tails;

#[cfg(test)]
mod tests;

pub use backing_identity::{
    clear_backing_identity, compare, load_backing_identity, rebind_backing, record_backing,
    store_backing_identity, BackingId, BackingMatch, IdentityFault,
};
pub use cache_info::{
    BackingFingerprint, CacheInfo, CACHE_INFO_DATA_CRC, CACHE_INFO_INIT_DONE, DEFAULT_GC_PERCENT,
    MAX_GC_PERCENT,
};
pub use init::{format, open_metadata, open_metadata_for, probe, FormatOptions, OpenedCache};
pub use key::{KeyFault, KeyRecord, KEY_CLEAN, KEY_KNOWN_FLAGS, KEY_SIZE, KEY_UNMAP, KEY_ZEROES};
pub use kset::{
    kset_size, Kset, KsetCodec, KsetFound, KSET_FLAG_LAST, KSET_HEADER_SIZE, KSET_MAGIC,
    KSET_MAX_KEYS, KSET_MAX_SIZE, KSET_ZERO_HEADER,
};
pub use layout::*;
pub use record::{
    decode_record, encode_record, load_latest, load_latest_checked, store, FieldFault, MetaRecord,
    RecordFault, RecordKind, ReplicaSlots, Versioned, HEADER_LEN,
};
pub use segment::{
    load_generation, load_segment_info, store_generation, store_segment_info, Generation,
    SegmentInfo, SegmentType, SEGMENT_KNOWN_FLAGS,
};
pub use superblock::{Superblock, SUPERBLOCK_KNOWN_FLAGS, SUPERBLOCK_MAGIC};
pub use tails::{load_tail, store_tail, Tail, TailPos};

use crate::cache::media::MediaError;

/// The format version written in every record; records of any other version are refused.
pub const FORMAT_VERSION: u16 = 1;

/// Seed of every CRC32C in the format: `crc32c_append(CRC_SEED, bytes)`, i.e. the standard
/// CRC-32C (Castagnoli, reflected, final xor 0xFFFFFFFF) with its register started at
/// `!CRC_SEED` instead of `0xFFFFFFFF`. Non-zero so an all-zero record never has a zero CRC.
/// Public, so a CRC is an integrity check, not authentication: every field is still
/// bounds-checked after the CRC matches.
pub const CRC_SEED: u32 = 0x7063_6163;

/// CRC of a metadata record's bytes after its CRC field.
pub(crate) fn record_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(CRC_SEED, bytes)
}

/// CRC of cached data, stored in [`KeyRecord::data_crc`] when data CRC is on.
pub fn data_crc(data: &[u8]) -> u32 {
    crc32c::crc32c_append(CRC_SEED, data)
}

/// Errors of the on-media format. Messages say what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Transparent, so a printed chain shows the media error once.
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(
        "media of {media_len} bytes cannot hold {n_segments} segments: a cache needs at least \
         2 segments of 16 MiB plus 64 KiB of metadata ({min_len} bytes)"
    )]
    MediaTooSmall {
        media_len: u64,
        n_segments: u32,
        min_len: u64,
    },
    #[error("no valid {kind} replica: slot 0 at byte {}: {}; slot 1 at byte {}: {}",
        offsets[0], faults[0], offsets[1], faults[1])]
    NoValidReplica {
        kind: RecordKind,
        offsets: [u64; 2],
        faults: [RecordFault; 2],
    },
    #[error(
        "{kind} at byte {offset} has sequence number {}, which cannot be advanced",
        u64::MAX
    )]
    SeqExhausted { kind: RecordKind, offset: u64 },
    #[error("{kind} at byte {offset} is corrupt: {fault}")]
    Corrupt {
        kind: RecordKind,
        offset: u64,
        fault: RecordFault,
    },
    #[error("{kind} has format version {found}; this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion { kind: RecordKind, found: u16 },
    #[error("the media is not formatted (its superblock is all zero)")]
    Unformatted,
    #[error("{0}")]
    Inconsistent(String),
    #[error(
        "the cache belongs to another backing image: it records {recorded}; the backing image \
         given is {found}. {}",
        wrong_backing_advice(recorded)
    )]
    WrongBacking {
        recorded: Box<BackingId>,
        found: Box<BackingId>,
    },
    #[error(
        "the cache belongs to a backing image of {recorded} bytes; an image of another size \
         ({found} bytes) cannot be the same image"
    )]
    RebindSize { recorded: u64, found: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no kset: {0}")]
    KsetAbsent(&'static str),
    #[error("kset needs {needed} bytes, only {available} available")]
    KsetTruncated { available: usize, needed: usize },
    #[error("kset claims {count} keys (at most {KSET_MAX_KEYS})")]
    KsetTooManyKeys { count: u32 },
    #[error("kset CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    KsetBadCrc { stored: u32, computed: u32 },
    #[error("kset sequence number {found}, expected {expected}")]
    KsetSeq { expected: u64, found: u64 },
    #[error("kset {seq} passed its CRC but is invalid: {fault}")]
    KsetBadField { seq: u64, fault: FieldFault },
    #[error("kset {seq} key {index} passed the CRC but is invalid: {fault}")]
    BadKey {
        seq: u64,
        index: usize,
        fault: KeyFault,
    },
}

impl FormatError {
    /// For [`KsetCodec::decode_kset`]: true when the error just means the log ends here
    /// (nothing, a torn kset, or a stale kset of an earlier lap), false when a kset that
    /// passed its CRC is impossible or unreadable (the cache is corrupt or foreign).
    pub fn is_end_of_log(&self) -> bool {
        matches!(
            self,
            FormatError::KsetAbsent(_)
                | FormatError::KsetTruncated { .. }
                | FormatError::KsetTooManyKeys { .. }
                | FormatError::KsetBadCrc { .. }
                | FormatError::KsetSeq { .. }
        )
    }
}

/// The safe ways on from a refused backing image. Never formatting: the cache may hold the
/// only copy of writes not yet written back.
fn wrong_backing_advice(recorded: &BackingId) -> String {
    let right = recorded
        .stable
        .as_ref()
        .and_then(|s| s.stable_path())
        .map(|p| format!(" ({p})"))
        .unwrap_or_default();
    format!(
        "The cache may hold writes not yet on its backing image: do not format it. If the image \
         given is the wrong one, start again with the recorded one{right}, named by a path that \
         does not change (/dev/disk/by-id/..., /dev/mapper/...). If you are sure it is the same \
         image under a new name, number or identity, bind the cache to it with \
         `vhost-user-pcache rebind --cache CACHE --backing IMAGE` (it changes nothing but the \
         recorded identity), then start again."
    )
}
