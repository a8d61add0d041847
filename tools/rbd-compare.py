#!/usr/bin/env python3
"""Issue 22 figures: encrypted disks on Ceph RBD, on one single-node cluster
(tools/ceph-cluster.sh, memstore OSD), in one interleaved run.

Targets (all --size, filled once before measuring), every one an NBD export read by fio's
nbd engine, every server pinned to the same CPU and linking librbd in-process:
  sd-plain   sealdisk serve --backend rbd, plaintext disk
  sd-enc     sealdisk serve --backend rbd, encrypted disk (AES-256-XTS on the host)
  sd-enc-stock  the same in a second sealdisk daemon whose ceph.conf sets librbd's stock
             values of the options sealdisk tunes (src/rbd DISK_OPTIONS `~`: rbd cache,
             io scheduler, non-blocking aio, objecter throttles): what the tuning does
  q-rbdluks  qemu-nbd, QEMU's rbd driver with librbd's own LUKS2 encryption
             (`rbd encryption format ... luks2`, encrypt.format=luks2; aes-256-xts)
  q-luks     qemu-nbd, QEMU's luks driver (aes-256-xts-plain64) over its rbd driver
  librbd     `rbd bench` on a plain image with sealdisk's librbd settings, pinned like the
             servers: librbd alone, no frontend, no cipher. Not a contender: the CPU per I/O
             any librbd client pays on this cluster at the rate it sustains (the floor under
             sd-enc's figure). Its CPU and I/Os are counted between the ramp and the end.
Workloads: 4k randread/randwrite QD32, 128k seq read/write QD8, numjobs=1.
Order: ABBA over repetitions (use an even --reps).
Server CPU is utime+stime of the server process (its librbd threads included) over the
fio run, per I/O; the OSD's CPU is not counted for anyone.

Usage: tools/rbd-compare.py [--workdir DIR] [--size 512M] [--runtime S] [--ramp S] [--reps N] [--out FILE]
                            [--sealdisk BIN] [--json FILE] [--targets T,T,...]
--sealdisk BIN (or $SEALDISK): that binary instead of target/release/sealdisk; --json FILE also
writes the averaged figures as JSON (for tools/bench-report.sh).
Needs: target/release/sealdisk, fio, qemu-nbd and qemu-img with the rbd block module
(qemu-block-extra), rbd/ceph (ceph-common), ceph-mon/mgr/osd.
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, tempfile, time

import fiolib
from fiolib import WORKLOADS, avg as avg_of, cpu_ticks, errors, fill, log, measure_all, nbd, rep_ratios, run, size_bytes, \
    spread, table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEALDISK = os.path.join(ROOT, "target", "release", "sealdisk")
CLUSTER = os.path.join(ROOT, "tools", "ceph-cluster.sh")
TARGETS = ["sd-plain", "sd-enc", "sd-enc-stock", "q-rbdluks", "q-luks", "librbd"]
# `rbd bench` arguments per workload (the same sizes and depths as fiolib.WORKLOADS).
RBD_BENCH = {"randread": ("read", "4K", 32, "rand"), "randwrite": ("write", "4K", 32, "rand"),
             "seqread": ("read", "128K", 8, "seq"), "seqwrite": ("write", "128K", 8, "seq")}
# librbd's own values of the options sealdisk tunes (set in sd-enc-stock's ceph.conf).
STOCK = {"rbd cache": "true", "rbd io scheduler": "simple", "rbd non blocking aio": "true",
         "objecter inflight ops": "1024", "objecter inflight op bytes": "104857600"}


def start_sealdisk(data, conf, cpu, log_path):
    """sealdisk serve --backend rbd on cpu; returns (process, cli) once its socket exists."""
    p = subprocess.Popen(["taskset", "-c", str(cpu), SEALDISK, "serve", "--data-dir", data,
                          "--cores", str(cpu), "--no-qos", "--backend", "rbd", "--ceph-conf", conf,
                          "--rbd-pool", "rbd"], stderr=open(log_path, "w"))
    for _ in range(300):
        if os.path.exists(os.path.join(data, "sealdisk.sock")):
            break
        time.sleep(0.1)

    def sd(*args):
        out = run([SEALDISK, *args, "--data-dir", data, "--json", "--account", "bench",
                   "--region", "local-1"]).stdout
        return json.loads(out) if out.strip() else {}
    sd("activate-kms")
    return p, sd


def rbd_bench_options():
    """sealdisk's librbd settings (src/rbd/mod.rs DISK_OPTIONS) as `rbd` command-line overrides."""
    src = open(os.path.join(ROOT, "src", "rbd", "mod.rs")).read()
    block = src[src.index("pub const DISK_OPTIONS"):]
    block = block[:block.index("];")]
    return [f"--{k}={v.lstrip('~?')}" for k, v in re.findall(r'\("(\w+)", "([^"]*)"\)', block)]


