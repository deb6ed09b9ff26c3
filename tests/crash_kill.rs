// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real daemon killed with SIGKILL at random moments under a verifying write load from
//! libblkio, restarted on the same cache and image, and checked sector by sector: a process
//! kill is not a power loss, so every sector holds what the last write to it that completed
//! before the kill wrote (flushed or not: the process-kill journal keeps the keys the log
//! lacks), or what one of the writes still in flight at the kill wrote.
//!
//! `PCACHE_KILLS=N` runs N kills (default 20); `PCACHE_KILL_SEED=S` picks the seed;
//! `PCACHE_KILL_PERSISTENCE=msync|pmem` runs the daemon with that `--persistence` (pmem
//! emulated on the ordinary cache file; default: what the daemon detects, msync here).

mod common;

use common::{Client, Daemon, TestDir};

const IMAGE_SIZE: u64 = 48 << 20;
const SECTOR: usize = 512;
const SECTORS: u64 = IMAGE_SIZE / SECTOR as u64;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A sector that names the write it came from (0: never written, all zeroes).
fn sector_of(id: u64, sector: u64) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    if id == 0 {
        return out;
    }
    let seed = mix(id ^ sector.rotate_left(32));
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => id,
            1 => sector,
            _ => mix(seed.wrapping_add(i as u64)),
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn sectors(id: u64, first: u64, n: u64) -> Vec<u8> {
    (first..first + n).flat_map(|s| sector_of(id, s)).collect()
}

fn identify(sector: u64, bytes: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    (sector_of(id, sector)[..] == *bytes).then_some(id)
}

/// Per sector: the content of the last completed write (or what the restarted daemon served)
/// and every write submitted since that has not completed.
struct Model {
    base: Vec<u64>,
    since: Vec<Vec<u64>>,
}

impl Model {
    fn submitted(&mut self, first: u64, n: u64, id: u64) {
        for s in first..first + n {
            self.since[s as usize].push(id);
        }
    }

    /// Write `id` completed: a kill must keep it, as it keeps a flushed write.
    fn completed(&mut self, first: u64, n: u64, id: u64) {
        for s in first..first + n {
            self.base[s as usize] = id;
            self.since[s as usize].clear();
        }
    }

    fn flushed(&mut self) {
        for (b, since) in self.base.iter_mut().zip(&mut self.since) {
            if let Some(&last) = since.last() {
                *b = last;
            }
            since.clear();
        }
    }

    fn allows(&self, s: u64, id: u64) -> bool {
        self.base[s as usize] == id || self.since[s as usize].contains(&id)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn start(dir: &TestDir, persistence: Option<&str>) -> Daemon {
    let image = dir.image();
    let mut args = vec![
        "--backing",
        image.to_str().unwrap(),
        "--cache-size",
        "1M",
        "--gc-percent",
        "10",
        "--data-crc",
    ];
    if let Some(p) = persistence {
        args.extend(["--persistence", p]);
    }
    Daemon::start(&dir.socket(), &args)
}

/// A range of sectors, often in the first MiB so writes of both queues overlap.
fn pick(r: &mut Rng) -> (u64, u64) {
    let max = if r.below(8) == 0 { 1024 } else { 64 };
    let n = 1 + r.below(max);
    let first = if r.below(3) == 0 {
        r.below(2048)
    } else {
        r.below(SECTORS - n)
    };
    (first, n.min(SECTORS - first))
}

#[test]
fn sigkill_under_load_keeps_the_durability_contract() {
    let kills = env_u64("PCACHE_KILLS").unwrap_or(20);
    let seed = env_u64("PCACHE_KILL_SEED").unwrap_or(0x6b11);
    let persistence = std::env::var("PCACHE_KILL_PERSISTENCE").ok();
    let persistence = persistence.as_deref();
    match persistence {
        None | Some("msync") => {}
        // A SIGKILL leaves the page cache alone, so emulated pmem is tested as pmem would be
        // against a process crash (its flushes and fences, not power loss).
        Some("pmem") => std::env::set_var("VHOST_USER_PCACHE_EMULATE_PMEM", "1"),
        Some(other) => panic!("PCACHE_KILL_PERSISTENCE={other}: use msync or pmem"),
    }
    let mut r = Rng(seed);
    let dir = TestDir::new();
    // The daemon's journal goes where systemd's RuntimeDirectory= would put it: here, in the
    // test's own directory.
    std::env::set_var("RUNTIME_DIRECTORY", dir.dir.path());
    dir.create_image(IMAGE_SIZE);
    let mut model = Model {
        base: vec![0; SECTORS as usize],
        since: vec![Vec::new(); SECTORS as usize],
    };
    let mut id = 0u64;
    let mut daemon = start(&dir, persistence);
    let mut written = 0u64;
    for kill in 0..kills {
        let mut client = Client::connect(daemon.socket(), 2, false).expect("connect");
        // Steady load with periodic flushes.
        for _ in 0..20 + r.below(150) {
            let q = r.below(2) as usize;
            if r.below(12) == 0 {
                client.queues[q].flush().expect("flush");
                model.flushed();
                continue;
            }
            let (first, n) = pick(&mut r);
            id += 1;
            model.submitted(first, n, id);
            client.queues[q]
                .write(first * SECTOR as u64, &sectors(id, first, n))
                .expect("write");
            model.completed(first, n, id);
            written += n * SECTOR as u64;
        }
        // Writes in flight on both queues, then the kill.
        for q in 0..2 {
            let mut burst = Vec::new();
            for _ in 0..1 + r.below(6) {
                let (first, n) = pick(&mut r);
                let n = n.min(256);
                id += 1;
                model.submitted(first, n, id);
                burst.push((first * SECTOR as u64, sectors(id, first, n)));
            }
            client.queues[q].start_writes(&burst);
        }
        std::thread::sleep(std::time::Duration::from_micros(r.below(3000)));
        let status = daemon.stop_with(libc::SIGKILL);
        assert!(
            !status.success(),
            "kill {kill}: the daemon survived SIGKILL"
        );
        drop(client);

        daemon = start(&dir, persistence);
        let mut client = Client::connect(daemon.socket(), 1, false).expect("reconnect");
        let mut bad = Vec::new();
        const CHUNK: u64 = 1 << 20;
        for start in (0..IMAGE_SIZE).step_by(CHUNK as usize) {
            let data = client.queues[0]
                .read(start, CHUNK as usize)
                .unwrap_or_else(|e| panic!("kill {kill}: read at {start} failed: {e}"));
            for (i, b) in data.chunks_exact(SECTOR).enumerate() {
                let s = start / SECTOR as u64 + i as u64;
                match identify(s, b) {
                    Some(got) if model.allows(s, got) => {
                        // What the restarted daemon serves is on its media: durable from now on.
                        model.base[s as usize] = got;
                        model.since[s as usize].clear();
                    }
                    got => {
                        if bad.len() < 8 {
                            bad.push(format!(
                                "sector {s}: {got:?}, allowed {} or {:?}",
                                model.base[s as usize], model.since[s as usize]
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "seed {seed} kill {kill}: sectors without their last completed write:\n{}",
            bad.join("\n")
        );
    }
    eprintln!(
        "{kills} SIGKILLs under load (seed {seed}, persistence {}, {} MiB written): every completed write kept",
        persistence.unwrap_or("detected"),
        written >> 20
    );
    drop(daemon);
}
