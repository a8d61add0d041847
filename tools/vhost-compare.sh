#!/usr/bin/env bash
# vhost-user-blk comparison: the same fio-style job, through `sealdisk bench vhost`
# (this repository's VMM-side driver), against
#   qsd-luks   qemu-storage-daemon exporting a LUKS image (the peer)
#   encrypted  a sealdisk encrypted disk's vhost socket
#   plain      a sealdisk plain disk's vhost socket
#   ceiling    fio's io_uring engine (--direct=1) on a raw file (the device ceiling)
# for ROUNDS rounds, interleaved (the order rotates every round, so a slow
# phase of a shared host hits every target). All images live in WORKDIR, on
# the same filesystem as the sealdisk pool, and are written once in full
# before the rounds (reads of never-written blocks would skip the device).
# Prints per target the median and spread (min..max) of IOPS and of the
# target's CPU ns per I/O (the daemon's CPU over the measured interval, from
# --pid; for fio, fio's own CPU), then encrypted/peer, encrypted/plain and
# encrypted/ceiling (ratio of medians, and the median of the per-round ratios).
#
# Usage: tools/vhost-compare.sh [options] [--] JOB...
#   JOB: bench vhost / fio options, e.g. --rw randread --bs 4k --iodepth 32 --numjobs 2 --runtime 10
# Options:
#   -w DIR            work directory (default /var/tmp/sealdisk-vhost)
#   -r N              rounds (default 5)
#   -s SIZE           disk size (default 1G; K/M/G suffixes)
#   -t "T1 T2 ..."    targets to run (default "qsd-luks encrypted plain ceiling"; also qsd-raw)
#   -q N              virtqueues of the qsd exports (default: numjobs, at least 2)
#   --enc-sock PATH   use this encrypted-disk socket (no sealdisk setup); with --sd-pid
#   --plain-sock PATH use this plain-disk socket; with --sd-pid
#   --sd-pid PID      the sealdisk daemon behind those sockets (for CPU ns/IO)
#   --qsd-sock PATH --qsd-pid PID   use a running qemu-storage-daemon (LUKS) export
#   --no-prefill      skip writing the images once
#   --keep            leave the daemons running at the end (prints their pids)
#   --json FILE       also write the figures as JSON: per target the rounds' IOPS and CPU
#                     ns/IO, their medians, and the ratios (for tools/bench-report.sh)
# Environment: SEALDISK (the binary; default target/release/sealdisk, built if missing),
#   SERVE_ARGS (extra `sealdisk serve` options, e.g. "--cores 0-1").
set -euo pipefail

W=/var/tmp/sealdisk-vhost
ROUNDS=5
SIZE=1G
TARGETS="qsd-luks encrypted plain ceiling"
QUEUES=
ENC_SOCK= PLAIN_SOCK= SD_PID= QSD_SOCK= QSD_PID=
PREFILL=1 KEEP=0 JSON_OUT=
JOB=()
while [ $# -gt 0 ]; do
    case "$1" in
        -w) W=$2; shift 2 ;;
        -r) ROUNDS=$2; shift 2 ;;
        -s) SIZE=$2; shift 2 ;;
        -t) TARGETS=$2; shift 2 ;;
        -q) QUEUES=$2; shift 2 ;;
        --enc-sock) ENC_SOCK=$2; shift 2 ;;
        --plain-sock) PLAIN_SOCK=$2; shift 2 ;;
        --sd-pid) SD_PID=$2; shift 2 ;;
        --qsd-sock) QSD_SOCK=$2; shift 2 ;;
        --qsd-pid) QSD_PID=$2; shift 2 ;;
        --no-prefill) PREFILL=0; shift ;;
        --keep) KEEP=1; shift ;;
        --json) JSON_OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; JOB+=("$@"); break ;;
        *) JOB+=("$1"); shift ;;
    esac
