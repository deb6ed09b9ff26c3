// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `format`: write a new, empty cache onto a media for a backing image.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::offline::{self, human_bytes};
use super::serve::DEFAULT_CACHE_SIZE;
use super::size::parse_size;
use vhost_user_pcache::cache::format::{self, FormatOptions, Layout, MAX_GC_PERCENT};
use vhost_user_pcache::cache::inspect;
use vhost_user_pcache::cache::media::Media;
use vhost_user_pcache::cache::replay::{backing_id, min_segments};
use vhost_user_pcache::cache::SEGMENT_SIZE;

#[derive(Args, Debug)]
pub struct FormatArgs {
    /// Cache media: devdax device, DAX file or ordinary file (created if missing)
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,

    /// Backing image the cache will belong to
    #[arg(long, value_name = "IMAGE")]
    backing: PathBuf,

    /// Size of a cache file [default: its current size; 1G or the image size for a new file]
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_size,
        long_help = "Size of the cache when it is an ordinary file (suffixes K, M, G, T), used in \
                     whole 16 MiB segments. A missing or empty file is created with it (default \
                     1G, or the image size if smaller); an existing file is resized to it. \
                     Ignored for a device."
    )]
    cache_size: Option<u64>,

    /// Checksum cached data (CRC32C of every cached extent)
    #[arg(long)]
    data_crc: bool,

    /// GC threshold in percent of segments in use (0-90)
    #[arg(
        long,
        value_name = "PERCENT",
        default_value_t = format::DEFAULT_GC_PERCENT,
        value_parser = clap::value_parser!(u8).range(0..=MAX_GC_PERCENT as i64)
    )]
    gc_percent: u8,

    /// Overwrite a media that already holds a cache, even one with dirty data
    #[arg(
        long,
        long_help = "Format even when the media already holds a cache (or something that is not \
                     a cache). Dirty data in that cache - writes not yet on the backing image - \
                     is lost: run `drain` first to keep it."
    )]
    force: bool,
}

/// What is on the media now, in words, or `None` when it is blank.
fn describe_existing(media: &dyn Media) -> Option<String> {
    match format::probe(media) {
        Ok(None) => None,
        Err(e) => Some(format!("data that is not a valid cache ({e})")),
        Ok(Some(_)) => Some(match inspect::inspect(media, None) {
            Ok(i) if i.dirty_bytes > 0 => format!(
                "a cache with {} dirty bytes ({}) not yet written back to its backing image \
                 (run `drain` to write them back first)",
                i.dirty_bytes,
                human_bytes(i.dirty_bytes)
            ),
            Ok(i) => format!(
                "a cache with no dirty data ({} of {} segments in use)",
                i.segments_used, i.n_segments
            ),
            Err(e) => format!("a damaged cache ({e}); any dirty data in it would be lost"),
        }),
    }
}

pub fn run(args: &FormatArgs) -> Result<()> {
    let _locks = offline::lock(&args.cache, Some(&args.backing), true)?;
    let image = offline::open_image(&args.backing, false)?;
    let meta = std::fs::metadata(&args.cache)
        .with_context(|| format!("reading {}", args.cache.display()))?;
    let is_file = meta.file_type().is_file();
    if meta.len() > 0 || !is_file {
        let media = offline::open_cache(&args.cache)?;
        if let Some(what) = describe_existing(&*media) {
            if !args.force {
                bail!(
                    "{} holds {what}; refusing to format it without --force",
                    args.cache.display()
                );
            }
            log::warn!("{}: overwriting {what}", args.cache.display());
        }
    }
    if is_file {
        let want = match args.cache_size {
            Some(size) => Some(size),
            None if meta.len() == 0 => Some(DEFAULT_CACHE_SIZE.min(image.size())),
            None => None,
        };
        if let Some(size) = want {
            let segments = u32::try_from(size / SEGMENT_SIZE)
                .unwrap_or(u32::MAX)
                .max(min_segments(1));
            std::fs::OpenOptions::new()
                .write(true)
                .open(&args.cache)
                .and_then(|f| f.set_len(Layout::media_len_for(segments)))
                .with_context(|| format!("sizing {}", args.cache.display()))?;
        }
    } else if args.cache_size.is_some() {
        log::warn!("--cache-size is ignored for a device");
    }
    let media = offline::open_cache(&args.cache)?;
    let layout = Layout::new(media.len())
        .with_context(|| format!("cache media {}", args.cache.display()))?;
    let one_queue = min_segments(1);
    if layout.n_segments() < one_queue {
        bail!(
            "{}: {} segments of 16 MiB are too few: a cache needs at least {one_queue} ({} bytes)",
            args.cache.display(),
            layout.n_segments(),
            Layout::media_len_for(one_queue)
        );
    }
    let mut opts = FormatOptions::for_backing(backing_id(&image));
    opts.data_crc = args.data_crc;
    opts.gc_percent = args.gc_percent;
    format::format(&*media, &layout, &opts)
        .with_context(|| format!("formatting {}", args.cache.display()))?;
    println!(
        "formatted {}: {} segments of 16 MiB ({}), data CRC {}, gc_percent {}, for backing \
         image {} ({} bytes); serves up to {} queues",
        args.cache.display(),
        layout.n_segments(),
        human_bytes(media.len()),
        if args.data_crc { "on" } else { "off" },
        args.gc_percent,
        args.backing.display(),
        image.size(),
        layout.n_segments() + 1 - one_queue,
    );
    Ok(())
}
