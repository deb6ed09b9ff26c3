// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pmem path on real DAX: a QEMU guest with two emulated NVDIMMs runs the daemon with its
//! cache on a file on ext4 mounted with `-o dax` (MAP_SYNC) and on a device DAX character
//! device, the backing images on the guest's virtio disk and the load generator driving the
//! daemon's socket inside the guest.
//!
//! Two boots share the NVDIMMs' backing files and the disk image (`vmm-tests/run-dax-guest.sh`;
//! the guest's side is `vmm-tests/guest/dax-init`):
//! 1. write: namespaces and file systems are made; for each medium the daemon detects pmem
//!    by itself, a verified write load with flushes runs, the daemon is killed with SIGKILL,
//!    restarts, replays and reads everything back; a second generation is written, and QEMU
//!    is killed with SIGKILL while the daemons run and the cache holds it dirty.
//! 2. replay: each daemon replays its cache, the second generation reads back, `ctl drain`
//!    puts it on the backing image, the offline `check` finds the cache clean, and a daemon
//!    without cache reads the second generation back from the image alone; a
//!    cache file on a non-DAX file system gets msync, and `--persistence pmem` there is
//!    refused with a clear message.
//!
//! The guest checks each step and stops at the first failure; this test also asserts on the
//! `VMTEST-CHECK` lines it prints, so a step the script skipped cannot pass unnoticed.
//! `VMM_ACCEL=kvm` is passed through to QEMU.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;

use common::vm::{build_guest, vmm_tests_dir};

fn tool_runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fails (never skips) when the host lacks what the guest test needs.
fn check_host_prerequisites() {
    let has_kernel = fs::read_dir("/boot")
        .map(|dir| {
            dir.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
            })
        })
        .unwrap_or(false);
    let missing: Vec<&str> = [
        (
            "qemu-system-x86_64",
            tool_runs("qemu-system-x86_64", "--version"),
        ),
        ("ndctl", tool_runs("ndctl", "--version")),
        ("mke2fs", tool_runs("mke2fs", "-V")),
        ("objcopy", tool_runs("objcopy", "--version")),
        ("a Debian cloud kernel in /boot", has_kernel),
    ]
    .into_iter()
    .filter_map(|(what, found)| (!found).then_some(what))
    .collect();
    assert!(
        missing.is_empty(),
        "the DAX VM test needs {}; run vmm-tests/install-deps.sh",
        missing.join(", ")
    );
}

/// Builds the load generator (a `[[bench]]` target, which `cargo test` does not build) with the
/// profile of this test and returns its executable.
fn build_loadgen() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--bench", "loadgen", "--message-format=json"])
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let output = cmd.output().expect("run cargo build --bench loadgen");
    assert!(
        output.status.success(),
        "cargo build --bench loadgen failed: {}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "loadgen")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no loadgen executable")
}

/// Boots the guest for one phase; panics with the script's output unless it succeeded.
fn run_phase(state: &Path, guest: &Path, phase: &str, loadgen: &Path) -> String {
    let console = state.join(format!("console-{phase}.log"));
    let output = Command::new(vmm_tests_dir().join("run-dax-guest.sh"))
        .arg("--state")
        .arg(state)
        .arg("--phase")
        .arg(phase)
        .arg("--guest")
        .arg(guest)
        .arg("--daemon")
        .arg(env!("CARGO_BIN_EXE_vhost-user-pcache"))
        .arg("--loadgen")
        .arg(loadgen)
        .arg("--log")
        .arg(&console)
        .stdin(Stdio::null())
        .output()
        .expect("run vmm-tests/run-dax-guest.sh");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "{phase} phase failed ({})\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
    );
    fs::read_to_string(&console)
        .expect("read the guest console")
        .replace('\r', "")
}

/// The `VMTEST-CHECK:` lines of a console log.
fn checks(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VMTEST-CHECK: "))
        .collect()
}

/// The one check line starting with `prefix`.
fn check_line<'a>(checks: &[&'a str], prefix: &str) -> &'a str {
    let found: Vec<&str> = checks
        .iter()
        .copied()
        .filter(|c| c.starts_with(prefix))
        .collect();
    assert!(
        !found.is_empty(),
        "no check `{prefix}` in the guest's output: {checks:#?}"
    );
    found[found.len() - 1]
}

/// The number after `key=` in a check line.
fn number(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in `{line}`"))
}

#[test]
fn guest_pmem_on_fsdax_and_devdax_survives_sigkill_and_power_cut() {
    check_host_prerequisites();
    let guest = vmm_tests_dir().join("work").join("guest");
    build_guest(&guest);
    let loadgen = build_loadgen();

    let dir = tempfile::Builder::new()
        .prefix("vm_dax")
        .tempdir()
        .expect("temp dir");
    // On failure the panic leaves the NVDIMM and disk images and the consoles for inspection.
    let state = dir.keep();
    println!("vm_dax: state and logs in {}", state.display());

    let write = run_phase(&state, &guest, "write", &loadgen);
    let write = checks(&write);
    for medium in ["fsdax", "devdax"] {
        let detected = check_line(&write, &format!("{medium} persistence"));
        assert!(
            detected.contains("log=persistence_pmem") && detected.ends_with("status=pmem"),
            "{medium}: the daemon did not detect pmem by itself: {detected}"
        );
        check_line(&write, &format!("{medium} gen=1111 write verified"));
        let replayed = check_line(&write, &format!("{medium} after-kill"));
        assert!(
            number(replayed, "replayed-dirty-keys") > 0,
            "{medium}: {replayed}"
        );
        check_line(&write, &format!("{medium} gen=1111 read verified"));
        check_line(&write, &format!("{medium} gen=2222 write verified"));
        let dirty = check_line(&write, &format!("{medium} before-power-cut"));
        assert!(number(dirty, "dirty-bytes") > 0, "{medium}: {dirty}");
    }
    let devdax = check_line(&write, "devdax-align");
    assert_eq!(number(devdax, "devdax-align"), 2 << 20, "{devdax}");
    assert_eq!(number(devdax, "devdax-size") % (2 << 20), 0, "{devdax}");

    let replay = run_phase(&state, &guest, "replay", &loadgen);
    let replay = checks(&replay);
    for medium in ["fsdax", "devdax"] {
        let detected = check_line(&replay, &format!("{medium} persistence"));
        assert!(detected.ends_with("status=pmem"), "{medium}: {detected}");
        let replayed = check_line(&replay, &format!("{medium} after-power-cut"));
        assert!(
            number(replayed, "replayed-dirty-keys") > 0,
            "{medium}: the power cut left nothing to replay: {replayed}"
        );
        check_line(&replay, &format!("{medium} gen=2222 read verified"));
        check_line(&replay, &format!("{medium} offline-check clean"));
        check_line(&replay, &format!("{medium} backing-alone verified"));
    }
    let msync = check_line(&replay, "msync persistence");
    assert!(msync.ends_with("status=msync"), "{msync}");
    let refused = check_line(&replay, "msync pmem-refused");
    assert!(
        refused.contains("not_on_a_DAX_filesystem"),
        "the refusal does not say why: {refused}"
    );
    check_line(&replay, "msync gen=3333 read verified");

    fs::remove_dir_all(&state).expect("remove temp dir");
}
