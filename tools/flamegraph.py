#!/usr/bin/env python3
"""Fold `perf script` output and draw a flame graph as SVG (no external tools).

    perf script -i perf.data | tools/flamegraph.py > flame.svg
"""
import html
import sys
from collections import defaultdict


def fold(lines):
    """perf script prints a header line per sample, then one frame per line,
    leaf first, then a blank line. Returns {"comm;root;...;leaf": count}."""
    stacks = defaultdict(int)
    comm, frames = None, []

    def flush():
        if comm is not None:
            stacks[";".join([comm] + frames[::-1])] += 1

    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            flush()
            comm, frames = None, []
        elif not line[0].isspace():
            flush()
            comm, frames = line.split()[0], []
        else:
            parts = line.strip().split(None, 1)
            sym = (parts[1] if len(parts) > 1 else parts[0]).rsplit(" (", 1)[0].split("+0x")[0]
            frames.append(sym)
    flush()
    return stacks


def build(stacks):
    tree = {"name": "all", "value": 0, "children": {}}
    for stack, n in stacks.items():
        node = tree
        node["value"] += n
        for f in stack.split(";"):
            node = node["children"].setdefault(f, {"name": f, "value": 0, "children": {}})
            node["value"] += n
    return tree


def color(name):
    h = sum(ord(c) for c in name) % 60
    if "sealdisk" in name or "crypto" in name:
        return f"rgb({200 + h // 2},{90 + h},{40})"
    if name.startswith(("__", "io_", "blk", "ext4", "x64", "do_", "entry")):
        return f"rgb({70 + h},{140 + h},{200})"
    return f"rgb({220},{120 + h},{60 + h // 2})"


def svg(tree, width=1400, row=17):
    total = tree["value"] or 1
    rects = []

    def walk(node, x, depth):
        w = node["value"] / total * width
        if w < 0.3:
            return
        rects.append((x, depth, w, node["name"], node["value"]))
        cx = x
        for child in sorted(node["children"].values(), key=lambda c: c["name"]):
            walk(child, cx, depth + 1)
            cx += child["value"] / total * width

    walk(tree, 0, 0)
    depth = max(d for _, d, _, _, _ in rects) + 1
    height = depth * row + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">',
           '<rect width="100%" height="100%" fill="#fff"/>',
           f'<text x="5" y="15">flame graph: {total} samples (hover for names)</text>']
    for x, d, w, name, v in rects:
        y = height - (d + 1) * row
        label = html.escape(name)
        out.append(f'<g><title>{label} ({v} samples, {100 * v / total:.2f}%)</title>'
                   f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="{color(name)}"/>')
        if w > 40:
            chars = int(w / 7)
            out.append(f'<text x="{x + 3:.1f}" y="{y + row - 5}">{html.escape(name[:chars])}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


if __name__ == "__main__":
    print(svg(build(fold(sys.stdin))))
