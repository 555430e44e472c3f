"""The torch backend (lorakern/torch_backend.py): the reference's semantics in a fixed number of torch ops.

The op suites (test_ops_lora.py, test_ops_property.py) run it as it chooses and with each form forced for every
token (``torch-gather``, ``torch-segment``, ``torch-static``). Here: what those random mixes rarely make —
batches of sequences (consecutive tokens of one adapter, which the segment form writes as slices), both forms in
one call, chunked gathers — and the properties the forms are for: the static form reads nothing back, and the
gather form's op count does not grow with the number of adapters."""

import pytest
import torch
from conftest import (DEVICE, DTYPES, check_accumulated, check_shrink, make_case, oracle_add, oracle_shrink,
                      random_out)
from torch.utils._python_dispatch import TorchDispatchMode

import lorakern
from lorakern import torch_backend as TB

PATHS = ["", "gather", "segment", "static"]


def _sequences(lengths, adapters, T_pad=0):
    """int32 slots of a batch of sequences: ``lengths[i]`` consecutive tokens of ``adapters[i]`` (-1 = none)."""
    s = torch.cat([torch.full((n,), a, dtype=torch.int32) for n, a in zip(lengths, adapters)])
    if T_pad:
        s = torch.cat([s, torch.full((T_pad,), -1, dtype=torch.int32)])
    return s


def _run_all(case, generator, what=""):
    """add_lora, lora_shrink, lora_expand and shrink→expand on ``case`` with the torch backend, each against the
    float64 oracle (poisoned y, random out)."""
    L = case.lora
    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                          backend="torch")
    check_accumulated(case, out, out0, *oracle_add(case, out0), f"add_lora {what}")
    y = torch.full((case.S, case.T, L.max_rank), float("nan"), device=DEVICE)
    lorakern.ops.lora_shrink(case.x, L.lora_a, L.page_table, L.ranks, case.slots_arg, out=y, backend="torch")
    check_shrink(case, y, *oracle_shrink(case))
    y_in = torch.randn(case.S, case.T, L.max_rank, generator=generator)
    y_in = torch.where(torch.rand(y_in.shape, generator=generator) < 0.5, y_in, float("nan")).to(DEVICE)
    # NaN past every rank only: the expand must not read there
    live = torch.arange(L.max_rank)[None, :] < L.ranks.cpu().long()[case.slots.cpu().long().clamp(min=0)][:, None]
    y_in = torch.where(live[None].to(DEVICE), torch.nan_to_num(y_in, nan=0.25), y_in)
    out = out0.clone()
    lorakern.ops.lora_expand(out, y_in, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                             backend="torch")
    check_accumulated(case, out, out0, *oracle_add(case, out0, y_in), f"lora_expand {what}")


def _no_flat(monkeypatch, flat: bool) -> None:
    """``flat=False``: the padded gathered form (index_select + bmm) wherever the unpadded one would run."""
    if not flat:
        monkeypatch.setattr(TB, "FLAT_GATHER", set())


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded"])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p or "auto")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_batches_of_sequences(path, dtype, flat, generator, monkeypatch):
    """Prefill of sequences: each adapter's tokens consecutive (written as slices by the segment form), an adapter
    whose two sequences are apart (not a slice), sequences without LoRA, a rank-0 adapter, padding at the end."""
    monkeypatch.setenv("LORAKERN_TORCH_PATH", path)
    _no_flat(monkeypatch, flat)
    slots = _sequences([9, 1, 7, 5, 12, 3, 6], [2, 0, -1, 5, 2, 4, 1], T_pad=4)
    case = make_case(generator, T=slots.numel(), K=40, n_sizes=[24, 16, 8], ranks=[16, 0, 5, 1, 9, 13],
                     num_adapters=6, dtype=dtype, slots=slots)
    _run_all(case, generator, f"({path or 'auto'})")


@pytest.mark.parametrize("slots_form", ["int32", "plan", "static"])
def test_both_forms_in_one_call(slots_form, generator, monkeypatch):
    """One adapter with many tokens (a segment) among one-token adapters (gathered): the auto split makes both in
    one call (checked on the split itself), and the result is the oracle's."""
    monkeypatch.delenv("LORAKERN_TORCH_PATH", raising=False)
    for table in (TB.SEGMENT_OVERHEAD, TB.SEGMENT_OVERHEAD_FLAT):
        monkeypatch.setitem(table, "cpu", 1 << 12)
        monkeypatch.setitem(table, DEVICE.type, 1 << 12)
    many = torch.full((40,), 3, dtype=torch.int32)
    few = torch.tensor([0, 1, 2, 4, 5, -1, 6, 7], dtype=torch.int32)
    slots = torch.cat([few[:4], many[:25], few[4:], many[25:]])
    case = make_case(generator, T=slots.numel(), K=64, n_sizes=[32, 32], ranks=[4, 8, 16, 12, 2, 7, 3, 16],
                     num_adapters=8, slots=slots, slots_form=slots_form)
    L = case.lora
    split = TB._split(L.page_table, L.ranks, L.scales, case.slots.to(DEVICE), 2 * 64 + 64, 2)
    assert split.g_tok is not None and len(split.segs) == 1 and split.segs[0][1] == 3
    assert split.segs[0][5] == [(4, 29), (33, 48)]  # its tokens in two runs of 25 and 15: written run by run
    assert sorted(split.g_tok.tolist()) == [i for i, s in enumerate(slots.tolist()) if s not in (-1, 3)]
    _run_all(case, generator)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded"])
