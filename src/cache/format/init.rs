// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Formatting a media, and recognising a formatted one.

use crate::backing::identity::BlockIdentity;
use crate::cache::media::Media;
use crate::cache::CachePos;

use super::backing_identity::{compare, load_backing_identity, BackingId, BackingMatch};
use super::cache_info::{BackingFingerprint, CacheInfo, DEFAULT_GC_PERCENT, MAX_GC_PERCENT};
use super::kset::KSET_HEADER_SIZE;
use super::layout::{Layout, META_PAGE, SEGMENTS_OFFSET, SEGMENT_DATA_OFFSET, SUPERBLOCK_OFFSET};
use super::record::{decode_record, encode_record, load_latest, write_initial, MetaRecord};
use super::record::{FieldFault, RecordFault, RecordKind, Versioned};
use super::segment::{Generation, SegmentInfo, SegmentType};
use super::superblock::Superblock;
use super::tails::TailPos;
use super::FormatError;

/// Settings chosen at format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatOptions {
    pub data_crc: bool,
    pub gc_percent: u8,
    pub backing: BackingFingerprint,
    /// The backing block device's stable identity, recorded in backing_identity.
    pub backing_identity: Option<BlockIdentity>,
}

impl FormatOptions {
    /// Defaults (no data CRC, gc_percent 70) for a backing image known by its numbers only.
    pub fn new(backing: BackingFingerprint) -> Self {
        FormatOptions::for_backing(backing.into())
    }

    /// Defaults (no data CRC, gc_percent 70) for `backing`.
    pub fn for_backing(backing: BackingId) -> Self {
        FormatOptions {
            data_crc: false,
            gc_percent: DEFAULT_GC_PERCENT,
            backing: backing.fingerprint,
            backing_identity: backing.stable,
        }
    }
}

/// Format `media` with `layout`. Order, so that a crash at any point leaves either the old
/// cache, or a media that [`probe`] calls unformatted, or the new cache:
/// 1. zero the superblock, persist, fence;
/// 2. zero all other metadata and segment 0's first kset header, write cache_info, both
///    tails, every segment's info and generation 0, persist, fence;
/// 3. write the superblock, persist, fence.
pub fn format(
    media: &dyn Media,
    layout: &Layout,
    opts: &FormatOptions,
) -> Result<Superblock, FormatError> {
    if opts.gc_percent > MAX_GC_PERCENT {
        return Err(FormatError::InvalidArgument(format!(
            "gc_percent {} above {MAX_GC_PERCENT}",
            opts.gc_percent
        )));
    }
    if Layout::media_len_for(layout.n_segments()) > media.len() {
        return Err(FormatError::MediaTooSmall {
            media_len: media.len(),
            n_segments: layout.n_segments(),
            min_len: Layout::media_len_for(layout.n_segments()),
        });
    }
    let zero = |offset: u64, len: u64| -> Result<(), FormatError> {
        media.write_zeroes(offset, len)?;
        media.persist(offset, len)?;
        Ok(())
    };
    zero(SUPERBLOCK_OFFSET, META_PAGE)?;
    media.fence()?;

    let meta_start = SUPERBLOCK_OFFSET + META_PAGE;
    zero(meta_start, SEGMENTS_OFFSET - meta_start)?;
    for seg in 0..layout.n_segments() {
        zero(layout.segment_offset(seg), SEGMENT_DATA_OFFSET)?;
    }
    zero(layout.data_start(0), KSET_HEADER_SIZE as u64)?;

    let info = CacheInfo {
        n_segments: layout.n_segments(),
        data_crc: opts.data_crc,
        init_done: false,
        gc_percent: opts.gc_percent,
        backing: opts.backing,
    };
    write_initial(media, &layout.cache_info_slots(), &info)?;
    if let Some(identity) = &opts.backing_identity {
        write_initial(media, &layout.backing_identity_slots(), identity)?;
    }
    let start = TailPos {
        pos: CachePos { seg: 0, off: 0 },
        log_seq: 1,
    };
    write_initial(media, &layout.key_tail_slots(), &start)?;
    write_initial(media, &layout.dirty_tail_slots(), &start)?;
    for seg in 0..layout.n_segments() {
        let info = SegmentInfo {
            seg_id: seg,
            seg_type: SegmentType::Cache,
            flags: 0,
        };
        write_initial(media, &layout.segment_info_slots(seg), &info)?;
        write_initial(
            media,
            &layout.generation_slots(seg),
            &Generation {
                seg_id: seg,
                gen: 0,
            },
        )?;
    }
    media.fence()?;

    let sb = Superblock::new(layout, random_cache_id());
    let bytes = encode_record(&sb, RecordKind::Superblock, 0);
    media.write(SUPERBLOCK_OFFSET, &bytes)?;
    media.persist(SUPERBLOCK_OFFSET, bytes.len() as u64)?;
    media.fence()?;
    log::info!(
        "formatted cache: {} segments, data_crc {}, gc_percent {}, backing {}",
        layout.n_segments(),
        opts.data_crc,
        opts.gc_percent,
        opts.backing
    );
    Ok(sb)
}

