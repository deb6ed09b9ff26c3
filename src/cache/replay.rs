// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a cache: format a new media, or load the metadata of an existing one and replay the
//! key log to rebuild the index, the segment references and the log head.
//!
//! Replay walks from key_tail, kset by kset, following LAST ksets to the next log segment, and
//! stops at the first position that does not hold the kset with the next sequence number: that
//! is where the next kset goes. Keys behind dirty_tail have been written back and are clean;
//! keys from dirty_tail on are dirty unless flagged clean. A key whose generation is older than
//! its segment's belongs to an earlier life of that segment and is skipped. Every on-media
//! value is bounds-checked by the format layer before use; anything impossible is reported as
//! corruption, with what and where, never a panic.

use std::sync::Arc;

use super::core::{index_key, CacheError, CacheOptions};
use super::data_head::LOG_RESERVE;
use super::format::{
    self, BackingFingerprint, BackingId, BackingMatch, FormatOptions, Kset, KsetCodec, Layout,
    TailPos,
};
use super::index::Index;
use super::log::{Log, LogHead};
use super::media::{Media, MediaError};
use super::meta::Meta;
use super::segments::{SegmentKind, SegmentMap};
use super::CachePos;
use crate::backing::BackingImage;
use crate::engine::ErrorChain;

/// Everything [`open`] rebuilt.
pub(super) struct Opened {
    pub layout: Layout,
    pub meta: Meta,
    pub segments: SegmentMap,
    pub index: Index,
    pub log: Log,
    pub data_crc: bool,
    pub dirty_bytes: u64,
    /// Highest stamp of a zeroes key on the log (0 when none carries one).
    pub zero_stamp: u64,
    /// The superblock's cache id.
    pub cache_id: [u8; 16],
    /// CRC field of the newest kset replayed (for the journal).
    pub newest_kset_crc: Option<u32>,
}

/// What the log walk found (also used by offline inspection).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub ksets: u64,
    pub keys: u64,
    pub dirty_keys: u64,
    pub dirty_bytes: u64,
    pub stale_keys: u64,
    pub log_segments: u32,
    /// Highest stamp of a zeroes key seen (see `Core::insert_and_log`).
    pub zero_stamp: u64,
    /// CRC field of the newest kset met, if any.
    pub newest_kset_crc: Option<u32>,
}

/// Why the log walk could not rebuild the cache: the log on the media is corrupt, or could
/// not be read. A kset that merely ends the log is not an error.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the kset at {seg}:{off}")]
    Read {
        seg: u32,
        off: u32,
        #[source]
        source: MediaError,
    },
    #[error(
        "kset {seq} at segment {seg} offset {off} is damaged, yet kset {} follows it at offset \
         {next_off}: the log is corrupt, and replaying only up to the damage would lose flushed \
         writes",
        seq + 1
    )]
    DamagedBeforeValid {
        seq: u64,
        seg: u32,
        off: u32,
        next_off: usize,
        #[source]
        damage: format::FormatError,
    },
    #[error("kset at segment {seg} offset {off}")]
    Corrupt {
        seg: u32,
        off: u32,
        #[source]
        source: format::FormatError,
    },
    #[error(
        "LAST kset {seq} at segment {seg} links to segment {next_seg}, which the log already uses"
    )]
    LastLinksToUsed { seq: u64, seg: u32, next_seg: u32 },
    #[error(
        "dirty_tail ({}:{} kset {}) is not on the log from key_tail ({}:{} kset {}) to its end \
         ({}:{} kset {end_seq})",
        dirty_tail.pos.seg, dirty_tail.pos.off, dirty_tail.log_seq,
        key_tail.pos.seg, key_tail.pos.off, key_tail.log_seq,
        end.seg, end.off
    )]
    DirtyTailOffLog {
        key_tail: TailPos,
        dirty_tail: TailPos,
        end: CachePos,
        end_seq: u64,
    },
    #[error("a live key points into log segment {0}")]
    KeyInLogSegment(u32),
}

/// The fingerprint that ties a cache to its backing image: its size, and for a regular file
/// its device and inode, for a block device its device number.
pub fn fingerprint(backing: &BackingImage) -> BackingFingerprint {
    let ident = backing.identity();
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&ident.dev.to_le_bytes());
    id[8..16].copy_from_slice(&ident.ino.to_le_bytes());
    id[16] = ident.is_block_device as u8;
    BackingFingerprint {
        size: backing.size(),
        id,
    }
}

/// Everything that ties a cache to its backing image: the fingerprint, and a block device's
/// stable identity when the system knows one.
pub fn backing_id(backing: &BackingImage) -> BackingId {
    BackingId {
        fingerprint: fingerprint(backing),
        stable: backing.identity().stable,
    }
}

