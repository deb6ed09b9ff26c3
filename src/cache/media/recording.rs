//! [`RecordingMedia`]: an in-memory media that records what became durable, so tests can
//! produce the images a crash could leave behind.
//!
//! Model (pmem semantics, 64-byte lines, 8-byte atomic words):
//! - the *current* bytes are what reads return;
//! - the *durable image* is what survives any crash;
//! - `persist` snapshots each covered line into the calling thread's flushing list;
//! - `fence` copies the calling thread's snapshots into the durable image (a later snapshot
//!   of a line never gets overwritten by an earlier one fenced afterwards);
//! - any line whose current bytes differ from the durable image, or that has a snapshot not
//!   yet fenced, is *non-durable*: a crash may leave any mix of its aligned 8-byte words from
//!   the durable image, its pending snapshots and its current bytes.
//!
//! Writes through [`Media::slice_ptr`] are therefore tracked too: non-durability is found by
//! comparing bytes, not by hooking writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::thread::ThreadId;

use memmap2::MmapMut;

use super::{check_range, Media, MediaError, Persistence, CACHE_LINE};

const LINE: usize = CACHE_LINE as usize;
const WORD: usize = 8;
/// Comparison block for finding non-durable lines quickly.
const BLOCK: usize = 4096;

/// In-memory media that records persistence; see the module documentation.
pub struct RecordingMedia {
    base: *mut u8,
    len: u64,
    _current: MmapMut,
    state: Mutex<State>,
}

struct State {
    /// Durable image, `alloc_len` bytes.
    durable: Vec<u8>,
    /// Stamp of the snapshot each line of `durable` came from (0: initial contents).
    durable_stamp: Vec<u64>,
    /// Per thread: snapshots persisted but not yet fenced, in persist order.
    flushing: HashMap<ThreadId, Vec<Snapshot>>,
    next_stamp: u64,
}

struct Snapshot {
    line: usize,
    stamp: u64,
    bytes: [u8; LINE],
}

// SAFETY: `base` points into `_current`, owned by this object; concurrent data access is
// limited to caller-chosen disjoint ranges (the Media contract) and all bookkeeping is behind
// the mutex.
unsafe impl Send for RecordingMedia {}
// SAFETY: as above.
unsafe impl Sync for RecordingMedia {}

impl RecordingMedia {
    /// A zero-filled media of `len` bytes whose zeroes are all durable.
    pub fn new(len: u64) -> Result<Self, MediaError> {
        Self::build(len, None)
    }

    /// Reopen an image (for example one from [`RecordingMedia::crash_image`]): its bytes are
    /// both current and durable.
    pub fn from_image(image: Vec<u8>) -> Result<Self, MediaError> {
        let len = image.len() as u64;
        Self::build(len, Some(image))
    }

    fn build(len: u64, image: Option<Vec<u8>>) -> Result<Self, MediaError> {
        let too_big = || MediaError::OutOfRange {
            offset: 0,
            len,
            media_len: usize::MAX as u64,
        };
        let len_usize = usize::try_from(len).map_err(|_| too_big())?;
        let alloc_len = len_usize.div_ceil(BLOCK).max(1) * BLOCK;
        let mut current = MmapMut::map_anon(alloc_len).map_err(|source| MediaError::Io {
            path: "anonymous memory".into(),
            what: "map",
            source,
        })?;
        let mut durable = match image {
            Some(img) => {
                current[..len_usize].copy_from_slice(&img);
                img
            }
            // vec! of zeroes comes from calloc: no pass over a large image.
            None => vec![0u8; alloc_len],
        };
        durable.resize(alloc_len, 0);
        let base = current.as_mut_ptr();
        Ok(RecordingMedia {
            base,
            len,
            _current: current,
            state: Mutex::new(State {
                durable,
                durable_stamp: vec![0; alloc_len / LINE],
                flushing: HashMap::new(),
                next_stamp: 1,
            }),
        })
    }

    fn alloc_len(&self) -> usize {
        (self.len as usize).div_ceil(BLOCK).max(1) * BLOCK
    }

