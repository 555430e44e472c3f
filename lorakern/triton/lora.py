"""Triton kernels for the dense LoRA ops (DESIGN.md §1, §5), over the paged rank-row layout.

Motivation. ``add_lora`` is memory-bound at every rank we serve (≈1 FLOP/byte when each token has its own adapter,
≈r for long segments). The fewest bytes it must move are each distinct adapter's rank rows once, ``x`` once and the
touched columns of ``out`` read and written once. Two paths get close to that in their regime:

* **gather path** (decode: few tokens per adapter) — ``_fused_kernel``, one launch for all slices: a program takes
  a block of at most 16 tokens of one adapter and one slice, shrinks ``x`` through the adapter's A rows (K → r,
  float32), keeps the rank-r intermediate in a per-call scratch that never leaves the program (written and read
  back by the same program, so it stays in L1/L2), then expands through the B rows over all of ``N_i`` and adds
  into ``out``. Each adapter's A and B rows are read once per 16-token block and ``y`` never round-trips through a
  second launch.
* **segment path** (prefill: long runs of tokens per adapter) — ``_shrink_kernel`` then ``_expand_kernel``, with
  64-token tensor-core tiles; rank tiles and N tiles are spread over programs for parallelism.

Which path runs is decided in :func:`lorakern.ops.lora.choose_path` from the plan's tokens per adapter.

Both paths work at each slot's *real* rank: rank is tiled in blocks of ``BLOCK_R`` (16) and loops stop at the
slot's rank, so a rank-8 adapter costs a rank-8 amount of work next to a rank-128 one; page-table entries at or
beyond a slot's rank are never loaded. Values that only a CUDA-graph replay can bring unchecked (the value checks
cannot run there) never make a kernel read out of bounds: a rank above ``max_rank`` (the page table's width)
counts as ``max_rank``, a slot outside the page table does nothing, and a page-table entry outside the rows of
``lora_a`` / ``lora_b`` reads row 0 (the cuda kernels do the same). Work is a fixed grid over the plan's tile
list (``(start, length, slot)`` rows, length 0 = exit), so a CUDA graph captured with one adapter mix replays
correctly with any other.

Numerics: the shrink accumulates in float32 (fp16/bf16 products are exact in fp32); the float32 intermediate is
never rounded to the input dtype — on the GPU the expand feeds it to the tensor cores as a sum of terms of the
weight dtype (hi + lo for fp16: 22 significant bits; hi + mid + lo for bf16: 24; extra MMAs that a memory-bound
op does not notice); float32
inputs use IEEE-precision dots, not TF32. Under the interpreter everything is upcast to float32 first, since the
interpreter would do bf16 arithmetic on the raw bits (DESIGN.md §6).

Slices: per-slice weights are passed as a device table of data pointers (plus row strides, widths and output
offsets), so all slices of a target run in the same launch. Tables are cached per set of tensors, so a CUDA-graph
capture does no host-to-device copy after the first call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakern._tables import slice_tables as _tables
from lorakern.backends import triton_interpret
from lorakern.plan import GATHER_BLOCK_M, SEGMENT_BLOCK_M

__all__ = ["add_lora", "lora_shrink", "lora_expand"]

BLOCK_R = 16  # rank tile: loops over rank stop at the slot's real rank
#: integer arguments that only bound or index metadata (never a data address's alignment or a vector width): not
#: specialized, so that Triton compiles one variant where it would otherwise compile one per class of value (1,
#: a multiple of 16, other) of each — a pool that grows (num_rows) or a page table of another width (s_pt,
#: max_rank) then reuses the kernels it has. Counted on the test suite: 327 -> 289 distinct compilations.
BOUNDS_ONLY = ("s_pt", "max_rank", "num_slots", "num_rows")


# ----------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b with float32 accumulation (see module docstring for the precision rules)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _mma_f32_lhs(y, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += y @ b for a float32 ``y`` and ``b`` of the weight dtype, without rounding ``y`` to that dtype."""
    if UPCAST:
        return tl.dot(y, b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(y, b, acc, input_precision="ieee")
    elif b.dtype == tl.float16:
        # y = s * (hi + mid) in fp16 (22 significant bits in two terms). fp16 tops out at 65504, below what a
        # float32 y may hold, so each row is first divided by a power of two s (exact) with |y / s| <= 2^14
        # (s = 1 unless some |y| of the row exceeds 2^14), and the row's product is multiplied back by s.
        # A row holding +-Inf keeps s = 1 (Inf / Inf would be NaN), and a term whose hi is infinite gets no lower
        # term (Inf - Inf = NaN): the product is then +-Inf, as in the float64 reference.
        amax = tl.max(tl.abs(y), axis=1)
        big = (amax > 16384.0) & (amax < float("inf"))
        s = tl.where(big, tl.exp2(tl.ceil(tl.log2(tl.maximum(amax, 1.0))) - 14.0), 1.0)
        ys = y / s[:, None]
        hi = ys.to(b.dtype)
        hf = hi.to(tl.float32)
        mid = tl.where(tl.abs(hf) == float("inf"), 0.0, ys - hf).to(b.dtype)
        return acc + s[:, None] * tl.dot(mid, b, tl.dot(hi, b))
    else:
        # bf16 (fp32's range): y = hi + mid + lo, three terms for fp32's 24 significant bits; the extra MMAs are
        # free in a memory-bound op.
        hi = y.to(b.dtype)
        hf = hi.to(tl.float32)
        r1 = tl.where(tl.abs(hf) == float("inf"), 0.0, y - hf)  # (no lower terms under an infinite hi, as above)
        mid = r1.to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(mid, b, acc)
        lo = (r1 - mid.to(tl.float32)).to(b.dtype)
        return tl.dot(lo, b, acc)


@triton.jit
def _tile(tiles_ptr, token_ids_ptr, pid, BLOCK_M: tl.constexpr):
    """Decode work tile ``pid``: (token ids [BLOCK_M], token mask, slot, length)."""
    start = tl.load(tiles_ptr + pid * 3)
    length = tl.load(tiles_ptr + pid * 3 + 1)
    slot = tl.load(tiles_ptr + pid * 3 + 2)
    m = tl.arange(0, BLOCK_M)
    tmask = m < length
    tok = tl.load(token_ids_ptr + start + m, mask=tmask, other=0).to(tl.int64)
    return tok, tmask, slot, length


@triton.jit
def _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R: tl.constexpr):
    """Rank tile ``r0 .. r0 + BLOCK_R`` of a slot: (indices, mask ``< rank``, int64 row ids). The one place the
    kernels read a page table: entries at or beyond the slot's real rank are never loaded; an entry outside
    ``[0, num_rows)`` reads row 0 (see the module docstring)."""
    rr = r0 + tl.arange(0, BLOCK_R)
    rmask = rr < rank
    rows = tl.load(pt_row + rr, mask=rmask, other=0).to(tl.int64)
    rows = tl.where((rows >= 0) & (rows < num_rows), rows, 0)
    return rr, rmask, rows


