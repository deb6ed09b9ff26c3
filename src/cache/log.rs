//! The key log: open ksets in memory, and closing them onto the media at key_head.
//!
//! There is one open kset per queue in count, and a key goes to the kset of its 4 MiB region
//! (`region % n`), never to its submitter's: so every version of one block reaches the log in
//! the order the index saw them, which replay and writeback rely on. The caller appends while
//! holding the index region lock (lock order: index region → kset → head → segment map).
//!
//! Closing writes the keys at key_head as one or more ksets of at most 128 keys, each followed
//! by a zeroed header and carrying the next log sequence number. When a log segment cannot hold
//! the next kset plus a LAST kset, a LAST kset chains to a fresh log segment. If no segment is
//! free the keys stay in memory and the close is retried later; writes are held back by the
//! data-segment reserve long before that can starve the log.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::format::{self, KeyRecord, KsetCodec};
use super::media::Media;
use super::segments::{SegmentKind, SegmentMap};
use super::{CachePos, REGION_SHIFT};

/// Ksets are closed at least this often while they hold keys (dm-pcache's delayed flush).
pub const KSET_MAX_AGE: Duration = Duration::from_secs(1);

/// Why a close did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("no free segment to extend the key log")]
    NoSpace,
    #[error("cache media error while writing the key log: {0}")]
    Media(String),
}

#[derive(Default)]
struct OpenKset {
    keys: Vec<KeyRecord>,
    /// When the oldest key still waiting here was appended.
    since: Option<Instant>,
}

/// Position of the next kset and the sequence number it will carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHead {
    pub pos: CachePos,
    pub seq: u64,
}

pub struct Log {
    ksets: Vec<Mutex<OpenKset>>,
    head: Mutex<LogHead>,
    /// Signalled after every close, for writeback waiting on new ksets.
    closed: Condvar,
    layout: format::Layout,
    codec: KsetCodec,
}

impl Log {
    /// A log whose next kset goes at `head`; `n_ksets` is the number of queues.
    pub fn new(layout: format::Layout, codec: KsetCodec, head: LogHead, n_ksets: usize) -> Log {
        Log {
            ksets: (0..n_ksets.max(1)).map(|_| Mutex::default()).collect(),
            head: Mutex::new(head),
            closed: Condvar::new(),
            layout,
            codec,
        }
    }

    pub fn head(&self) -> LogHead {
        *self.head.lock().unwrap()
    }

    /// Which kset a key at backing offset `off` belongs to.
    pub fn kset_for(&self, off: u64) -> usize {
        ((off >> REGION_SHIFT) % self.ksets.len() as u64) as usize
    }

    /// Add a key to its region's kset. Returns true when that kset is full and should be
    /// closed now.
    pub fn append(&self, key: KeyRecord) -> bool {
        let mut k = self.ksets[self.kset_for(key.off)].lock().unwrap();
        k.keys.push(key);
        k.since.get_or_insert_with(Instant::now);
        k.keys.len() >= format::KSET_MAX_KEYS
    }

    /// Persist kset `idx` if it holds keys.
    pub fn close(
        &self,
        idx: usize,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        let mut kset = self.ksets[idx].lock().unwrap();
        if kset.keys.is_empty() {
            return Ok(());
        }
        let mut head = self.head.lock().unwrap();
        let mut written = 0;
        let result = (|| {
            for chunk in kset.keys.chunks(format::KSET_MAX_KEYS) {
                self.write_kset(&mut head, chunk, media, segments)?;
                written += chunk.len();
            }
            Ok(())
        })();
        kset.keys.drain(..written);
        if kset.keys.is_empty() {
            kset.since = None;
        }
        drop(head);
        drop(kset);
        if written > 0 {
            self.closed.notify_all();
        }
        result
    }

    /// Persist every kset that holds keys (FLUSH, write cache off, shutdown).
    pub fn close_all(&self, media: &dyn Media, segments: &SegmentMap) -> Result<(), LogError> {
        for idx in 0..self.ksets.len() {
            self.close(idx, media, segments)?;
        }
        Ok(())
    }

