// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How long a queue worker keeps polling its ring after it ran empty, before it turns guest
//! notifications back on and sleeps in its event loop.
//!
//! A request that arrives while the worker polls costs no kick (a guest exit into the
//! frontend's eventfd), no epoll wake-up and no eventfd read. Polling a ring that stays empty
//! burns the CPU for nothing, so the window adapts the way QEMU's event loop adapts
//! `poll-max-ns` (`adjust_polling_time` in QEMU's util/aio-posix.c): the time from "ring
//! empty" to the next piece of work is measured; within the window nothing changes; longer
//! than the maximum, the window drops to zero (QEMU's default shrink); in between, the window
//! doubles from 4 µs up to the maximum.

use std::time::Duration;

/// Where a window that was shrunk to nothing starts growing again (QEMU's value).
const GROW_START: Duration = Duration::from_micros(4);

/// One queue's polling window (never shared between queues: each adapts to its own guest).
#[derive(Clone, Debug)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
}

impl PollWindow {
    /// A window of at most `max`; zero turns polling off for good. It starts at `max`: the
    /// first idle moment costs one window at most and says at once whether polling pays.
    pub fn new(max: Duration) -> Self {
        PollWindow { max, current: max }
    }

    /// Whether polling is on at all.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// How long to poll now.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Learns from one idle period: the next work came `waited` after the ring ran empty
    /// (found by polling, or by a wake-up after polling gave up).
    pub fn adjust(&mut self, waited: Duration) {
        if waited <= self.current {
            // Polling caught it: the window is right.
        } else if waited > self.max {
            // No window we may use would have caught it: stop paying for one.
            self.current = Duration::ZERO;
        } else if self.current < self.max {
            // A longer window would have caught it.
            self.current = if self.current.is_zero() {
                GROW_START
            } else {
                self.current * 2
            }
            .min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(32);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_wait_longer_than_the_maximum_stops_polling_and_short_waits_grow_it_back() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.current(), MAX);
        w.adjust(us(20)); // caught by polling
        assert_eq!(w.current(), MAX);
        w.adjust(us(500)); // the guest went quiet
        assert_eq!(w.current(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..5 {
            w.adjust(us(30)); // each time a longer window would have caught it
            seen.push(w.current().as_micros());
        }
        assert_eq!(seen, vec![4, 8, 16, 32, 32]);
    }

    #[test]
    fn a_wait_within_the_window_changes_nothing_and_growth_stops_at_the_maximum() {
        let mut w = PollWindow::new(us(10));
        w.adjust(us(50));
        assert_eq!(w.current(), Duration::ZERO);
        w.adjust(us(9));
        assert_eq!(w.current(), us(4));
        w.adjust(us(3));
        assert_eq!(w.current(), us(4), "caught within the window");
        w.adjust(us(9));
        assert_eq!(w.current(), us(8));
        w.adjust(us(9));
        assert_eq!(w.current(), us(10), "capped at the maximum");
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert!(!w.enabled());
        for wait in [0, 1, 100] {
            w.adjust(us(wait));
            assert_eq!(w.current(), Duration::ZERO);
        }
    }
}
