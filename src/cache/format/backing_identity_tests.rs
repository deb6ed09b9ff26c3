// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing_identity record and the rule that ties a cache to its backing image.

use super::*;
use crate::backing::identity::{BlockIdentity, IdentityKind, MAX_IDENTITY_LEN};
use crate::cache::media::{Media, RecordingMedia};

const SIZE: u64 = 1 << 30;
/// Where a record's body starts.
const BODY: usize = HEADER_LEN;

/// cache_info's numbers for a block device, as the engine fills them.
fn numbers(major: u32, minor: u32) -> BackingFingerprint {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&libc::makedev(major, minor).to_le_bytes());
    id[16] = 1;
    BackingFingerprint { size: SIZE, id }
}

fn stable(kind: IdentityKind, value: &str) -> Option<BlockIdentity> {
    Some(BlockIdentity {
        kind,
        value: value.to_owned(),
    })
}

fn found(fingerprint: BackingFingerprint, stable: Option<BlockIdentity>) -> BackingId {
    BackingId {
        fingerprint,
        stable,
    }
}

fn formatted_for(backing: &BackingId) -> (RecordingMedia, Layout) {
    let media = RecordingMedia::new(Layout::media_len_for(3)).unwrap();
    let layout = Layout::new(media.len()).unwrap();
    format(
        &media,
        &layout,
        &FormatOptions::for_backing(backing.clone()),
    )
    .unwrap();
    (media, layout)
}

fn wwid(value: &str) -> Option<BlockIdentity> {
    stable(IdentityKind::Wwid, value)
}

#[test]
fn a_cache_without_a_recorded_identity_opens_by_its_numbers_and_records_the_identity() {
    // What every earlier build wrote: only the numbers.
    let (media, layout) = formatted_for(&numbers(8, 16).into());
    assert_eq!(load_backing_identity(&media, &layout).unwrap(), None);

    let disk = found(numbers(8, 16), wwid("naa.5000c500a1b2c3d4"));
    let opened = open_metadata_for(&media, &disk).unwrap();
    assert_eq!(opened.backing_match, BackingMatch::RecordStable);
    record_backing(
        &media,
        &layout,
        &opened.cache_info.value,
        &opened.recorded_backing,
        &disk,
    )
    .unwrap();
    let reopened = RecordingMedia::from_image(media.durable_image()).unwrap();
    assert_eq!(
        load_backing_identity(&reopened, &layout)
            .unwrap()
            .map(|v| v.value),
        disk.stable
    );
    assert_eq!(
        open_metadata_for(&reopened, &disk).unwrap().backing_match,
        BackingMatch::Same
    );

    // Another device that took over the numbers is refused now.
    let impostor = found(numbers(8, 16), wwid("naa.5000c500ffffffff"));
    assert!(matches!(
        open_metadata_for(&reopened, &impostor),
        Err(FormatError::WrongBacking { .. })
    ));
}

#[test]
fn without_a_recorded_identity_other_numbers_are_another_image() {
    let (media, _) = formatted_for(&numbers(8, 16).into());
    let err = open_metadata_for(&media, &found(numbers(8, 32), None)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("block device number 8:16"), "{msg}");
    assert!(msg.contains("block device number 8:32"), "{msg}");
}

#[test]
fn a_device_with_the_recorded_numbers_but_another_identity_is_refused_with_safe_advice() {
    let recorded = found(numbers(7, 0), wwid("naa.5000c500a1b2c3d4"));
    let (media, _) = formatted_for(&recorded);
    let swapped = found(numbers(7, 0), wwid("naa.5000c500deadbeef"));
    let err = open_metadata_for(&media, &swapped).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FormatError::WrongBacking { .. }), "{msg}");
    for needed in [
        "wwid naa.5000c500a1b2c3d4",
        "wwid naa.5000c500deadbeef",
        "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
        "rebind",
    ] {
        assert!(msg.contains(needed), "no {needed:?} in: {msg}");
    }
    assert!(!msg.contains("force"), "suggests formatting: {msg}");
}

#[test]
fn the_recorded_device_under_new_numbers_opens_and_the_numbers_are_refreshed() {
    let uuid = stable(IdentityKind::DmUuid, "LVM-Xy12");
    let (media, layout) = formatted_for(&found(numbers(252, 3), uuid.clone()));
    let renumbered = found(numbers(252, 7), uuid);
    let opened = open_metadata_for(&media, &renumbered).unwrap();
    assert_eq!(opened.backing_match, BackingMatch::Renumbered);
    let info = record_backing(
        &media,
        &layout,
        &opened.cache_info.value,
        &opened.recorded_backing,
        &renumbered,
    )
    .unwrap();
    assert_eq!(info.backing, numbers(252, 7));
    let opened = open_metadata_for(&media, &renumbered).unwrap();
    assert_eq!(opened.backing_match, BackingMatch::Same);
    // Builds that ignore backing_identity compare cache_info's numbers alone: they match too.
    load_latest::<CacheInfo>(&media, &layout.cache_info_slots())
        .unwrap()
        .value
        .check_backing(&numbers(252, 7))
        .unwrap();
}

