// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writeback, GC and a cache that fills up, driven far past the cache's size.

use super::{pattern, Fixture};
use crate::cache::driver::Driver;
use crate::engine::Engine;

/// A deterministic stream of (queue, offset, length) writes, 4 KiB-aligned, up to 1 MiB.
fn writes(seed: u64, disk: u64, total: u64, queues: usize) -> Vec<(usize, u64, usize)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    let mut sum = 0;
    while sum < total {
        let len = ((next() % 256) + 1) * 4096;
        let off = (next() % ((disk - len) / 4096)) * 4096;
        out.push(((next() % queues as u64) as usize, off, len as usize));
        sum += len;
    }
    out
}

#[test]
fn three_times_the_cache_size_reads_back_and_drains_to_the_image() {
    let fx = Fixture::new(256, 2, 0);
    let cache_bytes = fx.media_dyn().len();
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    let disk = 256u64 << 20;
    let mut model = vec![0u8; disk as usize];
    for (n, (q, off, len)) in writes(42, disk, 3 * cache_bytes, 2).into_iter().enumerate() {
        let data = pattern(off, len, n as u64);
        d.write(q, off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let stats = engine.stats();
    // Whether a write ever had to wait for room depends on how fast writeback runs here;
    // that the cache wrapped does not: three times its size went through it.
    eprintln!("writes waited for room {} times", stats.busy);
    assert!(stats.gc_runs > 0, "GC reclaimed space: {stats:?}");
    for start in (0..disk).step_by(8 << 20) {
        let got = d.read((start >> 23) as usize % 2, start, 8 << 20).unwrap();
        assert!(
            got == model[start as usize..(start + (8 << 20)) as usize],
            "read back of 8 MiB at {start} differs"
        );
    }
    engine.drain().unwrap();
    assert_eq!(engine.stats().dirty_bytes, 0);
    drop(d);
    engine.shutdown().unwrap();
    let mut image = vec![0u8; disk as usize];
    fx.backing.read_at(0, &mut image).unwrap();
    assert!(
        image == model,
        "the backing image alone differs from the model"
    );
}
