"""The error contract (DESIGN.md §3, "Errors"): wrong dtype → TypeError, wrong shape / size / range → ValueError,
a backend that cannot run → RuntimeError; messages name the argument; a rejected call writes nothing.

Every rejected call below is made on a snapshot: ``out``/``y`` and every input must be bit-for-bit unchanged
afterwards. Value errors (slot and row ranges) are raised inside the operator before any kernel launch, so they
are checked with every backend.
"""

import pytest
import torch

import lorakern
from conftest import DEVICE, assert_bits_equal, check_accumulated, make_case, oracle_add, random_out, run_case
from lorakern.ops import add_lora, lora_expand, lora_shrink
from lorakern.workloads import make_lora

T, K, NS, R = 12, 32, [24, 16], 8


@pytest.fixture
def case(generator):
    return make_case(generator, T=T, K=K, n_sizes=NS, ranks=[3, 8, 1, 5], max_rank=R, num_adapters=4,
                     none_frac=0.2, dtype=torch.float32)


def _args(case, generator):
    """A full, valid argument set for the three ops as a dict (tensors cloned, so a test may break any one)."""
    L = case.lora
    out, _, _ = random_out(case, generator)
    return dict(out=out, x=case.x.clone(), lora_a=[a.clone() for a in L.lora_a],
                lora_b=[b.clone() for b in L.lora_b], page_table=L.page_table.clone(), ranks=L.ranks.clone(),
                scales=L.scales.clone(), slots=case.slots.clone(),
                y=torch.full((len(NS), T, R), float("nan"), device=DEVICE), slice_offsets=None)


def _tensors(a):
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            yield k, v
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            for i, t in enumerate(v):
                yield f"{k}[{i}]", t
        elif isinstance(v, lorakern.LoRAPlan):
            yield k, v.slots


def call(op, a, backend):
    if op == "add_lora":
        return add_lora(a["out"], a["x"], a["lora_a"], a["lora_b"], a["page_table"], a["ranks"], a["scales"],
                        a["slots"], slice_offsets=a["slice_offsets"], backend=backend)
    if op == "lora_shrink":
        return lora_shrink(a["x"], a["lora_a"], a["page_table"], a["ranks"], a["slots"], out=a["y"],
                           backend=backend)
    if op == "lora_expand":
        return lora_expand(a["out"], a["y"], a["lora_b"], a["page_table"], a["ranks"], a["scales"], a["slots"],
                           slice_offsets=a["slice_offsets"], backend=backend)
    raise ValueError(op)


def expect_rejected(op, a, backend, exc, *names):
    """``op`` raises ``exc`` whose message names each of ``names``, and nothing it was given changed."""
    snap = {k: t.clone() for k, t in _tensors(a)}
    with pytest.raises(exc) as info:
        call(op, a, backend)
    msg = str(info.value)
    for n in names:
        assert n in msg, f"the message does not name {n!r}: {msg!r}"
    for k, t in _tensors(a):
        if t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64):
            assert_bits_equal(t, snap[k], f"{op} wrote into {k} before rejecting the call")
        else:
            assert torch.equal(t, snap[k]), f"{op} changed {k}"
    return msg


ALL_OPS = ("add_lora", "lora_shrink", "lora_expand")


def _uses(op, key):
    return {
        "add_lora": {"out", "x", "lora_a", "lora_b", "page_table", "ranks", "scales", "slots", "slice_offsets"},
        "lora_shrink": {"x", "lora_a", "page_table", "ranks", "slots", "y"},
        "lora_expand": {"out", "y", "lora_b", "page_table", "ranks", "scales", "slots", "slice_offsets"},
    }[op].__contains__(key)


