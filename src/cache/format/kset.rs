// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Ksets: the records of the metadata log.
//!
//! A kset is a 32-byte header and up to [`KSET_MAX_KEYS`] keys. Ksets follow each other in a
//! log segment's data area; a LAST kset (no keys) says the log continues at offset 0 of
//! another segment. The writer always puts [`KSET_ZERO_HEADER`] right after the newest kset,
//! and each kset's sequence number is its predecessor's plus one, so replay stops at the true
//! end of the log, and never takes a stale kset from an earlier use of a segment for the log.
//! The CRC is seeded with the cache id, so ksets from an earlier format never match either.

use super::key::{KeyFault, KeyRecord, KEY_SIZE};
use super::layout::Layout;
use super::record::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, FieldFault, RecordKind};
use super::{FormatError, CRC_SEED, FORMAT_VERSION};

/// Size of a kset header.
pub const KSET_HEADER_SIZE: usize = 32;
/// Most keys one kset holds.
pub const KSET_MAX_KEYS: usize = 128;
/// Largest encoded kset.
pub const KSET_MAX_SIZE: usize = KSET_HEADER_SIZE + KSET_MAX_KEYS * KEY_SIZE;
/// What follows the newest kset on media: the end-of-log mark.
pub const KSET_ZERO_HEADER: [u8; KSET_HEADER_SIZE] = [0; KSET_HEADER_SIZE];
/// Kset magic ("pcu-kset" in ASCII, little-endian).
pub const KSET_MAGIC: u64 = u64::from_le_bytes(*b"pcu-kset");
/// Kset flag: the last kset of its log segment; the count field holds the next segment.
pub const KSET_FLAG_LAST: u32 = 1 << 0;

/// Encoded size of a kset of `n_keys` keys.
pub const fn kset_size(n_keys: usize) -> usize {
    KSET_HEADER_SIZE + n_keys * KEY_SIZE
}

/// A decoded kset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kset {
    /// Keys, in the order they were appended.
    Keys { seq: u64, keys: Vec<KeyRecord> },
    /// End of this log segment; the log continues at offset 0 of `next_seg`'s data area.
    Last { seq: u64, next_seg: u32 },
}

impl Kset {
    pub fn seq(&self) -> u64 {
        match self {
            Kset::Keys { seq, .. } | Kset::Last { seq, .. } => *seq,
        }
    }

    /// Bytes this kset occupies on media.
    pub fn encoded_len(&self) -> usize {
        match self {
            Kset::Keys { keys, .. } => kset_size(keys.len()),
            Kset::Last { .. } => KSET_HEADER_SIZE,
        }
    }
}

/// What [`KsetCodec::decode_kset_into`] found; the keys are in the caller's vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KsetFound {
    Keys { seq: u64 },
    Last { seq: u64, next_seg: u32 },
}

/// Encodes and decodes the ksets of one cache: knows its layout (to bounds-check keys), the
/// backing image size and the cache id (mixed into the CRC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KsetCodec {
    layout: Layout,
    backing_size: u64,
    crc_seed: u32,
}

impl KsetCodec {
    pub fn new(layout: Layout, backing_size: u64, cache_id: [u8; 16]) -> Self {
        KsetCodec {
            layout,
            backing_size,
            crc_seed: crc32c::crc32c_append(CRC_SEED, &cache_id),
        }
    }

    fn crc(&self, bytes_after_crc: &[u8]) -> u32 {
        crc32c::crc32c_append(self.crc_seed, bytes_after_crc)
    }

    fn header(&self, seq: u64, flags: u32, count: u32, out: &mut [u8]) {
        put_u16(out, 4, RecordKind::Kset.tag());
        put_u16(out, 6, FORMAT_VERSION);
        put_u64(out, 8, seq);
        put_u64(out, 16, KSET_MAGIC);
        put_u32(out, 24, flags);
        put_u32(out, 28, count);
    }

    /// Append a kset of `keys` with sequence number `seq` to `out`. The keys are checked as
    /// replay will check them, so an engine bug never writes a kset replay would refuse.
    pub fn encode_kset(
        &self,
        seq: u64,
        keys: &[KeyRecord],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if keys.len() > KSET_MAX_KEYS {
            return Err(FormatError::InvalidArgument(format!(
                "{} keys in one kset (at most {KSET_MAX_KEYS})",
                keys.len()
            )));
        }
        for (index, key) in keys.iter().enumerate() {
            key.validate(&self.layout, self.backing_size)
                .map_err(|fault| FormatError::BadKey { seq, index, fault })?;
        }
        let start = out.len();
        out.resize(start + kset_size(keys.len()), 0);
        let buf = &mut out[start..];
        self.header(seq, 0, keys.len() as u32, buf);
        for (i, key) in keys.iter().enumerate() {
            key.encode(&mut buf[kset_size(i)..kset_size(i + 1)]);
        }
        let crc = self.crc(&buf[4..]);
        put_u32(buf, 0, crc);
        Ok(())
    }

