#!/usr/bin/env bash
# Regenerates the tables of docs/benchmarks.md: runs each area's documented benchmark
# (the per-area scripts in tools/ and `sealdisk bench`) and prints the area's markdown
# table(s) in the doc's layout on stdout, then the "targets: met / not met" table of the
# areas that ran. Progress and the scripts' own output go to stderr and WORKDIR/*.log.
#
# Usage: tools/bench-report.sh [--quick] [--bin SEALDISK] [--workdir DIR] [AREA...]
#   AREA      crypto cpu file nbd vhost volume iostat migrate rbd (default: all, in that order)
#   --quick   a smoke test: one short round per area on small disks (seconds each); its
#             figures say nothing about performance
#   --bin     the sealdisk binary (default: $SEALDISK, else target/release/sealdisk, built
#             with cargo if missing)
#   --workdir scratch space on the disk to measure (default /var/tmp/sealdisk-bench-report)
# Needs fio, qemu-utils (qemu-img, qemu-nbd, qemu-storage-daemon) and python3 for the
# areas that compare with them; openssl for the crypto baseline; for rbd, Ceph (ceph-mon,
# ceph-mgr, ceph-osd, ceph-common) and QEMU's rbd block module (qemu-block-extra).
# Placement: CORE (default 1) is the reactor core of the `bench io` areas (cpu, volume).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ALL=(crypto cpu file nbd vhost volume iostat migrate rbd)
QUICK=0
BIN=${SEALDISK:-}
W=/var/tmp/sealdisk-bench-report
AREAS=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
        --workdir) W=${2:?--workdir needs a directory}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "bench-report: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) AREAS+=("$1"); shift ;;
    esac
