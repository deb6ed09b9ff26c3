// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's one policy for a thread that panics.
//!
//! A panic in any thread (a queue worker, writeback, GC, the log committer) means an invariant
//! of the cache no longer holds. Carrying on would spread that state: every other thread would
//! meet a poisoned mutex, or worse, data it must not trust. So the daemon stops at once with
//! the panic's message in the log ([`stop_process_on_panic`]), the service manager restarts it,
//! and the restart replays the log from the media, which is the state the contract promises.
//! Because of that a poisoned mutex is never observed in a running daemon; [`lock`] treats it
//! as the bug it would be.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`. Poisoning cannot be seen while [`stop_process_on_panic`] is installed (the
/// process is gone before another thread could lock); in tests, which keep the default hook,
/// it fails the test that saw it with the reason.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(_) => panic!("a thread panicked while holding a lock; its data cannot be trusted"),
    }
}

/// Installs a panic hook that logs the panic (thread, message, place) at error level and
/// ends the process with exit status 70 (EX_SOFTWARE), so that systemd restarts the daemon
/// and the log on the media is replayed instead of a half-working daemon serving on.
pub fn stop_process_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        log::error!("internal error in thread '{name}': {info}; stopping the daemon");
        default_hook(info);
        std::process::exit(70);
    }));
}
