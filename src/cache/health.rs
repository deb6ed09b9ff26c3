// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What went wrong in the background and cannot be undone: dirty data writeback had to give
//! up on, and a writeback that cannot go on. Reported by `status`, metrics and the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::sync::lock;
use serde::{Deserialize, Serialize};

/// Extents logged one by one before the log only counts them.
const LOGGED_LOSSES: u64 = 32;

#[derive(Debug, Default)]
pub struct Health {
    lost_extents: AtomicU64,
    lost_bytes: AtomicU64,
    /// Why writeback cannot move dirty_tail, while that lasts.
    writeback_stalled: Mutex<Option<String>>,
}

/// A copy of [`Health`] for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthStatus {
    /// Dirty extents whose cached data failed its CRC while still the newest version: they
    /// were not written back, so the backing image keeps the data from before those writes.
    pub lost_extents: u64,
    pub lost_bytes: u64,
    /// Set while writeback cannot proceed (an undecodable kset at dirty_tail): the reason.
    pub writeback_stalled: Option<String>,
}

impl Health {
    /// A live dirty extent could not be read back intact and was given up.
    pub fn lost(&self, off: u64, len: u32, live: u64, seg: u32) {
        let n = self.lost_extents.fetch_add(1, Ordering::Relaxed);
        self.lost_bytes.fetch_add(live, Ordering::Relaxed);
        if n < LOGGED_LOSSES {
            log::error!(
                "data lost: dirty extent at backing bytes {off}..{} fails its CRC in cache segment {seg}; {live} bytes of it were still the newest data and are not written back (the image keeps the older data there){}",
                off + u64::from(len),
                if n + 1 == LOGGED_LOSSES {
                    "; further losses are only counted (status: lost_extents)"
                } else {
                    ""
                }
            );
        }
    }

    /// Writeback met a problem it cannot get past by retrying; logged on the first report.
    pub fn writeback_stalled(&self, why: &str) {
        let mut s = lock(&self.writeback_stalled);
        if s.is_none() {
            log::error!("ALARM: writeback stopped: {why}. The cache keeps serving, but no dirty data reaches the backing image and the cache will fill; stop the daemon and run `check`.");
        }
        *s = Some(why.to_string());
    }

    /// Writeback moved again.
    pub fn writeback_moving(&self) {
        if lock(&self.writeback_stalled).take().is_some() {
            log::info!("writeback is moving again");
        }
    }

    pub fn status(&self) -> HealthStatus {
        HealthStatus {
            lost_extents: self.lost_extents.load(Ordering::Relaxed),
            lost_bytes: self.lost_bytes.load(Ordering::Relaxed),
            writeback_stalled: lock(&self.writeback_stalled).clone(),
        }
    }
}
