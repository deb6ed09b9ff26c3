// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Races between a request and the background threads, replayed step by step on a stepped
//! engine so each interleaving is exact.

use crate::backing::BackingQueue;
use crate::cache::core::Core;
use crate::cache::driver::Driver;
use crate::cache::index::Piece;
use crate::cache::queue::CacheQueue;
use crate::cache::CacheEngine;
use crate::engine::{DataSeg, Engine};

use super::{pattern, Fixture};

/// Write back and collect everything GC may collect now.
fn write_back_and_collect(engine: &CacheEngine, wb: &mut BackingQueue) {
    engine.core().close_all_ksets().unwrap();
    while engine.writeback_step(wb).unwrap() {}
    while engine.gc_step().unwrap() {}
}

/// Write 1 MiB pieces elsewhere on the disk, writing back and collecting whenever the cache
/// runs short, until `done` holds.
fn churn(
    engine: &CacheEngine,
    d: &mut Driver,
    wb: &mut BackingQueue,
    done: impl Fn(&Core) -> bool,
) {
    let core = engine.core().clone();
    let mut n = 0u64;
    while !done(&core) {
        assert!(
            n < 1000,
            "churned 1 GiB through the cache without reaching the state"
        );
        if core.segments.free_count() <= 3 {
            write_back_and_collect(engine, wb);
        }
        let off = (4 << 20) + ((n % 56) << 20);
        d.write(0, off, &pattern(off, 1 << 20, n)).unwrap();
        n += 1;
    }
}

#[test]
fn a_hit_racing_segment_reuse_looks_again_instead_of_failing_its_crc() {
    let mut fx = Fixture::new(64, 1, 0);
    fx.opts.data_crc = Some(true);
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let core = engine.core().clone();
    let mut wb = BackingQueue::new(fx.backing.clone(), 16).unwrap();
    let mut d = Driver::new(&engine);
    let first = pattern(0, 64 << 10, 1);
    d.write(0, 0, &first).unwrap();

    // A reader looks the range up and is preempted before copying...
    let mut pieces = Vec::new();
    core.index
        .lookup(8192, 4096, false, &|s| core.segments.gen(s), &mut pieces);
    let Some(Piece::Hit { key, .. }) = pieces.first() else {
        panic!("a hit expected, got {pieces:?}")
    };
    let key = *key;
    // ...while writeback and GC reclaim the segment and new writes fill it again.
    churn(&engine, &mut d, &mut wb, |c| {
        c.segments.gen(key.pos.seg) > key.gen && c.crc_of(key.crc.pos, key.crc.len) != key.crc.crc
    });

    let q = CacheQueue::new(core.clone(), 0).unwrap();
    let mut buf = vec![0u8; 4096];
    let bufs = [DataSeg {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let copied = q.copy_cached(8192, &bufs, &pieces);
    assert!(
        matches!(copied, Ok(false)),
        "a reused segment means look again, not corruption: {copied:?}"
    );
    assert_eq!(engine.stats().crc_errors, 0);
    drop(q);
    // Looking again finds the data where it is now: on the backing image.
    assert_eq!(d.read(0, 8192, 4096).unwrap(), first[8192..12288]);
    assert_eq!(engine.stats().crc_errors, 0);
    drop(d);
    engine.shutdown().unwrap();
}
