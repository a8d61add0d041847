#!/usr/bin/env bash
# Profile a sealdisk command with perf (frame-pointer call graphs; software
# cpu-clock event, so it works in VMs without PMU access) and draw a flame graph.
#   tools/profile.sh [OUT.svg] -- <sealdisk args...>
# e.g. tools/profile.sh flame.svg -- bench io --backend malloc --encrypt --rw randwrite \
#          --bs 4k --iodepth 32 --runtime 5 --time_based --cores 0 --quiet
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-flame.svg}
shift || true
[ "${1:-}" = "--" ] && shift
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 2; }
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
DATA=$(mktemp /tmp/sealdisk-perf.XXXXXX)
trap 'rm -f "$DATA"' EXIT
perf record -q -e cpu-clock -F 1999 --call-graph fp -o "$DATA" -- "$ROOT/target/release/sealdisk" "$@"
perf script -i "$DATA" 2>/dev/null | python3 "$ROOT/tools/flamegraph.py" > "$OUT"
perf report -i "$DATA" --no-children --sort sym --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -25
echo "flame graph: $OUT" >&2
