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
    """``torch.library.custom_op`` that also remembers the undecorated implementation for :func:`call`."""

    def deco(fn):
        _IMPLS[name] = fn
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)

    return deco


def direct_ok(args) -> bool:
    """True when calling the implementation directly is indistinguishable from calling the operator."""
    if FORCE_OP or torch.compiler.is_compiling() or _in_dispatch_mode():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                if type(t) not in _PLAIN or (grad and t.requires_grad):
                    return False
    return True


def call(name: str, *args) -> None:
    """Run operator ``name`` (``"lorakern::add_lora"``) on ``args``: directly when :func:`direct_ok`, else through
    ``torch.ops``."""
    if direct_ok(args):
        _IMPLS[name](*args)
    else:
        getattr(torch.ops.lorakern, name.partition("::")[2])(*args)
