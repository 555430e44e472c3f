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

from collections import OrderedDict

import torch

__all__ = ["slice_tables", "cached_table"]

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


def slice_tables(ws, offsets=None):
    """Device tables (data pointers, row strides[, widths, offsets]) for per-slice weights (see the module
    docstring for the cache)."""
    dev = ws[0].device
    ptrs = [w.data_ptr() for w in ws]
    strides = [w.stride(0) for w in ws]
    widths = [w.shape[1] for w in ws]
    key = (dev, tuple(ptrs), tuple(strides), tuple(widths), None if offsets is None else tuple(offsets))

    def build():
        i64 = dict(dtype=torch.int64, device=dev)
        return (torch.tensor(ptrs, **i64), torch.tensor(strides, **i64), torch.tensor(widths, **i64),
                torch.tensor(offsets if offsets is not None else [0] * len(ws), **i64))

    return cached_table(key, dev, build)
