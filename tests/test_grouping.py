"""The grouping kernel (csrc/include/lorakern/grouping.cuh, ``group`` of the CUDA extension; lorakern/grouping.py):
the same outputs as the torch code bit for bit — for the MoE op's pair grouping (lorakern.moe_grouping._group_torch:
pair ids, every tile row, the tile count) and for a LoRAPlan's fill (every buffer of the plan), with and without
the rank ordering — on random and adversarial inputs; its limits and refusals; the switch that turns it off; and
the ops going through it. Without a GPU the kernel runs on the CPU emulator; with one, on the GPU (the ``gpu``
tests)."""

import pytest
import torch
from conftest import CUDA_RUNS, HAS_CUDA

from lorakern import cuda_backend, grouping
from lorakern import moe_grouping as mg
from lorakern.plan import LoRAPlan

pytestmark = pytest.mark.skipif(not CUDA_RUNS, reason="needs the cuda backend (a GPU or the CPU emulator)")

DEV = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
MAX_ITEMS = 4096


def _kernel():
    return cuda_backend._ext(DEV), cuda_backend._stream(DEV)


def _both(slots, ids, E, S, bm, ranks):
    """(torch grouping, kernel grouping) of one call, both on DEV."""
    slots, ids = slots.to(DEV), ids.to(DEV)
    ranks = ranks.to(DEV) if ranks is not None else None
    T, topk = ids.shape
    n_max = mg.max_tiles(T * topk, S * E, bm)
    return (mg._group_torch(slots, ids, E, S, bm, ranks, n_max),
            mg._group_kernel(_kernel(), slots, ids, E, S, bm, ranks, n_max))


def _assert_same(a, b):
    for name, x, y in zip(("pair_ids", "tiles", "count"), a[:3], b[:3]):
        assert x.dtype == y.dtype == torch.int32 and x.shape == y.shape, name
        assert torch.equal(x.cpu(), y.cpu()), (name, x.cpu().tolist()[:40], y.cpu().tolist()[:40])
    assert a[3] == b[3]


def _random_case(seed):
    g = torch.Generator().manual_seed(seed)
    topk = int(torch.randint(1, 9, (1,), generator=g))
    T = min(int(torch.randint(1, 400, (1,), generator=g)), MAX_ITEMS // topk)
    E = int(torch.randint(1, 80, (1,), generator=g))
    S = int(torch.randint(1, 50, (1,), generator=g))
    bm = (1, 3, 16)[seed % 3]
    slots = torch.randint(-2, S + 2, (T,), generator=g).to((torch.int32, torch.int64)[seed % 2])
    ids = torch.randint(-1, E + 1, (T, topk), generator=g).to((torch.int64, torch.int32)[seed % 2])
    ranks = None if seed % 4 == 0 else torch.randint(0, 130, (S,), generator=g).to(torch.int32)
    return slots, ids, E, S, bm, ranks


@pytest.mark.parametrize("seed", range(12))
def test_cuda_moe_grouping_matches_the_torch_grouping(seed):
    """Random routings (some slots -1 or past the pool, some experts out of range: the sentinel group), int32 and
    int64 ids, tiles of 1, 3 and 16 pairs, with and without ranks."""
    _assert_same(*_both(*_random_case(seed)))


def _adversarial():
    g = torch.Generator().manual_seed(7)
    big = torch.randint(0, 4, (512,), generator=g)
    return [
        # (name, slots, ids, E, S, block_m, ranks)
        ("one pair", torch.tensor([0]), torch.tensor([[2]]), 4, 1, 16, torch.tensor([5], dtype=torch.int32)),
        ("every slot -1: no tile", torch.full((9,), -1), torch.zeros(9, 2, dtype=torch.int64), 3, 2, 16, None),
        ("every expert out of range", torch.zeros(5, dtype=torch.int64), torch.full((5, 3), 7), 7, 1, 4, None),
        ("one group of 4096 pairs: 256 tiles", torch.zeros(512, dtype=torch.int32), torch.zeros(512, 8), 1, 1, 16,
         torch.tensor([3], dtype=torch.int32)),
        ("4096 pairs, 16 groups, one pair per tile", big, torch.zeros(512, 8, dtype=torch.int64), 1, 4, 1,
         torch.tensor([1, 2, 3, 4], dtype=torch.int32)),
        ("4095 pairs (not a power of two)", torch.randint(-1, 9, (819,), generator=g),
         torch.randint(0, 6, (819, 5), generator=g), 6, 9, 16, torch.randint(0, 64, (9,), generator=g).int()),
        ("rank 0, ranks past 2^16 and negative (clamped)", torch.tensor([0, 1, 2, 3, 0, 1]),
         torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1], [1, 0], [0, 1]]), 2, 4, 1,
         torch.tensor([0, 1 << 20, -5, 7], dtype=torch.int32)),
        ("fewer ranks than slots (a replayed graph's: last rank)", torch.tensor([0, 3, 3, 2]),
         torch.tensor([[0], [1], [1], [0]]), 2, 4, 16, torch.tensor([4, 8], dtype=torch.int32)),
        ("ranks as int64", torch.tensor([1, 0, 1]), torch.tensor([[0, 1], [1, 1], [0, 0]]), 2, 2, 16,
         torch.tensor([16, 64])),
        ("empty ranks", torch.tensor([1, 0]), torch.tensor([[0], [1]]), 2, 2, 16, torch.zeros(0, dtype=torch.int32)),
        ("int64 slots past int32 (taken as int32, as the torch grouping does)",
         torch.tensor([(1 << 32) + 1, 1, -1, (1 << 33) - 1]), torch.tensor([[0], [1], [0], [1]]), 2, 3, 16, None),
    ]


