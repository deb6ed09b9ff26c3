// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The index against a plain per-sector model under random operation sequences.

use proptest::prelude::*;

use super::*;

const SECTOR: u64 = 512;
const REGION_SECTORS: u64 = REGION_SIZE / SECTOR;
/// Two and a half regions: keys span boundaries, and the last region is partial.
const CAP_SECTORS: u64 = 5 * REGION_SECTORS / 2;
const SEGS: usize = 4;

/// What one sector maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sector {
    Absent,
    Zero,
    /// Cache byte position of this very sector.
    Data {
        kind: KeyKind,
        seg: u32,
        pos: u32,
        gen: u64,
        crc: CrcSpan,
    },
    /// Under the placeholder of this ticket id.
    Pending(u64),
}

struct Model {
    sectors: Vec<Sector>,
    gens: [u64; SEGS],
}

impl Model {
    fn is_stale(&self, s: Sector) -> bool {
        matches!(s, Sector::Data { seg, gen, .. } if gen < self.gens[seg as usize])
    }

    /// Stale data reads as absent: normalise so two pictures can be compared.
    fn live(&self, s: Sector) -> Sector {
        if self.is_stale(s) {
            Sector::Absent
        } else {
            s
        }
    }

    fn insert(&mut self, key: &IndexKey) {
        let (start, end) = ((key.off / SECTOR) as usize, (key.end() / SECTOR) as usize);
        // A placeholder touched by a write keeps only what lies before the write.
        let mut cut = Vec::new();
        for s in &self.sectors[start..end] {
            if let Sector::Pending(id) = s {
                cut.push(*id);
            }
        }
        for s in &mut self.sectors[start..] {
            if matches!(s, Sector::Pending(id) if cut.contains(id)) {
                *s = Sector::Absent;
            }
        }
        for (i, s) in self.sectors[start..end].iter_mut().enumerate() {
            *s = data_sector(key, i);
        }
    }
}

fn data_sector(key: &IndexKey, i: usize) -> Sector {
    match key.kind {
        KeyKind::Zeroes => Sector::Zero,
        KeyKind::Empty => Sector::Pending(key.gen),
        kind => Sector::Data {
            kind,
            seg: key.pos.seg,
            pos: key.pos.off + (i as u64 * SECTOR) as u32,
            gen: key.gen,
            crc: key.crc,
        },
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert {
        range: (u64, u64),
        kind: KeyKind,
        seg: u32,
        seg_sector: u32,
    },
    Lookup {
        range: (u64, u64),
        fill: bool,
    },
    /// An insert over exactly the range of an existing entry (placeholders included).
    InsertOver {
        pick: usize,
        kind: KeyKind,
        seg: u32,
        seg_sector: u32,
    },
    /// A lookup of a part of an existing entry (placeholders and stale keys included).
    LookupInside {
        pick: usize,
        part: (u64, u64),
        fill: bool,
    },
    Complete {
        pick: usize,
        seg: u32,
        seg_sector: u32,
    },
    Abort {
        pick: usize,
    },
    BumpGen {
        seg: u32,
    },
    RemoveStale {
        max: usize,
    },
}

/// A sector range near a region boundary (where the interesting cases are), mostly short,
/// sometimes spanning more than a region.
fn range() -> impl Strategy<Value = (u64, u64)> {
    let base = prop_oneof![
        Just(0),
        Just(REGION_SECTORS - 96),
        Just(2 * REGION_SECTORS - 96),
        Just(CAP_SECTORS - 160),
    ];
    let len = prop_oneof![6 => 1u64..48, 1 => 1u64..(2 * REGION_SECTORS + 200)];
    (base, 0u64..192, len).prop_map(|(base, d, len)| {
        let off = (base + d).min(CAP_SECTORS - 1);
        (off, len.min(CAP_SECTORS - off))
    })
}

/// One 4 KiB-aligned 4 KiB block of a few near a region boundary: as random 4 KiB I/O does,
/// blocks land in gaps, replace one another exactly, and are read inside what holds them.
fn block() -> impl Strategy<Value = (u64, u64)> {
    let base = prop_oneof![Just(0), Just(REGION_SECTORS - 96), Just(CAP_SECTORS - 160)];
    (base, 0u64..20).prop_map(|(base, b)| (base + b * 8, 8))
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        3 => Just(KeyKind::Dirty),
        1 => Just(KeyKind::Clean),
        1 => Just(KeyKind::Zeroes)
    ];
    let seg = 0..SEGS as u32;
    // Cache positions stay in the first half of a 16 MiB segment (2^14 sectors), so that a
    // key and its CRC span lie inside one segment, as the engine's always do.
    prop_oneof![
        5 => (range(), kind.clone(), seg.clone(), 0u32..1 << 14).prop_map(|(range, kind, seg, seg_sector)| {
            Op::Insert { range, kind, seg, seg_sector }
        }),
        5 => (range(), any::<bool>()).prop_map(|(range, fill)| Op::Lookup { range, fill }),
        4 => (block(), kind.clone(), seg.clone(), 0u32..1 << 14).prop_map(
            |(range, kind, seg, seg_sector)| Op::Insert { range, kind, seg, seg_sector }
        ),
        3 => (block(), any::<bool>()).prop_map(|(range, fill)| Op::Lookup { range, fill }),
        2 => (any::<usize>(), kind.clone(), seg.clone(), 0u32..1 << 14).prop_map(
            |(pick, kind, seg, seg_sector)| Op::InsertOver { pick, kind, seg, seg_sector }
        ),
        2 => (any::<usize>(), any::<(u64, u64)>(), any::<bool>()).prop_map(
            |(pick, part, fill)| Op::LookupInside { pick, part, fill }
        ),
        2 => (any::<usize>(), seg.clone(), 0u32..1 << 14).prop_map(|(pick, seg, seg_sector)| {
            Op::Complete { pick, seg, seg_sector }
        }),
        1 => any::<usize>().prop_map(|pick| Op::Abort { pick }),
        1 => seg.prop_map(|seg| Op::BumpGen { seg }),
        1 => (1usize..20).prop_map(|max| Op::RemoveStale { max }),
    ]
}

