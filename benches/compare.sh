#!/usr/bin/env bash
# Compares vhost-user-blk backends in one run on one machine: the same loadgen binary, the same
# freshly written backing image on local disk, the same workload matrix against each daemon.
# Prints a Markdown table with absolute numbers and each target's ratio to qsd-file.
#
# Usage: benches/compare.sh            (from the repository root)
# Environment:
#   RUNTIME=10          seconds per workload
#   IMAGE_MIB=1024      size of the backing image in MiB
#   WORKDIR=/var/tmp    where the temporary directory goes (local disk, not tmpfs)
#   ONLY=regex          run only the targets whose name matches
#   CASES="..."         override the workload matrix (see DEFAULT_CASES)
#   SKIP_BUILD=1        reuse the existing release builds
#   KEEP=1              keep the temporary directory (raw JSON and daemon logs)
set -euo pipefail

RUNTIME=${RUNTIME:-10}
IMAGE_MIB=${IMAGE_MIB:-1024}
WORKDIR=${WORKDIR:-/var/tmp}
ONLY=${ONLY:-.}
OURS=${OURS:-target/release/vhost-user-pcache}

# name|daemon command line. @SOCK@, @IMG@, @DIR@ and @BYTES@ are substituted.
# A new cache mode is one more line here.
TARGETS=(
  "qsd-file|qemu-storage-daemon --blockdev driver=file,node-name=f,filename=@IMG@,cache.direct=on,aio=io_uring --export type=vhost-user-blk,id=e0,node-name=f,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=2"
  "qsd-null|qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=@BYTES@ --export type=vhost-user-blk,id=e0,node-name=n,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=2"
  "ours-none|$OURS serve --socket @SOCK@ --backing @IMG@ --cache none"
  "ours-cache-msync|$OURS serve --socket @SOCK@ --backing @IMG@ --cache @DIR@/msync.pcache --cache-size 512M --persistence msync"
  "ours-cache-pmem-emul|env VHOST_USER_PCACHE_EMULATE_PMEM=1 $OURS serve --socket @SOCK@ --backing @IMG@ --cache @DIR@/pmem.pcache --cache-size 512M --persistence pmem"
)
BASELINE=qsd-file

# label|loadgen arguments
DEFAULT_CASES="4k-randread-qd1-q1|--rw randread --bs 4k --iodepth 1 --queues 1
4k-randwrite-qd1-q1|--rw randwrite --bs 4k --iodepth 1 --queues 1
4k-randwrite-qd32-q1|--rw randwrite --bs 4k --iodepth 32 --queues 1
4k-randwrite-qd32-q2|--rw randwrite --bs 4k --iodepth 32 --queues 2
128k-write-qd8-q1|--rw write --bs 128k --iodepth 8 --queues 1
128k-write-qd8-q2|--rw write --bs 128k --iodepth 8 --queues 2
128k-read-qd8-q1|--rw read --bs 128k --iodepth 8 --queues 1
128k-read-qd8-q2|--rw read --bs 128k --iodepth 8 --queues 2"
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

DIR=$(mktemp -d "$WORKDIR/vup-compare.XXXXXX")
DAEMON_PID=
cleanup() {
  if [[ -n $DAEMON_PID ]]; then
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  if [[ ${KEEP:-0} == 1 ]]; then
    log "kept $DIR"
  else
    rm -rf "$DIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building (release)"
  cargo build --release --bin vhost-user-pcache >&2 || log "daemon build failed; its rows will be skipped"
  cargo bench --bench loadgen --no-run >&2
fi
LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "loadgen") | .executable' | tail -n 1)
if [[ -z $LOADGEN || ! -x $LOADGEN ]]; then
  log "no loadgen binary found"
  exit 2
fi

