// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use proptest::prelude::*;

use super::*;
use crate::cache::media::{Media, RecordingMedia};
use crate::cache::{CachePos, SEGMENT_SIZE};

fn backing() -> BackingFingerprint {
    BackingFingerprint {
        size: 1 << 30,
        id: [0x5A; 32],
    }
}

fn formatted(n_segments: u32) -> (RecordingMedia, Layout, Superblock) {
    let media = RecordingMedia::new(Layout::media_len_for(n_segments)).unwrap();
    let layout = Layout::new(media.len()).unwrap();
    let sb = format(&media, &layout, &FormatOptions::new(backing())).unwrap();
    (media, layout, sb)
}

/// Bitwise CRC-32C as the format document describes it: reflected polynomial 0x82F63B78,
/// register initialised to !CRC_SEED, final xor 0xFFFFFFFF.
fn reference_crc(bytes: &[u8]) -> u32 {
    let mut reg = !CRC_SEED;
    for &b in bytes {
        reg ^= b as u32;
        for _ in 0..8 {
            reg = if reg & 1 != 0 {
                (reg >> 1) ^ 0x82F6_3B78
            } else {
                reg >> 1
            };
        }
    }
    !reg
}

#[test]
fn crc_matches_documented_definition() {
    for data in [&b""[..], b"a", b"123456789", &[0u8; 100][..]] {
        assert_eq!(record_crc(data), reference_crc(data));
        assert_eq!(data_crc(data), reference_crc(data));
    }
    assert_ne!(data_crc(&[0u8; 64]), crc32c::crc32c(&[0u8; 64]));
}

#[test]
fn layout_geometry() {
    assert!(matches!(
        Layout::new(Layout::media_len_for(2) - 1),
        Err(FormatError::MediaTooSmall { .. })
    ));
    assert!(Layout::new(0).is_err());
    let l = Layout::new(Layout::media_len_for(2)).unwrap();
    assert_eq!(l.n_segments(), 2);
    let l = Layout::new(Layout::media_len_for(5) + SEGMENT_SIZE - 1).unwrap();
    assert_eq!(l.n_segments(), 5);
    assert_eq!(l.segment_offset(1), SEGMENTS_OFFSET + SEGMENT_SIZE);
    assert_eq!(l.data_start(1) % 4096, 0);
    assert_eq!(l.data_size() as u64, SEGMENT_SIZE - SEGMENT_DATA_OFFSET);
    assert_eq!(
        l.media_offset(CachePos { seg: 4, off: 512 }) + (l.data_size() as u64 - 512),
        Layout::media_len_for(5)
    );
    // Every replica slot has a page of its own.
    let mut all = vec![SUPERBLOCK_OFFSET];
    all.extend(CACHE_INFO_OFFSETS);
    all.extend(KEY_TAIL_OFFSETS);
    all.extend(DIRTY_TAIL_OFFSETS);
    all.extend(l.segment_info_slots(0).offsets);
    all.extend(l.generation_slots(0).offsets);
    let pages: std::collections::HashSet<u64> = all.iter().map(|o| o / META_PAGE).collect();
    assert_eq!(pages.len(), all.len());
}

fn round_trip<R: MetaRecord + PartialEq + std::fmt::Debug>(r: R, kind: RecordKind) {
    let bytes = encode_record(&r, kind, 77);
    assert_eq!(bytes.len(), R::LEN);
    assert_eq!(decode_record::<R>(&bytes, kind).unwrap(), (r, 77));
    for other in [
        RecordKind::CacheInfo,
        RecordKind::KeyTail,
        RecordKind::Generation,
    ] {
        if other != kind {
            assert!(matches!(
                decode_record::<R>(&bytes, other),
                Err(RecordFault::WrongKind { .. })
            ));
        }
    }
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(
            decode_record::<R>(&bad, kind).is_err(),
            "flip at byte {i} accepted"
        );
    }
}

