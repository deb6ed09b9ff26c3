// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real loop device over a file, for the tests that need a block device the kernel
//! describes in sysfs or a block size other than the file's: the integration tests (through
//! `common`) and the backing unit tests (`src/backing/testutil.rs` includes this file by path, as
//! it needs nothing of the test harness). Attaching needs root and loop support; where either is
//! missing `attach` prints why and returns `None`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device, detached on drop.
pub struct Loop(PathBuf);

impl Loop {
    /// Attach `file` to the first free loop device, or to `at`.
    pub fn attach(file: &Path, at: Option<&Path>) -> Option<Loop> {
        Loop::attach_with(file, at, None)
    }

    /// Attach `file` to the first free loop device with logical blocks of `sector_size` bytes.
    pub fn attach_with_sector_size(file: &Path, sector_size: u32) -> Option<Loop> {
        Loop::attach_with(file, None, Some(sector_size))
    }

    fn attach_with(file: &Path, at: Option<&Path>, sector_size: Option<u32>) -> Option<Loop> {
        let mut cmd = Command::new("losetup");
        if let Some(size) = sector_size {
            cmd.arg("--sector-size").arg(size.to_string());
        }
        match at {
            Some(dev) => cmd.arg(dev).arg(file),
            None => cmd.args(["--find", "--show"]).arg(file),
        };
        match cmd.output() {
            Ok(out) if out.status.success() => {
                let shown = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                Some(Loop(at.map_or(PathBuf::from(shown), Path::to_owned)))
            }
            Ok(out) => {
                eprintln!(
                    "skipped: losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run losetup: {e}");
                None
            }
        }
    }

    /// The device node, `/dev/loopN`.
    pub fn device(&self) -> &Path {
        &self.0
    }

    /// The device node as an argument.
    pub fn path(&self) -> &str {
        self.0.to_str().expect("loop device paths are ASCII")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.0)
            .status();
    }
}
