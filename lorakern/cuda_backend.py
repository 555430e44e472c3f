"""Host side of the CUDA backend: argument packing for the torch-free extension ``lorakern._C``.

The extension takes raw pointers, sizes and a stream handle (csrc/bindings.cpp); this module turns validated
tensors into that call. Kernels: csrc/include/lorakern/dense_gather.cuh (gather path: one CTA per work tile of
≤ 16 tokens of one adapter and one slice; fused shrink + expand with the rank-r intermediate in shared memory,
16-byte vector loads of rank rows through the page table, all slices of a target in one launch).

Segment path (csrc/include/lorakern/dense_segment.cuh), chosen when the plan says adapters have long runs of
tokens (the same heuristic as Triton's, ``lorakern.ops.lora.choose_path``) and the dtype is fp16/bf16 with
16-byte-aligned rows: a WMMA tensor-core shrink over 64-token tiles (split over K when the tiles alone would not
fill the GPU) writing a float32 ``y``, then a WMMA expand that feeds ``y`` as a hi + lo pair. Or, for add_lora
with ``LORAKERN_CUDA_SEGMENT=fused|auto`` (:func:`_segment_mode`), both in one mma.sync kernel, one CTA per tile,
``y`` kept on chip. Otherwise (fp32, unaligned shapes) long segments run on the gather kernel, in passes of 4
tokens.

CPU tensors (only under ``LORAKERN_CUDA_EMULATE=1``, see lorakern.backends) go to ``lorakern._C_emu``: the same
kernel sources on the CPU emulator, with host pointers, no stream, and :data:`EMULATED_SMS` multiprocessors.
"""

from __future__ import annotations

import operator
import os

import torch

from lorakern._tables import slice_tables as _tables
from lorakern.backends import cuda_emulator, cuda_extension
from lorakern.moe_grouping import group_pairs, moe_tables, pair_operands
from lorakern.plan import GATHER_BLOCK_M

_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_FUSED, _SHRINK, _EXPAND, _MOE = 0, 1, 2, 3
_SEG_FUSED = 3  # dense_segment's mode 3: shrink + expand in one CTA per tile

#: order of the int64 fields the binding reads (csrc/bindings.cpp, DenseParams)
_DENSE_FIELDS = (
    "x", "sx_t", "sx_k", "a_ptrs", "a_strides", "b_ptrs", "b_strides", "n_sizes", "offsets",
    "page_table", "s_pt", "ranks", "scales", "tiles", "token_ids", "y", "sy_s", "sy_t", "sy_r",
    "out", "so_t", "so_n", "num_tiles", "num_slices", "K", "max_rank", "max_n", "m_split",
    "E", "topk", "sx_p", "so_p", "a_e_strides", "b_e_strides", "topk_w", "sw_t", "sw_k", "n_split", "seg_cols",
    "num_slots", "num_rows",
)
_FIELD_DEFAULTS = {"E": 1, "topk": 1, "m_split": 1, "n_split": 1}


#: multiprocessors the emulator pretends to have (few, so that test shapes with K >= 512 exercise split-K)
EMULATED_SMS = 16


def _ext(device):
    ext = cuda_emulator() if device.type == "cpu" else cuda_extension()
    if isinstance(ext, str):
        raise RuntimeError(ext)
    return ext


#: the current stream's handle without building a torch.cuda.Stream (what inductor's generated code calls)
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device) -> int:
    if device.type == "cpu":
        return 0
    if _RAW_STREAM is not None and device.index is not None:  # (a tensor's device always has its index)
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _aligned(t: torch.Tensor, vec: int) -> bool:
    """16-byte vector access is legal on rows of ``t``: base aligned, unit inner stride, row stride a multiple."""
    st = t.stride()
    if t.data_ptr() % 16 or st[-1] != 1 or t.shape[-1] % vec:
        return False
    for s in st[:-1]:
        if s % vec:
            return False
    return True


def _vec_ok(elsize: int, tensors, offsets=()) -> bool:
    vec = 16 // elsize
    for t in tensors:
        if t is not None and not _aligned(t, vec):
            return False
    for o in offsets:
        if o % vec:
            return False
    return True


