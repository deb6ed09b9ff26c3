#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boots the test guest in QEMU against a vhost-user-blk backend listening on
# a unix socket, and exits 0 only if the guest reported
# "VMTEST-RESULT: PASS".
#
#   run-guest.sh --socket SOCK [--mode write|verify-only] [--guest DIR]
#                [--log FILE] [--timeout SECS] [--queues N] [--reconnect]
#                [--job NAME] [--write-through] [--passes N]
#
#   --mode      write: write the region with checksummed blocks and verify
#               them (default); verify-only: only read back and check what
#               an earlier "write" boot left on the disk.
#   --guest     directory made by build-guest.sh (default vmm-tests/work/guest)
#   --log       guest serial console log (default GUEST/console.log)
#   --timeout   hard limit for the whole boot in seconds (default 300)
#   --queues    virtio-blk queues to request, and to expect in the guest (2)
#   --reconnect QEMU reconnects to the socket when the backend goes away
#               (chardev reconnect=1), so the backend can be restarted
#   --job       fio job file of the guest to run (default disk-verify)
#   --write-through  the guest turns the disk's write cache off before fio
#   --passes    run the job as N passes over disjoint regions, each checked
#               again after every later pass (the restart test; see the
#               guest's /init)
#
# Environment: VMM_ACCEL=tcg (default) or kvm. TCG works everywhere; KVM is
# much faster where (nested) virtualisation works. VMM_CPU overrides the CPU
# model (default qemu64 under TCG, host under KVM). VMTEST_TIMEOUT sets the
# default for --timeout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
socket=""
mode=write
guest=$here/work/guest
log=""
timeout_secs=${VMTEST_TIMEOUT:-300}
queues=2
reconnect=""
job=disk-verify
wce=""
passes=""

usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --socket) socket=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        --guest) guest=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --timeout) timeout_secs=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --reconnect) reconnect=",reconnect=1"; shift ;;
        --job) job=$2; shift 2 ;;
        --write-through) wce=" vmtest.wce=write-through"; shift ;;
        --passes) passes=" vmtest.passes=$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run-guest: unknown argument $1" >&2; usage ;;
    esac
done
[[ -n "$socket" ]] || { echo "run-guest: --socket is required" >&2; usage; }
case "$mode" in write|verify-only) ;; *) echo "run-guest: bad --mode $mode" >&2; exit 2 ;; esac
[[ -S "$socket" ]] || { echo "run-guest: $socket is not a listening socket" >&2; exit 1; }
for f in vmlinuz initramfs.cpio.gz; do
    [[ -f "$guest/$f" ]] || { echo "run-guest: $guest/$f missing; run vmm-tests/build-guest.sh" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null || {
    echo "run-guest: qemu-system-x86_64 not found; run vmm-tests/install-deps.sh" >&2
    exit 1
}
log=${log:-$guest/console.log}

accel=${VMM_ACCEL:-tcg}
case "$accel" in
    tcg) cpu=${VMM_CPU:-qemu64} ;;
    kvm) cpu=${VMM_CPU:-host} ;;
    *) echo "run-guest: VMM_ACCEL must be tcg or kvm, not $accel" >&2; exit 2 ;;
esac

# no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can fail
# ("IO-APIC + timer doesn't work") and panic the boot.
# The guest's RAM must be shared memory: the backend maps it to reach the
# virtqueues and the I/O buffers.
mem=512M
# The guest's virtio-blk driver uses at most one queue per vCPU.
cpus=$(( queues > 2 ? queues : 2 ))
: >"$log"
start=$(date +%s)
set +e
timeout --kill-after=10 "$timeout_secs" \
    qemu-system-x86_64 \
    -machine q35 -accel "$accel" -cpu "$cpu" -smp "$cpus" -m "$mem" \
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa node,memdev=mem \
    -nodefaults -display none -monitor none -serial "file:$log" -no-reboot \
    -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 no_timer_check vmtest.mode=$mode vmtest.queues=$queues vmtest.job=$job$wce$passes" \
    -chardev "socket,id=c0,path=$socket$reconnect" \
    -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues"
qemu_rc=$?
set -e
elapsed=$(( $(date +%s) - start ))

result=$(tr -d '\r' <"$log" | grep -a -o 'VMTEST-RESULT: .*' | tail -n1 || true)
if [[ "$result" == "VMTEST-RESULT: PASS"* ]]; then
    echo "run-guest: $mode passed in ${elapsed}s ($accel)"
    exit 0
fi
if [[ $qemu_rc -eq 124 || $qemu_rc -eq 137 ]]; then
    echo "run-guest: $mode timed out after ${timeout_secs}s ($accel)" >&2
else
    echo "run-guest: $mode failed after ${elapsed}s, qemu exit $qemu_rc, result: ${result:-none}" >&2
fi
echo "---- last 40 lines of $log ----" >&2
tr -d '\r' <"$log" | tail -n 40 >&2
exit 1
