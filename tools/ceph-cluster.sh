#!/usr/bin/env bash
# A single-node Ceph cluster for the RBD backend's tests (issue #22): one monitor, one manager,
# one memstore OSD, all under DIR, started without systemd and stopped by their pids.
#
# Usage: tools/ceph-cluster.sh start DIR    start the cluster; prints DIR/ceph.conf's path as its
#                                           last line (and writes it to DIR/conf-path)
#        tools/ceph-cluster.sh stop DIR     stop every daemon that `start` recorded (idempotent)
#        tools/ceph-cluster.sh status DIR   `ceph -s` of that cluster
#
# Environment: CEPH_MON_PORT (default: a free port), CEPH_POOL (default rbd),
#              CEPH_MEMSTORE_BYTES (default 4 GiB; memstore takes RAM only as objects are written),
#              CEPH_START_TIMEOUT (seconds, default 120).
# Needs ceph-mon, ceph-mgr, ceph-osd and ceph-common (ceph, rbd, rados, monmaptool).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
fi

# Every daemon this script starts has a pid file DIR/pids/NAME.pid; stop sends SIGTERM to each
# one that still runs a ceph binary, waits, then SIGKILL.
stop_cluster() {
    local d=$1 pidfile pid waited
    [ -d "$d/pids" ] || return 0
    for pidfile in "$d"/pids/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if [ -n "$pid" ] && is_ours "$pid"; then
            # (a stopped daemon, SIGSTOP in a test, must run to see SIGTERM)
            kill -CONT "$pid" 2>/dev/null || true
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pidfile in "$d"/pids/*.pid; do
        [ -e "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        waited=0
        while [ -n "$pid" ] && is_ours "$pid" && [ $waited -lt 30 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if [ -n "$pid" ] && is_ours "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    # The monitor's store on tmpfs (see start).
    if [ -L "$d/mon" ]; then
        case "$(readlink "$d/mon")" in
            /dev/shm/sealdisk-ceph-mon.*) rm -rf "$(readlink "$d/mon")" ;;
        esac
        rm -f "$d/mon"
    fi
}

# True while PID is a live ceph daemon (a recycled pid that runs something else is not ours).
is_ours() {
    local comm
    comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
    case "$comm" in
        ceph-mon | ceph-mgr | ceph-osd) ;;
        *) return 1 ;;
    esac
    # a zombie is not running
    ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

need() {
    command -v "$1" >/dev/null || {
        echo "$0: '$1' not found: install ceph-mon ceph-osd ceph-mgr ceph-common" >&2
        exit 1
    }
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
stop)
    stop_cluster "$dir"
    exit 0
    ;;
status)
    exec ceph -c "$dir/ceph.conf" --connect-timeout 10 -s
    ;;
start) ;;
*)
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
    ;;
esac

for t in ceph-mon ceph-mgr ceph-osd ceph monmaptool ceph-authtool rbd python3; do need "$t"; done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -e "$dir/ceph.conf" ]; then
    echo "$0: $dir already holds a cluster (ceph.conf); stop it and use a new directory" >&2
    exit 1
fi
start_ns=$(date +%s%N)
port=${CEPH_MON_PORT:-$(free_port)}
pool=${CEPH_POOL:-rbd}
timeout=${CEPH_START_TIMEOUT:-120}
fsid=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$dir"/{run,log,mgr,osd,pids}
# The monitor's store syncs every change: on tmpfs when there is one, so a busy disk (other
# tests' O_DIRECT writes) cannot stall it for a minute. `stop` removes it.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    ln -s "$(mktemp -d /dev/shm/sealdisk-ceph-mon.XXXXXX)" "$dir/mon"
else
    mkdir -p "$dir/mon"
fi
conf="$dir/ceph.conf"
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
mon initial members = a
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-4294967296}
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon/\$cluster-\$id
mgr data = $dir/mgr/\$cluster-\$id
osd data = $dir/osd/\$cluster-\$id
keyring = $dir/keyring
# few threads: two shared cores
osd op num shards = 1
osd op num threads per shard = 2
ms async op threads = 1
mon compact on start = false
# a killed client's watch (and so its RBD exclusive lock) lapses after 5 s, not 30
osd client watch timeout = 5
EOF

cleanup_on_error() {
    echo "$0: start failed; logs in $dir/log" >&2
    stop_cluster "$dir"
}
trap cleanup_on_error ERR

# Starts a daemon in the foreground mode (-f), in the background of this shell, its pid in
# DIR/pids/NAME.pid.
run_daemon() {
    local name=$1
    shift
    "$@" -c "$conf" -f >"$dir/log/$name.out" 2>&1 &
    echo $! >"$dir/pids/$name.pid"
}

ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" >/dev/null 2>&1
run_daemon mon.a ceph-mon -i a

c() { ceph -c "$conf" --connect-timeout "$timeout" "$@"; }
c mon stat >/dev/null
mkdir -p "$dir/mgr/ceph-x"
run_daemon mgr.x ceph-mgr -i x

osd_uuid=$(cat /proc/sys/kernel/random/uuid)
id=$(c osd new "$osd_uuid")
mkdir -p "$dir/osd/ceph-$id"
ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd.$id.mkfs" 2>&1
run_daemon "osd.$id" ceph-osd -i "$id"

# Wait for the OSD to be up and in.
deadline=$((SECONDS + timeout))
until c osd dump 2>/dev/null | grep -Eq "^osd\.$id up +in "; do
    if [ $SECONDS -ge $deadline ]; then
        echo "$0: osd.$id not up after ${timeout}s" >&2
        false
    fi
    is_ours "$(cat "$dir/pids/osd.$id.pid")" || {
        echo "$0: ceph-osd exited; see $dir/log/osd.$id.log" >&2
        false
    }
    sleep 0.2
done
c osd pool create "$pool" 8 8 >/dev/null 2>&1
rbd -c "$conf" pool init "$pool"
trap - ERR
end_ns=$(date +%s%N)
echo "started in $(((end_ns - start_ns) / 1000000)) ms (mon port $port, pool $pool)" >&2
echo "$conf" >"$dir/conf-path"
echo "$conf"
