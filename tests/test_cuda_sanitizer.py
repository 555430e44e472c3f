"""compute-sanitizer memcheck on a small case of every CUDA-backend op (GPU only): no out-of-bounds access, in
particular none through page-table entries beyond a slot's rank (poisoned by make_lora)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.gpu

SCRIPT = textwrap.dedent(
    """
    import torch, lorakern
    from lorakern.workloads import make_lora, make_slots
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    for dt in (torch.bfloat16, torch.float32):
        L = make_lora(9, 100, (72, 40), "1-40", max_rank=48, dtype=dt, device=dev, generator=g)
        for mix, T in (("distinct", 9), ("uniform", 70)):
            s = make_slots(mix, T, 9, none_frac=0.2, generator=g).to(dev)
            x = torch.randn(T, 100, generator=g).to(dt).to(dev)
            out = torch.randn(T, 112, generator=g).to(dt).to(dev)
            lorakern.ops.add_lora(out, x, *L.args(), s, backend="cuda")
            y = lorakern.ops.lora_shrink(x, L.lora_a, L.page_table, L.ranks, s, backend="cuda")
            lorakern.ops.lora_expand(out, y, L.lora_b, L.page_table, L.ranks, L.scales, s, backend="cuda")
    torch.cuda.synchronize()
    print("sanitizer-case-done")
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memcheck_cuda_backend(tmp_path):
    from lorakern.backends import BACKENDS

    reasons = BACKENDS["cuda"].not_supported_reasons(torch.device("cuda"), torch.bfloat16)
    if reasons:
        pytest.skip("; ".join(reasons))
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "case.py"
    script.write_text(SCRIPT)
    r = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "sanitizer-case-done" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr
