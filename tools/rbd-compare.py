#!/usr/bin/env python3
"""Issue 22 figures: encrypted disks on Ceph RBD, on one single-node cluster
(tools/ceph-cluster.sh, memstore OSD), in one interleaved run.

Targets (all --size, filled once before measuring), every one an NBD export read by fio's
nbd engine, every server pinned to the same CPU and linking librbd in-process:
  sd-plain   sealdisk serve --backend rbd, plaintext disk
  sd-enc     sealdisk serve --backend rbd, encrypted disk (AES-256-XTS on the host)
  q-rbdluks  qemu-nbd, QEMU's rbd driver with librbd's own LUKS2 encryption
             (`rbd encryption format ... luks2`, encrypt.format=luks2; aes-256-xts)
  q-luks     qemu-nbd, QEMU's luks driver (aes-256-xts-plain64) over its rbd driver
Workloads: 4k randread/randwrite QD32, 128k seq read/write QD8, numjobs=1.
Order: ABBA over repetitions (use an even --reps).
Server CPU is utime+stime of the server process (its librbd threads included) over the
fio run, per I/O; the OSD's CPU is not counted for anyone.

Usage: tools/rbd-compare.py [--workdir DIR] [--size 512M] [--runtime S] [--ramp S] [--reps N] [--out FILE]
Needs: target/release/sealdisk, fio, qemu-nbd and qemu-img with the rbd block module
(qemu-block-extra), rbd/ceph (ceph-common), ceph-mon/mgr/osd.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEALDISK = os.path.join(ROOT, "target", "release", "sealdisk")
CLUSTER = os.path.join(ROOT, "tools", "ceph-cluster.sh")
CLK = os.sysconf("SC_CLK_TCK")
WORKLOADS = {
    "randread": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "seqread": ["--rw=read", "--bs=128k", "--iodepth=8"],
    "seqwrite": ["--rw=write", "--bs=128k", "--iodepth=8"],
}
TARGETS = ["sd-plain", "sd-enc", "q-rbdluks", "q-luks"]


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {r.stderr}")
    return r


def size_bytes(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sealdisk-rbd-compare"))
    ap.add_argument("--size", default="512M")
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--ramp", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out")
    a = ap.parse_args()
    workloads = {w: WORKLOADS[w] for w in a.workloads.split(",")}
    size = size_bytes(a.size)
    for tool in ("fio", "qemu-nbd", "qemu-img", "rbd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if not os.path.exists(SEALDISK):
        sys.exit(f"{SEALDISK} missing: cargo build --release")
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
        p = subprocess.Popen(["taskset", "-c", str(srv_cpu), SEALDISK, "serve", "--data-dir", data,
                              "--cores", str(srv_cpu), "--no-qos", "--backend", "rbd", "--ceph-conf", conf,
                              "--rbd-pool", "rbd"], stderr=open(os.path.join(w, "sealdisk.log"), "w"))
        procs.append(p)
        for _ in range(300):
            if os.path.exists(os.path.join(data, "sealdisk.sock")):
                break
            time.sleep(0.1)

        def sd(*args):
            out = run([SEALDISK, *args, "--data-dir", data, "--json", "--account", "bench",
                       "--region", "local-1"]).stdout
            return json.loads(out) if out.strip() else {}
        sd("activate-kms")
        inst = sd("create-instance", "SystemDisk.SizeBytes=4194304")["InstanceId"]
        uris = {}
        for name, enc in (("sd-plain", "false"), ("sd-enc", "true")):
            d = sd("create-disk", f"SizeBytes={size}", f"Encrypted={enc}", "DiskCategory=ssd")["DiskId"]
            sd("attach-disk", f"DiskId={d}", f"InstanceId={inst}")
            uris[name] = f"nbd+unix:///{d}?socket={os.path.join(data, 'nbd.sock')}"
        pw = os.path.join(w, "pass")
        with open(os.open(pw, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("peer-bench-passphrase")
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
        srv_pid = {"sd-plain": p.pid, "sd-enc": p.pid, **qpid}
        for name in TARGETS:
            log(f"filling {name}")
            run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uris[name]}", "--rw=write", "--bs=1M",
                 "--iodepth=8", f"--size={size}", f"--cpus_allowed={fio_cpu}", "--output-format=json"])
        res = {}
        for rep in range(a.reps):
            for wl, wopts in workloads.items():
                for t in (TARGETS if rep % 2 == 0 else TARGETS[::-1]):
                    log(f"rep {rep + 1} {wl} {t}")
                    pid = srv_pid[t]
                    c0 = cpu_ticks(pid)
                    t0 = time.time()
                    out = run(["fio", f"--name={wl}", "--numjobs=1", "--time_based=1", f"--runtime={a.runtime}",
                               f"--ramp_time={a.ramp}", f"--size={size}", "--norandommap=1", "--randrepeat=0",
                               f"--cpus_allowed={fio_cpu}", *wopts, "--ioengine=nbd", f"--uri={uris[t]}",
                               "--output-format=json"]).stdout
                    wall = time.time() - t0
                    cpu = (cpu_ticks(pid) - c0) / CLK
                    j = json.loads(out[out.index("{"):])["jobs"][0]
                    d = j["write"] if "write" in wl else j["read"]
                    pc = d["clat_ns"].get("percentile", {})
                    ios_wall = d["iops"] * wall
                    res.setdefault((wl, t), []).append({
                        "iops": d["iops"], "mibs": d["bw_bytes"] / 2**20,
                        "p50": pc.get("50.000000", 0) / 1000, "p99": pc.get("99.000000", 0) / 1000,
                        "srv_us": cpu / ios_wall * 1e6 if ios_wall else None, "err": j["error"],
                    })
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
        v = [r[k] for r in res.get((wl, t), []) if r[k] is not None]
        return sum(v) / len(v) if v else None

    def f(x, n=0):
        return "n/a" if x is None else f"{x:,.{n}f}"
    L = [f"# RBD comparison ({time.strftime('%Y-%m-%d %H:%M')}, {a.reps} reps x {a.runtime}s, {a.size} images, "
         f"servers on cpu {srv_cpu}, fio on cpu {fio_cpu}, single-node memstore cluster)", "",
         "| workload | target | IOPS | MiB/s | p50 us | p99 us | server CPU us/IO |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for wl in workloads:
        for t in TARGETS:
            L.append(f"| {wl} | {t} | {f(avg(wl, t, 'iops'))} | {f(avg(wl, t, 'mibs'), 1)} | {f(avg(wl, t, 'p50'), 1)} | "
                     f"{f(avg(wl, t, 'p99'), 1)} | {f(avg(wl, t, 'srv_us'), 1)} |")
    L += ["", "| workload | sd-enc IOPS / best peer | sd-enc CPU/IO / best peer's | sd-enc / sd-plain IOPS |",
          "|---|---:|---:|---:|"]
    for wl in workloads:
        peers = [t for t in ("q-rbdluks", "q-luks") if avg(wl, t, "iops")]
        best = max(peers, key=lambda t: avg(wl, t, "iops")) if peers else None
        e, pl = avg(wl, "sd-enc", "iops"), avg(wl, "sd-plain", "iops")
        r1 = f"{e / avg(wl, best, 'iops'):.2f} ({best})" if best and e else "n/a"
        cb, ce = (avg(wl, best, "srv_us") if best else None), avg(wl, "sd-enc", "srv_us")
        r2 = f"{ce / cb:.2f}" if cb and ce else "n/a"
        r3 = f"{e / pl:.3f}" if e and pl else "n/a"
        L.append(f"| {wl} | {r1} | {r2} | {r3} |")
    errs = [(k, r["err"]) for k, v in res.items() for r in v if r["err"]]
    L += ["", f"fio errors: {errs or 'none'}"]
    text = "\n".join(L) + "\n"
    print(text)
    if a.out:
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
