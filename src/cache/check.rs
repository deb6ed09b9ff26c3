// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Offline consistency check of a cache: every replica of every metadata record, the log
//! walk, every key, and with data CRC every cached extent the log still refers to.
//!
//! Findings are graded by what the next daemon start would make of them:
//! - **repairable**: the engine still loads everything, and the damage goes away by itself
//!   (a bad replica is the one the next update of that record overwrites; a clean extent with
//!   a bad CRC is also on the backing image);
//! - **corrupt**: data or metadata is lost or unusable (no valid replica, an inconsistent log,
//!   a dirty extent whose CRC does not match).

use serde::Serialize;

use super::format::{self, BackingId, BackingMatch, RecordFault, TailPos};
use super::inspect::{read_replicas, walk_log, InspectError, MediaState, Replicas};
use super::media::Media;
use super::CachePos;
use crate::backing::identity::BlockIdentity;
use crate::engine::ErrorChain;

/// How bad a finding is; the order is the exit status order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Repairable,
    Corrupt,
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

/// The overall verdict, with the exit status `check` uses for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Clean,
    Repairable,
    Corrupt,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => 0,
            Verdict::Repairable => 1,
            Verdict::Corrupt => 2,
        }
    }
}

/// What `check` found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub verdict: Verdict,
    pub findings: Vec<Finding>,
    pub records_checked: u64,
    pub ksets: u64,
    pub keys: u64,
    /// Cached extents whose data CRC was verified.
    pub extents_verified: u64,
}

/// Why a cache could not be checked at all.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Inspect(#[from] InspectError),
    /// A [`format::FormatError::WrongBacking`]: what the cache records, what was given, and
    /// the safe ways on.
    #[error(transparent)]
    WrongBacking(format::FormatError),
}

struct Findings(Vec<Finding>);

impl Findings {
    fn add(&mut self, severity: Severity, message: String) {
        self.0.push(Finding { severity, message });
    }

    /// Grade a replicated record: a damaged copy beside a valid one is repairable, no valid
    /// copy is corruption. Returns the newest valid value.
    fn replicas<R: Clone>(&mut self, what: &str, r: &Replicas<R>) -> Option<R> {
        let newest = r.newest();
        for (slot, s) in r.damaged() {
            let fault = s
                .state
                .as_ref()
                .err()
                .map(|f| f.to_string())
                .unwrap_or_default();
            if newest.is_some() {
                self.add(
                    Severity::Repairable,
                    format!(
                        "{what} replica {slot} at byte {} is damaged ({fault}); the other \
                         copy is valid and the next update of {what} rewrites this one",
                        s.offset
                    ),
                );
            }
        }
        if newest.is_none() {
            let why = |i: usize| match &r.slots[i].state {
                Err(f) => f.to_string(),
                Ok(_) => "valid".into(),
            };
            self.add(
                Severity::Corrupt,
                format!(
                    "{what} has no valid replica: slot 0 at byte {}: {}; slot 1 at byte {}: {}",
                    r.slots[0].offset,
                    why(0),
                    r.slots[1].offset,
                    why(1)
                ),
            );
        }
        newest.map(|(v, _, _)| v)
    }
}