done
[ ${#JOB[@]} -gt 0 ] || JOB=(--rw randread --bs 4k --iodepth 32 --numjobs 2 --runtime 10)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
S=${SEALDISK:-$ROOT/target/release/sealdisk}
if [ -z "${SEALDISK:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
mkdir -p "$W/out"
OUT=$W/out
rm -f "$OUT"/*.json

bytes() { # 1G -> 1073741824
    local v=${1^^}
    case "$v" in
        *K) echo $(( ${v%K} << 10 )) ;; *M) echo $(( ${v%M} << 20 )) ;;
        *G) echo $(( ${v%G} << 30 )) ;; *T) echo $(( ${v%T} << 40 )) ;; *) echo "$v" ;;
    esac
}
BYTES=$(bytes "$SIZE")

# The job as `--key value` pairs (also --key=value; a lone flag means 1).
declare -A JOPT=()
i=0
while [ $i -lt ${#JOB[@]} ]; do
    a=${JOB[$i]}
    [[ $a == --* ]] || { echo "job option $a: use --key value" >&2; exit 2; }
    k=${a#--}
    if [[ $k == *=* ]]; then
        JOPT[${k%%=*}]=${k#*=}; i=$((i + 1))
    elif [ $((i + 1)) -lt ${#JOB[@]} ] && [[ ${JOB[$((i + 1))]} != --* ]]; then
        JOPT[$k]=${JOB[$((i + 1))]}; i=$((i + 2))
    else
        JOPT[$k]=1; i=$((i + 1))
    fi
done
NUMJOBS=${JOPT[numjobs]:-1}
[ -n "$QUEUES" ] || QUEUES=$(( NUMJOBS > 2 ? NUMJOBS : 2 ))
# bench vhost and fio get the same job; time-based when a runtime is given.
BENCH_JOB=()
FIO_JOB=()
for k in "${!JOPT[@]}"; do
    BENCH_JOB+=("--$k" "${JOPT[$k]}")
    FIO_JOB+=("--$k=${JOPT[$k]}")
done
if [ -n "${JOPT[runtime]:-}" ] && [ -z "${JOPT[time_based]:-}" ]; then
    BENCH_JOB+=(--time_based); FIO_JOB+=(--time_based)
fi

PIDS=()
cleanup() {
    if [ "$KEEP" = 1 ]; then
        [ ${#PIDS[@]} -gt 0 ] && echo "# left running: ${PIDS[*]}" >&2
        return
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_sock() { # path pid
    for _ in $(seq 1 300); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || { echo "daemon $2 exited before creating $1" >&2; return 1; }
        sleep 0.1
    done
    echo "no socket $1 after 30s" >&2; return 1
}

want() { [[ " $TARGETS " == *" $1 "* ]]; }

declare -A SOCK=() PID=()

# (1) qemu-storage-daemon: LUKS image (and optionally a raw one) in WORKDIR.
start_qsd() { # name blockdev-args...
    local name=$1; shift
    local sock=$W/$name.sock
    rm -f "$sock"
    qemu-storage-daemon "$@" \
        --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES" \
        >"$W/$name.log" 2>&1 &
    local p=$!
    PIDS+=("$p")
    wait_sock "$sock" "$p"
    SOCK[$name]=$sock PID[$name]=$p
}
if want qsd-luks; then
    if [ -n "$QSD_SOCK" ]; then
        SOCK[qsd-luks]=$QSD_SOCK PID[qsd-luks]=$QSD_PID
    else
        img=$W/qsd.luks
        if [ ! -s "$img" ] || [ "$(stat -c %s "$img")" -lt "$BYTES" ]; then
            rm -f "$img"
            qemu-img create -q -f luks --object secret,id=s,data=sealdisk-bench -o key-secret=s "$img" "$BYTES"
            NEW_LUKS=1
        fi
        start_qsd qsd-luks --object secret,id=s,data=sealdisk-bench \
            --blockdev "driver=file,node-name=f,filename=$img,cache.direct=on,aio=io_uring" \
            --blockdev "driver=luks,node-name=top,file=f,key-secret=s"
    fi
fi
if want qsd-raw; then
    raw=$W/qsd.raw
    [ "$(stat -c %s "$raw" 2>/dev/null || echo 0)" = "$BYTES" ] || { rm -f "$raw"; truncate -s "$BYTES" "$raw"; }
    start_qsd qsd-raw --blockdev "driver=file,node-name=top,filename=$raw,cache.direct=on,aio=io_uring"
fi

# (2), (3) sealdisk: a daemon on WORKDIR/sealdisk, an instance, an encrypted
# and a plain disk attached to it; AttachDisk names each vhost socket.
if { want encrypted && [ -z "$ENC_SOCK" ]; } || { want plain && [ -z "$PLAIN_SOCK" ]; }; then
    D=$W/sealdisk
    rm -rf "$D"
    mkdir -p "$D"
    # shellcheck disable=SC2086
    "$S" serve --data-dir "$D" --pool-size $(( 3 * BYTES + (1 << 30) )) ${SERVE_ARGS:-} >"$W/sealdisk.log" 2>&1 &
    SD_PID=$!
    PIDS+=("$SD_PID")
    wait_sock "$D/sealdisk.sock" "$SD_PID"
    sd() { local m=$1; shift; "$S" "$m" --data-dir "$D" --account bench --region cn-hangzhou --json "$@"; }
    js() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
    sd activate-kms >/dev/null
    inst=$(sd create-instance SystemDisk.SizeBytes=$((64 << 20)) | js '["InstanceId"]')
    attach() { # encrypted(true|false) -> socket
        local disk
        disk=$(sd create-disk SizeBytes="$BYTES" Encrypted="$1" | js '["DiskId"]')
        sd attach-disk DiskId="$disk" InstanceId="$inst" | js '["VhostSocket"]'
    }
    want encrypted && [ -z "$ENC_SOCK" ] && ENC_SOCK=$(attach true)
    want plain && [ -z "$PLAIN_SOCK" ] && PLAIN_SOCK=$(attach false)
fi
want encrypted && { SOCK[encrypted]=$ENC_SOCK; PID[encrypted]=$SD_PID; }
want plain && { SOCK[plain]=$PLAIN_SOCK; PID[plain]=$SD_PID; }

# (4) the ceiling: a raw file for fio.
CEIL=$W/ceiling.raw
if want ceiling; then
    if [ "$(stat -c %s "$CEIL" 2>/dev/null || echo 0)" != "$BYTES" ]; then
        rm -f "$CEIL"
        fio --name=fill --filename="$CEIL" --size="$BYTES" --rw=write --bs=1m --iodepth=8 --ioengine=io_uring \
            --direct=1 --output-format=terse >/dev/null
    fi
fi

run_bench() { # target out.json [extra bench options]
    local t=$1 out=$2; shift 2
    local pidopt=()
    [ -n "${PID[$t]:-}" ] && pidopt=(--pid "${PID[$t]}")
    "$S" bench vhost --socket "${SOCK[$t]}" "${pidopt[@]}" --quiet --output-format json "$@" >"$out"
}

if [ "$PREFILL" = 1 ]; then
    for t in qsd-luks qsd-raw encrypted plain; do
        want "$t" || continue
        [ "$t" = qsd-luks ] && [ -n "$QSD_SOCK" ] && continue
        echo "# prefill $t (${SOCK[$t]})" >&2
        run_bench "$t" "$W/prefill-$t.json" --name prefill --rw write --bs 512k --iodepth 4 --refill_buffers
    done
fi

read -r -a ORDER <<<"$TARGETS"
echo "# job: ${BENCH_JOB[*]}; $ROUNDS rounds, interleaved; disks of $SIZE in $W; qsd num-queues=$QUEUES" >&2
for r in $(seq 1 "$ROUNDS"); do
    n=${#ORDER[@]}
    for k in $(seq 0 $((n - 1))); do
        t=${ORDER[$(( (k + r - 1) % n ))]}
        echo "# round $r: $t" >&2
        if [ "$t" = ceiling ]; then
            fio --name=ceiling --filename="$CEIL" --size="$BYTES" --ioengine=io_uring --direct=1 \
                "${FIO_JOB[@]}" --output-format=json >"$OUT/$t-$r.json"
        else
            run_bench "$t" "$OUT/$t-$r.json" "${BENCH_JOB[@]}"
        fi
    done
done

python3 - "$OUT" "$ROUNDS" "$TARGETS" "$JSON_OUT" "${BENCH_JOB[*]}" <<'PY'
import json, statistics, sys, time
out, rounds, targets, json_out, job = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5]

def figures(t, r):
    v = json.load(open(f"{out}/{t}-{r}.json"))
    jobs = v["jobs"]
    ios = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in jobs)
    if t == "ceiling":
        # fio: per job usr_cpu + sys_cpu (% of the job's runtime), runtime in ms.
        secs = max(j["job_runtime"] for j in jobs) / 1e3
        cpu = sum((j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1e3 for j in jobs)
        return ios / secs, cpu * 1e9 / max(ios, 1)
    j = jobs[0]
    if j.get("error"):
        raise SystemExit(f"{t} round {r}: {j.get('error_message')}")
    secs = j["job_runtime"] / 1e3
    return ios / secs, j["sealdisk"]["cpu_ns_per_io"]

data = {t: [figures(t, r) for r in range(1, rounds + 1)] for t in targets}
med = lambda v: statistics.median(v)
print(f"| target | IOPS median | IOPS min..max | CPU ns/IO median | CPU ns/IO min..max |")
print("|---|---:|---:|---:|---:|")
for t in targets:
    iops = [x[0] for x in data[t]]
    cpu = [x[1] for x in data[t] if x[1] is not None]
    c = f"{med(cpu):,.0f} | {min(cpu):,.0f}..{max(cpu):,.0f}" if cpu else "n/a | n/a"
    print(f"| {t} | {med(iops):,.0f} | {min(iops):,.0f}..{max(iops):,.0f} | {c} |")

def ratio(a, b, label):
    if a not in data or b not in data:
        return
    ia = [x[0] for x in data[a]]; ib = [x[0] for x in data[b]]
    ca = [x[1] for x in data[a]]; cb = [x[1] for x in data[b]]
    line = f"{label}: IOPS x{med(ia) / med(ib):.3f} (per-round median x{med([p / q for p, q in zip(ia, ib)]):.3f})"
    if all(x is not None for x in ca + cb):
        line += f", CPU ns/IO x{med(ca) / med(cb):.3f} (per-round median x{med([p / q for p, q in zip(ca, cb)]):.3f})"
    print(line)

print()
ratio("encrypted", "qsd-luks", "encrypted / peer (qsd LUKS)")
ratio("encrypted", "plain", "encrypted / plain")
ratio("encrypted", "ceiling", "encrypted / ceiling (fio io_uring)")
ratio("qsd-luks", "qsd-raw", "qsd LUKS / qsd raw")

if json_out:
    def summary(t):
        iops = [x[0] for x in data[t]]
        cpu = [x[1] for x in data[t] if x[1] is not None]
        return {"iops": iops, "cpu_ns_per_io": cpu, "iops_median": med(iops),
                "cpu_ns_per_io_median": med(cpu) if cpu else None}
    def ratios(a, b):
        if a not in data or b not in data:
            return None
        ia = [x[0] for x in data[a]]; ib = [x[0] for x in data[b]]
        return {"iops": med(ia) / med(ib), "iops_round_median": med([p / q for p, q in zip(ia, ib)])}
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "job": job, "rounds": rounds,
           "targets": {t: summary(t) for t in targets},
           "ratios": {k: ratios(a, b) for k, a, b in (("encrypted/peer", "encrypted", "qsd-luks"),
                                                      ("encrypted/plain", "encrypted", "plain"),
                                                      ("encrypted/ceiling", "encrypted", "ceiling"))}}
    with open(json_out, "w") as f:
        json.dump(doc, f, indent=1)
PY
