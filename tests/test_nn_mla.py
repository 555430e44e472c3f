"""The reference MLA attention (lorakern.nn.mla) with LoRA on every projection: the prefill form (kv_b_proj
materialised, its LoRA a plain linear) and the absorbed decode form (kv_b_proj's LoRA through mla_absorbed_q /
mla_absorbed_o) agree with mixed adapters and sequences without one; a zero adapter changes nothing, bit for bit;
a random adapter on any single projection changes the output on both paths (no path bypasses a LoRA)."""

import pytest
import torch

from conftest import BACKEND_LIST, DEVICE, assert_bits_equal
from lorakern.nn import MLAAttention, MLAConfig, MLALoRA

CONFIGS = {"q_lora_rank48": MLAConfig(), "q_proj": MLAConfig(q_lora_rank=None, num_heads=3, kv_lora_rank=40,
                                                             qk_nope_head_dim=12, v_head_dim=20)}
BACKENDS = BACKEND_LIST

# four sequences: adapters of rank 4, none, rank 1, rank 16; the pool also holds a rank-0 adapter (slot 3)
SLOTS = [0, -1, 2, 1]
RANKS = [4, 16, 1, 0]
B, L = 4, 6
TOL = 5e-6  # relative to the output's maximum; see test_absorbed_matches_prefill_with_mixed_adapters


def _setup(cfg, dtype, generator, **lora_kw):
    attn = MLAAttention(cfg).reset_parameters(generator).to(dtype).to(DEVICE)
    x = torch.randn(B, L, cfg.hidden_size, generator=generator).to(dtype).to(DEVICE)
    lora = MLALoRA.random(cfg, RANKS, generator=generator, dtype=dtype, device=DEVICE, max_rank=16, **lora_kw)
    return attn, x, lora


def _rel_err(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_absorbed_matches_prefill_with_mixed_adapters(cfg_name, backend, generator):
    """float32 prefill and absorbed outputs agree with each other and with a float64 prefill, to rounding.

    Bound: both forms run in float32 with float32 attention, and differ from float64 only by the association of a
    few sums of at most max(C, hidden) terms of magnitude about the output's. Measured (both backends, both
    configs, 6 seeds): at most 4e-7 of the output's maximum, so TOL = 5e-6 leaves a >10x margin, while a dropped
    or misplaced LoRA term (a single projection's adapter moves the output by >= 1.6e-2) fails by far."""
    cfg = CONFIGS[cfg_name]
    attn, x, lora = _setup(cfg, torch.float32, generator)
    slots = torch.tensor(SLOTS, device=DEVICE)
    pre = attn(x, slots, lora=lora, backend=backend)
    absd = attn(x, slots, lora=lora, absorbed=True, backend=backend)
    attn64 = MLAAttention(cfg).to(torch.float64)
    attn64.load_state_dict({k: v.double().cpu() for k, v in attn.state_dict().items()})
    lora64 = MLALoRA({k: v.double().cpu() for k, v in lora.lora_a.items()},
                     {k: v.double().cpu() for k, v in lora.lora_b.items()},
                     lora.page_table.cpu(), lora.ranks.cpu(), lora.scales.cpu())
    ref = attn64(x.double().cpu(), slots.cpu(), lora=lora64, backend="torch")
    ref_abs = attn64(x.double().cpu(), slots.cpu(), lora=lora64, absorbed=True, backend="torch")
    assert _rel_err(ref_abs, ref) < 1e-12  # the two forms are the same function
    for name, got in (("prefill", pre), ("absorbed", absd)):
        assert not bool(torch.isnan(got).any()), name
        assert _rel_err(got, ref) < TOL, (name, _rel_err(got, ref))
    assert _rel_err(absd, pre) < TOL
    # the LoRA matters here (else the comparison proves nothing): every adapted sequence moves
    base = attn64(x.double().cpu())
    for b, s in enumerate(SLOTS):
        moved = _rel_err(ref[b], base[b]) if s >= 0 and RANKS[s] > 0 else 0.0
        assert (moved > 1e-3) == (s >= 0 and RANKS[s] > 0), (b, s, moved)


@pytest.mark.parametrize("absorbed", [False, True], ids=["prefill", "absorbed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_no_adapter_or_zero_adapter_is_exactly_base(cfg_name, backend, absorbed, generator):
    """Zero B (a fresh PEFT adapter, A random) on every projection, and sequences without an adapter or with a
    rank-0 one: exactly the output without LoRA, bit for bit."""
    cfg = CONFIGS[cfg_name]
    attn, x, lora = _setup(cfg, torch.float32, generator, zero_b=True)
    slots = torch.tensor(SLOTS, device=DEVICE)
    base = attn(x, absorbed=absorbed)
    got = attn(x, slots, lora=lora, absorbed=absorbed, backend=backend)
    assert torch.equal(got, base)
    live = MLALoRA.random(cfg, RANKS, generator=generator, device=DEVICE, max_rank=16)
    got = attn(x, slots, lora=live, absorbed=absorbed, backend=backend)
    for b, s in enumerate(SLOTS):
        if s < 0 or RANKS[s] == 0:
            assert_bits_equal(got[b], base[b], f"sequence {b} (slot {s})")
    got = attn(x, torch.full((B,), -1, device=DEVICE), lora=live, absorbed=absorbed, backend=backend)
    assert_bits_equal(got, base, "every sequence without an adapter")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@torch.no_grad()
def test_every_projection_lora_changes_output_on_every_path(cfg_name, backend, generator):
    """An adapter on one projection only (each in turn) changes the adapted sequences on both paths, leaves the
    others bit for bit, and the two paths still agree: no path skips a projection's LoRA."""
    cfg = CONFIGS[cfg_name]
    attn, x, _ = _setup(cfg, torch.float32, generator)
    slots = torch.tensor(SLOTS, device=DEVICE)
    base = {p: attn(x, absorbed=p) for p in (False, True)}
    for name in cfg.projections():
        lora = MLALoRA.random(cfg, RANKS, generator=generator, device=DEVICE, max_rank=16, targets=[name])
        got = {p: attn(x, slots, lora=lora, absorbed=p, backend=backend) for p in (False, True)}
        for p in (False, True):
            for b, s in enumerate(SLOTS):
                if s >= 0 and RANKS[s] > 0:
                    assert _rel_err(got[p][b], base[p][b]) > 1e-3, (name, "absorbed" if p else "prefill", b)
                else:
                    assert_bits_equal(got[p][b], base[p][b], f"{name}: sequence {b} without an adapter")
        assert _rel_err(got[True], got[False]) < TOL, name


def test_slots_are_per_sequence():
    cfg = MLAConfig()
    attn = MLAAttention(cfg)
    lora = MLALoRA.random(cfg, [2], generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, cfg.hidden_size)
    with pytest.raises(ValueError, match="slots"):
        attn(x, torch.zeros(6, dtype=torch.int32), lora=lora)
    with pytest.raises(ValueError, match="slots"):
        attn(x, None, lora=lora)
    with pytest.raises(ValueError, match="targets"):
        MLALoRA.random(cfg, [2], targets=["q_proj"])  # this config has q_a_proj/q_b_proj
