#!/usr/bin/env bash
# Migration throughput, side by side in one run (issue 21), on a raw image that is half
# holes and half random data (alternating 4 MiB of /dev/urandom-like data and 4 MiB holes):
#
#   sd          sealdisk migrate IMAGE            (into a new encrypted disk; --verify off)
#   sd-verify   sealdisk migrate IMAGE --verify
#   luks        qemu-img convert -n IMAGE into a qemu-nbd LUKS export (aes-256-xts-plain64),
#               the peer an operator would use today
#   luks-tz     the same with --target-is-zero (holes not written: the fairest peer)
#   raw         qemu-img convert raw -> raw on the same file system (the ceiling; writes go
#               to the page cache and are not made durable: its time depends on write-back)
#   raw-direct  the same with -t none (O_DIRECT target: durable like sealdisk's writes)
#
# Rounds are interleaved (one of each per round, order reversed every other round); the
# medians of wall time are printed, with MiB/s of the image's size. Every sealdisk disk is
# deleted after its round; the LUKS image is reused (convert -n overwrites it).
#
# Usage: tools/migrate-bench.sh [-s GIB] [-r ROUNDS] [-w WORKDIR] [-b SEALDISK_BINARY] [-c CORES] [-j JSON]
#   defaults: 4 GiB, 3 rounds, /var/tmp/sealdisk-migrate-bench, target/release/sealdisk, 0,1
#   -j FILE also writes every target's runs (seconds) as JSON (for tools/bench-report.sh)
set -euo pipefail

GIB=4
ROUNDS=3
W=/var/tmp/sealdisk-migrate-bench
BIN=target/release/sealdisk
CORES=0,1
JSON_OUT=
while getopts "s:r:w:b:c:j:" o; do
    case $o in
        s) GIB=$OPTARG ;;
        r) ROUNDS=$OPTARG ;;
        w) W=$OPTARG ;;
        b) BIN=$OPTARG ;;
        c) CORES=$OPTARG ;;
        j) JSON_OUT=$OPTARG ;;
        *) sed -n '2,21p' "$0"; exit 2 ;;
    esac
done
BIN=$(realpath "$BIN")
[ -z "$JSON_OUT" ] || JSON_OUT=$(realpath -m "$JSON_OUT")
for t in qemu-img qemu-nbd python3; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "no sealdisk binary at $BIN (cargo build --release)" >&2; exit 1; }

DAEMON=
QNBD=
cleanup() {
    [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    [ -n "$QNBD" ] && kill "$QNBD" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$W"
mkdir -p "$W/imp"
IMG=$W/imp/src.raw
echo "making a $GIB GiB image, half holes half random data: $IMG" >&2
python3 - "$IMG" "$GIB" <<'EOF'
import os, sys
path, gib = sys.argv[1], int(sys.argv[2])
size, chunk = gib << 30, 4 << 20
with open(path, "wb") as f:
    f.truncate(size)
    for off in range(0, size, 2 * chunk):
        f.seek(off)
        f.write(os.urandom(chunk))
    f.flush()
    os.fsync(f.fileno())
EOF

# sealdisk
export SEALDISK_ACCOUNT=bench SEALDISK_REGION=bench
DATA=$W/data
"$BIN" serve --data-dir "$DATA" --import-dir "$W/imp" --pool-size $((GIB * 2 + 1))G --no-qos \
    --cores "$CORES" 2>"$W/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$DATA/sealdisk.sock" ] && break; sleep 0.1; done
"$BIN" activate-kms --data-dir "$DATA" >/dev/null

# qemu-nbd over a LUKS image
printf 'migrate-bench-passphrase' >"$W/pass"
chmod 600 "$W/pass"
qemu-img create -q -f luks --object "secret,id=sec0,file=$W/pass,format=raw" \
    -o key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256 \
    "$W/luks.img" "${GIB}G"
qemu-nbd --persistent --shared=4 -k "$W/luks.sock" --cache=none --aio=io_uring \
    --object "secret,id=sec0,file=$W/pass,format=raw" \
    --image-opts "driver=luks,key-secret=sec0,file.driver=file,file.filename=$W/luks.img" 2>"$W/qemu-nbd.log" &
QNBD=$!
for _ in $(seq 100); do [ -S "$W/luks.sock" ] && break; sleep 0.1; done
LUKS_URI="nbd+unix:///?socket=$W/luks.sock"

now() { date +%s.%N; }
declare -A T
run_one() {
    local t=$1 s e
    case $t in
        sd | sd-verify)
            local v=()
            [ "$t" = sd-verify ] && v=(--verify)
            s=$(now)
            "$BIN" migrate --data-dir "$DATA" src.raw "${v[@]}" --json >"$W/out.json"
            e=$(now)
            local d
            d=$(python3 -c "import json;print(json.load(open('$W/out.json'))['DiskId'])")
            "$BIN" delete-disk --data-dir "$DATA" "DiskId=$d" >/dev/null
            ;;
        luks)
            s=$(now)
            qemu-img convert -n -f raw -O raw "$IMG" "$LUKS_URI"
            e=$(now)
            ;;
        luks-tz)
            s=$(now)
            qemu-img convert -n --target-is-zero -f raw -O raw "$IMG" "$LUKS_URI"
            e=$(now)
            ;;
        raw | raw-direct)
            local c=()
            [ "$t" = raw-direct ] && c=(-t none)
            rm -f "$W/dst.raw"
            s=$(now)
            qemu-img convert "${c[@]}" -f raw -O raw "$IMG" "$W/dst.raw"
            e=$(now)
            rm -f "$W/dst.raw"
            ;;
    esac
    T[$t]="${T[$t]:-} $(python3 -c "print(f'{$e - $s:.3f}')")"
    echo "  $t: $(python3 -c "print(f'{$e - $s:.3f}')") s" >&2
}

