"""The grouping kernel (``csrc/include/lorakern/grouping.cuh``, ``group`` of the CUDA extension): a LoRAPlan's fill
(:meth:`lorakern.plan.LoRAPlan._fill`) and the MoE op's (token, expert) pair grouping
(:func:`lorakern.moe_grouping.group_pairs`) in one launch each, bit for bit what their torch code computes.

The torch code is ~126 torch ops for a plan (148 with ranks) and ~90 for a grouping, most of them a kernel launch
or more on a GPU; the kernel path is a few allocations and one launch. It is taken wherever the kernel can: the
CUDA extension is loaded and targets the tensors' GPU (or, with ``LORAKERN_CUDA_EMULATE=1``, the CPU emulator runs
it on CPU tensors), up to :data:`max_items` items (the sort runs in one CTA's shared memory), not while
``torch.compile`` traces (it cannot trace into the extension), and not with ``LORAKERN_GROUP_KERNEL=0`` (the torch
code everywhere: the switch to pull if the kernel ever misbehaves on a GPU; ``bench/gpu_check.sh`` pulls it by
itself when its parity check fails)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from lorakern.plan import _SENTINEL

__all__ = ["GROUP_FIELDS", "kernel_for", "max_items", "launch"]

#: the binding's fields, in its order (csrc/bindings.cpp)
GROUP_FIELDS = ("slots", "s_slots", "slots_i64", "ids", "s_t", "s_k", "ids_i64", "ranks", "num_ranks", "T", "topk",
                "E", "num_slots", "work_times_length", "empty_key", "n_rows", "num_blocks", "block_m0", "block_m1",
                "order", "seg_starts", "seg_keys", "seg_counts", "num_segments", "tiles0", "tiles1", "count0",
                "count1", "stats")
#: keys are ``slot·E + e`` below this one (the "no LoRA" key; the plan's and the torch grouping's)
SENTINEL = _SENTINEL
_ID_DTYPES = (torch.int32, torch.int64)


def max_items(ext) -> int:
    return int(getattr(ext, "group_max_items", 0))


def kernel_for(device: torch.device):
    """``(extension module, stream handle)`` to launch the grouping kernel on ``device`` with, or None where the
    torch code must do it (module docstring)."""
    if os.environ.get("LORAKERN_GROUP_KERNEL", "1") == "0" or torch.compiler.is_compiling():
        return None
    from lorakern import cuda_backend
    from lorakern.backends import BACKENDS, cuda_emulate

    if device.type == "cpu":
        if not cuda_emulate():
            return None
    elif device.type != "cuda" or BACKENDS["cuda"].reasons_fn(BACKENDS["cuda"], device, torch.float32):
        return None
    try:
        ext = cuda_backend._ext(device)
    except RuntimeError:
        return None
    if not hasattr(ext, "group"):
        return None
    return ext, cuda_backend._stream(device)


def takes(ext, slots: torch.Tensor, ids: Optional[torch.Tensor], items: int, num_slots: int, E: int) -> bool:
    """Whether one launch groups these items: 1 to :func:`max_items`, int32/int64 slots (and ids), 1-D slots,
    keys below :data:`SENTINEL`."""
    return (0 < items <= max_items(ext) and slots.dtype in _ID_DTYPES and slots.dim() == 1
            and (ids is None or ids.dtype in _ID_DTYPES) and num_slots * E <= SENTINEL)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def launch(kernel, slots: torch.Tensor, ids: Optional[torch.Tensor], *, E: int, num_slots: int, blocks,
           tiles, order: torch.Tensor, counts=(None, None), segments=None, ranks: Optional[torch.Tensor] = None,
           work_times_length: bool = False, empty_key: int = 0, stats: Optional[torch.Tensor] = None) -> None:
    """One launch: ``blocks`` (1 or 2 block sizes) with their ``tiles`` ([n_rows, 3] int32 each) and optional
    ``counts`` ([1] int32 each); ``segments`` = (seg_starts, seg_keys, seg_counts, num_segments) or None;
    ``ranks`` as :func:`lorakern.plan.order_tiles` takes them (converted to int32 here, as it does); ``stats``
    (int32 [5 + len(blocks)], optional): a dynamic plan's statistics (csrc/include/lorakern/grouping.h)."""
    ext, stream = kernel
    T = slots.shape[0]
    topk = ids.shape[1] if ids is not None else 1
    s_t, s_k = ids.stride() if ids is not None else (0, 0)
    r32 = None
    if ranks is not None and ranks.numel() > 0:
        r32 = ranks if ranks.dtype == torch.int32 and ranks.is_contiguous() else ranks.to(torch.int32).contiguous()
    blocks, tiles, counts = list(blocks), list(tiles), list(counts)
    nb = len(blocks)
    seg = list(segments) if segments is not None else [None] * 4
    fields = [slots.data_ptr(), slots.stride(0), int(slots.dtype == torch.int64),
              _ptr(ids), s_t, s_k, int(ids is not None and ids.dtype == torch.int64),
              _ptr(r32), r32.numel() if r32 is not None else 0,
              T, topk, E, num_slots, int(work_times_length), empty_key, tiles[0].shape[0], nb,
              *(blocks + [1] * (2 - nb)),
              order.data_ptr(), *(_ptr(t) for t in seg),
              *(_ptr(t) for t in tiles + [None] * (2 - nb)), *(_ptr(t) for t in counts + [None] * (2 - len(counts))),
              _ptr(stats)]
    dev = order.device
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        # the launch goes to the current device: make it the tensors' (a plan built on cuda:1 while cuda:0 is
        # current); `stream` is already that device's (kernel_for)
        with torch.cuda.device(dev):
            ext.group(fields, stream)
    else:
        ext.group(fields, stream)
