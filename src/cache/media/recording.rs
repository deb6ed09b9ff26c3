// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`RecordingMedia`]: an in-memory media that records what became durable, so tests can
//! produce the images a crash could leave behind.
//!
//! Two models, chosen at creation ([`RecordingMedia::new`] for pmem,
//! [`RecordingMedia::new_msync`] for a page-cache mapping).
//!
//! Pmem model (64-byte lines, 8-byte atomic words):
//! - the *current* bytes are what reads return;
//! - the *durable image* is what survives any crash;
//! - `persist` snapshots each covered line into the calling thread's flushing list;
//! - `fence` copies the calling thread's snapshots into the durable image (a later snapshot
//!   of a line never gets overwritten by an earlier one fenced afterwards);
//! - any line whose current bytes differ from the durable image, or that has a snapshot not
//!   yet fenced, is *non-durable*: a crash may leave any mix of its aligned 8-byte words from
//!   the durable image, its pending snapshots and its current bytes.
//!
//! Msync model (a `MAP_SHARED` mapping of an ordinary file; 4 KiB pages):
//! - `persist` records the covered pages in the calling thread's list; `fence` (msync) copies
//!   the *current* bytes of those pages into the durable image, as msync writes whatever the
//!   page holds when it runs, whoever wrote it;
//! - the kernel may write back any dirty page at any moment, in any order: a crash leaves each
//!   non-durable page either as it is in the durable image or whole in one of the states it
//!   held since (the states seen before each `write` that touched it, and its current bytes).
//!
//! [`Media::write_and_persist`] is the trait's copy then `persist`. That models pmem mode's
//! non-temporal copy too: non-temporal stores, like written-back lines, may reach the media in
//! any order and any mix of 8-byte words until the fence, and all have after it.
//!
//! Writes through [`Media::slice_ptr`] are therefore tracked too: non-durability is found by
//! comparing bytes, not by hooking writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::sync::lock;
use std::thread::ThreadId;

use memmap2::MmapMut;

use super::{check_range, Media, MediaError, Persistence, CACHE_LINE};

const LINE: usize = CACHE_LINE as usize;
const WORD: usize = 8;
/// Comparison block for finding non-durable lines quickly; also the page of the msync model.
const BLOCK: usize = 4096;
/// Page of the msync model (the page cache's unit of write-back).
const PAGE: usize = BLOCK;

/// In-memory media that records persistence; see the module documentation.
pub struct RecordingMedia {
    base: *mut u8,
    len: u64,
    /// `Pmem` or `Msync`: which model this media follows.
    mode: Persistence,
    _current: MmapMut,
    state: Mutex<State>,
    events: AtomicU64,
    fences: AtomicU64,
    hook: Mutex<Option<EventHook>>,
}