# ------------------------------------------------------------------------------------------------ dtype → TypeError
TYPE_ERRORS = {
    # name: (argument it breaks, how, the name the message must contain)
    "x_int": ("x", lambda a: a["x"].to(torch.int32), "x"),
    "x_float_other_than_lora_a": ("x", lambda a: a["x"].to(torch.float16), "lora_a"),
    "lora_a_dtype": ("lora_a", lambda a: [a["lora_a"][0].to(torch.float16), a["lora_a"][1]], "lora_a"),
    "lora_b_dtype": ("lora_b", lambda a: [a["lora_b"][0], a["lora_b"][1].to(torch.bfloat16)], "lora_b"),
    "lora_a_not_tensor": ("lora_a", lambda a: 3.0, "lora_a"),
    "out_dtype": ("out", lambda a: a["out"].to(torch.float16), "out"),
    "out_int": ("out", lambda a: a["out"].to(torch.int32), "out"),
    "page_table_int64": ("page_table", lambda a: a["page_table"].to(torch.int64), "page_table"),
    "ranks_float": ("ranks", lambda a: a["ranks"].to(torch.float32), "ranks"),
    "ranks_int64": ("ranks", lambda a: a["ranks"].to(torch.int64), "ranks"),
    "scales_float16": ("scales", lambda a: a["scales"].to(torch.float16), "scales"),
    "scales_float64": ("scales", lambda a: a["scales"].to(torch.float64), "scales"),
    "y_float16": ("y", lambda a: a["y"].to(torch.float16), "y"),
    "y_float64": ("y", lambda a: a["y"].to(torch.float64), "y"),
    "slots_float": ("slots", lambda a: a["slots"].to(torch.float32), "slots"),
    "slots_list": ("slots", lambda a: a["slots"].tolist(), "slots"),
}


def _type_params():
    ps = []
    for name, (key, _, _) in TYPE_ERRORS.items():
        for op in ALL_OPS:
            if _uses(op, key) and not (key == "x" and op == "lora_expand"):
                ps.append(pytest.param(op, name, id=f"{op}-{name}"))
    return ps


@pytest.mark.parametrize("op,name", _type_params())
def test_wrong_dtype_is_type_error(op, name, case, generator, backend):
    key, fn, must = TYPE_ERRORS[name]
    a = _args(case, generator)
    if name == "x_float_other_than_lora_a" and op == "lora_expand":
        pytest.skip("lora_expand takes no x")
    if op == "lora_expand" and name == "out_dtype":
        must = "lora_b"  # lora_expand has no x: out's dtype is the reference and lora_b must match it
    if op == "lora_shrink" and key == "y":
        must = "out"  # lora_shrink's y is its out= argument
    a[key] = fn(a)
    expect_rejected(op, a, backend, TypeError, must)


# ------------------------------------------------------------------------------------------------ shape → ValueError
def _narrow_out(a):
    return a["out"][:, :30].clone()


