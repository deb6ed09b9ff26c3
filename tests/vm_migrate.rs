// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Save and restore of a running QEMU guest against the same daemon: the guest runs fio with
//! checksum verification on the vhost-user disk; while fio reads back what it wrote, QEMU
//! migrates the live VM to a file (`migrate "exec:cat > FILE"`, the stream `virsh save`
//! writes), quits, and a new QEMU loads the file (`-incoming "exec:cat FILE"`) and connects to
//! the same daemon; twice under one fio run, which must finish with every block verified.
//!
//! QEMU refuses both `migrate` and savevm unless the backend offers `VHOST_F_LOG_ALL` and
//! `LOG_SHMFD`. The copy runs at 128 MiB/s with QEMU's default downtime, so the guest keeps
//! reading for a few seconds while its memory is copied: a read the daemon completes then
//! reaches the restored guest with its data only if the daemon marked its pages in the dirty
//! log. With that marking removed, fio reported "bad header offset" (a buffer still holding an
//! older block) in 4 runs out of 4. `tests/dirty_log.rs` checks the marks themselves.
//!
//! The guest comes from `vmm-tests/` (build-guest.sh); `VMM_ACCEL=kvm` is passed through to
//! QEMU.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;

use common::vm::{build_guest, console_text, tail, vmm_tests_dir};

use common::Daemon;

const DISK_SIZE: &str = "256M";
const QUEUES: u32 = 2;
const GUEST_MEM: &str = "512M";
/// From QEMU's start to fio's first I/O (boot under TCG).
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// Guest reads (fio's verification) seen by the daemon before a save starts, so that QEMU
/// copies guest memory while the daemon writes read data into it: the pages the dirty log
/// must cover.
const READS_BEFORE_MIGRATION: u64 = 4 << 20;
/// The migration itself, and the restored guest until fio is done.
const MIGRATION_LIMIT: Duration = Duration::from_secs(120);
/// Saves and restores under one fio run.
const SAVES: u32 = 2;
const FINISH_LIMIT: Duration = Duration::from_secs(300);

/// A QEMU process, killed if the test ends early.
struct Qemu {
    child: Child,
    qmp: Qmp,
    console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest of `vmm-tests/run-guest.sh` (same machine, kernel, fio job selection), with a QMP
/// socket, and for the destination `-incoming`.
fn start_qemu(dir: &Path, name: &str, incoming: Option<&Path>) -> Qemu {
    let guest = vmm_tests_dir().join("work").join("guest");
    let accel = std::env::var("VMM_ACCEL").unwrap_or_else(|_| "tcg".into());
    let cpu = std::env::var("VMM_CPU")
        .unwrap_or_else(|_| if accel == "kvm" { "host" } else { "qemu64" }.into());
    let console = dir.join(format!("console-{name}.log"));
    let qmp = dir.join(format!("qmp-{name}.sock"));
    let socket = dir.join("vhost.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine", "q35", "-accel", &accel, "-cpu", &cpu, "-smp", "2",
    ])
    .args(["-m", GUEST_MEM])
    .arg("-object")
    .arg(format!(
        "memory-backend-memfd,id=mem,size={GUEST_MEM},share=on"
    ))
    .args(["-numa", "node,memdev=mem"])
    .args(["-nodefaults", "-display", "none", "-monitor", "none"])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-no-reboot")
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest.join("initramfs.cpio.gz"))
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 loglevel=4 no_timer_check vmtest.mode=write \
             vmtest.queues={QUEUES} vmtest.job=restart-verify"
    ))
    .arg("-chardev")
    .arg(format!(
        "socket,id=c0,path={},reconnect=1",
        socket.display()
    ))
    .arg("-device")
    .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={QUEUES}"));
    if let Some(file) = incoming {
        cmd.arg("-incoming")
            .arg(format!("exec:cat {}", file.display()));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .expect("run qemu-system-x86_64 (run vmm-tests/install-deps.sh)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(&qmp) {
            Ok(s) => break s,
            Err(e) => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("QEMU ({name}) exited at start: {status}");
                }
                assert!(Instant::now() < deadline, "no QMP socket from QEMU: {e}");
                sleep(Duration::from_millis(50));
            }
        }
    };
    let mut qmp = Qmp::new(stream);
    qmp.execute("qmp_capabilities", serde_json::json!({}));
    Qemu {
        child,
        qmp,
        console,
    }
}

/// QEMU's machine protocol: one JSON object per line, replies in order, events between them.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn new(stream: UnixStream) -> Qmp {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.next_message();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp
    }

    fn next_message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QEMU closed its QMP socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Sends `command` in one write: QEMU acts on a complete JSON object before its newline
    /// arrives, so a `quit` split over two writes can close the socket under the second.
    fn send(&mut self, command: &str, arguments: serde_json::Value) -> std::io::Result<()> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{request}\n").as_bytes())
    }

    /// Runs `command`; returns its `return` value, panicking on an error reply.
    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        self.send(command, arguments).expect("write to QMP");
        loop {
            let reply = self.next_message();
            if let Some(value) = reply.get("return") {
                return value.clone();
            }
            if let Some(error) = reply.get("error") {
                panic!("QMP {command} failed: {error}");
            }
            // An asynchronous event: not the reply.
        }
    }
}

/// Bytes the guest has read, from the daemon's `ctl status --json`.
fn read_bytes(control: &Path) -> u64 {
    let status = common::ctl_status(control);
    find_u64(&status, "read_bytes").unwrap_or_else(|| panic!("no read_bytes in {status}"))
}

fn find_u64(value: &serde_json::Value, key: &str) -> Option<u64> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| map.values().find_map(|v| find_u64(v, key))),
        _ => None,
    }
}

