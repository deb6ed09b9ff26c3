// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the io_uring queue against real files.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use super::bounce::AlignedBuf;
use super::testutil::{direct_dir, new_image, pattern};
use super::{BackingImage, BackingOptions, BackingQueue};
use crate::engine::DataSeg;

const MIB: u64 = 1 << 20;

fn seg(buf: &mut [u8]) -> DataSeg {
    DataSeg {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    }
}

fn both_modes() -> [BackingOptions; 2] {
    [
        BackingOptions::default(),
        BackingOptions {
            read_only: false,
            direct: false,
        },
    ]
}

/// Wait for everything and return the results by user_data, checking each came exactly once.
fn wait_all(queue: &mut BackingQueue) -> HashMap<u64, io::Result<()>> {
    let mut out = Vec::new();
    queue.wait(&mut out);
    assert_eq!(queue.in_flight(), 0);
    let mut by_tag = HashMap::new();
    for (tag, result) in out {
        assert!(
            by_tag.insert(tag, result).is_none(),
            "tag {tag} completed twice"
        );
    }
    by_tag
}

fn assert_all_ok(results: &HashMap<u64, io::Result<()>>, count: u64) {
    assert_eq!(results.len() as u64, count);
    for (tag, result) in results {
        assert!(result.is_ok(), "request {tag}: {result:?}");
    }
}

fn image_in(dir: &tempfile::TempDir, opts: &BackingOptions) -> Arc<BackingImage> {
    new_image(dir.path(), &format!("img-{}", opts.direct), 4 * MIB, opts).1
}

#[test]
fn aligned_zero_copy_requests_round_trip_with_many_in_flight() {
    let dir = direct_dir();
    for opts in both_modes() {
        let image = image_in(&dir, &opts);
        let align = image.alignment();
        // Depth 4 with 16 requests: the rest wait inside the queue.
        let mut queue = BackingQueue::new(image.clone(), 4).unwrap();
        let mut bufs: Vec<AlignedBuf> = patterned_bufs(16, 4 * align, align);
        for (i, buf) in bufs.iter_mut().enumerate() {
            let offset = (i * 8 * align) as u64;
            queue.write(offset, &[seg(buf.as_mut_slice())], i % 2 == 0, i as u64);
        }
        assert_eq!(queue.in_flight(), 16);
        assert_all_ok(&wait_all(&mut queue), 16);

        let mut back: Vec<AlignedBuf> = (0..16)
            .map(|_| AlignedBuf::zeroed(4 * align, align))
            .collect();
        for (i, buf) in back.iter_mut().enumerate() {
            queue.read(
                (i * 8 * align) as u64,
                &[seg(buf.as_mut_slice())],
                100 + i as u64,
            );
        }
        assert_all_ok(&wait_all(&mut queue), 16);
        for (i, buf) in back.iter().enumerate() {
            assert_eq!(
                buf.as_slice(),
                &pattern(i as u64, 4 * align)[..],
                "request {i}"
            );
            let mut sync = vec![0u8; 4 * align];
            image.read_at((i * 8 * align) as u64, &mut sync).unwrap();
            assert_eq!(sync, buf.as_slice());
        }
    }
}

#[test]
fn unaligned_memory_and_offsets_bounce() {
    let dir = direct_dir();
    for opts in both_modes() {
        let image = image_in(&dir, &opts);
        let base = pattern(99, 64 * 1024);
        image.write_at(0, &base).unwrap();
        let mut expect = base.clone();
        let mut queue = BackingQueue::new(image.clone(), 8).unwrap();
        // (offset, len, memory shift): misaligned memory only, then sub-block offsets/lengths.
        let cases: [(u64, usize, usize); 5] = [
            (4096, 4096, 1),
            (8192, 1000, 0),
            (12345, 777, 3),
            (20000, 9000, 5),
            (40960, 512, 7),
        ];
        let mut sources: Vec<Vec<u8>> = Vec::new();
        for (i, &(offset, len, shift)) in cases.iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            expect[offset as usize..offset as usize + len].copy_from_slice(&data);
            let mut src = vec![0u8; len + shift];
            src[shift..].copy_from_slice(&data);
            sources.push(src);
        }
        for (i, src) in sources.iter_mut().enumerate() {
            let (offset, _, shift) = cases[i];
            queue.write(offset, &[seg(&mut src[shift..])], false, i as u64);
        }
        assert_all_ok(&wait_all(&mut queue), cases.len() as u64);

        let mut reads: Vec<Vec<u8>> = cases
            .iter()
            .map(|&(_, len, _)| vec![0u8; len + 3])
            .collect();
        for (i, buf) in reads.iter_mut().enumerate() {
            queue.read(cases[i].0, &[seg(&mut buf[3..])], i as u64);
        }
        assert_all_ok(&wait_all(&mut queue), cases.len() as u64);
        for (i, buf) in reads.iter().enumerate() {
            let (offset, len, _) = cases[i];
            assert_eq!(
                &buf[3..],
                &expect[offset as usize..offset as usize + len],
                "case {i}"
            );
        }
        let mut whole = vec![0u8; expect.len()];
        image.read_at(0, &mut whole).unwrap();
        assert_eq!(whole, expect, "direct={}", opts.direct);
    }
}

