#!/usr/bin/env bash
# Issue 3 figures, in one interleaved run on one file:
#   fio io_uring (--direct=1) on the raw file   vs   sealdisk bench io plain
#   sealdisk plain vs encrypted (--compare, ABBA rounds, same file)
# for 4k randread/randwrite QD32 and 128k seq read/write QD8, plus the RAM
# backend cost check (4k randwrite QD32, one reactor).
# Usage: tools/datapath-compare.sh [WORKDIR] [RUNTIME_S] [ROUNDS]
set -euo pipefail
W=${1:-/var/tmp/sealdisk-datapath}
RT=${2:-8}
ROUNDS=${3:-4}
CORE=${CORE:-$(awk '/virtio.*req|nvme.*q/{for(i=2;i<=NF;i++) if($i ~ /^[0-9]+$/ && $i>0){print i-2; exit}}' /proc/interrupts)}
CORE=${CORE:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
S=$ROOT/target/release/sealdisk
mkdir -p "$W"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
IMG=$W/bench.img
if [ ! -s "$IMG" ]; then
    fio --name=fill --filename="$IMG" --size=1g --rw=write --bs=1m --iodepth=8 --ioengine=io_uring \
        --direct=1 --output-format=terse >/dev/null
fi
echo "# core $CORE (the block device's interrupt core), runtime ${RT}s per side, $ROUNDS ABBA rounds"
printf "| workload | fio io_uring IOPS | sealdisk plain IOPS | plain/fio | encrypted IOPS | enc/plain | p99 enc/plain |\n|---|---:|---:|---:|---:|---:|---:|\n"
for wl in "randread 4k 32" "randwrite 4k 32" "read 128k 8" "write 128k 8"; do
    set -- $wl
    rw=$1 bs=$2 qd=$3
    fio_iops=$(taskset -c "$CORE" fio --name=f --filename="$IMG" --size=1g --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --ioengine=io_uring --direct=1 --runtime="$RT" --time_based --output-format=json \
        | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(j['read']['iops']+j['write']['iops'])")
    "$S" bench io --backend "file:$IMG" --size 1g --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime $((RT * 2)) \
        --time_based --cores "$CORE" --quiet --compare --rounds "$ROUNDS" --output-format json > "$W/$rw-$bs.json"
    python3 - "$W/$rw-$bs.json" "$fio_iops" "$rw $bs QD$qd" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); fio = float(sys.argv[2])
p, e = j["jobs"]
d = "read" if p["read"]["iops"] > 0 else "write"
pi, ei = p[d]["iops"], e[d]["iops"]
r = j["sealdisk"]["ratios"][d]
print(f"| {sys.argv[3]} | {fio:,.0f} | {pi:,.0f} | {pi/fio:.3f} | {ei:,.0f} | {ei/pi:.3f} | {r['clat_p99']:.3f} |")
PY
done
echo
echo "# RAM backend, one reactor, 4k randwrite QD32"
"$S" bench io --backend malloc --size 1g --rw randwrite --bs 4k --iodepth 32 --runtime $((RT * 2)) --time_based \
    --cores "$CORE" --quiet --compare --rounds "$ROUNDS" | tail -3
