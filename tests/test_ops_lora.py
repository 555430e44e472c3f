"""lorakern.ops.add_lora / lora_shrink / lora_expand against the float64 oracle on the adversarial cases of
DESIGN.md §6, for every backend (the Triton backend once per forced code path) and dtype.

Every case is random (seeded from the test id), outputs are poisoned before the call (random values for the
accumulating ops, NaN for lora_shrink's ``out=``) and every element is checked (see conftest.run_case).

Runtime budget: the Triton interpreter costs milliseconds of Python per program, so on the CPU the Triton
variants run every dtype on a core set of cases (CORE) and one dtype per (case, op, path) elsewhere, rotating so
that each dtype meets each op and path; the torch backend (and every backend on a GPU) runs the full matrix.
The cuda backend on the CPU emulator runs the full matrix too, except the 2,048-adapter case on its forced
segment path (2,048 one-token blocks of 256 emulated threads): add_lora in fp16 only.
"""

import pytest
import torch

import lorakern
from conftest import (BACKEND_LIST, CUDA_RUNS, DEVICE, DTYPES, HAS_CUDA, IMPLS, assert_bits_equal, check_accumulated,
                      check_shrink, make_case, oracle_add, oracle_shrink, random_out, run_case, set_impl)
from lorakern.workloads import MIXES, make_lora, make_slots

SMALL = dict(K=48, n_sizes=[40], ranks="1-24", num_adapters=6, mix="uniform")

CASES = {
    # ranks 1..128 in one batch, rank 1 and 128 included
    "ranks_1_to_128": dict(T=48, K=64, n_sizes=[40], ranks=[1, 128, 5, 64, 17, 33, 2, 100], num_adapters=8),
    # page table wider than any rank: work must follow the real rank, not max_rank
    "max_rank_128_ranks_le_8": dict(T=40, K=64, n_sizes=[40], ranks="1-8", max_rank=128, num_adapters=6),
    "none_frac_0.3": dict(T=40, **{**SMALL, "ranks": "1-16"}, none_frac=0.3),
    "all_tokens_none": dict(T=24, **SMALL, none_frac=1.0),
    "T0": dict(T=0, **SMALL),
    "T1": dict(T=1, **SMALL),
    "K100_N72": dict(T=33, K=100, n_sizes=[72], ranks="1-24", num_adapters=5),
    "slices_72_40_24": dict(T=40, K=64, n_sizes=[72, 40, 24], ranks="1-20", num_adapters=5, mix="zipf:1.5"),
    # three slices at max_rank 128 (the cuda fused segment kernel: slices in groups by the tile's rank, its
    # shallowest ring configuration, (4, 2) on a 227 KB device; K = 320: 5 K steps, past the 4-deep ring)
    "slices_3_rank_128": dict(T=70, K=320, n_sizes=[40, 24, 16], ranks=[1, 128, 77, 100], num_adapters=4,
                              mix="zipf:1.5"),
    # four slices at max_rank 64 (the fused kernel's (4, 3) ring configuration on a 227 KB device; 7 K steps, past
    # the 6-deep ring of (6, 3))
    "slices_4_rank_64": dict(T=70, K=448, n_sizes=[40, 24, 16, 8], ranks=[64, 3, 40, 17], num_adapters=4,
                             mix="zipf:1.5", none_frac=0.1),
    # ranks beyond 128, up to the cuda backend's limit (512, vLLM's largest max_lora_rank)
    "ranks_to_512": dict(T=48, K=64, n_sizes=[40], ranks=[1, 512, 300, 129, 256, 7], num_adapters=6),
    # two slices at max_rank 192 (the cuda fused segment kernel in groups of 224 columns: one slice of a rank-192
    # tile, both of a rank-33 one)
    "slices_2_rank_192": dict(T=70, K=64, n_sizes=[40, 24], ranks=[192, 1, 150, 33], num_adapters=4,
                              mix="zipf:1.5"),
    # explicit offsets, out of order, with gaps between slices and at the end
    "slice_offsets_gaps": dict(T=40, K=48, n_sizes=[72, 40, 24], ranks="1-20", num_adapters=5,
                               slice_offsets=[60, 0, 140], out_cols=170, none_frac=0.2),
    "x_column_slice": dict(T=40, K=100, n_sizes=[72], ranks="1-24", num_adapters=5, x_layout="column_slice"),
    "x_transposed": dict(T=40, K=64, n_sizes=[40, 24], ranks="1-24", num_adapters=5, x_layout="transposed"),
    "out_column_slice": dict(T=40, **SMALL, out_layout="column_slice", none_frac=0.2),
    **{f"mix_{m}": dict(T=64, K=64, n_sizes=[48], ranks="1-32", num_adapters=64 if m == "distinct" else 12,
                        mix=m, none_frac=0.1) for m in MIXES},
    "rank0_adapters": dict(T=40, K=48, n_sizes=[40], ranks=[0, 4, 0, 9, 1, 0], num_adapters=6, none_frac=0.2),
    "all_rank0": dict(T=16, K=32, n_sizes=[24], ranks=0, max_rank=4, num_adapters=3),
    # a page table 0 wide (a pool of rank-0 adapters): nothing to add, on every path
    "max_rank_0": dict(T=70, K=32, n_sizes=[24], ranks=0, max_rank=0, num_adapters=3),
    "scales_none": dict(T=40, K=48, n_sizes=[24, 40], ranks="1-16", num_adapters=5, scales=False),
    "slots_int64": dict(T=40, **SMALL, slots_form="int64", none_frac=0.2),
    "slots_plan": dict(T=40, **SMALL, slots_form="plan", none_frac=0.2),
    "slots_static_plan": dict(T=40, **SMALL, slots_form="static", none_frac=0.2),
    # static plan for 48 tokens, updated with 40: the last 8 run as -1
    "slots_static_plan_padded": dict(T=48, **SMALL, slots_form="static", static_pad=8),
    # long K over few tiles: the cuda segment path splits K over CTAs (atomic adds into y)
    "K1024_split_k": dict(T=70, K=1024, n_sizes=[64, 32], ranks=[80, 3, 64, 17], num_adapters=4, mix="zipf:1.5",
                          none_frac=0.1),
    # thousands of distinct adapters in one batch
    "adapters_2048": dict(T=2048, K=32, n_sizes=[24], ranks="1-4", num_adapters=2048, mix="distinct"),
}
BIG = "adapters_2048"
CORE = ("ranks_1_to_128", "slices_72_40_24", "slice_offsets_gaps", "none_frac_0.3", "K100_N72")
OPS = ("add_lora", "lora_shrink", "lora_expand", "composite")

_INTERP = not HAS_CUDA


def _dname(dt):
    return str(dt).replace("torch.", "")


