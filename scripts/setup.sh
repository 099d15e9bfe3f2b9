#!/usr/bin/env bash
# Installs what bt86's build and tests need on a Debian/Ubuntu host. Safe to run again: it only
# installs what is missing, and says what it does.
#
#   - Rust (cargo): must already be there (https://rustup.rs); nothing else is fetched for it.
#   - qemu-system-i386 (Debian package qemu-system-x86): the reference emulator that tests
#     compare bt86 against.
#   - a TrueType font (Debian package fonts-dejavu-core): the labels of `bt86 bench --plot x.png`.
#   - e2fsprogs (e2fsck, debugfs, mke2fs), genisoimage and qemu-img (Debian package qemu-utils):
#     the disk tests check and build guest images with them.
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
    say "cargo is not installed: install Rust (https://rustup.rs), then run this again"
    exit 1
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else return 1
    fi
}

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get here: install $* with your package manager"
        return 1
    fi
    say "installing $* (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v qemu-system-i386 >/dev/null 2>&1; then
    apt_install qemu-system-x86 ||
        say "could not install qemu-system-x86: tests that compare with QEMU will be skipped"
fi

if [ ! -d /usr/share/fonts/truetype/dejavu ]; then
    apt_install fonts-dejavu-core ||
        say "could not install fonts-dejavu-core: PNG charts from bt86 bench will have no labels"
fi

for tool in e2fsck:e2fsprogs debugfs:e2fsprogs genisoimage:genisoimage qemu-img:qemu-utils; do
    if ! command -v "${tool%%:*}" >/dev/null 2>&1 && [ ! -x "/sbin/${tool%%:*}" ]; then
        apt_install "${tool##*:}" ||
            say "could not install ${tool##*:}: the disk tests that need ${tool%%:*} will be skipped"
    fi
done

if [ -e /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    say "/dev/kvm is usable: the kvm engine and its tests will run"
else
    say "/dev/kvm is not usable here: the kvm engine's tests will be skipped"
fi
