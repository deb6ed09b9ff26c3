// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The volume bound of a pass (`--io-limit`) and what ended a pass.
//!
//! A write case of a benchmark must not write more than the cache holds (a log-structured cache
//! takes new space for every write), so the runtime alone cannot bound it: at a fast target the
//! same seconds write several times more. The queues of a pass share one budget of bytes; a
//! queue takes a request's bytes from it before submitting the request and stops submitting
//! when the budget cannot pay for one more, so a pass transfers at most the limit over all its
//! queues, whichever queue is faster.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes a pass may still transfer; unlimited without `--io-limit`.
pub struct IoBudget {
    remaining: Option<AtomicU64>,
}

impl IoBudget {
    pub fn new(limit: Option<u64>) -> Self {
        Self {
            remaining: limit.map(AtomicU64::new),
        }
    }

    /// Takes `bytes` from the budget; false (and nothing taken) when fewer are left.
    pub fn take(&self, bytes: u64) -> bool {
        match &self.remaining {
            None => true,
            Some(remaining) => remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(bytes)
                })
                .is_ok(),
        }
    }
}

/// Why a queue (and so a pass) stopped submitting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndedBy {
    /// Every block of the pass's list was visited (verify passes).
    Done,
    /// `--io-limit` bytes were transferred.
    IoLimit,
    /// `--runtime` ran out first.
    Runtime,
    /// Requests got no answer for `--stall-timeout`.
    Stall,
}

impl EndedBy {
    pub fn name(self) -> &'static str {
        match self {
            EndedBy::Done => "done",
            EndedBy::IoLimit => "io-limit",
            EndedBy::Runtime => "runtime",
            EndedBy::Stall => "stall",
        }
    }

    /// What ended a pass whose queues ended for `self` and `other`: the weaker bound wins, so
    /// a pass reads "io-limit" only when no queue ran out of time (or stalled) before the
    /// budget was spent.
    pub fn merge(self, other: EndedBy) -> EndedBy {
        self.max(other)
    }
}

pub fn self_check() -> Result<(), String> {
    let unlimited = IoBudget::new(None);
    if !(0..1000).all(|_| unlimited.take(1 << 30)) {
        return Err("an unlimited budget refused a request".into());
    }
    // 10 requests of 4 KiB and a rest that pays for none.
    let budget = IoBudget::new(Some(10 * 4096 + 100));
    let taken = (0..20).filter(|_| budget.take(4096)).count();
    if taken != 10 {
        return Err(format!("a budget for 10 requests paid for {taken}"));
    }
    if budget.take(4096) || !budget.take(100) || budget.take(1) {
        return Err("a spent budget did not hold exactly its rest".into());
    }
    // Shared by several queue threads: together they transfer exactly the limit.
    let limit = 1000 * 4096;
    let shared = IoBudget::new(Some(limit));
    let per_thread: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut bytes = 0;
                    while shared.take(4096) {
                        bytes += 4096;
                    }
                    bytes
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let total: u64 = per_thread.iter().sum();
    if total != limit {
        return Err(format!(
            "4 queues sharing a budget of {limit} bytes took {total} ({per_thread:?})"
        ));
    }
    use EndedBy::*;
    for (a, b, expected) in [
        (IoLimit, IoLimit, IoLimit),
        (IoLimit, Runtime, Runtime),
        (Runtime, IoLimit, Runtime),
        (Done, IoLimit, IoLimit),
        (Done, Done, Done),
        (Stall, Runtime, Stall),
    ] {
        if a.merge(b) != expected {
            return Err(format!("{a:?} and {b:?} merged to {:?}", a.merge(b)));
        }
    }
    Ok(())
}
