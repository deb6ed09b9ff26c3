// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk request decoder on descriptor chains built from arbitrary bytes: the
//! descriptors (address, length, flags, next; indirect tables included) and the guest memory
//! they point to come from the input. Whatever the chain, decoding must not panic, and a
//! request it hands to the engine must lie inside guest memory and the device; the daemon's
//! split ring walker must yield the descriptors virtio-queue's chain iterator yields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_pcache::engine::{RequestKind, SECTOR_SIZE};
use vhost_user_pcache::virtio_blk::request::{decode, Action, Decoder};
use vhost_user_pcache::virtio_blk::split_ring::{Desc, RingAddrs, SplitRing};
use vhost_user_pcache::virtio_blk::DeviceInfo;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory: the queue at 0, descriptors mostly point past `DATA`.
const MEM_SIZE: u64 = 0x4_0000;
const DATA: u64 = 0x1000;
const QUEUE_SIZE: u16 = 16;

/// Reads the input front to back; zeroes once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let shape = input.u8();
    let read_only = shape & 1 != 0;
    let capacity = [1u64 << 20, 0, 512, 1 << 40][(shape >> 1) as usize & 3];
    let raw_links = shape & 8 != 0;
    let n = 1 + input.u8() as usize % QUEUE_SIZE as usize;
    let descs: Vec<RawDescriptor> = (0..n)
        .map(|_| {
            let addr = input.u64();
            let len = input.u32();
            let flags = input.u16();
            let next = input.u16();
            // Mostly inside the data area, so chains reach the decoder; sometimes anything.
            let addr = if addr >> 63 == 0 {
                DATA + addr % (MEM_SIZE - DATA)
            } else {
                addr & !(1 << 63)
            };
            let len = if len >> 31 == 0 { len % 0x2000 } else { len };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let rest = input.0;
    let rest = &rest[..rest.len().min((MEM_SIZE - DATA) as usize)];
    mem.write_slice(rest, GuestAddress(DATA)).unwrap();

    let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let chain = if raw_links {
        queue.build_multiple_desc_chains(&descs)
    } else {
        queue.build_desc_chain(&descs)
    };
    let Ok(chain) = chain else {
        return;
    };
    // The daemon's own ring walker sees the chain virtio-queue's iterator sees, and decoding
    // what it walked gives the same answer.
    let ring = SplitRing::new(
        &mem,
        RingAddrs {
            desc_table: queue.desc_table_addr().0,
            avail_ring: queue.avail_addr().0,
            used_ring: queue.used_addr().0,
            size: QUEUE_SIZE,
        },
    )
    .unwrap();
    let head = chain.head_index();
    let mut walked = Vec::new();
    ring.chain(head, &mut walked);
    let reference: Vec<Desc> = chain
        .clone()
        .map(|d| Desc {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        })
        .collect();
    assert_eq!(walked, reference, "the walker and virtio-queue disagree");

    let info = DeviceInfo::new(capacity, read_only, 1, "fuzz");
    let decoded = decode(chain, &info);
    let from_walk = Decoder::default().decode_descs(head, &walked, &mem, &info);
    assert_eq!(format!("{decoded:?}"), format!("{from_walk:?}"));

    let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let inside = |ptr: usize, len: usize| ptr >= host && ptr + len <= host + MEM_SIZE as usize;
    if let Some(status) = decoded.status_addr {
        assert!(
            status.0 < MEM_SIZE,
            "status byte outside memory: {decoded:?}"
        );
    }
    let Action::Submit { kind, .. } = &decoded.action else {
        return;
    };
    let sector = SECTOR_SIZE;
    let within = |offset: u64, len: u64| {
        offset % sector == 0
            && len % sector == 0
            && offset.checked_add(len).is_some_and(|e| e <= capacity)
    };
    match kind {
        RequestKind::Read { offset, bufs } | RequestKind::Write { offset, bufs } => {
            let len: u64 = bufs.iter().map(|b| b.len as u64).sum();
            assert!(within(*offset, len), "out of the device: {decoded:?}");
            for b in bufs {
                assert!(
                    inside(b.ptr as usize, b.len),
                    "buffer outside memory: {decoded:?}"
                );
            }
            if matches!(kind, RequestKind::Write { .. }) {
                assert!(!read_only, "a write on a read-only device: {decoded:?}");
            }
        }
        RequestKind::WriteZeroes { offset, len, .. } | RequestKind::Discard { offset, len } => {
            assert!(within(*offset, *len), "out of the device: {decoded:?}");
            assert!(!read_only, "zeroing a read-only device: {decoded:?}");
        }
        RequestKind::Flush => {}
    }
});
