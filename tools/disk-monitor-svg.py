#!/usr/bin/env python3
"""Draw a disk's IOPS and latency over time as an SVG chart (Python 3 standard library only).

Input (a file, or - for stdin), one of:
  * DescribeDiskMonitorData output: the reply of
      sealdisk describe-disk-monitor-data --json DiskId=d-... StartTime=... EndTime=... Period=60
    (a JSON-RPC response holding it in "result" works too), or several replies, one per
    line, as `sealdisk disk-stats DiskId=d-... --watch --json` prints them;
  * a series of Prometheus scrapes of `serve --metrics`, each preceded by a line
    `# TIME <unix seconds>`:
      while sleep 1; do echo "# TIME $(date +%s)"; curl -s http://127.0.0.1:9100/metrics; done > scrapes.txt
    (rates and latencies come from the differences between consecutive scrapes; p99 is
    interpolated within the latency histogram's buckets, as Prometheus does).

Output: an SVG with two panels: read/write IOPS, and read/write latency (mean, and p99
dashed) in microseconds.

  python3 tools/disk-monitor-svg.py monitor.json -o disk.svg
  python3 tools/disk-monitor-svg.py scrapes.txt --disk d-0123456789abcdef -o disk.svg
"""

import argparse
import datetime
import json
import math
import re
import sys
from xml.sax.saxutils import escape


class InputError(Exception):
    pass


def parse_time(s):
    try:
        return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError as e:
        raise InputError(f"TimeStamp {s!r}: {e}") from None


def points_from_json(text):
    """Datapoints (dicts with t, riops, wiops, rlat, wlat, rp99, wp99) and the disk id."""
    docs = []
    stripped = text.strip()
    try:
        docs.append(json.loads(stripped))
    except json.JSONDecodeError:
        for n, line in enumerate(stripped.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"line {n}: not JSON ({e})") from None
    points, disk = [], None
    for d in docs:
        if isinstance(d, dict) and "result" in d:
            d = d["result"]
        if isinstance(d, dict) and "error" in d:
            raise InputError(f"the input is an error reply: {d['error']}")
        try:
            dps = d["MonitorData"]["DiskMonitorData"]
        except (KeyError, TypeError):
            raise InputError("JSON without MonitorData.DiskMonitorData: not DescribeDiskMonitorData output") from None
        for p in dps:
            disk = disk or p.get("DiskId")
            points.append(
                {
                    "t": parse_time(p["TimeStamp"]),
                    "riops": float(p["IOPSRead"]),
                    "wiops": float(p["IOPSWrite"]),
                    "rlat": float(p["LatencyRead"]),
                    "wlat": float(p["LatencyWrite"]),
                    "rp99": float(p.get("LatencyReadP99", 0)),
                    "wp99": float(p.get("LatencyWriteP99", 0)),
                }
            )
    points.sort(key=lambda p: p["t"])
    return points, disk or (docs and isinstance(docs[0], dict) and docs[0].get("DiskId")) or "?"


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_scrapes(text):
    """[(time, {(name, frozenset(labels)): value})]"""
    scrapes, cur = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("# TIME "):
            try:
                cur = (float(line[7:].strip()), {})
            except ValueError:
                raise InputError(f"line {n}: # TIME wants unix seconds") from None
            scrapes.append(cur)
            continue
        if not line.strip() or line.startswith("#"):
            continue
        if cur is None:
            raise InputError(f"line {n}: a sample before the first '# TIME <unix seconds>' line")
        m = SAMPLE.match(line)
        if not m:
            raise InputError(f"line {n}: not a sample line: {line!r}")
        labels = frozenset(LABEL.findall(m.group(2) or ""))
        v = m.group(3)
        cur[1][(m.group(1), labels)] = math.inf if v == "+Inf" else float(v)
    return scrapes