fn check_insert(index: &Index, model: &mut Model, key: IndexKey) {
    let mut parts = Vec::new();
    index.insert(key, &mut |k| parts.push(*k));
    let mut at = key.off;
    for part in &parts {
        assert_eq!(part.off, at, "parts are consecutive and in order");
        assert_eq!(part.off >> REGION_SHIFT, (part.end() - 1) >> REGION_SHIFT);
        assert_eq!(*part, trim(&key, part.off, part.len));
        at = part.end();
    }
    assert_eq!(at, key.end());
    model.insert(&key);
}

fn check_lookup(
    index: &Index,
    model: &mut Model,
    (off, len): (u64, u64),
    fill: bool,
    tickets: &mut Vec<FillTicket>,
) {
    let gens = model.gens;
    let mut out = Vec::new();
    index.lookup(
        off * SECTOR,
        len * SECTOR,
        fill,
        &|seg| gens[seg as usize],
        &mut out,
    );
    for s in off..off + len {
        let live = model.live(model.sectors[s as usize]);
        model.sectors[s as usize] = live;
    }
    let absent = |s: u64| model.sectors[s as usize] == Sector::Absent;
    let mut at = off * SECTOR;
    for piece in &out {
        assert_eq!(piece.off(), at, "pieces are consecutive: {out:?}");
        assert!(!piece.is_empty() && u64::from(piece.len()) % SECTOR == 0);
        at += u64::from(piece.len());
        let first = piece.off() / SECTOR;
        let sectors = first..first + u64::from(piece.len()) / SECTOR;
        match piece {
            Piece::Hit { off, len, key } => {
                assert_eq!((key.off, key.len), (*off, *len));
                for (i, s) in sectors.enumerate() {
                    assert_eq!(model.sectors[s as usize], data_sector(key, i), "sector {s}");
                }
            }
            Piece::Zeroes { .. } => {
                for s in sectors {
                    assert_eq!(model.sectors[s as usize], Sector::Zero, "sector {s}");
                }
            }
            Piece::Miss { ticket: None, .. } => {
                for s in sectors {
                    let pending = matches!(model.sectors[s as usize], Sector::Pending(_));
                    assert!(pending || (!fill && absent(s)), "sector {s}");
                }
            }
            Piece::Miss {
                off: byte_off,
                len: byte_len,
                ticket: Some(ticket),
            } => {
                assert!(fill);
                assert_eq!((ticket.off, ticket.len), (*byte_off, *byte_len));
                let (start, end) = (sectors.start, sectors.end);
                assert_eq!(start / REGION_SECTORS, (end - 1) / REGION_SECTORS);
                assert!(sectors.clone().all(absent), "ticket over {start}..{end}");
                // Each gap gets one placeholder: the run of absent sectors is maximal.
                let same_region = |s: u64| s / REGION_SECTORS == start / REGION_SECTORS;
                assert!(start == off || !same_region(start - 1) || !absent(start - 1));
                assert!(end == off + len || !same_region(end) || !absent(end));
            }
        }
    }
    assert_eq!(at, (off + len) * SECTOR, "pieces cover the range");
    for piece in out {
        if let Piece::Miss {
            ticket: Some(t), ..
        } = piece
        {
            let first = t.off / SECTOR;
            for s in first..first + u64::from(t.len) / SECTOR {
                model.sectors[s as usize] = Sector::Pending(t.id);
            }
            tickets.push(t);
        }
    }
}

