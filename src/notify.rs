// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The systemd readiness protocol (`sd_notify`): one datagram per state change to the socket
//! named by `$NOTIFY_SOCKET`.
//!
//! A `Type=notify` service is "started" only when it sends `READY=1`, so units ordered after it
//! (the VM) start once the vhost-user socket accepts connections, not merely once the process
//! exists. Outside systemd `$NOTIFY_SOCKET` is unset and every call does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Environment variable through which the service manager passes its socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Tells the service manager that the daemon is ready to serve.
pub fn ready() {
    send_or_warn("READY=1");
}

/// Tells the service manager that the daemon is shutting down (flushing, writing back).
pub fn stopping() {
    send_or_warn("STOPPING=1");
}

/// A free-form status line shown by `systemctl status`.
pub fn status(text: &str) {
    // A newline would start a new assignment in the datagram.
    send_or_warn(&format!("STATUS={}", text.replace('\n', " ")));
}

/// A lost notification is not fatal to serving, but systemd will time the start out without
/// READY=1, so it must show in the log.
fn send_or_warn(state: &str) {
    if let Err(e) = send(state) {
        log::warn!("cannot notify the service manager ({state}): {e}");
    }
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to `$NOTIFY_SOCKET`, if set.
pub fn send(state: &str) -> io::Result<()> {
    match std::env::var_os(NOTIFY_SOCKET_ENV) {
        Some(target) if !target.is_empty() => send_to(&target.to_string_lossy(), state),
        _ => Ok(()),
    }
}

/// Sends `state` to `target`: a socket path, or an abstract socket name written with a leading
/// `@` (as systemd does).
pub fn send_to(target: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(state.as_bytes(), &addr)?
    } else {
        socket.send_to(state.as_bytes(), target)?
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "{NOTIFY_SOCKET_ENV}: short datagram ({sent} of {} bytes)",
                state.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_socket_receives_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn abstract_socket_receives_the_state() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vhost-user-pcache-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = send_to(dir.path().join("absent").to_str().unwrap(), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