TARGETS=(sd sd-verify luks luks-tz raw raw-direct)
for r in $(seq "$ROUNDS"); do
    echo "round $r" >&2
    order=("${TARGETS[@]}")
    if [ $((r % 2)) -eq 0 ]; then
        order=()
        for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[$i]}"); done
    fi
    for t in "${order[@]}"; do run_one "$t"; done
done

echo
echo "$GIB GiB image, half holes half random; medians of $ROUNDS rounds (wall seconds, image MiB/s)"
echo
echo "| target | median s | MiB/s | runs (s) |"
echo "|---|---|---|---|"
for t in "${TARGETS[@]}"; do
    python3 - "$t" "$GIB" ${T[$t]} <<'EOF'
import statistics, sys
t, gib, xs = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3:]]
m = statistics.median(xs)
print(f"| {t} | {m:.2f} | {gib * 1024 / m:.0f} | {' '.join(f'{x:.2f}' for x in xs)} |")
EOF
done
python3 - ${T[sd]} / ${T[luks]} / ${T[luks-tz]} / ${T[raw]} / ${T[sd-verify]} / ${T[raw-direct]} <<'EOF'
import statistics, sys
groups, cur = [], []
for a in sys.argv[1:]:
    if a == "/":
        groups.append(cur); cur = []
    else:
        cur.append(float(a))
groups.append(cur)
sd, luks, tz, raw, ver, direct = (statistics.median(g) for g in groups)
print()
print(f"sealdisk vs LUKS convert -n: {luks / sd:.2f}x (target >= 2x); vs --target-is-zero: {tz / sd:.2f}x")
print(f"sealdisk vs raw ceiling: {raw / sd:.2f}x, vs raw -t none: {direct / sd:.2f}x (target >= 0.8x)")
print(f"--verify costs {ver / sd:.2f}x the time")
EOF
if [ -n "$JSON_OUT" ]; then
    python3 - "$JSON_OUT" "$GIB" "$ROUNDS" "sd=${T[sd]}" "sd-verify=${T[sd-verify]}" "luks=${T[luks]}" \
        "luks-tz=${T[luks-tz]}" "raw=${T[raw]}" "raw-direct=${T[raw-direct]}" <<'EOF'
import json, sys, time
out, gib, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runs = {k: [float(x) for x in v.split()] for k, v in (a.split("=", 1) for a in sys.argv[4:])}
with open(out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "gib": gib, "rounds": rounds, "runs": runs}, f, indent=1)
EOF
fi