/// Smallest number of segments that lets `queues` workers make progress: a data head each,
/// the log reserve, and two segments for data to move through.
pub fn min_segments(queues: usize) -> u32 {
    queues as u32 + LOG_RESERVE + 2
}

/// Replay the cache on `media` exactly as opening the engine does (formatting it when the
/// media is blank), without starting the engine or its threads: the fuzz targets' way in.
#[cfg(feature = "fuzzing")]
pub fn replay_only(
    opts: &CacheOptions,
    media: Arc<dyn Media>,
    backing: &BackingImage,
) -> Result<(), CacheError> {
    open(opts, media, backing).map(drop)
}

pub(super) fn open(
    opts: &CacheOptions,
    media: Arc<dyn Media>,
    backing: &BackingImage,
) -> Result<Opened, CacheError> {
    let path = opts.path.clone();
    let fmt_err = |source| CacheError::Format {
        path: path.clone(),
        source,
    };
    let found = backing_id(backing);
    let existing = format::probe(&*media).map_err(fmt_err)?;
    if existing.is_none() || opts.force_format {
        let layout = Layout::new(media.len()).map_err(fmt_err)?;
        check_size(&layout, opts, &path)?;
        let mut f = FormatOptions::for_backing(found.clone());
        f.data_crc = opts.data_crc.unwrap_or(false);
        if let Some(p) = opts.gc_percent {
            f.gc_percent = p;
        }
        log::info!("formatting cache {}", path.display());
        format::format(&*media, &layout, &f).map_err(fmt_err)?;
    }
    let opened = format::open_metadata_for(&*media, &found).map_err(fmt_err)?;
    let layout = opened.layout;
    check_size(&layout, opts, &path)?;
    let info = opened.cache_info.value;
    if let Some(want) = opts.data_crc {
        if want != info.data_crc {
            return Err(CacheError::Invalid {
                path,
                reason: format!(
                    "the cache was formatted with data CRC {}, and that cannot change; format it again to change it",
                    if info.data_crc { "on" } else { "off" }
                ),
            });
        }
    }
    let info = if opened.backing_match == BackingMatch::Same {
        info
    } else {
        log::info!(
            "cache {}: recording its backing image as {found} (it recorded {})",
            path.display(),
            opened.recorded_backing
        );
        format::record_backing(&*media, &layout, &info, &opened.recorded_backing, &found)
            .map_err(fmt_err)?
    };
    let load_tail = |t| {
        format::load_tail(&*media, &layout, t)
            .map(|v| v.value)
            .map_err(fmt_err)
    };
    let key_tail = load_tail(format::Tail::Key)?;
    let mut dirty_tail = load_tail(format::Tail::Dirty)?;
    if dirty_tail.log_seq < key_tail.log_seq {
        // Only an older replica (the newest one damaged) can be behind key_tail. GC never
        // passes dirty_tail, so everything before key_tail was written back: start there.
        log::warn!(
            "cache {}: dirty_tail (kset {}) is behind key_tail (kset {}); its newest replica must be damaged, resuming writeback at key_tail",
            path.display(),
            dirty_tail.log_seq,
            key_tail.log_seq
        );
        dirty_tail = key_tail;
    }
    let mut gens = Vec::with_capacity(layout.n_segments() as usize);
    for seg in 0..layout.n_segments() {
        gens.push(format::load_generation(&*media, &layout, seg).map_err(fmt_err)?);
    }
    let meta = Meta::new(media.clone(), layout, info, key_tail, dirty_tail);
    if let Some(p) = opts.gc_percent {
        meta.set_gc_percent(p).map_err(fmt_err)?;
    }
    let segments = SegmentMap::new(&gens);
    let index = Index::new(backing.size());
    let codec = KsetCodec::new(layout, backing.size(), opened.superblock.cache_id);
    let (head, report) = walk(
        &*media,
        &layout,
        &codec,
        &segments,
        Some(&index),
        key_tail,
        dirty_tail,
    )
    .map_err(|e| CacheError::Corrupt {
        path: path.clone(),
        reason: ErrorChain(&e).to_string(),
    })?;
    log::info!(
        "cache {}: replayed {} ksets, {} keys ({} dirty, {} bytes), {} stale; {} of {} segments in use",
        path.display(),
        report.ksets,
        report.keys,
        report.dirty_keys,
        report.dirty_bytes,
        report.stale_keys,
        segments.used_count(),
        segments.count()
    );
    meta.set_init_done().map_err(fmt_err)?;
    let log = Log::new(layout, codec, head, opts.queues);
    let mut opened = Opened {
        layout,
        meta,
        segments,
        index,
        log,
        data_crc: info.data_crc,
        dirty_bytes: report.dirty_bytes,
        zero_stamp: report.zero_stamp,
        cache_id: opened.superblock.cache_id,
        newest_kset_crc: report.newest_kset_crc,
    };
    if let Some(dir) = &opts.journal_dir {
        super::journal::apply::open(&mut opened, &*media, &opts.path, dir, backing.size());
    }
    Ok(opened)
}

