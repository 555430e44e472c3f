"""The MLA ops (``mla_absorbed_q``, ``mla_absorbed_o``; DESIGN.md §3) against the float64 reference.

Every case draws random inputs (never zeros), a rank-row pool from ``make_lora`` (interleaved rows, page-table
entries beyond each rank out of range, NaN spare rows) and accumulates into a random destination. Checks: every
element within the reasoned tolerance of ``conftest.assert_close_lora``, no NaN, tokens with slot ``-1`` or a rank-0
adapter bit-for-bit unchanged, inputs unchanged, and the destination returned.

Cost: the Triton interpreter pays ~1 ms of Python per program per loop step, so on the CPU the Triton backend runs
every dtype on the CORE cases and one dtype per (case, op) elsewhere, rotating; the torch backend (and every backend
on a GPU) runs the full matrix.
"""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import lorakern
from conftest import (BACKEND_LIST, COMPILED_BACKENDS, DEVICE, DTYPES, HAS_CUDA, assert_bits_equal,
                      assert_close_lora)
from lorakern import reference_mla
from lorakern.ops import mla as mla_ops
from lorakern.workloads import RandomLoRA, make_lora, make_slots

BACKENDS = BACKEND_LIST
OPS = ("q", "o")


#: the tests that loop over BACKENDS themselves run cuda on the CPU emulator when there is no GPU
pytestmark = pytest.mark.cuda_emulate
BASE = dict(H=4, C=64, Dn=16, Dv=16)

CASES = {
    # ranks 1..64 mixed in one batch, rank 0 and -1 tokens included
    "mixed_ranks_0_64": dict(T=40, **BASE, ranks=[1, 64, 5, 0, 17, 33, 2, 48], num_adapters=8, none_frac=0.2),
    # odd sizes everywhere; Dn != Dv
    "odd_C72_Dn12_Dv20_H3": dict(T=33, H=3, C=72, Dn=12, Dv=20, ranks="1-24", num_adapters=5, none_frac=0.1),
    # more heads than one head block (8 under the interpreter, 4 on the GPU): partial last block
    "H12": dict(T=24, H=12, C=32, Dn=8, Dv=24, ranks="1-20", num_adapters=4, none_frac=0.1),
    "H1": dict(T=17, H=1, C=48, Dn=24, Dv=8, ranks="1-16", num_adapters=3),
    # ranks beyond 128, up to the cuda backend's limit (512)
    "ranks_to_512": dict(T=24, H=2, C=32, Dn=8, Dv=8, ranks=[512, 1, 200, 129], num_adapters=4, none_frac=0.1),
    # page table much wider than any rank: work must follow the real rank
    "max_rank_64_ranks_le_8": dict(T=30, **BASE, ranks="1-8", max_rank=64, num_adapters=5, none_frac=0.2),
    # one adapter over 40 tokens: three 16-token blocks of the same adapter
    "one_adapter_40_tokens": dict(T=40, **BASE, ranks=[20], num_adapters=1, mix="identical"),
    "distinct_48": dict(T=48, **BASE, ranks="1-16", num_adapters=48, mix="distinct", none_frac=0.1),
    "T0": dict(T=0, **BASE, ranks="1-8", num_adapters=3),
    "T1": dict(T=1, **BASE, ranks=[7], num_adapters=1),
    "all_tokens_none": dict(T=20, **BASE, ranks="1-8", num_adapters=3, none_frac=1.0),
    "all_rank0": dict(T=16, **BASE, ranks=0, max_rank=4, num_adapters=3),
    "scales_none": dict(T=24, **BASE, ranks="1-16", num_adapters=4, scales=False, none_frac=0.2),
    "slots_int64": dict(T=24, **BASE, ranks="1-16", num_adapters=4, slots_form="int64", none_frac=0.2),
    "slots_plan": dict(T=24, **BASE, ranks="1-16", num_adapters=4, slots_form="plan", none_frac=0.2),
    # static plan for 28 tokens, updated with 20: the last 8 run as -1
    "slots_static_plan_padded": dict(T=28, **BASE, ranks="1-16", num_adapters=4, slots_form="static",
                                     static_pad=8),
    # engine layouts: q_nope = q[..., :Dn]; q_latent / o_latent / out are [T, H, *] views of [H, T, *] bmm results
    "strided_views": dict(T=30, H=3, C=40, Dn=12, Dv=20, ranks="1-20", num_adapters=4, none_frac=0.2,
                          layout="strided"),
}
CORE = ("mixed_ranks_0_64", "odd_C72_Dn12_Dv20_H3", "strided_views")
_INTERP = not HAS_CUDA


