"""fio runs shared by tools/nbd-compare.py and tools/rbd-compare.py: the workloads, the
interleaved (ABBA) measuring loop, a server's CPU per I/O, and the averages the reports
print."""
import argparse, json, os, subprocess, sys, time

CLK = os.sysconf("SC_CLK_TCK")
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
WORKLOADS = {
    "randread": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "seqread": ["--rw=read", "--bs=128k", "--iodepth=8"],
    "seqwrite": ["--rw=write", "--bs=128k", "--iodepth=8"],
}


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    """Runs cmd; its output, or exit with its stderr when it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))}: exit {r.returncode}: {r.stderr}")
    return r


def cpu_ticks(pid):
    """utime + stime of process pid, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def size_bytes(text):
    """'2G', '512M', '1073741824' -> bytes (at least 64 MiB, a multiple of 1 MiB)."""
    t = text.strip().upper()
    try:
        n = int(t[:-1]) * SIZE_UNITS[t[-1]] if t[-1] in SIZE_UNITS else int(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"size {text!r}: use a number with K, M, G or T")
    if n < 64 << 20 or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"size {text!r}: at least 64M, a multiple of 1M")
    return n


def nbd(uri):
    """fio's arguments for an NBD export."""
    return ["--ioengine=nbd", f"--uri={uri}"]


def fill(name, target, size, cpu):
    """Writes the whole target once (1 MiB writes, 8 in flight)."""
    log(f"filling {name}")
    run(["fio", "--name=fill", *target, "--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}",
         f"--cpus_allowed={cpu}", "--output-format=json"])


def measure(wl, target, pid, size, runtime, ramp, cpu):
    """One time-based fio run of workload wl on target (fio arguments), fio on cpu; the
    server process pid's CPU time (None: no server) over the run's wall time, per I/O."""
    c0 = cpu_ticks(pid) if pid else 0
    t0 = time.time()
    out = run(["fio", f"--name={wl}", "--numjobs=1", "--time_based=1", f"--runtime={runtime}",
               f"--ramp_time={ramp}", f"--size={size}", "--norandommap=1", "--randrepeat=0",
               f"--cpus_allowed={cpu}", *WORKLOADS[wl], *target, "--output-format=json"]).stdout
    wall = time.time() - t0
    srv = (cpu_ticks(pid) - c0) / CLK if pid else None
    j = json.loads(out[out.index("{"):])["jobs"][0]
    d = j["write"] if "write" in wl else j["read"]
    pc = d["clat_ns"].get("percentile", {})
    # The server's CPU covers the ramp too: scale to the I/Os of the whole wall time.
    ios_wall = d["iops"] * wall
    return {
        "iops": d["iops"], "mibs": d["bw_bytes"] / 2**20,
        "p50": pc.get("50.000000", 0) / 1000, "p99": pc.get("99.000000", 0) / 1000,
        "srv_us": srv / ios_wall * 1e6 if srv is not None and ios_wall else None,
        "err": j["error"], "ios": d["total_ios"] or 1, "cli": j["usr_cpu"] + j["sys_cpu"],
    }


def abba(reps, workloads, targets):
    """(rep, workload, target) in measuring order: for each rep and workload every target,
    reversed on odd reps (so a host slowing down during a workload does not always hit the
    same targets; use an even number of reps)."""
    for rep in range(reps):
        for wl in workloads:
            for t in (targets if rep % 2 == 0 else targets[::-1]):
                yield rep, wl, t


def measure_all(a, workloads, targets, one):
    """Every run of abba(): {(workload, target): [one(workload, target) rows]}, one()
    returning measure()'s row. a: the parsed arguments (reps)."""
    res = {}
    for rep, wl, t in abba(a.reps, workloads, targets):
        log(f"rep {rep + 1} {wl} {t}")
        res.setdefault((wl, t), []).append(one(wl, t))
    return res


def fio_runs(a, fio_args, pids, cpu):
    """measure_all()'s one() for fio targets: fio_args and server pids per target."""
    return lambda wl, t: measure(wl, fio_args[t], pids.get(t), a.size, a.runtime, a.ramp, cpu)


def avg(res, wl, t, k):
    v = [r[k] for r in res.get((wl, t), []) if r[k] is not None]
    return sum(v) / len(v) if v else None


def rep_ratios(res, wl, a, b, k="iops"):
    """Per-rep a/b of k in workload wl (the reps of a and b ran next to each other)."""
    return [x[k] / y[k] for x, y in zip(res.get((wl, a), []), res.get((wl, b), [])) if x[k] and y[k]]


def spread(v):
    """'median (min..max)' of v, or 'n/a'."""
    if not v:
        return "n/a"
    s = sorted(v)
    m = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    return f"{m:.2f} ({s[0]:.2f}..{s[-1]:.2f})"


def fmt(x, n=0):
    return "n/a" if x is None else f"{x:,.{n}f}"


def errors(res):
    return [(k, r["err"]) for k, v in res.items() for r in v if r["err"]]


def table(res, workloads, targets, client=False):
    """The per-target markdown table (client: with fio's own CPU column)."""
    head = "| workload | target | IOPS | MiB/s | p50 us | p99 us | server CPU us/IO |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if client:
        head, rule = head + " client CPU % |", rule + "---:|"
    lines = [head, rule]
    for wl in workloads:
        for t in targets:
            g = lambda k: avg(res, wl, t, k)
            row = (f"| {wl} | {t} | {fmt(g('iops'))} | {fmt(g('mibs'), 1)} | {fmt(g('p50'), 1)} | "
                   f"{fmt(g('p99'), 1)} | {fmt(g('srv_us'), 1)} |")
            lines.append(row + (f" {fmt(g('cli'))} |" if client else ""))
    return lines


def write_json(path, a, res, workloads, targets, keys, **extra):
    """The averaged figures (and the run's settings, errors and extra) as JSON."""
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "reps": a.reps, "runtime": a.runtime, "ramp": a.ramp,
           "size": a.size, **extra, "errors": [f"{k[0]} {k[1]}: {e}" for k, e in errors(res)],
           "figures": {wl: {t: {k: avg(res, wl, t, k) for k in keys} for t in targets if (wl, t) in res}
                       for wl in workloads},
           "runs": {wl: {t: [{k: r[k] for k in keys} for r in res[wl, t]] for t in targets if (wl, t) in res}
                    for wl in workloads}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
