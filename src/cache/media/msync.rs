// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-thread pending ranges for msync mode.
//!
//! `persist` only records the page range in the calling thread's list; `fence` takes the ranges
//! that belong to one mapping, merged into runs of adjacent pages, and syncs them with one
//! device flush. Ranges are kept as absolute addresses, so one thread can work on several
//! mappings without mixing them up.

use std::cell::RefCell;

thread_local! {
    static PENDING: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
    /// The merged runs of one fence (kept to reuse the allocation).
    static RUNS: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
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

/// Ranges less than this apart are synced as one run: the pages between are those of keys
/// another close will sync (in msync mode the whole folio of a written page is written back
/// anyway), while a run of their own costs a `sync_file_range` and its wait.
const MERGE_GAP: usize = super::FOLIO_SIZE as usize;

/// Run `f` on this thread's pending ranges inside `[map_start, map_end)`, taken from the list
/// and merged into runs (those less than [`MERGE_GAP`] apart), in ascending order.
pub(crate) fn with_runs<R>(
    map_start: usize,
    map_end: usize,
    f: impl FnOnce(&[(usize, usize)]) -> R,
) -> R {
    RUNS.with(|r| {
        let mut runs = r.borrow_mut();
        runs.clear();
        PENDING.with(|p| {
            p.borrow_mut().retain(|&(s, e)| {
                let mine = s >= map_start && e <= map_end;
                if mine {
                    runs.push((s, e));
                }
                !mine
            })
        });
        runs.sort_unstable();
        let mut kept = 0;
        for i in 0..runs.len() {
            if kept > 0 && runs[i].0 <= runs[kept - 1].1 + MERGE_GAP {
                runs[kept - 1].1 = runs[kept - 1].1.max(runs[i].1);
            } else {
                runs[kept] = runs[i];
                kept += 1;
            }
        }
        runs.truncate(kept);
        f(&runs)
    })
}

#[cfg(test)]
mod tests {
    use super::{record, with_runs};

    #[test]
    fn pending_ranges_merge_into_runs_of_nearby_pages_per_mapping() {
        let base = 1 << 30;
        record(base + 8192, base + 9000);
        record(base, base + 4096);
        record(base + 4096, base + 5000);
        record(base + (2 << 20), base + (2 << 20) + 100);
        record(base + (64 << 20), base + (64 << 20) + 1);
        // Another mapping's range stays for that mapping's fence.
        record(base + (200 << 20), base + (200 << 20) + 4096);
        let runs = with_runs(base, base + (100 << 20), |r| r.to_vec());
        assert_eq!(
            runs,
            [
                (base, base + (2 << 20) + 4096),
                (base + (64 << 20), base + (64 << 20) + 4096)
            ]
        );
        assert!(with_runs(base, base + (100 << 20), |r| r.is_empty()));
        let other = with_runs(base + (100 << 20), base + (300 << 20), |r| r.to_vec());
        assert_eq!(other, [(base + (200 << 20), base + (200 << 20) + 4096)]);
    }
}
