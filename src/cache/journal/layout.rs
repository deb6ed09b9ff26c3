// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Byte layout of the process-kill journal file, and the encoding of its parts.
//!
//! Little-endian throughout. The file is a header page followed by one area per open kset
//! ("slot"); each area is a page for the slot's markers and a ring of 64-byte entries:
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 64 | static header, CRC-protected ([`Header`]) |
//! | 64 | 8 | `log_head`: log sequence number after the last kset this process wrote |
//! | 128 | 16 | in-flight kset marker: `seq`, then `kset_crc` (low 32 bits) and `check` (high) |
//! | 4096 + s × stride | 4096 | slot `s`: `committed` (8), pending marker `seq` (8), `upto` (8), `check` (4) |
//! | … + 4096 | 64 × capacity | slot `s`'s ring: entry `i` at `(i % capacity) × 64` |
//!
//! `stride` = 4096 + 64 × capacity. An entry is `index` (8), the 40-byte key, a CRC (4) over
//! those 48 bytes, and 12 zero bytes. Every CRC and check is seeded with the slot's seed
//! ([`slot_seed`]), derived from the header (and so from its random nonce): entries and markers
//! of an earlier journal at the same place never verify.

use crate::cache::format::{KeyFault, KeyRecord, CRC_SEED, KEY_SIZE};

/// "pcu-jrnl" in ASCII, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"pcu-jrnl");
/// The only version this build writes and reads.
pub const VERSION: u32 = 1;
/// The header page and each slot's marker page.
pub const PAGE: usize = 4096;
/// Size of the CRC-protected part of the header.
pub const HEADER_LEN: usize = 64;
/// Offset of `log_head`.
pub const LOG_HEAD_AT: usize = 64;
/// Offset of the in-flight kset marker.
pub const INFLIGHT_AT: usize = 128;
/// Size of one entry.
pub const ENTRY_SIZE: usize = 64;
/// Bytes of an entry its CRC covers (index and key).
const ENTRY_BODY: usize = 8 + KEY_SIZE;
/// Most slots (open ksets, i.e. queues) a journal has.
pub const MAX_SLOTS: u32 = 1024;
/// Most entries a slot's ring holds; a multiple of 64 keeps slots page aligned.
pub const MAX_CAPACITY: u32 = 1 << 20;
/// Fewest entries a slot's ring holds.
pub const MIN_CAPACITY: u32 = 64;

/// Offsets inside a slot's marker page.
pub const COMMITTED_AT: usize = 0;
pub const PENDING_SEQ_AT: usize = 8;
pub const PENDING_UPTO_AT: usize = 16;
pub const PENDING_CHECK_AT: usize = 24;

/// The static part of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub n_slots: u32,
    /// Entries per slot ring.
    pub capacity: u32,
    /// `/proc/sys/kernel/random/boot_id` of the boot that wrote the journal.
    pub boot_id: [u8; 16],
    /// The cache's id (its superblock's `cache_id`).
    pub cache_id: [u8; 16],
    /// Random per journal, so its CRCs differ from any earlier journal's.
    pub nonce: u32,
}

/// Why a header does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderFault {
    #[error("{0} bytes, shorter than the header page")]
    Short(usize),
    #[error("no journal magic")]
    Magic,
    #[error("version {0}, this build reads version {VERSION}")]
    Version(u32),
    #[error("header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("impossible header field: {0}")]
    Field(String),
    #[error("{found} bytes where the header says {expected}")]
    Length { found: u64, expected: u64 },
}

pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Header {
    /// Bytes between two slots' starts.
    pub fn stride(&self) -> usize {
        PAGE + self.capacity as usize * ENTRY_SIZE
    }

    /// Length of the whole file.
    pub fn file_len(&self) -> usize {
        PAGE + self.n_slots as usize * self.stride()
    }

    /// Offset of slot `slot`'s marker page.
    pub fn slot_at(&self, slot: usize) -> usize {
        PAGE + slot * self.stride()
    }

    /// Offset of the ring position of entry `index` in slot `slot`.
    pub fn entry_at(&self, slot: usize, index: u64) -> usize {
        self.slot_at(slot) + PAGE + (index % self.capacity as u64) as usize * ENTRY_SIZE
    }

    pub fn check_fields(&self) -> Result<(), HeaderFault> {
        if self.n_slots == 0 || self.n_slots > MAX_SLOTS {
            return Err(HeaderFault::Field(format!(
                "{} slots (1 to {MAX_SLOTS})",
                self.n_slots
            )));
        }
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.capacity)
            || self.capacity % MIN_CAPACITY != 0
        {
            return Err(HeaderFault::Field(format!(
                "{} entries a slot (a multiple of {MIN_CAPACITY} up to {MAX_CAPACITY})",
                self.capacity
            )));
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        put_u64(&mut b, 0, MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, self.n_slots);
        put_u32(&mut b, 16, self.capacity);
        put_u32(&mut b, 20, 0);
        b[24..40].copy_from_slice(&self.boot_id);
        b[40..56].copy_from_slice(&self.cache_id);
        put_u32(&mut b, 56, self.nonce);
        let crc = crc32c::crc32c_append(CRC_SEED, &b[..60]);
        put_u32(&mut b, 60, crc);
        b
    }

    /// Decode and check the header at the start of a journal file of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderFault> {
        Header::decode_page(bytes, bytes.len() as u64)
    }

    /// Decode and check the header at the start of `page`, the first bytes of a journal file
    /// of `file_len` bytes.
    pub fn decode_page(page: &[u8], file_len: u64) -> Result<Header, HeaderFault> {
        if page.len() < PAGE || file_len < PAGE as u64 {
            return Err(HeaderFault::Short(page.len().min(file_len as usize)));
        }
        let b = &page[..HEADER_LEN];
        if get_u64(b, 0) != MAGIC {
            return Err(HeaderFault::Magic);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(HeaderFault::Version(version));
        }
        let stored = get_u32(b, 60);
        let computed = crc32c::crc32c_append(CRC_SEED, &b[..60]);
        if stored != computed {
            return Err(HeaderFault::Crc { stored, computed });
        }
        let flags = get_u32(b, 20);
        if flags != 0 {
            return Err(HeaderFault::Field(format!("unknown flags {flags:#x}")));
        }
        let h = Header {
            n_slots: get_u32(b, 12),
            capacity: get_u32(b, 16),
            boot_id: b[24..40].try_into().expect("16 bytes"),
            cache_id: b[40..56].try_into().expect("16 bytes"),
            nonce: get_u32(b, 56),
        };
        h.check_fields()?;
        if file_len != h.file_len() as u64 {
            return Err(HeaderFault::Length {
                found: file_len,
                expected: h.file_len() as u64,
            });
        }
        Ok(h)
    }

    /// Seed of every CRC and check in the journal outside the header itself: from the cache
    /// id and the nonce, so entries of another journal never verify (the boot id is checked
    /// on its own).
    pub fn seed(&self) -> u32 {
        let s = crc32c::crc32c_append(CRC_SEED, &self.cache_id);
        crc32c::crc32c_append(s, &self.nonce.to_le_bytes())
    }
}

/// Seed of slot `slot`'s entries and pending marker.
pub fn slot_seed(journal_seed: u32, slot: usize) -> u32 {
    crc32c::crc32c_append(journal_seed, &(slot as u32).to_le_bytes())
}

/// The 64 bytes of entry `index` holding `key`.
pub fn encode_entry(seed: u32, index: u64, key: &KeyRecord) -> [u8; ENTRY_SIZE] {
    let mut b = [0u8; ENTRY_SIZE];
    put_u64(&mut b, 0, index);
    key.encode(&mut b[8..8 + KEY_SIZE]);
    let crc = crc32c::crc32c_append(seed, &b[..ENTRY_BODY]);
    put_u32(&mut b, ENTRY_BODY, crc);
    b
}

/// What is wrong with an entry that verifies but does not hold a key this cache may apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryFault {
    #[error("reserved bytes are not zero")]
    ReservedBytes,
    #[error(transparent)]
    Key(#[from] KeyFault),
}

/// The key of entry `index`, if `b` (64 bytes) holds exactly that entry, whole. `Err` is a key
/// whose entry verifies but that is not a valid key (reserved bits set).
pub fn decode_entry(seed: u32, index: u64, b: &[u8]) -> Option<Result<KeyRecord, EntryFault>> {
    if get_u64(b, 0) != index {
        return None;
    }
    if get_u32(b, ENTRY_BODY) != crc32c::crc32c_append(seed, &b[..ENTRY_BODY]) {
        return None;
    }
    let (key, reserved) = KeyRecord::decode_raw(&b[8..8 + KEY_SIZE]);
    if reserved != 0 || b[ENTRY_BODY + 4..].iter().any(|&x| x != 0) {
        return Some(Err(EntryFault::ReservedBytes));
    }
    Some(Ok(key))
}

/// Check word of a slot's pending marker (`seq`, `upto`).
pub fn pending_check(seed: u32, seq: u64, upto: u64) -> u32 {
    let mut b = [0u8; 16];
    put_u64(&mut b, 0, seq);
    put_u64(&mut b, 8, upto);
    crc32c::crc32c_append(seed, &b)
}

/// Second word of the in-flight marker: the kset's CRC and a check over it and `seq`.
pub fn inflight_word(seed: u32, seq: u64, kset_crc: u32) -> u64 {
    let mut b = [0u8; 12];
    put_u64(&mut b, 0, seq);
    put_u32(&mut b, 8, kset_crc);
    let check = crc32c::crc32c_append(seed, &b);
    kset_crc as u64 | (check as u64) << 32
}

/// The kset CRC of the in-flight marker `(seq, word)`, if its check holds.
pub fn decode_inflight(seed: u32, seq: u64, word: u64) -> Option<u32> {
    let kset_crc = word as u32;
    (inflight_word(seed, seq, kset_crc) == word).then_some(kset_crc)
}
