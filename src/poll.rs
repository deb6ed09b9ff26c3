// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Waiting for file descriptors without an event loop: signal checks, the control socket's
//! accept loop, a queue draining while the engine makes room.

use std::io;
use std::os::fd::RawFd;

/// Waits up to `timeout_ms` (-1: forever) for one of `fds` to become readable; returns its
/// index.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> Option<usize> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` initialised pollfd structs.
        let n = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return pollfds.iter().position(|p| p.revents != 0);
    }
}
