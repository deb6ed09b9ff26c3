// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `drain`: write every dirty extent of a cache back to its backing image, offline, so a
//! cache whose daemon is gone can be retired (or the image used without it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::offline::{self, human_bytes};
use vhost_user_pcache::cache::check::{self, Severity, Verdict};
use vhost_user_pcache::cache::format;
use vhost_user_pcache::cache::{CacheEngine, CacheOptions};
use vhost_user_pcache::engine::Engine;

/// With writeback failing and no byte written back for this long, give up.
const STALL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Cache media
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,

    /// Backing image the cache belongs to
    #[arg(long, value_name = "IMAGE")]
    backing: PathBuf,
}

pub fn run(args: &DrainArgs) -> Result<()> {
    let _locks = offline::lock(&args.cache, Some(&args.backing), false)?;
    let media = offline::open_cache(&args.cache)?;
    if format::probe(&*media)
        .with_context(|| format!("cache media {}", args.cache.display()))?
        .is_none()
    {
        bail!(
            "{} is not formatted: there is nothing to write back",
            args.cache.display()
        );
    }
    // Writeback refuses dirty extents that fail their CRC and would retry them forever.
    if let Ok(report) = check::check(&*media, None) {
        if report.verdict == Verdict::Corrupt {
            let problems: Vec<_> = report
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Corrupt)
                .map(|f| f.message.as_str())
                .collect();
            bail!(
                "cache {} is corrupt, refusing to write it back: {}",
                args.cache.display(),
                problems.join("; ")
            );
        }
    }
    let image = offline::open_image(&args.backing, true)?;
    let opts = CacheOptions {
        path: args.cache.clone(),
        create_size: None,
        persistence: None,
        data_crc: None,
        gc_percent: None,
        queues: 1,
        force_format: false,
        drain_on_shutdown: false,
        journal_dir: Some(vhost_user_pcache::cache::journal::default_dir()),
        pacing: Default::default(),
    };
    let engine = CacheEngine::open_with_media(&opts, media, image.clone())
        .with_context(|| format!("opening cache {}", args.cache.display()))?;
    let total = engine.stats().dirty_bytes;
    drain_with_progress(&engine, total)?;
    let flushed = image
        .flush()
        .with_context(|| format!("flushing backing image {}", args.backing.display()));
    let closed = engine
        .shutdown()
        .with_context(|| format!("closing cache {}", args.cache.display()));
    flushed?;
    closed?;
    println!(
        "wrote {} dirty bytes ({}) back to {}; the cache {} holds no dirty data",
        total,
        human_bytes(total),
        args.backing.display(),
        args.cache.display()
    );
    Ok(())
}

/// Run the engine's drain on a thread and show its progress from the dirty byte count. On
/// failure the engine has been shut down (the dirty data stays in the cache).
fn drain_with_progress(engine: &CacheEngine, total: u64) -> Result<()> {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "writing back {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let result = std::thread::scope(|s| {
        let worker = s.spawn(|| engine.drain());
        let mut last_progress = Instant::now();
        let mut done = 0;
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
            let stats = engine.stats();
            let now = total.saturating_sub(stats.dirty_bytes);
            if now != done {
                done = now;
                last_progress = Instant::now();
            }
            bar.set_position(done);
            if stats.writeback_errors > 0 && last_progress.elapsed() > STALL_LIMIT {
                bar.abandon();
                // Stops the writeback thread, which ends the drain with an error.
                let _ = engine.shutdown();
                let _ = worker.join();
                return Err(anyhow!(
                    "writeback keeps failing ({} errors, see the log above); the dirty data \
                     stays in the cache",
                    stats.writeback_errors
                ));
            }
        }
        let result = worker
            .join()
            .map_err(|_| anyhow!("the drain thread panicked"))
            .and_then(|r| r.context("writing back"));
        if result.is_err() {
            bar.abandon();
            let _ = engine.shutdown();
        }
        result
    });
    if result.is_ok() {
        bar.set_position(total);
        bar.finish();
    }
    result
}
