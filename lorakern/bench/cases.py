"""Benchmark cases for ``add_lora`` and the loop that turns one case into result rows.

Workloads are Punica's adapter mixes (:mod:`lorakern.workloads`): ``distinct`` (every token its own adapter —
the decode worst case), ``uniform``, ``zipf:1.5`` (skewed popularity) and ``identical`` (one adapter). The adapter
pool of a case holds ``pool`` adapters; the ``adapters`` column of a row counts those the batch actually uses.

GPU shapes (``full_cases``), bf16, ``K = 4096`` unless said otherwise:

* ``decode-qkv`` — 256 tokens × 256 distinct adapters, r = 16, three slices 4096/1024/1024 (a GQA qkv target);
* ``prefill`` / ``prefill-qkv`` — 8192 tokens over 16 adapters (uniform), r = 64, one slice N = 4096 / qkv;
* ``mixed-ranks`` / ``mixed-ranks-qkv`` — ranks drawn in 8..128: 4096 tokens over 32 adapters (one slice), and
  256 distinct decode tokens with the qkv slices; every case's plan is built with the pool's ranks
  (``LoRAPlan.from_slots(slots, ranks)``: work tiles in descending rank order), and ``mixed-ranks-slot-order`` /
  ``mixed-ranks-qkv-slot-order`` are the same batches with the tiles in slot order (the plan without ranks);
* ``rank-8-qkv`` / ``rank-64-qkv`` / ``rank-128-qkv`` / ``rank-256-qkv`` — the mixed-ranks decode batch at
  fixed ranks, to check that time follows the real ranks (mixed 8..128 averages ~68), not the maximum;
* ``decode-qkv-qwen3moe`` — Qwen3-30B-A3B's attention qkv (K = 2048, slices 4096/512/512), 256 distinct;
* ``sweep`` — T ∈ {1, 16, 64, 256, 1024} × {distinct, uniform, zipf:1.5, identical}, r = 16, N = 4096; the pool
  has T adapters (so ``distinct`` is one token per adapter);
* ``crossover-<m>`` — 1024 tokens spread uniformly over 1024 / m adapters (about m tokens each; m = 4 .. 64),
  r = 16, N = 4096: where the gather path stops paying and the segment path starts (``GATHER_MAX_MEAN_TOKENS``,
  16 today); run with ``--backends cuda cuda-gather cuda-segment cuda-fused triton-gather triton-segment`` and
  read ``python -m lorakern targets``' path table.

CPU quick shapes (``quick_cases``), float32, ``K = N = 256``, r = 16: T ∈ {16, 64} × the four mixes × one slice
(N = 256) and three slices (256/64/64). Triton runs on the CPU only in its interpreter (``TRITON_INTERPRET=1``),
which is slow and no kernel timing: in quick mode it is run at the smallest case only, and marked in the table.

Every implementation is first checked against the torch reference on the case's own inputs (one call on a copy
of ``out``); a wrong result becomes a skipped row with the error, never a timing.
"""

from __future__ import annotations

import os

import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from lorakern import ops, reference
from lorakern.backends import BACKENDS
from lorakern.bench import baselines as B
from lorakern.bench.harness import (Timing, add_lora_bytes, make_row, measure, measure_graph, measure_kernels,
                                    skipped_row)
from lorakern.plan import LoRAPlan
from lorakern.workloads import make_lora, make_slots

__all__ = ["Case", "quick_cases", "full_cases", "run_case", "TimingConfig", "QUICK_TIMING", "FULL_TIMING",
           "LORAKERN_BACKENDS", "PATH_VARIANTS", "BASELINE_NAMES", "PEER_NAMES", "TOLERANCE"]

LORAKERN_BACKENDS = ("cuda", "triton", "torch")
#: opt-in variants: a compiled backend with its code path forced (LORAKERN_TRITON_PATH), to compare the paths;
#: ``cuda-fused``: the segment path with add_lora on the fused segment kernel (LORAKERN_CUDA_SEGMENT=fused)
PATH_VARIANTS = ("cuda-gather", "cuda-segment", "cuda-fused", "triton-gather", "triton-segment")
BASELINE_NAMES = tuple(B.BASELINES)
PEER_NAMES = tuple(B.PEERS)

#: Check of each implementation against the fp32 torch reference: max |got - expected| / max |expected|.
#: fp32: summation order only (~1e-6 at K = 256). bf16 / fp16: the output's rounding (2^-8 / 2^-11 relative)
#: plus the baselines' intermediate rounded to the input dtype; a factor ~4 above that.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}

