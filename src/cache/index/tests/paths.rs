// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Lookups, fills, stale generations and capacity limits.

use super::*;
use crate::cache::SEGMENT_SIZE;
use KeyKind::{Clean, Dirty, Empty, Zeroes};

#[test]
fn lookup_describes_hits_zeroes_and_gaps_in_order() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(4 * K, 4 * K, 1, 0));
    insert(&index, key(8 * K, 4 * K, Zeroes, 0, 0));
    insert(&index, key(12 * K, 4 * K, Zeroes, 0, 0));
    let pieces = lookup(&index, 6 * K, 14 * K, false);
    assert_eq!(
        pieces,
        vec![
            Piece::Hit {
                off: 6 * K,
                len: 2 * K as u32,
                key: IndexKey {
                    off: 6 * K,
                    len: 2 * K as u32,
                    pos: CachePos {
                        seg: 1,
                        off: 2 * K as u32
                    },
                    ..dirty(4 * K, 4 * K, 1, 0)
                },
            },
            // Adjacent zeroes keys come back as one piece.
            Piece::Zeroes {
                off: 8 * K,
                len: 8 * K as u32,
            },
            Piece::Miss {
                off: 16 * K,
                len: 4 * K as u32,
                ticket: None,
            },
        ]
    );
    assert_eq!(shape(&index).len(), 3, "a lookup without fill adds nothing");
}

#[test]
fn lookup_with_fill_places_one_placeholder_per_gap() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(4 * K, 4 * K, 1, 0));
    let pieces = lookup(&index, 0, 12 * K, true);
    let tickets: Vec<(u64, u32)> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Miss {
                ticket: Some(t),
                off,
                len,
            } => {
                assert_eq!((t.off(), t.len()), (*off, *len));
                Some((*off, *len))
            }
            _ => None,
        })
        .collect();
    assert_eq!(tickets, vec![(0, 4 * K as u32), (8 * K, 4 * K as u32)]);
    assert_eq!(
        shape(&index),
        vec![
            (0, 4 * K, Empty),
            (4 * K, 4 * K, Dirty),
            (8 * K, 4 * K, Empty)
        ]
    );
    assert_eq!(index.extent_count(), 1, "placeholders are not extents");
    let mut seen = Vec::new();
    index.for_each(&mut |k| seen.push(k.kind));
    assert_eq!(seen, vec![Dirty]);
}

#[test]
fn a_second_reader_of_a_pending_fill_reads_backing_without_filling() {
    let index = Index::new(8 * MIB);
    let ticket = take_ticket(lookup(&index, 0, 8 * K, true));
    let again = lookup(&index, 4 * K, 8 * K, true);
    assert!(matches!(
        again[..],
        [
            Piece::Miss {
                off: 4096,
                len: 4096,
                ticket: None
            },
            Piece::Miss {
                off: 8192,
                len: 4096,
                ticket: Some(_)
            },
        ]
    ));
    assert_ne!(take_ticket(again).id, ticket.id, "tickets are unique");
}

#[test]
fn completed_fill_becomes_clean_keys_and_is_logged() {
    let index = Index::new(8 * MIB);
    let ticket = take_ticket(lookup(&index, 8 * K, 8 * K, true));
    let pos = CachePos { seg: 9, off: 512 };
    let crc = CrcSpan {
        pos,
        len: 8 * K as u32,
        crc: 77,
    };
    let mut logged = Vec::new();
    let kept = index.complete_fill(ticket, pos, 4, crc, &mut |k| logged.push(*k));
    assert_eq!(kept, 8 * K);
    let expected = IndexKey {
        off: 8 * K,
        len: 8 * K as u32,
        kind: Clean,
        pos,
        gen: 4,
        crc,
    };
    assert_eq!(logged, vec![expected]);
    assert_eq!(index.checked_entries(), vec![expected]);
    assert_eq!(index.extent_count(), 1);
}

