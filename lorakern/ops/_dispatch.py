"""Eager fast path of the ``torch.library`` operators.

Every op is a real ``torch.ops.lorakern.*`` operator (schema, fake implementation), which ``torch.compile``,
``torch.export``, CUDA-graph capture under compile, dispatch modes and ``opcheck`` need. But the dispatcher's
Python path (argument defaults, autograd and ADInplaceOrView redispatch) costs ~60-80 us per call on a server
CPU, more than a decode kernel takes. So a plain eager call — not compiling, plain tensors, no autograd
recording, no dispatch mode active — runs the operator's implementation directly: the same function the
operator would run, with the same arguments, so the result is the same bit for bit (tested). Anything else goes
through the operator. ``LORAKERN_DISPATCH=op`` forces the operator every time (e.g. to see the ops in a
profiler's operator view).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils import _python_dispatch

__all__ = ["custom_op", "call", "direct_ok"]

_IMPLS: dict = {}
_in_dispatch_mode = getattr(_python_dispatch, "is_in_torch_dispatch_mode", None) or (
    lambda: _python_dispatch._get_current_dispatch_mode() is not None)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: set from LORAKERN_DISPATCH at import; tests flip it
FORCE_OP = os.environ.get("LORAKERN_DISPATCH", "").strip().lower() == "op"


def custom_op(name: str, mutates_args):
    """``torch.library.custom_op`` that also remembers the implementation for :func:`call`. The implementation runs
    with its first argument's GPU current (:func:`on_device_of_first`)."""

    def deco(fn):
        impl = on_device_of_first(fn)
        _IMPLS[name] = impl
        # the schema from fn itself: its annotations are strings resolved in fn's module, not in this one
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        return torch.library.custom_op(name, mutates_args=mutates_args, schema=schema)(impl)

    return deco


def on_device_of_first(fn):
    """``fn`` run with the device of its first argument (a tensor: every op's first argument is its output, on the
    op's device) as the current CUDA device, when it is another GPU than the current one. Kernels launch on the
    current device and its stream (Triton's launcher, the CUDA runtime, ``cudaFuncSetAttribute``), so a call on
    ``cuda:1`` while ``cuda:0`` is current would otherwise fail or touch the wrong GPU. A no-op on the CPU and on
    the current GPU (one ``current_device`` query)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        dev = first.device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def direct_ok(args) -> bool:
    """True when calling the implementation directly is indistinguishable from calling the operator."""
    if FORCE_OP or torch.compiler.is_compiling() or _in_dispatch_mode():
        return False
    # Per argument, and per element of a list or tuple argument (one level): a tensor of another type than
    # _PLAIN's, or one that requires grad while grad mode records, sends the call to the operator. The common case
    # (a plain tensor) is told by its type first, before any isinstance.
    grad = torch.is_grad_enabled()
    for a in args:
        if type(a) in _PLAIN:
            if grad and a.requires_grad:
                return False
        elif isinstance(a, (list, tuple)):
            for t in a:
                if type(t) in _PLAIN:
                    if grad and t.requires_grad:
                        return False
                elif isinstance(t, torch.Tensor):
                    return False
        elif isinstance(a, torch.Tensor):
            return False
    return True


def call(name: str, *args) -> None:
    """Run operator ``name`` (``"lorakern::add_lora"``) on ``args``: directly when :func:`direct_ok`, else through
    ``torch.ops``."""
    if direct_ok(args):
        _IMPLS[name](*args)
    else:
        getattr(torch.ops.lorakern, name.partition("::")[2])(*args)
