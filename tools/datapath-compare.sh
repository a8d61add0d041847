#!/usr/bin/env bash
# Issue 3 figures, interleaved on one file:
#   fio io_uring (--direct=1) on the raw file   vs   sealdisk bench io plain
#   sealdisk plain vs encrypted (--compare --rounds 4: plain/enc alternating on the same file)
# for 4k randread/randwrite QD32 and 128k seq read/write QD8; each repetition runs
# fio and sealdisk back to back, first one then the other on alternate reps, so
# slow phases of a shared host hit both. enc/plain is given pooled over all runs and
# as the median of the per-round ratios (each round's plain and encrypted runs are
# adjacent in time), averaged over reps. Then the RAM backend cost check (4k
# randwrite QD32, one reactor, twelve alternating rounds).
# Usage: tools/datapath-compare.sh [WORKDIR] [RUNTIME_S] [REPS]
# BUFFERS=refill gives fio and sealdisk --refill_buffers (fresh random data in
# every write, as a guest's writes are) instead of fio's default scrambled
# reuse of the same buffers.
# SEALDISK=BIN uses that binary (default: build target/release/sealdisk); SIZE=1g
# the file's size (and fio's and bench io's --size); RAM=0 skips the RAM check.
set -euo pipefail
W=${1:-/var/tmp/sealdisk-datapath}
RT=${2:-8}
REPS=${3:-3}
CORE=${CORE:-$(awk '/virtio.*req|nvme.*q/{for(i=2;i<=NF;i++) if($i ~ /^[0-9]+$/ && $i>0){print i-2; exit}}' /proc/interrupts)}
CORE=${CORE:-0}
BUF_OPT=()
[ "${BUFFERS:-}" = refill ] && BUF_OPT=(--refill_buffers)
SIZE=${SIZE:-1g}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${SEALDISK:-}" ]; then
    S=$SEALDISK
    [ -x "$S" ] || { echo "SEALDISK=$S: not an executable file" >&2; exit 2; }
else
    S=$ROOT/target/release/sealdisk
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
mkdir -p "$W"
IMG=$W/bench.img
# (Re)fill when missing or smaller than SIZE: reads of never-written blocks skip the device.
if [ "$(stat -c %s "$IMG" 2>/dev/null || echo 0)" -lt "$(numfmt --from=iec "${SIZE^^}")" ]; then
    rm -f "$IMG"
    fio --name=fill --filename="$IMG" --size="$SIZE" --rw=write --bs=1m --iodepth=8 --ioengine=io_uring \
        --direct=1 --output-format=terse >/dev/null
fi
echo "# core $CORE (the block device's interrupt core), ${RT}s per run, $REPS reps (fio, then sealdisk plain/enc in 4 alternating rounds)${BUF_OPT:+, write buffers: ${BUF_OPT[*]}}"
printf "| workload | fio io_uring IOPS | sealdisk plain IOPS | plain/fio | encrypted IOPS | enc/plain | p99 enc/plain | enc/plain round median | p99 round median |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
for wl in "randread 4k 32" "randwrite 4k 32" "read 128k 8" "write 128k 8"; do
    set -- $wl
    rw=$1 bs=$2 qd=$3
    for rep in $(seq 1 "$REPS"); do
        run_fio() {
            taskset -c "$CORE" fio --name=f --filename="$IMG" --size="$SIZE" --rw="$rw" --bs="$bs" --iodepth="$qd" \
                --ioengine=io_uring --direct=1 --runtime="$RT" --time_based --output-format=json "${BUF_OPT[@]}" \
                > "$W/fio-$rw-$bs-$rep.json"
        }
        run_sd() {
            "$S" bench io --backend "file:$IMG" --size "$SIZE" --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime $((RT * 2)) \
                --time_based --cores "$CORE" --quiet --compare --rounds 4 --output-format json "${BUF_OPT[@]}" > "$W/sd-$rw-$bs-$rep.json"
        }
        # Alternate who goes first: this disk runs faster for a few seconds
        # after a pause, which would always favour the first tool.
        if [ $((rep % 2)) = 1 ]; then run_fio; run_sd; else run_sd; run_fio; fi
    done
    python3 - "$W" "$rw" "$bs" "$REPS" "$rw $bs QD$qd" <<'PY'
import json, sys
w, rw, bs, reps, label = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
fio, pl, en, p99p, p99e, rmi, rmp = [], [], [], [], [], [], []
for r in range(1, reps + 1):
    j = json.load(open(f"{w}/fio-{rw}-{bs}-{r}.json"))["jobs"][0]
    fio.append(j["read"]["iops"] + j["write"]["iops"])
    s = json.load(open(f"{w}/sd-{rw}-{bs}-{r}.json"))
    p, e = s["jobs"]
    d = "read" if p["read"]["iops"] > 0 else "write"
    pl.append(p[d]["iops"]); en.append(e[d]["iops"])
    p99p.append(p[d]["clat_ns"]["percentile"]["99.000000"]); p99e.append(e[d]["clat_ns"]["percentile"]["99.000000"])
    rm = s["sealdisk"]["ratios"]["round_median"]
    rmi.append(rm["iops"]); rmp.append(rm["clat_p99"])
m = lambda v: sum(v) / len(v)
print(f"| {label} | {m(fio):,.0f} | {m(pl):,.0f} | {m(pl)/m(fio):.3f} | {m(en):,.0f} | {m(en)/m(pl):.3f} | {m(p99e)/m(p99p):.3f} | {m(rmi):.3f} | {m(rmp):.3f} |")
PY
done
[ "${RAM:-1}" = 0 ] && exit 0
echo
echo "# RAM backend, one reactor, 4k randwrite QD32"
"$S" bench io --backend malloc --size "$SIZE" --rw randwrite --bs 4k --iodepth 32 --runtime $((RT * 4)) --time_based \
    --cores "$CORE" --quiet --compare --rounds 12 | tail -4
