// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Every on-media decoder on arbitrary bytes: superblock, cache_info, key_tail, dirty_tail,
//! segment info, generation, backing_identity, and ksets with their keys. The input may ask for a correct
//! header and CRC to be filled in, so the checks behind the CRC (the ones bit rot cannot
//! reach but a bug or a foreign writer could) are fuzzed too. Nothing may panic, and whatever
//! decodes must encode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_pcache::backing::identity::BlockIdentity;
use vhost_user_pcache::cache::format::{
    decode_record, encode_record, kset_size, CacheInfo, Generation, Kset, KsetCodec, Layout,
    MetaRecord, RecordKind, SegmentInfo, Superblock, TailPos, CRC_SEED, FORMAT_VERSION,
    KSET_FLAG_LAST, KSET_HEADER_SIZE, KSET_MAGIC, KSET_MAX_KEYS,
};

const CACHE_ID: [u8; 16] = *b"fuzz-cache-id-01";

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if b.len() >= at + v.len() {
        b[at..at + v.len()].copy_from_slice(v);
    }
}

/// Decode `bytes` as a record of `kind`; what decodes must survive encode + decode unchanged.
fn record<R: MetaRecord + PartialEq + std::fmt::Debug>(
    bytes: &mut Vec<u8>,
    kind: RecordKind,
    fix: u8,
) {
    if fix & 1 != 0 {
        bytes.resize(bytes.len().max(R::LEN), 0);
        put(bytes, 4, &kind.tag().to_le_bytes());
        put(bytes, 6, &FORMAT_VERSION.to_le_bytes());
    }
    if fix & 2 != 0 && bytes.len() >= R::LEN {
        let crc = crc32c::crc32c_append(CRC_SEED, &bytes[4..R::LEN]);
        put(bytes, 0, &crc.to_le_bytes());
    }
    if let Ok((r, seq)) = decode_record::<R>(bytes, kind) {
        let again = encode_record(&r, kind, seq);
        let (back, back_seq) =
            decode_record::<R>(&again, kind).expect("a record decodes after encoding");
        assert_eq!((back, back_seq), (r, seq));
    }
}

fn kset(bytes: &mut Vec<u8>, fix: u8, shape: &[u8; 9]) {
    let n_segments = 2 + u32::from(shape[0] % 64);
    let layout = Layout::with_segments(Layout::media_len_for(n_segments), n_segments).unwrap();
    let backing_size = u64::from_le_bytes(shape[1..9].try_into().unwrap()) >> (shape[0] >> 6);
    let codec = KsetCodec::new(layout, backing_size, CACHE_ID);
    if fix & 1 != 0 {
        bytes.resize(bytes.len().max(KSET_HEADER_SIZE), 0);
        put(bytes, 4, &RecordKind::Kset.tag().to_le_bytes());
        put(bytes, 6, &FORMAT_VERSION.to_le_bytes());
        put(bytes, 16, &KSET_MAGIC.to_le_bytes());
        if fix & 4 != 0 {
            // A plausible key count, so the keys are reached.
            let count =
                u32::from_le_bytes(bytes[28..32].try_into().unwrap()) % (KSET_MAX_KEYS as u32 + 1);
            put(bytes, 28, &count.to_le_bytes());
            let flags = u32::from_le_bytes(bytes[24..28].try_into().unwrap()) & KSET_FLAG_LAST;
            put(bytes, 24, &flags.to_le_bytes());
        }
    }
    let expected_seq = if bytes.len() >= 16 && fix & 8 != 0 {
        u64::from_le_bytes(bytes[8..16].try_into().unwrap())
    } else {
        1
    };
    if fix & 2 != 0 && bytes.len() >= KSET_HEADER_SIZE {
        let flags = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
        let count = u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as usize;
        let n = if flags & KSET_FLAG_LAST != 0 {
            0
        } else {
            count
        };
        if n <= KSET_MAX_KEYS && bytes.len() >= kset_size(n) {
            let seed = crc32c::crc32c_append(CRC_SEED, &CACHE_ID);
            let crc = crc32c::crc32c_append(seed, &bytes[4..kset_size(n)]);
            put(bytes, 0, &crc.to_le_bytes());
        }
    }
    match codec.decode_kset(bytes, expected_seq) {
        Ok(k) => {
            let mut again = Vec::new();
            match &k {
                Kset::Keys { seq, keys } => codec.encode_kset(*seq, keys, &mut again),
                Kset::Last { seq, next_seg } => codec.encode_last_kset(*seq, *next_seg, &mut again),
            }
            .expect("a decoded kset encodes");
            assert_eq!(again.len(), k.encoded_len());
            assert_eq!(
                &again[..],
                &bytes[..again.len()],
                "a kset re-encodes to other bytes"
            );
        }
        Err(e) => {
            let _ = e.is_end_of_log();
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 11 {
        return;
    }
    let (which, fix) = (data[0], data[1]);
    let shape: [u8; 9] = data[2..11].try_into().unwrap();
    let mut bytes = data[11..].to_vec();
    match which % 8 {
        0 => {
            record::<Superblock>(&mut bytes, RecordKind::Superblock, fix);
            if let Ok((sb, _)) = decode_record::<Superblock>(&bytes, RecordKind::Superblock) {
                let media_len = u64::from_le_bytes(shape[1..9].try_into().unwrap());
                if let Ok(layout) = sb.layout(media_len) {
                    assert!(Layout::media_len_for(layout.n_segments()) <= media_len);
                }
            }
        }
        1 => record::<CacheInfo>(&mut bytes, RecordKind::CacheInfo, fix),
        2 => record::<TailPos>(&mut bytes, RecordKind::KeyTail, fix),
        3 => record::<TailPos>(&mut bytes, RecordKind::DirtyTail, fix),
        4 => record::<SegmentInfo>(&mut bytes, RecordKind::SegmentInfo, fix),
        5 => record::<Generation>(&mut bytes, RecordKind::Generation, fix),
        7 => record::<BlockIdentity>(&mut bytes, RecordKind::BackingIdentity, fix),
        _ => kset(&mut bytes, fix, &shape),
    }
});
