// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seeded workload: requests of every kind over several queues, writeback, GC, drains and
//! failing backing writes, with cuts (see `cut.rs`) at chosen media events inside whatever
//! operation is running.
//!
//! Everything runs on one thread with writeback and GC stepped by the workload itself, so a
//! seed names one exact sequence of media events and a cut is just an event number.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use smallvec::smallvec;

use super::checker::{self, fill, Model, SECTOR, ZEROES};
use super::config::{Config, Rng};
use super::cut::CutCtx;
use super::image::DurableFile;
use super::report::{Phase, PhaseCell, Report};
use super::stepper::Stepper;
use crate::backing::{BackingImage, BackingOptions, BackingQueue};
use crate::cache::format::Layout;
use crate::cache::replay::min_segments;
use crate::cache::{CacheEngine, CacheOptions};
use crate::engine::{DataSeg, Engine, RequestKind};
use crate::sync::lock;

/// A range of sectors: often near region boundaries or in a small hot area, so writes from
/// different queues overlap and keys split.
fn pick_range(r: &mut Rng, sectors: u64, max_len: u64) -> (u64, u64) {
    let len = 1 + r.below(max_len);
    let start = match r.below(4) {
        0 => r.below(4096),
        1 => {
            let boundary = (1 + r.below(sectors / 8192 - 1)) * 8192;
            boundary.saturating_sub(r.below(len + 64))
        }
        _ => r.below(sectors),
    };
    let start = start.min(sectors - 1);
    (start, len.min(sectors - start))
}

/// A backing image of `disk` bytes in `dir`, every sector holding [`checker::INITIAL`].
pub fn initial_backing(dir: &std::path::Path, disk: u64) -> Arc<BackingImage> {
    let path = dir.join("backing.img");
    BackingImage::create_sparse(&path, disk).unwrap();
    let backing = BackingImage::open(&path, &BackingOptions::default()).unwrap();
    let sectors = disk / SECTOR as u64;
    for start in (0..sectors).step_by(2048) {
        let n = 2048.min(sectors - start);
        backing
            .write_at(start * SECTOR as u64, &fill(checker::INITIAL, start, n))
            .unwrap();
    }
    backing.flush().unwrap();
    backing
}

