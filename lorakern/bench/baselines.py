"""Baselines for ``add_lora``: what other systems do, implemented for real (DESIGN.md §6).

Each baseline has the signature of :func:`lorakern.ops.add_lora` (normalised: lists of per-slice tensors, an
integer ``slots`` tensor) plus ``prepared=``: per-batch work done once and reused by every layer, which the
benchmark builds outside the timed region, as it builds the :class:`lorakern.LoRAPlan` for lorakern's own
backends. Without ``prepared`` the function prepares itself (host synchronisations included).

* ``torch-gather-bmm`` (:func:`torch_gather_bmm`) — the naive engine: gather every token's A and B padded to
  ``max_rank`` through the page table (``[T, R, K]`` and ``[T, R, N]``), then two ``bmm``. It moves
  ``T·max_rank·(K+N)`` weight elements however few adapters there are, and pays for padding.
* ``peft-loop`` (:func:`peft_loop`) — PEFT's mixed-batch forward: a Python loop over the distinct adapters of the
  batch; for each, index its tokens, ``x @ A.T @ B.T * scale`` and add into ``out``. As in PEFT the adapters'
  weights are already separate dense tensors (prepared once); the loop launches a few kernels per adapter.
* Peers (:data:`PEERS`), tried only on CUDA and only when importable; otherwise :class:`Unavailable` carries the
  reason and the benchmark records a skipped row:

  - ``vllm`` — vLLM's Triton ``lora_shrink`` / ``lora_expand`` over its stacked, max-rank-padded weights;
  - ``flashinfer`` — FlashInfer's ``SegmentGEMMWrapper`` (segment GEMM) over tokens sorted by adapter;
  - ``sglang`` — probed only: its chunked-SGMV kernels take a version-specific batch-info object that this
    harness does not build yet, so an importable SGLang is reported as skipped with that reason.

The intermediate of the baselines is rounded to the input dtype between shrink and expand, as those systems do;
lorakern keeps it in fp32.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "BASELINES",
    "PEERS",
    "Unavailable",
    "torch_gather_bmm",
    "prepare_gather_bmm",
    "peft_loop",
    "prepare_peft_loop",
    "make_peer",
    "default_offsets",
]


class Unavailable(RuntimeError):
    """A baseline cannot run here; the message is the reason recorded in the skipped row."""


def default_offsets(lora_b: Sequence[torch.Tensor], slice_offsets=None) -> list:
    if slice_offsets is not None:
        return [int(o) for o in slice_offsets]
    offs, acc = [], 0
    for b in lora_b:
        offs.append(acc)
        acc += b.shape[1]
    return offs


def _slices(v) -> list:
    return [v] if isinstance(v, torch.Tensor) else list(v)


# --------------------------------------------------------------------------------------------- torch-gather-bmm
@dataclass
class GatherBmmPrepared:
    tok: torch.Tensor  # long [n]: tokens with an adapter of rank > 0
    rows: torch.Tensor  # long [n, R]: each token's rank rows; entries beyond the rank repeat a real row
    live: torch.Tensor  # bool [n, 1, R]: True for j < rank
    scale: torch.Tensor  # float32 [n, 1]


def prepare_gather_bmm(page_table: torch.Tensor, ranks: torch.Tensor, scales: Optional[torch.Tensor],
                       slots: torch.Tensor) -> GatherBmmPrepared:
    """Per-batch indices for :func:`torch_gather_bmm` (one host read: the number of LoRA tokens)."""
    slots = slots.long()
    R = page_table.shape[1]
    safe = slots.clamp(min=0)
    rk = ranks.long()[safe]
    tok = ((slots >= 0) & (rk > 0)).nonzero().flatten()
    s = slots[tok]
    r = ranks.long()[s]
    live = torch.arange(R, device=slots.device)[None, :] < r[:, None]  # [n, R]
    pt = page_table.long()[s]  # [n, R]; beyond the rank: poison ids in a pool from make_lora
    # Beyond the rank point at the slot's first row: a real, finite row, so that masking y to zero is exact
    # (a spare row may hold NaN, and NaN * 0 is NaN).
    rows = torch.where(live, pt, pt[:, :1].expand_as(pt))
    sc = torch.ones(tok.numel(), device=slots.device) if scales is None else scales.float()[s]
    return GatherBmmPrepared(tok, rows, live[:, None, :], sc[:, None])


def torch_gather_bmm(out, x, lora_a, lora_b, page_table, ranks, scales, slots, *, slice_offsets=None,
                     prepared: Optional[GatherBmmPrepared] = None):
    """``add_lora`` the naive way: per token, the rank-padded ``A [R, K]`` and ``B [R, N_i]`` gathered through
    the page table, then ``bmm`` twice; the padded part of the intermediate is zeroed (rows beyond the rank
    contribute nothing). In place on ``out``; returns ``out``."""
    a_list, b_list = _slices(lora_a), _slices(lora_b)
    p = prepared if prepared is not None else prepare_gather_bmm(page_table, ranks, scales, slots)
    if p.tok.numel() == 0:
        return out
    xs = x[p.tok].unsqueeze(1)  # [n, 1, K]
    for a, b, off in zip(a_list, b_list, default_offsets(b_list, slice_offsets)):
        A = a[p.rows]  # [n, R, K]
        y = torch.bmm(xs, A.transpose(1, 2))  # [n, 1, R]
        y = torch.where(p.live, y, torch.zeros((), dtype=y.dtype, device=y.device))
        B = b[p.rows]  # [n, R, N]
        d = torch.bmm(y, B).squeeze(1)  # [n, N]
        d = (d.float() * p.scale).to(out.dtype)
        out[:, off:off + b.shape[1]].index_add_(0, p.tok, d)
    return out


# --------------------------------------------------------------------------------------------- peft-loop
@dataclass
class PeftPrepared:
    groups: list  # [(tok long [n], A_i list of [r, K], B_i list of [N_i, r], scale float)]


def prepare_peft_loop(lora_a, lora_b, page_table, ranks, scales, slots) -> PeftPrepared:
    """Per-batch groups for :func:`peft_loop`: each distinct adapter's tokens, and its weights as separate dense
    tensors (``A [r, K]``, ``B [N_i, r]``) as PEFT holds them (``lora_A`` / ``lora_B`` linear layers)."""
    a_list, b_list = _slices(lora_a), _slices(lora_b)
    groups = []
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        r = int(ranks[s])
        if r == 0:
            continue
        rows = page_table[s, :r].long()
        tok = (slots == s).nonzero().flatten()
        A = [a[rows].contiguous() for a in a_list]
        B = [b[rows].T.contiguous() for b in b_list]
        sc = 1.0 if scales is None else float(scales[s])
        groups.append((tok, A, B, sc))
    return PeftPrepared(groups)


def peft_loop(out, x, lora_a, lora_b, page_table, ranks, scales, slots, *, slice_offsets=None,
              prepared: Optional[PeftPrepared] = None):
    """``add_lora`` as PEFT's ``_mixed_batch_forward`` does it: for each adapter of the batch,
    ``out[tok, slice] += (x[tok] @ A.T @ B.T) * scale``. In place on ``out``; returns ``out``."""
    b_list = _slices(lora_b)
    p = prepared if prepared is not None else prepare_peft_loop(lora_a, lora_b, page_table, ranks, scales, slots)
    offs = default_offsets(b_list, slice_offsets)
    for tok, A, B, sc in p.groups:
        xs = x[tok]
        for Ai, Bi, off in zip(A, B, offs):
            d = (xs @ Ai.T) @ Bi.T * sc
            out[tok, off:off + Bi.shape[0]] += d.to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Baseline:
    """``prepare(out, x, lora_a, lora_b, page_table, ranks, scales, slots) -> prepared`` then
    ``fn(..., prepared=prepared)``."""

    name: str
    fn: Callable
    prepare: Callable


BASELINES = {
    "torch-gather-bmm": Baseline(
        "torch-gather-bmm", torch_gather_bmm,
        lambda out, x, a, b, pt, rk, sc, slots: prepare_gather_bmm(pt, rk, sc, slots)),
    "peft-loop": Baseline(
        "peft-loop", peft_loop,
        lambda out, x, a, b, pt, rk, sc, slots: prepare_peft_loop(a, b, pt, rk, sc, slots)),
}


# --------------------------------------------------------------------------------------------- peers
def _import(module: str, label: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything at import time
        raise Unavailable(f"{label} not importable ({type(e).__name__}: {str(e)[:120]})") from None


def _stacked(a_list, b_list, page_table, ranks, scales):
    """Dense, max-rank-padded per-slot weights (what vLLM and segment-GEMM users keep): ``A [slots, R, K]`` and
    ``B [slots, N_i, R]`` with the slot's scale folded into B, zeros beyond each rank. Built once (not timed)."""
    num_slots, R = page_table.shape
    dev = page_table.device
    live = torch.arange(R, device=dev)[None, :] < ranks.long()[:, None]  # [slots, R]
    rows = torch.where(live, page_table.long(), torch.zeros_like(page_table, dtype=torch.long))
    sc = torch.ones(num_slots, device=dev) if scales is None else scales.float()
    A_st, B_st = [], []
    for a, b in zip(a_list, b_list):
        A = a[rows]  # [slots, R, K]
        A = torch.where(live[:, :, None], A, torch.zeros((), dtype=A.dtype, device=dev))
        B = b[rows].float() * sc[:, None, None]  # [slots, R, N]
        B = torch.where(live[:, :, None], B, torch.zeros((), dtype=B.dtype, device=dev)).to(b.dtype)
        A_st.append(A.contiguous())
        B_st.append(B.transpose(1, 2).contiguous())  # [slots, N, R]
    return A_st, B_st


