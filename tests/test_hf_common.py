"""Shared fixtures of the Hugging Face tests (test_hf_*.py): a tiny LlamaForCausalLM built from a config in code (no
hub download) and adapters saved by PEFT's own ``save_pretrained``, with random non-zero LoRA B weights.

Adapters (ranks, alphas and targets all differ, so that every PEFT scaling rule is exercised):

==========  ==========================================================================================
``plain``   r=4, alpha=8, every projection
``rslora``  r=8, alpha=16, use_rslora (scale alpha / sqrt(r)), every projection
``pattern`` r=6, alpha=12, rank_pattern {k_proj: 2, down_proj: 3}, alpha_pattern {v_proj: 24}
``partial`` r=16, alpha=8, q_proj and v_proj only
==========  ==========================================================================================

Tolerance (float32 logits): lorakern computes each module's LoRA as ``scale * (x @ A.T) @ B.T`` with float32
sums, PEFT as ``lora_B(lora_A(x)) * scaling`` — the same products in another association and rounding order. The
difference per projection is a few float32 ulps of its output (|out| ≲ 3), and two layers plus the LM head
amplify it by at most ~K = 128; measured max |Δlogits| is 1.5e-7 to 1e-6. ``ATOL = 2e-5`` (with ``RTOL = 1e-5``)
is ~20x the measured difference and ~10^4 below the LoRA effect on the logits (asserted > 0.05 in each test, so
a test where the adapters did nothing cannot pass).
"""

import copy

import pytest
import torch

from conftest import backend_device

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# PEFT triggers a transformers deprecation notice (is_gradient_checkpointing) that is none of our business
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 128, 64, 128, 2, 4, 2
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL),
    "pattern": dict(r=6, lora_alpha=12, rank_pattern={"k_proj": 2, "down_proj": 3}, alpha_pattern={"v_proj": 24},
                    target_modules=ALL),
    "partial": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
MAX_RANK = 16
ATOL, RTOL = 2e-5, 1e-5
MIN_EFFECT = 0.05


def tiny_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    num_key_value_heads=KV_HEADS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    attn_implementation="sdpa")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


def save_peft_adapter(base, path, seed: int, **lora_kwargs):
    """Save an adapter with PEFT's ``save_pretrained``; A and B random (B scaled so LoRA changes the logits by
    O(0.1-1))."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=g) * 0.5 / b.shape[1] ** 0.5)
    pm.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def hf_setup(tmp_path_factory):
    """(base model, {adapter name: directory}) — built once per test session."""
    root = tmp_path_factory.mktemp("hf_adapters")
    base = tiny_llama(0)
    dirs = {name: save_peft_adapter(base, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    return base, dirs


@pytest.fixture(scope="session")
def peft_ref(hf_setup):
    """``ref(name or None, input_ids, **kw) -> logits`` of PEFT applying that adapter alone (None = base)."""
    base, dirs = hf_setup
    names = list(dirs)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0]).eval()
    for n in names[1:]:
        pm.load_adapter(str(dirs[n]), adapter_name=n)

    @torch.no_grad()
    def ref(name, input_ids, **kw):
        if name is None:
            with pm.disable_adapter():
                return pm(input_ids=input_ids, **kw).logits
        pm.set_adapter(name)
        return pm(input_ids=input_ids, **kw).logits

    def generate(name, input_ids, **kw):
        if name is None:
            with pm.disable_adapter():
                return pm.generate(input_ids=input_ids, **kw)
        pm.set_adapter(name)
        return pm.generate(input_ids=input_ids, **kw)

    ref.generate = generate
    ref.model = pm
    return ref


#: where a model of a test runs (the reference PEFT model stays on the CPU)
hf_device = backend_device


def attached(base, backend="torch", **kw):
    """A fresh copy of ``base`` with every projection attached, on :func:`hf_device`."""
    import lorakern

    model = copy.deepcopy(base).to(hf_device(backend))
    args = dict(target_modules=ALL, max_rank=MAX_RANK, max_adapters=4, backend=backend)
    args.update(kw)
    return model, lorakern.attach(model, **args)


def test_fixture_adapters_are_peft_format(hf_setup):
    """The fixture's adapters are PEFT's own files with non-zero B (so every parity test can fail)."""
    from safetensors.torch import load_file

    _, dirs = hf_setup
    for name, d in dirs.items():
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        sd = load_file(str(d / "adapter_model.safetensors"))
        bs = [t for k, t in sd.items() if ".lora_B." in k]
        assert bs and all(bool((t != 0).any()) for t in bs), name
