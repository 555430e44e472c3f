"""LoRAPlan: the per-batch grouping of tokens by adapter slot, built once and reused by every layer.

A plan holds, on the tokens' device (all int32):

==================  =================  ====================================================================
``slots``           ``[T]``            the batch's slot per token (``-1`` = no LoRA)
``token_ids``       ``[T]``            token indices stably sorted by slot; ``-1`` tokens come last
``seg_starts``      ``[T + 1]``        start (in ``token_ids`` order) of each segment; unused entries = ``T``
``seg_slots``       ``[T]``            slot of each segment; ``-1`` for the no-LoRA segment and unused entries
``counts``          ``[T]``            tokens per segment (0 for unused entries)
``num_segments``    ``[1]``            number of segments (the no-LoRA segment included)
``tiles(bm)``       ``[T, 3]``         work list for kernels: ``(start, length, slot)`` of every block of at
                                       most ``bm`` consecutive sorted tokens of one LoRA segment; unused
                                       rows have length 0 (and come last) so that a fixed grid exits early
==================  =================  ====================================================================

Given the slots' ``ranks`` (``from_slots(slots, ranks=...)``, ``update(slots, ranks=...)``; the ops pass their own
when handed a plain slots tensor), the work tiles are ordered by descending rank of their slot (stable: an
adapter's tiles stay together, in token order). A kernel's CTAs start in tile order, so the longest ones start
first and a batch of mixed ranks does not end on a lone rank-128 tile (longest-processing-time-first). The order
changes no result: tiles are independent. Without ranks, tiles are in slot order.

Everything is computed on the device, with buffers of a size fixed by the token count, so the same code serves the
two forms. Where the CUDA extension can run (:mod:`lorakern.grouping`: the tokens' GPU is one it targets, up to
4096 tokens) that is one launch of its grouping kernel; elsewhere ~126 torch ops (148 with ranks), with the same
result bit for bit:

* ``LoRAPlan.from_slots(slots)`` (contract) — dynamic: sized to ``T``. It also reads a handful of statistics back
  to the host once (segment count, tokens per segment, tile counts), used to size grids exactly and to choose the
  kernel path. One host synchronisation per batch, none per layer.
* ``LoRAPlan.static(max_tokens, device)`` then ``plan.update(slots)`` — for CUDA graphs: buffers allocated once,
  refilled in place with no host synchronisation; kernels launch a grid sized for the worst case and exit early.
  A graph captured with one adapter mix replays correctly with any other (more adapters, other ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = ["LoRAPlan", "PlanStats", "GATHER_BLOCK_M", "SEGMENT_BLOCK_M", "canonical_device", "check_plan_device",
           "ranks_on"]

#: token block of the fused gather (decode) path and of the segment path; the plan keeps a work list for each.
GATHER_BLOCK_M = 16
SEGMENT_BLOCK_M = 64
_BLOCKS = (GATHER_BLOCK_M, SEGMENT_BLOCK_M)
_SENTINEL = torch.iinfo(torch.int32).max


@dataclass(frozen=True)
class PlanStats:
    """Host-side facts about a dynamic plan, read back once when it is built."""

    num_segments: int  # LoRA segments (the no-LoRA segment excluded)
    lora_tokens: int  # tokens with a slot >= 0
    max_count: int  # longest LoRA segment
    max_slot: int  # largest slot used, -1 if none
    tiles: dict  # block_m -> number of work tiles

    @property
    def mean_count(self) -> float:
        return self.lora_tokens / self.num_segments if self.num_segments else 0.0


def _as_slots(slots) -> torch.Tensor:
    if isinstance(slots, LoRAPlan):
        return slots.slots
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots: expected an integer torch.Tensor or a LoRAPlan, got {type(slots).__name__}")
    if slots.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"slots: expected an integer tensor (int32 or int64), got {slots.dtype}")
    if slots.dim() != 1:
        raise ValueError(f"slots: expected a 1-D tensor [T], got shape {tuple(slots.shape)}")
    return slots


def canonical_device(device) -> torch.device:
    """``device`` with its index: a bare ``"cuda"`` is the current CUDA device (what a tensor created there reports),
    so that ``torch.device("cuda")`` and ``cuda:0`` compare equal when device 0 is current."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def check_plan_device(plan: "LoRAPlan", device, holder: str = "x is") -> None:
    """``ValueError`` unless the plan lives on ``device`` (``cuda`` and ``cuda:<current>`` are the same device)."""
    if canonical_device(plan.device) != canonical_device(device):
        raise ValueError(f"slots: the LoRAPlan lives on {plan.device}, but {holder} on {device}")