def _peer_vllm(out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets) -> Callable:
    ops = _import("vllm.lora.ops.triton_ops", "vllm")
    a_list, b_list = _slices(lora_a), _slices(lora_b)
    offs = default_offsets(b_list, slice_offsets)
    if offs != default_offsets(b_list) or out.shape[1] != sum(b.shape[1] for b in b_list):
        raise Unavailable("vllm: its lora_expand writes slices back to back from column 0; this case has gaps")
    T = x.shape[0]
    num_slots, R = page_table.shape
    A_st, B_st = _stacked(a_list, b_list, page_table, ranks, scales)
    try:
        meta = ops.LoRAKernelMeta.make(num_slots, T, x.device)
        meta.prepare_tensors(slots.to(torch.int32))
        args = meta.meta_args(T)
    except Exception as e:
        raise Unavailable(f"vllm: LoRAKernelMeta API not as expected ({type(e).__name__}: {str(e)[:120]})") from None
    y = torch.zeros(len(a_list), T, R, dtype=torch.float32, device=x.device)

    def fn():
        ops.lora_shrink(x, A_st, y, *args, 1.0)
        ops.lora_expand(y, B_st, out, *args, offset_start=0, add_inputs=True)

    return fn


def _peer_flashinfer(out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets) -> Callable:
    fi = _import("flashinfer", "flashinfer")
    gemm = getattr(fi, "gemm", None)
    wrapper_cls = getattr(gemm, "SegmentGEMMWrapper", None) if gemm is not None else None
    if wrapper_cls is None:
        raise Unavailable("flashinfer: no flashinfer.gemm.SegmentGEMMWrapper in this version")
    a_list, b_list = _slices(lora_a), _slices(lora_b)
    offs = default_offsets(b_list, slice_offsets)
    A_st, B_st = _stacked(a_list, b_list, page_table, ranks, scales)
    s = slots.long()
    tok = (s >= 0).nonzero().flatten()
    order = tok[torch.argsort(s[tok], stable=True)]
    seg_slots, counts = torch.unique_consecutive(s[order], return_counts=True)
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=x.device)
    indptr[1:] = torch.cumsum(counts, 0)
    widx = seg_slots.to(torch.int64)
    nseg = int(counts.numel())
    ws = torch.empty(128 << 20, dtype=torch.int8, device=x.device)
    w = wrapper_cls(ws)

    def fn():
        if nseg == 0:
            return
        xs = x[order]
        for A, B, off, b in zip(A_st, B_st, offs, b_list):
            y = w.run(xs, A, nseg, True, seg_indptr=indptr, weight_indices=widx)
            d = w.run(y, B, nseg, True, seg_indptr=indptr, weight_indices=widx)
            out[:, off:off + b.shape[1]].index_add_(0, order, d.to(out.dtype))

    return fn


def _peer_sglang(out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets) -> Callable:
    _import("sglang.srt.lora.triton_ops", "sglang")
    raise Unavailable("sglang is importable, but this harness does not yet build its version-specific "
                      "LoRABatchInfo for the chunked SGMV kernels")


#: peer name -> factory(out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets) -> fn().
#: The factory does the untimed setup (stacking, metadata) and raises :class:`Unavailable` with the reason.
PEERS = {"vllm": _peer_vllm, "flashinfer": _peer_flashinfer, "sglang": _peer_sglang}


def make_peer(name: str, out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets=None) -> Callable:
    """A ready-to-time ``fn()`` running peer ``name`` on these tensors, or :class:`Unavailable`."""
    if x.device.type != "cuda":
        raise Unavailable(f"{name}: peer kernels are tried only on CUDA (tensors are on {x.device})")
    return PEERS[name](out, x, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets)
