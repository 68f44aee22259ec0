#!/usr/bin/env python3
"""A CPU flame graph as SVG from `perf script` output, with nothing to install.

    perf record -F 499 -g -p PID -o perf.data -- sleep 6
    perf script -i perf.data | python3 bench/flamegraph.py "title" [PATTERN...] > flame.svg

Stacks are folded by thread name, then frame by frame from the root; each
box is as wide as its share of the samples (hover for the count). Frames
narrower than 0.05 % are left out.
"""

import hashlib
import html
import re
import sys

WIDTH = 1200
ROW = 16
MIN_SHARE = 0.0005


def frames(lines):
    """Yield (thread name, [frames from root to leaf]) per sample."""
    comm, stack = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield comm, list(reversed(stack))
            comm, stack = None, []
        elif not line[0].isspace():
            # "confab 1234/1240 123.456: 2002 cycles:" (the comm may hold spaces)
            comm = re.split(r"\s+\d+(/\d+)?\s", line, maxsplit=1)[0].strip()
            stack = []
        else:
            parts = line.strip().split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            sym = re.sub(r"\s+\([^)]*\)$", "", sym)  # the (dso)
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
            stack.append(sym)
    if comm is not None:
        yield comm, list(reversed(stack))


def tree(samples):
    root = {"n": 0, "c": {}}
    for comm, stack in samples:
        node = root
        node["n"] += 1
        # Threads of a pool share a name; tokio's workers are one box.
        for name in [re.sub(r"[-_]?\d+$", "", comm)] + stack:
            node = node["c"].setdefault(name, {"n": 0, "c": {}})
            node["n"] += 1
    return root


def colour(name):
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16)
    if "[k]" in name or name.startswith(("__", "_raw", "tcp_", "ip_", "sys_", "do_")):
        return "rgb(%d,%d,%d)" % (230, 140 + h % 60, 60 + h % 40)
    return "rgb(%d,%d,%d)" % (220 + h % 35, 90 + h % 110, 40 + h % 50)


def render(title, root):
    total = max(root["n"], 1)
    boxes = []

    def walk(node, name, x, depth):
        share = node["n"] / total
        if share < MIN_SHARE:
            return
        boxes.append((name, x, depth, share, node["n"]))
        cx = x
        for child_name, child in sorted(node["c"].items()):
            walk(child, child_name, cx, depth + 1)
            cx += child["n"] / total

    x = 0.0
    for name, child in sorted(root["c"].items()):
        walk(child, name, x, 0)
        x += child["n"] / total
    depth = max((b[2] for b in boxes), default=0) + 1
    height = (depth + 3) * ROW
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
        'font-family="monospace" font-size="11">' % (WIDTH, height),
        '<rect width="100%" height="100%" fill="#fdfdf6"/>',
        '<text x="%d" y="16" font-size="14" font-family="sans-serif" '
        'text-anchor="middle">%s (%d samples)</text>'
        % (WIDTH / 2, html.escape(title), total),
    ]
    for name, x, d, share, n in boxes:
        w = share * WIDTH
        y = height - (d + 1) * ROW - 4
        label = name if len(name) * 7 < w else name[: max(int(w / 7) - 2, 0)]
        out.append(
            '<g><title>%s (%d samples, %.2f%%)</title>'
            '<rect x="%.2f" y="%d" width="%.2f" height="%d" fill="%s" stroke="white" '
            'stroke-width="0.5"/>%s</g>'
            % (
                html.escape(name),
                n,
                share * 100,
                x * WIDTH,
                y,
                w,
                ROW - 1,
                colour(name),
                '<text x="%.2f" y="%d">%s</text>' % (x * WIDTH + 2, y + 11, html.escape(label))
                if len(label) > 2
                else "",
            )
        )
    out.append("</svg>")
    return "\n".join(out)


def main():
    """flamegraph.py TITLE [PATTERN...]: the SVG on stdout; for each
    pattern (a regular expression), the share of samples with a frame that
    matches it, on stderr."""
    title = sys.argv[1] if len(sys.argv) > 1 else "CPU"
    samples = list(frames(sys.stdin))
    print(render(title, tree(samples)))
    for pattern in sys.argv[2:]:
        hits = sum(1 for _, stack in samples if any(re.search(pattern, f) for f in stack))
        print("%6.1f%%  %s" % (100 * hits / max(len(samples), 1), pattern), file=sys.stderr)


if __name__ == "__main__":
    main()
