// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A cache knows its backing block device by the device's stable identity, on real loop
//! devices and the real daemon: two same-size devices that swap names are told apart (the
//! wrong one is refused and left untouched), a device re-created under another minor is still
//! recognised, a cache of an earlier version (numbers only) opens and learns the identity, and
//! `rebind` binds a cache to a device whose identity changed. Skipped, with
//! the reason printed, where loop devices cannot be attached (not root, no loop support).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::loop_device::Loop;
use common::{pattern, tool, Client, Daemon, TestDir};

const DISK: u64 = 64 << 20;

/// Writes made through the daemon: (offset, data).
fn writes() -> Vec<(u64, Vec<u8>)> {
    [(0u64, 4096usize), (5 << 20, 65536), (33 << 20, 8192)]
        .into_iter()
        .enumerate()
        .map(|(i, (off, len))| (off, pattern(500 + i as u64, len)))
        .collect()
}

fn image(dir: &TestDir, name: &str, size: u64) -> PathBuf {
    let path = dir.dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create image");
    path
}

fn cache_args<'a>(backing: &'a str, cache: &'a str) -> Vec<&'a str> {
    vec![
        "--backing",
        backing,
        "--cache",
        cache,
        "--cache-size",
        "128M",
        "--queues",
        "1",
    ]
}

/// Serve `backing` through a new cache `cache`, write [`writes`], flush into the cache and
/// kill the daemon: the cache holds dirty data for `backing`.
fn leave_dirty_cache(dir: &TestDir, backing: &str, cache: &str) {
    let daemon = Daemon::start(&dir.socket(), &cache_args(backing, cache));
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    for (off, data) in writes() {
        client.queues[0].write(off, &data).expect("write");
    }
    client.queues[0].flush().expect("flush");
    daemon.stop_with(libc::SIGKILL);
}

/// Serve `backing` through `cache` and check every write of [`writes`] reads back.
fn serves_the_writes(dir: &TestDir, backing: &str, cache: &str) {
    let daemon = Daemon::start(&dir.socket(), &cache_args(backing, cache));
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    for (off, data) in writes() {
        let back = client.queues[0].read(off, data.len()).expect("read");
        assert!(back == data, "the write at {off} did not read back");
    }
    drop(client);
    assert!(daemon.terminate().success());
}

/// Start the daemon on `backing` through `cache` and expect it to refuse to start; its stderr.
fn refused(dir: &TestDir, backing: &str, cache: &str) -> String {
    let socket = dir.socket();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(cache_args(backing, cache))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vhost-user-pcache");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("poll daemon").is_none() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started serving {backing} through a cache of another device");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("daemon output");
    assert!(!out.status.success(), "the daemon exited successfully");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_safe_advice(message: &str) {
    assert!(message.contains("rebind"), "no way on in: {message}");
    assert!(
        !message.contains("force"),
        "a refusal must not suggest formatting: {message}"
    );
}

#[test]
fn same_size_devices_that_swap_names_are_told_apart() {
    let dir = TestDir::new();
    let (a, b) = (image(&dir, "a.img", DISK), image(&dir, "b.img", DISK));
    let cache = dir.dir.path().join("a.pcache");
    let cache = cache.to_str().unwrap();
    let (first, second) = {
        let Some(la) = Loop::attach(&a, None) else {
            return;
        };
        let Some(lb) = Loop::attach(&b, None) else {
            return;
        };
        leave_dirty_cache(&dir, la.path(), cache);
        (la.device().to_owned(), lb.device().to_owned())
    };
    // After a "reboot" the names come up the other way round.
    let Some(now_b) = Loop::attach(&b, Some(&first)) else {
        return;
    };
    let Some(now_a) = Loop::attach(&a, Some(&second)) else {
        return;
    };

    let message = refused(&dir, now_b.path(), cache);
    assert!(message.contains("loop-file"), "{message}");
    assert_safe_advice(&message);
    let untouched = std::fs::read(&b).unwrap();
    assert!(
        untouched.iter().all(|&x| x == 0),
        "the other device was written to"
    );

    serves_the_writes(&dir, now_a.path(), cache);
}

