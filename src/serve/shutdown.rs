// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGINT/SIGTERM turned into a readable eventfd, so the serve loop and its watcher can wait
//! for "stop" alongside sockets instead of dying in the middle of a request.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::poll::poll_readable;

/// The eventfd the signal handler writes to; -1 before installation.
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_signal: libc::c_int) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer for the call.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Becomes readable (and stays readable) once SIGINT or SIGTERM arrived.
pub struct ShutdownSignal {
    fd: RawFd,
}

impl ShutdownSignal {
    /// Installs the handlers for SIGINT and SIGTERM.
    pub fn install() -> io::Result<ShutdownSignal> {
        let event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let fd = event.as_raw_fd();
        // Never closed: the signal handler and the watcher thread may use it at any time.
        std::mem::forget(event);
        SIGNAL_EVENT_FD.store(fd, Ordering::SeqCst);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
            // only performs an async-signal-safe write to an eventfd that is never closed.
            let rc = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(ShutdownSignal { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn requested(&self) -> bool {
        poll_readable(&[self.fd()], 0).is_some()
    }
}
