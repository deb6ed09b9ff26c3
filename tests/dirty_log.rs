// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty logging, played as QEMU does when a migration or a save starts: the frontend acks
//! `VHOST_F_LOG_ALL`, hands the daemon its log (SET_LOG_BASE with `LOG_SHMFD`) while the ring
//! runs, and reads the log afterwards. Every guest page the daemon wrote from then on must be
//! marked: the data of reads (from the cache and from the image, which the engine writes by
//! pointer, not through the guest memory API), the status bytes and the used ring; pages it
//! only read must not be.

use std::fs::File;
use std::os::fd::AsRawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

mod common;

use common::ring::{memfd, ScriptedGuest, AVAIL, DESC_F_NEXT, DESC_F_WRITE, DESC_TABLE, USED};
use common::{pattern, Daemon, TestDir};

const PAGE: u64 = 4096;
const MEM_LEN: usize = 4 << 20;
/// Both regions.
const GUEST_LEN: u64 = 2 * MEM_LEN as u64;
const QUEUE_SIZE: u16 = 16;
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
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// The test guest: two regions of `MEM_LEN`; the rings and the first tests' buffers live in
/// the first, the second is given to the daemon later.
fn new_guest() -> ScriptedGuest {
    ScriptedGuest::new(2, MEM_LEN, QUEUE_SIZE)
}

/// Queues and publishes request `n` (the `n`th request, chain head `3 n`): header, one data
/// buffer of `IO_LEN` at `buf`, status byte.
fn submit(guest: &ScriptedGuest, n: u16, request_type: u32, disk_at: u64, buf: u64) {
    let header = HEADERS + 16 * u64::from(n);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&(disk_at / 512).to_le_bytes());
    guest.mem.write_slice(&h, GuestAddress(header)).unwrap();
    guest
        .mem
        .write_obj(0xffu8, GuestAddress(STATUS + u64::from(n)))
        .unwrap();
    let head = 3 * n;
    let data_flags = if request_type == T_IN {
        DESC_F_NEXT | DESC_F_WRITE
    } else {
        DESC_F_NEXT
    };
    guest.desc(head, header, 16, DESC_F_NEXT, head + 1);
    guest.desc(head + 1, buf, IO_LEN, data_flags, head + 2);
    guest.desc(head + 2, STATUS + u64::from(n), 1, DESC_F_WRITE, 0);
    guest.put_avail(n, head);
    guest.publish(n + 1);
}

/// The status byte of request `n`.
fn status(guest: &ScriptedGuest, n: u16) -> u8 {
    guest
        .mem
        .read_obj(GuestAddress(STATUS + u64::from(n)))
        .unwrap()
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
fn connect(daemon: &Daemon) -> (ScriptedGuest, Frontend, EventFd, EventFd) {
    let guest = new_guest();
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
    guest.start_ring(&mut frontend, 0, &kick, &call);

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
    let (guest, mut frontend, kick, _call) = connect(&daemon);

    // Before logging starts: a write, which puts its data in the cache.
    guest
        .mem
        .write_slice(&pattern(1, IO_LEN as usize), GuestAddress(WRITE_BUF))
        .unwrap();
    submit(&guest, 0, T_OUT, CACHED_AT, WRITE_BUF);
    kick.write(1).unwrap();
    guest.wait_for_used(1);
    assert_eq!(status(&guest, 0), 0, "the write failed");

    let log = start_logging(&mut frontend);
    assert!(log.dirty_pages().is_empty(), "the log starts clean");

    submit(&guest, 1, T_IN, CACHED_AT, READ_CACHED_BUF);
    submit(&guest, 2, T_IN, IMAGE_AT, READ_IMAGE_BUF);
    kick.write(1).unwrap();
    guest.wait_for_used(3);
    assert_eq!(
        (status(&guest, 1), status(&guest, 2)),
        (0, 0),
        "a read failed"
    );
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
    let (guest, mut frontend, kick, _call) = connect(&daemon);
    let log = start_logging(&mut frontend);

    // The whole table again (QEMU does this when guest memory changes): new mappings.
    frontend.set_mem_table(&[guest.region(0)]).unwrap();
    submit(&guest, 0, T_IN, IMAGE_AT, READ_IMAGE_BUF);
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
    submit(&guest, 1, T_IN, IMAGE_AT, added_buf);
    kick.write(1).unwrap();
    guest.wait_for_used(2);
    assert_eq!(
        (status(&guest, 0), status(&guest, 1)),
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
