"""Export: an adapter held in the pool, written back to PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``), loads in PEFT and gives the outputs of the original adapter; loading the export
into lorakern again gives the same rank rows, bit for bit."""

import json

import pytest
import torch

from test_hf_common import ATOL, RTOL, VOCAB, attached, hf_setup, peft  # noqa: F401

# PEFT triggers a transformers deprecation notice (is_gradient_checkpointing) that is none of our business
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize("name", ["pattern", "rslora", "partial"])
@torch.no_grad()
def test_export_round_trip_through_peft(hf_setup, tmp_path, name):
    import copy

    base, dirs = hf_setup
    model, lm = attached(base)
    h = lm.load_adapter(dirs[name], name=name)
    out = lm.export_adapter(h, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    if name == "pattern":  # module ranks below the slot rank come back through rank_pattern
        assert cfg["r"] == 6 and set(cfg["rank_pattern"].values()) == {2, 3}
    if name == "partial":
        assert all(n.endswith(("q_proj", "v_proj")) for n in cfg["target_modules"])

    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(12))
    orig = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[name])).eval()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(back(input_ids=ids).logits, orig(input_ids=ids).logits, atol=ATOL, rtol=RTOL)

    # lorakern reads its own export back to the same rows and scale
    h2 = lm.load_adapter(out, name="again")
    with lm.adapters([h, h2]):
        got = model(ids[:1].expand(2, -1)).logits
    torch.testing.assert_close(got[0], got[1], atol=ATOL, rtol=RTOL)
    p = lm.pool
    s1, s2 = p.slot_of(h), p.slot_of(h2)
    assert int(p.ranks[s1]) == int(p.ranks[s2])
    r1, r2 = p.page_table[s1, :int(p.ranks[s1])].long(), p.page_table[s2, :int(p.ranks[s2])].long()
    assert torch.equal(p.rows[r1], p.rows[r2])
    assert float(p.scales[s1]) == float(p.scales[s2])
