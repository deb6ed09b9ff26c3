// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use super::*;

fn lines_equal(a: &[u8], b: &[u8], line: usize) -> bool {
    a[line * 64..(line + 1) * 64] == b[line * 64..(line + 1) * 64]
}

#[test]
fn persistence_names_round_trip() {
    for p in [Persistence::Pmem, Persistence::Msync, Persistence::Volatile] {
        assert_eq!(p.to_string().parse::<Persistence>().unwrap(), p);
    }
    assert!(matches!(
        "dax".parse::<Persistence>(),
        Err(MediaError::UnknownPersistence(_))
    ));
}

#[test]
fn recording_bounds_are_checked() {
    let m = RecordingMedia::new(4096).unwrap();
    let mut buf = [0u8; 8];
    assert!(m.read(4090, &mut buf).is_err());
    assert!(m.write(u64::MAX - 2, &buf).is_err());
    assert!(m.persist(4000, 200).is_err());
    assert!(m.slice_ptr(4096, 1).is_err());
    assert!(m.slice_ptr(4095, 1).is_ok());
}

#[test]
fn recording_unpersisted_lines_can_vanish_fenced_never() {
    let m = RecordingMedia::new(64 * 1024).unwrap();
    m.write(0, &[0xAA; 128]).unwrap(); // lines 0,1: persisted and fenced
    m.persist(0, 128).unwrap();
    m.fence().unwrap();
    m.write(4096, &[0xBB; 64]).unwrap(); // line 64: written only
    m.write(8192, &[0xCC; 64]).unwrap(); // line 128: persisted, not fenced
    m.persist(8192, 64).unwrap();

    let durable = m.durable_image();
    assert_eq!(&durable[0..128], &[0xAA; 128][..]);
    assert_eq!(&durable[4096..4160], &[0u8; 64][..]);
    assert_eq!(&durable[8192..8256], &[0u8; 64][..]);

    let mut saw_vanished = false;
    let mut saw_kept = false;
    for seed in 0..200 {
        let img = m.crash_image(seed);
        assert_eq!(
            &img[0..128],
            &[0xAA; 128][..],
            "fenced data lost, seed {seed}"
        );
        for off in [4096usize, 8192] {
            let byte = [0xBB, 0xCC][(off == 8192) as usize];
            for w in img[off..off + 64].chunks(8) {
                // Every word is all-old or all-new: 8-byte stores are atomic.
                assert!(w == [0u8; 8] || w == [byte; 8], "torn word {w:?}");
                saw_vanished |= w == [0u8; 8];
                saw_kept |= w == [byte; 8];
            }
        }
        // Deterministic from the seed.
        assert_eq!(img, m.crash_image(seed));
    }
    assert!(saw_vanished && saw_kept);
    m.fence().unwrap();
    assert!(lines_equal(&m.durable_image(), &[0xCC; 64 * 129], 128));
}

#[test]
fn recording_fence_is_per_thread() {
    let m = std::sync::Arc::new(RecordingMedia::new(8192).unwrap());
    m.write(0, &[1; 64]).unwrap();
    m.persist(0, 64).unwrap();
    let other = std::sync::Arc::clone(&m);
    std::thread::spawn(move || other.fence().unwrap())
        .join()
        .unwrap();
    assert_eq!(&m.durable_image()[..64], &[0u8; 64][..]);
    m.fence().unwrap();
    assert_eq!(&m.durable_image()[..64], &[1u8; 64][..]);
}

#[test]
fn recording_persist_snapshots_at_persist_time() {
    let m = RecordingMedia::new(4096).unwrap();
    m.write(0, &[1; 64]).unwrap();
    m.persist(0, 64).unwrap();
    m.write(0, &[2; 64]).unwrap(); // after persist: not covered by the coming fence
    m.fence().unwrap();
    assert_eq!(&m.durable_image()[..64], &[1u8; 64][..]);
    let mut seen = std::collections::HashSet::new();
    for seed in 0..64 {
        for w in m.crash_image(seed)[..64].chunks(8) {
            assert!(w == [1u8; 8] || w == [2u8; 8]);
            seen.insert(w[0]);
        }
    }
    assert_eq!(seen.len(), 2);
}

