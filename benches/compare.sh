#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Compares vhost-user-blk backends in one run on one machine: the same loadgen binary, the same
# freshly written backing image on local disk, the same workload matrix against each target.
#
# Every (target, case) gets a fresh daemon and a fresh cache. The client (loadgen) and the
# daemon are pinned to different CPUs. Every case that writes, except the full-cache case, fits
# the cache: it stops after FIT_PERCENT % of the cache's data capacity (loadgen --io-limit; the
# same volume for every target, peers too, so all do the same work) or at its time cap,
# whichever comes first, and the table says which. Read-hit cases write their region first and
# then read it for RUNTIME seconds; the read-miss case reads a quarter of the image at random
# from an empty cache (about 88% of those reads are first reads). Then two scenarios:
#   slow backing: the image's disk throttled to THROTTLE_IOPS writes/s with a cgroup v1 blkio
#     limit (skipped with a message where that is not writable); a write burst that fits the
#     cache (its rate is that of the whole burst), then the cache's dirty data draining,
#     against qsd on the same throttled disk;
#   full cache: random writes over the whole image into a small cache (FULL_CACHE_MIB) for
#     3 x RUNTIME, so the cache is full and writeback sets the pace (the rate is the second
#     half's), against qsd writing the image directly; FULL_ROUNDS rounds, the median counts.
#
# Output (OUT, default $WORKDIR/vup-bench-<time>): one JSON per measurement, run.json (the
# sizes and bounds of the run), results.json (one row per case, for benches/plot.py and
# benches/targets.py), results.md (the table and the targets met or not). Then:
#   python3 benches/plot.py OUT            (PNG plots next to results.json)
#
# Usage: benches/compare.sh            (from the repository root)
# Environment:
#   RUNTIME=10          seconds of each read case, of a QD1 write case, and 3x: the full case
#   MAX_RUNTIME=30      time cap of a volume-bound case (QD32 and 128k writes, read misses)
#   IMAGE_MIB=4096      size of the backing image in MiB (a copy of it goes to SHM as well)
#   CACHE_MIB=4096      cache size of our cache targets (FILE_CACHE_MIB for ours-msync, the
#                       file beside the image; SHM_CACHE_MIB for ours-pmem-shm on SHM)
#   FIT_PERCENT=60      what a write case may write, in percent of the smaller cache's data
#                       capacity (below gc_percent 70, so GC does not start during a case)
#   REGION_MIB=1024     region the write and read-hit cases use (at most the fit volume)
#   FULL_CACHE_MIB=512  cache size in the full-cache case (small, so it fills quickly)
#   FULL_ROUNDS=3       rounds of the full-cache case (the disk's rate swings from minute to
#                       minute): each target's median round is its result
#   WORKDIR=/var/tmp    where the image and the cache files beside it go (local disk)
#   SHM=/dev/shm        memory-speed directory (qsd-tmpfs, our pmem-path cache)
#   SHM_HUGE=1          as root and with SHM left at its default, mount a private tmpfs with
#                       huge=within_size for them instead, so their files are mapped with 2 MiB
#                       pages as DAX persistent memory is (/dev/shm is mounted without huge
#                       pages on most systems); 0 keeps /dev/shm
#   CPU_DAEMON=1 CPU_CLIENT=0   CPUs to pin to (empty: no pinning)
#   THROTTLE_IOPS=1000  slow-backing write limit; SLOW=0 skips that scenario, FULL=0 the other
#   SLOW_CACHE_MIB=1024 cache size in the slow-backing scenario (on SHM; the burst fits it,
#                       and draining it onto the throttled disk takes about 2 minutes)
#   DRAIN_MAX=300       longest wait, in seconds, for the slow-backing cache to drain
#   ONLY=regex          run only the targets whose name matches; CASES="..." overrides the matrix
#   SKIP_BUILD=1        reuse the existing release builds
set -euo pipefail

