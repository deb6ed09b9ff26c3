// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writes larger than the space the cache can ever free complete, piece by piece.

use std::time::{Duration, Instant};

use smallvec::smallvec;

use super::{pattern, Fixture};
use crate::cache::driver::Driver;
use crate::engine::{DataSeg, Engine, Request, RequestKind, Submit};

#[test]
fn a_write_larger_than_the_cache_completes() {
    // Five segments: one for the log, two kept free for it, so about 32 MiB of data space.
    let fx = Fixture::new(64, 1, 0);
    let engine = fx.open();
    let data_space = engine.core().layout.data_size() as u64 * 2;
    let len = 40 << 20;
    assert!(len > data_space);
    let data = pattern(4096, len as usize, 1);
    let mut q = engine.open_queue(0).unwrap();
    let mut req = Request {
        tag: 1,
        kind: RequestKind::Write {
            offset: 4096,
            bufs: smallvec![DataSeg {
                ptr: data.as_ptr() as *mut u8,
                len: data.len(),
            }],
        },
    };
    // What a queue worker does with a Busy request: keep it, reap, retry when woken.
    let started = Instant::now();
    let mut done = Vec::new();
    loop {
        match q.submit(req) {
            Submit::Busy(back) => req = back,
            Submit::Pending => break,
            Submit::Done(r) => panic!("answered at once: {r:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a {len}-byte write stayed Busy (the cache holds {data_space} bytes of data)"
        );
        q.reap(&mut done);
        std::thread::sleep(Duration::from_millis(2));
    }
    while done.is_empty() {
        q.reap(&mut done);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok(), "{:?}", done[0].1);
    drop(q);

    let mut d = Driver::new(&engine);
    assert!(
        d.read(0, 4096, len as usize).unwrap() == data,
        "read back differs"
    );
    engine.drain().unwrap();
    drop(d);
    engine.shutdown().unwrap();
    let mut image = vec![0u8; len as usize];
    fx.backing.read_at(4096, &mut image).unwrap();
    assert!(image == data, "the image differs after drain");
}
