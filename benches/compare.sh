#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Compares vhost-user-blk backends in one run on one machine: the same loadgen binary, the same
# freshly written backing image on local disk, the same workload matrix against each target.
#
# Every (target, case) gets a fresh daemon and a fresh cache. The client (loadgen) and the
# daemon are pinned to different CPUs. Cases that write fit the cache unless they are the
# full-cache case; read-hit cases write their region first, read-miss cases start from an empty
# cache. Then two scenarios:
#   slow backing: the image's disk throttled to THROTTLE_IOPS writes/s with a cgroup v1 blkio
#     limit (skipped with a message where that is not writable); a write burst into the cache,
#     then the cache's dirty data draining, against qsd on the same throttled disk;
#   full cache: random writes over the whole image for long enough that the cache is full and
#     writeback sets the pace, against qsd writing the image directly.
#
# Output (OUT, default $WORKDIR/vup-bench-<time>): one JSON per measurement, results.json (all
# of them, for benches/plot.py), results.md (the table). Then:
#   python3 benches/plot.py OUT            (PNG plots next to results.json)
#
# Usage: benches/compare.sh            (from the repository root)
# Environment:
#   RUNTIME=10          seconds per case
#   IMAGE_MIB=1024      size of the backing image in MiB
#   CACHE_MIB=512       cache size of our cache targets
#   REGION_MIB=192      region the fitting write and read-hit cases use (fits the cache)
#   WORKDIR=/var/tmp    where the image and the cache files beside it go (local disk)
#   SHM=/dev/shm        memory-speed directory (qsd-tmpfs, our pmem-path cache)
#   CPU_DAEMON=1 CPU_CLIENT=0   CPUs to pin to (empty: no pinning)
#   THROTTLE_IOPS=1000  slow-backing write limit; SLOW=0 skips that scenario, FULL=0 the other
#   SLOW_CACHE_MIB=2048 cache size in the slow-backing scenario (the burst fills it)
#   ONLY=regex          run only the targets whose name matches; CASES="..." overrides the matrix
#   SKIP_BUILD=1        reuse the existing release builds
set -euo pipefail

RUNTIME=${RUNTIME:-10}
IMAGE_MIB=${IMAGE_MIB:-1024}
CACHE_MIB=${CACHE_MIB:-512}
REGION_MIB=${REGION_MIB:-192}
WORKDIR=${WORKDIR:-/var/tmp}
SHM=${SHM:-/dev/shm}
ONLY=${ONLY:-.}
OURS=${OURS:-target/release/vhost-user-pcache}
CPU_DAEMON=${CPU_DAEMON-1}
CPU_CLIENT=${CPU_CLIENT-0}
THROTTLE_IOPS=${THROTTLE_IOPS:-1000}
SLOW_CACHE_MIB=${SLOW_CACHE_MIB:-2048}
OUT=${OUT:-$WORKDIR/vup-bench-$(date -u +%Y%m%dT%H%M%SZ)}

# name|daemon command line. @SOCK@, @IMG@, @SHMIMG@, @DIR@, @SHMDIR@, @BYTES@, @CTL@ and
# @CACHE@ (cache size) are substituted. A new target is one more line here.
QSD_EXPORT="--export type=vhost-user-blk,id=e0,node-name=n,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=2"
TARGETS=(
  "qsd-file|qemu-storage-daemon --blockdev driver=file,node-name=n,filename=@IMG@,cache.direct=on,aio=native $QSD_EXPORT"
  "qsd-tmpfs|qemu-storage-daemon --blockdev driver=file,node-name=n,filename=@SHMIMG@,aio=threads $QSD_EXPORT"
  "qsd-null|qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=@BYTES@,read-zeroes=on $QSD_EXPORT"
  "ours-none|$OURS serve --socket @SOCK@ --backing @IMG@ --cache none --queues 2"
  "ours-msync|$OURS serve --socket @SOCK@ --backing @IMG@ --cache @DIR@/cache.pcache --cache-size @CACHE@ --queues 2 --control-socket @CTL@"
  "ours-pmem-shm|env VHOST_USER_PCACHE_EMULATE_PMEM=1 $OURS serve --socket @SOCK@ --backing @IMG@ --cache @SHMDIR@/cache.pcache --cache-size @CACHE@ --persistence pmem --queues 2 --control-socket @CTL@"
)

