// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A QEMU guest runs fio with checksum verification against the daemon, then
//! a second guest checks the same data after the daemon was restarted.
//!
//! The guest is built and booted by the scripts in `vmm-tests/`; this test
//! only wires them to a backend. `VMTEST_BACKEND=qemu-storage-daemon` runs
//! the same test against QEMU's own vhost-user-blk export, which tells a
//! harness problem from a daemon problem. `VMM_ACCEL=kvm` is passed through
//! to QEMU.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;

use common::vm::{build_guest, tail, vmm_tests_dir};

const DISK_SIZE: u64 = 256 << 20;
const QUEUES: u32 = 2;
const SOCKET_WAIT: Duration = Duration::from_secs(30);

/// Fails (never skips) when the host lacks what the guest test needs.
fn check_host_prerequisites() {
    let has_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let has_kernel = fs::read_dir("/boot")
        .map(|dir| {
            dir.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
            })
        })
        .unwrap_or(false);
    assert!(
        has_qemu && has_kernel,
        "the VM test needs qemu-system-x86_64 ({}) and a Debian cloud kernel in /boot ({}); \
         run vmm-tests/install-deps.sh",
        if has_qemu { "found" } else { "missing" },
        if has_kernel { "found" } else { "missing" },
    );
}

enum BackendKind {
    Daemon,
    QemuStorageDaemon,
}

impl BackendKind {
    fn from_env() -> Self {
        match std::env::var("VMTEST_BACKEND").as_deref() {
            Ok("") | Ok("vhost-user-pcache") | Err(_) => BackendKind::Daemon,
            Ok("qemu-storage-daemon") => BackendKind::QemuStorageDaemon,
            Ok(other) => {
                panic!(
                    "VMTEST_BACKEND must be vhost-user-pcache or qemu-storage-daemon, not {other}"
                )
            }
        }
    }
}

/// One running backend process serving `image` on `socket`.
enum Backend {
    /// This project's daemon, with its log in a file.
    Daemon(common::Daemon, PathBuf),
    QemuStorageDaemon(Qsd),
}

impl Backend {
    /// Start the backend, its log appended to `log`; `extra` are more daemon flags (ignored
    /// for qemu-storage-daemon).
    fn start(kind: &BackendKind, socket: &Path, image: &Path, log: &Path, extra: &[&str]) -> Self {
        match kind {
            BackendKind::Daemon => {
                let image = image.to_str().expect("utf-8 image path");
                let size = format!("{}M", DISK_SIZE >> 20);
                let queues = QUEUES.to_string();
                let mut args = vec![
                    "--backing",
                    image,
                    "--create-backing",
                    &size,
                    "--queues",
                    &queues,
                ];
                args.extend_from_slice(extra);
                let daemon = common::Daemon::start_logged(socket, &args, log);
                Backend::Daemon(daemon, log.to_owned())
            }
            BackendKind::QemuStorageDaemon => {
                Backend::QemuStorageDaemon(Qsd::start(socket, image, log))
            }
        }
    }

    fn stop(self) -> ExitStatus {
        match self {
            Backend::Daemon(daemon, _) => daemon.terminate(),
            Backend::QemuStorageDaemon(qsd) => qsd.stop(),
        }
    }

    /// Kill the daemon without letting it persist anything more (qsd is stopped normally).
    fn kill(self) {
        match self {
            Backend::Daemon(daemon, _) => {
                daemon.stop_with(libc::SIGKILL);
            }
            Backend::QemuStorageDaemon(qsd) => {
                qsd.stop();
            }
        }
    }

    /// What to show about the backend when a guest fails.
    fn describe_log(&self) -> String {
        match self {
            Backend::Daemon(_, log) => tail(log, 40),
            Backend::QemuStorageDaemon(qsd) => tail(&qsd.log, 40),
        }
    }
}

/// `qemu-storage-daemon` exporting `image` as vhost-user-blk: the reference
/// backend, for telling harness problems from daemon problems.
struct Qsd {
    child: Child,
    log: PathBuf,
}

