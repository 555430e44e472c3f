#!/usr/bin/env python
"""Benchmark packed MoE-expert LoRA: (a) loading, packed vs per-expert; (b) the fused add_lora_moe kernel on a GPU.

    python bench/bench_moe.py              # rank-1 Qwen3-30B-A3B adapter (48 layers): ~1-3 min on 2 cores
    python bench/bench_moe.py --quick      # 4 layers: CI scale, a few seconds
    python bench/bench_moe.py --json out.json

(a) Loading (disk → host → pool), measurable on any machine. One rank-1 adapter shaped like Qwen3-30B-A3B (48
layers; 128 experts, hidden 2048, moe_intermediate 768; q/k/v/o with 32 heads, 4 kv heads, head_dim 128), bf16:

* per-expert: a PEFT-style safetensors file with one tensor per (layer, expert, projection, A|B) plus attention —
  37,248 tensors at 48 layers, 37,152 of them ≤ 4 KB — loaded two ways:
    - ``per-expert (lorakern PeftDir)``: lorakern's PEFT loader (one read of the file, per-expert stacking into the
      packed layout, one host record, copied into the pool);
    - ``per-expert (tensor by tensor)``: what a per-module engine loader does — ``safe_open`` and one
      ``get_tensor`` + one copy into the pool's packed rows per tensor;
* packed: the same adapter converted by :func:`lorakern.pool.packed.peft_to_packed` — 672 tensors, one per (layer,
  projection, A|B) — loaded by :class:`lorakern.pool.packed.PackedAdapter` into the pool.

Each load runs from the page cache ("warm": the files were just written and read) and, where the OS lets us evict
a file's pages (``posix_fadvise(DONTNEED)`` after ``fsync``), from disk ("cold"). The pool has no host cache, so
every load reads its source. The pool lives on the GPU when there is one, else on the CPU (then "host → pool" is a
host memcpy). Reported: median seconds per load over ``--reps`` and the per-expert / packed ratios (MinT measured
8.5–8.7× for a live engine load, 1.36 s → 0.16 s).

(b) Kernel: with a CUDA GPU, ``add_lora_moe`` (Triton) at Qwen3-30B-A3B expert shapes (gate_up: K=2048, N=2×768;
down: K=768, N=2048; E=128, top-8) for decode batches, as median µs and GB/s over the fewest bytes the op must
move (each distinct (adapter, expert) group's rank rows once, x once, out read and written once). Without a GPU it
prints that nothing was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import lorakern  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakern.pool import AdapterPool, PeftDir
from lorakern.pool.packed import PACKED_INDEX, PACKED_WEIGHTS, PackedAdapter, moe_pool_layout, peft_to_packed

QWEN3_30B_A3B = dict(hidden=2048, moe_intermediate=768, experts=128, heads=32, kv_heads=4, head_dim=128, layers=48)


# ------------------------------------------------------------------------------------------------ (a) loading
def write_per_expert(path: Path, layers: int, rank: int, cfg: dict, dtype=torch.bfloat16) -> int:
    """A per-expert PEFT directory of a rank-``rank`` adapter; returns the tensor count."""
    from lorakern.pool import save_peft_dir

    H, I, E = cfg["hidden"], cfg["moe_intermediate"], cfg["experts"]
    q, kv = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    g = torch.Generator().manual_seed(0)
    mods = {}
    for l in range(layers):
        for p, K, N in (("q_proj", H, q), ("k_proj", H, kv), ("v_proj", H, kv), ("o_proj", q, H)):
            mods[f"model.layers.{l}.self_attn.{p}"] = (torch.randn(rank, K, generator=g).to(dtype),
                                                        torch.randn(N, rank, generator=g).to(dtype))
        for p, K, N in (("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)):
            A = torch.randn(E, rank, K, generator=g).to(dtype)  # one draw per projection, then one tensor per expert
            B = torch.randn(E, N, rank, generator=g).to(dtype)
            for e in range(E):
                mods[f"model.layers.{l}.mlp.experts.{e}.{p}"] = (A[e].clone(), B[e].clone())
    save_peft_dir(path, mods, r=rank, lora_alpha=2 * rank)
    return 2 * len(mods)


def _files(src: Path, kind: str):
    return [src / "adapter_model.safetensors", src / "adapter_config.json"] if kind == "peft" else \
        [src / PACKED_WEIGHTS, src / PACKED_INDEX]


def drop_cache(paths) -> bool:
    """Evict the files' pages from the page cache (fsync, then POSIX_FADV_DONTNEED); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except OSError:
        return False


