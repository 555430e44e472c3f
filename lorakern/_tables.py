"""Per-slice device tables shared by the Triton and CUDA backends: the data pointer, row stride, width and output
offset of each slice's weights, so that all slices of a target run in one launch.

The tables are cached by content (the pointers and sizes they hold, so a cached table is never wrong), for two
reasons: a repeated call does no host-to-device copy, and a CUDA graph reads the very table the capture saw, on
every replay. So the cache is large (a model's targets times two, for any model size: an LRU of a few hundred
entries was thrashed by an 80-layer model, one blocking copy per call), and an entry used while a graph is being
captured is pinned for the life of the process (evicting it would free memory that replays still read). A table
first needed during a capture cannot be made there (a host-to-device copy cannot be captured): the error says to
run the op once before capturing, as CUDA-graph capture wants anyway."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch

__all__ = ["slice_tables", "cached_table", "SliceTables"]

_TABLES: "OrderedDict[tuple, object]" = OrderedDict()
_PINNED: set = set()
#: unpinned entries kept (least recently used first out); far above any model's number of LoRA targets
TABLES_MAX = 16384


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cached_table(key: tuple, device: torch.device, build):
    """The cached device table for ``key`` (which must determine its content), else ``build()``, cached."""
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        if _capturing(device):
            _PINNED.add(key)
        return hit
    if _capturing(device):
        raise RuntimeError(
            "lorakern: these LoRA weights are first used inside a CUDA-graph capture; their device table of "
            "pointers and sizes needs a host-to-device copy, which a capture cannot record. Run the op (or the "
            "model) once with the same weights before capturing.")
    table = build()
    _TABLES[key] = table
    if len(_TABLES) - len(_PINNED) > TABLES_MAX:
        for k in [k for k in _TABLES if k not in _PINNED][:len(_TABLES) - len(_PINNED) - TABLES_MAX]:
            del _TABLES[k]  # the least recently used unpinned ones
    return table


class SliceTables(tuple):
    """What :func:`slice_tables` returns: the 4-tuple ``(pointers, row strides, widths, offsets)`` of device tables
    (callers unpack it as such), plus facts the CUDA backend would otherwise recompute from the weights on every
    call, worked out once when the entry is built. All of them follow from the cache key (the weights' pointers,
    full strides and widths, and the offsets) or from the tables themselves, so a cache hit never brings a stale
    one:

    * ``data_ptrs``: the four tables' own addresses (the tables are the cache's, never written after the build);
    * ``widths``: the weights' widths (``shape[1]``), as in the key;
    * ``bases_aligned``: every weight's base is 16-byte aligned and its rows have unit inner stride;
    * ``row_gcd``: the gcd of the weights' row strides, widths and the offsets (in elements; 0 when all are 0), or
      None when a weight is not 2-D (then its last size is not in the key: the caller checks the tensors).

    So rows of every weight, at every offset, allow ``vec``-element vector access exactly when ``bases_aligned``
    and ``row_gcd % vec == 0`` (``vec`` divides each of them iff it divides their gcd)."""

    data_ptrs: tuple
    widths: tuple
    bases_aligned: bool
    row_gcd: Optional[int]


_DATA_PTR, _STRIDE = torch.Tensor.data_ptr, torch.Tensor.stride


def slice_tables(ws, offsets=None) -> SliceTables:
    """Device tables (data pointers, row strides[, widths, offsets]) for per-slice weights (see the module
    docstring for the cache). The key holds each weight's full strides (not only the row stride the table needs):
    one call per weight that way is cheaper than ``stride(0)``'s argument parsing, and it lets the key determine
    :class:`SliceTables`' alignment facts."""
    dev = ws[0].device
    ptrs = tuple(map(_DATA_PTR, ws))
    strides = tuple(map(_STRIDE, ws))
    widths = tuple([w.shape[1] for w in ws])
    key = (dev, ptrs, strides, widths, None if offsets is None else tuple(offsets))

    def build():
        i64 = dict(dtype=torch.int64, device=dev)
        offs = list(offsets) if offsets is not None else [0] * len(ws)
        tables = SliceTables((torch.tensor(ptrs, **i64), torch.tensor([s[0] for s in strides], **i64),
                              torch.tensor(widths, **i64), torch.tensor(offs, **i64)))
        tables.data_ptrs = tuple(t.data_ptr() for t in tables)
        tables.widths = widths
        tables.bases_aligned = all(p % 16 == 0 for p in ptrs) and all(s[-1] == 1 for s in strides)
        tables.row_gcd = (math.gcd(*(s[0] for s in strides), *widths, *offs)
                          if all(len(s) == 2 for s in strides) else None)
        return tables

    return cached_table(key, dev, build)