impl Qsd {
    fn start(socket: &Path, image: &Path, log: &Path) -> Self {
        let _ = fs::remove_file(socket);
        if !image.exists() {
            File::create(image)
                .and_then(|f| f.set_len(DISK_SIZE))
                .expect("create backing image");
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open qemu-storage-daemon log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f,addr.type=unix,addr.path={},\
                 writable=on,num-queues={QUEUES}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup qemu-storage-daemon log"))
            .stderr(out)
            .spawn()
            .expect("spawn qemu-storage-daemon (run vmm-tests/install-deps.sh)");
        let mut qsd = Qsd {
            child,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + SOCKET_WAIT;
        while !socket.exists() {
            if let Some(status) = qsd.child.try_wait().expect("poll qemu-storage-daemon") {
                panic!(
                    "qemu-storage-daemon exited ({status}) before listening\n{}",
                    tail(log, 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not listen within {SOCKET_WAIT:?}\n{}",
                tail(log, 40)
            );
            sleep(Duration::from_millis(50));
        }
        qsd
    }

    fn stop(mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; `pid` is our own child, which
        // has not been reaped yet, so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + SOCKET_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll qemu-storage-daemon") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon ignored SIGTERM"
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // Reaps a failed test's process; after stop() this is a no-op.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the guest once; panics with the console and backend logs unless the
/// guest reported PASS.
fn boot_guest(guest: &Path, socket: &Path, mode: &str, console: &Path, backend: &Backend) {
    let output = Command::new(vmm_tests_dir().join("run-guest.sh"))
        .arg("--socket")
        .arg(socket)
        .arg("--mode")
        .arg(mode)
        .arg("--guest")
        .arg(guest)
        .arg("--log")
        .arg(console)
        .arg("--queues")
        .arg(QUEUES.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run vmm-tests/run-guest.sh");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "guest {mode} boot failed ({})\n{}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        tail(console, 60),
        backend.describe_log(),
    );
}

/// How the daemon stops between the two boots.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Term,
    Kill,
}

#[test]
fn guest_fio_verifies_data_across_daemon_restart() {
    write_then_verify("cache", &[], Stop::Term);
}

#[test]
fn guest_fio_survives_sigkill_with_pmem_persistence_and_data_crc() {
    // No DAX device here: the emulation runs the pmem code path (cache-line write-back and
    // fences) on an ordinary file. The guest's fio ends with a FLUSH, so a SIGKILL after it
    // must lose nothing.
    std::env::set_var("VHOST_USER_PCACHE_EMULATE_PMEM", "1");
    write_then_verify("pmem", &["--persistence", "pmem", "--data-crc"], Stop::Kill);
}

#[test]
fn guest_fio_verifies_data_without_cache() {
    write_then_verify("nocache", &["--cache", "none"], Stop::Term);
}

fn write_then_verify(name: &str, extra: &[&str], stop: Stop) {
    check_host_prerequisites();
    let guest = vmm_tests_dir().join("work").join("guest");
    build_guest(&guest);

    let kind = BackendKind::from_env();
    let dir = tempfile::Builder::new()
        .prefix(&format!("vm_fio_{name}"))
        .tempdir()
        .expect("temp dir");
    let socket = dir.path().join("vhost.sock");
    let image = dir.path().join("backing.img");
    let backend_log = dir.path().join(match kind {
        BackendKind::Daemon => "daemon.log",
        BackendKind::QemuStorageDaemon => "qemu-storage-daemon.log",
    });

    // On failure the panic leaves the temp dir behind for inspection.
    let dir = dir.keep();
    println!("vm_fio: logs in {}", dir.display());

    let backend = Backend::start(&kind, &socket, &image, &backend_log, extra);
    boot_guest(
        &guest,
        &socket,
        "write",
        &dir.join("console-write.log"),
        &backend,
    );
    if stop == Stop::Kill {
        backend.kill();
    } else {
        let status = backend.stop();
        assert!(status.success(), "backend exit after SIGTERM: {status}");
    }

    let backend = Backend::start(&kind, &socket, &image, &backend_log, extra);
    boot_guest(
        &guest,
        &socket,
        "verify-only",
        &dir.join("console-verify.log"),
        &backend,
    );
    let status = backend.stop();
    assert!(status.success(), "backend exit after SIGTERM: {status}");

    fs::remove_dir_all(&dir).expect("remove temp dir");
}
