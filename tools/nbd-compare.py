#!/usr/bin/env python3
"""Issue 6 figures: sealdisk's NBD export against qemu-nbd (raw and LUKS) and
against fio's io_uring engine on the raw file, in one interleaved run.

Targets (all 2 GiB, filled once before measuring):
  file     fio ioengine=io_uring direct=1 on a raw image file   (the ceiling)
  sd-plain fio ioengine=nbd -> sealdisk serve, plaintext disk
  sd-enc   fio ioengine=nbd -> sealdisk serve, encrypted disk (AES-256-XTS)
  q-raw    fio ioengine=nbd -> qemu-nbd --cache=none, raw image
  q-luks   fio ioengine=nbd -> qemu-nbd --cache=none, QEMU LUKS1 image (aes-256-xts-plain64)
  nbd-null fio ioengine=nbd -> nbdkit null (no storage at all): what fio's nbd client and the
           unix socket can carry on their own, the ceiling of any NBD server here
Workloads: 4k randread/randwrite QD32, 128k seq read/write QD8, numjobs=1.
Order: for rep, for workload: file, sd-plain, sd-enc, q-raw, q-luks, nbd-null; reversed on
every other rep (ABBA), so use an even --reps.
Placement (like ../shared/peer/qemu-luks-nbd.sh): servers (one sealdisk reactor,
qemu-nbd) on the CPU that does not take the disk's completion interrupts, fio on
the other; --servers-on-irq-cpu swaps them (the servers reap their own completions where
the interrupt lands, fio, the file's too, runs on the other CPU). Server CPU is utime+stime of the server process over the fio run;
client CPU is fio's usr_cpu+sys_cpu (% of its one core).

Usage: tools/nbd-compare.py [--workdir DIR] [--runtime S] [--ramp S] [--reps N] [--out FILE]
                            [--size SIZE] [--targets T,..] [--workloads W,..] [--sealdisk BIN] [--json FILE]
                            [--servers-on-irq-cpu]
--sealdisk BIN (or $SEALDISK) uses that binary instead of building target/release/sealdisk;
--json FILE also writes the averaged figures as JSON (for tools/bench-report.sh).
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

from fiolib import WORKLOADS, errors, fill as fill_target, fio_runs, measure_all, nbd, run, size_bytes, table, write_json
from fiolib import avg as avg_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEALDISK = os.path.join(ROOT, "target", "release", "sealdisk")
TARGETS = ["file", "sd-plain", "sd-enc", "q-raw", "q-luks", "nbd-null"]


def irq_cpu():
    """The CPU taking the block device's completion interrupts, if one."""
    try:
        for line in open("/proc/interrupts"):
            if "-req" in line or "nvme" in line:
                counts = [int(x) for x in line.split()[1:1 + os.cpu_count()] if x.isdigit()]
                if counts and max(counts) > 0:
                    return counts.index(max(counts))
    except OSError:
        pass
    return 0


