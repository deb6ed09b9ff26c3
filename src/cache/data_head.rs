// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-queue data heads: where each queue worker puts the next bytes of cached data.
//!
//! Each queue has its own head, so workers allocate data space without contending with each
//! other (the mutex around a head is only ever taken by its own worker, and by shutdown). A
//! head holds one reference on its segment; every allocation also returns a pin (one more
//! reference) that the caller drops once the key for that space is in the log, or once it gave
//! the space up. Until then the segment cannot be invalidated under the data.

use super::segments::{GenerationStore, SegmentKind, SegmentMap};
use super::CachePos;
use crate::engine::SECTOR_SIZE;

/// Segments kept free for the log: data allocation stops before the last ones are taken, so
/// the keys of data already written can always be persisted, written back and collected.
pub const LOG_RESERVE: u32 = 2;

/// What `SegmentMap::put` fails with: persisting a segment's new generation.
pub type SegmentError = crate::cache::format::FormatError;

/// A data head could not let go of its segment: the segment's last reference went, and
/// persisting its new generation failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot release data segment {seg}")]
pub struct ReleaseError {
    pub seg: u32,
    #[source]
    pub source: SegmentError,
}

#[derive(Debug, Default)]
pub struct DataHead {
    seg: Option<u32>,
    off: u32,
}

/// Space handed out by [`DataHead::alloc`]: a position, a length and the pin on its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub pos: CachePos,
    pub len: u32,
}

impl DataHead {
    /// Up to `want` bytes (a multiple of 512). With `exact`, either all of `want` in one piece
    /// or nothing from the current segment (the rest of it is left unused). `None` when no
    /// segment is free beyond the log reserve.
    pub fn alloc(
        &mut self,
        want: u32,
        exact: bool,
        data_size: u32,
        segments: &SegmentMap,
        store: &dyn GenerationStore,
    ) -> Result<Option<Allocation>, ReleaseError> {
        debug_assert!(want > 0 && want as u64 % SECTOR_SIZE == 0 && want <= data_size);
        loop {
            if let Some(seg) = self.seg {
                let remain = data_size - self.off;
                if remain >= want || (!exact && remain > 0) {
                    let len = want.min(remain);
                    let pos = CachePos { seg, off: self.off };
                    self.off += len;
                    segments.get(seg);
                    return Ok(Some(Allocation { pos, len }));
                }
                self.release(segments, store)?;
            }
            match segments.alloc(SegmentKind::Data, LOG_RESERVE) {
                Some(seg) => {
                    self.seg = Some(seg);
                    self.off = 0;
                }
                None => return Ok(None),
            }
        }
    }

    /// Where the next bytes go, while the head holds a segment.
    pub fn pos(&self) -> Option<CachePos> {
        self.seg.map(|seg| CachePos { seg, off: self.off })
    }

    /// Give up the current segment (drop the head's reference).
    pub fn release(
        &mut self,
        segments: &SegmentMap,
        store: &dyn GenerationStore,
    ) -> Result<(), ReleaseError> {
        if let Some(seg) = self.seg.take() {
            segments
                .put(seg, store)
                .map_err(|e| ReleaseError { seg, source: e })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoStore;
    impl GenerationStore for NoStore {
        fn store_gen(&self, _: u32, _: u64) -> Result<(), crate::cache::format::FormatError> {
            Ok(())
        }
    }

    #[test]
    fn fills_a_segment_then_moves_on() {
        let map = SegmentMap::new(&[0; 4]);
        let mut head = DataHead::default();
        let a = head
            .alloc(4096, false, 8192, &map, &NoStore)
            .unwrap()
            .unwrap();
        assert_eq!((a.pos.off, a.len), (0, 4096));
        let b = head
            .alloc(8192, false, 8192, &map, &NoStore)
            .unwrap()
            .unwrap();
        assert_eq!((b.pos.seg, b.pos.off, b.len), (a.pos.seg, 4096, 4096));
        // head ref + two pins
        assert_eq!(map.refs(a.pos.seg), 3);
        let c = head
            .alloc(512, true, 8192, &map, &NoStore)
            .unwrap()
            .unwrap();
        assert_ne!(c.pos.seg, a.pos.seg);
        assert_eq!(
            map.refs(a.pos.seg),
            2,
            "the old head's reference was dropped"
        );
    }

    #[test]
    fn exact_allocation_skips_a_short_remainder() {
        let map = SegmentMap::new(&[0; 4]);
        let mut head = DataHead::default();
        let a = head
            .alloc(6144, true, 8192, &map, &NoStore)
            .unwrap()
            .unwrap();
        let b = head
            .alloc(4096, true, 8192, &map, &NoStore)
            .unwrap()
            .unwrap();
        assert_ne!(a.pos.seg, b.pos.seg);
        assert_eq!(b.pos.off, 0);
    }

    #[test]
    fn stops_at_the_log_reserve() {
        let map = SegmentMap::new(&[0; 3]);
        let mut head = DataHead::default();
        assert!(head
            .alloc(8192, false, 8192, &map, &NoStore)
            .unwrap()
            .is_some());
        assert!(head
            .alloc(512, false, 8192, &map, &NoStore)
            .unwrap()
            .is_none());
    }
}
