// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty logging for migration and save (`VHOST_F_LOG_ALL`, `LOG_SHMFD`): while the frontend
//! copies guest memory, every page the daemon writes must be marked in the log it shared
//! (SET_LOG_BASE), or the copy keeps the page's old contents.
//!
//! Writes through vm-memory (the GET_ID answer) mark the guest memory's bitmap themselves; the
//! status byte writer and the split ring walker (the used ring) mark what they write. Read data does not pass through vm-memory: the engine writes it
//! through the raw pointers of the request's buffers (io_uring, memcpy from the cache), so the
//! queue worker marks those ranges here once the request has completed, before the used ring
//! tells the guest. Marking after the write is what keeps the copy right: a page marked before
//! the data lands could be copied and cleared in between.

use log::debug;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Marks `ranges` of guest memory as written in `mem`'s dirty bitmap (a no-op while the
/// frontend has not set a log).
pub fn mark_written<M: GuestMemoryBackend>(mem: &M, ranges: &[(GuestAddress, u64)]) {
    for &(addr, len) in ranges {
        for slice in mem.get_slices(addr, len as usize) {
            match slice {
                Ok(slice) => slice.bitmap().mark_dirty(0, slice.len()),
                // The decoder checked the range when the request was taken; a memory table
                // replaced since keeps the old mapping alive in the request's snapshot.
                Err(e) => debug!("cannot mark {len} bytes at {:#x} dirty: {e}", addr.0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{GuestMemoryMmap, GuestMemoryRegion};

    const PAGE: u64 = 4096;

    #[test]
    fn every_page_of_every_range_is_marked_and_no_other() {
        // Two regions with a hole between, so a range can end exactly at a region's end.
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * PAGE as usize),
            (GuestAddress(32 * PAGE), 16 * PAGE as usize),
        ])
        .unwrap();
        // Page 2 (one byte), pages 5..=7 (unaligned start and end), the last page of region 0
        // and pages 32..=33 of region 1.
        mark_written(
            &mem,
            &[
                (GuestAddress(2 * PAGE + 100), 1),
                (GuestAddress(5 * PAGE + 10), 2 * PAGE + 20),
                (GuestAddress(15 * PAGE), PAGE),
                (GuestAddress(32 * PAGE + 4000), 200),
            ],
        );
        let dirty: Vec<u64> = mem
            .iter()
            .flat_map(|region| {
                let start = region.start_addr().0 / PAGE;
                (0..region.len() / PAGE)
                    .filter(move |p| region.bitmap().dirty_at((p * PAGE) as usize))
                    .map(move |p| start + p)
            })
            .collect();
        assert_eq!(dirty, vec![2, 5, 6, 7, 15, 32, 33]);
    }
}
