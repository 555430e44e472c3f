"""The dense LoRA ops (contract, DESIGN.md §3): ``add_lora``, ``lora_shrink``, ``lora_expand``.

Each public function checks its arguments (shapes, dtypes, devices; typed errors naming the argument), resolves
the backend, and calls a real ``torch.library`` operator (``torch.ops.lorakern.*``) whose schema marks what it
mutates and which has a fake implementation, so the ops work under ``torch.compile(fullgraph=True)`` and inside
CUDA graphs. The operator's implementation checks values (slot and row ranges) and then runs the backend.

Shapes (``T`` tokens, ``K`` input width, ``S`` slices of widths ``N_i``, ``R`` = ``max_rank``)::

    x            [T, K]            fp16 / bf16 / fp32 (fp64: torch backend)
    lora_a       S × [rows, K]     rank rows of A (row j of an adapter = row j of its A)
    lora_b       S × [rows, N_i]   rank rows of B transposed (row j = column j of B)
    page_table   int32 [num_slots, R]   row ids; only the first ranks[s] entries of a slot are read
    ranks        int32 [num_slots]
    scales       float32 [num_slots] or None (= 1.0)
    slots        int [T] (-1 = no LoRA) or a LoRAPlan
    out          [T, >= max(off_i + N_i)], same dtype as x
    y            float32 [S, T, R]  (lora_shrink's result, lora_expand's input)
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from lorakern import torch_backend
from lorakern.backends import select_backend
from lorakern.ops import _dispatch
from lorakern.ops import _validate as V
from lorakern.plan import GATHER_BLOCK_M, SEGMENT_BLOCK_M, LoRAPlan, check_plan_device

__all__ = ["add_lora", "lora_shrink", "lora_expand", "choose_path", "GATHER_MAX_MEAN_TOKENS"]

#: The Triton gather path (one fused launch per token block) is used while an adapter has on average at most
#: this many tokens in the batch. Reason: up to GATHER_BLOCK_M tokens an adapter's segment is one block, so the
#: fused kernel reads each adapter's A and B rows exactly once and never writes the rank-r intermediate to memory,
#: and decode is bound by those weight bytes. Longer segments would make the fused kernel re-read A and B per
#: 16-token block and serialise shrink (all of K) and expand (all of N) in one program; the segment path instead
#: spreads rank tiles and N tiles over programs with 64-token tensor-core tiles. Override with
#: ``LORAKERN_TRITON_PATH=gather|segment``.
GATHER_MAX_MEAN_TOKENS = GATHER_BLOCK_M

_PATHS = {"gather": 0, "segment": 1}
_NO_PLAN = torch.empty(0, dtype=torch.int32)


def choose_path(plan: LoRAPlan) -> str:
    """``"gather"`` or ``"segment"`` for a plan (see :data:`GATHER_MAX_MEAN_TOKENS`)."""
    forced = os.environ.get("LORAKERN_TRITON_PATH", "").strip()
    if forced:
        if forced not in _PATHS:
            raise ValueError(f"LORAKERN_TRITON_PATH: expected 'gather' or 'segment', got {forced!r}")
        return forced
    if plan.stats is None:  # static plan: decided by its size, since the mix is unknown until replay
        return "gather" if plan.num_tokens <= 4 * GATHER_BLOCK_M * 8 else "segment"
    return "gather" if plan.stats.mean_count <= GATHER_MAX_MEAN_TOKENS else "segment"


def _plan_args(slots, backend: str, num_slots: int, device, ranks=None):
    """(slots tensor, token_ids, gather tiles, segment tiles, plan_info) for the operator. A plain slots tensor
    becomes a plan with its tiles in descending rank order (``LoRAPlan.from_slots(slots, ranks)``).

    ``plan_info`` = [grid of the gather tiles, grid of the segment tiles, path (0 gather, 1 segment),
    largest slot (-2 = unknown), longest LoRA segment (-1 = unknown)]."""
    if backend == "torch":
        s = slots.slots if isinstance(slots, LoRAPlan) else slots
        max_slot, max_count = -2, -1
        if isinstance(slots, LoRAPlan) and slots.stats is not None:
            max_slot, max_count = slots.stats.max_slot, slots.stats.max_count
        e = _NO_PLAN.to(device)
        return s, e, e, e, [0, 0, 0, max_slot, max_count]
    plan = slots if isinstance(slots, LoRAPlan) else LoRAPlan.from_slots(slots, ranks)
    check_plan_device(plan, device)
    max_slot = plan.stats.max_slot if plan.stats is not None else -2
    info = [
        plan.grid_tiles(GATHER_BLOCK_M, num_slots),
        plan.grid_tiles(SEGMENT_BLOCK_M, num_slots),
        _PATHS[choose_path(plan)],
        max_slot,
        plan.stats.max_count if plan.stats is not None else -1,
    ]
    return plan.slots, plan.token_ids, plan.tiles(GATHER_BLOCK_M), plan.tiles(SEGMENT_BLOCK_M), info


def _check_common(x, page_table, ranks, scales, slots):
    V.check_float("x", x)
    V.check_dim("x", x, 2, "[T, K]")
    num_slots, max_rank = V.check_pages(page_table, ranks, scales)
    V.check_slots_meta(slots, x.shape[0])
    s = slots.slots if isinstance(slots, LoRAPlan) else slots
    if not V.on_device(x.device, page_table, ranks, scales, s):
        V.check_device(x.device, page_table=page_table, ranks=ranks, scales=scales, slots=s)  # (raises)
    return num_slots, max_rank


def _rows(ts):
    """Rank-row tensors with unit stride along their width (kernels index rows by a row stride)."""
    return [t if t.stride()[-1] == 1 else t.contiguous() for t in ts]  # (stride() is cheaper than stride(-1))


_KERNEL_MODULES: dict = {}


def _kernels(backend: str, op: str):
    """The kernel module of a compiled backend: ``triton`` and ``cuda`` share one signature per op. The module is
    imported on first use and kept (the function is still looked up on it per call)."""
    mod = _KERNEL_MODULES.get(backend)
    if mod is None:
        if backend == "triton":
            from lorakern.triton import lora as mod
        elif backend == "cuda":
            from lorakern import cuda_backend as mod
        else:
            raise RuntimeError(f"{op}: backend {backend!r} has no implementation of this op")
        _KERNEL_MODULES[backend] = mod
    return getattr(mod, op)


# ------------------------------------------------------------------------------------------ torch.library ops
@_dispatch.custom_op("lorakern::add_lora", mutates_args=("out",))
def _add_lora_op(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    token_ids: torch.Tensor,
    tiles_gather: torch.Tensor,
    tiles_segment: torch.Tensor,
    slice_offsets: list[int],
    plan_info: list[int],
    backend: str,
) -> None:
    V.check_values(page_table, ranks, lora_a[0].shape[0], slots, plan_info[3])
    page_table, ranks, scales = V.kernel_layout(page_table, ranks, scales)
    if x.shape[0] == 0:
        return
    if backend == "torch":
        torch_backend.add_lora(out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets, plan_info[4])
    else:
        _kernels(backend, "add_lora")(out, x, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles_gather,
                                      tiles_segment, slice_offsets, plan_info)


@_add_lora_op.register_fake
def _(out, x, lora_a, lora_b, page_table, ranks, scales, slots, token_ids, tiles_gather, tiles_segment,
      slice_offsets, plan_info, backend):
    return None


@_dispatch.custom_op("lorakern::lora_shrink", mutates_args=("y",))
def _lora_shrink_op(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
    token_ids: torch.Tensor,
    tiles_gather: torch.Tensor,
    tiles_segment: torch.Tensor,
    plan_info: list[int],
    backend: str,
) -> None:
    V.check_values(page_table, ranks, lora_a[0].shape[0], slots, plan_info[3])
    page_table, ranks, _ = V.kernel_layout(page_table, ranks, None)
    if backend == "torch":
        torch_backend.lora_shrink(x, lora_a, page_table, ranks, slots, y, plan_info[4])
    else:
        _kernels(backend, "lora_shrink")(y, x, lora_a, page_table, ranks, token_ids, tiles_gather, tiles_segment,
                                         plan_info)


@_lora_shrink_op.register_fake
def _(y, x, lora_a, page_table, ranks, slots, token_ids, tiles_gather, tiles_segment, plan_info, backend):
    return None


@_dispatch.custom_op("lorakern::lora_expand", mutates_args=("out",))
def _lora_expand_op(
    out: torch.Tensor,
    y: torch.Tensor,
    lora_b: list[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    token_ids: torch.Tensor,
    tiles_gather: torch.Tensor,
    tiles_segment: torch.Tensor,
    slice_offsets: list[int],
    plan_info: list[int],
    backend: str,
) -> None:
    V.check_values(page_table, ranks, lora_b[0].shape[0], slots, plan_info[3])
    page_table, ranks, scales = V.kernel_layout(page_table, ranks, scales)
    if out.shape[0] == 0:
        return
    if backend == "torch":
        torch_backend.lora_expand(out, y, lora_b, page_table, ranks, scales, slots, slice_offsets, plan_info[4])
    else:
        _kernels(backend, "lora_expand")(out, y, lora_b, page_table, ranks, scales, token_ids, tiles_gather,
                                         tiles_segment, slice_offsets, plan_info)


@_lora_expand_op.register_fake
def _(out, y, lora_b, page_table, ranks, scales, slots, token_ids, tiles_gather, tiles_segment, slice_offsets,
      plan_info, backend):
    return None


# ------------------------------------------------------------------------------------------ public API
def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a,
    lora_b,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots,
    *,
    slice_offsets: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """In place, for every slice ``i`` and token ``t`` with ``s = slots[t] >= 0``::

        out[t, off_i : off_i + N_i] += scales[s] * (x[t] @ A_i[s].T) @ B_i[s].T

    computed at each slot's real rank with a float32 intermediate. Tokens with slot ``-1`` are left untouched bit
    for bit. ``slice_offsets`` defaults to the running sum of the ``N_i``. Returns ``out``.
    """
    num_slots, max_rank = _check_common(x, page_table, ranks, scales, slots)
    a, b = V.as_slices("lora_a", lora_a), V.as_slices("lora_b", lora_b)
    if len(a) != len(b):
        raise ValueError(f"lora_b: {len(b)} slices, but lora_a has {len(a)}")
    rows_a = V.check_rows("lora_a", a, x.dtype, x.shape[1], "K")
    rows_b = V.check_rows("lora_b", b, x.dtype, None, "N_i")
    if rows_a != rows_b:
        raise ValueError(f"lora_b: has {rows_b} rows, but lora_a has {rows_a}; they share one row space")
    V.check_float("out", out, x.dtype)
    V.check_dim("out", out, 2, "[T, N_total]")
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"out: has {out.shape[0]} rows, but x has {x.shape[0]} tokens")
    device = x.device
    if not V.on_device(device, out, *a, *b):  # (the names only for the error)
        V.check_device(device, out=out, **{f"lora_a[{i}]": t for i, t in enumerate(a)},
                       **{f"lora_b[{i}]": t for i, t in enumerate(b)})
    offs = V.resolve_offsets(slice_offsets, [t.shape[1] for t in b], out.shape[1])
    be = select_backend(backend, device, x.dtype, max_rank, op="add_lora")
    s, tok, tg, ts, info = _plan_args(slots, be, num_slots, device, ranks)
    x = V.apart_from(out, x)
    _dispatch.call("lorakern::add_lora", out, x, _rows(a), _rows(b), page_table, ranks, scales, s, tok, tg, ts,
                   offs, info, be)
    return out


def lora_shrink(
    x: torch.Tensor,
    lora_a,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    slots,
    *,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y[i, t, j] = x[t] · A_i[slots[t]][j]`` as float32 ``[S, T, max_rank]``; zero for ``j >= rank`` and for
    tokens with slot ``-1``. Written into ``out`` (float32, that shape) when given, else allocated."""
    num_slots, max_rank = _check_common(x, page_table, ranks, None, slots)
    a = V.as_slices("lora_a", lora_a)
    V.check_rows("lora_a", a, x.dtype, x.shape[1], "K")
    if not V.on_device(x.device, *a):
        V.check_device(x.device, **{f"lora_a[{i}]": t for i, t in enumerate(a)})  # (raises)
    shape = (len(a), x.shape[0], max_rank)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        V.check_float("out", out, torch.float32)
        if tuple(out.shape) != shape:
            raise ValueError(f"out: expected shape {shape} [S, T, max_rank], got {tuple(out.shape)}")
        V.check_device(x.device, out=out)
    be = select_backend(backend, x.device, x.dtype, max_rank, op="lora_shrink")
    s, tok, tg, ts, info = _plan_args(slots, be, num_slots, x.device, ranks)
    _dispatch.call("lorakern::lora_shrink", out, x, _rows(a), page_table, ranks, s, tok, tg, ts, info, be)
    return out


