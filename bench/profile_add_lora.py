"""Where the time of one ``add_lora`` call goes, per backend, on a GPU (a tuning aid, not the recorded benchmark).

For each selected case of ``lorakern.bench.cases.full_cases`` (``--filter`` substrings of the case label) and each
backend (``--backends``, path variants such as ``cuda-segment`` allowed) it prints:

* ``eager``  — the benchmark's own number: CUDA events around one Python call, L2 flushed before it;
* ``graph``  — the same call captured once in a CUDA graph and replayed (L2 flushed before each replay): the
  device time without Python or launch overhead, which is what an engine that replays graphs sees;
* ``host``   — wall time per call of 200 back-to-back calls (no flush, one synchronisation at the end): the
  launch rate the host sustains;
* ``kernels`` — the kernels of one call with their device time (torch.profiler), and ``kernel_us``: their summed
  time, median over 30 calls with the L2 flushed before each (``measure_kernels``, as the benchmark's kernel
  column; one unflushed call alone is noisy and finds part of the previous call's data in the L2).

    python bench/profile_add_lora.py --filter decode-qkv "sweep identical T=64" --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lorakern.bench import cases as C
from lorakern.bench.harness import measure, measure_graph, measure_kernels


def _host_us(fn, n=200) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _kernels(fn) -> list:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            dt = getattr(ev, "device_time", None)
            if dt is None:
                dt = ev.cuda_time
            out.append((ev.name[:70], round(float(dt), 1)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", nargs="*", default=[], help="substrings of case labels (any matches)")
    ap.add_argument("--backends", nargs="*", default=["cuda", "triton"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="graph time and kernels only (no eager or host timing)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_add_lora: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    rows = []
    for case in C.full_cases():
        if args.filter and not any(f in case.label for f in args.filter):
            continue
        inp = C._build(case, dev)
        out = inp.out0.clone()
        print(f"== {case.label}  (adapters {inp.adapters}, {inp.nbytes / 1e6:.1f} MB)", flush=True)
        for name, fn, why, _ in C._implementations(case, inp, out, dev, args.backends, (), (), False, False):
            if fn is None:
                print(f"   {name}: skipped: {why}")
                continue
            try:
                bad = C._check(fn, out, inp, case.dtype)
                eager = float("nan") if args.quick else measure(fn, device=dev, warmup=5, reps=100,
                                                                   budget_s=1.0).median_us
                graph = measure_graph(fn, device=dev, warmup=5, reps=100, budget_s=1.0).median_us
                host = float("nan") if args.quick else _host_us(fn)
                ks = _kernels(fn)
                try:
                    kernel = measure_kernels(fn, device=dev, reps=30).median_us
                except RuntimeError as e:  # (e.g. a backend that copies device to device: no call boundaries)
                    print(f"   {name}: kernel time not measured: {e}", flush=True)
                    kernel = float("nan")
            except Exception as e:  # report and go on with the next
                print(f"   {name}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            gbps = inp.nbytes / (graph * 1e-6) / 1e9
            print(f"   {name:<15} eager {eager:8.1f} us   graph {graph:8.1f} us ({gbps:7.1f} GB/s)   kernels "
                  f"{kernel:8.1f} us   host {host:7.1f} us/call   {'WRONG: ' + bad if bad else ''}", flush=True)
            for k, t in ks:
                print(f"       {t:8.1f} us  {k}")
            rows.append(dict(case=case.label, backend=name, eager_us=eager, graph_us=graph, host_us=host,
                             bytes=inp.nbytes, graph_gbps=gbps, kernels=ks, kernel_us=kernel, wrong=bad))
        del inp, out
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
