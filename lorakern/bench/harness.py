"""The benchmark harness: timing, measured copy bandwidth, bytes-moved models, result rows and their files.

Timing
------
:func:`measure` returns the median, 20th and 80th percentiles of a callable's time in microseconds.

* CUDA: CUDA events around each call, after warm-up; between calls a 256 MiB buffer is zeroed (larger than the
  L2 of any current GPU: 50 MB on H100, 60 MB on B200), so that every call reads its adapter rows from HBM, as
  a layer of a real model does (the previous layer's weights have evicted them). The zeroing leaves the L2 full
  of dirty lines, which the timed call then writes back as it misses (as after a layer's GEMM wrote its output);
  ``LORAKERN_BENCH_FLUSH=read`` flushes by reading the buffer instead (clean lines: the call's own traffic
  only), for the eager, graph and kernel times alike (:func:`measure_kernels` honours it since session 9; before,
  its 128 MiB marker copy wrote the L2 full whatever the mode). The results record which (``l2_flush``).
* CPU: ``time.perf_counter`` around each call, after warm-up, no flush (writing a buffer larger than the last
  level cache would take longer than the small quick shapes themselves).

Both stop early when the repetitions would exceed a time budget (at least ``min_reps`` are always taken), so a
slow baseline does not hold up a run.

Yardstick (DESIGN.md §5): achieved bytes/s over the device's copy bandwidth measured in the same run
(:func:`peak_copy_gbps`), where the bytes are the fewest the op must move (:func:`add_lora_bytes` and friends).

Rows and files (DESIGN.md §6, contract)
---------------------------------------
A row is ``{"op", "backend", "workload", "dtype", "T", "K", "N", "slices", "ranks", "adapters", "median_us",
"p20_us", "p80_us", "bytes", "gbps", "pct_peak"}`` with:

* ``N`` — the **list of slice widths** (``[4096, 1024, 1024]`` for a GQA qkv target); ``slices`` = its length;
* ``ranks`` — a string: ``"16"`` for one rank, ``"8-128"`` for a range;
* ``adapters`` — distinct adapters used by the batch (not the pool size);
* ``T`` — tokens in the batch (with or without an adapter).

Extra keys, always present: ``case`` (the case's name), ``skipped`` (``None``, or why the row has no timing),
``note`` (``None`` or a remark, e.g. that Triton ran in its CPU interpreter). A skipped row keeps its shape and
``bytes`` and has ``None`` timings: numbers are never made up.

:func:`write_results` writes ``<out>/<device>-<YYYYMMDD>-<commit>.json`` and a ``.md`` with the same table.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = [
    "Timing",
    "measure",
    "measure_graph",
    "measure_kernels",
    "peak_copy_gbps",
    "FLUSH_BYTES",
    "add_lora_bytes",
    "lora_shrink_bytes",
    "lora_expand_bytes",
    "ROW_KEYS",
    "make_row",
    "skipped_row",
    "device_label",
    "sanitize_name",
    "device_name",
    "git_commit",
    "environment",
    "results_doc",
    "results_paths",
    "write_results",
    "update_tests",
    "format_table",
    "dtype_name",
    "ranks_label",
]

#: bytes written between timed calls on CUDA to evict the L2 (larger than any current GPU's L2).
FLUSH_BYTES = 256 << 20

#: the contract keys of a result row, in order (DESIGN.md §6).
ROW_KEYS = ("op", "backend", "workload", "dtype", "T", "K", "N", "slices", "ranks", "adapters", "median_us",
            "p20_us", "p80_us", "bytes", "gbps", "pct_peak")


# ------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Statistics of one measurement, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    reps: int


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted sequence (numpy's default method)."""
    n = len(sorted_vals)
    if n == 0:
        raise ValueError("no samples")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _stats(samples_us: Sequence[float]) -> Timing:
    s = sorted(samples_us)
    return Timing(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def _flush_buffer(device: str) -> torch.Tensor:
    """The 256 MiB flush buffer of a device, made once (every timed call flushes through it)."""
    return torch.zeros(FLUSH_BYTES, dtype=torch.uint8, device=device)


def flush_mode() -> str:
    """How :func:`measure` flushes the L2 between calls: ``write`` (zero a 256 MiB buffer; the default) or ``read``
    (read it: ``LORAKERN_BENCH_FLUSH=read``)."""
    mode = os.environ.get("LORAKERN_BENCH_FLUSH", "write").strip() or "write"
    if mode not in ("write", "read"):
        raise ValueError(f"LORAKERN_BENCH_FLUSH: expected 'write' or 'read', got {mode!r}")
    return mode


def _flush(buf: torch.Tensor, mode: str) -> None:
    if mode == "write":
        buf.zero_()
    else:
        buf.view(torch.int64).amax()  # reads all of it; the result is dropped


def measure(
    fn: Callable[[], object],
    *,
    device,
    warmup: int = 5,
    reps: int = 50,
    flush: bool = True,
    budget_s: Optional[float] = 1.0,
    min_reps: int = 5,
) -> Timing:
    """Time ``fn()``: median, p20 and p80 over up to ``reps`` calls after up to ``warmup`` calls.

    ``device``: where ``fn`` runs (``"cpu"``, ``"cuda"``, a ``torch.device``). On CUDA each call is timed with a
    pair of CUDA events and, with ``flush``, the L2 is flushed before it (outside the events). On the CPU calls
    are timed with ``time.perf_counter`` and ``flush`` is ignored. ``budget_s`` caps the time spent: warm-up
    stops after a quarter of it and the repetitions are cut to fit the rest (never below ``min_reps``).
    """
    dev = torch.device(device)
    reps = max(int(reps), 1)
    min_reps = max(1, min(int(min_reps), reps))
    budget = float("inf") if budget_s is None else float(budget_s)
    if dev.type == "cuda":
        return _measure_cuda(fn, dev, warmup, reps, flush, budget, min_reps)
    return _measure_cpu(fn, warmup, reps, budget, min_reps)


def _fit_reps(per_call_s: float, budget: float, reps: int, min_reps: int) -> int:
    if per_call_s <= 0 or math.isinf(budget):
        return reps
    return max(min_reps, min(reps, int(budget / per_call_s)))


def _measure_cpu(fn, warmup: int, reps: int, budget: float, min_reps: int) -> Timing:
    t0 = time.perf_counter()
    fastest = float("inf")
    for i in range(max(int(warmup), 1)):  # at least one call: first-call costs never enter the samples
        a = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - a)  # a stall in warm-up does not cut the repetitions
        if time.perf_counter() - t0 > budget / 4:
            break
    n = _fit_reps(fastest, budget * 3 / 4, reps, min_reps)
    samples = []
    for _ in range(n):
        a = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - a) * 1e6)
    return _stats(samples)