def sd(data_dir, *args):
    out = run([SEALDISK, *args, "--data-dir", data_dir, "--json", "--account", "bench", "--region", "local-1"]).stdout
    return json.loads(out) if out.strip() else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sealdisk-nbd-compare"))
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--ramp", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--size", default=size_bytes("2G"), type=size_bytes)
    ap.add_argument("--servers-on-irq-cpu", action="store_true",
                    help="servers on the CPU taking the disk's interrupts, fio on the other")
    ap.add_argument("--out", default=None)
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of " + ",".join(WORKLOADS))
    ap.add_argument("--spin-us", type=int, default=None,
                    help="sealdisk serve --spin-us (default: the daemon's)")
    ap.add_argument("--sealdisk", default=os.environ.get("SEALDISK"),
                    help="the sealdisk binary (default: build target/release/sealdisk)")
    ap.add_argument("--json", default=None, help="also write the averaged figures to this file as JSON")
    a = ap.parse_args()
    global SEALDISK
    targets = [t for t in TARGETS if t in a.targets.split(",")]
    workloads = {k: v for k, v in WORKLOADS.items() if k in a.workloads.split(",")}
    if not targets or not workloads:
        sys.exit(f"nothing to run: --targets from {TARGETS}, --workloads from {list(WORKLOADS)}")
    need = ["fio"]
    if {"file", "q-raw", "q-luks"} & set(targets):
        need += ["qemu-nbd", "qemu-img"]
    if "nbd-null" in targets:
        need.append("nbdkit")
    for tool in need:
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install fio qemu-utils nbdkit)")
    if a.sealdisk:
        SEALDISK = os.path.abspath(a.sealdisk)
        if not os.access(SEALDISK, os.X_OK):
            sys.exit(f"--sealdisk {a.sealdisk}: not an executable file")
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(ROOT, "Cargo.toml")],
                       check=True)
    fio_cpu = irq_cpu()
    srv_cpu = 1 - fio_cpu if os.cpu_count() >= 2 and fio_cpu in (0, 1) else (fio_cpu + 1) % os.cpu_count()
    if a.servers_on_irq_cpu:
        fio_cpu, srv_cpu = srv_cpu, fio_cpu
    w = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    procs = []

    def cleanup(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    try:
        # --- sealdisk: one reactor on the server CPU, no QoS caps.
        data = os.path.join(w, "sd")
        p = subprocess.Popen([SEALDISK, "serve", "--data-dir", data, "--cores", str(srv_cpu), "--no-qos",
                              "--pool-size", str(max(8 << 30, 3 * a.size + (1 << 30))),
                              *([] if a.spin_us is None else ["--spin-us", str(a.spin_us)])], stderr=open(os.path.join(w, "sealdisk.log"), "w"))
        procs.append(p)
        for _ in range(100):
            if os.path.exists(os.path.join(data, "sealdisk.sock")):
                break
            time.sleep(0.1)
        sd(data, "activate-kms")
        inst = sd(data, "create-instance")["InstanceId"]
        disks = {}
        for name, enc in (("sd-plain", "false"), ("sd-enc", "true")):
            d = sd(data, "create-disk", f"SizeBytes={a.size}", f"Encrypted={enc}", "DiskCategory=ssd")["DiskId"]
            sd(data, "attach-disk", f"DiskId={d}", f"InstanceId={inst}")
            disks[name] = f"nbd+unix:///{d}?socket={os.path.join(data, 'nbd.sock')}"
        # --- qemu-nbd raw and LUKS, pinned to the server CPU.
        raw, luks, pw = (os.path.join(w, n) for n in ("raw.img", "luks.img", "pass"))
        with open(os.open(pw, os.O_WRONLY | os.O_CREAT, 0o600), "w") as pf:
            pf.write("peer-bench-passphrase")
        run(["qemu-img", "create", "-q", "-f", "raw", raw, str(a.size)])
        run(["qemu-img", "create", "-q", "-f", "luks", "--object", f"secret,id=sec0,file={pw},format=raw",
             "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256", luks, str(a.size)])
        qsock = {"q-raw": os.path.join(w, "raw.sock"), "q-luks": os.path.join(w, "luks.sock")}
        qpid = {}
        for name, args in (("q-raw", ["-f", "raw", raw]),
                           ("q-luks", ["--object", f"secret,id=sec0,file={pw},format=raw", "--image-opts",
                                       f"driver=luks,key-secret=sec0,file.driver=file,file.filename={luks}"])):
            pidf = os.path.join(w, name + ".pid")
            run(["taskset", "-c", str(srv_cpu), "qemu-nbd", "--fork", f"--pid-file={pidf}", "--persistent",
                 "--shared=4", "-k", qsock[name], "--cache=none", "--aio=io_uring", *args])
            qpid[name] = int(open(pidf).read())
        uris = dict(disks)
        for name in qsock:
            uris[name] = f"nbd+unix:///?socket={qsock[name]}"
        null_sock = os.path.join(w, "null.sock")
        nk = subprocess.Popen(["taskset", "-c", str(srv_cpu), "nbdkit", "--foreground", "-U", null_sock,
                               "null", f"size={a.size}"])
        procs.append(nk)
        for _ in range(100):
            if os.path.exists(null_sock):
                break
            time.sleep(0.1)
        uris["nbd-null"] = f"nbd+unix:///?socket={null_sock}"
        srv_pid = {"sd-plain": p.pid, "sd-enc": p.pid, **qpid, "nbd-null": nk.pid, "file": None}
        # --- fill every target once (allocates sealdisk clusters, real ciphertext everywhere).
        # (the file target reads q-raw's image, so it needs that fill too)
        fill = set(targets) | ({"q-raw"} if "file" in targets else set())
        fio_args = {t: nbd(u) for t, u in uris.items()}
        fio_args["file"] = ["--ioengine=io_uring", "--direct=1", f"--filename={raw}"]
        for name in [t for t in ["sd-plain", "sd-enc", "q-raw", "q-luks"] if t in fill]:
            fill_target(name, fio_args[name], a.size, fio_cpu)
        # --- measure.
        res = measure_all(a, workloads, targets, fio_runs(a, fio_args, {t: p for t, p in srv_pid.items() if p}, fio_cpu))
    finally:
        cleanup()
        for pid in (qpid if "qpid" in dir() else {}).values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def avg(wl, t, k):
        return avg_of(res, wl, t, k)
    L = [f"# NBD export comparison ({time.strftime('%Y-%m-%d %H:%M')}, {a.reps} reps x {a.runtime}s, "
         f"servers on cpu {srv_cpu}, fio on cpu {fio_cpu})", "", *table(res, workloads, targets, client=True)]
    L += ["", "| workload | sd-enc / q-luks | sd-enc / sd-plain | sd-enc / file | sd-plain / q-raw |", "|---|---:|---:|---:|---:|"]
    def r(wl, x, y, n):
        a_, b_ = avg(wl, x, "iops"), avg(wl, y, "iops")
        return f"{a_ / b_:.{n}f}" if a_ and b_ else "n/a"
    for wl in workloads:
        L.append(f"| {wl} | {r(wl, 'sd-enc', 'q-luks', 2)} | {r(wl, 'sd-enc', 'sd-plain', 3)} | "
                 f"{r(wl, 'sd-enc', 'file', 3)} | {r(wl, 'sd-plain', 'q-raw', 2)} |")
    errs = errors(res)
    L += ["", f"fio errors: {errs or 'none'}"]
    text = "\n".join(L) + "\n"
    print(text)
    if a.out:
        open(a.out, "w").write(text)
    if a.json:
        write_json(a.json, a, res, workloads, targets, ("iops", "mibs", "p50", "p99", "srv_us", "cli"),
                   server_cpu=srv_cpu, fio_cpu=fio_cpu)

if __name__ == "__main__":
    main()
