// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Summaries of a pass: JSON for scripts, text for people.

use crate::budget::EndedBy;
use crate::stats::{Op, OpStats, Stats};
use serde_json::{json, Value};
use std::fmt::Write as _;

const MIB: f64 = 1024.0 * 1024.0;

/// Percentiles of the latency distribution kept in the JSON summary.
const CDF_POINTS: [f64; 19] = [
    0.1, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.0, 99.0, 99.5,
    99.9, 99.99, 100.0,
];

pub struct PassReport {
    pub name: &'static str,
    pub stats: Stats,
    /// The bound that stopped the pass (runtime, io-limit, its block list done, a stall).
    pub ended_by: EndedBy,
    /// Blocks the verify passes were asked to cover, and covered.
    pub blocks_wanted: u64,
    pub blocks_done: u64,
}

fn op_json(op: &OpStats, elapsed: f64) -> Value {
    let count = op.latency.count();
    let us = |ns: u64| ns as f64 / 1000.0;
    json!({
        "ios": count,
        "errors": op.errors,
        "iops": count as f64 / elapsed,
        "mib_s": op.bytes as f64 / MIB / elapsed,
        "bytes": op.bytes,
        "lat_us": {
            "mean": op.latency.mean_ns() / 1000.0,
            "p50": us(op.latency.percentile_ns(50.0)),
            "p99": us(op.latency.percentile_ns(99.0)),
            "p99.9": us(op.latency.percentile_ns(99.9)),
            "max": us(op.latency.max_ns()),
        },
        // The latency distribution, for plots: [percent, µs] pairs.
        "lat_cdf_us": CDF_POINTS
            .iter()
            .map(|&p| json!([p, us(op.latency.percentile_ns(p))]))
            .collect::<Vec<_>>(),
    })
}

impl PassReport {
    fn elapsed(&self) -> f64 {
        self.stats.elapsed_secs.max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        let mut ops = serde_json::Map::new();
        for op in Op::ALL {
            ops.insert(
                op.name().into(),
                op_json(&self.stats.ops[op as usize], self.elapsed()),
            );
        }
        json!({
            "pass": self.name,
            "elapsed_s": self.stats.elapsed_secs,
            "ended_by": self.ended_by.name(),
            "ops": ops,
            "errors": self.stats.errors(),
            "lost": self.stats.lost,
            "verify_mismatches": self.stats.verify_mismatches,
            "blocks_wanted": self.blocks_wanted,
            "blocks_done": self.blocks_done,
            "messages": self.stats.samples,
            "timeline": {
                "step_s": crate::stats::TIMELINE_STEP_S,
                "ios": self.stats.timeline,
            },
        })
    }

    pub fn to_text(&self) -> String {
        let elapsed = self.elapsed();
        let mut text = format!(
            "{} pass: {:.2} s, ended by {}\n",
            self.name,
            self.stats.elapsed_secs,
            self.ended_by.name()
        );
        for op in Op::ALL {
            let stats = &self.stats.ops[op as usize];
            let count = stats.latency.count();
            if count == 0 && stats.errors == 0 {
                continue;
            }
            let us = |ns: u64| ns as f64 / 1000.0;
            let _ = writeln!(
                text,
                "  {:<5} {:>10.0} IOPS {:>9.1} MiB/s  lat us: mean {:.1} p50 {:.1} p99 {:.1} \
                 p99.9 {:.1} max {:.1}  ({} ios, {} errors)",
                op.name(),
                count as f64 / elapsed,
                stats.bytes as f64 / MIB / elapsed,
                stats.latency.mean_ns() / 1000.0,
                us(stats.latency.percentile_ns(50.0)),
                us(stats.latency.percentile_ns(99.0)),
                us(stats.latency.percentile_ns(99.9)),
                us(stats.latency.max_ns()),
                count,
                stats.errors,
            );
        }
        if self.blocks_wanted > 0 {
            let _ = writeln!(
                text,
                "  covered {} of {} blocks{}",
                self.blocks_done,
                self.blocks_wanted,
                if self.blocks_done < self.blocks_wanted {
                    " (runtime ran out)"
                } else {
                    ""
                }
            );
        }
        if self.stats.verify_mismatches > 0 {
            let _ = writeln!(
                text,
                "  VERIFY MISMATCHES: {}",
                self.stats.verify_mismatches
            );
        }
        if self.stats.lost > 0 {
            let _ = writeln!(text, "  LOST (never completed): {}", self.stats.lost);
        }
        for message in &self.stats.samples {
            let _ = writeln!(text, "  ! {message}");
        }
        text
    }
}
