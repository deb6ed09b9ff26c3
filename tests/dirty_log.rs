// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty logging, played as QEMU does when a migration or a save starts: the frontend acks
//! `VHOST_F_LOG_ALL`, hands the daemon its log (SET_LOG_BASE with `LOG_SHMFD`) while the ring
//! runs, and reads the log afterwards. Every guest page the daemon wrote from then on must be
//! marked: the data of reads (from the cache and from the image, which the engine writes by
//! pointer, not through the guest memory API), the status bytes and the used ring; pages it
//! only read must not be.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::thread::sleep;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod common;

use common::{pattern, Daemon, TestDir};

const PAGE: u64 = 4096;
const MEM_LEN: usize = 4 << 20;
/// Both regions.
const GUEST_LEN: u64 = 2 * MEM_LEN as u64;
const QUEUE_SIZE: u16 = 16;
/// Where the frontend says guest memory is mapped in its own address space.
const USER_BASE: u64 = 0x7000_0000_0000;
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Request headers (read by the daemon only), one page.
const HEADERS: u64 = 0x10_000;
/// Status bytes, one page.
const STATUS: u64 = 0x11_000;
/// The buffer of the write (read by the daemon only).
const WRITE_BUF: u64 = 0x20_000;
/// The buffers of the two reads.
const READ_CACHED_BUF: u64 = 0x40_000;
const READ_IMAGE_BUF: u64 = 0x60_000;
const IO_LEN: u32 = 64 << 10;
/// Disk offsets: the write and the read that finds it in the cache, and a read of data that is
/// only on the image.
const CACHED_AT: u64 = 1 << 20;
const IMAGE_AT: u64 = 3 << 20;
const DISK_LEN: u64 = 8 << 20;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VHOST_F_LOG_ALL: u64 = 1 << 26;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: the descriptor was just created and belongs to nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// Guest memory: two regions of `MEM_LEN`, one after the other, each a memfd. The rings and
/// the first tests' buffers live in the first; the second is given to the daemon later.
struct Guest {
    memfds: [File; 2],
    mem: GuestMemoryMmap,
    /// Requests published so far.
    avail_idx: u16,
}

impl Guest {
    fn new() -> Guest {
        let memfds = [
            memfd(c"guest0", MEM_LEN as u64),
            memfd(c"guest1", MEM_LEN as u64),
        ];
        let ranges: Vec<_> = memfds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                (
                    GuestAddress((i * MEM_LEN) as u64),
                    MEM_LEN,
                    Some(FileOffset::new(fd.try_clone().unwrap(), 0)),
                )
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(&ranges).unwrap();
        Guest {
            memfds,
            mem,
            avail_idx: 0,
        }
    }

    /// How the frontend describes region `i` to the daemon.
    fn region(&self, i: usize) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: (i * MEM_LEN) as u64,
            memory_size: MEM_LEN as u64,
            userspace_addr: USER_BASE + (i * MEM_LEN) as u64,
            mmap_offset: 0,
            mmap_handle: self.memfds[i].as_raw_fd(),
        }
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
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

    /// Queues request `n` (chain head `3 n`): header, one data buffer, status byte.
    fn submit(&mut self, n: u16, request_type: u32, disk_at: u64, buf: u64) {
        let header = HEADERS + 16 * u64::from(n);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&(disk_at / 512).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(header)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(n)))
            .unwrap();
        let head = 3 * n;
        let data_flags = if request_type == T_IN {
            DESC_F_NEXT | DESC_F_WRITE
        } else {
            DESC_F_NEXT
        };
        self.desc(head, header, 16, DESC_F_NEXT, head + 1);
        self.desc(head + 1, buf, IO_LEN, data_flags, head + 2);
        self.desc(head + 2, STATUS + u64::from(n), 1, DESC_F_WRITE, 0);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx += 1;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn wait_for_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.used_idx() < n {
            assert!(Instant::now() < deadline, "request {n} never completed");
            sleep(Duration::from_millis(5));
        }
    }

    fn status(&self, n: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(n)))
            .unwrap()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

