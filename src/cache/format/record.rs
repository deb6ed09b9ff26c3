// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The common record header and the replica logic shared by every replicated record.
//!
//! Header (16 bytes, little-endian) at the start of every record:
//! `crc u32 | kind u16 | version u16 | seq u64`. The CRC covers every byte after it up to the
//! record's end. A record is valid when its CRC matches, its kind is the expected one, its
//! version is supported and its body passes its own checks.

use std::fmt;

use crate::cache::media::Media;

use crate::cache::SEGMENT_SIZE;

use super::cache_info::MAX_GC_PERCENT;
use super::layout::SEGMENTS_OFFSET;
use super::superblock::SUPERBLOCK_MAGIC;
use super::{record_crc, FormatError, FORMAT_VERSION};

/// Size of the common header.
pub const HEADER_LEN: usize = 16;

/// What a record is. Stored in every header so one record type is never read as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RecordKind {
    Superblock = 0x5301,
    CacheInfo = 0x4902,
    KeyTail = 0x4B03,
    DirtyTail = 0x4404,
    SegmentInfo = 0x5305,
    Generation = 0x4706,
    Kset = 0x4B07,
    BackingIdentity = 0x4208,
}

impl RecordKind {
    /// The tag stored on media.
    pub fn tag(self) -> u16 {
        self as u16
    }

