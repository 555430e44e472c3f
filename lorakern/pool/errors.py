"""Typed errors of the adapter pool, the host cache, the loaders and the catalog.

Every error about one adapter names it (``adapter_id``) and says why (``reason``); its message reads
``adapter 'name': reason``. Each also derives from the builtin a caller would expect (``KeyError`` for an unknown
id, ``ValueError`` for a malformed file or an adapter that does not fit the layout, ``TypeError`` for a wrong
dtype, ``OSError`` for a file that cannot be read, ``RuntimeError`` for a full pool or an adapter in use), so
code written against the builtins keeps working. An operation that raises one of these leaves the pool, its host
cache and the catalog exactly as they were.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = [
    "PoolError",
    "AdapterError",
    "UnknownAdapterError",
    "AdapterFileError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "AdapterDtypeError",
    "AdapterStateError",
    "AdapterInUseError",
    "PoolCapacityError",
    "CatalogError",
]


class PoolError(Exception):
    """Base class of every error raised by :mod:`lorakern.pool`."""


class AdapterError(PoolError):
    """An error about one adapter: ``adapter_id`` and ``reason``."""

    def __init__(self, adapter_id, reason: str):
        self.adapter_id = adapter_id
        self.reason = reason
        super().__init__(f"adapter {adapter_id!r}: {reason}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return f"adapter {self.adapter_id!r}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.adapter_id, self.reason))


class UnknownAdapterError(AdapterError, KeyError):
    """The id is neither registered with the pool nor in its catalog (nor resident, for ``evict``-like calls)."""


class AdapterFileError(AdapterError, OSError):
    """An adapter's directory or file is missing or cannot be read."""


class AdapterFormatError(AdapterError, ValueError):
    """An adapter's files are malformed: truncated or corrupt safetensors, invalid ``adapter_config.json``,
    tensors that contradict the config, A without B, unsupported PEFT features (DoRA, biases, ...)."""


class AdapterMismatchError(AdapterError, ValueError):
    """A well-formed adapter that does not fit the pool: a module that matches no target of the layout, a layer
    out of range, a rank above ``max_rank``, a weight of the wrong shape."""


class AdapterDtypeError(AdapterError, TypeError):
    """A weight of a non-floating dtype, or (with ``strict_dtype=True``) of a dtype other than the pool's."""


class AdapterStateError(AdapterError, RuntimeError):
    """The adapter is not in the state the call needs: ``release`` of an adapter not in flight, ``unpin`` of one
    not pinned."""


class AdapterInUseError(AdapterStateError):
    """The operation needs an idle adapter (``evict``, ``invalidate``, re-``register``), but it is pinned or used by
    a batch in flight."""


class PoolCapacityError(PoolError, RuntimeError):
    """A wave of adapters cannot be admitted: not enough rows or slots, even after evicting every adapter that is
    neither pinned nor in flight. ``adapter_ids`` lists the adapters that could not be admitted."""

    def __init__(self, reason: str, adapter_ids: Sequence = (), *, rows_needed: Optional[int] = None,
                 rows_available: Optional[int] = None, slots_needed: Optional[int] = None,
                 slots_available: Optional[int] = None):
        self.reason = reason
        self.adapter_ids = list(adapter_ids)
        self.rows_needed, self.rows_available = rows_needed, rows_available
        self.slots_needed, self.slots_available = slots_needed, slots_available
        ids = self.adapter_ids
        shown = ", ".join(repr(a) for a in ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
        super().__init__(f"cannot admit adapter{'s' if len(ids) != 1 else ''} {shown}: {reason}" if ids
                         else reason)

    def __reduce__(self):
        return (_rebuild_capacity, (self.reason, self.adapter_ids, self.rows_needed, self.rows_available,
                                    self.slots_needed, self.slots_available))


def _rebuild_capacity(reason, ids, rn, ra, sn, sa):
    return PoolCapacityError(reason, ids, rows_needed=rn, rows_available=ra, slots_needed=sn, slots_available=sa)


class CatalogError(PoolError, ValueError):
    """A catalog index file that is missing, truncated or corrupt, or catalog input that is invalid (duplicate
    ids, values out of range). ``path`` names the file when there is one."""

    def __init__(self, reason: str, path=None):
        self.reason = reason
        self.path = path
        super().__init__(f"catalog {str(path)!r}: {reason}" if path is not None else f"catalog: {reason}")

    def __reduce__(self):
        return (type(self), (self.reason, self.path))