#[test]
fn recording_tracks_raw_pointer_writes_and_reopens_images() {
    let m = RecordingMedia::new(10_000).unwrap(); // not a multiple of the line size
    let p = m.slice_ptr(9_990, 10).unwrap();
    // SAFETY: 10 bytes inside the media, no concurrent access in this test.
    unsafe { std::ptr::write_bytes(p, 7, 10) };
    let mut buf = [0u8; 10];
    m.read(9_990, &mut buf).unwrap();
    assert_eq!(buf, [7; 10]);
    assert!((0..64).any(|s| m.crash_image(s)[9_990..] == [7; 10]));
    assert!((0..64).any(|s| m.crash_image(s)[9_990..] == [0; 10]));
    m.persist(9_990, 10).unwrap();
    m.fence().unwrap();
    let img = m.crash_image(3);
    assert_eq!(img.len(), 10_000);
    let reopened = RecordingMedia::from_image(img).unwrap();
    reopened.read(9_990, &mut buf).unwrap();
    assert_eq!(buf, [7; 10]);
    assert_eq!(reopened.durable_image(), m.durable_image());
}

#[test]
fn recording_concurrent_disjoint_writers() {
    let m = std::sync::Arc::new(RecordingMedia::new(4 * 4096).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let m = std::sync::Arc::clone(&m);
            std::thread::spawn(move || {
                let off = t as u64 * 4096;
                m.write(off, &[t + 1; 4096]).unwrap();
                m.persist(off, 4096).unwrap();
                m.fence().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let img = m.durable_image();
    for t in 0..4usize {
        assert!(img[t * 4096..(t + 1) * 4096]
            .iter()
            .all(|&b| b == t as u8 + 1));
    }
}

#[test]
fn mapped_ordinary_file_msync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.img");
    let opts = MediaOptions {
        create_size: Some(1 << 20),
        persistence: None,
    };
    let m = open_media(&path, &opts).unwrap();
    assert_eq!(m.len(), 1 << 20);
    // tmpfs or ext4 without DAX: MAP_SYNC is refused, so the mode falls back to msync.
    assert_eq!(m.persistence(), Persistence::Msync);
    m.write(5000, b"hello").unwrap();
    m.write(900_000, b"world").unwrap();
    m.persist(5000, 5).unwrap();
    m.persist(900_000, 5).unwrap();
    m.fence().unwrap();
    assert!(m.write(1 << 20, b"x").is_err());
    drop(m);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[5000..5005], b"hello");
    assert_eq!(&bytes[900_000..900_005], b"world");

    // Reopen without create_size: the existing size is used.
    let m = open_media(&path, &MediaOptions::default()).unwrap();
    let mut buf = [0u8; 5];
    m.read(5000, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
}

#[test]
fn mapped_refuses_pmem_on_non_dax_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.img");
    let err = match open_media(&path, &MediaOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("opened a missing file"),
    };
    assert!(matches!(err, MediaError::Io { .. }), "{err}");
    let opts = MediaOptions {
        create_size: Some(1 << 20),
        persistence: Some(Persistence::Pmem),
    };
    match open_media(&path, &opts) {
        Err(MediaError::Unsupported { reason, .. }) => assert!(reason.contains("DAX"), "{reason}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(m) => assert_eq!(m.persistence(), Persistence::Pmem), // a real DAX filesystem
    }
}

#[test]
fn mapped_volatile_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.img");
    let opts = MediaOptions {
        create_size: Some(64 << 10),
        persistence: Some(Persistence::Volatile),
    };
    let m = open_media(&path, &opts).unwrap();
    assert_eq!(m.persistence(), Persistence::Volatile);
    m.write_durable(100, b"abc").unwrap();
    let mut buf = [0u8; 3];
    m.read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"abc");
}

#[test]
fn cpu_write_back_runs_on_ordinary_memory() {
    // The pmem path cannot be mapped here, but its instructions work on any cached memory.
    let buf = vec![3u8; 1000];
    let insn = cpu_flush::detect();
    // SAFETY: the range is inside a live allocation.
    unsafe { cpu_flush::write_back(insn, buf.as_ptr().wrapping_add(5), 900) };
    cpu_flush::store_fence();
    assert!(buf.iter().all(|&b| b == 3));
}

