// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Msync mode's group commit: a write completes without a sync, a FLUSH costs a constant
//! number of syncs whatever the number of writes before it, and with the write cache off each
//! write is durable when it completes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{pattern, wait_until, Fixture};
use crate::cache::driver::Driver;
use crate::cache::format::Layout;
use crate::cache::media::RecordingMedia;
use crate::cache::queue::data_head_positions;
use crate::cache::replay::min_segments;
use crate::cache::CacheEngine;
use crate::engine::Engine;

/// A fixture whose media follows the msync (page cache) model, opened stepped: no kset timer
/// or background thread adds syncs of its own.
fn msync_fixture(queues: usize) -> (Fixture, CacheEngine) {
    let mut fx = Fixture::new(64, queues, 2);
    let len = Layout::media_len_for(min_segments(queues) + 2);
    fx.media = Arc::new(RecordingMedia::new_msync(len).unwrap());
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    (fx, engine)
}

/// Offsets of `n` 4 KiB writes spread over several 4 MiB regions (so over every kset).
fn offsets(n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(|i| (i % 7) * (4 << 20) + (i / 7) * 8192)
}

/// Reopen the cache on what the media durably holds and return the engine.
fn reopen_durable(fx: &Fixture) -> CacheEngine {
    let media = Arc::new(RecordingMedia::from_image(fx.media.durable_image()).unwrap());
    CacheEngine::open_stepped(&fx.opts, media, fx.backing.clone()).unwrap()
}

#[test]
fn msync_writes_complete_without_a_sync_and_a_flush_syncs_a_constant_number_of_times() {
    let (fx, engine) = msync_fixture(2);
    let mut d = Driver::new(&engine);
    for writes in [10u64, 120] {
        let before = fx.media.fences();
        for (i, off) in offsets(writes).enumerate() {
            d.write(i % 2, off, &pattern(off, 4096, writes)).unwrap();
        }
        assert_eq!(
            fx.media.fences(),
            before,
            "{writes} writes completed, none may wait for a sync"
        );
        d.flush(0).unwrap();
        let syncs = fx.media.fences() - before;
        // One sync for the data, one per kset of at most 128 keys (one here), and a LAST kset
        // when the log moves to a new segment.
        assert!(
            (2..=3).contains(&syncs),
            "a FLUSH after {writes} writes cost {syncs} syncs"
        );
    }
    drop(d);
    engine.shutdown_for_crash_test();
    let reopened = reopen_durable(&fx);
    let mut d = Driver::new(&reopened);
    for off in offsets(120) {
        assert_eq!(d.read(0, off, 4096).unwrap(), pattern(off, 4096, 120));
    }
}

