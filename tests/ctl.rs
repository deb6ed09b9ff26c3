// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket end to end: the real daemon with `--control-socket`, driven by the real
//! `ctl` subcommand while libblkio does I/O; and `serve --config`.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{ctl, ctl_output, ctl_status, pattern, Client, Daemon, TestDir};
use serde_json::Value;

const IMAGE_SIZE: u64 = 64 << 20;
const LIMIT: Duration = Duration::from_secs(60);

fn control(dir: &TestDir) -> PathBuf {
    dir.dir.path().join("control.sock")
}

fn start(dir: &TestDir, extra: &[&str]) -> Daemon {
    if !dir.image().exists() {
        dir.create_image(IMAGE_SIZE);
    }
    let mut args = vec![
        "--backing",
        dir.image().to_str().unwrap(),
        "--control-socket",
        control(dir).to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&dir.socket(), &args)
}

fn stat(s: &Value, name: &str) -> u64 {
    s["cache"]["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {s}"))
}

fn read_image(dir: &TestDir, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(dir.image())
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn status_follows_io_and_the_frontend() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let sock = control(&dir);
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = ctl_status(&sock);
    assert_eq!(before["engine"], "pcache");
    assert_eq!(before["capacity_bytes"], IMAGE_SIZE);
    for field in ["segments_total", "segments_used", "gc_percent"] {
        assert!(before["cache"][field].is_u64(), "{field} in {before}");
    }
    for field in ["key_head", "dirty_tail", "key_tail"] {
        assert!(
            before["cache"][field]["seq"].is_u64(),
            "{field} in {before}"
        );
    }
    assert_eq!(before["cache"]["flags"]["data_crc"], false);
    assert_eq!(before["cache"]["flags"]["writethrough"], false);
    // The test's temporary directory is no DAX file system: detection picks msync.
    assert_eq!(before["cache"]["persistence"], "msync", "{before}");

    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    let q = &mut client.queues[0];
    let data = pattern(1, 65536);
    q.write(1 << 20, &data).expect("write");
    q.read(8 << 20, 4096).expect("read of unwritten space");
    assert_eq!(q.read(1 << 20, 65536).expect("read back"), data);

    let after = ctl_status(&sock);
    assert_eq!(after["connection"]["connected"], true);
    assert!(
        after["connection"]["connections"].as_u64().unwrap()
            > before["connection"]["connections"].as_u64().unwrap()
    );
    assert!(stat(&after, "write_bytes") >= stat(&before, "write_bytes") + 65536);
    // Writeback may already have cleaned it: written bytes are dirty or written back.
    let moved = |s: &Value| stat(s, "dirty_bytes") + stat(s, "writeback_bytes");
    assert!(moved(&after) >= moved(&before) + 65536, "{after}");
    assert!(stat(&after, "read_misses") > stat(&before, "read_misses"));
    assert!(stat(&after, "read_hits") > stat(&before, "read_hits"));

    let human = ctl(&sock, &["status"]);
    for word in [
        "persistence",
        "segments",
        "gc_percent",
        "dirty_tail",
        "key_tail",
        "connected",
    ] {
        assert!(human.contains(word), "{word} missing from:\n{human}");
    }

    drop(client);
    let deadline = Instant::now() + LIMIT;
    while ctl_status(&sock)["connection"]["connected"] == true {
        assert!(Instant::now() < deadline, "still connected after hang-up");
        sleep(Duration::from_millis(20));
    }
}

#[test]
fn gc_percent_is_validated_and_persists_across_restart() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let sock = control(&dir);
    assert_eq!(ctl(&sock, &["set", "gc-percent", "33"]).trim(), "ok");
    assert_eq!(ctl_status(&sock)["cache"]["gc_percent"], 33);
    let refused = ctl_output(&sock, &["set", "gc-percent", "91"]);
    assert!(!refused.status.success());
    assert_eq!(ctl_status(&sock)["cache"]["gc_percent"], 33);
    assert!(daemon.terminate().success());

    let _daemon = start(&dir, &[]);
    assert_eq!(ctl_status(&sock)["cache"]["gc_percent"], 33);
}