#[test]
fn recording_msync_pages_reach_the_media_whole_and_fence_syncs_current_bytes() {
    let m = RecordingMedia::new_msync(4 * 4096).unwrap();
    assert_eq!(m.persistence(), Persistence::Msync);
    m.write(0, &[1; 100]).unwrap();
    m.persist(0, 100).unwrap();
    // Written after persist but before the fence: msync writes the page as it is then.
    m.write(200, &[2; 100]).unwrap();
    m.fence().unwrap();
    let d = m.durable_image();
    assert_eq!(&d[..100], &[1u8; 100][..]);
    assert_eq!(&d[200..300], &[2u8; 100][..]);

    // Page 1 goes through two states, page 2 through one; neither is synced.
    m.write(4096, &[3; 4096]).unwrap();
    m.write(4096, &[4; 10]).unwrap();
    let p = m.slice_ptr(2 * 4096 + 8, 8).unwrap();
    // SAFETY: 8 bytes inside the media, no concurrent access in this test.
    unsafe { std::ptr::write_bytes(p, 5, 8) };
    let pending = m.pending_lines();
    assert_eq!(pending.len(), 2, "pages 1 and 2 are not durable");
    let mut seen = std::collections::HashSet::new();
    for seed in 0..200 {
        let img = m.crash_image(seed);
        assert_eq!(img[..4096], d[..4096], "a synced page changed");
        let page1 = &img[4096..8192];
        let state = if page1 == [0; 4096] {
            0
        } else if page1 == [3; 4096] {
            3
        } else {
            assert_eq!(
                &page1[..10],
                &[4; 10][..],
                "page 1 torn: {:?}",
                &page1[..12]
            );
            assert!(page1[10..].iter().all(|&b| b == 3), "page 1 torn");
            4
        };
        seen.insert(state);
        let page2 = &img[2 * 4096..3 * 4096];
        assert!(page2 == &[0; 4096][..] || page2[8..16] == [5; 8]);
    }
    assert_eq!(
        seen.len(),
        3,
        "every state of page 1 is a possible crash image"
    );
    m.persist(4096, 1).unwrap();
    m.fence().unwrap();
    assert_eq!(m.pending_lines().len(), 1, "page 1 synced whole");
}

/// A 64-byte aligned buffer of `len` bytes filled with `fill`, for copies at chosen alignments.
struct LineBuf {
    words: Vec<[u64; 8]>,
}

impl LineBuf {
    fn new(len: usize, fill: u8) -> Self {
        let word = u64::from_ne_bytes([fill; 8]);
        LineBuf {
            words: vec![[word; 8]; len.div_ceil(64)],
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the vector's elements are plain integers, `len * 64` bytes in all.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.words.len() * 64) }
    }
}

/// Copy `len` bytes with `how` from source offset `src_at` to destination offset `dst_at`
/// (both from a line boundary) and check the destination holds exactly the source's bytes
/// there and its old bytes everywhere else.
fn check_pmem_copy(how: PmemCopy, dst_at: usize, src_at: usize, len: usize) {
    let mut src = LineBuf::new(src_at + len + 64, 0);
    // SAFETY: src_at + len bytes lie inside the buffer; pattern bytes are distinct per offset.
    let src_bytes = unsafe { std::slice::from_raw_parts_mut(src.ptr(), src_at + len) };
    for (i, b) in src_bytes.iter_mut().enumerate() {
        *b = (i * 7 + 1) as u8 | 1;
    }
    let mut dst = LineBuf::new(dst_at + len + 128, 0);
    let flush = cpu_flush::detect();
    // SAFETY: both ranges lie inside their own buffers, which do not overlap.
    unsafe {
        pmem_copy::copy_and_write_back(
            how,
            flush,
            dst.ptr().add(dst_at),
            src.ptr().add(src_at),
            len,
        )
    };
    cpu_flush::store_fence();
    let d = dst.bytes();
    let s = src.bytes();
    assert_eq!(
        &d[dst_at..dst_at + len],
        &s[src_at..src_at + len],
        "{how:?} dst+{dst_at} src+{src_at} len {len}: copied bytes differ"
    );
    assert!(
        d[..dst_at]
            .iter()
            .chain(&d[dst_at + len..])
            .all(|&b| b == 0),
        "{how:?} dst+{dst_at} src+{src_at} len {len}: bytes outside the range changed"
    );
}

#[test]
fn pmem_copy_matches_memcpy_at_every_edge() {
    // Lengths around a line, a few lines and a page; every destination alignment in a line
    // (head and tail partial, either empty, or both in one line) and source alignments that
    // break 16-byte loads.
    let lens = [
        0, 1, 7, 8, 15, 16, 31, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 4095,
        4096, 4097,
    ];
    for how in [PmemCopy::NonTemporal, PmemCopy::CacheThenWriteBack] {
        for dst_at in 0..64 {
            for src_at in [0, 1, 8, 15, 16, 33] {
                for len in lens {
                    check_pmem_copy(how, dst_at, src_at, len);
                }
            }
        }
    }
}

proptest::proptest! {
    #[test]
    fn pmem_copy_matches_memcpy(dst_at in 0usize..256, src_at in 0usize..128, len in 0usize..20_000) {
        check_pmem_copy(PmemCopy::NonTemporal, dst_at, src_at, len);
    }
}

/// Msync mode's streaming copy gives memcpy's bytes at every alignment of either end, and
/// touches nothing outside the range.
#[test]
fn streaming_copy_matches_memcpy_at_every_edge() {
    for dst_at in 0..64 {
        for src_at in [0, 1, 8, 15, 16, 33] {
            for len in [0, 1, 15, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097] {
                let mut src = LineBuf::new(src_at + len + 64, 0);
                // SAFETY: src_at + len bytes lie inside the buffer.
                let src_bytes = unsafe { std::slice::from_raw_parts_mut(src.ptr(), src_at + len) };
                for (i, b) in src_bytes.iter_mut().enumerate() {
                    *b = (i * 7 + 1) as u8 | 1;
                }
                let mut dst = LineBuf::new(dst_at + len + 128, 0);
                // SAFETY: both ranges lie inside their own buffers, which do not overlap.
                unsafe {
                    pmem_copy::copy_streaming(dst.ptr().add(dst_at), src.ptr().add(src_at), len)
                };
                let (d, s) = (dst.bytes(), src.bytes());
                assert_eq!(&d[dst_at..dst_at + len], &s[src_at..src_at + len]);
                assert!(d[..dst_at]
                    .iter()
                    .chain(&d[dst_at + len..])
                    .all(|&b| b == 0));
            }
        }
    }
}

/// In msync mode `write_from` puts the bytes in the file (what an msync makes durable and a
/// reopen reads back), not only in this process's view of it.
#[test]
fn mapped_msync_write_from_reaches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("media");
    let opts = MediaOptions {
        create_size: Some(1 << 20),
        persistence: Some(Persistence::Msync),
    };
    let data: Vec<u8> = (0..12_345u32).map(|i| (i * 13 + 5) as u8).collect();
    {
        let m = MappedMedia::open(&path, &opts).unwrap();
        // SAFETY: `data` is a live buffer outside the media.
        unsafe { m.write_from(4096 + 3, data.as_ptr(), data.len()) }.unwrap();
        let mut back = vec![0u8; data.len()];
        m.read(4096 + 3, &mut back).unwrap();
        assert_eq!(back, data);
        m.persist(4096 + 3, data.len() as u64).unwrap();
        m.fence().unwrap();
    }
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4096 + 3..4096 + 3 + data.len()], &data[..]);
    assert!(file[..4096 + 3].iter().all(|&b| b == 0));
}