def _dname(dt):
    return str(dt).replace("torch.", "")


def _matrix():
    params = []
    for ci, name in enumerate(CASES):
        for oi, op in enumerate(OPS):
            for bi, be in enumerate(BACKENDS):
                if _INTERP and be != "torch" and name not in CORE:
                    dts = [DTYPES[(ci + oi) % len(DTYPES)]]
                else:
                    dts = list(DTYPES)
                for dt in dts:
                    params.append(pytest.param(name, op, be, dt, id=f"{be}-{op}-{name}-{_dname(dt)}"))
    return params


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class MLACase:
    T: int
    H: int
    C: int
    Dn: int
    Dv: int
    lora: RandomLoRA
    slots: torch.Tensor  # int32 [T]: the slot in force per token (static plans pad with -1)
    slots_arg: object
    scales: Optional[torch.Tensor]
    dtype: torch.dtype
    layout: str

    @property
    def a(self):
        return self.lora.lora_a[0]

    @property
    def b(self):
        return self.lora.lora_b[0]


def make_mla_case(g, *, T, H, C, Dn, Dv, ranks, num_adapters, mix="uniform", none_frac=0.0, dtype=torch.float32,
                  max_rank=None, scales=True, slots_form="int32", static_pad=0, layout="contiguous"):
    lora = make_lora(num_adapters, C, [H * (Dn + Dv)], ranks, max_rank=max_rank, dtype=dtype, device=DEVICE,
                     generator=g)
    slots = make_slots(mix, T, num_adapters, none_frac=none_frac, generator=g, device=DEVICE)
    if slots_form == "static":
        live = slots[: T - static_pad]
        arg = lorakern.LoRAPlan.static(T, DEVICE).update(live)
        slots = torch.cat([live, torch.full((static_pad,), -1, dtype=torch.int32, device=DEVICE)])
    elif slots_form == "plan":
        arg = lorakern.LoRAPlan.from_slots(slots)
    elif slots_form == "int64":
        arg = slots.to(torch.int64)
    else:
        arg = slots
    return MLACase(T, H, C, Dn, Dv, lora, slots, arg, lora.scales if scales else None, dtype, layout)


def _rand(g, shape, dtype, layout, extra=0):
    """Random ``[T, H, D]`` in ``layout``: contiguous, or (strided) a view: of ``[T, H, D + extra]`` cut to ``D``
    when ``extra``, else of a contiguous ``[H, T, D]`` transposed."""
    T, H, D = shape
    if layout == "contiguous":
        return torch.randn(T, H, D, generator=g).to(dtype).to(DEVICE)
    if extra:
        return torch.randn(T, H, D + extra, generator=g).to(dtype).to(DEVICE)[..., :D]
    return torch.randn(H, T, D, generator=g).to(dtype).to(DEVICE).transpose(0, 1)


def _inputs(case: MLACase, op: str, g):
    """(dst, src) for the op: q: (q_latent [T,H,C], q_nope [T,H,Dn]); o: (out [T,H,Dv], o_latent [T,H,C])."""
    T, H, C, Dn, Dv = case.T, case.H, case.C, case.Dn, case.Dv
    if op == "q":
        return _rand(g, (T, H, C), case.dtype, case.layout), _rand(g, (T, H, Dn), case.dtype, case.layout, extra=8)
    return _rand(g, (T, H, Dv), case.dtype, case.layout), _rand(g, (T, H, C), case.dtype, case.layout)


def _call(op, dst, src, case: MLACase, backend, **kw):
    fn = lorakern.ops.mla_absorbed_q if op == "q" else lorakern.ops.mla_absorbed_o
    L = case.lora
    args = dict(lora_a=case.a, lora_b=case.b, page_table=L.page_table, ranks=L.ranks, scales=case.scales,
                slots=case.slots_arg)
    args.update(kw)
    return fn(dst, src, args["lora_a"], args["lora_b"], args["page_table"], args["ranks"], args["scales"],
              args["slots"], backend=backend)


