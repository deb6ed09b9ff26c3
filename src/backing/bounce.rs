// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Aligned buffers for O_DIRECT and the rules for when a request must bounce through one.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::engine::DataSeg;

/// The most iovecs one readv/writev may carry (Linux `UIO_MAXIOV`); longer lists bounce.
pub(crate) const MAX_IOVECS: usize = 1024;

/// A zero-filled heap buffer whose address is a multiple of its alignment.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned heap memory; nothing ties it to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `align` must be a power of two.
    pub(crate) fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(align).max(1), align)
            .expect("alignment is a power of two and the size fits in isize");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// For buffers the kernel only reads from (shared zero pages).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes (alloc_zeroed) owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes owned exclusively by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// How much a zero-filling fallback writes per request: bounded so one request never pins a
/// large buffer, and a multiple of every supported alignment.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// End of the next piece of a zero fill from `cursor` to `end`: a partial head block alone (it
/// needs a read-modify-write), then whole aligned chunks, then the partial tail block alone.
pub(crate) fn next_zero_chunk_end(cursor: u64, end: u64, align: usize) -> u64 {
    if cursor % align as u64 != 0 {
        return end.min(align_up(cursor, align));
    }
    let chunk_end = end.min(cursor + ZERO_CHUNK as u64);
    let aligned_end = align_down(chunk_end, align);
    if aligned_end > cursor {
        aligned_end
    } else {
        chunk_end
    }
}

pub(crate) fn align_down(value: u64, align: usize) -> u64 {
    value & !(align as u64 - 1)
}

pub(crate) fn align_up(value: u64, align: usize) -> u64 {
    align_down(value + (align as u64 - 1), align)
}

/// Whether every segment can be handed to the kernel as it is.
pub(crate) fn segs_aligned(segs: &[DataSeg], align: usize) -> bool {
    segs.len() <= MAX_IOVECS
        && segs
            .iter()
            .all(|s| (s.ptr as usize) % align == 0 && s.len % align == 0)
}

/// The iovecs of a scatter-gather list, for a zero-copy readv/writev.
pub(crate) fn segs_to_iovecs(segs: &[DataSeg]) -> Vec<libc::iovec> {
    fill_iovecs(Vec::new(), segs)
}

/// Like [`segs_to_iovecs`], into `iovecs` (emptied first), so a queue can reuse its arrays.
pub(crate) fn fill_iovecs(mut iovecs: Vec<libc::iovec>, segs: &[DataSeg]) -> Vec<libc::iovec> {
    iovecs.clear();
    iovecs.extend(segs.iter().filter(|s| s.len > 0).map(|s| libc::iovec {
        iov_base: s.ptr.cast(),
        iov_len: s.len,
    }));
    iovecs
}

/// Concatenate the bytes of `segs` into `dst` (which holds exactly their total length).
pub(crate) fn copy_from_segs(segs: &[DataSeg], dst: &mut [u8]) {
    let mut at = 0;
    for seg in segs {
        // SAFETY: a DataSeg is valid for `len` bytes until its request completes, which it has
        // not yet (we are still working on it).
        let src = unsafe { std::slice::from_raw_parts(seg.ptr, seg.len) };
        dst[at..at + seg.len].copy_from_slice(src);
        at += seg.len;
    }
}

/// Scatter `src` (exactly the total length of `segs`) into the segments.
pub(crate) fn copy_to_segs(src: &[u8], segs: &[DataSeg]) {
    let mut at = 0;
    for seg in segs {
        // SAFETY: as in `copy_from_segs`; the caller gave us these segments to fill and keeps
        // no other reference to them while the request is in flight.
        let dst = unsafe { std::slice::from_raw_parts_mut(seg.ptr, seg.len) };
        dst.copy_from_slice(&src[at..at + seg.len]);
        at += seg.len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for align in [512usize, 4096] {
            let buf = AlignedBuf::zeroed(3 * align, align);
            assert_eq!(buf.as_ptr() as usize % align, 0);
            assert_eq!(buf.len(), 3 * align);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn rounding() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_up(0, 512), 0);
    }

    #[test]
    fn zero_chunks_split_head_body_and_tail() {
        let (align, mut cursor, end) = (4096usize, 512u64, 3 * ZERO_CHUNK as u64 + 1024);
        let mut pieces = Vec::new();
        while cursor < end {
            let next = next_zero_chunk_end(cursor, end, align);
            assert!(next > cursor && next - cursor <= ZERO_CHUNK as u64);
            pieces.push((cursor, next));
            cursor = next;
        }
        assert_eq!(pieces.first(), Some(&(512, 4096)));
        assert_eq!(pieces.last().map(|p| p.1), Some(end));
        let tail = pieces.last().unwrap();
        assert_eq!(tail.0 % align as u64, 0);
        assert_eq!(tail.1 - tail.0, 1024);
        for (start, stop) in &pieces[1..pieces.len() - 1] {
            assert_eq!(start % align as u64, 0);
            assert_eq!(stop % align as u64, 0);
        }
    }

    #[test]
    fn segment_alignment_rules() {
        let mut buf = AlignedBuf::zeroed(8192, 4096);
        let p = buf.as_mut_ptr();
        let whole = DataSeg { ptr: p, len: 4096 };
        assert!(segs_aligned(&[whole], 4096));
        assert!(segs_aligned(&[whole], 512));
        let short = DataSeg { ptr: p, len: 512 };
        assert!(!segs_aligned(&[short], 4096));
        // SAFETY: one byte past the start stays inside the 8192-byte buffer.
        let ptr = unsafe { p.add(1) };
        let shifted = DataSeg { ptr, len: 512 };
        assert!(!segs_aligned(&[shifted], 512));
    }

    #[test]
    fn gather_and_scatter_round_trip() {
        let mut a = vec![1u8; 3];
        let mut b = vec![2u8; 5];
        let segs = [
            DataSeg {
                ptr: a.as_mut_ptr(),
                len: a.len(),
            },
            DataSeg {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        let mut flat = vec![0u8; 8];
        copy_from_segs(&segs, &mut flat);
        assert_eq!(flat, [1, 1, 1, 2, 2, 2, 2, 2]);
        let src: Vec<u8> = (10..18).collect();
        copy_to_segs(&src, &segs);
        assert_eq!(a, [10, 11, 12]);
        assert_eq!(b, [13, 14, 15, 16, 17]);
    }
}
