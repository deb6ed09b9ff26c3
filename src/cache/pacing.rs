// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! When writeback runs: a write-back cache absorbs a burst at cache speed and writes it back
//! when the guest is quiet or when room runs short.
//!
//! Before each batch of ksets the writeback thread takes a `Look` and its `Pacer` decides:
//! - a drain waits or drained mode is on: run (the `writeback_unpaced` override);
//! - room is short: run flat out whatever the guest does. Short means the dirty share of the
//!   cache's data space reached the high watermark (and then until it falls below the low one,
//!   as dm-writecache's `high_watermark`/`low_watermark`), or a write waited for room since the
//!   last look, or no more segments are free than allocation needs to go on;
//! - the guest made requests (reads or writes) within the idle period: wait;
//! - otherwise the guest is idle: run at full speed, looking again after every batch.
//!
//! Waiting is on a condition variable, not a sleep loop: `Pacing::wake` ends it when the
//! dirty share crosses the high watermark (the write path sees the crossing in the counter
//! it already adds to), when a write or FLUSH finds no room, when a drain starts and at
//! shutdown. Otherwise the thread looks once per idle period whether the guest went quiet; the
//! activity it reads is the sum of the per-thread request counters of `stats`, so the request
//! path writes nothing for pacing.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Operator settings of writeback pacing (`serve --writeback-watermarks`,
/// `--writeback-idle-ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacingOptions {
    /// Dirty share of the cache's data space, in percent, at which writeback runs flat out
    /// whatever the guest does.
    pub high_watermark: u8,
    /// Dirty share, in percent, below which writeback started by the high watermark goes back
    /// to waiting for the guest to be idle.
    pub low_watermark: u8,
    /// How long the guest must make no request for writeback to count it idle.
    pub idle: Duration,
}

/// Default high watermark: above the volume a burst that should run at cache speed fills,
/// below the point where allocation stops and writes wait.
pub const DEFAULT_HIGH_WATERMARK: u8 = 80;
pub const DEFAULT_LOW_WATERMARK: u8 = 70;
pub const DEFAULT_IDLE: Duration = Duration::from_millis(1000);

impl Default for PacingOptions {
    fn default() -> Self {
        PacingOptions {
            high_watermark: DEFAULT_HIGH_WATERMARK,
            low_watermark: DEFAULT_LOW_WATERMARK,
            idle: DEFAULT_IDLE,
        }
    }
}

/// Bad pacing settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacingError {
    #[error("writeback watermarks {high},{low}: want HIGH,LOW with 0 < LOW <= HIGH <= 100")]
    Watermarks { high: u8, low: u8 },
    #[error("{text:?} is not HIGH,LOW: two percentages with 0 < LOW <= HIGH <= 100")]
    WatermarksText { text: String },
}

/// `HIGH,LOW` as `--writeback-watermarks` and the config file give it: two percentages that
/// [`PacingOptions::validate`] accepts.
pub fn parse_watermarks(text: &str) -> Result<(u8, u8), PacingError> {
    let bad = || PacingError::WatermarksText { text: text.into() };
    let (high, low) = text.split_once(',').ok_or_else(bad)?;
    let high: u8 = high.trim().parse().map_err(|_| bad())?;
    let low: u8 = low.trim().parse().map_err(|_| bad())?;
    let opts = PacingOptions {
        high_watermark: high,
        low_watermark: low,
        ..PacingOptions::default()
    };
    opts.validate().map_err(|_| bad())?;
    Ok((high, low))
}

impl PacingOptions {
    pub fn validate(&self) -> Result<(), PacingError> {
        let (high, low) = (self.high_watermark, self.low_watermark);
        if low == 0 || low > high || high > 100 {
            return Err(PacingError::Watermarks { high, low });
        }
        Ok(())
    }
}

/// What the writeback thread is doing, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum WritebackState {
    /// Nothing closed is dirty beyond dirty_tail.
    #[default]
    Clean = 0,
    /// Dirty data waits: the guest is busy and the cache has room.
    WaitingForIdleGuest = 1,
    /// Writing back because the guest is idle.
    IdleDrain = 2,
    /// Writing back flat out because room is short.
    RoomShort = 3,
    /// Writing back flat out for a drain or drained mode.
    Draining = 4,
}

impl WritebackState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::WaitingForIdleGuest,
            2 => Self::IdleDrain,
            3 => Self::RoomShort,
            4 => Self::Draining,
            _ => Self::Clean,
        }
    }
}

impl std::fmt::Display for WritebackState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Clean => "nothing to write back",
            Self::WaitingForIdleGuest => "waiting: the guest is busy and the cache has room",
            Self::IdleDrain => "running: the guest is idle",
            Self::RoomShort => "running flat out: room is short",
            Self::Draining => "running flat out: drain",
        })
    }
}

