"""AdapterPool: layout and row format, allocation, residency (LRU, pinning, waves), the host cache tier, typed
errors that change nothing, and end to end: pool → LoRAPlan → lorakern.ops.add_lora equals each adapter alone."""


import numpy as np
import pytest
import torch

import lorakern
from conftest import DEVICE, HAS_CUDA, assert_close_lora
from lorakern.pool import (AdapterInUseError, AdapterPool, AdapterStateError, HostCache, PoolCapacityError,
                           PoolLayout, RowFormat, TargetSpec, TensorAdapter, UnknownAdapterError, save_peft_dir)

LAYOUT_ARGS = dict(
    num_layers=2,
    targets={"qkv": TargetSpec(12, (12, 4, 4)), "o": TargetSpec(12, (10,))},
    moe_targets={"w13": TargetSpec(12, (6, 6), num_experts=3, layers=(1,))},
)


def small_layout():
    return PoolLayout(**LAYOUT_ARGS)


def rand_adapter(g, layout, rank, targets=None, dtype=torch.float32):
    """(layer, target, slice) → (A, B) for every (or the given) target of every layer that has it."""
    out = {}
    for layer in range(layout.num_layers):
        for name, spec in layout.specs.items():
            if not layout.has(layer, name) or (targets is not None and name not in targets):
                continue
            for i, n in enumerate(spec.n_sizes):
                if spec.is_moe:
                    E = spec.num_experts
                    out[(layer, name, i)] = (torch.randn(E, rank, spec.K, generator=g, dtype=dtype),
                                             torch.randn(E, n, rank, generator=g, dtype=dtype))
                else:
                    out[(layer, name, i)] = (torch.randn(rank, spec.K, generator=g, dtype=dtype),
                                             torch.randn(n, rank, generator=g, dtype=dtype))
    return out


def make_pool(**kw):
    args = dict(max_rows=16, max_slots=4, max_rank=8, dtype=torch.float32)
    args.update(kw)
    return AdapterPool(small_layout(), **args)


def snapshot(pool):
    return pool._state(), pool.rows.clone()


def assert_unchanged(pool, snap):
    state, rows = snap
    assert pool._state() == state
    assert torch.equal(pool.rows, rows)


@pytest.fixture
def g(request):
    import zlib
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_format_segments_aligned_and_disjoint(dtype):
    lay = small_layout()
    fmt = RowFormat(lay, dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    spans = []
    for (layer, t), seg in fmt.segments.items():
        for i in range(len(seg.n_sizes)):
            for off, ln in (fmt.a_range(layer, t, i), fmt.b_range(layer, t, i)):
                assert off * esize % 16 == 0
                spans.append((off, off + ln))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] <= fmt.row_elems and fmt.row_elems * esize % 16 == 0
    assert (0, "w13") not in fmt.segments and (1, "w13") in fmt.segments  # layers=(1,)


def test_views_are_the_contract_shapes_into_one_buffer():
    pool = make_pool(dtype=torch.bfloat16)
    base = pool.rows.data_ptr()
    end = base + pool.rows.numel() * pool.rows.element_size()
    a, b = pool.lora_a(0, "qkv"), pool.lora_b(0, "qkv")
    assert [t.shape for t in a] == [(16, 12)] * 3 and [t.shape for t in b] == [(16, 12), (16, 4), (16, 4)]
    for t in a + b:
        assert t.stride() == (pool.fmt.row_elems, 1) and t.dtype == torch.bfloat16
        assert base <= t.data_ptr() < end
    ma, mb = pool.lora_a(1, "w13"), pool.lora_b(1, "w13")
    assert [t.shape for t in ma] == [(16, 3, 12)] * 2 and [t.shape for t in mb] == [(16, 3, 6)] * 2
    assert pool.lora_a(0, "qkv")[0] is a[0]  # cached, stable objects
    assert pool.page_table.shape == (4, 8) and pool.page_table.dtype == torch.int32
    assert pool.ranks.dtype == torch.int32 and pool.scales.dtype == torch.float32
    assert bool((pool.page_table == -1).all()) and bool((pool.ranks == 0).all())
    with pytest.raises(ValueError, match="target: unknown 'nope'"):
        pool.lora_a(0, "nope")
    with pytest.raises(ValueError, match="layer: 0 has no target 'w13'"):
        pool.lora_b(0, "w13")
    args = pool.args(1, "o")
    assert args[2] is pool.page_table and args[3] is pool.ranks and args[4] is pool.scales


