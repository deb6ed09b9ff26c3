// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Corrupt media: bit flips and torn writes in every kind of metadata record and in cached
//! data. Opening must either recover to a state the contract allows (from the other replica)
//! or refuse with an error; with data CRC on a damaged extent reads as an I/O error, never as
//! wrong data; nothing panics.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use super::checker::{fill, identify, Model, SECTOR};
use super::config::Rng;
use super::image::ImageMedia;
use super::workload::initial_backing;
use crate::backing::{BackingImage, BackingQueue};
use crate::cache::driver::Driver;
use crate::cache::format::{
    self, Kset, KsetCodec, Layout, Tail, CACHE_INFO_OFFSETS, DIRTY_TAIL_OFFSETS,
    GENERATION_OFFSETS, KEY_SIZE, KEY_TAIL_OFFSETS, KSET_HEADER_SIZE, META_PAGE,
    SEGMENT_INFO_OFFSETS, SUPERBLOCK_OFFSET,
};
use crate::cache::index::KeyKind;
use crate::cache::media::{Media, RecordingMedia};
use crate::cache::replay::min_segments;
use crate::cache::{CacheEngine, CacheOptions, CachePos};
use crate::engine::IoError;

const DISK: u64 = 16 << 20;
const QUEUES: usize = 2;

/// A cache after writes, flushes, writeback and GC, with everything flushed: the only allowed
/// content of each sector is the last one written.
struct Scene {
    _dir: tempfile::TempDir,
    backing: Arc<BackingImage>,
    opts: CacheOptions,
    image: Vec<u8>,
    model: Model,
    /// What a crash just before the last FLUSH completed would allow.
    before_last_flush: Model,
}

/// The scene, built once and shared (read-only) by the tests here.
fn scene() -> &'static Scene {
    static SCENE: std::sync::OnceLock<Scene> = std::sync::OnceLock::new();
    SCENE.get_or_init(build_scene)
}

fn build_scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let backing = initial_backing(dir.path(), DISK);
    let opts = CacheOptions {
        path: PathBuf::from("corrupt-test-cache"),
        create_size: None,
        persistence: None,
        data_crc: Some(true),
        gc_percent: Some(0),
        queues: QUEUES,
        force_format: false,
        drain_on_shutdown: false,
        journal_dir: None,
        pacing: Default::default(),
    };
    let media = Arc::new(RecordingMedia::new(Layout::media_len_for(min_segments(QUEUES))).unwrap());
    let engine = CacheEngine::open_stepped(&opts, media.clone(), backing.clone()).unwrap();
    let mut d = Driver::new(&engine);
    let mut wb = BackingQueue::new(backing.clone(), 16).unwrap();
    let sectors = DISK / SECTOR as u64;
    let mut model = Model::new(sectors);
    let mut r = Rng(77);
    let mut id = 1;
    let mut before_last_flush = model.clone();
    // Enough ksets that the log spans segments and GC frees some, then more dirty ones.
    for round in 0..3 {
        for _ in 0..300 {
            id += 1;
            let n = 1 + r.below(64);
            let first = r.below(sectors - n);
            let q = r.below(QUEUES as u64) as usize;
            d.write(q, first * SECTOR as u64, &fill(id, first, n))
                .unwrap();
            model.submitted(first, n, id);
        }
        before_last_flush = model.clone();
        d.flush(0).unwrap();
        model.flushed();
        if round < 2 {
            while engine.writeback_step(&mut wb).unwrap() {}
            while engine.gc_step().unwrap() {}
        }
    }
    drop(d);
    engine.shutdown_for_crash_test();
    let image = media.durable_image();
    Scene {
        _dir: dir,
        backing,
        opts,
        image,
        model,
        before_last_flush,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Opened, and every sector read back as allowed.
    Recovered,
    /// Opened, every sector read back as allowed or as a data-CRC I/O error.
    CrcErrors(usize),
    /// Refused to open, with this error.
    Refused(String),
    Violation(String),
}

fn verdict(s: &Scene, image: &[u8]) -> Verdict {
    verdict_with(s, image, &s.model)
}

