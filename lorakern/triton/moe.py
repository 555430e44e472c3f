"""Triton kernel for the packed MoE-expert LoRA op ``add_lora_moe`` (DESIGN.md §2–§3, §5).

Motivation. In a MoE layer every token runs ``topk`` experts, and with heterogeneous LoRA every ``(token, expert)``
pair needs the rank rows of *its* adapter for *its* expert. Done naively (vLLM pads to ``max_rank`` and aligns
tokens per LoRA with a dedicated kernel; PEFT loops over adapters and experts), that is either wasted rank compute or
thousands of launches. Here it is one launch for all tokens, top-k experts, adapters and slices.

Bytes. The fewest bytes the op must move are, for every distinct ``(adapter s, expert e)`` group present in the
batch, its rank rows once (``r_s · (K + N_total)`` elements), plus ``x`` of the pairs, and the touched ``out``
columns read and written once. At Qwen3-30B-A3B decode (64 tokens × 8 experts, each token its own rank-16 adapter)
that is ~512 groups × 16 × (2048 + 1536) × 2 B ≈ 59 MB for gate_up: memory-bound, like every LoRA op.

Grouping on the device: :func:`lorakern.moe_grouping.group_pairs` (shared with the CUDA backend) sorts the
(token, expert) pairs by (adapter, expert) into a work list of tiles of at most ``BLOCK_M`` pairs of one group,
in buffers sized by the shapes only (no host synchronisation; CUDA-graph safe). The tile count stays on the device.

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

import torch
import triton
import triton.language as tl

from lorakern.backends import triton_interpret
from lorakern.moe_grouping import group_pairs, max_tiles, moe_tables, pair_operands
from lorakern.triton.lora import BLOCK_R, BOUNDS_ONLY, _flags, _mma, _mma_f32_lhs, _rank_of, _rank_rows, _slot_scale

__all__ = ["add_lora_moe", "group_pairs", "cfg", "max_tiles"]

# ----------------------------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=BOUNDS_ONLY)
def _moe_kernel(x_ptr, sx_t, sx_p, sx_k, a_table, sa_table, sae_table, b_table, sb_table, sbe_table, n_table,
                off_table, pt_ptr, s_pt, ranks_ptr, max_rank, num_slots, num_rows, scales_ptr, topk_w_ptr, sw_t, sw_k,
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
        rank = _rank_of(ranks_ptr, slot, max_rank, num_slots)
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
                rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
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
                    rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
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


def _programs(n_tiles: int, device) -> int:
    """Grid size (fixed by shapes and the device, never by the data): a few waves of the SMs on the GPU."""
    if n_tiles == 0:
        return 0
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 64  # the interpreter runs programs one after another: the count only changes the loop split
    return min(n_tiles, cap)


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
    pair_ids, tiles, num_tiles, n_max = group_pairs(slots, topk_ids, E, num_slots, c["BLOCK_M"], ranks)
    grid_n = _programs(n_max, x.device)
    if grid_n == 0 or max_rank == 0:
        return
    S = len(lora_a)
    tab = moe_tables(lora_a, lora_b, slice_offsets)
    # float32 rank-r intermediate per pair; only rows of LoRA pairs below each slot's rank are written and read
    y = torch.empty((S, P, max_rank), dtype=torch.float32, device=x.device)
    sx_t, sx_p, sx_k, w = pair_operands(x, topk_weights)
    upcast, ieee = _flags(x.dtype)
    _moe_kernel[(grid_n, S)](
        x, sx_t, sx_p, sx_k, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7],
        page_table, page_table.stride(0), ranks, max_rank, num_slots, lora_a[0].shape[0],
        scales if scales is not None else ranks,
        w if w is not None else y, w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        tiles, pair_ids, num_tiles, y, y.stride(0), y.stride(1), y.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2), x.shape[-1], E, topk,
        HAS_SCALE=scales is not None, HAS_WEIGHTS=w is not None, BLOCK_M=c["BLOCK_M"], BLOCK_R=c["BLOCK_R"],
        BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"], UPCAST=upcast, IEEE=ieee, num_warps=c["num_warps"])
