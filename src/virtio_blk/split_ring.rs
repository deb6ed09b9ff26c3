// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Split virtqueue access (virtio 1.x, "Split Virtqueues") through host addresses.
//!
//! The descriptor table, available ring and used ring do not move while a ring runs, so their
//! host addresses are found once per guest memory snapshot instead of once per access: reading
//! a descriptor is a 16-byte load, not a region lookup plus a bounds-checked copy. The walk
//! follows `NEXT` and `INDIRECT` as virtio-queue's chain iterator does and ends a malformed
//! chain where it stops making sense (a loop runs into the queue-size bound, an index or a
//! table out of range ends it), so the request decoder sees the same prefix it saw before.
//!
//! Used elements are written one by one and published with one store of the used index per
//! batch (Release: the elements are visible before the index that covers them). The caller
//! keeps virtio-queue's `Queue` indexes in step (`set_next_avail`, `set_next_used`) under the
//! vring lock, so the frontend's GET_VRING_BASE sees exact positions.
//!
//! Every raw access is bounded by the ring's size, checked against the one memory region each
//! part lies in when the ring is mapped; the mapping stays alive as long as the snapshot this
//! value owns.

use std::ops::Deref;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_LEN: u64 = 16;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const USED_ELEM_LEN: u64 = 8;

/// One descriptor of a chain, as the request decoder needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// Where a ring lies in guest memory (the vring's `Queue` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub size: u16,
}

/// Why a ring cannot be used. virtio-queue refuses the same rings (`Queue::is_valid`), except
/// that a part split across two memory regions is refused here too (no frontend places one so).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("queue size {0} is not a power of two up to 32768")]
    Size(u16),
    #[error("the {part} at {addr:#x} ({len} bytes) is not inside one guest memory region")]
    NotMapped {
        part: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("the {part} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        part: &'static str,
        addr: u64,
        align: u64,
    },
}

/// A split ring's host addresses in one guest memory snapshot `M`, which it owns.
pub struct SplitRing<M> {
    mem: M,
    addrs: RingAddrs,
    desc: usize,
    avail: usize,
    used: usize,
}

/// The host address of `addr` and how many bytes from it its region holds.
fn host_prefix<G: GuestMemoryBackend>(mem: &G, addr: u64) -> Option<(usize, u64)> {
    let (region, offset) = mem.to_region_addr(GuestAddress(addr))?;
    let host = region.get_host_address(offset).ok()?;
    Some((host as usize, region.len() - offset.0))
}

/// The host address of `len` bytes at `addr` if one region of `mem` holds them all.
fn host_range<G: GuestMemoryBackend>(mem: &G, addr: u64, len: u64) -> Option<usize> {
    host_prefix(mem, addr).and_then(|(host, room)| (room >= len).then_some(host))
}

