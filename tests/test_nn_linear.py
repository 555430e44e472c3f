"""lorakern.nn.linear: LoRALinear / MergedLoRALinear / SliceGroup over a pool, driven by a shared LoRAContext.

Oracle: float64 ``base(x) + scale * (x @ A.T) @ B.T`` per token from the adapters' own tensors (not the pool's).
Tolerance: float32 outputs with |out| ≲ 10 and K ≤ 40 float32 products per sum: a few float32 ulps (~1e-6);
``TOL = 1e-5`` relative to the output's magnitude. The LoRA term itself is O(1), so a missing or misplaced
adapter fails by ~10^5 x TOL."""

import copy

import pytest
import torch
from torch import nn

import lorakern
from conftest import backend_device
from lorakern.nn import LoRAContext, LoRALinear, MergedLoRALinear, SliceGroup
from lorakern.nn.linear import derive_token_slots
from lorakern.pool import AdapterPool, PoolLayout, TargetSpec, TensorAdapter

K, NQ, NKV, NO = 24, 16, 8, 12
RANKS = {"a": 3, "b": 8, "c": 1}
TOL = 1e-5


def _layout():
    return PoolLayout(2, {"qkv": TargetSpec(K, (NQ, NKV, NKV)), "o": TargetSpec(K, (NO,))},
                      modules={"layers.{layer}.q": ("qkv", 0), "layers.{layer}.k": ("qkv", 1),
                               "layers.{layer}.v": ("qkv", 2), "layers.{layer}.o": ("o", 0)})


def _setup(generator, dtype=torch.float32, device="cpu"):
    pool = AdapterPool(_layout(), max_rows=16, max_slots=4, max_rank=8, dtype=dtype, device=device)
    weights = {}
    for name, r in RANKS.items():
        mods = {}
        for layer in range(2):
            for t, ns in (("qkv", (NQ, NKV, NKV)), ("o", (NO,))):
                for i, n in enumerate(ns):
                    mods[(layer, t, i)] = (torch.randn(r, K, generator=generator),
                                           torch.randn(n, r, generator=generator) / r ** 0.5)
        weights[name] = (mods, 2.0 / r)
        pool.register(name, TensorAdapter(mods, scale=2.0 / r))
    return pool, weights


def _oracle(base, x, seq_names, weights, layer, target, slices):
    """float64 base + LoRA; ``seq_names[b]`` is sequence b's adapter (x is [B, S, K]) or per token (x [T, K])."""
    want = base(x).double()  # the base layer itself (the module must reproduce it exactly); the LoRA in float64
    xs = x.double().reshape(-1, K)
    w = want.reshape(-1, want.shape[-1])
    per_tok = seq_names if x.dim() == 2 else [n for n in seq_names for _ in range(x.shape[1])]
    for t, n in enumerate(per_tok):
        if n is None:
            continue
        mods, scale = weights[n]
        off = 0
        for i in slices:
            A, B = mods[(layer, target, i)]
            d = scale * (xs[t] @ A.double().T) @ B.double().T
            w[t, off:off + d.shape[0]] += d
            off += d.shape[0]
    return want


def _linear(n_out, generator, bias=True):
    lin = nn.Linear(K, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, K, generator=generator) / K ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=generator))
    return lin


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", ["2d", "3d"])
@torch.no_grad()
def test_lora_linear_matches_oracle(generator, backend, shape):
    dev = backend_device(backend)
    pool, weights = _setup(generator, device=dev)
    ctx = LoRAContext(pool, backend=backend)
    base = _linear(NKV, generator)
    m = LoRALinear(copy.deepcopy(base).to(dev), ctx, layer=1, target="qkv", slice_index=2)
    names = ["b", None, "a", "c", "b"]
    with pool.wave(names) as slots:
        if shape == "3d":
            x = torch.randn(5, 3, K, generator=generator)
            ctx.set_sequence_slots(slots)
            seq = names
        else:
            x = torch.randn(5, K, generator=generator)
            ctx.set_token_slots(slots)
            seq = names
        got = m(x.to(dev)).cpu()
        ctx.clear()
    want = _oracle(base, x, seq, weights, 1, "qkv", [2])
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=TOL * float(want.abs().max()), rtol=0)
    assert float((want - base(x).double()).abs().max()) > 0.1


@torch.no_grad()
def test_inactive_is_the_base_layer_bit_for_bit(generator, monkeypatch):
    pool, _ = _setup(generator)
    ctx = LoRAContext(pool, backend="torch")
    base = _linear(NO, generator)
    m = LoRALinear(base, ctx, 0, "o", 0)
    x = torch.randn(2, 4, K, generator=generator)
    monkeypatch.setattr(lorakern.ops, "add_lora", lambda *a, **k: pytest.fail("add_lora called"))
    monkeypatch.setattr(lorakern.LoRAPlan, "from_slots", classmethod(lambda *a: pytest.fail("plan built")))
    assert torch.equal(m(x), base(x))  # no context
    ctx.set_sequence_slots(torch.tensor([-1, -1]), any_adapter=False)  # a batch without adapters
    assert torch.equal(m(x), base(x))
    ctx.set_sequence_slots(torch.tensor([-1, -1]))  # same, found by reading the slots once
    assert not ctx.active and torch.equal(m(x), base(x))
    assert ctx.plans_built == 0 and ctx.lora_calls == 0


