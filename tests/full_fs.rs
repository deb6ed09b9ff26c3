// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A cache file on a host file system without room for it is refused when it is created
//! (`format`, `serve`), with a clear error, instead of being mapped sparse and killing the
//! daemon with SIGBUS inside a guest write once the file system fills up.
//!
//! Needs a small file system of its own: a 112 MiB tmpfs is mounted (root only); elsewhere the
//! test says why it did nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs of a few MiB, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Option<TinyFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
            return None;
        }
        Some(TinyFs { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Run the binary; a run still going after a minute (a daemon that started serving) is
/// killed and fails the test.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vhost-user-pcache");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} kept running on a file system without room for its cache");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_no_room(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} succeeded on a full file system"
    );
    assert!(
        err.contains("no room to allocate"),
        "{what}: the error does not say the file system is full: {err}"
    );
    // A clean error, not a crash: SIGBUS would leave no exit code.
    assert!(
        out.status.code().is_some(),
        "{what} died of a signal: {err}"
    );
}

#[test]
fn a_cache_file_that_does_not_fit_is_refused_at_format_and_at_start() {
    let Some(fs) = TinyFs::mount("112m") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();

    // serve creating a 192 MiB cache file on a 112 MiB file system.
    let cache = fs.path("serve-cache.img");
    let socket = work.path().join("sock");
    let out = run(&[
        "serve",
        "--socket",
        s(&socket),
        "--backing",
        s(&image),
        "--cache",
        s(&cache),
        "--cache-size",
        "192M",
    ]);
    assert_no_room(&out, "serve");
    // Nothing of it stays allocated (the lock may leave the empty file it locked).
    let left = std::fs::metadata(&cache).map_or(0, |m| m.len());
    assert_eq!(left, 0, "the failed cache file was left behind");

    // format of an (empty) file to the same size.
    let cache = fs.path("format-cache.img");
    let format = |size: &str| {
        std::fs::File::create(&cache).unwrap();
        run(&[
            "format",
            "--cache",
            s(&cache),
            "--backing",
            s(&image),
            "--cache-size",
            size,
        ])
    };
    assert_no_room(&format("192M"), "format");

    // A cache that fits (the smallest, 5 segments of 16 MiB) is formatted on the same file
    // system: the refusal above was about room, nothing else.
    std::fs::remove_file(&cache).unwrap();
    let out = format("80M");
    assert!(
        out.status.success(),
        "a cache that fits was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
