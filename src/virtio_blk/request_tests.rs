// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request codec tests on chains built with virtio-queue's mock driver.

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::DeviceInfo;
use super::features::*;
use super::request::{decode, Action, Decoded, Decoder};
use crate::engine::{DataSeg, RequestKind, INLINE_DATA_SEGS};

const MEM_SIZE: u64 = 0x10_0000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x3_0000;
const STATUS: u64 = 0x8_0000;
const CAPACITY: u64 = 1 << 20;

type Mem = GuestMemoryMmap<()>;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn info(read_only: bool) -> DeviceInfo {
    DeviceInfo::new(CAPACITY, read_only, 1, "serial-0123")
}

fn r(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn w(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

fn header(mem: &Mem, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
}

fn segment(mem: &Mem, addr: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

fn run(mem: &Mem, descs: &[RawDescriptor], info: &DeviceInfo) -> Decoded {
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue.build_desc_chain(descs).unwrap();
    decode(chain, info)
}

fn host(mem: &Mem, addr: u64) -> *mut u8 {
    use vm_memory::GuestMemoryBackend;
    mem.get_host_address(GuestAddress(addr)).unwrap()
}

fn assert_answer(d: &Decoded, status: u8) {
    match d.action {
        Action::Answer {
            status: s,
            used_len,
        } => {
            assert_eq!(s, status, "{d:?}");
            assert_eq!(used_len, 1);
        }
        _ => panic!("expected an answer with status {status}, got {d:?}"),
    }
    assert_eq!(d.status_addr, Some(GuestAddress(STATUS)));
}

#[test]
fn read_becomes_zero_copy_engine_read() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 3);
    let d = run(
        &mem,
        &[r(HEADER, 16), w(DATA, 1024), w(STATUS, 1)],
        &info(false),
    );
    assert_eq!(d.status_addr, Some(GuestAddress(STATUS)));
    match d.action {
        Action::Submit {
            kind: RequestKind::Read { offset, bufs },
            used_len,
        } => {
            assert_eq!(offset, 3 * 512);
            assert_eq!(used_len, 1025);
            assert_eq!(
                bufs[..],
                [DataSeg {
                    ptr: host(&mem, DATA),
                    len: 1024
                }]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn descriptor_boundaries_are_arbitrary() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // Header in two pieces; the last data bytes share a descriptor with the status byte.
    let d = run(
        &mem,
        &[
            r(HEADER, 8),
            r(HEADER + 8, 8),
            w(DATA, 512),
            w(DATA + 0x1000, 513),
        ],
        &info(false),
    );
    assert_eq!(d.status_addr, Some(GuestAddress(DATA + 0x1000 + 512)));
    match d.action {
        Action::Submit {
            kind: RequestKind::Read { bufs, .. },
            used_len,
        } => {
            assert_eq!(used_len, 1025);
            assert_eq!(DataSeg::total_len(&bufs), 1024);
            assert_eq!(bufs[1].ptr, host(&mem, DATA + 0x1000));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn write_flush_and_get_id() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 8);
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 4096), w(STATUS, 1)],
        &info(false),
    );
    match d.action {
        Action::Submit {
            kind: RequestKind::Write { offset, bufs },
            used_len: 1,
        } => {
            assert_eq!(offset, 4096);
            assert_eq!(DataSeg::total_len(&bufs), 4096);
        }
        other => panic!("unexpected {other:?}"),
    }

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let d = run(&mem, &[r(HEADER, 16), w(STATUS, 1)], &info(false));
    assert!(matches!(
        d.action,
        Action::Submit {
            kind: RequestKind::Flush,
            used_len: 1
        }
    ));

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let d = run(
        &mem,
        &[r(HEADER, 16), w(DATA, 20), w(STATUS, 1)],
        &info(false),
    );
    assert!(matches!(
        d.action,
        Action::Answer {
            status: STATUS_OK,
            used_len: 21
        }
    ));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"serial-0123\0\0\0\0\0\0\0\0\0");
}

#[test]
fn write_zeroes_honours_unmap_and_discard_refuses_it() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, DATA, 16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 16), w(STATUS, 1)],
        &info(false),
    );
    assert!(
        matches!(
            d.action,
            Action::Submit {
                kind: RequestKind::WriteZeroes {
                    offset: 8192,
                    len: 4096,
                    may_unmap: true
                },
                used_len: 1
            }
        ),
        "{d:?}"
    );

    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 16, 8, 0);
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 16), w(STATUS, 1)],
        &info(false),
    );
    assert!(matches!(
        d.action,
        Action::Submit {
            kind: RequestKind::Discard {
                offset: 8192,
                len: 4096
            },
            ..
        }
    ));

    segment(&mem, DATA, 16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 16), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_UNSUPP);

    segment(&mem, DATA, 16, 8, 0x4);
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 16), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_UNSUPP);
}