#[test]
fn concurrent_sub_block_writes_to_one_block_all_land() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let mut queue = BackingQueue::new(image.clone(), 16).unwrap();
    let mut pieces: Vec<Vec<u8>> = (0..32).map(|i| vec![i as u8 + 1; 16]).collect();
    // 32 writes of 16 bytes inside the first 512 bytes, all in flight together.
    for (i, piece) in pieces.iter_mut().enumerate() {
        queue.write(i as u64 * 16, &[seg(piece)], false, i as u64);
    }
    assert_all_ok(&wait_all(&mut queue), 32);
    let mut back = vec![0u8; 512];
    image.read_at(0, &mut back).unwrap();
    for i in 0..32 {
        assert!(
            back[i * 16..i * 16 + 16].iter().all(|&b| b == i as u8 + 1),
            "piece {i}"
        );
    }
}

#[test]
fn two_threads_patch_the_same_blocks() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let image = image.clone();
            std::thread::spawn(move || {
                let mut queue = BackingQueue::new(image, 8).unwrap();
                let mut pieces: Vec<Vec<u8>> = (0..64).map(|_| vec![t + 1; 8]).collect();
                for (i, piece) in pieces.iter_mut().enumerate() {
                    // Thread t owns the 8-byte pieces at even (t = 0) or odd (t = 1) slots.
                    let offset = (2 * i as u64 + t as u64) * 8;
                    queue.write(offset, &[seg(piece)], false, i as u64);
                }
                assert_all_ok(&wait_all(&mut queue), 64);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut back = vec![0u8; 1024];
    image.read_at(0, &mut back).unwrap();
    for slot in 0..128 {
        let want = (slot % 2) as u8 + 1;
        assert!(
            back[slot * 8..slot * 8 + 8].iter().all(|&b| b == want),
            "slot {slot}"
        );
    }
}

#[test]
fn scatter_gather_segments_round_trip() {
    let dir = direct_dir();
    for opts in both_modes() {
        let image = image_in(&dir, &opts);
        let align = image.alignment();
        let mut queue = BackingQueue::new(image.clone(), 8).unwrap();
        let data = pattern(5, 6 * align);
        let mut a = AlignedBuf::zeroed(align, align);
        let mut b = AlignedBuf::zeroed(2 * align, align);
        let mut c = AlignedBuf::zeroed(3 * align, align);
        a.as_mut_slice().copy_from_slice(&data[..align]);
        b.as_mut_slice().copy_from_slice(&data[align..3 * align]);
        c.as_mut_slice().copy_from_slice(&data[3 * align..]);
        let segs = [
            seg(a.as_mut_slice()),
            seg(b.as_mut_slice()),
            seg(c.as_mut_slice()),
        ];
        queue.write(align as u64, &segs, false, 1);
        // A misaligned scatter list bounces as a whole.
        let mut odd = vec![0u8; 101];
        let mut rest = vec![0u8; 6 * align - 101];
        let copy = pattern(6, 6 * align);
        odd.copy_from_slice(&copy[..101]);
        rest.copy_from_slice(&copy[101..]);
        queue.write(16 * align as u64, &[seg(&mut odd), seg(&mut rest)], true, 2);
        assert_all_ok(&wait_all(&mut queue), 2);

        let mut x = AlignedBuf::zeroed(3 * align, align);
        let mut y = AlignedBuf::zeroed(3 * align, align);
        queue.read(
            align as u64,
            &[seg(x.as_mut_slice()), seg(y.as_mut_slice())],
            3,
        );
        let mut p = vec![0u8; 7];
        let mut q = vec![0u8; 6 * align - 7];
        queue.read(16 * align as u64, &[seg(&mut p), seg(&mut q)], 4);
        assert_all_ok(&wait_all(&mut queue), 2);
        assert_eq!(x.as_slice(), &data[..3 * align]);
        assert_eq!(y.as_slice(), &data[3 * align..]);
        assert_eq!(p, copy[..7]);
        assert_eq!(q, copy[7..]);
    }
}

#[test]
fn flush_completes() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let mut queue = BackingQueue::new(image, 2).unwrap();
    let mut data = vec![1u8; 512];
    queue.write(0, &[seg(&mut data)], false, 1);
    queue.flush(2);
    assert_all_ok(&wait_all(&mut queue), 2);
}

