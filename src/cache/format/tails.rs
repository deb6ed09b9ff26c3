// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! key_tail and dirty_tail: where the live log starts, and where unwritten-back data starts.

use crate::cache::media::Media;
use crate::cache::CachePos;

use super::layout::Layout;
use super::record::{get_u32, get_u64, load_latest_checked, put_u32, put_u64, store};
use super::record::{FieldFault, MetaRecord, Versioned};
use super::FormatError;

/// Which tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Start of the live log; advanced by GC.
    Key,
    /// First kset not yet written back; advanced by writeback after the backing flush.
    Dirty,
}

/// A tail: a log position and the sequence number of the kset found there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TailPos {
    /// `pos.off` counts from the start of the segment's data area.
    pub pos: CachePos,
    /// Log sequence number of the kset at `pos`.
    pub log_seq: u64,
}

impl MetaRecord for TailPos {
    const LEN: usize = 32;

    fn encode_body(&self, b: &mut [u8]) {
        put_u32(b, 0, self.pos.seg);
        put_u32(b, 4, self.pos.off);
        put_u64(b, 8, self.log_seq);
    }

    fn decode_body(b: &[u8]) -> Result<Self, FieldFault> {
        Ok(TailPos {
            pos: CachePos {
                seg: get_u32(b, 0),
                off: get_u32(b, 4),
            },
            log_seq: get_u64(b, 8),
        })
    }
}

fn slots(layout: &Layout, tail: Tail) -> super::record::ReplicaSlots {
    match tail {
        Tail::Key => layout.key_tail_slots(),
        Tail::Dirty => layout.dirty_tail_slots(),
    }
}

/// Load a tail; a replica pointing outside the layout counts as invalid.
pub fn load_tail(
    media: &dyn Media,
    layout: &Layout,
    tail: Tail,
) -> Result<Versioned<TailPos>, FormatError> {
    let check = |t: &TailPos| {
        if layout.contains(t.pos) {
            Ok(())
        } else {
            Err(FieldFault::OutsideLayout {
                seg: t.pos.seg,
                off: t.pos.off,
                n_segments: layout.n_segments(),
                data_size: layout.data_size(),
            })
        }
    };
    load_latest_checked(media, &slots(layout, tail), &check)
}

/// Store a tail durably (non-newest replica, persist, fence).
pub fn store_tail(
    media: &dyn Media,
    layout: &Layout,
    tail: Tail,
    value: &TailPos,
) -> Result<(), FormatError> {
    if !layout.contains(value.pos) {
        return Err(FormatError::InvalidArgument(format!(
            "{tail:?} tail {}:{} outside the layout",
            value.pos.seg, value.pos.off
        )));
    }
    store(media, &slots(layout, tail), value).map(|_| ())
}
