// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The four dm-pcache fix-up cases, for data keys and for placeholders.

use super::*;
use KeyKind::{Clean, Dirty, Empty, Zeroes};

#[test]
fn overlap_tail_cuts_the_front_of_the_old_key() {
    let index = Index::new(8 * MIB);
    let old = dirty(8 * K, 8 * K, 3, 64 * K);
    insert(&index, old);
    insert(&index, dirty(4 * K, 8 * K, 5, 0));
    assert_eq!(
        shape(&index),
        vec![(4 * K, 8 * K, Dirty), (12 * K, 4 * K, Dirty)]
    );
    let rest = entry_at(&index, 12 * K);
    assert_eq!(
        rest.pos,
        CachePos {
            seg: 3,
            off: 68 * K as u32
        }
    );
    assert_eq!(rest.crc, old.crc, "a cut keeps the on-media CRC span");
    assert_eq!(rest.gen, old.gen);
}

#[test]
fn overlap_head_cuts_the_back_of_the_old_key() {
    let index = Index::new(8 * MIB);
    let old = dirty(0, 8 * K, 3, 64 * K);
    insert(&index, old);
    insert(&index, dirty(4 * K, 8 * K, 5, 0));
    assert_eq!(
        shape(&index),
        vec![(0, 4 * K, Dirty), (4 * K, 8 * K, Dirty)]
    );
    let rest = entry_at(&index, 0);
    assert_eq!(rest.pos, old.pos);
    assert_eq!(rest.crc, old.crc);
}

#[test]
fn overlap_contain_deletes_the_old_key() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(4 * K, 4 * K, 3, 0));
    insert(&index, key(0, 12 * K, Zeroes, 0, 0));
    assert_eq!(shape(&index), vec![(0, 12 * K, Zeroes)]);
    assert_eq!(index.extent_count(), 1);
}

#[test]
fn exact_overwrite_replaces_the_old_key() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(4 * K, 4 * K, 3, 0));
    let new = key(4 * K, 4 * K, Clean, 4, 512);
    insert(&index, new);
    assert_eq!(index.checked_entries(), vec![new]);
}

#[test]
fn overlap_contained_splits_the_old_key() {
    let index = Index::new(8 * MIB);
    let old = dirty(0, 16 * K, 3, 64 * K);
    insert(&index, old);
    insert(&index, dirty(4 * K, 4 * K, 5, 0));
    assert_eq!(
        shape(&index),
        vec![
            (0, 4 * K, Dirty),
            (4 * K, 4 * K, Dirty),
            (8 * K, 8 * K, Dirty)
        ]
    );
    let back = entry_at(&index, 8 * K);
    assert_eq!(
        back.pos,
        CachePos {
            seg: 3,
            off: 72 * K as u32
        }
    );
    assert_eq!(back.crc, old.crc);
    assert_eq!(index.extent_count(), 3);
}

#[test]
fn one_insert_resolves_every_case_at_once() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(0, 8 * K, 1, 0)); // head overlapped
    insert(&index, dirty(8 * K, 4 * K, 1, 8 * K)); // contained
    insert(&index, key(12 * K, 4 * K, Zeroes, 0, 0)); // contained
    insert(&index, dirty(16 * K, 8 * K, 1, 16 * K)); // tail overlapped
    insert(&index, dirty(4 * K, 16 * K, 2, 0));
    assert_eq!(
        shape(&index),
        vec![
            (0, 4 * K, Dirty),
            (4 * K, 16 * K, Dirty),
            (20 * K, 4 * K, Dirty)
        ]
    );
    assert_eq!(entry_at(&index, 20 * K).pos.off, 20 * K as u32);
}

#[test]
fn zeroes_keys_cut_like_data_but_keep_no_position() {
    let index = Index::new(8 * MIB);
    insert(&index, key(0, 16 * K, Zeroes, 0, 0));
    insert(&index, dirty(4 * K, 4 * K, 1, 0));
    assert_eq!(
        shape(&index),
        vec![
            (0, 4 * K, Zeroes),
            (4 * K, 4 * K, Dirty),
            (8 * K, 8 * K, Zeroes)
        ]
    );
    assert_eq!(entry_at(&index, 8 * K).pos, CachePos { seg: 0, off: 0 });
}

/// A placeholder over `[off, off + len)`, inserted the way reads do.
fn placeholder(index: &Index, off: u64, len: u64) -> FillTicket {
    take_ticket(lookup(index, off, len, true))
}

#[test]
fn placeholder_overlapped_at_its_tail_by_a_write_is_deleted() {
    let index = Index::new(8 * MIB);
    let ticket = placeholder(&index, 8 * K, 8 * K);
    insert(&index, dirty(4 * K, 8 * K, 1, 0));
    assert_eq!(shape(&index), vec![(4 * K, 8 * K, Dirty)]);
    let mut logged = 0;
    let kept = index.complete_fill(
        ticket,
        CachePos::default(),
        1,
        CrcSpan::default(),
        &mut |_| logged += 1,
    );
    assert_eq!((kept, logged), (0, 0));
}

