// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Exclusive ownership of a cache media or a backing image by one process.
//!
//! Two daemons on one cache, or a daemon and an offline tool, would each replay, write and
//! garbage-collect the same log and destroy it; two daemons on one image would interleave
//! writeback. So `serve` and every offline tool take an exclusive, non-blocking `flock` on the
//! cache media and on the backing image before opening them, and hold it until they exit.
//!
//! `flock` rather than POSIX record locks: a POSIX lock belongs to the process and vanishes
//! when *any* descriptor of the file is closed, and the media and image layers open their own
//! descriptors. A `flock` belongs to the one open file description held by [`PathLock`], and
//! the kernel drops it when the process dies, so a crashed daemon never leaves a stale lock.
//! The holder's pid, when the kernel reports it, comes from `/proc/locks`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a path is, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockedObject {
    CacheMedia,
    BackingImage,
}

impl LockedObject {
    fn name(self) -> &'static str {
        match self {
            LockedObject::CacheMedia => "cache media",
            LockedObject::BackingImage => "backing image",
        }
    }
}

impl std::fmt::Display for LockedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{what} {path} is in use by {}: another vhost-user-pcache daemon or tool holds its \
         lock; stop that process first (two users of one {what} would corrupt it)",
        holder_text(*.holder)
    )]
    Held {
        what: LockedObject,
        path: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock {what} {path}")]
    Io {
        what: LockedObject,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!("process pid {pid}"),
        None => "another process (pid unknown)".into(),
    }
}

/// An exclusive lock on a path, released when dropped or when the process exits.
#[derive(Debug)]
pub struct PathLock {
    path: PathBuf,
    _file: File,
}

impl PathLock {
    /// Lock `path` exclusively without waiting. With `create`, a missing path is created as an
    /// empty file (which the media layer later sizes), so a new cache is locked before it is
    /// formatted.
    pub fn acquire(path: &Path, what: LockedObject, create: bool) -> Result<PathLock, LockError> {
        let io_err = |source| LockError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        // Read access is enough for flock, and works for read-only images and devices.
        let file = OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockError::Held {
                    what,
                    path: path.to_path_buf(),
                    holder: file.metadata().ok().and_then(|m| holder_pid(&m)),
                });
            }
            return Err(io_err(err));
        }
        Ok(PathLock {
            path: path.to_path_buf(),
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid of a process holding a lock on the file `meta` describes, from `/proc/locks`.
fn holder_pid(meta: &std::fs::Metadata) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    find_holder(&text, meta.dev(), meta.ino())
}

/// Parse `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 8123 fe:00:5652518 0 EOF`
/// (lines for waiters start with `->` and are skipped) for a lock on device `dev`, inode `ino`.
fn find_holder(proc_locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    proc_locks
        .lines()
        .filter(|l| !l.contains("->"))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let id = fields.iter().position(|f| *f == want)?;
            fields.get(id.checked_sub(1)?)?.parse().ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_one_file_is_refused_with_the_path_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let first = PathLock::acquire(&path, LockedObject::CacheMedia, true).unwrap();
        assert!(path.exists(), "created for locking");
        let err = PathLock::acquire(&path, LockedObject::CacheMedia, false).unwrap_err();
        match &err {
            LockError::Held {
                path: p, holder, ..
            } => {
                assert_eq!(p, &path);
                assert_eq!(*holder, Some(std::process::id()));
            }
            other => panic!("unexpected {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        PathLock::acquire(&path, LockedObject::CacheMedia, false).expect("free again");
    }

    #[test]
    fn a_missing_path_is_not_created_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.img");
        let err = PathLock::acquire(&path, LockedObject::BackingImage, false).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn proc_locks_parsing_finds_the_holder_of_the_inode() {
        let dev = libc::makedev(0xfe, 0) as u64;
        let text = "1: FLOCK  ADVISORY  WRITE 8123 fe:00:5652518 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 9999 fe:00:77 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 7111 fe:00:77 0 EOF\n";
        assert_eq!(find_holder(text, dev, 5652518), Some(8123));
        assert_eq!(find_holder(text, dev, 77), Some(7111));
        assert_eq!(find_holder(text, dev, 78), None);
        assert_eq!(find_holder("garbage\n", dev, 77), None);
    }
}
