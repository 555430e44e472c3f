"""The packed MoE-expert LoRA op (contract, DESIGN.md §2–§3): ``add_lora_moe``.

A fused-experts MoE layer runs, per token ``t`` and each of its ``topk`` routed experts ``e = topk_ids[t, k]``, the
expert's ``gate_up`` projection (before the activation) and its ``down`` projection (before the routed weighted
sum). ``add_lora_moe`` adds one adapter per token to either, at the place engines put it::

    out[t, k, off_i : off_i + N_i] += scales[s] * w[t, k] * (x[t(, k)] @ A_i[s, e].T) @ B_i[s, e].T

for every slice ``i`` (gate and up of ``gate_up``; the single slice of ``down``), with ``s = slots[t]`` (``-1`` =
no LoRA: the token's ``out`` rows are left untouched bit for bit) and ``w = topk_weights`` (``1`` when ``None``).

Shapes (``T`` tokens, ``topk`` experts per token, ``E`` experts, ``K`` input width, ``S`` slices of widths
``N_i``, ``R`` = ``max_rank``)::

    x            [T, K]               shared by a token's experts (gate_up: the hidden state)
              or [T, topk, K]         one row per (token, expert) pair (down: the activated intermediate)
    topk_ids     int [T, topk]        expert of each pair, 0 <= e < E
    lora_a       S × [rows, E, K]     packed rank rows: lora_a[j, e] = row j of expert e's A
    lora_b       S × [rows, E, N_i]   packed rank rows: lora_b[j, e] = column j of expert e's B
    page_table   int32 [num_slots, R] row ids; only the first ranks[s] entries of a slot are read
    ranks        int32 [num_slots];   scales float32 [num_slots] or None (= 1.0)
    slots        int [T] (-1 = no LoRA) or a LoRAPlan
    topk_weights [T, topk] float (float32 or x's dtype) or None
    out          [T, topk, >= max(off_i + N_i)], same dtype as x

All floating tensors but ``topk_weights`` share one dtype (fp16 / bf16 / fp32; fp64 on the torch backend). One
packed rank row holds that rank component of every expert (DESIGN.md §2), so an adapter's expert LoRA moves into
the pool as a few large copies; :class:`lorakern.pool.AdapterPool` MoE targets give exactly these views.

Backends: ``torch`` (:func:`lorakern.torch_backend.add_lora_moe`; :mod:`lorakern.reference_moe` is the oracle),
``triton`` (:mod:`lorakern.triton.moe`) and ``cuda``
(:func:`lorakern.cuda_backend.add_lora_moe`: the dense gather kernel in its MoE mode): each one launch for all
tokens, experts, adapters and slices, grouped by ``(adapter, expert)`` on the device
(:mod:`lorakern.moe_grouping`).

Errors as for the dense ops: wrong dtype → ``TypeError``; wrong shape, slot / row / expert id out of range →
``ValueError``; a backend that cannot run → ``RuntimeError``; all raised before anything is written. Value checks
(slots, page table, ``topk_ids``) read a few numbers back to the host and are skipped while a CUDA graph is being
captured; the ``topk_ids`` check is cached per tensor (same object, unmodified), so the ``down`` call of a layer
reuses the check of its ``gate_up`` call.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from lorakern import torch_backend
from lorakern.backends import select_backend
from lorakern.ops import _dispatch
from lorakern.ops import _validate as V
from lorakern.plan import LoRAPlan, check_plan_device

__all__ = ["add_lora_moe"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Packed rank rows with unit stride along their width (kernels index rows and experts by strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_moe_rows(name: str, rows: Sequence[torch.Tensor], dtype, width: Optional[int], wname: str):
    """Per-slice ``[num_rows, E, width_i]`` tensors sharing ``num_rows`` and ``E``. Returns ``(num_rows, E)``."""
    num_rows = E = None
    for i, r in enumerate(rows):
        n = f"{name}[{i}]" if len(rows) > 1 else name
        V.check_float(n, r, dtype)
        V.check_dim(n, r, 3, f"[num_rows, E, {wname}] (packed MoE rank rows)")
        if width is not None and r.shape[2] != width:
            raise ValueError(f"{n}: expected {wname}={width} in its last dimension, got shape {tuple(r.shape)}")
        if r.shape[1] < 1:
            raise ValueError(f"{n}: needs at least one expert, got shape {tuple(r.shape)}")
        if num_rows is None:
            num_rows, E = r.shape[0], r.shape[1]
        else:
            if r.shape[0] != num_rows:
                raise ValueError(f"{n}: has {r.shape[0]} rows, but {name}[0] has {num_rows}; slices share one row "
                                 f"space")
            if r.shape[1] != E:
                raise ValueError(f"{n}: has {r.shape[1]} experts, but {name}[0] has {E}")
    return num_rows, E


# ------------------------------------------------------------------------------------------ value checks
_IDS_CHECK_CACHE: dict = {}


version_of = V.version_of


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """``0 <= topk_ids < E`` (ValueError naming the first offender). One host read per distinct, unmodified
    ``topk_ids`` tensor (cached, so a layer's gate_up and down calls pay once); skipped during CUDA-graph capture."""
    if topk_ids.numel() == 0 or V._capturing(topk_ids.device):
        return
    key = id(topk_ids)
    ver = version_of(topk_ids)
    hit = _IDS_CHECK_CACHE.get(key)
    if hit is not None and ver is not None and hit[0]() is topk_ids and hit[1] == ver and hit[2] < num_experts:
        return  # this very tensor, unchanged since it was found within [0, hi]; hi fits this E
    lo, hi = (int(v) for v in torch.stack(list(torch.aminmax(topk_ids))).tolist())
    if lo < 0 or hi >= num_experts:
        bad = ((topk_ids < 0) | (topk_ids >= num_experts)).nonzero()[0].tolist()
        t, k = bad
        raise ValueError(f"topk_ids: expert id {int(topk_ids[t, k])} at [{t}, {k}] is out of range for lora_a/lora_b "
                         f"with E={num_experts} experts (expected 0 <= e < {num_experts})")
    if ver is None:
        return  # an inference tensor: no version counter, so nothing can be cached about it
    if len(_IDS_CHECK_CACHE) > 64:
        _IDS_CHECK_CACHE.clear()
    _IDS_CHECK_CACHE[key] = (weakref.ref(topk_ids), ver, hi)


def _plan_args(slots, backend: str, device):
    """(slots tensor, plan_info = [largest slot (-2 = unknown)]) for the operator. The MoE kernel groups
    (token, expert) pairs itself, so only the plan's slots (and its known largest slot) are used."""
    if isinstance(slots, LoRAPlan):
        if backend != "torch":
            check_plan_device(slots, device)
        max_slot = slots.stats.max_slot if slots.stats is not None else -2
        return slots.slots, [max_slot]
    return slots, [-2]


# ------------------------------------------------------------------------------------------ torch.library op
@_dispatch.custom_op("lorakern::add_lora_moe", mutates_args=("out",))
def _add_lora_moe_op(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    slice_offsets: list[int],
    plan_info: list[int],
    backend: str,
) -> None:
    V.check_values(page_table, ranks, lora_a[0].shape[0], slots, plan_info[0])
    page_table, ranks, scales = V.kernel_layout(page_table, ranks, scales)
    E = lora_a[0].shape[1]
    check_topk_ids(topk_ids, E)
    if out.shape[0] == 0 or out.shape[1] == 0:
        return
    if backend == "torch":
        torch_backend.add_lora_moe(out, x, topk_ids, lora_a, lora_b, page_table, ranks, scales, slots, topk_weights,
                                   slice_offsets)
    elif backend in ("triton", "cuda"):
        if backend == "triton":
            from lorakern.triton import moe as kernels
        else:
            from lorakern import cuda_backend as kernels
        kernels.add_lora_moe(out, x, topk_ids, lora_a, lora_b, page_table, ranks, scales, slots, topk_weights,
                             slice_offsets)
    else:
        raise RuntimeError(f"add_lora_moe: backend {backend!r} has no implementation of this op")


@_add_lora_moe_op.register_fake
def _(out, x, topk_ids, lora_a, lora_b, page_table, ranks, scales, slots, topk_weights, slice_offsets, plan_info,
      backend):
    return None


# ------------------------------------------------------------------------------------------ public API
def add_lora_moe(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    lora_a,
    lora_b,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots,
    *,
    topk_weights: Optional[torch.Tensor] = None,
    slice_offsets: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """In place, for every token ``t`` with ``s = slots[t] >= 0``, each ``k < topk`` and every slice ``i``::

        out[t, k, off_i : off_i + N_i] += scales[s] * w[t, k] * (x[t(, k)] @ A_i[s, e].T) @ B_i[s, e].T

    with ``e = topk_ids[t, k]``, ``w = topk_weights`` (1 when ``None``), ``A_i[s, e] = lora_a[i][rows_s, e]`` and
    ``B_i[s, e].T = lora_b[i][rows_s, e]`` over the slot's ``ranks[s]`` page-table rows. ``x`` is ``[T, K]`` (one
    input for all of a token's experts, as for gate_up) or ``[T, topk, K]`` (one per pair, as for down); ``out``
    is ``[T, topk, N_total]``. ``slice_offsets`` (keyword, an addition to the DESIGN.md §3 signature) defaults to
    the running sum of the ``N_i`` (gate then up). Computed at each slot's real rank with a float32 intermediate;
    tokens with slot ``-1`` and rank-0 slots are left untouched bit for bit. Returns ``out``.
    """
    V.check_float("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected a 2-D tensor [T, K] or a 3-D tensor [T, topk, K], got shape {tuple(x.shape)}")
    T, K = x.shape[0], x.shape[-1]
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids: expected an integer torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"topk_ids: expected an integer tensor (int32 or int64), got {V._dt(topk_ids.dtype)}")
    V.check_dim("topk_ids", topk_ids, 2, "[T, topk]")
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: has {topk_ids.shape[0]} rows, but x has {T} tokens")
    topk = topk_ids.shape[1]
    if x.dim() == 3 and x.shape[1] != topk:
        raise ValueError(f"x: a per-expert input [T, topk, K] must have topk={topk} (topk_ids' width), got shape "
                         f"{tuple(x.shape)}")
    num_slots, max_rank = V.check_pages(page_table, ranks, scales)
    V.check_slots_meta(slots, T)
    a, b = V.as_slices("lora_a", lora_a), V.as_slices("lora_b", lora_b)
    if len(a) != len(b):
        raise ValueError(f"lora_b: {len(b)} slices, but lora_a has {len(a)}")
    rows_a, E = _check_moe_rows("lora_a", a, x.dtype, K, "K")
    rows_b, E_b = _check_moe_rows("lora_b", b, x.dtype, None, "N_i")
    if rows_a != rows_b:
        raise ValueError(f"lora_b: has {rows_b} rows, but lora_a has {rows_a}; they share one row space")
    if E_b != E:
        raise ValueError(f"lora_b: has {E_b} experts, but lora_a has {E}")
    V.check_float("out", out, x.dtype)
    V.check_dim("out", out, 3, "[T, topk, N_total]")
    if out.shape[0] != T or out.shape[1] != topk:
        raise ValueError(f"out: expected shape ({T}, {topk}, N_total) to match x and topk_ids, got "
                         f"{tuple(out.shape)}")
    if topk_weights is not None:
        V.check_float("topk_weights", topk_weights)
        if topk_weights.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"topk_weights: expected dtype float32 or x's {V._dt(x.dtype)}, got "
                            f"{V._dt(topk_weights.dtype)}")
        if tuple(topk_weights.shape) != (T, topk):
            raise ValueError(f"topk_weights: expected shape ({T}, {topk}) like topk_ids, got "
                             f"{tuple(topk_weights.shape)}")
    if num_slots * E >= 2**31 - 1:
        raise ValueError(f"page_table: {num_slots} slots × E={E} experts exceed the int32 (slot, expert) key space")
    s0 = slots.slots if isinstance(slots, LoRAPlan) else slots
    V.check_device(x.device, out=out, topk_ids=topk_ids, page_table=page_table, ranks=ranks, scales=scales,
                   slots=s0, topk_weights=topk_weights, **{f"lora_a[{i}]": t for i, t in enumerate(a)},
                   **{f"lora_b[{i}]": t for i, t in enumerate(b)})
    offs = V.resolve_offsets(slice_offsets, [t.shape[2] for t in b], out.shape[2])
    be = select_backend(backend, x.device, x.dtype, max_rank, op="add_lora_moe")
    s, info = _plan_args(slots, be, x.device)
    x = V.apart_from(out, x)
    _dispatch.call("lorakern::add_lora_moe", out, x, topk_ids, [_rows(t) for t in a], [_rows(t) for t in b],
                   page_table, ranks, scales, s, topk_weights, offs, info, be)
    return out
