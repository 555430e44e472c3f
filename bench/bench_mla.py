#!/usr/bin/env python
"""Benchmark the MLA LoRA corrections (``mla_absorbed_q``, ``mla_absorbed_o``) against the absorbed base BMMs.

    python bench/bench_mla.py             # GPU: DeepSeek-V3 shapes (H=128, Dn=Dv=128, C=512), r=16, bf16,
                                          # decode T in {64, 128, 256}, mixes distinct / uniform:8 / identical
    python bench/bench_mla.py --quick     # tiny CPU shapes (H=4, Dn=Dv=16, C=64, fp32), Triton in its interpreter
    python bench/bench_mla.py --json results.json   # also write the rows (DESIGN.md §6 row keys, plus H/Dn/Dv/C)

What is timed, per batch (the plan is built once per batch, as in serving, and not timed):

* ``base_bmm_q``: ``q_nope @ W_UK`` per head, ``torch.bmm([H, T, Dn], [H, Dn, C])`` — the absorbed query;
* ``base_bmm_o``: ``o_latent @ W_UV.T`` per head, ``torch.bmm([H, T, C], [H, C, Dv])`` — the absorbed output;
* ``mla_absorbed_q`` / ``mla_absorbed_o`` on each lorakern backend: the kv_b_proj LoRA added on top of them.

Columns: median / p20 / p80 µs (``lorakern.bench.harness.measure``: CUDA events with an L2 flush between calls on
the GPU, ``perf_counter`` on the CPU), GB/s over the fewest bytes the op must move (below), % of the copy
bandwidth measured in the same run, and ``x base``: the correction's median over its base BMM's median.

Bytes (element size ``e``, ``T_l`` tokens with an adapter, ``R`` = summed rank of the distinct adapters)::

    mla_absorbed_q  e·(R·C + R·H·Dn + T_l·H·Dn + 2·T_l·H·C) + 4·R   A, B_K half of B, q_nope, q_latent r/w
    mla_absorbed_o  e·(R·C + R·H·Dv + T_l·H·C + 2·T_l·H·Dv) + 4·R   A, B_V half of B, o_latent, out r/w
    base_bmm_q      e·(H·Dn·C + T·H·Dn + T·H·C)                       W_UK, q_nope, q_latent written
    base_bmm_o      e·(H·Dv·C + T·H·C + T·H·Dv)                       W_UV, o_latent, out written

At DeepSeek-V3 shapes one rank-16 adapter's half of B is 512 KiB in bf16 while W_UK is 16 MiB, so with ``distinct``
adapters the correction must move ~T/32 times the base BMM's weight bytes: it cannot be cheap there, only close
to bandwidth. Before timing, each backend's correction (added into zeros, so rounded once) is checked against the
torch backend's; a relative difference above 2e-2 skips the row with the reason (numbers are never made up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors only in the interpreter (read at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import lorakern  # noqa: F401
except ImportError:  # run from a checkout without installing: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakern import LoRAPlan  # noqa: E402
from lorakern.backends import BACKENDS  # noqa: E402
from lorakern.bench.harness import (environment, make_row, measure, peak_copy_gbps, results_doc,  # noqa: E402
                                    skipped_row)
from lorakern.ops import mla_absorbed_o, mla_absorbed_q  # noqa: E402
from lorakern.workloads import make_lora, make_slots  # noqa: E402

FULL = dict(H=128, Dn=128, Dv=128, C=512, rank=16, dtype=torch.bfloat16, T=(64, 128, 256),
            mixes=("distinct", "uniform:8", "identical"))
QUICK = dict(H=4, Dn=16, Dv=16, C=64, rank=16, dtype=torch.float32, T=(8, 16), mixes=("distinct", "identical"))


def mla_bytes(side: str, slots: torch.Tensor, rank: int, H: int, C: int, Dn: int, Dv: int, e: int) -> int:
    s = slots.cpu()
    t_lora = int((s >= 0).sum())
    R = rank * len(torch.unique(s[s >= 0]))
    D = Dn if side == "q" else Dv
    return e * (R * C + R * H * D + t_lora * H * (D + 2 * C if side == "q" else C + 2 * D)) + 4 * R


def bmm_bytes(side: str, T: int, H: int, C: int, Dn: int, Dv: int, e: int) -> int:
    D = Dn if side == "q" else Dv
    return e * (H * D * C + T * H * D + T * H * C)


def _mix(name: str, T: int):
    """(make_slots mix, adapters in the pool) for ``distinct`` (one adapter per token), ``uniform:<n>`` and
    ``identical``."""
    if name == "distinct":
        return "distinct", T
    if name.startswith("uniform"):
        return "uniform", int(name.split(":", 1)[1]) if ":" in name else 8
    if name == "identical":
        return "identical", 1
    raise SystemExit(f"bench_mla: unknown mix {name!r}")


def run(shapes: dict, device: torch.device, backends, budget_s: float, log=print):
    H, Dn, Dv, C, rank, dtype = (shapes[k] for k in ("H", "Dn", "Dv", "C", "rank", "dtype"))
    e = torch.empty((), dtype=dtype).element_size()
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    peak = peak_copy_gbps(device)
    log(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"copy bandwidth {peak:.1f} GB/s; H={H} Dn={Dn} Dv={Dv} C={C} r={rank} {str(dtype).replace('torch.', '')}")
    rows = []
    for mix_name in shapes["mixes"]:
        for T in shapes["T"]:
            g = torch.Generator().manual_seed(1000 * T + len(mix_name))
            mix, n_ad = _mix(mix_name, T)
            pool = make_lora(n_ad, C, [H * (Dn + Dv)], rank, dtype=dtype, device=device, generator=g,
                             poison_unused=False)
            a, b = pool.lora_a[0], pool.lora_b[0]
            slots = make_slots(mix, T, n_ad, generator=g, device=device)
            plan = LoRAPlan.from_slots(slots)
            adapters = len(torch.unique(slots.cpu()))
            rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
            q_nope, o_latent = rnd(T, H, Dn), rnd(T, H, C)
            w_uk, w_uv = rnd(H, Dn, C) / C ** 0.5, rnd(H, Dv, C) / C ** 0.5
            q_lat, out = torch.empty(H, T, C, dtype=dtype, device=device), torch.empty(H, T, Dv, dtype=dtype,
                                                                                          device=device)
            sides = {
                "q": dict(base=lambda: torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_lat), dst=q_lat, src=q_nope,
                          fn=mla_absorbed_q, K=Dn, N=[C]),
                "o": dict(base=lambda: torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out), dst=out,
                          src=o_latent, fn=mla_absorbed_o, K=C, N=[Dv]),
            }
            for side, sd in sides.items():
                common = dict(workload=mix_name, dtype=dtype, T=T, K=sd["K"], N=sd["N"], ranks=rank, adapters=adapters,
                              case=f"{mix_name}-T{T}")
                base_t = measure(sd["base"], device=device, budget_s=budget_s)
                base_row = make_row(op=f"base_bmm_{side}", backend="torch-bmm", timing=base_t, peak_gbps=peak,
                                    nbytes=bmm_bytes(side, T, H, C, Dn, Dv, e), **common)
                side_rows = [base_row]
                dst = sd["dst"].transpose(0, 1)  # [T, H, *] view of the bmm result, as an engine holds it
                sd["base"]()
                op, nbytes = f"mla_absorbed_{side}", mla_bytes(side, slots, rank, H, C, Dn, Dv, e)

                def call(d, be, fn=sd["fn"], src=sd["src"]):
                    return fn(d, src, a, b, pool.page_table, pool.ranks, pool.scales, plan, backend=be)

                want = None
                for be in backends:
                    reasons = BACKENDS[be].not_supported_reasons(device, dtype, rank)
                    if reasons:
                        side_rows.append(skipped_row(op=op, backend=be, nbytes=nbytes, reason="; ".join(reasons),
                                                     **common))
                        continue
                    if want is None:  # the correction alone (into zeros: rounded once), from the torch backend
                        want = call(torch.zeros_like(dst), "torch").float()
                    got = call(torch.zeros_like(dst), be).float()
                    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                    if not err <= 2e-2:
                        side_rows.append(skipped_row(op=op, backend=be, nbytes=nbytes, reason=f"wrong result: max "
                                                     f"relative difference {err:.3g} from the torch backend",
                                                     **common))
                        continue
                    t = measure(lambda be=be: call(dst, be), device=device, budget_s=budget_s)
                    note = "Triton CPU interpreter (not a performance number)" if (be == "triton" and interp) else None
                    row = make_row(op=op, backend=be, timing=t, peak_gbps=peak, nbytes=nbytes, note=note, **common)
                    row["x_base"] = round(row["median_us"] / base_row["median_us"], 3)
                    side_rows.append(row)
                for r in side_rows:
                    r.update(H=H, Dn=Dn, Dv=Dv, C=C)
                rows += side_rows
            log(f"  {mix_name} T={T}: done")
    return rows, peak


def format_rows(rows) -> str:
    cols = ("op", "backend", "workload", "T", "adapters", "median us", "p20 us", "p80 us", "MB", "GB/s", "% peak",
            "x base")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        if r.get("skipped"):
            lines.append(" | ".join([r["op"], r["backend"], r["workload"], str(r["T"]), str(r["adapters"]),
                                     f"skipped: {r['skipped'][:90]}"]))
            continue
        lines.append(" | ".join([r["op"], r["backend"], r["workload"], str(r["T"]), str(r["adapters"]),
                                 f(r["median_us"]), f(r["p20_us"]), f(r["p80_us"]), f(r["bytes"] / 1e6, 3),
                                 f(r["gbps"], 2), f(r["pct_peak"], 2), f(r.get("x_base"), 2)]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU-friendly shapes (the default without CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--backends", nargs="+", default=None, help="lorakern backends (default: cuda triton torch)")
    p.add_argument("--T", nargs="+", type=int, default=None, help="token counts (default: by mode)")
    p.add_argument("--mixes", nargs="+", default=None, help="distinct | uniform:<n> | identical")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row (default 1.0)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the rows and environment as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    if not args.quick and device.type != "cuda":
        print("# no CUDA device: running the --quick shapes", file=sys.stderr)
    shapes = dict(QUICK if quick else FULL)
    if args.T:
        shapes["T"] = tuple(args.T)
    if args.mixes:
        shapes["mixes"] = tuple(args.mixes)
    backends = args.backends or ["cuda", "triton", "torch"]
    rows, peak = run(shapes, device, backends, args.budget, log=lambda m: print(m, file=sys.stderr))
    print(format_rows(rows))
    if args.json:
        doc = results_doc(rows, env=environment(device), peak_copy_gbps=peak, bench="bench_mla",
                          shapes={k: (str(v) if k == "dtype" else v) for k, v in shapes.items()})
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
