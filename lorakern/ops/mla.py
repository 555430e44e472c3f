"""MLA ops (contract, DESIGN.md §3): a LoRA on ``kv_b_proj`` applied on DeepSeek's absorbed decode path.

At decode, engines absorb ``kv_b_proj`` into the query (``W_UK``) and the output (``W_UV``), so its LoRA cannot run
as a plain linear (vLLM loads it and applies it nowhere). These two ops apply it where it belongs:

* :func:`mla_absorbed_q` — ``q_latent[t, h] += scale · (q_nope[t, h] @ B_K^h) @ A``, after ``q_nope @ W_UK``;
* :func:`mla_absorbed_o` — ``out[t, h] += scale · (o_latent[t, h] @ A.T) @ B_V^h.T``, after ``o_latent @ W_UV.T``.

Shapes (``T`` tokens, ``H`` heads, ``C`` = ``kv_lora_rank``, ``Dn`` = ``qk_nope_head_dim``, ``Dv`` =
``v_head_dim``, ``R`` = ``max_rank``)::

    q_latent     [T, H, C]          updated in place (mla_absorbed_q)
    q_nope       [T, H, Dn]
    o_latent     [T, H, C]          attention output in latent space (mla_absorbed_o)
    out          [T, H, Dv]         updated in place (mla_absorbed_o)
    lora_a       [rows, C]          rank rows of kv_b_proj's A (one tensor, or a one-element sequence)
    lora_b       [rows, H·(Dn+Dv)]  rank rows of kv_b_proj's B (row j = column j of B), read per row as
                                    [H, Dn+Dv]: B_K^h = the first Dn of head h, B_V^h = the last Dv
    page_table   int32 [num_slots, R]; ranks int32 [num_slots]; scales float32 [num_slots] or None (= 1.0)
    slots        int [T] (-1 = no LoRA) or a LoRAPlan

All floating tensors share one dtype (fp16 / bf16 / fp32; fp64 on the torch backend). ``H`` and ``Dn`` (q side)
or ``H`` and ``Dv`` (o side) come from the shapes; the other head width is ``lora_b.shape[1] / H`` minus the known
one. Inputs may be strided views (e.g. ``q_nope = q[..., :Dn]``, a transposed bmm result); ``lora_a``/``lora_b``
need unit stride along their width (a copy is made otherwise).

Errors as for the dense ops: wrong dtype → ``TypeError``, wrong shape or value → ``ValueError``, a backend that
cannot run → ``RuntimeError``; all raised before anything is written. Backends: ``torch``
(:func:`lorakern.torch_backend.mla_absorbed_q`, the vectorised form of :mod:`lorakern.reference_mla`),
``triton`` (:mod:`lorakern.triton.mla`) and ``cuda`` (the dense gather kernel in its MoE mode with the heads as
experts: :func:`lorakern.cuda_backend.mla_absorbed_q`).
"""

from __future__ import annotations

from typing import Optional


import torch

from lorakern import torch_backend
from lorakern.backends import select_backend
from lorakern.ops import _dispatch
from lorakern.ops import _validate as V
from lorakern.plan import GATHER_BLOCK_M, LoRAPlan, check_plan_device

__all__ = ["mla_absorbed_q", "mla_absorbed_o"]

_NO_PLAN = torch.empty(0, dtype=torch.int32)


def _plan_args(slots, backend: str, num_slots: int, device, ranks=None):
    """(slots tensor, token_ids, decode tiles, plan_info = [grid programs, max slot or -2]) for the operator."""
    if backend in ("torch", "cuda"):  # cuda groups (token, head) pairs itself (lorakern.moe_grouping)
        if backend == "cuda" and isinstance(slots, LoRAPlan):
            check_plan_device(slots, device, "the tensors are")
        s = slots.slots if isinstance(slots, LoRAPlan) else slots
        max_slot = slots.stats.max_slot if isinstance(slots, LoRAPlan) and slots.stats is not None else -2
        e = _NO_PLAN.to(device)
        return s, e, e, [0, max_slot]
    plan = slots if isinstance(slots, LoRAPlan) else LoRAPlan.from_slots(slots, ranks)
    check_plan_device(plan, device, "the tensors are")
    max_slot = plan.stats.max_slot if plan.stats is not None else -2
    return plan.slots, plan.token_ids, plan.tiles(GATHER_BLOCK_M), [plan.grid_tiles(GATHER_BLOCK_M, num_slots),
                                                                   max_slot]


def _one(name: str, value) -> torch.Tensor:
    t = V.as_slices(name, value)
    if len(t) != 1:
        raise ValueError(f"{name}: kv_b_proj has one slice; expected one tensor, got a sequence of {len(t)}")
    return t[0]


