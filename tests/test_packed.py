"""The packed MoE adapter format (lorakern/pool/packed.py): bit-exact round trip with per-expert PEFT checkpoints,
tensor counts, loading into the pool's packed MoE rows (identical to the per-expert loader), typed errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_bits_equal
from lorakern.pool import AdapterPool, PeftDir, save_peft_dir
from lorakern.pool.errors import AdapterFileError, AdapterFormatError, AdapterMismatchError
from lorakern.pool.packed import (PACKED_INDEX, PACKED_WEIGHTS, PackedAdapter, load_packed, moe_pool_layout,
                                  pack_peft, packed_to_peft, peft_to_packed, unpack_peft)

L, H, I, E, NH, NKV, HD = 2, 32, 16, 6, 4, 2, 8


def _modules(g, r=4, *, dtype=torch.bfloat16, missing_experts=(), lack_down_layer=None, down_rank=None,
             attention=True):
    """Per-expert PEFT modules {name: (A [r, K], B [N, r])} of a tiny Qwen3-MoE-style model."""
    mods = {}
    for l in range(L):
        if attention:
            for p, K, N in (("q_proj", H, NH * HD), ("k_proj", H, NKV * HD), ("v_proj", H, NKV * HD),
                            ("o_proj", NH * HD, H)):
                mods[f"model.layers.{l}.self_attn.{p}"] = (torch.randn(r, K, generator=g).to(dtype),
                                                            torch.randn(N, r, generator=g).to(dtype))
        for e in range(E):
            if e in missing_experts:
                continue
            for p, K, N in (("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)):
                if p == "down_proj" and l == lack_down_layer:
                    continue
                rr = down_rank if (p == "down_proj" and down_rank) else r
                A = torch.randn(rr, K, generator=g).to(dtype)
                B = torch.randn(N, rr, generator=g).to(dtype)
                mods[f"model.layers.{l}.mlp.experts.{e}.{p}"] = (A, B)
    # special bit patterns survive the round trip
    first = next(iter(mods))
    mods[first][0].view(-1)[:3] = torch.tensor([-0.0, float("inf"), 1e-40]).to(dtype)
    return mods


def _write(tmp_path, name, g, **kw):
    r = kw.pop("r", 4)
    down_rank = kw.get("down_rank")
    mods = _modules(g, r, **kw)
    rank_pattern = {"down_proj": down_rank} if down_rank else None
    return save_peft_dir(tmp_path / name, mods, r=r, lora_alpha=2 * r, rank_pattern=rank_pattern), mods


def _assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert_bits_equal(a[k], b[k], k)


@pytest.mark.parametrize("case", ["full", "missing_experts", "lacks_a_projection", "mixed_ranks_fp32"])
def test_round_trip_is_bit_exact(case, tmp_path, generator):
    kw = {"full": {}, "missing_experts": dict(missing_experts=(1, 4)), "lacks_a_projection": dict(lack_down_layer=1),
          "mixed_ranks_fp32": dict(down_rank=2, dtype=torch.float32)}[case]
    src, _ = _write(tmp_path, "peft", generator, **kw)
    packed = peft_to_packed(src, tmp_path / "packed", num_experts=E)
    back = packed_to_peft(packed, tmp_path / "back")
    _assert_same_state(load_file(str(src / "adapter_model.safetensors")),
                       load_file(str(back / "adapter_model.safetensors")))
    assert json.loads((src / "adapter_config.json").read_text()) == json.loads(
        (back / "adapter_config.json").read_text())
    index = json.loads((packed / PACKED_INDEX).read_text())
    assert index["version"] == 1 and index["num_experts"] == E and index["r"] == 4
    gate = index["modules"]["base_model.model.model.layers.0.mlp.experts.gate_proj"]
    assert gate["experts"] == ([0, 2, 3, 5] if case == "missing_experts" else None)
    if case == "mixed_ranks_fp32":
        down = index["modules"]["base_model.model.model.layers.0.mlp.experts.down_proj"]
        assert down["r"] == 2 and down["scale"] == 8 / 2 and gate["scale"] == 8 / 4


def test_tensor_counts_and_layout(tmp_path, generator):
    """Per-expert: L·E·3·2 + L·4·2 tensors; packed: L·7·2, rank-major [r, E, K] / [r, E, N]."""
    src, mods = _write(tmp_path, "peft", generator)
    assert len(load_file(str(src / "adapter_model.safetensors"))) == L * E * 3 * 2 + L * 4 * 2
    index, packed = load_packed(peft_to_packed(src, tmp_path / "packed"))
    assert len(packed) == L * 7 * 2
    A = packed["base_model.model.model.layers.1.mlp.experts.up_proj.lora_A"]
    B = packed["base_model.model.model.layers.1.mlp.experts.up_proj.lora_B"]
    assert A.shape == (4, E, H) and B.shape == (4, E, I)
    a3, b3 = mods["model.layers.1.mlp.experts.3.up_proj"]
    assert_bits_equal(A[:, 3], a3, "row j of expert 3's A")
    assert_bits_equal(B[:, 3], b3.t(), "column j of expert 3's B")
    q = packed["base_model.model.model.layers.0.self_attn.q_proj.lora_B"]
    assert q.shape == (4, NH * HD)  # dense B stored as rank rows (transposed)


def test_in_memory_round_trip_with_adapter_names(generator):
    """Keys with an adapter-name segment (``lora_A.default.weight``) keep it."""
    mods = _modules(generator, 2, attention=False)
    state = {}
    for name, (A, B) in mods.items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = A
        state[f"base_model.model.{name}.lora_B.default.weight"] = B
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    index, packed = pack_peft(cfg, state)
    cfg2, state2 = unpack_peft(index, packed)
    assert cfg2 == cfg
    _assert_same_state(state, state2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_loader_fills_the_pool_like_the_per_expert_loader(dtype, tmp_path, generator):
    """Same adapter, two sources: the per-expert PEFT directory and its packed conversion. The pool rows, page
    table, ranks and scales they produce are identical bit for bit — also for missing experts, a missing
    projection and a lower-rank projection (zero padding, scale folding)."""
    src, _ = _write(tmp_path, "peft", generator, r=4, missing_experts=(2,), lack_down_layer=0, down_rank=2)
    packed = peft_to_packed(src, tmp_path / "packed", num_experts=E)
    layout = moe_pool_layout(L, H, I, E, num_heads=NH, num_kv_heads=NKV, head_dim=HD)
    pools = []
    for name, source in (("peft", PeftDir(src)), ("packed", str(packed))):
        pool = AdapterPool(layout, max_rows=8, max_slots=2, max_rank=8, dtype=dtype)
        s = pool.register("x", source)
        assert isinstance(s, PackedAdapter) == (name == "packed")  # a packed dir path is detected
        pool.load(["x"])
        pools.append(pool)
    p1, p2 = pools
    assert_bits_equal(p1.rows, p2.rows, "pool rows")
    assert torch.equal(p1.page_table, p2.page_table) and torch.equal(p1.ranks, p2.ranks)
    assert torch.equal(p1.scales, p2.scales) and float(p1.scales[0]) == 2.0
    a = p2.lora_a(1, "experts.w13")[0]  # [rows, E, H]
    assert a.shape == (8, E, H)
    assert bool((a[:4, 2] == 0).all())  # the missing expert is zeros


def test_packed_adapter_errors(tmp_path, generator):
    src, _ = _write(tmp_path, "peft", generator)
    packed = peft_to_packed(src, tmp_path / "packed")
    layout = moe_pool_layout(L, H, I, E, num_heads=NH, num_kv_heads=NKV, head_dim=HD)
    with pytest.raises(AdapterFileError):
        PackedAdapter(tmp_path / "nope").read("a", layout)
    # wrong layout version
    idx = json.loads((packed / PACKED_INDEX).read_text())
    bad = dict(idx, version=2)
    (packed / PACKED_INDEX).write_text(json.dumps(bad))
    with pytest.raises(AdapterFormatError, match="version"):
        PackedAdapter(packed).read("a", layout)
    (packed / PACKED_INDEX).write_text(json.dumps(idx))
    # truncated weights
    data = (packed / PACKED_WEIGHTS).read_bytes()
    (packed / PACKED_WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(AdapterFormatError, match="truncated"):
        PackedAdapter(packed).read("a", layout)
    (packed / PACKED_WEIGHTS).write_bytes(data)
    # a tensor listed in the index but missing from the file
    t = load_file(str(packed / PACKED_WEIGHTS))
    t.pop("base_model.model.model.layers.0.mlp.experts.gate_proj.lora_B")
    save_file(t, str(packed / PACKED_WEIGHTS))
    with pytest.raises(AdapterFormatError, match="missing"):
        PackedAdapter(packed).read("a", layout)
    # the layout's expert count differs
    packed2 = peft_to_packed(src, tmp_path / "packed2")
    with pytest.raises(AdapterMismatchError, match="experts"):
        PackedAdapter(packed2).read("a", moe_pool_layout(L, H, I, E + 2, num_heads=NH, num_kv_heads=NKV,
                                                         head_dim=HD))
    # a layout without the attention targets
    with pytest.raises(AdapterMismatchError, match="matches no target"):
        PackedAdapter(packed2).read("a", moe_pool_layout(L, H, I, E))


def test_pack_rejects_experts_of_unequal_rank():
    g = torch.Generator().manual_seed(0)
    state = {}
    for e, r in ((0, 2), (1, 3)):
        name = f"base_model.model.model.layers.0.mlp.experts.{e}.gate_proj"
        state[f"{name}.lora_A.weight"] = torch.randn(r, 8, generator=g)
        state[f"{name}.lora_B.weight"] = torch.randn(4, r, generator=g)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"experts.1.gate_proj": 3}}
    with pytest.raises(ValueError, match="differs"):
        pack_peft(cfg, state)
    state.pop(f"base_model.model.model.layers.0.mlp.experts.1.gate_proj.lora_B.weight")
    with pytest.raises(ValueError, match="missing"):
        pack_peft(cfg, state)


def test_qwen3_30b_a3b_counts_match_mint():
    """The counts MinT reports for a rank-1 Qwen3-30B-A3B adapter: 37,248 per-expert tensors, 672 packed."""
    layers, experts = 48, 128
    per_expert = layers * experts * 3 * 2 + layers * 4 * 2
    packed = layers * 7 * 2
    assert (per_expert, packed) == (37248, 672)
    layout = moe_pool_layout(48, 2048, 768, 128, num_heads=32, num_kv_heads=4, head_dim=128)
    from lorakern.pool.spec import RowFormat

    fmt = RowFormat(layout, torch.bfloat16)
    moe = 48 * 128 * (2048 + 768) * 3  # A and B of gate, up, down per rank row
    attn = 48 * (3 * 2048 + 4096 + 4096 + 512 + 512 + 2048)
    assert fmt.row_elems >= moe + attn and math.isclose(fmt.row_elems, moe + attn, rel_tol=1e-3)


# ------------------------------------------------------------------------------------------------ fast path
def _fast_and_generic(src_dir, layout, dtype, monkeypatch, poison=True):
    """(record from PackedAdapter.read_record, record from pack_record(read())); read_record's buffer starts
    as NaN so that an element it neither reads nor zeroes shows."""
    from lorakern.pool import packed as P
    from lorakern.pool.loaders import pack_record
    from lorakern.pool.spec import RowFormat

    fmt = RowFormat(layout, dtype)
    if poison:
        monkeypatch.setattr(P, "_new_record", lambda r, n, dt, pin: torch.full((r, n), float("nan"), dtype=dt))
    src = PackedAdapter(src_dir)
    fast = src.read_record("a", layout, fmt, max_rank=8)
    w = src.read("a", layout)
    return fast, (pack_record(w, fmt), w.rank, w.scale, w.targets)


@pytest.mark.parametrize("case", ["uniform", "mixed_ranks_equal_scales", "missing_experts", "lacks_projection",
                                  "moe_only_layout_with_attention"])
def test_direct_record_read_equals_generic_packing(case, tmp_path, generator, monkeypatch):
    """The fast path (header only, one preadv per tensor straight into the record, gaps zeroed) gives the same
    record bit for bit as the generic read + pack_record: rows of lower-rank modules, missing targets and the
    alignment padding zeroed."""
    g = generator
    r = 4
    kw = {"uniform": {}, "missing_experts": dict(missing_experts=(0, 5)), "lacks_projection":
          dict(lack_down_layer=0), "mixed_ranks_equal_scales": {}, "moe_only_layout_with_attention": {}}[case]
    mods = _modules(g, r, dtype=torch.float32, attention=case != "moe_only_layout_with_attention", **kw)
    rank_pattern = alpha_pattern = None
    if case == "mixed_ranks_equal_scales":  # down_proj at rank 2 with alpha 4: the same scale 2 as the rest
        for name in [n for n in mods if n.endswith("down_proj")]:
            A, B = mods[name]
            mods[name] = (A[:2].clone(), B[:, :2].clone())
        rank_pattern, alpha_pattern = {"down_proj": 2}, {"down_proj": 4}
    src = save_peft_dir(tmp_path / "peft", mods, r=r, lora_alpha=2 * r, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern)
    packed = peft_to_packed(src, tmp_path / "packed", num_experts=E)
    layout = moe_pool_layout(L, H, I, E, num_heads=NH, num_kv_heads=NKV, head_dim=HD)
    fast, gen = _fast_and_generic(packed, layout, torch.float32, monkeypatch)
    assert fast is not None, "the direct path was not taken"
    assert fast[1:] == gen[1:]
    assert_bits_equal(fast[0], gen[0], "record")


def test_direct_read_falls_back_when_it_must(tmp_path, generator, monkeypatch):
    """A dtype cast or per-module scales to fold: read_record declines (None) and the pool's generic path runs;
    the pool still gets the same rows as from the per-expert PEFT directory."""
    src, _ = _write(tmp_path, "peft", generator, r=4, down_rank=2)  # down scale 4, others 2: folding
    packed = peft_to_packed(src, tmp_path / "packed", num_experts=E)
    layout = moe_pool_layout(L, H, I, E, num_heads=NH, num_kv_heads=NKV, head_dim=HD)
    from lorakern.pool.spec import RowFormat

    assert PackedAdapter(packed).read_record("a", layout, RowFormat(layout, torch.bfloat16)) is None
    src2, _ = _write(tmp_path, "peft2", generator, r=4)
    packed2 = peft_to_packed(src2, tmp_path / "packed2", num_experts=E)
    assert PackedAdapter(packed2).read_record("a", layout, RowFormat(layout, torch.float16)) is None  # bf16 file
    assert PackedAdapter(packed2).read_record("a", layout, RowFormat(layout, torch.bfloat16)) is not None
    with pytest.raises(AdapterMismatchError, match="max_rank"):
        PackedAdapter(packed2).read_record("a", layout, RowFormat(layout, torch.bfloat16), max_rank=2)