def oracle(case: MLACase, op: str, dst0, src):
    """(ref, ref_abs) in float64 on the CPU: the reference, and the same on |inputs| into zeros (the sum of the
    absolute values of every term of the LoRA delta, which scales the accumulation error bound)."""
    f = reference_mla.mla_absorbed_q if op == "q" else reference_mla.mla_absorbed_o
    c64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    pt, rk, sl = case.lora.page_table.cpu(), case.lora.ranks.cpu(), case.slots.cpu()
    sc = None if case.scales is None else c64(case.scales)
    ref = f(c64(dst0).clone(), c64(src), c64(case.a), c64(case.b), pt, rk, sc, sl)
    ref_abs = f(torch.zeros_like(c64(dst0)), c64(src).abs(), c64(case.a).abs(), c64(case.b).abs(), pt, rk,
                None if sc is None else sc.abs(), sl)
    return ref, ref_abs


def check(case: MLACase, got, dst0, ref, ref_abs, what):
    got, dst0 = got.detach().cpu(), dst0.detach().cpu()
    nan = torch.isnan(got)
    assert not bool(nan.any()), f"{what}: {int(nan.sum())} NaN elements"
    slots = case.slots.cpu().long()
    if case.lora.num_slots:
        rank_tok = torch.where(slots >= 0, case.lora.ranks.cpu().long()[slots.clamp(min=0)], torch.zeros_like(slots))
    else:
        rank_tok = torch.zeros_like(slots)
    idle = rank_tok == 0  # slot -1 or a rank-0 adapter
    if bool(idle.any()):
        assert_bits_equal(got[idle], dst0[idle], f"{what}: tokens with slot -1 or a rank-0 adapter")
    assert_close_lora(got, ref, ref_abs, case.dtype, what)


def run(case: MLACase, op: str, backend: str, g):
    dst, src = _inputs(case, op, g)
    dst0 = dst.clone()
    inputs = [src, case.a, case.b, case.lora.page_table, case.lora.ranks, case.lora.scales, case.slots]
    snap = [t.clone() for t in inputs]
    got = _call(op, dst, src, case, backend)
    assert got is dst
    check(case, got, dst0, *oracle(case, op, dst0, src), what=f"mla_absorbed_{op}")
    for t, s in zip(inputs, snap):
        assert_bits_equal(t, s, "an input of the op")
    return got


# ------------------------------------------------------------------------------------------------ matrix
@pytest.mark.parametrize("name,op,backend,dtype", _matrix())
def test_mla_op(name, op, backend, dtype, generator, monkeypatch):
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    spec = dict(CASES[name])
    run(make_mla_case(generator, dtype=dtype, **spec), op, backend, generator)


@pytest.mark.parametrize("op", OPS)
def test_backends_agree_and_auto_runs(op, generator, monkeypatch):
    """``auto`` picks a backend that runs (triton here), and triton and torch agree within the tolerance."""
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    case = make_mla_case(generator, T=24, **BASE, ranks=[3, 16, 9], num_adapters=3, none_frac=0.2,
                         dtype=torch.float16)
    dst, src = _inputs(case, op, generator)
    outs = {be: _call(op, dst.clone(), src, case, be) for be in ("auto", "torch", "triton")}
    ref, ref_abs = oracle(case, op, dst, src)
    for be, got in outs.items():
        check(case, got, dst, ref, ref_abs, f"{op} backend={be}")


@pytest.mark.parametrize("op", OPS)
def test_plan_reused_across_layers(op, generator):
    """One plan serves several layers with other sizes and pools over the same adapters."""
    T = 30
    slots = make_slots("zipf:1.5", T, 5, none_frac=0.2, generator=generator, device=DEVICE)
    plan = lorakern.LoRAPlan.from_slots(slots)
    for i, (H, C, Dn, Dv) in enumerate([(4, 64, 16, 16), (3, 40, 12, 20), (4, 64, 16, 16)]):
        dtype = DTYPES[i % len(DTYPES)]
        lora = make_lora(5, C, [H * (Dn + Dv)], [4, 1, 16, 0, 9], dtype=dtype, device=DEVICE, generator=generator)
        case = MLACase(T, H, C, Dn, Dv, lora, slots, plan, lora.scales, dtype, "contiguous")
        run(case, op, "triton", generator)


