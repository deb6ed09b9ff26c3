// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `rebind`: bind a cache to the backing image given, when the operator knows it is the
//! cache's own device under a new name, number or identity. Touches no cached data.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::offline;
use vhost_user_pcache::cache::format;
use vhost_user_pcache::cache::replay::backing_id;

#[derive(Args, Debug)]
#[command(after_long_help = "\
A cache records the identity of its backing image: for a block device its stable identity
(device-mapper UUID, WWID, serial, partition, or a loop device's backing file), else its size
and device and inode numbers. The daemon refuses a backing image that does not match, because
writing the cache's dirty data back to another VM's disk would destroy that disk.

Use this command only when you are sure the image given is the one the cache belongs to and
only its identity changed: the disk was copied or moved to new storage, a device was
re-created with another UUID, or an image file was restored from a copy. If the daemon was
merely started on the wrong device, start it on the right one instead. The size must be the
same. Nothing but the recorded identity changes; the cached data, dirty or clean, stays as it
is.")]
pub struct RebindArgs {
    /// Cache media
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,

    /// Backing image the cache belongs to, as it is now
    #[arg(long, value_name = "IMAGE")]
    backing: PathBuf,
}

pub fn run(args: &RebindArgs) -> Result<()> {
    let _locks = offline::lock(&args.cache, Some(&args.backing), false)?;
    let image = offline::open_image(&args.backing, false)?;
    let found = backing_id(&image);
    let media = offline::open_cache(&args.cache)?;
    let previous = format::rebind_backing(&*media, &found).with_context(|| {
        format!(
            "binding cache {} to {}",
            args.cache.display(),
            args.backing.display()
        )
    })?;
    if previous == found {
        println!(
            "cache {} already belongs to {} ({found}); nothing changed",
            args.cache.display(),
            args.backing.display()
        );
    } else {
        println!(
            "cache {} now belongs to {} ({found}); it belonged to {previous}. No cached data \
             was changed.",
            args.cache.display(),
            args.backing.display()
        );
    }
    Ok(())
}
