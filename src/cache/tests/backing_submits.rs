// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The cache engine's backing queues defer submission: the read misses of a batch and the
//! writes of a writeback batch enter the kernel together. Nothing may wait on an entry that never
//! entered: each test here hangs (caught by its bound) or fails if one is left behind.

use std::time::Duration;

use super::{pattern, wait_until, Fixture};
use crate::backing::BackingQueue;
use crate::cache::driver::Driver;
use crate::cache::queue::CacheQueue;
use crate::cache::CacheEngine;
use crate::engine::{DataSeg, Engine, EngineQueue, Request, RequestKind, Submit};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn read_misses_of_a_batch_enter_the_kernel_together_at_reap_and_complete() {
    let fx = Fixture::new(16, 1, 0);
    let offs = [0u64, 1 << 20, 5 << 20];
    for (n, &off) in offs.iter().enumerate() {
        fx.backing
            .write_at(off, &pattern(off, 8192, n as u64))
            .unwrap();
    }
    // Declared before the queue, so they outlive it even when a check fails: the queue's drop
    // waits for the reads into them.
    let mut bufs: Vec<Vec<u8>> = offs.iter().map(|_| vec![0xA5; 8192]).collect();
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut q = CacheQueue::new(engine.core().clone(), 0).unwrap();
    for (tag, (buf, &offset)) in bufs.iter_mut().zip(&offs).enumerate() {
        let seg = DataSeg {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        let req = Request {
            tag: tag as u64,
            kind: RequestKind::Read {
                offset,
                bufs: smallvec::smallvec![seg],
            },
        };
        assert!(
            matches!(q.submit(req), Submit::Pending),
            "read {tag} missed"
        );
    }
    assert_eq!(
        q.backing.unsubmitted(),
        3,
        "the miss reads entered the kernel one by one"
    );
    let before = q.backing.submissions();
    let mut done = Vec::new();
    q.reap(&mut done);
    assert_eq!(
        q.backing.unsubmitted(),
        0,
        "the reap that ends the batch left miss reads outside the kernel"
    );
    assert_eq!(q.backing.submissions() - before, 1);
    wait_until("the read misses to complete", LIMIT, || {
        q.reap(&mut done);
        done.len() == offs.len()
    });
    assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
    for (n, (buf, &off)) in bufs.iter().zip(&offs).enumerate() {
        assert!(
            *buf == pattern(off, 8192, n as u64),
            "read at {off} differs from the image"
        );
    }
    assert_eq!(engine.stats().read_misses, 3);
    drop(q);
    engine.shutdown().unwrap();
}

/// Write `keys` 4 KiB blocks, a block apart, flush, and write everything back through a
/// queue of `depth`; returns the writeback steps that moved dirty_tail and the queue.
fn write_back_blocks(fx: &Fixture, keys: u64, depth: u32) -> (usize, BackingQueue) {
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut d = Driver::new(&engine);
    for n in 0..keys {
        let off = n * 8192;
        d.write(0, off, &pattern(off, 4096, n)).unwrap();
    }
    d.flush(0).unwrap();
    let mut wb = BackingQueue::new(fx.backing.clone(), depth).unwrap();
    let mut steps = 0;
    while engine.writeback_step(&mut wb).unwrap() {
        steps += 1;
        assert!(steps <= keys as usize, "writeback does not end");
    }
    assert_eq!(engine.stats().dirty_bytes, 0, "everything was written back");
    let mut block = vec![0u8; 4096];
    for n in 0..keys {
        let off = n * 8192;
        fx.backing.read_at(off, &mut block).unwrap();
        assert!(
            block == pattern(off, 4096, n),
            "block {n} did not reach the image"
        );
    }
    drop(d);
    engine.shutdown().unwrap();
    (steps, wb)
}

#[test]
fn writeback_gives_the_writes_of_a_kset_to_the_kernel_in_one_call() {
    let fx = Fixture::new(16, 1, 0);
    let (steps, wb) = write_back_blocks(&fx, 40, 64);
    assert!(steps >= 1);
    // Per kset: its writes in one call, then the flush in another (one per key before).
    assert_eq!(wb.submissions(), 2 * steps);
}

#[test]
fn writeback_of_a_kset_larger_than_its_ring_completes() {
    let fx = Fixture::new(16, 1, 0);
    // 128 keys (a full kset) through a ring of 16: most writes enter as earlier ones finish.
    let (steps, wb) = write_back_blocks(&fx, 128, 16);
    assert!(steps >= 1);
    assert!(
        wb.submissions() < 128,
        "{} calls for 128 writes",
        wb.submissions()
    );
}

/// With a FLUSH after every write each kset holds one key; writeback takes them in batches:
/// the writes of many ksets in one call, one backing flush for all of them, and dirty_tail
/// moved past the whole batch at once. The image holds every block, newest version last.
#[test]
fn writeback_writes_a_batch_of_ksets_back_with_one_flush() {
    let fx = Fixture::new(16, 1, 0);
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut d = Driver::new(&engine);
    let blocks = 100u64;
    for n in 0..blocks {
        let off = n * 8192;
        d.write(0, off, &pattern(off, 4096, n)).unwrap();
        d.flush(0).unwrap();
    }
    // Block 0 again, in a later kset of the same batch: its newer version must win.
    d.write(0, 0, &pattern(0, 4096, 1000)).unwrap();
    d.flush(0).unwrap();
    let tail = engine.core().meta.dirty_tail();
    // A ring that holds the whole batch, so its writes enter in one call.
    let mut wb = BackingQueue::new(fx.backing.clone(), 256).unwrap();
    assert!(engine.writeback_step(&mut wb).unwrap());
    let moved = engine.core().meta.dirty_tail().log_seq - tail.log_seq;
    assert!(moved > blocks, "one step passed {moved} ksets");
    assert_eq!(wb.submissions(), 2, "the batch's writes, then its flush");
    assert!(!engine.writeback_step(&mut wb).unwrap(), "nothing is left");
    assert_eq!(engine.stats().dirty_bytes, 0);
    let mut block = vec![0u8; 4096];
    fx.backing.read_at(0, &mut block).unwrap();
    assert!(block == pattern(0, 4096, 1000), "block 0's newer version");
    for n in 1..blocks {
        let off = n * 8192;
        fx.backing.read_at(off, &mut block).unwrap();
        assert!(block == pattern(off, 4096, n), "block {n}");
    }
    drop(d);
    engine.shutdown().unwrap();
}
