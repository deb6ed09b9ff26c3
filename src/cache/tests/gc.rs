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

/// A cache whose writes wait for room: writeback's progress wakes GC, which frees the segment
/// that writes wait for, rather than GC finding it at the end of its idle sleep (with a FLUSH
/// after every write, each written-back kset holds one key, so a segment frees only once
/// thousands of them are collected, and GC polling behind writeback delayed every such wait).
#[test]
fn writeback_progress_wakes_gc_while_writes_wait_for_room() {
    use crate::backing::BackingQueue;
    use crate::cache::CacheEngine;
    use crate::engine::{DataSeg, Request, RequestKind, Submit};
    use std::sync::atomic::Ordering;

    let fx = Fixture::new(64, 1, 0);
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let core = engine.core().clone();
    let mut queue = engine.open_queue(0).unwrap();
    let data = pattern(0, 1 << 20, 1);
    let mut n = 0u64;
    loop {
        assert!(n < 64, "64 MiB written without filling the cache");
        let req = Request {
            tag: n,
            kind: RequestKind::Write {
                offset: n << 20,
                bufs: smallvec::smallvec![DataSeg {
                    ptr: data.as_ptr() as *mut u8,
                    len: data.len(),
                }],
            },
        };
        match queue.submit(req) {
            Submit::Busy(_) => break,
            Submit::Done(r) => r.unwrap(),
            Submit::Pending => {
                let mut done = Vec::new();
                while done.is_empty() {
                    queue.reap(&mut done);
                }
                done[0].1.as_ref().unwrap();
            }
        }
        n += 1;
    }
    let free = core.segments.free_count();
    // An idle sleep far longer than the test: only a wake-up lets GC collect after its
    // first look.
    let gc = std::thread::spawn({
        let core = core.clone();
        move || gc::run_with(&core, Duration::from_secs(3600))
    });
    let mut wb = BackingQueue::new(fx.backing.clone(), 16).unwrap();
    assert!(engine.writeback_step(&mut wb).unwrap());
    wait_until(
        "GC to collect the first kset",
        Duration::from_secs(60),
        || engine.stats().gc_runs > 0,
    );
    while engine.writeback_step(&mut wb).unwrap() {}
    wait_until(
        "GC to free a segment for the waiting write",
        Duration::from_secs(60),
        || core.segments.free_count() > free,
    );
    core.stopping.store(true, Ordering::Release);
    core.writeback_progress();
    gc.join().unwrap();
    assert_eq!(engine.stats().gc_errors, 0);
    drop(queue);
    engine.shutdown().unwrap();
}

/// With a FLUSH after every write each kset holds one key, so an allocation per collected
/// kset was one per guest write: GC reuses its buffers and allocates nothing per kset.
#[test]
fn collecting_a_kset_allocates_nothing_once_warm() {
    use crate::backing::BackingQueue;
    use crate::cache::index::tests::memory::allocations;
    use crate::cache::CacheEngine;

    use crate::cache::format::Layout;
    use crate::cache::media::{open_media, MediaOptions, Persistence};
    use crate::cache::replay::min_segments;

    let fx = Fixture::new(64, 1, 0);
    // A mapped file rather than the recording test double, whose bookkeeping of every media
    // write allocates.
    let dir = tempfile::tempdir().unwrap();
    let media = open_media(
        &dir.path().join("cache"),
        &MediaOptions {
            create_size: Some(Layout::media_len_for(min_segments(1))),
            persistence: Some(Persistence::Volatile),
        },
    )
    .unwrap();
    let engine = CacheEngine::open_stepped(&fx.opts, media, fx.backing.clone()).unwrap();
    let core = engine.core().clone();
    let mut d = Driver::new(&engine);
    const WRITES: u64 = 200;
    for i in 0..WRITES {
        let off = (i * 7919 % 16384) * 4096;
        d.write(0, off, &pattern(off, 4096, i)).unwrap();
        core.close_all_ksets().unwrap();
    }
    let mut wb = BackingQueue::new(fx.backing.clone(), 16).unwrap();
    while engine.writeback_step(&mut wb).unwrap() {}
    engine.set_gc_percent(0).unwrap();

    let mut scratch = gc::Scratch::default();
    for _ in 0..10 {
        assert!(gc::collect_one_with(&core, &mut scratch).unwrap());
    }
    let before = allocations();
    let mut collected = 0;
    while gc::collect_one_with(&core, &mut scratch).unwrap() {
        collected += 1;
    }
    let allocated = allocations() - before;
    assert!(
        collected >= WRITES - 10,
        "every one-key kset was collected: {collected}"
    );
    assert_eq!(
        allocated, 0,
        "{allocated} allocations collecting {collected} ksets"
    );
    assert_eq!(core.meta.key_tail(), core.meta.dirty_tail());
    drop(d);
    engine.shutdown().unwrap();
}
