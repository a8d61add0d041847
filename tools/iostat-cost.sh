#!/usr/bin/env bash
# The statistics layer's data-path cost: reactor busy ns per I/O with `--iostat on`
# against `--iostat off`, on the null and RAM (malloc) backends, ROUNDS interleaved rounds
# (ABBA order), median and spread of each and of the difference per round.
#
#   tools/iostat-cost.sh [--json FILE] [ROUNDS=5] [SECONDS=5] [BIN=target/release/sealdisk] [SIZE=256m]
# --json FILE also writes every round's figures and the medians as JSON (for tools/bench-report.sh).
set -euo pipefail
JSON_OUT=
if [ "${1:-}" = --json ]; then JSON_OUT=$2; shift 2; fi
ROUNDS=${1:-5}
SECS=${2:-5}
BIN=${3:-target/release/sealdisk}
SIZE=${4:-256m}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for backend in null malloc; do
  for r in $(seq 1 "$ROUNDS"); do
    if (( r % 2 )); then order="off on"; else order="on off"; fi
    for s in $order; do
      "$BIN" bench io --quiet --cores=1 --output-format=json --backend="$backend" --rw=randread --bs=4k \
        --iodepth=32 --size="$SIZE" --runtime="$SECS" --time_based --iostat="$s" \
        | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["sealdisk"]["reactor_busy_ns_per_io"], j["read"]["iops"])' \
        >> "$OUT/$backend-$s"
    done
  done
done
python3 - "$OUT" "$ROUNDS" "$JSON_OUT" "$SECS" <<'PY'
import json, statistics, sys, os, time
out, rounds, json_out, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds, "seconds": secs, "backends": {}}
for b in ("null", "malloc"):
    rows = {s: [tuple(map(float, l.split())) for l in open(os.path.join(out, f"{b}-{s}"))] for s in ("off", "on")}
    ns = {s: [r[0] for r in rows[s]] for s in rows}
    diff = [a - b_ for a, b_ in zip(ns["on"], ns["off"])]
    for s in ("off", "on"):
        v = ns[s]
        print(f"{b:6} iostat={s:3}: busy ns/IO median {statistics.median(v):7.1f}  (min {min(v):.1f}, max {max(v):.1f})"
              f"  IOPS median {statistics.median(r[1] for r in rows[s]):,.0f}")
    print(f"{b:6} on - off per round: median {statistics.median(diff):+.1f} ns/IO  (min {min(diff):+.1f}, max {max(diff):+.1f}), {rounds} rounds")
    doc["backends"][b] = {"off_ns": ns["off"], "on_ns": ns["on"], "diff_ns": diff,
                          "off_median": statistics.median(ns["off"]), "on_median": statistics.median(ns["on"]),
                          "diff_median": statistics.median(diff)}
if json_out:
    with open(json_out, "w") as f:
        json.dump(doc, f, indent=1)
PY