#[test]
fn flush_makes_completed_writes_survive_sigkill() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let sock = control(&dir);
    let data = pattern(2, 8192);
    {
        let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
        client.queues[0].write(3 << 20, &data).expect("write");
        assert_eq!(ctl(&sock, &["flush"]).trim(), "ok");
        let _ = daemon.stop_with(libc::SIGKILL);
    }
    let daemon = start(&dir, &[]);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    assert_eq!(client.queues[0].read(3 << 20, 8192).expect("read"), data);
}

#[test]
fn drain_puts_everything_on_the_image_until_undrain() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let sock = control(&dir);
    let mut client = Client::connect(daemon.socket(), 2, false).expect("connect");
    let first = pattern(3, 262144);
    client.queues[0].write(5 << 20, &first).expect("write");
    client.queues[1]
        .write(40 << 20, &first[..4096])
        .expect("write");

    assert_eq!(ctl(&sock, &["drain"]).trim(), "ok");
    let s = ctl_status(&sock);
    assert_eq!(stat(&s, "dirty_bytes"), 0, "{s}");
    assert_eq!(s["drained"], true);
    assert_eq!(s["cache"]["flags"]["drained"], true);
    assert_eq!(s["cache"]["flags"]["writethrough"], true);
    assert_eq!(read_image(&dir, 5 << 20, first.len()), first);
    assert_eq!(read_image(&dir, 40 << 20, 4096), first[..4096]);

    // While drained, a completed write is already on the image.
    let second = pattern(4, 65536);
    client.queues[1].write(9 << 20, &second).expect("write");
    assert_eq!(read_image(&dir, 9 << 20, second.len()), second);
    assert_eq!(stat(&ctl_status(&sock), "dirty_bytes"), 0);

    assert_eq!(ctl(&sock, &["undrain"]).trim(), "ok");
    let s = ctl_status(&sock);
    assert_eq!(s["drained"], false);
    assert_eq!(s["cache"]["flags"]["writethrough"], false);
    client.queues[0].write(12 << 20, &second).expect("write");
    assert_eq!(
        client.queues[0].read(12 << 20, 65536).expect("read"),
        second
    );
}

