#!/usr/bin/env bash
# The main job: build bt86 and boot the bundled demo guest, a multiboot kernel from the test kit
# that prints everything the boot loader handed it (registers, command line, modules, memory map).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --quiet -p vmapp -p bt86-tests
out=target/demo
mkdir -p "$out"
target/release/bt86-kit build entry-dump "$out/demo-kernel"
printf 'GREETING=hello from a multiboot module\n' > "$out/demo-env"
engine=${BT86_ENGINE:-bt}
echo "== booting $out/demo-kernel on bt86 (engine: $engine; set BT86_ENGINE=kvm to compare)" >&2
set +e
target/release/bt86 run --engine "$engine" --memory 128 \
    --kernel "$out/demo-kernel" --append "console=ttyS0 demo=1" \
    --module "$out/demo-env first-arg" --stats "$@"
status=$?
set -e
echo "== bt86 exited with status $status (the demo kernel writes 0x10 to port 0xf4: expected 33)" >&2
[ "$status" -eq 33 ]