def _check(dst_name: str, dst, src_name: str, src, src_what: str, dst_what: str,
           lora_a, lora_b, page_table, ranks, scales, slots):
    """Shared checks of the two ops (metadata only). ``dst [T, H, *]`` is updated from ``src [T, H, *]``.

    Returns (lora_a, lora_b, num_slots, max_rank)."""
    V.check_float(src_name, src)
    V.check_dim(src_name, src, 3, src_what)
    V.check_float(dst_name, dst, src.dtype)
    V.check_dim(dst_name, dst, 3, dst_what)
    if dst.shape[0] != src.shape[0]:
        raise ValueError(f"{dst_name}: has {dst.shape[0]} tokens, but {src_name} has {src.shape[0]}")
    if dst.shape[1] != src.shape[1]:
        raise ValueError(f"{dst_name}: has {dst.shape[1]} heads, but {src_name} has {src.shape[1]}")
    T, H = src.shape[0], src.shape[1]
    if H < 1:
        raise ValueError(f"{src_name}: needs at least one head, got shape {tuple(src.shape)}")
    for name, t in ((src_name, src), (dst_name, dst)):
        if t.shape[2] < 1:
            raise ValueError(f"{name}: its last dimension must be positive, got shape {tuple(t.shape)}")
    num_slots, max_rank = V.check_pages(page_table, ranks, scales)
    V.check_slots_meta(slots, T)
    a, b = _one("lora_a", lora_a), _one("lora_b", lora_b)
    return a, b, num_slots, max_rank


def _check_rows(a, b, dtype, C: int) -> int:
    rows_a = V.check_rows("lora_a", [a], dtype, C, "C")
    rows_b = V.check_rows("lora_b", [b], dtype, None, "H*(Dn+Dv)")
    if rows_a != rows_b:
        raise ValueError(f"lora_b: has {rows_b} rows, but lora_a has {rows_a}; they share one row space")
    return rows_a


def _head_width(b, H: int, known: int, known_name: str, other_name: str) -> int:
    """``Dn + Dv`` from ``lora_b``'s width, checked: divisible by ``H`` and leaving a positive other width."""
    width = b.shape[1]
    if width % H:
        raise ValueError(f"lora_b: width {width} is not divisible by H={H} heads (expected H*(Dn+Dv))")
    dhead = width // H
    if dhead - known < 1:
        raise ValueError(f"lora_b: width {width} = H*{dhead} leaves {other_name}={dhead - known} per head after "
                         f"{known_name}={known}; expected H*(Dn+Dv) with Dn, Dv >= 1")
    return dhead


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------ torch.library ops
@_dispatch.custom_op("lorakern::mla_absorbed_q", mutates_args=("q_latent",))
def _mla_absorbed_q_op(
    q_latent: torch.Tensor,
    q_nope: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    token_ids: torch.Tensor,
    tiles: torch.Tensor,
    plan_info: list[int],
    backend: str,
) -> None:
    V.check_values(page_table, ranks, lora_a.shape[0], slots, plan_info[1])
    page_table, ranks, scales = V.kernel_layout(page_table, ranks, scales)
    if q_latent.shape[0] == 0:
        return
    if backend == "torch":
        torch_backend.mla_absorbed_q(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, slots)
    elif backend == "triton":
        from lorakern.triton import mla as tk

        tk.mla_absorbed_q(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles,
                          plan_info[0])
    elif backend == "cuda":
        from lorakern import cuda_backend

        cuda_backend.mla_absorbed_q(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, slots)
    else:
        raise RuntimeError(f"mla_absorbed_q: backend {backend!r} has no implementation of this op")


@_mla_absorbed_q_op.register_fake
def _(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, slots, token_ids, tiles, plan_info, backend):
    return None


@_dispatch.custom_op("lorakern::mla_absorbed_o", mutates_args=("out",))
def _mla_absorbed_o_op(
    out: torch.Tensor,
    o_latent: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    token_ids: torch.Tensor,
    tiles: torch.Tensor,
    plan_info: list[int],
    backend: str,
) -> None:
    V.check_values(page_table, ranks, lora_a.shape[0], slots, plan_info[1])
    page_table, ranks, scales = V.kernel_layout(page_table, ranks, scales)
    if out.shape[0] == 0:
        return
    if backend == "torch":
        torch_backend.mla_absorbed_o(out, o_latent, lora_a, lora_b, page_table, ranks, scales, slots)
    elif backend == "triton":
        from lorakern.triton import mla as tk

        tk.mla_absorbed_o(out, o_latent, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, plan_info[0])
    elif backend == "cuda":
        from lorakern import cuda_backend

        cuda_backend.mla_absorbed_o(out, o_latent, lora_a, lora_b, page_table, ranks, scales, slots)
    else:
        raise RuntimeError(f"mla_absorbed_o: backend {backend!r} has no implementation of this op")


