"""Readable PyTorch reference for the packed MoE LoRA op (DESIGN.md §2–§3); the ``"torch"`` backend is its
vectorised form (:func:`lorakern.torch_backend.add_lora_moe`).

For token ``t``, its ``k``-th routed expert ``e = topk_ids[t, k]`` and its adapter slot ``s = slots[t]`` (``-1`` =
no LoRA), every slice ``i`` of a fused-experts target (``gate_up``: slices gate and up; ``down``: one slice)::

    out[t, k, off_i : off_i + N_i] += scale[s] * w[t, k] * (x[t(, k)] @ A_i[s, e].T) @ B_i[s, e].T

with ``w = topk_weights`` (``1`` when absent). The packed rank rows hold every expert: row ``j`` of slot ``s`` is
``lora_a_i[page_table[s, j], e, :]`` = row ``j`` of ``A_i[s, e]`` and ``lora_b_i[page_table[s, j], e, :]`` = column
``j`` of ``B_i[s, e]``, for every expert ``e`` at once.

The computation goes one distinct ``(slot, expert)`` group at a time — exactly the grouping the Triton kernel does
on the device — reads only the first ``ranks[s]`` page-table entries of a slot, never touches a pair whose token
has slot ``-1``, and rounds each slice's sum to ``out.dtype`` once. Accumulation is float32, or float64 for
float64 inputs (how the tests use it as an oracle). Arguments are already validated and normalised by
:func:`lorakern.ops.add_lora_moe`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lorakern.reference import acc_dtype, slot_rows

__all__ = ["add_lora_moe", "pair_groups"]


def pair_groups(slots: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    """The (token, k) pairs with an adapter, grouped by ``(slot, expert)``.

    Returns a list of ``(slot, expert, token_ids, k_ids)`` (``token_ids``/``k_ids`` int64 on ``slots``' device),
    groups in increasing ``slot * E + expert`` order, pairs within a group in ``(t, k)`` order."""
    T, topk = topk_ids.shape
    dev = topk_ids.device
    tok = torch.arange(T, device=dev).repeat_interleave(topk)  # token of pair p = t * topk + k
    kk = torch.arange(topk, device=dev).repeat(T)  # its k
    slot_p = slots.to(device=dev, dtype=torch.int64)[tok]
    key = slot_p * num_experts + topk_ids.reshape(-1).to(torch.int64)
    live = (slot_p >= 0).nonzero().flatten()
    if live.numel() == 0:
        return []
    key_sorted, order = torch.sort(key[live], stable=True)
    uniq, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    groups = []
    for kv, sel in zip(uniq.tolist(), torch.split(live[order], counts.tolist())):
        s, e = divmod(kv, num_experts)
        groups.append((s, e, tok[sel], kk[sel]))
    return groups


def add_lora_moe(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    slice_offsets: Sequence[int],
) -> torch.Tensor:
    """In place, for every pair ``(t, k)`` whose token has a slot (see the module docstring). Returns ``out``.

    Shapes: ``out [T, topk, N_total]``, ``x [T, K]`` (one input for all of a token's experts) or ``[T, topk, K]``
    (one per expert), ``topk_ids [T, topk]``, ``lora_a[i] [rows, E, K]``, ``lora_b[i] [rows, E, N_i]``,
    ``topk_weights [T, topk]`` or None.
    """
    E = lora_a[0].shape[1]
    per_expert_x = x.dim() == 3
    acc = acc_dtype(out, x, *lora_a, *lora_b)
    for s, e, t, k in pair_groups(slots, topk_ids, E):
        rows = slot_rows(page_table, ranks, s)
        if rows.numel() == 0:
            continue
        xs = (x[t, k] if per_expert_x else x[t]).to(acc)  # [n, K]
        w = torch.ones(t.numel(), dtype=acc, device=out.device)
        if topk_weights is not None:
            w = topk_weights[t, k].to(acc)
        if scales is not None:
            w = w * scales[s].to(acc)
        for i, (a, b) in enumerate(zip(lora_a, lora_b)):
            off, n = slice_offsets[i], b.shape[2]
            y = xs @ a[rows, e].to(acc).T  # [n, r]: the rank-r intermediate, never rounded to the input dtype
            delta = (y @ b[rows, e].to(acc)) * w[:, None]  # [n, N_i]
            cur = out[t, k, off:off + n].to(acc)
            out[t, k, off:off + n] = (cur + delta).to(out.dtype)
    return out
