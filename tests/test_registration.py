"""The ops are real torch.library operators (DESIGN.md §3): schema with mutation annotations and a fake
implementation, checked by ``torch.library.opcheck``; the public wrapper compiles with ``fullgraph=True``.

The operator arguments are built by the same normalisation the public wrapper uses
(``lorakern.ops.lora._plan_args`` and ``_rows``).
"""

import pytest
import torch

import lorakern
from conftest import BACKEND_LIST, DEVICE, check_accumulated, make_case, oracle_add, random_out
from lorakern.ops.lora import _plan_args, _rows

OPCHECK_BACKENDS = BACKEND_LIST


def _op_args(backend, slots_form, generator, dtype=torch.float32):
    case = make_case(generator, T=20, K=40, n_sizes=[24, 16], ranks=[3, 8, 1, 0, 5], num_adapters=5,
                     none_frac=0.2, dtype=dtype, slots_form=slots_form)
    L = case.lora
    out, _, _ = random_out(case, generator)
    s, tok, tg, ts, info = _plan_args(case.slots_arg, backend, L.num_slots, DEVICE)
    y = torch.randn(case.S, case.T, L.max_rank, generator=generator).to(DEVICE)
    return case, dict(out=out, x=case.x, a=_rows(L.lora_a), b=_rows(L.lora_b), pt=L.page_table, ranks=L.ranks,
                      scales=L.scales, s=s, tok=tok, tg=tg, ts=ts, offs=case.offsets, info=info, y=y)


@pytest.mark.parametrize("slots_form", ["int32", "plan"])
@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_add_lora(backend, slots_form, generator):
    _, a = _op_args(backend, slots_form, generator)
    torch.library.opcheck(torch.ops.lorakern.add_lora.default,
                          (a["out"], a["x"], a["a"], a["b"], a["pt"], a["ranks"], a["scales"], a["s"], a["tok"],
                           a["tg"], a["ts"], a["offs"], a["info"], backend))


@pytest.mark.parametrize("slots_form", ["int32", "plan"])
@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_lora_shrink(backend, slots_form, generator):
    _, a = _op_args(backend, slots_form, generator)
    y = torch.full_like(a["y"], float("nan"))
    torch.library.opcheck(torch.ops.lorakern.lora_shrink.default,
                          (y, a["x"], a["a"], a["pt"], a["ranks"], a["s"], a["tok"], a["tg"], a["ts"], a["info"],
                           backend))


@pytest.mark.parametrize("slots_form", ["int32", "plan"])
@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_lora_expand(backend, slots_form, generator):
    _, a = _op_args(backend, slots_form, generator)
    torch.library.opcheck(torch.ops.lorakern.lora_expand.default,
                          (a["out"], a["y"], a["b"], a["pt"], a["ranks"], None, a["s"], a["tok"], a["tg"], a["ts"],
                           a["offs"], a["info"], backend))


def test_schemas_declare_what_they_mutate():
    for name, mutated in (("add_lora", "out"), ("lora_shrink", "y"), ("lora_expand", "out")):
        schema = getattr(torch.ops.lorakern, name).default._schema
        args = {a.name: a for a in schema.arguments}
        assert args[mutated].alias_info is not None and args[mutated].alias_info.is_write, str(schema)
        others = [a for a in schema.arguments if a.name != mutated and a.alias_info is not None]
        assert not any(a.alias_info.is_write for a in others), str(schema)
        assert len(schema.returns) == 0, str(schema)


# ------------------------------------------------------------------------------------------------ torch.compile
def _fresh_compile(fn, compiler):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=compiler)


# aot_eager traces exactly what inductor receives (dynamo + functionalisation of the mutated out) in a fraction of
# the time; inductor itself runs once per backend (its CPU C++ build costs ~20 s on 2 cores).
# The triton backend needs a prebuilt plan inside a compiled region: building one reads stats back to the host.
COMPILE_CASES = [("torch", "int32", "aot_eager"), ("torch", "int64", "aot_eager"), ("torch", "plan", "aot_eager"),
                 ("torch", "static", "aot_eager"), ("torch", "plan", "inductor"),
                 ("triton", "plan", "aot_eager"), ("triton", "static", "aot_eager"), ("triton", "plan", "inductor")]


