"""lorakern.attach on a tiny LlamaForCausalLM: the layout mirrors the wrapped modules, the model is the base model
bit for bit outside an adapter context, and a mixed batch equals PEFT applying each adapter alone — padded, packed
(position_ids), and through the engine's per-token form — on the torch backend, on Triton (interpreter on the
CPU) and on cuda (the CPU emulator without a GPU). Tolerances: see test_hf_common."""

import copy

import pytest
import torch

import lorakern
from conftest import BACKEND_LIST
from lorakern.pool import AdapterCatalog, AdapterMismatchError, PoolCapacityError, UnknownAdapterError
from test_hf_common import (ALL, ATOL, LAYERS, MIN_EFFECT, RTOL, VOCAB, attached, hf_device, hf_setup,  # noqa: F401
                            peft_ref, save_peft_adapter)

BACKENDS = BACKEND_LIST  # cuda too where it runs (without a GPU: its kernels on the CPU emulator)

# PEFT triggers a transformers deprecation notice (is_gradient_checkpointing) that is none of our business
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _ids(g, B, S):
    return torch.randint(3, VOCAB, (B, S), generator=g)


def test_layout_mirrors_wrapped_modules(hf_setup):
    base, _ = hf_setup
    model, lm = attached(base, max_adapters=5, max_rank=8)
    L = lm.layout
    assert L.target_names == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # PoolLayout.llama's order
    cfg = base.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert L.specs["qkv_proj"].n_sizes == (cfg.hidden_size, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd)
    assert L.specs["down_proj"].K == cfg.intermediate_size
    assert L.modules["model.layers.{layer}.self_attn.k_proj"] == ("qkv_proj", 1)
    assert lm.pool.max_slots == 5 and lm.pool.max_rank == 8 and lm.pool.max_rows == 40
    assert lm.pool.dtype == torch.float32
    assert len(lm.modules) == 7 * LAYERS
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, lorakern.nn.LoRALinear) and (q.layer, q.target, q.slice_index) == (1, "qkv_proj", 0)
    assert q.group is model.model.layers[1].self_attn.v_proj.group is not None
    # detach restores the original modules
    orig = lm._originals["model.layers.1.self_attn.q_proj"]
    lm.detach()
    assert model.model.layers[1].self_attn.q_proj is orig