fn check_size(
    layout: &Layout,
    opts: &CacheOptions,
    path: &std::path::Path,
) -> Result<(), CacheError> {
    let need = min_segments(opts.queues);
    if layout.n_segments() < need {
        return Err(CacheError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "{} segments of 16 MiB are too few for {} queues: at least {need} are needed ({} bytes of cache)",
                layout.n_segments(),
                opts.queues,
                Layout::media_len_for(need)
            ),
        });
    }
    Ok(())
}

/// Where the kset after an undecodable one at the start of `bytes` starts, if one with
/// sequence number `seq + 1` is there (tried at every size the damaged kset could have had).
/// A crash can only tear the newest kset, and nothing is written after it before it is
/// durable, so a valid successor means the damage is corruption, not the end of the log.
fn next_kset_after(codec: &KsetCodec, bytes: &[u8], seq: u64) -> Option<usize> {
    (0..=format::KSET_MAX_KEYS)
        .map(format::kset_size)
        .filter(|&at| at + format::KSET_HEADER_SIZE <= bytes.len())
        .find(|&at| codec.decode_kset(&bytes[at..], seq + 1).is_ok())
}

/// Walk the log from `key_tail`, marking log segments used and, when `index` is given,
/// inserting keys and taking segment references. Returns the head and what was seen.
pub fn walk(
    media: &dyn Media,
    layout: &Layout,
    codec: &KsetCodec,
    segments: &SegmentMap,
    index: Option<&Index>,
    key_tail: TailPos,
    dirty_tail: TailPos,
) -> Result<(LogHead, ReplayReport), ReplayError> {
    let tails = (key_tail, dirty_tail);
    walk_visit(media, layout, codec, segments, index, tails, &mut |_| {})
}

/// One key met by [`walk_visit`], for offline checks.
#[derive(Clone, Copy, Debug)]
pub struct VisitedKey {
    pub key: format::KeyRecord,
    /// Sequence number of the kset holding it.
    pub kset_seq: u64,
    /// Not yet written back (at or after dirty_tail, and not flagged clean).
    pub dirty: bool,
    /// Its segment has been reused since (older generation): the key is ignored.
    pub stale: bool,
}

/// [`walk`], calling `visit` for every key in log order.
pub fn walk_visit(
    media: &dyn Media,
    layout: &Layout,
    codec: &KsetCodec,
    segments: &SegmentMap,
    index: Option<&Index>,
    (key_tail, dirty_tail): (TailPos, TailPos),
    visit: &mut dyn FnMut(VisitedKey),
) -> Result<(LogHead, ReplayReport), ReplayError> {
    let mut report = ReplayReport::default();
    let mut pos = key_tail.pos;
    let mut seq = key_tail.log_seq;
    let mut dirty = false;
    let mut buf = vec![0u8; 2 * format::KSET_MAX_SIZE];
    segments.mark_used(pos.seg, SegmentKind::Log);
    report.log_segments = 1;
    let mut data_segs = Vec::new();
    loop {
        if pos == dirty_tail.pos && seq == dirty_tail.log_seq {
            dirty = true;
        }
        let Some(kset) = read_next_kset(media, layout, codec, &mut buf, pos, seq)? else {
            break;
        };
        report.ksets += 1;
        report.newest_kset_crc = Some(super::journal::kset_crc(&buf));
        match kset {
            Kset::Last { next_seg, .. } => {
                pos = follow_last(segments, &mut report, pos, seq, next_seg)?;
            }
            Kset::Keys { ref keys, .. } => {
                let mut replay = KeyReplay {
                    segments,
                    index,
                    report: &mut report,
                    data_segs: &mut data_segs,
                    visit: &mut *visit,
                };
                for k in keys {
                    replay.key(k, seq, dirty);
                }
                pos.off += kset.encoded_len() as u32;
            }
        }
        seq += 1;
    }
    if pos == dirty_tail.pos && seq == dirty_tail.log_seq {
        dirty = true;
    }
    if !dirty {
        return Err(ReplayError::DirtyTailOffLog {
            key_tail,
            dirty_tail,
            end: pos,
            end_seq: seq,
        });
    }
    mark_data_segments(segments, data_segs)?;
    Ok((LogHead { pos, seq }, report))
}

