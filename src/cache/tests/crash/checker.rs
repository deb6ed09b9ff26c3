// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What section 3 of the durability contract allows each sector to hold after a crash, and
//! the check of a reopened crash image against it.
//!
//! Every sector the workload writes is self-describing: its first word is the number of the
//! write, its second the sector's own number, and the rest a function of both. So a read-back
//! sector names the write it came from, and a sector made of bytes of two writes, of another
//! sector, or of garbage names none.

use crate::cache::driver::Driver;

pub const SECTOR: usize = 512;
/// The write number of zeroes (write-zeroes, discard).
pub const ZEROES: u64 = 0;
/// The write number of the backing image's initial contents.
pub const INITIAL: u64 = 1;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The contents write `id` gives `sector` (all zeroes for [`ZEROES`]).
pub fn fill_sector(id: u64, sector: u64, out: &mut [u8]) {
    if id == ZEROES {
        out.fill(0);
        return;
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
}

/// Contents of `n` sectors from `first`, all written by write `id`.
pub fn fill(id: u64, first: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize * SECTOR];
    for (i, s) in v.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(id, first + i as u64, s);
    }
    v
}

/// Which write `bytes` (one sector at `sector`) came from, if it is exactly one.
pub fn identify(sector: u64, bytes: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let mut want = [0u8; SECTOR];
    fill_sector(id, sector, &mut want);
    (want[..] == *bytes).then_some(id)
}

/// Per sector: the value at the last completed FLUSH (or the last write that completed
/// durably with the write cache off), and every value written to it since.
#[derive(Clone)]
pub struct Model {
    base: Vec<u64>,
    since: Vec<Vec<u64>>,
    /// Sectors with a non-empty `since`, so a flush touches only those.
    touched: Vec<u64>,
}

impl Model {
    pub fn new(sectors: u64) -> Model {
        Model {
            base: vec![INITIAL; sectors as usize],
            since: vec![Vec::new(); sectors as usize],
            touched: Vec::new(),
        }
    }

    /// Write `id` to `n` sectors from `first` was submitted (it may be anywhere from lost to
    /// complete until a flush completes).
    pub fn submitted(&mut self, first: u64, n: u64, id: u64) {
        for s in first..first + n {
            let since = &mut self.since[s as usize];
            if since.is_empty() {
                self.touched.push(s);
            }
            since.push(id);
        }
    }

    /// Write `id` completed with the write cache off: durable from now on.
    pub fn completed_durably(&mut self, first: u64, n: u64, id: u64) {
        for s in first..first + n {
            self.base[s as usize] = id;
            self.since[s as usize].clear();
        }
    }

    /// A FLUSH completed: every write before it is durable.
    pub fn flushed(&mut self) {
        for s in self.touched.drain(..) {
            let since = &mut self.since[s as usize];
            if let Some(&last) = since.last() {
                self.base[s as usize] = last;
            }
            since.clear();
        }
    }

    pub fn allows(&self, sector: u64, id: u64) -> bool {
        self.base[sector as usize] == id || self.since[sector as usize].contains(&id)
    }

    /// What the last write to `sector` wrote.
    pub fn latest(&self, sector: u64) -> u64 {
        let s = sector as usize;
        self.since[s].last().copied().unwrap_or(self.base[s])
    }

    fn describe(&self, sector: u64) -> String {
        format!(
            "last flushed {}, written since {:?}",
            self.base[sector as usize], self.since[sector as usize]
        )
    }
}

/// Read the whole disk through `driver` and compare every sector with what `model` allows.
/// Returns a description of the violations (empty when the image is allowed).
pub fn check_disk(driver: &mut Driver, model: &Model, disk: u64) -> Vec<String> {
    const CHUNK: u64 = 1 << 20;
    let mut bad = Vec::new();
    let mut count = 0usize;
    for start in (0..disk).step_by(CHUNK as usize) {
        let len = CHUNK.min(disk - start) as usize;
        let q = (start / CHUNK) as usize % driver.queues();
        let data = match driver.read(q, start, len) {
            Ok(d) => d,
            Err(e) => {
                bad.push(format!("read of {len} bytes at byte {start} failed: {e:?}"));
                continue;
            }
        };
        for (i, bytes) in data.chunks_exact(SECTOR).enumerate() {
            let sector = start / SECTOR as u64 + i as u64;
            let ok = match identify(sector, bytes) {
                Some(id) => model.allows(sector, id),
                None => false,
            };
            if !ok {
                count += 1;
                if bad.len() < 8 {
                    let got = match identify(sector, bytes) {
                        Some(id) => format!("write {id}"),
                        None => format!("bytes of no write ({:02x?}...)", &bytes[..16]),
                    };
                    bad.push(format!(
                        "sector {sector} holds {got}; allowed: {}",
                        model.describe(sector)
                    ));
                }
            }
        }
    }
    if count > 8 {
        bad.push(format!("... {count} sectors in all"));
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_name_their_write_and_nothing_else() {
        let s = fill(7, 100, 2);
        assert_eq!(identify(100, &s[..SECTOR]), Some(7));
        assert_eq!(identify(101, &s[SECTOR..]), Some(7));
        assert_eq!(identify(101, &s[..SECTOR]), None, "another sector's bytes");
        assert_eq!(identify(5, &[0u8; SECTOR]), Some(ZEROES));
        let mut torn = s[..SECTOR].to_vec();
        torn[256..].copy_from_slice(&fill(8, 100, 1)[256..]);
        assert_eq!(identify(100, &torn), None, "a torn sector");
    }

    #[test]
    fn a_flush_drops_older_values() {
        let mut m = Model::new(4);
        m.submitted(0, 2, 5);
        assert!(m.allows(0, INITIAL) && m.allows(0, 5));
        m.flushed();
        assert!(!m.allows(0, INITIAL) && m.allows(0, 5));
        m.submitted(1, 1, 6);
        m.completed_durably(1, 1, 6);
        assert!(!m.allows(1, 5) && m.allows(1, 6));
        assert!(m.allows(2, INITIAL));
    }
}