def quantile(q, buckets):
    """histogram_quantile over [(le, cumulative count)]."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return 0.0
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def points_from_scrapes(text, disk):
    scrapes = parse_scrapes(text)
    if len(scrapes) < 2:
        raise InputError("need at least two scrapes (each after a '# TIME <unix seconds>' line)")
    if disk is None:
        for _, s in scrapes:
            for name, labels in s:
                if name == "sealdisk_disk_ops_total":
                    disk = dict(labels).get("disk")
                    break
            if disk:
                break
    if disk is None:
        raise InputError("no sealdisk_disk_ops_total series in the scrapes (is a disk attached?)")

    def get(s, name, **want):
        key = (name, frozenset(dict(want, disk=disk).items()))
        return s.get(key, 0.0)

    def buckets(s, op):
        out = []
        for (name, labels), v in s.items():
            d = dict(labels)
            if name == "sealdisk_disk_latency_seconds_bucket" and d.get("disk") == disk and d.get("op") == op:
                out.append((math.inf if d["le"] == "+Inf" else float(d["le"]), v))
        return out

    points = []
    for (t0, a), (t1, b) in zip(scrapes, scrapes[1:]):
        dt = t1 - t0
        if dt <= 0:
            raise InputError(f"scrape times go backwards or repeat ({t0} then {t1})")
        p = {"t": t0}
        for op, k in (("read", "r"), ("write", "w")):
            dops = get(b, "sealdisk_disk_ops_total", op=op) - get(a, "sealdisk_disk_ops_total", op=op)
            dcnt = get(b, "sealdisk_disk_latency_seconds_count", op=op) - get(
                a, "sealdisk_disk_latency_seconds_count", op=op
            )
            dsum = get(b, "sealdisk_disk_latency_seconds_sum", op=op) - get(
                a, "sealdisk_disk_latency_seconds_sum", op=op
            )
            p[k + "iops"] = max(dops, 0.0) / dt
            p[k + "lat"] = dsum / dcnt * 1e6 if dcnt > 0 else 0.0
            ba = dict(buckets(a, op))
            db = [(le, c - ba.get(le, 0.0)) for le, c in buckets(b, op)]
            p[k + "p99"] = quantile(0.99, db) * 1e6
        points.append(p)
    return points, disk


def nice_max(v):
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def fmt(v):
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


COLORS = {"read": "#1f77b4", "write": "#d62728"}


def panel(x0, y0, w, h, t0, t1, series, ylabel):
    """series: [(label, color, dashed, [(t, v)])]"""
    ymax = nice_max(max([v for _, _, _, pts in series for _, v in pts] + [0]))
    span = (t1 - t0) or 1.0
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    for i in range(6):
        v = ymax * i / 5
        y = y0 + h - h * i / 5
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{fmt(v)}</text>')
    for i in range(5):
        t = t0 + span * i / 4
        x = x0 + w * i / 4
        label = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S")
        out.append(f'<text x="{x:.1f}" y="{y0 + h + 16}" text-anchor="middle" font-size="11">{label}</text>')
    out.append(
        f'<text x="{x0 - 48}" y="{y0 + h / 2}" font-size="12" transform="rotate(-90 {x0 - 48} {y0 + h / 2})" '
        f'text-anchor="middle">{escape(ylabel)}</text>'
    )
    for n, (label, color, dashed, pts) in enumerate(series):
        if pts:
            coords = " ".join(
                f"{x0 + w * (t - t0) / span:.1f},{y0 + h - h * min(v, ymax) / ymax:.1f}" for t, v in pts
            )
            dash = ' stroke-dasharray="5,3"' if dashed else ""
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{coords}"/>')
        lx = x0 + 10 + 150 * n
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        out.append(f'<line x1="{lx}" y1="{y0 + 12}" x2="{lx + 20}" y2="{y0 + 12}" stroke="{color}"{dash}/>')
        out.append(f'<text x="{lx + 24}" y="{y0 + 16}" font-size="11">{escape(label)}</text>')
    return out


def render(points, disk, title=None):
    if not points:
        raise InputError("no datapoints to draw (was the disk attached and sampled in that range?)")
    t0, t1 = points[0]["t"], points[-1]["t"]
    W, H = 900, 560
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title or "disk " + disk)}</text>',
    ]
    s = lambda key: [(p["t"], p[key]) for p in points]
    out += panel(
        80, 40, 780, 200, t0, t1, [("read IOPS", COLORS["read"], False, s("riops")), ("write IOPS", COLORS["write"], False, s("wiops"))], "IOPS"
    )
    out += panel(
        80,
        300,
        780,
        200,
        t0,
        t1,
        [
            ("read mean", COLORS["read"], False, s("rlat")),
            ("write mean", COLORS["write"], False, s("wlat")),
            ("read p99", COLORS["read"], True, s("rp99")),
            ("write p99", COLORS["write"], True, s("wp99")),
        ],
        "latency (µs)",
    )
    out.append(f'<text x="{W / 2}" y="{H - 14}" text-anchor="middle" font-size="11">time (UTC)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("input", help="DescribeDiskMonitorData JSON (or JSON lines), or a scrape series; - for stdin")
    ap.add_argument("-o", "--output", help="SVG file (default stdout)")
    ap.add_argument("--disk", help="disk id to draw from a scrape series (default: the first one)")
    ap.add_argument("--title", help="chart title")
    a = ap.parse_args(argv)
    try:
        text = sys.stdin.read() if a.input == "-" else open(a.input, encoding="utf-8").read()
    except OSError as e:
        print(f"disk-monitor-svg: {e}", file=sys.stderr)
        return 2
    try:
        if text.lstrip()[:1] in ("{", "["):
            points, disk = points_from_json(text)
        else:
            points, disk = points_from_scrapes(text, a.disk)
        svg = render(points, disk, a.title)
    except InputError as e:
        print(f"disk-monitor-svg: {a.input}: {e}", file=sys.stderr)
        return 1
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(svg)
    else:
        sys.stdout.write(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
