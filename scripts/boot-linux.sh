#!/usr/bin/env bash
# The main job: boot Debian's i386 Linux kernel to a busybox shell on bt86's binary translator,
# with the guest's serial console on this terminal.
#
# First use downloads the guest (scripts/fetch-guest.sh: Debian bookworm's 686 kernel and
# busybox, with apt; it says so) and builds bt86 in release mode. Then:
#   - type at the `bt86# ` prompt; Ctrl-A X quits bt86 (Ctrl-A Ctrl-A sends one Ctrl-A);
#   - `poweroff -f` in the guest powers it off through ACPI: bt86 exits with status 0.
# Extra arguments go to `bt86 run` (e.g. --stats); BT86_ENGINE=interp|kvm picks another engine.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
guest=$(scripts/fetch-guest.sh)
echo "== cargo build --release -p vmapp" >&2
cargo build --release --quiet -p vmapp
engine=${BT86_ENGINE:-bt}
echo "== booting $(cat "$guest/VERSION") with a busybox initramfs on bt86 (engine: $engine)" >&2
echo "== Ctrl-A X quits; 'poweroff -f' in the guest ends the run" >&2
exec "${CARGO_TARGET_DIR:-target}/release/bt86" run --engine "$engine" --memory 256 \
    --kernel "$guest/vmlinuz" --initrd "$guest/initramfs.gz" --append "console=ttyS0" "$@"