/// The pacing state shared between the request paths and the writeback thread (in `Core`).
pub(crate) struct Pacing {
    opts: PacingOptions,
    /// Dirty bytes at the high and low watermark.
    high_bytes: u64,
    low_bytes: u64,
    /// A wake-up is pending, and the condition the writeback thread waits on.
    wake: (Mutex<bool>, Condvar),
    state: AtomicU8,
}

impl Pacing {
    /// Pacing for a cache of `capacity` bytes of data space.
    pub fn new(opts: PacingOptions, capacity: u64) -> Pacing {
        let at = |percent: u8| capacity / 100 * u64::from(percent);
        Pacing {
            opts,
            high_bytes: at(opts.high_watermark),
            low_bytes: at(opts.low_watermark),
            wake: (Mutex::new(false), Condvar::new()),
            state: AtomicU8::new(WritebackState::Clean as u8),
        }
    }

    pub fn options(&self) -> PacingOptions {
        self.opts
    }

    /// A write added `len` dirty bytes to `before`: wake writeback if that crossed the high
    /// watermark (two compares on the write path; the wake itself is once per crossing).
    pub fn dirty_added(&self, before: u64, len: u64) {
        if before < self.high_bytes && before + len >= self.high_bytes {
            self.wake();
        }
    }

    /// End a wait of the writeback thread now: room ran short, a drain started, or the engine
    /// stops. A wake while it is not waiting ends its next wait at once (it then looks again).
    pub fn wake(&self) {
        *lock(&self.wake.0) = true;
        self.wake.1.notify_all();
    }

    /// Wait up to `timeout` or until woken.
    pub(super) fn wait(&self, timeout: Duration) {
        let g = lock(&self.wake.0);
        let (mut g, _) = self
            .wake
            .1
            .wait_timeout_while(g, timeout, |woken| !*woken)
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }

    pub fn state(&self) -> WritebackState {
        WritebackState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub(super) fn set_state(&self, s: WritebackState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

/// What the writeback thread sees before a batch.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Look {
    /// A drain waits or drained mode is on.
    pub unpaced: bool,
    pub dirty_bytes: u64,
    /// No more segments are free than data allocation needs to go on.
    pub free_low: bool,
    /// Requests handed back for lack of room so far (`stats.busy`).
    pub busy: u64,
    /// Sum of the request counters: changes whenever the guest makes a request.
    pub activity: u64,
}

/// What to do before the next batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Run(WritebackState),
    /// Wait at most this long, then look again.
    Wait(Duration),
}

/// The writeback thread's pacing memory between looks.
pub(super) struct Pacer {
    /// Between the watermarks after reaching the high one: still flat out.
    flat_out: bool,
    busy_seen: u64,
    activity_seen: u64,
    /// When `activity_seen` was last seen to change.
    active_at: Instant,
}

impl Pacer {
    /// A pacer that counts the guest busy until a first idle period passed from `now`.
    pub fn new(now: Instant) -> Pacer {
        Pacer {
            flat_out: false,
            busy_seen: 0,
            activity_seen: 0,
            active_at: now,
        }
    }

