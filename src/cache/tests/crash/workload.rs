// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seeded workload, and the cut: at chosen media events, inside whatever operation is
//! running, the crash images a crash there could leave are reopened and checked.
//!
//! Everything runs on one thread with writeback and GC stepped by the workload itself, so a
//! seed names one exact sequence of media events and a cut is just an event number.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::checker::{self, fill, Model, SECTOR, ZEROES};
use super::image::DurableFile;
use crate::backing::{BackingImage, BackingOptions, BackingQueue};
use crate::cache::driver::Driver;
use crate::cache::format::Layout;
use crate::cache::media::{CrashChoice, Media, PendingLines, RecordingMedia};
use crate::cache::replay::min_segments;
use crate::cache::{CacheEngine, CacheOptions};
use crate::engine::{DataSeg, Engine, EngineQueue, IoResult, Request, RequestKind, Submit};
use crate::sync::lock;

/// One run of the workload.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub queues: usize,
    /// Size of the backing image (the disk), bytes.
    pub disk: u64,
    /// Stop after writing this many bytes.
    pub volume: u64,
    pub data_crc: bool,
    pub gc_percent: u8,
    /// On average one cut every this many media events.
    pub cut_every: u64,
    /// Random images per cut, besides all-lost and all-kept.
    pub random_images: u64,
    /// Cut only at this event (replaying a reported violation).
    pub only_cut: Option<u64>,
    /// On average one cut inside writeback's backing flush every this many writeback steps.
    pub flush_cut_every: u64,
    /// Cut only inside the backing flush of this writeback step (replaying a violation).
    pub only_flush_cut: Option<u64>,
    /// How the media makes writes durable, i.e. which crash images a cut can leave.
    pub model: MediaModel,
}

/// The persistence mode whose crash images a run explores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaModel {
    /// pmem: `persist` writes back 64-byte lines, `fence` makes the calling thread's lines
    /// durable; a crash keeps any mix of 8-byte words of a non-durable line.
    Pmem,
    /// msync: the media is a page-cache mapping; every unsynced 4 KiB page may reach the disk
    /// whole, in any state it held, or not at all, in any order.
    Msync,
}

impl MediaModel {
    /// Every persistence mode the recording media can model.
    pub const ALL: &'static [MediaModel] = &[MediaModel::Pmem, MediaModel::Msync];

    pub fn name(self) -> &'static str {
        match self {
            MediaModel::Pmem => "pmem",
            MediaModel::Msync => "msync",
        }
    }

    pub fn parse(name: &str) -> Option<MediaModel> {
        Self::ALL.iter().copied().find(|m| m.name() == name)
    }

    fn media(self, len: u64) -> RecordingMedia {
        match self {
            MediaModel::Pmem => RecordingMedia::new(len).unwrap(),
            MediaModel::Msync => RecordingMedia::new_msync(len).unwrap(),
        }
    }
}

/// What the workload was doing when a cut happened; a run counts its cuts by phase, so a
/// campaign shows it crashed inside each operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Write,
    Zeroes,
    Flush,
    Read,
    /// `set_write_cache`, which persists open ksets when the cache goes off.
    WriteCacheSwitch,
    /// Writeback's media updates (dirty_tail).
    Writeback,
    /// Inside writeback's backing flush: its writes issued, the flush not yet done.
    BackingFlush,
    Gc,
    /// `drain`: closing the open ksets, then writeback until dirty_tail reaches the head.
    Drain,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Write,
        Phase::Zeroes,
        Phase::Flush,
        Phase::Read,
        Phase::WriteCacheSwitch,
        Phase::Writeback,
        Phase::BackingFlush,
        Phase::Gc,
        Phase::Drain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Write => "write",
            Phase::Zeroes => "zeroes",
            Phase::Flush => "flush",
            Phase::Read => "read",
            Phase::WriteCacheSwitch => "write-cache switch",
            Phase::Writeback => "writeback",
            Phase::BackingFlush => "writeback backing flush",
            Phase::Gc => "GC",
            Phase::Drain => "drain",
        }
    }
}

/// The phase the workload is in, shared with the cut hooks.
#[derive(Clone, Default)]
struct PhaseCell(Arc<AtomicU8>);

impl PhaseCell {
    fn get(&self) -> Phase {
        Phase::ALL[self.0.load(Ordering::Relaxed) as usize]
    }

    /// Enter `phase`; returns the phase to go back to.
    fn enter(&self, phase: Phase) -> Phase {
        Phase::ALL[self.0.swap(phase as u8, Ordering::Relaxed) as usize]
    }
}

