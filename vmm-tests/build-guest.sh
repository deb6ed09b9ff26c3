#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds the test guest: the host's Debian cloud kernel plus an initramfs
# holding busybox, fio (with the shared libraries it links), the virtio
# modules and an /init that runs one fio job against /dev/vda.
#
#   build-guest.sh [OUTDIR]     (default: vmm-tests/work/guest)
#
# For the DAX test (tests/vm_dax.rs) the image also holds the NVDIMM and
# device DAX modules (loaded only by /dax-init, listed in
# /etc/vmtest-dax-modules), ndctl and mkfs.ext4 with their libraries, and
# /dax-init, which the kernel runs instead of /init with rdinit=/dax-init.
#
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. Rebuilds only when
# an input changed (this script, the guest files, the kernel, the modules,
# busybox, fio or its libraries). VMTEST_KERNEL=/boot/vmlinuz-... picks a
# kernel other than the newest cloud one.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/work/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "build-guest: '$1' not found; run vmm-tests/install-deps.sh" >&2
        exit 1
    }
}
for tool in busybox fio cpio gzip modprobe ldd; do need "$tool"; done
for tool in ndctl mke2fs; do need "$tool"; done

kernel=${VMTEST_KERNEL:-}
if [[ -z "$kernel" ]]; then
    kernel=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
fi
if [[ -z "$kernel" || ! -r "$kernel" ]]; then
    echo "build-guest: no readable kernel (${kernel:-/boot/vmlinuz-*-cloud-amd64}); run vmm-tests/install-deps.sh" >&2
    exit 1
fi
kver=${kernel#*/vmlinuz-}
if [[ ! -f /lib/modules/$kver/modules.dep ]]; then
    echo "build-guest: no modules for $kver in /lib/modules; run vmm-tests/install-deps.sh" >&2
    exit 1
fi

# The module files to insmod, in load order. modprobe resolves the
# dependencies and already orders them; "builtin" lines are compiled in.
modules=()
for name in virtio_pci virtio_blk; do
    while read -r verb path _; do
        [[ "$verb" == insmod ]] || continue
        seen=0
        for m in "${modules[@]+"${modules[@]}"}"; do [[ "$m" == "$path" ]] && seen=1; done
        [[ $seen -eq 1 ]] || modules+=("$path")
    done < <(modprobe -S "$kver" --show-depends "$name")
done

# The DAX test's modules, kept apart from the list /init loads. `-C /dev/null`
# ignores /etc/modprobe.d: ndctl's package turns libnvdimm into an "install"
# rule there, which --show-depends would print instead of the module.
dax_modules=()
for name in nfit nd_pmem dax_pmem device_dax; do
    while read -r verb path _; do
        [[ "$verb" == insmod ]] || continue
        seen=0
        for m in "${dax_modules[@]+"${dax_modules[@]}"}"; do [[ "$m" == "$path" ]] && seen=1; done
        [[ $seen -eq 1 ]] || dax_modules+=("$path")
    done < <(modprobe -C /dev/null -S "$kver" --show-depends "$name")
done

fio_bin=$(command -v fio)
busybox_bin=$(command -v busybox)
if ldd "$busybox_bin" >/dev/null 2>&1; then
    echo "build-guest: $busybox_bin is dynamically linked; install busybox-static" >&2
    exit 1
fi
# Every library the loader will need, as the paths ldd resolved them to.
ndctl_bin=$(command -v ndctl)
mke2fs_bin=$(command -v mke2fs)
mapfile -t libs < <(ldd "$fio_bin" "$ndctl_bin" "$mke2fs_bin" |
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $1 !~ /:$/ {print $1}' | sort -u)

fingerprint() {
    sha256sum "${BASH_SOURCE[0]}" "$here/guest/init" "$here"/guest/*.fio
    sha256sum "$here/guest/dax-init"
    [[ ! -f /etc/mke2fs.conf ]] || sha256sum /etc/mke2fs.conf
    for f in "$kernel" "${modules[@]}" "$busybox_bin" "$fio_bin" "${libs[@]}" \
        "${dax_modules[@]}" "$ndctl_bin" "$mke2fs_bin"; do
        stat -L -c '%n %s %Y' "$f"
    done
}
stamp=$(fingerprint | sha256sum | cut -d' ' -f1)

exec 9>"$out/.lock"
flock 9
if [[ -f "$out/inputs.sha256" && "$(cat "$out/inputs.sha256")" == "$stamp" &&
      -f "$out/vmlinuz" && -f "$out/initramfs.cpio.gz" ]]; then
    echo "build-guest: $out is up to date (kernel $kver)"
    exit 0
fi

echo "build-guest: building guest for kernel $kver in $out"
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,modules,usr/bin}
cp "$busybox_bin" "$root/bin/busybox"
cp "$here/guest/init" "$root/init"
chmod 755 "$root/init"
cp "$here"/guest/*.fio "$root/etc/"

# Copies module file $1 into /modules, uncompressed, and appends its name to list $2.
add_module() {
    local path=$1 list=$2 base
    base=$(basename "$path")
    case "$base" in
        *.ko.xz)  xz -dc "$path" >"$root/modules/${base%.xz}";   base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$path" >"$root/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz)  gzip -dc "$path" >"$root/modules/${base%.gz}";  base=${base%.gz} ;;
        *.ko)     cp "$path" "$root/modules/$base" ;;
        *) echo "build-guest: unexpected module file $path" >&2; exit 1 ;;
    esac
    echo "$base" >>"$list"
}
: >"$root/etc/vmtest-modules"
for path in "${modules[@]}"; do add_module "$path" "$root/etc/vmtest-modules"; done

# The DAX test's guest side: its own PID 1, modules, ndctl and mkfs.ext4.
cp "$here/guest/dax-init" "$root/dax-init"
chmod 755 "$root/dax-init"
: >"$root/etc/vmtest-dax-modules"
for path in "${dax_modules[@]}"; do add_module "$path" "$root/etc/vmtest-dax-modules"; done
cp "$ndctl_bin" "$root/usr/bin/ndctl"
cp "$mke2fs_bin" "$root/usr/bin/mkfs.ext4"
[[ ! -f /etc/mke2fs.conf ]] || cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"

cp "$fio_bin" "$root/usr/bin/fio"
libdirs=()
for lib in "${libs[@]}"; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    dir=$(dirname "$lib")
    [[ " ${libdirs[*]-} " == *" $dir "* ]] || libdirs+=("$dir")
done
(IFS=:; echo "${libdirs[*]}") >"$root/etc/vmtest-libdirs"

(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) |
    gzip -1 >"$out/initramfs.cpio.gz.tmp"
cp "$kernel" "$out/vmlinuz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" >"$out/inputs.sha256"
echo "build-guest: done ($(du -h "$out/initramfs.cpio.gz" | cut -f1) initramfs, modules: $(tr '\n' ' ' <"$root/etc/vmtest-modules"))"
