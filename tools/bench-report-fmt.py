#!/usr/bin/env python3
"""Formats the machine-readable output of the per-area benchmark scripts as the markdown
tables of docs/benchmarks.md, one function per area; called by tools/bench-report.sh.

    bench-report-fmt.py AREA TARGETS_TSV INPUT...

Prints the area's table(s) on stdout and appends the area's targets (issue, target,
figure, verdict) to TARGETS_TSV; `targets` prints those as the doc's last table.
"""
import json
import re
import statistics
import sys

from fiolib import spread

med = statistics.median


def verdict(value, op, threshold):
    """'met' or '**not met**' for `value op threshold`; 'not measured' without a value."""
    if value is None:
        return "not measured"
    ok = value >= threshold if op == ">=" else value <= threshold
    return "met" if ok else "**not met**"


class Targets:
    def __init__(self, path):
        self.path = path

    def add(self, issue, target, figure, value, op, threshold):
        with open(self.path, "a") as f:
            f.write("\t".join([str(issue), target, figure, verdict(value, op, threshold)]) + "\n")


def k(x):
    """81,600 -> '81.6k' (vhost table style); small figures as they are."""
    return f"{x / 1000:.1f}k" if x >= 10000 else (f"{x / 1000:.2f}k" if x >= 1000 else f"{x:.0f}")


# --- crypto: `sealdisk bench crypto --json` ---------------------------------------------
def crypto(tg, path):
    r = json.load(open(path))
    res = {(x["kernel"], x["direction"], x["sector_size"]): x for x in r["results"]}
    base = {(b["name"], b.get("sector_size")): b["gb_per_s"] for b in r["baselines"]}
    rounds = len(next(iter(r["results"]), {}).get("rounds_gb_per_s", []))
    print(f"512- against 4096-byte sectors, medians of {rounds} rounds (range), GB/s = 10^9 bytes/s "
          f"({r['cpu']}, {r['buffer_bytes'] // 1024} KiB buffer):\n")
    print("| kernel | direction | 512 | 4096 | 512 / 4096 (per-round range) | 512 / 4096 on CPU time |")
    print("|---|---|---:|---:|---:|---:|")
    for q in r["ratios"]:
        cell = []
        for ss in (512, 4096):
            x = res[(q["kernel"], q["direction"], ss)]
            v = x["rounds_gb_per_s"]
            cell.append(f"{x['median_gb_per_s']:.2f} ({min(v):.2f}..{max(v):.2f})")
        print(f"| {q['kernel']} | {q['direction']} | {cell[0]} | {cell[1]} | {q['median_512_over_4096']:.3f} "
              f"({q['round_min']:.3f}..{q['round_max']:.3f}) | {q['cpu_median_512_over_4096']:.3f} |")
    print(f"\nEvery kernel against the baselines, best of {rounds} rounds:\n")
    print("| kernel | direction | sector | GB/s | × ECB | × OpenSSL (same size) |")
    print("|---|---|---:|---:|---:|---:|")
    ossl = lambda ss: base.get(("openssl-xts", ss))
    for (kern, d, ss), x in res.items():
        o = ossl(ss)
        vs = "not measured" if not o else f"{x['gb_per_s'] / o:.2f}"
        print(f"| {kern} | {d} | {ss} | {x['gb_per_s']:.2f} | {x['vs_ecb']:.2f} | {vs} |")
    ecb = base.get(("aes-ecb", None))
    print(f"| baseline aes-ecb | | | {ecb:.2f} | 1.00 | |")
    for b in r["baselines"]:
        if b["name"] != "aes-ecb":
            print(f"| baseline {b['name']} | {b.get('direction', '')} | {b.get('sector_size', '')} | "
                  f"{b['gb_per_s']:.2f} | {b['gb_per_s'] / ecb:.3f} | |")
    v = lambda d, ss: res.get(("vaes-avx2", d, ss))
    e4, e5 = v("encrypt", 4096), v("encrypt", 512)
    tg.add(2, "VAES ≥ 0.92× ECB at 4096", f"{e4['vs_ecb']:.2f}×" if e4 else "no VAES",
           e4 and e4["vs_ecb"], ">=", 0.92)
    tg.add(2, "VAES ≥ 0.85× ECB at 512", f"{e5['vs_ecb']:.2f}×" if e5 else "no VAES",
           e5 and e5["vs_ecb"], ">=", 0.85)
    o4 = ossl(4096)
    x = e4["gb_per_s"] / o4 if e4 and o4 else None
    tg.add(2, "VAES ≥ 1.8× OpenSSL at 4096", f"{x:.2f}×" if x else "not measured", x, ">=", 1.8)
    a = [res[("aesni", "encrypt", ss)]["gb_per_s"] / ossl(ss) for ss in (512, 4096)
         if ("aesni", "encrypt", ss) in res and ossl(ss)]
    tg.add(2, "AES-NI ≥ OpenSSL (512 / 4096)", " / ".join(f"{y:.2f}×" for y in a) or "not measured",
           min(a) if a else None, ">=", 1.0)
    rv = [q["median_512_over_4096"] for q in r["ratios"] if q["kernel"] == "vaes-avx2"]
    tg.add(23, "XTS 512-byte sectors ≥ 0.85× 4096", " / ".join(f"{y:.3f}" for y in rv) or "no VAES",
           min(rv) if rv else None, ">=", 0.85)