/// Run the workload of `cfg`, cutting as it configures.
pub fn run(cfg: &Config) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let backing = initial_backing(dir.path(), cfg.disk);
    let sectors = cfg.disk / SECTOR as u64;
    let media = Arc::new(
        cfg.model
            .media(Layout::media_len_for(min_segments(cfg.queues))),
    );
    let opts = CacheOptions {
        path: PathBuf::from("crash-test-cache"),
        create_size: None,
        persistence: None,
        data_crc: Some(cfg.data_crc),
        gc_percent: Some(cfg.gc_percent),
        queues: cfg.queues,
        force_format: false,
        drain_on_shutdown: false,
        journal_dir: None,
        pacing: Default::default(),
    };
    let engine = CacheEngine::open_stepped(&opts, media.clone(), backing.clone()).unwrap();
    let model = Arc::new(Mutex::new(Model::new(sectors)));
    let report = Arc::new(Mutex::new(Report::default()));
    let phase = PhaseCell::default();
    let ctx = Arc::new(Mutex::new(CutCtx {
        cfg: cfg.clone(),
        opts: CacheOptions {
            gc_percent: None,
            ..opts.clone()
        },
        media: media.clone(),
        backing: backing.clone(),
        model: model.clone(),
        report: report.clone(),
        rng: Rng(cfg.seed.wrapping_mul(31) ^ 0xC07),
        durable: DurableFile::new(),
        phase: phase.clone(),
        backing_before: None,
    }));
    let on_event = ctx.clone();
    media.set_event_hook(Some(Box::new(move |m, n| lock(&on_event).on_event(m, n))));
    let on_flush = ctx.clone();
    backing.set_flush_hook(Some(Box::new(move || {
        // Held already: a flush by an engine reopened inside a cut, not the workload's.
        if let Ok(mut cuts) = on_flush.try_lock() {
            cuts.on_backing_flush()
        }
    })));

    let mut st = Stepper {
        engine: &engine,
        backing: backing.clone(),
        queues: (0..cfg.queues)
            .map(|i| engine.open_queue(i).unwrap())
            .collect(),
        wb: BackingQueue::new(backing.clone(), 64).unwrap(),
        tag: 0,
        report: report.clone(),
        cuts: ctx.clone(),
        phase: phase.clone(),
        wb_calls: 0,
    };
    let mut r = Rng(cfg.seed);
    let mut written = 0u64;
    let mut id = checker::INITIAL;
    let mut ops = 0u64;
    while written < cfg.volume {
        ops += 1;
        let q = r.below(cfg.queues as u64) as usize;
        let dice = r.below(1000);
        phase.enter(match dice {
            0..=599 => Phase::Write,
            600..=689 => Phase::Zeroes,
            690..=759 => Phase::Flush,
            760..=829 => Phase::Read,
            _ => Phase::WriteCacheSwitch,
        });
        match dice {
            0..=599 => {
                let max = [16, 16, 16, 256, 2048][r.below(5) as usize];
                let (first, n) = pick_range(&mut r, sectors, max);
                id += 1;
                let data = fill(id, first, n);
                lock(&model).submitted(first, n, id);
                let bufs = smallvec![DataSeg {
                    ptr: data.as_ptr() as *mut u8,
                    len: data.len(),
                }];
                let offset = first * SECTOR as u64;
                let res = st.run(q, RequestKind::Write { offset, bufs });
                if res.is_ok() && !engine.write_cache() {
                    lock(&model).completed_durably(first, n, id);
                }
                written += data.len() as u64;
            }
            600..=689 => {
                let (first, n) = pick_range(&mut r, sectors, 512);
                lock(&model).submitted(first, n, ZEROES);
                let (offset, len) = (first * SECTOR as u64, n * SECTOR as u64);
                let kind = if dice < 650 {
                    RequestKind::WriteZeroes {
                        offset,
                        len,
                        may_unmap: r.below(2) == 0,
                    }
                } else {
                    RequestKind::Discard { offset, len }
                };
                let res = st.run(q, kind);
                if res.is_ok() && !engine.write_cache() {
                    lock(&model).completed_durably(first, n, ZEROES);
                }
            }
            690..=759 => {
                if st.run(q, RequestKind::Flush).is_ok() {
                    lock(&model).flushed();
                    lock(&report).flushes += 1;
                }
            }
            760..=829 => {
                let (first, n) = pick_range(&mut r, sectors, 256);
                let mut buf = vec![0u8; n as usize * SECTOR];
                let bufs = smallvec![DataSeg {
                    ptr: buf.as_mut_ptr(),
                    len: buf.len(),
                }];
                let res = st.run(
                    q,
                    RequestKind::Read {
                        offset: first * SECTOR as u64,
                        bufs,
                    },
                );
                // The live engine must read what was last written (the crash checks the rest).
                res.unwrap_or_else(|e| panic!("seed {}: live read failed: {e:?}", cfg.seed));
                let m = lock(&model);
                for (i, s) in buf.chunks_exact(SECTOR).enumerate() {
                    let sector = first + i as u64;
                    let got = checker::identify(sector, s);
                    assert!(
                        got == Some(m.latest(sector)),
                        "seed {}: live read of sector {sector} returned {got:?}",
                        cfg.seed
                    );
                }
            }
            830..=859 => engine.set_write_cache(!engine.write_cache() || r.below(3) != 0),
            860..=939 => {
                st.writeback(1 + r.below(4));
            }
            940..=984 => {
                st.gc(1 + r.below(4));
            }
            985..=989 => {
                st.drain();
                // Drain put every completed write on the backing image and flushed it.
                lock(&model).flushed();
            }
            _ => backing.set_fail_writes(r.below(2) == 0),
        }
    }
    backing.set_fail_writes(false);
    let events_total = media.events();
    media.set_event_hook(None);
    backing.set_flush_hook(None);
    drop(st);
    engine.shutdown_for_crash_test();
    let stats = engine.stats();
    let mut out = lock(&report).clone();
    out.events = events_total;
    out.ops = ops;
    assert!(
        stats.gc_runs > 0 || cfg.only_cut.is_some() || cfg.only_flush_cut.is_some(),
        "seed {}: GC never ran: {stats:?}",
        cfg.seed
    );
    out
}
