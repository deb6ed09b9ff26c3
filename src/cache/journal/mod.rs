// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The process-kill journal: the keys of completed writes that still wait in open ksets, kept
//! where a restarted daemon finds them.
//!
//! In write-back mode a write completes once its data is in the cache media; its key waits
//! in an open kset in RAM until a FLUSH, a full kset or the kset timer writes it to the log.
//! The durability contract lets a power loss take such writes. A daemon restart is not a
//! power loss: the guest keeps running and expects every completed write. So each key is also
//! stored — plain memory stores, no sync, no fence — into a small shared mapping of a file in
//! a RAM file system (the service's runtime directory, else `/dev/shm`), which outlives the
//! process but not the host. A daemon restarted in the same boot finds there the keys the
//! log lacks; the data they name is still in the page cache (msync mode) or was persisted
//! before the write completed (pmem mode), so it applies them after replay and makes them
//! durable the normal way before it serves. After a reboot the journal's boot id no longer
//! matches and it is ignored, which leaves the power-loss contract exactly as it was.
//!
//! Why not write the open kset itself into the cache early? In msync mode the kernel may write
//! that page back before the data pages; after a power loss, replay would trust keys whose
//! data never arrived. The journal never reaches the cache media, so it cannot.
//!
//! Each open kset ("slot") has a ring of entries numbered from 0 by the order keys were
//! appended. The keys of the slot that are not on the log yet are always exactly the entries
//! from the slot's `committed` index to its next one (a close takes keys from the front and
//! puts unwritten ones back at the front). Around every kset it writes, the log stores:
//! before, each contributing slot's pending marker (that kset's sequence number and the index
//! its keys reach) and the journal's in-flight marker (sequence number and kset CRC); after,
//! `log_head` and each slot's `committed`. A kill between any two stores leaves enough to
//! tell whether that kset reached the log ([`recover`]).
//!
//! The ring is full when the oldest uncommitted entry would be overwritten: the key is then
//! not journaled (and neither is any later key of the slot until the log has passed it), and
//! the caller holds its write until its kset is on the log, as in write-through mode.

pub(in crate::cache) mod apply;
#[cfg(test)]
mod kill_points;
mod layout;
mod recover;
#[cfg(test)]
mod tests;
mod writer;

use std::path::{Path, PathBuf};

pub use layout::HeaderFault;
pub use recover::{recover, Identity, Ignored, LogEnd, Recovered};
pub use writer::Journal;

/// Entries per slot ring (256 KiB a slot). Comfortably above what a slot holds uncommitted in
/// steady state (an open kset closes at 128 keys; a writer closes it itself beyond 1024); a
/// fuller ring only holds writes back until the log catches up.
pub const DEFAULT_CAPACITY: u32 = 4096;

/// Where the kernel publishes the current boot's id.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The directory systemd creates for `RuntimeDirectory=` (kept across restarts with
/// `RuntimeDirectoryPreserve=yes`).
pub const RUNTIME_DIR_ENV: &str = "RUNTIME_DIRECTORY";

/// Used when not run by systemd with a runtime directory: RAM, per boot, always there.
pub const FALLBACK_DIR: &str = "/dev/shm";

/// Errors creating or reading a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the boot id from {BOOT_ID_PATH}")]
    BootIdUnreadable(#[source] std::io::Error),
    #[error("{BOOT_ID_PATH} holds {0:?}, not a boot id")]
    BootIdInvalid(String),
    #[error("journal {path}: {reason}")]
    Invalid { path: PathBuf, reason: HeaderFault },
}

/// The CRC field of an encoded kset (its first four bytes), which names it in the in-flight
/// marker.
pub fn kset_crc(kset: &[u8]) -> u32 {
    u32::from_le_bytes(kset[..4].try_into().expect("a kset header"))
}

/// The current boot's id.
pub fn boot_id() -> Result<[u8; 16], JournalError> {
    let text = std::fs::read_to_string(BOOT_ID_PATH).map_err(JournalError::BootIdUnreadable)?;
    parse_boot_id(&text).ok_or(JournalError::BootIdInvalid(text))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (with or without dashes, a trailing newline) as bytes.
pub fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(id)
}

/// The directory for journals: `$RUNTIME_DIRECTORY` (its first entry) when set, else
/// [`FALLBACK_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os(RUNTIME_DIR_ENV)
        .and_then(|v| {
            let first = v.to_string_lossy().split(':').next()?.to_string();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from(FALLBACK_DIR))
}

/// Which file holds a cache: its device and inode numbers. Copies of one cache file share its
/// id; two daemons serving such copies at once must not share a journal, or a killed one could
/// apply keys whose data only the other copy holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaFile {
    pub dev: u64,
    pub ino: u64,
}

impl MediaFile {
    /// The numbers of the cache media at `path` (a file, or a device node).
    pub fn of(path: &Path) -> std::io::Result<MediaFile> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(MediaFile {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// The journal of the cache with id `cache_id`, held in `media`, in `dir`.
pub fn path_in(dir: &Path, cache_id: &[u8; 16], media: MediaFile) -> PathBuf {
    let hex: String = cache_id.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!(
        "vhost-user-pcache-{hex}-{:x}-{:x}.journal",
        media.dev, media.ino
    ))
}

/// The bytes of the journal at `path`, if there is one.
pub fn read_previous(path: &Path) -> Result<Option<Vec<u8>>, JournalError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(JournalError::Io {
            path: path.to_path_buf(),
            what: "reading it",
            source,
        }),
    }
}

/// Tests: make the journal at `path` look written in the boot `boot_id`.
#[cfg(test)]
pub(crate) fn rewrite_boot_id_for_test(path: &Path, boot_id: [u8; 16]) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = layout::Header {
        boot_id,
        ..layout::Header::decode(&bytes).unwrap()
    };
    bytes[..layout::HEADER_LEN].copy_from_slice(&header.encode());
    std::fs::write(path, bytes).unwrap();
}
