// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writeback, GC and a full cache end to end: the real daemon on the smallest cache (6 segments
//! for 2 queues), driven through the socket far past the cache's size.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Client, Daemon, QueueClient, TestDir, QUEUE_BUFFER};

const QUEUES: usize = 2;
/// Each queue owns every QUEUES-th chunk of this size, so queues never write the same bytes
/// (the model stays exact) while sharing every 4 MiB region and so every open kset.
const CHUNK: u64 = 1 << 20;

/// Deterministic data for a write numbered `seed` at `off`: a stale or misplaced block shows.
fn data(off: u64, len: usize, seed: u64) -> Vec<u8> {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    for i in (0..len as u64).step_by(8) {
        v.extend_from_slice(&((off + i) ^ mix).rotate_left(17).to_le_bytes());
    }
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The bytes one queue owns, packed: chunk `c` of the disk (with `c % QUEUES == q`) is at
/// `c / QUEUES * CHUNK` here.
struct QueueModel {
    q: usize,
    bytes: Vec<u8>,
}

impl QueueModel {
    fn new(q: usize, disk: u64) -> QueueModel {
        QueueModel {
            q,
            bytes: vec![0; (disk / QUEUES as u64) as usize],
        }
    }

    fn chunks(&self) -> u64 {
        self.bytes.len() as u64 / CHUNK
    }

    fn disk_offset(&self, local: u64) -> u64 {
        (local / CHUNK * QUEUES as u64 + self.q as u64) * CHUNK + local % CHUNK
    }

    /// A random 4 KiB-aligned range inside one chunk of this queue: (local, disk offset, len).
    fn pick(&self, rng: &mut Rng) -> (u64, u64, usize) {
        let chunk = rng.below(self.chunks());
        let start = rng.below(CHUNK / 4096) * 4096;
        let len = (rng.below((CHUNK - start) / 4096) + 1) * 4096;
        let local = chunk * CHUNK + start;
        (local, self.disk_offset(local), len as usize)
    }

    fn slice(&self, local: u64, len: usize) -> &[u8] {
        &self.bytes[local as usize..local as usize + len]
    }

    /// Read every chunk of this queue back and compare.
    fn verify(&self, queue: &mut QueueClient) {
        for chunk in 0..self.chunks() {
            let local = chunk * CHUNK;
            let got = queue
                .read(self.disk_offset(local), CHUNK as usize)
                .unwrap_or_else(|e| panic!("queue {}: read-back failed: errno {e}", self.q));
            assert!(
                got == self.slice(local, CHUNK as usize),
                "queue {}: chunk at disk byte {} differs from the model",
                self.q,
                self.disk_offset(local)
            );
        }
    }

    /// Compare with the image file as a whole.
    fn verify_image(&self, image: &[u8]) {
        for chunk in 0..self.chunks() {
            let local = chunk * CHUNK;
            let at = self.disk_offset(local) as usize;
            assert!(
                image[at..at + CHUNK as usize] == *self.slice(local, CHUNK as usize),
                "the backing image alone differs from the model at byte {at}"
            );
        }
    }
}

/// One queue's load: writes (and, with `mixed`, reads checked against the model and
/// flushes) until `keep_going` says stop. Counts completed requests and written bytes.
fn run_queue(
    queue: &mut QueueClient,
    model: &mut QueueModel,
    mixed: bool,
    progress: &AtomicU64,
    written: &AtomicU64,
    mut keep_going: impl FnMut() -> bool,
) {
    let q = model.q;
    let mut rng = Rng(0x5EED_0000 + q as u64 * 7919);
    let mut n = 0u64;
    while keep_going() {
        n += 1;
        let roll = if mixed { rng.below(10) } else { 0 };
        match roll {
            0..=6 => {
                let (local, off, len) = model.pick(&mut rng);
                let bytes = data(off, len, n * QUEUES as u64 + q as u64);
                queue.write(off, &bytes).unwrap_or_else(|e| {
                    panic!("queue {q}: write {n} of {len} bytes at {off} failed: errno {e}")
                });
                model.bytes[local as usize..local as usize + len].copy_from_slice(&bytes);
                written.fetch_add(len as u64, Ordering::Relaxed);
            }
            7 | 8 => {
                let (local, off, len) = model.pick(&mut rng);
                let got = queue
                    .read(off, len)
                    .unwrap_or_else(|e| panic!("queue {q}: read {n} at {off} failed: errno {e}"));
                assert!(
                    got == model.slice(local, len),
                    "queue {q}: read {n} of {len} bytes at {off} differs from the model"
                );
            }
            _ => queue
                .flush()
                .unwrap_or_else(|e| panic!("queue {q}: flush {n} failed: errno {e}")),
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

fn cache_file(dir: &TestDir) -> PathBuf {
    dir.image().with_extension("img.pcache")
}

fn start_small_cache(dir: &TestDir, disk: u64) -> Daemon {
    let image = dir.create_image(disk);
    let args = [
        "--backing",
        image.to_str().unwrap(),
        "--queues",
        "2",
        "--cache-size",
        "1M",
        "--drain-on-exit",
    ];
    Daemon::start(&dir.socket(), &args)
}

/// SIGTERM with `--drain-on-exit`: a clean exit means every dirty byte was written back and
/// the image flushed. Then the image alone is compared with the models.
fn stop_and_check_image(daemon: Daemon, dir: &TestDir, models: &[QueueModel], disk: u64) {
    let status = daemon.terminate();
    assert!(
        status.success(),
        "daemon exit status {status} after draining"
    );
    let mut image = vec![0u8; disk as usize];
    std::fs::File::open(dir.image())
        .unwrap()
        .read_exact_at(&mut image, 0)
        .unwrap();
    for m in models {
        m.verify_image(&image);
    }
}

#[test]
fn three_times_the_cache_size_reads_back_and_drains_to_the_image() {
    const DISK: u64 = 256 << 20;
    let dir = TestDir::new();
    let daemon = start_small_cache(&dir, DISK);
    let cache_bytes = std::fs::metadata(cache_file(&dir)).unwrap().len();
    assert!(
        cache_bytes < DISK / 2,
        "the smallest cache ({cache_bytes} bytes) is much smaller than the disk"
    );
    let mut client = Client::connect(daemon.socket(), QUEUES, false).expect("connect");
    let target = 3 * cache_bytes / QUEUES as u64 + 1;
    let progress = AtomicU64::new(0);
    let mut models: Vec<QueueModel> = (0..QUEUES).map(|q| QueueModel::new(q, DISK)).collect();
    std::thread::scope(|s| {
        for (queue, model) in client.queues.iter_mut().zip(models.iter_mut()) {
            let progress = &progress;
            s.spawn(move || {
                let written = AtomicU64::new(0);
                run_queue(queue, model, false, progress, &written, || {
                    written.load(Ordering::Relaxed) < target
                });
                model.verify(queue);
            });
        }
    });
    drop(client);
    stop_and_check_image(daemon, &dir, &models, DISK);
}

/// How long the full-cache test runs at least: `PCACHE_FULL_CACHE_SECS`, default 120 (two minutes).
fn full_cache_duration() -> Duration {
    let secs = std::env::var("PCACHE_FULL_CACHE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// Longest time without any completed request before the test calls it a deadlock.
const STALL_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn a_full_small_cache_keeps_serving_without_deadlock_or_failed_requests() {
    const DISK: u64 = 128 << 20;
    let dir = TestDir::new();
    let daemon = start_small_cache(&dir, DISK);
    let cache_bytes = std::fs::metadata(cache_file(&dir)).unwrap().len();
    let mut client = Client::connect(daemon.socket(), QUEUES, false).expect("connect");
    let duration = full_cache_duration();
    let started = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    // Owned threads, so the watchdog below can give up on them instead of hanging in a join.
    let workers: Vec<JoinHandle<(QueueClient, QueueModel)>> = std::mem::take(&mut client.queues)
        .into_iter()
        .enumerate()
        .map(|(q, mut queue)| {
            let (progress, written) = (progress.clone(), written.clone());
            std::thread::spawn(move || {
                let mut model = QueueModel::new(q, DISK);
                let w = written.clone();
                // Run for the duration, and at least until twice the cache was written, so
                // the cache was full and reclaimed many times however slow the machine is.
                run_queue(&mut queue, &mut model, true, &progress, &written, || {
                    started.elapsed() < duration || w.load(Ordering::Relaxed) < 2 * cache_bytes
                });
                model.verify(&mut queue);
                (queue, model)
            })
        })
        .collect();

    let mut last = (progress.load(Ordering::Relaxed), Instant::now());
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let now = progress.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL_LIMIT {
            // The queues' buffers live in the client's region: keep it mapped for the stuck
            // threads, and let the daemon be killed on the way out.
            std::mem::forget(client);
            panic!(
                "no request completed for {STALL_LIMIT:?} after {now} requests and {} bytes written: the daemon is stuck",
                written.load(Ordering::Relaxed)
            );
        }
    }
    let mut models = Vec::new();
    for w in workers {
        match w.join() {
            Ok((_queue, model)) => models.push(model),
            Err(e) => std::panic::resume_unwind(e),
        }
    }
    assert!(written.load(Ordering::Relaxed) >= 2 * cache_bytes);
    drop(client);
    stop_and_check_image(daemon, &dir, &models, DISK);
}

// A whole chunk is read back in one request.
const _: () = assert!(QUEUE_BUFFER as u64 >= CHUNK);
