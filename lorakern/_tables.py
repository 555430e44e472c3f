"""Per-slice device tables shared by the Triton and CUDA backends: the data pointer, row stride, width and output
offset of each slice's weights, so that all slices of a target run in one launch."""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["slice_tables"]

_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 512


def slice_tables(ws, offsets=None):
    """Device tables (data pointers, row strides[, widths, offsets]) for per-slice weights; cached by content so
    that repeated calls (and CUDA-graph captures after the first call) do no host-to-device copy."""
    dev = ws[0].device
    ptrs = [w.data_ptr() for w in ws]
    strides = [w.stride(0) for w in ws]
    widths = [w.shape[1] for w in ws]
    key = (dev, tuple(ptrs), tuple(strides), tuple(widths), None if offsets is None else tuple(offsets))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    i64 = dict(dtype=torch.int64, device=dev)
    t = (torch.tensor(ptrs, **i64), torch.tensor(strides, **i64), torch.tensor(widths, **i64),
         torch.tensor(offsets if offsets is not None else [0] * len(ws), **i64))
    _TABLES[key] = t
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return t
