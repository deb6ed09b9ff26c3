// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A backing image that fails writes for a while: the data stays dirty and readable, writes
//! go on while the cache has room, and everything reaches the image once it recovers.

use std::time::Duration;

use smallvec::smallvec;

use super::{pattern, wait_until, Fixture};
use crate::cache::driver::Driver;
use crate::engine::{DataSeg, Engine, EngineQueue, Request, RequestKind, Submit};

const DISK: u64 = 32 << 20;

#[test]
fn failing_backing_writes_lose_nothing_and_drain_after_recovery() {
    let fx = Fixture::new(DISK >> 20, 2, 2);
    let engine = fx.open();
    let mut d = Driver::new(&engine);
    let mut model = vec![0u8; DISK as usize];
    let put = |d: &mut Driver, model: &mut [u8], q: usize, off: u64, len: usize, n: u64| {
        let data = pattern(off, len, n);
        d.write(q, off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    };

    // Some data goes back while the image is healthy.
    put(&mut d, &mut model, 0, 0, 256 << 10, 1);
    engine.drain().unwrap();
    let tail_before = engine.core().meta.dirty_tail();

    fx.backing.set_fail_writes(true);
    for n in 0..12u64 {
        put(
            &mut d,
            &mut model,
            (n % 2) as usize,
            (n + 1) << 20,
            192 << 10,
            10 + n,
        );
    }
    d.write_zeroes(1, 64 << 10, 8192).unwrap();
    d.discard(0, 128 << 10, 4096).unwrap();
    d.flush(0).unwrap();
    let dirty = engine.stats().dirty_bytes;
    assert_eq!(dirty, 12 * (192 << 10) + 8192 + 4096);
    wait_until("writeback errors to show", Duration::from_secs(30), || {
        engine.stats().writeback_errors >= 2
    });
    let stats = engine.stats();
    assert_eq!(
        stats.dirty_bytes, dirty,
        "failed writeback kept the data dirty"
    );
    assert_eq!(
        engine.core().meta.dirty_tail(),
        tail_before,
        "dirty_tail stays while writeback fails"
    );

    // Reads come from the cache, and writes still complete while there is room.
    let got = d.read(1, 0, DISK as usize).unwrap();
    model[(64 << 10)..(64 << 10) + 8192].fill(0);
    model[(128 << 10)..(128 << 10) + 4096].fill(0);
    assert!(
        got == model,
        "reads during the failure differ from the model"
    );
    for n in 0..4u64 {
        put(
            &mut d,
            &mut model,
            (n % 2) as usize,
            (20 + n) << 20,
            64 << 10,
            40 + n,
        );
    }
    d.flush(1).unwrap();
    let errors = engine.stats().writeback_errors;
    wait_until(
        "writeback to keep retrying",
        Duration::from_secs(30),
        || engine.stats().writeback_errors > errors,
    );
    assert!(engine.stats().dirty_bytes > dirty);

    fx.backing.set_fail_writes(false);
    engine.drain().unwrap();
    assert_eq!(engine.stats().dirty_bytes, 0);
    drop(d);
    engine.shutdown().unwrap();
    let mut image = vec![0u8; DISK as usize];
    fx.backing.read_at(0, &mut image).unwrap();
    assert!(
        image == model,
        "the image after recovery differs from the model"
    );
}

/// Submit `req` once; `Some(request)` back when the engine had no room, else wait for it.
fn submit_or_busy(q: &mut dyn EngineQueue, req: Request) -> Option<Request> {
    let tag = req.tag;
    match q.submit(req) {
        Submit::Busy(back) => return Some(back),
        Submit::Done(r) => r.unwrap(),
        Submit::Pending => {
            let mut done = Vec::new();
            wait_until("a request to complete", Duration::from_secs(30), || {
                q.reap(&mut done);
                !done.is_empty()
            });
            assert_eq!(done.len(), 1);
            let (t, r) = done.pop().unwrap();
            assert_eq!(t, tag);
            r.unwrap();
        }
    }
    None
}

#[test]
fn a_cache_full_of_unwritable_data_holds_writes_back_until_the_image_recovers() {
    // Five segments for one queue: two of them can hold data before allocation stops.
    let fx = Fixture::new(DISK >> 20, 1, 0);
    let engine = fx.open();
    fx.backing.set_fail_writes(true);
    let mut q = engine.open_queue(0).unwrap();
    let mut model = vec![0u8; DISK as usize];
    let bufs: Vec<Vec<u8>> = (0..DISK >> 20)
        .map(|i| pattern(i << 20, 1 << 20, i))
        .collect();
    let write = |i: u64| Request {
        tag: i,
        kind: RequestKind::Write {
            offset: i << 20,
            bufs: smallvec![DataSeg {
                ptr: bufs[i as usize].as_ptr() as *mut u8,
                len: bufs[i as usize].len(),
            }],
        },
    };
    let mut held = None;
    for i in 0..DISK >> 20 {
        if let Some(back) = submit_or_busy(q.as_mut(), write(i)) {
            held = Some((i, back));
            break;
        }
        model[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&bufs[i as usize]);
    }
    let (i, mut back) = held.expect("the cache fills up while nothing can be written back");
    assert!(engine.stats().busy > 0);
    wait_until("writeback errors to show", Duration::from_secs(30), || {
        engine.stats().writeback_errors > 0
    });
    // Still full: the request is handed back again, not failed.
    back = submit_or_busy(q.as_mut(), back).expect("no room while the image fails");
    // Reads of the full cache still work.
    let mut got = vec![0u8; 1 << 20];
    let read = Request {
        tag: 1 << 40,
        kind: RequestKind::Read {
            offset: 0,
            bufs: smallvec![DataSeg {
                ptr: got.as_mut_ptr(),
                len: got.len(),
            }],
        },
    };
    assert!(
        submit_or_busy(q.as_mut(), read).is_none(),
        "reads never wait for room"
    );
    assert!(got == bufs[0]);

    fx.backing.set_fail_writes(false);
    let mut pending = Some(back);
    wait_until(
        "room after the image recovered",
        Duration::from_secs(60),
        || {
            pending = submit_or_busy(q.as_mut(), pending.take().unwrap());
            pending.is_none()
        },
    );
    model[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&bufs[i as usize]);
    drop(q);
    engine.drain().unwrap();
    engine.shutdown().unwrap();
    let mut image = vec![0u8; DISK as usize];
    fx.backing.read_at(0, &mut image).unwrap();
    assert!(
        image == model,
        "the image after recovery differs from the model"
    );
}
