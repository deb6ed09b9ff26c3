// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine interface: what the virtio-blk layer asks of storage.
//!
//! The virtio-blk layer (`crate::virtio_blk`) turns descriptor chains into [`Request`]s of byte
//! offsets and scatter-gather buffers and hands them to an [`EngineQueue`], one per virtqueue
//! worker thread. An engine is either the pass-through engine (`--cache none`,
//! `crate::passthrough`) or the pmem cache engine (`crate::cache`). The engine knows nothing of
//! virtio; the virtio layer knows nothing of segments or ksets.
//!
//! An [`Engine`] lives for the whole process: a vhost-user reconnect opens new queue handles on
//! the same engine, never a new engine.

use std::io;
use std::os::fd::RawFd;

use smallvec::SmallVec;

/// Size of a sector, the unit of virtio-blk offsets and of every engine alignment rule.
pub const SECTOR_SIZE: u64 = 512;

/// One contiguous piece of a request's data buffer, in this process's address space (guest RAM
/// mapped by the vhost-user memory table).
///
/// The pointer stays valid until the request that carries it has been completed (returned by
/// [`EngineQueue::submit`] as [`Submit::Done`] or reported by [`EngineQueue::reap`]): the
/// virtio layer keeps the guest memory mapping alive that long. The guest may change the bytes
/// at any time, so engines copy from it once and compute checksums on their own copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataSeg {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: a DataSeg is a plain address range; the virtio layer guarantees the mapping outlives
// the request, whichever thread completes it.
unsafe impl Send for DataSeg {}

/// How many segments a [`DataSegs`] holds without a heap allocation. Guests send a request's
/// data in one or two descriptors (more only for buffers of many scattered pages), and a
/// descriptor is one segment unless it crosses a guest memory region; a longer list spills to
/// the heap, which only such large requests pay for.
pub const INLINE_DATA_SEGS: usize = 4;

/// A scatter-gather list: the segments of one request's data buffer, in order. Inline up to
/// [`INLINE_DATA_SEGS`] segments, so a typical request allocates nothing for it.
pub type DataSegs = SmallVec<[DataSeg; INLINE_DATA_SEGS]>;

impl DataSeg {
    /// Total length of a scatter-gather list.
    pub fn total_len(segs: &[DataSeg]) -> u64 {
        segs.iter().map(|s| s.len as u64).sum()
    }

    /// The part of a scatter-gather list that covers bytes `start..start + len` of it.
    pub fn sub_range(segs: &[DataSeg], start: u64, len: u64) -> DataSegs {
        let mut out = DataSegs::new();
        let (mut skip, mut left) = (start, len);
        for s in segs {
            if left == 0 {
                break;
            }
            if skip >= s.len as u64 {
                skip -= s.len as u64;
                continue;
            }
            let take = (s.len as u64 - skip).min(left);
            // Stays inside `s`, which the caller guarantees is one valid range.
            out.push(DataSeg {
                ptr: s.ptr.wrapping_add(skip as usize),
                len: take as usize,
            });
            left -= take;
            skip = 0;
        }
        out
    }

    /// Copy the whole scatter-gather list to `dst`.
    ///
    /// # Safety
    /// Every segment must be valid for reads for its length (the [`DataSeg`] contract) and
    /// `dst` valid for writes of [`DataSeg::total_len`] bytes, not overlapping the segments.
    pub unsafe fn gather(segs: &[DataSeg], dst: *mut u8) {
        let mut at = 0;
        for s in segs {
            // SAFETY: the caller guarantees both ranges are valid and disjoint.
            unsafe { std::ptr::copy_nonoverlapping(s.ptr, dst.add(at), s.len) };
            at += s.len;
        }
    }

    /// Copy [`DataSeg::total_len`] bytes from `src` into the scatter-gather list.
    ///
    /// # Safety
    /// Every segment must be valid for writes for its length (the [`DataSeg`] contract) and
    /// `src` valid for reads of the total length, not overlapping the segments.
    pub unsafe fn scatter(segs: &[DataSeg], src: *const u8) {
        let mut at = 0;
        for s in segs {
            // SAFETY: the caller guarantees both ranges are valid and disjoint.
            unsafe { std::ptr::copy_nonoverlapping(src.add(at), s.ptr, s.len) };
            at += s.len;
        }
    }

    /// Fill the scatter-gather list with zeroes.
    ///
    /// # Safety
    /// Every segment must be valid for writes for its length (the [`DataSeg`] contract).
    pub unsafe fn zero(segs: &[DataSeg]) {
        for s in segs {
            // SAFETY: the caller guarantees `s` is writable for `s.len` bytes.
            unsafe { std::ptr::write_bytes(s.ptr, 0, s.len) };
        }
    }
}