def test_layout_errors():
    with pytest.raises(ValueError, match="moe_targets"):
        PoolLayout(1, {"e": TargetSpec(4, (4,), num_experts=2)})
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        PoolLayout(1, {}, moe_targets={"e": TargetSpec(4, (4,))})
    with pytest.raises(ValueError, match="unknown target 'x'"):
        PoolLayout(1, {"o": TargetSpec(4, (4,))}, modules={"layers.{layer}.o": ("x", 0)})
    with pytest.raises(ValueError, match="no \\{layer\\}"):
        PoolLayout(1, {"o": TargetSpec(4, (4,))}, modules={"o_proj": ("o", 0)})
    with pytest.raises(ValueError, match="slice 1 out of range"):
        PoolLayout(1, {"o": TargetSpec(4, (4,))}, modules={"layers.{layer}.o": ("o", 1)})
    with pytest.raises(ValueError, match="at most 64"):
        PoolLayout(1, {f"t{i}": TargetSpec(4, (4,)) for i in range(65)})
    with pytest.raises(ValueError, match="layer 3 out of range"):
        PoolLayout(2, {"o": TargetSpec(4, (4,), layers=(3,))})
    with pytest.raises(TypeError, match="K: expected an int"):
        TargetSpec(4.0, (4,))
    with pytest.raises(ValueError, match="n_sizes"):
        TargetSpec(4, ())


def test_llama_layout_and_module_matching():
    lay = PoolLayout.llama(4, 64, 96, 8, 2)
    assert lay.specs["qkv_proj"].n_sizes == (64, 16, 16) and lay.specs["down_proj"].K == 96
    assert lay.match("base_model.model.model.layers.3.self_attn.k_proj") == (3, "qkv_proj", 1)
    assert lay.match("model.layers.12.mlp.up_proj") == (12, "gate_up_proj", 1)
    assert lay.match("model.layers.1.self_attn.rotary") is None
    assert lay.match("model.xlayers.1.mlp.up_proj") is None  # dot boundary


def test_pool_constructor_errors():
    lay = small_layout()
    with pytest.raises(ValueError, match="max_rows: must be >= 1"):
        AdapterPool(lay, max_rows=0, max_slots=1, max_rank=1)
    with pytest.raises(TypeError, match="max_slots: expected an int"):
        AdapterPool(lay, max_rows=1, max_slots=1.5, max_rank=1)
    with pytest.raises(TypeError, match="dtype"):
        AdapterPool(lay, max_rows=1, max_slots=1, max_rank=1, dtype=torch.int8)
    with pytest.raises(TypeError, match="layout"):
        AdapterPool({"o": 1}, max_rows=1, max_slots=1, max_rank=1)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            AdapterPool(lay, max_rows=1, max_slots=1, max_rank=1, device="cuda")


