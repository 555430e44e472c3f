"""Shared test machinery: device and backend lists, seeded generators, the oracle check of DESIGN.md §6.

Without CUDA, Triton kernels run on CPU tensors under its interpreter. ``TRITON_INTERPRET`` is read when triton is
imported, so it is set here, first, before anything (lorakern included) can import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402

import lorakern  # noqa: E402
from lorakern import reference  # noqa: E402
from lorakern.backends import BACKENDS  # noqa: E402
from lorakern.bench.testlog import Recorder, read as read_test_log  # noqa: E402
from lorakern.ops import _validate as V  # noqa: E402
from lorakern.workloads import RandomLoRA, make_lora, make_slots  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
#: where the ops under test run: the GPU when there is one, else the CPU (Triton under its interpreter)
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_backend_usable() -> bool:
    if not HAS_CUDA:
        return False
    return not BACKENDS["cuda"].not_supported_reasons(DEVICE, torch.float16, 128)


def _cuda_emulator_usable() -> bool:
    """Without a GPU the cuda backend's kernels run on the CPU emulator (lorakern._C_emu), if it was built."""
    from lorakern.backends import cuda_emulator

    return not HAS_CUDA and not isinstance(cuda_emulator(), str)


#: the cuda backend runs here: on the GPU, or (no GPU) its kernels on the CPU emulator, LORAKERN_CUDA_EMULATE=1
CUDA_RUNS = _cuda_backend_usable() or _cuda_emulator_usable()
#: backends under test on this machine
BACKEND_LIST = ["torch", "triton"] + (["cuda"] if CUDA_RUNS else [])
#: the compiled ones
COMPILED_BACKENDS = [b for b in BACKEND_LIST if b != "torch"]
#: backend variants: each compiled backend once per forced code path (LORAKERN_TRITON_PATH); "cuda-fused" is the
#: cuda segment path with add_lora on the fused kernel (LORAKERN_CUDA_SEGMENT=fused; shrink and expand as segment);
#: the torch backend as it chooses, then each form forced for every token (LORAKERN_TORCH_PATH)
IMPLS = ["torch", "torch-gather", "torch-segment", "torch-static", "triton-gather", "triton-segment"] + (
    ["cuda-gather", "cuda-segment", "cuda-fused"] if CUDA_RUNS else [])


def backend_device(backend: str) -> torch.device:
    """Where a test that builds its model or pool on the CPU runs ``backend``: the GPU when there is one and the
    backend is a compiled one (Triton takes CPU tensors only under its interpreter, which runs only without a GPU;
    the cuda backend, only on its CPU emulator), else the CPU."""
    return DEVICE if (HAS_CUDA and backend in ("triton", "cuda")) else torch.device("cpu")


def set_impl(impl: str, monkeypatch) -> str:
    """Activate a backend variant (``"triton-gather"`` forces that path, ``"cuda-fused"`` the segment path with the
    fused add_lora kernel, ``"torch-static"`` the torch backend's capture form); returns the backend name.

    ``"triton"`` alone leaves the path to the plan (the env override is removed). (``"cuda…"`` without a GPU runs
    on the CPU emulator: see :func:`_cuda_on_the_emulator`.)"""
    backend, _, path = impl.partition("-")
    if backend == "torch":
        if path:
            monkeypatch.setenv("LORAKERN_TORCH_PATH", path)
        else:
            monkeypatch.delenv("LORAKERN_TORCH_PATH", raising=False)
        path = ""
    if path == "fused":
        monkeypatch.setenv("LORAKERN_CUDA_SEGMENT", "fused")
        path = "segment"
    else:
        monkeypatch.delenv("LORAKERN_CUDA_SEGMENT", raising=False)
    if path:
        monkeypatch.setenv("LORAKERN_TRITON_PATH", path)
    else:
        monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    return backend


# ------------------------------------------------------------------------------------------------ pytest hooks
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; excluded from CI with -m 'not slow'")
    config.addinivalue_line("markers", "cuda_emulate: without a GPU, run the cuda backend on the CPU emulator")


