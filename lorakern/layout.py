r"""Conversions between the stacked, rank-padded adapter layout that engines hold and lorakern's rank rows.

Engines (vLLM, SGLang) keep, for each slice of a target, one padded tensor per weight::

    A: [n, r_max, K]      B: [n, N, r_max]          (vLLM also: [n, 1, r_max, K] / [n, 1, N, r_max])

where adapter ``s`` uses only the first ``r_s`` rows of ``A[s]`` and columns of ``B[s]``; the rest is padding that
costs memory and, in padded kernels, bandwidth and FLOPs.

lorakern keeps exactly ``r_s`` *rank rows* per adapter (DESIGN.md §2). Row ``j`` of adapter ``s`` holds row ``j``
of its A in ``lora_a`` and column ``j`` of its B in ``lora_b`` (B stored transposed); the page table lists the row
ids of each slot's rank rows. Three adapters of ranks 2, 4 and 1, whose rows interleave in the pool::

     row   lora_a [7, K]   lora_b [7, N]          page_table int32 [3, max_rank=4]       ranks
      0    A_1[0, :]       B_1[:, 0]              slot 0:  [ 3,  5,  · ,  · ]            2
      1    A_1[3, :]       B_1[:, 3]              slot 1:  [ 0,  2,  6,  1 ]             4
      2    A_1[1, :]       B_1[:, 1]              slot 2:  [ 4,  · ,  · ,  · ]           1
      3    A_0[0, :]       B_0[:, 0]
      4    A_2[0, :]       B_2[:, 0]              · = unused entry: any value (-1, a huge id, stale
      5    A_0[1, :]       B_0[:, 1]                  data); never read by any kernel or helper
      6    A_1[2, :]       B_1[:, 2]

The same three adapters stacked would take ``3 × 4 = 12`` rows of A (and 12 columns of B), 5 of them padding;
here memory is exactly ``2 + 4 + 1 = 7`` rows, whatever the mix of ranks. Rows of one slot need not be contiguous
or ordered, and every slice of a target (``q``/``k``/``v`` of a fused ``qkv``) uses the same row ids: one
allocation of ``r`` rows serves all of them. Kernels compute at the slot's real rank and never read a page-table
entry at or beyond ``ranks[s]``.

* :func:`stacked_to_rows` packs stacked tensors into a fresh pool (adapter ``s`` at rows
  ``[off_s, off_s + r_s)``, ``off`` = exclusive cumulative sum of the ranks; no padding rows are stored).
* :func:`rows_to_stacked` is the inverse for *any* row placement (e.g. a pool after many allocations and
  frees), zero-padding beyond each rank.

Both are vectorised (one gather / scatter per slice, no Python loop per adapter) and run on the inputs' device.
Wrong dtype → ``TypeError``; wrong shape, mismatched sizes, rank out of range, row id out of range →
``ValueError``; every message names the argument, and every check runs before anything is computed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = ["RankRows", "stacked_to_rows", "rows_to_stacked"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _dt(d) -> str:
    return str(d).replace("torch.", "")


@dataclass
class RankRows:
    """A rank-row pool for one target (DESIGN.md §2), as built by :func:`stacked_to_rows`.

    Attributes
    ----------
    lora_a : list of Tensor
        Per slice ``[num_rows, K]``: row ``j`` of an adapter is row ``j`` of its A.
    lora_b : list of Tensor
        Per slice ``[num_rows, N_i]``: row ``j`` of an adapter is column ``j`` of its B.
    page_table : Tensor
        int32 ``[num_slots, max_rank]``: row ids of each slot's rank rows; entries at or beyond ``ranks[s]`` are
        padding (``pad_value``) and must not be read.
    ranks : Tensor
        int32 ``[num_slots]``.
    """

    lora_a: list
    lora_b: list
    page_table: torch.Tensor
    ranks: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_rank(self) -> int:
        return self.page_table.shape[1]

    @property
    def num_rows(self) -> int:
        return self.lora_a[0].shape[0]


# ------------------------------------------------------------------------------------------------ checks
def _slices(name: str, value) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` per slice: ``name`` for a single tensor, ``name[i]`` for the items of a sequence."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    raise TypeError(f"{name}: expected a tensor or a non-empty sequence of tensors, got {type(value).__name__}")


def _check_weights(a: list, b: list) -> tuple[torch.dtype, torch.device]:
    """dtypes (one float dtype for all), devices (one for all) and slice counts of ``lora_a`` / ``lora_b``."""
    if len(a) != len(b):
        raise ValueError(f"lora_b: {len(b)} slices, but lora_a has {len(a)}; one A and one B per slice")
    dtype, device = a[0][1].dtype, a[0][1].device
    first = a[0][0]
    for name, t in a + b:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {_dt(t.dtype)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}: dtype {_dt(t.dtype)} differs from {first}'s {_dt(dtype)}; all slices of "
                            f"lora_a and lora_b must share one dtype")
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, but {first} is on {device}; all weights must share one device")
    return dtype, device


def _as_int_tensor(name: str, value, what: str) -> torch.Tensor:
    """An integer tensor from a tensor, a list/tuple of ints or an array; anything non-integer is a TypeError."""
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, (list, tuple)) and len(value) == 0:
        t = torch.zeros(0, dtype=torch.int64)
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected an integer tensor or sequence of ints {what}, "
                            f"got {type(value).__name__}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor or sequence of ints {what}, got dtype {_dt(t.dtype)}")
    return t


def _check_ranks(ranks, n: int, limit: int, limit_what: str, device: torch.device) -> torch.Tensor:
    """``ranks [n]`` as int64 on ``device``, each in ``[0, limit]``."""
    r = _as_int_tensor("ranks", ranks, "[num_adapters]")
    if tuple(r.shape) != (n,):
        raise ValueError(f"ranks: expected shape ({n},) (one rank per adapter), got {tuple(r.shape)}")
    r = r.to(device=device, dtype=torch.int64)
    if n:
        lo, hi = (int(v) for v in torch.aminmax(r))
        if lo < 0:
            s = int((r < 0).nonzero()[0])
            raise ValueError(f"ranks: adapter {s} has negative rank {int(r[s])}")
        if hi > limit:
            s = int((r > limit).nonzero()[0])
            raise ValueError(f"ranks: adapter {s} has rank {int(r[s])} above {limit_what}={limit}")
    return r


def _check_max_rank(max_rank, default: int, ranks: torch.Tensor) -> int:
    """``max_rank`` (``None`` → ``default``), at least the largest rank."""
    if max_rank is None:
        mr = default
    else:
        if isinstance(max_rank, bool):
            raise TypeError("max_rank: expected an int or None, got bool")
        try:
            mr = operator.index(max_rank)
        except TypeError:
            raise TypeError(f"max_rank: expected an int or None, got {type(max_rank).__name__}") from None
        if mr < 0:
            raise ValueError(f"max_rank: must be >= 0, got {mr}")
    top = int(ranks.max()) if ranks.numel() else 0
    if mr < top:
        s = int((ranks > mr).nonzero()[0])
        raise ValueError(f"max_rank: {mr} is below the largest rank {top} (adapter {s} has rank {int(ranks[s])})")
    return mr


def _stacked_shape(name: str, t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` as 3-D: accepts ``[n, r, K]`` / ``[n, N, r]`` and vLLM's ``[n, 1, r, K]`` / ``[n, 1, N, r]``."""
    what = "[n, r_max, K]" if kind == "a" else "[n, N, r_max]"
    what4 = "[n, 1, r_max, K]" if kind == "a" else "[n, 1, N, r_max]"
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name}: a 4-D stacked tensor must be {what4} with a singleton dim 1, "
                             f"got shape {tuple(t.shape)}")
        return t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D tensor {what} (or 4-D {what4}), got shape {tuple(t.shape)}")
    return t


