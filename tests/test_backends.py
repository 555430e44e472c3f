"""Backend capabilities and ``auto`` selection (DESIGN.md §4; the xformers rule: capabilities are data, refusals
are sentences, and when nothing fits the error lists every backend with its reasons)."""

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from lorakern import backends
from lorakern.backends import BACKEND_NAMES, BACKENDS, Backend, select_backend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)


def test_backend_table():
    assert BACKEND_NAMES == ("auto", "cuda", "triton", "torch")
    assert set(BACKENDS) == {"cuda", "triton", "torch"}
    for name, b in BACKENDS.items():
        assert isinstance(b, Backend) and b.name == name
        assert b.dtypes and all(isinstance(d, torch.dtype) for d in b.dtypes)
        for d in (torch.float16, torch.bfloat16, torch.float32):
            assert d in b.dtypes, (name, d)
    assert torch.float64 in BACKENDS["torch"].dtypes


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("device", [CPU] + ([torch.device("cuda")] if HAS_CUDA else []), ids=str)
def test_not_supported_reasons_are_sentences(name, device):
    b = BACKENDS[name]
    for dtype in (torch.float16, torch.float64, torch.int32, torch.complex64):
        reasons = b.not_supported_reasons(device, dtype, 64)
        assert isinstance(reasons, list)
        for r in reasons:
            assert isinstance(r, str) and len(r.split()) >= 3, r  # a sentence, not a code
        if dtype not in b.dtypes:
            assert any("dtype" in r and str(dtype).replace("torch.", "") in r for r in reasons), reasons
        else:
            assert not any("dtype" in r for r in reasons), reasons


def test_torch_backend_runs_anywhere_on_its_dtypes():
    for d in BACKENDS["torch"].dtypes:
        assert BACKENDS["torch"].not_supported_reasons(CPU, d, 4096) == []


def test_max_rank_limit_is_a_reason():
    b = BACKENDS["cuda"]
    assert b.max_rank is not None
    assert any("max_rank" in r for r in b.not_supported_reasons(CPU, torch.float16, b.max_rank + 1))
    assert not any("max_rank" in r for r in b.not_supported_reasons(CPU, torch.float16, b.max_rank))


def test_cuda_rank_limit_is_the_kernels():
    """The declared limit is the one the kernels were built with (csrc kMaxRank, exported as ``max_rank``): a
    larger declaration would let the gather kernel run past its shared rank arrays."""
    assert BACKENDS["cuda"].max_rank == backends.CUDA_MAX_RANK == 512
    mods = [m for m in (backends.cuda_extension(), backends.cuda_emulator()) if not isinstance(m, str)]
    if not mods:
        pytest.skip("neither lorakern._C nor lorakern._C_emu is built here")
    for m in mods:
        assert m.max_rank == backends.CUDA_MAX_RANK, m.__name__


def test_cuda_refuses_without_extension_or_gpu():
    reasons = BACKENDS["cuda"].not_supported_reasons(CPU, torch.float16, 16)
    assert reasons  # never runs on CPU tensors
    if isinstance(backends.cuda_extension(), str):
        assert any("extension" in r and "not built" in r for r in reasons), reasons
    else:
        assert any("cpu" in r for r in reasons), reasons


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only rules")
def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = backends._interpreter_problem()  # (None with the versions the README installs)
    assert BACKENDS["triton"].not_supported_reasons(CPU, torch.bfloat16) == ([problem] if problem else [])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = BACKENDS["triton"].not_supported_reasons(CPU, torch.bfloat16)
    assert reasons and any("cpu" in r and "TRITON_INTERPRET" in r for r in reasons), reasons


@pytest.mark.parametrize("triton_v, numpy_v, broken", [
    ("3.6.0", "2.4.6", True),         # the lent GPU machine's Triton with this machine's NumPy (seen: every kernel)
    ("3.3.1", "2.4.0", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),        # 3.7 squeezes the array
    ("3.9.0+git1a2b3c", "2.5.0rc1", False),
    ("3.10.0", "3.0.0", False),       # (minor 10 > 7: compared as numbers, not strings)
    ("3.6.0+cpu", "2.10.1", True),
])
def test_interpreter_problem_by_versions(triton_v, numpy_v, broken):
    """Triton's interpreter before 3.7 cannot run any of our kernels with NumPy 2.4 or later (int() of a
    one-element array, an error since NumPy 2.4): the triton backend refuses CPU tensors there, saying what to
    install, instead of failing inside the interpreter."""
    msg = backends.interpreter_problem(triton_v, numpy_v)
    assert (msg is not None) == broken
    if broken:
        assert triton_v in msg and numpy_v in msg and "numpy<2.4" in msg and "triton>=3.7" in msg


def test_interpreter_problem_refuses_cpu_tensors_with_its_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_interpreter_problem", lambda: "interpreter X cannot run with NumPy Y")
    assert BACKENDS["triton"].not_supported_reasons(CPU, torch.bfloat16) == ["interpreter X cannot run with NumPy Y"]
    with pytest.raises(RuntimeError, match="interpreter X cannot run with NumPy Y"):
        select_backend("triton", CPU, torch.bfloat16, 16)


# ------------------------------------------------------------------------------------------------ selection
def _fits(name, device, dtype, max_rank=16):
    return not BACKENDS[name].not_supported_reasons(device, dtype, max_rank)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_auto_takes_the_first_that_fits_cuda_triton_torch(dtype):
    want = next(n for n in ("cuda", "triton", "torch") if _fits(n, DEVICE, dtype))
    assert select_backend("auto", DEVICE, dtype, 16) == want