def test_gather_in_chunks(flat, generator, monkeypatch):
    """A gather budget of a few tokens' rows: many chunks, the same result."""
    monkeypatch.setenv("LORAKERN_TORCH_PATH", "gather")
    _no_flat(monkeypatch, flat)
    monkeypatch.setitem(TB.GATHER_BUDGET, DEVICE.type, 3 * (1 if flat else 16) * 48)  # ~3 tokens per chunk
    case = make_case(generator, T=37, K=48, n_sizes=[40, 8], ranks="1-16", num_adapters=9, mix="uniform",
                     none_frac=0.2)
    split = TB._split(case.lora.page_table, case.lora.ranks, None, case.slots, 48, 1)
    assert len(TB._chunks(split, 48, flat)) >= 8
    _run_all(case, generator)


@pytest.mark.parametrize("gap", [0, 7], ids=["row-stride-multiple", "row-stride-other"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_flat_gather_on_pool_views(gap, dtype, generator, monkeypatch):
    """An adapter pool's weights are column views of one wide row buffer. With a row stride that is a multiple of
    each width the unpadded form addresses them through a table over the buffer (:func:`_table`); the buffer's
    other columns hold NaN, so a read of any row between the views' rows would show. With another stride it
    falls back to the padded form. Either way: the oracle's result."""
    monkeypatch.setenv("LORAKERN_TORCH_PATH", "gather")
    K, widths = 32, [32, 16]
    case = make_case(generator, T=29, K=K, n_sizes=widths, ranks="1-12", num_adapters=11, mix="uniform",
                     none_frac=0.2, dtype=dtype)
    L = case.lora
    parts = [*L.lora_a, *L.lora_b]
    width = 4 * 32 + gap  # a multiple of 32 and 16, or not
    buf = torch.full((L.lora_a[0].shape[0], width), float("nan"), dtype=dtype, device=DEVICE)
    views, col = [], 0 if gap == 0 else 5
    for t in parts:
        views.append(buf[:, col:col + t.shape[1]])
        views[-1].copy_(t)
        col += t.shape[1]
    a, b = views[:2], views[2:]
    tabs = TB._flat_tables(case.x, dtype, views)
    assert (tabs is not None) == (gap == 0)
    if tabs is not None:
        assert all(t.is_contiguous() and mult == width // t.shape[1] for t, mult in tabs)
    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    lorakern.ops.add_lora(out, case.x, a, b, L.page_table, L.ranks, case.scales, case.slots_arg, backend="torch")
    check_accumulated(case, out, out0, *oracle_add(case, out0), "add_lora on pool views")
    y = torch.full((case.S, case.T, L.max_rank), float("nan"), device=DEVICE, dtype=torch.float32)
    if dtype == torch.float32:  # (lora_shrink's y is float32: the fp64 case runs its shrink in the padded form)
        lorakern.ops.lora_shrink(case.x, a, L.page_table, L.ranks, case.slots_arg, out=y, backend="torch")
        check_shrink(case, y, *oracle_shrink(case))


def test_table_of_views():
    """:func:`_table` on the layouts it must recognise and the ones it must refuse."""
    buf = torch.arange(6 * 24, dtype=torch.float32).view(6, 24)
    for t in (buf[:, 8:16], buf[:, 16:24], buf[1:, 0:8]):
        tab, mult = TB._table(t)
        assert tab.is_contiguous() and mult == 3
        assert torch.equal(tab[torch.arange(t.shape[0]) * mult], t)
    c = buf.clone()
    assert TB._table(c)[0] is c and TB._table(c)[1] == 1
    assert TB._table(buf[:, 0:7]) is None  # row stride 24, width 7
    assert TB._table(buf[:, ::2]) is None  # column stride 2
    assert TB._table(buf.t()) is None


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _add(case):
    L = case.lora
    out = torch.zeros(case.T, case.out_cols, dtype=case.dtype, device=DEVICE)
    TB.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots, case.offsets)
    return out


def test_static_form_reads_nothing_back(generator, monkeypatch):
    """The static form (what runs during a CUDA-graph capture) makes no host read: no nonzero, no item, no tolist
    (any of them would fail a capture), whatever the mix."""
    monkeypatch.setenv("LORAKERN_TORCH_PATH", "static")
    case = make_case(generator, T=30, K=32, n_sizes=[16, 8], ranks="1-8", num_adapters=7, mix="zipf:1.5",
                     none_frac=0.3)

    def no_tolist(*a, **k):
        raise AssertionError("tolist() in the static form")

    monkeypatch.setattr(torch.Tensor, "tolist", no_tolist)
    with _Ops() as mode:
        _add(case)
    names = {str(f) for f in mode.ops}
    assert not names & {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.unique_consecutive.default",
                        "aten.item.default"}, names


@pytest.mark.parametrize("path", ["gather", "static"])
def test_op_count_does_not_grow_with_the_adapters(path, generator, monkeypatch):
    """The gather and static forms take as many torch ops for 4 distinct adapters as for 48 (the reference takes
    ~30 per adapter)."""
    monkeypatch.setenv("LORAKERN_TORCH_PATH", path)
    counts = []
    for n in (4, 48):
        case = make_case(generator, T=48, K=32, n_sizes=[16, 8, 8], ranks="1-8", num_adapters=n, mix="distinct")
        with _Ops() as mode:
            _add(case)
        counts.append(len(mode.ops))
    assert counts[0] == counts[1], counts


def test_wrong_path_setting_is_refused(generator, monkeypatch):
    monkeypatch.setenv("LORAKERN_TORCH_PATH", "fast")
    case = make_case(generator, T=4, K=8, n_sizes=[8], ranks=[2], num_adapters=1)
    L = case.lora
    out = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="LORAKERN_TORCH_PATH"):
        lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, None, case.slots,
                              backend="torch")


