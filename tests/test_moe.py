"""add_lora_moe (DESIGN.md §2–§3) against an independent float64 oracle, on the torch and Triton backends.

The oracle never sees the packed layout: it applies each adapter's unpacked per-expert weights ``A [E, r, K]``,
``B [E, N, r]`` pair by pair. The packed rank rows under test are built from those weights with interleaved row
ids, page-table entries beyond each rank poisoned with out-of-range ids and spare rows full of NaN, so a kernel
that reads past a slot's rank or a wrong row fails loudly. Outputs are random (the op accumulates), rows of
``-1`` tokens and columns outside every slice are poisoned with NaN and must come back bit for bit.

Cost: the Triton interpreter pays ~1 ms of Python per program per loop step, so Triton cases stay small (a few
dozen pairs); the large case (E=256, top-k=8, 2048 tokens, 32 adapters) runs on the torch backend.
"""

from dataclasses import dataclass
import pytest
import torch

import lorakern
from conftest import (BACKEND_LIST, COMPILED_BACKENDS, CUDA_RUNS, DEVICE, assert_bits_equal, assert_close_lora,
                      make_slots_arg)
from lorakern.ops import add_lora_moe
from lorakern.ops import moe as moe_ops
from lorakern.triton import moe as moe_triton

BACKENDS = BACKEND_LIST


#: the tests that loop over BACKENDS themselves run cuda on the CPU emulator when there is no GPU
pytestmark = pytest.mark.cuda_emulate


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class MoELoRA:
    """Per-adapter unpacked weights (the oracle's view) and the packed rank rows built from them (the op's)."""

    A: list  # [adapter][slice] -> [E, r, K] float64 (zeros for experts / slices the adapter lacks)
    B: list  # [adapter][slice] -> [E, N_i, r] float64
    lora_a: list  # per slice [rows, E, K]
    lora_b: list  # per slice [rows, E, N_i]
    page_table: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

    @property
    def num_slots(self):
        return self.page_table.shape[0]


def make_moe_lora(g, *, E, K, n_sizes, ranks, dtype, device=DEVICE, missing_expert_frac=0.0,
                  missing_slices=(), spare_rows=3, max_rank=None) -> MoELoRA:
    """``missing_slices``: (adapter, slice) pairs the adapter lacks (all-zero rows, as the pool writes them)."""
    n = len(ranks)
    R = max(max(ranks), 1) if max_rank is None else max_rank
    total = sum(ranks)
    rows = total + spare_rows
    perm = torch.randperm(rows, generator=g)
    pt = torch.full((n, R), rows + 7, dtype=torch.int32)
    A, B = [], []
    la = [torch.full((rows, E, K), float("nan"), dtype=torch.float64) for _ in n_sizes]
    lb = [torch.full((rows, E, N), float("nan"), dtype=torch.float64) for N in n_sizes]
    off = 0
    for s, r in enumerate(ranks):
        ids = perm[off:off + r]
        off += r
        pt[s, :r] = ids.to(torch.int32)
        A.append([]), B.append([])
        lacks = torch.rand(E, generator=g) < missing_expert_frac
        for i, N in enumerate(n_sizes):
            a = torch.randn(E, r, K, generator=g, dtype=torch.float64) / K ** 0.25
            b = torch.randn(E, N, r, generator=g, dtype=torch.float64) / max(r, 1) ** 0.25
            a[lacks] = 0
            b[lacks] = 0
            if (s, i) in missing_slices:
                a.zero_()
                b.zero_()
            a, b = a.to(dtype).to(torch.float64), b.to(dtype).to(torch.float64)  # representable in dtype
            A[s].append(a)
            B[s].append(b)
            if r:
                la[i][ids] = a.permute(1, 0, 2)
                lb[i][ids] = b.permute(2, 0, 1)
    scales = (0.5 + torch.rand(n, generator=g)).to(torch.float32)
    return MoELoRA(A, B, [t.to(dtype).to(device) for t in la], [t.to(dtype).to(device) for t in lb],
                   pt.to(device), torch.tensor(ranks, dtype=torch.int32, device=device), scales.to(device))


