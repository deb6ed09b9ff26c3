// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Offline inspection: everything a cache media holds, read without changing a byte.
//!
//! [`MediaState`] reads both replicas of every metadata record (keeping why a copy is
//! invalid, which `check` reports) and [`inspect`] adds the log walk: segment use, reference
//! counts and dirty bytes, computed exactly as replay computes them when the daemon starts.

use serde::Serialize;

use super::format::{
    self, decode_record, BackingId, BackingMatch, CacheInfo, FieldFault, Generation, KsetCodec,
    Layout, MetaRecord, RecordFault, ReplicaSlots, SegmentInfo, Superblock, TailPos,
};
use super::media::{Media, MediaError};
use super::replay::{self, ReplayError, ReplayReport, VisitedKey};
use super::segments::{SegmentKind, SegmentMap};
use crate::engine::ErrorChain;

/// Why a cache could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("not a vhost-user-pcache cache: {0}")]
    NotACache(String),
    #[error("{0}")]
    Unreadable(String),
}

/// One copy of a replicated record, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot<R> {
    pub offset: u64,
    pub state: Result<(R, u64), RecordFault>,
}

/// Both copies of a replicated record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replicas<R> {
    pub kind: format::RecordKind,
    pub slots: [Slot<R>; 2],
}

impl<R: Clone> Replicas<R> {
    /// The newest valid copy (ties go to slot 0), as the engine would load it.
    pub fn newest(&self) -> Option<(R, u64, usize)> {
        let seq = |i: usize| self.slots[i].state.as_ref().ok().map(|(_, s)| *s);
        let pick = match (seq(0), seq(1)) {
            (Some(a), Some(b)) => Some(if b > a { 1 } else { 0 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        }?;
        let (r, s) = self.slots[pick].state.clone().ok()?;
        Some((r, s, pick))
    }

    /// Copies that hold something other than a valid record or zeroes (never written).
    pub fn damaged(&self) -> impl Iterator<Item = (usize, &Slot<R>)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(&s.state, Err(f) if *f != RecordFault::Zeroed))
    }

    pub fn report(&self) -> ReplicaReport {
        let newest = self.newest().map(|(_, _, slot)| slot);
        let slot = |i: usize| {
            let s = &self.slots[i];
            SlotReport {
                offset: s.offset,
                seq: s.state.as_ref().ok().map(|(_, seq)| *seq),
                fault: s.state.as_ref().err().map(|f| f.to_string()),
            }
        };
        ReplicaReport {
            newest,
            slots: [slot(0), slot(1)],
        }
    }
}

/// Read both slots of a record; `check` rejects copies that are valid alone but not in
/// context (a tail outside the layout, a segment record naming another segment).
pub fn read_replicas<R: MetaRecord>(
    media: &dyn Media,
    slots: &ReplicaSlots,
    check: &dyn Fn(&R) -> Result<(), FieldFault>,
) -> Result<Replicas<R>, MediaError> {
    let mut buf = vec![0u8; R::LEN];
    let mut read = |offset: u64| -> Result<Slot<R>, MediaError> {
        media.read(offset, &mut buf)?;
        let state = decode_record::<R>(&buf, slots.kind).and_then(|(r, seq)| {
            check(&r)?;
            Ok((r, seq))
        });
        Ok(Slot { offset, state })
    };
    Ok(Replicas {
        kind: slots.kind,
        slots: [read(slots.offsets[0])?, read(slots.offsets[1])?],
    })
}

/// Every metadata record of a cache, both copies of each.
pub struct MediaState {
    pub superblock: Superblock,
    pub layout: Layout,
    pub cache_info: Replicas<CacheInfo>,
    pub key_tail: Replicas<TailPos>,
    pub dirty_tail: Replicas<TailPos>,
    pub segment_info: Vec<Replicas<SegmentInfo>>,
    pub generation: Vec<Replicas<Generation>>,
}

