// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
mod chunk_map;
mod concurrent;
mod fast_paths;
mod fixup;
pub(crate) mod memory;
mod model;
mod paths;

use super::*;

const K: u64 = 1024;
const MIB: u64 = 1 << 20;

/// A key of `kind` over `[off, off + len)` whose data sits at `(seg, seg_off)`, with a CRC span
/// covering exactly the key, so tests can check the span survives cuts.
fn key(off: u64, len: u64, kind: KeyKind, seg: u32, seg_off: u64) -> IndexKey {
    let pos = CachePos {
        seg,
        off: seg_off as u32,
    };
    IndexKey {
        off,
        len: len as u32,
        kind,
        pos,
        gen: 1,
        crc: CrcSpan {
            pos,
            len: len as u32,
            crc: seg ^ seg_off as u32 ^ 0x5a5a,
        },
    }
}

fn dirty(off: u64, len: u64, seg: u32, seg_off: u64) -> IndexKey {
    key(off, len, KeyKind::Dirty, seg, seg_off)
}

fn gen_one(_: u32) -> u64 {
    1
}

fn insert(index: &Index, key: IndexKey) -> Vec<IndexKey> {
    let mut seen = Vec::new();
    index.insert(key, &mut |k| seen.push(*k));
    seen
}

fn lookup(index: &Index, off: u64, len: u64, fill: bool) -> Vec<Piece> {
    let mut out = Vec::new();
    index.lookup(off, len, fill, &gen_one, &mut out);
    out
}

/// The single ticket in `pieces`.
fn take_ticket(pieces: Vec<Piece>) -> FillTicket {
    let mut tickets = pieces.into_iter().filter_map(|p| match p {
        Piece::Miss { ticket, .. } => ticket,
        _ => None,
    });
    let ticket = tickets.next().expect("a ticket");
    assert!(tickets.next().is_none(), "more than one ticket");
    ticket
}

/// `(off, len, kind)` of every entry, placeholders included.
fn shape(index: &Index) -> Vec<(u64, u64, KeyKind)> {
    index
        .checked_entries()
        .iter()
        .map(|k| (k.off, u64::from(k.len), k.kind))
        .collect()
}

fn entry_at(index: &Index, off: u64) -> IndexKey {
    *index
        .checked_entries()
        .iter()
        .find(|k| k.off == off)
        .unwrap_or_else(|| panic!("no entry at {off}"))
}
