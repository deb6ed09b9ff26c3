// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The journal killed after every single store of a seeded run of appends and kset writes
//! (some failing, some spanning slots, LAST ksets between them), against a model of the log:
//! at each kill, recovery must give back exactly the completed keys the log lacks.

use std::sync::{Arc, Mutex};

use super::*;
use crate::cache::format::KeyRecord;

const ME: Identity = Identity {
    boot_id: [3; 16],
    cache_id: [4; 16],
};
const SLOTS: usize = 3;
const CAPACITY: u32 = 64;
/// Keys in one modelled kset, small so that closes span several ksets.
const KSET_KEYS: usize = 5;

#[derive(Clone, Default)]
struct Model {
    /// Next kset number and the CRC of the newest kset on the log.
    head: u64,
    newest: Option<u32>,
    /// Per slot: keys appended and not on the log, oldest first, and whether each was
    /// journaled (its write completed without waiting for the log).
    open: Vec<Vec<(KeyRecord, bool)>>,
    /// The key inside `append` right now, which a kill may or may not leave journaled.
    appending: Option<(usize, KeyRecord)>,
    kills: u64,
    /// Keys the journal had no room for.
    refused: u64,
    failures: Vec<String>,
}

impl Model {
    /// What recovery must return: per slot, the open keys up to the first unjournaled one.
    fn expected(&self) -> Vec<Vec<KeyRecord>> {
        self.open
            .iter()
            .map(|o| o.iter().take_while(|k| k.1).map(|k| k.0).collect())
            .collect()
    }

    fn check(&mut self, bytes: &[u8]) {
        self.kills += 1;
        let log = LogEnd {
            head_seq: self.head,
            newest_kset_crc: self.newest,
        };
        let got = match recover(bytes, &ME, &log, &|_| Ok(())) {
            Ok(r) => r.slots,
            Err(e) => {
                self.failures
                    .push(format!("kill {}: ignored: {e}", self.kills));
                return;
            }
        };
        let want = self.expected();
        let mut with_appending = want.clone();
        if let Some((slot, key)) = self.appending {
            if self.open[slot].iter().all(|k| k.1) {
                with_appending[slot].push(key);
            }
        }
        if got != want && got != with_appending {
            self.failures.push(format!(
                "kill {}: recovered {got:?}, expected {want:?}",
                self.kills
            ));
        }
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn run(seed: u64) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let head = 100;
    let mut j = Journal::create(
        &path_in(dir.path(), &ME.cache_id, super::tests::MEDIA),
        &ME,
        SLOTS,
        CAPACITY,
        head,
    )
    .unwrap();
    j.publish().unwrap();
    let model = Arc::new(Mutex::new(Model {
        head,
        open: vec![Vec::new(); SLOTS],
        ..Model::default()
    }));
    let m = model.clone();
    j.set_store_hook(Some(Box::new(move |bytes| m.lock().unwrap().check(&bytes))));
    let mut r = Rng(seed);
    let mut n = 0u64;
    // Even seeds close rarely, so rings fill and keys are refused.
    let writes_per_close = if seed % 2 == 0 { 40 } else { 2 };
    for _ in 0..400 {
        if r.below(writes_per_close + 1) > 0 {
            // A write completes: its key goes to its slot's open kset and the journal.
            let slot = r.below(SLOTS as u64) as usize;
            n += 1;
            let key = KeyRecord {
                off: n * 512,
                len: 512,
                gen: n,
                ..KeyRecord::default()
            };
            model.lock().unwrap().appending = Some((slot, key));
            let journaled = j.append(slot, &key);
            let mut m = model.lock().unwrap();
            m.appending = None;
            m.open[slot].push((key, journaled));
            m.refused += u64::from(!journaled);
            continue;
        }
        // A close of some slots: their keys in slot order, KSET_KEYS to a kset.
        let slots: Vec<usize> = (0..SLOTS).filter(|_| r.below(2) == 0).collect();
        let taken: Vec<usize> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat(s).take(model.lock().unwrap().open[s].len()))
            .collect();
        for chunk in taken.chunks(KSET_KEYS) {
            if r.below(8) == 0 {
                // The log segment is full: a LAST kset first.
                let seq = model.lock().unwrap().head;
                let crc = r.below(1 << 32) as u32;
                j.kset_writing(seq, crc, &[]);
                let mut m = model.lock().unwrap();
                m.head += 1;
                m.newest = Some(crc);
                drop(m);
                j.kset_written(seq, &[]);
            }
            let seq = model.lock().unwrap().head;
            let crc = r.below(1 << 32) as u32;
            let mut marks: Vec<(usize, u64)> = Vec::new();
            for &s in chunk {
                match marks.iter_mut().find(|m| m.0 == s) {
                    Some(m) => m.1 += 1,
                    None => marks.push((s, j.committed(s) + 1)),
                }
            }
            j.kset_writing(seq, crc, &marks);
            if r.below(10) == 0 {
                // The write fails: the keys stay open, and the close ends here.
                j.kset_failed(&marks.iter().map(|m| m.0).collect::<Vec<_>>());
                break;
            }
            let mut m = model.lock().unwrap();
            m.head += 1;
            m.newest = Some(crc);
            for &s in chunk {
                m.open[s].remove(0);
            }
            drop(m);
            j.kset_written(seq, &marks);
        }
    }
    j.set_store_hook(None);
    let m = model.lock().unwrap().clone();
    m
}

#[test]
fn a_kill_after_any_store_recovers_exactly_the_completed_keys_the_log_lacks() {
    let (mut kills, mut refused) = (0, 0);
    for seed in 1..=6 {
        let m = run(seed);
        assert!(
            m.failures.is_empty(),
            "seed {seed}: {} of {} kills wrong, first: {}",
            m.failures.len(),
            m.kills,
            m.failures[0]
        );
        kills += m.kills;
        refused += m.refused;
        eprintln!(
            "seed {seed}: {} kill points, {} keys refused",
            m.kills, m.refused
        );
    }
    assert!(kills > 10_000, "only {kills} kill points");
    assert!(refused > 0, "no ring ever filled");
}