@torch.no_grad()
def test_merged_linear_one_call_for_all_slices(generator):
    pool, weights = _setup(generator)
    ctx = LoRAContext(pool, backend="torch")
    parts = [_linear(n, generator) for n in (NQ, NKV, NKV)]
    m = MergedLoRALinear.from_linears(parts, ctx, 0, "qkv")
    x = torch.randn(3, 5, K, generator=generator)
    # the fused base layer (one GEMM over N = 32 may round differently from three: not bit-compared)
    torch.testing.assert_close(m(x), torch.cat([p(x) for p in parts], dim=-1), atol=1e-6, rtol=1e-6)
    names = ["c", "a", None]
    with pool.wave(names) as slots:
        ctx.set_sequence_slots(slots)
        got = m(x)
        ctx.clear()
    assert ctx.lora_calls == 1 and ctx.plans_built == 1
    want = _oracle(m.base_layer, x, names, weights, 0, "qkv", [0, 1, 2])
    torch.testing.assert_close(got.double(), want, atol=TOL * float(want.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="out_features"):
        MergedLoRALinear(parts[0], ctx, 0, "qkv")


@torch.no_grad()
def test_slice_group_shares_one_call_and_equals_separate(generator):
    pool, weights = _setup(generator)
    ctx = LoRAContext(pool, backend="torch")
    parts = [_linear(n, generator) for n in (NQ, NKV, NKV)]
    group = SliceGroup(ctx, 1, "qkv")
    grouped = [LoRALinear(p, ctx, 1, "qkv", i, group=group) for i, p in enumerate(parts)]
    alone = [LoRALinear(p, ctx, 1, "qkv", i) for i, p in enumerate(parts)]
    x = torch.randn(4, 3, K, generator=generator)
    names = ["a", "b", None, "a"]
    with pool.wave(names) as slots:
        ctx.set_sequence_slots(slots)
        ctx.begin_forward()
        got = [m(x) for m in grouped]
        assert ctx.lora_calls == 1 and group._x is None  # all three consumed: buffer released
        want = [m(x) for m in alone]
        assert ctx.lora_calls == 4 and ctx.plans_built == 1  # one plan for the whole forward
        # a member called with another tensor (even equal values) computes its own slice
        x2 = x.clone()
        torch.testing.assert_close(grouped[1](x2), want[1], atol=1e-6, rtol=1e-6)
        assert ctx.lora_calls == 5
        ctx.clear()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    ref = _oracle(lambda t: torch.cat([p(t) for p in parts], -1), x, names, weights, 1, "qkv", [0, 1, 2])
    torch.testing.assert_close(torch.cat(got, -1).double(), ref, atol=TOL * float(ref.abs().max()), rtol=0)


@torch.no_grad()
def test_shape_checks(generator):
    pool, _ = _setup(generator)
    ctx = LoRAContext(pool)
    with pytest.raises(ValueError, match="in_features"):
        LoRALinear(nn.Linear(K + 1, NO), ctx, 0, "o", 0)
    with pytest.raises(ValueError, match="slice 1 has N"):
        LoRALinear(nn.Linear(K, NQ), ctx, 0, "qkv", 1)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(K, NO, 1), ctx, 0, "o", 0)
    m = LoRALinear(_linear(NO, generator), ctx, 0, "o", 0)
    ctx.set_sequence_slots(torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="3 sequence"):
        m(torch.randn(2, 5, K))
    ctx.set_token_slots(torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="token slots: 3 given"):
        m(torch.randn(2, K))


def test_derive_token_slots():
    s = torch.tensor([3, -1, 0], dtype=torch.int32)
    assert derive_token_slots(s, (3, 2)).tolist() == [3, 3, -1, -1, 0, 0]  # padded [B, S]
    assert derive_token_slots(s, (3, 1)).tolist() == [3, -1, 0]  # KV-cache decode [B, 1]
    assert derive_token_slots(s, (3,)).tolist() == [3, -1, 0]  # one token per sequence
    assert derive_token_slots(s, (6, 1)).tolist() == [3, 3, -1, -1, 0, 0]  # beams: rows expanded 2-fold
    assert derive_token_slots(s, (1, 6), cu_seqlens=torch.tensor([0, 1, 4, 6])).tolist() == [3, -1, -1, -1, 0, 0]
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    assert derive_token_slots(s, (2, 5), position_ids=pos).tolist() == [3, 3, 3, -1, -1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="cu_seqlens: covers 5"):
        derive_token_slots(s, (1, 6), cu_seqlens=torch.tensor([0, 1, 4, 5]))
    with pytest.raises(ValueError, match="holds 2 sequences"):
        derive_token_slots(s, (1, 5), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    with pytest.raises(ValueError, match="3 sequence"):
        derive_token_slots(s, (2, 4))
    with pytest.raises(ValueError, match="3 sequence"):
        derive_token_slots(s, (4, 4))


def test_inference_mode_and_autograd(generator):
    """Under inference_mode (tensors without version counters) the group still shares its call; with autograd on,
    gradients reach the base layer and the input (the LoRA part carries none: inference modules)."""
    pool, _ = _setup(generator)
    ctx = LoRAContext(pool, backend="torch")
    parts = [_linear(n, generator) for n in (NQ, NKV, NKV)]
    group = SliceGroup(ctx, 0, "qkv")
    ms = [LoRALinear(p, ctx, 0, "qkv", i, group=group) for i, p in enumerate(parts)]
    x = torch.randn(2, 3, K, generator=generator)
    with pool.wave(["a", "b"]) as slots:
        ctx.set_sequence_slots(slots)
        with torch.no_grad():
            want = [m(x) for m in ms]
        with torch.inference_mode():
            got = [m(x) for m in ms]
        assert ctx.lora_calls == 2
        xg = x.clone().requires_grad_()
        y = ms[0](xg)
        y.sum().backward()
        ctx.clear()
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)
    torch.testing.assert_close(y.detach(), want[0])
    assert parts[0].weight.grad is not None and xg.grad is not None
    torch.testing.assert_close(xg.grad, parts[0].weight.sum(0).expand_as(x).detach())  # d(sum base)/dx only
