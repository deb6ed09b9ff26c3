// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Crash consistency: a seeded workload over several queues is cut at media events inside its
//! operations, and inside writeback's backing flush; every crash image a cut can leave (all
//! non-durable lines lost, all kept, random mixes of 8-byte words; at a backing flush also the
//! step's unflushed backing writes lost, kept or mixed sector by sector) is reopened on the
//! backing image as it is at the cut, replayed, read in full and checked against what the
//! durability contract allows for every sector.
//!
//! `PCACHE_CRASH_IMAGES=N` explores at least N images (default 2000, split over two tests that
//! run in parallel); `PCACHE_CRASH_SEED=S [PCACHE_CRASH_CUT=E | PCACHE_CRASH_FLUSH_CUT=W]
//! [PCACHE_CRASH_MODEL=M]` with `--ignored` replays one seed (and one cut) printed by a
//! failure. The long campaign over every persistence mode is [`campaign`].
//!
//! The same workload runs again on a media modelled as msync mode's page cache (whole 4 KiB
//! pages, any unsynced page kept or lost, in any order): `PCACHE_CRASH_MSYNC_IMAGES=N`;
//! `PCACHE_CRASH_MODEL=msync` replays an msync-mode seed.

mod checker;
mod config;
mod corrupt;
mod cut;
mod image;
mod report;
mod stepper;
mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::sync::lock;
use config::{Config, MediaModel};
use report::{Phase, Report};

/// Images the default suite explores.
const DEFAULT_IMAGES: u64 = 2000;
/// Images the campaign explores unless told otherwise.
const CAMPAIGN_IMAGES: u64 = 100_000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Random images per cut in the campaign: a cut's fixed cost (taking the durable image, finding
/// the non-durable lines) is shared by more crash states.
const CAMPAIGN_RANDOM_IMAGES: u64 = 24;

/// The configuration of `seed` in `model`.
fn config(seed: u64, model: MediaModel) -> Config {
    Config {
        model,
        ..Config::for_seed(seed)
    }
}

/// Run one seed and print what it did.
fn run_seed(cfg: Config) -> Report {
    let (seed, model) = (cfg.seed, cfg.model);
    let r = workload::run(&cfg);
    eprintln!(
        "crash {} seed {seed}: {} events, {} ops, {} cuts, {} images ({} with non-durable lines), {} violations; {} flushes, {} drains, {} busy, {} writeback steps, {} writeback errors, {} GC steps; cuts in {}; {cfg:?}",
        model.name(), r.events, r.ops, r.cuts, r.images, r.images_with_pending, r.violations.len(),
        r.flushes, r.drains, r.busy, r.writeback_steps, r.writeback_errors, r.gc_steps, r.phases()
    );
    r
}

/// Run seeds `first, first + stride, ...` until `want` images were explored.
fn explore(first: u64, stride: u64, want: u64) -> Report {
    explore_in(MediaModel::Pmem, first, stride, want)
}

/// [`explore`] on a media following `model`.
fn explore_in(model: MediaModel, first: u64, stride: u64, want: u64) -> Report {
    let mut total = Report::default();
    let mut seed = first;
    let mut seeds = Vec::new();
    while total.images < want {
        total.add(&run_seed(config(seed, model)));
        seeds.push(seed);
        seed += stride;
    }
    eprintln!(
        "{} crash images explored: {} at {} cuts over seeds {seeds:?} ({} with non-durable lines); cuts in {}; violations: {}",
        model.name(),
        total.images,
        total.cuts,
        total.images_with_pending,
        total.phases(),
        total.violations.len()
    );
    total
}

