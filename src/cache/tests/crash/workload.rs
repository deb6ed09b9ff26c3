//! The seeded workload, and the cut: at chosen media events, inside whatever operation is
//! running, the crash images a crash there could leave are reopened and checked.
//!
//! Everything runs on one thread with writeback and GC stepped by the workload itself, so a
//! seed names one exact sequence of media events and a cut is just an event number.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::checker::{self, fill, Model, SECTOR, ZEROES};
use super::image::DurableFile;
use crate::backing::{BackingImage, BackingOptions, BackingQueue};
use crate::cache::driver::Driver;
use crate::cache::format::Layout;
use crate::cache::media::{CrashChoice, Media, Persistence, RecordingMedia};
use crate::cache::replay::min_segments;
use crate::cache::{CacheEngine, CacheOptions};
use crate::engine::{DataSeg, Engine, EngineQueue, IoResult, Request, RequestKind, Submit};

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
    /// Media model: `Pmem` (cache lines, 8-byte words) or `Msync` (4 KiB pages).
    pub persistence: Persistence,
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
            persistence: Persistence::Pmem,
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

/// Everything the cut needs, shared with the media hook.
struct CutCtx {
    cfg: Config,
    opts: CacheOptions,
    backing: Arc<BackingImage>,
    model: Arc<Mutex<Model>>,
    report: Arc<Mutex<Report>>,
    rng: Rng,
    durable: DurableFile,
}

impl CutCtx {
    fn on_event(&mut self, media: &RecordingMedia, event: u64) {
        let cut = match self.cfg.only_cut {
            Some(c) => c == event,
            None => self.rng.below(self.cfg.cut_every) == 0,
        };
        if !cut {
            return;
        }
        let pending = media.pending_lines();
        let model = self.model.lock().unwrap().clone();
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
        let mut found = Vec::new();
        self.durable.capture(media);
        for choice in &choices {
            let image = Arc::new(self.durable.image(&pending, *choice));
            let bad = check_image(image, &self.opts, &self.backing, &model, self.cfg.disk);
            if !bad.is_empty() {
                found.push(format!(
                    "seed {} cut {event} image {choice:?} ({} non-durable lines): {}",
                    self.cfg.seed,
                    pending.len(),
                    bad.join("; ")
                ));
            }
        }
        let mut r = self.report.lock().unwrap();
        r.cuts += 1;
        r.images += choices.len() as u64;
        if !pending.is_empty() {
            r.images_with_pending += choices.len() as u64;
        }
        r.violations.extend(found);
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
                    self.report.lock().unwrap().busy += 1;
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
        let mut moved = 0;
        for _ in 0..n {
            let r = self.engine.writeback_step(&mut self.wb);
            let mut rep = self.report.lock().unwrap();
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

    fn gc(&mut self, n: u64) -> u64 {
        let mut moved = 0;
        for _ in 0..n {
            match self.engine.gc_step() {
                Ok(true) => moved += 1,
                Ok(false) => break,
                Err(e) => panic!("GC failed: {e}"),
            }
        }
        self.report.lock().unwrap().gc_steps += moved;
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
    let media_len = Layout::media_len_for(min_segments(cfg.queues));
    let media = Arc::new(RecordingMedia::with_persistence(media_len, cfg.persistence).unwrap());
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
    let mut ctx = CutCtx {
        cfg: cfg.clone(),
        opts: CacheOptions {
            gc_percent: None,
            ..opts.clone()
        },
        backing: backing.clone(),
        model: model.clone(),
        report: report.clone(),
        rng: Rng(cfg.seed.wrapping_mul(31) ^ 0xC07),
        durable: DurableFile::new(),
    };
    media.set_event_hook(Some(Box::new(move |m, n| ctx.on_event(m, n))));

    let mut st = Stepper {
        engine: &engine,
        backing: backing.clone(),
        queues: (0..cfg.queues)
            .map(|i| engine.open_queue(i).unwrap())
            .collect(),
        wb: BackingQueue::new(backing.clone(), 64).unwrap(),
        tag: 0,
        report: report.clone(),
    };
    let mut r = Rng(cfg.seed);
    let mut written = 0u64;
    let mut id = checker::INITIAL;
    let mut ops = 0u64;
    while written < cfg.volume {
        ops += 1;
        let q = r.below(cfg.queues as u64) as usize;
        let dice = r.below(1000);
        match dice {
            0..=599 => {
                let max = [16, 16, 16, 256, 2048][r.below(5) as usize];
                let (first, n) = pick_range(&mut r, sectors, max);
                id += 1;
                let data = fill(id, first, n);
                model.lock().unwrap().submitted(first, n, id);
                let bufs = vec![DataSeg {
                    ptr: data.as_ptr() as *mut u8,
                    len: data.len(),
                }];
                let offset = first * SECTOR as u64;
                let res = st.run(q, RequestKind::Write { offset, bufs });
                if res.is_ok() && !engine.write_cache() {
                    model.lock().unwrap().completed_durably(first, n, id);
                }
                written += data.len() as u64;
            }
            600..=689 => {
                let (first, n) = pick_range(&mut r, sectors, 512);
                model.lock().unwrap().submitted(first, n, ZEROES);
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
                    model.lock().unwrap().completed_durably(first, n, ZEROES);
                }
            }
            690..=759 => {
                if st.run(q, RequestKind::Flush).is_ok() {
                    model.lock().unwrap().flushed();
                    report.lock().unwrap().flushes += 1;
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
                let m = model.lock().unwrap();
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
            _ => backing.set_fail_writes(r.below(2) == 0),
        }
    }
    backing.set_fail_writes(false);
    let events_total = media.events();
    media.set_event_hook(None);
    drop(st);
    engine.shutdown_for_crash_test();
    let stats = engine.stats();
    let mut out = report.lock().unwrap().clone();
    out.events = events_total;
    out.ops = ops;
    assert!(
        stats.gc_runs > 0 || cfg.only_cut.is_some(),
        "seed {}: GC never ran: {stats:?}",
        cfg.seed
    );
    out
}
