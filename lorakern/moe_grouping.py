"""(token, expert) pair grouping and per-slice tables of the packed MoE LoRA op, shared by the Triton and CUDA
backends (pure torch, on the device, no host synchronisation).

Pair ``p = t·topk + k`` gets the key ``slot·E + e`` (a sentinel when ``slots[t] = -1``, or when ``e`` is out of
range, which the op rejects before launching unless a CUDA graph is being captured — then those pairs are
skipped, never read out of bounds). One stable ``torch.sort`` of the keys, then segment starts, counts and a work
list of tiles ``(start, length, key)`` — blocks of at most ``block_m`` sorted pairs of one group — are computed
with torch ops into buffers whose sizes depend only on ``T``, ``topk``, ``E`` and the number of slots, never on the
data, so a CUDA graph captured with one routing and adapter mix replays correctly with any other. Tiles past the
device-side count have length 0 (kernels exit on them). Given the slots' ranks, the used tiles are ordered by
descending work, rank × pairs (stable), so that a kernel's longest CTAs start first (as ``LoRAPlan`` does for the
dense ops by rank).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from lorakern import grouping
from lorakern._tables import cached_table
from lorakern.plan import _SENTINEL, order_tiles
from lorakern.ops.moe import version_of

__all__ = ["group_pairs", "max_tiles", "moe_tables", "pair_operands"]


def max_tiles(num_pairs: int, num_groups_bound: int, block_m: int) -> int:
    """Upper bound on the tile count: ``sum_g ceil(c_g / BM) <= P / BM + groups`` and ``<= P``."""
    return min(num_pairs, -(-num_pairs // block_m) + min(num_groups_bound, num_pairs))


_GROUP_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def group_pairs(slots: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, num_slots: int, block_m: int,
                ranks=None, *, constant_ids: bool = False):
    """(pair ids sorted by (slot, expert) int32 [P], tiles int32 [max_tiles, 3] of (start, length, slot·E + e),
    tile count int32 [1]) — torch ops on the device, sizes fixed by the shapes, no host synchronisation. With
    ``ranks`` (int [num_slots], the op's), the used tiles come first in descending order of rank × length.

    Outside CUDA-graph capture the result is kept for ONE more call with the same (``slots``, ``topk_ids``) objects
    at the same versions, so the down projection of a layer reuses the grouping of its gate_up projection; that
    call consumes it. Not longer: a CUDA-graph replay rewrites tensors in place without bumping their version
    counters, so a routing buffer that a captured router refills on every replay (a piecewise graph whose pieces
    end before this op) would otherwise hit the previous batch's grouping and apply the wrong experts' adapters.
    Only a replay between a layer's two calls could still do that, and no graph ends there. ``constant_ids``: the
    caller's ``topk_ids`` is a tensor nothing ever rewrites (the MLA ops' head ids), so the grouping is kept for
    every later call with the same objects and versions (every layer of a batch), as a plan is. Not per ``ranks``
    object: the ops pass a fresh contiguous copy of a strided ``ranks`` on every call, and the tile order is only
    a schedule (any order gives the same result), so the grouping made with the first call's ranks serves the
    second.

    Made by one launch of the grouping kernel wherever it can run (:mod:`lorakern.grouping`: the CUDA extension
    loaded for the tensors' GPU, up to 4096 pairs), for either backend, the same outputs bit for bit; else by ~90
    torch ops."""
    dev = topk_ids.device
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (id(slots), id(topk_ids), ranks is not None, num_experts, num_slots, block_m)
    vers = (version_of(slots), version_of(topk_ids))
    cacheable = not capturing and None not in vers  # inference tensors have no version counter
    if cacheable:
        hit = _GROUP_CACHE.get(key) if constant_ids else _GROUP_CACHE.pop(key, None)  # (docstring)
        if hit is not None:
            sref, iref, hv, val = hit
            if sref() is slots and iref() is topk_ids and hv == vers:
                if constant_ids:
                    _GROUP_CACHE.move_to_end(key)
                return val
    T, topk = topk_ids.shape
    P = T * topk
    E = num_experts
    i32 = dict(dtype=torch.int32, device=dev)
    n_max = max_tiles(P, num_slots * E, block_m)
    if P == 0:
        return torch.zeros(0, **i32), torch.zeros(1, 3, **i32), torch.zeros(1, **i32), 0
    kernel = grouping.kernel_for(dev)
    if kernel is not None and grouping.takes(kernel[0], slots, topk_ids, P, num_slots, E):
        val = _group_kernel(kernel, slots, topk_ids, E, num_slots, block_m, ranks, n_max)
    else:
        val = _group_torch(slots, topk_ids, E, num_slots, block_m, ranks, n_max)
    if cacheable:
        _GROUP_CACHE[key] = (weakref.ref(slots), weakref.ref(topk_ids), vers, val)
        if len(_GROUP_CACHE) > 8:
            _GROUP_CACHE.popitem(last=False)
    return val


def _group_kernel(kernel, slots, topk_ids, E, num_slots, block_m, ranks, n_max):
    """The grouping in one launch of the grouping kernel: the outputs of :func:`_group_torch`."""
    T, topk = topk_ids.shape
    i32 = dict(dtype=torch.int32, device=topk_ids.device)
    pair_ids = torch.empty(T * topk, **i32)
    tiles = torch.empty(max(n_max, 1), 3, **i32)  # (every row is written)
    count = torch.empty(1, **i32)
    grouping.launch(kernel, slots, topk_ids, E=E, num_slots=num_slots, blocks=[block_m], tiles=[tiles],
                    order=pair_ids, counts=[count], ranks=ranks, work_times_length=True, empty_key=0)
    return pair_ids, tiles, count, n_max


def _group_torch(slots, topk_ids, E, num_slots, block_m, ranks, n_max):
    T, topk = topk_ids.shape
    P = T * topk
    dev = topk_ids.device
    i32 = dict(dtype=torch.int32, device=dev)
    tiles = torch.zeros(max(n_max, 1), 3, **i32)
    s = slots.to(torch.int32)[:, None].expand(T, topk).reshape(-1)
    e = topk_ids.to(torch.int32).reshape(-1)
    # (slot < num_slots too: a replayed graph's slots are unchecked, and more groups than num_slots * E would
    # overflow the tile list sized for them)
    live = (s >= 0) & (s < num_slots) & (e >= 0) & (e < E)
    k = torch.where(live, s * E + e, torch.full_like(s, _SENTINEL))
    sorted_key, order = torch.sort(k, stable=True)
    pair_ids = order.to(torch.int32)
    pos = torch.arange(P, **i32)
    is_start = torch.ones(P, dtype=torch.bool, device=dev)
    is_start[1:] = sorted_key[1:] != sorted_key[:-1]
    seg = torch.cumsum(is_start.to(torch.int32), 0, dtype=torch.int32) - 1  # segment of each sorted pair
    seg_start = torch.full((P + 1,), P, **i32)
    seg_start[:P].scatter_reduce_(0, seg.long(), pos, reduce="amin", include_self=True)
    seg_key = torch.full((P,), _SENTINEL, **i32).scatter_(0, seg.long(), sorted_key)
    counts = seg_start[1:] - seg_start[:-1]
    ntiles = torch.where(seg_key != _SENTINEL, (counts + (block_m - 1)) // block_m, torch.zeros_like(counts))
    incl = torch.cumsum(ntiles, 0, dtype=torch.int32)
    excl = incl - ntiles
    idx = torch.arange(tiles.shape[0], **i32)
    sg = torch.searchsorted(incl, idx, right=True).clamp_(max=P - 1)
    local = idx - excl[sg]
    valid = idx < incl[-1]
    zero = torch.zeros_like(idx)
    tiles[:, 0] = torch.where(valid, seg_start[sg] + local * block_m, zero)
    tiles[:, 1] = torch.where(valid, torch.clamp(counts[sg] - local * block_m, min=0, max=block_m), zero)
    tiles[:, 2] = torch.where(valid, seg_key[sg], zero)
    if ranks is not None:  # work of a tile ~ rank x pairs (keys of used tiles are slot·E + e)
        order_tiles(tiles, ranks, slot_div=E, times_length=True)
    return pair_ids, tiles, incl[-1:].clone(), n_max


def moe_tables(lora_a, lora_b, offsets):
    """int64 device table [8, S]: A pointers, A row strides, A expert strides, B pointers, B row strides, B expert
    strides, widths N_i, output offsets. Cached by content (lorakern._tables.cached_table: no host-to-device copy
    after the first call; a CUDA graph's table stays alive)."""
    dev = lora_a[0].device
    cols = [[t.data_ptr() for t in lora_a], [t.stride(0) for t in lora_a], [t.stride(1) for t in lora_a],
            [t.data_ptr() for t in lora_b], [t.stride(0) for t in lora_b], [t.stride(1) for t in lora_b],
            [t.shape[2] for t in lora_b], list(offsets)]
    key = ("moe", dev, tuple(tuple(c) for c in cols))
    return cached_table(key, dev, lambda: torch.tensor(cols, dtype=torch.int64, device=dev))


def pair_operands(x: torch.Tensor, topk_weights):
    """``(sx_t, sx_p, sx_k, w)``: the strides that address the x row of pair ``(t, k)`` (``sx_p = 0`` when ``x``
    is ``[T, K]``, shared by the token's experts) and the routed weights as float32 (or None)."""
    if x.dim() == 3:
        sx_t, sx_p, sx_k = x.stride()
    else:
        (sx_t, sx_k), sx_p = x.stride(), 0
    w = None
    if topk_weights is not None:
        w = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    return sx_t, sx_p, sx_k, w