/// The frontend's dirty log: one bit per 4 KiB guest page of both regions, as QEMU lays it
/// out.
struct Log {
    file: File,
}

impl Log {
    fn len() -> u64 {
        (GUEST_LEN / PAGE).div_ceil(8)
    }

    fn dirty_pages(&self) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; Self::len() as usize];
        self.file.read_exact_at(&mut bytes, 0).unwrap();
        (0..GUEST_LEN / PAGE)
            .filter(|&p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }
}

fn pages(addr: u64, len: u64) -> std::ops::Range<u64> {
    addr / PAGE..(addr + len).div_ceil(PAGE)
}

/// Every page of each named range is marked in the log.
fn assert_marked<'a>(
    dirty: &[u64],
    ranges: impl IntoIterator<Item = (&'a str, std::ops::Range<u64>)>,
) {
    for (what, range) in ranges {
        for page in range {
            assert!(
                dirty.contains(&page),
                "{what}: guest page {page:#x} was written but is not marked in the log \
                 (dirty: {dirty:x?})"
            );
        }
    }
}

/// No page of the named ranges (memory the daemon only reads) is marked in the log.
fn assert_not_marked<'a>(
    dirty: &[u64],
    ranges: impl IntoIterator<Item = (&'a str, std::ops::Range<u64>)>,
) {
    for (what, range) in ranges {
        for page in range {
            assert!(
                !dirty.contains(&page),
                "{what}: guest page {page:#x} was only read but is marked in the log"
            );
        }
    }
}

/// The frontend connected to `daemon`, queue 0 running, with only the first memory region in
/// the daemon's table.
fn connect(daemon: &Daemon) -> (Guest, Frontend, EventFd, EventFd) {
    let guest = Guest::new();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());

    let mut frontend = Frontend::connect(daemon.socket(), 1).expect("connect to the daemon");
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert!(
        features & VHOST_F_LOG_ALL != 0,
        "the daemon does not offer VHOST_F_LOG_ALL"
    );
    let offered = frontend.get_protocol_features().unwrap();
    assert!(
        offered.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "the daemon does not offer LOG_SHMFD"
    );
    frontend
        .set_features(VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES)
        .unwrap();
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
        .unwrap();
    frontend.set_mem_table(&[guest.region(0)]).unwrap();
    frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: USER_BASE + DESC_TABLE,
                used_ring_addr: USER_BASE + USED,
                avail_ring_addr: USER_BASE + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    frontend.set_vring_enable(0, true).unwrap();

    (guest, frontend, kick, call)
}

/// Migration starts: LOG_ALL, then the log (QEMU's order).
fn start_logging(frontend: &mut Frontend) -> Log {
    let log = Log {
        file: memfd(c"log", Log::len().next_multiple_of(PAGE)),
    };
    frontend
        .set_features(VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
        .unwrap();
    frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: Log::len(),
                mmap_offset: 0,
                mmap_handle: log.file.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");
    log
}

#[test]
fn pages_the_daemon_writes_after_set_log_base_are_marked_in_the_log() {
    let dir = TestDir::new();
    let image = dir.create_image(DISK_LEN);
    // Data only the image holds: a read of it goes to the backing file.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&pattern(2, IO_LEN as usize), IMAGE_AT)
            .unwrap();
    }
    let daemon = Daemon::start(&dir.socket(), &["--backing", image.to_str().unwrap()]);
    let (mut guest, mut frontend, kick, _call) = connect(&daemon);

    // Before logging starts: a write, which puts its data in the cache.
    guest
        .mem
        .write_slice(&pattern(1, IO_LEN as usize), GuestAddress(WRITE_BUF))
        .unwrap();
    guest.submit(0, T_OUT, CACHED_AT, WRITE_BUF);
    kick.write(1).unwrap();
    guest.wait_for_used(1);
    assert_eq!(guest.status(0), 0, "the write failed");

    let log = start_logging(&mut frontend);
    assert!(log.dirty_pages().is_empty(), "the log starts clean");

    guest.submit(1, T_IN, CACHED_AT, READ_CACHED_BUF);
    guest.submit(2, T_IN, IMAGE_AT, READ_IMAGE_BUF);
    kick.write(1).unwrap();
    guest.wait_for_used(3);
    assert_eq!((guest.status(1), guest.status(2)), (0, 0), "a read failed");
    assert!(
        guest.read(READ_CACHED_BUF, IO_LEN as usize) == pattern(1, IO_LEN as usize),
        "the read from the cache returned other data"
    );
    assert!(
        guest.read(READ_IMAGE_BUF, IO_LEN as usize) == pattern(2, IO_LEN as usize),
        "the read from the image returned other data"
    );

    let dirty = log.dirty_pages();
    assert_marked(
        &dirty,
        [
            (
                "read data from the cache",
                pages(READ_CACHED_BUF, IO_LEN.into()),
            ),
            (
                "read data from the image",
                pages(READ_IMAGE_BUF, IO_LEN.into()),
            ),
            ("status byte", pages(STATUS, 1)),
            ("used ring", pages(USED, 1)),
        ],
    );
    // Pages the daemon only read stay clean.
    assert_not_marked(
        &dirty,
        [
            ("descriptor table", pages(DESC_TABLE, 1)),
            ("available ring", pages(AVAIL, 1)),
            ("request headers", pages(HEADERS, 1)),
            ("write buffer", pages(WRITE_BUF, IO_LEN.into())),
        ],
    );
    drop(frontend);
    assert!(daemon.terminate().success());
}