SHAPE_ERRORS = {
    "x_3d": ("x", lambda a: a["x"][None], "x"),
    "x_1d": ("x", lambda a: a["x"][0], "x"),
    "lora_a_K_mismatch": ("lora_a", lambda a: [a["lora_a"][0], a["lora_a"][1][:, :K - 1].clone()], "lora_a"),
    "lora_a_3d": ("lora_a", lambda a: [t[None] for t in a["lora_a"]], "lora_a"),
    "lora_a_rows_between_slices": ("lora_a", lambda a: [a["lora_a"][0], a["lora_a"][1][:-1].clone()], "lora_a"),
    "lora_b_rows_between_slices": ("lora_b", lambda a: [a["lora_b"][0][:-1].clone(), a["lora_b"][1]], "lora_b"),
    "lora_a_lora_b_slice_count": ("lora_b", lambda a: a["lora_b"][:1], "lora_b"),
    "lora_a_lora_b_rows": ("lora_b", lambda a: [b[:-2].clone() for b in a["lora_b"]], "lora_b"),
    "out_too_narrow": ("out", _narrow_out, "out"),
    "out_rows_not_T": ("out", lambda a: a["out"][:-1].clone(), "out"),
    "out_1d": ("out", lambda a: a["out"][0].clone(), "out"),
    "slots_len_not_T": ("slots", lambda a: a["slots"][:-1].clone(), "slots"),
    "slots_2d": ("slots", lambda a: a["slots"][None], "slots"),
    "plan_len_not_T": ("slots", lambda a: lorakern.LoRAPlan.from_slots(a["slots"][:-1]), "slots"),
    "ranks_shape": ("ranks", lambda a: a["ranks"][:-1].clone(), "ranks"),
    "ranks_2d": ("ranks", lambda a: a["ranks"][None], "ranks"),
    "page_table_1d": ("page_table", lambda a: a["page_table"][0].clone(), "page_table"),
    "scales_shape": ("scales", lambda a: a["scales"][:-1].clone(), "scales"),
    "y_shape_rank": ("y", lambda a: a["y"][:, :, :-1].clone(), "y"),
    "y_shape_slices": ("y", lambda a: a["y"][:1].clone(), "y"),
    "y_shape_tokens": ("y", lambda a: a["y"][:, :-1].clone(), "y"),
    "slice_offsets_overlap": ("slice_offsets", lambda a: [0, 20], "slice_offsets"),
    "slice_offsets_out_of_bounds": ("slice_offsets", lambda a: [0, 30], "slice_offsets"),
    "slice_offsets_negative": ("slice_offsets", lambda a: [-1, 24], "slice_offsets"),
    "slice_offsets_count": ("slice_offsets", lambda a: [0], "slice_offsets"),
    "slice_offsets_too_many": ("slice_offsets", lambda a: [0, 24, 40], "slice_offsets"),
}


def _shape_params():
    ps = []
    for name, (key, _, _) in SHAPE_ERRORS.items():
        for op in ALL_OPS:
            if not _uses(op, key) or (name.startswith("lora_a_lora_b") and op != "add_lora"):
                continue
            ps.append(pytest.param(op, name, id=f"{op}-{name}"))
    return ps


@pytest.mark.parametrize("op,name", _shape_params())
def test_wrong_shape_is_value_error(op, name, case, generator, backend):
    key, fn, must = SHAPE_ERRORS[name]
    a = _args(case, generator)
    a[key] = fn(a)
    if op == "lora_expand" and name == "out_rows_not_T":
        must = "y"  # lora_expand takes T from out, so y (sized for T) is the argument that disagrees
    if op == "lora_shrink" and key == "y":
        must = "out"
    expect_rejected(op, a, backend, ValueError, must)


# ------------------------------------------------------------------------------------------------ values → ValueError
def _set(t, idx, v):
    t = t.clone()
    t[idx] = v
    return t


VALUE_ERRORS = {
    "slot_eq_num_slots": ("slots", lambda a: _set(a["slots"], 3, 4), "slots"),
    "slot_far_out_of_range": ("slots", lambda a: _set(a["slots"], 0, 10_000), "slots"),
    "slot_below_minus_1": ("slots", lambda a: _set(a["slots"], 5, -2), "slots"),
    "slot_int64_beyond_int32": ("slots", lambda a: _set(a["slots"].long(), 2, 2**32 + 1), "slots"),
    "slot_int64_wraps_to_minus_1": ("slots", lambda a: _set(a["slots"].long(), 2, -(2**32) - 1), "slots"),
    "row_negative_within_rank": ("page_table", lambda a: _set(a["page_table"], (1, 7), -1), "page_table"),
    "row_eq_num_rows_within_rank": ("page_table",
                                    lambda a: _set(a["page_table"], (0, 2), a["lora_a"][0].shape[0]), "page_table"),
    "rank_above_max_rank": ("ranks", lambda a: _set(a["ranks"], 2, R + 1), "ranks"),
    "rank_negative": ("ranks", lambda a: _set(a["ranks"], 3, -1), "ranks"),
}


