// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The journal's format and its apply-or-ignore decision. A "kill" here is reading the file
//! while the writer still has it mapped: what a new process would find.

use super::layout::{self, Header, HeaderFault};
use super::*;
use crate::cache::format::{KeyFault, KeyRecord};

const BOOT: [u8; 16] = [7; 16];
const CACHE: [u8; 16] = [9; 16];
const ME: Identity = Identity {
    boot_id: BOOT,
    cache_id: CACHE,
};
/// Next kset number of the log when the journal was created.
const HEAD: u64 = 40;
/// The cache file the journals of these tests belong to.
pub(super) const MEDIA: MediaFile = MediaFile {
    dev: 0x803,
    ino: 0x2a,
};

fn key(n: u64) -> KeyRecord {
    KeyRecord {
        off: n * 4096,
        len: 4096,
        flags: 0,
        seg: 3,
        seg_off: (n as u32 % 1000) * 4096,
        gen: 2,
        data_crc: 0,
    }
}

fn any_key(_: &KeyRecord) -> Result<(), KeyFault> {
    Ok(())
}

fn journal(dir: &tempfile::TempDir, slots: usize, capacity: u32) -> Journal {
    let j = Journal::create(
        &path_in(dir.path(), &CACHE, MEDIA),
        &ME,
        slots,
        capacity,
        HEAD,
    )
    .unwrap();
    j.publish().unwrap();
    j
}

fn killed(j: &Journal) -> Vec<u8> {
    read_previous(j.path()).unwrap().expect("the journal file")
}

fn log_at(head_seq: u64) -> LogEnd {
    LogEnd {
        head_seq,
        newest_kset_crc: Some(0x1234_5678),
    }
}

fn recovered(bytes: &[u8], log: &LogEnd) -> Vec<Vec<KeyRecord>> {
    recover(bytes, &ME, log, &any_key).unwrap().slots
}

#[test]
fn completed_keys_come_back_in_order_per_slot() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 2, 64);
    for n in 0..10 {
        assert!(j.append((n % 2) as usize, &key(n)));
    }
    let got = recovered(&killed(&j), &log_at(HEAD));
    let want: Vec<Vec<_>> = (0..2)
        .map(|s| (0..10).filter(|n| n % 2 == s).map(key).collect())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_fresh_journal_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 3, 64);
    let r = recover(&killed(&j), &ME, &log_at(HEAD), &any_key).unwrap();
    assert_eq!(r.slots.len(), 3);
    assert_eq!(r.key_count(), 0);
}

#[test]
fn another_boot_or_cache_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, 64);
    j.append(0, &key(1));
    let bytes = killed(&j);
    let rebooted = Identity {
        boot_id: [8; 16],
        ..ME
    };
    assert_eq!(
        recover(&bytes, &rebooted, &log_at(HEAD), &any_key),
        Err(Ignored::OtherBoot)
    );
    rewrite_boot_id_for_test(j.path(), [8; 16]);
    let rewritten = killed(&j);
    assert_eq!(
        recover(&rewritten, &ME, &log_at(HEAD), &any_key),
        Err(Ignored::OtherBoot)
    );
    let other = Identity {
        cache_id: [1; 16],
        ..ME
    };
    assert!(matches!(
        recover(&bytes, &other, &log_at(HEAD), &any_key),
        Err(Ignored::OtherCache(_))
    ));
}

