// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Temporary images for the backing layer's tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BackingImage, BackingOptions};

/// Loop devices over files: the helper the integration tests use, which needs only std.
#[path = "../../tests/common/loop_device.rs"]
pub(crate) mod loop_device;

/// A directory on a file system that does O_DIRECT (the temp dir, or the build directory when
/// the temp dir is a tmpfs that refuses it).
pub(crate) fn direct_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    if accepts_direct(tmp.path()) {
        return tmp;
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).expect("target dir");
    tempfile::tempdir_in(target).expect("temp dir under target")
}

fn accepts_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("direct-probe");
    let ok = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}

/// A new sparse image of `size` bytes in `dir`, opened with `opts`.
pub(crate) fn new_image(
    dir: &Path,
    name: &str,
    size: u64,
    opts: &BackingOptions,
) -> (PathBuf, Arc<BackingImage>) {
    let path = dir.join(name);
    BackingImage::create_sparse(&path, size).expect("create image");
    let image = BackingImage::open(&path, opts).expect("open image");
    (path, image)
}

/// Deterministic, position-dependent bytes so misplaced data shows up.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(131))
                % 251) as u8
        })
        .collect()
}