def _measure_cuda(fn, dev: torch.device, warmup: int, reps: int, flush: bool, budget: float,
                  min_reps: int) -> Timing:
    buf = _flush_buffer(str(dev)) if flush else None
    mode = flush_mode()
    with torch.cuda.device(dev):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(max(int(warmup), 1)):
            fn()
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > budget / 4:
                break
        # one timed call to size the run
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if buf is not None:
            _flush(buf, mode)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        flush_s = 0.0
        if buf is not None:  # the flush also costs wall time; count it against the budget
            fs, fe = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fs.record()
            _flush(buf, mode)
            fe.record()
            torch.cuda.synchronize()
            flush_s = fs.elapsed_time(fe) * 1e-3
        n = _fit_reps(s.elapsed_time(e) * 1e-3 + flush_s, budget * 3 / 4, reps, min_reps)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if buf is not None:
                _flush(buf, mode)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        samples = [a.elapsed_time(b) * 1e3 for a, b in zip(starts, ends)]
    return _stats(samples)


def measure_graph(fn: Callable[[], object], *, device, warmup: int = 5, reps: int = 50, flush: bool = True,
                  budget_s: Optional[float] = 1.0, min_reps: int = 5) -> Timing:
    """Time ``fn`` captured once in a CUDA graph and replayed (L2 flushed before each replay, as :func:`measure`):
    the device time of what ``fn`` launches, without Python or launch overhead — what an engine that replays
    CUDA graphs (decode in vLLM and SGLang) sees. ``fn`` must be capturable (no host synchronisation); raises
    otherwise. CUDA only."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError("measure_graph: CUDA only")
    with torch.cuda.device(dev):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        try:
            return measure(graph.replay, device=dev, warmup=warmup, reps=reps, flush=flush, budget_s=budget_s,
                           min_reps=min_reps)
        finally:
            del graph


@functools.lru_cache(maxsize=None)
def _flush_pair(device: str, nbytes: int = FLUSH_BYTES // 2) -> tuple:
    return (torch.zeros(nbytes, dtype=torch.uint8, device=device),
            torch.zeros(nbytes, dtype=torch.uint8, device=device))


def _cuda_events(prof) -> list:
    """``(start, name, duration)`` of the device activities (kernels, memsets, memcpys) a profile recorded."""
    out = []
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        dur = getattr(ev, "device_time", None)
        dur = ev.cuda_time if dur is None else dur
        out.append((ev.time_range.start, ev.name, float(dur)))
    return out


def flush_records(events, drop=frozenset()) -> list:
    """:func:`split_calls`' records from ``(start, name, duration)`` device events: a device-to-device memcpy
    ("Memcpy DtoD ...") marks a flush; events named in ``drop`` (the read flush's own kernels) are left out."""
    return [(start, name.startswith("Memcpy DtoD"), dur) for start, name, dur in events if name not in drop]


def measure_kernels(fn: Callable[[], object], *, device, reps: int = 30) -> Timing:
    """Kernel time of ``fn``: the summed durations (CUPTI, through ``torch.profiler``) of the kernels (and memsets)
    one call launches, L2 flushed before each call, median over ``reps`` calls — no launch gaps, no host overhead.
    Calls are told apart by a device-to-device ``cudaMemcpy`` before each ("Memcpy DtoD" in the trace), so ``fn``
    itself must do no device-to-device memcpy (lorakern's compiled backends do none). The flush follows
    :func:`flush_mode`, as :func:`measure`'s does: ``write``, the marker copy itself moves 128 MiB (leaving the L2
    full of dirty lines); ``read``, a read of a 256 MiB buffer (its kernels, named by profiling one flush alone,
    are left out of the call) and then a 16-byte marker copy. CUDA only."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError("measure_kernels: CUDA only")
    mode = flush_mode()
    with torch.cuda.device(dev):
        if mode == "write":
            src, dst = _flush_pair(str(dev))

            def flush():
                dst.copy_(src)

            drop = frozenset()
        else:
            buf = _flush_buffer(str(dev))
            msrc, mdst = _flush_pair(str(dev), 16)

            def flush():
                _flush(buf, "read")
                mdst.copy_(msrc)

            _flush(buf, "read")
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as cal:
                _flush(buf, "read")
                torch.cuda.synchronize()
            # the read's kernels only: a memset among them would also hide the call's own (zero_ is a memset)
            drop = frozenset(name for _, name, _ in _cuda_events(cal) if not name.startswith(("Memset", "Memcpy")))
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(max(int(reps), 1)):
                flush()
                fn()
            torch.cuda.synchronize()
    # a contiguous same-dtype copy_ is a cudaMemcpyAsync, not a kernel (the first version of this looked for a copy
    # kernel and found none on the H100)
    per_call = split_calls(flush_records(_cuda_events(prof), drop))
    if not per_call:
        raise RuntimeError("measure_kernels: no flush copy found in the profiler's trace")
    return _stats(per_call)


def split_calls(records) -> list:
    """Per-call summed durations from device records ``(start, is_flush, duration)``: a call is everything after a
    flush up to the next one; anything before the first flush is ignored."""
    per_call, cur = [], None
    for _, is_flush, dur in sorted(records):
        if is_flush:
            if cur is not None:
                per_call.append(cur)
            cur = 0.0
        elif cur is not None:
            cur += dur
    if cur is not None:
        per_call.append(cur)
    return per_call


def peak_copy_gbps(device, nbytes: Optional[int] = None, *, reps: int = 20) -> float:
    """The device's copy bandwidth in GB/s (1e9 B/s), measured now: a large ``dst.copy_(src)`` counted as bytes
    read + bytes written over the median time. CUDA: 2 × 512 MiB device-to-device; CPU: 2 × 128 MiB (well
    beyond any last-level cache). This is the denominator of ``pct_peak``."""
    dev = torch.device(device)
    if nbytes is None:
        nbytes = (512 << 20) if dev.type == "cuda" else (128 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=dev, warmup=3, reps=reps, flush=False, budget_s=3.0, min_reps=3)
    del src, dst
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9


# ------------------------------------------------------------------------------------------------- bytes
def _as_list(v) -> list:
    if isinstance(v, torch.Tensor):
        return [int(t) for t in v.detach().cpu().flatten().tolist()]
    return [int(t) for t in v]


def _usage(slots, ranks):
    """(tokens with an adapter, distinct adapters' summed rank, summed rank over adapter tokens)."""
    s = _as_list(slots)
    rk = _as_list(ranks)
    lora = [v for v in s if v >= 0]
    distinct = set(lora)
    return len(lora), sum(rk[v] for v in distinct), sum(rk[v] for v in lora)


def add_lora_bytes(slots, ranks, K: int, n_sizes: Sequence[int], elem_size: int, *, meta: bool = True) -> int:
    """Fewest bytes ``add_lora`` must move (DESIGN.md §5).

    With ``T_lora`` tokens that have an adapter, ``R = Σ r_s`` over the distinct adapters of the batch, ``S``
    slices of widths ``N_i`` and element size ``e``::

        e · (S·R·K            A rows, each adapter's once per slice
             + R·ΣN_i          B rows
             + T_lora·K        x, LoRA tokens only
             + 2·T_lora·ΣN_i)  out read and written, LoRA tokens, each slice's columns
        + 4·R                  page-table entries read (int32), when ``meta``

    Other metadata (slots, ranks, scales, the plan) is not counted."""
    S, sum_n = len(n_sizes), sum(int(n) for n in n_sizes)
    t_lora, R, _ = _usage(slots, ranks)
    b = elem_size * (S * R * K + R * sum_n + t_lora * K + 2 * t_lora * sum_n)
    return b + (4 * R if meta else 0)


def lora_shrink_bytes(slots, ranks, K: int, num_slices: int, max_rank: int, elem_size: int, *,
                      meta: bool = True) -> int:
    """Fewest bytes ``lora_shrink`` must move: A rows (``e·S·R·K``), ``x`` for LoRA tokens (``e·T_lora·K``), and
    ``y`` written whole (float32 ``[S, T, max_rank]``: ``4·S·T·max_rank``; padding and no-LoRA tokens are zeros
    the op must write), plus ``4·R`` page-table bytes when ``meta``."""
    T = len(_as_list(slots))
    t_lora, R, _ = _usage(slots, ranks)
    b = elem_size * (num_slices * R * K + t_lora * K) + 4 * num_slices * T * max_rank
    return b + (4 * R if meta else 0)


def lora_expand_bytes(slots, ranks, n_sizes: Sequence[int], elem_size: int, *, meta: bool = True) -> int:
    """Fewest bytes ``lora_expand`` must move: the real-rank part of ``y`` (float32, ``4·S·Σ_t r_slot(t)`` over
    LoRA tokens), B rows (``e·R·ΣN_i``), ``out`` read and written for LoRA tokens (``2·e·T_lora·ΣN_i``), plus
    ``4·R`` page-table bytes when ``meta``."""
    S, sum_n = len(n_sizes), sum(int(n) for n in n_sizes)
    t_lora, R, r_tok = _usage(slots, ranks)
    b = 4 * S * r_tok + elem_size * (R * sum_n + 2 * t_lora * sum_n)
    return b + (4 * R if meta else 0)


# ------------------------------------------------------------------------------------------------- rows
def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def ranks_label(ranks) -> str:
    """``"16"`` for one rank, ``"8-128"`` for several (min-max); a string is returned unchanged."""
    if isinstance(ranks, str):
        return ranks
    if isinstance(ranks, int):
        return str(ranks)
    vals = _as_list(ranks)
    if not vals:
        return "0"
    lo, hi = min(vals), max(vals)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _base_row(op, backend, workload, dtype, T, K, N, ranks, adapters, nbytes, case, note):
    N = [int(n) for n in N]
    return {
        "op": op, "backend": backend, "workload": workload, "dtype": dtype_name(dtype), "T": int(T), "K": int(K),
        "N": N, "slices": len(N), "ranks": ranks_label(ranks), "adapters": int(adapters),
        "median_us": None, "p20_us": None, "p80_us": None, "bytes": int(nbytes), "gbps": None, "pct_peak": None,
        "case": case, "skipped": None, "note": note, "graph_us": None, "graph_gbps": None, "graph_pct_peak": None,
        "kernel_us": None, "kernel_gbps": None, "kernel_pct_peak": None,
    }


def make_row(*, op: str, backend: str, workload: str, dtype, T: int, K: int, N: Sequence[int], ranks,
             adapters: int, timing: Timing, nbytes: int, peak_gbps: Optional[float], case: str = "",
             note: Optional[str] = None, graph: Optional[Timing] = None, kernel: Optional[Timing] = None) -> dict:
    """A measured row: GB/s = ``nbytes`` / median time; ``pct_peak`` = that over ``peak_gbps`` × 100; with
    ``graph`` (:func:`measure_graph`) and ``kernel`` (:func:`measure_kernels`), the same for the CUDA-graph replay
    time (``graph_us``, ``graph_gbps``, ``graph_pct_peak``) and the kernel time (``kernel_*``)."""
    row = _base_row(op, backend, workload, dtype, T, K, N, ranks, adapters, nbytes, case, note)
    gbps = nbytes / (timing.median_us * 1e-6) / 1e9 if timing.median_us > 0 else None
    row.update(median_us=round(timing.median_us, 3), p20_us=round(timing.p20_us, 3),
               p80_us=round(timing.p80_us, 3), gbps=None if gbps is None else round(gbps, 3))
    if gbps is not None and peak_gbps:
        row["pct_peak"] = round(100.0 * gbps / peak_gbps, 2)
    for key, tm in (("graph", graph), ("kernel", kernel)):
        if tm is not None and tm.median_us > 0:
            g = nbytes / (tm.median_us * 1e-6) / 1e9
            row.update({f"{key}_us": round(tm.median_us, 3), f"{key}_gbps": round(g, 3),
                        f"{key}_pct_peak": round(100.0 * g / peak_gbps, 2) if peak_gbps else None})
    return row


def skipped_row(*, op: str, backend: str, workload: str, dtype, T: int, K: int, N: Sequence[int], ranks,
                adapters: int, nbytes: int, reason: str, case: str = "", note: Optional[str] = None) -> dict:
    """A row without timings: ``skipped`` says why (a backend that refused, a missing peer, a wrong result)."""
    row = _base_row(op, backend, workload, dtype, T, K, N, ranks, adapters, nbytes, case, note)
    row["skipped"] = str(reason)
    return row


# ------------------------------------------------------------------------------------------------- environment
def device_name(device) -> str:
    """Human name of the device: ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return dev.type


def sanitize_name(name: str) -> str:
    """Lower case, runs of other characters to one ``-``: ``"NVIDIA H100 80GB HBM3"`` → ``nvidia-h100-80gb-hbm3``."""
    s = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return s or "unknown"


def device_label(device) -> str:
    """File-name-safe device name: ``"nvidia-h100-80gb-hbm3"``, ``"cpu"``."""
    return sanitize_name(device_name(device))


def git_commit(path=None) -> tuple:
    """``(short hash, dirty)`` of the git checkout holding ``path`` (default: this package's source), else the
    current directory's; ``("unknown", None)`` when neither is a checkout. ``LORAKERN_COMMIT`` (a hash, ``+dirty``
    appended for uncommitted changes) overrides both, for a copy of the tree whose ``.git`` is stale or absent (the
    lent GPU machine)."""
    forced = os.environ.get("LORAKERN_COMMIT", "").strip()
    if forced:
        h, _, flag = forced.partition("+")
        return h, flag == "dirty"
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    for cwd in (here, Path.cwd()):
        try:
            h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                               timeout=10)
            if h.returncode != 0 or not h.stdout.strip():
                continue
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
            return h.stdout.strip(), dirty
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown", None


def environment(device) -> dict:
    """Versions and device facts for a results file."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit, dirty = git_commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "device": device_label(device),
        "device_name": device_name(device),
        "commit": commit,
        "commit_dirty": dirty,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "l2_flush": flush_mode(),
    }


def results_doc(rows: Iterable[dict], *, env: dict, peak_copy_gbps: Optional[float], tests: Optional[dict] = None,
                **extra) -> dict:
    """The recorded-run document (DESIGN.md §6): ``{"device", "commit", "date", "torch", "triton", "cuda",
    "peak_copy_gbps", "tests": {"passed", "failed", "skipped"}, "rows": [...]}`` plus ``env``'s other keys and
    ``extra``. ``tests`` counts default to ``None`` (not run)."""
    t = {"passed": None, "failed": None, "skipped": None}
    if tests:
        t.update({k: (None if v is None else int(v)) for k, v in tests.items() if k in t})
    doc = {
        "device": env["device"], "commit": env["commit"], "date": env["date"], "torch": env["torch"],
        "triton": env["triton"], "cuda": env["cuda"],
        "peak_copy_gbps": None if peak_copy_gbps is None else round(float(peak_copy_gbps), 2),
        "tests": t, "rows": list(rows),
    }
    for k, v in env.items():
        doc.setdefault(k, v)
    for k, v in extra.items():
        doc.setdefault(k, v)
    return doc


def results_paths(doc: dict, out_dir) -> tuple:
    """``(<out>/<device>-<YYYYMMDD>-<commit>.json, .md)`` for a document."""
    day = str(doc["date"])[:10].replace("-", "")
    stem = f"{doc['device']}-{day}-{doc['commit']}"
    out = Path(out_dir)
    return out / f"{stem}.json", out / f"{stem}.md"


def write_results(doc: dict, out_dir) -> tuple:
    """Write the JSON document and its Markdown table; returns their paths. Creates ``out_dir``."""
    jp, mp = results_paths(doc, out_dir)
    jp.parent.mkdir(parents=True, exist_ok=True)
    tmp = jp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, jp)
    mp.write_text(_markdown(doc))
    return jp, mp


