"""Ahead-of-time compile of every Triton kernel for real GPU targets, with no GPU present.

Triton can lower a kernel to PTX and run ``ptxas`` for a named target (``GPUTarget("cuda", 90, 32)``) on a machine
without a GPU. CI does that for the instantiation matrix below (sm_80 and sm_90, fp16/bf16/fp32, both paths'
block sizes), so a kernel that would not compile for a GPU fails CI here, not on a borrowed GPU later. The
interpreter tests check the numbers; this checks that the GPU build exists.

Run: ``python -m lorakern.triton.aot`` (must run *without* ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys
import time

_DT = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def _signature(fn, dtype: str, consts: dict) -> dict:
    """Triton signature strings for a kernel of this module's naming scheme: ``*_ptr`` are data pointers of the
    op dtype except the int32 metadata; ``*_table`` are int64 pointer/stride tables; ``s*`` are int64 strides;
    the rest are int32 sizes."""
    meta = {"pt_ptr": "*i32", "ranks_ptr": "*i32", "tiles_ptr": "*i32", "token_ids_ptr": "*i32",
            "y_ptr": "*fp32", "scales_ptr": "*fp32",
            "pair_ids_ptr": "*i32", "num_tiles_ptr": "*i32", "topk_w_ptr": "*fp32"}  # the last three: moe
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in meta:
            sig[name] = meta[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name.endswith("_table"):
            sig[name] = "*i64"
        elif name.startswith("s"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def matrix():
    """(kernel name, dtype, constexprs, num_warps) for every kernel variant the host code launches on a GPU."""
    from lorakern.triton import lora as tk

    os.environ.pop("TRITON_INTERPRET", None)
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        ieee = dt == "fp32"
        for path in ("gather", "segment"):
            cfg = tk._cfg(path)
            w = cfg["num_warps"]
            base = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], UPCAST=False, IEEE=ieee)
            if path == "gather":
                out.append(("_fused_kernel", dt, dict(base, HAS_SCALE=True, BLOCK_K=cfg["BLOCK_K"],
                                                      BLOCK_N=cfg["BLOCK_N"]), w))
            out.append(("_shrink_kernel", dt, dict(base, BLOCK_K=cfg["BLOCK_K"]), w))
            out.append(("_expand_kernel", dt, dict(base, HAS_SCALE=True, BLOCK_N=cfg["BLOCK_N"]), w))
    out += _mla_matrix()
    out += _moe_matrix()
    return out


def _mla_matrix():
    """The MLA kernels (lorakern/triton/mla.py), named ``mla.<kernel>``; their GPU block sizes are fixed."""
    from lorakern.triton import mla as mk

    out = []
    for dt in ("bf16", "fp16", "fp32"):
        c = mk.cfg(1, 1, 1, interpret=False)
        w = c.pop("num_warps")
        for name in ("_mla_q_kernel", "_mla_o_kernel"):
            out.append((f"mla.{name}", dt, dict(c, HAS_SCALE=True, UPCAST=False, IEEE=dt == "fp32"), w))
    return out


def _moe_matrix():
    """The packed MoE kernel (lorakern/triton/moe.py), named ``moe._moe_kernel``; its GPU block sizes are fixed.
    With and without routed weights (``HAS_WEIGHTS``), for every dtype."""
    from lorakern.triton import moe as mk

    out = []
    for dt in ("bf16", "fp16", "fp32"):
        c = mk.cfg(interpret=False)
        w = c.pop("num_warps")
        for has_w in (True, False):
            out.append(("moe._moe_kernel", dt, dict(c, HAS_SCALE=True, HAS_WEIGHTS=has_w, UPCAST=False,
                                                    IEEE=dt == "fp32"), w))
    return out


def _kernel(name: str):
    """A kernel of the matrix by name: ``<kernel>`` in lorakern/triton/lora.py, ``<module>.<kernel>`` elsewhere."""
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(f"lorakern.triton.{module or 'lora'}"), attr)


def compile_all(archs=(80, 90), verbose=True) -> int:
    """Compile the matrix for each arch; returns the number of failures (printed)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("lorakern.triton.aot must run without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for name, dt, consts, warps in matrix():
        fn = _kernel(name)
        for cc in archs:
            t0 = time.perf_counter()
            try:
                src = ASTSource(fn=fn, signature=_signature(fn, dt, consts), constexprs=dict(consts))
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
                status = f"ok   shared={k.metadata.shared}B"
            except Exception as e:  # report every failure, then fail at the end
                failures += 1
                status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if verbose:
                print(f"sm_{cc} {name:16s} {dt:5s} {consts} {time.perf_counter() - t0:5.1f}s {status}", flush=True)
    return failures


def main() -> int:
    archs = tuple(int(a) for a in os.environ.get("LORAKERN_TRITON_AOT_ARCHS", "80,90").split(","))
    n = compile_all(archs)
    print(f"{n} kernel variant(s) failed to compile" if n else "all Triton kernel variants compiled")
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
