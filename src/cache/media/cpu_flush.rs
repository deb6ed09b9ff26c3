// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CPU cache-line write-back for directly mapped persistent memory.
//!
//! Picks the best instruction the CPU has (CPUID leaf 7: CLWB, then CLFLUSHOPT; CLFLUSH is
//! part of every x86-64 CPU). CLWB and CLFLUSHOPT are weakly ordered and need the SFENCE of
//! [`store_fence`]; CLFLUSH is ordered by itself, and the fence is harmless.

use super::CACHE_LINE;

/// The write-back instruction in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlushInsn {
    Clwb,
    Clflushopt,
    Clflush,
}

/// Whether this build can write back CPU cache lines at all (pmem mode needs it).
pub(crate) const SUPPORTED: bool = cfg!(target_arch = "x86_64");

#[cfg(target_arch = "x86_64")]
pub(crate) fn detect() -> FlushInsn {
    use core::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 0 tells whether leaf 7 exists.
    #[allow(unused_unsafe)]
    let (max_leaf, leaf7_ebx) = unsafe {
        let max_leaf = __cpuid_count(0, 0).eax;
        let ebx = if max_leaf >= 7 {
            __cpuid_count(7, 0).ebx
        } else {
            0
        };
        (max_leaf, ebx)
    };
    let _ = max_leaf;
    if leaf7_ebx & (1 << 24) != 0 {
        FlushInsn::Clwb
    } else if leaf7_ebx & (1 << 23) != 0 {
        FlushInsn::Clflushopt
    } else {
        FlushInsn::Clflush
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn detect() -> FlushInsn {
    FlushInsn::Clflush
}

/// Write back every cache line overlapping `[addr, addr + len)`.
///
/// # Safety
/// The range must lie inside a live mapping of this process.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn write_back(insn: FlushInsn, addr: *const u8, len: usize) {
    use core::arch::asm;
    if len == 0 {
        return;
    }
    let line = CACHE_LINE as usize;
    let start = addr as usize & !(line - 1);
    let end = addr as usize + len;
    let mut p = start;
    while p < end {
        // SAFETY: p is inside a cache line that overlaps the caller's mapped range; these
        // instructions only write the line back, they never change memory contents.
        unsafe {
            match insn {
                FlushInsn::Clwb => asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags)),
                FlushInsn::Clflushopt => {
                    asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
                FlushInsn::Clflush => {
                    asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags))
                }
            }
        }
        p += line;
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn write_back(_insn: FlushInsn, _addr: *const u8, _len: usize) {
    // Pmem mode is refused at open on these targets (SUPPORTED is false).
}

/// Order all earlier write-backs before anything that follows (SFENCE).
pub(crate) fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE has no memory operands and is available on every x86-64 CPU.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}