#[test]
fn zeroes_and_discards_read_back_zeroes() {
    let dir = direct_dir();
    for opts in both_modes() {
        let image = image_in(&dir, &opts);
        let fill = pattern(3, 2 * MIB as usize);
        image.write_at(0, &fill).unwrap();
        let mut queue = BackingQueue::new(image.clone(), 4).unwrap();
        let ranges: [(u64, u64); 6] = [
            (0, 4096),
            (8192, 65536),
            (100_000, 3333),
            (300_000, 512),
            (400_000, MIB),
            (1_500_000, 4096),
        ];
        queue.write_zeroes(ranges[0].0, ranges[0].1, false, 0);
        queue.write_zeroes(ranges[1].0, ranges[1].1, true, 1);
        queue.discard(ranges[2].0, ranges[2].1, 2);
        queue.write_zeroes_dsync(ranges[3].0, ranges[3].1, false, 3);
        queue.discard_dsync(ranges[4].0, ranges[4].1, 4);
        queue.write_zeroes(ranges[5].0, ranges[5].1, false, 5);
        assert_all_ok(&wait_all(&mut queue), 6);
        let mut expect = fill.clone();
        for &(offset, len) in &ranges {
            expect[offset as usize..(offset + len) as usize].fill(0);
        }
        let mut back = vec![0xEEu8; fill.len()];
        image.read_at(0, &mut back).unwrap();
        assert!(back == expect, "direct={}", opts.direct);
    }
}

#[test]
fn read_only_queue_refuses_writes() {
    let dir = direct_dir();
    let (path, _) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    let ro = BackingOptions {
        read_only: true,
        ..Default::default()
    };
    let image = BackingImage::open(&path, &ro).unwrap();
    let mut queue = BackingQueue::new(image, 4).unwrap();
    let mut data = vec![1u8; 512];
    queue.write(0, &[seg(&mut data)], false, 1);
    queue.write_zeroes(0, 512, false, 2);
    queue.discard(0, 512, 3);
    queue.read(0, &[seg(&mut data)], 4);
    let results = wait_all(&mut queue);
    for tag in 1..=3 {
        let err = results[&tag].as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "request {tag}");
    }
    assert!(results[&4].is_ok());
    assert_eq!(data, vec![0u8; 512]);
}

#[test]
fn failures_come_back_as_error_completions() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let mut queue = BackingQueue::new(image.clone(), 4).unwrap();
    let mut buf = vec![0u8; 1024];
    queue.read(4 * MIB - 512, &[seg(&mut buf)], 1);
    queue.write(4 * MIB, &[seg(&mut buf)], false, 2);
    queue.write_zeroes(u64::MAX - 511, 512, false, 3);
    // An address the kernel cannot write to: the ring reports EFAULT.
    let bad = DataSeg {
        ptr: std::ptr::null_mut(),
        len: image.alignment(),
    };
    queue.read(0, &[bad], 4);
    let results = wait_all(&mut queue);
    assert_eq!(results.len(), 4);
    for tag in 1..=3 {
        let err = results[&tag].as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "request {tag}");
    }
    let err = results[&4].as_ref().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
}

#[test]
fn doorbell_rings_when_completions_are_ready() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let mut queue = BackingQueue::new(image, 4).unwrap();
    let mut pfd = libc::pollfd {
        fd: queue.event_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    queue.flush(7);
    // SAFETY: one valid pollfd; blocks until the flush completion rings the doorbell.
    let ready = unsafe { libc::poll(&mut pfd, 1, -1) };
    assert_eq!(ready, 1);
    let mut out = Vec::new();
    while out.is_empty() {
        queue.reap(&mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 7);
    assert!(out[0].1.is_ok());
    assert_eq!(queue.in_flight(), 0);
    // Reaping cleared the doorbell.
    pfd.revents = 0;
    // SAFETY: as above, without blocking.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(ready, 0);
}

/// A zeroing must not run while a read-modify-write cycle holds one of its blocks: the cycle
/// would write the block's old bytes back over the zeroes.
#[test]
fn zeroing_waits_for_a_read_modify_write_of_its_block() {
    let dir = direct_dir();
    let (path, image) = new_image(dir.path(), "img", 2 * MIB, &BackingOptions::default());
    let old = pattern(5, 4096);
    image.write_at(0, &old).unwrap();
    let mut queue = BackingQueue::new(image.clone(), 4).unwrap();

    // Another queue's cycle on block [0, 4096) has read the block and not written it back.
    assert!(image.rmw_locks.try_lock(0, 4096));
    queue.write_zeroes(512, 512, false, 7);
    let mut done = Vec::new();
    let started = std::time::Instant::now();
    while done.is_empty() && started.elapsed() < std::time::Duration::from_millis(300) {
        queue.reap(&mut done);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        done.is_empty(),
        "the zeroing ran while the block was held: {done:?}"
    );
    // The cycle writes the block back (its own sector changed, the rest as it read it).
    let mut patched = old.clone();
    patched[3584..].fill(0xAB);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &patched, 0).unwrap();
    file.sync_data().unwrap();
    image.rmw_locks.unlock(0, 4096);

    queue.wait(&mut done);
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok(), "{:?}", done[0].1);
    let mut back = vec![0xEEu8; 4096];
    image.read_at(0, &mut back).unwrap();
    let mut expect = patched;
    expect[512..1024].fill(0);
    assert!(back == expect, "the zeroing was undone by the cycle");
}