# ------------------------------------------------------------------------------------------------ residency
def test_exact_rows_slots_duplicates_and_none(g):
    pool = make_pool()
    lay = pool.layout
    for name, r in (("a", 3), ("b", 1), ("c", 5)):
        pool.register(name, TensorAdapter(rand_adapter(g, lay, r), scale=0.5))
    slots = pool.acquire(["a", None, "b", "a", -1, "c", np.int64(-1)])
    assert slots.dtype == torch.int32 and slots.device == pool.device
    s = slots.tolist()
    assert s[1] == s[4] == s[6] == -1 and s[0] == s[3] and len({s[0], s[2], s[5]}) == 3
    st = pool.stats()
    assert (st.rows_used, st.slots_used, st.resident, st.in_flight) == (9, 3, 3, 3)
    assert (st.rows_free, st.slots_free) == (7, 1)
    rows = [set(pool.rows_of(a).tolist()) for a in "abc"]
    assert [len(r) for r in rows] == [3, 1, 5] and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert pool.ranks.tolist()[s[5]] == 5 and pool.scales.tolist()[s[0]] == 0.5
    pool.release(["a", "b", "c", "a"])  # duplicates released once, as acquired
    assert pool.stats().in_flight == 0
    with pytest.raises(TypeError, match=r"adapter_ids\[1\]"):
        pool.acquire(["a", 3])
    with pytest.raises(TypeError, match="single str"):
        pool.acquire("a")


def test_lru_eviction_respects_pins_and_flight(g):
    pool = make_pool(max_rows=8, max_slots=3)
    for i in range(6):
        pool.register(f"x{i}", TensorAdapter(rand_adapter(g, pool.layout, 2)))
    pool.load(["x0", "x1", "x2"])
    pool.acquire(["x0"])  # x0 in flight; LRU order now x1, x2, x0
    pool.load(["x3"])  # needs a slot: evicts x1 (least recently used, idle)
    assert pool.resident_ids() == ["x2", "x0", "x3"]
    pool.pin("x2")
    pool.load(["x4"])  # x2 pinned, x0 in flight → evicts x3
    assert set(pool.resident_ids()) == {"x2", "x0", "x4"}
    snap = snapshot(pool)
    with pytest.raises(PoolCapacityError) as ei:
        pool.acquire(["x4", "x5", "x1"])  # 3 slots, but x2 pinned and x0 in flight leave 1 usable + x4 in wave
    e = ei.value
    assert isinstance(e, RuntimeError) and set(e.adapter_ids) == {"x5", "x1"}
    assert "'x5'" in str(e) and "2 by 1 pinned adapters" in str(e) and "by 1 adapters in flight" in str(e)
    assert_unchanged(pool, snap)
    pool.release(["x0"])
    pool.acquire(["x4", "x5"])  # now x0 is idle and can go; x2 stays pinned
    assert set(pool.resident_ids()) == {"x2", "x4", "x5"}
    pool.unpin("x2")
    with pytest.raises(AdapterStateError, match="'x2': not pinned"):
        pool.unpin("x2")


def test_wave_larger_than_pool(g):
    pool = make_pool(max_rows=8, max_slots=2)
    for i in range(3):
        pool.register(f"w{i}", TensorAdapter(rand_adapter(g, pool.layout, 3)))
    pool.load(["w0"])
    snap = snapshot(pool)
    with pytest.raises(PoolCapacityError, match="3 distinct adapters, more than the pool's 2 slots"):
        pool.acquire(["w0", "w1", "w2"])
    assert_unchanged(pool, snap)
    pool.register("big", TensorAdapter(rand_adapter(g, pool.layout, 8)))
    pool.register("big2", TensorAdapter(rand_adapter(g, pool.layout, 5)))
    pool.load(["big"])  # exactly fills the rows after evicting w0
    assert pool.resident_ids() == ["big"]
    snap = snapshot(pool)
    # known to fail before any read: big holds every row and is part of the wave
    with pytest.raises(PoolCapacityError, match="needs at least 1 rows") as ei:
        pool.acquire(["big", "big2"])
    assert ei.value.rows_available == 0 and "8 rows held by 1 resident adapters of the wave" in str(ei.value)
    assert_unchanged(pool, snap)
    pool.invalidate("big")  # out of the pool and the host cache: its rank is unknown until read
    snap = snapshot(pool)
    # known only after reading the ranks
    with pytest.raises(PoolCapacityError, match="needs 13 rows") as ei:
        pool.acquire(["big", "big2"])
    assert ei.value.rows_needed == 13 and ei.value.rows_available == 8 and set(ei.value.adapter_ids) == {"big", "big2"}
    assert_unchanged(pool, snap)