impl MediaState {
    /// Read the superblock and every replicated record. Fails only when the media cannot be
    /// read or holds no cache; damaged records are kept for the caller to judge.
    pub fn read(media: &dyn Media) -> Result<MediaState, InspectError> {
        let superblock = match format::probe(media) {
            Ok(Some(sb)) => sb,
            Ok(None) => {
                return Err(InspectError::NotACache(
                    "the media is not formatted (its superblock is all zero)".into(),
                ))
            }
            Err(format::FormatError::Media(e)) => return Err(e.into()),
            Err(e) => return Err(InspectError::NotACache(e.to_string())),
        };
        let layout = superblock
            .layout(media.len())
            .map_err(|e| InspectError::NotACache(e.to_string()))?;
        let in_layout = |t: &TailPos| {
            if layout.contains(t.pos) {
                Ok(())
            } else {
                Err(FieldFault::OutsideLayout {
                    seg: t.pos.seg,
                    off: t.pos.off,
                    n_segments: layout.n_segments(),
                    data_size: layout.data_size(),
                })
            }
        };
        let cache_info = read_replicas(media, &layout.cache_info_slots(), &|_| Ok(()))?;
        let key_tail = read_replicas(media, &layout.key_tail_slots(), &in_layout)?;
        let dirty_tail = read_replicas(media, &layout.dirty_tail_slots(), &in_layout)?;
        let mut segment_info = Vec::new();
        let mut generation = Vec::new();
        for seg in 0..layout.n_segments() {
            let same = |found: u32| {
                if found == seg {
                    Ok(())
                } else {
                    Err(FieldFault::OtherSegment { seg, found })
                }
            };
            segment_info.push(read_replicas(
                media,
                &layout.segment_info_slots(seg),
                &|r: &SegmentInfo| same(r.seg_id),
            )?);
            generation.push(read_replicas(
                media,
                &layout.generation_slots(seg),
                &|r: &Generation| same(r.seg_id),
            )?);
        }
        Ok(MediaState {
            superblock,
            layout,
            cache_info,
            key_tail,
            dirty_tail,
            segment_info,
            generation,
        })
    }

    /// The newest valid generation of every segment; `None` where neither copy is valid.
    pub fn generations(&self) -> Vec<Option<u64>> {
        self.generation
            .iter()
            .map(|r| r.newest().map(|(g, _, _)| g.gen))
            .collect()
    }
}

/// The result of a log walk over a [`MediaState`].
pub struct LogWalk {
    pub segments: SegmentMap,
    /// Where the next kset would go, and its sequence number; `None` when the walk failed.
    pub head: Option<(u32, u32, u64)>,
    pub report: ReplayReport,
    /// Why the walk stopped before the end of the log, if it did.
    pub error: Option<ReplayError>,
}

/// Walk the log as replay does (unreadable generations count as 0), calling `visit` for
/// every key.
pub fn walk_log(
    media: &dyn Media,
    state: &MediaState,
    info: &CacheInfo,
    key_tail: TailPos,
    dirty_tail: TailPos,
    visit: &mut dyn FnMut(VisitedKey),
) -> LogWalk {
    let gens: Vec<u64> = state
        .generations()
        .into_iter()
        .map(|g| g.unwrap_or(0))
        .collect();
    let segments = SegmentMap::new(&gens);
    let codec = KsetCodec::new(state.layout, info.backing.size, state.superblock.cache_id);
    let result = replay::walk_visit(
        media,
        &state.layout,
        &codec,
        &segments,
        None,
        (key_tail, dirty_tail),
        visit,
    );
    match result {
        Ok((head, report)) => LogWalk {
            segments,
            head: Some((head.pos.seg, head.pos.off, head.seq)),
            report,
            error: None,
        },
        Err(e) => LogWalk {
            segments,
            head: None,
            report: ReplayReport::default(),
            error: Some(e),
        },
    }
}

