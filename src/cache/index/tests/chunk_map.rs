// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The region map's two-level layout against `BTreeMap`, operation by operation, with its
//! invariants checked after each (sorted keys, no empty chunk, heads naming first keys, each
//! live slot owned by one key). The model maps a key to (the number beside it, value).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::super::chunk_map::{ChunkMap, CAP, MAX_AUX, MAX_KEY};

#[derive(Clone, Debug)]
enum Op {
    Insert(u32, u16, u64),
    Remove(u32),
    /// Change the number beside a key (and its value), if present.
    SetAux(u32, u16),
}

/// Apply `ops` to both maps and compare every query after each step.
fn check_against_btree(ops: &[Op], space: u32) {
    let mut ours = ChunkMap::<u64>::new();
    let mut model = BTreeMap::new();
    for op in ops {
        match *op {
            Op::Insert(k, a, v) => {
                let replaced = model.insert(k, (a, v)).map(|(_, v)| v);
                assert_eq!(ours.insert(k, a, v), replaced, "{op:?}");
            }
            Op::Remove(k) => {
                let removed = model.remove(&k).map(|(_, v)| v);
                assert_eq!(ours.remove(k), removed, "{op:?}");
            }
            Op::SetAux(k, a) => {
                let got = ours.get_mut_setting_aux(k, a).map(|v| {
                    *v += 1;
                    *v
                });
                let want = model.get_mut(&k).map(|e| {
                    *e = (a, e.1 + 1);
                    e.1
                });
                assert_eq!(got, want, "{op:?}");
            }
        }
        ours.check();
        let all: Vec<(u32, u16, u64)> = ours.iter().map(|(k, a, v)| (k, a, *v)).collect();
        let want: Vec<(u32, u16, u64)> = model.iter().map(|(k, (a, v))| (*k, *a, *v)).collect();
        assert_eq!(all, want, "after {op:?}");
    }
    for at in 0..=space + 1 {
        assert_eq!(ours.get(at), model.get(&at).map(|(_, v)| v));
        let before = model
            .range(..at)
            .next_back()
            .map(|(k, (a, v))| (*k, *a, *v));
        assert_eq!(
            ours.last_before(at).map(|(k, a, v)| (k, a, *v)),
            before,
            "before {at}"
        );
        assert_eq!(ours.last_before_mut(at).map(|(k, a, v)| (k, a, *v)), before);
        for to in [at, at + 1, at + 3, at + 40, space + 2] {
            let odd = model
                .range(at..to.max(at))
                .find(|(_, (_, v))| *v % 2 == 1)
                .map(|(k, _)| *k);
            assert_eq!(ours.find(at, to, |v| v % 2 == 1), odd, "find in {at}..{to}");
        }
    }
    // Changing values in a range changes exactly those.
    let (from, to) = (space / 3, 2 * space / 3);
    ours.for_each_in_mut(from, to, |k, v| *v = u64::from(k) + 1000);
    for (k, (_, v)) in model.range_mut(from..to) {
        *v = u64::from(*k) + 1000;
    }
    let all: Vec<(u32, u16, u64)> = ours.iter().map(|(k, a, v)| (k, a, *v)).collect();
    let want: Vec<(u32, u16, u64)> = model.into_iter().map(|(k, (a, v))| (k, a, v)).collect();
    assert_eq!(all, want);
}

fn ops(space: u32, n: usize) -> impl Strategy<Value = Vec<Op>> {
    let aux = prop_oneof![Just(0), Just(MAX_AUX), 0..=MAX_AUX];
    let op = prop_oneof![
        3 => (0..space, aux.clone(), any::<u32>()).prop_map(|(k, a, v)| Op::Insert(k, a, v.into())),
        2 => (0..space).prop_map(Op::Remove),
        1 => (0..space, aux).prop_map(|(k, a)| Op::SetAux(k, a)),
    ];
    prop::collection::vec(op, 0..n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Few distinct keys: many replacements, removals that empty and merge chunks.
    #[test]
    fn matches_btreemap_on_a_small_key_space(ops in ops(3 * CAP as u32, 300)) {
        check_against_btree(&ops, 3 * CAP as u32);
    }

    /// Many keys: many chunks, splits in every position.
    #[test]
    fn matches_btreemap_on_a_large_key_space(ops in ops(2000, 600)) {
        check_against_btree(&ops, 2000);
    }
}

#[test]
fn ascending_and_descending_inserts_then_removals() {
    let n = 40 * CAP as u32;
    let mut ops: Vec<Op> = (0..n).map(|k| Op::Insert(k, k as u16, k.into())).collect();
    ops.extend((0..n).rev().map(|k| Op::Insert(k, MAX_AUX, 7)));
    ops.extend((0..n).step_by(2).map(Op::Remove));
    ops.extend((0..n).rev().map(|k| Op::Insert(k + n, 3, k.into())));
    ops.extend((0..2 * n).rev().map(Op::Remove));
    check_against_btree(&ops, 2 * n);
}

/// Removing most entries merges chunks, so the map does not keep one chunk per survivor.
#[test]
fn sparse_survivors_share_chunks() {
    let mut map = ChunkMap::<u64>::new();
    let n = 100 * CAP as u32;
    for k in 0..n {
        map.insert(k.wrapping_mul(0x9E37_79B9) % n, 0, 0);
    }
    for k in 0..n {
        if k % 10 != 0 {
            map.remove(k);
        }
    }
    map.check();
    // The scattered keys need not all be distinct: count what is there.
    let survivors = map.iter().count();
    assert!(survivors >= (n / 20) as usize, "{survivors} survivors");
    // Any two neighbouring chunks hold more than one chunk's worth, so at most about two
    // chunks per CAP survivors, and one at least.
    let chunks = map.chunks();
    assert!(chunks >= survivors / CAP, "{chunks} chunks");
    assert!(
        chunks <= 2 * survivors / CAP + 2,
        "{chunks} chunks for {survivors} entries"
    );
}

/// Ascending inserts fill every chunk but the last one completely.
#[test]
fn ascending_inserts_fill_chunks() {
    let mut map = ChunkMap::<u64>::new();
    let n = 10 * CAP as u32 + 1;
    for k in 0..n {
        map.insert(k, 0, 0);
    }
    assert_eq!(map.chunks(), 11);
}

/// The largest key and number round-trip next to the smallest, and a search past the largest
/// key finds it.
#[test]
fn extreme_keys_and_numbers_keep_their_bits() {
    let mut map = ChunkMap::<u64>::new();
    map.insert(MAX_KEY, MAX_AUX, 1);
    map.insert(0, MAX_AUX, 2);
    map.insert(1, 0, 3);
    map.check();
    let all: Vec<(u32, u16, u64)> = map.iter().map(|(k, a, v)| (k, a, *v)).collect();
    assert_eq!(all, [(0, MAX_AUX, 2), (1, 0, 3), (MAX_KEY, MAX_AUX, 1)]);
    assert_eq!(
        map.last_before(u32::MAX).map(|(k, a, v)| (k, a, *v)),
        Some((MAX_KEY, MAX_AUX, 1))
    );
    assert_eq!(map.find(2, u32::MAX, |_| true), Some(MAX_KEY));
}
