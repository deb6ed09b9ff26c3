// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Serialises read-modify-write cycles on the same aligned blocks.
//!
//! A write whose offset or length is not a multiple of the O_DIRECT alignment reads the
//! surrounding aligned blocks, patches them and writes them back. Two such writes to different
//! sectors of one block are legal at the same time, and would lose one of the updates if their
//! cycles interleaved, so every cycle holds its aligned range here, across all queues and the
//! synchronous helpers of one image.

use std::sync::{Condvar, Mutex, Weak};

use super::sys::EventFd;

#[derive(Default)]
pub(crate) struct RangeLocks {
    inner: Mutex<Inner>,
    released: Condvar,
}

#[derive(Default)]
struct Inner {
    held: Vec<(u64, u64)>,
    /// Queues to wake when a range is released, since one of them may have a cycle waiting.
    waiters: Vec<Weak<EventFd>>,
}

impl Inner {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.held.iter().any(|&(s, e)| s < end && start < e)
    }
}

impl RangeLocks {
    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    pub(crate) fn register_waiter(&self, doorbell: Weak<EventFd>) {
        let mut inner = self.lock_inner();
        inner.waiters.retain(|w| w.strong_count() > 0);
        inner.waiters.push(doorbell);
    }

    pub(crate) fn try_lock(&self, start: u64, end: u64) -> bool {
        let mut inner = self.lock_inner();
        if inner.overlaps(start, end) {
            return false;
        }
        inner.held.push((start, end));
        true
    }

    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn lock_blocking(&self, start: u64, end: u64) {
        let mut inner = self.lock_inner();
        while inner.overlaps(start, end) {
            inner = match self.released.wait(inner) {
                Ok(guard) => guard,
                // Poisoned while waiting: the same bug `sync::lock` reports.
                Err(_) => {
                    panic!("a thread panicked while holding a lock; its data cannot be trusted")
                }
            };
        }
        inner.held.push((start, end));
    }

    pub(crate) fn unlock(&self, start: u64, end: u64) {
        let mut inner = self.lock_inner();
        if let Some(i) = inner.held.iter().position(|&r| r == (start, end)) {
            inner.held.swap_remove(i);
        }
        inner.waiters.retain(|w| match w.upgrade() {
            Some(doorbell) => {
                doorbell.signal();
                true
            }
            None => false,
        });
        drop(inner);
        self.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let locks = RangeLocks::default();
        assert!(locks.try_lock(0, 4096));
        assert!(!locks.try_lock(0, 512));
        assert!(!locks.try_lock(2048, 8192));
        assert!(locks.try_lock(4096, 8192));
        locks.unlock(0, 4096);
        assert!(locks.try_lock(0, 512));
    }

    #[test]
    fn release_rings_registered_doorbells() {
        let locks = RangeLocks::default();
        let doorbell = std::sync::Arc::new(EventFd::new().unwrap());
        locks.register_waiter(std::sync::Arc::downgrade(&doorbell));
        assert!(locks.try_lock(0, 512));
        locks.unlock(0, 512);
        let mut pfd = libc::pollfd {
            fd: doorbell.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(ready, 1);
    }
}
