#!/usr/bin/env bash
# SIGKILL crash harness, long run: the test in tests/crash_kill.rs (pipelined writes with
# FLUSH/FUA/TRIM at QD32 into an encrypted disk of a real `sealdisk serve`, control-plane
# operations on a second thread, kill -9 at a random moment, restart, read everything back)
# for CYCLES cycles, built in release mode.
#
# Usage: tools/crash-harness.sh [CYCLES] [SEED]
#   CYCLES  kill/restart cycles (default 100)
#   SEED    replay a run's random choices (default: random, printed; timing is not replayed)
# The per-cycle figures go to stderr; the last line is the summary:
#   crash harness: N cycles, A writes acknowledged, D durable checked, lost 0, seed S
# Exit status: the test's (0 = nothing lost, every interrupted operation whole or undone).
# A failure keeps the data directory and the daemon logs (their paths are printed).
# Also honoured (see tests/crash_kill.rs): SEALDISK_CRASH_KILL=uniform|snapshot|burst,
# SEALDISK_CRASH_FAULTS=<SEALDISK_FAULTS spec>|none.
set -uo pipefail
CYCLES=${1:-100}
SEED=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SEALDISK_CRASH_CYCLES=$CYCLES
if [ -n "$SEED" ]; then
    export SEALDISK_CRASH_SEED=$SEED
else
    unset SEALDISK_CRASH_SEED
fi
OUT=$(mktemp "${TMPDIR:-/tmp}/sealdisk-crash-harness.XXXXXX")
trap 'rm -f "$OUT"' EXIT
cargo test --release --manifest-path "$ROOT/Cargo.toml" --test crash_kill -- --nocapture 2>&1 | tee "$OUT"
status=${PIPESTATUS[0]}
echo
if summary=$(grep -E '^crash harness: [0-9]+ cycles, [0-9]+ writes acknowledged' "$OUT" | tail -n 1) &&
    [ -n "$summary" ]; then
    echo "$summary"
else
    grep '^crash harness: FAILED' "$OUT" | tail -n 1 || echo "crash harness: no summary (status $status)"
fi
exit "$status"
