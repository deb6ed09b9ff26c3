// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a backing image (its synchronous I/O for tests is in `sync_io.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bounce::AlignedBuf;
use super::error::BackingError;
use super::identity::{self, BlockIdentity};
use super::rmw::RangeLocks;
use super::sys;
use crate::engine::SECTOR_SIZE;

/// How to open a backing image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingOptions {
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT). Falls back to buffered I/O, with a warning, where
    /// the file system cannot do direct I/O.
    pub direct: bool,
}

impl Default for BackingOptions {
    fn default() -> Self {
        BackingOptions {
            read_only: false,
            direct: true,
        }
    }
}

/// What a cache records to recognise its backing image later. For a regular file `dev` and
/// `ino` are the file system device and inode; for a block device `dev` is the device number
/// itself and `ino` is 0 (device nodes get new inodes on every boot). A block device's
/// number changes across reboots and re-creation; `stable` is what identifies it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingIdentity {
    pub size: u64,
    pub is_block_device: bool,
    pub dev: u64,
    pub ino: u64,
    /// A block device's stable identity (see [`super::identity`]); `None` for a regular file
    /// and for a device the system knows no stable identity of.
    pub stable: Option<BlockIdentity>,
}

/// An open backing image: a raw image file or a block device.
pub struct BackingImage {
    path: PathBuf,
    pub(super) file: File,
    size: u64,
    read_only: bool,
    direct: bool,
    pub(super) alignment: usize,
    identity: BackingIdentity,
    pub(crate) rmw_locks: RangeLocks,
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    flush_hook: std::sync::Mutex<Option<FlushHook>>,
}

/// Test hook run by a `BackingQueue` just before it starts a flush; see
/// [`BackingImage::set_flush_hook`].
#[cfg(test)]
pub type FlushHook = Box<dyn FnMut() + Send>;

/// Alignments tried, smallest first, when the file system does not report its own.
const PROBE_ALIGNMENTS: [usize; 4] = [512, 1024, 2048, 4096];

impl BackingImage {
    /// Open the image at `path`: check what it is, open it (direct I/O unless refused), read
    /// its size, settle the I/O alignment (falling back to buffered I/O where direct I/O does
    /// not work), and record its identity.
    pub fn open(path: &Path, opts: &BackingOptions) -> Result<Arc<BackingImage>, BackingError> {
        let meta = std::fs::metadata(path).map_err(open_err(path))?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.file_type().is_file() {
            return Err(BackingError::NotFileOrBlockDevice {
                path: path.to_owned(),
            });
        }
        let (file, direct) = open_preferring_direct(path, opts)?;
        let size = image_size(path, &file, &meta)?;
        let (file, direct, alignment) =
            settle_alignment(path, file, opts.read_only, direct, is_block_device, size)?;
        let identity = BackingIdentity {
            size,
            is_block_device,
            dev: if is_block_device {
                meta.rdev()
            } else {
                meta.dev()
            },
            ino: if is_block_device { 0 } else { meta.ino() },
            stable: if is_block_device {
                identity::stable_identity_of_image(path, meta.rdev())
            } else {
                None
            },
        };
        log::info!(
            "backing image {}: {size} bytes, {}, alignment {alignment}{}",
            path.display(),
            if direct { "direct I/O" } else { "buffered I/O" },
            if opts.read_only { ", read-only" } else { "" }
        );
        Ok(Arc::new(BackingImage {
            path: path.to_owned(),
            file,
            size,
            read_only: opts.read_only,
            direct,
            alignment,
            identity,
            rmw_locks: RangeLocks::default(),
            #[cfg(test)]
            fail_writes: Default::default(),
            #[cfg(test)]
            flush_hook: Default::default(),
        }))
    }