#[test]
fn metadata_records_round_trip() {
    round_trip(
        Superblock {
            flags: 0,
            n_segments: 9,
            segment_size: SEGMENT_SIZE,
            segments_offset: SEGMENTS_OFFSET,
            cache_id: [7; 16],
        },
        RecordKind::Superblock,
    );
    round_trip(
        CacheInfo {
            n_segments: 3,
            data_crc: true,
            init_done: true,
            gc_percent: 90,
            backing: backing(),
        },
        RecordKind::CacheInfo,
    );
    let tail = TailPos {
        pos: CachePos { seg: 2, off: 4096 },
        log_seq: 1234,
    };
    round_trip(tail, RecordKind::KeyTail);
    round_trip(tail, RecordKind::DirtyTail);
    round_trip(
        SegmentInfo {
            seg_id: 5,
            seg_type: SegmentType::Cache,
            flags: 0,
        },
        RecordKind::SegmentInfo,
    );
    round_trip(
        Generation {
            seg_id: 5,
            gen: u64::MAX - 1,
        },
        RecordKind::Generation,
    );
}

#[test]
fn cache_info_refuses_out_of_range_fields() {
    let mut info = CacheInfo {
        n_segments: 3,
        data_crc: false,
        init_done: false,
        gc_percent: 91,
        backing: backing(),
    };
    let bytes = encode_record(&info, RecordKind::CacheInfo, 1);
    assert!(matches!(
        decode_record::<CacheInfo>(&bytes, RecordKind::CacheInfo),
        Err(RecordFault::BadField(_))
    ));
    info.gc_percent = 10;
    let other = BackingFingerprint {
        size: 1 << 30,
        id: [1; 32],
    };
    let err = info.check_backing(&other).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&backing().to_string()) && msg.contains(&other.to_string()),
        "{msg}"
    );
    info.check_backing(&backing()).unwrap();
}

#[test]
fn format_probe_and_open() {
    let media = RecordingMedia::new(Layout::media_len_for(3)).unwrap();
    assert_eq!(probe(&media).unwrap(), None);
    assert!(matches!(
        open_metadata(&media, &backing()),
        Err(FormatError::Unformatted)
    ));
    let layout = Layout::new(media.len()).unwrap();
    let mut opts = FormatOptions::new(backing());
    opts.data_crc = true;
    let sb = format(&media, &layout, &opts).unwrap();
    // Everything format wrote is durable.
    let reopened = RecordingMedia::from_image(media.durable_image()).unwrap();
    assert_eq!(probe(&reopened).unwrap(), Some(sb));
    let opened = open_metadata(&reopened, &backing()).unwrap();
    assert_eq!(opened.layout, layout);
    assert!(opened.cache_info.value.data_crc && !opened.cache_info.value.init_done);
    assert_eq!(opened.cache_info.value.gc_percent, DEFAULT_GC_PERCENT);
    for tail in [Tail::Key, Tail::Dirty] {
        let t = load_tail(&reopened, &layout, tail).unwrap().value;
        assert_eq!(
            t,
            TailPos {
                pos: CachePos { seg: 0, off: 0 },
                log_seq: 1
            }
        );
    }
    for seg in 0..3 {
        assert_eq!(load_generation(&reopened, &layout, seg).unwrap(), 0);
        assert_eq!(
            load_segment_info(&reopened, &layout, seg)
                .unwrap()
                .value
                .seg_id,
            seg
        );
    }
    let codec = KsetCodec::new(layout, backing().size, sb.cache_id);
    let mut head = vec![0u8; KSET_MAX_SIZE];
    reopened.read(layout.data_start(0), &mut head).unwrap();
    let err = codec.decode_kset(&head, 1).unwrap_err();
    assert!(matches!(err, FormatError::KsetAbsent(_)) && err.is_end_of_log());

    let wrong = BackingFingerprint {
        size: 2 << 30,
        id: [0x5A; 32],
    };
    assert!(matches!(
        open_metadata(&reopened, &wrong),
        Err(FormatError::WrongBacking { .. })
    ));

    // A second format gets a new cache id.
    let sb2 = format(&media, &layout, &opts).unwrap();
    assert_ne!(sb2.cache_id, sb.cache_id);
}

#[test]
fn probe_reports_corruption() {
    let (media, _, _) = formatted(2);
    media.write(SUPERBLOCK_OFFSET + 20, &[0xFF]).unwrap();
    assert!(matches!(probe(&media), Err(FormatError::Corrupt { .. })));

    let (media, _, _) = formatted(2);
    media.write(SUPERBLOCK_OFFSET + 2000, &[1]).unwrap();
    assert!(matches!(probe(&media), Err(FormatError::Corrupt { .. })));

    // A superblock claiming more segments than the media holds.
    let (media, _, sb) = formatted(2);
    let big = Superblock {
        n_segments: 3,
        ..sb
    };
    media
        .write(
            SUPERBLOCK_OFFSET,
            &encode_record(&big, RecordKind::Superblock, 0),
        )
        .unwrap();
    assert!(matches!(
        probe(&media),
        Err(FormatError::MediaTooSmall { .. })
    ));

    // Not our magic.
    let media = RecordingMedia::new(Layout::media_len_for(2)).unwrap();
    media
        .write(SUPERBLOCK_OFFSET, b"some other filesystem")
        .unwrap();
    let err = probe(&media).unwrap_err();
    assert!(err.to_string().contains("superblock at byte 4096"), "{err}");
}

