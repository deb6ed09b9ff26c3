// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a run did and found, and the phase of the workload each cut fell into.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// What the workload was doing when a cut happened; a run counts its cuts by phase, so a
/// campaign shows it crashed inside each operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Write,
    Zeroes,
    Flush,
    Read,
    /// `set_write_cache`, which persists open ksets when the cache goes off.
    WriteCacheSwitch,
    /// Writeback's media updates (dirty_tail).
    Writeback,
    /// Inside writeback's backing flush: its writes issued, the flush not yet done.
    BackingFlush,
    Gc,
    /// `drain`: closing the open ksets, then writeback until dirty_tail reaches the head.
    Drain,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Write,
        Phase::Zeroes,
        Phase::Flush,
        Phase::Read,
        Phase::WriteCacheSwitch,
        Phase::Writeback,
        Phase::BackingFlush,
        Phase::Gc,
        Phase::Drain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Write => "write",
            Phase::Zeroes => "zeroes",
            Phase::Flush => "flush",
            Phase::Read => "read",
            Phase::WriteCacheSwitch => "write-cache switch",
            Phase::Writeback => "writeback",
            Phase::BackingFlush => "writeback backing flush",
            Phase::Gc => "GC",
            Phase::Drain => "drain",
        }
    }
}

/// The phase the workload is in, shared with the cut hooks.
#[derive(Clone, Default)]
pub(super) struct PhaseCell(Arc<AtomicU8>);

impl PhaseCell {
    pub(super) fn get(&self) -> Phase {
        Phase::ALL[self.0.load(Ordering::Relaxed) as usize]
    }

    /// Enter `phase`; returns the phase to go back to.
    pub(super) fn enter(&self, phase: Phase) -> Phase {
        Phase::ALL[self.0.swap(phase as u8, Ordering::Relaxed) as usize]
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub events: u64,
    pub cuts: u64,
    pub images: u64,
    /// Images whose cut had non-durable lines to choose from.
    pub images_with_pending: u64,
    pub violations: Vec<String>,
    pub ops: u64,
    pub busy: u64,
    pub writeback_steps: u64,
    pub writeback_errors: u64,
    pub gc_steps: u64,
    pub flushes: u64,
    pub drains: u64,
    /// Cuts per [`Phase`] (indexed by `Phase as usize`).
    pub cuts_by_phase: [u64; Phase::ALL.len()],
}

impl Report {
    /// Add another run's counts to these.
    pub fn add(&mut self, r: &Report) {
        self.events += r.events;
        self.cuts += r.cuts;
        self.images += r.images;
        self.images_with_pending += r.images_with_pending;
        self.violations.extend(r.violations.iter().cloned());
        self.ops += r.ops;
        self.busy += r.busy;
        self.writeback_steps += r.writeback_steps;
        self.writeback_errors += r.writeback_errors;
        self.gc_steps += r.gc_steps;
        self.flushes += r.flushes;
        self.drains += r.drains;
        for (a, b) in self.cuts_by_phase.iter_mut().zip(r.cuts_by_phase) {
            *a += b;
        }
    }

    /// Cuts per phase, as `name N, ...`.
    pub fn phases(&self) -> String {
        Phase::ALL
            .iter()
            .map(|p| format!("{} {}", p.name(), self.cuts_by_phase[*p as usize]))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
