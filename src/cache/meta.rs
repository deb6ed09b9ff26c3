// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The live copies of the cache's mutable metadata — cache_info (gc_percent), key_tail,
//! dirty_tail and segment generations — and their replicated, fenced updates on the media.
//!
//! Readers use the in-memory copies; each update is persisted first (the format layer writes
//! the replica that is not the newest, persists and fences) and only then made visible here,
//! so nothing ever acts on a value that a crash could take back.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::format::{self, CacheInfo, FormatError, Layout, Tail, TailPos};
use super::media::Media;
use super::segments::GenerationStore;
use crate::sync::lock;

pub struct Meta {
    media: Arc<dyn Media>,
    layout: Layout,
    info: Mutex<CacheInfo>,
    gc_percent: AtomicU8,
    key_tail: Mutex<TailPos>,
    dirty_tail: Mutex<TailPos>,
}

impl Meta {
    pub fn new(
        media: Arc<dyn Media>,
        layout: Layout,
        info: CacheInfo,
        key_tail: TailPos,
        dirty_tail: TailPos,
    ) -> Meta {
        Meta {
            media,
            layout,
            gc_percent: AtomicU8::new(info.gc_percent),
            info: Mutex::new(info),
            key_tail: Mutex::new(key_tail),
            dirty_tail: Mutex::new(dirty_tail),
        }
    }

    pub fn key_tail(&self) -> TailPos {
        *lock(&self.key_tail)
    }

    pub fn dirty_tail(&self) -> TailPos {
        *lock(&self.dirty_tail)
    }

    pub fn store_key_tail(&self, t: TailPos) -> Result<(), FormatError> {
        let mut cur = lock(&self.key_tail);
        format::store_tail(&*self.media, &self.layout, Tail::Key, &t)?;
        *cur = t;
        Ok(())
    }

    pub fn store_dirty_tail(&self, t: TailPos) -> Result<(), FormatError> {
        let mut cur = lock(&self.dirty_tail);
        format::store_tail(&*self.media, &self.layout, Tail::Dirty, &t)?;
        *cur = t;
        Ok(())
    }

    pub fn store_gen(&self, seg: u32, gen: u64) -> Result<(), FormatError> {
        format::store_generation(&*self.media, &self.layout, seg, gen)
    }

    pub fn gc_percent(&self) -> u8 {
        self.gc_percent.load(Ordering::Relaxed)
    }

    /// Change and persist the GC threshold (0..=90).
    pub fn set_gc_percent(&self, percent: u8) -> Result<(), FormatError> {
        if percent > format::MAX_GC_PERCENT {
            return Err(FormatError::InvalidArgument(format!(
                "gc_percent {percent} is above {}",
                format::MAX_GC_PERCENT
            )));
        }
        self.update_info(|i| i.gc_percent = percent)?;
        self.gc_percent.store(percent, Ordering::Relaxed);
        Ok(())
    }

    /// Record that the first start after format completed.
    pub fn set_init_done(&self) -> Result<(), FormatError> {
        self.update_info(|i| i.init_done = true)
    }

    fn update_info(&self, change: impl FnOnce(&mut CacheInfo)) -> Result<(), FormatError> {
        let mut info = lock(&self.info);
        let mut next = *info;
        change(&mut next);
        if next != *info {
            format::store(&*self.media, &self.layout.cache_info_slots(), &next)?;
            *info = next;
        }
        Ok(())
    }
}

impl GenerationStore for Meta {
    fn store_gen(&self, seg: u32, gen: u64) -> Result<(), FormatError> {
        Meta::store_gen(self, seg, gen)
    }
}