    /// Create a sparse image file of `size` bytes. Never overwrites anything.
    pub fn create_sparse(path: &Path, size: u64) -> Result<(), BackingError> {
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(BackingError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        let create_err = |source| BackingError::Create {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => BackingError::AlreadyExists {
                    path: path.to_owned(),
                },
                _ => create_err(e),
            })?;
        file.set_len(size).map_err(create_err)?;
        file.sync_all().map_err(create_err)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the host page cache (false after the buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn identity(&self) -> BackingIdentity {
        self.identity.clone()
    }

    /// Alignment of offsets, lengths and memory for zero-copy I/O: the direct I/O alignment
    /// (the device's logical block size, or what the file system reports or accepts), or the
    /// sector size in buffered mode, where any alignment is zero-copy.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// The alignment requests must meet to go to the kernel as they are.
    pub(crate) fn io_align(&self) -> usize {
        if self.direct {
            self.alignment
        } else {
            1
        }
    }

    /// Test fault switch: while set, every write, zeroing, discard and flush through a
    /// `BackingQueue` fails with an I/O error, as a failing backing device would.
    #[cfg(test)]
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes
            .store(fail, std::sync::atomic::Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn writes_fail(&self) -> bool {
        self.fail_writes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Test hook: `hook` runs on the flushing thread each time a `BackingQueue` is about to
    /// flush (every write it issued before has completed), so a crash test can cut there.
    #[cfg(test)]
    pub fn set_flush_hook(&self, hook: Option<FlushHook>) {
        *crate::sync::lock(&self.flush_hook) = hook;
    }

    /// Run the flush hook, if any. It is taken out while it runs, so a flush it causes itself
    /// does not run it again.
    #[cfg(test)]
    pub(crate) fn before_flush(&self) {
        let taken = crate::sync::lock(&self.flush_hook).take();
        if let Some(mut hook) = taken {
            hook();
            let mut slot = crate::sync::lock(&self.flush_hook);
            if slot.is_none() {
                *slot = Some(hook);
            }
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at offset {offset} reach beyond the end of backing image {} ({} bytes)",
                    self.path.display(),
                    self.size
                ),
            )),
        }
    }

    pub(crate) fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("backing image {} is open read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Make every completed write durable (fdatasync; on a block device, a cache flush).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn open_err(path: &Path) -> impl Fn(io::Error) -> BackingError + '_ {
    move |source| BackingError::Open {
        path: path.to_owned(),
        source,
    }
}

/// Open with O_DIRECT when asked, or buffered where the file system refuses O_DIRECT.
/// Returns whether the file is open for direct I/O.
fn open_preferring_direct(
    path: &Path,
    opts: &BackingOptions,
) -> Result<(File, bool), BackingError> {
    match open_file(path, opts.read_only, opts.direct) {
        Err(e) if opts.direct && e.raw_os_error() == Some(libc::EINVAL) => {
            warn_buffered(path, "the file system refuses O_DIRECT");
            open_file(path, opts.read_only, false).map(|file| (file, false))
        }
        other => other.map(|file| (file, opts.direct)),
    }
    .map_err(open_err(path))
}

/// The size in bytes: of the file, or as the block device reports it. A positive multiple of
/// the sector size.
fn image_size(path: &Path, file: &File, meta: &std::fs::Metadata) -> Result<u64, BackingError> {
    let size = if meta.file_type().is_block_device() {
        sys::block_device_size(file).map_err(|source| BackingError::Query {
            path: path.to_owned(),
            what: "the size",
            source,
        })?
    } else {
        meta.len()
    };
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(BackingError::BadSize {
            path: path.to_owned(),
            size,
        });
    }
    Ok(size)
}

/// The alignment I/O must meet: a block device's logical block size, and for direct I/O what
/// a probe read accepts. Where direct I/O fails, or the size is not a multiple of its
/// alignment, the image is opened again buffered. Returns the file to use, whether it is
/// direct, and the alignment.
fn settle_alignment(
    path: &Path,
    file: File,
    read_only: bool,
    direct: bool,
    is_block_device: bool,
    size: u64,
) -> Result<(File, bool, usize), BackingError> {
    let mut alignment = SECTOR_SIZE as usize;
    if is_block_device {
        alignment =
            sys::block_device_logical_block_size(&file).map_err(|source| BackingError::Query {
                path: path.to_owned(),
                what: "the logical block size",
                source,
            })?;
    }
    if !direct {
        return Ok((file, false, alignment));
    }
    let found = if is_block_device {
        probe_direct(&file, alignment, size).map(|()| Some(alignment))
    } else {
        find_file_alignment(&file, size)
    }
    .map_err(open_err(path))?;
    match found {
        Some(a) if size % a as u64 == 0 => Ok((file, true, a)),
        Some(a) => {
            warn_buffered(
                path,
                &format!("its size is not a multiple of the {a}-byte direct I/O alignment"),
            );
            let file = open_file(path, read_only, false).map_err(open_err(path))?;
            Ok((file, false, alignment))
        }
        None => {
            warn_buffered(path, "direct I/O fails on it");
            let file = open_file(path, read_only, false).map_err(open_err(path))?;
            Ok((file, false, alignment))
        }
    }
}

fn warn_buffered(path: &Path, why: &str) {
    log::warn!(
        "backing image {}: {why}; falling back to buffered I/O through the host page cache",
        path.display()
    );
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
}

/// One direct read of `align` bytes at offset `align` into memory aligned to exactly `align`
/// (or at offset 0 for a tiny image), so a looser alignment than needed shows up as EINVAL.
fn probe_direct(file: &File, align: usize, size: u64) -> io::Result<()> {
    let offset = if size >= 2 * align as u64 { align } else { 0 };
    let mut buf = AlignedBuf::zeroed(2 * align, 2 * align);
    let target = &mut buf.as_mut_slice()[align..];
    file.read_exact_at(target, offset as u64)
}

/// The direct I/O alignment of a regular file: what statx reports if it works, else the
/// smallest alignment a probe read accepts. `None` when direct I/O does not work at all.
fn find_file_alignment(file: &File, size: u64) -> io::Result<Option<usize>> {
    let candidates: Vec<usize> = match sys::statx_dio_alignment(file) {
        Some(a) => std::iter::once(a.max(SECTOR_SIZE as usize))
            .chain(PROBE_ALIGNMENTS)
            .collect(),
        None => PROBE_ALIGNMENTS.to_vec(),
    };
    for align in candidates {
        if size < align as u64 {
            break;
        }
        match probe_direct(file, align, size) {
            Ok(()) => return Ok(Some(align)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
