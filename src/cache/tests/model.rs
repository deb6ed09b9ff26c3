// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Randomized model test: writes, overwrites from several queues, reads, flushes, zeroes,
//! discards and reopen (clean, and crash after a flush) against a plain byte-map model.

use proptest::prelude::*;

use super::{pattern, Fixture};
use crate::cache::driver::Driver;
use crate::engine::Engine;

const DISK: u64 = 12 << 20;
const QUEUES: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    Write {
        q: usize,
        sector: u64,
        sectors: u64,
    },
    Read {
        q: usize,
        sector: u64,
        sectors: u64,
    },
    Zeroes {
        q: usize,
        sector: u64,
        sectors: u64,
    },
    Discard {
        q: usize,
        sector: u64,
        sectors: u64,
    },
    Flush {
        q: usize,
    },
    /// Clean shutdown and reopen.
    Reopen,
    /// Flush, then reopen on the durable image only, as after a power cut.
    CrashAfterFlush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Cluster around region boundaries (every 8192 sectors) to exercise splits.
    let sectors = DISK / 512;
    prop_oneof![
        (0..sectors - 256, 1u64..=256),
        (0u64..3, 0u64..64, 1u64..=128).prop_map(|(r, back, n)| {
            let start = ((r + 1) * 8192).saturating_sub(back);
            (start, n)
        }),
    ]
    .prop_map(move |(s, n)| (s, n.min(sectors - s)))
}

fn op() -> impl Strategy<Value = Op> {
    let q = 0..QUEUES;
    prop_oneof![
        6 => (q.clone(), range()).prop_map(|(q, (sector, sectors))| Op::Write { q, sector, sectors }),
        4 => (q.clone(), range()).prop_map(|(q, (sector, sectors))| Op::Read { q, sector, sectors }),
        1 => (q.clone(), range()).prop_map(|(q, (sector, sectors))| Op::Zeroes { q, sector, sectors }),
        1 => (q.clone(), range()).prop_map(|(q, (sector, sectors))| Op::Discard { q, sector, sectors }),
        1 => q.prop_map(|q| Op::Flush { q }),
        1 => Just(Op::Reopen),
        1 => Just(Op::CrashAfterFlush),
    ]
}

/// Where two buffers first and last differ, by sector, and what the sector holds.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    let bad: Vec<usize> = (0..got.len() / 512)
        .filter(|s| got[s * 512..(s + 1) * 512] != want[s * 512..(s + 1) * 512])
        .collect();
    match (bad.first(), bad.last()) {
        (Some(&a), Some(&b)) => format!(
            "{} sectors differ, first {a} last {b}; got {:02x?} want {:02x?}",
            bad.len(),
            &got[a * 512..a * 512 + 8],
            &want[a * 512..a * 512 + 8]
        ),
        _ => "no difference".into(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24, max_shrink_iters: 2048,
        // Failing cases are kept beside this file (model.proptest-regressions) and rerun first.
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_agrees_with_a_byte_map(ops in prop::collection::vec(op(), 1..60)) {
        let mut fx = Fixture::new(DISK >> 20, QUEUES, 0);
        let mut model = vec![0u8; DISK as usize];
        let mut engine = fx.open();
        let mut d = Driver::new(&engine);
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Write { q, sector, sectors } => {
                    let (off, len) = (sector * 512, sectors as usize * 512);
                    let data = pattern(off, len, n as u64);
                    d.write(q, off, &data).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                Op::Read { q, sector, sectors } => {
                    let (off, len) = (sector * 512, sectors as usize * 512);
                    let got = d.read(q, off, len).unwrap();
                    prop_assert!(got == model[off as usize..off as usize + len],
                        "op {n}: read of {len} bytes at {off} differs from the model: {}",
                        first_difference(&got, &model[off as usize..off as usize + len]));
                }
                Op::Zeroes { q, sector, sectors } | Op::Discard { q, sector, sectors } => {
                    let (off, len) = (sector * 512, sectors * 512);
                    if matches!(op, Op::Zeroes { .. }) {
                        d.write_zeroes(q, off, len).unwrap();
                    } else {
                        d.discard(q, off, len).unwrap();
                    }
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Flush { q } => d.flush(q).unwrap(),
                Op::Reopen => {
                    drop(d);
                    engine.shutdown().unwrap();
                    drop(engine);
                    engine = fx.open();
                    d = Driver::new(&engine);
                }
                Op::CrashAfterFlush => {
                    d.flush(0).unwrap();
                    drop(d);
                    engine.shutdown_for_crash_test();
                    drop(engine);
                    engine = fx.crash_and_open(None);
                    d = Driver::new(&engine);
                }
            }
        }
        let got = d.read(0, 0, DISK as usize).unwrap();
        prop_assert!(got == model, "final full read differs from the model: {}", first_difference(&got, &model));
        drop(d);
        engine.shutdown().unwrap();
    }
}