def pytest_collection_modifyitems(config, items):
    done_log = os.environ.get("LORAKERN_TESTS_DONE")
    if done_log:
        # the tests an earlier (cut) run already finished, by its LORAKERN_TEST_LOG: run only the rest
        done = read_test_log(done_log)
        keep, dropped = [], []
        for it in items:
            (dropped if it.nodeid in done else keep).append(it)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_report_collectionfinish(config, items):
    done_log = os.environ.get("LORAKERN_TESTS_DONE")
    if done_log:
        return f"LORAKERN_TESTS_DONE={done_log}: the tests it names were deselected; {len(items)} left to run"


_TEST_LOGS = {}  # LORAKERN_TEST_LOG -> its Recorder (which holds the tests between their setup and teardown)


def pytest_runtest_logreport(report):
    """LORAKERN_FAILURE_LOG=<file>: append each failure's traceback to the file as it happens (pytest prints them
    only at the end of the session, which a run stopped by a time limit never reaches: the lent GPU machine's
    10-minute calls). Under pytest-xdist the controller receives every worker's reports here (the workers' own
    calls are ignored, else each would be written twice).

    LORAKERN_TEST_LOG=<file>: append one line per finished test (outcome, seconds, node id) as it finishes, so a
    cut run still has its counts and its slowest tests (:mod:`lorakern.bench.testlog`; ``python -m lorakern
    testlog <file>``). LORAKERN_TESTS_DONE=<file> (such a log) deselects the tests it names: the next call runs
    the rest (``pytest_collection_modifyitems``)."""
    if not Recorder.is_controller():  # an xdist worker: its reports reach the controller's hook as well
        return
    log_path = os.environ.get("LORAKERN_TEST_LOG")
    if log_path:
        if log_path not in _TEST_LOGS:
            _TEST_LOGS[log_path] = Recorder(log_path)
        _TEST_LOGS[log_path].report(report)
    path = os.environ.get("LORAKERN_FAILURE_LOG")
    if not path or not report.failed:
        return
    with open(path, "a") as f:
        f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


