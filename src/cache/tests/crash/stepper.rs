// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The stepper: the engine's queues driven one request at a time, with writeback and GC
//! stepped when the cache is full, so a run never depends on timing.

use std::sync::{Arc, Mutex};

use super::cut::CutCtx;
use super::report::{Phase, PhaseCell, Report};
use crate::backing::{BackingImage, BackingQueue};
use crate::cache::CacheEngine;
use crate::engine::{EngineQueue, IoResult, Request, RequestKind, Submit};
use crate::sync::lock;

/// Drives the engine's queues one request at a time, stepping writeback and GC when the cache
/// is full, so the run never depends on timing.
pub(super) struct Stepper<'a> {
    pub(super) engine: &'a CacheEngine,
    pub(super) backing: Arc<BackingImage>,
    pub(super) queues: Vec<Box<dyn EngineQueue>>,
    pub(super) wb: BackingQueue,
    pub(super) tag: u64,
    pub(super) report: Arc<Mutex<Report>>,
    pub(super) cuts: Arc<Mutex<CutCtx>>,
    pub(super) phase: PhaseCell,
    /// Writeback steps started, which number the backing-flush cuts.
    pub(super) wb_calls: u64,
}

impl<'a> Stepper<'a> {
    pub(super) fn run(&mut self, q: usize, kind: RequestKind) -> IoResult {
        self.tag += 1;
        let tag = self.tag;
        let is_read = matches!(kind, RequestKind::Read { .. });
        let mut req = Request { tag, kind };
        let mut stuck = 0;
        loop {
            match self.queues[q].submit(req) {
                Submit::Done(r) => return r,
                Submit::Pending => break,
                Submit::Busy(back) => {
                    req = back;
                    lock(&self.report).busy += 1;
                    stuck = self.make_room(stuck);
                }
            }
        }
        let mut done = Vec::new();
        loop {
            self.queues[q].reap(&mut done);
            if let Some(i) = done.iter().position(|(t, _)| *t == tag) {
                return done.swap_remove(i).1;
            }
            if is_read {
                // Waiting for backing reads only.
                std::thread::sleep(std::time::Duration::from_micros(50));
            } else {
                // A write-through write waits for log space.
                stuck = self.make_room(stuck);
            }
        }
    }

    /// Free cache space the way the background threads would. Returns the updated count of
    /// rounds without progress (and fails the test when nothing can move).
    fn make_room(&mut self, stuck: u32) -> u32 {
        // A failing backing image keeps the cache full; it recovers so the run can go on.
        self.backing.set_fail_writes(false);
        let core = self.engine.core();
        let _ = core.close_all_ksets();
        let wb = self.writeback(1);
        let gc = self.gc(1);
        if wb + gc > 0 {
            return 0;
        }
        assert!(
            stuck < 1000,
            "the cache is full and neither writeback nor GC can make progress"
        );
        stuck + 1
    }

    pub(super) fn writeback(&mut self, n: u64) -> u64 {
        let outer = self.phase.enter(Phase::Writeback);
        let moved = self.writeback_in_phase(n);
        self.phase.enter(outer);
        moved
    }

    fn writeback_in_phase(&mut self, n: u64) -> u64 {
        let mut moved = 0;
        for _ in 0..n {
            self.wb_calls += 1;
            lock(&self.cuts).plan_flush_cut(self.wb_calls);
            let r = self.engine.writeback_step(&mut self.wb);
            lock(&self.cuts).backing_before = None;
            let mut rep = lock(&self.report);
            match r {
                Ok(true) => {
                    rep.writeback_steps += 1;
                    moved += 1;
                }
                Ok(false) => break,
                Err(_) => {
                    rep.writeback_errors += 1;
                    break;
                }
            }
        }
        moved
    }

    /// What `CacheEngine::drain` does, with the writeback it waits for stepped here (there is
    /// no writeback thread); then the real `drain`, which finds nothing left to wait for.
    pub(super) fn drain(&mut self) {
        let outer = self.phase.enter(Phase::Drain);
        let core = self.engine.core().clone();
        let mut stuck = 0;
        while core.close_all_ksets().is_err() {
            stuck = self.make_room(stuck);
        }
        let target = core.log.head().seq;
        while core.meta.dirty_tail().log_seq < target {
            if self.writeback_in_phase(1) == 0 {
                // A failing backing image: the drain waits until it recovers.
                self.backing.set_fail_writes(false);
                stuck += 1;
                assert!(stuck < 1000, "drain: writeback makes no progress");
            }
        }
        self.engine.drain().expect("drain");
        lock(&self.report).drains += 1;
        self.phase.enter(outer);
    }

    pub(super) fn gc(&mut self, n: u64) -> u64 {
        let outer = self.phase.enter(Phase::Gc);
        let moved = self.gc_in_phase(n);
        self.phase.enter(outer);
        moved
    }

    fn gc_in_phase(&mut self, n: u64) -> u64 {
        let mut moved = 0;
        for _ in 0..n {
            match self.engine.gc_step() {
                Ok(true) => moved += 1,
                Ok(false) => break,
                Err(e) => panic!("GC failed: {e}"),
            }
        }
        lock(&self.report).gc_steps += moved;
        moved
    }
}