def _slices_vec_ok(elsize: int, tables, ws, offsets=()) -> bool:
    """``_vec_ok(elsize, ws, offsets)`` for slice weights ``ws``, read from their cached ``tables``
    (``slice_tables(ws, offsets)``, a :class:`lorakern._tables.SliceTables`) instead of from the tensors on every
    call: the answer follows from the table's cache key (pointers, strides, widths, offsets), so a hit never
    brings a stale one. The tensors themselves when a weight is not 2-D (its last size is not in the key)."""
    if tables.row_gcd is None:
        return _vec_ok(elsize, ws, offsets)
    return tables.bases_aligned and tables.row_gcd % (16 // elsize) == 0


_FIELD_INDEX = {name: i for i, name in enumerate(_DENSE_FIELDS)}
_FIELD_BASE = [_FIELD_DEFAULTS.get(name, 0) for name in _DENSE_FIELDS]


def _fields(f):
    vals = list(_FIELD_BASE)
    idx = _FIELD_INDEX
    for k, v in f.items():
        vals[idx[k]] = int(v)
    return vals


def _packer(names):
    """``pack(values)``: the field list :func:`_fields` would make from ``dict(zip(names, values))`` (the other
    fields at their defaults), for a launch made on every call (add_lora's gather launch). ``names`` are placed in
    :data:`_DENSE_FIELDS` here, once, so the packing follows the binding's layout; per call it is one C-level pick
    of the 41 fields, not a keyword dictionary and a Python loop (~2-3 us less host time). The values must be
    Python ints already (``_fields`` applies ``int``)."""
    if len(set(names)) != len(names) or not set(names) <= set(_DENSE_FIELDS):
        raise ValueError(f"_packer: names must be distinct fields of _DENSE_FIELDS, got {names}")
    pos = {name: i for i, name in enumerate(names)}
    pick = operator.itemgetter(*[pos.get(name, len(names) + i) for i, name in enumerate(_DENSE_FIELDS)])
    defaults = tuple(_FIELD_BASE)

    def pack(values: tuple) -> list:
        return list(pick(values + defaults))

    return pack


def _call(mode, dtype, mt, vec, device, **f):
    _ext(device).dense_gather(_fields(f), _DTYPES[dtype], mode, mt, vec, _stream(device))


def _call_segment(mode, dtype, k_split, device, **f):
    _ext(device).dense_segment(_fields(f), _DTYPES[dtype], mode, k_split, _stream(device))


_SEGMENT_DTYPES = (torch.float16, torch.bfloat16)
_SM_COUNT: dict = {}


def _use_segment(plan_info, dtype, vec: bool) -> bool:
    return plan_info[2] == 1 and vec and dtype in _SEGMENT_DTYPES


#: K steps (of 64) per shrink CTA the split aims at: 3 splits at K = 4096 (22 steps) were the fastest or within 2 %
#: of it in every prefill case measured on an H100 (bench/results/ksplit-h100-20261122-beb08e2.txt)
_K_STEPS_PER_CTA = 22


def _k_split(device, ctas: int, K: int, dtype=torch.bfloat16) -> int:
    """How many CTAs share a tile's K (atomic fp32 adds into y). Below 4 waves of resident CTAs: the larger of
    (a) K / (64 x _K_STEPS_PER_CTA), shorter CTAs keeping more loads in flight (prefill qkv on the H100: 155 µs
    unsplit, 131 µs in 3), and (b) the split (up to 8, K chunks of at least 256) with the fewest waves of resident
    CTAs per unit of work, the smallest on a tie, which fills the GPU when there are few tiles. From 4 waves on,
    no split. ``LORAKERN_CUDA_SEGMENT_K_SPLIT=<n>`` forces n (a tuning knob). Under
    ``torch.use_deterministic_algorithms(True)``: 1, always (the split's fp32 atomic adds land in any order)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    forced = os.environ.get("LORAKERN_CUDA_SEGMENT_K_SPLIT", "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"LORAKERN_CUDA_SEGMENT_K_SPLIT: expected a positive integer, got {forced!r}")
        return max(1, min(int(forced), K // 64))
    slots = _sm_count(device) * _segment_ctas_per_sm(device, dtype, _SHRINK)
    ctas = max(ctas, 1)
    if ctas >= 4 * slots:
        return 1
    by_steps = max(1, min(8, round(K / (64 * _K_STEPS_PER_CTA))))
    best, best_cost = 1, 1.0
    if ctas < slots:
        for ks in range(2, max(1, min(8, K // 256)) + 1):
            cost = -(-ctas * ks // slots) / ks
            if cost < best_cost - 1e-9:
                best, best_cost = ks, cost
    return max(by_steps, best)


def _device_query(device, fn):
    """``fn()`` (a query of the extension about the current device) with ``device`` current; on the CPU emulator,
    as is."""
    if device.type != "cuda":
        return fn()
    with torch.cuda.device(device):
        return fn()


_SEG_CTAS: dict = {}


def _segment_ctas_per_sm(device, dtype, mode: int) -> int:
    """Resident CTAs per SM of a segment kernel (the CUDA occupancy calculator; 2 on the emulator or if unknown)."""
    key = (device, dtype, mode)
    if key not in _SEG_CTAS:
        n = 0
        if device.type == "cuda":
            n = int(_device_query(device, lambda: _ext(device).segment_ctas_per_sm(_DTYPES[dtype], mode)))
        _SEG_CTAS[key] = n if n > 0 else 2
    return _SEG_CTAS[key]


def _sm_count(device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = (EMULATED_SMS if device.type == "cpu"
                             else torch.cuda.get_device_properties(device).multi_processor_count)
    return _SM_COUNT[device]


def _gather_splits(device, ctas: int, mt: int, plan_info, max_n: int, vec_width: int, split_n: bool = True):
    """(m_split, n_split) of the gather kernel: with fewer (tile, slice) CTAs than 2 per SM, each tile's token
    passes (m) and then its columns (n, chunks of at least one warp's vectors) are spread over more CTAs.
    With a static plan (longest segment unknown) it depends only on the grid and the shapes, never on the mix, so
    the launch a CUDA graph captured stays right for any later mix."""
    want = 2 * _sm_count(device)
    if ctas <= 0 or ctas >= want:
        return 1, 1
    longest = plan_info[4] if len(plan_info) > 4 and plan_info[4] > 0 else GATHER_BLOCK_M
    passes = -(-min(longest, GATHER_BLOCK_M) // mt)
    m = max(1, min(passes, -(-want // ctas)))
    n = 1
    if split_n:
        n = max(1, min(-(-want // (ctas * m)), max_n // (32 * vec_width)))
    return m, n


#: values of LORAKERN_CUDA_SEGMENT (how add_lora runs the segment path)
SEGMENT_MODES = ("split", "fused", "auto")
_FUSED_CONFIG: dict = {}


def _segment_mode(setting: str, device, dtype, num_slices: int, max_rank: int, grid_s: int) -> str:
    """``"fused"`` or ``"split"``: how add_lora runs the segment path, given ``setting`` (``LORAKERN_CUDA_SEGMENT``,
    :func:`_segment_setting`).

    * ``split`` (the default, measured): the shrink writes a float32 y [S, T, max_rank] (split over K, atomic
      adds), then the expand reads it;
    * ``fused``: segment_fused_kernel, one CTA per 64-token tile doing the shrink and then the expand of its
      slices, in groups of up to 256 rank columns at the tile's rank (qkv at rank <= 64 in one group; a group
      re-reads x), y never leaving the SM (no split-K, no atomics: deterministic), wherever a layout fits the
      device's shared memory (:func:`_fused_config`: max_rank <= 256, <= 32 slices); else split;
    * ``auto``: fused where it fits and its waves of one CTA per SM are well filled (:func:`_waves_filled`),
      else split.

    Not timed on a GPU yet, hence not the default (docs/cuda.md)."""
    if setting == "split" or not _fused_config(device, dtype, num_slices, max_rank):
        return "split"
    if setting == "auto" and not _waves_filled(grid_s, _sm_count(device)):
        return "split"
    return "fused"


#: ``auto``'s least fill of the fused kernel's last wave of tiles, one CTA per SM (a guess, not yet measured)
FUSED_MIN_WAVE_FILL = 0.75


def _waves_filled(tiles: int, sms: int) -> bool:
    """The fused kernel's tiles fill its waves (one CTA per SM) to at least :data:`FUSED_MIN_WAVE_FILL`: its time
    goes by whole waves, so 128 tiles on an H100's 132 SMs (97 %) are one good wave, 133 tiles are two waves at
    50 %, and 64 tiles leave half the SMs idle. (The old rule, at least one tile per SM, kept the 128-tile prefill
    batch of the benchmark, 8192 tokens over 16 adapters, on the split kernels.)"""
    if tiles <= 0 or sms <= 0:
        return False
    waves = -(-tiles // sms)
    return tiles >= FUSED_MIN_WAVE_FILL * waves * sms


def _segment_setting() -> str:
    """LORAKERN_CUDA_SEGMENT, checked (every add_lora call reads it, whichever path the plan then takes)."""
    mode = os.environ.get("LORAKERN_CUDA_SEGMENT", "").strip().lower() or "split"
    if mode not in SEGMENT_MODES:
        raise ValueError(f"LORAKERN_CUDA_SEGMENT: expected one of {', '.join(SEGMENT_MODES)}, got {mode!r}")
    return mode


#: the fused kernel's limits (dense_segment.cuh, segf): rank columns per group of slices, slices per call
_FUSED_MAX_COLS, _FUSED_MAX_SLICES = 256, 32


def _fused_config(device, dtype, num_slices: int, max_rank: int):
    """``(ring configuration, rank columns per group)`` of the fused kernel on this device, or None when no layout
    fits.

    Columns first (a group as wide as the slices at the pool's max_rank, up to 256: fewer groups re-read x), then
    the first of the build's ring configurations (``lorakern._C.segment_fused_configs()``: (K ring, out-chunk
    ring) depths, deepest first: (6, 3), (4, 3), (4, 2) by default) whose layout fits the device's shared memory
    per block. On an H100 (227 KB) one slice at rank 64 and qkv at rank 64 both get (6, 3); on an A100 (163 KB)
    qkv at rank 64 gets (4, 2)."""
    key = (device, dtype, num_slices, max_rank)
    if key not in _FUSED_CONFIG:
        ext = _ext(device)
        have = int(_device_query(device, ext.max_smem_per_block))
        r16 = -(-max_rank // 16) * 16
        best = None
        if 0 < r16 <= _FUSED_MAX_COLS and num_slices <= _FUSED_MAX_SLICES:
            configs = len(ext.segment_fused_configs())
            for cols in range(min(num_slices * r16, _FUSED_MAX_COLS) // 16 * 16, r16 - 1, -16):
                for config in range(configs):
                    need = int(ext.segment_fused_smem(_DTYPES[dtype], max_rank, config, cols))
                    if 0 < need and need + _FUSED_STATIC_SMEM <= have:
                        best = (config, cols)
                        break
                if best:
                    break
        _FUSED_CONFIG[key] = best
    return _FUSED_CONFIG[key]


#: the fused kernel's static shared memory (1.8 KB on sm_80/89/90a), counted against the same per-block limit
_FUSED_STATIC_SMEM = 2048


def _segment_fused(out, x, a_tab, sa_tab, b_tab, sb_tab, n_tab, off_tab, lora_b, page_table, ranks, scales,
                   token_ids, tiles, grid_n):
    config, cols = _fused_config(x.device, x.dtype, len(lora_b), page_table.shape[1])
    _call_segment(_SEG_FUSED, x.dtype, config, x.device, seg_cols=cols,  # (the configuration in k_split)
                  x=x.data_ptr(), sx_t=x.stride(0), sx_k=x.stride(1), a_ptrs=a_tab.data_ptr(),
                  a_strides=sa_tab.data_ptr(), b_ptrs=b_tab.data_ptr(), b_strides=sb_tab.data_ptr(),
                  n_sizes=n_tab.data_ptr(), offsets=off_tab.data_ptr(), out=out.data_ptr(), so_t=out.stride(0),
                  so_n=out.stride(1), K=x.shape[1], max_n=max(b.shape[1] for b in lora_b),
                  **_common(page_table, ranks, scales, tiles, token_ids, grid_n, len(lora_b), lora_b[0].shape[0]))


def _shrink_k_split(x, S, page_table, grid_n) -> int:
    return _k_split(x.device, grid_n * S * -(-page_table.shape[1] // 64), x.shape[1], x.dtype)


def _segment_shrink(y, x, a_tab, sa_tab, S, page_table, ranks, token_ids, tiles, grid_n, num_rows, ks=None):
    """Into y: zeroed when the K split ``ks`` (default: :func:`_shrink_k_split`) is above 1 (atomic adds)."""
    if ks is None:
        ks = _shrink_k_split(x, S, page_table, grid_n)
    _call_segment(_SHRINK, x.dtype, ks, x.device,
                  x=x.data_ptr(), sx_t=x.stride(0), sx_k=x.stride(1), a_ptrs=a_tab.data_ptr(),
                  a_strides=sa_tab.data_ptr(), y=y.data_ptr(), sy_s=y.stride(0), sy_t=y.stride(1),
                  sy_r=y.stride(2), K=x.shape[1],
                  **_common(page_table, ranks, None, tiles, token_ids, grid_n, S, num_rows))


def _segment_expand(out, y, b_tab, sb_tab, n_tab, off_tab, lora_b, page_table, ranks, scales, token_ids, tiles,
                    grid_n):
    _call_segment(_EXPAND, out.dtype, 1, out.device,
                  b_ptrs=b_tab.data_ptr(), b_strides=sb_tab.data_ptr(), n_sizes=n_tab.data_ptr(),
                  offsets=off_tab.data_ptr(), y=y.data_ptr(), sy_s=y.stride(0), sy_t=y.stride(1),
                  sy_r=y.stride(2), out=out.data_ptr(), so_t=out.stride(0), so_n=out.stride(1),
                  max_n=max(b.shape[1] for b in lora_b),
                  **_common(page_table, ranks, scales, tiles, token_ids, grid_n, len(lora_b), lora_b[0].shape[0]))


#: the fields :func:`_common_values` gives, in its order
_COMMON_FIELDS = ("page_table", "s_pt", "max_rank", "num_slots", "num_rows", "ranks", "scales", "tiles", "token_ids",
                  "num_tiles", "num_slices")


def _common_values(page_table, ranks, scales, tiles, token_ids, grid_n, num_slices, num_rows) -> tuple:
    # max_rank, num_slots, num_rows: the kernels cap ranks at max_rank, skip slots >= num_slots and read row 0 for
    # an out-of-range page-table entry, so that the values a CUDA-graph replay brings unchecked (the value checks
    # cannot run there) never make them hang or read out of bounds
    pt_shape = page_table.shape
    return (page_table.data_ptr(), page_table.stride()[0], pt_shape[1], pt_shape[0], num_rows, ranks.data_ptr(),
            scales.data_ptr() if scales is not None else 0, tiles.data_ptr(), token_ids.data_ptr(), grid_n,
            num_slices)


def _common(page_table, ranks, scales, tiles, token_ids, grid_n, num_slices, num_rows):
    """The fields every launch sets (:func:`_common_values`), by name."""
    return dict(zip(_COMMON_FIELDS, _common_values(page_table, ranks, scales, tiles, token_ids, grid_n, num_slices,
                                                   num_rows)))


def _tokens_per_pass(plan_info) -> int:
    # plan_info[4] (when present) = longest LoRA segment of a dynamic plan; 1 means every adapter has one token
    return 1 if len(plan_info) > 4 and plan_info[4] == 1 else 4


#: add_lora's gather launch: the fields it sets (values in this order; _common_values' fields last)
_pack_add_gather = _packer(("m_split", "n_split", "x", "sx_t", "sx_k", "a_ptrs", "a_strides", "b_ptrs", "b_strides",
                            "n_sizes", "offsets", "out", "so_t", "so_n", "K") + _COMMON_FIELDS)


def add_lora(out, x, lora_a, lora_b, page_table, ranks, scales, token_ids, tiles_gather, tiles_segment,
             slice_offsets, plan_info):
    setting = _segment_setting()  # (a wrong value is refused whichever path runs)
    if page_table.shape[1] == 0:  # a page table 0 wide: rank 0 everywhere, nothing to add
        return
    a_tables = _tables(lora_a)
    b_tables = _tables(lora_b, slice_offsets)
    a_tab, sa_tab, _, _ = a_tables
    b_tab, sb_tab, n_tab, off_tab = b_tables
    elsize = x.element_size()
    # = _vec_ok(elsize, [x, out, *lora_a, *lora_b], slice_offsets), the weights' part from their cached tables
    vec = (_aligned(x, 16 // elsize) and _aligned(out, 16 // elsize) and _slices_vec_ok(elsize, a_tables, lora_a)
           and _slices_vec_ok(elsize, b_tables, lora_b, slice_offsets))
    if _use_segment(plan_info, x.dtype, vec):
        grid_s = plan_info[1]
        if grid_s == 0:
            return
        if _segment_mode(setting, x.device, x.dtype, len(lora_a), page_table.shape[1], grid_s) == "fused":
            _segment_fused(out, x, a_tab, sa_tab, b_tab, sb_tab, n_tab, off_tab, lora_b, page_table, ranks, scales,
                           token_ids, tiles_segment, grid_s)
            return
        S = len(lora_a)
        ks = _shrink_k_split(x, S, page_table, grid_s)
        # Only the split's atomic adds need a zeroed y: the shrink writes every entry the expand reads (the tiles'
        # tokens, below their rank). On the emulator the rest is NaN, so that a read of an unwritten entry shows.
        shape = (S, x.shape[0], page_table.shape[1])
        if ks > 1:
            y = torch.zeros(shape, dtype=torch.float32, device=x.device)
        else:
            y = torch.empty(shape, dtype=torch.float32, device=x.device)
            if x.device.type == "cpu":
                y.fill_(float("nan"))
        _segment_shrink(y, x, a_tab, sa_tab, S, page_table, ranks, token_ids, tiles_segment, grid_s,
                        lora_a[0].shape[0], ks)
        _segment_expand(out, y, b_tab, sb_tab, n_tab, off_tab, lora_b, page_table, ranks, scales, token_ids,
                        tiles_segment, grid_s)
        return
    grid_n = plan_info[0]
    if grid_n == 0:
        return
    mt = _tokens_per_pass(plan_info)
    device = x.device
    ms, ns = _gather_splits(device, grid_n * len(lora_a), mt, plan_info, max(b_tables.widths),
                            16 // elsize if vec else 1)
    # the fields _call(_FUSED, ..., m_split=ms, n_split=ns, x=..., **_common(...)) would pack, without its dicts
    sx, so = x.stride(), out.stride()
    fields = _pack_add_gather(
        (int(ms), int(ns), x.data_ptr(), sx[0], sx[1], *a_tables.data_ptrs[:2], *b_tables.data_ptrs, out.data_ptr(),
         so[0], so[1], x.shape[1])
        + _common_values(page_table, ranks, scales, tiles_gather, token_ids, int(grid_n), len(lora_a),
                         lora_a[0].shape[0]))
    _ext(device).dense_gather(fields, _DTYPES[x.dtype], _FUSED, mt, vec, _stream(device))


def lora_shrink(y, x, lora_a, page_table, ranks, token_ids, tiles_gather, tiles_segment, plan_info):
    y.zero_()
    grid_n = plan_info[0]
    if x.shape[0] == 0 or grid_n == 0 or page_table.shape[1] == 0:
        return
    a_tables = _tables(lora_a)
    a_tab, sa_tab, _, _ = a_tables
    vec = _aligned(x, 16 // x.element_size()) and _slices_vec_ok(x.element_size(), a_tables, lora_a)
    if _use_segment(plan_info, x.dtype, vec) and plan_info[1] > 0:
        _segment_shrink(y, x, a_tab, sa_tab, len(lora_a), page_table, ranks, token_ids, tiles_segment, plan_info[1],
                        lora_a[0].shape[0])
        return
    ms, _ = _gather_splits(x.device, grid_n * len(lora_a), 4, plan_info, 0, 1, split_n=False)
    _call(_SHRINK, x.dtype, 4, vec, x.device, m_split=ms,
          x=x.data_ptr(), sx_t=x.stride(0), sx_k=x.stride(1), a_ptrs=a_tab.data_ptr(), a_strides=sa_tab.data_ptr(),
          y=y.data_ptr(), sy_s=y.stride(0), sy_t=y.stride(1), sy_r=y.stride(2), K=x.shape[1],
          **_common(page_table, ranks, None, tiles_gather, token_ids, grid_n, len(lora_a), lora_a[0].shape[0]))


def lora_expand(out, y, lora_b, page_table, ranks, scales, token_ids, tiles_gather, tiles_segment,
                slice_offsets, plan_info):
    grid_n = plan_info[0]
    if out.shape[0] == 0 or grid_n == 0 or page_table.shape[1] == 0:
        return
    b_tables = _tables(lora_b, slice_offsets)
    b_tab, sb_tab, n_tab, off_tab = b_tables
    vec = (_aligned(out, 16 // out.element_size())
           and _slices_vec_ok(out.element_size(), b_tables, lora_b, slice_offsets))
    if _use_segment(plan_info, out.dtype, vec) and plan_info[1] > 0:
        _segment_expand(out, y, b_tab, sb_tab, n_tab, off_tab, lora_b, page_table, ranks, scales, token_ids,
                        tiles_segment, plan_info[1])
        return
    ms, ns = _gather_splits(out.device, grid_n * len(lora_b), 4, plan_info, max(b.shape[1] for b in lora_b),
                            16 // out.element_size() if vec else 1)
    _call(_EXPAND, out.dtype, 4, vec, out.device, m_split=ms, n_split=ns,
          b_ptrs=b_tab.data_ptr(), b_strides=sb_tab.data_ptr(), n_sizes=n_tab.data_ptr(), offsets=off_tab.data_ptr(),
          y=y.data_ptr(), sy_s=y.stride(0), sy_t=y.stride(1), sy_r=y.stride(2),
          out=out.data_ptr(), so_t=out.stride(0), so_n=out.stride(1),
          **_common(page_table, ranks, scales, tiles_gather, token_ids, grid_n, len(lora_b), lora_b[0].shape[0]))


#: (token, expert) pairs per tile of add_lora_moe: the gather kernel's tile
MOE_BLOCK_M = 16


def add_lora_moe(out, x, topk_ids, lora_a, lora_b, page_table, ranks, scales, slots, topk_weights, slice_offsets,
                 *, constant_ids: bool = False):
    """out [T, topk, N_total] += scale · w · (x @ A_e.T) @ B_e.T on the gather kernel in its MoE mode: one launch,
    one CTA per (tile of pairs of one (adapter, expert) group, slice), the rank-r intermediate in shared memory.
    Arguments validated by :func:`lorakern.ops.add_lora_moe`; the grouping is the Triton backend's
    (:func:`lorakern.moe_grouping.group_pairs`: fixed sizes, no host synchronisation; ``constant_ids``: ``topk_ids``
    is never rewritten, the MLA ops' head ids, so every layer of a batch reuses one grouping), made by one launch
    of the grouping kernel up to its limit (4096 pairs) instead of ~90 torch ops (:mod:`lorakern.grouping`)."""
    T, topk = topk_ids.shape
    num_slots, max_rank = page_table.shape
    if T * topk == 0 or max_rank == 0:
        return
    E = lora_a[0].shape[1]
    pair_ids, tiles, _, n_max = group_pairs(slots, topk_ids, E, num_slots, MOE_BLOCK_M, ranks,
                                            constant_ids=constant_ids)
    if n_max == 0:
        return
    tab = moe_tables(lora_a, lora_b, slice_offsets)
    sx_t, sx_p, sx_k, w = pair_operands(x, topk_weights)
    vec = _vec_ok(x.element_size(), [x, out, *lora_a, *lora_b], slice_offsets)
    # Pairs per pass. The group sizes are on the device; this guess needs no host read: pairs sparse among the
    # possible (adapter, expert) groups (decode) -> mostly one pair per group -> 1; otherwise 4. To tune on a GPU.
    mt = 1 if 4 * T * topk <= num_slots * E else 4
    _call(_MOE, x.dtype, mt, vec, x.device,
          x=x.data_ptr(), sx_t=sx_t, sx_k=sx_k, sx_p=sx_p, a_ptrs=tab[0].data_ptr(), a_strides=tab[1].data_ptr(),
          a_e_strides=tab[2].data_ptr(), b_ptrs=tab[3].data_ptr(), b_strides=tab[4].data_ptr(),
          b_e_strides=tab[5].data_ptr(), n_sizes=tab[6].data_ptr(), offsets=tab[7].data_ptr(),
          out=out.data_ptr(), so_t=out.stride(0), so_p=out.stride(1), so_n=out.stride(2), K=x.shape[-1], E=E,
          topk=topk, topk_w=w.data_ptr() if w is not None else 0, sw_t=w.stride(0) if w is not None else 0,
          sw_k=w.stride(1) if w is not None else 0, max_n=max(b.shape[2] for b in lora_b),
          **_common(page_table, ranks, scales, tiles, pair_ids, n_max, len(lora_a), lora_a[0].shape[0]))


# ------------------------------------------------------------------------------------------------ MLA
# The absorbed MLA LoRA ops are the MoE mode with the heads as "experts": pair (t, h) of tile key slot·H + h;
# the head selects where each rank row's head slice starts (stride Dn + Dv in lora_b, 0 in lora_a), x and out
# rows are [T, H, ·] rows. No kernel of its own: the same gather kernel, rank-r intermediate in shared memory.
_HEAD_IDS: dict = {}
#: one arange(H) per (H, device), never freed: every _HEAD_IDS view reads it, and so do the CUDA graphs that
#: captured one (vLLM captures ~67 batch sizes, more than _HEAD_IDS keeps)
_HEAD_BASE: dict = {}


def _head_ids(T: int, H: int, device) -> torch.Tensor:
    """int32 [T, H] with row t = 0..H-1 (a stride-0 view), one object per shape so that a layer's q and o calls
    share one grouping, and so do the layers of a batch (group_pairs(constant_ids=True): these ids are never
    rewritten)."""
    key = (T, H, str(device))
    ids = _HEAD_IDS.get(key)
    if ids is None:
        base = _HEAD_BASE.get(key[1:])
        if base is None:
            base = _HEAD_BASE[key[1:]] = torch.arange(H, dtype=torch.int32, device=device)
        if len(_HEAD_IDS) > 64:
            _HEAD_IDS.clear()  # (views only: their storage, `base`, is never freed)
        ids = _HEAD_IDS[key] = base.expand(T, H)
    return ids


def mla_absorbed_q(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, slots):
    """q_latent [T, H, C] += scale · (q_nope[t, h] @ B_K^h) @ A: shrink through the first Dn of head h of lora_b's
    rows, expand through lora_a's rows. Arguments validated by :func:`lorakern.ops.mla_absorbed_q`."""
    T, H, Dn = q_nope.shape
    rows = lora_b.shape[0]
    b_k = lora_b.unflatten(1, (H, lora_b.shape[1] // H))[:, :, :Dn]  # [rows, H, Dn], head stride Dn + Dv
    a_h = lora_a.unsqueeze(1).expand(rows, H, lora_a.shape[1])      # [rows, H, C], head stride 0
    add_lora_moe(q_latent, q_nope, _head_ids(T, H, q_nope.device), [b_k], [a_h], page_table, ranks, scales, slots,
                 None, [0], constant_ids=True)


def mla_absorbed_o(out, o_latent, lora_a, lora_b, page_table, ranks, scales, slots):
    """out [T, H, Dv] += scale · (o_latent[t, h] @ A.T) @ B_V^h.T: shrink through lora_a's rows, expand through
    the last Dv of head h of lora_b's rows. Arguments validated by :func:`lorakern.ops.mla_absorbed_o`."""
    T, H, C = o_latent.shape
    Dv = out.shape[2]
    rows = lora_a.shape[0]
    b_v = lora_b.unflatten(1, (H, lora_b.shape[1] // H))[:, :, -Dv:]  # [rows, H, Dv]
    a_h = lora_a.unsqueeze(1).expand(rows, H, C)
    add_lora_moe(out, o_latent, _head_ids(T, H, o_latent.device), [a_h], [b_v], page_table, ranks, scales, slots,
                 None, [0], constant_ids=True)
