"""Triton kernels for the MLA ops: a kv_b_proj LoRA on DeepSeek's absorbed decode path (DESIGN.md §3).

Motivation. At decode the engine absorbs ``kv_b_proj`` into the query (``q_latent = q_nope @ W_UK^h``) and the
output (``out = o_latent @ W_UV^h.T``), so its LoRA ``scale · B @ A`` must be absorbed too (see
:mod:`lorakern.reference_mla` for the math and the layout). Forming ``B_K^h @ A`` per head and adapter would cost
``H·Dn·C`` per adapter; applied through the rank instead, each side is a shrink and an expand of rank ``r``:

* q side, ``_mla_q_kernel``: per head, shrink ``q_nope[t, h] [Dn]`` by ``B_K^h [Dn, r]`` (its own rows of the
  adapter's B), then expand by the **shared** ``A [r, C]`` into ``q_latent[t, h]``.
* o side, ``_mla_o_kernel``: shrink ``o_latent[t, h] [C]`` by the shared ``A`` (``C -> r``), then expand per head
  by ``B_V^h [Dv, r]`` into ``out[t, h]``.

Bytes. Each side must read the adapter's half of B once (``r·H·Dn`` or ``r·H·Dv`` elements: at DeepSeek-V3
shapes, 512 KiB per rank-16 adapter in bf16, 32× its A), its A once (``r·C``), and ``q_nope``/``q_latent`` (resp.
``o_latent``/``out``) of its LoRA tokens; the op is memory-bound like every LoRA op.

Work. One launch per side, a fixed grid ``(tiles, ceil(H / BLOCK_H))`` over the plan's decode work list
(``LoRAPlan.tiles(GATHER_BLOCK_M)``: blocks of at most 16 tokens of one adapter; a row of length 0 exits at once),
so a CUDA graph captured with one adapter mix replays with any other. A program takes one token block and
``BLOCK_H`` heads:

* the per-head half (q shrink, o expand) loops over its heads, each a ``[BLOCK_M, Dn] @ [Dn, r]`` (resp.
  ``[BLOCK_M, r] @ [r, Dv]``) tile product;
* the shared-A half (q expand, o shrink) treats the ``BLOCK_M × BLOCK_H`` (token, head) pairs as the rows of a
  single product with ``A``, so each tile of A is loaded once per program, not once per head.

The float32 rank-r intermediate goes through a per-call scratch ``y [T, H, max_rank]`` written and read back by the
same program (between the two halves, behind a barrier), so it stays in L1/L2 and never leaves as a second launch,
exactly like the fused dense kernel of :mod:`lorakern.triton.lora`. Rank is tiled in ``BLOCK_R`` (16) and every
loop stops at the slot's real rank; page-table entries at or beyond it are never loaded.

Numerics are those of :mod:`lorakern.triton.lora` (its device helpers are reused): float32 accumulation, the float32
intermediate never rounded to the input dtype (hi + lo split on the GPU), IEEE dots for float32, everything upcast
under the interpreter (which would do bf16 arithmetic on raw bits). ``q_latent``/``out`` are read, updated in
float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakern.backends import triton_interpret
from lorakern.plan import GATHER_BLOCK_M
from lorakern.triton.lora import BLOCK_R, BOUNDS_ONLY, _flags, _mma, _mma_f32_lhs, _rank_of, _rank_rows, _slot_scale

__all__ = ["mla_absorbed_q", "mla_absorbed_o", "cfg"]


# ----------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _pair_tile(tiles_ptr, token_ids_ptr, pid, h0, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Work tile ``pid`` as ``BLOCK_M·BLOCK_H`` (token, head) pairs, token-fastest.

    Returns (token ids of the pairs, heads of the pairs, pair mask, token ids of the block [BLOCK_M],
    token mask [BLOCK_M], slot, length)."""
    start = tl.load(tiles_ptr + pid * 3)
    length = tl.load(tiles_ptr + pid * 3 + 1)
    slot = tl.load(tiles_ptr + pid * 3 + 2)
    m = tl.arange(0, BLOCK_M)
    tmask = m < length
    tok = tl.load(token_ids_ptr + start + m, mask=tmask, other=0).to(tl.int64)
    p = tl.arange(0, BLOCK_M * BLOCK_H)
    pm = p % BLOCK_M
    ph = h0 + p // BLOCK_M
    pmask = (pm < length) & (ph < H)
    ptok = tl.load(token_ids_ptr + start + pm, mask=pmask, other=0).to(tl.int64)
    return ptok, ph, pmask, tok, tmask, slot, length


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=BOUNDS_ONLY)
def _mla_q_kernel(qn_ptr, sqn_t, sqn_h, sqn_d, ql_ptr, sql_t, sql_h, sql_c, a_ptr, sa_r, b_ptr, sb_r,
                  pt_ptr, s_pt, ranks_ptr, max_rank, num_slots, num_rows, scales_ptr, tiles_ptr, token_ids_ptr,
                  y_ptr, sy_t, sy_h, sy_r,
                  H, C, DN, DHEAD,
                  HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """grid (tiles, head blocks): q_latent[t, h] += scale * (q_nope[t, h] @ B_K^h) @ A for one token block of one
    adapter and BLOCK_H heads. ``DHEAD`` = Dn + Dv (the per-head width of lora_b)."""
    pid, hb = tl.program_id(0), tl.program_id(1)
    h0 = hb * BLOCK_H
    ptok, ph, pmask, tok, tmask, slot, length = _pair_tile(tiles_ptr, token_ids_ptr, pid, h0, H, BLOCK_M, BLOCK_H)
    if length == 0:
        return
    rank = _rank_of(ranks_ptr, slot, max_rank, num_slots)
    if rank == 0:
        return
    pt_row = pt_ptr + slot.to(tl.int64) * s_pt
    # 1. shrink per head (Dn -> r) by B_K^h, into this program's rows of the scratch
    for hl in range(0, BLOCK_H):
        h = h0 + hl
        if h < H:
            for r0 in range(0, rank, BLOCK_R):
                rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for d0 in range(0, DN, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    dmask = dd < DN
                    q = tl.load(qn_ptr + tok[:, None] * sqn_t + h * sqn_h + dd[None, :] * sqn_d,
                                mask=tmask[:, None] & dmask[None, :], other=0.0)
                    bk = tl.load(b_ptr + rows[None, :] * sb_r + (h * DHEAD + dd[:, None]),
                                 mask=rmask[None, :] & dmask[:, None], other=0.0)
                    acc = _mma(q, bk, acc, UPCAST, IEEE)
                tl.store(y_ptr + tok[:, None] * sy_t + h * sy_h + rr[None, :] * sy_r, acc,
                         mask=tmask[:, None] & rmask[None, :])
    tl.debug_barrier()  # the scratch rows written above are read back by other threads of this program
    # 2. expand (r -> C) by the shared A, all (token, head) pairs of the program as the rows of one product
    scale = _slot_scale(scales_ptr, slot, HAS_SCALE)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        acc = tl.zeros((BLOCK_M * BLOCK_H, BLOCK_C), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
            yt = tl.load(y_ptr + ptok[:, None] * sy_t + ph[:, None] * sy_h + rr[None, :] * sy_r,
                         mask=pmask[:, None] & rmask[None, :], other=0.0)
            at = tl.load(a_ptr + rows[:, None] * sa_r + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc = _mma_f32_lhs(yt, at, acc, UPCAST, IEEE)
        ptrs = ql_ptr + ptok[:, None] * sql_t + ph[:, None] * sql_h + cc[None, :] * sql_c
        m = pmask[:, None] & cmask[None, :]
        cur = tl.load(ptrs, mask=m, other=0.0)
        tl.store(ptrs, (cur.to(tl.float32) + acc * scale).to(ql_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=BOUNDS_ONLY)
def _mla_o_kernel(ol_ptr, sol_t, sol_h, sol_c, out_ptr, so_t, so_h, so_d, a_ptr, sa_r, b_ptr, sb_r,
                  pt_ptr, s_pt, ranks_ptr, max_rank, num_slots, num_rows, scales_ptr, tiles_ptr, token_ids_ptr,
                  y_ptr, sy_t, sy_h, sy_r,
                  H, C, DN, DV, DHEAD,
                  HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """grid (tiles, head blocks): out[t, h] += scale * (o_latent[t, h] @ A.T) @ B_V^h.T for one token block of one
    adapter and BLOCK_H heads. B_V^h starts at column ``h * DHEAD + DN`` of lora_b."""
    pid, hb = tl.program_id(0), tl.program_id(1)
    h0 = hb * BLOCK_H
    ptok, ph, pmask, tok, tmask, slot, length = _pair_tile(tiles_ptr, token_ids_ptr, pid, h0, H, BLOCK_M, BLOCK_H)
    if length == 0:
        return
    rank = _rank_of(ranks_ptr, slot, max_rank, num_slots)
    if rank == 0:
        return
    pt_row = pt_ptr + slot.to(tl.int64) * s_pt
    # 1. shrink (C -> r) by the shared A, all (token, head) pairs of the program as the rows of one product
    for r0 in range(0, rank, BLOCK_R):
        rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
        acc = tl.zeros((BLOCK_M * BLOCK_H, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cmask = cc < C
            ol = tl.load(ol_ptr + ptok[:, None] * sol_t + ph[:, None] * sol_h + cc[None, :] * sol_c,
                         mask=pmask[:, None] & cmask[None, :], other=0.0)
            at = tl.load(a_ptr + rows[None, :] * sa_r + cc[:, None], mask=rmask[None, :] & cmask[:, None], other=0.0)
            acc = _mma(ol, at, acc, UPCAST, IEEE)
        tl.store(y_ptr + ptok[:, None] * sy_t + ph[:, None] * sy_h + rr[None, :] * sy_r, acc,
                 mask=pmask[:, None] & rmask[None, :])
    tl.debug_barrier()  # the scratch rows written above are read back by other threads of this program
    # 2. expand per head (r -> Dv) by B_V^h
    scale = _slot_scale(scales_ptr, slot, HAS_SCALE)
    for hl in range(0, BLOCK_H):
        h = h0 + hl
        if h < H:
            for d0 in range(0, DV, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < DV
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                for r0 in range(0, rank, BLOCK_R):
                    rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
                    yt = tl.load(y_ptr + tok[:, None] * sy_t + h * sy_h + rr[None, :] * sy_r,
                                 mask=tmask[:, None] & rmask[None, :], other=0.0)
                    bv = tl.load(b_ptr + rows[:, None] * sb_r + (h * DHEAD + DN + dd[None, :]),
                                 mask=rmask[:, None] & dmask[None, :], other=0.0)
                    acc = _mma_f32_lhs(yt, bv, acc, UPCAST, IEEE)
                ptrs = out_ptr + tok[:, None] * so_t + h * so_h + dd[None, :] * so_d
                m = tmask[:, None] & dmask[None, :]
                cur = tl.load(ptrs, mask=m, other=0.0)
                tl.store(ptrs, (cur.to(tl.float32) + acc * scale).to(out_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------- host side
def cfg(H: int, C: int, D: int, interpret=None) -> dict:
    """Block sizes for ``H`` heads, latent width ``C`` and per-head width ``D`` (Dn on the q side, Dv on the o side).

    On the GPU, fixed (so that the AOT matrix covers every launch): 4 heads × 16 tokens = 64 (token, head) rows
    for the shared-A product (a 64×128 float32 accumulator: 64 registers a thread at 4 warps), D in tiles of 64
    and C in tiles of 128. Under the interpreter, whose cost is per program, per loop step and per element of a
    block (masked lanes included), blocks fit the sizes: all heads up to 8, all of D and up to 256 of C at once."""
    interp = triton_interpret() if interpret is None else interpret
    if interp:
        p2 = triton.next_power_of_2
        return dict(BLOCK_M=GATHER_BLOCK_M, BLOCK_H=min(p2(H), 8), BLOCK_R=BLOCK_R, BLOCK_D=max(16, p2(D)),
                    BLOCK_C=max(16, min(p2(C), 256)), num_warps=4)
    return dict(BLOCK_M=GATHER_BLOCK_M, BLOCK_H=4, BLOCK_R=BLOCK_R, BLOCK_D=64, BLOCK_C=128, num_warps=4)


def _launch(kernel, dst, src, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n, sizes, D):
    T, H, C = dst.shape[0], dst.shape[1], lora_a.shape[1]
    c = cfg(H, C, D)
    # float32 rank-r intermediate; only rows of LoRA tokens below each slot's rank are written and read
    y = torch.empty((T, H, page_table.shape[1]), dtype=torch.float32, device=dst.device)
    upcast, ieee = _flags(dst.dtype)
    grid = (grid_n, triton.cdiv(H, c["BLOCK_H"]))
    kernel[grid](src, *src.stride(), dst, *dst.stride(), lora_a, lora_a.stride(0), lora_b, lora_b.stride(0),
                 page_table, page_table.stride(0), ranks, page_table.shape[1], page_table.shape[0], lora_a.shape[0],
                 scales if scales is not None else ranks, tiles, token_ids, y, *y.stride(), *sizes,
                 HAS_SCALE=scales is not None, BLOCK_M=c["BLOCK_M"], BLOCK_H=c["BLOCK_H"], BLOCK_R=c["BLOCK_R"],
                 BLOCK_D=c["BLOCK_D"], BLOCK_C=c["BLOCK_C"], UPCAST=upcast, IEEE=ieee, num_warps=c["num_warps"])


def mla_absorbed_q(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n):
    """q_latent [T, H, C] += scale * (q_nope [T, H, Dn] @ B_K^h) @ A — one launch. Arguments validated."""
    if grid_n == 0 or q_latent.shape[0] == 0:
        return
    H, C, Dn = q_latent.shape[1], q_latent.shape[2], q_nope.shape[2]
    _launch(_mla_q_kernel, q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n,
            (H, C, Dn, lora_b.shape[1] // H), Dn)


def mla_absorbed_o(out, o_latent, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n):
    """out [T, H, Dv] += scale * (o_latent [T, H, C] @ A.T) @ B_V^h.T — one launch. Arguments validated."""
    if grid_n == 0 or out.shape[0] == 0:
        return
    H, C, Dv = out.shape[1], o_latent.shape[2], out.shape[2]
    dhead = lora_b.shape[1] // H
    _launch(_mla_o_kernel, out, o_latent, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n,
            (H, C, dhead - Dv, Dv, dhead), Dv)