fn check_complete(index: &Index, model: &mut Model, ticket: FillTicket, seg: u32, sector: u32) {
    let pos = CachePos {
        seg,
        off: sector * SECTOR as u32,
    };
    let crc = CrcSpan {
        pos,
        len: ticket.len,
        crc: sector,
    };
    let gen = model.gens[seg as usize];
    let (id, first) = (ticket.id, ticket.off / SECTOR);
    let range = first as usize..(first + u64::from(ticket.len) / SECTOR) as usize;
    let mut logged = Vec::new();
    let kept = index.complete_fill(ticket, pos, gen, crc, &mut |k| logged.push(*k));
    let mut expected_kept = 0;
    for s in range.clone() {
        if model.sectors[s] == Sector::Pending(id) {
            let at = (s - range.start) as u32 * SECTOR as u32;
            model.sectors[s] = Sector::Data {
                kind: KeyKind::Clean,
                seg,
                pos: pos.off + at,
                gen,
                crc,
            };
            expected_kept += SECTOR;
        }
    }
    assert_eq!(kept, expected_kept);
    assert_eq!(logged.iter().map(|k| u64::from(k.len)).sum::<u64>(), kept);
    for key in &logged {
        let first = (key.off / SECTOR) as usize;
        for i in 0..(u64::from(key.len) / SECTOR) as usize {
            assert_eq!(model.sectors[first + i], data_sector(key, i));
        }
    }
}

fn abort(model: &mut Model, index: &Index, ticket: FillTicket) {
    for s in &mut model.sectors {
        if *s == Sector::Pending(ticket.id) {
            *s = Sector::Absent;
        }
    }
    index.abort_fill(ticket);
}

/// The whole index, sector by sector, equals the model (stale data counted as absent).
fn check_whole(index: &Index, model: &Model) {
    let mut seen = vec![Sector::Absent; CAP_SECTORS as usize];
    for key in index.checked_entries() {
        let first = (key.off / SECTOR) as usize;
        for i in 0..(u64::from(key.len) / SECTOR) as usize {
            seen[first + i] = model.live(data_sector(&key, i));
        }
    }
    for (s, (got, want)) in seen.iter().zip(&model.sectors).enumerate() {
        assert_eq!(*got, model.live(*want), "sector {s}");
    }
}

/// The key the `n`th operation inserts over the sector range `(off, len)`.
fn new_key(
    model: &Model,
    n: usize,
    (off, len): (u64, u64),
    kind: KeyKind,
    seg: u32,
    seg_sector: u32,
) -> IndexKey {
    let pos = CachePos {
        seg,
        off: seg_sector * SECTOR as u32,
    };
    IndexKey {
        off: off * SECTOR,
        len: (len * SECTOR) as u32,
        kind,
        pos,
        gen: model.gens[seg as usize],
        crc: CrcSpan {
            pos,
            len: (len * SECTOR) as u32,
            crc: n as u32,
        },
    }
}

/// The sector range `(off, len)` of the index's entry number `pick` (modulo their count).
fn entry_range(index: &Index, pick: usize) -> Option<(u64, u64)> {
    let entries = index.checked_entries();
    let entry = entries.get(pick % entries.len().max(1))?;
    Some((entry.off / SECTOR, u64::from(entry.len) / SECTOR))
}

fn run(ops: Vec<Op>) {
    let index = Index::new(CAP_SECTORS * SECTOR);
    let mut model = Model {
        sectors: vec![Sector::Absent; CAP_SECTORS as usize],
        gens: [1; SEGS],
    };
    let mut tickets = Vec::new();
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Insert {
                range,
                kind,
                seg,
                seg_sector,
            } => {
                let key = new_key(&model, n, range, kind, seg, seg_sector);
                check_insert(&index, &mut model, key);
            }
            Op::Lookup { range, fill } => {
                check_lookup(&index, &mut model, range, fill, &mut tickets)
            }
            Op::InsertOver {
                pick,
                kind,
                seg,
                seg_sector,
            } => {
                if let Some(range) = entry_range(&index, pick) {
                    let key = new_key(&model, n, range, kind, seg, seg_sector);
                    check_insert(&index, &mut model, key);
                }
            }
            Op::LookupInside {
                pick,
                part: (skip, len),
                fill,
            } => {
                if let Some((off, sectors)) = entry_range(&index, pick) {
                    let skip = skip % sectors;
                    let range = (off + skip, 1 + len % (sectors - skip));
                    check_lookup(&index, &mut model, range, fill, &mut tickets);
                }
            }
            Op::Complete {
                pick,
                seg,
                seg_sector,
            } if !tickets.is_empty() => {
                let ticket = tickets.swap_remove(pick % tickets.len());
                check_complete(&index, &mut model, ticket, seg, seg_sector);
            }
            Op::Abort { pick } if !tickets.is_empty() => {
                let ticket = tickets.swap_remove(pick % tickets.len());
                abort(&mut model, &index, ticket);
            }
            Op::BumpGen { seg } => model.gens[seg as usize] += 1,
            Op::RemoveStale { max } => {
                let gens = model.gens;
                assert!(index.remove_stale(&|seg| gens[seg as usize], max) <= max);
            }
            Op::Complete { .. } | Op::Abort { .. } => {}
        }
        if n % 8 == 7 {
            check_whole(&index, &model);
        }
    }
    check_whole(&index, &model);
    // A full stale sweep leaves only live keys behind.
    let gens = model.gens;
    index.remove_stale(&|seg| gens[seg as usize], usize::MAX);
    index.for_each(&mut |k| assert!(!k.has_data() || k.gen >= gens[k.pos.seg as usize]));
    check_whole(&index, &model);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        // Failing cases are kept beside this file (model.proptest-regressions) and rerun first.
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn index_agrees_with_a_per_sector_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}