def _matrix(op):
    """(case, dtype, impl) params for ``op``, trimmed for the CPU interpreters as the module docstring says."""
    params = []
    for ci, name in enumerate(CASES):
        for pi, impl in enumerate(IMPLS):
            interp_triton = _INTERP and impl.startswith("triton")
            if impl == "cuda-fused" and op in ("lora_shrink", "lora_expand"):
                dts = []  # the fused kernel is add_lora's only
            elif name == BIG and _INTERP and impl in ("cuda-segment", "cuda-fused"):
                # on the CPU emulator: 2048 one-token 64-token tiles, each a full block of 256 fibers
                dts = [torch.float16] if op == "add_lora" else []
            elif name == BIG and interp_triton:
                # the interpreter runs one program per adapter (~10 ms each): one op, one path, one dtype
                dts = [torch.float16] if (op == "add_lora" and impl == "triton-gather") else []
            elif interp_triton and (name not in CORE or op == "composite"):
                dts = [DTYPES[(ci + OPS.index(op) + pi) % len(DTYPES)]]
            else:
                dts = list(DTYPES)
            for dt in dts:
                params.append(pytest.param(name, dt, impl, id=f"{impl}-{name}-{_dname(dt)}"))
    return params


def _case(name, dtype, generator):
    return make_case(generator, dtype=dtype, device=DEVICE, **CASES[name])


@pytest.mark.parametrize("name,dtype,impl", _matrix("add_lora"))
def test_add_lora(name, dtype, impl, generator, monkeypatch):
    backend = set_impl(impl, monkeypatch)
    run_case("add_lora", backend, _case(name, dtype, generator), generator)


@pytest.mark.parametrize("name,dtype,impl", _matrix("lora_shrink"))
def test_lora_shrink(name, dtype, impl, generator, monkeypatch):
    backend = set_impl(impl, monkeypatch)
    run_case("lora_shrink", backend, _case(name, dtype, generator), generator)


@pytest.mark.parametrize("name,dtype,impl", _matrix("lora_expand"))
def test_lora_expand(name, dtype, impl, generator, monkeypatch):
    backend = set_impl(impl, monkeypatch)
    run_case("lora_expand", backend, _case(name, dtype, generator), generator)


@pytest.mark.parametrize("name,dtype,impl", _matrix("composite"))
def test_add_lora_equals_expand_of_shrink(name, dtype, impl, generator, monkeypatch):
    """add_lora(out) and lora_expand(out, lora_shrink(x)) both match the oracle, hence each other."""
    backend = set_impl(impl, monkeypatch)
    case = _case(name, dtype, generator)
    L = case.lora
    out_fused, _, _ = random_out(case, generator)
    out0 = out_fused.clone()
    out_split = out0.clone()
    lorakern.ops.add_lora(out_fused, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales,
                          case.slots_arg, slice_offsets=case.slice_offsets, backend=backend)
    y = torch.full((case.S, case.T, L.max_rank), float("nan"), device=DEVICE)
    lorakern.ops.lora_shrink(case.x, L.lora_a, L.page_table, L.ranks, case.slots_arg, out=y, backend=backend)
    check_shrink(case, y, *oracle_shrink(case))
    lorakern.ops.lora_expand(out_split, y, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                             slice_offsets=case.slice_offsets, backend=backend)
    ref, ref_abs = oracle_add(case, out0)
    check_accumulated(case, out_fused, out0, ref, ref_abs, "add_lora")
    check_accumulated(case, out_split, out0, ref, ref_abs, "lora_expand(lora_shrink)")


# ------------------------------------------------------------------------------------------------ details
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_shrink_allocates_when_out_is_none(impl, generator, monkeypatch):
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=24, K=40, n_sizes=[16, 8], ranks=[3, 17, 1], num_adapters=3, none_frac=0.25,
                     dtype=torch.float16)
    L = case.lora
    y = lorakern.ops.lora_shrink(case.x, L.lora_a, L.page_table, L.ranks, case.slots_arg, backend=backend)
    check_shrink(case, y, *oracle_shrink(case))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)  # the tensor-core paths are fp16 / bf16 only
def test_lora_expand_reads_y_only_below_rank(impl, dtype, generator, monkeypatch):
    """lora_expand uses ``y[i, t, :rank]`` of LoRA tokens only: NaN elsewhere in ``y`` must not leak into ``out``."""
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=40, K=32, n_sizes=[40, 24], ranks=[0, 3, 17, 1, 30], max_rank=32,
                     num_adapters=5, none_frac=0.25, dtype=dtype)
    L = case.lora
    y = torch.randn(case.S, case.T, L.max_rank, generator=generator)
    slots = case.slots.cpu().long()
    rank_tok = torch.where(slots >= 0, L.ranks.cpu().long()[slots.clamp(min=0)], torch.zeros_like(slots))
    dead = torch.arange(L.max_rank)[None, :] >= rank_tok[:, None]
    y[:, dead] = float("nan")
    assert bool(torch.isnan(y).any())
    y = y.to(DEVICE)
    y_clean = torch.where(torch.isnan(y), torch.zeros_like(y), y)
    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    lorakern.ops.lora_expand(out, y, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                             backend=backend)
    check_accumulated(case, out, out0, *oracle_add(case, out0, y_clean))