# --- cpu: `sealdisk bench io --compare --output-format json` on null and malloc ----------
def cpu(tg, null_bounce, null_inplace, ram_bounce, ram_inplace):
    import time
    print("| backend | write buffers | run | plain ns/IO | encrypted ns/IO | extra | cipher (job's buffers) | cipher (one hot buffer) | extra / cipher | per-round median |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    got = {}
    for name, bufs, path in (("null", "bounce", null_bounce), ("null", "in place", null_inplace),
                             ("RAM", "bounce", ram_bounce), ("RAM", "in place", ram_inplace)):
        top = json.load(open(path))
        q = top["sealdisk"]["ratios"]
        run = time.strftime("%Y-%m-%d %H:%M", time.gmtime(top.get("timestamp", 0)))
        b = q["busy_ns_per_io"]
        rm = q.get("round_median", {}).get("extra_over_cipher")
        got[name, bufs] = q.get("extra_over_cipher")
        nm = lambda x, f: "not measured" if x is None else f.format(x)
        print(f"| {name} | {bufs} | {run} | {b['plain']:,.0f} | {b['encrypted']:,.0f} | "
              f"{nm(q.get('extra_ns_per_io'), '{:,.0f} ns')} | {nm(q.get('cipher_ns_per_io'), '{:,.0f} ns')} | "
              f"{nm(q.get('cipher_hot_ns_per_io'), '{:,.0f} ns')} | {nm(got[name, bufs], '{:.2f}')} | {nm(rm, '{:.2f}')} |")
    fmt = lambda x: "not measured" if x is None else f"{x:.2f}"
    tg.add(3, "RAM: extra ≤ 1.25× the cipher (bounce)", fmt(got["RAM", "bounce"]), got["RAM", "bounce"], "<=", 1.25)
    for bufs in ("bounce", "in place"):
        n, r = got["null", bufs], got["RAM", bufs]
        worst = None if None in (n, r) else max(n, r)
        tg.add(23, f"data path extra ≤ 1.10× the cipher (null, RAM; {bufs})", f"null {fmt(n)}, RAM {fmt(r)}",
               worst, "<=", 1.10)


# --- file: the markdown table tools/datapath-compare.sh prints --------------------------
def file(tg, table):
    rows = {}
    for line in open(table):
        if line.startswith("|"):
            print(line.rstrip("\n"))
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            if re.match(r"^(rand)?(read|write) ", c[0]):
                rows[c[0].split()[0]] = {"plain/fio": float(c[3]), "enc/plain": float(c[5]),
                                         "p99": float(c[6])}
    if not rows:
        return
    pf = [r["plain/fio"] for r in rows.values()]
    tg.add(3, "`bench io` plain ≥ 0.95× fio on the file", " / ".join(f"{x:.3f}" for x in pf), min(pf), ">=", 0.95)
    four = [rows[w]["enc/plain"] for w in ("randread", "randwrite") if w in rows]
    tg.add(3, "encrypted ≥ 0.97× plain at 4k (file)", " / ".join(f"{x:.3f}" for x in four),
           min(four) if four else None, ">=", 0.97)
    p = [rows[w]["p99"] for w in ("randread", "randwrite") if w in rows]
    tg.add(3, "p99 encrypted ≤ 1.05× plain at 4k (file)", " / ".join(f"{x:.3f}" for x in p),
           max(p) if p else None, "<=", 1.05)
    big = [rows[w]["enc/plain"] for w in ("read", "write") if w in rows]
    tg.add(3, "encrypted ≥ 0.9× plain at 128k (file)", " / ".join(f"{x:.3f}" for x in big),
           min(big) if big else None, ">=", 0.9)


# --- nbd: tools/nbd-compare.py --json ---------------------------------------------------
NBD_ROWS = (("randread", "4k randread QD32"), ("randwrite", "4k randwrite QD32"),
            ("seqread", "128k read QD8"), ("seqwrite", "128k write QD8"))


def nbd(tg, path):
    r = json.load(open(path))
    fig = r["figures"]
    print(f"{r['date']}, {r['reps']} reps × {r['runtime']} s, IOPS (server CPU µs per I/O):\n")
    print("| workload | encrypted | plain | qemu-nbd + LUKS | fio on the file | enc / plain | enc / peer | enc / file |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for wl, label in NBD_ROWS:
        if wl not in fig:
            continue
        f = fig[wl]
        iops = lambda t: (f.get(t) or {}).get("iops")

        def cell(t):
            x = f.get(t)
            if not x or x["iops"] is None:
                return "not measured"
            return f"{x['iops']:,.0f}" + (f" ({x['srv_us']:.1f})" if x.get("srv_us") is not None else "")

        def ratio(a, b, n):
            x, y = iops(a), iops(b)
            ratios[(wl, a, b)] = x / y if x and y else None
            return f"{x / y:.{n}f}" if x and y else "not measured"
        print(f"| {label} | {cell('sd-enc')} | {cell('sd-plain')} | {cell('q-luks')} | {cell('file')} | "
              f"{ratio('sd-enc', 'sd-plain', 3)} | {ratio('sd-enc', 'q-luks', 2)} | {ratio('sd-enc', 'file', 3)} |")
    if r["errors"]:
        print(f"\nfio errors: {'; '.join(r['errors'])}")
    g = lambda wl, a, b: ratios.get((wl, a, b))
    fmt = lambda v: " / ".join("n/a" if x is None else f"{x:.2f}" for x in v)

    def worst(v, fn):
        v = [x for x in v if x is not None]
        return fn(v) if v else None
    v = [g(w, "sd-enc", "q-luks") for w in ("randread", "randwrite")]
    tg.add(6, "NBD encrypted ≥ 3× qemu-nbd LUKS at 4k", f"read / write {fmt(v)}", worst(v, min), ">=", 3.0)
    v = [g(w, "sd-enc", "q-luks") for w in ("seqread", "seqwrite")]
    tg.add(6, "NBD encrypted ≥ 2.5× qemu-nbd LUKS at 128k", f"read / write {fmt(v)}", worst(v, min), ">=", 2.5)
    v = [g(w, "sd-enc", "sd-plain") for w, _ in NBD_ROWS]
    tg.add(23, "encrypted ≥ 0.95× plain on every NBD workload", fmt(v), worst(v, min), ">=", 0.95)
    v = [g(w, "sd-enc", "file") for w in ("seqread", "seqwrite")]
    tg.add(6, "NBD 128k ≥ 0.9× the file", f"read / write {fmt(v)}", worst(v, min), ">=", 0.9)
    x = g("randread", "sd-enc", "file")
    tg.add(23, "NBD 4k randread ≥ 0.9× fio on the file", fmt([x]), x, ">=", 0.9)


# --- vhost: tools/vhost-compare.sh --json, one file per job ------------------------------
def vhost(tg, *paths):
    labels = ["4k randread QD32×2", "4k randwrite QD32×2", "128k read QD8", "128k write QD8"]
    print("| job | encrypted | plain | qsd + LUKS | fio on the file | enc / plain | enc / peer | enc / file |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rr = {}
    for label, path in zip(labels, paths):
        r = json.load(open(path))
        t = r["targets"]

        def cell(name):
            x = t.get(name)
            if not x:
                return "not measured"
            c = x["cpu_ns_per_io_median"]
            return (f"{k(x['iops_median'])} ({k(min(x['iops']))}..{k(max(x['iops']))})"
                    + ("" if c is None else f", {c / 1000:.1f} µs"))

        def ratio(key):
            q = r["ratios"].get(key)
            rr[(label, key)] = q and q["iops"]
            if not q:
                return "not measured"
            return f"{q['iops']:.2f} (round median {q['iops_round_median']:.2f})"
        print(f"| {label} | {cell('encrypted')} | {cell('plain')} | {cell('qsd-luks')} | {cell('ceiling')} | "
              f"{ratio('encrypted/plain')} | {ratio('encrypted/peer')} | {ratio('encrypted/ceiling')} |")
    g = lambda i, key: rr.get((labels[i], key))
    fmt = lambda v: " / ".join("n/a" if x is None else f"{x:.2f}" for x in v)
    x = g(1, "encrypted/peer")
    tg.add(18, "vhost encrypted ≥ 3× qsd + LUKS at 4k randwrite", fmt([x]), x, ">=", 3.0)
    v = [g(2, "encrypted/peer"), g(3, "encrypted/peer")]
    tg.add(18, "vhost ≥ 2× the peer at 128k", fmt(v), None if None in v else min(v), ">=", 2.0)
    x = g(0, "encrypted/ceiling")
    tg.add(18, "vhost 4k randread ≥ 0.9× the file", fmt([x]), x, ">=", 0.9)
    v = [g(i, "encrypted/plain") for i in range(4)]
    tg.add(23, "encrypted ≥ 0.95× plain on every vhost workload", fmt(v),
           None if None in v else min(v), ">=", 0.95)


# --- volume: `bench io --output-format json` per round, and its first-write line --------
def volume(tg, rounds_dir):
    import glob
    import os
    print("| 4 KiB, QD32 | IOPS median (range) | reactor busy ns/IO median (range) | first write into a fresh cluster, p50 (range over rounds) |")
    print("|---|---:|---:|---:|")
    for be, rw, label in (("volume", "randwrite", "volume randwrite"), ("volume", "randread", "volume randread"),
                          ("malloc", "randwrite", "`malloc` randwrite (no volume)"),
                          ("malloc", "randread", "`malloc` randread (no volume)")):
        iops, busy, p50 = [], [], []
        for j in sorted(glob.glob(os.path.join(rounds_dir, f"{be}-{rw}-*.json"))):
            job = json.load(open(j))["jobs"][0]
            iops.append(job["read"]["iops"] + job["write"]["iops"])
            busy.append(job["sealdisk"]["reactor_busy_ns_per_io"])
            err = open(j[:-5] + ".err").read()
            m = re.search(r"first writes into fresh clusters: \d+ at QD1, .*p50 ([\d.]+) us", err)
            if m:
                p50.append(float(m.group(1)))
        if not iops:
            continue
        fw = f"{med(p50):.0f} µs ({min(p50):.0f}–{max(p50):.0f})" if p50 else ""
        print(f"| {label} | {med(iops):,.0f} ({min(iops):,.0f}–{max(iops):,.0f}) | "
              f"{med(busy):,.0f} ({min(busy):,.0f}–{max(busy):,.0f}) | {fw} |")


# --- iostat: tools/iostat-cost.sh --json ------------------------------------------------
def iostat(tg, path):
    r = json.load(open(path))
    run = f"{r['date']}, {r['rounds']} × {r.get('seconds', '?')} s"
    print("| run | backend | off | on | on − off per round, median (min..max) |")
    print("|---|---|---:|---:|---:|")
    for b, name in (("null", "null"), ("malloc", "RAM")):
        x = r["backends"][b]
        rng = lambda v: f"{min(v):,.1f}..{max(v):,.1f}"
        print(f"| {run} | {name} | {x['off_median']:,.1f} ns ({rng(x['off_ns'])}) | {x['on_median']:,.1f} ns "
              f"({rng(x['on_ns'])}) | {x['diff_median']:+,.1f} ns ({min(x['diff_ns']):+,.1f}..{max(x['diff_ns']):+,.1f}) |")
    d = r["backends"]["null"]["diff_median"]
    tg.add(19, "statistics layer ≤ 30 ns per I/O (null)", f"{d:+.1f} ns", d, "<=", 30.0)


# --- migrate: tools/migrate-bench.sh -j -------------------------------------------------
def migrate(tg, path):
    r = json.load(open(path))
    runs = r["runs"]
    names = {"sd": "`sealdisk migrate` into a new encrypted disk", "sd-verify": "`sealdisk migrate --verify`",
             "luks": "`qemu-img convert -n` into qemu-nbd + LUKS (`--cache=none`)",
             "luks-tz": "the same with `--target-is-zero` (holes not written)",
             "raw": "`qemu-img convert` raw → raw (page cache, not durable)",
             "raw-direct": "`qemu-img convert -t none` raw → raw (O_DIRECT)"}
    print(f"{r['date']}, {r['gib']} GiB image, {r['rounds']} rounds:\n")
    print("| target | median s | MiB/s | runs (s) |")
    print("|---|---:|---:|---|")
    m = {}
    for t, label in names.items():
        v = runs.get(t) or []
        if not v:
            print(f"| {label} | not measured | | |")
            continue
        m[t] = med(v)
        print(f"| {label} | {m[t]:.2f} | {r['gib'] * 1024 / m[t]:.0f} | {' '.join(f'{x:.2f}' for x in v)} |")
    if "sd" in m:
        x = m["luks"] / m["sd"] if "luks" in m else None
        tg.add(21, "migrate ≥ 2× `qemu-img convert -n` into qemu-nbd LUKS", f"{x:.2f}×" if x else "n/a", x, ">=", 2.0)
        x = m["raw"] / m["sd"] if "raw" in m else None
        y = m["raw-direct"] / m["sd"] if "raw-direct" in m else None
        tg.add(21, "migrate ≥ 0.8× `qemu-img convert` raw → raw (buffered)", f"{x:.2f}×" if x else "n/a", x, ">=", 0.8)
        tg.add(21, "migrate ≥ 0.8× `qemu-img convert -t none` raw → raw", f"{y:.2f}×" if y else "n/a", y, ">=", 0.8)


# --- rbd: tools/rbd-compare.py --json ---------------------------------------------------
RBD_TARGETS = (("sd-plain", "sealdisk plain"), ("sd-enc", "sealdisk encrypted"),
               ("sd-enc-stock", "sealdisk encrypted, librbd's stock settings"),
               ("q-rbdluks", "qemu-nbd, librbd LUKS2"), ("q-luks", "qemu-nbd, QEMU luks over rbd"),
               ("librbd", "librbd alone (`rbd bench`, no frontend, no cipher)"))


def rbd(tg, path):
    r = json.load(open(path))
    fig = r["figures"]
    print(f"{r['date']}, {r['reps']} reps × {r['runtime']} s, {r['size'] >> 20} MiB images, servers on CPU "
          f"{r['server_cpu']}, fio on CPU {r['fio_cpu']}; server CPU is the server process's utime+stime "
          "(librbd's threads included) per I/O:\n")
    print("| workload | target | IOPS | MiB/s | p50 µs | p99 µs | server CPU µs/I/O |")
    print("|---|---|---:|---:|---:|---:|---:|")
    n = lambda x, d=0: "n/a" if x is None else f"{x:,.{d}f}"
    for wl, label in NBD_ROWS:
        for t, name in RBD_TARGETS:
            x = fig.get(wl, {}).get(t)
            if x:
                print(f"| {label} | {name} | {n(x['iops'])} | {n(x['mibs'], 1)} | {n(x['p50'], 1)} | "
                      f"{n(x['p99'], 1)} | {n(x['srv_us'], 1)} |")
    print("\n| workload | encrypted IOPS / better peer | encrypted CPU per I/O / better peer's | "
          "encrypted / plain IOPS | CPU per I/O / stock settings' | librbd alone's CPU per I/O / better peer's | "
          "per rep: encrypted / better peer IOPS | per rep: encrypted / plain IOPS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    runs = r.get("runs", {})

    def per_rep(wl, a, b):
        ra, rb = runs.get(wl, {}).get(a, []), runs.get(wl, {}).get(b, [])
        return spread([x["iops"] / y["iops"] for x, y in zip(ra, rb) if x["iops"] and y["iops"]])
    iops_r, cpu_r, enc_r = [], [], []
    for wl, label in NBD_ROWS:
        f = fig.get(wl, {})
        g = lambda t, k: (f.get(t) or {}).get(k)
        peers = [t for t in ("q-rbdluks", "q-luks") if g(t, "iops")]
        best = max(peers, key=lambda t: g(t, "iops")) if peers else None
        e, pl = g("sd-enc", "iops"), g("sd-plain", "iops")
        ri = e / g(best, "iops") if best and e else None
        rc = g("sd-enc", "srv_us") / g(best, "srv_us") if best and g("sd-enc", "srv_us") and g(best, "srv_us") else None
        re_ = e / pl if e and pl else None
        rs = (g("sd-enc", "srv_us") / g("sd-enc-stock", "srv_us")
              if g("sd-enc", "srv_us") and g("sd-enc-stock", "srv_us") else None)
        fl = g("librbd", "srv_us") / g(best, "srv_us") if best and g("librbd", "srv_us") and g(best, "srv_us") else None
        iops_r.append(ri)
        cpu_r.append(rc)
        enc_r.append(re_)
        print(f"| {label} | {n(ri, 2)}" + (f" ({best})" if best else "") + f" | {n(rc, 2)} | {n(re_, 3)} | {n(rs, 2)} | {n(fl, 2)} | "
              f"{per_rep(wl, 'sd-enc', best) if best else 'n/a'} | {per_rep(wl, 'sd-enc', 'sd-plain')} |")
    if r["errors"]:
        print(f"\nfio errors: {'; '.join(r['errors'])}")
    fmt = lambda v: " / ".join("n/a" if x is None else f"{x:.2f}" for x in v)
    known = lambda v: [x for x in v if x is not None]
    tg.add(22, "RBD encrypted IOPS ≥ the better peer's on every workload", fmt(iops_r),
           min(known(iops_r)) if known(iops_r) else None, ">=", 1.0)
    tg.add(22, "RBD host CPU per I/O ≤ 0.5× the better peer's", fmt(cpu_r),
           max(known(cpu_r)) if known(cpu_r) else None, "<=", 0.5)
    tg.add(22, "RBD encrypted ≥ 0.95× plain", fmt(enc_r), min(known(enc_r)) if known(enc_r) else None, ">=", 0.95)


# --- targets: the rows the areas above appended -----------------------------------------
def targets(tg):
    rows = [line.rstrip("\n").split("\t") for line in open(tg.path) if line.strip()]
    if not rows:
        print("No target figures: no area ran, or every area that ran failed.")
        return
    print("| issue | target | figure | |")
    print("|---|---|---|---|")
    for issue, target, figure, v in sorted(rows, key=lambda r: int(r[0])):
        print(f"| {issue} | {target} | {figure} | {v} |")


AREAS = {"crypto": crypto, "cpu": cpu, "file": file, "nbd": nbd, "vhost": vhost, "volume": volume,
         "iostat": iostat, "migrate": migrate, "rbd": rbd, "targets": targets}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in AREAS:
        sys.exit(f"usage: {sys.argv[0]} AREA TARGETS_TSV INPUT... (AREA: {' '.join(AREAS)})")
    AREAS[sys.argv[1]](Targets(sys.argv[2]), *sys.argv[3:])
