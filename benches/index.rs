// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cost of the in-memory index on the request path: inserts and lookups in the patterns the
//! benchmark's 4 KiB cases make, and the worst cases the overlap rules must keep bounded.
//!
//! Without `--measure` (as `cargo test --benches` runs it) only a quick self-check of every
//! case on a small index. `cargo bench --bench index -- --measure [--case NAME] [--rounds N]`
//! times each case (wall clock: median ns per operation over the rounds).
//!
//! Instruction counts do not depend on how busy the machine is; per operation of one case:
//!
//! ```sh
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*index::measured*' \
//!   --callgrind-out-file=cg.out BENCH_BINARY --measure --rounds 1 --case overwrite
//! ```
//!
//! and divide the total instructions (`callgrind_annotate cg.out | head`) by the operations
//! the case prints. Only the measured operations are counted, not the set-up that precedes
//! them (filling the index for the overwrite and read-hit cases). Cache misses, with a last
//! level the size of this machine's per-core L2: add `--cache-sim=yes --LL=2097152,16,64`;
//! `D1mr` is then the L1 read misses and `DLmr`/`DLmw` the read/write misses beyond 2 MiB.
//! Reading the list of operations costs about 0.75 of those read misses per operation in
//! every case (a sequential walk, which a real CPU prefetches).
//!
//! Cases (4 KiB keys unless said, in a 1 GiB part of a 4 GiB index, offsets drawn at random):
//! - `insert-new`: every 4 KiB block of the part once, in random order: each lands in a gap;
//! - `overwrite`: the same blocks again, in another order: each replaces one key exactly;
//! - `randwrite`: 2.4 × the part's blocks at offsets drawn with replacement, from empty (as
//!   a benchmark write case that writes 60% of a 4 GiB cache over a 1 GiB region);
//! - `randwrite-wide`: as many writes at offsets drawn over the whole 4 GiB (1,024 regions,
//!   ending with about 450,000 keys), as the daemon's benchmark writes 2.4 GiB over a 4 GiB
//!   image: a working set far beyond the CPU's caches;
//! - `read-hit`: 4 KiB lookups (with fill, as reads do) of written blocks;
//! - `read-in-64k`: 4 KiB lookups inside 64 KiB keys;
//! - `overlap-64k`: 64 KiB writes at 4 KiB-aligned offsets over regions of 4 KiB keys, each
//!   cutting up to 17 keys (the general path);
//! - `small-512`: 512-byte writes at random sector offsets into regions that end up holding
//!   up to 8,192 entries each (a region's worst case).

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use vhost_user_pcache::cache::index::{CrcSpan, Index, IndexKey, KeyKind, Piece};
use vhost_user_pcache::cache::CachePos;

const K: u64 = 1024;
const GIB: u64 = 1 << 30;
const SEGMENT: u64 = 16 << 20;

struct Args {
    measure: bool,
    rounds: usize,
    case: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        measure: false,
        rounds: 5,
        case: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--measure" => args.measure = true,
            "--rounds" => {
                args.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--rounds takes a positive number")?
            }
            "--case" => args.case = Some(it.next().ok_or("--case takes a case name")?),
            "--help" | "-h" => {
                return Err("usage: index [--measure [--case NAME] [--rounds N]]".into())
            }
            // cargo bench and cargo test add their own flags (--bench, filters): not ours.
            _ => {}
        }
    }
    Ok(args)
}

/// splitmix64: a fixed, cheap sequence, the same in every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `0..n` in random order.
    fn permutation(&mut self, n: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
        v
    }
}

/// A dirty key over `[off, off + len)` whose data is the `n`th allocation of its size, as a
/// data head hands them out.
fn key(off: u64, len: u64, n: u64) -> IndexKey {
    let at = n * len;
    let pos = CachePos {
        seg: (at / SEGMENT) as u32 % 256,
        off: (at % SEGMENT) as u32,
    };
    IndexKey {
        off,
        len: len as u32,
        kind: KeyKind::Dirty,
        pos,
        gen: 1,
        crc: CrcSpan {
            pos,
            len: len as u32,
            crc: n as u32,
        },
    }
}

/// One case: the index, the operations to measure, and how to run one.
struct Case {
    name: &'static str,
    index: Index,
    ops: Vec<Op>,
}

#[derive(Clone, Copy)]
enum Op {
    Insert(IndexKey),
    Lookup { off: u64, len: u64 },
}

/// The sizes of a case: the benchmark's (`full`) or small ones for the self-check.
struct Scale {
    capacity: u64,
    part: u64,
}

/// `blocks` lookups of one random 4 KiB block each among the first `blocks`.
fn block_lookups(rng: &mut Rng, blocks: u64) -> Vec<Op> {
    (0..blocks)
        .map(|_| Op::Lookup {
            off: rng.below(blocks) * 4 * K,
            len: 4 * K,
        })
        .collect()
}

fn insert_all(index: &Index, keys: impl Iterator<Item = IndexKey>) {
    for k in keys {
        index.insert(k, &mut |_| {});
    }
}

