"""Readable PyTorch reference for the dense LoRA ops: the test oracle (the ``"torch"`` backend is its vectorised
form, :mod:`lorakern.torch_backend`, checked against it).

Everything here follows DESIGN.md §1–§3 literally, one distinct slot at a time, so that it is easy to check by
eye. It runs on any device and accumulates in float32 (or in float64 when the inputs are float64, which is how the
tests use it as an oracle). It never reads a page-table entry at or beyond a slot's rank, and it never touches a
token whose slot is ``-1``.

The functions take already-validated, normalised arguments (lists of per-slice tensors, an integer ``slots``
tensor, explicit ``slice_offsets``); the public, validating entry points are in :mod:`lorakern.ops`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["add_lora", "lora_shrink", "lora_expand", "slot_rows", "acc_dtype"]


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise: the accumulation type of the reference."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def slot_rows(page_table: torch.Tensor, ranks: torch.Tensor, slot: int) -> torch.Tensor:
    """Row ids of ``slot``'s rank rows: the first ``ranks[slot]`` entries of its page-table row, nothing beyond."""
    r = int(ranks[slot])
    return page_table[slot, :r].long()


def _active_slots(slots: torch.Tensor) -> list[int]:
    return [int(s) for s in torch.unique(slots).tolist() if s >= 0]


def lora_shrink(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[i, t, j] = x[t] · A_i[slots[t]][j]``; zero for ``j >= rank`` and for ``slots[t] == -1``.

    Shapes: ``x [T, K]``, ``lora_a[i] [rows, K]``, ``page_table [num_slots, max_rank]``; returns
    ``y [S, T, max_rank]`` in float32 (float64 for float64 inputs), written into ``out`` when given.
    """
    S, T, max_rank = len(lora_a), x.shape[0], page_table.shape[1]
    acc = acc_dtype(x, *lora_a)
    y = torch.zeros(S, T, max_rank, dtype=acc, device=x.device)
    for s in _active_slots(slots):
        tok = (slots == s).nonzero().flatten()
        rows = slot_rows(page_table, ranks, s)
        r = rows.numel()
        if r == 0:
            continue
        xs = x[tok].to(acc)  # [n, K]
        for i, a in enumerate(lora_a):
            y[i, tok, :r] = xs @ a[rows].to(acc).T  # [n, r]
    if out is not None:
        out.copy_(y)
        return out
    return y


def lora_expand(
    out: torch.Tensor,
    y: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    slice_offsets: Sequence[int],
) -> torch.Tensor:
    """In place: ``out[t, off_i : off_i + N_i] += scale[s] * y[i, t, :rank] @ B_i[s].T``; returns ``out``.

    ``lora_b[i] [rows, N_i]`` holds ``B_i`` transposed (row ``j`` = column ``j`` of ``B_i``). The sum is formed in
    the accumulation type and rounded to ``out.dtype`` once.
    """
    acc = acc_dtype(out, y, *lora_b)
    for s in _active_slots(slots):
        tok = (slots == s).nonzero().flatten()
        rows = slot_rows(page_table, ranks, s)
        r = rows.numel()
        if r == 0:
            continue
        scale = 1.0 if scales is None else scales[s].to(acc)
        for i, b in enumerate(lora_b):
            off, n = slice_offsets[i], b.shape[1]
            delta = (y[i, tok, :r].to(acc) @ b[rows].to(acc)) * scale  # [n_tok, N_i]
            cur = out[tok, off : off + n].to(acc)
            out[tok, off : off + n] = (cur + delta).to(out.dtype)
    return out


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    slice_offsets: Sequence[int],
) -> torch.Tensor:
    """In place, DESIGN.md §1: ``out[t, off_i:off_i+N_i] += scale[s] * (x[t] @ A_i[s].T) @ B_i[s].T``.

    The rank-r intermediate stays in the accumulation type (never rounded to the input dtype).
    """
    y = lora_shrink(x, lora_a, page_table, ranks, slots)
    return lora_expand(out, y, lora_b, page_table, ranks, scales, slots, slice_offsets)
