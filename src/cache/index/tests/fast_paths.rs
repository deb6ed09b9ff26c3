// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one-search paths of insert and lookup (a gap, an exact replacement, a range inside one
//! entry) and their edges, where a wrong shortcut would differ from the general rules.

use super::*;
use KeyKind::{Clean, Dirty, Empty, Zeroes};

#[test]
fn insert_into_a_gap_between_touching_neighbours_leaves_them_whole() {
    let index = Index::new(8 * MIB);
    let (left, right) = (dirty(0, 4 * K, 1, 0), dirty(8 * K, 4 * K, 1, 4 * K));
    insert(&index, left);
    insert(&index, right);
    let middle = key(4 * K, 4 * K, Clean, 2, 0);
    assert_eq!(insert(&index, middle), vec![middle]);
    assert_eq!(index.checked_entries(), vec![left, middle, right]);
    assert_eq!(index.extent_count(), 3);
}

#[test]
fn insert_ending_inside_the_next_key_is_not_a_gap() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(8 * K, 8 * K, 1, 0));
    insert(&index, dirty(4 * K, 8 * K, 2, 0));
    assert_eq!(
        shape(&index),
        vec![(4 * K, 8 * K, Dirty), (12 * K, 4 * K, Dirty)]
    );
}

#[test]
fn exact_replacement_takes_every_field_of_the_new_key() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(0, 4 * K, 1, 0));
    insert(&index, dirty(4 * K, 4 * K, 1, 4 * K));
    insert(&index, dirty(8 * K, 4 * K, 1, 8 * K));
    let mut new = key(4 * K, 4 * K, Clean, 3, 12 * K);
    new.gen = 7;
    new.crc.crc = 0xdead_beef;
    insert(&index, new);
    assert_eq!(entry_at(&index, 4 * K), new);
    assert_eq!(
        shape(&index),
        vec![
            (0, 4 * K, Dirty),
            (4 * K, 4 * K, Clean),
            (8 * K, 4 * K, Dirty)
        ]
    );
    assert_eq!(index.extent_count(), 3);
}

#[test]
fn same_start_with_another_length_is_cut_not_replaced() {
    let index = Index::new(8 * MIB);
    let long = dirty(0, 8 * K, 1, 0);
    insert(&index, long);
    insert(&index, dirty(0, 4 * K, 2, 0));
    assert_eq!(
        shape(&index),
        vec![(0, 4 * K, Dirty), (4 * K, 4 * K, Dirty)]
    );
    assert_eq!(entry_at(&index, 4 * K).pos, CachePos { seg: 1, off: 4096 });
    // A longer key over a shorter one also removes the one behind it.
    insert(&index, dirty(0, 8 * K, 3, 0));
    assert_eq!(shape(&index), vec![(0, 8 * K, Dirty)]);
    assert_eq!(index.extent_count(), 1);
}

#[test]
fn exact_replacement_of_a_placeholder_counts_an_extent_and_starves_its_fill() {
    let index = Index::new(8 * MIB);
    let ticket = take_ticket(lookup(&index, 4 * K, 4 * K, true));
    assert_eq!(index.extent_count(), 0);
    insert(&index, dirty(4 * K, 4 * K, 2, 0));
    assert_eq!(shape(&index), vec![(4 * K, 4 * K, Dirty)]);
    assert_eq!(index.extent_count(), 1);
    let pos = CachePos { seg: 5, off: 0 };
    let kept = index.complete_fill(ticket, pos, 1, CrcSpan::default(), &mut |k| {
        panic!("the fill's placeholder is gone, yet {k:?} was kept")
    });
    assert_eq!(kept, 0);
    assert_eq!(shape(&index), vec![(4 * K, 4 * K, Dirty)]);
}

#[test]
fn lookup_inside_one_key_is_one_trimmed_hit() {
    let index = Index::new(8 * MIB);
    let big = dirty(64 * K, 64 * K, 2, 128 * K);
    insert(&index, big);
    let pieces = lookup(&index, 72 * K, 4 * K, true);
    let mut want = big;
    want.off = 72 * K;
    want.len = 4096;
    want.pos.off = 136 * K as u32;
    assert_eq!(
        pieces,
        vec![Piece::Hit {
            off: 72 * K,
            len: 4096,
            key: want
        }]
    );
    assert_eq!(
        want.crc, big.crc,
        "the hit names the whole extent's CRC span"
    );
    // The key's very end, and the whole key.
    assert!(matches!(
        lookup(&index, 124 * K, 4 * K, true)[..],
        [Piece::Hit { off, len: 4096, key }] if off == 124 * K && key.pos.off == 188 * K as u32
    ));
    assert!(matches!(
        lookup(&index, 64 * K, 64 * K, true)[..],
        [Piece::Hit { key, .. }] if key == big
    ));
    assert_eq!(shape(&index), vec![(64 * K, 64 * K, Dirty)]);
}

#[test]
fn lookup_past_the_end_of_a_key_misses_the_rest() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(0, 8 * K, 1, 0));
    let pieces = lookup(&index, 4 * K, 8 * K, true);
    assert!(matches!(
        pieces[..],
        [
            Piece::Hit {
                off: 4096,
                len: 4096,
                ..
            },
            Piece::Miss {
                off: 8192,
                len: 4096,
                ticket: Some(_)
            }
        ]
    ));
}

#[test]
fn lookup_inside_zeroes_or_a_pending_fill() {
    let index = Index::new(8 * MIB);
    insert(&index, key(0, 16 * K, Zeroes, 0, 0));
    assert_eq!(
        lookup(&index, 4 * K, 4 * K, true),
        vec![Piece::Zeroes {
            off: 4096,
            len: 4096
        }]
    );
    let _ticket = take_ticket(lookup(&index, 16 * K, 16 * K, true));
    assert_eq!(
        lookup(&index, 20 * K, 4 * K, true),
        vec![Piece::Miss {
            off: 20 * K,
            len: 4096,
            ticket: None
        }],
        "a second reader of a pending fill reads the backing and does not fill"
    );
    assert_eq!(
        shape(&index),
        vec![(0, 16 * K, Zeroes), (16 * K, 16 * K, Empty)]
    );
}

#[test]
fn lookup_inside_a_stale_key_removes_it_and_fills() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(0, 64 * K, 1, 0));
    let reused = |seg: u32| if seg == 1 { 2 } else { 1 };
    let mut out = Vec::new();
    index.lookup(8 * K, 4 * K, true, &reused, &mut out);
    assert!(matches!(
        out[..],
        [Piece::Miss {
            off: 8192,
            len: 4096,
            ticket: Some(_)
        }]
    ));
    assert_eq!(shape(&index), vec![(8 * K, 4 * K, Empty)]);
    assert_eq!(index.extent_count(), 0);
}