@pytest.mark.parametrize("impl", IMPLS)
def test_static_plan_refilled_with_another_mix(impl, generator, monkeypatch):
    """One static plan, refilled in place with a second mix that has more distinct adapters and other ranks
    (another pool, wider page table), is reused without rebuilding by all three ops."""
    backend = set_impl(impl, monkeypatch)
    dtype = torch.float16
    T = 48
    plan = lorakern.LoRAPlan.static(T, DEVICE)
    buffers = [plan.slots, plan.token_ids, plan.seg_starts, plan.seg_slots, plan.counts, plan.num_segments,
               plan.tiles(16), plan.tiles(64)]
    ptrs = [b.data_ptr() for b in buffers]
    # mix 1: three adapters of low rank, 44 of 48 tokens
    pool1 = make_lora(3, 64, [40, 24], [2, 5, 8], dtype=dtype, device=DEVICE, generator=generator)
    s1 = make_slots("skewed", T - 4, 3, none_frac=0.1, generator=generator, device=DEVICE)
    # mix 2: 30 adapters with ranks up to 128, 40 tokens
    pool2 = make_lora(30, 64, [40, 24], [128, 1, 64, 7, 33, 100, 16, 3], dtype=dtype, device=DEVICE,
                      generator=generator)
    s2 = make_slots("distinct", T - 8, 30, none_frac=0.1, generator=generator, device=DEVICE)
    pad = lambda s: torch.cat([s, torch.full((T - s.numel(),), -1, dtype=torch.int32, device=DEVICE)])  # noqa: E731
    for pool, s in ((pool1, s1), (pool2, s2), (pool1, s1)):
        plan.update(s)
        case = make_case(generator, T=T, K=64, n_sizes=[40, 24], ranks=None, num_adapters=pool.num_slots,
                         dtype=dtype, lora=pool, slots=pad(s))
        case.slots_arg = plan
        run_case("add_lora", backend, case, generator)
        if pool is pool2:
            y = run_case("lora_shrink", backend, case, generator)
            run_case("lora_expand", backend, case, generator, y=y)
    assert [b.data_ptr() for b in buffers] == ptrs
    assert len(torch.unique(s2[s2 >= 0])) > len(torch.unique(s1[s1 >= 0]))


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_intermediate_beyond_fp16_range(impl, generator, monkeypatch):
    """fp16 with a rank intermediate |y| up to ~1e5 (> 65504, the fp16 maximum) and a small B, so the result is
    well inside fp16: the float32 intermediate must never pass through fp16 unscaled (the tensor-core expand feeds
    it as fp16 terms), on every path."""
    backend = set_impl(impl, monkeypatch)
    dt = torch.float16
    case = make_case(generator, T=70, K=64, n_sizes=[48, 32], ranks=[16, 5, 70], num_adapters=3, mix="skewed",
                     none_frac=0.1, dtype=dt)
    L = case.lora
    case.x.mul_(1000)
    for a in L.lora_a:
        a.mul_(10)
    for b in L.lora_b:
        b.mul_(1e-3)
    y = run_case("lora_shrink", backend, case, generator)
    assert float(y.abs().max()) > 65504
    run_case("add_lora", backend, case, generator)
    # y growing along the rank (x 8 every 32 ranks, up to ~1e6): a scale chosen on the first ranks must grow
    grow = 8.0 ** (torch.arange(L.max_rank) // 32)
    y = torch.randn(case.S, case.T, L.max_rank, generator=generator) * 1e4 * grow
    run_case("lora_expand", backend, case, generator, y=y.to(DEVICE))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the previous test runs this path natively")
@pytest.mark.parametrize("impl", ["triton-gather", "triton-segment"])
def test_fp16_split_path_of_triton_on_the_interpreter(impl, generator, monkeypatch):
    """The interpreter upcasts every dot, so the GPU's fp16 path (the float32 y fed to the tensor cores as two
    scaled fp16 terms) is forced here: the previous test, with the Triton kernels' native fp16 dots."""
    from lorakern.triton import lora as tl_lora, mla as tl_mla, moe as tl_moe

    flags = tl_lora._flags

    def native_fp16(dtype):
        return (False, False) if dtype == torch.float16 else flags(dtype)

    for mod in (tl_lora, tl_mla, tl_moe):
        monkeypatch.setattr(mod, "_flags", native_fp16)
    test_fp16_intermediate_beyond_fp16_range(impl, generator, monkeypatch)


class _LaunchRecorder:
    """Stands in for the compiled extension: records every launch (its packed fields) and forwards it."""

    def __init__(self, ext, log):
        self.ext, self.log = ext, log

    def dense_gather(self, fields, *args):
        self.log.append(("gather", list(fields), args))
        return self.ext.dense_gather(fields, *args)

    def dense_segment(self, fields, *args):
        self.log.append(("segment", list(fields), args))
        return self.ext.dense_segment(fields, *args)

    def __getattr__(self, name):  # queries (segment_fused_smem, ...) go to the extension unrecorded
        return getattr(self.ext, name)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i.startswith("cuda")])
def test_static_plan_launches_are_replayable(impl, generator, monkeypatch):
    """What a CUDA graph needs from the cuda backend, checked without capturing one: with a static plan and a
    fixed pool, every launch (pointers, sizes, grid, kernel variant) is the same whatever the mix and the
    adapters loaded, so a replay of the first call's launches computes the second mix correctly. Mix 1: one
    adapter of rank 2; mix 2: 30 distinct adapters of ranks 1..128 written into the same pool tensors."""
    from lorakern import cuda_backend
    from lorakern.reference import add_lora as ref_add_lora

    backend = set_impl(impl, monkeypatch)
    log = []
    real_ext = cuda_backend._ext
    monkeypatch.setattr(cuda_backend, "_ext", lambda device: _LaunchRecorder(real_ext(device), log))
    T, K, ns, dtype = 48, 64, [40, 24], torch.float16
    r2 = [128, 1, 64, 7, 33, 100, 16, 3]
    total2 = sum(r2[i % len(r2)] for i in range(30))
    pool = make_lora(30, K, ns, [2], max_rank=128, spare_rows=total2 - 60 + 3, dtype=dtype, device=DEVICE,
                     generator=generator)
    pool2 = make_lora(30, K, ns, r2, max_rank=128, dtype=dtype, device=DEVICE, generator=generator)
    plan = lorakern.LoRAPlan.static(T, DEVICE)
    x = torch.empty(T, K, dtype=dtype, device=DEVICE)
    out = torch.empty(T, sum(ns), dtype=dtype, device=DEVICE)
    y = torch.empty(len(ns), T, 128, dtype=torch.float32, device=DEVICE)
    mixes = [make_slots("identical", T, 1, generator=generator, device=DEVICE),
             make_slots("distinct", T - 6, 30, none_frac=0.1, generator=generator, device=DEVICE)]
    y_field = cuda_backend._DENSE_FIELDS.index("y")
    launches = []
    for round_, s in enumerate(mixes):
        if round_ == 1:  # other adapters loaded into the same pool tensors
            for dst, src in zip([*pool.lora_a, *pool.lora_b, pool.page_table, pool.ranks, pool.scales],
                                [*pool2.lora_a, *pool2.lora_b, pool2.page_table, pool2.ranks, pool2.scales]):
                dst.copy_(src)
        plan.update(s, pool.ranks)  # (tiles in rank order: the launches stay the same)
        s_full = torch.cat([s, torch.full((T - s.numel(),), -1, dtype=torch.int32, device=DEVICE)])
        x.copy_(torch.randn(T, K, generator=generator).to(dtype))
        out0 = torch.randn(T, sum(ns), generator=generator).to(dtype)
        args = (pool.page_table, pool.ranks, pool.scales)
        log.clear()
        out.copy_(out0)
        lorakern.ops.add_lora(out, x, pool.lora_a, pool.lora_b, *args, plan, backend=backend)
        ref = out0.to("cpu", torch.float64)
        ref_add_lora(ref, x.cpu().double(), [a.cpu().double() for a in pool.lora_a],
                     [b.cpu().double() for b in pool.lora_b], pool.page_table.cpu(), pool.ranks.cpu(),
                     pool.scales.cpu(), s_full.cpu(), [0, ns[0]])
        torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-3, atol=2e-3)
        lorakern.ops.lora_shrink(x, pool.lora_a, pool.page_table, pool.ranks, plan, out=y, backend=backend)
        lorakern.ops.lora_expand(out, y, pool.lora_b, *args, plan, backend=backend)
        # the add_lora segment path allocates its y per call (a graph replays that allocation at one address)
        launches.append([(k, [v for i, v in enumerate(f) if not (j < 2 and k == "segment" and i == y_field)], a)
                         for j, (k, f, a) in enumerate(log)])
    assert launches[0] and launches[0] == launches[1]
    assert len(torch.unique(mixes[1][mixes[1] >= 0])) > 20


