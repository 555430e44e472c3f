"""Readable PyTorch reference for the MLA ops (DESIGN.md §3): the ``"torch"`` backend and the test oracle.

MLA (DeepSeek-V2/V3) keeps one compressed latent ``c [C]`` per token (``C`` = ``kv_lora_rank``) and expands it
per head with ``kv_b_proj: C -> H·(Dn + Dv)``, whose output is read as ``[H, Dn + Dv]``: per head the first ``Dn``
columns are the no-rope key ``k_nope`` (weights ``W_UK^h [Dn, C]``) and the last ``Dv`` the value
(``W_UV^h [Dv, C]``). At decode, engines never expand the cache; they *absorb* the two halves:

    q_latent[t, h] = q_nope[t, h] @ W_UK^h          [C]   scores = q_latent · c + q_pe · k_pe
    out[t, h]      = o_latent[t, h] @ W_UV^h.T      [Dv]  o_latent = softmax(scores) @ c

A LoRA on ``kv_b_proj`` (``W += scale · B @ A`` with ``A [r, C]``, ``B [H·(Dn+Dv), r]``) is then two corrections,
never a plain linear and never a materialised ``B @ A``:

    q_latent[t, h] += scale · (q_nope[t, h] @ B_K^h) @ A        B_K^h = B[h·(Dn+Dv) : h·(Dn+Dv)+Dn]   [Dn, r]
    out[t, h]      += scale · (o_latent[t, h] @ A.T) @ B_V^h.T  B_V^h = B[h·(Dn+Dv)+Dn : (h+1)·(Dn+Dv)] [Dv, r]

In the rank-row layout (DESIGN.md §2) ``lora_a [rows, C]`` holds rows of ``A`` and ``lora_b [rows, H·(Dn+Dv)]``
holds columns of ``B``, so for slot ``s`` with rows ``p = page_table[s, :r]``::

    A     = lora_a[p]                                   [r, C]
    B_K^h = lora_b[p].view(r, H, Dn+Dv)[:, h, :Dn].T    [Dn, r]
    B_V^h = lora_b[p].view(r, H, Dn+Dv)[:, h, Dn:].T    [Dv, r]

Like :mod:`lorakern.reference`, this works one distinct slot at a time, accumulates in float32 (float64 for float64
inputs), rounds each updated element once, never reads a page-table entry at or beyond a slot's rank and never
touches a token whose slot is ``-1``. Arguments are already validated (see :mod:`lorakern.ops.mla`).
"""

from __future__ import annotations

from typing import Optional

import torch

from lorakern.reference import acc_dtype, slot_rows

__all__ = ["mla_absorbed_q", "mla_absorbed_o", "split_heads"]


def _active_slots(slots: torch.Tensor) -> list[int]:
    return [int(s) for s in torch.unique(slots).tolist() if s >= 0]


def split_heads(lora_b_rows: torch.Tensor, H: int, Dn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_K, B_V)`` of rank rows ``[r, H·(Dn+Dv)]``: ``[r, H, Dn]`` and ``[r, H, Dv]`` (views)."""
    r, width = lora_b_rows.shape
    per_head = lora_b_rows.view(r, H, width // H)
    return per_head[:, :, :Dn], per_head[:, :, Dn:]


def mla_absorbed_q(
    q_latent: torch.Tensor,
    q_nope: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
) -> torch.Tensor:
    """In place: ``q_latent[t, h] += scale[s] · (q_nope[t, h] @ B_K^h[s]) @ A[s]``; returns ``q_latent``.

    Shapes: ``q_latent [T, H, C]``, ``q_nope [T, H, Dn]``, ``lora_a [rows, C]``, ``lora_b [rows, H·(Dn+Dv)]``.
    """
    H, Dn = q_nope.shape[1], q_nope.shape[2]
    acc = acc_dtype(q_latent, q_nope, lora_a, lora_b)
    for s in _active_slots(slots):
        rows = slot_rows(page_table, ranks, s)
        if rows.numel() == 0:
            continue
        tok = (slots == s).nonzero().flatten()
        a = lora_a[rows].to(acc)  # [r, C]
        b_k, _ = split_heads(lora_b[rows].to(acc), H, Dn)  # [r, H, Dn]
        scale = 1.0 if scales is None else scales[s].to(acc)
        y = torch.einsum("thd,rhd->thr", q_nope[tok].to(acc), b_k)  # shrink per head: [n, H, r]
        delta = torch.einsum("thr,rc->thc", y, a) * scale  # expand by the shared A: [n, H, C]
        q_latent[tok] = (q_latent[tok].to(acc) + delta).to(q_latent.dtype)
    return q_latent


def mla_absorbed_o(
    out: torch.Tensor,
    o_latent: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    page_table: torch.Tensor,
    ranks: torch.Tensor,
    scales: Optional[torch.Tensor],
    slots: torch.Tensor,
) -> torch.Tensor:
    """In place: ``out[t, h] += scale[s] · (o_latent[t, h] @ A[s].T) @ B_V^h[s].T``; returns ``out``.

    Shapes: ``out [T, H, Dv]``, ``o_latent [T, H, C]``, ``lora_a [rows, C]``, ``lora_b [rows, H·(Dn+Dv)]``.
    """
    H, Dv = out.shape[1], out.shape[2]
    Dn = lora_b.shape[1] // H - Dv
    acc = acc_dtype(out, o_latent, lora_a, lora_b)
    for s in _active_slots(slots):
        rows = slot_rows(page_table, ranks, s)
        if rows.numel() == 0:
            continue
        tok = (slots == s).nonzero().flatten()
        a = lora_a[rows].to(acc)  # [r, C]
        _, b_v = split_heads(lora_b[rows].to(acc), H, Dn)  # [r, H, Dv]
        scale = 1.0 if scales is None else scales[s].to(acc)
        y = torch.einsum("thc,rc->thr", o_latent[tok].to(acc), a)  # shrink by the shared A: [n, H, r]
        delta = torch.einsum("thr,rhd->thd", y, b_v) * scale  # expand per head: [n, H, Dv]
        out[tok] = (out[tok].to(acc) + delta).to(out.dtype)
    return out