@pytest.mark.parametrize("case", _adversarial(), ids=lambda c: c[0])
def test_cuda_moe_grouping_adversarial_routings(case):
    _, slots, ids, E, S, bm, ranks = case
    a, b = _both(slots, ids, E, S, bm, ranks)
    _assert_same(a, b)


def test_cuda_moe_grouping_strided_inputs():
    """Slots and ids as views with strides (a column of a wider routing tensor, transposed ids)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randint(-1, 6, (40, 3), generator=g)
    ids_t = torch.randint(0, 5, (4, 40), generator=g).t()  # [40, 4], strides (1, 40)
    ranks = torch.randint(1, 33, (6,), generator=g).int()
    a, b = _both(wide[:, 1], ids_t, 5, 6, 16, ranks)
    _assert_same(a, b)


def test_cuda_group_limits_and_refusals():
    """takes: 1 to group_max_items items, int32/int64 slots and ids, keys below the sentinel, an extension with the
    kernel; the binding refuses what the launcher cannot take with a RuntimeError naming it, and writes nothing."""
    ext, stream = _kernel()
    assert grouping.max_items(ext) == MAX_ITEMS
    ok_ids = torch.zeros(512, 8, dtype=torch.int64)
    s = torch.zeros(512, dtype=torch.int32)
    assert grouping.takes(ext, s, ok_ids, 4096, 4, 8)
    assert grouping.takes(ext, s, None, 512, grouping.SENTINEL, 1)  # a plan's: no upper bound on slots
    assert not grouping.takes(ext, s, ok_ids, 4097, 4, 8)
    assert not grouping.takes(ext, s, ok_ids.to(torch.int16), 4096, 4, 8)
    assert not grouping.takes(ext, s.to(torch.int16), None, 512, 4, 8)
    assert not grouping.takes(ext, s, ok_ids, 4096, 1 << 16, 1 << 15)  # keys could reach the sentinel
    assert not grouping.takes(ext, s, ok_ids, 0, 4, 8)
    assert not grouping.takes(object(), s, ok_ids, 4096, 4, 8)  # an extension without the kernel

    sl = torch.zeros(4, dtype=torch.int32, device=DEV)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=DEV)
    out = [torch.full((8,), -7, dtype=torch.int32, device=DEV), torch.full((8, 3), -7, dtype=torch.int32, device=DEV),
           torch.full((1,), -7, dtype=torch.int32, device=DEV)]

    def fields(T=4, topk=2, n_rows=1, bm=16, E=2, S=1, nb=1, tiles=None):
        tiles = out[1].data_ptr() if tiles is None else tiles
        return [sl.data_ptr(), 1, 0, ids.data_ptr(), 2, 1, 0, 0, 0, T, topk, E, S, 1, 0, n_rows, nb, bm, 1,
                out[0].data_ptr(), 0, 0, 0, 0, tiles, 0, out[2].data_ptr(), 0, 0]

    assert len(fields()) == len(grouping.GROUP_FIELDS)
    for bad in (dict(n_rows=9), dict(n_rows=0), dict(bm=0), dict(T=4097, topk=1), dict(E=1 << 16, S=1 << 15),
                dict(T=0), dict(nb=0), dict(nb=3), dict(nb=2), dict(tiles=0)):
        with pytest.raises(RuntimeError, match="group"):
            ext.group(fields(**bad), stream)
    with pytest.raises(ValueError, match="29 fields"):
        ext.group(fields()[:-1], stream)
    assert all(bool((t == -7).all()) for t in out)  # nothing written
    ext.group(fields(n_rows=4), stream)  # a good call fills them (rows beyond n_rows untouched)
    assert out[2].item() == 1 and out[0][:8].tolist() == list(range(8))
    assert out[1][0].tolist() == [0, 8, 0] and out[1][1].tolist() == [0, 0, 0] and bool((out[1][4:] == -7).all())


@pytest.mark.cuda_emulate
def test_cuda_add_lora_moe_groups_in_one_launch(monkeypatch):
    """The cuda backend's add_lora_moe makes its grouping with one kernel launch (no torch grouping at all) while
    the pairs fit, with the torch ops under LORAKERN_GROUP_KERNEL=0; results equal the reference either way."""
    from lorakern.ops import add_lora_moe

    g = torch.Generator().manual_seed(11)
    T, E, K, topk, S, R, rows = 20, 6, 40, 2, 4, 8, 40
    dt = torch.float32
    la = [torch.randn(rows, E, K, generator=g).to(DEV) for _ in range(2)]
    lb = [torch.randn(rows, E, n, generator=g).to(DEV) for n in (24, 16)]
    pt = torch.randint(0, rows, (S, R), generator=g, dtype=torch.int32).to(DEV)
    ranks = torch.tensor([8, 3, 0, 5], dtype=torch.int32, device=DEV)
    scales = torch.rand(S, generator=g).to(DEV)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]).to(DEV)
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32).to(DEV)
    x = torch.randn(T, K, generator=g).to(dt).to(DEV)
    out0 = torch.randn(T, topk, 40, generator=g).to(dt).to(DEV)
    want = out0.clone()
    add_lora_moe(want, x, ids, la, lb, pt, ranks, scales, slots, backend="torch")

    calls = {"kernel": 0, "torch": 0}
    real_kernel, real_torch = mg._group_kernel, mg._group_torch
    monkeypatch.setattr(mg, "_group_kernel", lambda *a: calls.__setitem__("kernel", calls["kernel"] + 1)
                        or real_kernel(*a))
    monkeypatch.setattr(mg, "_group_torch", lambda *a: calls.__setitem__("torch", calls["torch"] + 1)
                        or real_torch(*a))
    got = out0.clone()
    add_lora_moe(got, x, ids, la, lb, pt, ranks, scales, slots, backend="cuda")
    assert calls == {"kernel": 1, "torch": 0}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    monkeypatch.setenv("LORAKERN_GROUP_KERNEL", "0")
    got = out0.clone()
    add_lora_moe(got, x, ids.clone(), la, lb, pt, ranks, scales, slots, backend="cuda")
    assert calls == {"kernel": 1, "torch": 1}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Count:
    """Counts the torch ops dispatched inside the block."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.n += 1
                return func(*args, **(kwargs or {}))

        self.n, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.cuda_emulate
