"""Triton kernel for the packed MoE-expert LoRA op ``add_lora_moe`` (DESIGN.md §2–§3, §5).

Motivation. In a MoE layer every token runs ``topk`` experts, and with heterogeneous LoRA every ``(token, expert)``
pair needs the rank rows of *its* adapter for *its* expert. Done naively (vLLM pads to ``max_rank`` and aligns
tokens per LoRA with a dedicated kernel; PEFT loops over adapters and experts), that is either wasted rank compute or
thousands of launches. Here it is one launch for all tokens, top-k experts, adapters and slices.

Bytes. The fewest bytes the op must move are, for every distinct ``(adapter s, expert e)`` group present in the
batch, its rank rows once (``r_s · (K + N_total)`` elements), plus ``x`` of the pairs, and the touched ``out``
columns read and written once. At Qwen3-30B-A3B decode (64 tokens × 8 experts, each token its own rank-16 adapter)
that is ~512 groups × 16 × (2048 + 1536) × 2 B ≈ 59 MB for gate_up: memory-bound, like every LoRA op.

Grouping on the device (:func:`group_pairs`). Pair ``p = t·topk + k`` gets the key ``slot·E + e`` (a sentinel when
``slots[t] = -1``, or when ``e`` is out of range, which the op rejects before launching unless a CUDA graph is being
captured — then those pairs are skipped, never read out of bounds). One stable ``torch.sort`` of the keys, then
segment starts, counts and a work list of tiles ``(start, length, key)`` — blocks of at most ``BLOCK_M`` sorted
pairs of one group — are computed with torch ops into buffers whose sizes depend only on ``T``, ``topk``, ``E`` and
the number of slots, never on the data: no host synchronisation, and a CUDA graph captured with one routing and
adapter mix replays correctly with any other. The tile count stays on the device.

Kernel. A fixed grid ``(programs, slices)``; program ``pid`` walks tiles ``pid, pid + programs, ...`` up to the
device-side tile count (early exit when there is nothing left). For one tile (pairs of one adapter ``s`` and expert
``e``) and one slice it shrinks ``x`` of the pairs through rows ``page_table[s, :rank]`` of ``lora_a[:, e]`` (K → r,
float32, rank tiled in ``BLOCK_R`` = 16 and stopped at the slot's real rank; entries at or beyond it are never
loaded), keeps the rank-r intermediate in a per-call scratch row of each pair that only this program writes and
reads back (so it stays in L1/L2), then expands through ``lora_b[:, e]`` over all of ``N_i`` and adds
``scale · w[t, k] · delta`` into ``out[t, k, off_i:]``, rounded once. Each ``(adapter, expert)`` group's rows are
read once per ``BLOCK_M`` pairs; pairs are disjoint across tiles and slices write disjoint columns, so there are no
atomics and no races.

Numerics are those of :mod:`lorakern.triton.lora` (its device helpers are reused): float32 accumulation, the
float32 intermediate never rounded to the weight dtype (hi + lo split on the GPU), IEEE dots for float32,
everything upcast under the interpreter (which would do bf16 arithmetic on raw bits).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from lorakern.backends import triton_interpret
from lorakern.ops.moe import version_of
from lorakern.triton.lora import BLOCK_R, _flags, _mma, _mma_f32_lhs, _rank_rows, _slot_scale

__all__ = ["add_lora_moe", "group_pairs", "cfg", "max_tiles"]

_SENTINEL = torch.iinfo(torch.int32).max


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _moe_kernel(x_ptr, sx_t, sx_p, sx_k, a_table, sa_table, sae_table, b_table, sb_table, sbe_table, n_table,
                off_table, pt_ptr, s_pt, ranks_ptr, scales_ptr, topk_w_ptr, sw_t, sw_k,
                tiles_ptr, pair_ids_ptr, num_tiles_ptr, y_ptr, sy_s, sy_p, sy_r, out_ptr, so_t, so_p, so_n,
                K, E, TOPK,
                HAS_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """grid (programs, slices): for each tile of one (adapter, expert) group, shrink then expand one slice."""
    pid, sl = tl.program_id(0), tl.program_id(1)
    nprog = tl.num_programs(0)
    num_tiles = tl.load(num_tiles_ptr)
    a_ptr = tl.load(a_table + sl).to(tl.pointer_type(x_ptr.dtype.element_ty))
    sa_r = tl.load(sa_table + sl)
    sa_e = tl.load(sae_table + sl)
    b_ptr = tl.load(b_table + sl).to(tl.pointer_type(out_ptr.dtype.element_ty))
    sb_r = tl.load(sb_table + sl)
    sb_e = tl.load(sbe_table + sl)
    n_i = tl.load(n_table + sl)
    off = tl.load(off_table + sl)
    ys = y_ptr + sl * sy_s
    m = tl.arange(0, BLOCK_M)
    for tile in range(pid, num_tiles, nprog):
        start = tl.load(tiles_ptr + tile * 3)
        length = tl.load(tiles_ptr + tile * 3 + 1)
        key = tl.load(tiles_ptr + tile * 3 + 2)
        slot = key // E
        expert = (key % E).to(tl.int64)
        rank = tl.load(ranks_ptr + slot)
        if rank > 0:
            pmask = m < length
            pair = tl.load(pair_ids_ptr + start + m, mask=pmask, other=0).to(tl.int64)
            t = pair // TOPK
            k = pair % TOPK
            xrow = x_ptr + t * sx_t + k * sx_p  # sx_p = 0 when x [T, K] is shared by the token's experts
            pt_row = pt_ptr + slot.to(tl.int64) * s_pt
            ae = a_ptr + expert * sa_e
            be = b_ptr + expert * sb_e
            # shrink, rank tile by rank tile up to the real rank, into the pairs' rows of the scratch
            for r0 in range(0, rank, BLOCK_R):
                rr, rmask, rows = _rank_rows(pt_row, r0, rank, BLOCK_R)
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    kmask = kk < K
                    xt = tl.load(xrow[:, None] + kk[None, :] * sx_k, mask=pmask[:, None] & kmask[None, :], other=0.0)
                    at = tl.load(ae + rows[None, :] * sa_r + kk[:, None], mask=rmask[None, :] & kmask[:, None],
                                 other=0.0)
                    acc = _mma(xt, at, acc, UPCAST, IEEE)
                tl.store(ys + pair[:, None] * sy_p + rr[None, :] * sy_r, acc, mask=pmask[:, None] & rmask[None, :])
            tl.debug_barrier()  # the scratch rows written above are read back by other threads of this program
            w = _slot_scale(scales_ptr, slot, HAS_SCALE) + tl.zeros((BLOCK_M,), dtype=tl.float32)
            if HAS_WEIGHTS:
                w = w * tl.load(topk_w_ptr + t * sw_t + k * sw_k, mask=pmask, other=0.0)
            orow = out_ptr + t * so_t + k * so_p + off * so_n
            for n0 in range(0, n_i, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                nmask = nn < n_i
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for r0 in range(0, rank, BLOCK_R):
                    rr, rmask, rows = _rank_rows(pt_row, r0, rank, BLOCK_R)
                    yt = tl.load(ys + pair[:, None] * sy_p + rr[None, :] * sy_r,
                                 mask=pmask[:, None] & rmask[None, :], other=0.0)
                    bt = tl.load(be + rows[:, None] * sb_r + nn[None, :], mask=rmask[:, None] & nmask[None, :],
                                 other=0.0)
                    acc = _mma_f32_lhs(yt, bt, acc, UPCAST, IEEE)
                ptrs = orow[:, None] + nn[None, :] * so_n
                om = pmask[:, None] & nmask[None, :]
                cur = tl.load(ptrs, mask=om, other=0.0)
                tl.store(ptrs, (cur.to(tl.float32) + acc * w[:, None]).to(out_ptr.dtype.element_ty), mask=om)
            # no barrier before the next tile: its pairs (scratch rows, out rows) are disjoint from this one's


# ----------------------------------------------------------------------------------------------- host side
def cfg(interpret=None) -> dict:
    """Block sizes. On the GPU fixed (the AOT matrix covers every launch): 16 pairs per tile (decode groups are
    mostly one pair: a larger tile would only add masked rows), K in tiles of 128, N in tiles of 128, 4 warps.
    Under the interpreter, whose cost is per program and per loop step, K and N in tiles of 256."""
    interp = triton_interpret() if interpret is None else interpret
    big = 256 if interp else 128
    return dict(BLOCK_M=16, BLOCK_R=BLOCK_R, BLOCK_K=big, BLOCK_N=big, num_warps=4)


def max_tiles(num_pairs: int, num_groups_bound: int, block_m: int) -> int:
    """Upper bound on the tile count: ``sum_g ceil(c_g / BM) <= P / BM + groups`` and ``<= P``."""
    return min(num_pairs, -(-num_pairs // block_m) + min(num_groups_bound, num_pairs))


def _programs(n_tiles: int, device) -> int:
    """Grid size (fixed by shapes and the device, never by the data): a few waves of the SMs on the GPU."""
    if n_tiles == 0:
        return 0
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 64  # the interpreter runs programs one after another: the count only changes the loop split
    return min(n_tiles, cap)


_GROUP_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def group_pairs(slots: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, num_slots: int, block_m: int):
    """(pair ids sorted by (slot, expert) int32 [P], tiles int32 [max_tiles, 3] of (start, length, slot·E + e),
    tile count int32 [1]) — torch ops on the device, sizes fixed by the shapes, no host synchronisation.

    Outside CUDA-graph capture the result is cached per (``slots``, ``topk_ids``) object and version, so the down
    projection of a layer reuses the grouping of its gate_up projection."""
    dev = topk_ids.device
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (id(slots), id(topk_ids), num_experts, num_slots, block_m)
    vers = (version_of(slots), version_of(topk_ids))
    cacheable = not capturing and None not in vers  # inference tensors have no version counter
    if cacheable:
        hit = _GROUP_CACHE.get(key)
        if hit is not None:
            sref, iref, hv, val = hit
            if sref() is slots and iref() is topk_ids and hv == vers:
                _GROUP_CACHE.move_to_end(key)
                return val
    T, topk = topk_ids.shape
    P = T * topk
    E = num_experts
    i32 = dict(dtype=torch.int32, device=dev)
    n_max = max_tiles(P, num_slots * E, block_m)
    if P == 0:
        return torch.zeros(0, **i32), torch.zeros(1, 3, **i32), torch.zeros(1, **i32), 0
    tiles = torch.zeros(max(n_max, 1), 3, **i32)
    s = slots.to(torch.int32)[:, None].expand(T, topk).reshape(-1)
    e = topk_ids.to(torch.int32).reshape(-1)
    live = (s >= 0) & (e >= 0) & (e < E)
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
    val = (pair_ids, tiles, incl[-1:].clone(), n_max)
    if cacheable:
        _GROUP_CACHE[key] = (weakref.ref(slots), weakref.ref(topk_ids), vers, val)
        if len(_GROUP_CACHE) > 8:
            _GROUP_CACHE.popitem(last=False)
    return val


_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _tables(lora_a, lora_b, offsets):
    """int64 device table [8, S]: A pointers, A row strides, A expert strides, B pointers, B row strides, B expert
    strides, widths N_i, output offsets. Cached by content: no host-to-device copy after the first call (CUDA
    graphs capture the cached table)."""
    dev = lora_a[0].device
    cols = [[t.data_ptr() for t in lora_a], [t.stride(0) for t in lora_a], [t.stride(1) for t in lora_a],
            [t.data_ptr() for t in lora_b], [t.stride(0) for t in lora_b], [t.stride(1) for t in lora_b],
            [t.shape[2] for t in lora_b], list(offsets)]
    key = (dev, tuple(tuple(c) for c in cols))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    tab = torch.tensor(cols, dtype=torch.int64, device=dev)
    _TABLES[key] = tab
    if len(_TABLES) > 512:
        _TABLES.popitem(last=False)
    return tab


def add_lora_moe(out, x, topk_ids, lora_a, lora_b, page_table, ranks, scales, slots, topk_weights, slice_offsets):
    """out [T, topk, N_total] += scale · w · (x @ A_e.T) @ B_e.T for every (token, expert) pair with a slot — one
    launch. Arguments validated by :func:`lorakern.ops.add_lora_moe`."""
    T, topk = topk_ids.shape
    P = T * topk
    if P == 0:
        return
    E = lora_a[0].shape[1]
    num_slots, max_rank = page_table.shape
    c = cfg()
    pair_ids, tiles, num_tiles, n_max = group_pairs(slots, topk_ids, E, num_slots, c["BLOCK_M"])
    grid_n = _programs(n_max, x.device)
    if grid_n == 0 or max_rank == 0:
        return
    S = len(lora_a)
    tab = _tables(lora_a, lora_b, slice_offsets)
    # float32 rank-r intermediate per pair; only rows of LoRA pairs below each slot's rank are written and read
    y = torch.empty((S, P, max_rank), dtype=torch.float32, device=x.device)
    if x.dim() == 3:
        sx_t, sx_p, sx_k = x.stride()
    else:
        (sx_t, sx_k), sx_p = x.stride(), 0
    w = None
    if topk_weights is not None:
        w = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    upcast, ieee = _flags(x.dtype)
    _moe_kernel[(grid_n, S)](
        x, sx_t, sx_p, sx_k, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7],
        page_table, page_table.stride(0), ranks, scales if scales is not None else ranks,
        w if w is not None else y, w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        tiles, pair_ids, num_tiles, y, y.stride(0), y.stride(1), y.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2), x.shape[-1], E, topk,
        HAS_SCALE=scales is not None, HAS_WEIGHTS=w is not None, BLOCK_M=c["BLOCK_M"], BLOCK_R=c["BLOCK_R"],
        BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"], UPCAST=upcast, IEEE=ieee, num_warps=c["num_warps"])
