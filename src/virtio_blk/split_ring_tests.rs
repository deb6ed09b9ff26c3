// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Split ring walker tests: chains compared with virtio-queue's own iterator (the reference
//! the walker replaces), malformed chains, rings outside guest memory, index wrap-around and
//! batched publication of used elements with EVENT_IDX and the dirty log.

use proptest::prelude::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::split_ring::{Desc, RingAddrs, RingError, SplitRing};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;
const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Indirect tables and buffers live from here on.
const DATA: u64 = 0x4000;
const MEM: u64 = 0x10000;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn addrs() -> RingAddrs {
    RingAddrs {
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        size: SIZE,
    }
}

fn put_desc(mem: &Mem, table: u64, i: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
    let at = GuestAddress(table + 16 * u64::from(i));
    mem.write_obj(addr, at).unwrap();
    mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
}

fn chain_of(ring: &SplitRing<&Mem>, head: u16) -> Vec<Desc> {
    let mut out = vec![Desc {
        addr: GuestAddress(1),
        len: 1,
        write_only: true,
    }];
    ring.chain(head, &mut out);
    out
}

/// virtio-queue's view of the chain at `head`.
fn reference_chain(mem: &Mem, head: u16) -> Vec<Desc> {
    mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let mut q = Queue::new(SIZE).unwrap();
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q.pop_descriptor_chain(mem)
        .unwrap()
        .map(|d| Desc {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        })
        .collect()
}

/// A descriptor as a fuzzer would write it: mostly sensible, sometimes anything.
fn any_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        prop_oneof![3 => DATA..MEM, 1 => any::<u64>()],
        prop_oneof![3 => 0u32..0x200, 1 => any::<u32>()],
        prop_oneof![4 => 0u16..8, 1 => any::<u16>()],
        prop_oneof![4 => 0u16..SIZE, 1 => any::<u16>()],
    )
}

proptest! {
    /// Whatever the descriptor table and an indirect table hold (loops, indexes and tables out
    /// of range, indirect inside indirect, chains over 4 GiB), the walk yields exactly what
    /// virtio-queue's iterator yields.
    #[test]
    fn chains_are_what_virtio_queue_walks(
        table in proptest::collection::vec(any_desc(), SIZE as usize),
        indirect in proptest::collection::vec(any_desc(), 8),
        indirect_len in prop_oneof![Just(8u32 * 16), 0u32..200],
        head in prop_oneof![4 => 0u16..SIZE, 1 => any::<u16>()],
    ) {
        let mem = memory();
        // Point indirect descriptors at the indirect table now and then (from inside it too).
        let aim = |d: (u64, u32, u16, u16)| {
            if d.2 & INDIRECT != 0 && d.0 % 2 == 0 { (DATA, indirect_len, d.2, d.3) } else { d }
        };
        for (i, &d) in table.iter().enumerate() {
            put_desc(&mem, DESC, i as u16, aim(d));
        }
        for (i, &d) in indirect.iter().enumerate() {
            put_desc(&mem, DATA, i as u16, aim(d));
        }
        let ring = SplitRing::new(&mem, addrs()).unwrap();
        prop_assert_eq!(chain_of(&ring, head), reference_chain(&mem, head));
    }
}

#[test]
fn a_looping_chain_ends_after_a_ring_of_descriptors() {
    let mem = memory();
    put_desc(&mem, DESC, 0, (DATA, 16, NEXT, 1));
    put_desc(&mem, DESC, 1, (DATA, 1, NEXT | WRITE, 0));
    let ring = SplitRing::new(&mem, addrs()).unwrap();
    let chain = chain_of(&ring, 0);
    assert_eq!(chain.len(), SIZE as usize);
    // And so does one looping inside an indirect table: bounded by the table's length.
    put_desc(&mem, DESC, 2, (DATA, 4 * 16, INDIRECT, 0));
    put_desc(&mem, DATA, 0, (DATA + 0x100, 16, NEXT, 1));
    put_desc(&mem, DATA, 1, (DATA + 0x200, 1, NEXT | WRITE, 0));
    assert_eq!(chain_of(&ring, 2).len(), 4);
}

#[test]
fn an_indirect_chain_is_walked_and_nested_or_misplaced_tables_end_it() {
    let mem = memory();
    put_desc(&mem, DESC, 3, (DATA, 3 * 16, INDIRECT, 0));
    put_desc(&mem, DATA, 0, (0x8000, 16, NEXT, 1));
    put_desc(&mem, DATA, 1, (0x9000, 4096, NEXT | WRITE, 2));
    put_desc(&mem, DATA, 2, (0xa000, 1, WRITE, 0));
    let ring = SplitRing::new(&mem, addrs()).unwrap();
    let d = |addr, len, write_only| Desc {
        addr: GuestAddress(addr),
        len,
        write_only,
    };
    assert_eq!(
        chain_of(&ring, 3),
        vec![
            d(0x8000, 16, false),
            d(0x9000, 4096, true),
            d(0xa000, 1, true)
        ]
    );
    // An indirect descriptor inside the table ends the chain there.
    put_desc(&mem, DATA, 1, (DATA, 16, INDIRECT, 0));
    assert_eq!(chain_of(&ring, 3), vec![d(0x8000, 16, false)]);
    // A table whose length is not a multiple of 16, or that starts outside guest memory,
    // yields nothing; one that ends outside yields what is inside, up to the first
    // descriptor beyond.
    put_desc(&mem, DESC, 3, (DATA, 40, INDIRECT, 0));
    assert_eq!(chain_of(&ring, 3), vec![]);
    put_desc(&mem, DESC, 3, (MEM, 32, INDIRECT, 0));
    assert_eq!(chain_of(&ring, 3), vec![]);
    put_desc(&mem, DESC, 3, (MEM - 16, 32, INDIRECT, 0));
    put_desc(&mem, MEM - 16, 0, (0x8000, 16, NEXT, 1));
    assert_eq!(chain_of(&ring, 3), vec![d(0x8000, 16, false)]);
    // A head beyond the table too.
    assert_eq!(chain_of(&ring, SIZE), vec![]);
}

