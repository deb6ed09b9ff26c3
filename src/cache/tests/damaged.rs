// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Damaged cached data and metadata meeting writeback while the device serves: losses are
//! reported and accounted, and writeback goes on (or raises an alarm), never stalling the
//! device on one bad extent.

use crate::backing::BackingQueue;
use crate::cache::driver::Driver;
use crate::cache::format;
use crate::cache::index::Piece;
use crate::cache::media::Media;
use crate::cache::{CacheEngine, CachePos};
use crate::engine::{Engine, IoError};

use super::{pattern, Fixture};

/// Cache position of the data serving backing byte `off`.
fn cached_at(engine: &CacheEngine, off: u64) -> CachePos {
    let core = engine.core();
    let mut pieces = Vec::new();
    core.index
        .lookup(off, 512, false, &|s| core.segments.gen(s), &mut pieces);
    match pieces.first() {
        Some(Piece::Hit { key, .. }) => key.pos,
        other => panic!("byte {off} is not cached: {other:?}"),
    }
}

fn damage(fx: &Fixture, engine: &CacheEngine, pos: CachePos) {
    let at = engine.core().media_offset(pos);
    fx.media.write(at + 100, &[0x5a; 16]).unwrap();
}

#[test]
fn a_damaged_dirty_extent_is_reported_and_writeback_goes_on() {
    let mut fx = Fixture::new(16, 1, 0);
    fx.opts.data_crc = Some(true);
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut wb = BackingQueue::new(fx.backing.clone(), 16).unwrap();
    let mut d = Driver::new(&engine);
    let (lost, good, replaced) = (0u64, 1 << 20, 2 << 20);
    d.write(0, lost, &pattern(lost, 8192, 1)).unwrap();
    d.write(0, good, &pattern(good, 8192, 2)).unwrap();
    d.write(0, replaced, &pattern(replaced, 8192, 3)).unwrap();
    damage(&fx, &engine, cached_at(&engine, lost));
    damage(&fx, &engine, cached_at(&engine, replaced));
    // A later write replaces the damaged extent at `replaced` whole.
    let newer = pattern(replaced, 8192, 4);
    d.write(0, replaced, &newer).unwrap();
    d.flush(0).unwrap();

    let tail = engine.core().meta.dirty_tail();
    let moved = engine.writeback_step(&mut wb);
    assert!(
        matches!(moved, Ok(true)),
        "writeback goes on past a damaged extent: {moved:?}"
    );
    assert!(engine.core().meta.dirty_tail().log_seq > tail.log_seq);
    let health = engine.status().health;
    assert_eq!(
        health.lost_extents, 1,
        "only the live damaged extent is a loss"
    );
    assert_eq!(health.lost_bytes, 8192);
    assert_eq!(engine.stats().dirty_bytes, 0);

    let mut image = vec![0u8; 8192];
    fx.backing.read_at(good, &mut image).unwrap();
    assert!(
        image == pattern(good, 8192, 2),
        "intact data is written back"
    );
    fx.backing.read_at(replaced, &mut image).unwrap();
    assert!(image == newer, "the newer version is written back");
    fx.backing.read_at(lost, &mut image).unwrap();
    assert!(
        image.iter().all(|&b| b == 0),
        "damaged data never reaches the image"
    );
    // While the damaged extent stays cached it reads as an I/O error, never as wrong data.
    assert!(matches!(
        d.read(0, lost, 4096),
        Err(IoError::DataCrc { .. })
    ));
    drop(d);
    engine.shutdown().unwrap();
}

#[test]
fn an_undecodable_kset_at_dirty_tail_raises_an_alarm() {
    let fx = Fixture::new(16, 1, 0);
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut wb = BackingQueue::new(fx.backing.clone(), 16).unwrap();
    let mut d = Driver::new(&engine);
    d.write(0, 0, &pattern(0, 4096, 1)).unwrap();
    d.flush(0).unwrap();
    let core = engine.core().clone();
    let tail = core.meta.dirty_tail();
    let at = core.media_offset(tail.pos) + format::KSET_HEADER_SIZE as u64 + 4;
    fx.media.write(at, &[0xff; 4]).unwrap();
    assert!(engine.writeback_step(&mut wb).is_err());
    let stalled = engine.status().health.writeback_stalled;
    assert!(
        stalled.as_deref().is_some_and(|s| s.contains("dirty_tail")),
        "{stalled:?}"
    );
    // The device keeps serving.
    assert_eq!(d.read(0, 0, 4096).unwrap(), pattern(0, 4096, 1));
    drop(d);
    drop(core);
    engine.shutdown().unwrap();
}
