// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A process kill and a restart on the same media in the same boot: the old engine is left
//! exactly where it was (no kset closed, no destructor run, no thread running), and a new one
//! opens the same cache with the same journal directory. Every completed write must read back,
//! flushed or not. A journal from another boot must be ignored, as a power loss requires.

use std::path::PathBuf;
use std::sync::Arc;

use super::pattern;
use crate::backing::{BackingImage, BackingOptions};
use crate::cache::driver::Driver;
use crate::cache::format::Layout;
use crate::cache::media::{self, Media, MediaOptions, Persistence, RecordingMedia};
use crate::cache::replay::min_segments;
use crate::cache::{journal, CacheEngine, CacheOptions};
use crate::engine::Engine;

const QUEUES: usize = 2;

/// One cache, its backing image and its journal directory, over successive "processes".
struct Host {
    _dir: tempfile::TempDir,
    backing: Arc<BackingImage>,
    opts: CacheOptions,
    /// Pmem mode: the recording media whose current bytes a kill leaves.
    recording: Option<Arc<RecordingMedia>>,
}

impl Host {
    fn new(mode: Persistence) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("backing.img");
        BackingImage::create_sparse(&image, 64 << 20).unwrap();
        let backing = BackingImage::open(&image, &BackingOptions::default()).unwrap();
        // Every start takes a fresh data segment a queue, and nothing is written back or
        // collected (stepped engine): room for five starts.
        let len = Layout::media_len_for(min_segments(QUEUES) + 10);
        let recording =
            (mode == Persistence::Pmem).then(|| Arc::new(RecordingMedia::new(len).unwrap()));
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let opts = CacheOptions {
            path: dir.path().join("cache"),
            create_size: Some(len),
            persistence: Some(mode),
            data_crc: Some(true),
            gc_percent: None,
            queues: QUEUES,
            force_format: false,
            drain_on_shutdown: false,
            journal_dir: Some(run),
            pacing: Default::default(),
        };
        if recording.is_some() {
            // The recording stands in for the media's bytes; the journal is still named after
            // the media's file, which must exist as it would.
            std::fs::write(&opts.path, b"").unwrap();
        }
        Host {
            _dir: dir,
            backing,
            opts,
            recording,
        }
    }

    /// Start a "process": writeback and GC are stepped, so nothing closes a kset by itself.
    fn start(&self) -> CacheEngine {
        let media: Arc<dyn Media> = match &self.recording {
            Some(r) => r.clone(),
            None => media::open_media(
                &self.opts.path,
                &MediaOptions {
                    create_size: self.opts.create_size,
                    persistence: self.opts.persistence,
                },
            )
            .unwrap(),
        };
        CacheEngine::open_stepped(&self.opts, media, self.backing.clone()).unwrap()
    }

    /// SIGKILL: the process's memory is gone without any of its code running again; the page
    /// cache (or DAX memory) keeps every byte it stored, and so does the journal's file.
    fn kill(&mut self, engine: CacheEngine, driver: Driver) {
        std::mem::forget(driver);
        std::mem::forget(engine);
        if let Some(r) = &self.recording {
            let mut image = vec![0u8; Media::len(&**r) as usize];
            r.read(0, &mut image).unwrap();
            self.recording = Some(Arc::new(RecordingMedia::from_image(image).unwrap()));
        }
    }

    fn journal_file(&self) -> PathBuf {
        let run = self.opts.journal_dir.as_deref().unwrap();
        let found: Vec<_> = std::fs::read_dir(run)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "journal"))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "journal files in {}: {found:?}",
            run.display()
        );
        found[0].clone()
    }
}

/// The expected content of the first 16 MiB, kept as the writes complete.
struct Expect(Vec<u8>);

impl Expect {
    fn write(&mut self, d: &mut Driver, q: usize, off: u64, data: &[u8]) {
        d.write(q, off, data).unwrap();
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, d: &mut Driver, q: usize, off: u64, len: u64, discard: bool) {
        if discard {
            d.discard(q, off, len).unwrap();
        } else {
            d.write_zeroes(q, off, len).unwrap();
        }
        self.0[off as usize..(off + len) as usize].fill(0);
    }

