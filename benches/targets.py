#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""The performance targets, judged on one benches/compare.sh run.

Usage: python3 benches/targets.py RESULTS_DIR

Reads RESULTS_DIR/results.json (and run.json, for the cache sizes) and prints, as Markdown,
the table "Against the targets" of docs/performance.md: for each target the two figures
compared, their ratio, what is asked, and whether this run meets it. A target whose rows are
missing or failed in this run reads "not measured". Ratios within one run are what counts; the
absolute figures are the machine's.
"""

import json
import os
import sys


def rate(row):
    """IOPS a row stands for: the steady state (second half) of a full-cache row, else the rate
    over the whole case (for a slow-backing row, the whole burst)."""
    timeline = row.get("timeline") or {}
    ios = timeline.get("ios") or []
    step = timeline.get("step_s") or 0.25
    if row.get("kind") == "full" and len(ios) > 4:
        part = ios[len(ios) // 2 : -1]
        return sum(part) / len(part) / step
    return row.get("iops") or 0


# (what, ours (target, case), peer (target, case), measure, at least / at most, bound)
# measure "iops": ratio of rates, must be >= bound; "p50": ratio of p50 latencies, <= bound.
TARGETS = [
    ("pmem path, 1 queue: 4k randwrite QD32 vs qsd-null",
     ("ours-pmem-shm", "randwrite-qd32-q1"), ("qsd-null", "randwrite-qd32-q1"), "iops", 0.37,
     "≥ 0.37× (≥ 400k IOPS)"),
    ("pmem path, 1 queue: read hits QD32 vs qsd-null",
     ("ours-pmem-shm", "randread-hit-qd32-q1"), ("qsd-null", "randread-hit-qd32-q1"), "iops",
     0.46, "≥ 0.46× (≥ 500k IOPS)"),
    ("pmem path, 2 queues: 4k randwrite QD32 vs qsd-null",
     ("ours-pmem-shm", "randwrite-qd32-q2"), ("qsd-null", "randwrite-qd32-q2"), "iops", 0.40,
     "≥ 0.40×"),
    ("pmem path, 2 queues: read hits QD32 vs qsd-null",
     ("ours-pmem-shm", "randread-hit-qd32-q2"), ("qsd-null", "randread-hit-qd32-q2"), "iops",
     0.80, "≥ 0.80×"),
    ("README default (msync, file beside the image): 4k randwrite QD32 vs qsd-file, fitting",
     ("ours-msync", "randwrite-qd32-q1"), ("qsd-file", "randwrite-qd32-q1"), "iops", 3.0,
     "≥ 3×"),
    ("QD1 write p50, ours-msync vs qsd-null",
     ("ours-msync", "randwrite-qd1-q1"), ("qsd-null", "randwrite-qd1-q1"), "p50", 1.1,
     "≤ 1.1×"),
    ("QD1 write p50, ours-pmem-shm vs qsd-null",
     ("ours-pmem-shm", "randwrite-qd1-q1"), ("qsd-null", "randwrite-qd1-q1"), "p50", 1.1,
     "≤ 1.1×"),
    ("slow backing: write burst vs qsd on the same throttled disk",
     ("ours-pmem-shm", "randwrite-slow-backing-qd32-q1"),
     ("qsd-file", "randwrite-slow-backing-qd32-q1"), "iops", 50.0, "≥ 50×"),
    ("full cache, ours-msync: steady randwrite vs qsd-file on the whole image",
     ("ours-msync", "randwrite-full-cache-qd32-q1"), ("qsd-file", "randwrite-full-cache-qd32-q1"),
     "iops", 0.90, "≥ 0.90×"),
    ("full cache, ours-pmem-shm: steady randwrite vs qsd-file on the whole image",
     ("ours-pmem-shm", "randwrite-full-cache-qd32-q1"),
     ("qsd-file", "randwrite-full-cache-qd32-q1"), "iops", 0.90, "≥ 0.90×"),
]

# Shown for context under the same rules, not judged.
CONTEXT = [
    ("… README default with 2 queues",
     ("ours-msync", "randwrite-qd32-q2"), ("qsd-file", "randwrite-qd32-q2"), "iops", None,
     "(≥ 3×)"),
]


def find(rows, key):
    for row in rows:
        if (row.get("target"), row.get("case")) == key and row.get("status") == "ok":
            return row
    return None


def fits(row):
    """Whether a write row stayed within its --io-limit (the volume that fits the cache)."""
    limit = row.get("io_limit")
    return limit is not None and (row.get("bytes") or 0) <= limit


def figure(row, measure):
    if measure == "p50":
        value = row.get("p50_us") or 0
        return value, f"{value:,.0f} µs"
    value = rate(row)
    return value, f"{value:,.0f}"


def line(rows, what, ours_key, peer_key, measure, bound, asked):
    ours, peer = find(rows, ours_key), find(rows, peer_key)
    if ours is None or peer is None:
        missing = " and ".join(f"{t} {c}" for (t, c), r in ((ours_key, ours), (peer_key, peer))
                               if r is None)
        return f"| {what} | not measured ({missing}) | | {asked} | not measured |"
    mine, mine_text = figure(ours, measure)
    theirs, theirs_text = figure(peer, measure)
    ratio = mine / theirs if theirs else float("inf")
    if bound is None:
        verdict = ""
    elif measure == "p50":
        verdict = "met" if ratio <= bound else "not met"
    else:
        verdict = "met" if ratio >= bound else "not met"
    if verdict and "fitting" in what and not fits(ours):
        verdict = "not shown (did not fit)"
    ended = ours.get("ended_by")
    note = f" ({ended})" if ended and ours.get("kind") == "matrix" and measure == "iops" else ""
    return f"| {what} | {mine_text}{note} vs {theirs_text} | {ratio:.2f}× | {asked} | {verdict} |"


def render(rows, run):
    out = ["### Against the targets", ""]
    if run:
        out.append(
            f"From one run ({run.get('date', '?')}; {run.get('machine', '?')}). Write cases "
            f"stopped after {run['fit_bytes'] >> 20} MiB ({run['fit_percent']}% of the data "
            f"capacity of the {min(run['file_cache_mib'], run['shm_cache_mib'])} MiB caches) "
            f"or at their time cap; *(io-limit)* or *(runtime)* after a figure says which. "
            "*This run* judges the ratio within the run; the absolute IOPS in brackets under "
            "*asked* are those the targets name for a 2-CPU machine.")
        out.append("")
    out.append("| target | measured | ratio | asked | this run |")
    out.append("|---|---:|---:|---|---|")
    for what, ours, peer, measure, bound, asked in TARGETS + CONTEXT:
        out.append(line(rows, what, ours, peer, measure, bound, asked))
    return "\n".join(out)


def load_run(results_dir):
    """A run's rows (results.json) and its sizes and bounds (run.json; None if absent)."""
    with open(os.path.join(results_dir, "results.json")) as f:
        rows = json.load(f)
    run = None
    run_path = os.path.join(results_dir, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            run = json.load(f)
    return rows, run


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(render(*load_run(sys.argv[1])))


if __name__ == "__main__":
    main()