def test_cuda_group_makes_a_few_torch_ops_where_the_torch_code_makes_about_ninety_and_126(monkeypatch):
    """The host side of a kernel grouping: three output allocations (no kernel among them) and the launch; of a
    kernel-filled plan: the plan's buffers, its slot copy, the launch and the dynamic plan's one statistics read."""
    g = torch.Generator().manual_seed(5)
    slots = torch.randint(-1, 16, (64,), generator=g).to(DEV)
    ids = torch.randint(0, 32, (64, 8), generator=g).to(DEV)
    ranks = torch.randint(1, 65, (16,), generator=g).int().to(DEV)
    with _Count() as k:
        mg.group_pairs(slots, ids, 32, 16, 16, ranks)
    with _Count() as kp:
        LoRAPlan.from_slots(slots, ranks)
    monkeypatch.setenv("LORAKERN_GROUP_KERNEL", "0")
    ids2 = ids.clone()  # (another object: the first call's grouping is kept for one more call with the same ones)
    with _Count() as t:
        mg.group_pairs(slots, ids2, 32, 16, 16, ranks)
    with _Count() as tp:
        LoRAPlan.from_slots(slots, ranks)
    assert k.n == 3 and t.n > 60, (k.n, t.n)
    assert tp.n > 100 and kp.n < tp.n - 80, (kp.n, tp.n)


