// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The index grows with what the cache holds, not with the disk: keys of reclaimed segments and
//! zeroes keys of reclaimed ksets leave it in the background.

use std::time::Duration;

use super::{pattern, wait_until, Fixture};
use crate::cache::driver::Driver;
use crate::cache::index::KeyKind;
use crate::cache::CacheEngine;
use crate::engine::Engine;

const BLOCK: u64 = 4096;

/// Keys a full cache could hold at most: every data byte of every segment in 4 KiB keys.
fn cache_bound(engine: &CacheEngine) -> usize {
    let core = engine.core();
    (core.segments.count() as u64 * core.layout.data_size() as u64 / BLOCK) as usize
}

fn zeroes_keys(engine: &CacheEngine) -> usize {
    let mut n = 0;
    engine.core().index.for_each(&mut |k| {
        if k.kind == KeyKind::Zeroes {
            n += 1;
        }
    });
    n
}

#[test]
fn the_index_holds_what_the_cache_holds_not_every_block_ever_written() {
    let disk: u64 = 512 << 20;
    let fx = Fixture::new(disk >> 20, 1, 0);
    let engine = fx.open();
    engine.set_gc_percent(0).unwrap();
    let core = engine.core().clone();
    let bound = cache_bound(&engine);
    // Writeback without its pauses, as during a drain: the test is about the index.
    core.draining
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let mut d = Driver::new(&engine);
    // 4 KiB writes to distinct blocks, a quarter more than the whole cache could hold. (In
    // block order: each is still a key of its own, and the image file stays in few extents,
    // which keeps deleting it fast.)
    let writes = bound as u64 * 5 / 4;
    for n in 0..writes {
        let off = n * BLOCK;
        d.write(0, off, &pattern(off, BLOCK as usize, n)).unwrap();
    }
    // Zeroes over blocks of their own that held data; then everything is written back and
    // reclaimed.
    let zeroed = disk - 2000 * BLOCK;
    d.write(0, zeroed, &pattern(zeroed, 2000 * BLOCK as usize, 1))
        .unwrap();
    for i in 0..2000u64 {
        d.write_zeroes(0, disk - (i + 1) * BLOCK, BLOCK).unwrap();
    }
    engine.drain().unwrap();
    core.draining
        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    wait_until(
        "the index to shrink to what the cache holds",
        Duration::from_secs(60),
        || {
            let holds = core.segments.used_count() as usize * core.layout.data_size() as usize
                / BLOCK as usize;
            core.meta.key_tail() == core.meta.dirty_tail()
                && core.index.extent_count() <= holds
                && zeroes_keys(&engine) == 0
        },
    );
    eprintln!(
        "{writes} writes of 4 KiB to distinct blocks, 2000 zeroes: {} keys left in the index, {} segments in use, at most {bound} keys fit the cache",
        core.index.extent_count(),
        core.segments.used_count()
    );
    // Dropping keys never loses data: what is no longer cached reads from the image.
    d.flush(0).unwrap();
    for i in 0..2000u64 {
        let got = d.read(0, disk - (i + 1) * BLOCK, BLOCK as usize).unwrap();
        assert!(got.iter().all(|&b| b == 0), "zeroes {i} read back wrong");
    }
    for n in (0..writes).step_by(997) {
        let got = d.read(0, n * BLOCK, BLOCK as usize).unwrap();
        assert!(
            got == pattern(n * BLOCK, BLOCK as usize, n),
            "block {n} read back wrong"
        );
    }
    drop(d);
    drop(core);
    engine.shutdown().unwrap();
}