    /// Name used in error messages and the format document.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Superblock => "superblock",
            RecordKind::CacheInfo => "cache_info",
            RecordKind::KeyTail => "key_tail",
            RecordKind::DirtyTail => "dirty_tail",
            RecordKind::SegmentInfo => "segment_info",
            RecordKind::Generation => "generation",
            RecordKind::Kset => "kset",
            RecordKind::BackingIdentity => "backing_identity",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why one copy of a record is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordFault {
    #[error("all zero (never written)")]
    Zeroed,
    #[error("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("record kind {found:#06x}, expected {expected}")]
    WrongKind { found: u16, expected: RecordKind },
    #[error("format version {found}, this build supports {FORMAT_VERSION}")]
    UnsupportedVersion { found: u16 },
    #[error(transparent)]
    BadField(#[from] FieldFault),
}

/// Why a record whose CRC matched is still refused: a field this build does not accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldFault {
    #[error("{len} bytes, a {kind} record needs {need}")]
    TooShort {
        len: usize,
        kind: RecordKind,
        need: usize,
    },
    #[error("unknown {record} flags {flags:#x}")]
    UnknownFlags { record: &'static str, flags: u32 },
    #[error("unknown segment type {0}")]
    UnknownSegmentType(u32),
    #[error("gc_percent {0} above {MAX_GC_PERCENT}")]
    GcPercentTooHigh(u32),
    #[error("magic {0:#018x} is not a vhost-user-pcache cache ({SUPERBLOCK_MAGIC:#018x})")]
    NotACacheMagic(u64),
    #[error("segment size {0} (this build uses {SEGMENT_SIZE})")]
    SegmentSize(u64),
    #[error("segments at {0} (this build puts them at {SEGMENTS_OFFSET})")]
    SegmentsOffset(u64),
    #[error("bytes after the superblock record are not zero")]
    TrailingBytes,
    #[error("record of segment {found} in the slots of segment {seg}")]
    OtherSegment { seg: u32, found: u32 },
    #[error("position {seg}:{off} outside the {n_segments} segments of {data_size} data bytes")]
    OutsideLayout {
        seg: u32,
        off: u32,
        n_segments: u32,
        data_size: u32,
    },
    #[error("next log segment {next_seg} out of {n_segments}")]
    NextSegmentOutOfRange { next_seg: u32, n_segments: u32 },
    #[error(transparent)]
    BackingIdentity(#[from] super::backing_identity::IdentityFault),
}

/// A record body: the bytes after the common header.
pub trait MetaRecord: Sized {
    /// Total encoded length, header included.
    const LEN: usize;
    /// Write the body into `body` (`LEN - HEADER_LEN` bytes, zero-filled beforehand).
    fn encode_body(&self, body: &mut [u8]);
    /// Decode and check a body whose CRC already matched.
    fn decode_body(body: &[u8]) -> Result<Self, FieldFault>;
}

/// Encode `record` as `kind` with sequence number `seq`.
pub fn encode_record<R: MetaRecord>(record: &R, kind: RecordKind, seq: u64) -> Vec<u8> {
    let mut out = vec![0u8; R::LEN];
    encode_record_into(record, kind, seq, &mut out);
    out
}

/// [`encode_record`] into `out`, which is `R::LEN` bytes long (any contents).
fn encode_record_into<R: MetaRecord>(record: &R, kind: RecordKind, seq: u64, out: &mut [u8]) {
    assert_eq!(out.len(), R::LEN, "a {kind} record takes {} bytes", R::LEN);
    out.fill(0);
    put_u16(out, 4, kind.tag());
    put_u16(out, 6, FORMAT_VERSION);
    put_u64(out, 8, seq);
    record.encode_body(&mut out[HEADER_LEN..]);
    let crc = record_crc(&out[4..]);
    put_u32(out, 0, crc);
}

/// Records up to this length are read and written through a buffer on the stack: the ones
/// updated while the cache runs (tails, generations, cache_info) cost no allocation per store
/// (writeback stores dirty_tail once per kset it writes back).
const INLINE_RECORD_LEN: usize = 128;

/// Run `f` on a zeroed buffer of `len` bytes, on the stack when it is short.
fn with_record_buf<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    if len <= INLINE_RECORD_LEN {
        f(&mut [0u8; INLINE_RECORD_LEN][..len])
    } else {
        f(&mut vec![0u8; len])
    }
}

/// Decode a record of `kind` from `bytes` (at least `R::LEN` long); returns it and its seq.
pub fn decode_record<R: MetaRecord>(
    bytes: &[u8],
    kind: RecordKind,
) -> Result<(R, u64), RecordFault> {
    let Some(bytes) = bytes.get(..R::LEN) else {
        return Err(RecordFault::BadField(FieldFault::TooShort {
            len: bytes.len(),
            kind,
            need: R::LEN,
        }));
    };
    if bytes.iter().all(|&b| b == 0) {
        return Err(RecordFault::Zeroed);
    }
    let stored = get_u32(bytes, 0);
    let computed = record_crc(&bytes[4..]);
    if stored != computed {
        return Err(RecordFault::BadCrc { stored, computed });
    }
    let found = get_u16(bytes, 4);
    if found != kind.tag() {
        return Err(RecordFault::WrongKind {
            found,
            expected: kind,
        });
    }
    let version = get_u16(bytes, 6);
    if version != FORMAT_VERSION {
        return Err(RecordFault::UnsupportedVersion { found: version });
    }
    let seq = get_u64(bytes, 8);
    let record = R::decode_body(&bytes[HEADER_LEN..])?;
    Ok((record, seq))
}

/// The two media offsets holding the replicas of one record, and its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaSlots {
    pub kind: RecordKind,
    pub offsets: [u64; 2],
}

impl ReplicaSlots {
    pub fn new(kind: RecordKind, offsets: [u64; 2]) -> Self {
        ReplicaSlots { kind, offsets }
    }
}

/// A record loaded from one of its replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<R> {
    pub value: R,
    /// Sequence number of the replica it came from.
    pub seq: u64,
    /// Which slot (0 or 1) held it.
    pub slot: usize,
}

type SlotState<R> = Result<(R, u64), RecordFault>;

fn read_slots<R: MetaRecord>(
    media: &dyn Media,
    slots: &ReplicaSlots,
    check: &dyn Fn(&R) -> Result<(), FieldFault>,
) -> Result<[SlotState<R>; 2], FormatError> {
    with_record_buf(R::LEN, |buf| {
        let mut read = |offset: u64| -> Result<SlotState<R>, FormatError> {
            media.read(offset, buf)?;
            Ok(decode_record::<R>(buf, slots.kind).and_then(|(r, seq)| {
                check(&r)?;
                Ok((r, seq))
            }))
        };
        Ok([read(slots.offsets[0])?, read(slots.offsets[1])?])
    })
}