#: implementations also timed as a CUDA-graph replay on a GPU (lorakern's compiled backends; the baselines
#: synchronise with the host or are timed as their own projects run them)
_GRAPHED = ("cuda", "triton")

_INTERPRET_NOTE = "TRITON_INTERPRET=1: Triton's CPU interpreter, not a kernel timing"
_EMULATOR_NOTE = "LORAKERN_CUDA_EMULATE=1: the CUDA kernels on the CPU emulator, not a kernel timing"


@dataclass(frozen=True)
class Case:
    name: str
    workload: str  # adapter mix (lorakern.workloads.make_slots)
    T: int
    K: int
    n_sizes: tuple
    ranks: str  # "16" or "8-128"
    pool: int  # adapters in the pool
    dtype: torch.dtype
    seed: int = 0
    order: str = "rank"  # the plan's tile order: "rank" (from_slots(slots, ranks), the default) or "slot"

    @property
    def label(self) -> str:
        n = "/".join(str(v) for v in self.n_sizes)
        return f"{self.name} {self.workload} T={self.T} K={self.K} N={n} r={self.ranks}"


@dataclass(frozen=True)
class TimingConfig:
    warmup: int
    reps: int
    budget_s: float
    min_reps: int = 5


QUICK_TIMING = TimingConfig(warmup=2, reps=20, budget_s=0.12, min_reps=3)
FULL_TIMING = TimingConfig(warmup=5, reps=100, budget_s=0.6, min_reps=5)

_MIXES = ("distinct", "uniform", "zipf:1.5", "identical")


def quick_cases() -> list:
    """Small CPU shapes; the first is the smallest (where the Triton interpreter runs)."""
    cases = []
    for n_sizes in ((256,), (256, 64, 64)):
        for T in (16, 64):
            for mix in _MIXES:
                cases.append(Case("quick", mix, T, 256, n_sizes, "16", T, torch.float32))
    return cases