#[test]
fn format_rejects_bad_options() {
    let media = RecordingMedia::new(Layout::media_len_for(2)).unwrap();
    let layout = Layout::new(media.len()).unwrap();
    let mut opts = FormatOptions::new(backing());
    opts.gc_percent = 91;
    assert!(matches!(
        format(&media, &layout, &opts),
        Err(FormatError::InvalidArgument(_))
    ));
    let bigger = Layout::new(Layout::media_len_for(3)).unwrap();
    opts.gc_percent = 0;
    assert!(format(&media, &bigger, &opts).is_err());
}

#[test]
fn store_alternates_slots_and_never_overwrites_the_newest() {
    let (media, layout, _) = formatted(2);
    let slots = layout.dirty_tail_slots();
    let mut newest_slot = 0; // format wrote slot 0
    for i in 1..6u32 {
        let before = {
            let mut b = vec![0u8; TailPos::LEN];
            media.read(slots.offsets[newest_slot], &mut b).unwrap();
            b
        };
        let tail = TailPos {
            pos: CachePos {
                seg: 1,
                off: i * 512,
            },
            log_seq: i as u64 + 1,
        };
        store_tail(&media, &layout, Tail::Dirty, &tail).unwrap();
        let mut after = vec![0u8; TailPos::LEN];
        media.read(slots.offsets[newest_slot], &mut after).unwrap();
        assert_eq!(before, after, "store overwrote the newest replica");
        let loaded = load_tail(&media, &layout, Tail::Dirty).unwrap();
        assert_eq!(loaded.value, tail);
        assert_eq!(loaded.seq, i as u64 + 1);
        assert_eq!(loaded.slot, 1 - newest_slot);
        newest_slot = loaded.slot;
    }
    // Stores are durable on return.
    let reopened = RecordingMedia::from_image(media.durable_image()).unwrap();
    assert_eq!(load_tail(&reopened, &layout, Tail::Dirty).unwrap().seq, 6);
    // The key tail is independent.
    assert_eq!(load_tail(&media, &layout, Tail::Key).unwrap().seq, 1);
}

#[test]
fn torn_store_leaves_old_or_new_value() {
    let (media, layout, _) = formatted(2);
    store_generation(&media, &layout, 1, 10).unwrap(); // slot 1, seq 2
    let slots = layout.generation_slots(1);
    let target = slots.offsets[0]; // the next store goes here
    let mut old = vec![0u8; Generation::LEN];
    media.read(target, &mut old).unwrap();
    store_generation(&media, &layout, 1, 11).unwrap();
    let mut new = vec![0u8; Generation::LEN];
    media.read(target, &mut new).unwrap();
    assert_ne!(old, new);
    let mut seen = std::collections::HashSet::new();
    for mask in 0u32..16 {
        // Every mix of old and new 8-byte words (4 words, 16 mixes).
        let mut torn = old.clone();
        for w in 0..4 {
            if mask & (1 << w) != 0 {
                torn[w * 8..w * 8 + 8].copy_from_slice(&new[w * 8..w * 8 + 8]);
            }
        }
        media.write(target, &torn).unwrap();
        let gen = load_generation(&media, &layout, 1).unwrap();
        // The new value only once every word that differs is new (equal words may be either).
        assert!(
            gen == 10 || (gen == 11 && torn == new),
            "mask {mask:#x} gave gen {gen}"
        );
        seen.insert(gen);
    }
    assert_eq!(seen.len(), 2);
    // Garbage in the slot being written: the old value still loads, and the next store
    // goes into the garbage slot again.
    media.write(target, &[0xEE; 32]).unwrap();
    assert_eq!(load_generation(&media, &layout, 1).unwrap(), 10);
    store_generation(&media, &layout, 1, 12).unwrap();
    let v = load_latest::<Generation>(&media, &slots).unwrap();
    assert_eq!((v.value.gen, v.slot, v.seq), (12, 0, 3));
}

