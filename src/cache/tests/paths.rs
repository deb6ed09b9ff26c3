// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request paths and replay, case by case.

use super::{pattern, Fixture};
use crate::cache::driver::Driver;
use crate::cache::{CacheEngine, CacheError};
use crate::engine::{Engine, IoError};

#[test]
fn write_then_read_back_across_regions_and_queues() {
    let fx = Fixture::new(64, 2, 0);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    // Straddles the 4 MiB region boundary.
    let off = (4 << 20) - 8192;
    let data = pattern(off, 64 << 10, 1);
    d.write(0, off, &data).unwrap();
    assert_eq!(d.read(1, off, data.len()).unwrap(), data);
    assert_eq!(d.read(0, off + 4096, 512).unwrap(), data[4096..4608]);
    engine.shutdown().unwrap();
}

#[test]
fn read_miss_comes_from_backing_and_then_hits() {
    let fx = Fixture::new(16, 1, 0);
    let data = pattern(1 << 20, 8192, 7);
    fx.backing.write_at(1 << 20, &data).unwrap();
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    assert_eq!(d.read(0, 1 << 20, 8192).unwrap(), data);
    assert_eq!(engine.stats().read_misses, 1);
    // The fill is logged by the fill thread; wait (bounded) for the range to become a hit.
    for _ in 0..500 {
        assert_eq!(d.read(0, 1 << 20, 8192).unwrap(), data);
        if engine.stats().read_hits > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(engine.stats().read_hits, 1, "the miss filled the cache");
    // A partial hit: cached middle, uncached edges.
    let wide = d.read(0, (1 << 20) - 4096, 16384).unwrap();
    assert_eq!(&wide[4096..12288], &data[..]);
    assert!(wide[..4096].iter().all(|&b| b == 0));
    engine.shutdown().unwrap();
}

#[test]
fn newest_write_wins_over_every_overlap() {
    let fx = Fixture::new(16, 2, 0);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    let base = pattern(0, 64 << 10, 1);
    d.write(0, 0, &base).unwrap();
    let mid = pattern(8192, 4096, 2);
    d.write(1, 8192, &mid).unwrap();
    let head = pattern(0, 1024, 3);
    d.write(0, 0, &head).unwrap();
    let mut want = base.clone();
    want[8192..12288].copy_from_slice(&mid);
    want[..1024].copy_from_slice(&head);
    assert_eq!(d.read(1, 0, want.len()).unwrap(), want);
    engine.shutdown().unwrap();
}

#[test]
fn zeroes_and_discard_read_as_zeroes() {
    let fx = Fixture::new(16, 1, 0);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    d.write(0, 0, &pattern(0, 32768, 1)).unwrap();
    d.write_zeroes(0, 4096, 4096).unwrap();
    d.discard(0, 16384, 8192).unwrap();
    let got = d.read(0, 0, 32768).unwrap();
    assert!(got[4096..8192].iter().all(|&b| b == 0));
    assert!(got[16384..24576].iter().all(|&b| b == 0));
    assert_eq!(got[..4096], pattern(0, 32768, 1)[..4096]);
    engine.shutdown().unwrap();
}

#[test]
fn flushed_writes_survive_a_crash_and_replay() {
    let mut fx = Fixture::new(16, 2, 0);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    let a = pattern(0, 65536, 1);
    d.write(0, 0, &a).unwrap();
    let b = pattern(5 << 20, 4096, 2);
    d.write(1, 5 << 20, &b).unwrap();
    d.write_zeroes(1, 8192, 4096).unwrap();
    d.flush(0).unwrap();
    // No shutdown: the process "dies" here.
    drop(d);
    engine.shutdown_for_crash_test();
    let engine = fx.crash_and_open(None);
    let mut d = Driver::new(&engine);
    let mut want = a.clone();
    want[8192..12288].fill(0);
    assert_eq!(d.read(0, 0, 65536).unwrap(), want);
    assert_eq!(d.read(1, 5 << 20, 4096).unwrap(), b);
    engine.shutdown().unwrap();
}

#[test]
fn write_cache_off_makes_each_write_durable() {
    let mut fx = Fixture::new(16, 1, 0);
    let engine = fx.open();
    engine.set_write_cache(false);
    let mut d = Driver::new(&engine);
    let a = pattern(4096, 4096, 9);
    d.write(0, 4096, &a).unwrap();
    drop(d);
    engine.shutdown_for_crash_test();
    let engine = fx.crash_and_open(None);
    let mut d = Driver::new(&engine);
    assert_eq!(d.read(0, 4096, 4096).unwrap(), a);
    engine.shutdown().unwrap();
}

#[test]
fn a_cache_refuses_another_backing_image() {
    let fx = Fixture::new(16, 1, 0);
    fx.open().shutdown().unwrap();
    let other = Fixture::new(32, 1, 0);
    let err = match CacheEngine::open_with_media(&fx.opts, fx.media_dyn(), other.backing.clone()) {
        Ok(_) => panic!("opened a cache against another image"),
        Err(e) => e,
    };
    assert!(matches!(err, CacheError::Format { .. }), "{err}");
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    assert!(
        cause
            .as_deref()
            .unwrap_or("")
            .contains("another backing image"),
        "{err}: {cause:?}"
    );
}

#[test]
fn data_crc_mismatch_is_an_io_error_not_data() {
    let mut fx = Fixture::new(16, 1, 0);
    fx.opts.data_crc = Some(true);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    d.write(0, 0, &pattern(0, 4096, 1)).unwrap();
    // Flip a byte of the cached data behind the engine's back.
    let core = engine.core();
    let pos = {
        let mut found = None;
        core.index.for_each(&mut |k| found = Some(k.pos));
        found.unwrap()
    };
    let at = core.media_offset(pos) + 100;
    let mut b = [0u8; 1];
    core.media.read(at, &mut b).unwrap();
    core.media.write(at, &[b[0] ^ 0x40]).unwrap();
    match d.read(0, 0, 4096) {
        Err(IoError::DataCrc { .. }) => {}
        other => panic!("expected a CRC error, got {other:?}"),
    }
    assert_eq!(engine.stats().crc_errors, 1);
    engine.shutdown().unwrap();
}

#[test]
fn out_of_range_and_read_only_are_refused() {
    let fx = Fixture::new(16, 1, 0);
    fx.open().shutdown().unwrap();
    let ro = crate::backing::BackingImage::open(
        fx.backing.path(),
        &crate::backing::BackingOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let engine = CacheEngine::open_with_media(&fx.opts, fx.media_dyn(), ro).unwrap();
    let mut d = Driver::new(&engine);
    assert!(matches!(d.write(0, 0, &[0u8; 512]), Err(IoError::ReadOnly)));
    assert!(matches!(d.discard(0, 0, 512), Err(IoError::ReadOnly)));
    engine.shutdown().unwrap();
}