@_mla_absorbed_o_op.register_fake
def _(out, o_latent, lora_a, lora_b, page_table, ranks, scales, slots, token_ids, tiles, plan_info, backend):
    return None


# ------------------------------------------------------------------------------------------ public API
def mla_absorbed_q(
    q_latent: torch.Tensor,
    q_nope: torch.Tensor,
    lora_a,
    lora_b,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """kv_b_proj LoRA on the absorbed query, in place, for every token ``t`` with ``s = slots[t] >= 0``::

        q_latent[t, h] += scales[s] * (q_nope[t, h] @ B_K^h[s]) @ A[s]        for every head h

    ``q_latent [T, H, C]`` (already holding ``q_nope @ W_UK``), ``q_nope [T, H, Dn]``, ``lora_a [rows, C]``,
    ``lora_b [rows, H*(Dn+Dv)]`` with ``B_K^h`` the first ``Dn`` columns of head ``h``'s ``Dn+Dv``. Computed at
    each slot's real rank with a float32 intermediate, never forming ``B_K^h @ A``; tokens with slot ``-1`` (and
    rank-0 adapters) are left untouched bit for bit. Returns ``q_latent``.
    """
    a, b, num_slots, max_rank = _check("q_latent", q_latent, "q_nope", q_nope, "[T, H, Dn]",
                                       "[T, H, C]", lora_a, lora_b, page_table, ranks, scales, slots)
    H, Dn, C = q_nope.shape[1], q_nope.shape[2], q_latent.shape[2]
    _check_rows(a, b, q_nope.dtype, C)
    _head_width(b, H, Dn, "Dn", "Dv")
    s0 = slots.slots if isinstance(slots, LoRAPlan) else slots
    V.check_device(q_nope.device, q_latent=q_latent, lora_a=a, lora_b=b, page_table=page_table, ranks=ranks,
                   scales=scales, slots=s0)
    be = select_backend(backend, q_nope.device, q_nope.dtype, max_rank, op="mla_absorbed_q")
    s, tok, tiles, info = _plan_args(slots, be, num_slots, q_nope.device, ranks)
    q_nope = V.apart_from(q_latent, q_nope)
    _dispatch.call("lorakern::mla_absorbed_q", q_latent, q_nope, _rows(a), _rows(b), page_table, ranks, scales, s,
                   tok, tiles, info, be)
    return q_latent


def mla_absorbed_o(
    out: torch.Tensor,
    o_latent: torch.Tensor,
    lora_a,
    lora_b,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """kv_b_proj LoRA on the absorbed output, in place, for every token ``t`` with ``s = slots[t] >= 0``::

        out[t, h] += scales[s] * (o_latent[t, h] @ A[s].T) @ B_V^h[s].T        for every head h

    ``out [T, H, Dv]`` (already holding ``o_latent @ W_UV.T``), ``o_latent [T, H, C]``, ``lora_a [rows, C]``,
    ``lora_b [rows, H*(Dn+Dv)]`` with ``B_V^h`` the last ``Dv`` columns of head ``h``'s ``Dn+Dv``. Computed at
    each slot's real rank with a float32 intermediate; tokens with slot ``-1`` (and rank-0 adapters) are left
    untouched bit for bit. Returns ``out``.
    """
    a, b, num_slots, max_rank = _check("out", out, "o_latent", o_latent, "[T, H, C]",
                                       "[T, H, Dv]", lora_a, lora_b, page_table, ranks, scales, slots)
    H, Dv, C = out.shape[1], out.shape[2], o_latent.shape[2]
    _check_rows(a, b, o_latent.dtype, C)
    _head_width(b, H, Dv, "Dv", "Dn")
    s0 = slots.slots if isinstance(slots, LoRAPlan) else slots
    V.check_device(o_latent.device, out=out, lora_a=a, lora_b=b, page_table=page_table, ranks=ranks,
                   scales=scales, slots=s0)
    be = select_backend(backend, o_latent.device, o_latent.dtype, max_rank, op="mla_absorbed_o")
    s, tok, tiles, info = _plan_args(slots, be, num_slots, o_latent.device, ranks)
    o_latent = V.apart_from(out, o_latent)
    _dispatch.call("lorakern::mla_absorbed_o", out, o_latent, _rows(a), _rows(b), page_table, ranks, scales, s, tok,
                   tiles, info, be)
    return out
