"""Loaders: PEFT directories (written by PEFT itself when it is installed, and by hand), safetensors blobs,
in-memory tensors, PEFT scaling semantics (alpha/r, rsLoRA, rank_pattern, alpha_pattern) and bad input.

Every bad-input case checks the typed error, that its message names the adapter, and that the pool (bookkeeping,
page table, row contents, host cache) is exactly as it was."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorakern.pool import (AdapterDtypeError, AdapterError, AdapterFileError, AdapterFormatError,
                           AdapterMismatchError, AdapterPool, PeftDir, PoolLayout, SafetensorsBlob, TargetSpec,
                           TensorAdapter, adapter_blob, save_peft_dir)
from lorakern.pool.loaders import read_safetensors

# a tiny Llama: hidden 32, intermediate 48, 4 heads of 8, 2 KV heads
H, I, NH, NKV, HD, LAYERS = 32, 48, 4, 2, 8, 2
PROJ = {"q_proj": (H, NH * HD), "k_proj": (H, NKV * HD), "v_proj": (H, NKV * HD), "o_proj": (NH * HD, H),
        "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
PATH = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}


def layout():
    return PoolLayout.llama(LAYERS, H, I, NH, NKV, head_dim=HD)


def make_pool(dtype=torch.float32, **kw):
    args = dict(max_rows=24, max_slots=4, max_rank=8, dtype=dtype)
    args.update(kw)
    return AdapterPool(layout(), **args)


def random_modules(g, ranks, projs=tuple(PROJ), layers=range(LAYERS)):
    """module name → (A [r, K], B [N, r]) in float32, ``ranks``: proj → rank."""
    out = {}
    for layer in layers:
        for p in projs:
            K, N = PROJ[p]
            r = ranks[p] if isinstance(ranks, dict) else ranks
            out[f"model.layers.{layer}.{PATH[p]}.{p}"] = (torch.randn(r, K, generator=g), torch.randn(N, r, generator=g))
    return out


def snapshot(pool):
    return pool._state(), pool.rows.clone()


def assert_unchanged(pool, snap):
    state, rows = snap
    assert pool._state() == state
    assert torch.equal(pool.rows, rows)


def pool_delta(pool, aid, layer, target, sl):
    """scale * B @ A of an adapter's (layer, target, slice) as stored in the pool, in float64."""
    slot = pool.slot_of(aid)
    r = int(pool.ranks[slot])
    rows = pool.page_table[slot, :r].long()
    A = pool.lora_a(layer, target)[sl][rows].double()
    B = pool.lora_b(layer, target)[sl][rows].double()
    return float(pool.scales[slot]) * B.T @ A


# ------------------------------------------------------------------------------------------------ PEFT itself
def _peft_model(lora_kwargs, seed):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                                   num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD)
    model = transformers.LlamaForCausalLM(cfg)
    lc = peft.LoraConfig(target_modules=list(PROJ), init_lora_weights=False, **lora_kwargs)
    return peft.get_peft_model(model, lc)