def _as_ranks(ranks, device) -> Optional[torch.Tensor]:
    if ranks is None:
        return None
    if not isinstance(ranks, torch.Tensor):
        raise TypeError(f"ranks: expected an integer torch.Tensor [num_slots] or None, got {type(ranks).__name__}")
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise TypeError(f"ranks: expected an integer tensor (int32), got {ranks.dtype}")
    if ranks.dim() != 1:
        raise ValueError(f"ranks: expected a 1-D tensor [num_slots], got shape {tuple(ranks.shape)}")
    if canonical_device(ranks.device) != canonical_device(device):
        raise ValueError(f"ranks: on {ranks.device}, but the slots are on {device}")
    return ranks


def ranks_on(ranks, slots: torch.Tensor) -> Optional[torch.Tensor]:
    """``ranks`` when it can order a plan of ``slots`` (what :meth:`LoRAPlan.from_slots` accepts), else None: for
    callers that hold a pool's ranks and want the order when it applies, never an error."""
    try:
        return _as_ranks(ranks, slots.device)
    except (TypeError, ValueError):
        return None


def order_tiles(tiles: torch.Tensor, ranks: torch.Tensor, *, slot_div: int = 1, times_length: bool = False) -> None:
    """Reorder the rows of a work list ``[n, 3]`` of ``(start, length, key)`` in place (on the device, no host
    synchronisation): the used tiles by descending work, stable, then the unused rows (length 0), so that an exact
    grid still covers the used tiles. Work: the rank of the tile's slot ``key // slot_div``, times its length with
    ``times_length`` (the MoE grouping's tiles of (token, expert) pairs, key = slot·E + e). A slot past ``ranks``
    (which the ops reject) takes the last slot's rank, and ranks are clamped to [0, 2^16] (a replayed graph's
    unchecked ones never overflow the work into an unused row's -1): any order of such tiles is right."""
    n = ranks.shape[0]
    if n == 0:
        return
    slot = tiles[:, 2] // slot_div if slot_div != 1 else tiles[:, 2]
    length = tiles[:, 1]
    work = ranks.index_select(0, slot.clamp(0, n - 1)).to(torch.int32).clamp_(0, 1 << 16)
    if times_length:
        work = work * length
    key = torch.where(length > 0, work, -1)
    tiles.copy_(tiles.index_select(0, torch.sort(key, descending=True, stable=True)[1]))


