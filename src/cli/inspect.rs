// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `inspect`: show what a cache holds, without changing it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::offline::{self, human_bytes};
use vhost_user_pcache::cache::inspect::{self, Inspection, ReplicaReport, TailReport};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Cache media
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,

    /// Backing image, to check that the cache belongs to it
    #[arg(
        long,
        value_name = "IMAGE",
        long_help = "Backing image to compare with what the cache records: a block device's stable \
                     identity (WWID, serial, device-mapper UUID...) where one was recorded, else \
                     the fingerprint (size, device, inode). Without it they are shown but not \
                     checked."
    )]
    backing: Option<PathBuf>,

    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let _locks = offline::lock(&args.cache, args.backing.as_deref(), false)?;
    let found = offline::image_backing_id(args.backing.as_deref())?;
    let media = offline::open_cache(&args.cache)?;
    let report = inspect::inspect(&*media, found.as_ref())
        .with_context(|| format!("inspecting cache {}", args.cache.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(args, &report));
    }
    Ok(if report.backing.check == "differs" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn replicas(r: &ReplicaReport) -> String {
    let slot = |i: usize| {
        let s = &r.slots[i];
        match (&s.seq, &s.fault) {
            (Some(seq), _) => format!("slot {i} seq {seq}"),
            (None, Some(f)) if f.starts_with("all zero") => format!("slot {i} never written"),
            (None, Some(f)) => format!("slot {i} INVALID: {f}"),
            (None, None) => format!("slot {i} ?"),
        }
    };
    let newest = r
        .newest
        .map_or("none valid".into(), |n| format!("using slot {n}"));
    format!("{newest}; {}; {}", slot(0), slot(1))
}

fn tail(t: &TailReport) -> String {
    format!(
        "segment {} offset {}, kset {} ({})",
        t.pos.seg,
        t.pos.off,
        t.pos.log_seq,
        replicas(&t.replicas)
    )
}

fn render(args: &InspectArgs, i: &Inspection) -> String {
    let on_off = |b: bool| if b { "on" } else { "off" };
    let image = args
        .backing
        .as_ref()
        .map_or(String::new(), |p| p.display().to_string());
    let backing = match i.backing.check.as_str() {
        "matches" => format!("matches {image}"),
        "differs" => format!(
            "DIFFERS: {image} is {}; this cache belongs to another image",
            i.backing.found.as_deref().unwrap_or("?")
        ),
        _ => "not checked (no --backing given)".into(),
    };
    let mut out = format!(
        "cache {}: {} bytes ({}), {} segments of 16 MiB, {} in use\n\
         cache id {}\n\
         options: data_crc {}, gc_percent {}, first start done: {}\n\
         backing image: size {} id {}{}: {backing}\n\
         cache_info: {}\n\
         key_tail: {}\n\
         dirty_tail: {}\n\
         log head: segment {} offset {}, next kset {}\n\
         log: {} ksets, {} keys ({} dirty, {} stale) in {} log segments\n\
         dirty bytes: {} ({})\n",
        args.cache.display(),
        i.media_len,
        human_bytes(i.media_len),
        i.n_segments,
        i.segments_used,
        i.cache_id,
        on_off(i.data_crc),
        i.gc_percent,
        if i.init_done { "yes" } else { "no" },
        i.backing.size,
        i.backing.id,
        i.backing
            .identity
            .as_ref()
            .map_or(String::new(), |id| format!(", identity {id}")),
        replicas(&i.cache_info),
        tail(&i.key_tail),
        tail(&i.dirty_tail),
        i.log_head.seg,
        i.log_head.off,
        i.log_head.log_seq,
        i.log.ksets,
        i.log.keys,
        i.log.dirty_keys,
        i.log.stale_keys,
        i.log.log_segments,
        i.dirty_bytes,
        human_bytes(i.dirty_bytes),
    );
    out.push_str("segments in use (others are free):\n  segment  kind  refs  generation\n");
    for s in i.segments.iter().filter(|s| s.kind != "free") {
        out.push_str(&format!(
            "  {:>7}  {:<4}  {:>4}  {}\n",
            s.seg, s.kind, s.refs, s.gen
        ));
    }
    out
}
