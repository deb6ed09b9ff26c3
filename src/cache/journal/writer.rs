// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`Journal`]: the journal file as this process writes it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use super::layout::{self, Header};
use super::{Identity, JournalError, Recovered};
use crate::cache::format::KeyRecord;

/// In-RAM state of one slot; see [`Journal::append`].
struct SlotState {
    /// Index the next key appended to the slot gets.
    next: AtomicU64,
    /// Lowest index that was not journaled and is not on the log yet; [`NO_GAP`] when none.
    gap: AtomicU64,
}

const NO_GAP: u64 = u64::MAX;

/// What this process does with the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Its own journal: every key appended is recorded.
    Live,
    /// An earlier process's journal whose keys are being applied: its entries stay as they
    /// are (a kill now makes the next start apply them again), only the log markers move, so
    /// that the ksets the applying writes are recognised as this journal's own.
    Applying,
}

/// A journal file mapped by this process.
pub struct Journal {
    map: MmapMut,
    /// Where the journal is (or, before [`Journal::publish`], will be).
    path: PathBuf,
    header: Header,
    seed: u32,
    slot_seeds: Vec<u32>,
    slots: Vec<SlotState>,
    mode: Mode,
    /// Tests: called with the whole file after every store (a kill could come right then).
    #[cfg(test)]
    store_hook: Option<StoreHook>,
}

#[cfg(test)]
pub(super) type StoreHook = Box<dyn Fn(Vec<u8>) + Send + Sync>;

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { path, what, source }
}

/// The name a new journal is built under before [`Journal::publish`] renames it.
fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

impl Journal {
    /// A new, empty journal for `n_slots` open ksets whose writer's log holds every key so far
    /// and has `log_head` as next sequence number. It is built beside `path`, so the journal
    /// there stays whole until [`Journal::publish`] replaces it.
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
        let staging = staging_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&staging)
            .map_err(io_err(&staging, "creating it"))?;
        // Emptied first, so no byte of an earlier file stays.
        file.set_len(0).map_err(io_err(&staging, "emptying it"))?;
        file.set_len(header.file_len() as u64)
            .map_err(io_err(&staging, "sizing it"))?;
        let journal = Journal::map(file, &staging, header, Mode::Live)?;
        journal.store(layout::LOG_HEAD_AT, log_head);
        journal.store_bytes(0, &header.encode());
        Ok(Journal {
            path: path.to_path_buf(),
            ..journal
        })
    }

    /// Make this new journal the one at its path (an atomic rename over the previous one).
    pub fn publish(&self) -> Result<(), JournalError> {
        std::fs::rename(staging_path(&self.path), &self.path)
            .map_err(io_err(&self.path, "putting it in place"))
    }

    /// Take over the journal at `path`, whose keys `recovered` (from [`super::recover`] on
    /// its bytes) are being applied: each slot's committed index is set to where the applied
    /// keys start, and its pending marker cleared, so that the ksets the applying writes
    /// cannot be mistaken for the ones those markers announced.
    pub fn resume(path: &Path, recovered: &Recovered) -> Result<Journal, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "opening it"))?;
        let mut head = vec![0u8; layout::PAGE];
        std::io::Read::read_exact(&mut &file, &mut head).map_err(io_err(path, "reading it"))?;
        let len = file.metadata().map_err(io_err(path, "reading it"))?.len();
        let header = Header::decode_page(&head, len).map_err(|reason| JournalError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        let journal = Journal::map(file, path, header, Mode::Applying)?;
        for (slot, &first) in recovered.committed.iter().enumerate() {
            if slot < journal.slots.len() {
                let at = header.slot_at(slot);
                journal.store(at + layout::COMMITTED_AT, first);
                journal.store(at + layout::PENDING_SEQ_AT, u64::MAX);
            }
        }
        Ok(journal)
    }

    fn map(file: File, path: &Path, header: Header, mode: Mode) -> Result<Journal, JournalError> {
        // SAFETY: the file is this process's own (a daemon holds the lock on its cache, and
        // the journal is named by the cache), mode 0600 in a directory of the service; nothing
        // else writes it while the mapping lives. The mapping is only accessed through
        // atomics (see `words`).
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(path, "mapping it"))?;
        let seed = header.seed();
        let n = header.n_slots as usize;
        Ok(Journal {
            map,
            path: path.to_path_buf(),
            header,
            seed,
            slot_seeds: (0..n).map(|s| layout::slot_seed(seed, s)).collect(),
            slots: (0..n)
                .map(|_| SlotState {
                    next: AtomicU64::new(0),
                    gap: AtomicU64::new(NO_GAP),
                })
                .collect(),
            mode,
            #[cfg(test)]
            store_hook: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Remove the journal file: the log holds every key (clean shutdown).
    pub fn remove(&self) -> Result<(), JournalError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(&self.path, "removing it")(e))
            }
            _ => Ok(()),
        }
    }

    /// The mapping as 8-byte words.
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned, its length (a multiple of 4096) is a multiple
        // of 8, and it lives as long as `self`; nothing accesses it other than through these
        // atomics, so no reference to it as plain bytes exists while they are used.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.map.len() / 8)
        }
    }

    /// One aligned 8-byte store: a process kill leaves it whole or not at all.
    fn store(&self, at: usize, v: u64) {
        self.words()[at / 8].store(v.to_le(), Ordering::Relaxed);
        #[cfg(test)]
        if let Some(hook) = &self.store_hook {
            let words = self.words().iter();
            hook(
                words
                    .flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes())
                    .collect(),
            );
        }
    }

    #[cfg(test)]
    pub(super) fn set_store_hook(&mut self, hook: Option<StoreHook>) {
        self.store_hook = hook;
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

    /// Index of the oldest key of `slot` not on the log (0 while applying: the applying
    /// process's open ksets are not this journal's slots).
    pub fn committed(&self, slot: usize) -> u64 {
        if self.mode == Mode::Applying || slot >= self.slots.len() {
            return 0;
        }
        self.load(self.header.slot_at(slot) + layout::COMMITTED_AT)
    }

    /// Record `key`, just appended to open kset `slot`. The caller serialises appends to one
    /// slot (the open kset's lock). False when the ring had no room: the key is not journaled
    /// and its write must be held until its kset is on the log.
    pub fn append(&self, slot: usize, key: &KeyRecord) -> bool {
        if self.mode == Mode::Applying {
            // The key being applied is this journal's own entry.
            return true;
        }
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
        if self.mode == Mode::Live {
            for &(slot, upto) in slots {
                let at = self.header.slot_at(slot);
                self.store(at + layout::PENDING_SEQ_AT, seq);
                self.store(at + layout::PENDING_UPTO_AT, upto);
                let check = layout::pending_check(self.slot_seeds[slot], seq, upto);
                self.store(at + layout::PENDING_CHECK_AT, check as u64);
            }
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
        if self.mode == Mode::Live {
            for &(slot, upto) in slots {
                self.store(self.header.slot_at(slot) + layout::COMMITTED_AT, upto);
            }
        }
    }

    /// Kset writing failed: the keys of `slots` stay open, and the sequence number the
    /// pending markers name will be reused for another kset.
    pub fn kset_failed(&self, slots: &[usize]) {
        if self.mode == Mode::Live {
            for &slot in slots {
                self.store(self.header.slot_at(slot) + layout::PENDING_SEQ_AT, u64::MAX);
            }
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