    /// Append a LAST kset saying the log continues in `next_seg`.
    pub fn encode_last_kset(
        &self,
        seq: u64,
        next_seg: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        if next_seg >= self.layout.n_segments() {
            return Err(FormatError::InvalidArgument(format!(
                "next log segment {next_seg} out of {}",
                self.layout.n_segments()
            )));
        }
        let start = out.len();
        out.resize(start + KSET_HEADER_SIZE, 0);
        let buf = &mut out[start..];
        self.header(seq, KSET_FLAG_LAST, next_seg, buf);
        let crc = self.crc(&buf[4..]);
        put_u32(buf, 0, crc);
        Ok(())
    }

    /// Decode the kset at the start of `bytes` (pass up to [`KSET_MAX_SIZE`] bytes, bounded
    /// by the end of the data area), which must have sequence number `expected_seq`.
    ///
    /// Errors for which [`FormatError::is_end_of_log`] is true mean "the log ends here" (a
    /// zeroed header, a torn or stale kset); the others mean a kset that passed its CRC but
    /// holds impossible values, or a version this build cannot read.
    pub fn decode_kset(&self, bytes: &[u8], expected_seq: u64) -> Result<Kset, FormatError> {
        let mut keys = Vec::new();
        Ok(
            match self.decode_kset_into(bytes, expected_seq, &mut keys)? {
                KsetFound::Keys { seq } => Kset::Keys { seq, keys },
                KsetFound::Last { seq, next_seg } => Kset::Last { seq, next_seg },
            },
        )
    }

    /// [`KsetCodec::decode_kset`] into the caller's `keys` (cleared first; on error it holds
    /// no key of the refused kset's that the caller could mistake for decoded): a caller that
    /// decodes kset after kset keeps one vector and allocates nothing per kset.
    pub fn decode_kset_into(
        &self,
        bytes: &[u8],
        expected_seq: u64,
        keys: &mut Vec<KeyRecord>,
    ) -> Result<KsetFound, FormatError> {
        keys.clear();
        let Some(header) = bytes.get(..KSET_HEADER_SIZE) else {
            return Err(FormatError::KsetTruncated {
                available: bytes.len(),
                needed: KSET_HEADER_SIZE,
            });
        };
        if header.iter().all(|&b| b == 0) {
            return Err(FormatError::KsetAbsent("zeroed header (end of log)"));
        }
        if get_u64(header, 16) != KSET_MAGIC {
            return Err(FormatError::KsetAbsent("no kset magic"));
        }
        if get_u16(header, 4) != RecordKind::Kset.tag() {
            return Err(FormatError::KsetAbsent(
                "kset magic but another record kind",
            ));
        }
        let flags = get_u32(header, 24);
        let count = get_u32(header, 28);
        let is_last = flags & KSET_FLAG_LAST != 0;
        let n_keys = if is_last { 0 } else { count as usize };
        if n_keys > KSET_MAX_KEYS {
            return Err(FormatError::KsetTooManyKeys { count });
        }
        let size = kset_size(n_keys);
        let Some(body) = bytes.get(..size) else {
            return Err(FormatError::KsetTruncated {
                available: bytes.len(),
                needed: size,
            });
        };
        let stored = get_u32(body, 0);
        let computed = self.crc(&body[4..]);
        if stored != computed {
            return Err(FormatError::KsetBadCrc { stored, computed });
        }
        let version = get_u16(header, 6);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                kind: RecordKind::Kset,
                found: version,
            });
        }
        let seq = get_u64(header, 8);
        if seq != expected_seq {
            return Err(FormatError::KsetSeq {
                expected: expected_seq,
                found: seq,
            });
        }
        if flags & !KSET_FLAG_LAST != 0 {
            return Err(FormatError::KsetBadField {
                seq,
                fault: FieldFault::UnknownFlags {
                    record: "kset",
                    flags,
                },
            });
        }
        if is_last {
            if count >= self.layout.n_segments() {
                return Err(FormatError::KsetBadField {
                    seq,
                    fault: FieldFault::NextSegmentOutOfRange {
                        next_seg: count,
                        n_segments: self.layout.n_segments(),
                    },
                });
            }
            return Ok(KsetFound::Last {
                seq,
                next_seg: count,
            });
        }
        keys.reserve(n_keys);
        for index in 0..n_keys {
            let (key, reserved) =
                KeyRecord::decode_raw(&body[kset_size(index)..kset_size(index + 1)]);
            if reserved != 0 {
                keys.clear();
                return Err(FormatError::BadKey {
                    seq,
                    index,
                    fault: KeyFault::ReservedNotZero(reserved),
                });
            }
            if let Err(fault) = key.validate(&self.layout, self.backing_size) {
                keys.clear();
                return Err(FormatError::BadKey { seq, index, fault });
            }
            keys.push(key);
        }
        Ok(KsetFound::Keys { seq })
    }
}