impl<M, G> SplitRing<M>
where
    M: Deref<Target = G>,
    G: GuestMemoryBackend,
{
    /// Maps the ring `addrs` in `mem`.
    pub fn new(mem: M, addrs: RingAddrs) -> Result<Self, RingError> {
        let n = u64::from(addrs.size);
        if n == 0 || !n.is_power_of_two() || n > 32768 {
            return Err(RingError::Size(addrs.size));
        }
        let part = |part: &'static str, addr: u64, len: u64, align: u64| {
            if addr % align != 0 {
                return Err(RingError::Misaligned { part, addr, align });
            }
            host_range(mem.deref(), addr, len).ok_or(RingError::NotMapped { part, addr, len })
        };
        let desc = part("descriptor table", addrs.desc_table, DESC_LEN * n, 16)?;
        // flags, idx, ring[n], used_event
        let avail = part("available ring", addrs.avail_ring, 6 + 2 * n, 2)?;
        // flags, idx, ring[n], avail_event
        let used = part("used ring", addrs.used_ring, 6 + USED_ELEM_LEN * n, 4)?;
        Ok(SplitRing {
            mem,
            addrs,
            desc,
            avail,
            used,
        })
    }

    /// The guest memory snapshot the ring was mapped in.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    fn avail_u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(offset + 2 <= 6 + 2 * usize::from(self.addrs.size));
        // SAFETY: `offset` is inside the available ring (callers pass 2 (idx), 4 + 2 * slot
        // with slot < size, or 4 + 2 * size), which `new` found inside one region of the
        // snapshot `self.mem` keeps mapped; the ring is 2-aligned, so is the field. The guest
        // writes it concurrently, hence an atomic.
        unsafe { AtomicU16::from_ptr((self.avail + offset) as *mut u16) }
    }

    fn used_u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(offset + 2 <= 6 + USED_ELEM_LEN as usize * usize::from(self.addrs.size));
        // SAFETY: as in `avail_u16`, for the used ring (4-aligned, checked by `new`).
        unsafe { AtomicU16::from_ptr((self.used + offset) as *mut u16) }
    }

    fn slot(&self, idx: u16) -> usize {
        usize::from(idx & (self.addrs.size - 1))
    }

    /// The driver's available index (Acquire: the entries and descriptors it covers are
    /// visible after it).
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.avail_u16(2).load(Ordering::Acquire))
    }

    /// The head the available ring holds at (free-running) index `idx`.
    pub fn avail_head(&self, idx: u16) -> u16 {
        u16::from_le(
            self.avail_u16(4 + 2 * self.slot(idx))
                .load(Ordering::Relaxed),
        )
    }

    /// The used index as guest memory holds it.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.used_u16(2).load(Ordering::Acquire))
    }

    /// The head of the used element at (free-running) index `idx`.
    pub fn used_head(&self, idx: u16) -> u16 {
        let at = self.used + 4 + USED_ELEM_LEN as usize * self.slot(idx);
        // SAFETY: the element is inside the used ring (slot < size), mapped as in `used_u16`;
        // 4-aligned; volatile because the guest shares the page.
        let id = unsafe { (at as *const u32).read_volatile() };
        u32::from_le(id) as u16
    }

    /// Walks the chain starting at `head` into `out` (cleared first). A malformed chain ends
    /// where it goes wrong: a head or next index beyond its table, a chain longer than its
    /// table (a loop), a descriptor of an indirect table outside guest memory (or past the
    /// region the table starts in), an indirect table not a multiple of 16 bytes or inside
    /// another, or more than 4 GiB in all.
    pub fn chain(&self, head: u16, out: &mut Vec<Desc>) {
        out.clear();
        let mut table = self.desc;
        let mut entries = u32::from(self.addrs.size);
        // Entries that lie inside the table's memory region (all of the ring's own table).
        let mut mapped = entries;
        let mut ttl = entries;
        let mut next = u32::from(head);
        let mut indirect = false;
        let mut bytes: u32 = 0;
        while ttl > 0 && next < entries && next < mapped {
            let at = table + DESC_LEN as usize * next as usize;
            // SAFETY: the table's first `mapped * 16` bytes lie inside one mapped region
            // (checked by `new` for the ring's table, below for an indirect one) and `next <
            // mapped`; a byte array has no alignment to keep (indirect tables need not be).
            let raw = unsafe { (at as *const [u8; 16]).read_volatile() };
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
            if flags & DESC_F_INDIRECT != 0 {
                if indirect || len % DESC_LEN as u32 != 0 {
                    return;
                }
                let n = len / DESC_LEN as u32;
                if n > u32::from(u16::MAX) {
                    return;
                }
                let Some((host, room)) = host_prefix(self.mem.deref(), addr) else {
                    return;
                };
                let in_region = u32::try_from(room / DESC_LEN).unwrap_or(u32::MAX);
                (table, entries, ttl, next, indirect) = (host, n, n, 0, true);
                mapped = n.min(in_region);
                continue;
            }
            let Some(total) = bytes.checked_add(len) else {
                return;
            };
            bytes = total;
            out.push(Desc {
                addr: GuestAddress(addr),
                len,
                write_only: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return;
            }
            next = u32::from(u16::from_le_bytes(raw[14..16].try_into().unwrap()));
            ttl -= 1;
        }
    }

    /// Writes a used element at (free-running) index `idx`; the guest sees it once
    /// [`publish_used`](Self::publish_used) stores an index past it.
    pub fn put_used(&self, idx: u16, head: u16, len: u32) {
        let at = self.used + 4 + USED_ELEM_LEN as usize * self.slot(idx);
        // SAFETY: the element (8 bytes at slot < size) is inside the used ring, mapped and
        // 4-aligned as `new` checked; the guest does not read it before the index covers it.
        unsafe {
            (at as *mut u32).write_volatile(u32::from(head).to_le());
            ((at + 4) as *mut u32).write_volatile(len.to_le());
        }
    }

    /// Makes the used elements before `used_idx` visible to the guest, and marks the used ring
    /// in the dirty log.
    pub fn publish_used(&self, used_idx: u16) {
        self.used_u16(2).store(used_idx.to_le(), Ordering::Release);
        self.mark_used_dirty();
    }

    /// Marks the used ring in the dirty log, after writing it (as vm-memory does: a page
    /// copied between the write and the mark is copied again).
    fn mark_used_dirty(&self) {
        if let Some((region, offset)) = self.mem.to_region_addr(GuestAddress(self.addrs.used_ring))
        {
            let len = 6 + USED_ELEM_LEN as usize * usize::from(self.addrs.size);
            region.bitmap().mark_dirty(offset.0 as usize, len);
        }
    }

    /// Stores `value` in the used ring's field at `offset` unless it holds it already.
    fn set_used_field(&self, offset: usize, value: u16) {
        let field = self.used_u16(offset);
        if field.load(Ordering::Relaxed) != value.to_le() {
            field.store(value.to_le(), Ordering::Relaxed);
            self.mark_used_dirty();
        }
    }

    /// Asks the driver not to kick: without EVENT_IDX through the used ring's NO_NOTIFY flag;
    /// with it nothing is needed (the driver kicks once when it passes avail_event, which
    /// stays where it was last enabled).
    pub fn disable_notification(&self, event_idx: bool) {
        if !event_idx {
            self.set_used_field(0, VRING_USED_F_NO_NOTIFY);
        }
    }

    /// Asks the driver to kick for the chain at `next_avail` (avail_event with EVENT_IDX, the
    /// flag cleared without), then returns whether chains arrived meanwhile: those sent no kick.
    /// The full fence keeps the check from being ordered before the store (virtio-queue's
    /// `enable_notification` does the same).
    pub fn enable_notification(&self, next_avail: u16, event_idx: bool) -> bool {
        if event_idx {
            self.set_used_field(
                4 + USED_ELEM_LEN as usize * usize::from(self.addrs.size),
                next_avail,
            );
        } else {
            self.set_used_field(0, 0);
        }
        fence(Ordering::SeqCst);
        u16::from_le(self.avail_u16(2).load(Ordering::Relaxed)) != next_avail
    }

    /// Whether the guest wants an interrupt for the elements published from `old` up to
    /// `new`: always without EVENT_IDX, otherwise if its used_event lies in that span. The
    /// used_event is read after the used index store is globally visible (a full fence), or a
    /// driver updating it meanwhile could miss both the new elements and the interrupt.
    pub fn needs_notification(&self, old: u16, new: u16, event_idx: bool) -> bool {
        if !event_idx {
            return true;
        }
        fence(Ordering::SeqCst);
        let used_event = u16::from_le(
            self.avail_u16(4 + 2 * usize::from(self.addrs.size))
                .load(Ordering::Relaxed),
        );
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}
