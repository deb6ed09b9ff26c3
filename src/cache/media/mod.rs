// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The cache media: a byte-addressable mapping and its persistence primitives.
//!
//! This is the only code that knows how bytes become durable. Everything above it writes into
//! the mapping (with [`Media::write`] or through [`Media::slice_ptr`]), then calls
//! [`Media::persist`] on the written ranges and finally [`Media::fence`]. Only after `fence`
//! returns are the persisted bytes guaranteed to survive a crash.
//!
//! # The persistence contract
//!
//! - `persist(offset, len)` starts writing back the range; it is not durable yet.
//!   `write_and_persist` is a write and its persist in one call (pmem mode streams it with
//!   non-temporal stores): the same promise, durable at the fence.
//! - `fence()` makes every range persisted **by the calling thread** since its last fence
//!   durable. `persist` and the `fence` that completes it must run on the same thread: on real
//!   pmem a store fence orders only the calling CPU's write-backs, and in msync mode the pending
//!   ranges are kept per thread so a batch of writes pays one `msync`.
//! - Writes that were never persisted and fenced may or may not survive a crash, in any mix of
//!   whole aligned 8-byte words (the unit the CPU stores atomically).
//! - Several threads may write disjoint ranges at the same time; the mapping is shared and no
//!   method takes a lock on the data path. Concurrent writes to overlapping ranges, or a read
//!   overlapping a concurrent write, are the caller's bug (the bytes read are unspecified).
//!
//! Implementations: [`MappedMedia`] (devdax, a file on a DAX filesystem, an ordinary file) and
//! `RecordingMedia` (in memory, records persistence to produce crash images in tests; built
//! for this crate's tests and with the `test-util` feature only).

mod choose;
mod cpu_flush;
mod mapped;
mod msync;
mod pmem_copy;
#[cfg(any(test, feature = "test-util"))]
mod recording;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub use mapped::{MappedMedia, EMULATE_PMEM_ENV};
pub use pmem_copy::{PmemCopy, NON_TEMPORAL_MIN};
#[cfg(any(test, feature = "test-util"))]
pub use recording::{CrashChoice, EventHook, PendingLines, RecordingMedia};

/// Size of a CPU cache line, the unit in which pmem writes back and in which
/// `RecordingMedia` tracks persistence.
pub const CACHE_LINE: u64 = 64;

/// [`Media::write`]'s plain copy into the media's memory, for media that override `write`
/// for some modes only.
pub(crate) fn copy_in<M: Media + ?Sized>(
    media: &M,
    offset: u64,
    data: &[u8],
) -> Result<(), MediaError> {
    let dst = media.slice_ptr(offset, data.len() as u64)?;
    // SAFETY: `slice_ptr` checked the range; concurrent writers use disjoint ranges (the
    // contract of every caller of `Media`).
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    Ok(())
}

/// Size of the page-cache folios a cache file is mapped with in msync mode (transparent huge
/// pages, see `MappedMedia`). Writing any byte of a clean folio through the mapping makes the
/// file system write the whole folio back at the next sync: the key log leaves the data of a
/// folio a data head still writes into for a later close, and a sync's ranges closer than
/// this are written as one.
pub const FOLIO_SIZE: u64 = 2 << 20;

/// How writes to the media are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Persistence {
    /// Persistent memory mapped directly (devdax, or fsdax with `MAP_SYNC`): persist writes
    /// back CPU cache lines, fence is a store fence. Survives power loss.
    Pmem,
    /// A page-cache mapping of a file: persist records the pages, fence `msync`s them.
    /// Survives power loss once the file system and its device honour `msync`.
    Msync,
    /// Nothing is ever written back explicitly: survives a process kill (the kernel still owns
    /// the shared mapping) but not a power loss or kernel crash.
    Volatile,
}

impl Persistence {
    /// The name used on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Persistence::Pmem => "pmem",
            Persistence::Msync => "msync",
            Persistence::Volatile => "volatile",
        }
    }
}

impl fmt::Display for Persistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Persistence {
    type Err = MediaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pmem" => Ok(Persistence::Pmem),
            "msync" => Ok(Persistence::Msync),
            "volatile" => Ok(Persistence::Volatile),
            other => Err(MediaError::UnknownPersistence(other.to_string())),
        }
    }
}