def measure_rbd_bench(conf, image, wl, runtime, ramp, cpu, bench_opts):
    """`rbd bench` of workload wl on image, pinned to cpu, for ramp + runtime seconds: its
    IOPS and CPU per I/O between the ramp and the end (from its per-second op counts and
    /proc), in measure()'s shape."""
    kind, bs, depth, pattern = RBD_BENCH[wl]
    p = subprocess.Popen(["taskset", "-c", str(cpu), "rbd", "-c", conf, "bench", "--io-type", kind, "--io-size", bs,
                          "--io-threads", str(depth), "--io-total", "1T", "--io-pattern", pattern, image,
                          *bench_opts], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    marks = []  # (time, cumulative ops, cpu ticks) at each progress line

    def read_until(deadline, marks_after=0.0, at_least=0):
        """Progress lines until deadline, and until at_least of them came after marks_after."""
        for line in p.stdout:
            f = line.split()
            if len(f) >= 3 and f[0].isdigit() and f[1].isdigit():
                marks.append((time.time(), int(f[1]), cpu_ticks(p.pid)))
            if time.time() >= deadline and sum(m[0] >= marks_after for m in marks) >= at_least:
                return
    t0 = time.time()
    read_until(t0 + ramp, t0 + ramp, 1)
    read_until(t0 + ramp + runtime, t0 + ramp, 2)
    p.kill()
    p.wait()
    first = next((m for m in marks if m[0] >= t0 + ramp), None)
    if first is None or marks[-1] is first:
        return {"iops": None, "mibs": None, "p50": None, "p99": None, "srv_us": None,
                "err": "rbd bench printed too few progress lines", "ios": 1, "cli": 0}
    last = marks[-1]
    ops, secs = last[1] - first[1], last[0] - first[0]
    size = int(bs[:-1]) << 10
    return {"iops": ops / secs, "mibs": ops * size / secs / 2**20, "p50": None, "p99": None,
            "srv_us": (last[2] - first[2]) / fiolib.CLK / max(ops, 1) * 1e6, "err": 0, "ios": ops, "cli": 0}


def disk_uri(sd, data, inst, size, enc):
    """A new ssd disk of size bytes attached to inst: its NBD URI."""
    d = sd("create-disk", f"SizeBytes={size}", f"Encrypted={enc}", "DiskCategory=ssd")["DiskId"]
    sd("attach-disk", f"DiskId={d}", f"InstanceId={inst}")
    return f"nbd+unix:///{d}?socket={os.path.join(data, 'nbd.sock')}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sealdisk-rbd-compare"))
    ap.add_argument("--size", default=size_bytes("512M"), type=size_bytes)
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--ramp", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out")
    ap.add_argument("--sealdisk", default=os.environ.get("SEALDISK"), help="the sealdisk binary")
    ap.add_argument("--json", default=None, help="also write the averaged figures to this file as JSON")
    ap.add_argument("--targets", default=",".join(TARGETS), help="which of " + ",".join(TARGETS))
    a = ap.parse_args()
    targets = a.targets.split(",")
    if not targets or any(t not in TARGETS for t in targets):
        sys.exit(f"--targets: choose from {','.join(TARGETS)}")
    global SEALDISK
    if a.sealdisk:
        SEALDISK = os.path.abspath(a.sealdisk)
    workloads = {w: WORKLOADS[w] for w in a.workloads.split(",")}
    size = a.size
    for tool in ("fio", "qemu-nbd", "qemu-img", "rbd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if not os.access(SEALDISK, os.X_OK):
        sys.exit(f"{SEALDISK} missing: cargo build --release (or --sealdisk BIN)")
    srv_cpu, fio_cpu = (1, 0) if os.cpu_count() >= 2 else (0, 0)
    w = a.workdir
    if os.path.exists(os.path.join(w, "ceph", "pids")):
        subprocess.run(["bash", CLUSTER, "stop", os.path.join(w, "ceph")])
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    procs, qpid = [], {}
    cdir = os.path.join(w, "ceph")
    env = dict(os.environ, CEPH_MEMSTORE_BYTES=str(max(8 << 30, 6 * size)))
    t0 = time.time()
    conf = run(["bash", CLUSTER, "start", cdir], env=env).stdout.strip().splitlines()[-1]
    log(f"cluster up in {time.time() - t0:.1f} s")
    try:
        data = os.path.join(w, "sd")
        p, sd = start_sealdisk(data, conf, srv_cpu, os.path.join(w, "sealdisk.log"))
        procs.append(p)
        inst = sd("create-instance", "SystemDisk.SizeBytes=4194304")["InstanceId"]
        uris = {name: disk_uri(sd, data, inst, size, enc) for name, enc in (("sd-plain", "false"), ("sd-enc", "true"))}
        # The same daemon with librbd's stock client settings (ceph.conf names them).
        stock_conf = os.path.join(w, "stock.conf")
        with open(conf) as src, open(stock_conf, "w") as dst:
            dst.write(src.read() + "\n[client]\n" + "".join(f"{k} = {v}\n" for k, v in STOCK.items()))
        stock_data = os.path.join(w, "sd-stock")
        ps, sds = start_sealdisk(stock_data, stock_conf, srv_cpu, os.path.join(w, "sealdisk-stock.log"))
        procs.append(ps)
        inst2 = sds("create-instance", "SystemDisk.SizeBytes=4194304")["InstanceId"]
        uris["sd-enc-stock"] = disk_uri(sds, stock_data, inst2, size, "true")
        pw = os.path.join(w, "pass")
        with open(os.open(pw, os.O_WRONLY | os.O_CREAT, 0o600), "w") as pf:
            pf.write("peer-bench-passphrase")
        # librbd's LUKS2: the header (16 MiB) is inside the image.
        run(["rbd", "-c", conf, "create", "--size", f"{(size >> 20) + 16}M", "rbd/q-rbdluks"])
        run(["rbd", "-c", conf, "encryption", "format", "rbd/q-rbdluks", "luks2", pw])
        run(["qemu-img", "create", "-q", "-f", "luks", "--object", f"secret,id=sec0,file={pw},format=raw",
             "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256",
             f"rbd:rbd/q-luks:conf={conf}", str(size)])
        secret = ["--object", f"secret,id=sec0,file={pw},format=raw", "--image-opts"]
        for name, opts in (
            ("q-rbdluks", f"driver=rbd,pool=rbd,image=q-rbdluks,conf={conf},encrypt.format=luks2,encrypt.key-secret=sec0"),
            ("q-luks", f"driver=luks,key-secret=sec0,file.driver=rbd,file.pool=rbd,file.image=q-luks,file.conf={conf}"),
        ):
            sock, pidf = os.path.join(w, name + ".sock"), os.path.join(w, name + ".pid")
            run(["taskset", "-c", str(srv_cpu), "qemu-nbd", "--fork", f"--pid-file={pidf}", "--persistent",
                 "--shared=4", "-k", sock, "--cache=none", *secret, opts])
            qpid[name] = int(open(pidf).read())
            uris[name] = f"nbd+unix:///?socket={sock}"
        srv_pid = {"sd-plain": p.pid, "sd-enc": p.pid, "sd-enc-stock": ps.pid, **qpid}
        fio_args = {t: nbd(u) for t, u in uris.items()}
        run(["rbd", "-c", conf, "create", "--size", f"{size >> 20}M", "rbd/librbd"])
        run(["rbd", "-c", conf, "bench", "--io-type", "write", "--io-size", "1M", "--io-threads", "8",
             "--io-total", str(size), "--io-pattern", "seq", "rbd/librbd"])
        bench_opts = rbd_bench_options()
        fio = fiolib.fio_runs(a, fio_args, srv_pid, fio_cpu)

        def one(wl, t):
            if t == "librbd":
                return measure_rbd_bench(conf, "rbd/librbd", wl, a.runtime, a.ramp, srv_cpu, bench_opts)
            return fio(wl, t)
        for name in targets:
            if name != "librbd":
                fill(name, fio_args[name], size, fio_cpu)
        res = measure_all(a, workloads, targets, one)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for pid in qpid.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        subprocess.run(["bash", CLUSTER, "stop", cdir])

    def avg(wl, t, k):
        return avg_of(res, wl, t, k)
    L = [f"# RBD comparison ({time.strftime('%Y-%m-%d %H:%M')}, {a.reps} reps x {a.runtime}s, {size >> 20} MiB images, "
         f"servers on cpu {srv_cpu}, fio on cpu {fio_cpu}, single-node memstore cluster)", "",
         *table(res, workloads, targets)]
    L += ["", "| workload | sd-enc IOPS / best peer | sd-enc CPU/IO / best peer's | sd-enc / sd-plain IOPS "
          "| sd-enc CPU/IO / sd-enc-stock's | librbd alone's CPU/IO / best peer's "
          "| per rep: sd-enc / best peer IOPS | per rep: sd-enc / sd-plain IOPS |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for wl in workloads:
        peers = [t for t in ("q-rbdluks", "q-luks") if avg(wl, t, "iops")]
        best = max(peers, key=lambda t: avg(wl, t, "iops")) if peers else None
        e, pl = avg(wl, "sd-enc", "iops"), avg(wl, "sd-plain", "iops")
        r1 = f"{e / avg(wl, best, 'iops'):.2f} ({best})" if best and e else "n/a"
        cb, ce = (avg(wl, best, "srv_us") if best else None), avg(wl, "sd-enc", "srv_us")
        r2 = f"{ce / cb:.2f}" if cb and ce else "n/a"
        r3 = f"{e / pl:.3f}" if e and pl else "n/a"
        cs = avg(wl, "sd-enc-stock", "srv_us")
        r4 = f"{ce / cs:.2f}" if cs and ce else "n/a"
        fl = avg(wl, "librbd", "srv_us")
        r5 = f"{fl / cb:.2f}" if fl and cb else "n/a"
        r6 = spread(rep_ratios(res, wl, "sd-enc", best)) if best else "n/a"
        r7 = spread(rep_ratios(res, wl, "sd-enc", "sd-plain"))
        L.append(f"| {wl} | {r1} | {r2} | {r3} | {r4} | {r5} | {r6} | {r7} |")
    errs = errors(res)
    L += ["", f"fio errors: {errs or 'none'}"]
    text = "\n".join(L) + "\n"
    print(text)
    if a.out:
        open(a.out, "w").write(text)
    if a.json:
        write_json(a.json, a, res, workloads, targets, ("iops", "mibs", "p50", "p99", "srv_us"),
                   server_cpu=srv_cpu, fio_cpu=fio_cpu)

if __name__ == "__main__":
    main()
