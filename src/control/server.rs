// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's server: a listener thread that also samples the writeback rate once a
//! second, and one short-lived thread per client, so a long `drain` never holds up `status`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{render_metrics, ConnectionStatus, ControlTarget, Request, Response, Status};
use crate::engine::ErrorChain;
use crate::poll::poll_readable;
use crate::serve::ConnectionState;
use crate::sync::lock;

/// Longest request line accepted; requests are a few dozen bytes.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {0}: another daemon is listening there")]
    InUse(PathBuf),
    #[error("control socket {0}: a file that is not a socket is in the way")]
    NotASocket(PathBuf),
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running server. Dropping it removes the socket file; its threads end with the process.
pub struct ControlServer {
    path: PathBuf,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What every client thread shares.
struct Shared {
    target: Arc<dyn ControlTarget>,
    connection: Arc<ConnectionState>,
    rate: Mutex<RateMeter>,
}

/// Writeback bytes per second, measured between samples about a second apart.
struct RateMeter {
    at: Instant,
    bytes: u64,
    rate: u64,
}

impl RateMeter {
    fn sample(&mut self, bytes: u64) {
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64();
        if secs > 0.0 {
            self.rate = (bytes.saturating_sub(self.bytes) as f64 / secs) as u64;
        }
        self.at = now;
        self.bytes = bytes;
    }
}

fn writeback_bytes(target: &dyn ControlTarget) -> u64 {
    target.status().cache.map_or(0, |c| c.stats.writeback_bytes)
}

impl ControlServer {
    /// Listen on `path` (mode 0600; a stale socket left by a dead daemon is replaced) and
    /// serve requests for `target` from a background thread.
    pub fn start(
        path: &Path,
        target: Arc<dyn ControlTarget>,
        connection: Arc<ConnectionState>,
    ) -> Result<ControlServer, ControlError> {
        let listener = bind(path)?;
        let shared = Arc::new(Shared {
            rate: Mutex::new(RateMeter {
                at: Instant::now(),
                bytes: writeback_bytes(target.as_ref()),
                rate: 0,
            }),
            target,
            connection,
        });
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &shared))
            .map_err(|source| ControlError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        log::info!("control socket on {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
        })
    }
}

fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // The socket must never be reachable by others, not even between bind and chmod. No other
    // thread of the daemon creates files, so the process-wide umask change is not observed.
    // SAFETY: umask(2) only swaps the process's file mode mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(io)
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        if poll_readable(&[listener.as_raw_fd()], 1000).is_some() {
            match listener.accept() {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || serve_client(stream, &shared));
                    if let Err(e) = spawned {
                        log::warn!("control socket: cannot start a client thread: {e}");
                    }
                }
                Err(e) => log::warn!("control socket: accept failed: {e}"),
            }
        }
        let bytes = writeback_bytes(shared.target.as_ref());
        let mut rate = lock(&shared.rate);
        if rate.at.elapsed().as_millis() >= 1000 {
            rate.sample(bytes);
        }
    }
}

fn serve_client(stream: UnixStream, shared: &Shared) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log::warn!("control socket: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_REQUEST).read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = answer(&mut writer, &Response::failed(format!("bad request: {e}")));
                return;
            }
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST {
            let _ = answer(&mut writer, &Response::failed("request line too long"));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(shared, request),
            Err(e) => Response::failed(format!("bad request: {e}")),
        };
        if answer(&mut writer, &response).is_err() {
            return;
        }
    }
}

fn answer(writer: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(std::io::Error::other)?;
    text.push('\n');
    writer.write_all(text.as_bytes())
}

/// Answer one request.
fn handle(shared: &Shared, request: Request) -> Response {
    log::debug!("control request {request:?}");
    let outcome = match request {
        Request::Status => {
            return Response {
                status: Some(status(shared)),
                ..Response::done()
            }
        }
        Request::Metrics => {
            return Response {
                metrics: Some(render_metrics(&status(shared))),
                ..Response::done()
            }
        }
        Request::SetGcPercent { value } => shared.target.set_gc_percent(value).inspect(|()| {
            log::info!("gc_percent set to {value} through the control socket");
        }),
        Request::Flush => shared.target.flush(),
        Request::Drain => shared.target.drain(),
        Request::Undrain => shared.target.undrain(),
    };
    match outcome {
        Ok(()) => Response::done(),
        Err(e) => Response::failed(ErrorChain(&e).to_string()),
    }
}

fn status(shared: &Shared) -> Status {
    let rate = lock(&shared.rate).rate;
    Status {
        engine: shared.target.status(),
        connection: ConnectionStatus {
            connected: shared.connection.connected(),
            connections: shared.connection.connections(),
        },
        writeback_rate_bytes_per_sec: rate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::TargetError;

    #[test]
    fn a_failure_answers_with_each_cause_once() {
        let error = TargetError::FlushImage(std::io::Error::other("device gone"));
        assert_eq!(
            ErrorChain(&error).to_string(),
            "flushing the backing image: device gone"
        );
        assert_eq!(
            ErrorChain(&TargetError::NoCache).to_string(),
            TargetError::NoCache.to_string()
        );
    }
}
