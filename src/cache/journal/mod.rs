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

mod layout;
mod recover;
#[cfg(test)]
mod tests;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use super::format::KeyRecord;
use layout::Header;
pub use layout::HeaderFault;
pub use recover::{recover, Identity, Ignored, LogEnd, Recovered};

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

/// The journal of the cache with id `cache_id` in `dir`.
pub fn path_in(dir: &Path, cache_id: &[u8; 16]) -> PathBuf {
    let hex: String = cache_id.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("vhost-user-pcache-{hex}.journal"))
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

/// In-RAM state of one slot; see [`Journal::append`].
struct SlotState {
    /// Index the next key appended to the slot gets.
    next: AtomicU64,
    /// Lowest index that was not journaled and is not on the log yet; [`NO_GAP`] when none.
    gap: AtomicU64,
}

const NO_GAP: u64 = u64::MAX;

/// A journal being written by this process.
pub struct Journal {
    map: MmapMut,
    path: PathBuf,
    header: Header,
    seed: u32,
    slot_seeds: Vec<u32>,
    slots: Vec<SlotState>,
}

impl Journal {
    /// Create (or start over) the journal at `path` for `n_slots` open ksets, whose writer's
    /// log has `log_head` as next sequence number and holds every key so far.
    pub fn create(
        path: &Path,
        me: &Identity,
        n_slots: usize,
        capacity: u32,
        log_head: u64,
    ) -> Result<Journal, JournalError> {
        let header = Header {
            n_slots: n_slots as u32,
            capacity,
            boot_id: me.boot_id,
            cache_id: me.cache_id,
            nonce: random_u32(),
        };
        header
            .check_fields()
            .map_err(|reason| JournalError::Invalid {
                path: path.to_path_buf(),
                reason,
            })?;
        let io = |what| {
            move |source| JournalError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io("creating it"))?;
        // Emptied first, so no byte of an earlier journal stays (a kill until the header is
        // whole leaves a file that is not a journal, while the log holds every key).
        file.set_len(0).map_err(io("emptying it"))?;
        file.set_len(header.file_len() as u64)
            .map_err(io("sizing it"))?;
        // SAFETY: the file is this process's own (created or emptied just now, mode 0600, in
        // a directory of the service); nothing else writes it while the mapping lives. The
        // mapping is only accessed through atomics (see `words`).
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io("mapping it"))?;
        let seed = header.seed();
        let journal = Journal {
            map,
            path: path.to_path_buf(),
            header,
            seed,
            slot_seeds: (0..n_slots).map(|s| layout::slot_seed(seed, s)).collect(),
            slots: (0..n_slots)
                .map(|_| SlotState {
                    next: AtomicU64::new(0),
                    gap: AtomicU64::new(NO_GAP),
                })
                .collect(),
        };
        journal.store(layout::LOG_HEAD_AT, log_head);
        journal.store_bytes(0, &header.encode());
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The mapping as 8-byte words.
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned, its length (a multiple of 4096) is a multiple
        // of 8, and it lives as long as `self`; after `create` wrote nothing through `map`,
        // every access goes through these atomics, so no reference to it as plain bytes
        // exists while they are used.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.map.len() / 8)
        }
    }

    /// One aligned 8-byte store: a process kill leaves it whole or not at all.
    fn store(&self, at: usize, v: u64) {
        self.words()[at / 8].store(v.to_le(), Ordering::Relaxed);
    }

    fn load(&self, at: usize) -> u64 {
        u64::from_le(self.words()[at / 8].load(Ordering::Relaxed))
    }

    fn store_bytes(&self, at: usize, bytes: &[u8]) {
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            self.store(
                at + i * 8,
                u64::from_le_bytes(w.try_into().expect("8 bytes")),
            );
        }
    }

    /// Index of the oldest key of `slot` not on the log.
    pub fn committed(&self, slot: usize) -> u64 {
        self.load(self.header.slot_at(slot) + layout::COMMITTED_AT)
    }

    /// Record `key`, just appended to open kset `slot`. The caller serialises appends to one
    /// slot (the open kset's lock). False when the ring had no room: the key is not journaled
    /// and its write must be held until its kset is on the log.
    pub fn append(&self, slot: usize, key: &KeyRecord) -> bool {
        let st = &self.slots[slot];
        let index = st.next.load(Ordering::Relaxed);
        st.next.store(index + 1, Ordering::Relaxed);
        let committed = self.committed(slot);
        let mut gap = st.gap.load(Ordering::Relaxed);
        if gap != NO_GAP && committed > gap {
            gap = NO_GAP;
            st.gap.store(NO_GAP, Ordering::Relaxed);
        }
        // Recovery stops at the first missing entry, so after one key that could not be
        // journaled no later key of the slot may count as journaled until the log passed it.
        if gap != NO_GAP || index >= committed + self.header.capacity as u64 {
            if gap == NO_GAP {
                st.gap.store(index, Ordering::Relaxed);
            }
            return false;
        }
        let entry = layout::encode_entry(self.slot_seeds[slot], index, key);
        let at = self.header.entry_at(slot, index);
        // The index word last: until it is stored the ring position still names the entry
        // of an earlier lap, so a kill in between leaves no entry that claims this index.
        self.store_bytes(at + 8, &entry[8..]);
        self.store_bytes(at, &entry[..8]);
        true
    }

    /// The log is about to write kset `seq` (CRC field `kset_crc`); `slots` lists each slot
    /// whose keys it holds with the index just past its last one there.
    pub fn kset_writing(&self, seq: u64, kset_crc: u32, slots: &[(usize, u64)]) {
        for &(slot, upto) in slots {
            let at = self.header.slot_at(slot);
            self.store(at + layout::PENDING_SEQ_AT, seq);
            self.store(at + layout::PENDING_UPTO_AT, upto);
            let check = layout::pending_check(self.slot_seeds[slot], seq, upto);
            self.store(at + layout::PENDING_CHECK_AT, check as u64);
        }
        self.store(layout::INFLIGHT_AT, seq);
        self.store(
            layout::INFLIGHT_AT + 8,
            layout::inflight_word(self.seed, seq, kset_crc),
        );
    }

    /// Kset `seq` announced by [`Journal::kset_writing`] is on the log.
    pub fn kset_written(&self, seq: u64, slots: &[(usize, u64)]) {
        self.store(layout::LOG_HEAD_AT, seq + 1);
        for &(slot, upto) in slots {
            self.store(self.header.slot_at(slot) + layout::COMMITTED_AT, upto);
        }
    }

    /// Kset writing failed: the keys of `slots` stay open, and the sequence number the
    /// pending markers name will be reused for another kset.
    pub fn kset_failed(&self, slots: &[usize]) {
        for &slot in slots {
            self.store(self.header.slot_at(slot) + layout::PENDING_SEQ_AT, u64::MAX);
        }
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Only the distinctness of journals at one path depends on it, and the file is
        // emptied before each journal anyway.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() ^ std::process::id();
    }
    u32::from_le_bytes(b)
}