class LoRAPlan:
    """Tokens grouped by adapter slot for one batch. Build with :meth:`from_slots` or :meth:`static`."""

    def __init__(self, num_tokens: int, device, static: bool):
        T = int(num_tokens)
        dev = torch.device(device)
        i32 = dict(dtype=torch.int32, device=dev)
        self.num_tokens = T
        self.is_static = static
        self.slots = torch.full((T,), -1, **i32)
        # the buffers' own device: "cuda" becomes "cuda:<current>", so comparisons with tensors' devices hold
        self.device = self.slots.device
        self.token_ids = torch.zeros(T, **i32)
        self.seg_starts = torch.full((T + 1,), T, **i32)
        self.seg_slots = torch.full((T,), -1, **i32)
        self.counts = torch.zeros(T, **i32)
        self.num_segments = torch.zeros(1, **i32)
        self._tiles = {bm: torch.zeros(T, 3, **i32) for bm in _BLOCKS}
        self._positions = torch.arange(T, **i32)
        self.stats: Optional[PlanStats] = None
        # a dynamic plan filled by the grouping kernel: its statistics, written by the same launch
        self._kernel_stats: Optional[torch.Tensor] = None
        # What the static form may hold: set by static(); a dynamic plan is exact.
        self.max_slot_bound: Optional[int] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_slots(cls, slots: torch.Tensor, ranks: Optional[torch.Tensor] = None) -> "LoRAPlan":
        """Plan for one batch (contract). ``slots``: integer tensor ``[T]``, ``-1`` = no LoRA. ``ranks`` (optional,
        the ``ranks [num_slots]`` the ops will get, on the same device): order the work tiles by descending rank
        (module docstring); a slot past the end of ``ranks`` (which the ops reject) is ordered by the last slot's rank.

        Raises ``TypeError`` for a non-integer tensor, ``ValueError`` for a wrong shape or a slot below ``-1``.
        """
        slots = _as_slots(slots)
        ranks = _as_ranks(ranks, slots.device)
        if slots.numel() and slots.dtype == torch.int64:
            lo, hi = (int(v) for v in torch.aminmax(slots))  # before the int32 copy, so nothing wraps silently
            if lo < -1:
                raise ValueError(f"slots: values must be >= -1 (-1 = no LoRA), found {lo}")
            if hi > _SENTINEL - 1:
                raise ValueError(f"slots: slot {hi} is beyond the int32 range of slot ids")
        plan = cls(slots.shape[0], slots.device, static=False)
        plan._fill(slots, ranks)
        plan._read_stats()
        return plan

    @classmethod
    def static(cls, max_tokens: int, device="cpu") -> "LoRAPlan":
        """Static plan for CUDA graphs: buffers sized once for ``max_tokens``; refill with :meth:`update`."""
        if int(max_tokens) < 0:
            raise ValueError(f"max_tokens: must be >= 0, got {max_tokens}")
        return cls(max_tokens, device, static=True)

    def update(self, slots: torch.Tensor, ranks: Optional[torch.Tensor] = None) -> "LoRAPlan":
        """Refill a static plan in place from ``slots [T']`` (``T' <= max_tokens``; missing tokens get ``-1``);
        ``ranks`` as in :meth:`from_slots` (read on the device: captured, the order follows the ranks at replay).

        No host synchronisation and no allocation of persistent buffers: safe to call between graph replays (or
        inside a captured region). Slot values are not range-checked here (that would need a host read); the
        ops check them against the page table when not capturing.
        """
        if not self.is_static:
            raise RuntimeError("update: only a static plan (LoRAPlan.static) can be refilled in place")
        slots = _as_slots(slots)
        if slots.shape[0] > self.num_tokens:
            raise ValueError(f"slots: {slots.shape[0]} tokens exceed the static plan's max_tokens={self.num_tokens}")
        if slots.device != self.device:
            raise ValueError(f"slots: on {slots.device}, the plan lives on {self.device}")
        self._fill(slots, _as_ranks(ranks, self.device))
        return self

    def _fill(self, slots: torch.Tensor, ranks: Optional[torch.Tensor] = None) -> None:
        T = self.num_tokens
        n = slots.shape[0]
        self.slots.fill_(-1)
        if slots.dtype == torch.int64:
            # saturate instead of wrapping: an out-of-range id stays out of range, and the ops reject it
            slots = slots.clamp(torch.iinfo(torch.int32).min, _SENTINEL - 1)
        self.slots[:n].copy_(slots)
        if T == 0:
            self.num_segments.zero_()
            return
        from lorakern import grouping

        kernel = grouping.kernel_for(self.device)
        if kernel is not None and grouping.takes(kernel[0], self.slots, None, T, _SENTINEL, 1):
            # the same buffers in one launch (lorakern.grouping), bit for bit what the torch ops below write
            if not self.is_static:
                self._kernel_stats = torch.empty(5 + len(_BLOCKS), dtype=torch.int32, device=self.device)
            grouping.launch(kernel, self.slots, None, E=1, num_slots=_SENTINEL, blocks=_BLOCKS,
                            tiles=[self._tiles[bm] for bm in _BLOCKS], order=self.token_ids,
                            segments=(self.seg_starts, self.seg_slots, self.counts, self.num_segments), ranks=ranks,
                            work_times_length=False, empty_key=-1, stats=self._kernel_stats)
            return
        self._kernel_stats = None
        s = self.slots
        # -1 tokens sort last (key INT32_MAX); a stable sort keeps token order within a slot.
        key = torch.where(s < 0, torch.full_like(s, _SENTINEL), s)
        sorted_key, order = torch.sort(key, stable=True)
        self.token_ids.copy_(order)
        is_start = torch.ones(T, dtype=torch.bool, device=self.device)
        is_start[1:] = sorted_key[1:] != sorted_key[:-1]
        seg_id = torch.cumsum(is_start.to(torch.int32), 0, dtype=torch.int32) - 1
        self.seg_starts.fill_(T)
        self.seg_starts[:T].scatter_reduce_(0, seg_id.long(), self._positions, reduce="amin", include_self=True)
        seg_key = torch.full((T,), _SENTINEL, dtype=torch.int32, device=self.device)
        seg_key.scatter_(0, seg_id.long(), sorted_key)
        self.seg_slots.copy_(torch.where(seg_key == _SENTINEL, torch.full_like(seg_key, -1), seg_key))
        self.counts.copy_(self.seg_starts[1:] - self.seg_starts[:-1])
        self.num_segments.copy_(seg_id[-1:] + 1)
        lora_counts = torch.where(self.seg_slots >= 0, self.counts, torch.zeros_like(self.counts))
        for bm, tiles in self._tiles.items():
            self._fill_tiles(bm, tiles, lora_counts)
            if ranks is not None:
                order_tiles(tiles, ranks)

    def _fill_tiles(self, bm: int, tiles: torch.Tensor, lora_counts: torch.Tensor) -> None:
        ntiles = (lora_counts + (bm - 1)) // bm  # per segment
        incl = torch.cumsum(ntiles, 0, dtype=torch.int32)
        excl = incl - ntiles
        idx = self._positions
        seg = torch.searchsorted(incl, idx, right=True).clamp_(max=self.num_tokens - 1)
        local = idx - excl[seg]
        start = self.seg_starts[seg] + local * bm
        length = torch.clamp(lora_counts[seg] - local * bm, min=0, max=bm)
        valid = idx < incl[-1]
        tiles[:, 0] = torch.where(valid, start, torch.zeros_like(start))
        tiles[:, 1] = torch.where(valid, length, torch.zeros_like(length))
        tiles[:, 2] = torch.where(valid, self.seg_slots[seg], torch.full_like(start, -1))

    def _read_stats(self) -> None:
        """The dynamic form's one host read: segment and tile counts for exact grids and the path heuristic."""
        T = self.num_tokens
        if T == 0:
            self.stats = PlanStats(0, 0, 0, -1, {bm: 0 for bm in _BLOCKS})
            return
        if self._kernel_stats is not None:  # the same numbers, from the launch that filled the plan
            vals = self._kernel_stats.tolist()
        else:
            vals = self._stats_by_torch()
        nseg, ntok, mx, mslot, mn = vals[:5]
        if mn < -1:
            raise ValueError(f"slots: values must be >= -1 (-1 = no LoRA), found {mn}")
        self.stats = PlanStats(nseg, ntok, mx, mslot, dict(zip(self._tiles.keys(), vals[5:])))

    def _stats_by_torch(self) -> list:
        lora = self.seg_slots >= 0
        counts = torch.where(lora, self.counts, torch.zeros_like(self.counts))
        return torch.stack(
            [
                lora.sum(dtype=torch.int32),
                counts.sum(dtype=torch.int32),
                counts.max(),
                self.seg_slots.max(),
                self.slots.min(),
            ]
            + [(t[:, 1] > 0).sum(dtype=torch.int32) for t in self._tiles.values()]
        ).tolist()

    # ------------------------------------------------------------------ use
    def tiles(self, block_m: int) -> torch.Tensor:
        """Work list ``[T, 3]`` of ``(start, length, slot)`` for a block of ``block_m`` tokens."""
        return self._tiles[block_m]

    def grid_tiles(self, block_m: int, num_slots: int) -> int:
        """How many programs a kernel over ``tiles(block_m)`` launches: exact for a dynamic plan, the worst case
        (every slot present) for a static one."""
        if self.stats is not None:
            return self.stats.tiles[block_m]
        T = self.num_tokens
        return min(T, -(-T // block_m) + max(int(num_slots), 0))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        kind = "static" if self.is_static else "dynamic"
        extra = ""
        if self.stats is not None:
            st = self.stats
            extra = f", lora_tokens={st.lora_tokens}, adapters={st.num_segments}, max_per_adapter={st.max_count}"
        return f"LoRAPlan({kind}, tokens={self.num_tokens}{extra}, device={self.device})"


SlotsLike = Union[torch.Tensor, LoRAPlan]


def as_plan(slots: SlotsLike) -> LoRAPlan:
    """A plan from ``slots`` (returned unchanged when it already is one)."""
    if isinstance(slots, LoRAPlan):
        return slots
    return LoRAPlan.from_slots(slots)