fn verdict_with(s: &Scene, image: &[u8], model: &Model) -> Verdict {
    let media: Arc<dyn Media> = Arc::new(ImageMedia::from_bytes(image));
    let run = catch_unwind(AssertUnwindSafe(|| {
        let engine = match CacheEngine::open_stepped(&s.opts, media, s.backing.clone()) {
            Ok(e) => e,
            Err(e) => return Verdict::Refused(e.to_string()),
        };
        let mut d = Driver::new(&engine);
        let mut crc_errors = 0;
        const CHUNK: u64 = 256 << 10;
        for start in (0..DISK).step_by(CHUNK as usize) {
            match d.read(0, start, CHUNK as usize) {
                Ok(data) => {
                    for (i, b) in data.chunks_exact(SECTOR).enumerate() {
                        let sector = start / SECTOR as u64 + i as u64;
                        if !identify(sector, b).is_some_and(|id| model.allows(sector, id)) {
                            return Verdict::Violation(format!(
                                "sector {sector} reads as {:?}, last written {}",
                                identify(sector, b),
                                model.latest(sector)
                            ));
                        }
                    }
                }
                Err(IoError::DataCrc { .. }) => crc_errors += 1,
                Err(e) => return Verdict::Violation(format!("read at {start} failed: {e:?}")),
            }
        }
        drop(d);
        engine.shutdown_for_crash_test();
        if crc_errors > 0 {
            Verdict::CrcErrors(crc_errors)
        } else {
            Verdict::Recovered
        }
    }));
    run.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Verdict::Violation(format!("panicked: {msg}"))
    })
}

/// A record to damage: where it starts and how many bytes it has.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    at: u64,
    len: u64,
}

/// Length of the record in the metadata page at `at`: up to its last non-zero byte.
fn record_at(image: &[u8], name: &str, at: u64) -> Target {
    let page = &image[at as usize..(at + META_PAGE) as usize];
    let len = page
        .iter()
        .rposition(|&b| b != 0)
        .map_or(64, |p| p as u64 + 1);
    Target {
        name: name.to_string(),
        at,
        len: len.div_ceil(8) * 8,
    }
}

/// A change to an image.
type Damage = Box<dyn Fn(&mut [u8])>;

/// Every damage tried on one record: bit flips across it, and tears (a tail of 8-byte words
/// zeroed, as when a new version reached the media only in part, or a head of words replaced).
fn damages(t: &Target) -> Vec<(String, Damage)> {
    let mut out: Vec<(String, Damage)> = Vec::new();
    let len = t.len;
    for byte in [0, 4, 6, 9, 16, len / 2, len - 1] {
        let at = (t.at + byte.min(len - 1)) as usize;
        let bit = (byte % 8) as u8;
        out.push((
            format!("bit {bit} of byte {byte} flipped"),
            Box::new(move |img: &mut [u8]| img[at] ^= 1 << bit),
        ));
    }
    let mid = (t.at + (len / 2) / 8 * 8) as usize;
    let (start, end) = (t.at as usize, (t.at + len) as usize);
    out.push((
        "second half torn (zeroes)".into(),
        Box::new(move |img: &mut [u8]| img[mid..end].fill(0)),
    ));
    out.push((
        "first half torn (other bytes)".into(),
        Box::new(move |img: &mut [u8]| {
            for b in &mut img[start..mid.max(start + 8)] {
                *b = b.wrapping_mul(31).wrapping_add(7);
            }
        }),
    ));
    out
}

/// Every metadata record of the scene's image: superblock, both replicas of cache_info and
/// the tails, segment info and generations, kset headers and keys.
fn targets(s: &Scene) -> Vec<Target> {
    let img = &s.image;
    let mut t = vec![record_at(img, "superblock", SUPERBLOCK_OFFSET)];
    for r in 0..2 {
        t.push(record_at(
            img,
            &format!("cache_info[{r}]"),
            CACHE_INFO_OFFSETS[r],
        ));
        t.push(record_at(
            img,
            &format!("key_tail[{r}]"),
            KEY_TAIL_OFFSETS[r],
        ));
        t.push(record_at(
            img,
            &format!("dirty_tail[{r}]"),
            DIRTY_TAIL_OFFSETS[r],
        ));
    }
    let media = ImageMedia::from_bytes(img);
    let sb = format::probe(&media).unwrap().unwrap();
    let layout = sb.layout(media.len()).unwrap();
    let key_tail = format::load_tail(&media, &layout, Tail::Key).unwrap().value;
    for seg in [0, key_tail.pos.seg] {
        let base = layout.segment_offset(seg);
        for r in 0..2 {
            t.push(record_at(
                img,
                &format!("segment_info[{r}] of segment {seg}"),
                base + SEGMENT_INFO_OFFSETS[r],
            ));
            t.push(record_at(
                img,
                &format!("generation[{r}] of segment {seg}"),
                base + GENERATION_OFFSETS[r],
            ));
        }
    }
    // The log from key_tail: the first, a middle and the last kset, and a LAST kset.
    let codec = KsetCodec::new(layout, DISK, sb.cache_id);
    let mut ksets = Vec::new();
    let mut last_ksets = Vec::new();
    let (mut pos, mut seq) = (key_tail.pos, key_tail.log_seq);
    let mut buf = vec![0u8; format::KSET_MAX_SIZE];
    loop {
        let at = layout.media_offset(pos);
        let avail = (layout.data_size() - pos.off).min(format::KSET_MAX_SIZE as u32) as usize;
        media.read(at, &mut buf[..avail]).unwrap();
        match codec.decode_kset(&buf[..avail], seq) {
            Ok(Kset::Keys { keys, .. }) => {
                ksets.push((at, keys.len()));
                pos.off += format::kset_size(keys.len()) as u32;
            }
            Ok(Kset::Last { next_seg, .. }) => {
                last_ksets.push(at);
                pos = CachePos {
                    seg: next_seg,
                    off: 0,
                };
            }
            Err(_) => break,
        }
        seq += 1;
    }
    assert!(ksets.len() >= 3, "the scene has a log of several ksets");
    for (name, (at, n)) in [
        ("first", ksets[0]),
        ("middle", ksets[ksets.len() / 2]),
        ("last", ksets[ksets.len() - 1]),
    ] {
        t.push(Target {
            name: format!("{name} kset header"),
            at,
            len: KSET_HEADER_SIZE as u64,
        });
        let k = (n / 2) as u64;
        t.push(Target {
            name: format!("key {k} of the {name} kset"),
            at: at + KSET_HEADER_SIZE as u64 + k * KEY_SIZE as u64,
            len: KEY_SIZE as u64,
        });
    }
    if let Some(&at) = last_ksets.first() {
        t.push(Target {
            name: "LAST kset".into(),
            at,
            len: KSET_HEADER_SIZE as u64,
        });
    }
    t
}

