// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a reap does besides completing writes: it reads the "room again" eventfd only after a
//! wake-up wrote it (and leaves it readable for a worker whose request waits for room), and a
//! logged key's segment reference is the pin its space was allocated with.

use smallvec::smallvec;

use super::{pattern, Fixture};
use crate::cache::index::Piece;
use crate::cache::CacheEngine;
use crate::engine::{DataSeg, Engine, EngineQueue, Request, RequestKind, Submit};
use crate::poll::poll_readable;

const DISK: u64 = 32 << 20;

/// The room eventfd is the last of a cache queue's poll fds.
fn room_fd(q: &dyn EngineQueue) -> i32 {
    *q.poll_fds().last().unwrap()
}

fn readable(fd: i32) -> bool {
    poll_readable(&[fd], 0).is_some()
}

#[test]
fn a_reap_reads_the_room_eventfd_once_a_wake_up_wrote_it() {
    let fx = Fixture::new(DISK >> 20, 1, 2);
    let engine = fx.open();
    let mut q = engine.open_queue(0).unwrap();
    let room = room_fd(q.as_ref());
    let mut done = Vec::new();
    q.reap(&mut done);
    assert!(!readable(room), "nothing woke the queue yet");

    engine.core().segments.wake();
    assert!(readable(room), "a wake-up writes every waiter's eventfd");
    q.reap(&mut done);
    assert!(
        !readable(room),
        "the next reap read it: a worker waiting for its fds does not wake again for it"
    );
    engine.core().segments.wake();
    engine.core().segments.wake();
    q.reap(&mut done);
    assert!(!readable(room), "two wake-ups, one read");
    assert!(done.is_empty());
}

#[test]
fn a_request_waiting_for_room_keeps_the_wake_up_for_its_worker() {
    // Five segments for one queue, and an image that fails writes: the cache fills up and
    // stays full.
    let fx = Fixture::new(DISK >> 20, 1, 0);
    let engine = fx.open();
    fx.backing.set_fail_writes(true);
    let mut q = engine.open_queue(0).unwrap();
    let room = room_fd(q.as_ref());
    let data = pattern(0, 1 << 20, 7);
    let write = |i: u64| Request {
        tag: i,
        kind: RequestKind::Write {
            offset: i << 20,
            bufs: smallvec![DataSeg {
                ptr: data.as_ptr() as *mut u8,
                len: data.len(),
            }],
        },
    };
    let mut done = Vec::new();
    let mut busy = false;
    for i in 0..DISK >> 20 {
        match q.submit(write(i)) {
            Submit::Busy(_) => {
                busy = true;
                break;
            }
            Submit::Pending => {}
            Submit::Done(r) => r.unwrap(),
        }
        q.reap(&mut done);
    }
    assert!(busy, "the cache fills up while nothing can be written back");

    // Space is freed between the request going Busy and the reap that ends its batch.
    engine.core().segments.wake();
    q.reap(&mut done);
    assert!(
        readable(room),
        "the wake-up is left for the worker, which comes back at once to retry"
    );
    q.reap(&mut done);
    assert!(!readable(room), "the reap of that retry reads it");
}

#[test]
fn a_logged_write_holds_its_segment_by_the_pin_of_its_space() {
    let fx = Fixture::new(DISK >> 20, 1, 2);
    // No writeback or GC thread to change the counts under the test.
    let engine = CacheEngine::open_stepped(&fx.opts, fx.media_dyn(), fx.backing.clone()).unwrap();
    let mut q = engine.open_queue(0).unwrap();
    let data = pattern(0, 4096, 3);
    let mut done = Vec::new();
    let block = |tag: u64, offset: u64| Request {
        tag,
        kind: RequestKind::Write {
            offset,
            bufs: smallvec![DataSeg {
                ptr: data.as_ptr() as *mut u8,
                len: data.len(),
            }],
        },
    };
    // Three blocks in one batch, one more after it.
    for tag in 0..3 {
        assert!(matches!(q.submit(block(tag, tag << 12)), Submit::Pending));
    }
    q.reap(&mut done);
    assert!(matches!(q.submit(block(3, 3 << 12)), Submit::Pending));
    q.reap(&mut done);
    let core = engine.core();
    let mut pieces = Vec::new();
    core.index
        .lookup(0, 4096, false, &|s| core.segments.gen(s), &mut pieces);
    let seg = match pieces[..] {
        [Piece::Hit { key, .. }] => key.pos.seg,
        _ => panic!("block 0 is cached: {pieces:?}"),
    };
    assert_eq!(
        core.segments.refs(seg),
        1 + 4,
        "the data head's reference and one per logged key: no pin left over, none missing"
    );
    assert_eq!(
        engine.stats().dirty_bytes,
        4 * 4096,
        "each batch counts its writes dirty once"
    );
    // An overwrite adds a logged key; the one it replaced stays in the log until collected.
    assert!(matches!(q.submit(block(4, 0)), Submit::Pending));
    q.reap(&mut done);
    assert_eq!(core.segments.refs(seg), 1 + 5);
    assert_eq!(done.len(), 5);
    assert!(done.iter().all(|(_, r)| r.is_ok()));
}
