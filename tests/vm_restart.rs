// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A QEMU guest writes and checks its disk in passes while the daemon is stopped and started
//! again under it, once per pass, with SIGTERM (graceful: every popped request completes
//! before the socket closes) and with SIGKILL (the new daemon resubmits what the inflight area
//! says was in flight); QEMU reconnects (`-chardev ...,reconnect=1`).
//!
//! Pass p writes its own 32 MiB region, writes it again with another pattern and reads it
//! back, then reads back every earlier region (`vmtest.passes`, see `vmm-tests/guest/init`).
//! A region is never written after its pass, so whatever a restart loses — a completed write
//! of this pass or of an earlier one, or an older version of a block coming back — is still
//! missing at the next check, and every restart is followed by a check of all the guest has
//! written. The daemon is stopped while the guest has requests in flight: during the rewrite
//! (the first two restarts) or during the check of the earlier regions (the last two). Every
//! block holds its pass's pattern and its offset, so a block of another pass, another place or
//! an older version fails the check (fio's checksums would accept an intact older version).
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
/// The restarts under one guest run, restart r in pass r + 1 (the guest runs as many passes).
const TERM_AND_KILL: &[Restart] = &[
    Restart {
        signal: libc::SIGTERM,
        step: Step::Rewrite,
    },
    Restart {
        signal: libc::SIGKILL,
        step: Step::Rewrite,
    },
    Restart {
        signal: libc::SIGTERM,
        step: Step::Verify,
    },
    Restart {
        signal: libc::SIGKILL,
        step: Step::Verify,
    },
];
/// From QEMU's start to fio's first I/O (boot under TCG), and from one restart to the step
/// of the next pass where the next one happens.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const STEP_LIMIT: Duration = Duration::from_secs(120);
/// Whole guest run, restarts included.
const GUEST_TIMEOUT_SECS: u32 = 420;

/// The step of a pass during which the daemon is stopped.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    /// The pass writes its region again: writes in flight over the older version of the same
    /// blocks.
    Rewrite,
    /// The pass checks the earlier regions: reads in flight, the earlier passes' writes
    /// unflushed in a write-back cache.
    Verify,
}

impl Step {
    /// The step's name in the guest's `VMTEST-PASS` lines.
    fn name(self) -> &'static str {
        match self {
            Step::Rewrite => "rewrite",
            Step::Verify => "verify",
        }
    }
}

#[derive(Clone, Copy)]
struct Restart {
    /// What stops the daemon.
    signal: i32,
    step: Step,
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    queues: u32,
    cache: bool,
    write_through: bool,
    restarts: &'static [Restart],
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
            .arg("restart-passes")
            .arg("--passes")
            .arg(self.case.restarts.len().to_string());
        if self.case.write_through {
            cmd.arg("--write-through");
        }
        cmd.stdin(Stdio::null())
            .spawn()
            .expect("run vmm-tests/run-guest.sh")
    }
}

/// Waits until the guest's console shows `what`, sampling the daemon whenever the guest
/// reports a stall.
fn wait_for_console(
    setup: &Setup,
    console: &Path,
    guest: &mut Child,
    watch: &mut StallWatch,
    what: &str,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    while !console_text(console).contains(what) {
        watch.poll();
        if let Some(status) = guest.try_wait().expect("poll run-guest.sh") {
            panic!(
                "the guest ended ({status}) before {what:?}\n{}",
                setup.report(console)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} from the guest within {limit:?}\n{}",
            setup.report(console)
        );
        sleep(Duration::from_millis(50));
    }
}

/// Waits until the guest ends, sampling the daemon whenever the guest reports a stall.
fn wait_for_guest(guest: &mut Child, watch: &mut StallWatch) -> ExitStatus {
    loop {
        watch.poll();
        if let Some(status) = guest.try_wait().expect("poll run-guest.sh") {
            watch.poll();
            return status;
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
    wait_for_console(
        &setup,
        &console,
        &mut guest,
        &mut watch,
        "VMTEST-INFO: write_cache=",
        BOOT_LIMIT,
    );
    if case.write_through {
        assert!(
            console_text(&console).contains("write_cache=write-through"),
            "the guest could not turn the write cache off"
        );
    }
    for (round, restart) in case.restarts.iter().enumerate() {
        let pass = round + 1;
        let step = restart.step.name();
        assert!(
            pass > 1 || restart.step == Step::Rewrite,
            "pass 1 has no earlier region to check"
        );
        assert_eq!(
            setup.write_cache(),
            !case.write_through,
            "write cache before restart {pass}"
        );
        wait_for_console(
            &setup,
            &console,
            &mut guest,
            &mut watch,
            &format!("VMTEST-PASS: {pass} {step} busy"),
            STEP_LIMIT,
        );
        // The guest says "busy" with requests in flight; had the step already ended, this
        // restart would not test what it is meant to.
        assert!(
            !console_text(&console).contains(&format!("VMTEST-PASS: {pass} {step} done")),
            "pass {pass}'s {step} ended before the restart: the region is too small for this \
             machine\n{}",
            setup.report(&console)
        );
        let signal = restart.signal;
        note(
            &setup.daemon_log(),
            &format!(
                "restart {pass} of {}: signal {signal} during pass {pass}'s {step}",
                case.restarts.len()
            ),
        );
        let status = daemon.stop_with(signal);
        if signal == libc::SIGTERM {
            assert!(status.success(), "daemon exit after SIGTERM: {status}");
        }
        daemon = setup.start_daemon();
        println!(
            "vm_restart: restart {pass} of {} (signal {signal}, pass {pass}'s {step}) done",
            case.restarts.len()
        );
    }
    let status = wait_for_guest(&mut guest, &mut watch);
    assert!(
        status.success(),
        "guest failed ({status}, {} stall reports)\n{}",
        watch.stalls(),
        setup.report(&console)
    );
    // Each restart was followed by a check of every region written before it.
    let text = console_text(&console);
    for pass in 1..=case.restarts.len() {
        let mut checks = vec![format!("VMTEST-PASS: {pass} rewrite done rc=0")];
        if pass > 1 {
            checks.push(format!("VMTEST-PASS: {pass} verify done rc=0"));
        }
        for check in checks {
            assert!(text.contains(&check), "no {check:?} from the guest");
        }
    }
    assert!(text.contains("VMTEST-PASS: final verify done rc=0"));
    assert!(text.contains("VMTEST-RESULT: PASS mode=passes"));
    // The restarted daemon still has the guest's write-cache choice.
    assert_eq!(setup.write_cache(), !case.write_through);
    assert!(daemon.terminate().success());
    fs::remove_dir_all(&setup.dir).expect("remove temp dir");
}

#[test]
fn guest_fio_verifies_across_sigterm_and_sigkill_restarts_with_write_back_cache_two_queues() {
    // The writes fio saw complete but did not flush wait in open ksets when the daemon is
    // killed; the process-kill journal gives them to the new daemon, so the checks after the
    // restart find every one, in its newest version.
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