#[test]
fn no_valid_replica_names_both_slots() {
    let (media, layout, _) = formatted(2);
    let slots = layout.cache_info_slots();
    media.write(slots.offsets[0] + 30, &[0xAB]).unwrap();
    let err = load_latest::<CacheInfo>(&media, &slots).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("cache_info"), "{msg}");
    assert!(
        msg.contains("8192") && msg.contains("CRC mismatch"),
        "{msg}"
    );
    assert!(msg.contains("12288") && msg.contains("all zero"), "{msg}");
}

#[test]
fn context_checks_reject_misplaced_records() {
    let (media, layout, _) = formatted(3);
    // Segment 1's generation copied into segment 2's slot 1 with a higher seq.
    let stolen = encode_record(
        &Generation { seg_id: 1, gen: 99 },
        RecordKind::Generation,
        50,
    );
    media
        .write(layout.generation_slots(2).offsets[1], &stolen)
        .unwrap();
    assert_eq!(load_generation(&media, &layout, 2).unwrap(), 0);
    // A tail pointing outside the layout.
    let far = TailPos {
        pos: CachePos { seg: 3, off: 0 },
        log_seq: 9,
    };
    media
        .write(
            KEY_TAIL_OFFSETS[1],
            &encode_record(&far, RecordKind::KeyTail, 9),
        )
        .unwrap();
    assert_eq!(
        load_tail(&media, &layout, Tail::Key).unwrap().value.log_seq,
        1
    );
    assert!(store_tail(&media, &layout, Tail::Key, &far).is_err());
    assert!(load_generation(&media, &layout, 3).is_err());
    // A key tail is never read as a dirty tail.
    let t = encode_record(&TailPos::default(), RecordKind::KeyTail, 99);
    media.write(DIRTY_TAIL_OFFSETS[1], &t).unwrap();
    assert_eq!(load_tail(&media, &layout, Tail::Dirty).unwrap().seq, 1);
}

fn codec() -> KsetCodec {
    let layout = Layout::new(Layout::media_len_for(3)).unwrap();
    KsetCodec::new(layout, 1 << 30, [9; 16])
}

fn key(i: u32) -> KeyRecord {
    KeyRecord {
        off: i as u64 * 4096,
        len: 4096,
        flags: if i % 3 == 0 { KEY_CLEAN } else { 0 },
        seg: i % 3,
        seg_off: i * 4096,
        gen: i as u64,
        data_crc: i.wrapping_mul(2654435761),
    }
}

#[test]
fn kset_round_trip_and_chain() {
    let c = codec();
    let keys: Vec<KeyRecord> = (0..KSET_MAX_KEYS as u32).map(key).collect();
    let zeroes = KeyRecord {
        off: 512,
        len: 1 << 20,
        flags: KEY_ZEROES,
        ..Default::default()
    };
    let mut log = Vec::new();
    c.encode_kset(5, &keys, &mut log).unwrap();
    c.encode_kset(6, &[zeroes], &mut log).unwrap();
    c.encode_last_kset(7, 2, &mut log).unwrap();
    log.extend_from_slice(&KSET_ZERO_HEADER);
    assert_eq!(
        log.len(),
        KSET_MAX_SIZE + kset_size(1) + 2 * KSET_HEADER_SIZE
    );

    let first = c.decode_kset(&log, 5).unwrap();
    assert_eq!(first, Kset::Keys { seq: 5, keys });
    let mut at = first.encoded_len();
    let second = c.decode_kset(&log[at..], 6).unwrap();
    assert_eq!(
        second,
        Kset::Keys {
            seq: 6,
            keys: vec![zeroes]
        }
    );
    at += second.encoded_len();
    assert_eq!(
        c.decode_kset(&log[at..], 7).unwrap(),
        Kset::Last {
            seq: 7,
            next_seg: 2
        }
    );
    at += KSET_HEADER_SIZE;
    assert!(c.decode_kset(&log[at..], 8).unwrap_err().is_end_of_log());

    // Replay requires exactly the expected sequence number.
    let err = c.decode_kset(&log, 4).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::KsetSeq {
                expected: 4,
                found: 5
            }
        ) && err.is_end_of_log()
    );
    // A kset of another format of the media (another cache id) does not pass.
    let other = KsetCodec::new(
        Layout::new(Layout::media_len_for(3)).unwrap(),
        1 << 30,
        [8; 16],
    );
    assert!(matches!(
        other.decode_kset(&log, 5),
        Err(FormatError::KsetBadCrc { .. })
    ));
    // Torn: any flipped byte inside the kset ends the log.
    for i in [0, 5, 12, 20, 27, 40, 1000, KSET_MAX_SIZE - 1] {
        let mut bad = log.clone();
        bad[i] ^= 1;
        let err = c.decode_kset(&bad, 5).unwrap_err();
        assert!(err.is_end_of_log(), "flip at {i}: {err}");
    }
    // Truncated input.
    assert!(matches!(
        c.decode_kset(&log[..100], 5),
        Err(FormatError::KsetTruncated { .. })
    ));
}

