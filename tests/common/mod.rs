// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the integration tests: start the real daemon binary on a temporary socket
//! and talk to it with libblkio's vhost-user driver.

#![allow(dead_code)]

pub mod loop_device;
pub mod ring;
pub mod vm;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

/// How long to wait for the daemon to come up or go down before declaring it stuck.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// A temporary directory holding a sparse backing image and the socket path.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::tempdir().expect("create temporary directory"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("vhost-user.sock")
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    /// Creates `disk.img` as a sparse file of `size` bytes and returns its path.
    pub fn create_image(&self, size: u64) -> PathBuf {
        let path = self.image();
        let f = std::fs::File::create(&path).expect("create backing image");
        f.set_len(size).expect("size backing image");
        path
    }
}

/// The daemon process. Killed on drop if it is still running.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    /// Runs `vhost-user-pcache serve --socket SOCKET ARGS...` and waits until the socket
    /// accepts connections.
    pub fn start(socket: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn(socket, args, None)
    }

    /// [`Daemon::start`] with the daemon's log appended to `log` instead of the test's stderr,
    /// at info level and debug for this crate unless `RUST_LOG` says otherwise: the VM tests
    /// keep it beside the guest's console for a failure to be read afterwards.
    pub fn start_logged(socket: &Path, args: &[&str], log: &Path) -> Daemon {
        Daemon::spawn(socket, args, Some(log))
    }

    fn spawn(socket: &Path, args: &[&str], log: Option<&Path>) -> Daemon {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"));
        if std::env::var_os("RUNTIME_DIRECTORY").is_none() {
            // The process-kill journal goes beside the socket, as systemd's RuntimeDirectory=
            // would have it, not in /dev/shm where a killed daemon's would outlive the test.
            if let Some(dir) = socket.parent() {
                cmd.env("RUNTIME_DIRECTORY", dir);
            }
        }
        let level = match log {
            Some(log) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .expect("open the daemon's log file");
                cmd.stderr(file);
                "info,vhost_user_pcache=debug"
            }
            None => "warn",
        };
        let child = cmd
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or(level.into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vhost-user-pcache");
        let mut daemon = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        daemon.wait_for_socket();
        daemon
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("poll daemon") {
                panic!("daemon exited during startup: {status}");
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                // That probe was a connection of its own; the daemon serves the next one.
                return;
            }
            assert!(Instant::now() < deadline, "daemon socket never appeared");
            sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Sends `signal` and waits for the daemon to exit.
    pub fn stop_with(mut self, signal: i32) -> ExitStatus {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("poll daemon") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit after signal {signal}"
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Per-queue buffer size in the shared memory region.
pub const QUEUE_BUFFER: usize = 1 << 20;

/// A libblkio `virtio-blk-vhost-user` connection with started queues.
pub struct Client {
    pub queues: Vec<QueueClient>,
    blkio: Blkio,
}

/// One queue and its own slice of the mapped buffer region.
pub struct QueueClient {
    queue: Blkioq,
    buf: *mut u8,
}

// SAFETY: each QueueClient owns a disjoint slice of a region that lives as long as the Client,
// and a Blkioq may be used from any one thread at a time.
unsafe impl Send for QueueClient {}

impl Client {
    /// Connects to `socket` and starts `num_queues` queues.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues as i32)?;
        let outcome = blkio.start()?;
        let region = blkio.alloc_mem_region(QUEUE_BUFFER * num_queues)?;
        blkio.map_mem_region(&region)?;
        let queues = outcome
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, queue)| QueueClient {
                queue,
                buf: (region.addr + i * QUEUE_BUFFER) as *mut u8,
            })
            .collect();
        Ok(Client { queues, blkio })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio.get_i32(name).expect("integer property")
    }
}

/// A failed request: the negative errno libblkio reported.
pub type Errno = i32;

impl QueueClient {
    fn wait_one(&mut self) -> Result<(), Errno> {
        let mut completion = [MaybeUninit::<Completion>::uninit()];
        let n = self
            .queue
            .do_io(&mut completion, 1, None, None)
            .expect("blkioq do_io");
        assert_eq!(n, 1, "one completion expected");
        // SAFETY: do_io initialised the first `n` completions.
        let c = unsafe { completion[0].assume_init_read() };
        if c.ret == 0 {
            Ok(())
        } else {
            Err(c.ret)
        }
    }

    /// Reads `len` bytes (at most QUEUE_BUFFER) at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        assert!(len <= QUEUE_BUFFER);
        self.queue.read(offset, self.buf, len, 0, ReqFlags::empty());
        self.wait_one()?;
        // SAFETY: `buf` points to QUEUE_BUFFER mapped bytes owned by this queue.
        Ok(unsafe { std::slice::from_raw_parts(self.buf, len) }.to_vec())
    }

    /// Writes `data` (at most QUEUE_BUFFER bytes) at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        assert!(data.len() <= QUEUE_BUFFER);
        // SAFETY: `buf` points to QUEUE_BUFFER mapped bytes owned by this queue.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf, data.len()) };
        self.queue
            .write(offset, self.buf, data.len(), 0, ReqFlags::empty());
        self.wait_one()
    }

    /// Submits every write of `writes` (together at most QUEUE_BUFFER bytes) without waiting
    /// for any, so they are in flight when the caller, say, kills the daemon.
    pub fn start_writes(&mut self, writes: &[(u64, Vec<u8>)]) {
        let mut at = 0;
        for (offset, data) in writes {
            assert!(at + data.len() <= QUEUE_BUFFER);
            // SAFETY: `buf + at` has room for `data` inside this queue's QUEUE_BUFFER bytes.
            let dst = unsafe { self.buf.add(at) };
            // SAFETY: as above; the source is a separate Vec.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
            self.queue
                .write(*offset, dst, data.len(), 0, ReqFlags::empty());
            at += data.len();
        }
        let mut none: [MaybeUninit<Completion>; 0] = [];
        let _ = self.queue.do_io(&mut none, 0, None, None);
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        self.queue.flush(0, ReqFlags::empty());
        self.wait_one()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Errno> {
        let flags = if may_unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queue.write_zeroes(offset, len, 0, flags);
        self.wait_one()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.queue.discard(offset, len, 0, ReqFlags::empty());
        self.wait_one()
    }
}

/// Deterministic bytes that differ per `seed` and per position, so misplaced data is caught.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs the daemon binary with `args` (an offline tool, `ctl`, a refused `serve`), with
/// warnings only in its log.
pub fn tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-pcache"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vhost-user-pcache")
}

/// Runs `ctl --control-socket SOCKET ARGS`.
pub fn ctl_output(socket: &Path, args: &[&str]) -> Output {
    let socket = socket.to_str().expect("control socket path is UTF-8");
    let mut all = vec!["ctl", "--control-socket", socket];
    all.extend_from_slice(args);
    tool(&all)
}

/// Runs `ctl ARGS` and returns its standard output; panics with its stderr on failure.
pub fn ctl(socket: &Path, args: &[&str]) -> String {
    let out = ctl_output(socket, args);
    assert!(
        out.status.success(),
        "ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The daemon's `ctl status --json`.
pub fn ctl_status(socket: &Path) -> serde_json::Value {
    serde_json::from_str(&ctl(socket, &["--json", "status"])).expect("status --json is JSON")
}