def test_release_evict_invalidate_errors_change_nothing(g):
    pool = make_pool()
    pool.register("a", TensorAdapter(rand_adapter(g, pool.layout, 2)))
    pool.register("b", TensorAdapter(rand_adapter(g, pool.layout, 2)))
    pool.acquire(["a"])
    snap = snapshot(pool)
    with pytest.raises(AdapterStateError, match="'b': not in flight"):
        pool.release(["a", "b"])  # "a" is not released either
    assert_unchanged(pool, snap)
    with pytest.raises(AdapterInUseError, match="'a': in use: in flight in 1 wave"):
        pool.evict("a")
    with pytest.raises(AdapterInUseError):
        pool.invalidate("a")
    with pytest.raises(AdapterInUseError):
        pool.register("a", TensorAdapter(rand_adapter(g, pool.layout, 1)), replace=True)
    with pytest.raises(ValueError, match="already registered"):
        pool.register("a", TensorAdapter(rand_adapter(g, pool.layout, 1)))
    with pytest.raises(UnknownAdapterError) as ei:
        pool.acquire(["a", "nobody"])
    assert isinstance(ei.value, KeyError) and str(ei.value).startswith("adapter 'nobody'")
    assert_unchanged(pool, snap)
    assert pool.evict("b") is False
    pool.release(["a"])
    assert pool.evict("a") is True and "a" not in pool
    assert pool.stats().rows_used == 0 and bool((pool.page_table == -1).all())


def test_wave_handle_releases(g):
    pool = make_pool()
    pool.register("a", TensorAdapter(rand_adapter(g, pool.layout, 2)))
    with pool.wave(["a", "a", None]) as slots:
        assert slots.tolist()[0] == slots.tolist()[1] >= 0 and pool.in_flight("a") == 1
    assert pool.in_flight("a") == 0
    w = pool.wave(["a"])
    w.release()
    w.release()  # idempotent
    assert pool.in_flight("a") == 0