# ------------------------------------------------------------------------------------------------ fixtures
def seed_of(nodeid: str) -> int:
    """A seed fixed by the test's node id: every run reproducible, every test different."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(request.node.nodeid))


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=BACKEND_LIST)
def backend(request, monkeypatch) -> str:
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    monkeypatch.delenv("LORAKERN_TRITON_PATH", raising=False)
    monkeypatch.delenv("LORAKERN_TORCH_PATH", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def _cuda_on_the_emulator(request, monkeypatch):
    """Without a GPU, the cuda backend's kernels run on the CPU emulator (``LORAKERN_CUDA_EMULATE=1``) in a test
    parametrized with it (a ``backend``/``impl`` parameter starting with "cuda") or marked ``cuda_emulate`` (for
    tests that loop over the backends themselves; ``auto`` may then pick cuda)."""
    if HAS_CUDA or not CUDA_RUNS:
        return
    cs = getattr(request.node, "callspec", None)
    params = cs.params if cs is not None else {}
    if request.node.get_closest_marker("cuda_emulate") is not None or any(
            str(params.get(k, "")).startswith("cuda") for k in ("backend", "impl")):
        monkeypatch.setenv("LORAKERN_CUDA_EMULATE", "1")


# ------------------------------------------------------------------------------------------------ tolerance
def assert_close_lora(got: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor, dtype: torch.dtype,
                      what: str = "out") -> None:
    """Every element of ``got`` (an op's result in ``dtype``) within a reasoned bound of the float64 ``ref``.

    ``ref_abs`` is the same computation on ``|x|, |A|, |B|, |scale|`` (and ``|y|``) in float64, without the
    initial ``out``: the sum over K and over the rank of the absolute values of every term of the LoRA delta.

    Why this bound. The op forms the delta with float32 accumulation: every partial sum and product is rounded
    to float32 (fp16/bf16 products are exact in float32), so its error is a few float32 roundings of the
    magnitudes involved, i.e. ``O(eps32 * ref_abs)`` — the condition of the sum, whatever the cancellation.
    Random rounding errors grow like sqrt(n) but so does ``ref_abs`` over ``|ref|``, and measured against
    ``ref_abs`` they stay near ``eps32`` for any K; ``C_ACC = 4`` leaves a margin for blocked or tensor-core
    accumulation orders. Then the sum ``out + delta`` is rounded ONCE to the output dtype: at most half an ulp,
    ``eps(dtype)/2 * |ref|`` (plus half a subnormal spacing near zero). ``C_OUT = 2`` allows that rounding with a
    4x margin for fp16/bf16 (a second rounding — e.g. the delta rounded to fp16 before the add, or the rank
    intermediate rounded to the input dtype — is what this should catch where it matters); float32 output gets
    ``C_OUT = 4`` since its final rounding is of the same size as the accumulation error. (Measured: Triton's
    interpreter converts float32 to bf16 by truncation, up to one ulp = ``eps`` — still inside ``2 * eps``; the
    torch backend and correctly rounded kernels stay under ``eps / 2``, i.e. a quarter of the bound.)
    On a GPU ``C_ACC = 8``: tensor cores accumulate in float32 with the products of a k-step aligned to the largest
    exponent and truncated rather than rounded (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA
    tensor cores", 2021, on V100-A100), so the error is biased and can reach about twice a rounded sum's (measured
    on an H100: Triton fp16 shrink at K = 4096 reached 1.09x the CPU bound). Rounding y or the delta to fp16/bf16
    stays far (>= 100x) outside it.
    The check is two-sided on the absolute error, and NaN anywhere fails.
    """
    on_gpu = got.device.type == "cuda" or HAS_CUDA  # results are often moved to the CPU before this check
    got64 = got.detach().to("cpu", torch.float64)
    ref = ref.to(torch.float64)
    ref_abs = ref_abs.to(torch.float64)
    assert got64.shape == ref.shape == ref_abs.shape, (got64.shape, ref.shape, ref_abs.shape)
    fi = torch.finfo(dtype)
    eps_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    c_out = 4.0 if dtype in (torch.float32, torch.float64) else 2.0
    c_acc = 8.0 if on_gpu else 4.0
    tol = c_out * fi.eps * (ref.abs() + fi.smallest_normal) + c_acc * eps_acc * ref_abs
    err = (got64 - ref).abs()
    bad = ~(err <= tol)  # NaN in got (or ref) counts as bad
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        i = tuple(idx)
        ratio = (err / tol)[~torch.isnan(err)]
        worst = float(ratio.max()) if ratio.numel() else float("nan")
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the tolerance ({dtype}); first at {i}: "
            f"got {float(got64[i])!r}, reference {float(ref[i])!r}, |terms| {float(ref_abs[i])!r}, "
            f"error {float(err[i])!r} > tol {float(tol[i])!r}; worst error/tol = {worst:.3g}; "
            f"NaN in got: {int(torch.isnan(got64).sum())}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (on the CPU): comparing these is bit-for-bit equality, -0.0 and NaN too."""
    int_of = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    t = t.detach().to("cpu").contiguous()
    return t.view(int_of[t.element_size()])


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    g, w = bits(got), bits(want)
    if not torch.equal(g, w):
        n = int((g != w).sum())
        raise AssertionError(f"{what}: {n} of {g.numel()} elements changed (must be bit-for-bit unchanged)")


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One call's inputs. ``slots`` is the per-token slot actually in force (static plans pad with -1)."""

    x: torch.Tensor  # [T, K], possibly a non-contiguous view
    lora: RandomLoRA
    slots: torch.Tensor  # int32 [T] on the device
    slots_arg: object  # what is passed to the op: a tensor (int32/int64) or a LoRAPlan
    scales: Optional[torch.Tensor]
    slice_offsets: Optional[list]  # as passed to the op (None = default)
    offsets: list  # resolved
    out_cols: int
    dtype: torch.dtype
    out_layout: str = "contiguous"
    extra: dict = field(default_factory=dict)

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def widths(self) -> list:
        return [b.shape[1] for b in self.lora.lora_b]

    @property
    def S(self) -> int:
        return len(self.lora.lora_b)

    def slice_cols(self) -> torch.Tensor:
        """bool [out_cols]: True for the columns some slice writes."""
        m = torch.zeros(self.out_cols, dtype=torch.bool)
        for o, w in zip(self.offsets, self.widths):
            m[o:o + w] = True
        return m


def make_slots_arg(slots: torch.Tensor, form: str, T: int):
    """``slots`` in one of the accepted forms. ``static``: a LoRAPlan.static(T) updated with ``slots``
    (which may be shorter than T: the rest is -1)."""
    if form == "int32":
        return slots.to(torch.int32)
    if form == "int64":
        return slots.to(torch.int64)
    if form == "plan":
        return lorakern.LoRAPlan.from_slots(slots)
    if form == "static":
        return lorakern.LoRAPlan.static(T, slots.device).update(slots)
    raise ValueError(form)


def make_case(generator: torch.Generator, *, T: int, K: int, n_sizes, ranks, num_adapters: int,
              mix: str = "uniform", none_frac: float = 0.0, dtype=torch.float32, device=DEVICE,
              max_rank: Optional[int] = None, slice_offsets=None, out_cols: Optional[int] = None,
              scales: bool = True, x_layout: str = "contiguous", out_layout: str = "contiguous",
              slots_form: str = "int32", static_pad: int = 0, lora: Optional[RandomLoRA] = None,
              slots: Optional[torch.Tensor] = None) -> Case:
    """A random case built with make_lora (interleaved rows, poisoned page-table tails, NaN spare rows) and
    make_slots. ``x_layout``: ``contiguous`` | ``column_slice`` (a view into a wider tensor) | ``transposed``
    (a ``.t()`` view). ``static_pad``: for ``slots_form="static"``, the last ``static_pad`` tokens are left out of
    ``update`` and so run as -1."""
    g = generator
    if lora is None:
        lora = make_lora(num_adapters, K, n_sizes, ranks, max_rank=max_rank, dtype=dtype, device=device,
                         generator=g)
    if slots is None:
        slots = make_slots(mix, T, num_adapters, none_frac=none_frac, generator=g, device=device)
    slots = slots.to(device=device, dtype=torch.int32)
    if slots_form == "static" and static_pad:
        live = slots[: T - static_pad]
        arg = lorakern.LoRAPlan.static(T, device).update(live)
        slots = torch.cat([live, torch.full((static_pad,), -1, dtype=torch.int32, device=device)])
    else:
        arg = make_slots_arg(slots, slots_form, T)
    xs = torch.randn(T, K, generator=g)
    if x_layout == "contiguous":
        x = xs.to(dtype).to(device)
    elif x_layout == "column_slice":
        big = torch.randn(T, K + 11, generator=g)
        big[:, 5:5 + K] = xs
        x = big.to(dtype).to(device)[:, 5:5 + K]
        assert not x.is_contiguous() or T <= 1
    elif x_layout == "transposed":
        x = xs.t().contiguous().to(dtype).to(device).t()
        assert not x.is_contiguous() or T <= 1 or K <= 1
    else:
        raise ValueError(x_layout)
    widths = [int(n) for n in n_sizes]
    if out_cols is None:
        out_cols = (sum(widths) if slice_offsets is None
                    else max(o + w for o, w in zip(slice_offsets, widths)))
    offsets = V.resolve_offsets(slice_offsets, widths, out_cols)
    sc = lora.scales if scales else None
    return Case(x, lora, slots, arg, sc, None if slice_offsets is None else list(slice_offsets), offsets,
                out_cols, dtype, out_layout)


def random_out(case: Case, generator: torch.Generator):
    """(out passed to the op, the buffer holding it, snapshot of the buffer). Random finite values (the ops
    accumulate into ``out``). ``out_layout="column_slice"`` makes ``out`` a view into a wider buffer whose other
    columns must stay untouched too."""
    T, C = case.T, case.out_cols
    pad = 6 if case.out_layout == "column_slice" else 0
    buf = torch.randn(T, C + 2 * pad, generator=generator).to(case.dtype).to(DEVICE)
    out = buf[:, pad:pad + C] if pad else buf
    return out, buf, buf.clone()


def _cpu64(ts):
    return [t.detach().to("cpu", torch.float64) for t in ts]


def oracle_add(case: Case, out0: torch.Tensor, y: Optional[torch.Tensor] = None):
    """(ref, ref_abs) in float64 on the CPU for add_lora (``y is None``) or lora_expand (given ``y``)."""
    L = case.lora
    pt, rk, sl = L.page_table.cpu(), L.ranks.cpu(), case.slots.cpu()
    sc = None if case.scales is None else case.scales.detach().to("cpu", torch.float64)
    b64 = _cpu64(L.lora_b)
    out64 = out0.detach().to("cpu", torch.float64).clone()
    zeros = torch.zeros_like(out64)
    scabs = None if sc is None else sc.abs()
    if y is None:
        x64, a64 = case.x.detach().to("cpu", torch.float64), _cpu64(L.lora_a)
        ref = reference.add_lora(out64, x64, a64, b64, pt, rk, sc, sl, case.offsets)
        ref_abs = reference.add_lora(zeros, x64.abs(), [a.abs() for a in a64], [b.abs() for b in b64], pt, rk,
                                     scabs, sl, case.offsets)
    else:
        y64 = y.detach().to("cpu", torch.float64)
        ref = reference.lora_expand(out64, y64, b64, pt, rk, sc, sl, case.offsets)
        ref_abs = reference.lora_expand(zeros, y64.abs(), [b.abs() for b in b64], pt, rk, scabs, sl, case.offsets)
    return ref, ref_abs


def oracle_shrink(case: Case):
    """(ref, ref_abs) in float64 on the CPU for lora_shrink: ``[S, T, max_rank]``."""
    L = case.lora
    pt, rk, sl = L.page_table.cpu(), L.ranks.cpu(), case.slots.cpu()
    x64, a64 = case.x.detach().to("cpu", torch.float64), _cpu64(L.lora_a)
    ref = reference.lora_shrink(x64, a64, pt, rk, sl)
    ref_abs = reference.lora_shrink(x64.abs(), [a.abs() for a in a64], pt, rk, sl)
    return ref, ref_abs


def check_accumulated(case: Case, got: torch.Tensor, out0: torch.Tensor, ref: torch.Tensor,
                      ref_abs: torch.Tensor, what: str = "out") -> None:
    """The checks of an in-place accumulating op (add_lora, lora_expand) against its oracle:
    (a) tokens with slot -1 bit-for-bit unchanged (whole rows), (b) columns outside every slice bit-for-bit
    unchanged, (c) every element within :func:`assert_close_lora` of the float64 reference, (d) no NaN;
    plus tokens of rank-0 adapters bit-for-bit unchanged (they add nothing)."""
    got, out0 = got.detach().cpu(), out0.detach().cpu()
    assert got.shape == out0.shape == ref.shape
    nan = torch.isnan(got)
    assert not bool(nan.any()), f"{what}: {int(nan.sum())} NaN elements"
    slots = case.slots.cpu().long()
    none = slots < 0
    if bool(none.any()):
        assert_bits_equal(got[none], out0[none], f"{what}: rows of tokens with slot -1")
    outside = ~case.slice_cols()
    if bool(outside.any()):
        assert_bits_equal(got[:, outside], out0[:, outside], f"{what}: columns outside every slice")
    if case.lora.num_slots:
        rank_of = case.lora.ranks.cpu().long()[slots.clamp(min=0)]
        zero = (~none) & (rank_of == 0)
        if bool(zero.any()):
            assert_bits_equal(got[zero], out0[zero], f"{what}: rows of tokens whose adapter has rank 0")
    assert_close_lora(got, ref, ref_abs, case.dtype, what)


def check_shrink(case: Case, y: torch.Tensor, ref: torch.Tensor, ref_abs: torch.Tensor) -> None:
    """Every element of ``y [S, T, max_rank]``: float32, exactly 0 beyond each token's rank and for -1 tokens,
    the float64 reference elsewhere, no NaN (the caller poisons ``out=`` with NaN)."""
    L = case.lora
    assert y.dtype == torch.float32
    assert tuple(y.shape) == (case.S, case.T, L.max_rank), tuple(y.shape)
    y = y.detach().cpu()
    nan = torch.isnan(y)
    assert not bool(nan.any()), f"y: {int(nan.sum())} NaN elements (not written)"
    slots = case.slots.cpu().long()
    rank_tok = torch.where(slots >= 0, L.ranks.cpu().long()[slots.clamp(min=0)], torch.zeros_like(slots))
    dead = torch.arange(L.max_rank)[None, :] >= rank_tok[:, None]  # [T, R]
    dead = dead[None].expand_as(y)
    if bool(dead.any()):
        nz = int((y[dead] != 0).sum())
        assert nz == 0, f"y: {nz} nonzero elements beyond a rank or for -1 tokens"
    assert_close_lora(y, ref, ref_abs, torch.float32, "y")


def run_case(op: str, backend: str, case: Case, generator: torch.Generator, y: Optional[torch.Tensor] = None):
    """Call ``op`` (``add_lora`` | ``lora_shrink`` | ``lora_expand``) on ``case`` with a poisoned output and check
    it against the float64 oracle. Also checks that no input was modified. Returns the op's result."""
    L = case.lora
    inputs = [case.x, *L.lora_a, *L.lora_b, L.page_table, L.ranks, L.scales, case.slots]
    snap = [t.clone() for t in inputs]
    if op == "lora_shrink":
        y_out = torch.full((case.S, case.T, L.max_rank), float("nan"), dtype=torch.float32, device=DEVICE)
        got = lorakern.ops.lora_shrink(case.x, L.lora_a, L.page_table, L.ranks, case.slots_arg, out=y_out,
                                       backend=backend)
        assert got is y_out
        check_shrink(case, got, *oracle_shrink(case))
    elif op in ("add_lora", "lora_expand"):
        out, buf, buf0 = random_out(case, generator)
        out0 = out.clone()
        if op == "add_lora":
            got = lorakern.ops.add_lora(out, case.x, L.lora_a, L.lora_b, L.page_table, L.ranks, case.scales,
                                        case.slots_arg, slice_offsets=case.slice_offsets, backend=backend)
        else:
            if y is None:  # random rank-space input, finite everywhere (beyond-rank entries must not be read)
                y = torch.randn(case.S, case.T, L.max_rank, generator=generator).to(DEVICE)
            got = lorakern.ops.lora_expand(out, y, L.lora_b, L.page_table, L.ranks, case.scales, case.slots_arg,
                                           slice_offsets=case.slice_offsets, backend=backend)
        assert got is out
        check_accumulated(case, got, out0, *oracle_add(case, out0, y if op == "lora_expand" else None))
        if case.out_layout == "column_slice":
            pad = (buf.shape[1] - out.shape[1]) // 2
            assert_bits_equal(buf[:, :pad], buf0[:, :pad], "out's buffer left of the view")
            assert_bits_equal(buf[:, pad + out.shape[1]:], buf0[:, pad + out.shape[1]:], "out's buffer right of it")
    else:
        raise ValueError(op)
    for t, s in zip(inputs, snap):
        if t is not None:
            assert_bits_equal(t, s, "an input of the op")
    return got
