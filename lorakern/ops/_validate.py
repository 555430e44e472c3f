"""Argument normalisation and checks shared by the ops (DESIGN.md §3, "Errors").

Two stages:

* :func:`check_meta` and friends look only at shapes, dtypes and devices. They run in the Python wrapper, before
  anything else, and trace cleanly under ``torch.compile``.
* :func:`check_values` reads tensor *values* (slot range, row ids within each slot's rank, ranks within
  ``max_rank``). It runs inside the op's real implementation, before any kernel, and is skipped while a CUDA graph
  is being captured (a capture cannot read device memory back). The page-table check is cached per
  ``(page_table, ranks)`` storage and version, so a batch's layers pay for it once.

Wrong dtype → ``TypeError``; wrong shape, mismatched sizes, slot or row id out of range, rank above ``max_rank``
→ ``ValueError``. Every message names the argument.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from lorakern.plan import LoRAPlan

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dt(d) -> str:
    return str(d).replace("torch.", "")


def as_slices(name: str, value) -> list:
    """One tensor → one slice; a non-empty sequence of tensors → those slices."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        for v in value:  # (a loop, not all() over a generator: this runs on every call)
            if not isinstance(v, torch.Tensor):
                break
        else:
            return list(value)
    raise TypeError(f"{name}: expected a tensor or a non-empty sequence of tensors, got {type(value).__name__}")