@pytest.mark.cuda_emulate
@pytest.mark.skipif(not CUDA_RUNS, reason="the cuda backend does not run here")
def test_fused_segment_kernel_is_chosen_where_it_fits(generator, monkeypatch):
    """LORAKERN_CUDA_SEGMENT: "fused" runs add_lora's segment path as one launch of the fused kernel (mode 3)
    wherever its layout fits (slices x max_rank rounded up to 16 <= 256 columns, shared memory within the device's
    limit) and as shrink + expand elsewhere; "auto" also wants its waves well filled; "split" (the default) never fuses;
    anything else is refused. Each variant's result matches the float64 oracle, and the fused one is the same bits
    on a second call (no atomics)."""
    from lorakern import cuda_backend

    log = []
    real_ext = cuda_backend._ext
    monkeypatch.setattr(cuda_backend, "_ext", lambda device: _LaunchRecorder(real_ext(device), log))
    monkeypatch.setenv("LORAKERN_TRITON_PATH", "segment")

    def modes(setting, n_sizes, ranks, T=40, max_rank=None):
        if setting is None:
            monkeypatch.delenv("LORAKERN_CUDA_SEGMENT", raising=False)
        else:
            monkeypatch.setenv("LORAKERN_CUDA_SEGMENT", setting)
        case = make_case(generator, T=T, K=64, n_sizes=n_sizes, ranks=ranks, num_adapters=len(ranks),
                         max_rank=max_rank, dtype=torch.bfloat16, device=DEVICE, mix="uniform")
        log.clear()
        run_case("add_lora", "cuda", case, generator)
        return [args[1] if args[1] != 3 else (3, args[2]) for kind, _, args in log if kind == "segment"]

    # fused wherever a layout fits this device as built: groups of slices of up to 256 rank columns (as wide as
    # the slices at the pool's max_rank), then the first ring configuration (K ring, out-chunk ring; deepest first,
    # tuning macros) that fits; the launch names the configuration (dense_segment's k_split) and the columns
    ext = real_ext(DEVICE)
    have = ext.max_smem_per_block() - cuda_backend._FUSED_STATIC_SMEM
    configs = [tuple(c) for c in ext.segment_fused_configs()]
    assert len(configs) == 3 and configs[2][1] == 2 and all(k >= 2 and o >= 2 for k, o in configs)
    assert configs[0] >= configs[1] >= configs[2]  # deepest first
    for cols in (64, 192, 256):  # and so the layouts shrink along the list
        need = [ext.segment_fused_smem(1, 64, c, cols) for c in range(3)]
        assert need == sorted(need, reverse=True) and need[2] > 0, (cols, need)
    assert ext.segment_fused_smem(1, 64, 2, 256) > 0 and ext.segment_fused_smem(1, 64, 2, 272) == 0  # <= 256
    assert ext.segment_fused_smem(1, 128, 2, 112) == 0 and ext.segment_fused_smem(1, 64, 3, 64) == 0  # >= r16; config
    assert ext.segment_fused_smem(1, 64, -1, 64) == 0
    assert have > 0

    def fused(S, max_rank):
        r16 = -(-max_rank // 16) * 16
        for cols in range(min(S * r16, 256), r16 - 1, -16):
            for config in range(3):
                if 0 < ext.segment_fused_smem(1, max_rank, config, cols) <= have:
                    return [(3, config, cols)]
        return "split"

    cols_field = cuda_backend._DENSE_FIELDS.index("seg_cols")

    def kernels(setting, n_sizes, ranks, **kw):
        got = modes(setting, n_sizes, ranks, **kw)
        if got == [1, 2]:
            return "split"
        assert len(log) == 1
        return [(m, k, log[0][1][cols_field]) for m, k in got]

    assert fused(1, 16)[0][2] == 16 and fused(3, 16)[0][2] == 48  # 72 / 85 KB: fit every sm_80+ part
    assert modes(None, [40, 24], [5, 16, 64]) == [1, 2]
    assert modes("split", [40, 24], [5, 16, 64]) == [1, 2]
    assert kernels("fused", [40, 24], [5, 16, 64]) == fused(2, 64)
    assert kernels("fused", [40], [5, 16, 3]) == fused(1, 16)
    assert kernels("fused", [40], [1, 128, 77]) == fused(1, 128)
    assert kernels("fused", [40, 24], [1, 128, 77]) == fused(2, 128)
    assert kernels("fused", [40, 24, 24], [1, 128, 77]) == fused(3, 128)     # 384 columns: groups
    assert kernels("fused", [40, 24, 16, 8], [3, 60], max_rank=64) == fused(4, 64)
    assert kernels("fused", [8] * 33, [3, 5], max_rank=16) == "split"       # more than 32 slices
    assert kernels("fused", [40, 24], [1, 192, 150]) == fused(2, 192)       # ranks past 128
    assert kernels("fused", [40], [3, 256]) == fused(1, 256)
    assert kernels("fused", [40], [3, 300], max_rank=512) == "split"        # past the fused kernel's 256 columns
    if have >= 227 * 1024 - cuda_backend._FUSED_STATIC_SMEM:  # an H100's (and the emulator's) limit: all fused
        assert "split" not in (fused(2, 128), fused(3, 64), fused(3, 128), fused(8, 64))
        if configs == [(6, 3), (4, 3), (4, 2)]:  # the default build: the deep K ring for one slice and for qkv at 64;
            assert fused(1, 64) == [(3, 0, 64)] and fused(3, 64) == [(3, 0, 192)]  # the others run below, too
            assert fused(4, 64) == [(3, 1, 256)] and fused(2, 128) == [(3, 2, 256)]
    sms = cuda_backend._sm_count(DEVICE)
    assert modes("auto", [40], [4, 9], T=40) == [1, 2]                       # 2 tiles: most SMs idle
    assert kernels("auto", [40], [4, 9] * sms, T=64 * sms) == fused(1, 16)
    monkeypatch.setenv("LORAKERN_CUDA_SEGMENT", "fast")
    case = make_case(generator, T=40, K=64, n_sizes=[40], ranks=[4, 9], num_adapters=2, dtype=torch.bfloat16,
                     device=DEVICE)
    L = case.lora
    for path in ("segment", "gather"):  # refused whichever path the plan takes, before any launch
        monkeypatch.setenv("LORAKERN_TRITON_PATH", path)
        log.clear()
        with pytest.raises(ValueError, match="LORAKERN_CUDA_SEGMENT"):
            lorakern.ops.add_lora(torch.zeros(40, 40, dtype=torch.bfloat16, device=DEVICE), case.x, L.lora_a,
                                  L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg, backend="cuda")
        assert log == []
    monkeypatch.setenv("LORAKERN_TRITON_PATH", "segment")
    monkeypatch.setenv("LORAKERN_CUDA_SEGMENT", "fused")
    outs = []
    for _ in range(2):
        out = torch.ones(40, 40, dtype=torch.bfloat16, device=DEVICE)
        lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                              backend="cuda")
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], torch.ones_like(outs[0]))


