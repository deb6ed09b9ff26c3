// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writeback pacing with the real writeback thread: it waits while the guest is busy and the
//! cache has room, drains when the guest goes idle, and runs at once when room runs short.
//! The guest's idle period is an hour where a test needs writeback to wait, so only a wake-up
//! can make it run: these tests wait for conditions, never for durations.

use std::sync::mpsc;
use std::time::Duration;

use super::{pattern, wait_until, Fixture};
use crate::cache::driver::Driver;
use crate::cache::pacing::{PacingOptions, WritebackState};
use crate::cache::CacheEngine;
use crate::engine::Engine;

const LONG: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn fixture(extra_segments: u32, high: u8, low: u8, idle: Duration) -> Fixture {
    let mut fx = Fixture::new(256, 1, extra_segments);
    fx.opts.pacing = PacingOptions {
        high_watermark: high,
        low_watermark: low,
        idle,
    };
    fx
}

fn state(engine: &CacheEngine) -> WritebackState {
    engine.status().writeback.state
}

/// Run `f` on another thread; fail if it has not returned within [`LONG`] (a writeback that
/// nothing wakes would make it wait an hour).
fn within_a_minute(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(LONG)
        .unwrap_or_else(|_| panic!("{what} did not return within {LONG:?}"));
    t.join().unwrap();
}

#[test]
fn writeback_waits_while_the_guest_is_busy_and_room_is_plenty() {
    let fx = fixture(8, 90, 80, HOUR);
    let engine = std::sync::Arc::new(fx.open());
    let mut d = Driver::new(&*engine);
    for i in 0..8u64 {
        d.write(0, i << 20, &pattern(i << 20, 1 << 20, i)).unwrap();
    }
    d.flush(0).unwrap();
    // Only with a closed kset beyond dirty_tail does writeback report that it waits.
    wait_until("writeback to wait for an idle guest", LONG, || {
        state(&engine) == WritebackState::WaitingForIdleGuest
    });
    d.read(0, 0, 4096).unwrap();
    d.write(0, 9 << 20, &pattern(9 << 20, 4096, 9)).unwrap();
    d.flush(0).unwrap();
    let stats = engine.stats();
    assert_eq!(stats.writeback_bytes, 0, "{stats:?}");
    assert_eq!(stats.dirty_bytes, (8 << 20) + 4096);
    assert_eq!(state(&engine), WritebackState::WaitingForIdleGuest);

    // A drain overrides pacing and wakes the waiting thread.
    let e = engine.clone();
    within_a_minute("drain", move || e.drain().unwrap());
    assert_eq!(engine.stats().dirty_bytes, 0);
    drop(d);
    // Shutdown wakes it too.
    within_a_minute("shutdown", move || engine.shutdown().unwrap());
}

#[test]
fn writeback_drains_when_the_guest_goes_idle() {
    let fx = fixture(8, 90, 80, Duration::from_millis(20));
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    for i in 0..8u64 {
        d.write(0, i << 20, &pattern(i << 20, 1 << 20, i)).unwrap();
    }
    d.flush(0).unwrap();
    // No request from here on, no drain: the guest is idle.
    wait_until("writeback to drain an idle guest's data", LONG, || {
        engine.stats().dirty_bytes == 0
    });
    wait_until("writeback to find nothing left", LONG, || {
        state(&engine) == WritebackState::Clean
    });
    assert_eq!(engine.stats().writeback_bytes, 8 << 20);
    let mut image = vec![0u8; 1 << 20];
    fx.backing.read_at(7 << 20, &mut image).unwrap();
    assert!(image == pattern(7 << 20, 1 << 20, 7));
    drop(d);
    engine.shutdown().unwrap();
}

#[test]
fn writeback_runs_at_once_above_the_high_watermark_down_to_the_low_one() {
    let fx = fixture(8, 20, 10, HOUR);
    let engine = fx.open();
    let capacity =
        engine.status().segments_total as u64 * engine.status().segment_data_bytes as u64;
    let mut d = Driver::new(&engine);
    // The guest stays busy (idle only after an hour) and writes past the high watermark, with
    // a FLUSH after every write so each kset holds one key: writeback can stop at any MiB.
    let mut n = 0u64;
    while engine.stats().dirty_bytes < capacity / 100 * 20 {
        d.write(0, n << 20, &pattern(n << 20, 1 << 20, n)).unwrap();
        d.flush(0).unwrap();
        n += 1;
        assert!(n < 200, "dirty share never reached the high watermark");
    }
    wait_until("writeback to reach the low watermark", LONG, || {
        engine.stats().dirty_bytes < capacity / 100 * 10
    });
    wait_until("writeback to wait for the guest again", LONG, || {
        state(&engine) == WritebackState::WaitingForIdleGuest
    });
    let stats = engine.stats();
    assert!(
        stats.dirty_bytes > 0,
        "below the low watermark writeback stops, it does not drain everything: {stats:?}"
    );
    drop(d);
    engine.shutdown().unwrap();
}

/// Writes that wait for room get writeback running at once, whatever the watermarks and the
/// guest say: with watermarks the cache never reaches and an hour's idle period, only the
/// wake-up from a write finding no room lets this volume through (the driver gives up after
/// waiting 120 s for room).
#[test]
fn a_write_waiting_for_room_runs_writeback_at_once() {
    let fx = fixture(2, 100, 100, HOUR);
    let cache_bytes = fx.media_dyn().len();
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    let mut written = 0u64;
    let mut n = 0u64;
    while written < 3 * cache_bytes {
        let off = (n % 200) << 20;
        d.write(0, off, &pattern(off, 1 << 20, n)).unwrap();
        written += 1 << 20;
        n += 1;
    }
    let stats = engine.stats();
    assert!(stats.busy > 0, "writes waited for room: {stats:?}");
    assert!(stats.writeback_bytes > 0, "{stats:?}");
    drop(d);
    engine.shutdown().unwrap();
}