#[test]
fn damaged_metadata_recovers_or_is_refused_never_wrong_data() {
    let s = scene();
    assert_eq!(
        verdict(s, &s.image),
        Verdict::Recovered,
        "the undamaged scene"
    );
    let mut violations = Vec::new();
    let (mut recovered, mut refused, mut tried) = (0, 0, 0);
    for t in targets(s) {
        for (what, damage) in damages(&t) {
            let mut img = s.image.clone();
            damage(&mut img);
            tried += 1;
            // Damage to the newest kset looks exactly like a crash while it was written, so
            // replay ends the log before it: what a crash before the last FLUSH allows.
            let model = if t.name.contains("last kset") {
                &s.before_last_flush
            } else {
                &s.model
            };
            match verdict_with(s, &img, model) {
                Verdict::Recovered | Verdict::CrcErrors(_) => recovered += 1,
                Verdict::Refused(e) => {
                    assert!(!e.is_empty());
                    refused += 1;
                }
                Verdict::Violation(v) => violations.push(format!("{} ({what}): {v}", t.name)),
            }
        }
    }
    eprintln!(
        "damaged metadata: {tried} images, {recovered} recovered, {refused} refused, {} wrong",
        violations.len()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// One replica of a replicated record damaged: the other one carries the cache on.
#[test]
fn one_damaged_replica_never_stops_the_cache() {
    let s = scene();
    let mut bad = Vec::new();
    for t in targets(s)
        .into_iter()
        .filter(|t| t.name.contains("tail[") || t.name.contains("cache_info["))
    {
        let mut img = s.image.clone();
        img[t.at as usize..(t.at + t.len) as usize].fill(0xA5);
        match verdict(s, &img) {
            Verdict::Recovered => {}
            v => bad.push(format!("{}: {v:?}", t.name)),
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn damaged_cached_data_is_an_io_error_never_data() {
    let s = scene();
    let media = ImageMedia::from_bytes(&s.image);
    let engine = CacheEngine::open_stepped(&s.opts, Arc::new(media), s.backing.clone()).unwrap();
    let mut extents = Vec::new();
    engine.core().index.for_each(&mut |k| {
        if k.kind != KeyKind::Zeroes {
            extents.push((k.pos, k.len))
        }
    });
    let layout = engine.core().layout;
    engine.shutdown_for_crash_test();
    drop(engine);
    assert!(!extents.is_empty());
    let mut r = Rng(5);
    for _ in 0..12 {
        let (pos, len) = extents[r.below(extents.len() as u64) as usize];
        let at = layout.media_offset(pos) + r.below(len as u64);
        let mut img = s.image.clone();
        img[at as usize] ^= 1 << r.below(8);
        match verdict(s, &img) {
            Verdict::CrcErrors(n) => assert!(n > 0),
            v => panic!("a flipped bit in cached data at media byte {at}: {v:?}"),
        }
        // A torn extent: its second half left as zeroes.
        let mut img = s.image.clone();
        let start = layout.media_offset(pos) as usize;
        img[start + len as usize / 2..start + len as usize].fill(0);
        match verdict(s, &img) {
            Verdict::CrcErrors(_) | Verdict::Recovered => {}
            v => panic!("a torn extent at media byte {start}: {v:?}"),
        }
    }
}