#[test]
fn placeholder_overlapped_at_its_head_is_cut() {
    let index = Index::new(8 * MIB);
    let ticket = placeholder(&index, 0, 8 * K);
    insert(&index, dirty(4 * K, 8 * K, 1, 0));
    assert_eq!(
        shape(&index),
        vec![(0, 4 * K, Empty), (4 * K, 8 * K, Dirty)]
    );
    assert_eq!(index.extent_count(), 1);
    let kept = index.complete_fill(
        ticket,
        CachePos { seg: 7, off: 0 },
        2,
        CrcSpan::default(),
        &mut |_| {},
    );
    assert_eq!(kept, 4 * K);
    assert_eq!(
        shape(&index),
        vec![(0, 4 * K, Clean), (4 * K, 8 * K, Dirty)]
    );
}

#[test]
fn placeholder_containing_a_write_is_truncated_not_split() {
    let index = Index::new(8 * MIB);
    let ticket = placeholder(&index, 0, 16 * K);
    insert(&index, dirty(4 * K, 4 * K, 1, 0));
    assert_eq!(
        shape(&index),
        vec![(0, 4 * K, Empty), (4 * K, 4 * K, Dirty)]
    );
    // The dropped back of the placeholder is a plain gap again: a new reader may fill it.
    let pieces = lookup(&index, 8 * K, 8 * K, true);
    assert!(matches!(
        pieces[..],
        [Piece::Miss {
            ticket: Some(_),
            ..
        }]
    ));
    index.abort_fill(ticket);
    assert_eq!(shape(&index)[0], (4 * K, 4 * K, Dirty));
}

#[test]
fn placeholder_inside_a_write_is_deleted() {
    let index = Index::new(8 * MIB);
    let ticket = placeholder(&index, 4 * K, 4 * K);
    insert(&index, dirty(0, 16 * K, 1, 0));
    assert_eq!(shape(&index), vec![(0, 16 * K, Dirty)]);
    index.abort_fill(ticket);
    assert_eq!(shape(&index), vec![(0, 16 * K, Dirty)]);
}

#[test]
fn key_spanning_regions_is_split_at_region_boundaries_in_order() {
    let index = Index::new(16 * MIB);
    let start = 4 * MIB - 4 * K;
    let whole = dirty(start, 4 * MIB + 8 * K, 2, 4 * K);
    let parts = insert(&index, whole);
    let expected: Vec<(u64, u64, u32)> = vec![
        (start, 4 * K, 4 * K as u32),
        (4 * MIB, 4 * MIB, 8 * K as u32),
        (8 * MIB, 4 * K, (4 * MIB + 8 * K) as u32),
    ];
    let got: Vec<(u64, u64, u32)> = parts
        .iter()
        .map(|p| (p.off, u64::from(p.len), p.pos.off))
        .collect();
    assert_eq!(got, expected);
    assert!(parts.iter().all(|p| p.crc == whole.crc && p.pos.seg == 2));
    assert_eq!(
        index.checked_entries(),
        parts,
        "what was logged is what is indexed"
    );

    // A lookup across the boundaries sees the parts as consecutive hits.
    let pieces = lookup(&index, start - 4 * K, 4 * MIB + 16 * K, false);
    let spans: Vec<(u64, u32, bool)> = pieces
        .iter()
        .map(|p| (p.off(), p.len(), matches!(p, Piece::Hit { .. })))
        .collect();
    assert_eq!(
        spans,
        vec![
            (start - 4 * K, 4 * K as u32, false),
            (start, 4 * K as u32, true),
            (4 * MIB, 4 * MIB as u32, true),
            (8 * MIB, 4 * K as u32, true),
            (8 * MIB + 4 * K, 4 * K as u32, false),
        ]
    );
}

#[test]
fn write_spanning_regions_cuts_keys_in_both() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(4 * MIB - 16 * K, 16 * K, 1, 0));
    insert(&index, dirty(4 * MIB, 16 * K, 1, 16 * K));
    insert(&index, dirty(4 * MIB - 8 * K, 16 * K, 2, 0));
    assert_eq!(
        shape(&index),
        vec![
            (4 * MIB - 16 * K, 8 * K, Dirty),
            (4 * MIB - 8 * K, 8 * K, Dirty),
            (4 * MIB, 8 * K, Dirty),
            (4 * MIB + 8 * K, 8 * K, Dirty),
        ]
    );
    assert_eq!(entry_at(&index, 4 * MIB + 8 * K).pos.off, 24 * K as u32);
}
