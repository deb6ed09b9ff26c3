// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pass-through engine (`--cache none`): every request goes straight to the backing image.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backing::{BackingImage, BackingQueue};
use crate::engine::{
    DataSeg, Engine, EngineError, EngineQueue, IoError, IoResult, Request, RequestKind, Submit,
};

/// Ring operations per queue; deeper bursts wait inside the backing queue.
const QUEUE_DEPTH: u32 = 128;

pub struct PassthroughEngine {
    image: Arc<BackingImage>,
    max_queues: usize,
    write_cache: Arc<AtomicBool>,
}

impl PassthroughEngine {
    pub fn new(image: Arc<BackingImage>, max_queues: usize) -> PassthroughEngine {
        PassthroughEngine {
            image,
            max_queues,
            write_cache: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Engine for PassthroughEngine {
    fn capacity(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.image.read_only()
    }

    fn max_queues(&self) -> usize {
        self.max_queues
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn EngineQueue>, EngineError> {
        if index >= self.max_queues {
            return Err(EngineError::Invalid(format!(
                "queue {index} requested, but the engine has {} queues",
                self.max_queues
            )));
        }
        let mut backing = BackingQueue::new(self.image.clone(), QUEUE_DEPTH)
            .map_err(|e| EngineError::io(format!("opening queue {index}"), io::Error::other(e)))?;
        // The worker reaps after every batch (the EngineQueue contract): one submit per batch.
        backing.defer_submit(crate::backing::WORKER_SUBMIT_GROUP);
        Ok(Box::new(PassthroughQueue {
            backing,
            write_cache: self.write_cache.clone(),
            completions: Vec::new(),
        }))
    }

    fn set_write_cache(&self, enabled: bool) {
        self.write_cache.store(enabled, Ordering::Relaxed);
    }

    fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    fn shutdown(&self) -> Result<(), EngineError> {
        if self.image.read_only() {
            return Ok(());
        }
        self.image.flush().map_err(|e| {
            EngineError::io(
                format!("flushing backing image {}", self.image.path().display()),
                e,
            )
        })
    }
}

struct PassthroughQueue {
    backing: BackingQueue,
    write_cache: Arc<AtomicBool>,
    completions: Vec<(u64, io::Result<()>)>,
}

impl PassthroughQueue {
    /// Whether each write must be durable on completion (the guest turned the cache off).
    fn write_through(&self) -> bool {
        !self.write_cache.load(Ordering::Relaxed)
    }

    fn refuse(&self, kind: &RequestKind) -> Option<IoError> {
        let image = self.backing.image();
        let (range, writes) = match kind {
            RequestKind::Read { offset, bufs } => {
                (Some((*offset, DataSeg::total_len(bufs))), false)
            }
            RequestKind::Write { offset, bufs } => {
                (Some((*offset, DataSeg::total_len(bufs))), true)
            }
            RequestKind::WriteZeroes { offset, len, .. } | RequestKind::Discard { offset, len } => {
                (Some((*offset, *len)), true)
            }
            RequestKind::Flush => (None, false),
        };
        if writes && image.read_only() {
            return Some(IoError::ReadOnly);
        }
        let (offset, len) = range?;
        match offset.checked_add(len) {
            Some(end) if end <= image.size() => None,
            _ => Some(IoError::OutOfRange { offset, len }),
        }
    }

    fn move_completions(&mut self, done: &mut Vec<(u64, IoResult)>) {
        done.extend(
            self.completions
                .drain(..)
                .map(|(tag, result)| (tag, result.map_err(IoError::Backing))),
        );
    }
}

impl EngineQueue for PassthroughQueue {
    fn submit(&mut self, req: Request) -> Submit {
        if let Some(err) = self.refuse(&req.kind) {
            return Submit::Done(Err(err));
        }
        let tag = req.tag;
        let durable = self.write_through();
        match req.kind {
            RequestKind::Read { offset, bufs } => self.backing.read(offset, &bufs, tag),
            RequestKind::Write { offset, bufs } => self.backing.write(offset, &bufs, durable, tag),
            RequestKind::Flush => self.backing.flush(tag),
            RequestKind::WriteZeroes {
                offset,
                len,
                may_unmap,
            } if durable => self.backing.write_zeroes_dsync(offset, len, may_unmap, tag),
            RequestKind::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => self.backing.write_zeroes(offset, len, may_unmap, tag),
            RequestKind::Discard { offset, len } if durable => {
                self.backing.discard_dsync(offset, len, tag)
            }
            RequestKind::Discard { offset, len } => self.backing.discard(offset, len, tag),
        }
        Submit::Pending
    }

    fn poll_fds(&self) -> Vec<RawFd> {
        vec![self.backing.event_fd()]
    }

    fn reap(&mut self, done: &mut Vec<(u64, IoResult)>) {
        self.backing.reap(&mut self.completions);
        self.move_completions(done);
    }

    fn in_flight(&self) -> usize {
        self.backing.in_flight()
    }

    fn drain(&mut self, done: &mut Vec<(u64, IoResult)>) {
        self.backing.wait(&mut self.completions);
        self.move_completions(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smallvec::smallvec;

    use crate::backing::testutil::{direct_dir, new_image, pattern};
    use crate::backing::BackingOptions;

    const MIB: u64 = 1 << 20;

    fn seg(buf: &mut [u8]) -> DataSeg {
        DataSeg {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    fn engine(dir: &tempfile::TempDir, opts: &BackingOptions) -> PassthroughEngine {
        let (_, image) = new_image(dir.path(), "img", MIB, opts);
        PassthroughEngine::new(image, 2)
    }

    /// Submit every request (all must be taken), drain, and return the results in tag order.
    fn run(queue: &mut dyn EngineQueue, kinds: Vec<RequestKind>) -> Vec<IoResult> {
        let count = kinds.len();
        let mut done = Vec::new();
        for (tag, kind) in kinds.into_iter().enumerate() {
            match queue.submit(Request {
                tag: tag as u64,
                kind,
            }) {
                Submit::Done(result) => done.push((tag as u64, result)),
                Submit::Pending => {}
                Submit::Busy(_) => panic!("the pass-through engine is never busy"),
            }
        }
        queue.reap(&mut done);
        queue.drain(&mut done);
        assert_eq!(queue.in_flight(), 0);
        done.sort_by_key(|(tag, _)| *tag);
        let tags: Vec<u64> = done.iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, (0..count as u64).collect::<Vec<_>>());
        done.into_iter().map(|(_, result)| result).collect()
    }

    #[test]
    fn engine_reports_the_image() {
        let dir = direct_dir();
        let engine = engine(&dir, &BackingOptions::default());
        assert_eq!(engine.capacity(), MIB);
        assert!(!engine.read_only());
        assert_eq!(engine.max_queues(), 2);
        assert!(engine.write_cache());
        engine.set_write_cache(false);
        assert!(!engine.write_cache());
        assert!(engine.open_queue(2).is_err());
        let queue = engine.open_queue(1).unwrap();
        assert_eq!(queue.poll_fds().len(), 1);
        engine.shutdown().unwrap();
    }

    #[test]
    fn requests_round_trip_with_and_without_write_cache() {
        let dir = direct_dir();
        let engine = engine(&dir, &BackingOptions::default());
        for write_cache in [true, false] {
            engine.set_write_cache(write_cache);
            let mut queue = engine.open_queue(0).unwrap();
            let mut a = pattern(1, 4096);
            let mut b = pattern(2, 1536);
            let results = run(
                queue.as_mut(),
                vec![
                    RequestKind::Write {
                        offset: 0,
                        bufs: smallvec![seg(&mut a)],
                    },
                    RequestKind::Write {
                        offset: 8192,
                        bufs: smallvec![seg(&mut b[..512]), seg(&mut b[512..])],
                    },
                    RequestKind::Flush,
                ],
            );
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            let results = run(
                queue.as_mut(),
                vec![
                    RequestKind::WriteZeroes {
                        offset: 1024,
                        len: 1024,
                        may_unmap: write_cache,
                    },
                    RequestKind::Discard {
                        offset: 8192,
                        len: 512,
                    },
                ],
            );
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            let mut x = vec![0xFFu8; 4096];
            let mut y = vec![0xFFu8; 1536];
            let results = run(
                queue.as_mut(),
                vec![
                    RequestKind::Read {
                        offset: 0,
                        bufs: smallvec![seg(&mut x)],
                    },
                    RequestKind::Read {
                        offset: 8192,
                        bufs: smallvec![seg(&mut y)],
                    },
                ],
            );
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            let mut want_x = a.clone();
            want_x[1024..2048].fill(0);
            assert_eq!(x, want_x);
            let mut want_y = b.clone();
            want_y[..512].fill(0);
            assert_eq!(y, want_y);
        }
    }

    #[test]
    fn out_of_range_requests_leave_the_image_alone() {
        let dir = direct_dir();
        let engine = engine(&dir, &BackingOptions::default());
        let mut queue = engine.open_queue(0).unwrap();
        let mut last = pattern(3, 512);
        let results = run(
            queue.as_mut(),
            vec![RequestKind::Write {
                offset: MIB - 512,
                bufs: smallvec![seg(&mut last)],
            }],
        );
        assert!(results[0].is_ok());
        let mut two = vec![0u8; 1024];
        let results = run(
            queue.as_mut(),
            vec![
                RequestKind::Write {
                    offset: MIB - 512,
                    bufs: smallvec![seg(&mut two)],
                },
                RequestKind::Read {
                    offset: MIB,
                    bufs: smallvec![seg(&mut two)],
                },
                RequestKind::WriteZeroes {
                    offset: MIB - 512,
                    len: 1024,
                    may_unmap: false,
                },
                RequestKind::Discard {
                    offset: u64::MAX - 511,
                    len: 1024,
                },
            ],
        );
        for result in &results {
            assert!(
                matches!(result, Err(IoError::OutOfRange { .. })),
                "{result:?}"
            );
        }
        let mut back = vec![0u8; 512];
        engine.image.read_at(MIB - 512, &mut back).unwrap();
        assert_eq!(back, last);
    }

    #[test]
    fn read_only_engine_refuses_changes() {
        let dir = direct_dir();
        let (path, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
        image.write_at(0, &[4u8; 512]).unwrap();
        drop(image);
        let ro = BackingOptions {
            read_only: true,
            ..Default::default()
        };
        let engine = PassthroughEngine::new(BackingImage::open(&path, &ro).unwrap(), 1);
        assert!(engine.read_only());
        let mut queue = engine.open_queue(0).unwrap();
        let mut buf = vec![0u8; 512];
        let results = run(
            queue.as_mut(),
            vec![
                RequestKind::Write {
                    offset: 0,
                    bufs: smallvec![seg(&mut buf)],
                },
                RequestKind::WriteZeroes {
                    offset: 0,
                    len: 512,
                    may_unmap: true,
                },
                RequestKind::Discard {
                    offset: 0,
                    len: 512,
                },
            ],
        );
        for result in &results {
            assert!(matches!(result, Err(IoError::ReadOnly)), "{result:?}");
        }
        let results = run(
            queue.as_mut(),
            vec![
                RequestKind::Read {
                    offset: 0,
                    bufs: smallvec![seg(&mut buf)],
                },
                RequestKind::Flush,
            ],
        );
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        assert_eq!(buf, vec![4u8; 512]);
        engine.shutdown().unwrap();
    }

    #[test]
    fn backing_failures_become_io_errors() {
        let dir = direct_dir();
        let engine = engine(&dir, &BackingOptions::default());
        let mut queue = engine.open_queue(0).unwrap();
        // The kernel cannot write to address 0: the ring reports EFAULT.
        let bad = DataSeg {
            ptr: std::ptr::null_mut(),
            len: engine.image.alignment(),
        };
        let results = run(
            queue.as_mut(),
            vec![RequestKind::Read {
                offset: 0,
                bufs: smallvec![bad],
            }],
        );
        match &results[0] {
            Err(IoError::Backing(e)) => assert_eq!(e.raw_os_error(), Some(libc::EFAULT)),
            other => panic!("expected a backing error, got {other:?}"),
        }
    }
}