def full_cases() -> list:
    """GPU shapes (bf16, K = 4096)."""
    bf16, qkv = torch.bfloat16, (4096, 1024, 1024)
    cases = [
        Case("decode-qkv", "distinct", 256, 4096, qkv, "16", 256, bf16),
        Case("prefill", "uniform", 8192, 4096, (4096,), "64", 16, bf16),
        Case("prefill-qkv", "uniform", 8192, 4096, qkv, "64", 16, bf16),
        Case("mixed-ranks", "uniform", 4096, 4096, (4096,), "8-128", 32, bf16),
        Case("mixed-ranks-qkv", "distinct", 256, 4096, qkv, "8-128", 256, bf16),
        # the same two batches with the plan's tiles in slot order instead of descending rank order
        Case("mixed-ranks-slot-order", "uniform", 4096, 4096, (4096,), "8-128", 32, bf16, order="slot"),
        Case("mixed-ranks-qkv-slot-order", "distinct", 256, 4096, qkv, "8-128", 256, bf16, order="slot"),
        # the same decode batch at fixed ranks: time should follow the (mean) real rank, not the max
        Case("rank-8-qkv", "distinct", 256, 4096, qkv, "8", 256, bf16),
        Case("rank-64-qkv", "distinct", 256, 4096, qkv, "64", 256, bf16),
        Case("rank-128-qkv", "distinct", 256, 4096, qkv, "128", 256, bf16),
        Case("rank-256-qkv", "distinct", 256, 4096, qkv, "256", 256, bf16),  # past 128: cuda's limit is 512
        # Qwen3-30B-A3B attention: hidden 2048, 32 q heads and 4 kv heads of 128
        Case("decode-qkv-qwen3moe", "distinct", 256, 2048, (4096, 512, 512), "16", 256, bf16),
    ]
    for T in (1, 16, 64, 256, 1024):
        for mix in _MIXES:
            cases.append(Case("sweep", mix, T, 4096, (4096,), "16", T, bf16))
    for m in CROSSOVER_MEANS:
        cases.append(Case(f"crossover-{m}", "uniform", 1024, 4096, (4096,), "16", 1024 // m, bf16))
    return cases


#: the crossover cases' tokens per adapter (1024 tokens over 1024 / m adapters)
CROSSOVER_MEANS = (4, 8, 16, 32, 64)


# ------------------------------------------------------------------------------------------------- inputs
@dataclass
class _Inputs:
    pool: object
    slots: torch.Tensor
    plan: LoRAPlan
    x: torch.Tensor
    out0: torch.Tensor
    offsets: list
    adapters: int
    nbytes: int
    expected: Optional[torch.Tensor] = None


def _build(case: Case, device: torch.device) -> _Inputs:
    g = torch.Generator().manual_seed(case.seed)
    pool = make_lora(case.pool, case.K, case.n_sizes, case.ranks, dtype=case.dtype, device=device, generator=g)
    slots = make_slots(case.workload, case.T, case.pool, generator=g, device=device)
    x = torch.randn(case.T, case.K, generator=g).to(case.dtype).to(device)
    out0 = torch.randn(case.T, sum(case.n_sizes), generator=g).to(case.dtype).to(device)
    offs = B.default_offsets(pool.lora_b)
    plan = LoRAPlan.from_slots(slots, pool.ranks if case.order == "rank" else None)
    slots_cpu = slots.cpu()
    ranks_cpu = pool.ranks.cpu()
    adapters = int(torch.unique(slots_cpu[slots_cpu >= 0]).numel())
    elem = torch.empty((), dtype=case.dtype).element_size()
    nbytes = add_lora_bytes(slots_cpu, ranks_cpu, case.K, case.n_sizes, elem)
    return _Inputs(pool, slots, plan, x, out0, offs, adapters, nbytes)


def _expected(inp: _Inputs) -> torch.Tensor:
    """fp32 torch reference of ``out0 + LoRA`` (float64 for float64 inputs), on the case's device."""
    acc = torch.float64 if inp.x.dtype == torch.float64 else torch.float32
    p = inp.pool
    exp = inp.out0.to(acc).clone()
    reference.add_lora(exp, inp.x.to(acc), [a.to(acc) for a in p.lora_a], [b.to(acc) for b in p.lora_b],
                       p.page_table, p.ranks, p.scales, inp.slots, inp.offsets)
    return exp


def _check(fn: Callable, out: torch.Tensor, inp: _Inputs, dtype) -> Optional[str]:
    """Run ``fn`` once on ``out`` (a fresh copy of out0); None if it matches the reference, else the reason."""
    out.copy_(inp.out0)
    fn()
    if inp.expected is None:
        inp.expected = _expected(inp)
    exp = inp.expected
    err = (out.to(exp.dtype) - exp).abs().max().item()
    scale = max(exp.abs().max().item(), 1e-30)
    rel = err / scale
    tol = TOLERANCE.get(dtype, 3e-2)
    if not (rel <= tol):  # catches NaN
        return f"wrong result: max |err| / max |ref| = {rel:.3g} > tolerance {tol:g}"
    return None


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if not isinstance(e, B.Unavailable) else msg


# ------------------------------------------------------------------------------------------------- one case
def _set_env(name: str, value: Optional[str]) -> None:
    if value:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)


def _set_path(path: Optional[str], user_segment: Optional[str] = None) -> None:
    """Force a variant's path ("fused": the segment path on the fused kernel); None: the caller's settings."""
    _set_env("LORAKERN_CUDA_SEGMENT", "fused" if path == "fused" else user_segment)
    _set_env("LORAKERN_TRITON_PATH", "segment" if path == "fused" else path)


def _implementations(case: Case, inp: _Inputs, out: torch.Tensor, device: torch.device, backends: Sequence[str],
                     baselines: Sequence[str], peers: Sequence[str], quick: bool, smallest: bool):
    """Yields ``(backend, fn or None, skip reason or None, note)``; ``fn`` may raise when called."""
    p = inp.pool
    max_rank = p.max_rank
    user_path = os.environ.get("LORAKERN_TRITON_PATH")
    user_segment = os.environ.get("LORAKERN_CUDA_SEGMENT")
    for name in backends:
        base, _, path = name.partition("-")  # "cuda-segment": the cuda backend on its segment path
        reasons = BACKENDS[base].not_supported_reasons(device, case.dtype, max_rank)
        note = {"triton": _INTERPRET_NOTE, "cuda": _EMULATOR_NOTE}.get(base) if device.type == "cpu" else None
        if reasons:
            yield name, None, "; ".join(reasons), None
            continue
        if base == "triton" and device.type == "cpu" and quick and not smallest:
            yield name, None, "Triton's CPU interpreter is slow: --quick runs it at the smallest case only", note
            continue

        def fn(base=base):
            ops.add_lora(out, inp.x, p.lora_a, p.lora_b, p.page_table, p.ranks, p.scales, inp.plan, backend=base)

        # run_case checks and times each implementation before asking for the next, so the path forced here (or
        # the caller's setting, for a plain backend name) holds for all of its calls; nothing per timed call
        _set_path(path or user_path, user_segment)
        yield name, fn, None, note
    _set_path(user_path, user_segment)
    for name in baselines:
        bl = B.BASELINES[name]
        try:
            prep = bl.prepare(out, inp.x, p.lora_a, p.lora_b, p.page_table, p.ranks, p.scales, inp.slots)
        except Exception as e:
            yield name, None, _reason(e), None
            continue

        def fn(bl=bl, prep=prep):
            bl.fn(out, inp.x, p.lora_a, p.lora_b, p.page_table, p.ranks, p.scales, inp.slots,
                  slice_offsets=inp.offsets, prepared=prep)

        yield name, fn, None, None
    for name in peers:
        try:
            fn = B.make_peer(name, out, inp.x, p.lora_a, p.lora_b, p.page_table, p.ranks, p.scales, inp.slots,
                             inp.offsets)
        except Exception as e:
            yield name, None, _reason(e), None
            continue
        yield name, fn, None, None


def _device_times(fn, dev, timing: TimingConfig, flush: bool):
    """(graph replay Timing or None, kernel Timing or None, note on what failed or None): a failure here costs
    only these two columns, never the eager row."""
    tg = tk = None
    why = []
    try:
        tg = measure_graph(fn, device=dev, warmup=timing.warmup, reps=timing.reps, flush=flush,
                           budget_s=timing.budget_s, min_reps=timing.min_reps)
    except Exception as e:
        why.append(f"graph time not measured ({_reason(e)})")
    try:
        tk = measure_kernels(fn, device=dev, reps=min(timing.reps, 30))
    except Exception as e:
        why.append(f"kernel time not measured ({_reason(e)})")
    torch.cuda.synchronize(dev)
    return tg, tk, "; ".join(why) or None


def run_case(case: Case, device, *, backends: Sequence[str] = LORAKERN_BACKENDS,
             baselines: Sequence[str] = BASELINE_NAMES, peers: Sequence[str] = PEER_NAMES,
             timing: TimingConfig = FULL_TIMING, peak_gbps: Optional[float] = None, quick: bool = False,
             smallest: bool = False, flush: bool = True, log=None, debug: bool = False) -> list:
    """All rows of one case: each lorakern backend, each baseline, each peer — measured or skipped with why."""
    dev = torch.device(device)
    log = log or (lambda msg: None)
    inp = _build(case, dev)
    out = inp.out0.clone()
    common = dict(op="add_lora", workload=case.workload, dtype=case.dtype, T=case.T, K=case.K, N=case.n_sizes,
                  ranks=case.ranks, adapters=inp.adapters, case=case.name)
    rows = []
    for name, fn, why, note in _implementations(case, inp, out, dev, backends, baselines, peers, quick, smallest):
        if fn is not None:
            try:
                why = _check(fn, out, inp, case.dtype)
                tg = tk = None
                if why is None:
                    t: Timing = measure(fn, device=dev, warmup=timing.warmup, reps=timing.reps, flush=flush,
                                        budget_s=timing.budget_s, min_reps=timing.min_reps)
                    if dev.type == "cuda" and name.partition("-")[0] in _GRAPHED:
                        tg, tk, extra = _device_times(fn, dev, timing, flush)
                        if extra:
                            note = "; ".join(n for n in (note, extra) if n)
            except Exception as e:  # a backend that is not there yet, a peer whose API moved, out of memory...
                why = _reason(e)
                if dev.type == "cuda":
                    try:  # let an asynchronous failure surface here rather than in the next implementation
                        torch.cuda.synchronize(dev)
                    except Exception as e2:
                        why += f"; then {_reason(e2)}"
                if debug:
                    traceback.print_exc()
        if why is not None:
            rows.append(skipped_row(**common, backend=name, nbytes=inp.nbytes, reason=why, note=note))
            log(f"    {name:<17} skipped: {why}")
        else:
            rows.append(make_row(**common, backend=name, timing=t, nbytes=inp.nbytes, peak_gbps=peak_gbps,
                                 note=note, graph=tg, kernel=tk))
            log(f"    {name:<17} {t.median_us:10.1f} us  ({t.reps} reps)"
                + (f"   graph {tg.median_us:10.1f} us" if tg is not None else "")
                + (f"   kernels {tk.median_us:10.1f} us" if tk is not None else ""))
    del inp, out
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows
