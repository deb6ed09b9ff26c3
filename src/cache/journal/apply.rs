// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a cache with a journal: apply what an earlier process's journal adds to the
//! replayed log, make it durable, and attach a journal of this process's own.
//!
//! Nothing here can make opening fail: without a usable journal the cache opens as it always
//! did (a kill may then lose completed writes not yet flushed, never more), with a warning.

use std::path::Path;

use super::{
    boot_id, path_in, read_previous, recover, Identity, Journal, LogEnd, MediaFile, Recovered,
    DEFAULT_CAPACITY,
};
use crate::cache::core::index_key;
use crate::cache::media::Media;
use crate::cache::replay::Opened;
use crate::cache::segments::SegmentKind;
use crate::engine::ErrorChain;

/// Apply the journal in `dir` left by an earlier process (if it applies), then give the log a
/// new journal there.
pub(in crate::cache) fn open(
    opened: &mut Opened,
    media: &dyn Media,
    media_path: &Path,
    dir: &Path,
    backing_size: u64,
) {
    let media_file = match MediaFile::of(media_path) {
        Ok(f) => f,
        Err(e) => {
            log::warn!(
                "no process-kill journal: {}: {e}; a daemon kill may lose completed writes not yet flushed",
                media_path.display()
            );
            return;
        }
    };
    let me = match boot_id() {
        Ok(boot_id) => Identity {
            boot_id,
            cache_id: opened.cache_id,
        },
        Err(e) => {
            log::warn!(
                "no process-kill journal: {}; a daemon kill may lose completed writes not yet flushed",
                ErrorChain(&e)
            );
            return;
        }
    };
    let path = path_in(dir, &opened.cache_id, media_file);
    let previous = match read_previous(&path) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("ignoring the journal: {}", ErrorChain(&e));
            None
        }
    };
    if let Some(bytes) = previous {
        let log_end = LogEnd {
            head_seq: opened.log.head().seq,
            newest_kset_crc: opened.newest_kset_crc,
        };
        let layout = opened.layout;
        let validate = |k: &crate::cache::format::KeyRecord| k.validate(&layout, backing_size);
        match recover(&bytes, &me, &log_end, &validate) {
            Ok(r) if r.key_count() > 0 => apply(opened, media, &path, &r),
            Ok(_) => {}
            Err(why) => log::info!("journal {} not applied: {why}", path.display()),
        }
    }
    let journal = match Journal::create(
        &path,
        &me,
        opened.log.kset_count(),
        DEFAULT_CAPACITY,
        opened.log.head().seq,
    ) {
        Ok(j) => j,
        Err(e) => {
            log::warn!(
                "no process-kill journal: {}; a daemon kill may lose completed writes not yet flushed",
                ErrorChain(&e)
            );
            opened.log.set_journal(None);
            return;
        }
    };
    // Keys the applying could not write to the log yet (no room) are kept in the new journal
    // before it replaces the old one.
    let mut unjournaled = 0;
    for (slot, keys) in opened.log.open_keys().iter().enumerate() {
        unjournaled += keys.iter().filter(|k| !journal.append(slot, k)).count();
    }
    if unjournaled > 0 {
        log::warn!(
            "{unjournaled} keys of completed writes wait for log room and do not fit the journal: a kill before they reach the log loses them"
        );
    }
    match journal.publish() {
        Ok(()) => opened.log.set_journal(Some(journal)),
        Err(e) => {
            log::warn!(
                "no process-kill journal: {}; a daemon kill may lose completed writes not yet flushed",
                ErrorChain(&e)
            );
            opened.log.set_journal(None);
        }
    }
}

/// Put the keys `r` holds into the index and the log as replay does, and write them to the
/// log, with the old journal following the ksets this writes (a kill now applies them again).
fn apply(opened: &mut Opened, media: &dyn Media, path: &Path, r: &Recovered) {
    match Journal::resume(path, r) {
        Ok(j) => opened.log.set_journal(Some(j)),
        Err(e) => {
            // Applying without it is still right; only a kill during the next moments would
            // see the log moved and ignore the journal.
            log::warn!("journal {}: {}", path.display(), ErrorChain(&e));
        }
    }
    let (mut applied, mut stale) = (0usize, 0usize);
    for key in r.slots.iter().flatten() {
        if key.is_zeroes() {
            opened.zero_stamp = opened.zero_stamp.max(key.gen);
        } else {
            // The key's segment held a live key (a pin at least) when the write completed, so
            // nothing could reuse it since; a generation that moved means the journal is not
            // this cache's present.
            if key.gen != opened.segments.gen(key.seg) {
                stale += 1;
                continue;
            }
            match opened.segments.kind(key.seg) {
                SegmentKind::Log => {
                    stale += 1;
                    continue;
                }
                SegmentKind::Free => opened.segments.mark_used(key.seg, SegmentKind::Data),
                SegmentKind::Data => {}
            }
            opened.segments.get(key.seg);
        }
        if !key.is_clean() {
            opened.dirty_bytes += key.len as u64;
        }
        opened.index.insert(index_key(key, true), &mut |_| {});
        opened.log.append(*key);
        applied += 1;
    }
    let closed = opened.log.close_all(media, &opened.segments);
    log::info!(
        "journal {}: applied {applied} keys of completed writes the log lacked ({stale} stale){}",
        path.display(),
        if closed.is_ok() {
            ", now on the log"
        } else {
            ""
        }
    );
    if let Err(e) = closed {
        log::warn!(
            "the applied keys stay in memory until the log has room: {}",
            ErrorChain(&e)
        );
    }
}