def test_auto_takes_the_fused_kernel_where_its_waves_are_filled(monkeypatch):
    """``auto``: the fused kernel (one CTA per SM, its time in whole waves) where the last wave is >= 3/4 full."""
    from lorakern import cuda_backend
    monkeypatch.setattr(cuda_backend, "_fused_config", lambda *a: (3, 64))
    monkeypatch.setattr(cuda_backend, "_sm_count", lambda device: 132)
    mode = lambda tiles: cuda_backend._segment_mode("auto", DEVICE, torch.bfloat16, 1, 64, tiles)  # noqa: E731
    assert cuda_backend.FUSED_MIN_WAVE_FILL == 0.75
    # the prefill benchmark's 128 tiles (8192 tokens over 16 adapters) on an H100's 132 SMs: one wave at 97 %
    assert [mode(t) for t in (128, 99, 132, 198, 264, 400)] == ["fused"] * 6
    assert [mode(t) for t in (0, 1, 64, 98, 133, 197, 265)] == ["split"] * 7
    assert cuda_backend._segment_mode("fused", DEVICE, torch.bfloat16, 1, 64, 1) == "fused"
    assert cuda_backend._segment_mode("split", DEVICE, torch.bfloat16, 1, 64, 128) == "split"
    monkeypatch.setattr(cuda_backend, "_fused_config", lambda *a: None)      # no layout fits: split, always
    assert cuda_backend._segment_mode("auto", DEVICE, torch.bfloat16, 1, 64, 128) == "split"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("impl", IMPLS + ["triton"])
def test_plan_reused_across_layers(impl, static, generator, monkeypatch):
    """One plan serves several layers: same adapters (ranks), different weights, page tables and widths."""
    backend = set_impl(impl, monkeypatch)
    T, n_adapters = 40, 7
    slots = make_slots("zipf:1.5", T, n_adapters, none_frac=0.2, generator=generator, device=DEVICE)
    plan = (lorakern.LoRAPlan.static(T, DEVICE).update(slots) if static
            else lorakern.LoRAPlan.from_slots(slots))
    ranks = [4, 1, 16, 32, 8, 0, 2]
    layers = [(64, [40]), (64, [48, 16, 16]), (96, [24]), (64, [40])]
    for i, (K, ns) in enumerate(layers):
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        pool = make_lora(n_adapters, K, ns, ranks, dtype=dtype, device=DEVICE, generator=generator)
        case = make_case(generator, T=T, K=K, n_sizes=ns, ranks=None, num_adapters=n_adapters, dtype=dtype,
                         lora=pool, slots=slots)
        case.slots_arg = plan
        run_case("add_lora", backend, case, generator)
        run_case("lora_expand", backend, case, generator)


@pytest.mark.parametrize("impl", IMPLS)
def test_same_inputs_give_identical_results(impl, generator, monkeypatch):
    """Deterministic: two calls with the same inputs write the same bits (no races between programs)."""
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=40, K=48, n_sizes=[40, 24], ranks="1-24", num_adapters=4, mix="skewed",
                     dtype=torch.float16)
    L = case.lora
    out, _, _ = random_out(case, generator)
    outs = []
    for _ in range(2):
        o = out.clone()
        lorakern.ops.add_lora(o, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                              backend=backend)
        outs.append(o)
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


@pytest.mark.parametrize("impl", IMPLS)
def test_tile_order_changes_no_bit(impl, generator, monkeypatch):
    """A plan's tiles in descending rank order (from_slots / update with ranks; what the ops build from a plain
    slots tensor) give the same bits as slot order: tiles are independent. Mixed ranks, both kernel paths'
    block sizes, -1 tokens."""
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=150, K=48, n_sizes=[40, 24], ranks=[3, 24, 1, 16, 9, 24, 2], num_adapters=7,
                     mix="zipf:1.5", none_frac=0.1, dtype=torch.float16)
    L = case.lora
    forms = {"slot order": lorakern.LoRAPlan.from_slots(case.slots),
             "rank order": lorakern.LoRAPlan.from_slots(case.slots, L.ranks),
             "static rank order": lorakern.LoRAPlan.static(case.T, DEVICE).update(case.slots, L.ranks),
             "plain slots": case.slots}
    assert not torch.equal(forms["slot order"].tiles(16), forms["rank order"].tiles(16))
    out, _, _ = random_out(case, generator)
    got = {}
    for name, arg in forms.items():
        o = out.clone()
        lorakern.ops.add_lora(o, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, arg,
                              backend=backend)
        y = lorakern.ops.lora_shrink(case.x, L.lora_a, L.page_table, L.ranks, arg, backend=backend)
        got[name] = (o, y)
    base = got.pop("slot order")
    for name, (o, y) in got.items():
        assert_bits_equal(o, base[0], f"add_lora, {name}")
        assert_bits_equal(y, base[1], f"lora_shrink, {name}")


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("mix", ["distinct", "zipf:1.5", "identical"])
@pytest.mark.parametrize("backend", BACKEND_LIST)
def test_add_lora_model_sizes_gpu(backend, mix, dtype, generator, monkeypatch):
    """Model-sized shapes (K=4096, fused qkv 4096/1024/1024, ranks 8..128) on the GPU."""
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    case = make_case(generator, T=256, K=4096, n_sizes=[4096, 1024, 1024], ranks="8-128", num_adapters=64,
                     mix=mix, none_frac=0.1, dtype=dtype)
    run_case("add_lora", backend, case, generator)
    run_case("lora_shrink", backend, case, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_LIST)