def test_auto_order_on_this_machine():
    if HAS_CUDA:
        assert select_backend("auto", DEVICE, torch.float16) in ("cuda", "triton")
    else:  # the test session runs Triton under its interpreter
        assert select_backend("auto", CPU, torch.float16) == "triton"
        assert select_backend("auto", CPU, torch.float64) == "torch"  # triton has no float64


def test_auto_order_is_cuda_then_triton_then_torch(monkeypatch):
    """With every backend able to run, cuda wins; without cuda, triton; without both, torch."""
    def able(*names):
        for n, b in BACKENDS.items():
            fn = (lambda b, d, t: []) if n in names else (lambda b, d, t, n=n: [f"{n} is switched off in this test"])
            monkeypatch.setitem(BACKENDS, n, Backend(n, b.dtypes, fn, b.max_rank))

    able("cuda", "triton", "torch")
    assert select_backend("auto", CPU, torch.float16) == "cuda"
    able("triton", "torch")
    assert select_backend("auto", CPU, torch.float16) == "triton"
    able("torch")
    assert select_backend("auto", CPU, torch.float16) == "torch"
    able("cuda", "triton", "torch")
    assert select_backend("auto", CPU, torch.float16, max_rank=513) == "triton"  # cuda's rank limit


def test_explicit_backend_that_cannot_run_raises_its_reasons():
    with pytest.raises(RuntimeError) as info:
        select_backend("triton", CPU, torch.float64, op="add_lora")
    msg = str(info.value)
    assert "add_lora" in msg and "triton" in msg and "float64" in msg
    with pytest.raises(RuntimeError, match="cuda"):
        select_backend("cuda", CPU, torch.float16)


def test_explicit_backend_that_can_run_is_returned():
    assert select_backend("torch", CPU, torch.float64) == "torch"


def test_nothing_fits_lists_every_backend_and_why():
    with pytest.raises(RuntimeError) as info:
        select_backend("auto", DEVICE, torch.complex64, 8, op="lora_shrink")
    msg = str(info.value)
    assert "lora_shrink" in msg
    for name, b in BACKENDS.items():
        assert f"{name}:" in msg, msg
        for r in b.not_supported_reasons(DEVICE, torch.complex64, 8):
            assert r in msg, (r, msg)
    assert msg.count("complex64") >= len(BACKENDS)


@pytest.mark.parametrize("bad", ["gpu", "Triton", "", None, 1, "auto "])
def test_unknown_backend_is_value_error(bad):
    with pytest.raises(ValueError, match="backend"):
        select_backend(bad, CPU, torch.float32)


@pytest.mark.parametrize("env,want", [("torch", "torch"), ("triton", "triton"), ("auto", None), ("", None),
                                      (" torch ", "torch")])
def test_lorakern_backend_env_replaces_auto(env, want, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", env)
    if want is None:
        monkeypatch.delenv("LORAKERN_BACKEND")
        want = select_backend("auto", DEVICE, torch.float32)
        monkeypatch.setenv("LORAKERN_BACKEND", env)
    assert select_backend("auto", DEVICE, torch.float32) == want
    assert select_backend("torch", DEVICE, torch.float32) == "torch"  # an explicit name is not overridden


def test_lorakern_backend_env_naming_a_backend_that_cannot_run_is_runtime_error(monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", "cuda")
    if _fits("cuda", DEVICE, torch.float16):
        pytest.skip("the cuda backend can run here")
    with pytest.raises(RuntimeError, match="cuda"):
        select_backend("auto", DEVICE, torch.float16)


@pytest.mark.parametrize("bad", ["gpu", "TORCH", "cuda,torch"])
def test_bad_lorakern_backend_env_is_value_error(bad, monkeypatch):
    monkeypatch.setenv("LORAKERN_BACKEND", bad)
    with pytest.raises(ValueError, match="LORAKERN_BACKEND"):
        select_backend("auto", CPU, torch.float32)


@pytest.mark.parametrize("op,family,other", [("mla_absorbed_q", "MLA", "mla_absorbed_o"),
                                             ("add_lora_moe", "MoE", "add_lora_moe")])
def test_cuda_backend_never_selected_for_ops_it_lacks(op, family, other, monkeypatch):
    """The CUDA extension has no MLA / MoE kernels (its declared ops): auto passes over it, naming it raises."""
    from lorakern import backends as B

    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    fits = B.Backend("cuda", B.BACKENDS["cuda"].dtypes, lambda b, d, t: [], max_rank=128, ops=B.DENSE_OPS)
    monkeypatch.setitem(B.BACKENDS, "cuda", fits)  # a cuda backend that fits this device and dtype
    dev, dt = torch.device("cpu"), torch.float32
    assert B.select_backend("auto", dev, dt, 16, op="add_lora") == "cuda"  # the patch works for dense ops
    assert B.select_backend("auto", dev, dt, 16, op=op) in ("triton", "torch")
    with pytest.raises(RuntimeError, match=f"no {family} kernels"):
        B.select_backend("cuda", dev, dt, 16, op=op)
    monkeypatch.setenv("LORAKERN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=f"no {family} kernels"):
        B.select_backend("auto", dev, dt, 16, op=other)
