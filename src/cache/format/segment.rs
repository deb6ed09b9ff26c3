// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-segment records: segment info (type, flags) and generation.
//!
//! Both carry the segment's own index, so a record copied or misdirected to another
//! segment's slots is rejected instead of believed.

use crate::cache::media::Media;

use super::layout::Layout;
use super::record::{get_u32, get_u64, load_latest_checked, put_u32, put_u64, store};
use super::record::{FieldFault, MetaRecord, Versioned};
use super::FormatError;

/// What a segment is for. Only one type exists today: a cache segment, which holds log
/// ksets or cached data as the engine decides at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentType {
    Cache,
}

impl SegmentType {
    fn code(self) -> u32 {
        match self {
            SegmentType::Cache => 1,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        match c {
            1 => Some(SegmentType::Cache),
            _ => None,
        }
    }
}

/// Segment flags this build understands (none yet; unknown bits are refused).
pub const SEGMENT_KNOWN_FLAGS: u32 = 0;

/// The segment info record of segment `seg_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub seg_id: u32,
    pub seg_type: SegmentType,
    pub flags: u32,
}

impl MetaRecord for SegmentInfo {
    const LEN: usize = 32;

    fn encode_body(&self, b: &mut [u8]) {
        put_u32(b, 0, self.seg_id);
        put_u32(b, 4, self.seg_type.code());
        put_u32(b, 8, self.flags);
    }

    fn decode_body(b: &[u8]) -> Result<Self, FieldFault> {
        let code = get_u32(b, 4);
        let seg_type = SegmentType::from_code(code).ok_or(FieldFault::UnknownSegmentType(code))?;
        let flags = get_u32(b, 8);
        if flags & !SEGMENT_KNOWN_FLAGS != 0 {
            return Err(FieldFault::UnknownFlags {
                record: "segment",
                flags,
            });
        }
        Ok(SegmentInfo {
            seg_id: get_u32(b, 0),
            seg_type,
            flags,
        })
    }
}

/// The generation record of segment `seg_id`: keys with an older `gen` are stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation {
    pub seg_id: u32,
    pub gen: u64,
}

impl MetaRecord for Generation {
    const LEN: usize = 32;

    fn encode_body(&self, b: &mut [u8]) {
        put_u32(b, 0, self.seg_id);
        put_u64(b, 8, self.gen);
    }

    fn decode_body(b: &[u8]) -> Result<Self, FieldFault> {
        Ok(Generation {
            seg_id: get_u32(b, 0),
            gen: get_u64(b, 8),
        })
    }
}

fn check_seg(layout: &Layout, seg: u32) -> Result<(), FormatError> {
    if seg < layout.n_segments() {
        Ok(())
    } else {
        Err(FormatError::InvalidArgument(format!(
            "segment {seg} out of {}",
            layout.n_segments()
        )))
    }
}

fn same_seg(seg: u32, found: u32) -> Result<(), FieldFault> {
    if found == seg {
        Ok(())
    } else {
        Err(FieldFault::OtherSegment { seg, found })
    }
}

/// Load segment `seg`'s info.
pub fn load_segment_info(
    media: &dyn Media,
    layout: &Layout,
    seg: u32,
) -> Result<Versioned<SegmentInfo>, FormatError> {
    check_seg(layout, seg)?;
    load_latest_checked(
        media,
        &layout.segment_info_slots(seg),
        &|r: &SegmentInfo| same_seg(seg, r.seg_id),
    )
}

/// Store segment info durably (its `seg_id` picks the segment).
pub fn store_segment_info(
    media: &dyn Media,
    layout: &Layout,
    info: &SegmentInfo,
) -> Result<(), FormatError> {
    check_seg(layout, info.seg_id)?;
    store(media, &layout.segment_info_slots(info.seg_id), info).map(|_| ())
}

/// Load segment `seg`'s generation number.
pub fn load_generation(media: &dyn Media, layout: &Layout, seg: u32) -> Result<u64, FormatError> {
    check_seg(layout, seg)?;
    let slots = layout.generation_slots(seg);
    let v = load_latest_checked(media, &slots, &|r: &Generation| same_seg(seg, r.seg_id))?;
    Ok(v.value.gen)
}

/// Store segment `seg`'s generation number durably.
pub fn store_generation(
    media: &dyn Media,
    layout: &Layout,
    seg: u32,
    gen: u64,
) -> Result<(), FormatError> {
    check_seg(layout, seg)?;
    store(
        media,
        &layout.generation_slots(seg),
        &Generation { seg_id: seg, gen },
    )
    .map(|_| ())
}