# ------------------------------------------------------------------------------------------------ stacked → rows
def stacked_to_rows(
    lora_a: Tensors,
    lora_b: Tensors,
    ranks=None,
    *,
    max_rank: Optional[int] = None,
    pad_value: int = -1,
) -> RankRows:
    """Pack stacked, rank-padded adapters (vLLM / SGLang layout) into a fresh rank-row pool.

    Parameters
    ----------
    lora_a : Tensor or sequence of Tensor
        One tensor per slice, ``[n, r_max, K]`` or ``[n, 1, r_max, K]``; ``A[s, :r_s]`` is adapter ``s``'s A.
        All slices share ``n``, ``r_max`` and ``K``.
    lora_b : Tensor or sequence of Tensor
        One tensor per slice (as many as ``lora_a``), ``[n, N_i, r_max]`` or ``[n, 1, N_i, r_max]``;
        ``B[s, :, :r_s]`` is adapter ``s``'s B. Widths ``N_i`` may differ between slices.
    ranks : Tensor or sequence of int, optional
        Integer ``[n]``, each in ``[0, r_max]``; rows / columns beyond are padding and are not copied.
        ``None`` means every adapter uses all ``r_max``.
    max_rank : int, optional
        Width of the page table; default ``r_max``. May be larger or smaller than ``r_max``, but not smaller than
        the largest rank.
    pad_value : int, default -1
        Value of the page-table entries at or beyond each slot's rank. The default, an invalid row id, makes a
        kernel that wrongly reads them fail loudly.

    Returns
    -------
    RankRows
        ``lora_a``: per slice ``[R, K]`` and ``lora_b``: per slice ``[R, N_i]`` with ``R = sum(ranks)``, in the
        weights' dtype and device; adapter ``s`` occupies rows ``[off_s, off_s + r_s)``, ``off`` the exclusive
        cumulative sum of ``ranks``. ``page_table``: int32 ``[n, max_rank]`` with ``page_table[s, j] = off_s + j``
        for ``j < r_s`` and ``pad_value`` beyond; ``ranks``: int32 ``[n]``; both on the weights' device.

    Raises
    ------
    TypeError
        Non-float weights, slices or A / B of different dtypes, non-integer ``ranks``, non-int ``max_rank`` or
        ``pad_value``.
    ValueError
        Wrong number of dims; A and B (or slices) disagree on ``n``, ``r_max`` or ``K``; slice counts differ;
        ``ranks`` of the wrong shape, negative or above ``r_max``; ``max_rank`` below the largest rank;
        ``pad_value`` or the row count outside int32.
    """
    a = _slices("lora_a", lora_a)
    b = _slices("lora_b", lora_b)
    _, device = _check_weights(a, b)
    a3 = [(name, _stacked_shape(name, t, "a")) for name, t in a]
    b3 = [(name, _stacked_shape(name, t, "b")) for name, t in b]
    n, r_max, K = a3[0][1].shape
    first = a3[0][0]
    for name, t in a3[1:]:
        if t.shape[0] != n:
            raise ValueError(f"{name}: {t.shape[0]} adapters, but {first} has {n}; all slices stack the same adapters")
        if t.shape[1] != r_max:
            raise ValueError(f"{name}: r_max={t.shape[1]}, but {first} has r_max={r_max}")
        if t.shape[2] != K:
            raise ValueError(f"{name}: K={t.shape[2]}, but {first} has K={K}; slices of a target share the input x")
    for name, t in b3:
        if t.shape[0] != n:
            raise ValueError(f"{name}: {t.shape[0]} adapters (shape {tuple(t.shape)}), but {first} has {n}")
        if t.shape[2] != r_max:
            raise ValueError(f"{name}: r_max={t.shape[2]} (last dim of [n, N, r_max], shape {tuple(t.shape)}), "
                             f"but {first} has r_max={r_max}")
    try:
        if isinstance(pad_value, bool):
            raise TypeError
        pad_value = operator.index(pad_value)
    except TypeError:
        raise TypeError(f"pad_value: expected an int, got {type(pad_value).__name__}") from None
    if not -(2**31) <= pad_value <= _INT32_MAX:
        raise ValueError(f"pad_value: {pad_value} does not fit in int32")
    if ranks is None:
        rk = torch.full((n,), r_max, dtype=torch.int64, device=device)
    else:
        rk = _check_ranks(ranks, n, r_max, "r_max", device)
    mr = _check_max_rank(max_rank, r_max, rk)
    total = int(rk.sum()) if n else 0
    if total > _INT32_MAX:
        raise ValueError(f"ranks: {total} rank rows in all, more than an int32 page table can address")

    # Live (slot, j) pairs in row-major order: exactly the packed row order, since rows of slot s follow those of
    # slots < s. One gather per tensor, no loop over adapters.
    live = torch.arange(r_max, device=device)[None, :] < rk[:, None]  # [n, r_max]
    slot, j = live.nonzero(as_tuple=True)
    rows_a = [t[slot, j].contiguous() for _, t in a3]  # [R, K]
    rows_b = [t[slot, :, j].contiguous() for _, t in b3]  # [R, N_i]: advanced dims first

    off = torch.cumsum(rk, 0) - rk  # exclusive
    cols = torch.arange(mr, device=device)[None, :]
    page_table = torch.where(cols < rk[:, None], off[:, None] + cols,
                             torch.full((), pad_value, dtype=torch.int64, device=device))
    return RankRows(rows_a, rows_b, page_table.to(torch.int32), rk.to(torch.int32))