# ------------------------------------------------------------------------------------------------ plans
_PLAN_BUFFERS = ("slots", "token_ids", "seg_starts", "seg_slots", "counts", "num_segments")


def _plan_state(plan):
    return {**{n: getattr(plan, n).cpu().clone() for n in _PLAN_BUFFERS},
            **{f"tiles{bm}": t.cpu().clone() for bm, t in plan._tiles.items()}, "stats": plan.stats}


def _plans(monkeypatch, build, launches=1):
    """(torch-made, kernel-made) plan states of one ``build()`` (that fills a plan ``launches`` times)."""
    monkeypatch.setenv("LORAKERN_GROUP_KERNEL", "0")
    want = _plan_state(build())
    monkeypatch.setenv("LORAKERN_GROUP_KERNEL", "1")
    calls = []
    real = grouping.launch
    monkeypatch.setattr(grouping, "launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _plan_state(build())
    monkeypatch.setattr(grouping, "launch", real)
    assert calls == [1] * launches, "the plan was not filled by the kernel"
    return want, got


def _assert_same_plan(want, got):
    for name in want:
        if name == "stats":
            assert want[name] == got[name]
        else:
            assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), \
                (name, want[name].tolist()[:24], got[name].tolist()[:24])


def _plan_slots(seed):
    g = torch.Generator().manual_seed(seed)
    T = (1, 7, 256, 300, 2048, 4096)[seed % 6]
    S = int(torch.randint(1, 300, (1,), generator=g))
    slots = torch.randint(-1, S, (T,), generator=g)
    if seed % 3 == 1:  # big slot ids (below the int32 limit) and many no-LoRA tokens
        slots = torch.where((torch.rand(T, generator=g) < 0.5) | (slots < 0), torch.full_like(slots, -1),
                            slots * 1_000_003)
    ranks = None if seed % 2 == 0 else torch.randint(0, 140, (S,), generator=g)
    return slots.to((torch.int64, torch.int32)[seed % 2]), ranks


@pytest.mark.cuda_emulate
@pytest.mark.parametrize("seed", range(12))
def test_cuda_plan_from_slots_matches_the_torch_plan(seed, monkeypatch):
    """Every buffer of a dynamic plan (and its statistics) the same whether the kernel or the torch ops fill it:
    1 to 4096 tokens, int32 and int64 slots, -1 tokens, big slot ids, with and without ranks."""
    slots, ranks = _plan_slots(seed)
    slots = slots.to(DEV)
    ranks = ranks.to(DEV) if ranks is not None else None
    _assert_same_plan(*_plans(monkeypatch, lambda: LoRAPlan.from_slots(slots, ranks)))


@pytest.mark.cuda_emulate
@pytest.mark.parametrize("case", ["all -1", "one slot", "max slot id", "fewer ranks than slots", "rank 0 and huge"])
def test_cuda_plan_adversarial_slots(case, monkeypatch):
    T = 40
    ranks = None
    if case == "all -1":
        slots = torch.full((T,), -1)
    elif case == "one slot":
        slots = torch.full((T,), 3, dtype=torch.int32)
        ranks = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    elif case == "max slot id":  # int64 above int32 saturates to INT32_MAX - 1 (as from_slots refuses it first)
        slots = torch.tensor([2**31 - 2, -1, 5, 2**31 - 2] * 10, dtype=torch.int32)
    elif case == "fewer ranks than slots":
        slots = torch.arange(T) % 9 - 1
        ranks = torch.tensor([5, 1, 7], dtype=torch.int32)
    else:
        slots = torch.arange(T) % 4
        ranks = torch.tensor([0, 1 << 20, -3, 64])
    slots = slots.to(DEV)
    ranks = ranks.to(DEV) if ranks is not None else None
    _assert_same_plan(*_plans(monkeypatch, lambda: LoRAPlan.from_slots(slots, ranks)))