PEFT_CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rank_alpha_pattern": dict(r=4, lora_alpha=8, rank_pattern={"k_proj": 2, "down_proj": 6},
                               alpha_pattern={"v_proj": 16, "gate_proj": 3}),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"o_proj": 2}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_save_pretrained_matches_peft_forward(case, tmp_path):
    """An adapter saved by PEFT's save_pretrained, loaded into the pool: per module, scale * B @ A equals PEFT's
    own B @ A * scaling, and the pool + add_lora reproduces the PEFT module's forward (LoRA part) exactly."""
    import lorakern

    pm = _peft_model(PEFT_CASES[case], seed=len(case))
    pm.save_pretrained(tmp_path / case)
    pool = make_pool(dtype=torch.float32)
    pool.register("peft", tmp_path / case)
    slots = pool.acquire(["peft"])
    slot = int(slots[0])
    want_rank = max([PEFT_CASES[case]["r"]] + list(PEFT_CASES[case].get("rank_pattern", {}).values()))
    assert int(pool.ranks[slot]) == want_rank
    g = torch.Generator().manual_seed(7)
    mods = dict(pm.named_modules())
    for layer in range(LAYERS):
        for p, (target, sl) in FUSED.items():
            m = mods[f"base_model.model.model.layers.{layer}.{PATH[p]}.{p}"]
            want = (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
                    * m.scaling["default"])
            got = pool_delta(pool, "peft", layer, target, sl)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{case} layer {layer} {p}")
        # forward: a fused target at once against PEFT's modules
        for target, projs in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")),
                              ("o_proj", ("o_proj",)), ("down_proj", ("down_proj",))):
            K = PROJ[projs[0]][0]
            x = torch.randn(5, K, generator=g)
            ms = [mods[f"base_model.model.model.layers.{layer}.{PATH[p]}.{p}"] for p in projs]
            with torch.no_grad():
                base = torch.cat([m.base_layer(x) for m in ms], dim=1)
                want = torch.cat([m(x) for m in ms], dim=1)
            out = base.clone()
            tok_slots = torch.full((5,), slot, dtype=torch.int32)
            lorakern.ops.add_lora(out, x, *pool.args(layer, target), tok_slots, backend="torch")
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    pool.release(["peft"])


# ------------------------------------------------------------------------------------------------ by hand
def test_hand_written_peft_dir_scaling(tmp_path):
    """rank_pattern pads a lower-rank module with zero rows; alpha_pattern and rank differences are folded
    into B so that one slot scale serves every module."""
    g = torch.Generator().manual_seed(1)
    ranks = {"q_proj": 4, "k_proj": 2, "v_proj": 4, "o_proj": 3, "gate_proj": 4, "up_proj": 4, "down_proj": 4}
    mods = random_modules(g, ranks)
    save_peft_dir(tmp_path / "a", mods, r=4, lora_alpha=8, rank_pattern={"k_proj": 2, "o_proj": 3},
                  alpha_pattern={"up_proj": 2})
    pool = make_pool()
    pool.register("a", tmp_path / "a")
    pool.load(["a"])
    slot = pool.slot_of("a")
    assert int(pool.ranks[slot]) == 4
    assert float(pool.scales[slot]) == 2.0  # 8/4, the most common module scale
    for name, (A, B) in mods.items():
        layer = int(name.split(".")[2])
        p = name.rsplit(".", 1)[-1]
        r = ranks[p]
        alpha = 2 if p == "up_proj" else 8
        target, sl = FUSED[p]
        got = pool_delta(pool, "a", layer, target, sl)
        torch.testing.assert_close(got, (alpha / r) * B.double() @ A.double(), rtol=1e-6, atol=1e-6)
        # rows beyond a module's rank are zero in A and B (no stale data)
        rows = pool.page_table[slot, :4].long()
        assert bool((pool.lora_a(layer, target)[sl][rows][r:] == 0).all())
        assert bool((pool.lora_b(layer, target)[sl][rows][r:] == 0).all())


def test_missing_targets_are_zero_filled(tmp_path):
    """An adapter with only q_proj in layer 0: every other target's part of its rows is zero, even where the
    rows previously held another adapter."""
    g = torch.Generator().manual_seed(2)
    pool = make_pool(max_rows=4, max_slots=1)
    pool.register("full", TensorAdapter(random_modules(g, 4)))
    pool.register("q_only", TensorAdapter(random_modules(g, 4, projs=("q_proj",), layers=[0])))
    pool.load(["full"])
    assert bool((pool.rows != 0).any())
    pool.load(["q_only"])  # evicts "full", reuses its rows
    assert pool.resident_ids() == ["q_only"]
    rows = pool.page_table[0, :4].long()
    q_off, q_len = pool.fmt.a_range(0, "qkv_proj", 0)
    qb_off, qb_len = pool.fmt.b_range(0, "qkv_proj", 0)
    keep = torch.zeros(pool.fmt.row_elems, dtype=torch.bool)
    keep[q_off:q_off + q_len] = True
    keep[qb_off:qb_off + qb_len] = True
    assert bool((pool.rows[rows][:, ~keep] == 0).all())
    assert bool((pool.rows[rows][:, keep] != 0).any())


