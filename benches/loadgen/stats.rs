// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Counters a queue thread keeps, merged into the run's summary.

use crate::histogram::Histogram;

/// At most this many error messages are kept per queue; the counters stay exact.
const SAMPLES_KEPT: usize = 8;

/// Width of one interval of the completion timeline, in seconds.
pub const TIMELINE_STEP_S: f64 = 0.25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Read, Op::Write, Op::Flush];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct OpStats {
    /// Latency of requests that succeeded.
    pub latency: Histogram,
    pub bytes: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops: [OpStats; 3],
    /// Requests still in flight when the backend stopped answering.
    pub lost: u64,
    pub verify_mismatches: u64,
    pub samples: Vec<String>,
    pub elapsed_secs: f64,
    /// Reads and writes completed in each [`TIMELINE_STEP_S`] interval from the start, for
    /// plots of throughput over time (a burst into the cache, then writeback).
    pub timeline: Vec<u64>,
}

impl Stats {
    pub fn op(&mut self, op: Op) -> &mut OpStats {
        &mut self.ops[op as usize]
    }

    /// Count one completed read or write `elapsed_s` after the start.
    pub fn tick(&mut self, elapsed_s: f64) {
        let at = (elapsed_s / TIMELINE_STEP_S) as usize;
        if self.timeline.len() <= at {
            self.timeline.resize(at + 1, 0);
        }
        self.timeline[at] += 1;
    }

    pub fn sample(&mut self, message: String) {
        if self.samples.len() < SAMPLES_KEPT {
            self.samples.push(message);
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            mine.latency.merge(&theirs.latency);
            mine.bytes += theirs.bytes;
            mine.errors += theirs.errors;
        }
        self.lost += other.lost;
        self.verify_mismatches += other.verify_mismatches;
        for message in &other.samples {
            self.sample(message.clone());
        }
        self.elapsed_secs = self.elapsed_secs.max(other.elapsed_secs);
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize(other.timeline.len(), 0);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            *mine += theirs;
        }
    }

    pub fn errors(&self) -> u64 {
        self.ops.iter().map(|op| op.errors).sum::<u64>() + self.lost
    }
}
