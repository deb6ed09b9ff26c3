// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What one run of the workload does: its configuration, the persistence mode it explores,
//! and the seeded generator every choice comes from.

use crate::cache::media::RecordingMedia;

/// One run of the workload.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub queues: usize,
    /// Size of the backing image (the disk), bytes.
    pub disk: u64,
    /// Stop after writing this many bytes.
    pub volume: u64,
    pub data_crc: bool,
    pub gc_percent: u8,
    /// On average one cut every this many media events.
    pub cut_every: u64,
    /// Random images per cut, besides all-lost and all-kept.
    pub random_images: u64,
    /// Cut only at this event (replaying a reported violation).
    pub only_cut: Option<u64>,
    /// On average one cut inside writeback's backing flush every this many writeback steps.
    pub flush_cut_every: u64,
    /// Cut only inside the backing flush of this writeback step (replaying a violation).
    pub only_flush_cut: Option<u64>,
    /// How the media makes writes durable, i.e. which crash images a cut can leave.
    pub model: MediaModel,
}

/// The persistence mode whose crash images a run explores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaModel {
    /// pmem: `persist` writes back 64-byte lines, `fence` makes the calling thread's lines
    /// durable; a crash keeps any mix of 8-byte words of a non-durable line.
    Pmem,
    /// msync: the media is a page-cache mapping; every unsynced 4 KiB page may reach the disk
    /// whole, in any state it held, or not at all, in any order.
    Msync,
}

impl MediaModel {
    /// Every persistence mode the recording media can model.
    pub const ALL: &'static [MediaModel] = &[MediaModel::Pmem, MediaModel::Msync];

    pub fn name(self) -> &'static str {
        match self {
            MediaModel::Pmem => "pmem",
            MediaModel::Msync => "msync",
        }
    }

    pub fn parse(name: &str) -> Option<MediaModel> {
        Self::ALL.iter().copied().find(|m| m.name() == name)
    }

    pub(super) fn media(self, len: u64) -> RecordingMedia {
        match self {
            MediaModel::Pmem => RecordingMedia::new(len).unwrap(),
            MediaModel::Msync => RecordingMedia::new_msync(len).unwrap(),
        }
    }
}

impl Config {
    /// The configuration seed `seed` runs with in the suite: the seed also varies the shape.
    pub fn for_seed(seed: u64) -> Config {
        let mut r = Rng(seed ^ 0x5EED);
        Config {
            seed,
            queues: 2 + (r.below(4) == 0) as usize,
            disk: 16 << 20,
            volume: (110 + r.below(60)) << 20,
            data_crc: r.below(2) == 0,
            gc_percent: [0, 30, 70, 90][r.below(4) as usize],
            cut_every: 120,
            random_images: 6,
            only_cut: None,
            flush_cut_every: 24,
            only_flush_cut: None,
            model: MediaModel::Pmem,
        }
    }
}

/// Small deterministic generator (SplitMix64).
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