#[test]
fn msync_flushed_data_survives_every_page_crash_image() {
    let (fx, engine) = msync_fixture(2);
    let mut d = Driver::new(&engine);
    for off in offsets(40) {
        d.write(0, off, &pattern(off, 4096, 1)).unwrap();
    }
    d.flush(1).unwrap();
    // Written after the flush: may or may not survive, but never damages the flushed data.
    for off in offsets(40) {
        d.write(1, off + 4096, &pattern(off + 4096, 4096, 2))
            .unwrap();
    }
    drop(d);
    engine.shutdown_for_crash_test();
    for seed in 0..8 {
        let media = Arc::new(RecordingMedia::from_image(fx.media.crash_image(seed)).unwrap());
        let reopened = CacheEngine::open_stepped(&fx.opts, media, fx.backing.clone()).unwrap();
        let mut d = Driver::new(&reopened);
        for off in offsets(40) {
            assert_eq!(d.read(0, off, 4096).unwrap(), pattern(off, 4096, 1));
            let later = d.read(0, off + 4096, 4096).unwrap();
            assert!(later == pattern(off + 4096, 4096, 2) || later.iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn msync_write_cache_off_makes_each_write_durable_on_completion() {
    let (fx, engine) = msync_fixture(1);
    engine.set_write_cache(false);
    let mut d = Driver::new(&engine);
    d.write(0, 1 << 20, &pattern(1 << 20, 8192, 5)).unwrap();
    drop(d);
    engine.shutdown_for_crash_test();
    let reopened = reopen_durable(&fx);
    let mut d = Driver::new(&reopened);
    assert_eq!(d.read(0, 1 << 20, 8192).unwrap(), pattern(1 << 20, 8192, 5));
}

/// A key goes to the kset of its region, not of its queue: with a queue of a multi-queue
/// device never started (a guest using fewer queues than offered), the writer must still not
/// close full ksets itself, so no write waits for a sync. The ksets a committer closes never
/// name data a crash could lose: every crash image reads each block as the flushed version or
/// the new one, never as the stale bytes of a cache page that was not synced.
#[test]
fn msync_full_ksets_of_a_queue_never_started_are_closed_by_a_committer() {
    let mut fx = Fixture::new(64, 2, 6);
    let len = Layout::media_len_for(min_segments(2) + 6);
    fx.media = Arc::new(RecordingMedia::new_msync(len).unwrap());
    let engine =
        CacheEngine::open_with_media(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut d = Driver::with_queues(&engine, 1);
    // Only odd 4 MiB regions: every key goes to kset 1, whose queue is never started. 16 KiB
    // writes, 6 MiB in all: the data head leaves folios behind, whose keys a committer
    // writes (it leaves those in the head's folio for later).
    const BS: usize = 16 << 10;
    let offs: Vec<u64> = (0..3 * 128u64)
        .map(|i| (2 * (i % 7) + 1) * (4 << 20) + (i / 7) * BS as u64)
        .collect();
    for &off in &offs {
        d.write(0, off, &pattern(off, BS, 1)).unwrap();
    }
    d.flush(0).unwrap();
    let flushed = fx.media.fences();

    let writer = std::thread::current().id();
    let writer_events = Arc::new(AtomicU64::new(0));
    let counted = writer_events.clone();
    fx.media.set_event_hook(Some(Box::new(move |_, _| {
        if std::thread::current().id() == writer {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    })));
    for &off in &offs {
        d.write(0, off, &pattern(off, BS, 2)).unwrap();
    }
    assert_eq!(
        writer_events.load(Ordering::SeqCst),
        0,
        "the writing thread touched the media itself (closed a kset)"
    );
    // The committers close them without a FLUSH: a data sync, then the ksets.
    wait_until(
        "a committer closing kset 1",
        Duration::from_secs(30),
        || fx.media.fences() >= flushed + 2,
    );
    fx.media.set_event_hook(None);
    for seed in 0..6 {
        let media = Arc::new(RecordingMedia::from_image(fx.media.crash_image(seed)).unwrap());
        let reopened = CacheEngine::open_stepped(&fx.opts, media, fx.backing.clone()).unwrap();
        let mut c = Driver::new(&reopened);
        for &off in &offs {
            let got = c.read(0, off, BS).unwrap();
            assert!(
                got == pattern(off, BS, 1) || got == pattern(off, BS, 2),
                "crash image {seed}: block {off:#x} is neither the flushed nor the new data"
            );
        }
    }
    d.flush(0).unwrap();
    drop(d);
    engine.shutdown_for_crash_test();
    let reopened = reopen_durable(&fx);
    let mut d = Driver::new(&reopened);
    for &off in &offs {
        assert_eq!(d.read(0, off, BS).unwrap(), pattern(off, BS, 2));
    }
}

/// The committers learn where the data heads write next from every queue's head.
#[test]
fn committers_see_the_data_head_of_every_queue_that_wrote() {
    let (_fx, engine) = msync_fixture(2);
    let mut d = Driver::new(&engine);
    let mut heads = Vec::new();
    data_head_positions(engine.core(), &mut heads);
    assert!(heads.is_empty(), "no queue wrote yet: {heads:?}");
    d.write(0, 0, &pattern(0, 4096, 1)).unwrap();
    d.write(1, 1 << 20, &pattern(1 << 20, 8192, 1)).unwrap();
    data_head_positions(engine.core(), &mut heads);
    let mut offs: Vec<u32> = heads.iter().map(|h| h.off).collect();
    offs.sort_unstable();
    assert_eq!(offs, [4096, 8192], "{heads:?}");
    assert_ne!(
        heads[0].seg, heads[1].seg,
        "each queue has a segment of its own"
    );
}
