#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Plots of one benches/compare.sh run, from the results.json it leaves.

Usage: python3 benches/plot.py RESULTS_DIR [OUTPUT_DIR]

Writes into OUTPUT_DIR (default RESULTS_DIR):
  iops.png           IOPS of every target for every workload (one run, same machine); a
                     hatched bar is a volume-bound case the time cap stopped first
                     (MAX_RUNTIME, from run.json)
  latency-qd1.png    QD1 latency distribution (CDF) of 4 KiB random writes and read hits
  slow-backing.png   IOPS over time of a write burst on a throttled disk, and the drain
  full-cache.png     IOPS over time of random writes over the whole image (cache full); the
                     shaded second half is where the steady rate is taken

Needs matplotlib (pip install matplotlib, or the python3-matplotlib package).
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# The rate a row stands for is defined once, with the targets it is judged against.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from targets import load_run, rate  # noqa: E402

# One colour per target, the same in every plot; peers in greys, ours in colour.
COLOURS = {
    "qsd-file": "#636363",
    "qsd-tmpfs": "#969696",
    "qsd-null": "#252525",
    "ours-none": "#9ecae1",
    "ours-msync": "#3182bd",
    "ours-pmem-shm": "#e6550d",
}
LABELS = {
    "qsd-file": "qsd, raw file (O_DIRECT)",
    "qsd-tmpfs": "qsd, file in tmpfs",
    "qsd-null": "qsd, null-co (protocol ceiling)",
    "ours-none": "ours, --cache none",
    "ours-msync": "ours, cache file beside the image (msync)",
    "ours-pmem-shm": "ours, cache in tmpfs (pmem path)",
}


def targets_in(rows):
    seen = []
    for r in rows:
        if r["target"] not in seen:
            seen.append(r["target"])
    return seen


def plot_iops(rows, out, max_runtime=None):
    matrix = [r for r in rows if r["kind"] in ("matrix", "full") and r["status"] == "ok"]
    cases = []
    for r in matrix:
        if r["case"] not in cases:
            cases.append(r["case"])
    targets = targets_in(matrix)
    fig, ax = plt.subplots(figsize=(13, 6))
    width = 0.8 / max(len(targets), 1)
    capped_any = False
    for i, t in enumerate(targets):
        values, capped = [], []
        for c in cases:
            match = [r for r in matrix if r["target"] == t and r["case"] == c]
            values.append(rate(match[0]) / 1000 if match else 0)
            # A case bounded by volume that the time cap (MAX_RUNTIME) stopped first: the
            # target did less work than the others. (QD1 cases are time-bound on purpose.)
            capped.append(bool(match) and max_runtime is not None
                          and bool(match[0].get("io_limit"))
                          and match[0].get("ended_by") == "runtime"
                          and (match[0].get("elapsed_s") or 0) >= 0.99 * max_runtime)
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(cases))]
        bars = ax.bar(xs, values, width, label=LABELS.get(t, t), color=COLOURS.get(t))
        for b, v, cap in zip(bars, values, capped):
            if cap:
                b.set_hatch("///")
                b.set_edgecolor("white")
                capped_any = True
            if v > 0:
                ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                            va="bottom", fontsize=6, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=25, ha="right")
    ax.set_ylabel("thousand IOPS (4 KiB unless named)")
    ax.set_yscale("log")
    ax.set_title("IOPS per workload and target (one run; log scale; higher is better)")
    ax.grid(axis="y", which="both", alpha=0.3)
    # Plain swatches: a bar's own patch would carry its hatching into the legend.
    handles = [Patch(facecolor=COLOURS.get(t, "#777777")) for t in targets]
    labels = [LABELS.get(t, t) for t in targets]
    if capped_any:
        handles.append(Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white"))
        labels.append("hatched: the time cap stopped the case before its volume")
    ax.legend(handles, labels, fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "iops.png"), dpi=120)
    plt.close(fig)


def plot_latency(rows, out):
    cases = [c for c in ("randwrite-qd1-q1", "randread-hit-qd1-q1")
             if any(r["case"] == c for r in rows)]
    if not cases:
        return
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.5), squeeze=False)
    for ax, c in zip(axes[0], cases):
        for r in rows:
            if r["case"] != c or r["status"] != "ok" or not r.get("cdf"):
                continue
            pts = [(us, p) for p, us in r["cdf"] if us > 0]
            peer = r["target"].startswith("qsd")
            ax.plot([u for u, _ in pts], [p for _, p in pts], marker=".",
                    linestyle="--" if peer else "-",
                    label=f'{LABELS.get(r["target"], r["target"])} (p50 {r["p50_us"]:.0f} µs)',
                    color=COLOURS.get(r["target"]))
        ax.set_xscale("log")
        ax.set_xlabel("latency, µs (log scale)")
        ax.set_ylabel("percent of requests at or below")
        ax.set_title(f"QD1 latency distribution: {c}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency-qd1.png"), dpi=120)
    plt.close(fig)


def plot_timeline(rows, results_dir, out, kind, filename, title):
    chosen = [r for r in rows if r["kind"] == kind and r.get("timeline")]
    if not chosen:
        return
    drains = {}
    for r in chosen:
        path = os.path.join(results_dir, f'{r["target"]}.drain.tsv')
        if kind == "slow" and os.path.exists(path):
            pts = []
            with open(path) as f:
                for line in f:
                    t, _, dirty = line.strip().partition("\t")
                    if dirty:
                        pts.append((float(t), int(dirty) / 2**20))
            if pts:
                drains[r["target"]] = pts
    rows_n = 2 if drains else 1
    fig, axes = plt.subplots(rows_n, 1, figsize=(10, 4 * rows_n), squeeze=False)
    ax = axes[0][0]
    longest = 0.0
    for r in chosen:
        step = r["timeline"]["step_s"]
        ios = r["timeline"]["ios"][:-1]
        longest = max(longest, len(ios) * step)
        what = "steady" if kind == "full" else "burst"
        ax.plot([i * step for i in range(len(ios))], [n / step / 1000 for n in ios],
                label=f'{LABELS.get(r["target"], r["target"])} ({what} {rate(r) / 1000:.1f}k IOPS)',
                color=COLOURS.get(r["target"]), marker="." if len(ios) < 20 else None,
                linestyle="--" if r["target"].startswith("qsd") else "-")
    if kind == "full" and longest > 0:
        ax.axvspan(longest / 2, longest, color="#dddddd", alpha=0.5, lw=0,
                   label="steady state: the half the rate is taken from")
    ax.set_xlabel("seconds from the start of the load")
    ax.set_ylabel("thousand IOPS")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if drains:
        ax = axes[1][0]
        for t, pts in drains.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLOURS.get(t),
                    label=f"{LABELS.get(t, t)}: dirty data in the cache")
        ax.set_xlabel("seconds after the load stopped")
        ax.set_ylabel("dirty MiB")
        ax.set_title("Writeback draining the cache onto the throttled disk")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, filename), dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    results_dir = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else results_dir
    os.makedirs(out, exist_ok=True)
    rows, run = load_run(results_dir)
    max_runtime = run.get("max_runtime") if run else None
    plot_iops(rows, out, max_runtime)
    plot_latency(rows, out)
    plot_timeline(rows, results_dir, out, "slow", "slow-backing.png",
                  "4 KiB random writes, QD32, image's disk throttled (cgroup blkio)")
    plot_timeline(rows, results_dir, out, "full", "full-cache.png",
                  "4 KiB random writes over the whole image: the cache fills, writeback sets the pace")
    print(f"plots written to {out}")


if __name__ == "__main__":
    main()
