// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Inflight I/O tracking for split virtqueues (vhost-user `INFLIGHT_SHMFD`): a shared memory
//! area, kept by the frontend across backend restarts, that records which descriptor chains the
//! backend has popped and not yet completed. A backend that crashed is replaced by one that
//! resubmits exactly those, oldest first, and continues the ring where nothing is skipped or
//! repeated.
//!
//! Layout per queue (the vhost-user specification's split-ring format, one region per queue,
//! each region 64-byte aligned):
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num × { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! A chain is marked on pop (`counter`, then `inflight = 1`). Completion publishes a batch of
//! used elements and the used index, then clears the batch's `inflight` marks and copies the
//! used index. A crash between publishing and clearing leaves `used_idx` behind the ring's used
//! index: the used ring's elements between the two name the batch, whose marks recovery clears
//! (the specification's procedure). A crash before the used index store leaves both equal and
//! every chain of the batch marked: the guest saw none of them complete, so all are resubmitted.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
const REGION_ALIGN: usize = 64;
/// The version a backend writes into a fresh area once it has taken it over.
const VERSION: u16 = 1;

const VERSION_OFFSET: usize = 8;
const DESC_NUM_OFFSET: usize = 10;
const LAST_BATCH_HEAD_OFFSET: usize = 12;
const USED_IDX_OFFSET: usize = 14;

/// Bytes one queue's region takes for a queue of `queue_size` entries.
pub fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// One frontend's inflight area, mapped shared.
pub struct InflightArea {
    map: MmapMut,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightArea {
    /// A new zeroed area in a memfd, for GET_INFLIGHT_FD: returns the area's file and length.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight area for {num_queues} queues of {queue_size} entries"),
            ));
        }
        let len = queue_region_len(queue_size) * usize::from(num_queues);
        let name = c"vhost-user-pcache-inflight";
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let area = InflightArea::map(&file, 0, len as u64, num_queues, queue_size)?;
        for q in 0..num_queues {
            area.queue(q)
                .expect("queue inside the area")
                .store_u16(DESC_NUM_OFFSET, queue_size);
        }
        Ok((file, len as u64))
    }

    /// Maps an area the frontend handed over (SET_INFLIGHT_FD).
    pub fn map(
        file: &File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightArea> {
        let needed = queue_region_len(queue_size) as u64 * u64::from(num_queues);
        if num_queues == 0 || queue_size == 0 || len < needed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "inflight area of {len} bytes for {num_queues} queues of {queue_size} \
                     entries (needs {needed})"
                ),
            ));
        }
        // SAFETY: the mapping is shared with the frontend, which does not touch it while the
        // backend runs (it only keeps it); every access goes through atomics, so a concurrent
        // change would be a wrong value, never undefined behaviour in this process.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len as usize)
                .map_mut(file)?
        };
        Ok(InflightArea {
            map,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue(&self, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            base: self.map.as_ptr() as usize
                + usize::from(index) * queue_region_len(self.queue_size),
            desc_num: self.queue_size,
            _area: None,
        })
    }

    /// Queue `index`'s part of the area, keeping the area mapped as long as it is used.
    pub fn queue_view(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        self.queue(index).map(|mut q| {
            q._area = Some(self.clone());
            q
        })
    }
}

/// What recovery found in a queue's region.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Heads of the chains in flight, oldest (lowest counter) first.
    pub heads: Vec<u16>,
    /// Where the ring continues: the used index plus the number in flight.
    pub next_avail: u16,
    /// The counter for the next chain popped.
    pub next_counter: u64,
}

/// One queue's region.
pub struct QueueInflight {
    base: usize,
    desc_num: u16,
    _area: Option<Arc<InflightArea>>,
}