def lora_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    lora_b,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots,
    *,
    slice_offsets: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: ``out[t, off_i:off_i+N_i] += scales[s] * y[i, t, :rank] @ B_i[s].T`` for tokens with a slot.

    ``y``: float32 ``[S, T, max_rank]`` (as :func:`lora_shrink` returns). Returns ``out``."""
    V.check_float("out", out)
    V.check_dim("out", out, 2, "[T, N_total]")
    num_slots, max_rank = V.check_pages(page_table, ranks, scales)
    V.check_float("y", y, torch.float32)
    b = V.as_slices("lora_b", lora_b)
    V.check_rows("lora_b", b, out.dtype, None, "N_i")
    T = out.shape[0]
    if tuple(y.shape) != (len(b), T, max_rank):
        raise ValueError(f"y: expected shape {(len(b), T, max_rank)} [S, T, max_rank], got {tuple(y.shape)}")
    V.check_slots_meta(slots, T)
    s0 = slots.slots if isinstance(slots, LoRAPlan) else slots
    if not V.on_device(out.device, y, page_table, ranks, scales, s0, *b):
        V.check_device(out.device, y=y, page_table=page_table, ranks=ranks, scales=scales, slots=s0,
                       **{f"lora_b[{i}]": t for i, t in enumerate(b)})  # (raises)
    offs = V.resolve_offsets(slice_offsets, [t.shape[1] for t in b], out.shape[1])
    be = select_backend(backend, out.device, out.dtype, max_rank, op="lora_expand")
    s, tok, tg, ts, info = _plan_args(slots, be, num_slots, out.device, ranks)
    y = V.apart_from(out, y)
    _dispatch.call("lorakern::lora_expand", out, y, _rows(b), page_table, ranks, scales, s, tok, tg, ts, offs,
                   info, be)
    return out
