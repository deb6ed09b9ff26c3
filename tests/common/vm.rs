// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the QEMU guest tests share: the `vmm-tests/` directory, the guest build, the
//! guest's serial console and the tails of logs for failure messages.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The last `lines` lines of a log file, headed by its path, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 << 10;
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).replace('\r', "");
    }
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "---- last {lines} lines of {} ----\n{}",
        path.display(),
        all[start..].join("\n")
    )
}

/// Appends a line of the test's own to a daemon's log file, so the file tells in one order
/// what the test did (a restart, a stall the guest reported) and what the daemon logged.
pub fn note(log: &Path, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "==== test: {text}");
    }
}

/// Watches the guest's console for the stall reports of its stall watch (`VMTEST-STALL`
/// lines, see `vmm-tests/guest/init`) and, for each new one, writes it and the daemon's
/// `ctl status` into the daemon's log: cheap while nothing stalls (a read of the console).
pub struct StallWatch {
    console: PathBuf,
    control: PathBuf,
    log: PathBuf,
    seen: usize,
}

impl StallWatch {
    pub fn new(console: &Path, control: &Path, log: &Path) -> StallWatch {
        StallWatch {
            console: console.to_owned(),
            control: control.to_owned(),
            log: log.to_owned(),
            seen: 0,
        }
    }

    /// Call while waiting for the guest.
    pub fn poll(&mut self) {
        let text = console_text(&self.console);
        // Whole lines only: the last one may still be being written.
        let stalls: Vec<&str> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.find("VMTEST-STALL").map(|at| l[at..].trim_end()))
            .collect();
        for line in &stalls[self.seen.min(stalls.len())..] {
            note(&self.log, &format!("guest reports {line}"));
            note(&self.log, &format!("ctl status: {}", self.status()));
        }
        self.seen = stalls.len();
    }

    /// `ctl --json status`, or why there is none: given up after a few seconds, since a
    /// daemon that hangs must not hang the test too.
    fn status(&self) -> String {
        const LIMIT: Duration = Duration::from_secs(5);
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
            .arg("ctl")
            .arg("--control-socket")
            .arg(&self.control)
            .args(["--json", "status"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => return format!("cannot run ctl: {e}"),
        };
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return format!("no answer within {LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match child.wait_with_output() {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().into(),
            Ok(out) => format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => format!("cannot read ctl's answer: {e}"),
        }
    }

    /// How many stalls the guest reported.
    pub fn stalls(&self) -> usize {
        self.seen
    }
}
