//! Per-thread pending ranges for msync mode.
//!
//! `persist` only records the page range in the calling thread's list; `fence` merges the
//! ranges that belong to one mapping and `msync`s each merged run once. Ranges are kept as
//! absolute addresses, so one thread can work on several mappings without mixing them up.

use std::cell::RefCell;

thread_local! {
    static PENDING: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
}

/// Page size of the mapping (msync works on whole pages).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Remember `[start, end)` (absolute addresses) for the next fence of this thread.
pub(crate) fn record(start: usize, end: usize) {
    let page = page_size();
    let start = start & !(page - 1);
    let end = (end + page - 1) & !(page - 1);
    PENDING.with(|p| p.borrow_mut().push((start, end)));
}

/// Take this thread's pending ranges inside `[map_start, map_end)`, merged and sorted.
pub(crate) fn take_merged(map_start: usize, map_end: usize) -> Vec<(usize, usize)> {
    let mut mine: Vec<(usize, usize)> = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let mut mine = Vec::new();
        p.retain(|&(s, e)| {
            if s >= map_start && e <= map_end {
                mine.push((s, e));
                false
            } else {
                true
            }
        });
        mine
    });
    mine.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(mine.len());
    for (s, e) in mine {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}
