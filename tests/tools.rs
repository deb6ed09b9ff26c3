// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The offline tools (format, inspect, check, drain) and the locks, run as the real binary on
//! caches left in known states by the real daemon.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{pattern, tool, Client, Daemon, TestDir};
use vhost_user_pcache::cache::format::{self, Tail};
use vhost_user_pcache::cache::media::{open_media, MediaOptions};

const IMAGE_SIZE: u64 = 64 << 20;

/// Writes the tests make through the daemon: (offset, data), spread over several 4 MiB
/// regions so the log holds several ksets.
fn writes() -> Vec<(u64, Vec<u8>)> {
    [
        (0u64, 4096usize),
        (5 << 20, 65536),
        (9 << 20, 3 * 4096 + 512),
        (33 << 20, 131072),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (off, len))| (off, pattern(100 + i as u64, len)))
    .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn status(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn inspect_json(cache: &Path) -> serde_json::Value {
    let out = tool(&["inspect", "--cache", s(cache), "--json"]);
    assert_eq!(status(&out), 0, "inspect failed: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("inspect prints JSON")
}

struct DeadDaemonCache {
    dir: TestDir,
    image: PathBuf,
    cache: PathBuf,
}

/// The state a daemon killed before any writeback leaves: its writes acknowledged and flushed
/// into the cache, none of them on the image. The daemon really runs and is SIGKILLed; since
/// its writeback may have started meanwhile, dirty_tail is then set back to key_tail (a state
/// the daemon itself passes through) and the written ranges of the image are zeroed again.
fn dead_daemon_cache(extra: &[&str]) -> DeadDaemonCache {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    let cache = dir.dir.path().join("disk.pcache");
    let mut args = vec![
        "--backing",
        s(&image),
        "--cache",
        s(&cache),
        "--cache-size",
        "128M",
        "--queues",
        "1",
        "--gc-percent",
        "90",
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&dir.socket(), &args);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    for (off, data) in writes() {
        client.queues[0].write(off, &data).expect("write");
    }
    client.queues[0].flush().expect("flush");
    daemon.stop_with(libc::SIGKILL);
    drop(client);

    let media = open_media(&cache, &MediaOptions::default()).expect("open the cache");
    let sb = format::probe(&*media).unwrap().expect("formatted");
    let layout = sb.layout(media.len()).unwrap();
    let key_tail = format::load_tail(&*media, &layout, Tail::Key)
        .unwrap()
        .value;
    format::store_tail(&*media, &layout, Tail::Dirty, &key_tail).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    for (off, data) in writes() {
        file.write_all_at(&vec![0u8; data.len()], off).unwrap();
    }
    DeadDaemonCache { dir, image, cache }
}

fn written_bytes() -> u64 {
    writes().iter().map(|(_, d)| d.len() as u64).sum()
}

/// Flip one byte of a file.
fn corrupt(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn drain_writes_a_dead_daemons_dirty_data_back_to_the_image() {
    let c = dead_daemon_cache(&[]);
    let before = inspect_json(&c.cache);
    assert_eq!(before["dirty_bytes"], written_bytes());
    assert!(before["log"]["dirty_keys"].as_u64().unwrap() > 0);

    let out = tool(&["check", "--cache", s(&c.cache), "--backing", s(&c.image)]);
    assert_eq!(
        status(&out),
        0,
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = tool(&["drain", "--cache", s(&c.cache), "--backing", s(&c.image)]);
    assert_eq!(status(&out), 0, "drain: {}", text(&out.stderr));

    let file = std::fs::File::open(&c.image).unwrap();
    for (off, data) in writes() {
        let mut got = vec![0u8; data.len()];
        file.read_exact_at(&mut got, off).unwrap();
        assert!(got == data, "image at {off} does not hold what was written");
    }
    let after = inspect_json(&c.cache);
    assert_eq!(after["dirty_bytes"], 0);
    assert_eq!(after["log"]["dirty_keys"], 0);
    assert_eq!(after["dirty_tail"]["log_seq"], after["log_head"]["log_seq"]);
}

#[test]
fn inspect_reports_options_tails_and_segments() {
    let c = dead_daemon_cache(&["--data-crc"]);
    let i = inspect_json(&c.cache);
    assert_eq!(i["data_crc"], true);
    assert_eq!(i["gc_percent"], 90);
    assert_eq!(i["n_segments"], 8);
    assert_eq!(i["backing"]["check"], "not checked");
    assert_eq!(i["backing"]["size"], IMAGE_SIZE);
    let segments = i["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 8);
    let kinds: Vec<&str> = segments
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"log") && kinds.contains(&"data"),
        "{kinds:?}"
    );
    let refs: u64 = segments.iter().map(|s| s["refs"].as_u64().unwrap()).sum();
    assert_eq!(
        refs,
        i["log"]["keys"].as_u64().unwrap(),
        "one reference per live key"
    );

    let out = tool(&["inspect", "--cache", s(&c.cache), "--backing", s(&c.image)]);
    assert_eq!(status(&out), 0);
    let shown = text(&out.stdout);
    assert!(shown.contains("matches"), "{shown}");
    assert!(
        shown.contains(&format!("dirty bytes: {}", written_bytes())),
        "{shown}"
    );

    let other = c.dir.dir.path().join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let out = tool(&["inspect", "--cache", s(&c.cache), "--backing", s(&other)]);
    assert_eq!(status(&out), 1, "another image must be flagged");
    assert!(text(&out.stdout).contains("DIFFERS"));
}

#[test]
fn one_bad_cache_info_replica_is_repairable_and_inspect_still_works() {
    let c = dead_daemon_cache(&[]);
    // Both replicas are in use after a daemon start; damage slot 0.
    corrupt(&c.cache, format::CACHE_INFO_OFFSETS[0] + 20);
    let out = tool(&["check", "--cache", s(&c.cache)]);
    let report = text(&out.stdout);
    assert_eq!(status(&out), 1, "{report}");
    assert!(report.contains("cache_info replica 0"), "{report}");

    let i = inspect_json(&c.cache);
    assert_eq!(i["cache_info"]["newest"], 1);
    assert!(i["cache_info"]["slots"][0]["fault"]
        .as_str()
        .unwrap()
        .contains("CRC"));
    assert_eq!(i["dirty_bytes"], written_bytes());
}

#[test]
fn both_key_tail_replicas_bad_is_corrupt() {
    let c = dead_daemon_cache(&[]);
    for at in format::KEY_TAIL_OFFSETS {
        corrupt(&c.cache, at + 20);
    }
    let out = tool(&["check", "--cache", s(&c.cache), "--json"]);
    assert_eq!(status(&out), 2, "{}", text(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "corrupt");
    let out = tool(&["inspect", "--cache", s(&c.cache)]);
    assert_ne!(
        status(&out),
        0,
        "inspect cannot show a log without its tail"
    );
    assert!(text(&out.stderr).contains("key_tail"));
}

#[test]
fn a_damaged_dirty_extent_fails_its_crc() {
    let c = dead_daemon_cache(&["--data-crc"]);
    let cache = std::fs::read(&c.cache).unwrap();
    let (_, data) = &writes()[1];
    let needle = &data[..512];
    let at = cache
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the written data is in the cache");
    drop(cache);
    corrupt(&c.cache, at as u64 + 1000);
    let out = tool(&["check", "--cache", s(&c.cache)]);
    let report = text(&out.stdout);
    assert_eq!(status(&out), 2, "{report}");
    assert!(report.contains("data CRC mismatch"), "{report}");
    let out = tool(&["drain", "--cache", s(&c.cache), "--backing", s(&c.image)]);
    assert_ne!(status(&out), 0, "drain must not write damaged data back");
    assert!(
        text(&out.stderr).contains("corrupt"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_cannot_check_what_is_not_a_cache() {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    let out = tool(&["check", "--cache", s(&image)]);
    assert_eq!(status(&out), 3);
    let out = tool(&["check", "--cache", s(&dir.dir.path().join("missing"))]);
    assert_eq!(status(&out), 3);
}

#[test]
fn format_refuses_a_cache_with_dirty_data_unless_forced() {
    let c = dead_daemon_cache(&[]);
    let args = ["format", "--cache", s(&c.cache), "--backing", s(&c.image)];
    let out = tool(&args);
    assert_ne!(status(&out), 0);
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{} dirty bytes", written_bytes())),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(inspect_json(&c.cache)["dirty_bytes"], written_bytes());

    let mut forced = args.to_vec();
    forced.extend(["--force", "--data-crc"]);
    let out = tool(&forced);
    assert_eq!(status(&out), 0, "{}", text(&out.stderr));
    let i = inspect_json(&c.cache);
    assert_eq!(i["dirty_bytes"], 0);
    assert_eq!(i["log"]["ksets"], 0);
    assert_eq!(i["data_crc"], true);
    let out = tool(&["check", "--cache", s(&c.cache), "--backing", s(&c.image)]);
    assert_eq!(status(&out), 0, "{}", text(&out.stdout));
}

#[test]
fn format_creates_a_cache_the_daemon_then_serves() {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    let cache = dir.dir.path().join("new.pcache");
    let out = tool(&[
        "format",
        "--cache",
        s(&cache),
        "--backing",
        s(&image),
        "--cache-size",
        "128M",
    ]);
    assert_eq!(status(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        std::fs::metadata(&cache).unwrap().len(),
        format::Layout::media_len_for(8)
    );
    let daemon = Daemon::start(
        &dir.socket(),
        &[
            "--backing",
            s(&image),
            "--cache",
            s(&cache),
            "--queues",
            "1",
        ],
    );
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    client.queues[0].write(0, &pattern(1, 4096)).expect("write");
    assert_eq!(client.queues[0].read(0, 4096).unwrap(), pattern(1, 4096));
}

fn serve(dir: &TestDir, socket: &str, args: &[&str]) -> Output {
    let socket = dir.dir.path().join(socket);
    let mut all = vec!["serve", "--socket", s(&socket)];
    all.extend_from_slice(args);
    tool(&all)
}

#[test]
fn the_locks_refuse_a_second_daemon_and_tools_while_a_daemon_runs() {
    let dir = TestDir::new();
    let image = dir.create_image(IMAGE_SIZE);
    let cache = dir.dir.path().join("disk.pcache");
    let daemon = Daemon::start(
        &dir.socket(),
        &[
            "--backing",
            s(&image),
            "--cache",
            s(&cache),
            "--cache-size",
            "128M",
        ],
    );
    let holder = format!("pid {}", daemon.pid());

    let out = serve(
        &dir,
        "second.sock",
        &["--backing", s(&image), "--cache", "none"],
    );
    assert_ne!(status(&out), 0, "a second daemon on the image");
    let err = text(&out.stderr);
    assert!(err.contains(s(&image)) && err.contains(&holder), "{err}");

    let other = dir.dir.path().join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let out = serve(
        &dir,
        "third.sock",
        &["--backing", s(&other), "--cache", s(&cache)],
    );
    assert_ne!(status(&out), 0, "a second daemon on the cache");
    let err = text(&out.stderr);
    assert!(err.contains(s(&cache)) && err.contains(&holder), "{err}");

    let out = tool(&["drain", "--cache", s(&cache), "--backing", s(&image)]);
    assert_ne!(status(&out), 0, "drain under a running daemon");
    assert!(
        text(&out.stderr).contains("in use"),
        "{}",
        text(&out.stderr)
    );
    let out = tool(&["check", "--cache", s(&cache)]);
    assert_eq!(status(&out), 3, "check under a running daemon");

    assert!(daemon.terminate().success());
    let out = tool(&["check", "--cache", s(&cache), "--backing", s(&image)]);
    assert_eq!(
        status(&out),
        0,
        "after the daemon exits: {}",
        text(&out.stdout)
    );
}
