"""LoRAPlan (contract, DESIGN.md §3): the per-batch grouping of tokens by slot, dynamic and static forms.

Every buffer is checked against an independent computation in plain Python on the slot list.
"""

import pytest
import torch

from conftest import DEVICE
from lorakern import LoRAPlan
from lorakern.plan import GATHER_BLOCK_M, SEGMENT_BLOCK_M
from lorakern.workloads import MIXES, make_slots

BLOCKS = (GATHER_BLOCK_M, SEGMENT_BLOCK_M)


def expected(slots, ranks=None):
    """The plan's buffers computed the slow, obvious way from a list of slots (and, given, the slots' ranks: tiles
    by descending rank, stable; a slot past the end of ``ranks`` counts as the last slot)."""
    s = [int(v) for v in slots]
    T = len(s)
    order = sorted(range(T), key=lambda t: (s[t] < 0, s[t], t))  # by slot, -1 last, stable
    segs = []  # (start, slot, count) in sorted order
    for pos, t in enumerate(order):
        if not segs or segs[-1][1] != s[t]:
            segs.append([pos, s[t], 0])
        segs[-1][2] += 1
    tiles = {}
    for bm in BLOCKS:
        rows = []
        for start, slot, count in segs:
            if slot < 0:
                continue
            for i in range(0, count, bm):
                rows.append((start + i, min(bm, count - i), slot))
        if ranks is not None:
            rank = lambda slot: max(ranks[min(slot, len(ranks) - 1)], 0) if ranks else 0  # noqa: E731
            rows = sorted(rows, key=lambda r: -rank(r[2]))  # (sorted is stable)
        tiles[bm] = rows
    return order, segs, tiles


def check_plan(plan, slots, ranks=None):
    """Every buffer of ``plan`` against :func:`expected` for ``slots`` (a list, length ``plan.num_tokens``)."""
    T = plan.num_tokens
    assert len(slots) == T
    order, segs, tiles = expected(slots, ranks)
    assert plan.slots.tolist() == list(slots)
    assert plan.token_ids.tolist() == order
    nseg = len(segs)
    assert int(plan.num_segments[0]) == nseg
    assert plan.seg_starts.tolist() == [g[0] for g in segs] + [T] * (T + 1 - nseg)
    assert plan.seg_slots.tolist() == [g[1] for g in segs] + [-1] * (T - nseg)
    assert plan.counts.tolist() == [g[2] for g in segs] + [0] * (T - nseg)
    for bm in BLOCKS:
        t = plan.tiles(bm)
        assert t.dtype == torch.int32 and tuple(t.shape) == (T, 3)
        rows = [tuple(r) for r in t.tolist()]
        n = len(tiles[bm])
        assert rows[:n] == tiles[bm], f"tiles({bm})"
        assert all(r[1] == 0 for r in rows[n:]), f"tiles({bm}): unused rows must have length 0"
        # the properties kernels rely on, stated directly: every LoRA token covered exactly once, each tile inside
        # one segment (one slot), no tile longer than the block
        seen = torch.zeros(T, dtype=torch.int64)
        tok = plan.token_ids.tolist()
        for start, length, slot in rows:
            assert 0 <= length <= bm
            for p in range(start, start + length):
                seen[tok[p]] += 1
                assert slots[tok[p]] == slot
        lora = torch.tensor([v >= 0 for v in slots], dtype=torch.bool)
        assert bool((seen[lora] == 1).all()) and bool((seen[~lora] == 0).all())
    for b in (plan.slots, plan.token_ids, plan.seg_starts, plan.seg_slots, plan.counts, plan.num_segments):
        assert b.dtype == torch.int32 and b.device == plan.device
    return order, segs, tiles


CASES = [(m, T, n, nf) for m in MIXES for (T, n, nf) in ((1, 3, 0.0), (37, 5, 0.3), (200, 40, 0.1), (64, 64, 0.0))]
CASES += [("uniform", 50, 7, 1.0), ("identical", 16, 1, 0.0), ("distinct", 129, 1000, 0.0)]


@pytest.mark.parametrize("mix,T,n,none_frac", CASES, ids=[f"{m}-T{T}-n{n}-none{nf}" for m, T, n, nf in CASES])
def test_from_slots(mix, T, n, none_frac, generator):
    slots = make_slots(mix, T, n, none_frac=none_frac, generator=generator, device=DEVICE)
    plan = LoRAPlan.from_slots(slots)
    assert not plan.is_static and plan.num_tokens == T == len(plan)
    _, segs, tiles = check_plan(plan, slots.tolist())
    lora_segs = [g for g in segs if g[1] >= 0]
    st = plan.stats
    assert st.num_segments == len(lora_segs)
    assert st.lora_tokens == sum(g[2] for g in lora_segs)
    assert st.max_count == max((g[2] for g in lora_segs), default=0)
    assert st.max_slot == max((g[1] for g in lora_segs), default=-1)
    assert st.tiles == {bm: len(tiles[bm]) for bm in BLOCKS}
    assert st.mean_count == (st.lora_tokens / st.num_segments if st.num_segments else 0.0)
    for bm in BLOCKS:
        assert plan.grid_tiles(bm, n) == len(tiles[bm])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_from_slots_integer_dtypes(dtype, generator):
    slots = make_slots("zipf:1.5", 40, 9, none_frac=0.2, generator=generator).to(dtype).to(DEVICE)
    check_plan(LoRAPlan.from_slots(slots), slots.tolist())


def test_from_slots_does_not_modify_or_alias_its_input(generator):
    slots = make_slots("uniform", 30, 4, none_frac=0.2, generator=generator, device=DEVICE)
    snap = slots.clone()
    plan = LoRAPlan.from_slots(slots)
    assert torch.equal(slots, snap)
    slots.fill_(0)  # later changes to the caller's tensor do not leak into the plan
    assert plan.slots.tolist() == snap.tolist()


def test_from_slots_non_contiguous(generator):
    base = make_slots("uniform", 80, 6, none_frac=0.2, generator=generator, device=DEVICE)
    slots = base[::2]
    check_plan(LoRAPlan.from_slots(slots), slots.tolist())