# label|prepare|loadgen arguments. prepare: "-" nothing, "fill" writes the region first.
# The "fit" cases write every block of the region exactly once (--verify; the table takes the
# write pass): a burst that certainly fits the cache, which takes new space for every write.
# The other write cases run for the whole runtime and may fill a cache.
R="--size ${REGION_MIB}M"
DEFAULT_CASES="randwrite-fit-qd32-q1|-|--rw randwrite --bs 4k --iodepth 32 --queues 1 $R --verify
randwrite-fit-qd32-q2|-|--rw randwrite --bs 4k --iodepth 32 --queues 2 $R --verify
randwrite-qd32-q1|-|--rw randwrite --bs 4k --iodepth 32 --queues 1 $R
randwrite-qd32-q2|-|--rw randwrite --bs 4k --iodepth 32 --queues 2 $R
randread-hit-qd32-q1|fill|--rw randread --bs 4k --iodepth 32 --queues 1 $R
randread-hit-qd32-q2|fill|--rw randread --bs 4k --iodepth 32 --queues 2 $R
randread-miss-qd32-q1|-|--rw randread --bs 4k --iodepth 32 --queues 1
randwrite-qd1-q1|-|--rw randwrite --bs 4k --iodepth 1 --queues 1 $R
randread-hit-qd1-q1|fill|--rw randread --bs 4k --iodepth 1 --queues 1 $R
write-128k-qd8-q1|-|--rw write --bs 128k --iodepth 8 --queues 1 $R"
CASES=${CASES:-$DEFAULT_CASES}

log() { echo "compare: $*" >&2; }

if [[ ! -f Cargo.toml ]]; then
  log "run me from the repository root"
  exit 2
fi
if [[ $(stat -f -c %T "$WORKDIR") == tmpfs ]]; then
  log "$WORKDIR is tmpfs; set WORKDIR to a directory on local disk"
  exit 2
fi
for tool in jq taskset; do
  command -v $tool >/dev/null || { log "$tool is needed"; exit 2; }
done

mkdir -p "$OUT"
DIR=$(mktemp -d "$WORKDIR/vup-compare.XXXXXX")
SHMDIR=$(mktemp -d "$SHM/vup-compare.XXXXXX")
CGROUP=
DAEMON_PID=
cleanup() {
  stop_daemon
  rm -rf "$DIR" "$SHMDIR"
  if [[ -n $CGROUP ]]; then rmdir "$CGROUP" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building (release)"
  cargo build --release --bin vhost-user-pcache >&2
  cargo bench --bench loadgen --no-run >&2
fi
LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "loadgen") | .executable' | tail -n 1)
if [[ -z $LOADGEN || ! -x $LOADGEN ]]; then
  log "no loadgen binary found"
  exit 2
fi

pin() { # cpu command...
  local cpu=$1
  shift
  if [[ -n $cpu ]]; then taskset -c "$cpu" "$@"; else "$@"; fi
}

IMG=$DIR/backing.img
SHMIMG=$SHMDIR/backing.img
BYTES=$((IMAGE_MIB * 1024 * 1024))
log "writing a fresh ${IMAGE_MIB} MiB backing image in $DIR (and a copy in $SHMDIR)"
# Written for real (not sparse) so reads hit allocated blocks for every target.
dd if=/dev/zero of="$IMG" bs=1M count="$IMAGE_MIB" oflag=direct conv=fsync status=none
dd if=/dev/zero of="$SHMIMG" bs=1M count="$IMAGE_MIB" status=none

