"""compute-sanitizer on a small case of every CUDA-backend op (GPU only): add_lora (gather, split and fused segment
kernels), lora_shrink, lora_expand, add_lora_moe and the two absorbed MLA ops, under each of its four tools:

- memcheck: no out-of-bounds access, in particular none through page-table entries beyond a slot's rank (poisoned:
  they point past the rows);
- racecheck: no shared-memory hazard between threads of a CTA (the cp.async rings, the Y terms, the out chunks);
- synccheck: no barrier reached by part of a CTA or of a warp;
- initcheck: no read of global memory nothing wrote (the split shrink's y is torch.empty: the expand must read only
  what the shrink wrote).

The three tools after memcheck look at lorakern's kernels only (``--kernel-name kns=lorakern``): torch's own kernels
(random numbers, the plan's sorts) are not ours to answer for. The CPU emulator checks the same properties its own
way (poisoned shared memory, warps in random order, barriers that must match; tests/test_cuda_emulator.py)."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import os
    import torch, lorakern
    from lorakern.workloads import make_lora, make_slots
    g = torch.Generator().manual_seed(0)
    dev = torch.device(os.environ.get("LK_SANITIZER_DEVICE", "cuda"))  # (cpu: the emulator, for tests/ on a CPU)
    # the dense ops: the decode (gather) path and the prefill (segment) path, split and fused kernels (the paths
    # forced: at these sizes the plan would take the gather path)
    for path, mode in (("gather", "split"), ("segment", "split"), ("segment", "fused")):
        os.environ["LORAKERN_TRITON_PATH"], os.environ["LORAKERN_CUDA_SEGMENT"] = path, mode
        K = 96 if path == "segment" else 100  # (the segment kernels take rows of 16-byte multiples, else gather)
        for dt in (torch.bfloat16, torch.float32):
            L = make_lora(9, K, (72, 40), "1-40", max_rank=48, dtype=dt, device=dev, generator=g)
            for mix, T in (("distinct", 9), ("uniform", 70)):
                s = make_slots(mix, T, 9, none_frac=0.2, generator=g).to(dev)
                x = torch.randn(T, K, generator=g).to(dt).to(dev)
                out = torch.randn(T, 112, generator=g).to(dt).to(dev)
                lorakern.ops.add_lora(out, x, *L.args(), s, backend="cuda")
                y = lorakern.ops.lora_shrink(x, L.lora_a, L.page_table, L.ranks, s, backend="cuda")
                lorakern.ops.lora_expand(out, y, L.lora_b, L.page_table, L.ranks, L.scales, s, backend="cuda")
    os.environ.pop("LORAKERN_CUDA_SEGMENT"), os.environ.pop("LORAKERN_TRITON_PATH")
    # add_lora_moe: 2 slices (gate, up) over E experts, top-2 routing; rank rows past each rank point out of range
    T, E, K, topk, S, R, rows = 12, 6, 40, 2, 4, 8, 40
    dt = torch.bfloat16
    la = [torch.randn(rows, E, K, generator=g).to(dt).to(dev) for _ in range(2)]
    lb = [torch.randn(rows, E, n, generator=g).to(dt).to(dev) for n in (24, 24)]
    pt = torch.randint(0, rows, (S, R), generator=g, dtype=torch.int32)
    ranks = torch.tensor([8, 3, 0, 5], dtype=torch.int32)
    for si in range(S):
        pt[si, ranks[si]:] = rows + 1000  # never read
    pt, ranks = pt.to(dev), ranks.to(dev)
    scales = torch.rand(S, generator=g).to(dev)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]).to(dev)
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32).to(dev)
    x = torch.randn(T, K, generator=g).to(dt).to(dev)
    out = torch.randn(T, topk, 48, generator=g).to(dt).to(dev)
    lorakern.ops.add_lora_moe(out, x, ids, la, lb, pt, ranks, scales, slots, backend="cuda")
    # the absorbed MLA ops (heads as experts), the same page table
    H, C, Dn, Dv = 4, 32, 16, 8
    a = torch.randn(rows, C, generator=g).to(dt).to(dev)
    b = torch.randn(rows, H * (Dn + Dv), generator=g).to(dt).to(dev)
    q_latent = torch.randn(T, H, C, generator=g).to(dt).to(dev)
    q_nope = torch.randn(T, H, Dn, generator=g).to(dt).to(dev)
    lorakern.ops.mla_absorbed_q(q_latent, q_nope, a, b, pt, ranks, scales, slots, backend="cuda")
    o_out = torch.randn(T, H, Dv, generator=g).to(dt).to(dev)
    o_latent = torch.randn(T, H, C, generator=g).to(dt).to(dev)
    lorakern.ops.mla_absorbed_o(o_out, o_latent, a, b, pt, ranks, scales, slots, backend="cuda")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("sanitizer-case-done")
    """
)