def test_empty_batch():
    plan = LoRAPlan.from_slots(torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert plan.num_tokens == 0 and int(plan.num_segments[0]) == 0
    assert plan.seg_starts.tolist() == [0]
    for bm in BLOCKS:
        assert tuple(plan.tiles(bm).shape) == (0, 3) and plan.grid_tiles(bm, 5) == 0
    st = plan.stats
    assert (st.num_segments, st.lora_tokens, st.max_count, st.max_slot) == (0, 0, 0, -1)
    assert st.mean_count == 0.0
    static = LoRAPlan.static(0, DEVICE).update(torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert static.num_tokens == 0 and int(static.num_segments[0]) == 0
    for bm in BLOCKS:
        assert static.grid_tiles(bm, 5) == 0


def test_all_tokens_without_lora():
    plan = LoRAPlan.from_slots(torch.full((20,), -1, dtype=torch.int32, device=DEVICE))
    check_plan(plan, [-1] * 20)
    assert int(plan.num_segments[0]) == 1  # the no-LoRA segment
    assert plan.stats.num_segments == 0 and plan.stats.max_slot == -1
    for bm in BLOCKS:
        assert plan.grid_tiles(bm, 3) == 0


# ------------------------------------------------------------------------------------------------ static form
@pytest.mark.parametrize("mix,T,n,none_frac", CASES, ids=[f"{m}-T{T}-n{n}-none{nf}" for m, T, n, nf in CASES])
def test_from_slots_orders_tiles_by_descending_rank(mix, T, n, none_frac, generator):
    slots = make_slots(mix, T, n, none_frac=none_frac, generator=generator, device=DEVICE)
    # few distinct ranks (ties keep an adapter's tiles together, in token order), zeros and a short ranks tensor:
    # a slot past its end is ordered as the last slot (the ops reject it later)
    ranks = torch.tensor([8, 128, 16, 0, 64, 16, 128, 1], dtype=torch.int32)[torch.randint(0, 8, (max(n - 1, 0),),
                                                                                          generator=generator)]
    plan = LoRAPlan.from_slots(slots, ranks.to(DEVICE))
    _, _, tiles = check_plan(plan, slots.tolist(), ranks.tolist())
    plain = LoRAPlan.from_slots(slots)
    assert plan.stats == plain.stats
    for k, b in _buffers(plain).items():  # only the tile order differs
        if not k.startswith("tiles"):
            assert torch.equal(b, _buffers(plan)[k]), k
    for bm in BLOCKS:
        used = plan.tiles(bm)[: len(tiles[bm])]
        rl = ranks.tolist()
        keys = [-max(rl[min(s, len(rl) - 1)], 0) if rl else 0 for s in used[:, 2].tolist()]
        assert keys == sorted(keys)
        if len({r for r in ranks.tolist()}) > 1 and len(tiles[bm]) > 1 and mix == "distinct":
            assert not torch.equal(plan.tiles(bm), plain.tiles(bm))  # (the case reorders something)


def test_static_update_with_ranks_follows_the_ranks_of_each_update(generator):
    max_tokens = 80
    plan = LoRAPlan.static(max_tokens, DEVICE)
    ptrs = {k: b.data_ptr() for k, b in _buffers(plan).items()}
    ranks = torch.randint(1, 129, (40,), generator=generator, dtype=torch.int32).to(DEVICE)
    for mix, T, n in [("distinct", 70, 40), ("uniform", 80, 12), ("zipf:1.5", 33, 40)]:
        slots = make_slots(mix, T, n, generator=generator, device=DEVICE)
        ranks.copy_(torch.randint(1, 129, (40,), generator=generator, dtype=torch.int32))  # other ranks each time
        plan.update(slots, ranks)
        padded = torch.cat([slots, torch.full((max_tokens - T,), -1, dtype=torch.int32, device=DEVICE)])
        check_plan(plan, padded.tolist(), ranks.tolist())
        fresh = LoRAPlan.from_slots(padded, ranks)
        for k, b in _buffers(plan).items():
            assert torch.equal(b, _buffers(fresh)[k]), k
        assert {k: b.data_ptr() for k, b in _buffers(plan).items()} == ptrs, "update reallocated a buffer"


@pytest.mark.parametrize("bad,err", [(torch.ones(4), TypeError), (torch.ones(4, dtype=torch.bool), TypeError),
                                     ([1, 2], TypeError), (torch.ones(2, 2, dtype=torch.int32), ValueError)],
                         ids=["float", "bool", "list", "2d"])
def test_bad_ranks_for_a_plan_are_typed_errors(bad, err):
    slots = torch.tensor([0, 1, -1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(err, match="ranks"):
        LoRAPlan.from_slots(slots, bad if not isinstance(bad, torch.Tensor) else bad.to(DEVICE))
    plan = LoRAPlan.static(4, DEVICE)
    before = {k: b.clone() for k, b in _buffers(plan).items()}
    with pytest.raises(err, match="ranks"):
        plan.update(slots, bad if not isinstance(bad, torch.Tensor) else bad.to(DEVICE))
    for k, b in _buffers(plan).items():  # refused before anything was written
        assert torch.equal(b, before[k]), k


def test_ranks_on_is_none_where_ranks_cannot_order_the_plan():
    from lorakern.plan import ranks_on
    slots = torch.zeros(3, dtype=torch.int32)
    r = torch.ones(2, dtype=torch.int32)
    assert ranks_on(r, slots) is r
    assert ranks_on(None, slots) is None
    assert ranks_on(r.float(), slots) is None
    assert ranks_on(r.view(1, 2), slots) is None
    assert ranks_on(torch.ones(2, dtype=torch.int32, device="meta"), slots) is None


def _buffers(plan):
    return {"slots": plan.slots, "token_ids": plan.token_ids, "seg_starts": plan.seg_starts,
            "seg_slots": plan.seg_slots, "counts": plan.counts, "num_segments": plan.num_segments,
            **{f"tiles({bm})": plan.tiles(bm) for bm in BLOCKS}}


def test_static_update_matches_a_dynamic_plan_of_the_padded_slots(generator):
    max_tokens = 96
    plan = LoRAPlan.static(max_tokens, DEVICE)
    assert plan.is_static and plan.num_tokens == max_tokens and plan.stats is None
    ptrs = {k: b.data_ptr() for k, b in _buffers(plan).items()}
    mixes = [("identical", 90, 1, 0.0), ("distinct", 70, 70, 0.1), ("zipf:1.5", 96, 30, 0.2),
             ("skewed", 1, 4, 0.0), ("uniform", 0, 3, 0.0), ("uniform", 95, 12, 0.5)]
    for mix, T, n, nf in mixes:  # fewer tokens than max_tokens, and more or fewer adapters each time
        slots = make_slots(mix, T, n, none_frac=nf, generator=generator, device=DEVICE)
        assert plan.update(slots) is plan
        padded = torch.cat([slots, torch.full((max_tokens - T,), -1, dtype=torch.int32, device=DEVICE)])
        check_plan(plan, padded.tolist())
        fresh = LoRAPlan.from_slots(padded)
        for k, b in _buffers(plan).items():
            assert torch.equal(b, _buffers(fresh)[k]), k
        assert {k: b.data_ptr() for k, b in _buffers(plan).items()} == ptrs, "update reallocated a buffer"
        assert plan.stats is None
        for bm in BLOCKS:  # a fixed grid for any mix over n slots covers the real work
            assert plan.grid_tiles(bm, n) >= fresh.stats.tiles[bm]
            assert plan.grid_tiles(bm, n) <= max_tokens


@pytest.mark.parametrize("max_tokens", [1, 15, 16, 17, 63, 64, 65, 200])
def test_static_grid_bound_holds_for_worst_mixes(max_tokens, generator):
    """grid_tiles(bm, num_slots) >= tiles of any mix of at most num_slots slots, tried on the worst shapes."""
    plan = LoRAPlan.static(max_tokens, DEVICE)
    for n in (1, 2, 3, 7, max_tokens):
        candidates = [
            make_slots("distinct", max_tokens, n, device=DEVICE),
            make_slots("uniform", max_tokens, n, generator=generator, device=DEVICE),
            make_slots("skewed", max_tokens, n, generator=generator, device=DEVICE),
            # each slot one token more than a block multiple: the most partial tiles
            torch.tensor(sorted((t % n) for t in range(max_tokens)), dtype=torch.int32, device=DEVICE),
        ]
        for s in candidates:
            plan.update(s)
            for bm in BLOCKS:
                actual = int((plan.tiles(bm)[:, 1] > 0).sum())
                assert plan.grid_tiles(bm, n) >= actual, (n, bm)


def test_update_with_int64_and_a_view(generator):
    plan = LoRAPlan.static(32, DEVICE)
    base = make_slots("uniform", 60, 5, none_frac=0.2, generator=generator, device=DEVICE).long()
    plan.update(base[::2])
    check_plan(plan, base[::2].tolist() + [-1] * 2)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.bool)],
                         ids=["float32", "float16", "bool"])
def test_non_integer_slots_are_type_errors(bad):
    with pytest.raises(TypeError, match="slots"):
        LoRAPlan.from_slots(bad.to(DEVICE))
    with pytest.raises(TypeError, match="slots"):
        LoRAPlan.static(8, DEVICE).update(bad.to(DEVICE))


def test_non_tensor_slots_are_type_errors():
    with pytest.raises(TypeError, match="slots"):
        LoRAPlan.from_slots([0, 1, -1])


@pytest.mark.parametrize("shape", [(2, 3), (), (1, 4)])
def test_non_1d_slots_are_value_errors(shape):
    s = torch.zeros(shape, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="slots"):
        LoRAPlan.from_slots(s)
    with pytest.raises(ValueError, match="slots"):
        LoRAPlan.static(8, DEVICE).update(s)


def test_slot_below_minus_one_is_value_error():
    with pytest.raises(ValueError, match="slots"):
        LoRAPlan.from_slots(torch.tensor([0, -2, 1], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("value", [2**31, 2**32 + 1, -(2**32) - 1], ids=["2^31", "2^32+1", "-2^32-1"])
def test_int64_slot_outside_int32_is_value_error(value):
    """The plan stores slots as int32: a slot it cannot hold must be refused, not wrapped into another slot."""
    s = torch.tensor([0, value, 1], dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="slots"):
        LoRAPlan.from_slots(s)


def test_static_plan_too_many_tokens_is_value_error():
    plan = LoRAPlan.static(8, DEVICE)
    before = {k: b.clone() for k, b in _buffers(plan.update(torch.arange(8, dtype=torch.int32, device=DEVICE))).items()}
    with pytest.raises(ValueError, match="slots"):
        plan.update(torch.zeros(9, dtype=torch.int32, device=DEVICE))
    for k, b in _buffers(plan).items():  # a refused update leaves the plan as it was
        assert torch.equal(b, before[k]), k


def test_static_negative_max_tokens_is_value_error():
    with pytest.raises(ValueError, match="max_tokens"):
        LoRAPlan.static(-1, DEVICE)


def test_update_on_dynamic_plan_is_runtime_error():
    plan = LoRAPlan.from_slots(torch.zeros(4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(RuntimeError, match="static"):
        plan.update(torch.zeros(4, dtype=torch.int32, device=DEVICE))


def test_repr_names_the_form():
    assert "static" in repr(LoRAPlan.static(4, DEVICE))
    assert "dynamic" in repr(LoRAPlan.from_slots(torch.zeros(4, dtype=torch.int32, device=DEVICE)))
