// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Copying into directly mapped persistent memory and starting its write-back in one pass.
//!
//! Two ways, both leaving the bytes durable at the next store fence of the calling thread
//! (SFENCE orders non-temporal stores and CLWB/CLFLUSHOPT alike):
//! - [`PmemCopy::CacheThenWriteBack`]: an ordinary copy, then a write-back instruction per
//!   cache line (what [`super::Media::write`] + [`super::Media::persist`] do);
//! - [`PmemCopy::NonTemporal`]: whole cache lines with non-temporal stores (MOVNTDQ), which
//!   go around the CPU caches to memory, so there is no line left to write back; a partial line
//!   at either end takes ordinary stores and a write-back, since a non-temporal store to part
//!   of a line costs a partial write-combining flush.
//!
//! Which one is used for a copy is decided by its length ([`method_for`]), from measurements
//! (benches/pmem_copy.rs, docs/performance.md "Copy into pmem").

use super::cpu_flush::{self, FlushInsn};

/// How a copy into pmem ([`super::Media::write_and_persist`]) moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmemCopy {
    /// An ordinary copy, then a write-back of every cache line it touched.
    CacheThenWriteBack,
    /// Non-temporal stores for the whole cache lines, ordinary stores and a write-back for a
    /// partial line at either end. Only on x86-64; elsewhere the same as `CacheThenWriteBack`.
    NonTemporal,
}

/// Copies of at least this many bytes use non-temporal stores.
///
/// Measured with `cargo bench --bench pmem_copy -- --measure` (docs/performance.md, "Copy into
/// pmem"), into a cold pmem-mode mapping with a fence after each copy: the non-temporal copy
/// took 0.3-0.8x the time of copy + CLWB at every size from 64 B to 128 KiB (medians of three
/// runs: 256 B 240 against 365 ns, 4 KiB 0.32 against 1.1 us, 64 KiB 4.6 against 15.7 us), as
/// it neither reads the destination lines into the cache nor writes them back one by one. The
/// line is drawn at 256 B, PMDK's default (`PMEM_MOVNT_THRESHOLD`), which it set on real
/// persistent memory, where small streamed writes may behave otherwise than in DRAM and none
/// is here to measure; guests' data segments are in practice whole sectors (512 B) or more, so
/// they stream.
pub const NON_TEMPORAL_MIN: usize = 256;

/// The way a copy of `len` bytes is made.
pub fn method_for(len: usize) -> PmemCopy {
    if len >= NON_TEMPORAL_MIN {
        PmemCopy::NonTemporal
    } else {
        PmemCopy::CacheThenWriteBack
    }
}

/// Copy `len` bytes from `src` to `dst` with `method` and start writing them back with
/// `flush`; durable once the calling thread runs [`cpu_flush::store_fence`].
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, the two must not overlap,
/// and no other thread may access `dst..dst + len` meanwhile.
pub(crate) unsafe fn copy_and_write_back(
    method: PmemCopy,
    flush: FlushInsn,
    dst: *mut u8,
    src: *const u8,
    len: usize,
) {
    match method {
        // SAFETY: the caller's contract, passed on.
        PmemCopy::NonTemporal => unsafe { copy_non_temporal(flush, dst, src, len) },
        // SAFETY: the caller's contract, passed on.
        PmemCopy::CacheThenWriteBack => unsafe { copy_cached(flush, dst, src, len) },
    }
}

/// Ordinary copy, then write-back of every line touched.
///
/// # Safety
/// As [`copy_and_write_back`].
unsafe fn copy_cached(flush: FlushInsn, dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller guarantees both ranges are valid and disjoint; the write-back only
    // touches lines overlapping the mapped destination.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len);
        cpu_flush::write_back(flush, dst, len);
    }
}

/// Non-temporal copy of the whole lines, [`copy_cached`] for a partial line at either end.
///
/// # Safety
/// As [`copy_and_write_back`].
#[cfg(target_arch = "x86_64")]
unsafe fn copy_non_temporal(flush: FlushInsn, dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract, passed on.
    unsafe { stream_lines(dst, src, len, Some(flush)) }
}

/// Copy `len` bytes from `src` to `dst` with non-temporal stores for the whole lines (ordinary
/// stores for a partial line at either end), then a store fence, so the bytes are in memory,
/// visible to every CPU and device, on return. For msync mode's page-cache pages: the copy
/// neither reads the destination lines into the cache (they are cold: the page was written
/// back and is about to be written back again) nor evicts the lines the request path uses.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, the two must not overlap,
/// and no other thread may access `dst..dst + len` meanwhile.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract, passed on; the fence orders the non-temporal stores
    // before every later store of this thread (the key that names the bytes; what makes them
    // durable is another thread's msync).
    unsafe {
        stream_lines(dst, src, len, None);
        core::arch::x86_64::_mm_sfence();
    }
}

/// Non-temporal stores for the whole 64-byte lines of `dst..dst + len`; a partial line at
/// either end is copied through the cache, and written back with `flush` when it is given.
///
/// # Safety
/// As [`copy_and_write_back`].
#[cfg(target_arch = "x86_64")]
unsafe fn stream_lines(dst: *mut u8, src: *const u8, len: usize, flush: Option<FlushInsn>) {
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    const LINE: usize = super::CACHE_LINE as usize;
    let edge = |d: *mut u8, s: *const u8, n: usize| {
        // SAFETY: called below only with the head or the tail of the caller's ranges.
        unsafe {
            match flush {
                Some(flush) => copy_cached(flush, d, s, n),
                None => std::ptr::copy_nonoverlapping(s, d, n),
            }
        }
    };
    let head = ((dst as usize).wrapping_neg() & (LINE - 1)).min(len);
    let lines = (len - head) / LINE;
    let tail = len - head - lines * LINE;
    edge(dst, src, head);
    for i in 0..lines {
        let at = head + i * LINE;
        // SAFETY: `at..at + LINE` lies inside both ranges (lines * LINE <= len - head); the
        // destination is line-aligned, as MOVNTDQ needs 16 bytes; the source may be unaligned
        // (MOVDQU). SSE2 is part of every x86-64 CPU.
        unsafe {
            let s = src.add(at).cast::<__m128i>();
            let d = dst.add(at).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
    }
    let at = len - tail;
    // SAFETY: `at <= len`, so both pointers stay inside the caller's ranges.
    let (dst_tail, src_tail) = unsafe { (dst.add(at), src.add(at)) };
    edge(dst_tail, src_tail, tail);
}

/// Targets without non-temporal stores here: an ordinary copy.
///
/// # Safety
/// As the x86-64 version.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract, passed on.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

/// Targets without non-temporal stores here copy through the cache (pmem mode is refused on
/// them anyway: `cpu_flush::SUPPORTED`).
///
/// # Safety
/// As [`copy_and_write_back`].
#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_non_temporal(flush: FlushInsn, dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract, passed on.
    unsafe { copy_cached(flush, dst, src, len) }
}