def test_static_plan_cuda_graph_replays_another_mix_gpu(backend, generator, monkeypatch):
    """Capture add_lora with a static plan in a CUDA graph, refill the plan with another mix, replay (the torch
    backend too: in a capture it takes its static form, which reads nothing back)."""
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    T, K, ns, dtype = 64, 256, [128, 64], torch.float16
    pool = make_lora(40, K, ns, [128, 1, 8, 64, 16, 3], dtype=dtype, device=DEVICE, generator=generator)
    plan = lorakern.LoRAPlan.static(T, DEVICE)
    s1 = make_slots("identical", T, 40, generator=generator, device=DEVICE)
    s2 = make_slots("distinct", T - 5, 40, none_frac=0.2, generator=generator, device=DEVICE)
    x = torch.randn(T, K, generator=generator).to(dtype).to(DEVICE)
    out = torch.zeros(T, sum(ns), dtype=dtype, device=DEVICE)
    args = (x, pool.lora_a, pool.lora_b, pool.page_table, pool.ranks, pool.scales, plan)
    plan.update(s1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds and caches every host-side table before capture
        lorakern.ops.add_lora(out, *args, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lorakern.ops.add_lora(out, *args, backend=backend)
    for s in (s2, s1):
        plan.update(s)
        full = torch.cat([s, torch.full((T - s.numel(),), -1, dtype=torch.int32, device=DEVICE)])
        case = make_case(generator, T=T, K=K, n_sizes=ns, ranks=None, num_adapters=40, dtype=dtype, lora=pool,
                         slots=full)
        case.x = x
        out.copy_(torch.randn(T, sum(ns), generator=generator).to(dtype))
        out0 = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        check_accumulated(case, out, out0, *oracle_add(case, out0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_LIST)
def test_rank_ordered_plan_updated_inside_the_graph_gpu(backend, generator, monkeypatch):
    """The plan's refill with the ranks (tiles in descending rank order: two device sorts) captured in the graph
    with add_lora: a replay after new slots and new ranks are written into the static buffers orders and computes
    the new mix (no host synchronisation in the refill, nothing allocated that a replay would miss)."""
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    T, K, ns, dtype = 64, 256, [128, 64], torch.float16
    pool = make_lora(40, K, ns, [128, 1, 8, 64, 16, 3], dtype=dtype, device=DEVICE, generator=generator)
    plan = lorakern.LoRAPlan.static(T, DEVICE)
    slots_buf = make_slots("identical", T, 40, generator=generator, device=DEVICE)
    x = torch.randn(T, K, generator=generator).to(dtype).to(DEVICE)
    out = torch.zeros(T, sum(ns), dtype=dtype, device=DEVICE)

    def step():
        plan.update(slots_buf, pool.ranks)
        lorakern.ops.add_lora(out, x, pool.lora_a, pool.lora_b, pool.page_table, pool.ranks, pool.scales, plan,
                              backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds and caches every host-side table before capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mix, nf in (("distinct", 0.2), ("zipf:1.5", 0.0)):
        slots_buf.copy_(make_slots(mix, T, 40, none_frac=nf, generator=generator, device=DEVICE))
        # other ranks per slot, never above a slot's own (its page-table row holds that many valid row ids)
        pool.ranks.copy_(torch.minimum(pool.ranks, pool.ranks.flip(0)))
        case = make_case(generator, T=T, K=K, n_sizes=ns, ranks=None, num_adapters=40, dtype=dtype, lora=pool,
                         slots=slots_buf.clone())
        case.x = x
        out.copy_(torch.randn(T, sum(ns), generator=generator).to(dtype))
        out0 = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(plan.tiles(16), lorakern.LoRAPlan.from_slots(slots_buf, pool.ranks).tiles(16))
        check_accumulated(case, out, out0, *oracle_add(case, out0))


@pytest.mark.gpu
def test_cuda_kernels_launch_on_the_current_stream():
    """The cuda backend's launches go to the caller's current stream (read without building a Stream object)."""
    from lorakern import cuda_backend

    dev = torch.device("cuda", torch.cuda.current_device())
    assert cuda_backend._stream(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert cuda_backend._stream(dev) == side.cuda_stream != torch.cuda.default_stream(dev).cuda_stream


# ------------------------------------------------------------------------------------------------ the checker
# The checks above must be able to fail: the same checker, fed a result off by a little, has to reject it.
_REL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # bf16's own ulp is 2**-8..2**-7


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_checker_rejects_one_perturbed_element(dtype, generator):
    from conftest import assert_close_lora

    case = make_case(generator, device="cpu", dtype=dtype, **CASES["slices_72_40_24"])
    out0 = torch.randn(case.T, case.out_cols, generator=generator).to(dtype)
    ref, ref_abs = oracle_add(case, out0)
    good = ref.to(dtype)  # the exact result rounded once: accepted
    check_accumulated(case, good, out0, ref, ref_abs)
    # one LoRA element whose sum is not badly conditioned, moved by a small relative amount
    lora_rows = (case.slots >= 0).cpu()
    cand = (ref_abs <= 4 * ref.abs()) & lora_rows[:, None] & case.slice_cols()[None, :] & (ref.abs() > 0.1)
    t, c = (int(v) for v in cand.nonzero()[len(cand.nonzero()) // 2])
    bad = good.clone()
    bad[t, c] = (ref[t, c] * (1 + _REL[dtype])).to(dtype)
    assert bad[t, c] != good[t, c]
    with pytest.raises(AssertionError, match="outside the tolerance"):
        assert_close_lora(bad, ref, ref_abs, dtype)
    with pytest.raises(AssertionError, match="outside the tolerance"):
        check_accumulated(case, bad, out0, ref, ref_abs)
    nan = good.clone()
    nan[t, c] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        check_accumulated(case, nan, out0, ref, ref_abs)


def test_checker_rejects_touched_none_rows_and_gap_columns(generator):
    """A change that stays within the tolerance still fails where the contract demands bit-for-bit equality."""
    case = make_case(generator, device="cpu", dtype=torch.float32, **CASES["slice_offsets_gaps"])
    out0 = torch.randn(case.T, case.out_cols, generator=generator)
    ref, ref_abs = oracle_add(case, out0)
    good = ref.to(torch.float32)
    check_accumulated(case, good, out0, ref, ref_abs)
    t = int((case.slots < 0).nonzero()[0])
    touched = good.clone()
    touched[t, 5] = torch.nextafter(touched[t, 5], torch.tensor(float("inf")))  # one ulp, in a -1 row
    with pytest.raises(AssertionError, match="slot -1"):
        check_accumulated(case, touched, out0, ref, ref_abs)
    t = int((case.slots >= 0).nonzero()[0])
    gap = good.clone()
    gap[t, 50] = torch.nextafter(gap[t, 50], torch.tensor(float("inf")))  # column 50: between slices 1 and 0
    assert not bool(case.slice_cols()[50])
    with pytest.raises(AssertionError, match="outside every slice"):
        check_accumulated(case, gap, out0, ref, ref_abs)


def test_checker_rejects_nonzero_y_beyond_rank(generator):
    case = make_case(generator, device="cpu", dtype=torch.float16, T=24, K=32, n_sizes=[16], ranks=[2, 9],
                     max_rank=16, num_adapters=2, none_frac=0.2)
    ref, ref_abs = oracle_shrink(case)
    y = ref.to(torch.float32)
    check_shrink(case, y, ref, ref_abs)
    t = int((case.slots >= 0).nonzero()[0])
    y[0, t, 15] = 1e-30  # beyond both ranks; far inside any numeric tolerance
    with pytest.raises(AssertionError, match="beyond a rank"):
        check_shrink(case, y, ref, ref_abs)


# ------------------------------------------------------------------------------------------------ gather splits
@pytest.mark.cuda_emulate
@pytest.mark.skipif(not CUDA_RUNS, reason="no CUDA extension and no CPU emulator of it")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("op", ["add_lora", "lora_shrink"])
def test_cuda_gather_missing_tokens_of_a_pass_leave_no_trace(op, dtype, generator, monkeypatch):
    """The gather kernel's shrink computes a pass's missing tokens (a tile's last pass, 4 tokens per pass) from
    token 0's x row, with no branch (the branch kept ptxas from batching the loads), and must never store them.
    Token 0 here has no LoRA and an infinite x row, and every tile's length leaves its last pass short: one stored
    or added sum of a missing token would put inf or NaN into another token's result."""
    from lorakern import cuda_backend

    monkeypatch.setenv("LORAKERN_TRITON_PATH", "gather")
    T = 40
    slots = torch.tensor([-1] + [s for s in (0, 1, 2) for _ in range(13)], dtype=torch.int32)  # 13 = 3 * 4 + 1
    case = make_case(generator, T=T, K=72, n_sizes=[40, 24], ranks=[5, 16, 9], num_adapters=3, dtype=dtype,
                     slots=slots.to(DEVICE))
    case.x[0] = float("inf")
    passes = []
    real = cuda_backend._tokens_per_pass
    monkeypatch.setattr(cuda_backend, "_tokens_per_pass", lambda info: passes.append(real(info)) or passes[-1])
    got = run_case(op, "cuda", case, generator)
    assert torch.isfinite(got.detach().cpu()[..., 1:, :] if op == "lora_shrink" else got.detach().cpu()[1:]).all()
    assert op == "lora_shrink" or passes == [4]  # (add_lora: the 4-token passes really ran)


@pytest.mark.cuda_emulate
@pytest.mark.skipif(not CUDA_RUNS, reason="no CUDA extension and no CPU emulator of it")
@pytest.mark.parametrize("splits", [(2, 1), (1, 3), (4, 5), (3, 16)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("op", ["add_lora", "lora_shrink", "lora_expand"])
def test_cuda_gather_splits_agree_with_one_cta_per_tile(op, dtype, splits, generator, monkeypatch):
    """With few tiles the gather kernel spreads each tile's token passes (m_split) and columns (n_split) over more
    CTAs: every split gives the oracle's result and the same bits as one CTA per tile (N = 300 is not a multiple
    of the chunk, and n_split = 16 leaves CTAs with no columns)."""
    from lorakern import cuda_backend

    monkeypatch.setenv("LORAKERN_TRITON_PATH", "gather")
    case = make_case(generator, T=40, K=72, n_sizes=[296, 40], ranks=[5, 16, 1, 9], num_adapters=4,
                     mix="zipf:1.5", none_frac=0.1, dtype=dtype)
    y = torch.randn(case.S, case.T, case.lora.max_rank, generator=generator).to(DEVICE)
    results = []
    for forced in ((1, 1), splits):
        seen = []

        def fake(device, ctas, mt, plan_info, max_n, vec_width, split_n=True, forced=forced):
            seen.append(forced)
            return forced[0], forced[1] if split_n else 1

        monkeypatch.setattr(cuda_backend, "_gather_splits", fake)
        g = torch.Generator().manual_seed(7)
        results.append(run_case(op, "cuda", case, g, y=y if op == "lora_expand" else None))
        assert seen, "the gather kernel did not run"
    a, b = (r.detach().cpu() for r in results)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))




def _unchecked_call(op, backend, case, out, y, ref, page_table, ranks, slots_arg, monkeypatch):
    """Call ``op`` with the value checks switched off by their own capture switch (what a CUDA-graph replay
    sees) and check the result against ``ref``, the oracle of what the kernels must compute then."""
    from lorakern.ops import _validate

    L = case.lora
    monkeypatch.setattr(_validate, "_capturing", lambda device: True)
    if op == "lora_shrink":
        got = lorakern.ops.lora_shrink(case.x, L.lora_a, page_table, ranks, slots_arg, backend=backend)
        check_shrink(case, got, *ref[:2])
        return
    if op == "add_lora":
        lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, page_table, ranks, case.scales, slots_arg,
                              backend=backend)
    else:
        lorakern.ops.lora_expand(out, y, L.lora_b, page_table, ranks, case.scales, slots_arg, backend=backend)
    check_accumulated(case, out, ref[2], *ref[:2])


def _replay_case(op, case, generator):
    """(out, y, ref) for :func:`_unchecked_call`: ``ref`` = the oracle's (result, abs) and the out it starts from."""
    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    y = torch.randn(case.S, case.T, case.lora.max_rank, generator=generator).to(DEVICE)
    ref = oracle_shrink(case) if op == "lora_shrink" else oracle_add(case, out0, y if op == "lora_expand" else None)
    return out, y, (*ref, out0)


@pytest.mark.parametrize("op", ["add_lora", "lora_shrink", "lora_expand"])
@pytest.mark.parametrize("impl", IMPLS)
def test_rank_above_max_rank_computes_at_max_rank(op, impl, generator, monkeypatch):
    """A rank above the page table's width can reach the kernels only where the value checks cannot run (a CUDA
    graph replayed after the ranks changed): each kernel (cuda and Triton) then computes at max_rank, never reading
    past the slot's page-table row and never looping without end (the cuda fused kernel's slice groups did); the
    torch backend takes its static form there. Simulated by the checks' own capture switch."""
    if impl == "cuda-fused" and op != "add_lora":
        pytest.skip("the fused kernel is add_lora's only")
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=70, K=64, n_sizes=[40, 24], ranks=[16, 5, 16, 9], max_rank=16, num_adapters=4,
                     dtype=torch.bfloat16, device=DEVICE, mix="uniform")
    L = case.lora
    out, y, ref = _replay_case(op, case, generator)
    bad_ranks = L.ranks.clone()
    bad_ranks[0], bad_ranks[2] = 10**6, 17  # both at max_rank = 16 in the oracle
    _unchecked_call(op, backend, case, out, y, ref, L.page_table, bad_ranks, case.slots_arg, monkeypatch)


def _strided_meta(L):
    """page_table, ranks and scales with their values, as strided views: a column-major page table, and ranks and
    scales as columns of per-slot records (``meta[:, 0]``)."""
    pt = L.page_table.t().contiguous().t()
    ranks = torch.stack([L.ranks, torch.full_like(L.ranks, 99)], 1)[:, 0]
    scales = torch.stack([L.scales, torch.full_like(L.scales, 7.0)], 1)[:, 0]
    assert not (pt.is_contiguous() or ranks.is_contiguous() or scales.is_contiguous())
    return pt, ranks, scales


@pytest.mark.parametrize("op", ["add_lora", "lora_shrink", "lora_expand"])
@pytest.mark.parametrize("impl", IMPLS)
def test_strided_page_table_ranks_and_scales(op, impl, generator, monkeypatch):
    """Strided views of the pool's metadata give the oracle's result (the kernels index them as contiguous, so the
    ops pass contiguous copies)."""
    if impl == "cuda-fused" and op != "add_lora":
        pytest.skip("the fused kernel is add_lora's only")
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=70, K=64, n_sizes=[40, 24], ranks=[16, 5, 11, 9], num_adapters=4,
                     dtype=torch.float16, device=DEVICE, mix="uniform", none_frac=0.1)
    L = case.lora
    L.page_table, L.ranks, L.scales = _strided_meta(L)
    case.scales = L.scales
    run_case(op, backend, case, generator)


def test_slice_table_cache_holds_a_large_model_and_what_graphs_captured(monkeypatch):
    """The device tables of slice pointers (lorakern._tables): a second pass over an 80-layer model's 640 tables
    builds none (an LRU of 512 rebuilt every one, a blocking copy per call); an entry used during a CUDA-graph
    capture is never evicted (replays read it); a table first needed during a capture is refused with what to do."""
    from lorakern import _tables

    monkeypatch.setattr(_tables, "_TABLES", type(_tables._TABLES)())
    monkeypatch.setattr(_tables, "_PINNED", set())
    builds = []

    def get(i):
        return _tables.cached_table(("test", i), torch.device("cpu"), lambda: builds.append(i) or f"table {i}")

    for _ in range(2):
        for i in range(640):
            assert get(i) == f"table {i}"
    assert builds == list(range(640))
    ws = [torch.randn(6, 8) for _ in range(3)]
    t1 = _tables.slice_tables(ws, [0, 8, 16])
    assert _tables.slice_tables(ws, [0, 8, 16]) is t1 and torch.equal(t1[0], torch.tensor([w.data_ptr() for w in ws]))
    assert _tables.slice_tables(ws, [0, 8, 20]) is not t1  # other content, other table

    monkeypatch.setattr(_tables, "TABLES_MAX", 8)
    monkeypatch.setattr(_tables, "_capturing", lambda device: True)
    get(3)  # used during a capture: pinned
    with pytest.raises(RuntimeError, match="before capturing"):
        get(10**6)
    monkeypatch.setattr(_tables, "_capturing", lambda device: False)
    for i in range(1000, 1100):
        get(i)
    assert ("test", 3) in _tables._TABLES and ("test", 4) not in _tables._TABLES
    assert len(_tables._TABLES) - len(_tables._PINNED) <= 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dname)
@pytest.mark.parametrize("impl", IMPLS)
def test_expand_of_an_infinite_intermediate_is_infinite(impl, dtype, generator, monkeypatch):
    """An infinite y entry gives +-Inf in its token's row, as the float64 reference does, not NaN: the tensor-core
    expands split y into terms of the weight dtype, and Inf - Inf made the lower terms NaN."""
    if impl == "cuda-fused":
        pytest.skip("lora_expand has no fused kernel")
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=70, K=64, n_sizes=[40], ranks=[16, 9], num_adapters=2, dtype=dtype,
                     device=DEVICE, mix="uniform")
    L = case.lora
    y = torch.randn(case.S, case.T, L.max_rank, generator=generator)
    t = int((case.slots.cpu() >= 0).nonzero()[0])
    y[0, t, 0] = float("inf")
    y = y.to(DEVICE)
    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    lorakern.ops.lora_expand(out, y, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg, backend=backend)
    ref, _ = oracle_add(case, out0, y)
    got = out.detach().cpu().double()
    assert not torch.isnan(got).any()
    assert torch.isinf(ref[t]).all() and torch.equal(torch.sign(got[t]), torch.sign(ref[t]))
    others = torch.arange(case.T) != t
    assert torch.isfinite(got[others]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_out_that_is_x(impl, generator, monkeypatch):
    """add_lora(x, x, ...) adds f(x) of the x before the call (the op copies an x that shares memory with out:
    otherwise one slice's programs read x rows that another's have already written)."""
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=70, K=64, n_sizes=[40, 24], ranks=[16, 5, 11], num_adapters=3,
                     dtype=torch.float16, device=DEVICE, mix="uniform", none_frac=0.1)
    L = case.lora
    x0 = case.x.clone()
    ref, ref_abs = oracle_add(case, x0)
    out = case.x
    lorakern.ops.add_lora(out, out, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                          backend=backend)
    check_accumulated(case, out, x0, ref, ref_abs, "add_lora(x, x)")


@pytest.mark.parametrize("op", ["add_lora", "lora_shrink", "lora_expand"])
@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_slots_and_rows_stay_in_bounds(op, impl, generator, monkeypatch):
    """Slots and page-table entries that only a CUDA-graph replay can bring unchecked (simulated by the checks'
    own capture switch) never make a kernel read out of bounds: a token of a slot >= num_slots is left as a -1
    token is, and an out-of-range row id (negative, or past the rows of lora_a / lora_b) reads row 0."""
    if impl == "cuda-fused" and op != "add_lora":
        pytest.skip("the fused kernel is add_lora's only")
    backend = set_impl(impl, monkeypatch)
    case = make_case(generator, T=70, K=64, n_sizes=[40, 24], ranks=[16, 5, 11, 9], num_adapters=4,
                     dtype=torch.float16, device=DEVICE, mix="uniform", slots_form="int32")
    L = case.lora
    bad_pt = L.page_table.clone()
    bad_pt[0, 3], bad_pt[2, 0] = 10**9, -5  # live entries (ranks 16 and 11)
    L.page_table[0, 3], L.page_table[2, 0] = 0, 0  # what the oracle should see: row 0
    for w in (*L.lora_a, *L.lora_b):  # row 0 may be a spare row, poisoned with NaN: make it a finite one
        w[0].copy_(torch.randn(w.shape[1:], generator=generator).to(w.dtype))
    live = (case.slots >= 0).nonzero().flatten()
    bad_slots = case.slots.clone()
    bad_slots[live[:5]] = L.num_slots + 7
    case.slots[live[:5]] = -1  # the oracle's view: untouched tokens
    out, y, ref = _replay_case(op, case, generator)
    _unchecked_call(op, backend, case, out, y, ref, bad_pt, L.ranks, bad_slots, monkeypatch)
