"""The host cache tier: packed rank-row records of recently used adapters, between the disk and the device pool.

An entry is exactly what the pool copies to the device — the adapter's ``[rank, row_elems]`` record in the pool
dtype (see :class:`~lorakern.pool.spec.RowFormat`) — so a host hit costs one host-to-device copy and no parsing.
Records are allocated in pinned memory when CUDA is available (the copy is then asynchronous). Eviction is LRU by
a byte budget; a record larger than the whole budget is not cached (it is still used for the load at hand).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

__all__ = ["HostCache", "HostRecord"]


@dataclass
class HostRecord:
    """One cached adapter: its packed rows, rank, slot scale, and the token of the source it was read from."""

    rows: torch.Tensor  # [rank, row_elems], pool dtype, host (pinned when CUDA is available)
    rank: int
    scale: float
    token: object = None
    targets: frozenset = frozenset()

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


class HostCache:
    """LRU cache of :class:`HostRecord` by a byte budget (``max_bytes``; 0 disables it)."""

    def __init__(self, max_bytes: int = 1 << 30):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes: expected an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[object, HostRecord]" = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ queries (no side effects)
    def peek(self, adapter_id) -> Optional[HostRecord]:
        """The record, without touching the LRU order or the counters."""
        return self._entries.get(adapter_id)

    def __contains__(self, adapter_id) -> bool:
        return adapter_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator:
        """Ids from least to most recently used."""
        return iter(list(self._entries))

    @property
    def nbytes(self) -> int:
        return self._bytes

    # ------------------------------------------------------------------ updates
    def get(self, adapter_id) -> Optional[HostRecord]:
        """The record (marked most recently used), or None."""
        rec = self._entries.get(adapter_id)
        if rec is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(adapter_id)
        return rec

    def put(self, adapter_id, rec: HostRecord) -> bool:
        """Insert (or replace) a record, evicting least recently used ones to fit. False if it is too large."""
        self.discard(adapter_id)
        if rec.nbytes > self.max_bytes:
            return False
        while self._bytes + rec.nbytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
        self._entries[adapter_id] = rec
        self._bytes += rec.nbytes
        return True

    def discard(self, adapter_id) -> bool:
        rec = self._entries.pop(adapter_id, None)
        if rec is None:
            return False
        self._bytes -= rec.nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def state(self) -> tuple:
        """A comparable snapshot of the cache's ids (in LRU order) and size, for tests of transactional calls."""
        return tuple(self._entries), self._bytes

    def __repr__(self) -> str:
        return (f"HostCache({len(self._entries)} adapters, {self._bytes / 2**20:.1f} / "
                f"{self.max_bytes / 2**20:.1f} MiB)")
