// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engines as the control socket sees them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{ControlTarget, EngineStatus, TargetError};
use crate::backing::BackingImage;
use crate::cache::CacheEngine;
use crate::engine::Engine;

/// The pmem cache engine.
pub struct CacheControl(pub Arc<CacheEngine>);

impl ControlTarget for CacheControl {
    fn status(&self) -> EngineStatus {
        let cache = self.0.status();
        EngineStatus {
            engine: "pcache".into(),
            capacity_bytes: self.0.capacity(),
            read_only: self.0.read_only(),
            write_cache: cache.flags.write_cache,
            drained: cache.flags.drained,
            cache: Some(cache),
        }
    }

    fn set_gc_percent(&self, percent: u8) -> Result<(), TargetError> {
        self.0.set_gc_percent(percent).map_err(TargetError::from)
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.0.flush_log().map_err(TargetError::from)
    }

    fn drain(&self) -> Result<(), TargetError> {
        self.0.drain_and_hold().map_err(TargetError::from)
    }

    fn undrain(&self) -> Result<(), TargetError> {
        self.0.leave_drained();
        Ok(())
    }
}

/// `--cache none`: nothing is cached in the daemon, so flush and drain both come down to
/// flushing the backing image; drained mode is only recorded.
pub struct PassthroughControl {
    engine: Arc<dyn Engine>,
    image: Arc<BackingImage>,
    drained: AtomicBool,
}

impl PassthroughControl {
    pub fn new(engine: Arc<dyn Engine>, image: Arc<BackingImage>) -> PassthroughControl {
        PassthroughControl {
            engine,
            image,
            drained: AtomicBool::new(false),
        }
    }

    fn flush_image(&self) -> Result<(), TargetError> {
        if self.image.read_only() {
            return Ok(());
        }
        self.image.flush().map_err(TargetError::FlushImage)
    }
}

impl ControlTarget for PassthroughControl {
    fn status(&self) -> EngineStatus {
        EngineStatus {
            engine: "none".into(),
            capacity_bytes: self.engine.capacity(),
            read_only: self.engine.read_only(),
            write_cache: self.engine.write_cache(),
            drained: self.drained.load(Ordering::Acquire),
            cache: None,
        }
    }

    fn set_gc_percent(&self, _percent: u8) -> Result<(), TargetError> {
        Err(TargetError::NoCache)
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.flush_image()
    }

    fn drain(&self) -> Result<(), TargetError> {
        self.flush_image()?;
        self.drained.store(true, Ordering::Release);
        Ok(())
    }

    fn undrain(&self) -> Result<(), TargetError> {
        self.drained.store(false, Ordering::Release);
        Ok(())
    }
}
