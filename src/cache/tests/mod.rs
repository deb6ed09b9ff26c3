// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the whole cache engine through its `EngineQueue` interface, on a recording media
//! and a real backing file.

mod backing_submits;
mod crash;
mod damaged;
mod faults;
mod gc;
mod group_commit;
mod index_memory;
mod kill_restart;
mod large_write;
mod model;
mod pacing;
mod paths;
mod races;
mod reap;
mod write_cache;
mod writeback;

use std::path::PathBuf;
use std::sync::Arc;

use super::format::Layout;
use super::media::{Media, RecordingMedia};
use super::replay::min_segments;
use super::{CacheEngine, CacheOptions};
use crate::backing::{BackingImage, BackingOptions};

/// A backing image in a temporary directory, and the directory.
pub(crate) struct Fixture {
    /// Keeps the backing image alive for the fixture's lifetime.
    _dir: tempfile::TempDir,
    pub backing: Arc<BackingImage>,
    pub media: Arc<RecordingMedia>,
    pub opts: CacheOptions,
}

impl Fixture {
    /// `backing_mib` of backing image, a cache of the smallest size for `queues` queues plus
    /// `extra_segments`.
    pub fn new(backing_mib: u64, queues: usize, extra_segments: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing.img");
        BackingImage::create_sparse(&path, backing_mib << 20).unwrap();
        let backing = BackingImage::open(&path, &BackingOptions::default()).unwrap();
        let segs = min_segments(queues) + extra_segments;
        let media = Arc::new(RecordingMedia::new(Layout::media_len_for(segs)).unwrap());
        let opts = CacheOptions {
            path: PathBuf::from("test-cache"),
            create_size: None,
            persistence: None,
            data_crc: None,
            gc_percent: None,
            queues,
            force_format: false,
            drain_on_shutdown: false,
            journal_dir: None,
            pacing: Default::default(),
        };
        Fixture {
            _dir: dir,
            backing,
            media,
            opts,
        }
    }

    pub fn open(&self) -> CacheEngine {
        CacheEngine::open_with_media(&self.opts, self.media.clone(), self.backing.clone())
            .expect("open cache")
    }

    /// Reopen on what the media durably holds (what a crash right now would leave).
    pub fn crash_and_open(&mut self, seed: Option<u64>) -> CacheEngine {
        let image = match seed {
            Some(s) => self.media.crash_image(s),
            None => self.media.durable_image(),
        };
        self.media = Arc::new(RecordingMedia::from_image(image).unwrap());
        self.open()
    }

    pub fn media_dyn(&self) -> Arc<dyn Media> {
        self.media.clone()
    }
}

/// A recognisable block of `len` bytes for a write numbered `n` at `off`.
pub(crate) fn pattern(off: u64, len: usize, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        let word = (off + i as u64 * 8) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// Wait until `done` holds, polling; panics with `what` if it does not within `limit`. A
/// guard against a hang, not a timing assertion: the limits are far above what is needed.
pub(crate) fn wait_until(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
