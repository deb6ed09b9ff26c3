// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! backing_identity: the stable identity (WWID, serial, dm UUID...) of the block device a cache
//! belongs to, and the rule that decides whether a backing image found at open is that one.
//!
//! The record is optional. Both slots all zero means none was recorded: a cache of a regular
//! file, of a device with no stable identity, or formatted by a build that did not have the
//! record. Such a cache is recognised by cache_info's size and device (and inode) numbers, as
//! before, and gets the record the first time it is opened on a device that has a stable
//! identity. Builds that do not know the record ignore it and keep comparing cache_info's
//! numbers, which are refreshed whenever the stable identity matches but the numbers changed.

use std::fmt;

use crate::backing::identity::{BlockIdentity, IdentityKind, MAX_IDENTITY_LEN};
use crate::cache::media::Media;

use super::cache_info::{BackingFingerprint, CacheInfo};
use super::init::probe;
use super::layout::Layout;
use super::record::{
    get_u16, load_latest, put_u16, store, FieldFault, MetaRecord, RecordFault, Versioned,
};
use super::FormatError;

/// Why a backing_identity record that passed its CRC is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityFault {
    #[error("unknown backing identity kind {0}")]
    UnknownKind(u8),
    #[error("backing identity of {0} bytes (1..={MAX_IDENTITY_LEN})")]
    Length(usize),
    #[error("backing identity is not printable ASCII")]
    NotPrintable,
    #[error("bytes after the backing identity are not zero")]
    TrailingBytes,
}

/// Offset of the value in the body (after kind u8, reserved u8, length u16, reserved u32).
const VALUE_OFFSET: usize = 8;

impl MetaRecord for BlockIdentity {
    const LEN: usize = super::record::HEADER_LEN + VALUE_OFFSET + MAX_IDENTITY_LEN + 1;

    fn encode_body(&self, b: &mut [u8]) {
        b[0] = self.kind.code();
        put_u16(b, 2, self.value.len() as u16);
        b[VALUE_OFFSET..VALUE_OFFSET + self.value.len()].copy_from_slice(self.value.as_bytes());
    }

    fn decode_body(b: &[u8]) -> Result<Self, FieldFault> {
        let kind = IdentityKind::from_code(b[0])
            .filter(|k| k.is_stable())
            .ok_or(IdentityFault::UnknownKind(b[0]))?;
        let len = get_u16(b, 2) as usize;
        if len == 0 || len > MAX_IDENTITY_LEN {
            return Err(IdentityFault::Length(len).into());
        }
        let value = &b[VALUE_OFFSET..VALUE_OFFSET + len];
        if !value.iter().all(|c| (0x20..0x7f).contains(c)) {
            return Err(IdentityFault::NotPrintable.into());
        }
        if b[VALUE_OFFSET + len..].iter().any(|&x| x != 0) {
            return Err(IdentityFault::TrailingBytes.into());
        }
        Ok(BlockIdentity {
            kind,
            value: String::from_utf8_lossy(value).into_owned(),
        })
    }
}

