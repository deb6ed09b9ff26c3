// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A scripted guest for protocol tests that play the frontend themselves: guest memory in
//! memfds the daemon maps, and queue 0's split ring written by hand (descriptor table,
//! available and used rings at fixed guest addresses), so a test controls every message and
//! every ring entry the daemon sees.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::thread::sleep;
use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Where the frontend says guest memory is mapped in its own address space.
pub const USER_BASE: u64 = 0x7000_0000_0000;
pub const DESC_TABLE: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// An anonymous memory file of `len` bytes.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: the descriptor was just created and belongs to nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// Guest memory made of regions of `region_len` bytes, one after the other, each a memfd,
/// with queue 0's ring of `queue_size` entries at the start of the first.
pub struct ScriptedGuest {
    memfds: Vec<File>,
    region_len: usize,
    queue_size: u16,
    pub mem: GuestMemoryMmap,
}

impl ScriptedGuest {
    pub fn new(regions: usize, region_len: usize, queue_size: u16) -> ScriptedGuest {
        let memfds: Vec<File> = (0..regions)
            .map(|_| memfd(c"guest", region_len as u64))
            .collect();
        let ranges: Vec<_> = memfds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                (
                    GuestAddress((i * region_len) as u64),
                    region_len,
                    Some(FileOffset::new(fd.try_clone().unwrap(), 0)),
                )
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(&ranges).unwrap();
        ScriptedGuest {
            memfds,
            region_len,
            queue_size,
            mem,
        }
    }

    /// How the frontend describes region `i` to the daemon.
    pub fn region(&self, i: usize) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: (i * self.region_len) as u64,
            memory_size: self.region_len as u64,
            userspace_addr: USER_BASE + (i * self.region_len) as u64,
            mmap_offset: 0,
            mmap_handle: self.memfds[i].as_raw_fd(),
        }
    }

    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + 16 * u64::from(index));
        self.mem.write_obj(addr.to_le(), at).unwrap();
        self.mem
            .write_obj(len.to_le(), at.unchecked_add(8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), at.unchecked_add(12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), at.unchecked_add(14))
            .unwrap();
    }

    /// Puts chain `head` in available slot `n` (modulo the ring size), not yet published.
    pub fn put_avail(&self, n: u16, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(n % self.queue_size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
    }

    /// Makes the first `avail_idx` available entries visible to the daemon.
    pub fn publish(&self, avail_idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// The driver's `used_event` (EVENT_IDX): interrupt me once the used index passes it.
    pub fn set_used_event(&self, idx: u16) {
        let at = AVAIL + 4 + 2 * u64::from(self.queue_size);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The chain heads in the used ring, in completion order.
    pub fn used_heads(&self) -> Vec<u32> {
        (0..self.used_idx())
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % self.queue_size);
                self.mem.read_obj::<u32>(GuestAddress(at)).unwrap()
            })
            .collect()
    }

    /// Waits up to a minute until `n` requests have completed.
    pub fn wait_for_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.used_idx() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} requests completed",
                self.used_idx()
            );
            sleep(Duration::from_millis(5));
        }
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Queue 0's ring addresses, its start position `base`, its eventfds, then enables it
    /// (SET_VRING_NUM comes before, where each frontend sends it).
    pub fn start_ring(&self, frontend: &mut Frontend, base: u16, kick: &EventFd, call: &EventFd) {
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: self.queue_size,
                    queue_size: self.queue_size,
                    flags: 0,
                    desc_table_addr: USER_BASE + DESC_TABLE,
                    used_ring_addr: USER_BASE + USED,
                    avail_ring_addr: USER_BASE + AVAIL,
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(0, base).unwrap();
        frontend.set_vring_call(0, call).unwrap();
        frontend.set_vring_kick(0, kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
    }
}