    /// The current bytes, including padding up to the allocation size.
    ///
    /// Callers must not write concurrently (images are taken when the workload is stopped).
    fn current(&self) -> &[u8] {
        // SAFETY: base points to alloc_len bytes owned by self._current.
        unsafe { std::slice::from_raw_parts(self.base, self.alloc_len()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic in another test thread must not hide this media's state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes guaranteed to survive a crash now.
    pub fn durable_image(&self) -> Vec<u8> {
        let st = self.lock();
        st.durable[..self.len as usize].to_vec()
    }

    /// One image a crash right now could leave: the durable image plus a random subset of the
    /// non-durable lines, each chosen line taking every aligned 8-byte word independently from
    /// one of the values it held (durable, a persisted snapshot, current). Deterministic for a
    /// given seed and media state. Take it while no thread is writing.
    pub fn crash_image(&self, rng_seed: u64) -> Vec<u8> {
        let st = self.lock();
        let current = self.current();
        let mut rng = SplitMix64(rng_seed);
        let mut pending: BTreeMap<usize, Vec<(u64, &[u8; LINE])>> = BTreeMap::new();
        for snaps in st.flushing.values() {
            for s in snaps {
                if s.stamp > st.durable_stamp[s.line] {
                    pending.entry(s.line).or_default().push((s.stamp, &s.bytes));
                }
            }
        }
        for v in pending.values_mut() {
            v.sort_by_key(|(stamp, _)| *stamp);
        }
        let mut image = st.durable.clone();
        let mut lines: Vec<usize> = Vec::new();
        for (b, (cur, dur)) in current
            .chunks_exact(BLOCK)
            .zip(st.durable.chunks_exact(BLOCK))
            .enumerate()
        {
            if cur == dur {
                continue;
            }
            for l in 0..BLOCK / LINE {
                let r = l * LINE..(l + 1) * LINE;
                if cur[r.clone()] != dur[r] {
                    lines.push(b * BLOCK / LINE + l);
                }
            }
        }
        lines.extend(pending.keys().copied());
        lines.sort_unstable();
        lines.dedup();
        for line in lines {
            if rng.next() & 1 == 0 {
                continue;
            }
            let start = line * LINE;
            let snaps = pending.get(&line).map(Vec::as_slice).unwrap_or(&[]);
            // Versions: 0 = durable (already in image), 1..=n = snapshots, n+1 = current.
            let versions = snaps.len() as u64 + 2;
            for w in 0..LINE / WORD {
                let pick = rng.next() % versions;
                let r = start + w * WORD..start + (w + 1) * WORD;
                if pick == 0 {
                    continue;
                }
                let src: &[u8] = if (pick as usize) <= snaps.len() {
                    &snaps[pick as usize - 1].1[w * WORD..(w + 1) * WORD]
                } else {
                    &current[r.clone()]
                };
                image[r].copy_from_slice(src);
            }
        }
        image.truncate(self.len as usize);
        image
    }
}

/// Small deterministic generator (SplitMix64) so crash images need no extra dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Media for RecordingMedia {
    fn len(&self) -> u64 {
        self.len
    }

    fn persistence(&self) -> Persistence {
        Persistence::Pmem
    }

    fn persist(&self, offset: u64, len: u64) -> Result<(), MediaError> {
        check_range(offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset as usize / LINE;
        let last = (offset + len - 1) as usize / LINE;
        let mut st = self.lock();
        let mut snaps = Vec::with_capacity(last - first + 1);
        for line in first..=last {
            let mut bytes = [0u8; LINE];
            // SAFETY: line < alloc_len / LINE, inside the allocation.
            unsafe {
                std::ptr::copy_nonoverlapping(self.base.add(line * LINE), bytes.as_mut_ptr(), LINE)
            };
            snaps.push(Snapshot {
                line,
                stamp: st.next_stamp,
                bytes,
            });
            st.next_stamp += 1;
        }
        st.flushing
            .entry(std::thread::current().id())
            .or_default()
            .extend(snaps);
        Ok(())
    }

    fn fence(&self) -> Result<(), MediaError> {
        let mut st = self.lock();
        let Some(snaps) = st.flushing.remove(&std::thread::current().id()) else {
            return Ok(());
        };
        for s in snaps {
            if s.stamp > st.durable_stamp[s.line] {
                st.durable_stamp[s.line] = s.stamp;
                st.durable[s.line * LINE..(s.line + 1) * LINE].copy_from_slice(&s.bytes);
            }
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        check_range(offset, buf.len() as u64, self.len)?;
        // SAFETY: bounds-checked against len <= alloc_len.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        check_range(offset, data.len() as u64, self.len)?;
        // SAFETY: bounds-checked; disjointness of concurrent writes is the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(offset as usize), data.len())
        };
        Ok(())
    }

    fn slice_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, MediaError> {
        check_range(offset, len, self.len)?;
        // SAFETY: offset is inside the allocation (checked above).
        Ok(unsafe { self.base.add(offset as usize) })
    }
}
