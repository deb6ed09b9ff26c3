// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket, as a client meets it: arbitrary bytes are sent to a real
//! `ControlServer` (over a test target that only records what it was asked), and every line
//! that comes back must be one JSON `Response`. Also the request parser alone, whose accepted
//! requests must survive serialising and parsing again.
#![no_main]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost_user_pcache::control::{
    ControlServer, ControlTarget, EngineStatus, Request, Response, TargetError,
};
use vhost_user_pcache::engine::EngineError;
use vhost_user_pcache::serve::ConnectionState;

/// Answers everything, changes nothing.
struct Target;

impl ControlTarget for Target {
    fn status(&self) -> EngineStatus {
        EngineStatus {
            engine: "fuzz".into(),
            capacity_bytes: 1 << 20,
            ..EngineStatus::default()
        }
    }
    fn set_gc_percent(&self, percent: u8) -> Result<(), TargetError> {
        if percent > 90 {
            Err(EngineError::Invalid(format!("gc_percent {percent} above 90")).into())
        } else {
            Ok(())
        }
    }
    fn flush(&self) -> Result<(), TargetError> {
        Ok(())
    }
    fn drain(&self) -> Result<(), TargetError> {
        Ok(())
    }
    fn undrain(&self) -> Result<(), TargetError> {
        Ok(())
    }
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// The server, its socket, and the number of threads while it is idle.
fn server() -> &'static (ControlServer, std::path::PathBuf, usize) {
    static SERVER: OnceLock<(ControlServer, std::path::PathBuf, usize)> = OnceLock::new();
    SERVER.get_or_init(|| {
        // libFuzzer's main, not Rust's, starts this process: a server hanging up on a
        // client must be an EPIPE, not a SIGPIPE that ends the run.
        // SAFETY: setting a signal to SIG_IGN installs no handler code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = std::env::temp_dir().join(format!("pcache-fuzz-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let server = ControlServer::start(
            &path,
            Arc::new(Target),
            Arc::new(ConnectionState::default()),
        )
        .unwrap();
        (server, path, threads())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(req) = serde_json::from_str::<Request>(text) {
            let again = serde_json::to_string(&req).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&again).unwrap(), req);
        }
    }
    let (_, path, idle_threads) = server();
    let mut stream = UnixStream::connect(path).unwrap();
    // The server may hang up before reading everything (a line too long): not an error.
    let _ = stream.write_all(data);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    let mut answers = 0;
    while lines.read_line(&mut line).unwrap_or(0) > 0 {
        assert!(line.ends_with('\n'), "an unterminated answer: {line:?}");
        let r: Response = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("an answer that is not a Response ({e}): {line:?}"));
        assert!(
            r.ok || r.error.is_some(),
            "a failure without an error: {line:?}"
        );
        answers += 1;
        line.clear();
    }
    // At most one answer per request line.
    assert!(answers <= data.split(|&b| b == b'\n').count());
    // The client's thread in the server closes the stream a moment before it ends; wait for
    // the end, or LeakSanitizer takes the exiting thread's state for a leak.
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads() > *idle_threads && Instant::now() < deadline {
        std::thread::yield_now();
    }
});