def test_host_cache_tier(g, tmp_path):
    lay = small_layout()
    pool = AdapterPool(lay, max_rows=4, max_slots=1, max_rank=4, dtype=torch.float32,
                       host_cache=HostCache(10 ** 6))
    w0 = rand_adapter(g, lay, 4)
    pool.register("a", TensorAdapter(w0))
    pool.register("b", TensorAdapter(rand_adapter(g, lay, 4)))
    pool.load(["a"])
    pool.load(["b"])  # evicts a; a's record stays in the host cache
    assert pool.stats().disk_reads == 2 and "a" in pool.host_cache
    pool.load(["a"])
    st = pool.stats()
    assert st.disk_reads == 2 and st.loads == 3 and st.evictions == 2
    rows = pool.page_table[0, :4].long()
    assert torch.equal(pool.lora_a(0, "o")[0][rows], w0[(0, "o", 0)][0])
    # byte budget: room for exactly one record
    rec = pool.host_cache.peek("a")
    pool.host_cache.max_bytes = rec.nbytes
    pool.host_cache.put("b", pool.host_cache.peek("b"))
    assert list(pool.host_cache) == ["b"] and pool.host_cache.nbytes == rec.nbytes
    # invalidate drops both tiers; a changed PEFT dir is re-read even if cached (source token)
    d = save_peft_dir(tmp_path / "p", {"model.layers.0.self_attn.o_proj": (torch.ones(2, 12), torch.ones(10, 2))},
                      r=2, lora_alpha=2)
    lay2 = PoolLayout(2, LAYOUT_ARGS["targets"], modules={"layers.{layer}.self_attn.o_proj": ("o", 0)})
    p2 = AdapterPool(lay2, max_rows=4, max_slots=2, max_rank=4, dtype=torch.float32)
    p2.register("p", d)
    p2.load(["p"])
    assert float(p2.lora_a(0, "o")[0][int(p2.page_table[p2.slot_of("p"), 0])][0]) == 1.0
    p2.evict("p")
    import os
    import time
    save_peft_dir(d, {"model.layers.0.self_attn.o_proj": (torch.full((2, 12), 3.0), torch.ones(10, 2))},
                  r=2, lora_alpha=2)
    st = os.stat(d / "adapter_model.safetensors")
    os.utime(d / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p2.load(["p"])
    assert float(p2.lora_a(0, "o")[0][int(p2.page_table[p2.slot_of("p"), 0])][0]) == 3.0
    assert p2.stats().disk_reads == 2
    assert p2.invalidate("p") is True and "p" not in p2 and "p" not in p2.host_cache
    del time


def test_host_cache_disabled_and_prefetch_host(g):
    pool = make_pool(host_cache=0, max_slots=1)
    pool.register("a", TensorAdapter(rand_adapter(g, pool.layout, 2)))
    pool.register("b", TensorAdapter(rand_adapter(g, pool.layout, 2)))
    pool.load(["a"])
    pool.load(["b"])
    pool.load(["a"])
    assert pool.stats().disk_reads == 3 and len(pool.host_cache) == 0
    p2 = make_pool()
    p2.register("a", TensorAdapter(rand_adapter(g, p2.layout, 2)))
    assert p2.prefetch_host(["a", "a"]) == 1 and "a" in p2.host_cache and "a" not in p2
    p2.load(["a"])
    assert p2.stats().disk_reads == 1


def test_fragmented_rows_round_trip(g):
    """Rows of one adapter need not be contiguous: after evictions a rank-5 adapter takes the holes."""
    pool = make_pool(max_rows=9, max_slots=4)
    ws = {}
    for name, r in (("a", 2), ("b", 2), ("c", 2), ("d", 3), ("e", 5)):
        ws[name] = rand_adapter(g, pool.layout, r)
        pool.register(name, TensorAdapter(ws[name]))
    pool.load(["a", "b", "c", "d"])  # rows 0-1, 2-3, 4-5, 6-8
    pool.evict("a")
    pool.evict("c")
    pool.load(["e"])  # needs 5 rows: 0,1,4,5 free + evicts b (LRU) → 0..5
    rows = pool.rows_of("e")
    assert len(rows) == 5 and len(set(rows.tolist()) & set(pool.rows_of("d").tolist())) == 0
    assert list(rows) == sorted(rows)
    for (layer, t, i), (A, B) in ws["e"].items():
        got_a = pool.lora_a(layer, t)[i][torch.as_tensor(rows)]
        want_a = A if A.dim() == 2 else A.permute(1, 0, 2)
        assert torch.equal(got_a, want_a)


# ------------------------------------------------------------------------------------------------ end to end
def _dense_expected(out0, x, tok_ids, weights, scales, target, layer, spec):
    """float64: out0 + per token, that token's adapter applied alone (its own A, B and scale)."""
    out = out0.double().clone()
    off = 0
    for i, n in enumerate(spec.n_sizes):
        for t, aid in enumerate(tok_ids):
            if aid is None or (layer, target, i) not in weights[aid]:
                continue
            A, B = weights[aid][(layer, target, i)]
            out[t, off:off + n] += scales[aid] * (x[t].double() @ A.double().T) @ B.double().T
        off += n
    return out


def _dense_abs(x, tok_ids, weights, scales, target, layer, spec, N):
    out = torch.zeros(x.shape[0], N, dtype=torch.float64)
    off = 0
    for i, n in enumerate(spec.n_sizes):
        for t, aid in enumerate(tok_ids):
            if aid is None or (layer, target, i) not in weights[aid]:
                continue
            A, B = weights[aid][(layer, target, i)]
            out[t, off:off + n] += abs(scales[aid]) * (x[t].double().abs() @ A.double().abs().T) @ B.double().abs().T
        off += n
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_end_to_end_pool_plan_add_lora(backend, dtype, g):
    """Heterogeneous ranks, adapters missing some targets, -1 tokens, rows fragmented by evictions and reloads;
    the pool's tensors through LoRAPlan and add_lora give, per token, its adapter applied alone."""
    lay = PoolLayout(2, {"qkv": TargetSpec(24, (16, 8, 8)), "o": TargetSpec(16, (24,))})
    pool = AdapterPool(lay, max_rows=20, max_slots=6, max_rank=8, dtype=dtype, device=DEVICE)
    ranks = {"r1": 1, "r2": 2, "r3": 3, "r5": 5, "r8": 8, "qonly": 4, "tmp": 6}
    weights, scales = {}, {}
    for k, (aid, r) in enumerate(ranks.items()):
        w = rand_adapter(g, lay, r, targets=("qkv",) if aid == "qonly" else None)
        w = {key: (A.to(dtype), B.to(dtype)) for key, (A, B) in w.items()}  # exactly representable in dtype
        weights[aid], scales[aid] = w, 0.25 * (k + 1)
        pool.register(aid, TensorAdapter(w, scale=scales[aid]))
    pool.load(["tmp", "r8"])
    pool.load(["r1", "r2"])
    pool.evict("tmp")  # leave holes so later adapters get non-contiguous rows
    wave = ["r3", "r5", "qonly", "r1", "r2"]
    T = 40
    tok = [None if t % 7 == 3 else wave[(t * 5 + t // 3) % len(wave)] for t in range(T)]
    with pool.wave(tok) as slots:
        plan = lorakern.LoRAPlan.from_slots(slots)
        for layer in range(2):
            for target, spec in lay.specs.items():
                N = sum(spec.n_sizes)
                x = torch.randn(T, spec.K, generator=g).to(dtype)
                out0 = torch.randn(T, N, generator=g).to(dtype)
                # on a GPU the pool and the op run there (Triton takes CPU tensors only under its interpreter)
                out = out0.clone().to(DEVICE)
                lorakern.ops.add_lora(out, x.to(DEVICE), *pool.args(layer, target), plan, backend=backend)
                out = out.cpu()
                ref = _dense_expected(out0, x, tok, weights, scales, target, layer, spec)
                ref_abs = _dense_abs(x, tok, weights, scales, target, layer, spec, N)
                assert_close_lora(out, ref, ref_abs, dtype, f"{backend} layer {layer} {target}")
                none = torch.tensor([a is None for a in tok])
                assert torch.equal(out[none], out0[none])


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_async_loads_race_compute():
    """Loads on the side stream while the compute stream is busy; acquire makes compute wait for the copies,
    and a load that reuses an evicted adapter's rows waits for the batch that still reads them."""
    dev = torch.device("cuda")
    lay = PoolLayout(4, {"o": TargetSpec(2048, (2048,))})
    pool = AdapterPool(lay, max_rows=64, max_slots=8, max_rank=16, dtype=torch.float16, device=dev)
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(24):
        weights[f"a{i}"] = rand_adapter(g, lay, 16, dtype=torch.float16)
        pool.register(f"a{i}", TensorAdapter(weights[f"a{i}"], scale=0.5))
    big = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    T = 64
    x = torch.randn(T, 2048, generator=g).to(torch.float16)
    xd = x.to(dev)
    for step in range(6):
        ids = [f"a{(step * 4 + k) % 24}" for k in range(4)]
        for _ in range(20):  # keep the compute stream busy while the copies are queued
            big = (big @ big).clamp_(-1, 1)
        tok = [ids[t % 4] for t in range(T)]
        with pool.wave(tok) as slots:
            out = torch.zeros(T, 2048, device=dev, dtype=torch.float16)
            lorakern.ops.add_lora(out, xd, *pool.args(step % 4, "o"), slots, backend="auto")
            got = out.cpu()
        for t in range(T):
            A, B = weights[tok[t]][(step % 4, "o", 0)]
            want = 0.5 * (x[t].double() @ A.double().T) @ B.double().T
            torch.testing.assert_close(got[t].double(), want, rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