#[test]
fn a_ring_outside_guest_memory_or_misaligned_is_refused() {
    let mem = memory();
    let with = |f: fn(&mut RingAddrs)| {
        let mut a = addrs();
        f(&mut a);
        SplitRing::new(&mem, a).err()
    };
    assert!(matches!(
        with(|a| a.desc_table = MEM - 16 * 8),
        Some(RingError::NotMapped { .. })
    ));
    assert!(matches!(
        with(|a| a.avail_ring = MEM),
        Some(RingError::NotMapped { .. })
    ));
    // The used ring's last byte (avail_event) just past the end.
    assert!(matches!(
        with(|a| a.used_ring = MEM - (4 + 8 * u64::from(SIZE))),
        Some(RingError::NotMapped { .. })
    ));
    assert!(matches!(
        with(|a| a.desc_table = DESC + 8),
        Some(RingError::Misaligned { .. })
    ));
    assert!(matches!(
        with(|a| a.used_ring = USED + 2),
        Some(RingError::Misaligned { .. })
    ));
    assert_eq!(with(|a| a.size = 12), Some(RingError::Size(12)));
    assert_eq!(with(|_| {}), None);
}

#[test]
fn indexes_wrap_around_16_bits_onto_ring_slots() {
    let mem = memory();
    let ring = SplitRing::new(&mem, addrs()).unwrap();
    // Free-running index 65535 is slot 15, 65536 (0) slot 0.
    mem.write_obj(7u16, GuestAddress(AVAIL + 4 + 2 * 15))
        .unwrap();
    mem.write_obj(9u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    assert_eq!(ring.avail_idx(), 1);
    assert_eq!(ring.avail_head(u16::MAX), 7);
    assert_eq!(ring.avail_head(0), 9);
    ring.put_used(u16::MAX, 7, 4097);
    ring.put_used(0, 9, 1);
    ring.publish_used(1);
    let elem = |slot: u64| {
        let at = USED + 4 + 8 * slot;
        (
            mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
            mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
        )
    };
    assert_eq!(elem(15), (7, 4097));
    assert_eq!(elem(0), (9, 1));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!((ring.used_head(u16::MAX), ring.used_head(0)), (7, 9));
}

#[test]
fn a_batch_is_published_with_one_index_store_and_marked_dirty() {
    let mem = memory();
    let ring = SplitRing::new(&mem, addrs()).unwrap();
    for (i, head) in [4u16, 2, 6].into_iter().enumerate() {
        ring.put_used(i as u16, head, 1);
    }
    // Not visible (nor logged) before the index store.
    assert_eq!(ring.used_idx(), 0);
    let region = mem.find_region(GuestAddress(USED)).unwrap();
    assert!(!region.bitmap().dirty_at(USED as usize));
    ring.publish_used(3);
    assert_eq!(ring.used_idx(), 3);
    assert!(region.bitmap().dirty_at(USED as usize));
    // The pages around it are not.
    assert!(!region.bitmap().dirty_at((USED - PAGE) as usize));
    assert!(!region.bitmap().dirty_at((USED + PAGE) as usize));
}

#[test]
fn event_idx_asks_for_an_interrupt_only_when_used_event_is_in_the_batch() {
    let mem = memory();
    let ring = SplitRing::new(&mem, addrs()).unwrap();
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
    let set_event = |v: u16| mem.write_obj(v, used_event).unwrap();
    // The batch published elements 10, 11 and 12 (index 10 -> 13).
    set_event(9);
    assert!(
        !ring.needs_notification(10, 13, true),
        "event before the batch"
    );
    for e in 10..13 {
        set_event(e);
        assert!(
            ring.needs_notification(10, 13, true),
            "event {e} in the batch"
        );
    }
    set_event(13);
    assert!(
        !ring.needs_notification(10, 13, true),
        "event after the batch"
    );
    // Across the wrap: elements 65535 and 0.
    set_event(u16::MAX);
    assert!(ring.needs_notification(u16::MAX, 1, true));
    set_event(0);
    assert!(ring.needs_notification(u16::MAX, 1, true));
    set_event(1);
    assert!(!ring.needs_notification(u16::MAX, 1, true));
    // Without EVENT_IDX every batch interrupts.
    assert!(ring.needs_notification(10, 13, false));
}

#[test]
fn notifications_are_turned_off_and_on_in_the_used_ring_and_a_late_chain_is_seen() {
    let mem = memory();
    let ring = SplitRing::new(&mem, addrs()).unwrap();
    let flags = || mem.read_obj::<u16>(GuestAddress(USED)).unwrap();
    let avail_event = || {
        mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
            .unwrap()
    };
    let region = mem.find_region(GuestAddress(USED)).unwrap();
    // Without EVENT_IDX: the NO_NOTIFY flag, marked dirty when written.
    ring.disable_notification(false);
    assert_eq!(flags(), 1);
    assert!(region.bitmap().dirty_at(USED as usize));
    mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
    assert!(!ring.enable_notification(3, false), "nothing new after 3");
    assert_eq!(flags(), 0);
    assert!(ring.enable_notification(2, false), "chain 2 arrived");
    // With EVENT_IDX: the flag is left alone, avail_event names the next chain.
    ring.disable_notification(true);
    assert_eq!(flags(), 0);
    assert!(!ring.enable_notification(3, true));
    assert_eq!(avail_event(), 3);
    mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
    assert!(ring.enable_notification(3, true));
}