# start_daemon name command [cgroup]: a fresh daemon (and a fresh cache: the cache files are
# removed first), pinned, optionally inside a blkio cgroup.
start_daemon() {
  local name=$1 command=$2 group=${3:-} sock=$DIR/$1.sock
  rm -f "$DIR/cache.pcache" "$SHMDIR/cache.pcache" "$sock" "$DIR/ctl.sock"
  command=${command//@SOCK@/$sock}
  command=${command//@IMG@/$IMG}
  command=${command//@SHMIMG@/$SHMIMG}
  command=${command//@SHMDIR@/$SHMDIR}
  command=${command//@DIR@/$DIR}
  command=${command//@BYTES@/$BYTES}
  command=${command//@CTL@/$DIR/ctl.sock}
  command=${command//@CACHE@/${CUR_CACHE_MIB:-$CACHE_MIB}M}
  log "starting $name: $command"
  local -a pinning=()
  [[ -n $CPU_DAEMON ]] && pinning=(taskset -c "$CPU_DAEMON")
  # Started directly (not through a shell function), so $! is the daemon itself.
  if [[ -n $group ]]; then
    # shellcheck disable=SC2086 # the command line is split on purpose
    "${pinning[@]}" sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$group" $command \
      >"$OUT/$name.log" 2>&1 &
  else
    # shellcheck disable=SC2086
    "${pinning[@]}" $command >"$OUT/$name.log" 2>&1 &
  fi
  DAEMON_PID=$!
  for _ in $(seq 600); do
    if [[ -S $sock ]]; then
      # A new cache file is allocated and populated at start; its zeroes reach the disk in
      # the background. That is a one-time cost of creating a cache, so it is paid here,
      # before the measurement, not during it.
      [[ -f $DIR/cache.pcache ]] && sync "$DIR/cache.pcache"
      return 0
    fi
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.1
  done
  log "$name did not come up; its log:"
  tail -n 20 "$OUT/$name.log" >&2 || true
  stop_daemon
  return 1
}

stop_daemon() {
  if [[ -n $DAEMON_PID ]]; then
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
  fi
}

loadgen() { # name out-json arguments...
  local name=$1 out=$2
  shift 2
  pin "$CPU_CLIENT" "$LOADGEN" --socket "$DIR/$name.sock" --seed 42 --json "$@" >"$out" 2>"$out.err"
}

# Write the region once, every block (verify mode visits each block exactly once).
fill_region() { # name
  loadgen "$1" "$OUT/$1.fill.json" --rw write --bs 64k --iodepth 8 --queues 1 $R \
    --verify --runtime 120 || log "$1: filling the region failed: $(tail -n 2 "$OUT/$1.fill.json.err")"
}

# record target case kind json: one line of results.json input (the main op of the pass).
record() {
  local target=$1 case=$2 kind=$3 json=$4 status=ok
  if ! jq -e '.passes[0]' "$json" >/dev/null 2>&1; then
    status=failed
    echo "{}" >"$json.tmp" && mv "$json.tmp" "$json"
  fi
  jq -c --arg t "$target" --arg c "$case" --arg k "$kind" --arg s "$status" '
    (.passes[0] // {}) as $p
    | ($p.ops // {}) as $o
    | (if (($o.read.ios // 0) >= ($o.write.ios // 0)) then $o.read else $o.write end) as $m
    | {target: $t, case: $c, kind: $k, status: $s,
       iops: ((($o.read.iops // 0) + ($o.write.iops // 0))),
       mib_s: ((($o.read.mib_s // 0) + ($o.write.mib_s // 0))),
       p50_us: ($m.lat_us.p50 // null), p99_us: ($m.lat_us.p99 // null),
       mean_us: ($m.lat_us.mean // null), cdf: ($m.lat_cdf_us // []),
       timeline: ($p.timeline // null), errors: ($p.errors // null)}' "$json" >>"$OUT/results.jsonl"
}

: >"$OUT/results.jsonl"
declare -a RAN=()

available() { # command
  local binary=${1%% *}
  [[ $binary == env ]] && binary=$(awk '{print $3}' <<<"$1")
  command -v "$binary" >/dev/null
}

for entry in "${TARGETS[@]}"; do
  name=${entry%%|*}
  command=${entry#*|}
  [[ $name =~ $ONLY ]] || continue
  if ! available "$command"; then
    log "skipping $name: ${command%% *} is not available"
    continue
  fi
  RAN+=("$name")
  while IFS='|' read -r label prepare arguments; do
    [[ -n $label ]] || continue
    out=$OUT/$name.$label.json
    start_daemon "$name" "$command" || { echo '{}' >"$out"; record "$name" "$label" matrix "$out"; continue; }
    [[ $prepare == fill ]] && fill_region "$name"
    log "$name $label"
    # shellcheck disable=SC2086 # arguments are split on purpose
    loadgen "$name" "$out" $arguments --runtime "$RUNTIME" ||
      log "$name $label failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
    record "$name" "$label" matrix "$out"
    stop_daemon
  done <<<"$CASES"
done

# Full cache: random writes over the whole image, 3x the runtime, so our cache (CACHE_MIB)
# fills and writeback sets the pace; the steady rate is the second half's.
if [[ ${FULL:-1} == 1 ]]; then
  for name in qsd-file ours-msync ours-pmem-shm; do
    [[ $name =~ $ONLY ]] || continue
    for entry in "${TARGETS[@]}"; do [[ ${entry%%|*} == "$name" ]] && command=${entry#*|}; done
    available "$command" || continue
    out=$OUT/$name.full-cache.json
    start_daemon "$name" "$command" || continue
    log "$name full-cache steady state"
    loadgen "$name" "$out" --rw randwrite --bs 4k --iodepth 32 --queues 1 --runtime $((RUNTIME * 3)) ||
      log "$name full-cache failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
    record "$name" randwrite-full-cache-qd32-q1 full "$out"
    stop_daemon
  done
fi

# Slow backing: the image's disk limited to THROTTLE_IOPS writes per second for the daemon's
# cgroup. A burst of random writes into a region that fits the cache, then the drain.
if [[ ${SLOW:-1} == 1 ]]; then
  BLKIO=/sys/fs/cgroup/blkio
  devno=$(stat -c '%Hd:%Ld' "$IMG" 2>/dev/null || true)
  if [[ -d $BLKIO && -w $BLKIO && -n $devno ]] && mkdir -p "$BLKIO/vup-bench" 2>/dev/null &&
    echo "$devno $THROTTLE_IOPS" >"$BLKIO/vup-bench/blkio.throttle.write_iops_device" 2>/dev/null; then
    CGROUP=$BLKIO/vup-bench
    log "slow backing: $devno limited to $THROTTLE_IOPS write IOPS in $CGROUP"
    for name in qsd-file ours-pmem-shm; do
      [[ $name =~ $ONLY ]] || continue
      for entry in "${TARGETS[@]}"; do [[ ${entry%%|*} == "$name" ]] && command=${entry#*|}; done
      available "$command" || continue
      out=$OUT/$name.slow-backing.json
      CUR_CACHE_MIB=$SLOW_CACHE_MIB start_daemon "$name" "$command" "$CGROUP" || continue
      log "$name slow-backing burst"
      loadgen "$name" "$out" --rw randwrite --bs 4k --iodepth 32 --queues 1 --size 64M --runtime $((RUNTIME * 2)) ||
        log "$name slow-backing failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
      record "$name" randwrite-slow-backing-qd32-q1 slow "$out"
      if [[ $name == ours-* ]]; then
        # The drain: dirty bytes every half second until none are left (at most a minute).
        : >"$OUT/$name.drain.tsv"
        for i in $(seq 0 120); do
          dirty=$("$OURS" ctl --control-socket "$DIR/ctl.sock" --json status 2>/dev/null |
            jq -r '.. | objects | select(has("dirty_bytes")) | .dirty_bytes' | head -n 1)
          printf '%s\t%s\n' "$(awk -v i="$i" 'BEGIN { print i / 2 }')" "${dirty:-}" >>"$OUT/$name.drain.tsv"
          [[ ${dirty:-1} == 0 ]] && break
          sleep 0.5
        done
      fi
      stop_daemon
    done
  else
    log "slow backing skipped: cannot set a blkio throttle ($BLKIO not writable or cgroup v1 blkio missing)"
  fi
fi

jq -s . "$OUT/results.jsonl" >"$OUT/results.json"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "Machine: $(nproc) CPUs, $cpu, kernel $(uname -r); ${RUNTIME} s per case; image" \
    "${IMAGE_MIB} MiB on $(stat -f -c %T "$WORKDIR"); cache ${CACHE_MIB} MiB; daemon on CPU" \
    "${CPU_DAEMON:-any}, client on CPU ${CPU_CLIENT:-any}; $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "| case | target | IOPS | MiB/s | p50 µs | p99 µs | vs qsd-file | vs qsd-null |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
  jq -r '
    map(. + {rate: (
      if .kind == "full" and .timeline != null
      then (.timeline.ios | .[(length / 2 | floor):-1] | (add / length) * 4)
      elif .kind == "slow" and .timeline != null
      then (.timeline.ios | .[1:9] | (add / length) * 4)
      else .iops end)})
    | (map({key: (.target + "/" + .case), value: .rate}) | from_entries) as $by
    | .[]
    | ($by["qsd-file/" + .case] // 0) as $f
    | ($by["qsd-null/" + .case] // 0) as $n
    | .rate as $iops
    | "| \(.case) | \(.target) | " +
      (if .status != "ok" then "failed | | | | | |" else
       "\($iops | floor) | \(.mib_s * 10 | floor / 10) | \(.p50_us // 0 | . * 10 | floor / 10) | " +
       "\(.p99_us // 0 | . * 10 | floor / 10) | " +
       (if $f > 0 then "\($iops / $f * 100 | floor / 100)" else "" end) + " | " +
       (if $n > 0 then "\($iops / $n * 100 | floor / 100)" else "" end) + " |" end)' \
    "$OUT/results.json"
  echo
  echo "Full-cache rows give the second half's rate (steady state). Slow-backing rows: the" \
    "image's disk limited to $THROTTLE_IOPS write IOPS; the rate of the burst's first 2 s."
} | tee "$OUT/results.md"
log "results in $OUT (plots: python3 benches/plot.py $OUT)"