#[test]
fn bad_segments_are_io_errors() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 8, 0);
    segment(&mem, DATA + 16, 64, 8, 0);
    // More segments than max_discard_seg.
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 32), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_IOERR);
    // Not a whole segment.
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 12), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_IOERR);
    // Past the end of the device.
    segment(&mem, DATA, CAPACITY / 512 - 4, 8, 0);
    let d = run(
        &mem,
        &[r(HEADER, 16), r(DATA, 16), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_IOERR);
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = memory();
    for t in [2u32, 5, 10, 14, 16, 0xdead] {
        header(&mem, t, 0);
        let d = run(&mem, &[r(HEADER, 16), w(STATUS, 1)], &info(false));
        assert_answer(&d, STATUS_UNSUPP);
    }
}

#[test]
fn malformed_chains_get_io_errors() {
    let mem = memory();
    let i = info(false);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("no header", vec![w(STATUS, 1)]),
        ("short header", vec![r(HEADER, 8), w(STATUS, 1)]),
        (
            "read with readable data",
            vec![r(HEADER, 16), r(DATA, 512), w(STATUS, 1)],
        ),
        (
            "misaligned read",
            vec![r(HEADER, 16), w(DATA, 100), w(STATUS, 1)],
        ),
        (
            "data outside guest memory",
            vec![r(HEADER, 16), w(MEM_SIZE - 256, 512), w(STATUS, 1)],
        ),
        (
            "readable after writable",
            vec![
                r(HEADER, 16),
                w(DATA, 512),
                r(DATA + 4096, 16),
                w(STATUS, 1),
            ],
        ),
    ];
    for (name, descs) in cases {
        let d = run(&mem, &descs, &i);
        match d.action {
            Action::Answer {
                status: STATUS_IOERR,
                used_len: 1,
            } => {}
            other => panic!("{name}: {other:?}"),
        }
    }

    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let d = run(&mem, &[r(HEADER, 16), w(DATA, 512), w(STATUS, 1)], &i);
    assert_answer(&d, STATUS_IOERR);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let d = run(&mem, &[r(HEADER, 16), r(DATA, 1000), w(STATUS, 1)], &i);
    assert_answer(&d, STATUS_IOERR);
}

#[test]
fn out_of_range_requests_are_io_errors() {
    let mem = memory();
    let last = CAPACITY / 512 - 1;
    header(&mem, VIRTIO_BLK_T_IN, last);
    let d = run(
        &mem,
        &[r(HEADER, 16), w(DATA, 512), w(STATUS, 1)],
        &info(false),
    );
    assert!(
        matches!(d.action, Action::Submit { .. }),
        "last sector is in range"
    );
    let d = run(
        &mem,
        &[r(HEADER, 16), w(DATA, 1024), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_IOERR);
    header(&mem, VIRTIO_BLK_T_IN, u64::MAX / 256);
    let d = run(
        &mem,
        &[r(HEADER, 16), w(DATA, 512), w(STATUS, 1)],
        &info(false),
    );
    assert_answer(&d, STATUS_IOERR);
}

#[test]
fn read_only_device_refuses_every_kind_of_write() {
    let mem = memory();
    segment(&mem, DATA, 0, 8, 0);
    for t in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_DISCARD,
    ] {
        header(&mem, t, 0);
        let d = run(
            &mem,
            &[r(HEADER, 16), r(DATA, 16), w(STATUS, 1)],
            &info(true),
        );
        assert_answer(&d, STATUS_IOERR);
    }
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let d = run(
        &mem,
        &[r(HEADER, 16), w(DATA, 512), w(STATUS, 1)],
        &info(true),
    );
    assert!(matches!(d.action, Action::Submit { .. }));
}

#[test]
fn chains_without_a_usable_status_byte_are_returned_unanswered() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("only readable", vec![r(HEADER, 16), r(DATA, 512)]),
        (
            "status readable",
            vec![r(HEADER, 16), w(DATA, 512), r(STATUS, 1)],
        ),
        ("status outside memory", vec![r(HEADER, 16), w(MEM_SIZE, 1)]),
    ];
    for (name, descs) in cases {
        let d = run(&mem, &descs, &info(false));
        assert!(matches!(d.action, Action::Discard), "{name}: {d:?}");
        assert_eq!(d.status_addr, None, "{name}");
    }
}

