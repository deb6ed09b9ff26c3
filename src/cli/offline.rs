// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the offline tools share: taking the locks, opening the media and the image.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use vhost_user_pcache::backing::{BackingImage, BackingOptions};
use vhost_user_pcache::cache::format::BackingId;
use vhost_user_pcache::cache::media::{open_media, Media, MediaOptions};
use vhost_user_pcache::cache::replay::backing_id;
use vhost_user_pcache::file_lock::{LockedObject, PathLock};

/// Locks held while a tool runs: a daemon or another tool on the same files is refused.
pub struct Locks {
    _cache: PathLock,
    _image: Option<PathLock>,
}

/// Lock the cache (created empty when `create_cache`) and, if given, the backing image.
pub fn lock(cache: &Path, image: Option<&Path>, create_cache: bool) -> Result<Locks> {
    let image = image
        .map(|p| PathLock::acquire(p, LockedObject::BackingImage, false))
        .transpose()?;
    let cache = PathLock::acquire(cache, LockedObject::CacheMedia, create_cache)?;
    Ok(Locks {
        _cache: cache,
        _image: image,
    })
}

/// Open an existing cache media.
pub fn open_cache(path: &Path) -> Result<Arc<dyn Media>> {
    open_media(path, &MediaOptions::default()).context("opening the cache media")
}

/// Open a backing image; `write` for writeback, otherwise only to read its identity.
pub fn open_image(path: &Path, write: bool) -> Result<Arc<BackingImage>> {
    let options = BackingOptions {
        read_only: !write,
        direct: write,
    };
    Ok(BackingImage::open(path, &options)?)
}

/// What identifies the image at `path` (see `format::compare`), if one was given.
pub fn image_backing_id(path: Option<&Path>) -> Result<Option<BackingId>> {
    path.map(|p| open_image(p, false).map(|img| backing_id(&img)))
        .transpose()
}

/// Bytes in a human-friendly binary unit, for reports.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