/// The recorded stable identity; `None` when never recorded (both slots all zero). Any other
/// state without a valid replica is corruption, never taken for "none recorded".
pub fn load_backing_identity(
    media: &dyn Media,
    layout: &Layout,
) -> Result<Option<Versioned<BlockIdentity>>, FormatError> {
    match load_latest::<BlockIdentity>(media, &layout.backing_identity_slots()) {
        Ok(v) => Ok(Some(v)),
        Err(FormatError::NoValidReplica {
            faults: [RecordFault::Zeroed, RecordFault::Zeroed],
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Record `identity` (a new replica; the older one stays valid until this one is durable).
pub fn store_backing_identity(
    media: &dyn Media,
    layout: &Layout,
    identity: &BlockIdentity,
) -> Result<(), FormatError> {
    store(media, &layout.backing_identity_slots(), identity).map(drop)
}

/// Forget the recorded identity: both slots zeroed, the newest last, so a crash in between
/// leaves the newest identity (the cache is still refused and the rebind is repeated), never an
/// older one.
pub fn clear_backing_identity(media: &dyn Media, layout: &Layout) -> Result<(), FormatError> {
    let slots = layout.backing_identity_slots();
    let newest = load_latest::<BlockIdentity>(media, &slots).map_or(0, |v| v.slot);
    for slot in [1 - newest, newest] {
        let offset = slots.offsets[slot];
        media.write_zeroes(offset, BlockIdentity::LEN as u64)?;
        media.persist(offset, BlockIdentity::LEN as u64)?;
        media.fence()?;
    }
    Ok(())
}

/// What identifies a backing image: cache_info's numbers and, for a block device that has
/// one, its stable identity. Both what a cache recorded and what was found at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingId {
    pub fingerprint: BackingFingerprint,
    pub stable: Option<BlockIdentity>,
}

impl From<BackingFingerprint> for BackingId {
    fn from(fingerprint: BackingFingerprint) -> Self {
        BackingId {
            fingerprint,
            stable: None,
        }
    }
}

/// How a backing image found at open relates to the one a cache recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingMatch {
    /// The same image, recorded as it is now.
    Same,
    /// The same image by the numbers only (no stable identity recorded), and it has a stable
    /// identity now: record it.
    RecordStable,
    /// The same device by its stable identity, but its numbers changed (renumbered or
    /// renamed): refresh cache_info's numbers.
    Renumbered,
    /// Another image: refuse.
    Different,
}

/// The rule: a recorded stable identity decides (with the size); without one, the numbers do.
pub fn compare(recorded: &BackingId, found: &BackingId) -> BackingMatch {
    match &recorded.stable {
        Some(stable) => {
            if recorded.fingerprint.size != found.fingerprint.size
                || found.stable.as_ref() != Some(stable)
            {
                BackingMatch::Different
            } else if recorded.fingerprint != found.fingerprint {
                BackingMatch::Renumbered
            } else {
                BackingMatch::Same
            }
        }
        None if recorded.fingerprint != found.fingerprint => BackingMatch::Different,
        None if found.stable.is_some() => BackingMatch::RecordStable,
        None => BackingMatch::Same,
    }
}

impl fmt::Display for BackingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.stable {
            Some(stable) => write!(f, "block device {stable}, {} bytes", self.fingerprint.size),
            None => describe_numbers(f, &self.fingerprint),
        }
    }
}

/// cache_info's numbers as the engine fills them (see `cache::replay::fingerprint`): device
/// number, inode, and whether it is a block device; anything else in hex.
fn describe_numbers(f: &mut fmt::Formatter<'_>, fp: &BackingFingerprint) -> fmt::Result {
    let id = &fp.id;
    let word = |at: usize| u64::from_le_bytes(id[at..at + 8].try_into().unwrap_or([0; 8]));
    let (dev, ino) = (word(0), word(8));
    let dev_text = format!("{}:{}", libc::major(dev), libc::minor(dev));
    match (id[16], id[17..].iter().all(|&b| b == 0)) {
        (1, true) if ino == 0 => write!(
            f,
            "block device number {dev_text} (no stable identity), {} bytes",
            fp.size
        ),
        (0, true) => write!(
            f,
            "regular file, inode {ino} on device {dev_text}, {} bytes",
            fp.size
        ),
        _ => write!(f, "{fp}"),
    }
}

/// Make the cache record `found` in place of `recorded`: the stable identity first, cache_info's
/// numbers second, a stale identity cleared last. A crash between two steps leaves a cache that
/// the next open either accepts as renumbered (and finishes) or refuses, so the step is redone.
/// `info` is the newest cache_info; returns it as it is now.
pub fn record_backing(
    media: &dyn Media,
    layout: &Layout,
    info: &CacheInfo,
    recorded: &BackingId,
    found: &BackingId,
) -> Result<CacheInfo, FormatError> {
    if let Some(stable) = &found.stable {
        if recorded.stable.as_ref() != Some(stable) {
            store_backing_identity(media, layout, stable)?;
        }
    }
    let mut info = *info;
    if info.backing != found.fingerprint {
        info.backing = found.fingerprint;
        store(media, &layout.cache_info_slots(), &info)?;
    }
    if found.stable.is_none() && recorded.stable.is_some() {
        clear_backing_identity(media, layout)?;
    }
    Ok(info)
}

/// Bind the cache on `media` to `found` whatever it recorded, changing nothing else: the
/// operator's override when a device's identity changed. The size must not change (every key
/// was checked against it). Returns what the cache recorded before.
pub fn rebind_backing(media: &dyn Media, found: &BackingId) -> Result<BackingId, FormatError> {
    let superblock = probe(media)?.ok_or(FormatError::Unformatted)?;
    let layout = superblock.layout(media.len())?;
    let info = load_latest::<CacheInfo>(media, &layout.cache_info_slots())?.value;
    let recorded = BackingId {
        fingerprint: info.backing,
        stable: load_backing_identity(media, &layout)?.map(|v| v.value),
    };
    if info.backing.size != found.fingerprint.size {
        return Err(FormatError::RebindSize {
            recorded: info.backing.size,
            found: found.fingerprint.size,
        });
    }
    record_backing(media, &layout, &info, &recorded, found)?;
    Ok(recorded)
}
