"""``python -m lorakern bench``: run the add_lora benchmark, print the table, record the run (DESIGN.md §6).

``--quick`` runs the small CPU shapes (well under a minute on two cores); without it the GPU shapes of
:func:`lorakern.bench.cases.full_cases` run (on a machine without CUDA it falls back to the quick shapes and
says so). Progress goes to stderr, the table to stdout (or the JSON document with ``--json``). Results are
written to ``<out>/<device>-<YYYYMMDD>-<commit>.json`` and ``.md`` — rewritten after every case, so an interrupted
run leaves its rows so far (marked ``"complete": false``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lorakern.bench import cases as C
from lorakern.bench.harness import environment, format_table, peak_copy_gbps, results_doc, write_results

__all__ = ["add_arguments", "main", "default_out_dir"]


def default_out_dir() -> Path:
    """``bench/results`` when it exists in the current directory (a checkout), else ``./lorakern-results``."""
    p = Path("bench") / "results"
    return p if p.is_dir() else Path("lorakern-results")


def _names(values, allowed, what, extra=()):
    if values is None:
        return list(allowed)
    allowed = tuple(allowed) + tuple(extra)
    names = []
    for v in values:
        names += [s.strip() for s in v.split(",") if s.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"lorakern bench: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)} "
                         f"(or 'none')")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small CPU-friendly shapes (float32, K=N=256, T in {16, 64}); the default on a machine "
                        "without CUDA")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--backends", nargs="+", metavar="NAME", default=None,
                   help=f"lorakern backends to time, comma or space separated (default: "
                        f"{','.join(C.LORAKERN_BACKENDS)}; also {','.join(C.PATH_VARIANTS)}: a path forced); "
                        f"'none' for none")
    p.add_argument("--baselines", nargs="+", metavar="NAME", default=None,
                   help=f"baselines and peers (default: {','.join(C.BASELINE_NAMES + C.PEER_NAMES)}); "
                        f"'none' for none")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="directory for the results .json/.md (default: bench/results if it exists here, else "
                        "./lorakern-results)")
    p.add_argument("--json", action="store_true", help="print the results JSON on stdout instead of the table")
    p.add_argument("--filter", metavar="TEXT", default=None,
                   help="run only cases whose label contains TEXT (e.g. 'decode', 'T=16 ', 'zipf'); 'A|B' = A or B")
    p.add_argument("--reps", type=int, default=None, help="maximum timed repetitions per measurement")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget per measurement (repetitions are cut to fit; default 0.12 quick, 0.6 full)")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush the L2 between timed calls")
    p.add_argument("--tests", nargs=3, type=int, metavar=("PASSED", "FAILED", "SKIPPED"), default=None,
                   help="test counts to record in the results (gpu_check.sh passes them)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU: torch intra-op threads (default 1: on a shared machine two or more threads stall "
                        "in OpenMP barriers for milliseconds, which swamps the small quick shapes)")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing implementations")


def main(args: argparse.Namespace) -> int:
    err = sys.stderr

    def log(msg: str) -> None:
        print(msg, file=err, flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        log("lorakern bench: --device cuda, but torch sees no CUDA device "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = bool(args.quick)
    if not quick and device.type != "cuda":
        log("note: no CUDA device: running the --quick CPU shapes (the full shapes are sized for a GPU)")
        quick = True
    backends = _names(args.backends, C.LORAKERN_BACKENDS, "backend", extra=C.PATH_VARIANTS)
    others = _names(args.baselines, C.BASELINE_NAMES + C.PEER_NAMES, "baseline")
    baselines = [n for n in others if n in C.BASELINE_NAMES]
    peers = [n for n in others if n in C.PEER_NAMES]
    timing = C.QUICK_TIMING if quick else C.FULL_TIMING
    if args.reps is not None or args.budget is not None:
        timing = C.TimingConfig(
            warmup=timing.warmup,
            reps=max(1, args.reps) if args.reps is not None else timing.reps,
            budget_s=args.budget if args.budget is not None else timing.budget_s,
            min_reps=min(timing.min_reps, max(1, args.reps)) if args.reps is not None else timing.min_reps,
        )
    cases = C.quick_cases() if quick else C.full_cases()
    smallest = cases[0]
    if args.filter:
        cases = [c for c in cases if any(f in c.label + " " for f in args.filter.split("|"))]
        if not cases:
            log(f"lorakern bench: no case matches --filter {args.filter!r}")
            return 2
    out_dir = Path(args.out) if args.out else default_out_dir()
    tests = None
    if args.tests is not None:
        tests = dict(zip(("passed", "failed", "skipped"), args.tests))

    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads or 1))
    elif args.threads:
        torch.set_num_threads(max(1, args.threads))
    env = environment(device)
    env["cpu_threads"] = torch.get_num_threads()
    mode = "quick" if quick else "full"
    log(f"lorakern bench ({mode}) on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, commit {env['commit']}" + (" (uncommitted changes)" if env["commit_dirty"] else "")
        + (f", {env['cpu_threads']} CPU thread(s)" if device.type == "cpu" else ""))
    if device.type == "cpu" and "triton" in backends:
        if env["triton_interpret"]:
            log("note: TRITON_INTERPRET=1: triton runs in its CPU interpreter, at the smallest case only")
        else:
            log("note: triton is skipped on the CPU unless TRITON_INTERPRET=1 is set")
    t0 = time.perf_counter()
    peak = peak_copy_gbps(device)
    log(f"peak copy bandwidth: {peak:.1f} GB/s")

    seen: set = set()

    def case_log(msg: str) -> None:  # a skip reason is printed once; the final table counts them
        if " skipped: " in msg:
            if msg in seen:
                return
            seen.add(msg)
        log(msg)

    rows: list = []
    extra = dict(mode=mode, complete=False)
    paths = None
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.label}")
        try:
            rows += C.run_case(case, device, backends=backends, baselines=baselines, peers=peers, timing=timing,
                               peak_gbps=peak, quick=quick, smallest=(case == smallest), flush=not args.no_flush,
                               log=case_log, debug=args.debug)
        except Exception as e:  # building the case itself failed (e.g. out of memory): record and go on
            msg = f"{case.label}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            extra.setdefault("errors", []).append(msg)
            log(f"    case failed: {msg}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            paths = write_results(results_doc(rows, env=env, peak_copy_gbps=peak, tests=tests, **extra), out_dir)
        except OSError as e:
            log(f"    cannot write results to {out_dir}: {e}")
    extra["complete"] = True
    doc = results_doc(rows, env=env, peak_copy_gbps=peak, tests=tests, **extra)
    try:
        paths = write_results(doc, out_dir)
    except OSError as e:
        log(f"lorakern bench: cannot write results to {out_dir}: {e}")
        paths = None
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_table(rows, peak_gbps=peak))
    if paths:
        log(f"results written to {paths[0]} and {paths[1].name} ({time.perf_counter() - t0:.1f} s)")
    return 0 if paths else 1


def cli(argv=None) -> int:
    """Stand-alone entry (``python bench/bench_add_lora.py``): the same options as ``lorakern bench``."""
    p = argparse.ArgumentParser(prog="bench_add_lora", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