def test_target_modules_regex_and_errors(hf_setup):
    base, _ = hf_setup
    model, lm = attached(base, target_modules=r".*\.(q_proj|v_proj)")
    assert lm.layout.target_names == ("q_proj", "v_proj")  # no k_proj: no fused group
    assert sorted(lm.modules) == sorted(f"model.layers.{l}.self_attn.{p}" for l in range(LAYERS)
                                        for p in ("q_proj", "v_proj"))
    with pytest.raises(RuntimeError, match="already"):
        lorakern.attach(model, ["o_proj"], max_rank=4, max_adapters=2)
    with pytest.raises(ValueError, match="matches no module"):
        lorakern.attach(copy.deepcopy(base), ["nonexistent"], max_rank=4, max_adapters=2)
    with pytest.raises(ValueError, match="no layer index"):
        lorakern.attach(copy.deepcopy(base), ["lm_head"], max_rank=4, max_adapters=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        lorakern.attach(copy.deepcopy(base), ["mlp"], max_rank=4, max_adapters=2)


@torch.no_grad()
def test_base_model_bit_exact_outside_and_with_no_adapter(hf_setup, monkeypatch):
    base, dirs = hf_setup
    model, lm = attached(base)
    h = lm.load_adapter(dirs["plain"])
    g = torch.Generator().manual_seed(1)
    ids = _ids(g, 3, 9)
    want = base(ids).logits
    assert torch.equal(model(ids).logits, want)
    with lm.adapters([h, h, h]):
        assert not torch.allclose(model(ids).logits, want)
    assert torch.equal(model(ids).logits, want)  # after the context: the base model again
    # a batch without any adapter: no plan, no op call (the op is poisoned to prove it)
    monkeypatch.setattr(lorakern.ops, "add_lora", lambda *a, **k: pytest.fail("add_lora called"))
    monkeypatch.setattr(lorakern.LoRAPlan, "from_slots", classmethod(lambda *a: pytest.fail("plan built")))
    with lm.adapters([None, None, None]):
        assert torch.equal(model(ids).logits, want)
    assert lm.context.plans_built == 1 and lm.context.lora_calls == 4 * LAYERS


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_mixed_batch_matches_peft_alone(hf_setup, peft_ref, backend):
    """Six sequences: every adapter (different ranks, alphas, rsLoRA, rank/alpha patterns, a partial adapter),
    one without LoRA, one adapter twice. One forward; each row equals PEFT with that adapter alone."""
    base, dirs = hf_setup
    model, lm = attached(base, backend=backend)
    handles = {n: lm.load_adapter(d, name=n) for n, d in dirs.items()}
    batch = ["plain", None, "rslora", "pattern", "partial", "plain"]
    g = torch.Generator().manual_seed(2)
    ids = _ids(g, len(batch), 7)
    with lm.adapters([None if n is None else handles[n] for n in batch]):
        got = model(ids.to(hf_device(backend))).logits.cpu()
    assert lm.context.plans_built == 1  # one plan for the whole forward, every layer
    assert lm.context.lora_calls == 4 * LAYERS  # fused q|k|v and gate|up: one op per target per layer
    for i, n in enumerate(batch):
        want = peft_ref(n, ids[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=ATOL, rtol=RTOL, msg=f"row {i} ({n})")
        if n is not None:
            assert float((want - peft_ref(None, ids[i:i + 1])).abs().max()) > MIN_EFFECT


@torch.no_grad()
def test_unfused_equals_fused(hf_setup):
    base, dirs = hf_setup
    g = torch.Generator().manual_seed(3)
    ids = _ids(g, 2, 5)
    outs = []
    for fuse in (True, False):
        model, lm = attached(base, fuse=fuse)
        a, b = lm.load_adapter(dirs["pattern"]), lm.load_adapter(dirs["rslora"])
        with lm.adapters([a, b]):
            outs.append(model(ids).logits)
        assert lm.context.lora_calls == (4 if fuse else 7) * LAYERS
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_packed_position_ids_match_peft_alone(hf_setup, peft_ref):
    """Three sequences packed in one row (position_ids restart at 0; with no attention mask and no cache,
    transformers isolates them in attention): each segment uses its own adapter and equals PEFT on that sequence
    alone."""
    base, dirs = hf_setup
    model, lm = attached(base)
    hs = [lm.load_adapter(dirs["rslora"]), None, lm.load_adapter(dirs["partial"])]
    names = ["rslora", None, "partial"]
    g = torch.Generator().manual_seed(4)
    lens = [5, 3, 6]
    seqs = [_ids(g, 1, n) for n in lens]
    ids = torch.cat(seqs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with lm.adapters(hs):
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    off = 0
    for s, n, name in zip(seqs, lens, names):
        torch.testing.assert_close(got[:, off:off + n], peft_ref(name, s), atol=ATOL, rtol=RTOL)
        off += n
    # without packing information a [1, T] input cannot be split into three sequences
    with lm.adapters(hs), pytest.raises(ValueError, match="3 sequence"):
        model(input_ids=ids)


@torch.no_grad()
def test_engine_token_slots_and_static_plan(hf_setup, peft_ref):
    """The engine form: pool slots from acquire, per-token slots [T] (tokens of two sequences interleaved
    arbitrarily is allowed — here per-token slots of a padded batch), or a prebuilt static LoRAPlan."""
    base, dirs = hf_setup
    model, lm = attached(base)
    a, b = lm.load_adapter(dirs["plain"]), lm.load_adapter(dirs["pattern"])
    g = torch.Generator().manual_seed(5)
    ids = _ids(g, 2, 6)
    slots = lm.acquire([a, b])
    tok = slots.repeat_interleave(6)
    with lm.token_slots(tok):
        got = model(ids).logits
        with pytest.raises(ValueError, match="token slots: 12 given"):
            model(ids[:, :3])
    for i, n in enumerate(["plain", "pattern"]):
        torch.testing.assert_close(got[i:i + 1], peft_ref(n, ids[i:i + 1]), atol=ATOL, rtol=RTOL)
    plan = lorakern.LoRAPlan.static(12, "cpu").update(tok)
    with lm.token_slots(plan):
        torch.testing.assert_close(model(ids).logits, got, atol=ATOL, rtol=RTOL)
    assert lm.context.plans_built == 1
    lm.release([a, b])
    assert torch.equal(model(ids).logits, base(ids).logits)


def test_load_adapter_errors_and_catalog(hf_setup, tmp_path):
    base, dirs = hf_setup
    model, lm = attached(base, max_adapters=2)
    with pytest.raises(UnknownAdapterError, match="no adapter directory"):
        lm.load_adapter(tmp_path / "missing")
    # an adapter of another model shape: rejected on load, nothing left registered
    other = transformers_tiny_other()
    bad = save_peft_adapter(other, tmp_path / "bad", seed=9, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(AdapterMismatchError):
        lm.load_adapter(bad, name="bad")
    assert "bad" not in lm.handles and "bad" not in lm.pool._sources
    h = lm.load_adapter(dirs["plain"])
    assert lm.load_adapter(dirs["plain"]) == h  # idempotent
    with pytest.raises(ValueError, match="already loaded"):
        lm.load_adapter(dirs["rslora"], name=h)
    # more distinct adapters than slots in one batch
    hs = [lm.load_adapter(dirs[n]) for n in ("rslora", "pattern")]
    with pytest.raises(PoolCapacityError):
        with lm.adapters([h] + hs):
            pass
    assert lm.pool.stats().in_flight == 0
    # catalog ids
    cat = AdapterCatalog.scan(dirs["plain"].parent, tmp_path / "a.lkcat", layout=lm.layout)
    model2, lm2 = attached(base, catalog=cat)
    cid = lm2.load_adapter("partial")
    assert cid == "partial"
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with lm2.adapters([cid]):
            got = model2(ids).logits
        h3 = lm.load_adapter(dirs["partial"], name="p")
        with lm.adapters([h3]):
            torch.testing.assert_close(model(ids).logits, got, atol=0, rtol=0)


def transformers_tiny_other():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


FAMILIES = {  # config class, target modules (Phi-3 keeps q|k|v and gate|up fused in one nn.Linear each)
    "Qwen2": ("Qwen2", ALL), "Qwen3": ("Qwen3", ALL), "Mistral": ("Mistral", ALL),
    "Phi3": ("Phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_model_families_match_peft(family, tmp_path):
    """Qwen2 (biased q/k/v), Qwen3 (q/k norms), Mistral, and Phi-3 (fused qkv_proj / gate_up_proj modules, one
    LoRA over the fused output as PEFT does): a mixed batch equals PEFT per sequence."""
    import transformers

    import peft

    prefix, targets = FAMILIES[family]
    cfg = getattr(transformers, f"{prefix}Config")(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, pad_token_id=0)
    torch.manual_seed(1)
    base = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    d = save_peft_adapter(base, tmp_path / "a", seed=3, r=8, lora_alpha=16, target_modules=targets)
    model, lm = attached(base, target_modules=targets)
    if family == "Phi3":
        assert set(lm.layout.target_names) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        assert lm.layout.specs["qkv_proj"].n_sizes == (64 + 2 * 32,)  # one slice: the fused module's output
    h = lm.load_adapter(d)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    with lm.adapters([h, None]):
        got = model(ids).logits
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
    want = ref(input_ids=ids[:1]).logits
    torch.testing.assert_close(got[:1], want, atol=ATOL, rtol=RTOL)
    assert torch.equal(got[1:], base(ids).logits[1:])  # the sequence without adapter: untouched, bit for bit
    assert float((want - base(ids[:1]).logits).abs().max()) > MIN_EFFECT


@torch.no_grad()
def test_nested_contexts_and_lora_model_passthrough(hf_setup, peft_ref):
    base, dirs = hf_setup
    model, lm = attached(base)
    a, b = lm.load_adapter(dirs["plain"], name="plain"), lm.load_adapter(dirs["rslora"], name="rslora")
    ids = _ids(torch.Generator().manual_seed(8), 2, 5)
    with lm.adapters([a, b]):
        outer = lm(ids).logits  # LoRAModel calls the model
        with lm.adapters([None, a]):
            inner = lm(input_ids=ids).logits
        assert torch.equal(lm(ids).logits, outer)  # the outer assignment is back
    torch.testing.assert_close(inner[0:1], peft_ref(None, ids[0:1]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(inner[1:2], peft_ref("plain", ids[1:2]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(outer[1:2], peft_ref("rslora", ids[1:2]), atol=ATOL, rtol=RTOL)
    assert lm.pool.stats().in_flight == 0 and lm.config is model.config


@pytest.mark.parametrize("backend", ["torch", "cuda"] if "cuda" in BACKENDS else ["torch"])
@torch.no_grad()
def test_compiled_model_has_no_graph_break_and_follows_the_mix(hf_setup, peft_ref, backend):
    """torch.compile(fullgraph=True) on an attached model: under compile the plan is static (no host read of its
    statistics) and grouped slices take one call each (no state checked by version counter), so the forward is one
    graph. Two batches of the same shape with different adapter mixes both equal PEFT (the mix is not baked in)."""
    import torch._dynamo

    torch._dynamo.reset()
    base, dirs = hf_setup
    model, lm = attached(base, backend=backend)
    handles = {n: lm.load_adapter(d, name=n) for n, d in dirs.items()}
    compiled = torch.compile(model, fullgraph=True, backend="eager" if backend == "cuda" else "inductor")
    g = torch.Generator().manual_seed(5)
    ids = _ids(g, 3, 6)
    for batch in (["plain", None, "rslora"], ["pattern", "plain", None]):
        with lm.adapters([None if n is None else handles[n] for n in batch]):
            got = compiled(ids.to(hf_device(backend))).logits.cpu()
        for i, n in enumerate(batch):
            torch.testing.assert_close(got[i:i + 1], peft_ref(n, ids[i:i + 1]), atol=ATOL, rtol=RTOL,
                                       msg=f"{batch}: row {i} ({n})")
    torch._dynamo.reset()