def make_routing(g, T, topk, E, *, skew=False):
    """int64 ``topk_ids [T, topk]``: distinct experts per token (as a router's top-k gives), optionally skewed
    towards a few hot experts; and float32 weights [T, topk] (softmax-like, positive)."""
    if T == 0:
        return torch.zeros(0, topk, dtype=torch.int64), torch.zeros(0, topk)
    logits = torch.randn(T, E, generator=g)
    if skew:
        logits[:, : max(1, E // 8)] += 3.0
    w, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).to(torch.float32)


def oracle(L: MoELoRA, x, topk_ids, slots, out0, weights, offsets, use_scales=True):
    """(ref, ref_abs) float64 on the CPU: per adapter, every pair with its own unpacked (A_e, B_e)."""
    x64 = x.detach().to("cpu", torch.float64)
    ids = topk_ids.cpu().long()
    T, topk = ids.shape
    ref = out0.detach().to("cpu", torch.float64).clone()
    ref_abs = torch.zeros_like(ref)
    slots = slots.cpu().long()
    for s in range(L.num_slots):
        t = (slots == s).nonzero().flatten()
        if t.numel() == 0 or int(L.ranks[s]) == 0:
            continue
        t = t.repeat_interleave(topk)
        k = torch.arange(topk).repeat(t.numel() // topk)
        e = ids[t, k]
        xs = x64[t, k] if x64.dim() == 3 else x64[t]  # [n, K]
        c = torch.ones(t.numel(), dtype=torch.float64)
        if weights is not None:
            c = weights.detach().cpu().double()[t, k]
        if use_scales:
            c = c * float(L.scales[s])
        for i, (A, B) in enumerate(zip(L.A[s], L.B[s])):
            N = B.shape[1]
            for val, xx, AA, BB, cc in ((ref, xs, A, B, c), (ref_abs, xs.abs(), A.abs(), B.abs(), c.abs())):
                y = torch.einsum("nk,nrk->nr", xx, AA[e])
                val[t, k, offsets[i]:offsets[i] + N] += cc[:, None] * torch.einsum("nr,nNr->nN", y, BB[e])
    return ref, ref_abs


def run(L, x, topk_ids, slots, *, backend, dtype, weights=None, slots_form="int32", use_scales=True,
        slice_offsets=None, out_cols=None, g=None):
    """Call add_lora_moe with a poisoned out and check everything; returns the result."""
    T, topk = topk_ids.shape
    widths = [b.shape[2] for b in L.lora_b]
    offsets = slice_offsets or [sum(widths[:i]) for i in range(len(widths))]
    cols = out_cols or max(o + w for o, w in zip(offsets, widths))
    out = torch.randn(T, topk, cols, generator=g).to(dtype)
    written = torch.zeros(cols, dtype=torch.bool)
    for o, w in zip(offsets, widths):
        written[o:o + w] = True
    out[:, :, ~written] = float("nan")  # never written
    none = slots.cpu() < 0
    out[none] = float("nan")  # tokens without an adapter: never written
    out = out.to(DEVICE)
    out0 = out.clone()
    inputs = [x, topk_ids, *L.lora_a, *L.lora_b, L.page_table, L.ranks, L.scales, slots]
    snap = [t.clone() for t in inputs]
    arg = make_slots_arg(slots.to(DEVICE), slots_form, T)
    got = add_lora_moe(out, x, topk_ids.to(DEVICE), L.lora_a, L.lora_b, L.page_table, L.ranks,
                       L.scales if use_scales else None, arg, topk_weights=weights,
                       slice_offsets=slice_offsets, backend=backend)
    assert got is out
    ref, ref_abs = oracle(L, x, topk_ids, slots, out0, weights, offsets, use_scales)
    got_c, out0_c = got.cpu(), out0.cpu()
    assert_bits_equal(got_c[:, :, ~written], out0_c[:, :, ~written], "columns outside every slice")
    assert_bits_equal(got_c[none], out0_c[none], "rows of tokens with slot -1")
    zero_rank = (~none) & (L.ranks.cpu().long()[slots.cpu().long().clamp(min=0)] == 0)
    assert_bits_equal(got_c[zero_rank], out0_c[zero_rank], "rows of tokens whose adapter has rank 0")
    live = ~none
    assert_close_lora(got_c[live][:, :, written], ref[live][:, :, written], ref_abs[live][:, :, written], dtype)
    for t, s in zip(inputs, snap):
        assert_bits_equal(t, s, "an input of the op")
    return got


def _x(g, T, topk, K, form, dtype, layout="contiguous"):
    shape = (T, K) if form == "shared" else (T, topk, K)
    if layout == "contiguous":
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    big = torch.randn(*shape[:-1], K + 9, generator=g).to(dtype).to(DEVICE)  # a column slice: strided rows
    return big[..., 4:4 + K]


# ------------------------------------------------------------------------------------------------ the op
def _matrix():
    out = []
    for backend in BACKENDS:
        dts = [torch.float64, torch.float32, torch.bfloat16] if backend == "torch" else \
            [torch.float32, torch.float16, torch.bfloat16]
        for dt in dts:
            for form in ("shared", "per_expert"):
                out.append((backend, dt, form))
    return out


@pytest.mark.parametrize("backend,dtype,form", _matrix())
def test_moe_op(backend, dtype, form, generator):
    """Mixed ranks (0, 1, 3, 20 > BLOCK_R, 16), -1 tokens, gate|up slices of unequal width, routed weights."""
    g = generator
    E, K, topk, T = 8, 40, 3, 10
    L = make_moe_lora(g, E=E, K=K, n_sizes=[24, 16], ranks=[3, 20, 0, 1, 16], dtype=dtype)
    ids, w = make_routing(g, T, topk, E)
    slots = torch.randint(-1, L.num_slots, (T,), generator=g, dtype=torch.int32)
    x = _x(g, T, topk, K, form, dtype)
    run(L, x, ids, slots, backend=backend, dtype=dtype, weights=w.to(DEVICE), g=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["no_weights", "no_scales", "weights_in_x_dtype", "int64_ids_plan",
                                     "static_plan", "offsets_with_gap", "strided_x", "one_token", "down_one_slice",
                                     "missing_experts_and_slices", "ranks_above_128"])
def test_moe_variants(backend, variant, generator):
    g = generator
    dtype = {"triton": torch.float16, "cuda": torch.bfloat16}.get(backend, torch.float32)
    E, K, topk, T = 6, 36, 2, 9
    n_sizes = [20] if variant == "down_one_slice" else [24, 12]
    kw = {}
    if variant == "missing_experts_and_slices":
        kw = dict(missing_expert_frac=0.4, missing_slices={(0, 1), (2, 0)})
    ranks = [5, 300, 129, 8] if variant == "ranks_above_128" else [5, 17, 2, 8]  # (cuda's limit: 512)
    L = make_moe_lora(g, E=E, K=K, n_sizes=n_sizes, ranks=ranks, dtype=dtype, **kw)
    if variant == "one_token":
        T = 1
    ids, w = make_routing(g, T, topk, E)
    slots = torch.randint(-1, L.num_slots, (T,), generator=g, dtype=torch.int32)
    if variant == "one_token":
        slots[0] = 1
    w = w.to(DEVICE)
    args = dict(backend=backend, dtype=dtype, weights=w, g=g)
    x = _x(g, T, topk, K, "shared" if T % 2 else "per_expert", dtype,
           layout="column_slice" if variant == "strided_x" else "contiguous")
    if variant == "no_weights":
        args["weights"] = None
    elif variant == "no_scales":
        args["use_scales"] = False
    elif variant == "weights_in_x_dtype":
        args["weights"] = w.to(dtype)
    elif variant == "int64_ids_plan":
        args["slots_form"] = "plan"
    elif variant == "static_plan":
        args["slots_form"] = "static"
    elif variant == "offsets_with_gap":
        args["slice_offsets"] = [30, 3]
        args["out_cols"] = 60
    if variant != "int64_ids_plan":
        ids = ids.to(torch.int32)
    run(L, x, ids, slots, **args)


def test_moe_large_torch(generator):
    """DESIGN scale: E=256, top-k=8, 2048 tokens, 32 adapters of mixed ranks (1..64), Zipf-skewed adapters and
    hot experts, 10% tokens without LoRA; float64 on the torch backend (the Triton interpreter is too slow here)."""
    g = generator
    E, K, topk, T = 256, 24, 8, 2048
    ranks = torch.randint(1, 65, (32,), generator=g).tolist()
    ranks[3] = 0
    L = make_moe_lora(g, E=E, K=K, n_sizes=[16, 16], ranks=ranks, dtype=torch.float64,
                      missing_expert_frac=0.1)
    ids, w = make_routing(g, T, topk, E, skew=True)
    slots = lorakern.workloads.make_slots("zipf:1.2", T, 32, none_frac=0.1, generator=g)
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    run(L, x.to(DEVICE), ids, slots, backend="torch", dtype=torch.float64, weights=w.to(DEVICE), g=g)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_moe_many_groups(backend, generator):
    """E=64, top-k=8, 24 tokens over 12 adapters — ~190 distinct (adapter, expert) groups, tiles of one and of
    several pairs (a hot adapter), ranks across rank tiles."""
    g = generator
    E, K, topk, T = 64, 32, 8, 24
    L = make_moe_lora(g, E=E, K=K, n_sizes=[16, 16], ranks=[1, 2, 4, 8, 16, 24, 3, 5, 7, 9, 11, 33],
                      dtype=torch.bfloat16)
    ids, w = make_routing(g, T, topk, E, skew=True)
    slots = torch.randint(-1, 12, (T,), generator=g, dtype=torch.int32)
    slots[:8] = 4  # one adapter with many pairs: tiles of several pairs of one expert
    x = _x(g, T, topk, K, "shared", torch.bfloat16)
    run(L, x, ids, slots, backend=backend, dtype=torch.bfloat16, weights=w.to(DEVICE), g=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_empty_and_no_lora(backend, generator):
    g = generator
    L = make_moe_lora(g, E=4, K=16, n_sizes=[8], ranks=[2, 3], dtype=torch.float32)
    for T in (0, 5):
        ids, w = make_routing(g, T, 2, 4)
        slots = torch.full((T,), -1, dtype=torch.int32)
        run(L, _x(g, T, 2, 16, "shared", torch.float32), ids, slots, backend=backend, dtype=torch.float32,
            weights=w.to(DEVICE), g=g)


def test_backends_agree_and_auto_runs(generator, monkeypatch):
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    g = generator
    L = make_moe_lora(g, E=5, K=24, n_sizes=[8, 8], ranks=[3, 6], dtype=torch.float32)
    ids, w = make_routing(g, 7, 2, 5)
    slots = torch.tensor([0, 1, -1, 1, 0, 0, 1], dtype=torch.int32, device=DEVICE)
    x = _x(g, 7, 2, 24, "shared", torch.float32)
    outs = {}
    for be in (*BACKENDS, "auto"):
        out = torch.zeros(7, 2, 16, device=DEVICE)
        add_lora_moe(out, x, ids.to(DEVICE), L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, slots,
                     topk_weights=w.to(DEVICE), backend=be)
        outs[be] = out.cpu()
    for be in BACKENDS[1:]:
        torch.testing.assert_close(outs[be], outs["torch"], rtol=1e-5, atol=1e-5)
    auto = lorakern.select_backend("auto", DEVICE, torch.float32, op="add_lora_moe")
    assert auto == BACKENDS[-1]  # the first that fits: cuda when it runs here, else triton
    torch.testing.assert_close(outs["auto"], outs[auto], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_changes_in_place_between_calls(backend, generator):
    """The Triton grouping is cached per (slots, topk_ids) object and version: an in-place change of either
    must be seen (as an engine refilling static buffers does)."""
    g = generator
    E, K, topk, T = 6, 20, 2, 8
    L = make_moe_lora(g, E=E, K=K, n_sizes=[12], ranks=[2, 5, 3], dtype=torch.float32)
    ids, w = make_routing(g, T, topk, E)
    ids = ids.to(DEVICE)
    slots = torch.randint(-1, 3, (T,), generator=g, dtype=torch.int32).to(DEVICE)
    x = _x(g, T, topk, K, "shared", torch.float32)
    for step in range(3):
        run_ids = ids.clone() if step == 0 else ids
        out = torch.randn(T, topk, 12, generator=g).to(DEVICE)
        out0 = out.clone()
        add_lora_moe(out, x, run_ids, L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, slots,
                     topk_weights=w.to(DEVICE), backend=backend)
        ref, ref_abs = oracle(L, x, ids, slots, out0, w, [0])
        live = slots.cpu() >= 0
        assert_close_lora(out.cpu()[live], ref[live], ref_abs[live], torch.float32)
        ids.copy_(make_routing(g, T, topk, E)[0])  # in place: new routing, same tensor object
        slots.copy_(torch.randint(-1, 3, (T,), generator=g, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode(backend, generator):
    """Under torch.inference_mode (how engines run), topk_ids and slots are inference tensors without a version
    counter: nothing is cached about them, and the result is the oracle's."""
    g = generator
    E, K, topk, T = 5, 24, 2, 7
    L = make_moe_lora(g, E=E, K=K, n_sizes=[8, 8], ranks=[3, 6, 2], dtype=torch.float32)
    ids0, w = make_routing(g, T, topk, E)
    slots0 = torch.tensor([0, 1, -1, 2, 1, 0, 2], dtype=torch.int32)
    x = _x(g, T, topk, K, "shared", torch.float32)
    out0 = torch.randn(T, topk, 16, generator=g).to(DEVICE)
    with torch.inference_mode():
        ids, slots, out = ids0.to(DEVICE).clone(), slots0.to(DEVICE).clone(), out0.clone()
        for _ in range(2):  # the second call must not trust anything cached about the first
            o = out.clone()
            add_lora_moe(o, x, ids, L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, slots,
                         topk_weights=w.to(DEVICE), backend=backend)
            ref, ref_abs = oracle(L, x, ids.cpu(), slots.cpu(), out0, w, [0, 8])
            live = slots.cpu() >= 0
            assert_close_lora(o.cpu()[live], ref[live], ref_abs[live], torch.float32)
            ids.copy_(make_routing(g, T, topk, E)[0])  # in place, no version counter to tell
            slots.copy_(torch.tensor([2, -1, 0, 1, 1, 2, 0], dtype=torch.int32))


# ------------------------------------------------------------------------------------------------ the pool
def test_pool_moe_rows_feed_the_op(generator):
    """AdapterPool MoE targets (packed [rows, E, K] views of its row buffer) straight into add_lora_moe, for
    adapters that lack some experts and projections; compared with the per-adapter oracle."""
    from lorakern.pool import AdapterPool, PoolLayout, TargetSpec, TensorAdapter

    g = generator
    E, H, I, topk, T = 4, 32, 16, 2, 10
    layout = PoolLayout(2, {}, moe_targets={"w13": TargetSpec(H, (I, I), num_experts=E),
                                            "w2": TargetSpec(I, (H,), num_experts=E)})
    pool = AdapterPool(layout, max_rows=32, max_slots=4, max_rank=8, dtype=torch.float32, device=DEVICE)
    specs = {"a": 3, "b": 8, "c": 1}
    weights = {}
    for name, r in specs.items():
        mods = {}
        for layer in range(2):
            for tgt, K, ns in (("w13", H, (I, I)), ("w2", I, (H,))):
                for sl, N in enumerate(ns):
                    if name == "c" and tgt == "w2":
                        continue  # c lacks the down projection
                    A = torch.randn(E, r, K, generator=g, dtype=torch.float64).float()
                    B = torch.randn(E, N, r, generator=g, dtype=torch.float64).float()
                    if name == "a":
                        A[1] = 0  # a lacks expert 1
                        B[1] = 0
                    mods[(layer, tgt, sl)] = (A, B)
        weights[name] = mods
        pool.register(name, TensorAdapter(mods, alpha=2 * r))
    ids, w = make_routing(g, T, topk, E)
    with pool.wave(["a", None, "b", "c"]) as req_slots:
        slots = req_slots[torch.tensor([0, 1, 2, 3, 0, 2, 2, 3, 1, 0], device=req_slots.device)]
        for layer in range(2):
            for tgt, K, ns in (("w13", H, (I, I)), ("w2", I, (H,))):
                a, b, pt, rk, sc = pool.args(layer, tgt)
                assert a[0].shape == (32, E, K) and not a[0].is_contiguous()
                x = torch.randn(T, K, generator=g).to(DEVICE) if tgt == "w13" else \
                    torch.randn(T, topk, K, generator=g).to(DEVICE)
                out = torch.randn(T, topk, sum(ns), generator=g).to(DEVICE)
                out0 = out.clone()
                for be in BACKENDS:
                    o = out.clone()
                    add_lora_moe(o, x, ids.to(DEVICE), a, b, pt, rk, sc, slots, topk_weights=w.to(DEVICE),
                                 backend=be)
                    # oracle from the per-adapter source weights
                    ref = out0.cpu().double().clone()
                    for t in range(T):
                        s = int(slots[t])
                        if s < 0:
                            continue
                        name = next(n for n in specs if pool.slot_of(n) == s)
                        r = specs[name]
                        off = 0
                        for sl, N in enumerate(ns):
                            if (layer, tgt, sl) in weights[name]:
                                A, B = weights[name][(layer, tgt, sl)]
                                for k in range(topk):
                                    e = int(ids[t, k])
                                    xv = (x[t] if x.dim() == 2 else x[t, k]).cpu().double()
                                    ref[t, k, off:off + N] += (2 * r / r) * float(w[t, k]) * (
                                        B[e].double() @ (A[e].double() @ xv))
                            off += N
                    torch.testing.assert_close(o.cpu().double(), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ errors
def _good(g, dtype=torch.float32):
    L = make_moe_lora(g, E=5, K=16, n_sizes=[8, 4], ranks=[3, 6, 2], dtype=dtype)
    ids, w = make_routing(g, 6, 2, 5)
    slots = torch.tensor([0, 1, -1, 2, 1, 0], dtype=torch.int32, device=DEVICE)
    x = torch.randn(6, 16, generator=g).to(dtype).to(DEVICE)
    out = torch.randn(6, 2, 12, generator=g).to(dtype).to(DEVICE)
    kw = dict(out=out, x=x, topk_ids=ids.to(DEVICE), lora_a=L.lora_a, lora_b=L.lora_b, page_table=L.page_table,
              ranks=L.ranks, scales=L.scales, slots=slots, topk_weights=w.to(DEVICE))
    return L, kw


def _call(kw, backend):
    k = dict(kw)
    return add_lora_moe(k.pop("out"), k.pop("x"), k.pop("topk_ids"), k.pop("lora_a"), k.pop("lora_b"),
                        k.pop("page_table"), k.pop("ranks"), k.pop("scales"), k.pop("slots"), backend=backend, **k)


def _bad(kind, L, kw):
    """(changed arguments, expected error)."""
    a, b, x, ids, out = L.lora_a, L.lora_b, kw["x"], kw["topk_ids"], kw["out"]
    T = x.shape[0]
    if kind == "x_int":
        return dict(x=x.to(torch.int32)), TypeError
    if kind == "x_4d":
        return dict(x=x[:, None, None]), ValueError
    if kind == "x_per_expert_wrong_topk":
        return dict(x=x[:, None].expand(T, 3, 16)), ValueError
    if kind == "out_dtype":
        return dict(out=out.to(torch.float16)), TypeError
    if kind == "out_2d":
        return dict(out=out[:, 0]), ValueError
    if kind == "out_wrong_topk":
        return dict(out=out[:, :1]), ValueError
    if kind == "out_too_narrow":
        return dict(out=out[:, :, :10]), ValueError
    if kind == "topk_ids_float":
        return dict(topk_ids=ids.float()), TypeError
    if kind == "topk_ids_1d":
        return dict(topk_ids=ids[:, 0]), ValueError
    if kind == "topk_ids_tokens":
        return dict(topk_ids=ids[:-1]), ValueError
    if kind == "expert_out_of_range":
        i = ids.clone()
        i[3, 1] = 5
        return dict(topk_ids=i), ValueError
    if kind == "expert_negative":
        i = ids.clone()
        i[2, 0] = -1
        return dict(topk_ids=i), ValueError
    if kind == "lora_a_dense_rows":
        return dict(lora_a=[t[:, 0] for t in a]), ValueError
    if kind == "lora_a_dtype":
        return dict(lora_a=[t.double() for t in a]), TypeError
    if kind == "lora_a_K":
        return dict(lora_a=[t[..., :-1] for t in a]), ValueError
    if kind == "experts_mismatch":
        return dict(lora_b=[t[:, :-1] for t in b]), ValueError
    if kind == "slice_count":
        return dict(lora_b=b[:1]), ValueError
    if kind == "rows_mismatch":
        return dict(lora_b=[t[:-1] for t in b]), ValueError
    if kind == "weights_shape":
        return dict(topk_weights=kw["topk_weights"][:, :1]), ValueError
    if kind == "weights_dtype":
        return dict(topk_weights=kw["topk_weights"].double()), TypeError
    if kind == "weights_int":
        return dict(topk_weights=ids), TypeError
    if kind == "slots_float":
        return dict(slots=kw["slots"].float()), TypeError
    if kind == "slots_shape":
        return dict(slots=kw["slots"][:-1]), ValueError
    if kind == "slot_out_of_range":
        s = kw["slots"].clone()
        s[0] = 3
        return dict(slots=s), ValueError
    if kind == "slot_below_minus_1":
        s = kw["slots"].clone()
        s[0] = -2
        return dict(slots=s), ValueError
    if kind == "row_out_of_range":
        pt = L.page_table.clone()
        pt[1, 0] = a[0].shape[0]
        return dict(page_table=pt), ValueError
    if kind == "rank_above_max_rank":
        rk = L.ranks.clone()
        rk[1] = L.page_table.shape[1] + 1
        return dict(ranks=rk), ValueError
    if kind == "page_table_int64":
        return dict(page_table=L.page_table.long()), TypeError
    if kind == "scales_fp16":
        return dict(scales=L.scales.half()), TypeError
    raise ValueError(kind)


BAD = ("x_int", "x_4d", "x_per_expert_wrong_topk", "out_dtype", "out_2d", "out_wrong_topk", "out_too_narrow",
       "topk_ids_float", "topk_ids_1d", "topk_ids_tokens", "expert_out_of_range", "expert_negative",
       "lora_a_dense_rows", "lora_a_dtype", "lora_a_K", "experts_mismatch", "slice_count", "rows_mismatch",
       "weights_shape", "weights_dtype", "weights_int", "slots_float", "slots_shape", "slot_out_of_range",
       "slot_below_minus_1", "row_out_of_range", "rank_above_max_rank", "page_table_int64", "scales_fp16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BAD)
def test_bad_input_raises_typed_error_before_writing(kind, backend, generator):
    L, kw = _good(generator)
    change, err = _bad(kind, L, kw)
    kw.update(change)
    before = kw["out"].clone()
    with pytest.raises(err) as info:
        _call(kw, backend)
    msg = str(info.value)
    arg = kind.split("_")[0]
    assert msg and (arg in msg or kind in ("expert_out_of_range", "expert_negative", "lora_a_dense_rows",
                                            "experts_mismatch", "slice_count", "rows_mismatch", "weights_int",
                                            "page_table_int64", "rank_above_max_rank", "row_out_of_range")), msg
    assert_bits_equal(kw["out"], before, f"out after a rejected call ({kind})")


def test_expert_error_names_topk_ids(generator):
    L, kw = _good(generator)
    i = kw["topk_ids"].clone()
    i[4, 1] = 9
    kw["topk_ids"] = i
    with pytest.raises(ValueError, match=r"topk_ids: expert id 9 at \[4, 1\].*E=5"):
        _call(kw, "torch")


def test_backend_errors(generator, monkeypatch):
    """Unknown backend → ValueError; float64 on cuda or triton → RuntimeError;
    auto with float64 → the torch backend; nothing written by a rejected call."""
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    L, kw = _good(generator, torch.float64)
    before = kw["out"].clone()
    with pytest.raises(ValueError, match="backend"):
        _call(kw, "bogus")
    with pytest.raises(RuntimeError, match="triton"):
        _call(kw, "triton")
    with pytest.raises(RuntimeError, match="cuda"):
        _call(kw, "cuda")
    assert_bits_equal(kw["out"], before, "out after rejected calls")
    _call(kw, "auto")
    assert not torch.equal(kw["out"], before)



# ------------------------------------------------------------------------------------------------ registration
def _op_args(backend, generator, slots_form="int32"):
    L, kw = _good(generator)
    arg = make_slots_arg(kw["slots"], slots_form, 6)
    s, info = moe_ops._plan_args(arg, backend, DEVICE)
    return (kw["out"], kw["x"], kw["topk_ids"], L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, s,
            kw["topk_weights"], [0, 8], info, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slots_form", ["int32", "plan"])
def test_opcheck(backend, slots_form, generator):
    torch.library.opcheck(torch.ops.lorakern.add_lora_moe.default, _op_args(backend, generator, slots_form))


def test_schema_declares_the_mutation():
    schema = torch.ops.lorakern.add_lora_moe.default._schema
    args = {a.name: a for a in schema.arguments}
    assert args["out"].alias_info is not None and args["out"].alias_info.is_write, str(schema)
    others = [a for a in schema.arguments if a.name != "out" and a.alias_info is not None]
    assert not any(a.alias_info.is_write for a in others), str(schema)
    assert len(schema.returns) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, generator):
    L, kw = _good(generator)
    plan = lorakern.LoRAPlan.from_slots(kw["slots"])

    def f(out, x, ids, w):
        return add_lora_moe(out, x, ids, L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, plan,
                            topk_weights=w, backend=backend)

    eager = f(kw["out"].clone(), kw["x"], kw["topk_ids"], kw["topk_weights"])
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(kw["out"].clone(), kw["x"], kw["topk_ids"],
                                                                      kw["topk_weights"])
    assert_bits_equal(compiled, eager, "compiled vs eager")


# ------------------------------------------------------------------------------------------------ grouping
def test_group_pairs_tiles_cover_every_lora_pair_once(generator):
    g = generator
    T, topk, E, S = 40, 4, 8, 5
    ids, _ = make_routing(g, T, topk, E, skew=True)
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    slots[:20] = 2  # a long group: several tiles of one (slot, expert)
    pair_ids, tiles, num_tiles, n_max = moe_triton.group_pairs(slots, ids, E, S, 16)
    n = int(num_tiles)
    assert n <= n_max == tiles.shape[0]
    seen = []
    for st, ln, key in tiles[:n].tolist():
        assert 1 <= ln <= 16
        ps = pair_ids[st:st + ln].long()
        t, k = ps // topk, ps % topk
        assert (slots[t].long() * E + ids[t, k] == key).all()
        seen += ps.tolist()
    assert (tiles[n:, 1] == 0).all()
    want = [p for p in range(T * topk) if slots[p // topk] >= 0]
    assert sorted(seen) == want


def test_group_pairs_orders_tiles_by_work_given_ranks(generator):
    """With the slots' ranks, the same tiles, used ones first in descending rank x pairs (stable). The cache (per
    slots and topk_ids) tells a grouping with ranks from one without, not one ranks tensor from another: the order
    is a schedule, and the ops pass a fresh copy of strided ranks on every call."""
    g = generator
    T, topk, E, S = 60, 4, 8, 5
    ids, _ = make_routing(g, T, topk, E, skew=True)
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    slots[:24] = 2  # a long group: full tiles and a partial one
    ranks = torch.tensor([16, 1, 4, 64, 0], dtype=torch.int32)
    plain = moe_triton.group_pairs(slots, ids, E, S, 16)
    for r in (ranks, ranks.clone().fill_(8)):
        ids = ids.clone()  # (a new routing tensor: a new grouping)
        pair_ids, tiles, num_tiles, n_max = moe_triton.group_pairs(slots, ids, E, S, 16, r)
        n = int(num_tiles)
        assert torch.equal(pair_ids, plain[0]) and n == int(plain[2]) and n_max == plain[3]
        assert sorted(map(tuple, tiles[:n].tolist())) == sorted(map(tuple, plain[1][:n].tolist()))
        assert (tiles[n:, 1] == 0).all()
        work = [r[k // E].item() * ln for _, ln, k in tiles[:n].tolist()]
        assert work == sorted(work, reverse=True)
        # stable: tiles of equal work keep their order in the plain list
        pos = {tuple(t): i for i, t in enumerate(plain[1][:n].tolist())}
        for a, b in zip(tiles[:n].tolist(), tiles[1:n].tolist()):
            if r[a[2] // E] * a[1] == r[b[2] // E] * b[1]:
                assert pos[tuple(a)] < pos[tuple(b)]
    ids = ids.clone()
    ranked = moe_triton.group_pairs(slots, ids, E, S, 16, ranks)
    assert not torch.equal(ranked[1], plain[1]) and moe_triton.group_pairs(slots, ids, E, S, 16)[1] is not ranked[1]
    assert moe_triton.group_pairs(slots, ids, E, S, 16, ranks.clone())[1] is ranked[1]  # another ranks object: cached
    slots2 = slots.clone()
    ranks[2] = 128  # the long group's tiles come first in the next batch's grouping
    after = moe_triton.group_pairs(slots2, ids, E, S, 16, ranks)[1]
    assert after[0, 2].item() // E == 2


def test_group_pairs_reuses_a_grouping_once_and_never_across_an_unversioned_rewrite(generator):
    """The grouping is kept for one more call with the same tensors (a layer's gate_up then down), then dropped: a
    CUDA-graph replay rewrites a routing buffer in place without bumping its version counter, and the next batch
    must not get the previous batch's grouping (the wrong experts' adapters). The rewrite is emulated on the CPU
    through a numpy alias of the buffer, which writes it without touching the version counter."""
    g = generator
    T, topk, E, S = 40, 2, 8, 4
    ids, _ = make_routing(g, T, topk, E, skew=False)
    ids = ids.to(torch.int64).contiguous()
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    first = moe_triton.group_pairs(slots, ids, E, S, 16)
    assert moe_triton.group_pairs(slots, ids, E, S, 16)[1] is first[1]  # the second call: reused
    third = moe_triton.group_pairs(slots, ids, E, S, 16)  # (the next layer's gate_up, say)
    assert third[1] is not first[1] and torch.equal(third[1], first[1])  # consumed: recomputed, same grouping
    assert moe_triton.group_pairs(slots, ids, E, S, 16)[1] is third[1]  # its down: reused, consumed
    # a replay-like rewrite between batches: same object, same version, other routing
    ver, old = ids._version, ids.clone()
    new_ids, _ = make_routing(g, T, topk, E, skew=True)
    ids.numpy()[:] = new_ids.numpy()
    assert ids._version == ver and not torch.equal(ids, old)
    got = moe_triton.group_pairs(slots, ids, E, S, 16)
    want = moe_triton.group_pairs(slots, ids.clone(), E, S, 16)
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    assert not torch.equal(got[1], third[1])  # (the routing really changed the grouping)
    # ids nothing rewrites (the MLA ops' head ids): kept for every call with the same objects, as a plan is
    heads = torch.arange(topk, dtype=torch.int32).expand(T, topk)
    kept = moe_triton.group_pairs(slots, heads, E, S, 16, constant_ids=True)
    for _ in range(3):
        assert moe_triton.group_pairs(slots, heads, E, S, 16, constant_ids=True)[1] is kept[1]
    slots.add_(0)  # a new version of the slots: a new grouping
    assert moe_triton.group_pairs(slots, heads, E, S, 16, constant_ids=True)[1] is not kept[1]


@pytest.mark.skipif(not CUDA_RUNS, reason="the cuda backend does not run here")
def test_cuda_launches_do_not_depend_on_routing_or_mix(generator, monkeypatch):
    """What a CUDA graph needs from the cuda backend's MoE launch: with a static plan, grid, kernel variant
    (pairs per pass, vector width), sizes and strides are the same for any routing and adapter mix (the tile and
    pair buffers are made by the grouping inside the call, so a captured graph replays their allocation)."""
    from lorakern import cuda_backend

    log = []
    real = cuda_backend._call
    monkeypatch.setattr(cuda_backend, "_call", lambda *a, **f: log.append((a, f)) or real(*a, **f))
    g = generator
    E, topk, T, K, ns = 12, 3, 20, 32, [16, 16]
    L = make_moe_lora(g, E=E, K=K, n_sizes=ns, ranks=[1, 4, 16, 24, 8, 2], dtype=torch.bfloat16)
    x = torch.randn(T, K, generator=g).to(torch.bfloat16).to(DEVICE)
    plan = lorakern.LoRAPlan.static(T, DEVICE)
    out = torch.zeros(T, topk, sum(ns), dtype=torch.bfloat16, device=DEVICE)
    launches = []
    for mix in range(3):
        ids, w = make_routing(g, T, topk, E, skew=mix == 1)
        slots = (torch.zeros(T, dtype=torch.int32) if mix == 0 else
                 torch.randint(-1, 6, (T,), generator=g, dtype=torch.int32)).to(DEVICE)
        plan.update(slots)
        log.clear()
        add_lora_moe(out, x, ids.to(DEVICE), L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, plan,
                     topk_weights=w.to(DEVICE), backend="cuda")
        (args, fields), = log
        launches.append((args, {k: v for k, v in fields.items() if k not in ("tiles", "token_ids", "topk_w")}))
    assert launches[0] == launches[1] == launches[2]


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["shared", "per_expert"])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_qwen3_moe_shapes_gpu(backend, dtype, form, generator):
    """Qwen3-30B-A3B expert shapes (E=128, top-8, hidden 2048, moe_intermediate 768), 64 tokens, 16 adapters of
    mixed ranks, compiled kernels vs the float64 oracle."""
    g = generator
    E, topk, T = 128, 8, 64
    K, ns = (2048, [768, 768]) if form == "shared" else (768, [2048])
    L = make_moe_lora(g, E=E, K=K, n_sizes=ns, ranks=[1, 8, 16, 32, 64, 4, 2, 16] * 2, dtype=dtype)
    ids, w = make_routing(g, T, topk, E)
    slots = torch.randint(-1, 16, (T,), generator=g, dtype=torch.int32)
    run(L, _x(g, T, topk, K, form, dtype), ids, slots, backend=backend, dtype=dtype, weights=w.to(DEVICE), g=g)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_another_routing_and_mix_gpu(backend, generator, monkeypatch):
    """Captured once with one routing and adapter mix, replayed with others (more adapters, other experts):
    every replay matches the eager result (the torch backend's eager call in the static form it takes in a capture,
    so that the two are the same ops, bit for bit)."""
    if backend == "torch":
        monkeypatch.setenv("LORAKERN_TORCH_PATH", "static")
    g = generator
    E, topk, T, K, ns = 32, 4, 48, 256, [128, 128]
    L = make_moe_lora(g, E=E, K=K, n_sizes=ns, ranks=[1, 4, 16, 24, 8, 2], dtype=torch.bfloat16)
    x = torch.randn(T, K, generator=g).to(torch.bfloat16).cuda()
    ids_buf = torch.zeros(T, topk, dtype=torch.int64, device="cuda")
    w_buf = torch.zeros(T, topk, device="cuda")
    plan = lorakern.LoRAPlan.static(T, "cuda")
    out = torch.zeros(T, topk, sum(ns), dtype=torch.bfloat16, device="cuda")

    def step():
        out.zero_()
        add_lora_moe(out, x, ids_buf, L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, plan,
                     topk_weights=w_buf, backend=backend)

    ids, w = make_routing(g, T, topk, E)
    ids_buf.copy_(ids)
    w_buf.copy_(w)
    plan.update(torch.zeros(T, dtype=torch.int32, device="cuda"))
    step()  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mix in range(3):
        ids, w = make_routing(g, T, topk, E, skew=mix == 1)
        slots = torch.randint(-1, 6, (T,), generator=g, dtype=torch.int32).cuda()
        ids_buf.copy_(ids)
        w_buf.copy_(w)
        plan.update(slots)
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        eager = torch.zeros_like(out)
        add_lora_moe(eager, x, ids.cuda(), L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, slots,
                     topk_weights=w.cuda(), backend=backend)
        assert_bits_equal(got, eager, f"replay {mix} vs eager")




class _SmallMoE:
    """A small add_lora_moe call (10 tokens, top-2 of 6 experts, 4 slots, slices 24 + 16) whose pool metadata,
    slots and x each test may replace: ``run(...)`` returns the result on a copy of one random ``out``."""

    def __init__(self, g, backend, ranks, K=32, x_per_expert=False):
        self.backend = backend
        self.dtype = torch.bfloat16 if backend == "cuda" else torch.float16
        self.L = make_moe_lora(g, E=6, K=K, n_sizes=[24, 16], ranks=ranks, dtype=self.dtype)
        ids, w = make_routing(g, 10, 2, 6)
        self.ids, self.w = ids.to(DEVICE), w.to(DEVICE)
        self.slots = torch.randint(0, 4, (10,), generator=g, dtype=torch.int32).to(DEVICE)
        shape = (10, 2, K) if x_per_expert else (10, K)
        self.x = torch.randn(*shape, generator=g).to(self.dtype).to(DEVICE)
        self.out0 = torch.randn(10, 2, 40, generator=g).to(self.dtype).to(DEVICE)

    def run(self, page_table=None, ranks=None, scales=None, slots=None, out=None, x=None):
        L = self.L
        out = self.out0.clone() if out is None else out
        return add_lora_moe(out, self.x if x is None else x, self.ids, L.lora_a, L.lora_b,
                            L.page_table if page_table is None else page_table, L.ranks if ranks is None else ranks,
                            L.scales if scales is None else scales, self.slots if slots is None else slots,
                            topk_weights=self.w, backend=self.backend)


def _unchecked(monkeypatch):
    """Switch the value checks off by their own capture switch: what a CUDA-graph replay sees."""
    from lorakern.ops import _validate

    monkeypatch.setattr(_validate, "_capturing", lambda device: True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_rank_above_max_rank_computes_at_max_rank(backend, generator, monkeypatch):
    """As for add_lora (test_ops_lora): a rank above the page table's width, which only a CUDA-graph replay can
    bring (the value checks are skipped there), computes at max_rank: the same bits as the rank at max_rank."""
    m = _SmallMoE(generator, backend, ranks=[5, 17, 2, 17])
    assert m.L.page_table.shape[1] == 17
    want = m.run()
    bad_ranks = m.L.ranks.clone()
    bad_ranks[1], bad_ranks[3] = 10**6, 18
    _unchecked(monkeypatch)
    assert_bits_equal(m.run(ranks=bad_ranks).cpu(), want.cpu(), "the result at ranks capped to max_rank")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_strided_page_table_ranks_and_scales(backend, generator):
    """Strided views of the pool's metadata (a column-major page table, ranks and scales as record columns) give
    the same bits as contiguous ones."""
    m = _SmallMoE(generator, backend, ranks=[5, 17, 2, 9])
    m.slots[[1, 6]] = -1
    L = m.L
    pt_s = L.page_table.t().contiguous().t()
    rk_s = torch.stack([L.ranks, L.ranks + 1], 1)[:, 0]
    sc_s = torch.stack([L.scales, L.scales + 1], 1)[:, 0]
    assert_bits_equal(m.run(pt_s, rk_s, sc_s).cpu(), m.run().cpu(), "the result with strided metadata")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_out_that_is_x(backend, generator):
    """add_lora_moe(x, x, ...) with per-expert x [T, topk, K] and K = N: the x of before the call is used (the op
    copies an x that shares memory with out), the same bits as with separate buffers."""
    m = _SmallMoE(generator, backend, ranks=[5, 17, 2, 9], K=40, x_per_expert=True)
    want = m.run(out=m.x.clone())
    same = m.x.clone()
    m.run(out=same, x=same)
    assert_bits_equal(same.cpu(), want.cpu(), "add_lora_moe(x, x)")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_out_of_range_slots_and_rows_stay_in_bounds(backend, generator, monkeypatch):
    """As for add_lora (test_ops_lora): unchecked slots >= num_slots act as -1 and out-of-range page-table entries
    read row 0, the same bits as a checked call with those values."""
    m = _SmallMoE(generator, backend, ranks=[5, 17, 2, 9])
    m.slots.copy_(torch.tensor([0, 1, 2, 3, 1, 0, 2, 3, 1, 1], dtype=torch.int32))
    good_pt, bad_pt = m.L.page_table.clone(), m.L.page_table.clone()
    good_pt[1, 4], bad_pt[1, 4] = 0, 10**9
    good_pt[3, 0], bad_pt[3, 0] = 0, -3
    good_slots, bad_slots = m.slots.clone(), m.slots.clone()
    good_slots[[2, 5]], bad_slots[[2, 5]] = -1, 99
    want = m.run(page_table=good_pt, slots=good_slots)
    _unchecked(monkeypatch)
    got = m.run(page_table=bad_pt, slots=bad_slots)
    assert_bits_equal(got.cpu(), want.cpu(), "the result with out-of-range slots and rows")