def test_in_memory_by_name_tuple_and_moe():
    g = torch.Generator().manual_seed(3)
    lay = PoolLayout(2, {"o": TargetSpec(8, (6,))}, moe_targets={"w13": TargetSpec(8, (5, 5), num_experts=3)},
                     modules={"layers.{layer}.o": ("o", 0), "layers.{layer}.experts.{expert}.w1": ("w13", 0),
                              "layers.{layer}.experts.{expert}.w3": ("w13", 1)})
    pool = AdapterPool(lay, max_rows=8, max_slots=2, max_rank=4, dtype=torch.float32)
    A_o, B_o = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    packed_A, packed_B = torch.randn(3, 3, 8, generator=g), torch.randn(3, 5, 3, generator=g)
    per_expert = {e: (torch.randn(2, 8, generator=g), torch.randn(5, 2, generator=g)) for e in (0, 2)}
    tensors = {"model.layers.0.o": (A_o, B_o), (1, "w13", 0): (packed_A, packed_B)}
    tensors.update({f"model.layers.1.experts.{e}.w3": ab for e, ab in per_expert.items()})
    pool.register("m", TensorAdapter(tensors, scale=0.25))
    pool.load(["m"])
    slot = pool.slot_of("m")
    assert int(pool.ranks[slot]) == 3 and float(pool.scales[slot]) == 0.25
    rows = pool.page_table[slot, :3].long()
    assert torch.equal(pool.lora_a(0, "o")[0][rows], A_o)
    assert torch.equal(pool.lora_b(0, "o")[0][rows], B_o.T)
    a13, b13 = pool.lora_a(1, "w13"), pool.lora_b(1, "w13")
    assert a13[0].shape == (8, 3, 8) and b13[1].shape == (8, 3, 5)
    assert torch.equal(a13[0][rows], packed_A.permute(1, 0, 2))  # row j = rank component j of every expert
    assert torch.equal(b13[0][rows], packed_B.permute(2, 0, 1))
    for e in range(3):  # slice 1 from per-expert modules: experts 0, 2 rank 2 (zero-padded), expert 1 absent
        want_a = torch.zeros(3, 8)
        want_b = torch.zeros(3, 5)
        if e in per_expert:
            want_a[:2] = per_expert[e][0]
            want_b[:2] = per_expert[e][1].T
        assert torch.equal(a13[1][rows][:, e], want_a)
        assert torch.equal(b13[1][rows][:, e], want_b)
    assert bool((pool.lora_a(0, "w13")[0][rows] == 0).all()) if lay.has(0, "w13") else True


def test_safetensors_blob_whole_file_and_packed(tmp_path):
    g = torch.Generator().manual_seed(4)
    pool = make_pool()
    mods1, mods2 = random_modules(g, 2), random_modules(g, 3)
    b1 = adapter_blob(mods1, r=2, lora_alpha=4)
    b2 = adapter_blob(mods2, r=3, lora_alpha=3, use_rslora=True)
    (tmp_path / "one.safetensors").write_bytes(b1)
    (tmp_path / "packed.bin").write_bytes(b"junk" + b1 + b2)
    pool.register("whole", tmp_path / "one.safetensors")
    pool.register("p2", SafetensorsBlob(tmp_path / "packed.bin", 4 + len(b1), len(b2)))
    pool.load(["whole", "p2"])
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(pool_delta(pool, "whole", 1, "down_proj", 0),
                               2.0 * mods1[name][1].double() @ mods1[name][0].double())
    torch.testing.assert_close(pool_delta(pool, "p2", 1, "down_proj", 0),
                               3 / math.sqrt(3) * mods2[name][1].double() @ mods2[name][0].double())


def test_dtype_cast_and_bf16_source(tmp_path):
    g = torch.Generator().manual_seed(5)
    mods = {k: (a.bfloat16(), b.bfloat16()) for k, (a, b) in random_modules(g, 2).items()}
    save_peft_dir(tmp_path / "bf", mods, r=2, lora_alpha=2)
    pool = make_pool(dtype=torch.float16)
    pool.register("bf", tmp_path / "bf")
    pool.load(["bf"])
    slot = pool.slot_of("bf")
    rows = pool.page_table[slot, :2].long()
    a, _ = mods["model.layers.0.self_attn.q_proj"]
    assert torch.equal(pool.lora_a(0, "qkv_proj")[0][rows], a.to(torch.float16))


