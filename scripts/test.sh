#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: setup, formatting, lints, build, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== guest for the Linux boot test (scripts/fetch-guest.sh; downloads once)" >&2
if guest=$(scripts/fetch-guest.sh); then
    export BT86_GUEST_DIR="$guest"
    # The interpreter boots Linux in minutes only when optimised.
    echo "== cargo build --release -p vmapp (for the Linux boot test)" >&2
    cargo build --release --quiet -p vmapp
    export BT86_LINUX_BIN="$PWD/target/release/bt86"
else
    echo "== no Linux guest: the Debian boot test will be skipped" >&2
fi
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo build" >&2
cargo build --workspace --all-targets --quiet
echo "== cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line with the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "suite: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