#[test]
fn fill_cut_by_writes_keeps_only_the_surviving_fragment() {
    let index = Index::new(8 * MIB);
    let ticket = take_ticket(lookup(&index, 0, 16 * K, true));
    insert(&index, dirty(4 * K, 4 * K, 1, 0));
    let pos = CachePos {
        seg: 9,
        off: 64 * K as u32,
    };
    let mut logged = Vec::new();
    let kept = index.complete_fill(ticket, pos, 4, CrcSpan::default(), &mut |k| logged.push(*k));
    assert_eq!(kept, 4 * K);
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (logged[0].off, logged[0].len, logged[0].pos),
        (0, 4 * K as u32, pos)
    );
    // The written part keeps the write; the part the placeholder lost is not filled.
    assert_eq!(
        shape(&index),
        vec![(0, 4 * K, Clean), (4 * K, 4 * K, Dirty)]
    );
    let rest = lookup(&index, 8 * K, 8 * K, false);
    assert!(matches!(rest[..], [Piece::Miss { ticket: None, .. }]));
}

#[test]
fn aborted_fill_removes_the_placeholder() {
    let index = Index::new(8 * MIB);
    let ticket = take_ticket(lookup(&index, 0, 16 * K, true));
    insert(&index, dirty(8 * K, 4 * K, 1, 0));
    index.abort_fill(ticket);
    assert_eq!(shape(&index), vec![(8 * K, 4 * K, Dirty)]);
    let next = lookup(&index, 0, 4 * K, true);
    assert!(matches!(
        next[..],
        [Piece::Miss {
            ticket: Some(_),
            ..
        }]
    ));
}

#[test]
fn stale_keys_read_as_absent_and_are_removed_on_lookup() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(0, 4 * K, 1, 0)); // gen 1 in segment 1
    insert(&index, dirty(4 * K, 4 * K, 2, 0)); // gen 1 in segment 2
    insert(&index, key(8 * K, 4 * K, Zeroes, 1, 0));
    let seg1_reused = |seg: u32| if seg == 1 { 2 } else { 1 };
    let mut out = Vec::new();
    index.lookup(0, 12 * K, false, &seg1_reused, &mut out);
    assert!(matches!(
        out[..],
        [
            Piece::Miss {
                off: 0,
                len: 4096,
                ticket: None
            },
            Piece::Hit { off: 4096, .. },
            Piece::Zeroes { off: 8192, .. },
        ]
    ));
    assert_eq!(
        shape(&index),
        vec![(4 * K, 4 * K, Dirty), (8 * K, 4 * K, Zeroes)]
    );
}

#[test]
fn stale_key_reaching_into_a_lookup_is_removed_and_filled_over() {
    let index = Index::new(8 * MIB);
    insert(&index, dirty(0, 8 * K, 1, 0));
    let mut out = Vec::new();
    index.lookup(4 * K, 4 * K, true, &|_| 5, &mut out);
    assert!(matches!(
        out[..],
        [Piece::Miss {
            off: 4096,
            len: 4096,
            ticket: Some(_)
        }]
    ));
    assert_eq!(shape(&index), vec![(4 * K, 4 * K, Empty)]);
}

#[test]
fn remove_stale_respects_its_budget_and_resumes() {
    let index = Index::new(12 * MIB);
    for i in 0..30u64 {
        // Spread over all three regions; even keys live in segment 1, odd ones in segment 2.
        let seg = 1 + (i % 2) as u32;
        insert(&index, dirty(i * 400 * K, 4 * K, seg, 0));
    }
    let seg1_reused = |seg: u32| if seg == 1 { 2 } else { 1 };
    let mut total = 0;
    loop {
        let n = index.remove_stale(&seg1_reused, 4);
        assert!(n <= 4);
        total += n;
        if n < 4 {
            break;
        }
    }
    assert_eq!(total, 15);
    assert_eq!(index.remove_stale(&seg1_reused, 100), 0);
    let mut segs = Vec::new();
    index.for_each(&mut |k| segs.push(k.pos.seg));
    assert_eq!(segs, vec![2; 15]);
    assert_eq!(index.extent_count(), 15);
}