/// Index of the newest valid slot (ties go to slot 0), if any.
fn newest<R>(states: &[SlotState<R>; 2]) -> Option<usize> {
    match (&states[0], &states[1]) {
        (Ok((_, a)), Ok((_, b))) => Some(if b > a { 1 } else { 0 }),
        (Ok(_), Err(_)) => Some(0),
        (Err(_), Ok(_)) => Some(1),
        (Err(_), Err(_)) => None,
    }
}

/// Load the newest valid replica; `check` rejects bodies that are valid on their own but not
/// in context (for example a segment record naming another segment).
pub fn load_latest_checked<R: MetaRecord>(
    media: &dyn Media,
    slots: &ReplicaSlots,
    check: &dyn Fn(&R) -> Result<(), FieldFault>,
) -> Result<Versioned<R>, FormatError> {
    let [a, b] = read_slots(media, slots, check)?;
    let (value, seq, slot) = match (a, b) {
        (Ok((va, sa)), Ok((vb, sb))) => {
            if sb > sa {
                (vb, sb, 1)
            } else {
                (va, sa, 0)
            }
        }
        (Ok((va, sa)), Err(_)) => (va, sa, 0),
        (Err(_), Ok((vb, sb))) => (vb, sb, 1),
        (Err(fa), Err(fb)) => {
            return Err(FormatError::NoValidReplica {
                kind: slots.kind,
                offsets: slots.offsets,
                faults: [fa, fb],
            })
        }
    };
    Ok(Versioned { value, seq, slot })
}

/// Load the newest valid replica: both slots are read, invalid ones ignored, the higher
/// sequence number wins; no valid replica is an error that describes both slots.
pub fn load_latest<R: MetaRecord>(
    media: &dyn Media,
    slots: &ReplicaSlots,
) -> Result<Versioned<R>, FormatError> {
    load_latest_checked(media, slots, &|_| Ok(()))
}

/// Store a new version: write the slot that is **not** the newest valid one, with the newest
/// sequence number plus one, persist and fence. A crash at any point leaves either the old or
/// the new value loadable. Returns the slot and sequence number written.
pub fn store<R: MetaRecord>(
    media: &dyn Media,
    slots: &ReplicaSlots,
    value: &R,
) -> Result<Versioned<()>, FormatError> {
    let states = read_slots::<R>(media, slots, &|_| Ok(()))?;
    let (slot, seq) = match newest(&states) {
        Some(n) => {
            let seq = states[n].as_ref().map(|(_, s)| *s).unwrap_or(0);
            let next = seq.checked_add(1).ok_or(FormatError::SeqExhausted {
                kind: slots.kind,
                offset: slots.offsets[n],
            })?;
            (1 - n, next)
        }
        None => (0, 1),
    };
    with_record_buf(R::LEN, |bytes| {
        encode_record_into(value, slots.kind, seq, bytes);
        media.write(slots.offsets[slot], bytes)?;
        media.persist(slots.offsets[slot], bytes.len() as u64)?;
        media.fence()
    })?;
    Ok(Versioned {
        value: (),
        seq,
        slot,
    })
}

/// Write the first version (slot 0, seq 1) without fencing; for `format`, whose slots were
/// just zeroed and which fences once at the end.
pub(crate) fn write_initial<R: MetaRecord>(
    media: &dyn Media,
    slots: &ReplicaSlots,
    value: &R,
) -> Result<(), FormatError> {
    let bytes = encode_record(value, slots.kind, 1);
    media.write(slots.offsets[0], &bytes)?;
    media.persist(slots.offsets[0], bytes.len() as u64)?;
    Ok(())
}

pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
