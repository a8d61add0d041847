#!/bin/sh
# A/B of two sealdisk binaries' `bench crypto`: N alternations of one round
# each (old, new, old, new, ...); prints per-config medians and ranges and the
# 512/4096 ratio of the medians for each binary.
# usage: tools/xts-ab.sh OLD NEW N [bench crypto options, e.g. --buffer 4096]
set -eu
old=$1; new=$2; n=$3; shift 3; extra="$*"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
i=0
while [ $i -lt $n ]; do
  "$old" bench crypto --rounds 1 --no-openssl --json $extra > $out/old.$i.json
  "$new" bench crypto --rounds 1 --no-openssl --json $extra > $out/new.$i.json
  i=$((i+1))
done
python3 - "$out" "$n" <<'PY'
import json, sys, statistics as st
d, n = sys.argv[1], int(sys.argv[2])
for who in ("old", "new"):
    runs = [json.load(open(f"{d}/{who}.{i}.json")) for i in range(n)]
    figs = {}; cpu = {}
    for r in runs:
        for k in r["results"]:
            figs.setdefault((k["kernel"], k["direction"], k["sector_size"]), []).append(k["gb_per_s"])
            cpu.setdefault((k["kernel"], k["direction"], k["sector_size"]), []).append(k.get("cpu_median_gb_per_s", 0))
    print(f"== {who} ({n} runs of one round, interleaved with the other binary)")
    for (kern, dr, ss), v in sorted(figs.items()):
        if kern != "vaes-avx2": continue
        c = cpu[(kern, dr, ss)]
        print(f"  {kern} {dr:15} {ss:5}  median {st.median(v):6.2f}  range {min(v):.2f}..{max(v):.2f}   cpu median {st.median(c):6.2f}  range {min(c):.2f}..{max(c):.2f}")
    for (kern, dr, ss), v in sorted(figs.items()):
        if kern != "vaes-avx2" or ss != 512: continue
        w = figs[(kern, dr, 4096)]
        per = [a / b for a, b in zip(v, w)]
        c, cw = cpu[(kern, dr, 512)], cpu[(kern, dr, 4096)]
        line = f"  512/4096 {dr:15} wall {st.median(v)/st.median(w):.3f}  (per run {min(per):.3f}..{max(per):.3f})"
        if min(cw) > 0:  # binaries before the CPU-time figure report none
            cper = [a / b for a, b in zip(c, cw)]
            line += f"   cpu {st.median(c)/st.median(cw):.3f}  (per run {min(cper):.3f}..{max(cper):.3f})"
        print(line)
PY