#[test]
fn metrics_are_prometheus_text() {
    let dir = TestDir::new();
    let daemon = start(&dir, &[]);
    let sock = control(&dir);
    let mut client = Client::connect(daemon.socket(), 1, false).expect("connect");
    client.queues[0].write(0, &pattern(5, 4096)).expect("write");
    let text = ctl(&sock, &["metrics"]);
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (_, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("name value");
        value.parse::<f64>().expect("numeric sample value");
        let bare = name.split('{').next().unwrap();
        assert!(bare.starts_with("vhost_user_pcache_"), "{line}");
        assert!(
            bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        names.push(bare.to_string());
    }
    for expected in [
        "vhost_user_pcache_read_hits_total",
        "vhost_user_pcache_read_misses_total",
        "vhost_user_pcache_dirty_bytes",
        "vhost_user_pcache_writeback_bytes_total",
        "vhost_user_pcache_writeback_rate_bytes_per_second",
        "vhost_user_pcache_busy_total",
        "vhost_user_pcache_journal_full_total",
        "vhost_user_pcache_gc_runs_total",
        "vhost_user_pcache_segments",
        "vhost_user_pcache_segments_used",
        "vhost_user_pcache_gc_percent",
        "vhost_user_pcache_connected",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    let json: Value =
        serde_json::from_str(&ctl(&sock, &["--json", "metrics"])).expect("--json metrics");
    assert_eq!(json["ok"], true);
    assert!(json["metrics"]
        .as_str()
        .unwrap()
        .contains("write_bytes_total"));
}

#[test]
fn without_cache_status_and_drain_still_answer() {
    let dir = TestDir::new();
    let _daemon = start(&dir, &["--cache", "none"]);
    let sock = control(&dir);
    let s = ctl_status(&sock);
    assert_eq!(s["engine"], "none");
    assert!(s["cache"].is_null());
    assert_eq!(ctl(&sock, &["drain"]).trim(), "ok");
    assert_eq!(ctl(&sock, &["flush"]).trim(), "ok");
    let out = ctl_output(&sock, &["set", "gc-percent", "50"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a cache"));
}

#[test]
fn ctl_errors_are_clear() {
    let dir = TestDir::new();
    let missing = ctl_output(&control(&dir), &["status"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no control socket"));

    // A socket file nobody listens on: a daemon that died.
    drop(std::os::unix::net::UnixListener::bind(control(&dir)).unwrap());
    let dead = ctl_output(&control(&dir), &["status"]);
    assert!(String::from_utf8_lossy(&dead.stderr).contains("not running"));

    // The daemon replaces that stale socket.
    let _daemon = start(&dir, &[]);
    assert_eq!(ctl_status(&control(&dir))["engine"], "pcache");
    let bad = ctl_output(&control(&dir), &["explode"]);
    assert!(!bad.status.success());
}

#[test]
fn config_file_settings_and_flags_that_win() {
    let dir = TestDir::new();
    dir.create_image(IMAGE_SIZE);
    let config = dir.dir.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "backing = {:?}\ncontrol-socket = {:?}\ngc-percent = 40\nqueues = 2\ncache-size = \"64M\"\n",
            dir.image(),
            control(&dir)
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let daemon = Daemon::start(&dir.socket(), &["--config", config, "--gc-percent", "55"]);
    let client = Client::connect(daemon.socket(), 1, false).expect("connect");
    assert_eq!(client.get_i32("max-queues"), 2);
    assert_eq!(ctl_status(&control(&dir))["cache"]["gc_percent"], 55);
}

#[test]
fn config_file_errors_name_the_key() {
    let dir = TestDir::new();
    let config = dir.dir.path().join("vm.toml");
    for (text, key) in [
        ("queues = 2\nqueue-sise = 8\n", "queue-sise"),
        ("gc-percent = 95\n", "gc-percent"),
        ("cache-size = \"lots\"\n", "cache-size"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
            .args(["serve", "--socket"])
            .arg(dir.socket())
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run serve");
        assert!(!out.status.success(), "{text} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
    }
}

/// Runs the binary with exactly `args` (no `--control-socket` inserted after `ctl`).
fn pcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vhost-user-pcache")
}

fn json_stdout(args: &[&str], out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {:?}", out.stdout))
}

/// `--control-socket` and `--json` belong to `ctl` but are typed after the command as often as
/// before it (`ctl status --json`, as with systemctl or kubectl): every placement means the same.
#[test]
fn ctl_options_before_or_after_the_command() {
    let dir = TestDir::new();
    let _daemon = start(&dir, &[]);
    let sock = control(&dir);
    let sock = sock.to_str().unwrap();

    for args in [
        ["ctl", "--control-socket", sock, "--json", "status"],
        ["ctl", "--control-socket", sock, "status", "--json"],
        ["ctl", "--json", "status", "--control-socket", sock],
        ["ctl", "status", "--json", "--control-socket", sock],
        ["ctl", "status", "--control-socket", sock, "--json"],
    ] {
        let status = json_stdout(&args, &pcache(&args));
        assert_eq!(status["engine"], "pcache", "{args:?}: {status}");
        assert!(status["cache"]["gc_percent"].is_u64(), "{args:?}: {status}");
    }

    // A nested command takes them after its own arguments too.
    let args = [
        "ctl",
        "set",
        "gc-percent",
        "45",
        "--control-socket",
        sock,
        "--json",
    ];
    assert_eq!(json_stdout(&args, &pcache(&args))["ok"], true);
    let args = ["ctl", "status", "--control-socket", sock, "--json"];
    assert_eq!(
        json_stdout(&args, &pcache(&args))["cache"]["gc_percent"],
        45
    );

    // Without --json after the command, the answer stays for people.
    let human = pcache(&["ctl", "status", "--control-socket", sock]);
    assert!(human.status.success());
    let human = String::from_utf8(human.stdout).unwrap();
    assert!(human.starts_with("engine"), "{human}");
    assert!(serde_json::from_str::<Value>(&human).is_err());

    // Both placements of the same option: the last one wins, as for any clap option.
    let out = pcache(&[
        "ctl",
        "--control-socket",
        "/nonexistent/x.ctl",
        "status",
        "--control-socket",
        sock,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ctl_without_a_control_socket_says_so() {
    for args in [&["ctl", "status"][..], &["ctl", "status", "--json"][..]] {
        let out = pcache(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--control-socket"), "{args:?}: {err}");
    }
}