def update_tests(json_path, passed, failed, skipped, *, scope: Optional[str] = None) -> tuple:
    """Record test counts in an existing results file (and rewrite its ``.md``); returns the paths.

    For runs whose tests finish after the benchmark (``bench/gpu_check.sh``). ``scope`` (e.g. ``"all"`` or
    ``"gpu"``) is stored as ``tests_scope``."""
    jp = Path(json_path)
    doc = json.loads(jp.read_text())
    doc["tests"] = {"passed": passed, "failed": failed, "skipped": skipped}
    if scope is not None:
        doc["tests_scope"] = scope
    tmp = jp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, jp)
    mp = jp.with_suffix(".md")
    mp.write_text(_markdown(doc))
    return jp, mp


# ------------------------------------------------------------------------------------------------- tables
_COLS = ("op", "backend", "workload", "dtype", "T", "K", "N", "ranks", "adapters", "median us", "GB/s", "% peak",
         "vs lk", "graph us", "kernel us", "kernel % peak")
_LORAKERN = ("cuda", "triton", "torch")


def _fmt_n(n) -> str:
    return "/".join(str(v) for v in n) if isinstance(n, (list, tuple)) else str(n)


def _fmt_num(v, digits: int) -> str:
    if v is None:
        return "-"
    if v >= 1e5:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _case_key(r: dict) -> tuple:
    return (r.get("case"), r["op"], r["workload"], r["dtype"], r["T"], r["K"], tuple(r["N"]), r["ranks"])