/// Errors of the media layer.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("media range {offset}+{len} is outside the media of {media_len} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        media_len: u64,
    },
    #[error("unknown persistence mode {0:?} (expected pmem, msync or volatile)")]
    UnknownPersistence(String),
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error(
        "{path}: the file system has no room to allocate the {size}-byte cache file; free space \
         on it or choose a smaller cache size (a cache file is allocated in full up front, so \
         a full disk is found now and not in the middle of a guest write)"
    )]
    NoSpace { path: PathBuf, size: u64 },
    #[error("msync of media range {offset}+{len} failed")]
    Msync {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Options for [`open_media`].
#[derive(Clone, Debug, Default)]
pub struct MediaOptions {
    /// Create an ordinary file of this size when the path does not exist (or is an empty
    /// file). Ignored for an existing non-empty file and for device DAX.
    pub create_size: Option<u64>,
    /// Force a persistence mode instead of detecting it. `Pmem` is refused on a mapping that
    /// is not DAX with `MAP_SYNC`; `Volatile` is only ever used when asked for here.
    pub persistence: Option<Persistence>,
}

/// A byte-addressable cache media. See the module documentation for the persistence contract.
pub trait Media: Send + Sync {
    /// Size of the media in bytes.
    fn len(&self) -> u64;

    /// True for a zero-length media (never the case for a usable cache).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How this media makes writes durable.
    fn persistence(&self) -> Persistence;

    /// Start writing back `len` bytes at `offset`. Durable only after [`Media::fence`] on the
    /// same thread.
    fn persist(&self, offset: u64, len: u64) -> Result<(), MediaError>;

    /// Make every range this thread persisted since its last fence durable.
    fn fence(&self) -> Result<(), MediaError>;

    /// Copy `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let src = self.slice_ptr(offset, buf.len() as u64)?;
        // SAFETY: `slice_ptr` checked the range; no one writes these bytes concurrently (the
        // contract of every caller of this trait).
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copy `data` to `offset`. Not durable until persisted and fenced.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        copy_in(self, offset, data)
    }

    /// Copy `len` bytes from `src` to `offset`, as [`Media::write`] does (not persisted), the
    /// way the media takes bulk data best: msync mode streams whole cache lines into the page
    /// cache with non-temporal stores ([`MappedMedia`]); the default is an ordinary copy.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes and not overlap the media range; as for
    /// every write, no other thread may access the range meanwhile.
    unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> Result<(), MediaError> {
        let dst = self.slice_ptr(offset, len as u64)?;
        // SAFETY: `slice_ptr` checked the range; the caller guarantees `src` and exclusivity.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        Ok(())
    }

    /// Copy `len` bytes from `src` to `offset` and persist them: what [`Media::write`] then
    /// [`Media::persist`] do (durable after this thread's next [`Media::fence`]), in one pass
    /// where the media has one. Pmem mode copies large ranges with non-temporal stores, which
    /// leave no cache line to write back ([`PmemCopy`]).
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes and not overlap the media range; as for
    /// every write, no other thread may access the range meanwhile.
    unsafe fn write_and_persist(
        &self,
        offset: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), MediaError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { copy_then_persist(self, offset, src, len) }
    }

    /// Address of `len` bytes at `offset` in this process, for zero-copy access (copying guest
    /// buffers straight into the media, or handing media pages to the backing image's I/O).
    ///
    /// The pointer is valid for reads and writes of `len` bytes as long as this media object
    /// lives. Writing through it is `unsafe` for the caller: it must not race with another
    /// access to the same bytes, and the range must still be persisted and fenced.
    fn slice_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, MediaError>;

    /// Write zeroes over `len` bytes at `offset` (not persisted).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), MediaError> {
        const CHUNK: usize = 64 << 10;
        let zeroes = [0u8; CHUNK];
        check_range(offset, len, self.len())?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.write(offset + done, &zeroes[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Write `data` at `offset`, persist it and fence: durable on return.
    fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        self.write(offset, data)?;
        self.persist(offset, data.len() as u64)?;
        self.fence()
    }
}

/// Bounds check shared by every implementation.
pub(crate) fn check_range(offset: u64, len: u64, media_len: u64) -> Result<(), MediaError> {
    match offset.checked_add(len) {
        Some(end) if end <= media_len => Ok(()),
        _ => Err(MediaError::OutOfRange {
            offset,
            len,
            media_len,
        }),
    }
}

/// Open the cache media at `path`: a devdax character device, a file on a DAX filesystem
/// (mapped with `MAP_SYNC` when the kernel allows it) or an ordinary file (created with
/// `opts.create_size` if missing). The persistence mode is detected unless
/// `opts.persistence` forces one.
pub fn open_media(path: &Path, opts: &MediaOptions) -> Result<Arc<dyn Media>, MediaError> {
    Ok(Arc::new(MappedMedia::open(path, opts)?))
}

#[cfg(test)]
mod tests;

/// [`Media::write_and_persist`] done as [`Media::write`] then [`Media::persist`]: the default,
/// and what media with a faster way use where that way does not apply.
///
/// # Safety
/// As [`Media::write_and_persist`].
pub(super) unsafe fn copy_then_persist<M: Media + ?Sized>(
    media: &M,
    offset: u64,
    src: *const u8,
    len: usize,
) -> Result<(), MediaError> {
    let dst = media.slice_ptr(offset, len as u64)?;
    // SAFETY: `slice_ptr` checked the range; the caller guarantees `src` and exclusivity.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    media.persist(offset, len as u64)
}