#[test]
fn kset_encode_refuses_what_decode_would() {
    let c = codec();
    let mut out = Vec::new();
    let too_many: Vec<KeyRecord> = (0..=KSET_MAX_KEYS as u32).map(key).collect();
    assert!(c.encode_kset(1, &too_many, &mut out).is_err());
    assert!(c.encode_last_kset(1, 3, &mut out).is_err());
    let bad = [
        KeyRecord { len: 0, ..key(1) },
        KeyRecord {
            len: 1000,
            ..key(1)
        },
        KeyRecord { off: 100, ..key(1) },
        KeyRecord {
            off: (1 << 30) - 512,
            ..key(1)
        },
        KeyRecord { seg: 3, ..key(1) },
        KeyRecord {
            seg_off: SEGMENT_DATA_SIZE - 512,
            ..key(1)
        },
        KeyRecord {
            seg_off: 4096 + 100,
            ..key(1)
        },
        KeyRecord {
            flags: 1 << 7,
            ..key(1)
        },
        KeyRecord {
            flags: KEY_ZEROES,
            ..key(1)
        },
        KeyRecord {
            off: u64::MAX - 511,
            ..key(1)
        },
    ];
    for k in bad {
        assert!(
            matches!(
                c.encode_kset(1, &[k], &mut out),
                Err(FormatError::BadKey { .. })
            ),
            "{k:?}"
        );
    }
    assert!(out.is_empty());
    // Exactly at the bounds is fine.
    let edge = KeyRecord {
        seg: 2,
        seg_off: SEGMENT_DATA_SIZE - 4096,
        off: (1 << 30) - 4096,
        ..key(1)
    };
    c.encode_kset(1, &[edge], &mut out).unwrap();
}

#[test]
fn kset_with_valid_crc_but_bad_key_is_corruption_not_end_of_log() {
    // Encoded by a codec that allows more (as an attacker with the public seed could).
    let wide = KsetCodec::new(
        Layout::new(Layout::media_len_for(5)).unwrap(),
        1 << 40,
        [9; 16],
    );
    let c = codec();
    let mut out = Vec::new();
    wide.encode_kset(3, &[key(1), KeyRecord { seg: 4, ..key(2) }], &mut out)
        .unwrap();
    let err = c.decode_kset(&out, 3).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::BadKey {
                seq: 3,
                index: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_end_of_log());
    out.clear();
    wide.encode_last_kset(3, 4, &mut out).unwrap();
    let err = c.decode_kset(&out, 3).unwrap_err();
    assert!(matches!(err, FormatError::KsetBadField { .. }) && !err.is_end_of_log());
    out.clear();
    wide.encode_kset(
        3,
        &[KeyRecord {
            off: 1 << 30,
            ..key(1)
        }],
        &mut out,
    )
    .unwrap();
    assert!(matches!(
        c.decode_kset(&out, 3),
        Err(FormatError::BadKey { .. })
    ));
}

#[test]
fn kset_key_count_is_checked_before_the_crc() {
    let c = codec();
    let mut out = Vec::new();
    c.encode_kset(1, &[key(1)], &mut out).unwrap();
    out[28..32].copy_from_slice(&129u32.to_le_bytes());
    out.resize(KSET_MAX_SIZE + 4096, 0);
    assert!(matches!(
        c.decode_kset(&out, 1),
        Err(FormatError::KsetTooManyKeys { count: 129 })
    ));
}

