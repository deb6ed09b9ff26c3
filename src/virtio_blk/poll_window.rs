// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How long a queue worker keeps polling its ring after it ran empty, before it turns guest
//! notifications back on and sleeps in its event loop.
//!
//! A request that arrives while the worker polls costs no kick (a guest exit into the
//! frontend's eventfd), no epoll wake-up and no eventfd read. Polling a ring that stays empty
//! burns the CPU for nothing, so the window adapts to the queue's guest. The time from "ring
//! empty" to the next piece of work (an *idle period*) is measured. Growth follows QEMU's event
//! loop (`adjust_polling_time` in QEMU's util/aio-posix.c): an idle period longer than the
//! window but within the maximum doubles the window from 4 µs up to the maximum. Shrinking
//! does not: QEMU drops the window to zero the first time an idle period outlasts the
//! maximum, which at a high queue depth happens now and then in a steady stream of requests
//! (a client that handles a whole batch of completions before it resubmits, preempted once),
//! and the window then has to grow back through short windows that catch nothing. Here the
//! window drops to zero only when fewer than half of the last 16 idle periods were short enough
//! for the maximum window: polling goes on while it usually pays, and stops within 9 idle
//! periods once the guest goes quiet or its requests come further apart than the maximum.

use std::time::Duration;

/// Where a window that was shrunk to nothing starts growing again (QEMU's value).
const GROW_START: Duration = Duration::from_micros(4);
/// Idle periods the hit rate looks back on (the bits of `PollWindow::recent`).
const RECENT: u32 = u16::BITS;
/// Of the last `RECENT` idle periods, how many must have been short enough for the maximum
/// window for polling to go on after one that was not.
const KEEP_POLLING: u32 = RECENT / 2;

/// One queue's polling window (never shared between queues: each adapts to its own guest).
#[derive(Clone, Debug)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
    /// The last `RECENT` idle periods, newest in bit 0: set when the maximum window would
    /// have caught it.
    recent: u16,
}

impl PollWindow {
    /// A window of at most `max`; zero turns polling off for good. It starts at `max`, with a
    /// history of hits: the first idle moments cost a window each and say whether polling pays.
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            current: max,
            recent: u16::MAX,
        }
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
        let catchable = waited <= self.max;
        self.recent = (self.recent << 1) | u16::from(catchable);
        if waited <= self.current {
            // Polling caught it: the window is right.
        } else if !catchable {
            // No window we may use would have caught this one: stop paying for one once
            // that is what usually happens.
            if self.recent.count_ones() < KEEP_POLLING {
                self.current = Duration::ZERO;
            }
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
    fn a_quiet_guest_stops_polling_within_nine_idle_periods_and_short_waits_grow_it_back() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.current(), MAX);
        w.adjust(us(20)); // caught by polling
        assert_eq!(w.current(), MAX);
        let mut windows = Vec::new();
        for _ in 0..9 {
            w.adjust(us(500)); // the guest went quiet
            windows.push(w.current().as_micros());
        }
        assert_eq!(windows, vec![32, 32, 32, 32, 32, 32, 32, 32, 0]);
        let mut seen = Vec::new();
        for _ in 0..5 {
            w.adjust(us(30)); // each time a longer window would have caught it
            seen.push(w.current().as_micros());
        }
        assert_eq!(seen, vec![4, 8, 16, 32, 32]);
    }

    #[test]
    fn a_stream_that_now_and_then_outlasts_the_maximum_keeps_its_window() {
        let mut w = PollWindow::new(MAX);
        // One idle period in three is longer than the maximum (QEMU's rule drops the
        // window to zero at the first one).
        for round in 0..300 {
            w.adjust(if round % 3 == 2 { us(80) } else { us(20) });
            assert_eq!(w.current(), MAX, "idle period {round}");
        }
        // Once most idle periods outlast it, the window goes.
        let mut rounds = 0;
        while w.current() == MAX {
            w.adjust(if rounds % 3 == 2 { us(20) } else { us(80) });
            rounds += 1;
            assert!(
                rounds <= 16,
                "still polling after {rounds} mostly long idle periods"
            );
        }
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn a_wait_within_the_window_changes_nothing_and_growth_stops_at_the_maximum() {
        let mut w = PollWindow::new(us(10));
        for _ in 0..9 {
            w.adjust(us(50));
        }
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