    /// Persist the kset holding keys for backing offset `off`.
    pub fn close_for(
        &self,
        off: u64,
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        self.close(self.kset_for(off), media, segments)
    }

    /// Persist the ksets whose oldest key waited longer than [`KSET_MAX_AGE`].
    pub fn close_aged(&self, media: &dyn Media, segments: &SegmentMap) -> Result<(), LogError> {
        for idx in 0..self.ksets.len() {
            let aged = self.ksets[idx]
                .lock()
                .unwrap()
                .since
                .is_some_and(|t| t.elapsed() >= KSET_MAX_AGE);
            if aged {
                self.close(idx, media, segments)?;
            }
        }
        Ok(())
    }

    /// Wait until the head moves past `seq` or `timeout` passes; returns the head.
    pub fn wait_beyond(&self, seq: u64, timeout: Duration) -> LogHead {
        let head = self.head.lock().unwrap();
        let (head, _) = self
            .closed
            .wait_timeout_while(head, timeout, |h| h.seq <= seq)
            .unwrap();
        *head
    }

    /// The codec of this cache's ksets.
    pub fn codec(&self) -> &KsetCodec {
        &self.codec
    }

    /// Wake everyone in [`Log::wait_beyond`] (shutdown).
    pub fn wake_waiters(&self) {
        self.closed.notify_all();
    }

    /// Write one kset at the head, chaining to a new log segment first when it does not fit.
    fn write_kset(
        &self,
        head: &mut LogHead,
        keys: &[KeyRecord],
        media: &dyn Media,
        segments: &SegmentMap,
    ) -> Result<(), LogError> {
        let mut buf = Vec::with_capacity(format::KSET_MAX_SIZE);
        self.codec
            .encode_kset(head.seq, keys, &mut buf)
            .map_err(|e| LogError::Media(format!("encoding a kset: {e}")))?;
        let data_size = self.layout.data_size() as u64;
        // Always leave room for the LAST kset that chains to the next segment, and for the
        // zeroed header that ends the log.
        let needed = buf.len() as u64 + format::KSET_HEADER_SIZE as u64;
        if head.pos.off as u64 + needed + format::KSET_HEADER_SIZE as u64 > data_size {
            let next = segments
                .alloc(SegmentKind::Log, 0)
                .ok_or(LogError::NoSpace)?;
            let next_start = self.layout.media_offset(CachePos { seg: next, off: 0 });
            write(media, next_start, &format::KSET_ZERO_HEADER)?;
            let mut last = Vec::with_capacity(format::KSET_HEADER_SIZE);
            self.codec
                .encode_last_kset(head.seq, next, &mut last)
                .map_err(|e| LogError::Media(format!("encoding a LAST kset: {e}")))?;
            write(media, self.layout.media_offset(head.pos), &last)?;
            fence(media)?;
            *head = LogHead {
                pos: CachePos { seg: next, off: 0 },
                seq: head.seq + 1,
            };
            buf.clear();
            self.codec
                .encode_kset(head.seq, keys, &mut buf)
                .map_err(|e| LogError::Media(format!("encoding a kset: {e}")))?;
        }
        let at = self.layout.media_offset(head.pos);
        // The zeroed header after the kset ends replay at the true end of the log even when
        // older ksets from an earlier use of this segment follow; the sequence number in every
        // header is the second line of defence.
        if head.pos.off as u64 + buf.len() as u64 + format::KSET_HEADER_SIZE as u64 <= data_size {
            write(media, at + buf.len() as u64, &format::KSET_ZERO_HEADER)?;
        }
        write(media, at, &buf)?;
        fence(media)?;
        head.pos.off += buf.len() as u32;
        head.seq += 1;
        Ok(())
    }
}

fn write(media: &dyn Media, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
    media
        .write(offset, bytes)
        .and_then(|()| media.persist(offset, bytes.len() as u64))
        .map_err(|e| LogError::Media(e.to_string()))
}

fn fence(media: &dyn Media) -> Result<(), LogError> {
    media.fence().map_err(|e| LogError::Media(e.to_string()))
}