def tensor_by_tensor(pool: AdapterPool, aid: str, path: Path) -> None:
    """A per-module engine loader: every tensor of the per-expert file read on its own and copied into the pool's
    packed rows of ``aid`` (already resident: its rows allocated)."""
    from safetensors import safe_open

    layout = pool.layout
    rows = torch.as_tensor(pool.rows_of(aid), device=pool.device)
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            mod, ab = key.rsplit(".lora_", 1)
            key_ = layout.match(mod[len("base_model.model."):])
            layer, target, sl = key_[:3]
            if ab.startswith("A"):
                dst = pool.lora_a(layer, target)[sl]
                src = t
            else:
                dst = pool.lora_b(layer, target)[sl]
                src = t.t()
            if len(key_) == 4:  # one expert of a packed MoE target: [rows, E, *] <- [r, *]
                dst[rows[:src.shape[0]], key_[3]] = src.to(pool.device, pool.dtype)
            else:
                dst[rows[:src.shape[0]]] = src.to(pool.device, pool.dtype)
    pool.synchronize()


def bench_loading(layers: int, rank: int, reps: int, workdir: Path, device) -> dict:
    cfg = QWEN3_30B_A3B
    layout = moe_pool_layout(layers, cfg["hidden"], cfg["moe_intermediate"], cfg["experts"], num_heads=cfg["heads"],
                             num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"])
    peft_dir, packed_dir = workdir / "per_expert", workdir / "packed"
    t0 = time.perf_counter()
    n_per_expert = write_per_expert(peft_dir, layers, rank, cfg)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    peft_to_packed(peft_dir, packed_dir, num_experts=cfg["experts"])
    t_convert = time.perf_counter() - t0
    from safetensors import safe_open

    with safe_open(str(packed_dir / PACKED_WEIGHTS), framework="pt") as f:
        n_packed = len(list(f.keys()))
    pool = AdapterPool(layout, max_rows=2 * rank, max_slots=2, max_rank=rank, dtype=torch.bfloat16, device=device,
                       host_cache=0)
    pool.register("packed", PackedAdapter(packed_dir))
    pool.register("peft", PeftDir(peft_dir))
    sizes = {k: sum(p.stat().st_size for p in _files(d, k)) for k, d in (("peft", peft_dir), ("packed", packed_dir))}

    def load(aid):
        pool.load([aid])
        pool.synchronize()
        pool.evict(aid)

    def tbt():
        pool.load(["packed"])  # allocate the rows (not timed below)
        pool.synchronize()
        t = time.perf_counter()
        tensor_by_tensor(pool, "packed", peft_dir)
        dt = time.perf_counter() - t
        pool.evict("packed")
        return dt

    loaders = [("packed", "packed"), ("per-expert (lorakern PeftDir)", "peft"),
               ("per-expert (tensor by tensor)", "peft")]
    results = {}
    can_drop = drop_cache(_files(peft_dir, "peft") + _files(packed_dir, "packed"))
    for mode in (("warm", "cold") if can_drop else ("warm",)):
        times = {name: [] for name, _ in loaders}
        for i in range(reps + 1):  # the first round warms up (imports, allocator, page cache in warm mode)
            for name, kind in loaders[i % len(loaders):] + loaders[:i % len(loaders)]:  # rotated: no order bias
                src = packed_dir if kind == "packed" else peft_dir
                if mode == "cold":
                    drop_cache(_files(src, kind))
                if name == "per-expert (tensor by tensor)":
                    dt = tbt()
                else:
                    t = time.perf_counter()
                    load("packed" if kind == "packed" else "peft")
                    dt = time.perf_counter() - t
                if i:
                    times[name].append(dt)
        results[mode] = {k: statistics.median(v) for k, v in times.items()}
        results[mode + "_all"] = times
    # the two loaders fill identical rows (checked once here; the tests check it on small adapters)
    pool.load(["packed"])
    a = pool.rows[torch.as_tensor(pool.rows_of("packed"), device=pool.device)].clone()
    pool.evict("packed")
    pool.load(["peft"])
    b = pool.rows[torch.as_tensor(pool.rows_of("peft"), device=pool.device)].clone()
    same = bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))
    return dict(layers=layers, rank=rank, tensors_per_expert=n_per_expert, tensors_packed=n_packed,
                bytes_per_expert_file=sizes["peft"], bytes_packed_file=sizes["packed"], row_bytes=pool.row_bytes,
                write_per_expert_s=t_write, convert_s=t_convert, pool_device=str(pool.device),
                identical_rows=same, cold_supported=can_drop, **results)