@pytest.mark.parametrize("backend,slots_form,compiler", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
def test_compile_fullgraph_add_lora_matches_eager(backend, slots_form, compiler, generator, monkeypatch):
    """fullgraph=True: the wrapper's checks, backend choice and the operator trace without a graph break."""
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    case = make_case(generator, T=24, K=40, n_sizes=[24, 16], ranks=[3, 8, 1, 0, 5], num_adapters=5,
                     none_frac=0.2, dtype=torch.float32, slots_form=slots_form)
    L = case.lora

    def f(out, x, slots):
        lorakern.ops.add_lora(out, x, L.lora_a, L.lora_b, L.page_table, L.ranks, L.scales, slots, backend=backend)
        return out * 2

    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    eager_out = out.clone()
    eager = f(eager_out, case.x, case.slots_arg)
    got = _fresh_compile(f, compiler)(out, case.x, case.slots_arg)
    assert torch.equal(got, eager)
    assert torch.equal(out, eager_out)  # the in-place update happened in the compiled graph too
    check_accumulated(case, out, out0, *oracle_add(case, out0))


def test_compile_fullgraph_shrink_expand(generator, monkeypatch):
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    case = make_case(generator, T=24, K=40, n_sizes=[24, 16], ranks=[3, 8, 1, 0, 5], num_adapters=5,
                     none_frac=0.2, dtype=torch.float16, slots_form="plan")
    L = case.lora

    def f(out, x, plan):
        y = lorakern.ops.lora_shrink(x, L.lora_a, L.page_table, L.ranks, plan, backend="torch")
        lorakern.ops.lora_expand(out, y, L.lora_b, L.page_table, L.ranks, L.scales, plan, backend="torch")
        return y

    out, _, _ = random_out(case, generator)
    out0 = out.clone()
    eager_out = out.clone()
    y_eager = f(eager_out, case.x, case.slots_arg)
    y = _fresh_compile(f, "aot_eager")(out, case.x, case.slots_arg)
    assert torch.equal(y, y_eager) and torch.equal(out, eager_out)
    check_accumulated(case, out, out0, *oracle_add(case, out0))


# ------------------------------------------------------------------------------------------ eager fast path
class _CountingMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _spy(monkeypatch, name):
    from lorakern.ops import _dispatch
    calls = []
    impl = _dispatch._IMPLS[name]
    monkeypatch.setitem(_dispatch._IMPLS, name, lambda *a: (calls.append(1), impl(*a)))
    return calls


@pytest.mark.parametrize("backend", BACKEND_LIST)
def test_eager_fast_path_same_bits_as_the_operator(backend, generator, monkeypatch):
    """A plain eager call runs the operator's implementation directly (no dispatcher), with the same result bit
    for bit as the operator path (LORAKERN_DISPATCH=op)."""
    from lorakern.ops import _dispatch
    case = make_case(generator, T=24, K=48, n_sizes=[32, 16], ranks=[4, 8, 1, 0, 16], num_adapters=5,
                     none_frac=0.2, dtype=torch.float16)
    L = case.lora
    out0, _, _ = random_out(case, generator)
    calls = _spy(monkeypatch, "lorakern::add_lora")
    got = {}
    for force in (False, True):
        monkeypatch.setattr(_dispatch, "FORCE_OP", force)
        o = out0.clone()
        lorakern.ops.add_lora(o, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                              backend=backend)
        got[force] = o
    assert len(calls) == 1  # the direct call only: the operator path goes through torch.ops
    assert torch.equal(got[False].view(torch.int16), got[True].view(torch.int16))
    check_accumulated(case, got[False], out0, *oracle_add(case, out0))


def test_eager_fast_path_falls_back_to_the_operator(generator, monkeypatch):
    """Autograd recording, a dispatch mode or a tensor subclass take the operator path."""
    from lorakern.ops import _dispatch
    case = make_case(generator, T=8, K=16, n_sizes=[8], ranks=[2, 3], num_adapters=2, dtype=torch.float32)
    L = case.lora
    out, _, _ = random_out(case, generator)
    args = (out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg)
    assert _dispatch.direct_ok(args)
    x_grad = case.x.detach().clone().requires_grad_(True)
    assert not _dispatch.direct_ok((out, x_grad))
    with torch.no_grad():
        assert _dispatch.direct_ok((out, x_grad))
    class Sub(torch.Tensor):
        pass

    assert not _dispatch.direct_ok((out, [L.lora_a[0].as_subclass(Sub)]))
    calls = _spy(monkeypatch, "lorakern::add_lora")
    mode = _CountingMode()
    with mode:
        lorakern.ops.add_lora(*args, backend="torch")
    assert calls == [] and any("lorakern.add_lora" in op for op in mode.ops), mode.ops


def test_ops_run_with_their_gpu_current(monkeypatch):
    """Kernels launch on the current device (Triton's launcher, the CUDA runtime): every op's implementation, called
    directly or through the operator, first makes its output's GPU current when it is another one (a call on cuda:1
    while cuda:0 is current), and leaves the CPU and the current GPU alone."""
    from lorakern.ops import _dispatch

    entered = []

    class FakeGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")
            return False

    class OnDevice:  # a stand-in argument: only its device is read
        def __init__(self, dev):
            self.device = torch.device(dev)

    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = []
    f = _dispatch.on_device_of_first(lambda first, *rest: seen.append((first.device, entered[-1:])))
    for dev in ("cpu", "cuda:0", "cuda:1"):
        f(OnDevice(dev), 1, 2)
    assert entered == [torch.device("cuda:1"), "exit"]
    assert seen == [(torch.device("cpu"), []), (torch.device("cuda:0"), []),
                    (torch.device("cuda:1"), [torch.device("cuda:1")])]
    ops = {"add_lora", "lora_shrink", "lora_expand", "add_lora_moe", "mla_absorbed_q", "mla_absorbed_o"}
    assert {n.partition("::")[2] for n in _dispatch._IMPLS} == ops
    for name, impl in _dispatch._IMPLS.items():  # the guarded function is the one the operator runs too
        assert getattr(impl, "__wrapped__", None) is not None, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", [b for b in BACKEND_LIST if b != "torch"])
def test_add_lora_on_a_gpu_that_is_not_current(backend, generator):
    """A call on cuda:1 while cuda:0 is current runs there and gets the oracle's result."""
    dev = torch.device("cuda", 1)
    case = make_case(generator, T=20, K=40, n_sizes=[24, 16], ranks=[3, 8, 1, 5], num_adapters=4,
                     dtype=torch.float16, device=dev)
    L = case.lora
    out, _, _ = random_out(case, generator)
    out = out.to(dev)
    out0 = out.clone()
    with torch.cuda.device(0):
        lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                              backend=backend)
    torch.cuda.synchronize(dev)
    check_accumulated(case, out, out0, *oracle_add(case, out0))