done
[ ${#AREAS[@]} -gt 0 ] || AREAS=("${ALL[@]}")
for a in "${AREAS[@]}"; do
    [[ " ${ALL[*]} " == *" $a "* ]] || { echo "bench-report: unknown area '$a' (areas: ${ALL[*]})" >&2; exit 2; }
done
if [ -z "$BIN" ]; then
    BIN=$ROOT/target/release/sealdisk
    [ -x "$BIN" ] || cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
[ -x "$BIN" ] || { echo "bench-report: $BIN is not an executable file" >&2; exit 2; }
BIN=$(realpath "$BIN")
CORE=${CORE:-1}
FMT=(python3 "$ROOT/tools/bench-report-fmt.py")
mkdir -p "$W"
W=$(realpath "$W")
TGT=$W/targets.tsv
: >"$TGT"

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
stamp() { date -u '+%Y-%m-%d %H:%M UTC'; }
# q QUICK FULL: the quick or the full value.
q() { if [ "$QUICK" = 1 ]; then echo "$1"; else echo "$2"; fi; }
# section TITLE COMMAND...: the heading, the run's date and the exact commands, one a line.
section() {
    local title=$1 IFS=$'\n'; shift
    printf '\n## %s\n\nRun of %s%s:\n\n```sh\n%s\n```\n\n' "$title" "$(stamp)" \
        "$([ "$QUICK" = 1 ] && echo ' (--quick: a smoke test, not figures)')" "$*"
}

area_crypto() {
    local opts
    opts=$(q "--rounds 1 --slice-ms 5 --no-openssl" "--rounds 7")
    section '1. XTS kernels (`crypto`)' "sealdisk bench crypto --json $opts"
    log "crypto: bench crypto $opts"
    # shellcheck disable=SC2086
    "$BIN" bench crypto --json $opts >"$W/crypto.json" 2>"$W/crypto.log" || return 1
    "${FMT[@]}" crypto "$TGT" "$W/crypto.json"
}

area_cpu() {
    local size rn rr be ip
    size=$(q 64m 1g)
    rn=$(q "--runtime 1 --rounds 2" "--runtime 12 --rounds 6")
    rr=$(q "--runtime 1 --rounds 2" "--runtime 24 --rounds 12")
    local common="--size $size --rw randwrite --bs 4k --iodepth 32 --time_based --cores $CORE --quiet --compare --output-format json"
    section '2. Data path CPU per I/O (`cpu`)' \
        "sealdisk bench io --backend null $common $rn --inplace=0   # and --inplace=1" \
        "sealdisk bench io --backend malloc $common $rr --inplace=0   # and --inplace=1"
    : >"$W/cpu.log"
    for be in null malloc; do
        for ip in 0 1; do
            log "cpu: $be --inplace=$ip"
            # shellcheck disable=SC2086
            "$BIN" bench io --backend $be $common $([ $be = null ] && echo "$rn" || echo "$rr") --inplace=$ip \
                >"$W/cpu-$be-$ip.json" 2>>"$W/cpu.log" || return 1
        done
    done
    "${FMT[@]}" cpu "$TGT" "$W/cpu-null-0.json" "$W/cpu-null-1.json" "$W/cpu-malloc-0.json" "$W/cpu-malloc-1.json"
}

area_file() {
    local env args
    env="SIZE=$(q 64m 1g) RAM=0"
    args="$W/file $(q '1 1' '6 4')"
    section '3. `bench io` on the file against fio (`file`)' "SEALDISK=$BIN $env tools/datapath-compare.sh $args"
    log "file: datapath-compare.sh $args"
    # shellcheck disable=SC2086
    env SEALDISK="$BIN" $env "$ROOT/tools/datapath-compare.sh" $args >"$W/file.md" 2>"$W/file.log" || return 1
    "${FMT[@]}" file "$TGT" "$W/file.md"
}

area_nbd() {
    local args
    args="--runtime $(q '1 --ramp 0 --reps 2' '5 --ramp 1 --reps 6') --size $(q 256M 2G) --targets file,sd-plain,sd-enc,q-luks"
    section '4. NBD frontend (`nbd`)' "tools/nbd-compare.py $args --sealdisk $BIN"
    log "nbd: nbd-compare.py $args"
    rm -f "$W/nbd.json"
    # shellcheck disable=SC2086
    "$ROOT/tools/nbd-compare.py" $args --sealdisk "$BIN" --workdir "$W/nbd" --json "$W/nbd.json" \
        >"$W/nbd.log" 2>&1 || { tail -5 "$W/nbd.log" >&2; return 1; }
    "${FMT[@]}" nbd "$TGT" "$W/nbd.json"
}

area_vhost() {
    local opts rt i=0 files=()
    opts="-r $(q 1 5) -s $(q 64M 1G)"
    rt=$(q 1 6)
    local jobs=("--rw randread --bs 4k --iodepth 32 --numjobs 2 --runtime $rt"
        "--rw randwrite --bs 4k --iodepth 32 --numjobs 2 --runtime $rt"
        "--rw read --bs 128k --iodepth 8 --numjobs 1 --runtime $rt"
        "--rw write --bs 128k --iodepth 8 --numjobs 1 --runtime $rt")
    section '5. vhost-user-blk frontend (`vhost`)' \
        "$(for j in "${jobs[@]}"; do echo "SERVE_ARGS=\"--cores 0-1 --no-qos\" tools/vhost-compare.sh $opts -- $j"; done)"
    for j in "${jobs[@]}"; do
        i=$((i + 1))
        log "vhost: $j"
        rm -f "$W/vhost-$i.json"
        # shellcheck disable=SC2086
        SEALDISK="$BIN" SERVE_ARGS="--cores 0-1 --no-qos" "$ROOT/tools/vhost-compare.sh" $opts -w "$W/vhost" \
            --json "$W/vhost-$i.json" -- $j >>"$W/vhost.log" 2>&1 || { tail -5 "$W/vhost.log" >&2; return 1; }
        files+=("$W/vhost-$i.json")
    done
    "${FMT[@]}" vhost "$TGT" "${files[@]}"
}

area_volume() {
    local rounds size rt pool=/dev/shm/sealdisk-bench-report.pool
    rounds=$(q 1 5) size=$(q 64m 256m) rt=$(q 1 4)
    local common="--size $size --bs 4k --iodepth 32 --runtime $rt --time_based --cores $CORE --quiet --output-format json"
    section '6. Volume: fast path and first writes (`volume`)' \
        "sealdisk bench io --backend volume:$pool $common --rw randwrite   # and randread; --backend malloc; $rounds interleaved rounds"
    rm -rf "$W/volume"
    mkdir -p "$W/volume"
    for r in $(seq "$rounds"); do
        for be in "volume:$pool" malloc; do
            for rw in randwrite randread; do
                log "volume: round $r $be $rw"
                # shellcheck disable=SC2086
                "$BIN" bench io --backend "$be" $common --rw "$rw" \
                    >"$W/volume/${be%%:*}-$rw-$r.json" 2>"$W/volume/${be%%:*}-$rw-$r.err" \
                    || { cp "$W/volume/${be%%:*}-$rw-$r.err" "$W/volume.log"; return 1; }
            done
        done
    done
    rm -f "$pool" "${pool%.pool}.catalog"
    "${FMT[@]}" volume "$TGT" "$W/volume"
}

area_iostat() {
    local args
    args="$(q '1 1' '5 5') $BIN $(q 64m 256m)"
    section "7. The statistics layer's cost (\`iostat\`)" "tools/iostat-cost.sh $args"
    log "iostat: iostat-cost.sh $args"
    rm -f "$W/iostat.json"
    # shellcheck disable=SC2086
    "$ROOT/tools/iostat-cost.sh" --json "$W/iostat.json" $args >"$W/iostat.log" 2>&1 \
        || { tail -5 "$W/iostat.log" >&2; return 1; }
    "${FMT[@]}" iostat "$TGT" "$W/iostat.json"
}

area_migrate() {
    local args
    args="-s $(q 1 4) -r $(q 1 5)"
    section '8. `sealdisk migrate` against `qemu-img convert` (`migrate`)' "tools/migrate-bench.sh $args -b $BIN"
    log "migrate: migrate-bench.sh $args"
    rm -f "$W/migrate.json"
    # migrate-bench.sh removes its work directory at exit: the JSON lives beside it.
    # shellcheck disable=SC2086
    "$ROOT/tools/migrate-bench.sh" $args -b "$BIN" -w "$W/migrate" -j "$W/migrate.json" >"$W/migrate.log" 2>&1 \
        || { tail -5 "$W/migrate.log" >&2; return 1; }
    "${FMT[@]}" migrate "$TGT" "$W/migrate.json"
}

area_rbd() {
    local args
    args="--runtime $(q '1 --ramp 0' '8 --ramp 2') --reps $(q 2 4) --size $(q 128M 512M)"
    section '9. Ceph RBD backend (`rbd`)' "tools/rbd-compare.py $args --sealdisk $BIN"
    log "rbd: rbd-compare.py $args"
    rm -f "$W/rbd.json"
    # shellcheck disable=SC2086
    python3 "$ROOT/tools/rbd-compare.py" $args --sealdisk "$BIN" --workdir "$W/rbd" --json "$W/rbd.json" \
        >"$W/rbd.log" 2>&1 || { tail -5 "$W/rbd.log" >&2; return 1; }
    "${FMT[@]}" rbd "$TGT" "$W/rbd.json"
}

echo "# Benchmark report ($(stamp); $BIN; $(nproc) CPUs)"
failed=()
for a in "${AREAS[@]}"; do
    if ! "area_$a"; then
        echo "**$a: the run failed** (see $W/$a.log)"
        tail -3 "$W/$a.log" 2>/dev/null >&2 || true
        failed+=("$a")
    fi
done
printf '\n## Targets: met and not met\n\n'
"${FMT[@]}" targets "$TGT"
if [ ${#failed[@]} -gt 0 ]; then
    log "failed areas: ${failed[*]}"
    exit 1
fi