#[test]
fn a_reused_decoder_decodes_each_chain_as_a_fresh_one_does() {
    let mem = memory();
    let info = info(false);
    let chains: [(u32, &[RawDescriptor]); 4] = [
        (
            VIRTIO_BLK_T_IN,
            &[
                r(HEADER, 8),
                r(HEADER + 8, 8),
                w(DATA, 512),
                w(DATA + 0x1000, 513),
            ],
        ),
        (
            VIRTIO_BLK_T_OUT,
            &[r(HEADER, 16), r(DATA, 4096), w(STATUS, 1)],
        ),
        (
            VIRTIO_BLK_T_IN,
            &[r(HEADER, 16), w(DATA, 1024), w(STATUS, 1)],
        ),
        // Refused (readable after writable): nothing of the earlier chains may leak into it.
        (
            VIRTIO_BLK_T_IN,
            &[r(HEADER, 16), w(DATA, 512), r(DATA, 512), w(STATUS, 1)],
        ),
    ];
    let mut decoder = Decoder::default();
    for round in 0..2 {
        for (i, &(request_type, descs)) in chains.iter().enumerate() {
            header(&mem, request_type, 1);
            let queue = MockSplitQueue::new(&mem, 16);
            let reused = decoder.decode(queue.build_desc_chain(descs).unwrap(), &info);
            let fresh = run(&mem, descs, &info);
            assert_eq!(
                format!("{reused:?}"),
                format!("{fresh:?}"),
                "chain {i}, round {round}"
            );
            decoder.recycle(reused.data_in);
        }
    }
}

#[test]
fn scatter_gather_list_is_inline_for_short_chains_and_complete_for_long_ones() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    // One descriptor per page, each page elsewhere in guest memory, as a guest sends a buffer
    // of scattered pages.
    for pages in [1, 2, INLINE_DATA_SEGS, INLINE_DATA_SEGS + 3] {
        let addrs: Vec<u64> = (0..pages as u64).map(|i| DATA + i * 0x2000).collect();
        let mut descs = vec![r(HEADER, 16)];
        descs.extend(addrs.iter().map(|&a| r(a, 4096)));
        descs.push(w(STATUS, 1));
        let d = run(&mem, &descs, &info(false));
        match d.action {
            Action::Submit {
                kind: RequestKind::Write { offset: 0, bufs },
                used_len: 1,
            } => {
                let expected: Vec<DataSeg> = addrs
                    .iter()
                    .map(|&a| DataSeg {
                        ptr: host(&mem, a),
                        len: 4096,
                    })
                    .collect();
                assert_eq!(bufs[..], expected[..], "{pages} pages");
                assert_eq!(
                    bufs.spilled(),
                    pages > INLINE_DATA_SEGS,
                    "{pages} pages: only a list longer than the inline capacity is on the heap"
                );
            }
            other => panic!("{pages} pages: unexpected {other:?}"),
        }
    }
}

/// A header and a discard segment that each straddle the boundary between two memory regions
/// are read whole (the bytes are read through host addresses, a region at a time); one that
/// runs into a hole is refused.
#[test]
fn header_and_segment_across_memory_regions_are_read_whole() {
    // Two regions with a hole after the second: 0..0x10_0000 and 0x10_0000..0x20_0000.
    let mem: Mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(MEM_SIZE), MEM_SIZE as usize),
    ])
    .unwrap();
    let at = MEM_SIZE - 6;
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_DISCARD.to_le_bytes());
    h[16..24].copy_from_slice(&8u64.to_le_bytes()); // segment: sector 8
    h[24..28].copy_from_slice(&2u32.to_le_bytes()); // 2 sectors, no flags
    mem.write_slice(&h, GuestAddress(at)).unwrap();
    let d = run(&mem, &[r(at, 32), w(STATUS, 1)], &info(false));
    match d.action {
        Action::Submit {
            kind: RequestKind::Discard { offset, len },
            used_len: 1,
        } => assert_eq!((offset, len), (8 * 512, 1024)),
        other => panic!("unexpected {other:?}"),
    }
    // The header runs past the end of guest memory: refused, with the status still written.
    let end = 2 * MEM_SIZE - 8;
    let d = run(&mem, &[r(end, 16), w(STATUS, 1)], &info(false));
    assert_eq!(d.status_addr, Some(GuestAddress(STATUS)));
    assert_answer(&d, STATUS_IOERR);
}

/// The status byte lands in guest memory and its page in the dirty log; an address outside
/// guest memory is refused and marks nothing.
#[test]
fn status_writes_land_and_are_marked_dirty() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let region = mem.iter().next().unwrap();
    assert!(!region.bitmap().dirty_at(STATUS as usize));
    assert!(super::request::write_status(
        &mem,
        GuestAddress(STATUS + 7),
        STATUS_UNSUPP
    ));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 7)).unwrap(),
        STATUS_UNSUPP
    );
    assert!(region.bitmap().dirty_at(STATUS as usize + 7));
    assert!(!region.bitmap().dirty_at(STATUS as usize + 0x1000));
    assert!(!super::request::write_status(
        &mem,
        GuestAddress(MEM_SIZE),
        STATUS_OK
    ));
}