/// vhost-user-backend gives regions from a later SET_MEM_TABLE or ADD_MEM_REG no log, and QEMU
/// sends SET_LOG_BASE again only when the log grows: the daemon must still mark what it writes
/// into them.
#[test]
fn pages_written_into_memory_mapped_after_set_log_base_are_marked() {
    let dir = TestDir::new();
    let image = dir.create_image(DISK_LEN);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&pattern(3, IO_LEN as usize), IMAGE_AT)
            .unwrap();
    }
    let daemon = Daemon::start(&dir.socket(), &["--backing", image.to_str().unwrap()]);
    let (mut guest, mut frontend, kick, _call) = connect(&daemon);
    let log = start_logging(&mut frontend);

    // The whole table again (QEMU does this when guest memory changes): new mappings.
    frontend.set_mem_table(&[guest.region(0)]).unwrap();
    guest.submit(0, T_IN, IMAGE_AT, READ_IMAGE_BUF);
    kick.write(1).unwrap();
    guest.wait_for_used(1);
    // A region added to the table (hotplugged memory).
    frontend
        .add_mem_region(&guest.region(1))
        .expect("ADD_MEM_REG");
    // The vhost crate sends ADD_MEM_REG without asking for an ack: a message with a reply makes
    // sure the daemon has handled it (it handles messages in order).
    frontend.get_features().unwrap();
    let added_buf = MEM_LEN as u64 + READ_CACHED_BUF;
    guest.submit(1, T_IN, IMAGE_AT, added_buf);
    kick.write(1).unwrap();
    guest.wait_for_used(2);
    assert_eq!(
        (guest.status(0), guest.status(1)),
        (0, 0),
        "a read failed (statuses of the read after SET_MEM_TABLE, after ADD_MEM_REG)"
    );
    for buf in [READ_IMAGE_BUF, added_buf] {
        assert!(
            guest.read(buf, IO_LEN as usize) == pattern(3, IO_LEN as usize),
            "the read into {buf:#x} returned other data"
        );
    }

    let dirty = log.dirty_pages();
    assert_marked(
        &dirty,
        [
            (
                "read data, after SET_MEM_TABLE",
                pages(READ_IMAGE_BUF, IO_LEN.into()),
            ),
            (
                "read data in the region added by ADD_MEM_REG",
                pages(added_buf, IO_LEN.into()),
            ),
            ("status bytes", pages(STATUS, 2)),
            ("used ring", pages(USED, 1)),
        ],
    );
    assert_not_marked(
        &dirty,
        [
            ("descriptor table", pages(DESC_TABLE, 1)),
            ("request headers", pages(HEADERS, 1)),
        ],
    );
    drop(frontend);
    assert!(daemon.terminate().success());
}