impl Config {
    /// The configuration seed `seed` runs with in the suite: the seed also varies the shape.
    pub fn for_seed(seed: u64) -> Config {
        let mut r = Rng(seed ^ 0x5EED);
        Config {
            seed,
            queues: 2 + (r.below(4) == 0) as usize,
            disk: 16 << 20,
            volume: (110 + r.below(60)) << 20,
            data_crc: r.below(2) == 0,
            gc_percent: [0, 30, 70, 90][r.below(4) as usize],
            cut_every: 120,
            random_images: 6,
            only_cut: None,
            flush_cut_every: 24,
            only_flush_cut: None,
            model: MediaModel::Pmem,
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub events: u64,
    pub cuts: u64,
    pub images: u64,
    /// Images whose cut had non-durable lines to choose from.
    pub images_with_pending: u64,
    pub violations: Vec<String>,
    pub ops: u64,
    pub busy: u64,
    pub writeback_steps: u64,
    pub writeback_errors: u64,
    pub gc_steps: u64,
    pub flushes: u64,
    pub drains: u64,
    /// Cuts per [`Phase`] (indexed by `Phase as usize`).
    pub cuts_by_phase: [u64; Phase::ALL.len()],
}

impl Report {
    /// Add another run's counts to these.
    pub fn add(&mut self, r: &Report) {
        self.events += r.events;
        self.cuts += r.cuts;
        self.images += r.images;
        self.images_with_pending += r.images_with_pending;
        self.violations.extend(r.violations.iter().cloned());
        self.ops += r.ops;
        self.busy += r.busy;
        self.writeback_steps += r.writeback_steps;
        self.writeback_errors += r.writeback_errors;
        self.gc_steps += r.gc_steps;
        self.flushes += r.flushes;
        self.drains += r.drains;
        for (a, b) in self.cuts_by_phase.iter_mut().zip(r.cuts_by_phase) {
            *a += b;
        }
    }

    /// Cuts per phase, as `name N, ...`.
    pub fn phases(&self) -> String {
        Phase::ALL
            .iter()
            .map(|p| format!("{} {}", p.name(), self.cuts_by_phase[*p as usize]))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Small deterministic generator (SplitMix64).
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Everything a cut needs, shared by the media hook and the backing flush hook.
struct CutCtx {
    cfg: Config,
    opts: CacheOptions,
    media: Arc<RecordingMedia>,
    backing: Arc<BackingImage>,
    model: Arc<Mutex<Model>>,
    report: Arc<Mutex<Report>>,
    rng: Rng,
    durable: DurableFile,
    phase: PhaseCell,
    /// The backing image before the writeback step in progress, taken when that step's
    /// backing flush is to be cut, with the step's number.
    backing_before: Option<(u64, Vec<u8>)>,
}

/// How a cut inside writeback's backing flush leaves the sectors the step wrote (and has not
/// flushed): all of them on the image, none, or a seeded mix sector by sector.
#[derive(Clone, Copy, Debug)]
enum BackingLoss {
    None,
    All,
    Random(u64),
}

impl CutCtx {
    fn on_event(&mut self, media: &RecordingMedia, event: u64) {
        let phase = self.phase.get();
        // The rarer operations get denser cuts, so every run crashes inside each of them.
        let every = match phase {
            Phase::Write | Phase::Flush | Phase::Writeback => self.cfg.cut_every,
            _ => self.cfg.cut_every / 4,
        };
        let cut = match self.cfg.only_cut {
            Some(c) => c == event,
            None => self.cfg.only_flush_cut.is_none() && self.rng.below(every) == 0,
        };
        if !cut {
            return;
        }
        let pending = media.pending_lines();
        let mut choices = vec![CrashChoice::AllLost];
        if !pending.is_empty() {
            choices.push(CrashChoice::AllKept);
            let n = if self.cfg.only_cut.is_some() {
                32
            } else {
                self.cfg.random_images
            };
            for i in 0..n {
                choices.push(CrashChoice::Random(
                    self.cfg.seed ^ event.rotate_left(20) ^ i,
                ));
            }
        }
        let images: Vec<_> = choices
            .into_iter()
            .map(|c| (c, BackingLoss::None))
            .collect();
        self.cut(
            media,
            &pending,
            &images,
            phase,
            &format!("cut {event}"),
            None,
        );
    }

    /// Whether writeback step `step` gets a cut inside its backing flush (then the backing
    /// image is taken now, to know what the step's unflushed writes replaced).
    fn plan_flush_cut(&mut self, step: u64) {
        let cut = match (self.cfg.only_cut, self.cfg.only_flush_cut) {
            (_, Some(s)) => s == step,
            (Some(_), None) => false,
            (None, None) => self.rng.below(self.cfg.flush_cut_every) == 0,
        };
        self.backing_before = cut.then(|| (step, read_backing(&self.backing, self.cfg.disk)));
    }

    /// The backing flush hook: a cut with the step's writes on the image, lost, or mixed.
    fn on_backing_flush(&mut self) {
        let Some((step, before)) = self.backing_before.take() else {
            return;
        };
        let media = self.media.clone();
        let pending = media.pending_lines();
        let replay = self.cfg.only_flush_cut.is_some();
        let n = if replay {
            32
        } else {
            self.cfg.random_images / 2
        }
        .max(1);
        let mut images = vec![(CrashChoice::AllLost, BackingLoss::All)];
        if !pending.is_empty() {
            images.push((CrashChoice::AllKept, BackingLoss::All));
        }
        images.push((CrashChoice::AllLost, BackingLoss::None));
        for i in 0..n {
            let r = self.cfg.seed ^ step.rotate_left(24) ^ i;
            let choice = if pending.is_empty() {
                CrashChoice::AllLost
            } else {
                CrashChoice::Random(r)
            };
            images.push((choice, BackingLoss::Random(r)));
        }
        let what = format!("writeback step {step} backing flush");
        self.cut(
            &media,
            &pending,
            &images,
            Phase::BackingFlush,
            &what,
            Some(&before),
        );
    }

    /// Check every image of one cut. `before` is the backing image as it was before the
    /// unflushed writes of a backing-flush cut (which [`BackingLoss`] may take back).
    fn cut(
        &mut self,
        media: &RecordingMedia,
        pending: &PendingLines,
        images: &[(CrashChoice, BackingLoss)],
        phase: Phase,
        what: &str,
        before: Option<&[u8]>,
    ) {
        let model = lock(&self.model).clone();
        let now = before.map(|_| read_backing(&self.backing, self.cfg.disk));
        let mut found = Vec::new();
        self.durable.capture(media);
        for &(choice, loss) in images {
            let changed = match (before, &now, loss) {
                (Some(before), Some(now), BackingLoss::All | BackingLoss::Random(_)) => {
                    set_backing(&self.backing, now, before, loss);
                    Some((before, now))
                }
                _ => None,
            };
            let image = Arc::new(self.durable.image(pending, choice));
            let bad = check_image(image, &self.opts, &self.backing, &model, self.cfg.disk);
            if let Some((before, now)) = changed {
                set_backing(&self.backing, now, before, BackingLoss::None);
            }
            if !bad.is_empty() {
                found.push(format!(
                    "{} seed {} {what} image {choice:?} backing loss {loss:?} ({} non-durable lines): {}",
                    self.cfg.model.name(),
                    self.cfg.seed,
                    pending.len(),
                    bad.join("; ")
                ));
            }
        }
        let mut r = lock(&self.report);
        r.cuts += 1;
        r.cuts_by_phase[phase as usize] += 1;
        r.images += images.len() as u64;
        if !pending.is_empty() {
            r.images_with_pending += images.len() as u64;
        }
        r.violations.extend(found);
    }
}

/// The whole backing image.
fn read_backing(backing: &BackingImage, disk: u64) -> Vec<u8> {
    let mut buf = vec![0u8; disk as usize];
    backing.read_at(0, &mut buf).unwrap();
    buf
}

/// Make the sectors where `now` and `before` differ hold `before` where `loss` takes the
/// write back, `now` elsewhere; consecutive sectors with the same choice are one write.
fn set_backing(backing: &BackingImage, now: &[u8], before: &[u8], loss: BackingLoss) {
    let mut rng = Rng(match loss {
        BackingLoss::Random(seed) => seed,
        _ => 0,
    });
    let sectors = now.len() / SECTOR;
    // The run being gathered: first sector, and whether it takes `before`.
    let mut run: Option<(usize, bool)> = None;
    for s in 0..=sectors {
        let at = s * SECTOR;
        let choice =
            (s < sectors && now[at..at + SECTOR] != before[at..at + SECTOR]).then(|| match loss {
                BackingLoss::None => false,
                BackingLoss::All => true,
                BackingLoss::Random(_) => rng.below(2) == 0,
            });
        if let Some((first, lose)) = run {
            if choice != Some(lose) {
                let src = if lose { before } else { now };
                let range = first * SECTOR..at;
                backing.write_at(range.start as u64, &src[range]).unwrap();
                run = None;
            }
        }
        if let (None, Some(lose)) = (run, choice) {
            run = Some((s, lose));
        }
    }
}

/// Reopen one crash image on the backing image as it is now, read the whole disk and compare
/// it with `model`.
pub fn check_image(
    media: Arc<dyn Media>,
    opts: &CacheOptions,
    backing: &Arc<BackingImage>,
    model: &Model,
    disk: u64,
) -> Vec<String> {
    match CacheEngine::open_stepped(opts, media, backing.clone()) {
        Err(e) => vec![format!("the crash image does not open: {e}")],
        Ok(engine) => {
            let mut d = Driver::new(&engine);
            let bad = checker::check_disk(&mut d, model, disk);
            drop(d);
            engine.shutdown_for_crash_test();
            bad
        }
    }
}

/// Drives the engine's queues one request at a time, stepping writeback and GC when the cache
/// is full, so the run never depends on timing.
struct Stepper<'a> {
    engine: &'a CacheEngine,
    backing: Arc<BackingImage>,
    queues: Vec<Box<dyn EngineQueue>>,
    wb: BackingQueue,
    tag: u64,
    report: Arc<Mutex<Report>>,
    cuts: Arc<Mutex<CutCtx>>,
    phase: PhaseCell,
    /// Writeback steps started, which number the backing-flush cuts.
    wb_calls: u64,
}

impl<'a> Stepper<'a> {
    fn run(&mut self, q: usize, kind: RequestKind) -> IoResult {
        self.tag += 1;
        let tag = self.tag;
        let is_read = matches!(kind, RequestKind::Read { .. });
        let mut req = Request { tag, kind };
        let mut stuck = 0;
        loop {
            match self.queues[q].submit(req) {
                Submit::Done(r) => return r,
                Submit::Pending => break,
                Submit::Busy(back) => {
                    req = back;
                    lock(&self.report).busy += 1;
                    stuck = self.make_room(stuck);
                }
            }
        }
        let mut done = Vec::new();
        loop {
            self.queues[q].reap(&mut done);
            if let Some(i) = done.iter().position(|(t, _)| *t == tag) {
                return done.swap_remove(i).1;
            }
            if is_read {
                // Waiting for backing reads only.
                std::thread::sleep(std::time::Duration::from_micros(50));
            } else {
                // A write-through write waits for log space.
                stuck = self.make_room(stuck);
            }
        }
    }

    /// Free cache space the way the background threads would. Returns the updated count of
    /// rounds without progress (and fails the test when nothing can move).
    fn make_room(&mut self, stuck: u32) -> u32 {
        // A failing backing image keeps the cache full; it recovers so the run can go on.
        self.backing.set_fail_writes(false);
        let core = self.engine.core();
        let _ = core.close_all_ksets();
        let wb = self.writeback(1);
        let gc = self.gc(1);
        if wb + gc > 0 {
            return 0;
        }
        assert!(
            stuck < 1000,
            "the cache is full and neither writeback nor GC can make progress"
        );
        stuck + 1
    }

    fn writeback(&mut self, n: u64) -> u64 {
        let outer = self.phase.enter(Phase::Writeback);
        let moved = self.writeback_in_phase(n);
        self.phase.enter(outer);
        moved
    }

    fn writeback_in_phase(&mut self, n: u64) -> u64 {
        let mut moved = 0;
        for _ in 0..n {
            self.wb_calls += 1;
            lock(&self.cuts).plan_flush_cut(self.wb_calls);
            let r = self.engine.writeback_step(&mut self.wb);
            lock(&self.cuts).backing_before = None;
            let mut rep = lock(&self.report);
            match r {
                Ok(true) => {
                    rep.writeback_steps += 1;
                    moved += 1;
                }
                Ok(false) => break,
                Err(_) => {
                    rep.writeback_errors += 1;
                    break;
                }
            }
        }
        moved
    }

    /// What `CacheEngine::drain` does, with the writeback it waits for stepped here (there is
    /// no writeback thread); then the real `drain`, which finds nothing left to wait for.
    fn drain(&mut self) {
        let outer = self.phase.enter(Phase::Drain);
        let core = self.engine.core().clone();
        let mut stuck = 0;
        while core.close_all_ksets().is_err() {
            stuck = self.make_room(stuck);
        }
        let target = core.log.head().seq;
        while core.meta.dirty_tail().log_seq < target {
            if self.writeback_in_phase(1) == 0 {
                // A failing backing image: the drain waits until it recovers.
                self.backing.set_fail_writes(false);
                stuck += 1;
                assert!(stuck < 1000, "drain: writeback makes no progress");
            }
        }
        self.engine.drain().expect("drain");
        lock(&self.report).drains += 1;
        self.phase.enter(outer);
    }

    fn gc(&mut self, n: u64) -> u64 {
        let outer = self.phase.enter(Phase::Gc);
        let moved = self.gc_in_phase(n);
        self.phase.enter(outer);
        moved
    }

    fn gc_in_phase(&mut self, n: u64) -> u64 {
        let mut moved = 0;
        for _ in 0..n {
            match self.engine.gc_step() {
                Ok(true) => moved += 1,
                Ok(false) => break,
                Err(e) => panic!("GC failed: {e}"),
            }
        }
        lock(&self.report).gc_steps += moved;
        moved
    }
}

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
                let bufs = vec![DataSeg {
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
                let bufs = vec![DataSeg {
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
