// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Copy into pmem: non-temporal stores against an ordinary copy plus cache-line write-back.
//!
//! Without `--measure` (as `cargo test --benches` runs it) only a quick self-check: both ways
//! copy into a pmem-mode mapping at awkward alignments and the bytes read back are the source's.
//!
//! `cargo bench --bench pmem_copy -- --measure [--rounds N] [--dir DIR]` times copies of
//! 64 B, 256 B, 512 B, 4 KiB, 64 KiB and 128 KiB into a pmem-mode mapping of a file in DIR (default
//! /dev/shm, through the pmem code path that `VHOST_USER_PCACHE_EMULATE_PMEM=1` allows).
//! Each copy goes to the next place in a 256 MiB mapping, as the cache's data heads move on,
//! so the destination is never in the CPU cache; each is followed by the store fence, as a
//! write at QD1 is. A round times a batch of 16 MiB of copies per way, the two ways taking
//! turns; the median over the rounds and the spread (10th to 90th percentile) are printed.
//! Wall clock, so run it on a machine as quiet as can be and compare medians.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use vhost_user_pcache::cache::media::{
    MappedMedia, Media, MediaOptions, Persistence, PmemCopy, EMULATE_PMEM_ENV, NON_TEMPORAL_MIN,
};

const SIZES: [usize; 6] = [64, 256, 512, 4 << 10, 64 << 10, 128 << 10];
const WAYS: [PmemCopy; 2] = [PmemCopy::CacheThenWriteBack, PmemCopy::NonTemporal];
const MAPPING: u64 = 256 << 20;
const BATCH_BYTES: usize = 16 << 20;

struct Args {
    measure: bool,
    rounds: usize,
    dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        measure: false,
        rounds: 41,
        dir: PathBuf::from("/dev/shm"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--measure" => args.measure = true,
            "--rounds" => {
                args.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--rounds takes a positive number")?
            }
            "--dir" => args.dir = it.next().ok_or("--dir takes a directory")?.into(),
            "--help" | "-h" => {
                return Err("usage: pmem_copy [--measure [--rounds N] [--dir DIR]]".into())
            }
            // cargo bench and cargo test add their own flags (--bench, filters): not ours.
            _ => {}
        }
    }
    Ok(args)
}

/// A pmem-mode mapping of a fresh file of `size` bytes in `dir` (or the temp directory when
/// `dir` does not exist).
fn open(dir: &Path, size: u64) -> Result<(tempfile::TempDir, MappedMedia), String> {
    // Set before any thread exists: this process has only the main thread.
    std::env::set_var(EMULATE_PMEM_ENV, "1");
    let tmp = if dir.is_dir() {
        tempfile::Builder::new().prefix("pmem-copy").tempdir_in(dir)
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| format!("temporary directory: {e}"))?;
    let opts = MediaOptions {
        create_size: Some(size),
        persistence: Some(Persistence::Pmem),
    };
    let media = MappedMedia::open(&tmp.path().join("media"), &opts).map_err(|e| e.to_string())?;
    Ok((tmp, media))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn self_check(dir: &Path) -> Result<(), String> {
    let (_tmp, media) = open(dir, 1 << 20)?;
    let src = pattern(70_000);
    let mut back = vec![0u8; src.len()];
    let mut at = 0u64;
    for way in WAYS {
        for (skip, len) in [(0, 512), (3, 4096), (1, 4097), (17, 65_536), (0, 69_000)] {
            let at_unaligned = at + 24;
            let data = &src[skip..skip + len];
            media
                .write_and_persist_with(way, at_unaligned, data)
                .map_err(|e| e.to_string())?;
            media.fence().map_err(|e| e.to_string())?;
            media
                .read(at_unaligned, &mut back[..len])
                .map_err(|e| e.to_string())?;
            if &back[..len] != data {
                return Err(format!(
                    "{way:?}: {len} bytes at {at_unaligned} read back wrong"
                ));
            }
            at += (len as u64 + 4096) & !4095;
        }
    }
    println!("pmem_copy self-check passed (run with --measure to time the copies)");
    Ok(())
}

/// Seconds per copy of each round, for one way and size.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(args: &Args) -> Result<(), String> {
    let (_tmp, media) = open(&args.dir, MAPPING)?;
    let src = pattern(*SIZES.iter().max().unwrap());
    println!(
        "copy into a pmem-mode mapping ({}), {} rounds of {} MiB per way and size, fence after \
         each copy; non-temporal from {NON_TEMPORAL_MIN} B in the daemon",
        args.dir.display(),
        args.rounds,
        BATCH_BYTES >> 20
    );
    println!(
        "{:>8}  {:<20} {:>12} {:>22} {:>9}",
        "size", "way", "median ns", "p10..p90 ns", "GB/s"
    );
    let mut at = 0u64;
    for size in SIZES {
        let count = BATCH_BYTES / size;
        let mut times = [Vec::new(), Vec::new()];
        for round in 0..args.rounds {
            for i in 0..WAYS.len() {
                // Take turns on who goes first, so drift of the machine hits both alike.
                let w = (i + round) % WAYS.len();
                let start = Instant::now();
                for _ in 0..count {
                    if at + size as u64 > MAPPING {
                        at = 0;
                    }
                    media
                        .write_and_persist_with(WAYS[w], at, &src[..size])
                        .map_err(|e| e.to_string())?;
                    media.fence().map_err(|e| e.to_string())?;
                    at += size as u64;
                }
                times[w].push(start.elapsed().as_secs_f64() / count as f64);
            }
        }
        for (w, t) in times.iter_mut().enumerate() {
            t.sort_by(f64::total_cmp);
            let median = percentile(t, 0.5);
            println!(
                "{:>8}  {:<20} {:>12.0} {:>22} {:>9.2}",
                size,
                format!("{:?}", WAYS[w]),
                median * 1e9,
                format!(
                    "{:.0}..{:.0}",
                    percentile(t, 0.1) * 1e9,
                    percentile(t, 0.9) * 1e9
                ),
                size as f64 / median / 1e9
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        if args.measure {
            measure(&args)
        } else {
            self_check(&args.dir)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmem_copy: {e}");
            ExitCode::FAILURE
        }
    }
}
