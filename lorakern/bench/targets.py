"""Issue #3's performance targets, checked against a recorded benchmark run (``python -m lorakern targets RUN.json``).

The targets (bf16, H100/H200, medians of a benchmark, never of a timed test):

* decode — ``decode-qkv``: 256 tokens × 256 distinct adapters, r = 16, K = 4096, qkv slices: **≥ 80 %** of the copy
  bandwidth measured in the same run, counting the fewest bytes the op must move;
* prefill — ``prefill``: 8192 tokens × 16 adapters, r = 64, K = N = 4096: **≥ 70 %**;
* mixed ranks 8-128 in one batch: time proportional to the real ranks, not the max. Read here as bandwidth: the
  bytes a case must move grow with its real ranks, so proportional time means the mixed batch runs at the same
  share of the copy bandwidth as the same batch at one fixed rank (``mixed-ranks-qkv`` against ``rank-64-qkv``,
  whose rank is near the mixed batch's mean, 67); **≥ 90 %** of it is taken as proportional;
* each of them **≥ 1.5×** this package's Triton backend on the same shape in the same run.

Each target is judged on the best lorakern compiled backend row of the case (``cuda``, or a variant such as
``cuda-fused`` when the run has it) and on three times: the kernel time (the profiler's kernel durations, L2
flushed), the CUDA-graph replay time and the eager median. The table says which time passes; the closing note of
the issue should quote the kernel and the graph numbers. Rows of the slot-order twins (``*-slot-order``) are
compared with the default rank order when both are present. Nothing here measures: it reads a results JSON
(DESIGN.md §6 format) written by ``python -m lorakern bench``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

__all__ = ["Target", "TARGETS", "check", "format_report", "add_arguments", "main"]

#: the three times a row may carry: (row key prefix, label)
_TIMES = (("kernel", "kernel"), ("graph", "graph"), ("", "eager"))


class Target:
    def __init__(self, name: str, case: str, workload: str, min_pct: Optional[float], vs: Optional[str] = None,
                 min_rel: Optional[float] = None):
        self.name, self.case, self.workload = name, case, workload
        self.min_pct, self.vs, self.min_rel = min_pct, vs, min_rel


#: (target, case name, workload, least % of copy bandwidth; or a case to compare with and the least ratio of shares)
TARGETS = (
    Target("decode: >= 80 % of copy bandwidth", "decode-qkv", "distinct", 80.0),
    Target("prefill: >= 70 % of copy bandwidth", "prefill", "uniform", 70.0),
    Target("mixed ranks: bandwidth share >= 90 % of the fixed-rank batch's", "mixed-ranks-qkv", "distinct", None,
           vs="rank-64-qkv", min_rel=0.9),
)
MIN_VS_TRITON = 1.5
_COMPILED = ("cuda", "cuda-fused", "cuda-gather", "cuda-segment")


def _time(row: dict, key: str) -> Optional[float]:
    v = row.get(f"{key}_us" if key else "median_us")
    return float(v) if v else None


def _pct(row: dict, key: str) -> Optional[float]:
    v = row.get(f"{key}_pct_peak" if key else "pct_peak")
    return float(v) if v is not None else None


def _rows(doc: dict, case: str, workload: str) -> dict:
    """backend -> row of one case (timed rows only)."""
    out = {}
    for r in doc.get("rows", []):
        if r.get("case") == case and r.get("workload") == workload and not r.get("skipped") and r.get("median_us"):
            out[r["backend"]] = r
    return out


def _best(rows: dict, key: str):
    """The fastest lorakern compiled row by time ``key`` (None when none has it)."""
    timed = [(t, b) for b in _COMPILED if b in rows and (t := _time(rows[b], key))]
    return min(timed)[1] if timed else None


def check(doc: dict) -> list:
    """One dict per (target, time): target, time, backend, value, needed, passed (None: not in the run), and the
    ratio to Triton with its verdict; then the rank-order comparison rows (kind ``order``)."""
    results = []
    for tg in TARGETS:
        rows = _rows(doc, tg.case, tg.workload)
        ref = _rows(doc, tg.vs, tg.workload) if tg.vs else {}
        for key, label in _TIMES:
            res = {"kind": "target", "target": tg.name, "time": label, "backend": None, "value": None,
                   "needed": tg.min_pct if tg.min_pct is not None else tg.min_rel, "passed": None,
                   "vs_triton": None, "vs_triton_passed": None}
            b = _best(rows, key)
            if b is not None:
                res["backend"] = b
                pct = _pct(rows[b], key)
                if tg.min_pct is not None:
                    res["value"] = pct
                    res["passed"] = pct is not None and pct >= tg.min_pct
                else:
                    rb = _best(ref, key)
                    ref_pct = _pct(ref[rb], key) if rb is not None else None
                    if pct is not None and ref_pct:
                        res["value"] = round(pct / ref_pct, 3)
                        res["passed"] = res["value"] >= tg.min_rel
                tri = rows.get("triton")
                if tri is not None and _time(tri, key):
                    res["vs_triton"] = round(_time(tri, key) / _time(rows[b], key), 2)
                    res["vs_triton_passed"] = res["vs_triton"] >= MIN_VS_TRITON
            results.append(res)
    # the plan's tile order: each *-slot-order case against its rank-order twin
    cases = {(r.get("case"), r.get("workload")) for r in doc.get("rows", [])}
    for case, workload in sorted(c for c in cases if c[0] and c[0].endswith("-slot-order")):
        twin = case[: -len("-slot-order")]
        slot_rows, rank_rows = _rows(doc, case, workload), _rows(doc, twin, workload)
        for b in sorted(set(slot_rows) & set(rank_rows)):
            for key, label in _TIMES[:2]:
                ts, tr = _time(slot_rows[b], key), _time(rank_rows[b], key)
                if ts and tr:
                    results.append({"kind": "order", "case": twin, "backend": b, "time": label, "slot_us": ts,
                                    "rank_us": tr, "speedup": round(ts / tr, 3)})
    return results


def _fmt(v, digits=1):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def format_report(doc: dict, results: list) -> str:
    head = (f"issue #3 targets on {doc.get('device', '?')}, commit {doc.get('commit', '?')}, "
            f"copy bandwidth {_fmt(doc.get('peak_copy_gbps'))} GB/s")
    lines = [head, "",
             "| target | time | backend | value | needed | | vs triton | >= 1.5x |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] != "target":
            continue
        verdict = {True: "PASS", False: "fail", None: "not in run"}[r["passed"]]
        vt = {True: "PASS", False: "fail", None: "-"}[r["vs_triton_passed"]]
        lines.append(f"| {r['target']} | {r['time']} | {r['backend'] or '-'} | {_fmt(r['value'], 2)} | "
                     f"{_fmt(r['needed'], 2)} | {verdict} | {_fmt(r['vs_triton'], 2)} | {vt} |")
    order = [r for r in results if r["kind"] == "order"]
    if order:
        lines += ["", "| tile order: case | backend | time | slot order us | rank order us | speedup |",
                  "|---|---|---|---|---|---|"]
        for r in order:
            lines.append(f"| {r['case']} | {r['backend']} | {r['time']} | {_fmt(r['slot_us'])} | "
                         f"{_fmt(r['rank_us'])} | {_fmt(r['speedup'], 3)} |")
    lines += ["", "value: % of the copy bandwidth (mixed ranks: the ratio of the two cases' shares); backend: the "
              "fastest lorakern compiled row of the case for that time"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a results JSON written by `python -m lorakern bench`")


def main(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(Path(args.run).read_text())
    except (OSError, ValueError) as e:
        print(f"targets: cannot read {args.run}: {e}")
        return 2
    print(format_report(doc, check(doc)))
    return 0
