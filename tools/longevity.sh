#!/usr/bin/env bash
# Long runs of tests/longevity.rs in release mode: CONNS NBD connections open at once to one
# daemon on two reactors, all served, and CYCLES connect/read/disconnect cycles on one
# reactor with the daemon's open descriptors and RSS measured before and after.
#
# Usage: tools/longevity.sh [CONNS] [CYCLES]      (defaults 10000 and 1000000)
# The figures are the lines starting "concurrent:" and "churn:".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SEALDISK_LONG_CONNS=${1:-10000}
export SEALDISK_LONG_CYCLES=${2:-1000000}
cargo test --release --manifest-path "$ROOT/Cargo.toml" --test longevity -- --nocapture --test-threads 1 2>&1 |
    tee /dev/stderr | grep -oE '(concurrent|churn): .*'
