// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replay of a formatted cache whose metadata is overwritten with arbitrary bytes: the global
//! records, every segment's info and generation pages, and the start of every data area
//! (where the key log lives). The input may ask for the CRCs of what it overwrote to be made
//! correct again, so replay's checks behind the CRCs are reached. Replay may refuse the cache
//! with an error, never panic; the offline checker must judge the same image without panicking.
#![no_main]

use std::os::fd::FromRawFd;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use memmap2::{MmapMut, MmapOptions};
use vhost_user_pcache::backing::{BackingImage, BackingOptions};
use vhost_user_pcache::cache::driver::Driver;
use vhost_user_pcache::cache::format::{
    kset_size, Layout, RecordKind, CRC_SEED, FORMAT_VERSION, KSET_FLAG_LAST, KSET_HEADER_SIZE,
    KSET_MAGIC, KSET_MAX_KEYS, SEGMENTS_OFFSET, SEGMENT_DATA_OFFSET, SUPERBLOCK_OFFSET,
};
use vhost_user_pcache::cache::media::{Media, MediaError, Persistence};
use vhost_user_pcache::cache::replay::{backing_id, min_segments, replay_only};
use vhost_user_pcache::cache::{check, CacheEngine, CacheOptions, SEGMENT_SIZE};
use vhost_user_pcache::engine::Engine;

const DISK: u64 = 8 << 20;
/// Bytes of each data area the input may overwrite (the first ksets of a log segment).
const LOG_WINDOW: u64 = 64 << 10;

/// A media over a mapping: a private copy-on-write view of the formatted image, so each run
/// starts from it and pays only for the pages it changes.
struct MapMedia {
    base: *mut u8,
    len: u64,
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, owned by this object; accesses follow the Media contract.
unsafe impl Send for MapMedia {}
// SAFETY: as above.
unsafe impl Sync for MapMedia {}

impl MapMedia {
    fn new(mut map: MmapMut) -> MapMedia {
        MapMedia {
            base: map.as_mut_ptr(),
            len: map.len() as u64,
            _map: map,
        }
    }

    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as self; one thread uses it.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len as usize) }
    }
}

impl Media for MapMedia {
    fn len(&self) -> u64 {
        self.len
    }
    fn persistence(&self) -> Persistence {
        Persistence::Pmem
    }
    fn persist(&self, offset: u64, len: u64) -> Result<(), MediaError> {
        self.slice_ptr(offset, len).map(drop)
    }
    fn fence(&self) -> Result<(), MediaError> {
        Ok(())
    }
    fn slice_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, MediaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset + len is inside the mapping (checked above).
                Ok(unsafe { self.base.add(offset as usize) })
            }
            _ => Err(MediaError::OutOfRange {
                offset,
                len,
                media_len: self.len,
            }),
        }
    }
}

struct Base {
    /// The formatted image, in an in-memory file.
    image: std::fs::File,
    len: u64,
    n_segments: u32,
    backing: Arc<BackingImage>,
    opts: CacheOptions,
}

fn options() -> CacheOptions {
    CacheOptions {
        path: "fuzz-cache".into(),
        create_size: None,
        persistence: None,
        data_crc: Some(true),
        gc_percent: None,
        queues: 1,
        force_format: false,
        drain_on_shutdown: false,
        journal_dir: None,
        pacing: Default::default(),
    }
}

/// Format a cache and write to it, so its log holds ksets of every kind of key.
fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pcache-fuzz-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("backing.img");
        let _ = std::fs::remove_file(&path);
        BackingImage::create_sparse(&path, DISK).unwrap();
        let backing = BackingImage::open(&path, &BackingOptions::default()).unwrap();
        let n_segments = min_segments(1);
        let len = Layout::media_len_for(n_segments);
        let media = Arc::new(MapMedia::new(MmapMut::map_anon(len as usize).unwrap()));
        let opts = options();
        let engine = CacheEngine::open_with_media(&opts, media.clone(), backing.clone()).unwrap();
        let mut d = Driver::new(&engine);
        for i in 0..40u64 {
            let off = (i * 37 % 2000) * 4096 + (i % 8) * 512;
            d.write(0, off, &vec![i as u8 + 1; 512 * (1 + i as usize % 9)])
                .unwrap();
            if i % 7 == 0 {
                d.write_zeroes(0, off + (1 << 20), 4096).unwrap();
            }
            if i % 5 == 0 {
                d.flush(0).unwrap();
            }
        }
        drop(d);
        engine.shutdown().unwrap();
        drop(engine);
        // SAFETY: a plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"pcache-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let image = unsafe { std::fs::File::from_raw_fd(fd) };
        std::os::unix::fs::FileExt::write_all_at(&image, media.bytes(), 0).unwrap();
        Base {
            image,
            len,
            n_segments,
            backing,
            opts,
        }
    })
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Length and kind of the record whose replica owns the 4 KiB metadata page at `page`.
fn record_at(page: u64) -> Option<(usize, RecordKind)> {
    if page < SEGMENTS_OFFSET {
        return match page / 4096 {
            1 => Some((64, RecordKind::Superblock)),
            2 | 3 => Some((72, RecordKind::CacheInfo)),
            4 | 5 => Some((32, RecordKind::KeyTail)),
            6 | 7 => Some((32, RecordKind::DirtyTail)),
            _ => None,
        };
    }
    match (page - SEGMENTS_OFFSET) % SEGMENT_SIZE / 4096 {
        0 | 1 => Some((32, RecordKind::SegmentInfo)),
        2 | 3 => Some((32, RecordKind::Generation)),
        _ => None,
    }
}