#: compute-sanitizer's tools, each with the arguments it runs with (memcheck sees every kernel of the process)
TOOLS = {
    "memcheck": [],
    "racecheck": ["--kernel-name", "kns=lorakern", "--racecheck-report", "all"],
    "synccheck": ["--kernel-name", "kns=lorakern"],
    "initcheck": ["--kernel-name", "kns=lorakern"],
}


def sanitizer_findings(tool: str, text: str) -> list:
    """What a compute-sanitizer report says is wrong, as lines; empty for a clean run. A report with no summary at
    all counts as wrong (the tool did not run to its end), and so does racecheck's hazard count: errors and warnings
    alike (a warning is a hazard racecheck could not prove harmful: every one of ours would be a real question)."""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY:\s*(\d+) errors?", text)]
    races = re.findall(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed\s*\((\d+) errors?,\s*(\d+) warnings?\)",
                       text)
    found = []
    if tool == "racecheck":
        if not races:
            found.append("no RACECHECK SUMMARY line")
        found += [f"racecheck: {h} hazards ({e} errors, {w} warnings)" for h, e, w in races if int(h)]
    elif not errors:
        found.append("no ERROR SUMMARY line")
    found += [f"{tool}: {n} errors" for n in errors if n]
    return found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tool", list(TOOLS))
def test_sanitizer_cuda_backend(tool, tmp_path):
    from lorakern.backends import BACKENDS

    reasons = BACKENDS["cuda"].not_supported_reasons(torch.device("cuda"), torch.bfloat16)
    if reasons:
        pytest.skip("; ".join(reasons))
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "case.py"
    script.write_text(SCRIPT)
    r = subprocess.run([exe, "--tool", tool, *TOOLS[tool], "--error-exitcode", "3", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=600)
    report = r.stdout + r.stderr
    assert r.returncode == 0 and "sanitizer-case-done" in r.stdout, report[-6000:]
    findings = sanitizer_findings(tool, report)
    assert not findings, "\n".join(findings) + "\n" + report[-6000:]


@pytest.mark.parametrize("tool, text, want", [
    ("memcheck", "========= ERROR SUMMARY: 0 errors\n", []),
    ("memcheck", "========= ERROR SUMMARY: 2 errors\n", ["memcheck: 2 errors"]),
    ("initcheck", "sanitizer-case-done\n", ["no ERROR SUMMARY line"]),
    ("synccheck", "========= ERROR SUMMARY: 1 error\n", ["synccheck: 1 errors"]),
    ("racecheck", "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", []),
    ("racecheck", "========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)\n",
     ["racecheck: 1 hazards (0 errors, 1 warnings)"]),
    ("racecheck", "========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)\n"
                  "========= ERROR SUMMARY: 3 errors\n", ["racecheck: 3 hazards (3 errors, 0 warnings)",
                                                          "racecheck: 3 errors"]),
    ("racecheck", "========= ERROR SUMMARY: 0 errors\n", ["no RACECHECK SUMMARY line"]),
])
def test_sanitizer_reports_are_read_strictly(tool, text, want):
    """The GPU test's reading of a report (on report texts in compute-sanitizer's format): a clean summary passes;
    any error, any racecheck hazard or a missing summary (a tool that never finished) fails."""
    assert sanitizer_findings(tool, text) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the memcheck test runs the script itself")
def test_the_memcheck_script_runs_every_kernel_on_the_emulator(monkeypatch):
    """The GPU test's script, run here with the cuda backend on the CPU emulator: it calls every op as the current
    API wants (a broken script would only show on a lent GPU, as a failure of the memcheck test), and it reaches
    every kernel: the gather kernel in its four modes and the three segment kernels."""
    from lorakern import cuda_backend
    from lorakern.backends import cuda_emulator

    emu = cuda_emulator()
    if isinstance(emu, str):
        pytest.skip(emu)
    for k, v in (("LK_SANITIZER_DEVICE", "cpu"), ("LORAKERN_CUDA_EMULATE", "1"), ("LORAKERN_TRITON_PATH", ""),
                 ("LORAKERN_CUDA_SEGMENT", "")):
        monkeypatch.setenv(k, v)  # (restored afterwards, whatever the script leaves)
    launched = set()
    real_ext = cuda_backend._ext

    class Spy:
        def __init__(self, ext):
            self.ext = ext

        def dense_gather(self, fields, dtype, mode, *a):
            launched.add(("gather", mode))
            return self.ext.dense_gather(fields, dtype, mode, *a)

        def dense_segment(self, fields, dtype, mode, *a):
            launched.add(("segment", mode))
            return self.ext.dense_segment(fields, dtype, mode, *a)

        def __getattr__(self, name):
            return getattr(self.ext, name)

    monkeypatch.setattr(cuda_backend, "_ext", lambda device: Spy(real_ext(device)))
    exec(compile(SCRIPT, "memcheck-script", "exec"), {})
    assert launched == {("gather", m) for m in range(4)} | {("segment", m) for m in (1, 2, 3)}, launched
