// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest's write-cache switch: turning it off makes every earlier completed write durable
//! before the switch is done, even when the log has no room at that moment.

use crate::cache::driver::Driver;
use crate::cache::log::LogError;
use crate::cache::segments::SegmentKind;
use crate::cache::CacheEngine;
use crate::engine::Engine;

use super::{pattern, Fixture};

#[test]
fn write_cache_off_waits_for_log_room_before_it_is_done() {
    let mut fx = Fixture::new(16, 1, 0);
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let core = engine.core().clone();
    let mut d = Driver::new(&engine);
    let data = pattern(1 << 20, 4096, 1);
    d.write(0, 1 << 20, &data).unwrap();
    d.flush(0).unwrap();

    // Take every free segment, then fill the log segment with zeroes keys until a close finds
    // no room for the next one.
    let mut taken = Vec::new();
    while let Some(seg) = core.segments.alloc(SegmentKind::Data, 0) {
        taken.push(seg);
    }
    let mut rounds = 0;
    loop {
        for _ in 0..128 {
            d.write_zeroes(0, 0, 512).unwrap();
        }
        match core.close_all_ksets() {
            Ok(()) => {}
            Err(LogError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        rounds += 1;
        assert!(rounds < 10_000, "the log segment never filled");
    }
    // A write completes while the write cache is on: its key waits in an open kset.
    d.write_zeroes(0, 1 << 20, 4096).unwrap();

    std::thread::scope(|s| {
        let switch = s.spawn(|| engine.set_write_cache(false));
        // Room comes back a little later, as writeback and GC would give it.
        std::thread::sleep(std::time::Duration::from_millis(100));
        for seg in taken {
            core.segments.put(seg, &core.meta).unwrap();
        }
        switch.join().unwrap();
    });
    assert!(!engine.write_cache());
    drop(d);
    drop(core);

    // What the media durably holds once the switch returned: the zeroing is there.
    let engine = fx.crash_and_open(None);
    let mut d = Driver::new(&engine);
    assert!(
        d.read(0, 1 << 20, 4096).unwrap().iter().all(|&b| b == 0),
        "a write completed before the write cache was turned off is not durable"
    );
    drop(d);
    engine.shutdown().unwrap();
}