    fn check(&self, d: &mut Driver, when: &str) {
        let got = d.read(0, 0, self.0.len()).unwrap();
        if let Some(at) = (0..got.len())
            .step_by(512)
            .find(|&i| got[i..i + 512] != self.0[i..i + 512])
        {
            panic!(
                "{when}: sector {} does not hold its last completed write",
                at / 512
            );
        }
    }
}

/// Writes of every kind over both queues, some flushed, most not, several overwriting each
/// other, more than a kset holds for some regions (so some ksets closed, others open).
fn workload(d: &mut Driver, e: &mut Expect, round: u64) {
    let mut n = round * 1000;
    let mut next = |m: u64| {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (n >> 33) % m
    };
    for i in 0..300u64 {
        let q = (i % 2) as usize;
        let sectors = 1 + next(16);
        let off = next(16 * 2048 - sectors) * 512;
        match next(20) {
            0 => d.flush(q).unwrap(),
            1 => e.zero(d, q, off, sectors * 512, next(2) == 0),
            _ => {
                let data = pattern(off, (sectors * 512) as usize, round * 1000 + i);
                e.write(d, q, off, &data);
            }
        }
    }
    // The last writes are not flushed.
    let data = pattern(4096, 8192, round);
    e.write(d, 1, 4096, &data);
}

fn completed_writes_survive_kills(mode: Persistence) {
    let mut host = Host::new(mode);
    let mut expect = Expect(vec![0; 16 << 20]);
    let mut engine = host.start();
    for round in 1..=2 {
        let mut d = Driver::new(&engine);
        expect.check(&mut d, &format!("{mode} after restart {}", round - 1));
        workload(&mut d, &mut expect, round);
        host.kill(engine, d);
        engine = host.start();
    }
    let mut d = Driver::new(&engine);
    expect.check(&mut d, &format!("{mode} after the last restart"));
    // A clean stop leaves every key on the log and no journal behind.
    let journal = host.journal_file();
    drop(d);
    engine.shutdown().unwrap();
    assert!(!journal.exists(), "a clean stop left {}", journal.display());
    let engine = host.start();
    expect.check(
        &mut Driver::new(&engine),
        &format!("{mode} after a clean stop"),
    );
}

#[test]
fn completed_writes_survive_kills_in_msync_mode() {
    completed_writes_survive_kills(Persistence::Msync);
}

#[test]
fn completed_writes_survive_kills_in_pmem_mode() {
    completed_writes_survive_kills(Persistence::Pmem);
}

#[test]
fn a_journal_from_another_boot_is_ignored() {
    let mut host = Host::new(Persistence::Msync);
    let engine = host.start();
    let mut d = Driver::new(&engine);
    let flushed = pattern(0, 8192, 1);
    d.write(0, 0, &flushed).unwrap();
    d.flush(0).unwrap();
    let unflushed = pattern(0, 4096, 2);
    d.write(1, 0, &unflushed).unwrap();
    host.kill(engine, d);
    // As after a reboot: the journal names another boot.
    journal::rewrite_boot_id_for_test(&host.journal_file(), [0x42; 16]);
    let engine = host.start();
    let mut d = Driver::new(&engine);
    assert_eq!(
        d.read(0, 0, 8192).unwrap(),
        flushed,
        "an unflushed write came back through a journal of another boot"
    );
}

#[test]
fn a_restart_with_another_queue_count_applies_the_journal() {
    // The journal of a 2-queue daemon has two slots; the keys go to the ksets of the new
    // daemon's own count, and the log writes them while applying without looking for slots
    // the old journal does not have.
    let mut host = Host::new(Persistence::Msync);
    let mut expect = Expect(vec![0; 16 << 20]);
    let mut engine = host.start();
    for (round, queues) in [(1, 3), (2, 1)] {
        let mut d = Driver::new(&engine);
        workload(&mut d, &mut expect, round);
        host.kill(engine, d);
        host.opts.queues = queues;
        engine = host.start();
        expect.check(
            &mut Driver::new(&engine),
            &format!("{queues} queues after a kill"),
        );
    }
}