#[test]
fn a_device_attached_again_under_another_number_is_still_its_cache() {
    let dir = TestDir::new();
    let a = image(&dir, "a.img", DISK);
    let filler = image(&dir, "filler.img", DISK);
    let cache = dir.dir.path().join("a.pcache");
    let cache = cache.to_str().unwrap();
    let before = {
        let Some(la) = Loop::attach(&a, None) else {
            return;
        };
        leave_dirty_cache(&dir, la.path(), cache);
        la.device().to_owned()
    };
    // Something else takes the old number first.
    let Some(_taken) = Loop::attach(&filler, Some(&before)) else {
        return;
    };
    let Some(again) = Loop::attach(&a, None) else {
        return;
    };
    assert_ne!(again.device(), before);
    serves_the_writes(&dir, again.path(), cache);
}

#[test]
fn rebind_binds_a_cache_to_a_copy_of_its_device_and_refuses_another_size() {
    let dir = TestDir::new();
    let a = image(&dir, "a.img", DISK);
    let cache = dir.dir.path().join("a.pcache");
    let cache = cache.to_str().unwrap();
    {
        let Some(la) = Loop::attach(&a, None) else {
            return;
        };
        leave_dirty_cache(&dir, la.path(), cache);
    }
    // The image moved to another file (a copy: another inode), as after a storage migration.
    let copy = dir.dir.path().join("copy.img");
    std::fs::copy(&a, &copy).unwrap();
    let Some(moved) = Loop::attach(&copy, None) else {
        return;
    };
    let message = refused(&dir, moved.path(), cache);
    assert_safe_advice(&message);

    let bigger = image(&dir, "bigger.img", 2 * DISK);
    let Some(other) = Loop::attach(&bigger, None) else {
        return;
    };
    let out = tool(&["rebind", "--cache", cache, "--backing", other.path()]);
    assert!(!out.status.success(), "rebound to a device of another size");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = tool(&["rebind", "--cache", cache, "--backing", moved.path()]);
    assert!(
        out.status.success(),
        "rebind failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serves_the_writes(&dir, moved.path(), cache);
}

#[test]
fn a_cache_of_an_earlier_version_opens_by_its_numbers_and_learns_the_identity() {
    use vhost_user_pcache::cache::format;
    use vhost_user_pcache::cache::media::{open_media, MediaOptions};

    let dir = TestDir::new();
    let a = image(&dir, "a.img", DISK);
    let filler = image(&dir, "filler.img", DISK);
    let cache = dir.dir.path().join("a.pcache");
    let cache_path = cache.to_str().unwrap();
    let before = {
        let Some(la) = Loop::attach(&a, None) else {
            return;
        };
        let out = tool(&[
            "format",
            "--cache",
            cache_path,
            "--backing",
            la.path(),
            "--cache-size",
            "128M",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // What earlier versions wrote: cache_info's numbers and no backing_identity.
        let layout = {
            let media = open_media(&cache, &MediaOptions::default()).unwrap();
            let sb = format::probe(&*media).unwrap().expect("formatted");
            let layout = sb.layout(media.len()).unwrap();
            format::clear_backing_identity(&*media, &layout).unwrap();
            assert_eq!(
                format::load_backing_identity(&*media, &layout).unwrap(),
                None
            );
            layout
        };
        leave_dirty_cache(&dir, la.path(), cache_path);
        let media = open_media(&cache, &MediaOptions::default()).unwrap();
        let recorded = format::load_backing_identity(&*media, &layout)
            .unwrap()
            .expect("the identity is recorded at the first open")
            .value;
        assert_eq!(recorded.kind.name(), "loop-file");
        la.device().to_owned()
    };
    let Some(_taken) = Loop::attach(&filler, Some(&before)) else {
        return;
    };
    let Some(again) = Loop::attach(&a, None) else {
        return;
    };
    serves_the_writes(&dir, again.path(), cache_path);
}