#[test]
fn deferred_requests_enter_the_ring_together_at_reap_and_complete() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let align = image.alignment();
    let mut queue = BackingQueue::new(image.clone(), 8).unwrap();
    queue.defer_submit(usize::MAX);
    let mut bufs: Vec<AlignedBuf> = patterned_bufs(3, align, align);
    for i in 0..bufs.len() {
        write_block(&mut queue, &mut bufs, i, align);
    }
    assert_eq!(
        queue.unsubmitted(),
        3,
        "the writes were submitted one by one"
    );
    let mut out = Vec::new();
    queue.reap(&mut out);
    assert!(queue.unsubmitted() == 0, "reap left the batch unsubmitted");
    out.extend(wait_all(&mut queue));
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
    let mut back = AlignedBuf::zeroed(3 * align, align);
    queue.read(0, &[seg(back.as_mut_slice())], 9);
    assert_all_ok(&wait_all(&mut queue), 1);
    for i in 0..3 {
        assert!(back.as_slice()[i * align..(i + 1) * align] == pattern(i as u64, align)[..]);
    }
}

#[test]
fn wait_gives_deferred_requests_to_the_kernel_in_one_call_even_beyond_the_ring() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let align = image.alignment();
    // More requests than the ring holds: the rest enter as earlier ones complete.
    let mut queue = BackingQueue::new(image.clone(), 4).unwrap();
    queue.defer_submit(usize::MAX);
    let mut bufs: Vec<AlignedBuf> = patterned_bufs(10, align, align);
    for i in 0..3 {
        write_block(&mut queue, &mut bufs, i, align);
    }
    assert_eq!(queue.unsubmitted(), 3, "deferred writes entered the kernel");
    assert_all_ok(&wait_all(&mut queue), 3);
    assert_eq!(
        queue.submissions(),
        1,
        "the batch and the wait for it take one system call"
    );
    for i in 3..bufs.len() {
        write_block(&mut queue, &mut bufs, i, align);
    }
    assert_all_ok(&wait_all(&mut queue), 7);
    let mut back = AlignedBuf::zeroed(10 * align, align);
    queue.read(0, &[seg(back.as_mut_slice())], 99);
    assert_all_ok(&wait_all(&mut queue), 1);
    for i in 0..10 {
        assert!(back.as_slice()[i * align..(i + 1) * align] == pattern(i as u64, align)[..]);
    }
}

#[test]
fn deferred_requests_enter_the_kernel_in_groups_when_a_group_is_set() {
    let dir = direct_dir();
    let image = image_in(&dir, &BackingOptions::default());
    let align = image.alignment();
    let mut queue = BackingQueue::new(image.clone(), 16).unwrap();
    queue.defer_submit(4);
    let mut bufs: Vec<AlignedBuf> = patterned_bufs(6, align, align);
    for i in 0..bufs.len() {
        write_block(&mut queue, &mut bufs, i, align);
        // The fourth request takes the first four into the kernel; the fifth and sixth wait.
        let waiting = if i < 3 { i + 1 } else { i - 3 };
        assert_eq!(queue.unsubmitted(), waiting, "after request {i}");
    }
    assert_eq!(
        queue.submissions(),
        1,
        "the group of four took one system call"
    );
    let mut out = Vec::new();
    queue.reap(&mut out);
    assert_eq!(
        queue.unsubmitted(),
        0,
        "reap left the rest of the batch unsubmitted"
    );
    out.extend(wait_all(&mut queue));
    assert_eq!(out.len(), 6);
    assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
}

/// `count` buffers of `len` bytes aligned for the image, buffer `i` holding `pattern(i, len)`.
fn patterned_bufs(count: u64, len: usize, align: usize) -> Vec<AlignedBuf> {
    (0..count)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(len, align);
            b.as_mut_slice().copy_from_slice(&pattern(i, len));
            b
        })
        .collect()
}

/// Writes `bufs[i]` at block `i` (blocks of `align` bytes) with tag `i`.
fn write_block(queue: &mut BackingQueue, bufs: &mut [AlignedBuf], i: usize, align: usize) {
    queue.write(
        (i * align) as u64,
        &[seg(bufs[i].as_mut_slice())],
        false,
        i as u64,
    );
}
