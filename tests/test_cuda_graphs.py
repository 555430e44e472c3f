"""CUDA graphs (GPU only): capture a static LoRAPlan + add_lora once, replay with other adapter mixes — more
distinct adapters and other ranks than at capture time — and match the reference every time (SGLang shipped a
grid sized to the capture-time segment count, sglang #28371: this is the test for that bug)."""

import pytest
import torch

import lorakern
from lorakern import reference
from lorakern.backends import BACKENDS
from lorakern.workloads import make_lora, make_slots

pytestmark = pytest.mark.gpu


def _backends():
    if not torch.cuda.is_available():
        return ["triton", "cuda", "cuda-fused"]
    dev = torch.device("cuda")
    names = [b for b in ("triton", "cuda") if not BACKENDS[b].not_supported_reasons(dev, torch.bfloat16)]
    return names + (["cuda-fused"] if "cuda" in names else [])


def _ref(out0, x, L, slots):
    o = out0.double().cpu()
    reference.add_lora(o, x.double().cpu(), [a.double().cpu() for a in L.lora_a], [b.double().cpu() for b in L.lora_b],
                       L.page_table.cpu(), L.ranks.cpu(), L.scales.double().cpu(), slots.cpu().long(),
                       [0, L.lora_b[0].shape[1], L.lora_b[0].shape[1] + L.lora_b[1].shape[1]])
    return o


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("max_tokens", [64, 512])
def test_graph_replay_with_other_mixes(backend, max_tokens, monkeypatch):
    """``cuda-fused``: the segment path forced, add_lora on the fused segment kernel (LORAKERN_CUDA_SEGMENT)."""
    if backend == "cuda-fused":
        backend = "cuda"
        monkeypatch.setenv("LORAKERN_TRITON_PATH", "segment")
        monkeypatch.setenv("LORAKERN_CUDA_SEGMENT", "fused")
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(1234 + max_tokens)
    num_slots, K, ns = 300, 256, (256, 64, 64)
    L = make_lora(num_slots, K, ns, "1-64", max_rank=64, dtype=dt, device=dev, generator=g)
    x = torch.randn(max_tokens, K, generator=g).to(dt).to(dev)
    out = torch.empty(max_tokens, sum(ns), dtype=dt, device=dev)
    plan = lorakern.LoRAPlan.static(max_tokens, dev)
    # capture with a mix of only 2 adapters
    plan.update(make_slots("uniform", max_tokens, 2, generator=g).to(dev))
    out0 = torch.randn(max_tokens, sum(ns), generator=g).to(dt).to(dev)
    out.copy_(out0)
    lorakern.ops.add_lora(out, x, *L.args(), plan, backend=backend)  # warm up (compiles, caches tables)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lorakern.ops.add_lora(out, x, *L.args(), plan, backend=backend)
    for mix, n in [("distinct", num_slots), ("uniform", 200), ("zipf:1.5", 50), ("identical", 1), ("uniform", 2)]:
        slots = make_slots(mix, max_tokens, n, none_frac=0.1, generator=g).to(dev)
        plan.update(slots)
        x.copy_(torch.randn(max_tokens, K, generator=g).to(dt))
        out.copy_(out0)
        graph.replay()
        torch.cuda.synchronize()
        ref = _ref(out0, x, L, slots)
        got = out.double().cpu()
        lora = slots.cpu() >= 0
        assert torch.equal(out[~lora.to(dev)], out0[~lora.to(dev)]), f"{mix}: -1 tokens modified"
        err = (got[lora] - ref[lora]).abs().max().item()
        tol = 4 * 2.0 ** -8 * ref[lora].abs().max().item() + 1e-2
        assert err <= tol, f"{backend} {mix} ({n} adapters): max error {err} > {tol}"
