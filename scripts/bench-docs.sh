#!/usr/bin/env bash
# Regenerates the latest full table in docs/performance.md: both bench suites (nano and linux),
# every engine (bt, interp, kvm, qemu-tcg, native), interleaved in one run of a release bt86 on
# this machine. The date, the host's CPU model, kernel and KVM go in with the table; the older
# measurements below it stay as they are.
#
# Takes a while (the interpreter boots Linux in minutes, once per run). Environment:
#   BT86_BENCH_RUNS   samples per workload and engine (default 3)
#   BT86_BENCH_INTERP_RUNS  samples for the interpreter (default 1: it boots Linux in minutes)
#   BT86_BENCH_IDLE_SECONDS how long the linux suite's idle row lets the guest sleep (default 30,
#                     issue 6's "idle at the prompt for 30 s"; every engine run waits this long)
#   BT86_BENCH_OUT    where the JSON, the chart and failure logs go (default target/bench-docs)
# Run it as root for the native column of the linux suite (a chroot); otherwise that column
# says "needs root".
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BT86_BENCH_RUNS:-3}
interp_runs=${BT86_BENCH_INTERP_RUNS:-1}
idle_seconds=${BT86_BENCH_IDLE_SECONDS:-30}
out=${BT86_BENCH_OUT:-target/bench-docs}
scripts/setup.sh
guest=$(scripts/fetch-guest.sh)
echo "== cargo build --release -p vmapp" >&2
cargo build --release --quiet -p vmapp
mkdir -p "$out"
exec target/release/bt86 bench --suite all --engines bt,interp,kvm,qemu-tcg,native \
    --runs "$runs" --runs-of "interp=$interp_runs" --idle-seconds "$idle_seconds" --guest "$guest" --json "$out/bench.json" --plot "$out/bench.svg" \
    --logs "$out/logs" --update-docs docs/performance.md