/// Check the cache on `media`; with `backing`, it must belong to that image.
pub fn check(media: &dyn Media, backing: Option<&BackingId>) -> Result<CheckReport, CheckError> {
    let state = match MediaState::read(media) {
        Ok(s) => s,
        Err(InspectError::NotACache(reason)) if looks_like_a_cache(media) => {
            return Ok(corrupt_superblock(reason));
        }
        Err(e) => return Err(e.into()),
    };
    let mut f = Findings(Vec::new());
    let n = state.layout.n_segments();
    let info = f.replicas("cache_info", &state.cache_info);
    let key_tail = f.replicas("key_tail", &state.key_tail);
    let dirty_tail = f.replicas("dirty_tail", &state.dirty_tail);
    for seg in 0..n {
        f.replicas(
            &format!("segment {seg} segment_info"),
            &state.segment_info[seg as usize],
        );
        f.replicas(
            &format!("segment {seg} generation"),
            &state.generation[seg as usize],
        );
    }
    let records_checked = 3 + 2 * n as u64;
    // Both slots zero: no stable identity recorded (a file, or a cache of an earlier version).
    let identity =
        read_replicas::<BlockIdentity>(media, &state.layout.backing_identity_slots(), &|_| Ok(()))
            .map_err(InspectError::from)?;
    let recorded_identity = if identity
        .slots
        .iter()
        .all(|s| matches!(s.state, Err(RecordFault::Zeroed)))
    {
        None
    } else {
        f.replicas("backing_identity", &identity)
    };
    if let (Some(info), Some(found)) = (&info, backing) {
        let recorded = BackingId {
            fingerprint: info.backing,
            stable: recorded_identity,
        };
        if format::compare(&recorded, found) == BackingMatch::Different {
            return Err(CheckError::WrongBacking(
                format::FormatError::WrongBacking {
                    recorded: Box::new(recorded),
                    found: Box::new(found.clone()),
                },
            ));
        }
    }
    if let Some(info) = &info {
        if info.n_segments != n {
            f.add(
                Severity::Corrupt,
                format!(
                    "cache_info says {} segments, the superblock {n}",
                    info.n_segments
                ),
            );
        }
    }
    let mut report = CheckReport {
        verdict: Verdict::Clean,
        findings: Vec::new(),
        records_checked,
        ksets: 0,
        keys: 0,
        extents_verified: 0,
    };
    if let (Some(info), Some(kt), Some(dt)) = (info, key_tail, dirty_tail) {
        check_log(media, &state, &info, kt, dt, &mut f, &mut report);
    } else {
        f.add(
            Severity::Corrupt,
            "the key log cannot be walked without cache_info, key_tail and dirty_tail".into(),
        );
    }
    report.verdict = match f.0.iter().map(|x| x.severity).max() {
        None => Verdict::Clean,
        Some(Severity::Repairable) => Verdict::Repairable,
        Some(Severity::Corrupt) => Verdict::Corrupt,
    };
    report.findings = f.0;
    Ok(report)
}

fn check_log(
    media: &dyn Media,
    state: &MediaState,
    info: &format::CacheInfo,
    key_tail: TailPos,
    dirty_tail: TailPos,
    f: &mut Findings,
    report: &mut CheckReport,
) {
    let mut live = Vec::new();
    let walk = walk_log(media, state, info, key_tail, dirty_tail, &mut |k| {
        if !k.stale && !k.key.is_zeroes() {
            live.push(k);
        }
    });
    report.ksets = walk.report.ksets;
    report.keys = walk.report.keys;
    if let Some(e) = &walk.error {
        let e = ErrorChain(e).to_string();
        f.add(Severity::Corrupt, format!("key log: {e}"));
    }
    for (seg, gen) in state.generations().iter().enumerate() {
        if gen.is_none() {
            f.add(
                Severity::Corrupt,
                format!("segment {seg}: without a generation, stale keys cannot be told apart"),
            );
        }
    }
    if !info.data_crc {
        return;
    }
    let mut buf = Vec::new();
    for k in live {
        let key = k.key;
        buf.resize(key.len as usize, 0);
        let at = state.layout.media_offset(CachePos {
            seg: key.seg,
            off: key.seg_off,
        });
        if let Err(e) = media.read(at, &mut buf) {
            f.add(Severity::Corrupt, format!("reading cached data: {e}"));
            continue;
        }
        report.extents_verified += 1;
        let computed = format::data_crc(&buf);
        if computed == key.data_crc {
            continue;
        }
        let (severity, consequence) = if k.dirty {
            (
                Severity::Corrupt,
                "dirty data: the backing image does not hold it, so this write is lost",
            )
        } else {
            (
                Severity::Repairable,
                "clean data: the backing image holds a good copy, but reads of this range fail with an I/O error until the guest rewrites it or the cache is drained and formatted again",
            )
        };
        f.add(
            severity,
            format!(
                "data CRC mismatch for backing bytes {}+{} cached at segment {} offset {} \
                 (kset {}: stored {:#010x}, computed {computed:#010x}); {consequence}",
                key.off, key.len, key.seg, key.seg_off, k.kset_seq, key.data_crc
            ),
        );
    }
}

