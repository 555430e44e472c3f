"""Backends and their declared capabilities (data, not code paths), and the ``auto`` selection.

Each backend states which devices and dtypes it handles and returns *sentences* explaining why it refuses a call.
``auto`` takes the first that fits in the order ``cuda → triton → torch``; ``LORAKERN_BACKEND`` overrides ``auto``.
When nothing fits, the error lists every backend with its reasons (the xformers rule).

``LORAKERN_CUDA_EMULATE=1`` (development and tests, like ``TRITON_INTERPRET=1`` for Triton): the ``cuda`` backend
also takes CPU tensors and runs the very same CUDA kernel sources on the CPU emulator ``lorakern._C_emu``
(csrc/emu/: one block at a time, its threads as fibers, barriers and warp collectives checked). It tests the
kernels' logic without a GPU; it is slow and says nothing about GPU speed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Backend", "BACKENDS", "BACKEND_NAMES", "DENSE_OPS", "OP_FAMILY", "select_backend", "triton_interpret",
           "cuda_extension", "cuda_emulator", "cuda_emulate"]

BACKEND_NAMES = ("auto", "cuda", "triton", "torch")


def cuda_emulate() -> bool:
    """True when ``LORAKERN_CUDA_EMULATE=1``: the cuda backend runs CPU tensors on the kernel emulator."""
    return os.environ.get("LORAKERN_CUDA_EMULATE", "0") == "1"


def triton_interpret() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as ``3.6.0``, ``2.4.0rc1`` or ``3.7.0+git1a2b``."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run our kernels with these versions, or None. Up to Triton 3.6 the
    interpreter turns a loop bound that is a tensor (a rank loaded from memory, a K passed as an argument: every
    kernel here has one) into a Python int with ``int()`` of a one-element NumPy array, which NumPy 2.4 made an
    error (deprecated since 1.25); Triton 3.7 squeezes the array first. Compiled kernels on a GPU are not
    affected."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy {numpy_version}: "
                "it converts loop bounds with int() of a one-element array, an error since NumPy 2.4; install "
                "'numpy<2.4' or 'triton>=3.7'")
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> Optional[str]:
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled extension module ``lorakern._C``, or the reason it is not there (a string)."""
    try:
        from lorakern import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return (
            "the compiled CUDA extension lorakern._C is not built or cannot be loaded "
            f"({e}); reinstall with nvcc available and LORAKERN_SKIP_CUDA unset"
        )
    return _C


@functools.lru_cache(maxsize=None)
def cuda_emulator():
    """``lorakern._C_emu`` (the CUDA kernels compiled for the CPU emulator), or the reason it is not there."""
    try:
        from lorakern import _C_emu  # type: ignore[attr-defined]
    except ImportError as e:
        return (
            "the CPU emulation of the CUDA kernels (lorakern._C_emu) is not built or cannot be loaded "
            f"({e}); reinstall with the CUDA toolkit's headers available and LORAKERN_SKIP_CUDA_EMU unset"
        )
    return _C_emu


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple
    #: devices it runs on; "cpu" for triton only under the interpreter
    reasons_fn: Callable[["Backend", torch.device, torch.dtype], list] = field(repr=False, compare=False)
    max_rank: Optional[int] = None
    #: the ops it implements (None = all of them)
    ops: Optional[frozenset] = None

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, max_rank: int = 0,
                              op: Optional[str] = None) -> list:
        """Sentences saying why this backend cannot run ``op`` on ``device`` with ``dtype``; empty if it can."""
        reasons = []
        if op is not None and self.ops is not None and op not in self.ops:
            reasons.append(f"the {self.name} backend has no {OP_FAMILY.get(op, op)} kernels ({op})")
        reasons += list(self.reasons_fn(self, device, dtype))
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} is not supported (supports {names})")
        if self.max_rank is not None and max_rank > self.max_rank:
            reasons.append(f"max_rank {max_rank} exceeds this backend's limit {self.max_rank}")
        return reasons


def _torch_reasons(b, device, dtype):
    return []


def _triton_reasons(b, device, dtype):
    err = _triton_import_error()
    if err:
        return [err]
    if triton_interpret():
        if device.type != "cpu":
            return [f"TRITON_INTERPRET=1 runs kernels on the CPU, but the tensors are on {device}"]
        problem = _interpreter_problem()
        return [problem] if problem else []
    if device.type != "cuda":
        return [f"the tensors are on {device}; Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1)"]
    return []


_CUDA_EXT_FACTS: dict = {}


