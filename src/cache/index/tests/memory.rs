// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Heap bytes per cached extent, measured with a counting allocator.
//!
//! The count is per thread, so tests running in parallel do not disturb each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use super::*;

struct CountingAllocator;

thread_local! {
    static NET_BYTES: Cell<i64> = const { Cell::new(0) };
}

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Allocations and reallocations made on this thread so far: for tests that check a path
/// allocates nothing in steady state.
pub(crate) fn allocations() -> u64 {
    ALLOCATIONS.with(|n| n.get())
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn count(delta: i64) {
    // `try_with`: the allocator also runs while a thread's locals are being torn down.
    let _ = NET_BYTES.try_with(|n| n.set(n.get() + delta));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as i64);
        count_allocation();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as i64));
        // SAFETY: `ptr` came from `System` with this layout, as our caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as i64 - layout.size() as i64);
        count_allocation();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn net_bytes() -> i64 {
    NET_BYTES.with(|n| n.get())
}

/// Heap bytes the index grows by per extent when `offsets` (4 KiB keys) are inserted in order.
fn bytes_per_extent(offsets: impl Iterator<Item = u64>) -> f64 {
    let index = Index::new(64 * MIB);
    let before = net_bytes();
    for (i, off) in offsets.enumerate() {
        index.insert(dirty(off, 4 * K, 1, (i as u64 % 4096) * 4 * K), &mut |_| {});
    }
    let grown = net_bytes() - before;
    grown as f64 / index.extent_count() as f64
}

/// A fixed permutation of `0..n` (multiplying by an odd constant modulo a power of two).
fn scattered(n: u64) -> impl Iterator<Item = u64> {
    assert!(n.is_power_of_two());
    (0..n).map(move |i| (i.wrapping_mul(0x9E37_79B9) % n) * 4 * K)
}

/// Each entry is a 28-byte value in a 32-byte slot plus a 4-byte word (offset, length, slot)
/// in a chunk of 14 entries (512 bytes) of the region's map. Sequential inserts fill chunks,
/// scattered ones leave them about two thirds full: measured 38.5 and 57.3 bytes an extent,
/// the chunk arrays included (36.0 and 56.2 with 15 entries a chunk, values packed across
/// line boundaries; 63.8 and 52.7 in the `BTreeMap` of 11-slot nodes used before; 70.5 and 58.2 while the CRC span's
/// offset and length took 32 bits each instead of 16 in sectors; 78.5 and 64.9 before the
/// span's segment, always the key's own, was dropped from the entry). Both stay under 64
/// bytes; the bound catches any growth of the entry or a switch to a heavier map.
#[test]
fn an_extent_costs_less_than_64_bytes() {
    const N: u64 = 16384;
    let sequential = bytes_per_extent((0..N).map(|i| i * 4 * K));
    let scattered = bytes_per_extent(scattered(N));
    println!("index memory per extent: sequential {sequential:.1} B, scattered {scattered:.1} B");
    assert!(
        sequential > 32.0,
        "the measurement counts the entries themselves"
    );
    assert!(
        sequential < 64.0,
        "sequential inserts cost {sequential:.1} bytes an extent"
    );
    assert!(
        scattered < 64.0,
        "scattered inserts cost {scattered:.1} bytes an extent"
    );
}

#[test]
fn lookups_and_overwrites_do_not_grow_the_index() {
    let index = Index::new(16 * MIB);
    let mut out = Vec::with_capacity(256);
    let mut after_first_round = None;
    for round in 0..50u64 {
        index.lookup(0, 512 * K, true, &|_| 1, &mut out);
        // Overwrite the keys and the placeholders between them: the extent set is the same
        // each round, so the map may only wobble by the node a removal merged away.
        for i in 0..128 {
            index.insert(dirty(i * 4 * K, 4 * K, 2, round * 4 * K), &mut |_| {});
        }
        after_first_round.get_or_insert(net_bytes());
    }
    let first = after_first_round.unwrap_or_default();
    assert!(
        net_bytes() <= first + 1024,
        "grew from {first} to {}",
        net_bytes()
    );
    assert_eq!(index.extent_count(), 128);
}

#[test]
fn a_region_costs_64_bytes_in_the_daemon_before_it_holds_anything() {
    // Allocated for every 4 MiB of disk at open: 16 MiB per TiB (documented), one cache line
    // per region. Test builds keep a key count per region (one usize) that the daemon leaves
    // out, which takes them to a second line.
    use std::mem::size_of;
    use std::sync::Mutex;
    let unpadded = size_of::<Mutex<super::super::subtree::Subtree>>() - size_of::<usize>();
    assert_eq!(unpadded, 64);
    assert_eq!(std::mem::align_of::<super::super::Region>(), 64);
}
