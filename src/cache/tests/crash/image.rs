// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Crash images to reopen, made cheaply: the durable image of a cut is written once to an
//! in-memory file, and each image is a private copy-on-write mapping of it with the image's
//! non-durable lines applied. Only the pages an image changes, or the reopened engine writes,
//! are ever copied.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use memmap2::{MmapMut, MmapOptions};

use crate::cache::media::{
    check_range, CrashChoice, Media, MediaError, PendingLines, Persistence, RecordingMedia,
};

/// The durable image of one cut, in an in-memory file reused from cut to cut.
pub struct DurableFile {
    file: File,
    len: u64,
}

impl DurableFile {
    pub fn new() -> DurableFile {
        // SAFETY: a plain syscall with a valid NUL-terminated name; the returned descriptor is
        // owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"pcache-crash-image".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        DurableFile { file, len: 0 }
    }

    /// Take `media`'s durable image.
    pub fn capture(&mut self, media: &RecordingMedia) {
        media.with_durable(|d| {
            self.file.set_len(d.len() as u64).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&self.file, d, 0).unwrap();
            self.file.flush().unwrap();
            self.len = d.len() as u64;
        });
    }

    /// The crash image `choice` picks, as a media of its own.
    pub fn image(&self, pending: &PendingLines, choice: CrashChoice) -> ImageMedia {
        // SAFETY: a private mapping: nothing else maps the file while it is in use (the next
        // capture happens after every image of this cut is dropped) and writes stay private.
        let mut map = unsafe {
            MmapOptions::new()
                .len(self.len as usize)
                .map_copy(&self.file)
        }
        .expect("mapping a crash image");
        pending.apply(choice, &mut map);
        ImageMedia::new(map)
    }
}

/// A crash image as a media to reopen: nothing is recorded, since the reopened engine is only
/// read and never crashed again.
pub struct ImageMedia {
    base: *mut u8,
    len: u64,
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, owned by this object; concurrent access to the bytes
// follows the Media contract (disjoint ranges), as on any mapping.
unsafe impl Send for ImageMedia {}
// SAFETY: as above.
unsafe impl Sync for ImageMedia {}

impl ImageMedia {
    /// Wrap a mapping as a media; also used to reopen an image the corrupt-media tests made.
    pub fn new(mut map: MmapMut) -> ImageMedia {
        ImageMedia {
            base: map.as_mut_ptr(),
            len: map.len() as u64,
            _map: map,
        }
    }

    /// An anonymous mapping holding `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> ImageMedia {
        let mut map = MmapMut::map_anon(bytes.len()).expect("anonymous mapping");
        map.copy_from_slice(bytes);
        ImageMedia::new(map)
    }
}

impl Media for ImageMedia {
    fn len(&self) -> u64 {
        self.len
    }

    fn persistence(&self) -> Persistence {
        Persistence::Pmem
    }

    fn persist(&self, offset: u64, len: u64) -> Result<(), MediaError> {
        check_range(offset, len, self.len)
    }

    fn fence(&self) -> Result<(), MediaError> {
        Ok(())
    }

    fn slice_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, MediaError> {
        check_range(offset, len, self.len)?;
        // SAFETY: offset is inside the mapping (checked above).
        Ok(unsafe { self.base.add(offset as usize) })
    }
}
