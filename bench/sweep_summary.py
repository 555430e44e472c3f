"""The summary of a tuning sweep (bench/sweep_variants.sh writes $OUT/sweep-<variant>.json, then runs this):

    python bench/sweep_summary.py OUT VARIANT...

One line per (variant, case): graph time, summed kernel time, and whether the result checked. Then, for each
variant with at least two rows of the decode family (the same 256 x 256 distinct qkv batch at ranks 8, 16, 64,
128, ...: ``lorakern.bench.targets.DECODE_FAMILY``), the line ``time = fixed + bytes / rate`` through them, on
the kernel and on the graph times: a variant that shortens the rank-independent part (per-CTA latency chains,
the first and last waves) moves ``fixed``; one that streams the rank rows faster moves ``rate``; and the
mixed-ranks batch's excess over that line (one CTA's critical path: its own streaming rate). On the H100 at
3a57e06 the default decode kernel fitted 15.4 us + bytes at 2.72 TB/s (92 % of copy), so decode's 80 % target
at r = 16 hinges on ``fixed`` (docs/cuda.md).
"""

from __future__ import annotations

import json
import os
import sys

from lorakern.bench.targets import DECODE_FAMILY, _lsq


def _family_case(label: str):
    """The decode-family case a profile label belongs to (``"rank-8-qkv distinct T=256 ..."``), else None."""
    head = label.split(" ", 1)
    if len(head) == 2 and head[0] in DECODE_FAMILY and head[1].startswith("distinct "):
        return head[0]
    return None


def _kernel_us(r: dict) -> float:
    """A row's kernel time: the flushed median (``kernel_us``, profile_add_lora.py since session 9), else the sum
    of its one profiled call's kernels."""
    k = r.get("kernel_us")
    return float(k) if k and k == k else sum(t for _, t in r["kernels"])


def fit(rows: list, key: str):
    """(fixed us, rate GB/s, points) of ``time = fixed + bytes / rate`` over the decode-family rows of one variant
    (``key``: ``"graph"`` or ``"kernels"``), or None with fewer than two distinct sizes or a wrong result."""
    pts = []
    for r in rows:
        if _family_case(r["case"]) is None or r.get("wrong") or not r.get("bytes"):
            continue
        t = r["graph_us"] if key == "graph" else _kernel_us(r)
        if t and t == t:  # (not NaN)
            pts.append((r["bytes"] / 1e3, t))  # kB / us = GB/s
    if len({x for x, _ in pts}) < 2:
        return None
    fixed, slope = _lsq(pts)
    if slope <= 0:
        return None
    return fixed, 1.0 / slope, len(pts)


def excess(rows: list, key: str, f) -> "float | None":
    """``mixed-ranks-qkv``'s time over what the fit ``f`` (:func:`fit`) predicts from its bytes, in % (its
    mix's cost: at 3a57e06, +26 %, the critical path of one rank-128 CTA), or None without a checked row."""
    for r in rows:
        if r["case"].startswith("mixed-ranks-qkv distinct ") and not r.get("wrong") and r.get("bytes"):
            t = r["graph_us"] if key == "graph" else _kernel_us(r)
            pred = f[0] + r["bytes"] / 1e3 / f[1]
            return 100.0 * (t / pred - 1.0) if t and pred > 0 else None
    return None


def summary(out: str, names: list) -> str:
    lines = [f"{'variant':<20} {'case':<58} {'graph us':>9} {'kernels us':>11}  check"]
    fits = []
    for n in names:
        p = os.path.join(out, f"sweep-{n}.json")
        if not os.path.exists(p):
            lines.append(f"{n:<20} (no result)")
            continue
        rows = json.load(open(p))
        for r in rows:
            ks = _kernel_us(r)
            check = "WRONG " + r["wrong"] if r["wrong"] else "ok"
            lines.append(f"{n:<20} {r['case'][:58]:<58} {r['graph_us']:9.1f} {ks:11.1f}  {check}")
        for key in ("kernels", "graph"):
            f = fit(rows, key)
            if f is not None:
                mixed = excess(rows, key, f)
                fits.append(f"{n:<20} {key:<8} {f[0]:9.1f} {f[1]:10.1f} {f[2]:7d} "
                            + (f"{mixed:+14.1f}" if mixed is not None else f"{'-':>14}"))
    if fits:
        lines += ["", "decode family: time = fixed + bytes / rate (fixed: every call, whatever the rank; rate: "
                  "streaming); mixed ranks: mixed-ranks-qkv's time over what the fit predicts from its bytes",
                  f"{'variant':<20} {'time':<8} {'fixed us':>9} {'rate GB/s':>10} {'points':>7} {'mixed ranks %':>14}"]
        lines += fits
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    print(summary(sys.argv[1], sys.argv[2:]))