@pytest.mark.cuda_emulate
def test_cuda_static_plan_update_matches_the_torch_plan(monkeypatch):
    """A static plan refilled with fewer tokens than its size (the rest -1), again with other slots and ranks."""
    g = torch.Generator().manual_seed(9)
    static_t = torch.randint(-1, 30, (100,), generator=g).to(DEV)
    ranks = torch.randint(1, 65, (30,), generator=g).int().to(DEV)

    def build():
        plan = LoRAPlan.static(128, device=DEV)
        plan.update(static_t[:60], ranks)
        plan.update(static_t, ranks)  # (buffers rewritten in place)
        return plan

    _assert_same_plan(*_plans(monkeypatch, build, launches=2))


@pytest.mark.cuda_emulate
def test_cuda_plan_statistics_come_from_the_launch_and_still_refuse_slots_below_minus_one(monkeypatch):
    """A kernel-filled dynamic plan reads its statistics from the launch's output (no torch reductions): the
    same PlanStats as the torch code's (the parity tests above), and a slot below -1 (int32, so no pre-check)
    is still a ValueError naming it."""
    monkeypatch.setattr(LoRAPlan, "_stats_by_torch", lambda self: pytest.fail("statistics by torch ops"))
    plan = LoRAPlan.from_slots(torch.tensor([3, -1, 3, 0, 7], dtype=torch.int32, device=DEV))
    assert plan.stats is not None and plan.stats.num_segments == 3 and plan.stats.lora_tokens == 4
    assert plan.stats.max_count == 2 and plan.stats.max_slot == 7
    with pytest.raises(ValueError, match="found -3"):
        LoRAPlan.from_slots(torch.tensor([0, -3, 2], dtype=torch.int32, device=DEV))


def test_group_kernel_switch_and_torch_compile_keep_the_torch_code(monkeypatch):
    """LORAKERN_GROUP_KERNEL=0, and a trace by torch.compile, take the torch code (no kernel)."""
    monkeypatch.setenv("LORAKERN_CUDA_EMULATE", "1")
    monkeypatch.setenv("LORAKERN_GROUP_KERNEL", "0")
    assert grouping.kernel_for(DEV) is None
    monkeypatch.setenv("LORAKERN_GROUP_KERNEL", "1")
    assert grouping.kernel_for(DEV) is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert grouping.kernel_for(DEV) is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_group_on_the_gpu_matches_the_torch_code(monkeypatch):
    """On the GPU (also in ``pytest -m gpu``): the random and adversarial cases above through the real kernel, MoE
    groupings and plans."""
    for seed in range(12):
        _assert_same(*_both(*_random_case(seed)))
    for _, slots, ids, E, S, bm, ranks in _adversarial():
        _assert_same(*_both(slots, ids, E, S, bm, ranks))
    for seed in range(12):
        slots, ranks = _plan_slots(seed)
        slots, ranks = slots.to(DEV), ranks.to(DEV) if ranks is not None else None
        _assert_same_plan(*_plans(monkeypatch, lambda: LoRAPlan.from_slots(slots, ranks)))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_group_on_a_gpu_that_is_not_current(monkeypatch):
    """A plan and a grouping built on cuda:1 while cuda:0 is current: launched there, the torch code's result."""
    dev = torch.device("cuda", 1)
    slots = torch.randint(-1, 9, (50,), device=dev)
    ids = torch.randint(0, 6, (50, 2), device=dev)
    ranks = torch.randint(1, 33, (9,), device=dev, dtype=torch.int32)
    with torch.cuda.device(0):
        _assert_same_plan(*_plans(monkeypatch, lambda: LoRAPlan.from_slots(slots, ranks)))
        n_max = mg.max_tiles(100, 54, 16)
        want = mg._group_torch(slots, ids, 6, 9, 16, ranks, n_max)
        got = mg._group_kernel(grouping.kernel_for(dev), slots, ids, 6, 9, 16, ranks, n_max)
        _assert_same(want, got)
