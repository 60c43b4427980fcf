#!/bin/sh
# Builds the smallest bootable x86_64 guest the QEMU launcher tests use, without internet:
# Debian's kernel (fetched with `apt-get download` from the machine's own apt sources) and a
# busybox initramfs whose /init
#   - loads the virtio-net and power-button modules,
#   - gives the cluster NIC (MAC 52:54:xx:xx:00:II) the address 192.168.76.(10+II) and the
#     management NIC (52:54:xx:xx:01:II) slirp's 10.0.2.15,
#   - serves "rackseed-test-guest mac=<cluster MAC>" over HTTP on the management port (7443),
#   - prints `RACKSEED-GUEST up mac=<mac> ip=<ip>` to the serial console, then pings every
#     address in the kernel argument `rackseed.peers=a,b,...` (its own skipped) and prints
#     `RACKSEED-GUEST reached <ip>` or `RACKSEED-GUEST unreachable <ip>`,
#   - pings the all-hosts multicast group 224.0.0.1 for two minutes and prints
#     `RACKSEED-GUEST multicast-from <ip>` for each peer that answers,
#   - powers off when the ACPI power button is pressed (QMP system_powerdown).
#
# Usage: scripts/qemu-test-guest.sh OUTDIR   -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
# Needs: apt-get (lists updated), dpkg-deb, cpio, gzip, busybox-static installed (/bin/busybox).
set -eu

out=${1:?usage: qemu-test-guest.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

busybox=/bin/busybox
if [ ! -x "$busybox" ]; then
    echo "qemu-test-guest: $busybox missing; install busybox-static" >&2
    exit 1
fi
if ldd "$busybox" >/dev/null 2>&1; then
    echo "qemu-test-guest: $busybox is dynamically linked; install busybox-static" >&2
    exit 1
fi

# The versioned kernel package the metapackage points at, e.g. linux-image-6.1.0-56-amd64.
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
    echo "qemu-test-guest: apt-cache knows no kernel behind linux-image-amd64 (run apt-get update)" >&2
    exit 1
fi
(cd "$work" && apt-get download "$kpkg" >/dev/null 2>"$work/apt.err") || {
    cat "$work/apt.err" >&2
    echo "qemu-test-guest: apt-get download $kpkg failed" >&2
    exit 1
}
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
kver=$(ls "$work/k/lib/modules")
moddir="$work/k/lib/modules/$kver/kernel"

root="$work/initramfs"
mkdir -p "$root/bin" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" "$root/www" "$root/lib/modules"
cp "$busybox" "$root/bin/busybox"

# Load order matters: dependencies first (no modules.dep in the package; depmod runs at install).
: >"$root/modules.order"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
    failover net_failover virtio_net virtio_blk evdev button; do
    f=$(find "$moddir" -name "$m.ko*" | head -1)
    if [ -z "$f" ]; then
        echo "qemu-test-guest: module $m not found in $kpkg" >&2
        exit 1
    fi
    case "$f" in
    *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dcq "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$root/modules.order"
done

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "RACKSEED-GUEST insmod $m failed"; done
sleep 1

cl=""; mg=""
for i in /sys/class/net/*; do
    n=${i##*/}
    mac=$(cat "$i/address")
    case "$mac" in
    52:54:??:??:00:??) cl=$n; clmac=$mac ;;
    52:54:??:??:01:??) mg=$n ;;
    esac
done
if [ -z "$cl" ]; then
    echo "RACKSEED-GUEST error no cluster nic"
    ls /sys/class/net
    poweroff -f
fi
idx=$(( 0x${clmac##*:} ))
ip="192.168.76.$((10 + idx))"
ip link set lo up
ip addr add "$ip/24" dev "$cl"
ip link set "$cl" up
# Answer multicast pings (the kernel ignores them by default) and send multicast on the cluster NIC.
echo 0 >/proc/sys/net/ipv4/icmp_echo_ignore_broadcasts
ip route add 224.0.0.0/4 dev "$cl"
if [ -n "$mg" ]; then
    ip addr add 10.0.2.15/24 dev "$mg"
    ip link set "$mg" up
fi
echo "rackseed-test-guest mac=$clmac" >/www/index.html
httpd -p 7443 -h /www

# Power button (ACPI, from QMP system_powerdown) -> power off.
for e in /sys/class/input/event*; do
    if grep -q "Power Button" "$e/device/name" 2>/dev/null; then
        ( dd if="/dev/input/${e##*/}" of=/dev/null bs=24 count=1 2>/dev/null
          echo "RACKSEED-GUEST power button"; poweroff -f ) &
    fi
done

disks=$(ls /sys/block | grep -c '^vd' || true)
echo "RACKSEED-GUEST up mac=$clmac ip=$ip disks=$disks"

# Multicast (what mDNS needs): ping the all-hosts group and report every peer that answers.
(
    mkdir -p /tmp/mc
    for t in $(seq 1 120); do
        for a in $(ping -w 2 224.0.0.1 2>/dev/null | sed -n 's/.*bytes from \([0-9.]*\):.*/\1/p'); do
            if [ "$a" != "$ip" ] && [ ! -e "/tmp/mc/$a" ]; then
                touch "/tmp/mc/$a"
                echo "RACKSEED-GUEST multicast-from $a"
            fi
        done
        sleep 1
    done
) &

peers=$(sed -n 's/.*rackseed\.peers=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
for p in $peers; do
    [ "$p" = "$ip" ] && continue
    ok=""
    for t in $(seq 1 90); do
        if ping -c 1 -W 1 "$p" >/dev/null 2>&1; then ok=1; break; fi
    done
    if [ -n "$ok" ]; then
        echo "RACKSEED-GUEST reached $p"
    else
        echo "RACKSEED-GUEST unreachable $p"
    fi
done
while true; do sleep 3600; done
EOF
chmod 755 "$root/init"

(cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -9) >"$work/initrd.gz"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/initrd.gz" "$out/initrd.gz"
mv "$work/vmlinuz" "$out/vmlinuz"
echo "$kpkg" >"$out/kernel-package"
echo "qemu-test-guest: $out/vmlinuz ($kpkg) and $out/initrd.gz"
