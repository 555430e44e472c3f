"""Property test: add_lora and shrink/expand against the float64 reference on shapes and mixes drawn by
hypothesis — any K, slice widths and gaps, page-table width, ranks 0..max_rank, -1 tokens, slot forms — for the
torch backend and both Triton paths (interpreter on the CPU). The fixed cases of test_ops_lora.py pin the
adversarial list of DESIGN.md §6; this looks between them."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakern
from conftest import (DTYPES, IMPLS, check_accumulated, make_case, oracle_add, oracle_shrink, random_out,
                      set_impl, check_shrink)


@st.composite
def cases(draw):
    S = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 80)) for _ in range(S)]
    gaps = [draw(st.integers(0, 9)) for _ in range(S)]
    offsets, col = [], draw(st.integers(0, 5))
    for w, gap in zip(widths, gaps):
        offsets.append(col)
        col += w + gap
    num_adapters = draw(st.integers(1, 12))
    max_rank = draw(st.integers(1, 40))
    ranks = [draw(st.integers(0, max_rank)) for _ in range(num_adapters)]
    return dict(
        T=draw(st.integers(0, 40)), K=draw(st.integers(1, 130)), n_sizes=widths, ranks=ranks,
        num_adapters=num_adapters, max_rank=max_rank,
        mix=draw(st.sampled_from(["identical", "distinct", "uniform", "zipf:1.5", "skewed"])),
        none_frac=draw(st.sampled_from([0.0, 0.3])),
        slice_offsets=draw(st.sampled_from([None, offsets])),
        scales=draw(st.booleans()),
        x_layout=draw(st.sampled_from(["contiguous", "column_slice", "transposed"])),
        slots_form=draw(st.sampled_from(["int32", "int64", "plan", "static"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
# 12 examples per (impl, dtype) in CI; LORAKERN_PROPERTY_EXAMPLES=500 for a bug hunt
@settings(max_examples=int(os.environ.get("LORAKERN_PROPERTY_EXAMPLES", "12")), deadline=None, derandomize=False, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=cases())
def test_add_lora_and_shrink_expand_match_reference(impl, dtype, spec, monkeypatch):
    backend = set_impl(impl, monkeypatch)
    spec = dict(spec)
    g = torch.Generator().manual_seed(spec.pop("seed"))
    case = make_case(g, dtype=dtype, **spec)
    out, buf, snap = random_out(case, g)
    out0 = out.clone()
    lorakern.ops.add_lora(out, case.x, case.lora.lora_a, case.lora.lora_b, case.lora.page_table, case.lora.ranks,
                          case.scales, case.slots_arg, slice_offsets=case.slice_offsets, backend=backend)
    ref, ref_abs = oracle_add(case, out0)
    check_accumulated(case, out, out0, ref, ref_abs)

    y = lorakern.ops.lora_shrink(case.x, case.lora.lora_a, case.lora.page_table, case.lora.ranks, case.slots_arg,
                                 backend=backend)
    yref, yabs = oracle_shrink(case)
    check_shrink(case, y, yref, yabs)
    out2 = out0.clone()
    lorakern.ops.lora_expand(out2, y, case.lora.lora_b, case.lora.page_table, case.lora.ranks, case.scales,
                             case.slots_arg, slice_offsets=case.slice_offsets, backend=backend)
    ref2, ref2_abs = oracle_add(case, out0, y=y)
    check_accumulated(case, out2, out0, ref2, ref2_abs)


@st.composite
def moe_cases(draw):
    S = draw(st.integers(1, 2))
    E = draw(st.integers(1, 24))
    n_adapters = draw(st.integers(1, 6))
    return dict(
        E=E, K=draw(st.integers(1, 70)), n_sizes=[draw(st.integers(1, 40)) for _ in range(S)],
        ranks=[draw(st.integers(0, 24)) for _ in range(n_adapters)],
        T=draw(st.integers(0, 24)), topk=draw(st.integers(1, min(E, 8))),
        form=draw(st.sampled_from(["shared", "per_expert"])), weights=draw(st.booleans()),
        skew=draw(st.booleans()), missing=draw(st.sampled_from([0.0, 0.4])),
        slots_form=draw(st.sampled_from(["int32", "int64", "plan", "static"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@settings(max_examples=int(os.environ.get("LORAKERN_PROPERTY_EXAMPLES", "12")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=moe_cases())
def test_add_lora_moe_matches_reference(backend, dtype, spec):
    from test_moe import make_moe_lora, make_routing, run, _x

    g = torch.Generator().manual_seed(spec["seed"])
    L = make_moe_lora(g, E=spec["E"], K=spec["K"], n_sizes=spec["n_sizes"], ranks=spec["ranks"], dtype=dtype,
                      missing_expert_frac=spec["missing"])
    ids, w = make_routing(g, spec["T"], spec["topk"], spec["E"], skew=spec["skew"])
    slots = torch.randint(-1, L.num_slots, (spec["T"],), generator=g, dtype=torch.int32)
    x = _x(g, spec["T"], spec["topk"], spec["K"], spec["form"], dtype)
    weights = w.to(x.device) if spec["weights"] else None
    run(L, x, ids, slots, backend=backend, dtype=dtype, weights=weights, slots_form=spec["slots_form"], g=g)


@st.composite
def mla_cases(draw):
    n = draw(st.integers(1, 8))
    max_rank = draw(st.integers(1, 40))
    return dict(
        T=draw(st.integers(0, 24)), H=draw(st.integers(1, 9)), C=draw(st.integers(1, 80)),
        Dn=draw(st.integers(1, 24)), Dv=draw(st.integers(1, 24)), num_adapters=n, max_rank=max_rank,
        ranks=[draw(st.integers(0, max_rank)) for _ in range(n)],
        mix=draw(st.sampled_from(["identical", "distinct", "uniform", "zipf:1.5"])),
        none_frac=draw(st.sampled_from([0.0, 0.3])), scales=draw(st.booleans()),
        slots_form=draw(st.sampled_from(["int32", "int64", "plan", "static"])),
        layout=draw(st.sampled_from(["contiguous", "strided"])), seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("op", ["q", "o"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@settings(max_examples=int(os.environ.get("LORAKERN_PROPERTY_EXAMPLES", "8")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=mla_cases())
def test_mla_absorbed_matches_reference(op, backend, dtype, spec):
    from test_mla import make_mla_case, run

    spec = dict(spec)
    g = torch.Generator().manual_seed(spec.pop("seed"))
    case = make_mla_case(g, dtype=dtype, **spec)
    run(case, op, backend, g)