RUNTIME=${RUNTIME:-10}
MAX_RUNTIME=${MAX_RUNTIME:-30}
IMAGE_MIB=${IMAGE_MIB:-4096}
CACHE_MIB=${CACHE_MIB:-4096}
FILE_CACHE_MIB=${FILE_CACHE_MIB:-$CACHE_MIB}
SHM_CACHE_MIB=${SHM_CACHE_MIB:-$CACHE_MIB}
FIT_PERCENT=${FIT_PERCENT:-60}
REGION_MIB=${REGION_MIB:-1024}
FULL_CACHE_MIB=${FULL_CACHE_MIB:-512}
FULL_ROUNDS=${FULL_ROUNDS:-3}
WORKDIR=${WORKDIR:-/var/tmp}
SHM_SET=${SHM:-}
SHM=${SHM:-/dev/shm}
ONLY=${ONLY:-.}
OURS=${OURS:-target/release/vhost-user-pcache}
CPU_DAEMON=${CPU_DAEMON-1}
CPU_CLIENT=${CPU_CLIENT-0}
THROTTLE_IOPS=${THROTTLE_IOPS:-1000}
SLOW_CACHE_MIB=${SLOW_CACHE_MIB:-1024}
DRAIN_MAX=${DRAIN_MAX:-300}
OUT=${OUT:-$WORKDIR/vup-bench-$(date -u +%Y%m%dT%H%M%SZ)}
# Our daemons serve 2 queues (the 2-queue cases need them); each queue holds a segment as its
# data head.
DAEMON_QUEUES=2

log() { echo "compare: $*" >&2; }

# data_bytes cache_mib: bytes of a cache of that size that can hold cached data. The layout
# (docs/on-media-format.md): a 64 KiB header, then whole 16 MiB segments, each with 16 KiB of
# segment metadata; one segment per queue is its data head and four keep the log moving
# (docs/operations.md, "Sizing the cache"). The keys of the data take a little more, which the
# FIT_PERCENT margin covers.
data_bytes() {
  local segments=$(((($1 << 20) - 65536) / (16 << 20)))
  echo $(((segments - DAEMON_QUEUES - 4) * ((16 << 20) - 16384)))
}
smaller() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

# What a write case may write: FIT_PERCENT of the smaller matrix cache's data capacity, in
# whole MiB. The read-miss case reads a quarter of the image (misses are copied into the cache,
# so that is capped by the same volume).
FIT_BYTES=$(($(data_bytes "$(smaller "$FILE_CACHE_MIB" "$SHM_CACHE_MIB")") * FIT_PERCENT / 100 >> 20 << 20))
MISS_BYTES=$(smaller $((IMAGE_MIB << 18)) "$FIT_BYTES")
SLOW_FIT_BYTES=$(($(data_bytes "$SLOW_CACHE_MIB") * FIT_PERCENT / 100 >> 20 << 20))

# name|daemon command line. @SOCK@, @IMG@, @SHMIMG@, @DIR@, @SHMDIR@, @BYTES@, @CTL@,
# @FILECACHE@ and @SHMCACHE@ (cache sizes) are substituted. A new target is one more line here.
QSD_EXPORT="--export type=vhost-user-blk,id=e0,node-name=n,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=2"
TARGETS=(
  "qsd-file|qemu-storage-daemon --blockdev driver=file,node-name=n,filename=@IMG@,cache.direct=on,aio=native $QSD_EXPORT"
  "qsd-tmpfs|qemu-storage-daemon --blockdev driver=file,node-name=n,filename=@SHMIMG@,aio=threads $QSD_EXPORT"
  "qsd-null|qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=@BYTES@,read-zeroes=on $QSD_EXPORT"
  "ours-none|$OURS serve --socket @SOCK@ --backing @IMG@ --cache none --queues $DAEMON_QUEUES"
  "ours-msync|$OURS serve --socket @SOCK@ --backing @IMG@ --cache @DIR@/cache.pcache --cache-size @FILECACHE@ --queues $DAEMON_QUEUES --control-socket @CTL@"
  "ours-pmem-shm|env VHOST_USER_PCACHE_EMULATE_PMEM=1 $OURS serve --socket @SOCK@ --backing @IMG@ --cache @SHMDIR@/cache.pcache --cache-size @SHMCACHE@ --persistence pmem --queues $DAEMON_QUEUES --control-socket @CTL@"
)