# ------------------------------------------------------------------------------------------------ rows → stacked
def rows_to_stacked(
    lora_a: Tensors,
    lora_b: Tensors,
    page_table: torch.Tensor,
    ranks,
    *,
    max_rank: Optional[int] = None,
) -> tuple[list, list]:
    """Unpack a rank-row pool into stacked, zero-padded tensors (the inverse of :func:`stacked_to_rows`).

    Works for any row placement: rows of a slot may be anywhere in the pool, in any order. Only the first
    ``ranks[s]`` page-table entries of each slot are read; entries beyond may hold anything (``-1``, ids past the
    end of the pool) and are neither read nor checked.

    Parameters
    ----------
    lora_a : Tensor or sequence of Tensor
        Per slice ``[num_rows, K]``; all slices share ``num_rows`` and ``K``.
    lora_b : Tensor or sequence of Tensor
        Per slice (as many as ``lora_a``) ``[num_rows, N_i]``; same dtype and device as ``lora_a``.
    page_table : Tensor
        Integer ``[n, W]`` (int32 in lorakern): row ids of each slot's rank rows. Moved to the weights' device.
    ranks : Tensor or sequence of int
        Integer ``[n]``, each in ``[0, W]``.
    max_rank : int, optional
        Rank dimension of the outputs; default ``W``. Not smaller than the largest rank.

    Returns
    -------
    (list of Tensor, list of Tensor)
        Per slice ``A: [n, max_rank, K]`` and ``B: [n, N_i, max_rank]``, contiguous, in the weights' dtype and
        device, with ``A[s, j] = lora_a[page_table[s, j]]`` and ``B[s, :, j] = lora_b[page_table[s, j]]`` for
        ``j < ranks[s]`` and zeros beyond. For vLLM's 4-D form, ``unsqueeze(1)`` each.

    Raises
    ------
    TypeError
        Non-float weights, slices or A / B of different dtypes, non-integer ``page_table`` or ``ranks``, non-int
        ``max_rank``.
    ValueError
        Weights not 2-D; slices disagree on ``num_rows`` or ``K``; slice counts differ; ``page_table`` not 2-D;
        ``ranks`` of the wrong shape, negative or above ``W``; ``max_rank`` below the largest rank; a live
        page-table entry outside ``[0, num_rows)``.
    """
    a = _slices("lora_a", lora_a)
    b = _slices("lora_b", lora_b)
    dtype, device = _check_weights(a, b)
    first = a[0][0]
    num_rows, K = None, None
    for name, t in a + b:
        kind = "K" if name.startswith("lora_a") else "N"
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [num_rows, {kind}], got shape {tuple(t.shape)}")
        if num_rows is None:
            num_rows, K = t.shape
        elif t.shape[0] != num_rows:
            raise ValueError(f"{name}: has {t.shape[0]} rows, but {first} has {num_rows}; slices share one row space")
        if kind == "K" and t.shape[1] != K:
            raise ValueError(f"{name}: K={t.shape[1]}, but {first} has K={K}; slices of a target share the input x")
    pt = _as_int_tensor("page_table", page_table, "[num_slots, max_rank]")
    if pt.dim() != 2:
        raise ValueError(f"page_table: expected a 2-D tensor [num_slots, max_rank], got shape {tuple(pt.shape)}")
    n, width = pt.shape
    pt = pt.to(device)
    rk = _check_ranks(ranks, n, width, "the page_table width", device)
    mr = _check_max_rank(max_rank, width, rk)
    live = torch.arange(width, device=device)[None, :] < rk[:, None]  # [n, W]: never look past a rank
    slot, j = live.nonzero(as_tuple=True)
    rows = pt[slot, j].long()
    if rows.numel():
        bad = (rows < 0) | (rows >= num_rows)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"page_table: slot {int(slot[i])} rank row {int(j[i])} points at row {int(rows[i])}, "
                             f"out of range for lora_a/lora_b with {num_rows} rows")

    out_a, out_b = [], []
    for _, t in a:
        o = torch.zeros(n, mr, t.shape[1], dtype=dtype, device=device)
        o[slot, j] = t[rows]
        out_a.append(o)
    for _, t in b:
        o = torch.zeros(n, t.shape[1], mr, dtype=dtype, device=device)
        o[slot, :, j] = t[rows]
        out_b.append(o)
    return out_a, out_b
