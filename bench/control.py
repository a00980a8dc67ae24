#!/usr/bin/env python3
"""Issue 14's targets in every saved full run, for wsgate and for the references that only move
bytes (the control): the tokio byte proxy (`tokiocopy`) in (a) and (b), `pooledcopy` in (c).

Reads the reports `bench/compare.sh` wrote (bench/results/stopNN-runM.md, then latest-run1.md
and latest.md, oldest first) and prints, per run, each target as wsgate measured it and as the
control measured it in the same run, then how often each was met. A target the control misses
in a run was not to be had on the host in that run, whatever the middle does.

Usage: python3 bench/control.py [RESULTS_DIR]
"""
import glob
import os
import re
import sys

RESULTS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")


def order(path):
    m = re.search(r"stop(\d+)-run(\d+)\.md$", path)
    return (int(m.group(1)), int(m.group(2))) if m else (10**6, 0 if path.endswith("latest-run1.md") else 1)


def section(text, head):
    i = text.find(head)
    if i < 0:
        return ""
    j = text.find("\n### ", i + len(head))
    return text[i:j if j > 0 else None]


def cell(sec, target, col):
    m = re.search(r"^\| " + re.escape(target) + r" \|(.*)$", sec, re.M)
    return m.group(1).split("|")[col].strip() if m else None


def num(s):
    return float(s.replace(",", "").replace("x", ""))


def speedups(text, pattern):
    m = re.search(pattern, text)
    return [num(x) for x in m.group(1).split(", ")] if m else None


def targets(text, target):
    """(a) ratio, (b) added p50 over nginx's (us), (b) p99 ratio of `target` against nginx."""
    a, b = section(text, "### (a)"), section(text, "### (b) Latency")
    ev = {t: num(cell(a, t, 0)) for t in ("nginx", target)}
    p50 = {t: num(cell(b, t, 0).split("/")[0]) for t in ("nginx", target, "direct")}
    p99 = {t: num(cell(b, t, 0).split("/")[1]) for t in ("nginx", target)}
    return ev[target] / ev["nginx"], (p50[target] - p50["direct"]) - (p50["nginx"] - p50["direct"]), p99[target] / p99["nginx"]


rows = []
for path in sorted(glob.glob(os.path.join(RESULTS, "stop*-run*.md")) + [os.path.join(RESULTS, f) for f in ("latest-run1.md", "latest.md")], key=order):
    if not os.path.exists(path):
        continue
    text = open(path).read()
    try:
        ws, ref = targets(text, "wsgate"), targets(text, "tokiocopy")
    except (TypeError, ValueError, AttributeError):
        continue  # a report from before the byte proxy ran beside the others
    ws_c = speedups(text, r"\(c\) reconnect-every-turn speed-up >= 5x in every repeat \| ([0-9.x, ]+) \|")
    ref_c = speedups(text, r"`pooledcopy`, the least a pooled middle can do, ([0-9.x, ]+) in the same repeats")
    rows.append((os.path.basename(path), ws, ws_c, ref, ref_c))


def verdicts(t, c):
    return [t[0] >= 1.0, t[1] <= 25, t[2] <= 1.3, None if not c else min(c) >= 5]


def show(t, c):
    met = verdicts(t, c)
    yn = lambda x: "-" if x is None else ("yes" if x else "NO")
    return [f"{yn(met[0])} {t[0]:.2f}x", f"{yn(met[1])} {t[1]:+.0f} us", f"{yn(met[2])} {t[2]:.2f}x",
            "-" if c is None else f"{yn(met[3])} {min(c):.2f}x"]


print("| run | wsgate (a) | (b) p50 over nginx | (b) p99 | (c) slowest repeat "
      "| control (a) | (b) p50 over nginx | (b) p99 | (c) slowest repeat |")
print("|---|" + "---|" * 8)
for name, ws, ws_c, ref, ref_c in rows:
    print(f"| {name} | " + " | ".join(show(ws, ws_c) + show(ref, ref_c)) + " |")
print()
names = ["(a) >= 1.0x nginx", "(b) p50 <= nginx + 25 us", "(b) p99 <= 1.3x nginx", "(c) >= 5x every repeat"]
for who, (t_i, c_i) in (("wsgate", (1, 2)), ("control", (3, 4))):
    met = [verdicts(r[t_i], r[c_i]) for r in rows]
    counts = []
    for i, name in enumerate(names):
        vals = [m[i] for m in met if m[i] is not None]
        counts.append(f"{name} {sum(vals)} of {len(vals)}")
    both = [m for m in met if m[3] is not None]
    all4 = [all(m) for m in both]
    pairs = sum(1 for x, y in zip(all4, all4[1:]) if x and y)
    print(f"{who}: " + "; ".join(counts) + f"; all four {sum(all4)} of {len(all4)}, "
          f"two consecutive runs meeting all four: {pairs}")
