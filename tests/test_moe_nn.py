"""LoRA on fused MoE experts (lorakern/nn/moe.py): module parity with the per-adapter reference.

Oracle: for every adapter alone, the same experts with that adapter merged (``W_e + scale · B_e @ A_e`` for gate,
up and down of every expert, :func:`merged_experts`) run through the plain experts forward on the tokens that use
it; tokens without an adapter get the base output bit for bit. Checked on this package's reference MoE and on
transformers' own Qwen3-MoE and Mixtral sparse blocks (through a LoRAContext and an AdapterPool loaded from packed
adapter directories), in float64 (torch backend) and float32 (Triton under the interpreter).
"""

import pytest
import torch

from conftest import DEVICE, assert_bits_equal
from lorakern.nn import LoRAContext
from lorakern.nn.moe import (LoRAMoEExperts, MoEBlock, MoEConfig, MoELoRA, attach_moe_lora, check_experts_layout,
                             merged_experts)
from lorakern.pool import AdapterPool, save_peft_dir
from lorakern.pool.packed import moe_pool_layout, peft_to_packed


def _init(module, g, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def _adapters(g, E, H, I, ranks, *, lack=()):
    """Per adapter: gate_up = (A_g, B_g, A_u, B_u), down = (A_d, B_d) with A [E, r, K], B [E, N, r]; ``lack``:
    (adapter, projection) pairs the adapter does not have (None)."""
    out = []
    for i, r in enumerate(ranks):
        def ab(K, N, proj):
            if (i, proj) in lack:
                return None, None
            return (torch.randn(E, r, K, generator=g, dtype=torch.float64) * 0.3,
                    torch.randn(E, N, r, generator=g, dtype=torch.float64) * 0.3)
        gA, gB = ab(H, I, "gate")
        uA, uB = ab(H, I, "up")
        dA, dB = ab(I, H, "down")
        out.append(((gA, gB, uA, uB), (dA, dB)))
    return out


def _pack(adapters, E, H, I, dtype):
    """MoELoRA rank rows (interleaved row ids, NaN spare rows) from per-adapter weights."""
    ranks = [ad[0][0].shape[1] if ad[0][0] is not None else ad[1][0].shape[1] for ad in adapters]
    rows = sum(ranks) + 2
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(rows, generator=g)
    R = max(ranks)
    pt = torch.full((len(ranks), R), rows + 5, dtype=torch.int32)
    ga = [torch.full((rows, E, H), float("nan"), dtype=torch.float64) for _ in range(2)]
    gb = [torch.full((rows, E, I), float("nan"), dtype=torch.float64) for _ in range(2)]
    da = [torch.full((rows, E, I), float("nan"), dtype=torch.float64)]
    db = [torch.full((rows, E, H), float("nan"), dtype=torch.float64)]
    off = 0
    for s, ((gA, gB, uA, uB), (dA, dB)) in enumerate(adapters):
        r = ranks[s]
        ids = perm[off:off + r]
        off += r
        pt[s, :r] = ids.int()
        for dst_a, dst_b, A, B, K, N in ((ga[0], gb[0], gA, gB, H, I), (ga[1], gb[1], uA, uB, H, I),
                                         (da[0], db[0], dA, dB, I, H)):
            if A is None:
                dst_a[ids] = 0
                dst_b[ids] = 0
            else:
                dst_a[ids] = A.permute(1, 0, 2)
                dst_b[ids] = B.permute(2, 0, 1)
    cv = lambda ts: [t.to(dtype).to(DEVICE) for t in ts]  # noqa: E731
    scales = torch.tensor([0.5 + 0.25 * s for s in range(len(ranks))], dtype=torch.float32)
    return MoELoRA(cv(ga), cv(gb), cv(da), cv(db), pt.to(DEVICE), torch.tensor(ranks, dtype=torch.int32,
                                                                                    device=DEVICE), scales.to(DEVICE))


def _oracle(block_forward, experts, adapters, lora, x, slots):
    """Per-adapter reference: each adapter alone, merged into the experts; -1 tokens: the base block."""
    T = x.shape[0]
    ref = torch.empty_like(x)
    base = block_forward(experts, x)
    ref[:] = base
    for s, (gu, dn) in enumerate(adapters):
        sel = (slots.cpu() == s).nonzero().flatten()
        if sel.numel() == 0:
            continue
        m = merged_experts(experts, gu, dn, float(lora.scales[s]))
        ref[sel] = block_forward(m, x)[sel]  # routing is per token: the merged block on all tokens, keep its own
    return ref, base


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_reference_moe_block_parity(backend, dtype, generator):
    g = generator
    cfg = MoEConfig(hidden_size=24, moe_intermediate_size=12, num_experts=6, top_k=2)
    block = MoEBlock(cfg).double()
    _init(block, g)
    block = block.to(dtype).to(DEVICE)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    adapters = _adapters(g, E, H, I, [2, 5, 3], lack={(1, "down"), (2, "gate")})
    lora = _pack(adapters, E, H, I, dtype)
    base_experts = block.experts
    T = 11
    x = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    slots = torch.tensor([0, 1, -1, 2, 1, 0, -1, 2, 2, 0, 1], dtype=torch.int32, device=DEVICE)

    def block_forward(experts, xx):
        _, w, ids = block.gate(xx)
        return experts.to(xx.dtype).to(xx.device)(xx, ids, w)

    ref, base = _oracle(block_forward, base_experts, [tuple(map(lambda t: tuple(
        None if v is None else v.to(dtype) for v in t), ad)) for ad in adapters], lora, x, slots)
    block.experts = LoRAMoEExperts(base_experts, lora, backend=backend)
    block.experts.set_slots(slots)
    got = block(x)
    none = slots.cpu() < 0
    assert_bits_equal(got[none], base[none], "tokens without an adapter: the base output")
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # without any adapter: the base experts' own forward, bit for bit
    block.experts.set_slots(torch.full((T,), -1, dtype=torch.int32, device=DEVICE))
    assert_bits_equal(block(x), base, "no adapter in the batch")


def _hf_block(kind, g):
    if kind == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                             norm_topk_prob=True)
        cfg._experts_implementation = "eager"
        block = Qwen3MoeSparseMoeBlock(cfg)
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
        cfg._experts_implementation = "eager"
        block = MixtralSparseMoeBlock(cfg)
    block = block.double()
    _init(block, g)
    return block