#[test]
fn keys_of_a_written_kset_are_not_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 2, 64);
    for n in 0..6 {
        j.append(0, &key(n));
    }
    j.append(1, &key(100));
    // Kset 40 takes slot 0's first four keys and slot 1's key.
    let crc = 0xabcd_0001;
    j.kset_writing(HEAD, crc, &[(0, 4), (1, 1)]);
    let before_write = killed(&j);
    // Killed before the kset reached the media: the log still ends at 40, all keys apply.
    let all = recovered(&before_write, &log_at(HEAD));
    assert_eq!(all[0], (0..6).map(key).collect::<Vec<_>>());
    assert_eq!(all[1], vec![key(100)]);

    // Killed after the kset reached the media, before anything else was stored: replay found
    // kset 40 with the announced CRC, so its keys are on the log.
    let written = LogEnd {
        head_seq: HEAD + 1,
        newest_kset_crc: Some(crc),
    };
    let rest = recovered(&before_write, &written);
    assert_eq!(rest[0], vec![key(4), key(5)]);
    assert!(rest[1].is_empty());

    // Between log_head and the committed indexes, and after both.
    j.kset_written(HEAD, &[]);
    assert_eq!(recovered(&killed(&j), &log_at(HEAD + 1)), rest);
    j.kset_written(HEAD, &[(0, 4), (1, 1)]);
    assert_eq!(recovered(&killed(&j), &log_at(HEAD + 1)), rest);
    assert_eq!((j.committed(0), j.committed(1)), (4, 1));
}

#[test]
fn a_log_written_by_someone_else_ignores_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, 64);
    j.append(0, &key(1));
    j.kset_writing(HEAD, 0x55, &[(0, 1)]);
    let bytes = killed(&j);
    // One kset more than the journal knows, but not the one it announced.
    let other_kset = LogEnd {
        head_seq: HEAD + 1,
        newest_kset_crc: Some(0x56),
    };
    assert_eq!(
        recover(&bytes, &ME, &other_kset, &any_key),
        Err(Ignored::LogMoved {
            journal: HEAD,
            log: HEAD + 1
        })
    );
    assert!(matches!(
        recover(&bytes, &ME, &log_at(HEAD + 2), &any_key),
        Err(Ignored::LogMoved { .. })
    ));
}

#[test]
fn a_failed_kset_does_not_count_when_its_number_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 2, 64);
    j.append(0, &key(1));
    j.append(1, &key(2));
    j.kset_writing(HEAD, 0x10, &[(0, 1)]);
    j.kset_failed(&[0]);
    // Kset 40 is written later with slot 1's key only.
    j.kset_writing(HEAD, 0x20, &[(1, 1)]);
    let got = recovered(
        &killed(&j),
        &LogEnd {
            head_seq: HEAD + 1,
            newest_kset_crc: Some(0x20),
        },
    );
    assert_eq!(got, vec![vec![key(1)], vec![]]);
}

#[test]
fn a_torn_entry_ends_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, 64);
    for n in 0..5 {
        j.append(0, &key(n));
    }
    let h = Header::decode(&killed(&j)).unwrap();
    // A kill inside the fourth entry's stores: its key half written, or only its index.
    let mut torn = killed(&j);
    let e = h.entry_at(0, 3);
    torn[e + 8..e + 24].fill(0xee);
    assert_eq!(
        recovered(&torn, &log_at(HEAD))[0],
        (0..3).map(key).collect::<Vec<_>>()
    );
    let mut stale = killed(&j);
    stale[e..e + 8].copy_from_slice(&(3 + 64u64).to_le_bytes());
    assert_eq!(recovered(&stale, &log_at(HEAD))[0].len(), 3);
}

#[test]
fn a_damaged_header_or_file_is_not_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, 64);
    j.append(0, &key(1));
    let good = killed(&j);
    let decide = |b: &[u8]| recover(b, &ME, &log_at(HEAD), &any_key);
    for byte in [0, 9, 13, 17, 30, 45, 57, 61] {
        let mut b = good.clone();
        b[byte] ^= 0x10;
        assert!(
            matches!(decide(&b), Err(Ignored::Header(_))),
            "bit flip at byte {byte} accepted"
        );
    }
    assert!(matches!(
        decide(&good[..good.len() - 64]),
        Err(Ignored::Header(HeaderFault::Length { .. }))
    ));
    assert!(matches!(
        decide(&good[..100]),
        Err(Ignored::Header(HeaderFault::Short(100)))
    ));
    assert!(matches!(
        decide(&vec![0u8; good.len()]),
        Err(Ignored::Header(HeaderFault::Magic))
    ));
    let mut garbage: Vec<u8> = (0..good.len()).map(|i| (i * 7919 % 251) as u8).collect();
    garbage[..8].copy_from_slice(&layout::MAGIC.to_le_bytes());
    assert!(matches!(decide(&garbage), Err(Ignored::Header(_))));
}