proptest! {
    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        for kind in [RecordKind::Superblock, RecordKind::CacheInfo, RecordKind::KeyTail,
                     RecordKind::SegmentInfo, RecordKind::Generation, RecordKind::Kset] {
            let _ = decode_record::<Superblock>(&bytes, kind);
            let _ = decode_record::<CacheInfo>(&bytes, kind);
            let _ = decode_record::<TailPos>(&bytes, kind);
            let _ = decode_record::<SegmentInfo>(&bytes, kind);
            let _ = decode_record::<Generation>(&bytes, kind);
        }
        let c = codec();
        for seq in [0, 1, u64::MAX] {
            let _ = c.decode_kset(&bytes, seq);
        }
    }

    #[test]
    fn decoding_mutated_ksets_never_panics_and_keys_stay_in_bounds(
        n in 0usize..=KSET_MAX_KEYS,
        edits in proptest::collection::vec((0usize..KSET_MAX_SIZE, any::<u8>()), 0..8),
        fix_crc in any::<bool>(),
    ) {
        let c = codec();
        let keys: Vec<KeyRecord> = (0..n as u32).map(key).collect();
        let mut out = Vec::new();
        c.encode_kset(42, &keys, &mut out).unwrap();
        for (at, v) in edits {
            if at < out.len() {
                out[at] = v;
            }
        }
        if fix_crc {
            // Recompute the CRC as an attacker could: only field checks stand in the way.
            let mut seeded = crc32c::crc32c_append(CRC_SEED, &[9; 16]);
            seeded = crc32c::crc32c_append(seeded, &out[4..]);
            out[0..4].copy_from_slice(&seeded.to_le_bytes());
        }
        let layout = Layout::new(Layout::media_len_for(3)).unwrap();
        if let Ok(Kset::Keys { keys, .. }) = c.decode_kset(&out, 42) {
            for k in keys {
                prop_assert!(k.validate(&layout, 1 << 30).is_ok());
            }
        }
    }

    #[test]
    fn probe_never_panics_on_random_superblock(page in proptest::collection::vec(any::<u8>(), 64..4096)) {
        let media = RecordingMedia::new(Layout::media_len_for(2)).unwrap();
        media.write(SUPERBLOCK_OFFSET, &page).unwrap();
        let _ = probe(&media);
    }
}

#[test]
fn encodings_match_the_documented_offsets() {
    assert_eq!(SUPERBLOCK_MAGIC, 0x752d_6568_6361_6370);
    assert_eq!(KSET_MAGIC, 0x7465_736b_2d75_6370);
    assert_eq!(KSET_MAX_SIZE, 5152);
    let c = codec();
    let k = KeyRecord {
        off: 0x1000,
        len: 0x200,
        flags: KEY_CLEAN,
        seg: 2,
        seg_off: 0x400,
        gen: 0x0102_0304_0506_0708,
        data_crc: 0xAABB_CCDD,
    };
    let mut out = Vec::new();
    c.encode_kset(0x1122, &[k], &mut out).unwrap();
    assert_eq!(&out[4..6], &RecordKind::Kset.tag().to_le_bytes());
    assert_eq!(&out[6..8], &1u16.to_le_bytes());
    assert_eq!(&out[8..16], &0x1122u64.to_le_bytes());
    assert_eq!(&out[16..24], b"pcu-kset");
    assert_eq!(&out[28..32], &1u32.to_le_bytes());
    let key = &out[32..72];
    assert_eq!(&key[0..8], &0x1000u64.to_le_bytes());
    assert_eq!(&key[8..12], &0x200u32.to_le_bytes());
    assert_eq!(&key[12..16], &1u32.to_le_bytes());
    assert_eq!(&key[16..20], &2u32.to_le_bytes());
    assert_eq!(&key[20..24], &0x400u32.to_le_bytes());
    assert_eq!(&key[24..32], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&key[32..36], &0xAABB_CCDDu32.to_le_bytes());
    assert_eq!(&key[36..40], &[0u8; 4]);

    let tail = TailPos {
        pos: CachePos { seg: 3, off: 0x40 },
        log_seq: 9,
    };
    let t = encode_record(&tail, RecordKind::DirtyTail, 5);
    assert_eq!(&t[0..4], &record_crc(&t[4..]).to_le_bytes());
    assert_eq!(&t[16..20], &3u32.to_le_bytes());
    assert_eq!(&t[20..24], &0x40u32.to_le_bytes());
    assert_eq!(&t[24..32], &9u64.to_le_bytes());
}