# ------------------------------------------------------------------------------------------------ tolerance
def _buggy_q(case, dst0, src, bug):
    """mla_absorbed_q with a deliberate bug, in float64 on the CPU (then rounded to the case's dtype)."""
    c64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    q = c64(dst0).clone()
    H, Dn = case.H, case.Dn
    for s in torch.unique(case.slots).tolist():
        if s < 0 or int(case.lora.ranks[s]) == 0:
            continue
        tok = (case.slots.cpu() == s).nonzero().flatten()
        rows = case.lora.page_table[s, : int(case.lora.ranks[s])].long().cpu()
        a = c64(case.a)[rows]
        b = c64(case.b)[rows].view(-1, H, case.Dn + case.Dv)
        bk = b[:, :, Dn:2 * Dn] if bug == "wrong_half" else b[:, :, :Dn]
        y = torch.einsum("thd,rhd->thr", c64(src)[tok], bk)
        if bug == "bf16_intermediate":
            y = y.to(torch.bfloat16).to(torch.float64)
        q[tok] += torch.einsum("thr,rc->thc", y, a) * float(case.scales[s])
    return q.to(case.dtype)


@pytest.mark.parametrize("bug,dtype", [("bf16_intermediate", torch.float32), ("wrong_half", torch.float16)])
def test_tolerance_checker_fails_a_wrong_result(bug, dtype, generator):
    """The check is not vacuous: a rank intermediate rounded to bf16 (fp32 data) or B_K read from the wrong
    columns (fp16) fails it, while the reference rounded once to the same dtype passes."""
    case = make_mla_case(generator, T=24, H=4, C=64, Dn=8, Dv=8, ranks=[4, 16, 9], num_adapters=3,
                         none_frac=0.1, dtype=dtype)
    dst, src = _inputs(case, "q", generator)
    ref, ref_abs = oracle(case, "q", dst, src)
    check(case, ref.to(dtype), dst, ref, ref_abs, "the reference itself")
    with pytest.raises(AssertionError, match="outside the tolerance"):
        check(case, _buggy_q(case, dst, src, bug), dst, ref, ref_abs, f"buggy ({bug})")


# ------------------------------------------------------------------------------------------------ errors
def _bad_args(kind: str, op: str, case: MLACase, dst, src):
    """(dst, src, overrides, expected error type) for one bad input."""
    T, H, C, Dn, Dv = case.T, case.H, case.C, case.Dn, case.Dv
    L = case.lora
    D_src = Dn if op == "q" else C
    kw = {}
    if kind == "src_dtype_int":
        src = src.to(torch.int32)
        return dst, src, kw, TypeError
    if kind == "dst_dtype_mismatch":
        return dst.to(torch.float16), src, kw, TypeError
    if kind == "lora_a_dtype":
        return dst, src, dict(lora_a=case.a.to(torch.float16)), TypeError
    if kind == "lora_b_dtype":
        return dst, src, dict(lora_b=case.b.to(torch.float16)), TypeError
    if kind == "page_table_int64":
        return dst, src, dict(page_table=L.page_table.to(torch.int64)), TypeError
    if kind == "ranks_int64":
        return dst, src, dict(ranks=L.ranks.to(torch.int64)), TypeError
    if kind == "scales_fp16":
        return dst, src, dict(scales=L.scales.to(torch.float16)), TypeError
    if kind == "slots_float":
        return dst, src, dict(slots=case.slots.to(torch.float32)), TypeError
    if kind == "lora_a_list_of_two":
        return dst, src, dict(lora_a=[case.a, case.a]), ValueError
    if kind == "src_2d":
        return dst, src.reshape(T, -1), kw, ValueError
    if kind == "dst_4d":
        return dst[..., None], src, kw, ValueError
    if kind == "tokens_mismatch":
        return dst[:-1], src, kw, ValueError
    if kind == "heads_mismatch":
        return dst[:, :-1], src, kw, ValueError
    if kind == "lora_a_width":  # width must be C
        return dst, src, dict(lora_a=torch.randn(case.a.shape[0], C + 1).to(case.dtype)), ValueError
    if kind == "lora_b_width_not_multiple_of_H":
        return dst, src, dict(lora_b=torch.randn(case.b.shape[0], H * (Dn + Dv) + 1).to(case.dtype)), ValueError
    if kind == "lora_b_width_no_room":  # H * known width: the other head width would be 0
        known = Dn if op == "q" else Dv
        return dst, src, dict(lora_b=torch.randn(case.b.shape[0], H * known).to(case.dtype)), ValueError
    if kind == "rows_mismatch":
        return dst, src, dict(lora_b=case.b[:-1]), ValueError
    if kind == "ranks_shape":
        return dst, src, dict(ranks=L.ranks[:-1]), ValueError
    if kind == "slots_shape":
        return dst, src, dict(slots=case.slots[:-1]), ValueError
    if kind == "slot_out_of_range":
        s = case.slots.clone()
        s[0] = L.num_slots
        return dst, src, dict(slots=s), ValueError
    if kind == "slot_below_minus_1":
        s = case.slots.clone()
        s[0] = -2
        return dst, src, dict(slots=s), ValueError
    if kind == "row_out_of_range":
        pt = L.page_table.clone()
        pt[1, 0] = case.a.shape[0]
        return dst, src, dict(page_table=pt), ValueError
    if kind == "rank_above_max_rank":
        rk = L.ranks.clone()
        rk[1] = L.page_table.shape[1] + 1
        return dst, src, dict(ranks=rk), ValueError
    if kind == "negative_rank":
        rk = L.ranks.clone()
        rk[1] = -1
        return dst, src, dict(ranks=rk), ValueError
    if kind == "zero_width_src":
        return dst, src[..., :0], kw, ValueError
    raise ValueError(kind)


