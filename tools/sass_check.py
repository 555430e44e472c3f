"""Checks on the machine code (SASS) of the built CUDA extension that need no GPU.

The decode kernel is bound by how many bytes each warp keeps in flight. Until session 8 a branch in its shrink's
unrolled K loop kept ptxas from issuing more than one A load (and one x load) per warp before using them (sm_90a
SASS: load, load, convert, FMA, next load): ~12 KB in flight per SM, latency-bound at ~72 % of the copy bandwidth.
This reads the SASS of the decode instantiations in a built ``_C.so`` (``cuobjdump``: the CUDA toolkit's, or the one
the triton wheel ships) and reports, per arch, the longest run of 16-byte global loads issued with no FMA between
them before the warp's first reduction (the shrink): 2 for the old loop, 8 now (4 steps of A and x).

The fused segment kernel's shrink (session 9): until then each (16-wide k step, 16-column block) of its K loop sat
behind a warp-uniform branch on whether the warp's block is live, 16 branches per K step, so ptxas could not issue
one block's ldmatrix under the previous block's mma; the K loop is now instantiated per block count with no branch
in it. This also checks that, in every K loop of the fused kernels (the innermost loops with one barrier and
tensor-core instructions), no branch lies between the first ldmatrix and the last mma.

    python tools/sass_check.py build/_C.so        # the report; exit status 1 if a check fails

Used by tests/test_cuda_build.py on the extension CI builds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_build  # noqa: E402

#: the decode instantiations: dense_gather_kernel<T, MT = 1, VEC = true, Mode::kFused, XS = false>, and the MoE
#: (and MLA) one, Mode::kMoe (2 loads with the branch, 16 without)
DECODE_KERNELS = {
    "bf16": "_ZN8lorakern19dense_gather_kernelI13__nv_bfloat16Li1ELb1ELNS_4ModeE0ELb0EEEvNS_11DenseParamsE",
    "fp16": "_ZN8lorakern19dense_gather_kernelI6__halfLi1ELb1ELNS_4ModeE0ELb0EEEvNS_11DenseParamsE",
    "moe bf16": "_ZN8lorakern19dense_gather_kernelI13__nv_bfloat16Li1ELb1ELNS_4ModeE3ELb0EEEvNS_11DenseParamsE",
}
#: fewest 16-byte loads the shrink must issue back to back (before using them) on every arch
MIN_RUN = 4
#: the fused segment kernels whose K loops must be branch-free (bf16 and fp16 at the deepest ring configuration)
FUSED_KERNELS = {
    "fused bf16": "_ZN8lorakern20segment_fused_kernelI13__nv_bfloat16Li6ELi3EEEvNS_11DenseParamsE",
    "fused fp16": "_ZN8lorakern20segment_fused_kernelI6__halfLi6ELi3EEEvNS_11DenseParamsE",
}


def find_cuobjdump():
    """The toolkit's cuobjdump, else the copy in the triton wheel (``triton/backends/nvidia/bin``), else None."""
    found = cuda_build.find_cuda_tool("cuobjdump")
    if found:
        return found
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if p.exists():
            return str(p)
    return None


def sass(binary, function: str, cuobjdump=None, addresses: bool = False) -> dict:
    """{arch: [instruction text]} of ``function`` in ``binary`` (an ELF with embedded cubins), one entry per
    arch that has it; with ``addresses``, [(address, instruction text)]."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or the triton wheel)")
    r = subprocess.run([tool, "-sass", "-fun", function, str(binary)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {r.stderr.strip()[-500:]}")
    out: dict = {}
    for part in re.split(r"(?=^\s*arch = sm_)", r.stdout, flags=re.M):
        m = re.search(r"arch = (sm_\w+)", part)
        ops = re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", part)
        if m and ops and function in part:
            out[m.group(1)] = [(int(a, 16), o.strip()) if addresses else o.strip() for a, o in ops]
    return out


def k_loops(ops) -> list:
    """The K loops of a fused kernel in ``ops`` ([(address, text)]): the innermost loops (a backward branch with no
    other backward branch inside) holding exactly one barrier and tensor-core instructions. One list of
    instruction texts each."""
    index = {a: i for i, (a, _) in enumerate(ops)}
    loops = []
    for i, (a, o) in enumerate(ops):
        m = re.search(r"\bBRA (0x[0-9a-f]+)", o)
        if not m or int(m.group(1), 16) >= a or int(m.group(1), 16) not in index:
            continue
        lo = index[int(m.group(1), 16)]
        body = ops[lo:i + 1]
        inner = [x for x, t in body[:-1] if (b := re.search(r"\bBRA (0x[0-9a-f]+)", t)) and int(b.group(1), 16) < x]
        texts = [t for _, t in body]
        if not inner and sum("BAR.SYNC" in t for t in texts) == 1 and any(t.startswith("HMMA") for t in texts):
            loops.append(texts)
    return loops


def branches_in_mma(loop) -> int:
    """Branches between a loop's first ldmatrix and its last mma."""
    first = next((i for i, t in enumerate(loop) if t.startswith("LDSM")), None)
    last = max((i for i, t in enumerate(loop) if t.startswith("HMMA")), default=None)
    if first is None or last is None:
        return 0
    return sum(bool(re.search(r"\bBRA\b", t)) for t in loop[first:last + 1])


def shrink_load_run(ops) -> int:
    """The longest run of 16-byte global loads with no FMA between them, before the first warp shuffle (in the
    decode kernel: the shrink's K loop, ahead of its warp reduction)."""
    best = run = 0
    for o in ops:
        if o.startswith("SHFL"):
            break
        if o.startswith("LDG") and ".128" in o:
            run += 1
            best = max(best, run)
        elif o.startswith(("FFMA", "FMUL", "FADD", "HFMA2")):
            run = 0
    return best


def report(binary) -> tuple:
    """(lines, ok): the shrink's load run per decode kernel and arch."""
    lines, ok = [], True
    for dt, fn in DECODE_KERNELS.items():
        per_arch = sass(binary, fn)
        if not per_arch:
            lines.append(f"{dt}: decode kernel not found in {binary}")
            ok = False
        for arch, ops in sorted(per_arch.items()):
            n = shrink_load_run(ops)
            good = n >= MIN_RUN
            ok &= good
            lines.append(f"{dt} {arch}: {n} 16-byte loads issued back to back in the shrink "
                         f"({'ok' if good else f'below {MIN_RUN}'})")
    for name, fn in FUSED_KERNELS.items():
        per_arch = sass(binary, fn, addresses=True)
        if not per_arch:
            lines.append(f"{name}: kernel not found in {binary}")
            ok = False
        for arch, ops in sorted(per_arch.items()):
            loops = k_loops(ops)
            bad = [branches_in_mma(lp) for lp in loops]
            good = bool(loops) and not any(bad)
            ok &= good
            lines.append(f"{name} {arch}: {len(loops)} K loop(s), branches among their ldmatrix/mma: "
                         f"{bad} ({'ok' if good else 'FAIL'})")
    return lines, ok


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    lines, ok = report(argv[0])
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
