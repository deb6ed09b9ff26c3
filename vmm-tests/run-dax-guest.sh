#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boots the DAX test guest: two emulated NVDIMMs (QEMU nvdimm devices backed
# by files), one virtio disk, and the guest image of build-guest.sh with an
# overlay holding the daemon and the load generator. The guest runs
# /dax-init (see vmm-tests/guest/dax-init for what each phase does).
#
#   run-dax-guest.sh --state DIR --phase write|replay --daemon BIN
#                    --loadgen BIN [--guest DIR] [--log FILE] [--timeout SECS]
#
#   --state     directory holding the guest's persistent state: the NVDIMMs'
#               backing files (nvdimm0.img, nvdimm1.img) and the virtio disk
#               (disk.img), created by the write phase; the replay phase
#               boots from what the write phase left there
#   --phase     write: ends with a power cut: when the guest prints
#               VMTEST-READY-FOR-POWER-CUT, QEMU is killed with SIGKILL (the
#               files keep what reached them). replay: boots again and must
#               end with VMTEST-RESULT: PASS
#   --daemon    the vhost-user-pcache binary to run in the guest
#   --loadgen   the load generator binary (cargo build --release --bench loadgen)
#   --guest     directory made by build-guest.sh (default vmm-tests/work/guest)
#   --log       guest serial console log (default STATE/console-PHASE.log)
#   --timeout   hard limit for the boot in seconds (default 600)
#
# Environment: VMM_ACCEL=tcg (default) or kvm; VMM_CPU overrides the CPU
# model (default max: under TCG it emulates CLWB and CLFLUSHOPT, so the
# daemon's preferred cache-line write-back runs). VMTEST_TIMEOUT sets the
# default for --timeout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=""
phase=""
daemon=""
loadgen=""
guest=$here/work/guest
log=""
timeout_secs=${VMTEST_TIMEOUT:-600}

# Each NVDIMM: a namespace with 2 MiB alignment and its memmap on the device
# leaves room for a cache of 15 segments of 16 MiB (devdax) or an ext4 file
# system holding a 128 MiB cache (fsdax).
nvdimm_size=256M
disk_size=512M
mem=512M

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state) state=$2; shift 2 ;;
        --phase) phase=$2; shift 2 ;;
        --daemon) daemon=$2; shift 2 ;;
        --loadgen) loadgen=$2; shift 2 ;;
        --guest) guest=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --timeout) timeout_secs=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run-dax-guest: unknown argument $1" >&2; usage ;;
    esac
done
[[ -n "$state" && -n "$phase" && -n "$daemon" && -n "$loadgen" ]] ||
    { echo "run-dax-guest: --state, --phase, --daemon and --loadgen are required" >&2; usage; }
case "$phase" in write|replay) ;; *) echo "run-dax-guest: bad --phase $phase" >&2; exit 2 ;; esac
for f in "$daemon" "$loadgen"; do
    [[ -x "$f" ]] || { echo "run-dax-guest: $f is not an executable" >&2; exit 1; }
done
for f in vmlinuz initramfs.cpio.gz; do
    [[ -f "$guest/$f" ]] || { echo "run-dax-guest: $guest/$f missing; run vmm-tests/build-guest.sh" >&2; exit 1; }
done
for tool in qemu-system-x86_64 objcopy cpio gzip ldd; do
    command -v "$tool" >/dev/null || {
        echo "run-dax-guest: $tool not found; run vmm-tests/install-deps.sh" >&2
        exit 1
    }
done
mkdir -p "$state"
state=$(cd "$state" && pwd)
log=${log:-$state/console-$phase.log}

if [[ "$phase" == write ]]; then
    rm -f "$state"/nvdimm0.img "$state"/nvdimm1.img "$state"/disk.img
    truncate -s "$nvdimm_size" "$state/nvdimm0.img" "$state/nvdimm1.img"
    truncate -s "$disk_size" "$state/disk.img"
else
    for f in nvdimm0.img nvdimm1.img disk.img; do
        [[ -f "$state/$f" ]] || { echo "run-dax-guest: $state/$f missing; run --phase write first" >&2; exit 1; }
    done
