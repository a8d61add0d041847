#!/usr/bin/env bash
# A/B of two sealdisk builds over NBD (an encrypted 1 GiB disk, one reactor, fio's nbd
# engine on the other CPU), ROUNDS interleaved rounds of 4k randwrite QD32, 128k write
# QD8 and 4k randread QD32, 5 s each. Needs fio; WORK must be on the disk to measure.
#
# Usage: tools/nbd-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [WORK]
set -u
OLD=$1 NEW=$2 ROUNDS=${3:-3} WORK=${4:-/work/benchab}
run() { # binary tag
    local B=$1 T=$2 D=$WORK-$2
    rm -rf "$D"; mkdir -p "$D"
    "$B" serve --data-dir "$D" --cores 1 --pool-size 3G --no-qos >"$D.log" 2>&1 &
    local P=$!
    for _ in $(seq 100); do [ -S "$D/sealdisk.sock" ] && break; sleep 0.1; done
    export SEALDISK_DATA_DIR=$D SEALDISK_ACCOUNT=a1 SEALDISK_REGION=cn-hangzhou
    "$B" activate-kms >/dev/null
    local I DK
    I=$("$B" create-instance SystemDisk.SizeBytes=4194304 --json | python3 -c "import json,sys; print(json.load(sys.stdin)['InstanceId'])")
    DK=$("$B" create-disk SizeBytes=1073741824 Encrypted=true --json | python3 -c "import json,sys; print(json.load(sys.stdin)['DiskId'])")
    "$B" attach-disk DiskId="$DK" InstanceId="$I" >/dev/null
    local U="nbd+unix:///$DK?socket=$D/nbd.sock"
    taskset -c 0 fio --name=fill --ioengine=nbd --uri="$U" --rw=write --bs=1m --iodepth=8 --size=1g >/dev/null 2>&1
    for w in "randwrite 4k 32" "write 128k 8" "randread 4k 32"; do
        set -- $w
        iops=$(taskset -c 0 fio --name=t --ioengine=nbd --uri="$U" --rw="$1" --bs="$2" --iodepth="$3" --size=1g \
            --runtime=5 --time_based --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
            python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))")
        echo "$T $1 $2 iops=$iops"
    done
    kill $P; wait $P 2>/dev/null
    rm -rf "$D" "$D.log"
}
for _ in $(seq "$ROUNDS"); do run "$OLD" old; run "$NEW" new; done
