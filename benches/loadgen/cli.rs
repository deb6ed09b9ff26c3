// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line of the load generator.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Drives a vhost-user-blk socket through libblkio (driver `virtio-blk-vhost-user`) and reports
/// IOPS, bandwidth and latency percentiles per operation type.
///
/// Every run is bounded in time by --runtime and, with --io-limit, in volume (the verify passes
/// each get both budgets); the summary says which bound ended each pass. Requests
/// that complete with an error are counted and reported, and make the exit status non-zero
/// unless --allow-errors is given. Run with no arguments at all (as `cargo test --benches` does)
/// it only checks its own building blocks.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", version, about, long_about)]
pub struct Args {
    /// Unix socket of the vhost-user-blk backend.
    #[arg(long, env = "LOADGEN_SOCKET")]
    pub socket: PathBuf,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,

    /// Percentage of reads in a mixed workload (--rw randrw).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix_read: u8,

    /// Block size of each request; accepts suffixes k, m, g (powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,

    /// Requests kept in flight on each queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub iodepth: u32,

    /// Number of device queues; each is driven by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,

    /// Duration of the run (of each pass with --verify), in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    pub runtime: f64,

    /// Stop after this many bytes were transferred over all queues together (suffixes allowed),
    /// or at --runtime, whichever comes first (like fio's io_size); each verify pass gets its
    /// own budget. Bounds how much a write case puts into a cache, whatever the target's speed.
    #[arg(long, value_parser = parse_io_limit)]
    pub io_limit: Option<u64>,

    /// Start of the exercised region, in bytes (suffixes allowed); a multiple of --bs.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,

    /// Length of the exercised region in bytes (suffixes allowed); default: the rest of the
    /// device after --offset. Rounded down to a multiple of --bs.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// Write every block with a pattern derived from its offset and a generation, then read
    /// every written block back and check it. With a read-only --rw, only the check pass runs
    /// (give the --generation of the run that wrote the data). Sequential --rw patterns visit
    /// blocks in order, random ones in a scrambled order.
    #[arg(long)]
    pub verify: bool,

    /// Generation stamped into verify patterns; default: derived from the clock, and printed.
    #[arg(long)]
    pub generation: Option<u64>,

    /// Issue a flush after every N writes on each queue (0: never), and one more once the
    /// queue's last write completed, so every completed write of the run is covered by a flush.
    #[arg(long, default_value_t = 0)]
    pub flush_every: u64,

    /// Busy-poll for completions instead of sleeping on the completion eventfd.
    #[arg(long)]
    pub poll: bool,

    /// Give up when no request completes for this many seconds while some are in flight.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
    pub stall_timeout: f64,

    /// Print a JSON summary on stdout instead of the human-readable one.
    #[arg(long)]
    pub json: bool,

    /// Exit with status 0 even if some requests completed with an error.
    #[arg(long)]
    pub allow_errors: bool,

    /// Seed of the offset generator; default: derived from the clock.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Access pattern of a run.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Uniformly random reads and writes, mixed by --rwmix-read.
    Randrw,
}

impl Rw {
    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Percentage of requests that are reads.
    pub fn read_percent(self, rwmix_read: u8) -> u8 {
        match self {
            Rw::Read | Rw::Randread => 100,
            Rw::Write | Rw::Randwrite => 0,
            Rw::Randrw => rwmix_read,
        }
    }
}

/// Parses a byte count such as `4096`, `4k`, `128K`, `1m`, `2G` or `4KiB` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a size (expected e.g. 4096, 4k, 1m)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{text}` has an unknown size suffix `{suffix}`")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Parses a positive byte count for --io-limit.
pub fn parse_io_limit(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!("`{text}`: --io-limit must be more than 0 bytes")),
        bytes => Ok(bytes),
    }
}

/// Parses a positive, finite number of seconds.
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if seconds.is_finite() && seconds > 0.0 && seconds <= 1e6 {
        Ok(seconds)
    } else {
        Err(format!("`{text}` must be between 0 and 1000000 seconds"))
    }
}

pub fn self_check() -> Result<(), String> {
    for (text, expected) in [
        ("4096", 4096u64),
        ("4k", 4096),
        ("128K", 131_072),
        ("1m", 1 << 20),
        ("2GiB", 2 << 30),
        ("512b", 512),
    ] {
        match parse_size(text) {
            Ok(value) if value == expected => {}
            other => {
                return Err(format!(
                    "size `{text}` parsed as {other:?}, expected {expected}"
                ))
            }
        }
    }
    for bad in ["", "k", "4x", "-1", "99999999999999999999", "16777216t"] {
        if parse_size(bad).is_ok() {
            return Err(format!("size `{bad}` was accepted"));
        }
    }
    for bad in ["0", "-1", "nan", "inf", "x"] {
        if parse_seconds(bad).is_ok() {
            return Err(format!("runtime `{bad}` was accepted"));
        }
    }
    let args = Args::try_parse_from(["loadgen", "--socket", "s", "--bench", "--bs", "128k"])
        .map_err(|e| e.to_string())?;
    if args.bs != 128 * 1024 || args.rw != Rw::Randread || args.iodepth != 1 {
        return Err(format!("defaults or --bs misread: {args:?}"));
    }
    if args.io_limit.is_some() {
        return Err(format!("--io-limit set without being given: {args:?}"));
    }
    let limited = Args::try_parse_from(["loadgen", "--socket", "s", "--io-limit", "3g"])
        .map_err(|e| e.to_string())?;
    if limited.io_limit != Some(3 << 30) {
        return Err(format!("--io-limit 3g read as {:?}", limited.io_limit));
    }
    for bad in ["0", "0k", "x", "-4k"] {
        if Args::try_parse_from(["loadgen", "--socket", "s", "--io-limit", bad]).is_ok() {
            return Err(format!("--io-limit `{bad}` was accepted"));
        }
    }
    if Args::try_parse_from(["loadgen", "--socket", "s", "--iodepth", "0"]).is_ok() {
        return Err("--iodepth 0 was accepted".into());
    }
    Ok(())
}