def _ratios(rows: Sequence[dict]) -> dict:
    """Per row index: its median over the fastest measured lorakern backend's median in the same case."""
    best: dict = {}
    for r in rows:
        if r["backend"] in _LORAKERN and r["median_us"]:
            k = _case_key(r)
            best[k] = min(best.get(k, float("inf")), r["median_us"])
    out = {}
    for i, r in enumerate(rows):
        ref = best.get(_case_key(r))
        if r["median_us"] and ref:
            out[i] = r["median_us"] / ref
    return out


def _table_cells(rows: Sequence[dict]) -> list:
    ratios = _ratios(rows)
    cells = []
    for i, r in enumerate(rows):
        if r["skipped"] is not None:
            continue
        backend = r["backend"] + ("*" if r.get("note") else "")
        cells.append((_case_key(r), [
            r["op"], backend, r["workload"], r["dtype"], str(r["T"]), str(r["K"]), _fmt_n(r["N"]), r["ranks"],
            str(r["adapters"]), _fmt_num(r["median_us"], 1), _fmt_num(r["gbps"], 2), _fmt_num(r["pct_peak"], 1),
            "-" if i not in ratios else f"{ratios[i]:.2f}",
            _fmt_num(r.get("graph_us"), 1), _fmt_num(r.get("kernel_us"), 1), _fmt_num(r.get("kernel_pct_peak"), 1),
        ]))
    return cells