fn wait_for_console(qemu: &mut Qemu, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !console_text(&qemu.console).contains(what) {
        if let Some(status) = qemu.child.try_wait().expect("poll QEMU") {
            panic!(
                "QEMU ended ({status}) before {what:?}\n{}",
                console_text(&qemu.console)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} from the guest\n{}",
            console_text(&qemu.console)
        );
        sleep(Duration::from_millis(100));
    }
}

/// Waits until the guest has read `READS_BEFORE_MIGRATION` more bytes.
fn wait_for_reads(qemu: &mut Qemu, control: &Path) {
    let reads_at_start = read_bytes(control);
    let deadline = Instant::now() + MIGRATION_LIMIT;
    while read_bytes(control) < reads_at_start + READS_BEFORE_MIGRATION {
        assert!(
            Instant::now() < deadline,
            "the guest's fio does not read\n{}",
            console_text(&qemu.console)
        );
        if let Some(status) = qemu.child.try_wait().unwrap() {
            panic!(
                "QEMU ended ({status}) before the migration\n{}",
                console_text(&qemu.console)
            );
        }
        sleep(Duration::from_millis(20));
    }
}

/// Saves the running VM of `qemu` to `state` (a live migration to a file), then quits it.
fn save_and_quit(mut qemu: Qemu, state: &Path) {
    // QEMU's default downtime, and a bandwidth at which copying the guest's memory takes a
    // few seconds with the VM running: a bandwidth so high that QEMU stops the VM almost at
    // once would copy nearly everything after the daemon's last write and test little.
    qemu.qmp.execute(
        "migrate-set-parameters",
        serde_json::json!({ "max-bandwidth": 128u64 << 20, "downtime-limit": 300 }),
    );
    let started = Instant::now();
    qemu.qmp.execute(
        "migrate",
        serde_json::json!({ "uri": format!("exec:cat > {}", state.display()) }),
    );
    let syncs = loop {
        if let Some(status) = qemu.child.try_wait().unwrap() {
            panic!(
                "QEMU ended ({status}) during the migration: is the guest's job too short?\n{}",
                console_text(&qemu.console)
            );
        }
        let info = qemu.qmp.execute("query-migrate", serde_json::json!({}));
        match info["status"].as_str() {
            Some("completed") => break info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            Some("failed") | Some("cancelled") => panic!("migration failed: {info}"),
            _ => {}
        }
        assert!(
            started.elapsed() < MIGRATION_LIMIT,
            "migration did not complete: {info}"
        );
        sleep(Duration::from_millis(100));
    };
    let status = qemu.qmp.execute("query-status", serde_json::json!({}));
    assert_eq!(status["status"], "postmigrate", "QEMU after the migration");
    assert!(
        !console_text(&qemu.console).contains("VMTEST-RESULT"),
        "fio finished before the migration did: the job is too short for this test"
    );
    println!(
        "vm_migrate: saved in {:.1}s ({syncs} dirty-page syncs), {} MiB",
        started.elapsed().as_secs_f64(),
        fs::metadata(state).unwrap().len() >> 20
    );
    if let Some(status) = qemu.child.try_wait().unwrap() {
        panic!("QEMU exited by itself after the migration: {status:?}");
    }
    // QEMU may close the socket before its reply arrives: its exit status is the answer.
    qemu.qmp
        .send("quit", serde_json::json!({}))
        .expect("send quit to QMP");
    let quit = qemu.child.wait().expect("wait for QEMU");
    assert!(quit.success(), "QEMU exit after quit: {quit}");
}

#[test]
fn guest_fio_verifies_across_live_saves_to_file_and_restores_on_the_same_daemon() {
    build_guest(&vmm_tests_dir().join("work").join("guest"));
    let dir = tempfile::Builder::new()
        .prefix("vm_migrate")
        .tempdir()
        .expect("temp dir")
        .keep();
    println!("vm_migrate: logs in {}", dir.display());
    let image = dir.join("backing.img");
    let control = dir.join("control.sock");
    let queues = QUEUES.to_string();
    let daemon_log = dir.join("daemon.log");
    let daemon = Daemon::start_logged(
        &dir.join("vhost.sock"),
        &[
            "--backing",
            image.to_str().unwrap(),
            "--create-backing",
            DISK_SIZE,
            "--queues",
            &queues,
            "--control-socket",
            control.to_str().unwrap(),
        ],
        &daemon_log,
    );

    let mut qemu = start_qemu(&dir, "boot", None);
    wait_for_console(&mut qemu, "VMTEST-INFO: write_cache=", BOOT_LIMIT);
    let mut consoles = vec![qemu.console.clone()];
    for round in 1..=SAVES {
        // fio writes its regions, then reads them back to verify: save while it reads.
        wait_for_reads(&mut qemu, &control);
        let state = dir.join(format!("vm-{round}.state"));
        save_and_quit(qemu, &state);
        qemu = start_qemu(&dir, &format!("restore-{round}"), Some(&state));
        consoles.push(qemu.console.clone());
    }
    wait_for_console(&mut qemu, "VMTEST-RESULT", FINISH_LIMIT);
    let console = console_text(&qemu.console);
    let all = || {
        consoles
            .iter()
            .map(|c| format!("--- {}\n{}", c.display(), console_text(c)))
            .collect::<String>()
    };
    assert!(
        console.contains("VMTEST-RESULT: PASS"),
        "fio failed after the restore\n{}\n{}",
        all(),
        tail(&daemon_log, 40)
    );
    let end = qemu.child.wait().expect("wait for the restored QEMU");
    assert!(end.success(), "restored QEMU exit: {end}");
    drop(qemu);
    assert!(daemon.terminate().success());
    fs::remove_dir_all(&dir).expect("remove temp dir");
}
