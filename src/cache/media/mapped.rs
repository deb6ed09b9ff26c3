// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`MappedMedia`]: a shared mapping of a devdax device, a DAX file or an ordinary file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use super::choose::{choose, Choice, Facts, MapSync};
use super::cpu_flush::{self, FlushInsn};
use super::pmem_copy::{self, PmemCopy};
use super::{check_range, msync, Media, MediaError, MediaOptions, Persistence};

/// Environment variable that lets `pmem` persistence run on an ordinary file, so tests can
/// exercise the cache-line write-back path where no DAX device exists.
pub const EMULATE_PMEM_ENV: &str = "VHOST_USER_PCACHE_EMULATE_PMEM";

fn emulate_pmem() -> bool {
    std::env::var_os(EMULATE_PMEM_ENV).is_some_and(|v| v == "1")
}

/// A cache media backed by a `MAP_SHARED` mapping of a file or device.
pub struct MappedMedia {
    base: *mut u8,
    len: u64,
    persistence: Persistence,
    flush: FlushInsn,
    path: PathBuf,
    file: File,
}

// SAFETY: the mapping is shared memory owned by this object until drop; every method either
// reads/writes caller-chosen disjoint ranges (the documented contract) or only reads the
// immutable fields.
unsafe impl Send for MappedMedia {}
// SAFETY: as above; no method mutates the object itself.
unsafe impl Sync for MappedMedia {}

/// What kind of object the path names.
enum Target {
    DevDax { size: u64 },
    File { size: u64 },
}