class _Model(torch.nn.Module):
    """Two decoder-ish layers holding a transformers sparse MoE block each (``model.layers.{l}.mlp``)."""

    def __init__(self, blocks):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module() for _ in blocks])
        for layer, b in zip(self.layers, blocks):
            layer.mlp = b

    def forward(self, x):
        for layer in self.layers:
            out = layer.mlp(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_hf_moe_blocks_through_pool_and_packed_files(kind, tmp_path, generator):
    """transformers' own sparse MoE blocks, wrapped by attach_moe_lora; adapters written as per-expert PEFT
    directories, converted to the packed format, loaded into an AdapterPool; one adapter per sequence through a
    LoRAContext. Each sequence's output equals the model with its adapter merged (or the base model)."""
    g = generator
    blocks = [_hf_block(kind, g) for _ in range(2)]
    E, I2, H = blocks[0].experts.gate_up_proj.shape
    I = I2 // 2
    ranks = {"alice": 3, "bob": 6}
    per_layer = {}
    for name, r in ranks.items():
        mods = {}
        for l in range(2):
            ads = _adapters(g, E, H, I, [r], lack={(0, "up")} if name == "bob" and l == 1 else set())[0]
            per_layer[(name, l)] = ads
            (gA, gB, uA, uB), (dA, dB) = ads
            for e in range(E):
                for p, A, B in (("gate_proj", gA, gB), ("up_proj", uA, uB), ("down_proj", dA, dB)):
                    if A is not None:
                        mods[f"model.layers.{l}.mlp.experts.{e}.{p}"] = (A[e].clone(), B[e].clone())
        src = save_peft_dir(tmp_path / "peft" / name, mods, r=r, lora_alpha=2 * r)
        peft_to_packed(src, tmp_path / "packed" / name, num_experts=E)
    layout = moe_pool_layout(2, H, I, E)
    pool = AdapterPool(layout, max_rows=16, max_slots=4, max_rank=8, dtype=torch.float64)
    for name in ranks:
        pool.register(name, str(tmp_path / "packed" / name))
    ctx = LoRAContext(pool, backend="torch")
    model = _Model(blocks)
    base_model = _Model([_hf_block(kind, torch.Generator()) for _ in range(2)])
    base_model.load_state_dict(model.state_dict())
    wrappers = attach_moe_lora(model, ctx)
    assert len(wrappers) == 2 and [w.layer for w in wrappers] == [0, 1]
    assert isinstance(model.layers[0].mlp.experts, LoRAMoEExperts)
    x = torch.randn(3, 5, H, generator=g, dtype=torch.float64)
    with pool.wave(["alice", None, "bob"]) as slots:
        ctx.set_sequence_slots(slots)
        ctx.begin_forward()
        got = model(x)
        assert ctx.lora_calls == 4  # gate_up and down of two layers
        got0 = model.layers[0].mlp(x)
        ctx.set_sequence_slots(None)
    with torch.no_grad():
        # one block: the sequence without an adapter gets the base block's output bit for bit (same batch)
        base0 = base_model.layers[0].mlp(x)
        assert_bits_equal(got0[1], base0[1], "the sequence without an adapter, one block")
        # two layers: layer 1 sees another batch than the base model's (the LoRA changed the other sequences'
        # inputs), so its expert GEMMs have other row counts; equal to rounding
        torch.testing.assert_close(got[1], base_model(x)[1], rtol=1e-12, atol=1e-12)
        for b, name in ((0, "alice"), (2, "bob")):
            merged = _Model([_hf_block(kind, torch.Generator()) for _ in range(2)])
            merged.load_state_dict(base_model.state_dict())
            for l in range(2):
                gu, dn = per_layer[(name, l)]
                m = merged_experts(merged.layers[l].mlp.experts, gu, dn, 2.0)
                merged.layers[l].mlp.experts.gate_up_proj.copy_(m.gate_up_proj)
                merged.layers[l].mlp.experts.down_proj.copy_(m.down_proj)
            torch.testing.assert_close(got[b], merged(x)[b], rtol=1e-10, atol=1e-10)
    # outside any adapter context: the base model, bit for bit
    assert_bits_equal(model(x), base_model(x), "no adapter context")


def test_layout_checks():
    class Transposed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 6))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 4))
            self.act_fn = torch.nn.SiLU()
            self.is_transposed = True

    with pytest.raises(TypeError, match="is_transposed"):
        check_experts_layout(Transposed())
    with pytest.raises(TypeError, match="fused"):
        check_experts_layout(torch.nn.Linear(3, 3))
    ex = MoEBlock(MoEConfig()).experts
    check_experts_layout(ex)
    lora = _pack(_adapters(torch.Generator(), 8, 32, 16, [2]), 8, 32, 16, torch.float32)
    lora.down_b = lora.down_b * 2  # two slices where one is expected
    with pytest.raises(ValueError, match="down_b"):
        LoRAMoEExperts(ex, lora)
