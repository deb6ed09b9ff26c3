// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A QEMU guest runs fio with checksum verification while the daemon is stopped and started
//! again under it, several times, with SIGTERM (graceful: every popped request completes before
//! the socket closes) and with SIGKILL (the new daemon resubmits what the inflight area says was
//! in flight); QEMU reconnects (`-chardev ...,reconnect=1`). fio must finish with every block
//! verified and no hang.
//!
//! The guest comes from `vmm-tests/` (build-guest.sh, run-guest.sh). `VMM_ACCEL=kvm` is passed
//! through to QEMU.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;

use common::vm::{build_guest, console_text, note, tail, vmm_tests_dir, StallWatch};

use common::Daemon;

const DISK_SIZE: &str = "256M";
/// Restarts under one fio run (the signal that stops the daemon each time), and the time the
/// guest does I/O between two of them.
const TERM_AND_KILL: &[i32] = &[libc::SIGTERM, libc::SIGKILL, libc::SIGTERM, libc::SIGKILL];
const BETWEEN_RESTARTS: Duration = Duration::from_secs(3);
/// From QEMU's start to fio's first I/O (boot under TCG).
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// Whole guest run, restarts included.
const GUEST_TIMEOUT_SECS: u32 = 420;

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    queues: u32,
    cache: bool,
    write_through: bool,
    restarts: &'static [i32],
}

/// The daemon as this test runs it: same image, cache and control socket every time.
struct Setup {
    dir: PathBuf,
    case: Case,
}