# ------------------------------------------------------------------------------------------------ bad input
def _good_dir(tmp_path, name="good", r=2, g=None):
    g = g or torch.Generator().manual_seed(11)
    return save_peft_dir(tmp_path / name, random_modules(g, r), r=r, lora_alpha=2 * r)


def _write_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d, fn):
    from safetensors.torch import load_file
    t = load_file(str(d / "adapter_model.safetensors"))
    save_file(fn(dict(t)), str(d / "adapter_model.safetensors"))


def _corrupt_missing_dir(d):
    import shutil
    shutil.rmtree(d)


def _truncate(d):
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _garbage_header(d):
    p = d / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:40] = b"\xff" * 32
    p.write_bytes(bytes(data))


def _huge_header_len(d):
    p = d / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[0:8] = struct.pack("<Q", 1 << 40)
    p.write_bytes(bytes(data))


def _tiny_file(d):
    (d / "adapter_model.safetensors").write_bytes(b"\x01\x02")


def _bad_offsets(d):
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    hdr = json.loads(data[8:8 + n])
    k = next(k for k in hdr if k != "__metadata__")
    hdr[k]["data_offsets"][1] += 4
    raw = json.dumps(hdr).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _drop_b(t):
    k = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    del t[k]
    return t


def _extra_tensor(t):
    t["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    return t


def _unknown_module(t):
    t["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(2, H)
    t["base_model.model.model.layers.0.self_attn.rotary.lora_B.weight"] = torch.zeros(H, 2)
    return t


def _layer_out_of_range(t):
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, H)
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(NH * HD, 2)
    return t


def _wrong_K(t):
    k = next(k for k in t if k.endswith("o_proj.lora_A.weight"))
    t[k] = torch.zeros(2, NH * HD + 1)
    return t


def _wrong_N(t):
    k = next(k for k in t if k.endswith("k_proj.lora_B.weight"))
    t[k] = torch.zeros(NKV * HD + 3, 2)
    return t


def _int_dtype(t):
    k = next(k for k in t if k.endswith("v_proj.lora_A.weight"))
    t[k] = t[k].to(torch.int32)
    return t


def _rank_mismatch_ab(t):
    k = next(k for k in t if k.endswith("v_proj.lora_B.weight"))
    t[k] = torch.zeros(t[k].shape[0], 3)
    return t


BAD = {
    # case: (mutator(dir), error class, builtin, words in the message)
    "missing_dir": (_corrupt_missing_dir, AdapterFileError, OSError, "not found"),
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), AdapterFileError, OSError, "adapter_config"),
    "missing_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), AdapterFileError, OSError, "not found"),
    "only_bin": (lambda d: ((d / "adapter_model.safetensors").rename(d / "adapter_model.bin")), AdapterFormatError,
                 ValueError, "adapter_model.bin"),
    "truncated": (_truncate, AdapterFormatError, ValueError, "truncated"),
    "tiny_file": (_tiny_file, AdapterFormatError, ValueError, "truncated"),
    "garbage_header": (_garbage_header, AdapterFormatError, ValueError, "corrupt"),
    "huge_header_len": (_huge_header_len, AdapterFormatError, ValueError, "truncated"),
    "bad_offsets": (_bad_offsets, AdapterFormatError, ValueError, "corrupt"),
    "config_not_json": (lambda d: (d / "adapter_config.json").write_text("{r: 2"), AdapterFormatError, ValueError,
                        "JSON"),
    "config_no_r": (lambda d: _write_config(d, r=None), AdapterFormatError, ValueError, "'r'"),
    "config_rank_disagrees": (lambda d: _write_config(d, r=3), AdapterFormatError, ValueError, "rank 3"),
    "not_lora": (lambda d: _write_config(d, peft_type="IA3"), AdapterFormatError, ValueError, "IA3"),
    "dora": (lambda d: _write_config(d, use_dora=True), AdapterFormatError, ValueError, "DoRA"),
    "lora_bias": (lambda d: _write_config(d, lora_bias=True), AdapterFormatError, ValueError, "bias"),
    "missing_B": (lambda d: _rewrite_tensors(d, _drop_b), AdapterFormatError, ValueError, "lora_B is missing"),
    "extra_tensor": (lambda d: _rewrite_tensors(d, _extra_tensor), AdapterFormatError, ValueError, "lm_head"),
    "unknown_module": (lambda d: _rewrite_tensors(d, _unknown_module), AdapterMismatchError, ValueError, "rotary"),
    "layer_out_of_range": (lambda d: _rewrite_tensors(d, _layer_out_of_range), AdapterMismatchError, ValueError,
                           "layer 7"),
    "wrong_K": (lambda d: _rewrite_tensors(d, _wrong_K), AdapterMismatchError, ValueError, "K="),
    "wrong_N": (lambda d: _rewrite_tensors(d, _wrong_N), AdapterMismatchError, ValueError, "N="),
    "int_dtype": (lambda d: _rewrite_tensors(d, _int_dtype), AdapterDtypeError, TypeError, "int32"),
    "rank_mismatch_AB": (lambda d: _rewrite_tensors(d, _rank_mismatch_ab), AdapterFormatError, ValueError, "rank"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_peft_dir_is_typed_and_changes_nothing(case, tmp_path):
    mutate, cls, builtin, words = BAD[case]
    g = torch.Generator().manual_seed(12)
    pool = make_pool(max_rows=6, max_slots=3)
    pool.register("ok1", TensorAdapter(random_modules(g, 2)))
    pool.register("ok2", TensorAdapter(random_modules(g, 3)))
    pool.load(["ok1"])
    pool.acquire(["ok1"])
    d = _good_dir(tmp_path, "bad")
    mutate(d)
    pool.register("bad-adapter", PeftDir(d))
    snap = snapshot(pool)
    with pytest.raises(cls) as ei:
        pool.acquire(["ok2", "bad-adapter", "ok1"])  # the good one is not loaded either
    e = ei.value
    assert isinstance(e, builtin) and isinstance(e, AdapterError)
    assert e.adapter_id == "bad-adapter" and "'bad-adapter'" in str(e)
    assert words in str(e), str(e)
    assert_unchanged(pool, snap)
    assert "ok2" not in pool


def test_rank_above_max_rank(tmp_path):
    g = torch.Generator().manual_seed(13)
    pool = make_pool(max_rank=4)
    d = save_peft_dir(tmp_path / "r8", random_modules(g, 8), r=8, lora_alpha=8)
    pool.register("r8", d)
    snap = snapshot(pool)
    with pytest.raises(AdapterMismatchError, match=r"adapter 'r8': rank 8 above the pool's max_rank=4"):
        pool.acquire(["r8"])
    assert_unchanged(pool, snap)


def test_strict_dtype(tmp_path):
    g = torch.Generator().manual_seed(14)
    pool = make_pool(dtype=torch.float16, strict_dtype=True)
    pool.register("f32", TensorAdapter(random_modules(g, 2)))
    snap = snapshot(pool)
    with pytest.raises(AdapterDtypeError, match="strict_dtype"):
        pool.load(["f32"])
    assert_unchanged(pool, snap)


def test_reader_exception_is_wrapped():
    class Broken(TensorAdapter):
        def read(self, adapter_id, layout):
            raise RuntimeError("disk on fire")

    pool = make_pool()
    pool.register("b", Broken({}))
    with pytest.raises(AdapterFormatError, match="adapter 'b': .*disk on fire"):
        pool.load(["b"])


def test_read_safetensors_checks_in_memory():
    from safetensors.torch import save
    data = save({"x": torch.arange(6, dtype=torch.float32).view(2, 3)})
    t, meta = read_safetensors("m", bytearray(data))
    assert torch.equal(t["x"], torch.arange(6, dtype=torch.float32).view(2, 3))
    with pytest.raises(AdapterFormatError, match="truncated"):
        read_safetensors("m", data[:-4])