/// What a request asks for. Offsets and lengths are in bytes; the virtio layer guarantees that
/// they are multiples of [`SECTOR_SIZE`] and that `offset + len <= capacity`.
#[derive(Debug)]
pub enum RequestKind {
    /// Fill `bufs` with the bytes at `offset`.
    Read { offset: u64, bufs: DataSegs },
    /// Store the bytes of `bufs` at `offset`.
    Write { offset: u64, bufs: DataSegs },
    /// Make every write completed before this request durable.
    Flush,
    /// Make `len` bytes at `offset` read as zeroes; `may_unmap` allows deallocating them.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
    /// The guest no longer needs `len` bytes at `offset`; they may read as anything afterwards
    /// (engines here make them read as zeroes).
    Discard { offset: u64, len: u64 },
}

/// A request and the caller's cookie, returned with its completion.
#[derive(Debug)]
pub struct Request {
    pub tag: u64,
    pub kind: RequestKind,
}

/// Why a request failed. The virtio layer answers every one of these with `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("backing image I/O failed")]
    Backing(#[source] io::Error),
    /// The engine's cache media failed; the engine's own error is the source.
    #[error("cache media I/O failed")]
    Media(#[source] BoxError),
    #[error("cached data at byte {offset} (length {len}) failed its CRC check")]
    DataCrc { offset: u64, len: u32 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("request at byte {offset} length {len} is outside the device")]
    OutOfRange { offset: u64, len: u64 },
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// The outcome of one request.
pub type IoResult = Result<(), IoError>;

/// What [`EngineQueue::submit`] did with a request.
#[derive(Debug)]
pub enum Submit {
    /// Finished on the spot.
    Done(IoResult),
    /// Under way; its completion will come out of [`EngineQueue::reap`].
    Pending,
    /// Not taken: the engine has no room now (a full cache). The caller keeps the request, stops
    /// taking new ones from its queue, and submits it again after one of
    /// [`EngineQueue::poll_fds`] became readable and [`EngineQueue::reap`] was called. No
    /// request is ever failed for lack of room.
    Busy(Request),
}

/// An engine's own error, carried as the source of [`IoError`] and [`EngineError`]: this
/// interface knows no engine's types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors opening or operating an engine as a whole (not a single request). A message never
/// repeats its source: whoever reports the error prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// What the engine was doing, and the engine's error as the source.
    #[error("{context}")]
    Failed {
        context: String,
        #[source]
        source: BoxError,
    },
    #[error("{0}")]
    Invalid(String),
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    /// `context` failed because of the engine's error `source`.
    pub fn failed(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        EngineError::Failed {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// A block device as the virtio layer sees it. Shared by all queue workers (`&self`, interior
/// mutability) and by every vhost-user connection of the process.
pub trait Engine: Send + Sync {
    /// Device size in bytes, a multiple of [`SECTOR_SIZE`].
    fn capacity(&self) -> u64;

    /// Whether writes, write-zeroes and discards are refused.
    fn read_only(&self) -> bool;

    /// How many queue handles [`Engine::open_queue`] accepts (indices `0..max_queues()`).
    fn max_queues(&self) -> usize;

    /// A handle for virtqueue `index`, used by that queue's worker thread only. At most one
    /// handle per index is open at a time; dropping it waits for its requests to finish.
    fn open_queue(&self, index: usize) -> Result<Box<dyn EngineQueue>, EngineError>;

    /// The guest's write-cache setting (virtio-blk `writeback`). With `false`, every write is
    /// durable when it completes; with `true`, only after a later FLUSH completes.
    fn set_write_cache(&self, enabled: bool);

    /// The current write-cache setting.
    fn write_cache(&self) -> bool;

    /// Make everything completed so far durable and release resources for process exit.
    fn shutdown(&self) -> Result<(), EngineError>;
}

/// One worker thread's view of an engine.
pub trait EngineQueue: Send {
    /// Start a request.
    fn submit(&mut self, req: Request) -> Submit;

    /// File descriptors the worker adds to its event loop; when any becomes readable the worker
    /// calls [`EngineQueue::reap`]. They cover completions, timers (such as closing an idle
    /// kset) and "room again" after [`Submit::Busy`].
    fn poll_fds(&self) -> Vec<RawFd>;

    /// Do pending housekeeping and append the completions that are ready to `done`, as
    /// `(tag, result)`. Never blocks. The worker calls it after every batch of submissions as
    /// well as when a poll fd fires, so an engine may answer a batch's writes `Pending` and
    /// complete them all here behind one persistence barrier.
    fn reap(&mut self, done: &mut Vec<(u64, IoResult)>);

    /// Requests submitted and not yet returned by `reap`.
    fn in_flight(&self) -> usize;

    /// Block until every submitted request has completed, appending them to `done`. Used when
    /// a queue stops or the frontend goes away.
    fn drain(&mut self, done: &mut Vec<(u64, IoResult)>);
}

/// Shows an error followed by each of its causes (`what: why: root cause`), for log lines
/// and status fields: a message leaves its cause to the chain, and a log line has no chain
/// printer of its own.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}