def _cuda_ext_facts(ext):
    """(archs the extension was built for, whether it has the dense kernels), read from the module once in eager
    mode. torch.compile cannot trace a call into the pybind11 module: while tracing, the facts read earlier are
    used, or, before any eager call, none (an arch the build lacks then fails at the kernel launch, by name)."""
    facts = _CUDA_EXT_FACTS.get("facts")
    if facts is None:
        if torch.compiler.is_compiling():
            return [], True
        built = [a.strip() for a in getattr(ext, "archs", lambda: "")().split(",") if a.strip()]
        facts = _CUDA_EXT_FACTS["facts"] = (built, bool(getattr(ext, "supports_dense_ops", lambda: False)()))
    return facts


_CUDA_DEVICE_REASONS: dict = {}


def _cuda_reasons(b, device, dtype):
    if device.type == "cpu" and cuda_emulate():
        emu = cuda_emulator()
        return [emu] if isinstance(emu, str) else []
    ext = cuda_extension()
    if isinstance(ext, str):
        return [ext]
    if device.type != "cuda":
        return [f"the tensors are on {device}, not on a CUDA device (LORAKERN_CUDA_EMULATE=1 runs the kernels on "
                "the CPU emulator)"]
    # a GPU's answer cannot change within a process (the extension, its archs, the device's capability): once per
    # device, read eagerly (every op call asks; the capability query alone costs microseconds)
    hit = _CUDA_DEVICE_REASONS.get(device.index)  # a tensor's device always has its index
    if hit is not None and device.index is not None:
        return list(hit)
    reasons = _cuda_device_reasons(ext, device)
    if device.index is not None and not torch.compiler.is_compiling():
        _CUDA_DEVICE_REASONS[device.index] = tuple(reasons)
    return reasons


def _cuda_device_reasons(ext, device):
    reasons = []
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 0):
        reasons.append(f"compute capability {cc[0]}.{cc[1]} is below the minimum 8.0")
    built, supported = _cuda_ext_facts(ext)
    want = f"{cc[0]}{cc[1]}"
    if built and not any(a.rstrip("af") == want for a in built):
        reasons.append(f"the extension was built for sm_{', sm_'.join(built)}, not for this device's sm_{want} "
                       "(rebuild with LORAKERN_CUDA_ARCHS)")
    if not supported:
        reasons.append("the built extension does not provide the dense LoRA kernels yet")
    return reasons


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

#: the cuda backend's largest max_rank (page-table width): vLLM's largest max_lora_rank; csrc's kMaxRank,
#: exported by the extension as ``lorakern._C.max_rank`` (a test checks the two agree)
CUDA_MAX_RANK = 512

#: op -> the family named in refusals ("the cuda backend has no MLA kernels (mla_absorbed_q)")
OP_FAMILY = {"add_lora": "dense", "lora_shrink": "dense", "lora_expand": "dense",
             "mla_absorbed_q": "MLA", "mla_absorbed_o": "MLA", "add_lora_moe": "MoE"}
DENSE_OPS = frozenset({"add_lora", "lora_shrink", "lora_expand"})

BACKENDS = {
    "cuda": Backend("cuda", _FLOATS, _cuda_reasons, max_rank=CUDA_MAX_RANK, ops=frozenset(OP_FAMILY)),
    "triton": Backend("triton", _FLOATS, _triton_reasons),
    "torch": Backend("torch", _FLOATS + (torch.float64,), _torch_reasons),
}
_AUTO_ORDER = ("cuda", "triton", "torch")


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, max_rank: int = 0,
                   op: Optional[str] = None) -> str:
    """Resolve ``requested`` (``auto|cuda|triton|torch``) to a backend name that can run ``op``, or raise.

    ``LORAKERN_BACKEND`` replaces ``auto``. A named backend that cannot run raises ``RuntimeError`` with its
    reasons; ``auto`` raises listing every backend and why it refused.
    """
    if not isinstance(requested, str) or requested not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {requested!r}")
    if requested == "auto":
        env = os.environ.get("LORAKERN_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"LORAKERN_BACKEND: expected one of {BACKEND_NAMES}, got {env!r}")
            requested = env
    if requested != "auto":
        reasons = BACKENDS[requested].not_supported_reasons(device, dtype, max_rank, op)
        if reasons:
            raise RuntimeError(f"{op or 'op'}: backend {requested!r} cannot run here: " + "; ".join(reasons))
        return requested
    refusals = []
    for name in _AUTO_ORDER:
        reasons = BACKENDS[name].not_supported_reasons(device, dtype, max_rank, op)
        if not reasons:
            return name
        refusals.append(f"  {name}: " + "; ".join(reasons))
    raise RuntimeError(f"{op or 'op'}: no backend can run this call:\n" + "\n".join(refusals))
