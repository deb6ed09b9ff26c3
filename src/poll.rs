// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Waiting for file descriptors without an event loop: signal checks, the control socket's
//! accept loop, a queue draining while the engine makes room.

use std::io;
use std::os::fd::RawFd;

/// Waits up to `timeout_ms` (-1: forever) for one of `fds` to become readable; returns its
/// index.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> Option<usize> {
    const UNSET: libc::pollfd = libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    };
    // Callers wait on a handful of descriptors, some of them once per request: those fit on
    // the stack, so a call does not allocate.
    let mut on_stack = [UNSET; 8];
    let mut on_heap = Vec::new();
    let pollfds: &mut [libc::pollfd] = if fds.len() <= on_stack.len() {
        &mut on_stack[..fds.len()]
    } else {
        on_heap.resize(fds.len(), UNSET);
        &mut on_heap
    };
    for (p, &fd) in pollfds.iter_mut().zip(fds) {
        p.fd = fd;
    }
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

#[cfg(test)]
mod tests {
    use super::poll_readable;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// The readable descriptor's index comes back, whether the array fits on the stack or not.
    #[test]
    fn poll_readable_finds_the_readable_descriptor_few_or_many() {
        use std::io::Write;
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..10).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<i32> = pairs.iter().map(|(r, _)| r.as_raw_fd()).collect();
        assert_eq!(poll_readable(&fds[..3], 0), None);
        assert_eq!(poll_readable(&fds, 0), None);
        (&pairs[2].1).write_all(b"x").unwrap();
        assert_eq!(poll_readable(&fds[..3], 0), Some(2));
        (&pairs[9].1).write_all(b"x").unwrap();
        assert_eq!(poll_readable(&fds[3..], 0), Some(6));
        assert_eq!(poll_readable(&fds, 0), Some(2));
    }
}
