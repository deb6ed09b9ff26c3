// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-thread pending ranges for msync mode.
//!
//! `persist` only records the page range in the calling thread's list; `fence` takes the ranges
//! that belong to one mapping and `msync`s their span once. Ranges are kept as
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

/// Take this thread's pending ranges inside `[map_start, map_end)` and return the span from
/// the first to the end of the last, or `None` when there are none.
pub(crate) fn take_span(map_start: usize, map_end: usize) -> Option<(usize, usize)> {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let mut span: Option<(usize, usize)> = None;
        p.retain(|&(s, e)| {
            if s >= map_start && e <= map_end {
                span = Some(match span {
                    Some((a, b)) => (a.min(s), b.max(e)),
                    None => (s, e),
                });
                false
            } else {
                true
            }
        });
        span
    })
}