fn build(name: &'static str, scale: &Scale, rng: &mut Rng) -> Case {
    let index = Index::new(scale.capacity);
    let blocks = scale.part / (4 * K);
    let block_keys = |order: Vec<u64>| {
        order
            .into_iter()
            .enumerate()
            .map(|(n, b)| key(b * 4 * K, 4 * K, n as u64))
            .collect::<Vec<_>>()
    };
    let ops: Vec<Op> = match name {
        "insert-new" => block_keys(rng.permutation(blocks))
            .into_iter()
            .map(Op::Insert)
            .collect(),
        "overwrite" => {
            insert_all(&index, block_keys(rng.permutation(blocks)).into_iter());
            let again = block_keys(rng.permutation(blocks));
            again
                .into_iter()
                .map(|k| Op::Insert(IndexKey { gen: 2, ..k }))
                .collect()
        }
        "randwrite" => (0..blocks * 12 / 5)
            .map(|n| Op::Insert(key(rng.below(blocks) * 4 * K, 4 * K, n)))
            .collect(),
        "randwrite-wide" => {
            let all = scale.capacity / (4 * K);
            (0..blocks * 12 / 5)
                .map(|n| Op::Insert(key(rng.below(all) * 4 * K, 4 * K, n)))
                .collect()
        }
        "read-hit" => {
            insert_all(&index, block_keys(rng.permutation(blocks)).into_iter());
            block_lookups(rng, blocks)
        }
        "read-in-64k" => {
            let big = scale.part / (64 * K);
            let order = rng.permutation(big);
            let keys = order.into_iter().enumerate();
            insert_all(&index, keys.map(|(n, b)| key(b * 64 * K, 64 * K, n as u64)));
            block_lookups(rng, blocks)
        }
        "overlap-64k" => {
            insert_all(&index, block_keys(rng.permutation(blocks)).into_iter());
            (0..blocks / 4)
                .map(|n| Op::Insert(key(rng.below(blocks - 16) * 4 * K, 64 * K, n)))
                .collect()
        }
        "small-512" => {
            // A few regions only, so that each fills up to its 8,192 sectors.
            let sectors = (16 << 20) / 512;
            (0..sectors * 2)
                .map(|n| Op::Insert(key(rng.below(sectors) * 512, 512, n)))
                .collect()
        }
        _ => unreachable!("case {name}"),
    };
    Case { name, index, ops }
}

const CASES: [&str; 8] = [
    "insert-new",
    "overwrite",
    "randwrite",
    "randwrite-wide",
    "read-hit",
    "read-in-64k",
    "overlap-64k",
    "small-512",
];

/// The operations whose instructions callgrind counts (see the file's header): keep the name.
#[inline(never)]
fn measured_ops(index: &Index, ops: &[Op], out: &mut Vec<Piece>) -> u64 {
    let mut hits = 0;
    for op in ops {
        match *op {
            Op::Insert(k) => index.insert(k, &mut |_| {}),
            Op::Lookup { off, len } => {
                index.lookup(off, len, true, &|_| 1, out);
                hits += out
                    .iter()
                    .filter(|p| matches!(p, Piece::Hit { .. }))
                    .count() as u64;
            }
        }
    }
    hits
}

/// Run `case` once and return its nanoseconds per operation; check that what it did is what
/// the index now holds.
fn run(case: &Case, out: &mut Vec<Piece>) -> Result<f64, String> {
    let start = Instant::now();
    let hits = black_box(measured_ops(&case.index, &case.ops, out));
    let ns_per_op = start.elapsed().as_nanos() as f64 / case.ops.len() as f64;
    let lookups = case
        .ops
        .iter()
        .filter(|op| matches!(op, Op::Lookup { .. }))
        .count() as u64;
    if hits != lookups {
        return Err(format!(
            "{}: {hits} of {lookups} lookups hit, all should",
            case.name
        ));
    }
    // Every inserted key's last version is in the index, whole or in the pieces later keys
    // left of it.
    let mut last = std::collections::BTreeMap::new();
    for op in &case.ops {
        if let Op::Insert(k) = op {
            for s in (k.off..k.end()).step_by(512) {
                last.insert(s, (k.pos, s - k.off));
            }
        }
    }
    let mut found = 0;
    case.index.for_each(&mut |k| {
        for s in (k.off..k.end()).step_by(512) {
            if let Some((pos, skip)) = last.get(&s) {
                let want = pos.off as u64 + skip;
                if (k.pos.seg, u64::from(k.pos.off) + (s - k.off)) == (pos.seg, want) {
                    found += 1;
                }
            }
        }
    });
    if found != last.len() {
        return Err(format!(
            "{}: {found} of {} written sectors map to their last write",
            case.name,
            last.len()
        ));
    }
    Ok(ns_per_op)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let scale = if args.measure {
        Scale {
            capacity: 4 * GIB,
            part: GIB,
        }
    } else {
        Scale {
            capacity: 64 << 20,
            part: 16 << 20,
        }
    };
    let names: Vec<&'static str> = match &args.case {
        Some(c) => match CASES.iter().find(|n| *n == c) {
            Some(n) => vec![*n],
            None => {
                eprintln!("no case {c}; cases: {}", CASES.join(", "));
                return ExitCode::from(2);
            }
        },
        None => CASES.to_vec(),
    };
    let mut out = Vec::with_capacity(64);
    if args.measure {
        println!("{:<14} {:>9} {:>10}", "case", "ops", "median ns/op");
    }
    for name in names {
        let rounds = if args.measure { args.rounds } else { 1 };
        let mut times = Vec::new();
        let mut ops = 0;
        for round in 0..rounds {
            let case = build(name, &scale, &mut Rng(round as u64 + 1));
            ops = case.ops.len();
            match run(&case, &mut out) {
                Ok(ns) => times.push(ns),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        times.sort_by(f64::total_cmp);
        if args.measure {
            println!("{name:<14} {ops:>9} {:>10.1}", times[times.len() / 2]);
        }
    }
    if !args.measure {
        println!("index self-check passed (run with --measure to time the cases)");
    }
    ExitCode::SUCCESS
}