def test_segment_choice_follows_the_cost_model():
    """A segment pays when gathering its tokens' rows would move more than its ops cost plus its rows once."""
    assert not TB._segment_pays(1, 16, 16, 1000, 3, 1 << 17)  # one token: gather
    assert TB._segment_pays(512, 64, 64, 16384, 1, 1 << 17)  # a long prefill segment
    # the crossing point moves with the overhead: at 0, any adapter with more tokens than rank/bound pays
    assert TB._segment_pays(2, 16, 16, 100, 3, 0) and not TB._segment_pays(1, 16, 16, 100, 3, 0)


# ------------------------------------------------------------------------------------------------ MoE
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p or "auto")
@pytest.mark.parametrize("form", ["shared", "per_expert"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_moe_forms(path, form, dtype, generator, monkeypatch):
    """add_lora_moe on the torch backend in each form, against test_moe's independent float64 oracle: mixed ranks
    (0, 1, 3, 20, 16), -1 tokens, routed weights, gate|up slices of unequal width."""
    from test_moe import _x, make_moe_lora, make_routing, run

    monkeypatch.setenv("LORAKERN_TORCH_PATH", path)
    g = generator
    E, K, topk, T = 6, 40, 3, 24
    L = make_moe_lora(g, E=E, K=K, n_sizes=[24, 16], ranks=[3, 20, 0, 1, 16], dtype=dtype)
    ids, w = make_routing(g, T, topk, E)
    slots = torch.randint(-1, L.num_slots, (T,), generator=g, dtype=torch.int32)
    run(L, _x(g, T, topk, K, form, dtype), ids, slots, backend="torch", dtype=dtype, weights=w.to(DEVICE), g=g)


@pytest.mark.parametrize("form", ["shared", "per_expert"])
@pytest.mark.parametrize("weights", [True, False])
def test_moe_segments_as_slices(form, weights, generator, monkeypatch):
    """Top-1 routing of sequences that stay on one expert: a (slot, expert) group's pairs are consecutive, so
    the segment form writes them as a slice (with a shared x, through the pairs' token index); checked on the
    split and against the oracle."""
    from test_moe import _x, make_moe_lora, run

    monkeypatch.setenv("LORAKERN_TORCH_PATH", "segment")
    g = generator
    E, K = 4, 32
    L = make_moe_lora(g, E=E, K=K, n_sizes=[16, 8], ranks=[5, 8, 2], dtype=torch.float32)
    slots = _sequences([6, 5, 4, 7], [0, 2, -1, 1])
    ids = torch.cat([torch.full((n,), e) for n, e in zip([6, 5, 4, 7], [3, 1, 0, 3])]).view(-1, 1)
    T = slots.numel()
    split = TB._split(L.page_table, L.ranks, None, slots.long(), 1, 1, experts=ids.view(-1), E=E)
    assert [seg[5] for seg in split.segs] == [[(0, 6)], [(15, 22)], [(6, 11)]]  # by (slot, expert): 3, 7, 9
    w = torch.rand(T, 1, generator=g) + 0.5 if weights else None
    run(L, _x(g, T, 1, K, form, torch.float32), ids, slots, backend="torch", dtype=torch.float32,
        weights=None if w is None else w.to(DEVICE), g=g)


# ------------------------------------------------------------------------------------------------ MLA
def _mla_params():
    from test_mla import CASES

    out = []
    for name in CASES:
        for op in ("q", "o"):
            for path in PATHS:
                for dt in ((torch.float32, torch.bfloat16) if name in ("mixed_ranks_0_64", "strided_views")
                           else (torch.float32,)):
                    out.append(pytest.param(name, op, path, dt, id=f"{path or 'auto'}-{op}-{name}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("name,op,path,dtype", _mla_params())
def test_mla_forms(name, op, path, dtype, generator, monkeypatch):
    """The absorbed MLA ops on the torch backend in each form, on every case of test_mla (mixed ranks with rank 0
    and -1 tokens, odd sizes, one head and twelve, ranks to 512, a page table wider than any rank, strided engine
    views, every slots form), against the float64 reference."""
    from test_mla import CASES, make_mla_case, run

    monkeypatch.setenv("LORAKERN_TORCH_PATH", path)
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    run(make_mla_case(generator, dtype=dtype, **CASES[name]), op, "torch", generator)


@pytest.mark.parametrize("op", ["q", "o"])
def test_mla_sequences_as_slices(op, generator, monkeypatch):
    """Sequences of consecutive tokens per adapter (one adapter's two sequences apart): the segment form adds
    runs of consecutive tokens to their slices of the output in place; the result is the reference's."""
    from test_mla import make_mla_case, run

    monkeypatch.setenv("LORAKERN_TORCH_PATH", "segment")
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    for lengths, want in (([7, 5, 6, 8, 5, 3], [[(7, 12)], None, [(18, 26)]]),
                          ([9, 5, 6, 8, 9, 3], [[(9, 14)], [(0, 9), (28, 37)], [(20, 28)]])):
        # slot 0 one run; slot 2 two runs: short (7 + 5: gathered, written by index) or long enough (9 + 9:
        # run by run); slot 3 one; slot 1 has rank 0 (nothing to do)
        slots = _sequences(lengths, [2, 0, -1, 3, 2, 1]).to(DEVICE)
        case = make_mla_case(generator, T=slots.numel(), H=3, C=40, Dn=12, Dv=20, ranks=[6, 0, 11, 3],
                             num_adapters=4)
        case.slots = slots
        case.slots_arg = slots
        split = TB._split(case.lora.page_table, case.lora.ranks, None, slots, 1, 1)
        assert [seg[5] for seg in split.segs] == want
        run(case, op, "torch", generator)


# ------------------------------------------------------------------------------------------------ the split cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_a_batch_groups_its_tokens_once(dtype, generator, monkeypatch):
    """A batch's layers call with the same slots, ranks, scales and page table: the second call reuses the split
    (no grouping, so no host read), and every in-place change of one of those tensors makes a new one; each
    result is the oracle's."""
    monkeypatch.delenv("LORAKERN_TORCH_PATH", raising=False)
    monkeypatch.setattr(TB, "_SPLIT_CACHE", type(TB._SPLIT_CACHE)())
    made = []
    split = TB._split
    monkeypatch.setattr(TB, "_split", lambda *a, **k: made.append(1) or split(*a, **k))
    case = make_case(generator, T=40, K=32, n_sizes=[16, 8], ranks="3-12", num_adapters=9, mix="zipf:1.5",
                     none_frac=0.2, dtype=dtype, slots_form="plan")
    L = case.lora

    def call_and_check(what):
        out, _, _ = random_out(case, generator)
        out0 = out.clone()
        made.clear()
        lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                              backend="torch")
        check_accumulated(case, out, out0, *oracle_add(case, out0), what)
        return len(made)

    assert call_and_check("first call") > 0
    assert call_and_check("second call (cached split)") == 0
    # each change in place: slots (through the plan's own buffer), a slot's rank, its scale, its page-table row
    plan = case.slots_arg
    new_slots = case.slots.flip(0).contiguous()
    plan.slots.copy_(new_slots)
    case.slots.copy_(new_slots)
    used = set(new_slots[new_slots >= 0].tolist())
    s0 = next(s for s in sorted(used) if int(L.ranks[s]) >= 3)
    L.ranks[s0] -= 1
    case.scales[s0] *= 3.0
    L.page_table[s0, :2] = L.page_table[s0, :2].flip(0)
    assert call_and_check("after in-place changes") > 0
    for change in (lambda: L.ranks.add_(0), lambda: case.scales.mul_(1.5), lambda: L.page_table.add_(0)):
        change()  # (a version bump alone: a new split, the same result)
        assert call_and_check("after a version bump") > 0