def check_float(name: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {_dt(dtype)}, got {_dt(t.dtype)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {_dt(t.dtype)}")


def check_dim(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor {what}, got shape {tuple(t.shape)}")


def check_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: on {t.device}, but x is on {device}; all arguments must share one device")


def on_device(device: torch.device, *tensors) -> bool:
    """Every tensor (None skipped) is on ``device``: the test :func:`check_device` makes, without its names. The ops
    call ``check_device`` with the names only when this is False (it then raises), so that a call whose arguments
    are right does not build a keyword dictionary and an f-string name per slice."""
    for t in tensors:
        if t is not None and t.device != device:
            return False
    return True


def check_pages(page_table: torch.Tensor, ranks: torch.Tensor, scales: Optional[torch.Tensor]) -> tuple:
    """Metadata of ``page_table [num_slots, max_rank]`` (int32), ``ranks [num_slots]`` (int32) and ``scales``."""
    if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32:
        got = _dt(page_table.dtype) if isinstance(page_table, torch.Tensor) else type(page_table).__name__
        raise TypeError(f"page_table: expected an int32 tensor, got {got}")
    check_dim("page_table", page_table, 2, "[num_slots, max_rank]")
    if not isinstance(ranks, torch.Tensor) or ranks.dtype != torch.int32:
        got = _dt(ranks.dtype) if isinstance(ranks, torch.Tensor) else type(ranks).__name__
        raise TypeError(f"ranks: expected an int32 tensor, got {got}")
    num_slots, max_rank = page_table.shape
    if tuple(ranks.shape) != (num_slots,):
        raise ValueError(f"ranks: expected shape ({num_slots},) to match page_table, got {tuple(ranks.shape)}")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            got = _dt(scales.dtype) if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise TypeError(f"scales: expected a float32 tensor or None, got {got}")
        if tuple(scales.shape) != (num_slots,):
            raise ValueError(f"scales: expected shape ({num_slots},) to match page_table, got {tuple(scales.shape)}")
    return num_slots, max_rank


def check_slots_meta(slots, T: int) -> None:
    if isinstance(slots, LoRAPlan):
        if slots.num_tokens != T:
            raise ValueError(f"slots: the LoRAPlan covers {slots.num_tokens} tokens, but x has {T}")
        return
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots: expected an integer torch.Tensor or a LoRAPlan, got {type(slots).__name__}")
    if slots.dtype not in _INT_DTYPES:
        raise TypeError(f"slots: expected an integer tensor (int32 or int64), got {_dt(slots.dtype)}")
    if tuple(slots.shape) != (T,):
        raise ValueError(f"slots: expected shape ({T},) (one slot per token of x), got {tuple(slots.shape)}")


def check_rows(name: str, rows: Sequence[torch.Tensor], dtype: torch.dtype, width: Optional[int], wname: str,
               fast: bool = True) -> int:
    """Per-slice rank-row tensors ``[num_rows, width_i]``; all share ``num_rows``. Returns ``num_rows``.

    A slice that passes every check is told by one condition (no name built); the first one that does not goes
    through the checks one by one, which raise the error they always have (``fast=False``: every slice through
    them, the plain loop the tests compare the fast one with)."""
    num_rows = None
    fast = fast and (dtype is None or dtype in FLOAT_DTYPES)  # (else check_float refuses every slice)
    for i, r in enumerate(rows):
        if fast and isinstance(r, torch.Tensor):
            shape = r.shape
            if ((r.dtype == dtype if dtype is not None else r.dtype in FLOAT_DTYPES) and len(shape) == 2
                    and (width is None or shape[1] == width) and (num_rows is None or shape[0] == num_rows)):
                if num_rows is None:
                    num_rows = shape[0]
                continue
        n = f"{name}[{i}]" if len(rows) > 1 else name
        check_float(n, r, dtype)
        check_dim(n, r, 2, f"[num_rows, {wname}]")
        if width is not None and r.shape[1] != width:
            raise ValueError(f"{n}: expected {wname}={width} columns, got shape {tuple(r.shape)}")
        if num_rows is None:
            num_rows = r.shape[0]
        elif r.shape[0] != num_rows:
            raise ValueError(f"{n}: has {r.shape[0]} rows, but slice 0 has {num_rows}; slices share one row space")
    return num_rows


def resolve_offsets(slice_offsets, widths: Sequence[int], out_cols: int) -> list:
    """``slice_offsets`` (default: running sum of the widths), checked to fit in ``out`` and not to overlap."""
    if slice_offsets is None:
        offs, acc = [], 0
        for w in widths:
            offs.append(acc)
            acc += w
        if acc <= out_cols and min(widths, default=0) >= 0:  # back to back from 0: in order, none overlapping,
            return offs                                          # all within out when the last one ends in it
    else:
        if isinstance(slice_offsets, torch.Tensor):
            slice_offsets = slice_offsets.tolist()
        try:
            offs = [int(o) for o in slice_offsets]
        except TypeError:
            raise TypeError(f"slice_offsets: expected a sequence of ints, got {type(slice_offsets).__name__}") from None
        if len(offs) != len(widths):
            raise ValueError(f"slice_offsets: {len(offs)} offsets for {len(widths)} slices")
    spans = sorted(zip(offs, widths))
    for (o, w) in spans:
        if o < 0 or o + w > out_cols:
            raise ValueError(f"slice_offsets: slice at offset {o} with width {w} does not fit in out's {out_cols} columns")
    for (o1, w1), (o2, _) in zip(spans, spans[1:]):
        if o1 + w1 > o2:
            raise ValueError(f"slice_offsets: slices at offsets {o1} (width {w1}) and {o2} overlap")
    return offs


# ---------------------------------------------------------------------------------------------------- values
_PAGE_CHECK_CACHE: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def version_of(t: torch.Tensor) -> Optional[int]:
    """``t._version``, or None for an inference tensor (it has no version counter: never cache by it)."""
    try:
        return t._version
    except RuntimeError:
        return None


def pin(tensors) -> Optional[tuple]:
    """A cache entry's hold on ``tensors``: (weak references, version counters), or None when one of them is an
    inference tensor (no version counter: never cache by it). :func:`unchanged` tells whether it still holds."""
    vers = tuple(version_of(t) for t in tensors)
    return None if None in vers else (tuple(weakref.ref(t) for t in tensors), vers)


def unchanged(pinned: tuple, tensors) -> bool:
    """``tensors`` are the very objects :func:`pin` saw (weak references), none modified in place since."""
    refs, vers = pinned
    return (len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors))
            and vers == tuple(version_of(t) for t in tensors))


_SLOT_RANGE_CACHE: dict = {}


def _slot_range(slots: torch.Tensor) -> int:
    """The largest slot (one host read), after checking none is below -1. Cached while the very same tensor is
    unmodified (e.g. a static plan's buffer between two ``update`` calls), so a batch's layers read it once."""
    hit = _SLOT_RANGE_CACHE.get(id(slots))
    if hit is not None and unchanged(hit[0], (slots,)):
        return hit[1]
    lo, hi = (int(v) for v in torch.aminmax(slots))
    if lo < -1:
        raise ValueError(f"slots: values must be >= -1 (-1 = no LoRA), found {lo}")
    pinned = pin((slots,))
    if pinned is not None:
        if len(_SLOT_RANGE_CACHE) > 64:
            _SLOT_RANGE_CACHE.clear()
        _SLOT_RANGE_CACHE[id(slots)] = (pinned, hi)
    return hi


_OVERLAPS = getattr(torch._C, "_overlaps", None)


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges two tensors may touch intersect (conservative: interleaved column slices of one
    buffer count)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = hi = t.data_ptr()
        for n, st in zip(t.shape, t.stride()):
            d = (n - 1) * st * t.element_size()
            if d < 0:
                lo += d
            else:
                hi += d
        return lo, hi + t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def apart_from(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it may share memory with ``out``: an op that adds into ``out`` reads ``t``
    while other programs write ``out``, so ``add_lora(x, x, ...)`` must see the x of before the call. The test is
    conservative (byte ranges, so interleaved column slices of one buffer are copied too); a copy is always right.
    Under ``torch.compile`` tracing (no data pointers) the graph's functionalization owns aliasing."""
    if torch.compiler.is_compiling():
        return t
    try:  # torch's test first: fast, and False whenever the two cannot share memory (it says True more often)
        if _OVERLAPS is not None and not _OVERLAPS(out, t):
            return t
    except RuntimeError:
        pass
    return t.clone() if _spans_overlap(out, t) else t


def kernel_layout(page_table: torch.Tensor, ranks: torch.Tensor, scales: Optional[torch.Tensor]) -> tuple:
    """``(page_table, ranks, scales)`` as the kernels read them: every kernel indexes ``ranks[slot]``,
    ``scales[slot]`` and ``page_table[slot * row_stride + j]``, so a strided view (``meta[:, 0]``, a column-major
    page table) is copied to a contiguous tensor first; contiguous ones pass as they are. Called after
    :func:`check_values`, whose caches stay keyed on the caller's tensors."""
    if not page_table.is_contiguous():
        page_table = page_table.contiguous()
    if not ranks.is_contiguous():
        ranks = ranks.contiguous()
    if scales is not None and not scales.is_contiguous():
        scales = scales.contiguous()
    return page_table, ranks, scales


def check_values(page_table, ranks, num_rows: int, slots: torch.Tensor, max_slot: int) -> None:
    """Value checks, before any launch. ``max_slot`` is the plan's known maximum (``-2`` = unknown: read it)."""
    device = page_table.device
    if _capturing(device):
        return
    num_slots, max_rank = page_table.shape
    if slots.numel():
        if max_slot == -2:
            max_slot = _slot_range(slots)
        if max_slot >= num_slots:
            raise ValueError(f"slots: slot {max_slot} out of range for page_table with {num_slots} slots")
    entry = _PAGE_CHECK_CACHE.get(id(page_table))
    if entry is not None and entry[1] == num_rows and unchanged(entry[0], (page_table, ranks)):
        return
    if num_slots:
        lo, hi = torch.aminmax(ranks)
        if int(lo) < 0:
            s = int((ranks < 0).nonzero()[0])
            raise ValueError(f"ranks: slot {s} has negative rank {int(ranks[s])}")
        if int(hi) > max_rank:
            s = int((ranks > max_rank).nonzero()[0])
            raise ValueError(f"ranks: slot {s} has rank {int(ranks[s])} above max_rank={max_rank} (page_table width)")
        live = torch.arange(max_rank, device=device)[None, :] < ranks[:, None]
        bad = live & ((page_table < 0) | (page_table >= num_rows))
        if bool(bad.any()):
            s, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"page_table: slot {s} rank row {j} points at row {int(page_table[s, j])}, "
                f"out of range for lora_a/lora_b with {num_rows} rows"
            )
    pinned = pin((page_table, ranks))
    if pinned is None:  # inference tensors: no version counter, so no caching
        return
    if len(_PAGE_CHECK_CACHE) > 64:
        _PAGE_CHECK_CACHE.clear()
    _PAGE_CHECK_CACHE[id(page_table)] = (pinned, num_rows)