struct State {
    /// Durable image, `alloc_len` bytes.
    durable: Vec<u8>,
    /// Stamp of the snapshot each line of `durable` came from (0: initial contents).
    durable_stamp: Vec<u64>,
    /// Per thread: snapshots persisted but not yet fenced, in persist order (pmem model).
    flushing: HashMap<ThreadId, Vec<Snapshot>>,
    next_stamp: u64,
    /// Per thread: pages persisted but not yet fenced (msync model).
    msync_pending: HashMap<ThreadId, Vec<usize>>,
    /// Earlier states of non-durable pages, oldest first (msync model).
    page_history: HashMap<usize, Vec<Box<[u8]>>>,
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
        Self::build(len, None, Persistence::Pmem)
    }

    /// A zero-filled media of `len` bytes that behaves as a page-cache mapping synced with
    /// msync (see the module documentation).
    pub fn new_msync(len: u64) -> Result<Self, MediaError> {
        Self::build(len, None, Persistence::Msync)
    }

    /// A zero-filled media following the model of `mode` (`Pmem` or `Msync`; `Volatile` is
    /// modelled as `Pmem`, which promises more than a volatile media does).
    pub fn with_persistence(len: u64, mode: Persistence) -> Result<Self, MediaError> {
        let mode = match mode {
            Persistence::Msync => Persistence::Msync,
            _ => Persistence::Pmem,
        };
        Self::build(len, None, mode)
    }

    /// Reopen an image (for example one from [`RecordingMedia::crash_image`]): its bytes are
    /// both current and durable.
    pub fn from_image(image: Vec<u8>) -> Result<Self, MediaError> {
        let len = image.len() as u64;
        Self::build(len, Some(image), Persistence::Pmem)
    }

    fn build(len: u64, image: Option<Vec<u8>>, mode: Persistence) -> Result<Self, MediaError> {
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
            mode,
            _current: current,
            state: Mutex::new(State {
                durable,
                durable_stamp: vec![0; alloc_len / LINE],
                flushing: HashMap::new(),
                next_stamp: 1,
                msync_pending: HashMap::new(),
                page_history: HashMap::new(),
            }),
            events: AtomicU64::new(0),
            fences: AtomicU64::new(0),
            hook: Mutex::new(None),
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
        lock(&self.state)
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
        let pending = self.pending_lines();
        let mut image = Vec::new();
        self.crash_image_into(&pending, CrashChoice::Random(rng_seed), &mut image);
        image
    }

    /// The lines (pmem model) or pages (msync model) a crash right now may leave in more than
    /// one state, with every value each could hold besides its durable one (oldest first, the
    /// current bytes last). Take it while no thread is writing; it stays valid until the media
    /// changes.
    pub fn pending_lines(&self) -> PendingLines {
        if self.mode == Persistence::Msync {
            return self.pending_pages();
        }
        let st = self.lock();
        let current = self.current();
        let mut snaps: BTreeMap<usize, Vec<(u64, [u8; LINE])>> = BTreeMap::new();
        for list in st.flushing.values() {
            for s in list {
                if s.stamp > st.durable_stamp[s.line] {
                    snaps.entry(s.line).or_default().push((s.stamp, s.bytes));
                }
            }
        }
        let mut lines: Vec<usize> = snaps.keys().copied().collect();
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
        lines.sort_unstable();
        lines.dedup();
        let lines = lines
            .into_iter()
            .map(|line| {
                let mut versions: Vec<Box<[u8]>> = match snaps.remove(&line) {
                    Some(mut v) => {
                        v.sort_by_key(|(stamp, _)| *stamp);
                        v.into_iter().map(|(_, b)| Box::from(&b[..])).collect()
                    }
                    None => Vec::new(),
                };
                versions.push(Box::from(&current[line * LINE..(line + 1) * LINE]));
                (line, versions)
            })
            .collect();
        PendingLines {
            unit: LINE,
            mix_words: true,
            lines,
        }
    }

    /// [`RecordingMedia::pending_lines`] of the msync model: whole pages.
    fn pending_pages(&self) -> PendingLines {
        let st = self.lock();
        let current = self.current();
        let mut pages: Vec<usize> = st.page_history.keys().copied().collect();
        for (p, (cur, dur)) in current
            .chunks_exact(PAGE)
            .zip(st.durable.chunks_exact(PAGE))
            .enumerate()
        {
            if cur != dur {
                pages.push(p);
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let lines = pages
            .into_iter()
            .map(|page| {
                let mut versions = st.page_history.get(&page).cloned().unwrap_or_default();
                versions.push(Box::from(&current[page * PAGE..(page + 1) * PAGE]));
                (page, versions)
            })
            .collect();
        PendingLines {
            unit: PAGE,
            mix_words: false,
            lines,
        }
    }

    /// Remember the state of the non-durable pages `[offset, offset + len)` touches before a
    /// write changes them: the kernel may have written any of them back in that state.
    fn remember_pages(&self, offset: u64, len: u64) {
        if self.mode != Persistence::Msync || len == 0 {
            return;
        }
        let first = offset as usize / PAGE;
        let last = (offset + len - 1) as usize / PAGE;
        let current = self.current();
        let mut st = self.lock();
        for page in first..=last {
            let cur = &current[page * PAGE..(page + 1) * PAGE];
            let dirty = cur != &st.durable[page * PAGE..(page + 1) * PAGE];
            let history = st.page_history.entry(page).or_default();
            // A clean page's old state is its durable one, already a choice of the crash.
            if dirty && history.last().map_or(true, |h| &h[..] != cur) {
                history.push(Box::from(cur));
            }
            if history.is_empty() {
                st.page_history.remove(&page);
            }
        }
    }

    /// Write into `image` the crash image `choice` picks from `pending` (which must have been
    /// taken from this media in its present state). `image` is resized to the media length and
    /// its allocation reused.
    pub fn crash_image_into(
        &self,
        pending: &PendingLines,
        choice: CrashChoice,
        image: &mut Vec<u8>,
    ) {
        self.with_durable(|d| {
            image.clear();
            image.extend_from_slice(d);
        });
        pending.apply(choice, image);
    }

    /// Run `f` on the durable image (without copying it).
    pub fn with_durable<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let st = self.lock();
        f(&st.durable[..self.len as usize])
    }

    /// Count every later `write`, `persist` and `fence`; before event number `n` (from 1)
    /// takes effect, `hook(self, n)` runs on the calling thread for each `n` it accepts. Used
    /// to cut a workload inside its operations. The hook must not call back into this media's
    /// mutating methods.
    pub fn set_event_hook(&self, hook: Option<EventHook>) {
        *lock(&self.hook) = hook;
        self.events.store(0, Ordering::SeqCst);
    }

    /// Media events (`write`, `persist`, `fence`) since the hook was last set.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Fences (msync calls, in the msync model) since the media was created.
    pub fn fences(&self) -> u64 {
        self.fences.load(Ordering::SeqCst)
    }

    fn event(&self) {
        let n = self.events.fetch_add(1, Ordering::SeqCst) + 1;
        let mut hook = lock(&self.hook);
        if let Some(h) = hook.as_mut() {
            h(self, n);
        }
    }
}

