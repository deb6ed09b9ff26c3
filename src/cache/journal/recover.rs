// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Deciding what a journal left by an earlier process may add to a replayed log.
//!
//! A pure function of the journal's bytes, who is asking (boot and cache), and where replay
//! ended the log: so every case is a unit test, without a daemon to kill.

use super::layout::{self, get_u64, EntryFault, Header, HeaderFault};
use crate::cache::format::{KeyFault, KeyRecord};

/// Who reads a journal: it applies only to the same boot (the page cache or DAX memory still
/// holds the data its keys name) and the same cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub boot_id: [u8; 16],
    pub cache_id: [u8; 16],
}

/// Where replay found the end of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEnd {
    /// Sequence number the next kset will carry.
    pub head_seq: u64,
    /// CRC field of the newest kset replayed (the one numbered `head_seq - 1`), if replay met
    /// any kset.
    pub newest_kset_crc: Option<u32>,
}

/// Why a journal is not applied. None of these loses anything the durability contract
/// promises: the journal only ever adds writes a power loss may lose.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not a journal this build can read: {0}")]
    Header(#[from] HeaderFault),
    #[error(
        "written before the last boot: the data its keys name may not have reached the cache media"
    )]
    OtherBoot,
    #[error("it belongs to another cache (id {0})")]
    OtherCache(String),
    #[error(
        "the log was written after it (its writer stopped at kset {journal}, the log ends before kset {log}): \
         its keys would be older than the log's"
    )]
    LogMoved { journal: u64, log: u64 },
    #[error("slot {slot} entry {index} holds an invalid key: {reason}")]
    BadEntry {
        slot: usize,
        index: u64,
        reason: EntryFault,
    },
}

/// What a journal adds: per slot, the keys that never reached the log, in append order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub slots: Vec<Vec<KeyRecord>>,
    /// Per slot, the entry index of its first key in `slots`.
    pub committed: Vec<u64>,
}

impl Recovered {
    pub fn key_count(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }
}

/// The keys of the journal file `bytes` that completed writes left out of the log, or why the
/// journal does not apply. `validate` checks a key as replay checks a kset's.
///
/// A slot's keys are those from its committed index on (moved forward by its pending marker
/// when the kset that marker names is on the log), up to the first entry that is missing,
/// torn or from an earlier lap of the ring. The journal applies only if nothing but its own
/// process wrote the log since: the log ends at the journal's `log_head`, or one kset later
/// when that kset is the one its in-flight marker names (same number, same CRC).
pub fn recover(
    bytes: &[u8],
    me: &Identity,
    log: &LogEnd,
    validate: &dyn Fn(&KeyRecord) -> Result<(), KeyFault>,
) -> Result<Recovered, Ignored> {
    let h = Header::decode(bytes)?;
    if h.boot_id != me.boot_id {
        return Err(Ignored::OtherBoot);
    }
    if h.cache_id != me.cache_id {
        return Err(Ignored::OtherCache(hex(&h.cache_id)));
    }
    let seed = h.seed();
    let journal_head = get_u64(bytes, layout::LOG_HEAD_AT);
    let inflight_seq = get_u64(bytes, layout::INFLIGHT_AT);
    let inflight =
        layout::decode_inflight(seed, inflight_seq, get_u64(bytes, layout::INFLIGHT_AT + 8));
    let own_log = log.head_seq == journal_head
        || (log.head_seq == journal_head.wrapping_add(1)
            && inflight_seq == journal_head
            && inflight.is_some()
            && inflight == log.newest_kset_crc);
    if !own_log {
        return Err(Ignored::LogMoved {
            journal: journal_head,
            log: log.head_seq,
        });
    }
    let mut out = Recovered::default();
    for slot in 0..h.n_slots as usize {
        let sseed = layout::slot_seed(seed, slot);
        let at = h.slot_at(slot);
        let mut first = get_u64(bytes, at + layout::COMMITTED_AT);
        let pseq = get_u64(bytes, at + layout::PENDING_SEQ_AT);
        let pupto = get_u64(bytes, at + layout::PENDING_UPTO_AT);
        let pcheck = layout::get_u32(bytes, at + layout::PENDING_CHECK_AT);
        if pcheck == layout::pending_check(sseed, pseq, pupto) && pseq < log.head_seq {
            // The kset the marker announced is on the log: the keys up to `upto` are there.
            first = first.max(pupto);
        }
        let mut keys = Vec::new();
        for index in first..first.saturating_add(h.capacity as u64) {
            let e = h.entry_at(slot, index);
            match layout::decode_entry(sseed, index, &bytes[e..e + layout::ENTRY_SIZE]) {
                None => break,
                Some(Ok(key)) => {
                    validate(&key).map_err(|fault| Ignored::BadEntry {
                        slot,
                        index,
                        reason: fault.into(),
                    })?;
                    keys.push(key);
                }
                Some(Err(reason)) => {
                    return Err(Ignored::BadEntry {
                        slot,
                        index,
                        reason,
                    })
                }
            }
        }
        out.slots.push(keys);
        out.committed.push(first);
    }
    Ok(out)
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