@pytest.mark.parametrize("name", VALUE_ERRORS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("form", ["tensor", "plan"])
def test_out_of_range_value_is_value_error(form, op, name, case, generator, backend):
    key, fn, must = VALUE_ERRORS[name]
    a = _args(case, generator)
    a["slots"][:] = torch.tensor([0, 1, 2, 3] * (T // 4), dtype=torch.int32)  # every slot in use
    a[key] = fn(a)
    if form == "plan":
        if name == "slot_below_minus_1":  # from_slots rejects it itself; a static plan takes it unchecked
            with pytest.raises(ValueError, match="slots"):
                lorakern.LoRAPlan.from_slots(a["slots"])
            a["slots"] = lorakern.LoRAPlan.static(T, DEVICE).update(a["slots"])
        elif key == "slots":
            try:  # the plan may reject the slots itself (then nothing can have been written)...
                a["slots"] = lorakern.LoRAPlan.from_slots(a["slots"])
            except ValueError as e:
                assert "slots" in str(e), str(e)
                return
        else:  # ... or the op must
            a["slots"] = lorakern.LoRAPlan.from_slots(a["slots"])
    expect_rejected(op, a, backend, ValueError, must)


@pytest.mark.parametrize("op", ALL_OPS)
def test_static_plan_with_out_of_range_slot_is_value_error(op, case, generator, backend):
    a = _args(case, generator)
    a["slots"] = lorakern.LoRAPlan.static(T, DEVICE).update(_set(a["slots"], 4, 4))
    expect_rejected(op, a, backend, ValueError, "slots")


@pytest.mark.parametrize("op", ALL_OPS)
def test_page_table_mutated_after_a_good_call_is_checked_again(op, case, generator, backend):
    """The page-table check may be cached, but not across an in-place change of page_table or ranks."""
    a = _args(case, generator)
    call(op, a, backend)
    good = int(a["page_table"][1, 0])
    a["page_table"][1, 0] = 10_000  # in place: a live row id now out of range
    expect_rejected(op, a, backend, ValueError, "page_table")
    a["page_table"][1, 0] = good
    call(op, a, backend)
    a["ranks"][0] = R + 3
    expect_rejected(op, a, backend, ValueError, "ranks")


@pytest.mark.parametrize("garbage", [-1, -(2**31), 2**31 - 1, 10_000], ids=lambda v: f"garbage={v}")
def test_page_table_garbage_beyond_rank_is_accepted(garbage, generator, backend, monkeypatch):
    """Entries at or beyond a slot's rank are never read: any value there is legal."""
    case = make_case(generator, T=T, K=K, n_sizes=NS, ranks=[3, 8, 0, 5], max_rank=R, num_adapters=4,
                     none_frac=0.2, dtype=torch.float16)
    pt = case.lora.page_table
    for s, r in enumerate(case.lora.ranks.tolist()):
        pt[s, r:] = garbage
    for op in ("add_lora", "lora_shrink", "lora_expand"):
        run_case(op, backend, case, generator)


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("bad", ["gpu", "Torch", "", None, 3])
def test_unknown_backend_is_value_error(op, bad, case, generator):
    a = _args(case, generator)
    expect_rejected(op, a, bad, ValueError, "backend")


@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_backend_that_cannot_run_is_runtime_error(op, case, generator):
    """Without the built extension: RuntimeError saying so. With it, on CPU tensors: RuntimeError all the same."""
    built = not isinstance(lorakern.backends.cuda_extension(), str)
    if built and DEVICE.type == "cuda":
        pytest.skip("the CUDA extension is built and a GPU is present")
    a = _args(case, generator)
    msg = expect_rejected(op, a, "cuda", RuntimeError, "cuda")
    if not built:
        assert "extension" in msg and "not built" in msg, msg


@pytest.mark.parametrize("env", ["torch", "triton"])
def test_lorakern_backend_env_picks_the_backend_for_auto(env, case, generator, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", env)
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    assert lorakern.select_backend("auto", DEVICE, torch.float16) == env
    a = _args(case, generator)
    out0 = a["out"].clone()
    call("add_lora", a, "auto")
    check_accumulated(case, a["out"], out0, *oracle_add(case, out0))
    # proof that the ops dispatch to it: a bad Triton path setting only matters to the triton backend
    monkeypatch.setenv("LORAKERN_TRITON_PATH", "no-such-path")
    if env == "triton":
        expect_rejected("add_lora", a, "auto", ValueError, "LORAKERN_TRITON_PATH")
    else:
        call("add_lora", a, "auto")


def test_lorakern_backend_env_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "triton")
    assert lorakern.select_backend("torch", DEVICE, torch.float64) == "torch"


@pytest.mark.parametrize("bad", ["cuda2", "TORCH", "gpu"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_bad_lorakern_backend_env_is_value_error(bad, op, case, generator, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", bad)
    a = _args(case, generator)
    msg = expect_rejected(op, a, "auto", ValueError, "LORAKERN_BACKEND")
    assert bad in msg


@pytest.mark.parametrize("bad", ["fused", "GATHER", "1"])
def test_bad_lorakern_triton_path_is_value_error(bad, case, generator, monkeypatch):
    monkeypatch.setenv("LORAKERN_TRITON_PATH", bad)
    a = _args(case, generator)
    expect_rejected("add_lora", a, "triton", ValueError, "LORAKERN_TRITON_PATH")


# ------------------------------------------------------------------------------------------------ devices (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("key", ["page_table", "ranks", "scales", "slots", "lora_a", "out"])
def test_argument_on_another_device_is_value_error(key, case, generator, backend):
    a = _args(case, generator)
    a[key] = [t.cpu() for t in a[key]] if isinstance(a[key], list) else a[key].cpu()
    expect_rejected("add_lora", a, backend, ValueError, key)


@pytest.mark.gpu
def test_plan_on_another_device_is_value_error(case, generator):
    a = _args(case, generator)
    a["slots"] = lorakern.LoRAPlan.from_slots(a["slots"].cpu())
    expect_rejected("add_lora", a, "triton", ValueError, "slots")


@pytest.mark.parametrize("form", ["tensor", "static"])
def test_value_checks_hold_for_inference_tensors(form, generator):
    """Inference tensors have no version counter: the cached value checks must neither crash on them nor skip a
    page table or slots tensor modified in place between calls."""
    with torch.inference_mode():
        L = make_lora(4, 32, [24], [2, 3, 4, 1], generator=generator)
        s = torch.tensor([0, 1, 2, 3, 2, 0, 1, 2], dtype=torch.int32)
        arg = s if form == "tensor" else lorakern.LoRAPlan.static(8).update(s)
        out, x = torch.zeros(8, 24), torch.randn(8, 32, generator=generator)
        lorakern.ops.add_lora(out, x, *L.args(), arg, backend="torch")
        L.page_table[1, 0] = 999
        with pytest.raises(ValueError, match="page_table"):
            lorakern.ops.add_lora(out, x, *L.args(), arg, backend="torch")
        L.page_table[1, 0] = 0
        if form == "tensor":
            s[3] = 7
        else:
            arg.update(torch.tensor([0, 1, 2, 7, 2, 0, 1, 2], dtype=torch.int32))
        with pytest.raises(ValueError, match="slots"):
            lorakern.ops.add_lora(out, x, *L.args(), arg, backend="torch")


def test_overlap_test_of_out_and_its_inputs():
    """The byte-range overlap test behind ``add_lora(x, x, ...)``: conservative (interleaved column slices of one
    buffer count), never missing a shared element, and no copy for disjoint rows of one buffer."""
    from lorakern.ops import _validate as V

    buf = torch.zeros(4, 8)
    cases = [(buf, buf, True), (buf[:, :4], buf[:, 4:], True), (buf[:2], buf[2:], False),
             (buf, torch.zeros(4, 8), False), (buf.t(), buf, True), (buf[:0], buf, False)]
    for a, b, want in cases:
        assert V._spans_overlap(a, b) == want, (a.shape, b.shape)
        got = V.apart_from(a, b)
        assert (got is not b) == want and torch.equal(got, b)