/// Called before each media event with its number; see [`RecordingMedia::set_event_hook`].
pub type EventHook = Box<dyn FnMut(&RecordingMedia, u64) + Send>;

/// Which crash image [`RecordingMedia::crash_image_into`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashChoice {
    /// Only what is durable: every non-durable line lost.
    AllLost,
    /// Every non-durable line reached the media with its current bytes.
    AllKept,
    /// A seeded random subset of the non-durable lines, each word from any of its values.
    Random(u64),
}

/// The non-durable lines (or pages) of a media at one moment; see
/// [`RecordingMedia::pending_lines`].
pub struct PendingLines {
    /// Bytes per entry: a cache line (pmem model) or a page (msync model).
    unit: usize,
    /// Pmem: each aligned 8-byte word of a line picks its value on its own. Msync: a page
    /// reaches the media whole, in one of its states.
    mix_words: bool,
    lines: Vec<(usize, Vec<Box<[u8]>>)>,
}

impl PendingLines {
    /// Turn `image`, a copy of the durable image these lines were taken with, into the crash
    /// image `choice` picks.
    pub fn apply(&self, choice: CrashChoice, image: &mut [u8]) {
        let len = image.len();
        let unit = self.unit;
        let mut put = |at: usize, src: &[u8]| {
            if at < len {
                let n = src.len().min(len - at);
                image[at..at + n].copy_from_slice(&src[..n]);
            }
        };
        match choice {
            CrashChoice::AllLost => {}
            CrashChoice::AllKept => {
                for (line, versions) in &self.lines {
                    put(line * unit, versions.last().expect("current bytes"));
                }
            }
            CrashChoice::Random(seed) => {
                let mut rng = SplitMix64(seed);
                for (line, versions) in &self.lines {
                    if rng.next() & 1 == 0 {
                        continue;
                    }
                    if !self.mix_words {
                        let pick = rng.next() % versions.len() as u64;
                        put(line * unit, &versions[pick as usize]);
                        continue;
                    }
                    // Versions: 0 = durable (already in the image), 1..=n = snapshots, current.
                    let n = versions.len() as u64 + 1;
                    for w in 0..unit / WORD {
                        let pick = rng.next() % n;
                        if pick == 0 {
                            continue;
                        }
                        let word = &versions[pick as usize - 1][w * WORD..(w + 1) * WORD];
                        put(line * unit + w * WORD, word);
                    }
                }
            }
        }
    }

    /// Number of lines (or pages) a crash may leave in more than one state.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
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
        self.mode
    }

    fn persist(&self, offset: u64, len: u64) -> Result<(), MediaError> {
        check_range(offset, len, self.len)?;
        self.event();
        if len == 0 {
            return Ok(());
        }
        if self.mode == Persistence::Msync {
            let first = offset as usize / PAGE;
            let last = (offset + len - 1) as usize / PAGE;
            self.lock()
                .msync_pending
                .entry(std::thread::current().id())
                .or_default()
                .extend(first..=last);
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
        self.event();
        self.fences.fetch_add(1, Ordering::SeqCst);
        if self.mode == Persistence::Msync {
            let current = self.current();
            let mut st = self.lock();
            let Some(mut pages) = st.msync_pending.remove(&std::thread::current().id()) else {
                return Ok(());
            };
            pages.sort_unstable();
            pages.dedup();
            for page in pages {
                let r = page * PAGE..(page + 1) * PAGE;
                st.durable[r.clone()].copy_from_slice(&current[r]);
                st.page_history.remove(&page);
            }
            return Ok(());
        }
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

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MediaError> {
        check_range(offset, data.len() as u64, self.len)?;
        self.event();
        self.remember_pages(offset, data.len() as u64);
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