BAD = ("src_dtype_int", "dst_dtype_mismatch", "lora_a_dtype", "lora_b_dtype", "page_table_int64", "ranks_int64",
       "scales_fp16", "slots_float", "lora_a_list_of_two", "src_2d", "dst_4d", "tokens_mismatch", "heads_mismatch",
       "lora_a_width", "lora_b_width_not_multiple_of_H", "lora_b_width_no_room", "rows_mismatch", "ranks_shape",
       "slots_shape", "slot_out_of_range", "slot_below_minus_1", "row_out_of_range", "rank_above_max_rank",
       "negative_rank", "zero_width_src")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", BAD)
def test_bad_input_raises_typed_error_before_writing(kind, op, backend, generator):
    case = make_mla_case(generator, T=12, **BASE, ranks=[3, 8, 5], num_adapters=3, dtype=torch.float32)
    dst, src = _inputs(case, op, generator)
    dst, src, kw, err = _bad_args(kind, op, case, dst, src)
    before = dst.clone()
    with pytest.raises(err) as info:
        _call(op, dst, src, case, backend, **kw)
    assert str(info.value)  # names the argument
    assert_bits_equal(dst, before, f"{op} destination after a rejected call ({kind})")


@pytest.mark.parametrize("op", OPS)
def test_backend_errors(op, generator, monkeypatch):
    """Unknown backend → ValueError; a backend that cannot run here → RuntimeError naming why; fp64 is for the
    torch backend only; nothing is written."""
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    case = make_mla_case(generator, T=12, **BASE, ranks=[3, 8], num_adapters=2, dtype=torch.float64)
    dst, src = _inputs(case, op, generator)
    before = dst.clone()
    with pytest.raises(ValueError, match="backend"):
        _call(op, dst, src, case, "bogus")
    with pytest.raises(RuntimeError, match="triton"):
        _call(op, dst, src, case, "triton")  # float64
    with pytest.raises(RuntimeError, match="cuda"):
        _call(op, dst, src, case, "cuda")  # float64
    assert_bits_equal(dst, before, "destination after rejected calls")
    _call(op, dst, src, case, "auto")  # float64 on auto: the torch backend
    ref, ref_abs = oracle(case, op, before, src)
    check(case, dst, before, ref, ref_abs, f"{op} float64 auto")