fn assert_clean(r: &Report) {
    assert!(
        r.violations.is_empty(),
        "{} crash images break the durability contract (replay one with PCACHE_CRASH_SEED=<seed> PCACHE_CRASH_CUT=<cut> (or PCACHE_CRASH_FLUSH_CUT=<writeback step>) PCACHE_CRASH_MODEL=<model> cargo test --release --lib crash::replay -- --ignored --nocapture):\n{}",
        r.violations.len(),
        r.violations.join("\n")
    );
    assert!(r.busy > 0, "the cache never filled up");
    assert!(r.gc_steps > 0, "GC never ran");
    assert!(r.writeback_errors > 0, "no writeback error was injected");
    assert!(r.drains > 0, "no drain ran");
    // Enough cuts that each operation's share of them is well above zero (a single short
    // seed may miss the rarer ones).
    for phase in Phase::ALL {
        if phase != Phase::Read && r.cuts >= 200 {
            assert!(
                r.cuts_by_phase[phase as usize] > 0,
                "no cut inside {}",
                phase.name()
            );
        }
    }
}

#[test]
fn crash_images_odd_seeds() {
    let want = env_u64("PCACHE_CRASH_IMAGES")
        .unwrap_or(DEFAULT_IMAGES)
        .div_ceil(2);
    let r = explore(env_u64("PCACHE_CRASH_FIRST_SEED").unwrap_or(1), 2, want);
    assert_clean(&r);
}

#[test]
fn crash_images_even_seeds() {
    let want = env_u64("PCACHE_CRASH_IMAGES").unwrap_or(DEFAULT_IMAGES) / 2;
    let r = explore(env_u64("PCACHE_CRASH_FIRST_SEED").unwrap_or(1) + 1, 2, want);
    assert_clean(&r);
}

/// The persistence modes `PCACHE_CAMPAIGN_MODELS` names (comma-separated), every one when
/// unset or empty.
fn campaign_models() -> Vec<MediaModel> {
    match std::env::var("PCACHE_CAMPAIGN_MODELS") {
        Err(_) => MediaModel::ALL.to_vec(),
        Ok(list) if list.trim().is_empty() => MediaModel::ALL.to_vec(),
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                MediaModel::parse(m).unwrap_or_else(|| {
                    let known: Vec<_> = MediaModel::ALL.iter().map(|m| m.name()).collect();
                    panic!("PCACHE_CAMPAIGN_MODELS: unknown model {m:?} (known: {known:?})")
                })
            })
            .collect(),
    }
}

/// The crash campaign: seeds from `PCACHE_CRASH_FIRST_SEED` (default 1), each run in every
/// persistence mode of `PCACHE_CAMPAIGN_MODELS`, on `PCACHE_CAMPAIGN_JOBS` threads (default:
/// the available cores), until `PCACHE_CAMPAIGN_IMAGES` images (default 100,000) were
/// explored, with `PCACHE_CAMPAIGN_RANDOM_IMAGES` random images per cut (default 24). Prints one line of totals; `.ci/crash-campaign` runs it with the kill test.
#[test]
#[ignore = "the long crash campaign (docs/reliability.md)"]
fn campaign() {
    let models = campaign_models();
    assert!(!models.is_empty(), "PCACHE_CAMPAIGN_MODELS names no model");
    let want = env_u64("PCACHE_CAMPAIGN_IMAGES").unwrap_or(CAMPAIGN_IMAGES);
    let first = env_u64("PCACHE_CRASH_FIRST_SEED").unwrap_or(1);
    let jobs = env_u64("PCACHE_CAMPAIGN_JOBS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
    let random_images = env_u64("PCACHE_CAMPAIGN_RANDOM_IMAGES").unwrap_or(CAMPAIGN_RANDOM_IMAGES);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    // Per model: its totals and its seeds.
    let totals: Mutex<Vec<(Report, u64)>> = Mutex::new(vec![(Report::default(), 0); models.len()]);
    let images = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                while images.load(Ordering::Relaxed) < want {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let m = (i % models.len() as u64) as usize;
                    let seed = first + i / models.len() as u64;
                    let r = run_seed(Config {
                        random_images,
                        ..config(seed, models[m])
                    });
                    images.fetch_add(r.images, Ordering::Relaxed);
                    let mut t = lock(&totals);
                    t[m].0.add(&r);
                    t[m].1 += 1;
                }
            });
        }
    });
    let totals = totals.into_inner().unwrap();
    let mut all = Report::default();
    let mut per_model = Vec::new();
    for ((r, seeds), m) in totals.iter().zip(&models) {
        all.add(r);
        per_model.push(format!(
            "{} {} images / {} cuts / {seeds} seeds / {} violations",
            m.name(),
            r.images,
            r.cuts,
            r.violations.len()
        ));
    }
    eprintln!(
        "crash campaign: {} images ({} with non-durable lines) at {} cuts, {} violations, seeds {first}..{} on {jobs} threads in {} s, {random_images} random images a cut; {}; cuts in {}; {} drains, {} writeback errors",
        all.images,
        all.images_with_pending,
        all.cuts,
        all.violations.len(),
        first + next.load(Ordering::Relaxed).div_ceil(models.len() as u64) - 1,
        started.elapsed().as_secs(),
        per_model.join("; "),
        all.phases(),
        all.drains,
        all.writeback_errors
    );
    assert_clean(&all);
}