/// True when the superblock page carries the cache magic, so a bad superblock is a damaged
/// cache rather than something else entirely.
fn looks_like_a_cache(media: &dyn Media) -> bool {
    let mut magic = [0u8; 8];
    let at = format::SUPERBLOCK_OFFSET + format::HEADER_LEN as u64;
    media.read(at, &mut magic).is_ok() && u64::from_le_bytes(magic) == format::SUPERBLOCK_MAGIC
}

fn corrupt_superblock(reason: String) -> CheckReport {
    CheckReport {
        verdict: Verdict::Corrupt,
        findings: vec![Finding {
            severity: Severity::Corrupt,
            message: format!(
                "the superblock carries the cache magic but is damaged: {reason}; the \
                 superblock has one copy, so the cache cannot be opened"
            ),
        }],
        records_checked: 1,
        ksets: 0,
        keys: 0,
        extents_verified: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::driver::Driver;
    use crate::cache::format::{KeyRecord, Tail};
    use crate::cache::inspect::inspect;
    use crate::cache::media::RecordingMedia;
    use crate::cache::tests::{pattern, Fixture};

    /// A cache with `n` written and drained 64 KiB extents (data CRC on), as the media holds
    /// it after the engine stopped; dirty_tail is at the log head.
    fn written_back_cache(n: u64) -> (Fixture, Arc<RecordingMedia>) {
        let mut fx = Fixture::new(64, 1, 2);
        fx.opts.data_crc = Some(true);
        let engine = fx.open();
        let mut driver = Driver::new(&engine);
        for i in 0..n {
            let off = i * (5 << 20);
            assert!(driver.write(0, off, &pattern(off, 65536, i)).is_ok());
        }
        assert!(driver.flush(0).is_ok());
        engine.drain().unwrap();
        drop(driver);
        engine.shutdown_for_crash_test();
        let media = Arc::new(RecordingMedia::from_image(fx.media.durable_image()).unwrap());
        (fx, media)
    }

    fn live_keys(media: &dyn Media) -> Vec<KeyRecord> {
        let state = MediaState::read(media).unwrap();
        let info = state.cache_info.newest().unwrap().0;
        let kt = state.key_tail.newest().unwrap().0;
        let dt = state.dirty_tail.newest().unwrap().0;
        let mut keys = Vec::new();
        let walk = walk_log(media, &state, &info, kt, dt, &mut |k| {
            if !k.stale && !k.key.is_zeroes() {
                keys.push(k.key)
            }
        });
        assert!(walk.error.is_none(), "{:?}", walk.error);
        keys
    }

    fn flip(media: &dyn Media, at: u64) {
        let mut b = [0u8; 1];
        media.read(at, &mut b).unwrap();
        media.write(at, &[b[0] ^ 0xff]).unwrap();
    }

    #[test]
    fn a_written_back_cache_is_clean_and_every_extent_is_verified() {
        let (_fx, media) = written_back_cache(3);
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Clean, "{:?}", report.findings);
        assert_eq!(report.extents_verified, live_keys(&*media).len() as u64);
        assert!(report.extents_verified >= 3);
        assert_eq!(inspect(&*media, None).unwrap().dirty_bytes, 0);
    }

    #[test]
    fn a_bad_crc_is_repairable_when_clean_and_corrupt_when_dirty() {
        let (_fx, media) = written_back_cache(2);
        let layout = MediaState::read(&*media).unwrap().layout;
        let key = live_keys(&*media)[0];
        let pos = CachePos {
            seg: key.seg,
            off: key.seg_off,
        };
        flip(&*media, layout.media_offset(pos) + 7);
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Repairable, "{:?}", report.findings);
        assert!(report.findings[0].message.contains("clean data"));

        let key_tail = format::load_tail(&*media, &layout, Tail::Key)
            .unwrap()
            .value;
        format::store_tail(&*media, &layout, Tail::Dirty, &key_tail).unwrap();
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Corrupt, "{:?}", report.findings);
        assert!(report.findings[0].message.contains("dirty data"));
    }

    #[test]
    fn a_damaged_segment_record_replica_is_repairable_a_lost_one_corrupt() {
        let (_fx, media) = written_back_cache(1);
        let layout = MediaState::read(&*media).unwrap().layout;
        let slots = layout.generation_slots(3);
        flip(&*media, slots.offsets[1] + 3);
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Repairable, "{:?}", report.findings);
        assert!(report.findings[0]
            .message
            .contains("segment 3 generation replica 1"));

        flip(&*media, slots.offsets[0] + 3);
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Corrupt, "{:?}", report.findings);
    }

    #[test]
    fn backing_identity_is_checked_and_decides_which_image_is_the_caches() {
        let (_fx, media) = written_back_cache(1);
        let layout = MediaState::read(&*media).unwrap().layout;
        let info = format::load_latest::<format::CacheInfo>(&*media, &layout.cache_info_slots())
            .unwrap()
            .value;
        let identity = |value: &str| BlockIdentity {
            kind: crate::backing::identity::IdentityKind::Wwid,
            value: value.into(),
        };
        let disk = BackingId {
            fingerprint: info.backing,
            stable: Some(identity("naa.5000c500a1b2c3d4")),
        };
        // None recorded yet: the numbers decide.
        assert_eq!(check(&*media, Some(&disk)).unwrap().verdict, Verdict::Clean);
        format::store_backing_identity(&*media, &layout, &identity("naa.5000c500a1b2c3d4"))
            .unwrap();
        format::store_backing_identity(&*media, &layout, &identity("naa.5000c500a1b2c3d4"))
            .unwrap();
        assert_eq!(check(&*media, Some(&disk)).unwrap().verdict, Verdict::Clean);
        // Same numbers, another device.
        let swapped = BackingId {
            stable: Some(identity("naa.5000c500deadbeef")),
            ..disk.clone()
        };
        assert!(matches!(
            check(&*media, Some(&swapped)),
            Err(CheckError::WrongBacking(_))
        ));

        let slots = layout.backing_identity_slots();
        flip(&*media, slots.offsets[0] + 30);
        let report = check(&*media, Some(&disk)).unwrap();
        assert_eq!(report.verdict, Verdict::Repairable, "{:?}", report.findings);
        assert!(report.findings[0]
            .message
            .contains("backing_identity replica 0"));
        flip(&*media, slots.offsets[1] + 30);
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Corrupt, "{:?}", report.findings);
    }

    #[test]
    fn wrong_backing_and_blank_media_cannot_be_checked() {
        let (_fx, media) = written_back_cache(1);
        let other = format::BackingFingerprint {
            size: 1 << 20,
            id: [7; 32],
        };
        assert!(matches!(
            check(&*media, Some(&other.into())),
            Err(CheckError::WrongBacking(_))
        ));
        let blank = RecordingMedia::new(media.len()).unwrap();
        assert!(matches!(
            check(&blank, None),
            Err(CheckError::Inspect(InspectError::NotACache(_)))
        ));
    }

    #[test]
    fn a_damaged_superblock_with_the_magic_is_corrupt() {
        let (_fx, media) = written_back_cache(1);
        flip(&*media, format::SUPERBLOCK_OFFSET + 40);
        let report = check(&*media, None).unwrap();
        assert_eq!(report.verdict, Verdict::Corrupt);
    }
}