/// The kset with sequence number `seq` at `pos`, or `None` when the log ends there. A kset
/// that fails its CRC ends the log, unless a valid successor follows it: then the damage is
/// corruption (see [`next_kset_after`]).
fn read_next_kset(
    media: &dyn Media,
    layout: &Layout,
    codec: &KsetCodec,
    buf: &mut [u8],
    pos: CachePos,
    seq: u64,
) -> Result<Option<Kset>, ReplayError> {
    // Two ksets' worth, so a damaged kset's successor can be looked for.
    let avail = (layout.data_size() - pos.off).min(2 * format::KSET_MAX_SIZE as u32) as usize;
    let bytes = &mut buf[..avail];
    media
        .read(layout.media_offset(pos), bytes)
        .map_err(|source| ReplayError::Read {
            seg: pos.seg,
            off: pos.off,
            source,
        })?;
    match codec.decode_kset(bytes, seq) {
        Ok(k) => Ok(Some(k)),
        Err(e) if e.is_end_of_log() => match next_kset_after(codec, bytes, seq) {
            Some(next) => Err(ReplayError::DamagedBeforeValid {
                seq,
                seg: pos.seg,
                off: pos.off,
                next_off: pos.off as usize + next,
                damage: e,
            }),
            None => Ok(None),
        },
        Err(source) => Err(ReplayError::Corrupt {
            seg: pos.seg,
            off: pos.off,
            source,
        }),
    }
}

/// Move past the LAST kset `seq` at `pos` to the start of the log segment it names, which
/// must not be on the log already.
fn follow_last(
    segments: &SegmentMap,
    report: &mut ReplayReport,
    pos: CachePos,
    seq: u64,
    next_seg: u32,
) -> Result<CachePos, ReplayError> {
    if segments.kind(next_seg) != SegmentKind::Free {
        return Err(ReplayError::LastLinksToUsed {
            seq,
            seg: pos.seg,
            next_seg,
        });
    }
    segments.mark_used(next_seg, SegmentKind::Log);
    report.log_segments += 1;
    Ok(CachePos {
        seg: next_seg,
        off: 0,
    })
}

/// What replaying one key updates: the report, the segment references, the index.
struct KeyReplay<'a> {
    segments: &'a SegmentMap,
    index: Option<&'a Index>,
    report: &'a mut ReplayReport,
    /// Segments live keys point into, checked and marked once the walk is done.
    data_segs: &'a mut Vec<u32>,
    visit: &'a mut dyn FnMut(VisitedKey),
}

impl KeyReplay<'_> {
    /// Replay key `k` of kset `seq`; `dirty` says whether that kset is at or after dirty_tail.
    /// A stale key (its segment reused since) is counted and otherwise ignored.
    fn key(&mut self, k: &format::KeyRecord, seq: u64, dirty: bool) {
        self.report.keys += 1;
        let key_dirty = dirty && !k.is_clean();
        let stale = !k.is_zeroes() && k.gen != self.segments.gen(k.seg);
        (self.visit)(VisitedKey {
            key: *k,
            kset_seq: seq,
            dirty: key_dirty,
            stale,
        });
        if k.is_zeroes() {
            self.report.zero_stamp = self.report.zero_stamp.max(k.gen);
        } else {
            if stale {
                self.report.stale_keys += 1;
                return;
            }
            self.segments.get(k.seg);
            self.data_segs.push(k.seg);
        }
        if key_dirty {
            self.report.dirty_keys += 1;
            self.report.dirty_bytes += k.len as u64;
        }
        if let Some(index) = self.index {
            index.insert(index_key(k, key_dirty), &mut |_| {});
        }
    }
}

/// Mark the segments live keys point into as data segments; a key pointing into a log
/// segment is corruption.
fn mark_data_segments(segments: &SegmentMap, data_segs: Vec<u32>) -> Result<(), ReplayError> {
    for seg in data_segs {
        match segments.kind(seg) {
            SegmentKind::Log => return Err(ReplayError::KeyInLogSegment(seg)),
            SegmentKind::Free => segments.mark_used(seg, SegmentKind::Data),
            SegmentKind::Data => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_of_range() -> MediaError {
        MediaError::OutOfRange {
            offset: 4096,
            len: 512,
            media_len: 1024,
        }
    }

    #[test]
    fn a_printed_chain_shows_each_cause_once() {
        let cause = out_of_range().to_string();
        let read = ReplayError::Read {
            seg: 1,
            off: 64,
            source: out_of_range(),
        };
        let text = ErrorChain(&read).to_string();
        assert_eq!(text, format!("reading the kset at 1:64: {cause}"));
        let via_format = ReplayError::Corrupt {
            seg: 1,
            off: 64,
            source: format::FormatError::from(out_of_range()),
        };
        let text = ErrorChain(&via_format).to_string();
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
    }
}
