// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Committing read fills off the request path.
//!
//! A read miss is read from the backing image into cache space, copied to the guest and
//! answered at once. Before its clean key may be logged the data must be durable. In pmem mode
//! this thread persists and fences a batch of fills itself (persist and fence must come from
//! one thread), then logs them; in msync mode it only logs them, since the log syncs the data
//! of a kset's keys before writing the kset. A fill that is lost here (shutdown, a failed fence) only means the data is not
//! cached.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::core::{Core, Filled};
use super::media::Persistence;
use crate::engine::ErrorChain;

/// Hand a fill to the fill thread, which makes it durable and logs it.
pub(super) fn submit(core: &Core, f: Filled) {
    if !core.background() {
        // Stepped tests: on the caller's thread, so the media events stay in one order.
        commit(core, vec![f], true);
        return;
    }
    let sent = core.fills.send(f);
    if let Err(std::sync::mpsc::SendError(f)) = sent {
        // The engine is shutting down: the data is just not cached.
        core.index.abort_fill(f.ticket);
        core.unpin(f.pos.seg);
    }
}

pub(super) fn spawn(core: Arc<Core>, fills: Receiver<Filled>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("pcache-fill".into())
        .spawn(move || run(&core, &fills))
        .expect("spawning the fill thread")
}

fn run(core: &Core, fills: &Receiver<Filled>) {
    let mut batch = Vec::new();
    loop {
        match fills.recv_timeout(Duration::from_millis(100)) {
            Ok(f) => batch.push(f),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        batch.extend(fills.try_iter());
        let stopping = core.stopping.load(Ordering::Acquire);
        if !batch.is_empty() {
            commit(core, std::mem::take(&mut batch), !stopping);
        }
        if stopping {
            break;
        }
    }
}

/// Persist a batch with one fence, then log each fill (or give it up). In msync mode the log
/// syncs the data of a kset's keys before it writes the kset, so nothing is synced here.
pub(super) fn commit(core: &Core, batch: Vec<Filled>, keep: bool) {
    let mut ok = keep;
    if keep && core.media.persistence() == Persistence::Pmem {
        for f in &batch {
            if let Err(e) = core.media.persist(core.media_offset(f.pos), f.len as u64) {
                log::warn!(
                    "persisting a read fill failed, not caching it: {}",
                    ErrorChain(&e)
                );
                ok = false;
            }
        }
        if let Err(e) = core.media.fence() {
            log::warn!(
                "cache media fence failed, not caching {} reads: {}",
                batch.len(),
                ErrorChain(&e)
            );
            ok = false;
        }
    }
    for f in batch {
        if ok {
            core.complete_fill(f.ticket, f.pos, f.len);
        } else {
            core.index.abort_fill(f.ticket);
        }
        core.unpin(f.pos.seg);
    }
}
