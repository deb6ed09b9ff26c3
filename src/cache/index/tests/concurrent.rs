// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several threads inserting, looking up and filling at once.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread;

use super::*;

const THREADS: u64 = 4;
const OPS: usize = 1500;
/// Segments `0..THREADS` belong one to each thread and are never reused; the others are
/// shared and have their generation bumped now and then.
const SEGS: usize = 8;

struct Shared {
    index: Index,
    gens: [AtomicU64; SEGS],
    /// Every key passed to `on_insert`, in call order: what an engine would append to its log.
    log: Mutex<Vec<IndexKey>>,
}

impl Shared {
    fn gen_of(&self, seg: u32) -> u64 {
        self.gens[seg as usize].load(Ordering::Relaxed)
    }

    fn insert(&self, key: IndexKey) {
        self.index.insert(key, &mut |k| lock(&self.log).push(*k));
    }
}

/// xorshift64: deterministic per thread, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

fn worker(shared: &Shared, t: u64) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t + 1) * 0x1234_5678));
    let mut out = Vec::new();
    let mut tickets = Vec::new();
    // Private area: 1 MiB of region 2 for this thread alone.
    let private = 8 * MIB + t * MIB;
    for _ in 0..OPS {
        match rng.next(10) {
            0..=2 => {
                // Shared: around the boundary between regions 0 and 1, often spanning it.
                let off = 4 * MIB - 64 * K + rng.next(128) * 512 * 2;
                let len = (1 + rng.next(256)) * 512;
                let seg = (THREADS + rng.next(SEGS as u64 - THREADS)) as u32;
                let kind = [KeyKind::Dirty, KeyKind::Clean, KeyKind::Zeroes][rng.next(3) as usize];
                let mut k = key(off, len, kind, seg, rng.next(1 << 12) * 4 * K);
                k.gen = shared.gen_of(seg);
                shared.insert(k);
            }
            3..=4 => {
                // Private: what this thread wrote is exactly what it reads back.
                let off = private + rng.next(2048) * 512;
                let len = (1 + rng.next(128)) * 512;
                let len = len.min(private + MIB - off);
                let k = dirty(off, len, t as u32, rng.next(1 << 12) * 4 * K);
                shared.insert(k);
                shared
                    .index
                    .lookup(off, len, true, &|s| shared.gen_of(s), &mut out);
                assert_eq!(
                    out,
                    vec![Piece::Hit {
                        off,
                        len: k.len,
                        key: k
                    }]
                );
            }
            5..=7 => {
                // Read anywhere with fill, including the other threads' private areas.
                let off = if rng.next(2) == 0 {
                    4 * MIB - 96 * K + rng.next(192) * 1024
                } else {
                    8 * MIB + rng.next(8192) * 512
                };
                let len = (1 + rng.next(512)) * 512;
                let len = len.min(12 * MIB - off);
                shared
                    .index
                    .lookup(off, len, true, &|s| shared.gen_of(s), &mut out);
                tickets.extend(out.drain(..).filter_map(|p| match p {
                    Piece::Miss { ticket, .. } => ticket,
                    _ => None,
                }));
            }
            8 => {
                // Finish or abandon the fills in flight.
                for ticket in tickets.drain(..) {
                    if rng.next(4) == 0 {
                        shared.index.abort_fill(ticket);
                        continue;
                    }
                    let seg = (THREADS + rng.next(SEGS as u64 - THREADS)) as u32;
                    let pos = CachePos {
                        seg,
                        off: (rng.next(1 << 12) * 4 * K) as u32,
                    };
                    let crc = CrcSpan {
                        pos,
                        len: ticket.len(),
                        crc: 1,
                    };
                    let gen = shared.gen_of(seg);
                    let log = &shared.log;
                    let kept = shared
                        .index
                        .complete_fill(ticket, pos, gen, crc, &mut |k| lock(log).push(*k));
                    assert!(kept % 512 == 0);
                }
            }
            _ => {
                if t == 0 {
                    let seg = THREADS + rng.next(SEGS as u64 - THREADS);
                    shared.gens[seg as usize].fetch_add(1, Ordering::Relaxed);
                }
                shared.index.remove_stale(&|s| shared.gen_of(s), 10);
            }
        }
    }
    for ticket in tickets {
        shared.index.abort_fill(ticket);
    }
}

fn live_keys(index: &Index, gen_of: &dyn Fn(u32) -> u64) -> Vec<IndexKey> {
    let mut keys = Vec::new();
    index.for_each(&mut |k| {
        if !k.has_data() || k.gen >= gen_of(k.pos.seg) {
            keys.push(*k)
        }
    });
    keys
}

#[test]
fn concurrent_use_keeps_the_index_whole_and_in_log_order() {
    let shared = Arc::new(Shared {
        index: Index::new(12 * MIB),
        gens: std::array::from_fn(|_| AtomicU64::new(1)),
        log: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = Arc::clone(&shared);
            thread::spawn(move || worker(&shared, t))
        })
        .collect();
    for handle in handles {
        handle.join().expect("worker panicked");
    }

    let entries = shared.index.checked_entries();
    assert!(
        entries.iter().all(|k| k.kind != KeyKind::Empty),
        "every fill was completed or aborted"
    );
    // Replaying the log in order rebuilds the same live keys: the log order is the index
    // order for every block.
    let replayed = Index::new(12 * MIB);
    for key in lock(&shared.log).iter() {
        replayed.insert(*key, &mut |_| {});
    }
    let gen_of = |s: u32| shared.gen_of(s);
    let live = live_keys(&shared.index, &gen_of);
    assert!(live.len() > 100, "the workload left a real index behind");
    assert_eq!(live, live_keys(&replayed, &gen_of));
}
