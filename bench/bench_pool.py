#!/usr/bin/env python
"""Benchmark the adapter pool's host side: the catalog at scale, wave admission, and load throughput.

    python bench/bench_pool.py            # catalog of 10^6 adapters, 1024-adapter wave, 48 PEFT adapters loaded
    python bench/bench_pool.py --quick    # catalog of 10^5, 16 adapters: CI scale, ~20 s on 2 cores
    python bench/bench_pool.py --json out.json

What is measured (all on the machine it runs on; with no GPU the pool is on the CPU and the "host → pool" copy
is a host memcpy — no GPU figure is claimed):

* catalog: build time from columns (hashing, sort, write), index file size, reopen time and resident memory in a
  fresh process (after open, and after 10^5 random lookups), scalar and batched lookups per second (hits and
  misses);
* admission: ``acquire`` + ``release`` of a wave of 1024 distinct adapters that are all resident (host time per
  wave; the target is <= 1 ms), and of a 4096-token wave over the same adapters;
* loads: PEFT directories written with safetensors, then disk → host record (read, parse, pack; the files are in
  the page cache, having just been written), host cache → pool, and cold disk → pool, in adapters/s and GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import lorakern  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakern.pool import AdapterCatalog, AdapterPool, PoolLayout, TargetSpec, TensorAdapter, save_peft_dir


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def catalog_ids(n: int):
    return [f"tenant-{i % 4096:04d}/adapter-{i:08d}" for i in range(n)]


# ------------------------------------------------------------------------------------------------ catalog
def bench_catalog(n: int, workdir: Path, rows: list) -> None:
    path = workdir / "catalog.lkcat"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    ids = catalog_ids(n)
    packs = [f"packs/pack-{i:03d}.bin" for i in range(256)]
    paths = [packs[i % 256] for i in range(n)]
    ranks = rng.choice([8, 16, 32, 64], n)
    targets = rng.integers(1, 16, n).astype(np.uint64)
    offsets = rng.integers(0, 2**36, n)
    lengths = rng.integers(2**16, 2**24, n)
    t_gen = time.perf_counter() - t0
    rss0, peak0 = rss_mb(), peak_rss_mb()
    t0 = time.perf_counter()
    cat = AdapterCatalog.build(path, ids, paths, ranks, target_names=("qkv_proj", "o_proj", "gate_up_proj",
                                                                       "down_proj"),
                               targets=targets, dtypes="bfloat16", revisions=None, offsets=offsets, lengths=lengths,
                               progress=True)
    t_build = time.perf_counter() - t0
    peak_build = peak_rss_mb() - peak0
    size_mb = path.stat().st_size / 2**20
    cat.close()
    del cat
    rows.append(("catalog", "entries", f"{n:,}", ""))
    rows.append(("catalog", "build (hash + sort + write)", f"{t_build:.2f} s",
                 f"{n / t_build / 1e3:.0f}k entries/s; generating the input columns took {t_gen:.2f} s"))
    rows.append(("catalog", "peak RSS growth during build", f"{peak_build:.0f} MB",
                 f"the builder and the writer (the input columns, made before, excluded); RSS before {rss0:.0f} MB"))
    rows.append(("catalog", "index file", f"{size_mb:.1f} MB", f"{size_mb * 2**20 / n:.0f} B/entry"))
    # reopen and look up in a fresh process: honest RSS and open time
    probe = subprocess.run([sys.executable, __file__, "--_probe", str(path), str(n)], capture_output=True, text=True,
                           check=True)
    r = json.loads(probe.stdout.strip().splitlines()[-1])
    rows.append(("catalog", "reopen (fresh process, mmap)", f"{r['open_ms']:.2f} ms",
                 f"RSS +{r['rss_open_mb']:.1f} MB after open (warm page cache)"))
    rows.append(("catalog", "host memory after 1e5 random lookups", f"+{r['rss_lookup_mb']:.0f} MB",
                 f"RSS growth since open (mapped pages touched); the whole index is {size_mb:.0f} MB"))
    rows.append(("catalog", "lookup, scalar hit", f"{r['hit_per_s'] / 1e3:.0f}k /s",
                 f"{1e6 / r['hit_per_s']:.2f} us each (hash, bisect, id compare)"))
    rows.append(("catalog", "lookup, scalar miss", f"{r['miss_per_s'] / 1e3:.0f}k /s", ""))
    rows.append(("catalog", "lookup, batched (indices, 1e5 ids)", f"{r['batch_per_s'] / 1e3:.0f}k /s", ""))
    rows.append(("catalog", "entry() materialisation", f"{r['entry_per_s'] / 1e3:.0f}k /s", ""))


def probe_catalog(path: str, n: int) -> None:
    rng = np.random.default_rng(1)
    q = 100_000
    pick = rng.integers(0, n, q)
    ids = [f"tenant-{i % 4096:04d}/adapter-{i:08d}" for i in pick.tolist()]
    miss = [f"tenant-x/adapter-{i:08d}" for i in range(20_000)]
    rss0 = rss_mb()
    t0 = time.perf_counter()
    cat = AdapterCatalog.open(path)
    t_open = time.perf_counter() - t0
    rss1 = rss_mb()
    t0 = time.perf_counter()
    for a in ids:
        if cat.index(a) < 0:
            raise SystemExit(f"lookup failed for {a}")
    t_hit = time.perf_counter() - t0
    rss2 = rss_mb()
    t0 = time.perf_counter()
    for a in miss:
        if cat.index(a) >= 0:
            raise SystemExit("false hit")
    t_miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = cat.indices(ids)
    t_batch = time.perf_counter() - t0
    assert (idx >= 0).all()
    t0 = time.perf_counter()
    for a in ids[:20_000]:
        cat.entry(a)
    t_entry = time.perf_counter() - t0
    print(json.dumps({"open_ms": t_open * 1e3, "rss_open_mb": rss1 - rss0, "rss_lookup_mb": rss2 - rss1,
                      "hit_per_s": q / t_hit, "miss_per_s": len(miss) / t_miss, "batch_per_s": q / t_batch,
                      "entry_per_s": 20_000 / t_entry}))


# ------------------------------------------------------------------------------------------------ admission
def bench_admission(rows: list, n: int = 1024) -> None:
    lay = PoolLayout(1, {"o": TargetSpec(64, (64,))})
    pool = AdapterPool(lay, max_rows=n * 8, max_slots=n, max_rank=8, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    ids = [f"tenant-{i % 64:02d}/adapter-{i:06d}" for i in range(n)]
    for a in ids:
        pool.register(a, TensorAdapter({(0, "o", 0): (torch.randn(8, 64, generator=g), torch.randn(64, 8,
                                                                                                   generator=g))}))
    pool.load(ids)

    def timed(wave, reps=300):
        acq, rel = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            pool.acquire(wave)
            t1 = time.perf_counter()
            pool.release(wave)
            t2 = time.perf_counter()
            acq.append(t1 - t0)
            rel.append(t2 - t1)
        acq.sort()
        rel.sort()
        return statistics.median(acq) * 1e6, acq[int(0.9 * len(acq))] * 1e6, statistics.median(rel) * 1e6

    rng = np.random.default_rng(0)
    perm = [ids[i] for i in rng.permutation(n)]
    a50, a90, r50 = timed(perm)
    rows.append(("admission", f"acquire, {n} distinct resident adapters", f"{a50:.0f} us",
                 f"p90 {a90:.0f} us; release {r50:.0f} us; target <= 1000 us"))
    toks = [ids[i] for i in rng.integers(0, n, 4096)] + [None] * 256
    a50, a90, r50 = timed(toks, reps=100)
    rows.append(("admission", "acquire, 4352-token wave over them (256 -1)", f"{a50:.0f} us",
                 f"p90 {a90:.0f} us; release {r50:.0f} us"))


# ------------------------------------------------------------------------------------------------ loads
def bench_loads(rows: list, workdir: Path, n_adapters: int, num_layers: int) -> None:
    hidden, inter, heads, kv = 1024, 2816, 16, 4
    lay = PoolLayout.llama(num_layers, hidden, inter, heads, kv)
    rank = 16
    g = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden // heads * kv),
              "v_proj": (hidden, hidden // heads * kv), "o_proj": (hidden, hidden), "gate_proj": (hidden, inter),
              "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    sub = {p: ("self_attn" if p[0] in "qkvo" else "mlp") for p in shapes}
    root = workdir / "peft"
    t0 = time.perf_counter()
    base = {}
    for layer in range(num_layers):
        for p, (K, N) in shapes.items():
            base[f"model.layers.{layer}.{sub[p]}.{p}"] = (torch.randn(rank, K, generator=g).bfloat16(),
                                                          torch.randn(N, rank, generator=g).bfloat16())
    for i in range(n_adapters):
        mods = {k: (a + i, b) for k, (a, b) in base.items()} if i else base
        save_peft_dir(root / f"a{i:04d}", mods, r=rank, lora_alpha=2 * rank)
    t_write = time.perf_counter() - t0
    file_mb = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / n_adapters / 2**20
    ids = [f"a{i:04d}" for i in range(n_adapters)]

    def new_pool(cache_bytes):
        p = AdapterPool(lay, max_rows=rank * n_adapters, max_slots=n_adapters, max_rank=64, dtype=torch.bfloat16,
                        host_cache=cache_bytes)
        for a in ids:
            p.register(a, root / a)
        return p

    pool = new_pool(8 << 30)
    rec_mb = rank * pool.row_bytes / 2**20
    # disk -> host records (read, check, parse, pack), into the host cache
    t0 = time.perf_counter()
    pool.prefetch_host(ids)
    t_host = time.perf_counter() - t0
    # host cache -> pool rows
    t0 = time.perf_counter()
    pool.load(ids)
    t_pool = time.perf_counter() - t0
    # evict all and reload from the host cache (a second, warm pass)
    for a in ids:
        pool.evict(a)
    t0 = time.perf_counter()
    pool.load(ids)
    t_pool2 = time.perf_counter() - t0
    # cold: no host cache, disk -> pool in one go
    cold = new_pool(0)
    t0 = time.perf_counter()
    cold.load(ids)
    t_cold = time.perf_counter() - t0
    rows.append(("loads", "layout", f"{num_layers} layers",
                 f"Llama-style hidden {hidden}, intermediate {inter}, {heads}/{kv} heads; rank {rank}, bf16; "
                 f"{pool.row_bytes / 1024:.0f} KiB per rank row, {rec_mb:.1f} MiB per adapter "
                 f"({file_mb:.1f} MiB file); wrote {n_adapters} PEFT dirs in {t_write:.1f} s"))
    for what, t, mb in (("disk -> host record (read, parse, pack)", t_host, file_mb),
                        ("host cache -> pool (first load)", t_pool, rec_mb),
                        ("host cache -> pool (reload after evict)", t_pool2, rec_mb),
                        ("disk -> pool, no host cache (cold)", t_cold, file_mb)):
        rows.append(("loads", what, f"{n_adapters / t:.0f} adapters/s",
                     f"{mb * n_adapters / t / 1024:.2f} GB/s; {t / n_adapters * 1e3:.2f} ms each"))


# ------------------------------------------------------------------------------------------------ main
def print_table(rows, header) -> str:
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    lines = [" | ".join(str(h).ljust(w[i]) for i, h in enumerate(header)),
             "-+-".join("-" * x for x in w)]
    lines += [" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^5-entry catalog and 16 adapters (CI scale)")
    ap.add_argument("--catalog-size", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=None, help="PEFT adapters for the load benchmark")
    ap.add_argument("--json", type=str, default=None, help="also write the table as JSON here")
    ap.add_argument("--_probe", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._probe:
        probe_catalog(args._probe[0], int(args._probe[1]))
        return 0
    n_cat = args.catalog_size or (100_000 if args.quick else 1_000_000)
    n_ad = args.adapters or (16 if args.quick else 48)
    rows = []
    machine = (f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), torch {torch.__version__}, "
               f"CUDA {'available' if torch.cuda.is_available() else 'not available'}, load average at start "
               f"{os.getloadavg()[0]:.2f}")
    print(f"bench_pool on {machine}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_pool_") as tmp:
        work = Path(tmp)
        bench_catalog(n_cat, work, rows)
        bench_admission(rows)
        bench_loads(rows, work, n_ad, num_layers=4 if args.quick else 8)
    table = print_table(rows, ("section", "measure", "value", "notes"))
    print(f"# bench_pool — {machine}\n")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": [
            dict(zip(("section", "measure", "value", "notes"), r)) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