impl MappedMedia {
    /// Open and map `path`. See [`super::open_media`].
    pub fn open(path: &Path, opts: &MediaOptions) -> Result<Self, MediaError> {
        let io_err = |what: &'static str| {
            move |source: io::Error| MediaError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let unsupported = |reason: String| MediaError::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        let (file, target, created) = open_target(path, opts.create_size)?;
        let size = match target {
            Target::DevDax { size } | Target::File { size } => size,
        };
        if size == 0 {
            return Err(unsupported("the media is empty".into()));
        }
        let len = usize::try_from(size).map_err(|_| unsupported("media too large".into()))?;
        let is_devdax = matches!(target, Target::DevDax { .. });

        let facts = Facts {
            forced: opts.persistence,
            devdax: is_devdax,
            cpu_flush: cpu_flush::SUPPORTED,
            emulate_pmem: emulate_pmem(),
        };
        // The choice when no MAP_SYNC mapping is kept: a plain shared mapping, or a refusal.
        let map_plain = |choice: Choice, map_sync: MapSync| match choice {
            Choice::Map(persistence) => {
                warn_weaker(path, persistence, map_sync);
                let base = map(&file, len, libc::MAP_SHARED).map_err(io_err("mmap"))?;
                Ok((base, persistence))
            }
            Choice::Refuse(reason) => Err(unsupported(reason.into())),
            Choice::TryMapSync | Choice::KeepMapSync => {
                unreachable!("{choice:?} after MAP_SYNC was {map_sync:?}")
            }
        };
        let (base, persistence) = match choose(facts, MapSync::NotTried) {
            Choice::TryMapSync => {
                match map(&file, len, libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC) {
                    Ok(base) => match choose(facts, MapSync::Accepted) {
                        Choice::KeepMapSync => (base, Persistence::Pmem),
                        Choice::Refuse(reason) => {
                            unmap(base, len);
                            return Err(unsupported(reason.into()));
                        }
                        other => unreachable!("{other:?} after MAP_SYNC was accepted"),
                    },
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                        map_plain(choose(facts, MapSync::Refused), MapSync::Refused)?
                    }
                    Err(e) => return Err(io_err("mmap")(e)),
                }
            }
            other => map_plain(other, MapSync::NotTried)?,
        };
        prepare_mapping(path, base, len, created, is_devdax);
        let flush = cpu_flush::detect();
        log::info!(
            "{}: mapped {} bytes, persistence {}{}",
            path.display(),
            size,
            persistence,
            if persistence == Persistence::Pmem {
                format!(" ({flush:?})")
            } else {
                String::new()
            }
        );
        Ok(MappedMedia {
            base,
            len: size,
            persistence,
            flush,
            path: path.to_path_buf(),
            file,
        })
    }

    /// The path this media was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`Media::write_and_persist`] of `data` with the copy method `how` instead of the one
    /// its length picks (for the benchmark comparing them, and tests). `how` matters in pmem
    /// mode only.
    pub fn write_and_persist_with(
        &self,
        how: PmemCopy,
        offset: u64,
        data: &[u8],
    ) -> Result<(), MediaError> {
        // SAFETY: `data` is a live slice; concurrent writers use disjoint ranges (the contract
        // of every caller of this type, as for `Media::write`).
        unsafe { self.copy_in(how, offset, data.as_ptr(), data.len()) }
    }

    /// # Safety
    /// As [`Media::write_and_persist`].
    unsafe fn copy_in(
        &self,
        how: PmemCopy,
        offset: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), MediaError> {
        check_range(offset, len as u64, self.len)?;
        if self.persistence != Persistence::Pmem {
            // SAFETY: as the default method, whose work this is.
            return unsafe { super::copy_then_persist(self, offset, src, len) };
        }
        // SAFETY: the range was bounds-checked against the live mapping; the caller guarantees
        // `src` and that nothing else accesses the range.
        unsafe {
            pmem_copy::copy_and_write_back(
                how,
                self.flush,
                self.base.add(offset as usize),
                src,
                len,
            )
        };
        Ok(())
    }

    /// Make the page runs `runs` (ascending, inside the mapping) durable with one device
    /// flush: the writes of every run are started together (`sync_file_range`), those of all
    /// but the last waited for, and the `msync` of the last waits for it and flushes the
    /// device once for all. One `msync` over their span would also write every dirty page
    /// between them: with two data heads, the folio one of them is still filling, which is
    /// then written again after its next write.
    fn sync(&self, runs: &[(usize, usize)]) -> Result<(), MediaError> {
        let base = self.base as usize;
        let Some((&last, rest)) = runs.split_last() else {
            return Ok(());
        };
        let failed = |(s, e): (usize, usize)| MediaError::Msync {
            offset: (s - base) as u64,
            len: (e - s) as u64,
            source: io::Error::last_os_error(),
        };
        let msync = |(s, e): (usize, usize)| {
            // SAFETY: [s, e) is page-aligned and inside this live mapping.
            match unsafe { libc::msync(s as *mut libc::c_void, e - s, libc::MS_SYNC) } {
                0 => Ok(()),
                _ => Err(failed((s, e))),
            }
        };
        let range = |(s, e): (usize, usize), flags| {
            // SAFETY: sync_file_range on the mapped file's fd; no memory is passed.
            let rc = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    (s - base) as libc::off64_t,
                    (e - s) as libc::off64_t,
                    flags,
                )
            };
            rc == 0
        };
        if !rest.is_empty() {
            for &run in runs {
                range(run, libc::SYNC_FILE_RANGE_WRITE);
            }
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            for &run in rest {
                // Where the file cannot do that (not a regular file): an msync of its own.
                if !range(run, wait) {
                    msync(run)?;
                }
            }
        }
        msync(last)
    }

    fn map_end(&self) -> usize {
        let page = msync::page_size();
        (self.base as usize + self.len as usize + page - 1) & !(page - 1)
    }
}

/// Warn when the chosen persistence is weaker than its name suggests.
fn warn_weaker(path: &Path, persistence: Persistence, map_sync: MapSync) {
    match persistence {
        Persistence::Volatile => log::warn!(
            "{}: volatile persistence requested: cache contents will not survive a power loss \
             or kernel crash",
            path.display()
        ),
        Persistence::Pmem if map_sync == MapSync::Refused => log::warn!(
            "{}: {EMULATE_PMEM_ENV} is set: pmem mode on a mapping without MAP_SYNC; CPU cache \
             flushes survive a process crash but not a power loss (for testing the pmem code \
             path only)",
            path.display()
        ),
        _ => {}
    }
}

/// Open the media; for an ordinary file, create it when asked and allocate every block of it.
/// Returns whether the file was created here.
fn open_target(path: &Path, create_size: Option<u64>) -> Result<(File, Target, bool), MediaError> {
    let io_err = |what: &'static str, source: io::Error| MediaError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    let exists = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create_size.is_some() && !exists)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("open", e))?;
    let meta = file.metadata().map_err(|e| io_err("stat", e))?;
    if meta.file_type().is_char_device() {
        let rdev = meta.rdev();
        // SAFETY: major/minor are pure arithmetic on the device number.
        #[allow(unused_unsafe)]
        let (major, minor) = unsafe { (libc::major(rdev), libc::minor(rdev)) };
        let sys = format!("/sys/dev/char/{major}:{minor}/size");
        let text = std::fs::read_to_string(&sys).map_err(|e| io_err("read device DAX size", e))?;
        let size = text
            .trim()
            .parse::<u64>()
            .map_err(|_| MediaError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("{sys} holds {:?}, not a size", text.trim()),
            })?;
        return Ok((file, Target::DevDax { size }, false));
    }
    if !meta.file_type().is_file() {
        return Err(MediaError::Unsupported {
            path: path.to_path_buf(),
            reason: "not a regular file or a device DAX character device".into(),
        });
    }
    let mut size = meta.len();
    let mut created = false;
    if size == 0 {
        if let Some(want) = create_size {
            file.set_len(want).map_err(|e| io_err("set size", e))?;
            size = want;
            created = true;
        }
    } else if let Some(want) = create_size {
        if want != size {
            log::warn!(
                "{}: existing file of {size} bytes kept; requested size {want} ignored",
                path.display()
            );
        }
    }
    if size > 0 {
        if let Err(e) = preallocate(&file, path, size) {
            if created {
                // Leave nothing behind: the file was empty or missing before.
                let _ = file.set_len(0);
                if !exists {
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(e);
        }
    }
    Ok((file, Target::File { size }, created))
}

/// Give every byte of the file a block now, so that a full host file system is an error here
/// and never a SIGBUS later, when a guest write first touches a hole of the mapping. Blocks
/// already allocated are left as they are (contents never change).
fn preallocate(file: &File, path: &Path, size: u64) -> Result<(), MediaError> {
    let fd = file.as_raw_fd();
    let len = libc::off_t::try_from(size).map_err(|_| MediaError::Unsupported {
        path: path.to_path_buf(),
        reason: "media too large".into(),
    })?;
    // SAFETY: fallocate on an fd this function borrows; no memory is passed.
    let rc = unsafe { libc::fallocate(fd, 0, 0, len) };
    let err = if rc == 0 {
        return Ok(());
    } else {
        io::Error::last_os_error()
    };
    let err = if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // File systems without fallocate: the C library allocates by writing each block.
        // SAFETY: as above.
        match unsafe { libc::posix_fallocate(fd, 0, len) } {
            0 => return Ok(()),
            code => io::Error::from_raw_os_error(code),
        }
    } else {
        err
    };
    if err.raw_os_error() == Some(libc::ENOSPC) {
        return Err(MediaError::NoSpace {
            path: path.to_path_buf(),
            size,
        });
    }
    Err(MediaError::Io {
        path: path.to_path_buf(),
        what: "allocate the cache file's blocks",
        source: err,
    })
}

/// Fault the whole mapping in once, so no guest write pays a page fault, and ask for
/// transparent huge pages where the media allows them. Failures only cost speed: logged.
///
/// A file created here is populated for writing (its pages become dirty zeroes that the kernel
/// writes back once, which also turns preallocated extents into written ones, so later msyncs
/// write data only). An existing file is populated for reading: marking all of it dirty would
/// make the kernel write the whole cache back again at every start. A file larger than half
/// the machine's memory is not populated at all (the page cache could not hold it).
fn prepare_mapping(path: &Path, base: *mut u8, len: usize, created: bool, is_devdax: bool) {
    // SAFETY: base/len describe a live mapping made by `map`; madvise changes no contents.
    let advise = |advice| unsafe { libc::madvise(base.cast(), len, advice) };
    if !is_devdax && advise(libc::MADV_HUGEPAGE) != 0 {
        log::debug!(
            "{}: no transparent huge pages on this mapping: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
    if len as u64 > total_memory() / 2 {
        log::info!(
            "{}: {len} bytes is more than half the memory; the mapping is faulted in on use",
            path.display()
        );
        return;
    }
    let (advice, how) = if created {
        (libc::MADV_POPULATE_WRITE, "write")
    } else {
        (libc::MADV_POPULATE_READ, "read")
    };
    if advise(advice) != 0 {
        log::warn!(
            "{}: populating the mapping ({how}) failed, pages fault in on first use: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
}

fn total_memory() -> u64 {
    // SAFETY: sysinfo fills the struct it is given and reads nothing else.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) == 0 {
            info.totalram as u64 * info.mem_unit as u64
        } else {
            u64::MAX
        }
    }
}

fn map(file: &File, len: usize, flags: libc::c_int) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping at a kernel-chosen address; it aliases nothing in this process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

fn unmap(base: *mut u8, len: usize) {
    // SAFETY: base/len describe a mapping made by `map` that nothing references any more.
    unsafe { libc::munmap(base.cast(), len) };
}

impl Drop for MappedMedia {
    fn drop(&mut self) {
        unmap(self.base, self.len as usize);
    }
}

impl Media for MappedMedia {
    fn len(&self) -> u64 {
        self.len
    }

    fn persistence(&self) -> Persistence {
        self.persistence
    }

    fn persist(&self, offset: u64, len: u64) -> Result<(), MediaError> {
        check_range(offset, len, self.len)?;
        let start = self.base as usize + offset as usize;
        match self.persistence {
            // SAFETY: the range was bounds-checked against the live mapping.
            Persistence::Pmem => unsafe {
                cpu_flush::write_back(self.flush, start as *const u8, len as usize)
            },
            Persistence::Msync => msync::record(start, start + len as usize),
            Persistence::Volatile => {}
        }
        Ok(())
    }

    fn fence(&self) -> Result<(), MediaError> {
        match self.persistence {
            Persistence::Pmem => cpu_flush::store_fence(),
            Persistence::Msync => {
                msync::with_runs(self.base as usize, self.map_end(), |runs| self.sync(runs))?
            }
            Persistence::Volatile => {}
        }
        Ok(())
    }

    /// In msync mode, through the file (`pwrite`) instead of the mapping. A store through
    /// the mapping into a clean page makes the kernel mark the whole page-cache folio dirty
    /// (ext4's `page_mkwrite` dirties every block of it, and the mapping uses 2 MiB folios),
    /// so the msync after a 5 KiB kset or a 4 KiB record wrote up to 2 MiB. Written through
    /// the file, only the blocks written become dirty; the page cache is the same, so the
    /// mapping sees the bytes at once. Bulk data still goes through the mapping
    /// ([`Media::write_from`]): there a `pwrite` costs more CPU than the whole copy.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        if self.persistence != Persistence::Msync {
            return super::copy_in(self, offset, data);
        }
        check_range(offset, data.len() as u64, self.len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|source| MediaError::Io {
                path: self.path.clone(),
                what: "write",
                source,
            })
    }

    unsafe fn write_and_persist(
        &self,
        offset: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), MediaError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.copy_in(pmem_copy::method_for(len), offset, src, len) }
    }

    unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> Result<(), MediaError> {
        check_range(offset, len as u64, self.len)?;
        // SAFETY: the range was bounds-checked against the live mapping.
        let dst = unsafe { self.base.add(offset as usize) };
        if self.persistence == Persistence::Msync {
            // SAFETY: the caller guarantees `src` and that nothing else accesses the range.
            unsafe { pmem_copy::copy_streaming(dst, src, len) };
        } else {
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        }
        Ok(())
    }

    fn slice_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, MediaError> {
        check_range(offset, len, self.len)?;
        // SAFETY: offset is within the mapping (checked above).
        Ok(unsafe { self.base.add(offset as usize) })
    }
}
