#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Installs what the QEMU guest tests need on Debian 12: a VMM, the cloud
# kernel the guest boots, and the guest's userland (busybox, fio, ndctl,
# mkfs.ext4); and the tools the packaging test runs (systemd-analyze, man).
# Idempotent: when every package is already installed it returns without
# touching the network.
set -euo pipefail

packages=(
    qemu-system-x86          # qemu-system-x86_64
    qemu-system-common       # qemu-storage-daemon, a reference backend
    qemu-utils               # qemu-img, for inspecting images by hand
    fio
    busybox-static
    linux-image-cloud-amd64  # the guest kernel (virtio as modules)
    kmod                     # modprobe --show-depends gives the module load order
    cpio
    gzip
    xz-utils                 # modules may ship as .ko.xz
    zstd                     # ... or as .ko.zst
    coreutils                # timeout
    gcc                      # the linker cargo drives
    libc6-dev
    ndctl                    # the DAX guest test makes its namespaces with it
    e2fsprogs                # ... and ext4 (mkfs.ext4) on them and on its disk
    binutils                 # ... and strips the binaries it copies in (objcopy)
    systemd                  # systemd-analyze verify checks the packaged unit
    man-db                   # ... and the man page its Documentation= names
)

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all packages present"
    exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"
