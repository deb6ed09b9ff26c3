// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of opening, creating and synchronous I/O on a backing image.

use std::os::unix::fs::MetadataExt;

use super::testutil::{direct_dir, new_image, pattern};
use super::{BackingError, BackingImage, BackingOptions};

const MIB: u64 = 1 << 20;

fn buffered() -> BackingOptions {
    BackingOptions {
        read_only: false,
        direct: false,
    }
}

#[test]
fn open_reports_size_identity_and_alignment() {
    let dir = direct_dir();
    let (path, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    assert_eq!(image.size(), MIB);
    assert_eq!(image.path(), path);
    assert!(!image.read_only());
    assert!(image.is_direct());
    assert!(image.alignment().is_power_of_two() && image.alignment() >= 512);
    let meta = std::fs::metadata(&path).unwrap();
    let id = image.identity();
    assert_eq!(id.size, MIB);
    assert!(!id.is_block_device);
    assert_eq!((id.dev, id.ino), (meta.dev(), meta.ino()));
}

#[test]
fn sync_round_trip_aligned_unaligned_and_misaligned_memory() {
    let dir = direct_dir();
    for opts in [BackingOptions::default(), buffered()] {
        let (_, image) = new_image(dir.path(), &format!("img-{}", opts.direct), MIB, &opts);
        let cases: [(u64, usize, usize); 4] = [
            (0, 8192, 0),
            (4096, 512, 1),
            (513, 1000, 0),
            (MIB - 7, 7, 3),
        ];
        for (i, &(offset, len, mem_shift)) in cases.iter().enumerate() {
            let data = pattern(i as u64, len);
            let mut src = vec![0u8; len + mem_shift];
            src[mem_shift..].copy_from_slice(&data);
            image.write_at(offset, &src[mem_shift..]).unwrap();
            let mut back = vec![0u8; len + 5];
            image.read_at(offset, &mut back[5..]).unwrap();
            assert_eq!(&back[5..], &data[..], "case {i} direct={}", opts.direct);
        }
    }
}

#[test]
fn sub_block_write_keeps_its_neighbours() {
    let dir = direct_dir();
    let (_, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    let base = pattern(7, 8192);
    image.write_at(0, &base).unwrap();
    image.write_at(100, &[0xAB; 10]).unwrap();
    let mut back = vec![0u8; 8192];
    image.read_at(0, &mut back).unwrap();
    let mut expect = base.clone();
    expect[100..110].fill(0xAB);
    assert_eq!(back, expect);
}

#[test]
fn out_of_range_is_an_error() {
    let dir = direct_dir();
    let (_, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    let mut buf = vec![0u8; 1024];
    assert!(image.read_at(MIB - 512, &mut buf).is_err());
    assert!(image.write_at(MIB, &buf).is_err());
    assert!(image.write_zeroes(MIB - 512, 1024, false).is_err());
    assert!(image.read_at(u64::MAX - 10, &mut buf).is_err());
}

#[test]
fn read_only_refuses_writes() {
    let dir = direct_dir();
    let (path, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    image.write_at(0, &[9u8; 512]).unwrap();
    drop(image);
    let ro = BackingOptions {
        read_only: true,
        ..Default::default()
    };
    let image = BackingImage::open(&path, &ro).unwrap();
    assert!(image.read_only());
    let err = image.write_at(0, &[1u8; 512]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(image.write_zeroes(0, 512, true).is_err());
    assert!(image.discard(0, 512).is_err());
    let mut back = [0u8; 512];
    image.read_at(0, &mut back).unwrap();
    assert_eq!(back, [9u8; 512]);
}

#[test]
fn create_sparse_refuses_to_overwrite_and_bad_sizes() {
    let dir = direct_dir();
    let (path, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    image.write_at(0, &[5u8; 512]).unwrap();
    let err = BackingImage::create_sparse(&path, 2 * MIB).unwrap_err();
    assert!(matches!(err, BackingError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
    let mut back = [0u8; 512];
    image.read_at(0, &mut back).unwrap();
    assert_eq!(back, [5u8; 512]);
    for size in [0, 1000] {
        let err = BackingImage::create_sparse(&dir.path().join(format!("bad{size}")), size);
        assert!(matches!(err, Err(BackingError::BadSize { .. })));
    }
}

#[test]
fn open_rejects_missing_paths_directories_and_odd_sizes() {
    let dir = direct_dir();
    let missing = dir.path().join("missing");
    let err = BackingImage::open(&missing, &BackingOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, BackingError::Open { .. }));
    assert!(err.to_string().contains("missing"));
    let err = BackingImage::open(dir.path(), &BackingOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, BackingError::NotFileOrBlockDevice { .. }));
    let odd = dir.path().join("odd");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let err = BackingImage::open(&odd, &BackingOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, BackingError::BadSize { size: 1000, .. }));
}

#[test]
fn write_zeroes_and_discard_read_back_zeroes() {
    let dir = direct_dir();
    for opts in [BackingOptions::default(), buffered()] {
        let (_, image) = new_image(dir.path(), &format!("img-{}", opts.direct), MIB, &opts);
        let ranges: [(u64, u64, u8); 4] = [
            (0, 65536, 0),
            (70000, 3000, 1),
            (131072, 4096, 2),
            (200000, 100_000, 3),
        ];
        for &(offset, len, how) in &ranges {
            let start = offset.saturating_sub(512);
            let fill = pattern(offset, (len + 1024) as usize);
            image.write_at(start, &fill).unwrap();
            match how {
                0 => image.write_zeroes(offset, len, false).unwrap(),
                1 => image.write_zeroes(offset, len, true).unwrap(),
                _ => image.discard(offset, len).unwrap(),
            }
            let mut back = vec![0xFFu8; (len + 1024) as usize];
            image.read_at(start, &mut back).unwrap();
            let head = (offset - start) as usize;
            assert_eq!(&back[..head], &fill[..head]);
            assert!(back[head..head + len as usize].iter().all(|&b| b == 0));
            assert_eq!(&back[head + len as usize..], &fill[head + len as usize..]);
        }
        image.flush().unwrap();
    }
}

#[test]
fn tmpfs_images_open() {
    // Users put images in /dev/shm or a tmpfs /tmp: with or without O_DIRECT support there,
    // opening must work (direct I/O when the kernel allows it, else the buffered fallback).
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        return;
    };
    let (_, image) = new_image(dir.path(), "img", MIB, &BackingOptions::default());
    image.write_at(512, &[3u8; 512]).unwrap();
    let mut back = [0u8; 512];
    image.read_at(512, &mut back).unwrap();
    assert_eq!(back, [3u8; 512]);
}