fi

# The overlay: both binaries without debug info, and the libraries they link,
# appended to the guest's initramfs (the kernel unpacks concatenated archives
# in order).
root=$(mktemp -d "$state/overlay.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/opt/pcache/bin" "$root/etc"
objcopy --strip-debug "$daemon" "$root/opt/pcache/bin/vhost-user-pcache"
objcopy --strip-debug "$loadgen" "$root/opt/pcache/bin/loadgen"
libdirs=()
while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    dir=$(dirname "$lib")
    [[ " ${libdirs[*]-} " == *" $dir "* ]] || libdirs+=("$dir")
done < <(ldd "$daemon" "$loadgen" |
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $1 !~ /:$/ {print $1}' | sort -u)
(IFS=:; echo "${libdirs[*]}") >"$root/etc/vmtest-dax-libdirs"
initrd=$state/initrd.cpio.gz
cp "$guest/initramfs.cpio.gz" "$initrd.tmp"
(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -1 >>"$initrd.tmp"
mv "$initrd.tmp" "$initrd"

accel=${VMM_ACCEL:-tcg}
case "$accel" in
    tcg) cpu=${VMM_CPU:-max} ;;
    kvm) cpu=${VMM_CPU:-host} ;;
    *) echo "run-dax-guest: VMM_ACCEL must be tcg or kvm, not $accel" >&2; exit 2 ;;
esac

: >"$log"
start=$(date +%s)
qemu-system-x86_64 \
    -machine q35,nvdimm=on,nvdimm-persistence=mem-ctrl -accel "$accel" -cpu "$cpu" -smp 2 \
    -m "$mem,slots=2,maxmem=2G" \
    -object "memory-backend-file,id=nv0,share=on,mem-path=$state/nvdimm0.img,size=$nvdimm_size" \
    -device nvdimm,id=nvdimm0,memdev=nv0 \
    -object "memory-backend-file,id=nv1,share=on,mem-path=$state/nvdimm1.img,size=$nvdimm_size" \
    -device nvdimm,id=nvdimm1,memdev=nv1 \
    -drive "file=$state/disk.img,if=none,id=disk,format=raw,cache=writeback" \
    -device virtio-blk-pci,drive=disk \
    -nodefaults -display none -monitor none -serial "file:$log" -no-reboot \
    -kernel "$guest/vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/dax-init vmtest.phase=$phase" &
qemu=$!

console() { tr -d '\r' <"$log"; }
outcome=""
while :; do
    if ! kill -0 "$qemu" 2>/dev/null; then
        outcome=exited
        break
    fi
    if [[ "$phase" == write ]] && console | grep -q '^VMTEST-READY-FOR-POWER-CUT'; then
        # The power cut: no shutdown, no sync; what the guest wrote to the
        # NVDIMMs is in the backing files' page cache, the rest is gone.
        kill -KILL "$qemu"
        outcome=power-cut
        break
    fi
    if console | grep -q '^VMTEST-RESULT: '; then
        outcome=result
        # The guest powers itself off after reporting.
        sleep 1
        continue
    fi
    if (( $(date +%s) - start > timeout_secs )); then
        kill -KILL "$qemu"
        outcome=timeout
        break
    fi
    sleep 0.5
done
wait "$qemu" 2>/dev/null || true
elapsed=$(( $(date +%s) - start ))

result=$(console | grep -a -o 'VMTEST-RESULT: .*' | tail -n1 || true)
if [[ "$phase" == write && "$outcome" == power-cut && -z "$result" ]]; then
    echo "run-dax-guest: write phase reached the power cut after ${elapsed}s ($accel)"
    exit 0
fi
if [[ "$phase" == replay && "$result" == "VMTEST-RESULT: PASS"* ]]; then
    echo "run-dax-guest: replay phase passed in ${elapsed}s ($accel)"
    exit 0
fi
echo "run-dax-guest: $phase phase failed after ${elapsed}s ($outcome), result: ${result:-none}" >&2
echo "---- last 60 lines of $log ----" >&2
console | tail -n 60 >&2
exit 1