# ------------------------------------------------------------------------------------------------ registration
def _op_args(op, backend, generator):
    case = make_mla_case(generator, T=10, H=2, C=32, Dn=8, Dv=8, ranks=[3, 16, 0], num_adapters=3, none_frac=0.2,
                         dtype=torch.float32)
    dst, src = _inputs(case, op, generator)
    s, tok, tiles, info = mla_ops._plan_args(case.slots, backend, case.lora.num_slots, DEVICE)
    L = case.lora
    return (dst, src, case.a, case.b, L.page_table, L.ranks, L.scales, s, tok, tiles, info, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend, generator):
    """Real torch.library operators: schema (mutation of the destination), fake impl, dispatch all check out."""
    target = torch.ops.lorakern.mla_absorbed_q if op == "q" else torch.ops.lorakern.mla_absorbed_o
    torch.library.opcheck(target.default, _op_args(op, backend, generator))


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op, generator):
    """The public op traces into one graph (no graph break) with a prebuilt plan; the result is the eager one."""
    case = make_mla_case(generator, T=12, H=2, C=32, Dn=8, Dv=8, ranks=[3, 16], num_adapters=2, none_frac=0.2,
                         dtype=torch.float32, slots_form="plan")
    dst, src = _inputs(case, op, generator)
    fn = lorakern.ops.mla_absorbed_q if op == "q" else lorakern.ops.mla_absorbed_o
    L = case.lora

    def f(d, s):
        return fn(d, s, case.a, case.b, L.page_table, L.ranks, L.scales, case.slots_arg, backend="triton")

    eager = f(dst.clone(), src)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(dst.clone(), src)
    assert_bits_equal(compiled, eager, "compiled vs eager")


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_deepseek_v3_shapes_gpu(backend, op, dtype, generator):
    """DeepSeek-V3 head shapes (H=128, C=512, Dn=Dv=128), 64 decode tokens on distinct adapters of mixed rank,
    native (not upcast) half-precision tensor-core path against the float64 oracle."""
    case = make_mla_case(generator, T=64, H=128, C=512, Dn=128, Dv=128, ranks=[16, 8, 64, 1, 32, 0, 16, 128],
                         num_adapters=64, mix="distinct", none_frac=0.1, dtype=dtype)
    run(case, op, backend, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_another_mix_gpu(backend, op, generator):
    """Captured once with a static plan and one adapter mix, replayed after plan.update with a mix of more
    adapters and other ranks: every replay matches the oracle (the grid is sized for the worst case)."""
    T, dtype = 48, torch.bfloat16
    lora = make_lora(40, 64, [4 * 32], [1, 64, 5, 0, 17, 33, 2, 48, 16, 128], dtype=dtype, device=DEVICE,
                     generator=generator)
    plan = lorakern.LoRAPlan.static(T, DEVICE)
    mixes = [make_slots("identical", T - 4, 3, generator=generator, device=DEVICE),
             make_slots("distinct", T, 40, none_frac=0.1, generator=generator, device=DEVICE),
             make_slots("zipf:1.5", T - 10, 40, none_frac=0.2, generator=generator, device=DEVICE)]
    pad = lambda s: torch.cat([s, torch.full((T - s.numel(),), -1, dtype=torch.int32, device=DEVICE)])  # noqa: E731
    case = MLACase(T, 4, 64, 16, 16, lora, pad(mixes[0]), plan, lora.scales, dtype, "contiguous")
    dst, src = _inputs(case, op, generator)
    dst0 = dst.clone()
    plan.update(mixes[0])
    _call(op, dst, src, case, backend)  # compile and validate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(op, dst, src, case, backend)
    for s in mixes + mixes[:1]:
        plan.update(s)
        case.slots = pad(s)
        dst.copy_(dst0)
        graph.replay()
        torch.cuda.synchronize()
        check(case, dst, dst0, *oracle(case, op, dst0, src), what=f"mla_absorbed_{op} replay")



class _SmallMLA:
    """A small absorbed-MLA call (12 tokens, 2 heads, C = 32, Dn = Dv = 8, 3 slots of ranks 6, 16, 3) on one
    ``side`` whose pool metadata and slots each test may replace: ``run(...)`` returns the result on a copy of one
    random destination."""

    def __init__(self, g, backend, side="q"):
        self.backend = backend
        self.case = c = make_mla_case(g, T=12, H=2, C=32, Dn=8, Dv=8, ranks=[6, 16, 3], num_adapters=3,
                                      dtype=torch.float16)
        self.fn = lorakern.ops.mla_absorbed_q if side == "q" else lorakern.ops.mla_absorbed_o
        dst0 = torch.randn(c.T, c.H, c.C if side == "q" else c.Dv, generator=g)
        src = torch.randn(c.T, c.H, c.Dn if side == "q" else c.C, generator=g)
        self.dst0, self.src = dst0.half().to(DEVICE), src.half().to(DEVICE)

    def run(self, page_table=None, ranks=None, scales=None, slots=None):
        c, L = self.case, self.case.lora
        return self.fn(self.dst0.clone(), self.src, c.a, c.b, L.page_table if page_table is None else page_table,
                       L.ranks if ranks is None else ranks, L.scales if scales is None else scales,
                       c.slots_arg if slots is None else slots, backend=self.backend)


def _unchecked(monkeypatch):
    """Switch the value checks off by their own capture switch: what a CUDA-graph replay sees."""
    from lorakern.ops import _validate

    monkeypatch.setattr(_validate, "_capturing", lambda device: True)


@pytest.mark.parametrize("side", ["q", "o"])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_rank_above_max_rank_computes_at_max_rank(side, backend, generator, monkeypatch):
    """As for add_lora (test_ops_lora): a rank above the page table's width, which only a CUDA-graph replay can
    bring (the value checks are skipped there), computes at max_rank: the same bits as the rank at max_rank."""
    m = _SmallMLA(generator, backend, side)
    assert m.case.lora.page_table.shape[1] == 16
    want = m.run()
    bad_ranks = m.case.lora.ranks.clone()
    bad_ranks[1] = 10**6
    _unchecked(monkeypatch)
    assert_bits_equal(m.run(ranks=bad_ranks).cpu(), want.cpu(), "the result at ranks capped to max_rank")


@pytest.mark.parametrize("side", ["q", "o"])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_strided_page_table_ranks_and_scales(side, backend, generator):
    """Strided views of the pool's metadata (a column-major page table, ranks and scales as record columns) give
    the same bits as contiguous ones."""
    m = _SmallMLA(generator, backend, side)
    L = m.case.lora
    pt_s = L.page_table.t().contiguous().t()
    rk_s = torch.stack([L.ranks, L.ranks + 1], 1)[:, 0]
    sc_s = torch.stack([L.scales, L.scales + 1], 1)[:, 0]
    assert_bits_equal(m.run(pt_s, rk_s, sc_s).cpu(), m.run().cpu(), "the result with strided metadata")


def test_head_id_storage_outlives_its_cache():
    """The cuda backend's [T, H] head ids are views of one never-freed arange(H) per (H, device): a CUDA graph
    captured at batch size T keeps reading that storage after the view for T left the 64-entry cache (vLLM captures
    ~67 sizes; each view used to own its storage, freed with it)."""
    from lorakern import cuda_backend as cb

    first = cb._head_ids(1, 16, torch.device("cpu"))
    ptr = first.data_ptr()
    assert first.tolist() == [list(range(16))]
    for T in [2, 4] + list(range(8, 513, 8)):
        cb._head_ids(T, 16, torch.device("cpu"))
    assert (1, 16, "cpu") not in cb._HEAD_IDS
    assert cb._HEAD_BASE[(16, "cpu")].data_ptr() == ptr
    assert cb._head_ids(1, 16, torch.device("cpu")).data_ptr() == ptr



@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_out_of_range_slots_and_rows_stay_in_bounds(backend, generator, monkeypatch):
    """As for add_lora (test_ops_lora): unchecked slots >= num_slots act as -1 and out-of-range page-table entries
    read row 0, the same bits as a checked call with those values."""
    m = _SmallMLA(generator, backend)
    good_pt, bad_pt = m.case.lora.page_table.clone(), m.case.lora.page_table.clone()
    good_pt[1, 4], bad_pt[1, 4] = 0, 10**9
    slots = torch.tensor([0, 1, 2] * 4, dtype=torch.int32).to(DEVICE)
    good_slots, bad_slots = slots.clone(), slots.clone()
    good_slots[[0, 7]], bad_slots[[0, 7]] = -1, 50
    want = m.run(page_table=good_pt, slots=good_slots)
    _unchecked(monkeypatch)
    got = m.run(page_table=bad_pt, slots=bad_slots)
    assert_bits_equal(got.cpu(), want.cpu(), "the result with out-of-range slots and rows")