#[test]
fn a_verified_entry_with_an_invalid_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, 64);
    j.append(0, &key(1));
    j.append(0, &KeyRecord { len: 100, ..key(2) });
    let check = |k: &KeyRecord| {
        if k.len % 512 == 0 {
            Ok(())
        } else {
            Err(KeyFault::Length(k.len))
        }
    };
    assert_eq!(
        recover(&killed(&j), &ME, &log_at(HEAD), &check),
        Err(Ignored::BadEntry {
            slot: 0,
            index: 1,
            reason: KeyFault::Length(100).into()
        })
    );
}

#[test]
fn a_full_ring_refuses_keys_until_the_log_passes_them() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, 64);
    for n in 0..64 {
        assert!(j.append(0, &key(n)), "key {n} refused");
    }
    assert!(!j.append(0, &key(64)), "the 65th key overwrote an open one");
    // The log takes ten keys: there is room again, but key 64 has no entry, so nothing
    // after it may count as journaled.
    j.kset_writing(HEAD, 1, &[(0, 10)]);
    j.kset_written(HEAD, &[(0, 10)]);
    assert!(!j.append(0, &key(65)));
    let got = recovered(&killed(&j), &log_at(HEAD + 1));
    assert_eq!(got[0], (10..64).map(key).collect::<Vec<_>>());
    // Once the log holds everything up to key 65, the ring takes keys again and wraps.
    j.kset_writing(HEAD + 1, 2, &[(0, 66)]);
    j.kset_written(HEAD + 1, &[(0, 66)]);
    for n in 66..100 {
        assert!(j.append(0, &key(n)), "key {n} refused");
    }
    let got = recovered(&killed(&j), &log_at(HEAD + 2));
    assert_eq!(got[0], (66..100).map(key).collect::<Vec<_>>());
}

#[test]
fn a_new_journal_replaces_the_previous_one_only_once_published() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 2, 64);
    j.append(0, &key(1));
    drop(j);
    let path = path_in(dir.path(), &CACHE, MEDIA);
    let j = Journal::create(&path, &ME, 1, 128, HEAD).unwrap();
    j.append(0, &key(2));
    // A kill before the new journal is published leaves the old one whole.
    assert_eq!(recovered(&killed(&j), &log_at(HEAD))[0], vec![key(1)]);
    j.publish().unwrap();
    assert_eq!(recovered(&killed(&j), &log_at(HEAD)), vec![vec![key(2)]]);
    j.remove().unwrap();
    assert_eq!(read_previous(&path).unwrap(), None);
}

#[test]
fn a_kill_while_applying_applies_the_same_keys_again() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 2, 64);
    for n in 0..5 {
        j.append(0, &key(n));
    }
    j.append(1, &key(50));
    // Killed after announcing kset 40 with slot 0's first three keys, before writing it.
    j.kset_writing(HEAD, 0x77, &[(0, 3)]);
    let bytes = killed(&j);
    drop(j);
    let first = recover(&bytes, &ME, &log_at(HEAD), &any_key).unwrap();
    assert_eq!(first.key_count(), 6);

    // The next process applies them: its own first kset is 40 too, holding the first four
    // applied keys in its own order, and it is killed before the rest reach the log.
    let path = path_in(dir.path(), &CACHE, MEDIA);
    let applying = Journal::resume(&path, &first).unwrap();
    applying.kset_writing(HEAD, 0x99, &[(0, 4)]);
    applying.kset_written(HEAD, &[(0, 4)]);
    let again = recover(
        &killed(&applying),
        &ME,
        &LogEnd {
            head_seq: HEAD + 1,
            newest_kset_crc: Some(0x99),
        },
        &any_key,
    )
    .unwrap();
    // Everything again (the first four twice on the log then, which replays the same), and
    // never fewer: slot 0's old marker for kset 40 does not count for the new kset 40.
    assert_eq!(again, first);
    // Killed while writing its second kset: that one is recognised as its own.
    applying.kset_writing(HEAD + 1, 0x9a, &[]);
    let written = LogEnd {
        head_seq: HEAD + 2,
        newest_kset_crc: Some(0x9a),
    };
    assert_eq!(
        recover(&killed(&applying), &ME, &written, &any_key).unwrap(),
        first
    );
}