# label|prepare|loadgen arguments. prepare: "-" nothing, "fill" writes the region first.
# Substituted: @FIT@ (the fit volume, for --io-limit), @MISS@ (the read-miss volume), @RUNTIME@
# and @CAP@ (MAX_RUNTIME). Every case that writes takes --io-limit @FIT@, so it fits the cache
# whatever the target's speed; a QD1 case is time-bound (its latency is the point) and stays
# under the volume at QD1 rates.
R="--size ${REGION_MIB}M"
DEFAULT_CASES="randwrite-qd32-q1|-|--rw randwrite --bs 4k --iodepth 32 --queues 1 $R --io-limit @FIT@ --runtime @CAP@
randwrite-qd32-q2|-|--rw randwrite --bs 4k --iodepth 32 --queues 2 $R --io-limit @FIT@ --runtime @CAP@
randread-hit-qd32-q1|fill|--rw randread --bs 4k --iodepth 32 --queues 1 $R --runtime @RUNTIME@
randread-hit-qd32-q2|fill|--rw randread --bs 4k --iodepth 32 --queues 2 $R --runtime @RUNTIME@
randread-miss-qd32-q1|-|--rw randread --bs 4k --iodepth 32 --queues 1 --io-limit @MISS@ --runtime @CAP@
randwrite-qd1-q1|-|--rw randwrite --bs 4k --iodepth 1 --queues 1 $R --io-limit @FIT@ --runtime @RUNTIME@
randread-hit-qd1-q1|fill|--rw randread --bs 4k --iodepth 1 --queues 1 $R --runtime @RUNTIME@
write-128k-qd8-q1|-|--rw write --bs 128k --iodepth 8 --queues 1 $R --io-limit @FIT@ --runtime @CAP@"
CASES=${CASES:-$DEFAULT_CASES}

if [[ ! -f Cargo.toml ]]; then
  log "run me from the repository root"
  exit 2
fi
# The file system a directory is on: findmnt names ext4 as such, where `stat -f` says
# "ext2/ext3" for every ext file system.
fs_type() { findmnt -no FSTYPE -T "$1" 2>/dev/null || stat -f -c %T "$1"; }

if [[ $(fs_type "$WORKDIR") == tmpfs ]]; then
  log "$WORKDIR is tmpfs; set WORKDIR to a directory on local disk"
  exit 2
fi
for tool in jq taskset; do
  command -v $tool >/dev/null || { log "$tool is needed"; exit 2; }
done
if ((FIT_BYTES <= 0 || SLOW_FIT_BYTES <= 0)); then
  log "the caches are too small to hold a write case (CACHE_MIB $CACHE_MIB, SLOW_CACHE_MIB $SLOW_CACHE_MIB)"
  exit 2
fi
if (((REGION_MIB << 20) > FIT_BYTES)); then
  log "REGION_MIB $REGION_MIB does not fit the cache: at most $((FIT_BYTES >> 20)) MiB ($FIT_PERCENT% of the cache's data capacity)"
  exit 2
fi
if ((REGION_MIB > IMAGE_MIB)); then
  log "IMAGE_MIB $IMAGE_MIB must hold REGION_MIB ($REGION_MIB)"
  exit 2
fi
if [[ ${FULL:-1} == 1 ]] && ((FULL_CACHE_MIB * 2 > IMAGE_MIB)); then
  log "IMAGE_MIB $IMAGE_MIB must be at least twice FULL_CACHE_MIB ($FULL_CACHE_MIB) for the cache to fill"
  exit 2
fi
# The memory-speed targets stand for DAX persistent memory, which maps with 2 MiB pages; a
# tmpfs maps with them only when mounted with huge=. Without them every random 4 KiB access to
# a large cache is a TLB miss that real pmem does not take.
SHM_MOUNT=
SHM_PAGES=4k
if [[ ${SHM_HUGE:-1} == 1 && -z ${SHM_SET:-} && $(id -u) == 0 ]]; then
  SHM_MOUNT=$(mktemp -d "$WORKDIR/vup-shm.XXXXXX")
  if mount -t tmpfs -o "size=$((IMAGE_MIB + (SHM_CACHE_MIB > SLOW_CACHE_MIB ? SHM_CACHE_MIB : SLOW_CACHE_MIB) + 2048))m,huge=within_size" \
    vup-shm "$SHM_MOUNT"; then
    SHM=$SHM_MOUNT
    SHM_PAGES=2M
    trap 'umount "$SHM_MOUNT" && rmdir "$SHM_MOUNT"' EXIT # until cleanup takes over
  else
    log "cannot mount a tmpfs with huge pages; the memory-speed targets use $SHM (4 KiB pages)"
    rmdir "$SHM_MOUNT"
    SHM_MOUNT=
  fi