/// What `inspect` shows, also as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub media_len: u64,
    pub n_segments: u32,
    pub segment_size: u64,
    pub cache_id: String,
    pub data_crc: bool,
    pub gc_percent: u8,
    /// The daemon completed its first start on this cache.
    pub init_done: bool,
    pub backing: BackingReport,
    pub cache_info: ReplicaReport,
    pub key_tail: TailReport,
    pub dirty_tail: TailReport,
    pub log_head: TailPosReport,
    pub log: LogSummary,
    pub dirty_bytes: u64,
    pub segments_used: u32,
    pub segments: Vec<SegmentReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackingReport {
    pub size: u64,
    pub id: String,
    /// The stable identity of the backing block device recorded in backing_identity.
    pub identity: Option<String>,
    /// `matches`, `differs`, or `not checked` (no backing image given).
    pub check: String,
    /// The identity of the backing image given, when it differs.
    pub found: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaReport {
    /// The slot the engine loads (`None`: neither copy is valid).
    pub newest: Option<usize>,
    pub slots: [SlotReport; 2],
}

#[derive(Clone, Debug, Serialize)]
pub struct SlotReport {
    pub offset: u64,
    pub seq: Option<u64>,
    /// Why this copy is invalid.
    pub fault: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TailPosReport {
    pub seg: u32,
    pub off: u32,
    pub log_seq: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TailReport {
    #[serde(flatten)]
    pub pos: TailPosReport,
    pub replicas: ReplicaReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct LogSummary {
    pub ksets: u64,
    pub keys: u64,
    pub dirty_keys: u64,
    pub stale_keys: u64,
    pub log_segments: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct SegmentReport {
    pub seg: u32,
    /// `free`, `log` or `data`.
    pub kind: &'static str,
    /// Live log keys pointing into a data segment.
    pub refs: u32,
    pub gen: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tail_report(r: &Replicas<TailPos>, t: TailPos) -> TailReport {
    TailReport {
        pos: TailPosReport {
            seg: t.pos.seg,
            off: t.pos.off,
            log_seq: t.log_seq,
        },
        replicas: r.report(),
    }
}

/// Inspect the cache on `media`; with `backing`, also compare its fingerprint.
pub fn inspect(media: &dyn Media, backing: Option<&BackingId>) -> Result<Inspection, InspectError> {
    let state = MediaState::read(media)?;
    let none_valid = |what: &str| {
        InspectError::Unreadable(format!("no valid {what} replica (run `check` for details)"))
    };
    let (info, _, _) = state.cache_info.newest().ok_or(none_valid("cache_info"))?;
    let (key_tail, _, _) = state.key_tail.newest().ok_or(none_valid("key_tail"))?;
    let (dirty_tail, _, _) = state.dirty_tail.newest().ok_or(none_valid("dirty_tail"))?;
    let walk = walk_log(media, &state, &info, key_tail, dirty_tail, &mut |_| {});
    if let Some(e) = walk.error {
        return Err(InspectError::Unreadable(format!(
            "the key log is inconsistent: {} (run `check`)",
            ErrorChain(&e)
        )));
    }
    let (head_seg, head_off, head_seq) = walk.head.unwrap_or_default();
    let gens = state.generations();
    let segments = (0..state.layout.n_segments())
        .map(|seg| SegmentReport {
            seg,
            kind: match walk.segments.kind(seg) {
                SegmentKind::Free => "free",
                SegmentKind::Log => "log",
                SegmentKind::Data => "data",
            },
            refs: walk.segments.refs(seg),
            gen: gens[seg as usize].unwrap_or(0),
        })
        .collect();
    let recorded = BackingId {
        fingerprint: info.backing,
        stable: format::load_backing_identity(media, &state.layout)
            .map_err(|e| {
                InspectError::Unreadable(format!(
                    "backing_identity: {} (run `check`)",
                    ErrorChain(&e)
                ))
            })?
            .map(|v| v.value),
    };
    let differs =
        backing.filter(|found| format::compare(&recorded, found) == BackingMatch::Different);
    let backing_report = BackingReport {
        size: info.backing.size,
        id: hex(&info.backing.id),
        identity: recorded.stable.as_ref().map(ToString::to_string),
        check: match (backing, differs) {
            (None, _) => "not checked".into(),
            (Some(_), None) => "matches".into(),
            (Some(_), Some(_)) => "differs".into(),
        },
        found: differs.map(ToString::to_string),
    };
    let r = &walk.report;
    Ok(Inspection {
        media_len: media.len(),
        n_segments: state.layout.n_segments(),
        segment_size: super::SEGMENT_SIZE,
        cache_id: hex(&state.superblock.cache_id),
        data_crc: info.data_crc,
        gc_percent: info.gc_percent,
        init_done: info.init_done,
        backing: backing_report,
        cache_info: state.cache_info.report(),
        key_tail: tail_report(&state.key_tail, key_tail),
        dirty_tail: tail_report(&state.dirty_tail, dirty_tail),
        log_head: TailPosReport {
            seg: head_seg,
            off: head_off,
            log_seq: head_seq,
        },
        log: LogSummary {
            ksets: r.ksets,
            keys: r.keys,
            dirty_keys: r.dirty_keys,
            stale_keys: r.stale_keys,
            log_segments: r.log_segments,
        },
        dirty_bytes: r.dirty_bytes,
        segments_used: walk.segments.used_count(),
        segments,
    })
}
