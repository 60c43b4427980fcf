#!/bin/sh
# Installs what the qemu crate and its tests need, from the machine's own apt sources:
# QEMU for x86_64 and aarch64, UEFI firmware for both, qemu-img, and what
# scripts/qemu-test-guest.sh uses (busybox-static, cpio).
#
# The build machines come with a qemu-utils newer than the distribution's, which the
# distribution's qemu-system-* packages refuse to sit beside ("Breaks: qemu-system-common").
# When that happens, qemu-utils is taken from the distribution release itself
# (--allow-downgrades), which matches qemu-system-*.
set -eu

pkgs="qemu-system-x86 qemu-system-arm ovmf qemu-efi-aarch64 busybox-static cpio"
export DEBIAN_FRONTEND=noninteractive

if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -1)" ]; then
    apt-get update -q
fi
if apt-get install -y -q --no-install-recommends $pkgs qemu-utils; then
    exit 0
fi
. /etc/os-release
codename=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
echo "qemu-install-deps: retrying with qemu-utils from $codename" >&2
apt-get install -y -q --no-install-recommends --allow-downgrades $pkgs "qemu-utils/$codename"