elif [[ -z ${SHM_SET:-} ]] && findmnt -no OPTIONS --target "$SHM" | grep -qE 'huge=(always|within_size|advise)'; then
  SHM_PAGES=2M
fi
# Memory: SHM (tmpfs) holds the image copy and one cache at a time; the msync cache file is
# populated into the page cache. What they need at once must leave the machine room.
shm_peak=$((IMAGE_MIB + (SHM_CACHE_MIB > SLOW_CACHE_MIB ? SHM_CACHE_MIB : SLOW_CACHE_MIB)))
shm_free=$(($(df -k --output=avail "$SHM" | tail -n 1) >> 10))
mem_free=$(($(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) >> 10))
if ((shm_peak + 1024 > shm_free || shm_peak + FILE_CACHE_MIB + 2048 > mem_free)); then
  log "not enough memory: $SHM needs up to $shm_peak MiB (has $shm_free free) and the msync" \
    "cache $FILE_CACHE_MIB MiB of page cache beside it; $mem_free MiB available." \
    "Lower IMAGE_MIB, CACHE_MIB or SLOW_CACHE_MIB."
  exit 2
fi

mkdir -p "$OUT"
DIR=$(mktemp -d "$WORKDIR/vup-compare.XXXXXX")
SHMDIR=$(mktemp -d "$SHM/vup-compare.XXXXXX")
CGROUP=
DAEMON_PID=
cleanup() {
  stop_daemon
  rm -rf "$DIR" "$SHMDIR"
  if [[ -n $SHM_MOUNT ]]; then umount "$SHM_MOUNT" && rmdir "$SHM_MOUNT"; fi
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
log "write cases stop after $((FIT_BYTES >> 20)) MiB ($FIT_PERCENT% of the data capacity of a" \
  "$(smaller "$FILE_CACHE_MIB" "$SHM_CACHE_MIB") MiB cache) or $MAX_RUNTIME s; read misses after" \
  "$((MISS_BYTES >> 20)) MiB; the slow-backing burst after $((SLOW_FIT_BYTES >> 20)) MiB"

# start_daemon name command [cgroup]: a fresh daemon (and a fresh cache: the cache files are
# removed first), pinned, optionally inside a blkio cgroup. CUR_CACHE_MIB overrides the cache
# sizes (full-cache and slow-backing scenarios).
start_daemon() {
  local name=$1 command=$2 group=${3:-} sock=$DIR/$1.sock started=$SECONDS
  rm -f "$DIR/cache.pcache" "$SHMDIR/cache.pcache" "$sock" "$DIR/ctl.sock"
  command=${command//@SOCK@/$sock}
  command=${command//@IMG@/$IMG}
  command=${command//@SHMIMG@/$SHMIMG}
  command=${command//@SHMDIR@/$SHMDIR}
  command=${command//@DIR@/$DIR}
  command=${command//@BYTES@/$BYTES}
  command=${command//@CTL@/$DIR/ctl.sock}
  command=${command//@FILECACHE@/${CUR_CACHE_MIB:-$FILE_CACHE_MIB}M}
  command=${command//@SHMCACHE@/${CUR_CACHE_MIB:-$SHM_CACHE_MIB}M}
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
  for _ in $(seq 1200); do
    if [[ -S $sock ]]; then
      # A new cache file is allocated and populated at start; its zeroes reach the disk in
      # the background. That is a one-time cost of creating a cache, so it is paid here,
      # before the measurement, not during it.
      [[ -f $DIR/cache.pcache ]] && sync "$DIR/cache.pcache"
      log "$name up in $((SECONDS - started)) s"
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

# Write the region once, every block: sequential writes stopped after the region's size.
fill_region() { # name
  loadgen "$1" "$OUT/$1.fill.json" --rw write --bs 64k --iodepth 8 --queues 1 $R \
    --io-limit "${REGION_MIB}M" --runtime 120 ||
    log "$1: filling the region failed: $(tail -n 2 "$OUT/$1.fill.json.err")"
  if [[ $(jq -r '.passes[0].ended_by' "$OUT/$1.fill.json" 2>/dev/null) != io-limit ]]; then
    log "$1: the region was not written whole before its read-hit case"
  fi
}

# record target case kind json limit: one row of results.json (the main op of the first pass).
# limit: the --io-limit the case ran with, in bytes (0: none).
record() {
  local target=$1 case=$2 kind=$3 json=$4 limit=${5:-0} status=ok
  if ! jq -e '.passes[0]' "$json" >/dev/null 2>&1; then
    status=failed
    echo "{}" >"$json.tmp" && mv "$json.tmp" "$json"
  fi
  jq -c --arg t "$target" --arg c "$case" --arg k "$kind" --arg s "$status" \
    --argjson limit "$limit" '
    (.passes[0] // {}) as $p
    | ($p.ops // {}) as $o
    | (if (($o.read.ios // 0) >= ($o.write.ios // 0)) then $o.read else $o.write end) as $m
    | {target: $t, case: $c, kind: $k, status: $s,
       iops: ((($o.read.iops // 0) + ($o.write.iops // 0))),
       mib_s: ((($o.read.mib_s // 0) + ($o.write.mib_s // 0))),
       bytes: ((($o.read.bytes // 0) + ($o.write.bytes // 0))),
       io_limit: (if $limit > 0 then $limit else null end),
       elapsed_s: ($p.elapsed_s // null), ended_by: ($p.ended_by // null),
       p50_us: ($m.lat_us.p50 // null), p99_us: ($m.lat_us.p99 // null),
       mean_us: ($m.lat_us.mean // null), cdf: ($m.lat_cdf_us // []),
       timeline: ($p.timeline // null), errors: ($p.errors // null)}' "$json" >>"$OUT/results.jsonl"
}

# The --io-limit in a case's (substituted) arguments, in bytes; 0 when it has none.
limit_of() {
  local next=0 word
  for word in $1; do
    if ((next)); then echo "$word"; return; fi
    [[ $word == --io-limit ]] && next=1
  done
  echo 0
}

: >"$OUT/results.jsonl"
declare -a RAN=()

available() { # command
  local binary=${1%% *}
  [[ $binary == env ]] && binary=$(awk '{print $3}' <<<"$1")
  command -v "$binary" >/dev/null
}

command_of() { # target name: its command line
  local entry
  for entry in "${TARGETS[@]}"; do
    if [[ ${entry%%|*} == "$1" ]]; then echo "${entry#*|}"; return; fi
  done
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
    arguments=${arguments//@FIT@/$FIT_BYTES}
    arguments=${arguments//@MISS@/$MISS_BYTES}
    arguments=${arguments//@RUNTIME@/$RUNTIME}
    arguments=${arguments//@CAP@/$MAX_RUNTIME}
    if [[ $arguments =~ --rw\ (write|randwrite|randrw) && $arguments != *--io-limit* ]]; then
      log "warning: case $label writes without --io-limit and may overrun the cache"
    fi
    limit=$(limit_of "$arguments")
    out=$OUT/$name.$label.json
    start_daemon "$name" "$command" || { echo '{}' >"$out"; record "$name" "$label" matrix "$out" "$limit"; continue; }
    [[ $prepare == fill ]] && fill_region "$name"
    log "$name $label"
    # shellcheck disable=SC2086 # arguments are split on purpose
    loadgen "$name" "$out" $arguments ||
      log "$name $label failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
    record "$name" "$label" matrix "$out" "$limit"
    stop_daemon
  done <<<"$CASES"
done

# Full cache: random writes over the whole image into a FULL_CACHE_MIB cache for 3x the
# runtime, so the cache fills and writeback sets the pace; the steady rate is the second half's.
# FULL_ROUNDS rounds, the targets taking turns within each, so a slow spell of the disk hits
# every target; results.json keeps each target's median round (see the end).
if [[ ${FULL:-1} == 1 ]]; then
  for round in $(seq "$FULL_ROUNDS"); do
    for name in qsd-file ours-msync ours-pmem-shm; do
      [[ $name =~ $ONLY ]] || continue
      command=$(command_of "$name")
      available "$command" || continue
      out=$OUT/$name.full-cache.$round.json
      CUR_CACHE_MIB=$FULL_CACHE_MIB start_daemon "$name" "$command" || continue
      log "$name full-cache steady state, round $round of $FULL_ROUNDS"
      loadgen "$name" "$out" --rw randwrite --bs 4k --iodepth 32 --queues 1 --runtime $((RUNTIME * 3)) ||
        log "$name full-cache failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
      record "$name" randwrite-full-cache-qd32-q1 full "$out"
      stop_daemon
    done
  done
fi

# Slow backing: the image's disk limited to THROTTLE_IOPS writes per second for the daemon's
# cgroup. A burst of random writes that fits the cache (SLOW_FIT_BYTES, or 2x the runtime for
# a target that cannot take them that fast), then the drain.
if [[ ${SLOW:-1} == 1 ]]; then
  BLKIO=/sys/fs/cgroup/blkio
  devno=$(stat -c '%Hd:%Ld' "$IMG" 2>/dev/null || true)
  if [[ -d $BLKIO && -w $BLKIO && -n $devno ]] && mkdir -p "$BLKIO/vup-bench" 2>/dev/null &&
    echo "$devno $THROTTLE_IOPS" >"$BLKIO/vup-bench/blkio.throttle.write_iops_device" 2>/dev/null; then
    CGROUP=$BLKIO/vup-bench
    log "slow backing: $devno limited to $THROTTLE_IOPS write IOPS in $CGROUP"
    for name in qsd-file ours-pmem-shm; do
      [[ $name =~ $ONLY ]] || continue
      command=$(command_of "$name")
      available "$command" || continue
      out=$OUT/$name.slow-backing.json
      CUR_CACHE_MIB=$SLOW_CACHE_MIB start_daemon "$name" "$command" "$CGROUP" || continue
      log "$name slow-backing burst"
      loadgen "$name" "$out" --rw randwrite --bs 4k --iodepth 32 --queues 1 --size 64M \
        --io-limit "$SLOW_FIT_BYTES" --runtime $((RUNTIME * 2)) ||
        log "$name slow-backing failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
      record "$name" randwrite-slow-backing-qd32-q1 slow "$out" "$SLOW_FIT_BYTES"
      if [[ $name == ours-* ]]; then
        # The drain: dirty bytes every half second until none are left (at most DRAIN_MAX s).
        : >"$OUT/$name.drain.tsv"
        drain_start=$EPOCHREALTIME
        for _ in $(seq 0 $((DRAIN_MAX * 2))); do
          dirty=$("$OURS" ctl --control-socket "$DIR/ctl.sock" --json status 2>/dev/null |
            jq -r '.. | objects | select(has("dirty_bytes")) | .dirty_bytes' | head -n 1)
          printf '%s\t%s\n' "$(awk -v a="$drain_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')" \
            "${dirty:-}" >>"$OUT/$name.drain.tsv"
          [[ ${dirty:-1} == 0 ]] && break
          sleep 0.5
        done
        [[ ${dirty:-1} == 0 ]] || log "$name: $dirty dirty bytes left after $DRAIN_MAX s of drain"
      fi
      stop_daemon
    done
  else
    log "slow backing skipped: cannot set a blkio throttle ($BLKIO not writable or cgroup v1 blkio missing)"
  fi
fi

# One row per target and case: of a full-cache case's rounds the one with the median steady
# rate (the second half's, as the table and benches/targets.py take it), with every round's
# rate in `rounds`.
jq -s '
  def rate: if .kind == "full" and .timeline != null
    then (.timeline.step_s as $step | .timeline.ios | .[(length / 2 | floor):-1] | (add / length) / $step)
    else .iops end;
  (map(select(.kind == "full")) | group_by(.target)
    | map(sort_by(rate) as $r | $r[($r | length - 1) / 2 | floor] + {rounds: ($r | map(rate | floor))})
    | INDEX(.target)) as $median
  | reduce .[] as $row ({seen: {}, out: []};
      if $row.kind != "full" then .out += [$row]
      elif .seen[$row.target] then .
      else .seen[$row.target] = true | .out += [$median[$row.target]] end)
  | .out' "$OUT/results.jsonl" >"$OUT/results.json"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
jq -n --arg machine "$(nproc) CPUs, $cpu, kernel $(uname -r)" \
  --arg fs "$(fs_type "$WORKDIR")" --arg date "$(date -u +%Y-%m-%dT%H:%MZ)" \
  --argjson runtime "$RUNTIME" --argjson max_runtime "$MAX_RUNTIME" \
  --argjson image_mib "$IMAGE_MIB" --argjson region_mib "$REGION_MIB" \
  --argjson file_cache_mib "$FILE_CACHE_MIB" --argjson shm_cache_mib "$SHM_CACHE_MIB" \
  --argjson full_cache_mib "$FULL_CACHE_MIB" --argjson slow_cache_mib "$SLOW_CACHE_MIB" \
  --argjson fit_percent "$FIT_PERCENT" --argjson fit_bytes "$FIT_BYTES" \
  --argjson miss_bytes "$MISS_BYTES" --argjson slow_fit_bytes "$SLOW_FIT_BYTES" \
  --argjson throttle_iops "$THROTTLE_IOPS" --arg shm_pages "$SHM_PAGES" \
  --arg cpu_daemon "${CPU_DAEMON:-any}" --arg cpu_client "${CPU_CLIENT:-any}" \
  '$ARGS.named' >"$OUT/run.json"

{
  echo "Machine: $(nproc) CPUs, $cpu, kernel $(uname -r); daemon on CPU ${CPU_DAEMON:-any}," \
    "client on CPU ${CPU_CLIENT:-any}; $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "Image: ${IMAGE_MIB} MiB on $(fs_type "$WORKDIR") (qsd-tmpfs: a copy on $SHM)." \
    "Caches: ours-msync ${FILE_CACHE_MIB} MiB, a file beside the image; ours-pmem-shm" \
    "${SHM_CACHE_MIB} MiB on $SHM ($SHM_PAGES pages); full-cache case ${FULL_CACHE_MIB} MiB; slow-backing" \
    "${SLOW_CACHE_MIB} MiB on $SHM."
  echo "Write cases stop after $((FIT_BYTES >> 20)) MiB (${FIT_PERCENT}% of the cache's data" \
    "capacity; the same for every target) or $MAX_RUNTIME s (QD1: $RUNTIME s); read hits run" \
    "$RUNTIME s over a ${REGION_MIB} MiB region written first; read misses stop after" \
    "$((MISS_BYTES >> 20)) MiB or $MAX_RUNTIME s. *ended*: the bound that stopped the case."
  echo
  echo "| case | target | IOPS | MiB/s | p50 µs | p99 µs | s | ended | vs qsd-file | vs qsd-null |"
  echo "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"
  jq -r '
    map(. + {rate: (
      if .kind == "full" and .timeline != null
      then (.timeline.step_s as $step | .timeline.ios | .[(length / 2 | floor):-1] | (add / length) / $step)
      else .iops end)})
    | (map({key: (.target + "/" + .case), value: .rate}) | from_entries) as $by
    | .[]
    | ($by["qsd-file/" + .case] // 0) as $f
    | ($by["qsd-null/" + .case] // 0) as $n
    | .rate as $iops
    | "| \(.case) | \(.target) | " +
      (if .status != "ok" then "failed | | | | | | | |" else
       "\($iops | floor) | \(.mib_s * $iops / ([.iops, 1e-9] | max) * 10 | floor / 10) | " +
       "\(.p50_us // 0 | . * 10 | floor / 10) | " +
       "\(.p99_us // 0 | . * 10 | floor / 10) | \(.elapsed_s // 0 | . * 100 | floor / 100) | " +
       "\(.ended_by // "") | " +
       (if $f > 0 then "\($iops / $f * 100 | floor / 100)" else "" end) + " | " +
       (if $n > 0 then "\($iops / $n * 100 | floor / 100)" else "" end) + " |" end)' \
    "$OUT/results.json"
  echo
  echo "Full-cache rows give the second half's rate (steady state; MiB/s likewise), the median of" \
    "$FULL_ROUNDS rounds taken in turns ($(jq -r 'map(select(.kind == "full") |
      "\(.target) \(.rounds // [] | map(tostring) | join(", "))") | join("; ")' "$OUT/results.json"))." \
    "Slow-backing rows: the" \
    "image's disk limited to $THROTTLE_IOPS write IOPS; the rate of the whole burst" \
    "($((SLOW_FIT_BYTES >> 20)) MiB into a ${SLOW_CACHE_MIB} MiB cache, or $((RUNTIME * 2)) s)."
  if command -v python3 >/dev/null; then
    echo
    python3 benches/targets.py "$OUT" || log "benches/targets.py failed"
  fi
} | tee "$OUT/results.md"
log "results in $OUT (plots: python3 benches/plot.py $OUT)"