#[test]
fn a_recorded_identity_refuses_a_device_without_one_and_another_size() {
    let uuid = stable(IdentityKind::DmUuid, "LVM-Xy12");
    let (media, _) = formatted_for(&found(numbers(252, 3), uuid.clone()));
    assert!(open_metadata_for(&media, &found(numbers(252, 3), None)).is_err());
    let mut bigger = numbers(252, 3);
    bigger.size *= 2;
    assert!(open_metadata_for(&media, &found(bigger, uuid)).is_err());
}

#[test]
fn rebind_changes_only_the_recorded_identity_and_keeps_the_size() {
    let old = found(
        numbers(7, 0),
        stable(IdentityKind::LoopFile, "254:0 inode 12 offset 0"),
    );
    let (media, layout) = formatted_for(&old);
    let before = load_latest::<CacheInfo>(&media, &layout.cache_info_slots())
        .unwrap()
        .value;
    let new = found(
        numbers(7, 1),
        stable(IdentityKind::LoopFile, "254:0 inode 99 offset 0"),
    );
    assert_eq!(rebind_backing(&media, &new).unwrap(), old);
    assert_eq!(
        open_metadata_for(&media, &new).unwrap().backing_match,
        BackingMatch::Same
    );
    let after = load_latest::<CacheInfo>(&media, &layout.cache_info_slots())
        .unwrap()
        .value;
    assert_eq!(
        CacheInfo {
            backing: before.backing,
            ..after
        },
        before
    );

    // To a device without a stable identity: the stale one is forgotten.
    let plain = found(numbers(7, 2), None);
    rebind_backing(&media, &plain).unwrap();
    assert_eq!(load_backing_identity(&media, &layout).unwrap(), None);
    open_metadata_for(&media, &plain).unwrap();

    let mut bigger = numbers(7, 2);
    bigger.size += 4096;
    assert!(matches!(
        rebind_backing(&media, &found(bigger, None)),
        Err(FormatError::RebindSize { .. })
    ));
}

/// A change to an encoded record.
type Damage = fn(&mut Vec<u8>);

#[test]
fn the_record_round_trips_and_refuses_garbage() {
    let id = BlockIdentity {
        kind: IdentityKind::Serial,
        value: "S4EWNX0R123456 namespace 2".into(),
    };
    let bytes = encode_record(&id, RecordKind::BackingIdentity, 3);
    assert_eq!(bytes.len(), BlockIdentity::LEN);
    assert_eq!(
        decode_record::<BlockIdentity>(&bytes, RecordKind::BackingIdentity).unwrap(),
        (id.clone(), 3)
    );
    let longest = BlockIdentity {
        kind: IdentityKind::Wwid,
        value: "w".repeat(MAX_IDENTITY_LEN),
    };
    let bytes = encode_record(&longest, RecordKind::BackingIdentity, 1);
    assert_eq!(
        decode_record::<BlockIdentity>(&bytes, RecordKind::BackingIdentity)
            .unwrap()
            .0,
        longest
    );

    // Each body change, with the CRC recomputed so only the field check can refuse it.
    let cases: [(&str, Damage); 6] = [
        ("kind 0", |b| b[BODY] = 0),
        ("the device-number kind", |b| {
            b[BODY] = IdentityKind::DeviceNumber.code()
        }),
        ("an unknown kind", |b| b[BODY] = 200),
        ("length 0", |b| {
            b[BODY + 2..BODY + 4].copy_from_slice(&0u16.to_le_bytes())
        }),
        ("a length beyond the field", |b| {
            b[BODY + 2..BODY + 4].copy_from_slice(&1000u16.to_le_bytes())
        }),
        ("a control character", |b| b[BODY + 9] = 0x07),
    ];
    for (what, damage) in cases {
        let mut bytes = encode_record(&id, RecordKind::BackingIdentity, 3);
        damage(&mut bytes);
        let crc = crate::cache::format::record_crc(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        assert!(
            matches!(
                decode_record::<BlockIdentity>(&bytes, RecordKind::BackingIdentity),
                Err(RecordFault::BadField(_))
            ),
            "{what} accepted"
        );
    }
    let mut trailing = encode_record(&id, RecordKind::BackingIdentity, 3);
    trailing[BlockIdentity::LEN - 1] = b'x';
    let crc = crate::cache::format::record_crc(&trailing[4..]);
    trailing[..4].copy_from_slice(&crc.to_le_bytes());
    assert!(decode_record::<BlockIdentity>(&trailing, RecordKind::BackingIdentity).is_err());
}

#[test]
fn a_damaged_record_is_corruption_not_an_absent_one() {
    let (media, layout) = formatted_for(&found(numbers(8, 0), wwid("naa.5000c500a1b2c3d4")));
    let slots = layout.backing_identity_slots();
    media.write(slots.offsets[0] + 20, &[0xff]).unwrap();
    let err = load_backing_identity(&media, &layout).unwrap_err();
    assert!(matches!(err, FormatError::NoValidReplica { .. }), "{err}");
    assert!(open_metadata_for(&media, &found(numbers(8, 0), None)).is_err());
}
