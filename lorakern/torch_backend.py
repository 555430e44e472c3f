"""The ``torch`` backend of the dense ops and ``add_lora_moe``: the references' semantics (:mod:`lorakern.reference`,
:mod:`lorakern.reference_moe`) in a number of torch ops that does not grow with the batch's adapters.

The reference (the test oracle) loops over the batch's distinct slots, ~30 torch ops each (a ``nonzero`` per slot,
index and matmul per slice, an indexed write back). That is what the ``torch`` backend ran until session 11, and
on a CPU, where each op costs microseconds of dispatch, a decode step over 16 distinct adapters cost ~2.5 ms per
``add_lora`` (the demo's decode ran at +862 % over the base model); on a GPU every slot also cost host
synchronisations (``unique().tolist()``, ``int(ranks[s])``), so it could not be captured in a CUDA graph.

Here the tokens are split once, on one host read (two when there are segments: their runs of consecutive tokens),
into

* **gathered tokens** (adapters with few tokens in the batch): every token's rank rows are gathered through the
  page table, padded to the largest rank among them (``[m, R_b, K]`` and ``[m, R_b, N_i]``), and multiplied with
  ``bmm``, in chunks of at most :data:`GATHER_BUDGET` gathered elements. Past a token's rank the page table is
  not followed (those entries may hold anything): the padding repeats the token's first rank row, and the
  intermediate there is an exact zero (``where``), so it adds nothing as long as that row is finite. On a CPU,
  in fp32 / fp64 (:data:`FLAT_GATHER`), they run **unpadded** instead and copy no weights: the shrink is a sparse
  sampled product (``x @ A.T`` at the (token, rank row) pairs only) and the expand an ``embedding_bag`` whose bags
  are the tokens' rank rows weighted by the intermediate (:func:`_flat_rows`);
* **segments** (adapters with enough tokens that one matmul over their tokens beats gathering their rows per
  token, :func:`_segment_pays`): one ``x_seg @ A.T`` and one ``@ B`` per slice at the slot's real rank (a Python
  loop over those adapters only: at most ``T / count`` of them).

A batch's layers pass the same slots, ranks, scales and page table, so the split is kept for those tensor objects
while none of them changes (:func:`_split_for`): the grouping and its host reads run once per batch and target.

Both feed one write per slice, ``out[tok, slice] = (out[tok, slice] + delta)`` rounded to ``out``'s dtype once, the
delta formed in the accumulation type (:func:`lorakern.reference.acc_dtype`), as the reference does; a segment whose
tokens make a few runs of consecutive tokens (a sequence's prefill is one; :data:`MIN_RUN`) reads ``x`` and adds to
``out`` run by run, in place, rounded the same way. Only tokens with a slot and a rank above 0 are written; the rest
stay as they were, bit for bit.

``add_lora_moe`` runs the same code over the ``T · topk`` (token, expert) pairs, grouped by (slot, expert), with the
packed weights ``[rows, E, ·]`` read as ``[rows · E, ·]`` and each pair's routed weight on its delta.

While a CUDA graph is being captured nothing is read back (the **static** form): every token is gathered at the
page table's full width, tokens without LoRA are masked, ranks are capped at that width and page-table entries
outside ``[0, num_rows)`` read row 0 (values cannot be checked during a capture; the CUDA kernels do the same), so
the torch backend can be captured and replayed with another mix. The form follows the value checks' own switch
(:func:`lorakern.ops._validate._capturing`): wherever the values went unchecked, this form runs.

``LORAKERN_TORCH_PATH=gather|segment|static`` forces one form for every token (tests, and comparing them).

Results equal the reference's up to the summation order of float32 (or float64) sums (the tests compare both
against the float64 oracle on every case of DESIGN.md §6).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from lorakern.ops import _validate
from lorakern.reference import acc_dtype

__all__ = ["add_lora", "add_lora_moe", "lora_shrink", "lora_expand", "mla_absorbed_q", "mla_absorbed_o",
           "GATHER_BUDGET", "SEGMENT_OVERHEAD", "SEGMENT_OVERHEAD_FLAT", "MIN_RUN", "FLAT_GATHER"]

#: largest gathered weight block (elements) of one chunk of tokens, ``m · R_b · max(K, N_i)``, per device type:
#: on a CPU a block that stays in cache (measured on the 2-core development CPU, 256 one-token adapters of rank 16
#: at K = 4096, qkv, bf16: 4 MB blocks 22 ms per call, 64 MB blocks 229 ms); elsewhere few, large launches
GATHER_BUDGET = {"cpu": 1 << 20}
_GATHER_BUDGET_OTHER = 1 << 24
#: a segment's fixed cost in gathered-element equivalents, per slice, per device type: the few torch ops its
#: matmuls take against the per-element cost of a gather. An adapter's tokens go to a segment when gathering
#: their rows per token would move more than this plus the adapter's rows once. The CPU value is measured (the
#: development CPU: ~18 us per adapter and slice against ~0.25 ns per gathered element; 2^16 to 2^18 were within
#: the noise of each other on 9 shapes); the other is a guess (a launch, ~5 us, against HBM bandwidth), not measured
SEGMENT_OVERHEAD = {"cpu": 1 << 16}
#: a segment whose rows make runs of at least this many consecutive rows on average is read and written run by
#: run (slices, no gather and no indexed write); one run is a sequence's prefill, several are the sequences of one
#: adapter in a batch
MIN_RUN = 8
#: device types whose fp32 / fp64 gathered rows run unpadded (:func:`_flat_rows`): a sparse sampled product for
#: the shrink and ``embedding_bag`` for the expand, which read each token's rank rows once and copy none. On the
#: development CPU, 16-256 one-token adapters of ranks 4-64 at K = 256, qkv, contiguous weights: 4-8x faster than
#: the padded ``index_select`` + ``bmm`` in one block (whose copies into fresh memory are bound by page faults
#: there); in the demo's decode, with the split kept per batch too, 1.2-1.55x end to end. Not measured on a GPU,
#: so a GPU keeps the padded form
FLAT_GATHER = {"cpu"}
_SEGMENT_OVERHEAD_OTHER = 1 << 22
#: :data:`SEGMENT_OVERHEAD` where the gathered rows run unpadded (:data:`FLAT_GATHER`): gathering costs less per
#: element there (no copy), so a group needs more tokens before a segment pays. Measured on the development CPU
#: (64 tokens in groups of 2-16, ranks 8 and 32, K = 256 and 1024, qkv or one slice, pool views): 2^18 picks the
#: faster form in every case, 2^16 the slower one in 4 of 16
SEGMENT_OVERHEAD_FLAT = {"cpu": 1 << 18}


@dataclass
class _Split:
    """One call's rows (tokens; ``(token, expert)`` pairs for MoE), grouped: host-side lists, device tensors.

    A row's weights are rank rows ``page_table[slot, j] · E + expert`` of the weights viewed as ``[rows · E, ·]``
    (``E`` = 1 and expert 0 for the dense ops)."""

    # gathered rows: long [m] row ids (None: none), their slots, experts (None when E = 1), ranks; the rank bound
    g_tok: Optional[torch.Tensor] = None
    g_slot: Optional[torch.Tensor] = None
    g_exp: Optional[torch.Tensor] = None
    g_rank: Optional[torch.Tensor] = None
    g_bound: int = 0
    # the static form: g_tok covers every row; g_live marks those to write
    g_live: Optional[torch.Tensor] = None
    # segments, one per (slot, expert) computed by matmul: (row ids long [n], slot, expert, rank, scale, runs):
    # runs = [(lo, hi), ...] the row ranges lo..hi-1 the segment's rows make, in order, when they are one run or
    # long enough (MIN_RUN rows each on average) to be read and written as slices; else None
    segs: List[tuple] = field(default_factory=list)
    # the unpadded row lists of gathered chunks, by (lo, hi) (_flat_rows_of)
    flat_rows: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.g_tok is None and not self.segs


_PATHS = ("gather", "segment", "static")


def _forced_path() -> str:
    path = os.environ.get("LORAKERN_TORCH_PATH", "").strip()
    if path and path not in _PATHS:
        raise ValueError(f"LORAKERN_TORCH_PATH: expected one of {', '.join(_PATHS)}, got {path!r}")
    return path


def _segment_pays(count: int, rank: int, bound: int, width: int, num_slices: int, overhead: int) -> bool:
    """Whether a group's ``count`` rows are cheaper as one segment than gathered per row: gathering moves
    ``count · bound · width`` elements (``width`` = the gathered widths: S·K for A, the slices' N for B), a
    segment ``rank · width`` once plus its ops (``overhead`` per slice, :data:`SEGMENT_OVERHEAD`)."""
    return count * bound * width > overhead * num_slices + rank * width


def _split(page_table, ranks, scales, slots, width: int, num_slices: int, max_count: int = -1,
           experts: Optional[torch.Tensor] = None, E: int = 1, flat: bool = False) -> _Split:
    """Group the rows (module docstring): ``slots`` and ``experts`` (long, per row; None = expert 0) say whose
    weights a row uses. ``max_count`` = the longest segment when a dynamic plan knows it (-1 unknown): at 1 every
    adapter has one token and the grouping reads back less. ``flat``: the gathered rows will run unpadded
    (:data:`FLAT_GATHER`), which the cost model counts at each group's own rank and its own overhead."""
    forced = _forced_path()  # (a wrong value is refused whatever the batch)
    num_slots, R = page_table.shape
    T = slots.shape[0]
    if T == 0 or num_slots == 0 or R == 0:
        return _Split()
    s = slots.long()
    sc = s.clamp(0, num_slots - 1)  # (values are checked before the op runs, except in a CUDA-graph capture)
    rk = ranks.long()[sc].clamp(0, R)
    live = (s >= 0) & (s < num_slots) & (rk > 0)
    if forced == "static" or _validate._capturing(slots.device):
        return _Split(g_tok=torch.arange(T, device=slots.device), g_slot=sc, g_exp=experts,
                      g_rank=torch.where(live, rk, 0), g_bound=R, g_live=live)
    tok = live.nonzero().squeeze(1)  # (a host synchronisation on a GPU, as are the reads below)
    if tok.numel() == 0:
        return _Split()
    st, rt = sc[tok], rk[tok]
    et = experts[tok] if experts is not None else None
    if forced == "gather" or (max_count == 1 and not forced and experts is None):  # one token per adapter
        return _Split(g_tok=tok, g_slot=st, g_exp=et, g_rank=rt, g_bound=int(rt.max()))
    key = st if et is None else st * E + et
    order = torch.argsort(key, stable=True)
    tok, st, rt, key = tok[order], st[order], rt[order], key[order]
    et = et[order] if et is not None else None
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    u_slot = uniq // E
    facts = [u_slot, uniq % E, counts, ranks[u_slot].long().clamp(0, R)]
    if scales is not None:
        facts.append(scales[u_slot])
    facts = torch.stack([f.double() for f in facts]).tolist()  # one host read (integers exact in float64)
    u_l, e_l, c_l, r_l = ([int(v) for v in f] for f in facts[:4])
    s_l = facts[4] if scales is not None else [1.0] * len(u_l)
    bound = max(r_l)
    overhead = (SEGMENT_OVERHEAD_FLAT if flat else SEGMENT_OVERHEAD).get(slots.device.type, _SEGMENT_OVERHEAD_OTHER)
    seg_of = [forced == "segment" or (not forced and _segment_pays(c, r, r if flat else bound, width, num_slices,
                                                                   overhead))
              for c, r in zip(c_l, r_l)]
    out = _Split()
    if not any(seg_of):
        out.g_tok, out.g_slot, out.g_exp, out.g_rank, out.g_bound = tok, st, et, rt, bound
        return out
    # runs of consecutive rows within each group (a sequence's prefill is one): a segment made of a few long runs
    # reads its input and writes its output as slices, one per run (a second host read)
    brk = torch.ones(tok.numel(), dtype=torch.bool, device=tok.device)
    brk[1:] = (key[1:] != key[:-1]) | (tok[1:] != tok[:-1] + 1)
    rs = brk.nonzero().squeeze(1)
    run_pos, run_tok = torch.stack([rs, tok[rs]]).tolist()
    run_pos.append(tok.numel())
    j = 0
    start = 0
    for u, e, c, r, sc_u, seg in zip(u_l, e_l, c_l, r_l, s_l, seg_of):
        runs = []
        while run_pos[j] < start + c:
            runs.append((run_tok[j], run_tok[j] + run_pos[j + 1] - run_pos[j]))
            j += 1
        if seg:
            out.segs.append((tok[start:start + c], u, e, r, sc_u,
                             runs if len(runs) == 1 or c >= MIN_RUN * len(runs) else None))
        start += c
    if not all(seg_of):
        keep = torch.repeat_interleave(torch.tensor([not v for v in seg_of], device=tok.device), counts)
        out.g_tok, out.g_slot, out.g_rank = tok[keep], st[keep], rt[keep]
        out.g_exp = et[keep] if et is not None else None
        out.g_bound = max(r for r, seg in zip(r_l, seg_of) if not seg)
    return out


#: the last few calls' splits, so that a batch's layers group its tokens once (:func:`_split_for`)
_SPLIT_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_SPLIT_CACHE_SIZE = 16


def _split_for(tabs, page_table, ranks, scales, slots, width: int, num_slices: int, max_count: int = -1,
               experts=None, E: int = 1):
    """:func:`_split` for the gathered form ``tabs`` (:func:`_flat_tables`) allows; returns the split and ``tabs``,
    None where the split is the static form (padded, masked).

    A batch's layers call the ops with the same slots (a plan's), ranks, scales and page table: the dense ops'
    splits are kept per those very tensor objects (weak references) and their version counters, so the grouping
    and its host reads run once per batch and target width, not once per layer (inference tensors, which have no
    version counter, MoE pairs and the static form are never kept). Any in-place change of one of those tensors
    (``plan.update``, loading an adapter into a slot) makes a new split. The split's unpadded row lists
    (:func:`_flat_rows_of`) are kept with it."""
    keyed = (slots, ranks, page_table) + (() if scales is None else (scales,))
    pinned = None if experts is not None or _validate._capturing(slots.device) else _validate.pin(keyed)
    if pinned is not None:
        key = (tuple(id(t) for t in keyed), width, num_slices, max_count, tabs is not None, _forced_path())
        hit = _SPLIT_CACHE.get(key)
        if hit is not None and _validate.unchanged(hit[0], keyed):
            try:
                _SPLIT_CACHE.move_to_end(key)
            except KeyError:  # (evicted by another thread meanwhile: the split itself is still valid)
                pass
            return hit[1], tabs
    split = _split(page_table, ranks, scales, slots, width, num_slices, max_count, experts, E,
                   flat=tabs is not None)
    if pinned is not None and split.g_live is None:
        _SPLIT_CACHE[key] = (pinned, split)
        while len(_SPLIT_CACHE) > _SPLIT_CACHE_SIZE:
            _SPLIT_CACHE.popitem(last=False)
    return split, (tabs if split.g_live is None else None)


def _flat_rows_of(page_table, split: _Split, lo: int, hi: int, E: int = 1):
    """:func:`_flat_rows`, kept in the split (a cached split serves a batch's layers)."""
    got = split.flat_rows.get((lo, hi))
    if got is None:
        got = split.flat_rows[(lo, hi)] = _flat_rows(page_table, split, lo, hi, E)
    return got


def _chunks(split: _Split, width: int, flat: bool = False):
    """``(lo, hi)`` ranges of the gathered rows, each gathering at most :data:`GATHER_BUDGET` elements (flat: each
    making a delta of at most that many: nothing is gathered)."""
    m = split.g_tok.shape[0]
    budget = GATHER_BUDGET.get(split.g_tok.device.type, _GATHER_BUDGET_OTHER)
    step = max(1, budget // max(1, (1 if flat else split.g_bound) * max(1, width)))
    return [(lo, min(m, lo + step)) for lo in range(0, m, step)]


def _gather_rows(page_table, split: _Split, lo: int, hi: int, num_rows: int, E: int = 1):
    """(weight row ids long [m · R_b] into ``[rows · E, ·]``, live bool [m, R_b]) of gathered rows ``lo:hi``. A
    position past a row's rank reads the row's first rank row (a real one: live rows have rank >= 1), whose
    product with the masked intermediate is an exact zero; in the static form an entry outside
    ``[0, num_rows)`` reads row 0, as the kernels do."""
    Rb = split.g_bound
    pt = page_table[split.g_slot[lo:hi], :Rb].long()
    live = torch.arange(Rb, device=pt.device)[None, :] < split.g_rank[lo:hi, None]
    if split.g_live is not None:
        pt = torch.where((pt >= 0) & (pt < num_rows), pt, 0)
    pt = torch.where(live, pt, pt[:, :1])
    if split.g_exp is not None:
        pt = pt * E + split.g_exp[lo:hi, None]
    return pt.view(-1), live


def _seg_rows(page_table, u: int, e: int, r: int, E: int):
    rows = page_table[u, :r].long()
    return rows * E + e if E > 1 else rows


def _flat_tables(x, acc, tensors):
    """Each weight tensor as a table for the unpadded gathered form (:func:`_table`), or None where that form does
    not run: a device type outside :data:`FLAT_GATHER`, ``x`` or a weight tensor not of the accumulation type
    itself (fp32 or fp64: the sparse product and ``embedding_bag`` take their operands' dtype and would round a
    half-precision intermediate), or a weight view that no table covers. (Nor does it run in the static form:
    :func:`_split_for`.)"""
    if x.device.type not in FLAT_GATHER or x.dtype != acc:
        return None
    tabs = [_table(t) if t.dtype == acc else None for t in tensors]
    return None if any(t is None for t in tabs) else tabs


def _table(t):
    """``(table, mult)``: a contiguous ``[V, W]`` view of ``t``'s storage with ``t[r] == table[r * mult]``, or None.
    An adapter pool's weights are column views of one row buffer (row stride = the buffer's width); the sparse
    product would copy such a view whole per call (measured: 6x slower), so rows are addressed in a table over the
    same memory whose rows between ``t``'s rows are never read. Needs unit column stride and a row stride that is
    a multiple of the width. The table ends with ``t``'s last row, so it lies within ``t``'s own extent."""
    if t.is_contiguous():
        return t, 1
    W = t.shape[1]
    if t.dim() != 2 or W == 0 or t.stride(1) != 1 or t.stride(0) % W:
        return None
    mult = t.stride(0) // W
    return t.as_strided((max(0, (t.shape[0] - 1) * mult + 1), W), (W, 1), t.storage_offset()), mult


def _flat_rows(page_table, split: _Split, lo: int, hi: int, E: int = 1):
    """The gathered rows ``lo:hi`` unpadded: ``(crow long [m + 1], rows long [n], rep long [n], j long [n])`` with
    ``n`` = the sum of their ranks; row ``t``'s rank rows are entries ``crow[t]:crow[t + 1]``, entry ``p`` is rank
    row ``j[p]`` of row ``rep[p]``, weight row ``rows[p]`` of ``[rows · E, ·]``. Only entries below a row's rank
    are read (dynamic form: every rank is >= 1 and the values were checked)."""
    rk = split.g_rank[lo:hi]
    dev = rk.device
    crow = torch.zeros(hi - lo + 1, dtype=torch.long, device=dev)
    torch.cumsum(rk, 0, out=crow[1:])
    rep = torch.repeat_interleave(torch.arange(hi - lo, device=dev), rk)
    j = torch.arange(rep.shape[0], device=dev) - crow[rep]
    rows = page_table[split.g_slot[lo:hi][rep], j].long()
    if split.g_exp is not None:
        rows = rows * E + split.g_exp[lo:hi][rep]
    return crow, rows, rep, j


_CSR_QUIET = []


def _csr_pattern(crow, cols, vals, size):
    """A sparse CSR tensor (invariants unchecked: ``crow`` and ``cols`` come from checked values). Torch warns once
    per process that sparse CSR is a beta feature, which is not the caller's concern: the first one is made with
    warnings off."""
    if _CSR_QUIET:
        return torch.sparse_csr_tensor(crow, cols, vals, size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _CSR_QUIET.append(True)
        return _csr_pattern(crow, cols, vals, size)


def _shrink_flat(xa, tab, crow, rows):
    """``y [n]``: ``y[p] = xa[row of p] · a[rows[p]]``, the sampled product ``xa @ a.T`` at the pairs (a CSR
    pattern: row ``t`` holds ``rows[crow[t]:crow[t + 1]]``); reads each rank row once and copies none. ``tab`` =
    ``a``'s :func:`_table`."""
    a, mult = tab
    rows = rows if mult == 1 else rows * mult
    vals = torch.zeros(rows.shape[0], dtype=xa.dtype, device=xa.device)
    pattern = _csr_pattern(crow, rows, vals, (xa.shape[0], a.shape[0]))
    return torch.sparse.sampled_addmm(pattern, xa, a.T, beta=0.0).values()


def _expand_flat(y, tab, crow, rows):
    """``delta [m, N]``: row ``t`` = ``sum_p y[p] · b[rows[p]]`` over its entries (``embedding_bag``: each rank row
    read once, none copied). ``tab`` = ``b``'s :func:`_table`."""
    b, mult = tab
    rows = rows if mult == 1 else rows * mult
    return F.embedding_bag(rows, b, crow, mode="sum", per_sample_weights=y, include_last_offset=True)


def _shrink_gathered(xa, a, rows, live, acc):
    """``y [m, R_b]`` (acc) of gathered rows ``xa [m, K]`` (acc); exactly zero past each rank.

    (``index_select`` and a row-vector ``bmm``: on a CPU, advanced indexing and a matrix-vector ``bmm`` take
    4-10x longer for the same work.)"""
    m, Rb = live.shape
    A = a.index_select(0, rows).to(acc).view(m, Rb, a.shape[1])
    y = torch.bmm(xa.unsqueeze(1), A.transpose(1, 2)).squeeze(1)
    return torch.where(live, y, 0.0)


def _expand_gathered(y, b, rows, live, scale, acc):
    """``delta [m, N]`` (acc) = ``scale · y @ B`` over each row's gathered B rows (``y`` is zero past its rank,
    where the rows repeat the row's first one)."""
    m, Rb = live.shape
    B = b.index_select(0, rows).to(acc).view(m, Rb, b.shape[1])
    d = torch.bmm(y.unsqueeze(1), B).squeeze(1)
    return d if scale is None else d * scale.unsqueeze(1)


def _row_scales(scales, slot_ids, weights, tok, acc):
    """Per gathered row: ``scales[slot] · weights[row]`` (either may be None) in acc, or None for 1."""
    sc = None if scales is None else scales[slot_ids].to(acc)
    if weights is None:
        return sc
    w = weights[tok].to(acc)
    return w if sc is None else sc * w


def _write(dst, tok, delta, acc, live=None) -> None:
    """``dst[tok] = (dst[tok] + delta)`` along ``dst``'s first dimension, rounded once; with ``live`` (the static
    form: ``tok`` is every row) only where ``live``. ``dst`` is any view (a slice's columns of ``out``, MLA's
    ``[T, H, D]``)."""
    if live is not None:
        new = (dst.to(acc) + delta).to(dst.dtype)
        dst.copy_(torch.where(live.view(-1, *[1] * (dst.dim() - 1)), new, dst))
        return
    dst.index_copy_(0, tok, (dst[tok].to(acc) + delta).to(dst.dtype))


def _write_all(dsts, toks, deltas, acc, live) -> None:
    """The collected deltas (gathered rows and segments that are not runs) into each destination ``dsts[i]``
    (one per slice), one write each."""
    if not toks:
        return
    tok = toks[0] if len(toks) == 1 else torch.cat(toks)
    for dst, ds in zip(dsts, deltas):
        _write(dst, tok, ds[0] if len(ds) == 1 else torch.cat(ds), acc, live)


def _seg_rows_of(t, tok, runs):
    """A segment's rows of ``t`` (along its first dimension): a slice when they are one run, else gathered."""
    if runs is not None and len(runs) == 1:
        return t[runs[0][0]:runs[0][1]]
    return t[tok]


def _seg_add(dst, runs, delta) -> None:
    """``dst[run rows] += delta`` run by run, in place: in dst's dtype, computed in the accumulation type (rounded
    once, as :func:`_write` does)."""
    i = 0
    for lo, hi in runs:
        dst[lo:hi].add_(delta[i:i + hi - lo])
        i += hi - lo


def _seg_delta(dst, runs, delta, collected: list) -> None:
    """A segment's delta for destination ``dst``: added in place run by run (:func:`_seg_add`) when it has runs,
    else kept for :func:`_write_all`."""
    if runs is not None:
        _seg_add(dst, runs, delta)
    else:
        collected.append(delta)


def _slice_views(out, slice_offsets, lora_b):
    """Each slice's columns of ``out``: the destinations of the dense ops' writes."""
    return [out[:, off:off + b.shape[1]] for off, b in zip(slice_offsets, lora_b)]


def _parts(split: _Split, width: int, flat: bool = False):
    """The units of work: ``("g", lo, hi)`` chunks of gathered rows, ``("s", j)`` segments."""
    units = [("g", lo, hi) for lo, hi in _chunks(split, width, flat)] if split.g_tok is not None else []
    return units + [("s", j) for j in range(len(split.segs))]


def _add(out, x, x_index, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets, max_count=-1,
         experts=None, E=1, weights=None) -> None:
    """The shared body of ``add_lora`` and ``add_lora_moe``: ``out [P, N_total]`` rows (tokens or pairs) take
    their input row ``x[x_index[p]]`` (``x[p]`` when None) and their weights from ``lora_a[i] [rows · E, K]`` /
    ``lora_b[i] [rows · E, N_i]`` through ``slots`` and ``experts`` [P]; ``weights`` [P] scales each row's delta."""
    acc = acc_dtype(out, x, *lora_a, *lora_b)
    K, widths = x.shape[1], [b.shape[1] for b in lora_b]
    tabs = _flat_tables(x, acc, [*lora_a, *lora_b])
    split, tabs = _split_for(tabs, page_table, ranks, scales, slots, len(lora_a) * K + sum(widths), len(lora_a),
                             max_count, experts, E)
    if split.empty:
        return
    num_rows = lora_a[0].shape[0] // E
    views = _slice_views(out, slice_offsets, lora_b)
    deltas = [[] for _ in lora_b]
    toks = []
    for unit in _parts(split, max([K] + widths), tabs is not None):
        if unit[0] == "g":
            _, lo, hi = unit
            tok = split.g_tok[lo:hi]
            xa = x[tok if x_index is None else x_index[tok]].to(acc)
            sc = _row_scales(scales, split.g_slot[lo:hi], weights, tok, acc)
            if tabs is not None:
                crow, rows, rep, _ = _flat_rows_of(page_table, split, lo, hi, E)
                sc = None if sc is None else sc[rep]
                for i, (ta, tb) in enumerate(zip(tabs[:len(lora_a)], tabs[len(lora_a):])):
                    y = _shrink_flat(xa, ta, crow, rows)
                    deltas[i].append(_expand_flat(y if sc is None else y * sc, tb, crow, rows))
            else:
                rows, live = _gather_rows(page_table, split, lo, hi, num_rows, E)
                for i, (a, b) in enumerate(zip(lora_a, lora_b)):
                    y = _shrink_gathered(xa, a, rows, live, acc)
                    deltas[i].append(_expand_gathered(y, b, rows, live, sc, acc))
            toks.append(tok)
            continue
        tok, u, e, r, sc, runs = split.segs[unit[1]]
        rows = _seg_rows(page_table, u, e, r, E)
        xs = (x[x_index[tok]] if x_index is not None else _seg_rows_of(x, tok, runs)).to(acc)
        w = None if weights is None else _seg_rows_of(weights, tok, runs).to(acc).unsqueeze(1)
        for i, (a, b) in enumerate(zip(lora_a, lora_b)):
            d = (xs @ a.index_select(0, rows).to(acc).T @ b.index_select(0, rows).to(acc)) * sc
            _seg_delta(views[i], runs, d if w is None else d * w, deltas[i])
        if runs is None:
            toks.append(tok)
    _write_all(views, toks, deltas, acc, split.g_live)


def add_lora(out, x, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], page_table, ranks,
             scales, slots, slice_offsets: Sequence[int], max_count: int = -1) -> torch.Tensor:
    """:func:`lorakern.reference.add_lora`, vectorised (module docstring). In place on ``out``; returns it."""
    _add(out, x, None, lora_a, lora_b, page_table, ranks, scales, slots, slice_offsets, max_count)
    return out


def add_lora_moe(out, x, topk_ids, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], page_table,
                 ranks, scales, slots, topk_weights, slice_offsets: Sequence[int]) -> torch.Tensor:
    """:func:`lorakern.reference_moe.add_lora_moe`, vectorised: the rows are the ``T · topk`` (token, expert)
    pairs, grouped by (slot, expert); the packed weights ``[rows, E, ·]`` are read as ``[rows · E, ·]``. In place
    on ``out [T, topk, N_total]``; returns it."""
    T, topk = topk_ids.shape
    E = lora_a[0].shape[1]
    P = T * topk
    dev = out.device
    pair_slots = slots.long().repeat_interleave(topk)
    experts = topk_ids.reshape(P).long().clamp(0, E - 1)  # (checked before the op, except in a capture)
    if x.dim() == 3:
        xs, x_index = x.reshape(P, x.shape[2]), None
    else:
        xs, x_index = x, torch.arange(P, device=dev) // topk
    w = None if topk_weights is None else topk_weights.reshape(P)
    a2 = [a.reshape(a.shape[0] * E, a.shape[2]) for a in lora_a]  # (views for a pool's packed tensors)
    b2 = [b.reshape(b.shape[0] * E, b.shape[2]) for b in lora_b]
    o2 = out.reshape(P, out.shape[2])
    _add(o2, xs, x_index, a2, b2, page_table, ranks, scales, pair_slots, slice_offsets, experts=experts, E=E,
         weights=w)
    if o2.data_ptr() != out.data_ptr() or o2.stride() != (out.stride(1), out.stride(2)):
        out.copy_(o2.view(out.shape))  # out was not viewable as [P, N]: the reshape copied it
    return out


def lora_shrink(x, lora_a: Sequence[torch.Tensor], page_table, ranks, slots, out: torch.Tensor,
                max_count: int = -1) -> torch.Tensor:
    """:func:`lorakern.reference.lora_shrink` into ``out`` (``[S, T, max_rank]``), vectorised: zero past each
    token's rank and for tokens without LoRA."""
    acc = acc_dtype(x, *lora_a)
    K = x.shape[1]
    split, tabs = _split_for(_flat_tables(x, acc, lora_a), page_table, ranks, None, slots, len(lora_a) * K,
                             len(lora_a), max_count)
    if out.dtype == acc:
        y_all = out.zero_()
    else:
        y_all = torch.zeros(out.shape, dtype=acc, device=out.device)
    num_rows = lora_a[0].shape[0] if lora_a else 0
    for unit in ([] if split.empty else _parts(split, K, tabs is not None)):
        if unit[0] == "g":
            _, lo, hi = unit
            tok = split.g_tok[lo:hi]
            xa = x[tok].to(acc)
            if tabs is not None:
                crow, rows, rep, j = _flat_rows_of(page_table, split, lo, hi)
                at = (tok[rep], j)
                for i, tab in enumerate(tabs):
                    y_all[i].index_put_(at, _shrink_flat(xa, tab, crow, rows))
                continue
            rows, live = _gather_rows(page_table, split, lo, hi, num_rows)
            for i, a in enumerate(lora_a):
                y_all[i, :, :split.g_bound].index_copy_(0, tok, _shrink_gathered(xa, a, rows, live, acc))
        else:
            tok, u, _, r, _, runs = split.segs[unit[1]]
            rows = _seg_rows(page_table, u, 0, r, 1)
            xs = _seg_rows_of(x, tok, runs).to(acc)
            for i, a in enumerate(lora_a):
                yi = xs @ a.index_select(0, rows).to(acc).T
                if runs is not None:
                    _seg_add(y_all[i, :, :r], runs, yi)  # (y_all is zero there: the add is the value)
                else:
                    y_all[i, :, :r].index_copy_(0, tok, yi)
    if y_all is not out:
        out.copy_(y_all)
    return out


def lora_expand(out, y, lora_b: Sequence[torch.Tensor], page_table, ranks, scales, slots,
                slice_offsets: Sequence[int], max_count: int = -1) -> torch.Tensor:
    """:func:`lorakern.reference.lora_expand`, vectorised: ``y`` is read only below each token's rank."""
    acc = acc_dtype(out, y, *lora_b)
    widths = [b.shape[1] for b in lora_b]
    split, tabs = _split_for(_flat_tables(y, acc, lora_b), page_table, ranks, scales, slots, sum(widths),
                             len(lora_b), max_count)
    if split.empty:
        return out
    num_rows = lora_b[0].shape[0]
    views = _slice_views(out, slice_offsets, lora_b)
    deltas = [[] for _ in lora_b]
    toks = []
    for unit in _parts(split, max(widths), tabs is not None):
        if unit[0] == "g":
            _, lo, hi = unit
            tok = split.g_tok[lo:hi]
            sc = _row_scales(scales, split.g_slot[lo:hi], None, tok, acc)
            if tabs is not None:
                crow, rows, rep, j = _flat_rows_of(page_table, split, lo, hi)
                sc = None if sc is None else sc[rep]
                at = (tok[rep], j)
                for i, tab in enumerate(tabs):
                    yi = y[i][at]
                    deltas[i].append(_expand_flat(yi if sc is None else yi * sc, tab, crow, rows))
                toks.append(tok)
                continue
            rows, live = _gather_rows(page_table, split, lo, hi, num_rows)
            for i, b in enumerate(lora_b):
                yi = torch.where(live, y[i, tok, :split.g_bound].to(acc), 0.0)
                deltas[i].append(_expand_gathered(yi, b, rows, live, sc, acc))
            toks.append(tok)
            continue
        tok, u, _, r, sc, runs = split.segs[unit[1]]
        rows = _seg_rows(page_table, u, 0, r, 1)
        for i, b in enumerate(lora_b):
            yi = _seg_rows_of(y[i, :, :r], tok, runs).to(acc)
            _seg_delta(views[i], runs, (yi @ b.index_select(0, rows).to(acc)) * sc, deltas[i])
        if runs is None:
            toks.append(tok)
    _write_all(views, toks, deltas, acc, split.g_live)
    return out


# ------------------------------------------------------------------------------------------------ MLA
def _mla(kind: str, dst, src, lora_a, lora_b, page_table, ranks, scales, slots, Dn: int) -> None:
    """The shared body of the absorbed MLA ops (:mod:`lorakern.reference_mla`): ``kind`` ``"q"`` (``src`` =
    q_nope ``[T, H, Dn]``, ``dst`` = q_latent ``[T, H, C]``: shrink by each head's ``B_K``, expand by the shared
    A) or ``"o"`` (``src`` = o_latent ``[T, H, C]``, ``dst`` = out ``[T, H, Dv]``: shrink by A, expand by each
    head's ``B_V``). Rows are tokens, gathered or in segments as for the dense ops; ``dst`` is written along its
    first dimension only (it may be any strided view)."""
    acc = acc_dtype(dst, src, lora_a, lora_b)
    H, C = dst.shape[1], lora_a.shape[1]
    per_head = lora_b.shape[1] // H
    split = _split(page_table, ranks, scales, slots, C + lora_b.shape[1], 1)
    if split.empty:
        return
    num_rows = lora_a.shape[0]
    # each head's B_K (q) or B_V (o) as a strided view [rows, H, D]: only that part of a rank row is gathered
    heads = lora_b.view(num_rows, H, per_head)
    b_part = heads[:, :, :Dn] if kind == "q" else heads[:, :, Dn:]

    deltas, toks = [[]], []
    for unit in _parts(split, per_head * H + C):
        if unit[0] == "g":  # per token: its own rank rows (elementwise products and sums: no permuted copies)
            _, lo, hi = unit
            tok = split.g_tok[lo:hi]
            rows, live = _gather_rows(page_table, split, lo, hi, num_rows)
            m, Rb = live.shape
            A = lora_a.index_select(0, rows).to(acc).view(m, Rb, C)
            B = b_part.index_select(0, rows).to(acc).view(m, Rb, H, b_part.shape[2])
            s_rows = src[tok].to(acc)
            if kind == "q":  # y[n, r, h] = q_nope[n, h] · B_K[n, r, h]; delta = y^T @ A
                y = torch.where(live.unsqueeze(2), (B * s_rows.unsqueeze(1)).sum(-1), 0.0)
                d = torch.bmm(y.transpose(1, 2), A)
            else:  # y[n, h, r] = o_latent[n, h] · A[n, r]; delta[n, h] = sum_r y[n, h, r] B_V[n, r, h]
                y = torch.where(live.unsqueeze(1), torch.bmm(s_rows, A.transpose(1, 2)), 0.0)
                d = (B * y.transpose(1, 2).unsqueeze(3)).sum(1)
            sc = _row_scales(scales, split.g_slot[lo:hi], None, tok, acc)
            deltas[0].append(d if sc is None else d * sc.view(-1, 1, 1))
            toks.append(tok)
            continue
        tok, u, _, r, sc, runs = split.segs[unit[1]]  # one adapter's tokens: its rows once, as the reference
        rows = _seg_rows(page_table, u, 0, r, 1)
        s_rows = _seg_rows_of(src, tok, runs).to(acc)
        A = lora_a.index_select(0, rows).to(acc)
        B = b_part.index_select(0, rows).to(acc)
        if kind == "q":
            d = torch.einsum("thr,rc->thc", torch.einsum("thd,rhd->thr", s_rows, B), A) * sc
        else:
            d = torch.einsum("thr,rhv->thv", torch.einsum("thc,rc->thr", s_rows, A), B) * sc
        _seg_delta(dst, runs, d, deltas[0])
        if runs is None:
            toks.append(tok)
    _write_all([dst], toks, deltas, acc, split.g_live)


def mla_absorbed_q(q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, slots) -> torch.Tensor:
    """:func:`lorakern.reference_mla.mla_absorbed_q`, vectorised. In place on ``q_latent``; returns it."""
    _mla("q", q_latent, q_nope, lora_a, lora_b, page_table, ranks, scales, slots, q_nope.shape[2])
    return q_latent


def mla_absorbed_o(out, o_latent, lora_a, lora_b, page_table, ranks, scales, slots) -> torch.Tensor:
    """:func:`lorakern.reference_mla.mla_absorbed_o`, vectorised. In place on ``out``; returns it."""
    H, Dv = out.shape[1], out.shape[2]
    _mla("o", out, o_latent, lora_a, lora_b, page_table, ranks, scales, slots, lora_b.shape[1] // H - Dv)
    return out
