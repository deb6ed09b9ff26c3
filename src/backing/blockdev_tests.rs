// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests on a real block device: a loop device with 4096-byte logical blocks, so the block
//! device ioctls, device fallocate and read-modify-write of sub-block requests all run.
//! Ignored by default: they need root and a free loop device
//! (`cargo test --lib backing::blockdev_tests -- --ignored`).

use super::testutil::loop_device::Loop;
use super::testutil::{direct_dir, pattern};
use super::{BackingImage, BackingOptions, BackingQueue};
use crate::engine::DataSeg;

const SIZE: u64 = 8 << 20;

#[test]
#[ignore = "needs root and a free loop device"]
fn loop_device_with_4k_blocks() {
    let dir = direct_dir();
    let file = dir.path().join("disk");
    BackingImage::create_sparse(&file, SIZE).unwrap();
    let dev = Loop::attach_with_sector_size(&file, 4096)
        .expect("a loop device with 4 KiB blocks (needs root)");
    let image = BackingImage::open(dev.device(), &BackingOptions::default()).unwrap();
    assert_eq!(image.size(), SIZE);
    assert_eq!(image.alignment(), 4096);
    assert!(image.is_direct());
    let id = image.identity();
    assert!(id.is_block_device);
    assert_eq!(id.ino, 0);

    let base = pattern(1, 64 * 1024);
    image.write_at(0, &base).unwrap();
    let mut expect = base.clone();
    let mut queue = BackingQueue::new(image.clone(), 8).unwrap();
    // 512-byte writes into the same 4 KiB blocks, all in flight together.
    let mut pieces: Vec<Vec<u8>> = (0..16).map(|i| vec![0xA0 + i as u8; 512]).collect();
    for (i, piece) in pieces.iter_mut().enumerate() {
        let offset = i as u64 * 1024 + 512;
        expect[offset as usize..offset as usize + 512].copy_from_slice(piece);
        let seg = DataSeg {
            ptr: piece.as_mut_ptr(),
            len: piece.len(),
        };
        queue.write(offset, &[seg], false, i as u64);
    }
    queue.write_zeroes(32768 + 512, 1024, false, 100);
    queue.discard(40960, 8192, 101);
    queue.write_zeroes(49152, 4096, true, 102);
    queue.flush(103);
    let mut done = Vec::new();
    queue.wait(&mut done);
    assert_eq!(done.len(), 20);
    for (tag, result) in &done {
        assert!(result.is_ok(), "request {tag}: {result:?}");
    }
    expect[32768 + 512..32768 + 1536].fill(0);
    expect[40960..49152].fill(0);
    expect[49152..53248].fill(0);
    let mut back = vec![0u8; expect.len()];
    image.read_at(0, &mut back).unwrap();
    assert!(back == expect);
}