#[test]
fn header_and_entries_round_trip() {
    let h = Header {
        n_slots: 3,
        capacity: 128,
        boot_id: BOOT,
        cache_id: CACHE,
        nonce: 77,
    };
    let mut file = vec![0u8; h.file_len()];
    file[..layout::HEADER_LEN].copy_from_slice(&h.encode());
    assert_eq!(Header::decode(&file), Ok(h));
    let e = layout::encode_entry(5, 9, &key(3));
    assert_eq!(layout::decode_entry(5, 9, &e), Some(Ok(key(3))));
    assert_eq!(layout::decode_entry(6, 9, &e), None, "another slot's seed");
    assert_eq!(layout::decode_entry(5, 10, &e), None, "another index");
    assert!(Header { capacity: 100, ..h }.check_fields().is_err());
    assert!(Header { n_slots: 0, ..h }.check_fields().is_err());
}

#[test]
fn boot_ids_parse() {
    let id = parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
    assert_eq!(id[0], 0x0f);
    assert_eq!(id[15], 0xf0);
    assert_eq!(parse_boot_id("not-a-boot-id"), None);
    assert_eq!(parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fz"), None);
    // The machine running the tests has one, and it does not change while they run.
    assert_eq!(boot_id().unwrap(), boot_id().unwrap());
}

/// Two copies of one cache file have the same cache id; each has a journal of its own, so a
/// daemon killed on one never applies keys whose data only the other holds.
#[test]
fn copies_of_a_cache_file_keep_separate_journals() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.pcache"), dir.path().join("b.pcache"));
    std::fs::write(&a, b"cache").unwrap();
    std::fs::copy(&a, &b).unwrap();
    let (ma, mb) = (MediaFile::of(&a).unwrap(), MediaFile::of(&b).unwrap());
    assert_ne!(
        path_in(dir.path(), &CACHE, ma),
        path_in(dir.path(), &CACHE, mb)
    );
    // The same file under another name (a rename, a second link) keeps its journal.
    let c = dir.path().join("c.pcache");
    std::fs::hard_link(&a, &c).unwrap();
    assert_eq!(
        path_in(dir.path(), &CACHE, ma),
        path_in(dir.path(), &CACHE, MediaFile::of(&c).unwrap())
    );
}

#[test]
fn the_journal_goes_to_the_runtime_directory() {
    let p = path_in(Path::new("/run/x"), &[0xab; 16], MEDIA);
    assert_eq!(
        p,
        Path::new("/run/x/vhost-user-pcache-abababababababababababababababab-803-2a.journal")
    );
}

/// What an append costs (a measurement, not a check: `cargo test --release --lib
/// journal_append_cost -- --ignored --nocapture`).
#[test]
#[ignore]
fn journal_append_cost() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal(&dir, 1, DEFAULT_CAPACITY);
    let rounds = 2_000u64;
    let per_round = DEFAULT_CAPACITY as u64 - 1;
    let cpu = || {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the one timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
    };
    let started = cpu();
    for round in 0..rounds {
        for n in 0..per_round {
            assert!(j.append(0, &key(n)));
        }
        // What the log does after a kset: the keys are committed.
        let upto = (round + 1) * per_round;
        j.kset_writing(HEAD + round, 1, &[(0, upto)]);
        j.kset_written(HEAD + round, &[(0, upto)]);
    }
    let per_key = (cpu() - started) / (rounds * per_round) as f64;
    eprintln!(
        "journal append: {per_key:.1} ns of CPU a key ({} keys)",
        rounds * per_round
    );
}
