// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the QEMU guest tests share: the `vmm-tests/` directory, the guest build and the
//! guest's serial console.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn vmm_tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vmm-tests")
}

/// Builds (or finds up to date) the guest kernel and initramfs in `out`.
pub fn build_guest(out: &Path) {
    let status = Command::new(vmm_tests_dir().join("build-guest.sh"))
        .arg(out)
        .status()
        .expect("run vmm-tests/build-guest.sh (run vmm-tests/install-deps.sh first)");
    assert!(status.success(), "build-guest.sh failed: {status}");
}

/// The guest console so far, with the serial line's carriage returns dropped.
pub fn console_text(console: &Path) -> String {
    String::from_utf8_lossy(&fs::read(console).unwrap_or_default()).replace('\r', "")
}
