#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Cost of one request in instructions and heap allocations, which do not depend on how busy
# the machine is: the daemon runs under `valgrind --tool=callgrind`, loadgen drives 4 KiB
# requests at QD1 on a 16 MiB region for RUNTIME seconds (counters zeroed after start-up and,
# for reads, after the region was written once), and the totals of every daemon thread are
# divided by the requests served. Allocations are the calls into malloc, calloc, realloc and
# posix_memalign from outside the allocator.
#
# Usage: benches/callgrind.sh MODE RW [DAEMON]     (from the repository root)
#   MODE  none (--cache none) | pmem (cache on SHM through the pmem code path, emulated)
#   RW    randwrite | randread
#   DAEMON the daemon binary (default target/release/vhost-user-pcache)
# Environment: RUNTIME=8, WORKDIR=/var/tmp, SHM=/dev/shm, OUT (default: a new directory in
# WORKDIR, kept: cg.out.1 is the profile to open with callgrind_annotate), LOADGEN_ARGS (more
# loadgen arguments for the measured run, e.g. "--flush-every 1"; flushes count as requests).
# Needs valgrind (callgrind_control) and python3; builds loadgen with `cargo bench --no-run`.
set -euo pipefail

MODE=${1:?MODE: none or pmem}
RW=${2:?RW: randwrite or randread}
DAEMON=${3:-target/release/vhost-user-pcache}
RUNTIME=${RUNTIME:-8}
WORKDIR=${WORKDIR:-/var/tmp}
SHM=${SHM:-/dev/shm}
OUT=${OUT:-$(mktemp -d "$WORKDIR/vup-callgrind.XXXXXX")}

LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "loadgen" and m.get("executable"):
        print(m["executable"])')

truncate -s 256M "$OUT/img"
env=()
case $MODE in
  none) args=(--cache none) ;;
  pmem)
    args=(--cache "$SHM/vup-callgrind-$$.pcache" --cache-size 128M --persistence pmem)
    env=(VHOST_USER_PCACHE_EMULATE_PMEM=1) ;;
  *) echo "MODE is none or pmem" >&2; exit 2 ;;
esac
# Polling off: the instructions of a worker spinning on an empty ring count time, not work.
args+=(--poll-us 0)
env "${env[@]}" valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" \
  "$DAEMON" serve --socket "$OUT/s.sock" --backing "$OUT/img" --queues 1 "${args[@]}" \
  2>"$OUT/daemon.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$SHM/vup-callgrind-$$.pcache"' EXIT
for _ in $(seq 240); do [ -S "$OUT/s.sock" ] && break; sleep 0.5; done
if [ "$RW" = randread ]; then
  "$LOADGEN" --socket "$OUT/s.sock" --rw randwrite --bs 4k --iodepth 8 --size 16M \
    --runtime 60 --verify >/dev/null
fi
callgrind_control -z $pid >/dev/null 2>&1
"$LOADGEN" --socket "$OUT/s.sock" --rw "$RW" --bs 4k --iodepth 1 --size 16M \
  --runtime "$RUNTIME" ${LOADGEN_ARGS:-} --json >"$OUT/run.json"
callgrind_control -d $pid >/dev/null 2>&1
kill $pid
wait $pid || true

python3 - "$OUT" "$MODE" "$RW" <<'PY'
import json, re, sys
out, mode, rw = sys.argv[1:]
run = json.load(open(f"{out}/run.json"))
requests = sum(op["ios"] for p in run["passes"] for op in p["ops"].values())
names, allocs, total = {}, 0, 0
caller = callee = None
alloc_fns = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"}
for line in open(f"{out}/cg.out.1"):
    if line.startswith(("summary:", "totals:")):
        total = int(line.split()[1])
    m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line)
    if m:
        kind, ident, name = m.groups()
        if name:
            names[ident] = name.strip()
        if kind == "cfn":
            callee = names.get(ident)
        else:
            caller = names.get(ident)
        continue
    if line.startswith("calls=") and callee is not None:
        inside = (caller or "").startswith(("malloc", "realloc", "calloc", "_int_", "__libc"))
        if callee in alloc_fns and not inside:
            allocs += int(line.split("=")[1].split()[0])
        callee = None
print(f"{mode} {rw}: {requests} requests, {total / requests:,.0f} Ir/request, "
      f"{allocs / requests:.2f} allocations/request  ({out})")
PY
