#!/usr/bin/env python
"""Benchmark the grouping kernel (lorakern.grouping) against the torch code it replaces, on a GPU.

    python bench/bench_grouping.py [--quick] [--json out.json]

Two groupings, each made by its torch ops (LORAKERN_GROUP_KERNEL=0: what the Triton-only install and the cuda
backend past 4096 items run) and by one launch of the grouping kernel, eager (host time included: what a plain
PyTorch or HF call pays) and replayed from a CUDA graph (what an engine that captures its step pays):

* ``plan``: a static LoRAPlan refilled with ``update(slots, ranks)``, once per batch (every layer shares it);
* ``moe``: ``add_lora_moe``'s (token, expert) pair grouping at Qwen3-30B-A3B's E = 128, top-8, once per MoE layer
  and step (a layer's routing is its own).

Every kernel result is first checked against the torch code's, bit for bit; a difference skips the row and says
so. Without a GPU it prints that nothing was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

try:
    import lorakern  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakern import grouping
from lorakern import moe_grouping as mg
from lorakern.plan import LoRAPlan


def _with_kernel(on: bool, fn):
    old = os.environ.get("LORAKERN_GROUP_KERNEL")
    os.environ["LORAKERN_GROUP_KERNEL"] = "1" if on else "0"
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("LORAKERN_GROUP_KERNEL")
        else:
            os.environ["LORAKERN_GROUP_KERNEL"] = old


def _plan_state(plan):
    return [plan.token_ids, plan.seg_starts, plan.seg_slots, plan.counts, plan.num_segments, *plan._tiles.values()]


def bench(quick: bool) -> list:
    if not torch.cuda.is_available():
        print("grouping: no CUDA GPU on this machine — nothing measured")
        return []
    from lorakern.bench.harness import measure, measure_graph

    dev = torch.device("cuda")
    if grouping.kernel_for(dev) is None:
        print("grouping: the grouping kernel cannot run here (no CUDA extension for this GPU) — nothing measured")
        return []
    g = torch.Generator().manual_seed(1)
    E, topk = 128, 8
    rows = []
    print(f"grouping on {torch.cuda.get_device_name(dev)}: torch ops vs one launch (eager: host time included; "
          "graph: a replay)")
    print(f"    {'what':5s} {'T':>5s} {'items':>6s} {'how':7s} {'eager_us':>9s} {'graph_us':>9s}")
    for what in ("plan", "moe"):
        for T in ((16, 256) if quick else (1, 16, 64, 256, 512)):
            S = T
            slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32).to(dev)
            ranks = torch.randint(8, 65, (S,), generator=g, dtype=torch.int32).to(dev)
            if what == "plan":
                plan = LoRAPlan.static(T, device=dev)
                items = T

                def fn(plan=plan, slots=slots, ranks=ranks):
                    plan.update(slots, ranks)

                def result(plan=plan, slots=slots, ranks=ranks):
                    plan.update(slots, ranks)
                    return [t.clone() for t in _plan_state(plan)]
            else:
                ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]).to(dev)
                n_max = mg.max_tiles(T * topk, S * E, 16)
                items = T * topk

                def fn(slots=slots, ids=ids, ranks=ranks, n_max=n_max, S=S):
                    kernel = grouping.kernel_for(dev)  # (the current stream: a graph captures on its own)
                    if kernel is None:
                        return mg._group_torch(slots, ids, E, S, 16, ranks, n_max)
                    return mg._group_kernel(kernel, slots, ids, E, S, 16, ranks, n_max)

                def result(fn=fn):
                    return [t.clone() for t in fn()[:3]]
            same = all(torch.equal(a, b) for a, b in zip(_with_kernel(False, result), _with_kernel(True, result)))
            for how, on in (("torch", False), ("kernel", True)):
                base = dict(op=f"group-{what}", how=how, T=T, items=items)
                if not same:
                    print(f"    {what:5s} {T:5d} {items:6d} {how:7s} skipped: the kernel's result differs")
                    rows.append(dict(base, skipped="the kernel's result differs from the torch code's"))
                    continue
                eager = _with_kernel(on, lambda: measure(fn, device=dev, warmup=5, reps=50))
                graph = _with_kernel(on, lambda: measure_graph(fn, device=dev, warmup=5, reps=50))
                print(f"    {what:5s} {T:5d} {items:6d} {how:7s} {eager.median_us:9.1f} {graph.median_us:9.1f}")
                rows.append(dict(base, eager_us=eager.median_us, graph_us=graph.median_us))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two batch sizes")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    rows = bench(args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()
                                               if torch.cuda.is_available() else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
