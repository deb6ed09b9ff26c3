// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Descriptor chains rebuilt from their head indices, for resubmitting what a previous backend
//! left in flight. virtio-queue builds chains only by popping an available ring, and the
//! guest's ring slots of those requests may have been reused since; so the chains are popped
//! from a private available ring holding exactly those heads, placed in a memory region of
//! this process added above guest memory. The chains walk the guest's own descriptor table
//! (indirect tables included) and point into guest memory as usual.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion};

use super::queue_worker::GuestMem;

const PAGE: u64 = 4096;

/// Why the chains left in flight could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum ResubmitError {
    #[error("no address space above guest memory for the private ring")]
    NoAddressSpace,
    #[error("cannot map the private ring")]
    Map(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot write the private ring")]
    Write(#[source] vm_memory::GuestMemoryError),
    #[error("cannot set up the private queue")]
    Queue(#[source] virtio_queue::Error),
    #[error("descriptor chain {0} cannot be read")]
    Chain(u16),
}

/// The guest memory plus the private ring, and one chain per head, in `heads` order.
#[allow(clippy::type_complexity)]
pub fn chains_for_heads(
    guest: &Arc<GuestMem>,
    desc_table: u64,
    queue_size: u16,
    heads: &[u16],
) -> Result<(Arc<GuestMem>, Vec<DescriptorChain<Arc<GuestMem>>>), ResubmitError> {
    let n = u64::from(queue_size);
    let avail_len = 6 + 2 * n;
    let used_offset = avail_len.div_ceil(4) * 4;
    let len = (used_offset + 6 + 8 * n).div_ceil(PAGE) * PAGE;
    let end = guest.last_addr().raw_value();
    let base = GuestAddress(end.checked_add(1).ok_or(ResubmitError::NoAddressSpace)?)
        .raw_value()
        .div_ceil(PAGE)
        * PAGE;
    let region = MmapRegion::new(len as usize).map_err(|e| ResubmitError::Map(Box::new(e)))?;
    let region =
        GuestRegionMmap::new(region, GuestAddress(base)).ok_or(ResubmitError::NoAddressSpace)?;
    let shadow = Arc::new(
        guest
            .insert_region(Arc::new(region))
            .map_err(|e| ResubmitError::Map(Box::new(e)))?,
    );

    let avail = GuestAddress(base);
    let write = |value: u16, at: u64| {
        shadow
            .write_obj(value.to_le(), avail.unchecked_add(at))
            .map_err(ResubmitError::Write)
    };
    write(0, 0)?;
    write(heads.len() as u16, 2)?;
    for (i, &head) in heads.iter().enumerate() {
        write(head, 4 + 2 * i as u64)?;
    }

    let mut queue = Queue::new(queue_size).map_err(ResubmitError::Queue)?;
    queue.set_size(queue_size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc_table);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(base);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(base + used_offset);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    let mut chains = Vec::with_capacity(heads.len());
    for &head in heads {
        let chain = queue
            .pop_descriptor_chain(shadow.clone())
            .ok_or(ResubmitError::Chain(head))?;
        chains.push(chain);
    }
    Ok((shadow, chains))
}