/// Give the record in the page at `page` its kind, version and a matching CRC.
fn fix_record(img: &mut [u8], page: u64) {
    let Some((len, kind)) = record_at(page) else {
        return;
    };
    let at = page as usize;
    put(img, at + 4, &kind.tag().to_le_bytes());
    put(img, at + 6, &FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c_append(CRC_SEED, &img[at + 4..at + len]);
    put(img, at, &crc.to_le_bytes());
}

/// Make every kset from `start` on (while one follows another) pass its CRC again.
fn fix_ksets(img: &mut [u8], start: u64) {
    // The cache id, mixed into every kset CRC: superblock body bytes 32..48.
    let sb = SUPERBLOCK_OFFSET as usize + 16;
    let id = &img[sb + 32..sb + 48];
    let seed = crc32c::crc32c_append(CRC_SEED, id);
    let mut at = start as usize;
    let end = (start + LOG_WINDOW) as usize;
    while at + KSET_HEADER_SIZE <= end {
        let h = &img[at..at + KSET_HEADER_SIZE];
        if u64::from_le_bytes(h[16..24].try_into().unwrap()) != KSET_MAGIC {
            return;
        }
        let flags = u32::from_le_bytes(h[24..28].try_into().unwrap());
        let count = u32::from_le_bytes(h[28..32].try_into().unwrap()) as usize;
        let n = if flags & KSET_FLAG_LAST != 0 {
            0
        } else {
            count
        };
        if n > KSET_MAX_KEYS || at + kset_size(n) > end {
            return;
        }
        let crc = crc32c::crc32c_append(seed, &img[at + 4..at + kset_size(n)]);
        put(img, at, &crc.to_le_bytes());
        if flags & KSET_FLAG_LAST != 0 {
            return;
        }
        at += kset_size(n);
    }
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    // SAFETY: a private mapping of the image file, which nothing writes after `base()`.
    let map = unsafe {
        MmapOptions::new()
            .len(base.len as usize)
            .map_copy(&base.image)
    }
    .unwrap();
    let media = Arc::new(MapMedia::new(map));
    let img = media.bytes();
    let n = base.n_segments as u64;
    // Patches: region, offset in it, what to repair, length, bytes.
    let mut input = data;
    while input.len() >= 5 {
        let region = input[0] as u64 % (1 + 2 * n);
        let off = u16::from_le_bytes([input[1], input[2]]) as u64;
        let fix = input[3];
        let len = (input[4] as usize).min(input.len() - 5);
        let bytes = &input[5..5 + len];
        input = &input[5 + len..];
        let (start, size) = match region {
            0 => (0, SEGMENTS_OFFSET),
            r if r <= n => (
                SEGMENTS_OFFSET + (r - 1) * SEGMENT_SIZE,
                SEGMENT_DATA_OFFSET,
            ),
            r => (
                SEGMENTS_OFFSET + (r - n - 1) * SEGMENT_SIZE + SEGMENT_DATA_OFFSET,
                LOG_WINDOW,
            ),
        };
        let at = start + off % size;
        let len = len.min((start + size - at) as usize);
        img[at as usize..at as usize + len].copy_from_slice(&bytes[..len]);
        if fix & 1 != 0 && region <= n {
            fix_record(img, at & !4095);
        }
        if fix & 2 != 0 && region > n {
            fix_ksets(img, start);
        }
    }
    let _ = replay_only(&base.opts, media.clone(), &base.backing);
    let found = backing_id(&base.backing);
    let _ = check::check(&*media, Some(&found));
});