impl Setup {
    fn socket(&self) -> PathBuf {
        self.dir.join("vhost.sock")
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Every daemon's log, one after the other, with the test's notes between them.
    fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    fn start_daemon(&self) -> Daemon {
        let image = self.dir.join("backing.img");
        let queues = self.case.queues.to_string();
        let mut args: Vec<String> = vec![
            "--backing".into(),
            image.display().to_string(),
            "--create-backing".into(),
            DISK_SIZE.into(),
            "--queues".into(),
            queues,
            "--control-socket".into(),
            self.control().display().to_string(),
        ];
        // With a cache: the default one, IMAGE.pcache.
        if !self.case.cache {
            args.extend(["--cache".into(), "none".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        note(&self.daemon_log(), "starting a daemon");
        Daemon::start_logged(&self.socket(), &args, &self.daemon_log())
    }

    /// The guest's console and the end of the daemons' log, for a failure message.
    fn report(&self, console: &Path) -> String {
        format!(
            "{}\n{}\n(all logs in {})",
            tail(console, 40),
            tail(&self.daemon_log(), 60),
            self.dir.display()
        )
    }

    /// The daemon's write-cache setting, from `ctl status --json`.
    fn write_cache(&self) -> bool {
        let status = common::ctl_status(&self.control());
        status["write_cache"]
            .as_bool()
            .expect("status has write_cache")
    }

    fn start_guest(&self, console: &Path) -> Child {
        let mut cmd = Command::new(vmm_tests_dir().join("run-guest.sh"));
        cmd.arg("--socket")
            .arg(self.socket())
            .arg("--guest")
            .arg(vmm_tests_dir().join("work").join("guest"))
            .arg("--log")
            .arg(console)
            .arg("--queues")
            .arg(self.case.queues.to_string())
            .arg("--timeout")
            .arg(GUEST_TIMEOUT_SECS.to_string())
            .arg("--reconnect")
            .arg("--job")
            .arg("restart-verify");
        if self.case.write_through {
            cmd.arg("--write-through");
        }
        cmd.stdin(Stdio::null())
            .spawn()
            .expect("run vmm-tests/run-guest.sh")
    }
}

fn wait_for_console(setup: &Setup, console: &Path, guest: &mut Child, what: &str) {
    let deadline = Instant::now() + BOOT_LIMIT;
    while !console_text(console).contains(what) {
        if let Some(status) = guest.try_wait().expect("poll run-guest.sh") {
            panic!(
                "the guest ended ({status}) before {what:?}\n{}",
                setup.report(console)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} from the guest\n{}",
            setup.report(console)
        );
        sleep(Duration::from_millis(100));
    }
}

/// Waits `time` (or until the guest ends, when `time` is None), sampling the daemon whenever
/// the guest reports a stall; returns the guest's exit status if it ended.
fn watch_guest(
    guest: &mut Child,
    watch: &mut StallWatch,
    time: Option<Duration>,
) -> Option<ExitStatus> {
    let until = time.map(|t| Instant::now() + t);
    loop {
        watch.poll();
        if until.is_some_and(|u| Instant::now() >= u) {
            return None;
        }
        if time.is_none() {
            if let Some(status) = guest.try_wait().expect("poll run-guest.sh") {
                watch.poll();
                return Some(status);
            }
        }
        sleep(Duration::from_millis(200));
    }
}

fn restart_under_fio(case: Case) {
    build_guest(&vmm_tests_dir().join("work").join("guest"));
    let dir = tempfile::Builder::new()
        .prefix(&format!("vm_restart_{}", case.name))
        .tempdir()
        .expect("temp dir")
        .keep();
    println!("vm_restart: logs in {}", dir.display());
    let setup = Setup { dir, case };
    let console = setup.dir.join("console.log");

    let mut daemon = setup.start_daemon();
    let mut guest = setup.start_guest(&console);
    let mut watch = StallWatch::new(&console, &setup.control(), &setup.daemon_log());
    // fio starts after the write-cache line.
    wait_for_console(&setup, &console, &mut guest, "VMTEST-INFO: write_cache=");
    if case.write_through {
        assert!(
            console_text(&console).contains("write_cache=write-through"),
            "the guest could not turn the write cache off"
        );
    }
    for (round, &signal) in case.restarts.iter().enumerate() {
        watch_guest(&mut guest, &mut watch, Some(BETWEEN_RESTARTS));
        assert!(
            guest.try_wait().expect("poll guest").is_none(),
            "fio finished before restart {round}: the job is too short for this test\n{}",
            setup.report(&console)
        );
        assert_eq!(
            setup.write_cache(),
            !case.write_through,
            "write cache before restart {round}"
        );
        note(
            &setup.daemon_log(),
            &format!(
                "restart {} of {}: signal {signal}",
                round + 1,
                case.restarts.len()
            ),
        );
        let status = daemon.stop_with(signal);
        if signal == libc::SIGTERM {
            assert!(status.success(), "daemon exit after SIGTERM: {status}");
        }
        daemon = setup.start_daemon();
        println!(
            "vm_restart: restart {} of {} (signal {signal}) done",
            round + 1,
            case.restarts.len()
        );
    }
    let status = watch_guest(&mut guest, &mut watch, None).expect("the guest's exit status");
    assert!(
        status.success(),
        "guest failed ({status}, {} stall reports)\n{}",
        watch.stalls(),
        setup.report(&console)
    );
    assert!(console_text(&console).contains("VMTEST-RESULT: PASS"));
    // The restarted daemon still has the guest's write-cache choice.
    assert_eq!(setup.write_cache(), !case.write_through);
    assert!(daemon.terminate().success());
    fs::remove_dir_all(&setup.dir).expect("remove temp dir");
}

#[test]
fn guest_fio_verifies_across_sigterm_and_sigkill_restarts_with_write_back_cache_two_queues() {
    // The writes fio saw complete but did not flush wait in open ksets when the daemon is
    // killed; the process-kill journal gives them to the new daemon, so fio's verification
    // finds every one.
    restart_under_fio(Case {
        name: "cache_wb_2q",
        queues: 2,
        cache: true,
        write_through: false,
        restarts: TERM_AND_KILL,
    });
}

#[test]
fn guest_fio_verifies_across_sigterm_and_sigkill_restarts_without_cache_two_queues() {
    restart_under_fio(Case {
        name: "nocache_2q",
        queues: 2,
        cache: false,
        write_through: false,
        restarts: TERM_AND_KILL,
    });
}

#[test]
fn guest_fio_verifies_across_sigterm_and_sigkill_restarts_with_write_through_cache_one_queue() {
    // Also checks that the guest's write-through choice survives every restart.
    restart_under_fio(Case {
        name: "cache_wt_1q",
        queues: 1,
        cache: true,
        write_through: true,
        restarts: TERM_AND_KILL,
    });
}