    pub fn decide(&mut self, pacing: &Pacing, look: Look, now: Instant) -> Verdict {
        let waited_for_room = look.busy != self.busy_seen;
        self.busy_seen = look.busy;
        // Every sign of short room starts a run down to the low watermark, as crossing the
        // high one does: in a cache kept full by the guest, writeback then runs without a break
        // rather than a kset per write handed back.
        if look.dirty_bytes >= pacing.high_bytes || look.free_low || waited_for_room {
            self.flat_out = true;
        } else if look.dirty_bytes < pacing.low_bytes {
            self.flat_out = false;
        }
        if look.activity != self.activity_seen {
            self.activity_seen = look.activity;
            self.active_at = now;
        }
        if look.unpaced {
            return Verdict::Run(WritebackState::Draining);
        }
        if self.flat_out {
            return Verdict::Run(WritebackState::RoomShort);
        }
        let quiet = now.saturating_duration_since(self.active_at);
        match pacing.opts.idle.checked_sub(quiet) {
            Some(left) if !left.is_zero() => Verdict::Wait(left),
            _ => Verdict::Run(WritebackState::IdleDrain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_millis(100);

    fn pacing() -> Pacing {
        Pacing::new(
            PacingOptions {
                high_watermark: 80,
                low_watermark: 60,
                idle: IDLE,
            },
            1000,
        )
    }

    fn busy_guest(activity: u64, dirty_bytes: u64) -> Look {
        Look {
            dirty_bytes,
            activity,
            ..Look::default()
        }
    }

    #[test]
    fn waits_while_the_guest_is_busy_and_room_is_plenty() {
        let p = pacing();
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        for i in 1..100u64 {
            let now = t0 + IDLE / 2 * i as u32;
            assert_eq!(
                pacer.decide(&p, busy_guest(i, 790), now),
                Verdict::Wait(IDLE),
                "a request since the last look: a whole idle period from now"
            );
        }
    }

    #[test]
    fn runs_once_the_guest_was_quiet_for_the_idle_period() {
        let p = pacing();
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        assert_eq!(
            pacer.decide(&p, busy_guest(5, 100), t0),
            Verdict::Wait(IDLE)
        );
        assert_eq!(
            pacer.decide(&p, busy_guest(5, 100), t0 + IDLE / 4),
            Verdict::Wait(IDLE * 3 / 4)
        );
        assert_eq!(
            pacer.decide(&p, busy_guest(5, 100), t0 + IDLE),
            Verdict::Run(WritebackState::IdleDrain)
        );
        assert_eq!(
            pacer.decide(&p, busy_guest(6, 90), t0 + IDLE * 2),
            Verdict::Wait(IDLE),
            "a new request stops an idle drain at the next kset"
        );
    }

    #[test]
    fn runs_flat_out_from_the_high_watermark_down_to_the_low_one() {
        let p = pacing();
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        let room_short = Verdict::Run(WritebackState::RoomShort);
        assert!(matches!(
            pacer.decide(&p, busy_guest(1, 790), t0),
            Verdict::Wait(_)
        ));
        // The guest stays busy throughout (a new request before every look).
        assert_eq!(pacer.decide(&p, busy_guest(2, 800), t0), room_short);
        assert_eq!(pacer.decide(&p, busy_guest(3, 700), t0), room_short);
        assert_eq!(pacer.decide(&p, busy_guest(4, 600), t0), room_short);
        assert!(matches!(
            pacer.decide(&p, busy_guest(5, 599), t0),
            Verdict::Wait(_)
        ));
        assert!(
            matches!(pacer.decide(&p, busy_guest(6, 700), t0), Verdict::Wait(_)),
            "rising again, it waits until the high watermark"
        );
    }

    #[test]
    fn a_write_waiting_for_room_or_few_free_segments_run_it_at_once() {
        let p = pacing();
        let t0 = Instant::now();
        let mut pacer = Pacer::new(t0);
        let room_short = Verdict::Run(WritebackState::RoomShort);
        let look = Look {
            busy: 1,
            ..busy_guest(1, 10)
        };
        assert_eq!(pacer.decide(&p, look, t0), room_short);
        assert!(
            matches!(pacer.decide(&p, look, t0), Verdict::Wait(_)),
            "no new wait for room and room enough: back to waiting"
        );
        let look = Look {
            free_low: true,
            ..busy_guest(2, 10)
        };
        assert_eq!(pacer.decide(&p, look, t0), room_short);
        let look = Look {
            busy: 2,
            ..busy_guest(3, 700)
        };
        assert_eq!(pacer.decide(&p, look, t0), room_short);
        assert_eq!(
            pacer.decide(&p, busy_guest(4, 650), t0),
            room_short,
            "once room was short, it runs down to the low watermark"
        );
        assert!(matches!(
            pacer.decide(&p, busy_guest(5, 590), t0),
            Verdict::Wait(_)
        ));
    }

    #[test]
    fn a_drain_runs_whatever_the_guest_does() {
        let p = pacing();
        let t0 = Instant::now();
        let look = Look {
            unpaced: true,
            ..busy_guest(1, 10)
        };
        assert_eq!(
            Pacer::new(t0).decide(&p, look, t0),
            Verdict::Run(WritebackState::Draining)
        );
    }

    #[test]
    fn crossing_the_high_watermark_wakes_a_waiting_writeback() {
        let p = pacing();
        p.dirty_added(700, 50);
        assert!(!*lock(&p.wake.0), "below the watermark: no wake");
        p.dirty_added(790, 20);
        assert!(*lock(&p.wake.0), "crossed: woken");
        // The wait consumes the wake-up and returns at once.
        p.wait(Duration::from_secs(3600));
        assert!(!*lock(&p.wake.0));
        p.dirty_added(810, 20);
        assert!(!*lock(&p.wake.0), "already above: no wake per write");
    }

    #[test]
    fn watermarks_are_checked() {
        let ok = PacingOptions::default();
        assert_eq!(ok.validate(), Ok(()));
        for (high, low) in [(50, 60), (101, 50), (50, 0)] {
            let bad = PacingOptions {
                high_watermark: high,
                low_watermark: low,
                ..ok
            };
            assert_eq!(bad.validate(), Err(PacingError::Watermarks { high, low }));
        }
    }
}
