"""Generation with a mixed batch: ``model.generate`` (greedy, KV cache: a prefill then [B, 1] decode steps, left
padding) inside ``lm.adapters([...])`` gives every sequence the tokens PEFT generates for it alone (unpadded)."""

import pytest
import torch

from conftest import BACKEND_LIST
from test_hf_common import VOCAB, attached, hf_device, hf_setup, peft_ref  # noqa: F401

# PEFT triggers a transformers deprecation notice (is_gradient_checkpointing) that is none of our business
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

NEW = 6


def _left_padded(seqs, pad=0):
    S = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), S), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - s.numel():] = s
        mask[i, S - s.numel():] = 1
    return ids, mask


@pytest.mark.parametrize("backend", BACKEND_LIST)
@torch.no_grad()
def test_generate_mixed_batch_matches_peft_alone(hf_setup, peft_ref, backend):
    base, dirs = hf_setup
    model, lm = attached(base, backend=backend)
    names = ["pattern", None, "plain", "partial", "rslora"]
    hs = [None if n is None else lm.load_adapter(dirs[n], name=n) for n in names]
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 8, 3, 7, 6)]
    ids, mask = _left_padded(seqs)
    dev = hf_device(backend)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with lm.adapters(hs):
        out = lm.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw).cpu()  # passed through
    assert lm.context.plans_built == NEW  # one plan per forward: the prefill and NEW - 1 decode steps of [B, 1]
    new = out[:, ids.shape[1]:]
    base_new = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw).cpu()[:, ids.shape[1]:]
    differs = 0
    for i, (s, n) in enumerate(zip(seqs, names)):
        want = peft_ref.generate(n, s[None], **kw)[0, s.numel():]
        assert new[i].tolist() == want.tolist(), f"sequence {i} ({n})"
        differs += n is not None and new[i].tolist() != base_new[i].tolist()
    assert differs >= 3  # the adapters change what is generated: the comparison can fail


@torch.no_grad()
def test_beam_search_expanded_rows(hf_setup, peft_ref):
    """Beam search expands each sequence to ``num_beams`` consecutive rows: they keep the sequence's adapter."""
    base, dirs = hf_setup
    model, lm = attached(base)
    names = ["rslora", "pattern"]
    hs = [lm.load_adapter(dirs[n], name=n) for n in names]
    g = torch.Generator().manual_seed(13)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in (4, 6)]
    ids, mask = _left_padded(seqs)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    with lm.adapters(hs):
        out = lm.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    for i, (s, n) in enumerate(zip(seqs, names)):
        assert out[i].tolist() == peft_ref.generate(n, s[None], **kw)[0, s.numel():].tolist(), n


@torch.no_grad()
def test_generate_with_a_compiled_forward(hf_setup):
    """``model.forward = torch.compile(model.forward, fullgraph=True)``: greedy generation of a mixed batch (prefill
    and [B, 1] decode steps, each its own graph) gives the tokens of the eager model."""
    import torch._dynamo

    base, dirs = hf_setup
    model, lm = attached(base)
    hs = [lm.load_adapter(dirs["plain"], name="plain"), None, lm.load_adapter(dirs["rslora"], name="rslora")]
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(17))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with lm.adapters(hs):
        eager = model.generate(input_ids=ids, **kw)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True)
    try:
        with lm.adapters(hs):
            compiled = model.generate(input_ids=ids, **kw)
    finally:
        torch._dynamo.reset()
    assert torch.equal(eager, compiled)
