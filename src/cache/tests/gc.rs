// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! GC threshold changes while serving, and GC meeting a corrupt kset.

use std::time::Duration;

use super::{pattern, wait_until, Fixture};
use crate::cache::driver::Driver;
use crate::cache::format;
use crate::cache::gc;
use crate::cache::media::Media;
use crate::engine::Engine;

/// Write `n` patterned 256 KiB extents, drain them to the image, and return the data.
fn write_and_drain(d: &mut Driver, engine: &crate::cache::CacheEngine, n: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let data = pattern(i << 20, 256 << 10, i);
        d.write((i % d.queues() as u64) as usize, i << 20, &data)
            .unwrap();
        out.push(data);
    }
    engine.drain().unwrap();
    out
}

#[test]
fn gc_percent_change_takes_effect_while_serving_and_persists() {
    // Plenty of segments, so only the threshold decides.
    let fx = Fixture::new(32, 1, 8);
    let engine = fx.open();
    assert_eq!(engine.gc_percent(), 70, "the default");
    let mut d = Driver::new(&engine);
    let data = write_and_drain(&mut d, &engine, 8);
    let core = engine.core().clone();
    assert!(core.meta.key_tail().log_seq < core.meta.dirty_tail().log_seq);
    let used = engine.stats().segments_used;
    assert_eq!(used + engine.stats().segments_free, core.segments.count());
    let collected = gc::collect_one(&core);
    assert!(
        matches!(collected, Ok(false)),
        "below the threshold nothing is collected ({used} segments used): {collected:?}"
    );
    assert_eq!(engine.stats().gc_runs, 0);

    assert!(engine.set_gc_percent(91).is_err(), "above the maximum");
    engine.set_gc_percent(0).unwrap();
    wait_until("GC to reach dirty_tail", Duration::from_secs(30), || {
        core.meta.key_tail() == core.meta.dirty_tail()
    });
    assert!(engine.stats().gc_runs > 0);
    // The collected data is read back from the image.
    for (i, want) in data.iter().enumerate() {
        assert!(d.read(0, (i as u64) << 20, want.len()).unwrap() == *want);
    }
    drop(d);
    drop(core);
    engine.shutdown().unwrap();
    let engine = fx.open();
    assert_eq!(
        engine.gc_percent(),
        0,
        "the threshold is stored in the cache"
    );
    engine.shutdown().unwrap();
}

#[test]
fn a_corrupt_kset_stops_gc_without_collecting_half_of_it() {
    let fx = Fixture::new(32, 1, 8);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    let data = write_and_drain(&mut d, &engine, 8);
    let core = engine.core().clone();
    let key_tail = core.meta.key_tail();
    assert!(key_tail.log_seq < core.meta.dirty_tail().log_seq);
    // Flip a byte of the first key of the kset at key_tail.
    let at = core.media_offset(key_tail.pos) + format::KSET_HEADER_SIZE as u64 + 4;
    let mut b = [0u8; 1];
    fx.media.read(at, &mut b).unwrap();
    fx.media.write(at, &[b[0] ^ 0x5a]).unwrap();
    let before = engine.stats();

    engine.set_gc_percent(0).unwrap();
    wait_until(
        "GC to report the corrupt kset",
        Duration::from_secs(30),
        || engine.stats().gc_errors > 0,
    );
    let after = engine.stats();
    assert_eq!(after.gc_errors, 1);
    assert_eq!(after.gc_runs, before.gc_runs, "nothing was collected");
    assert_eq!(core.meta.key_tail(), key_tail, "key_tail did not move");
    assert_eq!(after.segments_used, before.segments_used);
    // The cache keeps serving.
    for (i, want) in data.iter().enumerate() {
        assert!(d.read(0, (i as u64) << 20, want.len()).unwrap() == *want);
    }
    d.write(0, 30 << 20, &pattern(30 << 20, 4096, 99)).unwrap();
    assert_eq!(
        d.read(0, 30 << 20, 4096).unwrap(),
        pattern(30 << 20, 4096, 99)
    );
    drop(d);
    drop(core);
    engine.shutdown().unwrap();
}