/// Read the superblock: `Ok(None)` for an unformatted media (all-zero superblock page),
/// `Ok(Some)` for a valid superblock whose geometry fits the media, an error otherwise.
pub fn probe(media: &dyn Media) -> Result<Option<Superblock>, FormatError> {
    if media.len() < SEGMENTS_OFFSET {
        return Err(FormatError::MediaTooSmall {
            media_len: media.len(),
            n_segments: 0,
            min_len: Layout::media_len_for(super::MIN_SEGMENTS),
        });
    }
    let mut page = vec![0u8; META_PAGE as usize];
    media.read(SUPERBLOCK_OFFSET, &mut page)?;
    if page.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let corrupt = |fault| FormatError::Corrupt {
        kind: RecordKind::Superblock,
        offset: SUPERBLOCK_OFFSET,
        fault,
    };
    let (sb, _) = match decode_record::<Superblock>(&page, RecordKind::Superblock) {
        Ok(v) => v,
        Err(RecordFault::UnsupportedVersion { found }) => {
            return Err(FormatError::UnsupportedVersion {
                kind: RecordKind::Superblock,
                found,
            })
        }
        Err(fault) => return Err(corrupt(fault)),
    };
    if page[Superblock::LEN..].iter().any(|&b| b != 0) {
        return Err(corrupt(RecordFault::BadField(FieldFault::TrailingBytes)));
    }
    sb.layout(media.len())?;
    Ok(Some(sb))
}

/// What [`open_metadata`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedCache {
    pub superblock: Superblock,
    pub layout: Layout,
    pub cache_info: Versioned<CacheInfo>,
    /// What the cache records about its backing image.
    pub recorded_backing: BackingId,
    /// How the backing image given relates to it (never [`BackingMatch::Different`]).
    pub backing_match: BackingMatch,
}

/// [`open_metadata_for`] a backing image known by its numbers only.
pub fn open_metadata(
    media: &dyn Media,
    backing: &BackingFingerprint,
) -> Result<OpenedCache, FormatError> {
    open_metadata_for(media, &(*backing).into())
}

/// Open a formatted cache for the backing image `backing`: superblock, layout and the
/// newest cache_info, checked for consistency and for belonging to `backing` (see
/// [`compare`]). Writes nothing: bringing the record up to date is
/// [`record_backing`](super::record_backing).
pub fn open_metadata_for(
    media: &dyn Media,
    backing: &BackingId,
) -> Result<OpenedCache, FormatError> {
    let superblock = probe(media)?.ok_or(FormatError::Unformatted)?;
    let layout = superblock.layout(media.len())?;
    let cache_info = load_latest::<CacheInfo>(media, &layout.cache_info_slots())?;
    if cache_info.value.n_segments != superblock.n_segments {
        return Err(FormatError::Inconsistent(format!(
            "cache_info (slot {}) says {} segments, the superblock {}",
            cache_info.slot, cache_info.value.n_segments, superblock.n_segments
        )));
    }
    let recorded_backing = BackingId {
        fingerprint: cache_info.value.backing,
        stable: load_backing_identity(media, &layout)?.map(|v| v.value),
    };
    let backing_match = compare(&recorded_backing, backing);
    if backing_match == BackingMatch::Different {
        return Err(FormatError::WrongBacking {
            recorded: Box::new(recorded_backing),
            found: Box::new(backing.clone()),
        });
    }
    Ok(OpenedCache {
        superblock,
        layout,
        cache_info,
        recorded_backing,
        backing_match,
    })
}

/// 16 random bytes from the kernel; falls back to time and process id, which still differ
/// between two formats of one media (all the id is for).
fn random_cache_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most id.len() bytes into id.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id[..12].copy_from_slice(&now.to_le_bytes()[..12]);
        id[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}