def print_loading(r: dict) -> None:
    print(f"(a) loading a rank-{r['rank']} Qwen3-30B-A3B-shaped adapter, {r['layers']} layers, bf16, into a pool on "
          f"{r['pool_device']} ({r['row_bytes'] / 2**20:.1f} MiB per rank row)")
    print(f"    per-expert file: {r['tensors_per_expert']:,} tensors, {r['bytes_per_expert_file'] / 2**20:.1f} MiB; "
          f"packed: {r['tensors_packed']:,} tensors, {r['bytes_packed_file'] / 2**20:.1f} MiB "
          f"(writing the per-expert file {r['write_per_expert_s']:.1f} s, converting {r['convert_s']:.1f} s)")
    print(f"    packed and per-expert loads give identical pool rows: {r['identical_rows']}")
    for mode in ("warm", "cold"):
        if mode not in r:
            if mode == "cold":
                print("    cold: not measured (posix_fadvise unavailable)")
            continue
        m = r[mode]
        p = m["packed"]
        what = "page cache" if mode == "warm" else "disk, page cache dropped before each load"
        print(f"    {mode} ({what}), median of {len(r[mode + '_all']['packed'])}:")
        for name, v in m.items():
            ratio = "" if name == "packed" else f"   {v / p:6.1f}x the packed time"
            print(f"      {name:32s} {v * 1e3:9.1f} ms{ratio}")