def _skipped_summary(rows: Sequence[dict]) -> list:
    """``(backend, reason, count)`` for skipped rows, grouped so that a backend absent everywhere takes a line."""
    groups: dict = {}
    for r in rows:
        if r["skipped"] is None:
            continue
        k = (r["backend"], r["skipped"])
        groups[k] = groups.get(k, 0) + 1
    return [(b, why, n) for (b, why), n in groups.items()]


def _notes(rows: Sequence[dict]) -> list:
    seen = []
    for r in rows:
        if r.get("note") and (r["backend"], r["note"]) not in seen:
            seen.append((r["backend"], r["note"]))
    return seen


_LEGEND = ("vs lk = median time / median time of the fastest lorakern backend (cuda, triton, torch) measured in "
           "the same case; > 1 is slower than lorakern. GB/s counts the fewest bytes the op must move "
           "(lorakern.bench.harness.add_lora_bytes); % peak is over the copy bandwidth measured in this run. "
           "median us: one eager Python call (host overhead included when it exceeds the device time); graph us: "
           "the same call captured in a CUDA graph and replayed (launch latency included); kernel us: the summed "
           "durations of the call's kernels (profiler), L2 flushed before each call (graph and kernel: lorakern's "
           "compiled backends on a GPU only).")


def format_table(rows: Sequence[dict], *, peak_gbps: Optional[float] = None, legend: bool = True) -> str:
    """Fixed-width text table of the measured rows (a blank line between cases), then skipped rows grouped by
    backend and reason, then notes."""
    cells = _table_cells(rows)
    widths = [len(c) for c in _COLS]
    for _, c in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, c)]
    right = set(range(4, len(_COLS)))

    def line(vals):
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    out = [line(_COLS), "  ".join("-" * w for w in widths)]
    prev = None
    for key, c in cells:
        if prev is not None and key != prev:
            out.append("")
        out.append(line(c))
        prev = key
    if not cells:
        out.append("(no measured rows)")
    skipped = _skipped_summary(rows)
    if skipped:
        out.append("")
        out.append("skipped (no timing):")
        for b, why, n in skipped:
            out.append(f"  {b} ({n} row{'s' if n != 1 else ''}): {why}")
    for b, note in _notes(rows):
        out.append(f"* {b}: {note}")
    if peak_gbps is not None:
        out.append(f"peak copy bandwidth measured in this run: {peak_gbps:.1f} GB/s")
    if legend:
        out.append(_LEGEND)
    return "\n".join(out)


