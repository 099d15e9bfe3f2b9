#!/usr/bin/env bash
# Fetches the Linux guest bt86 boots: Debian bookworm's i386 kernel (the non-PAE "686" flavour)
# and a busybox initramfs whose /init brings up a shell on the serial console.
#
# Everything goes into a cache directory (default .bt86-cache/guest in the repository, or
# $BT86_GUEST_DIR); a second run with the files present does nothing. Prints the directory.
#
#   vmlinuz         the bzImage
#   initramfs.gz    cpio newc, gzip: /init, /bin/busybox (static) and mount points
#   VERSION         the kernel package that was fetched
#
# Downloads (on first use only) with apt from Debian's archive: adds the i386 architecture to
# dpkg, runs apt-get update, then apt-get download linux-image-*-686 and busybox-static:i386.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'fetch-guest: %s\n' "$*" >&2; }

dir=${BT86_GUEST_DIR:-$PWD/.bt86-cache/guest}
if [ -s "$dir/vmlinuz" ] && [ -s "$dir/initramfs.gz" ] && [ -s "$dir/VERSION" ]; then
    echo "$dir"
    exit 0
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else
        say "need root (or sudo) for: $*"
        return 1
    fi
}

for tool in apt-get apt-cache dpkg dpkg-deb gzip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        say "$tool is missing: this script needs a Debian/Ubuntu host with apt"
        exit 1
    fi
done

say "downloading the Linux guest (Debian bookworm i386 kernel and busybox) into $dir, once"
export DEBIAN_FRONTEND=noninteractive
if ! command -v cpio >/dev/null 2>&1; then
    say "installing cpio (apt-get)"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends cpio >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx i386; then
    say "adding the i386 architecture to dpkg"
    as_root dpkg --add-architecture i386
fi
# A mirror in mid-sync can fail one index; what matters is that the packages resolve below.
as_root apt-get update -qq || say "apt-get update reported errors; trying with the indexes it got"

# linux-image-686 is the metapackage; it depends on the current linux-image-<abi>-686.
kernel_pkg=$(apt-cache depends linux-image-686:i386 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ :]*-686\)\(:i386\)\?$/\1/p' | head -n1)
if [ -z "$kernel_pkg" ]; then
    say "cannot resolve linux-image-686:i386 to a kernel package (is the i386 archive reachable?)"
    exit 1
fi
say "kernel package: $kernel_pkg"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt-get download drops privileges to _apt and must be able to write here
(cd "$work" && apt-get download -q "$kernel_pkg:i386" busybox-static:i386 >/dev/null)
mkdir -p "$work/kernel" "$work/busybox"
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,root,etc}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# bt86 guest init: busybox applets, the kernel filesystems, then a shell on the console.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin HOME=/root PS1='bt86# '
cd /root
echo "bt86-guest: init done, starting the shell"
# setsid + cttyhack: the shell owns the console as its controlling terminal (job control, ^C).
exec setsid cttyhack sh
EOF
chmod 755 "$root/init" "$root/bin/busybox"

mkdir -p "$dir"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$dir/initramfs.gz.tmp"
cp "$work"/kernel/boot/vmlinuz-* "$dir/vmlinuz.tmp"
mv "$dir/initramfs.gz.tmp" "$dir/initramfs.gz"
mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
echo "$kernel_pkg" >"$dir/VERSION"
say "done: $dir/vmlinuz ($kernel_pkg), $dir/initramfs.gz"
echo "$dir"
