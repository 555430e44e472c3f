"""``python -m lorakern plot RESULTS.json``: PNG plots of a recorded run (GB/s and % of the measured peak against
batch size, one plot per workload, one line per implementation), written beside the results under
``bench/results/``.

Plots are made from the recorded JSON, not during the run, so a borrowed GPU machine (offline, without
matplotlib) spends its time measuring and the plots are drawn afterwards on any machine. matplotlib is an
optional dependency: ``pip install -e ".[plot]"``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

__all__ = ["add_arguments", "main", "plot_results", "series"]


def series(doc: dict, case: str = "sweep") -> dict:
    """``{workload: {backend: [(T, gbps, pct_peak), ...]}}`` from the timed rows of ``case`` (sorted by T).
    Rows with a CUDA-graph replay time also give a ``"<backend> (graph)"`` series: the device time, without the
    Python call's host overhead that dominates the eager time of small batches."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in doc.get("rows", []):
        if r.get("skipped") or r.get("median_us") is None or r.get("case", case) != case:
            continue
        out[r["workload"]][r["backend"]].append((int(r["T"]), float(r["gbps"]), r.get("pct_peak")))
        if r.get("graph_gbps") is not None:
            out[r["workload"]][f"{r['backend']} (graph)"].append(
                (int(r["T"]), float(r["graph_gbps"]), r.get("graph_pct_peak")))
    return {w: {b: sorted(v) for b, v in bs.items()} for w, bs in out.items()}


def plot_results(json_path, out_dir=None, case: str = "sweep") -> list:
    """Write one PNG per workload of ``case``; returns their paths. Raises RuntimeError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError('plotting needs matplotlib: pip install -e ".[plot]"') from e
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    out_dir = Path(out_dir) if out_dir is not None else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    data = series(doc, case)
    if not data:
        raise ValueError(f"{json_path}: no timed rows of case {case!r} to plot")
    peak = doc.get("peak_copy_gbps")
    paths = []
    for workload, by_backend in sorted(data.items()):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for backend, pts in sorted(by_backend.items()):
            ts = [p[0] for p in pts]
            style = dict(marker="o", label=backend, linestyle="--" if backend.endswith("(graph)") else "-")
            ax1.plot(ts, [p[1] for p in pts], **style)
            if all(p[2] is not None for p in pts):
                ax2.plot(ts, [p[2] for p in pts], **style)
        for ax, ylabel in ((ax1, "GB/s (fewest bytes the op must move)"), (ax2, "% of measured copy bandwidth")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens in the batch (T)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        if peak:
            ax1.axhline(peak, color="gray", linestyle="--", linewidth=1, label=f"copy peak {peak:.0f} GB/s")
        ax2.set_ylim(0, 100)
        ax1.legend(fontsize=8)
        fig.suptitle(f"add_lora, {workload} — {doc.get('device', '?')}, commit {doc.get('commit', '?')}, "
                     f"{doc.get('date', '')}")
        fig.tight_layout()
        safe = workload.replace(":", "-").replace("/", "-")
        path = out_dir / f"{json_path.stem}-{case}-{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="a recorded run: bench/results/<device>-<date>-<commit>.json")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: beside the JSON)")
    p.add_argument("--case", default="sweep", help="which case's rows to plot against T (default: sweep)")


def main(args) -> int:
    try:
        paths = plot_results(args.results, args.out, args.case)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"lorakern plot: {e}")
        return 1
    for p in paths:
        print(p)
    return 0
