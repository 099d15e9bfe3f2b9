#!/usr/bin/env bash
# Fetches the Linux guest bt86 boots: Debian bookworm's i386 kernel (the non-PAE "686" flavour)
# and a busybox initramfs whose /init brings up a shell on the serial console.
#
# Everything goes into a cache directory (default .bt86-cache/guest in the repository, or
# $BT86_GUEST_DIR); a second run with the files present does nothing. Prints the directory.
#
#   vmlinuz         the bzImage
#   initramfs.gz    cpio newc, gzip: /init, /bin/busybox (static), mount points, and the kernel
#                   modules for disks (IDE/ATAPI, SCSI disk and CD-ROM, virtio-blk, ext2/ext4,
#                   ISO 9660) under /lib/modules/VERSION with a modules.dep, so `modprobe` works
#   VERSION         the kernel package that was fetched
#   LAYOUT          the initramfs layout's version: a cache from an older version is rebuilt
#
# The initramfs's /init mounts /proc, /sys and /dev, then runs /bt86/run.sh if an archive
# appended to the initramfs provides one (tests script the guest this way: Linux unpacks
# concatenated cpio archives in order), else starts a shell on the console.
#
# Downloads (on first use only) with apt from Debian's archive: adds the i386 architecture to
# dpkg, runs apt-get update, then apt-get download linux-image-*-686 and busybox-static:i386.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'fetch-guest: %s\n' "$*" >&2; }

dir=${BT86_GUEST_DIR:-$PWD/.bt86-cache/guest}
# Bump when the initramfs's contents change, so that caches are rebuilt.
layout=2
if [ -s "$dir/vmlinuz" ] && [ -s "$dir/initramfs.gz" ] && [ -s "$dir/VERSION" ] &&
    [ "$(cat "$dir/LAYOUT" 2>/dev/null)" = "$layout" ]; then
    echo "$dir"
    exit 0
fi

# Modules the guest loads for its disks (the kernel builds these drivers as modules).
guest_disk_modules="ata_piix sd_mod sr_mod ext4 crc32c_generic isofs virtio_pci virtio_blk"

# module_file KERNEL_ROOT NAME: the module's path relative to /lib/modules/VERSION ('-' and '_'
# are the same in module names).
module_file() {
    local moddir=$1/lib/modules/$2 f
    f=$(cd "$moddir" && find kernel -name "$3.ko" -o -name "$(echo "$3" | tr _ -).ko" | head -n1)
    [ -n "$f" ] || { say "module $3 is not in the kernel package"; return 1; }
    echo "$f"
}

# module_deps KERNEL_ROOT VERSION NAME: the modules NAME needs, from its .modinfo "depends=".
module_deps() {
    local f
    f=$(module_file "$1" "$2" "$3") || return 1
    grep -a -o 'depends=[^[:cntrl:]]*' "$1/lib/modules/$2/$f" | head -n1 |
        sed 's/^depends=//' | tr , '\n' | sed '/^$/d'
}

# add_modules KERNEL_ROOT INITRAMFS_ROOT NAME...: copies the named modules and everything they
# depend on into INITRAMFS_ROOT/lib/modules/VERSION and writes a modules.dep for them (each
# line lists a module's dependencies transitively, those to load last first, as depmod does).
add_modules() {
    local kroot=$1 root=$2 version order="" seen=" " m
    shift 2
    version=$(ls "$kroot/lib/modules")
    visit() { # depth first: dependencies before the module
        case "$seen" in *" $1 "*) return 0 ;; esac
        seen="$seen$1 "
        local d
        for d in $(module_deps "$kroot" "$version" "$1"); do visit "$d" || return 1; done
        order="$order $1"
    }
    for m in "$@"; do visit "$m"; done
    local dst=$root/lib/modules/$version f
    mkdir -p "$dst"
    : >"$dst/modules.dep"
    for m in $order; do
        f=$(module_file "$kroot" "$version" "$m")
        mkdir -p "$dst/$(dirname "$f")"
        cp "$kroot/lib/modules/$version/$f" "$dst/$f"
        # This module's transitive dependencies, in load order, then reversed for modules.dep.
        local deps="" mseen=" "
        closure() {
            local d
            for d in $(module_deps "$kroot" "$version" "$1"); do
                case "$mseen" in *" $d "*) continue ;; esac
                mseen="$mseen$d "
                closure "$d"
                deps="$deps $(module_file "$kroot" "$version" "$d")"
            done
        }
        closure "$m"
        printf '%s:%s\n' "$f" "$(for d in $deps; do echo "$d"; done | tac | sed 's/^/ /' | tr -d '\n')" >>"$dst/modules.dep"
    done
    cp "$kroot/lib/modules/$version/modules.builtin" "$dst/" 2>/dev/null || true
    say "modules in the initramfs:$order"
}

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
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,root,etc,mnt}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
add_modules "$work/kernel" "$root" $guest_disk_modules
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# bt86 guest init: busybox applets, the kernel filesystems, then a shell on the console.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin HOME=/root PS1='bt86# '
cd /root
# A workload appended to the initramfs as a second archive (tests) replaces the shell.
if [ -f /bt86/run.sh ]; then
    echo "bt86-guest: init done, running /bt86/run.sh"
    exec sh /bt86/run.sh
fi
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
echo "$layout" >"$dir/LAYOUT"
say "done: $dir/vmlinuz ($kernel_pkg), $dir/initramfs.gz"
echo "$dir"