def _markdown(doc: dict) -> str:
    rows = doc["rows"]
    t = doc.get("tests") or {}
    lines = [
        f"# lorakern benchmark — {doc.get('device_name', doc['device'])}",
        "",
        f"- device: `{doc['device']}`, commit `{doc['commit']}`"
        + (" (uncommitted changes)" if doc.get("commit_dirty") else "") + f", date {doc['date']}",
        f"- torch {doc['torch']}, triton {doc['triton']}, cuda {doc['cuda']}",
        f"- peak copy bandwidth (measured in this run): {doc['peak_copy_gbps']} GB/s",
        ("- tests: not recorded with this run" if t.get("passed") is None and t.get("failed") is None
         else f"- tests{' (' + doc['tests_scope'] + ')' if doc.get('tests_scope') else ''}: passed "
              f"{t.get('passed')}, failed {t.get('failed')}, skipped {t.get('skipped')}"),
    ]
    if doc.get("mode"):
        lines.append(f"- mode: {doc['mode']}")
    if doc.get("l2_flush"):
        lines.append(f"- L2 flush between timed calls on a GPU: {doc['l2_flush']} (256 MiB; LORAKERN_BENCH_FLUSH)")
    if doc.get("commit_note"):
        lines.append(f"- note: {doc['commit_note']}")
    if doc.get("complete") is False:
        lines.append("- **incomplete run** (interrupted; rows so far)")
    lines += ["", "| " + " | ".join(_COLS) + " |", "|" + "|".join("---" for _ in _COLS) + "|"]
    for _, c in _table_cells(rows):
        lines.append("| " + " | ".join(c) + " |")
    skipped = _skipped_summary(rows)
    if skipped:
        lines += ["", "Skipped (no timing):", ""]
        for b, why, n in skipped:
            lines.append(f"- `{b}` ({n} row{'s' if n != 1 else ''}): {why}")
    notes = _notes(rows)
    if notes:
        lines.append("")
        for b, note in notes:
            lines.append(f"\\* `{b}`: {note}")
    lines += ["", _LEGEND, ""]
    return "\n".join(lines)