#[test]
fn pmem_copy_method_follows_the_threshold() {
    assert_eq!(
        pmem_copy::method_for(NON_TEMPORAL_MIN - 1),
        PmemCopy::CacheThenWriteBack
    );
    assert_eq!(
        pmem_copy::method_for(NON_TEMPORAL_MIN),
        PmemCopy::NonTemporal
    );
}

#[test]
fn recording_write_and_persist_is_durable_only_after_the_fence() {
    // Non-temporal stores, like written-back lines, may reach the media in any order and in
    // any mix of 8-byte words until the fence; after it, all of them have.
    let m = RecordingMedia::new(64 * 1024).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 | 1).collect();
    let (at, len) = (4096 + 24, 8000);
    // SAFETY: `data` is a live buffer of at least `len` bytes, apart from the media.
    unsafe { m.write_and_persist(at, data.as_ptr(), len) }.unwrap();
    let range = at as usize..at as usize + len;
    assert!(m.durable_image()[range.clone()].iter().all(|&b| b == 0));
    let (mut saw_lost, mut saw_kept) = (false, false);
    for seed in 0..50 {
        let img = m.crash_image(seed);
        for (got, want) in img[range.clone()].chunks(8).zip(data.chunks(8)) {
            saw_lost |= got.iter().all(|&b| b == 0);
            saw_kept |= got == want;
        }
    }
    assert!(saw_lost && saw_kept, "lost {saw_lost}, kept {saw_kept}");
    m.fence().unwrap();
    assert_eq!(&m.durable_image()[range.clone()], &data[..len]);
    for seed in 0..20 {
        assert_eq!(&m.crash_image(seed)[range.clone()], &data[..len]);
    }
}

#[test]
fn write_and_persist_checks_bounds() {
    let m = RecordingMedia::new(4096).unwrap();
    let data = [1u8; 64];
    // SAFETY: `data` is a live buffer of 64 bytes, apart from the media.
    let r = unsafe { m.write_and_persist(4090, data.as_ptr(), 64) };
    assert!(matches!(r, Err(MediaError::OutOfRange { .. })));
}
