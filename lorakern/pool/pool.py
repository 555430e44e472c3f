r"""AdapterPool: the device-resident rank rows of DESIGN.md §2 for every layer and target of a model, with LRU
residency, pinning, batch admission and a host cache tier.

Memory
------
One tensor ``rows: [max_rows, row_elems]`` on the pool's device holds every rank row; a rank row is a record with
that rank component of every layer, target and slice (:class:`~lorakern.pool.spec.RowFormat`). The ops' per-target
tensors are strided views into it::

    pool.lora_a(layer, target)  ->  [rows[:, a_off_i : a_off_i + K]        for each slice i]   [max_rows, K]
    pool.lora_b(layer, target)  ->  [rows[:, b_off_i : b_off_i + N_i]      for each slice i]   [max_rows, N_i]
                                    (MoE targets: [max_rows, E, K] / [max_rows, E, N_i])
    pool.page_table   int32 [max_slots, max_rank]   row ids of each slot; -1 beyond its rank and for free slots
    pool.ranks        int32 [max_slots]             0 for a free slot
    pool.scales       float32 [max_slots]           0.0 for a free slot

A rank-``r`` adapter holds exactly ``r`` rows (anywhere; the lowest free rows are taken, so they are mostly
contiguous) and one slot. Its rows are written whole on load — targets it lacks and module ranks below ``r``
as zeros — so nothing of a previous occupant survives. These tensors never move or change identity (CUDA graphs
can capture them); only their contents change.

Residency
---------
``acquire(ids)`` admits a whole batch (a *wave*) at once and returns each id's slot. It first plans the wave —
sources resolved, missing adapters read and packed into host records (or taken from the host cache), victims
chosen in LRU order among adapters that are neither pinned, nor in flight, nor part of the wave — and only
then commits. Any failure (unknown id, malformed file, adapter that does not fit the layout, wave too large)
raises a typed error and leaves the pool, its host cache and its counters exactly as they were. ``release(ids)``
ends the batch; ``pin``/``unpin`` keep adapters resident across batches.

CUDA
----
Row copies run on a side stream, from pinned host records, after the side stream waits for all work queued so
far on the current stream (a batch that still reads an evicted adapter's rows finishes before they are
overwritten). Each load records an event; ``acquire`` makes the current stream wait on the events of the wave's
adapters, so compute never reads a half-written adapter. ``prefetch``/``load`` start copies early so that they
overlap compute. Page table, ranks and scales are updated by one copy on the current stream. On the CPU,
copies are plain and synchronous.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lorakern.pool.errors import (AdapterError, AdapterFormatError, AdapterInUseError, AdapterMismatchError,
                                  AdapterStateError, PoolCapacityError, UnknownAdapterError)
from lorakern.pool.host_cache import HostCache, HostRecord
from lorakern.pool.loaders import AdapterSource, as_source, host_copy, pack_record
from lorakern.pool.spec import PoolLayout, RowFormat

__all__ = ["AdapterPool", "PoolStats", "Wave"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if int(v) < 1:
        raise ValueError(f"{name}: must be >= 1, got {v}")
    return int(v)


class _Entry:
    __slots__ = ("slot", "rows", "rank", "scale", "pins", "inflight", "ready", "staging", "targets")

    def __init__(self, slot: int, rows: np.ndarray, rank: int, scale: float, targets=frozenset()):
        self.slot, self.rows, self.rank, self.scale = slot, rows, rank, scale
        self.pins = 0
        self.inflight = 0
        self.ready = None  # CUDA event recorded after the row copies, until some acquire has waited on it
        self.staging = None  # the host record, kept alive until the copy is known to be done
        self.targets = targets


@dataclass(frozen=True)
class PoolStats:
    """Occupancy and counters of a pool (see :meth:`AdapterPool.stats`)."""

    rows_total: int
    rows_used: int
    slots_total: int
    slots_used: int
    resident: int
    pinned: int
    in_flight: int
    row_bytes: int
    host_cached: int
    host_bytes: int
    host_budget: int
    loads: int  # adapters copied into the pool (host hits + disk reads)
    disk_reads: int  # adapters read from their source (host cache misses)
    evictions: int

    @property
    def rows_free(self) -> int:
        return self.rows_total - self.rows_used

    @property
    def slots_free(self) -> int:
        return self.slots_total - self.slots_used

    @property
    def device_bytes(self) -> int:
        return self.rows_total * self.row_bytes


class Wave:
    """One admitted batch: ``slots`` (int32 ``[len(ids)]`` on the pool's device) and the ids it holds in flight.
    Release it once (``release()``, or leave its ``with`` block)."""

    def __init__(self, pool: "AdapterPool", ids: List, slots: torch.Tensor):
        self.pool, self.adapter_ids, self.slots = pool, ids, slots
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.pool._release_unique(self.adapter_ids)
            self.released = True

    def __enter__(self) -> torch.Tensor:
        return self.slots

    def __exit__(self, *exc) -> None:
        self.release()


class AdapterPool:
    """Device rank rows (DESIGN.md §2) for every layer and target of ``layout``, with LRU residency.

    Parameters
    ----------
    layout : PoolLayout
        Targets of the model (dense and packed MoE) and the PEFT module name map.
    max_rows : int
        Capacity in rank rows (each ``row_bytes`` = the model's LoRA bytes per rank; see :attr:`row_bytes`).
    max_slots : int
        Capacity in adapters (slots). ``page_table`` is ``[max_slots, max_rank]``.
    max_rank : int
        Largest rank an adapter may have.
    dtype : torch.dtype, default float16
        Weight dtype of the rows; float sources are cast to it (rounded once) unless ``strict_dtype``.
    device : default "cpu"
    host_cache : int or HostCache, default 1 GiB
        Byte budget of the host cache tier (``0`` disables it), or a cache to use.
    catalog : AdapterCatalog, optional
        Resolves ids that were not :meth:`register`-ed.
    strict_dtype : bool, default False
        Reject sources whose dtype differs from ``dtype`` instead of casting.
    """

    def __init__(self, layout: PoolLayout, *, max_rows: int, max_slots: int, max_rank: int,
                 dtype: torch.dtype = torch.float16, device="cpu", host_cache=1 << 30, catalog=None,
                 strict_dtype: bool = False):
        if not isinstance(layout, PoolLayout):
            raise TypeError(f"layout: expected a PoolLayout, got {type(layout).__name__}")
        self.max_rows = _pos_int("max_rows", max_rows)
        self.max_slots = _pos_int("max_slots", max_slots)
        self.max_rank = _pos_int("max_rank", max_rank)
        if self.max_rows >= 2**31 or self.max_slots * self.max_rank >= 2**31:
            raise ValueError("max_rows: row ids and the page table must fit in int32")
        if dtype not in _FLOAT:
            raise TypeError(f"dtype: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device: {dev} requested, but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        self.layout = layout
        self.dtype = dtype
        self.device = dev
        self.strict_dtype = bool(strict_dtype)
        self._cuda = dev.type == "cuda"
        self._pin = torch.cuda.is_available()
        self.fmt = RowFormat(layout, dtype)
        if isinstance(host_cache, HostCache):
            self.host_cache = host_cache
        else:
            self.host_cache = HostCache(host_cache)
        self.catalog = catalog

        self._rows = torch.zeros(self.max_rows, self.fmt.row_elems, dtype=dtype, device=dev)
        S, R = self.max_slots, self.max_rank
        self._meta = torch.empty(S * R + 2 * S, dtype=torch.int32, device=dev)
        self.page_table = self._meta[:S * R].view(S, R)
        self.ranks = self._meta[S * R:S * R + S]
        self.scales = self._meta[S * R + S:].view(torch.float32)
        self._meta_host = torch.empty(S * R + 2 * S, dtype=torch.int32)
        mh = self._meta_host.numpy()
        self._pt_h = mh[:S * R].reshape(S, R)
        self._rk_h = mh[S * R:S * R + S]
        self._sc_h = mh[S * R + S:].view(np.float32)
        self._pt_h.fill(-1)
        self._rk_h.fill(0)
        self._sc_h.fill(0.0)
        self._push_meta()

        self._free_rows = np.ones(self.max_rows, dtype=bool)
        self._free_slots = np.ones(self.max_slots, dtype=bool)
        self._n_free_rows = self.max_rows
        self._n_free_slots = self.max_slots
        self._resident: "OrderedDict[str, _Entry]" = OrderedDict()  # least recently used first
        self._sources: Dict[str, AdapterSource] = {}
        self._views: Dict[Tuple[int, str], Tuple[list, list]] = {}
        self._loads = self._disk_reads = self._evictions = 0
        self._copy_stream = torch.cuda.Stream(dev) if self._cuda else None

    # ================================================================================================ accessors
    @property
    def row_bytes(self) -> int:
        """Bytes of one rank row (one rank component of every layer, target and slice)."""
        return self.fmt.row_bytes

    @property
    def rows(self) -> torch.Tensor:
        """The row buffer ``[max_rows, row_elems]`` that every ``lora_a``/``lora_b`` view points into."""
        return self._rows

    def _target_views(self, layer: int, target: str) -> Tuple[list, list]:
        key = (layer, target)
        v = self._views.get(key)
        if v is None:
            if target not in self.layout.specs:
                raise ValueError(f"target: unknown {target!r}; the layout has {list(self.layout.target_names)}")
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not self.layout.has(
                    int(layer), target):
                raise ValueError(f"layer: {layer!r} has no target {target!r} (the layout has "
                                 f"{self.layout.num_layers} layers)")
            v = self.fmt.views(self._rows, int(layer), target)
            self._views[key] = v
        return v

    def lora_a(self, layer: int, target: str) -> List[torch.Tensor]:
        """Per-slice ``lora_a`` for the ops: ``[max_rows, K]`` (MoE: ``[max_rows, E, K]``) strided views."""
        return self._target_views(layer, target)[0]

    def lora_b(self, layer: int, target: str) -> List[torch.Tensor]:
        """Per-slice ``lora_b`` for the ops: ``[max_rows, N_i]`` (MoE: ``[max_rows, E, N_i]``) strided views."""
        return self._target_views(layer, target)[1]

    def args(self, layer: int, target: str):
        """``(lora_a, lora_b, page_table, ranks, scales)`` in the ops' argument order."""
        a, b = self._target_views(layer, target)
        return a, b, self.page_table, self.ranks, self.scales

    def __contains__(self, adapter_id) -> bool:
        return adapter_id in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def resident_ids(self) -> List[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def slot_of(self, adapter_id) -> int:
        """The slot of a resident adapter, ``-1`` if it is not resident."""
        e = self._resident.get(adapter_id)
        return -1 if e is None else e.slot

    def rows_of(self, adapter_id) -> Optional[np.ndarray]:
        """Row ids of a resident adapter (a copy), ``None`` if it is not resident."""
        e = self._resident.get(adapter_id)
        return None if e is None else e.rows.copy()

    def is_pinned(self, adapter_id) -> bool:
        e = self._resident.get(adapter_id)
        return e is not None and e.pins > 0

    def in_flight(self, adapter_id) -> int:
        """How many acquired, unreleased waves hold the adapter."""
        e = self._resident.get(adapter_id)
        return 0 if e is None else e.inflight

    def stats(self) -> PoolStats:
        ents = self._resident.values()
        return PoolStats(
            rows_total=self.max_rows, rows_used=self.max_rows - self._n_free_rows,
            slots_total=self.max_slots, slots_used=self.max_slots - self._n_free_slots,
            resident=len(self._resident), pinned=sum(1 for e in ents if e.pins),
            in_flight=sum(1 for e in ents if e.inflight), row_bytes=self.row_bytes,
            host_cached=len(self.host_cache), host_bytes=self.host_cache.nbytes,
            host_budget=self.host_cache.max_bytes, loads=self._loads, disk_reads=self._disk_reads,
            evictions=self._evictions)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"AdapterPool({s.resident} resident, rows {s.rows_used}/{s.rows_total}, slots "
                f"{s.slots_used}/{s.slots_total}, max_rank={self.max_rank}, {self.dtype}, {self.device}, "
                f"{self.row_bytes / 2**20:.2f} MiB/row)")

    # ================================================================================================ sources
    def register(self, adapter_id: str, source, *, replace: bool = False) -> AdapterSource:
        """Say where an adapter's weights are: an :class:`~lorakern.pool.loaders.AdapterSource`, a PEFT directory
        path, a ``.safetensors`` blob path, or a mapping of module → ``(A, B)``. Nothing is read yet.

        Re-registering needs ``replace=True``; it drops the old weights from the host cache and the pool (an
        adapter in use raises :class:`AdapterInUseError`, changing nothing)."""
        self._check_id(adapter_id, "adapter_id")
        src = as_source(source)
        if adapter_id in self._sources and not replace:
            raise ValueError(f"adapter_id: {adapter_id!r} is already registered (pass replace=True)")
        if replace:
            self._drop(adapter_id)
        self._sources[adapter_id] = src
        return src

    def unregister(self, adapter_id: str) -> None:
        """Forget a registered source (and drop the adapter from the host cache and the pool, if idle)."""
        if adapter_id not in self._sources:
            raise UnknownAdapterError(adapter_id, "not registered with this pool")
        self._drop(adapter_id)
        del self._sources[adapter_id]

    def invalidate(self, adapter_id: str) -> bool:
        """Drop an adapter from the host cache and from the pool so that its next use re-reads its source.
        Raises :class:`AdapterInUseError` (changing nothing) if it is pinned or in flight."""
        return self._drop(adapter_id)

    def _drop(self, adapter_id) -> bool:
        e = self._resident.get(adapter_id)
        if e is not None and (e.pins or e.inflight):
            raise AdapterInUseError(adapter_id, self._busy_reason(e))
        dropped = self.host_cache.discard(adapter_id)
        if e is not None:
            self._evict_entry(adapter_id)
            self._push_meta()
            dropped = True
        return dropped

    def is_registered(self, adapter_id) -> bool:
        """Whether ``adapter_id`` was registered with this pool (catalog ids are not registered)."""
        return adapter_id in self._sources

    @staticmethod
    def adapter_keys(adapter_ids) -> List[Optional[str]]:
        """A batch's adapter ids normalised as :meth:`acquire` reads them (``None`` or ``-1`` = no adapter);
        ``TypeError`` for anything else."""
        return AdapterPool._keys(adapter_ids)

    def source_of(self, adapter_id) -> AdapterSource:
        src = self._sources.get(adapter_id)
        if src is not None:
            return src
        if self.catalog is not None:
            return self.catalog.source(adapter_id)  # raises UnknownAdapterError
        raise UnknownAdapterError(adapter_id, "not registered with the pool, and the pool has no catalog")

    # ================================================================================================ residency
    @staticmethod
    def _check_id(a, name):
        if not isinstance(a, str):
            raise TypeError(f"{name}: expected a str adapter id, got {type(a).__name__}")

    @staticmethod
    def _keys(adapter_ids) -> List[Optional[str]]:
        if isinstance(adapter_ids, (str, bytes)):
            raise TypeError("adapter_ids: expected a sequence of ids (None or -1 = no adapter), got a single "
                            f"{type(adapter_ids).__name__}; wrap it in a list")
        try:
            keys = list(adapter_ids)
        except TypeError:
            raise TypeError(f"adapter_ids: expected a sequence of ids, got {type(adapter_ids).__name__}") from None
        for i, k in enumerate(keys):
            if type(k) is not str:
                if k is None or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k == -1):
                    keys[i] = None
                elif not isinstance(k, str):
                    raise TypeError(f"adapter_ids[{i}]: expected a str id, None or -1, got {k!r}")
        return keys

    def acquire(self, adapter_ids: Sequence) -> torch.Tensor:
        """Admit a wave and hold its adapters in flight; returns int32 ``slots [len(adapter_ids)]`` on the pool's
        device (``None`` / ``-1`` entries → ``-1``). Duplicates share a slot. Missing adapters are loaded; idle ones
        are evicted in LRU order if needed. Failure raises (:class:`PoolCapacityError`,
        :class:`UnknownAdapterError`, a load error) and changes nothing. Pair with :meth:`release`."""
        keys = self._keys(adapter_ids)
        uniq = list(dict.fromkeys(k for k in keys if k is not None))
        self._admit(uniq)
        res = self._resident
        waits = None
        for a in uniq:
            e = res[a]
            e.inflight += 1
            res.move_to_end(a)
            if e.ready is not None:
                waits = waits or []
                waits.append(e)
        if waits:
            self._wait_ready(waits)
        slots = torch.tensor([-1 if k is None else res[k].slot for k in keys], dtype=torch.int32)
        return slots.to(self.device, non_blocking=True) if self._cuda else slots

    def wave(self, adapter_ids: Sequence) -> Wave:
        """:meth:`acquire` as a handle: ``with pool.wave(ids) as slots: ...`` releases on exit."""
        keys = self._keys(adapter_ids)
        slots = self.acquire(keys)
        return Wave(self, list(dict.fromkeys(k for k in keys if k is not None)), slots)

    def release(self, adapter_ids: Sequence) -> None:
        """End a wave: the adapters (deduplicated, as in :meth:`acquire`) are no longer held in flight. Raises
        :class:`AdapterStateError` (changing nothing) if one of them is not in flight."""
        keys = self._keys(adapter_ids)
        self._release_unique(list(dict.fromkeys(k for k in keys if k is not None)))

    def _release_unique(self, uniq: List[str]) -> None:
        res = self._resident
        for a in uniq:
            e = res.get(a)
            if e is None or e.inflight == 0:
                raise AdapterStateError(a, "not in flight: release without a matching acquire")
        for a in uniq:
            res[a].inflight -= 1

    def load(self, adapter_ids: Sequence) -> None:
        """Make adapters resident (same planning and errors as :meth:`acquire`) without holding them in flight.
        On CUDA the copies are queued on the side stream and overlap whatever runs meanwhile."""
        keys = self._keys(adapter_ids)
        uniq = list(dict.fromkeys(k for k in keys if k is not None))
        self._admit(uniq)
        for a in uniq:
            self._resident.move_to_end(a)

    prefetch = load

    def prefetch_host(self, adapter_ids: Sequence) -> int:
        """Read adapters into the host cache only (no device memory used). All are read and checked before any is
        inserted; returns how many were read."""
        keys = self._keys(adapter_ids)
        todo = [a for a in dict.fromkeys(k for k in keys if k is not None)
                if a not in self._resident and self._cached(a) is None]
        recs = [(a, self._read(a)) for a in todo]
        for a, rec in recs:
            self.host_cache.put(a, rec)
        self._disk_reads += len(recs)
        return len(recs)

    def pin(self, adapter_id: str) -> int:
        """Keep an adapter resident until :meth:`unpin` (loading it now if needed; pins nest). Returns its slot."""
        self._check_id(adapter_id, "adapter_id")
        self._admit([adapter_id])
        e = self._resident[adapter_id]
        e.pins += 1
        self._resident.move_to_end(adapter_id)
        return e.slot

    def unpin(self, adapter_id: str) -> None:
        e = self._resident.get(adapter_id)
        if e is None or e.pins == 0:
            raise AdapterStateError(adapter_id, "not pinned")
        e.pins -= 1

    def evict(self, adapter_id: str) -> bool:
        """Evict an idle adapter from the pool now (its host-cache record stays). False if it is not resident;
        :class:`AdapterInUseError` if it is pinned or in flight."""
        e = self._resident.get(adapter_id)
        if e is None:
            return False
        if e.pins or e.inflight:
            raise AdapterInUseError(adapter_id, self._busy_reason(e))
        self._evict_entry(adapter_id)
        self._push_meta()
        return True

    @staticmethod
    def _busy_reason(e: _Entry) -> str:
        parts = ([f"pinned ({e.pins}x)"] if e.pins else []) + ([f"in flight in {e.inflight} wave(s)"]
                                                               if e.inflight else [])
        return "in use: " + " and ".join(parts)

    # ------------------------------------------------------------------------------------------ admission
    def _cached(self, aid, src: Optional[AdapterSource] = None) -> Optional[HostRecord]:
        """A valid host-cache record (its source unchanged), without touching the LRU order."""
        rec = self.host_cache.peek(aid)
        if rec is None:
            return None
        if src is None:
            try:
                src = self.source_of(aid)
            except UnknownAdapterError:
                return None
        if rec.rows.dtype != self.dtype or rec.rows.shape[1] != self.fmt.row_elems:
            return None  # a cache shared with a pool of another layout or dtype
        return rec if rec.token == src.token() else None

    def _read(self, aid, src: Optional[AdapterSource] = None) -> HostRecord:
        """Read and pack one adapter from its source (no side effect on the pool or the cache)."""
        if src is None:
            src = self.source_of(aid)
        if src.rank_hint is not None and src.rank_hint > self.max_rank:
            raise AdapterMismatchError(aid, f"rank {src.rank_hint} above the pool's max_rank={self.max_rank}")
        token = src.token()
        try:
            # A source may write the host record itself (the packed MoE format reads its file straight into the
            # record: lorakern/pool/packed.py); None = use the generic read + pack_record.
            direct = getattr(src, "read_record", None)
            got = None if direct is None else direct(aid, self.layout, self.fmt, pin=self._pin,
                                                     strict_dtype=self.strict_dtype, max_rank=self.max_rank)
            if got is not None:
                rows, rank, scale, targets = got
            else:
                w = src.read(aid, self.layout)
                if w.rank > self.max_rank:
                    raise AdapterMismatchError(aid, f"rank {w.rank} above the pool's max_rank={self.max_rank}")
                rows = pack_record(w, self.fmt, pin=self._pin, strict_dtype=self.strict_dtype)
                rank, scale, targets = w.rank, w.scale, w.targets
        except AdapterError:
            raise
        except Exception as e:  # anything else a reader may raise: still name the adapter and the reason
            raise AdapterFormatError(aid, f"cannot read from {src!r}: {type(e).__name__}: {e}") from e
        return HostRecord(rows, rank, scale, token, frozenset(targets))

    def _admit(self, wave: List[str]) -> None:
        """Make every adapter of ``wave`` (distinct ids) resident, transactionally: plan, then commit."""
        res = self._resident
        missing = [a for a in wave if a not in res]
        if not missing:
            return
        if len(wave) > self.max_slots:
            raise PoolCapacityError(f"the wave has {len(wave)} distinct adapters, more than the pool's "
                                    f"{self.max_slots} slots", missing, slots_needed=len(wave),
                                    slots_available=self.max_slots)
        # --- plan: what can be freed (no state is touched until the commit below)
        in_wave = set(wave)
        evictable = [(a, e) for a, e in res.items() if not e.pins and not e.inflight and a not in in_wave]
        avail_slots = self._n_free_slots + len(evictable)
        avail_rows = self._n_free_rows + sum(e.rank for _, e in evictable)

        def capacity_error(rows_needed, known: bool):
            wave_rows = sum(res[a].rank for a in wave if a in res)
            pin_rows = sum(e.rank for a, e in res.items() if e.pins and a not in in_wave)
            fl = [e for a, e in res.items() if e.inflight and not e.pins and a not in in_wave]
            npin = sum(1 for a, e in res.items() if e.pins and a not in in_wave)
            what = "needs" if known else "needs at least"
            return PoolCapacityError(
                f"the wave {what} {rows_needed} rows and {len(missing)} slots for its {len(missing)} adapters not "
                f"resident; {avail_rows} rows and {avail_slots} slots are free or held by idle adapters "
                f"(the pool has {self.max_rows} rows and {self.max_slots} slots; {wave_rows} rows held by "
                f"{len(wave) - len(missing)} resident adapters of the wave, {pin_rows} by {npin} pinned adapters, "
                f"{sum(e.rank for e in fl)} by {len(fl)} adapters in flight)",
                missing, rows_needed=rows_needed, rows_available=avail_rows, slots_needed=len(missing),
                slots_available=avail_slots)

        # fail fast, before any read, on what is known without reading (catalog ranks, host cache)
        srcs = [self.source_of(a) for a in missing]  # UnknownAdapterError
        cached = [self._cached(a, s) for a, s in zip(missing, srcs)]
        lower = 0
        for a, src, rec in zip(missing, srcs, cached):
            hint = rec.rank if rec is not None else src.rank_hint
            if hint is not None and hint > self.max_rank:
                raise AdapterMismatchError(a, f"rank {hint} above the pool's max_rank={self.max_rank}")
            lower += hint if hint is not None else 1
        if len(missing) > avail_slots or lower > avail_rows:
            raise capacity_error(lower, False)
        # read what is not in the host cache (errors name the adapter; nothing is changed)
        recs: List[Tuple[str, HostRecord, bool]] = []
        for a, src, rec in zip(missing, srcs, cached):
            recs.append((a, rec, True) if rec is not None else (a, self._read(a, src), False))
        need_rows = sum(r.rank for _, r, _ in recs)
        if need_rows > avail_rows:
            raise capacity_error(need_rows, True)
        # victims in LRU order until rows and slots suffice
        free_rows, free_slots = self._n_free_rows, self._n_free_slots
        victims = []
        for a, e in evictable:
            if free_rows >= need_rows and free_slots >= len(missing):
                break
            victims.append(a)
            free_rows += e.rank
            free_slots += 1
        # assignment: lowest free rows and slots, after the victims' are freed
        fr = self._free_rows.copy()
        fs = self._free_slots.copy()
        for a in victims:
            e = res[a]
            fr[e.rows] = True
            fs[e.slot] = True
        row_ids = np.flatnonzero(fr)
        slot_ids = np.flatnonzero(fs)
        # --- commit
        for a in victims:
            self._evict_entry(a)
        off = 0
        for i, (a, rec, cached) in enumerate(recs):
            rows = row_ids[off:off + rec.rank].astype(np.int64)
            off += rec.rank
            slot = int(slot_ids[i])
            self._install(a, rec, rows, slot)
            if cached:
                self.host_cache.get(a)  # touch
            else:
                self.host_cache.put(a, rec)
                self._disk_reads += 1
        self._push_meta()

    def _install(self, aid, rec: HostRecord, rows: np.ndarray, slot: int) -> None:
        r = rec.rank
        self._free_rows[rows] = False
        self._free_slots[slot] = False
        self._n_free_rows -= r
        self._n_free_slots -= 1
        e = _Entry(slot, rows, r, rec.scale, rec.targets)
        e.ready = self._copy_rows(rows, rec.rows)
        if e.ready is not None:
            e.staging = rec.rows
        self._pt_h[slot, :r] = rows
        self._pt_h[slot, r:] = -1
        self._rk_h[slot] = r
        self._sc_h[slot] = rec.scale
        self._resident[aid] = e
        self._loads += 1

    def _evict_entry(self, aid) -> None:
        e = self._resident.pop(aid)
        self._free_rows[e.rows] = True
        self._free_slots[e.slot] = True
        self._n_free_rows += e.rank
        self._n_free_slots += 1
        self._pt_h[e.slot, :] = -1
        self._rk_h[e.slot] = 0
        self._sc_h[e.slot] = 0.0
        self._evictions += 1

    # ------------------------------------------------------------------------------------------ copies
    def _copy_rows(self, rows: np.ndarray, src: torch.Tensor):
        """Copy ``src [r, row_elems]`` into the pool rows ``rows``: one copy per run of consecutive ids.
        Returns the CUDA event that marks the end of the copies (None on the CPU)."""
        if rows.size == 0:
            return None
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [rows.size]))
        if not self._cuda:
            for i0, i1 in zip(starts.tolist(), ends.tolist()):
                r0 = int(rows[i0])
                host_copy(self._rows[r0:r0 + (i1 - i0)], src[i0:i1])
            return None
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier readers of these rows finish first
        with torch.cuda.stream(stream):
            for i0, i1 in zip(starts.tolist(), ends.tolist()):
                r0 = int(rows[i0])
                self._rows[r0:r0 + (i1 - i0)].copy_(src[i0:i1], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        return ev

    def _wait_ready(self, entries) -> None:
        cur = torch.cuda.current_stream(self.device)
        for e in entries:
            if e.ready.query():
                e.ready = e.staging = None
            else:
                cur.wait_event(e.ready)
                e.ready = None  # the current stream is now ordered after the copy; staging is held by the
                e.staging = None  # caching host allocator until the copy's event completes

    def _push_meta(self) -> None:
        if self._cuda:
            staged = self._meta_host.pin_memory()
            self._meta.copy_(staged, non_blocking=True)
        else:
            self._meta.copy_(self._meta_host)

    def synchronize(self) -> None:
        """Wait for every queued row copy (CUDA); a no-op on the CPU."""
        if self._cuda:
            self._copy_stream.synchronize()

    # ------------------------------------------------------------------------------------------ tests
    def _state(self) -> tuple:
        """A comparable snapshot of every piece of bookkeeping (not the row contents), for tests."""
        ents = tuple((a, e.slot, tuple(e.rows.tolist()), e.rank, e.scale, e.pins, e.inflight)
                     for a, e in self._resident.items())
        return (ents, self._free_rows.tobytes(), self._free_slots.tobytes(), self._n_free_rows,
                self._n_free_slots, self._meta_host.numpy().tobytes(), self._meta.cpu().numpy().tobytes(),
                self.host_cache.state(), tuple(self._sources), self._loads, self._disk_reads, self._evictions)