/// Msync mode (group commit): the media is a page-cache mapping whose unsynced 4 KiB pages
/// may each reach the disk or not, in any order. `PCACHE_CRASH_MSYNC_IMAGES=N` sets the count.
#[test]
fn crash_images_msync_odd_seeds() {
    let want = env_u64("PCACHE_CRASH_MSYNC_IMAGES")
        .unwrap_or(DEFAULT_IMAGES)
        .div_ceil(2);
    let first = env_u64("PCACHE_CRASH_FIRST_SEED").unwrap_or(1);
    let r = explore_in(MediaModel::Msync, first, 2, want);
    assert_clean(&r);
}

#[test]
fn crash_images_msync_even_seeds() {
    let want = env_u64("PCACHE_CRASH_MSYNC_IMAGES").unwrap_or(DEFAULT_IMAGES) / 2;
    let first = env_u64("PCACHE_CRASH_FIRST_SEED").unwrap_or(1) + 1;
    let r = explore_in(MediaModel::Msync, first, 2, want);
    assert_clean(&r);
}

/// Seeds and cuts that once found a violation; each must stay clean.
const REGRESSIONS: &[(u64, u64)] = &[];

#[test]
fn crash_regressions() {
    for &(seed, cut) in REGRESSIONS {
        let cfg = Config {
            only_cut: Some(cut),
            ..Config::for_seed(seed)
        };
        let r = workload::run(&cfg);
        assert_eq!(r.cuts, 1, "seed {seed} no longer reaches event {cut}");
        assert!(r.violations.is_empty(), "{}", r.violations.join("\n"));
    }
}

/// Replay one seed (`PCACHE_CRASH_SEED`), at one cut when `PCACHE_CRASH_CUT` (a media event)
/// or `PCACHE_CRASH_FLUSH_CUT` (a writeback step's backing flush) is set (with many more
/// random images there), in `PCACHE_CRASH_MODEL` (default pmem), printing what it finds.
#[test]
#[ignore = "replays a seed given in PCACHE_CRASH_SEED"]
fn replay() {
    let Some(seed) = env_u64("PCACHE_CRASH_SEED") else {
        panic!("set PCACHE_CRASH_SEED (and optionally PCACHE_CRASH_CUT or PCACHE_CRASH_FLUSH_CUT)");
    };
    let model = std::env::var("PCACHE_CRASH_MODEL").map_or(MediaModel::Pmem, |m| {
        MediaModel::parse(&m).unwrap_or_else(|| panic!("PCACHE_CRASH_MODEL: unknown model {m:?}"))
    });
    let mut cfg = config(seed, model);
    cfg.only_cut = env_u64("PCACHE_CRASH_CUT");
    cfg.only_flush_cut = env_u64("PCACHE_CRASH_FLUSH_CUT");
    let r = workload::run(&cfg);
    eprintln!("{r:#?}");
    assert!(r.violations.is_empty(), "{}", r.violations.join("\n"));
}