#[test]
fn beyond_capacity_nothing_is_indexed_and_everything_misses() {
    let index = Index::new(4 * MIB + 8 * K);
    let parts = insert(&index, dirty(4 * MIB, 16 * K, 1, 0));
    assert_eq!(parts.len(), 1);
    assert_eq!(u64::from(parts[0].len), 8 * K);
    let pieces = lookup(&index, 4 * MIB + 4 * K, 16 * K, true);
    assert!(matches!(
        pieces[..],
        [Piece::Hit { len: 4096, .. }, Piece::Miss { off, len: 12288, ticket: None }]
            if off == 4 * MIB + 8 * K
    ));
    let far = lookup(&index, u64::MAX - 4 * K, 8 * K, true);
    assert_eq!(far.iter().map(|p| u64::from(p.len())).sum::<u64>(), 4 * K);
    insert(&index, dirty(u64::MAX - 511, 512, 1, 0));
    assert!(Index::new(0).checked_entries().is_empty());
    assert_eq!(
        index.complete_fill(
            FillTicket {
                id: 99,
                off: u64::MAX,
                len: 512
            },
            CachePos::default(),
            1,
            CrcSpan::default(),
            &mut |_| {}
        ),
        0
    );
}

#[test]
fn packed_entries_give_back_every_field() {
    let index = Index::new(8 * MIB);
    let mut keys = Vec::new();
    for (i, kind) in [Dirty, Clean, Zeroes].into_iter().enumerate() {
        let mut k = key(
            i as u64 * 4 * MIB / 4,
            4 * MIB / 4,
            kind,
            u32::MAX - 1,
            1 << 31,
        );
        k.gen = (1 << 40) | i as u64;
        // The span lies in the key's own segment (an entry stores only its offset), at most
        // one whole segment long and starting at most at its last sector.
        k.crc = CrcSpan {
            pos: CachePos {
                seg: u32::MAX - 1,
                off: (SEGMENT_SIZE - 512) as u32 * (i as u32 % 2),
            },
            len: if i == 0 { SEGMENT_SIZE as u32 } else { 512 },
            crc: 0xdead_beef,
        };
        insert(&index, k);
        keys.push(k);
    }
    // A whole-region key is the longest an entry gets.
    let whole = key(4 * MIB, 4 * MIB, Dirty, 1, 0);
    insert(&index, whole);
    keys.push(whole);
    assert_eq!(index.checked_entries(), keys);
}

#[test]
fn reclaimed_zeroes_leave_by_stamp_and_later_keys_stay() {
    let index = Index::new(16 * MIB);
    let zeroes = |off, len, stamp| IndexKey {
        gen: stamp,
        ..key(off, len, KeyKind::Zeroes, 0, 0)
    };
    // Zeroes key 7 over [0, 64K) and across a region boundary, cut by a data key in its
    // middle; zeroes key 8 over part of it later.
    insert(&index, zeroes(0, 64 * K, 7));
    insert(&index, zeroes(4 * MIB - 8 * K, 16 * K, 7));
    insert(&index, dirty(16 * K, 4 * K, 1, 0));
    insert(&index, zeroes(48 * K, 8 * K, 8));
    assert_eq!(
        index.remove_zeroes(0, 64 * K as u32, 7),
        3,
        "both fragments and the tail"
    );
    assert_eq!(
        index.remove_zeroes(4 * MIB - 8 * K, 16 * K as u32, 7),
        2,
        "a part in each region"
    );
    assert_eq!(
        shape(&index),
        vec![
            (16 * K, 4 * K, KeyKind::Dirty),
            (48 * K, 8 * K, KeyKind::Zeroes)
        ]
    );
    assert_eq!(
        index.remove_zeroes(0, 64 * K as u32, 9),
        0,
        "no key carries stamp 9"
    );
}

#[test]
fn prefetch_is_only_a_hint_inside_and_beyond_the_capacity() {
    let index = Index::new(8 * MIB);
    let k = dirty(4 * K, 4 * K, 1, 0);
    insert(&index, k);
    for off in [0, 4 * K, 8 * MIB - 1, 8 * MIB, u64::MAX] {
        index.prefetch(off);
    }
    assert_eq!(index.checked_entries(), vec![k]);
}
