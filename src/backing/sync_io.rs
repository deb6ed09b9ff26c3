// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Synchronous I/O on a backing image, for tests that set up or check an image around the
//! engine. The daemon and the tools go through [`super::BackingQueue`]; this is built for this
//! crate's tests and with the `test-util` feature only.

use std::io;
use std::os::unix::fs::FileExt;

use super::bounce::{align_down, align_up, next_zero_chunk_end, AlignedBuf, ZERO_CHUNK};
use super::sys;
use super::BackingImage;

impl BackingImage {
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let align = self.io_align();
        let (start, end) = (
            align_down(offset, align),
            align_up(offset + buf.len() as u64, align),
        );
        if start == offset && end == offset + buf.len() as u64 && aligned_mem(buf, align) {
            return self.file.read_exact_at(buf, offset);
        }
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, align);
        self.file.read_exact_at(bounce.as_mut_slice(), start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.write_checked(offset, buf, true)
    }

    /// `write_at` after its checks; `lock` false when the caller holds the aligned range.
    fn write_checked(&self, offset: u64, buf: &[u8], lock: bool) -> io::Result<()> {
        let align = self.io_align();
        let (start, end) = (
            align_down(offset, align),
            align_up(offset + buf.len() as u64, align),
        );
        if start == offset && end == offset + buf.len() as u64 {
            if aligned_mem(buf, align) {
                return self.file.write_all_at(buf, offset);
            }
            let mut bounce = AlignedBuf::zeroed(buf.len(), align);
            bounce.as_mut_slice().copy_from_slice(buf);
            return self.file.write_all_at(bounce.as_slice(), offset);
        }
        if lock {
            self.rmw_locks.lock_blocking(start, end);
        }
        let result = (|| {
            let mut bounce = AlignedBuf::zeroed((end - start) as usize, align);
            self.file.read_exact_at(bounce.as_mut_slice(), start)?;
            let skip = (offset - start) as usize;
            bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
            self.file.write_all_at(bounce.as_slice(), start)
        })();
        if lock {
            self.rmw_locks.unlock(start, end);
        }
        result
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // A read-modify-write of a block this zeroing touches would write the block's old
        // bytes back over the zeroes: hold the aligned range, as those cycles do.
        let align = self.io_align();
        let (start, end) = (align_down(offset, align), align_up(offset + len, align));
        self.rmw_locks.lock_blocking(start, end);
        let result = self.zero_locked(offset, len, may_unmap);
        self.rmw_locks.unlock(start, end);
        result
    }

    fn zero_locked(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        for &mode in sys::zeroing_modes(may_unmap) {
            match sys::fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error().is_some_and(sys::fallocate_unsupported) => continue,
                Err(e) => return Err(e),
            }
        }
        let zeroes = AlignedBuf::zeroed(ZERO_CHUNK, self.alignment.max(self.io_align()));
        let (mut cursor, end) = (offset, offset + len);
        while cursor < end {
            let next = next_zero_chunk_end(cursor, end, self.io_align());
            self.write_checked(
                cursor,
                &zeroes.as_slice()[..(next - cursor) as usize],
                false,
            )?;
            cursor = next;
        }
        Ok(())
    }

    /// Tell the image `len` bytes at `offset` are unused; they read as zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
}

fn aligned_mem(buf: &[u8], align: usize) -> bool {
    (buf.as_ptr() as usize) % align == 0
}