IMG=$DIR/backing.img
BYTES=$((IMAGE_MIB * 1024 * 1024))
log "writing a fresh ${IMAGE_MIB} MiB backing image in $DIR"
# Written for real (not sparse) so reads hit allocated blocks for every target.
dd if=/dev/zero of="$IMG" bs=1M count="$IMAGE_MIB" oflag=direct conv=fsync status=none

start_daemon() { # name command
  local name=$1 command=$2 sock=$DIR/$1.sock
  command=${command//@SOCK@/$sock}
  command=${command//@IMG@/$IMG}
  command=${command//@DIR@/$DIR}
  command=${command//@BYTES@/$BYTES}
  rm -f "$sock"
  log "starting $name: $command"
  # shellcheck disable=SC2086 # the command line is split on purpose
  $command >"$DIR/$name.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 100); do
    [[ -S $sock ]] && return 0
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.1
  done
  log "$name did not come up; its log:"
  tail -n 20 "$DIR/$name.log" >&2 || true
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

# One line per measurement: target case iops mib_s mean_us p99_us status
RESULTS=$DIR/results.tsv
: >"$RESULTS"
declare -a RAN=()

for entry in "${TARGETS[@]}"; do
  name=${entry%%|*}
  command=${entry#*|}
  [[ $name =~ $ONLY ]] || continue
  binary=${command%% *}
  if ! command -v "$binary" >/dev/null ||
    { [[ $binary == "$OURS" ]] && ! "$OURS" --help 2>&1 | grep -qw serve; }; then
    log "skipping $name: $binary (with a serve subcommand) is not available"
    continue
  fi
  start_daemon "$name" "$command" || continue
  RAN+=("$name")
  while IFS='|' read -r label arguments; do
    [[ -n $label ]] || continue
    out=$DIR/$name.$label.json
    log "$name $label"
    # shellcheck disable=SC2086 # arguments are split on purpose
    if "$LOADGEN" --socket "$DIR/$name.sock" $arguments --runtime "$RUNTIME" --json >"$out" 2>"$out.err"; then
      status=ok
    else
      status=failed
      log "$name $label failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
    fi
    if jq -e . "$out" >/dev/null 2>&1; then
      jq -r --arg t "$name" --arg c "$label" --arg s "$status" '
        .passes[0].ops as $o
        | (if ($o.read.ios >= $o.write.ios) then $o.read else $o.write end) as $main
        | [$t, $c, ($o.read.iops + $o.write.iops), ($o.read.mib_s + $o.write.mib_s),
           $main.lat_us.mean, $main.lat_us.p99, $s] | @tsv' "$out" >>"$RESULTS"
    else
      printf '%s\t%s\t\t\t\t\t%s\n' "$name" "$label" "$status" >>"$RESULTS"
    fi
  done <<<"$CASES"
  stop_daemon
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "Machine: $(nproc) CPUs, $cpu, kernel $(uname -r); runtime ${RUNTIME} s per case;" \
  "image ${IMAGE_MIB} MiB on $(stat -f -c %T "$DIR"); $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "| workload | target | IOPS | MiB/s | mean µs | p99 µs | IOPS vs $BASELINE |"
echo "|---|---|---:|---:|---:|---:|---:|"
while IFS='|' read -r label _; do
  [[ -n $label ]] || continue
  base=$(awk -F'\t' -v t="$BASELINE" -v c="$label" '$1 == t && $2 == c && $7 == "ok" { print $3 }' "$RESULTS")
  for name in "${RAN[@]}"; do
    awk -F'\t' -v t="$name" -v c="$label" -v base="$base" '
      $1 == t && $2 == c {
        if ($7 != "ok") { printf "| %s | %s | failed | | | | |\n", c, t; next }
        ratio = (base > 0) ? sprintf("%.2f", $3 / base) : "n/a"
        printf "| %s | %s | %.0f | %.1f | %.1f | %.1f | %s |\n", c, t, $3, $4, $5, $6, ratio
      }' "$RESULTS"
  done
done <<<"$CASES"