# ------------------------------------------------------------------------------------------------ (b) kernel
def bench_kernel(quick: bool) -> list:
    if not torch.cuda.is_available():
        print("(b) fused add_lora_moe kernel: no CUDA GPU on this machine — no GB/s measured (run this script on a "
              "GPU for the kernel table)")
        return []
    from lorakern.backends import BACKENDS
    from lorakern.bench.harness import measure, peak_copy_gbps
    from lorakern.moe_grouping import group_pairs
    from lorakern.ops import add_lora_moe

    dev = torch.device("cuda")
    cfg = QWEN3_30B_A3B
    E, H, I, topk = cfg["experts"], cfg["hidden"], cfg["moe_intermediate"], 8
    peak = peak_copy_gbps(dev)
    rows_out = []
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    backends = []
    for be in ("triton", "cuda"):  # the first is the reference of the result check
        why = BACKENDS[be].not_supported_reasons(dev, torch.bfloat16, 64, op="add_lora_moe")
        if why:
            print(f"(b) {be}: skipped ({'; '.join(why)})")
        else:
            backends.append(be)
    print(f"(b) fused add_lora_moe ({', '.join(backends)}) on {torch.cuda.get_device_name(dev)}, bf16, E={E}, "
          f"top-{topk}; peak copy {peak:.0f} GB/s; each backend's result checked against the first's")
    print(f"    {'backend':8s} {'proj':8s} {'T':>5s} {'adapters':>8s} {'rank':>4s} {'groups':>6s} {'median_us':>10s} "
          f"{'GB/s':>8s} {'%peak':>6s}")
    for T in ((16, 64) if quick else (1, 16, 64, 256, 1024)):
        for n_ad, rank in ((T, 16), (4, 16), (T, 64)):
            for proj, K, ns in (("gate_up", H, [I, I]), ("down", I, [H])):
                rows = n_ad * rank
                la = [torch.randn(rows, E, K, generator=g).to(dt).to(dev) for _ in ns]
                lb = [torch.randn(rows, E, n, generator=g).to(dt).to(dev) for n in ns]
                pt = torch.arange(rows, dtype=torch.int32, device=dev).view(n_ad, rank)
                rk = torch.full((n_ad,), rank, dtype=torch.int32, device=dev)
                sc = torch.ones(n_ad, device=dev)
                slots = torch.randint(0, n_ad, (T,), generator=g, dtype=torch.int32).to(dev)
                ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]).to(dev)
                w = torch.rand(T, topk, device=dev)
                x = (torch.randn(T, K, generator=g) if proj == "gate_up" else torch.randn(T, topk, K, generator=g))
                x = x.to(dt).to(dev)
                out = torch.zeros(T, topk, sum(ns), dtype=dt, device=dev)
                plan = lorakern.LoRAPlan.from_slots(slots)
                _, tiles, nt, _ = group_pairs(slots, ids, E, n_ad, 16)
                groups = int(nt)  # tiles ~ groups at decode
                esz = 2
                nbytes = groups * rank * (K + sum(ns)) * esz + x.numel() * esz + 2 * out.numel() * esz

                first = None
                for be in backends:
                    def fn(be=be):
                        add_lora_moe(out, x, ids, la, lb, pt, rk, sc, plan,
                                     topk_weights=w if proj == "down" else None, backend=be)

                    out.zero_()
                    fn()
                    got = out.float().clone()
                    if first is None:
                        first = got
                    err = float((got - first).abs().max() / first.abs().max().clamp_min(1e-30))
                    common = dict(op="add_lora_moe", backend=be, workload=f"{proj}-uniform", dtype="bf16", T=T, K=K,
                                  N=ns, slices=len(ns), ranks=rank, adapters=n_ad, bytes=nbytes)
                    if err > 2e-2:
                        print(f"    {be:8s} {proj:8s} {T:5d} {n_ad:8d} {rank:4d} {groups:6d}   skipped: wrong result "
                              f"(max relative difference {err:.3g} from {backends[0]})")
                        rows_out.append(dict(common, skipped=f"wrong result: {err:.3g} from {backends[0]}"))
                        continue
                    tm = measure(fn, device=dev, warmup=5, reps=50)
                    gbps = nbytes / (tm.median_us * 1e-6) / 1e9
                    print(f"    {be:8s} {proj:8s} {T:5d} {n_ad:8d} {rank:4d} {groups:6d} {tm.median_us:10.1f} "
                          f"{gbps:8.1f} {100 * gbps / peak:6.1f}")
                    rows_out.append(dict(common, median_us=tm.median_us, p20_us=tm.p20_us, p80_us=tm.p80_us,
                                         gbps=gbps, pct_peak=100 * gbps / peak))
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, fewer kernel cases (CI scale)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the adapter (default 48; 4 with --quick)")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed loads per loader (default 5; 3 with --quick)")
    ap.add_argument("--workdir", default=None, help="where to write the adapters (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    layers = args.layers or (4 if args.quick else QWEN3_30B_A3B["layers"])
    reps = args.reps or (3 if args.quick else 5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        load = bench_loading(layers, args.rank, reps, Path(tmp), device)
    print_loading(load)
    rows = bench_kernel(args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps({"loading": load, "kernel_rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
