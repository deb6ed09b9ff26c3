// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Thin wrappers over the system calls the backing layer needs beyond std: block device
//! ioctls, fallocate modes, statx alignment hints and an eventfd.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `STATX_DIOALIGN` (Linux 6.1): the O_DIRECT alignment of a file. Not exported by `libc`.
const STATX_DIOALIGN: u32 = 0x2000;

pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

pub(crate) fn block_device_logical_block_size(file: &File) -> io::Result<usize> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size as *mut _) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as usize)
}

/// The O_DIRECT alignment the file system reports for `file` (the larger of its offset and
/// memory alignment), or `None` when the kernel or file system does not say.
pub(crate) fn statx_dio_alignment(file: &File) -> Option<usize> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH stats the descriptor itself; `stx` is writable.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc < 0 || stx.stx_mask & STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    let align = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as usize;
    align.is_power_of_two().then_some(align)
}

/// fallocate modes that make a range read as zeroes, in order of preference. Block devices
/// accept the same modes: ZERO_RANGE is `blkdev_issue_zeroout`, PUNCH_HOLE is a zeroing unmap.
pub(crate) fn zeroing_modes(may_unmap: bool) -> &'static [i32] {
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    if may_unmap {
        &[PUNCH, ZERO]
    } else {
        &[ZERO]
    }
}

/// Whether a failed fallocate means "this mode is not available here" rather than a real error.
pub(crate) fn fallocate_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV | libc::ENOSYS
    )
}

#[cfg(any(test, feature = "test-util"))]
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate only reads its integer arguments.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// A non-blocking eventfd used as a "completions are ready" doorbell.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Make the fd readable. A full counter (EAGAIN) is already readable, so errors are moot.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`.
        unsafe { libc::write(self.raw(), (&one as *const u64).cast(), 8) };
    }

    /// Reset the counter so the fd is no longer readable.
    pub(crate) fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into `value`; EAGAIN (already clear) is fine.
        unsafe { libc::read(self.raw(), (&mut value as *mut u64).cast(), 8) };
    }

    /// Block until the fd is readable.
    pub(crate) fn wait_readable(&self) {
        let mut pfd = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; EINTR just returns early and the caller loops.
        unsafe { libc::poll(&mut pfd, 1, -1) };
    }
}