impl QueueInflight {
    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: `offset` is a 2-aligned offset inside this queue's region (header fields or
        // a descriptor's fields), which stays mapped while `_area` (or the caller's area) lives.
        unsafe { &*((self.base + offset) as *const AtomicU16) }
    }

    fn store_u16(&self, offset: usize, v: u16) {
        self.u16_at(offset).store(v, Ordering::Release);
    }

    fn load_u16(&self, offset: usize) -> u16 {
        self.u16_at(offset).load(Ordering::Acquire)
    }

    fn desc_flag(&self, head: u16) -> &AtomicU8 {
        let offset = HEADER_LEN + DESC_LEN * usize::from(head);
        // SAFETY: `head < desc_num` (checked by callers), so the byte is inside the region.
        unsafe { &*((self.base + offset) as *const AtomicU8) }
    }

    fn desc_counter(&self, head: u16) -> &AtomicU64 {
        let offset = HEADER_LEN + DESC_LEN * usize::from(head) + 8;
        // SAFETY: as in `desc_flag`; the counter is 8-aligned (regions are 64-aligned in a
        // page-aligned mapping, descriptors 16 bytes).
        unsafe { &*((self.base + offset) as *const AtomicU64) }
    }

    /// Records that chain `head` was popped, as the `counter`-th of this queue.
    pub fn popped(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        self.desc_counter(head).store(counter, Ordering::Release);
        fence(Ordering::SeqCst);
        self.desc_flag(head).store(1, Ordering::Release);
    }

    /// Call after the used ring's index became `used_idx` with the batch `heads` in it (the
    /// elements just before `used_idx`).
    pub fn completed(&self, heads: impl Iterator<Item = u16>, used_idx: u16) {
        fence(Ordering::SeqCst);
        for head in heads {
            if head < self.desc_num {
                self.desc_flag(head).store(0, Ordering::Release);
            }
        }
        fence(Ordering::SeqCst);
        self.store_u16(USED_IDX_OFFSET, used_idx);
    }

    /// Takes over the region for a ring whose used index (in guest memory) is `ring_used_idx`
    /// and whose used element at a (free-running) index holds the head `used_head(index)`.
    /// A fresh region is stamped and yields nothing to resubmit; otherwise the chains still
    /// marked are returned oldest first.
    pub fn recover(&self, ring_used_idx: u16, used_head: impl Fn(u16) -> u16) -> Recovered {
        if self.load_u16(VERSION_OFFSET) == 0 {
            self.store_u16(VERSION_OFFSET, VERSION);
            self.store_u16(USED_IDX_OFFSET, ring_used_idx);
            return Recovered {
                heads: Vec::new(),
                next_avail: ring_used_idx,
                next_counter: 0,
            };
        }
        let recorded = self.load_u16(USED_IDX_OFFSET);
        if recorded != ring_used_idx {
            // Died between publishing a batch of used elements and clearing their marks: the
            // batch is the used ring's elements from the recorded index on (no more than a
            // ring's worth). `last_batch_head` is cleared too, for an area a backend that
            // published one element at a time left.
            let batch = ring_used_idx.wrapping_sub(recorded).min(self.desc_num);
            for i in 0..batch {
                let head = used_head(recorded.wrapping_add(i));
                if head < self.desc_num {
                    self.desc_flag(head).store(0, Ordering::Release);
                }
            }
            let last = self.load_u16(LAST_BATCH_HEAD_OFFSET);
            if last < self.desc_num {
                self.desc_flag(last).store(0, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            self.store_u16(USED_IDX_OFFSET, ring_used_idx);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.desc_flag(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.desc_counter(h).load(Ordering::Acquire), h))
            .collect();
        marked.sort_unstable();
        Recovered {
            next_avail: ring_used_idx.wrapping_add(marked.len() as u16),
            next_counter: marked.last().map_or(0, |&(c, _)| c + 1),
            heads: marked.into_iter().map(|(_, h)| h).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> (File, Arc<InflightArea>) {
        let (file, len) = InflightArea::create(queues, size).unwrap();
        let area = InflightArea::map(&file, 0, len, queues, size).unwrap();
        (file, Arc::new(area))
    }

    #[test]
    fn a_fresh_area_is_taken_over_with_nothing_to_resubmit() {
        let (_f, area) = area(2, 8);
        let q = area.queue_view(1).unwrap();
        assert_eq!(q.load_u16(DESC_NUM_OFFSET), 8);
        let r = q.recover(5, |_| unreachable!());
        assert_eq!(
            r,
            Recovered {
                heads: vec![],
                next_avail: 5,
                next_counter: 0
            }
        );
        assert_eq!(q.load_u16(VERSION_OFFSET), VERSION);
    }

    #[test]
    fn chains_in_flight_come_back_oldest_first_and_completed_ones_do_not() {
        let (file, area) = area(1, 8);
        let q = area.queue_view(0).unwrap();
        q.recover(0, |_| unreachable!());
        // Popped 3, 6, 1, 4 in that order; 6 completed (used index 1).
        for (counter, head) in [3u16, 6, 1, 4].into_iter().enumerate() {
            q.popped(head, counter as u64);
        }
        q.completed([6].into_iter(), 1);
        drop(q);
        // A new process maps the same file.
        let len = file.metadata().unwrap().len();
        let again = Arc::new(InflightArea::map(&file, 0, len, 1, 8).unwrap());
        let r = again.queue_view(0).unwrap().recover(1, |_| unreachable!());
        assert_eq!(
            r,
            Recovered {
                heads: vec![3, 1, 4],
                next_avail: 4,
                next_counter: 4
            }
        );
    }

    /// A used ring of 8 elements whose free-running index `i` holds `heads[i - first]`.
    fn used_ring(first: u16, heads: &[u16]) -> impl Fn(u16) -> u16 + '_ {
        move |i| heads[usize::from(i.wrapping_sub(first))]
    }

    #[test]
    fn a_crash_between_publishing_a_batch_and_clearing_it_resubmits_none_of_it() {
        let (_f, area) = area(1, 8);
        let q = area.queue_view(0).unwrap();
        // Across the 16-bit wrap of the indexes.
        q.recover(u16::MAX - 1, |_| unreachable!());
        for (counter, head) in [2u16, 5, 7, 1].into_iter().enumerate() {
            q.popped(head, counter as u64);
        }
        // The used ring got heads 5, 7 and 1 (indexes 65534, 65535, 0) and its index became
        // 1, then the process died before `completed`.
        let r = q.recover(1, used_ring(u16::MAX - 1, &[5, 7, 1]));
        assert_eq!(r.heads, vec![2]);
        assert_eq!(r.next_avail, 2);
        assert_eq!(r.next_counter, 1);
    }

    #[test]
    fn a_crash_before_the_used_index_store_resubmits_the_whole_batch() {
        let (_f, area) = area(1, 8);
        let q = area.queue_view(0).unwrap();
        q.recover(10, |_| unreachable!());
        q.popped(2, 0);
        q.popped(5, 1);
        q.popped(3, 2);
        // Elements for 5 and 3 were written at 10 and 11, the index stayed 10: the guest saw
        // neither complete, so both come back with 2, and the ring continues after all three.
        let r = q.recover(10, |_| panic!("no element published"));
        assert_eq!(r.heads, vec![2, 5, 3]);
        assert_eq!(r.next_avail, 13);
    }

    #[test]
    fn a_published_and_cleared_batch_leaves_only_the_others() {
        let (_f, area) = area(1, 8);
        let q = area.queue_view(0).unwrap();
        q.recover(0, |_| unreachable!());
        for (counter, head) in [0u16, 1, 2, 3].into_iter().enumerate() {
            q.popped(head, counter as u64);
        }
        q.completed([3, 1].into_iter(), 2);
        let r = q.recover(2, |_| panic!("nothing to clear"));
        assert_eq!(r.heads, vec![0, 2]);
        assert_eq!(r.next_avail, 4);
    }

    #[test]
    fn a_too_small_area_is_refused() {
        let (file, len) = InflightArea::create(1, 8).unwrap();
        assert!(InflightArea::map(&file, 0, len, 2, 8).is_err());
        assert!(InflightArea::map(&file, 0, len, 1, 256).is_err());
    }
}
