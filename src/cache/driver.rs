// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A synchronous driver for the cache engine without a socket: submit one request on a
//! queue and wait for it. Used by the engine's own tests and the crash-test harness; it goes
//! through the same `EngineQueue` calls as the virtio layer.

use std::time::{Duration, Instant};

use smallvec::smallvec;

use crate::engine::{DataSeg, Engine, EngineQueue, IoResult, Request, RequestKind, Submit};

/// How long a request may wait for room in a full cache before the driver gives up.
const BUSY_LIMIT: Duration = Duration::from_secs(120);

pub struct Driver {
    queues: Vec<Box<dyn EngineQueue>>,
    next_tag: u64,
}

impl Driver {
    /// Open every queue of `engine`.
    pub fn new(engine: &dyn Engine) -> Driver {
        Self::with_queues(engine, engine.max_queues())
    }

    /// Open only the first `n` queues of `engine` (a guest that starts fewer than offered).
    pub fn with_queues(engine: &dyn Engine, n: usize) -> Driver {
        let queues = (0..n)
            .map(|i| engine.open_queue(i).expect("open queue"))
            .collect();
        Driver {
            queues,
            next_tag: 0,
        }
    }

    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Run one request on queue `q` to completion.
    pub fn run(&mut self, q: usize, kind: RequestKind) -> IoResult {
        self.next_tag += 1;
        let tag = self.next_tag;
        let queue = &mut self.queues[q];
        let mut req = Request { tag, kind };
        let started = Instant::now();
        loop {
            match queue.submit(req) {
                Submit::Done(r) => return r,
                Submit::Pending => break,
                Submit::Busy(back) => {
                    assert!(
                        started.elapsed() < BUSY_LIMIT,
                        "request waited for cache room for {BUSY_LIMIT:?}"
                    );
                    req = back;
                    let mut done = Vec::new();
                    queue.reap(&mut done);
                    assert!(done.is_empty(), "no other request is in flight");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        let mut done = Vec::new();
        loop {
            queue.reap(&mut done);
            if let Some(i) = done.iter().position(|(t, _)| *t == tag) {
                return done.swap_remove(i).1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> IoResult {
        let bufs = smallvec![DataSeg {
            ptr: data.as_ptr() as *mut u8,
            len: data.len(),
        }];
        self.run(q, RequestKind::Write { offset, bufs })
    }

    pub fn read(
        &mut self,
        q: usize,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, crate::engine::IoError> {
        let mut buf = vec![0xA5u8; len];
        let bufs = smallvec![DataSeg {
            ptr: buf.as_mut_ptr(),
            len,
        }];
        self.run(q, RequestKind::Read { offset, bufs })?;
        Ok(buf)
    }

    pub fn flush(&mut self, q: usize) -> IoResult {
        self.run(q, RequestKind::Flush)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> IoResult {
        self.run(
            q,
            RequestKind::WriteZeroes {
                offset,
                len,
                may_unmap: false,
            },
        )
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> IoResult {
        self.run(q, RequestKind::Discard { offset, len })
    }
}