@triton.jit
def _rank_of(ranks_ptr, slot, max_rank, num_slots):
    """A slot's rank as the kernels use it: capped at max_rank, 0 (nothing to do) for a slot outside
    ``[0, num_slots)`` (see the module docstring)."""
    ok = (slot >= 0) & (slot < num_slots)
    rank = tl.load(ranks_ptr + tl.where(ok, slot, 0))
    return tl.where(ok, tl.minimum(rank, max_rank), 0)


@triton.jit
def _shrink_block(x_ptr, sx_t, sx_k, a_ptr, sa_r, rows, rmask, tok, tmask, K,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """[BLOCK_M, BLOCK_R] float32 = x[tok] @ A[rows].T over all of K."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        xt = tl.load(x_ptr + tok[:, None] * sx_t + kk[None, :] * sx_k,
                     mask=tmask[:, None] & kmask[None, :], other=0.0)
        at = tl.load(a_ptr + rows[None, :] * sa_r + kk[:, None],
                     mask=rmask[None, :] & kmask[:, None], other=0.0)
        acc = _mma(xt, at, acc, UPCAST, IEEE)
    return acc


@triton.jit
def _expand_block(y_ptr, sy_t, sy_r, pt_row_ptr, rank, num_rows, tok, tmask, b_ptr, sb_r, nn, nmask,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 = y[tok, :rank] @ B[rows(:rank), nn], looping over the real rank only.

    ``y_ptr`` points at this slice's ``y``; rows of B come from the slot's page-table row ``pt_row_ptr``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr, rmask, rows = _rank_rows(pt_row_ptr, r0, rank, num_rows, BLOCK_R)
        yt = tl.load(y_ptr + tok[:, None] * sy_t + rr[None, :] * sy_r,
                     mask=tmask[:, None] & rmask[None, :], other=0.0)
        bt = tl.load(b_ptr + rows[:, None] * sb_r + nn[None, :],
                     mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma_f32_lhs(yt, bt, acc, UPCAST, IEEE)
    return acc


@triton.jit
def _accumulate_out(out_ptr, so_t, so_n, tok, tmask, col, nmask, acc, scale):
    """out[tok, col] += scale * acc, rounded once to out's dtype."""
    ptrs = out_ptr + tok[:, None] * so_t + col[None, :] * so_n
    m = tmask[:, None] & nmask[None, :]
    cur = tl.load(ptrs, mask=m, other=0.0)
    tl.store(ptrs, (cur.to(tl.float32) + acc * scale).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _slot_scale(scales_ptr, slot, HAS_SCALE: tl.constexpr):
    if HAS_SCALE:
        return tl.load(scales_ptr + slot)
    else:
        return 1.0


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=BOUNDS_ONLY)
def _shrink_kernel(x_ptr, sx_t, sx_k, a_table, sa_table, pt_ptr, s_pt, ranks_ptr, max_rank, num_slots,
                   num_rows,
                   tiles_ptr, token_ids_ptr, y_ptr, sy_s, sy_t, sy_r, K,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """grid (tiles, slices, rank tiles): y[slice, tok, r0:r0+BLOCK_R] = x[tok] @ A_slice[rows].T."""
    pid, sl, rt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok, tmask, slot, length = _tile(tiles_ptr, token_ids_ptr, pid, BLOCK_M)
    if length == 0:
        return
    rank = _rank_of(ranks_ptr, slot, max_rank, num_slots)
    r0 = rt * BLOCK_R
    if r0 >= rank:
        return
    rr, rmask, rows = _rank_rows(pt_ptr + slot.to(tl.int64) * s_pt, r0, rank, num_rows, BLOCK_R)
    a_ptr = tl.load(a_table + sl).to(tl.pointer_type(x_ptr.dtype.element_ty))
    sa_r = tl.load(sa_table + sl)
    acc = _shrink_block(x_ptr, sx_t, sx_k, a_ptr, sa_r, rows, rmask, tok, tmask, K,
                        BLOCK_M, BLOCK_R, BLOCK_K, UPCAST, IEEE)
    yp = y_ptr + sl * sy_s + tok[:, None] * sy_t + rr[None, :] * sy_r
    tl.store(yp, acc, mask=tmask[:, None] & rmask[None, :])


@triton.jit(do_not_specialize=BOUNDS_ONLY)
def _expand_kernel(y_ptr, sy_s, sy_t, sy_r, b_table, sb_table, n_table, off_table, pt_ptr, s_pt, ranks_ptr,
                   max_rank, num_slots, num_rows,
                   scales_ptr, tiles_ptr, token_ids_ptr, out_ptr, so_t, so_n,
                   HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """grid (tiles, slices, N tiles): out[tok, off + n] += scale * y[slice, tok, :rank] @ B_slice[rows, n]."""
    pid, sl, nt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok, tmask, slot, length = _tile(tiles_ptr, token_ids_ptr, pid, BLOCK_M)
    if length == 0:
        return
    n_i = tl.load(n_table + sl)
    n0 = nt * BLOCK_N
    rank = _rank_of(ranks_ptr, slot, max_rank, num_slots)
    if (n0 >= n_i) | (rank == 0):
        return
    b_ptr = tl.load(b_table + sl).to(tl.pointer_type(out_ptr.dtype.element_ty))
    sb_r = tl.load(sb_table + sl)
    nn = n0 + tl.arange(0, BLOCK_N)
    nmask = nn < n_i
    acc = _expand_block(y_ptr + sl * sy_s, sy_t, sy_r, pt_ptr + slot.to(tl.int64) * s_pt, rank, num_rows, tok, tmask,
                        b_ptr, sb_r, nn, nmask, BLOCK_M, BLOCK_R, BLOCK_N, UPCAST, IEEE)
    off = tl.load(off_table + sl)
    _accumulate_out(out_ptr, so_t, so_n, tok, tmask, off + nn, nmask, acc, _slot_scale(scales_ptr, slot, HAS_SCALE))


@triton.jit(do_not_specialize=BOUNDS_ONLY)
def _fused_kernel(x_ptr, sx_t, sx_k, a_table, sa_table, b_table, sb_table, n_table, off_table,
                  pt_ptr, s_pt, ranks_ptr, max_rank, num_slots, num_rows, scales_ptr, tiles_ptr,
                  token_ids_ptr,
                  y_ptr, sy_s, sy_t, sy_r, out_ptr, so_t, so_n, K,
                  HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """grid (tiles, slices): shrink then expand one token block of one adapter for one slice, in one program."""
    pid, sl = tl.program_id(0), tl.program_id(1)
    tok, tmask, slot, length = _tile(tiles_ptr, token_ids_ptr, pid, BLOCK_M)
    if length == 0:
        return
    rank = _rank_of(ranks_ptr, slot, max_rank, num_slots)
    if rank == 0:
        return
    pt_row = pt_ptr + slot.to(tl.int64) * s_pt
    a_ptr = tl.load(a_table + sl).to(tl.pointer_type(x_ptr.dtype.element_ty))
    sa_r = tl.load(sa_table + sl)
    ys = y_ptr + sl * sy_s
    # shrink, rank tile by rank tile up to the real rank, into this program's rows of the scratch
    for r0 in range(0, rank, BLOCK_R):
        rr, rmask, rows = _rank_rows(pt_row, r0, rank, num_rows, BLOCK_R)
        acc = _shrink_block(x_ptr, sx_t, sx_k, a_ptr, sa_r, rows, rmask, tok, tmask, K,
                            BLOCK_M, BLOCK_R, BLOCK_K, UPCAST, IEEE)
        tl.store(ys + tok[:, None] * sy_t + rr[None, :] * sy_r, acc, mask=tmask[:, None] & rmask[None, :])
    tl.debug_barrier()  # the scratch rows written above are read back by other threads of this program
    b_ptr = tl.load(b_table + sl).to(tl.pointer_type(out_ptr.dtype.element_ty))
    sb_r = tl.load(sb_table + sl)
    n_i = tl.load(n_table + sl)
    off = tl.load(off_table + sl)
    scale = _slot_scale(scales_ptr, slot, HAS_SCALE)
    for n0 in range(0, n_i, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < n_i
        acc = _expand_block(ys, sy_t, sy_r, pt_row, rank, num_rows, tok, tmask, b_ptr, sb_r, nn, nmask,
                            BLOCK_M, BLOCK_R, BLOCK_N, UPCAST, IEEE)
        _accumulate_out(out_ptr, so_t, so_n, tok, tmask, off + nn, nmask, acc, scale)


# ----------------------------------------------------------------------------------------------- host side
def _flags(dtype):
    """(UPCAST, IEEE) constexprs: upcast under the interpreter; IEEE dots for float32 on the GPU."""
    interp = triton_interpret()
    return interp, (not interp) and dtype == torch.float32


def _cfg(path: str):
    """Block sizes. Larger blocks under the interpreter, whose cost is per program and per loop step."""
    interp = triton_interpret()
    if path == "gather":
        return dict(BLOCK_M=GATHER_BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=256 if interp else 128,
                    BLOCK_N=256 if interp else 128, num_warps=4)
    return dict(BLOCK_M=SEGMENT_BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=256 if interp else 64,
                BLOCK_N=256 if interp else 128, num_warps=4)


def _pick(plan_info, tiles_gather, tiles_segment, path=None):
    grid_g, grid_s, p = plan_info[0], plan_info[1], plan_info[2]
    path = path or ("gather" if p == 0 else "segment")
    if path == "gather":
        return path, tiles_gather, grid_g
    return path, tiles_segment, grid_s


def _launch_shrink(y, x, lora_a, page_table, ranks, token_ids, tiles, grid_n, cfg):
    a_tab, sa_tab, _, _ = _tables(lora_a)
    upcast, ieee = _flags(x.dtype)
    S, max_rank = len(lora_a), page_table.shape[1]
    grid = (grid_n, S, triton.cdiv(max_rank, cfg["BLOCK_R"]))
    _shrink_kernel[grid](x, x.stride(0), x.stride(1), a_tab, sa_tab, page_table, page_table.stride(0), ranks,
                         max_rank, page_table.shape[0], lora_a[0].shape[0], tiles, token_ids,
                         y, y.stride(0), y.stride(1), y.stride(2), x.shape[1],
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
                         UPCAST=upcast, IEEE=ieee, num_warps=cfg["num_warps"])


def _launch_expand(out, y, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n, slice_offsets, cfg):
    b_tab, sb_tab, n_tab, off_tab = _tables(lora_b, slice_offsets)
    upcast, ieee = _flags(out.dtype)
    n_max = max(b.shape[1] for b in lora_b)
    grid = (grid_n, len(lora_b), triton.cdiv(n_max, cfg["BLOCK_N"]))
    _expand_kernel[grid](y, y.stride(0), y.stride(1), y.stride(2), b_tab, sb_tab, n_tab, off_tab,
                         page_table, page_table.stride(0), ranks, page_table.shape[1], page_table.shape[0],
                         lora_b[0].shape[0], scales if scales is not None else ranks, tiles, token_ids,
                         out, out.stride(0), out.stride(1),
                         HAS_SCALE=scales is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"],
                         BLOCK_N=cfg["BLOCK_N"], UPCAST=upcast, IEEE=ieee, num_warps=cfg["num_warps"])


def lora_shrink(y, x, lora_a, page_table, ranks, token_ids, tiles_gather, tiles_segment, plan_info):
    """y [S, T, max_rank] float32 ← shrink; every element written (zeros outside each slot's rank)."""
    y.zero_()
    if x.shape[0] == 0:
        return
    path, tiles, grid_n = _pick(plan_info, tiles_gather, tiles_segment)
    if grid_n == 0:
        return
    _launch_shrink(y, x, lora_a, page_table, ranks, token_ids, tiles, grid_n, _cfg(path))


def lora_expand(out, y, lora_b, page_table, ranks, scales, token_ids, tiles_gather, tiles_segment,
                slice_offsets, plan_info):
    """out[:, slices] += scale * y @ B.T for tokens with a slot."""
    path, tiles, grid_n = _pick(plan_info, tiles_gather, tiles_segment)
    if grid_n == 0:
        return
    _launch_expand(out, y, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n, slice_offsets,
                   _cfg(path))


def add_lora(out, x, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles_gather, tiles_segment,
             slice_offsets, plan_info):
    """out[:, slices] += scale * (x @ A.T) @ B.T — fused gather path or two-kernel segment path."""
    path, tiles, grid_n = _pick(plan_info, tiles_gather, tiles_segment)
    if grid_n == 0:
        return
    S, T, max_rank = len(lora_a), x.shape[0], page_table.shape[1]
    # float32 rank-r intermediate; only rows of LoRA tokens below each slot's rank are written and read
    y = torch.empty((S, T, max_rank), dtype=torch.float32, device=x.device)
    cfg = _cfg(path)
    if path == "segment":
        _launch_shrink(y, x, lora_a, page_table, ranks, token_ids, tiles, grid_n, cfg)
        _launch_expand(out, y, lora_b, page_table, ranks, scales, token_ids, tiles, grid_n, slice_offsets, cfg)
        return
    a_tab, sa_tab, _, _ = _tables(lora_a)
    b_tab, sb_tab, n_tab, off_tab = _tables(lora_b, slice_offsets)
    upcast, ieee = _flags(x.dtype)
    _fused_kernel[(grid_n, S)](
        x, x.stride(0), x.stride(1), a_tab, sa_tab, b_tab, sb_tab, n_tab, off_tab,
        page_table, page_table.stride(0), ranks, page_table.shape[1], page_table.shape[0], lora_a[0].shape[0],
        scales if scales is not None else ranks, tiles, token_ids,
        y, y.stride(0), y.stride(1), y.stride(2), out, out.stride(0), out.stride(1), x.shape[1],
        HAS_SCALE=scales is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_N=cfg["BLOCK_N"], UPCAST=upcast, IEEE=ieee, num_warps=cfg["num_warps"])
